//! The report's charts, drawn with plotters' SVG backend: epoch curves per
//! model, validation accuracy of two models, and test accuracy by rotation.
//!
//! Colours come from the Okabe-Ito palette ([`PALETTE`]), which stays
//! distinguishable with the common colour-vision deficiencies; line style
//! (solid/dashed) carries the second distinction so nothing depends on hue
//! alone. Text is emitted as SVG `<text>` and laid out by the browser.

use std::ops::Range;

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use rotsweep_shared::stats::{EpochPoint, ModelStats};

use super::{Curves, ReportError};

/// Okabe-Ito colours, most contrasting on white first (yellow last).
pub const PALETTE: [(u8, u8, u8); 8] = [
    (0x00, 0x72, 0xB2), // blue
    (0xD5, 0x5E, 0x00), // vermillion
    (0x00, 0x9E, 0x73), // bluish green
    (0xCC, 0x79, 0xA7), // reddish purple
    (0xE6, 0x9F, 0x00), // orange
    (0x56, 0xB4, 0xE9), // sky blue
    (0x00, 0x00, 0x00), // black
    (0xF0, 0xE4, 0x42), // yellow
];

/// The `i`-th palette colour (cycling).
pub fn colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

const FONT: &str = "sans-serif";
// Sizes below are what plotters is asked for; its SVG text comes out at
// size / 1.24 (22 -> 17.7 px captions, 16 -> 12.9 px tick labels).

fn plot_error(figure: &str) -> impl Fn(String) -> ReportError + '_ {
    move |message| ReportError::Plot {
        figure: figure.to_string(),
        message,
    }
}

/// Runs a drawing closure on a fresh SVG canvas and returns the document.
fn draw_svg(
    figure: &str,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String>,
) -> Result<String, ReportError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| plot_error(figure)(e.to_string()))?;
        draw(&root).map_err(plot_error(figure))?;
        root.present()
            .map_err(|e| plot_error(figure)(e.to_string()))?;
    }
    Ok(svg)
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A continuous f64 axis whose ticks sit only at given values (rotations,
/// model indices), with labels from a function. plotters' own
/// `with_key_points` loses the f64 value formatter, so this is spelled out.
#[derive(Clone)]
struct Ticks {
    range: Range<f64>,
    keys: Vec<f64>,
    label: fn(f64, &[String]) -> String,
    names: Vec<String>,
}

impl Ranged for Ticks {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = self.range.end - self.range.start;
        let f = if span > 0.0 {
            (value - self.range.start) / span
        } else {
            0.5
        };
        limit.0 + (f * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.keys.clone()
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for Ticks {
    fn format_ext(&self, value: &f64) -> String {
        (self.label)(*value, &self.names)
    }
}

/// Largest epoch of any run (at least 2, so the axis has a span).
fn max_epoch<'a>(runs: impl Iterator<Item = &'a (u32, Vec<EpochPoint>)>) -> i32 {
    runs.flat_map(|(_, r)| r.iter().map(|e| e.epoch as i32))
        .max()
        .unwrap_or(1)
        .max(2)
}

/// A short legend sample of a dashed line (a macro so the legend closure
/// infers the backend type).
macro_rules! dashed_sample {
    ($x:expr, $y:expr, $style:expr) => {
        EmptyElement::at(($x, $y))
            + PathElement::new(vec![(0, 0), (7, 0)], $style)
            + PathElement::new(vec![(11, 0), (18, 0)], $style)
    };
}

/// One curves panel: `metric` of every run, training solid and validation
/// dashed.
fn curves_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    c: &Curves,
    title: &str,
    y_desc: &str,
    y_max: f64,
    legend_at: SeriesLabelPosition,
    pick: fn(&EpochPoint) -> (f64, f64),
) -> Result<(), String> {
    let n_epochs = max_epoch(c.runs.iter());
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(58)
        .build_cartesian_2d(1..n_epochs, 0f64..y_max)
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_labels(n_epochs.min(15) as usize)
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 16))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(s)?;

    for (i, (rotation, run)) in c.runs.iter().enumerate() {
        let col = colour(i);
        let train: Vec<(i32, f64)> = run
            .iter()
            .map(|e| (e.epoch as i32, pick(e).0))
            .filter(|(_, v)| v.is_finite())
            .collect();
        let val: Vec<(i32, f64)> = run
            .iter()
            .map(|e| (e.epoch as i32, pick(e).1))
            .filter(|(_, v)| v.is_finite())
            .collect();
        let style = col.stroke_width(2);
        chart
            .draw_series(LineSeries::new(train, style))
            .map_err(s)?
            .label(format!("rotation {rotation}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(DashedLineSeries::new(val, 7, 4, style))
            .map_err(s)?;
    }
    let black = BLACK.stroke_width(2);
    chart
        .draw_series(std::iter::empty::<PathElement<(i32, f64)>>())
        .map_err(s)?
        .label("training")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], black));
    chart
        .draw_series(std::iter::empty::<PathElement<(i32, f64)>>())
        .map_err(s)?
        .label("validation")
        .legend(move |(x, y)| dashed_sample!(x, y, black));
    chart
        .configure_series_labels()
        .position(legend_at)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(s)?;
    Ok(())
}

/// Accuracy and loss per epoch of one model: one colour per rotation.
pub fn curves(c: &Curves) -> Result<String, ReportError> {
    let loss_max = c
        .runs
        .iter()
        .flat_map(|(_, r)| r.iter().flat_map(|e| [e.train_loss, e.val_loss]))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let loss_max = if loss_max > 0.0 { loss_max * 1.05 } else { 1.0 };
    draw_svg(&format!("curves-{}", c.model), (1100, 400), |root| {
        let (left, right) = root.split_horizontally(550);
        curves_panel(
            &left,
            c,
            &format!("{}: accuracy", c.model),
            "accuracy (fraction correct)",
            1.0,
            SeriesLabelPosition::LowerRight,
            |e| (e.train_accuracy, e.val_accuracy),
        )?;
        curves_panel(
            &right,
            c,
            &format!("{}: loss", c.model),
            "cross-entropy loss (nats)",
            loss_max,
            SeriesLabelPosition::UpperRight,
            |e| (e.train_loss, e.val_loss),
        )
    })
}

/// Mean validation accuracy per epoch over the runs that reached it.
fn mean_curve(c: &Curves) -> Vec<(i32, f64)> {
    let n = max_epoch(c.runs.iter());
    (1..=n)
        .filter_map(|epoch| {
            let xs: Vec<f64> = c
                .runs
                .iter()
                .filter_map(|(_, r)| r.iter().find(|e| e.epoch as i32 == epoch))
                .map(|e| e.val_accuracy)
                .filter(|v| v.is_finite())
                .collect();
            (!xs.is_empty()).then(|| (epoch, xs.iter().sum::<f64>() / xs.len() as f64))
        })
        .collect()
}

/// Validation accuracy of two models: every rotation thin, the mean thick.
pub fn validation_pair(a: &Curves, b: &Curves) -> Result<String, ReportError> {
    let n_epochs = max_epoch(a.runs.iter().chain(b.runs.iter()));
    draw_svg("validation-pair", (1100, 460), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("validation accuracy: {} vs {}", a.model, b.model),
                (FONT, 22),
            )
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(58)
            .build_cartesian_2d(1..n_epochs, 0f64..1f64)
            .map_err(s)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("validation accuracy (fraction correct)")
            .x_labels(n_epochs.min(20) as usize)
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(s)?;
        for (i, c) in [a, b].into_iter().enumerate() {
            let col = colour(i);
            let thin = col.mix(0.45).stroke_width(1);
            for (_, run) in &c.runs {
                let pts: Vec<(i32, f64)> = run
                    .iter()
                    .map(|e| (e.epoch as i32, e.val_accuracy))
                    .filter(|(_, v)| v.is_finite())
                    .collect();
                if i == 0 {
                    chart.draw_series(LineSeries::new(pts, thin)).map_err(s)?;
                } else {
                    chart
                        .draw_series(DashedLineSeries::new(pts, 7, 4, thin))
                        .map_err(s)?;
                }
            }
            let thick = col.stroke_width(4);
            let mean = mean_curve(c);
            let label = format!("{} mean of {} rotation(s)", c.model, c.runs.len());
            let anno = if i == 0 {
                chart.draw_series(LineSeries::new(mean, thick)).map_err(s)?
            } else {
                chart
                    .draw_series(DashedLineSeries::new(mean, 10, 5, thick))
                    .map_err(s)?
            };
            if i == 0 {
                anno.label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], thick));
            } else {
                anno.label(label)
                    .legend(move |(x, y)| dashed_sample!(x, y, thick));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()
            .map_err(s)?;
        Ok(())
    })
}

/// A padded accuracy axis range around `values`, within [0, 1].
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((1.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(0.02);
    ((lo - pad).max(0.0), (hi + pad).min(1.0))
}

/// Test accuracy by rotation (left) and per-model mean with its 95%
/// interval (right).
pub fn test_accuracy(models: &[ModelStats], rotations: &[usize]) -> Result<String, ReportError> {
    // Left: the points and the mean ± sd bands. Right: the points and the
    // 95% intervals, which can be wide with few rotations.
    let points = models
        .iter()
        .flat_map(|m| m.rotations.iter().map(|r| r.test_accuracy));
    let bands = models
        .iter()
        .filter_map(|m| m.test_accuracy.as_ref())
        .flat_map(|d| {
            let sd = d.std.unwrap_or(0.0);
            [d.mean - sd, d.mean + sd]
        });
    let intervals = models
        .iter()
        .filter_map(|m| m.test_accuracy.as_ref().and_then(|d| d.ci95))
        .flat_map(|c| [c.low, c.high]);
    let (y_lo, y_hi) = span(points.clone().chain(bands));
    let (ci_lo, ci_hi) = span(points.chain(intervals));
    let (r_lo, r_hi) = (
        rotations.iter().copied().min().unwrap_or(0) as f64,
        rotations.iter().copied().max().unwrap_or(0) as f64,
    );
    let keys: Vec<f64> = rotations.iter().map(|&r| r as f64).collect();
    let n_models = models.len();

    // The legend sits in a strip under the charts, where it cannot hide a
    // point.
    let strip = 14 + 20 * n_models as u32;
    draw_svg("test-accuracy", (1100, 440 + strip), |root| {
        let (charts, legend) = root.split_vertically(440);
        let (left, right) = charts.split_horizontally(700);
        let mut chart = ChartBuilder::on(&left)
            .caption("test accuracy by rotation", (FONT, 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(58)
            .build_cartesian_2d(
                Ticks {
                    range: (r_lo - 0.5)..(r_hi + 0.5),
                    keys: keys.clone(),
                    label: |x, _| format!("{}", x.round() as i64),
                    names: Vec::new(),
                },
                y_lo..y_hi,
            )
            .map_err(s)?;
        chart
            .configure_mesh()
            .x_desc("rotation (test fold)")
            .y_desc("test accuracy (fraction correct)")
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(s)?;
        for (i, m) in models.iter().enumerate() {
            let col = colour(i);
            let offset = (i as f64 - (n_models as f64 - 1.0) / 2.0) * 0.08;
            if let Some(d) = &m.test_accuracy {
                if let Some(sd) = d.std {
                    chart
                        .draw_series(std::iter::once(Rectangle::new(
                            [(r_lo - 0.5, d.mean - sd), (r_hi + 0.5, d.mean + sd)],
                            col.mix(0.12).filled(),
                        )))
                        .map_err(s)?;
                }
                chart
                    .draw_series(DashedLineSeries::new(
                        [(r_lo - 0.5, d.mean), (r_hi + 0.5, d.mean)],
                        8,
                        5,
                        col.stroke_width(1),
                    ))
                    .map_err(s)?;
            }
            let pts: Vec<(f64, f64)> = m
                .rotations
                .iter()
                .map(|r| (r.rotation as f64 + offset, r.test_accuracy))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                .map_err(s)?;
            let label = match &m.test_accuracy {
                Some(d) => format!(
                    "{}: mean {:.3}{} ({}/{} rotations)",
                    m.name,
                    d.mean,
                    d.std.map_or(String::new(), |sd| format!(" ± {sd:.3} sd")),
                    m.n_used,
                    m.n_total
                ),
                None => format!("{}: no result yet", m.name),
            };
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 5, col.filled())))
                .map_err(s)?;
            let y = 12 + 20 * i as i32;
            legend
                .draw(&Circle::new((80, y), 5, col.filled()))
                .map_err(s)?;
            legend
                .draw(&PathElement::new(
                    vec![(92, y), (112, y)],
                    col.stroke_width(1),
                ))
                .map_err(s)?;
            legend
                .draw(&Text::new(label, (120, y - 7), (FONT, 18)))
                .map_err(s)?;
        }

        let names: Vec<String> = models.iter().map(|m| m.name.clone()).collect();
        let keys: Vec<f64> = (0..n_models).map(|i| i as f64).collect();
        let mut chart = ChartBuilder::on(&right)
            .caption("mean and 95% CI", (FONT, 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(58)
            .build_cartesian_2d(
                Ticks {
                    range: -0.5..(n_models as f64 - 0.5),
                    keys,
                    label: |x, names| {
                        names
                            .get(x.round().max(0.0) as usize)
                            .cloned()
                            .unwrap_or_default()
                    },
                    names,
                },
                ci_lo..ci_hi,
            )
            .map_err(s)?;
        chart
            .configure_mesh()
            .x_desc("model")
            .y_desc("test accuracy (fraction correct)")
            .axis_desc_style((FONT, 18))
            .label_style((FONT, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(s)?;
        for (i, m) in models.iter().enumerate() {
            let col = colour(i);
            let x = i as f64;
            let n = m.rotations.len().max(1) as f64;
            chart
                .draw_series(m.rotations.iter().enumerate().map(|(k, r)| {
                    let dx = (k as f64 - (n - 1.0) / 2.0) * 0.05 - 0.2;
                    Circle::new((x + dx, r.test_accuracy), 4, col.mix(0.6).filled())
                }))
                .map_err(s)?;
            if let Some(d) = &m.test_accuracy {
                if let Some(ci) = d.ci95 {
                    chart
                        .draw_series(std::iter::once(ErrorBar::new_vertical(
                            x + 0.1,
                            ci.low.max(ci_lo),
                            d.mean,
                            ci.high.min(ci_hi),
                            col.stroke_width(2),
                            14,
                        )))
                        .map_err(s)?;
                }
            }
        }
        Ok(())
    })
}

//! The report page: one self-contained HTML document (inline CSS and SVG,
//! no scripts, no external resources) with the figures, the statistics and
//! comparison tables, what is missing, the spec and links to the exports.
//!
//! Every figure sits in `<figure id="fig-ID">`, which the end-to-end test
//! looks for.

use std::fmt::Write as _;

use rotsweep_shared::stats::{Describe, ModelStats, TestOutcome, WilcoxonMethod};

use super::diagrams::escape;
use super::{Analysis, Figure, ReportData};

const STYLE: &str = r#"
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 0 auto; max-width: 1180px; padding: 16px 24px 48px; color: #1a1a1a;
       line-height: 1.45; }
h1 { margin-bottom: 4px; }
h2 { border-bottom: 2px solid #0072b2; padding-bottom: 4px; margin-top: 40px; }
h3 { margin: 8px 0 4px; font-size: 1.05em; }
.status { font-size: 1.05em; }
.partial { background: #fff4e0; border-left: 5px solid #e69f00; padding: 8px 14px; }
.complete { background: #e6f4ef; border-left: 5px solid #009e73; padding: 8px 14px; }
nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
td { white-space: nowrap; }
td.l.wrap { white-space: normal; }
th { background: #f1f4f8; }
td.l, th.l { text-align: left; }
tr.flag td { background: #fff8ea; }
figure { margin: 12px 0 28px; }
figure svg { max-width: 100%; height: auto; }
figure.wide svg { max-width: none; }
.scroll { overflow-x: auto; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.row figure { flex: 0 1 360px; margin: 0; }
figcaption { color: #444; font-size: 0.9em; max-width: 1100px; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 0.85em; }
code { background: #f1f1f1; padding: 0 3px; border-radius: 3px; }
.note { color: #555; font-size: 0.88em; }
"#;

/// Escapes text and turns `backticked` words into `<code>`.
fn prose(text: &str) -> String {
    let escaped = escape(text);
    let mut out = String::new();
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn f3(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("–".to_string(), |v| format!("{v:.3}"))
}

fn f1(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("–".to_string(), |v| format!("{v:.1}"))
}

/// Seconds: two decimals below 10 s, so fast epochs do not read as 0.
fn secs(x: Option<f64>) -> String {
    match x.filter(|v| v.is_finite()) {
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.1}"),
        None => "–".into(),
    }
}

fn p_value(p: f64) -> String {
    if !p.is_finite() {
        "–".into()
    } else if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

fn mean(d: &Option<Describe>) -> Option<f64> {
    d.as_ref().map(|d| d.mean)
}

fn figure_html(out: &mut String, f: &Figure, wide: bool) {
    let _ = write!(
        out,
        r#"<figure id="fig-{}" class="{}"><h3>{}</h3><div class="scroll">{}</div><figcaption>{}</figcaption></figure>"#,
        escape(&f.id),
        if wide { "wide" } else { "" },
        escape(&f.title),
        f.svg,
        prose(&f.caption)
    );
    out.push('\n');
}

fn stats_table(out: &mut String, a: &Analysis) {
    let epoch = a.epoch_choice.as_str();
    let _ = write!(
        out,
        r#"<table><tr><th class="l">model</th><th class="l">kind</th><th>rotations</th><th>test accuracy<br>mean ± sd</th><th>95% CI</th><th>min</th><th>max</th><th>balanced<br>accuracy</th><th>macro F1</th><th>val. accuracy<br>({epoch} epoch)</th><th>epochs<br>trained</th><th>best<br>epoch</th><th>s / epoch</th><th>examples / s</th></tr>"#
    );
    for m in &a.models {
        let t = m.test_accuracy.as_ref();
        let mean_sd = t.map_or("–".to_string(), |d| match d.std {
            Some(sd) => format!("{:.3} ± {sd:.3}", d.mean),
            None => format!("{:.3}", d.mean),
        });
        let ci = t.and_then(|d| d.ci95).map_or("–".to_string(), |c| {
            format!("[{:.3}, {:.3}]", c.low, c.high)
        });
        let _ = write!(
            out,
            r#"<tr class="{}"><td class="l">{}</td><td class="l">{}</td><td>{}/{}{}</td><td>{mean_sd}</td><td>{ci}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            if m.partial { "flag" } else { "" },
            escape(&m.name),
            escape(&m.kind),
            m.n_used,
            m.n_total,
            if m.partial { " (partial)" } else { "" },
            f3(t.map(|d| d.min)),
            f3(t.map(|d| d.max)),
            f3(mean(&m.balanced_accuracy)),
            f3(mean(&m.macro_f1)),
            f3(mean(&m.val_accuracy)),
            f1(mean(&m.epochs_trained)),
            f1(mean(&m.best_epoch)),
            secs(mean(&m.seconds_per_epoch)),
            f1(mean(&m.examples_per_second)),
        );
    }
    out.push_str("</table>\n");
    out.push_str(
        r#"<p class="note">Means over the rotations used; sd is the sample standard deviation (ddof = 1); the 95% confidence interval of the mean uses the t distribution with n − 1 degrees of freedom. Balanced accuracy is the mean recall over the families in the test fold; macro F1 the mean F1 over the families in the truth or the predictions. Test metrics come from the weights restored at the best epoch.</p>"#,
    );
}

fn rotation_table(out: &mut String, models: &[ModelStats]) {
    out.push_str(
        r#"<table><tr><th class="l">model</th><th>rotation</th><th>test accuracy</th><th>balanced accuracy</th><th>macro F1</th><th>epochs trained</th><th>best epoch</th><th>val. accuracy</th><th>at epoch</th><th>s / epoch</th><th>examples / s</th></tr>"#,
    );
    for m in models {
        for r in &m.rotations {
            let _ = write!(
                out,
                r#"<tr><td class="l">{}</td><td>{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                escape(&m.name),
                r.rotation,
                r.test_accuracy,
                f3(r.balanced_accuracy),
                f3(r.macro_f1),
                r.epochs_trained,
                r.best_epoch,
                f3(r.val_accuracy),
                r.chosen_epoch.map_or("–".into(), |e| e.to_string()),
                secs(r.seconds_per_epoch),
                f1(r.examples_per_second),
            );
        }
    }
    out.push_str("</table>\n");
}

fn comparisons_table(out: &mut String, a: &Analysis) {
    if a.comparisons.is_empty() {
        out.push_str("<p>Only one model: nothing to compare.</p>\n");
        return;
    }
    out.push_str(
        r#"<table><tr><th class="l">A − B</th><th>paired rotations</th><th>mean difference</th><th>95% CI (t)</th><th>t (df)</th><th>p (paired t)</th><th>W</th><th>p (Wilcoxon)</th><th class="l">note</th></tr>"#,
    );
    for c in &a.comparisons {
        let mut notes = Vec::new();
        let (ci, t, p_t) = match &c.paired_t {
            TestOutcome::Computed(t) => (
                format!("[{:+.4}, {:+.4}]", t.ci95.low, t.ci95.high),
                format!("{:.3} ({})", t.t, t.df),
                p_value(t.p_value),
            ),
            TestOutcome::NotEnough { reason, .. } | TestOutcome::Undefined { reason } => {
                notes.push(format!("t-test: {reason}"));
                ("–".into(), "–".into(), "–".into())
            }
        };
        let (w, p_w) = match &c.wilcoxon {
            TestOutcome::Computed(w) => {
                if w.min_p_value > 0.05 {
                    notes.push(format!(
                        "not enough rotations for Wilcoxon: with {} nonzero pairs the smallest \
                         possible p is {:.4}, so it cannot reach 0.05",
                        w.n, w.min_p_value
                    ));
                }
                let how = match w.method {
                    WilcoxonMethod::Exact => "exact",
                    WilcoxonMethod::Normal => "normal approx.",
                };
                (
                    format!("{}", w.statistic),
                    format!("{} ({how})", p_value(w.p_value)),
                )
            }
            TestOutcome::NotEnough { reason, .. } | TestOutcome::Undefined { reason } => {
                notes.push(format!("Wilcoxon: {reason}"));
                ("–".into(), "–".into())
            }
        };
        let rotations: Vec<String> = c.rotations.iter().map(|r| r.to_string()).collect();
        let _ = write!(
            out,
            r#"<tr><td class="l">{} − {}</td><td>{} ({})</td><td>{}</td><td>{ci}</td><td>{t}</td><td>{p_t}</td><td>{w}</td><td>{p_w}</td><td class="l wrap">{}</td></tr>"#,
            escape(&c.a),
            escape(&c.b),
            c.rotations.len(),
            rotations.join(", "),
            c.mean_difference()
                .map_or("–".into(), |d| format!("{d:+.4}")),
            escape(&notes.join("; ")),
        );
    }
    out.push_str("</table>\n");
    let _ = write!(
        out,
        r#"<p class="note">Differences are A − B in {} on the rotations both models finished (rotations are paired: every model of a rotation trains and tests on the same folds with the same shuffling seed). p-values are two-sided.</p>"#,
        a.metric.as_str().replace('_', " ")
    );
    out.push('\n');
}

fn missing_section(out: &mut String, a: &Analysis, n_jobs: usize) {
    let n_done = n_jobs - a.missing.len();
    if a.missing.is_empty() {
        let _ = write!(
            out,
            r#"<p class="status complete">Complete: all {n_jobs} jobs have a result.</p>"#
        );
        return;
    }
    let _ = write!(
        out,
        r#"<div class="status partial"><p><strong>Partial report:</strong> {n_done} of {n_jobs} jobs have a result{}. Statistics cover the finished rotations only; models marked “partial” miss rotations.</p><table><tr><th class="l">model</th><th>rotation</th><th class="l">state</th><th>attempt</th><th>last epoch</th><th class="l">last error</th></tr>"#,
        if a.complete {
            " and the sweep is over"
        } else {
            "; the sweep is still running"
        }
    );
    for m in &a.missing {
        let _ = write!(
            out,
            r#"<tr><td class="l">{}</td><td>{}</td><td class="l">{}</td><td>{}</td><td>{}</td><td class="l wrap">{}</td></tr>"#,
            escape(&m.model),
            m.rotation,
            escape(&m.state),
            m.attempt,
            m.epoch,
            escape(&m.last_error)
        );
    }
    out.push_str("</table></div>\n");
}

/// The whole page.
pub fn page(data: &ReportData, a: &Analysis, figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>rotsweep report: {}</title><style>{STYLE}</style></head><body>
<h1>Sweep <code>{}</code></h1>
"#,
        escape(&a.sweep),
        escape(&a.sweep)
    );
    let models: Vec<String> = a
        .models
        .iter()
        .map(|m| format!("{} ({})", m.name, m.kind))
        .collect();
    let _ = writeln!(
        out,
        "<p>{} models × {} rotations: {}. Rotations {}.</p>",
        a.models.len(),
        a.grid_rotations.len(),
        escape(&models.join(", ")),
        a.grid_rotations
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    missing_section(&mut out, a, data.jobs.len());
    out.push_str(
        r##"<nav><a href="#statistics">statistics</a><a href="#comparisons">comparisons</a><a href="#architectures">architectures</a><a href="#curves">curves</a><a href="#validation">validation</a><a href="#test">test accuracy</a><a href="#contingency">contingency</a><a href="#spec">spec</a><a href="#exports">exports</a></nav>
"##,
    );

    out.push_str(r#"<h2 id="statistics">Statistics per model</h2>"#);
    stats_table(&mut out, a);
    out.push_str("<h3>Per rotation</h3>");
    rotation_table(&mut out, &a.models);

    out.push_str(r#"<h2 id="comparisons">Comparisons between models</h2>"#);
    comparisons_table(&mut out, a);

    let section = |out: &mut String, id: &str, title: &str, prefix: &str, row: bool| {
        let _ = write!(out, r#"<h2 id="{id}">{title}</h2>"#);
        let chosen: Vec<&Figure> = figures
            .iter()
            .filter(|f| f.id.starts_with(prefix))
            .collect();
        if chosen.is_empty() {
            let why = if prefix == "architecture-" {
                "No layer table is stored yet: workers send one with each job's result \
                 (workers older than the report's format send none)."
            } else {
                "Nothing to draw yet: no job has reported this."
            };
            let _ = writeln!(out, "<p>{why}</p>");
            return;
        }
        if row {
            out.push_str(r#"<div class="row">"#);
        }
        for f in chosen {
            figure_html(out, f, prefix == "contingency-");
        }
        if row {
            out.push_str("</div>\n");
        }
    };
    section(
        &mut out,
        "architectures",
        "Architectures",
        "architecture-",
        true,
    );
    section(
        &mut out,
        "curves",
        "Training and validation per epoch",
        "curves-",
        false,
    );
    section(
        &mut out,
        "validation",
        "Validation accuracy of two models",
        "validation-pair",
        false,
    );
    section(&mut out, "test", "Test accuracy", "test-accuracy", false);
    section(
        &mut out,
        "contingency",
        "Contingency tables (summed over rotations)",
        "contingency-",
        false,
    );

    let spec = serde_json::from_str::<serde_json::Value>(&data.spec_json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| data.spec_json.clone());
    let _ = write!(
        out,
        r#"<h2 id="spec">Spec</h2><pre>{}</pre>"#,
        escape(&spec)
    );
    out.push_str(
        r#"<h2 id="exports">Exports</h2><ul>
<li><a href="epochs.csv">epochs.csv</a>: one row per job, attempt and epoch (losses, accuracies, seconds, examples per second).</li>
<li><a href="results.csv">results.csv</a>: one row per stored test result, with balanced accuracy, macro F1 and parameter count.</li>
<li><a href="summary.json">summary.json</a>: every number of this page.</li>
<li><code>tensorboard/</code>: one event file per job; open with <code>tensorboard --logdir tensorboard</code>.</li>
<li><code>figures/</code>: each figure as an SVG file.</li>
</ul>
"#,
    );
    let _ = write!(
        out,
        "<p class=\"note\">Generated by rotsweep {} from the stored sweep.</p>\n</body></html>\n",
        env!("CARGO_PKG_VERSION")
    );
    out
}

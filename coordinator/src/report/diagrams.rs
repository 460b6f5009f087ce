//! Figures written as SVG by hand: the architecture diagram (plotters has
//! no boxes-and-arrows primitives) and the contingency heat map (46 class
//! labels on both axes need rotated text, per-cell counts and tooltips,
//! which plotters' category axes do not offer).
//!
//! Every string from the data goes through [`escape`]. No element ids are
//! used, so several diagrams can be inlined in one page without clashes.

use std::fmt::Write as _;

use rotsweep_shared::architecture::LayerInfo;

use super::Architecture;

/// Escapes text for SVG/HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `12345` -> `12,345`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Light fill per layer family (Okabe-Ito hues, washed out for text).
fn layer_fill(kind: &str) -> &'static str {
    match kind {
        "Embedding" | "PositionalEncoding" => "#d6ebf7",
        "Conv1D" => "#fbe3c2",
        "SimpleRNN" | "GRU" | "LSTM" | "MultiHeadAttention" => "#c9eadf",
        "Dense" => "#f2d9e7",
        _ => "#ececec",
    }
}

/// The layers of one model as a column of boxes joined by arrows, with the
/// output shape and parameter count of each layer.
pub fn architecture(a: &Architecture) -> String {
    const W: i32 = 360;
    const BOX_W: i32 = 340;
    const BOX_H: i32 = 46;
    const GAP: i32 = 20;
    const TOP: i32 = 64;
    let n = a.layers.len() as i32;
    let height = TOP + n * (BOX_H + GAP) + 36;
    let x0 = (W - BOX_W) / 2;

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif">"##
    );
    let _ = write!(
        svg,
        r##"<rect width="{W}" height="{height}" fill="#ffffff"/><text x="{}" y="26" text-anchor="middle" font-size="17" font-weight="bold">{} ({})</text><text x="{}" y="46" text-anchor="middle" font-size="13" fill="#444">input: (None, {}) token ids</text>"##,
        W / 2,
        escape(&a.model),
        escape(&a.kind),
        W / 2,
        input_len(&a.layers)
    );
    for (i, l) in a.layers.iter().enumerate() {
        let y = TOP + i as i32 * (BOX_H + GAP);
        let _ = write!(
            svg,
            r##"<rect x="{x0}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{}" stroke="#555" stroke-width="1"/>"##,
            layer_fill(&l.kind)
        );
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="14"><tspan font-weight="bold">{}</tspan><tspan fill="#444"> {}</tspan></text>"##,
            x0 + 10,
            y + 19,
            escape(&l.name),
            escape(&l.kind)
        );
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12.5" fill="#222">output {}</text><text x="{}" y="{}" font-size="12.5" text-anchor="end" fill="#222">{} params</text>"##,
            x0 + 10,
            y + 37,
            escape(&l.shape_text()),
            x0 + BOX_W - 10,
            y + 37,
            thousands(l.n_params)
        );
        if i + 1 < a.layers.len() {
            let (ax, ay) = (W / 2, y + BOX_H);
            let _ = write!(
                svg,
                r##"<line x1="{ax}" y1="{ay}" x2="{ax}" y2="{}" stroke="#555" stroke-width="1.5"/><polygon points="{},{} {},{} {ax},{}" fill="#555"/>"##,
                ay + GAP - 6,
                ax - 5,
                ay + GAP - 7,
                ax + 5,
                ay + GAP - 7,
                ay + GAP - 1
            );
        }
    }
    let total_y = TOP + n * (BOX_H + GAP) + 10;
    let range = if a.n_params_range.0 != a.n_params_range.1 {
        format!(
            " (rotations: {} to {})",
            thousands(a.n_params_range.0),
            thousands(a.n_params_range.1)
        )
    } else {
        String::new()
    };
    let _ = write!(
        svg,
        r##"<text x="{}" y="{total_y}" text-anchor="middle" font-size="14" font-weight="bold">total trainable parameters: {}{}</text></svg>"##,
        W / 2,
        thousands(a.n_params),
        escape(&range)
    );
    svg
}

/// The sequence length the first layer (the embedding) sees.
fn input_len(layers: &[LayerInfo]) -> String {
    layers
        .first()
        .and_then(|l| l.output_shape.first())
        .map_or("L".to_string(), |d| d.to_string())
}

/// Viridis-like sequential colour map (perceptually ordered and readable
/// with colour-vision deficiencies), `t` in [0, 1].
pub fn sequential(t: f64) -> (u8, u8, u8) {
    const STOPS: [(f64, (f64, f64, f64)); 6] = [
        (0.0, (253.0, 231.0, 37.0)),
        (0.2, (122.0, 209.0, 81.0)),
        (0.4, (34.0, 168.0, 132.0)),
        (0.6, (42.0, 120.0, 142.0)),
        (0.8, (65.0, 68.0, 135.0)),
        (1.0, (68.0, 1.0, 84.0)),
    ];
    let t = t.clamp(0.0, 1.0);
    for w in STOPS.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if t <= t1 {
            let f = (t - t0) / (t1 - t0);
            let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
            return (mix(c0.0, c1.0), mix(c0.1, c1.1), mix(c0.2, c1.2));
        }
    }
    (68, 1, 84)
}

/// The summed contingency table as a heat map: rows = true label, columns =
/// predicted label; colour = share of the row, text = count.
pub fn heatmap(model: &str, labels: &[String], table: &[Vec<u64>]) -> String {
    // Sized to fill the page's 1,120 px content width: 46 families get
    // 21 px cells with 9 px counts; the colour legend sits underneath.
    let n = labels.len().max(1);
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as i32;
    let label_font = if n > 30 { 11 } else { 12 };
    let label_w = longest * label_font * 62 / 100 + 12;
    let left = label_w + 40;
    let top = 56;
    let cell = ((1110 - left) / n as i32).clamp(16, 44);
    let grid = cell * n as i32;
    let width = left + grid + 16;
    let height = top + grid + label_w + 90;
    let count_font = (f64::from(cell) * 0.45).clamp(7.0, 13.0);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"##
    );
    let _ = write!(
        svg,
        r##"<rect width="{width}" height="{height}" fill="#ffffff"/><text x="{}" y="28" text-anchor="middle" font-size="17" font-weight="bold">{}: test predictions summed over rotations</text>"##,
        left + grid / 2,
        escape(model)
    );
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{grid}" height="{grid}" fill="#ffffff" stroke="#999"/>"##
    );

    for (i, row) in table.iter().enumerate() {
        let support: u64 = row.iter().sum();
        for (k, &count) in row.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let share = count as f64 / support.max(1) as f64;
            let (r, g, b) = sequential(share);
            let (x, y) = (left + k as i32 * cell, top + i as i32 * cell);
            let _ = write!(
                svg,
                r##"<g><title>true {}, predicted {}: {count} ({:.0}% of {})</title><rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({r},{g},{b})"/>"##,
                escape(&labels[i]),
                escape(&labels[k]),
                share * 100.0,
                support
            );
            // Dark text on the light end of the map, white on the dark end.
            let luminance = 0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b);
            let ink = if luminance > 140.0 { "#000" } else { "#fff" };
            let _ = write!(
                svg,
                r##"<text x="{}" y="{}" text-anchor="middle" dominant-baseline="central" font-size="{count_font:.1}" fill="{ink}"{}>{count}</text></g>"##,
                x + cell / 2,
                y + cell / 2,
                if i == k { r#" font-weight="bold""# } else { "" }
            );
        }
    }
    // Outline the diagonal (correct predictions), zero cells included;
    // inset so neighbouring outlines do not merge into a staircase.
    for i in 0..n as i32 {
        let p = i * cell;
        let _ = write!(
            svg,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#333" stroke-width="1"/>"##,
            left + p + 1,
            top + p + 1,
            cell - 2,
            cell - 2
        );
    }
    // Faint grid lines every 5 classes help follow a row across 46 columns.
    for i in (5..n).step_by(5) {
        let p = i as i32 * cell;
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#bbb" stroke-width="0.6"/><line x1="{}" y1="{top}" x2="{}" y2="{}" stroke="#bbb" stroke-width="0.6"/>"##,
            top + p,
            left + grid,
            top + p,
            left + p,
            left + p,
            top + grid
        );
    }
    for (i, l) in labels.iter().enumerate() {
        let c = i as i32 * cell + cell / 2;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end" dominant-baseline="central" font-size="{label_font}">{}</text>"##,
            left - 5,
            top + c,
            escape(l)
        );
        let (x, y) = (left + c, top + grid + 6);
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{y}" text-anchor="end" dominant-baseline="central" font-size="{label_font}" transform="rotate(-90 {x} {y})">{}</text>"##,
            escape(l)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="14" y="{}" text-anchor="middle" font-size="14" transform="rotate(-90 14 {})">true family</text><text x="{}" y="{}" text-anchor="middle" font-size="14">predicted family</text>"##,
        top + grid / 2,
        top + grid / 2,
        left + grid / 2,
        top + grid + label_w + 30
    );

    // Colour legend under the grid: share of the true family.
    let (lw, ly) = (240, top + grid + label_w + 52);
    let lx = left + grid - lw;
    for step in 0..48 {
        let t = step as f64 / 47.0;
        let (r, g, b) = sequential(t);
        let _ = write!(
            svg,
            r##"<rect x="{}" y="{ly}" width="{}" height="14" fill="rgb({r},{g},{b})"/>"##,
            lx + step * lw / 48,
            lw / 48 + 1
        );
    }
    for (t, anchor, text) in [
        (0.0, "start", "0%"),
        (0.5, "middle", "50%"),
        (1.0, "end", "100%"),
    ] {
        let x = lx + (t * f64::from(lw)) as i32;
        let _ = write!(
            svg,
            r##"<text x="{x}" y="{}" text-anchor="{anchor}" font-size="11">{text}</text>"##,
            ly + 28
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="end" dominant-baseline="central" font-size="12">colour: share of the true family</text></svg>"##,
        lx - 10,
        ly + 7
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_numbers_grouped() {
        assert_eq!(escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&#39;");
        assert_eq!(thousands(50414), "50,414");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[test]
    fn heatmap_shows_every_label_and_nonzero_count() {
        let labels: Vec<String> = ["A<1", "B", "C"].iter().map(|s| s.to_string()).collect();
        let table = vec![vec![5, 0, 1], vec![0, 7, 0], vec![2, 0, 3]];
        let svg = heatmap("m", &labels, &table);
        assert!(svg.contains("A&lt;1"));
        assert_eq!(svg.matches("<title>").count(), 5);
        assert!(svg.contains(">7</text>"));
        assert_eq!(sequential(0.0), (253, 231, 37));
        assert_eq!(sequential(1.0), (68, 1, 84));
    }
}

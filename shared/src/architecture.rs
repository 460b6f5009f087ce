//! A model's architecture as a Keras-like layer table: name, class, output
//! shape and parameter count per layer.
//!
//! The worker fills it from the real candle model it built
//! (`rotsweep_worker::model::Model::layers`) and sends it with each job's
//! result, so the coordinator, which does not link candle, can draw the
//! architecture without retyping it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One row of a model summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// Layer name, e.g. `gru_1`, `dense_2`.
    pub name: String,
    /// Keras class name, e.g. `GRU`, `Dense`.
    pub kind: String,
    /// Output shape without the batch dimension, for sequences of `max_len`.
    pub output_shape: Vec<usize>,
    /// Trainable parameters of this layer.
    pub n_params: usize,
}

impl LayerInfo {
    /// The output shape as Keras prints it, batch included: `(None, 64, 32)`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> = self.output_shape.iter().map(|d| d.to_string()).collect();
        format!("(None, {})", dims.join(", "))
    }
}

/// Total trainable parameters of a layer table.
pub fn total_params(layers: &[LayerInfo]) -> usize {
    layers.iter().map(|l| l.n_params).sum()
}

/// The layer table as aligned text, ending with the total.
pub fn to_table(layers: &[LayerInfo]) -> String {
    let name_w = layers
        .iter()
        .map(|l| l.name.len() + l.kind.len() + 3)
        .max()
        .unwrap_or(0)
        .max(12);
    let shape_w = layers
        .iter()
        .map(|l| l.shape_text().len())
        .max()
        .unwrap_or(0)
        .max(12);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<name_w$}  {:<shape_w$}  {:>10}",
        "layer (type)", "output shape", "params"
    );
    for l in layers {
        let _ = writeln!(
            out,
            "{:<name_w$}  {:<shape_w$}  {:>10}",
            format!("{} ({})", l.name, l.kind),
            l.shape_text(),
            l.n_params
        );
    }
    let _ = writeln!(out, "total trainable parameters: {}", total_params(layers));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_layer_and_the_total() {
        let layers = vec![
            LayerInfo {
                name: "embedding".into(),
                kind: "Embedding".into(),
                output_shape: vec![64, 8],
                n_params: 216,
            },
            LayerInfo {
                name: "output".into(),
                kind: "Dense".into(),
                output_shape: vec![15],
                n_params: 135,
            },
        ];
        let text = to_table(&layers);
        assert!(text.contains("embedding (Embedding)"), "{text}");
        assert!(text.contains("(None, 64, 8)"), "{text}");
        assert!(
            text.ends_with("total trainable parameters: 351\n"),
            "{text}"
        );
        assert_eq!(total_params(&layers), 351);
    }
}

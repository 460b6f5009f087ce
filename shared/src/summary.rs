//! Cross-rotation summaries: per model, the test accuracy of each rotation,
//! mean, standard deviation, range, epochs and seconds per epoch, and the
//! contingency (confusion) table summed over rotations.
//!
//! `std` is the sample standard deviation (ddof = 1, as `numpy.std(x,
//! ddof=1)` and `statistics.stdev`): rotations are a sample of the possible
//! splits. It is `None` with fewer than two used rotations.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The stored result of one completed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Model name.
    pub model: String,
    /// Rotation index.
    pub rotation: usize,
    /// Test accuracy in [0, 1]; NaN when the job produced no valid metric.
    pub test_accuracy: f64,
    /// Epochs trained.
    pub epochs: u32,
    /// Epoch whose weights were restored (1-based).
    pub best_epoch: u32,
    /// Mean wall seconds per epoch.
    pub seconds_per_epoch: f64,
    /// Label names of the confusion matrix rows/columns.
    pub labels: Vec<String>,
    /// Rows = true label, columns = predicted label.
    pub confusion: Vec<Vec<u64>>,
}

/// One rotation's line of a model summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationSummary {
    /// Rotation index.
    pub rotation: usize,
    /// Test accuracy in [0, 1].
    pub test_accuracy: f64,
    /// Epochs trained.
    pub epochs: u32,
    /// Epoch whose weights were used for the test.
    pub best_epoch: u32,
    /// Mean wall seconds per epoch.
    pub seconds_per_epoch: f64,
}

/// A model's results over all of its rotations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Model name.
    pub name: String,
    /// Model kind (`rnn`, `gru`, `mha`).
    pub kind: String,
    /// Completed rotations with a valid metric, by rotation index.
    pub rotations: Vec<RotationSummary>,
    /// Mean test accuracy of the used rotations.
    pub mean: Option<f64>,
    /// Sample standard deviation (ddof = 1) of the test accuracies.
    pub std: Option<f64>,
    /// Lowest test accuracy.
    pub min: Option<f64>,
    /// Highest test accuracy.
    pub max: Option<f64>,
    /// Rotations that contributed.
    pub n_used: usize,
    /// Rotations in the grid.
    pub n_total: usize,
    /// Confusion matrix summed over used rotations, in `labels` order.
    pub confusion: Vec<Vec<u64>>,
}

/// The summary of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Sweep name.
    pub sweep: String,
    /// Union of all labels, sorted; the confusion matrices' order.
    pub labels: Vec<String>,
    /// One entry per model, by name.
    pub models: Vec<ModelSummary>,
    /// True when every job reached a final state.
    pub complete: bool,
}

/// A model of the grid: name, kind and number of rotations.
#[derive(Debug, Clone)]
pub struct GridModel {
    /// Model name.
    pub name: String,
    /// Model kind.
    pub kind: String,
    /// Rotations in the grid for this model.
    pub n_total: usize,
}

/// Mean and sample standard deviation (ddof = 1).
pub fn mean_std(xs: &[f64]) -> (Option<f64>, Option<f64>) {
    if xs.is_empty() {
        return (None, None);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (Some(mean), None);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (Some(mean), Some(var.sqrt()))
}

/// Aggregates job results into a sweep summary. Results with a non-finite
/// accuracy are not used (they count in `n_total`, not in `n_used`).
pub fn summarize(
    sweep: &str,
    grid: &[GridModel],
    results: &[JobResult],
    complete: bool,
) -> Result<Summary> {
    let mut all_labels: Vec<String> = results
        .iter()
        .flat_map(|r| r.labels.iter().cloned())
        .collect();
    all_labels.sort();
    all_labels.dedup();
    let label_idx: BTreeMap<&str, usize> = all_labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let n = all_labels.len();

    let mut models = Vec::new();
    for m in grid {
        let mut used: Vec<&JobResult> = results
            .iter()
            .filter(|r| r.model == m.name && r.test_accuracy.is_finite())
            .collect();
        used.sort_by_key(|r| r.rotation);

        let mut confusion = vec![vec![0u64; n]; n];
        for r in &used {
            if r.confusion.len() != r.labels.len()
                || r.confusion.iter().any(|row| row.len() != r.labels.len())
            {
                return Err(Error::Result(format!(
                    "model {} rotation {}: confusion matrix is not {}x{}",
                    r.model,
                    r.rotation,
                    r.labels.len(),
                    r.labels.len()
                )));
            }
            for (i, row) in r.confusion.iter().enumerate() {
                for (j, &count) in row.iter().enumerate() {
                    confusion[label_idx[r.labels[i].as_str()]][label_idx[r.labels[j].as_str()]] +=
                        count;
                }
            }
        }

        let accs: Vec<f64> = used.iter().map(|r| r.test_accuracy).collect();
        let (mean, std) = mean_std(&accs);
        models.push(ModelSummary {
            name: m.name.clone(),
            kind: m.kind.clone(),
            rotations: used
                .iter()
                .map(|r| RotationSummary {
                    rotation: r.rotation,
                    test_accuracy: r.test_accuracy,
                    epochs: r.epochs,
                    best_epoch: r.best_epoch,
                    seconds_per_epoch: r.seconds_per_epoch,
                })
                .collect(),
            mean,
            std,
            min: accs.iter().copied().reduce(f64::min),
            max: accs.iter().copied().reduce(f64::max),
            n_used: used.len(),
            n_total: m.n_total,
            confusion,
        });
    }

    Ok(Summary {
        sweep: sweep.to_string(),
        labels: all_labels,
        models,
        complete,
    })
}

impl Summary {
    /// A plain-text table, one line per model, for terminals and the README.
    pub fn to_table(&self) -> String {
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
        let mut rotations: Vec<usize> = self
            .models
            .iter()
            .flat_map(|m| m.rotations.iter().map(|r| r.rotation))
            .collect();
        rotations.sort();
        rotations.dedup();

        let mut out = String::new();
        let _ = write!(out, "{:<10} {:<5}", "model", "kind");
        for r in &rotations {
            let _ = write!(out, " {:>7}", format!("rot{r}"));
        }
        let _ = writeln!(
            out,
            " {:>7} {:>7} {:>7} {:>7} {:>6} {:>7} {:>7}",
            "mean", "std", "min", "max", "used", "epochs", "s/epoch"
        );
        for m in &self.models {
            let _ = write!(out, "{:<10} {:<5}", m.name, m.kind);
            for r in &rotations {
                let acc = m.rotations.iter().find(|x| x.rotation == *r);
                let _ = write!(out, " {:>7}", fmt(acc.map(|x| x.test_accuracy)));
            }
            // A model without results has no mean: "-", not "-0.0" (the
            // sum of no f64 is -0.0).
            let n = m.rotations.len();
            let mean_of = |x: &dyn Fn(&RotationSummary) -> f64| {
                if n == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}", m.rotations.iter().map(x).sum::<f64>() / n as f64)
                }
            };
            let epochs = mean_of(&|r| r.epochs as f64);
            let spe = mean_of(&|r| r.seconds_per_epoch);
            let _ = writeln!(
                out,
                " {:>7} {:>7} {:>7} {:>7} {:>6} {:>7} {:>7}",
                fmt(m.mean),
                fmt(m.std),
                fmt(m.min),
                fmt(m.max),
                format!("{}/{}", m.n_used, m.n_total),
                epochs,
                spe
            );
        }
        if !self.complete {
            let _ = writeln!(out, "(partial: some jobs have not finished)");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(model: &str, rotation: usize, acc: f64, labels: &[&str], diag: u64) -> JobResult {
        let n = labels.len();
        let mut confusion = vec![vec![0; n]; n];
        for (i, row) in confusion.iter_mut().enumerate() {
            row[i] = diag;
        }
        JobResult {
            model: model.into(),
            rotation,
            test_accuracy: acc,
            epochs: 3,
            best_epoch: 2,
            seconds_per_epoch: 1.5,
            labels: labels.iter().map(|s| s.to_string()).collect(),
            confusion,
        }
    }

    #[test]
    fn mean_and_sample_std_match_numpy() {
        // python3 -c "import numpy as np; x=[0.8,0.85,0.9,0.7,0.75];
        //             print(np.mean(x), np.std(x, ddof=1))"
        // 0.8 0.07905694150420949
        let (mean, std) = mean_std(&[0.8, 0.85, 0.9, 0.7, 0.75]);
        assert!((mean.unwrap() - 0.8).abs() < 1e-12);
        assert!((std.unwrap() - 0.07905694150420949).abs() < 1e-12);
        assert_eq!(mean_std(&[0.5]), (Some(0.5), None));
        assert_eq!(mean_std(&[]), (None, None));
    }

    #[test]
    fn confusion_is_summed_in_union_label_order_and_nan_is_excluded() {
        let grid = [GridModel {
            name: "gru".into(),
            kind: "gru".into(),
            n_total: 3,
        }];
        let results = [
            result("gru", 0, 0.5, &["B", "A"], 2),
            result("gru", 1, 0.7, &["A", "C"], 1),
            result("gru", 2, f64::NAN, &["A", "C"], 9),
        ];
        let s = summarize("s", &grid, &results, true).unwrap();
        assert_eq!(s.labels, vec!["A", "B", "C"]);
        let m = &s.models[0];
        assert_eq!((m.n_used, m.n_total), (2, 3));
        assert_eq!(
            m.confusion,
            vec![vec![3, 0, 0], vec![0, 2, 0], vec![0, 0, 1]]
        );
        assert!((m.mean.unwrap() - 0.6).abs() < 1e-12);
        assert_eq!(m.rotations.len(), 2);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["models"][0]["confusion"][0][0], 3);
        assert!(s.to_table().contains("2/3"));
    }

    #[test]
    fn a_model_without_results_shows_dashes_not_negative_zero() {
        let grid = [GridModel {
            name: "mha".into(),
            kind: "mha".into(),
            n_total: 2,
        }];
        let table = summarize("s", &grid, &[], false).unwrap().to_table();
        let row = table.lines().nth(1).unwrap();
        assert!(row.starts_with("mha") && row.contains("0/2"), "{table}");
        assert!(!row.contains("-0.0"), "{table}");
        assert!(row.trim_end().ends_with("-       -"), "{table}");
    }

    #[test]
    fn malformed_confusion_is_an_error() {
        let grid = [GridModel {
            name: "gru".into(),
            kind: "gru".into(),
            n_total: 1,
        }];
        let mut bad = result("gru", 0, 0.5, &["A", "B"], 1);
        bad.confusion.pop();
        assert!(summarize("s", &grid, &[bad], true).is_err());
    }
}

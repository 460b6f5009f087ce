//! Conversions between `rotsweep-shared` summaries and their wire form.

use rotsweep_proto as pb;
use rotsweep_shared::summary::{ModelSummary, RotationSummary, Summary};

fn opt(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// A summary as sent on the wire (NaN stands for "no value").
pub fn summary_to_pb(s: &Summary) -> pb::SweepSummaryResponse {
    pb::SweepSummaryResponse {
        sweep: s.sweep.clone(),
        labels: s.labels.clone(),
        complete: s.complete,
        models: s
            .models
            .iter()
            .map(|m| pb::ModelSummary {
                name: m.name.clone(),
                kind: m.kind.clone(),
                rotations: m
                    .rotations
                    .iter()
                    .map(|r| pb::RotationResult {
                        rotation: r.rotation as u32,
                        test_accuracy: r.test_accuracy,
                        epochs: r.epochs,
                        best_epoch: r.best_epoch,
                        seconds_per_epoch: r.seconds_per_epoch,
                    })
                    .collect(),
                mean: m.mean.unwrap_or(f64::NAN),
                std: m.std.unwrap_or(f64::NAN),
                min: m.min.unwrap_or(f64::NAN),
                max: m.max.unwrap_or(f64::NAN),
                n_used: m.n_used as u32,
                n_total: m.n_total as u32,
                confusion: m.confusion.iter().flatten().copied().collect(),
            })
            .collect(),
    }
}

/// A summary received from the wire. Fails on a confusion matrix whose
/// size does not match the label count.
pub fn summary_from_pb(s: pb::SweepSummaryResponse) -> anyhow::Result<Summary> {
    let n = s.labels.len();
    let mut models = Vec::new();
    for m in s.models {
        if m.confusion.len() != n * n {
            anyhow::bail!(
                "model {}: confusion has {} cells for {n} labels",
                m.name,
                m.confusion.len()
            );
        }
        let confusion = if n == 0 {
            Vec::new()
        } else {
            m.confusion.chunks(n).map(<[u64]>::to_vec).collect()
        };
        models.push(ModelSummary {
            name: m.name,
            kind: m.kind,
            rotations: m
                .rotations
                .into_iter()
                .map(|r| RotationSummary {
                    rotation: r.rotation as usize,
                    test_accuracy: r.test_accuracy,
                    epochs: r.epochs,
                    best_epoch: r.best_epoch,
                    seconds_per_epoch: r.seconds_per_epoch,
                })
                .collect(),
            mean: opt(m.mean),
            std: opt(m.std),
            min: opt(m.min),
            max: opt(m.max),
            n_used: m.n_used as usize,
            n_total: m.n_total as usize,
            confusion,
        });
    }
    Ok(Summary {
        sweep: s.sweep,
        labels: s.labels,
        models,
        complete: s.complete,
    })
}

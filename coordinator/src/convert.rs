//! Conversions between `rotsweep-shared` and store types (summaries,
//! results, layer tables) and their wire form.

use rotsweep_proto as pb;
use rotsweep_shared::architecture::LayerInfo;
use rotsweep_shared::summary::{ModelSummary, RotationSummary, Summary};

use crate::store::{Completion, ResultRow};

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

/// A layer table in its wire form.
pub fn layers_to_pb(layers: &[LayerInfo]) -> Vec<pb::LayerInfo> {
    layers
        .iter()
        .map(|l| pb::LayerInfo {
            name: l.name.clone(),
            kind: l.kind.clone(),
            output_shape: l.output_shape.iter().map(|&d| d as u64).collect(),
            n_params: l.n_params as u64,
        })
        .collect()
}

/// A layer table received from the wire.
pub fn layers_from_pb(layers: &[pb::LayerInfo]) -> Vec<LayerInfo> {
    layers
        .iter()
        .map(|l| LayerInfo {
            name: l.name.clone(),
            kind: l.kind.clone(),
            output_shape: l.output_shape.iter().map(|&d| d as usize).collect(),
            n_params: l.n_params as usize,
        })
        .collect()
}

/// A stored result in its wire form (row-major confusion, NaN for none).
pub fn result_to_pb(r: &ResultRow) -> pb::JobResult {
    let c = &r.completion;
    pb::JobResult {
        job_id: r.job_id,
        model: r.model.clone(),
        kind: r.kind.clone(),
        rotation: r.rotation,
        attempt: r.attempt,
        test_accuracy: c.test_accuracy,
        test_loss: c.test_loss,
        labels: c.labels.clone(),
        confusion: c.confusion.iter().flatten().copied().collect(),
        epochs_trained: c.epochs_trained,
        best_epoch: c.best_epoch,
        n_test: c.n_test,
        layers: layers_to_pb(&c.layers),
    }
}

/// A result received from the wire. A NaN accuracy marks an INVALID job.
/// Fails on a confusion matrix whose size does not match the label count.
pub fn result_from_pb(r: pb::JobResult) -> anyhow::Result<ResultRow> {
    let n = r.labels.len();
    if r.confusion.len() != n * n {
        anyhow::bail!(
            "job {}: confusion has {} cells for {n} labels",
            r.job_id,
            r.confusion.len()
        );
    }
    let confusion = if n == 0 {
        Vec::new()
    } else {
        r.confusion.chunks(n).map(<[u64]>::to_vec).collect()
    };
    let state = if r.test_accuracy.is_finite() {
        crate::store::state::COMPLETED
    } else {
        crate::store::state::INVALID
    };
    Ok(ResultRow {
        job_id: r.job_id,
        model: r.model,
        kind: r.kind,
        rotation: r.rotation,
        attempt: r.attempt,
        state: state.to_string(),
        completion: Completion {
            test_accuracy: r.test_accuracy,
            test_loss: r.test_loss,
            labels: r.labels,
            confusion,
            epochs_trained: r.epochs_trained,
            best_epoch: r.best_epoch,
            n_test: r.n_test,
            layers: layers_from_pb(&r.layers),
        },
    })
}

//! The report's machine-readable exports: `epochs.csv`, `results.csv` and
//! one TensorBoard event file per job.
//!
//! CSV cells hold plain numbers (empty for a missing value), so pandas, R
//! and spreadsheets read them without options. Rows are exactly the stored
//! ones: `epochs.csv` has the visible epoch rows (one per job and epoch,
//! with the attempt that produced it), `results.csv` one row per stored
//! result.

use std::path::{Path, PathBuf};

use rotsweep_shared::architecture::total_params;
use rotsweep_shared::stats::{balanced_accuracy, macro_f1};

use super::{file_stem, io_error, tfevents, ReportData, ReportError};

fn cell(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        String::new()
    }
}

fn opt_cell(x: Option<f64>) -> String {
    x.map_or(String::new(), cell)
}

fn csv_error(path: &Path) -> impl Fn(csv::Error) -> ReportError + '_ {
    move |source| ReportError::Csv {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `epochs.csv`: one row per job, attempt and epoch.
pub fn write_epochs_csv(path: &Path, data: &ReportData) -> Result<PathBuf, ReportError> {
    let err = csv_error(path);
    let mut w = csv::Writer::from_path(path).map_err(&err)?;
    w.write_record([
        "job_id",
        "model",
        "kind",
        "rotation",
        "attempt",
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "seconds",
        "examples_per_second",
    ])
    .map_err(&err)?;
    for row in &data.epochs {
        let kind = data
            .jobs
            .iter()
            .find(|j| j.job_id == row.job_id)
            .map_or("", |j| j.kind.as_str());
        let m = &row.metrics;
        w.write_record([
            row.job_id.to_string(),
            row.model.clone(),
            kind.to_string(),
            row.rotation.to_string(),
            row.attempt.to_string(),
            m.epoch.to_string(),
            cell(m.train_loss),
            cell(m.train_accuracy),
            cell(m.val_loss),
            cell(m.val_accuracy),
            cell(m.seconds),
            cell(m.examples_per_second),
        ])
        .map_err(&err)?;
    }
    w.flush().map_err(io_error(path))?;
    Ok(path.to_path_buf())
}

/// Writes `results.csv`: one row per stored result.
pub fn write_results_csv(path: &Path, data: &ReportData) -> Result<PathBuf, ReportError> {
    let err = csv_error(path);
    let mut w = csv::Writer::from_path(path).map_err(&err)?;
    w.write_record([
        "job_id",
        "model",
        "kind",
        "rotation",
        "state",
        "attempt",
        "test_accuracy",
        "test_loss",
        "balanced_accuracy",
        "macro_f1",
        "epochs_trained",
        "best_epoch",
        "n_test",
        "n_params",
    ])
    .map_err(&err)?;
    for r in &data.results {
        let c = &r.completion;
        let n_params = total_params(&c.layers);
        w.write_record([
            r.job_id.to_string(),
            r.model.clone(),
            r.kind.clone(),
            r.rotation.to_string(),
            r.state.clone(),
            r.attempt.to_string(),
            cell(c.test_accuracy),
            cell(c.test_loss),
            opt_cell(balanced_accuracy(&c.confusion)),
            opt_cell(macro_f1(&c.confusion)),
            c.epochs_trained.to_string(),
            c.best_epoch.to_string(),
            c.n_test.to_string(),
            if n_params > 0 {
                n_params.to_string()
            } else {
                String::new()
            },
        ])
        .map_err(&err)?;
    }
    w.flush().map_err(io_error(path))?;
    Ok(path.to_path_buf())
}

/// Writes one event file per job with epoch rows under
/// `dir/MODEL/rotR/`, replacing event files an earlier report wrote there.
/// Wall times are synthetic: the time of writing, then each epoch's
/// measured seconds added up, so TensorBoard's "relative" axis shows
/// training time.
pub fn write_tensorboard(dir: &Path, data: &ReportData) -> Result<Vec<PathBuf>, ReportError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64().floor());
    let mut files = Vec::new();
    for job in &data.jobs {
        let rows: Vec<_> = data
            .epochs
            .iter()
            .filter(|e| e.job_id == job.job_id)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let run = dir
            .join(file_stem(&job.model))
            .join(format!("rot{}", job.rotation));
        std::fs::create_dir_all(&run).map_err(io_error(&run))?;
        for old in std::fs::read_dir(&run).map_err(io_error(&run))?.flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name.starts_with("events.out.tfevents.") && name.contains(".rotsweep") {
                let p = old.path();
                std::fs::remove_file(&p).map_err(io_error(&p))?;
            }
        }

        let mut wall = now;
        let steps: Vec<tfevents::Step> = rows
            .iter()
            .map(|r| {
                let m = &r.metrics;
                if m.seconds.is_finite() {
                    wall += m.seconds;
                }
                let values = [
                    ("accuracy/train", m.train_accuracy),
                    ("accuracy/validation", m.val_accuracy),
                    ("loss/train", m.train_loss),
                    ("loss/validation", m.val_loss),
                    ("time/seconds_per_epoch", m.seconds),
                    ("time/examples_per_second", m.examples_per_second),
                ]
                .into_iter()
                .filter(|(_, v)| v.is_finite())
                .map(|(t, v)| (t.to_string(), v as f32))
                .collect();
                tfevents::Step {
                    step: i64::from(m.epoch),
                    wall_time: wall,
                    values,
                }
            })
            .collect();
        let path = run.join(format!(
            "events.out.tfevents.{}.rotsweep.job{}",
            now as u64, job.job_id
        ));
        tfevents::write_event_file(&path, now, &steps)?;
        files.push(path);
    }
    Ok(files)
}

//! `rotsweep report`: the page a researcher publishes, and the exports
//! behind it.
//!
//! [`ReportData`] is everything stored about one sweep (spec, jobs, visible
//! epoch rows, results with confusion matrices and layer tables), read from a
//! state directory ([`ReportData::from_store`], read-only) or from a running
//! coordinator ([`ReportData::fetch`]). [`analyse`] turns it into
//! [`Analysis`]: the statistics of `rotsweep_shared::stats` per model, the
//! paired comparisons and the summed contingency tables. [`write_report`]
//! writes into one folder:
//!
//! - `index.html`: self-contained (inline CSS and SVG, no scripts, nothing
//!   fetched), with the figures of [`figures`] and [`diagrams`], the
//!   statistics and comparison tables and the spec;
//! - `figures/*.svg`: the same figures as files;
//! - `epochs.csv` (one row per job, attempt and epoch), `results.csv` (one
//!   row per stored result), `summary.json` (the [`Analysis`]);
//! - `tensorboard/MODEL/rotR/events.out.tfevents.*`: per-job scalar curves
//!   ([`tfevents`]).
//!
//! A partial sweep is reported as far as it got; the page says which jobs
//! are missing and in what state they are.

pub mod diagrams;
pub mod export;
pub mod figures;
pub mod html;
pub mod tfevents;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rotsweep_proto as pb;
use rotsweep_shared::architecture::{total_params, LayerInfo};
use rotsweep_shared::spec::SweepSpec;
use rotsweep_shared::stats::{self, Comparison, EpochChoice, EpochPoint, Metric, ModelStats};
use serde::Serialize;

use crate::store::{self, EpochMetrics, EpochRow, ResultRow, Store, StoreError};

/// Errors of report generation.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file or folder could not be written or read.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CSV export failed.
    #[error("cannot write {}: {source}", path.display())]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// Why.
        source: csv::Error,
    },
    /// Drawing a figure failed.
    #[error("cannot draw figure {figure}: {message}")]
    Plot {
        /// Figure id.
        figure: String,
        /// The plotting library's message.
        message: String,
    },
    /// The stored data or the options do not fit together.
    #[error("{0}")]
    Data(String),
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job of the grid, whatever its state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobInfo {
    /// Job id.
    pub job_id: i64,
    /// Model name.
    pub model: String,
    /// Model kind.
    pub kind: String,
    /// Rotation.
    pub rotation: u32,
    /// PENDING, RUNNING, COMPLETED, INVALID, FAILED or CANCELLED.
    pub state: String,
    /// Attempts so far.
    pub attempt: u32,
    /// Worker of the current or last attempt.
    pub worker_id: String,
    /// Last epoch stored.
    pub epoch: u32,
    /// Last failure reason.
    pub last_error: String,
}

/// Everything stored about one sweep.
#[derive(Debug, Clone)]
pub struct ReportData {
    /// Sweep name.
    pub sweep: String,
    /// The stored spec as JSON.
    pub spec_json: String,
    /// Every job of the grid.
    pub jobs: Vec<JobInfo>,
    /// Visible epoch rows (one per job and epoch), by job then epoch.
    pub epochs: Vec<EpochRow>,
    /// Stored results (COMPLETED and INVALID jobs).
    pub results: Vec<ResultRow>,
}

impl ReportData {
    /// Reads a sweep from a store (usually opened with
    /// [`Store::open_read_only`]).
    pub fn from_store(store: &Store, sweep: &str) -> Result<Self, StoreError> {
        let jobs = store
            .jobs(sweep, store::now_ms())?
            .into_iter()
            .map(|j| JobInfo {
                job_id: j.job_id,
                model: j.model,
                kind: j.kind,
                rotation: j.rotation,
                state: j.state,
                attempt: j.attempt,
                worker_id: j.worker_id,
                epoch: j.epoch,
                last_error: j.last_error,
            })
            .collect();
        Ok(Self {
            sweep: sweep.to_string(),
            spec_json: store.spec_json(sweep)?,
            jobs,
            epochs: store.epochs(sweep)?,
            results: store.results(sweep)?,
        })
    }

    /// Reads a sweep from a running coordinator.
    pub async fn fetch(client: &mut pb::Client, sweep: &str) -> anyhow::Result<Self> {
        use crate::client::{list_epochs, list_results, sweep_status};
        let status = sweep_status(client, sweep).await?;
        let epochs = list_epochs(client, sweep).await?;
        let results = list_results(client, sweep).await?;
        Ok(Self {
            sweep: sweep.to_string(),
            spec_json: results.spec_json,
            jobs: status
                .jobs
                .into_iter()
                .map(|j| JobInfo {
                    job_id: j.job_id,
                    model: j.model,
                    kind: j.kind,
                    rotation: j.rotation,
                    state: j.state,
                    attempt: j.attempt,
                    worker_id: j.worker_id,
                    epoch: j.epoch,
                    last_error: j.last_error,
                })
                .collect(),
            epochs: epochs
                .rows
                .into_iter()
                .map(|r| {
                    let m = r.metrics.unwrap_or_default();
                    EpochRow {
                        job_id: r.job_id,
                        model: r.model,
                        rotation: r.rotation,
                        attempt: r.attempt,
                        metrics: EpochMetrics {
                            epoch: m.epoch,
                            train_loss: m.train_loss,
                            train_accuracy: m.train_accuracy,
                            val_loss: m.val_loss,
                            val_accuracy: m.val_accuracy,
                            seconds: m.seconds,
                            examples_per_second: m.examples_per_second,
                        },
                    }
                })
                .collect(),
            results: results
                .results
                .into_iter()
                .map(crate::convert::result_from_pb)
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// Choices of a report, resolved from the command line.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Output folder (created if needed).
    pub out_dir: PathBuf,
    /// The two models whose validation curves are drawn together; `None`
    /// picks `gru` and `mha` when both exist, else the first two models.
    pub pair: Option<(String, String)>,
    /// Which epoch stands for a job's training and validation metrics.
    pub epoch_choice: EpochChoice,
    /// The metric models are compared on.
    pub metric: Metric,
}

/// A model's architecture as reported by its workers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Architecture {
    /// Model name.
    pub model: String,
    /// Model kind.
    pub kind: String,
    /// The rotation whose layer table is shown (the lowest one stored).
    pub rotation: u32,
    /// The layer table.
    pub layers: Vec<LayerInfo>,
    /// Total trainable parameters.
    pub n_params: usize,
    /// Smallest and largest parameter count over the rotations (they differ
    /// when rotations see different vocabularies, classes or lengths).
    pub n_params_range: (usize, usize),
}

/// A job of the grid without a usable result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MissingJob {
    /// Model name.
    pub model: String,
    /// Rotation.
    pub rotation: u32,
    /// Its state now.
    pub state: String,
    /// Attempts so far.
    pub attempt: u32,
    /// Last epoch stored.
    pub epoch: u32,
    /// Last failure reason, if any.
    pub last_error: String,
}

/// A model's epoch curves: one run per rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Curves {
    /// Model name.
    pub model: String,
    /// (rotation, visible epoch rows by epoch).
    pub runs: Vec<(u32, Vec<EpochPoint>)>,
}

/// The numbers behind the page; also written as `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// Sweep name.
    pub sweep: String,
    /// True when every job reached a final state.
    pub complete: bool,
    /// Rotations of the grid.
    pub grid_rotations: Vec<usize>,
    /// Which epoch stands for a job's training and validation metrics.
    pub epoch_choice: EpochChoice,
    /// The metric of the comparisons.
    pub metric: Metric,
    /// Per-model statistics, in spec order.
    pub models: Vec<ModelStats>,
    /// Every pair of models on `metric`.
    pub comparisons: Vec<Comparison>,
    /// The two models of the validation figure, when there are two.
    pub pair: Option<(String, String)>,
    /// Union of the labels of all results, sorted: the order of `confusion`.
    pub labels: Vec<String>,
    /// Per model, the test confusion matrix summed over its used rotations
    /// (rows = true label).
    pub confusion: BTreeMap<String, Vec<Vec<u64>>>,
    /// Per model, the layer table (models with no stored table are absent).
    pub architectures: Vec<Architecture>,
    /// Jobs without a usable result.
    pub missing: Vec<MissingJob>,
    /// Per model, the epoch curves (not serialised: `epochs.csv` has them).
    #[serde(skip)]
    pub curves: Vec<Curves>,
}

fn point(m: &EpochMetrics) -> EpochPoint {
    EpochPoint {
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        val_loss: m.val_loss,
        val_accuracy: m.val_accuracy,
        seconds: m.seconds,
        examples_per_second: m.examples_per_second,
    }
}

/// Computes the statistics, comparisons and summed tables of a sweep.
pub fn analyse(data: &ReportData, opts: &ReportOptions) -> Result<Analysis, ReportError> {
    let spec = SweepSpec::from_json(&data.spec_json).ok();

    // Models in spec order (then any the jobs name that the spec does not).
    let mut models: Vec<(String, String)> = spec
        .as_ref()
        .map(|s| {
            s.models
                .iter()
                .map(|(name, m)| (name.clone(), m.kind.as_str().to_string()))
                .collect()
        })
        .unwrap_or_default();
    for j in &data.jobs {
        if !models.iter().any(|(n, _)| *n == j.model) {
            models.push((j.model.clone(), j.kind.clone()));
        }
    }
    let mut grid_rotations: Vec<usize> = match &spec {
        Some(s) => s.rotations(),
        None => data.jobs.iter().map(|j| j.rotation as usize).collect(),
    };
    grid_rotations.sort_unstable();
    grid_rotations.dedup();

    let mut labels: Vec<String> = data
        .results
        .iter()
        .flat_map(|r| r.completion.labels.iter().cloned())
        .collect();
    labels.sort();
    labels.dedup();
    let label_idx: BTreeMap<&str, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();

    let mut model_stats = Vec::new();
    let mut confusion = BTreeMap::new();
    let mut architectures = Vec::new();
    let mut curves = Vec::new();
    for (name, kind) in &models {
        let mut records = Vec::new();
        let mut runs = Vec::new();
        let mut summed = vec![vec![0u64; labels.len()]; labels.len()];
        for job in data.jobs.iter().filter(|j| j.model == *name) {
            let epochs: Vec<EpochPoint> = data
                .epochs
                .iter()
                .filter(|e| e.job_id == job.job_id)
                .map(|e| point(&e.metrics))
                .collect();
            if !epochs.is_empty() {
                runs.push((job.rotation, epochs.clone()));
            }
            let result = data
                .results
                .iter()
                .find(|r| r.job_id == job.job_id && r.state == store::state::COMPLETED);
            let mut record = stats::JobRecord {
                rotation: job.rotation as usize,
                epochs,
                ..Default::default()
            };
            if let Some(r) = result {
                let c = &r.completion;
                let n = c.labels.len();
                if c.confusion.len() != n || c.confusion.iter().any(|row| row.len() != n) {
                    return Err(ReportError::Data(format!(
                        "job {}: the stored confusion matrix is not {n}x{n}",
                        r.job_id
                    )));
                }
                if c.test_accuracy.is_finite() {
                    for (i, row) in c.confusion.iter().enumerate() {
                        for (k, &count) in row.iter().enumerate() {
                            summed[label_idx[c.labels[i].as_str()]]
                                [label_idx[c.labels[k].as_str()]] += count;
                        }
                    }
                }
                record.test_accuracy = Some(c.test_accuracy);
                record.confusion = c.confusion.clone();
                record.epochs_trained = c.epochs_trained;
                record.best_epoch = c.best_epoch;
            }
            records.push(record);
        }
        runs.sort_by_key(|(r, _)| *r);
        curves.push(Curves {
            model: name.clone(),
            runs,
        });
        model_stats.push(stats::model_stats(
            name,
            kind,
            &grid_rotations,
            &records,
            opts.epoch_choice,
        ));
        confusion.insert(name.clone(), summed);

        let mut tables: Vec<&ResultRow> = data
            .results
            .iter()
            .filter(|r| r.model == *name && !r.completion.layers.is_empty())
            .collect();
        tables.sort_by_key(|r| r.rotation);
        if let Some(first) = tables.first() {
            let counts: Vec<usize> = tables
                .iter()
                .map(|r| total_params(&r.completion.layers))
                .collect();
            architectures.push(Architecture {
                model: name.clone(),
                kind: kind.clone(),
                rotation: first.rotation,
                layers: first.completion.layers.clone(),
                n_params: counts[0],
                n_params_range: (
                    counts.iter().copied().min().unwrap_or(0),
                    counts.iter().copied().max().unwrap_or(0),
                ),
            });
        }
    }

    let pair = choose_pair(&models, opts.pair.as_ref())?;
    let missing = data
        .jobs
        .iter()
        .filter(|j| j.state != store::state::COMPLETED)
        .map(|j| MissingJob {
            model: j.model.clone(),
            rotation: j.rotation,
            state: j.state.clone(),
            attempt: j.attempt,
            epoch: j.epoch,
            last_error: j.last_error.clone(),
        })
        .collect();
    Ok(Analysis {
        sweep: data.sweep.clone(),
        complete: data.jobs.iter().all(|j| store::state::is_final(&j.state)),
        grid_rotations,
        epoch_choice: opts.epoch_choice,
        metric: opts.metric,
        comparisons: stats::compare_all(&model_stats, opts.metric),
        models: model_stats,
        pair,
        labels,
        confusion,
        architectures,
        missing,
        curves,
    })
}

/// The two models of the validation figure.
fn choose_pair(
    models: &[(String, String)],
    asked: Option<&(String, String)>,
) -> Result<Option<(String, String)>, ReportError> {
    let has = |name: &str| models.iter().any(|(n, _)| n == name);
    if let Some((a, b)) = asked {
        for name in [a, b] {
            if !has(name) {
                let names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
                return Err(ReportError::Data(format!(
                    "--compare names model `{name}`, which is not in the sweep (models: {})",
                    names.join(", ")
                )));
            }
        }
        return Ok(Some((a.clone(), b.clone())));
    }
    if has("gru") && has("mha") {
        return Ok(Some(("gru".into(), "mha".into())));
    }
    Ok(match models {
        [a, b, ..] => Some((a.0.clone(), b.0.clone())),
        _ => None,
    })
}

/// One figure of the page.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Element id in the page and file stem under `figures/`.
    pub id: String,
    /// Heading.
    pub title: String,
    /// What the reader sees and how to read it.
    pub caption: String,
    /// The SVG document (no XML declaration, so it can be inlined).
    pub svg: String,
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone)]
pub struct ReportOutcome {
    /// `index.html`.
    pub index: PathBuf,
    /// Figure ids, in page order.
    pub figures: Vec<String>,
    /// Every file written.
    pub files: Vec<PathBuf>,
    /// The analysis behind the page.
    pub analysis: Analysis,
}

/// A file name made of safe characters only.
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Draws every figure of the page from an analysis.
pub fn make_figures(analysis: &Analysis) -> Result<Vec<Figure>, ReportError> {
    let mut out = Vec::new();
    for a in &analysis.architectures {
        out.push(Figure {
            id: format!("architecture-{}", file_stem(&a.model)),
            title: format!("Architecture: {}", a.model),
            caption: format!(
                "Layers of `{}` ({}) as built by the worker for rotation {}: output shape \
                 per example (None = batch) and trainable parameters per layer.",
                a.model, a.kind, a.rotation
            ),
            svg: diagrams::architecture(a),
        });
    }
    for c in &analysis.curves {
        if c.runs.is_empty() {
            continue;
        }
        out.push(Figure {
            id: format!("curves-{}", file_stem(&c.model)),
            title: format!("Training and validation: {}", c.model),
            caption: format!(
                "Accuracy (left) and cross-entropy loss (right) per epoch of `{}`, one colour \
                 per rotation; solid lines are training, dashed lines validation.",
                c.model
            ),
            svg: figures::curves(c)?,
        });
    }
    if let Some((a, b)) = &analysis.pair {
        let find = |name: &str| analysis.curves.iter().find(|c| c.model == name);
        if let (Some(ca), Some(cb)) = (find(a), find(b)) {
            if !ca.runs.is_empty() || !cb.runs.is_empty() {
                out.push(Figure {
                    id: "validation-pair".into(),
                    title: format!("Validation accuracy: {a} vs {b}"),
                    caption: format!(
                        "Validation accuracy per epoch of every rotation (thin lines) and the \
                         mean over the rotations that reached each epoch (thick), `{a}` against \
                         `{b}` (choose the pair with --compare A,B)."
                    ),
                    svg: figures::validation_pair(ca, cb)?,
                });
            }
        }
    }
    if analysis.models.iter().any(|m| m.n_used > 0) {
        out.push(Figure {
            id: "test-accuracy".into(),
            title: "Test accuracy by rotation".into(),
            caption: "Left: test accuracy of every model on each rotation's test fold, with the \
                      mean (dashed) and ± one sample standard deviation (band). Right: each \
                      model's rotations (dots) and the mean with its 95% t confidence interval."
                .into(),
            svg: figures::test_accuracy(&analysis.models, &analysis.grid_rotations)?,
        });
    }
    for m in &analysis.models {
        let Some(table) = analysis.confusion.get(&m.name) else {
            continue;
        };
        if m.n_used == 0 || table.is_empty() {
            continue;
        }
        out.push(Figure {
            id: format!("contingency-{}", file_stem(&m.name)),
            title: format!("Contingency table: {}", m.name),
            caption: format!(
                "Test predictions of `{}` summed over {} rotation(s): rows are the true family, \
                 columns the predicted one; the number is the count of sequences, the colour \
                 the share of the true family's sequences (row-normalised).",
                m.name, m.n_used
            ),
            svg: diagrams::heatmap(&m.name, &analysis.labels, table),
        });
    }
    Ok(out)
}

/// Writes the page, the figures and every export into `opts.out_dir`.
pub fn write_report(data: &ReportData, opts: &ReportOptions) -> Result<ReportOutcome, ReportError> {
    let analysis = analyse(data, opts)?;
    let out = &opts.out_dir;
    let fig_dir = out.join("figures");
    std::fs::create_dir_all(&fig_dir).map_err(io_error(&fig_dir))?;
    let mut files = Vec::new();

    let figures = make_figures(&analysis)?;
    for f in &figures {
        let path = fig_dir.join(format!("{}.svg", f.id));
        std::fs::write(&path, &f.svg).map_err(io_error(&path))?;
        files.push(path);
    }

    files.push(export::write_epochs_csv(&out.join("epochs.csv"), data)?);
    files.push(export::write_results_csv(&out.join("results.csv"), data)?);
    let summary = out.join("summary.json");
    let text = serde_json::to_string_pretty(&analysis)
        .map_err(|e| ReportError::Data(format!("cannot serialise the summary: {e}")))?;
    std::fs::write(&summary, text + "\n").map_err(io_error(&summary))?;
    files.push(summary);
    files.extend(export::write_tensorboard(&out.join("tensorboard"), data)?);

    let index = out.join("index.html");
    let page = html::page(data, &analysis, &figures);
    std::fs::write(&index, page).map_err(io_error(&index))?;
    files.push(index.clone());

    Ok(ReportOutcome {
        index,
        figures: figures.into_iter().map(|f| f.id).collect(),
        files,
        analysis,
    })
}

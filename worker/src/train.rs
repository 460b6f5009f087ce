//! The trainer: one job = one model on one rotation, from initialisation (or
//! a checkpoint) to the test-set confusion matrix.
//!
//! Per epoch it draws `steps_per_epoch` batches (or one full pass) from the
//! training split in an order shuffled by the job's seed, minimises sparse
//! categorical cross-entropy plus the L2 penalty with Adam, evaluates the
//! validation split, reports an [`EpochReport`] to the hooks and applies
//! early stopping. At the end the best epoch's weights are restored and the
//! test split is evaluated.
//!
//! # Determinism
//!
//! Initial weights, the shuffling stream and the dropout masks all derive
//! from [`TrainConfig::seed`], so two runs of the same job on the same
//! device and thread count produce the same numbers.
//!
//! # Checkpoint contract
//!
//! When [`TrainConfig::checkpoint_dir`] is set, the trainer owns that folder:
//!
//! - When `checkpoint_every` is positive it writes a checkpoint every that
//!   many epochs and at the epoch that ends training (early stop or last
//!   epoch); whatever the setting, it writes one whenever the hooks ask it
//!   to stop (between two steps or after an epoch). A checkpoint is
//!   `weights-N.safetensors` (the `VarMap`), `adam-N.safetensors` (moments
//!   and step count), `best-N.safetensors` (the best epoch's weights, once
//!   there is one) and `checkpoint.json`: epochs done, the progress of a
//!   partly run epoch, the shuffling order, cursor and generator state, the
//!   dropout generator state, the early-stopping state and every epoch
//!   report so far. Each file is written to a temporary name and renamed;
//!   `checkpoint.json` is renamed last and is the commit point, after which
//!   the files of older generations are deleted.
//! - On start, if `checkpoint.json` exists, the job resumes from it: epoch
//!   numbers continue unbroken, the reports so far are handed to
//!   [`TrainHooks::on_resume`] and included in the outcome, and an epoch
//!   that was interrupted part-way continues at the step where it stopped,
//!   so the result equals an uninterrupted run. A checkpoint of a finished
//!   job goes straight to the test evaluation.
//! - A checkpoint from another job (different model settings, class count,
//!   labels, vocabulary, sequence length, training-set size or seed) is
//!   refused with [`Error::Checkpoint`] rather than silently mixed in.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use rotsweep_shared::data::{Encoded, RotationData};
use rotsweep_shared::rng::{mix_seed, SplitMix64};
use rotsweep_shared::spec::{ModelSpec, Monitor, TrainSpec};
use serde::{Deserialize, Serialize};

use crate::adam::{Adam, AdamConfig};
use crate::model::{restore, seeded_var_builder, snapshot, Model};
use crate::{Error, Result};

/// Seed parts that separate the job's random streams.
const STREAM_INIT: u64 = 1;
const STREAM_SHUFFLE: u64 = 2;
const STREAM_DROPOUT: u64 = 3;

/// Version of the checkpoint layout.
const CHECKPOINT_FORMAT: u32 = 1;
const CHECKPOINT_FILE: &str = "checkpoint.json";

/// The seed of one job: the sweep's `train.seed` mixed with the rotation,
/// so rotations differ but every attempt of a job starts the same.
pub fn job_seed(train_seed: u64, rotation: usize) -> u64 {
    mix_seed(&[train_seed, rotation as u64])
}

/// Everything one training job needs besides the data.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Architecture and sizes.
    pub model: ModelSpec,
    /// Epochs, batches, optimiser, early stopping.
    pub train: TrainSpec,
    /// The job's seed (already mixed with the rotation by the caller);
    /// initialisation, shuffling and dropout derive from it.
    pub seed: u64,
    /// Where to train.
    pub device: Device,
    /// Folder for checkpoints; `None` disables them (see the module docs).
    pub checkpoint_dir: Option<PathBuf>,
}

/// Metrics of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// 1-based epoch number; continues across resumes.
    pub epoch: usize,
    /// Mean training loss per example (cross-entropy plus the L2 penalty,
    /// what is minimised), with the weights of each step before its update.
    pub train_loss: f64,
    /// Fraction of training examples classified right during the epoch
    /// (training mode, before each step's update).
    pub train_accuracy: f64,
    /// Mean validation cross-entropy per example (no penalty, no dropout).
    pub val_loss: f64,
    /// Fraction of validation examples classified right.
    pub val_accuracy: f64,
    /// Wall-clock seconds of the epoch, validation included.
    pub seconds: f64,
    /// Training examples per second of training-step time.
    pub examples_per_second: f64,
}

/// The result of a finished job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOutcome {
    /// Fraction of test examples classified right, with the best weights.
    pub test_accuracy: f64,
    /// Mean test cross-entropy per example.
    pub test_loss: f64,
    /// Counts with rows = true label and columns = predicted label, in the
    /// order of `labels`.
    pub confusion: Vec<Vec<u64>>,
    /// Test examples.
    pub n_test: usize,
    /// Epochs run in total (resumed ones included).
    pub epochs_trained: usize,
    /// The epoch whose weights were restored (1-based).
    pub best_epoch: usize,
    /// True when early stopping ended training before `epochs`.
    pub stopped_early: bool,
    /// Class names, index = class id.
    pub labels: Vec<String>,
    /// Every epoch's report, resumed ones included.
    pub reports: Vec<EpochReport>,
    /// The epoch a checkpoint resumed after, if any.
    pub resumed_after_epoch: Option<usize>,
    /// Trainable parameters of the model.
    pub n_params: usize,
    /// The model's layer table (shapes and parameter counts), as built.
    pub layers: Vec<crate::model::LayerInfo>,
}

/// Callbacks from the trainer to whoever runs the job (CLI or lease loop).
pub trait TrainHooks {
    /// Called after every epoch. `Break` stops training now: a checkpoint is
    /// written (when a folder is set) and the job returns
    /// [`Error::Interrupted`].
    fn on_epoch(&mut self, report: &EpochReport) -> ControlFlow<()> {
        let _ = report;
        ControlFlow::Continue(())
    }

    /// Polled before every training step; `true` (cancel, SIGTERM) stops
    /// like a `Break` from [`TrainHooks::on_epoch`], mid-epoch if need be.
    fn should_stop(&mut self) -> bool {
        false
    }

    /// Called once when a job resumes, with the reports of the epochs the
    /// checkpoint already holds (so they can be re-sent).
    fn on_resume(&mut self, reports: &[EpochReport]) {
        let _ = reports;
    }
}

/// Hooks that never stop and ignore every report.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl TrainHooks for NoHooks {}

/// Early-stopping bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EarlyStop {
    /// Best monitored value so far.
    best: Option<f64>,
    /// Epoch of `best` (0 = none yet).
    best_epoch: usize,
    /// Epochs since `best` improved.
    since_improvement: usize,
    /// Set when patience ran out.
    stopped: bool,
}

/// Progress of an epoch that has started but not finished.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PartialEpoch {
    steps_done: usize,
    loss_sum: f64,
    n_correct: u64,
    n_seen: u64,
    /// Seconds spent in training steps so far.
    train_seconds: f64,
}

/// What identifies the job a checkpoint belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct JobIdentity {
    model: ModelSpec,
    seed: u64,
    n_classes: usize,
    labels: Vec<String>,
    vocab_size: usize,
    max_len: usize,
    n_train: usize,
}

/// The resumable state of a job apart from the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Progress {
    epochs_done: usize,
    partial: Option<PartialEpoch>,
    /// Current permutation of training rows and the next position in it.
    order: Vec<u32>,
    cursor: usize,
    shuffle_state: u64,
    dropout_state: u64,
    early: EarlyStop,
    reports: Vec<EpochReport>,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    format: u32,
    generation: u64,
    job: JobIdentity,
    progress: Progress,
    has_best: bool,
}

/// The live state of a job.
struct Job<'a> {
    cfg: &'a TrainConfig,
    data: &'a RotationData,
    varmap: VarMap,
    model: Model,
    adam: Adam,
    identity: JobIdentity,
    progress: Progress,
    shuffle: SplitMix64,
    best_weights: Option<HashMap<String, Tensor>>,
    generation: u64,
}

/// Trains one job to the end and evaluates it on the test split.
///
/// Errors: [`Error::NonFiniteLoss`] when the loss diverges,
/// [`Error::Interrupted`] when the hooks stop it (after writing a
/// checkpoint), [`Error::Checkpoint`] when an existing checkpoint belongs to
/// another job, and tensor or I/O errors.
pub fn train_job(
    cfg: &TrainConfig,
    data: &RotationData,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainOutcome> {
    check_inputs(cfg, data)?;
    let span = tracing::info_span!(
        "train_job",
        kind = cfg.model.kind.as_str(),
        rotation = data.rotation.index
    );
    let _entered = span.enter();

    let mut job = Job::new(cfg, data)?;
    let resumed_after_epoch = match &cfg.checkpoint_dir {
        Some(dir) => job.resume(dir)?,
        None => None,
    };
    if let Some(epoch) = resumed_after_epoch {
        tracing::info!(epoch, "resuming from checkpoint");
        hooks.on_resume(&job.progress.reports);
    }
    tracing::info!(
        n_params = job.model.n_params(),
        n_train = data.train.n(),
        n_val = data.val.n(),
        "training"
    );

    while !job.progress.early.stopped && job.progress.epochs_done < cfg.train.epochs {
        let report = job.run_epoch(hooks)?;
        let is_last = job.progress.early.stopped || report.epoch == cfg.train.epochs;
        let every = cfg.train.checkpoint_every;
        if every > 0 && (report.epoch % every == 0 || is_last) {
            job.write_checkpoint()?;
        }
        if hooks.on_epoch(&report).is_break() {
            job.write_checkpoint()?;
            return Err(Error::Interrupted {
                epoch: report.epoch,
                steps_done: job.steps_per_epoch(),
            });
        }
    }

    job.finish(resumed_after_epoch)
}

fn check_inputs(cfg: &TrainConfig, data: &RotationData) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidData(m));
    if data.train.n() == 0 || data.val.n() == 0 || data.test.n() == 0 {
        return bad(format!(
            "empty split (train {}, validation {}, test {} rows)",
            data.train.n(),
            data.val.n(),
            data.test.n()
        ));
    }
    if data.labels.is_empty() {
        return bad("no labels".into());
    }
    if cfg.train.batch_size == 0 || cfg.train.steps_per_epoch == Some(0) {
        return bad("batch_size and steps_per_epoch must be positive".into());
    }
    for (name, split) in [
        ("train", &data.train),
        ("val", &data.val),
        ("test", &data.test),
    ] {
        if split.len != data.max_len || split.tokens.len() != split.n() * split.len {
            return bad(format!(
                "{name} split is not {} rows of max_len {}",
                split.n(),
                data.max_len
            ));
        }
        if split
            .labels
            .iter()
            .any(|&l| l as usize >= data.labels.len())
        {
            return bad(format!("{name} split has a class id out of range"));
        }
    }
    Ok(())
}

impl<'a> Job<'a> {
    /// A fresh job: seeded weights, zero moments, nothing trained.
    fn new(cfg: &'a TrainConfig, data: &'a RotationData) -> Result<Self> {
        let identity = JobIdentity {
            model: cfg.model.clone(),
            seed: cfg.seed,
            n_classes: data.labels.len(),
            labels: data.labels.labels.clone(),
            vocab_size: data.vocab.size(),
            max_len: data.max_len,
            n_train: data.train.n(),
        };

        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, mix_seed(&[cfg.seed, STREAM_INIT]), &cfg.device);
        let model = Model::new(
            &cfg.model,
            identity.vocab_size,
            identity.n_classes,
            identity.max_len,
            vb,
        )?;
        let adam = Adam::new(
            &varmap,
            AdamConfig {
                lr: cfg.train.learning_rate,
                ..AdamConfig::default()
            },
        )?;

        let n_train = data.train.n();
        let progress = Progress {
            epochs_done: 0,
            partial: None,
            order: (0..n_train as u32).collect(),
            // At the end: the first batch shuffles before it draws.
            cursor: n_train,
            shuffle_state: 0,
            dropout_state: mix_seed(&[cfg.seed, STREAM_DROPOUT]),
            early: EarlyStop {
                best: None,
                best_epoch: 0,
                since_improvement: 0,
                stopped: false,
            },
            reports: Vec::new(),
        };
        model.set_dropout_state(progress.dropout_state);

        Ok(Self {
            cfg,
            data,
            varmap,
            model,
            adam,
            identity,
            progress,
            shuffle: SplitMix64::new(mix_seed(&[cfg.seed, STREAM_SHUFFLE])),
            best_weights: None,
            generation: 0,
        })
    }

    fn steps_per_epoch(&self) -> usize {
        let bs = self.cfg.train.batch_size;
        self.cfg
            .train
            .steps_per_epoch
            .unwrap_or_else(|| self.data.train.n().div_ceil(bs))
    }

    /// Runs (or finishes) the next epoch and applies early stopping.
    fn run_epoch(&mut self, hooks: &mut dyn TrainHooks) -> Result<EpochReport> {
        let epoch = self.progress.epochs_done + 1;
        let full_pass = self.cfg.train.steps_per_epoch.is_none();
        let n_steps = self.steps_per_epoch();

        let mut partial = match self.progress.partial.take() {
            Some(p) => p,
            None => {
                if full_pass {
                    self.reshuffle();
                }
                PartialEpoch::default()
            }
        };

        let step_started = Instant::now();
        while partial.steps_done < n_steps {
            if hooks.should_stop() {
                partial.train_seconds += step_started.elapsed().as_secs_f64();
                let steps_done = partial.steps_done;
                self.progress.partial = Some(partial);
                self.write_checkpoint()?;
                return Err(Error::Interrupted { epoch, steps_done });
            }
            let rows = self.next_batch(full_pass);
            let (loss, n_correct) = self.train_step(&rows).map_err(|e| match e {
                Error::NonFiniteLoss { .. } => Error::NonFiniteLoss {
                    epoch,
                    step: partial.steps_done + 1,
                },
                other => other,
            })?;
            partial.steps_done += 1;
            partial.loss_sum += loss * rows.len() as f64;
            partial.n_correct += n_correct;
            partial.n_seen += rows.len() as u64;
            tracing::debug!(epoch, step = partial.steps_done, loss, "step");
        }
        partial.train_seconds += step_started.elapsed().as_secs_f64();
        let val_started = Instant::now();

        let val = evaluate(
            &self.model,
            &self.data.val,
            self.cfg.train.batch_size,
            &self.cfg.device,
        )?;
        let n_seen = partial.n_seen.max(1) as f64;
        let report = EpochReport {
            epoch,
            train_loss: partial.loss_sum / n_seen,
            train_accuracy: partial.n_correct as f64 / n_seen,
            val_loss: val.loss,
            val_accuracy: val.accuracy,
            seconds: partial.train_seconds + val_started.elapsed().as_secs_f64(),
            examples_per_second: partial.n_seen as f64 / partial.train_seconds.max(1e-9),
        };
        tracing::info!(
            epoch,
            train_loss = report.train_loss,
            train_accuracy = report.train_accuracy,
            val_loss = report.val_loss,
            val_accuracy = report.val_accuracy,
            seconds = report.seconds,
            "epoch finished"
        );

        self.update_early_stop(&report)?;
        self.progress.epochs_done = epoch;
        self.progress.reports.push(report.clone());
        Ok(report)
    }

    /// One optimiser step; returns the batch's loss and correct count.
    fn train_step(&mut self, rows: &[u32]) -> Result<(f64, u64)> {
        let (tokens, labels) = batch(&self.data.train, rows, &self.cfg.device)?;
        let logits = self.model.forward(&tokens, true)?;
        let mut loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        if self.cfg.model.l2 > 0.0 {
            loss = (loss + self.model.l2_penalty()?)?;
        }
        let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        if !value.is_finite() {
            // The caller fills in where it happened.
            return Err(Error::NonFiniteLoss { epoch: 0, step: 0 });
        }
        self.adam.backward_step(&loss)?;
        Ok((value, count_correct(&logits, &labels)?))
    }

    /// Training-set rows of the next batch. A full pass ends with a short
    /// batch; fixed-step epochs wrap around and reshuffle at the end of
    /// each pass, so their batches are always full.
    fn next_batch(&mut self, full_pass: bool) -> Vec<u32> {
        let n = self.progress.order.len();
        let bs = self.cfg.train.batch_size;
        let mut rows = Vec::with_capacity(bs);
        while rows.len() < bs {
            if self.progress.cursor >= n {
                if full_pass {
                    break;
                }
                self.reshuffle();
            }
            let take = (bs - rows.len()).min(n - self.progress.cursor);
            let start = self.progress.cursor;
            rows.extend_from_slice(&self.progress.order[start..start + take]);
            self.progress.cursor += take;
        }
        rows
    }

    fn reshuffle(&mut self) {
        self.shuffle.shuffle(&mut self.progress.order);
        self.progress.cursor = 0;
    }

    fn update_early_stop(&mut self, report: &EpochReport) -> Result<()> {
        let monitor = self.cfg.train.monitor;
        let value = match monitor {
            Monitor::ValAccuracy => report.val_accuracy,
            Monitor::ValLoss => report.val_loss,
        };
        let early = &mut self.progress.early;
        let improved = !value.is_nan()
            && early
                .best
                .is_none_or(|best| monitor.is_improvement(value, best));
        if improved {
            early.best = Some(value);
            early.best_epoch = report.epoch;
            early.since_improvement = 0;
            self.best_weights = Some(snapshot(&self.varmap)?);
        } else {
            early.since_improvement += 1;
            if early.since_improvement >= self.cfg.train.patience {
                early.stopped = true;
                tracing::info!(
                    epoch = report.epoch,
                    best_epoch = early.best_epoch,
                    monitor = monitor.as_str(),
                    "early stopping"
                );
            }
        }
        Ok(())
    }

    /// Restores the best weights and evaluates the test split.
    fn finish(self, resumed_after_epoch: Option<usize>) -> Result<TrainOutcome> {
        if let Some(best) = &self.best_weights {
            restore(&self.varmap, best)?;
        }
        let test = evaluate(
            &self.model,
            &self.data.test,
            self.cfg.train.batch_size,
            &self.cfg.device,
        )?;

        let n_classes = self.identity.n_classes;
        let mut confusion = vec![vec![0u64; n_classes]; n_classes];
        for (&truth, &predicted) in self.data.test.labels.iter().zip(&test.predictions) {
            confusion[truth as usize][predicted as usize] += 1;
        }
        tracing::info!(
            test_accuracy = test.accuracy,
            best_epoch = self.progress.early.best_epoch,
            "job finished"
        );

        Ok(TrainOutcome {
            test_accuracy: test.accuracy,
            test_loss: test.loss,
            confusion,
            n_test: self.data.test.n(),
            epochs_trained: self.progress.epochs_done,
            best_epoch: self.progress.early.best_epoch,
            stopped_early: self.progress.early.stopped,
            labels: self.identity.labels.clone(),
            reports: self.progress.reports.clone(),
            resumed_after_epoch,
            n_params: self.model.n_params(),
            layers: self.model.layers(),
        })
    }

    /// Writes a checkpoint of the current state (see the module docs).
    fn write_checkpoint(&mut self) -> Result<()> {
        let Some(dir) = &self.cfg.checkpoint_dir else {
            return Ok(());
        };
        create_dir(dir)?;
        let generation = self.generation + 1;

        let weights = dir.join(format!("weights-{generation}.safetensors"));
        write_atomic(&weights, |tmp| Ok(self.varmap.save(tmp)?))?;
        let adam = dir.join(format!("adam-{generation}.safetensors"));
        write_atomic(&adam, |tmp| self.adam.save(tmp))?;
        if let Some(best) = &self.best_weights {
            let path = dir.join(format!("best-{generation}.safetensors"));
            write_atomic(&path, |tmp| Ok(candle_core::safetensors::save(best, tmp)?))?;
        }

        let mut progress = self.progress.clone();
        progress.shuffle_state = self.shuffle.state;
        progress.dropout_state = self.model.dropout_state();
        let meta = CheckpointMeta {
            format: CHECKPOINT_FORMAT,
            generation,
            job: self.identity.clone(),
            progress,
            has_best: self.best_weights.is_some(),
        };
        let meta_path = dir.join(CHECKPOINT_FILE);
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Checkpoint {
            path: meta_path.clone(),
            message: format!("does not serialise: {e}"),
        })?;
        write_atomic(&meta_path, |tmp| {
            std::fs::write(tmp, &json).map_err(|source| Error::Io {
                path: tmp.to_path_buf(),
                source,
            })
        })?;

        self.generation = generation;
        remove_old_generations(dir, generation);
        tracing::debug!(
            epoch = self.progress.epochs_done,
            generation,
            path = %meta_path.display(),
            "checkpoint written"
        );
        Ok(())
    }

    /// Loads `dir/checkpoint.json` if there is one; returns the number of
    /// epochs it had completed.
    fn resume(&mut self, dir: &Path) -> Result<Option<usize>> {
        let meta_path = dir.join(CHECKPOINT_FILE);
        let text = match std::fs::read(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    path: meta_path,
                    source,
                })
            }
        };
        let refuse = |message: String| Error::Checkpoint {
            path: meta_path.clone(),
            message,
        };
        let meta: CheckpointMeta = serde_json::from_slice(&text)
            .map_err(|e| refuse(format!("unreadable checkpoint: {e}")))?;
        if meta.format != CHECKPOINT_FORMAT {
            return Err(refuse(format!(
                "format {} (this worker reads {CHECKPOINT_FORMAT})",
                meta.format
            )));
        }
        check_identity(&meta.job, &self.identity).map_err(refuse)?;
        if meta.progress.order.len() != self.identity.n_train
            || meta.progress.cursor > self.identity.n_train
        {
            return Err(refuse(
                "shuffling order does not fit the training set".into(),
            ));
        }

        let generation = meta.generation;
        let weights = dir.join(format!("weights-{generation}.safetensors"));
        let values = load_tensors(&weights, &self.cfg.device)?;
        restore(&self.varmap, &values).map_err(|e| refuse(e.to_string()))?;
        self.adam
            .load(&dir.join(format!("adam-{generation}.safetensors")))?;
        self.best_weights = if meta.has_best {
            let path = dir.join(format!("best-{generation}.safetensors"));
            Some(load_tensors(&path, &self.cfg.device)?)
        } else {
            None
        };

        self.shuffle = SplitMix64::new(meta.progress.shuffle_state);
        self.model.set_dropout_state(meta.progress.dropout_state);
        self.progress = meta.progress;
        self.generation = generation;
        Ok(Some(self.progress.epochs_done))
    }
}

/// True when `dir` holds a committed checkpoint.
pub fn has_checkpoint(dir: &Path) -> bool {
    dir.join(CHECKPOINT_FILE).is_file()
}

/// Copies the committed checkpoint of `src` into `dst` (created if need
/// be), so a new attempt can resume from it in a folder of its own. The
/// tensor files go first and `checkpoint.json` last, each atomically, so
/// `dst` holds the old checkpoint or the whole new one.
///
/// `src` may still be written by a process that lost its lease: when the
/// generation named in `checkpoint.json` disappears under the copy (the
/// writer committed a newer one), the copy starts over, up to three times.
/// Returns false when `src` holds no checkpoint.
pub fn copy_checkpoint(src: &Path, dst: &Path) -> Result<bool> {
    /// The part of `checkpoint.json` that names its files.
    #[derive(Deserialize)]
    struct Head {
        generation: u64,
        has_best: bool,
    }

    let meta_path = src.join(CHECKPOINT_FILE);
    let mut last_error = None;
    for _ in 0..3 {
        let text = match std::fs::read(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(Error::Io {
                    path: meta_path,
                    source,
                })
            }
        };
        let head: Head = serde_json::from_slice(&text).map_err(|e| Error::Checkpoint {
            path: meta_path.clone(),
            message: format!("unreadable checkpoint: {e}"),
        })?;
        create_dir(dst)?;

        let g = head.generation;
        let mut names = vec![
            format!("weights-{g}.safetensors"),
            format!("adam-{g}.safetensors"),
        ];
        if head.has_best {
            names.push(format!("best-{g}.safetensors"));
        }
        let copied = names.iter().try_for_each(|name| {
            write_atomic(&dst.join(name), |tmp| {
                std::fs::copy(src.join(name), tmp)
                    .map(drop)
                    .map_err(|source| Error::Io {
                        path: src.join(name),
                        source,
                    })
            })
        });
        match copied {
            Ok(()) => {
                write_atomic(&dst.join(CHECKPOINT_FILE), |tmp| {
                    std::fs::write(tmp, &text).map_err(|source| Error::Io {
                        path: tmp.to_path_buf(),
                        source,
                    })
                })?;
                remove_old_generations(dst, g);
                return Ok(true);
            }
            Err(Error::Io { path, source }) if source.kind() == std::io::ErrorKind::NotFound => {
                last_error = Some(Error::Io { path, source });
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error.expect("the loop ran and only a missing file repeats it"))
}

/// Explains the first difference between the checkpoint's job and this one.
fn check_identity(saved: &JobIdentity, current: &JobIdentity) -> Result<(), String> {
    if saved.n_classes != current.n_classes {
        return Err(format!(
            "it was trained with {} classes, the data has {}",
            saved.n_classes, current.n_classes
        ));
    }
    if saved.labels != current.labels {
        return Err("its class labels differ from the data's".into());
    }
    if saved.model != current.model {
        return Err("its model settings differ from this job's".into());
    }
    let numbers = [
        ("vocabulary size", saved.vocab_size, current.vocab_size),
        ("max_len", saved.max_len, current.max_len),
        ("training rows", saved.n_train, current.n_train),
    ];
    for (what, was, is) in numbers {
        if was != is {
            return Err(format!("its {what} is {was}, this job's is {is}"));
        }
    }
    if saved.seed != current.seed {
        return Err(format!(
            "its seed is {}, this job's is {}",
            saved.seed, current.seed
        ));
    }
    Ok(())
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("unreadable tensors: {e}"),
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `path` through a temporary file in the same folder, synced and
/// then renamed, so readers see the old file or the whole new one.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };

    write(&tmp)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Deletes tensor files of generations other than `keep`; failures only
/// leave garbage behind, so they are logged and ignored.
fn remove_old_generations(dir: &Path, keep: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let keep_suffix = format!("-{keep}.safetensors");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = ["weights-", "adam-", "best-"]
            .iter()
            .any(|p| name.starts_with(p))
            && name.ends_with(".safetensors");
        if ours && !name.ends_with(&keep_suffix) {
            if let Err(error) = std::fs::remove_file(entry.path()) {
                tracing::debug!(%error, file = %name, "cannot remove old checkpoint file");
            }
        }
    }
}

/// Tokens `(B, L)` u32 and labels `(B)` u32 of the given rows.
fn batch(split: &Encoded, rows: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
    let len = split.len;
    let mut tokens = Vec::with_capacity(rows.len() * len);
    let mut labels = Vec::with_capacity(rows.len());
    for &row in rows {
        let row = row as usize;
        tokens.extend_from_slice(&split.tokens[row * len..(row + 1) * len]);
        labels.push(split.labels[row]);
    }
    Ok((
        Tensor::from_vec(tokens, (rows.len(), len), device)?,
        Tensor::from_vec(labels, rows.len(), device)?,
    ))
}

fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<u64> {
    let predicted = logits.argmax(D::Minus1)?;
    let n = predicted
        .eq(labels)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(u64::from(n))
}

/// Loss, accuracy and predictions of a split.
struct Evaluation {
    loss: f64,
    accuracy: f64,
    /// Predicted class per row.
    predictions: Vec<u32>,
}

/// Evaluates `split` in eval mode (no dropout), `batch_size` rows at a time.
fn evaluate(
    model: &Model,
    split: &Encoded,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let n = split.n();
    let mut loss_sum = 0.0;
    let mut predictions = Vec::with_capacity(n);
    let all: Vec<u32> = (0..n as u32).collect();

    for rows in all.chunks(batch_size.max(1)) {
        let (tokens, labels) = batch(split, rows, device)?;
        let logits = model.forward(&tokens, false)?.detach();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        loss_sum += f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?) * rows.len() as f64;
        predictions.extend(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }

    let n_correct = predictions
        .iter()
        .zip(&split.labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(Evaluation {
        loss: loss_sum / n.max(1) as f64,
        accuracy: n_correct as f64 / n.max(1) as f64,
        predictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rotsweep_shared::data::load_rotation;
    use rotsweep_shared::spec::{DataSpec, ModelKind};

    /// Rotation 0 of the real example data, cut to `n_train` training rows
    /// and `n_eval` validation and test rows, sequences of length 64.
    fn tiny_data(n_train: usize, n_eval: usize) -> Result<RotationData> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/pfam-real");
        let spec = DataSpec {
            dir,
            version: String::new(),
            folds: 5,
            train_folds: 3,
            rotations: None,
            max_len: Some(64),
        };
        let mut data = load_rotation(&spec, 0)?;
        truncate(&mut data.train, n_train);
        truncate(&mut data.val, n_eval);
        truncate(&mut data.test, n_eval);
        Ok(data)
    }

    fn truncate(split: &mut Encoded, n: usize) {
        split.labels.truncate(n);
        split.tokens.truncate(n * split.len);
    }

    fn config(kind: ModelKind, train: TrainSpec) -> TrainConfig {
        let mut model = ModelSpec::new(kind);
        model.dense = vec![32];
        TrainConfig {
            model,
            train,
            seed: 5,
            device: Device::Cpu,
            checkpoint_dir: None,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rotsweep-train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Records reports and stops on request.
    #[derive(Default)]
    struct Recorder {
        reports: Vec<EpochReport>,
        resumed: Vec<EpochReport>,
        /// Stop when `should_stop` has been polled this many times.
        stop_at_poll: Option<usize>,
        polls: usize,
        break_after_epoch: Option<usize>,
    }

    impl TrainHooks for Recorder {
        fn on_epoch(&mut self, report: &EpochReport) -> ControlFlow<()> {
            self.reports.push(report.clone());
            if self.break_after_epoch == Some(report.epoch) {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }

        fn should_stop(&mut self) -> bool {
            self.polls += 1;
            self.stop_at_poll == Some(self.polls)
        }

        fn on_resume(&mut self, reports: &[EpochReport]) {
            self.resumed = reports.to_vec();
        }
    }

    /// Everything but wall-clock time.
    fn metrics(reports: &[EpochReport]) -> Vec<(usize, f64, f64, f64, f64)> {
        reports
            .iter()
            .map(|r| {
                (
                    r.epoch,
                    r.train_loss,
                    r.train_accuracy,
                    r.val_loss,
                    r.val_accuracy,
                )
            })
            .collect()
    }

    #[test]
    fn training_overfits_a_tiny_real_batch() -> Result<()> {
        let data = tiny_data(32, 32)?;
        let train = TrainSpec {
            epochs: 60,
            batch_size: 32,
            learning_rate: 3e-3,
            patience: 1000,
            monitor: Monitor::ValLoss,
            ..TrainSpec::default()
        };
        let outcome = train_job(&config(ModelKind::Rnn, train), &data, &mut NoHooks)?;

        let first = outcome.reports[0].train_loss;
        let last = outcome.reports.last().map_or(f64::NAN, |r| r.train_loss);
        assert!(last < 0.1 * first, "loss {first} -> {last}");
        assert_eq!(outcome.epochs_trained, 60);
        assert_eq!(outcome.n_test, 32);
        let total: u64 = outcome.confusion.iter().flatten().sum();
        assert_eq!(total, 32);
        assert_eq!(outcome.confusion.len(), data.labels.len());
        Ok(())
    }

    /// Validation labels are the training labels rotated by one class, so
    /// the better the model fits, the worse it validates: the best epoch is
    /// early and its weights must come back at the end.
    #[test]
    fn early_stopping_restores_the_best_epochs_weights() -> Result<()> {
        let mut data = tiny_data(32, 32)?;
        let n_classes = data.labels.len() as u32;
        data.val = data.train.clone();
        for label in &mut data.val.labels {
            *label = (*label + 1) % n_classes;
        }
        // Testing on the validation split reproduces the best epoch's metric.
        data.test = data.val.clone();

        let train = TrainSpec {
            epochs: 30,
            batch_size: 16,
            learning_rate: 1e-2,
            patience: 3,
            monitor: Monitor::ValLoss,
            ..TrainSpec::default()
        };
        let mut hooks = Recorder::default();
        let outcome = train_job(&config(ModelKind::Gru, train), &data, &mut hooks)?;

        assert!(outcome.stopped_early, "{:?}", metrics(&hooks.reports));
        assert_eq!(outcome.epochs_trained, outcome.best_epoch + 3);
        let best = hooks
            .reports
            .iter()
            .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
            .expect("some epochs");
        assert_eq!(best.epoch, outcome.best_epoch);
        assert!(
            (outcome.test_loss - best.val_loss).abs() < 1e-9,
            "restored weights give {} but the best epoch had {}",
            outcome.test_loss,
            best.val_loss
        );
        let last = hooks.reports.last().expect("some epochs");
        assert!(last.val_loss > best.val_loss);
        Ok(())
    }

    /// Interrupting mid-epoch, then resuming from the checkpoint, gives the
    /// numbers of an uninterrupted run; fixed-step epochs with dropout so the
    /// shuffling cursor and both random streams are exercised.
    #[test]
    fn resume_from_checkpoint_continues_like_an_uninterrupted_run() -> Result<()> {
        let data = tiny_data(40, 24)?;
        let train = TrainSpec {
            epochs: 4,
            batch_size: 16,
            steps_per_epoch: Some(3),
            patience: 10,
            ..TrainSpec::default()
        };
        let mut cfg = config(ModelKind::Rnn, train);
        cfg.model.dropout = 0.3;
        let reference = train_job(&cfg, &data, &mut NoHooks)?;

        let dir = temp_dir("resume");
        cfg.checkpoint_dir = Some(dir.clone());
        // Polls 1..=3 are epoch 1; poll 5 comes before step 2 of epoch 2.
        let mut first = Recorder {
            stop_at_poll: Some(5),
            ..Recorder::default()
        };
        match train_job(&cfg, &data, &mut first) {
            Err(Error::Interrupted {
                epoch: 2,
                steps_done: 1,
            }) => {}
            other => panic!("expected an interruption in epoch 2, got {other:?}"),
        }
        assert!(dir.join(CHECKPOINT_FILE).exists());

        let mut second = Recorder::default();
        let resumed = train_job(&cfg, &data, &mut second)?;
        assert_eq!(resumed.resumed_after_epoch, Some(1));
        assert_eq!(metrics(&second.resumed), metrics(&first.reports));
        assert_eq!(
            second.reports.iter().map(|r| r.epoch).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(metrics(&resumed.reports), metrics(&reference.reports));
        assert_eq!(resumed.test_loss, reference.test_loss);
        assert_eq!(resumed.confusion, reference.confusion);

        // A finished job's checkpoint goes straight to the test evaluation.
        let again = train_job(&cfg, &data, &mut NoHooks)?;
        assert_eq!(again.resumed_after_epoch, Some(4));
        assert_eq!(again.test_loss, reference.test_loss);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn break_from_on_epoch_checkpoints_and_resume_refuses_other_data() -> Result<()> {
        let data = tiny_data(16, 16)?;
        let train = TrainSpec {
            epochs: 3,
            batch_size: 16,
            ..TrainSpec::default()
        };
        let mut cfg = config(ModelKind::Mha, train);
        let dir = temp_dir("break");
        cfg.checkpoint_dir = Some(dir.clone());

        let mut hooks = Recorder {
            break_after_epoch: Some(1),
            ..Recorder::default()
        };
        let err = train_job(&cfg, &data, &mut hooks).expect_err("stopped by the hook");
        assert!(matches!(err, Error::Interrupted { epoch: 1, .. }), "{err}");

        let mut other = data.clone();
        other.labels.labels.push("Zz_extra".into());
        let err = train_job(&cfg, &other, &mut NoHooks).expect_err("other class count");
        let message = err.to_string();
        assert!(matches!(err, Error::Checkpoint { .. }), "{message}");
        assert!(
            message.contains("classes") && message.contains("checkpoint.json"),
            "{message}"
        );

        let outcome = train_job(&cfg, &data, &mut NoHooks)?;
        assert_eq!(outcome.resumed_after_epoch, Some(1));
        assert_eq!(outcome.epochs_trained, 3);
        assert_eq!(outcome.reports.len(), 3);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn a_copied_checkpoint_resumes_like_the_original() -> Result<()> {
        let data = tiny_data(16, 16)?;
        let train = TrainSpec {
            epochs: 3,
            batch_size: 8,
            ..TrainSpec::default()
        };
        let uninterrupted = train_job(&config(ModelKind::Rnn, train.clone()), &data, &mut NoHooks)?;

        let (first, second) = (temp_dir("copy-a"), temp_dir("copy-b"));
        assert!(!copy_checkpoint(&first, &second)?, "nothing to copy yet");
        let mut cfg = config(ModelKind::Rnn, train);
        cfg.checkpoint_dir = Some(first.clone());
        let mut hooks = Recorder {
            // Two steps per epoch: the fourth poll comes after one step of
            // epoch 2.
            stop_at_poll: Some(4),
            ..Recorder::default()
        };
        let err = train_job(&cfg, &data, &mut hooks).expect_err("stopped mid-epoch 2");
        assert!(
            matches!(
                err,
                Error::Interrupted {
                    epoch: 2,
                    steps_done: 1
                }
            ),
            "{err}"
        );

        assert!(copy_checkpoint(&first, &second)?);
        assert!(has_checkpoint(&second));
        cfg.checkpoint_dir = Some(second.clone());
        let resumed = train_job(&cfg, &data, &mut NoHooks)?;
        assert_eq!(resumed.resumed_after_epoch, Some(1));
        assert_eq!(metrics(&resumed.reports), metrics(&uninterrupted.reports));
        assert_eq!(resumed.confusion, uninterrupted.confusion);
        std::fs::remove_dir_all(&first).ok();
        std::fs::remove_dir_all(&second).ok();
        Ok(())
    }

    #[test]
    fn diverging_loss_is_reported_with_its_epoch_and_step() -> Result<()> {
        let data = tiny_data(32, 8)?;
        let train = TrainSpec {
            epochs: 2,
            batch_size: 8,
            learning_rate: 1e30,
            ..TrainSpec::default()
        };
        match train_job(&config(ModelKind::Rnn, train), &data, &mut NoHooks) {
            Err(Error::NonFiniteLoss { epoch: 1, step }) => assert!(step >= 2, "step {step}"),
            other => panic!("expected a non-finite loss, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn full_passes_visit_every_row_once_with_a_short_last_batch() -> Result<()> {
        let data = tiny_data(21, 8)?;
        let train = TrainSpec {
            batch_size: 8,
            ..TrainSpec::default()
        };
        let cfg = config(ModelKind::Rnn, train);
        let mut job = Job::new(&cfg, &data)?;
        for _ in 0..2 {
            job.reshuffle();
            let mut seen = Vec::new();
            let mut sizes = Vec::new();
            for _ in 0..job.steps_per_epoch() {
                let rows = job.next_batch(true);
                sizes.push(rows.len());
                seen.extend(rows);
            }
            assert_eq!(sizes, vec![8, 8, 5]);
            seen.sort_unstable();
            assert_eq!(seen, (0..21).collect::<Vec<u32>>());
        }
        Ok(())
    }

    #[test]
    fn job_seeds_differ_per_rotation() {
        assert_ne!(job_seed(42, 0), job_seed(42, 1));
        assert_eq!(job_seed(42, 3), job_seed(42, 3));
    }
}

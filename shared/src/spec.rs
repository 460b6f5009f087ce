//! The sweep spec: a TOML file naming a data set, training settings and one
//! table per model. Every key has a documented default close to the reference
//! homework (CS5043 HW6); unknown keys are errors that name the key.
//!
//! ```toml
//! name = "hw6"
//! [data]
//! dir = "data/pfam-uniprot46"   # relative to the spec file
//! [train]
//! epochs = 30
//! [models.gru]
//! kind = "gru"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A whole sweep: data, training settings and the models to compare.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// Sweep name: letters, digits, `_`, `-` and `.`; unique per coordinator.
    pub name: String,
    /// Where the folds are and how they rotate.
    pub data: DataSpec,
    /// Optimiser, batches, early stopping.
    #[serde(default)]
    pub train: TrainSpec,
    /// Model name -> model settings; one job per model and rotation.
    pub models: BTreeMap<String, ModelSpec>,
}

/// The data set and its rotations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Folder holding `pfam{version}_fold_{k}.csv`. Relative paths are
    /// resolved against the spec file's folder when the spec is loaded.
    pub dir: PathBuf,
    /// The `{version}` part of the fold file names (default empty).
    #[serde(default)]
    pub version: String,
    /// Number of folds (default 5).
    #[serde(default = "defaults::folds")]
    pub folds: usize,
    /// Training folds per rotation (default 3); then one validation and one
    /// test fold, so `train_folds + 2 <= folds`.
    #[serde(default = "defaults::train_folds")]
    pub train_folds: usize,
    /// Rotations to run (default: all, `0..folds`).
    #[serde(default)]
    pub rotations: Option<Vec<usize>>,
    /// Sequence length after front padding/truncation (default: the longest
    /// training sequence).
    #[serde(default)]
    pub max_len: Option<usize>,
}

/// What the early-stopping rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// Validation accuracy; higher is better.
    ValAccuracy,
    /// Validation loss; lower is better.
    ValLoss,
}

impl Monitor {
    /// True when `candidate` is strictly better than `best`.
    pub fn is_improvement(self, candidate: f64, best: f64) -> bool {
        match self {
            Monitor::ValAccuracy => candidate > best,
            Monitor::ValLoss => candidate < best,
        }
    }

    /// The metric's name as in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Monitor::ValAccuracy => "val_accuracy",
            Monitor::ValLoss => "val_loss",
        }
    }
}

/// Training settings shared by every job of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Maximum number of epochs (default 30).
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,
    /// Examples per step (default 64).
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Steps per epoch (default: one full pass over the training folds).
    #[serde(default)]
    pub steps_per_epoch: Option<usize>,
    /// Adam learning rate (default 1e-3).
    #[serde(default = "defaults::learning_rate")]
    pub learning_rate: f64,
    /// Epochs without improvement before stopping (default 5).
    #[serde(default = "defaults::patience")]
    pub patience: usize,
    /// Metric for early stopping and best-weight restore.
    #[serde(default = "defaults::monitor")]
    pub monitor: Monitor,
    /// Seed for initialisation and shuffling, mixed with the rotation.
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Attempts per job before it is FAILED (default 3).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Write a checkpoint every this many epochs (default 1; 0 = never).
    #[serde(default = "defaults::checkpoint_every")]
    pub checkpoint_every: usize,
    /// Most jobs of this sweep running at once, whatever the number of
    /// workers (default: no cap). The coordinator stores it with the sweep,
    /// so it holds across `resume` and coordinator restarts.
    // Left out of the canonical JSON when unset, so specs stored before the
    // key existed still compare equal on resubmission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_jobs: Option<usize>,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            epochs: defaults::epochs(),
            batch_size: defaults::batch_size(),
            steps_per_epoch: None,
            learning_rate: defaults::learning_rate(),
            patience: defaults::patience(),
            monitor: defaults::monitor(),
            seed: defaults::seed(),
            max_attempts: defaults::max_attempts(),
            checkpoint_every: defaults::checkpoint_every(),
            max_concurrent_jobs: None,
        }
    }
}

/// The three architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// SimpleRNN body.
    Rnn,
    /// GRU body.
    Gru,
    /// Multi-head self-attention body.
    Mha,
}

impl ModelKind {
    /// The kind's name as in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Rnn => "rnn",
            ModelKind::Gru => "gru",
            ModelKind::Mha => "mha",
        }
    }

    /// Relative cost of one training example per time step, measured on the
    /// reference CPU (baselines.md, train ms/step at L = 256: rnn 17, gru 32,
    /// mha 25 for TF-Keras). Used to order the queue largest-first.
    pub fn relative_cost(self) -> f64 {
        match self {
            ModelKind::Rnn => 1.0,
            ModelKind::Gru => 1.8,
            ModelKind::Mha => 1.5,
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rnn" => Ok(ModelKind::Rnn),
            "gru" => Ok(ModelKind::Gru),
            "mha" => Ok(ModelKind::Mha),
            other => Err(format!(
                "unknown model kind `{other}` (expected rnn, gru or mha)"
            )),
        }
    }
}

/// Sizes of one model. The defaults follow the reference homework.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture.
    pub kind: ModelKind,
    /// Embedding width (default 32).
    #[serde(default = "defaults::embedding")]
    pub embedding: usize,
    /// Conv1D filters after the embedding (default 64).
    #[serde(default = "defaults::conv_filters")]
    pub conv_filters: usize,
    /// Conv1D kernel width (default 4).
    #[serde(default = "defaults::conv_kernel")]
    pub conv_kernel: usize,
    /// Conv1D stride (default 4).
    #[serde(default = "defaults::conv_stride")]
    pub conv_stride: usize,
    /// Units of each inner recurrent module (default 64). For `mha` the
    /// attention output keeps the conv width so the residual adds up.
    #[serde(default = "defaults::units")]
    pub units: usize,
    /// Number of inner modules, each followed by average pooling (default 1).
    #[serde(default = "defaults::modules")]
    pub modules: usize,
    /// Average-pooling width after each module (default 2).
    #[serde(default = "defaults::pool")]
    pub pool: usize,
    /// Units of the final recurrent layer (default 64; unused by `mha`).
    #[serde(default = "defaults::final_units")]
    pub final_units: usize,
    /// Attention heads (default 4; `mha` only).
    #[serde(default = "defaults::heads")]
    pub heads: usize,
    /// Key/query/value width per head (default 16; `mha` only).
    #[serde(default = "defaults::key_size")]
    pub key_size: usize,
    /// Hidden dense layers with ELU (default `[64, 32]`).
    #[serde(default = "defaults::dense")]
    pub dense: Vec<usize>,
    /// Dropout rate before each dense layer during training (default 0).
    #[serde(default)]
    pub dropout: f64,
    /// L2 penalty on every weight matrix, added to the loss (default 0).
    #[serde(default)]
    pub l2: f64,
}

impl ModelSpec {
    /// Trainable parameters of this model, leaving out the embedding table
    /// and the output layer (they depend on the data's vocabulary and
    /// classes). Counted in `f64`, so absurd sizes cannot overflow.
    pub fn approx_params(&self) -> f64 {
        let f = |n: usize| n as f64;
        let (e, filters) = (f(self.embedding), f(self.conv_filters));
        let mut total = filters * e * f(self.conv_kernel) + filters;
        let recurrent = |n_in: f64, u: f64| match self.kind {
            ModelKind::Gru => 3.0 * (n_in * u + u * u + 2.0 * u),
            _ => n_in * u + u * u + u,
        };
        let width = match self.kind {
            ModelKind::Rnn | ModelKind::Gru => {
                let mut n_in = filters;
                for _ in 0..self.modules {
                    total += recurrent(n_in, f(self.units));
                    n_in = f(self.units);
                }
                total += recurrent(n_in, f(self.final_units));
                f(self.final_units)
            }
            ModelKind::Mha => {
                let inner = f(self.heads) * f(self.key_size);
                let block = 4.0 * filters * inner + 3.0 * inner + 3.0 * filters;
                total += (f(self.modules) + 1.0) * block;
                filters
            }
        };
        let mut n_in = width;
        for &units in &self.dense {
            total += n_in * f(units) + f(units);
            n_in = f(units);
        }
        total
    }

    /// The defaults for `kind`.
    pub fn new(kind: ModelKind) -> Self {
        Self {
            kind,
            embedding: defaults::embedding(),
            conv_filters: defaults::conv_filters(),
            conv_kernel: defaults::conv_kernel(),
            conv_stride: defaults::conv_stride(),
            units: defaults::units(),
            modules: defaults::modules(),
            pool: defaults::pool(),
            final_units: defaults::final_units(),
            heads: defaults::heads(),
            key_size: defaults::key_size(),
            dense: defaults::dense(),
            dropout: 0.0,
            l2: 0.0,
        }
    }
}

mod defaults {
    use super::Monitor;

    pub fn folds() -> usize {
        5
    }
    pub fn train_folds() -> usize {
        3
    }
    pub fn epochs() -> usize {
        30
    }
    pub fn batch_size() -> usize {
        64
    }
    pub fn learning_rate() -> f64 {
        1e-3
    }
    pub fn patience() -> usize {
        5
    }
    pub fn monitor() -> Monitor {
        Monitor::ValAccuracy
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn checkpoint_every() -> usize {
        1
    }
    pub fn embedding() -> usize {
        32
    }
    pub fn conv_filters() -> usize {
        64
    }
    pub fn conv_kernel() -> usize {
        4
    }
    pub fn conv_stride() -> usize {
        4
    }
    pub fn units() -> usize {
        64
    }
    pub fn modules() -> usize {
        1
    }
    pub fn pool() -> usize {
        2
    }
    pub fn final_units() -> usize {
        64
    }
    pub fn heads() -> usize {
        4
    }
    pub fn key_size() -> usize {
        16
    }
    pub fn dense() -> Vec<usize> {
        vec![64, 32]
    }
}

/// Upper bounds that [`SweepSpec::validate`] enforces, so that a typo in a
/// size (an extra zero or ten) is an error naming its key instead of an
/// allocation failure inside a worker.
pub mod limits {
    /// Any one layer width, head count, head size, kernel, stride or pool.
    pub const WIDTH: usize = 65_536;
    /// Inner modules of a model.
    pub const MODULES: usize = 32;
    /// Trainable parameters of a model, as [`super::ModelSpec::approx_params`]
    /// estimates them.
    pub const PARAMS: u64 = 100_000_000;
    /// `data.max_len`.
    pub const MAX_LEN: usize = 1 << 20;
    /// `train.batch_size`.
    pub const BATCH: usize = 1 << 20;
}

/// One cell of the sweep grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Model name (a key of `models`).
    pub model: String,
    /// Model kind.
    pub kind: ModelKind,
    /// Rotation index.
    pub rotation: usize,
}

impl SweepSpec {
    /// Reads, parses and validates a spec file; `data.dir` becomes absolute
    /// (relative to the spec file's folder).
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let mut spec = Self::from_toml(&text, path)?;

        if spec.data.dir.is_relative() {
            let base = path.parent().unwrap_or_else(|| Path::new("."));
            let base = if base.as_os_str().is_empty() {
                Path::new(".")
            } else {
                base
            };
            let joined = base.join(&spec.data.dir);
            spec.data.dir = std::fs::canonicalize(&joined).unwrap_or(joined);
        }
        Ok(spec)
    }

    /// Parses and validates TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self> {
        let spec: SweepSpec = toml::from_str(text).map_err(|e| Error::SpecParse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// The spec as canonical JSON: what the coordinator stores and compares
    /// when the same name is submitted again.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a spec always serialises")
    }

    /// Parses the JSON written by [`SweepSpec::to_json`] and validates it.
    pub fn from_json(json: &str) -> Result<Self> {
        let spec: SweepSpec = serde_json::from_str(json).map_err(|e| Error::SpecParse {
            path: PathBuf::from("<json>"),
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Rotations in run order (the configured list or `0..folds`).
    pub fn rotations(&self) -> Vec<usize> {
        match &self.data.rotations {
            Some(rs) => rs.clone(),
            None => (0..self.data.folds).collect(),
        }
    }

    /// The expanded grid: every model (name order) times every rotation.
    pub fn jobs(&self) -> Vec<JobSpec> {
        let mut jobs = Vec::new();
        for (name, model) in &self.models {
            for rotation in self.rotations() {
                jobs.push(JobSpec {
                    model: name.clone(),
                    kind: model.kind,
                    rotation,
                });
            }
        }
        jobs
    }

    /// Checks ranges and cross-key constraints, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| Error::SpecInvalid {
            key: key.to_string(),
            message,
        };

        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(bad(
                "name",
                format!(
                    "`{}` must be non-empty and use only letters, digits, `_`, `-`, `.`",
                    self.name
                ),
            ));
        }

        let d = &self.data;
        if d.folds < 3 {
            return Err(bad("data.folds", format!("{} < 3", d.folds)));
        }
        if d.train_folds == 0 || d.train_folds + 2 > d.folds {
            return Err(bad(
                "data.train_folds",
                format!(
                    "{} training folds leave no validation and test fold out of {}",
                    d.train_folds, d.folds
                ),
            ));
        }
        if let Some(rs) = &d.rotations {
            if rs.is_empty() {
                return Err(bad("data.rotations", "is empty".into()));
            }
            let mut seen = std::collections::BTreeSet::new();
            for &r in rs {
                if r >= d.folds {
                    return Err(bad(
                        "data.rotations",
                        format!("rotation {r} is not below folds = {}", d.folds),
                    ));
                }
                if !seen.insert(r) {
                    return Err(bad("data.rotations", format!("rotation {r} listed twice")));
                }
            }
        }
        if d.max_len == Some(0) {
            return Err(bad("data.max_len", "must be positive".into()));
        }
        if let Some(n) = d.max_len.filter(|&n| n > limits::MAX_LEN) {
            return Err(bad(
                "data.max_len",
                format!("{n} is above the limit of {}", limits::MAX_LEN),
            ));
        }

        let t = &self.train;
        if t.epochs == 0 {
            return Err(bad("train.epochs", "must be positive".into()));
        }
        if t.batch_size == 0 {
            return Err(bad("train.batch_size", "must be positive".into()));
        }
        if t.batch_size > limits::BATCH {
            return Err(bad(
                "train.batch_size",
                format!("{} is above the limit of {}", t.batch_size, limits::BATCH),
            ));
        }
        if t.steps_per_epoch == Some(0) {
            return Err(bad("train.steps_per_epoch", "must be positive".into()));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return Err(bad(
                "train.learning_rate",
                format!("{} is not a positive number", t.learning_rate),
            ));
        }
        if t.max_attempts == 0 {
            return Err(bad("train.max_attempts", "must be at least 1".into()));
        }
        if t.max_concurrent_jobs == Some(0) {
            return Err(bad(
                "train.max_concurrent_jobs",
                "must be at least 1 (leave it out for no cap)".into(),
            ));
        }

        if self.models.is_empty() {
            return Err(bad(
                "models",
                "no model tables (add e.g. [models.gru])".into(),
            ));
        }
        for (name, m) in &self.models {
            let key = |k: &str| format!("models.{name}.{k}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
            {
                return Err(bad(
                    &format!("models.{name}"),
                    "model names use only letters, digits, `_` and `-`".into(),
                ));
            }
            for (k, v) in [
                ("embedding", m.embedding),
                ("conv_filters", m.conv_filters),
                ("conv_kernel", m.conv_kernel),
                ("conv_stride", m.conv_stride),
                ("units", m.units),
                ("pool", m.pool),
                ("final_units", m.final_units),
                ("heads", m.heads),
                ("key_size", m.key_size),
            ] {
                if v == 0 {
                    return Err(bad(&key(k), "must be positive".into()));
                }
                if v > limits::WIDTH {
                    return Err(bad(
                        &key(k),
                        format!("{v} is above the limit of {}", limits::WIDTH),
                    ));
                }
            }
            if m.dense.contains(&0) {
                return Err(bad(&key("dense"), "layer widths must be positive".into()));
            }
            if let Some(&w) = m.dense.iter().find(|&&w| w > limits::WIDTH) {
                return Err(bad(
                    &key("dense"),
                    format!("width {w} is above the limit of {}", limits::WIDTH),
                ));
            }
            if m.modules > limits::MODULES {
                return Err(bad(
                    &key("modules"),
                    format!("{} is above the limit of {}", m.modules, limits::MODULES),
                ));
            }
            let params = m.approx_params();
            if params > limits::PARAMS as f64 {
                return Err(bad(
                    &format!("models.{name}"),
                    format!(
                        "its sizes make about {params:.3e} parameters, above the limit of {}",
                        limits::PARAMS
                    ),
                ));
            }
            if !(0.0..1.0).contains(&m.dropout) {
                return Err(bad(
                    &key("dropout"),
                    format!("{} is not in [0, 1)", m.dropout),
                ));
            }
            if !(m.l2.is_finite() && m.l2 >= 0.0) {
                return Err(bad(&key("l2"), format!("{} is not >= 0", m.l2)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_past_the_limits_are_errors_naming_their_key() {
        let with = |extra: &str| {
            let text = format!(
                "name = \"s\"\n[data]\ndir = \"d\"\nmax_len = 64\n[train]\n\
                 [models.m]\nkind = \"mha\"\n{extra}\n"
            );
            SweepSpec::from_toml(&text, Path::new("s.toml"))
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert!(with("").is_ok());
        for (extra, key) in [
            ("heads = 99999999999999999", "models.m.heads"),
            ("key_size = 1000000000", "models.m.key_size"),
            ("dense = [64, 100000]", "models.m.dense"),
            ("modules = 1000000", "models.m.modules"),
            // Each size is allowed, but together they are too many weights.
            (
                "heads = 1024\nkey_size = 1024\nconv_filters = 1024",
                "models.m",
            ),
        ] {
            let err = with(extra).unwrap_err();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains("limit"),
                "{extra}: {err}"
            );
        }
        let batch = SweepSpec::from_toml(
            "name = \"s\"\n[data]\ndir = \"d\"\n[train]\nbatch_size = 100000000000\n\
             [models.m]\nkind = \"gru\"\n",
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(batch.contains("`train.batch_size`"), "{batch}");
        // The default models are far below the parameter limit, and the
        // estimate leaves out only the embedding and the output layer.
        for kind in [ModelKind::Rnn, ModelKind::Gru, ModelKind::Mha] {
            let n = ModelSpec::new(kind).approx_params();
            assert!(n > 20_000.0 && n < 100_000.0, "{kind:?}: {n}");
        }
    }

    const ISSUE_SPEC: &str = r#"
name = "hw6"
[data]
dir = "data/pfam-uniprot46"
folds = 5
train_folds = 3
rotations = [0, 1, 2, 3, 4]
max_len = 512
[train]
epochs = 30
batch_size = 64
steps_per_epoch = 100
learning_rate = 1e-3
patience = 5
monitor = "val_accuracy"
seed = 42
[models.rnn]
kind = "rnn"
[models.gru]
kind = "gru"
[models.mha]
kind = "mha"
"#;

    fn parse(text: &str) -> Result<SweepSpec> {
        SweepSpec::from_toml(text, Path::new("spec.toml"))
    }

    #[test]
    fn issue_example_parses_with_homework_defaults() {
        let spec = parse(ISSUE_SPEC).unwrap();
        assert_eq!(spec.models.len(), 3);
        let gru = &spec.models["gru"];
        assert_eq!(gru.kind, ModelKind::Gru);
        assert_eq!(gru.embedding, 32);
        assert_eq!(
            (gru.conv_filters, gru.conv_kernel, gru.conv_stride),
            (64, 4, 4)
        );
        assert_eq!(
            (gru.units, gru.modules, gru.pool, gru.final_units),
            (64, 1, 2, 64)
        );
        assert_eq!(gru.dense, vec![64, 32]);
        assert_eq!(
            (spec.models["mha"].heads, spec.models["mha"].key_size),
            (4, 16)
        );
        assert_eq!(spec.train.steps_per_epoch, Some(100));
        assert_eq!(spec.data.max_len, Some(512));
    }

    #[test]
    fn jobs_expand_models_times_rotations_in_name_order() {
        let spec = parse(ISSUE_SPEC).unwrap();
        let jobs = spec.jobs();
        assert_eq!(jobs.len(), 15);
        assert_eq!(jobs[0].model, "gru");
        assert_eq!(jobs[0].rotation, 0);
        assert_eq!(jobs[14].model, "rnn");
        assert_eq!(jobs[14].rotation, 4);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = ISSUE_SPEC.replace("patience = 5", "patiense = 5");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("patiense"), "{err}");
        assert!(err.contains("spec.toml"), "{err}");
    }

    #[test]
    fn unknown_model_kind_is_named() {
        let text = ISSUE_SPEC.replace("kind = \"mha\"", "kind = \"lstm\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("lstm"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let cases = [
            (
                "rotations = [0, 1, 2, 3, 4]",
                "rotations = [0, 5]",
                "data.rotations",
            ),
            ("train_folds = 3", "train_folds = 4", "data.train_folds"),
            ("epochs = 30", "epochs = 0", "train.epochs"),
            (
                "learning_rate = 1e-3",
                "learning_rate = -1.0",
                "train.learning_rate",
            ),
        ];
        for (from, to, key) in cases {
            let err = parse(&ISSUE_SPEC.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{to}: {err}");
        }
        let text = format!("{ISSUE_SPEC}\n[models.tiny]\nkind = \"gru\"\nunits = 0\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("models.tiny.units"), "{err}");
    }

    #[test]
    fn concurrency_cap_is_optional_validated_and_absent_from_old_json() {
        let spec = parse(ISSUE_SPEC).unwrap();
        assert_eq!(spec.train.max_concurrent_jobs, None);
        assert!(!spec.to_json().contains("max_concurrent_jobs"));

        let text = ISSUE_SPEC.replace("seed = 42", "seed = 42\nmax_concurrent_jobs = 2");
        let capped = parse(&text).unwrap();
        assert_eq!(capped.train.max_concurrent_jobs, Some(2));
        assert_eq!(SweepSpec::from_json(&capped.to_json()).unwrap(), capped);
        assert_ne!(capped.to_json(), spec.to_json());

        let zero = ISSUE_SPEC.replace("seed = 42", "seed = 42\nmax_concurrent_jobs = 0");
        let err = parse(&zero).unwrap_err().to_string();
        assert!(err.contains("train.max_concurrent_jobs"), "{err}");
        let misspelt = ISSUE_SPEC.replace("seed = 42", "seed = 42\nmax_concurrent_job = 2");
        let err = parse(&misspelt).unwrap_err().to_string();
        assert!(err.contains("max_concurrent_job"), "{err}");
    }

    #[test]
    fn json_round_trip_is_lossless() {
        let spec = parse(ISSUE_SPEC).unwrap();
        let back = SweepSpec::from_json(&spec.to_json()).unwrap();
        assert_eq!(spec, back);
    }
}

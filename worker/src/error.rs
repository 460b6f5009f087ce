//! The one error type of the worker library. Variants name the operation and
//! the value at fault; the binary wraps them with anyhow context.

use std::path::PathBuf;

/// Errors from building models, training and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// Reading the data set failed.
    #[error(transparent)]
    Data(#[from] rotsweep_shared::Error),

    /// A file could not be read or written.
    #[error("cannot access {}: {source}", path.display())]
    Io {
        /// The file or folder at fault.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// The sequences are too short for the convolution and pooling layers.
    #[error(
        "max_len {max_len} is too short for this model: {stage} leaves no time steps \
         (needs max_len >= {min_len})"
    )]
    SequenceTooShort {
        /// The sequence length given.
        max_len: usize,
        /// The smallest sequence length the model accepts.
        min_len: usize,
        /// The layer that ran out of time steps.
        stage: String,
    },

    /// A model setting cannot be built (e.g. zero classes).
    #[error("invalid model: {0}")]
    InvalidModel(String),

    /// A device name such as `cuda:0` could not be parsed or opened.
    #[error("invalid device `{name}`: {message}")]
    Device {
        /// The device string as given.
        name: String,
        /// Why it cannot be used.
        message: String,
    },

    /// The data cannot train this job (e.g. an empty split).
    #[error("invalid training data: {0}")]
    InvalidData(String),

    /// The training loss became NaN or infinite.
    #[error("non-finite training loss at epoch {epoch}, step {step} (try a lower learning rate)")]
    NonFiniteLoss {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
    },

    /// Training was asked to stop (cancel or signal) before it finished. A
    /// checkpoint was written first when a checkpoint folder is set.
    #[error("training interrupted in epoch {epoch} after {steps_done} steps")]
    Interrupted {
        /// 1-based epoch that was running (or had just ended).
        epoch: usize,
        /// Steps of that epoch already applied.
        steps_done: usize,
    },

    /// A checkpoint exists but cannot be used for this job.
    /// The training code panicked (a bug, or sizes beyond what it
    /// checks); the worker reports it as the job's failure and goes on.
    #[error("training panicked: {0}")]
    Panicked(String),

    #[error("cannot resume from checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
}

impl Error {
    /// True when the job's own input (data or model settings) is invalid in
    /// a way every worker would find: retrying it elsewhere cannot help.
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Error::Data(e) => e.is_invalid_content(),
            Error::SequenceTooShort { .. } | Error::InvalidModel(_) | Error::InvalidData(_) => true,
            Error::Candle(_)
            | Error::Io { .. }
            | Error::Device { .. }
            | Error::NonFiniteLoss { .. }
            | Error::Interrupted { .. }
            | Error::Panicked(_)
            | Error::Checkpoint { .. } => false,
        }
    }
}

/// Result alias of the worker library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The one error type of the shared crate. Every variant names the file,
//! line or key at fault so a user can fix the input without a debugger.

use std::path::PathBuf;

/// Errors from reading specs and data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error (part of the message, not a separate
        /// `source`, so error chains do not print it twice).
        error: std::io::Error,
    },

    /// The spec is not valid TOML or has an unknown or mistyped key.
    #[error("invalid sweep spec {}: {message}", path.display())]
    SpecParse {
        /// The spec file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },

    /// A spec key has a value outside its allowed range.
    #[error("invalid sweep spec: key `{key}`: {message}")]
    SpecInvalid {
        /// Dotted key, e.g. `models.gru.units`.
        key: String,
        /// What is wrong with it.
        message: String,
    },

    /// A fold file is missing.
    #[error("missing fold file {} (expected pfam{{version}}_fold_{{k}}.csv)", path.display())]
    MissingFold {
        /// The path that does not exist.
        path: PathBuf,
    },

    /// A fold file line is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Csv {
        /// The fold file.
        path: PathBuf,
        /// 1-based line number (the header is line 1).
        line: u64,
        /// What is wrong with the line.
        message: String,
    },

    /// A fold file has a header but no rows.
    #[error("empty fold {}: no rows after the header", path.display())]
    EmptyFold {
        /// The fold file.
        path: PathBuf,
    },

    /// A label occurs in a validation or test fold but in no training fold.
    #[error(
        "label `{label}` at {}:{line} does not occur in the training folds",
        path.display()
    )]
    UnseenLabel {
        /// The label.
        label: String,
        /// The validation or test fold file where it occurs.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
    },

    /// A rotation or fold setting is impossible.
    #[error("invalid rotation {rotation}: {message}")]
    Rotation {
        /// The rotation index asked for.
        rotation: usize,
        /// Why it cannot be built.
        message: String,
    },

    /// A result or summary input does not fit together.
    #[error("invalid result: {0}")]
    Result(String),
}

impl Error {
    /// True when the content itself is wrong (a malformed line, an unseen
    /// label, an invalid key), so every reader of the same files fails the
    /// same way; false when a file could not be read or found, which may be
    /// one machine's trouble.
    pub fn is_invalid_content(&self) -> bool {
        match self {
            Error::Io { .. } | Error::MissingFold { .. } => false,
            Error::SpecParse { .. }
            | Error::SpecInvalid { .. }
            | Error::Csv { .. }
            | Error::EmptyFold { .. }
            | Error::UnseenLabel { .. }
            | Error::Rotation { .. }
            | Error::Result(_) => true,
        }
    }
}

/// Result alias of the shared crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

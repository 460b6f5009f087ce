//! Everything about a rotation sweep that is neither wire format nor tensors.
//!
//! - [`architecture`]: a model's layer table (shapes, parameter counts).
//! - [`spec`]: the sweep spec (TOML), its defaults, validation and job grid.
//! - [`data`]: fold CSV files, rotations, the character tokenizer and the
//!   label index.
//! - [`summary`]: cross-rotation summaries of finished jobs.
//! - [`stats`]: distributions, per-model statistics and paired tests
//!   between models across rotations.
//! - [`output`]: data on stdout ([`out!`], [`outln!`]) for commands whose
//!   output is piped.
//! - [`rng`]: the small deterministic generator used for shuffling, whose
//!   whole state is one `u64` so checkpoints can store it.
//!
//! This crate knows nothing of tonic, clap or candle (see DESIGN.md).

#![warn(missing_docs)]

pub mod architecture;
pub mod data;
pub mod error;
pub mod output;
pub mod rng;
pub mod spec;
pub mod stats;
pub mod summary;

pub use error::{Error, Result};

//! The rotsweep worker: candle models and the trainer that runs one job
//! (one model on one rotation) and reports every epoch.
//!
//! - [`model`]: the SimpleRNN, GRU and attention classifiers and their
//!   seeded initialisation.
//! - [`recurrent`]: the recurrent layers' fused ops (hand-written BPTT).
//! - [`attention`]: all heads' attention as one op, with a row-at-a-time
//!   CPU kernel.
//! - [`ops`]: bias, scale and pooling ops with fast CPU gradients.
//! - [`agent`]: the lease loop against a coordinator (heartbeats, one
//!   report per epoch, completion, graceful release).
//! - [`adam`]: Adam with Keras' defaults and a savable state.
//! - [`train`]: the training loop, early stopping, checkpoints and the
//!   test evaluation.
//! - [`error`]: the crate's error type.

pub mod adam;
pub mod agent;
pub mod attention;
mod cpu;
pub mod error;
pub mod model;
pub mod ops;
pub mod recurrent;
pub mod train;

use candle_core::Device;

pub use error::{Error, Result};

/// Opens a device named `cpu` or `cuda:N` (`cuda` alone means `cuda:0`).
///
/// CUDA devices need the crate's `cuda` feature; without it `cuda:N` is an
/// [`Error::Device`] saying so.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad = |message: String| Error::Device {
        name: s.to_string(),
        message,
    };
    let name = s.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }

    let ordinal = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| bad("expected `cuda:N` with a GPU index N".into()))?,
        None => return Err(bad("expected `cpu` or `cuda:N`".into())),
    };
    if !cfg!(feature = "cuda") {
        return Err(bad(
            "this worker was built without CUDA (rebuild with `--features cuda`)".into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_or_explain() {
        assert!(parse_device("cpu").is_ok_and(|d| d.is_cpu()));
        assert!(parse_device(" CPU ").is_ok());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`") && err.contains("cuda:N"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("GPU index"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}

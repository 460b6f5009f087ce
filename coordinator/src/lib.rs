//! The rotsweep coordinator: the gRPC server that owns a sweep's durable
//! state, and the client side used by the `rotsweep` CLI.
//!
//! - [`store`]: SQLite state (sweeps, jobs, epoch rows, results), leases and
//!   fencing.
//! - [`service`]: the tonic `Coordinator` service over the store.
//! - [`server`]: binding, authentication and graceful shutdown.
//! - [`client`]: a connected, authenticated client for the CLI.
//! - [`convert`]: summaries to and from their wire form.
//! - [`local`]: `rotsweep run`, an embedded coordinator plus local workers.
//! - [`progress`]: live progress bars of `run` and `watch` on a terminal.
//! - [`report`]: `rotsweep report`: statistics, figures, the HTML page and
//!   the CSV, JSON and TensorBoard exports.

pub mod client;
pub mod convert;
pub mod local;
pub mod progress;
pub mod report;
pub mod server;
pub mod service;
pub mod store;

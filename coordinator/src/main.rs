//! `rotsweep`: the coordinator server and the client CLI.
//!
//! Results go to stdout (a table, or JSON with `--format json`); logs go
//! through `tracing` to stderr (`RUST_LOG` sets the level).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use rotsweep_coordinator::client::{self, rpc_error};
use rotsweep_coordinator::convert::summary_from_pb;
use rotsweep_coordinator::local::{self, RunConfig};
use rotsweep_coordinator::server::{self, ServerConfig};
use rotsweep_coordinator::store::QuarantinePolicy;
use rotsweep_proto as pb;
use rotsweep_proto::auth::Token;
use rotsweep_proto::tls::ServerTls;
use rotsweep_shared::data::{fold_sizes, Rotation};
use rotsweep_shared::spec::SweepSpec;
use rotsweep_shared::{out, outln};

/// Cross-validation rotation sweeps of sequence classifiers.
#[derive(Parser, Debug)]
#[command(name = "rotsweep", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Output format of commands that print results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Human-readable table.
    Table,
    /// JSON (one document).
    Json,
}

/// How to reach a coordinator.
#[derive(clap::Args, Debug)]
struct Remote {
    /// Coordinator URL.
    #[arg(
        long,
        env = "ROTSWEEP_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// File holding the bearer token (default: the ROTSWEEP_TOKEN variable).
    #[arg(long, env = "ROTSWEEP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the coordinator's certificate, for
    /// `https://` URLs (default: the file ROTSWEEP_TLS_CA names, else the
    /// platform's trusted roots).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

impl Remote {
    /// Connects with the token and TLS settings these flags name.
    async fn connect(&self) -> anyhow::Result<client::Client> {
        client::connect(
            &self.coordinator,
            self.token_file.as_deref(),
            self.tls_ca.as_deref(),
        )
        .await
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator server.
    Serve {
        /// State directory (SQLite database and checkpoints).
        #[arg(long)]
        state: PathBuf,
        /// Address to listen on; port 0 picks a free port. Without a token
        /// only loopback addresses are allowed; with a token, any other
        /// address also needs TLS (or --insecure-no-tls).
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// PEM certificate chain to serve TLS with (needs --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve a token-protected coordinator on a non-loopback address
        /// without TLS. The token then crosses the network in clear text:
        /// only for a network you trust completely.
        #[arg(long)]
        insecure_no_tls: bool,
        /// File holding the bearer token (default: the ROTSWEEP_TOKEN variable).
        #[arg(long, env = "ROTSWEEP_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Seconds a lease lasts without a heartbeat.
        #[arg(long, default_value_t = 30.0)]
        lease_ttl: f64,
        /// Quarantine a worker after this many job failures in a row
        /// (0: never).
        #[arg(long, default_value_t = 3)]
        quarantine_after: u32,
        /// Seconds a quarantined worker gets no leases.
        #[arg(long, default_value_t = 600.0)]
        quarantine_secs: f64,
        /// Write the bound address to this file once listening.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Print the model x rotation grid of a spec (folds and sizes of each
    /// cell), checking its data. Job ids are given on submission.
    Plan {
        /// Sweep spec (TOML).
        spec: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run a whole sweep on this machine: embedded coordinator plus local
    /// worker processes; prints the summary and writes STATE/summary.json.
    Run {
        /// Sweep spec (TOML).
        spec: PathBuf,
        /// Worker processes to start.
        #[arg(long, default_value_t = 1)]
        local_workers: usize,
        /// State directory (default: runs/<sweep name>).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print the job list and exit.
        #[arg(long)]
        dry_run: bool,
        /// Store a changed spec under an existing name as a new version.
        #[arg(long)]
        new_version: bool,
        /// Compute threads per worker (default: cores / workers, at least 1).
        #[arg(long)]
        threads: Option<usize>,
        /// Seconds a lease lasts without a heartbeat.
        #[arg(long, default_value_t = 10.0)]
        lease_ttl: f64,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Submit a spec to a running coordinator.
    Submit {
        /// Sweep spec (TOML).
        spec: PathBuf,
        /// Store a changed spec under an existing name as a new version.
        #[arg(long)]
        new_version: bool,
        /// Skip loading the data here (when this machine cannot see it);
        /// by default every rotation is loaded and checked first.
        #[arg(long)]
        no_data_check: bool,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Jobs of a sweep with state, attempt, worker and progress.
    Status {
        /// Sweep name.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Cross-rotation summary of a sweep.
    Summary {
        /// Sweep name.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Every stored epoch row of a sweep (one per job and epoch).
    Epochs {
        /// Sweep name.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Cancel a sweep: pending jobs become CANCELLED, running jobs stop at
    /// their next step.
    Cancel {
        /// Sweep name.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Re-queue a sweep's cancelled and failed jobs (or the states given).
    Resume {
        /// Sweep name.
        sweep: String,
        /// States to re-queue (FAILED, CANCELLED, INVALID); repeatable.
        #[arg(long = "state")]
        states: Vec<String>,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Stream a sweep's live events until it finishes, then say so with its
    /// jobs counted by state. A sweep that has already finished prints each
    /// job's final state, then the same.
    Watch {
        /// Sweep name.
        sweep: String,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Names of the stored sweeps.
    Sweeps {
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Ask the coordinator's standard gRPC health service whether it
    /// serves (no token needed). Prints the status and exits 0 only when it
    /// is SERVING: for container probes and scripts.
    Health {
        /// Service to ask about (default: the whole server), e.g.
        /// rotsweep.v1.Coordinator.
        #[arg(long, default_value = "")]
        service: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Write a sweep's report: a self-contained index.html (figures,
    /// statistics, comparisons, spec) plus epochs.csv, results.csv,
    /// summary.json and TensorBoard event files. Works on a partial sweep.
    Report(ReportArgs),
}

/// Flags of `rotsweep report`.
#[derive(clap::Args, Debug)]
struct ReportArgs {
    /// Sweep name.
    sweep: String,
    /// Output folder (created if needed; default reports/SWEEP).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Read this coordinator state folder directly (read-only) instead of
    /// asking a running coordinator.
    #[arg(long)]
    state: Option<PathBuf>,
    /// The two models whose validation accuracy is drawn together, as A,B
    /// (default gru,mha when both exist).
    #[arg(long, value_delimiter = ',')]
    compare: Vec<String>,
    /// Which epoch stands for a job's training and validation accuracy in
    /// the tables.
    #[arg(long, value_enum, default_value_t = EpochArg::Best)]
    epoch: EpochArg,
    /// The per-rotation metric the paired tests compare.
    #[arg(long, value_enum, default_value_t = MetricArg::TestAccuracy)]
    metric: MetricArg,
    #[command(flatten)]
    remote: Remote,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// `--epoch` of `report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EpochArg {
    /// The epoch whose weights were restored and tested.
    Best,
    /// The last epoch trained.
    Last,
}

/// `--metric` of `report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MetricArg {
    /// Test accuracy.
    TestAccuracy,
    /// Balanced accuracy on the test fold.
    BalancedAccuracy,
    /// Macro F1 on the test fold.
    MacroF1,
    /// Validation accuracy at the chosen epoch.
    ValAccuracy,
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Plain stderr, except that live progress bars step aside for
        // each line.
        .with_writer(rotsweep_coordinator::progress::LogWriter)
        .with_ansi(std::env::var_os("NO_COLOR").is_none() && is_stderr_tty())
        .init();
}

fn is_stderr_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

fn load_spec(path: &Path) -> anyhow::Result<SweepSpec> {
    SweepSpec::from_path(path).map_err(anyhow::Error::new)
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("--{flag} must be a positive number of seconds, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            state,
            listen,
            tls_cert,
            tls_key,
            insecure_no_tls,
            token_file,
            lease_ttl,
            quarantine_after,
            quarantine_secs,
            addr_file,
        } => {
            let token = Token::load(token_file.as_deref()).map_err(anyhow::Error::msg)?;
            let tls = match (&tls_cert, &tls_key) {
                (Some(cert), Some(key)) => Some(ServerTls::from_files(cert, key)?),
                _ => None,
            };
            let server = server::start(ServerConfig {
                listen,
                state_dir: state,
                token,
                lease_ttl: seconds(lease_ttl, "lease-ttl")?,
                tls,
                insecure_no_tls,
                quarantine: QuarantinePolicy {
                    after: quarantine_after,
                    cool_down_ms: seconds(quarantine_secs, "quarantine-secs")?.as_millis() as i64,
                },
            })
            .await?;
            outln!("listening on {}", server.url());
            if let Some(path) = addr_file {
                local::write_text(&path, &server.addr.to_string())?;
            }
            server.run_until(shutdown_signal()).await?;
            tracing::info!("coordinator stopped");
            Ok(ExitCode::SUCCESS)
        }

        Command::Plan { spec, format } => {
            let spec = load_spec(&spec)?;
            print_plan(&spec, format)?;
            Ok(ExitCode::SUCCESS)
        }

        Command::Run {
            spec: spec_path,
            local_workers,
            state,
            dry_run,
            new_version,
            threads,
            lease_ttl,
            format,
        } => {
            let spec = load_spec(&spec_path)?;
            if dry_run {
                print_plan(&spec, format)?;
                return Ok(ExitCode::SUCCESS);
            }
            if local_workers == 0 {
                bail!("--local-workers must be at least 1");
            }
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if threads == Some(0) {
                bail!("--threads must be at least 1");
            }
            let threads_per_worker = threads.unwrap_or((cores / local_workers).max(1));
            let state_dir = state.unwrap_or_else(|| PathBuf::from("runs").join(&spec.name));
            let outcome = local::run(RunConfig {
                spec,
                state_dir: state_dir.clone(),
                n_workers: local_workers,
                worker_bin: local::find_worker_bin()?,
                lease_ttl: seconds(lease_ttl, "lease-ttl")?,
                new_version,
                threads_per_worker,
                progress: rotsweep_coordinator::progress::use_bars(
                    rotsweep_coordinator::progress::Target::Stderr,
                ),
            })
            .await?;

            match format {
                Format::Table => out!("{}", outcome.summary.to_table()),
                Format::Json => outln!("{}", serde_json::to_string_pretty(&outcome.summary)?),
            }
            tracing::info!(path = %outcome.summary_path.display(), "summary written");
            write_run_report(&state_dir, &outcome.summary.sweep);
            if outcome.unfinished.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                for (model, rotation, state, error) in &outcome.unfinished {
                    tracing::error!(%model, rotation, %state, %error, "job did not complete");
                }
                eprintln!(
                    "error: {} job(s) did not complete; the summary covers the rest",
                    outcome.unfinished.len()
                );
                Ok(ExitCode::from(2))
            }
        }

        Command::Submit {
            spec,
            new_version,
            no_data_check,
            remote,
            format,
        } => {
            let spec = load_spec(&spec)?;
            if no_data_check {
                tracing::warn!("not checking the data; workers will report data errors");
            } else {
                local::check_data(&spec)?;
            }
            let mut client = remote.connect().await?;
            let resp = client
                .submit_sweep(pb::SubmitSweepRequest {
                    spec_json: spec.to_json(),
                    new_version,
                })
                .await
                .map_err(|s| rpc_error("SubmitSweep", s))?
                .into_inner();
            match format {
                Format::Json => outln!(
                    "{}",
                    serde_json::json!({
                        "sweep": resp.sweep,
                        "n_jobs": resp.n_jobs,
                        "created": resp.created,
                    })
                ),
                Format::Table if resp.created => {
                    outln!("submitted sweep {} with {} jobs", resp.sweep, resp.n_jobs)
                }
                Format::Table => outln!(
                    "sweep {} already stored with this spec ({} jobs); nothing changed",
                    resp.sweep,
                    resp.n_jobs
                ),
            }
            Ok(ExitCode::SUCCESS)
        }

        Command::Status {
            sweep,
            remote,
            format,
        } => {
            let mut client = remote.connect().await?;
            let resp = client::sweep_status(&mut client, &sweep).await?;
            print_status(&resp, format);
            Ok(ExitCode::SUCCESS)
        }

        Command::Summary {
            sweep,
            remote,
            format,
        } => {
            let mut client = remote.connect().await?;
            let resp = client
                .sweep_summary(pb::SweepSummaryRequest { sweep })
                .await
                .map_err(|s| rpc_error("SweepSummary", s))?
                .into_inner();
            let summary = summary_from_pb(resp)?;
            match format {
                Format::Table => out!("{}", summary.to_table()),
                Format::Json => outln!("{}", serde_json::to_string_pretty(&summary)?),
            }
            Ok(ExitCode::SUCCESS)
        }

        Command::Epochs {
            sweep,
            remote,
            format,
        } => {
            let mut client = remote.connect().await?;
            let resp = client::list_epochs(&mut client, &sweep).await?;
            print_epochs(&resp, format);
            Ok(ExitCode::SUCCESS)
        }

        Command::Cancel {
            sweep,
            remote,
            format,
        } => {
            let mut client = remote.connect().await?;
            let resp = client
                .cancel_sweep(pb::CancelSweepRequest {
                    sweep: sweep.clone(),
                })
                .await
                .map_err(|s| rpc_error("CancelSweep", s))?
                .into_inner();
            match format {
                Format::Json => outln!(
                    "{}",
                    serde_json::json!({"sweep": sweep, "pending_cancelled": resp.n_pending_cancelled,
                                       "running_signalled": resp.n_running_signalled})
                ),
                Format::Table => outln!(
                    "cancelled sweep {sweep}: {} pending job(s) cancelled, {} running job(s) stop at their next step",
                    resp.n_pending_cancelled, resp.n_running_signalled
                ),
            }
            Ok(ExitCode::SUCCESS)
        }

        Command::Resume {
            sweep,
            states,
            remote,
            format,
        } => {
            let mut client = remote.connect().await?;
            let resp = client
                .resume_sweep(pb::ResumeSweepRequest {
                    sweep: sweep.clone(),
                    states,
                })
                .await
                .map_err(|s| rpc_error("ResumeSweep", s))?
                .into_inner();
            match format {
                Format::Json => outln!(
                    "{}",
                    serde_json::json!({"sweep": sweep, "requeued": resp.n_requeued})
                ),
                Format::Table => outln!("re-queued {} job(s) of sweep {sweep}", resp.n_requeued),
            }
            Ok(ExitCode::SUCCESS)
        }

        Command::Watch {
            sweep,
            remote,
            format,
        } => {
            use rotsweep_coordinator::progress::{self, Target};

            let mut client = remote.connect().await?;
            // Bars need the grid's size and state first; piped or JSON
            // output gets one line per event instead.
            let mut bars = if format == Format::Table && progress::use_bars(Target::Stdout) {
                Some(watch_bars(&mut client, &sweep).await?)
            } else {
                None
            };
            let mut stream = open_watch(&mut client, &sweep).await?;
            let mut n_events = 0usize;
            loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        n_events += 1;
                        match bars.as_mut() {
                            Some(b) => show_watch_event(b, &event),
                            None => print_event(&event, format),
                        }
                    }
                    Ok(None) => break,
                    // The coordinator went away (restart, network): watch
                    // again once it is back. Events in between are not
                    // replayed; `status` has the state.
                    Err(status) if watch_may_resume(&status) => {
                        tracing::warn!(
                            error = %status.message(),
                            "lost the coordinator; reconnecting (events until then are not \
                             shown, `rotsweep status` has them)"
                        );
                        (client, stream) = rewatch(&remote, &sweep).await?;
                        tracing::info!("watching again");
                    }
                    Err(status) => return Err(rpc_error("Watch", status)),
                }
            }
            if let Some(b) = bars {
                b.finish();
            }

            // The stream ends with the sweep, at once when it had already
            // finished. Say how it ended; a sweep that was over before the
            // watch began gets each job's final state first, as the events
            // a live watch would have ended with.
            let status = client::sweep_status(&mut client, &sweep).await?;
            let is_finished = status
                .jobs
                .iter()
                .all(|j| rotsweep_coordinator::store::state::is_final(&j.state));
            if !is_finished {
                tracing::warn!(
                    "the watch stream ended before the sweep finished; \
                     `rotsweep status` has its state"
                );
                return Ok(ExitCode::SUCCESS);
            }
            if n_events == 0 {
                for j in &status.jobs {
                    print_event(&final_event(j), format);
                }
            }
            print_finished(&status, format);
            Ok(ExitCode::SUCCESS)
        }

        Command::Report(args) => run_report(args).await,

        Command::Sweeps { remote, format } => {
            let mut client = remote.connect().await?;
            let resp = client
                .list_sweeps(pb::ListSweepsRequest {})
                .await
                .map_err(|s| rpc_error("ListSweeps", s))?
                .into_inner();
            match format {
                Format::Table => resp.sweeps.iter().for_each(|s| outln!("{s}")),
                Format::Json => outln!("{}", serde_json::json!(resp.sweeps)),
            }
            Ok(ExitCode::SUCCESS)
        }

        Command::Health {
            service,
            timeout,
            remote,
            format,
        } => {
            let status = client::check_health(
                &remote.coordinator,
                remote.tls_ca.as_deref(),
                &service,
                seconds(timeout, "timeout")?,
            )
            .await?;
            match format {
                Format::Table => outln!("{}", status.as_str_name()),
                Format::Json => outln!(
                    "{}",
                    serde_json::json!({"service": service, "status": status.as_str_name()})
                ),
            }
            if status == client::ServingStatus::Serving {
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// Writes `STATE/report/` after a local run. A failure here is logged, not
/// fatal: the sweep itself is done and stored.
fn write_run_report(state_dir: &Path, sweep: &str) {
    use rotsweep_coordinator::report::{self, ReportData, ReportOptions};
    use rotsweep_coordinator::store::Store;

    let opts = ReportOptions {
        out_dir: state_dir.join("report"),
        pair: None,
        epoch_choice: Default::default(),
        metric: Default::default(),
    };
    let written = Store::open_read_only(state_dir)
        .map_err(anyhow::Error::new)
        .and_then(|store| Ok(ReportData::from_store(&store, sweep)?))
        .and_then(|data| Ok(report::write_report(&data, &opts)?));
    match written {
        Ok(outcome) => tracing::info!(path = %outcome.index.display(), "report written"),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot write the report"),
    }
}

/// Progress bars for `watch`, sized from the sweep's jobs and spec.
async fn open_watch(
    client: &mut client::Client,
    sweep: &str,
) -> Result<tonic::Streaming<pb::WatchEvent>, tonic::Status> {
    Ok(client
        .watch(pb::WatchRequest {
            sweep: sweep.to_string(),
        })
        .await?
        .into_inner())
}

/// Errors after which a watch stream may be opened again: the connection
/// or the coordinator went away.
fn watch_may_resume(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted | Code::Internal
    )
}

/// Opens the watch stream again, retrying with backoff for up to about ten
/// minutes while the coordinator is unreachable; returns the new connection
/// with it.
async fn rewatch(
    remote: &Remote,
    sweep: &str,
) -> anyhow::Result<(client::Client, tonic::Streaming<pb::WatchEvent>)> {
    const TRIES: u32 = 300;
    let mut last = String::new();
    for attempt in 0..TRIES {
        let wait = Duration::from_millis((200u64 << attempt.min(4)).min(2_000));
        tokio::time::sleep(wait).await;
        let mut client = match remote.connect().await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{e:#}");
                continue;
            }
        };
        match open_watch(&mut client, sweep).await {
            Ok(stream) => return Ok((client, stream)),
            Err(status) if watch_may_resume(&status) => last = status.message().to_string(),
            Err(status) => return Err(rpc_error("Watch", status)),
        }
    }
    bail!("gave up reconnecting to the coordinator after {TRIES} tries: {last}")
}

async fn watch_bars(
    client: &mut client::Client,
    sweep: &str,
) -> anyhow::Result<rotsweep_coordinator::progress::Bars> {
    use rotsweep_coordinator::progress::{Bars, Target};
    let status = client::sweep_status(client, sweep).await?;
    let spec = client::list_results(client, sweep).await?.spec_json;
    let epochs = SweepSpec::from_json(&spec).map_or(1, |s| s.train.epochs);
    let n_done = status
        .jobs
        .iter()
        .filter(|j| rotsweep_coordinator::store::state::is_final(&j.state))
        .count();
    let names = status
        .jobs
        .iter()
        .map(|j| (j.job_id, format!("{}/rot{}", j.model, j.rotation)))
        .collect();
    let mut bars = Bars::new(Target::Stdout, status.jobs.len(), n_done, epochs, names);
    // Jobs already running show up with their worker and last epoch.
    for j in status.jobs.iter().filter(|j| j.state == "RUNNING") {
        let name = format!("{}/rot{}", j.model, j.rotation);
        bars.leased(j.job_id, &name, j.attempt, &j.worker_id);
        if j.epoch > 0 {
            bars.epoch(j.job_id, j.epoch, f64::NAN, f64::NAN);
        }
    }
    Ok(bars)
}

fn show_watch_event(bars: &mut rotsweep_coordinator::progress::Bars, e: &pb::WatchEvent) {
    use pb::watch_event::Event as E;
    match &e.event {
        Some(E::LeasedBy(worker)) => bars.leased(
            e.job_id,
            &format!("{}/rot{}", e.model, e.rotation),
            e.attempt,
            worker,
        ),
        Some(E::Epoch(m)) => bars.epoch(e.job_id, m.epoch, m.val_accuracy, m.seconds),
        Some(E::State(s)) => bars.finished(e.job_id, s, &e.detail),
        None => {}
    }
}

async fn run_report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    use rotsweep_coordinator::report::{self, ReportData, ReportOptions};
    use rotsweep_coordinator::store::Store;
    use rotsweep_shared::stats::{EpochChoice, Metric};

    let pair = match args.compare.as_slice() {
        [] => None,
        [a, b] => Some((a.clone(), b.clone())),
        other => bail!(
            "--compare takes two model names as A,B, got {} name(s)",
            other.len()
        ),
    };
    let opts = ReportOptions {
        out_dir: args
            .out
            .unwrap_or_else(|| PathBuf::from("reports").join(&args.sweep)),
        pair,
        epoch_choice: match args.epoch {
            EpochArg::Best => EpochChoice::Best,
            EpochArg::Last => EpochChoice::Last,
        },
        metric: match args.metric {
            MetricArg::TestAccuracy => Metric::TestAccuracy,
            MetricArg::BalancedAccuracy => Metric::BalancedAccuracy,
            MetricArg::MacroF1 => Metric::MacroF1,
            MetricArg::ValAccuracy => Metric::ValAccuracy,
        },
    };
    let data = match &args.state {
        Some(dir) => {
            let store = Store::open_read_only(dir)
                .with_context(|| format!("opening the state folder {}", dir.display()))?;
            ReportData::from_store(&store, &args.sweep)
                .with_context(|| format!("reading sweep `{}`", args.sweep))?
        }
        None => {
            let mut client = args.remote.connect().await?;
            ReportData::fetch(&mut client, &args.sweep).await?
        }
    };
    let outcome = report::write_report(&data, &opts)
        .with_context(|| format!("writing the report into {}", opts.out_dir.display()))?;
    let a = &outcome.analysis;
    let missing: Vec<String> = a
        .missing
        .iter()
        .map(|m| format!("{}/rot{} ({})", m.model, m.rotation, m.state))
        .collect();
    match args.format {
        Format::Json => outln!(
            "{}",
            serde_json::json!({
                "sweep": a.sweep,
                "index": outcome.index,
                "figures": outcome.figures,
                "files": outcome.files,
                "complete": a.complete,
                "missing": missing,
            })
        ),
        Format::Table => {
            outln!(
                "report of sweep {} written to {} ({} figures, {} files)",
                a.sweep,
                outcome.index.display(),
                outcome.figures.len(),
                outcome.files.len()
            );
            if !missing.is_empty() {
                outln!(
                    "partial: {} job(s) without a result: {}",
                    missing.len(),
                    missing.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping: finishing in-flight requests");
}

fn print_plan(spec: &SweepSpec, format: Format) -> anyhow::Result<()> {
    local::check_data(spec)?;
    let sizes = fold_sizes(&spec.data)
        .with_context(|| format!("checking the folds in {}", spec.data.dir.display()))?;
    // No job ids here: the coordinator assigns them when the sweep is
    // submitted (they keep counting across sweeps), so a plan can only name
    // each grid cell by its model and rotation.
    let mut rows = Vec::new();
    for job in spec.jobs() {
        let rot = Rotation::new(job.rotation, spec.data.folds, spec.data.train_folds)?;
        let n_train: usize = rot.train.iter().map(|&k| sizes[k]).sum();
        rows.push(serde_json::json!({
            "model": job.model,
            "kind": job.kind.as_str(),
            "rotation": job.rotation,
            "train_folds": rot.train,
            "val_fold": rot.val,
            "test_fold": rot.test,
            "n_train": n_train,
            "n_val": sizes[rot.val],
            "n_test": sizes[rot.test],
        }));
    }
    match format {
        Format::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "sweep": spec.name,
                "data": spec.data.dir,
                "epochs": spec.train.epochs,
                "jobs": rows,
            }))?
        ),
        Format::Table => {
            outln!(
                "sweep {}: {} jobs ({} models x {} rotations), data {}",
                spec.name,
                rows.len(),
                spec.models.len(),
                spec.rotations().len(),
                spec.data.dir.display()
            );
            outln!(
                "{:<10} {:<5} {:>3} {:<9} {:>3} {:>4} {:>7} {:>5} {:>5}",
                "model",
                "kind",
                "rot",
                "train",
                "val",
                "test",
                "n_train",
                "n_val",
                "n_test"
            );
            for r in &rows {
                let train: Vec<String> = r["train_folds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.to_string())
                    .collect();
                outln!(
                    "{:<10} {:<5} {:>3} {:<9} {:>3} {:>4} {:>7} {:>5} {:>5}",
                    r["model"].as_str().unwrap_or_default(),
                    r["kind"].as_str().unwrap_or_default(),
                    r["rotation"],
                    train.join(","),
                    r["val_fold"],
                    r["test_fold"],
                    r["n_train"],
                    r["n_val"],
                    r["n_test"]
                );
            }
        }
    }
    Ok(())
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn print_status(resp: &pb::SweepStatusResponse, format: Format) {
    match format {
        Format::Json => {
            let jobs: Vec<_> = resp
                .jobs
                .iter()
                .map(|j| {
                    serde_json::json!({
                        "job_id": j.job_id, "model": j.model, "kind": j.kind,
                        "rotation": j.rotation, "state": j.state, "attempt": j.attempt,
                        "worker_id": j.worker_id, "epoch": j.epoch,
                        "best_metric": finite(j.best_metric),
                        "elapsed_seconds": j.elapsed_seconds,
                        "test_accuracy": finite(j.test_accuracy),
                        "last_error": j.last_error,
                        "infra_failures": j.infra_failures,
                        "job_failures": j.job_failures,
                    })
                })
                .collect();
            let workers: Vec<_> = resp
                .workers
                .iter()
                .map(|w| {
                    serde_json::json!({
                        "worker_id": w.worker_id, "completed": w.n_completed,
                        "job_failures": w.n_job_failures, "infra_failures": w.n_infra_failures,
                        "consecutive_failures": w.consecutive_failures,
                        "quarantined": w.quarantined,
                        "quarantine_seconds_left": w.quarantine_seconds_left,
                    })
                })
                .collect();
            outln!(
                "{}",
                serde_json::json!({"sweep": resp.sweep, "jobs": jobs, "workers": workers})
            );
        }
        Format::Table => {
            // `lost/failed`: attempts lost with their worker (lease expired)
            // and attempts the job itself failed.
            outln!(
                "{:>4} {:<10} {:>3} {:<9} {:>7} {:>11} {:<12} {:>5} {:>8} {:>8} {:>8}",
                "job",
                "model",
                "rot",
                "state",
                "attempt",
                "lost/failed",
                "worker",
                "epoch",
                "best",
                "elapsed",
                "test"
            );
            for j in &resp.jobs {
                let f = |x: f64| finite(x).map_or("-".into(), |v| format!("{v:.4}"));
                outln!(
                    "{:>4} {:<10} {:>3} {:<9} {:>7} {:>11} {:<12} {:>5} {:>8} {:>7.0}s {:>8}",
                    j.job_id,
                    j.model,
                    j.rotation,
                    j.state,
                    j.attempt,
                    format!("{}/{}", j.infra_failures, j.job_failures),
                    j.worker_id,
                    j.epoch,
                    f(j.best_metric),
                    j.elapsed_seconds,
                    f(j.test_accuracy)
                );
                if !j.last_error.is_empty() && j.state != "COMPLETED" {
                    outln!("     last error: {}", j.last_error);
                }
            }
            if !resp.workers.is_empty() {
                outln!();
                outln!(
                    "{:<16} {:>9} {:>11} {:>6} {:>8}  quarantine",
                    "worker",
                    "completed",
                    "job_failed",
                    "lost",
                    "in_a_row"
                );
                for w in &resp.workers {
                    let quarantine = if w.quarantined {
                        format!("yes, {:.0} s left", w.quarantine_seconds_left)
                    } else {
                        "no".to_string()
                    };
                    outln!(
                        "{:<16} {:>9} {:>11} {:>6} {:>8}  {quarantine}",
                        w.worker_id,
                        w.n_completed,
                        w.n_job_failures,
                        w.n_infra_failures,
                        w.consecutive_failures
                    );
                }
            }
        }
    }
}

fn print_epochs(resp: &pb::ListEpochsResponse, format: Format) {
    let metrics = |r: &pb::EpochRow| r.metrics.unwrap_or_default();
    match format {
        Format::Json => {
            let rows: Vec<_> = resp
                .rows
                .iter()
                .map(|r| {
                    let m = metrics(r);
                    serde_json::json!({
                        "job_id": r.job_id, "model": r.model, "rotation": r.rotation,
                        "attempt": r.attempt, "epoch": m.epoch,
                        "train_loss": finite(m.train_loss), "train_accuracy": finite(m.train_accuracy),
                        "val_loss": finite(m.val_loss), "val_accuracy": finite(m.val_accuracy),
                        "seconds": m.seconds, "examples_per_second": m.examples_per_second,
                    })
                })
                .collect();
            outln!("{}", serde_json::Value::Array(rows));
        }
        Format::Table => {
            outln!(
                "{:>4} {:<10} {:>3} {:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8}",
                "job",
                "model",
                "rot",
                "attempt",
                "epoch",
                "loss",
                "acc",
                "val_loss",
                "val_acc",
                "seconds"
            );
            for r in &resp.rows {
                let m = metrics(r);
                outln!(
                    "{:>4} {:<10} {:>3} {:>7} {:>5} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>8.2}",
                    r.job_id,
                    r.model,
                    r.rotation,
                    r.attempt,
                    m.epoch,
                    m.train_loss,
                    m.train_accuracy,
                    m.val_loss,
                    m.val_accuracy,
                    m.seconds
                );
            }
        }
    }
}

/// A job's final state as the `state` event that ended it, for a sweep
/// that finished before the watch began. The detail is the one the live
/// event carries: the test accuracy of a finished job, else the last error.
fn final_event(j: &pb::JobStatus) -> pb::WatchEvent {
    use rotsweep_coordinator::store::state;
    let detail = if j.state == state::COMPLETED || j.state == state::INVALID {
        format!("test accuracy {:.4}", j.test_accuracy)
    } else {
        j.last_error.clone()
    };
    pb::WatchEvent {
        job_id: j.job_id,
        model: j.model.clone(),
        rotation: j.rotation,
        attempt: j.attempt,
        event: Some(pb::watch_event::Event::State(j.state.clone())),
        detail,
    }
}

/// The last thing `watch` prints: the sweep finished, with its jobs counted
/// by final state.
fn print_finished(status: &pb::SweepStatusResponse, format: Format) {
    let mut states = std::collections::BTreeMap::<&str, usize>::new();
    for j in &status.jobs {
        *states.entry(j.state.as_str()).or_default() += 1;
    }
    match format {
        Format::Json => outln!(
            "{}",
            serde_json::json!({"sweep": status.sweep, "event": "finished",
                               "n_jobs": status.jobs.len(), "states": states})
        ),
        Format::Table => {
            let mut line = format!(
                "sweep {} finished: {} jobs",
                status.sweep,
                status.jobs.len()
            );
            for (state, n) in &states {
                line.push_str(&format!(", {n} {state}"));
            }
            outln!("{line}");
        }
    }
}

fn print_event(e: &pb::WatchEvent, format: Format) {
    use pb::watch_event::Event as E;
    let job = format!(
        "{}/rot{} (job {}, attempt {})",
        e.model, e.rotation, e.job_id, e.attempt
    );
    match (format, &e.event) {
        (Format::Json, Some(E::LeasedBy(w))) => outln!(
            "{}",
            serde_json::json!({"job_id": e.job_id, "model": e.model, "rotation": e.rotation,
                               "attempt": e.attempt, "event": "leased", "worker_id": w})
        ),
        (Format::Json, Some(E::Epoch(m))) => outln!(
            "{}",
            serde_json::json!({"job_id": e.job_id, "model": e.model, "rotation": e.rotation,
                               "attempt": e.attempt, "event": "epoch", "epoch": m.epoch,
                               "train_loss": finite(m.train_loss), "train_accuracy": finite(m.train_accuracy),
                               "val_loss": finite(m.val_loss), "val_accuracy": finite(m.val_accuracy),
                               "seconds": m.seconds})
        ),
        (Format::Json, Some(E::State(s))) => outln!(
            "{}",
            serde_json::json!({"job_id": e.job_id, "model": e.model, "rotation": e.rotation,
                               "attempt": e.attempt, "event": "state", "state": s, "detail": e.detail})
        ),
        (Format::Table, Some(E::LeasedBy(w))) => outln!("{job}: leased by {w}"),
        (Format::Table, Some(E::Epoch(m))) => outln!(
            "{job}: epoch {} loss {:.4} acc {:.4} val_loss {:.4} val_acc {:.4} ({:.1} s)",
            m.epoch,
            m.train_loss,
            m.train_accuracy,
            m.val_loss,
            m.val_accuracy,
            m.seconds
        ),
        (Format::Table, Some(E::State(s))) if e.detail.is_empty() => outln!("{job}: {s}"),
        (Format::Table, Some(E::State(s))) => outln!("{job}: {s} {}", e.detail),
        (_, None) => {}
    }
}

//! `rotsweep-loadgen`: load generator for the coordinator. Starts a real
//! `rotsweep serve` child process (SQLite state on disk, loopback port),
//! submits sweeps totalling about N jobs, and plays M simulated workers as
//! tokio tasks sharing a few gRPC channels: lease, report E epochs, complete.
//! A side task polls `SweepStatus` during the load. Reports epoch reports
//! ingested per second, lease latency p50/p99, `SweepStatus` latency and the
//! coordinator's RSS (from /proc/PID/status) at job checkpoints.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use rotsweep_bench::percentile;
use rotsweep_proto as pb;
use rotsweep_shared::spec::{DataSpec, ModelKind, ModelSpec, SweepSpec, TrainSpec};
use serde::Serialize;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Parser)]
#[command(about = "Drive a real coordinator with simulated workers over gRPC")]
struct Cli {
    /// Total jobs to submit (rounded up to whole models of --rotations jobs).
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Epoch reports per job.
    #[arg(long, default_value_t = 50)]
    epochs: usize,
    /// Simulated workers (tokio tasks).
    #[arg(long, default_value_t = 200)]
    workers: usize,
    /// gRPC channels the workers share.
    #[arg(long, default_value_t = 8)]
    channels: usize,
    /// Jobs per model (the spec's folds; every fold is a rotation).
    #[arg(long, default_value_t = 20)]
    rotations: usize,
    /// Largest sweep submitted; more jobs go into more sweeps.
    #[arg(long, default_value_t = 1000)]
    jobs_per_sweep: usize,
    /// Simulated training time per epoch: each worker waits this long
    /// before each report, so `workers * 1000 / epoch_ms` reports/s are
    /// offered (0: as fast as the coordinator answers, a saturation test).
    #[arg(long, default_value_t = 0)]
    epoch_ms: u64,
    /// Stop the load after this many seconds even if jobs remain.
    #[arg(long, default_value_t = 120.0)]
    time_limit: f64,
    /// Milliseconds between two `SweepStatus` calls of the side task.
    #[arg(long, default_value_t = 100)]
    status_every_ms: u64,
    /// Completed-job counts at which the coordinator's RSS is sampled.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
    checkpoints: Vec<u64>,
    /// The `rotsweep` binary (default: next to this one).
    #[arg(long)]
    rotsweep: Option<PathBuf>,
    /// State directory for the coordinator (default: a fresh temp folder,
    /// removed afterwards). Must not exist yet.
    #[arg(long)]
    state: Option<PathBuf>,
    /// RUST_LOG of the coordinator (its log goes to STATE/serve.log).
    #[arg(long, default_value = "warn")]
    serve_log: String,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// The coordinator child, killed on drop.
struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Serve {
    fn start(bin: &Path, state: &Path, log: &str) -> anyhow::Result<Self> {
        let stderr = std::fs::File::create(state.join("serve.log")).context("serve.log")?;
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--lease-ttl", "600"])
            .arg("--state")
            .arg(state)
            .env_remove("ROTSWEEP_TOKEN")
            .env_remove("ROTSWEEP_TOKEN_FILE")
            .env("RUST_LOG", log)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("serve stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut serve = Serve {
            child,
            url: String::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("rotsweep serve printed no address within 30 s")?;
        serve.url = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line from serve: {line:?}"))?
            .to_string();
        Ok(serve)
    }

    /// (VmRSS, VmHWM) in KiB from /proc.
    fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .context("reading the coordinator's /proc status")?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = text
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing in /proc status"))?;
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("unreadable {name}: {line}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

/// One RSS sample.
#[derive(Debug, Clone, Serialize)]
struct RssSample {
    /// What the sample was taken at ("submitted", "1000 jobs", "end").
    at: String,
    completed_jobs: u64,
    epoch_reports: u64,
    rss_mib: f64,
    hwm_mib: f64,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize)]
struct Latency {
    n: usize,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

impl Latency {
    fn of(mut xs: Vec<f64>) -> Self {
        Latency {
            n: xs.len(),
            p50_ms: percentile(&mut xs, 0.5),
            p99_ms: percentile(&mut xs, 0.99),
            max_ms: percentile(&mut xs, 1.0),
        }
    }
}

/// Everything the run measured.
#[derive(Debug, Serialize)]
struct Report {
    jobs_submitted: usize,
    sweeps: usize,
    epochs_per_job: usize,
    workers: usize,
    channels: usize,
    time_limit_s: f64,
    /// Simulated training time per epoch (0: saturation).
    epoch_ms: u64,
    hit_time_limit: bool,
    submit_s: f64,
    load_s: f64,
    completed_jobs: u64,
    epoch_reports: u64,
    epoch_reports_per_s: f64,
    jobs_completed_per_s: f64,
    rpc_errors: u64,
    lease: Latency,
    report_epoch: Latency,
    complete: Latency,
    sweep_status: Latency,
    rss: Vec<RssSample>,
}

/// Counters shared by the simulated workers.
#[derive(Default)]
struct Shared {
    completed: AtomicU64,
    reports: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// Latency samples of one worker (ms).
#[derive(Default)]
struct Samples {
    lease: Vec<f64>,
    report: Vec<f64>,
    complete: Vec<f64>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Builds the specs: sweeps of up to `per_sweep` jobs, each model
/// `rotations` jobs, model kinds cycling rnn, gru, mha.
fn specs(cli: &Cli, data_dir: &Path) -> anyhow::Result<Vec<SweepSpec>> {
    let models_total = cli.jobs.div_ceil(cli.rotations);
    let models_per_sweep = (cli.jobs_per_sweep / cli.rotations).max(1);
    let kinds = [ModelKind::Rnn, ModelKind::Gru, ModelKind::Mha];
    let mut out = Vec::new();
    let mut made = 0;
    while made < models_total {
        let n = models_per_sweep.min(models_total - made);
        let mut models = BTreeMap::new();
        for i in 0..n {
            models.insert(
                format!("m{:05}", made + i),
                ModelSpec::new(kinds[(made + i) % kinds.len()]),
            );
        }
        let spec = SweepSpec {
            name: format!("load-{:03}", out.len()),
            data: DataSpec {
                dir: data_dir.to_path_buf(),
                version: String::new(),
                folds: cli.rotations,
                train_folds: 3,
                rotations: None,
                max_len: Some(256),
            },
            train: TrainSpec {
                epochs: cli.epochs,
                patience: cli.epochs,
                ..TrainSpec::default()
            },
            models,
        };
        spec.validate().context("load spec")?;
        out.push(spec);
        made += n;
    }
    Ok(out)
}

async fn worker(
    mut client: pb::Client,
    id: String,
    epochs: usize,
    epoch_time: Duration,
    start_fraction: f64,
    deadline: Instant,
    shared: Arc<Shared>,
) -> Samples {
    let mut s = Samples::default();
    // Paced workers start spread over one epoch time, as real ones would
    // be after a while, instead of all reporting in the same instant.
    if !epoch_time.is_zero() {
        tokio::time::sleep(epoch_time.mul_f64(start_fraction)).await;
    }
    while Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let lease = client
            .lease_job(pb::LeaseJobRequest {
                worker_id: id.clone(),
                device: "sim".into(),
                ..Default::default()
            })
            .await;
        s.lease.push(ms(t));
        let resp = match lease {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(worker = %id, error = %e, "lease failed");
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        use pb::lease_job_response::Outcome;
        match Outcome::try_from(resp.outcome).unwrap_or(Outcome::Unspecified) {
            Outcome::Leased => {}
            Outcome::Drained => break,
            _ => {
                let wait = u64::from(resp.retry_after_ms).clamp(10, 200);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
        }
        let Some(job) = resp.job else {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let job_ref = pb::JobRef {
            job_id: job.job_id,
            attempt: job.attempt,
            lease_token: job.lease_token.clone(),
        };
        let mut ok = true;
        for epoch in 1..=epochs {
            if Instant::now() >= deadline {
                ok = false;
                break;
            }
            if !epoch_time.is_zero() {
                tokio::time::sleep(epoch_time).await;
            }
            let acc = epoch as f64 / (epochs as f64 + 1.0);
            let t = Instant::now();
            let r = client
                .report_epoch(pb::ReportEpochRequest {
                    job: Some(job_ref.clone()),
                    metrics: Some(pb::EpochMetrics {
                        epoch: epoch as u32,
                        train_loss: 1.0 - acc,
                        train_accuracy: acc,
                        val_loss: 1.0 - acc,
                        val_accuracy: acc,
                        seconds: 1.0,
                        examples_per_second: 1000.0,
                    }),
                })
                .await;
            s.report.push(ms(t));
            match r {
                Ok(_) => {
                    shared.reports.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(worker = %id, job = job.job_id, error = %e, "report failed");
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            continue;
        }
        let t = Instant::now();
        let r = client
            .complete_job(pb::CompleteJobRequest {
                job: Some(job_ref),
                test_accuracy: 0.5,
                test_loss: 0.5,
                labels: vec!["a".into(), "b".into()],
                confusion: vec![1, 0, 0, 1],
                epochs_trained: epochs as u32,
                best_epoch: epochs as u32,
                n_test: 2,
                ..Default::default()
            })
            .await;
        s.complete.push(ms(t));
        match r {
            Ok(_) => {
                shared.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(worker = %id, job = job.job_id, error = %e, "complete failed");
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    s
}

fn default_rotsweep() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("executable has no folder")?;
    let path = dir.join("rotsweep");
    if !path.is_file() {
        bail!(
            "{} is not built; build it (cargo build --release -p rotsweep-coordinator) or pass --rotsweep",
            path.display()
        );
    }
    Ok(path)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.jobs > 0 && cli.workers > 0 && cli.channels > 0 && cli.epochs > 0,
        "--jobs, --workers, --channels and --epochs must be positive"
    );
    anyhow::ensure!(cli.rotations >= 3, "--rotations must be at least 3");
    let bin = match &cli.rotsweep {
        Some(p) => p.clone(),
        None => default_rotsweep()?,
    };
    let (state, temp) = match &cli.state {
        Some(p) => (p.clone(), false),
        None => (
            std::env::temp_dir().join(format!("rotsweep-loadgen-{}", std::process::id())),
            true,
        ),
    };
    anyhow::ensure!(
        !state.exists(),
        "state folder {} already exists; the load needs a fresh one",
        state.display()
    );
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = runtime.block_on(run(&cli, &bin, &state));
    if temp {
        let _ = std::fs::remove_dir_all(&state);
    }
    let report = result?;
    match cli.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Table => print_table(&report),
    }
    Ok(())
}

async fn run(cli: &Cli, bin: &Path, state: &Path) -> anyhow::Result<Report> {
    let serve = Serve::start(bin, state, &cli.serve_log)?;
    tracing::info!(url = %serve.url, pid = serve.child.id(), "coordinator started");
    let mut clients = Vec::with_capacity(cli.channels);
    for _ in 0..cli.channels {
        clients.push(
            pb::connect(&serve.url, None)
                .await
                .with_context(|| format!("connecting to {}", serve.url))?,
        );
    }

    // The data folder is never read by the coordinator; a path under the
    // state folder keeps the spec absolute and harmless.
    let specs = specs(cli, &state.join("no-data"))?;
    let t = Instant::now();
    let mut jobs_submitted = 0;
    let mut sweeps = Vec::new();
    for spec in &specs {
        let r = clients[0]
            .clone()
            .submit_sweep(pb::SubmitSweepRequest {
                spec_json: spec.to_json(),
                new_version: false,
            })
            .await
            .with_context(|| format!("submitting {}", spec.name))?
            .into_inner();
        jobs_submitted += r.n_jobs as usize;
        sweeps.push(r.sweep);
    }
    let submit_s = t.elapsed().as_secs_f64();
    tracing::info!(
        jobs = jobs_submitted,
        sweeps = sweeps.len(),
        submit_s,
        "sweeps submitted"
    );

    let shared = Arc::new(Shared::default());
    let rss = Arc::new(Mutex::new(Vec::new()));
    let sample = |at: String, shared: &Shared| -> anyhow::Result<RssSample> {
        let (rss_kib, hwm_kib) = serve.rss_kib()?;
        Ok(RssSample {
            at,
            completed_jobs: shared.completed.load(Ordering::Relaxed),
            epoch_reports: shared.reports.load(Ordering::Relaxed),
            rss_mib: rss_kib as f64 / 1024.0,
            hwm_mib: hwm_kib as f64 / 1024.0,
        })
    };
    rss.lock()
        .expect("rss lock")
        .push(sample("submitted".into(), &shared)?);

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(cli.time_limit);
    let mut tasks = Vec::with_capacity(cli.workers);
    for i in 0..cli.workers {
        tasks.push(tokio::spawn(worker(
            clients[i % clients.len()].clone(),
            format!("sim-{i:05}"),
            cli.epochs,
            Duration::from_millis(cli.epoch_ms),
            i as f64 / cli.workers as f64,
            deadline,
            shared.clone(),
        )));
    }

    // Side task: SweepStatus of the first sweep, timed.
    let status_task = {
        let mut client = clients[0].clone();
        let sweep = sweeps[0].clone();
        let shared = shared.clone();
        let every = Duration::from_millis(cli.status_every_ms.max(1));
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while !shared.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let t = Instant::now();
                match client
                    .sweep_status(pb::SweepStatusRequest {
                        sweep: sweep.clone(),
                    })
                    .await
                {
                    Ok(_) => lat.push(ms(t)),
                    Err(e) => {
                        tracing::warn!(error = %e, "status failed");
                        errors += 1;
                    }
                }
                tokio::time::sleep(every).await;
            }
            (lat, errors)
        })
    };

    // RSS at checkpoints, polled from the main task.
    let mut pending: Vec<u64> = cli.checkpoints.clone();
    pending.sort_unstable();
    pending.retain(|&c| c as usize <= jobs_submitted);
    let mut all_done = false;
    while !all_done {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let done = shared.completed.load(Ordering::Relaxed);
        while let Some(&c) = pending.first() {
            if done < c {
                break;
            }
            pending.remove(0);
            let s = sample(format!("{c} jobs"), &shared)?;
            rss.lock().expect("rss lock").push(s);
        }
        all_done = tasks.iter().all(|t| t.is_finished());
    }
    let load_s = start.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Relaxed);
    rss.lock()
        .expect("rss lock")
        .push(sample("end".into(), &shared)?);

    let mut samples = Samples::default();
    for t in tasks {
        let s = t.await.context("worker task")?;
        samples.lease.extend(s.lease);
        samples.report.extend(s.report);
        samples.complete.extend(s.complete);
    }
    let (status_lat, status_errors) = status_task.await.context("status task")?;
    let reports = shared.reports.load(Ordering::Relaxed);
    let completed = shared.completed.load(Ordering::Relaxed);
    let rss = rss.lock().expect("rss lock").clone();
    drop(serve);
    Ok(Report {
        jobs_submitted,
        sweeps: sweeps.len(),
        epochs_per_job: cli.epochs,
        workers: cli.workers,
        channels: cli.channels,
        time_limit_s: cli.time_limit,
        epoch_ms: cli.epoch_ms,
        hit_time_limit: Instant::now() >= deadline && (completed as usize) < jobs_submitted,
        submit_s,
        load_s,
        completed_jobs: completed,
        epoch_reports: reports,
        epoch_reports_per_s: reports as f64 / load_s,
        jobs_completed_per_s: completed as f64 / load_s,
        rpc_errors: shared.errors.load(Ordering::Relaxed) + status_errors,
        lease: Latency::of(samples.lease),
        report_epoch: Latency::of(samples.report),
        complete: Latency::of(samples.complete),
        sweep_status: Latency::of(status_lat),
        rss,
    })
}

fn fmt_ms(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn print_table(r: &Report) {
    println!(
        "load: {} jobs in {} sweeps x {} epochs, {} workers on {} channels, {}, limit {:.0} s{}",
        r.jobs_submitted,
        r.sweeps,
        r.epochs_per_job,
        r.workers,
        r.channels,
        if r.epoch_ms == 0 {
            "saturating".to_string()
        } else {
            format!("one report per worker every {} ms", r.epoch_ms)
        },
        r.time_limit_s,
        if r.hit_time_limit {
            " (time limit hit)"
        } else {
            ""
        }
    );
    println!("submit: {:.2} s", r.submit_s);
    println!(
        "ingest: {} epoch reports in {:.1} s = {:.0} reports/s; {} jobs completed ({:.1}/s); {} rpc errors",
        r.epoch_reports,
        r.load_s,
        r.epoch_reports_per_s,
        r.completed_jobs,
        r.jobs_completed_per_s,
        r.rpc_errors
    );
    println!(
        "{:<14} {:>8} {:>9} {:>9} {:>9}",
        "rpc", "n", "p50_ms", "p99_ms", "max_ms"
    );
    for (name, l) in [
        ("LeaseJob", &r.lease),
        ("ReportEpoch", &r.report_epoch),
        ("CompleteJob", &r.complete),
        ("SweepStatus", &r.sweep_status),
    ] {
        println!(
            "{:<14} {:>8} {:>9} {:>9} {:>9}",
            name,
            l.n,
            fmt_ms(l.p50_ms),
            fmt_ms(l.p99_ms),
            fmt_ms(l.max_ms)
        );
    }
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9}",
        "rss at", "jobs", "reports", "rss_MiB", "hwm_MiB"
    );
    for s in &r.rss {
        println!(
            "{:<12} {:>9} {:>9} {:>9.1} {:>9.1}",
            s.at, s.completed_jobs, s.epoch_reports, s.rss_mib, s.hwm_mib
        );
    }
}

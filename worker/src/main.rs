//! `rotsweep-worker`: trains sweep jobs with candle.
//!
//! Subcommands:
//! - `train`: one job without a coordinator, from a sweep spec
//!   (`--spec FILE --model NAME`) or from a data folder with defaults
//!   (`--data DIR --kind gru`). One line (or JSON object) per epoch, then
//!   the test result, on stdout; logs on stderr.
//! - `bench`: times training steps on random tokens (ms/step, as in
//!   research/baselines.md).
//!
//! The CLI parses flags into clap structs, resolves them once into checked
//! plans, then runs. The lease loop (`--coordinator URL`) is a further mode
//! of this same `Cli`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use clap::{Args, Parser, Subcommand, ValueEnum};
use rotsweep_shared::data::load_rotation;
use rotsweep_shared::rng::SplitMix64;
use rotsweep_shared::spec::{DataSpec, ModelKind, ModelSpec, SweepSpec, TrainSpec};
use rotsweep_shared::{out, outln};
use rotsweep_worker::adam::{Adam, AdamConfig};
use rotsweep_worker::attention::AttentionKernel;
use rotsweep_worker::model::{seeded_var_builder, Model};
use rotsweep_worker::recurrent::Recurrence;
use rotsweep_worker::train::{job_seed, train_job, EpochReport, TrainConfig, TrainHooks};
use rotsweep_worker::{parse_device, train::TrainOutcome};

/// Trains rotsweep jobs (sequence classifiers) with candle.
#[derive(Debug, Parser)]
#[command(name = "rotsweep-worker", version)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: lease jobs from a coordinator.
    #[command(flatten)]
    agent: AgentArgs,
}

/// Flags of the default mode, the lease loop.
#[derive(Debug, Args)]
struct AgentArgs {
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
    /// PEM file of the CA that signed the coordinator's certificate, for an
    /// `https://` coordinator (default: the file ROTSWEEP_TLS_CA names, else
    /// the platform's trusted roots).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Name of this worker in leases and status tables (default: host-pid).
    #[arg(long)]
    worker_id: Option<String>,
    /// Only take jobs of this sweep.
    #[arg(long)]
    sweep: Option<String>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Keep polling when the queue is drained instead of exiting.
    #[arg(long)]
    stay: bool,
    /// Checkpoint folder root, when the coordinator's is not visible here
    /// under the same path.
    #[arg(long)]
    checkpoint_root: Option<PathBuf>,
    /// Exit after this many jobs.
    #[arg(long)]
    max_jobs: Option<usize>,
    /// Seconds to wait for any one answer from the coordinator before
    /// retrying on a new connection (calls about a leased job wait at most
    /// a third of the lease).
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    rpc_timeout: f64,
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds")),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train one model on one rotation without a coordinator.
    Train(TrainArgs),
    /// Time training steps of a model on random tokens.
    Bench(BenchArgs),
    /// Print a model's layer table (output shapes, parameter counts) as
    /// built for one rotation's vocabulary, classes and sequence length.
    Summary(SummaryArgs),
}

/// Which job `train` and `summary` work on: a model of a sweep spec, or a
/// model kind at its defaults over a data folder.
#[derive(Debug, Args)]
struct JobSource {
    /// Sweep spec (TOML); use with --model.
    #[arg(long, conflicts_with_all = ["data", "kind"], requires = "model")]
    spec: Option<PathBuf>,
    /// Model name in the spec (a key of its [models] table).
    #[arg(long, requires = "spec")]
    model: Option<String>,
    /// Data folder of pfam_fold_{k}.csv files; all settings at defaults.
    #[arg(long, requires = "kind")]
    data: Option<PathBuf>,
    /// Model kind when reading --data.
    #[arg(long, value_parser = parse_kind)]
    kind: Option<ModelKind>,
    /// Rotation index (its training folds fix the vocabulary and classes).
    #[arg(long, default_value_t = 0)]
    rotation: usize,
    /// Sequence length (overrides the spec; default: longest training
    /// sequence).
    #[arg(long)]
    max_len: Option<usize>,
}

/// A [`JobSource`] read: the model's name, its data (with `--max-len`
/// applied), its settings and the training settings.
struct SourcedJob {
    name: String,
    data: DataSpec,
    model: ModelSpec,
    train: TrainSpec,
}

impl JobSource {
    fn resolve(&self) -> anyhow::Result<SourcedJob> {
        let mut job = match (&self.spec, &self.data, self.kind) {
            (Some(path), _, _) => {
                // Its errors name the file (or the key) themselves.
                let spec = SweepSpec::from_path(path)?;
                let name = self.model.clone().unwrap_or_default();
                let Some(model) = spec.models.get(&name) else {
                    let names: Vec<&str> = spec.models.keys().map(String::as_str).collect();
                    bail!(
                        "spec {} has no model `{name}` (it has: {})",
                        path.display(),
                        names.join(", ")
                    );
                };
                SourcedJob {
                    name,
                    model: model.clone(),
                    data: spec.data,
                    train: spec.train,
                }
            }
            (None, Some(dir), Some(kind)) => SourcedJob {
                name: kind.as_str().to_string(),
                data: DataSpec {
                    dir: dir.clone(),
                    version: String::new(),
                    folds: 5,
                    train_folds: 3,
                    rotations: None,
                    max_len: None,
                },
                model: ModelSpec::new(kind),
                train: TrainSpec::default(),
            },
            _ => bail!("give --spec FILE --model NAME, or --data DIR --kind KIND"),
        };
        if let Some(n) = self.max_len {
            let limit = rotsweep_shared::spec::limits::MAX_LEN;
            if n > limit {
                bail!("--max-len {n} is above the limit of {limit}");
            }
            job.data.max_len = Some(n);
        }
        Ok(job)
    }
}

#[derive(Debug, Args)]
struct SummaryArgs {
    #[command(flatten)]
    source: JobSource,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Output format of `train`, `summary` and `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON: `train` prints one object per epoch, then the result;
    /// `summary` and `bench` print one object.
    Json,
}

#[derive(Debug, Args)]
struct TrainArgs {
    #[command(flatten)]
    source: JobSource,
    /// Maximum epochs (overrides the spec).
    #[arg(long)]
    epochs: Option<usize>,
    /// Steps per epoch (overrides the spec; default one full pass).
    #[arg(long)]
    steps_per_epoch: Option<usize>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Folder for checkpoints; an existing checkpoint there is resumed.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Model kind.
    #[arg(long, value_parser = parse_kind, default_value = "gru")]
    kind: ModelKind,
    /// Sequence length.
    #[arg(long, default_value_t = 256)]
    len: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Output classes.
    #[arg(long, default_value_t = 46)]
    classes: usize,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Recurrence implementation of rnn and gru layers (mha has none).
    #[arg(long, value_enum, default_value_t = KernelArg::Fused)]
    recurrence: KernelArg,
    /// Attention implementation of mha blocks (rnn and gru have none).
    #[arg(long, value_enum, default_value_t = KernelArg::Fused)]
    attention: KernelArg,
    /// Output: one line for people, or one JSON object with the spread.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// `--recurrence` and `--attention` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelArg {
    /// One custom op per layer with a hand-written backward.
    Fused,
    /// Plain candle ops (the reference).
    Composed,
}

/// Tells glibc's allocator to keep freed memory in the heap: no `mmap` per
/// large allocation and no trimming of the heap's top. Training frees and
/// allocates the same large tensor buffers every step; by default each one
/// is unmapped and page-faulted back in, which made candle steps 1.4-2.3x
/// slower (research/baselines.md, "+nommap"). The peak memory is the same;
/// the process just keeps it. `MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_`
/// in the environment still win.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // first thing in main, before any thread exists.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_MAX_").is_none() {
                libc::mallopt(libc::M_MMAP_MAX, 0);
            }
            if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        }
    }
}

fn parse_kind(s: &str) -> Result<ModelKind, String> {
    s.parse()
}

fn main() -> ExitCode {
    keep_freed_buffers();
    let cli = Cli::parse();
    init_logging();

    let result = match cli.command {
        Some(Command::Train(args)) => run_train(args).map(|()| ExitCode::SUCCESS),
        Some(Command::Bench(args)) => run_bench(args).map(|()| ExitCode::SUCCESS),
        Some(Command::Summary(args)) => run_summary(args).map(|()| ExitCode::SUCCESS),
        None => run_agent(cli.agent),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The lease loop: resolves the flags, installs the signal handlers (the
/// first SIGTERM/Ctrl-C stops the current job at a step boundary with a
/// checkpoint and a lease release), and runs until the queue is drained.
/// Exits 1 when none of the jobs it ran completed and at least one failed,
/// so a scheduler sees a worker that did no useful work.
fn run_agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    use rotsweep_worker::agent::{self, AgentConfig};

    let token = rotsweep_proto::auth::Token::load(args.token_file.as_deref())
        .map_err(anyhow::Error::msg)?;
    let tls_ca = rotsweep_proto::tls::load_ca(args.tls_ca.as_deref())?;
    // Check the URL and TLS settings now, before any signal handler or job.
    rotsweep_proto::tls::Remote::new(&args.coordinator, None, tls_ca.as_deref())?;
    let worker_id = args.worker_id.unwrap_or_else(default_worker_id);
    let cfg = AgentConfig {
        coordinator: args.coordinator,
        token,
        tls_ca,
        worker_id,
        sweep: args.sweep,
        device: args.device,
        exit_when_drained: !args.stay,
        checkpoint_root: args.checkpoint_root,
        max_jobs: args.max_jobs,
        rpc_timeout: std::time::Duration::from_secs_f64(args.rpc_timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let tally = runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("stop requested: finishing the current step");
            let _ = stop_tx.send(true);
        });
        agent::run(cfg, stop_rx).await
    })?;
    Ok(if tally.all_failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `hostname-pid`, unique enough to tell workers apart in status tables.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".to_string());
    format!("{host}-{}", std::process::id())
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A `train` invocation after its flags are checked.
struct TrainPlan {
    data: DataSpec,
    model: ModelSpec,
    train: TrainSpec,
    rotation: usize,
    device: Device,
    format: Format,
    checkpoint_dir: Option<PathBuf>,
}

impl TrainPlan {
    fn resolve(args: TrainArgs) -> anyhow::Result<Self> {
        let SourcedJob {
            data,
            model,
            mut train,
            ..
        } = args.source.resolve()?;
        let rotation = args.source.rotation;
        if let Some(epochs) = args.epochs {
            train.epochs = epochs;
        }
        if args.steps_per_epoch.is_some() {
            train.steps_per_epoch = args.steps_per_epoch;
        }
        if train.epochs == 0 || train.steps_per_epoch == Some(0) || data.max_len == Some(0) {
            bail!("--epochs, --steps-per-epoch and --max-len must be positive");
        }
        if rotation >= data.folds {
            bail!("rotation {rotation} is not below folds = {}", data.folds);
        }
        let device = parse_device(&args.device)?;

        Ok(Self {
            data,
            model,
            train,
            rotation,
            device,
            format: args.format,
            checkpoint_dir: args.checkpoint_dir,
        })
    }
}

fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let plan = TrainPlan::resolve(args)?;
    let data = load_rotation(&plan.data, plan.rotation).with_context(|| {
        format!(
            "loading rotation {} of {}",
            plan.rotation,
            plan.data.dir.display()
        )
    })?;
    if let Some((path, line, c)) = &data.oov.first {
        tracing::warn!(
            n_chars = data.oov.n_chars,
            first = %format!("{}:{line}", path.display()),
            character = %c.escape_default(),
            "characters outside the training vocabulary map to OOV"
        );
    }

    let cfg = TrainConfig {
        model: plan.model,
        seed: job_seed(plan.train.seed, plan.rotation),
        train: plan.train,
        device: plan.device,
        checkpoint_dir: plan.checkpoint_dir,
    };
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(Arc::clone(&stop));

    let mut hooks = PrintHooks {
        format: plan.format,
        stop,
        printed_header: false,
    };
    let outcome = train_job(&cfg, &data, &mut hooks).context("training failed")?;
    print_outcome(plan.format, &outcome)
}

/// Sets `stop` on the first SIGINT or SIGTERM; the trainer then finishes its
/// step, checkpoints and returns.
fn watch_signals(stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch signals");
                    return;
                }
            };
            runtime.block_on(async {
                #[cfg(unix)]
                {
                    use tokio::signal::unix::{signal, SignalKind};
                    let Ok(mut term) = signal(SignalKind::terminate()) else {
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                #[cfg(not(unix))]
                {
                    let _ = tokio::signal::ctrl_c().await;
                }
            });
            tracing::warn!("stop requested; finishing the current step");
            stop.store(true, Ordering::SeqCst);
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot watch signals");
    }
}

/// Prints each epoch and polls the stop flag.
struct PrintHooks {
    format: Format,
    stop: Arc<AtomicBool>,
    printed_header: bool,
}

impl PrintHooks {
    fn print_epoch(&mut self, report: &EpochReport) {
        match self.format {
            Format::Table => {
                if !self.printed_header {
                    outln!(
                        "{:>5} {:>10} {:>9} {:>10} {:>9} {:>8} {:>9}",
                        "epoch",
                        "train_loss",
                        "train_acc",
                        "val_loss",
                        "val_acc",
                        "seconds",
                        "ex/s"
                    );
                    self.printed_header = true;
                }
                outln!(
                    "{:>5} {:>10.4} {:>9.4} {:>10.4} {:>9.4} {:>8.2} {:>9.1}",
                    report.epoch,
                    report.train_loss,
                    report.train_accuracy,
                    report.val_loss,
                    report.val_accuracy,
                    report.seconds,
                    report.examples_per_second
                );
            }
            Format::Json => print_json("epoch", report),
        }
        // A closed stdout is not worth failing a training job for.
        let _ = std::io::stdout().flush();
    }
}

impl TrainHooks for PrintHooks {
    fn on_epoch(&mut self, report: &EpochReport) -> ControlFlow<()> {
        self.print_epoch(report);
        ControlFlow::Continue(())
    }

    fn should_stop(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn on_resume(&mut self, reports: &[EpochReport]) {
        for report in reports {
            self.print_epoch(report);
        }
    }
}

/// One JSON line: the value's fields plus `"type": kind`.
fn print_json<T: serde::Serialize>(kind: &str, value: &T) {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.insert("type".into(), kind.into());
            outln!("{}", serde_json::Value::Object(fields));
        }
        Ok(other) => outln!("{other}"),
        Err(error) => tracing::error!(%error, "cannot serialise {kind}"),
    }
}

fn print_outcome(format: Format, outcome: &TrainOutcome) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            outln!(
                "test accuracy {:.4} (loss {:.4}, n = {}, best epoch {} of {}{})",
                outcome.test_accuracy,
                outcome.test_loss,
                outcome.n_test,
                outcome.best_epoch,
                outcome.epochs_trained,
                if outcome.stopped_early {
                    ", stopped early"
                } else {
                    ""
                }
            );
        }
        Format::Json => {
            #[derive(serde::Serialize)]
            struct ResultLine<'a> {
                test_accuracy: f64,
                test_loss: f64,
                n_test: usize,
                epochs_trained: usize,
                best_epoch: usize,
                stopped_early: bool,
                n_params: usize,
                labels: &'a [String],
                confusion: &'a [Vec<u64>],
            }
            print_json(
                "result",
                &ResultLine {
                    test_accuracy: outcome.test_accuracy,
                    test_loss: outcome.test_loss,
                    n_test: outcome.n_test,
                    epochs_trained: outcome.epochs_trained,
                    best_epoch: outcome.best_epoch,
                    stopped_early: outcome.stopped_early,
                    n_params: outcome.n_params,
                    labels: &outcome.labels,
                    confusion: &outcome.confusion,
                },
            );
        }
    }
    std::io::stdout().flush().context("writing to stdout")
}

/// Builds the model on the CPU, exactly as a job of this rotation would,
/// and prints its layer table.
fn run_summary(args: SummaryArgs) -> anyhow::Result<()> {
    let SourcedJob {
        name, data, model, ..
    } = args.source.resolve()?;
    let rotation = load_rotation(&data, args.source.rotation).with_context(|| {
        format!(
            "loading rotation {} of {}",
            args.source.rotation,
            data.dir.display()
        )
    })?;
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 0, &Device::Cpu);
    let built = Model::new(
        &model,
        rotation.vocab.size(),
        rotation.labels.len(),
        rotation.max_len,
        vb,
    )?;
    let layers = built.layers();

    match args.format {
        Format::Table => {
            outln!(
                "model {name} ({}), rotation {}: vocabulary {}, {} classes, sequence length {}",
                model.kind.as_str(),
                args.source.rotation,
                rotation.vocab.size(),
                rotation.labels.len(),
                rotation.max_len
            );
            out!("{}", rotsweep_shared::architecture::to_table(&layers));
        }
        Format::Json => outln!(
            "{}",
            serde_json::json!({
                "model": name,
                "kind": model.kind.as_str(),
                "rotation": args.source.rotation,
                "vocab_size": rotation.vocab.size(),
                "n_classes": rotation.labels.len(),
                "max_len": rotation.max_len,
                "n_params": built.n_params(),
                "layers": layers,
            })
        ),
    }
    std::io::stdout().flush().context("writing to stdout")
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    if args.batch == 0 || args.steps == 0 {
        bail!("--batch and --steps must be positive");
    }
    use rotsweep_shared::spec::limits;
    if args.len > limits::MAX_LEN || args.batch > limits::BATCH {
        bail!(
            "--len and --batch are limited to {} and {}",
            limits::MAX_LEN,
            limits::BATCH
        );
    }
    let vocab = 27;
    let spec = ModelSpec::new(args.kind);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 42, &device);
    let recurrence = match args.recurrence {
        KernelArg::Fused => Recurrence::Fused,
        KernelArg::Composed => Recurrence::Composed,
    };
    let attention = match args.attention {
        KernelArg::Fused => AttentionKernel::Fused,
        KernelArg::Composed => AttentionKernel::Composed,
    };
    let model = Model::new(&spec, vocab, args.classes, args.len, vb)
        .with_context(|| format!("--len {}", args.len))?
        .with_recurrence(recurrence)
        .with_attention(attention);
    let mut adam = Adam::new(&varmap, AdamConfig::default())?;

    // Random tokens 2..vocab and labels, as in the baselines.
    let mut rng = SplitMix64::new(7);
    let tokens: Vec<u32> = (0..args.batch * args.len)
        .map(|_| 2 + rng.below(vocab as u64 - 2) as u32)
        .collect();
    let labels: Vec<u32> = (0..args.batch)
        .map(|_| rng.below(args.classes as u64) as u32)
        .collect();
    let tokens = Tensor::from_vec(tokens, (args.batch, args.len), &device)?;
    let labels = Tensor::from_vec(labels, args.batch, &device)?;

    let mut step = || -> anyhow::Result<f64> {
        let started = Instant::now();
        let logits = model.forward(&tokens, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        adam.backward_step(&loss)?;
        device.synchronize()?;
        Ok(started.elapsed().as_secs_f64() * 1e3)
    };
    for _ in 0..args.warmup {
        step()?;
    }
    let mut train_ms = (0..args.steps)
        .map(|_| step())
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut infer_ms = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let started = Instant::now();
        model.forward(&tokens, false)?;
        device.synchronize()?;
        infer_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }

    let (train, infer) = (Spread::of(&mut train_ms), Spread::of(&mut infer_ms));
    match args.format {
        Format::Table => outln!(
            "{} L={} batch={} params={}: train {:.1} ms/step (median of {}, {:.1}-{:.1}), \
             infer {:.1} ms/batch ({:.1}-{:.1})",
            args.kind.as_str(),
            args.len,
            args.batch,
            model.n_params(),
            train.median,
            args.steps,
            train.min,
            train.max,
            infer.median,
            infer.min,
            infer.max
        ),
        Format::Json => outln!(
            "{}",
            serde_json::json!({
                "framework": "candle",
                "kind": args.kind.as_str(),
                "len": args.len,
                "batch": args.batch,
                "params": model.n_params(),
                "steps": args.steps,
                "train_ms": train.median,
                "train_ms_min": train.min,
                "train_ms_max": train.max,
                "infer_ms": infer.median,
                "infer_ms_min": infer.min,
                "infer_ms_max": infer.max,
            })
        ),
    }
    Ok(())
}

/// Median and range of timed repetitions.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(xs: &mut [f64]) -> Self {
        xs.sort_by(f64::total_cmp);
        Self {
            median: xs[xs.len() / 2],
            min: xs[0],
            max: xs[xs.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn resolve(args: &[&str]) -> anyhow::Result<TrainPlan> {
        let cli = Cli::try_parse_from(args)?;
        match cli.command {
            Some(Command::Train(args)) => TrainPlan::resolve(args),
            _ => bail!("not a train command"),
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn train_from_a_data_folder_uses_defaults_and_overrides() -> anyhow::Result<()> {
        let plan = resolve(&[
            "rotsweep-worker",
            "train",
            "--data",
            "examples/data/pfam-real",
            "--kind",
            "mha",
            "--rotation",
            "2",
            "--max-len",
            "128",
            "--epochs",
            "3",
            "--format",
            "json",
        ])?;
        assert_eq!(plan.model, ModelSpec::new(ModelKind::Mha));
        assert_eq!((plan.rotation, plan.data.max_len), (2, Some(128)));
        assert_eq!(plan.train.epochs, 3);
        assert_eq!(plan.train.batch_size, TrainSpec::default().batch_size);
        assert_eq!(plan.format, Format::Json);
        assert!(plan.device.is_cpu());
        Ok(())
    }

    #[test]
    fn bad_train_flags_are_explained() {
        let err = |args: &[&str]| resolve(args).err().map(|e| format!("{e:#}"));
        let missing_kind = err(&["w", "train", "--data", "d"]).unwrap_or_default();
        assert!(missing_kind.contains("--kind"), "{missing_kind}");
        let both = err(&["w", "train", "--spec", "s", "--model", "m", "--data", "d"]);
        assert!(both.is_some());
        let rotation = err(&[
            "w",
            "train",
            "--data",
            "d",
            "--kind",
            "gru",
            "--rotation",
            "5",
        ])
        .unwrap_or_default();
        assert!(rotation.contains("rotation 5"), "{rotation}");
        let spec = err(&[
            "w",
            "train",
            "--spec",
            "/nonexistent/spec.toml",
            "--model",
            "m",
        ])
        .unwrap_or_default();
        assert!(spec.contains("/nonexistent/spec.toml"), "{spec}");
    }
}

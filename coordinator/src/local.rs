//! `rotsweep run`: a whole sweep on one machine. Starts an embedded
//! coordinator on an ephemeral loopback port with a fresh random token,
//! launches N `rotsweep-worker` processes against it, logs progress from the
//! live event stream, and ends with the summary.
//!
//! The state directory is the same as `serve`'s, so an interrupted run is
//! resumed by running the same command again (completed jobs are kept), and
//! the result can be queried later with `serve --state DIR`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use rotsweep_proto::auth::{Token, TOKEN_ENV};
use rotsweep_shared::spec::SweepSpec;
use rotsweep_shared::summary::Summary;
use tokio::process::{Child, Command};
use tokio::sync::broadcast::error::RecvError;

use crate::progress::{Bars, Target};
use crate::server::{self, ServerConfig};
use crate::service::Event;
use crate::store::{state, QuarantinePolicy, StoreError};

/// Settings of a local run, resolved from the command line.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The loaded spec (data dir already absolute).
    pub spec: SweepSpec,
    /// State directory (SQLite, checkpoints, summary.json).
    pub state_dir: PathBuf,
    /// Number of worker processes.
    pub n_workers: usize,
    /// Path of the `rotsweep-worker` binary.
    pub worker_bin: PathBuf,
    /// Lease duration.
    pub lease_ttl: Duration,
    /// Store a changed spec under the same name as a new version.
    pub new_version: bool,
    /// Compute threads per worker.
    pub threads_per_worker: usize,
    /// Draw progress bars on stderr (a terminal) instead of one log line
    /// per event; the workers then log into `STATE/logs/` so their lines do
    /// not tear the bars.
    pub progress: bool,
}

/// How a local run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// The final summary.
    pub summary: Summary,
    /// Jobs that did not complete with a valid metric, as (model, rotation,
    /// state, last error).
    pub unfinished: Vec<(String, u32, String, String)>,
    /// Where summary.json was written.
    pub summary_path: PathBuf,
}

/// Finds `rotsweep-worker`: `ROTSWEEP_WORKER_BIN`, else next to this binary,
/// else on `PATH`.
pub fn find_worker_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("ROTSWEEP_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the rotsweep binary")?;
    if let Some(dir) = exe.parent() {
        for candidate in [dir.join("rotsweep-worker"), dir.join("../rotsweep-worker")] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("rotsweep-worker");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "cannot find the rotsweep-worker binary next to {} or on PATH \
         (build it with `cargo build --release --workspace`, or set ROTSWEEP_WORKER_BIN)",
        exe.display()
    )
}

/// A worker process that is killed (with its process group) if dropped
/// while still running.
struct WorkerProcess {
    id: String,
    child: Child,
}

impl WorkerProcess {
    fn pid(&self) -> Option<i32> {
        self.child.id().map(|p| p as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) with a pid we spawned; a stale pid at worst
            // yields ESRCH, which is ignored.
            unsafe {
                libc::kill(-pid, sig);
            }
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
        }
    }
}

fn spawn_worker(
    cfg: &RunConfig,
    url: &str,
    sweep: &str,
    token: &Token,
    i: usize,
) -> anyhow::Result<WorkerProcess> {
    let id = format!("local-{i}");
    let mut cmd = Command::new(&cfg.worker_bin);
    cmd.args(["--coordinator", url, "--sweep", sweep, "--worker-id", &id])
        .env(TOKEN_ENV, token.expose())
        // The embedded coordinator speaks plain text on loopback: a CA meant
        // for a remote coordinator does not apply.
        .env_remove(rotsweep_proto::tls::CA_ENV)
        .env("RAYON_NUM_THREADS", cfg.threads_per_worker.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(worker_stderr(cfg, &id)?)
        // Own process group: Ctrl-C reaches only `run`, which then stops the
        // workers gracefully with SIGTERM.
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting worker {}", cfg.worker_bin.display()))?;
    Ok(WorkerProcess { id, child })
}

/// Where a worker's log goes: this process's stderr, or with progress bars
/// `STATE/logs/ID.log` (appended, so a resumed run keeps the history).
fn worker_stderr(cfg: &RunConfig, id: &str) -> anyhow::Result<Stdio> {
    if !cfg.progress {
        return Ok(Stdio::inherit());
    }
    let dir = cfg.state_dir.join("logs");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{id}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(Stdio::from(file))
}

/// Runs a sweep to completion on this machine.
pub async fn run(cfg: RunConfig) -> anyhow::Result<RunOutcome> {
    // Check every rotation's data before starting anything, so bad input
    // fails fast with the file and line at fault.
    check_data(&cfg.spec)?;

    let token = Token::generate().context("generating a token for the local workers")?;
    let server = server::start(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("a valid literal address"),
        state_dir: cfg.state_dir.clone(),
        token: Some(token.clone()),
        lease_ttl: cfg.lease_ttl,
        tls: None,
        insecure_no_tls: false,
        // Local workers share one machine: quarantining one would only
        // slow the sweep down, since the others see the same failures.
        quarantine: QuarantinePolicy {
            after: 0,
            ..QuarantinePolicy::default()
        },
    })
    .await?;
    let store = server.service.store().clone();

    let submitted = match store.submit(&cfg.spec, cfg.new_version) {
        Ok(s) => s,
        Err(e @ StoreError::SpecConflict(_)) => {
            server.shutdown().await?;
            return Err(anyhow::Error::new(e).context(format!(
                "state directory {} already holds sweep `{}`",
                cfg.state_dir.display(),
                cfg.spec.name
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let sweep = submitted.sweep.clone();
    if submitted.created {
        tracing::info!(%sweep, n_jobs = submitted.n_jobs, "sweep created");
    } else {
        tracing::info!(%sweep, "sweep already stored with this spec: resuming");
    }

    let mut events = server.service.subscribe();
    let mut workers = Vec::new();
    if !store.is_finished(&sweep)? {
        for i in 0..cfg.n_workers {
            workers.push(spawn_worker(&cfg, &server.url(), &sweep, &token, i)?);
        }
        tracing::info!(n_workers = workers.len(), url = %server.url(), "workers started");
    }

    let jobs = store.jobs(&sweep, 0)?;
    let names = job_names(&jobs);
    let total_epochs = cfg.spec.train.epochs;
    let mut bars = cfg.progress.then(|| {
        let n_done = jobs.iter().filter(|j| state::is_final(&j.state)).count();
        Bars::new(
            Target::Stderr,
            jobs.len(),
            n_done,
            total_epochs,
            names.clone(),
        )
    });
    if bars.is_some() && !workers.is_empty() {
        tracing::info!(dir = %cfg.state_dir.join("logs").display(), "worker logs");
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut interrupted = false;

    while !store.is_finished(&sweep)? {
        tokio::select! {
            event = events.recv() => match event {
                Ok(e) => match bars.as_mut() {
                    Some(b) => show_event(b, &e, &names),
                    None => log_event(&e, &names, total_epochs),
                },
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(n_missed = n, "progress events skipped")
                }
                Err(RecvError::Closed) => bail!("the embedded coordinator stopped"),
            },
            _ = tick.tick() => {
                // Keep the workers still running; note the ones that failed.
                workers.retain_mut(|w| match w.child.try_wait() {
                    Ok(None) => true,
                    Ok(Some(status)) => {
                        if !status.success() {
                            tracing::warn!(
                                worker_id = %w.id,
                                %status,
                                "worker exited with failure"
                            );
                        }
                        false
                    }
                    Err(_) => false,
                });
                if workers.is_empty() && !store.is_finished(&sweep)? {
                    server.shutdown().await?;
                    bail!(
                        "every worker exited before sweep `{sweep}` finished (see the log above); \
                         run the same command again to resume"
                    );
                }
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::warn!("interrupted: stopping workers (they checkpoint first)");
                interrupted = true;
                break;
            }
        }
    }

    if let Some(b) = bars.take() {
        b.finish();
    }
    stop_workers(workers, interrupted).await;
    if interrupted {
        server.shutdown().await?;
        bail!("interrupted; run the same command again to resume sweep `{sweep}`");
    }

    let summary = store.summary(&sweep)?;
    let unfinished = store
        .jobs(&sweep, 0)?
        .into_iter()
        .filter(|j| j.state != state::COMPLETED)
        .map(|j| (j.model, j.rotation, j.state, j.last_error))
        .collect();
    let summary_path = cfg.state_dir.join("summary.json");
    write_json(&summary_path, &summary)?;
    server.shutdown().await?;
    Ok(RunOutcome {
        summary,
        unfinished,
        summary_path,
    })
}

/// Loads every rotation of the spec's data the way a worker will, so a
/// missing or malformed fold, an empty fold or a label found only outside
/// training fails here with the file and line, before any job is stored.
/// Characters outside the vocabulary are legal (they map to OOV) but are
/// logged once with their first location.
pub fn check_data(spec: &SweepSpec) -> anyhow::Result<()> {
    let mut warned = false;
    for r in spec.rotations() {
        let data = rotsweep_shared::data::load_rotation(&spec.data, r)
            .with_context(|| format!("checking the data of rotation {r}"))?;
        if let (false, Some((path, line, c))) = (warned, &data.oov.first) {
            tracing::warn!(
                rotation = r,
                n_chars = data.oov.n_chars,
                first = %format!("{}:{line} {c:?}", path.display()),
                "characters that are not upper-case amino-acid codes map to OOV"
            );
            warned = true;
        }
    }
    Ok(())
}

/// Writes `value` as pretty JSON, atomically (temp file + rename).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(value).context("serialising JSON")?;
    std::fs::write(&tmp, text + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

async fn stop_workers(mut workers: Vec<WorkerProcess>, interrupted: bool) {
    if interrupted {
        for w in &workers {
            w.signal(libc::SIGTERM);
        }
    }
    // Workers leave by themselves once the queue is drained; give them time
    // to finish a checkpoint after SIGTERM, then kill what is left.
    let grace = if interrupted {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(15)
    };
    for w in workers.iter_mut() {
        if tokio::time::timeout(grace, w.child.wait()).await.is_err() {
            tracing::warn!(worker_id = %w.id, "worker did not exit in time; killing it");
            w.signal(libc::SIGKILL);
            let _ = w.child.wait().await;
        }
    }
}

fn job_names(jobs: &[crate::store::JobView]) -> std::collections::HashMap<i64, String> {
    jobs.iter()
        .map(|j| (j.job_id, format!("{}/rot{}", j.model, j.rotation)))
        .collect()
}

fn show_event(bars: &mut Bars, e: &Event, names: &std::collections::HashMap<i64, String>) {
    match e {
        Event::Leased {
            job_id,
            attempt,
            worker_id,
            model,
            rotation,
            ..
        } => {
            let name = names
                .get(job_id)
                .cloned()
                .unwrap_or_else(|| format!("{model}/rot{rotation}"));
            bars.leased(*job_id, &name, *attempt, worker_id);
        }
        Event::Epoch {
            job_id, metrics, ..
        } => bars.epoch(
            *job_id,
            metrics.epoch,
            metrics.val_accuracy,
            metrics.seconds,
        ),
        Event::Finished {
            job_id,
            state,
            detail,
            ..
        } => bars.finished(*job_id, state, detail),
    }
}

fn log_event(e: &Event, names: &std::collections::HashMap<i64, String>, total_epochs: usize) {
    let name = |id: &i64| {
        names
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("job {id}"))
    };
    match e {
        Event::Leased {
            job_id,
            attempt,
            worker_id,
            ..
        } => tracing::info!(job = %name(job_id), attempt, %worker_id, "job started"),
        Event::Epoch {
            job_id, metrics, ..
        } => tracing::info!(
            job = %name(job_id),
            epoch = format!("{}/{}", metrics.epoch, total_epochs),
            loss = format!("{:.4}", metrics.train_loss),
            acc = format!("{:.4}", metrics.train_accuracy),
            val_loss = format!("{:.4}", metrics.val_loss),
            val_acc = format!("{:.4}", metrics.val_accuracy),
            secs = format!("{:.1}", metrics.seconds),
            "epoch"
        ),
        Event::Finished {
            job_id,
            state,
            detail,
            ..
        } => tracing::info!(job = %name(job_id), %state, %detail, "job finished"),
    }
}

/// Writes a small text file atomically (temp file + rename), so a reader
/// polling for it never sees it half-written.
pub fn write_text(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

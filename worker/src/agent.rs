//! The lease loop: a worker asks the coordinator for a job, trains it while
//! heartbeating and streaming one report per epoch, then completes or fails
//! it, until the queue is drained or the worker is told to stop.
//!
//! Training runs on a blocking thread; the async side owns the connection.
//! Three things stop a running job at its next step boundary:
//! - the coordinator answers a heartbeat or report with `cancel` (the sweep
//!   was cancelled): the job is reported as cancelled;
//! - the coordinator refuses a message as stale (another attempt owns the
//!   job now): the job is abandoned without another word;
//! - SIGTERM/Ctrl-C: the trainer writes a checkpoint, the lease is released
//!   (the job is re-queued at once without using up an attempt), and the
//!   worker exits 0.
//!
//! The loop's last log line counts the jobs it leased by how they ended
//! ([`Tally`]); the worker exits 1 when it ran jobs and none completed
//! but some failed ([`Tally::all_failed`]).
//!
//! Transient RPC failures (coordinator restarting, network cut) are retried
//! with capped exponential backoff; re-sent reports are harmless because the
//! coordinator stores each (job, attempt, epoch) once. Every call has a
//! deadline (see [`Link`]): a call that neither fails nor answers, as on a
//! connection that went silent, is abandoned, the channel is dropped and the
//! retry dials a new one. Heartbeats go on
//! until the attempt's final message is acknowledged, so a worker that
//! waits out a coordinator restart keeps its lease.
//!
//! Checkpoints: attempt K of job N trains in `JOB_DIR/attempt-K` (JOB_DIR is
//! the folder the lease names, or `--checkpoint-root/job-N`), seeded with
//! the newest checkpoint an earlier attempt left (see `attempt_folder`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rotsweep_proto as pb;
use rotsweep_proto::auth::Token;
use rotsweep_shared::spec::SweepSpec;
use tokio::sync::{mpsc, watch};
use tonic::Code;

use crate::train::{self, EpochReport, TrainConfig, TrainHooks, TrainOutcome};

/// Settings of the lease loop.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator URL (`http://host:port` or `https://host:port`).
    pub coordinator: String,
    /// Bearer token.
    pub token: Option<Token>,
    /// PEM certificates of a private CA for an `https://` coordinator
    /// (`None`: the platform's trusted roots).
    pub tls_ca: Option<Vec<u8>>,
    /// This worker's name in leases and status tables.
    pub worker_id: String,
    /// Only take jobs of this sweep.
    pub sweep: Option<String>,
    /// Device to train on (`cpu`, `cuda:N`).
    pub device: String,
    /// Exit when the coordinator says nothing is queued or running.
    pub exit_when_drained: bool,
    /// Override of the coordinator's checkpoint folder root (for workers
    /// that see the shared filesystem under another path).
    pub checkpoint_root: Option<PathBuf>,
    /// Stop after this many jobs (any outcome).
    pub max_jobs: Option<usize>,
    /// Longest wait for any one answer from the coordinator. Calls about a
    /// leased job wait at most a third of the lease (at least 1 s), so a
    /// hung call is retried on a new connection while the lease holds.
    pub rpc_timeout: Duration,
}

/// The worker's connection to the coordinator.
///
/// A tonic channel can stop answering without failing: a connection that
/// went silent mid-handshake, or one a middlebox black-holed, leaves calls
/// pending. Each call therefore runs under a deadline; one that overruns it
/// fails with `DEADLINE_EXCEEDED` (a transient error, so it is retried) and
/// swaps the channel for a new one that dials on its next call.
#[derive(Clone)]
struct Link {
    remote: rotsweep_proto::tls::Remote,
    client: Arc<std::sync::Mutex<pb::Client>>,
    deadline: Duration,
}

impl Link {
    fn new(remote: rotsweep_proto::tls::Remote, client: pb::Client, deadline: Duration) -> Self {
        Self {
            remote,
            client: Arc::new(std::sync::Mutex::new(client)),
            deadline,
        }
    }

    /// The same connection with another deadline.
    fn with_deadline(&self, deadline: Duration) -> Self {
        Self {
            deadline,
            ..self.clone()
        }
    }

    fn client(&self) -> pb::Client {
        self.client.lock().expect("link lock").clone()
    }

    /// Runs one call under the deadline.
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<tonic::Response<T>, tonic::Status>
    where
        F: FnOnce(pb::Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.deadline, f(self.client())).await {
            Ok(answer) => answer,
            Err(_) => {
                tracing::debug!(rpc = what, deadline = ?self.deadline, "no answer; redialling");
                *self.client.lock().expect("link lock") = self.remote.connect_lazy();
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {:.1} s",
                    self.deadline.as_secs_f64()
                )))
            }
        }
    }
}

/// Flags the trainer polls between steps.
#[derive(Debug, Default)]
struct StopFlags {
    /// The worker is shutting down (signal).
    shutdown: AtomicBool,
    /// The sweep was cancelled.
    cancelled: AtomicBool,
    /// Another attempt owns the job.
    stale: AtomicBool,
    /// Training is over and the final message (complete or fail) is on its
    /// way; a heartbeat refused from now on only raced with it. Not a stop
    /// reason.
    finishing: AtomicBool,
}

impl StopFlags {
    fn any(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
            || self.cancelled.load(Ordering::SeqCst)
            || self.stale.load(Ordering::SeqCst)
    }
}

/// Hooks that forward epoch reports to the async side.
struct ChannelHooks {
    reports: mpsc::UnboundedSender<EpochReport>,
    flags: Arc<StopFlags>,
}

impl TrainHooks for ChannelHooks {
    fn on_epoch(&mut self, report: &EpochReport) -> std::ops::ControlFlow<()> {
        // The receiver only goes away when the job is being torn down.
        let _ = self.reports.send(report.clone());
        if self.flags.any() {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    }

    fn should_stop(&mut self) -> bool {
        self.flags.any()
    }

    fn on_resume(&mut self, reports: &[EpochReport]) {
        // Re-send what the checkpoint holds: if the previous attempt died
        // before its reports arrived, this fills the gap; otherwise the new
        // attempt's rows simply take over the same epochs.
        for r in reports {
            let _ = self.reports.send(r.clone());
        }
    }
}

/// The deadline of calls about a job leased for `ttl`: a third of the lease,
/// at least 1 s, at most `cap`.
fn job_deadline(ttl: Duration, cap: Duration) -> Duration {
    (ttl / 3).max(Duration::from_secs(1)).min(cap)
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(6)).min(5_000))
}

fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Aborted
            | Code::Cancelled
    )
}

/// Sleeps for `d` unless `stop` fires first; returns true when stopped. A
/// `stop` whose sender is gone can never fire: the whole `d` is slept.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let sleep = tokio::time::sleep(d);
    tokio::pin!(sleep);
    let fired = tokio::select! {
        _ = &mut sleep => None,
        fired = stop.wait_for(|s| *s) => Some(fired.is_ok()),
    };
    match fired {
        Some(true) => return true,
        Some(false) => sleep.await,
        None => {}
    }
    *stop.borrow()
}

/// Connects, retrying with backoff until connected or stopped.
async fn connect(
    cfg: &AgentConfig,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Link>> {
    // A bad URL or CA is a configuration error: fail at once, no retries.
    let remote = rotsweep_proto::tls::Remote::new(
        &cfg.coordinator,
        cfg.token.clone(),
        cfg.tls_ca.as_deref(),
    )?;
    let mut tries = 0;
    loop {
        let dialled = tokio::time::timeout(cfg.rpc_timeout, remote.connect()).await;
        let dialled = dialled
            .unwrap_or_else(|_| Err(rotsweep_proto::tls::ConnectError::Timeout(cfg.rpc_timeout)));
        match dialled {
            Ok(client) => return Ok(Some(Link::new(remote, client, cfg.rpc_timeout))),
            Err(e) => {
                tries += 1;
                if tries == 1 || tries % 10 == 0 {
                    tracing::warn!(url = %cfg.coordinator, error = %e, tries, "cannot reach the coordinator; retrying");
                }
                if tries > 600 {
                    anyhow::bail!(
                        "gave up reaching the coordinator at {} after {tries} tries",
                        cfg.coordinator
                    );
                }
                if sleep_or_stop(backoff(tries), stop).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Calls `f` until it succeeds, fails permanently, or the worker stops.
/// Returns `Ok(None)` when stopped while retrying.
async fn with_retry<T, F, Fut>(
    what: &str,
    link: &Link,
    stop: Option<&mut watch::Receiver<bool>>,
    mut f: F,
) -> Result<Option<T>, tonic::Status>
where
    F: FnMut(pb::Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    // Without a stop signal, retry until the call succeeds or fails for good.
    let (_never_tx, mut never) = watch::channel(false);
    let stop = stop.unwrap_or(&mut never);
    let mut tries = 0;
    loop {
        match link.call(what, &mut f).await {
            Ok(resp) => return Ok(Some(resp.into_inner())),
            Err(status) if is_transient(&status) => {
                tries += 1;
                if tries == 1 || tries % 10 == 0 {
                    tracing::warn!(rpc = what, code = ?status.code(), error = %status.message(), tries, "coordinator unreachable; retrying");
                }
                if tries > 1_000 {
                    return Err(status);
                }
                if sleep_or_stop(backoff(tries), stop).await {
                    return Ok(None);
                }
            }
            Err(status) => return Err(status),
        }
    }
}

/// How one leased attempt ended, as this worker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobEnd {
    /// The coordinator accepted its result.
    Completed,
    /// It failed on this worker: an error, a non-finite loss, bad input, or
    /// a job that could not start.
    Failed,
    /// It stopped for a reason outside the job: the sweep was cancelled,
    /// the worker was told to stop (the lease was released), or another
    /// attempt took the job over (stale lease, refused result).
    Interrupted,
}

/// What the lease loop did: the jobs it leased, counted by how each ended.
/// It decides the worker's exit status ([`Tally::all_failed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Jobs whose result the coordinator accepted.
    pub n_completed: usize,
    /// Jobs that failed on this worker.
    pub n_failed: usize,
    /// Jobs cancelled, released on a stop signal, or lost to another
    /// attempt: not the job's fault, and not this worker's.
    pub n_interrupted: usize,
}

impl Tally {
    /// Every job leased, whatever its end.
    pub fn n_jobs(&self) -> usize {
        self.n_completed + self.n_failed + self.n_interrupted
    }

    /// True when the worker ran jobs, none completed and at least one
    /// failed: the worker exits 1 then, so Slurm, Kubernetes and scripts
    /// see that it did no useful work. Interrupted jobs alone (a SIGTERM in
    /// the first job, a cancelled sweep) are not a failure, and neither is
    /// finding nothing to do.
    pub fn all_failed(&self) -> bool {
        self.n_completed == 0 && self.n_failed > 0
    }

    fn add(&mut self, end: JobEnd) {
        match end {
            JobEnd::Completed => self.n_completed += 1,
            JobEnd::Failed => self.n_failed += 1,
            JobEnd::Interrupted => self.n_interrupted += 1,
        }
    }

    /// `N jobs: X completed, Y failed, Z interrupted`.
    fn line(&self) -> String {
        let n = self.n_jobs();
        format!(
            "{n} {}: {} completed, {} failed, {} interrupted",
            if n == 1 { "job" } else { "jobs" },
            self.n_completed,
            self.n_failed,
            self.n_interrupted
        )
    }
}

/// Runs the lease loop until drained (when asked to exit then), `max_jobs`
/// is reached, or `stop` fires; returns what it did, which its last log
/// line also says (on an error too).
pub async fn run(cfg: AgentConfig, stop: watch::Receiver<bool>) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let result = lease_loop(&cfg, stop, &mut tally).await;
    // A worker that failed before any job (a refused token) has only its
    // error to say.
    if result.is_ok() || tally.n_jobs() > 0 {
        if tally.all_failed() {
            tracing::error!("{}; none completed, exiting with status 1", tally.line());
        } else {
            tracing::info!("{}", tally.line());
        }
    }
    result.map(|()| tally)
}

async fn lease_loop(
    cfg: &AgentConfig,
    mut stop: watch::Receiver<bool>,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let device = crate::parse_device(&cfg.device)?;
    let Some(link) = connect(cfg, &mut stop).await? else {
        return Ok(());
    };
    // A channel is only a transport: the coordinator may still refuse the
    // token, so "connected" waits for its first answer.
    tracing::debug!(url = %cfg.coordinator, "channel to the coordinator open");

    let mut accepted = false;
    let mut quarantined = false;
    let mut request_ids = RequestIds::new();
    while !*stop.borrow() {
        if cfg.max_jobs.is_some_and(|m| tally.n_jobs() >= m) {
            break;
        }
        // One id per request, kept by its retries: a retry whose first
        // answer was lost gets the lease that answer carried.
        let request = pb::LeaseJobRequest {
            worker_id: cfg.worker_id.clone(),
            sweep: cfg.sweep.clone().unwrap_or_default(),
            device: cfg.device.clone(),
            request_id: request_ids.next(),
        };
        let lease = with_retry("LeaseJob", &link, Some(&mut stop), |mut c| {
            let request = request.clone();
            async move { c.lease_job(request).await }
        })
        .await
        .map_err(|s| anyhow::anyhow!("LeaseJob failed: {:?}: {}", s.code(), s.message()))?;
        let Some(lease) = lease else { break };
        if !accepted {
            tracing::info!(worker_id = %cfg.worker_id, url = %cfg.coordinator, "worker connected");
            accepted = true;
        }

        use pb::lease_job_response::Outcome;
        match Outcome::try_from(lease.outcome).unwrap_or(Outcome::Unspecified) {
            Outcome::Leased => {
                let job = lease.job.context("LEASED answer without a job")?;
                quarantined = false;
                match run_job(cfg, &link, job, device.clone(), &stop).await {
                    Ok(end) => tally.add(end),
                    Err(e) => {
                        tally.add(JobEnd::Failed);
                        return Err(e);
                    }
                }
            }
            Outcome::Quarantined => {
                if !quarantined {
                    tracing::warn!(
                        reason = %lease.reason,
                        "quarantined by the coordinator: no jobs until the cool-down ends"
                    );
                    quarantined = true;
                }
                let wait = Duration::from_millis(u64::from(lease.retry_after_ms.max(100)));
                if sleep_or_stop(wait, &mut stop).await {
                    break;
                }
            }
            Outcome::Wait => {
                let wait = Duration::from_millis(u64::from(lease.retry_after_ms.max(100)));
                if sleep_or_stop(wait, &mut stop).await {
                    break;
                }
            }
            Outcome::Drained if cfg.exit_when_drained => {
                tracing::info!(n_jobs = tally.n_jobs(), "queue drained; worker exiting");
                break;
            }
            Outcome::Drained | Outcome::Unspecified => {
                if sleep_or_stop(Duration::from_secs(2), &mut stop).await {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Trains one leased job and reports its end.
#[tracing::instrument(skip_all, fields(job_id = job.job_id, attempt = job.attempt, model = %job.model, rotation = job.rotation))]
async fn run_job(
    cfg: &AgentConfig,
    link: &Link,
    job: pb::JobLease,
    device: candle_core::Device,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<JobEnd> {
    let job_ref = pb::JobRef {
        job_id: job.job_id,
        attempt: job.attempt,
        lease_token: job.lease_token.clone(),
    };
    tracing::info!("job leased");
    // Calls about the job must give up in time to retry within the lease.
    let ttl = Duration::from_millis(u64::from(job.lease_ttl_ms.max(300)));
    let link = &link.with_deadline(job_deadline(ttl, cfg.rpc_timeout));

    // A job that cannot start is reported at once so the coordinator stops
    // re-queueing it blindly: an invalid spec or model fails it for good, a
    // checkpoint folder this worker cannot create counts as this attempt's
    // failure.
    let (train_cfg, spec) = match prepare(cfg, &job, device) {
        Ok(p) => p,
        Err((e, fault)) => {
            let reason = format!("{e:#}");
            tracing::error!(error = %reason, "job cannot start");
            fail(link, &job_ref, &reason, fault).await;
            return Ok(JobEnd::Failed);
        }
    };

    let checkpoint_dir = train_cfg.checkpoint_dir.clone();
    let flags = Arc::new(StopFlags::default());
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<EpochReport>();
    let data_spec = spec.data.clone();
    let rotation = job.rotation as usize;
    let hooks_flags = flags.clone();
    let trainer = tokio::task::spawn_blocking(move || -> crate::Result<TrainOutcome> {
        let data = rotsweep_shared::data::load_rotation(&data_spec, rotation)?;
        if let Some((path, line, c)) = &data.oov.first {
            tracing::warn!(
                n_chars = data.oov.n_chars,
                first = %format!("{}:{line} {c:?}", path.display()),
                "characters outside the vocabulary mapped to OOV"
            );
        }
        let mut hooks = ChannelHooks {
            reports: report_tx,
            flags: hooks_flags,
        };
        train::train_job(&train_cfg, &data, &mut hooks)
    });

    // Heartbeats run beside training and keep the lease until the final
    // message is acknowledged, however long the coordinator is away.
    let (hb_stop_tx, hb_stop_rx) = watch::channel(false);
    let heartbeat = tokio::spawn(heartbeat_loop(
        link.clone(),
        job_ref.clone(),
        ttl / 3,
        flags.clone(),
        hb_stop_rx,
    ));

    // Forward epoch reports in order while watching for a shutdown signal.
    let mut stop_rx = stop.clone();
    let mut trainer = std::pin::pin!(trainer);
    let result = loop {
        tokio::select! {
            Some(report) = report_rx.recv() => {
                send_report(link, &job_ref, &report, &flags).await;
            }
            _ = stop_rx.wait_for(|s| *s), if !flags.shutdown.load(Ordering::SeqCst) => {
                tracing::info!("stopping: the job checkpoints at its next step");
                flags.shutdown.store(true, Ordering::SeqCst);
            }
            res = &mut trainer => break res,
        }
    };
    // Reports queued before the trainer returned still go out, in order.
    while let Ok(report) = report_rx.try_recv() {
        send_report(link, &job_ref, &report, &flags).await;
    }

    // A panic in training fails this job (the coordinator retries it up
    // to its attempt limit), not the worker.
    let result = joined(result);
    if flags.stale.load(Ordering::SeqCst) {
        let _ = hb_stop_tx.send(true);
        let _ = heartbeat.await;
        tracing::warn!("lease lost to another attempt; abandoning the job");
        return Ok(JobEnd::Interrupted);
    }
    flags.finishing.store(true, Ordering::SeqCst);
    let end = finish_job(
        cfg,
        link,
        &job,
        &job_ref,
        &flags,
        checkpoint_dir.as_deref(),
        result,
    )
    .await;
    let _ = hb_stop_tx.send(true);
    let _ = heartbeat.await;
    Ok(end)
}

/// Sends the final message of an attempt: its result, or why it stopped.
async fn finish_job(
    cfg: &AgentConfig,
    link: &Link,
    job: &pb::JobLease,
    job_ref: &pb::JobRef,
    flags: &StopFlags,
    checkpoint_dir: Option<&Path>,
    result: crate::Result<TrainOutcome>,
) -> JobEnd {
    match result {
        Ok(outcome) => {
            let accepted = complete(link, job_ref, &outcome).await;
            if !accepted {
                // Refused: another attempt owns the job now.
                return JobEnd::Interrupted;
            }
            if let Some(job_dir) = checkpoint_dir.and_then(Path::parent) {
                remove_earlier_attempts(job_dir, job.attempt);
            }
            JobEnd::Completed
        }
        Err(crate::Error::Interrupted { epoch, steps_done }) => {
            if flags.cancelled.load(Ordering::SeqCst) {
                tracing::info!(epoch, "job cancelled");
                fail(link, job_ref, "cancelled", Fault::Infra).await;
            } else {
                tracing::info!(epoch, steps_done, "job released after checkpoint");
                let reason = format!(
                    "worker {} stopped in epoch {epoch}; released",
                    cfg.worker_id
                );
                fail(link, job_ref, &reason, Fault::Release).await;
            }
            JobEnd::Interrupted
        }
        Err(e) => {
            let reason = format!("{e}");
            let fault = if e.is_invalid_input() {
                Fault::Input
            } else {
                Fault::Job
            };
            tracing::error!(error = %reason, ?fault, "job failed");
            fail(link, job_ref, &reason, fault).await;
            JobEnd::Failed
        }
    }
}

/// Builds the training configuration of a lease, or says why it cannot
/// and whose fault that is.
fn prepare(
    cfg: &AgentConfig,
    job: &pb::JobLease,
    device: candle_core::Device,
) -> Result<(TrainConfig, SweepSpec), (anyhow::Error, Fault)> {
    let input = |e: anyhow::Error| (e, Fault::Input);
    let spec = SweepSpec::from_json(&job.spec_json)
        .context("the leased spec is invalid")
        .map_err(input)?;
    let model = spec
        .models
        .get(&job.model)
        .with_context(|| format!("the spec has no model `{}`", job.model))
        .map_err(input)?
        .clone();
    let job_dir = match (&cfg.checkpoint_root, job.checkpoint_dir.is_empty()) {
        (Some(root), _) => Some(root.join(format!("job-{}", job.job_id))),
        (None, false) => Some(PathBuf::from(&job.checkpoint_dir)),
        (None, true) => None,
    };
    let checkpoint_dir = match &job_dir {
        Some(dir) => Some(attempt_folder(dir, job.attempt).map_err(|e| (e, Fault::Job))?),
        None => None,
    };
    Ok((
        TrainConfig {
            model,
            train: spec.train.clone(),
            seed: job.seed,
            device,
            checkpoint_dir,
        },
        spec,
    ))
}

/// The checkpoint folder of one attempt, `JOB_DIR/attempt-K`, seeded with
/// the newest checkpoint an earlier attempt left.
///
/// Each attempt writes only its own folder: an attempt that lost its lease
/// but still runs (paused, cut off) may keep writing checkpoints, and must
/// not interleave its files with the attempt that replaced it. Any earlier
/// attempt's checkpoint is a valid state of the same deterministic job, so
/// the newest readable one is copied in and training resumes from it.
fn attempt_folder(job_dir: &Path, attempt: u32) -> anyhow::Result<PathBuf> {
    let dir = job_dir.join(format!("attempt-{attempt}"));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating checkpoint folder {}", dir.display()))?;
    if train::has_checkpoint(&dir) {
        return Ok(dir);
    }
    for earlier in (1..attempt).rev() {
        let src = job_dir.join(format!("attempt-{earlier}"));
        match train::copy_checkpoint(&src, &dir) {
            Ok(true) => {
                tracing::info!(
                    from_attempt = earlier,
                    "resuming from an earlier attempt's checkpoint"
                );
                break;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(
                    from_attempt = earlier,
                    error = %e,
                    "cannot copy an earlier attempt's checkpoint; trying an older one"
                )
            }
        }
    }
    Ok(dir)
}

/// Removes the checkpoint folders of attempts before `attempt` once the job
/// completed; failures only leave garbage behind.
fn remove_earlier_attempts(job_dir: &Path, attempt: u32) {
    for earlier in 1..attempt {
        let dir = job_dir.join(format!("attempt-{earlier}"));
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(
                    path = %dir.display(),
                    error = %e,
                    "cannot remove an old checkpoint folder"
                )
            }
        }
    }
}

/// Marks the job stale or cancelled from an RPC answer.
fn note_status(flags: &StopFlags, rpc: &str, status: &tonic::Status) {
    if status.code() == Code::FailedPrecondition {
        tracing::warn!(rpc, error = %status.message(), "coordinator refused this attempt");
        flags.stale.store(true, Ordering::SeqCst);
    } else {
        tracing::error!(rpc, code = ?status.code(), error = %status.message(), "RPC failed");
    }
}

async fn send_report(link: &Link, job_ref: &pb::JobRef, report: &EpochReport, flags: &StopFlags) {
    if flags.stale.load(Ordering::SeqCst) {
        return;
    }
    let request = pb::ReportEpochRequest {
        job: Some(job_ref.clone()),
        metrics: Some(pb::EpochMetrics {
            epoch: report.epoch as u32,
            train_loss: report.train_loss,
            train_accuracy: report.train_accuracy,
            val_loss: report.val_loss,
            val_accuracy: report.val_accuracy,
            seconds: report.seconds,
            examples_per_second: report.examples_per_second,
        }),
    };
    tracing::info!(
        epoch = report.epoch,
        loss = report.train_loss,
        acc = report.train_accuracy,
        val_loss = report.val_loss,
        val_acc = report.val_accuracy,
        seconds = report.seconds,
        "epoch done"
    );
    match with_retry("ReportEpoch", link, None, |mut c| {
        let request = request.clone();
        async move { c.report_epoch(request).await }
    })
    .await
    {
        Ok(Some(resp)) if resp.cancel => flags.cancelled.store(true, Ordering::SeqCst),
        Ok(_) => {}
        Err(status) => note_status(flags, "ReportEpoch", &status),
    }
}

async fn heartbeat_loop(
    link: Link,
    job_ref: pb::JobRef,
    every: Duration,
    flags: Arc<StopFlags>,
    mut done: watch::Receiver<bool>,
) {
    loop {
        if sleep_or_stop(every, &mut done).await {
            return;
        }
        let request = pb::HeartbeatRequest {
            job: Some(job_ref.clone()),
            epoch: 0,
        };
        let answer = link
            .call(
                "Heartbeat",
                |mut c| async move { c.heartbeat(request).await },
            )
            .await;
        match answer {
            Ok(resp) if resp.get_ref().cancel => {
                flags.cancelled.store(true, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(status) if is_transient(&status) => {
                tracing::warn!(code = ?status.code(), error = %status.message(), "heartbeat failed; retrying");
            }
            Err(status) if flags.finishing.load(Ordering::SeqCst) => {
                // The final message ended the lease first.
                tracing::debug!(
                    code = ?status.code(),
                    error = %status.message(),
                    "heartbeat after the final message refused"
                );
                return;
            }
            Err(status) => {
                note_status(&flags, "Heartbeat", &status);
                if flags.stale.load(Ordering::SeqCst) {
                    return;
                }
            }
        }
    }
}

/// Reports the result; returns whether the coordinator accepted it.
async fn complete(link: &Link, job_ref: &pb::JobRef, outcome: &TrainOutcome) -> bool {
    let request = pb::CompleteJobRequest {
        job: Some(job_ref.clone()),
        test_accuracy: outcome.test_accuracy,
        test_loss: outcome.test_loss,
        labels: outcome.labels.clone(),
        confusion: outcome.confusion.iter().flatten().copied().collect(),
        epochs_trained: outcome.epochs_trained as u32,
        best_epoch: outcome.best_epoch as u32,
        n_test: outcome.n_test as u32,
        layers: outcome
            .layers
            .iter()
            .map(|l| pb::LayerInfo {
                name: l.name.clone(),
                kind: l.kind.clone(),
                output_shape: l.output_shape.iter().map(|&d| d as u64).collect(),
                n_params: l.n_params as u64,
            })
            .collect(),
    };
    match with_retry("CompleteJob", link, None, |mut c| {
        let request = request.clone();
        async move { c.complete_job(request).await }
    })
    .await
    {
        Ok(Some(_)) => {
            tracing::info!(
                test_accuracy = outcome.test_accuracy,
                epochs = outcome.epochs_trained,
                best_epoch = outcome.best_epoch,
                "job completed"
            );
            true
        }
        Ok(None) => false,
        Err(status) => {
            tracing::error!(
                code = ?status.code(),
                error = %status.message(),
                "CompleteJob refused"
            );
            false
        }
    }
}

/// Why an attempt ends without a result, as told to the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Not the job's fault (the sweep was cancelled).
    Infra,
    /// The job failed on this worker (an error, a non-finite loss).
    Job,
    /// The job's own input is invalid for every worker.
    Input,
    /// The worker stopped after a checkpoint.
    Release,
}

async fn fail(link: &Link, job_ref: &pb::JobRef, reason: &str, fault: Fault) {
    let request = pb::FailJobRequest {
        job: Some(job_ref.clone()),
        reason: reason.to_string(),
        job_fault: matches!(fault, Fault::Job | Fault::Input),
        release: fault == Fault::Release,
        input_error: fault == Fault::Input,
    };
    if let Err(status) = with_retry("FailJob", link, None, |mut c| {
        let request = request.clone();
        async move { c.fail_job(request).await }
    })
    .await
    {
        tracing::error!(code = ?status.code(), error = %status.message(), "FailJob refused");
    }
}

/// A blocking task's result, with a panic turned into [`crate::Error::Panicked`].
fn joined<T>(result: Result<crate::Result<T>, tokio::task::JoinError>) -> crate::Result<T> {
    result.unwrap_or_else(|e| {
        let message = match e.try_into_panic() {
            Ok(payload) => panic_message(payload.as_ref()),
            Err(e) => e.to_string(),
        };
        Err(crate::Error::Panicked(message))
    })
}

/// The text of a panic's payload (a `&str` or `String`, as `panic!` makes).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Ids of this process's lease requests: a random prefix (so a restarted
/// worker with the same `--worker-id` never repeats one) and a counter.
struct RequestIds {
    prefix: u64,
    next: u64,
}

impl RequestIds {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let prefix = rotsweep_shared::rng::mix_seed(&[nanos, u64::from(std::process::id())]);
        Self { prefix, next: 0 }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{:016x}-{}", self.prefix, self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (#3): with no stop signal, retries gave up after the first
    /// transient error, dropping epoch reports and completions whenever the
    /// coordinator restarted.
    #[tokio::test]
    async fn a_panic_in_training_is_the_jobs_failure_not_the_workers() {
        let result = tokio::task::spawn_blocking(|| -> crate::Result<u32> {
            panic!("capacity overflow");
        })
        .await;
        let err = joined(result).unwrap_err();
        assert!(matches!(&err, crate::Error::Panicked(m) if m == "capacity overflow"));
        assert!(!err.is_invalid_input());
        let owned = tokio::task::spawn_blocking(|| -> crate::Result<u32> {
            panic!("{} rows", 3);
        })
        .await;
        assert_eq!(
            joined(owned).unwrap_err().to_string(),
            "training panicked: 3 rows"
        );
        let fine = tokio::task::spawn_blocking(|| -> crate::Result<u32> { Ok(7) }).await;
        assert_eq!(joined(fine).unwrap(), 7);
    }

    #[tokio::test]
    async fn a_stop_signal_whose_sender_is_gone_never_fires() {
        let mut orphan = watch::channel(false).1;
        let started = std::time::Instant::now();
        assert!(!sleep_or_stop(Duration::from_millis(20), &mut orphan).await);
        assert!(started.elapsed() >= Duration::from_millis(20));

        let (stop_tx, mut stop) = watch::channel(false);
        stop_tx.send_replace(true);
        assert!(sleep_or_stop(Duration::from_secs(600), &mut stop).await);
    }

    /// A worker whose every job failed used to exit 0, so Slurm and
    /// Kubernetes counted it as a success.
    #[test]
    fn only_a_worker_that_completed_nothing_and_failed_something_exits_1() {
        let tally = |ends: &[JobEnd]| {
            let mut t = Tally::default();
            ends.iter().for_each(|&e| t.add(e));
            t
        };
        use JobEnd::{Completed, Failed, Interrupted};

        let failed = tally(&[Failed, Failed]);
        assert!(failed.all_failed());
        assert_eq!(
            failed.line(),
            "2 jobs: 0 completed, 2 failed, 0 interrupted"
        );
        assert!(tally(&[Failed, Interrupted]).all_failed());

        // Nothing to do, one completion among failures, or only jobs
        // stopped from outside (SIGTERM, cancel, a lost lease): exit 0.
        assert!(!tally(&[]).all_failed());
        assert_eq!(
            tally(&[]).line(),
            "0 jobs: 0 completed, 0 failed, 0 interrupted"
        );
        let mixed = tally(&[Failed, Completed, Failed]);
        assert!(!mixed.all_failed());
        assert_eq!(mixed.line(), "3 jobs: 1 completed, 2 failed, 0 interrupted");
        assert!(!tally(&[Interrupted]).all_failed());
        assert_eq!(
            tally(&[Interrupted]).line(),
            "1 job: 0 completed, 0 failed, 1 interrupted"
        );
    }

    #[test]
    fn calls_about_a_job_give_up_within_a_third_of_the_lease() {
        let cap = Duration::from_secs(10);
        assert_eq!(
            job_deadline(Duration::from_secs(3), cap),
            Duration::from_secs(1)
        );
        assert_eq!(job_deadline(Duration::from_secs(30), cap), cap);
        assert_eq!(
            job_deadline(Duration::from_millis(300), cap),
            Duration::from_secs(1)
        );
        assert_eq!(
            job_deadline(Duration::from_secs(30), Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }

    /// Regression (#3): a retried report hung for minutes on a connection
    /// that never answered, and the lease expired meanwhile. A silent peer
    /// now costs one deadline per call, and each overrun dials anew.
    #[tokio::test]
    async fn a_call_to_a_silent_peer_fails_by_its_deadline_and_redials() {
        // A peer that accepts connections and never sends a byte.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
                let _ = accepted_tx.send(held.len());
            }
        });
        let remote = rotsweep_proto::tls::Remote::new(&url, None, None).unwrap();
        let link = Link::new(
            remote.clone(),
            remote.connect_lazy(),
            Duration::from_millis(300),
        );
        let heartbeat =
            |mut c: pb::Client| async move { c.heartbeat(pb::HeartbeatRequest::default()).await };
        for n in 1..=2 {
            let err = link.call("Heartbeat", heartbeat).await.unwrap_err();
            assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
            assert!(is_transient(&err));
            // Each call went out on its own connection: the first on the
            // original channel, the second on the one dialled after the
            // first overran.
            let dialled = tokio::time::timeout(Duration::from_secs(60), accepted.recv()).await;
            assert_eq!(
                dialled.ok().flatten(),
                Some(n),
                "call {n} made no new connection"
            );
        }
    }
}

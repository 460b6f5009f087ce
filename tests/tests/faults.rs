//! Fault tolerance end to end (issue #3): a real coordinator and real
//! workers on loopback, killed, paused, cut off and restarted on purpose.
//! Each test drives one scenario, then asserts the exact stored state
//! through the gRPC API (status, epoch rows, summary):
//!
//! - a worker SIGKILLed mid-epoch is re-leased once and resumes from its
//!   checkpoint (scenario 1);
//! - a worker SIGKILLed right after its lease loses the job after the lease
//!   time (scenario 2);
//! - a stale attempt (SIGSTOP past its lease, then SIGCONT) is refused
//!   (scenario 3);
//! - the coordinator SIGKILLed half-way is restarted on its state directory
//!   (scenario 5);
//! - the worker's connection is cut and black-holed by a proxy, then healed
//!   (scenario 6);
//! - a job that always fails ends FAILED and the worker failing in a loop
//!   is quarantined (scenario 7), while bad input that only a worker finds
//!   fails its job at once and quarantines no one;
//! - cancel, then resume (scenario 8);
//! - SIGTERM to a worker: it checkpoints, releases its lease and exits 0,
//!   and the job is re-leased at once (graceful stop).
//!
//! Events are awaited on the coordinator's Watch stream (or by polling with
//! a bound), never by sleeping; every wait is bounded by the test's own
//! deadline, [`TEST_LIMIT`]. Where a scenario claims "resumes from its
//! checkpoint", the stored curve is compared with an uninterrupted run of the
//! same job (`rotsweep-worker train`), which is deterministic on one thread.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rotsweep_proto as pb;
use rotsweep_proto::watch_event::Event as WatchBody;
use rotsweep_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const TOKEN: &str = "faults-e2e-token-0123456789";

/// The most any one test may take, start to end.
const TEST_LIMIT: Duration = Duration::from_secs(120);

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

// ------------------------------------------------------------------ rig

/// One test's coordinator, runtime, folder and deadline. Dumps the logs
/// when dropped before [`Rig::passed`] was called.
struct Rig {
    dir: PathBuf,
    server: Server,
    rt: tokio::runtime::Runtime,
    deadline: Instant,
    passed: bool,
}

impl Rig {
    /// A fresh folder and `rotsweep serve` with lease time `ttl_s`.
    fn new(tag: &str, ttl_s: f64, serve_args: &[&str]) -> anyhow::Result<Self> {
        Self::listening_on(tag, ttl_s, serve_args, "127.0.0.1:0")
    }

    /// [`Rig::new`] with the server on `listen`.
    fn listening_on(
        tag: &str,
        ttl_s: f64,
        serve_args: &[&str],
        listen: &str,
    ) -> anyhow::Result<Self> {
        let deadline = Instant::now() + TEST_LIMIT;
        let dir = temp_dir(&format!("faults-{tag}"));
        let extra = Extra {
            args: serve_args,
            envs: &[],
        };
        let server = Server::start_on(&dir.join("state"), Some(TOKEN), ttl_s, listen, extra)?;
        // Background tasks (watch streams, the proxy) run while the test
        // thread blocks on processes.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting a tokio runtime")?;
        Ok(Self {
            dir,
            server,
            rt,
            deadline,
            passed: false,
        })
    }

    /// Time left before the test's deadline.
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn passed(mut self) {
        self.passed = true;
    }

    fn client_at(&self, url: &str) -> anyhow::Result<pb::Client> {
        let token = pb::auth::Token::new(TOKEN).map_err(anyhow::Error::msg)?;
        Ok(self.rt.block_on(pb::connect(url, Some(token)))?)
    }

    fn client(&self) -> anyhow::Result<pb::Client> {
        self.client_at(&self.server.url)
    }

    /// `rotsweep submit SPEC`; returns the stored sweep name.
    fn submit(&self, spec: &Path) -> anyhow::Result<String> {
        let spec = spec.to_str().context("a UTF-8 path")?;
        let (code, out, err) = cli(
            &[
                "submit",
                spec,
                "--coordinator",
                &self.server.url,
                "--format",
                "json",
            ],
            Some(TOKEN),
        )?;
        ensure!(code == 0, "submit failed: {err}");
        let json: serde_json::Value = serde_json::from_str(&out)?;
        Ok(json["sweep"].as_str().context("a sweep name")?.to_string())
    }

    /// A worker for `sweep` against the coordinator.
    fn worker(&self, id: &str, sweep: &str) -> anyhow::Result<Proc> {
        self.worker_via(&self.server.url.clone(), id, sweep)
    }

    /// A worker for `sweep` that reaches the coordinator through `url`.
    fn worker_via(&self, url: &str, id: &str, sweep: &str) -> anyhow::Result<Proc> {
        start_worker(url, Some(TOKEN), id, sweep, &self.dir)
    }

    fn watch(&self, sweep: &str) -> anyhow::Result<Watcher> {
        Watcher::start(self, sweep)
    }

    fn status(&self, sweep: &str) -> anyhow::Result<pb::SweepStatusResponse> {
        let mut c = self.client()?;
        let req = pb::SweepStatusRequest {
            sweep: sweep.into(),
        };
        Ok(self.rt.block_on(c.sweep_status(req))?.into_inner())
    }

    fn epochs(&self, sweep: &str) -> anyhow::Result<Vec<pb::EpochRow>> {
        let mut c = self.client()?;
        let req = pb::ListEpochsRequest {
            sweep: sweep.into(),
        };
        Ok(self.rt.block_on(c.list_epochs(req))?.into_inner().rows)
    }

    fn summary(&self, sweep: &str) -> anyhow::Result<pb::SweepSummaryResponse> {
        let mut c = self.client()?;
        let req = pb::SweepSummaryRequest {
            sweep: sweep.into(),
        };
        Ok(self.rt.block_on(c.sweep_summary(req))?.into_inner())
    }

    /// Waits (bounded) for `p` to exit and checks that it exited 0.
    fn exits_cleanly(&self, p: &mut Proc) -> anyhow::Result<()> {
        let status = p.wait_timeout(self.left())?;
        ensure!(status.success(), "{} exited with {status}", p.name);
        Ok(())
    }

    /// Waits (bounded) for `p` to exit and checks its exit code.
    fn exits_with(&self, p: &mut Proc, code: i32) -> anyhow::Result<()> {
        let status = p.wait_timeout(self.left())?;
        ensure!(
            status.code() == Some(code),
            "{} exited with {status}",
            p.name
        );
        Ok(())
    }

    /// Polls `check` until it holds, within the test's deadline.
    fn poll<T>(
        &self,
        what: &str,
        check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        wait_for(what, self.left(), check)
    }

    /// Text of a worker's log.
    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{id}.log"))).unwrap_or_default()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if !self.passed {
            dump_logs(&self.dir);
            dump_logs(&self.dir.join("state"));
        }
    }
}

// ------------------------------------------------------------- watching

#[derive(Default)]
struct WatchLog {
    events: Vec<pb::WatchEvent>,
    /// Why the stream ended, once it has.
    end: Option<String>,
}

/// A sweep's Watch stream, collected by a background task so the test can
/// block on "the first event like this" with a bound.
struct Watcher {
    log: Arc<(Mutex<WatchLog>, Condvar)>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Subscribes before returning: every event after this call is seen.
    fn start(rig: &Rig, sweep: &str) -> anyhow::Result<Self> {
        let mut client = rig.client()?;
        let request = pb::WatchRequest {
            sweep: sweep.into(),
        };
        let mut stream = rig.rt.block_on(client.watch(request))?.into_inner();
        let log = Arc::new((Mutex::new(WatchLog::default()), Condvar::new()));
        let sink = log.clone();
        let task = rig.rt.spawn(async move {
            let end = loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        let (lock, cv) = &*sink;
                        lock.lock().expect("watch log lock").events.push(event);
                        cv.notify_all();
                    }
                    Ok(None) => break "the stream ended".to_string(),
                    Err(status) => break format!("the stream failed: {status}"),
                }
            };
            let (lock, cv) = &*sink;
            lock.lock().expect("watch log lock").end = Some(end);
            cv.notify_all();
        });
        Ok(Self { log, task })
    }

    /// The first event at index `from` or later that satisfies `pred`, with
    /// its index; fails after `limit` or when the stream ends without one.
    fn wait_from(
        &self,
        from: usize,
        what: &str,
        limit: Duration,
        pred: impl Fn(&pb::WatchEvent) -> bool,
    ) -> anyhow::Result<(usize, pb::WatchEvent)> {
        let deadline = Instant::now() + limit;
        let (lock, cv) = &*self.log;
        let mut log = lock.lock().expect("watch log lock");
        let mut next = from;
        loop {
            if let Some(i) = (next..log.events.len()).find(|&i| pred(&log.events[i])) {
                return Ok((i, log.events[i].clone()));
            }
            next = log.events.len().max(from);
            if let Some(end) = &log.end {
                bail!("waiting for {what}: {end} first; events: {:?}", log.events);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {limit:?} waiting for {what}; events: {:?}",
                    log.events
                );
            }
            log = cv.wait_timeout(log, left).expect("watch log lock").0;
        }
    }

    fn wait(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&pb::WatchEvent) -> bool,
    ) -> anyhow::Result<pb::WatchEvent> {
        Ok(self.wait_from(0, what, limit, pred)?.1)
    }

    fn events(&self) -> Vec<pb::WatchEvent> {
        self.log.0.lock().expect("watch log lock").events.clone()
    }

    fn len(&self) -> usize {
        self.log.0.lock().expect("watch log lock").events.len()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn epoch_of(e: &pb::WatchEvent) -> Option<&pb::EpochMetrics> {
    match &e.event {
        Some(WatchBody::Epoch(m)) => Some(m),
        _ => None,
    }
}

fn state_of(e: &pb::WatchEvent) -> Option<&str> {
    match &e.event {
        Some(WatchBody::State(s)) => Some(s),
        _ => None,
    }
}

fn leased_by(e: &pb::WatchEvent) -> Option<&str> {
    match &e.event {
        Some(WatchBody::LeasedBy(w)) => Some(w),
        _ => None,
    }
}

/// Is `e` the report of `epoch` by `attempt` of `job`?
fn is_epoch(e: &pb::WatchEvent, job: i64, attempt: u32, epoch: u32) -> bool {
    e.job_id == job && e.attempt == attempt && epoch_of(e).is_some_and(|m| m.epoch == epoch)
}

/// Is `e` the end of `attempt` of `job` in `state`?
fn is_state(e: &pb::WatchEvent, job: i64, attempt: u32, state: &str) -> bool {
    e.job_id == job && e.attempt == attempt && state_of(e) == Some(state)
}

// ---------------------------------------------------------------- specs

/// Writes a spec over the shipped `pfam-real` data with small models
/// (`(name, kind, extra TOML lines)`), the given rotations and `[train]`
/// lines (epochs, steps, attempts...).
fn write_spec(
    dir: &Path,
    name: &str,
    models: &[(&str, &str, &str)],
    rotations: &[usize],
    train: &str,
) -> PathBuf {
    let data = repo_root().join("examples/data/pfam-real");
    let rotations: Vec<String> = rotations.iter().map(|r| r.to_string()).collect();
    let mut text = format!(
        "name = \"{name}\"\n[data]\ndir = \"{}\"\nrotations = [{}]\nmax_len = 64\n\
         [train]\nbatch_size = 16\npatience = 10\nseed = 7\n{train}\n",
        data.display(),
        rotations.join(", ")
    );
    for (model, kind, extra) in models {
        text.push_str(&format!(
            "[models.{model}]\nkind = \"{kind}\"\nembedding = 8\nconv_filters = 16\n\
             units = 16\nfinal_units = 16\nheads = 2\nkey_size = 8\ndense = [16]\n{extra}\n"
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("writing the spec");
    path
}

/// One GRU job slow enough (a few tenths of a second per epoch) to be
/// caught mid-run, fast enough to finish in seconds.
fn slow_job_spec(dir: &Path, name: &str, epochs: usize, extra_train: &str) -> PathBuf {
    write_spec(
        dir,
        name,
        &[("gru", "gru", "")],
        &[0],
        &format!("epochs = {epochs}\nsteps_per_epoch = 150\ncheckpoint_every = 1\n{extra_train}"),
    )
}

/// An uninterrupted run of one job: its curve (train loss and accuracy,
/// validation loss and accuracy per epoch) and test result.
struct Reference {
    curve: Vec<[f64; 4]>,
    test_accuracy: f64,
    confusion: Vec<Vec<u64>>,
}

fn reference(spec: &Path, model: &str, rotation: u32) -> anyhow::Result<Reference> {
    let out = std::process::Command::new(bin("rotsweep-worker"))
        .args(["train", "--spec"])
        .arg(spec)
        .args(["--model", model, "--rotation", &rotation.to_string()])
        .args(["--format", "json"])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .context("running rotsweep-worker train")?;
    ensure!(
        out.status.success(),
        "reference run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reference = Reference {
        curve: Vec::new(),
        test_accuracy: f64::NAN,
        confusion: Vec::new(),
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        match v["type"].as_str() {
            Some("epoch") => reference.curve.push([
                f("train_loss"),
                f("train_accuracy"),
                f("val_loss"),
                f("val_accuracy"),
            ]),
            Some("result") => {
                reference.test_accuracy = f("test_accuracy");
                reference.confusion = serde_json::from_value(v["confusion"].clone())?;
            }
            _ => {}
        }
    }
    Ok(reference)
}

fn close(a: f64, b: f64) -> bool {
    // The numbers travel through JSON on some paths; anything that differs
    // in training differs far more than this.
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// The visible rows of `job`, in epoch order.
fn rows_of(rows: &[pb::EpochRow], job: i64) -> Vec<&pb::EpochRow> {
    rows.iter().filter(|r| r.job_id == job).collect()
}

fn epochs_and_attempts(rows: &[&pb::EpochRow]) -> Vec<(u32, u32)> {
    rows.iter()
        .map(|r| (r.metrics.unwrap_or_default().epoch, r.attempt))
        .collect()
}

/// Checks that `rows` are epochs 1..n, once each, equal to the reference
/// curve.
fn assert_curve(rows: &[&pb::EpochRow], reference: &Reference) {
    let epochs: Vec<u32> = rows
        .iter()
        .map(|r| r.metrics.unwrap_or_default().epoch)
        .collect();
    let expected: Vec<u32> = (1..=reference.curve.len() as u32).collect();
    assert_eq!(epochs, expected, "each epoch exactly once");
    for (row, want) in rows.iter().zip(&reference.curve) {
        let m = row.metrics.unwrap_or_default();
        let got = [m.train_loss, m.train_accuracy, m.val_loss, m.val_accuracy];
        assert!(
            got.iter().zip(want).all(|(a, b)| close(*a, *b)),
            "epoch {}: stored {got:?}, uninterrupted run {want:?}",
            m.epoch
        );
    }
}

fn job(status: &pb::SweepStatusResponse, id: i64) -> &pb::JobStatus {
    status
        .jobs
        .iter()
        .find(|j| j.job_id == id)
        .expect("the job is in the status")
}

// ---------------------------------------------------------------- tests

/// Scenario 1: a worker SIGKILLed mid-epoch. The lease expires, the job is
/// re-leased once and resumes from the last checkpoint (epoch 1 of the
/// stored curve is the one the dead attempt measured), and every epoch of
/// the final curve appears exactly once, equal to an uninterrupted run.
#[test]
fn a_worker_killed_mid_epoch_is_re_leased_once_and_resumes_from_its_checkpoint(
) -> anyhow::Result<()> {
    let rig = Rig::new("kill", 2.0, &[])?;
    let spec = slow_job_spec(&rig.dir, "kill", 4, "");
    let sweep = rig.submit(&spec)?;
    let watcher = rig.watch(&sweep)?;

    let mut w0 = rig.worker("w0", &sweep)?;
    let first = watcher.wait("epoch 1 of attempt 1", rig.left(), |e| {
        e.attempt == 1 && epoch_of(e).is_some_and(|m| m.epoch == 1)
    })?;
    let job_id = first.job_id;
    w0.signal(SIGKILL);
    w0.wait_timeout(rig.left())?;

    let mut w1 = rig.worker("w1", &sweep)?;
    watcher.wait("attempt 2 completed", rig.left(), |e| {
        is_state(e, job_id, 2, "COMPLETED")
    })?;
    rig.exits_cleanly(&mut w1)?;

    // Exactly two leases: the killed attempt and its one replacement, which
    // came only after the lease expired.
    let events = watcher.events();
    let leases: Vec<(u32, String)> = events
        .iter()
        .filter_map(|e| leased_by(e).map(|w| (e.attempt, w.to_string())))
        .collect();
    assert_eq!(leases, vec![(1, "w0".into()), (2, "w1".into())]);
    let expiry = events
        .iter()
        .position(|e| is_state(e, job_id, 1, "PENDING"))
        .context("an expiry event")?;
    assert!(state_of(&events[expiry]).is_some_and(|_| events[expiry].detail.contains("expired")));
    let second_lease = events
        .iter()
        .position(|e| e.attempt == 2 && leased_by(e).is_some())
        .context("a second lease")?;
    assert!(expiry < second_lease, "re-leased only after expiry");

    let status = rig.status(&sweep)?;
    let j = job(&status, job_id);
    assert_eq!(
        (j.state.as_str(), j.attempt, j.worker_id.as_str()),
        ("COMPLETED", 2, "w1")
    );
    assert_eq!((j.infra_failures, j.job_failures), (1, 0));

    let rows = rig.epochs(&sweep)?;
    let rows = rows_of(&rows, job_id);
    // The new attempt re-sent what its checkpoint held and owns the curve.
    assert!(rows.iter().all(|r| r.attempt == 2), "{rows:?}");
    let reference = reference(&spec, "gru", 0)?;
    assert_curve(&rows, &reference);
    // Epoch 1 was not trained again: its wall time is the dead attempt's.
    let measured = epoch_of(&first).context("metrics")?.seconds;
    let stored = rows[0].metrics.unwrap_or_default().seconds;
    assert!(
        close(measured, stored),
        "epoch 1 took {measured} s, stored {stored} s"
    );
    assert!(rig
        .log("w1")
        .contains("resuming from an earlier attempt's checkpoint"));

    let summary = rig.summary(&sweep)?;
    assert!(summary.complete);
    let gru = &summary.models[0];
    assert_eq!((gru.n_used, gru.n_total), (1, 1));
    assert!(close(
        gru.rotations[0].test_accuracy,
        reference.test_accuracy
    ));
    assert_eq!(
        gru.confusion,
        reference.confusion.concat(),
        "the test result equals the uninterrupted run's"
    );
    rig.passed();
    Ok(())
}

/// Scenario 2: a worker SIGKILLed as soon as it holds a lease, before any
/// heartbeat (the first is due a third of a lease time later). The job
/// stays RUNNING until the lease time has passed, then is re-leased; every
/// job of the grid completes exactly once.
#[test]
fn a_worker_killed_before_its_first_heartbeat_loses_its_job_after_the_lease_time(
) -> anyhow::Result<()> {
    let rig = Rig::new("early", 3.0, &[])?;
    let spec = write_spec(
        &rig.dir,
        "early",
        &[("rnn", "rnn", "")],
        &[0, 1, 2],
        "epochs = 2\nsteps_per_epoch = 20",
    );
    let sweep = rig.submit(&spec)?;
    let watcher = rig.watch(&sweep)?;

    let mut w0 = rig.worker("w0", &sweep)?;
    let lease = watcher.wait("a lease by w0", rig.left(), |e| leased_by(e) == Some("w0"))?;
    w0.signal(SIGKILL);
    w0.wait_timeout(rig.left())?;
    let lost = lease.job_id;

    let mut w1 = rig.worker("w1", &sweep)?;
    rig.exits_cleanly(&mut w1)?;

    let events = watcher.events();
    let expiry = events
        .iter()
        .position(|e| is_state(e, lost, 1, "PENDING"))
        .context("the lost lease expired")?;
    assert!(
        events[expiry].detail.contains("expired"),
        "{:?}",
        events[expiry]
    );
    let relet = events
        .iter()
        .position(|e| e.job_id == lost && e.attempt == 2 && leased_by(e) == Some("w1"))
        .context("the lost job was leased again")?;
    assert!(expiry < relet);

    let status = rig.status(&sweep)?;
    assert_eq!(status.jobs.len(), 3);
    for j in &status.jobs {
        let (attempt, infra) = if j.job_id == lost { (2, 1) } else { (1, 0) };
        assert_eq!(
            (
                j.state.as_str(),
                j.attempt,
                j.infra_failures,
                j.job_failures
            ),
            ("COMPLETED", attempt, infra, 0),
            "{j:?}"
        );
    }

    let rows = rig.epochs(&sweep)?;
    let mut per_job: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for r in &rows {
        per_job
            .entry(r.job_id)
            .or_default()
            .push(r.metrics.unwrap_or_default().epoch);
    }
    assert_eq!(per_job.len(), 3);
    assert!(per_job.values().all(|e| e == &vec![1, 2]), "{per_job:?}");

    let summary = rig.summary(&sweep)?;
    assert!(summary.complete);
    let rnn = &summary.models[0];
    assert_eq!((rnn.n_used, rnn.n_total), (3, 3));
    rig.passed();
    Ok(())
}

/// Scenario 3: a worker paused (SIGSTOP) past its lease comes back
/// (SIGCONT) after the new attempt finished. Its messages are refused as
/// stale, it abandons the job and exits, and no row of the old attempt was
/// stored after the pause; the curve is the new attempt's.
#[test]
fn a_stale_attempt_that_comes_back_is_refused_and_the_curve_is_the_new_attempts(
) -> anyhow::Result<()> {
    let rig = Rig::new("stale", 2.0, &[])?;
    let spec = slow_job_spec(&rig.dir, "stale", 4, "");
    let sweep = rig.submit(&spec)?;
    let watcher = rig.watch(&sweep)?;

    let mut w0 = rig.worker("w0", &sweep)?;
    let first = watcher.wait("epoch 1 of attempt 1", rig.left(), |e| {
        e.attempt == 1 && epoch_of(e).is_some_and(|m| m.epoch == 1)
    })?;
    let job_id = first.job_id;
    w0.signal(SIGSTOP);
    // Reports of attempt 1 that the coordinator took before the pause.
    let stored_before = watcher
        .events()
        .iter()
        .filter(|e| e.attempt == 1)
        .filter_map(epoch_of)
        .map(|m| m.epoch)
        .max()
        .unwrap_or(0);

    let mut w1 = rig.worker("w1", &sweep)?;
    watcher.wait("attempt 2 completed", rig.left(), |e| {
        is_state(e, job_id, 2, "COMPLETED")
    })?;
    rig.exits_cleanly(&mut w1)?;

    w0.signal(SIGCONT);
    rig.exits_cleanly(&mut w0)?;
    let log = rig.log("w0");
    assert!(log.contains("coordinator refused this attempt"), "{log}");

    let status = rig.status(&sweep)?;
    let j = job(&status, job_id);
    assert_eq!(
        (j.state.as_str(), j.attempt, j.worker_id.as_str()),
        ("COMPLETED", 2, "w1")
    );
    assert_eq!((j.infra_failures, j.job_failures), (1, 0));
    let rows = rig.epochs(&sweep)?;
    let rows = rows_of(&rows, job_id);
    assert_eq!(
        epochs_and_attempts(&rows),
        vec![(1, 2), (2, 2), (3, 2), (4, 2)]
    );

    // Underneath the visibility rule: the stale attempt stored nothing after
    // its pause, and the result is attempt 2's.
    let db = rusqlite::Connection::open_with_flags(
        rig.server.state.join("state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let stale_max: Option<u32> = db.query_row(
        "SELECT MAX(epoch) FROM epochs WHERE job_id = ?1 AND attempt = 1",
        [job_id],
        |r| r.get(0),
    )?;
    assert_eq!(stale_max.unwrap_or(0), stored_before);
    let result_attempt: u32 = db.query_row(
        "SELECT attempt FROM results WHERE job_id = ?1",
        [job_id],
        |r| r.get(0),
    )?;
    assert_eq!(result_attempt, 2);
    rig.passed();
    Ok(())
}

/// Scenario 5: the coordinator is SIGKILLed once half the jobs completed
/// (and another has reported an epoch), and stays down until every running
/// lease has passed its deadline. Restarted on the same state directory and
/// address, it keeps the running leases (their workers are retrying), the
/// workers carry on, and the final summary and every curve equal
/// uninterrupted runs of the same jobs, each epoch stored once.
#[test]
fn a_coordinator_killed_half_way_restarts_on_its_state_and_loses_nothing() -> anyhow::Result<()> {
    // Restart where the workers look: a fixed port instead of port 0.
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut rig = Rig::listening_on("restart", 3.0, &[], &listen)?;
    let spec = write_spec(
        &rig.dir,
        "restart",
        &[("gru", "gru", ""), ("rnn", "rnn", "")],
        &[0, 1],
        "epochs = 3\nsteps_per_epoch = 60",
    );
    let sweep = rig.submit(&spec)?;
    let watcher = rig.watch(&sweep)?;
    // The CLI's `watch` rides out the restart too.
    let mut cli_watch = Proc {
        child: std::process::Command::new(bin("rotsweep"))
            .args(["watch", &sweep, "--coordinator", &rig.server.url])
            .args(["--format", "json"])
            .env("ROTSWEEP_TOKEN", TOKEN)
            .stdout(log_file(&rig.dir, "watch-out")?)
            .stderr(log_file(&rig.dir, "watch")?)
            .spawn()?,
        name: "rotsweep watch".into(),
    };

    let mut workers = [rig.worker("w0", &sweep)?, rig.worker("w1", &sweep)?];
    let (half, _) = watcher.wait_from(0, "two completed jobs", rig.left(), |e| {
        state_of(e) == Some("COMPLETED")
    })?;
    let (half, _) = watcher.wait_from(half + 1, "two completed jobs", rig.left(), |e| {
        state_of(e) == Some("COMPLETED")
    })?;
    let completed: Vec<i64> = watcher.events()[..=half]
        .iter()
        .filter(|e| state_of(e) == Some("COMPLETED"))
        .map(|e| e.job_id)
        .collect();
    let (_, running) = watcher.wait_from(half, "an epoch of a running job", rig.left(), |e| {
        epoch_of(e).is_some() && !completed.contains(&e.job_id)
    })?;
    rig.server.proc.signal(SIGKILL);
    rig.server.proc.wait_timeout(rig.left())?;
    drop(watcher);

    // Down for longer than a lease: without care, the restart would expire
    // the leases of workers that are only waiting for it.
    let state = rig.server.state.clone();
    rig.poll("every running lease past its deadline", || {
        let db = rusqlite::Connection::open_with_flags(
            state.join("state.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        let live: i64 = db.query_row(
            "SELECT COUNT(*) FROM jobs WHERE state = 'RUNNING' AND lease_deadline_ms >= ?1",
            [now],
            |r| r.get(0),
        )?;
        Ok((live == 0).then_some(()))
    })?;
    rig.server = Server::start_on(&state, Some(TOKEN), 3.0, &listen, Extra::default())?;
    for w in workers.iter_mut() {
        rig.exits_cleanly(w)?;
    }
    // It lost the stream at the kill (a job was still running, so the sweep
    // had not finished), watched again, and ended with the sweep.
    rig.exits_cleanly(&mut cli_watch)?;
    let log = rig.log("watch");
    assert!(
        log.contains("lost the coordinator") && log.contains("watching again"),
        "{log}"
    );

    let status = rig.status(&sweep)?;
    assert_eq!(status.jobs.len(), 4);
    for j in &status.jobs {
        assert_eq!(j.state, "COMPLETED", "{j:?}");
        if completed.contains(&j.job_id) || j.job_id == running.job_id {
            // Acknowledged before the kill, or held by a live worker.
            assert_eq!((j.attempt, j.infra_failures), (1, 0), "{j:?}");
        } else {
            // A lease whose answer the kill swallowed is re-leased once.
            assert!(j.attempt <= 2 && j.infra_failures == j.attempt - 1, "{j:?}");
        }
    }

    let rows = rig.epochs(&sweep)?;
    let summary = rig.summary(&sweep)?;
    assert!(summary.complete);
    for j in &status.jobs {
        let reference = reference(&spec, &j.model, j.rotation)?;
        assert_curve(&rows_of(&rows, j.job_id), &reference);
        assert!(close(j.test_accuracy, reference.test_accuracy), "{j:?}");
    }
    for m in &summary.models {
        assert_eq!((m.n_used, m.n_total), (2, 2), "{}", m.name);
        let rotations: Vec<u32> = m.rotations.iter().map(|r| r.rotation).collect();
        assert_eq!(rotations, vec![0, 1]);
    }
    rig.passed();
    Ok(())
}

/// Connection state of the [`Proxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Bytes flow.
    Pass,
    /// Every connection is closed and new ones are closed on arrival.
    Cut,
    /// Open connections go silent for good (no byte moves either way, and
    /// neither end is told: a partition that lost the TCP state); new ones
    /// are closed on arrival. Healing lets new connections through only.
    BlackHole,
}

/// A loopback TCP proxy under the test's control.
struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections closed on arrival while cut or black-holed.
    refused: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    fn start(rt: &tokio::runtime::Runtime, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let refused = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (n_refused, live) = (refused.clone(), conns.clone());
        let task = rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *mode_rx.borrow() != Mode::Pass {
                    n_refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let rx = mode_rx.clone();
                let handle = tokio::spawn(relay(client, upstream, rx));
                live.lock().expect("proxy lock").push(handle.abort_handle());
            }
        });
        Ok(Self {
            addr,
            mode,
            refused,
            conns,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
        if mode == Mode::Cut {
            for c in self.conns.lock().expect("proxy lock").drain(..) {
                c.abort();
            }
        }
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Mode::Cut);
    }
}

/// Ok while bytes may flow; errs when the proxy is cut; never returns once
/// the connection has been black-holed (its sockets stay open, silent).
async fn flowing(mode: &mut watch::Receiver<Mode>) -> Result<(), ()> {
    let now = *mode.borrow_and_update();
    match now {
        Mode::Pass => Ok(()),
        Mode::Cut => Err(()),
        Mode::BlackHole => std::future::pending().await,
    }
}

/// Carries one connection until either side closes or the proxy cuts it.
async fn relay(
    client: tokio::net::TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
) {
    if flowing(&mut mode).await.is_err() {
        return;
    }
    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    tokio::join!(
        pump(client_rx, server_tx, mode.clone()),
        pump(server_rx, client_tx, mode)
    );
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if flowing(&mut mode).await.is_err() {
            return;
        }
        // Stop reading the moment the mode changes: a black-holed
        // connection passes nothing on.
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = mode.changed() => continue,
        };
        if flowing(&mut mode).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Scenario 6: the worker reaches the coordinator through a proxy. A short
/// cut (healed within the lease time) costs nothing: the attempt carries
/// on. Then the open connection is black-holed (silent for good, neither
/// end told) until the lease expires, and the network heals for new
/// connections: the worker finds the dead connection by its keep-alive
/// pings, reconnects, is refused as stale, leases the job again, resumes
/// from the checkpoint and completes it once.
#[test]
fn a_cut_and_black_holed_connection_heals_and_the_job_completes_once() -> anyhow::Result<()> {
    let rig = Rig::new("net", 3.0, &[])?;
    let spec = slow_job_spec(&rig.dir, "net", 5, "");
    let sweep = rig.submit(&spec)?;
    let watcher = rig.watch(&sweep)?;
    let upstream: SocketAddr = rig
        .server
        .url
        .trim_start_matches("http://")
        .parse()
        .context("the server's address")?;
    let proxy = Proxy::start(&rig.rt, upstream)?;

    let mut w0 = rig.worker_via(&proxy.url(), "w0", &sweep)?;
    let first = watcher.wait("epoch 1 of attempt 1", rig.left(), |e| {
        e.attempt == 1 && epoch_of(e).is_some_and(|m| m.epoch == 1)
    })?;
    let job_id = first.job_id;

    // A short cut: the worker notices (a reconnect is turned away), then
    // the network heals and the same attempt reports its next epoch.
    proxy.set(Mode::Cut);
    rig.poll("a reconnect during the cut", || {
        Ok((proxy.refused() >= 1).then_some(()))
    })?;
    proxy.set(Mode::Pass);
    let healed_at = watcher.len();
    watcher.wait_from(
        healed_at,
        "an epoch of attempt 1 after the heal",
        rig.left(),
        |e| e.attempt == 1 && epoch_of(e).is_some(),
    )?;

    // A long outage: the connection in use goes silent until the lease
    // expires; after the heal only a new connection gets through.
    proxy.set(Mode::BlackHole);
    let (expired_at, expiry) =
        watcher.wait_from(0, "the lease of attempt 1 to expire", rig.left(), |e| {
            is_state(e, job_id, 1, "PENDING")
        })?;
    assert!(expiry.detail.contains("expired"), "{expiry:?}");
    proxy.set(Mode::Pass);

    watcher.wait("attempt 2 completed", rig.left(), |e| {
        is_state(e, job_id, 2, "COMPLETED")
    })?;
    rig.exits_cleanly(&mut w0)?;
    assert!(rig.log("w0").contains("coordinator refused this attempt"));
    // Attempt 1 stored nothing once its lease was gone.
    let late: Vec<_> = watcher.events()[expired_at..]
        .iter()
        .filter(|e| e.attempt == 1 && epoch_of(e).is_some())
        .cloned()
        .collect();
    assert!(late.is_empty(), "{late:?}");

    let status = rig.status(&sweep)?;
    let j = job(&status, job_id);
    assert_eq!(
        (j.state.as_str(), j.attempt, j.worker_id.as_str()),
        ("COMPLETED", 2, "w0")
    );
    assert_eq!((j.infra_failures, j.job_failures), (1, 0));
    let rows = rig.epochs(&sweep)?;
    let rows = rows_of(&rows, job_id);
    assert!(rows.iter().all(|r| r.attempt == 2), "{rows:?}");
    let reference = reference(&spec, "gru", 0)?;
    assert_curve(&rows, &reference);
    assert!(close(j.test_accuracy, reference.test_accuracy), "{j:?}");
    rig.passed();
    Ok(())
}

/// Scenario 7: a model whose loss is infinite at the first step (an L2
/// factor of 1e38) fails every attempt. Its jobs end FAILED after the
/// attempt limit with the reason, counted as job failures; the worker that
/// failed three jobs in a row is quarantined (told so, shown by `status`)
/// while another worker finishes the sweep.
#[test]
fn a_job_that_always_fails_ends_failed_and_a_worker_failing_in_a_loop_is_quarantined(
) -> anyhow::Result<()> {
    let rig = Rig::new(
        "failing",
        3.0,
        &["--quarantine-after", "3", "--quarantine-secs", "600"],
    )?;
    // GRU costs more than RNN, so the failing jobs are leased first.
    let spec = write_spec(
        &rig.dir,
        "failing",
        &[("boom", "gru", "l2 = 1e38"), ("good", "rnn", "")],
        &[0, 1],
        "epochs = 2\nsteps_per_epoch = 20\nmax_attempts = 2",
    );
    let sweep = rig.submit(&spec)?;

    // Alone, w0 fails three attempts in a row and is quarantined.
    let mut w0 = rig.worker("w0", &sweep)?;
    let quarantined = rig.poll("w0 to be quarantined", || {
        let status = rig.status(&sweep)?;
        Ok(status
            .workers
            .iter()
            .any(|w| w.worker_id == "w0" && w.quarantined)
            .then_some(status))
    })?;
    let w = &quarantined.workers[0];
    assert_eq!(
        (w.n_job_failures, w.consecutive_failures, w.n_completed),
        (3, 3, 0)
    );
    assert!(w.quarantine_seconds_left > 500.0, "{w:?}");
    rig.poll("w0 to be told it is quarantined", || {
        Ok(rig
            .log("w0")
            .contains("quarantined by the coordinator")
            .then_some(()))
    })?;
    // It took nothing else: the good jobs are untouched.
    for j in quarantined.jobs.iter().filter(|j| j.model == "good") {
        assert_eq!((j.state.as_str(), j.attempt), ("PENDING", 0), "{j:?}");
    }

    // w1 finishes the sweep; the quarantined w0 is told the queue drained
    // and exits 1, since every job it ran failed.
    let mut w1 = rig.worker("w1", &sweep)?;
    rig.exits_cleanly(&mut w1)?;
    rig.exits_with(&mut w0, 1)?;
    ensure!(
        rig.log("w0")
            .contains("3 jobs: 0 completed, 3 failed, 0 interrupted"),
        "w0 did not count its jobs:\n{}",
        rig.log("w0")
    );

    let status = rig.status(&sweep)?;
    for j in &status.jobs {
        match j.model.as_str() {
            "boom" => {
                assert_eq!(
                    (
                        j.state.as_str(),
                        j.attempt,
                        j.job_failures,
                        j.infra_failures
                    ),
                    ("FAILED", 2, 2, 0),
                    "{j:?}"
                );
                assert!(j.last_error.contains("non-finite training loss"), "{j:?}");
            }
            _ => {
                assert_eq!(
                    (j.state.as_str(), j.attempt, j.worker_id.as_str()),
                    ("COMPLETED", 1, "w1"),
                    "{j:?}"
                );
                assert_eq!((j.job_failures, j.infra_failures), (0, 0));
            }
        }
    }
    let workers: Vec<(String, u32, u32, u32, bool)> = status
        .workers
        .iter()
        .map(|w| {
            (
                w.worker_id.clone(),
                w.n_completed,
                w.n_job_failures,
                w.consecutive_failures,
                w.quarantined,
            )
        })
        .collect();
    assert_eq!(
        workers,
        vec![("w0".into(), 0, 3, 3, true), ("w1".into(), 2, 1, 0, false)]
    );

    let summary = rig.summary(&sweep)?;
    assert!(summary.complete);
    let used: Vec<(String, u32, u32)> = summary
        .models
        .iter()
        .map(|m| (m.name.clone(), m.n_used, m.n_total))
        .collect();
    assert_eq!(used, vec![("boom".into(), 0, 2), ("good".into(), 2, 2)]);

    // The CLI shows the same, as JSON.
    let (code, out, err) = cli(
        &[
            "status",
            &sweep,
            "--coordinator",
            &rig.server.url,
            "--format",
            "json",
        ],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["workers"][0]["worker_id"], "w0");
    assert_eq!(json["workers"][0]["quarantined"], true);
    let boom = json["jobs"]
        .as_array()
        .context("jobs")?
        .iter()
        .find(|j| j["model"] == "boom")
        .context("a boom job")?;
    assert_eq!(
        (
            boom["job_failures"].as_u64(),
            boom["infra_failures"].as_u64()
        ),
        (Some(2), Some(0))
    );
    rig.passed();
    Ok(())
}

/// Bad input that only a worker finds (the sweep was submitted with
/// `--no-data-check`, or the data changed after submission): each job
/// fails at its first attempt with the file and line, and the worker is
/// not quarantined for the sweep's fault, even with a policy that
/// quarantines after one failure.
#[test]
fn bad_input_found_by_a_worker_fails_the_job_at_once_without_quarantine() -> anyhow::Result<()> {
    let rig = Rig::new(
        "input",
        10.0,
        &["--quarantine-after", "1", "--quarantine-secs", "600"],
    )?;
    let data = copy_real_folds(&rig.dir)?;
    // Rotation 0 tests on fold 4: a label no training fold has.
    let mut fold4 = std::fs::read_to_string(data.join("pfam_fold_4.csv"))?;
    fold4.push_str("MKVLAAGIVGLLLAQ,OnlyInTest\n");
    std::fs::write(data.join("pfam_fold_4.csv"), &fold4)?;
    let line = fold4.lines().count();
    let spec = write_spec(
        &rig.dir,
        "input",
        &[("gru", "gru", ""), ("rnn", "rnn", "")],
        &[0],
        "epochs = 1\nsteps_per_epoch = 2\nmax_attempts = 3",
    );
    let text = std::fs::read_to_string(&spec)?.replace(
        &repo_root()
            .join("examples/data/pfam-real")
            .display()
            .to_string(),
        &data.display().to_string(),
    );
    std::fs::write(&spec, text)?;
    let (code, _, err) = cli(
        &[
            "submit",
            spec.to_str().context("a UTF-8 path")?,
            "--coordinator",
            &rig.server.url,
            "--no-data-check",
        ],
        Some(TOKEN),
    )?;
    ensure!(code == 0, "submit failed: {err}");

    // One worker takes both jobs: a quarantine after the first would have
    // kept it from the second, and the queue would not drain. Both failed,
    // so it exits 1.
    let mut w0 = rig.worker("w0", "input")?;
    rig.exits_with(&mut w0, 1)?;
    let status = rig.status("input")?;
    assert_eq!(status.jobs.len(), 2);
    for j in &status.jobs {
        assert_eq!(
            (
                j.state.as_str(),
                j.attempt,
                j.job_failures,
                j.infra_failures
            ),
            ("FAILED", 1, 1, 0),
            "{j:?}"
        );
        assert!(
            j.last_error.contains(&format!("pfam_fold_4.csv:{line}"))
                && j.last_error.contains("`OnlyInTest`"),
            "{j:?}"
        );
    }
    let w = &status.workers[0];
    assert_eq!(
        (
            w.worker_id.as_str(),
            w.quarantined,
            w.consecutive_failures,
            w.n_job_failures
        ),
        ("w0", false, 0, 0),
        "{w:?}"
    );
    rig.passed();
    Ok(())
}

/// Scenario 8: cancel while the second of four jobs runs. Nothing is
/// COMPLETED afterwards: the running job stops at a step boundary, pending
/// jobs become CANCELLED. `resume` re-queues exactly the three cancelled
/// jobs; the interrupted one continues from its checkpoint, the finished
/// one is left alone.
#[test]
fn cancel_stops_a_sweep_and_resume_runs_exactly_the_cancelled_jobs() -> anyhow::Result<()> {
    let rig = Rig::new("cancel", 3.0, &[])?;
    let spec = write_spec(
        &rig.dir,
        "cancel",
        &[("gru", "gru", "")],
        &[0, 1, 2, 3],
        "epochs = 4\nsteps_per_epoch = 150\ncheckpoint_every = 1",
    );
    let sweep = rig.submit(&spec)?;
    let ids: Vec<i64> = rig.status(&sweep)?.jobs.iter().map(|j| j.job_id).collect();
    let watcher = rig.watch(&sweep)?;

    // One worker takes the jobs in id order (equal costs).
    let mut w0 = rig.worker("w0", &sweep)?;
    watcher.wait("the first job completed", rig.left(), |e| {
        is_state(e, ids[0], 1, "COMPLETED")
    })?;
    let running = watcher.wait("epoch 1 of the second job", rig.left(), |e| {
        is_epoch(e, ids[1], 1, 1)
    })?;
    let cancelled_at = watcher.len();
    let (code, out, err) = cli(
        &[
            "cancel",
            &sweep,
            "--coordinator",
            &rig.server.url,
            "--format",
            "json",
        ],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        (
            json["pending_cancelled"].as_u64(),
            json["running_signalled"].as_u64()
        ),
        (Some(2), Some(1))
    );
    watcher.wait("the running job cancelled", rig.left(), |e| {
        is_state(e, ids[1], 1, "CANCELLED")
    })?;
    rig.exits_cleanly(&mut w0)?;
    let after_cancel: Vec<_> = watcher.events()[cancelled_at..]
        .iter()
        .filter(|e| state_of(e) == Some("COMPLETED"))
        .cloned()
        .collect();
    assert!(after_cancel.is_empty(), "{after_cancel:?}");

    let status = rig.status(&sweep)?;
    let states: Vec<(&str, u32, u32, u32)> = status
        .jobs
        .iter()
        .map(|j| {
            (
                j.state.as_str(),
                j.attempt,
                j.infra_failures,
                j.job_failures,
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("COMPLETED", 1, 0, 0),
            ("CANCELLED", 1, 0, 0),
            ("CANCELLED", 0, 0, 0),
            ("CANCELLED", 0, 0, 0)
        ]
    );
    let first_accuracy = job(&status, ids[0]).test_accuracy;
    drop(watcher);

    let (code, out, err) = cli(
        &[
            "resume",
            &sweep,
            "--coordinator",
            &rig.server.url,
            "--format",
            "json",
        ],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["requeued"].as_u64(), Some(3));

    let watcher = rig.watch(&sweep)?;
    let mut w1 = rig.worker("w1", &sweep)?;
    rig.exits_cleanly(&mut w1)?;
    let mut leased: Vec<(i64, u32)> = watcher
        .events()
        .iter()
        .filter(|e| leased_by(e).is_some())
        .map(|e| (e.job_id, e.attempt))
        .collect();
    leased.sort_unstable();
    assert_eq!(leased, vec![(ids[1], 2), (ids[2], 1), (ids[3], 1)]);

    let status = rig.status(&sweep)?;
    let states: Vec<(&str, u32)> = status
        .jobs
        .iter()
        .map(|j| (j.state.as_str(), j.attempt))
        .collect();
    assert_eq!(
        states,
        vec![
            ("COMPLETED", 1),
            ("COMPLETED", 2),
            ("COMPLETED", 1),
            ("COMPLETED", 1)
        ]
    );
    assert_eq!(job(&status, ids[0]).test_accuracy, first_accuracy);

    let rows = rig.epochs(&sweep)?;
    let interrupted = rows_of(&rows, ids[1]);
    assert!(
        interrupted.iter().all(|r| r.attempt == 2),
        "{interrupted:?}"
    );
    assert_curve(&interrupted, &reference(&spec, "gru", 1)?);
    let measured = epoch_of(&running).context("metrics")?.seconds;
    let stored = interrupted[0].metrics.unwrap_or_default().seconds;
    assert!(close(measured, stored), "epoch 1 was trained again");
    assert_eq!(
        epochs_and_attempts(&rows_of(&rows, ids[0])),
        vec![(1, 1), (2, 1), (3, 1), (4, 1)]
    );
    let summary = rig.summary(&sweep)?;
    assert!(summary.complete);
    assert_eq!(
        (summary.models[0].n_used, summary.models[0].n_total),
        (4, 4)
    );
    rig.passed();
    Ok(())
}

/// Graceful stop: SIGTERM to a worker mid-job. It finishes its step, writes
/// a checkpoint, releases the lease and exits 0. The job is PENDING at once
/// (the lease time is 30 s and nobody waits for it), the release does not
/// use up an attempt (the spec allows one), and the next worker continues
/// the curve unbroken, equal to an uninterrupted run.
#[test]
fn sigterm_checkpoints_releases_the_lease_and_the_job_resumes_at_once() -> anyhow::Result<()> {
    let rig = Rig::new("sigterm", 30.0, &[])?;
    let spec = slow_job_spec(&rig.dir, "sigterm", 4, "max_attempts = 1");
    let sweep = rig.submit(&spec)?;
    let watcher = rig.watch(&sweep)?;

    let mut w0 = rig.worker("w0", &sweep)?;
    let first = watcher.wait("epoch 1 of attempt 1", rig.left(), |e| {
        e.attempt == 1 && epoch_of(e).is_some_and(|m| m.epoch == 1)
    })?;
    let job_id = first.job_id;
    w0.signal(SIGTERM);
    rig.exits_cleanly(&mut w0)?;

    let released = watcher.wait("the release", rig.left(), |e| {
        is_state(e, job_id, 1, "PENDING")
    })?;
    assert!(released.detail.contains("released"), "{released:?}");
    let status = rig.status(&sweep)?;
    let j = job(&status, job_id);
    assert_eq!(
        (
            j.state.as_str(),
            j.attempt,
            j.infra_failures,
            j.job_failures
        ),
        ("PENDING", 1, 0, 0)
    );

    let mut w1 = rig.worker("w1", &sweep)?;
    rig.exits_cleanly(&mut w1)?;
    let status = rig.status(&sweep)?;
    let j = job(&status, job_id);
    assert_eq!(
        (j.state.as_str(), j.attempt, j.worker_id.as_str()),
        ("COMPLETED", 2, "w1")
    );
    assert_eq!((j.infra_failures, j.job_failures), (0, 0));

    let rows = rig.epochs(&sweep)?;
    let rows = rows_of(&rows, job_id);
    assert!(rows.iter().all(|r| r.attempt == 2), "{rows:?}");
    let reference = reference(&spec, "gru", 0)?;
    assert_curve(&rows, &reference);
    assert!(close(j.test_accuracy, reference.test_accuracy), "{j:?}");
    let measured = epoch_of(&first).context("metrics")?.seconds;
    let stored = rows[0].metrics.unwrap_or_default().seconds;
    assert!(close(measured, stored), "epoch 1 was trained again");
    assert!(rig
        .log("w1")
        .contains("resuming from an earlier attempt's checkpoint"));
    rig.passed();
    Ok(())
}

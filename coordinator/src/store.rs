//! The durable state of a coordinator: one SQLite database (WAL mode) under
//! the state directory holding sweeps, jobs, epoch rows and results.
//!
//! Every state change is one transaction behind one mutex, so concurrent
//! leases can never hand out the same job, and a coordinator killed at any
//! point restarts from the last committed transaction. WAL with
//! `synchronous = NORMAL` survives a killed process (only a power loss can
//! drop the last commits).
//!
//! Fencing: each lease increments the job's attempt and draws a fresh random
//! token. Job messages must carry both; anything else is [`StoreError::Stale`].
//!
//! Epoch rows are keyed by (job, attempt, epoch) and inserted with
//! `INSERT OR IGNORE`, so a re-sent report is a no-op. A later attempt that
//! resumes from a checkpoint at epoch k reports k+1, k+2, ...; rows of an
//! earlier attempt at or after the first epoch a later attempt reported are
//! superseded and hidden from every query (see [`Store::epochs`]).
//!
//! Scheduling: a lease takes the pending job with the largest expected cost
//! first, estimated at submit time from the model kind, sequence length,
//! steps and epochs, and refined from measured seconds per epoch as epochs
//! are reported (see `reprice`). A sweep's `max_concurrent_jobs` is
//! stored with the sweep and counted against its RUNNING jobs at each lease,
//! so it holds across `resume` and coordinator restarts.
//!
//! Failures are counted apart per job: `infra_failures` (the lease expired:
//! the worker or its network was lost) and `job_failures` (the worker
//! reported that the job itself failed: an error, a non-finite loss, out of
//! memory). Cancelling and voluntary releases count as neither.
//!
//! Quarantine: each worker has a row in `workers` with its streak of
//! consecutive job failures. When the streak reaches
//! [`QuarantinePolicy::after`] the worker is quarantined for
//! [`QuarantinePolicy::cool_down_ms`]: it gets no lease (the answer says
//! why) while others can still take the queue. After the cool-down it may
//! lease again; one more failure quarantines it again at once, one
//! completed job clears the streak. Lost leases do not count: a lost worker
//! is not asking for work.
//!
//! An input error (the worker found the job's own data or model invalid in
//! a way every worker would: a malformed fold line, a label unseen in
//! training) fails the job at once and does not count toward the streak:
//! the sweep is at fault, not the worker.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rotsweep_shared::architecture::LayerInfo;
use rotsweep_shared::spec::SweepSpec;
use rotsweep_shared::summary::{self, GridModel, JobResult, Summary};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Job states as stored.
pub mod state {
    /// Waiting for a worker.
    pub const PENDING: &str = "PENDING";
    /// Leased by a worker.
    pub const RUNNING: &str = "RUNNING";
    /// Finished with a valid test metric.
    pub const COMPLETED: &str = "COMPLETED";
    /// Finished, but the test metric is NaN or missing.
    pub const INVALID: &str = "INVALID";
    /// Out of attempts.
    pub const FAILED: &str = "FAILED";
    /// Cancelled by a user.
    pub const CANCELLED: &str = "CANCELLED";

    /// True for states a job never leaves on its own.
    pub fn is_final(s: &str) -> bool {
        matches!(s, COMPLETED | INVALID | FAILED | CANCELLED)
    }
}

/// Errors of the store; the service maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    /// The state directory could not be prepared.
    #[error("cannot prepare state directory {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No such sweep.
    #[error("no sweep named `{0}`")]
    NoSweep(String),
    /// No such job.
    #[error("no job {0}")]
    NoJob(i64),
    /// The message belongs to an attempt that no longer holds the lease.
    #[error("stale lease: job {job_id} attempt {attempt} no longer holds the lease ({why})")]
    Stale {
        /// Job id.
        job_id: i64,
        /// The attempt the caller claimed.
        attempt: u32,
        /// What the job's state is now.
        why: String,
    },
    /// A different spec is already stored under this name.
    #[error(
        "sweep `{0}` already exists with a different spec; \
         pass --new-version to store this one as a new version"
    )]
    SpecConflict(String),
    /// The input is invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A group commit failed; nothing of the group was stored and the
    /// caller may retry.
    #[error("not stored, retry: {0}")]
    Unavailable(String),
}

/// Result alias of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// What a submit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitOutcome {
    /// Stored sweep name (with `.vN` for versions after the first).
    pub sweep: String,
    /// Jobs in the grid.
    pub n_jobs: usize,
    /// False when the identical spec was already stored.
    pub created: bool,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// Job id.
    pub job_id: i64,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Fencing token of the attempt.
    pub token: String,
    /// Sweep name.
    pub sweep: String,
    /// Model name.
    pub model: String,
    /// Rotation index.
    pub rotation: u32,
    /// The sweep's spec as JSON.
    pub spec_json: String,
    /// The same lease handed out again to a retried request.
    pub replayed: bool,
}

/// Who asks for a lease.
#[derive(Debug, Clone, Copy)]
pub struct LeaseRequest<'a> {
    pub worker_id: &'a str,
    /// Only this sweep's jobs.
    pub sweep: Option<&'a str>,
    /// The worker's id for this request, the same on its retries; empty for
    /// none (see [`Store::lease_in`]).
    pub request_id: &'a str,
}

/// Result of asking for a lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOutcome {
    /// A job was leased.
    Leased(Lease),
    /// Nothing queued, but jobs are running.
    Wait,
    /// Nothing queued or running.
    Drained,
    /// Jobs are queued but this worker is quarantined until `until_ms`.
    Quarantined {
        /// End of the cool-down (ms since the Unix epoch).
        until_ms: i64,
        /// Why, for the worker's log.
        reason: String,
    },
}

/// When a worker failing in a loop is stopped from taking more jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// Consecutive job failures of one worker that quarantine it (0 turns
    /// quarantine off).
    pub after: u32,
    /// How long a quarantine lasts, in milliseconds.
    pub cool_down_ms: i64,
}

impl Default for QuarantinePolicy {
    /// Three job failures in a row quarantine a worker for ten minutes.
    fn default() -> Self {
        Self {
            after: 3,
            cool_down_ms: 10 * 60 * 1000,
        }
    }
}

/// A lease that expired: the attempt ended and the job's new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Job id.
    pub job_id: i64,
    /// The attempt whose lease expired.
    pub attempt: u32,
    /// PENDING (re-queued), FAILED (out of attempts) or CANCELLED.
    pub state: &'static str,
    /// Why, as stored in `last_error`.
    pub reason: String,
}

/// A worker as shown by `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    /// The worker's name.
    pub worker_id: String,
    /// Attempts it finished with a result (COMPLETED or INVALID).
    pub n_completed: u32,
    /// Attempts it reported as failed by the job.
    pub n_job_failures: u32,
    /// Attempts whose lease it lost.
    pub n_infra_failures: u32,
    /// Job failures since its last completed job.
    pub consecutive_failures: u32,
    /// Seconds of quarantine left (0 when not quarantined).
    pub quarantine_seconds_left: f64,
}

/// Why an attempt ended without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCause {
    /// Infrastructure trouble the worker noticed (not the job's fault).
    Infra,
    /// The job failed (an error, a non-finite loss, out of memory): it
    /// counts against the attempt limit and the worker's streak.
    Job,
    /// The job's own input is invalid for every worker: it fails at once.
    Input,
    /// The worker stopped after a checkpoint: back to the queue, no
    /// attempt used.
    Release,
}

/// The triple that identifies one attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRef {
    /// Job id.
    pub job_id: i64,
    /// Attempt number.
    pub attempt: u32,
    /// Fencing token.
    pub token: String,
}

/// One epoch's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: u32,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy.
    pub train_accuracy: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy.
    pub val_accuracy: f64,
    /// Wall seconds.
    pub seconds: f64,
    /// Training examples per second.
    pub examples_per_second: f64,
}

/// A stored epoch row with its job.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRow {
    /// Job id.
    pub job_id: i64,
    /// Model name.
    pub model: String,
    /// Rotation.
    pub rotation: u32,
    /// Attempt that produced the row.
    pub attempt: u32,
    /// The metrics.
    pub metrics: EpochMetrics,
}

/// The test result of a finished job.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// Test accuracy (NaN when invalid).
    pub test_accuracy: f64,
    /// Test loss.
    pub test_loss: f64,
    /// Label order of the confusion matrix.
    pub labels: Vec<String>,
    /// Rows = true label.
    pub confusion: Vec<Vec<u64>>,
    /// Epochs trained.
    pub epochs_trained: u32,
    /// Epoch whose weights were tested.
    pub best_epoch: u32,
    /// Test examples.
    pub n_test: u32,
    /// The model's layer table as the worker built it (may be empty).
    pub layers: Vec<LayerInfo>,
}

/// A stored result with its job, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    /// Job id.
    pub job_id: i64,
    /// Model name.
    pub model: String,
    /// Model kind.
    pub kind: String,
    /// Rotation.
    pub rotation: u32,
    /// The attempt that completed the job.
    pub attempt: u32,
    /// COMPLETED or INVALID.
    pub state: String,
    /// The stored result (NaN accuracy and loss when not stored).
    pub completion: Completion,
}

/// A job as shown by `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// Job id.
    pub job_id: i64,
    /// Model name.
    pub model: String,
    /// Model kind.
    pub kind: String,
    /// Rotation.
    pub rotation: u32,
    /// Stored state.
    pub state: String,
    /// Attempts so far.
    pub attempt: u32,
    /// Worker of the current or last attempt.
    pub worker_id: String,
    /// Last epoch stored.
    pub epoch: u32,
    /// Best monitored metric so far.
    pub best_metric: Option<f64>,
    /// Seconds in the current attempt, or total run time when final.
    pub elapsed_seconds: f64,
    /// Last failure reason.
    pub last_error: String,
    /// Test accuracy when completed.
    pub test_accuracy: Option<f64>,
    /// Attempts lost to the infrastructure (expired leases).
    pub infra_failures: u32,
    /// Attempts that failed by the job's own fault.
    pub job_failures: u32,
}

/// The SQLite-backed store.
pub struct Store {
    /// The one connection that writes.
    conn: Mutex<Connection>,
    /// A read-only connection for queries (`None` when `conn` is itself
    /// read-only).
    reader: Option<Mutex<Connection>>,
    path: PathBuf,
    quarantine: QuarantinePolicy,
    /// Leases expired inside [`Store::lease`], not yet handed to
    /// [`Store::take_expired`] (the service publishes them).
    expired: Mutex<Vec<Expired>>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sweeps (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    base_name     TEXT NOT NULL,
    version       INTEGER NOT NULL,
    spec_json     TEXT NOT NULL,
    max_attempts  INTEGER NOT NULL,
    monitor       TEXT NOT NULL,
    cancelled     INTEGER NOT NULL DEFAULT 0,
    created_ms    INTEGER NOT NULL,
    max_concurrent INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    id                 INTEGER PRIMARY KEY,
    sweep_id           INTEGER NOT NULL REFERENCES sweeps(id),
    model              TEXT NOT NULL,
    kind               TEXT NOT NULL,
    rotation           INTEGER NOT NULL,
    state              TEXT NOT NULL,
    attempt            INTEGER NOT NULL DEFAULT 0,
    lease_token        TEXT,
    worker_id          TEXT NOT NULL DEFAULT '',
    lease_deadline_ms  INTEGER,
    attempt_started_ms INTEGER,
    cost               REAL NOT NULL,
    base_cost          REAL,
    infra_failures     INTEGER NOT NULL DEFAULT 0,
    job_failures       INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT NOT NULL DEFAULT '',
    last_epoch         INTEGER NOT NULL DEFAULT 0,
    best_metric        REAL,
    run_ms             INTEGER NOT NULL DEFAULT 0,
    released           INTEGER NOT NULL DEFAULT 0,
    lease_request      TEXT NOT NULL DEFAULT '',
    UNIQUE (sweep_id, model, rotation)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, cost DESC, id);
CREATE INDEX IF NOT EXISTS running_by_deadline ON jobs (lease_deadline_ms)
    WHERE state = 'RUNNING';
CREATE TABLE IF NOT EXISTS epochs (
    job_id              INTEGER NOT NULL REFERENCES jobs(id),
    attempt             INTEGER NOT NULL,
    epoch               INTEGER NOT NULL,
    train_loss          REAL,
    train_accuracy      REAL,
    val_loss            REAL,
    val_accuracy        REAL,
    seconds             REAL,
    examples_per_second REAL,
    PRIMARY KEY (job_id, attempt, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS results (
    job_id          INTEGER PRIMARY KEY REFERENCES jobs(id),
    attempt         INTEGER NOT NULL,
    test_accuracy   REAL,
    test_loss       REAL,
    labels_json     TEXT NOT NULL,
    confusion_json  TEXT NOT NULL,
    epochs_trained  INTEGER NOT NULL,
    best_epoch      INTEGER NOT NULL,
    n_test          INTEGER NOT NULL,
    layers_json     TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id             TEXT PRIMARY KEY,
    n_completed           INTEGER NOT NULL DEFAULT 0,
    n_job_failures        INTEGER NOT NULL DEFAULT 0,
    n_infra_failures      INTEGER NOT NULL DEFAULT 0,
    consecutive_failures  INTEGER NOT NULL DEFAULT 0,
    quarantined_until_ms  INTEGER,
    last_seen_ms          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS model_costs (
    sweep_id     INTEGER NOT NULL REFERENCES sweeps(id),
    model        TEXT NOT NULL,
    n            INTEGER NOT NULL,
    sum_seconds  REAL NOT NULL,
    base_cost    REAL NOT NULL,
    PRIMARY KEY (sweep_id, model)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    attempt     INTEGER NOT NULL,
    worker_id   TEXT NOT NULL,
    started_ms  INTEGER NOT NULL,
    PRIMARY KEY (job_id, attempt)
) WITHOUT ROWID;
"#;

/// Rows of `epochs` not superseded by a later attempt of the same job.
const VISIBLE_EPOCHS: &str = "NOT EXISTS (SELECT 1 FROM epochs l \
     WHERE l.job_id = e.job_id AND l.attempt > e.attempt AND l.epoch <= e.epoch)";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A fresh random fencing token (128 bits, hex).
fn new_token() -> String {
    use std::io::Read;
    let mut buf = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if from_os.is_err() {
        // Fall back to a time- and address-seeded generator; tokens only need
        // to differ between attempts, they are not secrets.
        let mut rng = rotsweep_shared::rng::SplitMix64::new(
            now_ms() as u64 ^ (&buf as *const _ as u64) ^ u64::from(std::process::id()),
        );
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// Opens (creating if needed) `DIR/state.sqlite`.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join("state.sqlite");
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let had_costs: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'model_costs'",
            [],
            |r| r.get(0),
        )?;
        conn.execute_batch(SCHEMA)?;
        if !had_costs {
            // Databases made before the running per-model epoch times.
            conn.execute_batch(
                "INSERT OR IGNORE INTO model_costs (sweep_id, model, n, sum_seconds, base_cost) \
                 SELECT j.sweep_id, j.model, COUNT(*), SUM(e.seconds), MAX(j.base_cost) \
                 FROM epochs e JOIN jobs j ON j.id = e.job_id \
                 WHERE e.seconds > 0 AND j.base_cost > 0 GROUP BY j.sweep_id, j.model",
            )?;
        }
        // Databases made before layer tables were stored lack the column.
        if !has_column(&conn, "results", "layers_json")? {
            conn.execute_batch(
                "ALTER TABLE results ADD COLUMN layers_json TEXT NOT NULL DEFAULT '[]'",
            )?;
        }
        // Databases made before the concurrency cap and measured costs.
        if !has_column(&conn, "sweeps", "max_concurrent")? {
            conn.execute_batch("ALTER TABLE sweeps ADD COLUMN max_concurrent INTEGER")?;
        }
        // Databases made before idempotent lease requests.
        if !has_column(&conn, "jobs", "lease_request")? {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN lease_request TEXT NOT NULL DEFAULT ''",
            )?;
        }
        // A retried lease request finds its running lease in O(1).
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS running_by_request ON jobs (worker_id, lease_request) \
             WHERE state = 'RUNNING'",
        )?;
        if !has_column(&conn, "jobs", "base_cost")? {
            conn.execute_batch(
                "ALTER TABLE jobs ADD COLUMN base_cost REAL; \
                 UPDATE jobs SET base_cost = cost WHERE base_cost IS NULL;",
            )?;
        }
        // Queries read through their own connection, so a status call never
        // waits for a write transaction (WAL lets readers and one writer
        // overlap).
        let reader = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self {
            conn: Mutex::new(conn),
            reader: Some(Mutex::new(reader)),
            path,
            quarantine: QuarantinePolicy::default(),
            expired: Mutex::new(Vec::new()),
        })
    }

    /// The same store with another quarantine policy.
    pub fn with_quarantine(mut self, policy: QuarantinePolicy) -> Self {
        self.quarantine = policy;
        self
    }

    /// Opens an existing `DIR/state.sqlite` read-only, for reports and
    /// exports while a coordinator may be writing it. Nothing is created or
    /// migrated; calls that write fail.
    pub fn open_read_only(dir: &Path) -> StoreResult<Self> {
        let path = dir.join("state.sqlite");
        if !path.is_file() {
            return Err(StoreError::Invalid(format!(
                "no state database at {} (is {} a coordinator's --state directory?)",
                path.display(),
                dir.display()
            )));
        }
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self {
            conn: Mutex::new(conn),
            reader: None,
            path,
            quarantine: QuarantinePolicy::default(),
            expired: Mutex::new(Vec::new()),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the open
        // transaction is rolled back on drop), so a poisoned lock is usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection for queries that only read.
    fn read(&self) -> std::sync::MutexGuard<'_, Connection> {
        match &self.reader {
            Some(reader) => reader.lock().unwrap_or_else(|p| p.into_inner()),
            None => self.lock(),
        }
    }

    /// Stores a spec and its job grid. The identical spec under the same name
    /// is a no-op; a different one is refused unless `new_version`.
    pub fn submit(&self, spec: &SweepSpec, new_version: bool) -> StoreResult<SubmitOutcome> {
        self.write(|tx| self.submit_in(tx, spec, new_version))
    }

    /// [`Store::submit`] inside the caller's open transaction.
    pub fn submit_in(
        &self,
        tx: &Connection,
        spec: &SweepSpec,
        new_version: bool,
    ) -> StoreResult<SubmitOutcome> {
        let spec_json = spec.to_json();

        let versions: Vec<(String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT name, spec_json FROM sweeps WHERE base_name = ?1 ORDER BY version",
            )?;
            let rows = stmt.query_map([&spec.name], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let n_jobs = spec.jobs().len();
        if let Some((name, _)) = versions.iter().find(|(_, json)| json == &spec_json) {
            return Ok(SubmitOutcome {
                sweep: name.clone(),
                n_jobs,
                created: false,
            });
        }
        if !versions.is_empty() && !new_version {
            return Err(StoreError::SpecConflict(spec.name.clone()));
        }

        let version = versions.len() as i64 + 1;
        let name = if version == 1 {
            spec.name.clone()
        } else {
            format!("{}.v{version}", spec.name)
        };
        tx.execute(
            "INSERT INTO sweeps (name, base_name, version, spec_json, max_attempts, monitor, \
             created_ms, max_concurrent) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                name,
                spec.name,
                version,
                spec_json,
                spec.train.max_attempts,
                spec.train.monitor.as_str(),
                now_ms(),
                spec.train.max_concurrent_jobs.map(|n| n as i64)
            ],
        )?;
        let sweep_id = tx.last_insert_rowid();
        let length = spec.data.max_len.unwrap_or(512) as f64;
        let steps = spec.train.steps_per_epoch.unwrap_or(100) as f64;
        for job in spec.jobs() {
            let cost = job.kind.relative_cost() * length * steps * spec.train.epochs as f64;
            tx.execute(
                "INSERT INTO jobs (sweep_id, model, kind, rotation, state, cost, base_cost) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![
                    sweep_id,
                    job.model,
                    job.kind.as_str(),
                    job.rotation as i64,
                    state::PENDING,
                    cost
                ],
            )?;
        }
        Ok(SubmitOutcome {
            sweep: name,
            n_jobs,
            created: true,
        })
    }

    /// Re-queues (or fails, or cancels) every RUNNING job whose lease
    /// deadline passed, and returns them.
    pub fn expire_leases(&self, now: i64) -> StoreResult<Vec<Expired>> {
        self.write(|tx| self.expire_leases_in(tx, now))
    }

    /// [`Store::expire_leases`] inside the caller's open transaction.
    pub fn expire_leases_in(&self, tx: &Connection, now: i64) -> StoreResult<Vec<Expired>> {
        let expired = expire_in(tx, now)?;
        Ok(expired)
    }

    /// Pushes the lease deadline of every RUNNING job to at least
    /// `now + ttl_ms`, so a coordinator that was down longer than a lease
    /// does not, on restart, expire the leases of
    /// workers that kept running while it was down (and are retrying their
    /// heartbeats). Returns the number of leases extended.
    pub fn extend_running_leases(&self, now: i64, ttl_ms: i64) -> StoreResult<usize> {
        let conn = self.lock();
        Ok(conn.execute(
            "UPDATE jobs SET lease_deadline_ms = MAX(lease_deadline_ms, ?1) WHERE state = ?2",
            params![now + ttl_ms, state::RUNNING],
        )?)
    }

    /// Leases the queued job with the largest expected cost (see
    /// [`reprice`]), skipping sweeps that already run their
    /// `max_concurrent_jobs`.
    pub fn lease(
        &self,
        worker_id: &str,
        sweep: Option<&str>,
        now: i64,
        ttl_ms: i64,
    ) -> StoreResult<LeaseOutcome> {
        let request = LeaseRequest {
            worker_id,
            sweep,
            request_id: "",
        };
        self.write(|tx| self.lease_in(tx, &request, now, ttl_ms))
    }

    /// [`Store::lease`] inside the caller's open transaction.
    ///
    /// A request whose `request_id` matches the running lease it took
    /// earlier (the worker retried because the answer was lost) gets that
    /// lease again, with its deadline extended and `replayed` set.
    pub fn lease_in(
        &self,
        tx: &Connection,
        request: &LeaseRequest<'_>,
        now: i64,
        ttl_ms: i64,
    ) -> StoreResult<LeaseOutcome> {
        let (worker_id, sweep) = (request.worker_id, request.sweep);
        let expired = expire_in(tx, now)?;
        if !expired.is_empty() {
            self.expired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(expired);
        }
        if !request.request_id.is_empty() {
            if let Some(lease) = replay_lease(tx, request, now, ttl_ms)? {
                return Ok(LeaseOutcome::Leased(lease));
            }
        }

        let sweep_id: Option<i64> = match sweep {
            Some(name) => Some(
                tx.query_row("SELECT id FROM sweeps WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?
                .ok_or_else(|| StoreError::NoSweep(name.to_string()))?,
            ),
            None => None,
        };

        let candidate: Option<(i64, u32, String, String, u32, String)> = tx
            .query_row(
                "SELECT j.id, j.attempt, s.name, j.model, j.rotation, s.spec_json \
                 FROM jobs j JOIN sweeps s ON s.id = j.sweep_id \
                 WHERE j.state = ?1 AND s.cancelled = 0 AND (?2 IS NULL OR j.sweep_id = ?2) \
                 AND (s.max_concurrent IS NULL OR s.max_concurrent > (SELECT COUNT(*) \
                     FROM jobs r WHERE r.sweep_id = s.id AND r.state = 'RUNNING')) \
                 ORDER BY j.cost DESC, j.id LIMIT 1",
                params![state::PENDING, sweep_id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()?;

        tx.execute(
            "INSERT INTO workers (worker_id, last_seen_ms) VALUES (?1, ?2) \
             ON CONFLICT (worker_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
            params![worker_id, now],
        )?;
        let (quarantined_until, streak): (Option<i64>, u32) = tx.query_row(
            "SELECT quarantined_until_ms, consecutive_failures FROM workers WHERE worker_id = ?1",
            [worker_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if let (Some(until_ms), Some(_)) = (quarantined_until.filter(|&u| u > now), &candidate) {
            return Ok(LeaseOutcome::Quarantined {
                until_ms,
                reason: format!(
                    "worker `{worker_id}` failed {streak} jobs in a row; \
                     quarantined for {:.0} s more",
                    (until_ms - now) as f64 / 1000.0
                ),
            });
        }

        let outcome = match candidate {
            Some((job_id, attempt, sweep, model, rotation, spec_json)) => {
                let attempt = attempt + 1;
                let token = new_token();
                tx.execute(
                    "UPDATE jobs SET state = ?1, attempt = ?2, lease_token = ?3, worker_id = ?4, \
                     lease_deadline_ms = ?5, attempt_started_ms = ?6, lease_request = ?7 \
                     WHERE id = ?8",
                    params![
                        state::RUNNING,
                        attempt,
                        token,
                        worker_id,
                        now + ttl_ms,
                        now,
                        request.request_id,
                        job_id
                    ],
                )?;
                tx.execute(
                    "INSERT OR REPLACE INTO attempts (job_id, attempt, worker_id, started_ms) \
                     VALUES (?1, ?2, ?3, ?4)",
                    params![job_id, attempt, worker_id, now],
                )?;
                LeaseOutcome::Leased(Lease {
                    job_id,
                    attempt,
                    token,
                    sweep,
                    model,
                    rotation,
                    spec_json,
                    replayed: false,
                })
            }
            None => {
                let running: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM jobs WHERE state = ?1 AND (?2 IS NULL OR sweep_id = ?2)",
                    params![state::RUNNING, sweep_id],
                    |r| r.get(0),
                )?;
                if running > 0 {
                    LeaseOutcome::Wait
                } else {
                    LeaseOutcome::Drained
                }
            }
        };
        Ok(outcome)
    }

    /// Leases that [`Store::lease`] expired on its way, since the last call.
    pub fn take_expired(&self) -> Vec<Expired> {
        std::mem::take(&mut *self.expired.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Extends a lease. Returns true when the job's sweep was cancelled.
    pub fn heartbeat(&self, at: &AttemptRef, now: i64, ttl_ms: i64) -> StoreResult<bool> {
        self.write(|tx| self.heartbeat_in(tx, at, now, ttl_ms))
    }

    /// [`Store::heartbeat`] inside the caller's open transaction.
    pub fn heartbeat_in(
        &self,
        tx: &Connection,
        at: &AttemptRef,
        now: i64,
        ttl_ms: i64,
    ) -> StoreResult<bool> {
        let cancelled = check_fence(tx, at)?;
        tx.execute(
            "UPDATE jobs SET lease_deadline_ms = ?1 WHERE id = ?2",
            params![now + ttl_ms, at.job_id],
        )?;
        Ok(cancelled)
    }

    /// Stores one epoch row. Returns (stored, cancelled); `stored` is false
    /// for a re-sent report.
    pub fn report_epoch(
        &self,
        at: &AttemptRef,
        m: &EpochMetrics,
        now: i64,
        ttl_ms: i64,
    ) -> StoreResult<(bool, bool)> {
        let report = Report {
            at: at.clone(),
            metrics: *m,
            now,
            ttl_ms,
        };
        self.report_epochs(std::slice::from_ref(&report))
            .pop()
            .expect("one answer per report")
    }

    /// Stores a group of epoch reports in one transaction (group commit):
    /// one answer per report, in order, each as [`Store::report_epoch`]
    /// would give it. A refused report (stale, invalid) is rolled back to
    /// its savepoint and does not affect the others; if the commit itself
    /// fails, every report gets the error and nothing is stored.
    pub fn report_epochs(&self, reports: &[Report]) -> Vec<StoreResult<(bool, bool)>> {
        let mut answers = Vec::with_capacity(reports.len());
        let committed = self.group(|tx| {
            answers.extend(
                reports
                    .iter()
                    .map(|r| in_savepoint(tx, |tx| self.report_in(tx, r))),
            );
        });
        match committed {
            Ok(()) => answers,
            Err(e) => {
                let why = e.to_string();
                reports
                    .iter()
                    .map(|_| Err(StoreError::Unavailable(why.clone())))
                    .collect()
            }
        }
    }

    /// [`Store::report_epoch`] inside the caller's open transaction; like
    /// every `*_in` method it leaves a refused write's partial changes to
    /// the caller's savepoint ([`in_savepoint`]).
    pub fn report_in(&self, conn: &Connection, r: &Report) -> StoreResult<(bool, bool)> {
        let (at, m) = (&r.at, &r.metrics);
        if m.epoch == 0 {
            return Err(StoreError::Invalid("epoch numbers start at 1".into()));
        }
        let cancelled = check_fence(conn, at)?;
        let n = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO epochs (job_id, attempt, epoch, train_loss, train_accuracy, \
                 val_loss, val_accuracy, seconds, examples_per_second) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                at.job_id,
                at.attempt,
                m.epoch,
                m.train_loss,
                m.train_accuracy,
                m.val_loss,
                m.val_accuracy,
                m.seconds,
                m.examples_per_second
            ])?;

        // Keep the status columns (last epoch, best monitored metric) current.
        // A job has at most a few hundred rows, and the primary key finds them.
        let monitor: String = conn
            .prepare_cached(
                "SELECT s.monitor FROM sweeps s JOIN jobs j ON j.sweep_id = s.id WHERE j.id = ?1",
            )?
            .query_row([at.job_id], |r| r.get(0))?;
        let best_sql = if monitor == "val_loss" {
            "MIN(val_loss)"
        } else {
            "MAX(val_accuracy)"
        };
        let (last_epoch, best): (Option<u32>, Option<f64>) = conn
            .prepare_cached(&format!(
                "SELECT MAX(epoch), {best_sql} FROM epochs e WHERE job_id = ?1 AND {VISIBLE_EPOCHS}"
            ))?
            .query_row([at.job_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        conn.prepare_cached(
            "UPDATE jobs SET last_epoch = ?1, best_metric = ?2, lease_deadline_ms = ?3 WHERE id = ?4",
        )?
        .execute(params![
            last_epoch.unwrap_or(0),
            best,
            r.now + r.ttl_ms,
            at.job_id
        ])?;
        if n == 1 {
            note_epoch_time(conn, at.job_id, m.seconds)?;
        }
        Ok((n == 1, cancelled))
    }

    /// Runs `f` in one IMMEDIATE transaction and commits it: the frame of
    /// every single write.
    fn write<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs several writes in one IMMEDIATE transaction and commits them
    /// together (group commit). Each write runs through a `*_in` method
    /// under [`in_savepoint`], so one refused write rolls back alone; the
    /// error returned is the commit's, which undoes them all.
    pub fn group(&self, f: impl FnOnce(&Connection)) -> StoreResult<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        f(&tx);
        tx.commit()?;
        Ok(())
    }

    /// Stores a job's test result and ends its lease: COMPLETED, or INVALID
    /// when the accuracy is not finite. Completing a job of a cancelled
    /// sweep stores nothing and marks it CANCELLED. A completion re-sent by
    /// the attempt that already completed the job (its answer was lost) is
    /// a no-op.
    pub fn complete(&self, at: &AttemptRef, c: &Completion, now: i64) -> StoreResult<()> {
        self.write(|tx| self.complete_in(tx, at, c, now))
    }

    /// [`Store::complete`] inside the caller's open transaction.
    pub fn complete_in(
        &self,
        tx: &Connection,
        at: &AttemptRef,
        c: &Completion,
        now: i64,
    ) -> StoreResult<()> {
        let n = c.labels.len();
        if c.confusion.len() != n || c.confusion.iter().any(|row| row.len() != n) {
            return Err(StoreError::Invalid(format!(
                "confusion matrix must be {n}x{n} for {n} labels"
            )));
        }
        // Completion keeps the attempt's token, so a retry can be told from
        // a stale attempt.
        let done_by_this_attempt: bool = tx
            .query_row(
                "SELECT state IN ('COMPLETED', 'INVALID', 'CANCELLED') AND attempt = ?2 \
                 AND lease_token = ?3 FROM jobs WHERE id = ?1",
                params![at.job_id, at.attempt, at.token],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false);
        if done_by_this_attempt {
            return Ok(());
        }
        let cancelled = check_fence(tx, at)?;
        let run_ms = run_ms_of(tx, at.job_id, now)?;
        if cancelled {
            tx.execute(
                "UPDATE jobs SET state = ?1, lease_deadline_ms = NULL, run_ms = ?2 WHERE id = ?3",
                params![state::CANCELLED, run_ms, at.job_id],
            )?;
            return Ok(());
        }

        let accuracy = c.test_accuracy.is_finite().then_some(c.test_accuracy);
        tx.execute(
            "INSERT OR REPLACE INTO results (job_id, attempt, test_accuracy, test_loss, \
             labels_json, confusion_json, epochs_trained, best_epoch, n_test, layers_json) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                at.job_id,
                at.attempt,
                accuracy,
                c.test_loss.is_finite().then_some(c.test_loss),
                serde_json::to_string(&c.labels).expect("strings serialise"),
                serde_json::to_string(&c.confusion).expect("integers serialise"),
                c.epochs_trained,
                c.best_epoch,
                c.n_test,
                serde_json::to_string(&c.layers).expect("layer rows serialise")
            ],
        )?;
        let new_state = if accuracy.is_some() {
            state::COMPLETED
        } else {
            state::INVALID
        };
        tx.execute(
            "UPDATE jobs SET state = ?1, lease_deadline_ms = NULL, run_ms = ?2 WHERE id = ?3",
            params![new_state, run_ms, at.job_id],
        )?;
        tx.execute(
            "UPDATE workers SET n_completed = n_completed + 1, consecutive_failures = 0, \
             quarantined_until_ms = NULL \
             WHERE worker_id = (SELECT worker_id FROM jobs WHERE id = ?1)",
            [at.job_id],
        )?;
        Ok(())
    }

    /// Records a failed attempt. The job goes back to the queue while
    /// attempts remain; returns the job's new state. A `release`
    /// (graceful worker shutdown) always re-queues and does not count
    /// against the attempt limit. In a cancelled sweep the job becomes
    /// CANCELLED and nothing is counted as a failure. A job fault extends
    /// the worker's failure streak and may quarantine it; an input error
    /// fails the job at once and leaves the worker's record alone.
    pub fn fail(
        &self,
        at: &AttemptRef,
        reason: &str,
        cause: FailCause,
        now: i64,
    ) -> StoreResult<&'static str> {
        self.write(|tx| self.fail_in(tx, at, reason, cause, now))
    }

    /// [`Store::fail`] inside the caller's open transaction.
    pub fn fail_in(
        &self,
        tx: &Connection,
        at: &AttemptRef,
        reason: &str,
        cause: FailCause,
        now: i64,
    ) -> StoreResult<&'static str> {
        let release = cause == FailCause::Release;
        let job_fault = matches!(cause, FailCause::Job | FailCause::Input);
        let cancelled = check_fence(tx, at)?;
        let run_ms = run_ms_of(tx, at.job_id, now)?;
        let (max_attempts, released): (u32, u32) = tx.query_row(
            "SELECT s.max_attempts, j.released FROM sweeps s JOIN jobs j ON j.sweep_id = s.id \
             WHERE j.id = ?1",
            [at.job_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if release && !cancelled {
            tx.execute(
                "UPDATE jobs SET state = ?1, lease_token = NULL, lease_deadline_ms = NULL, \
                 released = released + 1, run_ms = ?2 WHERE id = ?3",
                params![state::PENDING, run_ms, at.job_id],
            )?;
            return Ok(state::PENDING);
        }
        if cancelled {
            tx.execute(
                "UPDATE jobs SET state = ?1, lease_token = NULL, lease_deadline_ms = NULL, \
                 last_error = ?2, run_ms = ?3 WHERE id = ?4",
                params![state::CANCELLED, reason, run_ms, at.job_id],
            )?;
            return Ok(state::CANCELLED);
        }
        let new_state =
            if cause == FailCause::Input || at.attempt.saturating_sub(released) >= max_attempts {
                state::FAILED
            } else {
                state::PENDING
            };
        let counter = if job_fault {
            "job_failures"
        } else {
            "infra_failures"
        };
        tx.execute(
            &format!(
                "UPDATE jobs SET state = ?1, lease_token = NULL, lease_deadline_ms = NULL, \
                 last_error = ?2, {counter} = {counter} + 1, run_ms = ?3 WHERE id = ?4"
            ),
            params![new_state, reason, run_ms, at.job_id],
        )?;
        if cause == FailCause::Input {
            // The sweep's fault: the worker's record stays as it was.
        } else if job_fault {
            let policy = self.quarantine;
            let until = (policy.after > 0).then_some(now + policy.cool_down_ms);
            tx.execute(
                "UPDATE workers SET n_job_failures = n_job_failures + 1, \
                 consecutive_failures = consecutive_failures + 1, \
                 quarantined_until_ms = CASE WHEN ?2 IS NOT NULL \
                     AND consecutive_failures + 1 >= ?3 THEN ?2 ELSE quarantined_until_ms END \
                 WHERE worker_id = (SELECT worker_id FROM jobs WHERE id = ?1)",
                params![at.job_id, until, policy.after],
            )?;
        } else {
            tx.execute(
                "UPDATE workers SET n_infra_failures = n_infra_failures + 1 \
                 WHERE worker_id = (SELECT worker_id FROM jobs WHERE id = ?1)",
                [at.job_id],
            )?;
        }
        Ok(new_state)
    }

    /// Cancels a sweep: pending jobs become CANCELLED at once, running ones
    /// are told on their next heartbeat or report. Returns (pending
    /// cancelled, running signalled).
    pub fn cancel(&self, sweep: &str) -> StoreResult<(usize, usize)> {
        self.write(|tx| self.cancel_in(tx, sweep))
    }

    /// [`Store::cancel`] inside the caller's open transaction.
    pub fn cancel_in(&self, tx: &Connection, sweep: &str) -> StoreResult<(usize, usize)> {
        let sweep_id = sweep_id_in(tx, sweep)?;
        tx.execute("UPDATE sweeps SET cancelled = 1 WHERE id = ?1", [sweep_id])?;
        let pending = tx.execute(
            "UPDATE jobs SET state = ?1 WHERE sweep_id = ?2 AND state = ?3",
            params![state::CANCELLED, sweep_id, state::PENDING],
        )?;
        let running: i64 = tx.query_row(
            "SELECT COUNT(*) FROM jobs WHERE sweep_id = ?1 AND state = ?2",
            params![sweep_id, state::RUNNING],
            |r| r.get(0),
        )?;
        Ok((pending, running as usize))
    }

    /// Re-queues the sweep's jobs in `states` with a fresh attempt budget
    /// and lifts a cancel. Returns the number of jobs re-queued.
    pub fn resume(&self, sweep: &str, states: &[&str]) -> StoreResult<usize> {
        self.write(|tx| self.resume_in(tx, sweep, states))
    }

    /// [`Store::resume`] inside the caller's open transaction.
    pub fn resume_in(&self, tx: &Connection, sweep: &str, states: &[&str]) -> StoreResult<usize> {
        for s in states {
            if !matches!(*s, state::FAILED | state::CANCELLED | state::INVALID) {
                return Err(StoreError::Invalid(format!(
                    "cannot resume jobs in state `{s}` (use FAILED, CANCELLED or INVALID)"
                )));
            }
        }
        let sweep_id = sweep_id_in(tx, sweep)?;
        tx.execute("UPDATE sweeps SET cancelled = 0 WHERE id = ?1", [sweep_id])?;
        let mut n = 0;
        for s in states {
            // `released = attempt` gives the job its whole attempt budget
            // back while attempt numbers keep growing (fencing stays intact).
            n += tx.execute(
                "UPDATE jobs SET state = ?1, released = attempt, last_error = '' \
                 WHERE sweep_id = ?2 AND state = ?3",
                params![state::PENDING, sweep_id, s],
            )?;
        }
        Ok(n)
    }

    /// Names of all sweeps, oldest first.
    pub fn sweeps(&self) -> StoreResult<Vec<String>> {
        let conn = self.read();
        let mut stmt = conn.prepare("SELECT name FROM sweeps ORDER BY id")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The stored spec of a sweep.
    pub fn spec_json(&self, sweep: &str) -> StoreResult<String> {
        let conn = self.read();
        conn.query_row(
            "SELECT spec_json FROM sweeps WHERE name = ?1",
            [sweep],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| StoreError::NoSweep(sweep.to_string()))
    }

    /// Every job of a sweep, by id.
    pub fn jobs(&self, sweep: &str, now: i64) -> StoreResult<Vec<JobView>> {
        let conn = self.read();
        let sweep_id = sweep_id_in(&conn, sweep)?;
        let mut stmt = conn.prepare(
            "SELECT j.id, j.model, j.kind, j.rotation, j.state, j.attempt, j.worker_id, \
             j.last_epoch, j.best_metric, j.attempt_started_ms, j.run_ms, j.last_error, \
             r.test_accuracy, j.infra_failures, j.job_failures \
             FROM jobs j LEFT JOIN results r ON r.job_id = j.id \
             WHERE j.sweep_id = ?1 ORDER BY j.id",
        )?;
        let rows = stmt.query_map([sweep_id], |r| {
            let state: String = r.get(4)?;
            let started: Option<i64> = r.get(9)?;
            let run_ms: i64 = r.get(10)?;
            let elapsed_ms = if state == state::RUNNING {
                started.map_or(0, |s| now - s)
            } else {
                run_ms
            };
            Ok(JobView {
                job_id: r.get(0)?,
                model: r.get(1)?,
                kind: r.get(2)?,
                rotation: r.get(3)?,
                state,
                attempt: r.get(5)?,
                worker_id: r.get(6)?,
                epoch: r.get(7)?,
                best_metric: r.get(8)?,
                elapsed_seconds: elapsed_ms as f64 / 1000.0,
                last_error: r.get(11)?,
                test_accuracy: r.get(12)?,
                infra_failures: r.get(13)?,
                job_failures: r.get(14)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The workers that held a lease on a job of `sweep`, by name, with
    /// their failure counts and quarantine state (over all sweeps).
    pub fn workers(&self, sweep: &str, now: i64) -> StoreResult<Vec<WorkerView>> {
        let conn = self.read();
        let sweep_id = sweep_id_in(&conn, sweep)?;
        let mut stmt = conn.prepare(
            "SELECT w.worker_id, w.n_completed, w.n_job_failures, w.n_infra_failures, \
             w.consecutive_failures, w.quarantined_until_ms FROM workers w \
             WHERE w.worker_id IN (SELECT a.worker_id FROM attempts a \
                 JOIN jobs j ON j.id = a.job_id WHERE j.sweep_id = ?1) \
             ORDER BY w.worker_id",
        )?;
        let rows = stmt.query_map([sweep_id], |r| {
            let until: Option<i64> = r.get(5)?;
            Ok(WorkerView {
                worker_id: r.get(0)?,
                n_completed: r.get(1)?,
                n_job_failures: r.get(2)?,
                n_infra_failures: r.get(3)?,
                consecutive_failures: r.get(4)?,
                quarantine_seconds_left: until.map_or(0.0, |u| (u - now).max(0) as f64 / 1000.0),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Visible epoch rows of a sweep: one per (job, epoch), by job then epoch.
    pub fn epochs(&self, sweep: &str) -> StoreResult<Vec<EpochRow>> {
        let conn = self.read();
        let sweep_id = sweep_id_in(&conn, sweep)?;
        let mut stmt = conn.prepare(&format!(
            "SELECT e.job_id, j.model, j.rotation, e.attempt, e.epoch, e.train_loss, \
             e.train_accuracy, e.val_loss, e.val_accuracy, e.seconds, e.examples_per_second \
             FROM epochs e JOIN jobs j ON j.id = e.job_id \
             WHERE j.sweep_id = ?1 AND {VISIBLE_EPOCHS} ORDER BY e.job_id, e.epoch"
        ))?;
        let rows = stmt.query_map([sweep_id], |r| {
            let f = |i: usize| -> rusqlite::Result<f64> {
                Ok(r.get::<_, Option<f64>>(i)?.unwrap_or(f64::NAN))
            };
            Ok(EpochRow {
                job_id: r.get(0)?,
                model: r.get(1)?,
                rotation: r.get(2)?,
                attempt: r.get(3)?,
                metrics: EpochMetrics {
                    epoch: r.get(4)?,
                    train_loss: f(5)?,
                    train_accuracy: f(6)?,
                    val_loss: f(7)?,
                    val_accuracy: f(8)?,
                    seconds: f(9)?,
                    examples_per_second: f(10)?,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The cross-rotation summary of a sweep (partial while it runs).
    pub fn summary(&self, sweep: &str) -> StoreResult<Summary> {
        let conn = self.read();
        let sweep_id = sweep_id_in(&conn, sweep)?;

        let mut grid: Vec<GridModel> = Vec::new();
        let mut complete = true;
        {
            let mut stmt = conn.prepare(
                "SELECT model, kind, COUNT(*), SUM(state IN ('COMPLETED','INVALID','FAILED',\
                 'CANCELLED')) FROM jobs WHERE sweep_id = ?1 GROUP BY model, kind ORDER BY model",
            )?;
            let rows = stmt.query_map([sweep_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            for row in rows {
                let (name, kind, n_total, n_final) = row?;
                complete &= n_final == n_total;
                grid.push(GridModel {
                    name,
                    kind,
                    n_total: n_total as usize,
                });
            }
        }

        // Seconds per epoch come from the visible epoch rows of each job.
        let mut stmt = conn.prepare(&format!(
            "SELECT j.model, j.rotation, r.test_accuracy, r.epochs_trained, r.best_epoch, \
             r.labels_json, r.confusion_json, \
             (SELECT AVG(e.seconds) FROM epochs e WHERE e.job_id = j.id AND {VISIBLE_EPOCHS}) \
             FROM results r JOIN jobs j ON j.id = r.job_id \
             WHERE j.sweep_id = ?1 AND j.state IN ('COMPLETED', 'INVALID')"
        ))?;
        let rows = stmt.query_map([sweep_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<f64>>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, Option<f64>>(7)?,
            ))
        })?;
        let mut results = Vec::new();
        for row in rows {
            let (model, rotation, acc, epochs, best_epoch, labels, confusion, spe) = row?;
            let corrupt = |e: serde_json::Error| {
                StoreError::Invalid(format!("stored result of {model}/{rotation}: {e}"))
            };
            results.push(JobResult {
                model: model.clone(),
                rotation: rotation as usize,
                test_accuracy: acc.unwrap_or(f64::NAN),
                epochs,
                best_epoch,
                seconds_per_epoch: spe.unwrap_or(f64::NAN),
                labels: serde_json::from_str(&labels).map_err(corrupt)?,
                confusion: serde_json::from_str(&confusion).map_err(corrupt)?,
            });
        }
        summary::summarize(sweep, &grid, &results, complete)
            .map_err(|e| StoreError::Invalid(e.to_string()))
    }

    /// Every stored result of a sweep (COMPLETED and INVALID jobs), by job.
    pub fn results(&self, sweep: &str) -> StoreResult<Vec<ResultRow>> {
        let conn = self.read();
        let sweep_id = sweep_id_in(&conn, sweep)?;
        // A read-only open of an old database has no layers_json column.
        let layers = if has_column(&conn, "results", "layers_json")? {
            "r.layers_json"
        } else {
            "'[]'"
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT j.id, j.model, j.kind, j.rotation, r.attempt, j.state, r.test_accuracy, \
             r.test_loss, r.labels_json, r.confusion_json, r.epochs_trained, r.best_epoch, \
             r.n_test, {layers} \
             FROM results r JOIN jobs j ON j.id = r.job_id \
             WHERE j.sweep_id = ?1 AND j.state IN ('COMPLETED', 'INVALID') ORDER BY j.id"
        ))?;
        let rows = stmt.query_map([sweep_id], |r| {
            Ok((
                (
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, u32>(4)?,
                    r.get::<_, String>(5)?,
                ),
                (
                    r.get::<_, Option<f64>>(6)?,
                    r.get::<_, Option<f64>>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, String>(9)?,
                    r.get::<_, u32>(10)?,
                    r.get::<_, u32>(11)?,
                    r.get::<_, u32>(12)?,
                    r.get::<_, String>(13)?,
                ),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let ((job_id, model, kind, rotation, attempt, state), rest) = row?;
            let (acc, loss, labels, confusion, epochs_trained, best_epoch, n_test, layers) = rest;
            let corrupt = |e: serde_json::Error| {
                StoreError::Invalid(format!("stored result of job {job_id}: {e}"))
            };
            out.push(ResultRow {
                job_id,
                model,
                kind,
                rotation,
                attempt,
                state,
                completion: Completion {
                    test_accuracy: acc.unwrap_or(f64::NAN),
                    test_loss: loss.unwrap_or(f64::NAN),
                    labels: serde_json::from_str(&labels).map_err(corrupt)?,
                    confusion: serde_json::from_str(&confusion).map_err(corrupt)?,
                    epochs_trained,
                    best_epoch,
                    n_test,
                    layers: serde_json::from_str(&layers).map_err(corrupt)?,
                },
            });
        }
        Ok(out)
    }

    /// True when every job of the sweep is in a final state.
    pub fn is_finished(&self, sweep: &str) -> StoreResult<bool> {
        let conn = self.read();
        let sweep_id = sweep_id_in(&conn, sweep)?;
        let open: i64 = conn.query_row(
            "SELECT COUNT(*) FROM jobs WHERE sweep_id = ?1 AND state IN ('PENDING', 'RUNNING')",
            [sweep_id],
            |r| r.get(0),
        )?;
        Ok(open == 0)
    }
}

/// One epoch report of a group commit ([`Store::report_epochs`]).
#[derive(Debug, Clone)]
pub struct Report {
    /// The attempt that reports.
    pub at: AttemptRef,
    /// Its metrics.
    pub metrics: EpochMetrics,
    /// When the report arrived (ms since the Unix epoch).
    pub now: i64,
    /// Lease time the report renews.
    pub ttl_ms: i64,
}

/// Runs `f` under a savepoint of the open transaction: its changes stay
/// when it succeeds and are rolled back when it fails, leaving the rest of
/// the transaction as it was.
pub fn in_savepoint<T>(
    tx: &Connection,
    f: impl FnOnce(&Connection) -> StoreResult<T>,
) -> StoreResult<T> {
    tx.execute_batch("SAVEPOINT one_write")?;
    match f(tx) {
        Ok(out) => {
            tx.execute_batch("RELEASE one_write")?;
            Ok(out)
        }
        Err(e) => {
            tx.execute_batch("ROLLBACK TO one_write; RELEASE one_write")?;
            Err(e)
        }
    }
}

/// Adds one measured epoch time to its model's running totals, and
/// re-prices the sweep's queue when that model's count of measured epochs
/// reaches a power of two. Per report this is O(1); the queue is re-priced
/// O(log n) times per model, as its mean settles.
fn note_epoch_time(conn: &Connection, job_id: i64, seconds: f64) -> StoreResult<()> {
    if !(seconds.is_finite() && seconds > 0.0) {
        return Ok(());
    }
    let (sweep_id, model, base_cost): (i64, String, Option<f64>) = conn
        .prepare_cached("SELECT sweep_id, model, base_cost FROM jobs WHERE id = ?1")?
        .query_row([job_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let Some(base_cost) = base_cost.filter(|b| *b > 0.0) else {
        return Ok(());
    };
    let n: i64 = conn
        .prepare_cached(
            "INSERT INTO model_costs (sweep_id, model, n, sum_seconds, base_cost) \
             VALUES (?1, ?2, 1, ?3, ?4) ON CONFLICT (sweep_id, model) DO UPDATE \
             SET n = n + 1, sum_seconds = sum_seconds + excluded.sum_seconds RETURNING n",
        )?
        .query_row(params![sweep_id, model, seconds, base_cost], |r| r.get(0))?;
    if n & (n - 1) == 0 {
        reprice(conn, sweep_id)?;
    }
    Ok(())
}

/// Re-estimates the cost of every job of a sweep whose model has measured
/// epochs.
///
/// Costs stay in the units of the static estimate made at submit time
/// (`base_cost`: model kind x sequence length x steps x epochs). Each model
/// with stored epoch rows has a measured mean of seconds per epoch `spe`;
/// the sweep's seconds per cost unit `k` is the mean of `spe / base_cost`
/// over those models, and a measured model's jobs cost `spe / k`. So models
/// are ordered by their real speed once measured, models not yet measured
/// keep their estimate on the same scale, and a single measured model keeps
/// its estimate (one measurement says nothing about the others).
fn reprice(conn: &Connection, sweep_id: i64) -> StoreResult<()> {
    let measured: Vec<(String, f64, f64)> = {
        // Every stored row counts, superseded ones too: they are real
        // measurements of how long an epoch of that model takes.
        let mut stmt = conn.prepare_cached(
            "SELECT model, sum_seconds / n, base_cost FROM model_costs WHERE sweep_id = ?1",
        )?;
        let rows = stmt.query_map([sweep_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    if measured.is_empty() {
        return Ok(());
    }
    let k = measured
        .iter()
        .map(|(_, spe, base)| spe / base)
        .sum::<f64>()
        / measured.len() as f64;
    if !(k.is_finite() && k > 0.0) {
        return Ok(());
    }
    for (model, spe, _) in &measured {
        conn.prepare_cached("UPDATE jobs SET cost = ?1 WHERE sweep_id = ?2 AND model = ?3")?
            .execute(params![spe / k, sweep_id, model])?;
    }
    Ok(())
}

/// True when `table` has a column named `column`.
fn has_column(conn: &Connection, table: &str, column: &str) -> StoreResult<bool> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
    for name in names {
        if name? == column {
            return Ok(true);
        }
    }
    Ok(false)
}

fn sweep_id_in(conn: &Connection, sweep: &str) -> StoreResult<i64> {
    conn.query_row("SELECT id FROM sweeps WHERE name = ?1", [sweep], |r| {
        r.get(0)
    })
    .optional()?
    .ok_or_else(|| StoreError::NoSweep(sweep.to_string()))
}

/// Checks that `at` holds the job's lease. Returns whether its sweep was
/// cancelled (the holder should stop).
fn check_fence(conn: &Connection, at: &AttemptRef) -> StoreResult<bool> {
    let row: Option<(String, u32, Option<String>, i64)> = conn
        .query_row(
            "SELECT j.state, j.attempt, j.lease_token, s.cancelled \
             FROM jobs j JOIN sweeps s ON s.id = j.sweep_id WHERE j.id = ?1",
            [at.job_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let (state, attempt, token, cancelled) = row.ok_or(StoreError::NoJob(at.job_id))?;
    let stale = |why: String| StoreError::Stale {
        job_id: at.job_id,
        attempt: at.attempt,
        why,
    };
    if attempt != at.attempt {
        return Err(stale(format!("the job is at attempt {attempt}")));
    }
    if state != state::RUNNING {
        return Err(stale(format!("the job is {state}")));
    }
    if token.as_deref() != Some(at.token.as_str()) {
        return Err(stale("wrong lease token".into()));
    }
    Ok(cancelled != 0)
}

fn run_ms_of(conn: &Connection, job_id: i64, now: i64) -> StoreResult<i64> {
    let (started, run_ms): (Option<i64>, i64) = conn.query_row(
        "SELECT attempt_started_ms, run_ms FROM jobs WHERE id = ?1",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(run_ms + started.map_or(0, |s| (now - s).max(0)))
}

/// The running lease that `request` took earlier, if its first answer was
/// lost: same job, attempt and token, deadline extended.
fn replay_lease(
    tx: &Connection,
    request: &LeaseRequest<'_>,
    now: i64,
    ttl_ms: i64,
) -> StoreResult<Option<Lease>> {
    let found = tx
        .query_row(
            "SELECT j.id, j.attempt, j.lease_token, s.name, j.model, j.rotation, s.spec_json \
             FROM jobs j INDEXED BY running_by_request JOIN sweeps s ON s.id = j.sweep_id \
             WHERE j.state = 'RUNNING' AND j.worker_id = ?1 AND j.lease_request = ?2",
            params![request.worker_id, request.request_id],
            |r| {
                Ok(Lease {
                    job_id: r.get(0)?,
                    attempt: r.get(1)?,
                    token: r.get(2)?,
                    sweep: r.get(3)?,
                    model: r.get(4)?,
                    rotation: r.get(5)?,
                    spec_json: r.get(6)?,
                    replayed: true,
                })
            },
        )
        .optional()?;
    if let Some(lease) = &found {
        tx.execute(
            "UPDATE jobs SET lease_deadline_ms = ?1 WHERE id = ?2",
            params![now + ttl_ms, lease.job_id],
        )?;
    }
    Ok(found)
}

/// Ends every RUNNING attempt whose lease deadline passed: the job is
/// re-queued, FAILED when out of attempts, or CANCELLED when its sweep was
/// cancelled (a cancelled sweep must still finish when its worker is lost).
fn expire_in(conn: &Connection, now: i64) -> StoreResult<Vec<Expired>> {
    let rows: Vec<(i64, u32, u32, u32, bool, String)> = {
        let mut stmt = conn.prepare(
            "SELECT j.id, j.attempt, j.attempt - j.released, s.max_attempts, s.cancelled, \
             j.worker_id FROM jobs j INDEXED BY running_by_deadline \
             JOIN sweeps s ON s.id = j.sweep_id \
             WHERE j.state = 'RUNNING' AND j.lease_deadline_ms < ?1",
        )?;
        // Every lease runs this, so it reads the expired rows only, through
        // the partial index (without statistics SQLite would pick
        // `jobs_by_state` and walk every running job).
        let rows = stmt.query_map(params![now], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get::<_, i64>(4)? != 0,
                r.get(5)?,
            ))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut expired = Vec::with_capacity(rows.len());
    for (job_id, attempt, counted, max_attempts, cancelled, worker_id) in rows {
        let run_ms = run_ms_of(conn, job_id, now)?;
        let (new_state, reason) = if cancelled {
            (
                state::CANCELLED,
                format!("lease of worker `{worker_id}` expired after the sweep was cancelled"),
            )
        } else if counted >= max_attempts {
            (
                state::FAILED,
                format!(
                    "lease of worker `{worker_id}` expired on attempt {counted} of \
                     {max_attempts} (worker lost)"
                ),
            )
        } else {
            (
                state::PENDING,
                format!("lease of worker `{worker_id}` expired on attempt {attempt} (worker lost)"),
            )
        };
        let counted_failure = i64::from(!cancelled);
        conn.execute(
            "UPDATE jobs SET state = ?1, lease_token = NULL, lease_deadline_ms = NULL, \
             last_error = ?2, infra_failures = infra_failures + ?3, run_ms = ?4 WHERE id = ?5",
            params![new_state, reason, counted_failure, run_ms, job_id],
        )?;
        conn.execute(
            "UPDATE workers SET n_infra_failures = n_infra_failures + ?1 WHERE worker_id = ?2",
            params![counted_failure, worker_id],
        )?;
        expired.push(Expired {
            job_id,
            attempt,
            state: new_state,
            reason,
        });
    }
    Ok(expired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, epochs: usize) -> SweepSpec {
        let text = format!(
            "name = \"{name}\"\n[data]\ndir = \"/nonexistent\"\nrotations = [0, 1]\n\
             [train]\nepochs = {epochs}\nmax_attempts = 2\n[models.gru]\nkind = \"gru\"\n\
             [models.rnn]\nkind = \"rnn\"\n"
        );
        SweepSpec::from_toml(&text, Path::new("t.toml")).unwrap()
    }

    fn temp_store(tag: &str) -> Store {
        let dir = std::env::temp_dir().join(format!("rotsweep-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Store::open(&dir).unwrap()
    }

    fn leased(o: LeaseOutcome) -> Lease {
        match o {
            LeaseOutcome::Leased(l) => l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    fn at(l: &Lease) -> AttemptRef {
        AttemptRef {
            job_id: l.job_id,
            attempt: l.attempt,
            token: l.token.clone(),
        }
    }

    fn completion(accuracy: f64) -> Completion {
        Completion {
            test_accuracy: accuracy,
            test_loss: 1.0,
            labels: vec!["A".into()],
            confusion: vec![vec![1]],
            epochs_trained: 1,
            best_epoch: 1,
            n_test: 1,
            layers: Vec::new(),
        }
    }

    fn metrics(epoch: u32) -> EpochMetrics {
        EpochMetrics {
            epoch,
            val_accuracy: epoch as f64 / 10.0,
            ..Default::default()
        }
    }

    #[test]
    fn resubmitting_a_different_spec_is_refused_without_new_version() {
        let store = temp_store("submit");
        let first = store.submit(&spec("s", 2), false).unwrap();
        assert_eq!(
            (first.sweep.as_str(), first.n_jobs, first.created),
            ("s", 4, true)
        );
        let same = store.submit(&spec("s", 2), false).unwrap();
        assert!(!same.created);
        let err = store.submit(&spec("s", 3), false).unwrap_err();
        assert!(matches!(err, StoreError::SpecConflict(_)), "{err}");
        let v2 = store.submit(&spec("s", 3), true).unwrap();
        assert_eq!(v2.sweep, "s.v2");
        assert_eq!(store.sweeps().unwrap(), vec!["s", "s.v2"]);
    }

    #[test]
    fn leases_go_largest_cost_first_and_never_twice() {
        let store = temp_store("lease");
        store.submit(&spec("s", 2), false).unwrap();
        let a = leased(store.lease("w1", None, 0, 1000).unwrap());
        let b = leased(store.lease("w2", None, 0, 1000).unwrap());
        // gru costs more than rnn, so both gru rotations go first.
        assert_eq!((a.model.as_str(), b.model.as_str()), ("gru", "gru"));
        assert_ne!(a.job_id, b.job_id);
        let _ = leased(store.lease("w3", None, 0, 1000).unwrap());
        let _ = leased(store.lease("w4", None, 0, 1000).unwrap());
        assert_eq!(
            store.lease("w5", None, 0, 1000).unwrap(),
            LeaseOutcome::Wait
        );
    }

    #[test]
    fn stale_attempts_are_fenced_and_epochs_are_exactly_once() {
        let store = temp_store("fence");
        store.submit(&spec("s", 2), false).unwrap();
        let first = leased(store.lease("w1", Some("s"), 0, 100).unwrap());
        assert!(
            store
                .report_epoch(&at(&first), &metrics(1), 10, 100)
                .unwrap()
                .0
        );
        assert!(
            store
                .report_epoch(&at(&first), &metrics(2), 10, 100)
                .unwrap()
                .0
        );
        // A re-sent report is a no-op.
        assert!(
            !store
                .report_epoch(&at(&first), &metrics(2), 10, 100)
                .unwrap()
                .0
        );

        // The lease expires; the next lease of that job is attempt 2.
        let mut second = None;
        for _ in 0..4 {
            let l = leased(store.lease("w2", Some("s"), 1000, 100).unwrap());
            if l.job_id == first.job_id {
                second = Some(l);
            }
        }
        let second = second.expect("the expired job is leased again");
        assert_eq!(second.attempt, 2);
        let err = store
            .report_epoch(&at(&first), &metrics(3), 1000, 100)
            .unwrap_err();
        assert!(matches!(err, StoreError::Stale { .. }), "{err}");

        // Attempt 2 resumed from a checkpoint after epoch 1: its epoch 2
        // supersedes attempt 1's epoch 2.
        store
            .report_epoch(&at(&second), &metrics(2), 1000, 100)
            .unwrap();
        store
            .report_epoch(&at(&second), &metrics(3), 1000, 100)
            .unwrap();
        let rows: Vec<(u32, u32)> = store
            .epochs("s")
            .unwrap()
            .into_iter()
            .filter(|r| r.job_id == first.job_id)
            .map(|r| (r.metrics.epoch, r.attempt))
            .collect();
        assert_eq!(rows, vec![(1, 1), (2, 2), (3, 2)]);
    }

    #[test]
    fn a_retried_lease_request_gets_its_lease_back() {
        let store = temp_store("replay");
        store.submit(&spec("s", 1), false).unwrap();
        let ask = |worker: &str, id: &str, now: i64| {
            let request = LeaseRequest {
                worker_id: worker,
                sweep: None,
                request_id: id,
            };
            store.write(|tx| store.lease_in(tx, &request, now, 1000))
        };
        let first = leased(ask("w", "r1", 0).unwrap());
        assert!(!first.replayed);
        // The answer was lost; the retry carries the same id.
        let again = leased(ask("w", "r1", 500).unwrap());
        assert!(again.replayed);
        assert_eq!(
            (again.job_id, again.attempt, &again.token),
            (first.job_id, first.attempt, &first.token)
        );
        // The retry extended the lease: at 1200 it has not expired.
        store.heartbeat(&at(&first), 1200, 1000).unwrap();
        // Another request, or the same id from another worker, is new.
        let second = leased(ask("w", "r2", 1300).unwrap());
        let third = leased(ask("x", "r1", 1300).unwrap());
        assert!(!second.replayed && !third.replayed);
        let ids = [first.job_id, second.job_id, third.job_id];
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
        // Once the job ends, its request id no longer matches anything:
        // the same id now takes the last queued job.
        store.complete(&at(&first), &completion(0.5), 1400).unwrap();
        let fourth = leased(ask("w", "r1", 1500).unwrap());
        assert!(!fourth.replayed && !ids.contains(&fourth.job_id));
    }

    #[test]
    fn failures_requeue_until_the_attempt_limit() {
        let store = temp_store("fail");
        store.submit(&spec("s", 1), false).unwrap();
        let l1 = leased(store.lease("w", None, 0, 1000).unwrap());
        assert_eq!(
            store.fail(&at(&l1), "boom", FailCause::Job, 5).unwrap(),
            state::PENDING
        );
        let l2 = leased(store.lease("w", None, 10, 1000).unwrap());
        assert_eq!((l2.job_id, l2.attempt), (l1.job_id, 2));
        assert_eq!(
            store
                .fail(&at(&l2), "boom again", FailCause::Job, 20)
                .unwrap(),
            state::FAILED
        );
        let jobs = store.jobs("s", 30).unwrap();
        let job = jobs.iter().find(|j| j.job_id == l1.job_id).unwrap();
        assert_eq!(job.state, state::FAILED);
        assert_eq!(job.last_error, "boom again");
    }

    #[test]
    fn nan_accuracy_completes_as_invalid_and_is_excluded() {
        let store = temp_store("invalid");
        store.submit(&spec("s", 1), false).unwrap();
        let done = |l: &Lease, acc: f64| {
            let c = Completion {
                test_accuracy: acc,
                test_loss: 1.0,
                labels: vec!["A".into(), "B".into()],
                confusion: vec![vec![3, 1], vec![0, 4]],
                epochs_trained: 1,
                best_epoch: 1,
                n_test: 8,
                layers: vec![LayerInfo {
                    name: "output".into(),
                    kind: "Dense".into(),
                    output_shape: vec![2],
                    n_params: 18,
                }],
            };
            store.complete(&at(l), &c, 1).unwrap();
        };
        let l1 = leased(store.lease("w", None, 0, 1000).unwrap());
        let l2 = leased(store.lease("w", None, 0, 1000).unwrap());
        done(&l1, 0.875);
        done(&l2, f64::NAN);
        let s = store.summary("s").unwrap();
        let gru = s.models.iter().find(|m| m.name == "gru").unwrap();
        assert_eq!((gru.n_used, gru.n_total), (1, 2));
        let results = store.results("s").unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].completion.layers[0].n_params, 18);
        assert!(results.iter().any(|r| r.state == state::INVALID));
        assert_eq!(gru.confusion, vec![vec![3, 1], vec![0, 4]]);
        assert!(!s.complete);
        let states: Vec<String> = store
            .jobs("s", 2)
            .unwrap()
            .into_iter()
            .map(|j| j.state)
            .collect();
        assert!(states.contains(&state::INVALID.to_string()));
    }

    #[test]
    fn old_databases_gain_the_layer_column_and_read_only_opens_see_results() {
        let store = temp_store("migrate");
        let dir = store.path().parent().unwrap().to_path_buf();
        store.submit(&spec("s", 1), false).unwrap();
        store
            .lock()
            .execute_batch("ALTER TABLE results DROP COLUMN layers_json")
            .unwrap();
        drop(store);

        // A reader of the old schema still lists results (with no layers).
        let reader = Store::open_read_only(&dir).unwrap();
        assert!(reader.results("s").unwrap().is_empty());
        assert!(reader.submit(&spec("t", 1), false).is_err());
        drop(reader);

        let store = Store::open(&dir).unwrap();
        let l = leased(store.lease("w", None, 0, 1000).unwrap());
        let c = Completion {
            test_accuracy: 0.5,
            labels: vec!["A".into()],
            confusion: vec![vec![1]],
            ..Default::default()
        };
        store.complete(&at(&l), &c, 1).unwrap();
        let results = Store::open_read_only(&dir).unwrap().results("s").unwrap();
        assert_eq!(results.len(), 1);
        assert!(results[0].completion.layers.is_empty());
        assert!(Store::open_read_only(&dir.join("missing")).is_err());
    }

    #[test]
    fn resume_requeues_cancelled_jobs_with_a_fresh_budget() {
        let store = temp_store("resume");
        store.submit(&spec("s", 1), false).unwrap();
        let l = leased(store.lease("w", None, 0, 1000).unwrap());
        store.cancel("s").unwrap();
        store
            .fail(&at(&l), "cancelled", FailCause::Infra, 1)
            .unwrap();
        assert_eq!(store.resume("s", &[state::CANCELLED]).unwrap(), 4);
        let again = leased(store.lease("w", None, 2, 1000).unwrap());
        assert!(again.attempt >= 1);
        assert!(store.resume("s", &[state::RUNNING]).is_err());
    }

    #[test]
    fn a_worker_failing_in_a_loop_is_quarantined_until_its_cool_down_ends() {
        let store = temp_store("quarantine").with_quarantine(QuarantinePolicy {
            after: 2,
            cool_down_ms: 1000,
        });
        store.submit(&spec("s", 1), false).unwrap();
        let a = leased(store.lease("bad", None, 0, 100).unwrap());
        store.fail(&at(&a), "nan", FailCause::Job, 1).unwrap();
        // An infrastructure failure neither counts nor breaks the streak.
        let b = leased(store.lease("bad", None, 2, 100).unwrap());
        store.fail(&at(&b), "lost", FailCause::Infra, 3).unwrap();
        let c = leased(store.lease("bad", None, 4, 100).unwrap());
        store.fail(&at(&c), "nan", FailCause::Job, 5).unwrap();

        match store.lease("bad", None, 6, 100).unwrap() {
            LeaseOutcome::Quarantined { until_ms, reason } => {
                assert_eq!(until_ms, 1005);
                assert!(reason.contains("2 jobs in a row"), "{reason}");
            }
            other => panic!("expected a quarantine, got {other:?}"),
        }
        // Others still get the queue.
        let d = leased(store.lease("good", None, 7, 100).unwrap());
        store.complete(&at(&d), &completion(0.5), 8).unwrap();
        let view = |id: &str| {
            store
                .workers("s", 9)
                .unwrap()
                .into_iter()
                .find(|w| w.worker_id == id)
                .unwrap()
        };
        let bad = view("bad");
        assert_eq!(
            (
                bad.n_job_failures,
                bad.n_infra_failures,
                bad.consecutive_failures
            ),
            (2, 1, 2)
        );
        assert!((bad.quarantine_seconds_left - 0.996).abs() < 1e-9);
        assert_eq!(view("good").quarantine_seconds_left, 0.0);

        // After the cool-down one more failure quarantines it again at once;
        // a completed job clears the streak.
        let e = leased(store.lease("bad", None, 1006, 100).unwrap());
        store.fail(&at(&e), "nan", FailCause::Job, 1007).unwrap();
        assert!(matches!(
            store.lease("bad", None, 1008, 100).unwrap(),
            LeaseOutcome::Quarantined { .. }
        ));
        let f = leased(store.lease("bad", None, 3000, 100).unwrap());
        store.complete(&at(&f), &completion(0.5), 3001).unwrap();
        assert_eq!(view("bad").consecutive_failures, 0);
    }

    /// Regression (#3): a job with bad input (here: reported as such) used
    /// to count toward the streak of every worker that tried it, so a
    /// healthy worker was quarantined for the sweep's fault.
    #[test]
    fn an_input_error_fails_the_job_at_once_and_leaves_the_worker_alone() {
        let store = temp_store("input").with_quarantine(QuarantinePolicy {
            after: 1,
            cool_down_ms: 1000,
        });
        store.submit(&spec("s", 1), false).unwrap();
        let a = leased(store.lease("w", None, 0, 100).unwrap());
        let reason = "label `X` at pfam_fold_4.csv:7 does not occur in the training folds";
        let new_state = store.fail(&at(&a), reason, FailCause::Input, 1).unwrap();
        // Attempt 1 of 2, yet FAILED: another attempt would fail the same way.
        assert_eq!(new_state, state::FAILED);
        let job = store
            .jobs("s", 2)
            .unwrap()
            .into_iter()
            .find(|j| j.job_id == a.job_id)
            .unwrap();
        assert_eq!((job.job_failures, job.infra_failures), (1, 0));
        assert_eq!(job.last_error, reason);
        // Not quarantined although the policy quarantines after one failure.
        let b = leased(store.lease("w", None, 3, 100).unwrap());
        let w = store.workers("s", 4).unwrap().remove(0);
        assert_eq!((w.n_job_failures, w.consecutive_failures), (0, 0));
        // The same failure as a job fault would have quarantined it.
        store.fail(&at(&b), "nan", FailCause::Job, 5).unwrap();
        assert!(matches!(
            store.lease("w", None, 6, 100).unwrap(),
            LeaseOutcome::Quarantined { .. }
        ));
    }

    #[test]
    fn a_quarantined_worker_is_still_told_when_the_queue_is_drained() {
        let store = temp_store("quarantine-drained").with_quarantine(QuarantinePolicy {
            after: 1,
            cool_down_ms: 1000,
        });
        store.submit(&spec("s", 1), false).unwrap();
        let mut leases = Vec::new();
        for _ in 0..4 {
            leases.push(leased(store.lease("w", None, 0, 100).unwrap()));
        }
        store
            .fail(&at(&leases[0]), "nan", FailCause::Job, 1)
            .unwrap();
        for l in &leases[1..] {
            store.complete(&at(l), &completion(0.5), 1).unwrap();
        }
        let other = leased(store.lease("v", None, 2, 100).unwrap());
        store.complete(&at(&other), &completion(0.5), 3).unwrap();
        assert_eq!(
            store.lease("w", None, 4, 100).unwrap(),
            LeaseOutcome::Drained
        );
    }

    #[test]
    fn expired_leases_are_reported_and_a_cancelled_sweep_still_finishes() {
        let store = temp_store("expire");
        store.submit(&spec("s", 1), false).unwrap();
        let a = leased(store.lease("w", None, 0, 100).unwrap());
        let b = leased(store.lease("w", None, 0, 100).unwrap());
        store.heartbeat(&at(&b), 500, 100).unwrap();
        let expired = store.expire_leases(200).unwrap();
        assert_eq!(expired.len(), 1);
        assert_eq!(
            (expired[0].job_id, expired[0].attempt, expired[0].state),
            (a.job_id, 1, state::PENDING)
        );

        // The worker of b is lost after a cancel: b ends CANCELLED, and a
        // cancel is no failure of anyone.
        store.cancel("s").unwrap();
        let expired = store.expire_leases(1000).unwrap();
        assert_eq!(
            expired
                .iter()
                .map(|e| (e.job_id, e.state))
                .collect::<Vec<_>>(),
            vec![(b.job_id, state::CANCELLED)]
        );
        assert!(store.is_finished("s").unwrap());
        let jobs = store.jobs("s", 1000).unwrap();
        let job = |id| jobs.iter().find(|j| j.job_id == id).unwrap();
        assert_eq!(
            (job(a.job_id).infra_failures, job(b.job_id).infra_failures),
            (1, 0)
        );
    }

    #[test]
    fn a_restart_keeps_running_leases_and_a_resent_completion_is_a_no_op() {
        let store = temp_store("restart");
        store.submit(&spec("s", 1), false).unwrap();
        let a = leased(store.lease("w", None, 0, 100).unwrap());
        // Down for far longer than a lease, then one lease time of grace.
        assert_eq!(store.extend_running_leases(10_000, 100).unwrap(), 1);
        assert!(store.expire_leases(10_050).unwrap().is_empty());
        store.complete(&at(&a), &completion(0.75), 10_060).unwrap();
        store.complete(&at(&a), &completion(0.75), 10_070).unwrap();
        let mut stale = at(&a);
        stale.token = "not-the-token".into();
        let err = store
            .complete(&stale, &completion(0.1), 10_080)
            .unwrap_err();
        assert!(matches!(err, StoreError::Stale { .. }), "{err}");
        let jobs = store.jobs("s", 10_090).unwrap();
        let job = jobs.iter().find(|j| j.job_id == a.job_id).unwrap();
        assert_eq!(
            (job.state.as_str(), job.test_accuracy),
            ("COMPLETED", Some(0.75))
        );
    }

    #[test]
    fn cancel_turns_pending_jobs_cancelled_and_signals_running_ones() {
        let store = temp_store("cancel");
        store.submit(&spec("s", 1), false).unwrap();
        let l = leased(store.lease("w", None, 0, 1000).unwrap());
        assert_eq!(store.cancel("s").unwrap(), (3, 1));
        assert!(store.heartbeat(&at(&l), 1, 1000).unwrap());
        assert_eq!(store.lease("w", None, 2, 1000).unwrap(), LeaseOutcome::Wait);
        store
            .fail(&at(&l), "cancelled", FailCause::Infra, 3)
            .unwrap();
        assert!(store.is_finished("s").unwrap());
        let jobs = store.jobs("s", 4).unwrap();
        assert!(jobs.iter().all(|j| j.state == state::CANCELLED));
    }

    fn spec_text(name: &str, rotations: &str, train_extra: &str) -> SweepSpec {
        let text = format!(
            "name = \"{name}\"\n[data]\ndir = \"/nonexistent\"\nrotations = {rotations}\n\
             [train]\nepochs = 2\n{train_extra}\n[models.gru]\nkind = \"gru\"\n\
             [models.rnn]\nkind = \"rnn\"\n"
        );
        SweepSpec::from_toml(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn a_group_commit_answers_each_report_as_if_it_came_alone() {
        let store = temp_store("group");
        store.submit(&spec("s", 3), false).unwrap();
        let a = leased(store.lease("w0", None, 0, 1000).unwrap());
        let b = leased(store.lease("w1", None, 0, 1000).unwrap());
        let report = |l: &Lease, token: Option<&str>, epoch: u32| Report {
            at: AttemptRef {
                token: token.map_or_else(|| l.token.clone(), str::to_string),
                ..at(l)
            },
            metrics: metrics(epoch),
            now: 1,
            ttl_ms: 1000,
        };
        let answers = store.report_epochs(&[
            report(&a, None, 1),
            report(&b, Some("not-the-token"), 1),
            report(&a, None, 1),
            report(&b, None, 1),
            report(&a, None, 0),
            report(&a, None, 2),
        ]);
        let summary: Vec<String> = answers
            .iter()
            .map(|r| match r {
                Ok((stored, _)) => format!("stored={stored}"),
                Err(StoreError::Stale { .. }) => "stale".into(),
                Err(StoreError::Invalid(_)) => "invalid".into(),
                Err(e) => format!("{e}"),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "stored=true",
                "stale",
                "stored=false",
                "stored=true",
                "invalid",
                "stored=true"
            ]
        );
        // The refused reports left nothing behind; the others are all there.
        let rows: Vec<(i64, u32)> = store
            .epochs("s")
            .unwrap()
            .iter()
            .map(|r| (r.job_id, r.metrics.epoch))
            .collect();
        assert_eq!(rows, [(a.job_id, 1), (a.job_id, 2), (b.job_id, 1)]);
    }

    fn release(store: &Store, l: &Lease, now: i64) {
        store
            .fail(&at(l), "released", FailCause::Release, now)
            .unwrap();
    }

    #[test]
    fn concurrency_cap_holds_across_restart_and_resume() {
        let dir = std::env::temp_dir().join(format!("rotsweep-store-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ttl = 1_000_000;
        let store = Store::open(&dir).unwrap();
        store
            .submit(&spec_text("s", "[0, 1]", "max_concurrent_jobs = 2"), false)
            .unwrap();
        let a = leased(store.lease("w1", None, 0, ttl).unwrap());
        let b = leased(store.lease("w2", None, 0, ttl).unwrap());
        assert_eq!(store.lease("w3", None, 0, ttl).unwrap(), LeaseOutcome::Wait);
        assert_eq!(
            store.lease("w3", Some("s"), 0, ttl).unwrap(),
            LeaseOutcome::Wait
        );

        // The cap lives in the database: a restarted coordinator keeps it.
        drop(store);
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.lease("w3", None, 1, ttl).unwrap(), LeaseOutcome::Wait);

        // A freed slot is taken again, and only one.
        release(&store, &a, 2);
        let c = leased(store.lease("w3", None, 3, ttl).unwrap());
        assert_eq!(store.lease("w4", None, 3, ttl).unwrap(), LeaseOutcome::Wait);

        // Cancel everything, resume: still two at a time.
        store.cancel("s").unwrap();
        for j in store.jobs("s", 4).unwrap() {
            if j.state == state::RUNNING {
                let l = AttemptRef {
                    job_id: j.job_id,
                    attempt: j.attempt,
                    token: if j.job_id == c.job_id {
                        c.token.clone()
                    } else {
                        b.token.clone()
                    },
                };
                store.fail(&l, "cancelled", FailCause::Infra, 4).unwrap();
            }
        }
        assert_eq!(store.resume("s", &[state::CANCELLED]).unwrap(), 4);
        let _ = leased(store.lease("w5", None, 5, ttl).unwrap());
        let _ = leased(store.lease("w6", None, 5, ttl).unwrap());
        assert_eq!(store.lease("w7", None, 5, ttl).unwrap(), LeaseOutcome::Wait);

        // Another sweep without a cap is not held back by this one.
        store.submit(&spec_text("t", "[0]", ""), false).unwrap();
        let other = leased(store.lease("w7", None, 6, ttl).unwrap());
        assert_eq!(other.sweep, "t");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn measured_epoch_times_reorder_the_queue() {
        let store = temp_store("cost");
        let ttl = 1_000_000;
        store
            .submit(&spec_text("s", "[0, 1, 2]", ""), false)
            .unwrap();
        let timed = |epoch: u32, seconds: f64| EpochMetrics {
            epoch,
            seconds,
            ..Default::default()
        };

        // The static estimate puts the three gru jobs first.
        let ls: Vec<Lease> = (0..4)
            .map(|i| leased(store.lease(&format!("w{i}"), None, 0, ttl).unwrap()))
            .collect();
        let models: Vec<&str> = ls.iter().map(|l| l.model.as_str()).collect();
        assert_eq!(models, ["gru", "gru", "gru", "rnn"]);

        // One measured model alone says nothing about the others: the
        // order stays.
        store
            .report_epoch(&at(&ls[0]), &timed(1, 1.0), 1, ttl)
            .unwrap();
        release(&store, &ls[2], 1);
        let again = leased(store.lease("w9", None, 2, ttl).unwrap());
        assert_eq!(again.model, "gru");

        // rnn turns out ten times slower per epoch than gru: its pending
        // jobs now go first, although the estimate said the opposite.
        store
            .report_epoch(&at(&ls[3]), &timed(1, 10.0), 3, ttl)
            .unwrap();
        release(&store, &ls[1], 3);
        release(&store, &again, 3);
        let next = leased(store.lease("w10", None, 4, ttl).unwrap());
        assert_eq!(next.model, "rnn");
        let next = leased(store.lease("w11", None, 4, ttl).unwrap());
        assert_eq!(next.model, "rnn");
        let next = leased(store.lease("w12", None, 4, ttl).unwrap());
        assert_eq!(next.model, "gru");

        // A re-sent report changes nothing.
        let (stored, _) = store
            .report_epoch(&at(&ls[3]), &timed(1, 10.0), 5, ttl)
            .unwrap();
        assert!(!stored);
    }
}

//! The gRPC `Coordinator` service: converts wire messages to store calls and
//! store errors to gRPC codes (in one place, [`to_status`]), and publishes
//! live events (epoch reports, job state changes) to in-process watchers.

use std::sync::Arc;
use std::time::Duration;

use rotsweep_proto as pb;
use rotsweep_shared::spec::SweepSpec;
use rusqlite::Connection;
use tokio::sync::{broadcast, oneshot};
use tonic::{Request, Response, Status};

use crate::store::{
    self, AttemptRef, Completion, EpochMetrics, FailCause, LeaseOutcome, Store, StoreError,
};

/// Largest accepted request or response message (4 MiB): a spec, a 46x46
/// confusion matrix or a status table fit easily; anything bigger is refused.
pub const MAX_MESSAGE_BYTES: usize = rotsweep_proto::MAX_MESSAGE_BYTES;

/// Something that happened, for watchers and progress displays.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A job was leased.
    Leased {
        /// Sweep name.
        sweep: String,
        /// Job id.
        job_id: i64,
        /// Model name.
        model: String,
        /// Rotation.
        rotation: u32,
        /// Attempt number.
        attempt: u32,
        /// Worker.
        worker_id: String,
    },
    /// An epoch row was stored.
    Epoch {
        /// Job id.
        job_id: i64,
        /// Attempt.
        attempt: u32,
        /// The metrics.
        metrics: EpochMetrics,
    },
    /// A job ended an attempt.
    Finished {
        /// Job id.
        job_id: i64,
        /// Attempt.
        attempt: u32,
        /// New state (COMPLETED, INVALID, PENDING on retry, FAILED, ...).
        state: String,
        /// Test accuracy or failure reason.
        detail: String,
    },
}

/// Settings of the service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// How long a lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// Directory under which per-job checkpoint folders are created (empty:
    /// workers keep no checkpoints).
    pub checkpoint_root: Option<std::path::PathBuf>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            checkpoint_root: None,
        }
    }
}

/// The service state shared by all connections.
#[derive(Clone)]
pub struct CoordinatorService {
    store: Arc<Store>,
    config: ServiceConfig,
    events: broadcast::Sender<Event>,
    writer: Writer,
}

/// Most queued writes committed together.
const MAX_GROUP: usize = 512;

/// Sends a write's answer once its group's commit is known: the write's own
/// result if the commit succeeded, else why it did not.
type Deliver = Box<dyn FnOnce(Result<(), String>) + Send>;

/// One queued write: runs inside the group transaction and returns how to
/// answer it.
type Write = Box<dyn FnOnce(&Store, &Connection) -> Deliver + Send>;

/// Every write of the service, in arrival order, on one thread, committed
/// in groups.
///
/// One thread owns the writing connection. It takes every write that queued
/// up while it was busy (leases, reports, heartbeats, completions, ...),
/// runs them in arrival order in one transaction, each under its own
/// savepoint so a refused write rolls back alone, commits once, and only
/// then answers each RPC. An idle coordinator commits a lone write at once;
/// a busy one pays one commit per group instead of one per write, and no
/// RPC waits on a lock that hundreds of blocking threads also want (an
/// unfair mutex once let some leases wait for seconds). An acknowledged
/// write is as durable as with one transaction per write. Queries do not
/// queue here: they read through the store's read-only connection.
#[derive(Clone)]
struct Writer {
    tx: std::sync::mpsc::Sender<Write>,
}

impl Writer {
    fn start(store: Arc<Store>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Write>();
        let spawned = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                // Ends when the service and every clone of its queue are gone.
                while let Ok(first) = rx.recv() {
                    let mut queued = vec![first];
                    while queued.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(next) => queued.push(next),
                            Err(_) => break,
                        }
                    }
                    run_group(&store, queued);
                }
            });
        if let Err(e) = spawned {
            // Without the thread every write is answered UNAVAILABLE (the
            // receiver was dropped with the closure).
            tracing::error!(error = %e, "cannot start the store writer thread");
        }
        Self { tx }
    }

    /// Queues `f` (a `Store::*_in` call) and waits for its committed answer.
    async fn call<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let write: Write = Box::new(move |store: &Store, tx: &Connection| {
            let result = store::in_savepoint(tx, |tx| f(store, tx));
            Box::new(move |committed: Result<(), String>| {
                let result = committed.map_err(StoreError::Unavailable).and(result);
                // The caller may have gone (deadline); nothing to do then.
                let _ = answer.send(result);
            })
        });
        self.tx
            .send(write)
            .map_err(|_| Status::unavailable("the store writer has stopped"))?;
        answered
            .await
            .map_err(|_| Status::internal("the store writer dropped a write"))?
            .map_err(to_status)
    }
}

/// Runs queued writes in order in one transaction, then answers them. A
/// write that panics ends the group: the transaction rolls back, the writes
/// already run are answered UNAVAILABLE (nothing of theirs was stored), the
/// rest INTERNAL (their answers are dropped), and the thread goes on with
/// the next group: one bad call must not stop every later write.
fn run_group(store: &Store, queued: Vec<Write>) {
    let mut delivers: Vec<Deliver> = Vec::with_capacity(queued.len());
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.group(|tx| {
            for write in queued {
                delivers.push(write(store, tx));
            }
        })
    }));
    let committed = match run {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => {
            tracing::error!("a store write panicked; its group was rolled back");
            Err("a write in the same group failed; retry".to_string())
        }
    };
    for deliver in delivers {
        deliver(committed.clone());
    }
}

/// Maps a store error to the gRPC code callers can act on.
pub fn to_status(e: StoreError) -> Status {
    match e {
        StoreError::NoSweep(_) | StoreError::NoJob(_) => Status::not_found(e.to_string()),
        StoreError::Stale { .. } | StoreError::SpecConflict(_) => {
            Status::failed_precondition(e.to_string())
        }
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        StoreError::Unavailable(_) => Status::unavailable(e.to_string()),
        StoreError::Db(ref db) if is_busy(db) => Status::unavailable(e.to_string()),
        StoreError::Db(_) | StoreError::Dir { .. } => {
            tracing::error!(error = %e, "store failure");
            Status::internal(e.to_string())
        }
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn attempt_ref(job: Option<pb::JobRef>) -> Result<AttemptRef, Status> {
    let job = job.ok_or_else(|| Status::invalid_argument("missing field `job`"))?;
    Ok(AttemptRef {
        job_id: job.job_id,
        attempt: job.attempt,
        token: job.lease_token,
    })
}

/// Converts a store epoch to the wire form.
pub fn metrics_to_pb(m: &EpochMetrics) -> pb::EpochMetrics {
    pb::EpochMetrics {
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        val_loss: m.val_loss,
        val_accuracy: m.val_accuracy,
        seconds: m.seconds,
        examples_per_second: m.examples_per_second,
    }
}

fn metrics_from_pb(m: pb::EpochMetrics) -> EpochMetrics {
    EpochMetrics {
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        val_loss: m.val_loss,
        val_accuracy: m.val_accuracy,
        seconds: m.seconds,
        examples_per_second: m.examples_per_second,
    }
}

impl CoordinatorService {
    /// A service over `store`.
    pub fn new(store: Arc<Store>, config: ServiceConfig) -> Self {
        let (events, _) = broadcast::channel(4096);
        let writer = Writer::start(store.clone());
        Self {
            store,
            config,
            events,
            writer,
        }
    }

    /// Subscribes to live events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The store behind the service.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn ttl_ms(&self) -> i64 {
        self.config.lease_ttl.as_millis() as i64
    }

    fn publish(&self, event: Event) {
        // No subscriber is fine: events are a convenience, the store is truth.
        let _ = self.events.send(event);
    }

    /// The LEASED answer for `l`.
    fn lease_response(&self, l: store::Lease, ttl: i64) -> pb::LeaseJobResponse {
        let checkpoint_dir =
            self.config
                .checkpoint_root
                .as_ref()
                .map_or_else(String::new, |root| {
                    root.join(format!("job-{}", l.job_id))
                        .to_string_lossy()
                        .into_owned()
                });
        let spec_seed = SweepSpec::from_json(&l.spec_json)
            .map(|s| s.train.seed)
            .unwrap_or(0);
        pb::LeaseJobResponse {
            outcome: pb::lease_job_response::Outcome::Leased as i32,
            job: Some(pb::JobLease {
                job_id: l.job_id,
                attempt: l.attempt,
                lease_token: l.token,
                sweep: l.sweep,
                model: l.model,
                rotation: l.rotation,
                spec_json: l.spec_json,
                lease_ttl_ms: ttl as u32,
                checkpoint_dir,
                seed: rotsweep_shared::rng::mix_seed(&[spec_seed, u64::from(l.rotation)]),
            }),
            retry_after_ms: 0,
            reason: String::new(),
        }
    }

    fn publish_expired(&self, expired: Vec<store::Expired>) {
        for e in expired {
            tracing::warn!(
                job_id = e.job_id,
                attempt = e.attempt,
                state = e.state,
                error = %e.reason,
                "lease expired"
            );
            self.publish(Event::Finished {
                job_id: e.job_id,
                attempt: e.attempt,
                state: e.state.to_string(),
                detail: e.reason,
            });
        }
    }

    /// Ends the attempts whose lease deadline passed and tells watchers;
    /// returns how many. The server's ticker calls this.
    pub async fn expire_leases(&self) -> Result<usize, Status> {
        let expired = self
            .write(|s, tx| s.expire_leases_in(tx, store::now_ms()))
            .await?;
        let n = expired.len();
        self.publish_expired(expired);
        Ok(n)
    }

    /// Queues a write for the store's writer thread (see [`Writer`]).
    async fn write<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.writer.call(f).await
    }

    /// Runs a query (read-only store call) off the async executor.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(to_status)
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    #[tracing::instrument(skip_all)]
    async fn submit_sweep(
        &self,
        request: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let req = request.into_inner();
        let spec = SweepSpec::from_json(&req.spec_json)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let outcome = self
            .write(move |s, tx| s.submit_in(tx, &spec, req.new_version))
            .await?;
        tracing::info!(sweep = %outcome.sweep, n_jobs = outcome.n_jobs, created = outcome.created, "sweep submitted");
        Ok(Response::new(pb::SubmitSweepResponse {
            sweep: outcome.sweep,
            n_jobs: outcome.n_jobs as u32,
            created: outcome.created,
        }))
    }

    #[tracing::instrument(skip_all, fields(worker_id = %request.get_ref().worker_id))]
    async fn lease_job(
        &self,
        request: Request<pb::LeaseJobRequest>,
    ) -> Result<Response<pb::LeaseJobResponse>, Status> {
        let req = request.into_inner();
        if req.worker_id.is_empty() {
            return Err(Status::invalid_argument("missing field `worker_id`"));
        }
        let ttl = self.ttl_ms();
        let worker_id = req.worker_id.clone();
        let sweep = (!req.sweep.is_empty()).then_some(req.sweep);
        let request_id = req.request_id;
        let (expired, outcome) = self
            .write(move |s, tx| {
                // The lease expires overdue leases first; they are published
                // once the group commits.
                let request = store::LeaseRequest {
                    worker_id: &worker_id,
                    sweep: sweep.as_deref(),
                    request_id: &request_id,
                };
                let outcome = s.lease_in(tx, &request, store::now_ms(), ttl);
                let expired = s.take_expired();
                Ok((expired, outcome?))
            })
            .await?;
        self.publish_expired(expired);

        let response = match outcome {
            LeaseOutcome::Leased(l) if l.replayed => {
                // Watchers saw this lease when it was first taken.
                tracing::info!(job_id = l.job_id, attempt = l.attempt, worker_id = %req.worker_id, "lease re-sent to a retried request");
                self.lease_response(l, ttl)
            }
            LeaseOutcome::Leased(l) => {
                tracing::info!(job_id = l.job_id, attempt = l.attempt, model = %l.model, rotation = l.rotation, "job leased");
                self.publish(Event::Leased {
                    sweep: l.sweep.clone(),
                    job_id: l.job_id,
                    model: l.model.clone(),
                    rotation: l.rotation,
                    attempt: l.attempt,
                    worker_id: req.worker_id.clone(),
                });
                self.lease_response(l, ttl)
            }
            LeaseOutcome::Wait => pb::LeaseJobResponse {
                outcome: pb::lease_job_response::Outcome::Wait as i32,
                job: None,
                retry_after_ms: (ttl / 10).clamp(100, 2000) as u32,
                reason: String::new(),
            },
            LeaseOutcome::Drained => pb::LeaseJobResponse {
                outcome: pb::lease_job_response::Outcome::Drained as i32,
                job: None,
                retry_after_ms: 0,
                reason: String::new(),
            },
            LeaseOutcome::Quarantined { until_ms, reason } => {
                tracing::warn!(error = %reason, "quarantined worker asked for a job");
                // Poll like a waiting worker: the queue may drain (then the
                // worker is told so and can exit) before the cool-down ends.
                let left = (until_ms - store::now_ms()).max(0);
                pb::LeaseJobResponse {
                    outcome: pb::lease_job_response::Outcome::Quarantined as i32,
                    job: None,
                    retry_after_ms: (ttl / 10).clamp(100, 2000).min(left.max(100)) as u32,
                    reason,
                }
            }
        };
        Ok(Response::new(response))
    }

    #[tracing::instrument(skip_all)]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let at = attempt_ref(request.into_inner().job)?;
        let ttl = self.ttl_ms();
        let cancel = self
            .write(move |s, tx| s.heartbeat_in(tx, &at, store::now_ms(), ttl))
            .await?;
        Ok(Response::new(pb::HeartbeatResponse { cancel }))
    }

    #[tracing::instrument(skip_all)]
    async fn report_epoch(
        &self,
        request: Request<pb::ReportEpochRequest>,
    ) -> Result<Response<pb::ReportEpochResponse>, Status> {
        let req = request.into_inner();
        let at = attempt_ref(req.job)?;
        let metrics = metrics_from_pb(
            req.metrics
                .ok_or_else(|| Status::invalid_argument("missing field `metrics`"))?,
        );
        let ttl = self.ttl_ms();
        let (job_id, attempt) = (at.job_id, at.attempt);
        let (stored, cancel) = self
            .write(move |s, tx| {
                s.report_in(
                    tx,
                    &store::Report {
                        at,
                        metrics,
                        now: store::now_ms(),
                        ttl_ms: ttl,
                    },
                )
            })
            .await?;
        tracing::debug!(
            job_id,
            attempt,
            epoch = metrics.epoch,
            stored,
            "epoch reported"
        );
        if stored {
            self.publish(Event::Epoch {
                job_id,
                attempt,
                metrics,
            });
        }
        Ok(Response::new(pb::ReportEpochResponse { stored, cancel }))
    }

    #[tracing::instrument(skip_all)]
    async fn complete_job(
        &self,
        request: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::CompleteJobResponse>, Status> {
        let req = request.into_inner();
        let at = attempt_ref(req.job)?;
        let n = req.labels.len();
        if req.confusion.len() != n * n {
            return Err(Status::invalid_argument(format!(
                "confusion has {} cells, expected {n}x{n}",
                req.confusion.len()
            )));
        }
        let confusion: Vec<Vec<u64>> = if n == 0 {
            Vec::new()
        } else {
            req.confusion.chunks(n).map(<[u64]>::to_vec).collect()
        };
        let completion = Completion {
            test_accuracy: req.test_accuracy,
            test_loss: req.test_loss,
            labels: req.labels,
            confusion,
            epochs_trained: req.epochs_trained,
            best_epoch: req.best_epoch,
            n_test: req.n_test,
            layers: crate::convert::layers_from_pb(&req.layers),
        };
        let (job_id, attempt) = (at.job_id, at.attempt);
        let accuracy = completion.test_accuracy;
        self.write(move |s, tx| s.complete_in(tx, &at, &completion, store::now_ms()))
            .await?;
        let state = if accuracy.is_finite() {
            store::state::COMPLETED
        } else {
            store::state::INVALID
        };
        tracing::info!(job_id, attempt, test_accuracy = accuracy, "job completed");
        self.publish(Event::Finished {
            job_id,
            attempt,
            state: state.to_string(),
            detail: format!("test accuracy {accuracy:.4}"),
        });
        Ok(Response::new(pb::CompleteJobResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn fail_job(
        &self,
        request: Request<pb::FailJobRequest>,
    ) -> Result<Response<pb::FailJobResponse>, Status> {
        let req = request.into_inner();
        let at = attempt_ref(req.job)?;
        let (job_id, attempt) = (at.job_id, at.attempt);
        let reason = req.reason.clone();
        let new_state = self
            .write(move |s, tx| {
                let cause = if req.release {
                    FailCause::Release
                } else if req.input_error {
                    FailCause::Input
                } else if req.job_fault {
                    FailCause::Job
                } else {
                    FailCause::Infra
                };
                s.fail_in(tx, &at, &req.reason, cause, store::now_ms())
            })
            .await?;
        tracing::warn!(job_id, attempt, state = new_state, error = %reason, "job attempt ended without a result");
        self.publish(Event::Finished {
            job_id,
            attempt,
            state: new_state.to_string(),
            detail: reason,
        });
        Ok(Response::new(pb::FailJobResponse {
            requeued: new_state == store::state::PENDING,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn sweep_status(
        &self,
        request: Request<pb::SweepStatusRequest>,
    ) -> Result<Response<pb::SweepStatusResponse>, Status> {
        let sweep = request.into_inner().sweep;
        let name = sweep.clone();
        let (jobs, workers) = self
            .blocking(move |s| {
                let now = store::now_ms();
                Ok((s.jobs(&name, now)?, s.workers(&name, now)?))
            })
            .await?;
        Ok(Response::new(pb::SweepStatusResponse {
            sweep,
            workers: workers
                .into_iter()
                .map(|w| pb::WorkerStatus {
                    worker_id: w.worker_id,
                    n_completed: w.n_completed,
                    n_job_failures: w.n_job_failures,
                    n_infra_failures: w.n_infra_failures,
                    consecutive_failures: w.consecutive_failures,
                    quarantined: w.quarantine_seconds_left > 0.0,
                    quarantine_seconds_left: w.quarantine_seconds_left,
                })
                .collect(),
            jobs: jobs
                .into_iter()
                .map(|j| pb::JobStatus {
                    job_id: j.job_id,
                    model: j.model,
                    kind: j.kind,
                    rotation: j.rotation,
                    state: j.state,
                    attempt: j.attempt,
                    worker_id: j.worker_id,
                    epoch: j.epoch,
                    best_metric: j.best_metric.unwrap_or(f64::NAN),
                    elapsed_seconds: j.elapsed_seconds,
                    last_error: j.last_error,
                    test_accuracy: j.test_accuracy.unwrap_or(f64::NAN),
                    infra_failures: j.infra_failures,
                    job_failures: j.job_failures,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn sweep_summary(
        &self,
        request: Request<pb::SweepSummaryRequest>,
    ) -> Result<Response<pb::SweepSummaryResponse>, Status> {
        let sweep = request.into_inner().sweep;
        let summary = self.blocking(move |s| s.summary(&sweep)).await?;
        Ok(Response::new(crate::convert::summary_to_pb(&summary)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_epochs(
        &self,
        request: Request<pb::ListEpochsRequest>,
    ) -> Result<Response<pb::ListEpochsResponse>, Status> {
        let sweep = request.into_inner().sweep;
        let rows = self.blocking(move |s| s.epochs(&sweep)).await?;
        Ok(Response::new(pb::ListEpochsResponse {
            rows: rows
                .into_iter()
                .map(|r| pb::EpochRow {
                    job_id: r.job_id,
                    model: r.model,
                    rotation: r.rotation,
                    attempt: r.attempt,
                    metrics: Some(metrics_to_pb(&r.metrics)),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_sweep(
        &self,
        request: Request<pb::CancelSweepRequest>,
    ) -> Result<Response<pb::CancelSweepResponse>, Status> {
        let sweep = request.into_inner().sweep;
        let name = sweep.clone();
        let (pending, running) = self.write(move |s, tx| s.cancel_in(tx, &name)).await?;
        tracing::info!(%sweep, pending, running, "sweep cancelled");
        Ok(Response::new(pb::CancelSweepResponse {
            n_pending_cancelled: pending as u32,
            n_running_signalled: running as u32,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn resume_sweep(
        &self,
        request: Request<pb::ResumeSweepRequest>,
    ) -> Result<Response<pb::ResumeSweepResponse>, Status> {
        let req = request.into_inner();
        let states: Vec<String> = if req.states.is_empty() {
            vec![store::state::FAILED.into(), store::state::CANCELLED.into()]
        } else {
            req.states.iter().map(|s| s.to_ascii_uppercase()).collect()
        };
        let sweep = req.sweep.clone();
        let n = self
            .write(move |s, tx| {
                let refs: Vec<&str> = states.iter().map(String::as_str).collect();
                s.resume_in(tx, &sweep, &refs)
            })
            .await?;
        tracing::info!(sweep = %req.sweep, n_requeued = n, "sweep resumed");
        Ok(Response::new(pb::ResumeSweepResponse {
            n_requeued: n as u32,
        }))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send + 'static>,
    >;

    #[tracing::instrument(skip_all)]
    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let sweep = request.into_inner().sweep;
        // Subscribe before reading the job list so no event falls between.
        let mut events = self.subscribe();
        let name = sweep.clone();
        let jobs = self.blocking(move |s| s.jobs(&name, 0)).await?;
        let jobs: std::collections::HashMap<i64, (String, u32)> = jobs
            .into_iter()
            .map(|j| (j.job_id, (j.model, j.rotation)))
            .collect();
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);

        // A sweep that has already finished has nothing left to say: end the
        // stream at once instead of waiting for events that never come.
        let name = sweep.clone();
        if self.blocking(move |s| s.is_finished(&name)).await? {
            drop(tx);
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
        }

        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(n_missed = n, "watcher too slow; events dropped");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let (job_id, attempt, body, detail) = match &event {
                    Event::Leased {
                        job_id,
                        attempt,
                        worker_id,
                        ..
                    } => (
                        *job_id,
                        *attempt,
                        pb::watch_event::Event::LeasedBy(worker_id.clone()),
                        String::new(),
                    ),
                    Event::Epoch {
                        job_id,
                        attempt,
                        metrics,
                    } => (
                        *job_id,
                        *attempt,
                        pb::watch_event::Event::Epoch(metrics_to_pb(metrics)),
                        String::new(),
                    ),
                    Event::Finished {
                        job_id,
                        attempt,
                        state,
                        detail,
                    } => (
                        *job_id,
                        *attempt,
                        pb::watch_event::Event::State(state.clone()),
                        detail.clone(),
                    ),
                };
                let Some((model, rotation)) = jobs.get(&job_id) else {
                    continue;
                };
                let message = pb::WatchEvent {
                    job_id,
                    model: model.clone(),
                    rotation: *rotation,
                    attempt,
                    event: Some(body),
                    detail,
                };
                // The client left: drop the stream quietly.
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
                if matches!(event, Event::Finished { .. }) {
                    let s = store.clone();
                    let name = sweep.clone();
                    let finished = tokio::task::spawn_blocking(move || s.is_finished(&name)).await;
                    if matches!(finished, Ok(Ok(true))) {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn list_sweeps(
        &self,
        _request: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let sweeps = self.blocking(|s| s.sweeps()).await?;
        Ok(Response::new(pb::ListSweepsResponse { sweeps }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_results(
        &self,
        request: Request<pb::ListResultsRequest>,
    ) -> Result<Response<pb::ListResultsResponse>, Status> {
        let sweep = request.into_inner().sweep;
        let name = sweep.clone();
        let (spec_json, results) = self
            .blocking(move |s| Ok((s.spec_json(&name)?, s.results(&name)?)))
            .await?;
        Ok(Response::new(pb::ListResultsResponse {
            sweep,
            spec_json,
            results: results.iter().map(crate::convert::result_to_pb).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that panics is answered INTERNAL (its group is rolled back),
    /// and the writer thread still serves the writes queued after it.
    #[tokio::test]
    async fn the_writer_survives_a_panicking_write() {
        let dir = std::env::temp_dir().join(format!("rotsweep-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(Store::open(&dir).unwrap());
        let writer = Writer::start(store);
        let err = writer
            .call(|_, _| -> Result<(), StoreError> { panic!("a bug in a store call") })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        let expired = writer
            .call(|s, tx| s.expire_leases_in(tx, 0))
            .await
            .unwrap();
        assert!(expired.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

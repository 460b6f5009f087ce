//! Binding and running the coordinator server: the binding rule (see
//! [`check_bind`]), TLS, the lease-expiry ticker, and a graceful shutdown
//! the caller controls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rotsweep_proto::auth::{CheckToken, Token};
use rotsweep_proto::coordinator_server::CoordinatorServer;
use rotsweep_proto::tls::ServerTls;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::codegen::InterceptedService;
use tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer as ReflectionV1;
use tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer as ReflectionV1Alpha;

use crate::service::{CoordinatorService, ServiceConfig, MAX_MESSAGE_BYTES};
use crate::store::{self, QuarantinePolicy, Store};

/// Everything `serve` needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Directory holding `state.sqlite` and the checkpoints.
    pub state_dir: PathBuf,
    /// Bearer token every request must carry; `None` allows loopback only.
    pub token: Option<Token>,
    /// Lease duration without heartbeat.
    pub lease_ttl: Duration,
    /// Certificate and key to serve TLS with; `None` serves plain text.
    pub tls: Option<ServerTls>,
    /// Allow a token on a non-loopback address without TLS (the token then
    /// crosses the network in clear text).
    pub insecure_no_tls: bool,
    /// When a worker that fails job after job stops getting leases.
    pub quarantine: QuarantinePolicy,
}

/// The binding rule: without a token only a loopback address; with a token
/// on any other address, TLS too, unless `insecure_no_tls` says otherwise.
pub fn check_bind(
    listen: SocketAddr,
    has_token: bool,
    has_tls: bool,
    insecure_no_tls: bool,
) -> anyhow::Result<()> {
    if listen.ip().is_loopback() {
        return Ok(());
    }
    if !has_token {
        bail!(
            "refusing to listen on {listen} without a token: set {} or pass --token-file, \
             or listen on a loopback address",
            rotsweep_proto::auth::TOKEN_ENV
        );
    }
    if !has_tls && !insecure_no_tls {
        bail!(
            "refusing to listen on {listen} without TLS: the bearer token would cross the \
             network in clear text; pass --tls-cert and --tls-key, listen on a loopback \
             address, or pass --insecure-no-tls"
        );
    }
    Ok(())
}

/// A running server.
pub struct RunningServer {
    /// The bound address (with the real port when 0 was asked).
    pub addr: SocketAddr,
    /// The service, for in-process subscribers and direct store access.
    pub service: CoordinatorService,
    tls: bool,
    shutdown_tx: watch::Sender<bool>,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
    ticker: JoinHandle<()>,
}

impl RunningServer {
    /// The URL clients connect to (`https://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops accepting requests, lets in-flight ones finish, and waits.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown_tx.send(true);
        self.ticker.abort();
        self.handle
            .await
            .context("server task panicked")?
            .context("server failed")?;
        Ok(())
    }

    /// Serves until `stop` resolves (then shuts down gracefully) or the
    /// server fails on its own.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            _ = stop => self.shutdown().await,
            res = &mut self.handle => {
                self.ticker.abort();
                res.context("server task panicked")?.context("server failed")?;
                bail!("server stopped unexpectedly")
            }
        }
    }
}

/// The standard gRPC health service (`grpc.health.v1.Health`) and the
/// reflection services (v1 and v1alpha, for older `grpcurl`).
///
/// Health answers without a token: Kubernetes' gRPC probes cannot send one,
/// and it reveals only SERVING. Reflection describes the API and needs the
/// token like the API itself (`grpcurl -expand-headers -H 'authorization:
/// Bearer ${ROTSWEEP_TOKEN}'`).
async fn health_and_reflection(
    token: Option<Token>,
) -> anyhow::Result<(
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    InterceptedService<
        ReflectionV1<impl tonic_reflection::pb::v1::server_reflection_server::ServerReflection>,
        CheckToken,
    >,
    InterceptedService<
        ReflectionV1Alpha<
            impl tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflection,
        >,
        CheckToken,
    >,
)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rotsweep_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the gRPC reflection service (v1)")?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rotsweep_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the gRPC reflection service (v1alpha)")?;
    Ok((
        health,
        InterceptedService::new(v1, CheckToken(token.clone())),
        InterceptedService::new(v1alpha, CheckToken(token)),
    ))
}

/// Opens the store, binds the listener and starts serving.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    check_bind(
        config.listen,
        config.token.is_some(),
        config.tls.is_some(),
        config.insecure_no_tls,
    )?;
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.config())
            .context("loading the TLS certificate and key")?;
    }

    let store = Store::open(&config.state_dir)
        .with_context(|| format!("opening state in {}", config.state_dir.display()))?
        .with_quarantine(config.quarantine);
    // Workers that kept training while this coordinator was down are
    // retrying their heartbeats: give them one lease time to get through
    // instead of expiring their leases for the downtime.
    let ttl_ms = config.lease_ttl.as_millis() as i64;
    let n_running = store
        .extend_running_leases(store::now_ms(), ttl_ms)
        .context("extending the leases of running jobs")?;
    if n_running > 0 {
        tracing::info!(
            n_running,
            "running jobs kept; their workers have one lease time to report back"
        );
    }
    let store = Arc::new(store);
    let service = CoordinatorService::new(
        store.clone(),
        ServiceConfig {
            lease_ttl: config.lease_ttl,
            checkpoint_root: Some(config.state_dir.join("checkpoints")),
        },
    );

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // tonic ignores the builder's `tcp_nodelay` with `serve_with_incoming`:
    // set it on every accepted socket, or Nagle plus the peer's delayed ACK
    // add ~40 ms to every response larger than one segment (leases).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            let stream = conn?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        },
    );

    let grpc = tonic::codegen::InterceptedService::new(
        CoordinatorServer::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        CheckToken(config.token.clone()),
    );
    let (health, reflection_v1, reflection_v1alpha) =
        health_and_reflection(config.token.clone()).await?;
    let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        builder
            .add_service(grpc)
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown_rx.wait_for(|stop| *stop).await;
            })
            .await
    });

    // Expire dead leases even when no worker asks for work, so `status`
    // shows re-queued jobs promptly.
    let tick = (config.lease_ttl / 4).max(Duration::from_millis(50));
    let ticker_service = service.clone();
    let ticker = tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        loop {
            interval.tick().await;
            // Each expiry is logged and published by the service.
            if let Err(e) = ticker_service.expire_leases().await {
                tracing::error!(error = %e.message(), "lease expiry failed");
            }
        }
    });

    if config.token.is_some() && config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "serving without TLS: the bearer token crosses the network in clear text (--insecure-no-tls)");
    }
    tracing::info!(%addr, auth = config.token.is_some(), tls = config.tls.is_some(), state = %config.state_dir.display(), "coordinator listening");
    Ok(RunningServer {
        addr,
        service,
        tls: config.tls.is_some(),
        shutdown_tx,
        handle,
        ticker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_beyond_loopback_needs_a_token_and_tls() {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let lo6: SocketAddr = "[::1]:0".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();

        // Loopback: anything goes.
        assert!(check_bind(lo, false, false, false).is_ok());
        assert!(check_bind(lo6, false, false, false).is_ok());

        // Beyond loopback: a token, and TLS unless explicitly waived.
        let err = check_bind(any, false, true, true).unwrap_err().to_string();
        assert!(err.contains("without a token"), "{err}");
        let err = check_bind(any, true, false, false).unwrap_err().to_string();
        assert!(err.contains("without TLS"), "{err}");
        assert!(err.contains("--insecure-no-tls"), "{err}");
        assert!(check_bind(any, true, true, false).is_ok());
        assert!(check_bind(any, true, false, true).is_ok());
    }
}

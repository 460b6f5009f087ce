//! The client side of the CLI: connecting with the token, and turning RPC
//! failures into messages that say what to do.

use std::path::Path;

use anyhow::Context;
use rotsweep_proto as pb;
use rotsweep_proto::auth::Token;
use rotsweep_proto::tls::{self, Remote};
pub use rotsweep_proto::Client;
pub use tonic_health::pb::health_check_response::ServingStatus;

/// Connects to `url` with the token from `token_file` or `ROTSWEEP_TOKEN`;
/// an `https://` URL is verified against the CA in `tls_ca` (or the file
/// `ROTSWEEP_TLS_CA` names), else the platform's roots.
pub async fn connect(
    url: &str,
    token_file: Option<&Path>,
    tls_ca: Option<&Path>,
) -> anyhow::Result<Client> {
    let token = Token::load(token_file).map_err(anyhow::Error::msg)?;
    let ca = tls::load_ca(tls_ca)?;
    Remote::new(url, token, ca.as_deref())?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the coordinator at {url}"))
}

/// Adds the RPC name to a failed call, keeping the server's message.
pub fn rpc_error(rpc: &str, status: tonic::Status) -> anyhow::Error {
    let hint = match status.code() {
        tonic::Code::Unauthenticated => {
            " (ROTSWEEP_TOKEN or --token-file must hold the coordinator's token)"
        }
        tonic::Code::Unavailable => " (is the coordinator running?)",
        _ => "",
    };
    anyhow::anyhow!(
        "{rpc} failed: {:?}: {}{hint}",
        status.code(),
        status.message()
    )
}

/// Asks the coordinator's standard gRPC health service
/// (`grpc.health.v1.Health/Check`) how `service` is doing (`""`: the whole
/// server). Needs no token; an `https://` URL is verified as in [`connect`].
/// Gives up after `timeout`.
pub async fn check_health(
    url: &str,
    tls_ca: Option<&Path>,
    service: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<ServingStatus> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let ca = tls::load_ca(tls_ca)?;
    let remote = Remote::new(url, None, ca.as_deref())?;
    let ask = async {
        let channel = remote
            .channel()
            .await
            .with_context(|| format!("cannot connect to the coordinator at {url}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|s| rpc_error("Health/Check", s))?;
        anyhow::Ok(response.into_inner().status())
    };
    tokio::time::timeout(timeout, ask)
        .await
        .with_context(|| format!("no health answer from {url} within {timeout:?}"))?
}

/// `SweepStatus` for one sweep, with the RPC named in the error.
pub async fn sweep_status(
    client: &mut Client,
    sweep: &str,
) -> anyhow::Result<pb::SweepStatusResponse> {
    let request = pb::SweepStatusRequest {
        sweep: sweep.to_string(),
    };
    Ok(client
        .sweep_status(request)
        .await
        .map_err(|s| rpc_error("SweepStatus", s))?
        .into_inner())
}

/// `ListEpochs` for one sweep, with the RPC named in the error.
pub async fn list_epochs(
    client: &mut Client,
    sweep: &str,
) -> anyhow::Result<pb::ListEpochsResponse> {
    let request = pb::ListEpochsRequest {
        sweep: sweep.to_string(),
    };
    Ok(client
        .list_epochs(request)
        .await
        .map_err(|s| rpc_error("ListEpochs", s))?
        .into_inner())
}

/// `ListResults` for one sweep, with the RPC named in the error.
pub async fn list_results(
    client: &mut Client,
    sweep: &str,
) -> anyhow::Result<pb::ListResultsResponse> {
    let request = pb::ListResultsRequest {
        sweep: sweep.to_string(),
    };
    Ok(client
        .list_results(request)
        .await
        .map_err(|s| rpc_error("ListResults", s))?
        .into_inner())
}

//! The client side of the CLI: connecting with the token, and turning RPC
//! failures into messages that say what to do.

use std::path::Path;

use anyhow::Context;
use rotsweep_proto::auth::Token;
use rotsweep_proto::tls::{self, Remote};
pub use rotsweep_proto::Client;

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
            " (set ROTSWEEP_TOKEN or --token-file to the coordinator's token)"
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

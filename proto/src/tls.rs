//! TLS for the control plane (rustls through tonic), and [`Remote`], a
//! coordinator address resolved once into a ready-to-connect endpoint.
//!
//! The coordinator serves TLS when given a PEM certificate chain and key
//! ([`ServerTls`]). Clients use TLS for `https://` URLs and verify the
//! server against the platform's trusted roots, or only against a private CA
//! when one is given (`--tls-ca FILE` or the `ROTSWEEP_TLS_CA` variable).
//! The key's bytes never appear in `Debug` output.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::auth::{AddToken, Token};
use crate::{coordinator_client::CoordinatorClient, Client, MAX_MESSAGE_BYTES};

/// Environment variable naming a PEM file of CA certificates that clients
/// trust instead of the platform's roots.
pub const CA_ENV: &str = "ROTSWEEP_TLS_CA";

/// Interval of HTTP/2 keep-alive pings from clients, and how long a ping
/// may go unanswered before the connection is dropped.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Why a coordinator address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse.
    #[error("invalid coordinator URL `{url}`: {source}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        source: tonic::transport::Error,
    },
    /// The URL's scheme is neither `http` nor `https`.
    #[error("coordinator URL `{0}` must start with http:// or https://")]
    Scheme(String),
    /// A CA was given for a plain-text URL, which would silently not use it.
    #[error("a TLS CA was given but the coordinator URL `{0}` is not https://")]
    CaWithoutTls(String),
    /// A PEM file cannot be read or holds no certificate.
    #[error("cannot use {}: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The TLS settings were refused by rustls/tonic.
    #[error("invalid TLS settings: {0}")]
    Tls(tonic::transport::Error),
    /// Connecting failed (refused, timed out, TLS handshake failed).
    #[error("cannot connect: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The connection did not become ready in time.
    #[error("cannot connect: no answer within {:.1} s", .0.as_secs_f64())]
    Timeout(Duration),
}

fn read_pem(path: &Path, marker: &str) -> Result<Vec<u8>, ConnectError> {
    let bad = |message: String| ConnectError::Pem {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains(&format!("-----BEGIN {marker}")) {
        return Err(bad(format!("no PEM `{marker}` block found")));
    }
    Ok(bytes)
}

/// The private CA a client trusts: from `file` if given, else from the file
/// `ROTSWEEP_TLS_CA` names, else none (the platform's roots).
pub fn load_ca(file: Option<&Path>) -> Result<Option<Vec<u8>>, ConnectError> {
    let from_env = std::env::var_os(CA_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    match file.map(Path::to_path_buf).or(from_env) {
        Some(path) => read_pem(&path, "CERTIFICATE").map(Some),
        None => Ok(None),
    }
}

/// A server certificate chain and private key (PEM). `Debug` hides the key.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls { cert, key: <redacted> }")
    }
}

impl ServerTls {
    /// Reads a PEM certificate chain and its PEM private key.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, ConnectError> {
        Ok(Self {
            cert_pem: read_pem(cert, "CERTIFICATE")?,
            key_pem: read_pem(key, "")?,
        })
    }

    /// The tonic server configuration.
    pub fn config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// A coordinator address resolved once: the endpoint (with TLS when the URL
/// is `https://`) and the bearer token every request carries.
#[derive(Clone, Debug)]
pub struct Remote {
    url: String,
    endpoint: Endpoint,
    token: Option<Token>,
}

impl Remote {
    /// Checks `url` and builds its endpoint. `ca_pem` (PEM certificates)
    /// replaces the platform's roots and requires an `https://` URL.
    pub fn new(
        url: &str,
        token: Option<Token>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ConnectError> {
        let endpoint =
            Endpoint::from_shared(url.to_string()).map_err(|source| ConnectError::Url {
                url: url.to_string(),
                source,
            })?;
        // HTTP/2 pings find a connection that went silent (a partition that
        // lost the TCP state): without them its calls would wait forever.
        // A dead connection is dropped within 20 s and the next call dials
        // again.
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE)
            .keep_alive_while_idle(true);
        let endpoint = match (endpoint.uri().scheme_str(), ca_pem) {
            (Some("https"), ca) => {
                let tls = match ca {
                    Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                    None => ClientTlsConfig::new().with_enabled_roots(),
                };
                endpoint
                    .tls_config(tls.timeout(Duration::from_secs(10)))
                    .map_err(ConnectError::Tls)?
            }
            (Some("http"), None) => endpoint,
            (Some("http"), Some(_)) => return Err(ConnectError::CaWithoutTls(url.to_string())),
            _ => return Err(ConnectError::Scheme(url.to_string())),
        };
        Ok(Self {
            url: url.to_string(),
            endpoint,
            token,
        })
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True when the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.endpoint.uri().scheme_str() == Some("https")
    }

    /// Connects without the token interceptor, for services that need no
    /// token (the standard gRPC health service).
    pub async fn channel(&self) -> Result<tonic::transport::Channel, ConnectError> {
        Ok(self.endpoint.connect().await?)
    }

    /// Connects and wraps the channel with the token interceptor and the
    /// message-size caps.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let channel = self.endpoint.connect().await?;
        Ok(self.wrap(channel))
    }

    /// A client on a new channel that dials on its first call. Callers that
    /// bound each call with a deadline use it to drop a connection that
    /// stopped answering without ever failing.
    pub fn connect_lazy(&self) -> Client {
        self.wrap(self.endpoint.connect_lazy())
    }

    fn wrap(&self, channel: tonic::transport::Channel) -> Client {
        CoordinatorClient::with_interceptor(channel, AddToken(self.token.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_ca_must_agree() {
        assert!(Remote::new("http://127.0.0.1:1", None, None).is_ok());
        // (`https://` without a CA depends on the machine's trust store; the
        // end-to-end tests cover `https://` with a private CA.)
        let err = Remote::new("http://127.0.0.1:1", None, Some(b"x")).unwrap_err();
        assert!(matches!(err, ConnectError::CaWithoutTls(_)), "{err}");
        let err = Remote::new("ftp://127.0.0.1:1", None, None).unwrap_err();
        assert!(matches!(err, ConnectError::Scheme(_)), "{err}");
    }

    #[test]
    fn a_file_without_pem_blocks_is_refused() {
        let path = std::env::temp_dir().join(format!("rotsweep-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate").unwrap();
        let err = load_ca(Some(&path)).unwrap_err();
        assert!(err.to_string().contains("no PEM"), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn debug_output_hides_the_key() {
        let tls = ServerTls {
            cert_pem: b"CERT".to_vec(),
            key_pem: b"SECRET-KEY".to_vec(),
        };
        assert!(!format!("{tls:?}").contains("SECRET"));
    }
}

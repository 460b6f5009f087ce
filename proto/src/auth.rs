//! Bearer-token authentication shared by both ends of the wire.
//!
//! The token travels in the `authorization: Bearer <token>` metadata of every
//! request. It is read from the `ROTSWEEP_TOKEN` environment variable or from
//! a file, never from a command-line value (which `ps` would show). It is
//! never logged: [`Token`]'s `Debug` prints a placeholder.

use std::path::Path;

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// Environment variable holding the token.
pub const TOKEN_ENV: &str = "ROTSWEEP_TOKEN";

/// A secret bearer token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Wraps a token, refusing empty ones and characters that cannot go into
    /// an HTTP header.
    pub fn new(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Err("the token is empty".into());
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(Self(value.to_string()))
    }

    /// The token from `file` if given, else from `ROTSWEEP_TOKEN`, else none.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>, String> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
            return Self::new(&text)
                .map(Some)
                .map_err(|e| format!("token file {}: {e}", path.display()));
        }
        match std::env::var(TOKEN_ENV) {
            Ok(v) if !v.trim().is_empty() => Self::new(&v)
                .map(Some)
                .map_err(|e| format!("{TOKEN_ENV}: {e}")),
            _ => Ok(None),
        }
    }

    /// A fresh random token (256 bits from the OS, hex).
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read;
        let mut buf = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
        Ok(Self(buf.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The secret itself, to hand to a child process's environment.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with a presented value.
    fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        presented
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// Client interceptor: adds the bearer token, if any, to each request.
#[derive(Clone, Debug)]
pub struct AddToken(pub Option<Token>);

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {}", token.0))
                .map_err(|_| Status::internal("token is not a valid header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Server interceptor: refuses any request without the right token with
/// `UNAUTHENTICATED` and a message that reveals nothing about the token.
#[derive(Clone, Debug)]
pub struct CheckToken(pub Option<Token>);

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        match presented {
            Some(p) if expected.matches(p) => Ok(request),
            _ => Err(Status::unauthenticated("missing or invalid bearer token")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn check_token_accepts_only_the_exact_token() {
        let token = Token::new("s3cret").unwrap();
        let mut check = CheckToken(Some(token.clone()));
        let mut add = AddToken(Some(token));
        assert!(check.call(add.call(Request::new(())).unwrap()).is_ok());

        let mut wrong = AddToken(Some(Token::new("s3cres").unwrap()));
        let err = check
            .call(wrong.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let err = check.call(Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(!err.message().contains("s3cret"));
    }

    #[test]
    fn debug_output_hides_the_token() {
        let token = Token::new("s3cret").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
        assert!(Token::new("  ").is_err());
        assert!(Token::new("a b").is_err());
    }
}

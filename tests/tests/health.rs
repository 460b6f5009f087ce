//! The coordinator's standard gRPC services beside its API: health
//! (`grpc.health.v1.Health`, what container probes ask, without a token,
//! here over TLS through `rotsweep health`) and reflection (what `grpcurl`
//! explores, behind the token like the API).

use std::time::Duration;

use rotsweep_proto::auth::{AddToken, Token};
use rotsweep_tests::*;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const TOKEN: &str = "health-test-token-0123456789";

#[test]
fn health_needs_no_token_checks_tls_and_fails_once_the_server_is_gone() -> anyhow::Result<()> {
    let dir = temp_dir("health");
    let certs = write_test_certs(&dir.join("tls"))?;
    let (cert, key, ca) = (
        certs.cert.to_string_lossy().into_owned(),
        certs.key.to_string_lossy().into_owned(),
        certs.ca.to_string_lossy().into_owned(),
    );
    let mut server = Server::start_with(
        &dir.join("state"),
        Some(TOKEN),
        10.0,
        Extra {
            args: &["--tls-cert", &cert, "--tls-key", &key],
            envs: &[],
        },
    )?;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let health = |extra: &[&str]| {
        let mut args = vec!["health", "--coordinator", &server.url, "--format", "json"];
        args.extend_from_slice(extra);
        cli(&args, None)
    };

    let (code, out, err) = health(&["--tls-ca", &ca])?;
    assert_eq!(code, 0, "health failed: {err}");
    let answer: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(answer["status"], "SERVING", "{out}");

    let (code, out, err) = health(&["--tls-ca", &ca, "--service", "rotsweep.v1.Coordinator"])?;
    assert_eq!(code, 0, "health of the API failed: {err}");
    assert!(out.contains("SERVING"), "{out}");

    let (code, _, err) = health(&["--tls-ca", &ca, "--service", "no.such.Service"])?;
    assert_ne!(code, 0, "an unknown service must not count as healthy");
    assert!(err.contains("NotFound"), "{err}");

    // The server's certificate is checked: without the private CA it is
    // refused.
    let (code, _, _) = health(&[])?;
    assert_ne!(code, 0, "a certificate from an unknown CA was accepted");

    server.proc.child.kill()?;
    server.proc.wait_timeout(Duration::from_secs(10))?;
    let (code, _, err) = health(&["--tls-ca", &ca, "--timeout", "5"])?;
    assert_ne!(code, 0, "a stopped server reported healthy");
    assert!(err.contains("cannot connect"), "{err}");
    Ok(())
}

/// Runs one reflection request against `url` and returns its answer.
async fn reflect(
    url: &str,
    token: Option<&str>,
    request: MessageRequest,
) -> Result<MessageResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("a valid URL")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let token = token.map(|t| Token::new(t).expect("a valid token"));
    let mut client = ServerReflectionClient::with_interceptor(channel, AddToken(token));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("no answer"))?;
    answer
        .message_response
        .ok_or_else(|| tonic::Status::internal("an empty answer"))
}

#[test]
fn reflection_describes_the_api_to_token_holders_only() -> anyhow::Result<()> {
    let dir = temp_dir("reflection");
    let server = Server::start(&dir.join("state"), Some(TOKEN), 10.0)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let listed = runtime.block_on(reflect(
        &server.url,
        Some(TOKEN),
        MessageRequest::ListServices(String::new()),
    ))?;
    let MessageResponse::ListServicesResponse(list) = listed else {
        panic!("unexpected answer to ListServices: {listed:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for wanted in ["rotsweep.v1.Coordinator", "grpc.health.v1.Health"] {
        assert!(names.contains(&wanted), "{wanted} not listed: {names:?}");
    }

    let described = runtime.block_on(reflect(
        &server.url,
        Some(TOKEN),
        MessageRequest::FileContainingSymbol("rotsweep.v1.Coordinator".into()),
    ))?;
    let MessageResponse::FileDescriptorResponse(files) = described else {
        panic!("unexpected answer to FileContainingSymbol: {described:?}");
    };
    assert!(
        !files.file_descriptor_proto.is_empty(),
        "no descriptor for the API"
    );

    let refused = runtime.block_on(reflect(
        &server.url,
        None,
        MessageRequest::ListServices(String::new()),
    ));
    match refused {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}"),
        Ok(answer) => panic!("reflection answered without a token: {answer:?}"),
    }
    Ok(())
}

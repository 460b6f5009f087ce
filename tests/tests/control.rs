//! The control plane under pressure, with real processes on loopback:
//! authentication (missing and wrong tokens, raw clients and the CLI), the
//! binding rule, TLS with a private CA generated here, request-size caps,
//! tokens kept out of every log (scenario 10); a changed spec under a used
//! name (scenario 9); 32 workers leasing at the same instant (scenario 4);
//! and the per-sweep concurrency cap across a coordinator restart.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rotsweep_proto as pb;
use rotsweep_proto::auth::{AddToken, Token};
use rotsweep_proto::lease_job_response::Outcome;
use rotsweep_proto::tls::Remote;
use rotsweep_shared::spec::SweepSpec;
use rotsweep_tests::*;
use tonic::Code;

const TOKEN: &str = "control-test-token-5f0c2a9e71d4b8";
const WRONG: &str = "wrong-token-bd83e6a1c09f";

/// The one message a refused request gets, whatever was wrong.
const REFUSAL: &str = "missing or invalid bearer token";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs `fut` on `rt`, failing after `secs` seconds.
fn bounded<T>(
    rt: &tokio::runtime::Runtime,
    secs: u64,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(secs), fut)
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {secs} s"))?
    })
}

fn token(value: &str) -> Token {
    Token::new(value).expect("a valid test token")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Fails if any `.log` file under `dirs` (or any of `texts`) contains a
/// secret; also checks that `must_log` files are not empty, so the check
/// cannot pass by reading nothing.
fn assert_no_secret_in(dirs: &[&Path], texts: &[&str], must_log: &[&Path]) {
    for path in must_log {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(!text.trim().is_empty(), "{} is empty", path.display());
    }
    for dir in dirs {
        for entry in std::fs::read_dir(dir).expect("log dir").flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&path).expect("readable log");
                for secret in [TOKEN, WRONG] {
                    assert!(
                        !text.contains(secret),
                        "{} contains a token",
                        path.display()
                    );
                }
            }
        }
    }
    for text in texts {
        assert!(!text.contains(TOKEN) && !text.contains(WRONG), "{text}");
    }
}

async fn lease(client: &mut pb::Client, worker: &str, sweep: &str) -> pb::LeaseJobResponse {
    client
        .lease_job(pb::LeaseJobRequest {
            worker_id: worker.into(),
            sweep: sweep.into(),
            ..Default::default()
        })
        .await
        .expect("LeaseJob succeeds")
        .into_inner()
}

fn status_json(url: &str, sweep: &str) -> anyhow::Result<serde_json::Value> {
    let (code, out, err) = cli(
        &["status", sweep, "--coordinator", url, "--format", "json"],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "status failed: {err}");
    Ok(json(&out))
}

#[test]
fn missing_or_wrong_tokens_get_unauthenticated_and_change_nothing() -> anyhow::Result<()> {
    let dir = temp_dir("auth");
    let state = dir.join("state");
    // Trace level: even the most verbose server log must not hold a token.
    let server = Server::start_with(
        &state,
        Some(TOKEN),
        30.0,
        Extra {
            envs: &[("RUST_LOG", "trace")],
            ..Extra::default()
        },
    )?;
    let spec = tiny_spec(&dir, "guarded", &["gru"], &[0], 1);
    let spec_json = SweepSpec::from_path(&spec)?.to_json();

    let rt = runtime();
    bounded(&rt, 120, async {
        // Raw clients: no token, a wrong one, and near misses of the right
        // one. Every RPC answers UNAUTHENTICATED with the same message.
        let channel = tonic::transport::Endpoint::from_shared(server.url.clone())?
            .connect()
            .await?;
        let headers = [
            None,
            Some(format!("Bearer {WRONG}")),
            Some(format!("Bearer {TOKEN}x")),
            Some(format!("Basic {TOKEN}")),
            Some(TOKEN.to_string()),
        ];
        for header in headers {
            let mut c = pb::coordinator_client::CoordinatorClient::with_interceptor(
                channel.clone(),
                move |mut req: tonic::Request<()>| {
                    if let Some(h) = &header {
                        req.metadata_mut()
                            .insert("authorization", h.parse().expect("ASCII header"));
                    }
                    Ok(req)
                },
            );
            let sweep = || "guarded".to_string();
            let answers: Vec<(&str, Result<(), tonic::Status>)> = vec![
                (
                    "SubmitSweep",
                    c.submit_sweep(pb::SubmitSweepRequest {
                        spec_json: spec_json.clone(),
                        new_version: false,
                    })
                    .await
                    .map(drop),
                ),
                (
                    "ListSweeps",
                    c.list_sweeps(pb::ListSweepsRequest {}).await.map(drop),
                ),
                (
                    "LeaseJob",
                    c.lease_job(pb::LeaseJobRequest {
                        worker_id: "intruder".into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
                ),
                (
                    "SweepStatus",
                    c.sweep_status(pb::SweepStatusRequest { sweep: sweep() })
                        .await
                        .map(drop),
                ),
                (
                    "Watch",
                    c.watch(pb::WatchRequest { sweep: sweep() }).await.map(drop),
                ),
                (
                    "CancelSweep",
                    c.cancel_sweep(pb::CancelSweepRequest { sweep: sweep() })
                        .await
                        .map(drop),
                ),
            ];
            for (rpc, answer) in answers {
                let status = answer.expect_err("an unauthenticated call must fail");
                assert_eq!(status.code(), Code::Unauthenticated, "{rpc}: {status:?}");
                assert_eq!(status.message(), REFUSAL, "{rpc}");
                assert!(status.details().is_empty(), "{rpc}");
            }
        }

        // Nothing happened: no sweep was stored, and the right token works.
        let mut good = pb::connect(&server.url, Some(token(TOKEN))).await?;
        let sweeps = good
            .list_sweeps(pb::ListSweepsRequest {})
            .await?
            .into_inner();
        assert!(sweeps.sweeps.is_empty(), "{:?}", sweeps.sweeps);

        // Request sizes are capped at 4 MiB: a client without its own cap
        // sending 5 MiB gets OUT_OF_RANGE, and the server carries on. A
        // 3 MiB message still reaches the service (and is refused as a bad
        // spec).
        let mut uncapped = pb::coordinator_client::CoordinatorClient::with_interceptor(
            channel.clone(),
            AddToken(Some(token(TOKEN))),
        );
        let err = uncapped
            .submit_sweep(pb::SubmitSweepRequest {
                spec_json: "x".repeat(5 << 20),
                new_version: false,
            })
            .await
            .expect_err("a 5 MiB request is refused");
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        assert!(err.message().contains("too large"), "{err:?}");
        let err = uncapped
            .submit_sweep(pb::SubmitSweepRequest {
                spec_json: "x".repeat(3 << 20),
                new_version: false,
            })
            .await
            .expect_err("junk is not a spec");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.code());
        good.list_sweeps(pb::ListSweepsRequest {}).await?;
        anyhow::Ok(())
    })?;

    // The CLI: exit code 1, the code and the message on stderr, nothing on
    // stdout, and the token nowhere.
    let mut cli_stderr = Vec::new();
    for t in [None, Some(WRONG)] {
        for args in [
            vec!["sweeps", "--coordinator", &server.url],
            vec!["submit", s(&spec), "--coordinator", &server.url],
        ] {
            let (code, out, err) = cli(&args, t)?;
            assert_eq!(code, 1, "{args:?} with {t:?}: {err}");
            assert!(out.is_empty(), "{out}");
            assert!(err.contains("Unauthenticated"), "{err}");
            assert!(err.contains(REFUSAL), "{err}");
            cli_stderr.push(err);
        }
    }
    // What they print is what the README quotes, word for word: the README
    // used to quote the bare refusal, without the call's name or the hint.
    let readme = std::fs::read_to_string(repo_root().join("README.md"))?;
    let (_, _, err) = cli(&["sweeps", "--coordinator", &server.url], Some(WRONG))?;
    let printed = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        printed.starts_with("error: ListSweeps failed") && readme.contains(printed),
        "the README does not quote what the CLI prints: {printed}"
    );

    // A worker with a wrong token or none exits 1 with the refusal, and
    // never logs that it connected: it used to say "worker connected"
    // before its first call was refused.
    for (id, t) in [
        ("no-token-worker", None),
        ("wrong-token-worker", Some(WRONG)),
    ] {
        let mut worker = start_worker(&server.url, t, id, "guarded", &dir)?;
        let exit = worker.wait_timeout(Duration::from_secs(60))?;
        let log = std::fs::read_to_string(dir.join(format!("{id}.log")))?;
        assert_eq!(exit.code(), Some(1), "{id}: {log}");
        assert!(!log.contains("worker connected"), "{id}: {log}");
        let printed = log.trim_end().lines().last().unwrap_or_default();
        assert!(
            printed.starts_with("error: LeaseJob failed") && readme.contains(printed),
            "{id}: the README does not quote what the worker prints: {printed}"
        );
    }

    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    let (code, out, err) = cli(
        &[
            "sweeps",
            "--coordinator",
            &server.url,
            "--token-file",
            s(&token_file),
            "--format",
            "json",
        ],
        None,
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out), serde_json::json!([]));

    let texts: Vec<&str> = cli_stderr.iter().map(String::as_str).collect();
    assert_no_secret_in(&[&state, &dir], &texts, &[&state.join("serve.log")]);
    Ok(())
}

#[test]
fn serving_beyond_loopback_needs_a_token_and_tls() -> anyhow::Result<()> {
    let dir = temp_dir("bind");
    let cases = [(None, "without a token"), (Some(TOKEN), "without TLS")];
    for (i, (t, why)) in cases.into_iter().enumerate() {
        let state = dir.join(format!("state-{i}"));
        let mut cmd = Command::new(bin("rotsweep"));
        // Refused before anything is bound, so no port opens beyond loopback.
        cmd.args(["serve", "--listen", "0.0.0.0:0", "--state", s(&state)])
            .env_remove("ROTSWEEP_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file(&dir, &format!("serve-{i}"))?));
        if let Some(t) = t {
            cmd.env("ROTSWEEP_TOKEN", t);
        }
        let mut proc = Proc {
            child: cmd.spawn()?,
            name: format!("serve case {i}"),
        };
        let status = proc.wait_timeout(Duration::from_secs(30))?;
        assert!(!status.success(), "case {i} served");
        let log = std::fs::read_to_string(dir.join(format!("serve-{i}.log")))?;
        assert!(log.contains("refusing to listen on 0.0.0.0"), "{log}");
        assert!(log.contains(why), "{log}");
        if t.is_some() {
            assert!(log.contains("--tls-cert") && log.contains("--insecure-no-tls"));
        }
        assert!(!state.exists(), "case {i} touched its state directory");
    }
    assert_no_secret_in(&[&dir], &[], &[&dir.join("serve-1.log")]);
    Ok(())
}

#[test]
fn tls_with_a_private_ca_serves_the_cli_and_workers() -> anyhow::Result<()> {
    let dir = temp_dir("tls");
    let certs = write_test_certs(&dir.join("certs"))?;
    let state = dir.join("state");
    let debug = [("RUST_LOG", "debug")];
    let server = Server::start_with(
        &state,
        Some(TOKEN),
        30.0,
        Extra {
            args: &["--tls-cert", s(&certs.cert), "--tls-key", s(&certs.key)],
            envs: &debug,
        },
    )?;
    let url = server.url.clone();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let plain_url = url.replacen("https://", "http://", 1);
    let ca = s(&certs.ca);
    let spec = tiny_spec(&dir, "secure", &["rnn"], &[0], 1);
    let mut stderrs = Vec::new();

    // Not trusting the private CA, plain text against the TLS port, and a
    // CA for a plain-text URL all fail before any RPC.
    for (args, needle) in [
        (
            vec!["sweeps", "--coordinator", &url],
            "invalid peer certificate",
        ),
        (
            vec!["sweeps", "--coordinator", &plain_url],
            "ListSweeps failed",
        ),
        (
            vec!["sweeps", "--coordinator", &plain_url, "--tls-ca", ca],
            "is not https://",
        ),
    ] {
        let (code, out, err) = cli(&args, Some(TOKEN))?;
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{out}");
        assert!(err.contains(needle), "{args:?}: {err}");
        stderrs.push(err);
    }

    // Trusting it: submit works; a wrong token is still refused.
    let (code, out, err) = cli(
        &[
            "submit",
            s(&spec),
            "--coordinator",
            &url,
            "--tls-ca",
            ca,
            "--format",
            "json",
        ],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "submit over TLS failed: {err}");
    assert_eq!(json(&out)["sweep"], "secure");
    let (code, _, err) = cli(
        &["sweeps", "--coordinator", &url, "--tls-ca", ca],
        Some(WRONG),
    )?;
    assert_eq!(code, 1);
    assert!(
        err.contains("Unauthenticated") && err.contains(REFUSAL),
        "{err}"
    );
    stderrs.push(err);

    let ca_pem = std::fs::read(&certs.ca)?;
    bounded(&runtime(), 60, async {
        let mut wrong = Remote::new(&url, Some(token(WRONG)), Some(&ca_pem))?
            .connect()
            .await?;
        let err = wrong
            .list_sweeps(pb::ListSweepsRequest {})
            .await
            .expect_err("wrong token over TLS");
        assert_eq!(err.code(), Code::Unauthenticated);
        let mut good = Remote::new(&url, Some(token(TOKEN)), Some(&ca_pem))?
            .connect()
            .await?;
        let sweeps = good
            .list_sweeps(pb::ListSweepsRequest {})
            .await?
            .into_inner();
        assert_eq!(sweeps.sweeps, vec!["secure".to_string()]);
        anyhow::Ok(())
    })?;

    // A worker trains the sweep over TLS.
    let mut worker = start_worker_with(
        &url,
        Some(TOKEN),
        "tls-w0",
        "secure",
        &dir,
        Extra {
            args: &["--tls-ca", ca],
            envs: &debug,
        },
    )?;
    let exit = worker.wait_timeout(Duration::from_secs(240));
    if !matches!(&exit, Ok(s) if s.success()) {
        dump_logs(&dir);
        dump_logs(&state);
        panic!("the TLS worker did not finish cleanly: {exit:?}");
    }
    let worker_log = std::fs::read_to_string(dir.join("tls-w0.log"))?;
    assert!(worker_log.contains("worker connected"), "{worker_log}");

    // The CA can also come from ROTSWEEP_TLS_CA.
    let out = Command::new(bin("rotsweep"))
        .args([
            "status",
            "secure",
            "--coordinator",
            &url,
            "--format",
            "json",
        ])
        .env("ROTSWEEP_TOKEN", TOKEN)
        .env("ROTSWEEP_TLS_CA", ca)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let status = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(status["jobs"][0]["state"], "COMPLETED", "{status}");
    assert_eq!(status["jobs"][0]["worker_id"], "tls-w0");
    stderrs.push(err);

    let serve_log = std::fs::read_to_string(state.join("serve.log"))?;
    assert!(serve_log.contains("tls=true"), "{serve_log}");
    let texts: Vec<&str> = stderrs.iter().map(String::as_str).collect();
    assert_no_secret_in(
        &[&state, &dir],
        &texts,
        &[&state.join("serve.log"), &dir.join("tls-w0.log")],
    );
    Ok(())
}

#[test]
fn a_changed_spec_under_a_used_name_is_refused_and_old_results_survive() -> anyhow::Result<()> {
    let dir = temp_dir("rename");
    let state = dir.join("state");
    let server = Server::start(&state, Some(TOKEN), 30.0)?;
    let url = server.url.clone();
    let spec = tiny_spec(&dir, "reused", &["rnn"], &[1], 1);
    let changed_dir = dir.join("changed");
    std::fs::create_dir_all(&changed_dir)?;
    let changed = tiny_spec(&changed_dir, "reused", &["rnn"], &[1], 2);
    let submit = |path: &Path, extra: &[&str]| {
        let mut args = vec!["submit", s(path), "--coordinator", &url, "--format", "json"];
        args.extend_from_slice(extra);
        cli(&args, Some(TOKEN))
    };
    let snapshot = || -> anyhow::Result<Vec<String>> {
        ["summary", "epochs", "status"]
            .iter()
            .map(|verb| {
                let (code, out, err) = cli(
                    &[verb, "reused", "--coordinator", &url, "--format", "json"],
                    Some(TOKEN),
                )?;
                assert_eq!(code, 0, "{verb}: {err}");
                Ok(out)
            })
            .collect()
    };

    // Run the sweep to completion.
    let (code, out, err) = submit(&spec, &[])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["created"], true);
    let mut worker = start_worker(&url, Some(TOKEN), "w0", "reused", &dir)?;
    let exit = worker.wait_timeout(Duration::from_secs(240));
    if !matches!(&exit, Ok(s) if s.success()) {
        dump_logs(&dir);
        panic!("worker did not finish cleanly: {exit:?}");
    }
    let before = snapshot()?;
    assert_eq!(json(&before[0])["complete"], true, "{}", before[0]);
    assert_eq!(json(&before[1]).as_array().map(Vec::len), Some(1));

    // A changed spec under the same name is refused, with the way out.
    let (code, out, err) = submit(&changed, &[])?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains("sweep `reused` already exists with a different spec"),
        "{err}"
    );
    assert!(err.contains("--new-version"), "{err}");
    assert_eq!(
        snapshot()?,
        before,
        "a refused submit changed stored results"
    );

    // The identical spec is a no-op.
    let (code, out, err) = submit(&spec, &[])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["created"], false);
    assert_eq!(json(&out)["sweep"], "reused");

    // --new-version stores it beside the old one.
    let (code, out, err) = submit(&changed, &["--new-version"])?;
    assert_eq!(code, 0, "{err}");
    let v2 = json(&out);
    assert_eq!(
        (
            v2["sweep"].as_str(),
            v2["n_jobs"].as_u64(),
            v2["created"].as_bool()
        ),
        (Some("reused.v2"), Some(1), Some(true))
    );
    let (code, out, _) = cli(
        &["sweeps", "--coordinator", &url, "--format", "json"],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0);
    assert_eq!(json(&out), serde_json::json!(["reused", "reused.v2"]));
    let v2_status = status_json(&url, "reused.v2")?;
    assert_eq!(v2_status["jobs"][0]["state"], "PENDING");
    assert_eq!(snapshot()?, before, "a new version changed the old results");
    Ok(())
}

/// A spec of 8 models x 4 rotations = 32 jobs.
fn burst_spec(dir: &Path, name: &str) -> std::path::PathBuf {
    let data = repo_root().join("examples/data/pfam-real");
    let mut text = format!(
        "name = \"{name}\"\n[data]\ndir = \"{}\"\nrotations = [0, 1, 2, 3]\nmax_len = 64\n\
         [train]\nepochs = 1\n",
        data.display()
    );
    for (i, kind) in ["rnn", "gru", "mha"].iter().cycle().take(8).enumerate() {
        text.push_str(&format!("[models.m{i}]\nkind = \"{kind}\"\n"));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("writing the spec");
    path
}

#[test]
fn thirty_two_workers_leasing_at_once_get_thirty_two_distinct_jobs() -> anyhow::Result<()> {
    const N: usize = 32;
    let dir = temp_dir("burst");
    // Leases far longer than the test: nothing expires and re-queues.
    let server = Server::start(&dir.join("state"), Some(TOKEN), 600.0)?;
    let rt = runtime();

    for round in 0..3 {
        let sweep = format!("burst{round}");
        let (code, out, err) = cli(
            &[
                "submit",
                s(&burst_spec(&dir, &sweep)),
                "--coordinator",
                &server.url,
                "--format",
                "json",
            ],
            Some(TOKEN),
        )?;
        assert_eq!(code, 0, "{err}");
        assert_eq!(json(&out)["n_jobs"], N);

        let leases = bounded(&rt, 120, async {
            // Connect everyone first, then release all requests at once.
            let barrier = Arc::new(tokio::sync::Barrier::new(N));
            let mut tasks = Vec::new();
            for i in 0..N {
                let mut client = pb::connect(&server.url, Some(token(TOKEN))).await?;
                let barrier = barrier.clone();
                let sweep = sweep.clone();
                tasks.push(tokio::spawn(async move {
                    let worker = format!("r{round}-w{i:02}");
                    barrier.wait().await;
                    let answer = lease(&mut client, &worker, &sweep).await;
                    (worker, answer)
                }));
            }
            let mut leases = Vec::new();
            for t in tasks {
                leases.push(t.await?);
            }
            // The queue is now empty: one more worker waits.
            let mut late = pb::connect(&server.url, Some(token(TOKEN))).await?;
            let answer = lease(&mut late, "late", &sweep).await;
            assert_eq!(answer.outcome, Outcome::Wait as i32, "{answer:?}");
            anyhow::Ok(leases)
        })?;

        let mut by_job = std::collections::BTreeMap::new();
        for (worker, answer) in &leases {
            assert_eq!(
                answer.outcome,
                Outcome::Leased as i32,
                "{worker}: {answer:?}"
            );
            let job = answer.job.as_ref().expect("a leased job");
            assert_eq!(job.attempt, 1);
            assert!(
                by_job.insert(job.job_id, worker.clone()).is_none(),
                "job {} twice",
                job.job_id
            );
        }
        assert_eq!(by_job.len(), N, "round {round}");

        // The stored state agrees: 32 RUNNING jobs, 32 distinct workers,
        // each job held by the worker that got it.
        let status = status_json(&server.url, &sweep)?;
        let jobs = status["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), N);
        let mut workers = BTreeSet::new();
        for j in jobs {
            assert_eq!(j["state"], "RUNNING", "{j}");
            assert_eq!(j["attempt"], 1, "{j}");
            let id = j["job_id"].as_i64().expect("job id");
            let worker = j["worker_id"].as_str().expect("worker id");
            assert_eq!(by_job.get(&id).map(String::as_str), Some(worker), "{j}");
            workers.insert(worker.to_string());
        }
        assert_eq!(workers.len(), N, "round {round}");
    }
    Ok(())
}

#[test]
fn the_concurrency_cap_holds_across_a_coordinator_restart() -> anyhow::Result<()> {
    let dir = temp_dir("cap");
    let state = dir.join("state");
    let spec = tiny_spec(&dir, "capped", &["gru", "rnn"], &[0, 1], 1);
    let text =
        std::fs::read_to_string(&spec)?.replace("[train]\n", "[train]\nmax_concurrent_jobs = 2\n");
    std::fs::write(&spec, text)?;

    let mut server = Server::start(&state, Some(TOKEN), 600.0)?;
    let (code, _, err) = cli(
        &["submit", s(&spec), "--coordinator", &server.url],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "{err}");
    let rt = runtime();
    let first = bounded(&rt, 60, async {
        let mut c = pb::connect(&server.url, Some(token(TOKEN))).await?;
        let a = lease(&mut c, "w0", "capped").await;
        let b = lease(&mut c, "w1", "capped").await;
        assert_eq!(
            (a.outcome, b.outcome),
            (Outcome::Leased as i32, Outcome::Leased as i32)
        );
        let c3 = lease(&mut c, "w2", "capped").await;
        assert_eq!(c3.outcome, Outcome::Wait as i32, "{c3:?}");
        anyhow::Ok(a.job.expect("a job"))
    })?;

    // SIGKILL the coordinator and start it again on the same state.
    server.proc.signal(libc::SIGKILL);
    server.proc.wait_timeout(Duration::from_secs(30))?;
    let server = Server::start(&state, Some(TOKEN), 600.0)?;

    bounded(&rt, 60, async {
        let mut c = pb::connect(&server.url, Some(token(TOKEN))).await?;
        let again = lease(&mut c, "w2", "capped").await;
        assert_eq!(again.outcome, Outcome::Wait as i32, "{again:?}");

        // Freeing one slot lets exactly one more job run.
        c.fail_job(pb::FailJobRequest {
            job: Some(pb::JobRef {
                job_id: first.job_id,
                attempt: first.attempt,
                lease_token: first.lease_token.clone(),
            }),
            reason: "released by the test".into(),
            release: true,
            ..Default::default()
        })
        .await?;
        let third = lease(&mut c, "w2", "capped").await;
        assert_eq!(third.outcome, Outcome::Leased as i32, "{third:?}");
        let fourth = lease(&mut c, "w3", "capped").await;
        assert_eq!(fourth.outcome, Outcome::Wait as i32, "{fourth:?}");
        anyhow::Ok(())
    })?;

    let status = status_json(&server.url, "capped")?;
    let running = status["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["state"] == "RUNNING")
        .count();
    assert_eq!(running, 2, "{status}");
    Ok(())
}

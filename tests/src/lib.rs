//! Helpers for end-to-end tests: locate the built binaries, start a real
//! coordinator and real workers as child processes (killed on drop), write
//! tiny specs over the shipped Pfam data, and wait with bounds instead of
//! sleeping.

#![allow(clippy::print_stderr)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a workspace binary built next to the running test.
pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run `cargo build --workspace` before the tests",
        path.display()
    );
    path
}

/// A fresh, empty temporary folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rotsweep-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    dir
}

/// Copies the shipped `pfam-real` fold files into `DIR/data`, for a test
/// that spoils one of them; returns that folder.
pub fn copy_real_folds(dir: &Path) -> anyhow::Result<PathBuf> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    for k in 0..5 {
        let name = format!("pfam_fold_{k}.csv");
        std::fs::copy(
            repo_root().join("examples/data/pfam-real").join(&name),
            data.join(&name),
        )?;
    }
    Ok(data)
}

/// Writes a tiny spec over the shipped `pfam-real` data: small models,
/// short sequences and few steps, so a job trains in about a second.
pub fn tiny_spec(
    dir: &Path,
    name: &str,
    models: &[&str],
    rotations: &[usize],
    epochs: usize,
) -> PathBuf {
    let data = repo_root().join("examples/data/pfam-real");
    let rotations: Vec<String> = rotations.iter().map(|r| r.to_string()).collect();
    let mut text = format!(
        "name = \"{name}\"\n\
         [data]\n\
         dir = \"{}\"\n\
         rotations = [{}]\n\
         max_len = 64\n\
         [train]\n\
         epochs = {epochs}\n\
         batch_size = 16\n\
         steps_per_epoch = 3\n\
         patience = 10\n\
         seed = 7\n",
        data.display(),
        rotations.join(", ")
    );
    for kind in models {
        text.push_str(&format!(
            "[models.{kind}]\nkind = \"{kind}\"\nembedding = 8\nconv_filters = 16\n\
             units = 16\nfinal_units = 16\nheads = 2\nkey_size = 8\ndense = [16]\n"
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("writing the spec");
    path
}

/// A child process killed on drop.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// A name for messages.
    pub name: String,
}

impl Proc {
    /// Waits for exit with a bound; kills and fails past it.
    pub fn wait_timeout(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                bail!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `rotsweep serve` on a loopback port chosen by the OS.
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// State directory.
    pub state: PathBuf,
}

impl Server {
    /// Starts `rotsweep serve --listen 127.0.0.1:0` with `token` in its
    /// environment and waits (bounded) for its `listening on` line.
    pub fn start(state: &Path, token: Option<&str>, lease_ttl_s: f64) -> anyhow::Result<Self> {
        Self::start_with(state, token, lease_ttl_s, Extra::default())
    }

    /// [`Server::start`] with more `serve` flags (e.g. `--tls-cert`) and
    /// environment; the URL is `https://` when the server says so.
    pub fn start_with(
        state: &Path,
        token: Option<&str>,
        lease_ttl_s: f64,
        extra: Extra<'_>,
    ) -> anyhow::Result<Self> {
        Self::start_on(state, token, lease_ttl_s, "127.0.0.1:0", extra)
    }

    /// [`Server::start_with`] on a given address, e.g. the port of a
    /// coordinator that was killed, to restart it where workers look for it.
    pub fn start_on(
        state: &Path,
        token: Option<&str>,
        lease_ttl_s: f64,
        listen: &str,
        extra: Extra<'_>,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin("rotsweep"));
        cmd.args(["serve", "--listen", listen, "--lease-ttl"])
            .arg(lease_ttl_s.to_string())
            .arg("--state")
            .arg(state)
            .args(extra.args)
            .env_remove("ROTSWEEP_TOKEN")
            .env_remove("ROTSWEEP_TLS_CA")
            .envs(extra.envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file(state, "serve")?));
        if let Some(t) = token {
            cmd.env("ROTSWEEP_TOKEN", t);
        }
        let mut child = cmd.spawn().context("starting rotsweep serve")?;
        let stdout = child.stdout.take().context("serve stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let proc = Proc {
            child,
            name: "rotsweep serve".into(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("rotsweep serve printed no address within 30 s")?;
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line from serve: {line:?}"))?
            .to_string();
        Ok(Self {
            proc,
            url,
            state: state.to_path_buf(),
        })
    }
}

/// More flags and environment variables for a child process.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extra<'a> {
    /// Flags appended to the command line.
    pub args: &'a [&'a str],
    /// Variables set in the child's environment (after the helpers remove
    /// `ROTSWEEP_TOKEN` and `ROTSWEEP_TLS_CA`).
    pub envs: &'a [(&'a str, &'a str)],
}

/// A loopback port that was free a moment ago (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A log file under `dir` for a child's stderr.
pub fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    let path = dir.join(format!("{name}.log"));
    std::fs::create_dir_all(dir)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Starts `rotsweep-worker` against `url` for `sweep`.
pub fn start_worker(
    url: &str,
    token: Option<&str>,
    id: &str,
    sweep: &str,
    log_dir: &Path,
) -> anyhow::Result<Proc> {
    start_worker_with(url, token, id, sweep, log_dir, Extra::default())
}

/// [`start_worker`] with more worker flags (e.g. `--tls-ca`) and
/// environment.
pub fn start_worker_with(
    url: &str,
    token: Option<&str>,
    id: &str,
    sweep: &str,
    log_dir: &Path,
    extra: Extra<'_>,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(bin("rotsweep-worker"));
    cmd.args(["--coordinator", url, "--worker-id", id, "--sweep", sweep])
        .args(extra.args)
        .env_remove("ROTSWEEP_TOKEN")
        .env_remove("ROTSWEEP_TLS_CA")
        .envs(extra.envs.iter().copied())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file(log_dir, id)?));
    if let Some(t) = token {
        cmd.env("ROTSWEEP_TOKEN", t);
    }
    Ok(Proc {
        child: cmd.spawn().context("starting rotsweep-worker")?,
        name: format!("worker {id}"),
    })
}

/// Runs a `rotsweep` CLI command to completion, returning (exit code,
/// stdout, stderr).
pub fn cli(args: &[&str], token: Option<&str>) -> anyhow::Result<(i32, String, String)> {
    let mut cmd = Command::new(bin("rotsweep"));
    cmd.args(args)
        .env_remove("ROTSWEEP_TOKEN")
        .env_remove("ROTSWEEP_TLS_CA");
    if let Some(t) = token {
        cmd.env("ROTSWEEP_TOKEN", t);
    }
    let out = cmd.output().context("running rotsweep")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Prints the logs under `dir` to stderr (shown when a test fails).
pub fn dump_logs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("----- {} (last 40 lines)", p.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// PEM files of a private test CA and a server certificate it signed.
pub struct TestCerts {
    /// The CA certificate clients trust (`--tls-ca`).
    pub ca: PathBuf,
    /// The server's certificate (`--tls-cert`), valid for `localhost` and
    /// `127.0.0.1`.
    pub cert: PathBuf,
    /// The server's private key (`--tls-key`).
    pub key: PathBuf,
}

/// Generates a fresh CA and a server certificate signed by it under `dir`
/// (nothing is downloaded; keys live only for this test).
pub fn write_test_certs(dir: &Path) -> anyhow::Result<TestCerts> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rotsweep test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().context("generating the server key")?;
    let server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    std::fs::create_dir_all(dir)?;
    let certs = TestCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&certs.ca, ca_cert.pem())?;
    std::fs::write(&certs.cert, server_cert.pem())?;
    std::fs::write(&certs.key, server_key.serialize_pem())?;
    Ok(certs)
}

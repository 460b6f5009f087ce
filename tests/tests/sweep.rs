//! The vertical slice end to end: a real `rotsweep serve`, two real
//! `rotsweep-worker` processes and the gRPC client, on loopback, training a
//! tiny spec on real Pfam sequences; then `rotsweep run` doing the same in
//! one command, and bad input failing with a clear message.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rotsweep_proto as pb;
use rotsweep_tests::*;

const TOKEN: &str = "e2e-test-token-0123456789";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[test]
fn two_workers_train_a_sweep_and_every_row_is_stored_once() -> anyhow::Result<()> {
    let dir = temp_dir("slice");
    let spec = tiny_spec(&dir, "slice", &["gru"], &[0, 3], 2);
    let server = Server::start(&dir.join("state"), Some(TOKEN), 10.0)?;

    let (code, out, err) = cli(
        &[
            "submit",
            spec.to_str().unwrap(),
            "--coordinator",
            &server.url,
            "--format",
            "json",
        ],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "submit failed: {err}");
    let submitted: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(submitted["sweep"], "slice");
    assert_eq!(submitted["n_jobs"], 2);

    let mut workers = [
        start_worker(&server.url, Some(TOKEN), "w0", "slice", &dir)?,
        start_worker(&server.url, Some(TOKEN), "w1", "slice", &dir)?,
    ];
    for w in workers.iter_mut() {
        let status = w.wait_timeout(Duration::from_secs(240));
        if !matches!(&status, Ok(s) if s.success()) {
            dump_logs(&dir);
            panic!("{} did not finish cleanly: {status:?}", w.name);
        }
    }

    let rt = runtime();
    let (status, epochs, summary) = rt.block_on(async {
        let mut client = pb::connect(
            &server.url,
            Some(pb::auth::Token::new(TOKEN).expect("valid token")),
        )
        .await?;
        let status = client
            .sweep_status(pb::SweepStatusRequest {
                sweep: "slice".into(),
            })
            .await?
            .into_inner();
        let epochs = client
            .list_epochs(pb::ListEpochsRequest {
                sweep: "slice".into(),
            })
            .await?
            .into_inner();
        let summary = client
            .sweep_summary(pb::SweepSummaryRequest {
                sweep: "slice".into(),
            })
            .await?
            .into_inner();
        anyhow::Ok((status, epochs, summary))
    })?;

    // Both jobs completed on their first attempt.
    assert_eq!(status.jobs.len(), 2);
    for j in &status.jobs {
        assert_eq!(j.state, "COMPLETED", "job {j:?}");
        assert_eq!(j.attempt, 1);
        assert_eq!(j.epoch, 2);
        assert!((0.0..=1.0).contains(&j.test_accuracy));
    }

    // Exactly epochs 1 and 2 of each job, once each, with sane metrics.
    let mut per_job: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for row in &epochs.rows {
        let m = row.metrics.expect("metrics present");
        per_job.entry(row.job_id).or_default().push(m.epoch);
        assert!(m.train_loss.is_finite() && m.train_loss > 0.0);
        assert!((0.0..=1.0).contains(&m.val_accuracy));
        assert!(m.seconds > 0.0 && m.examples_per_second > 0.0);
    }
    assert_eq!(per_job.len(), 2);
    assert!(per_job.values().all(|e| e == &vec![1, 2]), "{per_job:?}");

    // The summary covers both rotations; the summed confusion matrix counts
    // every test sequence of folds 4 (rotation 0) and 2 (rotation 3) once.
    assert!(summary.complete);
    assert_eq!(summary.labels.len(), 15);
    let gru = &summary.models[0];
    assert_eq!((gru.name.as_str(), gru.n_used, gru.n_total), ("gru", 2, 2));
    let n_test: u64 = gru.confusion.iter().sum();
    assert_eq!(n_test, 273 + 274, "fold 4 has 273 rows, fold 2 has 274");
    let rotations: Vec<u32> = gru.rotations.iter().map(|r| r.rotation).collect();
    assert_eq!(rotations, vec![0, 3]);
    let mean = gru.rotations.iter().map(|r| r.test_accuracy).sum::<f64>() / 2.0;
    assert!((gru.mean - mean).abs() < 1e-12);

    // Watching a finished sweep ends at once instead of waiting forever,
    // with each job's final state.
    let out = watch_to_end(&server.url, "slice", "json", &dir)?;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3, "{out}");
    for (line, job) in lines.iter().zip(&status.jobs) {
        assert_eq!(line["event"], "state", "{out}");
        assert_eq!(line["state"], "COMPLETED", "{out}");
        assert_eq!(line["job_id"], job.job_id, "{out}");
        let detail = format!("test accuracy {:.4}", job.test_accuracy);
        assert_eq!(line["detail"], detail.as_str(), "{out}");
    }
    assert_eq!(lines[2]["event"], "finished", "{out}");
    assert_eq!(lines[2]["states"], serde_json::json!({"COMPLETED": 2}));

    // The CLI's JSON summary has the documented shape.
    let (code, out, err) = cli(
        &[
            "summary",
            "slice",
            "--coordinator",
            &server.url,
            "--format",
            "json",
        ],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "summary failed: {err}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["sweep"], "slice");
    assert_eq!(json["labels"].as_array().map(Vec::len), Some(15));
    let model = &json["models"][0];
    assert_eq!(model["name"], "gru");
    assert_eq!(model["kind"], "gru");
    assert_eq!(model["rotations"].as_array().map(Vec::len), Some(2));
    assert_eq!(model["rotations"][0]["epochs"], 2);
    assert!(model["rotations"][0]["seconds_per_epoch"].as_f64().unwrap() > 0.0);
    assert!(model["std"].as_f64().is_some());
    assert_eq!(model["confusion"].as_array().map(Vec::len), Some(15));
    Ok(())
}

/// Runs `rotsweep watch SWEEP --format FORMAT` to its end (bounded: a
/// watch that never ends fails the test) and returns its stdout.
fn watch_to_end(url: &str, sweep: &str, format: &str, dir: &Path) -> anyhow::Result<String> {
    let out_path = dir.join(format!("watch-{sweep}-{format}.out"));
    let mut watch = Proc {
        child: std::process::Command::new(bin("rotsweep"))
            .args(["watch", sweep, "--coordinator", url, "--format", format])
            .env("ROTSWEEP_TOKEN", TOKEN)
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(log_file(dir, &format!("watch-{sweep}-{format}"))?)
            .spawn()?,
        name: "rotsweep watch".into(),
    };
    let status = watch.wait_timeout(Duration::from_secs(30))?;
    assert!(status.success(), "watch {sweep} exited with {status}");
    Ok(std::fs::read_to_string(out_path)?)
}

/// `watch` on a sweep that had already finished used to print nothing on
/// stdout (only a log line), so `--format json` readers saw an empty
/// stream. It now prints each job's final state, as the `state` event a
/// live watch ends with, then one `finished` object; the table says the
/// sweep is finished.
#[test]
fn watching_a_finished_sweep_prints_its_final_state() -> anyhow::Result<()> {
    let dir = temp_dir("watch-finished");
    let server = Server::start(&dir.join("state"), Some(TOKEN), 10.0)?;
    let spec = tiny_spec(&dir, "over", &["gru", "rnn"], &[0], 1);
    let spec = spec.to_str().unwrap();
    for args in [
        vec!["submit", spec, "--coordinator", &server.url],
        vec!["cancel", "over", "--coordinator", &server.url],
    ] {
        let (code, _, err) = cli(&args, Some(TOKEN))?;
        assert_eq!(code, 0, "{args:?}: {err}");
    }

    let out = watch_to_end(&server.url, "over", "json", &dir)?;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3, "{out}");
    let mut models = Vec::new();
    for line in &lines[..2] {
        assert_eq!(
            (line["event"].as_str(), line["state"].as_str()),
            (Some("state"), Some("CANCELLED")),
            "{out}"
        );
        assert!(line["job_id"].as_i64().is_some_and(|id| id > 0), "{out}");
        assert_eq!(line["rotation"], 0, "{out}");
        models.push(line["model"].as_str().unwrap_or_default());
    }
    assert_eq!(models, ["gru", "rnn"]);
    assert_eq!(
        lines[2],
        serde_json::json!({"sweep": "over", "event": "finished", "n_jobs": 2,
                           "states": {"CANCELLED": 2}})
    );

    let out = watch_to_end(&server.url, "over", "table", &dir)?;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("gru/rot0 (job ") && lines[0].contains("CANCELLED"));
    assert!(lines[1].starts_with("rnn/rot0 (job ") && lines[1].contains("CANCELLED"));
    // A state without a detail ends the line (no trailing space).
    assert!(lines.iter().all(|l| *l == l.trim_end()), "{out:?}");
    assert_eq!(lines[2], "sweep over finished: 2 jobs, 2 CANCELLED");
    Ok(())
}

#[test]
fn run_trains_a_sweep_with_local_workers_and_writes_summary_json() -> anyhow::Result<()> {
    let dir = temp_dir("run");
    let spec = tiny_spec(&dir, "local", &["rnn", "mha"], &[1], 1);
    let state = dir.join("state");
    let (code, out, err) = cli(
        &[
            "run",
            spec.to_str().unwrap(),
            "--local-workers",
            "2",
            "--threads",
            "1",
            "--state",
            state.to_str().unwrap(),
        ],
        None,
    )?;
    assert_eq!(code, 0, "run failed:\n{err}");
    assert!(out.contains("mha") && out.contains("rnn"), "table: {out}");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("summary.json"))?)?;
    assert_eq!(summary["sweep"], "local");
    assert_eq!(summary["complete"], true);
    let names: Vec<&str> = summary["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["mha", "rnn"]);
    for m in summary["models"].as_array().unwrap() {
        assert_eq!(m["n_used"], 1);
        let acc = m["rotations"][0]["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }

    // Running the same command again resumes the stored sweep: nothing is
    // retrained and the summary is unchanged.
    let (code, out2, err) = cli(
        &[
            "run",
            spec.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ],
        None,
    )?;
    assert_eq!(code, 0, "second run failed:\n{err}");
    assert_eq!(out, out2);

    // A changed spec under the same name is refused and the results survive.
    let changed = std::fs::read_to_string(&spec)?.replace("epochs = 1", "epochs = 2");
    std::fs::write(&spec, changed)?;
    let (code, _, err) = cli(
        &[
            "run",
            spec.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
        ],
        None,
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("different spec"), "{err}");
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("summary.json"))?)?;
    assert_eq!(after, summary);
    Ok(())
}

#[test]
fn bad_input_fails_with_the_file_and_line_or_key() -> anyhow::Result<()> {
    let dir = temp_dir("bad");

    // A malformed line in one fold.
    let data = copy_real_folds(&dir)?;
    let mut fold2 = std::fs::read_to_string(data.join("pfam_fold_2.csv"))?;
    fold2.push_str("MKVLAAGIVGLLLAQ,Globin,extra\n");
    std::fs::write(data.join("pfam_fold_2.csv"), &fold2)?;
    let n_lines = fold2.lines().count();
    let spec = dir.join("bad.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"bad\"\n[data]\ndir = \"{}\"\n[models.gru]\nkind = \"gru\"\n",
            data.display()
        ),
    )?;
    let (code, _, err) = cli(&["plan", spec.to_str().unwrap()], None)?;
    assert_ne!(code, 0);
    assert!(err.contains(&format!("pfam_fold_2.csv:{n_lines}")), "{err}");

    // A label found only in the test fold is caught by `plan`, not first by
    // a worker.
    std::fs::write(
        data.join("pfam_fold_2.csv"),
        fold2.replace("Globin,extra\n", "Globin\n"),
    )?;
    let mut fold4 = std::fs::read_to_string(data.join("pfam_fold_4.csv"))?;
    fold4.push_str("MKVLAAGIVGLLLAQ,OnlyInTest\n");
    std::fs::write(data.join("pfam_fold_4.csv"), &fold4)?;
    let (code, _, err) = cli(&["plan", spec.to_str().unwrap()], None)?;
    assert_ne!(code, 0);
    assert!(
        err.contains("`OnlyInTest`") && err.contains("pfam_fold_4.csv:"),
        "{err}"
    );
    std::fs::copy(
        repo_root().join("examples/data/pfam-real/pfam_fold_4.csv"),
        data.join("pfam_fold_4.csv"),
    )?;

    // An unknown key in the spec.
    std::fs::write(
        &spec,
        "name = \"bad\"\nbatchsize = 3\n[data]\ndir = \"x\"\n",
    )?;
    let (code, _, err) = cli(&["run", spec.to_str().unwrap()], None)?;
    assert_ne!(code, 0);
    assert!(err.contains("batchsize"), "{err}");

    // A missing fold file (with the malformed line mended first).
    std::fs::copy(
        repo_root().join("examples/data/pfam-real/pfam_fold_2.csv"),
        data.join("pfam_fold_2.csv"),
    )?;
    std::fs::remove_file(data.join("pfam_fold_4.csv"))?;
    std::fs::write(
        &spec,
        format!(
            "name = \"bad\"\n[data]\ndir = \"{}\"\n[models.gru]\nkind = \"gru\"\n",
            data.display()
        ),
    )?;
    let (code, _, err) = cli(
        &[
            "run",
            spec.to_str().unwrap(),
            "--state",
            dir.join("s").to_str().unwrap(),
        ],
        None,
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("pfam_fold_4.csv"), "{err}");
    Ok(())
}

#[test]
fn plan_lists_every_model_and_rotation() -> anyhow::Result<()> {
    let (code, out, err) = cli(
        &[
            "plan",
            repo_root().join("examples/hw6.toml").to_str().unwrap(),
            "--format",
            "json",
        ],
        None,
    )?;
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out)?;
    let jobs = plan["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 15);
    let rot2 = jobs
        .iter()
        .find(|j| j["model"] == "gru" && j["rotation"] == 2)
        .unwrap();
    assert_eq!(rot2["train_folds"], serde_json::json!([2, 3, 4]));
    assert_eq!(
        (rot2["val_fold"].as_u64(), rot2["test_fold"].as_u64()),
        (Some(0), Some(1))
    );
    Ok(())
}

/// A worker whose every job failed exits 1, and says so in its last log
/// line; one with a completed job among failures, or with nothing to do,
/// exits 0. It used to exit 0 whatever happened to its jobs, so a Slurm
/// task or Kubernetes pod that only failed looked like a success.
#[test]
fn a_worker_that_completed_nothing_and_failed_jobs_exits_1() -> anyhow::Result<()> {
    let dir = temp_dir("all-failed");
    let server = Server::start(&dir.join("state"), Some(TOKEN), 10.0)?;

    // A label only the test fold of rotation 0 has: the worker finds it
    // when it loads the rotation, before any training, and the job fails
    // at its first attempt. Rotation 2 tests on fold 1 and trains.
    let data = copy_real_folds(&dir)?;
    let mut fold4 = std::fs::read_to_string(data.join("pfam_fold_4.csv"))?;
    fold4.push_str("MKVLAAGIVGLLLAQ,OnlyInTest\n");
    std::fs::write(data.join("pfam_fold_4.csv"), fold4)?;
    let shipped = repo_root().join("examples/data/pfam-real");
    let submit = |name: &str, rotations: &[usize]| -> anyhow::Result<()> {
        let spec = tiny_spec(&dir, name, &["rnn"], rotations, 1);
        let text = std::fs::read_to_string(&spec)?
            .replace(&shipped.display().to_string(), &data.display().to_string());
        std::fs::write(&spec, text)?;
        let spec = spec.to_str().unwrap();
        let args = [
            "submit",
            spec,
            "--coordinator",
            &server.url,
            "--no-data-check",
        ];
        let (code, _, err) = cli(&args, Some(TOKEN))?;
        assert_eq!(code, 0, "submit failed: {err}");
        Ok(())
    };
    let last_line = |id: &str| -> anyhow::Result<String> {
        let log = std::fs::read_to_string(dir.join(format!("{id}.log")))?;
        Ok(log
            .trim_end()
            .lines()
            .last()
            .unwrap_or_default()
            .to_string())
    };
    let run_worker = |id: &str, sweep: &str| -> anyhow::Result<i32> {
        let mut worker = start_worker(&server.url, Some(TOKEN), id, sweep, &dir)?;
        let status = worker.wait_timeout(Duration::from_secs(240))?;
        status
            .code()
            .ok_or_else(|| anyhow::anyhow!("{id} died by a signal: {status}"))
    };

    submit("doomed", &[0])?;
    assert_eq!(run_worker("w-failed", "doomed")?, 1);
    let line = last_line("w-failed")?;
    assert!(
        line.contains("1 job: 0 completed, 1 failed, 0 interrupted"),
        "{line}"
    );

    // Nothing left to do: exit 0.
    assert_eq!(run_worker("w-idle", "doomed")?, 0);
    let line = last_line("w-idle")?;
    assert!(
        line.contains("0 jobs: 0 completed, 0 failed, 0 interrupted"),
        "{line}"
    );

    // One job completed and one failed: exit 0.
    submit("mixed", &[0, 2])?;
    let code = run_worker("w-mixed", "mixed")?;
    let line = last_line("w-mixed")?;
    if code != 0 {
        dump_logs(&dir);
    }
    assert_eq!(code, 0, "{line}");
    assert!(
        line.contains("2 jobs: 1 completed, 1 failed, 0 interrupted"),
        "{line}"
    );
    Ok(())
}

/// A plan cannot know the job ids the coordinator assigns on submission
/// (they start at 1 and keep counting across sweeps), so it shows none:
/// it used to number its rows from 0 under a `job` header, which `status`
/// then contradicted.
#[test]
fn plan_names_grid_cells_by_model_and_rotation_not_by_a_job_id() -> anyhow::Result<()> {
    let spec = repo_root().join("examples/hw6.toml");
    let spec = spec.to_str().unwrap();

    let (code, out, err) = cli(&["plan", spec, "--format", "json"], None)?;
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out)?;
    for cell in plan["jobs"].as_array().unwrap() {
        let keys: Vec<&String> = cell.as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| !k.starts_with("job")),
            "a plan row has a job id: {cell}"
        );
    }

    let (code, out, err) = cli(&["plan", spec], None)?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("sweep hw6: 15 jobs"), "{out}");
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(header[..3], ["model", "kind", "rot"], "{out}");
    assert_eq!(lines.len(), 2 + 15, "{out}");
    for row in &lines[2..] {
        let model = row.split_whitespace().next().unwrap_or_default();
        assert!(["gru", "mha", "rnn"].contains(&model), "{row}");
    }
    Ok(())
}

/// Output piped into a reader that has gone (`rotsweep plan | head -0`)
/// ends the command quietly with status 0: no panic, no death by SIGPIPE
/// (the processes ignore SIGPIPE, so a socket reset cannot kill them).
#[test]
fn output_into_a_closed_pipe_ends_quietly() -> anyhow::Result<()> {
    let spec = repo_root().join("examples/hw6.toml");
    let commands: [(&str, Vec<&str>); 2] = [
        ("rotsweep", vec!["plan", spec.to_str().unwrap()]),
        (
            "rotsweep-worker",
            vec![
                "summary",
                "--spec",
                spec.to_str().unwrap(),
                "--model",
                "gru",
            ],
        ),
    ];
    for (program, args) in commands {
        // The read end is closed before the command starts, so its first
        // write fails, deterministically.
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let out = std::process::Command::new(bin(program))
            .args(&args)
            .stdout(writer)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{program} {args:?}: {:?} {stderr}",
            out.status
        );
        assert!(!stderr.contains("panicked"), "{program}: {stderr}");
    }
    Ok(())
}

/// `rotsweep-worker bench --format json`: one object with the median and
/// range of each timing, as `bench/run` reads it.
#[test]
fn worker_bench_prints_json_with_the_spread() -> anyhow::Result<()> {
    let out = std::process::Command::new(bin("rotsweep-worker"))
        .args(["bench", "--kind", "gru", "--len", "16", "--batch", "4"])
        .args(["--steps", "3", "--warmup", "0", "--format", "json"])
        .env("RAYON_NUM_THREADS", "1")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let row: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (row["kind"].as_str(), row["steps"].as_u64()),
        (Some("gru"), Some(3))
    );
    for t in ["train_ms", "infer_ms"] {
        let (lo, mid, hi) = (
            row[format!("{t}_min")].as_f64().unwrap(),
            row[t].as_f64().unwrap(),
            row[format!("{t}_max")].as_f64().unwrap(),
        );
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{row}");
    }
    Ok(())
}

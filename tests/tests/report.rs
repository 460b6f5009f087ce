//! `rotsweep report` on a real small sweep: a real coordinator and real
//! workers train a tiny spec; the report is written first while the sweep
//! is partial (over gRPC), then complete (from the state folder, read-only,
//! while the coordinator still runs). Every figure must be in the page and
//! render to pixels, the exports must hold exactly the stored rows, and the
//! TensorBoard files must read back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rotsweep_coordinator::report::tfevents;
use rotsweep_proto as pb;
use rotsweep_tests::*;

const TOKEN: &str = "report-test-token-0123456789";
const EPOCHS: usize = 2;

/// Every inline `<svg>...</svg>` of an HTML page.
fn inline_svgs(html: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find("<svg") {
        let end = rest[start..]
            .find("</svg>")
            .map(|e| start + e + "</svg>".len())
            .expect("every <svg> is closed");
        out.push(&rest[start..end]);
        rest = &rest[end..];
    }
    out
}

/// Renders an SVG and counts (non-white pixels, strongly coloured pixels).
fn render(svg: &str) -> anyhow::Result<(usize, usize, usize)> {
    use resvg::{tiny_skia, usvg};
    let tree = usvg::Tree::from_str(svg, &usvg::Options::default())?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| anyhow::anyhow!("empty SVG size {size:?}"))?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let (mut ink, mut colour) = (0, 0);
    for p in pixmap.pixels() {
        let (r, g, b, a) = (p.red(), p.green(), p.blue(), p.alpha());
        if a > 0 && (r < 245 || g < 245 || b < 245) {
            ink += 1;
        }
        if a > 0 && r.max(g).max(b) - r.min(g).min(b) > 60 {
            colour += 1;
        }
    }
    Ok((pixmap.pixels().len(), ink, colour))
}

fn csv_rows(path: &Path) -> anyhow::Result<usize> {
    Ok(csv::Reader::from_path(path)?.records().count())
}

fn report_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let (code, out, err) = cli(args, Some(TOKEN))?;
    assert_eq!(code, 0, "report failed:\n{err}");
    Ok(serde_json::from_str(&out)?)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

#[test]
fn report_of_a_partial_then_complete_sweep_has_every_figure_and_export() -> anyhow::Result<()> {
    let dir = temp_dir("report");
    let spec = tiny_spec(&dir, "rep", &["gru", "mha"], &[0, 1, 2], EPOCHS);
    let state = dir.join("state");
    let server = Server::start(&state, Some(TOKEN), 10.0)?;
    let (code, _, err) = cli(
        &[
            "submit",
            spec.to_str().unwrap(),
            "--coordinator",
            &server.url,
        ],
        Some(TOKEN),
    )?;
    assert_eq!(code, 0, "submit failed: {err}");

    // One worker takes two jobs and leaves: the sweep is partial.
    let mut first = Proc {
        child: Command::new(bin("rotsweep-worker"))
            .args(["--coordinator", &server.url, "--worker-id", "w-first"])
            .args(["--sweep", "rep", "--max-jobs", "2"])
            .env("ROTSWEEP_TOKEN", TOKEN)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file(&dir, "w-first")?))
            .spawn()?,
        name: "worker w-first".into(),
    };
    let status = first.wait_timeout(Duration::from_secs(240))?;
    if !status.success() {
        dump_logs(&dir);
        panic!("the first worker failed: {status}");
    }

    let partial = dir.join("partial");
    let json = report_json(&[
        "report",
        "rep",
        "--coordinator",
        &server.url,
        "--out",
        partial.to_str().unwrap(),
        "--format",
        "json",
    ])?;
    assert_eq!(json["complete"], false, "{json}");
    assert_eq!(json["missing"].as_array().map(Vec::len), Some(4), "{json}");
    let html = std::fs::read_to_string(partial.join("index.html"))?;
    assert!(
        html.contains("Partial report"),
        "the page says it is partial"
    );
    assert!(html.contains("2 of 6 jobs have a result"));
    assert!(html.contains(r#"id="fig-test-accuracy""#));
    for svg in inline_svgs(&html) {
        let (_, ink, _) = render(svg)?;
        assert!(ink > 0, "a partial figure renders");
    }

    // The rest of the sweep.
    let mut workers = [
        start_worker(&server.url, Some(TOKEN), "w0", "rep", &dir)?,
        start_worker(&server.url, Some(TOKEN), "w1", "rep", &dir)?,
    ];
    for w in workers.iter_mut() {
        let status = w.wait_timeout(Duration::from_secs(240));
        if !matches!(&status, Ok(s) if s.success()) {
            dump_logs(&dir);
            panic!("{} did not finish cleanly: {status:?}", w.name);
        }
    }

    // The complete report, read from the state folder while the
    // coordinator still has it open.
    let out = dir.join("complete");
    let json = report_json(&[
        "report",
        "rep",
        "--state",
        state.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--compare",
        "mha,gru",
        "--format",
        "json",
    ])?;
    assert_eq!(json["complete"], true, "{json}");
    assert_eq!(json["missing"].as_array().map(Vec::len), Some(0));
    let mut figures: Vec<String> = json["figures"]
        .as_array()
        .expect("figure list")
        .iter()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    figures.sort();
    assert_eq!(
        figures,
        [
            "architecture-gru",
            "architecture-mha",
            "contingency-gru",
            "contingency-mha",
            "curves-gru",
            "curves-mha",
            "test-accuracy",
            "validation-pair",
        ]
    );

    // Every figure is in the page and draws something.
    let html = std::fs::read_to_string(out.join("index.html"))?;
    for id in &figures {
        assert!(
            html.contains(&format!(r#"<figure id="fig-{id}""#)),
            "{id} is in the page"
        );
    }
    assert!(html.contains("Validation accuracy: mha vs gru"));
    let svgs = inline_svgs(&html);
    assert_eq!(svgs.len(), figures.len());
    for (svg, id) in svgs.iter().zip(
        // Page order: architectures, curves, validation, test, contingency.
        [
            "architecture-gru",
            "architecture-mha",
            "curves-gru",
            "curves-mha",
            "validation-pair",
            "test-accuracy",
            "contingency-gru",
            "contingency-mha",
        ],
    ) {
        let (pixels, ink, colour) = render(svg)?;
        assert!(
            ink * 100 > pixels,
            "{id}: only {ink} of {pixels} pixels drawn"
        );
        if !id.starts_with("architecture") {
            assert!(
                colour > 200,
                "{id}: only {colour} coloured pixels (no data?)"
            );
        }
        let file = std::fs::read_to_string(out.join("figures").join(format!("{id}.svg")))?;
        assert!(
            file.trim_end() == *svg,
            "{id}: the file and the inline figure differ"
        );
    }

    // Self-contained: no scripts, stylesheets or images fetched.
    for needle in ["<script", "<link", "src=", "url("] {
        assert!(!html.contains(needle), "the page contains {needle}");
    }
    let http = html.matches("http://").count() + html.matches("https://").count();
    assert_eq!(http, html.matches("http://www.w3.org/2000/svg").count());

    // The exports hold exactly the stored rows.
    let (epochs, results) = runtime().block_on(async {
        let mut client = pb::connect(
            &server.url,
            Some(pb::auth::Token::new(TOKEN).map_err(anyhow::Error::msg)?),
        )
        .await?;
        let epochs = client
            .list_epochs(pb::ListEpochsRequest {
                sweep: "rep".into(),
            })
            .await?
            .into_inner();
        let results = client
            .list_results(pb::ListResultsRequest {
                sweep: "rep".into(),
            })
            .await?
            .into_inner();
        anyhow::Ok((epochs, results))
    })?;
    assert_eq!(epochs.rows.len(), 6 * EPOCHS);
    assert_eq!(csv_rows(&out.join("epochs.csv"))?, epochs.rows.len());
    assert_eq!(results.results.len(), 6);
    assert_eq!(csv_rows(&out.join("results.csv"))?, results.results.len());
    assert!(results.results.iter().all(|r| !r.layers.is_empty()));

    // The worker's `summary` builds the same model the jobs trained.
    let out_summary = Command::new(bin("rotsweep-worker"))
        .args([
            "summary",
            "--spec",
            spec.to_str().unwrap(),
            "--model",
            "mha",
        ])
        .args(["--rotation", "0", "--format", "json"])
        .output()?;
    assert!(out_summary.status.success(), "worker summary failed");
    let table: serde_json::Value = serde_json::from_slice(&out_summary.stdout)?;
    let trained = results
        .results
        .iter()
        .find(|r| r.model == "mha" && r.rotation == 0)
        .expect("mha rotation 0 has a result");
    let layers = table["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), trained.layers.len());
    for (printed, stored) in layers.iter().zip(&trained.layers) {
        assert_eq!(printed["name"], stored.name.as_str());
        assert_eq!(printed["n_params"], stored.n_params);
        let shape: Vec<u64> = stored.output_shape.clone();
        assert_eq!(printed["output_shape"], serde_json::json!(shape));
    }
    let total: u64 = trained.layers.iter().map(|l| l.n_params).sum();
    assert_eq!(table["n_params"], total);

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    for m in summary["models"].as_array().expect("models") {
        assert_eq!(m["n_used"], 3, "{m}");
        assert_eq!(m["partial"], false);
        assert!(m["test_accuracy"]["ci95"]["low"].is_number(), "{m}");
    }
    let comparison = &summary["comparisons"][0];
    assert_eq!(comparison["paired_t"]["status"], "computed");
    assert_eq!(comparison["wilcoxon"]["min_p_value"], 0.25);

    // One TensorBoard file per job, with six scalars per epoch.
    let mut n_files = 0;
    for model in ["gru", "mha"] {
        for rotation in 0..3 {
            let run = out
                .join("tensorboard")
                .join(model)
                .join(format!("rot{rotation}"));
            for entry in std::fs::read_dir(&run)? {
                let (version, scalars) = tfevents::read_scalars(&entry?.path())?;
                assert_eq!(version, "brain.Event:2");
                assert_eq!(scalars.len(), 6 * EPOCHS);
                assert!(scalars.iter().any(|s| s.tag == "accuracy/validation"
                    && s.step == EPOCHS as i64
                    && (0.0..=1.0).contains(&s.value)));
                n_files += 1;
            }
        }
    }
    assert_eq!(n_files, 6);

    // Writing again replaces the event files instead of adding more.
    report_json(&[
        "report",
        "rep",
        "--state",
        state.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--format",
        "json",
    ])?;
    let again = std::fs::read_dir(out.join("tensorboard/gru/rot0"))?.count();
    assert_eq!(again, 1);

    // A model the sweep does not have is refused by name.
    let (code, _, err) = cli(
        &[
            "report",
            "rep",
            "--state",
            state.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--compare",
            "gru,lstm",
        ],
        None,
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("lstm"), "{err}");
    Ok(())
}

#[test]
fn run_writes_the_report_into_the_state_folder() -> anyhow::Result<()> {
    let dir = temp_dir("run-report");
    let spec = tiny_spec(&dir, "runrep", &["rnn"], &[2], 1);
    let state = dir.join("state");
    let (code, _, err) = cli(
        &[
            "run",
            spec.to_str().unwrap(),
            "--local-workers",
            "1",
            "--threads",
            "1",
            "--state",
            state.to_str().unwrap(),
        ],
        None,
    )?;
    assert_eq!(code, 0, "run failed:\n{err}");
    let html = std::fs::read_to_string(state.join("report/index.html"))?;
    for id in [
        "architecture-rnn",
        "curves-rnn",
        "test-accuracy",
        "contingency-rnn",
    ] {
        assert!(html.contains(&format!(r#"id="fig-{id}""#)), "{id} missing");
    }
    // One model: nothing to compare, and the page says so.
    assert!(html.contains("Only one model: nothing to compare."));
    assert_eq!(csv_rows(&state.join("report/epochs.csv"))?, 1);
    Ok(())
}

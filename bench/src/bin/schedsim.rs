//! `rotsweep-schedsim`: scheduling-quality simulation over the reference
//! grid (3 models x 5 rotations, measured per-model epoch costs). Prints,
//! per worker count, the makespan of FIFO and of largest-expected-cost-first
//! list scheduling against the lower bound `max(longest job, total / W)`.
//! Pure computation: no coordinator, no gRPC.

#![allow(clippy::print_stdout)]

use clap::{Parser, ValueEnum};
use rotsweep_bench::sched::{self, Policy, SplitMix64};
use serde::Serialize;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Parser)]
#[command(about = "Makespan of FIFO vs largest-first over the reference grid")]
struct Cli {
    /// Worker counts to simulate.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3,4,5,6,7,8,10,12,15"
    )]
    workers: Vec<usize>,
    /// Rotations per model.
    #[arg(long, default_value_t = 5)]
    rotations: usize,
    /// Per-job noise: the actual cost is the expected cost times a factor
    /// uniform in [1 - jitter, 1 + jitter] (the queue only knows the
    /// expected cost). 0 = costs known exactly.
    #[arg(long, default_value_t = 0.0)]
    jitter: f64,
    /// Random draws per worker count when jitter > 0 (means are reported).
    #[arg(long, default_value_t = 200)]
    trials: usize,
    /// Seed of the noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// One output row (means over trials).
#[derive(Debug, Serialize)]
struct Row {
    workers: usize,
    lower_bound_s: f64,
    /// Exact optimum (only when costs are known exactly).
    optimal_s: Option<f64>,
    fifo_s: f64,
    fifo_over_bound: f64,
    largest_first_s: f64,
    largest_first_over_bound: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        (0.0..1.0).contains(&cli.jitter),
        "--jitter must be in [0, 1)"
    );
    anyhow::ensure!(cli.rotations > 0, "--rotations must be positive");
    let costs = sched::reference_costs();
    let trials = if cli.jitter > 0.0 {
        cli.trials.max(1)
    } else {
        1
    };
    let mut rows = Vec::new();
    for &w in &cli.workers {
        anyhow::ensure!(w > 0, "worker counts must be positive");
        let mut rng = SplitMix64::new(cli.seed);
        let (mut lb, mut fifo, mut lpt, mut fifo_r, mut lpt_r) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for _ in 0..trials {
            let noise: Vec<f64> = (0..costs.len() * cli.rotations)
                .map(|_| 1.0 + cli.jitter * (2.0 * rng.next_f64() - 1.0))
                .collect();
            let jobs = sched::grid(&costs, cli.rotations, |i| noise[i]);
            let bound = sched::lower_bound(&jobs, w);
            let f = sched::makespan(&jobs, w, Policy::Fifo);
            let l = sched::makespan(&jobs, w, Policy::LargestFirst);
            lb += bound;
            fifo += f;
            lpt += l;
            fifo_r += f / bound;
            lpt_r += l / bound;
        }
        let n = trials as f64;
        let optimal_s = if cli.jitter > 0.0 {
            None
        } else {
            let per_type: Vec<f64> = costs.iter().map(sched::ModelCost::job_seconds).collect();
            sched::optimal_by_type(&per_type, &vec![cli.rotations; costs.len()], w)
        };
        rows.push(Row {
            workers: w,
            lower_bound_s: lb / n,
            optimal_s,
            fifo_s: fifo / n,
            fifo_over_bound: fifo_r / n,
            largest_first_s: lpt / n,
            largest_first_over_bound: lpt_r / n,
        });
    }

    match cli.format {
        Format::Json => {
            let out = serde_json::json!({
                "costs": costs,
                "rotations": cli.rotations,
                "jitter": cli.jitter,
                "trials": trials,
                "rows": rows,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Format::Table => {
            for c in &costs {
                println!(
                    "# {}: {:.1} s/epoch x {} epochs = {:.0} s per job",
                    c.model,
                    c.seconds_per_epoch,
                    c.epochs,
                    c.job_seconds()
                );
            }
            println!(
                "# {} jobs (FIFO = submission order rnn, gru, mha), jitter {}, {} trial(s)",
                costs.len() * cli.rotations,
                cli.jitter,
                trials
            );
            println!(
                "{:>7}  {:>9}  {:>9}  {:>9}  {:>6}  {:>9}  {:>6}",
                "workers", "bound_s", "optimal_s", "fifo_s", "/bound", "largest_s", "/bound"
            );
            for r in &rows {
                println!(
                    "{:>7}  {:>9.0}  {:>9}  {:>9.0}  {:>6.3}  {:>9.0}  {:>6.3}",
                    r.workers,
                    r.lower_bound_s,
                    r.optimal_s
                        .map_or_else(|| "-".into(), |v| format!("{v:.0}")),
                    r.fifo_s,
                    r.fifo_over_bound,
                    r.largest_first_s,
                    r.largest_first_over_bound
                );
            }
        }
    }
    Ok(())
}

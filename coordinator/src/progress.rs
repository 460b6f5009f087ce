//! Live progress bars of a sweep for `rotsweep run` and `rotsweep watch` on
//! a terminal: one bar for the whole sweep (jobs done, epochs done, ETA)
//! and one line per worker (its job and current epoch).
//!
//! Callers decide when bars make sense ([`use_bars`]: a terminal, and
//! `ROTSWEEP_PROGRESS` not `plain`); otherwise they print plain log lines
//! as before. `NO_COLOR` (any value) turns the bar colours off.
//!
//! The sweep bar counts epochs, not jobs, so the ETA moves while jobs run:
//! its length is jobs × `epochs`, a job counts its reported epochs while it
//! runs and the full `epochs` once it ends (early stopping included). The
//! ETA is therefore an upper bound when jobs stop early.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::store::state;

/// The bars on screen, if any: log lines are written around them.
static ACTIVE: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn active() -> Option<MultiProgress> {
    // A panic elsewhere while holding this lock leaves a usable value.
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn set_active(multi: Option<MultiProgress>) {
    *ACTIVE.lock().unwrap_or_else(|p| p.into_inner()) = multi;
}

/// A `tracing` writer for stderr that hides the progress bars while it
/// writes a log line, so logs and bars do not overwrite each other. Use it
/// as the subscriber's writer (`with_writer(LogWriter)`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

/// The per-event handle of [`LogWriter`].
#[derive(Debug)]
pub struct LogLine;

impl Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match active() {
            Some(multi) => multi.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine
    }
}

/// Where the bars are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Standard error (`run`: stdout is for the summary).
    Stderr,
    /// Standard output (`watch`: the display is its result).
    Stdout,
}

/// True when `target` is a terminal and `ROTSWEEP_PROGRESS` is not `plain`.
pub fn use_bars(target: Target) -> bool {
    if std::env::var("ROTSWEEP_PROGRESS").is_ok_and(|v| v == "plain") {
        return false;
    }
    match target {
        Target::Stderr => std::io::stderr().is_terminal(),
        Target::Stdout => std::io::stdout().is_terminal(),
    }
}

/// True unless `NO_COLOR` is set (https://no-color.org: any value).
pub fn use_colour() -> bool {
    std::env::var_os("NO_COLOR").is_none()
}

/// One sweep's progress bars.
pub struct Bars {
    multi: MultiProgress,
    sweep: ProgressBar,
    workers: HashMap<String, ProgressBar>,
    worker_style: ProgressStyle,
    /// Job id -> worker holding it.
    job_worker: HashMap<i64, String>,
    /// Job id -> epochs counted on the sweep bar.
    job_epochs: HashMap<i64, u64>,
    /// Job id -> `model/rotN`.
    names: HashMap<i64, String>,
    epochs: u64,
    n_jobs: u64,
    n_done: u64,
}

impl Bars {
    /// Bars for a sweep of `n_jobs` jobs (`n_done` already final) of at most
    /// `epochs` epochs each. `names` maps job ids to display names.
    pub fn new(
        target: Target,
        n_jobs: usize,
        n_done: usize,
        epochs: usize,
        names: HashMap<i64, String>,
    ) -> Self {
        let draw = match target {
            Target::Stderr => ProgressDrawTarget::stderr(),
            Target::Stdout => ProgressDrawTarget::stdout(),
        };
        let multi = MultiProgress::with_draw_target(draw);
        let colour = use_colour();
        let sweep_template = if colour {
            "{prefix:.bold} [{bar:32.cyan/blue}] {msg} · {elapsed_precise} elapsed · eta {eta}"
        } else {
            "{prefix} [{bar:32}] {msg} · {elapsed_precise} elapsed · eta {eta}"
        };
        let worker_template = if colour {
            "  {prefix:.dim} [{bar:20.green/white}] {msg}"
        } else {
            "  {prefix} [{bar:20}] {msg}"
        };
        let style = |t: &str| {
            ProgressStyle::with_template(t)
                .expect("the templates above are valid")
                .progress_chars("=> ")
        };
        let (n_jobs, n_done, epochs) = (n_jobs as u64, n_done as u64, epochs.max(1) as u64);
        let sweep = multi.add(
            ProgressBar::new(n_jobs * epochs)
                .with_style(style(sweep_template))
                .with_prefix("sweep"),
        );
        sweep.set_position(n_done * epochs);
        sweep.set_message(format!("jobs {n_done}/{n_jobs} done"));
        sweep.enable_steady_tick(Duration::from_millis(500));
        set_active(Some(multi.clone()));
        Self {
            multi,
            sweep,
            workers: HashMap::new(),
            worker_style: style(worker_template),
            job_worker: HashMap::new(),
            job_epochs: HashMap::new(),
            names,
            epochs,
            n_jobs,
            n_done,
        }
    }

    fn name(&self, job_id: i64) -> String {
        self.names
            .get(&job_id)
            .cloned()
            .unwrap_or_else(|| format!("job {job_id}"))
    }

    fn update_sweep(&self) {
        let running: u64 = self.job_epochs.values().sum();
        self.sweep
            .set_position((self.n_done * self.epochs + running).min(self.n_jobs * self.epochs));
        self.sweep
            .set_message(format!("jobs {}/{} done", self.n_done, self.n_jobs));
    }

    /// Prints a line above the bars.
    pub fn println(&self, line: &str) {
        // A terminal that went away is no reason to stop the sweep.
        let _ = self.multi.println(line);
    }

    /// A worker leased a job.
    pub fn leased(&mut self, job_id: i64, name: &str, attempt: u32, worker_id: &str) {
        self.names.insert(job_id, name.to_string());
        self.job_worker.insert(job_id, worker_id.to_string());
        let bar = match self.workers.get(worker_id) {
            Some(bar) => bar.clone(),
            None => {
                let bar = self.multi.add(
                    ProgressBar::new(self.epochs)
                        .with_style(self.worker_style.clone())
                        .with_prefix(worker_id.to_string()),
                );
                self.workers.insert(worker_id.to_string(), bar.clone());
                bar
            }
        };
        bar.set_position(0);
        let again = if attempt > 1 {
            format!(" (attempt {attempt})")
        } else {
            String::new()
        };
        bar.set_message(format!("{name}{again}: starting"));
    }

    /// A job reported an epoch.
    pub fn epoch(&mut self, job_id: i64, epoch: u32, val_accuracy: f64, seconds: f64) {
        let counted = self.job_epochs.entry(job_id).or_insert(0);
        *counted = (*counted).max(u64::from(epoch)).min(self.epochs);
        if let Some(bar) = self
            .job_worker
            .get(&job_id)
            .and_then(|w| self.workers.get(w))
        {
            bar.set_position(u64::from(epoch).min(self.epochs));
            let mut msg = format!("{}: epoch {epoch}/{}", self.name(job_id), self.epochs);
            if val_accuracy.is_finite() {
                msg.push_str(&format!(" · val acc {val_accuracy:.4}"));
            }
            if seconds.is_finite() {
                msg.push_str(&format!(" · {seconds:.1} s/epoch"));
            }
            bar.set_message(msg);
        }
        self.update_sweep();
    }

    /// A job's attempt ended in `new_state`.
    pub fn finished(&mut self, job_id: i64, new_state: &str, detail: &str) {
        if state::is_final(new_state) {
            self.job_epochs.remove(&job_id);
            self.n_done += 1;
        }
        if let Some(bar) = self
            .job_worker
            .remove(&job_id)
            .and_then(|w| self.workers.get(&w).cloned())
        {
            bar.set_position(0);
            bar.set_message("idle");
        }
        let line = format!("{}: {new_state} {detail}", self.name(job_id));
        self.println(line.trim_end());
        self.update_sweep();
    }

    /// Removes the bars from the terminal.
    pub fn finish(self) {
        set_active(None);
        for bar in self.workers.values() {
            bar.finish_and_clear();
        }
        self.sweep.finish_and_clear();
        let _ = self.multi.clear();
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        // Logs go straight to stderr again, whichever way the bars ended.
        set_active(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_bar_counts_epochs_of_running_and_ended_jobs() {
        let names = HashMap::from([(1, "gru/rot0".to_string()), (2, "mha/rot0".to_string())]);
        let mut bars = Bars::new(Target::Stderr, 2, 0, 4, names);
        bars.multi.set_draw_target(ProgressDrawTarget::hidden());
        bars.leased(1, "gru/rot0", 1, "w0");
        bars.epoch(1, 1, 0.5, 1.0);
        bars.epoch(1, 2, 0.6, 1.0);
        assert_eq!(bars.sweep.position(), 2);
        // Early stopping after 2 epochs: the job counts in full.
        bars.finished(1, state::COMPLETED, "test accuracy 0.6");
        assert_eq!(bars.sweep.position(), 4);
        // A retried attempt (PENDING) is not done.
        bars.leased(2, "mha/rot0", 1, "w1");
        bars.epoch(2, 1, 0.1, 1.0);
        bars.finished(2, state::PENDING, "lease expired");
        assert_eq!(bars.n_done, 1);
        assert_eq!(bars.workers["w1"].message(), "idle");
        bars.finish();
    }
}

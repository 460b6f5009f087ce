//! List scheduling of a sweep's jobs onto identical workers: each free
//! worker takes the next job of a queue order (FIFO: submission order;
//! largest-first: descending expected cost, which is what the coordinator's
//! lease does). The makespan is compared with the lower bound
//! `max(longest job, total work / workers)`.

use serde::Serialize;

/// One job of the simulated grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    /// Model name.
    pub model: String,
    /// Rotation index.
    pub rotation: usize,
    /// Cost the scheduler believes (seconds), used to order the queue.
    pub expected_s: f64,
    /// Cost the job really takes (seconds).
    pub actual_s: f64,
}

/// Per-model cost of the reference grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCost {
    /// Model name.
    pub model: String,
    /// Seconds per epoch.
    pub seconds_per_epoch: f64,
    /// Epochs trained (early stopping included).
    pub epochs: f64,
}

impl ModelCost {
    /// Seconds of one job of this model.
    pub fn job_seconds(&self) -> f64 {
        self.seconds_per_epoch * self.epochs
    }
}

/// The measured hw6 grid costs on the project machine under load
/// (rnn 4.8 s/epoch x 27 epochs, gru 9.4 x 29, mha 14.1 x 26), in the
/// order the homework lists the models.
pub fn reference_costs() -> Vec<ModelCost> {
    [("rnn", 4.8, 27.0), ("gru", 9.4, 29.0), ("mha", 14.1, 26.0)]
        .into_iter()
        .map(|(m, s, e)| ModelCost {
            model: m.to_string(),
            seconds_per_epoch: s,
            epochs: e,
        })
        .collect()
}

/// The grid in submission order (model-major, then rotation), every job
/// costing its model's nominal cost times `factor(job index)`.
pub fn grid(costs: &[ModelCost], rotations: usize, factor: impl Fn(usize) -> f64) -> Vec<Job> {
    let mut jobs = Vec::new();
    for c in costs {
        for rotation in 0..rotations {
            let expected = c.job_seconds();
            let actual = expected * factor(jobs.len());
            jobs.push(Job {
                model: c.model.clone(),
                rotation,
                expected_s: expected,
                actual_s: actual,
            });
        }
    }
    jobs
}

/// Queue order policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Submission order.
    Fifo,
    /// Largest expected cost first (stable for ties).
    LargestFirst,
}

/// Makespan (seconds) of list-scheduling `jobs` on `workers` identical
/// workers in the queue order of `policy`, using the actual costs.
pub fn makespan(jobs: &[Job], workers: usize, policy: Policy) -> f64 {
    let mut order: Vec<&Job> = jobs.iter().collect();
    if policy == Policy::LargestFirst {
        order.sort_by(|a, b| b.expected_s.total_cmp(&a.expected_s));
    }
    let mut free_at = vec![0.0_f64; workers.max(1)];
    for job in order {
        // The worker that frees up first takes the next job.
        let (idx, _) = free_at
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .expect("at least one worker");
        free_at[idx] += job.actual_s;
    }
    free_at.into_iter().fold(0.0, f64::max)
}

/// `max(longest job, total work / workers)` over the actual costs.
pub fn lower_bound(jobs: &[Job], workers: usize) -> f64 {
    let longest = jobs.iter().map(|j| j.actual_s).fold(0.0, f64::max);
    let total: f64 = jobs.iter().map(|j| j.actual_s).sum();
    longest.max(total / workers.max(1) as f64)
}

/// The optimal makespan when jobs come in a few types of identical cost
/// (`counts[i]` jobs of `costs[i]` seconds) on `workers` identical
/// workers, by exhaustive search over per-worker job mixes. The lower bound
/// is often not reachable with 15 coarse jobs; this is the true optimum
/// list scheduling is compared with. Returns `None` when the state space
/// (product of `counts[i] + 1`) exceeds 100,000.
pub fn optimal_by_type(costs: &[f64], counts: &[usize], workers: usize) -> Option<f64> {
    let dims: Vec<usize> = counts.iter().map(|c| c + 1).collect();
    let states = dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d))?;
    if states > 100_000 || costs.len() != counts.len() {
        return None;
    }
    let decode = |mut idx: usize| -> Vec<usize> {
        dims.iter()
            .map(|d| {
                let v = idx % d;
                idx /= d;
                v
            })
            .collect()
    };
    let encode =
        |v: &[usize]| -> usize { v.iter().zip(&dims).rev().fold(0, |acc, (x, d)| acc * d + x) };
    let load = |v: &[usize]| -> f64 { v.iter().zip(costs).map(|(n, c)| *n as f64 * c).sum() };
    // Candidate makespans: every non-empty mix's load, ascending.
    let mut candidates: Vec<f64> = (1..states).map(|i| load(&decode(i))).collect();
    candidates.sort_by(f64::total_cmp);
    candidates.dedup();
    // Fewest workers that can run the whole multiset with no worker above t.
    let fewest = |t: f64| -> usize {
        let mixes: Vec<Vec<usize>> = (1..states)
            .map(&decode)
            .filter(|v| load(v) <= t + 1e-9)
            .collect();
        let mut best = vec![usize::MAX; states];
        best[0] = 0;
        for idx in 1..states {
            let have = decode(idx);
            for m in &mixes {
                if m.iter().zip(&have).all(|(a, b)| a <= b) {
                    let rest: Vec<usize> = have.iter().zip(m).map(|(h, a)| h - a).collect();
                    let r = best[encode(&rest)];
                    if r != usize::MAX {
                        best[idx] = best[idx].min(r + 1);
                    }
                }
            }
        }
        best[states - 1]
    };
    candidates
        .into_iter()
        .find(|&t| fewest(t) <= workers.max(1))
}

/// A small deterministic generator (SplitMix64) for cost noise, so runs
/// are reproducible without a random-number crate.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value, uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(costs: &[f64]) -> Vec<Job> {
        costs
            .iter()
            .enumerate()
            .map(|(i, &c)| Job {
                model: format!("m{i}"),
                rotation: 0,
                expected_s: c,
                actual_s: c,
            })
            .collect()
    }

    #[test]
    fn largest_first_beats_fifo_on_the_textbook_case() {
        // Small jobs first then a big one: FIFO puts the big job last.
        let js = jobs(&[1.0, 1.0, 1.0, 1.0, 4.0]);
        assert_eq!(makespan(&js, 2, Policy::Fifo), 6.0);
        assert_eq!(makespan(&js, 2, Policy::LargestFirst), 4.0);
        assert_eq!(lower_bound(&js, 2), 4.0);
    }

    #[test]
    fn one_worker_runs_everything_in_sequence() {
        let js = jobs(&[3.0, 2.0, 5.0]);
        for p in [Policy::Fifo, Policy::LargestFirst] {
            assert_eq!(makespan(&js, 1, p), 10.0);
        }
        assert_eq!(lower_bound(&js, 1), 10.0);
    }

    #[test]
    fn reference_grid_has_fifteen_jobs_and_bounded_makespans() {
        let js = grid(&reference_costs(), 5, |_| 1.0);
        assert_eq!(js.len(), 15);
        for w in 1..=16 {
            let lb = lower_bound(&js, w);
            for p in [Policy::Fifo, Policy::LargestFirst] {
                let m = makespan(&js, w, p);
                assert!(m >= lb - 1e-9, "{p:?} w={w}: {m} < bound {lb}");
                // Graham: list scheduling is within 2 - 1/w of optimal.
                assert!(m <= lb * (2.0 - 1.0 / w as f64) + 1e-9);
            }
        }
    }

    #[test]
    fn optimum_by_type_matches_hand_cases() {
        // Two 3s and two 2s on two workers: 3+2 each.
        assert_eq!(optimal_by_type(&[3.0, 2.0], &[2, 2], 2), Some(5.0));
        // Five 1s and one 4 on two workers: 4 | 1+1+1+1+1.
        assert_eq!(optimal_by_type(&[1.0, 4.0], &[5, 1], 2), Some(5.0));
        assert_eq!(optimal_by_type(&[1.0], &[3], 1), Some(3.0));
        // The optimum lies between the bound and largest-first.
        let costs: Vec<f64> = reference_costs()
            .iter()
            .map(ModelCost::job_seconds)
            .collect();
        let js = grid(&reference_costs(), 5, |_| 1.0);
        for w in 1..=8 {
            let opt = optimal_by_type(&costs, &[5, 5, 5], w).expect("small state space");
            assert!(opt >= lower_bound(&js, w) - 1e-9);
            assert!(opt <= makespan(&js, w, Policy::LargestFirst) + 1e-9);
        }
    }

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let mut a = SplitMix64::new(1);
        let mut b = SplitMix64::new(1);
        for _ in 0..100 {
            let x = a.next_f64();
            assert_eq!(x, b.next_f64());
            assert!((0.0..1.0).contains(&x));
        }
    }
}

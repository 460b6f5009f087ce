//! Statistics of a sweep: per-model descriptions across rotations and
//! paired comparisons between models.
//!
//! - Distributions: [`ln_gamma`], the regularized incomplete beta
//!   [`beta_inc`] (continued fraction), Student's t ([`student_t_cdf`],
//!   [`student_t_quantile`]) and the standard normal ([`normal_cdf`], via the
//!   regularized incomplete gamma function). Accurate to about 1e-12 in the
//!   ranges used here; the tests compare against scipy.
//! - Descriptions: [`describe`] gives n, mean, sample standard deviation
//!   (ddof = 1, [`crate::summary::mean_std`]), min, max and the 95%
//!   confidence interval of the mean (t distribution, n - 1 degrees of
//!   freedom).
//! - Per confusion matrix: [`balanced_accuracy`] and [`macro_f1`], with the
//!   class conventions of scikit-learn.
//! - Comparisons across rotations: [`paired_t`] and [`wilcoxon`] (signed
//!   ranks), each of which answers [`TestOutcome::NotEnough`] when there are
//!   too few pairs, instead of a number that means nothing.
//! - [`model_stats`] and [`compare`] put these together for the report.

use serde::{Deserialize, Serialize};

use crate::summary::mean_std;

/// Confidence level of every interval in this module.
pub const CONFIDENCE: f64 = 0.95;

/// Largest number of nonzero paired differences for which [`wilcoxon`]
/// enumerates all 2^n sign assignments (the exact null distribution, ties
/// included); above it the normal approximation is used.
pub const WILCOXON_EXACT_MAX_N: usize = 20;

// ------------------------------------------------------------ distributions

/// Natural logarithm of the gamma function for `x > 0` (Lanczos
/// approximation, g = 7, nine coefficients; relative error below 1e-14).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).abs().ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, &c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// True for a number above zero (false for NaN).
fn is_positive(x: f64) -> bool {
    x > 0.0
}

/// Continued fraction of the incomplete beta function (modified Lentz).
fn beta_continued_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    const EPS: f64 = 1e-16;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..=10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // Even step.
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        h *= d * c;
        // Odd step.
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        if d.abs() < TINY {
            d = TINY;
        }
        c = 1.0 + aa / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function I_x(a, b) for `a, b > 0` and
/// `x` in [0, 1]; NaN outside that domain.
pub fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if !(is_positive(a) && is_positive(b) && (0.0..=1.0).contains(&x)) {
        return f64::NAN;
    }
    if x == 0.0 || x == 1.0 {
        return x;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    let front = ln_front.exp();
    // The continued fraction converges fast for x < (a + 1) / (a + b + 2);
    // use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_continued_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_continued_fraction(b, a, 1.0 - x) / b
    }
}

/// Two-sided tail probability P(|T| >= |t|) of Student's t with `df`
/// degrees of freedom.
pub fn student_t_two_sided(t: f64, df: f64) -> f64 {
    if t.is_nan() || !is_positive(df) {
        return f64::NAN;
    }
    if t.is_infinite() {
        return 0.0;
    }
    beta_inc(df / 2.0, 0.5, df / (df + t * t))
}

/// Cumulative distribution P(T <= t) of Student's t with `df` degrees of
/// freedom.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = student_t_two_sided(t, df) / 2.0;
    if t > 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (the `t`
/// with P(T <= t) = p), by bisection on [`student_t_cdf`]. NaN for `p`
/// outside (0, 1).
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    if !(is_positive(p) && p < 1.0 && is_positive(df)) {
        return f64::NAN;
    }
    if p == 0.5 {
        return 0.0;
    }
    // Solve for the upper tail and mirror, so the bracket is [0, hi].
    let upper = p.max(1.0 - p);
    let mut hi = 1.0;
    while student_t_cdf(hi, df) < upper {
        hi *= 2.0;
        if hi > 1e12 {
            break;
        }
    }
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < upper {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-15 * hi {
            break;
        }
    }
    let t = 0.5 * (lo + hi);
    if p > 0.5 {
        t
    } else {
        -t
    }
}

/// Regularized upper incomplete gamma Q(a, x) for `a > 0`, `x >= 0`.
fn gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let ln_front = -x + a * x.ln() - ln_gamma(a);
    if x < a + 1.0 {
        // Series for P(a, x); Q = 1 - P.
        let mut term = 1.0 / a;
        let mut sum = term;
        let mut ap = a;
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-17 {
                break;
            }
        }
        1.0 - sum * ln_front.exp()
    } else {
        // Continued fraction for Q(a, x) (modified Lentz).
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        h * ln_front.exp()
    }
}

/// The complementary error function, erfc(x) = Q(1/2, x²) for x >= 0.
fn erfc(x: f64) -> f64 {
    if x >= 0.0 {
        gamma_q(0.5, x * x)
    } else {
        2.0 - gamma_q(0.5, x * x)
    }
}

/// Cumulative distribution Φ(z) of the standard normal.
pub fn normal_cdf(z: f64) -> f64 {
    if z.is_nan() {
        return f64::NAN;
    }
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

// ------------------------------------------------------------ descriptions

/// A closed interval `[low, high]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

/// Summary statistics of a sample of per-rotation values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Describe {
    /// Values used (finite ones only).
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (ddof = 1); `None` when `n < 2`.
    pub std: Option<f64>,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// 95% confidence interval of the mean: mean ± t(0.975, n - 1) · std /
    /// √n; `None` when `n < 2`.
    pub ci95: Option<Interval>,
}

/// Describes the finite values of `xs`; `None` when there are none.
pub fn describe(xs: &[f64]) -> Option<Describe> {
    let finite: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    let (mean, std) = mean_std(&finite);
    let mean = mean?;
    let n = finite.len();
    let ci95 = std.map(|s| {
        let half =
            student_t_quantile(0.5 + CONFIDENCE / 2.0, (n - 1) as f64) * s / (n as f64).sqrt();
        Interval {
            low: mean - half,
            high: mean + half,
        }
    });
    Some(Describe {
        n,
        mean,
        std,
        min: finite.iter().copied().fold(f64::INFINITY, f64::min),
        max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ci95,
    })
}

/// Balanced accuracy of a confusion matrix (rows = true class): the mean
/// recall over the classes that occur in the truth (row sum > 0), as
/// scikit-learn's `balanced_accuracy_score`. `None` for an empty matrix.
pub fn balanced_accuracy(confusion: &[Vec<u64>]) -> Option<f64> {
    let recalls: Vec<f64> = confusion
        .iter()
        .enumerate()
        .filter_map(|(i, row)| {
            let support: u64 = row.iter().sum();
            (support > 0).then(|| row.get(i).copied().unwrap_or(0) as f64 / support as f64)
        })
        .collect();
    if recalls.is_empty() {
        return None;
    }
    Some(recalls.iter().sum::<f64>() / recalls.len() as f64)
}

/// Macro-averaged F1 of a confusion matrix (rows = true class): the mean of
/// per-class F1 = 2·tp / (2·tp + fp + fn) over the classes that occur in the
/// truth or in the predictions, a class with tp = 0 counting as 0 (as
/// scikit-learn's `f1_score(average="macro")` with its default labels).
/// `None` for an empty matrix.
pub fn macro_f1(confusion: &[Vec<u64>]) -> Option<f64> {
    let n = confusion.len();
    let mut f1s = Vec::new();
    for c in 0..n {
        let tp = confusion[c].get(c).copied().unwrap_or(0);
        let row: u64 = confusion[c].iter().sum();
        let col: u64 = confusion
            .iter()
            .map(|r| r.get(c).copied().unwrap_or(0))
            .sum();
        if row + col == 0 {
            continue;
        }
        let (fn_, fp) = (row - tp, col - tp);
        f1s.push(2.0 * tp as f64 / (2 * tp + fp + fn_) as f64);
    }
    if f1s.is_empty() {
        return None;
    }
    Some(f1s.iter().sum::<f64>() / f1s.len() as f64)
}

// ------------------------------------------------------------ tests

/// The answer of a statistical test: a result, or why there is none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TestOutcome<T> {
    /// The test ran.
    Computed(T),
    /// Too few pairs for this test to say anything.
    NotEnough {
        /// Pairs available.
        n: usize,
        /// Pairs the test needs at least.
        needed: usize,
        /// A sentence for the reader.
        reason: String,
    },
    /// The data make the statistic undefined (e.g. identical differences).
    Undefined {
        /// A sentence for the reader.
        reason: String,
    },
}

impl<T> TestOutcome<T> {
    /// The result, when the test ran.
    pub fn computed(&self) -> Option<&T> {
        match self {
            TestOutcome::Computed(t) => Some(t),
            _ => None,
        }
    }
}

/// A paired t-test of `a - b`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedT {
    /// Pairs.
    pub n: usize,
    /// Mean of the differences `a - b`.
    pub mean_difference: f64,
    /// Sample standard deviation (ddof = 1) of the differences.
    pub std_difference: f64,
    /// 95% confidence interval of the mean difference.
    pub ci95: Interval,
    /// The t statistic, mean / (std / √n).
    pub t: f64,
    /// Degrees of freedom, n - 1.
    pub df: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// Paired t-test of the differences `a[i] - b[i]` (two-sided, as
/// `scipy.stats.ttest_rel`). Needs at least two pairs; identical
/// differences leave the statistic undefined.
pub fn paired_t(a: &[f64], b: &[f64]) -> TestOutcome<PairedT> {
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = diffs.len();
    if n < 2 {
        return TestOutcome::NotEnough {
            n,
            needed: 2,
            reason: format!(
                "a paired t-test needs at least 2 rotations where both models finished; {n} did"
            ),
        };
    }
    let (mean, std) = mean_std(&diffs);
    let (mean, std) = (
        mean.expect("n >= 2 values have a mean"),
        std.expect("n >= 2 values have a std"),
    );
    if std == 0.0 {
        return TestOutcome::Undefined {
            reason: format!(
                "every rotation differs by exactly {mean:.4}; the t statistic is undefined"
            ),
        };
    }
    let df = (n - 1) as f64;
    let se = std / (n as f64).sqrt();
    let t = mean / se;
    let half = student_t_quantile(0.5 + CONFIDENCE / 2.0, df) * se;
    TestOutcome::Computed(PairedT {
        n,
        mean_difference: mean,
        std_difference: std,
        ci95: Interval {
            low: mean - half,
            high: mean + half,
        },
        t,
        df,
        p_value: student_t_two_sided(t, df),
    })
}

/// How a Wilcoxon p-value was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WilcoxonMethod {
    /// All 2^n sign assignments enumerated (exact, ties included).
    Exact,
    /// Normal approximation with the tie correction of the variance.
    Normal,
}

/// A Wilcoxon signed-rank test of `a - b`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wilcoxon {
    /// Nonzero differences (zeros are dropped, scipy's `zero_method =
    /// "wilcox"`).
    pub n: usize,
    /// Sum of the ranks of the positive differences.
    pub w_plus: f64,
    /// min(W+, W-), the statistic scipy reports for the two-sided test.
    pub statistic: f64,
    /// Two-sided p-value.
    pub p_value: f64,
    /// The smallest two-sided p-value any data with this n could give
    /// (2 / 2^n for the exact test): with 5 rotations it is 0.0625, so no
    /// result can reach p < 0.05.
    pub min_p_value: f64,
    /// Exact enumeration or normal approximation.
    pub method: WilcoxonMethod,
}

/// Average ranks (1-based) of `xs`, ties sharing the mean of their ranks;
/// returned doubled, as integers, so sums stay exact.
fn doubled_ranks(xs: &[f64]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&i, &j| xs[i].total_cmp(&xs[j]));
    let mut ranks = vec![0u64; xs.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean (i + j + 2) / 2; doubled.
        for &k in &order[i..=j] {
            ranks[k] = (i + j + 2) as u64;
        }
        i = j + 1;
    }
    ranks
}

/// Wilcoxon signed-rank test of the differences `a[i] - b[i]`, two-sided.
/// Zero differences are dropped; with up to [`WILCOXON_EXACT_MAX_N`]
/// nonzero ones the p-value is exact (every sign assignment enumerated,
/// which is scipy's exact test without ties and its permutation test with
/// ties), above that it is the normal approximation without continuity
/// correction (scipy's `method="asymptotic"`).
pub fn wilcoxon(a: &[f64], b: &[f64]) -> TestOutcome<Wilcoxon> {
    let diffs: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x - y)
        .filter(|d| *d != 0.0)
        .collect();
    let n = diffs.len();
    if n == 0 {
        return TestOutcome::NotEnough {
            n,
            needed: 1,
            reason: "no rotation where both models finished differs between them".into(),
        };
    }
    let abs: Vec<f64> = diffs.iter().map(|d| d.abs()).collect();
    let ranks = doubled_ranks(&abs);
    let total: u64 = ranks.iter().sum();
    let w_plus2: u64 = ranks
        .iter()
        .zip(&diffs)
        .filter(|(_, d)| **d > 0.0)
        .map(|(r, _)| r)
        .sum();
    let w_plus = w_plus2 as f64 / 2.0;
    let statistic = w_plus.min(total as f64 / 2.0 - w_plus);

    let (p_value, min_p_value, method) = if n <= WILCOXON_EXACT_MAX_N {
        // Count sign assignments with W+ at or below / at or above the
        // observed value.
        let (mut low, mut high) = (0u64, 0u64);
        for mask in 0u64..(1 << n) {
            let w: u64 = (0..n)
                .filter(|i| mask >> i & 1 == 1)
                .map(|i| ranks[i])
                .sum();
            low += u64::from(w <= w_plus2);
            high += u64::from(w >= w_plus2);
        }
        let all = (1u64 << n) as f64;
        let p = (2.0 * low.min(high) as f64 / all).min(1.0);
        (p, (2.0 / all).min(1.0), WilcoxonMethod::Exact)
    } else {
        let nf = n as f64;
        let mean = nf * (nf + 1.0) / 4.0;
        // Tie correction: subtract Σ(t³ - t) / 48 over groups of tied ranks.
        let mut sorted = ranks.clone();
        sorted.sort_unstable();
        let mut tie_term = 0.0;
        let mut i = 0;
        while i < sorted.len() {
            let j = sorted[i..].iter().take_while(|&&r| r == sorted[i]).count();
            let t = j as f64;
            tie_term += t * t * t - t;
            i += j;
        }
        let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term / 48.0;
        let z = (w_plus - mean) / var.sqrt();
        let p = (2.0 * normal_cdf(-z.abs())).min(1.0);
        let z_max = mean / var.sqrt();
        (p, 2.0 * normal_cdf(-z_max), WilcoxonMethod::Normal)
    };
    TestOutcome::Computed(Wilcoxon {
        n,
        w_plus,
        statistic,
        p_value,
        min_p_value,
        method,
    })
}

// ------------------------------------------------------------ per model

/// Which epoch of a job stands for its training and validation metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochChoice {
    /// The epoch whose weights were restored and tested (early stopping's
    /// best epoch).
    #[default]
    Best,
    /// The last epoch trained.
    Last,
}

impl EpochChoice {
    /// `best` or `last`.
    pub fn as_str(self) -> &'static str {
        match self {
            EpochChoice::Best => "best",
            EpochChoice::Last => "last",
        }
    }
}

/// One epoch's metrics, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochPoint {
    /// 1-based epoch.
    pub epoch: u32,
    /// Mean training loss (cross-entropy, nats).
    pub train_loss: f64,
    /// Training accuracy in [0, 1].
    pub train_accuracy: f64,
    /// Validation loss (nats).
    pub val_loss: f64,
    /// Validation accuracy in [0, 1].
    pub val_accuracy: f64,
    /// Wall seconds of the epoch.
    pub seconds: f64,
    /// Training examples per second.
    pub examples_per_second: f64,
}

/// Everything stored about one job (one model on one rotation).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobRecord {
    /// Rotation index.
    pub rotation: usize,
    /// Test accuracy; `None` until the job completed with a finite value.
    pub test_accuracy: Option<f64>,
    /// Test confusion matrix, rows = true class; empty until completed.
    pub confusion: Vec<Vec<u64>>,
    /// Epochs trained (0 until completed).
    pub epochs_trained: u32,
    /// Epoch whose weights were tested (0 until completed).
    pub best_epoch: u32,
    /// Visible epoch rows, by epoch.
    pub epochs: Vec<EpochPoint>,
}

/// One rotation's line of [`ModelStats`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationStats {
    /// Rotation index.
    pub rotation: usize,
    /// Test accuracy in [0, 1].
    pub test_accuracy: f64,
    /// Mean per-class recall of the test confusion matrix.
    pub balanced_accuracy: Option<f64>,
    /// Macro-averaged F1 of the test confusion matrix.
    pub macro_f1: Option<f64>,
    /// Epochs trained.
    pub epochs_trained: u32,
    /// Epoch whose weights were tested.
    pub best_epoch: u32,
    /// The epoch `train_accuracy` and `val_accuracy` come from
    /// (see [`EpochChoice`]).
    pub chosen_epoch: Option<u32>,
    /// Training accuracy at the chosen epoch.
    pub train_accuracy: Option<f64>,
    /// Validation accuracy at the chosen epoch.
    pub val_accuracy: Option<f64>,
    /// Mean wall seconds per epoch.
    pub seconds_per_epoch: Option<f64>,
    /// Mean training examples per second.
    pub examples_per_second: Option<f64>,
}

/// A model's statistics across its rotations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    /// Model name.
    pub name: String,
    /// Model kind (`rnn`, `gru`, `mha`).
    pub kind: String,
    /// The epoch choice behind `train_accuracy` and `val_accuracy`.
    pub epoch_choice: EpochChoice,
    /// Completed rotations with a finite test accuracy, by rotation.
    pub rotations: Vec<RotationStats>,
    /// Rotations that contributed.
    pub n_used: usize,
    /// Rotations in the grid.
    pub n_total: usize,
    /// True when `n_used < n_total`: the numbers cover part of the grid.
    pub partial: bool,
    /// Rotations of the grid without a usable result.
    pub missing_rotations: Vec<usize>,
    /// Test accuracy across rotations.
    pub test_accuracy: Option<Describe>,
    /// Balanced accuracy across rotations.
    pub balanced_accuracy: Option<Describe>,
    /// Macro F1 across rotations.
    pub macro_f1: Option<Describe>,
    /// Validation accuracy at the chosen epoch, across rotations.
    pub val_accuracy: Option<Describe>,
    /// Epochs trained, across rotations.
    pub epochs_trained: Option<Describe>,
    /// Best epoch, across rotations.
    pub best_epoch: Option<Describe>,
    /// Seconds per epoch, across rotations.
    pub seconds_per_epoch: Option<Describe>,
    /// Training examples per second, across rotations.
    pub examples_per_second: Option<Describe>,
}

fn mean_of(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let xs: Vec<f64> = xs.filter(|x| x.is_finite()).collect();
    mean_std(&xs).0
}

/// Statistics of one model. `grid_rotations` are the rotations of the
/// sweep; `jobs` the records of this model (any order, unfinished ones
/// included: they count as missing).
pub fn model_stats(
    name: &str,
    kind: &str,
    grid_rotations: &[usize],
    jobs: &[JobRecord],
    choice: EpochChoice,
) -> ModelStats {
    let mut rotations: Vec<RotationStats> = jobs
        .iter()
        .filter_map(|j| {
            let acc = j.test_accuracy.filter(|a| a.is_finite())?;
            let chosen = match choice {
                EpochChoice::Best => j.epochs.iter().find(|e| e.epoch == j.best_epoch),
                EpochChoice::Last => j.epochs.iter().max_by_key(|e| e.epoch),
            };
            Some(RotationStats {
                rotation: j.rotation,
                test_accuracy: acc,
                balanced_accuracy: balanced_accuracy(&j.confusion),
                macro_f1: macro_f1(&j.confusion),
                epochs_trained: j.epochs_trained,
                best_epoch: j.best_epoch,
                chosen_epoch: chosen.map(|e| e.epoch),
                train_accuracy: chosen.map(|e| e.train_accuracy),
                val_accuracy: chosen.map(|e| e.val_accuracy),
                seconds_per_epoch: mean_of(j.epochs.iter().map(|e| e.seconds)),
                examples_per_second: mean_of(j.epochs.iter().map(|e| e.examples_per_second)),
            })
        })
        .collect();
    rotations.sort_by_key(|r| r.rotation);
    rotations.dedup_by_key(|r| r.rotation);

    let missing_rotations: Vec<usize> = grid_rotations
        .iter()
        .copied()
        .filter(|g| !rotations.iter().any(|r| r.rotation == *g))
        .collect();
    let column = |f: &dyn Fn(&RotationStats) -> Option<f64>| -> Option<Describe> {
        describe(&rotations.iter().filter_map(f).collect::<Vec<_>>())
    };
    ModelStats {
        name: name.to_string(),
        kind: kind.to_string(),
        epoch_choice: choice,
        n_used: rotations.len(),
        n_total: grid_rotations.len(),
        partial: rotations.len() < grid_rotations.len(),
        missing_rotations,
        test_accuracy: column(&|r| Some(r.test_accuracy)),
        balanced_accuracy: column(&|r| r.balanced_accuracy),
        macro_f1: column(&|r| r.macro_f1),
        val_accuracy: column(&|r| r.val_accuracy),
        epochs_trained: column(&|r| Some(f64::from(r.epochs_trained))),
        best_epoch: column(&|r| Some(f64::from(r.best_epoch))),
        seconds_per_epoch: column(&|r| r.seconds_per_epoch),
        examples_per_second: column(&|r| r.examples_per_second),
        rotations,
    }
}

/// The per-rotation metric two models are compared on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Test accuracy.
    #[default]
    TestAccuracy,
    /// Balanced accuracy on the test fold.
    BalancedAccuracy,
    /// Macro F1 on the test fold.
    MacroF1,
    /// Validation accuracy at the chosen epoch.
    ValAccuracy,
}

impl Metric {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::TestAccuracy => "test_accuracy",
            Metric::BalancedAccuracy => "balanced_accuracy",
            Metric::MacroF1 => "macro_f1",
            Metric::ValAccuracy => "val_accuracy",
        }
    }

    /// This metric of one rotation.
    pub fn of(self, r: &RotationStats) -> Option<f64> {
        match self {
            Metric::TestAccuracy => Some(r.test_accuracy),
            Metric::BalancedAccuracy => r.balanced_accuracy,
            Metric::MacroF1 => r.macro_f1,
            Metric::ValAccuracy => r.val_accuracy,
        }
    }
}

/// Model `a` against model `b` on the rotations both finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// First model (differences are `a - b`).
    pub a: String,
    /// Second model.
    pub b: String,
    /// The metric compared.
    pub metric: Metric,
    /// Rotations both models finished, ascending.
    pub rotations: Vec<usize>,
    /// `a - b` per paired rotation.
    pub differences: Vec<f64>,
    /// Paired t-test (mean difference and its 95% interval inside).
    pub paired_t: TestOutcome<PairedT>,
    /// Wilcoxon signed-rank test.
    pub wilcoxon: TestOutcome<Wilcoxon>,
}

impl Comparison {
    /// Mean of the differences, when there is at least one pair.
    pub fn mean_difference(&self) -> Option<f64> {
        mean_std(&self.differences).0
    }
}

/// Compares two models on `metric`, pairing rotations by index.
pub fn compare(a: &ModelStats, b: &ModelStats, metric: Metric) -> Comparison {
    let mut rotations = Vec::new();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for ra in &a.rotations {
        let Some(rb) = b.rotations.iter().find(|r| r.rotation == ra.rotation) else {
            continue;
        };
        if let (Some(x), Some(y)) = (metric.of(ra), metric.of(rb)) {
            if x.is_finite() && y.is_finite() {
                rotations.push(ra.rotation);
                xs.push(x);
                ys.push(y);
            }
        }
    }
    Comparison {
        a: a.name.clone(),
        b: b.name.clone(),
        metric,
        differences: xs.iter().zip(&ys).map(|(x, y)| x - y).collect(),
        paired_t: paired_t(&xs, &ys),
        wilcoxon: wilcoxon(&xs, &ys),
        rotations,
    }
}

/// Every unordered pair of models, in the order given.
pub fn compare_all(models: &[ModelStats], metric: Metric) -> Vec<Comparison> {
    let mut out = Vec::new();
    for (i, a) in models.iter().enumerate() {
        for b in &models[i + 1..] {
            out.push(compare(a, b, metric));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + b.abs())
    }

    macro_rules! assert_close {
        ($a:expr, $b:expr, $tol:expr) => {{
            let (a, b) = ($a, $b);
            assert!(close(a, b, $tol), "{} = {a}, expected {b}", stringify!($a));
        }};
    }

    #[test]
    fn distributions_match_scipy() {
        // python3 -c "
        // from scipy import special, stats
        // print(special.gammaln(0.5), special.gammaln(7.3), special.gammaln(123.4))
        // print(special.betainc(2.5, 0.5, 0.3), special.betainc(10, 20, 0.7))
        // print(stats.t.cdf(-2.1, 4), stats.t.cdf(0.7, 1.5), stats.t.cdf(3.3, 30))
        // print(stats.t.ppf(0.975, 1), stats.t.ppf(0.975, 4), stats.t.ppf(0.975, 29),
        //       stats.t.ppf(0.01, 7))
        // print(stats.norm.cdf(-1.96), stats.norm.cdf(0.3), stats.norm.cdf(-7.5))"
        assert_close!(ln_gamma(0.5), 0.5723649429247, 1e-13);
        assert_close!(ln_gamma(7.3), 7.147892523022249, 1e-13);
        assert_close!(ln_gamma(123.4), 469.3360974421906, 1e-13);
        assert_close!(beta_inc(2.5, 0.5, 0.3), 0.018927124071945658, 1e-12);
        assert_close!(beta_inc(10.0, 20.0, 0.7), 0.9999828580828269, 1e-12);
        assert_close!(student_t_cdf(-2.1, 4.0), 0.05182664315880109, 1e-12);
        assert_close!(student_t_cdf(0.7, 1.5), 0.7117808795586567, 1e-12);
        assert_close!(student_t_cdf(3.3, 30.0), 0.998750346280101, 1e-12);
        assert_close!(student_t_quantile(0.975, 1.0), 12.706204736174694, 1e-10);
        assert_close!(student_t_quantile(0.975, 4.0), 2.7764451051977934, 1e-10);
        assert_close!(student_t_quantile(0.975, 29.0), 2.045229642132703, 1e-10);
        assert_close!(student_t_quantile(0.01, 7.0), -2.9979515668685286, 1e-10);
        assert_close!(normal_cdf(-1.96), 0.024997895148220435, 1e-12);
        assert_close!(normal_cdf(0.3), 0.6179114221889526, 1e-12);
        assert_close!(normal_cdf(-7.5), 3.1908916729108844e-14, 1e-9);
    }

    #[test]
    fn describe_gives_the_t_interval_of_the_mean() {
        // python3 -c "
        // import numpy as np; from scipy import stats
        // x = np.array([0.81, 0.79, 0.86, 0.74, 0.80])
        // m, s = x.mean(), x.std(ddof=1)
        // h = stats.t.ppf(0.975, len(x) - 1) * s / np.sqrt(len(x))
        // print(m, s, m - h, m + h)"
        let d = describe(&[0.81, 0.79, 0.86, 0.74, 0.80, f64::NAN]).expect("values");
        assert_eq!(d.n, 5);
        assert_close!(d.mean, 0.8, 1e-12);
        assert_close!(d.std.expect("n >= 2"), 0.04301162633521313, 1e-12);
        let ci = d.ci95.expect("n >= 2");
        assert_close!(ci.low, 0.746594012075373, 1e-10);
        assert_close!(ci.high, 0.8534059879246271, 1e-10);
        assert_eq!((d.min, d.max), (0.74, 0.86));

        let one = describe(&[0.5]).expect("one value");
        assert_eq!((one.std, one.ci95), (None, None));
        assert!(describe(&[f64::NAN]).is_none());
    }

    #[test]
    fn confusion_metrics_match_sklearn_conventions() {
        // Class 3 never occurs in the truth but is predicted once; class 4
        // occurs nowhere.
        // python3 -c "
        // import numpy as np
        // c = np.array([[5,1,0,0,0],[2,3,1,0,0],[0,0,4,1,0],[0,0,0,0,0],[0,0,0,0,0]])
        // rows, cols, tp = c.sum(1), c.sum(0), np.diag(c)
        // print(np.mean([tp[i]/rows[i] for i in range(5) if rows[i] > 0]))
        // print(np.mean([2*tp[i]/(rows[i]+cols[i]) for i in range(5)
        //                if rows[i]+cols[i] > 0]))"
        // and with sklearn (y_true/y_pred expanded from c):
        // balanced_accuracy_score -> 0.7111111111111112 (with a warning)
        // f1_score(average='macro') -> 0.5423076923076924
        let c = vec![
            vec![5, 1, 0, 0, 0],
            vec![2, 3, 1, 0, 0],
            vec![0, 0, 4, 1, 0],
            vec![0, 0, 0, 0, 0],
            vec![0, 0, 0, 0, 0],
        ];
        assert_close!(
            balanced_accuracy(&c).expect("rows"),
            0.7111111111111112,
            1e-12
        );
        assert_close!(macro_f1(&c).expect("rows"), 0.5423076923076924, 1e-12);
        assert_eq!(balanced_accuracy(&[]), None);
        assert_eq!(macro_f1(&[vec![0]]), None);
    }

    #[test]
    fn paired_t_matches_scipy_ttest_rel() {
        // python3 -c "
        // import numpy as np; from scipy import stats
        // a = np.array([0.81, 0.79, 0.86, 0.74, 0.80])
        // b = np.array([0.78, 0.80, 0.82, 0.70, 0.75])
        // r = stats.ttest_rel(a, b); ci = r.confidence_interval(0.95)
        // print(r.statistic, r.pvalue, ci.low, ci.high, (a - b).mean())"
        let a = [0.81, 0.79, 0.86, 0.74, 0.80];
        let b = [0.78, 0.80, 0.82, 0.70, 0.75];
        let r = paired_t(&a, &b);
        let t = r.computed().expect("five pairs");
        assert_close!(t.t, 2.8603877677367766, 1e-10);
        assert_close!(t.p_value, 0.045911512375314836, 1e-10);
        assert_close!(t.ci95.low, 0.0008803980720984705, 1e-9);
        assert_close!(t.ci95.high, 0.05911960192790158, 1e-9);
        assert_close!(t.mean_difference, 0.03, 1e-12);

        assert!(matches!(
            paired_t(&[0.5], &[0.4]),
            TestOutcome::NotEnough {
                n: 1,
                needed: 2,
                ..
            }
        ));
        assert!(matches!(
            paired_t(&[0.5, 0.6], &[0.4, 0.5]),
            TestOutcome::Undefined { .. }
        ));
    }

    #[test]
    fn wilcoxon_matches_scipy() {
        // python3 -c "
        // from scipy import stats
        // print(stats.wilcoxon([0.81,0.79,0.86,0.74,0.80], [0.78,0.80,0.82,0.70,0.75]))
        // print(stats.wilcoxon([1,2,3,4,5,6,7,8], [0.5,2.6,2.1,3,4.4,4.9,6,9.5]))
        // print(stats.wilcoxon([1,2,3,4,5,6], [0,3,2,5,4,4]))  # ties: permutation test
        // a, b = <the 30 values of `a` and `b` below, as Python lists>
        // print(stats.wilcoxon(a, b, method='asymptotic'))"
        let w = wilcoxon(
            &[0.81, 0.79, 0.86, 0.74, 0.80],
            &[0.78, 0.80, 0.82, 0.70, 0.75],
        );
        let w = w.computed().expect("five pairs");
        assert_eq!(
            (w.n, w.statistic, w.method),
            (5, 1.0, WilcoxonMethod::Exact)
        );
        assert_close!(w.p_value, 0.125, 1e-12);
        assert_close!(w.min_p_value, 0.0625, 1e-12);

        let w = wilcoxon(
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            &[0.5, 2.6, 2.1, 3.0, 4.4, 4.9, 6.0, 9.5],
        );
        let w = w.computed().expect("eight pairs");
        assert_eq!(w.statistic, 11.0);
        assert_close!(w.p_value, 0.3671875, 1e-12);

        let w = wilcoxon(
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            &[0.0, 3.0, 2.0, 5.0, 4.0, 4.0],
        );
        let w = w.computed().expect("six pairs with ties");
        assert_eq!(w.statistic, 6.0);
        assert_close!(w.p_value, 0.53125, 1e-12);

        let a = [
            1.1, -0.5, 0.8, 0.3, -1.2, 0.9, 0.4, -0.1, 2.0, 0.6, -0.7, 1.4, 0.2, -0.3, 0.5, 1.0,
            -1.5, 0.7, 0.1, -0.9, 1.3, 0.0, 0.8, -0.4, 0.6, 1.9, -0.2, 0.3, 0.4, -1.1,
        ];
        let b = [
            0.2, 0.1, -0.4, 0.9, -0.3, 0.5, -1.0, 0.6, 0.7, -0.8, 0.2, 0.4, -0.6, 0.3, 1.1, -0.2,
            0.0, 0.5, -0.7, 0.8, 0.2, -0.5, 1.2, 0.1, -0.9, 0.6, 0.4, -0.1, 0.9, 0.3,
        ];
        let w = wilcoxon(&a, &b);
        let w = w.computed().expect("thirty pairs");
        assert_eq!(w.method, WilcoxonMethod::Normal);
        assert_close!(w.statistic, W30_STATISTIC, 1e-12);
        assert_close!(w.p_value, W30_P, 1e-9);

        assert!(matches!(
            wilcoxon(&[0.5, 0.6], &[0.5, 0.6]),
            TestOutcome::NotEnough { n: 0, .. }
        ));
    }

    // scipy.stats.wilcoxon(a, b, method='asymptotic') of the 30 pairs above.
    const W30_STATISTIC: f64 = 195.5;
    const W30_P: f64 = 0.44648370370406243;

    fn job(rotation: usize, acc: Option<f64>, diag: u64) -> JobRecord {
        JobRecord {
            rotation,
            test_accuracy: acc,
            confusion: vec![vec![diag, 1], vec![1, diag]],
            epochs_trained: 3,
            best_epoch: 2,
            epochs: (1..=3)
                .map(|e| EpochPoint {
                    epoch: e,
                    val_accuracy: f64::from(e) / 10.0,
                    seconds: 2.0,
                    examples_per_second: 100.0,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn model_stats_flag_partial_grids_and_choose_the_epoch() {
        let jobs = [job(0, Some(0.8), 4), job(2, Some(0.6), 2), job(1, None, 0)];
        let best = model_stats("gru", "gru", &[0, 1, 2, 3], &jobs, EpochChoice::Best);
        assert_eq!((best.n_used, best.n_total, best.partial), (2, 4, true));
        assert_eq!(best.missing_rotations, vec![1, 3]);
        assert_eq!(best.rotations[0].chosen_epoch, Some(2));
        assert_close!(best.rotations[0].val_accuracy.expect("epoch 2"), 0.2, 1e-12);
        assert_close!(best.test_accuracy.as_ref().expect("two").mean, 0.7, 1e-12);
        assert_close!(
            best.rotations[0].balanced_accuracy.expect("rows"),
            0.8,
            1e-12
        );
        assert_close!(
            best.seconds_per_epoch.as_ref().expect("rows").mean,
            2.0,
            1e-12
        );

        let last = model_stats("gru", "gru", &[0, 1, 2, 3], &jobs, EpochChoice::Last);
        assert_eq!(last.rotations[0].chosen_epoch, Some(3));

        let other = model_stats(
            "rnn",
            "rnn",
            &[0, 1, 2, 3],
            &[job(0, Some(0.7), 3)],
            EpochChoice::Best,
        );
        let c = compare(&best, &other, Metric::TestAccuracy);
        assert_eq!(c.rotations, vec![0]);
        assert!(matches!(c.paired_t, TestOutcome::NotEnough { n: 1, .. }));
        assert_close!(c.mean_difference().expect("one pair"), 0.1, 1e-12);
        let json = serde_json::to_value(&c).expect("serialisable");
        assert_eq!(json["paired_t"]["status"], "not_enough");
    }
}

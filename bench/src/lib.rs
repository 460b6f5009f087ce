//! Pure helpers of the rotsweep benchmarks: order statistics for latency
//! samples ([`percentile`]) and the list-scheduling simulation behind
//! `rotsweep-schedsim` ([`sched`]). No I/O, no gRPC: the binaries in
//! `src/bin/` do that.

pub mod sched;

/// The `q`-quantile (0..=1) of `samples` by nearest rank, or `None` when
/// there are no samples. Sorts the slice in place.
pub fn percentile(samples: &mut [f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let q = q.clamp(0.0, 1.0);
    // Nearest rank: the smallest value with at least q of the samples at or
    // below it.
    let rank = (q * samples.len() as f64).ceil() as usize;
    Some(samples[rank.saturating_sub(1).min(samples.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let mut xs: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut xs, 0.5), Some(50.0));
        assert_eq!(percentile(&mut xs, 0.99), Some(99.0));
        assert_eq!(percentile(&mut xs, 1.0), Some(100.0));
        assert_eq!(percentile(&mut xs, 0.0), Some(1.0));
        assert_eq!(percentile(&mut [], 0.5), None);
        assert_eq!(percentile(&mut [7.0], 0.99), Some(7.0));
    }
}

//! Small helpers shared by the agent-side benchmarks: percentiles and CPU time of processes.

use crate::cluster::process_cpu_seconds;

/// Nearest-rank percentile of sorted samples, in the samples' unit; 0 when empty.
pub fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Rounds to two decimals, for reports people read.
pub fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// CPU seconds (user + system) process `pid` has used so far; `None` if it is gone.
pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    process_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds of this program.
pub fn own_cpu_seconds() -> Option<f64> {
    process_cpu_seconds("/proc/self/stat")
}

/// Cores used between two CPU readings `seconds` apart.
pub fn cores(before: Option<f64>, after: Option<f64>, seconds: f64) -> Option<f64> {
    let used = after? - before?;
    (seconds > 0.0).then(|| round2(used / seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.5), 50.0);
        assert_eq!(percentile(&samples, 0.99), 99.0);
        assert_eq!(percentile(&samples, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(cores(Some(1.0), Some(3.0), 4.0), Some(0.5));
        assert_eq!(cores(None, Some(3.0), 4.0), None);
    }
}

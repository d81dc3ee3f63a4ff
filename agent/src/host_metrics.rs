//! Host metrics for heartbeats: CPU utilisation, memory and load, all from `/proc`.

use serde::{Deserialize, Serialize};

use crate::procfs::{self, CpuTimes};

/// One sample of the host's load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostMetrics {
    /// Busy fraction of all CPUs since the previous sample, 0.0 to 1.0. `None` on the first
    /// sample, which has nothing to compare with.
    pub cpu_utilization: Option<f64>,
    /// CPUs the kernel schedules on.
    pub cpu_count: usize,
    pub memory_total_mb: u64,
    /// `MemAvailable`: what can be allocated without swapping, caches included.
    pub memory_available_mb: u64,
    pub load_1m: f64,
    pub load_5m: f64,
    pub load_15m: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum HostMetricsError {
    #[error("read {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("parse {path}: unexpected format")]
    Parse { path: &'static str },
}

/// Keeps the previous `/proc/stat` counters so each sample reports utilisation over the time
/// since the last one (the counters themselves only grow).
#[derive(Debug, Default)]
pub struct HostMetricsSampler {
    previous: Option<CpuTimes>,
}

impl HostMetricsSampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads `/proc/stat`, `/proc/meminfo` and `/proc/loadavg`.
    pub fn sample(&mut self) -> Result<HostMetrics, HostMetricsError> {
        let stat = read("/proc/stat")?;
        let meminfo = read("/proc/meminfo")?;
        let loadavg = read("/proc/loadavg")?;
        self.sample_from(&stat, &meminfo, &loadavg)
    }

    /// The pure half of [`sample`](Self::sample), for tests.
    pub fn sample_from(
        &mut self,
        stat: &str,
        meminfo: &str,
        loadavg: &str,
    ) -> Result<HostMetrics, HostMetricsError> {
        let cpu =
            procfs::parse_cpu_times(stat).ok_or(HostMetricsError::Parse { path: "/proc/stat" })?;
        let memory = procfs::parse_meminfo(meminfo).ok_or(HostMetricsError::Parse {
            path: "/proc/meminfo",
        })?;
        let [load_1m, load_5m, load_15m] =
            procfs::parse_loadavg(loadavg).ok_or(HostMetricsError::Parse {
                path: "/proc/loadavg",
            })?;
        let cpu_utilization = self
            .previous
            .replace(cpu)
            .and_then(|previous| cpu.utilization_since(&previous));
        Ok(HostMetrics {
            cpu_utilization,
            cpu_count: procfs::parse_cpu_count(stat),
            memory_total_mb: memory.total_kib / 1024,
            memory_available_mb: memory.available_kib / 1024,
            load_1m,
            load_5m,
            load_15m,
        })
    }
}

fn read(path: &'static str) -> Result<String, HostMetricsError> {
    procfs::read_to_string(path).map_err(|source| HostMetricsError::Read { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal: 2097152 kB\nMemAvailable: 1048576 kB\n";
    const LOADAVG: &str = "0.10 0.20 0.30 1/99 123\n";

    #[test]
    fn first_sample_has_no_utilization_then_deltas() {
        let mut sampler = HostMetricsSampler::new();
        let first = sampler
            .sample_from("cpu  0 0 0 100 0 0 0 0\ncpu0 0\ncpu1 0\n", MEMINFO, LOADAVG)
            .expect("sample");
        assert_eq!(first.cpu_utilization, None);
        assert_eq!(first.cpu_count, 2);
        assert_eq!(first.memory_total_mb, 2048);
        assert_eq!(first.memory_available_mb, 1024);
        assert_eq!(
            (first.load_1m, first.load_5m, first.load_15m),
            (0.1, 0.2, 0.3)
        );

        let second = sampler
            .sample_from("cpu  75 0 0 125 0 0 0 0\n", MEMINFO, LOADAVG)
            .expect("sample");
        assert_eq!(second.cpu_utilization, Some(0.75));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut sampler = HostMetricsSampler::new();
        assert!(sampler.sample_from("nonsense", MEMINFO, LOADAVG).is_err());
        assert!(sampler.sample_from("cpu  1 2 3 4\n", "", LOADAVG).is_err());
        assert!(sampler.sample_from("cpu  1 2 3 4\n", MEMINFO, "x").is_err());
    }

    #[test]
    fn samples_this_host() {
        let mut sampler = HostMetricsSampler::new();
        let metrics = sampler.sample().expect("sample /proc");
        assert!(metrics.cpu_count >= 1);
        assert!(metrics.memory_total_mb > 0);
        assert!(metrics.memory_available_mb <= metrics.memory_total_mb);
    }
}

//! Write throughput and latency: N concurrent clients, each a loop of sequential writes over
//! its own keep-alive connection, spread round-robin over the endpoints.
//!
//! A run is a warm-up (writes sent but not counted, so connection set-up and the first
//! SQLite/bbolt page faults stay out of the figures) followed by the measured window. A write
//! counts in the window it completes in; latencies are those of successful writes only.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::system::Writer;

/// How long one write may take before it counts as an error. Generous, because during the
/// measured window a slow write is a result, not a failure.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct WritesConfig {
    /// Plain HTTP or TLS, as the cluster serves.
    pub transport: strata_api::tls::Transport,
    pub clients: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct WritesReport {
    pub system: &'static str,
    pub clients: usize,
    pub duration_s: f64,
    pub writes: u64,
    pub errors: u64,
    pub writes_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU seconds the cluster's processes used during the run (warm-up included), when the
    /// benchmark owns the cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_s: Option<f64>,
    /// CPU seconds the load generator itself used (it shares the machine with the cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu_s: Option<f64>,
    /// Up to five distinct error messages, to tell a timeout from a rejected write.
    pub error_samples: Vec<String>,
}

/// What one client saw in the measured window.
#[derive(Default)]
struct ClientResult {
    latencies_us: Vec<u32>,
    errors: u64,
    error_samples: Vec<String>,
}

pub async fn run(
    writer: &Writer,
    endpoints: &[String],
    config: &WritesConfig,
) -> Result<WritesReport> {
    anyhow::ensure!(!endpoints.is_empty(), "no endpoints to write to");
    anyhow::ensure!(config.clients > 0, "at least one client is needed");
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let measure_until = measure_from + config.duration;

    let mut tasks = Vec::with_capacity(config.clients);
    for client in 0..config.clients {
        // One reqwest::Client per task: its own pool, so its own keep-alive connection.
        let http = config
            .transport
            .apply(
                reqwest::Client::builder()
                    .timeout(WRITE_TIMEOUT)
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(1),
            )
            .build()
            .context("build HTTP client")?;
        let endpoint = endpoints[client % endpoints.len()].clone();
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let mut result = ClientResult::default();
            let mut seq: u64 = 0;
            loop {
                let sent = Instant::now();
                if sent >= measure_until {
                    break;
                }
                let outcome = writer.write(&http, &endpoint, client, seq).await;
                seq += 1;
                let done = Instant::now();
                if done < measure_from || done > measure_until {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        let micros = (done - sent).as_micros();
                        result
                            .latencies_us
                            .push(u32::try_from(micros).unwrap_or(u32::MAX));
                    }
                    Err(error) => {
                        result.errors += 1;
                        let text = format!("{error:#}");
                        if result.error_samples.len() < 5 && !result.error_samples.contains(&text) {
                            result.error_samples.push(text);
                        }
                        // A failing system answers fast; don't turn the client into a busy loop.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            result
        }));
    }

    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0;
    let mut error_samples: Vec<String> = Vec::new();
    for task in tasks {
        let result = task.await.context("join write client")?;
        latencies.extend_from_slice(&result.latencies_us);
        errors += result.errors;
        for sample in result.error_samples {
            if error_samples.len() < 5 && !error_samples.contains(&sample) {
                error_samples.push(sample);
            }
        }
    }
    latencies.sort_unstable();
    let writes = latencies.len() as u64;
    let seconds = config.duration.as_secs_f64();
    Ok(WritesReport {
        system: writer.system().name(),
        clients: config.clients,
        duration_s: seconds,
        writes,
        errors,
        writes_per_sec: round2(writes as f64 / seconds),
        p50_ms: percentile_ms(&latencies, 0.50),
        p90_ms: percentile_ms(&latencies, 0.90),
        p99_ms: percentile_ms(&latencies, 0.99),
        max_ms: percentile_ms(&latencies, 1.0),
        server_cpu_s: None,
        client_cpu_s: None,
        error_samples,
    })
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds; 0 when empty.
fn percentile_ms(sorted_us: &[u32], quantile: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (quantile * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    round2(f64::from(sorted_us[index]) / 1000.0)
}

pub fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&samples, 0.50), 50.0);
        assert_eq!(percentile_ms(&samples, 0.99), 99.0);
        assert_eq!(percentile_ms(&samples, 1.0), 100.0);
        assert_eq!(percentile_ms(&[1500], 0.5), 1.5);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }
}

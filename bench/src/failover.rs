//! Leader failover time: `kill -9` the leader, then write to the survivors until a write is
//! acknowledged. One sample is the time from the signal to that acknowledgement, so it covers
//! failure detection, the election, and the new leader's first commit.
//!
//! Between kills the killed member is restarted and the benchmark waits until it has applied
//! everything the leader had committed, so every kill starts from a healthy 3-member group.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cluster::{probe_client, Cluster};
use crate::system::Writer;
use crate::writes::round2;

/// Per-write timeout while probing for the new leader: a write that hangs on a member still
/// waiting for an election is abandoned and the next survivor is tried.
const WRITE_TIMEOUT: Duration = Duration::from_millis(300);
/// A new write attempt starts this often while none has succeeded: the samples' resolution.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// Bounds the attempts in flight (`WRITE_TIMEOUT / PROBE_INTERVAL` would be reached anyway).
const MAX_ATTEMPTS_IN_FLIGHT: usize = 16;
/// A failover slower than this is reported as an error rather than waited for.
const FAILOVER_LIMIT: Duration = Duration::from_secs(30);
/// How long a restarted member may take to rejoin and catch up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// Client id used for the failover writes; far from the load clients' ids so keys never clash.
const FAILOVER_CLIENT: usize = 1000;

#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    pub system: &'static str,
    pub kills: usize,
    pub samples_ms: Vec<f64>,
    pub median_ms: f64,
    pub max_ms: f64,
    /// Write attempts that failed (timeout or error) before the first success, per kill.
    pub failed_writes: Vec<u64>,
}

pub async fn run(cluster: &mut Cluster, writer: &Writer, kills: usize) -> Result<FailoverReport> {
    let system = cluster.system.name();
    let http = reqwest::Client::builder()
        .timeout(WRITE_TIMEOUT)
        .connect_timeout(WRITE_TIMEOUT)
        .tcp_nodelay(true)
        .build()
        .context("build HTTP client")?;
    let mut samples_ms = Vec::with_capacity(kills);
    let mut failed_writes = Vec::with_capacity(kills);
    let mut seq: u64 = 0;
    for kill in 1..=kills {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
        let survivors: Vec<String> = cluster
            .members
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != leader)
            .map(|(_, member)| member.endpoint.clone())
            .collect();
        let killed_at = cluster.kill(leader).await?;

        let (elapsed, failures) = first_success(writer, &http, &survivors, &mut seq, killed_at)
            .await
            .with_context(|| format!("{system}: kill {kill}"))?;
        let ms = round2(elapsed.as_secs_f64() * 1000.0);
        eprintln!(
            "[{system}] kill {kill}/{kills}: member {} was leader, write succeeded after {ms} ms ({failures} failed attempts)",
            cluster.members[leader].node_id
        );
        samples_ms.push(ms);
        failed_writes.push(failures);

        cluster.restart(leader)?;
        wait_caught_up(cluster, leader).await?;
    }
    let mut sorted = samples_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FailoverReport {
        system,
        kills,
        median_ms: median(&sorted),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        samples_ms,
        failed_writes,
    })
}

/// Starts a write to the next survivor every `PROBE_INTERVAL`, each with its own short
/// timeout, and returns the time from the kill to the first acknowledged one along with the
/// number of attempts that failed before it. Overlapping attempts keep the resolution at the
/// interval: with one attempt at a time a write that hangs until its timeout just as the new
/// leader takes over would add up to a whole timeout to the sample.
async fn first_success(
    writer: &Writer,
    http: &reqwest::Client,
    survivors: &[String],
    seq: &mut u64,
    killed_at: Instant,
) -> Result<(Duration, u64)> {
    let mut attempts = tokio::task::JoinSet::new();
    let mut failures: u64 = 0;
    let mut next_attempt = tokio::time::interval(PROBE_INTERVAL);
    next_attempt.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if killed_at.elapsed() > FAILOVER_LIMIT {
            bail!("no write succeeded within {FAILOVER_LIMIT:?} of killing the leader");
        }
        tokio::select! {
            _ = next_attempt.tick(), if attempts.len() < MAX_ATTEMPTS_IN_FLIGHT => {
                let endpoint = survivors[*seq as usize % survivors.len()].clone();
                let (writer, http, this_seq) = (writer.clone(), http.clone(), *seq);
                *seq += 1;
                attempts.spawn(async move {
                    writer.write(&http, &endpoint, FAILOVER_CLIENT, this_seq).await
                });
            }
            Some(done) = attempts.join_next() => {
                match done.context("join write attempt")? {
                    // Dropping the JoinSet aborts the attempts still in flight.
                    Ok(()) => return Ok((killed_at.elapsed(), failures)),
                    Err(_) => failures += 1,
                }
            }
        }
    }
}

/// Waits until the restarted member follows a leader and has applied at least what that
/// leader had committed when the member came back.
async fn wait_caught_up(cluster: &mut Cluster, restarted: usize) -> Result<()> {
    let http = probe_client()?;
    let deadline = Instant::now() + CATCH_UP_LIMIT;
    let mut target: Option<u64> = None;
    let mut last_problem = String::from("no answer yet");
    while Instant::now() < deadline {
        cluster.check_alive()?;
        match catch_up_step(cluster, &http, restarted, &mut target).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(problem) => last_problem = format!("{problem:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{}: member {} did not catch up within {CATCH_UP_LIMIT:?}: {last_problem}",
        cluster.system.name(),
        cluster.members[restarted].node_id
    )
}

async fn catch_up_step(
    cluster: &Cluster,
    http: &reqwest::Client,
    restarted: usize,
    target: &mut Option<u64>,
) -> Result<bool> {
    let leader = cluster.current_leader(http).await?;
    if target.is_none() {
        *target = Some(cluster.probe(http, leader).await?.commit_index);
    }
    let own = cluster.probe(http, restarted).await?;
    Ok(own.leader.is_some() && Some(own.applied_index) >= *target)
}

/// Median of sorted samples (mean of the middle two for an even count); 0 when empty.
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => round2((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }
}

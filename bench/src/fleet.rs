//! Fleet-scale state through the real API and Raft: `--nodes` simulated agents heartbeating at
//! 1 Hz (`heartbeats::Fleet` in echo mode: every assigned instance is reported Running and
//! healthy at the next heartbeat, as if it started at once), and `--tiers` tiers of
//! `--instances-per-tier` instances placed on them by the real scheduler, against a 3-member
//! cluster the benchmark starts. Defaults: 10,000 nodes, 5,000 tiers × 20 = 100,000 instances
//! (Kubernetes plans for 5,000 nodes and 150,000 pods).
//!
//! Reported, once every instance is Running: a planner round's time (`strata_plan_micros` of
//! the leader, sampled once a second over `--window`), the snapshot's size and build time (one
//! snapshot triggered by writes past `--snapshot-logs`), a restarted follower's time to serve
//! (kill -9, restart, until it has applied what the leader had), a lagging follower's
//! catch-up time (killed while `--lag-writes` writes land, then restarted), heartbeat round
//! trips in the window, and the leader's RSS (now and peak).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_api::Resources;

use crate::cluster::{probe_client, Binaries, Cluster, STRATA_ADMIN_TOKEN};
use crate::heartbeats::Fleet;
use crate::stats::{percentile, round2};
use crate::system::System;

pub const TARGET_ROUND_MS: f64 = 100.0;
pub const TARGET_RESTART_S: f64 = 5.0;
pub const TARGET_RSS_MIB: f64 = 2048.0;

#[derive(clap::Args)]
pub struct FleetArgs {
    /// Simulated agents (nodes) [default: 10000, smoke 200].
    #[arg(long)]
    nodes: Option<usize>,
    /// Tiers [default: 5000, smoke 100].
    #[arg(long)]
    tiers: Option<usize>,
    #[arg(long, default_value_t = 20)]
    instances_per_tier: u32,
    /// Steady-state window in which planner rounds and heartbeats are sampled [default: 30s,
    /// smoke 5s].
    #[arg(long)]
    window: Option<strata_api::Duration>,
    /// Writes made while a follower is down, for the catch-up figure [default: 5000, smoke 200].
    #[arg(long)]
    lag_writes: Option<usize>,
    /// Heartbeat requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pool: usize,
    /// Small and quick, for CI: 200 nodes, 100 tiers.
    #[arg(long)]
    smoke: bool,
    /// strata-controller binary [default: next to this program, else target/release, else
    /// target/debug].
    #[arg(long)]
    strata_bin: Option<std::path::PathBuf>,
    #[arg(long)]
    keep_dir: bool,
}

#[derive(Debug, Serialize)]
pub struct FleetReport {
    pub nodes: usize,
    pub tiers: usize,
    pub instances: u64,
    /// From the first tier write to every instance Running.
    pub build_s: f64,
    /// A round's wall time, which on a machine shared with the simulator also counts
    /// waiting for a core.
    pub round_p50_ms: f64,
    pub round_max_ms: f64,
    /// A round's CPU time (`strata_plan_cpu_micros`).
    pub round_cpu_p50_ms: f64,
    pub snapshot_bytes: u64,
    pub snapshot_build_ms: f64,
    pub restart_to_serve_s: f64,
    pub catch_up_s: f64,
    pub lag_writes: usize,
    pub lag_entries: u64,
    pub heartbeat_p50_ms: f64,
    pub heartbeat_p99_ms: f64,
    pub heartbeat_errors: u64,
    pub leader_rss_mib: f64,
    pub leader_peak_rss_mib: f64,
    pub targets: String,
    pub targets_met: bool,
    pub smoke: bool,
    pub load_average_at_start: Option<[f64; 3]>,
}

pub async fn run_cli(args: FleetArgs) -> Result<FleetReport> {
    let smoke = args.smoke;
    let nodes = args.nodes.unwrap_or(if smoke { 200 } else { 10_000 });
    let tiers = args.tiers.unwrap_or(if smoke { 100 } else { 5_000 });
    let window = args
        .window
        .map_or(Duration::from_secs(if smoke { 5 } else { 30 }), |d| {
            d.as_std()
        });
    let lag_writes = args.lag_writes.unwrap_or(if smoke { 200 } else { 5_000 });
    let binaries = Binaries {
        strata: args
            .strata_bin
            .clone()
            .unwrap_or_else(crate::default_strata_bin),
        etcd: "etcd".into(),
    };
    let load_average_at_start = crate::load_average();
    // A generous grace: a simulated node must not flap while the benchmark loads the machine
    // it shares with the cluster. Snapshots at the default 5,000 entries.
    // Room for every tier of the run (the default --max-tiers is 1,000).
    let extra = [
        "--heartbeat-grace".to_string(),
        "15s".to_string(),
        "--max-tiers".to_string(),
        tiers.max(1000).to_string(),
    ];
    eprintln!(
        "[fleet] {nodes} nodes, {tiers} tiers x {}: starting a 3-member cluster",
        args.instances_per_tier
    );
    let mut cluster =
        Cluster::start_with_args(System::Strata, &binaries, args.keep_dir, &extra).await?;
    let result = measure(
        &mut cluster,
        nodes,
        tiers,
        args.instances_per_tier,
        window,
        lag_writes,
        args.pool,
    )
    .await;
    if result.is_err() {
        if let Some(dir) = cluster.data_dir() {
            eprintln!("[fleet] failed; logs were in {}", dir.display());
        }
    }
    cluster.shutdown().await;
    let mut report = result?;
    report.smoke = smoke;
    report.load_average_at_start = load_average_at_start;
    Ok(report)
}

async fn measure(
    cluster: &mut Cluster,
    nodes: usize,
    tiers: usize,
    per_tier: u32,
    window: Duration,
    lag_writes: usize,
    pool: usize,
) -> Result<FleetReport> {
    let http = probe_client()?;
    let leader = cluster.wait_for_leader(Duration::from_secs(60)).await?;
    // Room for the instances with headroom, so placement never runs out.
    let per_node = (tiers as u64 * u64::from(per_tier))
        .div_ceil(nodes as u64)
        .max(1);
    let capacity = Resources {
        cpu: (per_node * 2) as f64 * TEMPLATE_CPU,
        memory_mb: per_node * 2 * TEMPLATE_MEMORY_MB,
    };
    let fleet = Fleet::start(
        cluster,
        leader,
        nodes,
        Duration::from_secs(1),
        pool,
        Duration::from_secs(5),
        Some(capacity),
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while fleet
        .shared
        .registered
        .load(std::sync::atomic::Ordering::Relaxed)
        < nodes
    {
        if fleet
            .shared
            .registration_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            bail!("some simulated nodes could not register");
        }
        if Instant::now() > deadline {
            bail!("the simulated nodes did not all register in time");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("[fleet] {nodes} nodes registered; creating {tiers} tiers");

    let leader_endpoint = cluster.endpoints()[leader].clone();
    let build_started = Instant::now();
    write_tiers(&leader_endpoint, tiers, per_tier, None, 64).await?;
    let instances = tiers as u64 * u64::from(per_tier);
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let metrics = metrics_of(&http, &leader_endpoint).await?;
        let running = metric(&metrics, "strata_instances{phase=\"Running\"}").unwrap_or(0.0) as u64;
        if running >= instances {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {running} of {instances} instances Running after 30 minutes");
        }
        eprintln!("[fleet] {running}/{instances} instances Running");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let build_s = round2(build_started.elapsed().as_secs_f64());
    eprintln!("[fleet] every instance Running after {build_s} s; sampling for {window:?}");

    // Steady state: planner rounds and heartbeats.
    let window_from_us = fleet.shared.epoch_elapsed_us();
    let mut rounds_ms = Vec::new();
    let mut rounds_cpu_ms = Vec::new();
    let window_end = Instant::now() + window;
    while Instant::now() < window_end {
        let metrics = metrics_of(&http, &leader_endpoint).await?;
        if let Some(micros) = metric(&metrics, "strata_plan_micros{round=\"last\"}") {
            rounds_ms.push(micros / 1000.0);
        }
        if let Some(micros) = metric(&metrics, "strata_plan_cpu_micros") {
            rounds_cpu_ms.push(micros / 1000.0);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let window_to_us = fleet.shared.epoch_elapsed_us();
    let metrics = metrics_of(&http, &leader_endpoint).await?;
    let round_max_ms =
        metric(&metrics, "strata_plan_micros{round=\"max\"}").unwrap_or(0.0) / 1000.0;
    let mut snapshot_bytes = metric(&metrics, "strata_snapshot_bytes").unwrap_or(0.0) as u64;
    let mut snapshot_micros = metric(&metrics, "strata_snapshot_build_micros").unwrap_or(0.0);
    let leader_pid = cluster.members[leader].pid();
    let (leader_rss_mib, leader_peak_rss_mib) = leader_pid.map_or((0.0, 0.0), rss_mib);

    // A restarted follower: kill -9, restart, until it has applied what the leader had.
    let follower = (0..3)
        .find(|index| *index != leader)
        .context("a follower")?;
    cluster.kill(follower).await?;
    let target = applied_index(&http, &leader_endpoint).await?;
    let restarted = Instant::now();
    cluster.restart(follower)?;
    wait_applied(&http, &cluster.endpoints()[follower], target).await?;
    let restart_to_serve_s = round2(restarted.elapsed().as_secs_f64());
    eprintln!("[fleet] a restarted follower served again after {restart_to_serve_s} s");

    // A lagging follower: down while writes land, then restarted.
    let before = applied_index(&http, &leader_endpoint).await?;
    cluster.kill(follower).await?;
    // One writer, so each write is its own entry and the follower falls that many behind
    // (past the log a snapshot keeps, so it catches up through a snapshot).
    write_tiers(
        &leader_endpoint,
        lag_writes.min(tiers).max(1),
        per_tier,
        Some(lag_writes),
        1,
    )
    .await?;
    let target = applied_index(&http, &leader_endpoint).await?;
    let restarted = Instant::now();
    cluster.restart(follower)?;
    wait_applied(&http, &cluster.endpoints()[follower], target).await?;
    let catch_up_s = round2(restarted.elapsed().as_secs_f64());
    eprintln!(
        "[fleet] a follower {} entries behind caught up in {catch_up_s} s",
        target - before
    );
    if snapshot_bytes == 0 {
        // No snapshot in the build-up: take the follower's figures, or report none.
        let metrics = metrics_of(&http, &leader_endpoint).await?;
        snapshot_bytes = metric(&metrics, "strata_snapshot_bytes").unwrap_or(0.0) as u64;
        snapshot_micros = metric(&metrics, "strata_snapshot_build_micros").unwrap_or(0.0);
    }

    let logs = fleet.stop().await;
    let mut rtts: Vec<f64> = logs
        .iter()
        .flat_map(|log| log.samples.iter())
        .filter(|sample| (window_from_us..window_to_us).contains(&sample.done_us))
        .map(|sample| f64::from(sample.rtt_us))
        .collect();
    rtts.sort_by(f64::total_cmp);
    let heartbeat_errors = logs
        .iter()
        .flat_map(|log| log.errors_at_us.iter())
        .filter(|at| (window_from_us..window_to_us).contains(*at))
        .count() as u64;
    rounds_ms.sort_by(f64::total_cmp);
    let round_p50_ms = round2(rounds_ms.get(rounds_ms.len() / 2).copied().unwrap_or(0.0));
    rounds_cpu_ms.sort_by(f64::total_cmp);
    let round_cpu_p50_ms = round2(
        rounds_cpu_ms
            .get(rounds_cpu_ms.len() / 2)
            .copied()
            .unwrap_or(0.0),
    );
    let targets_met = round_p50_ms < TARGET_ROUND_MS
        && restart_to_serve_s < TARGET_RESTART_S
        && leader_peak_rss_mib < TARGET_RSS_MIB;
    Ok(FleetReport {
        nodes,
        tiers,
        instances,
        build_s,
        round_p50_ms,
        round_max_ms: round2(round_max_ms),
        round_cpu_p50_ms,
        snapshot_bytes,
        snapshot_build_ms: round2(snapshot_micros / 1000.0),
        restart_to_serve_s,
        catch_up_s,
        lag_writes,
        lag_entries: target - before,
        heartbeat_p50_ms: round2(percentile(&rtts, 0.50) / 1000.0),
        heartbeat_p99_ms: round2(percentile(&rtts, 0.99) / 1000.0),
        heartbeat_errors,
        leader_rss_mib,
        leader_peak_rss_mib,
        targets: format!(
            "planner round p50 under {TARGET_ROUND_MS} ms, restart under {TARGET_RESTART_S} s, \
             leader RSS under {TARGET_RSS_MIB} MiB"
        ),
        targets_met,
        smoke: false,
        load_average_at_start: None,
    })
}

/// The tiers' template: the smallest reservation a template may ask.
const TEMPLATE_CPU: f64 = 0.1;
const TEMPLATE_MEMORY_MB: u64 = 16;

/// Creates (or, with `rewrites`, rewrites that many times in turn) tiers `fleet-0..count`,
/// `writers` at a time.
async fn write_tiers(
    endpoint: &str,
    count: usize,
    per_tier: u32,
    rewrites: Option<usize>,
    writers: usize,
) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()?;
    let total = rewrites.unwrap_or(count);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..writers {
        let (http, endpoint, next) = (http.clone(), endpoint.to_string(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(());
                }
                let name = format!("fleet-{}", n % count);
                // A rewrite changes only the tier's maximum, which moves no instance.
                let max = per_tier + (n / count) as u32 % 2;
                let body = format!(
                    r#"{{"name":"{name}","template":{{"driver":"process","command":["strata-workload"],"cpu":{TEMPLATE_CPU},"memory_mb":{TEMPLATE_MEMORY_MB}}},"scaling":{{"min":{per_tier},"max":{max}}}}}"#
                );
                let response = http
                    .put(format!("{endpoint}/v1/tiers/{name}"))
                    .bearer_auth(STRATA_ADMIN_TOKEN)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!(
                        "PUT {name}: {} {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    );
                }
            }
        }));
    }
    for worker in workers {
        worker.await.context("join tier writer")??;
    }
    Ok(())
}

async fn metrics_of(http: &reqwest::Client, endpoint: &str) -> Result<String> {
    let response = http
        .get(format!("{endpoint}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .context("GET /metrics")?;
    Ok(response.text().await?)
}

/// The value of the sample line that starts with `name ` (labels included in `name`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

async fn applied_index(http: &reqwest::Client, endpoint: &str) -> Result<u64> {
    let metrics = metrics_of(http, endpoint).await?;
    metric(&metrics, "strata_raft_applied_index")
        .map(|value| value as u64)
        .context("no strata_raft_applied_index")
}

async fn wait_applied(http: &reqwest::Client, endpoint: &str, index: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(applied) = applied_index(http, endpoint).await {
            if applied >= index {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{endpoint} did not apply index {index} in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// VmRSS and VmHWM of `pid`, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| round2(kb / 1024.0))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

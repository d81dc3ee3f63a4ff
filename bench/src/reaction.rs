//! `strata-bench reaction`: the autoscaler's reaction time end to end. A controller, a worker
//! agent running real `strata-workload` instances and an LB agent running HAProxy; a tier at
//! its `min` of 2 with a target-tracking CPU policy. Each step starts `wrk` through HAProxy
//! (CPU-heavy requests, `?work_ms=`), and the reaction time is the time from the start of the
//! load to the first request HAProxy routes to an instance that did not exist before the step,
//! seen by a probe that sends a request through HAProxy every 20 ms (this program's clock, the
//! same for both ends). It covers the whole chain: CPU measured by the agents, the windows and
//! the planner on the leader, the Raft commit, placement, process start, the health check and
//! the pool change reaching HAProxy. Then the load stops and the tier scales back in to 2 (after
//! its stabilization window) before the next step.
//!
//! Results go to stdout as JSON, progress to stderr. Nothing here judges a figure in CI.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::Method;
use serde::Serialize;
use serde_json::json;
use strata_api::{Instance, ItemList, PoolView, ServerState, Tier};

use crate::local::{LocalConfig, LocalEnv};
use crate::stats::{percentile, round2};

/// The target for the p50 reaction time.
const TARGET_P50_MS: f64 = 10_000.0;

#[derive(Args, Clone, Debug)]
pub struct ReactionArgs {
    /// Load steps; the report gives their p50 [default: 5, smoke 1].
    #[arg(long)]
    steps: Option<usize>,
    /// Short CI mode: one step.
    #[arg(long)]
    smoke: bool,
    /// CPU each request burns in the workload, in ms.
    #[arg(long, default_value_t = 20)]
    work_ms: u64,
    /// wrk connections (each keeps one request in flight, so about this many cores of demand).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// The policy's reaction time (how much of the metric a decision averages).
    #[arg(long, default_value = "5s")]
    reaction_time: strata_api::Duration,
    /// The tier's scale-in stabilization window, waited out between steps.
    #[arg(long, default_value = "10s")]
    stabilization: strata_api::Duration,
    #[arg(long)]
    strata_bin: Option<PathBuf>,
    /// strata-agent [default: next to strata-controller].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// strata-workload [default: next to strata-controller].
    #[arg(long)]
    workload_bin: Option<PathBuf>,
    #[arg(long, default_value = "haproxy")]
    haproxy_bin: PathBuf,
    #[arg(long, default_value = "wrk")]
    wrk_bin: PathBuf,
    #[arg(long)]
    keep_dir: bool,
}

#[derive(Debug, Serialize)]
pub struct ReactionReport {
    pub steps: usize,
    /// From the load's start to the first request a new instance served, per step.
    pub reaction_ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    /// From the load's start to the autoscaler's first scale-out decision (its event), per
    /// step: the share of the reaction the metric pipeline and the planner take.
    pub decision_ms: Vec<f64>,
    /// The instance count each step's first decision asked for.
    pub scaled_to: Vec<u64>,
    pub policy: serde_json::Value,
    pub work_ms: u64,
    pub connections: usize,
    pub target: String,
    pub target_met: bool,
    pub smoke: bool,
    pub load_average_at_start: Option<[f64; 3]>,
}

pub async fn run_cli(args: ReactionArgs) -> Result<ReactionReport> {
    let controller_bin = args
        .strata_bin
        .clone()
        .unwrap_or_else(crate::default_strata_bin);
    let sibling = |name: &str| controller_bin.with_file_name(name);
    let agent_bin = args
        .agent_bin
        .clone()
        .unwrap_or_else(|| sibling("strata-agent"));
    let workload_bin = args
        .workload_bin
        .clone()
        .unwrap_or_else(|| sibling("strata-workload"));
    // The agent starts instances in their own directories: the command must be absolute.
    let workload_bin = workload_bin
        .canonicalize()
        .with_context(|| format!("find {}", workload_bin.display()))?;
    let steps = args.steps.unwrap_or(if args.smoke { 1 } else { 5 });
    let load_average_at_start = crate::load_average();
    let config = LocalConfig {
        controller_bin,
        agent_bin,
        heartbeat_interval: Duration::from_secs(1),
        reconcile_interval: None,
        keep_dir: args.keep_dir,
        worker: true,
        balancers: Some((args.haproxy_bin.clone(), 1)),
    };
    // Declared before the environment, so it runs after the environment has killed the LB
    // agent (which would otherwise start HAProxy again).
    let mut reaper = HaproxyReaper::default();
    let mut env = LocalEnv::start(&config).await?;
    reaper.dir = Some(env.dir().to_path_buf());
    let listen = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("pick a free port")?;
        listener.local_addr()?.to_string()
    };
    let policy = json!({
        "metric": "cpu_utilization",
        "target": 50,
        "reaction_time": args.reaction_time.to_string(),
    });
    let tier = json!({
        "name": "react",
        "template": {
            "driver": "process",
            "command": [workload_bin.display().to_string()],
            "cpu": 0.1,
            "memory_mb": 64,
        },
        "health": {
            "path": "/healthz",
            "interval": "250ms",
            "timeout": "250ms",
            "healthy_threshold": 1,
            "unhealthy_threshold": 3,
            "grace_period": "5s",
        },
        "scaling": {
            "min": 2,
            "max": 8,
            "policies": [policy],
            "scale_in_stabilization": args.stabilization.to_string(),
        },
        "load_balancer": {"listen": listen, "slowstart": "0s", "drain_timeout": "5s"},
    });
    env.api.send(Method::PUT, "/v1/tiers/react", &tier).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let url = format!("http://{listen}/");
    let mut reaction_ms = Vec::new();
    let mut decision_ms = Vec::new();
    let mut scaled_to = Vec::new();
    for step in 1..=steps {
        let before = settle(&mut env, &http, &url, 2).await?;
        let decisions_before = scale_outs(&env).await?.len();
        // Idle for a moment, so the policy's window holds only idle samples.
        tokio::time::sleep(args.reaction_time.as_std()).await;
        eprintln!("[reaction] step {step}/{steps}: load on");
        let started = Instant::now();
        let started_ms = now_ms();
        let mut wrk = tokio::process::Command::new(&args.wrk_bin)
            .args([
                "-t1",
                &format!("-c{}", args.connections),
                "-d60s",
                &format!("{url}?work_ms={}", args.work_ms),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "run {} (deploy/install-deps.sh installs wrk)",
                    args.wrk_bin.display()
                )
            })?;
        let reacted = loop {
            if started.elapsed() > Duration::from_secs(60) {
                let _ = wrk.kill().await;
                bail!("no new instance served within 60 s of the load step");
            }
            if let Ok(answer) = http.get(&url).send().await {
                if let Ok(body) = answer.json::<serde_json::Value>().await {
                    let id = body["instance_id"].as_str().unwrap_or("").to_string();
                    if !id.is_empty() && !before.contains(&id) {
                        break started.elapsed();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = wrk.kill().await;
        let _ = wrk.wait().await;
        let decisions = scale_outs(&env).await?;
        let first = decisions.get(decisions_before);
        let decided = first
            .and_then(|event| event["at_ms"].as_u64())
            .map_or(0.0, |at| at.saturating_sub(started_ms) as f64);
        let to = first
            .and_then(|event| event["scaling"]["to"].as_u64())
            .unwrap_or(0);
        let ms = round2(reacted.as_secs_f64() * 1000.0);
        eprintln!("[reaction] step {step}: decision after {decided} ms (to {to}), a new instance served after {ms} ms");
        reaction_ms.push(ms);
        decision_ms.push(decided);
        scaled_to.push(to);
    }
    let mut sorted = reaction_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let p50_ms = percentile(&sorted, 0.5);
    Ok(ReactionReport {
        steps,
        p50_ms,
        max_ms: sorted.last().copied().unwrap_or(0.0),
        reaction_ms,
        decision_ms,
        scaled_to,
        policy,
        work_ms: args.work_ms,
        connections: args.connections,
        target: format!("p50 under {} s", TARGET_P50_MS / 1000.0),
        target_met: p50_ms < TARGET_P50_MS,
        smoke: args.smoke,
        load_average_at_start,
    })
}

/// Waits until the tier runs exactly `count` instances, all in its pool and served through
/// HAProxy; returns their ids.
async fn settle(
    env: &mut LocalEnv,
    http: &reqwest::Client,
    url: &str,
    count: usize,
) -> Result<BTreeSet<String>> {
    let ids = env
        .wait(
            &format!("the tier to settle at {count}"),
            Duration::from_secs(180),
            |api| async move {
                let tier: Tier = api.get("/v1/tiers/react").await?;
                let instances: ItemList<Instance> = api.get("/v1/tiers/react/instances").await?;
                let pool: PoolView = api.get("/v1/tiers/react/pool").await?;
                let live: BTreeSet<String> = instances
                    .items
                    .iter()
                    .filter(|i| i.phase.is_live())
                    .map(|i| i.id.to_string())
                    .collect();
                let ready = pool
                    .pool
                    .servers
                    .iter()
                    .filter(|s| s.state == ServerState::Ready)
                    .count();
                let served = pool
                    .balancers
                    .iter()
                    .all(|b| b.report.version == pool.pool.version);
                Ok((tier.status.desired as usize == count
                    && live.len() == count
                    && ready == count
                    && pool.pool.servers.len() == count
                    && !pool.balancers.is_empty()
                    && served)
                    .then_some(live))
            },
        )
        .await?;
    // HAProxy answers through the frontend.
    for _ in 0..50 {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|answer| answer.status().is_success())
        {
            return Ok(ids);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("HAProxy does not serve {url}")
}

async fn scale_outs(env: &LocalEnv) -> Result<Vec<serde_json::Value>> {
    let events: serde_json::Value = env.api.get("/v1/events?object=tier/react").await?;
    Ok(events["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|event| event["reason"] == "ScaledOut")
        .collect())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Kills, on drop, every HAProxy whose command line names `dir`: the LB agent runs HAProxy in
/// its own process group with its working directory elsewhere, so a killed agent leaves it
/// running and the environment's reaper (which looks at working directories) misses it.
#[derive(Default)]
struct HaproxyReaper {
    dir: Option<PathBuf>,
}

impl Drop for HaproxyReaper {
    fn drop(&mut self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let needle = dir.display().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let mut args = cmdline.split('\0');
            let program = args.next().unwrap_or("");
            if program.ends_with("haproxy") && args.any(|arg| arg.contains(&needle)) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
}

//! Heartbeat capacity: one process simulates N agents against a 3-member Strata cluster it
//! starts itself, and measures the heartbeat round trip and what it costs the leader.
//!
//! Each simulated agent is a task that registers its node once (`POST /v1/agents/register`,
//! a Raft write), heartbeats at once (as the real agent does, so its node never looks silent),
//! then heartbeats every `interval` at its own phase: agent `i` of `N` is offset by `i/N` of
//! the interval, so the load is spread evenly over each second instead of arriving in a burst.
//! Agent `i` reports `i % 4` instances (0 to 3) with fixed ids the controller does not know;
//! the leader records them and its planner skips them, as it would reports of stray instances.
//! Each agent starts at member `i % 3` and follows the 421 answer's `leader` hint, like
//! `strata-agent`.
//!
//! The tasks share one HTTP client whose requests are bounded by a semaphore of `pool`
//! permits, so at most `pool` connections per member are open (not one socket per agent).
//! Two latencies are kept per heartbeat: the round trip (permit held, request sent, answer
//! read) and the lag (from the tick it was scheduled for to the answer, which adds any wait
//! for a pooled connection). Only heartbeats answered inside the measured window count, after
//! every agent registered and a warm-up passed. CPU is read from `/proc/PID/stat` at the
//! window's edges: the leader's, the followers' and this program's (the load generator shares
//! the machine with the cluster).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_api::{
    Health, HeartbeatRequest, HeartbeatResponse, HostMetrics, InstanceReport, Phase, Problem,
    RegisterRequest, Resources,
};
use tokio::sync::Semaphore;

use crate::cluster::{Binaries, Cluster, STRATA_JOIN_TOKEN};
use crate::stats::{cores, own_cpu_seconds, percentile, round2};
use crate::system::System;

/// The target for the largest run.
pub const TARGET_AGENTS: usize = 10_000;
pub const TARGET_P99_MS: f64 = 50.0;
pub const TARGET_LEADER_CORES: f64 = 1.0;
/// A run below this share of the offered heartbeat rate does not meet the target either way.
const TARGET_RATE_SHARE: f64 = 0.99;

/// Attempts at registering one simulated node before it is counted as failed.
const REGISTER_ATTEMPTS: u32 = 5;
/// 421 hops one heartbeat may follow.
const MAX_HOPS: usize = 3;

#[derive(Clone, Debug)]
pub struct HeartbeatsConfig {
    /// Simulated agent counts, one fresh cluster each.
    pub agents: Vec<usize>,
    /// Between two heartbeats of one agent.
    pub interval: Duration,
    pub warmup: Duration,
    pub duration: Duration,
    /// Requests in flight at most (and so connections per member).
    pub pool: usize,
    /// One heartbeat's time limit. `strata-agent` uses its interval, clamped to 0.5-3 s.
    pub timeout: Duration,
    pub keep_dir: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeartbeatsReport {
    pub runs: Vec<HeartbeatRun>,
    pub interval_ms: f64,
    pub pool: usize,
    pub warmup_s: f64,
    /// What the issue asks of the 10,000-agent run.
    pub target: String,
    /// `meets_target` of the run with 10,000 agents or more, when there is one.
    pub target_met: Option<bool>,
    pub smoke: bool,
    pub load_average_at_start: Option<[f64; 3]>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeartbeatRun {
    pub agents: usize,
    /// From the first task's start until every node registered (or gave up).
    pub registration_s: f64,
    pub registration_errors: u64,
    pub duration_s: f64,
    /// Agents over the interval: what 1 Hz asks for.
    pub offered_per_sec: f64,
    /// Heartbeats answered 200 inside the window, per second.
    pub heartbeats_per_sec: f64,
    pub heartbeats: u64,
    pub errors: u64,
    /// Heartbeats in the window that were first sent to a follower and followed its 421.
    pub redirects: u64,
    /// Round trip: permit held, request sent, answer read.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// From the scheduled tick to the answer: adds the wait for a pooled connection.
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    /// CPU cores (CPU seconds over the window's seconds).
    pub leader_cpu_cores: Option<f64>,
    /// The two followers together.
    pub followers_cpu_cores: Option<f64>,
    /// This program, the load generator.
    pub client_cpu_cores: Option<f64>,
    /// The leader at the window's end was not the one at its start (the CPU split is void).
    pub leader_changed: bool,
    /// p99 under 50 ms, leader under one core and at least 99% of the offered rate achieved.
    pub meets_target: bool,
    pub error_samples: Vec<String>,
}

/// Runs every configured agent count, each against a fresh cluster.
pub async fn run(
    binaries: &Binaries,
    config: &HeartbeatsConfig,
    smoke: bool,
) -> Result<HeartbeatsReport> {
    anyhow::ensure!(config.pool > 0, "the pool needs at least one connection");
    anyhow::ensure!(
        !config.interval.is_zero(),
        "the interval must be above zero"
    );
    let load_average_at_start = crate::load_average();
    let mut runs = Vec::new();
    for &agents in &config.agents {
        anyhow::ensure!(agents > 0, "at least one agent per run");
        eprintln!("[heartbeats] {agents} agents: starting a 3-member cluster");
        let mut cluster = Cluster::start(System::Strata, binaries, config.keep_dir).await?;
        let result = measure(&mut cluster, agents, config).await;
        if result.is_err() {
            if let Some(dir) = cluster.data_dir() {
                eprintln!("[heartbeats] failed; logs were in {}", dir.display());
            }
        }
        cluster.shutdown().await;
        let run = result?;
        eprintln!(
            "[heartbeats] {} agents: {}/s of {}/s, p50 {} ms, p99 {} ms, lag p99 {} ms, \
             {} errors, CPU cores: leader {:?}, followers {:?}, load generator {:?}",
            run.agents,
            run.heartbeats_per_sec,
            run.offered_per_sec,
            run.p50_ms,
            run.p99_ms,
            run.lag_p99_ms,
            run.errors,
            run.leader_cpu_cores,
            run.followers_cpu_cores,
            run.client_cpu_cores
        );
        runs.push(run);
    }
    let target_met = runs
        .iter()
        .filter(|run| run.agents >= TARGET_AGENTS)
        .max_by_key(|run| run.agents)
        .map(|run| run.meets_target);
    Ok(HeartbeatsReport {
        runs,
        interval_ms: config.interval.as_secs_f64() * 1000.0,
        pool: config.pool,
        warmup_s: config.warmup.as_secs_f64(),
        target: format!(
            "{TARGET_AGENTS} agents: p99 under {TARGET_P99_MS} ms, leader under \
             {TARGET_LEADER_CORES} core"
        ),
        target_met,
        smoke,
        load_average_at_start,
    })
}

/// What every simulated agent shares.
pub(crate) struct Shared {
    http: reqwest::Client,
    /// Bounds requests in flight, and with them the connections the client opens.
    pool: Semaphore,
    /// `http://127.0.0.1:port` (or `https://`) of each member.
    endpoints: Vec<String>,
    /// `http` or `https`, for the leader hints of 421 answers (`host:port`).
    scheme: &'static str,
    /// Where registrations go: the leader when the run began (a follower would forward them).
    register_to: String,
    epoch: Instant,
    interval: Duration,
    agents: usize,
    pub(crate) stop: AtomicBool,
    pub(crate) registered: AtomicUsize,
    pub(crate) registration_failed: AtomicU64,
    /// Report the assignments of the last answer as Running and healthy, like an agent whose
    /// every instance starts at once (the fleet benchmark); otherwise a fixed report.
    echo: bool,
    capacity: Resources,
}

/// One answered heartbeat; times in microseconds, `done_us` since `Shared::epoch`.
pub(crate) struct Sample {
    pub(crate) done_us: u64,
    pub(crate) rtt_us: u32,
    lag_us: u32,
    redirected: bool,
}

#[derive(Default)]
pub(crate) struct AgentLog {
    pub(crate) samples: Vec<Sample>,
    /// When each failed heartbeat ended, since the epoch.
    pub(crate) errors_at_us: Vec<u64>,
    pub(crate) error_samples: Vec<String>,
}

/// Simulated agents running against a cluster; they stop when this is dropped or stopped.
pub(crate) struct Fleet {
    pub(crate) shared: Arc<Shared>,
    pub(crate) tasks: Vec<tokio::task::JoinHandle<AgentLog>>,
}

impl Fleet {
    /// Starts `agents` simulated agents: registrations go to the cluster's member `leader`, heartbeats
    /// every `interval` through a pool of `pool` requests, each bounded by `timeout`.
    pub(crate) fn start(
        cluster: &Cluster,
        leader: usize,
        agents: usize,
        interval: Duration,
        pool: usize,
        timeout: Duration,
        echo: Option<Resources>,
    ) -> Result<Fleet> {
        let transport = &cluster.transport;
        let endpoints = cluster.endpoints();
        let http = transport
            .apply(
                reqwest::Client::builder()
                    .timeout(timeout)
                    .connect_timeout(timeout.min(Duration::from_millis(500)))
                    .tcp_nodelay(true)
                    .pool_max_idle_per_host(pool),
            )
            .build()
            .context("build HTTP client")?;
        let shared = Arc::new(Shared {
            http,
            pool: Semaphore::new(pool),
            register_to: endpoints[leader].clone(),
            endpoints,
            scheme: transport.scheme(),
            epoch: Instant::now(),
            interval,
            agents,
            stop: AtomicBool::new(false),
            registered: AtomicUsize::new(0),
            registration_failed: AtomicU64::new(0),
            echo: echo.is_some(),
            capacity: echo.unwrap_or(Resources {
                cpu: 8.0,
                memory_mb: 16_384,
            }),
        });
        let tasks = (0..agents)
            .map(|index| tokio::spawn(simulate_agent(Arc::clone(&shared), index)))
            .collect();
        Ok(Fleet { shared, tasks })
    }

    /// Stops every agent and returns their logs.
    pub(crate) async fn stop(mut self) -> Vec<AgentLog> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let tasks = std::mem::take(&mut self.tasks);
        let mut logs = Vec::with_capacity(tasks.len());
        for task in tasks {
            if let Ok(log) = task.await {
                logs.push(log);
            }
        }
        logs
    }
}

impl Shared {
    /// Microseconds since the agents' common epoch, the clock of `Sample::done_us`.
    pub(crate) fn epoch_elapsed_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

pub(crate) async fn measure(
    cluster: &mut Cluster,
    agents: usize,
    config: &HeartbeatsConfig,
) -> Result<HeartbeatRun> {
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let mut fleet = Fleet::start(
        cluster,
        leader,
        agents,
        config.interval,
        config.pool,
        config.timeout,
        None,
    )?;
    let shared = Arc::clone(&fleet.shared);
    let tasks = std::mem::take(&mut fleet.tasks);
    // Stops the agents however this function is left (an error, a dropped future).
    let _stop = StopOnDrop(Arc::clone(&shared));

    // Registration: a Raft write per node, `pool` at a time.
    let deadline =
        Instant::now() + Duration::from_secs(60) + Duration::from_millis(agents as u64 * 10);
    loop {
        let done = shared.registered.load(Ordering::Relaxed)
            + shared.registration_failed.load(Ordering::Relaxed) as usize;
        if done >= agents {
            break;
        }
        cluster.check_alive()?;
        if Instant::now() >= deadline {
            bail!("only {done} of {agents} registrations finished in time");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registration_s = round2(shared.epoch.elapsed().as_secs_f64());
    let registration_errors = shared.registration_failed.load(Ordering::Relaxed);
    eprintln!(
        "[heartbeats] {agents} agents registered in {registration_s} s ({registration_errors} failed); \
         warming up {:?}",
        config.warmup
    );
    tokio::time::sleep(config.warmup).await;

    // An election during registration (seen with a large pool on a loaded machine) settles
    // within seconds; measure the leader that then leads.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let probe = cluster.probe_client()?;
    let pids: Vec<Option<u32>> = cluster.members.iter().map(|m| m.pid()).collect();
    let cpu = |pids: &[Option<u32>]| -> Vec<Option<f64>> {
        pids.iter()
            .map(|pid| pid.and_then(crate::stats::cpu_seconds_of))
            .collect()
    };
    let window_start = Instant::now();
    let cpu_before = cpu(&pids);
    let own_before = own_cpu_seconds();
    tokio::time::sleep(config.duration).await;
    let window_end = Instant::now();
    let cpu_after = cpu(&pids);
    let own_after = own_cpu_seconds();
    let leader_after = cluster.current_leader(&probe).await.ok();
    shared.stop.store(true, Ordering::Relaxed);

    let mut logs = Vec::with_capacity(agents);
    for task in tasks {
        logs.push(task.await.context("join simulated agent")?);
    }
    cluster.check_alive()?;

    let seconds = (window_end - window_start).as_secs_f64();
    let from_us = (window_start - shared.epoch).as_micros() as u64;
    let until_us = (window_end - shared.epoch).as_micros() as u64;
    let inside = |at: u64| at >= from_us && at <= until_us;
    let mut rtts = Vec::new();
    let mut lags = Vec::new();
    let mut errors = 0;
    let mut redirects = 0;
    let mut error_samples: Vec<String> = Vec::new();
    for log in &logs {
        for sample in log.samples.iter().filter(|s| inside(s.done_us)) {
            rtts.push(f64::from(sample.rtt_us) / 1000.0);
            lags.push(f64::from(sample.lag_us) / 1000.0);
            redirects += u64::from(sample.redirected);
        }
        errors += log.errors_at_us.iter().filter(|at| inside(**at)).count() as u64;
        for text in &log.error_samples {
            if error_samples.len() < 5 && !error_samples.contains(text) {
                error_samples.push(text.clone());
            }
        }
    }
    rtts.sort_by(f64::total_cmp);
    lags.sort_by(f64::total_cmp);
    let heartbeats = rtts.len() as u64;
    let offered_per_sec = round2(agents as f64 / config.interval.as_secs_f64());
    let heartbeats_per_sec = round2(heartbeats as f64 / seconds);

    let leader_cpu_cores = cores(cpu_before[leader], cpu_after[leader], seconds);
    let followers_cpu_cores = (0..pids.len())
        .filter(|index| *index != leader)
        .map(|index| cores(cpu_before[index], cpu_after[index], seconds))
        .sum::<Option<f64>>()
        .map(round2);
    let p99_ms = round2(percentile(&rtts, 0.99));
    let meets_target = p99_ms < TARGET_P99_MS
        && leader_cpu_cores.is_some_and(|c| c < TARGET_LEADER_CORES)
        && heartbeats_per_sec >= TARGET_RATE_SHARE * offered_per_sec;
    Ok(HeartbeatRun {
        agents,
        registration_s,
        registration_errors,
        duration_s: round2(seconds),
        offered_per_sec,
        heartbeats_per_sec,
        heartbeats,
        errors,
        redirects,
        p50_ms: round2(percentile(&rtts, 0.50)),
        p90_ms: round2(percentile(&rtts, 0.90)),
        p99_ms,
        max_ms: round2(percentile(&rtts, 1.0)),
        lag_p50_ms: round2(percentile(&lags, 0.50)),
        lag_p99_ms: round2(percentile(&lags, 0.99)),
        leader_cpu_cores,
        followers_cpu_cores,
        client_cpu_cores: cores(own_before, own_after, seconds),
        leader_changed: leader_after != Some(leader),
        meets_target,
        error_samples,
    })
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// One simulated agent: register, heartbeat at once, then every interval at its phase until
/// told to stop.
async fn simulate_agent(shared: Arc<Shared>, index: usize) -> AgentLog {
    let mut log = AgentLog::default();
    let node_id = format!("sim-{index:05}");
    let credential = match register(&shared, &node_id).await {
        Ok(credential) => credential,
        Err(error) => {
            shared.registration_failed.fetch_add(1, Ordering::Relaxed);
            note_error(&mut log, &shared, format!("register: {error:#}"));
            return log;
        }
    };
    shared.registered.fetch_add(1, Ordering::Relaxed);

    let mut body = if shared.echo {
        echo_body(&node_id, &[])
    } else {
        heartbeat_body(&node_id, index)
    };
    let mut target = shared.endpoints[index % shared.endpoints.len()].clone();
    let phase = shared.interval.mul_f64(index as f64 / shared.agents as f64);
    let since_epoch = shared.epoch.elapsed();
    let periods = since_epoch.saturating_sub(phase).as_nanos() / shared.interval.as_nanos() + 1;
    let first_tick = shared.epoch + phase + shared.interval * periods as u32;
    let mut ticker = tokio::time::interval_at(first_tick.into(), shared.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // The first heartbeat goes out right after registering; later ones on the ticks.
    let mut scheduled = Instant::now();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        match heartbeat(&shared, &mut target, &body, &credential).await {
            Ok((rtt, redirected, answer)) => {
                let done = Instant::now();
                if shared.echo {
                    match serde_json::from_slice::<HeartbeatResponse>(&answer) {
                        Ok(answer) => body = echo_body(&node_id, &answer.assignments),
                        Err(error) => {
                            note_error(&mut log, &shared, format!("decode answer: {error}"))
                        }
                    }
                }
                log.samples.push(Sample {
                    done_us: (done - shared.epoch).as_micros() as u64,
                    rtt_us: micros(rtt),
                    lag_us: micros(done - scheduled),
                    redirected,
                });
            }
            Err(error) => note_error(&mut log, &shared, format!("{error:#}")),
        }
        scheduled = ticker.tick().await.into_std();
    }
    log
}

fn note_error(log: &mut AgentLog, shared: &Shared, text: String) {
    log.errors_at_us
        .push(shared.epoch.elapsed().as_micros() as u64);
    if log.error_samples.len() < 2 && !log.error_samples.contains(&text) {
        log.error_samples.push(text);
    }
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// Registers `node_id` with the join token and returns the node's credential, which its
/// heartbeats carry.
async fn register(shared: &Shared, node_id: &str) -> Result<String> {
    let request = RegisterRequest {
        node_id: node_id.to_owned(),
        address: "127.0.0.1".to_owned(),
        zone: None,
        labels: Default::default(),
        capacity: shared.capacity,
        agent_version: "bench".to_owned(),
        roles: strata_api::default_roles(),
    };
    let url = format!("{}/v1/agents/register", shared.register_to);
    let mut last = String::new();
    for attempt in 0..REGISTER_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let answer = {
            let _permit = shared.pool.acquire().await.context("pool closed")?;
            match shared
                .http
                .post(&url)
                .bearer_auth(STRATA_JOIN_TOKEN)
                .json(&request)
                .send()
                .await
            {
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    Ok((status, text))
                }
                Err(error) => Err(error),
            }
        };
        match answer {
            Ok((status, text)) if status.is_success() => {
                let answer: strata_api::Registration =
                    serde_json::from_str(&text).context("decode the registration")?;
                return answer
                    .credential
                    .context("the registration answer carries no credential");
            }
            Ok((status, text)) => last = format!("{status}: {text}"),
            Err(error) => last = error.to_string(),
        }
    }
    bail!("{last}")
}

/// The heartbeat an agent sends every time: the same bytes, serialised once.
fn heartbeat_body(node_id: &str, index: usize) -> Vec<u8> {
    let instances = (0..index % 4)
        .map(|slot| InstanceReport {
            id: uuid::Uuid::from_u128(((index as u128) << 8) | slot as u128),
            phase: Phase::Running,
            health: Health::Healthy,
            port: Some(20_000 + slot as u16),
            reason: None,
            cpu_percent: 12.5,
        })
        .collect();
    let request = HeartbeatRequest {
        node_id: node_id.to_owned(),
        metrics: HostMetrics {
            cpu_percent: 20.0,
            memory_total_mb: 16_384,
            memory_available_mb: 12_000,
            load1: 0.5,
            load5: 0.4,
            load15: 0.3,
        },
        instances,
        wait_ms: 0,
        lb: None,
    };
    serde_json::to_vec(&request).unwrap_or_default()
}

/// A heartbeat reporting every assigned instance Running and healthy.
fn echo_body(node_id: &str, assignments: &[strata_api::Assignment]) -> Vec<u8> {
    let instances = assignments
        .iter()
        .enumerate()
        .map(|(slot, assignment)| InstanceReport {
            id: assignment.instance_id,
            phase: Phase::Running,
            health: Health::Healthy,
            port: Some(20_000 + slot as u16),
            reason: None,
            cpu_percent: 12.5,
        })
        .collect();
    let request = HeartbeatRequest {
        node_id: node_id.to_owned(),
        metrics: HostMetrics::default(),
        instances,
        wait_ms: 0,
        lb: None,
    };
    serde_json::to_vec(&request).unwrap_or_default()
}

/// Sends one heartbeat to `target`, following 421 hints (and remembering the leader in
/// `target`). Returns the round trip, whether it was redirected, and the answer.
async fn heartbeat(
    shared: &Shared,
    target: &mut String,
    body: &[u8],
    credential: &str,
) -> Result<(Duration, bool, bytes::Bytes)> {
    let _permit = shared.pool.acquire().await.context("pool closed")?;
    let sent = Instant::now();
    let mut redirected = false;
    for _ in 0..MAX_HOPS {
        let response = shared
            .http
            .post(format!("{target}/v1/agents/heartbeat"))
            .bearer_auth(credential)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .with_context(|| format!("heartbeat to {target}"))?;
        let status = response.status();
        // Read the whole answer, as an agent does, so the connection goes back to the pool.
        let bytes = response.bytes().await.context("read heartbeat answer")?;
        if status.is_success() {
            return Ok((sent.elapsed(), redirected, bytes));
        }
        if status.as_u16() == 421 {
            let leader = serde_json::from_slice::<Problem>(&bytes)
                .ok()
                .and_then(|problem| problem.leader);
            match leader {
                Some(address) => {
                    *target = format!("{}://{address}", shared.scheme);
                    redirected = true;
                    continue;
                }
                None => bail!("421 without a leader hint"),
            }
        }
        bail!("{status}: {}", String::from_utf8_lossy(&bytes));
    }
    bail!("more than {MAX_HOPS} redirects")
}

/// `strata-bench heartbeats`.
#[derive(clap::Args)]
pub struct HeartbeatsArgs {
    /// Simulated agent counts, comma separated; each gets a fresh cluster
    /// [default: 1000,5000,10000; smoke 200].
    #[arg(long, value_delimiter = ',')]
    agents: Vec<usize>,
    /// Between two heartbeats of one agent.
    #[arg(long, default_value = "1s")]
    interval: strata_api::Duration,
    /// Heartbeats after the last registration that are not counted [default: 5s, smoke 1s].
    #[arg(long)]
    warmup: Option<strata_api::Duration>,
    /// Measured window [default: 20s, smoke 3s].
    #[arg(long)]
    duration: Option<strata_api::Duration>,
    /// Requests in flight at most, and so connections per member.
    #[arg(long, default_value_t = 64)]
    pool: usize,
    /// Time limit of one heartbeat (strata-agent uses its interval, within 0.5-3 s).
    #[arg(long, default_value = "1s")]
    timeout: strata_api::Duration,
    /// Short CI mode: 200 agents, 1 s warm-up, 3 s measured (unless set explicitly).
    #[arg(long)]
    smoke: bool,
    #[command(flatten)]
    binaries: crate::BinaryArgs,
}

pub async fn run_cli(args: HeartbeatsArgs) -> Result<HeartbeatsReport> {
    let smoke = args.smoke;
    let agents = if !args.agents.is_empty() {
        args.agents
    } else if smoke {
        vec![200]
    } else {
        vec![1_000, 5_000, 10_000]
    };
    let config = HeartbeatsConfig {
        agents,
        interval: args.interval.as_std(),
        warmup: args
            .warmup
            .map_or(Duration::from_secs(if smoke { 1 } else { 5 }), |d| {
                d.as_std()
            }),
        duration: args
            .duration
            .map_or(Duration::from_secs(if smoke { 3 } else { 20 }), |d| {
                d.as_std()
            }),
        pool: args.pool,
        timeout: args.timeout.as_std(),
        keep_dir: args.binaries.keep_dir,
    };
    run(&args.binaries.resolve(), &config, smoke).await
}

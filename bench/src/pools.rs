//! Load-balancer pools: how fast a pool change reaches HAProxy, and what pool churn costs the
//! requests going through it, against the reload approach.
//!
//! **Propagation** (`tiers` x `servers`, 100 x 10 by default): one controller and one LB agent
//! (`strata-agent --lb haproxy`, the real HAProxy) on loopback; the workers are simulated by
//! this program (`SimulatedWorker`): a registered node whose heartbeats report every instance
//! placed on it Running and healthy on a port this program listens on, so a thousand servers
//! cost a thousand sockets rather than a thousand processes. A round scales one tier up by one
//! while a request stream runs through its frontend, and measures from the commit that made the
//! new instance ready (the leader's stamp on its `InstanceRunning` event; the stamp is taken when
//! the command is proposed, so the figure includes the commit) to the first request HAProxy
//! routes to it (this program's clock; same host, same clock). Then it scales back down.
//!
//! **Churn** (real `strata-workload` instances on a real worker agent): `wrk` through HAProxy for
//! the same duration three times, in one run: no pool change; a pool change every second
//! (scale 4 -> 5 -> 4 ...), applied by the LB agent through the Runtime API; and the same churn
//! served by the reload approach that consul-template users run: a second HAProxy whose
//! configuration this program rewrites from the pool (polled every 100 ms) and reloads through
//! the master CLI on every change.
//!
//! Results go to stdout as JSON, progress to stderr. Nothing here judges a figure in CI.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::Method;
use serde::Serialize;
use serde_json::json;
use strata_api::{
    Assignment, Event, Health, HeartbeatRequest, HeartbeatResponse, InstanceReport, ItemList,
    Phase, PoolView, RegisterRequest, Resources, ServerState,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cluster::STRATA_JOIN_TOKEN;
use crate::local::{Api, LocalConfig, LocalEnv, Owned};
use crate::stats::{percentile, round2};

/// The targets.
pub const TARGET_PROPAGATION_P99_MS: f64 = 250.0;
/// Churned throughput may be at most this much below the no-churn run.
pub const TARGET_CHURN_LOSS: f64 = 0.05;

#[derive(Args, Clone, Debug)]
pub struct PoolsArgs {
    /// Short CI mode: 3 tiers x 3 servers, 3 rounds, 3 s wrk runs.
    #[arg(long)]
    smoke: bool,
    /// Tiers behind the LB agent for the propagation measurement [default: 100, smoke 3].
    #[arg(long)]
    tiers: Option<usize>,
    /// Servers per tier [default: 10, smoke 3].
    #[arg(long)]
    servers: Option<u32>,
    /// Propagation rounds [default: one per tier, smoke 3].
    #[arg(long)]
    rounds: Option<usize>,
    /// Length of each wrk run [default: 10s, smoke 3s].
    #[arg(long)]
    churn_duration: Option<strata_api::Duration>,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Rounds of the three churn runs, each round in another order, so that a machine
    /// whose load drifts during the measurement favours none of them [default: 3, smoke 1].
    #[arg(long)]
    repeats: Option<usize>,
    /// Skip the churn measurement (no wrk needed).
    #[arg(long)]
    no_churn: bool,
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
pub struct PoolsReport {
    pub propagation: PropagationReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<ChurnReport>,
    pub targets: String,
    pub propagation_target_met: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn_target_met: Option<bool>,
    pub smoke: bool,
    pub load_average_at_start: Option<[f64; 3]>,
}

#[derive(Debug, Serialize)]
pub struct PropagationReport {
    pub tiers: usize,
    pub servers_per_tier: u32,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct ChurnReport {
    /// Length of each wrk run.
    pub duration_s: f64,
    pub connections: usize,
    pub instances: u32,
    /// Rounds of the three runs (in rotating order); the figures below sum their requests
    /// and errors and take the median of their latencies.
    pub repeats: usize,
    /// Strata's LB agent, no pool change.
    pub steady: WrkResult,
    /// Strata's LB agent, a pool change every second (Runtime API, no reload).
    pub churn: WrkResult,
    /// The reload approach under the same churn.
    pub reload: WrkResult,
    /// churn requests/s over steady requests/s.
    pub churn_ratio: f64,
    /// The same ratio in each round, to show the noise.
    pub churn_ratio_by_round: Vec<f64>,
    /// reload requests/s over steady requests/s.
    pub reload_ratio: f64,
    /// Strata's LB agent, no pool change, while another tier (no load balancer) is scaled
    /// between 4 and 5 every second: the same process, Raft and health-check churn as the
    /// churn run, without a pool change.
    pub background: WrkResult,
    /// background requests/s over steady requests/s: what the churn costs this machine
    /// whatever the load balancer does.
    pub background_ratio: f64,
    /// churn requests/s over background requests/s: what the pool changes cost beyond it.
    pub churn_over_background: f64,
    pub pool_changes_churn: u64,
    pub pool_changes_reload: u64,
    pub reloads: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Non-2xx/3xx answers plus socket errors (connect, read, write, timeout).
    pub errors: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

pub async fn run_cli(args: PoolsArgs) -> Result<PoolsReport> {
    let controller_bin = args
        .strata_bin
        .clone()
        .unwrap_or_else(crate::default_strata_bin);
    let sibling = |name: &str| controller_bin.with_file_name(name);
    let agent_bin = args
        .agent_bin
        .clone()
        .unwrap_or_else(|| sibling("strata-agent"));
    // The worker agent starts the workload from its own directory: the path must be absolute.
    let workload_bin = args
        .workload_bin
        .clone()
        .unwrap_or_else(|| sibling("strata-workload"));
    let workload_bin = std::path::absolute(&workload_bin)
        .with_context(|| format!("resolve {}", workload_bin.display()))?;
    let tiers = args.tiers.unwrap_or(if args.smoke { 3 } else { 100 });
    let servers = args.servers.unwrap_or(if args.smoke { 3 } else { 10 });
    let rounds = args.rounds.unwrap_or(if args.smoke { 3 } else { tiers });
    let churn_duration = args
        .churn_duration
        .map(|d| d.as_std())
        .unwrap_or(Duration::from_secs(if args.smoke { 3 } else { 10 }));
    let load_average_at_start = crate::load_average();

    let config = LocalConfig {
        controller_bin: controller_bin.clone(),
        agent_bin: agent_bin.clone(),
        heartbeat_interval: Duration::from_secs(1),
        reconcile_interval: None,
        keep_dir: args.keep_dir,
        worker: false,
        balancers: Some((args.haproxy_bin.clone(), 1)),
    };
    eprintln!("[pools] propagation: {tiers} tiers x {servers} servers, {rounds} rounds");
    let propagation = propagation(&config, tiers, servers, rounds).await?;
    eprintln!(
        "[pools] propagation p50 {} ms, p99 {} ms",
        propagation.p50_ms, propagation.p99_ms
    );

    let churn = if args.no_churn {
        None
    } else {
        let config = LocalConfig {
            worker: true,
            ..config
        };
        Some(
            churn(
                &config,
                &workload_bin,
                &args.haproxy_bin,
                &args.wrk_bin,
                churn_duration,
                args.connections,
                args.repeats
                    .unwrap_or(if args.smoke { 1 } else { 3 })
                    .max(1),
            )
            .await?,
        )
    };
    let churn_target_met = churn
        .as_ref()
        .map(|churn| churn.churn.errors == 0 && churn.churn_ratio >= 1.0 - TARGET_CHURN_LOSS);
    Ok(PoolsReport {
        propagation_target_met: propagation.p99_ms < TARGET_PROPAGATION_P99_MS,
        propagation,
        churn,
        targets: format!(
            "propagation p99 under {TARGET_PROPAGATION_P99_MS} ms; churn within {}% of steady with zero errors",
            TARGET_CHURN_LOSS * 100.0
        ),
        churn_target_met,
        smoke: args.smoke,
        load_average_at_start,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Frontends listen on a loopback address of their own, and the simulated servers on
/// another (Linux routes all of 127.0.0.0/8 to `lo`): a port picked for a frontend is free
/// only until HAProxy binds it, and a thousand servers binding port 0 meanwhile on the same
/// address would take some (HAProxy's reload then fails with "Address already in use").
const FRONTEND_IP: &str = "127.0.0.3";
const SIMULATED_IP: &str = "127.0.0.2";

fn free_listen() -> Result<String> {
    let listener =
        std::net::TcpListener::bind((FRONTEND_IP, 0)).context("pick a free frontend port")?;
    Ok(listener.local_addr()?.to_string())
}

fn tier_body(
    name: &str,
    listen: &str,
    template: serde_json::Value,
    health: &str,
) -> serde_json::Value {
    json!({
        "name": name,
        "template": template,
        "health": {"path": "/healthz", "interval": health, "timeout": "500ms",
                   "healthy_threshold": 1, "unhealthy_threshold": 2, "grace_period": "5s"},
        "scaling": {"min": 0, "max": 64},
        "load_balancer": {"listen": listen, "slowstart": "0s", "drain_timeout": "5s"},
    })
}

async fn scale(api: &Api, tier: &str, desired: u32) -> Result<()> {
    api.send(
        Method::POST,
        &format!("/v1/tiers/{tier}/scale"),
        &json!({ "desired": desired }),
    )
    .await
}

/// Whether the pool of `tier` has `count` ready servers, no draining one, and every balancer
/// reports serving its version.
async fn pool_settled(api: &Api, tier: &str, count: usize) -> Result<Option<PoolView>> {
    let pool: PoolView = api.get(&format!("/v1/tiers/{tier}/pool")).await?;
    let ready = pool
        .pool
        .servers
        .iter()
        .filter(|s| s.state == ServerState::Ready)
        .count();
    let served = !pool.balancers.is_empty()
        && pool
            .balancers
            .iter()
            .all(|b| b.report.version == pool.pool.version);
    Ok((ready == count && pool.pool.servers.len() == count && served).then_some(pool))
}

// ---------------------------------------------------------------------------------------------
// Propagation

/// Minimal HTTP/1.1 servers, one listener per simulated instance, that answer every request
/// with 200 and note when each instance first got a request other than a health check.
#[derive(Default)]
struct Servers {
    ports: Mutex<HashMap<Uuid, u16>>,
    first_hit_ms: Mutex<HashMap<Uuid, u64>>,
    stop: CancellationToken,
}

impl Servers {
    /// The port of `id`'s server, started on first use.
    async fn port_of(self: &Arc<Self>, id: Uuid) -> Result<u16> {
        if let Some(port) = self
            .ports
            .lock()
            .ok()
            .and_then(|ports| ports.get(&id).copied())
        {
            return Ok(port);
        }
        let listener = TcpListener::bind((SIMULATED_IP, 0)).await?;
        let port = listener.local_addr()?.port();
        if let Ok(mut ports) = self.ports.lock() {
            ports.insert(id, port);
        }
        let servers = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = servers.stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let servers = servers.clone();
                tokio::spawn(async move { servers.serve(id, stream).await });
            }
        });
        Ok(port)
    }

    async fn serve(&self, id: Uuid, mut stream: tokio::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut buffer = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            while let Some(end) = find(&buffer, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..end]).to_string();
                buffer.drain(..end + 4);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                if !path.starts_with("/healthz") {
                    if let Ok(mut hits) = self.first_hit_ms.lock() {
                        hits.entry(id).or_insert_with(now_ms);
                    }
                }
                let body = id.to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
            let read = tokio::select! {
                () = self.stop.cancelled() => return,
                read = stream.read(&mut chunk) => read,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn first_hit(&self, id: Uuid) -> Option<u64> {
        self.first_hit_ms.lock().ok()?.get(&id).copied()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Registers the simulated worker node: a worker with room for every instance the benchmark
/// asks for (the most CPU validation admits, `capacity.cpu <= 4096`; 100 tiers of 11 servers
/// at 0.01 CPU and 16 MiB take 11 CPUs and 17.6 GiB).
async fn register_simulated_worker(api: &Api) -> Result<String> {
    let registration = RegisterRequest {
        node_id: "sim".to_string(),
        address: SIMULATED_IP.to_string(),
        zone: None,
        labels: Default::default(),
        capacity: Resources {
            cpu: 4096.0,
            memory_mb: 100_000_000,
        },
        agent_version: "bench".to_string(),
        roles: strata_api::default_roles(),
    };
    let registered: strata_api::Registration =
        post_agent(api, "/v1/agents/register", &registration, STRATA_JOIN_TOKEN)
            .await
            .context("register the simulated worker")?;
    registered
        .credential
        .context("the registration answer carries no credential")
}

/// The simulated worker's heartbeats (after [`register_simulated_worker`], with the
/// credential it returned): it runs nothing but reports every instance placed on it Running
/// and healthy, listening on a port of `Servers`.
async fn simulated_worker(
    api: Api,
    credential: String,
    servers: Arc<Servers>,
    stop: CancellationToken,
) -> Result<()> {
    let mut reports: Vec<InstanceReport> = Vec::new();
    while !stop.is_cancelled() {
        let request = HeartbeatRequest {
            node_id: "sim".to_string(),
            metrics: Default::default(),
            instances: reports.clone(),
            wait_ms: 1_000,
            lb: None,
        };
        let answer: HeartbeatResponse = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            answer = post_agent(&api, "/v1/agents/heartbeat", &request, &credential) => match answer {
                Ok(answer) => answer,
                // A real agent retries too; a lasting failure shows as a wait that times out.
                Err(error) => {
                    eprintln!("[pools] simulated worker: {error:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let assigned: Vec<Assignment> = answer.assignments;
        let mut next = Vec::with_capacity(assigned.len());
        for assignment in &assigned {
            let port = servers.port_of(assignment.instance_id).await?;
            next.push(InstanceReport {
                id: assignment.instance_id,
                phase: Phase::Running,
                health: Health::Healthy,
                port: Some(port),
                reason: None,
                cpu_percent: 1.0,
            });
        }
        // Instances no longer assigned stopped.
        let kept: BTreeSet<Uuid> = next.iter().map(|report| report.id).collect();
        for report in &reports {
            if !kept.contains(&report.id) && report.phase == Phase::Running {
                next.push(InstanceReport {
                    phase: Phase::Terminated,
                    health: Health::Unknown,
                    ..report.clone()
                });
            }
        }
        reports = next;
    }
    Ok(())
}

async fn post_agent<B: Serialize, T: serde::de::DeserializeOwned>(
    api: &Api,
    path: &str,
    body: &B,
    token: &str,
) -> Result<T> {
    let response = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(token)
        .timeout(Duration::from_secs(15))
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {path}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!(
            "POST {path}: {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    response
        .json()
        .await
        .with_context(|| format!("decode {path}"))
}

/// A request stream through `listen` until cancelled (four clients, keep-alive).
fn traffic(listen: String, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|_| {
            let (listen, stop) = (listen.clone(), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .unwrap_or_default();
                while !stop.is_cancelled() {
                    let _ = http.get(format!("http://{listen}/")).send().await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect()
}

async fn propagation(
    config: &LocalConfig,
    tiers: usize,
    servers_per_tier: u32,
    rounds: usize,
) -> Result<PropagationReport> {
    let mut env = LocalEnv::start(config).await?;
    let credential = register_simulated_worker(&env.api).await?;
    let servers = Arc::new(Servers::default());
    let stop = CancellationToken::new();
    let worker = tokio::spawn(simulated_worker(
        env.api.clone(),
        credential,
        servers.clone(),
        stop.clone(),
    ));
    let result = async {
        let mut listens = Vec::new();
        for index in 0..tiers {
            let name = format!("t{index:03}");
            let listen = free_listen()?;
            // A plain command: the simulated worker never runs it.
            let template =
                json!({"driver": "process", "command": ["simulated"], "cpu": 0.01, "memory_mb": 16});
            env.api
                .send(
                    Method::PUT,
                    &format!("/v1/tiers/{name}"),
                    &tier_body(&name, &listen, template, "5s"),
                )
                .await?;
            scale(&env.api, &name, servers_per_tier).await?;
            listens.push((name, listen));
        }
        for (name, _) in &listens {
            let api = env.api.clone();
            let name = name.clone();
            env.wait(
                &format!("{name}: {servers_per_tier} servers served"),
                Duration::from_secs(120),
                move |_| {
                    let (api, name) = (api.clone(), name.clone());
                    async move { pool_settled(&api, &name, servers_per_tier as usize).await }
                },
            )
            .await?;
        }
        eprintln!(
            "[pools] {} servers in {tiers} pools are served",
            tiers * servers_per_tier as usize
        );
        let mut samples = Vec::new();
        for round in 0..rounds {
            let (name, listen) = &listens[round % listens.len()];
            let before: BTreeSet<Uuid> = pool_ids(&env.api, name).await?;
            let stop_traffic = CancellationToken::new();
            let clients = traffic(listen.clone(), stop_traffic.clone());
            scale(&env.api, name, servers_per_tier + 1).await?;
            let api = env.api.clone();
            let (tier, servers_ref, before_ref) = (name.clone(), servers.clone(), before.clone());
            let sample = env
                .wait(
                    &format!("{tier}: the new server gets a request"),
                    Duration::from_secs(30),
                    move |_| {
                        let (api, tier, servers, before) = (
                            api.clone(),
                            tier.clone(),
                            servers_ref.clone(),
                            before_ref.clone(),
                        );
                        async move {
                            let now: BTreeSet<Uuid> = pool_ids(&api, &tier).await?;
                            let Some(new) = now.difference(&before).next().copied() else {
                                return Ok(None);
                            };
                            let Some(hit) = servers.first_hit(new) else {
                                return Ok(None);
                            };
                            let ready = running_at(&api, &tier, new).await?;
                            Ok(ready.map(|ready| hit.saturating_sub(ready) as f64))
                        }
                    },
                )
                .await?;
            stop_traffic.cancel();
            for client in clients {
                let _ = client.await;
            }
            samples.push(sample);
            scale(&env.api, name, servers_per_tier).await?;
            let api = env.api.clone();
            let tier = name.clone();
            env.wait(
                &format!("{tier}: back to {servers_per_tier}"),
                Duration::from_secs(60),
                move |_| {
                    let (api, tier) = (api.clone(), tier.clone());
                    async move { pool_settled(&api, &tier, servers_per_tier as usize).await }
                },
            )
            .await?;
        }
        Ok::<_, anyhow::Error>(samples)
    }
    .await;
    stop.cancel();
    servers.stop.cancel();
    let _ = worker.await;
    let mut samples = result?;
    let recorded = samples.clone();
    samples.sort_by(f64::total_cmp);
    Ok(PropagationReport {
        tiers,
        servers_per_tier,
        samples: samples.len(),
        p50_ms: round2(percentile(&samples, 0.5)),
        p99_ms: round2(percentile(&samples, 0.99)),
        max_ms: round2(samples.last().copied().unwrap_or(0.0)),
        samples_ms: recorded,
    })
}

async fn pool_ids(api: &Api, tier: &str) -> Result<BTreeSet<Uuid>> {
    let pool: PoolView = api.get(&format!("/v1/tiers/{tier}/pool")).await?;
    Ok(pool
        .pool
        .servers
        .iter()
        .filter(|s| s.state == ServerState::Ready)
        .map(|s| s.instance_id)
        .collect())
}

/// The leader's stamp of the command that made `id` Running (and, here, healthy: the
/// simulated worker reports both at once).
async fn running_at(api: &Api, tier: &str, id: Uuid) -> Result<Option<u64>> {
    let events: ItemList<Event> = api.get(&format!("/v1/events?object=tier/{tier}")).await?;
    let id = id.to_string();
    Ok(events
        .items
        .iter()
        .rev()
        .find(|event| event.reason == "InstanceRunning" && event.message.contains(&id))
        .map(|event| event.at_ms))
}

// ---------------------------------------------------------------------------------------------
// Churn

async fn churn(
    config: &LocalConfig,
    workload_bin: &Path,
    haproxy_bin: &Path,
    wrk_bin: &Path,
    duration: Duration,
    connections: usize,
    repeats: usize,
) -> Result<ChurnReport> {
    let mut env = LocalEnv::start(config).await?;
    let listen = free_listen()?;
    let template = json!({
        "driver": "process",
        "command": [workload_bin.display().to_string()],
        "cpu": 0.1,
        "memory_mb": 32,
    });
    env.api
        .send(
            Method::PUT,
            "/v1/tiers/web",
            &tier_body("web", &listen, template.clone(), "1s"),
        )
        .await?;
    const BASE: u32 = 4;
    scale(&env.api, "web", BASE).await?;
    let api = env.api.clone();
    env.wait(
        "web: 4 servers served",
        Duration::from_secs(60),
        move |_| {
            let api = api.clone();
            async move { pool_settled(&api, "web", BASE as usize).await }
        },
    )
    .await?;

    // A second tier of the same workload with no load balancer: scaling it churns processes,
    // Raft commits and health checks exactly like the pool changes do, without touching any
    // pool, which tells the cost of the churn on this machine from that of the pool changes.
    let mut background = tier_body("bg", &free_listen()?, template, "1s");
    if let Some(body) = background.as_object_mut() {
        body.remove("load_balancer");
    }
    env.api
        .send(Method::PUT, "/v1/tiers/bg", &background)
        .await?;
    scale(&env.api, "bg", BASE).await?;
    let api = env.api.clone();
    env.wait(
        "bg: 4 instances ready",
        Duration::from_secs(60),
        move |_| {
            let api = api.clone();
            async move {
                let tier: serde_json::Value = api.get("/v1/tiers/bg").await?;
                Ok((tier["status"]["ready"].as_u64() == Some(u64::from(BASE))).then_some(()))
            }
        },
    )
    .await?;

    let mut runs: BTreeMap<Mode, Vec<WrkResult>> = BTreeMap::new();
    let (mut changes_churn, mut changes_reload, mut reloads) = (0, 0, 0);
    let mut ratios = Vec::new();
    for round in 0..repeats {
        let mut order = [Mode::Steady, Mode::Churn, Mode::Reload, Mode::Background];
        order.rotate_left(round % 4);
        let mut this_round = BTreeMap::new();
        for mode in order {
            eprintln!("[pools] churn round {}/{repeats}: {mode:?}", round + 1);
            let result = match mode {
                Mode::Steady => wrk(wrk_bin, &listen, duration, connections).await?,
                Mode::Churn => {
                    let (result, changes) = with_churn(&env.api, duration, || {
                        wrk(wrk_bin, &listen, duration, connections)
                    })
                    .await?;
                    changes_churn += changes;
                    result
                }
                Mode::Background => {
                    with_churn_of(&env.api, "bg", duration, || {
                        wrk(wrk_bin, &listen, duration, connections)
                    })
                    .await?
                    .0
                }
                Mode::Reload => {
                    // A fresh reload-approach HAProxy per run, so it reloads only during
                    // its own run.
                    let reloader = Reloader::start(haproxy_bin, env.dir(), &env.api).await?;
                    let reload_listen = reloader.listen.clone();
                    let outcome = with_churn(&env.api, duration, || {
                        wrk(wrk_bin, &reload_listen, duration, connections)
                    })
                    .await;
                    reloads += reloader.stop().await;
                    let (result, changes) = outcome?;
                    changes_reload += changes;
                    result
                }
            };
            this_round.insert(mode, result.requests_per_sec);
            runs.entry(mode).or_default().push(result);
        }
        let steady = this_round.get(&Mode::Steady).copied().unwrap_or(0.0);
        let churned = this_round.get(&Mode::Churn).copied().unwrap_or(0.0);
        ratios.push(if steady > 0.0 {
            round2(churned / steady)
        } else {
            0.0
        });
    }
    let merged = |mode: Mode| WrkResult::merge(runs.get(&mode).map_or(&[][..], Vec::as_slice));
    let (steady, churned, reloaded, background) = (
        merged(Mode::Steady),
        merged(Mode::Churn),
        merged(Mode::Reload),
        merged(Mode::Background),
    );
    let ratio = |other: &WrkResult| {
        if steady.requests_per_sec > 0.0 {
            round2(other.requests_per_sec / steady.requests_per_sec)
        } else {
            0.0
        }
    };
    env.check_alive()?;
    Ok(ChurnReport {
        duration_s: duration.as_secs_f64(),
        connections,
        instances: BASE,
        repeats,
        churn_ratio: ratio(&churned),
        churn_ratio_by_round: ratios,
        reload_ratio: ratio(&reloaded),
        background_ratio: ratio(&background),
        churn_over_background: if background.requests_per_sec > 0.0 {
            round2(churned.requests_per_sec / background.requests_per_sec)
        } else {
            0.0
        },
        background,
        steady,
        churn: churned,
        reload: reloaded,
        pool_changes_churn: changes_churn,
        pool_changes_reload: changes_reload,
        reloads,
    })
}

/// The three runs of the churn measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Steady,
    Churn,
    Reload,
    Background,
}

impl WrkResult {
    /// Several runs as one: requests and errors summed, the rate over their total time, the
    /// median of their latency percentiles.
    fn merge(runs: &[WrkResult]) -> WrkResult {
        let median = |pick: fn(&WrkResult) -> f64| {
            let mut values: Vec<f64> = runs.iter().map(pick).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(0.0)
        };
        let seconds: f64 = runs
            .iter()
            .filter(|run| run.requests_per_sec > 0.0)
            .map(|run| run.requests as f64 / run.requests_per_sec)
            .sum();
        let requests = runs.iter().map(|run| run.requests).sum();
        WrkResult {
            requests,
            requests_per_sec: if seconds > 0.0 {
                round2(requests as f64 / seconds)
            } else {
                0.0
            },
            latency_p50_ms: median(|run| run.latency_p50_ms),
            latency_p99_ms: median(|run| run.latency_p99_ms),
            errors: runs.iter().map(|run| run.errors).sum(),
            non_2xx: runs.iter().map(|run| run.non_2xx).sum(),
            socket_errors: runs.iter().map(|run| run.socket_errors).sum(),
        }
    }
}

/// Runs `load` while scaling web between 4 and 5 every second; returns its result and the
/// number of scale changes made.
async fn with_churn<F, Fut>(api: &Api, duration: Duration, load: F) -> Result<(WrkResult, u64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<WrkResult>>,
{
    with_churn_of(api, "web", duration, load).await
}

/// Like [`with_churn`], scaling `tier` instead.
async fn with_churn_of<F, Fut>(
    api: &Api,
    tier: &str,
    duration: Duration,
    load: F,
) -> Result<(WrkResult, u64)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<WrkResult>>,
{
    let stop = CancellationToken::new();
    let churner = {
        let (api, stop, tier) = (api.clone(), stop.clone(), tier.to_string());
        tokio::spawn(async move {
            let mut changes = 0u64;
            let mut up = true;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !stop.is_cancelled() {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if scale(&api, &tier, if up { 5 } else { 4 }).await.is_ok() {
                    changes += 1;
                }
                up = !up;
            }
            let _ = scale(&api, &tier, 4).await;
            changes
        })
    };
    let result = load().await;
    stop.cancel();
    let changes = churner.await.unwrap_or(0);
    let _ = duration;
    // Let the last change settle before the next run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((result?, changes))
}

async fn wrk(
    bin: &Path,
    listen: &str,
    duration: Duration,
    connections: usize,
) -> Result<WrkResult> {
    let output = tokio::process::Command::new(bin)
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{}s", duration.as_secs().max(1)),
            "--latency",
            &format!("http://{listen}/"),
        ])
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| {
            format!(
                "run {} (deploy/install-deps.sh installs wrk)",
                bin.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text)
}

/// Reads wrk's summary: "N requests in", "Requests/sec:", the latency distribution, socket
/// errors and non-2xx answers.
fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut result = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [count, "requests", "in", ..] => result.requests = count.parse().unwrap_or(0),
            ["Requests/sec:", rate] => result.requests_per_sec = rate.parse().unwrap_or(0.0),
            ["50%", latency] => result.latency_p50_ms = wrk_ms(latency),
            ["99%", latency] => result.latency_p99_ms = wrk_ms(latency),
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                result.non_2xx = count.parse().unwrap_or(0)
            }
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                result.socket_errors = rest
                    .iter()
                    .filter_map(|word| word.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    if result.requests == 0 {
        bail!("wrk printed no request count:\n{text}");
    }
    result.errors = result.non_2xx + result.socket_errors;
    Ok(result)
}

/// wrk's durations: `850.00us`, `1.23ms`, `2.00s`.
fn wrk_ms(text: &str) -> f64 {
    let (number, factor) = if let Some(us) = text.strip_suffix("us") {
        (us, 0.001)
    } else if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1.0)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1000.0)
    } else {
        (text, 1.0)
    };
    round2(number.parse::<f64>().unwrap_or(0.0) * factor)
}

/// The reload approach: an HAProxy whose configuration is rewritten from the pool and reloaded
/// (master CLI `reload`, as `systemctl reload haproxy` does) whenever the pool's servers change.
struct Reloader {
    listen: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<u64>,
    _haproxy: Owned,
}

impl Reloader {
    async fn start(haproxy_bin: &Path, dir: &Path, api: &Api) -> Result<Reloader> {
        let dir = dir.join("reload-haproxy");
        std::fs::create_dir_all(&dir)?;
        let listen = free_listen()?;
        let config = dir.join("haproxy.cfg");
        let master = dir.join("master.sock");
        let servers = pool_servers(api).await?;
        std::fs::write(&config, reload_config(&listen, &servers))?;
        let mut command = tokio::process::Command::new(haproxy_bin);
        command.args([
            "-W",
            "-S",
            &master.display().to_string(),
            "-f",
            &config.display().to_string(),
        ]);
        let haproxy = Owned::spawn(&mut command, &dir.join("haproxy.log"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            if Instant::now() > deadline {
                bail!("the reload approach's HAProxy does not listen on {listen}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stop = CancellationToken::new();
        let task = {
            let (api, stop, listen) = (api.clone(), stop.clone(), listen.clone());
            tokio::spawn(async move {
                let mut current = servers;
                let mut reloads = 0;
                while !stop.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Ok(servers) = pool_servers(&api).await else {
                        continue;
                    };
                    if servers == current {
                        continue;
                    }
                    if std::fs::write(&config, reload_config(&listen, &servers)).is_ok()
                        && master_command(&master, "reload").await.is_ok()
                    {
                        reloads += 1;
                        current = servers;
                    }
                }
                reloads
            })
        };
        Ok(Reloader {
            listen,
            stop,
            task,
            _haproxy: haproxy,
        })
    }

    async fn stop(self) -> u64 {
        self.stop.cancel();
        self.task.await.unwrap_or(0)
    }
}

/// The ready servers of web's pool, as `address:port`.
async fn pool_servers(api: &Api) -> Result<BTreeMap<Uuid, SocketAddr>> {
    let pool: PoolView = api.get("/v1/tiers/web/pool").await?;
    Ok(pool
        .pool
        .servers
        .iter()
        .filter(|s| s.state == ServerState::Ready)
        .filter_map(|s| {
            let address = format!("{}:{}", s.address, s.port).parse().ok()?;
            Some((s.instance_id, address))
        })
        .collect())
}

/// What a consul-template user's template renders: the servers listed by address, with the
/// same balancing, health checks and retries as the LB agent's configuration.
fn reload_config(listen: &str, servers: &BTreeMap<Uuid, SocketAddr>) -> String {
    let mut text = format!(
        "global\n    maxconn 4096\n\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    retries 3\n    option redispatch\n    retry-on conn-failure empty-response response-timeout\n\nfrontend web\n    bind {listen}\n    default_backend web\n\nbackend web\n    balance roundrobin\n    option httpchk GET /healthz\n"
    );
    for (id, address) in servers {
        text.push_str(&format!(
            "    server s-{} {address} check inter 1s fall 2 rise 1\n",
            &id.to_string()[..8]
        ));
    }
    text
}

/// Sends one command to HAProxy's master CLI and returns its answer.
async fn master_command(socket: &Path, command: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket).await?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await??;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_summaries() {
        let text = "Running 3s test @ http://127.0.0.1:1/\n  2 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.20ms  300.00us   9.00ms   90.00%\n  Latency Distribution\n     50%  850.00us\n     75%    1.10ms\n     90%    1.50ms\n     99%    2.50ms\n  30000 requests in 3.00s, 4.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  10000.50\nTransfer/sec:      1.33MB\n";
        let result = parse_wrk(text).unwrap_or_default();
        assert_eq!(result.requests, 30_000);
        assert_eq!(result.requests_per_sec, 10_000.5);
        assert_eq!(result.latency_p50_ms, 0.85);
        assert_eq!(result.latency_p99_ms, 2.5);
        assert_eq!(result.socket_errors, 3);
        assert_eq!(result.non_2xx, 4);
        assert_eq!(result.errors, 7);
    }
}

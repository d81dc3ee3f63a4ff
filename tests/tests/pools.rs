//! Load-balancer pools end to end: real controllers, worker agents running `strata-workload`
//! instances, and LB agents (`--lb haproxy`) running the real HAProxy, with a request stream
//! through the load balancer counting every failed request.
//!
//! These run when `STRATA_E2E=1` (deploy/test.sh and CI set it) and HAProxy is installed
//! (`deploy/install-deps.sh` installs it). Traffic goes to 127.0.0.1 only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use strata_tests::{
    e2e_enabled, eventually, free_port, kill_instances, processes_of_instance, send, summary,
    until, workload_tier, AgentProcess, Cluster, ClusterOptions, ADMIN_TOKEN,
};

/// The HAProxy binary, or `None` (and a skip line) when it is not installed.
fn haproxy(test: &str) -> Option<PathBuf> {
    if !e2e_enabled(test) {
        return None;
    }
    for candidate in [
        "/usr/sbin/haproxy",
        "/usr/local/sbin/haproxy",
        "/usr/bin/haproxy",
    ] {
        if Path::new(candidate).exists() {
            return Some(PathBuf::from(candidate));
        }
    }
    println!("skipped: {test}: haproxy not installed (deploy/install-deps.sh installs it)");
    None
}

struct Env {
    cluster: Cluster,
    agents: BTreeMap<String, AgentProcess>,
    dir: tempfile::TempDir,
    haproxy: PathBuf,
    seen: Mutex<BTreeSet<String>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            agent.kill();
        }
        // HAProxy outlives a killed agent, like any instance; stop every one this test ran.
        for node in self.agents.keys() {
            kill_haproxy(&self.lb_state_dir(node));
        }
        let seen: Vec<String> = self
            .seen
            .lock()
            .map(|seen| seen.iter().cloned().collect())
            .unwrap_or_default();
        kill_instances(&seen);
    }
}

impl Env {
    /// One controller, worker agents `workers` and LB agents `balancers`.
    async fn start(haproxy: PathBuf, workers: &[&str], balancers: &[&str]) -> anyhow::Result<Env> {
        let cluster = Cluster::start(ClusterOptions {
            nodes: 1,
            ..ClusterOptions::default()
        })
        .await?;
        let dir = tempfile::tempdir()?;
        let mut env = Env {
            cluster,
            agents: BTreeMap::new(),
            dir,
            haproxy,
            seen: Mutex::new(BTreeSet::new()),
        };
        for node in workers {
            env.start_agent(node, false)?;
        }
        for node in balancers {
            env.start_agent(node, true)?;
        }
        let expected = workers.len() + balancers.len();
        let env_ref = &env;
        eventually(
            Duration::from_secs(30),
            "agents registered and Ready",
            || async move {
                let nodes = env_ref.get("/v1/nodes").await.map_err(|e| e.to_string())?;
                let nodes = nodes["items"].as_array().cloned().unwrap_or_default();
                let ready = nodes.iter().filter(|n| n["status"] == "Ready").count();
                until(ready == expected, (), || format!("{nodes:?}"))
            },
        )
        .await?;
        Ok(env)
    }

    fn lb_state_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("lb-state-{node}"))
    }

    fn start_agent(&mut self, node: &str, balancer: bool) -> anyhow::Result<()> {
        let addresses: Vec<String> = self
            .cluster
            .nodes
            .values()
            .map(|n| n.address.clone())
            .collect();
        let state_dir = self.lb_state_dir(node).display().to_string();
        let haproxy = self.haproxy.display().to_string();
        let flags: Vec<&str> = if balancer {
            vec![
                "--lb",
                "haproxy",
                "--haproxy-bin",
                &haproxy,
                "--lb-state-dir",
                &state_dir,
            ]
        } else {
            Vec::new()
        };
        let agent = AgentProcess::start(self.dir.path(), node, &addresses, &flags)?;
        self.agents.insert(node.to_string(), agent);
        Ok(())
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let answer = send(
            &self.cluster.http,
            Method::GET,
            &self.cluster.url(1, path),
            Some(ADMIN_TOKEN),
            None,
        )
        .await?;
        anyhow::ensure!(answer.status == 200, "GET {path}: {answer:?}");
        Ok(answer.body)
    }

    async fn write(&self, method: Method, path: &str, body: &Value) -> anyhow::Result<Value> {
        let answer = send(
            &self.cluster.http,
            method,
            &self.cluster.url(1, path),
            Some(ADMIN_TOKEN),
            Some(body),
        )
        .await?;
        anyhow::ensure!(answer.status < 300, "{path}: {answer:?}");
        Ok(answer.body)
    }

    async fn scale(&self, tier: &str, desired: u32) -> anyhow::Result<()> {
        self.write(
            Method::POST,
            &format!("/v1/tiers/{tier}/scale"),
            &json!({ "desired": desired }),
        )
        .await
        .map(|_| ())
    }

    async fn instances(&self, tier: &str) -> anyhow::Result<Vec<Value>> {
        let list = self.get(&format!("/v1/tiers/{tier}/instances")).await?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        if let Ok(mut seen) = self.seen.lock() {
            seen.extend(
                items
                    .iter()
                    .filter_map(|i| i["id"].as_str().map(String::from)),
            );
        }
        Ok(items)
    }

    async fn pool(&self, tier: &str) -> anyhow::Result<Value> {
        self.get(&format!("/v1/tiers/{tier}/pool")).await
    }

    /// Waits until `tier` has exactly `count` ready servers and no draining one, and every LB
    /// agent in `balancers` reports serving that pool version. Returns the pool.
    async fn settled(&self, tier: &str, count: usize, balancers: &[&str]) -> anyhow::Result<Value> {
        eventually(
            Duration::from_secs(40),
            &format!("{tier}: {count} ready servers served by {balancers:?}"),
            || async move {
                let pool = self.pool(tier).await.map_err(|e| e.to_string())?;
                let servers = pool["servers"].as_array().cloned().unwrap_or_default();
                let ready = servers.iter().filter(|s| s["state"] == "ready").count();
                let version = pool["version"].as_u64().unwrap_or(0);
                let reported: BTreeMap<String, u64> = pool["balancers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|b| {
                        (
                            b["node"].as_str().unwrap_or("").to_string(),
                            b["report"]["version"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                let synced = balancers
                    .iter()
                    .all(|node| reported.get(*node) == Some(&version));
                let instances = self.instances(tier).await.map_err(|e| e.to_string())?;
                until(
                    ready == count && servers.len() == count && synced,
                    pool.clone(),
                    || format!("pool {pool}; instances {}", summary(&instances)),
                )
            },
        )
        .await
    }

    /// The ids of `tier`'s ready servers.
    async fn ready_ids(&self, tier: &str) -> anyhow::Result<BTreeSet<String>> {
        let pool = self.pool(tier).await?;
        Ok(pool["servers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|s| s["state"] == "ready")
            .filter_map(|s| s["instance_id"].as_str().map(String::from))
            .collect())
    }
}

/// A tier of workloads behind a load balancer on `listen`, with quick health checks on both
/// sides and no slow start (so a new server takes its share of requests at once).
fn balanced_tier(name: &str, listen: &str, max: u32, extra: Value) -> Value {
    let mut tier = workload_tier(name, 1, max);
    let mut balancer = json!({
        "listen": listen,
        "slowstart": "0s",
        "drain_timeout": "20s",
    });
    if let (Some(balancer), Some(extra)) = (balancer.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            balancer.insert(key.clone(), value.clone());
        }
    }
    tier["load_balancer"] = balancer;
    tier
}

/// What a request stream saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    /// The first failures, for the assertion message.
    failures: Vec<String>,
    /// Which instance answered, and how often.
    by_instance: BTreeMap<String, u64>,
}

/// `clients` concurrent loops of `GET url` until stopped: a steady request stream.
struct Stream {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stream {
    fn start(url: String, clients: usize) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, tally, sent, url) =
                    (stop.clone(), tally.clone(), sent.clone(), url.clone());
                tokio::spawn(async move {
                    // A client per loop: each keeps its own connections, like separate users.
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap_or_default();
                    while !stop.load(Ordering::Relaxed) {
                        sent.fetch_add(1, Ordering::Relaxed);
                        let outcome = match http.get(&url).send().await {
                            Ok(response) if response.status().is_success() => response
                                .json::<Value>()
                                .await
                                .map(|body| body["instance_id"].as_str().unwrap_or("").to_string())
                                .map_err(|error| format!("body: {error}")),
                            Ok(response) => Err(format!("status {}", response.status())),
                            Err(error) => Err(format!("{error}")),
                        };
                        if let Ok(mut tally) = tally.lock() {
                            match outcome {
                                Ok(instance) => {
                                    tally.ok += 1;
                                    *tally.by_instance.entry(instance).or_default() += 1;
                                }
                                Err(error) => {
                                    tally.failed += 1;
                                    if tally.failures.len() < 10 {
                                        tally.failures.push(error);
                                    }
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Stream {
            stop,
            tally,
            sent,
            tasks,
        }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let _ = self.sent;
        self.tally
            .lock()
            .map(|mut tally| std::mem::take(&mut *tally))
            .unwrap_or_default()
    }
}

/// Process ids of the HAProxy master and workers started with `state_dir` in their command
/// line (the agent's rendered config lives there).
fn haproxy_pids(state_dir: &Path) -> Vec<i32> {
    let needle = state_dir.display().to_string();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).to_string();
        let mut args = cmdline.split('\0');
        // The program itself must be HAProxy: the LB agent's own command line names both the
        // haproxy binary and the state dir.
        let program = args.next().unwrap_or("");
        if program.ends_with("haproxy") && args.any(|arg| arg.contains(&needle)) {
            pids.push(pid);
        }
    }
    pids
}

fn kill_9(pid: impl std::fmt::Display) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

fn kill_haproxy(state_dir: &Path) {
    for pid in haproxy_pids(state_dir) {
        kill_9(pid);
    }
}

/// GETs through the load balancer until every one of `expected` has answered, or fails.
async fn reaches_all(url: &str, expected: &BTreeSet<String>) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut answered = BTreeSet::new();
    for _ in 0..(expected.len() * 20).max(20) {
        let body: Value = http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if let Some(id) = body["instance_id"].as_str() {
            answered.insert(id.to_string());
        }
        if expected.is_subset(&answered) {
            return Ok(());
        }
    }
    anyhow::bail!("through {url} only {answered:?} of {expected:?} answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pool_follows_scale_out_and_in_with_no_failed_request() -> anyhow::Result<()> {
    let Some(haproxy) = haproxy("the_pool_follows_scale_out_and_in_with_no_failed_request") else {
        return Ok(());
    };
    let env = Env::start(haproxy, &["h1", "h2"], &["lb-1"]).await?;
    let listen = format!("127.0.0.1:{}", free_port());
    env.write(
        Method::PUT,
        "/v1/tiers/web",
        &balanced_tier("web", &listen, 8, json!({})),
    )
    .await?;
    env.scale("web", 2).await?;
    env.settled("web", 2, &["lb-1"]).await?;
    let url = format!("http://{listen}/");
    reaches_all(&url, &env.ready_ids("web").await?).await?;
    let tier = env.get("/v1/tiers/web").await?;
    assert_eq!(tier["status"]["endpoints"], json!([listen]), "{tier}");

    let stream = Stream::start(url.clone(), 8);
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.scale("web", 6).await?;
    env.settled("web", 6, &["lb-1"]).await?;
    let six = env.ready_ids("web").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.scale("web", 2).await?;
    env.settled("web", 2, &["lb-1"]).await?;
    eventually(Duration::from_secs(30), "the surplus stopped", || async {
        let instances = env.instances("web").await.map_err(|e| e.to_string())?;
        let live = instances
            .iter()
            .filter(|i| !matches!(i["phase"].as_str(), Some("Terminated" | "Failed" | "Lost")))
            .count();
        until(live == 2, (), || summary(&instances))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = stream.finish().await;
    assert_eq!(tally.failed, 0, "failed requests: {tally:?}");
    for id in &six {
        assert!(
            tally.by_instance.get(id).copied().unwrap_or(0) > 0,
            "instance {id} never received traffic: {tally:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_an_instance_costs_no_request_and_it_leaves_the_pool() -> anyhow::Result<()> {
    let Some(haproxy) = haproxy("kill_9_of_an_instance_costs_no_request_and_it_leaves_the_pool")
    else {
        return Ok(());
    };
    let env = Env::start(haproxy, &["h1"], &["lb-1"]).await?;
    let listen = format!("127.0.0.1:{}", free_port());
    env.write(
        Method::PUT,
        "/v1/tiers/web",
        &balanced_tier("web", &listen, 4, json!({})),
    )
    .await?;
    env.scale("web", 3).await?;
    env.settled("web", 3, &["lb-1"]).await?;
    let url = format!("http://{listen}/");
    let stream = Stream::start(url, 6);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = env
        .ready_ids("web")
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no server"))?;
    let killed_at = Instant::now();
    for pid in processes_of_instance(&victim) {
        kill_9(pid);
    }
    eventually(
        Duration::from_secs(20),
        "the killed instance left the pool",
        || async {
            let ready = env.ready_ids("web").await.map_err(|e| e.to_string())?;
            until(!ready.contains(&victim), (), || format!("{ready:?}"))
        },
    )
    .await?;
    let left_after = killed_at.elapsed();
    // The agent sees its child exit at once and reports it within a heartbeat (300 ms here);
    // the planner commits it within a round. Far inside the health check's own detection
    // time (2 failures x 300 ms interval + 300 ms timeout), plus a heartbeat and a round.
    let bound = Duration::from_millis(2 * 300 + 300 + 300 + 500 + 1_000);
    assert!(left_after < bound, "left the pool after {left_after:?}");
    env.settled("web", 3, &["lb-1"]).await?;
    let tally = stream.finish().await;
    assert_eq!(tally.failed, 0, "failed requests: {tally:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_in_drains_a_slow_request_before_the_instance_stops() -> anyhow::Result<()> {
    let Some(haproxy) = haproxy("scale_in_drains_a_slow_request_before_the_instance_stops") else {
        return Ok(());
    };
    let env = Env::start(haproxy, &["h1"], &["lb-1"]).await?;
    let listen = format!("127.0.0.1:{}", free_port());
    env.write(
        Method::PUT,
        "/v1/tiers/web",
        &balanced_tier("web", &listen, 4, json!({"algorithm": "leastconn"})),
    )
    .await?;
    env.scale("web", 2).await?;
    env.settled("web", 2, &["lb-1"]).await?;
    // Both servers UP in HAProxy itself (its checks passed), not only in the pool it was given.
    eventually(
        Duration::from_secs(20),
        "HAProxy has both servers UP",
        || async {
            let pool = env.pool("web").await.map_err(|e| e.to_string())?;
            let up = pool["balancers"][0]["report"]["servers"]
                .as_array()
                .map_or(0, |servers| {
                    servers
                        .iter()
                        .filter(|server| {
                            server["status"]
                                .as_str()
                                .is_some_and(|s| s.starts_with("UP"))
                        })
                        .count()
                });
            until(up == 2, (), || pool.to_string())
        },
    )
    .await?;
    // Two slow requests, the second once the first is under way: leastconn then gives it the
    // other server (sent together, HAProxy's threads could both pick the same idle one).
    let slow_url = format!("http://{listen}/?sleep_ms=4000");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let (http, url) = (http.clone(), slow_url.clone());
        slow.push(tokio::spawn(async move {
            let response = http.get(url).send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await?;
            Ok::<_, anyhow::Error>((status, body, Instant::now()))
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let scaled_at = Instant::now();
    env.scale("web", 1).await?;
    // While the slow requests run, the leaving instance drains but keeps running.
    let leaving = eventually(Duration::from_secs(5), "an instance drains", || async {
        let instances = env.instances("web").await.map_err(|e| e.to_string())?;
        let draining = instances
            .iter()
            .find(|i| i["phase"] == "Draining")
            .and_then(|i| i["id"].as_str())
            .map(String::from);
        until(draining.is_some(), draining.unwrap_or_default(), || {
            summary(&instances)
        })
    })
    .await?;
    let mut done = Vec::new();
    for task in slow {
        done.push(task.await??);
    }
    for (status, body, _) in &done {
        assert_eq!(*status, 200, "{body}");
    }
    assert!(
        done.iter()
            .any(|(_, body, _)| body["instance_id"] == leaving.as_str()),
        "no slow request went to the leaving instance {leaving}: {done:?}"
    );
    let finished = done.iter().map(|(_, _, at)| *at).max().unwrap_or(scaled_at);
    // Stopped only after the request it was serving finished: its drain ended no earlier.
    let stopped = eventually(
        Duration::from_secs(30),
        "the drained instance stops",
        || async {
            let instances = env.instances("web").await.map_err(|e| e.to_string())?;
            let phase = instances
                .iter()
                .find(|i| i["id"] == leaving.as_str())
                .and_then(|i| i["phase"].as_str())
                .unwrap_or("gone")
                .to_string();
            until(
                matches!(phase.as_str(), "Terminated" | "gone"),
                Instant::now(),
                || summary(&instances),
            )
        },
    )
    .await?;
    assert!(stopped >= finished);
    let events = env.get("/v1/events?object=tier/web").await?;
    let ended = events["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .find(|e| {
            e["reason"] == "InstanceStopping"
                && e["message"].as_str().is_some_and(|m| m.contains(&leaving))
        })
        .ok_or_else(|| anyhow::anyhow!("no InstanceStopping event for {leaving}: {events}"))?;
    let message = ended["message"].as_str().unwrap_or("");
    assert!(message.contains("no session left"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn balancers_converge_survive_restarts_and_apply_pool_changes_without_reload(
) -> anyhow::Result<()> {
    let Some(haproxy) =
        haproxy("balancers_converge_survive_restarts_and_apply_pool_changes_without_reload")
    else {
        return Ok(());
    };
    let mut env = Env::start(haproxy, &["h1"], &["lb-1", "lb-2"]).await?;
    let listen = format!("127.0.0.1:{}", free_port());
    env.write(
        Method::PUT,
        "/v1/tiers/web",
        &balanced_tier("web", &listen, 4, json!({})),
    )
    .await?;
    env.scale("web", 2).await?;
    let pool = env.settled("web", 2, &["lb-1", "lb-2"]).await?;
    let pids = |pool: &Value| -> BTreeMap<String, (u64, u64)> {
        pool["balancers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| {
                (
                    b["node"].as_str().unwrap_or("").to_string(),
                    (
                        b["worker_pid"].as_u64().unwrap_or(0),
                        b["reloads"].as_u64().unwrap_or(0),
                    ),
                )
            })
            .collect()
    };
    let before = pids(&pool);
    assert!(before.values().all(|(pid, _)| *pid > 0), "{pool}");
    // Ten pool changes: both balancers follow each, and neither reloads.
    for round in 0..10 {
        let count = if round % 2 == 0 { 3 } else { 2 };
        env.scale("web", count).await?;
        env.settled("web", count as usize, &["lb-1", "lb-2"])
            .await?;
    }
    let after = env.settled("web", 2, &["lb-1", "lb-2"]).await?;
    assert_eq!(pids(&after), before, "a pool change reloaded HAProxy");

    // HAProxy killed with kill -9: its agent brings it back with the current pool.
    kill_haproxy(&env.lb_state_dir("lb-1"));
    let url = format!("http://{listen}/");
    let ready = env.ready_ids("web").await?;
    eventually(Duration::from_secs(20), "HAProxy is back", || async {
        let pids = haproxy_pids(&env.lb_state_dir("lb-1"));
        until(!pids.is_empty(), (), || {
            let log = env.agents.get("lb-1").map(AgentProcess::log_tail);
            format!("no haproxy; lb-1 log: {}", log.unwrap_or_default())
        })
    })
    .await?;
    env.scale("web", 3).await?;
    env.settled("web", 3, &["lb-1", "lb-2"]).await?;

    // The LB agent restarted: it serves the current pool.
    if let Some(agent) = env.agents.get_mut("lb-1") {
        agent.kill();
        agent.restart()?;
    }
    env.scale("web", 2).await?;
    env.settled("web", 2, &["lb-1", "lb-2"]).await?;
    // lb-2 still serves; stop it to check lb-1 alone serves every instance.
    if let Some(agent) = env.agents.get_mut("lb-2") {
        agent.kill();
    }
    kill_haproxy(&env.lb_state_dir("lb-2"));
    let _ = ready;
    reaches_all(&url, &env.ready_ids("web").await?).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listen_address_that_cannot_be_bound_is_reported_and_spares_other_tiers(
) -> anyhow::Result<()> {
    let Some(haproxy) =
        haproxy("a_listen_address_that_cannot_be_bound_is_reported_and_spares_other_tiers")
    else {
        return Ok(());
    };
    let env = Env::start(haproxy, &["h1"], &["lb-1"]).await?;
    // A port this test holds: taken for HAProxy.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_address = taken.local_addr()?.to_string();
    let good = format!("127.0.0.1:{}", free_port());
    env.write(
        Method::PUT,
        "/v1/tiers/good",
        &balanced_tier("good", &good, 2, json!({})),
    )
    .await?;
    env.write(
        Method::PUT,
        "/v1/tiers/taken",
        &balanced_tier("taken", &taken_address, 2, json!({})),
    )
    .await?;
    // TEST-NET-1 (RFC 5737) is never local: nothing can bind it.
    env.write(
        Method::PUT,
        "/v1/tiers/foreign",
        &balanced_tier("foreign", "192.0.2.1:8080", 2, json!({})),
    )
    .await?;
    env.settled("good", 1, &["lb-1"]).await?;
    reaches_all(&format!("http://{good}/"), &env.ready_ids("good").await?).await?;
    for tier in ["taken", "foreign"] {
        eventually(
            Duration::from_secs(20),
            &format!("{tier}: LoadBalancerReady false"),
            || async {
                let view = env
                    .get(&format!("/v1/tiers/{tier}"))
                    .await
                    .map_err(|e| e.to_string())?;
                let condition = view["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| c["type"] == "LoadBalancerReady");
                let failed = condition
                    .as_ref()
                    .is_some_and(|c| c["status"] == false && c["reason"] == "LoadBalancerFailed");
                until(failed, (), || format!("{view}"))
            },
        )
        .await?;
    }
    // Two tiers on one address are refused with the field path.
    let answer = send(
        &env.cluster.http,
        Method::PUT,
        &env.cluster.url(1, "/v1/tiers/twin"),
        Some(ADMIN_TOKEN),
        Some(&balanced_tier("twin", &good, 2, json!({}))),
    )
    .await?;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(
        answer.body["errors"][0]["path"], "load_balancer.listen",
        "{answer:?}"
    );
    drop(taken);
    Ok(())
}

//! The autoscaler end to end: real controllers, worker agents running `strata-workload`, an LB
//! agent running the real HAProxy, and a steady request stream through the load balancer that
//! counts every failed request. A CPU policy (`?work_ms=` burns CPU in the workload) and a
//! requests-per-second policy each scale a tier out under load and back to `min` once the load
//! stops and the stabilization window has passed; a leader failover under steady load makes no
//! decision; a custom metric pushed to a follower scales a tier, a manual count pauses it and
//! `--auto` hands it back; bad input is refused with its field path.
//!
//! These run when `STRATA_E2E=1` (deploy/test.sh and CI set it) and HAProxy is installed
//! (`deploy/install-deps.sh` installs it). Traffic goes to 127.0.0.1 only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{json, Value};
use strata_tests::{
    binary, e2e_enabled, eventually, free_port, kill_instances, send, summary, until,
    workload_tier, AgentProcess, Answer, Cluster, ClusterOptions, ADMIN_TOKEN,
};

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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Controllers, worker agents and LB agents; stops every agent, HAProxy and instance on drop.
struct Env {
    cluster: Cluster,
    agents: BTreeMap<String, AgentProcess>,
    dir: tempfile::TempDir,
    haproxy: Option<PathBuf>,
    seen: Mutex<BTreeSet<String>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            agent.kill();
        }
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
    async fn start(
        controllers: u64,
        haproxy: Option<PathBuf>,
        workers: &[&str],
        balancers: &[&str],
    ) -> anyhow::Result<Env> {
        let cluster = Cluster::start(ClusterOptions {
            nodes: controllers,
            ..ClusterOptions::default()
        })
        .await?;
        let mut env = Env {
            cluster,
            agents: BTreeMap::new(),
            dir: tempfile::tempdir()?,
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
        let haproxy = self
            .haproxy
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_default();
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

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        // Any running node: writes are forwarded, reads are linearizable.
        let mut last = None;
        for node in self.cluster.nodes.keys() {
            match send(
                &self.cluster.http,
                method.clone(),
                &self.cluster.url(*node, path),
                Some(ADMIN_TOKEN),
                body,
            )
            .await
            {
                Ok(answer) if answer.status < 500 => return Ok(answer),
                Ok(answer) => last = Some(anyhow::anyhow!("{path}: {answer:?}")),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no controller")))
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let answer = self.request(Method::GET, path, None).await?;
        anyhow::ensure!(answer.status == 200, "GET {path}: {answer:?}");
        Ok(answer.body)
    }

    async fn write(&self, method: Method, path: &str, body: &Value) -> anyhow::Result<Value> {
        let answer = self.request(method, path, Some(body)).await?;
        anyhow::ensure!(answer.status < 300, "{path}: {answer:?}");
        Ok(answer.body)
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

    /// The tier's scaling events (`ScaledOut`, `ScaledIn`), oldest first.
    async fn decisions(&self, tier: &str) -> anyhow::Result<Vec<Value>> {
        let events = self.get(&format!("/v1/events?object=tier/{tier}")).await?;
        Ok(events["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|e| matches!(e["reason"].as_str(), Some("ScaledOut" | "ScaledIn")))
            .collect())
    }

    /// Waits until `tier` has `count` ready servers in its pool, none draining, and no
    /// instance left that is not Running and healthy.
    async fn settled(&self, tier: &str, count: usize, within: Duration) -> anyhow::Result<()> {
        eventually(
            within,
            &format!("{tier}: {count} ready servers"),
            || async move {
                let pool = self
                    .get(&format!("/v1/tiers/{tier}/pool"))
                    .await
                    .map_err(|e| e.to_string())?;
                let servers = pool["servers"].as_array().cloned().unwrap_or_default();
                let ready = servers.iter().filter(|s| s["state"] == "ready").count();
                let instances = self.instances(tier).await.map_err(|e| e.to_string())?;
                let live = instances
                    .iter()
                    .filter(|i| {
                        !matches!(i["phase"].as_str(), Some("Terminated" | "Failed" | "Lost"))
                    })
                    .count();
                until(
                    ready == count && servers.len() == count && live == count,
                    (),
                    || format!("pool {pool}; instances {}", summary(&instances)),
                )
            },
        )
        .await
    }

    /// Runs `stratactl` against every controller (it fails over between them).
    fn stratactl(&self, args: &[&str]) -> anyhow::Result<String> {
        let servers: Vec<String> = self
            .cluster
            .nodes
            .values()
            .map(|node| node.address.clone())
            .collect();
        let output = std::process::Command::new(binary("stratactl"))
            .arg("--server")
            .arg(servers.join(","))
            .arg("--token")
            .arg(ADMIN_TOKEN)
            .args(args)
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "stratactl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).to_string())
    }
}

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
        let program = args.next().unwrap_or("");
        if program.ends_with("haproxy") && args.any(|arg| arg.contains(&needle)) {
            pids.push(pid);
        }
    }
    pids
}

fn kill_haproxy(state_dir: &Path) {
    for pid in haproxy_pids(state_dir) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
}

/// A tier of workloads behind HAProxy on `listen`, autoscaled between `min` and `max` by
/// `policies`, with a short stabilization window so a test sees the scale-in.
fn autoscaled_tier(name: &str, listen: &str, min: u32, max: u32, policies: Value) -> Value {
    let mut tier = workload_tier(name, min, max);
    tier["template"]["cpu"] = json!(0.1);
    tier["scaling"] = json!({
        "min": min,
        "max": max,
        "policies": policies,
        "scale_in_stabilization": format!("{}s", STABILIZATION.as_secs()),
    });
    tier["load_balancer"] = json!({
        "listen": listen,
        "slowstart": "2s",
        "drain_timeout": "10s",
    });
    tier
}

/// The tiers' scale-in stabilization window.
const STABILIZATION: Duration = Duration::from_secs(10);

/// What a request stream saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    failures: Vec<String>,
}

/// An open-loop request stream at a fixed rate (spread over `clients` connections), so the
/// load does not depend on how fast the tier answers: the load generator's request rate is
/// what the requests-per-second policy sees, and `work_ms` per request fixes the CPU demand.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, per_second: f64, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let period = Duration::from_secs_f64(clients as f64 / per_second);
        let tasks = (0..clients)
            .map(|client| {
                let (stop, tally, url) = (stop.clone(), tally.clone(), url.clone());
                tokio::spawn(async move {
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap_or_default();
                    // Spread the clients over one period.
                    tokio::time::sleep(period.mul_f64(client as f64 / clients as f64)).await;
                    let mut ticks = tokio::time::interval(period);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        ticks.tick().await;
                        let outcome = match http.get(&url).send().await {
                            Ok(response) if response.status().is_success() => response
                                .bytes()
                                .await
                                .map(|_| ())
                                .map_err(|e| format!("body: {e}")),
                            Ok(response) => Err(format!("status {}", response.status())),
                            Err(error) => Err(format!("at {}: {error:?}", now_ms())),
                        };
                        if let Ok(mut tally) = tally.lock() {
                            match outcome {
                                Ok(()) => tally.ok += 1,
                                Err(error) => {
                                    tally.failed += 1;
                                    if tally.failures.len() < 10 {
                                        tally.failures.push(error);
                                    }
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Load { stop, tally, tasks }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.tally
            .lock()
            .map(|mut tally| std::mem::take(&mut *tally))
            .unwrap_or_default()
    }
}

/// Waits until every LB node serves the tier's current pool and requests through `url`
/// succeed, so a load started afterwards meets a load balancer that is ready for it.
async fn lb_serving(env: &Env, tier: &str, url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    eventually(
        Duration::from_secs(30),
        &format!("{url} serves {tier}"),
        || {
            let http = http.clone();
            async move {
                let pool = env
                    .get(&format!("/v1/tiers/{tier}/pool"))
                    .await
                    .map_err(|e| e.to_string())?;
                let version = pool["version"].as_u64().unwrap_or(0);
                let balancers = pool["balancers"].as_array().cloned().unwrap_or_default();
                let synced = !balancers.is_empty()
                    && balancers
                        .iter()
                        .all(|b| b["report"]["version"].as_u64() == Some(version));
                if !synced {
                    return Err(format!("balancers not at version {version}: {pool}"));
                }
                for _ in 0..5 {
                    let answer = http.get(url).send().await.map_err(|e| format!("{e:?}"))?;
                    if !answer.status().is_success() {
                        return Err(format!("status {}", answer.status()));
                    }
                }
                Ok(Some(()))
            }
        },
    )
    .await
}

/// Waits until the tier's pool has at least `count` ready servers; returns when.
async fn ready_at_least(
    env: &Env,
    tier: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<()> {
    eventually(
        within,
        &format!("{tier}: at least {count} ready"),
        || async move {
            let pool = env
                .get(&format!("/v1/tiers/{tier}/pool"))
                .await
                .map_err(|e| e.to_string())?;
            let ready = pool["servers"]
                .as_array()
                .map(|s| s.iter().filter(|s| s["state"] == "ready").count())
                .unwrap_or(0);
            until(ready >= count, (), || format!("{ready} ready: {pool}"))
        },
    )
    .await
}

/// The scale-out then scale-in cycle shared by the CPU and request-rate tests.
async fn scales_out_under_load_and_back_to_min(
    test: &str,
    metric: &str,
    policy: Value,
    load_url_suffix: &str,
    rate: f64,
) -> anyhow::Result<()> {
    let Some(haproxy) = haproxy(test) else {
        return Ok(());
    };
    let mut env = Env::start(1, Some(haproxy), &["h1", "h2"], &["lb-1"]).await?;
    let listen = format!("127.0.0.1:{}", free_port());
    env.write(
        Method::PUT,
        "/v1/tiers/web",
        &autoscaled_tier("web", &listen, 2, 6, json!([policy])),
    )
    .await?;
    env.settled("web", 2, Duration::from_secs(40)).await?;
    lb_serving(&env, "web", &format!("http://{listen}/")).await?;
    // A light stream all along (no CPU, 2 requests/s: far below either target), so failed
    // requests are counted during the scale-in too.
    let background = Load::start(format!("http://{listen}/"), 2.0, 1);
    // Idle for longer than the window: the tier must not move without load.
    tokio::time::sleep(STABILIZATION + Duration::from_secs(2)).await;
    anyhow::ensure!(
        env.decisions("web").await?.is_empty(),
        "decisions without load: {:?}",
        env.decisions("web").await?
    );

    let started = Instant::now();
    let load = Load::start(format!("http://{listen}/{load_url_suffix}"), rate, 8);
    // The policies react within their reaction time (3 s) of heartbeats and LB reports (1 s
    // each), and a process instance starts in well under a second: 30 s is the issue's bound.
    ready_at_least(&env, "web", 4, Duration::from_secs(30)).await?;
    let reached = started.elapsed();
    anyhow::ensure!(reached <= Duration::from_secs(30), "took {reached:?}");
    // Some more time at the new size, to see it hold and serve.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let stopped_ms = now_ms();
    let tally = load.finish().await;
    assert!(tally.ok > 0, "{tally:?}");
    assert_eq!(tally.failed, 0, "failed requests under load: {tally:?}");

    env.settled("web", 2, STABILIZATION + Duration::from_secs(45))
        .await?;
    let background = background.finish().await;
    assert_eq!(
        background.failed, 0,
        "failed requests while scaling: {background:?}"
    );

    // The events explain each step.
    let decisions = env.decisions("web").await?;
    let first = decisions
        .first()
        .ok_or_else(|| anyhow::anyhow!("no decision recorded"))?;
    assert_eq!(first["reason"], "ScaledOut", "{decisions:?}");
    let inputs = &first["scaling"];
    assert_eq!(inputs["from"], 2, "{first}");
    assert!(inputs["to"].as_u64().unwrap_or(0) >= 3, "{first}");
    assert_eq!(inputs["policies"][0]["metric"], metric, "{first}");
    let value = inputs["policies"][0]["value"].as_f64().unwrap_or(0.0);
    let target = inputs["policies"][0]["target"].as_f64().unwrap_or(f64::MAX);
    assert!(
        value > target,
        "scaled out with {value} under {target}: {first}"
    );
    assert!(
        first["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("scale out from 2 to") && m.contains(metric)),
        "{first}"
    );
    let last = decisions.last().cloned().unwrap_or_default();
    assert_eq!(last["reason"], "ScaledIn", "{decisions:?}");
    assert_eq!(last["scaling"]["to"], 2, "{last}");
    // Not before the stabilization window after the load stopped (the window holds the last
    // loaded recommendation for its whole length).
    let scaled_in_at = last["at_ms"].as_u64().unwrap_or(0);
    let window = u64::try_from(STABILIZATION.as_millis()).unwrap_or(0);
    assert!(
        scaled_in_at + 500 >= stopped_ms + window,
        "scaled in {} ms after the load stopped: {last}",
        scaled_in_at.saturating_sub(stopped_ms)
    );
    for decision in &decisions {
        assert!(
            decision["scaling"]["policies"]
                .as_array()
                .is_some_and(|p| !p.is_empty()),
            "a decision without its inputs: {decision}"
        );
    }

    // The CLI says the same in plain words.
    let events = env.stratactl(&["get", "events", "--object", "tier/web"])?;
    assert!(
        events.contains("ScaledOut") && events.contains("ScaledIn"),
        "{events}"
    );
    let described = env.stratactl(&["describe", "tier", "web"])?;
    assert!(described.contains("Scaling decisions:"), "{described}");
    assert!(described.contains("scale out from 2 to"), "{described}");
    assert!(described.contains("scale in from"), "{described}");
    assert!(described.contains(&format!("{metric}: ")), "{described}");

    // /metrics on the leader: the desired count, each policy's value and recommendation, and
    // decisions by direction.
    let leader = env.cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let metrics = env
        .cluster
        .http
        .get(env.cluster.url(leader, "/metrics"))
        .send()
        .await?
        .text()
        .await?;
    for needle in [
        "strata_tier_desired_instances{tier=\"web\"} 2",
        &format!("strata_autoscaler_policy_value{{tier=\"web\",policy=\"0\",metric=\"{metric}\"}}"),
        &format!(
            "strata_autoscaler_policy_recommendation{{tier=\"web\",policy=\"0\",metric=\"{metric}\"}}"
        ),
        "strata_autoscaler_paused{tier=\"web\"} 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    let count = |direction: &str| {
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix(&format!(
                    "strata_autoscaler_decisions_total{{direction=\"{direction}\"}} "
                ))
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(count("out") >= 1 && count("in") >= 1, "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cpu_policy_scales_out_under_load_and_back_to_min_with_no_failed_request(
) -> anyhow::Result<()> {
    // 40 requests/s of 10 ms CPU each: 0.4 cores, 200% of each instance's 0.1-core
    // reservation on 2 instances, so a 50% target asks for 8 (max 6).
    scales_out_under_load_and_back_to_min(
        "a_cpu_policy_scales_out_under_load_and_back_to_min_with_no_failed_request",
        "cpu_utilization",
        json!({"metric": "cpu_utilization", "target": 50, "reaction_time": "3s"}),
        "?work_ms=10",
        40.0,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_rate_policy_scales_out_under_load_and_back_to_min_with_no_failed_request(
) -> anyhow::Result<()> {
    // 45 requests/s against a target of 10 per instance: 5 instances.
    scales_out_under_load_and_back_to_min(
        "a_request_rate_policy_scales_out_under_load_and_back_to_min_with_no_failed_request",
        "requests_per_second",
        json!({"metric": "requests_per_second", "target": 10, "reaction_time": "3s"}),
        "",
        45.0,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_failover_under_steady_load_makes_no_scaling_decision() -> anyhow::Result<()> {
    let test = "a_leader_failover_under_steady_load_makes_no_scaling_decision";
    let Some(haproxy) = haproxy(test) else {
        return Ok(());
    };
    let mut env = Env::start(3, Some(haproxy), &["h1", "h2"], &["lb-1"]).await?;
    let listen = format!("127.0.0.1:{}", free_port());
    // 35 requests/s against 10 per instance: 3.5, so 4 instances, with 12% of margin either
    // way before a different count would be right.
    env.write(
        Method::PUT,
        "/v1/tiers/web",
        &autoscaled_tier(
            "web",
            &listen,
            2,
            8,
            json!([{"metric": "requests_per_second", "target": 10, "reaction_time": "3s"}]),
        ),
    )
    .await?;
    env.settled("web", 2, Duration::from_secs(40)).await?;
    lb_serving(&env, "web", &format!("http://{listen}/")).await?;
    let load = Load::start(format!("http://{listen}/"), 35.0, 5);
    env.settled("web", 4, Duration::from_secs(40)).await?;
    // Steady: no decision for a while before the failover.
    let steady = env.decisions("web").await?.len();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before = env.decisions("web").await?;
    anyhow::ensure!(
        before.len() == steady,
        "the load is not steady enough to test a failover: {before:?}"
    );

    let old = env.cluster.wait_for_leader(Duration::from_secs(10)).await?;
    env.cluster.kill(old);
    let new = env
        .cluster
        .wait_for_leader_other_than(Some(old), Duration::from_secs(20))
        .await?;
    // Longer than the reaction time plus the time the agents take to find the new leader,
    // and longer than the window: any decision the new leader would make, it makes here.
    tokio::time::sleep(STABILIZATION + Duration::from_secs(8)).await;
    let after = env.decisions("web").await?;
    assert_eq!(
        after.len(),
        before.len(),
        "decisions after the failover: {:?}",
        &after[before.len().min(after.len())..]
    );
    // Not vacuous: the new leader evaluates the tier with data and agrees with the count.
    let metrics = env
        .cluster
        .http
        .get(env.cluster.url(new, "/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let recommendation = "strata_autoscaler_policy_recommendation{tier=\"web\",policy=\"0\",metric=\"requests_per_second\"} 4";
    assert!(metrics.contains(recommendation), "{metrics}");
    let tally = load.finish().await;
    assert_eq!(tally.failed, 0, "failed requests: {tally:?}");
    let tier = env.get("/v1/tiers/web").await?;
    assert_eq!(tier["status"]["desired"], 4, "{tier}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_custom_metric_pushed_to_a_follower_scales_and_a_manual_count_pauses_until_auto(
) -> anyhow::Result<()> {
    let test = "a_custom_metric_pushed_to_a_follower_scales_and_a_manual_count_pauses_until_auto";
    if !e2e_enabled(test) {
        return Ok(());
    }
    let mut env = Env::start(3, None, &["h1"], &[]).await?;
    let mut tier = workload_tier("jobs", 1, 5);
    tier["scaling"]["policies"] = json!([
        {"metric": "custom", "name": "queue_depth", "target": 10, "reaction_time": "2s"}
    ]);
    tier["scaling"]["scale_in_stabilization"] = json!("5m");
    env.write(Method::PUT, "/v1/tiers/jobs", &tier).await?;
    let leader = env.cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = env
        .cluster
        .nodes
        .keys()
        .copied()
        .find(|id| *id != leader)
        .unwrap_or(leader);
    let push_url = env.cluster.url(follower, "/v1/tiers/jobs/metrics");
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (stop, http, url) = (stop.clone(), env.cluster.http.clone(), push_url.clone());
        tokio::spawn(async move {
            let mut refused = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match send(
                    &http,
                    Method::POST,
                    &url,
                    Some(ADMIN_TOKEN),
                    Some(&json!({"metric": "queue_depth", "value": 30})),
                )
                .await
                {
                    Ok(answer) if answer.status == 204 => {}
                    // No leader to take it right now: the client's cue to retry.
                    Ok(answer) if answer.status == 503 => {}
                    other => refused.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            refused
        })
    };
    // A queue of 30 on one instance against 10 per instance: 3.
    let env_ref = &env;
    eventually(Duration::from_secs(30), "jobs scaled to 3", || async move {
        let tier = env_ref
            .get("/v1/tiers/jobs")
            .await
            .map_err(|e| e.to_string())?;
        until(tier["status"]["desired"] == 3, (), || tier.to_string())
    })
    .await?;

    // By hand: paused, and said so.
    let out = env.stratactl(&["scale", "tier", "jobs", "2"])?;
    assert!(out.contains("paused"), "{out}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tier = env.get("/v1/tiers/jobs").await?;
    assert_eq!(tier["status"]["desired"], 2, "{tier}");
    let conditions = tier["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        conditions.iter().any(|c| c["type"] == "Autoscaling"
            && c["status"] == false
            && c["reason"] == "PausedByOperator"),
        "{tier}"
    );
    let described = env.stratactl(&["describe", "tier", "jobs"])?;
    assert!(
        described.contains("the autoscaler is paused"),
        "{described}"
    );

    // Handed back: the autoscaler decides again, from 2.
    let out = env.stratactl(&["scale", "tier", "jobs", "--auto"])?;
    assert!(out.contains("handed back"), "{out}");
    eventually(Duration::from_secs(30), "jobs back at 3", || async move {
        let tier = env_ref
            .get("/v1/tiers/jobs")
            .await
            .map_err(|e| e.to_string())?;
        until(
            tier["status"]["desired"] == 3 && tier["spec"]["scaling"]["desired"].is_null(),
            (),
            || tier.to_string(),
        )
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let refused = pusher.await?;
    assert!(refused.is_empty(), "pushes refused: {refused:?}");
    let events = env.stratactl(&["get", "events", "--object", "tier/jobs"])?;
    for reason in ["ScaledOut", "ScaledByOperator", "AutoscalingResumed"] {
        assert!(events.contains(reason), "{reason}: {events}");
    }
    Ok(())
}

fn paths(answer: &Answer) -> Vec<String> {
    answer.body["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["path"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_problem(answer: &Answer, status: u16, path: Option<&str>) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert!(
        answer.content_type.starts_with("application/problem+json"),
        "not a problem document: {answer:?}"
    );
    if let Some(path) = path {
        assert!(
            paths(answer).iter().any(|p| p == path),
            "expected an error at {path}: {answer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_policies_and_metrics_are_refused_with_their_field_path() -> anyhow::Result<()> {
    if !e2e_enabled("bad_policies_and_metrics_are_refused_with_their_field_path") {
        return Ok(());
    }
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let follower = if leader == 1 { 2 } else { 1 };
    // The follower takes writes once it has heard from a quorum (before that it answers 503
    // no-quorum, which a client retries elsewhere).
    let (http, warm_url) = (
        cluster.http.clone(),
        cluster.url(follower, "/v1/tiers/warm"),
    );
    eventually(Duration::from_secs(20), "the follower takes writes", || {
        let (http, url) = (http.clone(), warm_url.clone());
        async move {
            let answer = send(
                &http,
                Method::PUT,
                &url,
                Some(ADMIN_TOKEN),
                Some(&workload_tier("warm", 1, 1)),
            )
            .await
            .map_err(|e| e.to_string())?;
            until(answer.status < 300, (), || format!("{answer:?}"))
        }
    })
    .await?;
    let put = |body: Value| {
        let url = cluster.url(follower, "/v1/tiers/web");
        let http = cluster.http.clone();
        async move { send(&http, Method::PUT, &url, Some(ADMIN_TOKEN), Some(&body)).await }
    };
    let with_scaling = |scaling: Value| {
        let mut tier = workload_tier("web", 1, 4);
        tier["scaling"] = scaling;
        tier
    };
    let cpu = |extra: Value| {
        let mut policy = json!({"metric": "cpu_utilization", "target": 60});
        if let (Some(policy), Some(extra)) = (policy.as_object_mut(), extra.as_object()) {
            for (key, value) in extra {
                policy.insert(key.clone(), value.clone());
            }
        }
        policy
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown metric",
            with_scaling(json!({"min": 1, "max": 4, "policies": [{"metric": "gpu", "target": 1}]})),
            "scaling.policies[0].metric",
        ),
        (
            "zero target",
            with_scaling(json!({"min": 1, "max": 4, "policies": [cpu(json!({"target": 0}))]})),
            "scaling.policies[0].target",
        ),
        (
            "negative target",
            with_scaling(json!({"min": 1, "max": 4, "policies": [cpu(json!({"target": -5}))]})),
            "scaling.policies[0].target",
        ),
        (
            "invalid cron",
            with_scaling(json!({"min": 1, "max": 4, "schedules": [
                {"cron": "0 25 * * *", "duration": "1h", "min": 2}
            ]})),
            "scaling.schedules[0].cron",
        ),
        (
            "unknown time zone",
            with_scaling(json!({"min": 1, "max": 4, "schedules": [
                {"cron": "0 8 * * MON-FRI", "time_zone": "Europe/Atlantis", "duration": "1h", "min": 2}
            ]})),
            "scaling.schedules[0].time_zone",
        ),
        (
            "overlapping steps",
            with_scaling(json!({"min": 1, "max": 4, "policies": [{
                "type": "step", "metric": "cpu_utilization",
                "steps": [{"lower": 50, "upper": 80, "change": 1}, {"lower": 70, "change": 2}]
            }]})),
            "scaling.policies[0].steps[1]",
        ),
        (
            "min above max",
            with_scaling(json!({"min": 5, "max": 2})),
            "scaling.min",
        ),
    ];
    for (what, body, path) in cases {
        let answer = put(body).await?;
        assert_eq!(answer.status, 422, "{what}: {answer:?}");
        assert_problem(&answer, 422, Some(path));
    }

    // Custom metrics and the scale route.
    let mut tier = workload_tier("web", 1, 4);
    tier["scaling"]["policies"] =
        json!([{"metric": "custom", "name": "queue_depth", "target": 10}]);
    let created = put(tier).await?;
    assert!(created.status < 300, "{created:?}");
    for node in [leader, follower] {
        let metrics = |tier: &str| cluster.url(node, &format!("/v1/tiers/{tier}/metrics"));
        let post = |url: String, body: Vec<u8>| {
            let http = cluster.http.clone();
            async move {
                let response = http
                    .post(url)
                    .bearer_auth(ADMIN_TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let text = response.text().await?;
                anyhow::Ok(Answer {
                    status,
                    content_type,
                    body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
                })
            }
        };
        let ok = post(
            metrics("web"),
            br#"{"metric": "queue_depth", "value": 3}"#.to_vec(),
        )
        .await?;
        assert_eq!(ok.status, 204, "node {node}: {ok:?}");
        let unknown = post(
            metrics("nope"),
            br#"{"metric": "queue_depth", "value": 3}"#.to_vec(),
        )
        .await?;
        assert_problem(&unknown, 404, None);
        for body in [
            &br#"{"metric": "queue_depth", "value": 1e999}"#[..],
            &br#"{"metric": "queue_depth", "value": NaN}"#[..],
            &br#"{"metric": "queue_depth", "value": Infinity}"#[..],
        ] {
            let answer = post(metrics("web"), body.to_vec()).await?;
            assert_problem(&answer, 400, Some("value"));
        }
        let string = post(
            metrics("web"),
            br#"{"metric": "queue_depth", "value": "3"}"#.to_vec(),
        )
        .await?;
        assert_problem(&string, 422, Some("value"));
        let unused = post(
            metrics("web"),
            br#"{"metric": "latency", "value": 3}"#.to_vec(),
        )
        .await?;
        assert_problem(&unused, 422, Some("metric"));
        let stranger = post(
            metrics("web"),
            br#"{"metric": "queue_depth", "value": 3, "instance": "0b9e77d1-0000-4000-8000-000000000002"}"#
                .to_vec(),
        )
        .await?;
        assert_problem(&stranger, 422, Some("instance"));
        let scale = cluster.url(node, "/v1/tiers/web/scale");
        let both = post(scale.clone(), br#"{"desired": 2, "auto": true}"#.to_vec()).await?;
        assert_problem(&both, 422, Some("auto"));
        let neither = post(scale.clone(), br#"{}"#.to_vec()).await?;
        assert_problem(&neither, 422, Some("desired"));
        // Old clients' body still works.
        let old = post(scale, br#"{"desired": 2}"#.to_vec()).await?;
        assert_eq!(old.status, 200, "{old:?}");
    }
    assert_eq!(cluster.running().len(), 3, "a node crashed");
    Ok(())
}

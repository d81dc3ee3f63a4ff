//! A real network partition end to end: each host is a Linux network namespace joined to a
//! bridge in the root namespace, with one agent inside; the controller listens on the bridge.
//! Taking a host's link down cuts it off without killing anything, which is what a partition is
//! and what killing an agent (tests/agents.rs) only imitates.
//!
//! These run when `STRATA_E2E=1` and as root (creating namespaces, veths and bridges needs
//! `CAP_NET_ADMIN`); they need `ip` from iproute2 (deploy/install-deps.sh installs it). Every
//! namespace, link and process a run creates is removed when it ends, however it ends; a run
//! that was killed outright is cleaned up by the next one (see `sweep_stale`).

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use reqwest::Method;
use serde_json::Value;
use strata_tests::netns::{ip, running_as_root, Network};
use strata_tests::{
    e2e_enabled, eventually, ids, kill_instances, processes_of_instance, send, summary, until,
    workload_answers, workload_tier, AgentProcess, Cluster, ClusterOptions, ADMIN_TOKEN,
};

/// The controllers' `--heartbeat-grace`, as a flag and in seconds for deadlines.
const GRACE: &str = "3s";
const GRACE_SECS: u64 = 3;

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_is_replaced_and_its_stale_instances_stop_when_it_returns(
) -> anyhow::Result<()> {
    if !e2e_enabled("netns") {
        return Ok(());
    }
    if !running_as_root()? {
        println!("skipped: needs root to create network namespaces");
        return Ok(());
    }
    // As root with STRATA_E2E=1 the test must run: a missing `ip` is a failure, not a skip.
    let version = Command::new("ip").arg("-V").output().context(
        "run `ip -V`: iproute2 is required for this test (deploy/install-deps.sh installs it)",
    )?;
    ensure!(version.status.success(), "`ip -V` failed: {version:?}");

    let mut env = Env::start().await?;
    env.write(
        Method::PUT,
        "/v1/tiers/web",
        Some(&workload_tier("web", 3, 10)),
    )
    .await?;
    let three = env
        .wait_ready("web", 3, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", env.agent_logs()))?;
    let placed: BTreeMap<String, Value> = three
        .iter()
        .map(|i| (i["node"].as_str().unwrap_or("-").to_string(), i.clone()))
        .collect();
    assert_eq!(
        placed.keys().map(String::as_str).collect::<Vec<_>>(),
        HOSTS,
        "three instances should spread over the three hosts: {}",
        summary(&three)
    );
    // Each instance listens on its namespace's address and answers through the bridge.
    for host in &env.network.hosts {
        let instance = &placed[&host.node_id];
        assert_eq!(
            instance["address"].as_str(),
            Some(host.ip.to_string().as_str()),
            "an instance on {} should listen on its namespace's address",
            host.node_id
        );
        let body = workload_answers(&env.http, instance).await?;
        assert!(
            body.contains(instance["id"].as_str().unwrap_or("?")),
            "{body}"
        );
    }
    let on_a = placed["host-a"].clone();
    let on_a_id = on_a["id"].as_str().unwrap_or_default().to_string();
    let on_a_pids = processes_of_instance(&on_a_id);
    assert!(!on_a_pids.is_empty(), "no process for {on_a_id}");

    // Cut host-a off: its bridge-side link goes down; nothing is killed.
    let host_a = env.network.host("host-a")?;
    ip(&["link", "set", &host_a.bridge_veth, "down"])?;
    let cut = Instant::now();
    ensure!(
        workload_answers(&env.http, &on_a).await.is_err(),
        "host-a's instance still answers through the bridge after its link went down"
    );
    assert_eq!(
        processes_of_instance(&on_a_id),
        on_a_pids,
        "a partition is not a crash: the instance on host-a must keep running"
    );

    let not_ready_after: Cell<Option<Duration>> = Cell::new(None);
    let replaced_after: Cell<Option<Duration>> = Cell::new(None);
    let env_ref = &env;
    let (not_ready_ref, replaced_ref) = (&not_ready_after, &replaced_after);
    let replaced = eventually(
        Duration::from_secs(GRACE_SECS + 15),
        "host-a NotReady and 3 healthy instances on host-b and host-c",
        || async move {
            let nodes = env_ref.nodes().await.map_err(|e| e.to_string())?;
            let not_ready = nodes
                .iter()
                .any(|n| n["id"] == "host-a" && n["status"] == "NotReady");
            if not_ready && not_ready_ref.get().is_none() {
                not_ready_ref.set(Some(cut.elapsed()));
            }
            let instances = env_ref.instances("web").await.map_err(|e| e.to_string())?;
            let live = live(&instances);
            let replaced = live.len() == 3
                && live.iter().all(|i| {
                    i["phase"] == "Running"
                        && i["health"] == "Healthy"
                        && matches!(i["node"].as_str(), Some("host-b" | "host-c"))
                });
            if replaced && replaced_ref.get().is_none() {
                replaced_ref.set(Some(cut.elapsed()));
            }
            until(not_ready && replaced, live, || {
                format!(
                    "nodes {}; instances {}",
                    node_summary(&nodes),
                    summary(&instances)
                )
            })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", env.logs()))?;
    println!(
        "link down → host-a NotReady after {:?}, 3 healthy instances on host-b/host-c after {:?} (grace {GRACE})",
        not_ready_after.get().unwrap_or_default(),
        replaced_after.get().unwrap_or_default(),
    );
    let lost = env.instance(&on_a_id).await?;
    assert_eq!(lost["phase"], "Lost", "{lost}");
    assert_eq!(
        processes_of_instance(&on_a_id),
        on_a_pids,
        "the Lost instance must keep running while its host is cut off"
    );
    let agent_a = env.agents.get_mut("host-a").context("agent host-a")?;
    assert!(
        agent_a.is_running(),
        "the agent on host-a exited during the partition:\n{}",
        agent_a.log_tail()
    );
    for instance in &replaced {
        let body = workload_answers(&env.http, instance).await?;
        assert!(
            body.contains(instance["id"].as_str().unwrap_or("?")),
            "{body}"
        );
    }

    // The link comes back: host-a is Ready again and stops the instance it no longer has.
    ip(&["link", "set", &host_a.bridge_veth, "up"])?;
    let restored = Instant::now();
    let ready_after: Cell<Option<Duration>> = Cell::new(None);
    let ready_ref = &ready_after;
    let on_a_ref = &on_a_id;
    let env_ref = &env;
    eventually(
        Duration::from_secs(20),
        "host-a Ready and its stale instance stopped",
        || async move {
            let nodes = env_ref.nodes().await.map_err(|e| e.to_string())?;
            let ready = nodes
                .iter()
                .any(|n| n["id"] == "host-a" && n["status"] == "Ready");
            if ready && ready_ref.get().is_none() {
                ready_ref.set(Some(restored.elapsed()));
            }
            let left = processes_of_instance(on_a_ref);
            until(ready && left.is_empty(), (), || {
                format!("nodes {}; stale processes {left:?}", node_summary(&nodes))
            })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", env.logs()))?;
    println!(
        "link up → host-a Ready after {:?}, its stale instance's processes gone after {:?}",
        ready_after.get().unwrap_or_default(),
        restored.elapsed(),
    );
    let settled = env.wait_ready("web", 3, Duration::from_secs(20)).await?;
    assert_eq!(
        ids(&settled),
        ids(&replaced),
        "the return of host-a must not change the tier: {}",
        summary(&settled)
    );

    // No flapping: after more than a grace period host-a is still Ready, and each node changed
    // state exactly as the partition explains (host-a down once and up once, the others never).
    tokio::time::sleep(Duration::from_secs(GRACE_SECS + 1)).await;
    let nodes = env.nodes().await?;
    assert!(
        nodes.iter().all(|n| n["status"] == "Ready"),
        "{}",
        node_summary(&nodes)
    );
    for host in HOSTS {
        let events = env.get(&format!("/v1/events?object=node/{host}")).await?;
        let count = |reason: &str| {
            events["items"]
                .as_array()
                .map(|items| items.iter().filter(|e| e["reason"] == reason).count())
                .unwrap_or(0)
        };
        let expected = usize::from(host == "host-a");
        assert_eq!(count("NodeNotReady"), expected, "{host}: {events}");
        assert_eq!(count("NodeReady"), expected, "{host}: {events}");
        // The agent kept its registration through the partition.
        assert_eq!(count("NodeRegistered"), 1, "{host}: {events}");
    }
    let still = env.wait_ready("web", 3, Duration::from_secs(5)).await?;
    assert_eq!(ids(&still), ids(&replaced));
    Ok(())
}

/// One controller on the bridge and one agent in each namespace. Dropping it kills the agents
/// and every instance process seen, then (through its fields) the controller and the network.
struct Env {
    cluster: Cluster,
    http: reqwest::Client,
    agents: BTreeMap<String, AgentProcess>,
    /// Instance ids seen during the test, killed at the end whatever happened.
    seen: std::sync::Mutex<BTreeSet<String>>,
    /// Dropped after the processes above are gone, so nothing holds a namespace.
    network: Network,
    dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        for agent in self.agents.values_mut() {
            agent.kill();
        }
        let seen: Vec<String> = self
            .seen
            .get_mut()
            .map(|seen| seen.iter().cloned().collect())
            .unwrap_or_default();
        kill_instances(&seen);
    }
}

impl Env {
    async fn start() -> anyhow::Result<Env> {
        let network = Network::create(&HOSTS)?;
        let cluster = Cluster::start(ClusterOptions {
            nodes: 1,
            heartbeat_grace: GRACE,
            listen_host: IpAddr::V4(network.bridge_ip),
            ..ClusterOptions::default()
        })
        .await?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("build http client")?;
        let mut env = Env {
            cluster,
            http,
            agents: BTreeMap::new(),
            seen: std::sync::Mutex::new(BTreeSet::new()),
            network,
            dir: tempfile::tempdir()?,
        };
        let controllers: Vec<String> = env
            .cluster
            .nodes
            .values()
            .map(|n| n.address.clone())
            .collect();
        for host in &env.network.hosts {
            let agent = AgentProcess::start_in_namespace(
                env.dir.path(),
                &host.node_id,
                &controllers,
                &host.namespace,
                IpAddr::V4(host.ip),
                &[],
            )?;
            env.agents.insert(host.node_id.clone(), agent);
        }
        let env_ref = &env;
        eventually(
            Duration::from_secs(30),
            "agents registered and Ready",
            || async move {
                let nodes = env_ref.nodes().await.map_err(|e| e.to_string())?;
                let ready = nodes.iter().filter(|n| n["status"] == "Ready").count();
                until(ready == HOSTS.len(), (), || node_summary(&nodes))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", env.logs()))?;
        Ok(env)
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let answer = send(
            &self.http,
            Method::GET,
            &self.cluster.url(1, path),
            Some(ADMIN_TOKEN),
            None,
        )
        .await?;
        ensure!(answer.status == 200, "GET {path}: {answer:?}");
        Ok(answer.body)
    }

    async fn write(&self, method: Method, path: &str, body: Option<&Value>) -> anyhow::Result<()> {
        let answer = send(
            &self.http,
            method,
            &self.cluster.url(1, path),
            Some(ADMIN_TOKEN),
            body,
        )
        .await?;
        ensure!(answer.status < 300, "{path}: {answer:?}");
        Ok(())
    }

    async fn nodes(&self) -> anyhow::Result<Vec<Value>> {
        Ok(self.get("/v1/nodes").await?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn instances(&self, tier: &str) -> anyhow::Result<Vec<Value>> {
        let items = self.get(&format!("/v1/instances?tier={tier}")).await?["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Ok(mut seen) = self.seen.lock() {
            for item in &items {
                if let Some(id) = item["id"].as_str() {
                    seen.insert(id.to_string());
                }
            }
        }
        Ok(items)
    }

    async fn instance(&self, id: &str) -> anyhow::Result<Value> {
        self.instances("web")
            .await?
            .into_iter()
            .find(|i| i["id"] == id)
            .with_context(|| format!("no instance {id}"))
    }

    /// Waits until the tier has exactly `count` live instances, all Running and healthy, and
    /// returns them.
    async fn wait_ready(
        &self,
        tier: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        eventually(
            timeout,
            &format!("{count} ready instances of {tier}"),
            || async move {
                let instances = self.instances(tier).await.map_err(|e| e.to_string())?;
                let live = live(&instances);
                let ready = live
                    .iter()
                    .filter(|i| i["phase"] == "Running" && i["health"] == "Healthy")
                    .count();
                until(live.len() == count && ready == count, live, || {
                    summary(&instances)
                })
            },
        )
        .await
    }

    /// The agents' and the controller's recent logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "{}\n--- controller ---\n{}",
            self.agent_logs(),
            self.cluster.log_tail(1)
        )
    }

    fn agent_logs(&self) -> String {
        self.agents
            .values()
            .map(|agent| format!("--- agent {} ---\n{}", agent.node_id, agent.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Instances in a phase that still counts toward the tier.
fn live(instances: &[Value]) -> Vec<Value> {
    instances
        .iter()
        .filter(|i| {
            matches!(
                i["phase"].as_str(),
                Some("Pending" | "Starting" | "Running" | "Draining")
            )
        })
        .cloned()
        .collect()
}

fn node_summary(nodes: &[Value]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "{} {}",
                n["id"].as_str().unwrap_or("?"),
                n["status"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

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
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use reqwest::Method;
use serde_json::Value;
use strata_tests::{
    e2e_enabled, eventually, ids, kill_instances, processes_of_instance, send, summary, until,
    workload_answers, workload_tier, AgentProcess, Cluster, ClusterOptions, ADMIN_TOKEN,
};

/// The controllers' `--heartbeat-grace`, as a flag and in seconds for deadlines.
const GRACE: &str = "3s";
const GRACE_SECS: u64 = 3;

/// Prefixes of everything a run creates; the rest of each name is the test process's pid (and
/// a host letter), so parallel runs never collide and leftovers name the run that made them.
/// Interface names stay within Linux's 15 characters: 4 + 7 pid digits + 1 letter.
const NAMESPACE_PREFIX: &str = "strata-e2e-";
const BRIDGE_PREFIX: &str = "stbr";
const BRIDGE_VETH_PREFIX: &str = "stbv";
const HOST_VETH_PREFIX: &str = "sthv";

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

fn running_as_root() -> anyhow::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    // "Uid:	real	effective	saved	filesystem"
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(effective == "0")
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One simulated host: a namespace with one end of a veth pair, the other end on the bridge.
struct Host {
    node_id: String,
    namespace: String,
    /// The end on the bridge, in the root namespace: the link the test takes down.
    bridge_veth: String,
    /// The end inside the namespace, carrying `ip`.
    host_veth: String,
    ip: Ipv4Addr,
}

/// The bridge and its hosts. Dropping it kills whatever still runs in the namespaces and deletes
/// the namespaces, the veths and the bridge; it exists before the first `ip` command that
/// creates anything, so a failed set-up is cleaned up too.
struct Network {
    bridge: String,
    bridge_ip: Ipv4Addr,
    hosts: Vec<Host>,
}

impl Network {
    fn create(node_ids: &[&str]) -> anyhow::Result<Network> {
        let pid = std::process::id();
        sweep_stale(pid);
        let subnet = free_subnet(pid)?;
        let network = Network {
            bridge: format!("{BRIDGE_PREFIX}{pid}"),
            bridge_ip: Ipv4Addr::new(10, 251, subnet, 1),
            hosts: node_ids
                .iter()
                .zip(b'a'..)
                .zip(10u8..)
                .map(|((node_id, letter), last)| {
                    let letter = char::from(letter);
                    Host {
                        node_id: node_id.to_string(),
                        namespace: format!("{NAMESPACE_PREFIX}{pid}-{letter}"),
                        bridge_veth: format!("{BRIDGE_VETH_PREFIX}{pid}{letter}"),
                        host_veth: format!("{HOST_VETH_PREFIX}{pid}{letter}"),
                        ip: Ipv4Addr::new(10, 251, subnet, last),
                    }
                })
                .collect(),
        };
        network.set_up()?;
        Ok(network)
    }

    fn set_up(&self) -> anyhow::Result<()> {
        let bridge = self.bridge.as_str();
        ip(&["link", "add", bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.bridge_ip),
            "dev",
            bridge,
        ])?;
        ip(&["link", "set", bridge, "up"])?;
        for host in &self.hosts {
            let namespace = host.namespace.as_str();
            ip(&["netns", "add", namespace])?;
            ip(&[
                "link",
                "add",
                &host.bridge_veth,
                "type",
                "veth",
                "peer",
                "name",
                &host.host_veth,
            ])?;
            ip(&["link", "set", &host.host_veth, "netns", namespace])?;
            ip(&["link", "set", &host.bridge_veth, "master", bridge])?;
            ip(&["link", "set", &host.bridge_veth, "up"])?;
            ip(&[
                "-n",
                namespace,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                &host.host_veth,
            ])?;
            ip(&["-n", namespace, "link", "set", &host.host_veth, "up"])?;
            ip(&["-n", namespace, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn host(&self, node_id: &str) -> anyhow::Result<&Host> {
        self.hosts
            .iter()
            .find(|host| host.node_id == node_id)
            .with_context(|| format!("no host {node_id}"))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_namespace(&host.namespace);
            // Deleting the namespace deletes its veth pair; this covers a set-up that failed
            // before the peer moved into the namespace.
            let _ = ip(&["link", "del", &host.bridge_veth]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Kills (SIGKILL) every process in `namespace`, then deletes it. A namespace outlives its
/// name while a process holds it, so the processes go first.
fn remove_namespace(namespace: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(text) = ip(&["netns", "pids", namespace]) {
        let pids: Vec<&str> = text.split_whitespace().collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = ip(&["netns", "del", namespace]);
}

/// Removes what an earlier run left behind when it was killed before its cleanup ran: the
/// namespaces and links whose pid is no longer a live process (or is this process, which has
/// created nothing yet, so they are from a dead run whose pid was reused), and the controllers
/// that run listened on its bridge, which outlive a killed test in the root namespace.
fn sweep_stale(own_pid: u32) {
    let stale = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|pid| pid == own_pid || !alive(pid))
    };
    let namespaces = ip(&["netns", "list"]).unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let pid = name
            .strip_prefix(NAMESPACE_PREFIX)
            .and_then(|rest| rest.split('-').next());
        if pid.is_some_and(stale) {
            remove_namespace(name);
        }
    }
    // `ip -o link` lines read "7: stbv1234a@if6: <...> ...".
    let links = ip(&["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .and_then(|name| name.split('@').next())
        else {
            continue;
        };
        for prefix in [BRIDGE_VETH_PREFIX, HOST_VETH_PREFIX, BRIDGE_PREFIX] {
            let pid = name
                .strip_prefix(prefix)
                .map(|rest| rest.trim_end_matches(|c: char| c.is_ascii_lowercase()));
            if pid.is_some_and(stale) {
                if prefix == BRIDGE_PREFIX {
                    kill_listeners_on_bridge(name);
                }
                let _ = ip(&["link", "del", name]);
                break;
            }
        }
    }
}

/// Whether `pid` is a process that has not exited. A killed test whose parent is gone can stay
/// a zombie for a while, until pid 1 reaps it; it counts as dead.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Kills (SIGKILL) the processes started with an argument `<address>:<port>` (a controller's
/// `--listen`) for the IPv4 address of `bridge`.
fn kill_listeners_on_bridge(bridge: &str) {
    // `ip -4 -o addr` lines read "9: stbr1234    inet 10.251.7.1/24 brd ...".
    let text = ip(&["-4", "-o", "addr", "show", "dev", bridge]).unwrap_or_default();
    let Some(address) = text
        .split_whitespace()
        .skip_while(|word| *word != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
    else {
        return;
    };
    let prefix = format!("{address}:");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let listens = std::fs::read(entry.path().join("cmdline")).is_ok_and(|bytes| {
            bytes
                .split(|byte| *byte == 0)
                .any(|arg| arg.starts_with(prefix.as_bytes()))
        });
        if listens && pid.parse::<u32>().is_ok() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    }
}

/// A third octet for 10.251.X.0/24 that no address or route here uses yet, starting from one
/// derived from the pid so that parallel runs start apart.
fn free_subnet(pid: u32) -> anyhow::Result<u8> {
    let used = format!(
        "{}\n{}",
        ip(&["-4", "-o", "addr", "show"])?,
        ip(&["-4", "route", "show", "table", "all"])?
    );
    let start = pid % 254;
    (0..254)
        .map(|offset| ((start + offset) % 254 + 1) as u8)
        .find(|octet| !used.contains(&format!("10.251.{octet}.")))
        .context("every 10.251.X.0/24 subnet is in use")
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

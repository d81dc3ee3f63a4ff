//! A real network partition end to end: each host is a Linux network namespace joined to a
//! bridge in the root namespace, with one agent inside; the controller listens on the bridge.
//! Taking a host's link down cuts it off without killing anything, which is what a partition is
//! and what killing an agent (tests/agents.rs) only imitates. The same network carries the
//! LB1/LB2 pair: two LB agents with their HAProxy and keepalived in namespaces of their own,
//! sharing a virtual IP on the bridge (needs `keepalived` and `haproxy` as well).
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

use anyhow::{ensure, Context};
use reqwest::Method;
use serde_json::Value;
use strata_tests::netns::{ip, running_as_root, Host, Network};
use strata_tests::{
    e2e_enabled, eventually, ids, kill_instances, processes_of_instance, send, summary, until,
    workload_answers, workload_tier, AgentProcess, Cluster, ClusterOptions, ProcessGuard,
    ADMIN_TOKEN,
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

/// The seeds' LB1/LB2 pair for real: two LB agents, each with its HAProxy and keepalived in a
/// namespace of its own on the bridge, one worker namespace running the tier's instances (the
/// pool advertises the worker namespace's bridge address, so both balancers reach them), and
/// one virtual IP on the bridge that the test's own namespace sends a steady request stream to.
/// keepalived runs the configuration `deploy/keepalived/` ships, rendered by its `render.sh`.
///
/// LB1's HAProxy is killed with kill -9 *and its agent is killed first*: an LB agent starts a
/// dead HAProxy again within its 200 ms tick, well inside the check script's detection time
/// (`fall` failed runs `interval` apart), so killing HAProxy alone would not make the check
/// fail; an LB host whose agent and HAProxy are both gone is the failure keepalived is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keepalived_moves_the_virtual_ip_to_lb2_when_lb1s_haproxy_dies() -> anyhow::Result<()> {
    if !e2e_enabled("keepalived") {
        return Ok(());
    }
    if !running_as_root()? {
        println!("skipped: needs root to create network namespaces and move a virtual IP");
        return Ok(());
    }
    // As root with STRATA_E2E=1 the test must run: missing tools are failures, not skips.
    let haproxy = [
        "/usr/sbin/haproxy",
        "/usr/local/sbin/haproxy",
        "/usr/bin/haproxy",
    ]
    .into_iter()
    .find(|path| std::path::Path::new(path).exists())
    .context("haproxy is not installed (deploy/install-deps.sh installs it)")?;
    let keepalived = Command::new("keepalived")
        .arg("--version")
        .output()
        .context(
        "run `keepalived --version`: keepalived is required (deploy/install-deps.sh installs it)",
    )?;
    ensure!(
        keepalived.status.success(),
        "`keepalived --version` failed: {keepalived:?}"
    );

    let mut env = Env::start_hosts(&[
        ("lb-1", Role::Balancer(haproxy)),
        ("lb-2", Role::Balancer(haproxy)),
        ("worker", Role::Worker),
    ])
    .await?;
    // Each LB namespace has its own port space: the frontend listens on every address there,
    // so HAProxy accepts on the virtual IP when keepalived adds it (as keepalived.conf.in says).
    let port = 8080;
    let mut tier = workload_tier("web", 2, 4);
    tier["load_balancer"] = serde_json::json!({
        "listen": format!("0.0.0.0:{port}"),
        "slowstart": "0s",
        "drain_timeout": "5s",
    });
    env.write(Method::PUT, "/v1/tiers/web", Some(&tier)).await?;
    env.write(
        Method::POST,
        "/v1/tiers/web/scale",
        Some(&serde_json::json!({"desired": 2})),
    )
    .await?;
    let instances = env
        .wait_ready("web", 2, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", env.logs()))?;
    let worker_ip = env.network.host("worker")?.ip.to_string();
    for instance in &instances {
        assert_eq!(
            instance["address"].as_str(),
            Some(worker_ip.as_str()),
            "instances should advertise the worker namespace's address: {instance}"
        );
    }
    // Both balancers serve the pool, each in its own namespace.
    let env_ref = &env;
    eventually(
        Duration::from_secs(30),
        "lb-1 and lb-2 serve the pool",
        || async move {
            let pool = env_ref
                .get("/v1/tiers/web/pool")
                .await
                .map_err(|e| e.to_string())?;
            let version = pool["version"].as_u64().unwrap_or(0);
            let ready = pool["servers"].as_array().map_or(0, |servers| {
                servers.iter().filter(|s| s["state"] == "ready").count()
            });
            let serving = pool["balancers"].as_array().map_or(0, |balancers| {
                balancers
                    .iter()
                    .filter(|b| b["report"]["version"].as_u64() == Some(version))
                    .count()
            });
            until(ready == 2 && serving == 2, (), || pool.to_string())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", env.logs()))?;
    for node in ["lb-1", "lb-2"] {
        let host = env.network.host(node)?;
        let answer = in_namespace(
            &host.namespace,
            &[
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"),
            ],
        )?;
        ensure!(
            answer.contains("200 OK"),
            "{node}'s HAProxy does not serve the tier: {answer}"
        );
    }

    // keepalived on both, from the shipped configuration.
    let vip = Ipv4Addr::new(
        env.network.bridge_ip.octets()[0],
        env.network.bridge_ip.octets()[1],
        env.network.bridge_ip.octets()[2],
        100,
    );
    // The bound follows from the backup's timers (the one that takes over).
    let mut vrrp = None;
    for (node, role) in [("lb-1", "master"), ("lb-2", "backup")] {
        let host = env.network.host(node)?;
        let config = render_keepalived(role, &host.host_veth, vip, port)?;
        vrrp = Some(Vrrp::from_config(&config)?);
        let path = env.dir.path().join(format!("keepalived-{node}.conf"));
        std::fs::write(&path, &config).context("write keepalived.conf")?;
        let process = KeepalivedProcess::start(env.dir.path(), node, &host.namespace, &path)?;
        env.keepalived.push(process);
    }
    let vrrp = vrrp.context("no keepalived configuration rendered")?;
    let bound = vrrp.failover_bound();
    println!("keepalived: {vrrp:?}; failover bound {bound:?}");
    let lb1 = Link::of(env.network.host("lb-1")?);
    let lb2 = Link::of(env.network.host("lb-2")?);
    eventually(
        Duration::from_secs(20),
        "the virtual IP on lb-1 (MASTER)",
        || async {
            let on_lb1 = holds(&lb1, vip).map_err(|e| e.to_string())?;
            let on_lb2 = holds(&lb2, vip).map_err(|e| e.to_string())?;
            until(on_lb1 && !on_lb2, (), || {
                format!(
                    "lb-1 holds it: {on_lb1}, lb-2: {on_lb2}\n{}",
                    env.keepalived_logs()
                )
            })
        },
    )
    .await?;

    // A steady stream to the virtual IP; every request on a new connection, like new users.
    let url = format!("http://{vip}:{port}/");
    let stream = VipStream::start(url, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lb1_state = env.lb_state_dir("lb-1");
    // LB1 fails from the moment its agent is killed: a request that fails between that and
    // HAProxy's kill -9 is part of the outage, not before it.
    let killed = Instant::now();
    if let Some(agent) = env.agents.get_mut("lb-1") {
        agent.kill();
    }
    let haproxy_pids = haproxy_processes(&lb1_state);
    ensure!(!haproxy_pids.is_empty(), "no HAProxy process of lb-1 found");
    for pid in &haproxy_pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let moved = eventually(
        bound + Duration::from_secs(5),
        "the virtual IP on lb-2 only",
        || async {
            let on_lb1 = holds(&lb1, vip).map_err(|e| e.to_string())?;
            let on_lb2 = holds(&lb2, vip).map_err(|e| e.to_string())?;
            until(!on_lb1 && on_lb2, Instant::now(), || {
                format!("lb-1 holds it: {on_lb1}, lb-2: {on_lb2}")
            })
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", env.keepalived_logs()))?;
    let moved_after = moved.duration_since(killed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = stream.finish().await;
    ensure!(
        haproxy_processes(&lb1_state).is_empty(),
        "lb-1's HAProxy came back although its agent is gone"
    );

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    let ok_after = outcomes
        .iter()
        .filter(|o| o.error.is_none() && o.started > moved)
        .count();
    let first_failure = failed.iter().map(|o| o.started).min();
    // A request that started during the outage may end (time out) after it: what must not
    // fail is a request started once the bound has passed.
    let last_failure = failed.iter().map(|o| o.started).max();
    let allowed = stream_bound(4, bound);
    println!(
        "VIP moved {moved_after:?} after the kill (bound {bound:?}); {} requests, {} failed \
         (allowed {allowed}), failures from {:?} to {:?} after the kill; {ok_after} ok after the move",
        outcomes.len(),
        failed.len(),
        first_failure.map(|at| at.saturating_duration_since(killed)),
        last_failure.map(|at| at.saturating_duration_since(killed)),
    );
    let sample: Vec<&str> = failed
        .iter()
        .filter_map(|o| o.error.as_deref())
        .take(5)
        .collect();
    ensure!(
        moved_after <= bound,
        "the VIP moved after {moved_after:?}, beyond the {bound:?} the configuration allows"
    );
    ensure!(
        failed.iter().all(|o| o.finished >= killed),
        "requests failed before LB1's HAProxy was killed: {sample:?}"
    );
    ensure!(
        last_failure.is_none_or(|at| at.saturating_duration_since(killed) <= bound),
        "a request started {:?} after the kill failed, beyond the {bound:?} bound: {sample:?}",
        last_failure.map(|at| at.saturating_duration_since(killed))
    );
    ensure!(
        failed.len() as u64 <= allowed,
        "{} failed requests, more than the {allowed} a {bound:?} outage allows: {sample:?}",
        failed.len()
    );
    ensure!(
        ok_after > 0,
        "no request succeeded through lb-2 after the move"
    );
    Ok(())
}

/// The timers of a rendered keepalived.conf that bound a failover.
#[derive(Clone, Copy, Debug)]
struct Vrrp {
    /// `vrrp_script` `interval`, `timeout` (seconds) and `fall` (failed runs in a row).
    check_interval: f64,
    check_timeout: f64,
    fall: f64,
    /// `advert_int` (seconds) and the backup's `priority`.
    advert: f64,
    backup_priority: f64,
}

impl Vrrp {
    fn from_config(config: &str) -> anyhow::Result<Vrrp> {
        let value = |key: &str| -> anyhow::Result<f64> {
            config
                .lines()
                .find_map(|line| {
                    let mut words = line.split_whitespace();
                    (words.next() == Some(key))
                        .then(|| words.next().and_then(|v| v.parse::<f64>().ok()))
                        .flatten()
                })
                .with_context(|| format!("no `{key}` in the rendered keepalived.conf:\n{config}"))
        };
        Ok(Vrrp {
            check_interval: value("interval")?,
            check_timeout: value("timeout")?,
            fall: value("fall")?,
            advert: value("advert_int")?,
            backup_priority: value("priority")?,
        })
    }

    /// The longest a failover can take under this configuration: the check fails `fall` runs
    /// in a row, the first starting up to one `interval` after HAProxy died and each taking up
    /// to `timeout`; then the backup claims the address at the latest after the Master_Down
    /// interval (RFC 5798 6.1: three adverts plus the skew `(256 - priority) / 256` adverts)
    /// — sooner in practice, because a master going to FAULT sends a priority-0 advert — plus
    /// one advert for the gratuitous ARPs and this machine's scheduling.
    fn failover_bound(&self) -> Duration {
        let detect = self.fall * self.check_interval + self.check_timeout;
        let master_down = 3.0 * self.advert + (256.0 - self.backup_priority) / 256.0 * self.advert;
        Duration::from_secs_f64(detect + master_down + self.advert)
    }
}

/// How long each client of [`VipStream`] waits between requests.
const STREAM_PAUSE: Duration = Duration::from_millis(20);
/// The connect timeout of a stream request: while no namespace holds the address, a SYN to it
/// gets no answer. Long enough that a busy machine's scheduling does not fail a connection to
/// a healthy balancer, short against the failover bound.
const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

/// The most requests `clients` paced clients can fail during an outage of `outage`: each
/// client starts a request at most once per [`STREAM_PAUSE`], plus the one in flight.
fn stream_bound(clients: u64, outage: Duration) -> u64 {
    clients * (outage.as_millis() as u64 / STREAM_PAUSE.as_millis() as u64 + 1)
}

/// One request of the stream.
#[derive(Debug)]
struct Outcome {
    started: Instant,
    finished: Instant,
    error: Option<String>,
}

/// Paced clients sending `GET url`, each request on a new connection.
struct VipStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl VipStream {
    fn start(url: String, clients: usize) -> VipStream {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, url) = (stop.clone(), url.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let http = match reqwest::Client::builder()
                        .connect_timeout(STREAM_CONNECT_TIMEOUT)
                        .timeout(Duration::from_secs(2))
                        .pool_max_idle_per_host(0)
                        .build()
                    {
                        Ok(http) => http,
                        Err(error) => {
                            let now = Instant::now();
                            outcomes.push(Outcome {
                                started: now,
                                finished: now,
                                error: Some(format!("build client: {error}")),
                            });
                            return outcomes;
                        }
                    };
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        let error = match http.get(&url).send().await {
                            Ok(response) if response.status().is_success() => {
                                response.bytes().await.err().map(|e| format!("body: {e}"))
                            }
                            Ok(response) => Some(format!("status {}", response.status())),
                            Err(error) => Some(format!("{error:?}")),
                        };
                        outcomes.push(Outcome {
                            started,
                            finished: Instant::now(),
                            error,
                        });
                        tokio::time::sleep(STREAM_PAUSE).await;
                    }
                    outcomes
                })
            })
            .collect();
        VipStream { stop, tasks }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut outcomes = Vec::new();
        for task in self.tasks {
            if let Ok(mut some) = task.await {
                outcomes.append(&mut some);
            }
        }
        outcomes
    }
}

/// keepalived.conf for one LB host, rendered by the script `deploy/` ships.
fn render_keepalived(
    role: &str,
    interface: &str,
    vip: Ipv4Addr,
    port: u16,
) -> anyhow::Result<String> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/keepalived/render.sh")
        .canonicalize()
        .context("find deploy/keepalived/render.sh")?;
    let output = Command::new("bash")
        .arg(&script)
        .args([
            role,
            interface,
            &format!("{vip}/24"),
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    ensure!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A host's namespace and the link in it that carries the virtual IP.
struct Link {
    namespace: String,
    interface: String,
}

impl Link {
    fn of(host: &Host) -> Link {
        Link {
            namespace: host.namespace.clone(),
            interface: host.host_veth.clone(),
        }
    }
}

/// Whether `link` holds `vip`.
fn holds(link: &Link, vip: Ipv4Addr) -> anyhow::Result<bool> {
    let text = ip(&[
        "-n",
        &link.namespace,
        "-4",
        "-o",
        "addr",
        "show",
        "dev",
        &link.interface,
    ])?;
    Ok(text.contains(&format!("inet {vip}/")))
}

/// Runs `command` inside `namespace` and returns its stdout.
fn in_namespace(namespace: &str, command: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(["netns", "exec", namespace])
        .args(command)
        .output()
        .with_context(|| format!("run {command:?} in {namespace}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Process ids of the HAProxy master and workers whose command line names `state_dir` (the LB
/// agent's rendered configuration lives there).
fn haproxy_processes(state_dir: &std::path::Path) -> Vec<u32> {
    let needle = state_dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
            let mut args = cmdline.split('\0');
            // The agent's own command line names the binary and the dir too: the program
            // itself must be HAProxy.
            let program = args.next()?;
            (program.ends_with("haproxy") && args.any(|arg| arg.contains(&needle))).then_some(pid)
        })
        .collect()
}

/// keepalived in a namespace (`ip netns exec` execs it), VRRP only, in the foreground, logging
/// to a file. Killed when dropped; the namespace's removal kills its children too.
struct KeepalivedProcess {
    log_path: std::path::PathBuf,
    _process: ProcessGuard,
}

impl KeepalivedProcess {
    fn start(
        dir: &std::path::Path,
        node: &str,
        namespace: &str,
        config: &std::path::Path,
    ) -> anyhow::Result<KeepalivedProcess> {
        let log_path = dir.join(format!("keepalived-{node}.log"));
        let log = std::fs::File::create(&log_path).context("create keepalived log")?;
        let log_err = log.try_clone().context("clone keepalived log")?;
        let file = |suffix: &str| dir.join(format!("keepalived-{node}.{suffix}"));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", namespace, "keepalived"])
            .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .arg("--use-file")
            .arg(config)
            .arg("--pid")
            .arg(file("pid"))
            .arg("--vrrp_pid")
            .arg(file("vrrp.pid"))
            .arg("--checkers_pid")
            .arg(file("checkers.pid"))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err);
        Ok(KeepalivedProcess {
            log_path,
            _process: ProcessGuard::spawn(&mut command)?,
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// One controller on the bridge and one agent in each namespace. Dropping it kills the agents
/// and every instance process seen, then (through its fields) the controller and the network.
struct Env {
    cluster: Cluster,
    http: reqwest::Client,
    agents: BTreeMap<String, AgentProcess>,
    /// Instance ids seen during the test, killed at the end whatever happened.
    seen: std::sync::Mutex<BTreeSet<String>>,
    /// keepalived processes the test started in the namespaces.
    keepalived: Vec<KeepalivedProcess>,
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

/// What an agent in a namespace runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Instances (a worker agent).
    Worker,
    /// The load-balancer role: its own HAProxy, binary at the path given.
    Balancer(&'static str),
}

impl Env {
    /// One worker agent in each of the three namespaces of `HOSTS`.
    async fn start() -> anyhow::Result<Env> {
        let hosts: Vec<(&str, Role)> = HOSTS.iter().map(|host| (*host, Role::Worker)).collect();
        Env::start_hosts(&hosts).await
    }

    /// One namespace per entry of `hosts`, each with an agent of that role.
    async fn start_hosts(hosts: &[(&str, Role)]) -> anyhow::Result<Env> {
        let node_ids: Vec<&str> = hosts.iter().map(|(node_id, _)| *node_id).collect();
        let network = Network::create(&node_ids)?;
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
            keepalived: Vec::new(),
            network,
            dir: tempfile::tempdir()?,
        };
        let controllers: Vec<String> = env
            .cluster
            .nodes
            .values()
            .map(|n| n.address.clone())
            .collect();
        for (host, (_, role)) in env.network.hosts.iter().zip(hosts) {
            let state_dir = env.lb_state_dir(&host.node_id).display().to_string();
            let flags: Vec<&str> = match role {
                Role::Worker => Vec::new(),
                Role::Balancer(haproxy) => vec![
                    "--lb",
                    "haproxy",
                    "--haproxy-bin",
                    haproxy,
                    "--lb-state-dir",
                    &state_dir,
                ],
            };
            let agent = AgentProcess::start_in_namespace(
                env.dir.path(),
                &host.node_id,
                &controllers,
                &host.namespace,
                IpAddr::V4(host.ip),
                &flags,
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
                until(ready == hosts.len(), (), || node_summary(&nodes))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", env.logs()))?;
        Ok(env)
    }

    /// Where LB agent `node_id` keeps its `haproxy.cfg` and sockets.
    fn lb_state_dir(&self, node_id: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("lb-{node_id}"))
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

    fn keepalived_logs(&self) -> String {
        self.keepalived
            .iter()
            .map(|k| format!("--- {} ---\n{}", k.log_path.display(), k.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
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

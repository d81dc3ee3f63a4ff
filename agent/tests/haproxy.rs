//! The load-balancer role against the real HAProxy, with real `strata-workload` processes as
//! servers on 127.0.0.1. No controller: the tests hand pools to the converger directly.
//!
//! Every test prints `skipped: haproxy not installed` and passes where HAProxy is absent.
//! Every process a test starts is killed when the test ends, also when it fails: workloads by
//! their guard, HAProxy by the load balancer's own drop.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use uuid::Uuid;

use strata_agent::lb::{LbConfig, LoadBalancer};
use strata_agent::workload::Hello;
use strata_api::{
    Algorithm, Duration as ApiDuration, HealthCheck, LbReport, LoadBalancer as LbSpec, Pool,
    PoolServer, ServerState,
};

fn haproxy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
}

macro_rules! require_haproxy {
    () => {
        match haproxy_binary() {
            Some(binary) => binary,
            None => {
                println!("skipped: haproxy not installed");
                return;
            }
        }
    };
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port()
}

/// One `strata-workload` process, killed (with its group) on drop.
struct Workload {
    id: Uuid,
    port: u16,
    child: Child,
}

impl Workload {
    fn start() -> Workload {
        let id = Uuid::new_v4();
        let port = free_port();
        let child = Command::new(common::workload_binary())
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--instance-id", &id.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn strata-workload");
        Workload { id, port, child }
    }

    fn server(&self, weight: u32, state: ServerState) -> PoolServer {
        PoolServer {
            instance_id: self.id,
            address: "127.0.0.1".to_string(),
            port: self.port,
            weight,
            state,
        }
    }

    fn ready(&self) -> PoolServer {
        self.server(100, ServerState::Ready)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Starts `count` workloads and waits until each answers.
async fn workloads(count: usize) -> Vec<Workload> {
    let started: Vec<Workload> = (0..count).map(|_| Workload::start()).collect();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for workload in &started {
        let url = format!("http://127.0.0.1:{}/healthz", workload.port);
        while client.get(&url).send().await.is_err() {
            assert!(Instant::now() < deadline, "workload did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    started
}

fn health() -> HealthCheck {
    HealthCheck {
        interval: ApiDuration::from_millis(500),
        timeout: ApiDuration::from_millis(500),
        ..HealthCheck::default()
    }
}

fn pool(tier: &str, listen: u16, version: u64, servers: Vec<PoolServer>) -> Pool {
    Pool {
        tier: tier.to_string(),
        version,
        load_balancer: LbSpec {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], listen))),
            slowstart: ApiDuration::from_secs(0),
            ..LbSpec::default()
        },
        health: health(),
        servers,
    }
}

async fn start_lb(binary: PathBuf) -> (LoadBalancer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let lb = LoadBalancer::start(LbConfig::new(binary, dir.path().join("lb")))
        .await
        .expect("start the load balancer");
    (lb, dir)
}

/// A client that opens a new connection per request (HAProxy's balancing is per request
/// either way; fresh connections also exercise the listener).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn hello(client: &reqwest::Client, url: &str) -> Hello {
    let response = client
        .get(url)
        .send()
        .await
        .expect("request through haproxy");
    assert_eq!(response.status(), 200, "{url}");
    response.json().await.expect("hello json")
}

/// Which instance answered each of `count` requests.
async fn spread(client: &reqwest::Client, url: &str, count: usize) -> BTreeMap<Uuid, usize> {
    let mut hits = BTreeMap::new();
    for _ in 0..count {
        let id: Uuid = hello(client, url).await.instance_id.parse().expect("uuid");
        *hits.entry(id).or_insert(0) += 1;
    }
    hits
}

fn tier_report<'a>(report: &'a LbReport, tier: &str) -> &'a strata_api::LbTierReport {
    report
        .tiers
        .iter()
        .find(|t| t.tier == tier)
        .unwrap_or_else(|| panic!("no report for tier {tier}: {report:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_every_server_and_roundrobin_spreads_evenly() {
    let binary = require_haproxy!();
    let servers = workloads(3).await;
    let (lb, _dir) = start_lb(binary).await;
    let port = free_port();
    let outcome = lb
        .apply(vec![pool(
            "web",
            port,
            1,
            servers.iter().map(Workload::ready).collect(),
        )])
        .await;
    assert!(outcome.failure.is_none(), "{outcome:?}");
    let hits = spread(&client(), &format!("http://127.0.0.1:{port}/"), 300).await;
    assert_eq!(hits.len(), 3, "every server answers: {hits:?}");
    for (id, count) in &hits {
        assert!((90..=110).contains(count), "{id}: {count} of 300: {hits:?}");
    }
    let report = lb.report().await;
    let web = tier_report(&report, "web");
    assert_eq!(web.version, 1);
    assert!(web.error.is_none());
    assert_eq!(web.servers.len(), 3);
    assert_eq!(web.stats.total, 300, "{web:#?}");
    for server in &web.servers {
        assert_eq!(server.status, "UP", "{web:#?}");
        assert_eq!(
            server.stats.total, hits[&server.instance_id] as u64,
            "{web:#?}"
        );
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_skew_traffic_in_proportion() {
    let binary = require_haproxy!();
    let servers = workloads(3).await;
    let (lb, _dir) = start_lb(binary).await;
    let port = free_port();
    let weights = [10, 20, 30];
    let pool_servers = servers
        .iter()
        .zip(weights)
        .map(|(workload, weight)| workload.server(weight, ServerState::Ready))
        .collect();
    assert!(lb
        .apply(vec![pool("web", port, 1, pool_servers)])
        .await
        .failure
        .is_none());
    let hits = spread(&client(), &format!("http://127.0.0.1:{port}/"), 600).await;
    for (workload, weight) in servers.iter().zip(weights) {
        let expected = 600 * weight as usize / 60;
        let got = hits.get(&workload.id).copied().unwrap_or(0);
        assert!(
            got.abs_diff(expected) <= expected / 10,
            "weight {weight}: {got} of 600, expected about {expected}: {hits:?}"
        );
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hashing_keeps_each_client_address_on_one_server() {
    let binary = require_haproxy!();
    let servers = workloads(3).await;
    let (lb, _dir) = start_lb(binary).await;
    let port = free_port();
    let mut web = pool(
        "web",
        port,
        1,
        servers.iter().map(Workload::ready).collect(),
    );
    web.load_balancer.algorithm = Algorithm::Source;
    assert!(lb.apply(vec![web]).await.failure.is_none());
    let url = format!("http://127.0.0.1:{port}/");
    let mut chosen = BTreeSet::new();
    // Every 127/8 address is local on Linux: sixteen clients, sixteen source addresses.
    for last in 2..18u8 {
        let client = reqwest::Client::builder()
            .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
            .pool_max_idle_per_host(0)
            .build()
            .expect("client");
        let hits = spread(&client, &url, 10).await;
        assert_eq!(hits.len(), 1, "client 127.0.0.{last} moved: {hits:?}");
        chosen.extend(hits.into_keys());
    }
    assert!(chosen.len() > 1, "sixteen clients all hashed to one server");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_keeps_a_client_on_one_server_and_moves_it_when_the_server_leaves() {
    let binary = require_haproxy!();
    let servers = workloads(3).await;
    let (lb, _dir) = start_lb(binary).await;
    let port = free_port();
    let sticky = |version, servers: Vec<PoolServer>| {
        let mut web = pool("web", port, version, servers);
        web.load_balancer.sticky_cookie = Some("STRATA".to_string());
        web
    };
    assert!(lb
        .apply(vec![sticky(
            1,
            servers.iter().map(Workload::ready).collect()
        )])
        .await
        .failure
        .is_none());
    let url = format!("http://127.0.0.1:{port}/");
    let client = client();
    // A request with the cookie (if any) and what it was answered from and with.
    let call = |cookie: Option<String>| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let mut request = client.get(&url);
            if let Some(cookie) = cookie {
                request = request.header("cookie", cookie);
            }
            let response = request.send().await.expect("request");
            assert_eq!(response.status(), 200);
            let set_cookie = response
                .headers()
                .get("set-cookie")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.split(';').next())
                .map(str::to_string);
            let hello: Hello = response.json().await.expect("json");
            (hello.instance_id.parse::<Uuid>().expect("uuid"), set_cookie)
        }
    };
    let (first, cookie) = call(None).await;
    let cookie = cookie.expect("haproxy inserts the cookie");
    assert!(cookie.starts_with("STRATA="), "{cookie}");
    for _ in 0..20 {
        let (server, _) = call(Some(cookie.clone())).await;
        assert_eq!(server, first, "the cookie pins the client");
    }
    // The client's server leaves the pool.
    let rest: Vec<PoolServer> = servers
        .iter()
        .filter(|w| w.id != first)
        .map(Workload::ready)
        .collect();
    let outcome = lb.apply(vec![sticky(2, rest)]).await;
    assert!(
        outcome.reloaded.is_none() && outcome.failure.is_none(),
        "{outcome:?}"
    );
    let (moved, new_cookie) = call(Some(cookie.clone())).await;
    assert_ne!(
        moved, first,
        "a cookie of a server that left is not honoured"
    );
    let new_cookie = new_cookie.expect("a new cookie for the new server");
    assert_ne!(new_cookie, cookie);
    for _ in 0..20 {
        assert_eq!(call(Some(new_cookie.clone())).await.0, moved);
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pool_changes_apply_without_a_reload() {
    let binary = require_haproxy!();
    let servers = workloads(4).await;
    let (lb, _dir) = start_lb(binary).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let client = client();
    let outcome = lb
        .apply(vec![pool("web", port, 1, vec![servers[0].ready()])])
        .await;
    assert!(
        outcome.reloaded.is_some(),
        "a new tier is a reload: {outcome:?}"
    );
    let worker = lb.report().await.worker_pid.expect("worker pid");
    let reloads = lb.report().await.reloads;
    // Ten changes: servers join, leave, drain and change weight.
    let steps: [&[usize]; 10] = [
        &[0, 1],
        &[0, 1, 2],
        &[0, 1, 2, 3],
        &[1, 2, 3],
        &[2, 3],
        &[3],
        &[0, 3],
        &[0, 1, 3],
        &[1],
        &[0, 1, 2, 3],
    ];
    for (step, members) in steps.iter().enumerate() {
        let version = step as u64 + 2;
        let mut pool_servers: Vec<PoolServer> =
            members.iter().map(|&i| servers[i].ready()).collect();
        // A draining server that was in the previous step gets no new requests.
        let draining = (step > 0).then(|| {
            steps[step - 1]
                .iter()
                .copied()
                .find(|i| !members.contains(i))
        });
        if let Some(Some(index)) = draining {
            pool_servers.push(servers[index].server(100, ServerState::Drain));
        }
        let outcome = lb
            .apply(vec![pool("web", port, version, pool_servers)])
            .await;
        assert!(outcome.failure.is_none(), "step {step}: {outcome:?}");
        assert!(
            outcome.reloaded.is_none(),
            "step {step} reloaded: {outcome:?}"
        );
        // In force at once: the next requests reach exactly the ready servers.
        let hits = spread(&client, &url, members.len() * 4).await;
        let expected: BTreeSet<Uuid> = members.iter().map(|&i| servers[i].id).collect();
        assert_eq!(
            hits.keys().copied().collect::<BTreeSet<_>>(),
            expected,
            "step {step}"
        );
        let report = lb.report().await;
        assert_eq!(
            report.worker_pid,
            Some(worker),
            "step {step}: the worker was replaced"
        );
        assert_eq!(report.reloads, reloads);
        assert_eq!(tier_report(&report, "web").version, version);
    }
    lb.shutdown().await;
}

/// Sends requests back to back until `stop`, each on a new connection; counts failures.
fn request_stream(
    url: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    tokio::spawn(async move {
        let client = client();
        let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match client.get(&url).send().await {
                Ok(response) if response.status() == 200 => ok += 1,
                Ok(response) => {
                    failed += 1;
                    errors.push(format!("status {}", response.status()));
                }
                Err(error) => {
                    failed += 1;
                    errors.push(format!("{error:?}"));
                }
            }
        }
        (ok, failed, errors)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_change_reloads_without_failing_a_request() {
    let binary = require_haproxy!();
    let servers = workloads(2).await;
    let (lb, _dir) = start_lb(binary).await;
    let port = free_port();
    let members: Vec<PoolServer> = servers.iter().map(Workload::ready).collect();
    assert!(lb
        .apply(vec![pool("web", port, 1, members.clone())])
        .await
        .failure
        .is_none());
    let before = lb.report().await;
    let stop = Arc::new(AtomicBool::new(false));
    let stream = request_stream(format!("http://127.0.0.1:{port}/"), stop.clone());
    // Let the stream run on the old worker first.
    while lb.report().await.tiers.first().map_or(0, |t| t.stats.total) < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut changed = pool("web", port, 2, members);
    changed.load_balancer.algorithm = Algorithm::Leastconn;
    changed.load_balancer.idle_timeout = ApiDuration::from_secs(20);
    let outcome = lb.apply(vec![changed]).await;
    assert!(outcome.failure.is_none(), "{outcome:?}");
    assert!(outcome.reloaded.is_some(), "{outcome:?}");
    // And on the new one afterwards.
    while lb.report().await.tiers.first().map_or(0, |t| t.stats.total) < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, errors) = stream.await.expect("stream");
    let after = lb.report().await;
    assert_ne!(after.worker_pid, before.worker_pid, "a new worker");
    assert_eq!(after.reloads, before.reloads + 1);
    assert_eq!(failed, 0, "{ok} ok, {failed} failed: {errors:?}");
    assert!(ok >= 100, "{ok}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_killed_with_sigkill_comes_back_with_the_current_pool() {
    let binary = require_haproxy!();
    let servers = workloads(3).await;
    let (lb, dir) = start_lb(binary).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    assert!(lb
        .apply(vec![pool("web", port, 1, vec![servers[0].ready()])])
        .await
        .failure
        .is_none());
    // Changed through the Runtime API only: the file must carry it for the restart.
    let current: Vec<PoolServer> = servers[1..].iter().map(Workload::ready).collect();
    let outcome = lb.apply(vec![pool("web", port, 2, current)]).await;
    assert!(outcome.reloaded.is_none(), "{outcome:?}");
    let before = lb.report().await;
    let master = lb.master_pid().await.expect("master pid");
    let worker = before.worker_pid.expect("worker pid");
    kill(Pid::from_raw(master as i32), Signal::SIGKILL).expect("kill -9 the master");
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL).expect("kill -9 the worker");
    // The agent notices within a tick and starts it from the file.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let report = lb.report().await;
        if report.worker_pid.is_some_and(|pid| pid != worker) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "haproxy did not come back: {report:#?}; log:\n{}",
            std::fs::read_to_string(dir.path().join("lb/haproxy.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(lb.master_pid().await, Some(master));
    let hits = spread(&client(), &url, 20).await;
    let expected: BTreeSet<Uuid> = servers[1..].iter().map(|w| w.id).collect();
    assert_eq!(hits.keys().copied().collect::<BTreeSet<_>>(), expected);
    let report = lb.report().await;
    assert_eq!(tier_report(&report, "web").version, 2);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_listen_port_is_the_tiers_error_while_another_tier_serves() {
    let binary = require_haproxy!();
    let servers = workloads(1).await;
    let (lb, _dir) = start_lb(binary).await;
    let taken = TcpListener::bind("127.0.0.1:0").expect("take a port");
    let taken_port = taken.local_addr().expect("address").port();
    let port = free_port();
    let pools = vec![
        pool("web", port, 3, vec![servers[0].ready()]),
        pool("blocked", taken_port, 5, vec![servers[0].ready()]),
    ];
    let outcome = lb.apply(pools.clone()).await;
    assert!(outcome.failure.is_none(), "{outcome:?}");
    let report = lb.report().await;
    let blocked = tier_report(&report, "blocked");
    let error = blocked
        .error
        .as_deref()
        .expect("an error for the blocked tier");
    assert!(error.contains(&taken_port.to_string()), "{error}");
    assert_eq!(blocked.version, 0);
    assert!(tier_report(&report, "web").error.is_none());
    hello(&client(), &format!("http://127.0.0.1:{port}/")).await;
    // Freed, the tier comes up by itself (level-triggered retries).
    drop(taken);
    let deadline = Instant::now() + strata_agent::lb::RETRY * 3;
    loop {
        let report = lb.report().await;
        if tier_report(&report, "blocked").error.is_none() {
            assert_eq!(tier_report(&report, "blocked").version, 5);
            break;
        }
        assert!(Instant::now() < deadline, "{report:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hello(&client(), &format!("http://127.0.0.1:{taken_port}/")).await;
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_finishes_its_slow_request_and_gets_no_new_ones() {
    let binary = require_haproxy!();
    let servers = workloads(2).await;
    let (lb, _dir) = start_lb(binary).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let (old, new) = (&servers[0], &servers[1]);
    assert!(lb
        .apply(vec![pool("web", port, 1, vec![old.ready()])])
        .await
        .failure
        .is_none());
    let slow = tokio::spawn({
        let client = client();
        let url = format!("{url}?work_ms=1500");
        async move {
            let response = client.get(url).send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.json::<Hello>().await?))
        }
    });
    // Until the slow request is in flight on the old server.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = lb.report().await;
        let sessions = tier_report(&report, "web")
            .servers
            .iter()
            .find(|s| s.instance_id == old.id)
            .map_or(0, |s| s.stats.sessions);
        if sessions == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{report:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outcome = lb
        .apply(vec![pool(
            "web",
            port,
            2,
            vec![old.server(100, ServerState::Drain), new.ready()],
        )])
        .await;
    assert!(
        outcome.reloaded.is_none() && outcome.failure.is_none(),
        "{outcome:?}"
    );
    let report = lb.report().await;
    let draining = tier_report(&report, "web")
        .servers
        .iter()
        .find(|s| s.instance_id == old.id)
        .expect("the draining server is reported")
        .clone();
    assert_eq!(draining.status, "DRAIN", "{report:#?}");
    assert_eq!(draining.stats.sessions, 1, "the slow request is still open");
    let hits = spread(&client(), &url, 20).await;
    assert_eq!(
        hits.keys().copied().collect::<Vec<_>>(),
        [new.id],
        "no new request for the draining server"
    );
    let (status, body) = slow
        .await
        .expect("task")
        .expect("the slow request completes");
    assert_eq!(status, 200);
    assert_eq!(body.instance_id, old.id.to_string());
    assert_eq!(body.worked_ms, 1500);
    lb.shutdown().await;
}

/// A stand-in for the controllers: registers the node, long-polls heartbeats like the leader
/// (held while the agent runs the current pool versions, answered as soon as they change).
mod fake_controller {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::extract::State;
    use axum::routing::post;
    use axum::{Json, Router};
    use tokio::sync::watch;

    use strata_api::{
        HeartbeatRequest, HeartbeatResponse, Node, NodeStatus, Pool, RegisterRequest,
    };

    #[derive(Clone)]
    pub struct Fake {
        pub pools: watch::Sender<Vec<Pool>>,
        pub registrations: Arc<Mutex<Vec<RegisterRequest>>>,
        pub heartbeats: Arc<Mutex<Vec<HeartbeatRequest>>>,
    }

    fn in_sync(request: &HeartbeatRequest, pools: &[Pool]) -> bool {
        let Some(report) = &request.lb else {
            return false;
        };
        pools.iter().all(|pool| {
            report
                .tiers
                .iter()
                .any(|tier| tier.tier == pool.tier && tier.version == pool.version)
        })
    }

    async fn register(
        State(fake): State<Fake>,
        Json(request): Json<RegisterRequest>,
    ) -> Json<Node> {
        fake.registrations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(request.clone());
        Json(Node {
            id: request.node_id,
            address: request.address,
            zone: request.zone,
            labels: request.labels,
            capacity: request.capacity,
            allocatable: request.capacity,
            status: NodeStatus::Ready,
            ready: true,
            cordoned: false,
            draining: false,
            agent_version: request.agent_version,
            roles: request.roles,
            last_heartbeat_ms: 0,
            metrics: Default::default(),
            registered_at_ms: 0,
            ec2_instance: None,
            resource_version: 1,
        })
    }

    async fn heartbeat(
        State(fake): State<Fake>,
        Json(request): Json<HeartbeatRequest>,
    ) -> Json<HeartbeatResponse> {
        let mut pools = fake.pools.subscribe();
        let current = pools.borrow_and_update().clone();
        let hold = Duration::from_millis(request.wait_ms.min(10_000));
        let sync = in_sync(&request, &current);
        fake.heartbeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(request);
        if sync {
            let _ = tokio::time::timeout(hold, pools.changed()).await;
        }
        let answer = pools.borrow().clone();
        Json(HeartbeatResponse {
            assignments: Vec::new(),
            pools: answer,
        })
    }

    pub async fn start(pools: Vec<Pool>) -> (Fake, String) {
        let fake = Fake {
            pools: watch::channel(pools).0,
            registrations: Arc::default(),
            heartbeats: Arc::default(),
        };
        let router = Router::new()
            .route("/v1/agents/register", post(register))
            .route("/v1/agents/heartbeat", post(heartbeat))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (fake, address)
    }
}

/// A `strata-agent --lb haproxy` process. On drop: SIGTERM (which stops its HAProxy), then
/// SIGKILL, then any HAProxy still running from its state dir.
struct LbAgent {
    child: Child,
    state_dir: PathBuf,
}

impl LbAgent {
    fn start(binary: &std::path::Path, controller: &str, data_dir: &std::path::Path) -> LbAgent {
        let child = Command::new(env!("CARGO_BIN_EXE_strata-agent"))
            .args([
                "--node-id",
                "lb-1",
                "--join-token",
                "token",
                "--heartbeat-interval",
                "1s",
            ])
            .args(["--controllers", controller, "--lb", "haproxy"])
            .arg("--haproxy-bin")
            .arg(binary)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn strata-agent");
        LbAgent {
            child,
            state_dir: data_dir.join("lb"),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    /// The HAProxy masters and workers started with this agent's state dir.
    fn haproxy_pids(&self) -> Vec<i32> {
        let needle = self.state_dir.join("haproxy.cfg");
        let needle = needle.to_string_lossy();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                let alive =
                    strata_agent::procfs::read_proc_stat(pid).is_some_and(|s| !s.has_exited());
                (alive && cmdline.contains("haproxy") && cmdline.contains(needle.as_ref()))
                    .then_some(pid)
            })
            .collect()
    }
}

impl Drop for LbAgent {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
        for pid in self.haproxy_pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_serves_the_pools_of_its_heartbeat_answers() {
    let binary = require_haproxy!();
    let servers = workloads(2).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let (fake, controller) =
        fake_controller::start(vec![pool("web", port, 1, vec![servers[0].ready()])]).await;
    let data = tempfile::tempdir().expect("temp dir");
    let agent = LbAgent::start(&binary, &controller, data.path());
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(&url).send().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the agent's haproxy never served the pool"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let registrations = fake.registrations.lock().expect("lock");
        assert_eq!(registrations[0].roles, [strata_api::NodeRole::LoadBalancer]);
    }
    // A pool change reaches HAProxy while the agent's heartbeat is held: well within the
    // one-second interval, which is all the agent waits for an answer anyway.
    let changed_at = Instant::now();
    fake.pools
        .send_replace(vec![pool("web", port, 2, vec![servers[1].ready()])]);
    loop {
        if hello(&client, &url).await.instance_id == servers[1].id.to_string() {
            break;
        }
        assert!(
            changed_at.elapsed() < Duration::from_secs(1),
            "the pool change took too long"
        );
    }
    // The next heartbeat reports it, long-polling with the interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = fake.heartbeats.lock().expect("lock").last().cloned();
        if let Some(request) = last {
            let report = request
                .lb
                .as_ref()
                .expect("an lb report in every heartbeat");
            assert_eq!(request.wait_ms, 1000);
            if report
                .tiers
                .iter()
                .any(|t| t.tier == "web" && t.version == 2)
            {
                assert!(report.worker_pid.is_some());
                break;
            }
        }
        assert!(Instant::now() < deadline, "no heartbeat reported version 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // kill -9 of the agent leaves its HAProxy; the next agent replaces it and serves the pool.
    let old = agent.haproxy_pids();
    assert!(!old.is_empty());
    kill(agent.pid(), Signal::SIGKILL).expect("kill -9 the agent");
    drop(agent);
    let agent = LbAgent::start(&binary, &controller, data.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = agent.haproxy_pids();
        let replaced = !now.is_empty() && now.iter().all(|pid| !old.contains(pid));
        if replaced {
            if let Ok(response) = client.get(&url).send().await {
                let hello: Hello = response.json().await.expect("json");
                assert_eq!(hello.instance_id, servers[1].id.to_string());
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent did not take over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(agent);
}

/// GETs `url` every 10 ms on fresh connections until `stop`; returns (ok, failures).
fn fresh_stream(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let client = client();
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match client.get(&url).send().await {
                Ok(response) if response.status() == 200 => ok += 1,
                Ok(response) => failed.push(format!("status {}", response.status())),
                Err(error) => failed.push(format!("{error:?}")),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, failed)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_serves_its_last_pools_before_any_heartbeat_answer() {
    let binary = require_haproxy!();
    let servers = workloads(2).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/");
    let (fake, controller) =
        fake_controller::start(vec![pool("web", port, 1, vec![servers[0].ready()])]).await;
    let data = tempfile::tempdir().expect("temp dir");
    let agent = LbAgent::start(&binary, &controller, data.path());
    // Version 2 goes through the Runtime API only: the saved file and layout must carry it.
    fake.pools
        .send_replace(vec![pool("web", port, 2, vec![servers[1].ready()])]);
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(&url).send().await {
            let hello: Hello = response.json().await.expect("json");
            if hello.instance_id == servers[1].id.to_string() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "version 2 was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No controller answers the restarted agents: nothing listens on this port.
    let nowhere = format!("127.0.0.1:{}", free_port());

    // 1. kill -9 of the agent alone: its HAProxy keeps serving, the next agent starts one
    // from the saved file beside it and soft-stops the old one; no request fails.
    let old = agent.haproxy_pids();
    assert!(!old.is_empty());
    let stop = Arc::new(AtomicBool::new(false));
    let stream = fresh_stream(url.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(agent.pid(), Signal::SIGKILL).expect("kill -9 the agent");
    let mut agent = agent;
    let _ = agent.child.wait();
    std::mem::forget(agent);
    let agent = LbAgent::start(&binary, &nowhere, data.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = agent.haproxy_pids();
        if !now.is_empty() && now.iter().all(|pid| !old.contains(pid)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old haproxy {old:?} was not replaced: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = stream.await.expect("stream");
    assert!(ok > 0);
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let hits = spread(&client, &url, 6).await;
    assert_eq!(
        hits.keys().copied().collect::<Vec<_>>(),
        vec![servers[1].id],
        "the restarted agent must serve the last pool it rendered"
    );

    // 2. kill -9 of the agent and of its HAProxy: the next agent, still without an answer,
    // starts HAProxy from the saved file.
    let pids = agent.haproxy_pids();
    kill(agent.pid(), Signal::SIGKILL).expect("kill -9 the agent");
    for pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    drop(agent);
    let agent = LbAgent::start(&binary, &nowhere, data.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(&url).send().await {
            let hello: Hello = response.json().await.expect("json");
            assert_eq!(hello.instance_id, servers[1].id.to_string());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted agent does not serve its last pools"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(agent);
}

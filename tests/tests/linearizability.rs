//! Linearizability under faults: 8 concurrent clients read and write registers (each tier's
//! desired count, with unique written values) through random controllers while a nemesis
//! kills and restarts nodes, or (as root, with each controller in its own network namespace)
//! cuts nodes off, the leader most often, and heals them. Every register's history is checked
//! by `strata_tests::linearizability` (Gibbons and Korach's zone check). A request without a
//! definite answer counts as unknown, never as failed. The same checker fails a run whose reads
//! are `?stale=true` from a cut-off follower, which shows it can catch a violation.
//!
//! Each nemesis runs for `STRATA_LIN_SECS` seconds (60 by default, as CI runs it). Runs when
//! `STRATA_E2E=1`; the partition nemesis also needs root and prints `skipped: <reason>`
//! otherwise.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use strata_tests::linearizability::{check, Kind, Op};
use strata_tests::netns::{running_as_root, Network};
use strata_tests::{e2e_enabled, Cluster, ClusterOptions, ADMIN_TOKEN};

const CLIENTS: usize = 8;
const REGISTERS: usize = 16;
/// Highest desired count a tier allows (`validate::MAX_INSTANCES`): each register gets at most
/// this many distinct written values.
const MAX_VALUE: u64 = 1000;
const HOSTS: [&str; 3] = ["l1", "l2", "l3"];

fn nemesis_duration() -> Duration {
    let secs = std::env::var("STRATA_LIN_SECS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// A small deterministic generator (xorshift64*), seeded per run and printed, so a failing
/// schedule can be replayed with `STRATA_LIN_SEED`.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("STRATA_LIN_SEED")
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        println!("nemesis seed {seed} (STRATA_LIN_SEED={seed} replays the schedule)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

/// What the clients recorded, per register.
#[derive(Default)]
struct Histories {
    ops: Mutex<BTreeMap<usize, Vec<Op>>>,
    ok: AtomicU64,
    unknown: AtomicU64,
    failed: AtomicU64,
}

impl Histories {
    fn record(&self, register: usize, op: Op) {
        let counter = if op.failed {
            &self.failed
        } else if op.end_us.is_none() || (op.kind == Kind::Read && op.value.is_none()) {
            &self.unknown
        } else {
            &self.ok
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut ops) = self.ops.lock() {
            ops.entry(register).or_default().push(op);
        }
    }

    fn check_all(&self) -> Result<(), String> {
        let ops = self.ops.lock().map_err(|_| "history lock".to_string())?;
        for (register, history) in ops.iter() {
            if let Err(violation) = check(history, 0) {
                return Err(format!(
                    "register reg-{register} ({} operations): {violation}",
                    history.len()
                ));
            }
        }
        Ok(())
    }

    fn summary(&self) -> String {
        format!(
            "{} ok, {} unknown, {} failed",
            self.ok.load(Ordering::Relaxed),
            self.unknown.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed)
        )
    }
}

/// Where the clients send reads and writes.
#[derive(Clone)]
struct Targets {
    writes: Vec<String>,
    reads: Vec<String>,
    stale_reads: bool,
}

struct Workload {
    http: reqwest::Client,
    started: Instant,
    histories: Arc<Histories>,
    next_value: Arc<Vec<AtomicU64>>,
}

impl Workload {
    fn new(started: Instant) -> anyhow::Result<Workload> {
        Ok(Workload {
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(1500))
                .build()?,
            started,
            histories: Arc::default(),
            next_value: Arc::new((0..REGISTERS).map(|_| AtomicU64::new(1)).collect()),
        })
    }

    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Runs `CLIENTS` clients until `until`, each a loop of random reads and writes.
    async fn run(&self, targets: Targets, until: Instant, seed: u64) {
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let workload = Workload {
                http: self.http.clone(),
                started: self.started,
                histories: self.histories.clone(),
                next_value: self.next_value.clone(),
            };
            let targets = targets.clone();
            let mut rng = Rng(seed.wrapping_add(client as u64 * 7919) | 1);
            clients.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let register = rng.below(REGISTERS as u64) as usize;
                    if rng.below(2) == 0 {
                        let node = &targets.writes[rng.below(targets.writes.len() as u64) as usize];
                        workload.write(client, register, node).await;
                    } else {
                        let node = &targets.reads[rng.below(targets.reads.len() as u64) as usize];
                        workload
                            .read(client, register, node, targets.stale_reads)
                            .await;
                    }
                }
            }));
        }
        for client in clients {
            let _ = client.await;
        }
    }

    async fn write(&self, client: usize, register: usize, node: &str) {
        let value = self.next_value[register].fetch_add(1, Ordering::Relaxed);
        if value > MAX_VALUE {
            return;
        }
        let start_us = self.now_us();
        let answer = self
            .http
            .post(format!("http://{node}/v1/tiers/reg-{register}/scale"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({ "desired": value }))
            .send()
            .await;
        let (end_us, failed) = match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                match status {
                    200 => (Some(self.now_us()), false),
                    // Refused before anything was proposed: surely not applied.
                    503 if body["type"] == "urn:strata:problem:no-quorum" => (None, true),
                    // Anything else (outcome-unknown, timeouts, 5xx): unknown.
                    _ => (None, false),
                }
            }
            // The connection was refused: nothing reached the node.
            Err(error) if error.is_connect() => (None, true),
            Err(_) => (None, false),
        };
        self.histories.record(
            register,
            Op {
                client,
                kind: Kind::Write,
                value: Some(value),
                start_us,
                end_us,
                failed,
            },
        );
    }

    async fn read(&self, client: usize, register: usize, node: &str, stale: bool) {
        let start_us = self.now_us();
        let query = if stale { "?stale=true" } else { "" };
        let answer = self
            .http
            .get(format!("http://{node}/v1/tiers/reg-{register}{query}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await;
        let mut value = None;
        if let Ok(response) = answer {
            if response.status().as_u16() == 200 {
                if let Ok(body) = response.json::<Value>().await {
                    value = body["scaling"]["desired"]
                        .as_u64()
                        .or_else(|| body["spec"]["scaling"]["desired"].as_u64());
                }
            }
        }
        let end_us = value.map(|_| self.now_us());
        self.histories.record(
            register,
            Op {
                client,
                kind: Kind::Read,
                value,
                start_us,
                end_us,
                failed: false,
            },
        );
    }
}

async fn create_registers(cluster: &mut Cluster) -> anyhow::Result<()> {
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    for register in 0..REGISTERS {
        let body = json!({
            "name": format!("reg-{register}"),
            "template": {"driver": "process", "command": ["strata-workload"]},
            "scaling": {"min": 0, "max": MAX_VALUE, "desired": 0},
        });
        let answer = strata_tests::send(
            &cluster.http,
            reqwest::Method::PUT,
            &cluster.url(leader, &format!("/v1/tiers/reg-{register}")),
            Some(ADMIN_TOKEN),
            Some(&body),
        )
        .await?;
        ensure!(answer.status == 201, "create reg-{register}: {answer:?}");
    }
    Ok(())
}

/// The leader as the running nodes see it, if they agree.
async fn current_leader(cluster: &Cluster, ids: &[u64]) -> Option<u64> {
    for id in ids {
        if let Ok(status) = cluster.status(*id).await {
            if let Some(leader) = status["leader_id"].as_u64() {
                return Some(leader);
            }
        }
    }
    None
}

/// Reads every register through the leader once the cluster is whole again: the final value
/// must be one a linearizable history allows (an acknowledged write cannot be lost).
async fn final_reads(cluster: &mut Cluster, workload: &Workload) -> anyhow::Result<()> {
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let address = cluster.address(leader);
    for register in 0..REGISTERS {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            workload.read(usize::MAX, register, &address, false).await;
            let done = workload
                .histories
                .ops
                .lock()
                .ok()
                .and_then(|ops| ops.get(&register).and_then(|h| h.last().cloned()))
                .is_some_and(|op| op.value.is_some());
            if done {
                break;
            }
            if Instant::now() > deadline {
                bail!("no final read of reg-{register} through node {leader}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_stay_linearizable_while_nodes_are_killed_and_restarted() -> anyhow::Result<()> {
    if !e2e_enabled("linearizability") {
        return Ok(());
    }
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    create_registers(&mut cluster).await?;
    let addresses: Vec<String> = (1..=3).map(|id| cluster.address(id)).collect();
    let workload = Workload::new(Instant::now())?;
    let mut rng = Rng::seeded();
    let until = Instant::now() + nemesis_duration();
    let targets = Targets {
        writes: addresses.clone(),
        reads: addresses,
        stale_reads: false,
    };
    let clients = workload.run(targets, until, rng.next());
    let nemesis = async {
        let mut kills = 0;
        while Instant::now() + Duration::from_secs(4) < until {
            tokio::time::sleep(rng.millis(1500, 3000)).await;
            let running = cluster.running();
            let leader = current_leader(&cluster, &running).await;
            let victim = match leader {
                Some(leader) if rng.below(3) < 2 => leader,
                _ => 1 + rng.below(3),
            };
            cluster.kill(victim);
            kills += 1;
            tokio::time::sleep(rng.millis(500, 2000)).await;
            cluster.start_node(victim)?;
        }
        anyhow::Ok(kills)
    };
    let ((), kills) = tokio::join!(clients, nemesis);
    let kills = kills?;
    for id in 1..=3 {
        if !cluster.running().contains(&id) {
            cluster.start_node(id)?;
        }
    }
    final_reads(&mut cluster, &workload).await?;
    println!(
        "kill nemesis: {kills} kills, {}",
        workload.histories.summary()
    );
    ensure!(kills >= 3, "the nemesis must have struck: {kills} kills");
    workload
        .histories
        .check_all()
        .map_err(|violation| anyhow::anyhow!("not linearizable: {violation}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_stay_linearizable_while_nodes_are_cut_off_and_stale_reads_do_not(
) -> anyhow::Result<()> {
    if !e2e_enabled("linearizability") {
        return Ok(());
    }
    if !running_as_root()? {
        println!("skipped: the partition nemesis needs root to create network namespaces");
        return Ok(());
    }
    let network = Network::create(&HOSTS)?;
    let namespaces = network
        .hosts
        .iter()
        .map(|host| (host.namespace.clone(), IpAddr::V4(host.ip)))
        .collect();
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        namespaces,
        ..ClusterOptions::default()
    })
    .await?;
    create_registers(&mut cluster).await?;
    let addresses: Vec<String> = (1..=3).map(|id| cluster.address(id)).collect();
    let host_of = |id: u64| HOSTS[id as usize - 1];

    let workload = Workload::new(Instant::now())?;
    let mut rng = Rng::seeded();
    let until = Instant::now() + nemesis_duration();
    let targets = Targets {
        writes: addresses.clone(),
        reads: addresses.clone(),
        stale_reads: false,
    };
    let clients = workload.run(targets, until, rng.next());
    let nemesis = async {
        let mut cuts = 0;
        while Instant::now() + Duration::from_secs(5) < until {
            tokio::time::sleep(rng.millis(1500, 3000)).await;
            let leader = current_leader(&cluster, &[1, 2, 3]).await;
            let victim = match leader {
                Some(leader) if rng.below(3) < 2 => leader,
                _ => 1 + rng.below(3),
            };
            network.cut_off(host_of(victim))?;
            cuts += 1;
            tokio::time::sleep(rng.millis(1000, 3000)).await;
            network.heal(host_of(victim))?;
        }
        anyhow::Ok(cuts)
    };
    let ((), cuts) = tokio::join!(clients, nemesis);
    let cuts = cuts?;
    final_reads(&mut cluster, &workload).await?;
    println!(
        "partition nemesis: {cuts} cuts, {}",
        workload.histories.summary()
    );
    ensure!(cuts >= 3, "the nemesis must have struck: {cuts} cuts");
    workload
        .histories
        .check_all()
        .map_err(|violation| anyhow::anyhow!("not linearizable: {violation}"))?;

    // The same run continued with `?stale=true` reads: a cut-off follower answers them from its
    // own state while the majority goes on writing, so the history must now fail.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    network.cut_off(host_of(follower))?;
    let majority: Vec<String> = (1..=3)
        .filter(|id| *id != follower)
        .map(|id| cluster.address(id))
        .collect();
    let until = Instant::now() + Duration::from_secs(8);
    workload
        .run(
            Targets {
                writes: majority,
                reads: addresses,
                stale_reads: true,
            },
            until,
            rng.next(),
        )
        .await;
    network.heal(host_of(follower))?;
    println!("with stale reads: {}", workload.histories.summary());
    match workload.histories.check_all() {
        Err(violation) => println!("stale reads caught as expected: {violation}"),
        Ok(()) => bail!("the checker passed a history with stale reads from a cut-off follower"),
    }
    Ok(())
}

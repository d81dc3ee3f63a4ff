//! The replicated controller under normal operation and under faults: writes through followers,
//! kill -9 of the leader under load, kill -9 of every node, snapshot catch-up, and membership
//! changes with writes continuing. Real `strata-controller` processes on loopback.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use serde_json::{json, Value};
use strata_tests::{send, tier_body, Cluster, ClusterOptions, ADMIN_TOKEN};

async fn put_tier(cluster: &Cluster, node: u64, name: &str) -> anyhow::Result<u16> {
    let answer = send(
        &cluster.http,
        Method::PUT,
        &cluster.url(node, &format!("/v1/tiers/{name}")),
        Some(ADMIN_TOKEN),
        Some(&tier_body(name)),
    )
    .await?;
    Ok(answer.status)
}

async fn tier_names(cluster: &Cluster, node: u64, stale: bool) -> anyhow::Result<BTreeSet<String>> {
    // Every page: a list answers at most 500 items and names the next page in `continue`.
    let mut names = BTreeSet::new();
    let mut next: Option<String> = None;
    loop {
        let mut query = vec!["limit=1000".to_string()];
        if stale {
            query.push("stale=true".to_string());
        }
        if let Some(token) = &next {
            query.push(format!("continue={token}"));
        }
        let answer = send(
            &cluster.http,
            Method::GET,
            &cluster.url(node, &format!("/v1/tiers?{}", query.join("&"))),
            Some(ADMIN_TOKEN),
            None,
        )
        .await?;
        anyhow::ensure!(answer.status == 200, "list tiers on {node}: {answer:?}");
        if let Some(items) = answer.body["items"].as_array() {
            names.extend(
                items
                    .iter()
                    .filter_map(|tier| tier["name"].as_str().map(str::to_string)),
            );
        }
        match answer.body["continue"].as_str() {
            Some(token) => next = Some(token.to_string()),
            None => return Ok(names),
        }
    }
}

/// A node's `/metrics` text.
async fn metrics_text(cluster: &Cluster, node: u64) -> anyhow::Result<String> {
    Ok(cluster
        .http
        .get(cluster.url(node, "/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// The value of an unlabelled metric in `/metrics` text (0 when absent).
fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

fn follower_of(leader: u64, ids: &[u64]) -> u64 {
    ids.iter()
        .copied()
        .find(|id| *id != leader)
        .unwrap_or(leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_a_follower_is_read_back_from_every_node() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let follower = follower_of(leader, &[1, 2, 3]);

    assert_eq!(put_tier(&cluster, follower, "web").await?, 201);
    for node in 1..=3 {
        let answer = send(
            &cluster.http,
            Method::GET,
            &cluster.url(node, "/v1/tiers/web"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await?;
        assert_eq!(answer.status, 200, "node {node}: {answer:?}");
        assert_eq!(answer.body["name"], "web");
        assert!(answer.body["resource_version"].as_u64().unwrap_or(0) > 0);
    }
    // A replace through another follower bumps the version; the old version is now stale.
    let second = follower_of(leader, &[3, 2, 1]);
    let mut body = tier_body("web");
    body["scaling"]["max"] = json!(7);
    body["template"]["cpu"] = json!(1.0);
    let replaced = send(
        &cluster.http,
        Method::PUT,
        &cluster.url(second, "/v1/tiers/web"),
        Some(ADMIN_TOKEN),
        Some(&body),
    )
    .await?;
    assert_eq!(replaced.status, 200, "{replaced:?}");
    assert_eq!(replaced.body["generation"], 2);
    for node in 1..=3 {
        let answer = send(
            &cluster.http,
            Method::GET,
            &cluster.url(node, "/v1/tiers/web"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await?;
        assert_eq!(
            answer.body["scaling"]["max"], 7,
            "node {node} read a stale tier"
        );
    }
    // Health, readiness and metrics need no token.
    for path in ["/healthz", "/readyz"] {
        let response = cluster.http.get(cluster.url(follower, path)).send().await?;
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    let metrics = cluster
        .http
        .get(cluster.url(leader, "/metrics"))
        .send()
        .await?
        .text()
        .await?;
    for name in [
        "strata_raft_is_leader 1",
        "strata_tiers 1",
        "strata_raft_applied_index",
        "strata_reconcile_rounds_total",
        "strata_nodes{status=\"Ready\"} 0",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    Ok(())
}

/// Concurrent writes through one follower travel to the leader together (several per forwarded
/// request, several per log entry); each caller must still get the answer to its own write:
/// its own tier back, or its own rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_a_follower_each_get_their_own_answer() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let follower = follower_of(leader, &[1, 2, 3]);
    // A tier to send stale compare-and-set writes against.
    assert_eq!(put_tier(&cluster, follower, "fixed").await?, 201);

    let mut writes = Vec::new();
    for round in 0..4 {
        for client in 0..48u32 {
            let http = cluster.http.clone();
            let url_of = |name: &str| cluster.url(follower, &format!("/v1/tiers/{name}"));
            let (name, url) = if client % 8 == 7 {
                ("fixed".to_string(), url_of("fixed"))
            } else {
                let name = format!("w{round}-{client}");
                let url = url_of(&name);
                (name, url)
            };
            writes.push(tokio::spawn(async move {
                let mut body = tier_body(&name);
                // Distinct maxima tell the answers apart.
                body["scaling"]["max"] = json!(100 + client);
                if name == "fixed" {
                    body["resource_version"] = json!(1);
                }
                let answer = send(&http, Method::PUT, &url, Some(ADMIN_TOKEN), Some(&body)).await;
                (name, client, answer)
            }));
        }
    }
    let mut created = 0;
    for write in writes {
        let (name, client, answer) = write.await?;
        let answer = answer?;
        if name == "fixed" {
            assert_eq!(answer.status, 409, "stale write on {name}: {answer:?}");
            continue;
        }
        assert_eq!(answer.status, 201, "{name}: {answer:?}");
        assert_eq!(answer.body["name"], name.as_str(), "{answer:?}");
        assert_eq!(answer.body["scaling"]["max"], 100 + client, "{answer:?}");
        created += 1;
    }
    assert_eq!(created, 4 * 42);
    let names = tier_names(&cluster, leader, false).await?;
    assert_eq!(names.len(), 4 * 42 + 1);
    // They did travel together: fewer forwarding requests than forwarded writes.
    let metrics = metrics_text(&cluster, follower).await?;
    let forwarded = metric_value(&metrics, "strata_forwarded_writes_total");
    let requests = metric_value(&metrics, "strata_forward_requests_total");
    // `fixed` and the 192 concurrent writes all went through the follower.
    assert!(forwarded > 4 * 48, "forwarded {forwarded}:\n{metrics}");
    assert!(
        requests < forwarded,
        "{requests} requests for {forwarded} writes"
    );
    Ok(())
}

/// openraft's snapshot policy counts entries, and a batched entry may hold 64 writes: the log
/// is also snapshotted when its size since the last snapshot passes `--snapshot-log-mib`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_snapshotted_when_it_outgrows_its_size_limit() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        // Far beyond what the test writes: only the size limit can trigger a snapshot.
        snapshot_logs: 1_000_000,
        snapshot_log_mib: 1,
        ..ClusterOptions::default()
    })
    .await?;
    cluster.wait_for_leader(Duration::from_secs(20)).await?;
    // About 2 MiB of tiers of 5 KiB each, from 8 writers spread over the nodes.
    // (Two values: one env value may hold at most 4 KiB.)
    let padding = "x".repeat(2500);
    let mut writers = Vec::new();
    for writer in 0..8u64 {
        let http = cluster.http.clone();
        let url = cluster.url(1 + writer % 3, "/v1/tiers");
        let padding = padding.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..50 {
                let name = format!("big-{writer}-{n}");
                let mut body = tier_body(&name);
                body["template"]["env"] = json!({ "PADDING": padding, "PADDING_2": padding });
                let answer = send(
                    &http,
                    Method::PUT,
                    &format!("{url}/{name}"),
                    Some(ADMIN_TOKEN),
                    Some(&body),
                )
                .await?;
                anyhow::ensure!(answer.status == 201, "{name}: {answer:?}");
            }
            Ok(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in 1..=3 {
        loop {
            let text = metrics_text(&cluster, node).await?;
            let snapshot = metric_value(&text, "strata_raft_snapshot_index");
            let log_bytes = metric_value(&text, "strata_raft_log_bytes");
            if snapshot > 0 {
                assert!(log_bytes > 0, "node {node}: {text}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} took no snapshot with {log_bytes} bytes of log:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Writers that record every write the cluster acknowledged.
struct Writers {
    acknowledged: Arc<Mutex<Vec<String>>>,
    /// Values acknowledged by compare-and-set increments of the `counter` tier.
    increments: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(cluster: &Cluster, clients: usize, prefix: &str) -> Writers {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let increments = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let addresses: Vec<String> = cluster.nodes.values().map(|n| n.address.clone()).collect();
        let mut tasks = Vec::new();
        for client in 0..clients {
            let http = cluster.http.clone();
            let addresses = addresses.clone();
            let acknowledged = acknowledged.clone();
            let increments = increments.clone();
            let stop = stop.clone();
            let prefix = prefix.to_string();
            tasks.push(tokio::spawn(async move {
                let mut sequence = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sequence += 1;
                    let address = &addresses[(client + sequence as usize) % addresses.len()];
                    if client % 4 == 0 {
                        // Compare-and-set increment of the shared counter.
                        if let Some(value) = cas_increment(&http, address).await {
                            increments.lock().map(|mut v| v.push(value)).ok();
                        }
                        continue;
                    }
                    let name = format!("{prefix}-{client}-{sequence}");
                    let answer = send(
                        &http,
                        Method::PUT,
                        &format!("http://{address}/v1/tiers/{name}"),
                        Some(ADMIN_TOKEN),
                        Some(&tier_body(&name)),
                    )
                    .await;
                    if matches!(answer, Ok(ref a) if a.status == 201) {
                        acknowledged.lock().map(|mut v| v.push(name)).ok();
                    }
                }
            }));
        }
        Writers {
            acknowledged,
            increments,
            stop,
            tasks,
        }
    }

    async fn stop(self) -> (Vec<String>, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let acknowledged = self
            .acknowledged
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let increments = self
            .increments
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        (acknowledged, increments)
    }
}

/// Reads the counter tier and sets `desired` one higher with compare-and-set. Returns the new
/// value when the cluster acknowledged it.
async fn cas_increment(http: &reqwest::Client, address: &str) -> Option<u64> {
    let current = send(
        http,
        Method::GET,
        &format!("http://{address}/v1/tiers/counter"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await
    .ok()?;
    if current.status != 200 {
        return None;
    }
    let version = current.body["resource_version"].as_u64()?;
    let value = current.body["status"]["desired"].as_u64()?;
    let answer = send(
        http,
        Method::POST,
        &format!("http://{address}/v1/tiers/counter/scale"),
        Some(ADMIN_TOKEN),
        Some(&json!({"desired": value + 1, "resource_version": version})),
    )
    .await
    .ok()?;
    (answer.status == 200).then_some(value + 1)
}

async fn counter_value(cluster: &Cluster, node: u64) -> anyhow::Result<u64> {
    let answer = send(
        &cluster.http,
        Method::GET,
        &cluster.url(node, "/v1/tiers/counter"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    answer.body["status"]["desired"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("counter unreadable on {node}: {answer:?}"))
}

fn assert_increments_unique(increments: &[u64], final_value: u64) {
    let unique: BTreeSet<u64> = increments.iter().copied().collect();
    assert_eq!(
        unique.len(),
        increments.len(),
        "a compare-and-set value was acknowledged twice: {increments:?}"
    );
    let highest = unique.iter().next_back().copied().unwrap_or(0);
    assert!(
        final_value >= highest && final_value >= increments.len() as u64,
        "counter {final_value} lost acknowledged increments (highest {highest}, count {})",
        increments.len()
    );
}

/// A cluster for `Writers`, which create a tier per write: on a fast machine they pass the
/// default `--max-tiers` (1,000) within seconds, and every write after it is a 422.
fn under_writers() -> ClusterOptions {
    ClusterOptions {
        extra_args: vec!["--max-tiers".to_string(), "1000000".to_string()],
        ..ClusterOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_concurrent_writes_loses_nothing() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(under_writers()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    assert_eq!(put_tier(&cluster, leader, "counter").await?, 201);

    let writers = Writers::start(&cluster, 12, "load");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(leader);
    let killed_at = Instant::now();

    // A new leader takes writes.
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let new_leader = cluster
        .wait_for_leader_other_than(Some(leader), Duration::from_secs(20))
        .await?;
    assert_ne!(new_leader, leader);
    let mut accepted_after_kill = false;
    while killed_at.elapsed() < Duration::from_secs(20) {
        let name = format!("after-kill-{}", killed_at.elapsed().as_millis());
        if put_tier(&cluster, survivors[0], &name).await.ok() == Some(201) {
            accepted_after_kill = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        accepted_after_kill,
        "no write accepted after the leader died"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (acknowledged, increments) = writers.stop().await;
    assert!(
        acknowledged.len() > 20,
        "too few writes to mean anything: {}",
        acknowledged.len()
    );

    // The old leader comes back; every acknowledged write is on every node.
    cluster.start_node(leader)?;
    cluster.wait_for_leader(Duration::from_secs(20)).await?;
    for node in 1..=3 {
        let names = tier_names(&cluster, node, false).await?;
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|n| !names.contains(*n))
            .collect();
        assert!(
            missing.is_empty(),
            "node {node} lost acknowledged writes: {missing:?}"
        );
        assert_increments_unique(&increments, counter_value(&cluster, node).await?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_every_node_then_restart_keeps_every_acknowledged_write() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(under_writers()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    assert_eq!(put_tier(&cluster, leader, "counter").await?, 201);
    let writers = Writers::start(&cluster, 8, "durable");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Kill all three while writes are in flight, so some acknowledged ones were the last.
    for node in 1..=3 {
        cluster.kill(node);
    }
    let (acknowledged, increments) = writers.stop().await;
    assert!(!acknowledged.is_empty());

    for node in 1..=3 {
        cluster.start_node(node)?;
    }
    cluster.wait_for_leader(Duration::from_secs(30)).await?;
    for node in 1..=3 {
        let names = tier_names(&cluster, node, false).await?;
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|n| !names.contains(*n))
            .collect();
        assert!(
            missing.is_empty(),
            "node {node} lost {} acknowledged writes after restart: {missing:?}",
            missing.len()
        );
        assert_increments_unique(&increments, counter_value(&cluster, node).await?);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_for_10000_entries_catches_up_through_a_snapshot() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        snapshot_logs: 1000,
        ..ClusterOptions::default()
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let lagging = follower_of(leader, &[3, 2, 1]);
    cluster.kill(lagging);
    let writer_node = follower_of(lagging, &[leader]);

    // 10,000+ entries while the node is down: scale a few tiers back and forth.
    for name in ["snap-a", "snap-b", "snap-c", "snap-d"] {
        assert_eq!(put_tier(&cluster, writer_node, name).await?, 201);
    }
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client in 0..16u64 {
        let http = cluster.http.clone();
        let url = cluster.url(writer_node, "");
        let written = written.clone();
        tasks.push(tokio::spawn(async move {
            let name = ["snap-a", "snap-b", "snap-c", "snap-d"][client as usize % 4];
            for i in 0..650u64 {
                let body = json!({"desired": 1 + (client * 650 + i) % 999});
                let answer = send(
                    &http,
                    Method::POST,
                    &format!("{url}/v1/tiers/{name}/scale"),
                    Some(ADMIN_TOKEN),
                    Some(&body),
                )
                .await;
                if matches!(answer, Ok(ref a) if a.status == 200) {
                    written.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    assert!(written.load(Ordering::Relaxed) >= 10_000);
    let leader_status = cluster.status(leader).await?;
    let target = leader_status["applied_index"].as_u64().unwrap_or(0);
    assert!(
        leader_status["snapshot_index"].as_u64().unwrap_or(0) > 1000,
        "the leader took no snapshot: {leader_status}"
    );
    let expected = tier_names(&cluster, leader, false).await?;

    cluster.start_node(lagging)?;
    let status = cluster
        .wait_applied(lagging, target, Duration::from_secs(60))
        .await
        .map_err(|error| anyhow::anyhow!("{error}\n{}", cluster.log_tail(lagging)))?;
    let snapshot_index = status["snapshot_index"].as_u64().unwrap_or(0);
    assert!(
        snapshot_index > 1000,
        "the node caught up without installing a snapshot: {status}"
    );
    assert_eq!(tier_names(&cluster, lagging, true).await?, expected);
    let log = std::fs::read_to_string(&cluster.nodes[&lagging].log_path).unwrap_or_default();
    assert!(
        log.contains("installed snapshot from the leader"),
        "no snapshot installation in the node's log"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_member_is_added_and_an_old_one_removed_while_writes_continue(
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(under_writers()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    assert_eq!(put_tier(&cluster, leader, "counter").await?, 201);
    let writers = Writers::start(&cluster, 6, "member");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let address = cluster.start_new_node(4)?;
    let added = send(
        &cluster.http,
        Method::POST,
        &cluster.url(follower_of(leader, &[1, 2, 3]), "/v1/cluster/members"),
        Some(ADMIN_TOKEN),
        Some(&json!({"id": 4, "address": address})),
    )
    .await?;
    assert_eq!(added.status, 200, "{added:?}");

    // Remove the current leader itself: the hardest case for continuing writes.
    let removed = send(
        &cluster.http,
        Method::DELETE,
        &cluster.url(4, &format!("/v1/cluster/members/{leader}")),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    assert_eq!(removed.status, 200, "{removed:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(leader);
    let (acknowledged, increments) = writers.stop().await;
    assert!(
        acknowledged.len() > 10,
        "writes stalled: {}",
        acknowledged.len()
    );

    cluster
        .wait_for_leader_other_than(Some(leader), Duration::from_secs(20))
        .await?;
    let status = cluster.status(4).await?;
    let members: BTreeSet<u64> = status["members"]
        .as_array()
        .map(|members| members.iter().filter_map(|m| m["id"].as_u64()).collect())
        .unwrap_or_default();
    let expected: BTreeSet<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    assert_eq!(members, expected, "{status}");
    assert!(status["members"]
        .as_array()
        .is_some_and(|m| m.iter().all(|m| m["voter"] == Value::Bool(true))));
    let survivors: Vec<u64> = expected.iter().copied().collect();
    assert_eq!(put_tier(&cluster, survivors[0], "after-change").await?, 201);
    for node in survivors {
        let names = tier_names(&cluster, node, false).await?;
        let missing: Vec<&String> = acknowledged
            .iter()
            .filter(|n| !names.contains(*n))
            .collect();
        assert!(missing.is_empty(), "node {node} lost writes: {missing:?}");
        assert_increments_unique(&increments, counter_value(&cluster, node).await?);
    }
    Ok(())
}

/// A follower removed from the membership never receives the entry that removed it, so it
/// still believes it is a member. Its linearizable reads used to wait for a log index the
/// leader no longer sends it, and answered 504 after the write timeout; now the leader tells
/// it that it is no member, it answers 503 `not-a-member` with the members at once, and
/// `stratactl` with it first in `--server` moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_follower_sends_clients_to_the_members_at_once() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    let removed_id = follower_of(leader, &[1, 2, 3]);
    assert_eq!(put_tier(&cluster, leader, "before").await?, 201);
    let removed = send(
        &cluster.http,
        Method::DELETE,
        &cluster.url(leader, &format!("/v1/cluster/members/{removed_id}")),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    assert_eq!(removed.status, 200, "{removed:?}");
    // A write after the removal: the leader no longer replicates to the removed node.
    assert_eq!(put_tier(&cluster, leader, "after").await?, 201);

    let answer = send(
        &cluster.http,
        Method::GET,
        &cluster.url(removed_id, "/v1/tiers"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(
        answer.body["type"], "urn:strata:problem:not-a-member",
        "{answer:?}"
    );
    let members: BTreeSet<u64> = answer.body["members"]
        .as_array()
        .map(|members| members.iter().filter_map(|m| m["id"].as_u64()).collect())
        .unwrap_or_default();
    let expected: BTreeSet<u64> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != removed_id)
        .collect();
    assert_eq!(members, expected, "{answer:?}");

    // stratactl tries the removed node first and reads from a member.
    let mut order = vec![removed_id];
    order.extend([1, 2, 3].into_iter().filter(|id| *id != removed_id));
    let servers = order
        .iter()
        .map(|id| cluster.address(*id))
        .collect::<Vec<_>>()
        .join(",");
    let output = std::process::Command::new(strata_tests::binary("stratactl"))
        .args(["--server", &servers, "--token", ADMIN_TOKEN, "get", "tiers"])
        .output()
        .context("run stratactl")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("after"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The resource version in a tier answer.
fn version_of(tier: &Value) -> Option<u64> {
    tier["resource_version"]
        .as_u64()
        .or_else(|| tier["spec"]["resource_version"].as_u64())
}

/// A hot object: 64 clients scaling one tier at once, through the leader and both followers.
/// Their writes share log entries like writes to distinct objects, yet each is acknowledged
/// once with its own resource version, each client sees its versions increase, the last
/// version holds the last value, and a compare-and-set race on one version has one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_writers_on_one_tier_each_get_their_own_version() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions::default()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    assert_eq!(put_tier(&cluster, leader, "hot").await?, 201);
    let log_before = cluster.status(leader).await?["last_log_index"]
        .as_u64()
        .unwrap_or(0);

    const CLIENTS: u64 = 64;
    const ROUNDS: u64 = 4;
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let http = cluster.http.clone();
        let url = cluster.url(1 + client % 3, "/v1/tiers/hot/scale");
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for round in 0..ROUNDS {
                // Unique values tell every write apart.
                let desired = 1 + client * ROUNDS + round;
                let body = json!({ "desired": desired });
                let answer =
                    send(&http, Method::POST, &url, Some(ADMIN_TOKEN), Some(&body)).await?;
                anyhow::ensure!(answer.status == 200, "scale to {desired}: {answer:?}");
                let version = version_of(&answer.body)
                    .with_context(|| format!("no resource_version in {}", answer.body))?;
                seen.push((version, desired));
            }
            anyhow::Ok(seen)
        }));
    }
    let mut all: Vec<(u64, u64)> = Vec::new();
    for client in clients {
        let seen = client.await??;
        assert!(
            seen.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "one client's versions must increase: {seen:?}"
        );
        all.extend(seen);
    }
    assert_eq!(all.len() as u64, CLIENTS * ROUNDS);
    let versions: BTreeSet<u64> = all.iter().map(|(version, _)| *version).collect();
    assert_eq!(
        versions.len(),
        all.len(),
        "every write has its own resource version"
    );
    let (last_version, last_value) = *all.iter().max().context("no writes")?;
    let tier: Value = send(
        &cluster.http,
        Method::GET,
        &cluster.url(leader, "/v1/tiers/hot"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?
    .body;
    assert_eq!(version_of(&tier), Some(last_version), "{tier}");
    assert_eq!(tier["status"]["desired"], last_value, "{tier}");
    // They shared entries: the log grew by fewer entries than there were writes (the planners'
    // own entries included).
    let log_after = cluster.status(leader).await?["last_log_index"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        log_after - log_before < CLIENTS * ROUNDS,
        "{} entries for {} writes",
        log_after - log_before,
        CLIENTS * ROUNDS
    );

    // A compare-and-set race on the current version: exactly one winner, the rest 409.
    let mut racers = Vec::new();
    for racer in 0..CLIENTS {
        let http = cluster.http.clone();
        let url = cluster.url(1 + racer % 3, "/v1/tiers/hot/scale");
        racers.push(tokio::spawn(async move {
            let body = json!({ "desired": 500 + racer, "resource_version": last_version });
            send(&http, Method::POST, &url, Some(ADMIN_TOKEN), Some(&body)).await
        }));
    }
    let mut winners = 0;
    for racer in racers {
        let answer = racer.await??;
        match answer.status {
            200 => winners += 1,
            409 => assert_eq!(
                answer.body["current_resource_version"]
                    .as_u64()
                    .map(|v| v > last_version),
                Some(true),
                "{answer:?}"
            ),
            _ => panic!("compare-and-set answered {answer:?}"),
        }
    }
    assert_eq!(winners, 1, "exactly one compare-and-set wins");
    Ok(())
}

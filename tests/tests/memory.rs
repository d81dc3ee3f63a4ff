//! The leader's memory under maximum-size heartbeats: many registered nodes, each sending
//! heartbeats as large as a body may be (1 MiB: instance reports with 1,024-byte reasons),
//! from several senders at once. What the leader keeps of a heartbeat is bounded by what
//! concerns the node (reports of instances placed on it), so its RSS may grow by what the
//! requests in flight hold, not by nodes times body size.
//!
//! These run when `STRATA_E2E=1` (deploy/test.sh and CI set it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use strata_tests::{e2e_enabled, send, Cluster, ClusterOptions, JOIN_TOKEN};

/// Registered nodes (the issue measured 1,000; scaled to what a debug build decodes in the
/// test's time on two shared cores: the bound below does not depend on it).
const NODES: usize = 200;
/// Heartbeats in flight at once.
const SENDERS: usize = 16;
/// How long the heartbeats keep coming.
const LOAD: Duration = Duration::from_secs(20);
/// The request body limit (`MAX_API_BODY`).
const MAX_BODY: usize = 1024 * 1024;
/// What one request in flight may hold: its body, its decoded form and the answer, with
/// room to spare (4 MiB per 1 MiB body).
const PER_REQUEST: u64 = 4 * 1024 * 1024;
/// Allocator and runtime slack on top.
const SLACK: u64 = 64 * 1024 * 1024;

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// A heartbeat of `node` just under the body limit: reports of instances that are not the
/// node's (so none of it is the leader's to keep), each with a reason at its 1,024-byte limit.
fn max_heartbeat(node: &str, seed: usize) -> Vec<u8> {
    let reason = "r".repeat(1024);
    let report = |slot: usize| {
        json!({"id": format!("{seed:08x}-0000-4000-8000-{slot:012x}"), "phase": "Failed",
               "health": "Unknown", "reason": reason})
    };
    let body = |count: usize| {
        serde_json::to_vec(&json!({"node_id": node, "wait_ms": 0,
            "instances": (0..count).map(report).collect::<Vec<_>>()}))
        .unwrap_or_default()
    };
    // Every report has the same length, so the count that fits follows from two sizes.
    let (one, two) = (body(1).len(), body(2).len());
    let per_report = two - one;
    let count = 1 + (MAX_BODY - 2048 - one) / per_report;
    body(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_memory_stays_bounded_under_maximum_size_heartbeats() -> anyhow::Result<()> {
    if !e2e_enabled("memory") {
        return Ok(());
    }
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await?;
    let pid = cluster
        .pid(1)
        .ok_or_else(|| anyhow::anyhow!("no controller pid"))?;
    let http = cluster.http.clone();

    let mut credentials = Vec::new();
    for index in 0..NODES {
        let node = format!("mem-{index:04}");
        let registration = json!({"node_id": node, "address": "127.0.0.1",
            "capacity": {"cpu": 1.0, "memory_mb": 512}, "agent_version": "x"});
        let answer = send(
            &http,
            Method::POST,
            &cluster.url(1, "/v1/agents/register"),
            Some(JOIN_TOKEN),
            Some(&registration),
        )
        .await?;
        anyhow::ensure!(answer.status == 200, "register {node}: {answer:?}");
        let credential = answer.body["credential"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        credentials.push((node, credential));
    }
    let bodies: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        credentials
            .iter()
            .enumerate()
            .map(|(index, (_, credential))| {
                let node = &credentials[index].0;
                (credential.clone(), max_heartbeat(node, index))
            })
            .collect(),
    );
    let size = bodies[0].1.len();
    assert!(
        size > MAX_BODY * 9 / 10 && size <= MAX_BODY,
        "heartbeat of {size} bytes"
    );

    // Settle, then measure before any large heartbeat arrived.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_bytes(pid)?;

    let url = cluster.url(1, "/v1/agents/heartbeat");
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (http, url, bodies, next, answered) = (
            http.clone(),
            url.clone(),
            bodies.clone(),
            next.clone(),
            answered.clone(),
        );
        senders.push(tokio::spawn(async move {
            while started.elapsed() < LOAD {
                let index = next.fetch_add(1, Ordering::Relaxed) % bodies.len();
                let (credential, body) = &bodies[index];
                let response = http
                    .post(&url)
                    .bearer_auth(credential)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                if let Ok(response) = response {
                    if response.status().is_success() {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = response.bytes().await;
                }
            }
        }));
    }
    let mut peak = baseline;
    while started.elapsed() < LOAD {
        peak = peak.max(rss_bytes(pid)?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for sender in senders {
        let _ = sender.await;
    }
    peak = peak.max(rss_bytes(pid)?);
    let answered = answered.load(Ordering::Relaxed);
    // Every node was heard from several times.
    assert!(answered >= NODES * 2, "only {answered} heartbeats answered");
    let bound = SENDERS as u64 * PER_REQUEST + SLACK;
    let growth = peak.saturating_sub(baseline);
    println!(
        "baseline {} MiB, peak {} MiB, growth {} MiB (bound {} MiB) over {answered} heartbeats of {size} bytes",
        baseline >> 20,
        peak >> 20,
        growth >> 20,
        bound >> 20
    );
    assert!(
        growth <= bound,
        "the leader's RSS grew by {} MiB under {answered} heartbeats from {NODES} nodes (bound {} MiB)",
        growth >> 20,
        bound >> 20
    );
    // The controller is still healthy and knows every node.
    let nodes: Value = cluster
        .http
        .get(cluster.url(1, "/v1/nodes?limit=1000"))
        .bearer_auth(strata_tests::ADMIN_TOKEN)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(nodes["items"].as_array().map_or(0, Vec::len), NODES);
    Ok(())
}

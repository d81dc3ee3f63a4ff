//! Client-visible failover when the leader is cut off from its peers, not killed: each member
//! runs in its own network namespace on a bridge (`strata_tests::netns`), and the cut is
//! blackhole routes both ways between the leader and the others while the benchmark, in the
//! root namespace like any client, still reaches every member.
//!
//! One sample is the time from the cut to the first acknowledged write of a client that knows
//! all three addresses and tries the cut-off leader first, the worst order for it. Strata's
//! client is `strata_api::Client` with its defaults (10 s per attempt, move on at any 503);
//! etcd's is the same policy written out (each address in turn, 10 s per attempt), because
//! the HTTP gateway has no client library here. Between cuts the network heals and the
//! benchmark waits for one agreed leader.
//!
//! Needs root (namespaces, veths, routes); every namespace and link goes when the run ends.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde::Serialize;
use strata_tests::netns::Network;

use crate::cluster::{Binaries, Cluster, STRATA_ADMIN_TOKEN};
use crate::system::System;
use crate::writes::round2;

/// The issue's target for the median.
pub const TARGET_MEDIAN_MS: f64 = 1500.0;
const PER_ATTEMPT: Duration = Duration::from_secs(10);
const GIVE_UP: Duration = Duration::from_secs(60);
const HOSTS: [&str; 3] = ["p1", "p2", "p3"];
const TIER: &str = "bench-partition";

#[derive(Clone, Debug, Serialize)]
pub struct PartitionReport {
    pub system: &'static str,
    pub cuts: usize,
    pub samples_ms: Vec<f64>,
    pub median_ms: f64,
    pub max_ms: f64,
}

/// Starts a 3-member cluster of `system` in namespaces and cuts its leader off `cuts` times.
pub async fn run(
    system: System,
    binaries: &Binaries,
    keep_dir: bool,
    cuts: usize,
) -> Result<PartitionReport> {
    let network = Network::create(&HOSTS)?;
    let hosts: Vec<(String, std::net::Ipv4Addr)> = network
        .hosts
        .iter()
        .map(|host| (host.namespace.clone(), host.ip))
        .collect();
    let mut cluster = Cluster::start_in_namespaces(system, binaries, keep_dir, &hosts).await?;
    let result = measure(&mut cluster, &network, cuts).await;
    cluster.shutdown().await;
    drop(network);
    result
}

async fn measure(cluster: &mut Cluster, network: &Network, cuts: usize) -> Result<PartitionReport> {
    let system = cluster.system;
    let http = reqwest::Client::builder()
        .timeout(PER_ATTEMPT)
        .build()
        .context("build HTTP client")?;
    if system == System::Strata {
        let body = format!(
            r#"{{"name":"{TIER}","template":{{"driver":"process","command":["strata-workload"]}},"scaling":{{"min":0,"max":1000,"desired":0}}}}"#
        );
        let endpoint = &cluster.endpoints()[cluster.wait_for_leader(GIVE_UP).await?];
        let response = http
            .put(format!("{endpoint}/v1/tiers/{TIER}"))
            .bearer_auth(STRATA_ADMIN_TOKEN)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("create {TIER}: {}", response.status());
        }
    }
    let mut samples_ms = Vec::with_capacity(cuts);
    for cut in 1..=cuts {
        let leader = cluster.wait_for_leader(GIVE_UP).await?;
        // Let the cluster settle: a cut right after an election measures the election.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut order = vec![cluster.endpoints()[leader].clone()];
        order.extend(
            cluster
                .endpoints()
                .into_iter()
                .enumerate()
                .filter(|(index, _)| *index != leader)
                .map(|(_, endpoint)| endpoint),
        );
        network.cut_off(HOSTS[leader])?;
        let cut_at = Instant::now();
        let written = write_with_failover(system, &http, &order, cut as u32).await;
        let elapsed = cut_at.elapsed();
        network.heal(HOSTS[leader])?;
        written.with_context(|| format!("{}: cut {cut}", system.name()))?;
        let ms = round2(elapsed.as_secs_f64() * 1000.0);
        eprintln!(
            "[{}] cut {cut}/{cuts}: member {} was leader, a write succeeded {ms} ms after the cut",
            system.name(),
            cluster.members[leader].node_id
        );
        samples_ms.push(ms);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut sorted = samples_ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(PartitionReport {
        system: system.name(),
        cuts,
        median_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        samples_ms,
    })
}

/// One write through a client that knows every address, in `order`.
async fn write_with_failover(
    system: System,
    http: &reqwest::Client,
    order: &[String],
    value: u32,
) -> Result<()> {
    match system {
        System::Strata => {
            let client = strata_api::Client::new(strata_api::ClientConfig {
                servers: order.to_vec(),
                token: Some(STRATA_ADMIN_TOKEN.to_string()),
                failover_deadline: GIVE_UP,
                ..strata_api::ClientConfig::default()
            })?;
            client
                .scale_tier(TIER, &strata_api::ScaleRequest::manual(value))
                .await?;
            Ok(())
        }
        System::Etcd => {
            let base64 = base64::engine::general_purpose::STANDARD;
            let body = serde_json::json!({
                "key": base64.encode("bench/partition"),
                "value": base64.encode(value.to_string()),
            })
            .to_string();
            let deadline = Instant::now() + GIVE_UP;
            let mut errors = Vec::new();
            for endpoint in order.iter().cycle() {
                if Instant::now() > deadline {
                    bail!("no write succeeded: {}", errors.join("; "));
                }
                let answer = http
                    .post(format!("{endpoint}/v3/kv/put"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match answer {
                    Ok(response) if response.status().is_success() => {
                        // The gateway answers 200 with an error body when the put failed.
                        let text = response.text().await.unwrap_or_default();
                        if !text.contains("\"error\"") {
                            return Ok(());
                        }
                        errors.push(format!("{endpoint}: {text}"));
                    }
                    Ok(response) => errors.push(format!("{endpoint}: {}", response.status())),
                    Err(error) => errors.push(format!("{endpoint}: {error}")),
                }
                if errors.len() % order.len() == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            bail!("no endpoints")
        }
    }
}

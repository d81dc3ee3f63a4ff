//! Controllers cut off from each other, not killed: each of the three runs in its own network
//! namespace on a bridge, and a cut is blackhole routes both ways between one node and the
//! others while the test (in the root namespace, like a client) still reaches every node.
//!
//! What an operator must see (issue: "an isolated leader steps aside at once"): a cut-off
//! leader refuses at once with 503 `no-quorum` instead of holding requests for the write
//! timeout, `stratactl` with it first in `--server` moves on, no acknowledged write is lost,
//! and a node that returns catches up without forcing an election.
//!
//! Runs when `STRATA_E2E=1` and as root; prints `skipped: <reason>` otherwise.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use reqwest::Method;
use serde_json::{json, Value};
use strata_tests::netns::{running_as_root, Network};
use strata_tests::{binary, e2e_enabled, send, tier_body, Cluster, ClusterOptions, ADMIN_TOKEN};

const HOSTS: [&str; 3] = ["c1", "c2", "c3"];
/// The controllers' default `--quorum-timeout`.
const QUORUM_TIMEOUT: Duration = Duration::from_millis(800);
/// The probe runs every two Raft heartbeats (200 ms by default); a cut is noticed at most one
/// probe round after the quorum timeout, plus a little scheduling slack.
const REFUSAL_BOUND: Duration = Duration::from_millis(1500);

fn preconditions(test: &str) -> anyhow::Result<bool> {
    if !e2e_enabled(test) {
        return Ok(false);
    }
    if !running_as_root()? {
        println!("skipped: {test} needs root to create network namespaces");
        return Ok(false);
    }
    let version = Command::new("ip").arg("-V").output().context(
        "run `ip -V`: iproute2 is required for this test (deploy/install-deps.sh installs it)",
    )?;
    ensure!(version.status.success(), "`ip -V` failed: {version:?}");
    Ok(true)
}

async fn start() -> anyhow::Result<(Network, Cluster)> {
    let network = Network::create(&HOSTS)?;
    let namespaces = network
        .hosts
        .iter()
        .map(|host| (host.namespace.clone(), IpAddr::V4(host.ip)))
        .collect();
    let cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        namespaces,
        ..ClusterOptions::default()
    })
    .await?;
    Ok((network, cluster))
}

fn host_of(id: u64) -> &'static str {
    HOSTS[id as usize - 1]
}

/// Sets tier `name`'s desired count through node `id`; `Ok(true)` when acknowledged.
async fn scale(cluster: &Cluster, id: u64, name: &str, desired: u64) -> anyhow::Result<bool> {
    let answer = send(
        &cluster.http,
        Method::POST,
        &cluster.url(id, &format!("/v1/tiers/{name}/scale")),
        Some(ADMIN_TOKEN),
        Some(&json!({ "desired": desired })),
    )
    .await?;
    Ok(answer.status == 200)
}

async fn desired_on(cluster: &Cluster, id: u64, name: &str) -> anyhow::Result<u64> {
    let answer = send(
        &cluster.http,
        Method::GET,
        &cluster.url(id, &format!("/v1/tiers/{name}")),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    ensure!(
        answer.status == 200,
        "GET tier {name} on node {id}: {answer:?}"
    );
    answer.body["spec"]["scaling"]["desired"]
        .as_u64()
        .or_else(|| answer.body["status"]["desired"].as_u64())
        .with_context(|| format!("no desired count in {}", answer.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_refuses_at_once_and_clients_move_on() -> anyhow::Result<()> {
    if !preconditions("partition")? {
        return Ok(());
    }
    let (network, mut cluster) = start().await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    for tier in ["a", "b", "c"] {
        let answer = send(
            &cluster.http,
            Method::PUT,
            &cluster.url(leader, &format!("/v1/tiers/{tier}")),
            Some(ADMIN_TOKEN),
            Some(&tier_body(tier)),
        )
        .await?;
        ensure!(answer.status < 300, "create tier {tier}: {answer:?}");
        ensure!(scale(&cluster, leader, tier, 1).await?, "scale {tier}");
        acknowledged.insert(tier.to_string(), 1);
    }
    let before = cluster.status(leader).await?;
    ensure!(before["has_quorum"] == true, "{before}");

    network.cut_off(host_of(leader))?;
    let cut_at = Instant::now();
    // Requests to the isolated leader: each one answers promptly, and within the bound they
    // are 503 no-quorum.
    let refused_after = loop {
        let sent = Instant::now();
        let answer = send(
            &cluster.http,
            Method::GET,
            &cluster.url(leader, "/v1/tiers"),
            Some(ADMIN_TOKEN),
            None,
        )
        .await?;
        if answer.status == 503 {
            ensure!(
                answer.content_type.starts_with("application/problem+json"),
                "{answer:?}"
            );
            ensure!(
                answer.body["type"] == "urn:strata:problem:no-quorum",
                "{answer:?}"
            );
            ensure!(
                answer.body["members"].as_array().map(Vec::len) == Some(3),
                "the refusal names the members it knows: {answer:?}"
            );
            break cut_at.elapsed();
        }
        ensure!(
            cut_at.elapsed() < REFUSAL_BOUND + Duration::from_secs(10),
            "the isolated leader never refused: last answer {answer:?}"
        );
        // A read that was held rather than answered shows as a long round trip.
        println!(
            "answer {} after {:?} (took {:?})",
            answer.status,
            cut_at.elapsed(),
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("isolated leader refused with no-quorum {refused_after:?} after the cut");
    ensure!(
        refused_after <= REFUSAL_BOUND,
        "the isolated leader took {refused_after:?} to refuse (bound {REFUSAL_BOUND:?} = quorum timeout {QUORUM_TIMEOUT:?} + one probe round and slack)"
    );
    let status = cluster.status(leader).await?;
    ensure!(
        status["has_quorum"] == false,
        "GET /v1/cluster says so: {status}"
    );
    // A write sent to it is refused the same way, at once.
    let sent = Instant::now();
    let answer = send(
        &cluster.http,
        Method::POST,
        &cluster.url(leader, "/v1/tiers/a/scale"),
        Some(ADMIN_TOKEN),
        Some(&json!({ "desired": 7 })),
    )
    .await?;
    ensure!(answer.status == 503, "{answer:?}");
    ensure!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );

    // The majority elects a new leader meanwhile (its own timing, not the client's).
    let majority: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut named = Vec::new();
        for id in &majority {
            named.push(
                cluster
                    .status(*id)
                    .await
                    .ok()
                    .and_then(|s| s["leader_id"].as_u64()),
            );
        }
        if named
            .iter()
            .all(|n| n.is_some() && *n == named[0] && *n != Some(leader))
        {
            println!(
                "the majority elected node {:?} {:?} after the cut",
                named[0],
                cut_at.elapsed()
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no new leader on the majority side: {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // stratactl with the isolated node first: it moves on to the others at once.
    let mut order = vec![leader];
    order.extend((1..=3).filter(|id| *id != leader));
    let servers = order
        .iter()
        .map(|id| cluster.address(*id))
        .collect::<Vec<_>>()
        .join(",");
    for args in [
        vec!["get", "tiers"],
        vec!["scale", "tier", "b", "--replicas", "4"],
        vec!["get", "tier", "b"],
    ] {
        let started = Instant::now();
        let output = Command::new(binary("stratactl"))
            .args(["--server", &servers, "--token", ADMIN_TOKEN])
            .args(&args)
            .output()
            .context("run stratactl")?;
        let took = started.elapsed();
        ensure!(
            output.status.success(),
            "stratactl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        println!("stratactl {args:?} took {took:?}");
        ensure!(
            took < Duration::from_secs(2),
            "stratactl {args:?} took {took:?}"
        );
    }
    acknowledged.insert("b".into(), 4);
    // More writes on the majority side while the cut lasts.
    for (n, tier) in ["a", "c"].iter().enumerate() {
        let through = majority[n % majority.len()];
        ensure!(
            scale(&cluster, through, tier, 10 + n as u64).await?,
            "scale {tier} through {through}"
        );
        acknowledged.insert(tier.to_string(), 10 + n as u64);
    }

    network.heal(host_of(leader))?;
    let new_leader = cluster
        .wait_for_leader_other_than(Some(leader), Duration::from_secs(30))
        .await
        .with_context(|| cluster.log_tail(leader))?;
    // Every node, the returned one included, serves every acknowledged write.
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in 1..=3 {
        for (tier, desired) in &acknowledged {
            loop {
                match desired_on(&cluster, id, tier).await {
                    Ok(seen) if seen == *desired => break,
                    Ok(seen) if Instant::now() > deadline => {
                        bail!("node {id} has {tier} at {seen}, acknowledged {desired}")
                    }
                    Err(error) if Instant::now() > deadline => return Err(error),
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        let status = cluster.status(id).await?;
        ensure!(status["has_quorum"] == true, "node {id}: {status}");
        ensure!(status["leader_id"] == new_leader, "node {id}: {status}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_follower_rejoins_without_an_election() -> anyhow::Result<()> {
    if !preconditions("partition")? {
        return Ok(());
    }
    let (network, mut cluster) = start().await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
    let answer = send(
        &cluster.http,
        Method::PUT,
        &cluster.url(leader, "/v1/tiers/t"),
        Some(ADMIN_TOKEN),
        Some(&tier_body("t")),
    )
    .await?;
    ensure!(answer.status < 300, "{answer:?}");
    let term = cluster.status(leader).await?["term"].clone();

    network.cut_off(host_of(follower))?;
    // Long enough for many election timeouts (250 ms): without the election gate the
    // follower would raise its term several times and depose the leader on its return.
    let cut_for = Duration::from_secs(4);
    let cut_at = Instant::now();
    let mut written = 0;
    while cut_at.elapsed() < cut_for {
        written += 1;
        ensure!(
            scale(&cluster, leader, "t", written).await?,
            "write {written}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let isolated = cluster.status(follower).await?;
    ensure!(isolated["has_quorum"] == false, "{isolated}");
    ensure!(
        isolated["term"] == term,
        "the cut-off follower started elections: {isolated}, term before {term}"
    );
    let leader_index = cluster.status(leader).await?["applied_index"]
        .as_u64()
        .unwrap_or(0);

    network.heal(host_of(follower))?;
    let healed_at = Instant::now();
    cluster
        .wait_applied(follower, leader_index, Duration::from_secs(30))
        .await?;
    println!(
        "the returned follower caught up {leader_index} entries' worth in {:?}",
        healed_at.elapsed()
    );
    // Give a disruptive election every chance to happen, then check none did.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in 1..=3 {
        let status: Value = cluster.status(id).await?;
        ensure!(
            status["leader_id"] == leader && status["term"] == term,
            "node {id} after the return: {status} (leader {leader}, term {term})"
        );
        ensure!(status["has_quorum"] == true, "node {id}: {status}");
    }
    ensure!(desired_on(&cluster, follower, "t").await? == written);
    Ok(())
}

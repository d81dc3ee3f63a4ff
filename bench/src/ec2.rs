//! EC2 scale-out against moto: a 3-member cluster scales an EC2 tier from 0 to N (50 by
//! default) through `strata_tests::fault_proxy`, once with every call answered and once with
//! every tenth call of each action throttled (`RequestLimitExceeded`). It measures the time
//! from the scale command's answer to every instance recorded Running, the EC2 calls made
//! (launch calls, `RunInstances`, and all calls) per instance, the busiest second against the
//! configured token bucket, and duplicates: a `strata:instance` uuid that EC2 ever ran twice
//! (terminated instances included).
//!
//! moto answers in milliseconds, so the time is bounded by the token bucket
//! (`--ec2-calls-per-second`, default 10) and the executor's round (`--ec2-interval`), not by
//! EC2; against AWS the same run adds EC2's own launch time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;
use strata_tests::fault_proxy::{busiest_window, Fault, FaultProxy, Schedule};
use strata_tests::moto::{Moto, AMI, REGION};

use crate::cluster::{Binaries, Cluster, STRATA_ADMIN_TOKEN};
use crate::writes::round2;

/// The bounds.
const TARGET_LAUNCH_CALLS_PER_INSTANCE: f64 = 2.0;
const CLUSTER: &str = "strata-bench";

/// `strata-bench ec2`.
#[derive(clap::Args)]
pub struct Ec2Args {
    /// Instances to scale out to [default: 50; smoke 10].
    #[arg(long)]
    instances: Option<usize>,
    /// The controllers' `--ec2-calls-per-second`.
    #[arg(long, default_value_t = 10.0)]
    calls_per_second: f64,
    /// The controllers' `--ec2-burst`.
    #[arg(long, default_value_t = 10)]
    burst: u32,
    /// Short CI mode.
    #[arg(long)]
    smoke: bool,
    #[command(flatten)]
    binaries: crate::BinaryArgs,
}

#[derive(Serialize)]
pub struct ScaleOutRun {
    pub mode: &'static str,
    pub instances: usize,
    /// From the scale command's answer to every instance recorded Running.
    pub seconds_to_all_running: f64,
    /// RunInstances calls (answered or not) per instance.
    pub launch_calls_per_instance: f64,
    pub run_instances_calls: usize,
    /// Every EC2 call the controllers made, per instance.
    pub api_calls_per_instance: f64,
    pub api_calls: usize,
    pub throttled_calls: usize,
    /// The most calls within one second, against `burst + calls_per_second`.
    pub busiest_second: usize,
    pub rate_bound: f64,
    /// uuids EC2 ran more than once.
    pub duplicates: usize,
    pub calls_by_action: BTreeMap<String, usize>,
}

#[derive(Serialize)]
pub struct Ec2Report {
    pub runs: Vec<ScaleOutRun>,
    pub calls_per_second: f64,
    pub burst: u32,
    pub target: String,
    pub target_met: bool,
    pub smoke: bool,
    pub load_average_at_start: Option<[f64; 3]>,
}

pub async fn run_cli(args: Ec2Args) -> Result<Ec2Report> {
    let smoke = args.smoke;
    let instances = args.instances.unwrap_or(if smoke { 10 } else { 50 });
    anyhow::ensure!(instances > 0, "--instances must be at least 1");
    let binaries = args.binaries.resolve();
    let load_average_at_start = crate::load_average();
    let mut runs = Vec::new();
    for (mode, schedule) in [
        ("clean", Schedule::None),
        ("throttled_10_percent", Schedule::Throttle(10)),
    ] {
        eprintln!("[ec2] {mode}: moto, the proxy and a 3-member cluster");
        let run = scale_out(
            &binaries,
            args.binaries.keep_dir,
            mode,
            schedule,
            instances,
            args.calls_per_second,
            args.burst,
        )
        .await?;
        eprintln!(
            "[ec2] {mode}: {} instances Running after {} s; {} launch calls and {} calls per instance, {} throttled, {} duplicates",
            run.instances,
            run.seconds_to_all_running,
            run.launch_calls_per_instance,
            run.api_calls_per_instance,
            run.throttled_calls,
            run.duplicates
        );
        runs.push(run);
    }
    let target_met = runs.iter().all(|run| {
        run.launch_calls_per_instance <= TARGET_LAUNCH_CALLS_PER_INSTANCE
            && run.duplicates == 0
            && run.busiest_second as f64 <= run.rate_bound
    });
    Ok(Ec2Report {
        runs,
        calls_per_second: args.calls_per_second,
        burst: args.burst,
        target: format!(
            "at most {TARGET_LAUNCH_CALLS_PER_INSTANCE} launch calls per instance, no duplicate, the call rate within the token bucket"
        ),
        target_met,
        smoke,
        load_average_at_start,
    })
}

async fn scale_out(
    binaries: &Binaries,
    keep_dir: bool,
    mode: &'static str,
    schedule: Schedule,
    instances: usize,
    calls_per_second: f64,
    burst: u32,
) -> Result<ScaleOutRun> {
    let moto = Moto::start(&["us-east-1a", "us-east-1b"]).await?;
    let proxy = FaultProxy::start_with(&moto.endpoint, schedule).await?;
    let extra: Vec<String> = [
        "--ec2-endpoint",
        &proxy.endpoint,
        "--aws-region",
        REGION,
        "--cluster-name",
        CLUSTER,
        "--ec2-interval",
        "500ms",
        "--ec2-calls-per-second",
        &calls_per_second.to_string(),
        "--ec2-burst",
        &burst.to_string(),
    ]
    .map(str::to_string)
    .to_vec();
    let mut cluster =
        Cluster::start_with_env(binaries, keep_dir, &extra, &Moto::controller_env()).await?;
    let result = async {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
        let endpoint = cluster.endpoints()[leader].clone();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("build HTTP client")?;
        let tier = json!({
            "name": "bench",
            "provider": "ec2",
            "template": {
                "ami": AMI,
                "instance_type": "t3.micro",
                "port": 8080,
                "subnets": moto.subnet_ids(),
            },
            "scaling": {"min": 0, "max": instances, "desired": 0},
        });
        let answer = http
            .put(format!("{endpoint}/v1/tiers/bench"))
            .bearer_auth(STRATA_ADMIN_TOKEN)
            .json(&tier)
            .send()
            .await?;
        anyhow::ensure!(
            answer.status().is_success(),
            "put tier: {}",
            answer.status()
        );
        let answer = http
            .post(format!("{endpoint}/v1/tiers/bench/scale"))
            .bearer_auth(STRATA_ADMIN_TOKEN)
            .json(&json!({"desired": instances}))
            .send()
            .await?;
        anyhow::ensure!(answer.status().is_success(), "scale: {}", answer.status());
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120 + instances as u64 * 2);
        loop {
            cluster.check_alive()?;
            let answer = http
                .get(format!("{endpoint}/v1/tiers/bench/instances?stale=true"))
                .bearer_auth(STRATA_ADMIN_TOKEN)
                .send()
                .await?;
            let body: serde_json::Value = answer.json().await?;
            let running = body["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i["phase"] == "Running" && i["provider_id"].is_string())
                .count();
            if running >= instances {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{running} of {instances} Running after {:?}",
                    started.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seconds = round2(started.elapsed().as_secs_f64());
        let calls = proxy.calls();
        let mut calls_by_action = BTreeMap::new();
        for call in &calls {
            *calls_by_action.entry(call.action.clone()).or_insert(0) += 1;
        }
        let run_instances_calls = calls_by_action.get("RunInstances").copied().unwrap_or(0);
        let launches = moto.launches_per_uuid(CLUSTER).await?;
        let per = |count: usize| round2(count as f64 / instances as f64);
        anyhow::Ok(ScaleOutRun {
            mode,
            instances,
            seconds_to_all_running: seconds,
            launch_calls_per_instance: per(run_instances_calls),
            run_instances_calls,
            api_calls_per_instance: per(calls.len()),
            api_calls: calls.len(),
            throttled_calls: calls.iter().filter(|c| c.fault == Fault::Throttled).count(),
            // A second holds at most `burst` plus a second's refill; the window is 950 ms,
            // leaving 50 ms for when the proxy saw the calls.
            busiest_second: busiest_window(&calls, Duration::from_millis(950)),
            rate_bound: f64::from(burst) + calls_per_second,
            duplicates: launches.values().filter(|count| **count > 1).count(),
            calls_by_action,
        })
    }
    .await;
    if result.is_err() {
        if let Some(dir) = cluster.data_dir() {
            eprintln!("[ec2] {mode} failed; logs were in {}", dir.display());
        }
    }
    cluster.shutdown().await;
    result
}

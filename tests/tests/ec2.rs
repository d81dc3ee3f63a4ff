//! EC2 tiers against a real EC2 API implementation on loopback (moto): scaling with the
//! right tags and zones, a crash between RunInstances and its record, instances changed
//! behind Strata's back, another cluster's instances, bad input, an unreachable endpoint,
//! rejected credentials, an API that throttles, fails and drops connections
//! (`strata_tests::fault_proxy`), and ELBv2 target groups that follow the pool.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use strata_ec2::{Ec2Instance, Launch, TAG_CLUSTER, TAG_INSTANCE, TAG_TIER};
use strata_tests::fault_proxy::{busiest_window, Fault, FaultProxy};
use strata_tests::moto::{Moto, AMI};
use strata_tests::{
    e2e_enabled, eventually, send, until, Cluster, ClusterOptions, ADMIN_TOKEN, JOIN_TOKEN,
};

const CLUSTER: &str = "strata-test";

fn ec2_tier(name: &str, subnets: &[String]) -> Value {
    json!({
        "name": name,
        "provider": "ec2",
        "template": {
            "ami": AMI,
            "instance_type": "t3.micro",
            "port": 8080,
            "subnets": subnets,
            "tags": {"team": "web"},
        },
        "scaling": {"min": 0, "max": 10},
    })
}

fn options(moto: &Moto, nodes: u64) -> ClusterOptions {
    let mut extra_args = moto.controller_args();
    extra_args.extend(
        [
            "--cluster-name",
            CLUSTER,
            "--ec2-interval",
            "300ms",
            "--ec2-unknown-grace",
            "2s",
            "--ec2-calls-per-second",
            "20",
        ]
        .map(str::to_string),
    );
    ClusterOptions {
        nodes,
        extra_args,
        env: Moto::controller_env(),
        ..ClusterOptions::default()
    }
}

/// Gives controller flag `flag` the value `value`, replacing the one `options` set.
fn set_flag(options: &mut ClusterOptions, flag: &str, value: &str) {
    match options.extra_args.iter().position(|arg| arg == flag) {
        Some(position) => options.extra_args[position + 1] = value.to_string(),
        None => options
            .extra_args
            .extend([flag.to_string(), value.to_string()]),
    }
}

async fn write(
    cluster: &Cluster,
    method: Method,
    path: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let answer = send(
        &cluster.http,
        method,
        &cluster.url(1, path),
        Some(ADMIN_TOKEN),
        Some(body),
    )
    .await?;
    anyhow::ensure!(answer.status < 300, "{path}: {answer:?}");
    Ok(answer.body)
}

async fn get(cluster: &Cluster, path: &str) -> anyhow::Result<Value> {
    let answer = send(
        &cluster.http,
        Method::GET,
        &cluster.url(1, path),
        Some(ADMIN_TOKEN),
        None,
    )
    .await?;
    anyhow::ensure!(answer.status == 200, "{path}: {answer:?}");
    Ok(answer.body)
}

/// The cluster's instances EC2 reports alive (pending or running).
async fn alive(moto: &Moto, cluster: &str) -> Result<Vec<Ec2Instance>, String> {
    let all = moto.ec2.describe_all().await.map_err(|e| e.to_string())?;
    Ok(all
        .into_iter()
        .filter(|instance| !instance.state.is_gone() && instance.tag(TAG_CLUSTER) == Some(cluster))
        .collect())
}

/// Waits until EC2 runs exactly `count` instances of `tier`, the state records each of them
/// Running with its EC2 id, and no uuid is launched twice. Returns the EC2 instances.
async fn converged(
    cluster: &Cluster,
    moto: &Moto,
    tier: &str,
    count: usize,
) -> anyhow::Result<Vec<Ec2Instance>> {
    eventually(
        Duration::from_secs(90),
        &format!("{count} running instances of {tier}"),
        || async {
            let running = alive(moto, CLUSTER).await?;
            let mut uuids = BTreeSet::new();
            for instance in &running {
                let uuid = instance.tag(TAG_INSTANCE).unwrap_or_default().to_string();
                if !uuids.insert(uuid.clone()) {
                    return Err(format!("duplicate launch for {uuid}: {running:?}"));
                }
            }
            let records = get(cluster, &format!("/v1/tiers/{tier}/instances"))
                .await
                .map_err(|e| e.to_string())?;
            let records = records["items"].as_array().cloned().unwrap_or_default();
            let recorded: BTreeMap<String, String> = records
                .iter()
                .filter(|r| r["phase"] == "Running")
                .filter_map(|r| {
                    Some((
                        r["id"].as_str()?.to_string(),
                        r["provider_id"].as_str()?.to_string(),
                    ))
                })
                .collect();
            let live = records
                .iter()
                .filter(|r| {
                    matches!(
                        r["phase"].as_str(),
                        Some("Pending" | "Starting" | "Running" | "Draining" | "Stopping")
                    )
                })
                .count();
            let described: BTreeMap<String, String> = running
                .iter()
                .map(|i| {
                    (
                        i.tag(TAG_INSTANCE).unwrap_or_default().to_string(),
                        i.id.clone(),
                    )
                })
                .collect();
            if running.len() == count && live == count && recorded == described {
                Ok(Some(running))
            } else {
                Err(format!(
                    "EC2 runs {} ({described:?}); state records running {recorded:?}, {live} live",
                    running.len()
                ))
            }
        },
    )
    .await
}

/// A moto server with a subnet in each of `zones`, one controller, and EC2 tier `web` at 0.
async fn web_on_one_controller(zones: &[&str]) -> anyhow::Result<(Moto, Cluster)> {
    let moto = Moto::start(zones).await?;
    let cluster = Cluster::start(options(&moto, 1)).await?;
    write(
        &cluster,
        Method::PUT,
        "/v1/tiers/web",
        &ec2_tier("web", &moto.subnet_ids()),
    )
    .await?;
    Ok((moto, cluster))
}

async fn scale(cluster: &Cluster, tier: &str, desired: u32) -> anyhow::Result<()> {
    write(
        cluster,
        Method::POST,
        &format!("/v1/tiers/{tier}/scale"),
        &json!({"desired": desired}),
    )
    .await?;
    Ok(())
}

fn zones(moto: &Moto, instances: &[Ec2Instance]) -> BTreeMap<String, usize> {
    let mut zones: BTreeMap<String, usize> = moto
        .subnets
        .iter()
        .map(|(_, zone)| (zone.clone(), 0))
        .collect();
    for instance in instances {
        *zones
            .entry(instance.zone.clone().unwrap_or_default())
            .or_default() += 1;
    }
    zones
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_0_5_2_runs_exactly_the_right_tagged_instances_spread_over_zones(
) -> anyhow::Result<()> {
    if !e2e_enabled("ec2 scale") {
        return Ok(());
    }
    let (moto, cluster) = web_on_one_controller(&["us-east-1a", "us-east-1b"]).await?;
    // Desired 0: nothing is launched, and no agent gets anything (there is none to get it).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(alive(&moto, CLUSTER)
        .await
        .map_err(anyhow::Error::msg)?
        .is_empty());

    scale(&cluster, "web", 5).await?;
    let five = converged(&cluster, &moto, "web", 5).await?;
    for instance in &five {
        assert_eq!(instance.tag(TAG_TIER), Some("web"), "{instance:?}");
        assert_eq!(instance.tag("team"), Some("web"), "{instance:?}");
        assert_eq!(instance.image.as_deref(), Some(AMI));
        assert_eq!(instance.instance_type.as_deref(), Some("t3.micro"));
    }
    let spread = zones(&moto, &five);
    assert!(spread.values().all(|n| *n == 2 || *n == 3), "{spread:?}");

    scale(&cluster, "web", 2).await?;
    let two = converged(&cluster, &moto, "web", 2).await?;
    assert_eq!(
        zones(&moto, &two).values().copied().collect::<Vec<_>>(),
        [1, 1]
    );
    // The two kept are two of the five (scale-in terminates, never relaunches).
    let five_ids: BTreeSet<&str> = five.iter().map(|i| i.id.as_str()).collect();
    assert!(two.iter().all(|i| five_ids.contains(i.id.as_str())));

    // Every call is an event on the tier.
    let events = get(&cluster, "/v1/events?object=tier/web").await?;
    let reasons: Vec<&str> = events["items"]
        .as_array()
        .map(|items| items.iter().filter_map(|e| e["reason"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "Ec2InstanceLaunched")
            .count(),
        5,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "Ec2InstanceTerminated")
            .count(),
        3,
        "{reasons:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_run_instances_and_its_record_neither_duplicates_nor_leaks(
) -> anyhow::Result<()> {
    if !e2e_enabled("ec2 crash") {
        return Ok(());
    }
    let moto = Moto::start(&["us-east-1a", "us-east-1b"]).await?;
    let mut options = options(&moto, 1);
    options.env.push((
        "STRATA_FAILPOINT".to_string(),
        "ec2-after-run-instances".to_string(),
    ));
    let mut cluster = Cluster::start(options).await?;
    write(
        &cluster,
        Method::PUT,
        "/v1/tiers/web",
        &ec2_tier("web", &moto.subnet_ids()),
    )
    .await?;
    scale(&cluster, "web", 1).await?;
    // The controller aborts right after its first RunInstances.
    eventually(Duration::from_secs(60), "the failpoint fired", || {
        let running = cluster.running();
        async move { Ok((running.is_empty()).then_some(())).map_err(|()| String::new()) }
    })
    .await?;
    let launched = alive(&moto, CLUSTER).await.map_err(anyhow::Error::msg)?;
    assert_eq!(launched.len(), 1, "{launched:?}");
    let records = cluster.log_tail(1);
    assert!(records.contains("failpoint"), "{records}");

    cluster
        .options_mut()
        .env
        .retain(|(key, _)| key != "STRATA_FAILPOINT");
    cluster.start_node(1)?;
    cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let after = converged(&cluster, &moto, "web", 1).await?;
    assert_eq!(
        after[0].id, launched[0].id,
        "the launched instance is adopted, not replaced"
    );
    // And it stays that way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = converged(&cluster, &moto, "web", 1).await?;
    assert_eq!(later[0].id, launched[0].id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_what_vanished_terminates_unknowns_and_leaves_other_clusters_alone(
) -> anyhow::Result<()> {
    if !e2e_enabled("ec2 drift") {
        return Ok(());
    }
    let moto = Moto::start(&["us-east-1a", "us-east-1b"]).await?;
    let cluster = Cluster::start(options(&moto, 1)).await?;
    let subnets = moto.subnet_ids();
    let foreign = |cluster_tag: &str, token: &str| Launch {
        client_token: token.to_string(),
        image: AMI.to_string(),
        instance_type: "t3.micro".to_string(),
        subnet: subnets.first().cloned(),
        security_groups: Vec::new(),
        key_name: None,
        iam_instance_profile: None,
        user_data: None,
        tags: BTreeMap::from([
            (TAG_CLUSTER.to_string(), cluster_tag.to_string()),
            (TAG_TIER.to_string(), "web".to_string()),
        ]),
    };
    let other = moto
        .ec2
        .run_instance(&foreign("another-cluster", "other-1"))
        .await?;
    let untagged = moto
        .ec2
        .run_instance(&Launch {
            tags: BTreeMap::new(),
            ..foreign("", "plain-1")
        })
        .await?;

    write(
        &cluster,
        Method::PUT,
        "/v1/tiers/web",
        &ec2_tier("web", &subnets),
    )
    .await?;
    scale(&cluster, "web", 2).await?;
    let two = converged(&cluster, &moto, "web", 2).await?;

    // Terminated behind Strata's back: replaced by a new instance.
    let victim = two[0].id.clone();
    moto.ec2.terminate(std::slice::from_ref(&victim)).await?;
    let replaced = eventually(Duration::from_secs(60), "a replacement", || async {
        let now = converged(&cluster, &moto, "web", 2)
            .await
            .map_err(|e| e.to_string())?;
        Ok(now.iter().all(|i| i.id != victim).then_some(now))
    })
    .await?;
    assert_eq!(replaced.len(), 2);

    // Carries this cluster's tag, unknown to the state: terminated once past the grace.
    let stray = moto.ec2.run_instance(&foreign(CLUSTER, "stray-1")).await?;
    eventually(
        Duration::from_secs(60),
        "the unknown instance terminated",
        || async {
            let running = alive(&moto, CLUSTER).await?;
            Ok((!running.iter().any(|i| i.id == stray.id)).then_some(()))
        },
    )
    .await?;
    converged(&cluster, &moto, "web", 2).await?;

    // Another cluster's instance and an untagged one are untouched.
    let all = moto.ec2.describe_all().await?;
    for id in [&other.id, &untagged.id] {
        let instance = all.iter().find(|i| &i.id == id);
        assert!(
            instance.is_some_and(|i| !i.state.is_gone()),
            "{id} must be untouched: {instance:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_throttling_failures_and_lost_answers_the_tier_converges_without_duplicates(
) -> anyhow::Result<()> {
    if !e2e_enabled("ec2 faults") {
        return Ok(());
    }
    let moto = Moto::start(&["us-east-1a", "us-east-1b"]).await?;
    let proxy = FaultProxy::start(&moto.endpoint).await?;
    let mut options = options(&moto, 1);
    // The controllers talk to EC2 through the proxy; the test's own client goes to moto.
    set_flag(&mut options, "--ec2-endpoint", &proxy.endpoint);
    let cluster = Cluster::start(options).await?;
    // Behind a target group, so RegisterTargets and DeregisterTargets meet the faults too.
    let arn = moto.target_group("web", 8080).await?;
    let mut tier = ec2_tier("web", &moto.subnet_ids());
    tier["load_balancer"] = json!({"target_group_arn": arn});
    write(&cluster, Method::PUT, "/v1/tiers/web", &tier).await?;
    scale(&cluster, "web", 5).await?;
    // `converged` fails on a uuid launched twice and needs EC2 and the state to agree exactly.
    let five = converged(&cluster, &moto, "web", 5).await?;
    group_follows_pool(&cluster, &moto, &arn, 5).await?;
    scale(&cluster, "web", 2).await?;
    let two = converged(&cluster, &moto, "web", 2).await?;
    group_follows_pool(&cluster, &moto, &arn, 2).await?;
    let kept: BTreeSet<&str> = two.iter().map(|i| i.id.as_str()).collect();
    assert!(
        kept.iter().all(|id| five.iter().any(|i| i.id == *id)),
        "scale-in kept instances of the five: {two:?}"
    );
    let calls = proxy.calls();
    let faults = |fault: Fault, action: Option<&str>| {
        calls
            .iter()
            .filter(|c| c.fault == fault && action.is_none_or(|a| c.action == a))
            .count()
    };
    // The faults did happen: a launch whose answer was lost, throttling, 503s, drops.
    assert!(
        faults(Fault::DroppedAfter, Some("RunInstances")) >= 1,
        "{calls:?}"
    );
    assert!(faults(Fault::Throttled, None) >= 1, "{calls:?}");
    assert!(faults(Fault::Unavailable, None) >= 1, "{calls:?}");
    // The token bucket (--ec2-calls-per-second 20, burst 10) held: in any second, at most
    // 10 + 20 calls, with 50 ms of slack for when the proxy saw them.
    let busiest = busiest_window(&calls, Duration::from_millis(950));
    assert!(
        busiest <= 30,
        "{busiest} calls within one second; {} calls in all",
        calls.len()
    );
    // Nothing leaks afterwards either: the two stay the only ones.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = converged(&cluster, &moto, "web", 2).await?;
    assert_eq!(
        later.iter().map(|i| i.id.as_str()).collect::<BTreeSet<_>>(),
        kept
    );
    println!(
        "{} EC2 calls through the proxy, {} faulted, busiest second {busiest}",
        calls.len(),
        calls.iter().filter(|c| c.fault != Fault::None).count()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_failover_in_the_middle_of_a_scale_out_neither_duplicates_nor_loses(
) -> anyhow::Result<()> {
    if !e2e_enabled("ec2 failover") {
        return Ok(());
    }
    let moto = Moto::start(&["us-east-1a", "us-east-1b"]).await?;
    let mut options = options(&moto, 3);
    // A slow call rate stretches the scale-out over seconds, so the kill lands inside it.
    set_flag(&mut options, "--ec2-calls-per-second", "3");
    set_flag(&mut options, "--ec2-burst", "1");
    let mut cluster = Cluster::start(options).await?;
    write(
        &cluster,
        Method::PUT,
        "/v1/tiers/web",
        &ec2_tier("web", &moto.subnet_ids()),
    )
    .await?;
    scale(&cluster, "web", 8).await?;
    // Some launched, not all: then the leader dies.
    let launched = eventually(Duration::from_secs(60), "a scale-out under way", || async {
        let running = alive(&moto, CLUSTER).await?;
        match running.len() {
            0 | 1 => Err(format!("{} launched", running.len())),
            n if n < 8 => Ok(Some(n)),
            n => Err(format!("{n} launched: too late to cut in")),
        }
    })
    .await?;
    let old = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    cluster.kill(old);
    let new = cluster
        .wait_for_leader_other_than(Some(old), Duration::from_secs(30))
        .await;
    // The old leader comes back as a follower (it may have launched more meanwhile).
    cluster.start_node(old)?;
    let new = new?;
    cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let eight = converged(&cluster, &moto, "web", 8).await?;
    // Nothing was launched twice, not even briefly: over every instance EC2 ever ran for
    // the cluster (terminated ones included), each uuid appears once.
    let uuids = moto.launches_per_uuid(CLUSTER).await?;
    assert!(
        uuids.values().all(|count| *count == 1) && uuids.len() == 8,
        "launches per uuid: {uuids:?}"
    );
    println!(
        "leader {old} killed with {launched} of 8 launched; leader {new} finished: {:?}",
        eight.iter().map(|i| i.id.as_str()).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ami_change_rolls_every_instance_without_dropping_below_the_desired_count(
) -> anyhow::Result<()> {
    if !e2e_enabled("ec2 roll") {
        return Ok(());
    }
    /// Another AMI that moto ships in us-east-1.
    const NEW_AMI: &str = "ami-03cf127a";
    let moto = Moto::start(&["us-east-1a", "us-east-1b"]).await?;
    let cluster = Cluster::start(options(&moto, 1)).await?;
    let mut tier = ec2_tier("web", &moto.subnet_ids());
    write(&cluster, Method::PUT, "/v1/tiers/web", &tier).await?;
    scale(&cluster, "web", 3).await?;
    let before = converged(&cluster, &moto, "web", 3).await?;
    // The default rollout: max_surge 1, max_unavailable 0.
    tier["template"]["ami"] = json!(NEW_AMI);
    tier["scaling"]["desired"] = json!(3);
    write(&cluster, Method::PUT, "/v1/tiers/web", &tier).await?;
    let started = std::time::Instant::now();
    let mut fewest = usize::MAX;
    let mut most = 0;
    loop {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the roll did not finish"
        );
        let records = get(&cluster, "/v1/tiers/web/instances").await?;
        let records = records["items"].as_array().cloned().unwrap_or_default();
        let running = records.iter().filter(|r| r["phase"] == "Running").count();
        fewest = fewest.min(running);
        let alive = alive(&moto, CLUSTER).await.map_err(anyhow::Error::msg)?;
        most = most.max(alive.len());
        assert!(
            running >= 3,
            "{running} instances Running during the roll: {records:?}"
        );
        let rolled = alive.len() == 3 && alive.iter().all(|i| i.image.as_deref() == Some(NEW_AMI));
        if rolled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = converged(&cluster, &moto, "web", 3).await?;
    let old: BTreeSet<&str> = before.iter().map(|i| i.id.as_str()).collect();
    assert!(
        after
            .iter()
            .all(|i| !old.contains(i.id.as_str()) && i.image.as_deref() == Some(NEW_AMI)),
        "every instance replaced: {after:?}"
    );
    // New ones first: EC2 never ran more than desired + max_surge.
    assert!(most <= 4, "{most} instances at once");
    println!("rolled 3 instances; fewest Running {fewest}, most alive {most}");
    Ok(())
}

/// The EC2 ids of the tier's pool servers in state `ready` (`GET /v1/tiers/{tier}/pool`,
/// mapped through the instance records), sorted.
async fn ready_pool(cluster: &Cluster, tier: &str) -> anyhow::Result<Vec<String>> {
    let pool = get(cluster, &format!("/v1/tiers/{tier}/pool")).await?;
    let records = get(cluster, &format!("/v1/tiers/{tier}/instances")).await?;
    let ec2_of: BTreeMap<&str, &str> = records["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["id"].as_str()?, r["provider_id"].as_str()?)))
        .collect();
    let mut ready: Vec<String> = pool["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|server| server["state"] == "ready")
        .filter_map(|server| {
            let id = server["instance_id"].as_str()?;
            ec2_of.get(id).map(|ec2| ec2.to_string())
        })
        .collect();
    ready.sort();
    Ok(ready)
}

/// Waits until the target group `arn` holds exactly the tier's ready pool, which holds
/// `count` instances, each one EC2 runs. Returns the registered ids.
async fn group_follows_pool(
    cluster: &Cluster,
    moto: &Moto,
    arn: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    eventually(
        Duration::from_secs(90),
        &format!("target group = pool of {count}"),
        || async {
            let pool = ready_pool(cluster, "web")
                .await
                .map_err(|e| e.to_string())?;
            let group = moto
                .registered_targets(arn)
                .await
                .map_err(|e| e.to_string())?;
            let running: BTreeSet<String> = alive(moto, CLUSTER)
                .await?
                .into_iter()
                .filter(|i| i.state == strata_ec2::Ec2State::Running)
                .map(|i| i.id)
                .collect();
            if pool.len() == count && group == pool && group.iter().all(|id| running.contains(id)) {
                Ok(Some(group))
            } else {
                Err(format!(
                    "pool {pool:?}, group {group:?}, running {running:?}"
                ))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_group_membership_follows_the_pool_through_scaling_and_a_roll() -> anyhow::Result<()>
{
    if !e2e_enabled("ec2 target group") {
        return Ok(());
    }
    const NEW_AMI: &str = "ami-03cf127a";
    let moto = Moto::start(&["us-east-1a", "us-east-1b"]).await?;
    let arn = moto.target_group("web", 8080).await?;
    let cluster = Cluster::start(options(&moto, 1)).await?;

    // A group that does not exist: a condition and an event on the tier, no crash.
    let missing = arn.replace("targetgroup/web/", "targetgroup/gone/");
    let mut tier = ec2_tier("web", &moto.subnet_ids());
    tier["load_balancer"] = json!({"target_group_arn": missing, "drain_timeout": "20s"});
    write(&cluster, Method::PUT, "/v1/tiers/web", &tier).await?;
    let condition = eventually(
        Duration::from_secs(60),
        "a ProviderReady=false condition naming DescribeTargetHealth",
        || async {
            let tier = get(&cluster, "/v1/tiers/web")
                .await
                .map_err(|e| e.to_string())?;
            Ok(tier["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| {
                    c["type"] == "ProviderReady"
                        && c["status"] == false
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("DescribeTargetHealth"))
                })
                .cloned())
        },
    )
    .await?;
    println!("missing group: {condition}");

    tier["load_balancer"]["target_group_arn"] = json!(arn);
    write(&cluster, Method::PUT, "/v1/tiers/web", &tier).await?;
    // A target nobody asked for: the group belongs to the tier, so it goes.
    let stray = moto
        .ec2
        .run_instance(&Launch {
            client_token: "stray".to_string(),
            image: AMI.to_string(),
            instance_type: "t3.micro".to_string(),
            subnet: Some(moto.subnets[0].0.clone()),
            security_groups: Vec::new(),
            key_name: None,
            iam_instance_profile: None,
            user_data: None,
            tags: BTreeMap::new(),
        })
        .await?;
    moto.ec2
        .register_targets(&arn, &[(stray.id.clone(), 8080)])
        .await?;

    scale(&cluster, "web", 3).await?;
    let three = group_follows_pool(&cluster, &moto, &arn, 3).await?;
    assert!(!three.contains(&stray.id));
    scale(&cluster, "web", 1).await?;
    let one = group_follows_pool(&cluster, &moto, &arn, 1).await?;
    converged(&cluster, &moto, "web", 1).await?;

    // A roll: new instances join the group before the old one leaves it; the group is never
    // empty while the tier has a ready instance.
    tier["template"]["ami"] = json!(NEW_AMI);
    tier["scaling"]["desired"] = json!(1);
    write(&cluster, Method::PUT, "/v1/tiers/web", &tier).await?;
    let started = std::time::Instant::now();
    loop {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the roll did not finish"
        );
        let group = moto.registered_targets(&arn).await?;
        assert!(!group.is_empty(), "the group emptied during the roll");
        let alive = alive(&moto, CLUSTER).await.map_err(anyhow::Error::msg)?;
        if alive.len() == 1 && alive[0].image.as_deref() == Some(NEW_AMI) && group != one {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rolled = group_follows_pool(&cluster, &moto, &arn, 1).await?;
    assert_ne!(rolled, one);

    // Every terminated instance left the group before TerminateInstances.
    let events = get(&cluster, "/v1/events?object=tier/web").await?;
    let items = events["items"].as_array().cloned().unwrap_or_default();
    let mut deregistered = BTreeSet::new();
    for event in &items {
        let message = event["message"].as_str().unwrap_or_default();
        match event["reason"].as_str() {
            Some("Ec2TargetsDeregistered") => {
                for word in message.split([' ', ',']) {
                    if let Some((id, _)) = word.split_once(':') {
                        deregistered.insert(id.to_string());
                    }
                }
            }
            Some("Ec2InstanceTerminated") => {
                let id = message
                    .strip_prefix("TerminateInstances ")
                    .and_then(|rest| rest.split(':').next())
                    .unwrap_or_default();
                assert!(
                    deregistered.contains(id),
                    "{id} terminated before it was deregistered: {events}"
                );
            }
            _ => {}
        }
    }
    assert!(deregistered.contains(&stray.id), "{events}");
    println!("group 3 {three:?} -> 1 {one:?} -> rolled {rolled:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ec2_tiers_are_rejected_with_their_field_paths() -> anyhow::Result<()> {
    if !e2e_enabled("ec2 bad input") {
        return Ok(());
    }
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await?;
    let subnets = vec!["subnet-1".to_string()];
    type Change = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        (
            "no AMI",
            Box::new(|t| {
                t["template"].as_object_mut().map(|o| o.remove("ami"));
            }),
            "template.ami",
        ),
        (
            "empty subnet list",
            Box::new(|t| t["template"]["subnets"] = json!([])),
            "template.subnets",
        ),
        (
            "a driver",
            Box::new(|t| t["template"]["driver"] = json!("process")),
            "template.driver",
        ),
        (
            "instance type not family.size",
            Box::new(|t| t["template"]["instance_type"] = json!("large")),
            "template.instance_type",
        ),
        (
            "a target group ARN of the wrong shape",
            Box::new(|t| {
                t["load_balancer"] =
                    json!({"target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:1:web"})
            }),
            "load_balancer.target_group_arn",
        ),
        (
            "a target group and an HAProxy listen address",
            Box::new(|t| {
                t["load_balancer"] = json!({
                    "target_group_arn": "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067",
                    "listen": "127.0.0.1:9000",
                })
            }),
            "load_balancer.target_group_arn",
        ),
    ];
    for (what, change, path) in cases {
        let mut tier = ec2_tier("web", &subnets);
        change(&mut tier);
        let answer = send(
            &cluster.http,
            Method::PUT,
            &cluster.url(1, "/v1/tiers/web"),
            Some(ADMIN_TOKEN),
            Some(&tier),
        )
        .await?;
        assert_eq!(answer.status, 422, "{what}: {answer:?}");
        assert!(
            answer.content_type.starts_with("application/problem+json"),
            "{what}: {answer:?}"
        );
        let paths: Vec<&str> = answer.body["errors"]
            .as_array()
            .map(|errors| errors.iter().filter_map(|e| e["path"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(paths, [path], "{what}: {answer:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_a_condition_and_an_event_not_a_crash() -> anyhow::Result<()> {
    if !e2e_enabled("ec2 unreachable") {
        return Ok(());
    }
    // Nothing listens on this port.
    let endpoint = format!("http://127.0.0.1:{}", strata_tests::free_port());
    failure_is_a_condition_and_one_event(&endpoint, "DescribeInstances").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_are_a_condition_and_an_event_not_a_crash() -> anyhow::Result<()> {
    if !e2e_enabled("ec2 rejected credentials") {
        return Ok(());
    }
    let moto = Moto::start_rejecting_credentials().await?;
    failure_is_a_condition_and_one_event(&moto.endpoint, "AuthFailure").await
}

/// A controller whose EC2 calls to `endpoint` fail shows it on the EC2 tier as
/// `ProviderReady=false` whose message contains `expected`, records it as one event (not one
/// per pass), and keeps serving.
async fn failure_is_a_condition_and_one_event(
    endpoint: &str,
    expected: &str,
) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        extra_args: ["--ec2-endpoint", endpoint, "--ec2-interval", "300ms"]
            .map(str::to_string)
            .to_vec(),
        env: Moto::controller_env(),
        ..ClusterOptions::default()
    })
    .await?;
    write(
        &cluster,
        Method::PUT,
        "/v1/tiers/web",
        &ec2_tier("web", &["subnet-1".to_string()]),
    )
    .await?;
    scale(&cluster, "web", 2).await?;
    let condition = eventually(
        Duration::from_secs(60),
        "a ProviderReady=false condition",
        || async {
            let tier = get(&cluster, "/v1/tiers/web")
                .await
                .map_err(|e| e.to_string())?;
            let conditions = tier["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok(conditions
                .into_iter()
                .find(|c| c["type"] == "ProviderReady" && c["status"] == false))
        },
    )
    .await?;
    assert!(
        condition["message"]
            .as_str()
            .is_some_and(|m| m.contains(expected)),
        "{condition}"
    );
    // Recorded once, not once per pass, and the controller keeps serving.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = get(&cluster, "/v1/events?object=tier/web").await?;
    let failures = events["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|e| e["reason"] == "Ec2CallFailed")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(failures, 1, "{events}");
    assert_eq!(cluster.running(), vec![1]);
    println!("{condition}");
    Ok(())
}

/// The `--join-token` value of a default user data script.
fn token_in(script: &str) -> anyhow::Result<String> {
    let (_, rest) = script
        .split_once("--join-token '")
        .ok_or_else(|| anyhow::anyhow!("no --join-token in {script}"))?;
    Ok(rest.split('\'').next().unwrap_or_default().to_string())
}

async fn register_with(cluster: &Cluster, token: &str, node: &str) -> anyhow::Result<u16> {
    let answer = send(
        &cluster.http,
        Method::POST,
        &cluster.url(1, "/v1/agents/register"),
        Some(token),
        Some(&json!({
            "node_id": node,
            "address": "127.0.0.1",
            "capacity": {"cpu": 1.0, "memory_mb": 512},
            "agent_version": "test",
        })),
    )
    .await?;
    Ok(answer.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_boots_its_agent_from_user_data_that_holds_no_shared_secret(
) -> anyhow::Result<()> {
    if !e2e_enabled("ec2 user data") {
        return Ok(());
    }
    let (moto, cluster) = web_on_one_controller(&["us-east-1a"]).await?;
    scale(&cluster, "web", 2).await?;
    let two = converged(&cluster, &moto, "web", 2).await?;
    let mut scripts = Vec::new();
    for instance in &two {
        let script = moto
            .ec2
            .user_data(&instance.id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{} has no user data", instance.id))?;
        let uuid = instance.tag(TAG_INSTANCE).unwrap_or_default().to_string();
        // What any process on the instance can read from the metadata service: no join
        // token, only this instance's bootstrap token.
        assert!(!script.contains(JOIN_TOKEN), "{script}");
        let token = token_in(&script)?;
        assert!(
            token.starts_with(&format!("strata-boot.{uuid}.")),
            "{token}"
        );
        scripts.push((uuid, token, script));
    }
    let (uuid, token, script) = scripts.remove(0);

    // It registers no other node, and opens nothing else.
    assert_eq!(register_with(&cluster, &token, "host-x").await?, 403);
    assert_eq!(
        register_with(&cluster, &token, &scripts[0].0).await?,
        403,
        "another instance's node"
    );
    for (method, path, body) in [
        (Method::GET, "/v1/tiers", None),
        (
            Method::POST,
            "/v1/tiers/web/scale",
            Some(json!({"desired": 9})),
        ),
        (
            Method::POST,
            "/v1/agents/heartbeat",
            Some(json!({"node_id": uuid, "instances": []})),
        ),
    ] {
        let answer = send(
            &cluster.http,
            method,
            &cluster.url(1, path),
            Some(&token),
            body.as_ref(),
        )
        .await?;
        assert_eq!(answer.status, 403, "{path}: {answer:?}");
    }

    // The instance boots: its user data runs the agent (here the built binary, with the
    // test's directory for its state), which registers and heartbeats as the instance's node.
    let dir = tempfile::tempdir()?;
    let booted = script
        .replace(
            "/usr/local/bin/strata-agent",
            &strata_tests::binary("strata-agent").display().to_string(),
        )
        .replace(
            "/var/lib/strata-agent",
            &dir.path().join("agent").display().to_string(),
        );
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let agent = strata_tests::ProcessGuard::spawn(
        std::process::Command::new("sh")
            .args(["-c", &booted])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    let cluster_ref = &cluster;
    let node_path = format!("/v1/nodes/{uuid}");
    let node_path = node_path.as_str();
    eventually(
        Duration::from_secs(30),
        "the instance's node registered and Ready",
        || async move {
            let node = get(cluster_ref, node_path)
                .await
                .map_err(|e| e.to_string())?;
            until(node["status"] == "Ready", (), || node.to_string())
        },
    )
    .await?;
    let node = get(&cluster, node_path).await?;
    assert_eq!(node["ec2_instance"], uuid.as_str(), "{node}");
    // Spent: the node holds a credential now, so the token cannot claim it again.
    assert_eq!(register_with(&cluster, &token, &uuid).await?, 403);

    // An instance that is gone takes its token's use with it, and its node: EC2 terminates
    // the instances (the agent with them), and the node, NotReady, is removed.
    let (other_uuid, other_token, _) = scripts.remove(0);
    scale(&cluster, "web", 0).await?;
    converged(&cluster, &moto, "web", 0).await?;
    drop(agent);
    assert_eq!(
        register_with(&cluster, &other_token, &other_uuid).await?,
        403
    );
    eventually(
        Duration::from_secs(30),
        "the gone instance's node removed",
        || async move {
            let answer = send(
                &cluster_ref.http,
                Method::GET,
                &cluster_ref.url(1, node_path),
                Some(ADMIN_TOKEN),
                None,
            )
            .await
            .map_err(|e| e.to_string())?;
            until(answer.status == 404, (), || format!("{answer:?}"))
        },
    )
    .await?;
    let events = get(&cluster, &format!("/v1/events?object=node/{uuid}")).await?;
    assert!(
        events["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|e| e["reason"] == "NodeRemoved")),
        "{events}"
    );
    Ok(())
}

//! The EC2 executor: on the leader, converges EC2 to the instance records.
//!
//! Each pass (every `--ec2-interval`, while this node leads and the state has EC2 tiers or
//! instances): DescribeInstances filtered by the `strata:cluster` tag, DescribeInstanceStatus
//! of the running ones and DescribeTargetHealth of every target group a tier names, into the
//! leader's memory (`Ec2Observed`); then the pure `reconcile::ec2::plan_sync` decides the Raft
//! commands (observations: EC2 id, address, phase, health, ended drains) and the calls
//! (launch, terminate, register, deregister), the commands are proposed, the calls made one by
//! one through `strata_ec2::Ec2` (full-jitter retries, token bucket), and each call's outcome
//! is an event on its tier. What a call changed enters the memory at once (a launched
//! instance, a registered or draining target), so the same pass records it and the next one
//! does not repeat it.
//!
//! Invariants:
//! - A new leader observes before it acts: no call before a successful DescribeInstances of
//!   its own term, and not before it has applied every entry that was in its log when it took
//!   over (records of the previous leader's launches are then in its state).
//! - An instance is launched only for a record that exists in the committed state (Raft
//!   first), with the record's uuid as client token and `strata:instance` tag, after a describe
//!   of this pass found no instance with that tag.
//! - Failpoint `STRATA_FAILPOINT=ec2-after-run-instances`: the process aborts right after a
//!   successful RunInstances, before anything records it (the tests' crash window).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use strata_api::{Provider, Tier};
use strata_ec2::{
    Ec2, Ec2Error, Ec2State, Launch, Target, TargetState, TAG_CLUSTER, TAG_INSTANCE, TAG_TIER,
};
use tokio_util::sync::CancellationToken;

use crate::node::{Controller, LocalWriteError};
use crate::reconcile::ec2::{
    plan_sync, Ec2Call, Ec2Observed, SyncConfig, EC2_CALL_FAILED, EC2_DEREGISTERED, EC2_LAUNCHED,
    EC2_REGISTERED, EC2_TERMINATED,
};
use crate::state::{Command, State};

/// The failpoint's name in `STRATA_FAILPOINT`.
pub const FAILPOINT_AFTER_RUN_INSTANCES: &str = "ec2-after-run-instances";

/// How the executor runs.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    pub cluster: String,
    pub interval: Duration,
    pub sync: SyncConfig,
    /// The join token and controller addresses for the default user data.
    pub join_token: String,
    pub controllers: Vec<String>,
}

/// Runs the executor until `shutdown`.
pub async fn run(
    controller: Arc<Controller>,
    ec2: Ec2,
    config: ExecutorConfig,
    shutdown: CancellationToken,
) {
    let failpoint = std::env::var("STRATA_FAILPOINT").ok();
    let mut term = 0;
    // The last log index when this node took over; nothing is done before it is applied.
    let mut caught_up_at = u64::MAX;
    let mut observed = Ec2Observed::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
        let metrics = controller.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            if term != 0 {
                tracing::info!(term, "no longer leader; dropping EC2 memory");
            }
            term = 0;
            observed = Ec2Observed::default();
            continue;
        }
        if metrics.current_term != term {
            term = metrics.current_term;
            caught_up_at = metrics.last_log_index.unwrap_or(0);
            observed = Ec2Observed::default();
            tracing::info!(term, "became leader; observing EC2 before acting");
        }
        let applied = metrics.last_applied.map_or(0, |log| log.index);
        if applied < caught_up_at {
            continue;
        }
        let in_use = controller.state.read(|machine| uses_ec2(&machine.state));
        if !in_use {
            continue;
        }
        match ec2.describe_cluster(&config.cluster).await {
            Ok(instances) => {
                observed.instances = instances;
                observed.synced = true;
                observed.error = None;
            }
            Err(error) => {
                tracing::warn!(%error, "DescribeInstances failed; acting on nothing this pass");
                observed.synced = false;
                observed.error = Some(error.to_string());
            }
        }
        if observed.synced {
            observe_health(&controller, &ec2, &mut observed).await;
        }
        if !pass(
            &controller,
            &ec2,
            &config,
            &mut observed,
            failpoint.as_deref(),
        )
        .await
        {
            continue;
        }
    }
}

/// One pass over the memory; returns false when leadership was lost.
async fn pass(
    controller: &Controller,
    ec2: &Ec2,
    config: &ExecutorConfig,
    observed: &mut Ec2Observed,
    failpoint: Option<&str>,
) -> bool {
    let now = now_ms();
    let plan = controller
        .state
        .read(|machine| plan_sync(&machine.state, observed, &config.sync, now));
    if !propose_all(controller, plan.commands).await {
        return false;
    }
    if plan.calls.is_empty() {
        return true;
    }
    for call in plan.calls {
        let (tier, event) = match &call {
            Ec2Call::Launch {
                instance,
                tier,
                subnet,
            } => {
                let spec = controller
                    .state
                    .read(|machine| machine.state.tiers.get(tier).cloned());
                let Some(spec) = spec else { continue };
                let launch = launch_of(config, &spec, *instance, subnet.clone());
                match ec2.run_instance(&launch).await {
                    Ok(launched) => {
                        if failpoint == Some(FAILPOINT_AFTER_RUN_INSTANCES) {
                            tracing::error!(
                                ec2 = %launched.id,
                                "failpoint {FAILPOINT_AFTER_RUN_INSTANCES}: aborting before the launch is recorded"
                            );
                            std::process::abort();
                        }
                        let message = format!(
                            "RunInstances launched {} for instance {instance} in {} ({})",
                            launched.id,
                            launched.subnet.as_deref().unwrap_or("the default subnet"),
                            launched.zone.as_deref().unwrap_or("no zone"),
                        );
                        observed.instances.push(launched);
                        (tier.clone(), (EC2_LAUNCHED, message))
                    }
                    Err(error) => (tier.clone(), failure("RunInstances", instance, &error)),
                }
            }
            Ec2Call::Register { tier, arn, targets } => {
                let event = match ec2.register_targets(arn, targets).await {
                    Ok(()) => {
                        if let Some(Ok(listed)) = observed.target_groups.get_mut(arn) {
                            listed.retain(|target| !targets.iter().any(|(id, _)| *id == target.id));
                            listed.extend(targets.iter().map(|(id, port)| Target {
                                id: id.clone(),
                                port: Some(*port),
                                state: TargetState::Initial,
                            }));
                        }
                        (
                            EC2_REGISTERED,
                            format!("RegisterTargets {} on {arn}", target_list(targets)),
                        )
                    }
                    Err(error) => failure("RegisterTargets", &target_list(targets), &error),
                };
                (tier.clone(), event)
            }
            Ec2Call::Deregister { tier, arn, targets } => {
                let event = match ec2.deregister_targets(arn, targets).await {
                    Ok(()) => {
                        if let Some(Ok(listed)) = observed.target_groups.get_mut(arn) {
                            for target in listed.iter_mut() {
                                if targets.iter().any(|(id, _)| *id == target.id) {
                                    target.state = TargetState::Draining;
                                }
                            }
                        }
                        (
                            EC2_DEREGISTERED,
                            format!(
                                "DeregisterTargets {} from {arn}; each drains for the group's deregistration delay",
                                target_list(targets)
                            ),
                        )
                    }
                    Err(error) => failure("DeregisterTargets", &target_list(targets), &error),
                };
                (tier.clone(), event)
            }
            Ec2Call::Terminate { ec2_id, tier, why } => {
                let outcome = ec2.terminate(std::slice::from_ref(ec2_id)).await;
                let event = match outcome {
                    Ok(()) => {
                        for instance in &mut observed.instances {
                            if &instance.id == ec2_id {
                                instance.state = Ec2State::ShuttingDown;
                            }
                        }
                        (
                            EC2_TERMINATED,
                            format!("TerminateInstances {ec2_id}: {why}"),
                        )
                    }
                    Err(error) => failure("TerminateInstances", ec2_id, &error),
                };
                match tier {
                    Some(tier) => (tier.clone(), event),
                    None => {
                        tracing::info!(ec2 = %ec2_id, outcome = %event.1, "terminated an instance of no tier");
                        continue;
                    }
                }
            }
        };
        let (reason, message) = event;
        tracing::info!(tier = %tier, %reason, %message, "EC2 call");
        let command = Command::RecordEvent {
            object: format!("tier/{tier}"),
            reason: reason.to_string(),
            message,
        };
        if !propose_all(controller, vec![command]).await {
            return false;
        }
    }
    // Record what the calls changed (launched instances' ids and addresses) in the same pass.
    let now = now_ms();
    let plan = controller
        .state
        .read(|machine| plan_sync(&machine.state, observed, &config.sync, now));
    propose_all(controller, plan.commands).await
}

/// DescribeInstanceStatus of the running instances (an error keeps the last answer) and
/// DescribeTargetHealth of every group an EC2 tier names (an error is kept, per group, for
/// `plan_sync` to report and to leave that group alone).
async fn observe_health(controller: &Controller, ec2: &Ec2, observed: &mut Ec2Observed) {
    let running: Vec<String> = observed
        .instances
        .iter()
        .filter(|instance| instance.state == Ec2State::Running)
        .map(|instance| instance.id.clone())
        .collect();
    if running.is_empty() {
        observed.status.clear();
    } else {
        match ec2.describe_status(&running).await {
            Ok(checks) => observed.status = checks.into_iter().collect(),
            Err(error) => {
                tracing::warn!(%error, "DescribeInstanceStatus failed; keeping the last answer")
            }
        }
    }
    let arns: std::collections::BTreeSet<String> = controller.state.read(|machine| {
        machine
            .state
            .tiers
            .values()
            .filter(|tier| tier.spec.provider == Provider::Ec2)
            .filter_map(|tier| tier.spec.load_balancer.target_group_arn.clone())
            .collect()
    });
    observed.target_groups.retain(|arn, _| arns.contains(arn));
    for arn in arns {
        let answer = ec2
            .describe_targets(&arn)
            .await
            .map_err(|error| error.to_string());
        if let Err(error) = &answer {
            tracing::warn!(%arn, %error, "DescribeTargetHealth failed");
        }
        observed.target_groups.insert(arn, answer);
    }
}

fn target_list(targets: &[(String, u16)]) -> String {
    targets
        .iter()
        .map(|(id, port)| format!("{id}:{port}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn failure(
    call: &str,
    subject: &dyn std::fmt::Display,
    error: &Ec2Error,
) -> (&'static str, String) {
    (
        EC2_CALL_FAILED,
        format!("{call} for {subject} failed ({}): {error}", error.kind()),
    )
}

/// Proposes commands in order; false when this node no longer leads.
async fn propose_all(controller: &Controller, commands: Vec<Command>) -> bool {
    for command in commands {
        match controller.propose_local(command).await {
            Ok(_) => {}
            Err(LocalWriteError::NotLeader(_)) => return false,
            Err(LocalWriteError::Failed(error)) => {
                tracing::warn!(%error, "EC2 executor could not record an observation");
                return true;
            }
        }
    }
    true
}

/// Whether there is anything for the executor to do.
fn uses_ec2(state: &State) -> bool {
    state
        .tiers
        .values()
        .any(|tier| tier.spec.provider == Provider::Ec2)
        || state
            .instances
            .values()
            .any(|instance| instance.provider == Provider::Ec2 && !instance.phase.is_final())
}

/// RunInstances parameters for one record.
fn launch_of(
    config: &ExecutorConfig,
    tier: &Tier,
    instance: uuid::Uuid,
    subnet: Option<String>,
) -> Launch {
    let template = &tier.spec.template;
    let mut tags: BTreeMap<String, String> = template.tags.clone();
    tags.insert(TAG_CLUSTER.to_string(), config.cluster.clone());
    tags.insert(TAG_TIER.to_string(), tier.name().to_string());
    tags.insert(TAG_INSTANCE.to_string(), instance.to_string());
    Launch {
        client_token: instance.to_string(),
        image: template.ami.clone().unwrap_or_default(),
        instance_type: template.instance_type.clone().unwrap_or_default(),
        subnet,
        security_groups: template.security_groups.clone(),
        key_name: template.key_name.clone(),
        iam_instance_profile: template.iam_instance_profile.clone(),
        user_data: Some(
            template
                .user_data
                .clone()
                .unwrap_or_else(|| default_user_data(config, instance, template.port)),
        ),
        tags,
    }
}

/// The user data an EC2 tier gets unless it names its own: a script that starts
/// `strata-agent` with the join token, so the instance heartbeats like any node once it boots
/// (it expects the agent binary in the AMI at /usr/local/bin/strata-agent).
pub fn default_user_data(
    config: &ExecutorConfig,
    instance: uuid::Uuid,
    port: Option<u16>,
) -> String {
    let controllers = config.controllers.join(",");
    let port = port.map_or(String::new(), |port| format!("# workload port: {port}\n"));
    format!(
        "#!/bin/sh\n\
         # Written by Strata: start the agent so this instance heartbeats as a node.\n\
         {port}\
         exec /usr/local/bin/strata-agent --controllers '{controllers}' \\\n  \
         --join-token '{token}' --node-id '{instance}' --data-dir /var/lib/strata-agent\n",
        token = config.join_token,
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

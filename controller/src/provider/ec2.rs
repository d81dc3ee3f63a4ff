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

use crate::node::{Controller, JoinToken, LocalWriteError};
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
    /// For the default user data: the join token its bootstrap tokens derive from (read at
    /// each launch, so a rotated token reaches the next launch), the controllers' addresses
    /// and how agents reach them.
    pub join_token: JoinToken,
    pub controllers: Vec<String>,
    pub agent_tls: AgentTls,
}

/// How an agent booted from the default user data talks to the controllers.
#[derive(Clone, Debug, Default)]
pub enum AgentTls {
    /// Plain HTTP (`--insecure-http` controllers).
    #[default]
    Plain,
    /// HTTPS, trusting the CAs in `ca_file` (of the controllers' certificates), read at
    /// each launch as the controllers follow it (`None`, or a file that cannot be read: the
    /// AMI supplies them at `/etc/strata/ca.pem`). `mutual`: the controllers want a client
    /// certificate, which the AMI supplies at `/etc/strata/agent.pem` and `agent-key.pem`
    /// (a certificate cannot travel in user data, which the workload can read).
    Https {
        ca_file: Option<std::path::PathBuf>,
        mutual: bool,
    },
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
/// `strata-agent` (expected in the AMI at /usr/local/bin/strata-agent) as the node named after
/// the instance, so the instance heartbeats like any node once it boots. It carries the
/// instance's bootstrap token, never the join token: user data is readable from inside the
/// instance, and the bootstrap token registers this one node, once (`JoinToken::bootstrap_token`).
pub fn default_user_data(
    config: &ExecutorConfig,
    instance: uuid::Uuid,
    port: Option<u16>,
) -> String {
    let port = port.map_or(String::new(), |port| format!("# workload port: {port}\n"));
    let (scheme, ca, flags) = match &config.agent_tls {
        AgentTls::Plain => ("", String::new(), String::new()),
        AgentTls::Https { ca_file, mutual } => {
            let pem = ca_file.as_ref().and_then(|path| {
                std::fs::read_to_string(path)
                    .inspect_err(|error| {
                        tracing::warn!(%error, path = %path.display(), "read the CA for EC2 user data")
                    })
                    .ok()
            });
            let ca = match pem {
                Some(pem) => format!(
                    "mkdir -p /etc/strata\ncat > /etc/strata/ca.pem <<'STRATA_CA'\n{}\nSTRATA_CA\n",
                    pem.trim_end()
                ),
                None => "# /etc/strata/ca.pem: the controllers' CA, from the AMI.\n".to_string(),
            };
            let client = if *mutual {
                " --tls-cert /etc/strata/agent.pem --tls-key /etc/strata/agent-key.pem"
            } else {
                ""
            };
            (
                "https://",
                ca,
                format!(" --ca-cert /etc/strata/ca.pem{client}"),
            )
        }
    };
    let controllers = config
        .controllers
        .iter()
        .map(|address| format!("{scheme}{address}"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "#!/bin/sh\n\
         # Written by Strata: start the agent so this instance heartbeats as a node.\n\
         {port}\
         {ca}\
         exec /usr/local/bin/strata-agent --controllers '{controllers}'{flags} \\\n  \
         --join-token '{token}' --node-id '{instance}' --data-dir /var/lib/strata-agent\n",
        token = config.join_token.bootstrap_token(instance),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(agent_tls: AgentTls) -> ExecutorConfig {
        ExecutorConfig {
            cluster: "prod".to_string(),
            interval: Duration::from_secs(1),
            sync: SyncConfig {
                unknown_grace_ms: 1000,
            },
            join_token: JoinToken::new("the-join-token".to_string()),
            controllers: vec!["10.0.0.1:7000".to_string(), "10.0.0.2:7000".to_string()],
            agent_tls,
        }
    }

    #[test]
    fn default_user_data_carries_the_bootstrap_token_never_the_join_token() {
        let config = config(AgentTls::Plain);
        let instance = uuid::Uuid::from_u128(42);
        let script = default_user_data(&config, instance, Some(8080));
        assert!(!script.contains("the-join-token"), "{script}");
        assert!(
            script.contains(&format!(
                "--join-token '{}'",
                config.join_token.bootstrap_token(instance)
            )),
            "{script}"
        );
        assert!(
            script.contains(&format!("--node-id '{instance}'")),
            "{script}"
        );
        assert!(
            script.contains("--controllers '10.0.0.1:7000,10.0.0.2:7000' \\\n"),
            "{script}"
        );
        // A rotated join token reaches the next launch.
        config.join_token.replace("rotated".to_string());
        let after = default_user_data(&config, instance, Some(8080));
        assert_ne!(after, script);
        assert!(after.contains(&config.join_token.bootstrap_token(instance)));
    }

    #[test]
    fn default_user_data_trusts_the_controllers_ca_over_https() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, pem).unwrap_or_else(|error| panic!("{error}"));
        let instance = uuid::Uuid::from_u128(42);
        let script = default_user_data(
            &config(AgentTls::Https {
                ca_file: Some(ca_file),
                mutual: false,
            }),
            instance,
            None,
        );
        assert!(
            script.contains("cat > /etc/strata/ca.pem <<'STRATA_CA'\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\nSTRATA_CA\n"),
            "{script}"
        );
        assert!(
            script.contains(
                "--controllers 'https://10.0.0.1:7000,https://10.0.0.2:7000' --ca-cert /etc/strata/ca.pem \\\n"
            ),
            "{script}"
        );
        assert!(!script.contains("--tls-cert"), "{script}");
        let mutual = default_user_data(
            &config(AgentTls::Https {
                ca_file: None,
                mutual: true,
            }),
            instance,
            None,
        );
        assert!(!mutual.contains("BEGIN CERTIFICATE"), "{mutual}");
        assert!(
            mutual.contains(
                "--ca-cert /etc/strata/ca.pem --tls-cert /etc/strata/agent.pem --tls-key /etc/strata/agent-key.pem"
            ),
            "{mutual}"
        );
    }
}

//! EC2 tiers: the records planner and the executor's planner. Pure: no IO, no clock.
//!
//! - `plan_tier` (called by `plan` for every tier with `provider: ec2`) decides instance
//!   *records* exactly as for local tiers, Raft first: an instance exists in the state, with its
//!   uuid and its subnet, before any cloud call. It never places anything on an agent node.
//!   Scale-out picks the subnet with the fewest live instances (the subnets' zones stay
//!   balanced); scale-in drains from the fullest subnet, oldest template first, then oldest.
//!   Outdated instances (an older generation: a new AMI or instance type) roll like local ones,
//!   within `max_surge` / `max_unavailable`.
//! - `plan_sync` turns the executor's latest DescribeInstances, DescribeInstanceStatus and
//!   DescribeTargetHealth (leader memory, `Ec2Observed`) into Raft commands (an instance's EC2
//!   id, address, port, phase and health; a lost instance Failed; a terminated one Stopped; a
//!   drain the target group finished ended; provider reachability events) and into the calls
//!   the executor makes: launch records that have no EC2 instance (looked up by id *and* by the
//!   `strata:instance` tag, since moto ignores client tokens), terminate what is stopping,
//!   failed, duplicated or unknown to the state, and make each target group hold exactly its
//!   tiers' ready instances (register the missing, deregister the rest: the group belongs to
//!   the tiers that name it).
//!
//! Guarantees: nothing is launched or terminated before a DescribeInstances of this leadership
//! succeeded (a new leader observes before it acts); an instance without the cluster's tag is
//! never touched (the describe filter only returns tagged ones); an unknown tagged instance is
//! terminated only once it is older than `unknown_grace_ms`, so a record committed but not yet
//! applied on this leader never gets its instance terminated; a target is deregistered before
//! its instance stops (a draining record is ended only once the group no longer lists it, or by
//! its drain timeout in `pools`).

use std::collections::{BTreeMap, HashMap};

use strata_api::{Health, Instance, Phase, Provider, ServerState, Tier};
use strata_ec2::{Ec2Instance, Ec2State, StatusCheck, Target, TAG_INSTANCE, TAG_TIER};
use uuid::Uuid;

use super::{millis, PlanConfig, RoundIndex};
use crate::lifecycle::{step, InstanceEvent};
use crate::state::{Command, InstanceUpdate, NewInstance, State};
use crate::views::pool_state;

/// Event reasons of EC2 calls. The latest of them on a tier decides its `ProviderReady`
/// condition (`views`).
pub const EC2_CALL_FAILED: &str = "Ec2CallFailed";
pub const EC2_REACHABLE: &str = "Ec2Reachable";
pub const EC2_LAUNCHED: &str = "Ec2InstanceLaunched";
pub const EC2_TERMINATED: &str = "Ec2InstanceTerminated";
pub const EC2_ADOPTED: &str = "Ec2InstanceAdopted";
pub const EC2_REGISTERED: &str = "Ec2TargetsRegistered";
pub const EC2_DEREGISTERED: &str = "Ec2TargetsDeregistered";

/// Whether `reason` is one of the EC2 call events above.
pub fn is_provider_event(reason: &str) -> bool {
    matches!(
        reason,
        EC2_CALL_FAILED
            | EC2_REACHABLE
            | EC2_LAUNCHED
            | EC2_TERMINATED
            | EC2_ADOPTED
            | EC2_REGISTERED
            | EC2_DEREGISTERED
    )
}

/// What the EC2 executor saw, in the leader's memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ec2Observed {
    /// Whether the latest DescribeInstances (of this leadership) succeeded. Until one has,
    /// nothing is launched or terminated.
    pub synced: bool,
    /// Why the latest DescribeInstances failed, if it did.
    pub error: Option<String>,
    /// Every instance carrying the cluster tag, as last described (plus what this leader
    /// launched or terminated since).
    pub instances: Vec<Ec2Instance>,
    /// DescribeInstanceStatus of the running ones, by EC2 id (the last answer that came; an
    /// instance absent here has no checks yet).
    pub status: HashMap<String, StatusCheck>,
    /// DescribeTargetHealth of every target group an EC2 tier names, by ARN: its targets, or
    /// why the call failed. A group absent here was not described yet: nothing is registered
    /// or deregistered on it, and no drain on it ends but by its timeout.
    pub target_groups: BTreeMap<String, Result<Vec<Target>, String>>,
}

/// Tunables of the executor's planner.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// A tagged instance the state does not know is terminated once it is this old.
    pub unknown_grace_ms: u64,
}

/// A call the executor makes.
#[derive(Clone, Debug, PartialEq)]
pub enum Ec2Call {
    Launch {
        instance: Uuid,
        tier: String,
        subnet: Option<String>,
    },
    Terminate {
        ec2_id: String,
        /// The tier the instance belongs to (for its event), if known.
        tier: Option<String>,
        why: String,
    },
    /// RegisterTargets: `(EC2 id, port)` pairs onto the group `arn`.
    Register {
        tier: String,
        arn: String,
        targets: Vec<(String, u16)>,
    },
    /// DeregisterTargets: each then drains for the group's deregistration delay.
    Deregister {
        tier: String,
        arn: String,
        targets: Vec<(String, u16)>,
    },
}

/// What one sync round decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncPlan {
    pub commands: Vec<Command>,
    pub calls: Vec<Ec2Call>,
}

/// Records of one EC2 tier: scale to `status.desired`, spread over subnets, roll outdated.
pub(super) fn plan_tier(
    index: &RoundIndex<'_>,
    tier: &Tier,
    config: &PlanConfig,
    now_ms: u64,
    new_id: &mut dyn FnMut() -> Uuid,
) -> Vec<Command> {
    let name = tier.name();
    let desired = tier.status.desired as usize;
    let subnets = &tier.spec.template.subnets;
    let mut live: Vec<&Instance> = index
        .instances_of(name)
        .iter()
        .copied()
        .filter(|instance| instance.phase.is_live())
        .collect();
    live.sort_by_key(|instance| (instance.created_at_ms, instance.id));

    let mut per_subnet: BTreeMap<Option<String>, usize> = BTreeMap::new();
    for subnet in subnets {
        per_subnet.insert(Some(subnet.clone()), 0);
    }
    for instance in &live {
        *per_subnet.entry(instance.subnet.clone()).or_default() += 1;
    }

    let mut drains = Vec::new();
    let mut drain = |instance: &Instance, reason: String| {
        drains.push(InstanceUpdate {
            id: instance.id,
            event: Some(InstanceEvent::Drain),
            reason: Some(reason),
            ..InstanceUpdate::default()
        });
    };
    // Impaired (DescribeInstanceStatus) or its agent silent: replaced, as a local instance
    // that fails its health checks is. It leaves the pool at once (it is not ready).
    live.retain(|instance| {
        let sick = instance.phase == Phase::Running && instance.health == Health::Unhealthy;
        if sick {
            if let Some(count) = per_subnet.get_mut(&instance.subnet) {
                *count = count.saturating_sub(1);
            }
            drain(
                instance,
                format!("unhealthy: {}; replacing it", reason_of(instance)),
            );
        }
        !sick
    });
    let (mut current, outdated): (Vec<&Instance>, Vec<&Instance>) = live
        .iter()
        .copied()
        .partition(|instance| instance.generation >= tier.generation);

    // Scale in: one at a time from the fullest subnet, the oldest there first.
    while current.len() > desired {
        let fullest = current
            .iter()
            .map(|instance| &instance.subnet)
            .max_by_key(|subnet| {
                (
                    per_subnet.get(*subnet).copied().unwrap_or(0),
                    (*subnet).clone(),
                )
            })
            .cloned()
            .flatten();
        let Some(position) = current
            .iter()
            .position(|instance| instance.subnet == fullest)
        else {
            break;
        };
        let instance = current.remove(position);
        if let Some(count) = per_subnet.get_mut(&instance.subnet) {
            *count = count.saturating_sub(1);
        }
        drain(
            instance,
            format!(
                "scaling in to {desired} (from subnet {})",
                instance.subnet.as_deref().unwrap_or("(default)")
            ),
        );
    }

    // Roll: as for local tiers, keep only the outdated instances the ready current ones cannot
    // yet replace.
    let ready_current = current
        .iter()
        .filter(|instance| instance.phase == Phase::Running)
        .count();
    let rollout = tier.spec.rollout;
    let keep_outdated = desired.saturating_sub(ready_current + rollout.max_unavailable as usize);
    let mut drained_outdated = 0;
    for (position, instance) in outdated.iter().enumerate() {
        if position >= keep_outdated {
            if let Some(count) = per_subnet.get_mut(&instance.subnet) {
                *count = count.saturating_sub(1);
            }
            drain(instance, "replaced by the new template".to_string());
            drained_outdated += 1;
        }
    }
    let kept_outdated = outdated.len().min(keep_outdated);
    // Outdated instances on their way out (draining, or stopping until TerminateInstances
    // lands) still run on EC2: they count toward the surge, so a roll never runs more than
    // desired + max_surge instances at once. (Leaving current ones do not: a scale-out does
    // not wait for a scale-in's drains.)
    let leaving_outdated = index
        .instances_of(name)
        .iter()
        .filter(|instance| {
            matches!(instance.phase, Phase::Draining | Phase::Stopping)
                && instance.generation < tier.generation
        })
        .count()
        + drained_outdated;
    let ceiling = desired + rollout.max_surge as usize;
    let mut creates = desired
        .saturating_sub(current.len())
        .min(ceiling.saturating_sub(current.len() + kept_outdated + leaving_outdated));

    let mut commands = Vec::new();
    let recent_failures = index
        .instances_of(name)
        .iter()
        .filter(|instance| {
            instance.phase == Phase::Failed
                && now_ms.saturating_sub(instance.updated_at_ms) < config.failure_window_ms
        })
        .count();
    if creates > 0 && recent_failures >= config.max_failures_in_window {
        creates = 0;
        if index.last_event_reason(name) != Some("BackingOff") {
            commands.push(Command::RecordEvent {
                object: format!("tier/{name}"),
                reason: "BackingOff".to_string(),
                message: format!(
                    "{recent_failures} instances failed within {}; not launching more until they age out",
                    millis(config.failure_window_ms)
                ),
            });
        }
    }

    let mut placed = Vec::new();
    for _ in 0..creates {
        // The least used subnet; ties go to the template's order.
        let subnet = subnets
            .iter()
            .min_by_key(|subnet| {
                per_subnet
                    .get(&Some((*subnet).clone()))
                    .copied()
                    .unwrap_or(0)
            })
            .cloned();
        *per_subnet.entry(subnet.clone()).or_default() += 1;
        placed.push(NewInstance {
            id: new_id(),
            tier: name.to_string(),
            node: String::new(),
            subnet,
        });
    }
    if !drains.is_empty() {
        commands.push(Command::UpdateInstances { updates: drains });
    }
    if !placed.is_empty() {
        let reason = if outdated.is_empty() {
            format!("{} of {desired} desired", current.len() + placed.len())
        } else {
            format!("rolling: {} outdated left", outdated.len())
        };
        commands.push(Command::CreateInstances {
            instances: placed,
            reason,
        });
    }
    commands
}

/// The executor's round: observations to commands, and the calls to make.
pub fn plan_sync(
    state: &State,
    observed: &Ec2Observed,
    config: &SyncConfig,
    now_ms: u64,
) -> SyncPlan {
    let mut plan = SyncPlan::default();
    let ec2_tiers: Vec<&Tier> = state
        .tiers
        .values()
        .filter(|tier| tier.spec.provider == Provider::Ec2)
        .collect();
    let last_provider_event = last_provider_events(state);
    // Reachability, once per change, on every EC2 tier: DescribeInstances, then its group.
    for tier in &ec2_tiers {
        let last = last_provider_event.get(tier.name());
        let group_error = tier
            .spec
            .load_balancer
            .target_group_arn
            .as_ref()
            .and_then(|arn| match observed.target_groups.get(arn) {
                Some(Err(error)) => Some(format!("DescribeTargetHealth of {arn} failed: {error}")),
                _ => None,
            });
        let problem = match &observed.error {
            Some(error) => Some(format!("DescribeInstances failed: {error}")),
            None => group_error,
        };
        match problem {
            Some(message) if last != Some(&(EC2_CALL_FAILED, message.as_str())) => {
                plan.commands.push(Command::RecordEvent {
                    object: format!("tier/{}", tier.name()),
                    reason: EC2_CALL_FAILED.to_string(),
                    message,
                });
            }
            Some(_) => {}
            None if observed.synced
                && last.is_some_and(|(reason, _)| *reason == EC2_CALL_FAILED) =>
            {
                plan.commands.push(Command::RecordEvent {
                    object: format!("tier/{}", tier.name()),
                    reason: EC2_REACHABLE.to_string(),
                    message: "EC2 answers again".to_string(),
                });
            }
            None => {}
        }
    }
    if !observed.synced {
        return plan;
    }

    // EC2 instances by id and by the Strata instance they claim to be (alive ones only for the
    // latter; several alive ones for one uuid are duplicates).
    let by_id: HashMap<&str, &Ec2Instance> = observed
        .instances
        .iter()
        .map(|instance| (instance.id.as_str(), instance))
        .collect();
    let mut by_uuid: HashMap<Uuid, Vec<&Ec2Instance>> = HashMap::new();
    for instance in &observed.instances {
        if instance.state.is_gone() {
            continue;
        }
        if let Some(id) = instance
            .tag(TAG_INSTANCE)
            .and_then(|tag| Uuid::parse_str(tag).ok())
        {
            by_uuid.entry(id).or_default().push(instance);
        }
    }
    for candidates in by_uuid.values_mut() {
        candidates.sort_by_key(|instance| (instance.launch_time_ms, instance.id.clone()));
    }

    let mut updates = Vec::new();
    for record in state.instances.values() {
        if record.provider != Provider::Ec2 {
            continue;
        }
        let alive = by_uuid.get(&record.id).cloned().unwrap_or_default();
        // The one this record stands for: the recorded id, else the oldest alive with its tag.
        let chosen: Option<&Ec2Instance> = match &record.provider_id {
            Some(id) => by_id.get(id.as_str()).copied(),
            None => alive.first().copied(),
        };
        // Every other alive instance claiming this uuid is a duplicate.
        for duplicate in alive
            .iter()
            .filter(|instance| chosen.is_none_or(|chosen| chosen.id != instance.id))
        {
            plan.calls.push(Ec2Call::Terminate {
                ec2_id: duplicate.id.clone(),
                tier: Some(record.tier.clone()),
                why: format!("a duplicate launch for instance {}", record.id),
            });
        }
        let chosen_alive = chosen.filter(|instance| !instance.state.is_gone());
        match record.phase {
            Phase::Pending | Phase::Starting | Phase::Running => match chosen_alive {
                Some(ec2) => {
                    let seen = Seen {
                        ec2,
                        port: state
                            .tiers
                            .get(&record.tier)
                            .and_then(|tier| tier.spec.template.port),
                        check: observed.status.get(&ec2.id).copied(),
                        agent_ready: state
                            .nodes
                            .get(&record.id.to_string())
                            .map(|node| node.ready),
                    };
                    if let Some(update) = observe(record, &seen) {
                        updates.push(update);
                    }
                }
                None if record.provider_id.is_some() => updates.push(InstanceUpdate {
                    id: record.id,
                    event: Some(InstanceEvent::Failed),
                    reason: Some(format!(
                        "EC2 instance {} was terminated outside Strata",
                        record.provider_id.as_deref().unwrap_or_default()
                    )),
                    ..InstanceUpdate::default()
                }),
                None if state.tiers.contains_key(&record.tier) => {
                    plan.calls.push(Ec2Call::Launch {
                        instance: record.id,
                        tier: record.tier.clone(),
                        subnet: record.subnet.clone(),
                    })
                }
                None => {}
            },
            // Still serving while load balancers finish; `pools` ends the drain.
            Phase::Draining => {
                if chosen_alive.is_none() && record.provider_id.is_some() {
                    updates.push(InstanceUpdate {
                        id: record.id,
                        event: Some(InstanceEvent::Stopped),
                        reason: Some("its EC2 instance is gone".to_string()),
                        ..InstanceUpdate::default()
                    });
                }
            }
            Phase::Stopping => match chosen_alive {
                Some(ec2) => plan.calls.push(Ec2Call::Terminate {
                    ec2_id: ec2.id.clone(),
                    tier: Some(record.tier.clone()),
                    why: format!("instance {} stopping: {}", record.id, reason_of(record)),
                }),
                None => updates.push(InstanceUpdate {
                    id: record.id,
                    event: Some(InstanceEvent::Stopped),
                    reason: Some("its EC2 instance is terminated".to_string()),
                    ..InstanceUpdate::default()
                }),
            },
            // A record given up on must not leave a running instance behind.
            Phase::Failed | Phase::Lost | Phase::Terminated => {
                if let Some(ec2) = chosen_alive {
                    plan.calls.push(Ec2Call::Terminate {
                        ec2_id: ec2.id.clone(),
                        tier: Some(record.tier.clone()),
                        why: format!("instance {} is {:?}", record.id, record.phase),
                    });
                }
            }
        }
    }
    target_groups(state, observed, &by_id, &mut updates, &mut plan.calls);
    if !updates.is_empty() {
        plan.commands.push(Command::UpdateInstances { updates });
    }

    // Tagged instances no record claims.
    for instance in &observed.instances {
        if instance.state.is_gone() {
            continue;
        }
        let known = instance
            .tag(TAG_INSTANCE)
            .and_then(|tag| Uuid::parse_str(tag).ok())
            .is_some_and(|id| state.instances.contains_key(&id))
            || state
                .instances
                .values()
                .any(|record| record.provider_id.as_deref() == Some(instance.id.as_str()));
        if known || now_ms.saturating_sub(instance.launch_time_ms) < config.unknown_grace_ms {
            continue;
        }
        plan.calls.push(Ec2Call::Terminate {
            ec2_id: instance.id.clone(),
            tier: instance
                .tag(TAG_TIER)
                .filter(|tier| state.tiers.contains_key(*tier))
                .map(str::to_string),
            why: "it carries this cluster's tag but no instance of the state claims it".to_string(),
        });
    }
    plan
}

/// What the executor knows of a record's EC2 instance.
struct Seen<'a> {
    ec2: &'a Ec2Instance,
    /// The tier's workload port (the pool's and the target group's port).
    port: Option<u16>,
    /// DescribeInstanceStatus, once EC2 has run the checks.
    check: Option<StatusCheck>,
    /// Whether the agent inside (a node named after the instance uuid, as the default user data
    /// starts it) heartbeats; `None` until it registers.
    agent_ready: Option<bool>,
}

/// The update that makes a record say what EC2 says of its instance, if any is needed.
fn observe(record: &Instance, seen: &Seen<'_>) -> Option<InstanceUpdate> {
    let ec2 = seen.ec2;
    let new_id = record.provider_id.is_none();
    let address_changed = ec2.private_ip.is_some() && ec2.private_ip != record.address;
    let port_changed = seen.port.is_some() && seen.port != record.port;
    let event = match ec2.state {
        Ec2State::Running => Some(InstanceEvent::BecameReady),
        Ec2State::Pending => Some(InstanceEvent::Started),
        Ec2State::Stopping | Ec2State::Stopped => Some(InstanceEvent::Failed),
        Ec2State::ShuttingDown | Ec2State::Terminated => None,
    };
    let moves = event.is_some_and(|event| step(record.phase, event) != record.phase);
    // Health: a failed status check, or an agent that registered and went silent, makes it
    // unhealthy (`plan_tier` replaces it); otherwise a running instance is healthy. Checks
    // still initializing (the first minutes on AWS) do not hold it back.
    let sick = if seen.check == Some(StatusCheck::Impaired) {
        Some("EC2 status checks report it impaired")
    } else if seen.agent_ready == Some(false) {
        Some("the agent inside stopped heartbeating")
    } else {
        None
    };
    let health = match (ec2.state, sick) {
        (Ec2State::Running, Some(_)) => Health::Unhealthy,
        (Ec2State::Running, None) => Health::Healthy,
        _ => record.health,
    };
    let health = (health != record.health).then_some(health);
    if !(new_id || address_changed || port_changed || moves || health.is_some()) {
        return None;
    }
    let reason = if new_id {
        format!(
            "EC2 instance {} ({:?}, {})",
            ec2.id,
            ec2.state,
            ec2.zone.as_deref().unwrap_or("no zone")
        )
    } else if let (Some(Health::Unhealthy), Some(why)) = (health, sick) {
        format!("EC2 instance {}: {why}", ec2.id)
    } else {
        format!("EC2 instance {} is {:?}", ec2.id, ec2.state)
    };
    Some(InstanceUpdate {
        id: record.id,
        event: event.filter(|_| moves),
        health,
        provider_id: new_id.then(|| ec2.id.clone()),
        address: ec2.private_ip.clone().filter(|_| address_changed),
        port: seen.port.filter(|_| port_changed),
        reason: Some(reason),
    })
}

/// Target groups: each holds exactly the ready instances of the tiers that name it, on their
/// port. Registers what is missing, deregisters what is not wanted (the records' own as they
/// drain, and any target Strata did not put there), and ends the drain of a record whose target
/// the group no longer lists. A group not described, or whose describe failed, is left alone.
fn target_groups(
    state: &State,
    observed: &Ec2Observed,
    by_id: &HashMap<&str, &Ec2Instance>,
    updates: &mut Vec<InstanceUpdate>,
    calls: &mut Vec<Ec2Call>,
) {
    // Each group's tiers and their records, in one pass over the instances.
    let mut by_arn: BTreeMap<&str, (Vec<&Tier>, Vec<&Instance>)> = BTreeMap::new();
    let mut arn_of: HashMap<&str, &str> = HashMap::new();
    for tier in state.tiers.values() {
        if tier.spec.provider != Provider::Ec2 {
            continue;
        }
        if let Some(arn) = &tier.spec.load_balancer.target_group_arn {
            by_arn.entry(arn.as_str()).or_default().0.push(tier);
            arn_of.insert(tier.name(), arn.as_str());
        }
    }
    for record in state.instances.values() {
        if let Some(arn) = arn_of.get(record.tier.as_str()) {
            by_arn.entry(arn).or_default().1.push(record);
        }
    }
    for (arn, (tiers, records)) in by_arn {
        let Some(Ok(targets)) = observed.target_groups.get(arn) else {
            continue;
        };
        let listed: HashMap<&str, &Target> = targets
            .iter()
            .map(|target| (target.id.as_str(), target))
            .collect();
        // Wanted: (EC2 id, port) of every ready record whose instance EC2 runs.
        let mut wanted: BTreeMap<&str, (u16, &str)> = BTreeMap::new();
        for record in &records {
            if pool_state(record) != Some(ServerState::Ready) {
                continue;
            }
            let Some(port) = state
                .tiers
                .get(&record.tier)
                .and_then(|tier| tier.spec.template.port)
            else {
                continue;
            };
            let Some(ec2_id) = record.provider_id.as_deref() else {
                continue;
            };
            if by_id
                .get(ec2_id)
                .is_some_and(|ec2| ec2.state == Ec2State::Running)
            {
                wanted.insert(ec2_id, (port, record.tier.as_str()));
            }
        }
        // Registrations, one call per tier.
        let mut register: BTreeMap<&str, Vec<(String, u16)>> = BTreeMap::new();
        for (ec2_id, (port, tier)) in &wanted {
            let registered = listed.get(ec2_id).is_some_and(|target| {
                target.state.is_registered() && target.port.is_none_or(|at| at == *port)
            });
            if !registered {
                register
                    .entry(tier)
                    .or_default()
                    .push((ec2_id.to_string(), *port));
            }
        }
        for (tier, targets) in register {
            calls.push(Ec2Call::Register {
                tier: tier.to_string(),
                arn: arn.to_string(),
                targets,
            });
        }
        // Deregistrations: registered targets nobody wants (or on a stale port).
        let owner_of = |ec2_id: &str| -> String {
            records
                .iter()
                .find(|record| record.provider_id.as_deref() == Some(ec2_id))
                .map_or_else(|| tiers[0].name().to_string(), |record| record.tier.clone())
        };
        let mut deregister: BTreeMap<String, Vec<(String, u16)>> = BTreeMap::new();
        for target in targets {
            if !target.state.is_registered() {
                continue;
            }
            let keep = wanted
                .get(target.id.as_str())
                .is_some_and(|(port, _)| target.port.is_none_or(|at| at == *port));
            if keep {
                continue;
            }
            let port = target
                .port
                .unwrap_or_else(|| tiers[0].spec.template.port.unwrap_or_default());
            deregister
                .entry(owner_of(&target.id))
                .or_default()
                .push((target.id.clone(), port));
        }
        for (tier, targets) in deregister {
            calls.push(Ec2Call::Deregister {
                tier,
                arn: arn.to_string(),
                targets,
            });
        }
        // Drains the group has finished: a draining record that served, whose target it no
        // longer lists.
        for record in &records {
            if pool_state(record) != Some(ServerState::Drain) {
                continue;
            }
            let listed = record
                .provider_id
                .as_deref()
                .is_some_and(|ec2_id| listed.contains_key(ec2_id));
            if !listed {
                updates.push(InstanceUpdate {
                    id: record.id,
                    event: Some(InstanceEvent::DrainEnded),
                    reason: Some(format!(
                        "target group {} finished deregistering it",
                        short_arn(arn)
                    )),
                    ..InstanceUpdate::default()
                });
            }
        }
    }
}

/// `targetgroup/NAME/ID` of a target group ARN, for messages.
fn short_arn(arn: &str) -> &str {
    arn.rsplit_once(':').map_or(arn, |(_, resource)| resource)
}

fn reason_of(record: &Instance) -> &str {
    record.reason.as_deref().unwrap_or("no reason recorded")
}

/// The latest EC2 call event per tier: (reason, message).
fn last_provider_events(state: &State) -> HashMap<&str, (&str, &str)> {
    let mut last = HashMap::new();
    for event in &state.events {
        if is_provider_event(&event.reason) {
            if let Some(tier) = event.object.strip_prefix("tier/") {
                last.insert(tier, (event.reason.as_str(), event.message.as_str()));
            }
        }
    }
    last
}

#[cfg(test)]
mod tests;

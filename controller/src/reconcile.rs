//! The leader's planners: pure functions from desired state, observed state and the time to the
//! commands that move one toward the other. No IO, no clock, no randomness (new instance ids
//! come from the caller), so every decision can be unit-tested and replayed.
//!
//! `plan` is level-triggered: it may run for any reason, any number of times, and converges.
//! Each round it:
//! 1. judges node liveness (heartbeats are in the leader's memory, not in Raft): a Ready node
//!    silent for longer than the grace becomes NotReady (its instances Lost); a NotReady node
//!    heard from again becomes Ready. A new leader counts every node as seen when it took over,
//!    so each gets a fresh grace period.
//! 2. turns agent reports into lifecycle transitions (only changes are proposed);
//! 3. plans each tier: replace unhealthy instances, scale in and out to `status.desired`, roll
//!    instances of an old generation or on draining nodes with a surge of one and no loss of
//!    ready capacity, and place new instances on Ready nodes with room, spread across nodes or
//!    zones and honouring node labels; back off creating when instances keep failing;
//! 4. drains instances of deleted tiers and forgets final instances after a while.

use std::collections::{BTreeMap, HashMap, HashSet};

use strata_api::{Health, HostMetrics, Instance, InstanceReport, Phase, Spread, Tier};
use uuid::Uuid;

use crate::lifecycle::{step, InstanceEvent};
use crate::state::{Command, InstanceUpdate, NewInstance, NodeRecord, State};

/// What the leader has heard from one node since it became leader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeObservation {
    pub last_seen_ms: u64,
    pub metrics: HostMetrics,
    /// The instances the agent reported in its latest heartbeat.
    pub reports: Vec<InstanceReport>,
}

/// The leader's in-memory view of the world.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// When this node became leader: no node is judged silent for longer than that.
    pub leader_since_ms: u64,
    pub nodes: &'a HashMap<String, NodeObservation>,
}

/// Tunables of the planners.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    /// How long a node may be silent before it is NotReady.
    pub heartbeat_grace_ms: u64,
    /// How long an instance may stay unreported by a heartbeating agent before it counts as
    /// gone (covers the heartbeat that delivers an assignment and the one that reports it).
    pub report_slack_ms: u64,
    /// A Pending instance its agent never reports within this time has failed to start.
    pub start_timeout_ms: u64,
    /// Final instances are forgotten after this long.
    pub forget_after_ms: u64,
    /// With this many failed instances within `failure_window_ms`, a tier stops creating new
    /// ones until the window passes.
    pub failure_window_ms: u64,
    pub max_failures_in_window: usize,
    /// Extra instances allowed while rolling to a new template or off draining nodes.
    pub max_surge: u32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            heartbeat_grace_ms: 5_000,
            report_slack_ms: 3_000,
            start_timeout_ms: 60_000,
            forget_after_ms: 600_000,
            failure_window_ms: 60_000,
            max_failures_in_window: 3,
            max_surge: 1,
        }
    }
}

/// Plans one round. `new_id` supplies ids for new instances.
pub fn plan(
    state: &State,
    observed: &Observed<'_>,
    config: &PlanConfig,
    now_ms: u64,
    new_id: &mut dyn FnMut() -> Uuid,
) -> Vec<Command> {
    // Every planner reads the same state; commands apply in this order. A planner that would
    // act on something another one changes this round (an instance on a node going NotReady,
    // say) sees the change next round: level-triggered, so that only delays, never doubles.
    let mut commands = plan_nodes(state, observed, config, now_ms);
    let updates = plan_reports(state, observed, config);
    if !updates.is_empty() {
        commands.push(Command::UpdateInstances { updates });
    }
    let mut reservations = Reservations::of(state);
    for tier in state.tiers.values() {
        commands.extend(plan_tier(state, tier, config, now_ms, &mut reservations, new_id));
    }
    commands.extend(plan_orphans_and_forgetting(state, config, now_ms));
    commands
}

fn plan_nodes(state: &State, observed: &Observed<'_>, config: &PlanConfig, now_ms: u64) -> Vec<Command> {
    let mut commands = Vec::new();
    for node in state.nodes.values() {
        let heard = observed.nodes.get(&node.id).map(|o| o.last_seen_ms);
        let seen = heard.unwrap_or(0).max(observed.leader_since_ms);
        let silent_for = now_ms.saturating_sub(seen);
        if node.ready && silent_for > config.heartbeat_grace_ms {
            commands.push(Command::SetNodeReady {
                node: node.id.clone(),
                ready: false,
                reason: format!(
                    "no heartbeat for {} (grace {})",
                    millis(silent_for),
                    millis(config.heartbeat_grace_ms)
                ),
            });
        } else if !node.ready
            && heard.is_some_and(|heard| heard >= observed.leader_since_ms)
            && silent_for <= config.heartbeat_grace_ms
        {
            commands.push(Command::SetNodeReady {
                node: node.id.clone(),
                ready: true,
                reason: "heartbeats resumed".to_string(),
            });
        }
    }
    commands
}

fn plan_reports(state: &State, observed: &Observed<'_>, config: &PlanConfig) -> Vec<InstanceUpdate> {
    let mut updates = Vec::new();
    for (node_id, observation) in observed.nodes {
        if !state.nodes.get(node_id).is_some_and(|node| node.ready) {
            continue;
        }
        let mut reported = HashSet::new();
        for report in &observation.reports {
            reported.insert(report.id);
            let Some(instance) = state.instances.get(&report.id) else {
                continue;
            };
            if instance.node.as_deref() != Some(node_id.as_str()) || instance.phase.is_final() {
                continue;
            }
            let event = match report.phase {
                Phase::Starting => Some(InstanceEvent::Started),
                Phase::Running => Some(InstanceEvent::BecameReady),
                Phase::Failed => Some(InstanceEvent::Failed),
                Phase::Terminated => Some(InstanceEvent::Stopped),
                _ => None,
            };
            let moves = event.is_some_and(|event| step(instance.phase, event) != instance.phase);
            let health_changed = report.health != instance.health;
            let port_changed = report.port.is_some() && report.port != instance.port;
            if moves || health_changed || port_changed {
                updates.push(InstanceUpdate {
                    id: instance.id,
                    event: event.filter(|_| moves),
                    health: health_changed.then_some(report.health),
                    port: report.port.filter(|_| port_changed),
                    reason: report.reason.clone(),
                });
            }
        }
        // Instances the agent should have reported by now but did not.
        let heard_at = observation.last_seen_ms;
        for instance in state.instances_on(node_id) {
            if reported.contains(&instance.id) {
                continue;
            }
            let unreported_for = heard_at.saturating_sub(instance.updated_at_ms);
            let (event, reason) = match instance.phase {
                Phase::Draining if unreported_for > config.report_slack_ms => {
                    (InstanceEvent::Stopped, "stopped by its agent")
                }
                Phase::Starting | Phase::Running if unreported_for > config.report_slack_ms => {
                    (InstanceEvent::Failed, "no longer reported by its agent")
                }
                Phase::Pending if unreported_for > config.start_timeout_ms => (
                    InstanceEvent::Failed,
                    "its agent did not start it in time",
                ),
                _ => continue,
            };
            updates.push(InstanceUpdate {
                id: instance.id,
                event: Some(event),
                health: None,
                port: None,
                reason: Some(reason.to_string()),
            });
        }
    }
    updates.sort_by_key(|update| update.id);
    updates
}

/// CPU and memory reserved on each node, including instances planned this round.
struct Reservations {
    used: BTreeMap<String, (f64, u64)>,
}

impl Reservations {
    fn of(state: &State) -> Self {
        let mut used: BTreeMap<String, (f64, u64)> = BTreeMap::new();
        for instance in state.instances.values() {
            if instance.phase.is_final() {
                continue;
            }
            let (Some(node), Some(tier)) = (&instance.node, state.tiers.get(&instance.tier)) else {
                continue;
            };
            let entry = used.entry(node.clone()).or_default();
            entry.0 += tier.spec.template.cpu;
            entry.1 += tier.spec.template.memory_mb;
        }
        Reservations { used }
    }

    fn fits(&self, node: &NodeRecord, cpu: f64, memory_mb: u64) -> bool {
        let (used_cpu, used_memory) = self.used.get(&node.id).copied().unwrap_or_default();
        // A small tolerance so that, say, 4 x 0.25 CPU fit exactly on one core.
        used_cpu + cpu <= node.capacity.cpu + 1e-9 && used_memory + memory_mb <= node.capacity.memory_mb
    }

    fn load(&self, node: &NodeRecord) -> f64 {
        let (used_cpu, _) = self.used.get(&node.id).copied().unwrap_or_default();
        if node.capacity.cpu > 0.0 {
            used_cpu / node.capacity.cpu
        } else {
            1.0
        }
    }

    fn reserve(&mut self, node: &str, cpu: f64, memory_mb: u64) {
        let entry = self.used.entry(node.to_string()).or_default();
        entry.0 += cpu;
        entry.1 += memory_mb;
    }
}

fn plan_tier(
    state: &State,
    tier: &Tier,
    config: &PlanConfig,
    now_ms: u64,
    reservations: &mut Reservations,
    new_id: &mut dyn FnMut() -> Uuid,
) -> Vec<Command> {
    let name = tier.name();
    let desired = tier.status.desired as usize;
    let mut instances: Vec<&Instance> = state
        .instances
        .values()
        .filter(|instance| instance.tier == name && instance.phase.is_live())
        .collect();
    // Oldest first: scale-in and rolling remove the newest surplus and the oldest outdated.
    instances.sort_by_key(|instance| (instance.created_at_ms, instance.id));

    let mut drains: Vec<InstanceUpdate> = Vec::new();
    let mut drain = |instance: &Instance, reason: &str| {
        drains.push(InstanceUpdate {
            id: instance.id,
            event: Some(InstanceEvent::Drain),
            health: None,
            port: None,
            reason: Some(reason.to_string()),
        });
    };

    let node_draining = |instance: &Instance| {
        instance
            .node
            .as_ref()
            .and_then(|node| state.nodes.get(node))
            .is_some_and(|node| node.draining)
    };
    let mut current = Vec::new();
    let mut outdated = Vec::new();
    for instance in instances {
        if instance.phase == Phase::Running && instance.health == Health::Unhealthy {
            drain(instance, "failed its health checks; replacing it");
        } else if instance.generation < tier.generation || node_draining(instance) {
            outdated.push(instance);
        } else {
            current.push(instance);
        }
    }

    // Scale in: remove the surplus of current instances, least useful first.
    if current.len() > desired {
        let mut surplus: Vec<&Instance> = current.clone();
        surplus.sort_by_key(|instance| {
            let rank = match instance.phase {
                Phase::Pending => 0,
                Phase::Starting => 1,
                _ => 2,
            };
            (rank, std::cmp::Reverse(instance.created_at_ms), instance.id)
        });
        let remove: Vec<&Instance> = surplus.into_iter().take(current.len() - desired).collect();
        for instance in &remove {
            drain(instance, &format!("scaling in to {desired}"));
        }
        current.retain(|instance| !remove.iter().any(|r| r.id == instance.id));
    }

    // Roll: keep only as many outdated instances as the ready current ones cannot yet replace.
    let ready_current = current
        .iter()
        .filter(|instance| instance.phase == Phase::Running)
        .count();
    let keep_outdated = desired.saturating_sub(ready_current);
    for (position, instance) in outdated.iter().enumerate() {
        if position >= keep_outdated {
            let reason = if node_draining(instance) {
                "its node is draining; a replacement is ready"
            } else {
                "replaced by the new template"
            };
            drain(instance, reason);
        }
    }
    let kept_outdated = outdated.len().min(keep_outdated);

    // Scale out and replace, with a surge of at most `max_surge` over desired.
    let ceiling = desired + config.max_surge as usize;
    let live_after = current.len() + kept_outdated;
    let mut creates = desired
        .saturating_sub(current.len())
        .min(ceiling.saturating_sub(live_after));

    let recent_failures = state
        .instances
        .values()
        .filter(|instance| {
            instance.tier == name
                && instance.phase == Phase::Failed
                && now_ms.saturating_sub(instance.updated_at_ms) < config.failure_window_ms
        })
        .count();
    let mut commands = Vec::new();
    if creates > 0 && recent_failures >= config.max_failures_in_window {
        creates = 0;
        if last_event_reason(state, name) != Some("BackingOff") {
            commands.push(Command::RecordEvent {
                object: format!("tier/{name}"),
                reason: "BackingOff".to_string(),
                message: format!(
                    "{recent_failures} instances failed within {}; not creating more until they age out",
                    millis(config.failure_window_ms)
                ),
            });
        }
    }

    let mut placed = Vec::new();
    let mut spread_counts = spread_counts(state, tier);
    for _ in 0..creates {
        match choose_node(state, tier, reservations, &spread_counts) {
            Some(node) => {
                let template = &tier.spec.template;
                reservations.reserve(&node.id, template.cpu, template.memory_mb);
                *spread_counts.entry(spread_key(tier, node)).or_default() += 1;
                placed.push(NewInstance {
                    id: new_id(),
                    tier: name.to_string(),
                    node: node.id.clone(),
                });
            }
            None => {
                if last_event_reason(state, name) != Some("Unschedulable") {
                    commands.push(Command::RecordEvent {
                        object: format!("tier/{name}"),
                        reason: "Unschedulable".to_string(),
                        message: format!(
                            "no Ready, uncordoned node with {} CPU and {} MiB free{}",
                            tier.spec.template.cpu,
                            tier.spec.template.memory_mb,
                            if tier.spec.placement.node_labels.is_empty() {
                                String::new()
                            } else {
                                format!(" and labels {:?}", tier.spec.placement.node_labels)
                            }
                        ),
                    });
                }
                break;
            }
        }
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

fn last_event_reason<'a>(state: &'a State, tier: &str) -> Option<&'a str> {
    let object = format!("tier/{tier}");
    state
        .events
        .iter()
        .rev()
        .find(|event| event.object == object)
        .map(|event| event.reason.as_str())
}

fn spread_key(tier: &Tier, node: &NodeRecord) -> String {
    match tier.spec.placement.spread {
        Spread::Node => node.id.clone(),
        Spread::Zone => node.zone.clone().unwrap_or_default(),
    }
}

/// Live instances of `tier` per spread domain.
fn spread_counts(state: &State, tier: &Tier) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for instance in state.instances.values() {
        if instance.tier != tier.name() || !instance.phase.is_live() {
            continue;
        }
        if let Some(node) = instance.node.as_ref().and_then(|node| state.nodes.get(node)) {
            *counts.entry(spread_key(tier, node)).or_default() += 1;
        }
    }
    counts
}

/// The best node for one more instance of `tier`: eligible, with room, in the least used spread
/// domain, then the least loaded, then by id (deterministic).
fn choose_node<'a>(
    state: &'a State,
    tier: &Tier,
    reservations: &Reservations,
    spread: &BTreeMap<String, usize>,
) -> Option<&'a NodeRecord> {
    let template = &tier.spec.template;
    let wanted = &tier.spec.placement.node_labels;
    state
        .nodes
        .values()
        .filter(|node| node.ready && !node.cordoned && !node.draining)
        .filter(|node| wanted.iter().all(|(key, value)| node.labels.get(key) == Some(value)))
        .filter(|node| reservations.fits(node, template.cpu, template.memory_mb))
        .min_by(|a, b| {
            let key = |node: &NodeRecord| {
                (
                    spread.get(&spread_key(tier, node)).copied().unwrap_or(0),
                    reservations.load(node),
                )
            };
            let (spread_a, load_a) = key(a);
            let (spread_b, load_b) = key(b);
            spread_a
                .cmp(&spread_b)
                .then(load_a.total_cmp(&load_b))
                .then(a.id.cmp(&b.id))
        })
}

fn plan_orphans_and_forgetting(state: &State, config: &PlanConfig, now_ms: u64) -> Vec<Command> {
    let mut commands = Vec::new();
    let orphans: Vec<InstanceUpdate> = state
        .instances
        .values()
        .filter(|instance| instance.phase.is_live() && !state.tiers.contains_key(&instance.tier))
        .map(|instance| InstanceUpdate {
            id: instance.id,
            event: Some(InstanceEvent::Drain),
            health: None,
            port: None,
            reason: Some("its tier no longer exists".to_string()),
        })
        .collect();
    if !orphans.is_empty() {
        commands.push(Command::UpdateInstances { updates: orphans });
    }
    let forgotten: Vec<Uuid> = state
        .instances
        .values()
        .filter(|instance| {
            instance.phase.is_final()
                && now_ms.saturating_sub(instance.updated_at_ms) > config.forget_after_ms
        })
        .map(|instance| instance.id)
        .collect();
    if !forgotten.is_empty() {
        commands.push(Command::RemoveInstances { ids: forgotten });
    }
    commands
}

fn millis(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

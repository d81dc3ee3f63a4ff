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
//!    ready capacity (the tier's `rollout.max_surge` / `max_unavailable`), and place new instances on Ready nodes with room, spread across nodes or
//!    zones and honouring node labels; back off creating when instances keep failing;
//! 4. drains instances of deleted tiers and forgets final instances after a while;
//! 5. ends drains and records what load balancers say of their frontends (`pools`).

pub mod pools;

pub mod autoscale;

pub mod ec2;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use strata_api::{
    Health, HostMetrics, Instance, InstanceReport, LbReport, NodeRole, Phase, Spread, Tier,
};
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
    /// LB nodes: what their load balancer serves, from the latest heartbeat.
    pub lb: Option<LbReport>,
}

/// The leader's in-memory view of the world.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// When this node became leader: no node is judged silent for longer than that.
    pub leader_since_ms: u64,
    pub nodes: &'a HashMap<String, Arc<NodeObservation>>,
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
    let index = RoundIndex::of(state);
    let (mut commands, updates) = plan_nodes_and_reports(state, &index, observed, config, now_ms);
    if !updates.is_empty() {
        commands.push(Command::UpdateInstances { updates });
    }
    // Built at the first placement of the round, from the index: a steady round places
    // nothing and need not order 10,000 nodes by load.
    let mut reservations = None;
    // A tier's slot in the index is its position in `state.tiers`.
    for (slot, tier) in state.tiers.values().enumerate() {
        // EC2 tiers are never placed on agents: their records get a subnet, and the leader's
        // EC2 executor launches them.
        if tier.spec.provider == strata_api::Provider::Ec2 {
            commands.extend(ec2::plan_tier(&index, tier, config, now_ms, new_id));
            continue;
        }
        let summary = index.tier_summaries.get(slot).copied().unwrap_or_default();
        if summary.to_replace == 0 && summary.live == tier.status.desired as usize {
            // Nothing to drain, roll or create: `plan_tier` would find exactly that (a
            // property test holds the two together), after looking at every instance again.
            continue;
        }
        commands.extend(plan_tier(
            state,
            &index,
            tier,
            config,
            now_ms,
            &mut reservations,
            new_id,
        ));
    }
    commands.extend(plan_orphans_and_forgetting(&index, config, now_ms));
    commands.extend(pools::plan(
        state,
        &index.tiers,
        &index.draining_instances,
        observed,
        now_ms,
    ));
    commands
}

/// Judges each node's liveness (`SetNodeReady` commands, in node order) and turns the reports
/// of Ready nodes into instance updates (in instance id order). One walk over the nodes does
/// both: at fleet scale a lookup per node in the other's map costs more than the judgement.
fn plan_nodes_and_reports(
    state: &State,
    index: &RoundIndex<'_>,
    observed: &Observed<'_>,
    config: &PlanConfig,
    now_ms: u64,
) -> (Vec<Command>, Vec<InstanceUpdate>) {
    let mut commands = Vec::new();
    let mut updates = Vec::new();
    let mut reports: Vec<&InstanceReport> = Vec::new();
    for (position, node) in state.nodes.values().enumerate() {
        let observation = observed.nodes.get(&node.id);
        let heard = observation.map(|o| o.last_seen_ms);
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
        if let Some(reason) = ec2_node_gone(state, node) {
            commands.push(Command::RemoveNode {
                node: node.id.clone(),
                reason,
            });
            continue;
        }
        let Some(observation) = observation.filter(|_| node.ready) else {
            continue;
        };
        // Agents report in id order (their assignments' order), which makes the sort cheap;
        // the buffer is reused from node to node.
        reports.clear();
        reports.extend(observation.reports.iter());
        reports.sort_by_key(|report| report.id);
        report_updates(
            index.instances_on_registered(position),
            &reports,
            observation.last_seen_ms,
            config,
            &mut updates,
        );
    }
    updates.sort_by_key(|update| update.id);
    (commands, updates)
}

/// Why the node of an EC2 instance's agent is to be removed, if it is: it is NotReady and its
/// instance is gone (no record, or one that ended). Like Kubernetes' cloud node lifecycle
/// controller, which deletes a Node whose cloud instance no longer exists; a scaled EC2 tier
/// would otherwise leave a NotReady node behind for every instance it ever ran.
fn ec2_node_gone(state: &State, node: &NodeRecord) -> Option<String> {
    let instance = node.ec2_instance?;
    if node.ready {
        return None;
    }
    match state.instances.get(&instance) {
        None => Some(format!("its EC2 instance {instance} is gone")),
        Some(record) if record.phase.is_final() => {
            Some(format!("its EC2 instance {instance} is {:?}", record.phase))
        }
        Some(_) => None,
    }
}

/// The updates that one node's reports (`reports`, sorted by id) call for on the instances
/// placed on it (`on_node`, in id order, ids unique), appended to `updates`: reported
/// transitions, health and port changes, then the instances it should have reported by
/// `heard_at` but did not. Both lists are in id order, so one walk along each joins them (a
/// binary search per report touched several instances per report, each a cache miss at fleet
/// scale).
fn report_updates(
    on_node: &[&Instance],
    reports: &[&InstanceReport],
    heard_at: u64,
    config: &PlanConfig,
    updates: &mut Vec<InstanceUpdate>,
) {
    let mut next = 0;
    for report in reports {
        while on_node
            .get(next)
            .is_some_and(|instance| instance.id < report.id)
        {
            next += 1;
        }
        let Some(&instance) = on_node
            .get(next)
            .filter(|instance| instance.id == report.id)
        else {
            continue;
        };
        if instance.phase.is_final() {
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
                ..Default::default()
            });
        }
    }
    // Instances the agent should have reported by now but did not.
    let mut next = 0;
    for &instance in on_node {
        while reports
            .get(next)
            .is_some_and(|report| report.id < instance.id)
        {
            next += 1;
        }
        if reports
            .get(next)
            .is_some_and(|report| report.id == instance.id)
        {
            continue;
        }
        let unreported_for = heard_at.saturating_sub(instance.updated_at_ms);
        let (event, reason) = match instance.phase {
            Phase::Draining | Phase::Stopping if unreported_for > config.report_slack_ms => {
                (InstanceEvent::Stopped, "stopped by its agent")
            }
            Phase::Starting | Phase::Running if unreported_for > config.report_slack_ms => {
                (InstanceEvent::Failed, "no longer reported by its agent")
            }
            Phase::Pending if unreported_for > config.start_timeout_ms => {
                (InstanceEvent::Failed, "its agent did not start it in time")
            }
            _ => continue,
        };
        updates.push(InstanceUpdate {
            id: instance.id,
            event: Some(event),
            health: None,
            port: None,
            reason: Some(reason.to_string()),
            ..Default::default()
        });
    }
}

/// Lookups every tier's plan needs, built once per round so that a round costs time linear in
/// the state's size rather than tiers x (instances + events).
///
/// Everything indexed by instance comes from one pass over the instances: at fleet scale
/// (100,000 instances) each pass costs a cache miss or two per instance, more than the
/// hashing it does. Maps from names are keyed by the state's own node and tier names, which
/// stay in cache, rather than by the copies each instance holds.
struct RoundIndex<'a> {
    /// Every instance of each tier (any phase), in instance id order, and the latest
    /// load-balancer event per tier: the read models' index, shared with `pools`.
    tiers: crate::views::TierIndex<'a>,
    /// Per tier slot (`TierIndex::visiting`): what the pass saw of its live instances.
    tier_summaries: Vec<TierSummary>,
    /// The reason of each object's latest event.
    last_reason: foldhash::HashMap<&'a str, &'a str>,
    /// Nodes being drained (usually none): a set, so that a round asks it once per instance
    /// instead of looking up each instance's node.
    draining: HashSet<&'a str>,
    /// Per node name that instances carry: the instances placed there and what they reserve.
    /// Registered nodes come first, in `state.nodes`' order; then names no registered node
    /// has.
    on_nodes: Vec<OnNode<'a>>,
    /// Instances in `Draining`, in id order (the pools planner ends drains).
    draining_instances: Vec<&'a Instance>,
    /// Instances in a final phase, in id order (forgotten after a while).
    final_instances: Vec<&'a Instance>,
}

/// A node's instances and the room they take.
struct OnNode<'a> {
    node: &'a str,
    /// Every instance placed on the node, in id order.
    instances: Vec<&'a Instance>,
    /// CPU and memory reserved by those that are not final and whose tier exists.
    used: (f64, u64),
}

/// What the pass over the instances saw of a tier's live ones, enough to tell that its plan
/// has nothing to do without looking at each of them again.
#[derive(Clone, Copy, Debug, Default)]
struct TierSummary {
    /// Live instances (Pending, Starting, Running).
    live: usize,
    /// Live instances that `plan_tier` drains or rolls whatever the count: Running and
    /// unhealthy, of an older generation, or on a draining node.
    to_replace: usize,
}

impl<'a> RoundIndex<'a> {
    fn of(state: &'a State) -> Self {
        // Events are oldest first: later ones overwrite earlier ones.
        let last_reason = state
            .events
            .iter()
            .map(|event| (event.object.as_str(), event.reason.as_str()))
            .collect();
        let draining: HashSet<&str> = state
            .nodes
            .values()
            .filter(|node| node.draining)
            .map(|node| node.id.as_str())
            .collect();
        let mut node_slots: foldhash::HashMap<&str, usize> =
            foldhash::HashMap::with_capacity_and_hasher(state.nodes.len(), Default::default());
        let mut on_nodes = Vec::with_capacity(state.nodes.len());
        for id in state.nodes.keys() {
            node_slots.insert(id.as_str(), on_nodes.len());
            on_nodes.push(OnNode {
                node: id.as_str(),
                instances: Vec::new(),
                used: (0.0, 0),
            });
        }
        let mut tier_summaries = vec![TierSummary::default(); state.tiers.len()];
        let mut draining_instances = Vec::new();
        let mut final_instances = Vec::new();
        let tiers = crate::views::TierIndex::visiting(state, |instance, slot, tier| {
            if instance.phase == Phase::Draining {
                draining_instances.push(instance);
            }
            let is_final = instance.phase.is_final();
            if is_final {
                final_instances.push(instance);
            }
            let on_draining_node = || {
                !draining.is_empty()
                    && instance
                        .node
                        .as_deref()
                        .is_some_and(|node| draining.contains(node))
            };
            if let (true, Some(tier)) = (instance.phase.is_live(), tier) {
                let summary = &mut tier_summaries[slot];
                summary.live += 1;
                if (instance.phase == Phase::Running && instance.health == Health::Unhealthy)
                    || instance.generation < tier.generation
                    || on_draining_node()
                {
                    summary.to_replace += 1;
                }
            }
            let Some(node) = &instance.node else {
                return;
            };
            let slot = match node_slots.get(node.as_str()) {
                Some(slot) => *slot,
                None => {
                    node_slots.insert(node.as_str(), on_nodes.len());
                    on_nodes.push(OnNode {
                        node: node.as_str(),
                        instances: Vec::new(),
                        used: (0.0, 0),
                    });
                    on_nodes.len() - 1
                }
            };
            let on_node = &mut on_nodes[slot];
            on_node.instances.push(instance);
            if let (false, Some(tier)) = (is_final, tier) {
                on_node.used.0 += tier.spec.template.cpu;
                on_node.used.1 += tier.spec.template.memory_mb;
            }
        });
        RoundIndex {
            tiers,
            tier_summaries,
            last_reason,
            draining,
            on_nodes,
            draining_instances,
            final_instances,
        }
    }

    /// The instances on the node at `position` in `state.nodes`.
    fn instances_on_registered(&self, position: usize) -> &[&'a Instance] {
        self.on_nodes
            .get(position)
            .map_or(&[], |on_node| on_node.instances.as_slice())
    }

    fn instances_of(&self, tier: &str) -> &[&'a Instance] {
        self.tiers.instances_of(tier)
    }

    fn last_event_reason(&self, tier: &str) -> Option<&'a str> {
        self.last_reason
            .get(format!("tier/{tier}").as_str())
            .copied()
    }
}

/// CPU and memory reserved on each node, including instances planned this round, and the
/// nodes ordered by load for placement.
///
/// Placement wants the node with the fewest instances of the tier in its spread domain, then
/// the least loaded, then the first by id. Scanning every node for every new instance made a
/// round over 10,000 nodes and a thousand new instances take seconds; walking the nodes in
/// (load, id) order instead finds, for each spread count, its best node first, and stops at
/// the first node whose count is the lowest any eligible node can have (usually the first
/// eligible node that fits).
struct Reservations<'a> {
    nodes: &'a BTreeMap<String, NodeRecord>,
    used: foldhash::HashMap<&'a str, (f64, u64)>,
    by_load: BTreeSet<(Load, &'a str)>,
}

/// A node's load (reserved CPU over capacity), ordered by `f64::total_cmp`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Load(f64);

impl Eq for Load {}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl<'a> Reservations<'a> {
    fn of(state: &'a State, index: &RoundIndex<'a>) -> Self {
        let used: foldhash::HashMap<&'a str, (f64, u64)> = index
            .on_nodes
            .iter()
            .map(|on_node| (on_node.node, on_node.used))
            .collect();
        let mut reservations = Reservations {
            nodes: &state.nodes,
            used,
            by_load: BTreeSet::new(),
        };
        reservations.by_load = state
            .nodes
            .values()
            .map(|node| (reservations.load(node), node.id.as_str()))
            .collect();
        reservations
    }

    fn fits(&self, node: &NodeRecord, cpu: f64, memory_mb: u64) -> bool {
        let (used_cpu, used_memory) = self.used.get(node.id.as_str()).copied().unwrap_or_default();
        // A small tolerance so that, say, 4 x 0.25 CPU fit exactly on one core.
        used_cpu + cpu <= node.capacity.cpu + 1e-9
            && used_memory + memory_mb <= node.capacity.memory_mb
    }

    fn load(&self, node: &NodeRecord) -> Load {
        let (used_cpu, _) = self.used.get(node.id.as_str()).copied().unwrap_or_default();
        Load(if node.capacity.cpu > 0.0 {
            used_cpu / node.capacity.cpu
        } else {
            1.0
        })
    }

    fn reserve(&mut self, node: &'a NodeRecord, cpu: f64, memory_mb: u64) {
        let before = self.load(node);
        self.by_load.remove(&(before, node.id.as_str()));
        let entry = self.used.entry(node.id.as_str()).or_default();
        entry.0 += cpu;
        entry.1 += memory_mb;
        self.by_load.insert((self.load(node), node.id.as_str()));
    }

    /// Nodes from the least loaded, ties by id.
    fn by_load(&self) -> impl Iterator<Item = &'a NodeRecord> + '_ {
        self.by_load
            .iter()
            .filter_map(|(_, id)| self.nodes.get(*id))
    }
}

fn plan_tier<'a>(
    state: &'a State,
    index: &RoundIndex<'a>,
    tier: &Tier,
    config: &PlanConfig,
    now_ms: u64,
    reservations: &mut Option<Reservations<'a>>,
    new_id: &mut dyn FnMut() -> Uuid,
) -> Vec<Command> {
    let name = tier.name();
    let desired = tier.status.desired as usize;
    let all = index.instances_of(name);
    let mut instances: Vec<&Instance> = all
        .iter()
        .copied()
        .filter(|instance| instance.phase.is_live())
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
            ..Default::default()
        });
    };

    let node_draining = |instance: &Instance| {
        instance
            .node
            .as_deref()
            .is_some_and(|node| !index.draining.is_empty() && index.draining.contains(node))
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
    let rollout = tier.spec.rollout;
    let keep_outdated = desired.saturating_sub(ready_current + rollout.max_unavailable as usize);
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
    let ceiling = desired + rollout.max_surge as usize;
    let live_after = current.len() + kept_outdated;
    let mut creates = desired
        .saturating_sub(current.len())
        .min(ceiling.saturating_sub(live_after));

    let recent_failures = all
        .iter()
        .filter(|instance| {
            instance.phase == Phase::Failed
                && now_ms.saturating_sub(instance.updated_at_ms) < config.failure_window_ms
        })
        .count();
    let mut commands = Vec::new();
    if creates > 0 && recent_failures >= config.max_failures_in_window {
        creates = 0;
        if index.last_event_reason(name) != Some("BackingOff") {
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
    let mut unschedulable = None;
    let (mut spread_counts, eligible_nodes) = if creates > 0 {
        (spread_counts(state, index, tier), Eligible::of(state, tier))
    } else {
        Default::default()
    };
    for _ in 0..creates {
        let reservations = reservations.get_or_insert_with(|| Reservations::of(state, index));
        match choose_node(tier, reservations, &spread_counts, &eligible_nodes) {
            Some(node) => {
                let template = &tier.spec.template;
                reservations.reserve(node, template.cpu, template.memory_mb);
                *spread_counts
                    .entry(spread_key(tier, node).to_string())
                    .or_default() += 1;
                placed.push(NewInstance {
                    id: new_id(),
                    tier: name.to_string(),
                    node: node.id.clone(),
                    ..Default::default()
                });
            }
            None => {
                if index.last_event_reason(name) != Some("Unschedulable") {
                    unschedulable = Some(Command::RecordEvent {
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
    // Recorded after the creations so that it is the tier's latest event, which keeps the
    // next rounds from recording it again while nothing changes.
    commands.extend(unschedulable);
    commands
}

fn spread_key<'n>(tier: &Tier, node: &'n NodeRecord) -> &'n str {
    match tier.spec.placement.spread {
        Spread::Node => &node.id,
        Spread::Zone => node.zone.as_deref().unwrap_or_default(),
    }
}

/// Live instances of `tier` per spread domain.
fn spread_counts(state: &State, index: &RoundIndex<'_>, tier: &Tier) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for instance in index.instances_of(tier.name()) {
        if !instance.phase.is_live() {
            continue;
        }
        if let Some(node) = instance
            .node
            .as_ref()
            .and_then(|node| state.nodes.get(node))
        {
            *counts
                .entry(spread_key(tier, node).to_string())
                .or_default() += 1;
        }
    }
    counts
}

/// Whether `tier` may run on `node` at all (room aside).
fn eligible(tier: &Tier, node: &NodeRecord) -> bool {
    node.ready
        && !node.cordoned
        && !node.draining
        && node.ec2_instance.is_none()
        && node.has_role(NodeRole::Worker)
        && tier
            .spec
            .placement
            .node_labels
            .iter()
            .all(|(key, value)| node.labels.get(key) == Some(value))
}

/// What placement knows of the nodes `tier` may run on, gathered once per tier and round.
#[derive(Default)]
struct Eligible<'n> {
    /// How many nodes the tier may run on.
    nodes: usize,
    /// Their zones, when the tier spreads over zones (a few; per node there would be as many
    /// domains as nodes).
    zones: BTreeSet<&'n str>,
}

impl<'n> Eligible<'n> {
    fn of(state: &'n State, tier: &Tier) -> Self {
        let mut found = Eligible::default();
        for node in state.nodes.values().filter(|node| eligible(tier, node)) {
            found.nodes += 1;
            if tier.spec.placement.spread == Spread::Zone {
                found.zones.insert(spread_key(tier, node));
            }
        }
        found
    }

    /// A count no eligible node is below, `None` when there is no eligible node. Exact for
    /// zones; for nodes 0, which any node without an instance of the tier has (when every
    /// eligible node holds one, the walk goes on to the end).
    fn floor(&self, tier: &Tier, spread: &BTreeMap<String, usize>) -> Option<usize> {
        if self.nodes == 0 {
            return None;
        }
        match tier.spec.placement.spread {
            Spread::Node => Some(0),
            Spread::Zone => self
                .zones
                .iter()
                .map(|zone| spread.get(*zone).copied().unwrap_or(0))
                .min(),
        }
    }
}

/// The best node for one more instance of `tier`: eligible, with room, in the least used spread
/// domain, then the least loaded, then by id (deterministic). No eligible node has a lower
/// count than `eligible.floor`, so the walk stops at a node that has it.
fn choose_node<'a>(
    tier: &Tier,
    reservations: &Reservations<'a>,
    spread: &BTreeMap<String, usize>,
    eligible_nodes: &Eligible<'_>,
) -> Option<&'a NodeRecord> {
    let template = &tier.spec.template;
    let count = |domain: &str| spread.get(domain).copied().unwrap_or(0);
    let floor = eligible_nodes.floor(tier, spread)?;
    let mut best: Option<(usize, &'a NodeRecord)> = None;
    for node in reservations.by_load() {
        if !eligible(tier, node) || !reservations.fits(node, template.cpu, template.memory_mb) {
            continue;
        }
        let spread = count(spread_key(tier, node));
        // In (load, id) order, the first node of each count is that count's best.
        if best.is_none_or(|(best, _)| spread < best) {
            best = Some((spread, node));
            if spread <= floor {
                break;
            }
        }
    }
    best.map(|(_, node)| node)
}

fn plan_orphans_and_forgetting(
    index: &RoundIndex<'_>,
    config: &PlanConfig,
    now_ms: u64,
) -> Vec<Command> {
    let mut commands = Vec::new();
    // The index knows which tier names no longer exist: no lookup per instance.
    let mut orphaned: Vec<&Instance> = index
        .tiers
        .groups()
        .filter(|(_, tier, _)| tier.is_none())
        .flat_map(|(_, _, instances)| instances.iter().copied())
        .filter(|instance| instance.phase.is_live())
        .collect();
    orphaned.sort_by_key(|instance| instance.id);
    let orphans: Vec<InstanceUpdate> = orphaned
        .into_iter()
        .map(|instance| InstanceUpdate {
            id: instance.id,
            event: Some(InstanceEvent::Drain),
            health: None,
            port: None,
            reason: Some("its tier no longer exists".to_string()),
            ..Default::default()
        })
        .collect();
    if !orphans.is_empty() {
        commands.push(Command::UpdateInstances { updates: orphans });
    }
    let forgotten: Vec<Uuid> = index
        .final_instances
        .iter()
        .filter(|instance| now_ms.saturating_sub(instance.updated_at_ms) > config.forget_after_ms)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use strata_api::{NodeRole, RegisterRequest, Resources, TierSpec};

    use super::*;
    use crate::state::{CommandResult, Request};

    /// A state built the way the cluster builds it: by applying commands.
    struct World {
        state: State,
        index: u64,
        now: u64,
        next_id: u128,
        observed: HashMap<String, Arc<NodeObservation>>,
        leader_since: u64,
    }

    impl World {
        fn new() -> Self {
            World {
                state: State::default(),
                index: 0,
                now: 1_000_000,
                next_id: 1,
                observed: HashMap::new(),
                leader_since: 1_000_000,
            }
        }

        fn apply(&mut self, command: Command) -> CommandResult {
            self.index += 1;
            self.state.apply(
                self.index,
                &Request {
                    at_ms: self.now,
                    command,
                },
            )
        }

        fn node(&mut self, id: &str, zone: &str, cpu: f64) {
            self.apply(Command::RegisterNode {
                registration: RegisterRequest {
                    node_id: id.to_string(),
                    address: "127.0.0.1".to_string(),
                    zone: Some(zone.to_string()),
                    labels: BTreeMap::from([("disk".to_string(), "ssd".to_string())]),
                    capacity: Resources {
                        cpu,
                        memory_mb: 4096,
                    },
                    agent_version: "test".to_string(),
                    roles: strata_api::default_roles(),
                },
                auth: None,
                max_nodes: None,
            });
            self.heartbeat(id, Vec::new());
        }

        fn heartbeat(&mut self, id: &str, reports: Vec<InstanceReport>) {
            self.observed.insert(
                id.to_string(),
                Arc::new(NodeObservation {
                    last_seen_ms: self.now,
                    metrics: HostMetrics::default(),
                    reports,
                    lb: None,
                }),
            );
        }

        fn tier(&mut self, name: &str, min: u32, max: u32, extra: serde_json::Value) {
            let mut body = serde_json::json!({
                "name": name,
                "template": {"driver": "process", "command": ["app"], "cpu": 0.5, "memory_mb": 64},
                "scaling": {"min": min, "max": max},
            });
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                for (key, value) in extra {
                    body.insert(key.clone(), value.clone());
                }
            }
            let spec: TierSpec = serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"));
            self.apply(Command::PutTier {
                spec: Box::new(spec),
                max_tiers: None,
            });
        }

        fn plan(&mut self) -> Vec<Command> {
            let config = PlanConfig {
                heartbeat_grace_ms: 3_000,
                ..PlanConfig::default()
            };
            let observed = Observed {
                leader_since_ms: self.leader_since,
                nodes: &self.observed,
            };
            let mut next = self.next_id;
            let commands = plan(&self.state, &observed, &config, self.now, &mut || {
                next += 1;
                Uuid::from_u128(next)
            });
            self.next_id = next;
            commands
        }

        /// Plans and applies until nothing is left to do (at most `rounds`).
        fn settle(&mut self, rounds: usize) {
            for _ in 0..rounds {
                let commands = self.plan();
                if commands.is_empty() {
                    return;
                }
                for command in commands {
                    self.apply(command);
                }
            }
        }

        /// Agents report every live instance Running and healthy.
        fn all_healthy(&mut self) {
            let mut per_node: BTreeMap<String, Vec<InstanceReport>> = BTreeMap::new();
            for instance in self.state.instances.values() {
                if instance.phase.is_live() {
                    per_node
                        .entry(instance.node.clone().unwrap_or_default())
                        .or_default()
                        .push(report(instance.id, Phase::Running, Health::Healthy));
                }
            }
            let nodes: Vec<String> = self.state.nodes.keys().cloned().collect();
            for node in nodes {
                let reports = per_node.remove(&node).unwrap_or_default();
                self.heartbeat(&node, reports);
            }
        }

        fn live(&self, tier: &str) -> Vec<&Instance> {
            self.state
                .instances
                .values()
                .filter(|i| i.tier == tier && i.phase.is_live())
                .collect()
        }

        fn per_node(&self, tier: &str) -> BTreeMap<String, usize> {
            let mut counts = BTreeMap::new();
            for instance in self.live(tier) {
                *counts
                    .entry(instance.node.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            counts
        }
    }

    fn report(id: Uuid, phase: Phase, health: Health) -> InstanceReport {
        InstanceReport {
            id,
            phase,
            health,
            port: Some(40000),
            reason: None,
            cpu_percent: 0.0,
        }
    }

    #[test]
    fn a_new_tier_is_placed_spread_over_nodes_with_golden_actions() {
        let mut world = World::new();
        for node in ["a", "b", "c"] {
            world.node(node, "z1", 2.0);
        }
        world.tier("web", 3, 10, serde_json::json!({}));
        let commands = world.plan();
        assert_eq!(
            commands,
            vec![Command::CreateInstances {
                instances: vec![
                    NewInstance {
                        id: Uuid::from_u128(2),
                        tier: "web".to_string(),
                        node: "a".to_string(),
                        ..Default::default()
                    },
                    NewInstance {
                        id: Uuid::from_u128(3),
                        tier: "web".to_string(),
                        node: "b".to_string(),
                        ..Default::default()
                    },
                    NewInstance {
                        id: Uuid::from_u128(4),
                        tier: "web".to_string(),
                        node: "c".to_string(),
                        ..Default::default()
                    },
                ],
                reason: "3 of 3 desired".to_string(),
            }]
        );
    }

    #[test]
    fn scaling_out_and_in_converges_and_scale_in_removes_the_newest() {
        let mut world = World::new();
        for node in ["a", "b"] {
            world.node(node, "z1", 4.0);
        }
        world.tier("web", 1, 10, serde_json::json!({}));
        world.settle(3);
        world.all_healthy();
        world.settle(3);
        let first = world.live("web")[0].id;
        world.now += 1000;
        world.apply(Command::ScaleTier {
            name: "web".to_string(),
            desired: 4,
            expected_version: None,
        });
        world.settle(3);
        assert_eq!(world.live("web").len(), 4);
        assert_eq!(
            world.per_node("web").values().copied().collect::<Vec<_>>(),
            vec![2, 2]
        );
        world.all_healthy();
        world.settle(3);
        world.apply(Command::ScaleTier {
            name: "web".to_string(),
            desired: 1,
            expected_version: None,
        });
        world.settle(3);
        let live = world.live("web");
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, first, "scale-in keeps the oldest instance");
        // Without a load balancer there is nothing to drain from: the drains end at once and
        // the agents are told to stop them.
        let stopping = world
            .state
            .instances
            .values()
            .filter(|i| i.phase == Phase::Stopping)
            .count();
        assert_eq!(stopping, 3);
    }

    #[test]
    fn a_silent_node_goes_not_ready_after_the_grace_and_its_instances_move() {
        let mut world = World::new();
        for node in ["a", "b", "c"] {
            world.node(node, "z1", 4.0);
        }
        world.tier("web", 3, 10, serde_json::json!({}));
        world.settle(3);
        world.all_healthy();
        world.settle(3);
        // Two seconds later, a and b report; c is silent. Not yet past the 3 s grace.
        world.now += 2_000;
        world.all_healthy();
        if let Some(observation) = world.observed.get_mut("c").map(Arc::make_mut) {
            observation.last_seen_ms -= 2_000;
        }
        assert!(world.plan().is_empty(), "judged before the grace ran out");
        world.now += 1_500;
        let commands = world.plan();
        assert!(matches!(
            commands.first(),
            Some(Command::SetNodeReady { node, ready: false, .. }) if node == "c"
        ));
        world.settle(3);
        assert!(!world.state.nodes["c"].ready);
        let lost = world
            .state
            .instances
            .values()
            .filter(|i| i.phase == Phase::Lost)
            .count();
        assert_eq!(lost, 1);
        assert_eq!(world.live("web").len(), 3);
        assert!(world
            .live("web")
            .iter()
            .all(|i| i.node.as_deref() != Some("c")));
        // c comes back: Ready again, and nothing of its old instance is assigned to it.
        world.now += 1_000;
        world.heartbeat("c", Vec::new());
        world.settle(3);
        assert!(world.state.nodes["c"].ready);
    }

    /// Issue 10: a node goes silent in the round that places an instance on it. The round
    /// marks it NotReady and, planned from the same snapshot, creates the instance there; the
    /// instance must not be created (it would stay Pending for as long as the node is away,
    /// counting toward the tier), and the next round places it on a Ready node.
    #[test]
    fn an_instance_is_never_created_on_a_node_that_went_not_ready_in_the_same_round() {
        let mut world = World::new();
        world.node("a", "z1", 4.0);
        world.node("b", "z1", 2.0);
        // a has more room, so the scheduler prefers it; then a falls silent.
        world.now += 3_500;
        world.heartbeat("b", Vec::new());
        world.tier("web", 1, 10, serde_json::json!({}));
        let commands = world.plan();
        assert!(
            matches!(
                commands.as_slice(),
                [
                    Command::SetNodeReady { node: silent, ready: false, .. },
                    Command::CreateInstances { instances, .. },
                ] if silent == "a" && instances.iter().all(|i| i.node == "a")
            ),
            "the round judges a and places on it from the same snapshot: {commands:?}"
        );
        for command in commands {
            world.apply(command);
        }
        assert!(
            world.live("web").is_empty(),
            "nothing may be created on a NotReady node: {:?}",
            world.live("web")
        );
        assert!(
            world
                .state
                .events
                .iter()
                .any(|event| event.reason == "InstanceNotPlaced"
                    && event.object == "tier/web"
                    && event.message.contains("node a is not ready")),
            "the refusal is on record: {:?}",
            world.state.events
        );
        world.settle(3);
        assert_eq!(
            world.per_node("web"),
            BTreeMap::from([("b".to_string(), 1)])
        );
    }

    /// Cordoned and draining nodes are refused at apply time too, whatever the planner chose.
    #[test]
    fn apply_refuses_to_place_on_cordoned_or_draining_nodes() {
        let mut world = World::new();
        world.node("a", "z1", 4.0);
        world.tier("web", 0, 10, serde_json::json!({}));
        for (cordoned, draining, why) in [(true, false, "is cordoned"), (true, true, "is draining")]
        {
            world.apply(Command::SetNodeFlags {
                node: "a".to_string(),
                cordoned,
                draining,
            });
            let created = world.apply(Command::CreateInstances {
                instances: vec![NewInstance {
                    id: Uuid::from_u128(u128::from(draining) + 100),
                    tier: "web".to_string(),
                    node: "a".to_string(),
                    ..Default::default()
                }],
                reason: "test".to_string(),
            });
            assert_eq!(created, CommandResult::Changed { count: 0 });
            assert!(world.state.instances.is_empty());
            let last = world.state.events.back().map(|event| event.message.clone());
            assert!(
                last.as_deref().is_some_and(|message| message.contains(why)),
                "{last:?}"
            );
        }
    }

    #[test]
    fn a_new_leader_grants_every_node_a_fresh_grace() {
        let mut world = World::new();
        world.node("a", "z1", 4.0);
        // The new leader has heard nothing yet, but took over only a second ago.
        world.observed.clear();
        world.now += 60_000;
        world.leader_since = world.now - 1_000;
        assert!(world.plan().is_empty());
        world.now += 2_500;
        assert!(matches!(
            world.plan().first(),
            Some(Command::SetNodeReady { ready: false, .. })
        ));
    }

    #[test]
    fn an_unhealthy_instance_is_drained_and_replaced() {
        let mut world = World::new();
        for node in ["a", "b"] {
            world.node(node, "z1", 4.0);
        }
        world.tier("web", 2, 4, serde_json::json!({}));
        world.settle(3);
        world.all_healthy();
        world.settle(3);
        let victim = world.live("web")[0].id;
        let node = world.state.instances[&victim]
            .node
            .clone()
            .unwrap_or_default();
        let reports: Vec<InstanceReport> = world
            .state
            .instances_on(&node)
            .map(|i| {
                let health = if i.id == victim {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                };
                report(i.id, Phase::Running, health)
            })
            .collect();
        world.heartbeat(&node, reports);
        world.settle(4);
        assert_eq!(world.state.instances[&victim].phase, Phase::Stopping);
        assert_eq!(world.live("web").len(), 2);
        assert!(world.live("web").iter().all(|i| i.id != victim));
    }

    #[test]
    fn a_template_change_rolls_with_a_surge_of_one_and_no_lost_capacity() {
        let mut world = World::new();
        for node in ["a", "b", "c"] {
            world.node(node, "z1", 8.0);
        }
        world.tier("web", 3, 10, serde_json::json!({}));
        world.settle(3);
        world.all_healthy();
        world.settle(3);
        let old: Vec<Uuid> = world.live("web").iter().map(|i| i.id).collect();
        world.tier(
            "web",
            3,
            10,
            serde_json::json!({"template": {"driver": "process", "command": ["app", "--v2"]}}),
        );
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 30, "the rollout did not finish");
            let commands = world.plan();
            for command in commands {
                world.apply(command);
            }
            let live = world.live("web");
            let ready = live
                .iter()
                .filter(|i| i.phase == Phase::Running && i.health == Health::Healthy)
                .count();
            assert!(live.len() <= 4, "surge above one: {}", live.len());
            assert!(ready >= 3, "ready capacity dropped to {ready}");
            if live.iter().all(|i| i.generation == 2) && live.len() == 3 && ready == 3 {
                break;
            }
            world.now += 500;
            world.all_healthy();
        }
        assert!(world.live("web").iter().all(|i| !old.contains(&i.id)));
    }

    #[test]
    fn a_rollout_without_surge_takes_one_down_at_a_time() {
        let mut world = World::new();
        world.node("a", "z1", 1.5);
        world.tier("web", 3, 10, serde_json::json!({}));
        world.settle(3);
        world.all_healthy();
        world.settle(3);
        // The node is full (3 x 0.5 CPU): only max_unavailable can make room.
        world.tier(
            "web",
            3,
            10,
            serde_json::json!({
                "template": {"driver": "process", "command": ["app", "--v2"]},
                "rollout": {"max_surge": 0, "max_unavailable": 1},
            }),
        );
        for _ in 0..30 {
            for command in world.plan() {
                world.apply(command);
            }
            let live = world.live("web");
            assert!(live.len() <= 3, "surged without permission");
            let ready = live.iter().filter(|i| i.phase == Phase::Running).count();
            assert!(ready >= 2, "more than one unavailable");
            if live.len() == 3
                && live
                    .iter()
                    .all(|i| i.generation == 2 && i.phase == Phase::Running)
            {
                return;
            }
            world.now += 500;
            // Draining instances stop; the rest report healthy.
            world.all_healthy();
            let node = "a".to_string();
            let draining: Vec<Uuid> = world
                .state
                .instances_on(&node)
                .filter(|i| matches!(i.phase, Phase::Draining | Phase::Stopping))
                .map(|i| i.id)
                .collect();
            if let Some(observation) = world.observed.get_mut(&node).map(Arc::make_mut) {
                for id in draining {
                    observation
                        .reports
                        .push(report(id, Phase::Terminated, Health::Unknown));
                }
            }
        }
        panic!("the rollout did not finish");
    }

    #[test]
    fn draining_a_node_moves_its_instances_and_cordon_stops_placement() {
        let mut world = World::new();
        for node in ["a", "b"] {
            world.node(node, "z1", 8.0);
        }
        world.tier("web", 2, 10, serde_json::json!({}));
        world.settle(3);
        world.all_healthy();
        world.settle(3);
        world.apply(Command::SetNodeFlags {
            node: "a".to_string(),
            cordoned: true,
            draining: true,
        });
        for _ in 0..10 {
            world.settle(1);
            world.now += 500;
            world.all_healthy();
        }
        assert_eq!(
            world.per_node("web"),
            BTreeMap::from([("b".to_string(), 2)])
        );
        // Uncordoned: new instances may go to a again.
        world.apply(Command::SetNodeFlags {
            node: "a".to_string(),
            cordoned: false,
            draining: false,
        });
        world.apply(Command::ScaleTier {
            name: "web".to_string(),
            desired: 4,
            expected_version: None,
        });
        world.settle(3);
        assert_eq!(world.per_node("web").get("a"), Some(&2));
    }

    #[test]
    fn labels_zones_and_room_decide_placement() {
        let mut world = World::new();
        world.node("a", "z1", 1.0);
        world.node("b", "z1", 1.0);
        world.node("c", "z2", 1.0);
        world.tier(
            "web",
            4,
            10,
            serde_json::json!({"placement": {"spread": "zone", "node_labels": {"disk": "ssd"}}}),
        );
        world.settle(3);
        // 0.5 CPU each on 1-CPU nodes: two fit per node; zone spread puts two in z2.
        let per_node = world.per_node("web");
        assert_eq!(per_node.get("c"), Some(&2), "{per_node:?}");
        assert_eq!(world.live("web").len(), 4);
        // No room for more: the tier records Unschedulable once, not every round.
        world.apply(Command::ScaleTier {
            name: "web".to_string(),
            desired: 8,
            expected_version: None,
        });
        world.settle(3);
        assert_eq!(world.live("web").len(), 6);
        let unschedulable = world
            .state
            .events
            .iter()
            .filter(|e| e.reason == "Unschedulable")
            .count();
        assert_eq!(unschedulable, 1);
        // A label nobody has: nothing is placed.
        world.tier(
            "gpu",
            1,
            2,
            serde_json::json!({"placement": {"node_labels": {"gpu": "yes"}}}),
        );
        world.settle(2);
        assert!(world.live("gpu").is_empty());
    }

    #[test]
    fn failing_instances_back_off() {
        let mut world = World::new();
        world.node("a", "z1", 8.0);
        world.tier("broken", 2, 4, serde_json::json!({}));
        for _ in 0..10 {
            world.settle(1);
            let reports: Vec<InstanceReport> = world
                .state
                .instances
                .values()
                .filter(|i| i.phase.is_live())
                .map(|i| InstanceReport {
                    reason: Some("exec: no such file".to_string()),
                    ..report(i.id, Phase::Failed, Health::Unknown)
                })
                .collect();
            world.heartbeat("a", reports);
            world.now += 200;
        }
        let failed = world
            .state
            .instances
            .values()
            .filter(|i| i.phase == Phase::Failed)
            .count();
        assert!(failed <= 4, "kept creating failing instances: {failed}");
        assert!(world.state.events.iter().any(|e| e.reason == "BackingOff"));
    }

    // -----------------------------------------------------------------------------------
    // Pools: drains end when every load balancer has finished the instance's sessions.

    impl World {
        fn lb_node(&mut self, id: &str) {
            self.apply(Command::RegisterNode {
                registration: RegisterRequest {
                    node_id: id.to_string(),
                    address: "127.0.0.9".to_string(),
                    zone: None,
                    labels: BTreeMap::new(),
                    capacity: Resources {
                        cpu: 1.0,
                        memory_mb: 512,
                    },
                    agent_version: "test".to_string(),
                    roles: vec![NodeRole::LoadBalancer],
                },
                auth: None,
                max_nodes: None,
            });
            self.heartbeat(id, Vec::new());
        }

        /// `node` reports serving `tier`'s pool at `version`, with `sessions` open on each
        /// listed instance (and none on the others).
        fn lb_report(&mut self, node: &str, tier: &str, version: u64, sessions: &[(Uuid, u64)]) {
            let report = LbReport {
                worker_pid: Some(1),
                reloads: 0,
                tiers: vec![strata_api::LbTierReport {
                    tier: tier.to_string(),
                    version,
                    error: None,
                    stats: strata_api::LbStats::default(),
                    servers: sessions
                        .iter()
                        .map(|(id, sessions)| strata_api::LbServerReport {
                            instance_id: *id,
                            status: "DRAIN".to_string(),
                            stats: strata_api::LbStats {
                                sessions: *sessions,
                                ..strata_api::LbStats::default()
                            },
                        })
                        .collect(),
                }],
            };
            let observation = Arc::make_mut(self.observed.entry(node.to_string()).or_default());
            observation.last_seen_ms = self.now;
            observation.lb = Some(report);
        }

        fn pool(&self, tier: &str) -> strata_api::Pool {
            let index = crate::views::TierIndex::of(&self.state);
            crate::views::pool_of(&index, &self.state.tiers[tier])
                .unwrap_or_else(|| panic!("tier {tier} has no pool"))
        }

        /// Two healthy instances of `web` behind a load balancer `lb` that serves their pool.
        fn balanced_tier(&mut self) -> (Uuid, Uuid) {
            self.node("a", "z1", 4.0);
            self.lb_node("lb");
            self.tier(
                "web",
                1,
                4,
                serde_json::json!({"load_balancer": {"listen": "0.0.0.0:8080", "drain_timeout": "30s"}}),
            );
            self.scale(2);
            self.settle(3);
            self.all_healthy();
            self.settle(3);
            let pool = self.pool("web");
            assert_eq!(pool.servers.len(), 2, "{pool:?}");
            assert!(pool
                .servers
                .iter()
                .all(|s| s.state == strata_api::ServerState::Ready));
            let version = pool.version;
            self.lb_report("lb", "web", version, &[]);
            (pool.servers[0].instance_id, pool.servers[1].instance_id)
        }

        /// The agent of `a` reports everything it still runs (draining instances too) as
        /// Running and healthy.
        fn keep_running(&mut self) {
            let reports = self
                .state
                .instances_on("a")
                .filter(|i| i.phase.is_live() || i.phase == Phase::Draining)
                .map(|i| report(i.id, Phase::Running, Health::Healthy))
                .collect();
            self.heartbeat("a", reports);
        }

        fn scale(&mut self, desired: u32) {
            self.apply(Command::ScaleTier {
                name: "web".to_string(),
                desired,
                expected_version: None,
            });
        }
    }

    #[test]
    fn scale_in_drains_through_the_pool_and_stops_only_when_no_session_is_left() {
        let mut world = World::new();
        let (first, second) = world.balanced_tier();
        world.now += 1000;
        world.scale(1);
        world.settle(3);
        let victim = world
            .state
            .instances
            .values()
            .find(|i| i.phase == Phase::Draining)
            .map(|i| i.id)
            .unwrap_or_else(|| panic!("nothing drains: {:?}", world.state.instances));
        assert!(victim == first || victim == second);
        // In the pool as `drain`, and still assigned to its node: it keeps running.
        let pool = world.pool("web");
        let server = pool.servers.iter().find(|s| s.instance_id == victim);
        assert_eq!(
            server.map(|s| s.state),
            Some(strata_api::ServerState::Drain)
        );
        let assigned = crate::views::assignments_of(&world.state, "a").unwrap_or_default();
        assert!(assigned.iter().any(|a| a.instance_id == victim));

        // The balancer has not applied the new pool yet, then has but a session is open.
        world.lb_report("lb", "web", pool.version - 1, &[]);
        assert!(
            world.plan().is_empty(),
            "ended a drain the balancer had not applied"
        );
        world.lb_report("lb", "web", pool.version, &[(victim, 2)]);
        assert!(world.plan().is_empty(), "ended a drain with sessions open");

        // The sessions finish: the drain ends, and the agent is told to stop it.
        world.lb_report("lb", "web", pool.version, &[(victim, 0)]);
        let commands = world.plan();
        assert_eq!(
            commands,
            vec![Command::UpdateInstances {
                updates: vec![InstanceUpdate {
                    id: victim,
                    event: Some(InstanceEvent::DrainEnded),
                    health: None,
                    port: None,
                    reason: Some("no session left on its 1 load balancer(s) after 0s".to_string()),
                    ..Default::default()
                }]
            }]
        );
        for command in commands {
            world.apply(command);
        }
        assert_eq!(world.state.instances[&victim].phase, Phase::Stopping);
        assert!(world
            .pool("web")
            .servers
            .iter()
            .all(|s| s.instance_id != victim));
        let assigned = crate::views::assignments_of(&world.state, "a").unwrap_or_default();
        assert!(assigned.iter().all(|a| a.instance_id != victim));
        assert!(world.pool("web").version > pool.version);
    }

    #[test]
    fn a_drain_ends_at_its_timeout_even_with_sessions_open() {
        let mut world = World::new();
        world.balanced_tier();
        world.scale(1);
        world.settle(3);
        let pool = world.pool("web");
        let victim = pool
            .servers
            .iter()
            .find(|s| s.state == strata_api::ServerState::Drain)
            .map(|s| s.instance_id)
            .unwrap_or_else(|| panic!("no drain in {pool:?}"));
        world.now += 29_000;
        world.keep_running();
        world.lb_report("lb", "web", pool.version, &[(victim, 5)]);
        let commands = world.plan();
        assert!(commands.is_empty(), "{commands:?}");
        world.now += 1_000;
        world.keep_running();
        world.lb_report("lb", "web", pool.version, &[(victim, 5)]);
        world.settle(2);
        assert_eq!(world.state.instances[&victim].phase, Phase::Stopping);
        assert_eq!(
            world.state.instances[&victim].reason.as_deref(),
            Some("its drain timeout (30s) passed")
        );
    }

    #[test]
    fn a_new_leader_ends_no_drain_before_it_hears_from_the_balancers() {
        let mut world = World::new();
        world.balanced_tier();
        world.scale(1);
        world.settle(3);
        // A new leader: no heartbeat memory at all.
        world.observed.clear();
        world.leader_since = world.now;
        world.now += 1_000;
        let commands = world.plan();
        assert!(
            !commands
                .iter()
                .any(|c| matches!(c, Command::UpdateInstances { .. })),
            "{commands:?}"
        );
    }

    #[test]
    fn instances_without_a_load_balancer_or_never_ready_end_their_drain_at_once() {
        let mut world = World::new();
        world.node("a", "z1", 4.0);
        world.lb_node("lb");
        world.tier(
            "web",
            0,
            4,
            serde_json::json!({"load_balancer": {"listen": "0.0.0.0:8080"}}),
        );
        world.scale(2);
        world.settle(2);
        // Never became ready: nothing to finish.
        world.scale(0);
        world.settle(3);
        assert!(world
            .state
            .instances
            .values()
            .all(|i| i.phase == Phase::Stopping));
    }

    #[test]
    fn frontend_failures_are_recorded_once_and_their_end_too() {
        let mut world = World::new();
        world.balanced_tier();
        let version = world.pool("web").version;
        let failing = |world: &mut World, error: Option<&str>| {
            world.lb_report("lb", "web", version, &[]);
            if let Some(lb) = world
                .observed
                .get_mut("lb")
                .and_then(|o| Arc::make_mut(o).lb.as_mut())
            {
                lb.tiers[0].error = error.map(str::to_string);
            }
        };
        let lb_events = |world: &World| -> Vec<String> {
            world
                .state
                .events
                .iter()
                .filter(|e| e.reason.starts_with("LoadBalancer"))
                .map(|e| format!("{}: {}", e.reason, e.message))
                .collect()
        };
        world.settle(2);
        failing(&mut world, Some("cannot bind 0.0.0.0:8080: address in use"));
        world.settle(3);
        failing(&mut world, None);
        world.settle(3);
        assert_eq!(
            lb_events(&world),
            [
                "LoadBalancerServing: served on 0.0.0.0:8080 by 1 load balancer(s)",
                "LoadBalancerFailed: frontend not served: lb: cannot bind 0.0.0.0:8080: address in use",
                "LoadBalancerServing: served on 0.0.0.0:8080 by 1 load balancer(s)",
            ]
        );
        let index = crate::views::TierIndex::of(&world.state);
        let view =
            crate::views::tier_view(&world.state, &index, &world.state.tiers["web"], world.now);
        let condition = view
            .status
            .conditions
            .iter()
            .find(|c| c.condition_type == "LoadBalancerReady")
            .map(|c| c.status);
        assert_eq!(condition, Some(true));
        assert_eq!(view.status.endpoints, ["127.0.0.9:8080"]);
    }

    /// Placement as it was first written: every node compared with every other.
    fn choose_node_by_scan<'a>(
        state: &'a State,
        tier: &Tier,
        reservations: &Reservations<'_>,
        spread: &BTreeMap<String, usize>,
    ) -> Option<&'a NodeRecord> {
        let template = &tier.spec.template;
        state
            .nodes
            .values()
            .filter(|node| eligible(tier, node))
            .filter(|node| reservations.fits(node, template.cpu, template.memory_mb))
            .min_by(|a, b| {
                let key = |node: &NodeRecord| {
                    (
                        spread.get(spread_key(tier, node)).copied().unwrap_or(0),
                        reservations.load(node),
                    )
                };
                key(a).cmp(&key(b)).then(a.id.cmp(&b.id))
            })
    }

    proptest::proptest! {
        /// The walk in load order chooses exactly the node a scan of every node chooses, for
        /// any mix of capacities, zones, cordons, labels, earlier placements and spread.
        #[test]
        fn placement_by_load_order_matches_a_full_scan(
            nodes in proptest::collection::vec(
                (0usize..3, proptest::sample::select(vec![0.5f64, 1.0, 1.5, 4.0]), 0u8..8),
                1..24,
            ),
            earlier in 0u32..30,
            zone_spread in proptest::bool::ANY,
            labelled in proptest::bool::ANY,
            placements in 1usize..30,
        ) {
            let mut world = World::new();
            for (n, (zone, cpu, flags)) in nodes.iter().enumerate() {
                let id = format!("n{n:02}");
                world.node(&id, &format!("z{zone}"), *cpu);
                if *flags == 1 {
                    world.apply(Command::SetNodeFlags { node: id.clone(), cordoned: true, draining: false });
                }
                if *flags == 2 {
                    world.apply(Command::SetNodeFlags { node: id.clone(), cordoned: false, draining: true });
                }
                if *flags == 3 {
                    world.apply(Command::SetNodeReady { node: id.clone(), ready: false, reason: "test".to_string() });
                }
            }
            // Other instances already reserve room unevenly.
            world.tier("other", 0, 40, serde_json::json!({}));
            world.apply(Command::ScaleTier { name: "other".to_string(), desired: earlier, expected_version: None });
            world.settle(2);
            let mut placement = serde_json::json!({"spread": if zone_spread { "zone" } else { "node" }});
            if labelled {
                placement["node_labels"] = serde_json::json!({"disk": "ssd"});
            }
            world.tier("web", 0, 40, serde_json::json!({"placement": placement}));
            world.apply(Command::ScaleTier { name: "web".to_string(), desired: 3, expected_version: None });
            world.settle(1);
            let state = &world.state;
            let tier = &state.tiers["web"];
            let index = RoundIndex::of(state);
            let mut reservations = Reservations::of(state, &index);
            let mut spread = spread_counts(state, &index, tier);
            let eligible_nodes = Eligible::of(state, tier);
            for _ in 0..placements {
                let fast = choose_node(tier, &reservations, &spread, &eligible_nodes);
                let scanned = choose_node_by_scan(state, tier, &reservations, &spread);
                proptest::prop_assert_eq!(fast.map(|n| &n.id), scanned.map(|n| &n.id));
                let Some(node) = fast else { break };
                reservations.reserve(node, tier.spec.template.cpu, tier.spec.template.memory_mb);
                *spread.entry(spread_key(tier, node).to_string()).or_default() += 1;
            }
        }
    }

    /// Reports joined to a node's instances as first written: a binary search per report and
    /// per instance.
    fn report_updates_by_search(
        on_node: &[&Instance],
        reports: &[&InstanceReport],
        heard_at: u64,
        config: &PlanConfig,
    ) -> Vec<InstanceUpdate> {
        let mut updates = Vec::new();
        for report in reports {
            let Ok(position) = on_node.binary_search_by_key(&report.id, |instance| instance.id)
            else {
                continue;
            };
            let instance = on_node[position];
            if instance.phase.is_final() {
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
                    ..Default::default()
                });
            }
        }
        for &instance in on_node {
            if reports
                .binary_search_by_key(&instance.id, |report| report.id)
                .is_ok()
            {
                continue;
            }
            let unreported_for = heard_at.saturating_sub(instance.updated_at_ms);
            let (event, reason) = match instance.phase {
                Phase::Draining | Phase::Stopping if unreported_for > config.report_slack_ms => {
                    (InstanceEvent::Stopped, "stopped by its agent")
                }
                Phase::Starting | Phase::Running if unreported_for > config.report_slack_ms => {
                    (InstanceEvent::Failed, "no longer reported by its agent")
                }
                Phase::Pending if unreported_for > config.start_timeout_ms => {
                    (InstanceEvent::Failed, "its agent did not start it in time")
                }
                _ => continue,
            };
            updates.push(InstanceUpdate {
                id: instance.id,
                event: Some(event),
                health: None,
                port: None,
                reason: Some(reason.to_string()),
                ..Default::default()
            });
        }
        updates
    }

    const PHASES: [Phase; 8] = [
        Phase::Pending,
        Phase::Starting,
        Phase::Running,
        Phase::Draining,
        Phase::Stopping,
        Phase::Terminated,
        Phase::Failed,
        Phase::Lost,
    ];
    const HEALTHS: [Health; 3] = [Health::Unknown, Health::Healthy, Health::Unhealthy];

    proptest::proptest! {
        /// Joining a node's reports to its instances by one walk along both gives exactly the
        /// updates a binary search per report and per instance gives, for any mix of phases,
        /// health, ports, unreported and foreign instances, duplicate reports and report ages.
        #[test]
        fn report_join_by_walk_matches_binary_search(
            instances in proptest::collection::btree_map(
                0u128..40,
                (0usize..8, 0usize..3, proptest::option::of(0u16..3), 0u64..10_000),
                0..20,
            ),
            reports in proptest::collection::vec(
                (0u128..40, 0usize..8, 0usize..3, proptest::option::of(0u16..3), proptest::bool::ANY),
                0..24,
            ),
            heard_at in 0u64..100_000,
        ) {
            let instances: Vec<Instance> = instances
                .into_iter()
                .map(|(id, (phase, health, port, updated_at_ms))| Instance {
                    id: Uuid::from_u128(id),
                    tier: "web".to_string(),
                    provider: strata_api::Provider::default(),
                    node: Some("n1".to_string()),
                    provider_id: None,
                    address: None,
                    port,
                    subnet: None,
                    phase: PHASES[phase],
                    health: HEALTHS[health],
                    generation: 1,
                    reason: None,
                    created_at_ms: 0,
                    updated_at_ms: updated_at_ms * 10,
                    ready_at_ms: 0,
                    drain_started_ms: 0,
                    resource_version: 1,
                })
                .collect();
            let on_node: Vec<&Instance> = instances.iter().collect();
            let reports: Vec<InstanceReport> = reports
                .into_iter()
                .map(|(id, phase, health, port, reason)| InstanceReport {
                    id: Uuid::from_u128(id),
                    phase: PHASES[phase],
                    health: HEALTHS[health],
                    port,
                    reason: reason.then(|| format!("report {id}")),
                    cpu_percent: 0.0,
                })
                .collect();
            let mut sorted: Vec<&InstanceReport> = reports.iter().collect();
            sorted.sort_by_key(|report| report.id);
            let config = PlanConfig {
                report_slack_ms: 3_000,
                start_timeout_ms: 60_000,
                ..PlanConfig::default()
            };
            let mut walked = Vec::new();
            report_updates(&on_node, &sorted, heard_at, &config, &mut walked);
            let searched = report_updates_by_search(&on_node, &sorted, heard_at, &config);
            proptest::prop_assert_eq!(walked, searched);
        }
    }

    proptest::proptest! {
        /// A tier the round skips (as many live instances as desired, none to replace) is one
        /// whose full plan is empty, and the pass's summary counts what a look at the tier's
        /// instances counts: for any mix of counts, template changes, unhealthy reports,
        /// silent agents, drained and cordoned nodes, and rounds settled or not.
        #[test]
        fn a_skipped_tier_is_one_whose_plan_is_empty(
            nodes in proptest::collection::vec(0u8..6, 1..6),
            tiers in proptest::collection::vec(
                (0u32..6, 0u32..6, proptest::bool::ANY),
                1..5,
            ),
            unhealthy in proptest::collection::vec(0usize..40, 0..4),
            silent in proptest::collection::vec(0usize..6, 0..2),
            rounds in 0usize..4,
        ) {
            let mut world = World::new();
            for (n, flags) in nodes.iter().enumerate() {
                world.node(&format!("n{n}"), if n % 2 == 0 { "z1" } else { "z2" }, 2.0);
                if *flags == 1 {
                    world.apply(Command::SetNodeFlags { node: format!("n{n}"), cordoned: true, draining: false });
                }
            }
            for (t, (first, _, _)) in tiers.iter().enumerate() {
                world.tier(&format!("t{t}"), 0, 10, serde_json::json!({}));
                world.apply(Command::ScaleTier { name: format!("t{t}"), desired: *first, expected_version: None });
            }
            world.settle(3);
            world.all_healthy();
            world.settle(3);
            // Then things change: counts, templates, health, drains, silence.
            for (t, (_, second, new_template)) in tiers.iter().enumerate() {
                world.apply(Command::ScaleTier { name: format!("t{t}"), desired: *second, expected_version: None });
                if *new_template {
                    world.tier(&format!("t{t}"), 0, 10, serde_json::json!({
                        "template": {"driver": "process", "command": ["app", "v2"], "cpu": 0.5, "memory_mb": 64},
                    }));
                }
            }
            for (n, flags) in nodes.iter().enumerate() {
                if *flags == 2 {
                    world.apply(Command::SetNodeFlags { node: format!("n{n}"), cordoned: false, draining: true });
                }
            }
            let live: Vec<Uuid> = world
                .state
                .instances
                .values()
                .filter(|instance| instance.phase.is_live())
                .map(|instance| instance.id)
                .collect();
            let sick: Vec<Uuid> = unhealthy.iter().filter_map(|i| live.get(*i).copied()).collect();
            let mut per_node: BTreeMap<String, Vec<InstanceReport>> = BTreeMap::new();
            for instance in world.state.instances.values().filter(|i| i.phase.is_live()) {
                let health = if sick.contains(&instance.id) { Health::Unhealthy } else { Health::Healthy };
                per_node
                    .entry(instance.node.clone().unwrap_or_default())
                    .or_default()
                    .push(report(instance.id, Phase::Running, health));
            }
            for (node, reports) in per_node {
                world.heartbeat(&node, reports);
            }
            for n in &silent {
                world.observed.remove(&format!("n{n}"));
            }
            world.now += 20_000;
            for _ in 0..rounds {
                for command in world.plan() {
                    world.apply(command);
                }
            }

            let state = &world.state;
            let index = RoundIndex::of(state);
            let config = PlanConfig::default();
            for (slot, tier) in state.tiers.values().enumerate() {
                let all = index.instances_of(tier.name());
                let live: Vec<&&Instance> = all.iter().filter(|i| i.phase.is_live()).collect();
                let to_replace = live
                    .iter()
                    .filter(|i| {
                        (i.phase == Phase::Running && i.health == Health::Unhealthy)
                            || i.generation < tier.generation
                            || i.node.as_deref().is_some_and(|node| state.nodes[node].draining)
                    })
                    .count();
                let summary = index.tier_summaries[slot];
                proptest::prop_assert_eq!(summary.live, live.len());
                proptest::prop_assert_eq!(summary.to_replace, to_replace);
                if summary.to_replace == 0 && summary.live == tier.status.desired as usize {
                    let mut reservations = None;
                    let planned = plan_tier(
                        state,
                        &index,
                        tier,
                        &config,
                        world.now,
                        &mut reservations,
                        &mut || Uuid::from_u128(1 << 100),
                    );
                    proptest::prop_assert!(planned.is_empty(), "{:?}", planned);
                }
            }
        }
    }

    proptest::proptest! {
        /// Whatever the node count, capacity and desired count, settling never places more
        /// than desired, never overcommits a node, and places everything that fits.
        #[test]
        fn settling_respects_desired_and_capacity(
            nodes in 1usize..5,
            cpu in proptest::sample::select(vec![0.5f64, 1.0, 2.0]),
            desired in 0u32..12,
        ) {
            let mut world = World::new();
            for n in 0..nodes {
                world.node(&format!("n{n}"), if n % 2 == 0 { "z1" } else { "z2" }, cpu);
            }
            world.tier("web", 0, 20, serde_json::json!({}));
            world.apply(Command::ScaleTier { name: "web".to_string(), desired, expected_version: None });
            world.settle(4);
            let live = world.live("web").len();
            let fit = nodes * (cpu / 0.5) as usize;
            proptest::prop_assert_eq!(live, (desired as usize).min(fit));
            for count in world.per_node("web").values() {
                proptest::prop_assert!((*count as f64) * 0.5 <= cpu + 1e-9);
            }
            // Settled: another round plans nothing but, at most, one Unschedulable record.
            let again = world.plan();
            let only_records = again.iter().all(|c| matches!(c, Command::RecordEvent { .. }));
            proptest::prop_assert!(only_records, "{:?}", again);
        }
    }
}

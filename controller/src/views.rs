//! Read models computed from the replicated state: tier and node views, a node's assignments,
//! and load-balancer pools. The HTTP API, the heartbeat answer, the planners and `/metrics`
//! all read through here, so each derived figure has one definition.
//!
//! Invariants:
//! - Pure functions of the replicated state (plus, where named, the leader's heartbeat data
//!   and the time); every node computes the same view from the same applied index.
//! - A pool lists an instance as `ready` only while it is Running and healthy, and as `drain`
//!   from the moment it starts draining until its drain ends (phase `Stopping`); an instance
//!   leaves its pool before its agent is told to stop it.

use std::collections::{BTreeSet, HashMap};

use strata_api::{
    Assignment, Condition, Health, HostMetrics, Instance, Node, NodeRole, NodeStatus, Phase, Pool,
    PoolServer, Resources, ServerState, Tier,
};

use crate::state::{NodeRecord, State};

/// How long a failed instance keeps its tier's `Degraded` condition up.
const DEGRADED_WINDOW_MS: u64 = 120_000;

/// Event reasons that say whether a tier's frontends serve; the latest one decides the
/// tier's `LoadBalancerReady` condition.
pub const LB_FAILED: &str = "LoadBalancerFailed";
pub const LB_SERVING: &str = "LoadBalancerServing";

/// Every instance of each tier, built once for views of many tiers.
pub struct TierIndex<'a> {
    /// The slot in `groups` of each tier name that instances carry. Keys are borrowed from
    /// `state.tiers` where the tier exists: 5,000 names stay in cache, where the names each
    /// instance holds are 100,000 allocations spread over the heap.
    slots: foldhash::HashMap<&'a str, usize>,
    /// Per slot: the tier name, the tier (`None` once deleted) and its instances in id order.
    /// Existing tiers come first, in name order (`state.tiers`' order), then deleted ones.
    groups: Vec<(&'a str, Option<&'a Tier>, Vec<&'a Instance>)>,
    /// The latest `LB_FAILED`/`LB_SERVING` event per tier: (reason, message, at).
    lb_events: HashMap<&'a str, (&'a str, &'a str, u64)>,
    /// The latest EC2 call event per tier (`reconcile::ec2::is_provider_event`).
    provider_events: HashMap<&'a str, (&'a str, &'a str, u64)>,
}

impl<'a> TierIndex<'a> {
    pub fn of(state: &'a State) -> Self {
        Self::visiting(state, |_, _, _| {})
    }

    /// The index, calling `visit` with each instance (in id order), its tier's slot and its
    /// tier (`None` when the tier no longer exists) on the way, so that a caller needing
    /// another per-instance index (the planners' by node) builds it in the same pass over
    /// the instances: at fleet scale each pass over 100,000 instances costs a cache miss or
    /// two per instance. An existing tier's slot is its position in `state.tiers`; a deleted
    /// tier's is above `state.tiers.len()`.
    pub fn visiting(
        state: &'a State,
        mut visit: impl FnMut(&'a Instance, usize, Option<&'a Tier>),
    ) -> Self {
        let mut slots: foldhash::HashMap<&str, usize> =
            foldhash::HashMap::with_capacity_and_hasher(state.tiers.len(), Default::default());
        let mut groups = Vec::with_capacity(state.tiers.len());
        for (name, tier) in &state.tiers {
            slots.insert(name.as_str(), groups.len());
            groups.push((name.as_str(), Some(tier), Vec::new()));
        }
        for instance in state.instances.values() {
            let name = instance.tier.as_str();
            let slot = match slots.get(name) {
                Some(slot) => *slot,
                None => {
                    slots.insert(name, groups.len());
                    groups.push((name, None, Vec::new()));
                    groups.len() - 1
                }
            };
            let (_, tier, instances) = &mut groups[slot];
            instances.push(instance);
            visit(instance, slot, *tier);
        }
        let mut lb_events = HashMap::new();
        let mut provider_events = HashMap::new();
        for event in &state.events {
            if crate::reconcile::ec2::is_provider_event(&event.reason) {
                if let Some(tier) = event.object.strip_prefix("tier/") {
                    provider_events.insert(
                        tier,
                        (event.reason.as_str(), event.message.as_str(), event.at_ms),
                    );
                }
            }
            if event.reason == LB_FAILED || event.reason == LB_SERVING {
                if let Some(tier) = event.object.strip_prefix("tier/") {
                    lb_events.insert(
                        tier,
                        (event.reason.as_str(), event.message.as_str(), event.at_ms),
                    );
                }
            }
        }
        TierIndex {
            slots,
            groups,
            lb_events,
            provider_events,
        }
    }

    pub fn instances_of(&self, tier: &str) -> &[&'a Instance] {
        self.slots
            .get(tier)
            .map_or(&[], |slot| self.groups[*slot].2.as_slice())
    }

    /// Every tier name that instances carry, with the tier (`None` when it no longer exists)
    /// and its instances.
    pub fn groups(
        &self,
    ) -> impl Iterator<Item = (&'a str, Option<&'a Tier>, &[&'a Instance])> + '_ {
        self.groups
            .iter()
            .filter(|(_, _, instances)| !instances.is_empty())
            .map(|(name, tier, instances)| (*name, *tier, instances.as_slice()))
    }

    /// The reason of the tier's latest load-balancer event, if any.
    pub fn last_lb_reason(&self, tier: &str) -> Option<&'a str> {
        self.lb_events.get(tier).map(|(reason, _, _)| *reason)
    }
}

/// A tier with the status fields derived at read time: current, ready, conditions and the LB
/// endpoints that serve it.
pub fn tier_view(state: &State, index: &TierIndex<'_>, tier: &Tier, now_ms: u64) -> Tier {
    let mut view = tier.clone();
    let mut current = 0;
    let mut ready = 0;
    let mut latest_failure: Option<&Instance> = None;
    for instance in index.instances_of(tier.name()) {
        if instance.phase.is_live() {
            current += 1;
        }
        if is_ready(instance) {
            ready += 1;
        }
        if instance.phase == Phase::Failed
            && now_ms.saturating_sub(instance.updated_at_ms) < DEGRADED_WINDOW_MS
            && latest_failure.is_none_or(|f| f.updated_at_ms < instance.updated_at_ms)
        {
            latest_failure = Some(instance);
        }
    }
    view.status.current = current;
    view.status.ready = ready;
    let desired = view.status.desired;
    view.status.conditions = vec![Condition {
        condition_type: "Ready".to_string(),
        status: ready >= desired,
        reason: if ready >= desired {
            "AllReady"
        } else {
            "Converging"
        }
        .to_string(),
        message: format!("{ready} of {desired} desired instances are ready"),
        since_ms: tier.updated_at_ms,
    }];
    if let Some(failed) = latest_failure {
        view.status.conditions.push(Condition {
            condition_type: "Degraded".to_string(),
            status: true,
            reason: "InstanceFailed".to_string(),
            message: format!(
                "instance {} failed: {}",
                failed.id,
                failed.reason.as_deref().unwrap_or("no reason given")
            ),
            since_ms: failed.updated_at_ms,
        });
    }
    if tier.spec.load_balancer.listen.is_some() {
        if let Some((reason, message, at_ms)) = index.lb_events.get(tier.name()) {
            view.status.conditions.push(Condition {
                condition_type: "LoadBalancerReady".to_string(),
                status: *reason == LB_SERVING,
                reason: (*reason).to_string(),
                message: (*message).to_string(),
                since_ms: *at_ms,
            });
        }
    }
    // EC2 tiers: whether the latest EC2 call for the tier succeeded.
    if let Some((reason, message, at_ms)) = index.provider_events.get(tier.name()) {
        let failed = *reason == crate::reconcile::ec2::EC2_CALL_FAILED;
        view.status.conditions.push(Condition {
            condition_type: "ProviderReady".to_string(),
            status: !failed,
            reason: (*reason).to_string(),
            message: (*message).to_string(),
            since_ms: *at_ms,
        });
    }
    let scaling = &tier.spec.scaling;
    if !scaling.policies.is_empty() || !scaling.schedules.is_empty() {
        let condition = match scaling.desired {
            Some(manual) => Condition {
                condition_type: "Autoscaling".to_string(),
                status: false,
                reason: "PausedByOperator".to_string(),
                message: format!(
                    "desired is set by hand to {manual}; `stratactl scale tier {} --auto` hands the count back to the autoscaler",
                    tier.name()
                ),
                since_ms: tier.updated_at_ms,
            },
            None => Condition {
                condition_type: "Autoscaling".to_string(),
                status: true,
                reason: "Active".to_string(),
                message: format!(
                    "the autoscaler decides the count, within {}..{}",
                    scaling.min, scaling.max
                ),
                since_ms: tier.updated_at_ms,
            },
        };
        view.status.conditions.push(condition);
    }
    view.status.endpoints = endpoints(state, tier);
    view
}

/// Running and healthy: what counts as ready and goes into pools as `ready`.
pub fn is_ready(instance: &Instance) -> bool {
    instance.phase == Phase::Running && instance.health == Health::Healthy
}

/// `host:port` of each Ready load-balancer node's frontend for `tier`, for DNS round robin: the
/// node's address when the tier listens on every address (`0.0.0.0:port`), else the listen
/// address itself (the same on every LB node). Sorted, without duplicates.
pub fn endpoints(state: &State, tier: &Tier) -> Vec<String> {
    let Some(listen) = tier.spec.load_balancer.listen else {
        return Vec::new();
    };
    let endpoints: BTreeSet<String> = state
        .nodes
        .values()
        .filter(|node| node.ready && node.has_role(NodeRole::LoadBalancer))
        .map(|node| {
            if listen.ip().is_unspecified() {
                if node.address.contains(':') {
                    format!("[{}]:{}", node.address, listen.port())
                } else {
                    format!("{}:{}", node.address, listen.port())
                }
            } else {
                listen.to_string()
            }
        })
        .collect();
    endpoints.into_iter().collect()
}

/// The pool of `tier`, or `None` when the tier has no load balancer (neither `listen` nor
/// `target_group_arn`).
pub fn pool_of(index: &TierIndex<'_>, tier: &Tier) -> Option<Pool> {
    let balancer = &tier.spec.load_balancer;
    if balancer.listen.is_none() && balancer.target_group_arn.is_none() {
        return None;
    }
    let mut servers: Vec<PoolServer> = index
        .instances_of(tier.name())
        .iter()
        .filter_map(|instance| {
            let state = pool_state(instance)?;
            Some(PoolServer {
                instance_id: instance.id,
                address: instance.address.clone()?,
                port: instance.port?,
                weight: balancer.weight,
                state,
            })
        })
        .collect();
    servers.sort_by_key(|server| server.instance_id);
    Some(Pool {
        tier: tier.name().to_string(),
        version: tier.status.pool_version.max(1),
        load_balancer: balancer.clone(),
        health: tier.spec.health.clone(),
        servers,
    })
}

/// An instance's place in its pool: `ready` while Running and healthy; `drain` while draining
/// after having served (an instance that never became ready has no connections to finish);
/// absent otherwise.
pub fn pool_state(instance: &Instance) -> Option<ServerState> {
    if is_ready(instance) {
        Some(ServerState::Ready)
    } else if instance.phase == Phase::Draining && instance.ready_at_ms > 0 {
        Some(ServerState::Drain)
    } else {
        None
    }
}

/// Every pool HAProxy serves (tiers with `listen`), in tier name order: the LB agents' feed.
/// Target-group pools are the EC2 executor's (`reconcile::ec2`).
pub fn pools(state: &State) -> Vec<Pool> {
    let index = TierIndex::of(state);
    state
        .tiers
        .values()
        .filter(|tier| tier.spec.load_balancer.listen.is_some())
        .filter_map(|tier| pool_of(&index, tier))
        .collect()
}

/// The instances `node` must run, or `None` when the node is not registered. A draining
/// instance keeps running (its load balancers finish its sessions) until its drain ends.
pub fn assignments_of(state: &State, node: &str) -> Option<Vec<Assignment>> {
    if !state.nodes.contains_key(node) {
        return None;
    }
    Some(
        state
            .instances_on(node)
            .filter(|instance| instance.phase.is_live() || instance.phase == Phase::Draining)
            .filter_map(|instance| {
                let tier = state.tiers.get(&instance.tier)?;
                Some(Assignment {
                    instance_id: instance.id,
                    tier: instance.tier.clone(),
                    template: tier.spec.template.clone(),
                    health: tier.spec.health.clone(),
                })
            })
            .collect(),
    )
}

/// A node as the API shows it: the replicated record, allocatable capacity, and the leader's
/// heartbeat data (`heard`: last heartbeat and metrics, when known).
pub fn node_view(state: &State, record: &NodeRecord, heard: Option<(u64, HostMetrics)>) -> Node {
    let mut used = Resources::default();
    for instance in state.instances_on(&record.id) {
        if instance.phase.is_final() {
            continue;
        }
        if let Some(tier) = state.tiers.get(&instance.tier) {
            used.cpu += tier.spec.template.cpu;
            used.memory_mb += tier.spec.template.memory_mb;
        }
    }
    let (last_heartbeat_ms, metrics) = heard.unwrap_or_default();
    Node {
        id: record.id.clone(),
        address: record.address.clone(),
        zone: record.zone.clone(),
        labels: record.labels.clone(),
        capacity: record.capacity,
        allocatable: Resources {
            cpu: (record.capacity.cpu - used.cpu).max(0.0),
            memory_mb: record.capacity.memory_mb.saturating_sub(used.memory_mb),
        },
        status: node_status(record),
        ready: record.ready,
        cordoned: record.cordoned,
        draining: record.draining,
        agent_version: record.agent_version.clone(),
        roles: record.roles.clone(),
        last_heartbeat_ms,
        metrics,
        registered_at_ms: record.registered_at_ms,
        ec2_instance: record.ec2_instance,
        resource_version: record.resource_version,
    }
}

/// Readiness first, then the operator's flags.
pub fn node_status(record: &NodeRecord) -> NodeStatus {
    if !record.ready {
        NodeStatus::NotReady
    } else if record.draining {
        NodeStatus::Draining
    } else if record.cordoned {
        NodeStatus::Cordoned
    } else {
        NodeStatus::Ready
    }
}

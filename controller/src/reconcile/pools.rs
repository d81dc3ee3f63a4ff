//! The pools planner: ends drains, and records what load balancers say of their frontends.
//!
//! Pools themselves are a read model (`views::pool_of`): nothing needs planning for an
//! instance to enter or leave one. What needs a decision is when a draining instance may be
//! stopped. It is the first of:
//! - it is in no pool to drain from: its tier is gone or has no load balancer, it never
//!   became ready, or no Ready load-balancer node exists (HAProxy tiers);
//! - its tier's `drain_timeout` has passed since it started draining;
//! - (target-group tiers) the EC2 executor saw the target group finish deregistering it;
//! - every Ready load-balancer node reports (in its latest heartbeat, leader memory) a pool
//!   version at least as new as the instance's last change — so HAProxy runs it as `drain` —
//!   and no session open on it.
//!
//! Guarantees: an instance that served traffic is stopped only after every load balancer has
//! stopped sending it new requests and finished its sessions, or after its drain timeout.
//! A new leader, which has heard from no load balancer yet, ends no drain early: it waits for
//! their reports (one heartbeat) or the timeout. Level-triggered: `DrainEnded` on an
//! instance that already left `Draining` changes nothing.

use strata_api::{Instance, NodeRole};

use super::{millis, Observed};
use crate::lifecycle::InstanceEvent;
use crate::state::{Command, InstanceUpdate, NodeRecord, State};
use crate::views::{pool_state, TierIndex, LB_FAILED, LB_SERVING};

/// Plans one round of drain endings and frontend events. `draining` holds the instances in
/// `Draining`, in id order.
pub fn plan(
    state: &State,
    index: &TierIndex<'_>,
    draining: &[&Instance],
    observed: &Observed<'_>,
    now_ms: u64,
) -> Vec<Command> {
    let balancers: Vec<&NodeRecord> = state
        .nodes
        .values()
        .filter(|node| node.ready && node.has_role(NodeRole::LoadBalancer))
        .collect();
    let mut commands = Vec::new();
    let ended: Vec<InstanceUpdate> = draining
        .iter()
        .filter_map(|instance| {
            let reason = drain_end(state, observed, &balancers, instance, now_ms)?;
            Some(InstanceUpdate {
                id: instance.id,
                event: Some(InstanceEvent::DrainEnded),
                health: None,
                port: None,
                reason: Some(reason),
                ..Default::default()
            })
        })
        .collect();
    if !ended.is_empty() {
        commands.push(Command::UpdateInstances { updates: ended });
    }
    commands.extend(frontend_events(state, index, observed, &balancers));
    commands
}

/// Why the drain of `instance` has ended, or `None` while it goes on.
fn drain_end(
    state: &State,
    observed: &Observed<'_>,
    balancers: &[&NodeRecord],
    instance: &Instance,
    now_ms: u64,
) -> Option<String> {
    let Some(tier) = state.tiers.get(&instance.tier) else {
        return Some("its tier was deleted, and its frontends with it".to_string());
    };
    let balancer = &tier.spec.load_balancer;
    if balancer.listen.is_none() && balancer.target_group_arn.is_none() {
        return Some("its tier has no load balancer to drain from".to_string());
    }
    if pool_state(instance).is_none() || instance.port.is_none() {
        return Some("it never served traffic".to_string());
    }
    let timeout = balancer.drain_timeout.as_millis();
    let draining_for = now_ms.saturating_sub(instance.drain_started_ms);
    let timed_out = draining_for >= timeout;
    if balancer.target_group_arn.is_some() {
        // The EC2 executor ends it once the target group has deregistered it
        // (`reconcile::ec2::plan_sync`); the timeout bounds a long deregistration delay.
        return timed_out.then(|| format!("its drain timeout ({}) passed", millis(timeout)));
    }
    if balancers.is_empty() {
        return Some("no load balancer serves its tier".to_string());
    }
    if timed_out {
        return Some(format!("its drain timeout ({}) passed", millis(timeout)));
    }
    for node in balancers {
        let report = observed
            .nodes
            .get(&node.id)
            .and_then(|observation| observation.lb.as_ref())?
            .tiers
            .iter()
            .find(|report| report.tier == instance.tier)?;
        if report.error.is_some() {
            // This balancer has no frontend for the tier, so nothing to finish there.
            continue;
        }
        if report.version < instance.resource_version {
            return None;
        }
        let sessions = report
            .servers
            .iter()
            .find(|server| server.instance_id == instance.id)
            .map_or(0, |server| server.stats.sessions);
        if sessions > 0 {
            return None;
        }
    }
    Some(format!(
        "no session left on its {} load balancer(s) after {}",
        balancers.len(),
        millis(draining_for)
    ))
}

/// A `LoadBalancerFailed` event when some load balancer cannot serve a tier's frontend (its
/// listen address is taken or not local there), and `LoadBalancerServing` once every one
/// serves it. Recorded only on a change, judged from the replicated events, so neither a
/// steady state nor a new leader records them again.
fn frontend_events(
    state: &State,
    index: &TierIndex<'_>,
    observed: &Observed<'_>,
    balancers: &[&NodeRecord],
) -> Vec<Command> {
    if balancers.is_empty() {
        return Vec::new();
    }
    let mut commands = Vec::new();
    for tier in state.tiers.values() {
        if tier.spec.load_balancer.listen.is_none() {
            continue;
        }
        let mut failures = Vec::new();
        let mut serving = 0;
        for node in balancers {
            let report = observed
                .nodes
                .get(&node.id)
                .and_then(|observation| observation.lb.as_ref())
                .and_then(|lb| lb.tiers.iter().find(|report| report.tier == tier.name()));
            if let Some(report) = report {
                match &report.error {
                    Some(error) => failures.push(format!("{}: {error}", node.id)),
                    None if report.version > 0 => serving += 1,
                    None => {}
                }
            }
        }
        let last = index.last_lb_reason(tier.name());
        let (reason, message) = if !failures.is_empty() {
            if last == Some(LB_FAILED) {
                continue;
            }
            (
                LB_FAILED,
                format!("frontend not served: {}", failures.join("; ")),
            )
        } else if serving == balancers.len() {
            if last == Some(LB_SERVING) {
                continue;
            }
            (
                LB_SERVING,
                format!(
                    "served on {} by {serving} load balancer(s)",
                    tier.spec
                        .load_balancer
                        .listen
                        .map(|listen| listen.to_string())
                        .unwrap_or_default()
                ),
            )
        } else {
            continue;
        };
        commands.push(Command::RecordEvent {
            object: format!("tier/{}", tier.name()),
            reason: reason.to_string(),
            message,
        });
    }
    commands
}

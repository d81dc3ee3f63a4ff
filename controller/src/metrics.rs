//! Prometheus text exposition of a node's Raft and state figures.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use openraft::ServerState;

use crate::node::Controller;

/// Renders the node's metrics in the Prometheus text format (version 0.0.4).
pub fn render(controller: &Controller) -> String {
    let metrics = controller.raft.metrics().borrow().clone();
    let tiers = controller.state.read(|machine| machine.state.tiers.len());
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        "strata_raft_term",
        "Current Raft term seen by this node.",
        metrics.current_term,
    );
    gauge(
        "strata_raft_is_leader",
        "1 when this node is the Raft leader.",
        u64::from(metrics.state == ServerState::Leader),
    );
    gauge(
        "strata_raft_leader_id",
        "Id of the leader this node knows (0: none).",
        metrics.current_leader.unwrap_or(0),
    );
    gauge(
        "strata_raft_last_log_index",
        "Index of the last entry in this node's log.",
        metrics.last_log_index.unwrap_or(0),
    );
    gauge(
        "strata_raft_applied_index",
        "Index of the last entry applied to the state machine.",
        metrics.last_applied.map_or(0, |id| id.index),
    );
    gauge(
        "strata_raft_snapshot_index",
        "Last log index covered by this node's newest snapshot.",
        metrics.snapshot.map_or(0, |id| id.index),
    );
    gauge(
        "strata_raft_log_bytes",
        "Bytes of request text in the log entries this node holds (since the last purge).",
        controller.log.bytes(),
    );
    let (snapshot_bytes, snapshot_micros) = controller.state.last_snapshot_build();
    gauge(
        "strata_snapshot_bytes",
        "Size of the last snapshot this node built.",
        snapshot_bytes,
    );
    gauge(
        "strata_snapshot_build_micros",
        "Time the last snapshot this node built took to encode and persist, in microseconds.",
        snapshot_micros,
    );
    gauge(
        "strata_raft_members",
        "Nodes in the current membership (voters and learners).",
        metrics.membership_config.membership().nodes().count() as u64,
    );
    gauge(
        "strata_tiers",
        "Tiers in the replicated state.",
        tiers as u64,
    );
    let now = crate::node::now_ms();
    gauge(
        "strata_heartbeat_lag_max_ms",
        "Longest time since a node's last heartbeat (leader only; 0 elsewhere).",
        controller.liveness.max_heartbeat_lag_ms(now),
    );
    let _ = writeln!(
        out,
        "# HELP strata_plan_micros The planners' time in a reconcile round (leader only): last and max.\n# TYPE strata_plan_micros gauge\nstrata_plan_micros{{round=\"last\"}} {}\nstrata_plan_micros{{round=\"max\"}} {}",
        controller.liveness.plan_micros_last.load(Ordering::Relaxed),
        controller.liveness.plan_micros_max.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strata_plan_cpu_micros CPU time of the planners in the last reconcile round (leader only).\n# TYPE strata_plan_cpu_micros gauge\nstrata_plan_cpu_micros {}",
        controller
            .liveness
            .plan_cpu_micros_last
            .load(Ordering::Relaxed)
    );
    let liveness = &controller.liveness;
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "strata_reconcile_rounds_total",
        "Reconcile rounds run while this node led.",
        liveness.rounds.load(Ordering::Relaxed),
    );
    counter(
        "strata_reconcile_actions_total",
        "Commands the planners proposed.",
        liveness.actions.load(Ordering::Relaxed),
    );
    counter(
        "strata_reconcile_failures_total",
        "Proposed commands that failed.",
        liveness.failures.load(Ordering::Relaxed),
    );
    counter(
        "strata_heartbeats_total",
        "Agent heartbeats answered while this node led.",
        liveness.heartbeats.load(Ordering::Relaxed),
    );
    let forwarded = controller.forwarder.counts();
    counter(
        "strata_forwarded_writes_total",
        "Client writes this node forwarded to the leader.",
        forwarded.writes.load(Ordering::Relaxed),
    );
    counter(
        "strata_forward_requests_total",
        "Requests to the leader that carried the forwarded writes (several writes each under load).",
        forwarded.requests.load(Ordering::Relaxed),
    );
    let (nodes, instances, events) = controller.state.read(|machine| {
        let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
        for node in machine.state.nodes.values() {
            let status = crate::views::node_status(node);
            *nodes.entry(format!("{status:?}")).or_default() += 1;
        }
        let mut instances: BTreeMap<String, u64> = BTreeMap::new();
        for instance in machine.state.instances.values() {
            *instances
                .entry(format!("{:?}", instance.phase))
                .or_default() += 1;
        }
        (nodes, instances, machine.state.next_event_id)
    });
    let _ = writeln!(
        out,
        "# HELP strata_nodes Nodes by status.\n# TYPE strata_nodes gauge"
    );
    for status in ["Ready", "NotReady", "Cordoned", "Draining"] {
        let _ = writeln!(
            out,
            "strata_nodes{{status=\"{status}\"}} {}",
            nodes.get(status).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "# HELP strata_instances Instances by phase.\n# TYPE strata_instances gauge"
    );
    for (phase, count) in instances {
        let _ = writeln!(out, "strata_instances{{phase=\"{phase}\"}} {count}");
    }
    let _ = writeln!(out, "# HELP strata_events_total Events recorded (scaling decisions, node and instance changes).\n# TYPE strata_events_total counter\nstrata_events_total {events}");
    render_pools(controller, &mut out);
    render_autoscaler(controller, &mut out);
    out
}

/// Every tier's desired count (replicated state), and, on the leader, each autoscaled tier's
/// latest evaluation: every policy's metric value and recommendation, whether the tier is
/// paused, and the decisions this node committed by direction.
fn render_autoscaler(controller: &Controller, out: &mut String) {
    let desired: Vec<(String, u32)> = controller.state.read(|machine| {
        machine
            .state
            .tiers
            .values()
            .map(|tier| (tier.name().to_string(), tier.status.desired))
            .collect()
    });
    let _ = writeln!(
        out,
        "# HELP strata_tier_desired_instances The instance count a tier converges to.\n# TYPE strata_tier_desired_instances gauge"
    );
    for (tier, count) in &desired {
        let _ = writeln!(
            out,
            "strata_tier_desired_instances{{tier=\"{tier}\"}} {count}"
        );
    }
    let latest = controller.autoscaler.latest();
    let _ = writeln!(
        out,
        "# HELP strata_autoscaler_policy_value A policy's averaged metric at the latest evaluation (leader only; absent without data).\n# TYPE strata_autoscaler_policy_value gauge"
    );
    for (tier, (inputs, _)) in &latest {
        for (position, policy) in inputs.policies.iter().enumerate() {
            if let Some(value) = policy.value {
                let _ = writeln!(
                    out,
                    "strata_autoscaler_policy_value{{tier=\"{tier}\",policy=\"{position}\",metric=\"{}\"}} {value}",
                    policy.metric
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP strata_autoscaler_policy_recommendation The count a policy asked for at the latest evaluation (leader only; absent when it abstains).\n# TYPE strata_autoscaler_policy_recommendation gauge"
    );
    for (tier, (inputs, _)) in &latest {
        for (position, policy) in inputs.policies.iter().enumerate() {
            if let Some(count) = policy.recommendation {
                let _ = writeln!(
                    out,
                    "strata_autoscaler_policy_recommendation{{tier=\"{tier}\",policy=\"{position}\",metric=\"{}\"}} {count}",
                    policy.metric
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP strata_autoscaler_paused 1 when a tier's count is set by hand (leader only).\n# TYPE strata_autoscaler_paused gauge"
    );
    for (tier, (_, paused)) in &latest {
        let _ = writeln!(
            out,
            "strata_autoscaler_paused{{tier=\"{tier}\"}} {}",
            u64::from(*paused)
        );
    }
    let autoscaler = &controller.autoscaler;
    let _ = writeln!(
        out,
        "# HELP strata_autoscaler_decisions_total Autoscaler decisions this node committed while it led, by direction.\n# TYPE strata_autoscaler_decisions_total counter"
    );
    for (direction, counter) in [
        ("out", &autoscaler.scaled_out),
        ("in", &autoscaler.scaled_in),
    ] {
        let _ = writeln!(
            out,
            "strata_autoscaler_decisions_total{{direction=\"{direction}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP strata_autoscaler_evaluations_total Tier evaluations this node ran while it led.\n# TYPE strata_autoscaler_evaluations_total counter\nstrata_autoscaler_evaluations_total {}",
        autoscaler.evaluations.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strata_autoscaler_superseded_total Decisions refused at apply because the tier had moved since the evaluation.\n# TYPE strata_autoscaler_superseded_total counter\nstrata_autoscaler_superseded_total {}",
        autoscaler.superseded.load(Ordering::Relaxed)
    );
}

/// Per tier: the pool's version and its servers by state; per LB node (leader memory): the
/// version it serves, so a lagging balancer shows as a version behind.
fn render_pools(controller: &Controller, out: &mut String) {
    let pools = controller
        .state
        .read(|machine| crate::views::pools(&machine.state));
    let _ = writeln!(
        out,
        "# HELP strata_pool_version Revision of the last change of a tier's pool.\n# TYPE strata_pool_version gauge"
    );
    for pool in &pools {
        let _ = writeln!(
            out,
            "strata_pool_version{{tier=\"{}\"}} {}",
            pool.tier, pool.version
        );
    }
    let _ = writeln!(
        out,
        "# HELP strata_pool_servers Servers of a tier's pool by state.\n# TYPE strata_pool_servers gauge"
    );
    for pool in &pools {
        for state in [
            strata_api::ServerState::Ready,
            strata_api::ServerState::Drain,
        ] {
            let count = pool.servers.iter().filter(|s| s.state == state).count();
            let label = if state == strata_api::ServerState::Ready {
                "ready"
            } else {
                "drain"
            };
            let _ = writeln!(
                out,
                "strata_pool_servers{{tier=\"{}\",state=\"{label}\"}} {count}",
                pool.tier
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP strata_lb_served_version Pool version each LB node reports serving (leader only).\n# TYPE strata_lb_served_version gauge"
    );
    for (node, _, report) in controller.liveness.lb_reports() {
        for tier in &report.tiers {
            let _ = writeln!(
                out,
                "strata_lb_served_version{{node=\"{node}\",tier=\"{}\"}} {}",
                tier.tier, tier.version
            );
        }
    }
}

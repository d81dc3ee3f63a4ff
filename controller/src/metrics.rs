//! Prometheus text exposition of a node's Raft and state figures.

use std::fmt::Write;

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
        "strata_raft_members",
        "Nodes in the current membership (voters and learners).",
        metrics.membership_config.membership().nodes().count() as u64,
    );
    gauge(
        "strata_tiers",
        "Tiers in the replicated state.",
        tiers as u64,
    );
    out
}

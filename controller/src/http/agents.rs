//! Agent upcalls under `/v1/agents`: registration (a Raft write, forwarded like any write) and
//! heartbeats (leader memory only). Authenticated with the join token.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use strata_api::{
    Assignment, HeartbeatRequest, HeartbeatResponse, Node, Phase, Problem, RegisterRequest,
};
use uuid::Uuid;

use super::api::{node_answer, JsonBody};
use super::ApiError;
use crate::node::{now_ms, Controller};
use crate::state::{Command, CommandResult};

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/v1/agents/register", post(register))
        .route("/v1/agents/heartbeat", post(heartbeat))
}

async fn register(
    State(controller): State<Arc<Controller>>,
    JsonBody(registration): JsonBody<RegisterRequest>,
) -> Result<Json<Node>, ApiError> {
    strata_api::validate::register(&registration).map_err(Problem::validation)?;
    let result = controller
        .propose(Command::RegisterNode { registration })
        .await?;
    match result {
        CommandResult::Node { node } => Ok(node_answer(&controller, &node)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            format!("registration produced {other:?}"),
        )),
    }
}

/// Records the heartbeat in the leader's memory and answers with the node's assignments.
/// A follower answers 421 with the leader's address, so the agent can talk to it directly.
async fn heartbeat(
    State(controller): State<Arc<Controller>>,
    JsonBody(request): JsonBody<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    strata_api::validate::heartbeat(&request).map_err(Problem::validation)?;
    if !controller.is_leader() {
        let mut problem = Problem::new(
            421,
            "not-leader",
            "Not the leader",
            "heartbeats go to the leader; retry there",
        );
        problem.leader = controller.leader().map(|(_, address)| address);
        return Err(ApiError(problem));
    }
    let node = request.node_id.clone();
    let reported_live: BTreeSet<Uuid> = request
        .instances
        .iter()
        .filter(|report| matches!(report.phase, Phase::Starting | Phase::Running))
        .map(|report| report.id)
        .collect();
    let Some(mut assignments) = assignments_of(&controller, &node) else {
        return Err(ApiError::not_found(format!(
            "node {node:?} is not registered; register first"
        )));
    };
    let changed = controller
        .liveness
        .record(&node, now_ms(), request.metrics, request.instances);
    if changed {
        controller.liveness.wake.notify_one();
    }
    // Long poll: while the node already runs exactly what it is assigned, hold the answer
    // until its assignments change or the wait ends (like Nomad's blocking queries), so new
    // work reaches the agent at once without short heartbeat intervals.
    let wait = Duration::from_millis(request.wait_ms.min(MAX_HEARTBEAT_WAIT_MS));
    let deadline = tokio::time::Instant::now() + wait;
    let signal = controller.liveness.signal(&node);
    loop {
        let in_sync = assignments
            .iter()
            .map(|assignment| assignment.instance_id)
            .collect::<BTreeSet<_>>()
            == reported_live;
        if !in_sync || tokio::time::Instant::now() >= deadline {
            break;
        }
        let notified = signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Re-read after arming the signal, so a change in between is not missed.
        assignments = assignments_of(&controller, &node).unwrap_or_default();
        let still_in_sync = assignments
            .iter()
            .map(|assignment| assignment.instance_id)
            .collect::<BTreeSet<_>>()
            == reported_live;
        if !still_in_sync {
            break;
        }
        tokio::select! {
            () = &mut notified => {
                assignments = assignments_of(&controller, &node).unwrap_or_default();
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(Json(HeartbeatResponse {
        assignments,
        pools: Vec::new(),
    }))
}

/// Longest a heartbeat answer may be held.
const MAX_HEARTBEAT_WAIT_MS: u64 = 10_000;

/// The instances `node` must run, or `None` when the node is not registered.
fn assignments_of(controller: &Controller, node: &str) -> Option<Vec<Assignment>> {
    controller.state.read(|machine| {
        let state = &machine.state;
        if !state.nodes.contains_key(node) {
            return None;
        }
        Some(
            state
                .instances_on(node)
                .filter(|instance| instance.phase.is_live())
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
    })
}

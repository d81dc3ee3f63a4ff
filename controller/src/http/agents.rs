//! Agent upcalls under `/v1/agents`: registration (a Raft write, forwarded like any write) and
//! heartbeats (leader memory only). Authenticated with the join token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use strata_api::{Assignment, HeartbeatRequest, HeartbeatResponse, Node, Problem, RegisterRequest};

use super::api::{node_view, JsonBody};
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
    controller.liveness.wake.notify_one();
    match result {
        CommandResult::Node { node } => Ok(Json(controller.state.read(|machine| {
            node_view(&controller, &machine.state, &node)
        }))),
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
    let assignments = controller.state.read(|machine| {
        let state = &machine.state;
        if !state.nodes.contains_key(&request.node_id) {
            return None;
        }
        Some(
            state
                .instances_on(&request.node_id)
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
                .collect::<Vec<_>>(),
        )
    });
    let Some(assignments) = assignments else {
        return Err(ApiError::not_found(format!(
            "node {:?} is not registered; register first",
            request.node_id
        )));
    };
    let changed = controller.liveness.record(
        &request.node_id,
        now_ms(),
        request.metrics,
        request.instances,
    );
    if changed {
        controller.liveness.wake.notify_one();
    }
    Ok(Json(HeartbeatResponse { assignments }))
}

//! Peer routes under `/raft`: Raft RPCs from other nodes, and writes, read-index requests and
//! membership changes forwarded by followers to the leader. Authenticated with the cluster
//! secret by `require_cluster_secret`.

use std::sync::Arc;

use axum::extract::{FromRequest, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;

use crate::network::routes;
use crate::node::{
    ClusterError, Controller, ForwardedWrite, LocalWriteError, MembershipFailure,
    MembershipRequest, ReadIndex, ReadIndexRequest,
};
use crate::raft_types::{NodeId, TypeConfig};
use crate::state::Command;

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route(routes::APPEND, post(append))
        .route(routes::VOTE, post(vote))
        .route(routes::SNAPSHOT, post(snapshot))
        .route(routes::WRITE_BATCH, post(write_batch))
        .route(routes::READ_INDEX, post(read_index))
        .route(routes::MEMBERS, post(members))
        .route(routes::LIVENESS, post(liveness))
        .route(routes::LB_REPORTS, post(lb_reports))
        .route(routes::CUSTOM_METRIC, post(custom_metric))
        .route(routes::PING, post(ping))
}

/// A JSON body from a peer. Unlike axum's `Json`, it decodes without `serde_path_to_error`:
/// peers send what this same code encoded, so a field path would help nobody, and tracking it
/// costs an allocation per field on every AppendEntries. A body that does not decode is a 400
/// with serde's message.
struct PeerJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for PeerJson<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        serde_json::from_slice(&bytes)
            .map(PeerJson)
            .map_err(|error| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("decode peer request: {error}"),
                )
                    .into_response()
            })
    }
}

async fn append(
    State(controller): State<Arc<Controller>>,
    PeerJson(request): PeerJson<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    let leader = request
        .vote
        .is_committed()
        .then(|| request.vote.leader_id().voted_for())
        .flatten();
    let answer = controller.raft.append_entries(request).await;
    // Accepted (whatever the log did): the sender leads this node's term.
    if let (Some(leader), Ok(response)) = (leader, &answer) {
        if !matches!(response, AppendEntriesResponse::HigherVote(_)) {
            controller.quorum.heard_from_leader(leader);
        }
    }
    Json(answer)
}

async fn vote(
    State(controller): State<Arc<Controller>>,
    PeerJson(request): PeerJson<VoteRequest<NodeId>>,
) -> Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Json(controller.raft.vote(request).await)
}

async fn snapshot(
    State(controller): State<Arc<Controller>>,
    PeerJson(request): PeerJson<InstallSnapshotRequest<TypeConfig>>,
) -> Json<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    Json(controller.raft.install_snapshot(request).await)
}

/// A follower forwarded client writes: propose each here if this node still leads, all at
/// once so that they share log entries, and answer one outcome per command, in order.
async fn write_batch(
    State(controller): State<Arc<Controller>>,
    PeerJson(commands): PeerJson<Vec<Command>>,
) -> Json<Vec<ForwardedWrite>> {
    let timeout = controller.write_timeout;
    let proposals = commands.into_iter().map(|command| {
        let controller = &controller;
        async move {
            match tokio::time::timeout(timeout, controller.propose_local(command)).await {
                Ok(Ok(result)) => ForwardedWrite::Applied(result),
                Ok(Err(LocalWriteError::NotLeader(leader))) => ForwardedWrite::NotLeader { leader },
                Ok(Err(LocalWriteError::Failed(error))) => {
                    ForwardedWrite::Failed(error.to_string())
                }
                Err(_) => ForwardedWrite::Failed(format!(
                    "the leader did not commit the write within {timeout:?}; its outcome is unknown"
                )),
            }
        }
    });
    Json(futures::future::join_all(proposals).await)
}

/// The leader's heartbeat memory, for a follower answering a node read. A node that does not
/// lead has none (its memory is dropped when leadership ends) and answers an empty map.
async fn liveness(
    State(controller): State<Arc<Controller>>,
) -> Json<std::collections::HashMap<String, (u64, strata_api::HostMetrics)>> {
    if controller.is_leader() {
        Json(controller.liveness.observations())
    } else {
        Json(Default::default())
    }
}

/// The leader's latest LB reports (node, heard at, report), for a follower answering a pool
/// read; empty on a node that does not lead.
async fn lb_reports(
    State(controller): State<Arc<Controller>>,
) -> Json<Vec<(String, u64, strata_api::LbReport)>> {
    if controller.is_leader() {
        Json(controller.liveness.lb_reports())
    } else {
        Json(Vec::new())
    }
}

/// A custom metric sample a follower forwarded: recorded here if this node leads.
async fn custom_metric(
    State(controller): State<Arc<Controller>>,
    PeerJson((tier, sample)): PeerJson<(String, strata_api::CustomMetricSample)>,
) -> Json<crate::autoscaler::MetricAnswer> {
    Json(crate::autoscaler::accept_metric(
        &controller,
        &tier,
        &sample,
    ))
}

async fn read_index(
    State(controller): State<Arc<Controller>>,
    Query(request): Query<ReadIndexRequest>,
) -> Json<ReadIndex> {
    Json(controller.read_index_for(&request).await)
}

async fn members(
    State(controller): State<Arc<Controller>>,
    PeerJson(request): PeerJson<MembershipRequest>,
) -> Json<Result<(), MembershipFailure>> {
    Json(
        controller
            .change_membership_local(request.change, request.retry)
            .await
            .map_err(|error| match error {
                ClusterError::NoLeader(_) => MembershipFailure::NotLeader,
                ClusterError::NotCaughtUp(detail) => MembershipFailure::NotCaughtUp(detail),
                other => MembershipFailure::Refused(other.to_string()),
            }),
    )
}

/// Answers a peer's quorum probe (`crate::quorum`) with this node's id, so a probe that
/// reached the wrong process does not count.
async fn ping(State(controller): State<Arc<Controller>>) -> Json<crate::quorum::Pong> {
    let (is_leader, current_leader) = {
        let metrics = controller.raft.metrics();
        let metrics = metrics.borrow();
        (
            metrics.state == openraft::ServerState::Leader,
            metrics.current_leader,
        )
    };
    Json(crate::quorum::Pong {
        node_id: controller.id,
        leading: is_leader && controller.quorum.has_quorum(),
        leader_contact: controller.quorum.leader_contact(is_leader, current_leader),
    })
}

//! Peer routes under `/raft`: Raft RPCs from other nodes, and writes, read-index requests and
//! membership changes forwarded by followers to the leader. Authenticated with the cluster
//! secret by `require_cluster_secret`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::network::routes;
use crate::node::{
    ClusterError, Controller, ForwardedWrite, LocalWriteError, MembershipFailure,
    MembershipRequest, ReadIndex,
};
use crate::raft_types::{NodeId, TypeConfig};
use crate::state::Command;

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route(routes::APPEND, post(append))
        .route(routes::VOTE, post(vote))
        .route(routes::SNAPSHOT, post(snapshot))
        .route(routes::WRITE, post(write))
        .route(routes::READ_INDEX, post(read_index))
        .route(routes::MEMBERS, post(members))
}

async fn append(
    State(controller): State<Arc<Controller>>,
    Json(request): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    Json(controller.raft.append_entries(request).await)
}

async fn vote(
    State(controller): State<Arc<Controller>>,
    Json(request): Json<VoteRequest<NodeId>>,
) -> Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Json(controller.raft.vote(request).await)
}

async fn snapshot(
    State(controller): State<Arc<Controller>>,
    Json(request): Json<InstallSnapshotRequest<TypeConfig>>,
) -> Json<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    Json(controller.raft.install_snapshot(request).await)
}

/// A follower forwarded a client write: propose it here if this node still leads.
async fn write(
    State(controller): State<Arc<Controller>>,
    Json(command): Json<Command>,
) -> Json<ForwardedWrite> {
    let timeout = controller.write_timeout;
    let outcome = tokio::time::timeout(timeout, controller.propose_local(command)).await;
    Json(match outcome {
        Ok(Ok(result)) => ForwardedWrite::Applied(result),
        Ok(Err(LocalWriteError::NotLeader(leader))) => ForwardedWrite::NotLeader { leader },
        Ok(Err(LocalWriteError::Failed(error))) => ForwardedWrite::Failed(error.to_string()),
        Err(_) => ForwardedWrite::Failed(format!(
            "the leader did not commit the write within {timeout:?}; its outcome is unknown"
        )),
    })
}

async fn read_index(State(controller): State<Arc<Controller>>) -> Json<ReadIndex> {
    Json(controller.local_read_index().await)
}

async fn members(
    State(controller): State<Arc<Controller>>,
    Json(request): Json<MembershipRequest>,
) -> Json<Result<(), MembershipFailure>> {
    Json(
        controller
            .change_membership_local(request.change, request.retry)
            .await
            .map_err(|error| match error {
                ClusterError::NoLeader(_) => MembershipFailure::NotLeader,
                other => MembershipFailure::Refused(other.to_string()),
            }),
    )
}

//! The controller cluster as `GET /v1/cluster` shows it, and member changes.

use serde::{Deserialize, Serialize};

/// A snapshot of this node's view of the Raft group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node_id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    pub leader_id: Option<u64>,
    pub term: u64,
    /// Highest log index this node knows to be committed.
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    /// Index of the newest snapshot on this node.
    pub snapshot_index: u64,
    pub members: Vec<Member>,
    /// Whether the answering node is in touch with a quorum of voters. Without one it refuses
    /// reads (except `?stale=true`) and writes with 503 `no-quorum`.
    #[serde(default = "has_quorum_by_default")]
    pub has_quorum: bool,
    /// Milliseconds since the answering node last had a quorum's contact.
    #[serde(default)]
    pub millis_since_quorum: u64,
}

fn has_quorum_by_default() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Member {
    pub id: u64,
    pub address: String,
    /// Voters elect leaders and count toward the quorum; learners only replicate.
    pub voter: bool,
}

/// Body of `POST /v1/cluster/members`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    pub id: u64,
    /// `host:port` of the new node's API listener.
    pub address: String,
    /// Promote to voter once caught up (default true); false keeps it a learner.
    #[serde(default = "default_true")]
    pub voter: bool,
}

fn default_true() -> bool {
    true
}

//! Nodes (agent hosts) and the instances the control plane runs on them, as the API shows them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pool::{LbReport, Pool};
use crate::tier::{HealthCheck, Provider, Template};

/// What a node is for. Registration names them; a node without roles is a worker.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Runs tier instances (process and qemu drivers).
    Worker,
    /// Runs a load balancer (HAProxy) that serves every tier's pool.
    LoadBalancer,
}

/// The default roles: a worker.
pub fn default_roles() -> Vec<NodeRole> {
    vec![NodeRole::Worker]
}

/// CPU and memory, as capacity or reservation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores.
    pub cpu: f64,
    pub memory_mb: u64,
}

/// What the control plane thinks of a node. Derived from readiness and the operator's
/// cordon/drain flags, in that order of precedence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum NodeStatus {
    /// Heartbeating and schedulable.
    Ready,
    /// Missed heartbeats for longer than the grace period.
    NotReady,
    /// Heartbeating; keeps its instances but gets no new ones.
    Cordoned,
    /// Heartbeating; its instances are being moved elsewhere.
    Draining,
}

/// Host measurements an agent sends with every heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostMetrics {
    /// Busy share of all CPUs over the last interval, 0 to 100.
    pub cpu_percent: f64,
    pub memory_total_mb: u64,
    pub memory_available_mb: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

/// An agent host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    /// The agent's `--node-id`, a DNS label.
    pub id: String,
    /// The IP instances on this node are reached at.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    /// Capacity minus what live instances on the node reserve.
    pub allocatable: Resources,
    pub status: NodeStatus,
    pub ready: bool,
    pub cordoned: bool,
    pub draining: bool,
    pub agent_version: String,
    /// What the node is for; only workers get instances, only load balancers get pools.
    #[serde(default = "default_roles")]
    pub roles: Vec<NodeRole>,
    /// Unix ms of the last heartbeat the answering node knows of (leader memory; 0 if unknown).
    pub last_heartbeat_ms: u64,
    #[serde(default)]
    pub metrics: HostMetrics,
    pub registered_at_ms: u64,
    /// The EC2 instance this node's agent runs on, when it registered with that instance's
    /// bootstrap token: it takes no instances, and is removed once the instance is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2_instance: Option<Uuid>,
    pub resource_version: u64,
}

/// The lifecycle of an instance.
///
/// `Pending → Starting → Running → Draining → Terminated`, with `Failed` (it could not start
/// or exited) and `Lost` (its node stopped heartbeating) as ends of their own.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum Phase {
    /// Placed on a node; the agent has not reported it yet.
    Pending,
    /// The agent started it; not yet healthy.
    Starting,
    Running,
    /// Leaving: load balancers send it no new requests (pool state `drain`) while it
    /// finishes what it has; it keeps running until its drain ends.
    Draining,
    /// Its drain ended: its agent stops it.
    Stopping,
    Terminated,
    Failed,
    Lost,
}

impl Phase {
    /// Phases in which the instance exists or will soon exist on its node.
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Pending | Phase::Starting | Phase::Running)
    }

    /// Phases from which there is no way back.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Terminated | Phase::Failed | Phase::Lost)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Health {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// One VM of a tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Instance {
    pub id: Uuid,
    pub tier: String,
    pub provider: Provider,
    /// The node it is placed on (local provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The provider's id for it (EC2 instance id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The EC2 subnet it is launched into (provider ec2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    pub phase: Phase,
    pub health: Health,
    /// The tier generation whose template it runs.
    pub generation: u64,
    /// Why it is in its phase, when that needs saying (a failure, a replacement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// When it last became Running and healthy (0: never).
    #[serde(default)]
    pub ready_at_ms: u64,
    /// When it started draining (0: it has not).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drain_started_ms: u64,
    pub resource_version: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// Something the control plane decided, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// The log index that recorded it; orders events.
    pub id: u64,
    pub at_ms: u64,
    /// The object it is about: `tier/web`, `node/host-1`, `instance/<uuid>`.
    pub object: String,
    /// A short CamelCase reason: `ScaledOut`, `NodeNotReady`, `InstanceReplaced`, ...
    pub reason: String,
    pub message: String,
    /// Autoscaler decisions (`ScaledOut`, `ScaledIn`): every input of the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Box<crate::tier::ScalingInputs>>,
}

// ---------------------------------------------------------------------------------------------
// Agent protocol

/// `POST /v1/agents/register`: an agent announces its node (authenticated by the join token,
/// or by the node's credential once it has one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"node_id": "host-1", "address": "127.0.0.1", "capacity": {"cpu": 2.0, "memory_mb": 2048}, "agent_version": "0.1.0"}))]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub node_id: String,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub agent_version: String,
    /// Absent: a worker.
    #[serde(default = "default_roles")]
    pub roles: Vec<NodeRole>,
}

/// The answer to `POST /v1/agents/register`: the node, and, when the agent registered with
/// the join token, the node's own credential. The agent keeps it (mode 0600 in its data dir)
/// and sends it as its bearer token from then on; the controllers keep only its digest, so
/// this is the one time it is ever shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Registration {
    #[serde(flatten)]
    pub node: Node,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// What an agent reports about one instance it runs (or ran).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceReport {
    pub id: Uuid,
    /// `Starting`, `Running`, `Failed` or `Terminated` (stopped and gone).
    pub phase: Phase,
    pub health: Health,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// CPU use as a share of the instance's reservation, 0 to 100 (may exceed 100).
    #[serde(default)]
    pub cpu_percent: f64,
}

/// `POST /v1/agents/heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"node_id": "host-1", "wait_ms": 0}))]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub node_id: String,
    #[serde(default)]
    pub metrics: HostMetrics,
    #[serde(default)]
    pub instances: Vec<InstanceReport>,
    /// Long poll: when the node already runs exactly what it is assigned, the leader may hold
    /// the answer up to this many milliseconds (at most 10,000) and answers as soon as the
    /// assignments change. 0 answers at once.
    #[serde(default)]
    pub wait_ms: u64,
    /// LB agents: the pools HAProxy serves and its statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<LbReport>,
}

/// One instance an agent must run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignment {
    pub instance_id: Uuid,
    pub tier: String,
    pub template: Template,
    pub health: HealthCheck,
}

/// The answer to a heartbeat: the complete set of instances the node must run. Anything else
/// the agent runs must be stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    pub assignments: Vec<Assignment>,
    /// LB nodes: every tier's pool, complete (a tier absent here has no frontend).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<Pool>,
}

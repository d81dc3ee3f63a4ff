//! The replicated state machine: a closed command enum and its deterministic `apply`.
//!
//! Invariants:
//! - `apply` reads no clock and no randomness: times come from `Request::at_ms`, stamped by the
//!   leader that proposed the command, so every replica computes the same state.
//! - An object's `resource_version` is the revision of the command that last changed it: a
//!   counter of applied commands kept in the state (`State::revision`), never below the log
//!   index of the entry that carried the command. Commands in one batched entry, also several
//!   writes to one object, get consecutive revisions, so versions of an object are unique and
//!   strictly increasing. Compare-and-set is decided here, at apply time, against the state at
//!   that position, so a retried write with the same precondition can never apply twice.
//! - Rejections (not found, conflict, invalid) are results, not errors: the entry is still
//!   applied (as a no-op) and every replica rejects it the same way.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use strata_api::{
    Event, FieldError, Health, Instance, NodeRole, Phase, Provider, RegisterRequest, Resources,
    ScalingDecision, ScalingInputs, Tier, TierSpec, TierStatus,
};
use uuid::Uuid;

use crate::lifecycle::{step, InstanceEvent};

/// Events kept in the replicated state; older ones are dropped first.
pub const EVENT_CAPACITY: usize = 2000;

/// A command with the time the leader stamped on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Unix milliseconds on the proposing leader.
    pub at_ms: u64,
    pub command: Command,
}

/// Every change of replicated state. Closed: adding a variant is a protocol change that every
/// node must understand before the leader may propose it.
///
/// Adjacently tagged (`{"type": "put_tier", "args": {...}}`) rather than internally: serde
/// decodes an internally tagged enum by buffering the whole object first (and a `Batch` of
/// them twice), while an adjacent tag that comes first, as serde writes it, lets the arguments
/// decode in place. Every entry is decoded on every follower, so this is on the write path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "args", rename_all = "snake_case")]
pub enum Command {
    /// Create or replace a tier. `spec.resource_version` is the compare-and-set precondition:
    /// `Some(0)` means "must not exist yet", `Some(v)` "must be at version v".
    PutTier {
        spec: Box<TierSpec>,
        /// The proposing node's `--max-tiers`: a new tier beyond it is refused. In the
        /// command, so that writes racing on several nodes cannot pass it together.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_tiers: Option<u64>,
    },
    DeleteTier {
        name: String,
        expected_version: Option<u64>,
    },
    /// Set the manual desired count, which pauses the tier's autoscaler.
    ScaleTier {
        name: String,
        desired: u32,
        expected_version: Option<u64>,
    },
    /// Hand the desired count back to the autoscaler (clears the manual count; the count
    /// stays where it is until the autoscaler decides otherwise).
    ResumeAutoscaling {
        name: String,
        expected_version: Option<u64>,
    },
    /// An autoscaler decision: `status.desired` goes from `from` to `to`. Applies only while
    /// the tier is still at `from` and not paused by a manual count, so a decision planned
    /// from a state that changed before it committed (an operator scaled, another leader
    /// decided) is rejected rather than applied over the newer count. Changes status only:
    /// the tier's `resource_version` (its spec's) stays, so an autoscaled tier does not make
    /// its operators' compare-and-set writes conflict.
    AutoscaleTier {
        name: String,
        from: u32,
        to: u32,
        inputs: Box<ScalingInputs>,
    },
    /// An agent announced its node (new, or after a restart with new facts).
    RegisterNode {
        registration: RegisterRequest,
        /// How the agent proved who it is. `None` in entries written before per-node
        /// credentials (and in planner tests): accepted, and the node's credential (if any)
        /// kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auth: Option<NodeAuth>,
        /// The proposing node's `--max-nodes`: a new node beyond it is refused. In the
        /// command, not in each node's flags, so every node decides alike.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_nodes: Option<u64>,
    },
    /// An operator revoked a node's credential: it no longer authenticates, and the agent
    /// must register again with the join token.
    RevokeNode { node: String },
    /// Forget a node that has nothing placed on it (the planner removes the node of an EC2
    /// instance that is gone).
    RemoveNode { node: String, reason: String },
    /// The leader saw a node's heartbeats stop (or resume). Instances on a node that becomes
    /// not ready are Lost.
    SetNodeReady {
        node: String,
        ready: bool,
        reason: String,
    },
    /// Operator flags: cordoned nodes get no new instances; draining nodes lose theirs.
    SetNodeFlags {
        node: String,
        cordoned: bool,
        draining: bool,
    },
    /// Place new instances (ids chosen by the leader, never by apply).
    CreateInstances {
        instances: Vec<NewInstance>,
        reason: String,
    },
    /// Lifecycle transitions and observations of existing instances.
    UpdateInstances { updates: Vec<InstanceUpdate> },
    /// Forget instances that reached a final phase long ago.
    RemoveInstances { ids: Vec<Uuid> },
    /// A decision that changes no object but must be on record (for example "no room").
    RecordEvent {
        object: String,
        reason: String,
        message: String,
    },
    /// Several client commands in one log entry, applied in order, each with its own result
    /// and its own revision (several may write the same object).
    Batch { commands: Vec<Command> },
}

/// How a registration was authenticated. Credentials are stored as SHA-256 hex digests only:
/// a snapshot or a log entry never holds one that works.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum NodeAuth {
    /// The join token. A new node (or one whose credential was revoked, or a record from
    /// before credentials) gets `credential_hash`; a node that holds a credential is not
    /// taken over: the registration is refused and recorded as an event.
    JoinToken { credential_hash: String },
    /// The node's own credential, whose digest this is: accepted while it is still the
    /// node's (a revocation applied in between makes it fail).
    Credential { credential_hash: String },
    /// EC2 instance `instance`'s bootstrap token: as `JoinToken`, for the node named after
    /// that instance only, while its record is an EC2 instance that is still wanted (judged
    /// here, at apply, so every node decides alike). The node records the instance.
    Bootstrap {
        credential_hash: String,
        instance: Uuid,
    },
}

/// One instance to create.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NewInstance {
    pub id: Uuid,
    pub tier: String,
    /// The agent node it runs on (provider local); empty for provider ec2.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// The subnet it is launched into (provider ec2), chosen by the planner so that a launch
    /// retried after a crash goes where the first attempt went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
}

/// One change to an instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceUpdate {
    pub id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<InstanceEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Why, for the instance's `reason` and the event log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Provider ec2: the EC2 instance id observed for it (set once; never changed after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// Provider ec2: its private address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A node as the replicated state knows it. Liveness (last heartbeat, metrics) lives in the
/// leader's memory, not here: heartbeats are not Raft writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub address: String,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub ready: bool,
    pub cordoned: bool,
    pub draining: bool,
    pub agent_version: String,
    /// What the node is for (older records: a worker).
    #[serde(default = "strata_api::default_roles")]
    pub roles: Vec<NodeRole>,
    pub registered_at_ms: u64,
    pub resource_version: u64,
    /// SHA-256 (hex) of the node's credential; `None` for records from before credentials
    /// and after a revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_hash: Option<String>,
    /// The EC2 instance whose agent this node is (it registered with that instance's
    /// bootstrap token): nothing is placed on it, and it is removed once the instance is
    /// gone and the node NotReady.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2_instance: Option<Uuid>,
}

impl NodeRecord {
    pub fn has_role(&self, role: NodeRole) -> bool {
        self.roles.contains(&role)
    }
}

/// The outcome of applying one entry.
/// Adjacently tagged for the same reason as `Command`: forwarded writes carry it back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "value", rename_all = "snake_case")]
pub enum CommandResult {
    /// Entries without a command (blank, membership) have no outcome.
    None,
    Tier {
        tier: Box<Tier>,
        created: bool,
    },
    Deleted {
        tier: Box<Tier>,
    },
    Node {
        node: Box<NodeRecord>,
    },
    /// How many objects a batch command changed.
    Changed {
        count: usize,
    },
    /// The results of a `Command::Batch`, in order.
    Batch {
        results: Vec<CommandResult>,
    },
    Rejected {
        rejection: Rejection,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "details", rename_all = "snake_case")]
pub enum Rejection {
    NotFound {
        kind: String,
        name: String,
    },
    /// The precondition did not hold; `current` is the object's version now (0: absent).
    Conflict {
        name: String,
        expected: u64,
        current: u64,
    },
    Invalid {
        errors: Vec<FieldError>,
    },
    /// The caller may not do this (a node claimed without its credential).
    Forbidden {
        detail: String,
    },
    /// A configured limit (`--max-nodes`, `--max-tiers`) would be exceeded.
    Limit {
        path: String,
        detail: String,
    },
}

/// The replicated data. Serialized whole into snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub tiers: BTreeMap<String, Tier>,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeRecord>,
    #[serde(default)]
    pub instances: BTreeMap<Uuid, Instance>,
    /// Instance ids per node; derived from `instances`, rebuilt by `reindex` after decoding.
    #[serde(skip)]
    pub by_node: BTreeMap<String, BTreeSet<Uuid>>,
    #[serde(default)]
    pub events: VecDeque<Event>,
    #[serde(default)]
    pub next_event_id: u64,
    /// The revision of the last applied command (etcd's revision): the resource version it
    /// gave the objects it changed. See `next_revision`.
    #[serde(default)]
    pub revision: u64,
    /// Node credential digest → node id; derived from `nodes`, rebuilt by `reindex`.
    #[serde(skip)]
    pub credentials: BTreeMap<String, String>,
}

impl State {
    /// Applies one command at log index `index`. Deterministic: see the module invariants.
    pub fn apply(&mut self, index: u64, request: &Request) -> CommandResult {
        self.apply_command(index, request.at_ms, &request.command)
    }

    fn apply_command(&mut self, index: u64, at_ms: u64, command: &Command) -> CommandResult {
        if let Command::Batch { commands } = command {
            return CommandResult::Batch {
                results: commands
                    .iter()
                    .map(|command| self.apply_command(index, at_ms, command))
                    .collect(),
            };
        }
        let version = self.next_revision(index);
        match command {
            Command::PutTier { spec, max_tiers } => self.put_tier(version, at_ms, spec, *max_tiers),
            Command::DeleteTier {
                name,
                expected_version,
            } => self.delete_tier(version, at_ms, name, *expected_version),
            Command::ScaleTier {
                name,
                desired,
                expected_version,
            } => self.scale_tier(version, at_ms, name, *desired, *expected_version),
            Command::ResumeAutoscaling {
                name,
                expected_version,
            } => self.resume_autoscaling(version, at_ms, name, *expected_version),
            Command::AutoscaleTier {
                name,
                from,
                to,
                inputs,
            } => self.autoscale_tier(at_ms, name, *from, *to, inputs),
            Command::RegisterNode {
                registration,
                auth,
                max_nodes,
            } => self.register_node(version, at_ms, registration, auth.as_ref(), *max_nodes),
            Command::RevokeNode { node } => self.revoke_node(version, at_ms, node),
            Command::RemoveNode { node, reason } => self.remove_node(at_ms, node, reason),
            Command::SetNodeReady {
                node,
                ready,
                reason,
            } => self.set_node_ready(version, at_ms, node, *ready, reason),
            Command::SetNodeFlags {
                node,
                cordoned,
                draining,
            } => self.set_node_flags(version, at_ms, node, *cordoned, *draining),
            Command::CreateInstances { instances, reason } => {
                self.create_instances(version, at_ms, instances, reason)
            }
            Command::UpdateInstances { updates } => self.update_instances(version, at_ms, updates),
            Command::RemoveInstances { ids } => {
                let mut count = 0;
                for id in ids {
                    if let Some(instance) = self.instances.remove(id) {
                        if let Some(node) = &instance.node {
                            if let Some(set) = self.by_node.get_mut(node) {
                                set.remove(id);
                            }
                        }
                        count += 1;
                    }
                }
                CommandResult::Changed { count }
            }
            Command::RecordEvent {
                object,
                reason,
                message,
            } => {
                self.record(at_ms, object.clone(), reason, message.clone());
                CommandResult::Changed { count: 0 }
            }
            Command::Batch { .. } => unreachable!("batches are unpacked above"),
        }
    }

    /// The revision of the command applied next, in the entry at log `index`: one more than
    /// the last, and never below the entry's index. Every command gets its own, so writes to
    /// one object that share an entry still get distinct, increasing versions; and a state
    /// from before revisions existed (revision 0, versions equal to log indexes) continues
    /// above every version it holds.
    fn next_revision(&mut self, index: u64) -> u64 {
        self.revision = (self.revision + 1).max(index);
        self.revision
    }

    /// Rebuilds derived indexes; call after decoding a snapshot.
    pub fn reindex(&mut self) {
        self.by_node.clear();
        for (id, instance) in &self.instances {
            if let Some(node) = &instance.node {
                self.by_node.entry(node.clone()).or_default().insert(*id);
            }
        }
        self.credentials = self
            .nodes
            .values()
            .filter_map(|node| Some((node.credential_hash.clone()?, node.id.clone())))
            .collect();
    }

    /// The node a credential digest belongs to.
    pub fn node_of_credential(&self, credential_hash: &str) -> Option<&str> {
        self.credentials.get(credential_hash).map(String::as_str)
    }

    /// Instances placed on `node`.
    pub fn instances_on<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.instances.get(id))
    }

    /// Appends an event, dropping the oldest beyond `EVENT_CAPACITY`.
    fn record(&mut self, at_ms: u64, object: String, reason: &str, message: String) {
        self.record_with(at_ms, object, reason, message, None);
    }

    fn record_with(
        &mut self,
        at_ms: u64,
        object: String,
        reason: &str,
        message: String,
        scaling: Option<Box<ScalingInputs>>,
    ) {
        self.next_event_id += 1;
        self.events.push_back(Event {
            id: self.next_event_id,
            at_ms,
            object,
            reason: reason.to_string(),
            message,
            scaling,
        });
        while self.events.len() > EVENT_CAPACITY {
            self.events.pop_front();
        }
    }

    fn register_node(
        &mut self,
        index: u64,
        at_ms: u64,
        registration: &RegisterRequest,
        auth: Option<&NodeAuth>,
        max_nodes: Option<u64>,
    ) -> CommandResult {
        let existing = self.nodes.get(&registration.node_id);
        let held = existing.and_then(|node| node.credential_hash.clone());
        let mut ec2_instance = existing.and_then(|node| node.ec2_instance);
        if let Some(NodeAuth::Bootstrap { instance, .. }) = auth {
            if let Some(detail) = self.bootstrap_refusal(*instance, registration) {
                return CommandResult::Rejected {
                    rejection: Rejection::Forbidden { detail },
                };
            }
            ec2_instance = Some(*instance);
        }
        let credential_hash = match (auth, &held) {
            (None, _) => held.clone(),
            (
                Some(
                    NodeAuth::JoinToken { credential_hash }
                    | NodeAuth::Bootstrap {
                        credential_hash, ..
                    },
                ),
                None,
            ) => Some(credential_hash.clone()),
            (Some(NodeAuth::Credential { credential_hash }), Some(current))
                if credential_hash == current =>
            {
                held.clone()
            }
            (Some(NodeAuth::JoinToken { .. } | NodeAuth::Bootstrap { .. }), Some(_)) => {
                let id = &registration.node_id;
                self.record(
                    at_ms,
                    format!("node/{id}"),
                    "NodeClaimRefused",
                    format!(
                        "an agent at {} claimed node {id} with the join token, but the node holds a credential; refused (revoke the node's credential to let a new agent take its place)",
                        registration.address
                    ),
                );
                return CommandResult::Rejected {
                    rejection: Rejection::Forbidden {
                        detail: format!(
                            "node {id:?} is registered and holds a credential; register with it, or have an operator revoke it"
                        ),
                    },
                };
            }
            (Some(NodeAuth::Credential { .. }), _) => {
                return CommandResult::Rejected {
                    rejection: Rejection::Forbidden {
                        detail: format!(
                            "the credential is no longer node {:?}'s (revoked); register with the join token",
                            registration.node_id
                        ),
                    },
                };
            }
        };
        if existing.is_none() && max_nodes.is_some_and(|max| self.nodes.len() as u64 >= max) {
            return CommandResult::Rejected {
                rejection: Rejection::Limit {
                    path: "node_id".to_string(),
                    detail: format!(
                        "the cluster already has {} nodes, its limit (--max-nodes)",
                        self.nodes.len()
                    ),
                },
            };
        }
        let record = NodeRecord {
            id: registration.node_id.clone(),
            address: registration.address.clone(),
            zone: registration.zone.clone(),
            labels: registration.labels.clone(),
            capacity: registration.capacity,
            ready: true,
            cordoned: existing.is_some_and(|node| node.cordoned),
            draining: existing.is_some_and(|node| node.draining),
            agent_version: registration.agent_version.clone(),
            roles: registration.roles.clone(),
            registered_at_ms: existing.map_or(at_ms, |node| node.registered_at_ms),
            resource_version: index,
            credential_hash,
            ec2_instance,
        };
        let message = match existing {
            None => format!("node {} registered at {}", record.id, record.address),
            Some(old) if !old.ready => format!("node {} registered again and is ready", record.id),
            Some(_) => format!("node {} registered again", record.id),
        };
        self.record(
            at_ms,
            format!("node/{}", record.id),
            "NodeRegistered",
            message,
        );
        if let Some(old) = held.filter(|old| Some(old) != record.credential_hash.as_ref()) {
            self.credentials.remove(&old);
        }
        if let Some(hash) = &record.credential_hash {
            self.credentials.insert(hash.clone(), record.id.clone());
        }
        self.nodes.insert(record.id.clone(), record.clone());
        CommandResult::Node {
            node: Box::new(record),
        }
    }

    /// Why EC2 instance `instance`'s bootstrap token may not register `registration`, if it
    /// may not: only the worker node named after the instance, while the instance is an EC2
    /// record that is neither stopping nor over.
    fn bootstrap_refusal(&self, instance: Uuid, registration: &RegisterRequest) -> Option<String> {
        if registration.node_id != instance.to_string() {
            return Some(format!(
                "this bootstrap token is instance {instance}'s; it cannot register node {:?}",
                registration.node_id
            ));
        }
        if registration
            .roles
            .iter()
            .any(|role| *role != NodeRole::Worker)
        {
            return Some("a bootstrap token registers a worker node only".to_string());
        }
        let wanted = self.instances.get(&instance).is_some_and(|record| {
            record.provider == Provider::Ec2
                && record.phase != Phase::Stopping
                && !record.phase.is_final()
        });
        (!wanted).then(|| {
            format!(
                "instance {instance} is not an EC2 instance of this cluster that is still wanted"
            )
        })
    }

    fn remove_node(&mut self, at_ms: u64, node: &str, reason: &str) -> CommandResult {
        if !self.nodes.contains_key(node) {
            return not_found_kind("node", node);
        }
        if self
            .by_node
            .get(node)
            .is_some_and(|placed| !placed.is_empty())
        {
            // Something was placed on it since the proposal: it stays.
            return CommandResult::Changed { count: 0 };
        }
        if let Some(record) = self.nodes.remove(node) {
            if let Some(hash) = &record.credential_hash {
                self.credentials.remove(hash);
            }
        }
        self.by_node.remove(node);
        self.record(
            at_ms,
            format!("node/{node}"),
            "NodeRemoved",
            format!("node {node} removed: {reason}"),
        );
        CommandResult::Changed { count: 1 }
    }

    fn revoke_node(&mut self, index: u64, at_ms: u64, node: &str) -> CommandResult {
        let Some(record) = self.nodes.get_mut(node) else {
            return not_found_kind("node", node);
        };
        if let Some(hash) = record.credential_hash.take() {
            self.credentials.remove(&hash);
            record.resource_version = index;
        }
        let record = record.clone();
        self.record(
            at_ms,
            format!("node/{node}"),
            "NodeCredentialRevoked",
            format!("node {node}'s credential was revoked; its agent must register again with the join token"),
        );
        CommandResult::Node {
            node: Box::new(record),
        }
    }

    fn set_node_ready(
        &mut self,
        index: u64,
        at_ms: u64,
        node: &str,
        ready: bool,
        reason: &str,
    ) -> CommandResult {
        let Some(record) = self.nodes.get_mut(node) else {
            return not_found_kind("node", node);
        };
        if record.ready == ready {
            return CommandResult::Node {
                node: Box::new(record.clone()),
            };
        }
        record.ready = ready;
        record.resource_version = index;
        let record = record.clone();
        if ready {
            self.record(
                at_ms,
                format!("node/{node}"),
                "NodeReady",
                reason.to_string(),
            );
        } else {
            self.record(
                at_ms,
                format!("node/{node}"),
                "NodeNotReady",
                reason.to_string(),
            );
            let lost: Vec<Uuid> = self
                .instances_on(node)
                .filter(|instance| !instance.phase.is_final())
                .map(|instance| instance.id)
                .collect();
            for id in lost {
                self.transition(
                    index,
                    at_ms,
                    id,
                    InstanceEvent::NodeLost,
                    &format!("node {node} is not ready"),
                );
            }
        }
        CommandResult::Node {
            node: Box::new(record),
        }
    }

    fn set_node_flags(
        &mut self,
        index: u64,
        at_ms: u64,
        node: &str,
        cordoned: bool,
        draining: bool,
    ) -> CommandResult {
        let Some(record) = self.nodes.get_mut(node) else {
            return not_found_kind("node", node);
        };
        let changed = record.cordoned != cordoned || record.draining != draining;
        record.cordoned = cordoned;
        record.draining = draining;
        if changed {
            record.resource_version = index;
        }
        let record = record.clone();
        if changed {
            let (reason, message) = match (cordoned, draining) {
                (_, true) => (
                    "NodeDraining",
                    format!("node {node} is draining: its instances move elsewhere"),
                ),
                (true, false) => (
                    "NodeCordoned",
                    format!("node {node} is cordoned: no new instances"),
                ),
                (false, false) => (
                    "NodeUncordoned",
                    format!("node {node} takes new instances again"),
                ),
            };
            self.record(at_ms, format!("node/{node}"), reason, message);
        }
        CommandResult::Node {
            node: Box::new(record),
        }
    }

    fn create_instances(
        &mut self,
        index: u64,
        at_ms: u64,
        instances: &[NewInstance],
        reason: &str,
    ) -> CommandResult {
        let mut count = 0;
        for new in instances {
            let Some(tier) = self.tiers.get(&new.tier) else {
                continue;
            };
            if self.instances.contains_key(&new.id) {
                continue;
            }
            // EC2 instances run on no agent node: the record exists (Raft first) before the
            // leader's EC2 executor launches it.
            if tier.spec.provider == Provider::Ec2 {
                let instance = Instance {
                    id: new.id,
                    tier: new.tier.clone(),
                    provider: Provider::Ec2,
                    node: None,
                    provider_id: None,
                    address: None,
                    port: tier.spec.template.port,
                    subnet: new.subnet.clone(),
                    phase: Phase::Pending,
                    health: Health::Unknown,
                    generation: tier.generation,
                    reason: Some(reason.to_string()),
                    created_at_ms: at_ms,
                    updated_at_ms: at_ms,
                    ready_at_ms: 0,
                    drain_started_ms: 0,
                    resource_version: index,
                };
                self.instances.insert(new.id, instance);
                self.record(
                    at_ms,
                    format!("tier/{}", new.tier),
                    "InstanceCreated",
                    format!(
                        "instance {} recorded for subnet {}: {reason}",
                        new.id,
                        new.subnet.as_deref().unwrap_or("(default)")
                    ),
                );
                count += 1;
                continue;
            }
            let Some(node) = self.nodes.get(&new.node) else {
                continue;
            };
            // The planner chose the node from the state before this entry; an earlier command
            // (often of the same round) may have made it unfit since. An instance created on a
            // NotReady node would stay Pending until the node returns: its agent's reports are
            // ignored, so the start timeout never fires, yet it counts toward the tier. Skipped
            // here, the next round places it elsewhere.
            let unfit = if !node.ready {
                Some("is not ready")
            } else if node.draining {
                Some("is draining")
            } else if node.cordoned {
                Some("is cordoned")
            } else if node.ec2_instance.is_some() {
                Some("is an EC2 instance's agent")
            } else {
                None
            };
            if let Some(why) = unfit {
                self.record(
                    at_ms,
                    format!("tier/{}", new.tier),
                    "InstanceNotPlaced",
                    format!(
                        "instance {} not placed: node {} {why}; the next round places it elsewhere",
                        new.id, new.node
                    ),
                );
                continue;
            }
            let instance = Instance {
                id: new.id,
                tier: new.tier.clone(),
                provider: tier.spec.provider,
                node: Some(new.node.clone()),
                provider_id: None,
                address: Some(node.address.clone()),
                port: None,
                subnet: None,
                phase: Phase::Pending,
                health: Health::Unknown,
                generation: tier.generation,
                reason: Some(reason.to_string()),
                created_at_ms: at_ms,
                updated_at_ms: at_ms,
                ready_at_ms: 0,
                drain_started_ms: 0,
                resource_version: index,
            };
            self.by_node
                .entry(new.node.clone())
                .or_default()
                .insert(new.id);
            self.instances.insert(new.id, instance);
            self.record(
                at_ms,
                format!("tier/{}", new.tier),
                "InstanceCreated",
                format!("instance {} placed on node {}: {reason}", new.id, new.node),
            );
            count += 1;
        }
        CommandResult::Changed { count }
    }

    fn update_instances(
        &mut self,
        index: u64,
        at_ms: u64,
        updates: &[InstanceUpdate],
    ) -> CommandResult {
        let mut count = 0;
        for update in updates {
            let Some(instance) = self.instances.get_mut(&update.id) else {
                continue;
            };
            let mut changed = false;
            if !instance.phase.is_final() {
                if let Some(health) = update.health {
                    if instance.health != health {
                        changed = true;
                        // Why its health changed is why it is as it is (a replacement's
                        // reason quotes it), unless a phase change below says more.
                        if let Some(reason) = update.reason.as_ref().filter(|r| !r.is_empty()) {
                            instance.reason = Some(reason.clone());
                        }
                    }
                    instance.health = health;
                }
                if let Some(port) = update.port {
                    changed |= instance.port != Some(port);
                    instance.port = Some(port);
                }
                // The EC2 id is set once: a second observation never re-points a record at
                // another EC2 instance.
                if let (Some(provider_id), None) = (&update.provider_id, &instance.provider_id) {
                    instance.provider_id = Some(provider_id.clone());
                    changed = true;
                }
                if let Some(address) = &update.address {
                    changed |= instance.address.as_ref() != Some(address);
                    instance.address = Some(address.clone());
                }
            }
            if changed {
                instance.updated_at_ms = at_ms;
                instance.resource_version = index;
                let tier = instance.tier.clone();
                self.pool_changed(&tier, index);
            }
            let reason = update.reason.clone().unwrap_or_default();
            let moved = match update.event {
                Some(event) => self.transition(index, at_ms, update.id, event, &reason),
                None => false,
            };
            if changed || moved {
                count += 1;
            }
        }
        CommandResult::Changed { count }
    }

    /// Applies one lifecycle event; records an event when the phase changes. Returns whether it
    /// changed.
    fn transition(
        &mut self,
        index: u64,
        at_ms: u64,
        id: Uuid,
        event: InstanceEvent,
        reason: &str,
    ) -> bool {
        let Some(instance) = self.instances.get_mut(&id) else {
            return false;
        };
        let before = instance.phase;
        let after = step(before, event);
        if after == before {
            return false;
        }
        instance.phase = after;
        instance.updated_at_ms = at_ms;
        instance.resource_version = index;
        if !reason.is_empty() {
            instance.reason = Some(reason.to_string());
        } else if after == Phase::Running {
            // Whatever held it back (failed start-up probes) no longer applies.
            instance.reason = None;
        }
        if after == Phase::Running && instance.ready_at_ms == 0 {
            instance.ready_at_ms = at_ms;
        }
        if after == Phase::Draining {
            instance.drain_started_ms = at_ms;
        }
        if matches!(after, Phase::Failed | Phase::Lost | Phase::Terminated) {
            instance.health = Health::Unknown;
        }
        let tier = instance.tier.clone();
        // Where it runs: its agent node, or (provider ec2) its EC2 instance once known.
        let place = match (&instance.node, &instance.provider_id) {
            (Some(node), _) => format!(" on node {node}"),
            (None, Some(ec2_id)) => format!(" ({ec2_id})"),
            (None, None) => String::new(),
        };
        self.pool_changed(&tier, index);
        let (name, detail) = match after {
            Phase::Starting => ("InstanceStarting", String::new()),
            Phase::Running => ("InstanceRunning", String::new()),
            Phase::Draining => ("InstanceDraining", String::new()),
            Phase::Stopping => ("InstanceStopping", String::new()),
            Phase::Terminated => ("InstanceTerminated", String::new()),
            Phase::Failed => ("InstanceFailed", String::new()),
            Phase::Lost => ("InstanceLost", String::new()),
            Phase::Pending => ("InstancePending", String::new()),
        };
        let because = if reason.is_empty() {
            detail
        } else {
            format!(": {reason}")
        };
        self.record(
            at_ms,
            format!("tier/{tier}"),
            name,
            format!("instance {id}{place}: {before:?} -> {after:?}{because}"),
        );
        true
    }

    /// Notes that the pool of `tier` may have changed at revision `index`: pool versions are the
    /// revision of the last command that changed something a pool is computed from (an
    /// instance's phase, health or port, the tier's load balancer or health check), so they
    /// only grow, and two pools of one tier with the same version are the same.
    fn pool_changed(&mut self, tier: &str, index: u64) {
        if let Some(tier) = self.tiers.get_mut(tier) {
            tier.status.pool_version = index;
        }
    }

    /// The tier, other than `name`, whose load balancer already listens where `spec` wants
    /// to: the same port on the same address, or on any address when either is unspecified
    /// (`0.0.0.0` binds every address, so no other frontend could bind that port).
    fn listen_conflict(
        &self,
        name: &str,
        spec: &TierSpec,
    ) -> Option<(String, std::net::SocketAddr)> {
        let wanted = spec.load_balancer.listen?;
        self.tiers.values().find_map(|other| {
            let theirs = other.spec.load_balancer.listen?;
            let overlaps = theirs.port() == wanted.port()
                && (theirs.ip() == wanted.ip()
                    || theirs.ip().is_unspecified()
                    || wanted.ip().is_unspecified());
            (other.name() != name && overlaps).then(|| (other.name().to_string(), theirs))
        })
    }

    fn check_version(&self, name: &str, expected: Option<u64>) -> Result<(), Rejection> {
        let current = self.tiers.get(name).map_or(0, Tier::resource_version);
        match expected {
            Some(expected) if expected != current => Err(Rejection::Conflict {
                name: name.to_string(),
                expected,
                current,
            }),
            _ => Ok(()),
        }
    }

    fn put_tier(
        &mut self,
        index: u64,
        at_ms: u64,
        spec: &TierSpec,
        max_tiers: Option<u64>,
    ) -> CommandResult {
        if let Err(rejection) = self.check_version(&spec.name, spec.resource_version) {
            return CommandResult::Rejected { rejection };
        }
        if !self.tiers.contains_key(&spec.name)
            && max_tiers.is_some_and(|max| self.tiers.len() as u64 >= max)
        {
            return CommandResult::Rejected {
                rejection: Rejection::Limit {
                    path: "name".to_string(),
                    detail: format!(
                        "the cluster already has {} tiers, its limit (--max-tiers {})",
                        self.tiers.len(),
                        max_tiers.unwrap_or_default()
                    ),
                },
            };
        }
        // Decided here rather than in request validation: whether an address is taken
        // depends on the other tiers at this log position.
        if let Some((other, theirs)) = self.listen_conflict(&spec.name, spec) {
            return CommandResult::Rejected {
                rejection: Rejection::Invalid {
                    errors: vec![FieldError::new(
                        "load_balancer.listen",
                        format!("tier {other:?} already listens on {theirs}; each tier needs its own address and port"),
                    )],
                },
            };
        }
        let mut stored_spec = spec.clone();
        stored_spec.resource_version = Some(index);
        stored_spec.kind = Some(strata_api::TIER_KIND.to_string());
        let scaling = &stored_spec.scaling;
        let tier = match self.tiers.get(&spec.name) {
            None => {
                let desired = scaling.desired.unwrap_or(scaling.min);
                Tier {
                    generation: 1,
                    created_at_ms: at_ms,
                    updated_at_ms: at_ms,
                    status: TierStatus {
                        desired,
                        pool_version: index,
                        last_scaling: Some(ScalingDecision {
                            at_ms,
                            from: 0,
                            to: desired,
                            reason: "tier created".to_string(),
                            inputs: None,
                        }),
                        ..TierStatus::default()
                    },
                    spec: stored_spec,
                }
            }
            Some(existing) => {
                // Only what an instance is started with (template, health check) makes a new
                // generation, which rolls the instances; scaling, load balancer and placement
                // changes apply without restarting anything.
                let old_spec = &existing.spec;
                let generation = if old_spec.template == stored_spec.template
                    && old_spec.health == stored_spec.health
                    && old_spec.provider == stored_spec.provider
                {
                    existing.generation
                } else {
                    existing.generation + 1
                };
                let mut status = existing.status.clone();
                if old_spec.load_balancer != stored_spec.load_balancer
                    || old_spec.health != stored_spec.health
                {
                    status.pool_version = index;
                }
                let before = status.desired;
                status.desired = scaling
                    .desired
                    .unwrap_or(before)
                    .clamp(scaling.min, scaling.max);
                if status.desired != before {
                    status.last_scaling = Some(ScalingDecision {
                        at_ms,
                        from: before,
                        to: status.desired,
                        reason: format!(
                            "spec changed: min {} max {} desired {}",
                            scaling.min,
                            scaling.max,
                            scaling
                                .desired
                                .map_or_else(|| "unset".to_string(), |d| d.to_string())
                        ),
                        inputs: None,
                    });
                }
                Tier {
                    generation,
                    created_at_ms: existing.created_at_ms,
                    updated_at_ms: at_ms,
                    status,
                    spec: stored_spec,
                }
            }
        };
        let created = !self.tiers.contains_key(&spec.name);
        let previous_generation = self.tiers.get(&spec.name).map(|old| old.generation);
        let message = match previous_generation {
            None => Some((
                "TierCreated",
                format!("tier created with desired {}", tier.status.desired),
            )),
            Some(old) if old != tier.generation => Some((
                "TierUpdated",
                format!("spec changed: generation {old} -> {}", tier.generation),
            )),
            Some(_) => None,
        };
        if let Some((reason, message)) = message {
            self.record(at_ms, format!("tier/{}", spec.name), reason, message);
        }
        self.tiers.insert(spec.name.clone(), tier.clone());
        CommandResult::Tier {
            tier: Box::new(tier),
            created,
        }
    }

    fn delete_tier(
        &mut self,
        index: u64,
        at_ms: u64,
        name: &str,
        expected: Option<u64>,
    ) -> CommandResult {
        if !self.tiers.contains_key(name) {
            return not_found(name);
        }
        if let Err(rejection) = self.check_version(name, expected) {
            return CommandResult::Rejected { rejection };
        }
        match self.tiers.remove(name) {
            Some(tier) => {
                // Deleting a tier drains every instance it has; agents stop them.
                let doomed: Vec<Uuid> = self
                    .instances
                    .values()
                    .filter(|instance| instance.tier == name && !instance.phase.is_final())
                    .map(|instance| instance.id)
                    .collect();
                for id in doomed {
                    self.transition(index, at_ms, id, InstanceEvent::Drain, "tier deleted");
                }
                self.record(
                    at_ms,
                    format!("tier/{name}"),
                    "TierDeleted",
                    format!("tier {name} deleted"),
                );
                CommandResult::Deleted {
                    tier: Box::new(tier),
                }
            }
            None => not_found(name),
        }
    }

    fn scale_tier(
        &mut self,
        index: u64,
        at_ms: u64,
        name: &str,
        desired: u32,
        expected: Option<u64>,
    ) -> CommandResult {
        if let Err(rejection) = self.check_version(name, expected) {
            return CommandResult::Rejected { rejection };
        }
        let Some(tier) = self.tiers.get_mut(name) else {
            return not_found(name);
        };
        let scaling = &tier.spec.scaling;
        if desired < scaling.min || desired > scaling.max {
            return CommandResult::Rejected {
                rejection: Rejection::Invalid {
                    errors: vec![FieldError::new(
                        "desired",
                        format!(
                            "must be between scaling.min ({}) and scaling.max ({})",
                            scaling.min, scaling.max
                        ),
                    )],
                },
            };
        }
        let before = tier.status.desired;
        tier.spec.scaling.desired = Some(desired);
        tier.spec.resource_version = Some(index);
        tier.updated_at_ms = at_ms;
        tier.status.desired = desired;
        let pauses =
            !tier.spec.scaling.policies.is_empty() || !tier.spec.scaling.schedules.is_empty();
        tier.status.last_scaling = Some(ScalingDecision {
            at_ms,
            from: before,
            to: desired,
            reason: "scaled by an operator".to_string(),
            inputs: None,
        });
        let tier = tier.clone();
        let paused = if pauses {
            "; the autoscaler is paused until the count is handed back (scale --auto)"
        } else {
            ""
        };
        self.record(
            at_ms,
            format!("tier/{name}"),
            "ScaledByOperator",
            format!("desired {before} -> {desired}: scaled by an operator{paused}"),
        );
        CommandResult::Tier {
            tier: Box::new(tier),
            created: false,
        }
    }

    fn resume_autoscaling(
        &mut self,
        index: u64,
        at_ms: u64,
        name: &str,
        expected: Option<u64>,
    ) -> CommandResult {
        if let Err(rejection) = self.check_version(name, expected) {
            return CommandResult::Rejected { rejection };
        }
        let Some(tier) = self.tiers.get_mut(name) else {
            return not_found(name);
        };
        let was = tier.spec.scaling.desired.take();
        if was.is_some() {
            tier.spec.resource_version = Some(index);
            tier.updated_at_ms = at_ms;
        }
        let desired = tier.status.desired;
        let tier = tier.clone();
        if was.is_some() {
            self.record(
                at_ms,
                format!("tier/{name}"),
                "AutoscalingResumed",
                format!("the autoscaler decides the count again, from {desired}"),
            );
        }
        CommandResult::Tier {
            tier: Box::new(tier),
            created: false,
        }
    }

    fn autoscale_tier(
        &mut self,
        at_ms: u64,
        name: &str,
        from: u32,
        to: u32,
        inputs: &ScalingInputs,
    ) -> CommandResult {
        let Some(tier) = self.tiers.get_mut(name) else {
            return not_found(name);
        };
        if tier.spec.scaling.desired.is_some() || tier.status.desired != from {
            // Planned from a state this entry no longer describes: the next evaluation
            // decides from the current one.
            return CommandResult::Rejected {
                rejection: Rejection::Conflict {
                    name: name.to_string(),
                    expected: u64::from(from),
                    current: u64::from(tier.status.desired),
                },
            };
        }
        tier.status.desired = to;
        tier.status.last_scaling = Some(ScalingDecision {
            at_ms: inputs.at_ms,
            from,
            to,
            reason: inputs.reason.clone(),
            inputs: Some(Box::new(inputs.clone())),
        });
        let tier = tier.clone();
        let reason = if to > from { "ScaledOut" } else { "ScaledIn" };
        self.record_with(
            at_ms,
            format!("tier/{name}"),
            reason,
            scaling_message(inputs),
            Some(Box::new(inputs.clone())),
        );
        CommandResult::Tier {
            tier: Box::new(tier),
            created: false,
        }
    }
}

/// An autoscaler decision in plain words: the reason, then what each policy saw and asked for.
pub fn scaling_message(inputs: &ScalingInputs) -> String {
    let mut message = inputs.reason.clone();
    for policy in &inputs.policies {
        let value = policy
            .value
            .map_or_else(|| "no data".to_string(), |v| format!("{v}"));
        let target = policy
            .target
            .map_or_else(String::new, |t| format!(" (target {t})"));
        let asks = policy
            .recommendation
            .map_or_else(|| "abstains".to_string(), |r| format!("asks for {r}"));
        message.push_str(&format!("; {} {value}{target} {asks}", policy.metric));
    }
    message
}

fn not_found(name: &str) -> CommandResult {
    not_found_kind("tier", name)
}

fn not_found_kind(kind: &str, name: &str) -> CommandResult {
    CommandResult::Rejected {
        rejection: Rejection::NotFound {
            kind: kind.to_string(),
            name: name.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, min: u32, max: u32) -> TierSpec {
        let body = serde_json::json!({
            "name": name,
            "template": {"driver": "process", "command": ["app"]},
            "scaling": {"min": min, "max": max},
        });
        match serde_json::from_value(body) {
            Ok(spec) => spec,
            Err(error) => panic!("test spec: {error}"),
        }
    }

    fn put(spec: TierSpec) -> Request {
        Request {
            at_ms: 1000,
            command: Command::PutTier {
                spec: Box::new(spec),
                max_tiers: None,
            },
        }
    }

    fn tier_of(result: CommandResult) -> Tier {
        match result {
            CommandResult::Tier { tier, .. } | CommandResult::Deleted { tier } => *tier,
            other => panic!("expected a tier, got {other:?}"),
        }
    }

    #[test]
    fn create_sets_version_generation_and_desired_min() {
        let mut state = State::default();
        let result = state.apply(7, &put(spec("web", 2, 5)));
        assert!(matches!(result, CommandResult::Tier { created: true, .. }));
        let tier = tier_of(result);
        assert_eq!(tier.resource_version(), 7);
        assert_eq!(tier.generation, 1);
        assert_eq!(tier.status.desired, 2);
        assert_eq!(tier.created_at_ms, 1000);
    }

    #[test]
    fn compare_and_set_applies_once() {
        let mut state = State::default();
        state.apply(3, &put(spec("web", 1, 5)));
        let mut cas = spec("web", 1, 6);
        cas.resource_version = Some(3);
        assert!(matches!(
            state.apply(4, &put(cas.clone())),
            CommandResult::Tier { created: false, .. }
        ));
        // The same precondition again (a retry) is a conflict, not a second application.
        assert_eq!(
            state.apply(5, &put(cas)),
            CommandResult::Rejected {
                rejection: Rejection::Conflict {
                    name: "web".to_string(),
                    expected: 3,
                    current: 4
                }
            }
        );
        // Version 0 means "must not exist".
        let mut create_only = spec("web", 1, 5);
        create_only.resource_version = Some(0);
        assert!(matches!(
            state.apply(6, &put(create_only)),
            CommandResult::Rejected {
                rejection: Rejection::Conflict { current: 4, .. }
            }
        ));
    }

    #[test]
    fn only_template_and_health_changes_make_a_new_generation() {
        let mut state = State::default();
        state.apply(1, &put(spec("web", 1, 5)));
        assert_eq!(
            tier_of(state.apply(2, &put(spec("web", 1, 5)))).generation,
            1
        );
        // Scaling bounds apply without a new generation (no rollout)...
        assert_eq!(
            tier_of(state.apply(3, &put(spec("web", 1, 9)))).generation,
            1
        );
        // ...a new template makes one.
        let mut changed = spec("web", 1, 9);
        changed.template.command = vec!["app".to_string(), "--v2".to_string()];
        assert_eq!(tier_of(state.apply(4, &put(changed))).generation, 2);
    }

    #[test]
    fn scale_checks_bounds_and_records_the_decision() {
        let mut state = State::default();
        state.apply(1, &put(spec("web", 1, 5)));
        let scale = |desired, expected_version| Request {
            at_ms: 2000,
            command: Command::ScaleTier {
                name: "web".to_string(),
                desired,
                expected_version,
            },
        };
        assert!(matches!(
            state.apply(2, &scale(9, None)),
            CommandResult::Rejected {
                rejection: Rejection::Invalid { .. }
            }
        ));
        let tier = tier_of(state.apply(3, &scale(4, Some(1))));
        assert_eq!(tier.status.desired, 4);
        assert_eq!(tier.resource_version(), 3);
        let decision = tier
            .status
            .last_scaling
            .unwrap_or_else(|| panic!("no decision"));
        assert_eq!((decision.from, decision.to, decision.at_ms), (1, 4, 2000));
        // Narrowing max below the manual count clamps it.
        assert_eq!(
            tier_of(state.apply(4, &put(spec("web", 1, 3))))
                .status
                .desired,
            3
        );
    }

    #[test]
    fn autoscaler_decisions_apply_only_from_the_count_they_were_planned_from() {
        let mut state = State::default();
        state.apply(1, &put(spec("web", 1, 8)));
        let inputs = ScalingInputs {
            at_ms: 1500,
            from: 1,
            to: 3,
            reason: "scale out from 1 to 3: the policies ask for 3".to_string(),
            policies: vec![strata_api::PolicyEvaluation {
                metric: "cpu_utilization".to_string(),
                value: Some(150.0),
                target: Some(50.0),
                recommendation: Some(3),
                note: String::new(),
            }],
            ..ScalingInputs::default()
        };
        let decide = |from, to| Request {
            at_ms: 2000,
            command: Command::AutoscaleTier {
                name: "web".to_string(),
                from,
                to,
                inputs: Box::new(inputs.clone()),
            },
        };
        let tier = tier_of(state.apply(2, &decide(1, 3)));
        assert_eq!(tier.status.desired, 3);
        // Status only: the spec's version stays, so operators' compare-and-set still holds.
        assert_eq!(tier.resource_version(), 1);
        let last = tier
            .status
            .last_scaling
            .unwrap_or_else(|| panic!("no decision"));
        assert_eq!((last.from, last.to), (1, 3));
        assert_eq!(last.inputs.as_deref(), Some(&inputs));
        let event = state
            .events
            .back()
            .cloned()
            .unwrap_or_else(|| panic!("no event"));
        assert_eq!(
            (event.object.as_str(), event.reason.as_str()),
            ("tier/web", "ScaledOut")
        );
        assert!(
            event
                .message
                .contains("cpu_utilization 150 (target 50) asks for 3"),
            "{}",
            event.message
        );
        assert_eq!(event.scaling.as_deref(), Some(&inputs));
        // Planned from 1, but the tier is at 3 now: refused, nothing changes.
        assert!(matches!(
            state.apply(3, &decide(1, 2)),
            CommandResult::Rejected {
                rejection: Rejection::Conflict { .. }
            }
        ));
        assert_eq!(state.tiers["web"].status.desired, 3);
        // A manual count pauses the autoscaler: its decisions are refused until handed back.
        state.apply(
            4,
            &Request {
                at_ms: 3000,
                command: Command::ScaleTier {
                    name: "web".to_string(),
                    desired: 5,
                    expected_version: None,
                },
            },
        );
        assert!(matches!(
            state.apply(5, &decide(5, 6)),
            CommandResult::Rejected { .. }
        ));
        let resumed = tier_of(state.apply(
            6,
            &Request {
                at_ms: 4000,
                command: Command::ResumeAutoscaling {
                    name: "web".to_string(),
                    expected_version: None,
                },
            },
        ));
        assert_eq!(
            (resumed.spec.scaling.desired, resumed.status.desired),
            (None, 5)
        );
        assert_eq!(
            state.events.back().map(|e| e.reason.as_str()),
            Some("AutoscalingResumed")
        );
        let tier = tier_of(state.apply(7, &decide(5, 2)));
        assert_eq!(tier.status.desired, 2);
        assert_eq!(
            state.events.back().map(|e| e.reason.as_str()),
            Some("ScaledIn")
        );
    }

    #[test]
    fn delete_and_missing_tiers() {
        let mut state = State::default();
        let delete = Request {
            at_ms: 1,
            command: Command::DeleteTier {
                name: "web".to_string(),
                expected_version: None,
            },
        };
        assert!(matches!(
            state.apply(1, &delete),
            CommandResult::Rejected {
                rejection: Rejection::NotFound { .. }
            }
        ));
        state.apply(2, &put(spec("web", 1, 5)));
        assert!(matches!(
            state.apply(3, &delete),
            CommandResult::Deleted { .. }
        ));
        assert!(state.tiers.is_empty());
    }

    #[test]
    fn a_batch_applies_each_command_with_its_own_result_and_revision() {
        let mut state = State::default();
        state.apply(1, &put(spec("web", 1, 5)));
        let batch = Request {
            at_ms: 2000,
            command: Command::Batch {
                commands: vec![
                    Command::PutTier {
                        spec: Box::new(spec("api", 1, 5)),
                        max_tiers: None,
                    },
                    Command::ScaleTier {
                        name: "web".to_string(),
                        desired: 3,
                        expected_version: Some(1),
                    },
                    Command::ScaleTier {
                        name: "nope".to_string(),
                        desired: 3,
                        expected_version: None,
                    },
                ],
            },
        };
        let CommandResult::Batch { results } = state.apply(7, &batch) else {
            panic!("a batch answers with a batch");
        };
        assert!(
            matches!(&results[0], CommandResult::Tier { created: true, tier } if tier.resource_version() == 7)
        );
        assert!(
            matches!(&results[1], CommandResult::Tier { created: false, tier } if tier.status.desired == 3 && tier.resource_version() == 8)
        );
        assert!(matches!(
            &results[2],
            CommandResult::Rejected {
                rejection: Rejection::NotFound { .. }
            }
        ));
    }

    proptest::proptest! {
        /// Two replicas applying the same log reach the same state, whatever the commands.
        #[test]
        fn apply_is_deterministic(ops in proptest::collection::vec((0u8..4, 0u32..6, 0u64..8), 1..60)) {
            let log: Vec<Request> = ops
                .iter()
                .enumerate()
                .map(|(i, (kind, value, version))| {
                    let name = format!("t{}", value % 3);
                    let expected_version = (*version > 0).then_some(*version);
                    let command = match kind {
                        0 => Command::PutTier { spec: Box::new(spec(&name, 0, 5 + value)), max_tiers: None },
                        1 => Command::ScaleTier { name, desired: *value, expected_version },
                        2 => Command::DeleteTier { name, expected_version },
                        _ => {
                            let mut s = spec(&name, 1, 5);
                            s.resource_version = expected_version;
                            Command::PutTier { spec: Box::new(s), max_tiers: None }
                        }
                    };
                    Request { at_ms: 1000 + i as u64, command }
                })
                .collect();
            let mut first = State::default();
            let mut second = State::default();
            for (index, request) in log.iter().enumerate() {
                let a = first.apply(index as u64 + 1, request);
                let b = second.apply(index as u64 + 1, request);
                proptest::prop_assert_eq!(a, b);
            }
            proptest::prop_assert_eq!(&first, &second);
            for tier in first.tiers.values() {
                let scaling = &tier.spec.scaling;
                proptest::prop_assert!(tier.status.desired >= scaling.min && tier.status.desired <= scaling.max);
            }
        }
    }
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    fn balanced(name: &str, listen: &str) -> Request {
        let body = serde_json::json!({
            "name": name,
            "template": {"driver": "process", "command": ["app"]},
            "scaling": {"min": 1, "max": 2},
            "load_balancer": {"listen": listen},
        });
        let spec: TierSpec = serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"));
        Request {
            at_ms: 1000,
            command: Command::PutTier {
                spec: Box::new(spec),
                max_tiers: None,
            },
        }
    }

    fn rejected_path(result: &CommandResult) -> Option<String> {
        match result {
            CommandResult::Rejected {
                rejection: Rejection::Invalid { errors },
            } => errors.first().map(|error| error.path.clone()),
            _ => None,
        }
    }

    #[test]
    fn two_tiers_cannot_share_a_listen_address() {
        let mut state = State::default();
        let first = state.apply(1, &balanced("web", "0.0.0.0:8080"));
        assert!(matches!(first, CommandResult::Tier { .. }), "{first:?}");
        // The same port on a specific address overlaps the wildcard, and the reverse.
        for (index, listen) in [(2, "127.0.0.1:8080"), (3, "0.0.0.0:8080")] {
            let result = state.apply(index, &balanced("api", listen));
            assert_eq!(
                rejected_path(&result).as_deref(),
                Some("load_balancer.listen"),
                "{listen}: {result:?}"
            );
        }
        // Another port is fine, and so is the tier itself keeping its address.
        let other = state.apply(4, &balanced("api", "127.0.0.1:8081"));
        assert!(matches!(other, CommandResult::Tier { .. }), "{other:?}");
        let again = state.apply(5, &balanced("web", "0.0.0.0:8080"));
        assert!(matches!(again, CommandResult::Tier { .. }), "{again:?}");
        let moved = state.apply(6, &balanced("api", "127.0.0.2:8080"));
        assert_eq!(
            rejected_path(&moved).as_deref(),
            Some("load_balancer.listen")
        );
    }

    #[test]
    fn pool_versions_follow_the_changes_that_make_pools() {
        let mut state = State::default();
        state.apply(1, &balanced("web", "0.0.0.0:8080"));
        assert_eq!(state.tiers["web"].status.pool_version, 1);
        // A scaling-only change leaves the pool as it was.
        let mut request = balanced("web", "0.0.0.0:8080");
        if let Command::PutTier { spec, .. } = &mut request.command {
            spec.scaling.max = 5;
        }
        state.apply(2, &request);
        assert_eq!(state.tiers["web"].status.pool_version, 1);
        state.apply(3, &balanced("web", "0.0.0.0:9090"));
        assert_eq!(state.tiers["web"].status.pool_version, 3);
    }

    fn registration(node: &str) -> RegisterRequest {
        RegisterRequest {
            node_id: node.to_string(),
            address: "127.0.0.1".to_string(),
            zone: None,
            labels: BTreeMap::new(),
            capacity: strata_api::Resources {
                cpu: 1.0,
                memory_mb: 512,
            },
            agent_version: "test".to_string(),
            roles: strata_api::default_roles(),
        }
    }

    fn register(node: &str, auth: Option<NodeAuth>, max_nodes: Option<u64>) -> Request {
        Request {
            at_ms: 1000,
            command: Command::RegisterNode {
                registration: registration(node),
                auth,
                max_nodes,
            },
        }
    }

    fn join(hash: &str) -> Option<NodeAuth> {
        Some(NodeAuth::JoinToken {
            credential_hash: hash.to_string(),
        })
    }

    fn own(hash: &str) -> Option<NodeAuth> {
        Some(NodeAuth::Credential {
            credential_hash: hash.to_string(),
        })
    }

    fn refused(result: &CommandResult) -> bool {
        matches!(
            result,
            CommandResult::Rejected {
                rejection: Rejection::Forbidden { .. }
            }
        )
    }

    /// The join token registers a node once; after that only the node's credential speaks
    /// for it, until an operator revokes it. A snapshot round trip keeps the index.
    #[test]
    fn node_identity_is_claimed_once_kept_and_revoked() {
        let mut state = State::default();
        assert!(matches!(
            state.apply(1, &register("a", join("h1"), None)),
            CommandResult::Node { .. }
        ));
        assert_eq!(state.node_of_credential("h1"), Some("a"));
        // A second agent with the join token cannot take the id over; it is on record.
        assert!(refused(&state.apply(2, &register("a", join("h2"), None))));
        assert_eq!(state.node_of_credential("h2"), None);
        assert!(state
            .events
            .iter()
            .any(|event| event.reason == "NodeClaimRefused" && event.object == "node/a"));
        // The credential re-registers (an agent restart) and keeps the identity.
        assert!(matches!(
            state.apply(3, &register("a", own("h1"), None)),
            CommandResult::Node { .. }
        ));
        assert_eq!(state.nodes["a"].credential_hash.as_deref(), Some("h1"));
        // A credential that is not the node's (any more) is refused.
        assert!(refused(&state.apply(4, &register("a", own("h9"), None))));
        // Snapshots keep only the digest, and the index is rebuilt from it.
        let mut restored: State =
            serde_json::from_str(&serde_json::to_string(&state).unwrap_or_default())
                .unwrap_or_default();
        restored.reindex();
        assert_eq!(restored.node_of_credential("h1"), Some("a"));
        // Revocation: the old credential no longer names the node; the join token may
        // register it again with a new one.
        state.apply(
            5,
            &Request {
                at_ms: 1000,
                command: Command::RevokeNode {
                    node: "a".to_string(),
                },
            },
        );
        assert_eq!(state.node_of_credential("h1"), None);
        assert!(refused(&state.apply(6, &register("a", own("h1"), None))));
        assert!(matches!(
            state.apply(7, &register("a", join("h3"), None)),
            CommandResult::Node { .. }
        ));
        assert_eq!(state.node_of_credential("h3"), Some("a"));
    }

    /// Records from before credentials carry no digest: the join token claims them (once),
    /// and a command without `auth` (older log entries) changes no credential.
    #[test]
    fn old_records_and_entries_stay_readable() {
        let mut state = State::default();
        state.apply(1, &register("a", None, None));
        assert_eq!(state.nodes["a"].credential_hash, None);
        let old: NodeRecord = serde_json::from_value(serde_json::json!({
            "id": "b", "address": "127.0.0.1", "zone": null, "labels": {},
            "capacity": {"cpu": 1.0, "memory_mb": 512}, "ready": true, "cordoned": false,
            "draining": false, "agent_version": "0", "registered_at_ms": 1,
            "resource_version": 1
        }))
        .unwrap_or_else(|error| panic!("old record: {error}"));
        assert_eq!(old.credential_hash, None);
        let entry: Command = serde_json::from_value(serde_json::json!({
            "type": "register_node",
            "args": {"registration": {"node_id": "c", "address": "127.0.0.1",
                "capacity": {"cpu": 1.0, "memory_mb": 512}, "agent_version": "0"}}
        }))
        .unwrap_or_else(|error| panic!("old entry: {error}"));
        assert!(matches!(
            entry,
            Command::RegisterNode {
                auth: None,
                max_nodes: None,
                ..
            }
        ));
        assert!(matches!(
            state.apply(2, &register("a", join("h1"), None)),
            CommandResult::Node { .. }
        ));
        state.apply(3, &register("a", None, None));
        assert_eq!(state.nodes["a"].credential_hash.as_deref(), Some("h1"));
    }

    #[test]
    fn max_nodes_refuses_new_nodes_only() {
        let mut state = State::default();
        state.apply(1, &register("a", join("h1"), Some(1)));
        assert!(matches!(
            state.apply(2, &register("b", join("h2"), Some(1))),
            CommandResult::Rejected {
                rejection: Rejection::Limit { .. }
            }
        ));
        // A registered node still registers again.
        assert!(matches!(
            state.apply(3, &register("a", own("h1"), Some(1))),
            CommandResult::Node { .. }
        ));
    }

    #[test]
    fn max_tiers_is_decided_in_apply_so_racing_writes_cannot_pass_it() {
        let spec = |name: &str, min: u32, max: u32| -> TierSpec {
            serde_json::from_value(serde_json::json!({
                "name": name,
                "template": {"driver": "process", "command": ["app"]},
                "scaling": {"min": min, "max": max},
            }))
            .unwrap_or_else(|error| panic!("{error}"))
        };
        let mut state = State::default();
        let limited = |name: &str| Request {
            at_ms: 1000,
            command: Command::PutTier {
                spec: Box::new(spec(name, 1, 5)),
                max_tiers: Some(2),
            },
        };
        // Two writes checked against the same count (as on two nodes at once) and a third:
        // the log orders them, and only what fits is stored.
        assert!(matches!(
            state.apply(1, &limited("a")),
            CommandResult::Tier { .. }
        ));
        assert!(matches!(
            state.apply(2, &limited("b")),
            CommandResult::Tier { .. }
        ));
        match state.apply(3, &limited("c")) {
            CommandResult::Rejected {
                rejection: Rejection::Limit { path, detail },
            } => {
                assert_eq!(path, "name");
                assert!(detail.contains("--max-tiers 2"), "{detail}");
            }
            other => panic!("expected a limit, got {other:?}"),
        }
        assert_eq!(state.tiers.len(), 2);
        // An existing tier can still be updated at the limit.
        assert!(matches!(
            state.apply(4, &limited("a")),
            CommandResult::Tier { .. }
        ));
        // Entries written before the limit was in the command carry none.
        let old: Command = serde_json::from_value(serde_json::json!({
            "type": "put_tier",
            "args": {"spec": serde_json::to_value(spec("d", 1, 5)).unwrap_or_default()}
        }))
        .unwrap_or_else(|error| panic!("{error}"));
        assert!(matches!(
            old,
            Command::PutTier {
                max_tiers: None,
                ..
            }
        ));
    }
}

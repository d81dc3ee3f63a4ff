//! One controller node: its Raft instance, stores and peer client, and the write and read paths
//! every API handler goes through.
//!
//! Writes: a handler calls `Controller::propose`. On the leader the command is stamped with the
//! leader's clock and proposed to Raft; on a follower it is forwarded to the leader's
//! `/raft/write`, which stamps and proposes it there. A forward is retried only when it
//! certainly was not delivered (the connection was refused) or the leader says it is not the
//! leader any more; a forward that failed after delivery has an unknown outcome and is reported
//! as such (503) instead of being retried and possibly applied twice.
//!
//! Reads: `Controller::linearizable` implements ReadIndex (openraft's `get_read_log_id`). The
//! leader confirms its leadership with a quorum and returns its commit index; a follower asks
//! the leader for that index and waits until its own state machine has applied it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use strata_api::{ClusterStatus, HostMetrics, Member};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::agents::{Liveness, Touch};
use crate::batch::Gatherer;
use crate::config::Config;
use crate::forward::{ForwardFailure, Forwarder};
use crate::network::{routes, NetworkFactory, PeerClient, PeerError};
use crate::quorum::Quorum;
use crate::raft_types::{NodeId, Proposal, Raft};
use crate::state::{Command, CommandResult, Request};
use crate::store::{LogStore, StateMachineStore};

/// Why a write or read could not be served.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClusterError {
    /// No leader is known or reachable right now; the client may retry.
    #[error("no leader is available: {0}")]
    NoLeader(String),
    /// The write may or may not have been applied; the client must re-read before retrying.
    #[error("the outcome of the write is unknown: {0}")]
    OutcomeUnknown(String),
    #[error("timed out after {0:?} waiting for the cluster")]
    Timeout(Duration),
    /// This node has lost contact with a quorum of voters (see `crate::quorum`); nothing was
    /// proposed, or a proposal in flight has an unknown outcome (then `OutcomeUnknown`).
    #[error("no quorum: {0}")]
    /// Carries the members this node knows, for the client to try another.
    NoQuorum(String, Vec<Member>),
    /// The leader says this node is no longer a member (it was removed, and the entry that
    /// removed it never reached it): it cannot serve a linearizable read. Carries the
    /// members the leader knows, for the client to try one of them.
    #[error("{0}")]
    NotMember(String, Vec<Member>),
    /// A membership change was refused (for example, removing the last voter).
    #[error("membership change refused: {0}")]
    Membership(String),
    /// A member was added as a learner but has not caught up with the log in time (it may
    /// be unreachable); it was not made a voter. Repeating the request resumes from there.
    #[error("{0}")]
    NotCaughtUp(String),
    #[error("this node is shutting down")]
    ShuttingDown,
    /// A fault of this node, not of the request or the cluster; nothing was proposed.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a leader answers to a forwarded write.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardedWrite {
    Applied(CommandResult),
    NotLeader { leader: Option<(NodeId, String)> },
    Failed(String),
}

/// What a leader answers to a read-index request.
#[derive(Debug, Serialize, Deserialize)]
pub enum ReadIndex {
    Index(u64),
    NotLeader {
        leader: Option<(NodeId, String)>,
    },
    Failed(String),
    /// The asking node is not in the leader's membership: the leader no longer replicates
    /// to it, so it would wait for the index forever. `members` are the leader's.
    NotMember {
        members: Vec<Member>,
    },
}

/// Who asks a leader for its read index: the query string of the request (`?from=ID`). The
/// handler reads no body, as before; a request without the query is answered as before.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReadIndexRequest {
    pub from: Option<NodeId>,
}

/// A change of the Raft membership, as forwarded to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MemberChange {
    Add {
        id: NodeId,
        address: String,
        voter: bool,
    },
    Remove {
        id: NodeId,
    },
}

/// A membership change forwarded to the leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MembershipRequest {
    pub change: MemberChange,
    /// Set after a leader change: "already done" counts as success.
    pub retry: bool,
}

/// Why the leader did not make a forwarded membership change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MembershipFailure {
    /// Leadership moved; the caller should find the new leader and retry.
    NotLeader,
    Refused(String),
    /// Added as a learner, not caught up (see `ClusterError::NotCaughtUp`).
    NotCaughtUp(String),
}

/// Authentication material, fixed at start but for the join token, which can be rotated.
#[derive(Clone)]
pub struct Tokens {
    pub admin: String,
    pub viewer: Option<String>,
    pub cluster_secret: String,
    /// Agents register with this one (and then use their node's credential).
    pub join: JoinToken,
}

/// The join token, replaceable while the node runs (`--join-token-file` and SIGHUP).
#[derive(Clone)]
pub struct JoinToken(Arc<std::sync::RwLock<String>>);

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

impl JoinToken {
    pub fn new(token: String) -> Self {
        JoinToken(Arc::new(std::sync::RwLock::new(token)))
    }

    /// The current token.
    pub fn get(&self) -> String {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the token: registrations with the old one are refused from now on.
    pub fn replace(&self, token: String) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = token;
    }

    /// The bootstrap token of one EC2 instance: `strata-boot.<uuid>.<HMAC-SHA-256 of the uuid
    /// under the join token>`. EC2 user data is readable from inside the instance (the
    /// metadata service answers any local process, the workload included), so it carries
    /// this instead of the join token: it registers that one node, named after the instance,
    /// while the instance's record exists and before the node holds a credential, and
    /// nothing else. Every controller derives the same token from the shared join token; a
    /// rotated join token invalidates the bootstrap tokens of instances not yet registered.
    pub fn bootstrap_token(&self, instance: Uuid) -> String {
        format!(
            "{BOOTSTRAP_PREFIX}{instance}.{}",
            bootstrap_mac(&self.get(), instance)
        )
    }

    /// The instance a bootstrap token was made for, if it is one under the current join
    /// token. The MAC is compared in constant time.
    pub fn bootstrap_instance(&self, token: &str) -> Option<Uuid> {
        let (instance, mac) = token.strip_prefix(BOOTSTRAP_PREFIX)?.split_once('.')?;
        let instance = Uuid::parse_str(instance).ok()?;
        let expected = bootstrap_mac(&self.get(), instance);
        crate::http::same_secret(mac, &expected).then_some(instance)
    }
}

/// How a bootstrap token starts (see `JoinToken::bootstrap_token`).
pub const BOOTSTRAP_PREFIX: &str = "strata-boot.";

fn bootstrap_mac(join: &str, instance: Uuid) -> String {
    use hmac::{Hmac, Mac};
    // HMAC accepts a key of any length (RFC 2104), so this cannot fail.
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(join.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(b"strata instance bootstrap\0");
    mac.update(instance.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Limits a node enforces on what clients and agents may add.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_nodes: u64,
    pub max_tiers: u64,
}

/// A running controller node. Shared by every handler through an `Arc`.
pub struct Controller {
    pub id: NodeId,
    pub raft: Raft,
    pub state: StateMachineStore,
    pub log: LogStore,
    pub peers: PeerClient,
    pub tokens: Tokens,
    pub limits: Limits,
    pub write_timeout: Duration,
    /// Heartbeat memory; meaningful only while this node leads. Shared with the state
    /// machine's applied hook (`wake_after_apply`).
    pub liveness: Arc<Liveness>,
    /// The autoscaler's metric windows and decision memories; meaningful only while this
    /// node leads.
    pub autoscaler: Arc<crate::autoscaler::Autoscaler>,
    /// Client commands on their way into a (batched) log entry.
    batcher: mpsc::UnboundedSender<Pending>,
    /// Client commands on their way to the leader, when this node follows.
    pub forwarder: Forwarder,
    /// Whether this node is in touch with a quorum of voters.
    pub quorum: Quorum,
}

impl Controller {
    /// Opens the stores, starts Raft and, where this node is the one to do it, initialises the
    /// cluster.
    /// Starts the node; `peer_transport` is how it reaches its peers (plain or TLS).
    pub async fn start(
        config: &Config,
        tokens: Tokens,
        peer_transport: strata_api::tls::Transport,
    ) -> anyhow::Result<Arc<Controller>> {
        use anyhow::Context;
        tokio::fs::create_dir_all(&config.data_dir)
            .await
            .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
        let (log, state) = crate::store::open(&config.data_dir)
            .await
            .context("open node store")?;
        let heartbeat = config.raft_heartbeat.as_millis().max(10);
        let election = config.election_timeout.as_millis().max(heartbeat * 2);
        let raft_config = openraft::Config {
            cluster_name: "strata".to_string(),
            // openraft 0.9 also uses the heartbeat interval as the deadline of every
            // AppendEntries (replication/mod.rs); too short a one starves a follower catching
            // up under load, whose larger requests keep timing out and being resent.
            heartbeat_interval: heartbeat,
            election_timeout_min: election,
            // openraft 0.9 waits `leader_lease` (= election_timeout_max) plus a random
            // election timeout after the last heartbeat of a known leader (RaftCore::
            // handle_tick_election), so failover takes about 2.2x-2.4x `election`. A narrow
            // random window costs an occasional split vote, retried after one more timeout.
            election_timeout_max: election * 6 / 5,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs.max(1)),
            // Keep some log after a snapshot so a briefly lagging follower catches up from the
            // log instead of a full snapshot.
            max_in_snapshot_log_to_keep: (config.snapshot_logs / 5).clamp(1, 1000),
            purge_batch_size: 256,
            // Small enough that one AppendEntries is persisted well within its deadline.
            max_payload_entries: 64,
            install_snapshot_timeout: 2_000,
            ..openraft::Config::default()
        }
        .validate()
        .context("validate raft config")?;
        let peers = PeerClient::new(tokens.cluster_secret.clone(), peer_transport)
            .context("build the peer client")?;
        let network = NetworkFactory {
            client: peers.clone(),
        };
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log.clone(),
            state.clone(),
        )
        .await
        .context("start raft")?;

        let liveness = Arc::new(Liveness::default());
        let autoscaler = Arc::new(crate::autoscaler::Autoscaler::default());
        state.on_applied(wake_after_apply(
            liveness.clone(),
            autoscaler.clone(),
            raft.clone(),
        ));

        let quorum = Quorum::start(
            raft.clone(),
            peers.clone(),
            config.node_id,
            Duration::from_millis(heartbeat),
            config.quorum_timeout.as_std(),
            // openraft campaigns no sooner than leader_lease (election_timeout_max) plus
            // election_timeout_min after the last heartbeat; answers older than one election
            // timeout plus two probe rounds no longer speak for a peer.
            Duration::from_millis(election + heartbeat * 2),
            Duration::from_millis(election),
        );
        let forwarder = Forwarder::start(peers.clone(), config.write_timeout.as_std());
        let (batcher, queue) = mpsc::unbounded_channel();
        tokio::spawn(run_batcher(raft.clone(), queue));
        let controller = Arc::new(Controller {
            id: config.node_id,
            raft,
            state,
            log,
            peers,
            tokens,
            limits: Limits {
                max_nodes: config.max_nodes,
                max_tiers: config.max_tiers,
            },
            write_timeout: config.write_timeout.as_std(),
            liveness,
            autoscaler,
            batcher,
            forwarder,
            quorum,
        });
        controller.bootstrap(config).await?;
        Ok(controller)
    }

    async fn bootstrap(&self, config: &Config) -> anyhow::Result<()> {
        use anyhow::Context;
        let initialized = self
            .raft
            .is_initialized()
            .await
            .context("read raft state")?;
        if initialized {
            tracing::info!(node = self.id, "rejoining the cluster from the data dir");
            return Ok(());
        }
        let members: BTreeMap<NodeId, BasicNode> = match &config.peers {
            None => BTreeMap::from([(self.id, BasicNode::new(config.advertised_address()))]),
            Some(peers) => {
                if !peers.0.contains_key(&self.id) {
                    anyhow::bail!("--peers does not include this node's id {}", self.id);
                }
                let lowest = peers.0.keys().next().copied();
                if lowest != Some(self.id) {
                    tracing::info!(
                        node = self.id,
                        "waiting for node {} to initialise the cluster",
                        lowest.unwrap_or_default()
                    );
                    return Ok(());
                }
                peers
                    .0
                    .iter()
                    .map(|(id, address)| (*id, BasicNode::new(address)))
                    .collect()
            }
        };
        match self.raft.initialize(members.clone()).await {
            Ok(()) => {
                tracing::info!(node = self.id, members = ?members.keys().collect::<Vec<_>>(), "initialised the cluster");
                Ok(())
            }
            // Another path (a leader's append) got here first: nothing to do.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(error) => Err(anyhow::anyhow!("initialise the cluster: {error}")),
        }
    }

    /// Whether this node is the Raft leader right now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The leader this node knows of, with its address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        // Every write asks this: read the metrics in place rather than cloning them.
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let address = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|node| node.addr.clone())?;
        Some((leader, address))
    }

    /// Proposes `command` and returns its result once applied, forwarding to the leader when
    /// this node is not the leader.
    ///
    /// A node without a quorum refuses at once; one that loses it while the write is on its
    /// way answers at once that the outcome is unknown (the entry may still commit if the
    /// partition heals), instead of holding the client for the whole write timeout.
    pub async fn propose(&self, command: Command) -> Result<CommandResult, ClusterError> {
        self.refuse_without_quorum()?;
        let timeout = self.write_timeout;
        tokio::select! {
            outcome = tokio::time::timeout(timeout, self.propose_until_done(command)) => {
                outcome.map_err(|_| ClusterError::Timeout(timeout))?
            }
            () = self.quorum.lost() => Err(ClusterError::OutcomeUnknown(format!(
                "node {} lost contact with a quorum of voters while the write was in flight",
                self.id
            ))),
        }
    }

    /// `Err(NoQuorum)` when this node has not been in touch with a quorum of voters lately.
    pub fn refuse_without_quorum(&self) -> Result<(), ClusterError> {
        let view = self.quorum.view();
        if view.has_quorum {
            return Ok(());
        }
        Err(ClusterError::NoQuorum(
            format!(
                "node {} has not been in touch with a quorum of voters for {} ms (reachable: {:?}); try another member",
                self.id, view.millis_since_quorum, view.reachable
            ),
            self.cluster_status().members,
        ))
    }

    async fn propose_until_done(&self, command: Command) -> Result<CommandResult, ClusterError> {
        let mut backoff = RetryBackoff::new();
        // The leader named by a node that said it no longer leads, to try next.
        let mut named_by_old_leader: Option<(NodeId, String)> = None;
        loop {
            // A follower that knows the leader forwards at once; only a node that believes it
            // leads, or knows no leader, asks its own Raft (which answers with a hint).
            let leader_hint = match named_by_old_leader.take().or_else(|| self.leader()) {
                // A leader not heard from lately may be cut off: forwarding to it could only
                // end in `outcome-unknown` after the write timeout. Wait for it or a new one.
                Some(known) if known.0 != self.id && !self.quorum.recently_heard(known.0) => {
                    backoff.wait().await;
                    continue;
                }
                Some(known) if known.0 != self.id => Some(known),
                _ => match self.propose_local(command.clone()).await {
                    Ok(result) => return Ok(result),
                    Err(LocalWriteError::NotLeader(hint)) => hint,
                    Err(LocalWriteError::Failed(error)) => return Err(error),
                },
            };
            match leader_hint {
                Some((leader, address)) if leader != self.id => {
                    match self.forwarder.forward(&address, command.clone()).await {
                        Ok(ForwardedWrite::Applied(result)) => return Ok(result),
                        Ok(ForwardedWrite::NotLeader { leader }) => named_by_old_leader = leader,
                        Ok(ForwardedWrite::Failed(error)) => {
                            return Err(ClusterError::NoLeader(error))
                        }
                        // Not delivered, or refused before proposing: safe to try again once a
                        // leader is known.
                        Err(ForwardFailure::NotDelivered) => {}
                        Err(ForwardFailure::NotReady) => {
                            tracing::debug!("leader not ready for a forwarded write")
                        }
                        Err(ForwardFailure::Unknown(error)) => {
                            return Err(ClusterError::OutcomeUnknown(error))
                        }
                    }
                }
                _ => {}
            }
            backoff.wait().await;
        }
    }

    /// Proposes on this node if it is the leader. The command is stamped with this node's
    /// clock here, so followers never decide times.
    pub async fn propose_local(&self, command: Command) -> Result<CommandResult, LocalWriteError> {
        match batch_key(&command) {
            Some(_) => {
                let (reply, answer) = oneshot::channel();
                if self.batcher.send(Pending { command, reply }).is_err() {
                    return Err(LocalWriteError::Failed(ClusterError::ShuttingDown));
                }
                answer
                    .await
                    .unwrap_or(Err(LocalWriteError::Failed(ClusterError::ShuttingDown)))
            }
            None => write_entry(&self.raft, command).await,
        }
    }

    /// Waits until this node's state machine reflects every write acknowledged before the call
    /// (ReadIndex). Fails when no leader can confirm its leadership in time.
    pub async fn linearizable(&self) -> Result<(), ClusterError> {
        self.refuse_without_quorum()?;
        let timeout = self.write_timeout;
        tokio::select! {
            outcome = tokio::time::timeout(timeout, self.linearizable_until_done()) => {
                outcome.map_err(|_| ClusterError::Timeout(timeout))?
            }
            () = self.quorum.lost() => self.refuse_without_quorum(),
        }
    }

    async fn linearizable_until_done(&self) -> Result<(), ClusterError> {
        let mut backoff = RetryBackoff::new();
        loop {
            let hint = match self.local_read_index().await {
                ReadIndex::Index(index) => return self.wait_applied(index).await,
                ReadIndex::NotLeader { leader } => leader,
                ReadIndex::Failed(error) => {
                    tracing::debug!(%error, "read index on this node");
                    None
                }
                // Only a peer's request is answered so.
                ReadIndex::NotMember { .. } => None,
            };
            // Only a leader heard from lately: one cut off would hold the call in a blackhole.
            let hint = hint
                .filter(|(leader, _)| *leader != self.id && self.quorum.recently_heard(*leader));
            if let Some((leader, address)) = hint {
                // A read may be asked again: a short limit per call, so a leader that goes
                // away mid-call costs one retry, not the whole timeout.
                let per_call = self.write_timeout.min(Duration::from_secs(2));
                let route = format!("{}?from={}", routes::READ_INDEX, self.id);
                let answer: Result<ReadIndex, PeerError> =
                    self.peers.call(&address, &route, &(), per_call).await;
                match answer {
                    Ok(ReadIndex::Index(index)) => return self.wait_applied(index).await,
                    Ok(ReadIndex::NotMember { members }) => {
                        return Err(ClusterError::NotMember(
                            format!(
                                "node {} is no longer a member of the cluster (leader {leader} says so); ask a member",
                                self.id
                            ),
                            members,
                        ))
                    }
                    Ok(other) => tracing::debug!(leader, answer = ?other, "read index from leader"),
                    Err(error) => tracing::debug!(leader, %error, "read index from leader"),
                }
            }
            backoff.wait().await;
        }
    }

    /// The leader side of a peer's ReadIndex request: `local_read_index`, but `NotMember`
    /// for a node this leader's membership does not hold.
    pub async fn read_index_for(&self, request: &ReadIndexRequest) -> ReadIndex {
        let answer = self.local_read_index().await;
        let Some(from) = request.from else {
            return answer;
        };
        if !matches!(answer, ReadIndex::Index(_)) {
            return answer;
        }
        // On every follower read: a look at the membership under the metrics' borrow; the
        // members are listed only for the rare node that is not one.
        let member = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .any(|(id, _)| *id == from);
        if member {
            answer
        } else {
            ReadIndex::NotMember {
                members: self.cluster_status().members,
            }
        }
    }

    /// The leader side of ReadIndex: confirms leadership with a quorum, then returns the index
    /// a read must observe.
    pub async fn local_read_index(&self) -> ReadIndex {
        match self.raft.get_read_log_id().await {
            Ok((read_log_id, _applied)) => ReadIndex::Index(read_log_id.map_or(0, |id| id.index)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
                ReadIndex::NotLeader {
                    leader: leader_of(&forward),
                }
            }
            Err(error) => ReadIndex::Failed(error.to_string()),
        }
    }

    async fn wait_applied(&self, index: u64) -> Result<(), ClusterError> {
        if self.applied_index() >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(self.write_timeout))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|_| ClusterError::Timeout(self.write_timeout))
    }

    pub fn applied_index(&self) -> u64 {
        self.state
            .read(|machine| machine.last_applied.map_or(0, |id| id.index))
    }

    /// Last heartbeat and host metrics of every node, as the leader knows them: heartbeats go
    /// to the leader only and live in its memory, so a follower asks it. Empty when no leader
    /// answers within a second (the node records are still served, without heartbeat data).
    pub async fn heartbeats(&self) -> HashMap<String, (u64, HostMetrics)> {
        match self.leader() {
            Some((leader, _)) if leader == self.id => self.liveness.observations(),
            Some((leader, address)) => {
                let answer: Result<HashMap<String, (u64, HostMetrics)>, PeerError> = self
                    .peers
                    .call(&address, routes::LIVENESS, &(), Duration::from_secs(1))
                    .await;
                answer.unwrap_or_else(|error| {
                    tracing::debug!(leader, %error, "heartbeat data from the leader");
                    HashMap::new()
                })
            }
            None => HashMap::new(),
        }
    }

    /// The latest LB report of every load-balancer node (node, heard at, report), as the
    /// leader knows them; like `heartbeats`, a follower asks the leader, and gets nothing when
    /// no leader answers within a second.
    pub async fn lb_reports(&self) -> Vec<(String, u64, strata_api::LbReport)> {
        match self.leader() {
            Some((leader, _)) if leader == self.id => self.liveness.lb_reports(),
            Some((leader, address)) => self
                .peers
                .call(&address, routes::LB_REPORTS, &(), Duration::from_secs(1))
                .await
                .unwrap_or_else(|error: PeerError| {
                    tracing::debug!(leader, %error, "LB reports from the leader");
                    Vec::new()
                }),
            None => Vec::new(),
        }
    }

    /// This node's view of the cluster.
    pub fn cluster_status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let quorum = self.quorum.view();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        ClusterStatus {
            node_id: self.id,
            role: role.to_string(),
            leader_id: metrics.current_leader,
            term: metrics.current_term,
            // openraft 0.9 metrics expose the applied, not the committed, index; on the leader
            // applied trails committed by at most the entries in flight to the state machine.
            commit_index: metrics.last_applied.map_or(0, |id| id.index),
            applied_index: metrics.last_applied.map_or(0, |id| id.index),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map_or(0, |id| id.index),
            members,
            has_quorum: quorum.has_quorum,
            millis_since_quorum: quorum.millis_since_quorum,
        }
    }

    /// Applies a membership change on the leader, forwarding it there from a follower.
    pub async fn change_membership(&self, change: MemberChange) -> Result<(), ClusterError> {
        let timeout = self.write_timeout * 3;
        let attempt = async {
            let mut backoff = RetryBackoff::new();
            // After a leader change mid-way, the change may already be (partly) applied: a
            // retry treats "already done" as success.
            let mut retry = false;
            loop {
                let outcome = match self.leader() {
                    Some((leader, _)) if leader == self.id => {
                        Some(self.change_membership_local(change.clone(), retry).await)
                    }
                    Some((_, address)) => {
                        let request = MembershipRequest {
                            change: change.clone(),
                            retry,
                        };
                        let answer: Result<Result<(), MembershipFailure>, PeerError> = self
                            .peers
                            .call(&address, routes::MEMBERS, &request, timeout)
                            .await;
                        match answer {
                            Ok(Ok(())) => Some(Ok(())),
                            Ok(Err(MembershipFailure::NotLeader)) => None,
                            Ok(Err(MembershipFailure::Refused(error))) => {
                                Some(Err(ClusterError::Membership(error)))
                            }
                            Ok(Err(MembershipFailure::NotCaughtUp(error))) => {
                                Some(Err(ClusterError::NotCaughtUp(error)))
                            }
                            Err(PeerError::Unreachable { .. }) => None,
                            Err(error) => {
                                Some(Err(ClusterError::OutcomeUnknown(error.to_string())))
                            }
                        }
                    }
                    None => None,
                };
                match outcome {
                    None | Some(Err(ClusterError::NoLeader(_))) => {
                        retry = true;
                        backoff.wait().await;
                    }
                    Some(result) => return result,
                }
            }
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ClusterError::Timeout(timeout))?
    }

    /// The leader side of `change_membership`. With `retry`, a change found already made
    /// (the node already removed) counts as done.
    pub async fn change_membership_local(
        &self,
        change: MemberChange,
        retry: bool,
    ) -> Result<(), ClusterError> {
        match change {
            MemberChange::Add { id, address, voter } => self.add_member(id, address, voter).await,
            MemberChange::Remove { id } => self.remove_member(id, retry).await,
        }
    }

    /// Adds a node as a learner, waits (at most `CATCH_UP_WAIT`) for it to catch up, then (if
    /// `voter`) promotes it. openraft's blocking `add_learner` would wait for the learner
    /// however long it takes, so an unreachable member used to hold the request until the
    /// caller's deadline and then be answered "outcome unknown", although it had been added.
    /// What the current membership makes of the request is decided by `plan_add`.
    async fn add_member(
        &self,
        id: NodeId,
        address: String,
        voter: bool,
    ) -> Result<(), ClusterError> {
        let step = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let members: Vec<(NodeId, &str, bool)> = membership
                .nodes()
                .map(|(member, node)| (*member, node.addr.as_str(), voters.contains(member)))
                .collect();
            plan_add(&members, id, &address, voter).map_err(ClusterError::Membership)?
        };
        match step {
            AddStep::Nothing => return Ok(()),
            AddStep::Promote => {}
            AddStep::AddLearner => {
                self.raft
                    .add_learner(id, BasicNode::new(address.clone()), false)
                    .await
                    .map_err(membership_error)?;
            }
        }
        if !self.caught_up(id, CATCH_UP_WAIT).await {
            return Err(ClusterError::NotCaughtUp(format!(
                "node {id} was added as a learner at {address} but has not caught up with the log within {CATCH_UP_WAIT:?} (is it running and reachable?); {}",
                if voter {
                    "it is not a voter yet: repeat the request once it is up"
                } else {
                    "it will catch up when it can be reached"
                }
            )));
        }
        if voter {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(membership_error)?;
        }
        Ok(())
    }

    /// Whether `id`'s replication reached the leader's last log index as of now (later
    /// writes do not move the goal) within `wait`.
    async fn caught_up(&self, id: NodeId, wait: Duration) -> bool {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + wait;
        let last = metrics.borrow().last_log_index.unwrap_or(0);
        loop {
            let done = {
                let now = metrics.borrow();
                now.replication
                    .as_ref()
                    .and_then(|replication| replication.get(&id))
                    .and_then(|matched| matched.as_ref())
                    .is_some_and(|matched| matched.index >= last)
            };
            if done {
                return true;
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Removes a node from the voters and from the cluster.
    async fn remove_member(&self, id: NodeId, retry: bool) -> Result<(), ClusterError> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if membership.get_node(&id).is_none() {
            if retry {
                return Ok(());
            }
            return Err(ClusterError::Membership(format!(
                "node {id} is not a member"
            )));
        }
        let is_voter = membership.voter_ids().any(|voter| voter == id);
        if is_voter {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(membership_error)?;
        } else {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(membership_error)?;
        }
        Ok(())
    }
}

/// The state machine's applied hook: on the leader, every applied command wakes what it
/// concerns (`Touch::of`, `Liveness::after_write`): the held heartbeats of the nodes whose
/// assignments may have changed, and the planners when they have work. A batch touches each
/// of its commands.
///
/// Why here and not where the write was proposed: a write sent to a follower is proposed on
/// the leader by the forwarder, and a command may apply after its proposer gave up waiting;
/// the leader applying it is the one place that sees every command, and the only node whose
/// planners and held heartbeats act. On followers the hook does nothing.
fn wake_after_apply(
    liveness: Arc<Liveness>,
    autoscaler: Arc<crate::autoscaler::Autoscaler>,
    raft: Raft,
) -> crate::store::AppliedHook {
    let metrics = raft.metrics();
    Box::new(move |store, requests| {
        if metrics.borrow().state != ServerState::Leader {
            return;
        }
        let mut commands: Vec<&Command> = requests.iter().map(|r| &r.command).collect();
        while let Some(command) = commands.pop() {
            match command {
                Command::Batch { commands: inner } => commands.extend(inner),
                Command::SetNodeFlags { .. } | Command::RegisterNode { .. } => {
                    // A cordon, drain or new node changes where the planners place, though
                    // no assignment changes until they act.
                    liveness.after_write(store, Touch::of(command));
                    liveness.wake.notify_one();
                }
                Command::PutTier { .. }
                | Command::ScaleTier { .. }
                | Command::ResumeAutoscaling { .. } => {
                    // New policies, bounds or a manual count: the autoscaler re-evaluates
                    // now rather than at its next tick.
                    liveness.after_write(store, Touch::of(command));
                    autoscaler.wake.notify_one();
                }
                _ => liveness.after_write(store, Touch::of(command)),
            }
        }
    })
}

/// How often `snapshot_by_size` looks at the log.
const SNAPSHOT_SIZE_CHECK: Duration = Duration::from_millis(500);

impl Controller {
    /// Triggers a snapshot whenever the log since the last one holds more than `limit_bytes`,
    /// until `stop` is cancelled. openraft's policy counts entries only
    /// (`SnapshotPolicy::LogsSinceLast`), and a batched entry holds anywhere from one to 64
    /// writes, so without this a node under heavy write load keeps up to 64 times more log in
    /// memory than under light load. The snapshot is followed by openraft's usual purge.
    pub async fn snapshot_by_size(
        &self,
        limit_bytes: u64,
        stop: tokio_util::sync::CancellationToken,
    ) {
        // The applied index and time of the last trigger: no new one until a snapshot reaches
        // that index, or a while has passed (a build that failed).
        let mut triggered: Option<(u64, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(SNAPSHOT_SIZE_CHECK) => {}
            }
            let (snapshot_index, applied) = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                (
                    metrics.snapshot.map_or(0, |id| id.index),
                    metrics.last_applied.map_or(0, |id| id.index),
                )
            };
            if let Some((at_index, at_time)) = triggered {
                if snapshot_index < at_index && at_time.elapsed() < Duration::from_secs(30) {
                    continue;
                }
            }
            let bytes = self.log.bytes_after(snapshot_index);
            if bytes <= limit_bytes {
                continue;
            }
            match self.raft.trigger().snapshot().await {
                Ok(()) => {
                    tracing::info!(
                        bytes,
                        limit_bytes,
                        applied,
                        "the log since the last snapshot outgrew its limit; snapshotting"
                    );
                    triggered = Some((applied, tokio::time::Instant::now()));
                }
                Err(error) => tracing::warn!(%error, "trigger a snapshot"),
            }
        }
    }
}

/// A client command waiting for the batcher.
pub struct Pending {
    command: Command,
    reply: oneshot::Sender<Result<CommandResult, LocalWriteError>>,
}

/// Client commands may share a log entry, also several on one object (each gets its own
/// revision at apply, `State::next_revision`); this is the object a command is about (`None`:
/// never batched, such as the planners' commands).
fn batch_key(command: &Command) -> Option<String> {
    match command {
        Command::PutTier { spec, .. } => Some(format!("tier/{}", spec.name)),
        Command::ScaleTier { name, .. }
        | Command::DeleteTier { name, .. }
        | Command::ResumeAutoscaling { name, .. }
        | Command::AutoscaleTier { name, .. } => Some(format!("tier/{name}")),
        Command::RegisterNode { registration, .. } => {
            Some(format!("node/{}", registration.node_id))
        }
        Command::RevokeNode { node } => Some(format!("node/{node}")),
        _ => None,
    }
}

/// Batched entries one node may have proposed and not yet seen applied. One: every client
/// write that arrives during a commit round rides in the next entry. Each entry costs the
/// leader a serial fsync, an AppendEntries round and an apply; measured with 64 clients on
/// 2 cores, 1 entry in flight gave about 6,600-7,300 writes/s, 2 about 5,900-6,900, 4 about
/// 5,200 and 8 about 4,200, with the p99 lowest at 1 and 2 (`bench/README.md`).
const MAX_BATCHES_IN_FLIGHT: usize = 1;
/// Commands in one entry at most.
const MAX_BATCH: usize = 64;

/// Groups concurrent client writes into log entries.
///
/// Why: openraft 0.9 appends and fsyncs each client write as its own entry, one at a time
/// (`RaftCore::append_to_log` waits for the flush before the next message), so the leader's
/// write rate would be one per fsync. While a batched entry is in flight, new commands queue
/// up here and go out together in the next entry, so the batch grows with the load. Commands
/// on one object share entries too: apply runs them in order, each with its own revision, so
/// a hot object (an autoscaler, operators and CI scaling one tier) costs no more fsyncs than
/// distinct objects do, and compare-and-set between them stays exact.
async fn run_batcher(raft: Raft, queue: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    let mut gatherer = Gatherer::new(queue);
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let batch = gatherer.next_batch(MAX_BATCH, |_, _| true).await;
        let Some(batch) = batch else {
            return;
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            submit_batch(&raft, batch).await;
            drop(permit);
        });
    }
}

async fn submit_batch(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        if let Some(pending) = batch.pop() {
            let result = write_entry(raft, pending.command).await;
            let _ = pending.reply.send(result);
        }
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.command, pending.reply))
        .unzip();
    match write_entry(raft, Command::Batch { commands }).await {
        Ok(CommandResult::Batch { results }) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Ok(other) => {
            let error = ClusterError::OutcomeUnknown(format!("a batch produced {other:?}"));
            for reply in replies {
                let _ = reply.send(Err(LocalWriteError::Failed(error.clone())));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Proposes one entry on this node, stamped with this node's clock (followers never decide
/// times), and waits until it is applied.
async fn write_entry(raft: &Raft, command: Command) -> Result<CommandResult, LocalWriteError> {
    let request = Request {
        at_ms: now_ms(),
        command,
    };
    let proposal = match Proposal::new(request) {
        Ok(proposal) => proposal,
        Err(error) => {
            return Err(LocalWriteError::Failed(ClusterError::Internal(format!(
                "encode the command: {error}"
            ))))
        }
    };
    match raft.client_write(proposal).await {
        Ok(response) => Ok(response.data),
        // openraft answers ForwardToLeader either before appending (not the leader) or when
        // the entry was truncated away by a new leader; both mean "not applied", so a retry
        // cannot apply the command twice (openraft 0.9 RaftCore, DeleteConflictLog).
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
            Err(LocalWriteError::NotLeader(leader_of(&forward)))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => Err(
            LocalWriteError::Failed(ClusterError::Membership(error.to_string())),
        ),
        Err(RaftError::Fatal(_)) => Err(LocalWriteError::Failed(ClusterError::ShuttingDown)),
    }
}

/// Why a local proposal did not produce a result.
#[derive(Clone, Debug)]
pub enum LocalWriteError {
    NotLeader(Option<(NodeId, String)>),
    Failed(ClusterError),
}

fn leader_of(forward: &ForwardToLeader<NodeId, BasicNode>) -> Option<(NodeId, String)> {
    match (&forward.leader_id, &forward.leader_node) {
        (Some(id), Some(node)) => Some((*id, node.addr.clone())),
        _ => None,
    }
}

fn membership_error(error: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ClusterError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            ClusterError::NoLeader(format!("not the leader (leader: {:?})", forward.leader_id))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            ClusterError::Membership(error.to_string())
        }
        RaftError::Fatal(_) => ClusterError::ShuttingDown,
    }
}

/// What adding member `id` at `address` takes, given the members (id, address, voter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddStep {
    /// It is a member already, as asked: the request is done (a retry, or a repeated call).
    Nothing,
    /// A learner at that address, to be made a voter.
    Promote,
    /// A new member.
    AddLearner,
}

/// Decides what an add-member request means against the current membership. openraft's
/// `add_learner` keeps an existing member's address (`ChangeMembers::AddNodes` never replaces
/// a node), so a request for a member id at another address used to be answered 200 while
/// the member stayed where it was; and a new id at a member's address would have had the
/// leader replicate to one process under two ids. Both are refused (409) instead: moving a
/// member is a removal, then an add. The same member at the same address is no change (which
/// makes a retried request succeed), except that a voter is not made a learner by asking.
fn plan_add(
    members: &[(NodeId, &str, bool)],
    id: NodeId,
    address: &str,
    voter: bool,
) -> Result<AddStep, String> {
    if let Some((other, _, _)) = members
        .iter()
        .find(|(member, at, _)| *member != id && *at == address)
    {
        return Err(format!("{address} is the address of member {other}"));
    }
    match members.iter().find(|(member, _, _)| *member == id) {
        None => Ok(AddStep::AddLearner),
        Some((_, at, _)) if *at != address => Err(format!(
            "node {id} is already a member at {at}; to move it, remove it and add it again"
        )),
        Some((_, _, true)) if !voter => Err(format!(
            "node {id} is a voter; adding it as a learner would not demote it"
        )),
        Some((_, _, is_voter)) if *is_voter || !voter => Ok(AddStep::Nothing),
        Some(_) => Ok(AddStep::Promote),
    }
}

/// How long adding a member waits for it to catch up before answering.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Unix milliseconds from the system clock. Only leaders call this, to stamp commands.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Exponential backoff with jitter for retries while a leader is being elected.
struct RetryBackoff {
    next: Duration,
}

impl RetryBackoff {
    fn new() -> Self {
        RetryBackoff {
            next: Duration::from_millis(20),
        }
    }

    async fn wait(&mut self) {
        use rand::Rng;
        let jitter = rand::thread_rng().gen_range(0..=self.next.as_millis() as u64 / 2);
        tokio::time::sleep(self.next + Duration::from_millis(jitter)).await;
        self.next = (self.next * 2).min(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod membership_tests {
    use super::{plan_add, AddStep};

    #[test]
    fn adding_a_member_against_the_current_membership() {
        let members = [
            (1, "10.0.0.1:7001", true),
            (2, "10.0.0.2:7001", true),
            (3, "10.0.0.3:7001", false),
        ];
        let cases: [(u64, &str, bool, Result<AddStep, &str>); 8] = [
            (4, "10.0.0.4:7001", true, Ok(AddStep::AddLearner)),
            (4, "10.0.0.4:7001", false, Ok(AddStep::AddLearner)),
            // What the fuzzer sent: a member's id at another member's address.
            (2, "10.0.0.1:7001", true, Err("10.0.0.1:7001 is the address of member 1")),
            (4, "10.0.0.2:7001", true, Err("10.0.0.2:7001 is the address of member 2")),
            (2, "10.0.0.9:7001", true, Err("node 2 is already a member at 10.0.0.2:7001; to move it, remove it and add it again")),
            (2, "10.0.0.2:7001", true, Ok(AddStep::Nothing)),
            (3, "10.0.0.3:7001", true, Ok(AddStep::Promote)),
            (2, "10.0.0.2:7001", false, Err("node 2 is a voter; adding it as a learner would not demote it")),
        ];
        for (id, address, voter, expected) in cases {
            assert_eq!(
                plan_add(&members, id, address, voter),
                expected.map_err(str::to_string),
                "add {id} at {address} (voter: {voter})"
            );
        }
        assert_eq!(
            plan_add(&members, 3, "10.0.0.3:7001", false),
            Ok(AddStep::Nothing)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_token_names_its_instance_and_only_under_the_join_token_it_came_from() {
        let join = JoinToken::new("join-secret".to_string());
        let instance = Uuid::from_u128(7);
        let token = join.bootstrap_token(instance);
        assert!(
            token.starts_with(&format!("{BOOTSTRAP_PREFIX}{instance}.")),
            "{token}"
        );
        assert!(!token.contains("join-secret"), "{token}");
        assert_eq!(join.bootstrap_instance(&token), Some(instance));

        // Another instance's uuid with this MAC, a cut MAC, garbage: none is a token.
        let mac = token.rsplit('.').next().unwrap_or_default();
        let other = format!("{BOOTSTRAP_PREFIX}{}.{mac}", Uuid::from_u128(8));
        assert_eq!(join.bootstrap_instance(&other), None);
        assert_eq!(join.bootstrap_instance(&token[..token.len() - 1]), None);
        assert_eq!(
            join.bootstrap_instance(&format!("{BOOTSTRAP_PREFIX}{instance}.")),
            None
        );
        assert_eq!(join.bootstrap_instance(BOOTSTRAP_PREFIX), None);
        assert_eq!(join.bootstrap_instance("join-secret"), None);

        // Every controller derives the same token; a rotated join token voids it.
        assert_eq!(
            JoinToken::new("join-secret".to_string()).bootstrap_token(instance),
            token
        );
        join.replace("rotated".to_string());
        assert_eq!(join.bootstrap_instance(&token), None);
        assert_eq!(
            join.bootstrap_instance(&join.bootstrap_token(instance)),
            Some(instance)
        );
    }
}

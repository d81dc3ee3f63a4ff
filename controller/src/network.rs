//! Raft peer traffic over HTTP: the client half (`RaftNetworkFactory`), and the peer calls the
//! API layer makes to the leader (forwarded writes, read-index requests).
//!
//! Every request carries the cluster secret as a bearer token; the server half lives in
//! `http::peer`. Bodies are JSON: openraft's messages derive serde with the `serde` feature,
//! and JSON keeps the wire readable when debugging a cluster.
//!
//! Error mapping follows openraft 0.9's `RaftNetwork` docs: a peer we could not reach at all is
//! `Unreachable` (openraft backs off before retrying), any other transport failure is
//! `Network`, and an error the remote Raft returned is `RemoteError`.

use std::time::Duration;
use strata_api::tls::Transport;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload, RaftLogId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::raft_types::{Entry, NodeId, TypeConfig};

/// Peer routes, shared with the server half.
pub mod routes {
    pub const APPEND: &str = "/raft/append";
    pub const VOTE: &str = "/raft/vote";
    pub const SNAPSHOT: &str = "/raft/snapshot";
    pub const WRITE_BATCH: &str = "/raft/write-batch";
    pub const READ_INDEX: &str = "/raft/read-index";
    pub const MEMBERS: &str = "/raft/members";
    pub const LIVENESS: &str = "/raft/liveness";
    pub const LB_REPORTS: &str = "/raft/lb-reports";
    pub const CUSTOM_METRIC: &str = "/raft/custom-metric";
    pub const PING: &str = "/raft/ping";
}

/// An HTTP client for peers, shared by every Raft connection of this node.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    secret: String,
    /// Plain HTTP or TLS (with this node's certificate as the client's).
    transport: Transport,
}

/// How one peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Nothing was delivered: connection refused, host unreachable, or connect timed out.
    #[error("peer {address} unreachable: {source}")]
    Unreachable {
        address: String,
        source: reqwest::Error,
    },
    /// The request may or may not have been delivered.
    #[error("peer {address}: {source}")]
    Transport {
        address: String,
        source: reqwest::Error,
    },
    #[error("peer {address} answered {status}: {body}")]
    Status {
        address: String,
        status: u16,
        body: String,
    },
}

impl PeerClient {
    pub fn new(secret: String, transport: Transport) -> Result<Self, reqwest::Error> {
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            // Well below a peer's --header-timeout (which also closes idle keep-alive
            // connections), so a pooled connection is never reused just as the peer closes it.
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let http = transport.apply(builder).build()?;
        Ok(PeerClient {
            http,
            secret,
            transport,
        })
    }

    /// The same client with a connection pool of its own: calls made through it never wait
    /// for a connection (or the runtime driving one) that other calls use.
    pub fn with_own_connections(&self) -> Result<PeerClient, reqwest::Error> {
        PeerClient::new(self.secret.clone(), self.transport.clone())
    }

    /// POSTs `body` as JSON to `route` on the peer at `address` and decodes the JSON answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        address: &str,
        route: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let response = self
            .http
            .post(format!("{}://{address}{route}", self.transport.scheme()))
            .bearer_auth(&self.secret)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|source| {
                if source.is_connect() {
                    PeerError::Unreachable {
                        address: address.to_string(),
                        source,
                    }
                } else {
                    PeerError::Transport {
                        address: address.to_string(),
                        source,
                    }
                }
            })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(PeerError::Status {
                address: address.to_string(),
                status: status.as_u16(),
                body,
            });
        }
        response
            .json()
            .await
            .map_err(|source| PeerError::Transport {
                address: address.to_string(),
                source,
            })
    }
}

/// The entries of one AppendEntries at most, in bytes of their commands' JSON (one entry is
/// sent however large it is).
///
/// openraft 0.9 bounds an AppendEntries by entry count only (`max_payload_entries`), and gives
/// each one the heartbeat interval as its deadline (replication/mod.rs). A batched entry can
/// carry a hundred tier writes or instance updates, so 64 of them can be tens of megabytes,
/// which no follower decodes and persists within 100 ms: the request times out, is sent
/// again, and the leader's lease runs out. Sending a prefix and answering
/// `AppendEntriesResponse::PartialSuccess` with its last log id is what openraft documents
/// for this ("the application is allowed to send just [a prefix] and return
/// PartialSuccess"; `raft/message/append_entries.rs`).
pub const APPEND_BYTES: usize = 256 * 1024;

/// How many of `entries`, from the first, fit `budget` bytes (at least one).
pub fn entries_within(entries: &[Entry], budget: usize) -> usize {
    let mut total = 0usize;
    for (index, entry) in entries.iter().enumerate() {
        // The log id, the entry's framing and a membership entry's nodes, roughly.
        total += 64;
        if let EntryPayload::Normal(proposal) = &entry.payload {
            total += proposal.json().len();
        }
        if index > 0 && total > budget {
            return index;
        }
    }
    entries.len()
}

/// Creates one `PeerConnection` per replication target.
pub struct NetworkFactory {
    pub client: PeerClient,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerConnection {
            client: self.client.clone(),
            target,
            address: node.addr.clone(),
        }
    }
}

pub struct PeerConnection {
    client: PeerClient,
    target: NodeId,
    address: String,
}

impl PeerConnection {
    async fn rpc<Req, Resp, E>(
        &self,
        route: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<NodeId, E>> = self
            .client
            .call(&self.address, route, request, option.hard_ttl())
            .await
            .map_err(|error| match error {
                PeerError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&error)),
                _ => RPCError::Network(NetworkError::new(&error)),
            })?;
        answer.map_err(|remote| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                BasicNode::new(&self.address),
                remote,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let mut request = request;
        // What openraft sent, cut to a byte budget (see `APPEND_BYTES`): the follower then
        // has all of it, and openraft sends the rest next.
        let cut = entries_within(&request.entries, APPEND_BYTES);
        let sent_last = if cut < request.entries.len() {
            request.entries.truncate(cut);
            request.entries.last().map(|entry| *entry.get_log_id())
        } else {
            None
        };
        let response = self.rpc(routes::APPEND, &request, &option).await?;
        Ok(match (response, sent_last) {
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (response, _) => response,
        })
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(routes::SNAPSHOT, &request, &option).await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(routes::VOTE, &request, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft_types::{LogId, Proposal};
    use crate::state::{Command, Request};

    fn entry(index: u64, reason_bytes: usize) -> Entry {
        let request = Request {
            at_ms: 1,
            command: Command::RecordEvent {
                object: "tier/web".to_string(),
                reason: "Test".to_string(),
                message: "x".repeat(reason_bytes),
            },
        };
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal::new(request).expect("encodes")),
        }
    }

    #[test]
    fn an_append_is_cut_to_its_byte_budget_but_always_carries_one_entry() {
        let small: Vec<Entry> = (1..=64).map(|index| entry(index, 100)).collect();
        assert_eq!(
            entries_within(&small, APPEND_BYTES),
            64,
            "small entries all fit"
        );
        let large: Vec<Entry> = (1..=64).map(|index| entry(index, 100_000)).collect();
        let cut = entries_within(&large, APPEND_BYTES);
        assert!((1..64).contains(&cut), "cut at {cut}");
        let sent: usize = large[..cut]
            .iter()
            .map(|entry| match &entry.payload {
                EntryPayload::Normal(proposal) => proposal.json().len(),
                _ => 0,
            })
            .sum();
        assert!(sent <= APPEND_BYTES, "{sent} bytes sent");
        let huge = vec![entry(1, APPEND_BYTES * 2), entry(2, 10)];
        assert_eq!(
            entries_within(&huge, APPEND_BYTES),
            1,
            "one entry goes however large"
        );
        assert_eq!(entries_within(&[], APPEND_BYTES), 0);
    }
}

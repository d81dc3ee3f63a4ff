//! The openraft type configuration shared by the store, the network and the API.

use std::fmt;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::state::{CommandResult, Request};

openraft::declare_raft_types!(
    /// Strata's Raft: u64 node ids, nodes known by their API address, commands in JSON.
    pub TypeConfig:
        D = Proposal,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;

/// What a normal log entry carries: a stamped `Request` and its JSON, encoded once by the
/// leader that proposed it.
///
/// Why: an entry is written to the leader's log, sent to every follower and written to each
/// follower's log. Carried as decoded structs, it was encoded and decoded at every one of
/// those steps; carried as JSON text it is copied verbatim into the log row and the
/// AppendEntries body (serde_json writes a `RawValue` as it is and reads one by scanning for
/// its end), and decoded once per node, when it is applied. Clones share one allocation,
/// which is what openraft's log reads for replication and apply make. The in-memory log
/// therefore holds each entry once, as text, on leader and followers alike.
#[derive(Clone)]
pub struct Proposal(Arc<ProposalInner>);

struct ProposalInner {
    json: Box<RawValue>,
    /// The request on the leader that proposed it, until it is applied (no need to decode
    /// what it just encoded; afterwards the log keeps only the text).
    decoded: Mutex<Option<Request>>,
}

impl Proposal {
    /// Encodes `request` for the log.
    pub fn new(request: Request) -> Result<Proposal, serde_json::Error> {
        let json = serde_json::value::to_raw_value(&request)?;
        Ok(Proposal(Arc::new(ProposalInner {
            json,
            decoded: Mutex::new(Some(request)),
        })))
    }

    /// The request, for applying it: the proposer's own copy, which leaves the log holding
    /// only the text, or else decoded from the text. A node applies each entry once per
    /// process, so the copy is never wanted twice (and decoding would still answer if it were).
    pub fn take_request(&self) -> Result<Request, serde_json::Error> {
        let taken = self
            .0
            .decoded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match taken {
            Some(request) => Ok(request),
            None => serde_json::from_str(self.0.json.get()),
        }
    }

    /// The JSON text as it is stored and sent.
    pub fn json(&self) -> &str {
        self.0.json.get()
    }
}

impl PartialEq for Proposal {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl fmt::Debug for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json())
    }
}

impl Serialize for Proposal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.json.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = Box::<RawValue>::deserialize(deserializer)?;
        Ok(Proposal(Arc::new(ProposalInner {
            json,
            decoded: Mutex::new(None),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    fn request() -> Request {
        Request {
            at_ms: 7,
            command: Command::DeleteTier {
                name: "web".to_string(),
                expected_version: Some(3),
            },
        }
    }

    /// A proposal travels as its JSON: through an entry's encoding and back it is the same
    /// request, decoded from the text.
    #[test]
    fn a_proposal_round_trips_through_an_entry() -> Result<(), serde_json::Error> {
        let proposal = Proposal::new(request())?;
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(2, 1), 9),
            payload: openraft::EntryPayload::Normal(proposal.clone()),
        };
        let text = serde_json::to_string(&entry)?;
        assert!(text.contains(proposal.json()), "{text}");
        let back: Entry = serde_json::from_str(&text)?;
        let openraft::EntryPayload::Normal(decoded) = back.payload else {
            panic!("not a normal entry: {text}");
        };
        assert_eq!(decoded, proposal);
        assert_eq!(decoded.take_request()?, request());
        // The proposer's copy, then the text once the copy is taken.
        assert_eq!(proposal.take_request()?, request());
        assert_eq!(proposal.take_request()?, request());
        Ok(())
    }

    /// Text that is not a request fails when applied, not silently.
    #[test]
    fn a_proposal_that_is_not_a_request_fails_to_decode() -> Result<(), serde_json::Error> {
        let proposal: Proposal = serde_json::from_str(r#"{"at_ms": 1, "command": 5}"#)?;
        assert!(proposal.take_request().is_err());
        Ok(())
    }
}

//! Followers' forwarding of client writes to the leader, several writes per request.
//!
//! A follower that takes a write sends the typed command to the leader's `/raft/write-batch`,
//! which proposes each command there and answers one `ForwardedWrite` per command, in order.
//! Writes that arrive while earlier forwards are on their way share the next request, so a
//! busy follower pays one HTTP round trip (and one encode and decode on each side) for many
//! writes instead of one each; a lone write goes out at once.
//!
//! What a failed request means for every write in it (the caller, `Controller::propose`,
//! decides whether to retry):
//! - the connection was refused or could not be made: nothing was delivered
//!   (`ForwardFailure::NotDelivered`), safe to retry;
//! - the leader answered 503 before proposing anything (`NotReady`), safe to retry;
//! - anything else after the request may have been delivered (`Unknown`): the writes may or may
//!   not have been applied, and are never retried blindly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::batch::Gatherer;
use crate::network::{routes, PeerClient, PeerError};
use crate::node::ForwardedWrite;
use crate::state::Command;

/// Forwarding requests one follower keeps in flight to the leader. More than one, so that a
/// write arriving just after a request left does not wait for that request's whole commit
/// round; few, so that writes arriving meanwhile queue up and share the next request. With 64
/// clients on 2 cores, 4 measured about 3% more writes/s than 2 or 8, and 1 about 10% fewer.
const MAX_REQUESTS_IN_FLIGHT: usize = 4;
/// Commands in one forwarding request at most (the leader's entries hold 64).
const MAX_COMMANDS_PER_REQUEST: usize = 64;

/// Why a forwarded write has no answer from the leader.
#[derive(Clone, Debug)]
pub enum ForwardFailure {
    /// The request never reached the leader (connection refused, connect timeout).
    NotDelivered,
    /// The leader refused the request before proposing anything (HTTP 503).
    NotReady,
    /// The request may have been delivered; its writes may or may not have been applied.
    Unknown(String),
}

/// Handle to the forwarding task. Cheap to clone; the task ends when the last handle is
/// dropped, after the requests in flight are answered.
#[derive(Clone)]
pub struct Forwarder {
    queue: mpsc::UnboundedSender<Forward>,
    counts: Arc<ForwardCounts>,
}

/// What this node forwarded, for `/metrics`.
#[derive(Debug, Default)]
pub struct ForwardCounts {
    /// Client writes sent to the leader.
    pub writes: AtomicU64,
    /// Requests that carried them.
    pub requests: AtomicU64,
}

struct Forward {
    address: String,
    command: Command,
    reply: oneshot::Sender<Result<ForwardedWrite, ForwardFailure>>,
}

impl Forwarder {
    /// Starts the forwarding task. Each request waits at most `timeout` for the leader.
    pub fn start(peers: PeerClient, timeout: Duration) -> Forwarder {
        let (queue, receiver) = mpsc::unbounded_channel();
        let counts = Arc::new(ForwardCounts::default());
        tokio::spawn(run(peers, timeout, receiver, counts.clone()));
        Forwarder { queue, counts }
    }

    pub fn counts(&self) -> &ForwardCounts {
        &self.counts
    }

    /// Sends `command` to the leader at `address` and waits for its answer.
    pub async fn forward(
        &self,
        address: &str,
        command: Command,
    ) -> Result<ForwardedWrite, ForwardFailure> {
        let (reply, answer) = oneshot::channel();
        let forward = Forward {
            address: address.to_string(),
            command,
            reply,
        };
        if self.queue.send(forward).is_err() {
            return Err(ForwardFailure::NotDelivered);
        }
        answer.await.unwrap_or_else(|_| {
            Err(ForwardFailure::Unknown(
                "the forwarding task stopped before the leader answered".to_string(),
            ))
        })
    }
}

async fn run(
    peers: PeerClient,
    timeout: Duration,
    queue: mpsc::UnboundedReceiver<Forward>,
    counts: Arc<ForwardCounts>,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT));
    let mut gatherer = Gatherer::new(queue);
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        // Forwards to another address than the batch's wait for a later request.
        let batch = gatherer
            .next_batch(MAX_COMMANDS_PER_REQUEST, |batch, forward| {
                forward.address == batch[0].address
            })
            .await;
        let Some(batch) = batch else {
            return;
        };
        counts.requests.fetch_add(1, Ordering::Relaxed);
        counts
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let peers = peers.clone();
        tokio::spawn(async move {
            send(&peers, timeout, batch).await;
            drop(permit);
        });
    }
}

/// Sends one request carrying every command of `batch` and hands each its answer.
async fn send(peers: &PeerClient, timeout: Duration, batch: Vec<Forward>) {
    let address = batch[0].address.clone();
    let (commands, replies): (Vec<Command>, Vec<_>) = batch
        .into_iter()
        .map(|forward| (forward.command, forward.reply))
        .unzip();
    let answer: Result<Vec<ForwardedWrite>, PeerError> = peers
        .call(&address, routes::WRITE_BATCH, &commands, timeout)
        .await;
    let failure = match answer {
        Ok(results) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                // The waiter may have timed out; nothing to do then.
                let _ = reply.send(Ok(result));
            }
            return;
        }
        Ok(results) => ForwardFailure::Unknown(format!(
            "the leader answered {} results for {} writes",
            results.len(),
            replies.len()
        )),
        Err(PeerError::Unreachable { .. }) => ForwardFailure::NotDelivered,
        Err(PeerError::Status { status: 503, .. }) => ForwardFailure::NotReady,
        Err(error) => ForwardFailure::Unknown(error.to_string()),
    };
    for reply in replies {
        let _ = reply.send(Err(failure.clone()));
    }
}

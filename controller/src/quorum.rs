//! Whether this node is in touch with a quorum of voters, and the election gate that keeps a
//! cut-off node from disrupting the cluster when it returns.
//!
//! openraft 0.9 has neither CheckQuorum nor pre-vote: a leader cut off from its peers keeps
//! `ServerState::Leader` for as long as the cut lasts (every request it takes then waits for
//! the write timeout), and a cut-off follower keeps raising its term in elections it cannot
//! win, so that when it returns its higher term deposes a healthy leader. This module closes
//! both gaps from outside openraft:
//!
//! - Every node pings the other voters (`/raft/ping`) a few times a second and keeps, per
//!   peer, when it last answered. A leader also reads `RaftMetrics::millis_since_quorum_ack`
//!   ("the elapsed time since the most recently acknowledged timestamp by a quorum", openraft
//!   0.9 `metrics/raft_metrics.rs`), which follows its AppendEntries replies.
//! - A node that has not been in touch with a quorum (itself included) for `quorum_timeout`
//!   has no quorum: the API answers 503 `no-quorum` at once instead of holding the request,
//!   and clients move to the next server.
//! - A node starts elections (`Raft::runtime_config().elect(true)`) only while a majority of
//!   voters, itself included, answered its pings lately and none of those peers is in touch
//!   with a working leader: the question Raft's pre-vote asks (Ongaro's thesis, 9.6), asked
//!   over the probe instead of the vote RPC. A cut-off follower therefore keeps its term, and
//!   returning is a quiet catch-up from the current leader instead of an election that deposes
//!   it. Each ping answer says whether the answering node leads with a quorum, or follows a
//!   leader that answered it lately.
//!
//! The decision is the pure function [`assess`]; the probe loop only gathers its inputs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::network::{routes, PeerClient};
use crate::raft_types::{NodeId, Raft};

/// What this node knows of its contact with the voters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumView {
    /// In touch with a quorum within the quorum timeout.
    pub has_quorum: bool,
    /// Milliseconds since this node last had a quorum's contact, as far as it can tell.
    pub millis_since_quorum: u64,
    /// Voters (this node included) that answered within the quorum timeout.
    pub reachable: Vec<NodeId>,
    /// Leads with a quorum, or follows a leader that answered its ping lately.
    pub leader_contact: bool,
}

impl Default for QuorumView {
    fn default() -> Self {
        QuorumView {
            has_quorum: true,
            millis_since_quorum: 0,
            reachable: Vec::new(),
            leader_contact: false,
        }
    }
}

/// A peer's latest answer to a ping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAnswer {
    /// When the answered ping was sent.
    pub at: Instant,
    /// The peer leads with a quorum.
    pub leading: bool,
    /// The peer is in touch with a working leader (itself or another).
    pub leader_contact: bool,
}

/// The inputs of one assessment.
pub struct Observation<'a> {
    pub self_id: NodeId,
    pub voters: &'a [NodeId],
    /// Each peer's latest answer; a peer never heard from counts from `started`.
    pub answers: &'a HashMap<NodeId, PeerAnswer>,
    pub started: Instant,
    pub now: Instant,
    pub is_leader: bool,
    /// The leader this node follows, if it knows one.
    pub current_leader: Option<NodeId>,
    /// `RaftMetrics::millis_since_quorum_ack` of a leader.
    pub leader_ack_ms: Option<u64>,
    /// Without a quorum's contact for this long, the node refuses requests.
    pub timeout: Duration,
    /// How fresh a peer's answer must be to count for an election: shorter than openraft's
    /// first election attempt after a lost leader (leader lease plus one election timeout),
    /// so the gate closes before a cut-off node's first campaign.
    pub elect_window: Duration,
    /// How fresh the leader's last word (an AppendEntries or a pong) must be for this node to
    /// be in touch with it: one election timeout, the leader's heartbeats being far more
    /// frequent, so that followers of a leader that went away agree on it quickly.
    pub contact_window: Duration,
}

/// The outcome of one assessment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub view: QuorumView,
    /// Whether this node may start elections.
    pub elect: bool,
}

/// Decides whether the node has a quorum, from when each voter was last heard, and whether it
/// may campaign.
///
/// The time a quorum was last in touch is the `majority`-th most recent answer among the
/// voters, this node's own being `now` (the same rule openraft uses for its leader lease).
/// A leader's own AppendEntries acknowledgements are at least as good a witness as pings, so
/// the fresher of the two counts.
pub fn assess(observation: &Observation<'_>) -> Assessment {
    let now = observation.now;
    let fresh = |at: Instant, window: Duration| now.saturating_duration_since(at) <= window;
    // A node outside the voter set (a learner, or one being removed) follows whoever leads.
    if !observation.voters.contains(&observation.self_id) {
        return Assessment {
            view: QuorumView {
                leader_contact: observation.current_leader.is_some(),
                ..QuorumView::default()
            },
            elect: true,
        };
    }
    let answer_of = |voter: &NodeId| observation.answers.get(voter).copied();
    let mut heard: Vec<(NodeId, Instant)> = observation
        .voters
        .iter()
        .map(|&voter| {
            let at = if voter == observation.self_id {
                now
            } else {
                answer_of(&voter)
                    .map_or(observation.started, |answer| answer.at)
                    .max(observation.started)
            };
            (voter, at)
        })
        .collect();
    heard.sort_by_key(|&(_, at)| std::cmp::Reverse(at));
    let majority = observation.voters.len() / 2 + 1;
    let mut since = now.saturating_duration_since(heard[majority - 1].1);
    if observation.is_leader {
        if let Some(ack_ms) = observation.leader_ack_ms {
            since = since.min(Duration::from_millis(ack_ms));
        }
    }
    let has_quorum = since <= observation.timeout;
    let mut reachable: Vec<NodeId> = heard
        .iter()
        .filter(|(_, at)| fresh(*at, observation.timeout))
        .map(|(voter, _)| *voter)
        .collect();
    reachable.sort_unstable();
    let leader_contact = if observation.is_leader {
        has_quorum
    } else {
        observation
            .current_leader
            .and_then(|leader| answer_of(&leader))
            .is_some_and(|answer| answer.leading && fresh(answer.at, observation.contact_window))
    };
    // Pre-vote: would a majority, this node included, grant a vote now?
    let granting = observation
        .voters
        .iter()
        .filter(|voter| {
            **voter == observation.self_id
                || answer_of(voter).is_some_and(|answer| {
                    fresh(answer.at, observation.elect_window) && !answer.leader_contact
                })
        })
        .count();
    Assessment {
        view: QuorumView {
            has_quorum,
            millis_since_quorum: since.as_millis() as u64,
            reachable,
            leader_contact,
        },
        elect: granting >= majority,
    }
}

/// What `/raft/ping` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pong {
    pub node_id: NodeId,
    /// Leads with a quorum.
    pub leading: bool,
    /// In touch with a working leader (itself or another).
    pub leader_contact: bool,
}

/// The live quorum view, updated by the probe loop.
#[derive(Clone)]
pub struct Quorum {
    view: Arc<watch::Sender<QuorumView>>,
    answers: Answers,
    timeout: Duration,
    contact_window: Duration,
}

/// Each peer's latest answer, shared by the probe loop and the peer routes.
type Answers = Arc<std::sync::Mutex<HashMap<NodeId, PeerAnswer>>>;

/// Records `answer` for `peer` unless a newer one is known.
fn note(answers: &Answers, peer: NodeId, answer: PeerAnswer) {
    let mut answers = answers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if answers.get(&peer).is_none_or(|known| known.at <= answer.at) {
        answers.insert(peer, answer);
    }
}

impl Quorum {
    /// Starts the probe loop for this node, on a thread of its own, and returns its view. The
    /// loop ends when Raft shuts down.
    pub fn start(
        raft: Raft,
        peers: PeerClient,
        self_id: NodeId,
        interval: Duration,
        timeout: Duration,
        elect_window: Duration,
        contact_window: Duration,
    ) -> Quorum {
        let view = Arc::new(watch::Sender::new(QuorumView::default()));
        let answers = Answers::default();
        let timing = ProbeTiming {
            interval,
            timeout,
            elect_window,
            contact_window,
        };
        // The probe runs on a thread of its own, with its own connections to the peers: a
        // leader whose runtime is busy (a planner round over 100,000 instances, a burst of
        // heartbeats, a snapshot) is slow, not cut off, and must not refuse requests for it.
        // Pings sent from the API runtime would wait behind that work, and their answers
        // would come "late" though the peers answered at once.
        let probe_peers = peers.with_own_connections().unwrap_or_else(|error| {
            // Building a client only fails when its TLS config cannot be used, and the same
            // config built the shared one: share its connections rather than probe nothing.
            tracing::warn!(%error, "the quorum probe shares the peer connections");
            peers.clone()
        });
        let probe_view = view.clone();
        let probe_answers = answers.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("strata-quorum-{self_id}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(%error, "cannot start the quorum probe's runtime");
                        return;
                    }
                };
                runtime.block_on(run_probe(
                    raft,
                    probe_peers,
                    self_id,
                    timing,
                    probe_view,
                    probe_answers,
                ));
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start the quorum probe's thread");
        }
        Quorum {
            view,
            answers,
            timeout,
            contact_window,
        }
    }

    /// Whether `peer` answered a ping or sent an accepted AppendEntries within the quorum
    /// timeout: a leader not heard from for that long may be cut off, and a request sent to it
    /// on a pooled connection would wait out its whole timeout in a blackhole.
    pub fn recently_heard(&self, peer: NodeId) -> bool {
        let answers = self
            .answers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        answers
            .get(&peer)
            .is_some_and(|answer| answer.at.elapsed() <= self.timeout)
    }

    /// Whether this node is in touch with a working leader right now (what a ping answer
    /// says): a leader with its quorum, or a follower whose leader spoke within the contact
    /// window. Computed at the time of asking, not at the last probe round, so that followers
    /// of a leader that went away agree on it without waiting for each other's rounds.
    pub fn leader_contact(&self, is_leader: bool, current_leader: Option<NodeId>) -> bool {
        if is_leader {
            return self.has_quorum();
        }
        let answers = self
            .answers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current_leader
            .and_then(|leader| answers.get(&leader))
            .is_some_and(|answer| answer.leading && answer.at.elapsed() <= self.contact_window)
    }

    /// An AppendEntries from `leader` was accepted: as good a sign of contact with a working
    /// leader as a ping answer (better under load, where a ping may be slow while the leader's
    /// heartbeats keep coming).
    pub fn heard_from_leader(&self, leader: NodeId) {
        note(
            &self.answers,
            leader,
            PeerAnswer {
                at: Instant::now(),
                leading: true,
                leader_contact: true,
            },
        );
    }

    pub fn view(&self) -> QuorumView {
        self.view.borrow().clone()
    }

    pub fn has_quorum(&self) -> bool {
        self.view.borrow().has_quorum
    }

    /// Completes when this node loses its quorum (at once if it has none now).
    pub async fn lost(&self) {
        let mut view = self.view.subscribe();
        // The sender lives as long as `self`, so waiting cannot fail.
        let _ = view.wait_for(|view| !view.has_quorum).await;
    }
}

/// How often the probe pings, when contact counts as lost, and how fresh an answer must be to
/// count for an election.
struct ProbeTiming {
    interval: Duration,
    timeout: Duration,
    elect_window: Duration,
    contact_window: Duration,
}

async fn run_probe(
    raft: Raft,
    peers: PeerClient,
    self_id: NodeId,
    timing: ProbeTiming,
    sender: Arc<watch::Sender<QuorumView>>,
    answers: Answers,
) {
    let ProbeTiming {
        interval,
        timeout,
        elect_window,
        contact_window,
    } = timing;
    let started = Instant::now();
    let mut elect = true;
    // When the gate opens: not at once but after a random share of an election timeout.
    // Nodes whose gates open together (followers of a leader that went away, a cluster
    // starting) would otherwise all campaign on the same tick, their own randomized election
    // timers having run out while the gate was shut, and split the vote again and again.
    let mut enable_at: Option<tokio::time::Instant> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A late answer still proves contact at the time the ping was sent.
    let ping_timeout = timeout.max(interval);
    loop {
        match enable_at {
            Some(at) => tokio::select! {
                _ = ticker.tick() => {}
                () = tokio::time::sleep_until(at) => {}
            },
            None => {
                ticker.tick().await;
            }
        }
        let (voters, addresses, is_leader, current_leader, leader_ack_ms, running) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let addresses: BTreeMap<NodeId, String> = membership
                .nodes()
                .filter(|(id, _)| **id != self_id && voters.contains(id))
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect();
            (
                voters,
                addresses,
                metrics.state == ServerState::Leader,
                metrics.current_leader,
                metrics.millis_since_quorum_ack,
                metrics.state != ServerState::Shutdown,
            )
        };
        if !running {
            return;
        }
        // Pings run beside the loop: a peer behind a blackhole costs its own timeout, not
        // the next round.
        for (peer, address) in addresses {
            let peers = peers.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                let sent = Instant::now();
                let answer: Result<Pong, _> =
                    peers.call(&address, routes::PING, &(), ping_timeout).await;
                // A pong counts only when it comes from the node that was asked.
                if let Ok(pong) = answer {
                    if pong.node_id == peer {
                        note(
                            &answers,
                            peer,
                            PeerAnswer {
                                at: sent,
                                leading: pong.leading,
                                leader_contact: pong.leader_contact,
                            },
                        );
                    }
                }
            });
        }
        let assessment = {
            let answers = answers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            assess(&Observation {
                self_id,
                voters: &voters,
                answers: &answers,
                started,
                now: Instant::now(),
                is_leader,
                current_leader,
                leader_ack_ms,
                timeout,
                elect_window,
                contact_window,
            })
        };
        if assessment.elect {
            if !elect {
                let now = tokio::time::Instant::now();
                let at = *enable_at.get_or_insert_with(|| now + jitter(contact_window));
                if now >= at {
                    elect = true;
                    enable_at = None;
                    raft.runtime_config().elect(true);
                    tracing::info!(node = self_id, "a majority would vote: elections allowed");
                }
            }
        } else {
            enable_at = None;
            if elect {
                elect = false;
                raft.runtime_config().elect(false);
                tracing::info!(
                    node = self_id,
                    "no majority would vote (peers unreachable or following a leader): no elections"
                );
            }
        }
        sender.send_if_modified(|view| {
            if view.has_quorum != assessment.view.has_quorum {
                if assessment.view.has_quorum {
                    tracing::info!(node = self_id, "in touch with a quorum again");
                } else {
                    tracing::warn!(
                        node = self_id,
                        millis = assessment.view.millis_since_quorum,
                        "no contact with a quorum: refusing requests with 503 no-quorum"
                    );
                }
            }
            let changed = *view != assessment.view;
            *view = assessment.view.clone();
            changed
        });
    }
}

/// A random duration below `bound`.
fn jitter(bound: Duration) -> Duration {
    use std::hash::BuildHasher;
    let bound_ms = bound.as_millis().max(1) as u64;
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    Duration::from_millis(random % bound_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(1000);
    const WINDOW: Duration = Duration::from_millis(450);
    const CONTACT: Duration = Duration::from_millis(250);

    /// A peer's answer `at_ms` after the start, with what it said.
    #[derive(Clone, Copy)]
    struct Said {
        peer: NodeId,
        at_ms: u64,
        leading: bool,
        leader_contact: bool,
    }

    fn answered(peer: NodeId, at_ms: u64) -> Said {
        Said {
            peer,
            at_ms,
            leading: false,
            leader_contact: false,
        }
    }

    fn following(peer: NodeId, at_ms: u64) -> Said {
        Said {
            leader_contact: true,
            ..answered(peer, at_ms)
        }
    }

    fn leading(peer: NodeId, at_ms: u64) -> Said {
        Said {
            leading: true,
            leader_contact: true,
            ..answered(peer, at_ms)
        }
    }

    struct Case<'a> {
        voters: &'a [NodeId],
        said: &'a [Said],
        now_ms: u64,
        is_leader: bool,
        current_leader: Option<NodeId>,
        leader_ack_ms: Option<u64>,
    }

    fn follower<'a>(voters: &'a [NodeId], said: &'a [Said], now_ms: u64) -> Case<'a> {
        Case {
            voters,
            said,
            now_ms,
            is_leader: false,
            current_leader: None,
            leader_ack_ms: None,
        }
    }

    fn assess_case(case: Case<'_>) -> Assessment {
        let started = Instant::now();
        let answers: HashMap<NodeId, PeerAnswer> = case
            .said
            .iter()
            .map(|said| {
                (
                    said.peer,
                    PeerAnswer {
                        at: started + Duration::from_millis(said.at_ms),
                        leading: said.leading,
                        leader_contact: said.leader_contact,
                    },
                )
            })
            .collect();
        assess(&Observation {
            self_id: 1,
            voters: case.voters,
            answers: &answers,
            started,
            now: started + Duration::from_millis(case.now_ms),
            is_leader: case.is_leader,
            current_leader: case.current_leader,
            leader_ack_ms: case.leader_ack_ms,
            timeout: TIMEOUT,
            elect_window: WINDOW,
            contact_window: CONTACT,
        })
    }

    #[test]
    fn a_single_voter_always_has_its_quorum_and_may_elect() {
        let outcome = assess_case(Case {
            is_leader: true,
            ..follower(&[1], &[], 60_000)
        });
        assert!(outcome.view.has_quorum);
        assert!(outcome.view.leader_contact);
        assert!(outcome.elect);
        assert_eq!(outcome.view.reachable, vec![1]);
    }

    #[test]
    fn a_fresh_node_has_a_grace_period_but_waits_for_answers_to_campaign() {
        let outcome = assess_case(follower(&[1, 2, 3], &[], 500));
        assert!(outcome.view.has_quorum);
        assert!(!outcome.elect, "nobody has said it would vote yet");
        let outcome = assess_case(follower(&[1, 2, 3], &[answered(2, 400)], 500));
        assert!(outcome.elect);
        let outcome = assess_case(follower(&[1, 2, 3], &[], 1_500));
        assert!(!outcome.view.has_quorum);
    }

    #[test]
    fn one_answering_peer_of_two_is_a_quorum_of_three() {
        let outcome = assess_case(follower(&[1, 2, 3], &[answered(2, 9_900)], 10_000));
        assert!(outcome.view.has_quorum);
        assert_eq!(outcome.view.reachable, vec![1, 2]);
        assert_eq!(outcome.view.millis_since_quorum, 100);
    }

    #[test]
    fn a_cut_off_node_loses_its_quorum_after_the_timeout() {
        let said = [answered(2, 8_000), answered(3, 8_500)];
        let outcome = assess_case(follower(&[1, 2, 3], &said, 9_400));
        assert!(outcome.view.has_quorum, "{outcome:?}");
        let outcome = assess_case(follower(&[1, 2, 3], &said, 9_600));
        assert!(!outcome.view.has_quorum, "{outcome:?}");
        assert_eq!(outcome.view.millis_since_quorum, 1_100);
        assert_eq!(outcome.view.reachable, vec![1]);
    }

    #[test]
    fn a_cut_off_follower_stops_campaigning_before_its_first_election() {
        // Node 2 led and node 3 followed it; the cut came at 10 s.
        let said = [leading(2, 9_950), following(3, 9_950)];
        let case = |now_ms| Case {
            current_leader: Some(2),
            ..follower(&[1, 2, 3], &said, now_ms)
        };
        let outcome = assess_case(case(10_000));
        assert!(outcome.view.leader_contact);
        assert!(!outcome.elect, "peers follow a working leader");
        // Past the window: no leader contact, and still nobody who would vote.
        let outcome = assess_case(case(10_500));
        assert!(!outcome.view.leader_contact);
        assert!(!outcome.elect);
    }

    #[test]
    fn followers_of_a_lost_leader_campaign_once_they_agree_it_is_gone() {
        // The leader (2) stopped answering at 10 s; node 3 still answers, and has noticed.
        let said = [leading(2, 9_900), answered(3, 10_400)];
        let outcome = assess_case(Case {
            current_leader: Some(2),
            ..follower(&[1, 2, 3], &said, 10_500)
        });
        assert!(!outcome.view.leader_contact);
        assert!(outcome.elect);
        // While node 3 still hears the leader, it would not vote.
        let said = [leading(2, 9_900), following(3, 10_400)];
        let outcome = assess_case(Case {
            current_leader: Some(2),
            ..follower(&[1, 2, 3], &said, 10_500)
        });
        assert!(!outcome.elect);
    }

    #[test]
    fn a_leader_counts_its_append_entries_acknowledgements() {
        let leader = |ack_ms| Case {
            is_leader: true,
            current_leader: Some(1),
            leader_ack_ms: Some(ack_ms),
            ..follower(&[1, 2, 3], &[], 5_000)
        };
        let outcome = assess_case(leader(100));
        assert!(outcome.view.has_quorum);
        assert!(outcome.view.leader_contact);
        let outcome = assess_case(leader(4_000));
        assert!(!outcome.view.has_quorum, "however it was elected");
        assert!(!outcome.view.leader_contact);
    }

    #[test]
    fn five_voters_need_two_answering_peers() {
        let outcome = assess_case(follower(&[1, 2, 3, 4, 5], &[answered(2, 9_900)], 10_000));
        assert!(!outcome.view.has_quorum);
        assert!(!outcome.elect);
        let said = [answered(2, 9_900), answered(5, 9_950)];
        let outcome = assess_case(follower(&[1, 2, 3, 4, 5], &said, 10_000));
        assert!(outcome.view.has_quorum);
        assert!(outcome.elect);
    }

    #[test]
    fn a_learner_never_gates_itself() {
        let outcome = assess_case(follower(&[2, 3, 4], &[], 60_000));
        assert!(outcome.view.has_quorum);
        assert!(outcome.elect);
    }
}

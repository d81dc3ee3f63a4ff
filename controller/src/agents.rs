//! The leader's side of agents: liveness kept in memory (heartbeats are not Raft writes), and
//! the reconcile loop that runs the planners in `reconcile` and proposes their commands.
//!
//! Invariants:
//! - Only the leader records heartbeats and reconciles; followers answer agents with a hint
//!   pointing at the leader.
//! - When a node becomes leader (a new term), every node gets a fresh grace period: the
//!   planners treat each as seen when leadership began.
//! - Only transitions are committed (`Ready → NotReady`, instance phase and health changes);
//!   a steady heartbeat costs no Raft write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::ServerState;
use strata_api::{HostMetrics, InstanceReport, LbReport};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::node::{now_ms, Controller, LocalWriteError};
use crate::reconcile::{plan, NodeObservation, Observed, PlanConfig};

/// What a committed command may change for agents, noted before it is proposed.
#[derive(Debug)]
pub enum Touch {
    /// Assignments of these nodes may have changed.
    Nodes(Vec<String>),
    /// Assignments of the nodes running these instances may have changed.
    Instances(Vec<uuid::Uuid>),
    /// A tier's desired state changed: the planners have work. No assignment changes until
    /// they act (their commands touch the nodes they place on or drain from).
    TierChanged,
    /// A node was removed: a held heartbeat of it wakes (to a 404), and its memory goes.
    NodeRemoved(String),
    /// A tier was deleted, which drains its instances in the same entry: the nodes running
    /// them have new assignments, and the planners have work.
    TierDeleted(String),
    Nothing,
}

impl Touch {
    pub fn of(command: &crate::state::Command) -> Touch {
        use crate::state::Command as C;
        match command {
            C::CreateInstances { instances, .. } => {
                Touch::Nodes(instances.iter().map(|i| i.node.clone()).collect())
            }
            C::UpdateInstances { updates } => {
                Touch::Instances(updates.iter().map(|u| u.id).collect())
            }
            C::SetNodeReady { node, .. } | C::SetNodeFlags { node, .. } => {
                Touch::Nodes(vec![node.clone()])
            }
            C::RegisterNode { registration, .. } => {
                Touch::Nodes(vec![registration.node_id.clone()])
            }
            C::RevokeNode { node } => Touch::Nodes(vec![node.clone()]),
            C::RemoveNode { node, .. } => Touch::NodeRemoved(node.clone()),
            C::PutTier { .. }
            | C::ScaleTier { .. }
            | C::ResumeAutoscaling { .. }
            | C::AutoscaleTier { .. } => Touch::TierChanged,
            C::DeleteTier { name, .. } => Touch::TierDeleted(name.clone()),
            C::RemoveInstances { .. } | C::RecordEvent { .. } | C::Batch { .. } => Touch::Nothing,
        }
    }
}

/// Heartbeat memory of the current leadership.
#[derive(Default)]
pub struct Liveness {
    inner: Mutex<LivenessInner>,
    /// Wakes the reconcile loop early (a report changed something, a node registered).
    pub wake: Notify,
    /// Reconcile rounds run while leading, actions proposed, and actions that failed.
    pub rounds: AtomicU64,
    pub actions: AtomicU64,
    pub failures: AtomicU64,
    /// Heartbeats answered while leading.
    pub heartbeats: AtomicU64,
    /// The planners' time in the last round and the longest round, in microseconds (the
    /// state read lock is held for exactly this long).
    pub plan_micros_last: AtomicU64,
    pub plan_micros_max: AtomicU64,
    /// The CPU time of the last round's planners, in microseconds: the wall time above also
    /// counts waiting for a core the round shares with the rest of the process.
    pub plan_cpu_micros_last: AtomicU64,
    /// Per node: woken when the node's assignments may have changed (held heartbeats wait on
    /// it).
    signals: Mutex<HashMap<String, Arc<Notify>>>,
    /// Woken when a committed command may have changed a pool (held heartbeats of LB nodes
    /// wait on it). Any command that touches instances, nodes or tiers counts: a spurious
    /// wake-up costs an LB node one answer with unchanged pool versions.
    pub pools_changed: Notify,
}

#[derive(Default)]
pub struct LivenessInner {
    /// The term this node leads in; 0 when it does not lead.
    pub term: u64,
    pub leader_since_ms: u64,
    /// Shared with planner rounds, which take a copy of the map (not of the observations)
    /// and plan without holding the lock that every heartbeat takes.
    pub nodes: HashMap<String, Arc<NodeObservation>>,
}

impl Liveness {
    pub fn lock(&self) -> MutexGuard<'_, LivenessInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a heartbeat. Returns whether the reports differ from the previous heartbeat's
    /// (a hint that the reconciler has something to do).
    pub fn record(
        &self,
        node: &str,
        at_ms: u64,
        metrics: HostMetrics,
        reports: Vec<InstanceReport>,
        lb: Option<LbReport>,
    ) -> bool {
        // Whatever an agent sends, a report held here stays small (and compares with the
        // previous one as it is held).
        let lb = lb.map(|mut lb| {
            lb.truncate_errors();
            lb
        });
        let mut inner = self.lock();
        let observation = inner.nodes.entry(node.to_string()).or_default();
        let changed = observation.last_seen_ms == 0
            || observation.reports != reports
            || lb_decisions(observation.lb.as_ref()) != lb_decisions(lb.as_ref());
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        // A new observation rather than an update in place: a planner round may hold the
        // previous one (see `reconcile_once`).
        *observation = Arc::new(NodeObservation {
            last_seen_ms: at_ms,
            metrics,
            reports,
            lb,
        });
        changed
    }

    /// The latest LB report of every node heard from in this leadership, by node.
    pub fn lb_reports(&self) -> Vec<(String, u64, LbReport)> {
        let inner = self.lock();
        let mut reports: Vec<(String, u64, LbReport)> = inner
            .nodes
            .iter()
            .filter_map(|(node, observation)| {
                let report = observation.lb.clone()?;
                Some((node.clone(), observation.last_seen_ms, report))
            })
            .collect();
        reports.sort_by(|a, b| a.0.cmp(&b.0));
        reports
    }

    /// The signal of `node`'s assignments.
    pub fn signal(&self, node: &str) -> Arc<Notify> {
        let mut signals = self
            .signals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        signals.entry(node.to_string()).or_default().clone()
    }

    fn notify(&self, nodes: impl IntoIterator<Item = String>) {
        let signals = self
            .signals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for node in nodes {
            if let Some(signal) = signals.get(&node) {
                signal.notify_waiters();
            }
        }
    }

    /// Called after a command committed on this node: wakes held heartbeats of the nodes whose
    /// assignments may have changed, and the planners when desired state changed.
    pub fn after_write(&self, state: &crate::store::StateMachineStore, touch: Touch) {
        if !matches!(touch, Touch::Nothing) {
            self.pools_changed.notify_waiters();
        }
        match touch {
            Touch::Nothing => {}
            Touch::Nodes(nodes) => self.notify(nodes),
            Touch::NodeRemoved(node) => {
                self.notify([node.clone()]);
                self.lock().nodes.remove(&node);
                self.signals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&node);
            }
            Touch::Instances(ids) => {
                let nodes: Vec<String> = state.read(|machine| {
                    ids.iter()
                        .filter_map(|id| machine.state.instances.get(id))
                        .filter_map(|instance| instance.node.clone())
                        .collect()
                });
                self.notify(nodes);
            }
            Touch::TierChanged => self.wake.notify_one(),
            Touch::TierDeleted(tier) => {
                let nodes: Vec<String> = state.read(|machine| {
                    machine
                        .state
                        .instances
                        .values()
                        .filter(|instance| instance.tier == tier)
                        .filter_map(|instance| instance.node.clone())
                        .collect()
                });
                self.notify(nodes);
                self.wake.notify_one();
            }
        }
    }

    /// Last heartbeat and metrics of every node heard from in this leadership.
    pub fn observations(&self) -> HashMap<String, (u64, HostMetrics)> {
        let inner = self.lock();
        inner
            .nodes
            .iter()
            .map(|(node, observation)| {
                (
                    node.clone(),
                    (observation.last_seen_ms, observation.metrics.clone()),
                )
            })
            .collect()
    }

    /// The longest time since any node's last heartbeat, in ms (0 when no node is known).
    pub fn max_heartbeat_lag_ms(&self, now_ms: u64) -> u64 {
        let inner = self.lock();
        inner
            .nodes
            .values()
            .map(|observation| now_ms.saturating_sub(observation.last_seen_ms))
            .max()
            .unwrap_or(0)
    }

    /// Last heartbeat and metrics of `node`, when this node leads and has heard from it.
    pub fn observation(&self, node: &str) -> Option<(u64, HostMetrics)> {
        let inner = self.lock();
        inner
            .nodes
            .get(node)
            .map(|observation| (observation.last_seen_ms, observation.metrics.clone()))
    }
}

/// What in an LB report can change a planner's decision: per tier, the applied version, the
/// frontend error, and which servers still have sessions (statistics alone change every
/// heartbeat and must not wake the planners each time).
fn lb_decisions(report: Option<&LbReport>) -> Vec<(&str, u64, Option<&str>, Vec<uuid::Uuid>)> {
    report
        .map(|report| {
            report
                .tiers
                .iter()
                .map(|tier| {
                    (
                        tier.tier.as_str(),
                        tier.version,
                        tier.error.as_deref(),
                        tier.servers
                            .iter()
                            .filter(|server| server.stats.sessions > 0)
                            .map(|server| server.instance_id)
                            .collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Settings of the reconcile loop.
#[derive(Clone, Debug)]
pub struct ReconcileConfig {
    pub interval: Duration,
    pub plan: PlanConfig,
}

/// The least time between two rounds that a wake-up (rather than the period) started. Under a
/// stream of writes every commit wakes the planners; spacing the rounds makes a burst of
/// writes cost one round instead of one per commit, while a lone write still reaches the
/// planners within this delay. Wake-ups in the meantime coalesce into one (`Notify` keeps a
/// single permit). After a round whose planners took longer, the spacing is that long: the
/// planners hold the state's read lock while they run, and writes apply in the gaps, so at
/// fleet scale they take at most about half the time instead of all of it.
const MIN_WAKE_SPACING: Duration = Duration::from_millis(10);

/// Productive rounds in a row (rounds whose commands applied) that start a follow-up round.
/// The planners act on one round's outcome in the next (an instance this round marks healthy
/// lets the next round drain the one it replaces), so a round that changed the state is
/// followed by another, until a round finds nothing to do. The planners are written to reach
/// such a round (decisions that change nothing are recorded once); the cap only keeps a
/// planner that never settles from spinning every `MIN_WAKE_SPACING`.
const MAX_FOLLOW_UP_ROUNDS: u32 = 32;

/// Runs the reconcile loop until `shutdown` is cancelled. Acts only while this node leads.
pub async fn run_reconciler(
    controller: Arc<Controller>,
    config: ReconcileConfig,
    shutdown: CancellationToken,
) {
    let mut round: u64 = 0;
    // The earliest a wake-up may start the next round.
    let mut next_woken_round = tokio::time::Instant::now();
    let mut productive_in_a_row: u32 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
            () = controller.liveness.wake.notified() => {
                let spacing = tokio::time::sleep_until(next_woken_round);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = spacing => {}
                }
            }
        }
        next_woken_round = tokio::time::Instant::now() + MIN_WAKE_SPACING;
        let metrics = controller.raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            let mut inner = controller.liveness.lock();
            if inner.term != 0 {
                tracing::info!(
                    term = inner.term,
                    "no longer leader; dropping heartbeat memory"
                );
                *inner = LivenessInner::default();
            }
            continue;
        }
        {
            let mut inner = controller.liveness.lock();
            if inner.term != metrics.current_term {
                tracing::info!(
                    term = metrics.current_term,
                    "became leader; every node gets a fresh heartbeat grace period"
                );
                *inner = LivenessInner {
                    term: metrics.current_term,
                    leader_since_ms: now_ms(),
                    nodes: HashMap::new(),
                };
            }
        }
        round += 1;
        controller.liveness.rounds.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("reconcile", round);
        let applied = reconcile_once(&controller, &config.plan)
            .instrument(span)
            .await;
        let planned =
            Duration::from_micros(controller.liveness.plan_micros_last.load(Ordering::Relaxed));
        next_woken_round = next_woken_round.max(tokio::time::Instant::now() + planned);
        if applied == 0 {
            productive_in_a_row = 0;
        } else if productive_in_a_row < MAX_FOLLOW_UP_ROUNDS {
            productive_in_a_row += 1;
            controller.liveness.wake.notify_one();
        } else {
            tracing::warn!(
                rounds = productive_in_a_row,
                "the planners keep acting; the next round waits for the period or a wake-up"
            );
        }
    }
}

/// Runs one round; returns how many of its commands applied.
///
/// The planners run on a blocking thread, with a copy of the heartbeat memory's map taken
/// under its lock (the observations themselves are shared), so that neither the heartbeats
/// of a large fleet, which take that lock, nor the runtime's other work waits for a round.
async fn reconcile_once(controller: &Controller, config: &PlanConfig) -> usize {
    let now = now_ms();
    let (leader_since_ms, nodes) = {
        let liveness = controller.liveness.lock();
        (liveness.leader_since_ms, liveness.nodes.clone())
    };
    let store = controller.state.clone();
    let plan_config = config.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let observed = Observed {
            leader_since_ms,
            nodes: &nodes,
        };
        let started = std::time::Instant::now();
        let cpu_started = thread_cpu_time();
        let commands = store.read(|machine| {
            plan(
                &machine.state,
                &observed,
                &plan_config,
                now,
                &mut uuid::Uuid::new_v4,
            )
        });
        let cpu = thread_cpu_time().saturating_sub(cpu_started);
        (
            commands,
            started.elapsed().as_micros() as u64,
            cpu.as_micros() as u64,
        )
    })
    .await;
    let commands = match planned {
        Ok((commands, micros, cpu_micros)) => {
            controller
                .liveness
                .plan_cpu_micros_last
                .store(cpu_micros, Ordering::Relaxed);
            controller
                .liveness
                .plan_micros_last
                .store(micros, Ordering::Relaxed);
            controller
                .liveness
                .plan_micros_max
                .fetch_max(micros, Ordering::Relaxed);
            commands
        }
        Err(error) => {
            // A planner that panicked: nothing is proposed this round, and the next one
            // tries again from the state as it is then.
            controller.liveness.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "a planner round failed");
            return 0;
        }
    };
    let mut applied = 0;
    for command in commands {
        let summary = describe(&command);
        controller.liveness.actions.fetch_add(1, Ordering::Relaxed);
        match controller.propose_local(command).await {
            Ok(_) => {
                applied += 1;
                tracing::info!(action = %summary, "reconciled");
            }
            Err(LocalWriteError::NotLeader(_)) => {
                tracing::info!(action = %summary, "lost leadership; leaving it to the next leader");
                return applied;
            }
            Err(LocalWriteError::Failed(error)) => {
                controller.liveness.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(action = %summary, %error, "reconcile action failed");
                return applied;
            }
        }
    }
    applied
}

/// The CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`); zero where it cannot be
/// read. Public for `strata-bench plan-round`, which times rounds the same way.
pub fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(
        Duration::ZERO,
        |time| {
            Duration::new(
                u64::try_from(time.tv_sec()).unwrap_or_default(),
                u32::try_from(time.tv_nsec()).unwrap_or_default(),
            )
        },
    )
}

fn describe(command: &crate::state::Command) -> String {
    use crate::state::Command as C;
    match command {
        C::SetNodeReady {
            node,
            ready,
            reason,
        } => format!(
            "node {node} {}: {reason}",
            if *ready { "Ready" } else { "NotReady" }
        ),
        C::CreateInstances { instances, reason } => {
            let tiers: Vec<&str> = instances.iter().map(|i| i.tier.as_str()).collect();
            format!(
                "create {} instance(s) of {tiers:?}: {reason}",
                instances.len()
            )
        }
        C::UpdateInstances { updates } => format!("update {} instance(s)", updates.len()),
        C::RemoveInstances { ids } => format!("forget {} final instance(s)", ids.len()),
        C::RecordEvent { object, reason, .. } => format!("record {reason} on {object}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_api::{LbStats, LbTierReport, MAX_LB_ERROR_BYTES};

    fn report(error: &str) -> LbReport {
        LbReport {
            worker_pid: Some(7),
            reloads: 0,
            tiers: vec![LbTierReport {
                tier: "web".to_string(),
                version: 0,
                error: Some(error.to_string()),
                stats: LbStats::default(),
                servers: Vec::new(),
            }],
        }
    }

    #[test]
    fn an_lb_report_error_is_held_cut_to_the_limit() {
        let liveness = Liveness::default();
        let long = "ALERT: ünbindable ".repeat(200);
        assert!(long.len() > MAX_LB_ERROR_BYTES);
        liveness.record(
            "lb-1",
            1,
            HostMetrics::default(),
            Vec::new(),
            Some(report(&long)),
        );
        let held = liveness.lb_reports();
        let error = held[0].2.tiers[0].error.clone().unwrap_or_default();
        assert!(error.len() <= MAX_LB_ERROR_BYTES, "{}", error.len());
        assert!(long.starts_with(error.trim_end_matches('…')));
        // The same long error again is no change.
        assert!(!liveness.record(
            "lb-1",
            2,
            HostMetrics::default(),
            Vec::new(),
            Some(report(&long))
        ));
    }
}

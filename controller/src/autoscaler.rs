//! The autoscaler's loop on the leader: metric windows fed by heartbeats and pushed custom
//! metrics, an evaluation of every autoscaled tier each second through the pure planner
//! (`reconcile::autoscale::plan`), and a Raft command only when a tier's desired count changes.
//!
//! Invariants:
//! - Windows and planner memories live in this node's memory only, and only for the term it
//!   leads in: a new term (or the end of leadership) drops them, so a new leader starts with
//!   empty windows and fresh memories. The planner then abstains until a policy's data covers
//!   its reaction time and scales in only after watching a whole stabilization window, so a
//!   failover makes no decision the old leader would not have made.
//! - A decision is a `Command::AutoscaleTier` that names the count it was planned from; apply
//!   rejects it when the tier moved meanwhile (an operator scaled, the spec changed), and the
//!   tier's memory starts afresh.
//! - The state's read lock is held only to copy what an evaluation needs (a tier's scaling
//!   block, counts and which instances serve); the planner runs outside it.
//! - A tier with a manual count (`scaling.desired`) is paused: evaluated (so `/metrics` shows
//!   what it would do) but never changed. When it is handed back, its memory starts afresh.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::ServerState;
use serde::{Deserialize, Serialize};
use strata_api::{
    CustomMetricSample, FieldError, InstanceReport, LbReport, Problem, Scaling, ScalingDecision,
    ScalingInputs, ScalingMetric,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::network::{routes, PeerError};
use crate::node::{now_ms, Controller, LocalWriteError};
use crate::reconcile::autoscale::windows::{
    observed_startup_ms, LbSample, Serving, WindowConfig, Windows,
};
use crate::reconcile::autoscale::{plan, Input, Memory};
use crate::state::{Command, CommandResult};
use crate::views::TierIndex;

/// How often every autoscaled tier is evaluated.
pub const EVALUATION_INTERVAL: Duration = Duration::from_secs(1);

/// LB reports older than this are left out of a tier's load-balancer sample: an LB node that
/// stopped reporting no longer carries the tier's traffic (or cannot say so).
const LB_REPORT_FRESHNESS_MS: u64 = 3_000;

/// One LB node's latest report as `Liveness` holds it: node, heard at, report.
pub type LbNodeReport = (String, u64, LbReport);

/// The autoscaler's memory and counters, shared by the heartbeat and metrics handlers and the
/// evaluation loop.
#[derive(Default)]
pub struct Autoscaler {
    inner: Mutex<Inner>,
    /// Wakes the loop early: a tier's spec or manual count changed.
    pub wake: Notify,
    /// Evaluations of one tier, on this node while it led.
    pub evaluations: AtomicU64,
    /// Decisions this node committed while it led, by direction.
    pub scaled_out: AtomicU64,
    pub scaled_in: AtomicU64,
    /// Decisions apply refused because the tier had moved since the evaluation.
    pub superseded: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// The term these windows belong to; 0 when this node does not lead.
    term: u64,
    windows: Windows,
    memories: HashMap<String, Memory>,
    /// Tiers paused by a manual count at their last evaluation.
    paused: HashSet<String>,
    /// Each tier's latest evaluation, for `/metrics`.
    latest: BTreeMap<String, ScalingInputs>,
}

impl Autoscaler {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The memory of `term`, emptied first when it belonged to another term.
    fn for_term(&self, term: u64) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        if inner.term != term {
            tracing::info!(
                term,
                "autoscaler: a new term; metric windows and decision memories start empty"
            );
            *inner = Inner {
                term,
                windows: Windows::new(WindowConfig::default()),
                ..Inner::default()
            };
        }
        inner
    }

    /// Drops everything when this node stops leading.
    fn step_down(&self) {
        let mut inner = self.lock();
        if inner.term != 0 {
            *inner = Inner::default();
        }
    }

    /// Records what one heartbeat says: each reported instance's CPU (under its tier), and,
    /// for an LB node, the load-balancer figures of the `watched` tiers (see
    /// `lb_watched_tiers`) summed over the LB nodes that reported recently (`lb_reports`:
    /// node, heard at, report, as `Liveness` holds them).
    pub fn record_heartbeat(
        &self,
        term: u64,
        at_ms: u64,
        cpu: &[(String, Uuid, f64)],
        lb_reports: Option<(&[LbNodeReport], &HashSet<String>)>,
    ) {
        if cpu.is_empty() && lb_reports.is_none() {
            // Most heartbeats of an idle fleet: nothing to take the lock for.
            return;
        }
        let mut inner = self.for_term(term);
        for (tier, instance, percent) in cpu {
            inner.windows.record_cpu(tier, *instance, at_ms, *percent);
        }
        if let Some((reports, watched)) = lb_reports {
            for (tier, sample) in lb_samples(reports, at_ms) {
                if watched.contains(&tier) {
                    inner.windows.record_lb(&tier, at_ms, sample);
                }
            }
        }
    }

    /// Records a pushed custom metric sample.
    pub fn record_custom(&self, term: u64, tier: &str, at_ms: u64, sample: &CustomMetricSample) {
        let mut inner = self.for_term(term);
        inner
            .windows
            .record_custom(tier, &sample.metric, sample.instance, at_ms, sample.value);
    }

    /// Each autoscaled tier's latest evaluation on this node (empty unless it leads), and
    /// whether a manual count pauses it.
    pub fn latest(&self) -> BTreeMap<String, (ScalingInputs, bool)> {
        let inner = self.lock();
        inner
            .latest
            .iter()
            .map(|(tier, inputs)| (tier.clone(), (inputs.clone(), inner.paused.contains(tier))))
            .collect()
    }
}

/// What the leader answers to a pushed custom metric sample (also across `/raft`).
#[derive(Debug, Serialize, Deserialize)]
pub enum MetricAnswer {
    Recorded,
    Refused(Problem),
    NotLeader,
}

/// The leader's side of `POST /v1/tiers/{name}/metrics`: checks the sample against the
/// replicated state (the tier exists, a policy of it uses the metric, the instance belongs to
/// it) and records it in this term's windows, stamped with this node's clock. Only metrics a
/// policy names are kept, so what a client pushes cannot grow the leader's memory beyond the
/// tiers' policies (and a misspelt metric name is an error, not silence).
pub fn accept_metric(
    controller: &Controller,
    tier: &str,
    sample: &CustomMetricSample,
) -> MetricAnswer {
    let term = {
        let metrics = controller.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state != ServerState::Leader {
            return MetricAnswer::NotLeader;
        }
        metrics.current_term
    };
    let refusal = controller.state.read(|machine| {
        let Some(found) = machine.state.tiers.get(tier) else {
            return Some(Problem::new(
                404,
                "not-found",
                "Not found",
                format!("tier {tier:?} does not exist"),
            ));
        };
        let custom: Vec<&str> = found
            .spec
            .scaling
            .policies
            .iter()
            .filter(|policy| policy.metric == ScalingMetric::Custom)
            .filter_map(|policy| policy.name.as_deref())
            .collect();
        if !custom.contains(&sample.metric.as_str()) {
            let known = if custom.is_empty() {
                "none".to_string()
            } else {
                custom.join(", ")
            };
            return Some(Problem::validation(vec![FieldError::new(
                "metric",
                format!(
                    "no scaling policy of tier {tier:?} uses custom metric {:?} (its custom metrics: {known})",
                    sample.metric
                ),
            )]));
        }
        if let Some(id) = sample.instance {
            let belongs = machine
                .state
                .instances
                .get(&id)
                .is_some_and(|instance| instance.tier == tier && !instance.phase.is_final());
            if !belongs {
                return Some(Problem::validation(vec![FieldError::new(
                    "instance",
                    format!("{id} is not a live instance of tier {tier:?}"),
                )]));
            }
        }
        None
    });
    if let Some(problem) = refusal {
        return MetricAnswer::Refused(problem);
    }
    controller
        .autoscaler
        .record_custom(term, tier, now_ms(), sample);
    MetricAnswer::Recorded
}

/// `POST /v1/tiers/{name}/metrics` on any node: the leader records the sample; a follower
/// forwards it to the leader (`/raft/custom-metric`), so clients need not know who leads.
/// Without a reachable leader the answer is a 503 the client may retry. A forward whose answer
/// was lost is retried too: a sample counted twice moves an average by one sample, which is
/// cheaper than a client that must find the leader.
pub async fn push_metric(
    controller: &Controller,
    tier: &str,
    sample: &CustomMetricSample,
) -> Result<(), Problem> {
    let mut last = "no leader is known".to_string();
    for attempt in 0..5u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
        }
        let answer = match controller.leader() {
            Some((leader, _)) if leader == controller.id => accept_metric(controller, tier, sample),
            Some((leader, address)) => {
                let forwarded: Result<MetricAnswer, PeerError> = controller
                    .peers
                    .call(
                        &address,
                        routes::CUSTOM_METRIC,
                        &(tier, sample),
                        Duration::from_secs(2),
                    )
                    .await;
                match forwarded {
                    Ok(answer) => answer,
                    Err(error) => {
                        last = format!("leader {leader}: {error}");
                        continue;
                    }
                }
            }
            None => MetricAnswer::NotLeader,
        };
        match answer {
            MetricAnswer::Recorded => return Ok(()),
            MetricAnswer::Refused(problem) => return Err(problem),
            MetricAnswer::NotLeader => last = "the leader changed".to_string(),
        }
    }
    Err(Problem::new(
        503,
        "unavailable",
        "Cluster unavailable",
        format!("no leader took the sample ({last}); retry"),
    ))
}

/// CPU samples of a heartbeat's instance reports: (tier, instance, percent of reservation),
/// for the Running instances of tiers with a CPU policy. Only those: a fleet of tiers without
/// one (100,000 instances in `strata-bench fleet`) must cost the leader no window memory.
pub fn cpu_samples(
    controller: &Controller,
    reports: &[InstanceReport],
) -> Vec<(String, Uuid, f64)> {
    if reports.is_empty() {
        return Vec::new();
    }
    controller.state.read(|machine| {
        reports
            .iter()
            .filter(|report| report.phase == strata_api::Phase::Running)
            .filter_map(|report| {
                let instance = machine.state.instances.get(&report.id)?;
                let tier = machine.state.tiers.get(&instance.tier)?;
                let watched = tier
                    .spec
                    .scaling
                    .policies
                    .iter()
                    .any(|policy| policy.metric == ScalingMetric::CpuUtilization);
                watched.then(|| (instance.tier.clone(), report.id, report.cpu_percent))
            })
            .collect()
    })
}

/// The tiers with a policy on a load-balancer metric: the only ones whose LB figures the
/// windows keep.
pub fn lb_watched_tiers(controller: &Controller) -> HashSet<String> {
    controller.state.read(|machine| {
        machine
            .state
            .tiers
            .values()
            .filter(|tier| {
                tier.spec.scaling.policies.iter().any(|policy| {
                    matches!(
                        policy.metric,
                        ScalingMetric::RequestsPerSecond
                            | ScalingMetric::ActiveConnections
                            | ScalingMetric::QueueLength
                            | ScalingMetric::ResponseTimeMs
                    )
                })
            })
            .map(|tier| tier.name().to_string())
            .collect()
    })
}

/// Per tier, the figures of every LB node heard from within `LB_REPORT_FRESHNESS_MS`: request
/// rate, sessions and queue summed (each LB node carries its share of the traffic), response
/// time averaged over the LB nodes that saw requests, and the largest count of servers up.
fn lb_samples(reports: &[LbNodeReport], now_ms: u64) -> BTreeMap<String, LbSample> {
    let mut samples: BTreeMap<String, (LbSample, f64, u32)> = BTreeMap::new();
    for (_, heard_at, report) in reports {
        if now_ms.saturating_sub(*heard_at) > LB_REPORT_FRESHNESS_MS {
            continue;
        }
        for tier in &report.tiers {
            if tier.error.is_some() {
                continue;
            }
            let (sample, response_sum, responders) = samples.entry(tier.tier.clone()).or_default();
            sample.requests_per_second += tier.stats.request_rate;
            sample.sessions += tier.stats.sessions as f64;
            sample.queue += tier.stats.queue as f64;
            let up = tier
                .servers
                .iter()
                .filter(|server| server.status.starts_with("UP"))
                .count();
            sample.servers = sample.servers.max(u32::try_from(up).unwrap_or(u32::MAX));
            if tier.stats.response_time_ms > 0.0 {
                *response_sum += tier.stats.response_time_ms;
                *responders += 1;
            }
        }
    }
    samples
        .into_iter()
        .map(|(tier, (mut sample, response_sum, responders))| {
            if responders > 0 {
                sample.response_time_ms = response_sum / f64::from(responders);
            }
            (tier, sample)
        })
        .collect()
}

/// What one evaluation of a tier needs, copied out of the state.
struct TierCopy {
    name: String,
    scaling: Scaling,
    desired: u32,
    last_scaling: Option<ScalingDecision>,
    serving: Serving,
    /// See `windows::observed_startup_ms`.
    observed_startup_ms: Option<u64>,
    alive: HashSet<Uuid>,
}

/// A decision to propose.
struct Decision {
    tier: String,
    from: u32,
    to: u32,
    inputs: ScalingInputs,
}

/// Runs the evaluation loop until `shutdown` is cancelled; acts only while this node leads.
pub async fn run(controller: Arc<Controller>, interval: Duration, shutdown: CancellationToken) {
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(last + interval) => {}
            () = controller.autoscaler.wake.notified() => {
                // Coalesce a burst of writes into one evaluation.
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        }
        last = tokio::time::Instant::now();
        let (state, term) = {
            let metrics = controller.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.state, metrics.current_term)
        };
        if state != ServerState::Leader {
            controller.autoscaler.step_down();
            continue;
        }
        evaluate(&controller, term).await;
    }
}

/// Evaluates every autoscaled tier once and proposes the decisions that change a count.
async fn evaluate(controller: &Controller, term: u64) {
    let now = now_ms();
    let tiers: Vec<TierCopy> = controller.state.read(|machine| {
        let index = TierIndex::of(&machine.state);
        machine
            .state
            .tiers
            .values()
            .filter(|tier| {
                let scaling = &tier.spec.scaling;
                !scaling.policies.is_empty() || !scaling.schedules.is_empty()
            })
            .map(|tier| {
                let instances = index.instances_of(tier.name());
                TierCopy {
                    name: tier.name().to_string(),
                    scaling: tier.spec.scaling.clone(),
                    desired: tier.status.desired,
                    last_scaling: tier.status.last_scaling.clone(),
                    serving: Serving::from_instances(
                        instances.iter().copied(),
                        &tier.spec.scaling,
                        now,
                    ),
                    observed_startup_ms: observed_startup_ms(instances.iter().copied()),
                    alive: instances
                        .iter()
                        .filter(|instance| !instance.phase.is_final())
                        .map(|instance| instance.id)
                        .collect(),
                }
            })
            .collect()
    });
    let autoscaler = &controller.autoscaler;
    let decisions: Vec<Decision> = {
        let mut guard = autoscaler.for_term(term);
        let inner = &mut *guard;
        let names: HashSet<&str> = tiers.iter().map(|tier| tier.name.as_str()).collect();
        inner
            .memories
            .retain(|name, _| names.contains(name.as_str()));
        inner.paused.retain(|name| names.contains(name.as_str()));
        inner.latest.retain(|name, _| names.contains(name.as_str()));
        let mut decisions = Vec::new();
        for tier in &tiers {
            inner.windows.retain_instances(&tier.name, &tier.alive);
            let metrics =
                inner
                    .windows
                    .policy_values(&tier.name, &tier.scaling.policies, &tier.serving, now);
            if tier.scaling.desired.is_some() {
                inner.paused.insert(tier.name.clone());
            } else if inner.paused.remove(&tier.name) {
                // Handed back by an operator: watch a whole window before scaling in.
                inner.memories.insert(tier.name.clone(), Memory::new(now));
            }
            let memory = inner
                .memories
                .entry(tier.name.clone())
                .or_insert_with(|| Memory::new(now));
            let outcome = plan(
                &Input {
                    scaling: &tier.scaling,
                    desired: tier.desired,
                    last_scaling: tier.last_scaling.as_ref(),
                    metrics: &metrics,
                    ready: tier.serving.ready(),
                    warming: tier.serving.warming(),
                    observed_startup_ms: tier.observed_startup_ms,
                    now_ms: now,
                },
                memory,
            );
            autoscaler.evaluations.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(tier = %tier.name, reason = %outcome.inputs.reason, "autoscaler evaluated");
            if let Some(to) = outcome.desired {
                decisions.push(Decision {
                    tier: tier.name.clone(),
                    from: tier.desired,
                    to,
                    inputs: outcome.inputs.clone(),
                });
            }
            inner.latest.insert(tier.name.clone(), outcome.inputs);
        }
        inner.windows.prune(now);
        decisions
    };
    for decision in decisions {
        let Decision {
            tier,
            from,
            to,
            inputs,
        } = decision;
        let reason = inputs.reason.clone();
        let command = Command::AutoscaleTier {
            name: tier.clone(),
            from,
            to,
            inputs: Box::new(inputs),
        };
        match controller.propose_local(command).await {
            Ok(CommandResult::Tier { .. }) => {
                let counter = if to > from {
                    &autoscaler.scaled_out
                } else {
                    &autoscaler.scaled_in
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%tier, from, to, %reason, "autoscaled");
            }
            Ok(other) => {
                // The tier moved (or went) since the evaluation; what this memory recorded of
                // the decision did not happen, so it starts afresh.
                autoscaler.superseded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%tier, from, to, outcome = ?other, "autoscaler decision superseded");
                let mut inner = autoscaler.for_term(term);
                inner.memories.insert(tier, Memory::new(now));
            }
            Err(LocalWriteError::NotLeader(_)) => {
                tracing::info!(%tier, "autoscaler: lost leadership; leaving it to the next leader");
                return;
            }
            Err(LocalWriteError::Failed(error)) => {
                tracing::warn!(%tier, %error, "autoscaler decision not committed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_api::{LbServerReport, LbStats, LbTierReport};

    fn report(tier: &str, rate: f64, up: usize, down: usize, rtime: f64) -> LbReport {
        let server = |status: &str| LbServerReport {
            instance_id: Uuid::new_v4(),
            status: status.to_string(),
            stats: LbStats::default(),
        };
        let mut servers: Vec<LbServerReport> = (0..up).map(|_| server("UP")).collect();
        servers.extend((0..down).map(|_| server("DOWN")));
        LbReport {
            worker_pid: None,
            reloads: 0,
            tiers: vec![LbTierReport {
                tier: tier.to_string(),
                version: 1,
                error: None,
                stats: LbStats {
                    request_rate: rate,
                    sessions: 2,
                    queue: 1,
                    response_time_ms: rtime,
                    ..LbStats::default()
                },
                servers,
            }],
        }
    }

    #[test]
    fn lb_samples_sum_fresh_balancers_and_leave_out_stale_ones() {
        let reports = vec![
            ("lb-1".to_string(), 10_000, report("web", 100.0, 3, 1, 10.0)),
            ("lb-2".to_string(), 9_500, report("web", 60.0, 4, 0, 30.0)),
            // Silent for 5 s: its last figures no longer describe the traffic.
            (
                "lb-3".to_string(),
                5_000,
                report("web", 1_000.0, 9, 0, 500.0),
            ),
        ];
        let samples = lb_samples(&reports, 10_000);
        let web = samples.get("web").copied().unwrap_or_default();
        assert_eq!(web.requests_per_second, 160.0);
        assert_eq!((web.sessions, web.queue), (4.0, 2.0));
        assert_eq!(web.servers, 4);
        assert_eq!(web.response_time_ms, 20.0);
    }

    #[test]
    fn a_tier_an_lb_cannot_serve_adds_nothing() {
        let mut failing = report("web", 100.0, 3, 0, 10.0);
        failing.tiers[0].error = Some("address in use".to_string());
        let samples = lb_samples(&[("lb-1".to_string(), 1_000, failing)], 1_000);
        assert!(samples.is_empty());
    }

    #[test]
    fn a_new_term_starts_with_empty_windows_and_memories() {
        let autoscaler = Autoscaler::default();
        let id = Uuid::new_v4();
        autoscaler.record_heartbeat(3, 1_000, &[("web".to_string(), id, 50.0)], None);
        autoscaler
            .for_term(3)
            .memories
            .insert("web".to_string(), Memory::new(1_000));
        assert_eq!(autoscaler.for_term(3).memories.len(), 1);
        let serving = Serving::new(vec![(id, 0)], 1, 0);
        let seen = |autoscaler: &Autoscaler, term| {
            autoscaler.for_term(term).windows.value(
                "web",
                strata_api::ScalingMetric::CpuUtilization,
                None,
                10_000,
                &serving,
                2_000,
            )
        };
        assert!(seen(&autoscaler, 3).is_some());
        assert!(seen(&autoscaler, 4).is_none());
        assert!(autoscaler.for_term(4).memories.is_empty());
        autoscaler.step_down();
        assert_eq!(autoscaler.lock().term, 0);
    }
}

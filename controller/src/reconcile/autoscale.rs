//! The autoscaler's planner: from a tier's scaling block, the metric value each policy sees and
//! the time, the desired instance count, with every input of the decision recorded.
//!
//! No IO, no clock, no randomness: the caller passes `now_ms`, the averaged metrics (see
//! [`windows`]) and a [`Memory`] of this leader's recent recommendations, so every decision can
//! be replayed in a test or a simulation (`strata-bench autoscale` runs this very code).
//!
//! Rules, in the order they apply:
//! 1. Each policy recommends a count or abstains. Target tracking is proportional like HPA,
//!    `ceil(instances × value / target)`, and keeps the current count while
//!    `|value / target - 1| <= tolerance`; a recommendation that would move against the
//!    metric (fewer instances for a metric above target, because some are still starting) is
//!    held at the current count, as HPA does. A step policy applies the step whose range holds
//!    the value to the ready instances. A policy whose data is missing or covers less than its
//!    reaction time abstains and blocks scale-in.
//! 2. The largest recommendation wins; scale-in needs every policy to agree (none may block
//!    it) and no instance starting or warming up.
//! 3. Scale-in is stabilized: the count never drops below the highest recommendation of the
//!    last `scale_in_stabilization` (when unset, a window of a few observed start-ups, see
//!    `Scaling::scale_in_window_ms`), and a leader that has not yet watched one whole window
//!    does not scale in at all, so a failover never makes a decision the old leader, with its
//!    longer memory, would not have made.
//! 4. Scale-out waits `cooldown` after the previous scale-out.
//! 5. A `step_period` changes the count by at most `max(max_step, max_step_percent% of the
//!    count at the period's start)`, counted from the changes this leader made (and the
//!    tier's `last_scaling` when it precedes this leader).
//! 6. `min`/`max`, as changed by the active schedule, always hold.
//!
//! A tier with `scaling.desired` set by hand is paused: the planner says so and changes
//! nothing.
//!
//! ## How a leader's loop calls it
//!
//! ```text
//! on becoming leader:   windows = Windows::new(WindowConfig::default());
//!                       memories = HashMap::new();          // tier name → Memory
//! on every heartbeat:   windows.record_cpu(tier, instance, at_ms, percent) / record_lb(...)
//! on POST .../metrics:  windows.record_custom(tier, name, instance, at_ms, value)
//! every second, per tier (state read lock held only to copy what is needed):
//!     let serving = windows::Serving::from_instances(&instances_of_tier, &tier.spec.scaling, now);
//!     let metrics = windows.policy_values(&tier.name, &tier.spec.scaling.policies, &serving, now);
//!     let memory = memories.entry(name).or_insert_with(|| Memory::new(now));
//!     let outcome = autoscale::plan(&Input { scaling, desired: status.desired,
//!         last_scaling: status.last_scaling.as_ref(), metrics: &metrics,
//!         ready: serving.ready(), warming: serving.warming(),
//!         observed_startup_ms: windows::observed_startup_ms(&instances_of_tier),
//!         now_ms: now }, memory);
//!     if let Some(to) = outcome.desired { propose ScaleTier(to) with outcome.inputs as event }
//!     windows.prune(now);
//! ```

pub mod windows;

use std::collections::VecDeque;

use strata_api::schedule::CronSchedule;
use strata_api::{
    AdjustmentType, PolicyEvaluation, PolicyType, Scaling, ScalingBound, ScalingDecision,
    ScalingInputs, ScalingPolicy,
};

/// A policy's metric as the windows computed it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MetricValue {
    /// The per-instance average (or the tier-wide value for response time) over the policy's
    /// reaction time.
    pub value: f64,
    /// How many instances the value is an average over: the base of proportional scaling, so
    /// that `instances × value` is the load they carry.
    pub instances: u32,
    /// How far back the data reaches (from the oldest sample the windows hold for this series
    /// to now); a value covering less than the reaction time cannot be trusted to scale.
    pub covered_ms: u64,
}

/// Everything one evaluation of one tier needs.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub scaling: &'a Scaling,
    /// `status.desired`: the count the control plane converges to now.
    pub desired: u32,
    pub last_scaling: Option<&'a ScalingDecision>,
    /// One entry per `scaling.policies`, in order; `None` where data is missing.
    pub metrics: &'a [Option<MetricValue>],
    /// Instances Running, healthy and past warm-up.
    pub ready: u32,
    /// Instances that exist but are not yet ready or still warming up.
    pub warming: u32,
    /// The tier's observed start-up time ([`windows::observed_startup_ms`]); an unset
    /// `scale_in_stabilization` adapts to it.
    pub observed_startup_ms: Option<u64>,
    pub now_ms: u64,
}

/// What this leader remembers of its recent decisions for one tier. Create it when the leader
/// starts evaluating the tier (`Memory::new(now)`), keep it for as long as it leads, and drop
/// it with the leadership: a new leader starts afresh and waits one stabilization window
/// before it scales in.
#[derive(Clone, Debug)]
pub struct Memory {
    since_ms: u64,
    /// Recommendations of the stabilization window as a monotone queue: each entry's count is
    /// lower than the one before it, so the front is the window's maximum and the queue stays
    /// short whatever the window's length.
    highest: VecDeque<(u64, u32)>,
    /// Changes this memory decided within the last step period: (at, from, to).
    changes: VecDeque<(u64, u32, u32)>,
    /// When this memory last decided a scale-out, for the cooldown.
    last_scale_out_ms: Option<u64>,
}

impl Memory {
    pub fn new(since_ms: u64) -> Memory {
        Memory {
            since_ms,
            highest: VecDeque::new(),
            changes: VecDeque::new(),
            last_scale_out_ms: None,
        }
    }

    /// When this memory started: the leader has watched the tier since then.
    pub fn since_ms(&self) -> u64 {
        self.since_ms
    }

    fn remember_recommendation(&mut self, at_ms: u64, count: u32, window_ms: u64) {
        while self.highest.back().is_some_and(|&(_, c)| c <= count) {
            self.highest.pop_back();
        }
        self.highest.push_back((at_ms, count));
        while self
            .highest
            .front()
            .is_some_and(|&(at, _)| at + window_ms <= at_ms && at != at_ms)
        {
            self.highest.pop_front();
        }
    }

    fn highest_in_window(&self) -> Option<u32> {
        self.highest.front().map(|&(_, count)| count)
    }

    /// Forgets changes that left the period ending at `now_ms`.
    fn forget_changes_older_than(&mut self, now_ms: u64, period_ms: u64) {
        while self
            .changes
            .front()
            .is_some_and(|&(at, _, _)| at.saturating_add(period_ms) <= now_ms)
        {
            self.changes.pop_front();
        }
    }
}

/// The result of one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The new desired count, when it changes.
    pub desired: Option<u32>,
    /// Every input and the reason, also when nothing changes.
    pub inputs: ScalingInputs,
}

impl Outcome {
    /// The decision as `status.last_scaling` records it, when the count changes.
    pub fn decision(&self) -> Option<ScalingDecision> {
        self.desired.map(|to| ScalingDecision {
            at_ms: self.inputs.at_ms,
            from: self.inputs.from,
            to,
            reason: self.inputs.reason.clone(),
            inputs: Some(Box::new(self.inputs.clone())),
        })
    }
}

/// The bounds in force at `now_ms`, and the index of the schedule that set them.
pub fn effective_bounds(scaling: &Scaling, now_ms: u64) -> (u32, u32, Option<usize>) {
    let mut latest: Option<(u64, usize)> = None;
    for (position, schedule) in scaling.schedules.iter().enumerate() {
        // Validation refused schedules that do not parse; one that still fails is ignored.
        let Ok(cron) = CronSchedule::parse(&schedule.cron, &schedule.time_zone) else {
            continue;
        };
        let duration = schedule.duration.as_millis();
        if let Some(start) = cron.latest_start(now_ms, duration) {
            if now_ms < start.saturating_add(duration) && latest.is_none_or(|(at, _)| start >= at) {
                latest = Some((start, position));
            }
        }
    }
    match latest {
        None => (scaling.min, scaling.max, None),
        Some((_, position)) => {
            let schedule = &scaling.schedules[position];
            let min = schedule.min.unwrap_or(scaling.min);
            let max = schedule.max.unwrap_or(scaling.max).max(min);
            (min, max, Some(position))
        }
    }
}

/// One policy's verdict.
struct Verdict {
    evaluation: PolicyEvaluation,
    /// Missing or too-short data: this policy cannot agree to a scale-in.
    blocks_scale_in: bool,
}

fn evaluate(policy: &ScalingPolicy, metric: Option<MetricValue>, input: &Input<'_>) -> Verdict {
    let current = input.desired;
    let reaction_ms = policy.reaction_time().as_millis();
    let mut evaluation = PolicyEvaluation {
        metric: policy.metric_label(),
        value: None,
        target: policy.target,
        recommendation: None,
        note: String::new(),
    };
    let Some(metric) = metric else {
        evaluation.note = "no data: abstains, and blocks scale-in".to_string();
        return Verdict {
            evaluation,
            blocks_scale_in: true,
        };
    };
    if metric.covered_ms < reaction_ms || !metric.value.is_finite() || metric.instances == 0 {
        evaluation.note = if metric.instances == 0 {
            "no instance past warm-up to measure: abstains, and blocks scale-in".to_string()
        } else {
            format!(
                "only {} of data, {} needed: abstains, and blocks scale-in",
                millis(metric.covered_ms),
                millis(reaction_ms)
            )
        };
        return Verdict {
            evaluation,
            blocks_scale_in: true,
        };
    }
    let value = metric.value;
    evaluation.value = Some(round3(value));
    match policy.policy_type {
        PolicyType::TargetTracking => {
            let target = policy.target.unwrap_or(f64::INFINITY);
            let ratio = value / target;
            let tolerance = policy.tolerance();
            if (ratio - 1.0).abs() <= tolerance {
                evaluation.recommendation = Some(current);
                evaluation.note = format!(
                    "{} is within {}% of the target {}: keep {current}",
                    round3(value),
                    round3(tolerance * 100.0),
                    target
                );
            } else {
                let wanted = ceil_count(f64::from(metric.instances) * ratio);
                // Fewer instances for a metric above target (or more for one below) only
                // happens while some are starting; HPA keeps the count then, and so do we.
                let count =
                    if (ratio > 1.0 && wanted < current) || (ratio < 1.0 && wanted > current) {
                        current
                    } else {
                        wanted
                    };
                evaluation.recommendation = Some(count);
                evaluation.note = format!(
                    "{} against target {} on {} instances asks for {count}",
                    round3(value),
                    target,
                    metric.instances
                );
            }
        }
        PolicyType::Step => {
            let step = policy.steps.iter().find(|step| {
                step.lower.is_none_or(|lower| value >= lower)
                    && step.upper.is_none_or(|upper| value < upper)
            });
            match step {
                None => {
                    evaluation.note = format!("{} matches no step: abstains", round3(value));
                }
                Some(step) => {
                    let base = i64::from(input.ready);
                    let change = i64::from(step.change);
                    let count = match policy.adjustment_type() {
                        AdjustmentType::ChangeInCapacity => base + change,
                        AdjustmentType::ExactCapacity => change,
                        AdjustmentType::PercentChangeInCapacity => {
                            let exact = base as f64 * change as f64 / 100.0;
                            // AWS: a fraction of one instance still moves one, larger changes
                            // round toward zero, and at least the minimum magnitude moves.
                            let mut delta = if exact.abs() < 1.0 && exact != 0.0 {
                                exact.signum() as i64
                            } else {
                                exact.trunc() as i64
                            };
                            let magnitude = i64::from(policy.min_adjustment_magnitude.unwrap_or(0));
                            if delta != 0 && delta.abs() < magnitude {
                                delta = delta.signum() * magnitude;
                            }
                            base + delta
                        }
                    };
                    let count = u32::try_from(count.max(0)).unwrap_or(u32::MAX);
                    evaluation.recommendation = Some(count);
                    evaluation.note = format!(
                        "{} is in step [{}, {}): {} {} on {} ready asks for {count}",
                        round3(value),
                        step.lower.map_or("-inf".to_string(), |v| v.to_string()),
                        step.upper.map_or("+inf".to_string(), |v| v.to_string()),
                        policy.adjustment_type().wire_name(),
                        step.change,
                        input.ready
                    );
                }
            }
        }
    }
    Verdict {
        evaluation,
        blocks_scale_in: false,
    }
}

/// Evaluates one tier. See the module documentation for the rules.
pub fn plan(input: &Input<'_>, memory: &mut Memory) -> Outcome {
    let scaling = input.scaling;
    let now = input.now_ms;
    let current = input.desired;
    let (min, max, schedule) = effective_bounds(scaling, now);
    let mut inputs = ScalingInputs {
        at_ms: now,
        from: current,
        to: current,
        ready: input.ready,
        warming: input.warming,
        min,
        max,
        schedule,
        ..ScalingInputs::default()
    };
    if let Some(manual) = scaling.desired {
        inputs.to = manual;
        inputs.reason = format!("paused: desired is set by hand to {manual}");
        return Outcome {
            desired: None,
            inputs,
        };
    }

    let verdicts: Vec<Verdict> = scaling
        .policies
        .iter()
        .enumerate()
        .map(|(i, policy)| evaluate(policy, input.metrics.get(i).copied().flatten(), input))
        .collect();
    let blocked = verdicts.iter().any(|v| v.blocks_scale_in);
    let recommendation = verdicts
        .iter()
        .filter_map(|v| v.evaluation.recommendation)
        .max();
    inputs.policies = verdicts.into_iter().map(|v| v.evaluation).collect();
    inputs.recommendation = recommendation;

    let (window_ms, adaptive) = scaling.scale_in_window_ms(input.observed_startup_ms);
    inputs.stabilization_ms = window_ms;
    inputs.stabilization_adaptive = adaptive;
    inputs.observed_startup_ms = input.observed_startup_ms;
    let mut target = recommendation.unwrap_or(current);
    let mut why = match recommendation {
        Some(count) if count > current => format!("the policies ask for {count}"),
        Some(count) if count < current => format!("every policy allows {count}"),
        Some(_) => "the policies ask to keep the count".to_string(),
        None if scaling.policies.is_empty() => "no policies".to_string(),
        None => "no policy has a recommendation".to_string(),
    };

    if let Some(count) = recommendation {
        memory.remember_recommendation(now, count, window_ms);
    }
    if target < current {
        if blocked {
            target = current;
            why = "a policy without data blocks scale-in".to_string();
            inputs
                .bounded_by
                .push(ScalingBound::ScaleInHeld { why: why.clone() });
        } else if input.warming > 0 {
            target = current;
            why = format!(
                "{} instances are starting or warming up: no scale-in until they finish",
                input.warming
            );
            inputs
                .bounded_by
                .push(ScalingBound::ScaleInHeld { why: why.clone() });
        } else if now.saturating_sub(memory.since_ms) < window_ms {
            target = current;
            why = format!(
                "this leader has watched the tier for {}, less than the {} stabilization window: no scale-in yet",
                millis(now.saturating_sub(memory.since_ms)),
                millis(window_ms)
            );
            inputs
                .bounded_by
                .push(ScalingBound::ScaleInHeld { why: why.clone() });
        } else if let Some(highest) = memory.highest_in_window() {
            if highest > target {
                target = highest.min(current);
                why = format!(
                    "the highest recommendation of the last {} was {highest}",
                    millis(window_ms)
                );
                inputs
                    .bounded_by
                    .push(ScalingBound::Stabilization { window_ms, highest });
            }
        }
    }

    if target > current {
        let cooldown_ms = scaling.cooldown.as_millis();
        let last_out = memory.last_scale_out_ms.or_else(|| {
            input
                .last_scaling
                .filter(|d| d.to > d.from)
                .map(|d| d.at_ms)
        });
        if let Some(at) = last_out {
            let elapsed = now.saturating_sub(at);
            if elapsed < cooldown_ms {
                target = current;
                why = format!(
                    "in the {} cooldown after the last scale-out",
                    millis(cooldown_ms)
                );
                inputs.bounded_by.push(ScalingBound::Cooldown {
                    remaining_ms: cooldown_ms - elapsed,
                });
            }
        }
    }

    let period_ms = scaling.step_period.as_millis();
    memory.forget_changes_older_than(now, period_ms);
    if target != current {
        let (added, removed) = changes_in_period(memory, input.last_scaling, now, period_ms);
        let limit_for = |start: u32| {
            let percent = scaling
                .max_step_percent
                .map_or(0, |p| ceil_count(f64::from(start) * f64::from(p) / 100.0));
            scaling.max_step.max(percent)
        };
        if target > current {
            let start = current.saturating_sub(added);
            let limit = limit_for(start);
            let allowed = start.saturating_add(limit);
            if target > allowed {
                target = allowed.max(current);
                why = format!("{why}, limited to {limit} more per {}", millis(period_ms));
                inputs.bounded_by.push(ScalingBound::StepLimit {
                    period_ms,
                    limit,
                    allowed: target,
                });
            }
        } else {
            let start = current.saturating_add(removed);
            let limit = limit_for(start);
            let allowed = start.saturating_sub(limit);
            if target < allowed {
                target = allowed.min(current);
                why = format!("{why}, limited to {limit} fewer per {}", millis(period_ms));
                inputs.bounded_by.push(ScalingBound::StepLimit {
                    period_ms,
                    limit,
                    allowed: target,
                });
            }
        }
    }

    let bounded = target.clamp(min, max);
    if bounded != target {
        why = match schedule {
            Some(position) => {
                format!("{why}; scaling.schedules[{position}] sets the bounds to {min}..{max}")
            }
            None => format!("{why}; the bounds are {min}..{max}"),
        };
        inputs.bounded_by.push(ScalingBound::Bounds { min, max });
        target = bounded;
    }

    inputs.to = target;
    let changed = target != current;
    inputs.reason = if changed {
        let direction = if target > current {
            "scale out"
        } else {
            "scale in"
        };
        format!("{direction} from {current} to {target}: {why}")
    } else {
        format!("keep {current}: {why}")
    };
    if changed {
        memory.changes.push_back((now, current, target));
        if target > current {
            memory.last_scale_out_ms = Some(now);
        }
    }
    Outcome {
        desired: changed.then_some(target),
        inputs,
    }
}

/// Instances added and removed within the step period, by this memory or, before it began, by
/// the tier's last recorded decision.
fn changes_in_period(
    memory: &Memory,
    last: Option<&ScalingDecision>,
    now_ms: u64,
    period_ms: u64,
) -> (u32, u32) {
    let mut added = 0u32;
    let mut removed = 0u32;
    let mut count = |from: u32, to: u32| {
        if to > from {
            added = added.saturating_add(to - from);
        } else {
            removed = removed.saturating_add(from - to);
        }
    };
    for &(_, from, to) in &memory.changes {
        count(from, to);
    }
    if let Some(decision) = last {
        if decision.at_ms < memory.since_ms && decision.at_ms + period_ms > now_ms {
            count(decision.from, decision.to);
        }
    }
    (added, removed)
}

/// `ceil`, forgiving the last bits of floating-point error (`3 × 1.0000000001` is 3).
fn ceil_count(value: f64) -> u32 {
    if !value.is_finite() || value <= 0.0 {
        return 0;
    }
    let rounded = (value - 1e-9).ceil();
    if rounded >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        rounded as u32
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn millis(ms: u64) -> String {
    strata_api::Duration::from_millis(ms).to_string()
}

#[cfg(test)]
mod tests;

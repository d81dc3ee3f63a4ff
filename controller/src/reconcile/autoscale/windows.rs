//! The leader's metric windows: per tier, time-stamped samples of instance CPU (per instance),
//! load-balancer request rate, sessions, queue and response time (per tier) and custom metrics
//! (per tier or per instance), and the averages the autoscaler's policies read from them.
//!
//! In memory only, never in Raft: a new leader starts with empty windows, and the planner
//! treats data that covers less than a policy's reaction time as missing (it never scales in
//! on it). Memory is bounded: samples older than `WindowConfig::retention_ms` are dropped by
//! [`Windows::prune`], each series holds at most `WindowConfig::max_samples`, and the series of
//! an instance that is no longer reported goes with [`Windows::retain_instances`].
//!
//! Pure data: no clock. Every call takes the time of the sample or of the evaluation.

use std::collections::{HashMap, HashSet, VecDeque};

use strata_api::{Health, Instance, Phase, Scaling, ScalingMetric, ScalingPolicy};
use uuid::Uuid;

use super::MetricValue;

/// How many of a tier's most recent instances the observed start-up time looks at.
pub const STARTUP_SAMPLES: usize = 20;

/// The median start-up time (`ready_at_ms - created_at_ms`) of the tier's most recently
/// created instances that have become ready, or `None` before any has.
///
/// The median, not the mean: one instance that was restarted long after it was created (its
/// `ready_at_ms` is when it last became ready) must not stretch the tier's scale-in window.
pub fn observed_startup_ms<'a>(instances: impl IntoIterator<Item = &'a Instance>) -> Option<u64> {
    let mut ready: Vec<(u64, u64)> = instances
        .into_iter()
        .filter(|instance| instance.ready_at_ms != 0)
        .map(|instance| {
            (
                instance.created_at_ms,
                instance.ready_at_ms.saturating_sub(instance.created_at_ms),
            )
        })
        .collect();
    if ready.is_empty() {
        return None;
    }
    ready.sort_unstable_by_key(|&(created_at_ms, _)| std::cmp::Reverse(created_at_ms));
    let mut startups: Vec<u64> = ready
        .into_iter()
        .take(STARTUP_SAMPLES)
        .map(|(_, startup)| startup)
        .collect();
    startups.sort_unstable();
    Some(startups[startups.len() / 2])
}

/// Limits of the windows.
#[derive(Clone, Debug)]
pub struct WindowConfig {
    /// Samples older than this are dropped; at least the longest reaction time a policy may
    /// have (`strata_api::validate::MAX_REACTION_TIME`).
    pub retention_ms: u64,
    /// At most this many samples per series (a heartbeat a second for the retention fits).
    pub max_samples: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            retention_ms: strata_api::validate::MAX_REACTION_TIME.as_millis() + 60_000,
            max_samples: 1_200,
        }
    }
}

/// One load-balancer report for a tier, summed over its LB agents.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LbSample {
    pub requests_per_second: f64,
    pub sessions: f64,
    pub queue: f64,
    /// Average response time over the tier's servers, in milliseconds.
    pub response_time_ms: f64,
    /// Servers up in the pool when the sample was taken.
    pub servers: u32,
}

/// Which instances of a tier count, at the time of an evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Serving {
    /// Ready and past warm-up, with the time warm-up ended: only their samples from then on
    /// enter averages.
    measured: Vec<(Uuid, u64)>,
    /// Running and healthy, warming up or not: they share the load balancer's traffic.
    serving: u32,
    /// Existing but not yet ready, or still warming up.
    warming: u32,
}

impl Serving {
    pub fn new(measured: Vec<(Uuid, u64)>, serving: u32, warming: u32) -> Serving {
        Serving {
            measured,
            serving,
            warming,
        }
    }

    /// Classifies a tier's instances (any phase) at `now_ms` with its `scaling.warmup`.
    pub fn from_instances<'a>(
        instances: impl IntoIterator<Item = &'a Instance>,
        scaling: &Scaling,
        now_ms: u64,
    ) -> Serving {
        let warmup_ms = scaling.warmup.as_millis();
        let mut serving = Serving::default();
        for instance in instances {
            if instance.phase.is_final() || instance.phase == Phase::Draining {
                continue;
            }
            if instance.phase == Phase::Running && instance.health == Health::Healthy {
                serving.serving += 1;
                let warm_at = instance.ready_at_ms.saturating_add(warmup_ms);
                if warm_at <= now_ms {
                    serving.measured.push((instance.id, warm_at));
                    continue;
                }
            }
            serving.warming += 1;
        }
        serving
    }

    /// Instances ready and past warm-up.
    pub fn ready(&self) -> u32 {
        u32::try_from(self.measured.len()).unwrap_or(u32::MAX)
    }

    pub fn warming(&self) -> u32 {
        self.warming
    }
}

#[derive(Clone, Debug, Default)]
struct Series {
    samples: VecDeque<(u64, f64)>,
}

impl Series {
    fn push(&mut self, at_ms: u64, value: f64, max: usize) {
        // Samples arrive in time order per series; a late one would break the ordered pruning.
        if self.samples.back().is_some_and(|&(at, _)| at > at_ms) {
            return;
        }
        self.samples.push_back((at_ms, value));
        while self.samples.len() > max {
            self.samples.pop_front();
        }
    }

    fn prune(&mut self, earliest_ms: u64) {
        while self
            .samples
            .front()
            .is_some_and(|&(at, _)| at < earliest_ms)
        {
            self.samples.pop_front();
        }
    }

    /// The latest sample taken after `after_ms` and at or before `now_ms`.
    fn latest(&self, after_ms: u64, now_ms: u64) -> Option<f64> {
        self.samples
            .iter()
            .rev()
            .find(|&&(at, _)| at <= now_ms)
            .filter(|&&(at, _)| at > after_ms)
            .map(|&(_, value)| value)
    }

    /// Mean of the samples taken after `after_ms` and at or before `now_ms`.
    fn mean(&self, after_ms: u64, now_ms: u64) -> Option<f64> {
        let (sum, count) = self
            .samples
            .iter()
            .rev()
            .skip_while(|&&(at, _)| at > now_ms)
            .take_while(|&&(at, _)| at > after_ms)
            .fold((0.0, 0usize), |(sum, n), &(_, v)| (sum + v, n + 1));
        (count > 0).then(|| sum / count as f64)
    }
}

#[derive(Clone, Debug, Default)]
struct TierWindows {
    /// When these windows first heard of the tier: how far back any average can reach.
    first_ms: u64,
    cpu: HashMap<Uuid, Series>,
    lb: VecDeque<(u64, LbSample)>,
    custom_tier: HashMap<String, Series>,
    custom_instance: HashMap<String, HashMap<Uuid, Series>>,
}

/// Every tier's windows.
#[derive(Clone, Debug, Default)]
pub struct Windows {
    config: WindowConfig,
    tiers: HashMap<String, TierWindows>,
}

impl Windows {
    pub fn new(config: WindowConfig) -> Windows {
        Windows {
            config,
            tiers: HashMap::new(),
        }
    }

    fn tier(&mut self, tier: &str, at_ms: u64) -> &mut TierWindows {
        self.tiers
            .entry(tier.to_string())
            .or_insert_with(|| TierWindows {
                first_ms: at_ms,
                ..TierWindows::default()
            })
    }

    /// An instance's CPU, percent of its reservation, as its agent reported it.
    pub fn record_cpu(&mut self, tier: &str, instance: Uuid, at_ms: u64, percent: f64) {
        if !percent.is_finite() {
            return;
        }
        let max = self.config.max_samples;
        self.tier(tier, at_ms)
            .cpu
            .entry(instance)
            .or_default()
            .push(at_ms, percent, max);
    }

    /// The tier's load-balancer figures.
    pub fn record_lb(&mut self, tier: &str, at_ms: u64, sample: LbSample) {
        let max = self.config.max_samples;
        let lb = &mut self.tier(tier, at_ms).lb;
        if lb.back().is_some_and(|&(at, _)| at > at_ms) {
            return;
        }
        lb.push_back((at_ms, sample));
        while lb.len() > max {
            lb.pop_front();
        }
    }

    /// A custom metric pushed by a user, for the whole tier or one instance.
    pub fn record_custom(
        &mut self,
        tier: &str,
        name: &str,
        instance: Option<Uuid>,
        at_ms: u64,
        value: f64,
    ) {
        if !value.is_finite() {
            return;
        }
        let max = self.config.max_samples;
        let windows = self.tier(tier, at_ms);
        let series = match instance {
            None => windows.custom_tier.entry(name.to_string()).or_default(),
            Some(id) => windows
                .custom_instance
                .entry(name.to_string())
                .or_default()
                .entry(id)
                .or_default(),
        };
        series.push(at_ms, value, max);
    }

    /// Drops samples older than the retention, and tiers with no samples left.
    pub fn prune(&mut self, now_ms: u64) {
        let earliest = now_ms.saturating_sub(self.config.retention_ms);
        self.tiers.retain(|_, windows| {
            windows.cpu.retain(|_, series| {
                series.prune(earliest);
                !series.samples.is_empty()
            });
            while windows.lb.front().is_some_and(|&(at, _)| at < earliest) {
                windows.lb.pop_front();
            }
            windows.custom_tier.retain(|_, series| {
                series.prune(earliest);
                !series.samples.is_empty()
            });
            windows.custom_instance.retain(|_, by_instance| {
                by_instance.retain(|_, series| {
                    series.prune(earliest);
                    !series.samples.is_empty()
                });
                !by_instance.is_empty()
            });
            !(windows.cpu.is_empty()
                && windows.lb.is_empty()
                && windows.custom_tier.is_empty()
                && windows.custom_instance.is_empty())
        });
    }

    /// Forgets the per-instance series of instances not in `alive`.
    pub fn retain_instances(&mut self, tier: &str, alive: &HashSet<Uuid>) {
        if let Some(windows) = self.tiers.get_mut(tier) {
            windows.cpu.retain(|id, _| alive.contains(id));
            for by_instance in windows.custom_instance.values_mut() {
                by_instance.retain(|id, _| alive.contains(id));
            }
        }
    }

    pub fn forget_tier(&mut self, tier: &str) {
        self.tiers.remove(tier);
    }

    /// The value each policy sees now, in the order of `policies` (the planner's
    /// `Input::metrics`).
    pub fn policy_values(
        &self,
        tier: &str,
        policies: &[ScalingPolicy],
        serving: &Serving,
        now_ms: u64,
    ) -> Vec<Option<MetricValue>> {
        policies
            .iter()
            .map(|policy| {
                self.value(
                    tier,
                    policy.metric,
                    policy.name.as_deref(),
                    policy.reaction_time().as_millis(),
                    serving,
                    now_ms,
                )
            })
            .collect()
    }

    /// The average of one metric over the last `reaction_ms`, or `None` without data.
    pub fn value(
        &self,
        tier: &str,
        metric: ScalingMetric,
        custom_name: Option<&str>,
        reaction_ms: u64,
        serving: &Serving,
        now_ms: u64,
    ) -> Option<MetricValue> {
        let windows = self.tiers.get(tier)?;
        let covered_ms = now_ms.saturating_sub(windows.first_ms);
        let after = now_ms.saturating_sub(reaction_ms);
        // Samples from before the newest measured instance joined describe a load that fewer
        // instances shared: an average reaching back past its arrival overstates what each
        // carries now, and proportional scaling on it overshoots (each scale-out would be
        // followed by another while the old samples age out). So per-instance averages take
        // only samples taken after the newest one finished warming up (a sample describes the
        // interval before it, so one taken at that moment is still the old load); an instance
        // with no sample since then contributes its latest one.
        let joined = serving
            .measured
            .iter()
            .map(|&(_, warm_at)| warm_at)
            .max()
            .unwrap_or(0);
        let per_instance = |series: &HashMap<Uuid, Series>| {
            let means: Vec<f64> = serving
                .measured
                .iter()
                .filter_map(|(id, warm_at)| {
                    let series = series.get(id)?;
                    let own = after.max(warm_at.saturating_sub(1));
                    series
                        .mean(own.max(joined), now_ms)
                        .or_else(|| series.latest(own, now_ms))
                })
                .collect();
            (!means.is_empty()).then(|| MetricValue {
                value: means.iter().sum::<f64>() / means.len() as f64,
                instances: u32::try_from(means.len()).unwrap_or(u32::MAX),
                covered_ms,
            })
        };
        match metric {
            ScalingMetric::CpuUtilization => per_instance(&windows.cpu),
            ScalingMetric::Custom => {
                let name = custom_name?;
                if let Some(by_instance) = windows.custom_instance.get(name) {
                    return per_instance(by_instance);
                }
                let mean = windows.custom_tier.get(name)?.mean(after, now_ms)?;
                tier_total(mean, serving.serving, covered_ms)
            }
            lb_metric => {
                let recent: Vec<&LbSample> = windows
                    .lb
                    .iter()
                    .filter(|&&(at, _)| at > after && at <= now_ms)
                    .map(|(_, sample)| sample)
                    .collect();
                let latest = recent.last()?;
                let mean = |pick: fn(&LbSample) -> f64| {
                    recent.iter().map(|s| pick(s)).sum::<f64>() / recent.len() as f64
                };
                let servers = latest.servers;
                match lb_metric {
                    ScalingMetric::RequestsPerSecond => {
                        tier_total(mean(|s| s.requests_per_second), servers, covered_ms)
                    }
                    ScalingMetric::ActiveConnections => {
                        tier_total(mean(|s| s.sessions), servers, covered_ms)
                    }
                    ScalingMetric::QueueLength => {
                        tier_total(mean(|s| s.queue), servers, covered_ms)
                    }
                    _ => (servers > 0).then(|| MetricValue {
                        value: mean(|s| s.response_time_ms),
                        instances: servers,
                        covered_ms,
                    }),
                }
            }
        }
    }
}

/// A tier-wide total spread over the instances serving it.
fn tier_total(total: f64, servers: u32, covered_ms: u64) -> Option<MetricValue> {
    (servers > 0).then(|| MetricValue {
        value: total / f64::from(servers),
        instances: servers,
        covered_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn cpu_averages_leave_out_warming_instances_and_their_warm_up_samples() {
        let mut windows = Windows::new(WindowConfig::default());
        for second in 0..30u64 {
            let at = second * 1000;
            windows.record_cpu("web", id(1), at, 50.0);
            // Instance 2 burns CPU while it warms up (until 20 s), then settles.
            windows.record_cpu("web", id(2), at, if second < 20 { 100.0 } else { 70.0 });
            windows.record_cpu("web", id(3), at, 100.0);
        }
        // 3 is still warming; 2 finished warm-up at 20 s.
        let serving = Serving::new(vec![(id(1), 0), (id(2), 20_000)], 3, 1);
        let value = windows
            .value(
                "web",
                ScalingMetric::CpuUtilization,
                None,
                10_000,
                &serving,
                29_000,
            )
            .expect("data");
        assert_eq!(value.instances, 2);
        assert!((value.value - 60.0).abs() < 1e-9, "{value:?}");
        assert_eq!(value.covered_ms, 29_000);
    }

    #[test]
    fn averages_start_when_the_newest_instance_joined() {
        // Two instances at 90% for 20 s; a third joins at 20 s and the three settle at 60%.
        // Over a 10 s reaction time at 25 s, the old samples (90%) would make 4 of the 60%
        // now: the average must cover only the time since the third joined.
        let mut windows = Windows::new(WindowConfig::default());
        for second in 1..=25u64 {
            let at = second * 1000;
            let cpu = if second <= 20 { 90.0 } else { 60.0 };
            windows.record_cpu("web", id(1), at, cpu);
            windows.record_cpu("web", id(2), at, cpu);
            if second > 20 {
                windows.record_cpu("web", id(3), at, 60.0);
            }
        }
        let serving = Serving::new(vec![(id(1), 0), (id(2), 0), (id(3), 20_500)], 3, 0);
        let value = windows
            .value(
                "web",
                ScalingMetric::CpuUtilization,
                None,
                10_000,
                &serving,
                25_000,
            )
            .expect("data");
        assert_eq!((value.value, value.instances), (60.0, 3));
        // An instance whose only samples predate the newest arrival still counts, with its
        // latest sample.
        let serving = Serving::new(vec![(id(1), 0), (id(3), 25_000)], 2, 0);
        let mut sparse = Windows::new(WindowConfig::default());
        sparse.record_cpu("web", id(1), 22_000, 70.0);
        sparse.record_cpu("web", id(1), 24_000, 50.0);
        sparse.record_cpu("web", id(3), 25_000, 40.0);
        let value = sparse
            .value(
                "web",
                ScalingMetric::CpuUtilization,
                None,
                10_000,
                &serving,
                25_000,
            )
            .expect("data");
        assert_eq!((value.value, value.instances), (45.0, 2));
    }

    #[test]
    fn lb_totals_are_spread_over_the_servers() {
        let mut windows = Windows::new(WindowConfig::default());
        for (second, rate) in [(1u64, 100.0), (2, 200.0), (3, 300.0)] {
            windows.record_lb(
                "web",
                second * 1000,
                LbSample {
                    requests_per_second: rate,
                    servers: 4,
                    response_time_ms: 20.0,
                    ..LbSample::default()
                },
            );
        }
        let serving = Serving::new(Vec::new(), 4, 0);
        let value = windows
            .value(
                "web",
                ScalingMetric::RequestsPerSecond,
                None,
                2_000,
                &serving,
                3_000,
            )
            .expect("data");
        // The last 2 s hold the samples at 2 s and 3 s: 250 req/s over 4 servers.
        assert_eq!((value.value, value.instances), (62.5, 4));
        let rt = windows
            .value(
                "web",
                ScalingMetric::ResponseTimeMs,
                None,
                2_000,
                &serving,
                3_000,
            )
            .expect("data");
        assert_eq!(rt.value, 20.0);
    }

    #[test]
    fn old_data_is_missing_data_and_memory_is_bounded() {
        let mut windows = Windows::new(WindowConfig {
            retention_ms: 60_000,
            max_samples: 10,
        });
        for second in 0..100u64 {
            windows.record_custom("web", "queue_depth", None, second * 1000, 8.0);
        }
        assert_eq!(
            windows.tiers["web"].custom_tier["queue_depth"]
                .samples
                .len(),
            10
        );
        let serving = Serving::new(Vec::new(), 2, 0);
        let fresh = windows.value(
            "web",
            ScalingMetric::Custom,
            Some("queue_depth"),
            5_000,
            &serving,
            99_000,
        );
        assert_eq!(fresh.map(|v| v.value), Some(4.0));
        // Nothing in the last 5 s at 200 s: missing, not the old value.
        let stale = windows.value(
            "web",
            ScalingMetric::Custom,
            Some("queue_depth"),
            5_000,
            &serving,
            200_000,
        );
        assert_eq!(stale, None);
        windows.prune(200_000);
        assert!(windows.tiers.is_empty());
    }

    #[test]
    fn gone_instances_are_forgotten() {
        let mut windows = Windows::new(WindowConfig::default());
        windows.record_cpu("web", id(1), 1_000, 10.0);
        windows.record_cpu("web", id(2), 1_000, 10.0);
        windows.retain_instances("web", &HashSet::from([id(2)]));
        assert_eq!(windows.tiers["web"].cpu.len(), 1);
    }
}

//! The Kubernetes HorizontalPodAutoscaler (autoscaling/v2) with its default configuration,
//! on CPU utilization, written from kubernetes/kubernetes `pkg/controller/podautoscaler`:
//! `replica_calculator.go` (`GetResourceReplicas`, `groupPods`), `metrics/utilization.go`
//! (`GetResourceUtilizationRatio`), `horizontal.go` (`reconcileAutoscaler`,
//! `stabilizeRecommendationWithBehaviors`, `convertDesiredReplicasWithBehaviorRate`,
//! `calculateScaleUpLimitWithScalingRules`, `calculateScaleDownLimitWithBehaviors`,
//! `getReplicasChangePerPeriod`, `recordInitialRecommendation`), the defaults in
//! `pkg/apis/autoscaling/v2/defaults.go` and `pkg/controller/podautoscaler/config/v1alpha1/
//! defaults.go`, and metrics-server (`--metric-resolution` 15 s in its shipped manifests; a
//! pod's CPU is the rate between its last two cumulative samples).
//!
//! The metric pipeline modelled: metrics-server scrapes every pod's cumulative CPU every 15 s
//! and serves, per pod, the rate over the last two scrapes (`Timestamp` the last scrape,
//! `Window` the interval), so a pod has a metric only from its second scrape on. The HPA syncs
//! every 15 s, `SYNC_PHASE_S` after a scrape (the expected phase of two unsynchronized
//! 15-second clocks), and reads the latest rates. A starting pod is `Pending` until it is
//! ready; its container, and with it its CPU counter, starts then.

use std::collections::HashMap;

use super::world::{Autoscaler, SimInstance, TierView};

/// `--horizontal-pod-autoscaler-sync-period`.
pub const SYNC_PERIOD_S: u64 = 15;
/// metrics-server `--metric-resolution` in its shipped manifests.
pub const METRIC_RESOLUTION_S: u64 = 15;
/// Seconds from a scrape to the next sync.
pub const SYNC_PHASE_S: u64 = 7;
/// `--horizontal-pod-autoscaler-tolerance`.
pub const TOLERANCE: f64 = 0.1;
/// `--horizontal-pod-autoscaler-downscale-stabilization`.
pub const DOWNSCALE_STABILIZATION_S: u64 = 300;
/// `--horizontal-pod-autoscaler-cpu-initialization-period`.
pub const CPU_INITIALIZATION_PERIOD_S: u64 = 300;
/// Every pod requests one core; CPU percent is of that request.
const REQUEST_MILLI: i64 = 1000;

/// One `HPAScalingPolicy`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RatePolicy {
    Pods { value: u32, period_s: u64 },
    Percent { value: u32, period_s: u64 },
}

impl RatePolicy {
    /// (period, value, whether the value is a percentage).
    fn parts(self) -> (u64, u32, bool) {
        match self {
            RatePolicy::Pods { value, period_s } => (period_s, value, false),
            RatePolicy::Percent { value, period_s } => (period_s, value, true),
        }
    }
}

/// The defaults of `behavior` (autoscaling/v2 `SetDefaults_HorizontalPodAutoscalerBehavior`):
/// scale up by max(100%, 4 pods) per 15 s with no stabilization; scale down by 100% per 15 s
/// after the controller's 300 s stabilization window; `selectPolicy: Max` both ways.
#[derive(Clone, Debug, PartialEq)]
pub struct HpaConfig {
    pub min: u32,
    pub max: u32,
    pub target_utilization: i64,
    pub scale_up: Vec<RatePolicy>,
    pub scale_up_stabilization_s: u64,
    pub scale_down: Vec<RatePolicy>,
    pub scale_down_stabilization_s: u64,
}

impl HpaConfig {
    pub fn defaults(min: u32, max: u32, target_utilization: i64) -> HpaConfig {
        HpaConfig {
            min,
            max,
            target_utilization,
            scale_up: vec![
                RatePolicy::Pods {
                    value: 4,
                    period_s: 15,
                },
                RatePolicy::Percent {
                    value: 100,
                    period_s: 15,
                },
            ],
            scale_up_stabilization_s: 0,
            scale_down: vec![RatePolicy::Percent {
                value: 100,
                period_s: 15,
            }],
            scale_down_stabilization_s: DOWNSCALE_STABILIZATION_S,
        }
    }
}

/// A pod as `groupPods` sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pod {
    /// `status.startTime`.
    pub start_s: u64,
    /// When its Ready condition became true; `None` while it is Pending.
    pub ready_s: Option<u64>,
    /// Its metrics-server sample: (timestamp, window, usage in millicores).
    pub metric: Option<(u64, u64, i64)>,
}

/// The pieces of `GetResourceReplicas`: the proposal for one CPU metric, or `None` where the
/// real function returns an error (no pods, or no metrics for any ready pod).
pub fn resource_replicas(
    current_replicas: u32,
    target_utilization: i64,
    pods: &[Pod],
    now_s: u64,
) -> Option<u32> {
    if pods.is_empty() {
        return None;
    }
    // groupPods (no deleted or failed pods in the simulation).
    let mut ready_pod_count = 0u32;
    let mut unready = Vec::new();
    let mut missing = Vec::new();
    let mut metrics: Vec<i64> = Vec::new();
    for (index, pod) in pods.iter().enumerate() {
        let Some(ready_s) = pod.ready_s else {
            unready.push(index); // Pending
            continue;
        };
        let Some((timestamp, window, usage)) = pod.metric else {
            missing.push(index);
            continue;
        };
        let is_unready = if pod.start_s + CPU_INITIALIZATION_PERIOD_S > now_s {
            // Ready, but the sample's window began before it became ready.
            timestamp < ready_s + window
        } else {
            // Excluded only if unready and never ready within the initial readiness delay
            // (30 s); this pod is ready.
            false
        };
        if is_unready {
            unready.push(index);
            continue;
        }
        ready_pod_count += 1;
        metrics.push(usage);
    }
    if metrics.is_empty() {
        return None;
    }
    let (usage_ratio, _) = utilization_ratio(&metrics, target_utilization);
    let scale_up_with_unready = !unready.is_empty() && usage_ratio > 1.0;
    if !scale_up_with_unready && missing.is_empty() {
        if (1.0 - usage_ratio).abs() <= TOLERANCE {
            return Some(current_replicas);
        }
        return Some(ceil(usage_ratio * f64::from(ready_pod_count)));
    }
    if !missing.is_empty() {
        if usage_ratio < 1.0 {
            // On a scale-down, missing pods use max(100%, target) of their request.
            let fallback = REQUEST_MILLI * target_utilization.max(100) / 100;
            metrics.extend(missing.iter().map(|_| fallback));
        } else if usage_ratio > 1.0 {
            metrics.extend(missing.iter().map(|_| 0));
        }
    }
    if scale_up_with_unready {
        metrics.extend(unready.iter().map(|_| 0));
    }
    let (new_ratio, _) = utilization_ratio(&metrics, target_utilization);
    if (1.0 - new_ratio).abs() <= TOLERANCE
        || (usage_ratio < 1.0 && new_ratio > 1.0)
        || (usage_ratio > 1.0 && new_ratio < 1.0)
    {
        return Some(current_replicas);
    }
    let new_replicas = ceil(new_ratio * metrics.len() as f64);
    if (new_ratio < 1.0 && new_replicas > current_replicas)
        || (new_ratio > 1.0 && new_replicas < current_replicas)
    {
        return Some(current_replicas);
    }
    Some(new_replicas)
}

/// `GetResourceUtilizationRatio`: integer percent of the summed requests, then over target.
fn utilization_ratio(metrics: &[i64], target_utilization: i64) -> (f64, i64) {
    let usage: i64 = metrics.iter().sum();
    let requests = REQUEST_MILLI * metrics.len() as i64;
    let utilization = usage * 100 / requests;
    (utilization as f64 / target_utilization as f64, utilization)
}

/// Go's `int32(math.Ceil(x))` for the non-negative values here.
fn ceil(value: f64) -> u32 {
    value.ceil().max(0.0) as u32
}

/// The controller's per-HPA memory and the simulated metrics-server.
pub struct Hpa {
    config: HpaConfig,
    /// (timestamp, recommendation), `a.recommendations[key]`.
    recommendations: Vec<(u64, u32)>,
    scale_up_events: Vec<(u64, u32)>,
    scale_down_events: Vec<(u64, u32)>,
    /// Per pod: cumulative CPU in core-milliseconds since its container started.
    cumulative: HashMap<u64, i64>,
    /// Per pod: its last two scrapes, the earlier one absent after the first scrape.
    scrapes: HashMap<u64, (Option<Scrape>, Scrape)>,
}

/// One scrape of a pod's counter: (time, cumulative core-milliseconds).
type Scrape = (u64, i64);

impl Hpa {
    pub fn new(config: HpaConfig) -> Hpa {
        Hpa {
            config,
            recommendations: Vec::new(),
            scale_up_events: Vec::new(),
            scale_down_events: Vec::new(),
            cumulative: HashMap::new(),
            scrapes: HashMap::new(),
        }
    }

    fn pods(&self, instances: &[SimInstance], now_s: u64) -> Vec<Pod> {
        instances
            .iter()
            .map(|instance| {
                let metric = self.scrapes.get(&instance.id).and_then(
                    |&(previous, (last_at, last_total))| {
                        let (previous_at, previous_total) = previous?;
                        let window = last_at - previous_at;
                        // A rate in millicores over the window.
                        let usage = (last_total - previous_total) / window as i64;
                        Some((last_at, window, usage))
                    },
                );
                Pod {
                    start_s: instance.created_s,
                    ready_s: instance.is_ready(now_s).then_some(instance.ready_s),
                    metric,
                }
            })
            .collect()
    }

    /// `reconcileAutoscaler` from the current replica count to the new one.
    pub fn reconcile(&mut self, now_s: u64, current: u32, pods: &[Pod]) -> u32 {
        if self.recommendations.is_empty() {
            self.recommendations.push((now_s, current));
        }
        let config = &self.config;
        if current > config.max {
            return self.rescale(now_s, current, config.max);
        }
        if current < config.min {
            return self.rescale(now_s, current, config.min);
        }
        // A failed metric leaves the count alone (`computeReplicasForMetrics` errors).
        let Some(proposal) = resource_replicas(current, config.target_utilization, pods, now_s)
        else {
            return current;
        };
        let stabilized = self.stabilize(now_s, current, proposal);
        let desired = self.limit_rate(now_s, current, stabilized);
        self.rescale(now_s, current, desired)
    }

    /// `stabilizeRecommendationWithBehaviors` (the version that keeps the current count between
    /// the lowest recommendation of the scale-up window and the highest of the scale-down one).
    fn stabilize(&mut self, now_s: u64, current: u32, desired: u32) -> u32 {
        let up_cutoff = now_s as i64 - self.config.scale_up_stabilization_s as i64;
        let down_cutoff = now_s as i64 - self.config.scale_down_stabilization_s as i64;
        let mut up_recommendation = desired;
        let mut down_recommendation = desired;
        let mut old_sample = None;
        for (index, &(at, value)) in self.recommendations.iter().enumerate() {
            let at = at as i64;
            // `rec.timestamp.After(cutoff)`.
            if at > up_cutoff {
                up_recommendation = up_recommendation.min(value);
            }
            if at > down_cutoff {
                down_recommendation = down_recommendation.max(value);
            }
            if at < up_cutoff && at < down_cutoff {
                old_sample = Some(index);
            }
        }
        let recommendation = current.max(up_recommendation).min(down_recommendation);
        match old_sample {
            Some(index) => self.recommendations[index] = (now_s, desired),
            None => self.recommendations.push((now_s, desired)),
        }
        recommendation
    }

    /// `convertDesiredReplicasWithBehaviorRate`.
    fn limit_rate(&self, now_s: u64, current: u32, desired: u32) -> u32 {
        let config = &self.config;
        if desired > current {
            // `calculateScaleUpLimitWithScalingRules` with `selectPolicy: Max`.
            let mut limit = 0u32;
            for policy in &config.scale_up {
                let (period_s, value, percent) = policy.parts();
                let start =
                    current.saturating_sub(changes_in(&self.scale_up_events, period_s, now_s));
                let proposed = if percent {
                    // Rounded up so that a small count can still grow.
                    (f64::from(start) * (1.0 + f64::from(value) / 100.0)).ceil() as u32
                } else {
                    start + value
                };
                limit = limit.max(proposed);
            }
            let limit = limit.max(current);
            desired.min(limit.min(config.max))
        } else if desired < current {
            let mut limit = u32::MAX;
            // `calculateScaleDownLimitWithBehaviors` with `selectPolicy: Max`.
            for policy in &config.scale_down {
                let (period_s, value, percent) = policy.parts();
                let start = current + changes_in(&self.scale_down_events, period_s, now_s);
                let proposed = if percent {
                    (f64::from(start) * (1.0 - f64::from(value) / 100.0)) as u32
                } else {
                    start.saturating_sub(value)
                };
                limit = limit.min(proposed);
            }
            let limit = limit.min(current);
            desired.max(limit.max(config.min))
        } else {
            desired
        }
    }

    fn rescale(&mut self, now_s: u64, current: u32, desired: u32) -> u32 {
        if desired > current {
            self.scale_up_events.push((now_s, desired - current));
        } else if desired < current {
            self.scale_down_events.push((now_s, current - desired));
        }
        let horizon = now_s.saturating_sub(3_600);
        self.scale_up_events.retain(|&(at, _)| at >= horizon);
        self.scale_down_events.retain(|&(at, _)| at >= horizon);
        desired
    }
}

/// `getReplicasChangePerPeriod`: the replicas changed by events after `now - period`.
fn changes_in(events: &[(u64, u32)], period_s: u64, now_s: u64) -> u32 {
    let cutoff = now_s as i64 - period_s as i64;
    events
        .iter()
        .filter(|&&(at, _)| at as i64 > cutoff)
        .map(|&(_, change)| change)
        .sum()
}

impl Autoscaler for Hpa {
    fn decide(&mut self, now_s: u64, tier: &TierView<'_>) -> Option<u32> {
        if now_s % SYNC_PERIOD_S != SYNC_PHASE_S {
            return None;
        }
        let pods = self.pods(tier.instances, now_s);
        let desired = self.reconcile(now_s, tier.desired, &pods);
        (desired != tier.desired).then_some(desired)
    }

    fn observe(&mut self, now_s: u64, tier: &TierView<'_>, cpu: &[(u64, f64)]) {
        for &(id, percent) in cpu {
            // Percent of one core over one second, in core-milliseconds.
            *self.cumulative.entry(id).or_default() += (percent * 10.0).round() as i64;
        }
        let scrape_at = now_s + 1;
        if !scrape_at.is_multiple_of(METRIC_RESOLUTION_S) {
            return;
        }
        // Deleted pods leave metrics-server and the counters.
        let alive: std::collections::HashSet<u64> = tier.instances.iter().map(|i| i.id).collect();
        self.cumulative.retain(|id, _| alive.contains(id));
        self.scrapes.retain(|id, _| alive.contains(id));
        for instance in tier.instances.iter().filter(|i| i.ready_s <= scrape_at) {
            let total = self.cumulative.get(&instance.id).copied().unwrap_or(0);
            let sample = (scrape_at, total);
            self.scrapes
                .entry(instance.id)
                .and_modify(|(previous, last)| *previous = Some(std::mem::replace(last, sample)))
                .or_insert((None, sample));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_pod(usage_milli: i64) -> Pod {
        Pod {
            start_s: 0,
            ready_s: Some(0),
            metric: Some((1_000, 15, usage_milli)),
        }
    }

    const NOW: u64 = 1_000;

    #[test]
    fn proposals_follow_the_documented_formula() {
        // The docs' example: 200m used against a 100m target doubles the replicas.
        // Here: 4 pods at 90% against a 60% target: ceil(1.5 × 4) = 6.
        let pods = vec![ready_pod(900); 4];
        assert_eq!(resource_replicas(4, 60, &pods, NOW), Some(6));
        // Within 10%: 4 pods at 65% (ratio 1.083) keep 4; at 67% (1.117) they go to 5.
        assert_eq!(resource_replicas(4, 60, &[ready_pod(650); 4], NOW), Some(4));
        assert_eq!(resource_replicas(4, 60, &[ready_pod(670); 4], NOW), Some(5));
        // Down: 4 pods at 30% ask for 2.
        assert_eq!(resource_replicas(4, 60, &[ready_pod(300); 4], NOW), Some(2));
        // Utilization is an integer percent, floored: 3 pods at 65.9% are 65%.
        assert_eq!(resource_replicas(3, 60, &[ready_pod(659); 3], NOW), Some(3));
        // kubernetes#116984: 40 tasks on 10 replicas, 3.8 each wanted, is within 10%.
        // As CPU: 10 pods at 40% against a 38% target.
        let pods = vec![ready_pod(400); 10];
        assert_eq!(resource_replicas(10, 38, &pods, NOW), Some(10));
        // No metrics for any ready pod: the real function errors, nothing changes.
        let pending = Pod {
            start_s: 0,
            ready_s: None,
            metric: None,
        };
        assert_eq!(resource_replicas(2, 60, &[pending, pending], NOW), None);
        assert_eq!(resource_replicas(2, 60, &[], NOW), None);
    }

    #[test]
    fn unready_and_missing_pods_follow_the_rules() {
        let pending = Pod {
            start_s: NOW - 5,
            ready_s: None,
            metric: None,
        };
        // Scale-up with pending pods: they count at 0%, and a proposal that would change
        // direction keeps the count. 4 pods at 100% with 4 pending: the plain formula,
        // ceil(1.67 × 4) = 7, would remove a pod; over 8 pods it is 50%: keep 8.
        let mut pods = vec![ready_pod(1000); 4];
        pods.extend([pending; 4]);
        assert_eq!(resource_replicas(8, 60, &pods, NOW), Some(8));
        // 6 at 90% with 2 pending: 67% over 8, ceil(1.117 × 8) = 9.
        let mut pods = vec![ready_pod(900); 6];
        pods.extend([pending; 2]);
        assert_eq!(resource_replicas(8, 60, &pods, NOW), Some(9));
        // Pending pods are ignored on the way down: 4 at 30% with 2 pending ask for 2.
        let mut pods = vec![ready_pod(300); 4];
        pods.extend([pending, pending]);
        assert_eq!(resource_replicas(6, 60, &pods, NOW), Some(2));

        // A ready pod without a sample yet is missing: 100% on the way down, 0% up.
        let missing = Pod {
            start_s: NOW - 20,
            ready_s: Some(NOW - 10),
            metric: None,
        };
        let mut pods = vec![ready_pod(300); 3];
        pods.push(missing);
        // (3 × 30 + 100) / 4 = 47.5% → 47%: ceil(47/60 × 4) = 4: keep.
        assert_eq!(resource_replicas(4, 60, &pods, NOW), Some(4));
        let mut pods = vec![ready_pod(1000); 3];
        pods.push(missing);
        // (300 + 0) / 4 = 75%: ceil(1.25 × 4) = 5.
        assert_eq!(resource_replicas(4, 60, &pods, NOW), Some(5));

        // During the CPU initialization period a sample whose window began before the pod
        // became ready does not count.
        let young = Pod {
            start_s: NOW - 40,
            ready_s: Some(NOW - 10),
            metric: Some((NOW, 15, 1000)),
        };
        let mut pods = vec![ready_pod(600); 2];
        pods.push(young);
        // Only the two at 60% count: within tolerance, and the young pod is unready but the
        // ratio is not above 1, so it is not rebalanced: keep 3.
        assert_eq!(resource_replicas(3, 60, &pods, NOW), Some(3));
        // After 15 s more, its window lies after readiness and it counts.
        let grown = Pod {
            metric: Some((NOW + 15, 15, 1000)),
            ..young
        };
        let mut pods = vec![ready_pod(600); 2];
        pods.push(grown);
        // (60 + 60 + 100) / 3 = 73% → ratio 1.22: ceil(1.22 × 3) = 4.
        assert_eq!(resource_replicas(3, 60, &pods, NOW + 15), Some(4));
    }

    fn hpa() -> Hpa {
        Hpa::new(HpaConfig::defaults(1, 100, 60))
    }

    #[test]
    fn scale_up_is_limited_to_max_of_4_pods_and_100_percent_per_15_s() {
        let mut hpa = hpa();
        // 1 pod at 100% of its request against a 10% target asks for 10: limited to 1 + 4.
        let saturated = |n: usize| vec![ready_pod(1000); n];
        let mut hpa_low = Hpa::new(HpaConfig::defaults(1, 100, 10));
        assert_eq!(hpa_low.reconcile(0, 1, &saturated(1)), 5);
        // Within the same 15 s no more: the period started at 1.
        assert_eq!(hpa_low.reconcile(10, 5, &saturated(5)), 5);
        // The next period starts at 5: max(5 + 4, 2 × 5) = 10.
        assert_eq!(hpa_low.reconcile(15, 5, &saturated(5)), 10);
        assert_eq!(hpa_low.reconcile(30, 10, &saturated(10)), 20);
        // From 10 pods at 100% against 60%: ceil(1.66 × 10) = 17, within max(14, 20).
        assert_eq!(hpa.reconcile(0, 10, &saturated(10)), 17);
        // Bounds: never above max.
        let mut small = Hpa::new(HpaConfig::defaults(1, 6, 10));
        assert_eq!(small.reconcile(0, 4, &saturated(4)), 6);
    }

    #[test]
    fn scale_down_waits_for_the_highest_recommendation_of_300_s() {
        let mut hpa = hpa();
        let at = |n: usize, usage: i64| vec![ready_pod(usage); n];
        // The first reconcile records the current count as a recommendation.
        assert_eq!(hpa.reconcile(0, 10, &at(10, 300)), 10);
        assert_eq!(hpa.reconcile(150, 10, &at(10, 300)), 10);
        assert_eq!(hpa.reconcile(299, 10, &at(10, 300)), 10);
        // At 300 s the recommendations of 0 s (10) have left the window (`After(cutoff)`);
        // the highest since is 5.
        assert_eq!(hpa.reconcile(300, 10, &at(10, 300)), 5);
        // A high recommendation holds the count for the next 300 s.
        assert_eq!(hpa.reconcile(330, 5, &at(5, 900)), 8);
        assert_eq!(hpa.reconcile(345, 8, &at(8, 150)), 8);
        assert_eq!(hpa.reconcile(629, 8, &at(8, 150)), 8);
        // Then down at once: 100% per 15 s allows any scale-down.
        assert_eq!(hpa.reconcile(630, 8, &at(8, 150)), 2);
        // Scale-up is never stabilized.
        assert_eq!(hpa.reconcile(645, 2, &at(2, 1000)), 4);
    }

    #[test]
    fn the_pipeline_needs_two_scrapes_before_a_pod_has_a_metric() {
        let mut hpa = hpa();
        let instances = [SimInstance {
            id: 1,
            created_s: 0,
            ready_s: 0,
            initial: true,
        }];
        let tier = TierView {
            desired: 1,
            instances: &instances,
        };
        for second in 0..14 {
            hpa.observe(second, &tier, &[(1, 50.0)]);
        }
        // First scrape at 15 s (cumulative 7.5 core-seconds): no rate yet.
        hpa.observe(14, &tier, &[(1, 50.0)]);
        assert_eq!(hpa.pods(&instances, 15)[0].metric, None);
        for second in 15..29 {
            hpa.observe(second, &tier, &[(1, 90.0)]);
        }
        hpa.observe(29, &tier, &[(1, 90.0)]);
        // The rate over 15-30 s.
        assert_eq!(hpa.pods(&instances, 30)[0].metric, Some((30, 15, 900)));
        // The sync happens 7 s after the scrape.
        assert_eq!(hpa.decide(30, &tier), None);
        assert_eq!(hpa.decide(37, &tier), Some(2));
    }
}

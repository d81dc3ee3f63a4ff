//! AWS EC2 Auto Scaling target tracking on `ASGAverageCPUUtilization`, as its user guide
//! (awsdocs/amazon-ec2-auto-scaling-user-guide: `as-scaling-target-tracking.md`,
//! `ec2-auto-scaling-default-instance-warmup.md`) and the CloudWatch alarms it creates
//! describe it:
//!
//! - The metric is the group's average CPU in one-minute datapoints (detailed monitoring, as
//!   the guide recommends), each published when its minute ends; CloudWatch evaluates the
//!   alarms every minute.
//! - The scale-out alarm fires when 3 of 3 datapoints are above the target, the scale-in
//!   alarm when 15 of 15 are below it by more than 10% (the guide: "only when the metric is
//!   well (usually more than 10%) below target"). An alarm in ALARM invokes the policy again
//!   every minute. A missing datapoint breaks the run: missing data never scales.
//! - The policy scales proportionally: `ceil(instances measured × metric / target)`, rounded
//!   up so that it never adds too few or removes too many; out as far as that says, in only
//!   when that is below the current capacity.
//! - Instance warm-up is the default cooldown, 300 s, when neither a default instance warm-up
//!   nor the policy's is set (the API's `EstimatedInstanceWarmup`: "falls back to the value of
//!   default cooldown"): a new instance's CPU enters the aggregate only after it, warming
//!   instances count toward the current capacity, and no scale-in starts while any instance
//!   is starting or warming up.

use std::collections::VecDeque;

use super::world::{Autoscaler, SimInstance, TierView};

pub const PERIOD_S: u64 = 60;
pub const SCALE_OUT_DATAPOINTS: usize = 3;
pub const SCALE_IN_DATAPOINTS: usize = 15;
/// The scale-in alarm's threshold as a share of the target.
pub const SCALE_IN_THRESHOLD: f64 = 0.9;
/// The default cooldown, used as the instance warm-up when none is configured.
pub const WARMUP_S: u64 = 300;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Datapoint {
    /// Average CPU of the instances past warm-up during the minute.
    pub value: f64,
    /// How many instances it averages (at the minute's end).
    pub instances: u32,
}

pub struct Aws {
    min: u32,
    max: u32,
    target: f64,
    /// The minute being aggregated: sum and count of per-second samples.
    sum: f64,
    samples: u32,
    /// Latest datapoints, newest last; `None` is a minute without data.
    datapoints: VecDeque<Option<Datapoint>>,
}

/// What the alarms conclude from the datapoints at one evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Alarm {
    ScaleOut(Datapoint),
    ScaleIn(Datapoint),
    None,
}

impl Aws {
    pub fn new(min: u32, max: u32, target: f64) -> Aws {
        Aws {
            min,
            max,
            target,
            sum: 0.0,
            samples: 0,
            datapoints: VecDeque::new(),
        }
    }

    /// The alarms' state over the datapoints so far.
    pub fn alarm(&self) -> Alarm {
        let latest = |n: usize| -> Option<Vec<Datapoint>> {
            if self.datapoints.len() < n {
                return None;
            }
            self.datapoints.iter().rev().take(n).copied().collect()
        };
        if let Some(points) = latest(SCALE_OUT_DATAPOINTS) {
            if points.iter().all(|p| p.value > self.target) {
                return Alarm::ScaleOut(points[0]);
            }
        }
        if let Some(points) = latest(SCALE_IN_DATAPOINTS) {
            if points
                .iter()
                .all(|p| p.value < self.target * SCALE_IN_THRESHOLD)
            {
                return Alarm::ScaleIn(points[0]);
            }
        }
        Alarm::None
    }

    /// The policy's answer to an alarm, given the desired capacity and whether any instance is
    /// starting or warming up.
    pub fn policy(&self, alarm: Alarm, desired: u32, warming: bool) -> u32 {
        let proportional = |point: Datapoint| {
            let exact = f64::from(point.instances) * point.value / self.target;
            // Forgive floating-point noise: 3 × 60 / 60 is 3.
            (exact - 1e-9).ceil().max(0.0) as u32
        };
        match alarm {
            Alarm::ScaleOut(point) => proportional(point).clamp(desired, self.max),
            Alarm::ScaleIn(point) if !warming => proportional(point).clamp(self.min, desired),
            _ => desired,
        }
    }
}

impl Autoscaler for Aws {
    fn decide(&mut self, now_s: u64, tier: &TierView<'_>) -> Option<u32> {
        if now_s == 0 || !now_s.is_multiple_of(PERIOD_S) {
            return None;
        }
        let warming = tier.instances.iter().any(|i| !is_warm(i, now_s));
        let desired = self.policy(self.alarm(), tier.desired, warming);
        (desired != tier.desired).then_some(desired)
    }

    fn observe(&mut self, now_s: u64, tier: &TierView<'_>, cpu: &[(u64, f64)]) {
        let warm = |id: u64| {
            tier.instances
                .iter()
                .any(|i| i.id == id && is_warm(i, now_s))
        };
        for &(id, percent) in cpu {
            if warm(id) {
                self.sum += percent;
                self.samples += 1;
            }
        }
        if (now_s + 1).is_multiple_of(PERIOD_S) {
            let instances = tier.instances.iter().filter(|i| is_warm(i, now_s)).count() as u32;
            let point = (self.samples > 0 && instances > 0).then(|| Datapoint {
                value: self.sum / f64::from(self.samples),
                instances,
            });
            self.datapoints.push_back(point);
            while self.datapoints.len() > SCALE_IN_DATAPOINTS {
                self.datapoints.pop_front();
            }
            self.sum = 0.0;
            self.samples = 0;
        }
    }
}

/// Serving and past its warm-up (instances of the run's start are).
fn is_warm(instance: &SimInstance, now_s: u64) -> bool {
    instance.initial || instance.ready_s + WARMUP_S <= now_s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(points: &[Option<f64>], instances: u32) -> Aws {
        let mut aws = Aws::new(1, 50, 60.0);
        aws.datapoints = points
            .iter()
            .map(|p| p.map(|value| Datapoint { value, instances }))
            .collect();
        aws
    }

    #[test]
    fn scale_out_needs_three_datapoints_above_target() {
        let aws = with(&[Some(50.0), Some(90.0), Some(90.0)], 4);
        assert_eq!(aws.alarm(), Alarm::None);
        let aws = with(&[Some(90.0), Some(61.0), Some(90.0)], 4);
        // ceil(4 × 90 / 60) = 6.
        assert_eq!(aws.policy(aws.alarm(), 4, false), 6);
        // Warming instances count toward capacity: desired 6 already covers it.
        assert_eq!(aws.policy(aws.alarm(), 6, true), 6);
        // A missing minute breaks the run.
        let aws = with(&[Some(90.0), None, Some(90.0)], 4);
        assert_eq!(aws.alarm(), Alarm::None);
        // Exactly at target is not above it.
        let aws = with(&[Some(60.0), Some(60.0), Some(60.0)], 4);
        assert_eq!(aws.alarm(), Alarm::None);
    }

    #[test]
    fn scale_in_needs_fifteen_datapoints_well_below_target() {
        let low = vec![Some(30.0); 15];
        let aws = with(&low, 10);
        assert!(matches!(aws.alarm(), Alarm::ScaleIn(_)));
        // ceil(10 × 30 / 60) = 5.
        assert_eq!(aws.policy(aws.alarm(), 10, false), 5);
        // Not while an instance warms up.
        assert_eq!(aws.policy(aws.alarm(), 10, true), 10);
        // 14 low minutes are not enough.
        let aws = with(&low[..14], 10);
        assert_eq!(aws.alarm(), Alarm::None);
        // 55% is below target but within 10% of it: no scale-in.
        let aws = with(&[Some(55.0); 15], 10);
        assert_eq!(aws.alarm(), Alarm::None);
        // 53.9% is: ceil(10 × 53.9 / 60) = 9, rounding toward keeping capacity.
        let aws = with(&[Some(53.9); 15], 10);
        assert_eq!(aws.policy(aws.alarm(), 10, false), 9);
        // Never below min.
        let aws = with(&[Some(1.0); 15], 10);
        assert_eq!(aws.policy(aws.alarm(), 10, false), 1);
    }

    #[test]
    fn datapoints_average_the_minute_over_warm_instances() {
        let mut aws = Aws::new(1, 50, 60.0);
        let instances = [
            SimInstance {
                id: 1,
                created_s: 0,
                ready_s: 0,
                initial: true,
            },
            SimInstance {
                id: 2,
                created_s: 0,
                ready_s: 30,
                initial: false,
            },
        ];
        let tier = TierView {
            desired: 2,
            instances: &instances,
        };
        for second in 0..60 {
            // Instance 2 serves from 30 s but is warming: only instance 1 counts.
            let cpu: Vec<(u64, f64)> = if second < 30 {
                vec![(1, 90.0)]
            } else {
                vec![(1, 45.0), (2, 45.0)]
            };
            aws.observe(second, &tier, &cpu);
        }
        let point = aws
            .datapoints
            .back()
            .copied()
            .flatten()
            .expect("a datapoint");
        assert!((point.value - 67.5).abs() < 1e-9);
        assert_eq!(point.instances, 1);
        // Evaluated once a minute only.
        assert_eq!(aws.decide(59, &tier), None);
        assert_eq!(aws.decide(60, &tier), None);
    }
}

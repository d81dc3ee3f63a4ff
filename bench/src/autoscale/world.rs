//! The simulated tier every autoscaler model drives, one second at a time.
//!
//! Each second, in this order:
//! 1. the autoscaler decides from what it has observed so far (it may change `desired`);
//! 2. the tier follows `desired`: new instances start now and serve after the start-up delay;
//!    a scale-in removes starting instances first, then the most recently started ready ones
//!    (what a Kubernetes ReplicaSet and most operators do), and a removed instance stops
//!    serving at once;
//! 3. the second's demand is spread evenly over the ready instances; an instance serves at
//!    most `capacity_rps` and its CPU is its load over its capacity, saturating at 100%, so an
//!    overloaded tier shows 100% whatever the demand;
//! 4. the autoscaler observes each ready instance's CPU for that second (each model turns it
//!    into its own metric pipeline, with its own sampling and delays).
//!
//! Demand above the ready capacity is an SLO violation for that second.

use serde::Serialize;

/// An instance of the simulated tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimInstance {
    pub id: u64,
    /// The second the autoscaler's decision created it.
    pub created_s: u64,
    /// The second it starts serving: `created_s + start-up delay`.
    pub ready_s: u64,
    /// It was already serving when the run began: past any warm-up or initialization.
    pub initial: bool,
}

impl SimInstance {
    pub fn is_ready(&self, now_s: u64) -> bool {
        self.ready_s <= now_s
    }
}

/// What an autoscaler sees of the tier.
#[derive(Clone, Copy, Debug)]
pub struct TierView<'a> {
    /// The count the tier converges to.
    pub desired: u32,
    /// Every instance that exists: starting or ready.
    pub instances: &'a [SimInstance],
}

/// An autoscaler under test.
pub trait Autoscaler {
    /// Called at the start of second `now_s`; the new desired count when it changes.
    fn decide(&mut self, now_s: u64, tier: &TierView<'_>) -> Option<u32>;
    /// Called at the end of second `now_s` with each ready instance's CPU percent during it.
    fn observe(&mut self, now_s: u64, tier: &TierView<'_>, cpu: &[(u64, f64)]);
}

/// The modelled machine.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Model {
    /// Requests per second one instance serves at 100% CPU.
    pub capacity_rps: f64,
    /// From the decision to the instance serving.
    pub startup_s: u64,
    /// The tier's bounds, the same for every autoscaler.
    pub min: u32,
    pub max: u32,
    /// The CPU utilization every autoscaler aims at, percent.
    pub target_cpu: f64,
}

impl Model {
    /// The count a tier starts with: what the first second's demand needs at the target.
    pub fn initial_count(&self, demand: f64) -> u32 {
        let needed = (demand / (self.capacity_rps * self.target_cpu / 100.0)).ceil();
        (needed as u32).clamp(self.min, self.max)
    }
}

/// One second of a run, for `--csv` and `--svg`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub demand_rps: f64,
    pub desired: u32,
    pub instances: u32,
    pub ready: u32,
    pub cpu_percent: f64,
}

/// The figures of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RunReport {
    pub autoscaler: String,
    /// Seconds in which the demand exceeded the ready instances' capacity.
    pub slo_violation_seconds: u64,
    /// The sum over seconds of the instances that existed (starting ones cost too).
    pub instance_seconds: u64,
    /// Changes of the desired count.
    pub scaling_actions: u32,
    pub scale_outs: u32,
    pub scale_ins: u32,
    /// A scale-out after a scale-in or the reverse: flapping.
    pub direction_reversals: u32,
    /// The largest demand above ready capacity, in requests per second and in instances.
    pub worst_shortfall_rps: f64,
    pub worst_shortfall_instances: f64,
    /// Requests that found no capacity, summed over the run.
    pub unserved_requests: f64,
    pub peak_instances: u32,
    pub mean_instances: f64,
}

/// Runs `autoscaler` over `demand` (requests per second for each second).
pub fn run(
    name: &str,
    model: &Model,
    demand: &[f64],
    autoscaler: &mut dyn Autoscaler,
    keep_rows: bool,
) -> (RunReport, Vec<Row>) {
    let initial = model.initial_count(demand.first().copied().unwrap_or(0.0));
    let mut next_id = 0u64;
    let mut instances: Vec<SimInstance> = (0..initial)
        .map(|_| {
            next_id += 1;
            SimInstance {
                id: next_id,
                created_s: 0,
                ready_s: 0,
                initial: true,
            }
        })
        .collect();
    let mut desired = initial;
    let mut report = RunReport {
        autoscaler: name.to_string(),
        ..RunReport::default()
    };
    let mut rows = Vec::with_capacity(if keep_rows { demand.len() } else { 0 });
    let mut last_direction = 0i8;
    let mut cpu = Vec::new();
    for (second, &load) in demand.iter().enumerate() {
        let now = second as u64;
        let view = TierView {
            desired,
            instances: &instances,
        };
        if let Some(to) = autoscaler.decide(now, &view) {
            let to = to.clamp(model.min, model.max);
            if to != desired {
                let direction = if to > desired { 1 } else { -1 };
                if direction == 1 {
                    report.scale_outs += 1;
                } else {
                    report.scale_ins += 1;
                }
                if last_direction != 0 && last_direction != direction {
                    report.direction_reversals += 1;
                }
                last_direction = direction;
                report.scaling_actions += 1;
                desired = to;
            }
        }
        converge(&mut instances, desired, now, model.startup_s, &mut next_id);

        let ready = instances.iter().filter(|i| i.is_ready(now)).count() as u32;
        let ready_capacity = f64::from(ready) * model.capacity_rps;
        let per_instance = if ready > 0 {
            load / f64::from(ready)
        } else {
            0.0
        };
        let cpu_percent = (100.0 * per_instance / model.capacity_rps).min(100.0);
        let shortfall = load - ready_capacity;
        // A hair of tolerance so that floating-point noise at exactly full capacity is not a
        // violation.
        if shortfall > 1e-9 * load.max(1.0) {
            report.slo_violation_seconds += 1;
            report.unserved_requests += shortfall;
            if shortfall > report.worst_shortfall_rps {
                report.worst_shortfall_rps = shortfall;
            }
        }
        let count = instances.len() as u32;
        report.instance_seconds += u64::from(count);
        report.peak_instances = report.peak_instances.max(count);
        if keep_rows {
            rows.push(Row {
                demand_rps: load,
                desired,
                instances: count,
                ready,
                cpu_percent,
            });
        }
        cpu.clear();
        cpu.extend(
            instances
                .iter()
                .filter(|i| i.is_ready(now))
                .map(|i| (i.id, cpu_percent)),
        );
        let view = TierView {
            desired,
            instances: &instances,
        };
        autoscaler.observe(now, &view, &cpu);
    }
    report.worst_shortfall_instances = report.worst_shortfall_rps / model.capacity_rps;
    report.mean_instances = if demand.is_empty() {
        0.0
    } else {
        report.instance_seconds as f64 / demand.len() as f64
    };
    (report, rows)
}

/// Starts or removes instances until `desired` exist.
fn converge(
    instances: &mut Vec<SimInstance>,
    desired: u32,
    now_s: u64,
    startup_s: u64,
    next_id: &mut u64,
) {
    while (instances.len() as u32) < desired {
        *next_id += 1;
        instances.push(SimInstance {
            id: *next_id,
            created_s: now_s,
            ready_s: now_s + startup_s,
            initial: false,
        });
    }
    while instances.len() as u32 > desired {
        // Starting instances first, then the most recently ready.
        let victim = instances
            .iter()
            .enumerate()
            .max_by_key(|(_, i)| (!i.is_ready(now_s), i.ready_s, i.id))
            .map(|(index, _)| index);
        match victim {
            Some(index) => {
                instances.remove(index);
            }
            None => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scales to a fixed count at a fixed second.
    struct Scripted {
        at: u64,
        to: u32,
        observed: Vec<(u64, Vec<(u64, f64)>)>,
    }

    impl Autoscaler for Scripted {
        fn decide(&mut self, now_s: u64, _tier: &TierView<'_>) -> Option<u32> {
            (now_s == self.at).then_some(self.to)
        }
        fn observe(&mut self, now_s: u64, _tier: &TierView<'_>, cpu: &[(u64, f64)]) {
            self.observed.push((now_s, cpu.to_vec()));
        }
    }

    fn model() -> Model {
        Model {
            capacity_rps: 100.0,
            startup_s: 3,
            min: 1,
            max: 10,
            target_cpu: 50.0,
        }
    }

    #[test]
    fn demand_above_ready_capacity_is_a_violation_until_new_instances_serve() {
        // Starts with 2 (100 req/s at a 50% target); at 2 s the demand triples, the scripted
        // autoscaler asks for 4 at 2 s, and they serve from 5 s.
        let demand = [100.0, 100.0, 300.0, 300.0, 300.0, 300.0, 300.0];
        let mut scaler = Scripted {
            at: 2,
            to: 4,
            observed: Vec::new(),
        };
        let (report, rows) = run("scripted", &model(), &demand, &mut scaler, true);
        assert_eq!(report.slo_violation_seconds, 3);
        assert_eq!(report.worst_shortfall_rps, 100.0);
        assert_eq!(report.worst_shortfall_instances, 1.0);
        assert_eq!(report.unserved_requests, 300.0);
        assert_eq!(report.instance_seconds, 2 + 2 + 4 * 5);
        assert_eq!(report.scaling_actions, 1);
        assert_eq!(report.peak_instances, 4);
        assert_eq!(rows[2].ready, 2);
        assert_eq!(rows[5].ready, 4);
        // Overloaded instances show 100%, not 150%.
        assert_eq!(rows[2].cpu_percent, 100.0);
        assert_eq!(rows[5].cpu_percent, 75.0);
        // Only ready instances report CPU.
        assert_eq!(scaler.observed[4].1.len(), 2);
        assert_eq!(scaler.observed[5].1.len(), 4);
    }

    #[test]
    fn scale_in_removes_starting_instances_first_then_the_newest() {
        let mut instances = vec![
            SimInstance {
                id: 1,
                created_s: 0,
                ready_s: 0,
                initial: false,
            },
            SimInstance {
                id: 2,
                created_s: 5,
                ready_s: 8,
                initial: false,
            },
            SimInstance {
                id: 3,
                created_s: 9,
                ready_s: 12,
                initial: false,
            },
        ];
        let mut next = 3;
        converge(&mut instances, 2, 10, 3, &mut next);
        assert_eq!(instances.iter().map(|i| i.id).collect::<Vec<_>>(), [1, 2]);
        converge(&mut instances, 1, 10, 3, &mut next);
        assert_eq!(instances.iter().map(|i| i.id).collect::<Vec<_>>(), [1]);
        converge(&mut instances, 3, 20, 3, &mut next);
        assert_eq!(instances[2].id, 5);
        assert_eq!(instances[2].ready_s, 23);
    }

    #[test]
    fn reversals_count_flapping() {
        struct Flapper;
        impl Autoscaler for Flapper {
            fn decide(&mut self, now_s: u64, _: &TierView<'_>) -> Option<u32> {
                Some(if now_s.is_multiple_of(2) { 3 } else { 2 })
            }
            fn observe(&mut self, _: u64, _: &TierView<'_>, _: &[(u64, f64)]) {}
        }
        let (report, _) = run("flap", &model(), &[100.0; 6], &mut Flapper, false);
        // 2 → 3 at 0 s, then 2, 3, 2, 3, 2.
        assert_eq!(report.scaling_actions, 6);
        assert_eq!(report.direction_reversals, 5);
    }
}

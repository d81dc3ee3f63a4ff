//! Strata's autoscaler in the simulator: the controller's own planner
//! (`strata_controller::reconcile::autoscale::plan`) and metric windows, driven the way the
//! leader's loop drives them (see that module's documentation).
//!
//! The metric pipeline modelled: each agent heartbeats every second with its instances' CPU
//! over the last second, which the leader records into its windows; the planner evaluates
//! every second. Instances are `strata_api::Instance` values whose phase and `ready_at_ms`
//! follow the simulated ones, so `Serving::from_instances` classifies them exactly as the
//! controller does (warm-up included).

use std::collections::HashSet;

use anyhow::Context as _;
use strata_api::{Health, Instance, Phase, Provider, Scaling, ScalingDecision, TierSpec};
use strata_controller::reconcile::autoscale::windows::{
    observed_startup_ms, Serving, WindowConfig, Windows,
};
use strata_controller::reconcile::autoscale::{plan, Input, Memory};
use uuid::Uuid;

use super::world::{Autoscaler, TierView};

const TIER: &str = "sim";
const HEARTBEAT_S: u64 = 1;

/// The scaling block a user gets by writing only bounds, `metric` and `target`: every other
/// field comes from the API's serde defaults, as in a tier file.
pub fn default_scaling(min: u32, max: u32, target_cpu: f64) -> Scaling {
    let document = serde_json::json!({
        "min": min,
        "max": max,
        "policies": [{"metric": "cpu_utilization", "target": target_cpu}],
    });
    serde_json::from_value(document).expect("a valid scaling block")
}

/// A scaling block given on the command line, with the model's bounds where it has none,
/// validated as the API validates a tier (errors name the field path).
pub fn custom_scaling(text: &str, min: u32, max: u32) -> anyhow::Result<Scaling> {
    let mut document: serde_json::Value =
        serde_json::from_str(text).context("--strata-scaling is not JSON")?;
    let object = document
        .as_object_mut()
        .context("--strata-scaling must be a JSON object")?;
    object.entry("min").or_insert(min.into());
    object.entry("max").or_insert(max.into());
    let tier = serde_json::json!({
        "name": TIER,
        "template": {"driver": "process", "command": ["strata-workload"]},
        "scaling": document,
    });
    let spec: TierSpec = strata_api::decode::decode_value(tier)
        .map_err(|problem| anyhow::anyhow!("--strata-scaling: {}", problem.detail))?;
    if let Err(errors) = strata_api::validate::tier_spec(&spec) {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect();
        anyhow::bail!("--strata-scaling: {}", lines.join("; "));
    }
    Ok(spec.scaling)
}

pub struct Strata {
    scaling: Scaling,
    windows: Windows,
    memory: Memory,
    last_scaling: Option<ScalingDecision>,
    /// The controller's view of the simulated instances, kept in step with them.
    instances: Vec<Instance>,
}

impl Strata {
    pub fn new(scaling: Scaling) -> Strata {
        Strata {
            scaling,
            windows: Windows::new(WindowConfig::default()),
            memory: Memory::new(0),
            last_scaling: None,
            instances: Vec::new(),
        }
    }

    fn sync_instances(&mut self, now_s: u64, tier: &TierView<'_>) {
        let same = self.instances.len() == tier.instances.len()
            && self
                .instances
                .iter()
                .zip(tier.instances)
                .all(|(a, b)| a.id == uuid(b.id));
        if !same {
            let alive: HashSet<Uuid> = tier.instances.iter().map(|i| uuid(i.id)).collect();
            self.windows.retain_instances(TIER, &alive);
            self.instances = tier
                .instances
                .iter()
                .map(|sim| Instance {
                    id: uuid(sim.id),
                    tier: TIER.to_string(),
                    provider: Provider::Local,
                    node: Some("sim".to_string()),
                    provider_id: None,
                    address: None,
                    port: None,
                    subnet: None,
                    phase: Phase::Starting,
                    health: Health::Unknown,
                    generation: 1,
                    reason: None,
                    created_at_ms: sim.created_s * 1000,
                    updated_at_ms: sim.created_s * 1000,
                    ready_at_ms: 0,
                    drain_started_ms: 0,
                    resource_version: 0,
                })
                .collect();
        }
        for (instance, sim) in self.instances.iter_mut().zip(tier.instances) {
            if sim.is_ready(now_s) && instance.phase != Phase::Running {
                instance.phase = Phase::Running;
                instance.health = Health::Healthy;
                instance.ready_at_ms = sim.ready_s * 1000;
            }
        }
    }
}

impl Autoscaler for Strata {
    fn decide(&mut self, now_s: u64, tier: &TierView<'_>) -> Option<u32> {
        let now_ms = now_s * 1000;
        self.sync_instances(now_s, tier);
        let serving = Serving::from_instances(&self.instances, &self.scaling, now_ms);
        let metrics = self
            .windows
            .policy_values(TIER, &self.scaling.policies, &serving, now_ms);
        let outcome = plan(
            &Input {
                scaling: &self.scaling,
                desired: tier.desired,
                last_scaling: self.last_scaling.as_ref(),
                metrics: &metrics,
                ready: serving.ready(),
                warming: serving.warming(),
                observed_startup_ms: observed_startup_ms(&self.instances),
                now_ms,
            },
            &mut self.memory,
        );
        if let Some(decision) = outcome.decision() {
            self.last_scaling = Some(decision);
        }
        self.windows.prune(now_ms);
        outcome.desired
    }

    fn observe(&mut self, now_s: u64, _tier: &TierView<'_>, cpu: &[(u64, f64)]) {
        // The heartbeat at the end of the second carries the CPU over it.
        let at_ms = (now_s + HEARTBEAT_S) * 1000;
        for &(id, percent) in cpu {
            self.windows.record_cpu(TIER, uuid(id), at_ms, percent);
        }
    }
}

fn uuid(id: u64) -> Uuid {
    Uuid::from_u128(u128::from(id))
}

#[cfg(test)]
mod tests {
    use super::super::world::{run, Model};
    use super::*;

    #[test]
    fn the_default_block_is_what_a_file_with_metric_and_target_gives() {
        let scaling = default_scaling(2, 80, 60.0);
        let tier: strata_api::TierSpec = serde_json::from_value(serde_json::json!({
            "name": "sim",
            "template": {"driver": "process", "command": ["strata-workload"]},
            "scaling": scaling,
        }))
        .expect("a tier");
        assert_eq!(strata_api::validate::tier_spec(&tier), Ok(()));
        assert_eq!(scaling.policies.len(), 1);
        assert_eq!(scaling.policies[0].target, Some(60.0));
        assert_eq!(scaling.policies[0].tolerance, None);
        assert_eq!(scaling, {
            let mut expected = Scaling::with_bounds(2, 80);
            expected.policies = vec![strata_api::ScalingPolicy::target_tracking(
                strata_api::ScalingMetric::CpuUtilization,
                60.0,
            )];
            expected
        });
    }

    #[test]
    fn the_planner_follows_a_step_and_comes_back_after_its_window() {
        let model = Model {
            capacity_rps: 100.0,
            startup_s: 10,
            min: 2,
            max: 40,
            target_cpu: 60.0,
        };
        // 4 instances' worth for 2 minutes, then 12, then 4 again for 10 minutes.
        let mut demand = vec![240.0; 120];
        demand.extend(vec![720.0; 300]);
        demand.extend(vec![240.0; 600]);
        let mut strata = Strata::new(default_scaling(model.min, model.max, 60.0));
        let (report, rows) = run("strata", &model, &demand, &mut strata, true);
        // 720 req/s at 60% needs 12 instances; the tier gets there and serves it.
        assert!(rows[419].ready >= 12, "{:?}", rows[419]);
        // Without overshooting: averages start when the newest instance joined.
        assert_eq!(report.peak_instances, 12, "{report:?}");
        // Back to 4 after the stabilization window (and not before): unset, it adapts to the
        // observed 10 s start-ups, 3 of them raised to the 60 s floor.
        assert!(rows[420 + 55].desired >= 12, "{:?}", rows[475]);
        let back = rows[420..]
            .iter()
            .position(|r| r.desired == 4)
            .expect("back to 4");
        assert!(
            (60..=75).contains(&back),
            "back to 4 {back} s after the load dropped"
        );
        assert_eq!(rows.last().map(|r| r.desired), Some(4));
        assert!(report.slo_violation_seconds > 0 && report.slo_violation_seconds < 60);
        // One way up, one way down: no flapping.
        assert_eq!(report.direction_reversals, 1, "{report:?}");
    }
}

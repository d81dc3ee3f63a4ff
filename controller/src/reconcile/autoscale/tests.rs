//! The autoscaler's rules one by one with a fake clock, then properties over random runs.

use chrono::TimeZone;
use proptest::prelude::*;
use strata_api::{
    AdjustmentType, Duration, PolicyType, Scaling, ScalingBound, ScalingDecision, ScalingMetric,
    ScalingPolicy, ScalingSchedule, StepAdjustment,
};

use super::*;

const CPU: ScalingMetric = ScalingMetric::CpuUtilization;
const RPS: ScalingMetric = ScalingMetric::RequestsPerSecond;

fn scaling(policies: Vec<ScalingPolicy>) -> Scaling {
    Scaling {
        policies,
        max_step: 100,
        max_step_percent: None,
        scale_in_stabilization: Some(Duration::from_secs(0)),
        ..Scaling::with_bounds(1, 20)
    }
}

fn value(value: f64, instances: u32) -> Option<MetricValue> {
    Some(MetricValue {
        value,
        instances,
        covered_ms: 3_600_000,
    })
}

/// Evaluates once with `desired` current, all of them ready.
fn once(scaling: &Scaling, desired: u32, metrics: &[Option<MetricValue>], now_ms: u64) -> Outcome {
    let mut memory = Memory::new(0);
    plan(
        &Input {
            scaling,
            desired,
            last_scaling: None,
            metrics,
            ready: desired,
            warming: 0,
            observed_startup_ms: None,
            now_ms,
        },
        &mut memory,
    )
}

const LATER: u64 = 10_000_000;

#[test]
fn target_tracking_is_proportional() {
    let s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    let outcome = once(&s, 4, &[value(90.0, 4)], LATER);
    assert_eq!(outcome.desired, Some(6));
    assert_eq!(outcome.inputs.policies[0].recommendation, Some(6));
    assert_eq!(outcome.inputs.policies[0].value, Some(90.0));
    assert_eq!(outcome.inputs.policies[0].target, Some(60.0));
    assert!(
        outcome.inputs.reason.starts_with("scale out from 4 to 6"),
        "{}",
        outcome.inputs.reason
    );
    // And down: 4 at 30% need 2.
    assert_eq!(once(&s, 4, &[value(30.0, 4)], LATER).desired, Some(2));
}

#[test]
fn within_tolerance_nothing_changes() {
    let mut policy = ScalingPolicy::target_tracking(CPU, 60.0);
    policy.tolerance = Some(0.1);
    let s = scaling(vec![policy]);
    for cpu in [54.0, 60.0, 65.9] {
        let outcome = once(&s, 10, &[value(cpu, 10)], LATER);
        assert_eq!(outcome.desired, None, "{cpu}: {}", outcome.inputs.reason);
    }
    assert_eq!(once(&s, 10, &[value(66.1, 10)], LATER).desired, Some(12));
}

#[test]
fn a_per_policy_tolerance_reaches_what_hpa_cannot() {
    // kubernetes#116984: 40 tasks on 10 replicas with a target of 3.8 each never reach 11
    // under a 10% tolerance; with 1% they do.
    let mut policy = ScalingPolicy::target_tracking(ScalingMetric::Custom, 3.8);
    policy.name = Some("tasks".to_string());
    policy.tolerance = Some(0.01);
    let s = scaling(vec![policy]);
    assert_eq!(once(&s, 10, &[value(4.0, 10)], LATER).desired, Some(11));
}

#[test]
fn the_largest_recommendation_wins() {
    let s = scaling(vec![
        ScalingPolicy::target_tracking(CPU, 60.0),
        ScalingPolicy::target_tracking(RPS, 50.0),
    ]);
    let outcome = once(&s, 4, &[value(90.0, 4), value(100.0, 4)], LATER);
    assert_eq!(outcome.desired, Some(8));
    let recommendations: Vec<_> = outcome
        .inputs
        .policies
        .iter()
        .map(|p| p.recommendation)
        .collect();
    assert_eq!(recommendations, [Some(6), Some(8)]);
}

#[test]
fn scale_in_needs_every_policy() {
    let s = scaling(vec![
        ScalingPolicy::target_tracking(CPU, 60.0),
        ScalingPolicy::target_tracking(RPS, 50.0),
    ]);
    // CPU says 2, requests say keep 4.
    assert_eq!(
        once(&s, 4, &[value(30.0, 4), value(50.0, 4)], LATER).desired,
        None
    );
    // Both low: the larger of the two, 3.
    assert_eq!(
        once(&s, 4, &[value(30.0, 4), value(35.0, 4)], LATER).desired,
        Some(3)
    );
}

#[test]
fn missing_or_short_data_never_scales_in() {
    let s = scaling(vec![
        ScalingPolicy::target_tracking(CPU, 60.0),
        ScalingPolicy::target_tracking(RPS, 50.0),
    ]);
    let outcome = once(&s, 4, &[value(10.0, 4), None], LATER);
    assert_eq!(outcome.desired, None);
    assert!(outcome
        .inputs
        .bounded_by
        .iter()
        .any(|b| matches!(b, ScalingBound::ScaleInHeld { .. })));
    // Less than any reaction time validation accepts (at least 1 s).
    let short = Some(MetricValue {
        value: 10.0,
        instances: 4,
        covered_ms: 500,
    });
    let outcome = once(&s, 4, &[value(10.0, 4), short], LATER);
    assert_eq!(outcome.desired, None);
    assert_eq!(outcome.inputs.policies[1].recommendation, None);
    // But a policy with data may still scale out.
    assert_eq!(once(&s, 4, &[value(90.0, 4), None], LATER).desired, Some(6));
}

#[test]
fn starting_instances_neither_double_a_scale_out_nor_allow_a_scale_in() {
    let s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    let mut memory = Memory::new(0);
    // 4 ready at 90% already asked for 6; two are starting. The same load asks for 6 again.
    let input = Input {
        scaling: &s,
        desired: 6,
        last_scaling: None,
        metrics: &[value(90.0, 4)],
        ready: 4,
        warming: 2,
        observed_startup_ms: None,
        now_ms: LATER,
    };
    assert_eq!(plan(&input, &mut memory).desired, None);
    // Load dropped while they start: no scale-in until they are ready.
    let input = Input {
        metrics: &[value(20.0, 4)],
        ..input
    };
    assert_eq!(plan(&input, &mut memory).desired, None);
}

#[test]
fn a_new_leaders_empty_windows_and_silent_agents_never_scale_in() {
    use super::windows::{Serving, WindowConfig, Windows};
    use uuid::Uuid;
    // 4 instances idle at 10%; stabilization off so that only the data rules can hold the
    // count. The leader took over at 1,000 s with empty windows.
    let mut policy = ScalingPolicy::target_tracking(CPU, 60.0);
    policy.reaction_time = Some(Duration::from_secs(10));
    let s = scaling(vec![policy]);
    let start = 1_000_000;
    let ids: Vec<Uuid> = (1..=4).map(Uuid::from_u128).collect();
    let serving = Serving::new(ids.iter().map(|&id| (id, 0)).collect(), 4, 0);
    let mut windows = Windows::new(WindowConfig::default());
    let mut memory = Memory::new(start);
    let evaluate = |windows: &Windows, memory: &mut Memory, now_ms: u64| {
        let metrics = windows.policy_values("web", &s.policies, &serving, now_ms);
        plan(
            &Input {
                scaling: &s,
                desired: 4,
                last_scaling: None,
                metrics: &metrics,
                ready: 4,
                warming: 0,
                observed_startup_ms: None,
                now_ms,
            },
            memory,
        )
    };
    // No data at all, then less than the 10 s reaction time of it.
    assert_eq!(evaluate(&windows, &mut memory, start).desired, None);
    for second in 1..10 {
        let now = start + second * 1000;
        for &id in &ids {
            windows.record_cpu("web", id, now, 10.0);
        }
        let outcome = evaluate(&windows, &mut memory, now);
        assert_eq!(
            outcome.desired, None,
            "{second} s: {}",
            outcome.inputs.reason
        );
        assert!(outcome.inputs.policies[0].note.contains("abstains"));
    }
    // The agents go silent: the last samples age out of the reaction time and the low values
    // they showed do not count.
    for second in 25..40 {
        let outcome = evaluate(&windows, &mut memory, start + second * 1000);
        assert_eq!(
            outcome.desired, None,
            "{second} s: {}",
            outcome.inputs.reason
        );
    }
    // With a whole reaction time of fresh data, the same values do scale in.
    for second in 40..=51 {
        for &id in &ids {
            windows.record_cpu("web", id, start + second * 1000, 10.0);
        }
    }
    assert_eq!(
        evaluate(&windows, &mut memory, start + 51_000).desired,
        Some(1)
    );
}

#[test]
fn scale_in_is_stabilized_over_the_window() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.scale_in_stabilization = Some(Duration::from_secs(60));
    let mut memory = Memory::new(0);
    let mut desired = 8;
    let mut step = |now_s: u64, cpu: f64, desired: &mut u32| {
        let outcome = plan(
            &Input {
                scaling: &s,
                desired: *desired,
                last_scaling: None,
                metrics: &[value(cpu, *desired)],
                ready: *desired,
                warming: 0,
                observed_startup_ms: None,
                now_ms: now_s * 1000,
            },
            &mut memory,
        );
        if let Some(to) = outcome.desired {
            *desired = to;
        }
        outcome
    };
    // The first minute: this leader has not watched a whole window, so no scale-in.
    assert_eq!(step(30, 15.0, &mut desired).desired, None);
    // 60 s: 8 at 60% asked to keep 8 at 59 s, so 8 holds.
    assert_eq!(step(59, 60.0, &mut desired).desired, None);
    // 100 s: the 8 of 59 s is still in the window.
    assert_eq!(step(100, 15.0, &mut desired).desired, None);
    let outcome = step(120, 15.0, &mut desired);
    assert_eq!(outcome.desired, Some(2), "{}", outcome.inputs.reason);
    // Up again at once: stabilization only holds scale-in.
    assert_eq!(step(121, 120.0, &mut desired).desired, Some(4));
    // Down again: the window remembers the 4 at 121 s.
    let outcome = step(122, 15.0, &mut desired);
    assert_eq!(outcome.desired, None, "{}", outcome.inputs.reason);
    assert!(outcome
        .inputs
        .bounded_by
        .contains(&ScalingBound::Stabilization {
            window_ms: 60_000,
            highest: 4
        }));
    assert_eq!(step(182, 15.0, &mut desired).desired, Some(1));
}

#[test]
fn a_new_leader_waits_a_whole_window_before_scaling_in() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.scale_in_stabilization = Some(Duration::from_secs(300));
    let mut memory = Memory::new(1_000_000);
    let metrics = [value(10.0, 8)];
    let at = |now_ms| Input {
        scaling: &s,
        desired: 8,
        last_scaling: None,
        metrics: &metrics,
        ready: 8,
        warming: 0,
        observed_startup_ms: None,
        now_ms,
    };
    assert_eq!(plan(&at(1_000_000 + 299_000), &mut memory).desired, None);
    assert_eq!(plan(&at(1_000_000 + 300_000), &mut memory).desired, Some(2));
}

/// The window a leader that has watched an idle 8-instance tier since 0 needs before it scales
/// in, found by evaluating every second: the planner's own answer, not the helper's.
fn first_scale_in_s(s: &Scaling, observed_startup_ms: Option<u64>) -> (u64, ScalingInputs) {
    let mut memory = Memory::new(0);
    let metrics = [value(10.0, 8)];
    for second in 0..=400 {
        let outcome = plan(
            &Input {
                scaling: s,
                desired: 8,
                last_scaling: None,
                metrics: &metrics,
                ready: 8,
                warming: 0,
                observed_startup_ms,
                now_ms: second * 1000,
            },
            &mut memory,
        );
        if outcome.desired.is_some() {
            return (second, outcome.inputs);
        }
    }
    panic!("no scale-in within 400 s");
}

#[test]
fn an_explicit_window_wins_over_the_observed_start_up() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.scale_in_stabilization = Some(Duration::from_secs(200));
    let (second, inputs) = first_scale_in_s(&s, Some(10_000));
    assert_eq!(second, 200);
    assert_eq!(inputs.stabilization_ms, 200_000);
    assert!(!inputs.stabilization_adaptive);
    assert_eq!(inputs.observed_startup_ms, Some(10_000));
    // An explicit 0 is honoured too: it is a value, not "unset".
    s.scale_in_stabilization = Some(Duration::from_secs(0));
    assert_eq!(first_scale_in_s(&s, Some(120_000)).0, 0);
}

#[test]
fn an_unset_window_is_300_s_until_a_start_up_is_observed() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.scale_in_stabilization = None;
    let (second, inputs) = first_scale_in_s(&s, None);
    assert_eq!(second, 300);
    assert_eq!(inputs.stabilization_ms, 300_000);
    assert!(inputs.stabilization_adaptive);
    assert_eq!(inputs.observed_startup_ms, None);
}

#[test]
fn an_unset_window_is_a_few_start_ups_within_its_bounds() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.scale_in_stabilization = None;
    let k = strata_api::ADAPTIVE_STABILIZATION_STARTUPS;
    // Fast start-ups shorten the window to k of them.
    let (second, inputs) = first_scale_in_s(&s, Some(30_000));
    assert_eq!(second, 30 * k);
    assert_eq!(inputs.stabilization_ms, 30_000 * k);
    assert!(inputs.stabilization_adaptive);
    // Never below 60 s, however fast instances start...
    assert_eq!(first_scale_in_s(&s, Some(1_000)).0, 60);
    assert_eq!(first_scale_in_s(&s, Some(0)).0, 60);
    // ...and never above 300 s, however slow.
    assert_eq!(first_scale_in_s(&s, Some(600_000)).0, 300);
    assert_eq!(first_scale_in_s(&s, Some(u64::MAX)).0, 300);
}

#[test]
fn the_observed_start_up_is_the_median_of_the_recent_ready_instances() {
    use super::windows::{observed_startup_ms, STARTUP_SAMPLES};
    let instance = |created_s: u64, startup_s: Option<u64>| strata_api::Instance {
        id: uuid::Uuid::from_u128(u128::from(created_s) + 1),
        tier: "web".to_string(),
        provider: strata_api::Provider::Local,
        node: None,
        provider_id: None,
        subnet: None,
        address: None,
        port: None,
        phase: strata_api::Phase::Running,
        health: strata_api::Health::Healthy,
        generation: 1,
        reason: None,
        created_at_ms: created_s * 1000,
        updated_at_ms: created_s * 1000,
        ready_at_ms: startup_s.map_or(0, |s| (created_s + s) * 1000),
        drain_started_ms: 0,
        resource_version: 0,
    };
    assert_eq!(observed_startup_ms(&[] as &[strata_api::Instance]), None);
    // Not yet ready: no data.
    assert_eq!(observed_startup_ms(&[instance(5, None)]), None);
    // One instance restarted long after creation does not move the median.
    let tier = [
        instance(1, Some(30)),
        instance(2, Some(40)),
        instance(3, Some(5_000)),
        instance(4, None),
    ];
    assert_eq!(observed_startup_ms(&tier), Some(40_000));
    // Only the most recently created instances count: an old image's slow boots age out.
    let mut tier: Vec<_> = (0..STARTUP_SAMPLES as u64)
        .map(|i| instance(1_000 + i, Some(20)))
        .collect();
    tier.extend((0..STARTUP_SAMPLES as u64).map(|i| instance(i, Some(200))));
    assert_eq!(observed_startup_ms(&tier), Some(20_000));
}

#[test]
fn scale_out_waits_for_the_cooldown() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.cooldown = Duration::from_secs(30);
    let last = ScalingDecision {
        at_ms: LATER - 10_000,
        from: 2,
        to: 4,
        reason: String::new(),
        inputs: None,
    };
    let mut memory = Memory::new(0);
    let input = Input {
        scaling: &s,
        desired: 4,
        last_scaling: Some(&last),
        metrics: &[value(90.0, 4)],
        ready: 4,
        warming: 0,
        observed_startup_ms: None,
        now_ms: LATER,
    };
    let outcome = plan(&input, &mut memory);
    assert_eq!(outcome.desired, None);
    assert_eq!(
        outcome.inputs.bounded_by,
        [ScalingBound::Cooldown {
            remaining_ms: 20_000
        }]
    );
    let later = Input {
        now_ms: LATER + 20_000,
        ..input
    };
    assert_eq!(plan(&later, &mut memory).desired, Some(6));
}

#[test]
fn a_period_changes_at_most_the_larger_of_its_limits() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.max_step = 4;
    s.max_step_percent = Some(100);
    s.step_period = Duration::from_secs(15);
    s.max = 1000;
    // From 2: max(4, 100% of 2) = 4 more.
    assert_eq!(once(&s, 2, &[value(600.0, 2)], LATER).desired, Some(6));
    // From 10: max(4, 10) = 10 more.
    assert_eq!(once(&s, 10, &[value(600.0, 10)], LATER).desired, Some(20));
    // Within one period the limit counts from the period's start.
    let mut memory = Memory::new(0);
    let mut input = Input {
        scaling: &s,
        desired: 2,
        last_scaling: None,
        metrics: &[value(600.0, 2)],
        ready: 2,
        warming: 0,
        observed_startup_ms: None,
        now_ms: LATER,
    };
    assert_eq!(plan(&input, &mut memory).desired, Some(6));
    input.desired = 6;
    input.warming = 4;
    let higher = [value(1200.0, 2)];
    input.metrics = &higher;
    input.now_ms = LATER + 5_000;
    let outcome = plan(&input, &mut memory);
    assert_eq!(outcome.desired, None, "{}", outcome.inputs.reason);
    input.now_ms = LATER + 15_000;
    assert_eq!(plan(&input, &mut memory).desired, Some(12));
    // Scale-in too: without the percent, 4 fewer per period.
    s.max_step_percent = None;
    assert_eq!(once(&s, 20, &[value(1.0, 20)], LATER).desired, Some(16));
}

#[test]
fn bounds_always_hold_and_win_over_every_window() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.min = 3;
    s.max = 5;
    assert_eq!(once(&s, 4, &[value(600.0, 4)], LATER).desired, Some(5));
    assert_eq!(once(&s, 4, &[value(1.0, 4)], LATER).desired, Some(3));
    // A count left outside new bounds comes back even without data.
    assert_eq!(once(&s, 9, &[None], LATER).desired, Some(5));
    assert_eq!(once(&s, 1, &[None], LATER).desired, Some(3));
}

#[test]
fn a_hand_set_count_pauses_the_autoscaler() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.desired = Some(3);
    let outcome = once(&s, 3, &[value(100.0, 3)], LATER);
    assert_eq!(outcome.desired, None);
    assert!(outcome.inputs.reason.starts_with("paused"));
}

fn step_policy(
    adjustment: AdjustmentType,
    steps: &[(Option<f64>, Option<f64>, i32)],
) -> ScalingPolicy {
    ScalingPolicy {
        policy_type: PolicyType::Step,
        target: None,
        adjustment_type: Some(adjustment),
        steps: steps
            .iter()
            .map(|&(lower, upper, change)| StepAdjustment {
                lower,
                upper,
                change,
            })
            .collect(),
        ..ScalingPolicy::target_tracking(CPU, 1.0)
    }
}

#[test]
fn step_policies_adjust_the_ready_count() {
    let change = step_policy(
        AdjustmentType::ChangeInCapacity,
        &[
            (None, Some(20.0), -1),
            (Some(70.0), Some(90.0), 1),
            (Some(90.0), None, 3),
        ],
    );
    let s = scaling(vec![change]);
    assert_eq!(once(&s, 4, &[value(75.0, 4)], LATER).desired, Some(5));
    assert_eq!(once(&s, 4, &[value(95.0, 4)], LATER).desired, Some(7));
    assert_eq!(once(&s, 4, &[value(10.0, 4)], LATER).desired, Some(3));
    // No step matches: the policy abstains without blocking anything.
    let outcome = once(&s, 4, &[value(50.0, 4)], LATER);
    assert_eq!(outcome.desired, None);
    assert_eq!(outcome.inputs.policies[0].recommendation, None);

    let exact = scaling(vec![step_policy(
        AdjustmentType::ExactCapacity,
        &[(Some(90.0), None, 10)],
    )]);
    assert_eq!(once(&exact, 4, &[value(95.0, 4)], LATER).desired, Some(10));

    let mut percent = step_policy(
        AdjustmentType::PercentChangeInCapacity,
        &[(Some(80.0), None, 50), (None, Some(10.0), -10)],
    );
    assert_eq!(
        once(
            &scaling(vec![percent.clone()]),
            10,
            &[value(85.0, 10)],
            LATER
        )
        .desired,
        Some(15)
    );
    // 10% of 4 is 0.4: still one instance.
    assert_eq!(
        once(&scaling(vec![percent.clone()]), 4, &[value(5.0, 4)], LATER).desired,
        Some(3)
    );
    percent.min_adjustment_magnitude = Some(4);
    assert_eq!(
        once(&scaling(vec![percent]), 4, &[value(85.0, 4)], LATER).desired,
        Some(8)
    );
}

fn paris_ms(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
    let time = chrono_tz::Tz::Europe__Paris
        .with_ymd_and_hms(y, mo, d, h, mi, 0)
        .single()
        .expect("unambiguous");
    u64::try_from(time.timestamp_millis()).expect("after 1970")
}

#[test]
fn a_schedule_raises_min_at_its_local_time_across_a_dst_change() {
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.schedules = vec![ScalingSchedule {
        cron: "0 8 * * *".to_string(),
        time_zone: "Europe/Paris".to_string(),
        duration: Duration::from_secs(10 * 3600),
        min: Some(6),
        max: None,
    }];
    // Paris moves to summer time on Sunday 2025-03-30 at 02:00: 08:00 is 07:00 UTC on the
    // 29th and 06:00 UTC on the 30th. On each day the minimum rises at 08:00 local, not an
    // hour early or late.
    for day in [29, 30, 31] {
        let before = paris_ms(2025, 3, day, 7, 59);
        let at = paris_ms(2025, 3, day, 8, 0);
        let outcome = once(&s, 2, &[value(60.0, 2)], before);
        assert_eq!(
            outcome.desired, None,
            "day {day}: {}",
            outcome.inputs.reason
        );
        let outcome = once(&s, 2, &[value(60.0, 2)], at);
        assert_eq!(outcome.desired, Some(6), "day {day}");
        assert_eq!(outcome.inputs.schedule, Some(0));
        assert_eq!(outcome.inputs.min, 6);
        // And it ends ten hours later.
        let end = paris_ms(2025, 3, day, 18, 0);
        assert_eq!(effective_bounds(&s, end), (1, 20, None));
        assert_eq!(effective_bounds(&s, end - 1), (6, 20, Some(0)));
    }
    // The hour before 08:00 local in winter would be 08:00 local under the summer offset.
    assert_eq!(
        paris_ms(2025, 3, 30, 8, 0) + 3_600_000,
        paris_ms(2025, 3, 30, 9, 0)
    );
    assert_eq!(
        effective_bounds(&s, paris_ms(2025, 3, 30, 8, 0) - 3_600_000).0,
        1
    );
}

fn zone_ms(zone: chrono_tz::Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
    let time = zone
        .with_ymd_and_hms(y, mo, d, h, mi, 0)
        .single()
        .expect("unambiguous");
    u64::try_from(time.timestamp_millis()).expect("after 1970")
}

#[test]
fn a_weekday_schedule_keeps_its_local_time_when_the_clocks_go_back() {
    // New York leaves daylight time on Sunday 2025-11-02 at 02:00: 08:00 local is 12:00 UTC
    // on Friday 31 October and 13:00 UTC on Monday 3 November.
    let new_york = chrono_tz::Tz::America__New_York;
    let mut s = scaling(vec![ScalingPolicy::target_tracking(CPU, 60.0)]);
    s.schedules = vec![ScalingSchedule {
        cron: "0 8 * * MON-FRI".to_string(),
        time_zone: "America/New_York".to_string(),
        duration: Duration::from_secs(9 * 3600),
        min: Some(8),
        max: None,
    }];
    let utc = chrono_tz::Tz::UTC;
    assert_eq!(
        zone_ms(new_york, 2025, 10, 31, 8, 0),
        zone_ms(utc, 2025, 10, 31, 12, 0)
    );
    assert_eq!(
        zone_ms(new_york, 2025, 11, 3, 8, 0),
        zone_ms(utc, 2025, 11, 3, 13, 0)
    );
    for (day, fires) in [(31, true), (1, false), (2, false), (3, true), (4, true)] {
        let month = if day == 31 { 10 } else { 11 };
        let eight = zone_ms(new_york, 2025, month, day, 8, 0);
        let before = once(&s, 2, &[value(60.0, 2)], eight - 60_000);
        assert_eq!(
            before.desired, None,
            "{month}-{day}: {}",
            before.inputs.reason
        );
        let at = once(&s, 2, &[value(60.0, 2)], eight);
        if fires {
            assert_eq!(at.desired, Some(8), "{month}-{day}");
            assert_eq!((at.inputs.min, at.inputs.schedule), (8, Some(0)));
            // 17:00 local ends it, also on the Monday after the change.
            let five = zone_ms(new_york, 2025, month, day, 17, 0);
            assert_eq!(effective_bounds(&s, five - 1).0, 8, "{month}-{day}");
            assert_eq!(effective_bounds(&s, five).0, 1, "{month}-{day}");
        } else {
            assert_eq!(at.desired, None, "{month}-{day}: weekend");
        }
    }
    // An hour off in either direction would have fired at 07:00 or 09:00 local.
    let monday_seven = zone_ms(new_york, 2025, 11, 3, 7, 0);
    assert_eq!(effective_bounds(&s, monday_seven + 59 * 60_000).0, 1);
}

#[test]
fn a_schedule_inside_the_spring_gap_skips_that_day_only() {
    // 02:30 does not exist in New York on 2025-03-09 (02:00 jumps to 03:00).
    let new_york = chrono_tz::Tz::America__New_York;
    let mut s = scaling(Vec::new());
    s.schedules = vec![ScalingSchedule {
        cron: "30 2 * * *".to_string(),
        time_zone: "America/New_York".to_string(),
        duration: Duration::from_secs(3600),
        min: Some(5),
        max: None,
    }];
    let before_gap = zone_ms(new_york, 2025, 3, 9, 1, 59);
    let after_gap = zone_ms(new_york, 2025, 3, 9, 3, 1);
    assert_eq!(after_gap - before_gap, 2 * 60_000, "the clock jumped");
    for at in [before_gap, after_gap, zone_ms(new_york, 2025, 3, 9, 3, 45)] {
        assert_eq!(effective_bounds(&s, at), (1, 20, None), "{at}");
    }
    for day in [8, 10] {
        let at = zone_ms(new_york, 2025, 3, day, 2, 30);
        assert_eq!(once(&s, 1, &[], at).desired, Some(5), "day {day}");
        assert_eq!(effective_bounds(&s, at - 1).0, 1, "day {day}");
    }
}

#[test]
fn the_latest_schedule_wins_and_max_follows_min() {
    let mut s = scaling(Vec::new());
    s.max = 8;
    let every_day = |hour: u32, min: Option<u32>, max: Option<u32>| ScalingSchedule {
        cron: format!("0 {hour} * * *"),
        time_zone: "UTC".to_string(),
        duration: Duration::from_secs(6 * 3600),
        min,
        max,
    };
    s.schedules = vec![every_day(10, Some(4), None), every_day(8, None, Some(2))];
    let day = 86_400_000 * 20_000;
    assert_eq!(effective_bounds(&s, day + 9 * 3_600_000), (1, 2, Some(1)));
    assert_eq!(effective_bounds(&s, day + 11 * 3_600_000), (4, 8, Some(0)));
    // Without policies the schedule still moves the count.
    assert_eq!(once(&s, 1, &[], day + 11 * 3_600_000).desired, Some(4));
}

/// A small closed loop: `desired` follows decisions, instances become ready a few seconds
/// later, and the metric is the load over the ready instances.
struct Run {
    desired: u32,
    ready: u32,
    starting: Vec<u64>,
    memory: Memory,
    decisions: Vec<(u64, u32, u32)>,
    recommendations: Vec<(u64, Option<u32>)>,
}

impl Run {
    fn new() -> Run {
        Run {
            desired: 2,
            ready: 2,
            starting: Vec::new(),
            memory: Memory::new(0),
            decisions: Vec::new(),
            recommendations: Vec::new(),
        }
    }

    fn tick(&mut self, s: &Scaling, now_ms: u64, metric: Option<MetricValue>) -> Outcome {
        // Instances whose start delay has passed are ready.
        let ready_now = self.starting.iter().filter(|&&at| at <= now_ms).count() as u32;
        self.starting.retain(|&at| at > now_ms);
        self.ready += ready_now;
        let metrics = vec![metric; s.policies.len()];
        let outcome = plan(
            &Input {
                scaling: s,
                desired: self.desired,
                last_scaling: None,
                metrics: &metrics,
                ready: self.ready,
                warming: self.starting.len() as u32,
                observed_startup_ms: None,
                now_ms,
            },
            &mut self.memory,
        );
        self.recommendations
            .push((now_ms, outcome.inputs.recommendation));
        if let Some(to) = outcome.desired {
            self.decisions.push((now_ms, self.desired, to));
            if to > self.desired {
                for _ in self.desired..to {
                    self.starting.push(now_ms + 5_000);
                }
            } else {
                let mut remove = self.desired - to;
                while remove > 0 && !self.starting.is_empty() {
                    self.starting.pop();
                    remove -= 1;
                }
                self.ready -= remove;
            }
            self.desired = to;
        }
        outcome
    }
}

fn arbitrary_scaling() -> impl Strategy<Value = Scaling> {
    (
        1u32..5,
        0u32..20,
        0u64..60,
        0u64..120,
        1u32..6,
        proptest::option::of(1u32..200),
        1u64..30,
        0.0f64..0.3,
    )
        .prop_map(
            |(min, extra, cooldown, window, max_step, percent, period, tolerance)| {
                let mut policy = ScalingPolicy::target_tracking(CPU, 60.0);
                policy.tolerance = Some(tolerance);
                policy.reaction_time = Some(Duration::from_secs(1));
                Scaling {
                    policies: vec![policy],
                    cooldown: Duration::from_secs(cooldown),
                    scale_in_stabilization: Some(Duration::from_secs(window)),
                    max_step,
                    max_step_percent: percent,
                    step_period: Duration::from_secs(period),
                    ..Scaling::with_bounds(min, min + extra)
                }
            },
        )
}

/// Load per second as demand in "instances' worth at 100% CPU"; `None` is missing data.
fn arbitrary_load() -> impl Strategy<Value = Vec<Option<f64>>> {
    proptest::collection::vec(proptest::option::weighted(0.9, 0.0f64..30.0), 1..400)
}

fn cpu_of(run: &Run, demand: f64) -> Option<MetricValue> {
    (run.ready > 0).then(|| MetricValue {
        value: demand * 100.0 / f64::from(run.ready),
        instances: run.ready,
        covered_ms: u64::MAX,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn bounds_cooldown_limits_and_stabilization_hold(s in arbitrary_scaling(), load in arbitrary_load()) {
        let mut run = Run::new();
        run.desired = s.min.max(2).min(s.max);
        run.ready = run.desired;
        for (second, demand) in load.iter().enumerate() {
            let now = second as u64 * 1000;
            let metric = demand.and_then(|d| cpu_of(&run, d));
            let before = run.desired;
            let outcome = run.tick(&s, now, metric);
            // Bounds always hold.
            prop_assert!(run.desired >= s.min && run.desired <= s.max, "{}", outcome.inputs.reason);
            // Missing data never scales in.
            if metric.is_none() {
                prop_assert!(run.desired >= before.clamp(s.min, s.max));
            }
        }
        let period = s.step_period.as_millis();
        let window = s.scale_in_window_ms(None).0;
        for (i, &(at, from, to)) in run.decisions.iter().enumerate() {
            // Bounds-only corrections aside, the starting count is within bounds here.
            if to > from {
                // Cooldown between scale-outs.
                if let Some(&(previous, _, _)) = run.decisions[..i].iter().rev().find(|d| d.2 > d.1) {
                    prop_assert!(at - previous >= s.cooldown.as_millis(), "{:?}", run.decisions);
                }
            }
            // Rate limit, counted as HPA counts it: the period started at the count before
            // the instances it added (or removed), and may end at most the limit away.
            let earlier = &run.decisions[..i];
            let in_period = |d: &&(u64, u32, u32)| d.0 + period > at;
            let limit_of = |start: u32| {
                s.max_step.max(s.max_step_percent.map_or(0, |p| {
                    (f64::from(start) * f64::from(p) / 100.0).ceil() as u32
                }))
            };
            if to > from {
                let before: u32 = earlier.iter().filter(in_period).filter(|d| d.2 > d.1).map(|d| d.2 - d.1).sum();
                let start = from.saturating_sub(before);
                let limit = limit_of(start);
                prop_assert!(to <= start + limit, "{at}: limit {limit}: {:?}", run.decisions);
            } else {
                let before: u32 = earlier.iter().filter(in_period).filter(|d| d.2 < d.1).map(|d| d.1 - d.2).sum();
                let start = from + before;
                let limit = limit_of(start);
                prop_assert!(to >= start.saturating_sub(limit), "{at}: limit {limit}: {:?}", run.decisions);
            }
            // Stabilization: a scale-in never goes below a recommendation of the window, and
            // none happens in the first window.
            if to < from {
                prop_assert!(at >= window);
                let highest = run
                    .recommendations
                    .iter()
                    .filter(|&&(t, _)| t + window > at && t <= at)
                    .filter_map(|&(_, r)| r)
                    .max()
                    .unwrap_or(0);
                prop_assert!(to >= highest.min(from).max(s.min), "{at}: {from}->{to}, highest {highest}");
            }
        }
    }

    #[test]
    fn a_steady_metric_within_tolerance_never_flaps(
        s in arbitrary_scaling(),
        start in 1u32..20,
        offset in -1.0f64..1.0,
        seconds in 10u64..300,
    ) {
        let tolerance = s.policies[0].tolerance();
        let start = start.clamp(s.min, s.max);
        let cpu = 60.0 * (1.0 + offset * tolerance);
        let mut run = Run::new();
        run.desired = start;
        run.ready = start;
        for second in 0..seconds {
            run.tick(&s, second * 1000, cpu_of(&run, cpu * f64::from(start) / 100.0));
        }
        prop_assert!(run.decisions.is_empty(), "{:?}", run.decisions);
    }

    #[test]
    fn a_metric_wandering_inside_the_tolerance_never_flaps(
        s in arbitrary_scaling(),
        start in 1u32..20,
        offsets in proptest::collection::vec(-0.99f64..0.99, 10..300),
    ) {
        let tolerance = s.policies[0].tolerance();
        let start = start.clamp(s.min, s.max);
        let mut run = Run::new();
        run.desired = start;
        run.ready = start;
        for (second, offset) in offsets.iter().enumerate() {
            let metric = MetricValue {
                value: 60.0 * (1.0 + offset * tolerance),
                instances: start,
                covered_ms: u64::MAX,
            };
            run.tick(&s, second as u64 * 1000, Some(metric));
        }
        prop_assert!(run.decisions.is_empty(), "{:?}", run.decisions);
    }

    #[test]
    fn the_largest_recommendation_wins_and_scale_in_needs_all(
        a in 1.0f64..300.0,
        b in 1.0f64..300.0,
        current in 1u32..20,
    ) {
        let s = scaling(vec![
            ScalingPolicy::target_tracking(CPU, 60.0),
            ScalingPolicy::target_tracking(RPS, 60.0),
        ]);
        let outcome = once(&s, current, &[value(a, current), value(b, current)], LATER);
        let each: Vec<u32> = outcome.inputs.policies.iter().filter_map(|p| p.recommendation).collect();
        let largest = *each.iter().max().expect("both recommend");
        prop_assert_eq!(outcome.inputs.to, largest.clamp(1, 20));
        if outcome.inputs.to < current {
            prop_assert!(each.iter().all(|&r| r < current));
        }
    }
}

//! `strata-bench autoscale`: load traces replayed through Strata's autoscaler (the
//! controller's own planner and metric windows), the Kubernetes HPA with its defaults and AWS
//! target tracking, on the same simulated tier, with a side-by-side table.
//!
//! Layout: `trace` reads and generates traces; `world` is the simulated tier (capacity,
//! start-up, CPU saturation, the figures); `strata`, `hpa` and `aws` are the three
//! autoscalers with their metric pipelines; `output` writes the per-second CSV and SVG.
//! Simulated time only: a run takes no wall-clock time beyond its computation, and the same
//! arguments always give the same figures.

pub mod aws;
pub mod hpa;
pub mod output;
pub mod strata;
pub mod trace;
pub mod world;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Serialize;

use self::trace::{Replay, Shape, Trace};
use self::world::{Autoscaler, Model, RunReport};

/// The issue's target: at least this share fewer SLO-violation seconds than HPA, summed.
pub const TARGET_VIOLATION_REDUCTION: f64 = 0.5;

/// The real traces shipped in `bench/traces/` (NAB, MIT licence: `bench/traces/LICENSE-NAB.txt`).
const REAL_TRACES: [(&str, &str, &str); 2] = [
    (
        "nyc_taxi",
        "bench/traces/nyc_taxi.csv",
        include_str!("../../traces/nyc_taxi.csv"),
    ),
    (
        "twitter_amzn",
        "bench/traces/twitter_volume_amzn.csv",
        include_str!("../../traces/twitter_volume_amzn.csv"),
    ),
];

#[derive(Args, Clone, Debug)]
pub struct AutoscaleArgs {
    /// A load trace, CSV `timestamp,value` (repeatable). Without it: the built-in set (step,
    /// ramp, spike, diurnal, and the two real traces in bench/traces/).
    #[arg(long)]
    trace: Vec<PathBuf>,
    /// Trace points replayed per simulated second [default: one real minute per simulated
    /// second, 60 / the trace's median step in seconds]. Generated traces are per second.
    #[arg(long)]
    points_per_second: Option<f64>,
    /// Instances the trace's peak needs at full capacity: values are scaled so that the peak
    /// is this many times --capacity.
    #[arg(long, default_value_t = 20)]
    peak_instances: u32,
    /// Requests per second one instance serves at 100% CPU.
    #[arg(long, default_value_t = 100.0)]
    capacity: f64,
    /// From a scale-out decision to the new instance serving requests.
    #[arg(long, default_value = "30s")]
    startup: strata_api::Duration,
    /// The CPU utilization every autoscaler aims at, percent (an integer: HPA's is).
    #[arg(long, default_value_t = 60)]
    target_cpu: u32,
    /// The tier's minimum, for every autoscaler.
    #[arg(long, default_value_t = 2)]
    min: u32,
    /// The tier's maximum [default: 4 × --peak-instances].
    #[arg(long)]
    max: Option<u32>,
    /// Seed of the generated traces' noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write a per-second CSV per trace and autoscaler into this directory.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write an SVG chart (demand, ready capacity, instances) per trace and autoscaler.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Short CI mode: the real traces cut to their first 500 points.
    #[arg(long)]
    smoke: bool,
    /// Run Strata with this scaling block instead of the defaults (JSON, as in a tier's
    /// `scaling`; `min` and `max` default to --min and --max), to try a policy of one's own.
    /// The report says which block ran.
    #[arg(long)]
    strata_scaling: Option<String>,
}

#[derive(Serialize)]
pub struct AutoscaleReport {
    pub model: ModelReport,
    /// One row per trace and autoscaler.
    pub table: Vec<TableRow>,
    pub totals: Vec<Totals>,
    pub targets: Targets,
    pub traces: Vec<TraceReport>,
    pub smoke: bool,
}

#[derive(Serialize)]
pub struct ModelReport {
    pub capacity_rps: f64,
    pub startup_s: u64,
    pub min: u32,
    pub max: u32,
    pub target_cpu: f64,
    pub peak_instances: u32,
    /// Strata's scaling block: unless `strata_defaults` is false, what a file with only
    /// `min`, `max`, `metric` and `target` gives.
    pub strata_scaling: strata_api::Scaling,
    pub strata_defaults: bool,
    pub hpa: HpaReport,
    pub aws: AwsReport,
}

#[derive(Serialize)]
pub struct HpaReport {
    pub sync_period_s: u64,
    pub metric_resolution_s: u64,
    pub sync_after_scrape_s: u64,
    pub tolerance: f64,
    pub downscale_stabilization_s: u64,
    pub scale_up: &'static str,
}

#[derive(Serialize)]
pub struct AwsReport {
    pub period_s: u64,
    pub scale_out_datapoints: usize,
    pub scale_in_datapoints: usize,
    pub scale_in_threshold_of_target: f64,
    pub warmup_s: u64,
}

#[derive(Serialize)]
pub struct TraceReport {
    pub name: String,
    pub source: String,
    pub replay: Replay,
    pub runs: Vec<RunReport>,
}

#[derive(Serialize)]
pub struct TableRow {
    pub trace: String,
    pub autoscaler: String,
    pub slo_violation_seconds: u64,
    pub instance_seconds: u64,
    pub scaling_actions: u32,
    pub worst_shortfall_rps: f64,
}

#[derive(Serialize)]
pub struct Totals {
    pub autoscaler: String,
    pub slo_violation_seconds: u64,
    pub instance_seconds: u64,
    pub scaling_actions: u32,
}

#[derive(Serialize)]
pub struct TraceTarget {
    pub trace: String,
    /// Strata's SLO-violation seconds are fewer than HPA's.
    pub fewer_violations_than_hpa: bool,
    /// Strata's instance-seconds over HPA's.
    pub instance_seconds_ratio_to_hpa: f64,
    pub no_more_instance_seconds_than_hpa: bool,
}

#[derive(Serialize)]
pub struct Targets {
    pub per_trace: Vec<TraceTarget>,
    /// 1 - Strata's summed SLO-violation seconds over HPA's; the target is at least 0.5.
    pub violation_reduction_vs_hpa: f64,
    /// Every per-trace target and the summed one.
    pub met: bool,
}

pub const STRATA: &str = "strata";
pub const HPA: &str = "hpa";
pub const AWS: &str = "aws";

pub fn run_cli(args: AutoscaleArgs) -> Result<AutoscaleReport> {
    ensure!(
        args.capacity.is_finite() && args.capacity > 0.0,
        "--capacity must be a positive number of requests per second"
    );
    ensure!(
        args.peak_instances >= 1,
        "--peak-instances must be at least 1"
    );
    ensure!(
        (1..=100).contains(&args.target_cpu),
        "--target-cpu must be between 1 and 100"
    );
    if let Some(pps) = args.points_per_second {
        ensure!(
            pps.is_finite() && pps > 0.0,
            "--points-per-second must be a positive number"
        );
    }
    let max = args.max.unwrap_or(4 * args.peak_instances);
    ensure!(
        args.min >= 1 && args.min <= max,
        "--min must be at least 1 and at most --max ({max})"
    );
    let model = Model {
        capacity_rps: args.capacity,
        startup_s: args.startup.as_millis() / 1000,
        min: args.min,
        max,
        target_cpu: f64::from(args.target_cpu),
    };
    let strata_scaling = match &args.strata_scaling {
        None => strata::default_scaling(model.min, model.max, model.target_cpu),
        Some(text) => strata::custom_scaling(text, model.min, model.max)?,
    };
    let peak_rps = f64::from(args.peak_instances) * args.capacity;
    let traces = load_traces(&args, peak_rps)?;
    for dir in [&args.csv, &args.svg].into_iter().flatten() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }

    let mut reports = Vec::new();
    for trace in &traces {
        eprintln!(
            "[autoscale] {}: {} simulated seconds",
            trace.name, trace.replay.simulated_seconds
        );
        let mut runs = Vec::new();
        for name in [STRATA, HPA, AWS] {
            let mut autoscaler = new_autoscaler(name, &model, &strata_scaling);
            let keep_rows = args.csv.is_some() || args.svg.is_some();
            let (report, rows) =
                world::run(name, &model, &trace.demand, autoscaler.as_mut(), keep_rows);
            if let Some(dir) = &args.csv {
                let path = dir.join(format!("{}-{name}.csv", trace.name));
                std::fs::write(&path, output::csv(&rows, model.capacity_rps))
                    .with_context(|| format!("write {}", path.display()))?;
            }
            if let Some(dir) = &args.svg {
                let path = dir.join(format!("{}-{name}.svg", trace.name));
                let title = format!(
                    "{} / {name}: {} s in SLO violation, {} instance-seconds, {} actions",
                    trace.name,
                    report.slo_violation_seconds,
                    report.instance_seconds,
                    report.scaling_actions
                );
                std::fs::write(&path, output::svg(&title, &rows, model.capacity_rps))
                    .with_context(|| format!("write {}", path.display()))?;
            }
            runs.push(rounded(report));
        }
        reports.push(TraceReport {
            name: trace.name.clone(),
            source: trace.source.clone(),
            replay: trace.replay.clone(),
            runs,
        });
    }
    let strata_defaults = args.strata_scaling.is_none();
    let mut report = summarize(model, args.peak_instances, reports, args.smoke);
    report.model.strata_scaling = strata_scaling;
    report.model.strata_defaults = strata_defaults;
    eprint!("{}", markdown_table(&report));
    Ok(report)
}

fn new_autoscaler(
    name: &str,
    model: &Model,
    strata_scaling: &strata_api::Scaling,
) -> Box<dyn Autoscaler> {
    match name {
        STRATA => Box::new(strata::Strata::new(strata_scaling.clone())),
        HPA => Box::new(hpa::Hpa::new(hpa::HpaConfig::defaults(
            model.min,
            model.max,
            model.target_cpu as i64,
        ))),
        _ => Box::new(aws::Aws::new(model.min, model.max, model.target_cpu)),
    }
}

fn load_traces(args: &AutoscaleArgs, peak_rps: f64) -> Result<Vec<Trace>> {
    let pps_for = |points: &trace::Points| {
        args.points_per_second
            .unwrap_or_else(|| trace::DEFAULT_COMPRESSION / points.resolution_s())
    };
    let mut traces = Vec::new();
    if args.trace.is_empty() {
        for shape in Shape::ALL {
            traces.push(trace::generate(shape, peak_rps, args.seed));
        }
        for (name, source, text) in REAL_TRACES {
            let mut points = trace::parse_csv(text).with_context(|| format!("read {source}"))?;
            if args.smoke {
                points.truncate(500);
            }
            traces.push(trace::replay(
                name,
                source,
                &points,
                pps_for(&points),
                peak_rps,
            ));
        }
    } else {
        for path in &args.trace {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            let points = trace::parse_csv(&text).with_context(|| format!("{}", path.display()))?;
            traces.push(trace::replay(
                &trace_name(path),
                &path.display().to_string(),
                &points,
                pps_for(&points),
                peak_rps,
            ));
        }
    }
    for trace in &traces {
        if trace.demand.len() > 50_000_000 {
            bail!(
                "{}: {} simulated seconds is more than this benchmark replays; raise --points-per-second",
                trace.name,
                trace.demand.len()
            );
        }
    }
    Ok(traces)
}

fn trace_name(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| "trace".to_string())
}

fn rounded(mut report: RunReport) -> RunReport {
    report.worst_shortfall_rps = round2(report.worst_shortfall_rps);
    report.worst_shortfall_instances = round2(report.worst_shortfall_instances);
    report.unserved_requests = round2(report.unserved_requests);
    report.mean_instances = round2(report.mean_instances);
    report
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn summarize(
    model: Model,
    peak_instances: u32,
    traces: Vec<TraceReport>,
    smoke: bool,
) -> AutoscaleReport {
    let mut table = Vec::new();
    let mut totals: Vec<Totals> = [STRATA, HPA, AWS]
        .iter()
        .map(|name| Totals {
            autoscaler: name.to_string(),
            slo_violation_seconds: 0,
            instance_seconds: 0,
            scaling_actions: 0,
        })
        .collect();
    let mut per_trace = Vec::new();
    for trace in &traces {
        for run in &trace.runs {
            table.push(TableRow {
                trace: trace.name.clone(),
                autoscaler: run.autoscaler.clone(),
                slo_violation_seconds: run.slo_violation_seconds,
                instance_seconds: run.instance_seconds,
                scaling_actions: run.scaling_actions,
                worst_shortfall_rps: run.worst_shortfall_rps,
            });
            if let Some(total) = totals.iter_mut().find(|t| t.autoscaler == run.autoscaler) {
                total.slo_violation_seconds += run.slo_violation_seconds;
                total.instance_seconds += run.instance_seconds;
                total.scaling_actions += run.scaling_actions;
            }
        }
        let find = |name: &str| trace.runs.iter().find(|r| r.autoscaler == name);
        if let (Some(strata), Some(hpa)) = (find(STRATA), find(HPA)) {
            let ratio = if hpa.instance_seconds > 0 {
                strata.instance_seconds as f64 / hpa.instance_seconds as f64
            } else {
                0.0
            };
            per_trace.push(TraceTarget {
                trace: trace.name.clone(),
                fewer_violations_than_hpa: strata.slo_violation_seconds < hpa.slo_violation_seconds,
                instance_seconds_ratio_to_hpa: (ratio * 1000.0).round() / 1000.0,
                no_more_instance_seconds_than_hpa: strata.instance_seconds <= hpa.instance_seconds,
            });
        }
    }
    let total_of = |name: &str| {
        totals
            .iter()
            .find(|t| t.autoscaler == name)
            .map_or(0, |t| t.slo_violation_seconds)
    };
    let (strata_total, hpa_total) = (total_of(STRATA), total_of(HPA));
    let reduction = if hpa_total > 0 {
        1.0 - strata_total as f64 / hpa_total as f64
    } else {
        0.0
    };
    let met = reduction >= TARGET_VIOLATION_REDUCTION
        && per_trace
            .iter()
            .all(|t| t.fewer_violations_than_hpa && t.no_more_instance_seconds_than_hpa);
    AutoscaleReport {
        model: ModelReport {
            capacity_rps: model.capacity_rps,
            startup_s: model.startup_s,
            min: model.min,
            max: model.max,
            target_cpu: model.target_cpu,
            peak_instances,
            strata_scaling: strata::default_scaling(model.min, model.max, model.target_cpu),
            strata_defaults: true,
            hpa: HpaReport {
                sync_period_s: hpa::SYNC_PERIOD_S,
                metric_resolution_s: hpa::METRIC_RESOLUTION_S,
                sync_after_scrape_s: hpa::SYNC_PHASE_S,
                tolerance: hpa::TOLERANCE,
                downscale_stabilization_s: hpa::DOWNSCALE_STABILIZATION_S,
                scale_up: "max(4 pods, 100%) per 15 s",
            },
            aws: AwsReport {
                period_s: aws::PERIOD_S,
                scale_out_datapoints: aws::SCALE_OUT_DATAPOINTS,
                scale_in_datapoints: aws::SCALE_IN_DATAPOINTS,
                scale_in_threshold_of_target: aws::SCALE_IN_THRESHOLD,
                warmup_s: aws::WARMUP_S,
            },
        },
        table,
        totals,
        targets: Targets {
            per_trace,
            violation_reduction_vs_hpa: (reduction * 1000.0).round() / 1000.0,
            met,
        },
        traces,
        smoke,
    }
}

/// The side-by-side table as Markdown, for people (stderr) and the READMEs.
pub fn markdown_table(report: &AutoscaleReport) -> String {
    let mut text = String::from(
        "| trace | SLO-violation s (Strata / HPA / AWS) | instance-s (Strata / HPA / AWS) | actions (Strata / HPA / AWS) | worst shortfall, instances (Strata / HPA / AWS) |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for trace in &report.traces {
        let pick = |f: &dyn Fn(&RunReport) -> String| {
            [STRATA, HPA, AWS]
                .iter()
                .map(|name| {
                    trace
                        .runs
                        .iter()
                        .find(|r| r.autoscaler == *name)
                        .map_or_else(|| "-".to_string(), f)
                })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        text.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            trace.name,
            pick(&|r| r.slo_violation_seconds.to_string()),
            pick(&|r| r.instance_seconds.to_string()),
            pick(&|r| r.scaling_actions.to_string()),
            pick(&|r| format!("{:.1}", r.worst_shortfall_instances)),
        ));
    }
    let totals =
        |f: &dyn Fn(&Totals) -> String| report.totals.iter().map(f).collect::<Vec<_>>().join(" / ");
    text.push_str(&format!(
        "| total | {} | {} | {} | |\n",
        totals(&|t| t.slo_violation_seconds.to_string()),
        totals(&|t| t.instance_seconds.to_string()),
        totals(&|t| t.scaling_actions.to_string()),
    ));
    text.push_str(&format!(
        "\nSLO-violation seconds vs HPA: {:.1}% fewer (target at least {:.0}%); per trace fewer violations and no more instance-seconds: {}; targets met: {}\n",
        report.targets.violation_reduction_vs_hpa * 100.0,
        TARGET_VIOLATION_REDUCTION * 100.0,
        report
            .targets
            .per_trace
            .iter()
            .map(|t| format!(
                "{} {}/{}",
                t.trace,
                if t.fewer_violations_than_hpa { "yes" } else { "no" },
                if t.no_more_instance_seconds_than_hpa { "yes" } else { "no" }
            ))
            .collect::<Vec<_>>()
            .join(", "),
        report.targets.met
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AutoscaleArgs,
    }

    fn args(extra: &[&str]) -> AutoscaleArgs {
        let mut argv = vec!["autoscale"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    #[test]
    fn a_bad_trace_file_names_the_file_and_the_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.csv");
        std::fs::write(&path, "timestamp,value\n0,10\n60,ten\n").expect("write");
        let error = run_cli(args(&["--trace", path.to_str().expect("utf-8")]))
            .err()
            .expect("a bad trace fails");
        let message = format!("{error:#}");
        assert!(message.contains("bad.csv"), "{message}");
        assert!(
            message.contains("line 3: value `ten` is not a number"),
            "{message}"
        );
        let missing = dir.path().join("missing.csv");
        let error = run_cli(args(&["--trace", missing.to_str().expect("utf-8")]))
            .err()
            .expect("a missing trace fails");
        assert!(format!("{error:#}").contains("missing.csv"));
    }

    #[test]
    fn a_custom_strata_block_is_validated_with_its_field_paths() {
        let error = run_cli(args(&[
            "--strata-scaling",
            r#"{"policies": [{"metric": "cpu_utilization", "target": -1}]}"#,
        ]))
        .err()
        .expect("a negative target is refused");
        assert!(
            format!("{error:#}").contains("scaling.policies[0].target"),
            "{error:#}"
        );
        let error = run_cli(args(&["--strata-scaling", r#"{"colldown": "1s"}"#]))
            .err()
            .expect("an unknown field is refused");
        assert!(format!("{error:#}").contains("colldown"), "{error:#}");
    }

    #[test]
    fn bad_flags_are_refused() {
        for extra in [
            &["--capacity", "0"][..],
            &["--points-per-second=-1"],
            &["--target-cpu", "0"],
            &["--min", "9", "--max", "3"],
            &["--peak-instances", "0"],
        ] {
            assert!(run_cli(args(extra)).is_err(), "{extra:?}");
        }
    }

    #[test]
    fn a_trace_file_runs_through_all_three_and_writes_csv_and_svg() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("burst.csv");
        // One point a minute: quiet, a burst for 10 minutes, quiet.
        let mut text = String::from("timestamp,value\n");
        for minute in 0..60u64 {
            let value = if (20..30).contains(&minute) { 100 } else { 20 };
            text.push_str(&format!("{},{value}\n", minute * 60));
        }
        std::fs::write(&path, text).expect("write");
        let out = dir.path().join("out");
        let report = run_cli(args(&[
            "--trace",
            path.to_str().expect("utf-8"),
            "--points-per-second",
            "0.02",
            "--csv",
            out.to_str().expect("utf-8"),
            "--svg",
            out.to_str().expect("utf-8"),
        ]))
        .expect("runs");
        assert_eq!(report.traces.len(), 1);
        assert_eq!(report.traces[0].replay.compression, 1.2);
        assert_eq!(report.table.len(), 3);
        for name in [STRATA, HPA, AWS] {
            assert!(out.join(format!("burst-{name}.csv")).is_file());
            assert!(out.join(format!("burst-{name}.svg")).is_file());
        }
        let table = markdown_table(&report);
        assert!(table.contains("| burst |"), "{table}");
    }
}

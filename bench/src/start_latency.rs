//! Start latency: from a scale-up's commit (the 200 answer to `POST /v1/tiers/{name}/scale`)
//! to the new instance Running and healthy, for the process driver and for a qemu VM.
//!
//! For each agent heartbeat interval, a fresh single-node controller and one agent run on
//! loopback (`local::LocalEnv`). A round scales a tier from 0 to 1, polls
//! `GET /v1/instances?tier=` every `POLL` until the new instance is Running and Healthy, then
//! scales back to 0 and waits until that instance is final, so every round starts from the same
//! state. Per round it keeps:
//! - `observed_ms`: client time from the 200 to the poll that saw the instance ready (adds up
//!   to one poll period to the truth);
//! - the controller's own stamps relative to the client's wall clock at the 200 (same host, same
//!   clock): `created_ms` (the instance's `created_at_ms`: the reconciler's CreateInstances),
//!   `reported_ms` (`updated_at_ms` when first seen past Pending: the agent's first report,
//!   Starting, or Running when the first probe passed before it) and `ready_ms`
//!   (`ready_at_ms`: the report of Running and healthy, committed).
//!
//! For qemu the reference is qemu's own boot-to-HTTP time for the same image, measured in the
//! same run and interleaved with the rounds: the benchmark starts the command line the agent's
//! driver would (`strata_agent::driver::qemu::qemu_args`, same accelerator probe) and times it
//! until `GET /healthz` answers 200, polling every `DIRECT_POLL`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde::Serialize;
use serde_json::json;
use strata_api::{Health, Instance, ItemList, Phase, Template};
use uuid::Uuid;

use crate::local::{LocalConfig, LocalEnv};
use crate::stats::{percentile, round2};

/// The targets.
pub const TARGET_PROCESS_MS: f64 = 1000.0;
/// A VM through Strata may take this much longer than qemu alone (p50 against p50).
pub const TARGET_QEMU_RATIO: f64 = 1.2;

/// How often a round polls the instance list.
const POLL: Duration = Duration::from_millis(20);
/// How often the direct qemu run polls the guest's `/healthz`.
const DIRECT_POLL: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Process,
    Qemu,
}

impl Driver {
    fn tier(self) -> &'static str {
        match self {
            Driver::Process => "bench-process",
            Driver::Qemu => "bench-vm",
        }
    }

    /// Time allowed for one start (TCG boots take seconds) and one stop.
    fn timeout(self) -> Duration {
        match self {
            Driver::Process => Duration::from_secs(30),
            Driver::Qemu => Duration::from_secs(240),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StartLatencyConfig {
    pub controller_bin: PathBuf,
    pub agent_bin: PathBuf,
    pub workload_bin: PathBuf,
    pub heartbeat_intervals: Vec<Duration>,
    pub process_rounds: usize,
    /// 0 skips qemu (and the guest image build).
    pub qemu_rounds: usize,
    /// The tiers' health check interval.
    pub health_interval: Duration,
    pub reconcile_interval: Option<Duration>,
    pub guest_image_dir: PathBuf,
    pub qemu_binary: PathBuf,
    pub keep_dir: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct StartLatencyReport {
    pub variants: Vec<VariantReport>,
    pub health_interval_ms: f64,
    /// The controller's `--reconcile-interval` when set; its default (500 ms) otherwise.
    pub reconcile_interval_ms: Option<f64>,
    pub poll_ms: f64,
    pub targets: String,
    /// Every process p99 under 1 s, in every variant.
    pub process_target_met: Option<bool>,
    /// Every variant's VM p50 within 20% of qemu's own p50.
    pub qemu_target_met: Option<bool>,
    pub smoke: bool,
    pub load_average_at_start: Option<[f64; 3]>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VariantReport {
    pub heartbeat_interval_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<DriverReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu: Option<DriverReport>,
    /// qemu alone, same command line and image: start to `/healthz` answering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_direct: Option<Summary>,
    /// Strata's VM p50 over qemu's own p50.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_ratio_p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_accel: Option<&'static str>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DriverReport {
    /// Client time from the 200 to the poll that saw Running and healthy.
    pub observed: Summary,
    /// `ready_at_ms` (the controller's stamp) minus the 200's wall time.
    pub ready: Summary,
    /// Medians of the stages, each from the 200: CreateInstances, the agent's first report
    /// (when a poll caught it before the instance was ready), Running and healthy committed.
    pub created_p50_ms: f64,
    pub reported_p50_ms: Option<f64>,
    pub ready_p50_ms: f64,
    pub rounds: Vec<Round>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    fn of(values: &[f64]) -> Summary {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Summary {
            samples: sorted.len(),
            p50_ms: round2(percentile(&sorted, 0.5)),
            p99_ms: round2(percentile(&sorted, 0.99)),
            min_ms: round2(sorted.first().copied().unwrap_or(0.0)),
            max_ms: round2(sorted.last().copied().unwrap_or(0.0)),
        }
    }
}

/// One scale-up; every time is milliseconds after the 200.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub observed_ms: f64,
    pub created_ms: f64,
    /// The agent's first report; `None` when no poll caught it before the instance was ready.
    pub reported_ms: Option<f64>,
    pub ready_ms: f64,
}

pub async fn run(config: &StartLatencyConfig, smoke: bool) -> Result<StartLatencyReport> {
    let load_average_at_start = crate::load_average();
    let image = if config.qemu_rounds > 0 {
        Some(build_guest_image(config).await?)
    } else {
        None
    };
    let mut variants = Vec::new();
    for &interval in &config.heartbeat_intervals {
        let local = LocalConfig::worker_only(
            config.controller_bin.clone(),
            config.agent_bin.clone(),
            interval,
            config.reconcile_interval,
            config.keep_dir,
        );
        eprintln!(
            "[start-latency] heartbeat every {interval:?}: starting a controller and an agent"
        );
        let mut env = LocalEnv::start(&local).await?;
        let mut variant = VariantReport {
            heartbeat_interval_ms: interval.as_secs_f64() * 1000.0,
            process: None,
            qemu: None,
            qemu_direct: None,
            qemu_ratio_p50: None,
            qemu_accel: None,
        };
        if config.process_rounds > 0 {
            let template = json!({
                "driver": "process",
                "command": [config.workload_bin.display().to_string()],
                "cpu": 0.25,
                "memory_mb": 64,
            });
            variant.process =
                Some(driver_rounds(&mut env, config, Driver::Process, template, None).await?);
        }
        if let Some(image) = &image {
            let template = json!({
                "driver": "qemu",
                "image": {
                    "kernel": image.join("vmlinuz").display().to_string(),
                    "initrd": image.join("initrd.img").display().to_string(),
                },
                "port": 8080,
                "cpu": 1.0,
                "memory_mb": 256,
            });
            let mut direct = Vec::new();
            let report =
                driver_rounds(&mut env, config, Driver::Qemu, template, Some(&mut direct)).await?;
            let direct = Summary::of(&direct);
            if direct.p50_ms > 0.0 {
                variant.qemu_ratio_p50 = Some(round2(report.observed.p50_ms / direct.p50_ms));
            }
            variant.qemu = Some(report);
            variant.qemu_direct = Some(direct);
            variant.qemu_accel = Some(strata_agent::driver::qemu::probe_accel().as_str());
        }
        variants.push(variant);
    }
    let process_target_met = variants
        .iter()
        .map(|v| {
            v.process
                .as_ref()
                .map(|p| p.observed.p99_ms < TARGET_PROCESS_MS)
        })
        .collect::<Option<Vec<bool>>>()
        .map(|all| all.iter().all(|ok| *ok));
    let qemu_target_met = variants
        .iter()
        .map(|v| v.qemu_ratio_p50.map(|ratio| ratio <= TARGET_QEMU_RATIO))
        .collect::<Option<Vec<bool>>>()
        .map(|all| all.iter().all(|ok| *ok));
    Ok(StartLatencyReport {
        variants,
        health_interval_ms: config.health_interval.as_secs_f64() * 1000.0,
        reconcile_interval_ms: config
            .reconcile_interval
            .map(|interval| interval.as_secs_f64() * 1000.0),
        poll_ms: POLL.as_secs_f64() * 1000.0,
        targets: format!(
            "process: p99 under {TARGET_PROCESS_MS} ms; VM: p50 within {}% of qemu's own \
             boot-to-HTTP p50",
            ((TARGET_QEMU_RATIO - 1.0) * 100.0).round()
        ),
        process_target_met,
        qemu_target_met,
        smoke,
        load_average_at_start,
    })
}

/// Creates the driver's tier at 0 instances, then runs the rounds. With `direct`, a direct
/// qemu boot of the same template runs before each round and its time is pushed there.
async fn driver_rounds(
    env: &mut LocalEnv,
    config: &StartLatencyConfig,
    driver: Driver,
    template: serde_json::Value,
    mut direct: Option<&mut Vec<f64>>,
) -> Result<DriverReport> {
    let rounds = match driver {
        Driver::Process => config.process_rounds,
        Driver::Qemu => config.qemu_rounds,
    };
    let tier = driver.tier();
    let body = json!({
        "name": tier,
        "template": template,
        "health": {
            "path": "/healthz",
            "interval": format!("{}ms", config.health_interval.as_millis()),
            // A probe may not outlast the interval (validation); loopback answers in microseconds.
            "timeout": format!("{}ms", config.health_interval.as_millis()),
            "healthy_threshold": 1,
            "unhealthy_threshold": 3,
            "grace_period": "5m",
        },
        "scaling": {"min": 0, "max": 1},
    });
    env.api
        .send(Method::PUT, &format!("/v1/tiers/{tier}"), &body)
        .await?;
    let template: Template =
        serde_json::from_value(body["template"].clone()).context("decode the template")?;
    let mut seen = HashSet::new();
    let mut results = Vec::with_capacity(rounds);
    for index in 0..rounds {
        if let Some(direct) = direct.as_deref_mut() {
            let ms = direct_boot(env.dir(), config, &template, index).await?;
            eprintln!("[start-latency] qemu alone: /healthz answered after {ms:.0} ms");
            direct.push(ms);
        }
        let round = scale_round(env, driver, &mut seen).await?;
        eprintln!(
            "[start-latency] {tier} round {}: ready after {:.0} ms (created {:.0}, reported {:?}, \
             ready stamp {:.0})",
            index + 1,
            round.observed_ms,
            round.created_ms,
            round.reported_ms.map(|ms| ms.round()),
            round.ready_ms
        );
        results.push(round);
    }
    let column = |pick: fn(&Round) -> Option<f64>| -> Vec<f64> {
        let mut values: Vec<f64> = results.iter().filter_map(pick).collect();
        values.sort_by(f64::total_cmp);
        values
    };
    Ok(DriverReport {
        observed: Summary::of(&column(|r| Some(r.observed_ms))),
        ready: Summary::of(&column(|r| Some(r.ready_ms))),
        created_p50_ms: round2(percentile(&column(|r| Some(r.created_ms)), 0.5)),
        reported_p50_ms: Some(column(|r| r.reported_ms))
            .filter(|values| !values.is_empty())
            .map(|values| round2(percentile(&values, 0.5))),
        ready_p50_ms: round2(percentile(&column(|r| Some(r.ready_ms)), 0.5)),
        rounds: results,
    })
}

/// One scale-up from 0 to 1 and back; `seen` holds the ids of earlier rounds' instances.
async fn scale_round(
    env: &mut LocalEnv,
    driver: Driver,
    seen: &mut HashSet<Uuid>,
) -> Result<Round> {
    let tier = driver.tier();
    let scale = format!("/v1/tiers/{tier}/scale");
    let list = format!("/v1/instances?tier={tier}");
    env.api
        .send(Method::POST, &scale, &json!({"desired": 1}))
        .await?;
    let committed = Instant::now();
    let committed_wall_ms = wall_ms();
    let since_commit = |stamp_ms: u64| round2(stamp_ms as f64 - committed_wall_ms);

    let deadline = committed + driver.timeout();
    let mut reported_ms = None;
    let mut last = String::from("no new instance yet");
    let ready = loop {
        env.check_alive()?;
        let instances: ItemList<Instance> = env.api.get(&list).await?;
        let fresh = instances
            .items
            .into_iter()
            .find(|instance| !seen.contains(&instance.id));
        if let Some(instance) = fresh {
            let elapsed = committed.elapsed();
            match (instance.phase, instance.health) {
                (Phase::Running, Health::Healthy) => break (instance, elapsed),
                (phase, _) if phase.is_final() => bail!(
                    "instance {} of {tier} ended {phase:?}: {}",
                    instance.id,
                    instance.reason.unwrap_or_default()
                ),
                (Phase::Pending, _) => {}
                _ => {
                    reported_ms.get_or_insert(since_commit(instance.updated_at_ms));
                }
            }
            last = format!("{:?}/{:?}", instance.phase, instance.health);
        }
        if Instant::now() >= deadline {
            bail!(
                "{tier}: no instance ready {:?} after the scale-up; last: {last}",
                driver.timeout()
            );
        }
        tokio::time::sleep(POLL).await;
    };
    let (instance, elapsed) = ready;
    seen.insert(instance.id);
    let round = Round {
        observed_ms: round2(elapsed.as_secs_f64() * 1000.0),
        created_ms: since_commit(instance.created_at_ms),
        reported_ms,
        ready_ms: since_commit(instance.ready_at_ms),
    };

    env.api
        .send(Method::POST, &scale, &json!({"desired": 0}))
        .await?;
    let id = instance.id;
    env.wait("the instance to terminate", driver.timeout(), move |api| {
        let list = list.clone();
        async move {
            let instances: ItemList<Instance> = api.get(&list).await?;
            Ok(instances
                .items
                .iter()
                .all(|i| i.id != id || i.phase.is_final())
                .then_some(()))
        }
    })
    .await?;
    Ok(round)
}

/// Boots the template's VM with the agent driver's exact command line and returns the
/// milliseconds until the guest's `/healthz` answers 200.
async fn direct_boot(
    dir: &Path,
    config: &StartLatencyConfig,
    template: &Template,
    index: usize,
) -> Result<f64> {
    use strata_agent::driver::qemu::{probe_accel, qemu_args, DEFAULT_GUEST_PORT};
    use strata_agent::driver::StartRequest;

    let Some(image) = &template.image else {
        bail!("the qemu template has no image");
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .context("pick a free loopback port")?
        .port();
    let run_dir = dir.join(format!("qemu-direct-{index}"));
    std::fs::create_dir_all(&run_dir).context("create the direct run's directory")?;
    let request = StartRequest {
        instance_id: Uuid::new_v4(),
        tier: "direct",
        template,
        dir: &run_dir,
        advertise_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        host_port: port,
    };
    let args = qemu_args(
        &request,
        Path::new(&image.kernel),
        Path::new(&image.initrd),
        image.append.as_deref(),
        template.port.unwrap_or(DEFAULT_GUEST_PORT),
        probe_accel(),
        &run_dir.join("console.log"),
    );
    let log = std::fs::File::create(run_dir.join("qemu.log")).context("create qemu log")?;
    let log_err = log.try_clone().context("duplicate log file handle")?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&config.qemu_binary)
        .args(&args)
        .current_dir(&run_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", config.qemu_binary.display()))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .context("build HTTP client")?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    let deadline = started + Driver::Qemu.timeout();
    let result = loop {
        if let Some(status) = child.try_wait().context("poll qemu")? {
            break Err(anyhow::anyhow!(
                "qemu exited ({status}) before /healthz answered"
            ));
        }
        let answered = http
            .get(&url)
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if answered {
            break Ok(round2(started.elapsed().as_secs_f64() * 1000.0));
        }
        if Instant::now() >= deadline {
            break Err(anyhow::anyhow!(
                "qemu's /healthz silent after {:?}",
                Driver::Qemu.timeout()
            ));
        }
        tokio::time::sleep(DIRECT_POLL).await;
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// Runs `deploy/build-guest-image.sh` (it does nothing when its inputs are unchanged).
async fn build_guest_image(config: &StartLatencyConfig) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-guest-image.sh");
    eprintln!(
        "[start-latency] guest image in {} (built or reused)",
        config.guest_image_dir.display()
    );
    let status = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(&config.guest_image_dir)
        .arg(&config.workload_bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("run {}", script.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", script.display());
    }
    Ok(config.guest_image_dir.clone())
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// `strata-bench start-latency`.
#[derive(clap::Args)]
pub struct StartLatencyArgs {
    /// Agent heartbeat intervals to measure, each with a fresh controller and agent
    /// [default: 1s,200ms; smoke 200ms].
    #[arg(long, value_delimiter = ',')]
    heartbeat_intervals: Vec<strata_api::Duration>,
    /// Scale-ups of a process tier per interval [default: 20, smoke 2].
    #[arg(long)]
    process_rounds: Option<usize>,
    /// Scale-ups of a qemu tier per interval, each after a direct qemu boot; 0 skips qemu
    /// [default: 3, smoke 0].
    #[arg(long)]
    qemu_rounds: Option<usize>,
    /// The tiers' health check interval.
    #[arg(long, default_value = "250ms")]
    health_interval: strata_api::Duration,
    /// The controller's --reconcile-interval [default: the controller's, 500ms].
    #[arg(long)]
    reconcile_interval: Option<strata_api::Duration>,
    /// strata-agent binary [default: next to strata-controller].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// strata-workload binary, run by the process tier and put in the guest image
    /// [default: next to strata-controller].
    #[arg(long)]
    workload_bin: Option<PathBuf>,
    /// Where deploy/build-guest-image.sh keeps the guest image [default: TARGET/guest-image].
    #[arg(long)]
    guest_image_dir: Option<PathBuf>,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_bin: PathBuf,
    /// Short CI mode: one 200ms variant, 2 process scale-ups, no qemu (unless set explicitly).
    #[arg(long)]
    smoke: bool,
    #[command(flatten)]
    binaries: crate::BinaryArgs,
}

pub async fn run_cli(args: StartLatencyArgs) -> Result<StartLatencyReport> {
    let smoke = args.smoke;
    let controller_bin = args.binaries.resolve().strata;
    let sibling = |name: &str| {
        controller_bin
            .parent()
            .map_or_else(|| PathBuf::from(name), |dir| dir.join(name))
    };
    let heartbeat_intervals = if !args.heartbeat_intervals.is_empty() {
        args.heartbeat_intervals
            .iter()
            .map(|d| d.as_std())
            .collect()
    } else if smoke {
        vec![Duration::from_millis(200)]
    } else {
        vec![Duration::from_secs(1), Duration::from_millis(200)]
    };
    let guest_image_dir = args.guest_image_dir.unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("guest-image")
    });
    let config = StartLatencyConfig {
        agent_bin: args.agent_bin.unwrap_or_else(|| sibling("strata-agent")),
        workload_bin: args
            .workload_bin
            .unwrap_or_else(|| sibling("strata-workload")),
        controller_bin,
        heartbeat_intervals,
        process_rounds: args.process_rounds.unwrap_or(if smoke { 2 } else { 20 }),
        qemu_rounds: args.qemu_rounds.unwrap_or(if smoke { 0 } else { 3 }),
        health_interval: args.health_interval.as_std(),
        reconcile_interval: args.reconcile_interval.map(|d| d.as_std()),
        guest_image_dir,
        qemu_binary: args.qemu_bin,
        keep_dir: args.binaries.keep_dir,
    };
    run(&config, smoke).await
}

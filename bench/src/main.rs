//! `strata-bench`: Raft write throughput, latency and leader failover of Strata against
//! etcd 3.4, both as 3-member clusters on loopback, measured the same way in one run.
//!
//! Layout: `system` holds what differs between the two systems (the write request, the
//! status probe); `cluster` spawns, kills and restarts their processes; `writes` is the
//! load generator; `failover` the kill loop. `heartbeats` (simulated agents) and `start_latency`
//! (scale-up to ready, with `local`'s controller and agent) measure the agent side; `stats`
//! holds their percentiles and CPU readings; `pools` measures load-balancer pools (propagation
//! to HAProxy, throughput under churn against the reload approach); `reaction` the autoscaler's
//! reaction time from a load step to new instances serving; `autoscale` replays load traces
//! through Strata's autoscaler planner, HPA and AWS target tracking in simulated time; `tls`
//! writes and heartbeats with plain HTTP against mutual TLS; `ec2` an EC2 scale-out against
//! moto, clean and throttled. `fleet` measures fleet-scale state through a real cluster;
//! `plan_round` times the planners alone on the same state, in memory.
//! Results go to stdout as JSON, progress to stderr.
//! These are benchmarks, never timed tests: nothing here fails on a slow number.

mod autoscale;
mod cluster;
mod ec2;
mod failover;
mod fleet;
mod heartbeats;
mod local;
mod partition;
mod plan_round;
mod pools;
mod reaction;
mod start_latency;
mod stats;
mod system;
mod tls;
mod writes;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::cluster::{Binaries, Cluster, STRATA_ADMIN_TOKEN};
use crate::failover::FailoverReport;
use crate::system::{System, Writer};
use crate::writes::{WritesConfig, WritesReport};

/// The controller's allocator (see `strata-controller`'s main), so that `plan-round` pays
/// for allocations what the leader pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The targets for Strata relative to etcd.
const TARGET_WRITES_RATIO: f64 = 1.25;
const TARGET_FAILOVER_MEDIAN_MS: f64 = 1000.0;

#[derive(Parser)]
#[command(
    name = "strata-bench",
    version,
    about = "Raft write throughput, latency and leader failover: Strata vs etcd 3.4 on loopback",
    long_about = "Raft write throughput, latency and leader failover: Strata vs etcd 3.4 on loopback.\n\n\
        Each system runs as a 3-member cluster on 127.0.0.1 that this program starts, owns and \
        kills again on exit (data in a temporary directory). Results are printed to stdout as \
        JSON; progress goes to stderr.\n\n\
        Typical use: `strata-bench compare` (full run, a few minutes) or `strata-bench compare \
        --smoke` (CI)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Durable writes per second and latency percentiles with N concurrent clients.
    ///
    /// Without --endpoints a fresh 3-member cluster of --system is started for the run.
    Writes(WritesArgs),
    /// Leader failover time: kill -9 the leader until a write succeeds again, repeated.
    ///
    /// Always starts its own 3-member cluster, since it must kill and restart members.
    Failover(FailoverArgs),
    /// Both measurements on both systems in one run, with the targets checked.
    Compare(CompareArgs),
    /// Heartbeat capacity: N simulated agents at 1 Hz against a 3-member Strata cluster.
    Heartbeats(heartbeats::HeartbeatsArgs),
    /// Scale-up to Running and healthy, process and qemu drivers, with 1 controller and an agent.
    StartLatency(start_latency::StartLatencyArgs),
    /// Load-balancer pools: propagation to HAProxy, and throughput under pool churn against
    /// the reload approach.
    Pools(pools::PoolsArgs),
    /// The autoscaler's reaction time end to end: from a load step through HAProxy (wrk) to
    /// the first request a new instance serves, p50 over five steps.
    Reaction(reaction::ReactionArgs),
    /// Client-visible failover when the leader is cut off (not killed), both systems, each
    /// member in its own network namespace. Needs root.
    Partition(PartitionArgs),
    /// Fleet-scale state: 10,000 simulated nodes and 100,000 instances over 5,000 tiers
    /// through the real API and Raft; planner round, snapshot, restart, catch-up and RSS.
    Fleet(fleet::FleetArgs),
    /// What TLS costs: writes/s and heartbeat capacity, plain HTTP against mutual TLS, each
    /// on a fresh 3-member cluster in the same run.
    Tls(tls::TlsArgs),
    /// EC2 scale-out 0 -> 50 against moto through a proxy, clean and with 10% of calls
    /// throttled: time to all Running, calls per instance, duplicates.
    Ec2(ec2::Ec2Args),
    /// One planner round at fleet scale, in memory (no cluster): the state `fleet` reaches,
    /// built by applying commands, then steady `reconcile::plan` rounds timed in thread CPU.
    PlanRound(plan_round::PlanRoundArgs),
    /// Autoscaling simulator: load traces through Strata's planner, Kubernetes HPA defaults
    /// and AWS target tracking on the same simulated tier (simulated time; no cluster).
    Autoscale(autoscale::AutoscaleArgs),
}

#[derive(Args)]
struct PartitionArgs {
    /// Systems to run, in this order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "etcd,strata")]
    systems: Vec<System>,
    /// Leader cuts per system; the report gives the median.
    #[arg(long, default_value_t = 5)]
    cuts: usize,
    #[command(flatten)]
    binaries: BinaryArgs,
}

/// Both systems' partition reports.
#[derive(Serialize)]
struct PartitionComparison {
    #[serde(skip_serializing_if = "Option::is_none")]
    strata: Option<partition::PartitionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd: Option<partition::PartitionReport>,
    /// Strata's median under 1.5 s.
    target_met: Option<bool>,
    load_average_at_start: Option<[f64; 3]>,
}

#[derive(Args)]
struct WritesArgs {
    #[arg(long, value_enum)]
    system: System,
    /// Comma-separated base URLs of an already running cluster, e.g.
    /// http://127.0.0.1:7001,http://127.0.0.1:7002 (https://... with --ca-cert). Clients are
    /// spread over them round-robin.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// With --endpoints: the CA that signed the cluster's certificates (TLS on).
    #[arg(long, value_name = "FILE", requires = "endpoints")]
    ca_cert: Option<std::path::PathBuf>,
    /// With --ca-cert: a client certificate, for clusters that require one (--client-ca).
    #[arg(long, value_name = "FILE", requires = "ca_cert", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Bearer token for Strata writes (admin role); defaults to the one the benchmark gives
    /// the clusters it starts.
    #[arg(long, env = "STRATA_BENCH_TOKEN")]
    token: Option<String>,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    binaries: BinaryArgs,
}

#[derive(Args)]
struct LoadArgs {
    /// Concurrent clients, each with its own keep-alive connection and one write in flight.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measured window.
    #[arg(long, default_value = "20s")]
    duration: strata_api::Duration,
    /// Load before the measured window that is not counted.
    #[arg(long, default_value = "2s")]
    warmup: strata_api::Duration,
}

#[derive(Args)]
struct FailoverArgs {
    #[arg(long, value_enum)]
    system: System,
    /// How many times the leader is killed; the report gives the median.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    #[command(flatten)]
    binaries: BinaryArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// Systems to run, in this order. Ratios and target checks need both.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "etcd,strata")]
    systems: Vec<System>,
    /// Short CI mode: 8 clients, 1 s warm-up, 3 s of writes, 2 kills (unless set explicitly).
    #[arg(long)]
    smoke: bool,
    /// Concurrent clients [default: 64, smoke 8].
    #[arg(long)]
    clients: Option<usize>,
    /// Measured write window [default: 20s, smoke 3s].
    #[arg(long)]
    duration: Option<strata_api::Duration>,
    /// Uncounted warm-up [default: 2s, smoke 1s].
    #[arg(long)]
    warmup: Option<strata_api::Duration>,
    /// Leader kills per system [default: 5, smoke 2].
    #[arg(long)]
    kills: Option<usize>,
    #[command(flatten)]
    binaries: BinaryArgs,
}

#[derive(Args)]
struct BinaryArgs {
    /// strata-controller binary [default: next to this program, else target/release, else
    /// target/debug].
    #[arg(long)]
    strata_bin: Option<PathBuf>,
    /// etcd binary (3.4, Debian's etcd-server).
    #[arg(long, default_value = "etcd")]
    etcd_bin: PathBuf,
    /// Keep the clusters' data directories and logs after the run (their path goes to stderr).
    #[arg(long)]
    keep_dir: bool,
}

impl BinaryArgs {
    fn resolve(&self) -> Binaries {
        Binaries {
            strata: self.strata_bin.clone().unwrap_or_else(default_strata_bin),
            etcd: self.etcd_bin.clone(),
        }
    }
}

/// One system's results in a comparison.
#[derive(Serialize)]
struct SystemReport {
    writes: WritesReport,
    /// Every client writing one object (Strata: scale one tier; etcd: put one key).
    hot_object_writes: WritesReport,
    failover: FailoverReport,
}

#[derive(Serialize)]
struct CompareReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    strata: Option<SystemReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd: Option<SystemReport>,
    /// Strata's writes/s over etcd's; the target is at least 1.25.
    ratio_writes_per_sec: Option<f64>,
    /// Strata's p99 is no worse than etcd's.
    p99_ok: Option<bool>,
    /// Strata's failover median is under 1 s.
    failover_ok: Option<bool>,
    /// Hot-object writes/s, Strata's over etcd's; the target is at least 1.
    hot_ratio_writes_per_sec: Option<f64>,
    /// Strata's hot-object p99 is no worse than etcd's.
    hot_p99_ok: Option<bool>,
    /// ratio_writes_per_sec >= 1.25, p99_ok, failover_ok, hot ratio >= 1 and hot_p99_ok.
    targets_met: Option<bool>,
    smoke: bool,
    /// The machine's 1/5/15-minute load average when the run began: other work on a 2-core
    /// machine moves every figure, so a report says how quiet the machine was.
    load_average_at_start: Option<[f64; 3]>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run_until_signal(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_until_signal(command: Command) -> Result<()> {
    // Every cluster lives inside `run`; leaving it by ctrl-c or SIGTERM drops the future and
    // with it the clusters, which kill their processes and remove their directories.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        result = run(command) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = terminate.recv() => bail!("terminated"),
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Writes(args) => {
            let transport = strata_api::tls::Transport::from_flags(
                args.ca_cert.as_deref(),
                args.tls_cert.as_deref(),
                args.tls_key.as_deref(),
            )?;
            let config = WritesConfig {
                transport,
                clients: args.load.clients,
                duration: args.load.duration.as_std(),
                warmup: args.load.warmup.as_std(),
            };
            let report = if args.endpoints.is_empty() {
                let mut cluster = Cluster::start(
                    args.system,
                    &args.binaries.resolve(),
                    args.binaries.keep_dir,
                )
                .await?;
                let writer = Writer::new(args.system, Some(STRATA_ADMIN_TOKEN.to_owned()));
                let report = run_writes(&mut cluster, &writer, &config).await;
                cluster.shutdown().await;
                report?
            } else {
                let token = args.token.unwrap_or_else(|| STRATA_ADMIN_TOKEN.to_owned());
                let writer = Writer::new(args.system, Some(token));
                let endpoints = args
                    .endpoints
                    .iter()
                    .map(|e| e.trim_end_matches('/').to_owned())
                    .collect::<Vec<_>>();
                writes::run(&writer, &endpoints, &config).await?
            };
            print_json(&report)
        }
        Command::Failover(args) => {
            let mut cluster = Cluster::start(
                args.system,
                &args.binaries.resolve(),
                args.binaries.keep_dir,
            )
            .await?;
            let writer = Writer::new(args.system, Some(STRATA_ADMIN_TOKEN.to_owned()));
            let report = failover::run(&mut cluster, &writer, args.kills).await;
            cluster.shutdown().await;
            print_json(&report?)
        }
        Command::Compare(args) => compare(args).await,
        Command::Fleet(args) => print_json(&fleet::run_cli(args).await?),
        Command::Tls(args) => print_json(&tls::run_cli(args).await?),
        Command::Ec2(args) => print_json(&ec2::run_cli(args).await?),
        Command::PlanRound(args) => print_json(&plan_round::run_cli(args)?),
        Command::Partition(args) => {
            let mut report = PartitionComparison {
                strata: None,
                etcd: None,
                target_met: None,
                load_average_at_start: load_average(),
            };
            let binaries = args.binaries.resolve();
            let mut systems = args.systems.clone();
            systems.dedup();
            for system in systems {
                eprintln!("[{}] 3 members in network namespaces", system.name());
                let result =
                    partition::run(system, &binaries, args.binaries.keep_dir, args.cuts).await?;
                match system {
                    System::Strata => {
                        report.target_met = Some(result.median_ms < partition::TARGET_MEDIAN_MS);
                        report.strata = Some(result);
                    }
                    System::Etcd => report.etcd = Some(result),
                }
            }
            print_json(&report)
        }
        Command::Heartbeats(args) => print_json(&heartbeats::run_cli(args).await?),
        Command::StartLatency(args) => print_json(&start_latency::run_cli(args).await?),
        Command::Pools(args) => print_json(&pools::run_cli(args).await?),
        Command::Reaction(args) => print_json(&reaction::run_cli(args).await?),
        Command::Autoscale(args) => print_json(&autoscale::run_cli(args)?),
    }
}

pub(crate) async fn run_writes(
    cluster: &mut Cluster,
    writer: &Writer,
    config: &WritesConfig,
) -> Result<WritesReport> {
    eprintln!(
        "[{}] writes: {} clients, {:?} warm-up, {:?} measured",
        cluster.system.name(),
        config.clients,
        config.warmup,
        config.duration
    );
    let server_cpu_before = cluster.cpu_seconds();
    let client_cpu_before = cluster::process_cpu_seconds("/proc/self/stat");
    let mut report = writes::run(writer, &cluster.endpoints(), config).await?;
    // A member that crashed under load would make the figures meaningless.
    cluster.check_alive()?;
    let cpu_used = |before: Option<f64>, after: Option<f64>| Some(writes::round2(after? - before?));
    report.server_cpu_s = cpu_used(server_cpu_before, cluster.cpu_seconds());
    report.client_cpu_s = cpu_used(
        client_cpu_before,
        cluster::process_cpu_seconds("/proc/self/stat"),
    );
    eprintln!(
        "[{}] {} writes/s, p50 {} ms, p99 {} ms, {} errors, CPU s: servers {:?}, client {:?}",
        report.system,
        report.writes_per_sec,
        report.p50_ms,
        report.p99_ms,
        report.errors,
        report.server_cpu_s,
        report.client_cpu_s
    );
    Ok(report)
}

async fn compare(args: CompareArgs) -> Result<()> {
    let smoke = args.smoke;
    let config = WritesConfig {
        transport: strata_api::tls::Transport::Plain,
        clients: args.clients.unwrap_or(if smoke { 8 } else { 64 }),
        duration: args
            .duration
            .map_or(Duration::from_secs(if smoke { 3 } else { 20 }), |d| {
                d.as_std()
            }),
        warmup: args
            .warmup
            .map_or(Duration::from_secs(if smoke { 1 } else { 2 }), |d| {
                d.as_std()
            }),
    };
    let kills = args.kills.unwrap_or(if smoke { 2 } else { 5 });
    let binaries = args.binaries.resolve();

    let mut report = CompareReport {
        strata: None,
        etcd: None,
        ratio_writes_per_sec: None,
        p99_ok: None,
        failover_ok: None,
        hot_ratio_writes_per_sec: None,
        hot_p99_ok: None,
        targets_met: None,
        smoke,
        load_average_at_start: load_average(),
    };
    let mut systems = args.systems.clone();
    systems.dedup();
    for system in systems {
        eprintln!("[{}] starting a 3-member cluster", system.name());
        let mut cluster = Cluster::start(system, &binaries, args.binaries.keep_dir).await?;
        let writer = Writer::new(system, Some(STRATA_ADMIN_TOKEN.to_owned()));
        let result = async {
            let writes = run_writes(&mut cluster, &writer, &config).await?;
            let hot = Writer::hot(system, Some(STRATA_ADMIN_TOKEN.to_owned()));
            hot.prepare(&cluster.transport, &cluster.endpoints()[0])
                .await?;
            eprintln!("[{}] hot object", system.name());
            let hot_object_writes = run_writes(&mut cluster, &hot, &config).await?;
            let failover = failover::run(&mut cluster, &writer, kills).await?;
            anyhow::Ok(SystemReport {
                writes,
                hot_object_writes,
                failover,
            })
        }
        .await;
        if result.is_err() {
            if let Some(dir) = cluster.data_dir() {
                eprintln!("[{}] failed; logs were in {}", system.name(), dir.display());
            }
        }
        cluster.shutdown().await;
        let result = result?;
        match system {
            System::Strata => report.strata = Some(result),
            System::Etcd => report.etcd = Some(result),
        }
    }
    if let (Some(strata), Some(etcd)) = (&report.strata, &report.etcd) {
        let ratio = if etcd.writes.writes_per_sec > 0.0 {
            writes::round2(strata.writes.writes_per_sec / etcd.writes.writes_per_sec)
        } else {
            0.0
        };
        let p99_ok = strata.writes.p99_ms <= etcd.writes.p99_ms;
        let failover_ok = strata.failover.median_ms < TARGET_FAILOVER_MEDIAN_MS;
        report.ratio_writes_per_sec = Some(ratio);
        report.p99_ok = Some(p99_ok);
        report.failover_ok = Some(failover_ok);
        let (hot, etcd_hot) = (&strata.hot_object_writes, &etcd.hot_object_writes);
        let hot_ratio = if etcd_hot.writes_per_sec > 0.0 {
            writes::round2(hot.writes_per_sec / etcd_hot.writes_per_sec)
        } else {
            0.0
        };
        let hot_p99_ok = hot.p99_ms <= etcd_hot.p99_ms;
        report.hot_ratio_writes_per_sec = Some(hot_ratio);
        report.hot_p99_ok = Some(hot_p99_ok);
        report.targets_met = Some(
            ratio >= TARGET_WRITES_RATIO && p99_ok && failover_ok && hot_ratio >= 1.0 && hot_p99_ok,
        );
    }
    print_json(&report)
}

/// Linux's `/proc/loadavg`; `None` elsewhere.
pub(crate) fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("serialize report")?;
    println!("{text}");
    Ok(())
}

/// `cargo run --release -p strata-bench` puts both binaries in the same directory, so look
/// next to this program first, then in the workspace's release and debug targets.
pub(crate) fn default_strata_bin() -> PathBuf {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("strata-controller"));
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    candidates.push(target.join("release/strata-controller"));
    candidates.push(target.join("debug/strata-controller"));
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .unwrap_or_else(|| PathBuf::from("strata-controller"))
}

//! What TLS costs: write throughput and heartbeat capacity of a 3-member Strata cluster
//! serving plain HTTP (`--insecure-http`) and of one serving mutual TLS (`--tls-cert`,
//! `--client-ca`, clients and peers presenting certificates of a development CA), measured
//! the same way in one run. Each mode gets a fresh cluster: the writes first (as
//! `strata-bench writes`: N clients, each its own keep-alive connection), then N simulated
//! agents heartbeating at 1 Hz (as `strata-bench heartbeats`). Connections are kept alive in
//! both, as every Strata client does, so the handshake is paid once per connection and the
//! figures show the steady cost of encryption.
//!
//! Writes are measured in `--rounds` rounds, each a plain window then a TLS window (fresh
//! clusters each), and judged on the median of the rounds' ratios: on this shared 2-core
//! machine one window's writes/s moves by about 10% from one to the next, so a single pair of
//! windows can show either mode ahead by chance. Heartbeats are measured in the first round.

use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::cluster::{Binaries, Cluster, STRATA_ADMIN_TOKEN};
use crate::heartbeats::{self, HeartbeatRun, HeartbeatsConfig};
use crate::system::{System, Writer};
use crate::writes::{round2, WritesConfig, WritesReport};

/// TLS may cost at most this share of the writes per second.
const TARGET_WRITES_LOSS: f64 = 0.15;
/// With TLS, heartbeats of this many agents stay under this p99.
const TARGET_AGENTS: usize = 10_000;
const TARGET_P99_MS: f64 = 50.0;

/// `strata-bench tls`.
#[derive(clap::Args)]
pub struct TlsArgs {
    /// Concurrent write clients [default: 64; smoke 8].
    #[arg(long)]
    clients: Option<usize>,
    /// Measured write window [default: 20s; smoke 3s].
    #[arg(long)]
    duration: Option<strata_api::Duration>,
    /// Simulated agents [default: 10000; smoke 200].
    #[arg(long)]
    agents: Option<usize>,
    /// Measured heartbeat window [default: 20s; smoke 3s].
    #[arg(long)]
    heartbeat_duration: Option<strata_api::Duration>,
    /// Rounds of one plain and one TLS write window; the ratio is their median [default: 3;
    /// smoke 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Short CI mode.
    #[arg(long)]
    smoke: bool,
    #[command(flatten)]
    binaries: crate::BinaryArgs,
}

#[derive(Serialize)]
pub struct ModeReport {
    pub writes: WritesReport,
    /// Measured in the first round only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeats: Option<HeartbeatRun>,
}

/// One round: a plain window, then a TLS window.
#[derive(Serialize)]
pub struct Round {
    pub plain: ModeReport,
    pub tls: ModeReport,
    /// TLS writes/s over plain writes/s in this round.
    pub writes_ratio: f64,
    /// Server CPU per write (the three members together), plain then TLS.
    pub server_cpu_ms_per_write: [Option<f64>; 2],
}

#[derive(Serialize)]
pub struct TlsReport {
    pub rounds: Vec<Round>,
    /// The median of the rounds' TLS/plain writes/s ratios: what the target judges.
    pub writes_ratio: f64,
    /// Every round's TLS writes over every round's plain writes.
    pub writes_ratio_of_totals: f64,
    pub target: String,
    pub writes_target_met: bool,
    /// `None` below the target's agent count.
    pub heartbeats_target_met: Option<bool>,
    pub smoke: bool,
    pub load_average_at_start: Option<[f64; 3]>,
}

pub async fn run_cli(args: TlsArgs) -> Result<TlsReport> {
    let smoke = args.smoke;
    let seconds = |given: Option<strata_api::Duration>| {
        given.map_or(Duration::from_secs(if smoke { 3 } else { 20 }), |d| {
            d.as_std()
        })
    };
    let writes = WritesConfig {
        transport: strata_api::tls::Transport::Plain,
        clients: args.clients.unwrap_or(if smoke { 8 } else { 64 }),
        duration: seconds(args.duration),
        warmup: Duration::from_secs(if smoke { 1 } else { 2 }),
    };
    let agents = args
        .agents
        .unwrap_or(if smoke { 200 } else { TARGET_AGENTS });
    let beats = HeartbeatsConfig {
        agents: vec![agents],
        interval: Duration::from_secs(1),
        warmup: Duration::from_secs(if smoke { 1 } else { 5 }),
        duration: seconds(args.heartbeat_duration),
        pool: 64,
        timeout: Duration::from_secs(1),
        keep_dir: args.binaries.keep_dir,
    };
    let binaries = args.binaries.resolve();
    let load_average_at_start = crate::load_average();
    let rounds_wanted = args.rounds.unwrap_or(if smoke { 1 } else { 3 }).max(1);
    let mut rounds = Vec::new();
    for round in 0..rounds_wanted {
        eprintln!("[tls] round {} of {rounds_wanted}", round + 1);
        let with_beats = round == 0;
        let plain = measure(&binaries, false, &writes, &beats, with_beats).await?;
        let tls = measure(&binaries, true, &writes, &beats, with_beats).await?;
        let per_write = |mode: &ModeReport| {
            let count = mode.writes.writes.max(1) as f64;
            mode.writes
                .server_cpu_s
                .map(|cpu| (cpu * 1000.0 / count * 1000.0).round() / 1000.0)
        };
        rounds.push(Round {
            writes_ratio: ratio(tls.writes.writes_per_sec, plain.writes.writes_per_sec),
            server_cpu_ms_per_write: [per_write(&plain), per_write(&tls)],
            plain,
            tls,
        });
    }
    let mut ratios: Vec<f64> = rounds.iter().map(|round| round.writes_ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let writes_ratio = if ratios.len() % 2 == 1 {
        ratios[ratios.len() / 2]
    } else {
        round2((ratios[ratios.len() / 2 - 1] + ratios[ratios.len() / 2]) / 2.0)
    };
    let total = |pick: fn(&Round) -> &ModeReport| -> f64 {
        rounds
            .iter()
            .map(|round| pick(round).writes.writes_per_sec)
            .sum()
    };
    let writes_ratio_of_totals = ratio(total(|round| &round.tls), total(|round| &round.plain));
    let heartbeats_target_met = (agents >= TARGET_AGENTS).then(|| {
        rounds[0]
            .tls
            .heartbeats
            .as_ref()
            .is_some_and(|beats| beats.p99_ms < TARGET_P99_MS && beats.errors == 0)
    });
    Ok(TlsReport {
        writes_target_met: writes_ratio >= 1.0 - TARGET_WRITES_LOSS,
        heartbeats_target_met,
        writes_ratio,
        writes_ratio_of_totals,
        rounds,
        target: format!(
            "TLS costs at most {}% of writes/s; {TARGET_AGENTS} agents' heartbeats under {TARGET_P99_MS} ms p99 with TLS",
            TARGET_WRITES_LOSS * 100.0
        ),
        smoke,
        load_average_at_start,
    })
}

fn ratio(tls: f64, plain: f64) -> f64 {
    if plain > 0.0 {
        round2(tls / plain)
    } else {
        0.0
    }
}

async fn measure(
    binaries: &Binaries,
    tls: bool,
    writes: &WritesConfig,
    beats: &HeartbeatsConfig,
    with_beats: bool,
) -> Result<ModeReport> {
    let mode = if tls { "tls" } else { "plain" };
    eprintln!("[tls] {mode}: starting a 3-member cluster");
    let mut cluster = if tls {
        Cluster::start_tls(binaries, beats.keep_dir).await?
    } else {
        Cluster::start(System::Strata, binaries, beats.keep_dir).await?
    };
    let result = async {
        let config = WritesConfig {
            transport: cluster.transport.clone(),
            ..writes.clone()
        };
        let writer = Writer::new(System::Strata, Some(STRATA_ADMIN_TOKEN.to_owned()));
        let writes = crate::run_writes(&mut cluster, &writer, &config).await?;
        eprintln!(
            "[tls] {mode}: {} writes/s (p99 {} ms)",
            writes.writes_per_sec, writes.p99_ms
        );
        let heartbeats = if with_beats {
            let agents = beats.agents.first().copied().unwrap_or(1);
            eprintln!("[tls] {mode}: {agents} simulated agents");
            let run = heartbeats::measure(&mut cluster, agents, beats).await?;
            eprintln!(
                "[tls] {mode}: heartbeats p99 {} ms, {} errors",
                run.p99_ms, run.errors
            );
            Some(run)
        } else {
            None
        };
        anyhow::Ok(ModeReport { writes, heartbeats })
    }
    .await;
    if result.is_err() {
        if let Some(dir) = cluster.data_dir() {
            eprintln!("[tls] {mode} failed; logs were in {}", dir.display());
        }
    }
    cluster.shutdown().await;
    result
}

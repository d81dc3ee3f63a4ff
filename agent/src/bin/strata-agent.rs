//! `strata-agent`: runs this host's instances. See `strata_agent::standalone`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use strata_agent::driver::{AccelChoice, QemuConfig};
use strata_agent::standalone::{self, StandaloneConfig};
use strata_agent::SupervisorConfig;

/// The Strata agent: starts, supervises and health-checks this host's instances (process or
/// qemu drivers), and reports host and instance metrics.
///
/// This build runs standalone: it converges to the instances listed in --assignments (a JSON
/// array of {instance_id, tier, template, health}, re-read every interval) and prints each
/// heartbeat as a JSON line on stdout. Instances survive an agent restart: the next agent
/// process adopts them from --data-dir. SIGTERM/SIGINT stop the agent, not the instances.
#[derive(Debug, Parser)]
#[command(name = "strata-agent", version)]
struct Args {
    /// This node's name.
    #[arg(long, env = "STRATA_NODE_ID")]
    node_id: String,
    /// State directory: one record per instance, and the instances' logs.
    #[arg(long, env = "STRATA_DATA_DIR")]
    data_dir: PathBuf,
    /// JSON file with the instances this node must run.
    #[arg(long)]
    assignments: PathBuf,
    /// Address instances are reached at; their ports are allocated on it.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    advertise_ip: IpAddr,
    /// Time between two converge-and-report ticks, like 1s or 500ms.
    #[arg(long, default_value = "1s")]
    heartbeat_interval: strata_api::Duration,
    /// Time an instance gets to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s")]
    stop_grace: strata_api::Duration,
    /// The qemu binary for the qemu driver.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_binary: PathBuf,
    /// qemu accelerator: auto uses KVM only where a KVM guest can run, else TCG.
    #[arg(long, value_enum, default_value = "auto")]
    qemu_accel: Accel,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout carries the heartbeat lines.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = StandaloneConfig {
        node_id: args.node_id,
        supervisor: SupervisorConfig {
            data_dir: args.data_dir,
            advertise_ip: args.advertise_ip,
            stop_grace: args.stop_grace.as_std(),
            qemu: QemuConfig {
                binary: args.qemu_binary,
                accel: match args.qemu_accel {
                    Accel::Auto => AccelChoice::Auto,
                    Accel::Kvm => AccelChoice::Kvm,
                    Accel::Tcg => AccelChoice::Tcg,
                },
            },
        },
        assignments: args.assignments,
        interval: args
            .heartbeat_interval
            .as_std()
            .max(std::time::Duration::from_millis(50)),
    };
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stopping the agent; instances keep running");
    };
    standalone::run(config, shutdown)
        .await
        .context("run agent")?;
    Ok(())
}

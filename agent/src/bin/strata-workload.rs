//! `strata-workload`: the HTTP app used as the VM payload. See `strata_agent::workload`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use strata_agent::workload::{self, WorkloadConfig};

/// A small HTTP server for Strata demos and tests.
///
/// GET / answers JSON with the instance id (?work_ms=N burns N ms of CPU first);
/// GET /healthz answers 200, or 503 after POST /fail until POST /recover.
/// SIGTERM or SIGINT stop it after the requests in flight finish.
#[derive(Debug, Parser)]
#[command(name = "strata-workload", version)]
struct Args {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind: IpAddr,
    /// Identity reported by GET / (defaults to the host name).
    #[arg(long, env = "STRATA_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Upper bound of ?work_ms, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    max_work_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let address = SocketAddr::new(args.bind, args.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listen on {address}"))?;
    let instance_id = args
        .instance_id
        .filter(|id| !id.is_empty())
        .unwrap_or_else(workload::default_instance_id);
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: finishing requests in flight"),
            _ = interrupt.recv() => tracing::info!("SIGINT: finishing requests in flight"),
        }
    };
    // Printed for humans and for the guest's serial console.
    println!(
        "strata-workload listening on {} as {instance_id}",
        listener.local_addr().context("read listen address")?
    );
    workload::run(
        listener,
        WorkloadConfig {
            instance_id,
            max_work: Duration::from_millis(args.max_work_ms),
        },
        shutdown,
    )
    .await
    .context("serve")?;
    tracing::info!("stopped");
    Ok(())
}

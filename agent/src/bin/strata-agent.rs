//! `strata-agent`: runs this host's instances. See `strata_agent::standalone`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use strata_agent::connected::{self, ConnectedConfig};
use strata_agent::driver::{AccelChoice, QemuConfig};
use strata_agent::lb::LbConfig;
use strata_agent::standalone::{self, StandaloneConfig};
use strata_agent::SupervisorConfig;
use strata_api::tls::Transport;

/// The Strata agent: registers this host with the controllers, heartbeats (host metrics and
/// the phase, health and CPU of each instance), and starts, supervises and health-checks the
/// instances the controllers assign to it (process or qemu drivers).
///
/// Instances survive an agent restart: the next agent process adopts them from --data-dir and
/// starts no duplicates. SIGTERM/SIGINT stop the agent, not the instances.
///
/// With --assignments FILE instead of --controllers, the agent runs standalone: it converges to
/// the instances listed in FILE (a JSON array of {instance_id, tier, template, health}, re-read
/// every interval) and prints each heartbeat as a JSON line on stdout.
///
/// With --lb haproxy the node is a load balancer instead of a worker: the agent runs its own
/// HAProxy (master-worker, files and sockets in --lb-state-dir), serves every tier's pool from
/// the heartbeat answers, applies pool changes through HAProxy's Runtime API without a reload,
/// restarts HAProxy if it dies, and reports HAProxy's statistics in its heartbeats. HAProxy
/// is stopped with the agent.
#[derive(Debug, Parser)]
#[command(name = "strata-agent", version)]
struct Args {
    /// This node's name, a DNS label (lowercase letters, digits, '-').
    #[arg(long, env = "STRATA_NODE_ID")]
    node_id: String,
    /// Controller addresses (host:port, or https://host:port with --ca-cert), comma
    /// separated; any of them will do.
    #[arg(
        long,
        env = "STRATA_CONTROLLERS",
        value_delimiter = ',',
        required_unless_present = "assignments"
    )]
    controllers: Vec<String>,
    /// The cluster's join token (the controllers' --join-token). It is used only to register
    /// once: the node then gets its own credential, kept in DATA_DIR/node-credential (0600).
    /// Prefer --join-token-file: a flag shows in `ps`, an environment variable in
    /// /proc/PID/environ.
    #[arg(
        long,
        env = "STRATA_JOIN_TOKEN",
        hide_env_values = true,
        required_unless_present_any = ["assignments", "join_token_file"]
    )]
    join_token: Option<String>,
    /// A file holding the join token (its first line).
    #[arg(long, env = "STRATA_JOIN_TOKEN_FILE", conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// The CA that signed the controllers' certificates: the agent talks TLS to them.
    #[arg(long, env = "STRATA_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// This node's client certificate (PEM), for controllers that require one (--client-ca).
    #[arg(
        long,
        env = "STRATA_TLS_CERT",
        requires = "tls_key",
        value_name = "FILE"
    )]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        env = "STRATA_TLS_KEY",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    tls_key: Option<PathBuf>,
    /// When the agent runs as root: the user process instances run as unless their template
    /// names one (`template.user`).
    #[arg(long, env = "STRATA_RUN_AS")]
    run_as: Option<String>,
    /// State directory: one record per instance, and the instances' logs.
    #[arg(long, env = "STRATA_DATA_DIR")]
    data_dir: PathBuf,
    /// Failure zone of this host, for spreading tiers across zones.
    #[arg(long, env = "STRATA_ZONE")]
    zone: Option<String>,
    /// Node labels as k=v pairs, comma separated; tiers can require them.
    #[arg(long, env = "STRATA_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Address instances are reached at; their ports are allocated on it.
    #[arg(long, env = "STRATA_ADVERTISE_IP", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    advertise_ip: IpAddr,
    /// Ports given to instances, as LOW-HIGH. Keep it outside the kernel's ephemeral range
    /// (net.ipv4.ip_local_port_range) so outgoing connections cannot take an allocated port.
    #[arg(long, env = "STRATA_INSTANCE_PORTS", default_value = "20000-32000", value_parser = parse_port_range)]
    instance_ports: std::ops::RangeInclusive<u16>,
    /// CPU cores offered to instances (default: all of this host's).
    #[arg(long, env = "STRATA_CPU")]
    cpu: Option<f64>,
    /// Memory offered to instances, in MiB (default: this host's total).
    #[arg(long, env = "STRATA_MEMORY_MB")]
    memory_mb: Option<u64>,
    /// Time between two heartbeats, like 1s or 500ms.
    #[arg(long, env = "STRATA_HEARTBEAT_INTERVAL", default_value = "1s")]
    heartbeat_interval: strata_api::Duration,
    /// Standalone mode: JSON file with the instances this node must run (no controllers).
    #[arg(long, conflicts_with_all = ["controllers", "join_token", "join_token_file"])]
    assignments: Option<PathBuf>,
    /// Time an instance gets to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value = "10s")]
    stop_grace: strata_api::Duration,
    /// The qemu binary for the qemu driver.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_binary: PathBuf,
    /// qemu accelerator: auto uses KVM only where a KVM guest can run, else TCG.
    #[arg(long, value_enum, default_value = "auto")]
    qemu_accel: Accel,
    /// Run the load-balancer role with this balancer (registers the node as a load balancer,
    /// not a worker).
    #[arg(long, value_enum, conflicts_with = "assignments")]
    lb: Option<LbKind>,
    /// The HAProxy binary for --lb haproxy (HAProxy 2.6 or later).
    #[arg(long, env = "STRATA_HAPROXY_BIN", default_value = "haproxy")]
    haproxy_bin: PathBuf,
    /// Where --lb keeps haproxy.cfg, its sockets and its log (default: DATA_DIR/lb).
    #[arg(long, env = "STRATA_LB_STATE_DIR")]
    lb_state_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LbKind {
    Haproxy,
}

/// The controllers as `host:port` (how leader hints name them too): an `http://` or
/// `https://` prefix is dropped once it agrees with the transport.
fn controller_addresses(given: &[String], transport: &Transport) -> anyhow::Result<Vec<String>> {
    given
        .iter()
        .map(|address| {
            let address = address.trim().trim_end_matches('/');
            let (scheme, rest) = match address.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, address),
            };
            match scheme {
                None => Ok(rest.to_string()),
                Some(scheme) if scheme == transport.scheme() => Ok(rest.to_string()),
                Some("https") => {
                    anyhow::bail!("{address}: https needs --ca-cert, the CA that signed the controllers' certificates")
                }
                Some(scheme) => anyhow::bail!(
                    "{address}: the agent talks {} to its controllers, not {scheme}",
                    transport.scheme()
                ),
            }
        })
        .collect()
}

fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not LOW-HIGH, like 20000-32000"))?;
    let port = |s: &str| {
        s.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?} is not a port (1-65535)"))
    };
    let (low, high) = (port(low)?, port(high)?);
    if low == 0 || low > high {
        return Err(format!(
            "{text:?} is empty: LOW must be at least 1 and at most HIGH"
        ));
    }
    Ok(low..=high)
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    if !strata_api::validate::is_label_key(key) {
        return Err(format!("{key:?} is not a valid label key"));
    }
    if !strata_api::validate::is_label_value(value) {
        return Err(format!("{value:?} is not a valid label value"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// The first line of `path`, trimmed.
fn read_secret_file(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read secret file {}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        anyhow::bail!("secret file {} is empty", path.display());
    }
    Ok(secret)
}

fn host_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
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
    if !strata_api::validate::is_dns_label(&args.node_id) {
        anyhow::bail!(
            "--node-id {:?} must be a DNS label (lowercase letters, digits, '-')",
            args.node_id
        );
    }
    let lb = args.lb.map(|LbKind::Haproxy| {
        LbConfig::new(
            args.haproxy_bin.clone(),
            args.lb_state_dir
                .clone()
                .unwrap_or_else(|| args.data_dir.join("lb")),
        )
    });
    if let Some(user) = &args.run_as {
        if !strata_api::validate::is_user_name(user) {
            anyhow::bail!("--run-as {user:?} is not a user name");
        }
    }
    let join_token = match (&args.join_token_file, args.join_token) {
        (Some(path), _) => read_secret_file(path)?,
        (None, token) => token.unwrap_or_default(),
    };
    let transport = Transport::from_flags(
        args.ca_cert.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
    )?;
    let controllers = controller_addresses(&args.controllers, &transport)?;
    let supervisor = SupervisorConfig {
        data_dir: args.data_dir,
        run_as: args.run_as,
        advertise_ip: args.advertise_ip,
        instance_ports: args.instance_ports,
        stop_grace: args.stop_grace.as_std(),
        qemu: QemuConfig {
            binary: args.qemu_binary,
            accel: match args.qemu_accel {
                Accel::Auto => AccelChoice::Auto,
                Accel::Kvm => AccelChoice::Kvm,
                Accel::Tcg => AccelChoice::Tcg,
            },
        },
    };
    let interval = args
        .heartbeat_interval
        .as_std()
        .max(std::time::Duration::from_millis(50));
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stopping the agent; instances keep running (HAProxy stops)");
    };
    match args.assignments {
        Some(assignments) => standalone::run(
            StandaloneConfig {
                node_id: args.node_id,
                supervisor,
                assignments,
                interval,
            },
            shutdown,
        )
        .await
        .context("run agent")?,
        None => {
            let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            connected::run(
                ConnectedConfig {
                    node_id: args.node_id,
                    controllers,
                    join_token,
                    transport,
                    zone: args.zone,
                    labels: args.labels.into_iter().collect(),
                    capacity: strata_api::Resources {
                        cpu: args.cpu.unwrap_or(cpus as f64),
                        memory_mb: args.memory_mb.unwrap_or_else(host_memory_mb),
                    },
                    supervisor,
                    interval,
                    lb,
                },
                shutdown,
            )
            .await
            .context("run agent")?
        }
    }
    Ok(())
}

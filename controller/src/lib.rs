//! The Strata controller: a Raft node (openraft) whose log, vote and snapshots live in SQLite
//! (sqlx), the REST API (axum), and later the reconcilers that run on the leader.
//!
//! Layout:
//! - `config`: command line and environment.
//! - `state`: the replicated state machine: a closed `Command` enum and its deterministic
//!   `apply`. No IO.
//! - `store`: the only module that knows sqlx: log storage, vote, snapshots, the state machine
//!   store openraft drives.
//! - `tls`: the server's TLS (`--tls-cert`, mutual with `--client-ca`) and the peer calls'.
//! - `network`: Raft RPCs and forwarded requests to peers over HTTP.
//! - `node`: a running node: start and bootstrap, the write path (propose, forward to the
//!   leader) and the read path (ReadIndex).
//! - `forward`: a follower's forwarding of client writes to the leader, several per request.
//! - `batch`: gathering queued items into batches, for the batcher and the forwarder.
//! - `http`: the only module that knows axum: `/v1`, `/raft`, health and metrics.
//! - `views`: read models (tier and node views, assignments, pools) that the API, the
//!   heartbeat answer, the planners and metrics share.
//! - `autoscaler`: the leader's autoscaling loop: metric windows in memory, the planner in
//!   `reconcile::autoscale` every second, a Raft command when a desired count changes.
//! - `metrics`: Prometheus text.
//! - `provider`: executors of the provider planners (`provider::ec2`: EC2 calls on the leader,
//!   through the `strata-ec2` crate).
//!
//! `run` wires them together; the binary only parses flags and calls it.

pub mod agents;
pub mod autoscaler;
pub mod batch;
pub mod config;
pub mod forward;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod network;
pub mod node;
pub mod provider;
pub mod quorum;
pub mod raft_types;
pub mod reconcile;
pub mod state;
pub mod store;
pub mod tls;
pub mod views;

use std::future::Future;
use std::path::Path;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::Config;
pub use node::{Controller, Tokens};

/// Runs a controller node on `listener` until `shutdown` completes, then stops serving and
/// shuts Raft down.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = tls::TlsSetup::from_config(&config)?;
    let tokens = load_tokens(&config).await?;
    let tokens_join = tokens.join.clone();
    let controllers: Vec<String> = match &config.peers {
        Some(peers) => peers.0.values().cloned().collect(),
        None => vec![config.advertised_address()],
    };
    let controller = Controller::start(&config, tokens, tls.peers.clone()).await?;
    let address = listener.local_addr().context("read listener address")?;
    tracing::info!(
        node = config.node_id,
        %address,
        tls = tls.acceptor.is_some(),
        mutual = config.client_ca.is_some(),
        "serving the API and peer traffic"
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let reconciler = tokio::spawn(agents::run_reconciler(
        controller.clone(),
        agents::ReconcileConfig {
            interval: config.reconcile_interval.as_std(),
            plan: reconcile::PlanConfig {
                heartbeat_grace_ms: config.heartbeat_grace.as_millis(),
                ..reconcile::PlanConfig::default()
            },
        },
        stop.clone(),
    ));
    let autoscaler = tokio::spawn(autoscaler::run(
        controller.clone(),
        autoscaler::EVALUATION_INTERVAL,
        stop.clone(),
    ));
    let snapshots = {
        let controller = controller.clone();
        let limit = config.snapshot_log_mib.max(1).saturating_mul(1024 * 1024);
        let stop = stop.clone();
        tokio::spawn(async move { controller.snapshot_by_size(limit, stop).await })
    };
    let reload = tokio::spawn(reload_on_sighup(
        controller.tokens.join.clone(),
        config.join_token_file.clone(),
        stop.clone(),
    ));
    let ec2 = {
        let ec2 = strata_ec2::Ec2::connect(&strata_ec2::Ec2Config {
            endpoint: config.ec2_endpoint.clone(),
            region: config.aws_region.clone(),
            calls_per_second: config.ec2_calls_per_second,
            burst: config.ec2_burst,
            ..strata_ec2::Ec2Config::default()
        })
        .await;
        let executor = provider::ec2::ExecutorConfig {
            cluster: config.cluster_name.clone(),
            interval: config.ec2_interval.as_std(),
            sync: reconcile::ec2::SyncConfig {
                unknown_grace_ms: config.ec2_unknown_grace.as_millis(),
            },
            join_token: tokens_join.clone(),
            controllers: controllers.clone(),
            agent_tls: agent_tls(&config, tls.acceptor.is_some()),
        };
        tokio::spawn(provider::ec2::run(
            controller.clone(),
            ec2,
            executor,
            stop.clone(),
        ))
    };
    let app = http::router(controller.clone());
    let served = http::serve::serve(
        listener,
        app,
        http::serve::ServeConfig {
            header_timeout: config.header_timeout.as_std(),
            body_timeout: config.body_timeout.as_std(),
            max_connections: config.max_connections,
            tls: tls.acceptor.clone(),
        },
        shutdown,
    )
    .await
    .context("serve http");
    stop.cancel();
    if let Err(error) = reconciler.await {
        tracing::warn!(%error, "stop the reconciler");
    }
    if let Err(error) = ec2.await {
        tracing::warn!(%error, "stop the EC2 executor");
    }
    if let Err(error) = autoscaler.await {
        tracing::warn!(%error, "stop the autoscaler");
    }
    if let Err(error) = snapshots.await {
        tracing::warn!(%error, "stop the snapshot trigger");
    }
    if let Err(error) = reload.await {
        tracing::warn!(%error, "stop the SIGHUP handler");
    }
    if let Err(error) = controller.raft.shutdown().await {
        tracing::warn!(%error, "stop raft");
    }
    served
}

/// Re-reads `--join-token-file` on every SIGHUP, so the join token can be rotated without a
/// restart; registrations with the old token are refused from then on (registered nodes keep
/// their credentials).
async fn reload_on_sighup(
    join: node::JoinToken,
    file: Option<std::path::PathBuf>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "install SIGHUP handler");
            return;
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = hangups.recv() => {}
        }
        let Some(path) = &file else {
            tracing::info!("SIGHUP: no --join-token-file to re-read");
            continue;
        };
        match config::read_secret_file(path) {
            Ok(token) => {
                join.replace(token);
                tracing::info!(path = %path.display(), "SIGHUP: join token replaced");
            }
            Err(error) => tracing::warn!(%error, "SIGHUP: keep the current join token"),
        }
    }
}

/// How agents booted from EC2 user data reach this cluster: HTTPS when it serves TLS,
/// trusting the CA of the controllers' certificates (`--ca-cert`, else `--client-ca`; the
/// file was loaded by `TlsSetup` already).
fn agent_tls(config: &Config, serves_tls: bool) -> provider::ec2::AgentTls {
    if !serves_tls {
        return provider::ec2::AgentTls::Plain;
    }
    provider::ec2::AgentTls::Https {
        ca_file: config.ca_cert.clone().or(config.client_ca.clone()),
        mutual: config.client_ca.is_some(),
    }
}

/// Reads the configured tokens, generating and keeping the ones that may be generated.
async fn load_tokens(config: &Config) -> anyhow::Result<Tokens> {
    create_private_dir(&config.data_dir)?;
    let from_file = |path: &Option<std::path::PathBuf>| -> anyhow::Result<Option<String>> {
        path.as_deref().map(config::read_secret_file).transpose()
    };
    let admin_token = from_file(&config.admin_token_file)?.or(config.admin_token.clone());
    let viewer_token = from_file(&config.viewer_token_file)?.or(config.viewer_token.clone());
    let cluster_secret = from_file(&config.cluster_secret_file)?.or(config.cluster_secret.clone());
    let join_token = from_file(&config.join_token_file)?.or(config.join_token.clone());
    let admin = match &admin_token {
        Some(token) => token.clone(),
        None => stored_secret(&config.data_dir, "admin-token").await?,
    };
    let cluster_secret = match (&cluster_secret, &config.peers) {
        (Some(secret), _) => secret.clone(),
        (None, None) => stored_secret(&config.data_dir, "cluster-secret").await?,
        (None, Some(_)) => anyhow::bail!(
            "--cluster-secret (or STRATA_CLUSTER_SECRET) is required with --peers: every node must share it"
        ),
    };
    let join = match (&join_token, &config.peers) {
        (Some(token), _) => token.clone(),
        (None, None) => stored_secret(&config.data_dir, "join-token").await?,
        (None, Some(_)) => anyhow::bail!(
            "--join-token (or STRATA_JOIN_TOKEN) is required with --peers: agents may talk to any node"
        ),
    };
    for (name, value) in [
        ("admin token", Some(&admin)),
        ("viewer token", viewer_token.as_ref()),
        ("cluster secret", Some(&cluster_secret)),
        ("join token", Some(&join)),
    ] {
        if value.is_some_and(|value| value.trim().is_empty()) {
            anyhow::bail!("the {name} must not be empty");
        }
    }
    Ok(Tokens {
        admin,
        viewer: viewer_token,
        cluster_secret,
        join: node::JoinToken::new(join),
    })
}

/// Creates `dir` (and its parents) and makes it readable by its owner only: it holds the
/// database and generated secrets.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("create data dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("make data dir {} private", dir.display()))
}

/// Returns the secret kept in `data_dir/name`, creating a random one (mode 0600) if missing.
async fn stored_secret(data_dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = data_dir.join(name);
    match tokio::fs::read_to_string(&path).await {
        Ok(secret) if !secret.trim().is_empty() => return Ok(secret.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(0o600);
    let mut file = options
        .open(&path)
        .await
        .with_context(|| format!("create {}", path.display()))?;
    use tokio::io::AsyncWriteExt;
    file.write_all(format!("{secret}\n").as_bytes())
        .await
        .with_context(|| format!("write {}", path.display()))?;
    file.sync_all()
        .await
        .with_context(|| format!("sync {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated {name}");
    Ok(secret)
}

//! Command-line and environment configuration of `strata-controller`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use strata_api::Duration;

/// A node of the Strata control plane: Raft member, REST API and (on the leader) reconcilers.
///
/// Every flag can also be given as an environment variable (`STRATA_NODE_ID`, `STRATA_LISTEN`,
/// ...). Without `--peers` the node forms a single-node cluster on first start. With `--peers`,
/// the node with the lowest id initialises the cluster once; the others wait to be contacted,
/// and a restarted node simply rejoins from its data dir.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "strata-controller", version, about, long_about = None)]
pub struct Config {
    /// This node's Raft id (a positive integer, unique in the cluster).
    #[arg(long, env = "STRATA_NODE_ID", value_parser = clap::value_parser!(u64).range(1..))]
    pub node_id: u64,

    /// Address the REST API and peer traffic listen on, for example 127.0.0.1:7001.
    #[arg(long, env = "STRATA_LISTEN")]
    pub listen: SocketAddr,

    /// Address other nodes and forwarded requests use to reach this node (default: --listen).
    #[arg(long, env = "STRATA_ADVERTISE")]
    pub advertise: Option<String>,

    /// Directory for the node's SQLite database (Raft log, vote, snapshots) and generated
    /// secrets. Created if missing.
    #[arg(long, env = "STRATA_DATA_DIR")]
    pub data_dir: PathBuf,

    /// The initial members as id=host:port pairs, for example
    /// 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003. Must include this node.
    #[arg(long, env = "STRATA_PEERS", value_parser = parse_peers)]
    pub peers: Option<Peers>,

    /// Bearer token that may read and write. If absent, one is generated on first start and
    /// kept in DATA_DIR/admin-token. Prefer --admin-token-file: a flag shows in `ps`.
    #[arg(long, env = "STRATA_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A file holding the admin token (its first line).
    #[arg(long, env = "STRATA_ADMIN_TOKEN_FILE", conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,

    /// Bearer token that may only read.
    #[arg(long, env = "STRATA_VIEWER_TOKEN", hide_env_values = true)]
    pub viewer_token: Option<String>,

    /// A file holding the viewer token.
    #[arg(
        long,
        env = "STRATA_VIEWER_TOKEN_FILE",
        conflicts_with = "viewer_token"
    )]
    pub viewer_token_file: Option<PathBuf>,

    /// Shared secret peers authenticate with. Required with --peers (every node needs the same
    /// one); a single node generates one in DATA_DIR/cluster-secret.
    #[arg(long, env = "STRATA_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,

    /// A file holding the cluster secret.
    #[arg(
        long,
        env = "STRATA_CLUSTER_SECRET_FILE",
        conflicts_with = "cluster_secret"
    )]
    pub cluster_secret_file: Option<PathBuf>,

    /// Token agents register with (it only registers: each node then gets its own
    /// credential). Required with --peers (every node needs the same one); a single node
    /// generates one in DATA_DIR/join-token.
    #[arg(long, env = "STRATA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,

    /// A file holding the join token; SIGHUP re-reads it (rotation: write the new token on
    /// every controller, then SIGHUP each).
    #[arg(long, env = "STRATA_JOIN_TOKEN_FILE", conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,

    /// This node's certificate (PEM, with its chain): the API and peer port serve TLS with
    /// it, and peer calls present it as their client certificate. The certificate needs the
    /// addresses clients and peers use as subject alternative names, and both the
    /// serverAuth and clientAuth key usages (`deploy/dev-ca.sh` makes such certificates).
    #[arg(
        long,
        env = "STRATA_TLS_CERT",
        requires = "tls_key",
        value_name = "FILE"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "STRATA_TLS_KEY",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,

    /// Mutual TLS: every client (peers, agents, stratactl) must present a certificate signed
    /// by this CA; others fail the handshake.
    #[arg(
        long,
        env = "STRATA_CLIENT_CA",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    pub client_ca: Option<PathBuf>,

    /// The CA peers' certificates are checked against (default: --client-ca).
    #[arg(
        long,
        env = "STRATA_CA_CERT",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    pub ca_cert: Option<PathBuf>,

    /// Serve plain HTTP, without TLS: for tests and benchmarks on loopback. Without it,
    /// --tls-cert and --tls-key are required.
    #[arg(long, env = "STRATA_INSECURE_HTTP", conflicts_with = "tls_cert")]
    pub insecure_http: bool,

    /// Registered nodes at most; a new node beyond it is refused (422).
    #[arg(long, env = "STRATA_MAX_NODES", default_value_t = 20_000)]
    pub max_nodes: u64,

    /// Tiers at most; a new tier beyond it is refused (422).
    #[arg(long, env = "STRATA_MAX_TIERS", default_value_t = 1_000)]
    pub max_tiers: u64,

    /// A client must send a request's complete headers within this (slowloris guard).
    #[arg(long, env = "STRATA_HEADER_TIMEOUT", default_value = "10s")]
    pub header_timeout: Duration,

    /// A request body must arrive within this.
    #[arg(long, env = "STRATA_BODY_TIMEOUT", default_value = "30s")]
    pub body_timeout: Duration,

    /// An idle keep-alive connection is closed after this.
    #[arg(long, env = "STRATA_IDLE_TIMEOUT", default_value = "60s")]
    pub idle_timeout: Duration,

    /// Open client connections at most; beyond it new ones are closed at once. Peer
    /// connections (from the members' addresses) have their own allowance on top.
    #[arg(long, env = "STRATA_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// A node whose agent is silent for longer than this becomes NotReady and its instances are
    /// replaced elsewhere.
    #[arg(long, env = "STRATA_HEARTBEAT_GRACE", default_value = "5s")]
    pub heartbeat_grace: Duration,

    /// How often the leader runs its reconcilers (they also run when agents report changes).
    #[arg(long, env = "STRATA_RECONCILE_INTERVAL", default_value = "500ms")]
    pub reconcile_interval: Duration,

    /// Take a snapshot (and compact the log) after this many applied entries.
    #[arg(long, env = "STRATA_SNAPSHOT_LOGS", default_value_t = 5000)]
    pub snapshot_logs: u64,

    /// Also take a snapshot when the log entries since the last one hold more than this many
    /// MiB: a batched entry carries from one to 64 writes, so a count alone does not bound the
    /// log a node keeps in memory.
    #[arg(long, env = "STRATA_SNAPSHOT_LOG_MIB", default_value_t = 64)]
    pub snapshot_log_mib: u64,

    /// How often the leader sends heartbeats to followers.
    #[arg(long, env = "STRATA_RAFT_HEARTBEAT", default_value = "100ms")]
    pub raft_heartbeat: Duration,

    /// Base election timeout (at least twice the heartbeat). A follower that stops hearing from
    /// its leader waits out the leader's lease (1.2x this) plus a random 1x-1.2x this before it
    /// stands for election, so failover takes roughly 2.2x-2.4x this value.
    #[arg(long, env = "STRATA_ELECTION_TIMEOUT", default_value = "250ms")]
    pub election_timeout: Duration,

    /// How long a node may go without contact with a quorum of voters before it refuses
    /// requests with 503 `no-quorum` (and, not reaching one, stops starting elections).
    #[arg(long, env = "STRATA_QUORUM_TIMEOUT", default_value = "800ms")]
    pub quorum_timeout: Duration,

    /// How long a write waits for the cluster before the API answers 503.
    #[arg(long, env = "STRATA_WRITE_TIMEOUT", default_value = "10s")]
    pub write_timeout: Duration,

    /// The value of the `strata:cluster` tag on every EC2 instance this cluster launches; the
    /// EC2 executor only ever sees and touches instances carrying it.
    #[arg(long, env = "STRATA_CLUSTER_NAME", default_value = "strata")]
    pub cluster_name: String,

    /// The EC2 API endpoint (a moto server, a VPC endpoint); default: the region's public one.
    #[arg(long, env = "STRATA_EC2_ENDPOINT")]
    pub ec2_endpoint: Option<String>,

    /// The AWS region of EC2 tiers. Credentials come from the standard AWS chain
    /// (environment, profile, web identity, instance role).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,

    /// EC2 API calls per second never exceeded (token bucket), retries included.
    #[arg(long, env = "STRATA_EC2_CALLS_PER_SECOND", default_value_t = 10.0)]
    pub ec2_calls_per_second: f64,

    /// Calls the token bucket allows at once after a quiet period.
    #[arg(long, env = "STRATA_EC2_BURST", default_value_t = 10)]
    pub ec2_burst: u32,

    /// How often the EC2 executor describes the cluster's instances and converges them.
    #[arg(long, env = "STRATA_EC2_INTERVAL", default_value = "1s")]
    pub ec2_interval: Duration,

    /// A tagged EC2 instance that no instance of the state claims is terminated once it is
    /// this old (covers a record committed but not yet applied on a new leader).
    #[arg(long, env = "STRATA_EC2_UNKNOWN_GRACE", default_value = "30s")]
    pub ec2_unknown_grace: Duration,

    /// Log filter, in tracing's EnvFilter syntax (RUST_LOG is used when set).
    #[arg(long, env = "STRATA_LOG", default_value = "info")]
    pub log: String,
}

/// The initial member list: node id → advertised address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peers(pub BTreeMap<u64, String>);

fn parse_peers(text: &str) -> Result<Peers, String> {
    let mut peers = BTreeMap::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (id, address) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("{id:?} in {item:?} is not a node id"))?;
        if id == 0 {
            return Err("node ids start at 1".to_string());
        }
        let address = address.trim();
        if address
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("{address:?} in {item:?} is not host:port"));
        }
        if peers.insert(id, address.to_string()).is_some() {
            return Err(format!("node id {id} appears twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".to_string());
    }
    Ok(Peers(peers))
}

/// Reads a secret from the first line of `path`.
pub fn read_secret_file(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read secret file {}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    if secret.is_empty() {
        anyhow::bail!("secret file {} is empty", path.display());
    }
    Ok(secret)
}

impl Config {
    /// The address peers and forwarded requests reach this node on.
    pub fn advertised_address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_the_documented_command_line() {
        let config = Config::try_parse_from([
            "strata-controller",
            "--node-id",
            "1",
            "--listen",
            "127.0.0.1:7001",
            "--data-dir",
            "/tmp/x",
            "--peers",
            "1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003",
        ]);
        let config = match config {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        };
        let peers = config.peers.map(|p| p.0).unwrap_or_default();
        assert_eq!(peers.len(), 3);
        assert_eq!(peers.get(&2).map(String::as_str), Some("127.0.0.1:7002"));
    }

    #[test]
    fn rejects_bad_peer_lists() {
        for bad in [
            "1",
            "x=127.0.0.1:1",
            "1=127.0.0.1",
            "0=a:1",
            "1=a:1,1=b:2",
            ",",
        ] {
            assert!(parse_peers(bad).is_err(), "{bad} should be refused");
        }
    }
}

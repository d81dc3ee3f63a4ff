//! Harness for end-to-end tests: starts the real Strata binaries as processes on loopback ports
//! with temporary data dirs, and kills every process it started when dropped (also when a test
//! fails), so no test leaves strays behind.
//!
//! Binaries are found next to the test executable (`target/<profile>/`); `cargo nextest run
//! --workspace` builds them before running tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod fault_proxy;
pub mod linearizability;
pub mod moto;
pub mod netns;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const VIEWER_TOKEN: &str = "test-viewer-token";
pub const CLUSTER_SECRET: &str = "test-cluster-secret";
pub const JOIN_TOKEN: &str = "test-join-token";

/// Path of a workspace binary built alongside the tests, or in `STRATA_TEST_BIN_DIR` when set
/// (binaries built elsewhere, say a release build).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATA_TEST_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("."));
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(name)
}

/// Whether the end-to-end suites run against controllers serving mutual TLS
/// (`STRATA_E2E_TLS=1`): every cluster the harness starts then uses the test PKI, and every
/// agent and client presents its certificate.
pub fn tls_enabled() -> bool {
    std::env::var("STRATA_E2E_TLS").is_ok_and(|value| value == "1")
}

/// Set once a TLS cluster started in this process: agents started afterwards use TLS too.
static TLS_CLUSTER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The test PKI, made by `deploy/dev-ca.sh` once per target dir (under
/// `target/<profile>/strata-test-pki/<name>`): a CA with certificates `controller`, `client`
/// and `agent`, all for `127.0.0.1` and `localhost`. `name` tells two CAs apart (a
/// certificate of `other` is one the cluster's CA did not sign).
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn get(name: &str) -> anyhow::Result<Pki> {
        let root = binary("strata-test-pki");
        let dir = root.join(name);
        if dir.join("agent.pem").exists() {
            return Ok(Pki { dir });
        }
        std::fs::create_dir_all(&root).context("create the test PKI dir")?;
        // Made aside and renamed into place, so tests starting together never see half a PKI.
        let building = root.join(format!("{name}.building-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dev-ca.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&building)
            .args(["controller", "client", "agent"])
            .status()
            .context("run deploy/dev-ca.sh")?;
        if !status.success() {
            let _ = std::fs::remove_dir_all(&building);
            bail!("deploy/dev-ca.sh failed: {status}");
        }
        if std::fs::rename(&building, &dir).is_err() {
            // Another test made it first.
            let _ = std::fs::remove_dir_all(&building);
        }
        Ok(Pki { dir })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// A client transport trusting this CA, presenting certificate `name` if given.
    pub fn transport(&self, name: Option<&str>) -> anyhow::Result<strata_api::tls::Transport> {
        let cert = name.map(|name| self.cert(name));
        let key = name.map(|name| self.key(name));
        Ok(strata_api::tls::Transport::from_flags(
            Some(&self.ca()),
            cert.as_deref(),
            key.as_deref(),
        )?)
    }

    /// `--ca-cert`, `--tls-cert`, `--tls-key` for a client presenting certificate `name`.
    pub fn client_flags(&self, name: &str) -> Vec<String> {
        vec![
            "--ca-cert".to_string(),
            self.ca().display().to_string(),
            "--tls-cert".to_string(),
            self.cert(name).display().to_string(),
            "--tls-key".to_string(),
            self.key(name).display().to_string(),
        ]
    }
}

/// A free loopback port. Another process could take it before we bind it again; tests accept
/// that small race for the simplicity of fixed peer lists.
pub fn free_port() -> u16 {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A free port on `host`, with the same small race as `free_port`, drawn at random below the
/// kernel's ephemeral range (`net.ipv4.ip_local_port_range`). A port the kernel handed out
/// for `bind(0)` is one it will soon hand out again as the source port of some connection,
/// and the suite opens tens of thousands of those (connection floods, 10,000 simulated
/// agents): a controller restarted on such a port found it taken and exited, leaving its
/// cluster without a quorum.
pub fn free_port_on(host: IpAddr) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(1));
    if high > low {
        let span = u64::from(high - low) + 1;
        let seed = std::collections::hash_map::RandomState::new();
        for attempt in 0u64..64 {
            let mut hasher = seed.build_hasher();
            hasher.write_u64(attempt);
            hasher.write_u32(std::process::id());
            let port = low + u16::try_from(hasher.finish() % span).unwrap_or(0);
            if TcpListener::bind((host, port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind((host, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap_or(0)
}

/// `host:port` with a free port on `host` (IPv6 in brackets).
fn free_address_on(host: IpAddr) -> String {
    SocketAddr::new(host, free_port_on(host)).to_string()
}

/// A child process killed (SIGKILL) when dropped.
pub struct ProcessGuard {
    child: Option<Child>,
}

impl ProcessGuard {
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let child = command.spawn().with_context(|| {
            format!(
                "start {:?} (build the binaries first: cargo build --workspace --bins)",
                command.get_program()
            )
        })?;
        Ok(ProcessGuard { child: Some(child) })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One controller node of a test cluster.
pub struct ControllerNode {
    pub id: u64,
    pub address: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    process: Option<ProcessGuard>,
}

/// Options for starting a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: u64,
    pub snapshot_logs: u64,
    /// `--snapshot-log-mib` of the controllers.
    pub snapshot_log_mib: u64,
    /// `--heartbeat-grace` of the controllers.
    pub heartbeat_grace: &'static str,
    /// The address controllers listen on (and advertise to each other and to agents):
    /// loopback by default, a bridge address when agents run in network namespaces.
    pub listen_host: IpAddr,
    /// `--reconcile-interval` of the controllers: how often the planners run unprompted.
    pub reconcile_interval: &'static str,
    /// When not empty, node `i` (from 1) runs inside network namespace `namespaces[i - 1].0`
    /// (through `ip netns exec`, which needs root) and listens on its address
    /// `namespaces[i - 1].1`, port 7001; `listen_host` is then unused.
    pub namespaces: Vec<(String, IpAddr)>,
    /// More flags for every controller (`--header-timeout 2s`, ...).
    pub controller_args: Vec<&'static str>,
    /// Extra controller flags (for example `--ec2-endpoint`) and environment.
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Mutual TLS with the test PKI (`Pki::get("cluster")`); default: `STRATA_E2E_TLS=1`.
    pub tls: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            snapshot_logs: 5000,
            snapshot_log_mib: 64,
            heartbeat_grace: "3s",
            listen_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            reconcile_interval: "200ms",
            namespaces: Vec::new(),
            controller_args: Vec::new(),
            extra_args: Vec::new(),
            env: Vec::new(),
            tls: tls_enabled(),
        }
    }
}

/// A cluster of `strata-controller` processes on loopback.
pub struct Cluster {
    pub nodes: BTreeMap<u64, ControllerNode>,
    peers: String,
    options: ClusterOptions,
    pub http: reqwest::Client,
    /// The PKI the controllers serve mutual TLS with, when `options.tls`.
    pub pki: Option<Pki>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `options.nodes` controllers and waits until they agree on a leader.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir().context("create temp dir")?;
        let mut nodes = BTreeMap::new();
        for id in 1..=options.nodes {
            let address = match options.namespaces.get(id as usize - 1) {
                // A namespace of the test's own has every port free.
                Some((_, ip)) => SocketAddr::new(*ip, 7001).to_string(),
                None => free_address_on(options.listen_host),
            };
            nodes.insert(
                id,
                ControllerNode {
                    id,
                    address,
                    data_dir: dir.path().join(format!("node-{id}")),
                    log_path: dir.path().join(format!("node-{id}.log")),
                    process: None,
                },
            );
        }
        let peers = nodes
            .values()
            .map(|node| format!("{}={}", node.id, node.address))
            .collect::<Vec<_>>()
            .join(",");
        let pki = if options.tls {
            TLS_CLUSTER.store(true, std::sync::atomic::Ordering::Relaxed);
            Some(Pki::get("cluster")?)
        } else {
            None
        };
        let transport = match &pki {
            Some(pki) => pki.transport(Some("client"))?,
            None => strata_api::tls::Transport::Plain,
        };
        let http = transport
            .apply(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(15))
                    // Below the controllers' idle keep-alive timeout, so a pooled connection
                    // is not reused at the moment the server closes it.
                    .pool_idle_timeout(Duration::from_secs(5)),
            )
            .build()
            .context("build http client")?;
        let mut cluster = Cluster {
            nodes,
            peers,
            options,
            http,
            pki,
            _dir: dir,
        };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.start_node(id)?;
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        // Every node, not only a quorum: a test that goes on with a node that failed to start
        // loses its quorum at the first kill, far from the cause.
        let running = cluster.running();
        for id in cluster.nodes.keys().copied().collect::<Vec<_>>() {
            if !running.contains(&id) {
                bail!(
                    "node {id} exited at start; its log ends:\n{}",
                    cluster.log_tail(id)
                );
            }
        }
        Ok(cluster)
    }

    /// Starts (or restarts) node `id` with its data dir as it is.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let peers = self.peers.clone();
        let snapshot_logs = self.options.snapshot_logs;
        let snapshot_log_mib = self.options.snapshot_log_mib;
        let heartbeat_grace = self.options.heartbeat_grace;
        let reconcile_interval = self.options.reconcile_interval;
        let controller_args = self.options.controller_args.clone();
        let secrets = self._dir.path().join("secrets");
        let extra_args = self.options.extra_args.clone();
        let env = self.options.env.clone();
        let tls_args: Vec<String> = match &self.pki {
            Some(pki) => vec![
                "--tls-cert".to_string(),
                pki.cert("controller").display().to_string(),
                "--tls-key".to_string(),
                pki.key("controller").display().to_string(),
                "--client-ca".to_string(),
                pki.ca().display().to_string(),
            ],
            None => vec!["--insecure-http".to_string()],
        };
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or_else(|| anyhow!("no node {id}"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .context("open node log")?;
        let log_err = log.try_clone().context("clone node log")?;
        let mut command = match self.options.namespaces.get(id as usize - 1) {
            Some((namespace, _)) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", namespace])
                    .arg(binary("strata-controller"));
                command
            }
            None => Command::new(binary("strata-controller")),
        };
        command
            .args(["--node-id", &id.to_string()])
            .args(["--listen", &node.address])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--peers", &peers])
            // Secrets in files, as the README recommends: nothing in argv for `ps` to show.
            .arg("--admin-token-file")
            .arg(secret_file(&secrets, "admin-token", ADMIN_TOKEN)?)
            .arg("--viewer-token-file")
            .arg(secret_file(&secrets, "viewer-token", VIEWER_TOKEN)?)
            .arg("--cluster-secret-file")
            .arg(secret_file(&secrets, "cluster-secret", CLUSTER_SECRET)?)
            .arg("--join-token-file")
            .arg(secret_file(&secrets, "join-token", JOIN_TOKEN)?)
            .args(["--snapshot-logs", &snapshot_logs.to_string()])
            .args(["--snapshot-log-mib", &snapshot_log_mib.to_string()])
            .args(["--heartbeat-grace", heartbeat_grace])
            .args(["--reconcile-interval", reconcile_interval])
            .args(&tls_args)
            .args(&controller_args)
            .args(&extra_args)
            .envs(env)
            .env("STRATA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        node.process = Some(ProcessGuard::spawn(&mut command)?);
        Ok(())
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes
            .get(&id)
            .and_then(|node| node.process.as_ref())
            .and_then(ProcessGuard::pid)
    }

    /// Where the controllers' secret files are (`admin-token`, `viewer-token`,
    /// `cluster-secret`, `join-token`): a test may rewrite one and SIGHUP a node.
    pub fn secrets_dir(&self) -> PathBuf {
        self._dir.path().join("secrets")
    }

    /// Adds node `id` to the local bookkeeping (not to the Raft membership) and starts it with
    /// a peer list that includes it, so it waits to be contacted instead of initialising.
    pub fn start_new_node(&mut self, id: u64) -> anyhow::Result<String> {
        let address = free_address_on(self.options.listen_host);
        let dir = self._dir.path().to_path_buf();
        self.peers = format!("{},{id}={address}", self.peers);
        self.nodes.insert(
            id,
            ControllerNode {
                id,
                address: address.clone(),
                data_dir: dir.join(format!("node-{id}")),
                log_path: dir.join(format!("node-{id}.log")),
                process: None,
            },
        );
        self.start_node(id)?;
        Ok(address)
    }

    /// The options later (re)starts use: change the environment of a restarted node, say.
    pub fn options_mut(&mut self) -> &mut ClusterOptions {
        &mut self.options
    }

    /// kill -9 of node `id`.
    pub fn kill(&mut self, id: u64) {
        if let Some(process) = self
            .nodes
            .get_mut(&id)
            .and_then(|node| node.process.as_mut())
        {
            process.kill();
        }
    }

    pub fn address(&self, id: u64) -> String {
        self.nodes
            .get(&id)
            .map(|node| node.address.clone())
            .unwrap_or_default()
    }

    pub fn url(&self, id: u64, path: &str) -> String {
        format!("{}://{}{}", self.scheme(), self.address(id), path)
    }

    /// `https` when the controllers serve TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.pki.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The flags `stratactl` needs to reach this cluster beyond `--server` and the token:
    /// the CA and a client certificate under TLS, nothing otherwise.
    pub fn stratactl_tls_flags(&self) -> Vec<String> {
        self.pki
            .as_ref()
            .map(|pki| pki.client_flags("client"))
            .unwrap_or_default()
    }

    /// The node ids whose processes are running.
    pub fn running(&mut self) -> Vec<u64> {
        self.nodes
            .iter_mut()
            .filter_map(|(id, node)| {
                node.process
                    .as_mut()
                    .is_some_and(ProcessGuard::is_running)
                    .then_some(*id)
            })
            .collect()
    }

    /// `GET /v1/cluster` on node `id`.
    pub async fn status(&self, id: u64) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(self.url(id, "/v1/cluster"))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        Ok(response.error_for_status()?.json().await?)
    }

    /// Waits until every running node reports the same leader, and returns it.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        self.wait_for_leader_other_than(None, timeout).await
    }

    /// Like `wait_for_leader`, but a leader equal to `old` (a node just killed or removed)
    /// does not count.
    pub async fn wait_for_leader_other_than(
        &mut self,
        old: Option<u64>,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            for id in self.running() {
                if let Ok(status) = self.status(id).await {
                    // A node that does not (yet) see a quorum refuses requests with 503: it
                    // does not count as agreeing.
                    let in_touch = status["has_quorum"] != false;
                    leaders.push(status["leader_id"].as_u64().filter(|_| in_touch));
                } else {
                    leaders.push(None);
                }
            }
            if let Some(Some(first)) = leaders.first() {
                if Some(*first) != old && leaders.iter().all(|leader| *leader == Some(*first)) {
                    return Ok(*first);
                }
            }
            if Instant::now() > deadline {
                // Which nodes run, and the end of the log of every node that should but
                // does not: a node that exited is what such a failure needs explained.
                let running = self.running();
                let mut exited = String::new();
                for id in self.nodes.keys().copied().collect::<Vec<_>>() {
                    let started = self.nodes.get(&id).is_some_and(|n| n.process.is_some());
                    if started && !running.contains(&id) && Some(id) != old {
                        exited.push_str(&format!(
                            "\n--- node {id} is not running; its log ends:\n{}",
                            self.log_tail(id)
                        ));
                    }
                }
                bail!("no agreed leader after {timeout:?}: {leaders:?} (running: {running:?}){exited}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(
        &self,
        id: u64,
        index: u64,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = self.status(id).await {
                if status["applied_index"].as_u64().unwrap_or(0) >= index {
                    return Ok(status);
                }
                if Instant::now() > deadline {
                    bail!("node {id} did not apply index {index} within {timeout:?}: {status}");
                }
            } else if Instant::now() > deadline {
                bail!("node {id} unreachable while waiting for index {index}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The tail of node `id`'s log, for failure messages.
    pub fn log_tail(&self, id: u64) -> String {
        let text = self
            .nodes
            .get(&id)
            .and_then(|node| std::fs::read_to_string(&node.log_path).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A small valid tier declaration.
pub fn tier_body(name: &str) -> Value {
    json!({
        "name": name,
        "template": {"driver": "process", "command": ["strata-workload"]},
        "scaling": {"min": 1, "max": 1000},
    })
}

/// An HTTP answer reduced to what tests look at.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

/// Sends a request with the admin token (or `token`) and a JSON body.
pub async fn send(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    let mut request = http.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

/// Whether the slow end-to-end suites should run (CI sets `STRATA_E2E=1`). Prints the skip
/// reason otherwise.
pub fn e2e_enabled(test: &str) -> bool {
    let enabled = std::env::var("STRATA_E2E").is_ok_and(|value| value == "1");
    if !enabled {
        println!("skipped: {test} needs STRATA_E2E=1 (deploy/test.sh and CI set it)");
    }
    enabled
}

/// Writes `value` to `dir/name` (mode 0600, `dir` created 0700) and returns its path. The
/// file is replaced atomically, so a process reading it (an agent starting, a controller on
/// SIGHUP) never sees it half-written.
pub fn secret_file(dir: &Path, name: &str, value: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(name);
    let temporary = dir.join(format!(".{name}.{}", uuid_like()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("create {}", temporary.display()))?;
    file.write_all(format!("{value}\n").as_bytes())
        .with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, &path).with_context(|| format!("replace {}", path.display()))?;
    Ok(path)
}

/// A name unique within this process and across processes.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One `strata-agent` process.
pub struct AgentProcess {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    args: Vec<String>,
    /// The network namespace the agent (and so every instance it starts) runs in, entered
    /// through `ip netns exec`; `None` for the test's own namespace.
    namespace: Option<String>,
    process: Option<ProcessGuard>,
}

impl AgentProcess {
    /// Starts an agent for `node_id` against `controllers`, with its state under `dir`.
    pub fn start(
        dir: &Path,
        node_id: &str,
        controllers: &[String],
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_with(dir, node_id, controllers, extra, None)
    }

    /// Like `start`, but the agent runs inside network namespace `namespace` (`ip netns exec`,
    /// which needs root) and advertises `advertise_ip`, an address of that namespace, so its
    /// instances listen there. `ip netns exec` execs the agent, so the process this handle
    /// kills is the agent itself.
    pub fn start_in_namespace(
        dir: &Path,
        node_id: &str,
        controllers: &[String],
        namespace: &str,
        advertise_ip: IpAddr,
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        let advertise = advertise_ip.to_string();
        let mut flags = vec!["--advertise-ip", advertise.as_str()];
        flags.extend_from_slice(extra);
        AgentProcess::start_with(dir, node_id, controllers, &flags, Some(namespace))
    }

    fn start_with(
        dir: &Path,
        node_id: &str,
        controllers: &[String],
        extra: &[&str],
        namespace: Option<&str>,
    ) -> anyhow::Result<AgentProcess> {
        let data_dir = dir.join(format!("agent-{node_id}"));
        let log_path = dir.join(format!("agent-{node_id}.log"));
        let join_token = secret_file(
            &dir.join("agent-secrets"),
            &format!("join-token-{node_id}"),
            JOIN_TOKEN,
        )?;
        let mut args = vec![
            "--node-id".to_string(),
            node_id.to_string(),
            "--controllers".to_string(),
            controllers.join(","),
            "--join-token-file".to_string(),
            join_token.display().to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
            "--heartbeat-interval".to_string(),
            "300ms".to_string(),
            "--stop-grace".to_string(),
            "3s".to_string(),
            "--cpu".to_string(),
            "4".to_string(),
            "--memory-mb".to_string(),
            "4096".to_string(),
        ];
        if tls_enabled() || TLS_CLUSTER.load(std::sync::atomic::Ordering::Relaxed) {
            args.extend(Pki::get("cluster")?.client_flags("agent"));
        }
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let mut agent = AgentProcess {
            node_id: node_id.to_string(),
            data_dir,
            log_path,
            args,
            namespace: namespace.map(str::to_string),
            process: None,
        };
        agent.restart()?;
        Ok(agent)
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(ProcessGuard::pid)
    }

    /// Starts the process again with the same flags and data dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("open agent log")?;
        let log_err = log.try_clone().context("clone agent log")?;
        let mut command = match &self.namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", namespace])
                    .arg(binary("strata-agent"));
                command
            }
            None => Command::new(binary("strata-agent")),
        };
        command
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        self.process = Some(ProcessGuard::spawn(&mut command)?);
        Ok(())
    }

    /// kill -9 of the agent alone: its instances keep running, as after a real crash.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.as_mut() {
            process.kill();
        }
    }

    /// Whether the agent process is alive (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ProcessGuard::is_running)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for AgentProcess {
    /// The agent and every instance it ever started (its data dir's records), whether the test
    /// saw them or not: an autoscaler's scale-out, say, is not in a test's own list.
    fn drop(&mut self) {
        self.kill();
        let ids: Vec<String> = std::fs::read_dir(self.data_dir.join("instances"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        kill_instances(&ids);
    }
}

/// Process ids whose environment or command line carries `STRATA_INSTANCE_ID=<id>`: the
/// processes of one instance (a workload process, or the qemu running its VM).
pub fn processes_of_instance(id: &str) -> Vec<u32> {
    let needle = format!("STRATA_INSTANCE_ID={id}");
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let carries = |file: &str| {
            std::fs::read(entry.path().join(file)).is_ok_and(|bytes| {
                bytes
                    .split(|byte| *byte == 0 || *byte == b' ')
                    .any(|word| word == needle.as_bytes())
            })
        };
        {
            if carries("environ") || carries("cmdline") {
                // Zombies keep their environ readable for a moment; count only live ones.
                let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                let zombie = state
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
                if !zombie {
                    found.push(pid);
                }
            }
        }
    }
    found
}

/// Kills (SIGKILL) every process of the given instances; test cleanup after crashes.
pub fn kill_instances(ids: &[String]) {
    for id in ids {
        for pid in processes_of_instance(id) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout` with the last
/// observation.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(observation) => last = observation,
        }
        if Instant::now() > deadline {
            bail!("{what}: not true after {timeout:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// Helpers shared by the agent and partition suites.

/// A tier of `strata-workload` processes with quick health checks (as in tests/agents.rs).
/// A tier of `strata-workload` processes with quick health checks.
pub fn workload_tier(name: &str, min: u32, max: u32) -> Value {
    json!({
        "name": name,
        "template": {
            "driver": "process",
            "command": [binary("strata-workload").display().to_string()],
            "cpu": 0.25,
            "memory_mb": 64,
        },
        "health": {
            "path": "/healthz",
            "interval": "300ms",
            "timeout": "300ms",
            "healthy_threshold": 1,
            "unhealthy_threshold": 2,
            "grace_period": "5s",
        },
        "scaling": {"min": min, "max": max},
    })
}

/// `Ok(Some(value))` when `done`, otherwise the observation for the failure message.
pub fn until<T>(
    done: bool,
    value: T,
    observation: impl FnOnce() -> String,
) -> Result<Option<T>, String> {
    if done {
        Ok(Some(value))
    } else {
        Err(observation())
    }
}

/// One line per instance: short id, node, phase, health, reason.
pub fn summary(instances: &[Value]) -> String {
    instances
        .iter()
        .map(|i| {
            format!(
                "{} {} {} {} {}",
                i["id"].as_str().unwrap_or("?").get(..8).unwrap_or("?"),
                i["node"].as_str().unwrap_or("-"),
                i["phase"].as_str().unwrap_or("?"),
                i["health"].as_str().unwrap_or("?"),
                i["reason"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The ids of `instances`.
pub fn ids(instances: &[Value]) -> BTreeSet<String> {
    instances
        .iter()
        .filter_map(|i| i["id"].as_str().map(str::to_string))
        .collect()
}

/// `GET /` on an instance; the workload answers with its instance id.
pub async fn workload_answers(http: &reqwest::Client, instance: &Value) -> anyhow::Result<String> {
    let url = format!(
        "http://{}:{}/",
        instance["address"].as_str().unwrap_or("127.0.0.1"),
        instance["port"].as_u64().unwrap_or(0)
    );
    Ok(http
        .get(url)
        .timeout(Duration::from_secs(1))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

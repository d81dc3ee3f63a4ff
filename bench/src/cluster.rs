//! A 3-member cluster of either system, spawned and owned by the benchmark.
//!
//! The benchmark owns the processes because the failover measurement must `kill -9` the
//! leader and restart it with the same command line. Every member runs on 127.0.0.1 with
//! ports picked from the kernel, its data and log files under one temporary directory.
//!
//! Invariant: no process outlives the `Cluster`. Children are spawned with `kill_on_drop`,
//! `Drop` sends SIGKILL to any still running, and the temporary directory is removed after
//! them (field order), so an error, a panic or ctrl-c in the benchmark leaves nothing behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

use strata_api::tls::Transport;

use crate::system::{Probe, System};

/// The shared secrets a Strata cluster is started with. Fixed values are fine: every member
/// listens on loopback and lives only as long as the benchmark.
pub const STRATA_ADMIN_TOKEN: &str = "bench-admin-token";
const STRATA_VIEWER_TOKEN: &str = "bench-viewer-token";
const STRATA_CLUSTER_SECRET: &str = "bench-cluster-secret";
/// Agents (real or simulated) register and heartbeat with this token.
pub const STRATA_JOIN_TOKEN: &str = "bench-join-token";

/// How long a fresh cluster may take to elect its first leader.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Where to find the programs the clusters are made of.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub strata: PathBuf,
    pub etcd: PathBuf,
}

pub struct Member {
    /// Strata node id (1, 2, 3); for etcd the position plus one, used only in names.
    pub node_id: u64,
    /// `http://127.0.0.1:port`, where clients send requests.
    pub endpoint: String,
    program: PathBuf,
    args: Vec<String>,
    /// The network namespace the member runs in (`ip netns exec`), if any.
    namespace: Option<String>,
    /// Environment on top of the benchmark's own (cloud credentials, say).
    env: Vec<(String, String)>,
    log_path: PathBuf,
    /// `None` between a kill and the restart.
    child: Option<Child>,
}

impl Member {
    /// The running process's id; `None` between a kill and the restart.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

pub struct Cluster {
    pub system: System,
    pub members: Vec<Member>,
    /// How clients reach the members: plain HTTP, or TLS with the cluster's CA and a client
    /// certificate (`start_tls`).
    pub transport: Transport,
    // Dropped after `members` so that no process still writes into it while it is removed.
    dir: Option<tempfile::TempDir>,
    kept_dir: Option<PathBuf>,
}

impl Cluster {
    /// Starts three members of `system` and waits until they have elected a leader.
    /// With `keep_dir` the data and logs stay on disk after the run, for a post-mortem.
    pub async fn start(system: System, binaries: &Binaries, keep_dir: bool) -> Result<Cluster> {
        Cluster::start_on(system, binaries, keep_dir, None, &[], false).await
    }

    /// A Strata cluster serving mutual TLS: a development CA (`deploy/dev-ca.sh`) in the
    /// cluster's directory, `--tls-cert`/`--client-ca` on every member, https endpoints, and
    /// `transport` presenting a client certificate of that CA.
    pub async fn start_tls(binaries: &Binaries, keep_dir: bool) -> Result<Cluster> {
        Cluster::start_on(System::Strata, binaries, keep_dir, None, &[], true).await
    }

    /// Like `start`, with `extra` appended to every member's command line.
    pub async fn start_with_args(
        system: System,
        binaries: &Binaries,
        keep_dir: bool,
        extra: &[String],
    ) -> Result<Cluster> {
        Cluster::start_on(system, binaries, keep_dir, None, extra, false).await
    }

    /// Like `start_with_args`, with `env` added to every member's environment.
    pub async fn start_with_env(
        binaries: &Binaries,
        keep_dir: bool,
        extra: &[String],
        env: &[(String, String)],
    ) -> Result<Cluster> {
        let mut cluster =
            Cluster::start_on_lazily(System::Strata, binaries, keep_dir, None, extra, false)?;
        for member in &mut cluster.members {
            member.env = env.to_vec();
        }
        cluster.launch().await?;
        Ok(cluster)
    }

    /// Like `start`, with member `i` inside network namespace `hosts[i].0`, listening on its
    /// address `hosts[i].1` (fixed ports: a namespace of the caller's own has them all free).
    pub async fn start_in_namespaces(
        system: System,
        binaries: &Binaries,
        keep_dir: bool,
        hosts: &[(String, std::net::Ipv4Addr)],
    ) -> Result<Cluster> {
        Cluster::start_on(system, binaries, keep_dir, Some(hosts), &[], false).await
    }

    async fn start_on(
        system: System,
        binaries: &Binaries,
        keep_dir: bool,
        hosts: Option<&[(String, std::net::Ipv4Addr)]>,
        extra: &[String],
        tls: bool,
    ) -> Result<Cluster> {
        let mut cluster = Cluster::start_on_lazily(system, binaries, keep_dir, hosts, extra, tls)?;
        cluster.launch().await?;
        Ok(cluster)
    }

    /// Starts every member and waits for a leader.
    async fn launch(&mut self) -> Result<()> {
        for index in 0..self.members.len() {
            self.spawn(index)?;
        }
        self.wait_for_leader(READY_TIMEOUT).await?;
        Ok(())
    }

    /// The cluster with its members' command lines, none started yet.
    fn start_on_lazily(
        system: System,
        binaries: &Binaries,
        keep_dir: bool,
        hosts: Option<&[(String, std::net::Ipv4Addr)]>,
        extra: &[String],
        tls: bool,
    ) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("strata-bench-{}-", system.name()))
            .tempdir()
            .context("create the cluster's temporary directory")?;
        // Client ports first, then peer ports; in namespaces, each member's own address.
        let (addresses, ports) = match hosts {
            None => (vec!["127.0.0.1".to_string(); 3], free_ports(6)?),
            Some(hosts) => (
                hosts.iter().map(|(_, ip)| ip.to_string()).collect(),
                vec![7001, 7001, 7001, 7002, 7002, 7002],
            ),
        };
        let mut members = match system {
            System::Strata => strata_members(&binaries.strata, dir.path(), &addresses, &ports),
            System::Etcd => etcd_members(&binaries.etcd, dir.path(), &addresses, &ports),
        };
        let transport = if tls {
            // The tests' PKI (deploy/dev-ca.sh, made once next to this program).
            let pki = strata_tests::Pki::get("bench")?;
            for member in &mut members {
                member.args.retain(|arg| arg != "--insecure-http");
                for (flag, file) in [
                    ("--tls-cert", pki.cert("controller")),
                    ("--tls-key", pki.key("controller")),
                    ("--client-ca", pki.ca()),
                ] {
                    member.args.push(flag.to_string());
                    member.args.push(file.display().to_string());
                }
                member.endpoint = member.endpoint.replacen("http://", "https://", 1);
            }
            pki.transport(Some("client"))?
        } else {
            Transport::Plain
        };
        for member in &mut members {
            member.args.extend(extra.iter().cloned());
        }
        if let Some(hosts) = hosts {
            for (member, (namespace, _)) in members.iter_mut().zip(hosts) {
                member.namespace = Some(namespace.clone());
            }
        }
        let mut cluster = Cluster {
            system,
            members,
            transport,
            dir: None,
            kept_dir: None,
        };
        if keep_dir {
            let path = dir.keep();
            eprintln!(
                "[{}] data and logs kept in {}",
                system.name(),
                path.display()
            );
            cluster.kept_dir = Some(path);
        } else {
            cluster.dir = Some(dir);
        }
        Ok(cluster)
    }

    /// `probe_client` with this cluster's transport.
    pub fn probe_client(&self) -> Result<reqwest::Client> {
        self.transport
            .apply(probe_builder())
            .build()
            .context("build HTTP client")
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint.clone()).collect()
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        let member = &mut self.members[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log_path)
            .with_context(|| format!("open log file {}", member.log_path.display()))?;
        let log_err = log.try_clone().context("duplicate log file handle")?;
        let mut command = match &member.namespace {
            // `ip netns exec` execs the program, so the child is the member itself.
            Some(namespace) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", namespace])
                    .arg(&member.program);
                command
            }
            None => Command::new(&member.program),
        };
        let child = command
            .args(&member.args)
            .envs(member.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", member.program.display()))?;
        member.child = Some(child);
        Ok(())
    }

    /// Sends SIGKILL to member `index` and returns the instant the signal was sent, then
    /// reaps the process.
    pub async fn kill(&mut self, index: usize) -> Result<Instant> {
        let member = &mut self.members[index];
        let Some(mut child) = member.child.take() else {
            bail!("member {} is not running", member.node_id);
        };
        let killed_at = Instant::now();
        child.start_kill().context("send SIGKILL")?;
        child.wait().await.context("reap killed member")?;
        Ok(killed_at)
    }

    /// Starts member `index` again with the command line it first ran with; its data
    /// directory is still there, so it rejoins instead of bootstrapping.
    pub fn restart(&mut self, index: usize) -> Result<()> {
        if self.members[index].child.is_some() {
            bail!("member {} is already running", self.members[index].node_id);
        }
        self.spawn(index)
    }

    /// Fails with the tail of its log when a member that should run has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for member in &mut self.members {
            let Some(child) = member.child.as_mut() else {
                continue;
            };
            if let Some(status) = child.try_wait().context("poll member process")? {
                member.child = None;
                bail!(
                    "member {} exited ({status}); last log lines:\n{}",
                    member.node_id,
                    log_tail(&member.log_path)
                );
            }
        }
        Ok(())
    }

    /// Waits until every running member names the same leader and that leader agrees.
    /// Returns the leader's member index.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> Result<usize> {
        let http = self.probe_client()?;
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let problem = match self.current_leader(&http).await {
                Ok(index) => return Ok(index),
                Err(problem) => problem,
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} cluster has no agreed leader after {timeout:?}: {problem:#}",
                    self.system.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The member index of the leader, when every running member names the same one and it
    /// agrees that it leads; an error describes what is not settled yet.
    pub async fn current_leader(&self, http: &reqwest::Client) -> Result<usize> {
        let mut probes: Vec<(usize, Probe)> = Vec::new();
        for (index, member) in self.members.iter().enumerate() {
            if member.child.is_some() {
                probes.push((index, self.system.probe(http, &member.endpoint).await?));
            }
        }
        let mut leader: Option<u64> = None;
        for (index, probe) in &probes {
            let Some(named) = probe.leader else {
                bail!("member {} knows no leader", self.members[*index].node_id);
            };
            if leader.is_some_and(|l| l != named) {
                bail!("members disagree on the leader");
            }
            leader = Some(named);
        }
        let Some(leader) = leader else {
            bail!("no member is running");
        };
        // Members name the leader by the id it reports for itself (the node id for Strata,
        // etcd's generated member id), so the leader is the member whose own id matches.
        let Some((index, probe)) = probes.iter().find(|(_, p)| p.self_id == leader) else {
            bail!("the named leader {leader} is not a running member");
        };
        if !probe.is_leader {
            bail!(
                "member {} does not think it leads",
                self.members[*index].node_id
            );
        }
        Ok(*index)
    }

    /// Probes member `index` (status, leader, log indexes).
    pub async fn probe(&self, http: &reqwest::Client, index: usize) -> Result<Probe> {
        self.system.probe(http, &self.members[index].endpoint).await
    }

    /// Kills every member and reaps it; the temporary directory goes with `self`.
    pub async fn shutdown(mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// CPU time (user + system) the running members have used so far, from `/proc`; `None`
    /// where that is not readable. Comparing it before and after a run tells how much work
    /// each write cost, a figure that other load on the machine moves much less than writes/s.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let mut total = 0.0;
        for member in &self.members {
            if let Some(pid) = member.child.as_ref().and_then(Child::id) {
                total += process_cpu_seconds(&format!("/proc/{pid}/stat"))?;
            }
        }
        Some(total)
    }

    pub fn data_dir(&self) -> Option<&Path> {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .or(self.kept_dir.as_deref())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(child) = member.child.as_mut() {
                // kill_on_drop would do the same; being explicit keeps the invariant visible.
                let _ = child.start_kill();
            }
        }
    }
}

fn strata_members(program: &Path, dir: &Path, addresses: &[String], ports: &[u16]) -> Vec<Member> {
    let peers = (0..3)
        .map(|i| format!("{}={}:{}", i + 1, addresses[i], ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    (0..3)
        .map(|i| {
            let node_id = i as u64 + 1;
            let data_dir = dir.join(format!("node{node_id}"));
            let args = vec![
                "--node-id".into(),
                node_id.to_string(),
                "--listen".into(),
                format!("{}:{}", addresses[i], ports[i]),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--peers".into(),
                peers.clone(),
                "--admin-token".into(),
                STRATA_ADMIN_TOKEN.into(),
                "--viewer-token".into(),
                STRATA_VIEWER_TOKEN.into(),
                "--cluster-secret".into(),
                STRATA_CLUSTER_SECRET.into(),
                "--join-token".into(),
                STRATA_JOIN_TOKEN.into(),
                // Loopback only; the TLS cost is measured by `strata-bench tls`.
                "--insecure-http".into(),
            ];
            Member {
                node_id,
                endpoint: format!("http://{}:{}", addresses[i], ports[i]),
                program: program.to_path_buf(),
                args,
                namespace: None,
                env: Vec::new(),
                log_path: dir.join(format!("node{node_id}.log")),
                child: None,
            }
        })
        .collect()
}

/// etcd members with the release's default timing (100 ms heartbeat, 1 s election timeout),
/// the configuration the reference figures were taken with.
fn etcd_members(program: &Path, dir: &Path, addresses: &[String], ports: &[u16]) -> Vec<Member> {
    let peer_url = |i: usize| format!("http://{}:{}", addresses[i], ports[3 + i]);
    let initial_cluster = (0..3)
        .map(|i| format!("m{}={}", i + 1, peer_url(i)))
        .collect::<Vec<_>>()
        .join(",");
    (0..3)
        .map(|i| {
            let node_id = i as u64 + 1;
            let client_url = format!("http://{}:{}", addresses[i], ports[i]);
            // On a restart the data directory exists and etcd ignores the initial-cluster
            // flags, so the first command line also restarts a killed member.
            let args = vec![
                "--name".into(),
                format!("m{node_id}"),
                "--data-dir".into(),
                dir.join(format!("m{node_id}.etcd")).display().to_string(),
                "--listen-client-urls".into(),
                client_url.clone(),
                "--advertise-client-urls".into(),
                client_url.clone(),
                "--listen-peer-urls".into(),
                peer_url(i),
                "--initial-advertise-peer-urls".into(),
                peer_url(i),
                "--initial-cluster".into(),
                initial_cluster.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                "strata-bench".into(),
                "--logger".into(),
                "zap".into(),
            ];
            Member {
                node_id,
                endpoint: client_url,
                program: program.to_path_buf(),
                args,
                namespace: None,
                env: Vec::new(),
                log_path: dir.join(format!("m{node_id}.log")),
                child: None,
            }
        })
        .collect()
}

/// Ports the kernel hands out for 127.0.0.1:0. All listeners are held until every port is
/// known, so the same port is never returned twice; another process could still take one
/// before the member binds it, which on a benchmark machine is rare enough.
fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("bind a free loopback port"))
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr().context("read bound port")?.port()))
        .collect()
}

/// A client for status probes: short timeouts so a dead or hung member cannot stall a loop.
pub fn probe_client() -> Result<reqwest::Client> {
    probe_builder().build().context("build HTTP client")
}

fn probe_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(1000))
        .connect_timeout(Duration::from_millis(300))
}

/// User plus system CPU time of one process from its `/proc/.../stat`, assuming the usual
/// 100 clock ticks per second (sysconf is out of reach without unsafe code).
pub fn process_cpu_seconds(stat_path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    // The command name (field 2) may contain spaces; the fields after its ')' are fixed.
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

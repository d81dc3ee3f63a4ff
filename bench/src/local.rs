//! A single controller, a worker agent and optionally LB agents on loopback, owned by the
//! benchmark (the start-latency and pool measurements' world), and the reaper that kills what
//! the agents started.
//!
//! Invariant: nothing outlives a `LocalEnv`. The controller and the agent are spawned with
//! `kill_on_drop`; instances outlive a killed agent by design (the next agent adopts them), so
//! on drop every process whose working directory lies under the environment's temporary
//! directory (each instance runs in its own directory under the agent's data dir, and the
//! benchmark's own qemu runs do too), or whose command line names a path under it (HAProxy),
//! is sent SIGKILL before the directory is removed.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use strata_api::{ClusterStatus, ItemList, Node, NodeStatus};
use tokio::process::{Child, Command};

use crate::cluster::{STRATA_ADMIN_TOKEN, STRATA_JOIN_TOKEN};

/// What a `LocalEnv` runs.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    pub controller_bin: PathBuf,
    pub agent_bin: PathBuf,
    /// The agent's `--heartbeat-interval`.
    pub heartbeat_interval: Duration,
    /// The controller's `--reconcile-interval`; its default when `None`.
    pub reconcile_interval: Option<Duration>,
    pub keep_dir: bool,
    /// Start the worker agent `h1` (off when the benchmark simulates its workers).
    pub worker: bool,
    /// Start LB agents `lb-1`.. with this HAProxy binary, this many of them.
    pub balancers: Option<(PathBuf, usize)>,
}

impl LocalConfig {
    /// A controller and the worker agent `h1`, nothing else.
    pub fn worker_only(
        controller_bin: PathBuf,
        agent_bin: PathBuf,
        heartbeat_interval: Duration,
        reconcile_interval: Option<Duration>,
        keep_dir: bool,
    ) -> Self {
        LocalConfig {
            controller_bin,
            agent_bin,
            heartbeat_interval,
            reconcile_interval,
            keep_dir,
            worker: true,
            balancers: None,
        }
    }
}

/// A child process killed when dropped, with its output in a log file.
pub struct Owned {
    child: Child,
    log_path: PathBuf,
}

impl Owned {
    pub fn spawn(command: &mut Command, log_path: &Path) -> Result<Owned> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("create log file {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicate log file handle")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {:?}", command.as_std().get_program()))?;
        Ok(Owned {
            child,
            log_path: log_path.to_path_buf(),
        })
    }

    /// Fails with the tail of the log when the process has exited.
    pub fn check_alive(&mut self, what: &str) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("poll process")? {
            bail!(
                "{what} exited ({status}); last log lines:\n{}",
                log_tail(&self.log_path)
            );
        }
        Ok(())
    }
}

/// Kills, on drop, every process working under `dir` (see the module note).
struct Reaper {
    dir: PathBuf,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in processes_under(&self.dir) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Processes whose current directory is `dir` or below it, or whose command line names a path
/// under it: HAProxy runs from `/` but is started with `-f <lb-state-dir>/haproxy.cfg`, and,
/// like an instance, outlives the LB agent that started it.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
                || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    cmdline
                        .split(|byte| *byte == 0)
                        .any(|arg| String::from_utf8_lossy(arg).contains(&needle))
                })
        })
        .collect()
}

pub struct LocalEnv {
    // Field order is drop order: the processes die first, then the instances they left, then
    // the directory.
    controller: Owned,
    agent: Option<Owned>,
    balancers: Vec<Owned>,
    _reaper: Reaper,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub api: Api,
}

/// The controller's REST API with the admin token. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    /// `http://127.0.0.1:port` of the controller.
    pub base: String,
    pub http: reqwest::Client,
}

impl LocalEnv {
    /// Starts a single-node controller and an agent `h1`, and waits until the node is Ready.
    pub async fn start(config: &LocalConfig) -> Result<LocalEnv> {
        let dir = tempfile::Builder::new()
            .prefix("strata-bench-local-")
            .tempdir()
            .context("create a temporary directory")?;
        // Resolve symlinks (/tmp may be one) so the reaper's prefix test matches /proc's view.
        let path = dir
            .path()
            .canonicalize()
            .context("resolve the temporary directory")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("pick a free loopback port")?
            .port();
        let mut command = Command::new(&config.controller_bin);
        command.args([
            "--node-id",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &path.join("controller").display().to_string(),
            "--admin-token",
            STRATA_ADMIN_TOKEN,
            "--join-token",
            STRATA_JOIN_TOKEN,
            // Loopback only; the TLS cost is measured by `strata-bench tls`.
            "--insecure-http",
        ]);
        if let Some(interval) = config.reconcile_interval {
            command.args([
                "--reconcile-interval",
                &format!("{}ms", interval.as_millis()),
            ]);
        }
        let controller = Owned::spawn(&mut command, &path.join("controller.log"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .context("build HTTP client")?;
        let mut env = LocalEnv {
            controller,
            agent: None,
            balancers: Vec::new(),
            _reaper: Reaper { dir: path.clone() },
            dir: None,
            path: path.clone(),
            api: Api {
                base: format!("http://127.0.0.1:{port}"),
                http,
            },
        };
        if config.keep_dir {
            let kept = dir.keep();
            eprintln!("[start-latency] data and logs kept in {}", kept.display());
        } else {
            env.dir = Some(dir);
        }
        env.wait(
            "the controller to lead",
            Duration::from_secs(30),
            |api| async move {
                let status: ClusterStatus = api.get("/v1/cluster").await?;
                Ok(status.leader_id.is_some().then_some(()))
            },
        )
        .await?;

        let mut expected = Vec::new();
        if config.worker {
            let mut command = agent_command(config, port, "h1", &path);
            command.args(["--cpu", "4", "--memory-mb", "4096"]);
            env.agent = Some(Owned::spawn(&mut command, &path.join("agent-h1.log"))?);
            expected.push("h1".to_string());
        }
        if let Some((haproxy, count)) = &config.balancers {
            for index in 1..=*count {
                let node = format!("lb-{index}");
                let mut command = agent_command(config, port, &node, &path);
                command.args([
                    "--lb",
                    "haproxy",
                    "--haproxy-bin",
                    &haproxy.display().to_string(),
                    "--lb-state-dir",
                    &path.join(format!("lb-state-{node}")).display().to_string(),
                ]);
                let log = path.join(format!("agent-{node}.log"));
                env.balancers.push(Owned::spawn(&mut command, &log)?);
                expected.push(node);
            }
        }
        let expected = &expected;
        env.wait(
            "the agents' nodes to be Ready",
            Duration::from_secs(30),
            |api| async move {
                let nodes: ItemList<Node> = api.get("/v1/nodes").await?;
                Ok(expected
                    .iter()
                    .all(|id| {
                        nodes
                            .items
                            .iter()
                            .any(|node| &node.id == id && node.status == NodeStatus::Ready)
                    })
                    .then_some(()))
            },
        )
        .await?;
        Ok(env)
    }

    /// The temporary directory (canonical), for files of the benchmark's own processes.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.controller.check_alive("strata-controller")?;
        if let Some(agent) = self.agent.as_mut() {
            agent.check_alive("strata-agent")?;
        }
        for balancer in &mut self.balancers {
            balancer.check_alive("strata-agent --lb")?;
        }
        Ok(())
    }

    /// Polls `check` every 100 ms until it yields a value, failing after `timeout` (or at once
    /// when a process died).
    pub async fn wait<T, F, Fut>(&mut self, what: &str, timeout: Duration, check: F) -> Result<T>
    where
        F: Fn(Api) -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = match check(self.api.clone()).await {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => "not yet".to_string(),
                Err(error) => format!("{error:#}"),
            };
            if Instant::now() >= deadline {
                bail!("waited {timeout:?} for {what}; last: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Api {
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(STRATA_ADMIN_TOKEN)
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("GET {path}: {status}: {text}");
        }
        response
            .json()
            .await
            .with_context(|| format!("decode GET {path}"))
    }

    /// Sends a write and fails unless it succeeded.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<()> {
        let response = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(STRATA_ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(())
    }
}

/// An agent command for `node` with the flags every agent of the environment shares.
fn agent_command(config: &LocalConfig, port: u16, node: &str, dir: &Path) -> Command {
    let mut command = Command::new(&config.agent_bin);
    command.args([
        "--node-id",
        node,
        "--controllers",
        &format!("127.0.0.1:{port}"),
        "--join-token",
        STRATA_JOIN_TOKEN,
        "--data-dir",
        &dir.join(format!("agent-{node}")).display().to_string(),
        "--heartbeat-interval",
        &format!("{}ms", config.heartbeat_interval.as_millis()),
        "--stop-grace",
        "3s",
    ]);
    command.env("RUST_LOG", "info");
    command
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

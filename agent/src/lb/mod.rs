//! The load-balancer role: a local HAProxy serving every tier's pool.
//!
//! Layout: `layout` is the pure part (pools → slots → [`plan`] of Runtime API commands or a
//! reload); `render` writes `haproxy.cfg`; `runtime` talks to the stats socket and the master
//! CLI; `stats` reads `show stat`; `haproxy` starts and stops the process. This module is the
//! executor: one task owns HAProxy and everything known about it ([`LoadBalancer`] is its
//! handle), so pool changes, reports and restarts never race.
//!
//! Guarantees:
//! - A pool change that only changes servers reaches HAProxy through the Runtime API, without
//!   a reload, before [`LoadBalancer::apply`] returns; a change HAProxy cannot make at run time
//!   (a tier came or went, a frontend or a slot count changed) is a seamless reload through
//!   the master CLI.
//! - `haproxy.cfg` always describes what HAProxy serves, current servers included, so an
//!   HAProxy that dies is started again (within [`TICK`] plus its start-up) with the current
//!   pools.
//! - A tier whose listen address the running HAProxy does not already serve is bound only
//!   after the agent checked it can be (taken, or not a local address, otherwise); a tier that
//!   cannot is left out and reported with its error, and the others keep serving. Level
//!   triggered: it is tried again every [`RETRY`].
//! - HAProxy's process group is stopped when the agent shuts the role down, and killed when
//!   the handle is dropped without a shutdown.
//! - A restarted agent serves the file its predecessor rendered (when the layout saved with
//!   it still renders to it) until the controller sends pools: see [`LoadBalancer::start`].

mod haproxy;
pub mod layout;
pub mod render;
pub mod runtime;
pub mod stats;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use strata_api::{LbMode, LbReport, LbServerReport, LbStats, LbTierReport, Pool};

pub use haproxy::check_config;
use haproxy::{HaproxyProcess, Launch, Recorded};
pub use layout::{desired_layout, plan, AdminState, Layout, LbAction};
use render::{render, RenderPaths};
use runtime::RuntimeClient;

/// How often the task looks whether HAProxy still runs.
pub const TICK: Duration = Duration::from_millis(200);
/// How often it converges again without being asked (tiers whose address could not be bound,
/// Runtime API commands that failed).
pub const RETRY: Duration = Duration::from_secs(3);
/// How long a start or a reload may take before it counts as failed.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How long HAProxy gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Settings of the load-balancer role.
#[derive(Clone, Debug)]
pub struct LbConfig {
    /// The `haproxy` binary (`--haproxy-bin`).
    pub haproxy_bin: PathBuf,
    /// Where `haproxy.cfg`, the sockets and HAProxy's log live (`--lb-state-dir`).
    pub state_dir: PathBuf,
    /// The deadline of every socket operation.
    pub socket_timeout: Duration,
}

impl LbConfig {
    pub fn new(haproxy_bin: PathBuf, state_dir: PathBuf) -> Self {
        LbConfig {
            haproxy_bin,
            state_dir,
            socket_timeout: Duration::from_secs(2),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.state_dir.join("haproxy.cfg")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }

    pub fn master_socket(&self) -> PathBuf {
        self.state_dir.join("master.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("haproxy.log")
    }

    /// The running master's pid and start time.
    pub fn pid_path(&self) -> PathBuf {
        self.state_dir.join("haproxy.pid")
    }

    /// The [`Layout`] `haproxy.cfg` was rendered from, as JSON.
    pub fn layout_path(&self) -> PathBuf {
        self.state_dir.join("layout.json")
    }
}

/// Why the role could not start.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error("create {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("start haproxy: {0}")]
    Start(String),
    #[error("socket path {path} is longer than a unix socket address allows ({max} bytes); choose a shorter --lb-state-dir")]
    SocketPath { path: PathBuf, max: usize },
}

/// `sun_path` holds 108 bytes on Linux, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// What one [`LoadBalancer::apply`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Runtime API commands sent.
    pub commands: usize,
    /// Why HAProxy was reloaded, if it was.
    pub reloaded: Option<String>,
    /// HAProxy was (re)started from the file.
    pub started: bool,
    /// Tiers not served, and why.
    pub errors: BTreeMap<String, String>,
    /// What failed, if anything (retried every [`RETRY`]).
    pub failure: Option<String>,
}

enum Request {
    Apply(Vec<Pool>, oneshot::Sender<ApplyOutcome>),
    Report(oneshot::Sender<LbReport>),
    MasterPid(oneshot::Sender<Option<u32>>),
}

/// The handle of the load-balancer task.
pub struct LoadBalancer {
    requests: mpsc::Sender<Request>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LoadBalancer {
    /// Starts HAProxy and the task that owns it.
    ///
    /// A state dir that holds the file an earlier agent process rendered, with the layout it
    /// was rendered from, starts HAProxy from that file: the agent serves its last pools until
    /// the first [`LoadBalancer::apply`] (the first heartbeat answer), so a restart of the
    /// agent, or of the agent and its HAProxy, costs no listener. An HAProxy the earlier agent
    /// left running keeps serving until the new one listens beside it (both bind with
    /// SO_REUSEPORT), then soft-stops, finishing its connections. Without such a file (or if
    /// HAProxy refuses it) the earlier HAProxy is stopped and HAProxy starts with no tier.
    pub async fn start(config: LbConfig) -> Result<LoadBalancer, LbError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| LbError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        for path in [config.admin_socket(), config.master_socket()] {
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(LbError::SocketPath {
                    path,
                    max: MAX_SOCKET_PATH,
                });
            }
        }
        let earlier = Recorded::read(&config.pid_path());
        let mut converger = Converger::new(config);
        let mut started = false;
        if let Some(layout) = converger.saved_layout() {
            let tiers = layout.len();
            converger.running = layout;
            match converger.start().await {
                Ok(()) => {
                    tracing::info!(
                        tiers,
                        "serving the last rendered configuration until the controller answers"
                    );
                    if let Some(earlier) = &earlier {
                        earlier.soft_stop();
                    }
                    started = true;
                }
                Err(error) => {
                    tracing::warn!(%error, "haproxy cannot start from the last rendered configuration; starting with no tier");
                    converger.running = Layout::new();
                }
            }
        }
        if !started {
            if let Some(earlier) = &earlier {
                earlier.stop(STOP_GRACE).await;
            }
            if let Err(error) = converger.start().await {
                return Err(LbError::Start(error));
            }
        }
        let (requests, receiver) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(converger.run(receiver, cancel.clone()));
        Ok(LoadBalancer {
            requests,
            cancel,
            task: Some(task),
        })
    }

    /// Converges HAProxy to `pools`, the complete set (a tier absent here loses its
    /// frontend), and returns once HAProxy runs it (or what failed).
    pub async fn apply(&self, pools: Vec<Pool>) -> ApplyOutcome {
        let (reply, answer) = oneshot::channel();
        if self
            .requests
            .send(Request::Apply(pools, reply))
            .await
            .is_err()
        {
            return ApplyOutcome {
                failure: Some("the load-balancer task has stopped".to_string()),
                ..ApplyOutcome::default()
            };
        }
        answer.await.unwrap_or_else(|_| ApplyOutcome {
            failure: Some("the load-balancer task has stopped".to_string()),
            ..ApplyOutcome::default()
        })
    }

    /// What HAProxy serves now, with its statistics, for the next heartbeat.
    pub async fn report(&self) -> LbReport {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request::Report(reply)).await.is_err() {
            return LbReport::default();
        }
        answer.await.unwrap_or_default()
    }

    /// The pid of HAProxy's master process, while it runs.
    pub async fn master_pid(&self) -> Option<u32> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::MasterPid(reply)).await.ok()?;
        answer.await.ok().flatten()
    }

    /// Stops HAProxy and the task.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        // The task stops HAProxy on its way out; if the runtime goes first, dropping the
        // process kills its group.
        self.cancel.cancel();
    }
}

/// The task's state: the only writer of everything it knows about HAProxy.
struct Converger {
    config: LbConfig,
    admin: RuntimeClient,
    master: RuntimeClient,
    process: Option<HaproxyProcess>,
    /// What the running HAProxy serves (its last file). Kept while it is down, so the slots
    /// stay stable across a restart.
    running: Layout,
    /// Whether `running` is bound by a live HAProxy (false after it died).
    live: bool,
    /// The latest pools the controller sent.
    pools: Vec<Pool>,
    /// Whether the controller has sent pools yet. Until it has, HAProxy serves `running` as
    /// it was restored from the state dir (or nothing), and is only restarted, never changed.
    told: bool,
    /// Tiers not served, and why.
    errors: BTreeMap<String, String>,
    reloads: u64,
    worker_pid: Option<u32>,
    /// Request-rate baselines per tier (`None`) and per server, for [`Converger::report`].
    rates: stats::Rates<(String, Option<Uuid>)>,
    /// The last text written to `haproxy.cfg`, and whether `haproxy -c` passed it.
    written: Option<String>,
    written_checked: bool,
    /// When HAProxy may be started again after a failed start.
    next_start: Instant,
    start_backoff: Duration,
    /// The last converge left something undone.
    dirty: bool,
    last_converge: Instant,
}

impl Converger {
    fn new(config: LbConfig) -> Self {
        let admin = RuntimeClient::new(config.admin_socket(), config.socket_timeout);
        let master = RuntimeClient::new(config.master_socket(), config.socket_timeout);
        Converger {
            config,
            admin,
            master,
            process: None,
            running: Layout::new(),
            live: false,
            pools: Vec::new(),
            told: false,
            errors: BTreeMap::new(),
            reloads: 0,
            worker_pid: None,
            rates: stats::Rates::default(),
            written: None,
            written_checked: false,
            next_start: Instant::now(),
            start_backoff: Duration::from_millis(500),
            dirty: false,
            last_converge: Instant::now(),
        }
    }

    async fn run(mut self, mut requests: mpsc::Receiver<Request>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                request = requests.recv() => match request {
                    None => break,
                    Some(Request::Apply(pools, reply)) => {
                        self.pools = pools;
                        self.told = true;
                        let outcome = self.converge().await;
                        let _ = reply.send(outcome);
                    }
                    Some(Request::Report(reply)) => {
                        let _ = reply.send(self.report().await);
                    }
                    Some(Request::MasterPid(reply)) => {
                        let pid = self
                            .process
                            .as_mut()
                            .and_then(|process| process.exited().is_none().then(|| process.pid()));
                        let _ = reply.send(pid);
                    }
                },
                _ = tick.tick() => self.tick().await,
            }
        }
        if let Some(process) = self.process.take() {
            process.stop(STOP_GRACE).await;
        }
    }

    /// Restarts a dead HAProxy; converges again after a failure or every [`RETRY`].
    async fn tick(&mut self) {
        let died = match self.process.as_mut() {
            Some(process) => process.exited(),
            None => None,
        };
        if let Some(status) = died {
            tracing::warn!(%status, log = %self.config.log_path().display(),
                "haproxy exited; starting it again from the current pools");
            self.process = None;
            self.live = false;
            self.worker_pid = None;
        }
        let due = if self.process.is_none() {
            Instant::now() >= self.next_start
        } else {
            let wait = if self.dirty {
                Duration::from_secs(1)
            } else {
                RETRY
            };
            self.last_converge.elapsed() >= wait
        };
        if due {
            let outcome = self.converge().await;
            if let Some(failure) = outcome.failure {
                tracing::warn!(%failure, "load balancer not converged; retrying");
            }
        }
    }

    /// Starts HAProxy from the current pools (the first start, and after it died).
    async fn start(&mut self) -> Result<(), String> {
        if let Some(process) = self.process.take() {
            process.stop(STOP_GRACE).await;
        }
        self.live = false;
        self.worker_pid = None;
        let (mut desired, mut errors) = if self.told {
            let refused = self.refusals(&BTreeSet::new());
            desired_layout(&self.pools, &self.running, &refused)
        } else {
            (self.running.clone(), BTreeMap::new())
        };
        self.write_checked(&mut desired, &mut errors, Check::Now)
            .await?;
        let launch = Launch {
            binary: self.config.haproxy_bin.clone(),
            config: self.config.config_path(),
            master_socket: self.config.master_socket(),
            log: self.config.log_path(),
        };
        let mut process = HaproxyProcess::spawn(&launch).map_err(|e| e.to_string())?;
        process.record(&self.config.pid_path());
        let deadline = Instant::now() + START_LIMIT;
        let worker = loop {
            if let Some(status) = process.exited() {
                return Err(format!(
                    "haproxy exited at start ({status}); see {}",
                    self.config.log_path().display()
                ));
            }
            // The master socket's path may still reach an HAProxy an earlier agent left
            // running, until this one binds it: only this master's worker counts.
            if let Ok(list) = self.master.show_proc().await {
                if let (Some(worker), true) =
                    (list.worker_pid, list.master_pid == Some(process.pid()))
                {
                    break worker;
                }
            }
            if Instant::now() >= deadline {
                process.stop(STOP_GRACE).await;
                return Err(format!("haproxy did not start within {START_LIMIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        self.wait_admin_socket(worker).await;
        tracing::info!(
            master = process.pid(),
            worker,
            tiers = desired.len(),
            "haproxy started"
        );
        self.process = Some(process);
        self.worker_pid = Some(worker);
        self.rates = stats::Rates::default();
        self.running = loaded(desired);
        self.errors = errors;
        self.live = true;
        Ok(())
    }

    /// Converges HAProxy to `self.pools`.
    async fn converge(&mut self) -> ApplyOutcome {
        self.last_converge = Instant::now();
        let mut outcome = ApplyOutcome::default();
        if self.process.is_none() || !self.live {
            match self.start().await {
                Ok(()) => {
                    outcome.started = true;
                    self.start_backoff = Duration::from_millis(500);
                }
                Err(error) => {
                    tracing::error!(%error, "start haproxy");
                    self.next_start = Instant::now() + self.start_backoff;
                    self.start_backoff = (self.start_backoff * 2).min(Duration::from_secs(10));
                    outcome.failure = Some(error);
                }
            }
            self.dirty = outcome.failure.is_some();
            outcome.errors = self.errors.clone();
            return outcome;
        }
        if !self.told {
            // Serving what was restored; nothing to converge to yet.
            return outcome;
        }
        let served: BTreeSet<SocketAddr> = self
            .running
            .values()
            .map(|tier| tier.frontend.listen)
            .collect();
        let refused = self.refusals(&served);
        let (mut desired, mut errors) = desired_layout(&self.pools, &self.running, &refused);
        let actions = plan(&self.running, &desired);
        let mut reload = actions.iter().find_map(|action| match action {
            LbAction::Reload { reason } => Some(reason.clone()),
            _ => None,
        });
        if reload.is_none() && actions.iter().any(|a| *a != LbAction::WriteConfig) {
            match self.runtime(&actions).await {
                Ok(commands) => outcome.commands = commands,
                Err(error) => {
                    // The file brings every slot back whatever state the commands left.
                    tracing::warn!(%error, "runtime API change failed; reloading instead");
                    reload = Some(format!("a Runtime API command failed: {error}"));
                }
            }
        }
        let result = match &reload {
            Some(reason) => self.reload(reason, &mut desired, &mut errors).await,
            // Slots changed in place (or only versions moved on): the file follows.
            None => self
                .write_checked(&mut desired, &mut errors, Check::Deferred)
                .await
                .map(|()| self.running = desired),
        };
        match result {
            Ok(()) => outcome.reloaded = reload,
            Err(error) => outcome.failure = Some(error),
        }
        self.errors = errors;
        self.dirty = outcome.failure.is_some();
        outcome.errors = self.errors.clone();
        outcome
    }

    /// Tiers that cannot be served as asked: a listen address HAProxy does not already serve
    /// that cannot be bound, a certificate file that cannot be read.
    fn refusals(&self, served: &BTreeSet<SocketAddr>) -> BTreeMap<String, String> {
        let mut refused = BTreeMap::new();
        for pool in &self.pools {
            let balancer = &pool.load_balancer;
            let Some(listen) = balancer.listen else {
                continue;
            };
            if !served.contains(&listen) {
                if let Err(error) = test_bind(listen) {
                    refused.insert(
                        pool.tier.clone(),
                        format!("listen address {listen} cannot be bound: {error}"),
                    );
                    continue;
                }
            }
            if let Some(certificate) = &balancer.tls_certificate {
                if let Err(error) = std::fs::File::open(certificate) {
                    refused.insert(
                        pool.tier.clone(),
                        format!("TLS certificate {certificate} cannot be read: {error}"),
                    );
                }
            }
        }
        refused
    }

    /// Sends the Runtime API commands of `actions` on one connection to the current worker.
    async fn runtime(&mut self, actions: &[LbAction]) -> Result<usize, runtime::RuntimeError> {
        let mut session = self.admin.session().await?;
        let mut commands = 0;
        for action in actions {
            match action {
                LbAction::SetAddr {
                    tier,
                    slot,
                    address,
                    port,
                } => {
                    session
                        .set_addr(
                            &layout::backend_name(tier),
                            &layout::server_name(*slot),
                            *address,
                            *port,
                        )
                        .await?
                }
                LbAction::SetWeight { tier, slot, weight } => {
                    session
                        .set_weight(
                            &layout::backend_name(tier),
                            &layout::server_name(*slot),
                            *weight,
                        )
                        .await?
                }
                LbAction::SetState { tier, slot, state } => {
                    session
                        .set_state(
                            &layout::backend_name(tier),
                            &layout::server_name(*slot),
                            *state,
                        )
                        .await?
                }
                LbAction::WriteConfig | LbAction::Reload { .. } => continue,
            }
            commands += 1;
        }
        Ok(commands)
    }

    /// Renders `desired`, has HAProxy check it when it differs from what is written, and
    /// writes it. A file HAProxy refuses is blamed on the tiers new or changed since the
    /// running layout: they are left out (with the error) and the rest is tried again.
    ///
    /// `Check::Deferred` (slots changed in place, HAProxy already runs them) writes without
    /// `haproxy -c`: the file differs from a checked one only in server lines rendered from
    /// typed addresses, ports and weights, and the check (a process that parses the whole
    /// file, tens of ms of CPU) would otherwise run on every pool change. The next start or
    /// reload checks it first, written or not.
    async fn write_checked(
        &mut self,
        desired: &mut Layout,
        errors: &mut BTreeMap<String, String>,
        check: Check,
    ) -> Result<(), String> {
        let admin = self.config.admin_socket();
        let paths = RenderPaths {
            admin_socket: &admin,
        };
        let mut text = render(desired, &paths);
        let unchanged = self.written.as_deref() == Some(text.as_str());
        if unchanged && (self.written_checked || check == Check::Deferred) {
            return Ok(());
        }
        let candidate = self.config.state_dir.join("haproxy.cfg.new");
        write_file(&candidate, &text)?;
        let binary = self.config.haproxy_bin.clone();
        let checked = match check {
            Check::Now => check_config(&binary, &candidate, START_LIMIT).await,
            Check::Deferred => Ok(()),
        };
        if let Err(message) = checked {
            let suspects: Vec<String> = desired
                .iter()
                .filter(|(tier, layout)| {
                    self.running.get(*tier).map(|running| &running.frontend)
                        != Some(&layout.frontend)
                })
                .map(|(tier, _)| tier.clone())
                .collect();
            if suspects.is_empty() {
                return Err(format!("haproxy refused the configuration: {message}"));
            }
            for tier in &suspects {
                desired.remove(tier);
                errors.insert(
                    tier.clone(),
                    format!("haproxy refused the tier's configuration: {message}"),
                );
            }
            text = render(desired, &paths);
            write_file(&candidate, &text)?;
            check_config(&binary, &candidate, START_LIMIT)
                .await
                .map_err(|message| format!("haproxy refused the configuration: {message}"))?;
        }
        let path = self.config.config_path();
        std::fs::rename(&candidate, &path).map_err(|error| {
            format!(
                "rename {} to {}: {error}",
                candidate.display(),
                path.display()
            )
        })?;
        self.written = Some(text);
        self.written_checked = check == Check::Now;
        self.save_layout(desired);
        Ok(())
    }

    /// Saves the layout the file was just rendered from. A crash between the two writes
    /// leaves a layout that does not render to the file, which [`Converger::saved_layout`]
    /// then ignores.
    fn save_layout(&self, layout: &Layout) {
        let path = self.config.layout_path();
        let candidate = self.config.state_dir.join("layout.json.new");
        let saved = serde_json::to_string(layout)
            .map_err(|e| e.to_string())
            .and_then(|text| write_file(&candidate, &text))
            .and_then(|()| std::fs::rename(&candidate, &path).map_err(|e| e.to_string()));
        if let Err(error) = saved {
            tracing::warn!(%error, path = %path.display(), "save the rendered layout");
        }
    }

    /// The layout saved beside `haproxy.cfg`, if it renders exactly to the file there (so it
    /// says truly which slot holds which instance in it).
    fn saved_layout(&self) -> Option<Layout> {
        let text = std::fs::read_to_string(self.config.layout_path()).ok()?;
        let layout: Layout = serde_json::from_str(&text).ok()?;
        let file = std::fs::read_to_string(self.config.config_path()).ok()?;
        let admin = self.config.admin_socket();
        let paths = RenderPaths {
            admin_socket: &admin,
        };
        (!layout.is_empty() && render(&layout, &paths) == file).then_some(layout)
    }

    /// Writes the file for `desired` and reloads HAProxy through the master CLI, then waits
    /// for the new worker.
    async fn reload(
        &mut self,
        reason: &str,
        desired: &mut Layout,
        errors: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        self.write_checked(desired, errors, Check::Now).await?;
        let before = self.master.show_proc().await.map_err(|e| e.to_string())?;
        tracing::info!(%reason, "reloading haproxy");
        self.master.reload().await.map_err(|e| e.to_string())?;
        let deadline = Instant::now() + START_LIMIT;
        let worker = loop {
            // The master re-executes itself: its socket refuses connections for a moment.
            if let Ok(list) = self.master.show_proc().await {
                if list.failed_reloads > before.failed_reloads {
                    return Err(format!(
                        "haproxy's reload failed; see {}",
                        self.config.log_path().display()
                    ));
                }
                if list.reloads > before.reloads && list.worker_pid != before.worker_pid {
                    if let Some(worker) = list.worker_pid {
                        break worker;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("haproxy did not reload within {START_LIMIT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        self.wait_admin_socket(worker).await;
        // The new worker counts from zero: no rate is derived across the reload, even for a
        // counter that has climbed past its old value by the next report.
        self.rates = stats::Rates::default();
        self.reloads += 1;
        self.worker_pid = Some(worker);
        self.running = loaded(std::mem::take(desired));
        Ok(())
    }

    /// Waits (bounded) until the stats socket is answered by `worker`: right after a reload,
    /// the old worker may still hold it, and a command it takes is lost with it.
    async fn wait_admin_socket(&self, worker: u32) {
        let deadline = Instant::now() + START_LIMIT;
        while Instant::now() < deadline {
            if let Ok(info) = self.admin.command("show info").await {
                let pid = info
                    .lines()
                    .find_map(|line| line.strip_prefix("Pid: "))
                    .and_then(|pid| pid.trim().parse::<u32>().ok());
                if pid == Some(worker) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::warn!(
            worker,
            "haproxy's stats socket is not answered by the new worker"
        );
    }

    async fn report(&mut self) -> LbReport {
        let rows = match self.admin.show_stat().await {
            Ok(text) => stats::parse_show_stat(&text),
            Err(error) => {
                tracing::debug!(%error, "show stat");
                Vec::new()
            }
        };
        let find = |proxy: &str, service: &str| {
            rows.iter()
                .find(|row| row.proxy == proxy && row.service == service)
        };
        let mut tiers = Vec::new();
        let live = self.live;
        let now = Instant::now();
        let rates = &mut self.rates;
        // The request rate since the previous report, from the counter's delta; HAProxy's
        // own last-second `rate` when there is no baseline (first report, counter reset).
        let mut with_rate = |key: (String, Option<Uuid>), mut stats: LbStats| {
            if let Some(rate) = rates.sample(key, now, stats.total) {
                stats.request_rate = rate;
            }
            stats
        };
        for (tier, layout) in &self.running {
            if !live {
                break;
            }
            let backend = layout::backend_name(tier);
            let http = layout.frontend.mode == LbMode::Http;
            let servers = layout
                .slots
                .iter()
                .enumerate()
                .filter_map(|(index, slot)| {
                    let server = slot.as_ref()?;
                    let row = find(&backend, &layout::server_name(index));
                    Some(LbServerReport {
                        instance_id: server.instance_id,
                        status: row.map_or("UNKNOWN", |row| row.status()).to_string(),
                        stats: row
                            .map(|row| {
                                with_rate((tier.clone(), Some(server.instance_id)), row.stats(http))
                            })
                            .unwrap_or_default(),
                    })
                })
                .collect();
            tiers.push(LbTierReport {
                tier: tier.clone(),
                version: layout.version,
                error: None,
                stats: find(&backend, "BACKEND")
                    .map(|row| with_rate((tier.clone(), None), row.stats(http)))
                    .unwrap_or_else(LbStats::default),
                servers,
            });
        }
        let reported: BTreeSet<(String, Option<Uuid>)> = tiers
            .iter()
            .flat_map(|tier| {
                std::iter::once((tier.tier.clone(), None)).chain(
                    tier.servers
                        .iter()
                        .map(|server| (tier.tier.clone(), Some(server.instance_id))),
                )
            })
            .collect();
        self.rates.retain(|key| reported.contains(key));
        for (tier, error) in &self.errors {
            if live && self.running.contains_key(tier) {
                continue;
            }
            tiers.push(LbTierReport {
                tier: tier.clone(),
                version: 0,
                error: Some(error.clone()),
                stats: LbStats::default(),
                servers: Vec::new(),
            });
        }
        tiers.sort_by(|a, b| a.tier.cmp(&b.tier));
        let mut report = LbReport {
            worker_pid: self.worker_pid.filter(|_| live),
            reloads: self.reloads,
            tiers,
        };
        // HAProxy's messages can be long (every ALERT of a refused file).
        report.truncate_errors();
        report
    }
}

/// Whether [`Converger::write_checked`] has HAProxy check the file before it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Before a start or a reload.
    Now,
    /// After an in-place change through the Runtime API: checked by the next start or reload.
    Deferred,
}

/// A layout as HAProxy holds it right after reading its file.
fn loaded(mut layout: Layout) -> Layout {
    for tier in layout.values_mut() {
        tier.loaded_weights = layout::rendered_weights(tier);
    }
    layout
}

/// Writes `text` to `path` and syncs it: a crash leaves the old file or the new one.
fn write_file(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut file =
        std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// Binds and listens on `address` the way HAProxy does on Linux, then lets go: with
/// `SO_REUSEADDR` (a port in TIME_WAIT is bindable) and `SO_REUSEPORT` (HAProxy's default,
/// configuration manual `noreuseport`), so a port another HAProxy serves, such as a second LB
/// agent's on the same host, is bindable as it is for HAProxy itself, while one that another
/// program holds, or an address that is not local, is not.
fn test_bind(address: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(1)
}

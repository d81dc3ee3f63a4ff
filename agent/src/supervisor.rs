//! The supervisor converges this host's instances to the set the controller assigns.
//!
//! [`plan`] is pure: from the desired assignments and the instances the agent knows it
//! computes start / stop / keep actions. [`Supervisor::converge`] refreshes what it knows from
//! the drivers, plans, and executes. It is level-triggered: calling it again with the same
//! assignments does nothing new, so the caller may run it on every heartbeat answer and on a
//! timer.
//!
//! Policy: the agent never restarts an instance. One that failed stays `Failed` (with its
//! reason) while it is still assigned; replacing it, under a new id, is the controller's health
//! reconciler's decision. That keeps a crash-looping workload from being hidden by restarts
//! and keeps one writer (the controller) for "which instances exist".
//!
//! Instances survive an agent restart: [`Supervisor::open`] reads the state dir and adopts
//! every recorded instance whose process is still the recorded one (pid and start time), and
//! the next converge keeps it (no duplicate, no restart) or stops it when it is no longer
//! assigned here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use strata_api::{HealthCheck, Template};

use crate::driver::{
    unix_millis, Accel, Driver, DriverError, DriverKind, ExitRecord, InstanceRecord, LogPaths,
    Observation, ProcessDriver, QemuConfig, QemuDriver, StartRequest,
};
use crate::health::{spawn_prober, HealthState, HealthStatus, ProbeTarget, ProberHandle};
use crate::procfs;
use crate::state::{StateDir, StateError};

/// One instance the controller wants on this node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    pub instance_id: Uuid,
    pub tier: String,
    pub template: Template,
    #[serde(default)]
    pub health: HealthCheck,
}

/// An instance's lifecycle as the agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstancePhase {
    /// Running, not yet seen healthy.
    Starting,
    /// Seen healthy at least once (its current health is reported separately).
    Running,
    /// Failed to start, or ended without the agent asking. Terminal.
    Failed,
    /// Stopped by the agent. Terminal.
    Terminated,
}

/// What can happen to an instance's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseEvent {
    HealthyObserved,
    ExitedOnItsOwn,
    StoppedByAgent,
}

/// The phase lifecycle: `Starting → Running`, either of them `→ Failed` on an unasked exit,
/// anything `→ Terminated` when the agent stops it; `Failed` and `Terminated` never come back.
pub fn next_phase(phase: InstancePhase, event: PhaseEvent) -> InstancePhase {
    use InstancePhase::*;
    match (phase, event) {
        (Terminated, _) => Terminated,
        (_, PhaseEvent::StoppedByAgent) => Terminated,
        (Failed, _) => Failed,
        (_, PhaseEvent::ExitedOnItsOwn) => Failed,
        (Starting | Running, PhaseEvent::HealthyObserved) => Running,
    }
}

/// One step of a convergence.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Stop the instance and forget it: it is not assigned here (any more).
    Stop { instance_id: Uuid },
    /// Start a new instance from its assignment.
    Start { instance_id: Uuid },
    /// Assigned and known: leave it alone (running, or failed and awaiting replacement).
    Keep { instance_id: Uuid },
}

/// Plans a convergence: stops first (they free ports and memory for the starts), then starts,
/// then keeps, each in instance-id order. A duplicated assignment counts once.
///
/// Guarantees: every known instance appears exactly once (stop or keep); every assigned
/// instance appears exactly once (start or keep); nothing known is ever started again.
pub fn plan(desired: &[Assignment], known: &BTreeSet<Uuid>) -> Vec<Action> {
    let wanted: BTreeSet<Uuid> = desired.iter().map(|a| a.instance_id).collect();
    let stops = known
        .difference(&wanted)
        .map(|&instance_id| Action::Stop { instance_id });
    let starts = wanted
        .difference(known)
        .map(|&instance_id| Action::Start { instance_id });
    let keeps = wanted
        .intersection(known)
        .map(|&instance_id| Action::Keep { instance_id });
    stops.chain(starts).chain(keeps).collect()
}

/// What the supervisor tells the controller about one instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub instance_id: Uuid,
    pub tier: String,
    pub driver: DriverKind,
    pub phase: InstancePhase,
    /// Why it failed or was stopped, or why its health check fails.
    pub reason: Option<String>,
    /// Where it serves (host address and port); `None` if it never started.
    pub address: Option<SocketAddr>,
    pub pid: Option<i32>,
    /// CPU cores used (whole process group) since the previous report; `None` on the first.
    pub cpu_cores: Option<f64>,
    /// `cpu_cores` as a percentage of the template's CPU reservation.
    pub cpu_utilization_percent: Option<f64>,
    pub health: HealthStatus,
    pub accel: Option<Accel>,
    /// True when a previous agent process started it.
    pub adopted: bool,
    pub logs: LogPaths,
}

/// The result of one converge call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConvergeOutcome {
    pub actions: Vec<Action>,
    /// Actions that did not complete; they are retried on the next converge.
    pub failures: Vec<ActionFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionFailure {
    pub instance_id: Uuid,
    pub error: String,
}

#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// The agent's state dir; instances live under `instances/`.
    pub data_dir: PathBuf,
    /// The address instances are reached at; ports are allocated on it.
    pub advertise_ip: IpAddr,
    /// The ports instances are given (`--instance-ports`). Kept below the kernel's ephemeral
    /// range (`net.ipv4.ip_local_port_range`, 32768-60999 by default) so that an outgoing
    /// connection of any program cannot take a port between its allocation and the instance's
    /// bind; Nomad's dynamic port range (20000-32000) is chosen the same way.
    pub instance_ports: RangeInclusive<u16>,
    /// Time between SIGTERM and SIGKILL when stopping an instance.
    pub stop_grace: Duration,
    pub qemu: QemuConfig,
    /// The user process instances run as when their template names none (`--run-as`);
    /// `None`: the agent's own user.
    pub run_as: Option<String>,
}

impl SupervisorConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        SupervisorConfig {
            data_dir: data_dir.into(),
            advertise_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            instance_ports: DEFAULT_INSTANCE_PORTS,
            stop_grace: Duration::from_secs(10),
            qemu: QemuConfig::default(),
            run_as: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("open state dir: {0}")]
    State(#[from] StateError),
}

/// The drivers a supervisor uses; replaceable in tests (fault injection).
#[derive(Clone)]
pub struct Drivers {
    pub process: Arc<dyn Driver>,
    pub qemu: Arc<dyn Driver>,
}

impl Drivers {
    pub fn real(config: &SupervisorConfig) -> Self {
        Drivers {
            process: Arc::new(ProcessDriver::with_default_user(config.run_as.clone())),
            qemu: Arc::new(QemuDriver::new(config.qemu.clone())),
        }
    }

    fn get(&self, kind: DriverKind) -> Arc<dyn Driver> {
        match kind {
            DriverKind::Process => self.process.clone(),
            DriverKind::Qemu => self.qemu.clone(),
        }
    }
}

/// What the supervisor knows about one instance.
struct Managed {
    record: InstanceRecord,
    phase: InstancePhase,
    reason: Option<String>,
    adopted: bool,
    /// The check the prober runs; `None` until the instance is assigned (an adopted instance
    /// gets its check from the first converge).
    health_check: Option<HealthCheck>,
    prober: Option<ProberHandle>,
    /// The last health state seen, kept after the prober stops.
    last_health: HealthState,
    cpu_reservation: Option<f64>,
    last_cpu_sample: Option<(u64, Instant)>,
    cpu_cores: Option<f64>,
}

impl Managed {
    fn new(record: InstanceRecord, phase: InstancePhase, adopted: bool) -> Self {
        let reason = record.exit.as_ref().map(|exit| exit.reason.clone());
        Managed {
            record,
            phase,
            reason,
            adopted,
            health_check: None,
            prober: None,
            last_health: HealthState::new(),
            cpu_reservation: None,
            last_cpu_sample: None,
            cpu_cores: None,
        }
    }

    fn is_live(&self) -> bool {
        self.record.exit.is_none() && self.record.process.is_some()
    }

    fn health(&self) -> HealthState {
        match &self.prober {
            Some(prober) => prober.current(),
            None => self.last_health.clone(),
        }
    }

    fn report(&self) -> InstanceReport {
        let health = self.health();
        let live = self.is_live();
        let reason = self.reason.clone().or_else(|| {
            (live && health.status != HealthStatus::Healthy)
                .then(|| health.last_failure.clone())
                .flatten()
        });
        InstanceReport {
            instance_id: self.record.instance_id,
            tier: self.record.tier.clone(),
            driver: self.record.driver,
            phase: self.phase,
            reason,
            address: self.record.process.is_some().then_some(self.record.address),
            pid: self
                .record
                .process
                .filter(|_| live)
                .map(|identity| identity.pid),
            cpu_cores: self.cpu_cores.filter(|_| live),
            cpu_utilization_percent: self
                .cpu_cores
                .filter(|_| live)
                .zip(self.cpu_reservation.filter(|cpu| *cpu > 0.0))
                .map(|(used, reserved)| used / reserved * 100.0),
            health: health.status,
            accel: self.record.accel,
            adopted: self.adopted,
            logs: self.record.logs.clone(),
        }
    }

    async fn stop_prober(&mut self) {
        if let Some(prober) = self.prober.take() {
            self.last_health = prober.current();
            prober.shutdown().await;
        }
    }
}

pub struct Supervisor {
    config: SupervisorConfig,
    state: StateDir,
    drivers: Drivers,
    instances: BTreeMap<Uuid, Managed>,
    /// Final reports of instances stopped since the last `report`, so the controller hears
    /// about each termination once.
    departed: Vec<InstanceReport>,
    http: reqwest::Client,
    /// Parent of every prober's token: cancelling it stops them all.
    cancel: CancellationToken,
    ticks_per_second: u64,
}

impl Supervisor {
    /// Opens the state dir and adopts every recorded instance. Starts and stops nothing: the
    /// first [`converge`](Self::converge) decides.
    pub async fn open(config: SupervisorConfig) -> Result<Supervisor, SupervisorError> {
        let drivers = Drivers::real(&config);
        Self::open_with_drivers(config, drivers).await
    }

    pub async fn open_with_drivers(
        config: SupervisorConfig,
        drivers: Drivers,
    ) -> Result<Supervisor, SupervisorError> {
        let state = StateDir::open(&config.data_dir)?;
        let (records, unreadable) = state.load_all()?;
        for problem in unreadable {
            tracing::warn!(path = %problem.path.display(), problem = %problem.problem,
                "ignoring unreadable instance record");
        }
        let mut instances = BTreeMap::new();
        for record in records {
            let instance_id = record.instance_id;
            let phase = match (&record.exit, drivers.get(record.driver).adopt(&record)) {
                (Some(exit), _) if exit.stopped_by_agent => InstancePhase::Terminated,
                (Some(_), _) => InstancePhase::Failed,
                (None, Observation::Alive { pid, .. }) => {
                    tracing::info!(instance = %instance_id, pid, "adopted running instance");
                    InstancePhase::Starting
                }
                // The exit is recorded by the first refresh, like any other exit.
                (None, _) => InstancePhase::Starting,
            };
            instances.insert(instance_id, Managed::new(record, phase, true));
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let mut supervisor = Supervisor {
            config,
            state,
            drivers,
            instances,
            departed: Vec::new(),
            http,
            cancel: CancellationToken::new(),
            ticks_per_second: procfs::clock_ticks_per_second(),
        };
        supervisor.refresh().await;
        Ok(supervisor)
    }

    /// Brings this host to `desired`: plans, then stops, starts and keeps. Errors of single
    /// actions are returned in the outcome (and retried by the next call), not raised.
    #[tracing::instrument(name = "converge", skip_all, fields(desired = desired.len()))]
    pub async fn converge(&mut self, desired: &[Assignment]) -> ConvergeOutcome {
        self.refresh().await;
        let known: BTreeSet<Uuid> = self.instances.keys().copied().collect();
        let actions = plan(desired, &known);
        let by_id: BTreeMap<Uuid, &Assignment> =
            desired.iter().rev().map(|a| (a.instance_id, a)).collect();
        let mut failures = Vec::new();

        let stops: Vec<Uuid> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Stop { instance_id } => Some(*instance_id),
                _ => None,
            })
            .collect();
        failures.extend(
            self.stop_instances(&stops, "no longer assigned to this node")
                .await,
        );

        for action in &actions {
            let result = match action {
                Action::Stop { .. } => continue,
                Action::Start { instance_id } => match by_id.get(instance_id) {
                    Some(assignment) => self.start(assignment),
                    None => continue,
                },
                Action::Keep { instance_id } => match by_id.get(instance_id) {
                    Some(assignment) => {
                        self.keep(assignment);
                        Ok(())
                    }
                    None => continue,
                },
            };
            if let Err(error) = result {
                let instance_id = match action {
                    Action::Start { instance_id }
                    | Action::Keep { instance_id }
                    | Action::Stop { instance_id } => *instance_id,
                };
                tracing::warn!(instance = %instance_id, %error, "converge action failed");
                failures.push(ActionFailure { instance_id, error });
            }
        }
        ConvergeOutcome { actions, failures }
    }

    /// The state of every instance, refreshed from the drivers, plus the final reports of
    /// instances stopped since the previous call.
    pub async fn report(&mut self) -> Vec<InstanceReport> {
        self.refresh().await;
        let mut reports = std::mem::take(&mut self.departed);
        reports.extend(self.instances.values().map(Managed::report));
        reports
    }

    /// A receiver of an instance's health state changes (for callers that wait for a verdict).
    pub fn health_watch(
        &self,
        instance_id: Uuid,
    ) -> Option<tokio::sync::watch::Receiver<HealthState>> {
        self.instances
            .get(&instance_id)?
            .prober
            .as_ref()
            .map(ProberHandle::subscribe)
    }

    /// Stops the probers and returns. Instances keep running: they belong to the node, not to
    /// this agent process, and the next agent process adopts them.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for managed in self.instances.values_mut() {
            managed.stop_prober().await;
        }
    }

    /// Looks at every live instance: records exits (and cleans up what is left of their
    /// process groups), samples CPU, and advances phases from health.
    async fn refresh(&mut self) {
        let now = Instant::now();
        let mut exited = Vec::new();
        for (instance_id, managed) in &mut self.instances {
            if !managed.is_live() {
                continue;
            }
            match self
                .drivers
                .get(managed.record.driver)
                .inspect(&managed.record)
            {
                Observation::Alive { cpu_ticks, .. } => {
                    if let Some((ticks, at)) = managed.last_cpu_sample {
                        let seconds = now.duration_since(at).as_secs_f64();
                        if seconds > 0.0 && cpu_ticks >= ticks {
                            managed.cpu_cores = Some(
                                (cpu_ticks - ticks) as f64 / self.ticks_per_second as f64 / seconds,
                            );
                        }
                    }
                    managed.last_cpu_sample = Some((cpu_ticks, now));
                    if managed.health().status == HealthStatus::Healthy {
                        managed.phase = next_phase(managed.phase, PhaseEvent::HealthyObserved);
                    }
                }
                Observation::Exited { reason } => exited.push((*instance_id, reason)),
                Observation::NotRunning => {}
            }
        }
        for (instance_id, reason) in exited {
            let Some(managed) = self.instances.get_mut(&instance_id) else {
                continue;
            };
            tracing::warn!(instance = %instance_id, %reason, "instance ended on its own");
            managed.stop_prober().await;
            // Helpers the workload forked may outlive it; they belong to the instance.
            let driver = self.drivers.get(managed.record.driver);
            let record = managed.record.clone();
            let grace = self.config.stop_grace;
            match tokio::task::spawn_blocking(move || driver.stop(&record, grace)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(instance = %instance_id, %error, "clean up exited instance")
                }
                Err(error) => {
                    tracing::warn!(instance = %instance_id, %error, "clean up task failed")
                }
            }
            managed.phase = next_phase(managed.phase, PhaseEvent::ExitedOnItsOwn);
            managed.reason = Some(reason.clone());
            managed.record.exit = Some(ExitRecord {
                stopped_by_agent: false,
                reason,
                at_ms: unix_millis(),
            });
            if let Err(error) = self.state.save(&managed.record) {
                tracing::warn!(instance = %instance_id, %error, "record instance exit");
            }
        }
    }

    /// Stops instances concurrently; each successfully stopped one is forgotten and reported
    /// once as `Terminated`.
    async fn stop_instances(&mut self, ids: &[Uuid], why: &str) -> Vec<ActionFailure> {
        let mut tasks = JoinSet::new();
        for instance_id in ids {
            let Some(mut managed) = self.instances.remove(instance_id) else {
                continue;
            };
            managed.stop_prober().await;
            let driver = self.drivers.get(managed.record.driver);
            let grace = self.config.stop_grace;
            tasks.spawn_blocking(move || {
                let result = driver.stop(&managed.record, grace);
                (managed, result)
            });
        }
        let mut failures = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (mut managed, result) = match joined {
                Ok(done) => done,
                Err(error) => {
                    // The managed entry went down with the task; the record on disk remains,
                    // so the next agent process would adopt and stop it.
                    tracing::error!(%error, "stop task panicked");
                    continue;
                }
            };
            let instance_id = managed.record.instance_id;
            match result {
                Ok(outcome) => {
                    tracing::info!(instance = %instance_id, ?outcome, why, "stopped instance");
                    if let Err(error) = self.state.remove(instance_id) {
                        tracing::warn!(instance = %instance_id, %error, "remove instance dir");
                    }
                    managed.phase = next_phase(managed.phase, PhaseEvent::StoppedByAgent);
                    managed.reason = Some(format!("stopped: {why}"));
                    managed.record.exit = Some(ExitRecord {
                        stopped_by_agent: true,
                        reason: format!("stopped: {why}"),
                        at_ms: unix_millis(),
                    });
                    self.departed.push(managed.report());
                }
                Err(error) => {
                    failures.push(ActionFailure {
                        instance_id,
                        error: format!("stop: {error}"),
                    });
                    self.instances.insert(instance_id, managed);
                }
            }
        }
        failures
    }

    fn start(&mut self, assignment: &Assignment) -> Result<(), String> {
        let instance_id = assignment.instance_id;
        let in_use: BTreeSet<u16> = self
            .instances
            .values()
            .map(|managed| managed.record.address.port())
            .collect();
        let dir = self
            .state
            .create_instance_dir(instance_id)
            .map_err(|error| error.to_string())?;
        // The api's validation requires a driver for local tiers; an assignment without one is
        // read as the simplest kind.
        let kind = assignment.template.driver.unwrap_or(DriverKind::Process);
        let started = allocate_port(
            self.config.advertise_ip,
            self.config.instance_ports.clone(),
            &in_use,
        )
        .map_err(|source| DriverError::Spawn {
            program: "port allocation".to_string(),
            source,
        })
        .and_then(|host_port| {
            self.drivers.get(kind).start(&StartRequest {
                instance_id,
                tier: &assignment.tier,
                template: &assignment.template,
                dir: &dir,
                advertise_ip: self.config.advertise_ip,
                host_port,
            })
        });
        let (record, phase) = match started {
            Ok(record) => (record, InstancePhase::Starting),
            Err(error) => {
                tracing::warn!(instance = %instance_id, %error, "instance failed to start");
                let record = InstanceRecord {
                    instance_id,
                    tier: assignment.tier.clone(),
                    driver: kind,
                    address: SocketAddr::new(self.config.advertise_ip, 0),
                    process: None,
                    logs: LogPaths {
                        stdout: dir.join("stdout.log"),
                        stderr: dir.join("stderr.log"),
                        console: None,
                    },
                    accel: None,
                    guest_port: None,
                    started_at_ms: unix_millis(),
                    exit: Some(ExitRecord {
                        stopped_by_agent: false,
                        reason: error.to_string(),
                        at_ms: unix_millis(),
                    }),
                };
                (record, InstancePhase::Failed)
            }
        };
        if let Err(error) = self.state.save(&record) {
            // An instance without a record would be forgotten by the next agent process and
            // run unowned forever, so it must not keep running.
            let driver = self.drivers.get(kind);
            if let Err(stop_error) = driver.stop(&record, Duration::from_secs(1)) {
                tracing::error!(instance = %instance_id, %stop_error, "stop unrecorded instance");
            }
            return Err(format!("record started instance: {error}"));
        }
        let mut managed = Managed::new(record, phase, false);
        managed.cpu_reservation = Some(assignment.template.cpu);
        self.instances.insert(instance_id, managed);
        self.keep(assignment);
        Ok(())
    }

    /// Makes sure a live instance is probed with the assigned check.
    fn keep(&mut self, assignment: &Assignment) {
        let Some(managed) = self.instances.get_mut(&assignment.instance_id) else {
            return;
        };
        managed.cpu_reservation = Some(assignment.template.cpu);
        if !managed.is_live() {
            return;
        }
        let same_check = managed.health_check.as_ref() == Some(&assignment.health);
        if same_check && managed.prober.is_some() {
            return;
        }
        if let Some(old) = managed.prober.take() {
            // Dropping the handle cancels the old task; it holds nothing that needs awaiting.
            managed.last_health = old.current();
        }
        let started_ago =
            Duration::from_millis(unix_millis().saturating_sub(managed.record.started_at_ms));
        managed.health_check = Some(assignment.health.clone());
        managed.prober = Some(spawn_prober(
            self.http.clone(),
            ProbeTarget {
                address: managed.record.address,
                check: assignment.health.clone(),
            },
            started_ago,
            &self.cancel,
        ));
    }
}

/// The default of [`SupervisorConfig::instance_ports`].
pub const DEFAULT_INSTANCE_PORTS: RangeInclusive<u16> = 20000..=32000;

/// A port of `range` on `ip` that is free right now and not used by another instance. The
/// search starts at a random port, so agents sharing a host (and a range) rarely probe the
/// same one at once. Another program may still bind it before the instance does; the
/// instance then fails and is replaced.
pub fn allocate_port(
    ip: IpAddr,
    range: RangeInclusive<u16>,
    in_use: &BTreeSet<u16>,
) -> std::io::Result<u16> {
    let (low, high) = (*range.start(), *range.end());
    if low == 0 || low > high {
        return Err(std::io::Error::other(format!(
            "the instance port range {low}-{high} is empty"
        )));
    }
    let size = u32::from(high - low) + 1;
    let first = rand::Rng::gen_range(&mut rand::thread_rng(), 0..size);
    for step in 0..size {
        let port = low + ((first + step) % size) as u16;
        if in_use.contains(&port) {
            continue;
        }
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!(
        "no free port on {ip} in the instance port range {low}-{high}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn assignment(n: u128) -> Assignment {
        Assignment {
            instance_id: id(n),
            tier: "web".into(),
            template: Template::default(),
            health: HealthCheck::default(),
        }
    }

    fn start(n: u128) -> Action {
        Action::Start { instance_id: id(n) }
    }
    fn stop(n: u128) -> Action {
        Action::Stop { instance_id: id(n) }
    }
    fn keep(n: u128) -> Action {
        Action::Keep { instance_id: id(n) }
    }

    /// A named case: desired ids, known ids, the expected plan.
    type Case<'a> = (&'a str, &'a [u128], &'a [u128], &'a [Action]);

    #[test]
    fn plan_golden() {
        let cases: &[Case<'_>] = &[
            ("nothing to do", &[], &[], &[]),
            (
                "fresh node starts everything in id order",
                &[3, 1, 2],
                &[],
                &[start(1), start(2), start(3)],
            ),
            (
                "empty assignment stops everything",
                &[],
                &[2, 1],
                &[stop(1), stop(2)],
            ),
            (
                "after a restart, known instances are kept, not started",
                &[1, 2],
                &[1, 2],
                &[keep(1), keep(2)],
            ),
            (
                "mixed: stops before starts before keeps",
                &[2, 3, 5],
                &[1, 2, 4],
                &[stop(1), stop(4), start(3), start(5), keep(2)],
            ),
            (
                "a duplicated assignment starts once",
                &[7, 7],
                &[],
                &[start(7)],
            ),
        ];
        for (name, desired, known, expected) in cases {
            let desired: Vec<Assignment> = desired.iter().map(|n| assignment(*n)).collect();
            let known: BTreeSet<Uuid> = known.iter().map(|n| id(*n)).collect();
            assert_eq!(plan(&desired, &known), *expected, "{name}");
        }
    }

    proptest::proptest! {
        #[test]
        fn plan_covers_each_instance_once(
            desired in proptest::collection::vec(0u128..20, 0..15),
            known in proptest::collection::btree_set(0u128..20, 0..15),
        ) {
            let desired: Vec<Assignment> = desired.iter().map(|n| assignment(*n)).collect();
            let known: BTreeSet<Uuid> = known.iter().map(|n| id(*n)).collect();
            let actions = plan(&desired, &known);
            let mut seen = BTreeSet::new();
            for action in &actions {
                let (Action::Start { instance_id } | Action::Stop { instance_id }
                    | Action::Keep { instance_id }) = action;
                proptest::prop_assert!(seen.insert(*instance_id), "twice: {instance_id}");
                let wanted = desired.iter().any(|a| a.instance_id == *instance_id);
                match action {
                    Action::Start { .. } => proptest::prop_assert!(wanted && !known.contains(instance_id)),
                    Action::Stop { .. } => proptest::prop_assert!(!wanted && known.contains(instance_id)),
                    Action::Keep { .. } => proptest::prop_assert!(wanted && known.contains(instance_id)),
                }
            }
            // Running the plan and planning again yields keeps only: convergence is reached.
            let after: BTreeSet<Uuid> = desired.iter().map(|a| a.instance_id).collect();
            let settled = plan(&desired, &after)
                .iter()
                .all(|action| matches!(action, Action::Keep { .. }));
            proptest::prop_assert!(settled, "a second plan must only keep");
        }
    }

    #[test]
    fn phase_transitions_exhaustive() {
        use InstancePhase::*;
        use PhaseEvent::*;
        let expected = [
            ((Starting, HealthyObserved), Running),
            ((Starting, ExitedOnItsOwn), Failed),
            ((Starting, StoppedByAgent), Terminated),
            ((Running, HealthyObserved), Running),
            ((Running, ExitedOnItsOwn), Failed),
            ((Running, StoppedByAgent), Terminated),
            ((Failed, HealthyObserved), Failed),
            ((Failed, ExitedOnItsOwn), Failed),
            ((Failed, StoppedByAgent), Terminated),
            ((Terminated, HealthyObserved), Terminated),
            ((Terminated, ExitedOnItsOwn), Terminated),
            ((Terminated, StoppedByAgent), Terminated),
        ];
        for ((phase, event), next) in expected {
            assert_eq!(next_phase(phase, event), next, "{phase:?} + {event:?}");
        }
    }

    #[test]
    fn allocates_distinct_free_ports() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let first = allocate_port(ip, DEFAULT_INSTANCE_PORTS, &BTreeSet::new()).expect("port");
        let second =
            allocate_port(ip, DEFAULT_INSTANCE_PORTS, &BTreeSet::from([first])).expect("port");
        assert_ne!(first, second);
        assert!(
            DEFAULT_INSTANCE_PORTS.contains(&first) && DEFAULT_INSTANCE_PORTS.contains(&second)
        );
        TcpListener::bind((ip, second)).expect("allocated port is bindable");
    }

    #[test]
    fn a_range_with_every_port_taken_is_a_clear_error() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let held = TcpListener::bind((ip, 0)).expect("bind");
        let port = held.local_addr().expect("addr").port();
        let error = allocate_port(ip, port..=port, &BTreeSet::new()).expect_err("taken");
        assert!(error.to_string().contains("no free port"), "{error}");
        let free = allocate_port(ip, 20000..=20001, &BTreeSet::from([20000, 20001]));
        assert!(
            free.is_err(),
            "ports of other instances are skipped: {free:?}"
        );
        #[allow(clippy::reversed_empty_ranges)]
        let empty = allocate_port(ip, 30..=20, &BTreeSet::new());
        assert!(empty.is_err());
    }
}

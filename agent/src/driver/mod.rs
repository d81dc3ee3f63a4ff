//! Drivers run instances on this host: `process` (a child process group) and `qemu` (a VM from
//! a kernel and an initramfs, itself a child process group).
//!
//! A driver starts an instance and returns an [`InstanceRecord`], which the supervisor
//! persists; everything a driver later does (inspect, adopt, stop) works from that record
//! alone, so it works the same for a child this agent process spawned and for one a previous
//! agent process spawned before a restart.
//!
//! Both drivers share [`group::ProcessGroups`]: every instance is the leader of its own process
//! group (`pgid == pid`), so stopping it signals the whole group, and a helper the workload
//! forks cannot outlive it.

pub mod group;
pub mod process;
pub mod qemu;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use strata_api::Driver as DriverKind;
use strata_api::Template;

pub use group::ProcessIdentity;
pub use process::ProcessDriver;
pub use qemu::{Accel, AccelChoice, QemuConfig, QemuDriver};

/// What a driver needs to start one instance.
#[derive(Clone, Debug)]
pub struct StartRequest<'a> {
    pub instance_id: Uuid,
    pub tier: &'a str,
    pub template: &'a Template,
    /// The instance's own directory in the agent's state dir; it exists already. Logs go here.
    pub dir: &'a Path,
    /// The host address the instance is reached at (and its port bound on).
    pub advertise_ip: IpAddr,
    /// A free port on `advertise_ip` the agent allocated: the process listens on it (`PORT`), or
    /// qemu forwards it to the guest's port.
    pub host_port: u16,
}

/// Where an instance's output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPaths {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// qemu only: the guest's serial console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<PathBuf>,
}

/// How an instance ended, once it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// `true` when the agent stopped it on purpose; `false` when it failed to start or ended on
    /// its own (a server that exits by itself has failed, whatever its exit code).
    pub stopped_by_agent: bool,
    pub reason: String,
    pub at_ms: u64,
}

/// Everything the agent remembers about one instance, persisted as `record.json` in the
/// instance's directory. It is written before the agent acts on a started instance, so a crash
/// right after a start cannot forget the process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance_id: Uuid,
    pub tier: String,
    pub driver: DriverKind,
    /// Where the workload is reachable from the host (advertise IP and host port).
    pub address: SocketAddr,
    /// `None` when the instance never started (its `exit` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessIdentity>,
    pub logs: LogPaths,
    /// qemu only: the accelerator the VM runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// The guest's port (qemu), for the operator; process instances listen on `address` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_port: Option<u16>,
    /// Unix milliseconds of the start.
    pub started_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitRecord>,
}

/// What a driver sees when it looks at an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// The instance's leader process is running. `cpu_ticks` is the CPU time of every live
    /// process of its group, reaped children included, in clock ticks.
    Alive { pid: i32, cpu_ticks: u64 },
    /// The leader is gone; `reason` says how it ended as far as it can be known.
    Exited { reason: String },
    /// The record says the instance never started or already ended.
    NotRunning,
}

/// How a stop went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Nothing of the instance was running.
    AlreadyGone,
    /// The group exited after SIGTERM within the grace time.
    Terminated,
    /// The group had to be killed with SIGKILL.
    Killed,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid template: {0}")]
    InvalidTemplate(String),
    #[error("{what} {path} is missing: {source}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("open log file {path}: {source}")]
    OpenLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("start {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("process {pid} vanished before the agent could record its identity")]
    Identity { pid: u32 },
    #[error("signal process group {pgid}: {source}")]
    Signal {
        pgid: i32,
        source: nix::errno::Errno,
    },
    #[error("process group {pgid} still has {remaining} live processes after SIGKILL")]
    StopTimeout { pgid: i32, remaining: usize },
}

/// Starts, inspects, adopts and stops instances of one kind.
///
/// Methods block (a stop waits up to its grace time plus a short SIGKILL wait); async callers
/// run them on the blocking pool.
pub trait Driver: Send + Sync {
    fn kind(&self) -> DriverKind;

    /// Starts an instance. An error means nothing is left running.
    fn start(&self, request: &StartRequest<'_>) -> Result<InstanceRecord, DriverError>;

    /// Looks at an instance this driver knows (started or adopted).
    fn inspect(&self, record: &InstanceRecord) -> Observation;

    /// Takes over an instance found in the state dir after an agent restart: verifies that the
    /// recorded process is still the same one (pid and start time) and reports what it sees.
    /// Never starts or restarts anything.
    fn adopt(&self, record: &InstanceRecord) -> Observation;

    /// Stops an instance: SIGTERM to its process group, SIGKILL after `grace`, and waits until
    /// no process of the group is left.
    fn stop(&self, record: &InstanceRecord, grace: Duration) -> Result<StopOutcome, DriverError>;
}

/// Unix milliseconds now (for records and reports only; planners never read the clock).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The last non-empty line of a log file, to explain an exit without making the operator open
/// the file. Reads at most the final 4 KiB.
pub fn last_log_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let length = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(4096)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(|line| line.chars().take(300).collect())
}

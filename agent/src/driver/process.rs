//! The `process` driver: the tier's command as a child process group on this host.
//!
//! The program finds its port in `PORT` and its identity in `STRATA_INSTANCE_ID`. Its
//! environment is exactly `PATH` (the agent's, or a default), `PORT`, `STRATA_INSTANCE_ID` and
//! the template's `env`: nothing of the agent's own environment (which may hold a token) leaks
//! into a workload. Output goes to `stdout.log` and `stderr.log` in the instance's directory.
//!
//! With a user (`template.user`, or the agent's `--run-as`), the program runs under that
//! user's uid and primary gid with no supplementary groups (std's `CommandExt::uid` drops them
//! when the parent is root), and its working directory is the user's home (or `/`): the
//! agent's data dir, which holds the node credential, is the agent's alone (0700).

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::group::ProcessGroups;
use super::{
    unix_millis, Driver, DriverError, DriverKind, InstanceRecord, LogPaths, Observation,
    StartRequest, StopOutcome,
};

/// `PATH` of an instance when the agent itself has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Cheap to clone: clones share the table of spawned children.
#[derive(Clone, Debug, Default)]
pub struct ProcessDriver {
    groups: ProcessGroups,
    /// The user instances run as when their template names none (`--run-as`).
    default_user: Option<String>,
}

impl ProcessDriver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Instances whose template names no user run as `user`.
    pub fn with_default_user(user: Option<String>) -> Self {
        ProcessDriver {
            groups: ProcessGroups::default(),
            default_user: user,
        }
    }
}

/// The account an instance runs under.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// Looks `name` up in the user database. Running as another user needs root; running as
/// oneself is allowed (and changes nothing).
fn run_as(name: &str) -> Result<RunAs, DriverError> {
    let invalid = |detail: String| DriverError::InvalidTemplate(detail);
    let user = nix::unistd::User::from_name(name)
        .map_err(|error| invalid(format!("look up user {name:?}: {error}")))?
        .ok_or_else(|| invalid(format!("user {name:?} does not exist on this host")))?;
    let me = nix::unistd::geteuid();
    if !me.is_root() && me != user.uid {
        return Err(invalid(format!(
            "running instances as user {name:?} needs an agent running as root"
        )));
    }
    Ok(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn start(&self, request: &StartRequest<'_>) -> Result<InstanceRecord, DriverError> {
        let Some((program, args)) = request.template.command.split_first() else {
            return Err(DriverError::InvalidTemplate(
                "the process driver needs a non-empty `command`".to_string(),
            ));
        };
        let logs = LogPaths {
            stdout: request.dir.join("stdout.log"),
            stderr: request.dir.join("stderr.log"),
            console: None,
        };
        let user = request
            .template
            .user
            .as_deref()
            .or(self.default_user.as_deref())
            .map(run_as)
            .transpose()?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            )
            .envs(&request.template.env)
            .env("PORT", request.host_port.to_string())
            .env("STRATA_INSTANCE_ID", request.instance_id.to_string())
            .stdin(Stdio::null())
            .stdout(open_log(&logs.stdout)?)
            .stderr(open_log(&logs.stderr)?);
        match &user {
            None => {
                command.current_dir(request.dir);
            }
            Some(user) => {
                let home = if user.home.is_dir() {
                    user.home.clone()
                } else {
                    PathBuf::from("/")
                };
                command.uid(user.uid).gid(user.gid).current_dir(home);
            }
        }
        let identity = self.groups.spawn(command, program)?;
        tracing::info!(
            instance = %request.instance_id,
            pid = identity.pid,
            port = request.host_port,
            "started process instance"
        );
        Ok(InstanceRecord {
            instance_id: request.instance_id,
            tier: request.tier.to_string(),
            driver: DriverKind::Process,
            address: SocketAddr::new(request.advertise_ip, request.host_port),
            process: Some(identity),
            logs,
            accel: None,
            guest_port: None,
            started_at_ms: unix_millis(),
            exit: None,
        })
    }

    fn inspect(&self, record: &InstanceRecord) -> Observation {
        observe(&self.groups, record)
    }

    fn adopt(&self, record: &InstanceRecord) -> Observation {
        observe(&self.groups, record)
    }

    fn stop(&self, record: &InstanceRecord, grace: Duration) -> Result<StopOutcome, DriverError> {
        match &record.process {
            Some(identity) => self.groups.stop(identity, grace),
            None => Ok(StopOutcome::AlreadyGone),
        }
    }
}

/// Shared by both drivers: a record that already ended stays ended; otherwise ask the group,
/// and explain an exit with the last line the instance wrote to stderr.
pub(super) fn observe(groups: &ProcessGroups, record: &InstanceRecord) -> Observation {
    if record.exit.is_some() {
        return Observation::NotRunning;
    }
    let Some(identity) = &record.process else {
        return Observation::NotRunning;
    };
    match groups.observe(identity) {
        Observation::Exited { reason } => {
            // stderr says why a program (or qemu itself) gave up; a guest's console says why
            // the VM did.
            let detail = super::last_log_line(&record.logs.stderr).or_else(|| {
                record
                    .logs
                    .console
                    .as_deref()
                    .and_then(super::last_log_line)
            });
            Observation::Exited {
                reason: match detail {
                    Some(line) => format!("{reason}; last output: {line}"),
                    None => reason,
                },
            }
        }
        other => other,
    }
}

pub(super) fn open_log(path: &std::path::Path) -> Result<File, DriverError> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| DriverError::OpenLog {
            path: path.to_path_buf(),
            source,
        })
}

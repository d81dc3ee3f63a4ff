//! The `process` driver: the tier's command as a child process group on this host.
//!
//! The program finds its port in `PORT` and its identity in `STRATA_INSTANCE_ID`; the
//! template's `env` is added on top of the agent's own environment. Output goes to
//! `stdout.log` and `stderr.log` in the instance's directory.

use std::fs::File;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::group::ProcessGroups;
use super::{
    unix_millis, Driver, DriverError, DriverKind, InstanceRecord, LogPaths, Observation,
    StartRequest, StopOutcome,
};

/// Cheap to clone: clones share the table of spawned children.
#[derive(Clone, Debug, Default)]
pub struct ProcessDriver {
    groups: ProcessGroups,
}

impl ProcessDriver {
    pub fn new() -> Self {
        Self::default()
    }
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
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(request.dir)
            .envs(&request.template.env)
            .env("PORT", request.host_port.to_string())
            .env("STRATA_INSTANCE_ID", request.instance_id.to_string())
            .stdin(Stdio::null())
            .stdout(open_log(&logs.stdout)?)
            .stderr(open_log(&logs.stderr)?);
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

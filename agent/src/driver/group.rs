//! Process groups as instances: spawn a command as the leader of a new group, observe it, and
//! stop the whole group.
//!
//! Identity: a pid alone can be reused after the process exits, so a record names the process
//! by pid *and* start time (field 22 of `/proc/PID/stat`). Linux never hands out a pid that is
//! still in use as a process-group id, so while any member of our group lives, `pgid` still
//! names our group; once the leader's pid shows a different start time, the group is gone and
//! must not be signalled.

use std::collections::HashMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{DriverError, Observation, StopOutcome};
use crate::procfs::{self, ProcStat};

/// Names one process for as long as it lives, across agent restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Equal to `pid`: every instance leads its own group.
    pub pgid: i32,
    /// Clock ticks since boot when the process started (`/proc/PID/stat` field 22).
    pub start_time: u64,
}

/// How long to wait for a group to vanish after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);

/// The children this agent process spawned, kept so their exit status can be collected
/// (`try_wait` also reaps them, so they do not linger as zombies). Instances adopted after a
/// restart are not our children and are observed through `/proc` only.
#[derive(Clone, Debug, Default)]
pub struct ProcessGroups {
    children: Arc<Mutex<HashMap<i32, Child>>>,
}

impl ProcessGroups {
    pub fn new() -> Self {
        Self::default()
    }

    fn children(&self) -> MutexGuard<'_, HashMap<i32, Child>> {
        // A panic while holding the lock leaves the map itself consistent (each operation is a
        // single insert/remove/try_wait), so a poisoned lock is safe to keep using.
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Spawns `command` as the leader of a new process group and records its identity.
    pub fn spawn(
        &self,
        mut command: Command,
        program: &str,
    ) -> Result<ProcessIdentity, DriverError> {
        // A group of its own: signals aimed at the agent (Ctrl-C, a service manager stopping
        // it) do not reach instances, which must survive an agent restart; and stopping an
        // instance can signal everything it forked.
        command.process_group(0);
        let mut child = command.spawn().map_err(|source| DriverError::Spawn {
            program: program.to_string(),
            source,
        })?;
        let pid_u32 = child.id();
        let Ok(pid) = i32::try_from(pid_u32) else {
            kill_child(&mut child);
            return Err(DriverError::Identity { pid: pid_u32 });
        };
        // The child is not reaped yet, so its /proc entry exists even if it already exited.
        let Some(stat) = procfs::read_proc_stat(pid) else {
            kill_child(&mut child);
            return Err(DriverError::Identity { pid: pid_u32 });
        };
        self.children().insert(pid, child);
        Ok(ProcessIdentity {
            pid,
            pgid: pid,
            start_time: stat.start_time,
        })
    }

    /// What the instance's leader is doing now.
    pub fn observe(&self, identity: &ProcessIdentity) -> Observation {
        if let Some(status) = self.try_reap(identity) {
            return Observation::Exited {
                reason: describe_exit(status),
            };
        }
        match procfs::read_proc_stat(identity.pid) {
            Some(stat) if stat.start_time == identity.start_time && !stat.has_exited() => {
                Observation::Alive {
                    pid: identity.pid,
                    cpu_ticks: group_cpu_ticks(identity),
                }
            }
            Some(stat) if stat.start_time == identity.start_time => Observation::Exited {
                reason: "exited (zombie of another parent; exit status unknown)".to_string(),
            },
            _ => Observation::Exited {
                reason: "exited while no agent was watching it (exit status unknown)".to_string(),
            },
        }
    }

    /// Reaps the leader if it has exited and is our child, returning its status. Covers both a
    /// child spawned through this `ProcessGroups` and one spawned by an earlier owner in the
    /// same process (which `waitpid` still reaps).
    fn try_reap(&self, identity: &ProcessIdentity) -> Option<ExitStatus> {
        let mut children = self.children();
        if let Some(child) = children.get_mut(&identity.pid) {
            return match child.try_wait() {
                Ok(Some(status)) => {
                    children.remove(&identity.pid);
                    Some(status)
                }
                Ok(None) | Err(_) => None,
            };
        }
        drop(children);
        // Only reap a process that is still the one we recorded.
        let stat = procfs::read_proc_stat(identity.pid)?;
        if stat.start_time != identity.start_time || !stat.has_exited() {
            return None;
        }
        match waitpid(Pid::from_raw(identity.pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
            Ok(WaitStatus::Signaled(_, signal, _)) => Some(ExitStatus::from_raw(signal as i32)),
            _ => None,
        }
    }

    /// Live members of the instance's group; empty once the group is gone or its pgid now
    /// names somebody else's group.
    pub fn live_members(&self, identity: &ProcessIdentity) -> Vec<ProcStat> {
        if let Some(leader) = procfs::read_proc_stat(identity.pgid) {
            if leader.start_time != identity.start_time {
                return Vec::new();
            }
        }
        procfs::process_group_members(identity.pgid)
            .into_iter()
            .filter(|member| !member.has_exited())
            .collect()
    }

    /// SIGTERM to the group, SIGKILL after `grace`, then wait for every member to vanish.
    pub fn stop(
        &self,
        identity: &ProcessIdentity,
        grace: Duration,
    ) -> Result<StopOutcome, DriverError> {
        // Reap first: a zombie leader would otherwise look like a live group forever.
        let _ = self.try_reap(identity);
        if self.live_members(identity).is_empty() {
            self.forget(identity);
            return Ok(StopOutcome::AlreadyGone);
        }
        self.signal(identity, Signal::SIGTERM)?;
        if self.wait_gone(identity, grace) {
            self.forget(identity);
            return Ok(StopOutcome::Terminated);
        }
        tracing::warn!(
            pgid = identity.pgid,
            ?grace,
            "group ignored SIGTERM; sending SIGKILL"
        );
        self.signal(identity, Signal::SIGKILL)?;
        if self.wait_gone(identity, KILL_WAIT) {
            self.forget(identity);
            return Ok(StopOutcome::Killed);
        }
        Err(DriverError::StopTimeout {
            pgid: identity.pgid,
            remaining: self.live_members(identity).len(),
        })
    }

    fn signal(&self, identity: &ProcessIdentity, signal: Signal) -> Result<(), DriverError> {
        // Checked right before signalling: if the pgid now belongs to a new process (the group
        // ended and the pid was reused), sending anything would hit a stranger.
        if self.live_members(identity).is_empty() {
            return Ok(());
        }
        match killpg(Pid::from_raw(identity.pgid), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(DriverError::Signal {
                pgid: identity.pgid,
                source,
            }),
        }
    }

    fn wait_gone(&self, identity: &ProcessIdentity, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let _ = self.try_reap(identity);
            if self.live_members(identity).is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Called once no member of the group is alive: reaps the dead leader if it is our child,
    /// so it does not linger as a zombie (and keep the group's id in use).
    fn forget(&self, identity: &ProcessIdentity) {
        let child = self.children().remove(&identity.pid);
        match child {
            // Dead already (it is not a live member), so this returns at once.
            Some(mut child) => {
                let _ = child.wait();
            }
            None => {
                let _ = self.try_reap(identity);
            }
        }
    }
}

/// CPU ticks of the group's live members (each including its reaped children).
fn group_cpu_ticks(identity: &ProcessIdentity) -> u64 {
    procfs::process_group_members(identity.pgid)
        .iter()
        .map(ProcStat::total_ticks)
        .sum()
}

fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// "exited with code 3" or "killed by signal SIGKILL".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    if let Some(number) = status.signal() {
        return match Signal::try_from(number) {
            Ok(signal) => format!("killed by signal {}", signal.as_str()),
            Err(_) => format!("killed by signal {number}"),
        };
    }
    format!("ended: {status}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True once no process, not even a zombie, is left in the group. Orphaned helpers are
    /// reaped by init, which on some hosts polls every couple of seconds, so this waits.
    fn group_vanishes(pgid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH) {
                return true;
            }
            std::thread::sleep(POLL);
        }
        eprintln!(
            "still in group {pgid}: {:?}",
            procfs::process_group_members(pgid)
        );
        false
    }

    #[test]
    fn describes_exits() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with code 3"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal SIGKILL"
        );
    }

    #[test]
    fn stops_a_group_including_forked_helpers() {
        let groups = ProcessGroups::new();
        let mut command = Command::new("sh");
        command.args(["-c", "sleep 300 & sleep 300 & wait"]);
        let identity = groups.spawn(command, "sh").expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(5);
        while groups.live_members(&identity).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        assert_eq!(groups.live_members(&identity).len(), 3);
        let outcome = groups
            .stop(&identity, Duration::from_secs(5))
            .expect("stop");
        assert_eq!(outcome, StopOutcome::Terminated);
        assert!(
            groups.live_members(&identity).is_empty(),
            "no live member after stop"
        );
        assert!(group_vanishes(identity.pgid), "the group must be gone");
    }

    #[test]
    fn kills_a_group_that_ignores_sigterm() {
        let groups = ProcessGroups::new();
        let mut command = Command::new("sh");
        command.args(["-c", "trap '' TERM; while :; do sleep 0.1; done"]);
        let identity = groups.spawn(command, "sh").expect("spawn");
        std::thread::sleep(Duration::from_millis(200));
        let outcome = groups
            .stop(&identity, Duration::from_millis(300))
            .expect("stop");
        assert_eq!(outcome, StopOutcome::Killed);
        assert!(
            groups.live_members(&identity).is_empty(),
            "no live member after stop"
        );
        assert!(group_vanishes(identity.pgid), "the group must be gone");
    }

    #[test]
    fn observes_exit_code() {
        let groups = ProcessGroups::new();
        let mut command = Command::new("sh");
        command.args(["-c", "exit 7"]);
        let identity = groups.spawn(command, "sh").expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match groups.observe(&identity) {
                Observation::Exited { reason } => {
                    assert_eq!(reason, "exited with code 7");
                    break;
                }
                other => assert!(Instant::now() < deadline, "still {other:?}"),
            }
            std::thread::sleep(POLL);
        }
    }

    #[test]
    fn a_reused_pid_is_not_ours() {
        let groups = ProcessGroups::new();
        let me = i32::try_from(std::process::id()).expect("pid");
        let stat = procfs::read_proc_stat(me).expect("stat");
        // Same pid, different start time: this is how a recycled pid looks.
        let stranger = ProcessIdentity {
            pid: me,
            pgid: me,
            start_time: stat.start_time + 1,
        };
        assert!(groups.live_members(&stranger).is_empty());
        assert_eq!(
            groups
                .stop(&stranger, Duration::from_millis(10))
                .expect("stop"),
            StopOutcome::AlreadyGone
        );
        assert!(matches!(
            groups.observe(&stranger),
            Observation::Exited { .. }
        ));
    }
}

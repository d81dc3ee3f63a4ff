//! The HAProxy process: `haproxy -W -S <master.sock> -f haproxy.cfg` (management guide 3,
//! `-W` master-worker and `-S` master CLI), in a process group of its own.
//!
//! Master-worker facts that shape this (HAProxy 2.6): the master re-executes itself on
//! `reload` and reads the file again, so the file must be written before a reload; when the
//! current worker dies, the master kills the other workers and exits (the default without
//! `no-exit-on-failure`, configuration manual 3.1 "master-worker"), so a dead worker shows up
//! here as a dead master, and the agent starts HAProxy again from the file.
//!
//! Ownership: the agent spawned the master and has not reaped it while [`HaproxyProcess`]
//! lives, so its pid still names its process group when the group is signalled; the group is
//! signalled once more right after the master is reaped, to stop workers it left behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How HAProxy is started.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: PathBuf,
    pub config: PathBuf,
    pub master_socket: PathBuf,
    /// HAProxy's stdout and stderr are appended here.
    pub log: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("open {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Signal(String),
}

/// A running HAProxy master and its workers.
#[derive(Debug)]
pub struct HaproxyProcess {
    child: tokio::process::Child,
    pgid: i32,
    /// The master was reaped: its pid may name another process by now, so it is never
    /// signalled again.
    reaped: bool,
}

fn log_file(path: &Path) -> Result<std::fs::File, ProcessError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ProcessError::Log {
            path: path.to_path_buf(),
            source,
        })
}

impl HaproxyProcess {
    pub fn spawn(launch: &Launch) -> Result<Self, ProcessError> {
        let log = log_file(&launch.log)?;
        let log_err = log.try_clone().map_err(|source| ProcessError::Log {
            path: launch.log.clone(),
            source,
        })?;
        // `-S <path>,mode,600`: the master CLI takes bind options separated by commas
        // (management guide 3, "-S"); only the agent's user may reload HAProxy.
        let mut master = launch.master_socket.as_os_str().to_owned();
        master.push(",mode,600");
        let mut command = tokio::process::Command::new(&launch.binary);
        command
            .arg("-W")
            .arg("-S")
            .arg(master)
            .arg("-f")
            .arg(&launch.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // A group of its own: a Ctrl-C aimed at the agent does not reach HAProxy
            // directly, and stopping it can signal every worker.
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            binary: launch.binary.clone(),
            source,
        })?;
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| ProcessError::Signal("haproxy exited at once".to_string()))?;
        Ok(HaproxyProcess {
            child,
            pgid,
            reaped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pgid.unsigned_abs()
    }

    /// `Some(why)` once the master has exited (it is reaped then, and what it left of its
    /// group is killed).
    pub fn exited(&mut self) -> Option<String> {
        if self.reaped {
            return Some("exited".to_string());
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                // Right after the reap: workers the master left behind still hold the group,
                // so its id cannot have been handed out again.
                kill_group(self.pgid, Signal::SIGKILL);
                self.reaped = true;
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(error) => Some(format!("cannot wait for haproxy: {error}")),
        }
    }

    /// SIGTERM to the whole group (HAProxy's hard stop, management guide 4), SIGKILL after
    /// `grace`, and the master reaped.
    pub async fn stop(mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        kill_group(self.pgid, Signal::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(pid = self.pgid, "haproxy ignored SIGTERM; killing it");
        }
        kill_group(self.pgid, Signal::SIGKILL);
        let _ = self.child.wait().await;
        self.reaped = true;
        // Workers may outlive the master by a moment.
        let deadline = Instant::now() + grace;
        while killpg(Pid::from_raw(self.pgid), None) != Err(Errno::ESRCH)
            && Instant::now() < deadline
        {
            kill_group(self.pgid, Signal::SIGKILL);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The master an earlier agent process started, as recorded in the state dir: pid and start
/// time (`/proc/PID/stat` field 22), so a recycled pid is never signalled.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    pid: i32,
    start_time: u64,
}

impl HaproxyProcess {
    /// Records the master in `path`, so the next agent process can stop it if this one dies
    /// without stopping it (kill -9): an HAProxy left behind would keep serving stale pools
    /// beside the new one on the same ports (HAProxy binds with SO_REUSEPORT).
    pub fn record(&self, path: &Path) {
        let Some(stat) = crate::procfs::read_proc_stat(self.pgid) else {
            return;
        };
        let record = Record {
            pid: self.pgid,
            start_time: stat.start_time,
        };
        if let Ok(text) = serde_json::to_vec(&record) {
            if let Err(error) = std::fs::write(path, text) {
                tracing::warn!(path = %path.display(), %error, "record haproxy's pid");
            }
        }
    }
}

/// The HAProxy master an earlier agent process started and recorded, still running.
#[derive(Debug)]
pub struct Recorded {
    record: Record,
}

impl Recorded {
    /// The master recorded in `path`, if it still runs (same pid *and* start time).
    pub fn read(path: &Path) -> Option<Recorded> {
        let text = std::fs::read(path).ok()?;
        let record = serde_json::from_slice::<Record>(&text).ok()?;
        let recorded = Recorded { record };
        recorded.alive().then_some(recorded)
    }

    fn alive(&self) -> bool {
        crate::procfs::read_proc_stat(self.record.pid)
            .is_some_and(|stat| stat.start_time == self.record.start_time && !stat.has_exited())
    }

    /// Soft stop (SIGUSR1 to the group, management guide 4): it stops listening at once and
    /// exits when its connections have closed, at the latest after the file's
    /// `hard-stop-after`. For handing its ports to a new HAProxy that already listens.
    pub fn soft_stop(&self) {
        if self.alive() {
            tracing::info!(
                pid = self.record.pid,
                "the haproxy an earlier agent left running finishes its connections and exits"
            );
            kill_group(self.record.pid, Signal::SIGUSR1);
        }
    }

    /// Hard stop: SIGTERM to the group, SIGKILL after `grace`.
    pub async fn stop(&self, grace: Duration) {
        if !self.alive() {
            return;
        }
        tracing::warn!(
            pid = self.record.pid,
            "stopping the haproxy an earlier agent left running"
        );
        kill_group(self.record.pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.alive() {
            kill_group(self.record.pid, Signal::SIGKILL);
        }
    }
}

impl Drop for HaproxyProcess {
    /// A process dropped without `stop` (a panic, a runtime shutting down) still takes its
    /// workers with it.
    fn drop(&mut self) {
        if !self.reaped && matches!(self.child.try_wait(), Ok(None)) {
            kill_group(self.pgid, Signal::SIGKILL);
        }
    }
}

fn kill_group(pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => tracing::warn!(pgid, %error, ?signal, "signal haproxy's group"),
    }
}

/// `haproxy -c -q -f <file>` (management guide 3, "-c"): checks a configuration without
/// binding anything; the error is HAProxy's own message.
pub async fn check_config(binary: &Path, file: &Path, timeout: Duration) -> Result<(), String> {
    let run = tokio::process::Command::new(binary)
        .arg("-c")
        .arg("-q")
        .arg("-f")
        .arg(file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(format!("haproxy -c took longer than {timeout:?}")),
        Ok(Err(error)) => Err(format!("run {} -c: {error}", binary.display())),
        Ok(Ok(output)) if output.status.success() => Ok(()),
        Ok(Ok(output)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
            let alerts: Vec<&str> = text.lines().filter(|l| l.contains("ALERT")).collect();
            Err(if alerts.is_empty() {
                format!("haproxy -c failed ({})", output.status)
            } else {
                alerts.join("; ").chars().take(1000).collect()
            })
        }
    }
}

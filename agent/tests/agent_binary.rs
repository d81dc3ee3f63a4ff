//! The `strata-agent` binary in standalone mode: it runs what the assignment file lists,
//! and a real restart of the agent process adopts the instance instead of starting another.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use uuid::Uuid;

use common::*;
use strata_agent::standalone::Heartbeat;
use strata_agent::{HealthStatus, InstancePhase};

struct Agent {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

fn spawn_agent(data_dir: &Path, assignments: &Path, guard: &GroupGuard) -> Agent {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata-agent"))
        .args(["--node-id", "node-a", "--heartbeat-interval", "200ms"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--assignments")
        .arg(assignments)
        .stdout(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn strata-agent");
    let pid = i32::try_from(child.id().expect("pid")).expect("pid fits");
    guard.track(pid);
    let stdout = child.stdout.take().expect("stdout");
    Agent {
        child,
        lines: BufReader::new(stdout).lines(),
    }
}

impl Agent {
    /// Reads heartbeats until one satisfies `done`.
    async fn wait_heartbeat(
        &mut self,
        guard: &GroupGuard,
        what: &str,
        done: impl Fn(&Heartbeat) -> bool,
    ) -> Heartbeat {
        let read = async {
            while let Some(line) = self.lines.next_line().await.expect("read stdout") {
                let heartbeat: Heartbeat = serde_json::from_str(&line).expect("heartbeat json");
                guard.track_reports(&heartbeat.instances);
                if done(&heartbeat) {
                    return heartbeat;
                }
            }
            panic!("agent exited while waiting for {what}");
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    async fn terminate(mut self) {
        let pid = self.child.id().expect("pid");
        kill(
            Pid::from_raw(i32::try_from(pid).expect("pid")),
            Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("agent exits after SIGTERM")
            .expect("wait");
        assert!(status.success(), "{status:?}");
    }
}

fn write_assignments(path: &Path, assignments: &[strata_agent::Assignment]) {
    std::fs::write(path, serde_json::to_vec(assignments).expect("json")).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_adopts_and_an_emptied_file_stops() {
    let guard = GroupGuard::new();
    let data = tempfile::tempdir().expect("tempdir");
    let assignments = data.path().join("assignments.json");
    let id = Uuid::new_v4();
    write_assignments(
        &assignments,
        &[process_assignment(id, vec![workload_binary()])],
    );

    let healthy = |heartbeat: &Heartbeat| {
        report_of(&heartbeat.instances, id).is_some_and(|report| {
            report.health == HealthStatus::Healthy && report.phase == InstancePhase::Running
        })
    };
    let mut agent = spawn_agent(&data.path().join("state"), &assignments, &guard);
    let heartbeat = agent
        .wait_heartbeat(&guard, "healthy instance", healthy)
        .await;
    assert_eq!(heartbeat.node_id, "node-a");
    let host = heartbeat.host.expect("host metrics");
    assert!(host.memory_total_mb > 0);
    let before = report_of(&heartbeat.instances, id).expect("report");
    agent.terminate().await;

    // The instance outlived the agent.
    let pid = before.pid.expect("pid");
    assert!(
        !group_has_no_live_member(pid),
        "instance died with the agent"
    );

    let mut agent = spawn_agent(&data.path().join("state"), &assignments, &guard);
    let heartbeat = agent
        .wait_heartbeat(&guard, "adopted instance", healthy)
        .await;
    let after = report_of(&heartbeat.instances, id).expect("report");
    assert!(after.adopted);
    assert_eq!(after.pid, before.pid, "adopted, not restarted");
    assert_eq!(heartbeat.instances.len(), 1, "no duplicate");

    // A broken file keeps the previous assignments...
    std::fs::write(&assignments, b"[{ oops").expect("write");
    agent
        .wait_heartbeat(&guard, "a tick after the bad file", |h| {
            h.instances.len() == 1
        })
        .await;
    agent
        .wait_heartbeat(&guard, "another tick", |h| h.instances.len() == 1)
        .await;
    assert!(
        !group_has_no_live_member(pid),
        "a bad file must not stop instances"
    );

    // ...and an empty one stops everything.
    write_assignments(&assignments, &[]);
    agent
        .wait_heartbeat(&guard, "termination", |h| {
            report_of(&h.instances, id).is_some_and(|r| r.phase == InstancePhase::Terminated)
        })
        .await;
    assert!(group_has_no_live_member(pid));
    agent.terminate().await;
}

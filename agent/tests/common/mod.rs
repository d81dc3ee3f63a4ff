//! Helpers shared by the agent's integration tests.
#![allow(dead_code)]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use uuid::Uuid;

use strata_agent::driver::DriverKind;
use strata_agent::{Assignment, InstanceReport, Supervisor};
use strata_api::{Duration as ApiDuration, HealthCheck, Template};

/// Kills every registered process group when dropped, so a failing test leaves nothing behind.
#[derive(Default)]
pub struct GroupGuard {
    pgids: Mutex<Vec<i32>>,
}

impl GroupGuard {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn track(&self, pgid: i32) {
        self.pgids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(pgid);
    }

    /// Tracks the process group of every live instance in `reports`.
    pub fn track_reports(&self, reports: &[InstanceReport]) {
        for pid in reports.iter().filter_map(|report| report.pid) {
            self.track(pid);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let pgids = self
            .pgids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for pgid in pgids.iter() {
            let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
        }
    }
}

/// True when the group has no live (non-zombie) member. Orphaned members that already died are
/// reaped by init on its own schedule, which the agent does not control.
pub fn group_has_no_live_member(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    !entries.filter_map(Result::ok).any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            return false;
        };
        strata_agent::procfs::read_proc_stat(pid)
            .is_some_and(|stat| stat.pgrp == pgid && !stat.has_exited())
    })
}

/// Waits until no process at all (zombies included) is left in the group.
pub fn wait_group_gone(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if killpg(Pid::from_raw(pgid), None) == Err(Errno::ESRCH) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn workload_binary() -> String {
    env!("CARGO_BIN_EXE_strata-workload").to_string()
}

/// A health check that reacts quickly, for tests.
pub fn fast_health(grace: Duration) -> HealthCheck {
    HealthCheck {
        interval: ApiDuration::from_millis(100),
        timeout: ApiDuration::from_millis(500),
        grace_period: grace.into(),
        unhealthy_threshold: 2,
        ..HealthCheck::default()
    }
}

pub fn process_assignment(instance_id: Uuid, command: Vec<String>) -> Assignment {
    Assignment {
        instance_id,
        tier: "web".to_string(),
        template: Template {
            driver: Some(DriverKind::Process),
            command,
            cpu: 0.5,
            ..Template::default()
        },
        health: fast_health(Duration::from_secs(5)),
    }
}

pub fn report_of(reports: &[InstanceReport], instance_id: Uuid) -> Option<InstanceReport> {
    reports
        .iter()
        .find(|report| report.instance_id == instance_id)
        .cloned()
}

/// Polls the supervisor until `done` holds for the instance's report, or panics with the last
/// report after `limit`.
pub async fn wait_for(
    supervisor: &mut Supervisor,
    guard: &GroupGuard,
    instance_id: Uuid,
    limit: Duration,
    what: &str,
    done: impl Fn(&InstanceReport) -> bool,
) -> InstanceReport {
    let deadline = Instant::now() + limit;
    loop {
        let reports = supervisor.report().await;
        guard.track_reports(&reports);
        let report = report_of(&reports, instance_id);
        if let Some(report) = &report {
            if done(report) {
                return report.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last report: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

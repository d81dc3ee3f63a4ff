//! The supervisor with the process driver, on loopback: start, health, CPU, stop, failure,
//! and adoption across a simulated agent restart.

mod common;

use std::time::Duration;

use common::*;
use strata_agent::driver::DriverKind;
use strata_agent::{Action, HealthStatus, InstancePhase, Supervisor, SupervisorConfig};
use uuid::Uuid;

fn config(dir: &std::path::Path) -> SupervisorConfig {
    let mut config = SupervisorConfig::new(dir);
    config.stop_grace = Duration::from_secs(5);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_probes_reports_and_stops_a_process_instance() {
    let guard = GroupGuard::new();
    let data = tempfile::tempdir().expect("tempdir");
    let mut supervisor = Supervisor::open(config(data.path())).await.expect("open");
    let id = Uuid::new_v4();
    let desired = vec![process_assignment(id, vec![workload_binary()])];

    let outcome = supervisor.converge(&desired).await;
    assert_eq!(outcome.actions, vec![Action::Start { instance_id: id }]);
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);

    let report = wait_for(
        &mut supervisor,
        &guard,
        id,
        Duration::from_secs(30),
        "running",
        |r| r.phase == InstancePhase::Running && r.health == HealthStatus::Healthy,
    )
    .await;
    let address = report.address.expect("address");
    let pid = report.pid.expect("pid");
    assert_eq!(report.driver, DriverKind::Process);
    assert!(!report.adopted);

    // The workload got PORT and STRATA_INSTANCE_ID from the agent.
    let body: serde_json::Value = reqwest::get(format!("http://{address}/?work_ms=300"))
        .await
        .expect("GET /")
        .json()
        .await
        .expect("json");
    assert_eq!(body["instance_id"], id.to_string());
    assert_eq!(body["pid"], pid);

    // The 300 ms of work shows up as CPU use of the group.
    let report = wait_for(
        &mut supervisor,
        &guard,
        id,
        Duration::from_secs(10),
        "cpu use",
        |r| r.cpu_cores.is_some_and(|cores| cores > 0.0),
    )
    .await;
    assert!(report.cpu_utilization_percent.is_some());

    // Converging again changes nothing.
    let outcome = supervisor.converge(&desired).await;
    assert_eq!(outcome.actions, vec![Action::Keep { instance_id: id }]);

    // An empty assignment stops it; the group leaves no live process and the record goes.
    let outcome = supervisor.converge(&[]).await;
    assert_eq!(outcome.actions, vec![Action::Stop { instance_id: id }]);
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert!(group_has_no_live_member(pid));
    assert!(
        wait_group_gone(pid, Duration::from_secs(20)),
        "group {pid} still exists"
    );
    let reports = supervisor.report().await;
    let last = report_of(&reports, id).expect("final report");
    assert_eq!(last.phase, InstancePhase::Terminated);
    assert!(
        supervisor.report().await.is_empty(),
        "terminated is reported once"
    );
    assert!(!data.path().join("instances").join(id.to_string()).exists());
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_does_not_exist_fails_with_a_reason() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut supervisor = Supervisor::open(config(data.path())).await.expect("open");
    let id = Uuid::new_v4();
    let desired = vec![process_assignment(
        id,
        vec!["/nonexistent/strata-no-such-program".to_string()],
    )];
    supervisor.converge(&desired).await;
    let reports = supervisor.report().await;
    let report = report_of(&reports, id).expect("report");
    assert_eq!(report.phase, InstancePhase::Failed);
    let reason = report.reason.expect("reason");
    assert!(
        reason.contains("strata-no-such-program") && reason.contains("No such file"),
        "{reason}"
    );
    assert_eq!(report.pid, None);

    // Failed stays failed: the agent does not retry; replacing it is the controller's call.
    let outcome = supervisor.converge(&desired).await;
    assert_eq!(outcome.actions, vec![Action::Keep { instance_id: id }]);
    // The failure survives an agent restart.
    supervisor.shutdown().await;
    let mut supervisor = Supervisor::open(config(data.path())).await.expect("reopen");
    let reports = supervisor.report().await;
    assert_eq!(
        report_of(&reports, id).expect("report").phase,
        InstancePhase::Failed
    );
    supervisor.converge(&[]).await;
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_exits_on_its_own_is_failed_with_its_output() {
    let guard = GroupGuard::new();
    let data = tempfile::tempdir().expect("tempdir");
    let mut supervisor = Supervisor::open(config(data.path())).await.expect("open");
    let id = Uuid::new_v4();
    let command = [
        "sh",
        "-c",
        "echo 'cannot open database' >&2; sleep 0.3; exit 3",
    ]
    .map(String::from)
    .to_vec();
    supervisor
        .converge(&[process_assignment(id, command)])
        .await;
    let report = wait_for(
        &mut supervisor,
        &guard,
        id,
        Duration::from_secs(10),
        "failed",
        |r| r.phase == InstancePhase::Failed,
    )
    .await;
    assert_eq!(
        report.reason.as_deref(),
        Some("exited with code 3; last output: cannot open database")
    );
    supervisor.converge(&[]).await;
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_adopts_without_restarting_and_stops_what_it_no_longer_owns() {
    let guard = GroupGuard::new();
    let data = tempfile::tempdir().expect("tempdir");
    let kept = Uuid::new_v4();
    let dropped = Uuid::new_v4();
    let desired = vec![
        process_assignment(kept, vec![workload_binary()]),
        process_assignment(dropped, vec![workload_binary()]),
    ];

    let mut first = Supervisor::open(config(data.path())).await.expect("open");
    first.converge(&desired).await;
    let kept_before = wait_for(
        &mut first,
        &guard,
        kept,
        Duration::from_secs(30),
        "kept up",
        |r| r.health == HealthStatus::Healthy,
    )
    .await;
    let dropped_before = wait_for(
        &mut first,
        &guard,
        dropped,
        Duration::from_secs(30),
        "dropped up",
        |r| r.health == HealthStatus::Healthy,
    )
    .await;
    // The agent goes away; its instances do not.
    first.shutdown().await;

    let mut second = Supervisor::open(config(data.path())).await.expect("reopen");
    let outcome = second.converge(&desired[..1]).await;
    let mut expected = vec![
        Action::Stop {
            instance_id: dropped,
        },
        Action::Keep { instance_id: kept },
    ];
    expected.sort_by_key(|action| matches!(action, Action::Keep { .. }));
    assert_eq!(outcome.actions, expected);
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);

    let kept_after = wait_for(
        &mut second,
        &guard,
        kept,
        Duration::from_secs(30),
        "adopted",
        |r| r.health == HealthStatus::Healthy && r.phase == InstancePhase::Running,
    )
    .await;
    assert!(kept_after.adopted);
    assert_eq!(kept_after.pid, kept_before.pid, "adopted, not restarted");
    assert_eq!(kept_after.address, kept_before.address);

    let dropped_pid = dropped_before.pid.expect("pid");
    assert!(group_has_no_live_member(dropped_pid));
    assert!(wait_group_gone(dropped_pid, Duration::from_secs(20)));

    // A third agent process, converging to nothing, stops the adopted one too.
    second.shutdown().await;
    let mut third = Supervisor::open(config(data.path())).await.expect("reopen");
    let outcome = third.converge(&[]).await;
    assert_eq!(outcome.actions, vec![Action::Stop { instance_id: kept }]);
    let kept_pid = kept_before.pid.expect("pid");
    assert!(group_has_no_live_member(kept_pid));
    assert!(wait_group_gone(kept_pid, Duration::from_secs(20)));
    third.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_workload() {
    let guard = GroupGuard::new();
    let data = tempfile::tempdir().expect("tempdir");
    let mut supervisor = Supervisor::open(config(data.path())).await.expect("open");
    let id = Uuid::new_v4();
    supervisor
        .converge(&[process_assignment(id, vec![workload_binary()])])
        .await;
    let report = wait_for(
        &mut supervisor,
        &guard,
        id,
        Duration::from_secs(30),
        "healthy",
        |r| r.health == HealthStatus::Healthy,
    )
    .await;
    let address = report.address.expect("address");
    let client = reqwest::Client::new();
    client
        .post(format!("http://{address}/fail"))
        .send()
        .await
        .expect("POST /fail");
    let report = wait_for(
        &mut supervisor,
        &guard,
        id,
        Duration::from_secs(10),
        "unhealthy",
        |r| r.health == HealthStatus::Unhealthy,
    )
    .await;
    // Still running: an unhealthy instance is reported, not killed.
    assert_eq!(report.phase, InstancePhase::Running);
    assert!(report.reason.expect("reason").contains("503"));
    client
        .post(format!("http://{address}/recover"))
        .send()
        .await
        .expect("POST /recover");
    wait_for(
        &mut supervisor,
        &guard,
        id,
        Duration::from_secs(10),
        "healthy again",
        |r| r.health == HealthStatus::Healthy,
    )
    .await;
    supervisor.converge(&[]).await;
    supervisor.shutdown().await;
}

/// Wraps the process driver and fails the first stop, as a host under pressure might.
struct FlakyStop {
    inner: strata_agent::driver::ProcessDriver,
    failures_left: std::sync::atomic::AtomicU32,
}

impl strata_agent::Driver for FlakyStop {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }
    fn start(
        &self,
        request: &strata_agent::driver::StartRequest<'_>,
    ) -> Result<strata_agent::InstanceRecord, strata_agent::DriverError> {
        self.inner.start(request)
    }
    fn inspect(&self, record: &strata_agent::InstanceRecord) -> strata_agent::driver::Observation {
        self.inner.inspect(record)
    }
    fn adopt(&self, record: &strata_agent::InstanceRecord) -> strata_agent::driver::Observation {
        self.inner.adopt(record)
    }
    fn stop(
        &self,
        record: &strata_agent::InstanceRecord,
        grace: Duration,
    ) -> Result<strata_agent::driver::StopOutcome, strata_agent::DriverError> {
        use std::sync::atomic::Ordering;
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 {
            self.failures_left.store(left - 1, Ordering::SeqCst);
            return Err(strata_agent::DriverError::InvalidTemplate(
                "injected stop failure".to_string(),
            ));
        }
        self.inner.stop(record, grace)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_stop_is_retried_by_the_next_converge() {
    let guard = GroupGuard::new();
    let data = tempfile::tempdir().expect("tempdir");
    let drivers = strata_agent::supervisor::Drivers {
        process: std::sync::Arc::new(FlakyStop {
            inner: strata_agent::driver::ProcessDriver::new(),
            failures_left: 1.into(),
        }),
        qemu: std::sync::Arc::new(strata_agent::driver::QemuDriver::default()),
    };
    let mut supervisor = Supervisor::open_with_drivers(config(data.path()), drivers)
        .await
        .expect("open");
    let id = Uuid::new_v4();
    supervisor
        .converge(&[process_assignment(id, vec![workload_binary()])])
        .await;
    let report = wait_for(
        &mut supervisor,
        &guard,
        id,
        Duration::from_secs(30),
        "healthy",
        |r| r.health == HealthStatus::Healthy,
    )
    .await;
    let pid = report.pid.expect("pid");

    let outcome = supervisor.converge(&[]).await;
    assert_eq!(outcome.failures.len(), 1, "{outcome:?}");
    assert!(outcome.failures[0].error.contains("injected"));
    assert!(
        !group_has_no_live_member(pid),
        "still running after the failed stop"
    );
    // Still known, so the next converge tries again.
    let outcome = supervisor.converge(&[]).await;
    assert_eq!(outcome.actions, vec![Action::Stop { instance_id: id }]);
    assert!(outcome.failures.is_empty(), "{outcome:?}");
    assert!(group_has_no_live_member(pid));
    supervisor.shutdown().await;
}

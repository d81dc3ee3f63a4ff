//! The qemu driver: a failure path that needs no qemu, and a real boot of the guest image
//! under the supervisor (behind `STRATA_E2E`, which CI sets).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use strata_agent::driver::qemu::Accel;
use strata_agent::driver::DriverKind;
use strata_agent::{Assignment, HealthStatus, InstancePhase, Supervisor, SupervisorConfig};
use strata_api::{Duration as ApiDuration, HealthCheck, QemuImage, Template};
use uuid::Uuid;

fn qemu_assignment(instance_id: Uuid, kernel: &Path, initrd: &Path) -> Assignment {
    Assignment {
        instance_id,
        tier: "vm".to_string(),
        template: Template {
            driver: Some(DriverKind::Qemu),
            image: Some(QemuImage {
                kernel: kernel.display().to_string(),
                initrd: initrd.display().to_string(),
                append: None,
            }),
            memory_mb: 256,
            port: Some(8080),
            cpu: 1.0,
            ..Template::default()
        },
        health: HealthCheck {
            interval: ApiDuration::from_secs(1),
            timeout: ApiDuration::from_secs(2),
            // A TCG boot takes 10 to 30 s; failures before that are expected.
            grace_period: ApiDuration::from_secs(150),
            ..HealthCheck::default()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_kernel_fails_with_a_reason() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut supervisor = Supervisor::open(SupervisorConfig::new(data.path()))
        .await
        .expect("open");
    let id = Uuid::new_v4();
    let kernel = data.path().join("no-vmlinuz");
    supervisor
        .converge(&[qemu_assignment(id, &kernel, &data.path().join("no-initrd"))])
        .await;
    let reports = supervisor.report().await;
    let report = report_of(&reports, id).expect("report");
    assert_eq!(report.phase, InstancePhase::Failed);
    let reason = report.reason.expect("reason");
    assert!(
        reason.contains("kernel") && reason.contains("no-vmlinuz"),
        "{reason}"
    );
    supervisor.converge(&[]).await;
    supervisor.shutdown().await;
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Why the qemu test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let tools = [
        "qemu-system-x86_64",
        "apt-get",
        "dpkg-deb",
        "cpio",
        "gzip",
        "modinfo",
    ];
    let missing: Vec<&str> = tools.into_iter().filter(|tool| !on_path(tool)).collect();
    (!missing.is_empty()).then(|| {
        format!(
            "missing {} (deploy/install-deps.d/agent.sh installs them)",
            missing.join(", ")
        )
    })
}

/// Builds the guest image, or reuses it (the script is idempotent). The location can be set
/// with STRATA_GUEST_IMAGE_DIR to share one image between checkouts.
fn guest_image() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os("STRATA_GUEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-image"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-guest-image.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .arg(workload_binary())
        .status()
        .expect("run build-guest-image.sh");
    assert!(status.success(), "build-guest-image.sh failed: {status}");
    (dir.join("vmlinuz"), dir.join("initrd.img"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_the_guest_image_and_serves_http() {
    if std::env::var_os("STRATA_E2E").is_none() {
        println!("skipped: STRATA_E2E is not set (this test boots a VM)");
        return;
    }
    if let Some(reason) = missing_prerequisite() {
        panic!("STRATA_E2E is set but the qemu test cannot run: {reason}");
    }
    let (kernel, initrd) = guest_image();

    let guard = GroupGuard::new();
    let data = tempfile::tempdir().expect("tempdir");
    let mut supervisor = Supervisor::open(SupervisorConfig::new(data.path()))
        .await
        .expect("open");
    let id = Uuid::new_v4();
    let outcome = supervisor
        .converge(&[qemu_assignment(id, &kernel, &initrd)])
        .await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);

    let started = Instant::now();
    let report = loop {
        let reports = supervisor.report().await;
        guard.track_reports(&reports);
        let report = report_of(&reports, id).expect("report");
        if report.health == HealthStatus::Healthy {
            break report;
        }
        let console = report
            .logs
            .console
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default();
        assert!(
            report.phase != InstancePhase::Failed,
            "VM failed: {:?}\nconsole:\n{console}",
            report.reason
        );
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "VM not healthy after {:?}: {report:#?}\nconsole:\n{console}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("guest healthy after {:?}", started.elapsed());
    assert_eq!(report.driver, DriverKind::Qemu);
    let accel = report.accel.expect("accel recorded");
    if !std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .split_whitespace()
        .any(|flag| flag == "vmx" || flag == "svm")
    {
        assert_eq!(accel, Accel::Tcg, "no vmx/svm: KVM guests would hang");
    }
    let console_path = report.logs.console.clone().expect("console log");
    let console = std::fs::read_to_string(&console_path).expect("console log");
    assert!(console.contains("STRATA-GUEST-READY"), "{console}");

    // The workload inside the guest knows its instance id from the kernel command line.
    let address = report.address.expect("address");
    let body: serde_json::Value = reqwest::get(format!("http://{address}/"))
        .await
        .expect("GET /")
        .json()
        .await
        .expect("json");
    assert_eq!(body["instance_id"], id.to_string());

    let pid = report.pid.expect("pid");
    let outcome = supervisor.converge(&[]).await;
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert!(group_has_no_live_member(pid), "qemu still running");
    assert!(wait_group_gone(pid, Duration::from_secs(20)));
    supervisor.shutdown().await;
}

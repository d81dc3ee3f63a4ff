//! `strata-workload`: its endpoints in-process, and the binary's flags and SIGTERM handling.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use strata_agent::workload::{self, Hello, WorkloadConfig};

async fn serve(max_work: Duration) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let cancel = CancellationToken::new();
    let shutdown = cancel.clone();
    let task = tokio::spawn(async move {
        workload::run(
            listener,
            WorkloadConfig {
                instance_id: "test-instance".into(),
                max_work,
            },
            async move { shutdown.cancelled().await },
        )
        .await
        .expect("serve");
    });
    (address, cancel, task)
}

#[tokio::test]
async fn endpoints() {
    let (address, cancel, task) = serve(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let base = format!("http://{address}");

    let hello: Hello = client
        .get(&base)
        .send()
        .await
        .expect("GET /")
        .json()
        .await
        .expect("json");
    assert_eq!(hello.instance_id, "test-instance");
    assert_eq!(hello.worked_ms, 0);
    assert!(hello.healthy);

    let status = |path: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("GET")
                .status()
        }
    };
    assert_eq!(status("/healthz").await, 200);
    let response = client
        .post(format!("{base}/fail"))
        .send()
        .await
        .expect("fail");
    assert_eq!(response.status(), 200);
    assert_eq!(status("/healthz").await, 503);
    // Failing health does not stop it from serving.
    assert_eq!(status("/").await, 200);
    client
        .post(format!("{base}/recover"))
        .send()
        .await
        .expect("recover");
    assert_eq!(status("/healthz").await, 200);

    // work_ms burns real time, bounded by max_work.
    let started = Instant::now();
    let hello: Hello = client
        .get(format!("{base}/?work_ms=100"))
        .send()
        .await
        .expect("work")
        .json()
        .await
        .expect("json");
    assert_eq!(hello.worked_ms, 100);
    assert!(started.elapsed() >= Duration::from_millis(100));
    let hello: Hello = client
        .get(format!("{base}/?work_ms=999999"))
        .send()
        .await
        .expect("work")
        .json()
        .await
        .expect("json");
    assert_eq!(hello.worked_ms, 200, "bounded");
    assert_eq!(status("/?work_ms=abc").await, 400);
    assert_eq!(status("/nope").await, 404);

    cancel.cancel();
    task.await.expect("server task");
}

#[test]
fn help_explains_the_flags() {
    let output = Command::new(common::workload_binary())
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--port",
        "--bind",
        "--instance-id",
        "--max-work-ms",
        "/healthz",
        "SIGTERM",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

/// SIGTERM while a request is in flight: the request completes, then the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight() {
    let guard = common::GroupGuard::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let mut child = Command::new(common::workload_binary())
        .args(["--bind", "127.0.0.1"])
        .env("PORT", port.to_string())
        .env_remove("STRATA_INSTANCE_ID")
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn workload");
    let pid = i32::try_from(child.id()).expect("pid");
    guard.track(pid);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "workload did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without STRATA_INSTANCE_ID the id is the host name.
    let hello: Hello = client
        .get(&base)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    assert_eq!(hello.instance_id, workload::default_instance_id());

    let slow = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/?work_ms=1000");
        async move { client.get(url).send().await?.json::<Hello>().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
    let hello = slow
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(hello.worked_ms, 1000);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

//! Connection floods: idle and slowloris connections against one node of a 3-node cluster.
//! The node keeps answering health, API and peer requests while they are held, the cluster
//! keeps its quorum, and idle connections are closed after the configured header timeout.
//!
//! The 25,000 idle connections come from two `strata-flood` processes (one process may hold
//! fewer files than that), from 127.0.0.2 to 127.0.0.21, so they do not use up the ephemeral
//! ports of 127.0.0.1 that other tests connect from; the slowloris ones from this process. The
//! server side is bounded by `--max-connections` (plus its peer reserve) whatever the count.
//!
//! These run when `STRATA_E2E=1` (deploy/test.sh and CI set it).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use strata_tests::{
    binary, e2e_enabled, send, tier_body, Cluster, ClusterOptions, ProcessGuard, ADMIN_TOKEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `--header-timeout` of the controllers under test.
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle connections, about 80 times the node's cap (`--max-connections 300`), held by
/// `FLOODERS` processes.
const IDLE: usize = 25_000;
const FLOODERS: usize = 2;
/// The flooders spread their connects over this long (about 12,500 a second); the probes
/// start once every connect is done, while the connections are held. (A client opening
/// connections faster than the cap per probation period, for good, keeps every slot young:
/// per-address limits belong in front of the node; see `controller/src/http/serve.rs`.)
const RAMP: Duration = Duration::from_secs(2);
/// How long the flooders may take to make their connections on a loaded machine.
const BUILD_UP: Duration = Duration::from_secs(20);
/// Slowloris connections: a request head one header line every 500 ms, never finished.
const SLOWLORIS: usize = 500;
/// How long the flood is held.
const FLOOD: Duration = Duration::from_secs(8);

/// Opens `count` connections to `address` and holds them: silent ones, or (`drip`) ones that
/// send a request head one header line every 500 ms and never finish it. Counts the ones the
/// server closes in `closed`.
fn attacker(
    address: String,
    count: usize,
    drip: bool,
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|index| {
            let address = address.clone();
            let stop = stop.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                // Spread the connects so the test's own loop is not starved.
                tokio::time::sleep(Duration::from_millis((index % 100) as u64 * 5)).await;
                {
                    let Ok(mut stream) = TcpStream::connect(&address).await else {
                        // Refused at once also counts as closed by the server.
                        closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    if drip {
                        let _ = stream
                            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                            .await;
                    }
                    let mut line = 0u64;
                    let mut buffer = [0u8; 512];
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let read = tokio::time::timeout(
                            Duration::from_millis(500),
                            stream.read(&mut buffer),
                        )
                        .await;
                        match read {
                            // Closed by the server (or an answer, then closed).
                            Ok(Ok(0) | Err(_)) => break,
                            Ok(Ok(_)) => {}
                            Err(_) if drip => {
                                line += 1;
                                let header = format!("X-Slow-{line}: a\r\n");
                                if stream.write_all(header.as_bytes()).await.is_err() {
                                    break;
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_node_keeps_answering_and_closes_idle_connections() -> anyhow::Result<()> {
    if !e2e_enabled("connections") {
        return Ok(());
    }
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 3,
        controller_args: vec!["--header-timeout", "3s", "--max-connections", "300"],
        ..ClusterOptions::default()
    })
    .await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    // A follower: the leader's AppendEntries must keep reaching it through the flood.
    let target = cluster
        .running()
        .into_iter()
        .find(|id| *id != leader)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let address = cluster.address(target);

    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    // Each flooder reports once the flood is over (the probes' window after its connects,
    // and a margin).
    let hold = Duration::from_millis(500) + FLOOD + Duration::from_secs(1);
    let per_flooder = IDLE / FLOODERS;
    let mut flooders = Vec::new();
    for index in 0..FLOODERS {
        let output =
            std::env::temp_dir().join(format!("strata-flood-{}-{index}.out", std::process::id()));
        let file = std::fs::File::create(&output)?;
        let guard = ProcessGuard::spawn(
            std::process::Command::new(binary("strata-flood"))
                .arg(&address)
                .arg(per_flooder.to_string())
                .arg(RAMP.as_millis().to_string())
                .arg(hold.as_millis().to_string())
                .arg((2 + index * 10).to_string())
                .arg("10")
                .stdout(file),
        )?;
        flooders.push((guard, output));
    }
    let tasks = attacker(
        address.clone(),
        SLOWLORIS,
        true,
        stop.clone(),
        closed.clone(),
    );
    // Let the flood build up past the cap: every flooder has made its connections.
    let built = Instant::now();
    while flooders.iter().any(|(_, output)| {
        !std::fs::read_to_string(output)
            .unwrap_or_default()
            .contains("connected")
    }) {
        anyhow::ensure!(
            built.elapsed() < BUILD_UP,
            "the flooders did not connect within {BUILD_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Fresh connections each time, as a new client would make.
    let probe = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()?;
    let started = Instant::now();
    let mut round = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < FLOOD {
        round += 1;
        let checks = [
            (Method::GET, "/healthz".to_string(), None),
            (Method::GET, "/v1/tiers".to_string(), None),
            // A write through the follower: forwarded to the leader (peer traffic out) and
            // replicated back (peer traffic in) before it is answered.
            (
                Method::PUT,
                format!("/v1/tiers/flood-{round}"),
                Some(tier_body(&format!("flood-{round}"))),
            ),
        ];
        for (method, path, body) in checks {
            let sent = Instant::now();
            let answer = send(
                &probe,
                method.clone(),
                &cluster.url(target, &path),
                Some(ADMIN_TOKEN),
                body.as_ref(),
            )
            .await?;
            let took = sent.elapsed();
            slowest = slowest.max(took);
            assert!(
                answer.status < 300,
                "{method} {path} during the flood: {answer:?}"
            );
            // Reads within the 1 s; a write also waits for fsyncs on a loaded machine,
            // so it gets the margin of a quorum round under load.
            let bound = if method == Method::PUT {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(1)
            };
            assert!(
                took < bound,
                "{method} {path} took {took:?} during the flood"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("slowest answer during the flood: {slowest:?} over {round} rounds");
    // Every attacking connection was closed: beyond the cap to make room, the rest by the
    // header timeout, slowloris ones included.
    assert_eq!(
        closed.load(Ordering::Relaxed),
        SLOWLORIS,
        "slowloris connections still open after {FLOOD:?}"
    );
    for (mut guard, output) in flooders {
        let report = {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = std::fs::read_to_string(&output).unwrap_or_default();
                if text.contains("refused=") || Instant::now() > deadline {
                    break text;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        guard.kill();
        let _ = std::fs::remove_file(&output);
        let field = |name: &str| -> usize {
            report
                .split_whitespace()
                .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(usize::MAX)
        };
        println!("flooder: {}", report.trim());
        assert_eq!(
            field("closed") + field("refused"),
            per_flooder,
            "idle connections still open after {FLOOD:?}: {report}"
        );
        assert!(
            field("opened") > per_flooder / 2,
            "most connections were accepted, not refused: {report}"
        );
    }
    // The cluster kept its quorum and the target kept up with the log.
    let status = cluster.status(leader).await?;
    let commit = status["commit_index"].as_u64().unwrap_or(0);
    cluster
        .wait_applied(target, commit, Duration::from_secs(5))
        .await?;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }

    // Without a flood, an idle connection is closed after the header timeout: not before
    // (nothing evicts it), and not much after.
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(&address).await?);
    }
    let opened = Instant::now();
    for mut stream in idle {
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(
            HEADER_TIMEOUT + Duration::from_secs(3),
            stream.read(&mut buffer),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "an idle connection was not closed: {read:?}"
        );
    }
    let took = opened.elapsed();
    assert!(
        took >= HEADER_TIMEOUT - Duration::from_millis(200),
        "idle connections closed after {took:?}, before the header timeout"
    );
    Ok(())
}

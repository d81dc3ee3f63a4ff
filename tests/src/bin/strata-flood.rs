//! `strata-flood`: opens idle TCP connections to one address and holds them until the server
//! closes them, for the connection-flood test (`tests/connections.rs`). Several of these
//! processes together hold more connections than one process's open-files limit allows.
//!
//! ```text
//! strata-flood TARGET COUNT RAMP_MS HOLD_MS FIRST_SOURCE SOURCES
//! ```
//!
//! Opens COUNT connections to TARGET (`ip:port`), spread evenly over RAMP_MS, connection `i`
//! from 127.0.0.(FIRST_SOURCE + i % SOURCES) so the flood does not use up the ephemeral ports
//! of 127.0.0.1. Each sends nothing and waits for the server to close it. Once every connect
//! has completed (or failed) it prints `connected`; HOLD_MS later it prints
//! `opened=N closed=N refused=N`, where `closed` counts the connections the server closed and
//! `refused` those it never accepted, and exits.
//! Connections to loopback only: it refuses any other target.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

fn usage() -> ! {
    eprintln!("usage: strata-flood TARGET COUNT RAMP_MS HOLD_MS FIRST_SOURCE SOURCES");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 6 || args[0] == "--help" {
        usage();
    }
    let Ok(target) = args[0].parse::<SocketAddr>() else {
        usage()
    };
    if !target.ip().is_loopback() {
        eprintln!("strata-flood: {target} is not a loopback address");
        std::process::exit(2);
    }
    let numbers: Vec<u64> = args[1..]
        .iter()
        .map(|arg| arg.parse().unwrap_or_else(|_| usage()))
        .collect();
    let (count, ramp, hold, first, sources) = (
        numbers[0] as usize,
        Duration::from_millis(numbers[1]),
        Duration::from_millis(numbers[2]),
        numbers[3],
        numbers[4].max(1),
    );
    if first == 0 || first + sources > 255 {
        usage();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("strata-flood: start the runtime: {error}");
            std::process::exit(1);
        }
    };
    let counts = runtime.block_on(flood(target, count, ramp, hold, first as u8, sources as u8));
    println!(
        "opened={} closed={} refused={}",
        counts.0, counts.1, counts.2
    );
    // The connections still open close with the process.
    runtime.shutdown_background();
}

async fn flood(
    target: SocketAddr,
    count: usize,
    ramp: Duration,
    hold: Duration,
    first: u8,
    sources: u8,
) -> (usize, usize, usize) {
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    for index in 0..count {
        let (opened, closed, refused) = (opened.clone(), closed.clone(), refused.clone());
        let source = Ipv4Addr::new(127, 0, 0, first + (index % usize::from(sources)) as u8);
        let delay = ramp.mul_f64(index as f64 / count.max(1) as f64);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let connected = async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source.into(), 0))?;
                socket.connect(target).await
            }
            .await;
            let Ok(mut stream) = connected else {
                refused.fetch_add(1, Ordering::Relaxed);
                return;
            };
            opened.fetch_add(1, Ordering::Relaxed);
            let mut buffer = [0u8; 256];
            // Closed by the server (EOF or reset), or an answer and then closed.
            while let Ok(read) = stream.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
            }
            closed.fetch_add(1, Ordering::Relaxed);
        });
    }
    // A connect that hangs (a SYN never answered) gives up with the kernel's retries, within
    // about two minutes; the flood does not wait that long.
    let connect_deadline = tokio::time::Instant::now() + ramp + Duration::from_secs(60);
    while opened.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed) < count
        && tokio::time::Instant::now() < connect_deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        use std::io::Write;
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "connected");
        let _ = stdout.flush();
    }
    tokio::time::sleep(hold).await;
    (
        opened.load(Ordering::Relaxed),
        closed.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    )
}

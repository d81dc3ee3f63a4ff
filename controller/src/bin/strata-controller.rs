//! `strata-controller`: parses flags and runs a controller node until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use strata_controller::Config;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: the write path allocates and frees many small buffers
/// (HTTP bodies, JSON, log entries) across threads, where glibc's arenas spent about a sixth of
/// the controller's CPU in `malloc`/`free` under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log))
        .context("parse --log")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let listener = listen(config.listen).with_context(|| format!("listen on {}", config.listen))?;
    strata_controller::run(config, listener, shutdown_signal()).await
}

/// Binds the API and peer listener with `TCP_NODELAY` set on it. axum 0.8's `serve` leaves
/// accepted sockets as they come (its docs point to `ListenerExt::tap_io` for `set_nodelay`),
/// and Linux copies `TCP_NODELAY` from a listening socket to the sockets it accepts, so setting
/// it here keeps Nagle's algorithm from holding back a small response (a Raft reply, a write's
/// answer) behind an unacknowledged segment. `SO_REUSEADDR` matches what `TcpListener::bind`
/// does; the backlog is 4096 (the kernel caps it at `net.core.somaxconn`) rather than its
/// 1024, so a burst of connections (a flood the server sheds, a fleet reconnecting after a
/// restart) finds room in the accept queue instead of waiting out SYN retransmissions.
fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "install SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}

//! `strata-workload`: the small HTTP app instances run in demos and tests.
//!
//! - `GET /` answers JSON with the instance id; `?work_ms=N` first burns N ms of real CPU (at
//!   most [`WorkloadConfig::max_work`]) so load tests can drive CPU-based scaling;
//!   `?sleep_ms=N` first waits N ms (same bound) without using CPU, a slow request that holds
//!   its connection, for drain tests.
//! - `GET /healthz` answers 200, or 503 after `POST /fail` until `POST /recover`, so tests can
//!   make an instance unhealthy without killing it.
//!
//! [`run`] serves on a given listener until the shutdown future resolves, then finishes the
//! requests in flight before returning.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub instance_id: String,
    /// Upper bound of `work_ms`, so one request cannot pin a CPU indefinitely.
    pub max_work: Duration,
}

/// The body of `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub instance_id: String,
    pub pid: u32,
    /// Milliseconds of CPU burned for this request (after bounding).
    pub worked_ms: u64,
    /// Requests served by this process, this one included.
    pub requests: u64,
    pub healthy: bool,
}

#[derive(Debug, Deserialize)]
struct HelloQuery {
    work_ms: Option<u64>,
    sleep_ms: Option<u64>,
}

struct AppState {
    config: WorkloadConfig,
    healthy: AtomicBool,
    requests: AtomicU64,
}

/// The app's routes, for embedding in tests.
pub fn router(config: WorkloadConfig) -> Router {
    let state = Arc::new(AppState {
        config,
        healthy: AtomicBool::new(true),
        requests: AtomicU64::new(0),
    });
    Router::new()
        .route("/", get(hello))
        .route("/healthz", get(healthz))
        .route("/fail", post(fail))
        .route("/recover", post(recover))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then waits for in-flight requests.
pub async fn run(
    listener: TcpListener,
    config: WorkloadConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn hello(State(state): State<Arc<AppState>>, Query(query): Query<HelloQuery>) -> Response {
    let requests = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let sleep = Duration::from_millis(query.sleep_ms.unwrap_or(0)).min(state.config.max_work);
    if !sleep.is_zero() {
        tokio::time::sleep(sleep).await;
    }
    let wanted = Duration::from_millis(query.work_ms.unwrap_or(0));
    let work = wanted.min(state.config.max_work);
    if !work.is_zero() {
        // Burn on the blocking pool: the async workers must stay free to accept requests and
        // answer health checks while a request computes.
        if let Err(error) = tokio::task::spawn_blocking(move || burn_cpu(work)).await {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("work failed: {error}"),
            )
                .into_response();
        }
    }
    Json(Hello {
        instance_id: state.config.instance_id.clone(),
        pid: std::process::id(),
        worked_ms: u64::try_from(work.as_millis()).unwrap_or(u64::MAX),
        requests,
        healthy: state.healthy.load(Ordering::Relaxed),
    })
    .into_response()
}

/// Spins for `duration` of wall time on one thread, doing arithmetic the optimiser cannot
/// remove, so it shows up as real CPU use.
pub fn burn_cpu(duration: Duration) -> u64 {
    let start = Instant::now();
    let mut accumulator: u64 = 0x9e37_79b9_7f4a_7c15;
    while start.elapsed() < duration {
        for _ in 0..10_000 {
            accumulator ^= accumulator << 13;
            accumulator ^= accumulator >> 7;
            accumulator ^= accumulator << 17;
        }
        accumulator = std::hint::black_box(accumulator);
    }
    accumulator
}

async fn healthz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.healthy.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "failing (POST /recover to undo)\n",
        )
    }
}

async fn fail(State(state): State<Arc<AppState>>) -> &'static str {
    state.healthy.store(false, Ordering::Relaxed);
    "healthz now fails\n"
}

async fn recover(State(state): State<Arc<AppState>>) -> &'static str {
    state.healthy.store(true, Ordering::Relaxed);
    "healthz now passes\n"
}

/// The instance id when none is configured: the host name (inside a VM, the guest's).
pub fn default_instance_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burns_about_the_requested_time() {
        let start = Instant::now();
        burn_cpu(Duration::from_millis(50));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}

//! Health checking: a pure state machine ([`step`]) and the task that drives it ([`spawn_prober`]).
//!
//! The state machine reads no clock: the caller passes the time elapsed since the instance
//! started, so every rule (thresholds, start-up grace) is tested with plain numbers.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use strata_api::{HealthCheck, HealthProtocol};

/// The verdict on an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// No verdict yet: the instance has not passed `healthy_threshold` probes in a row, and has
    /// not failed `unhealthy_threshold` probes in a row outside its grace period.
    Unknown,
    Healthy,
    Unhealthy,
}

/// Everything the state machine remembers between probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    pub status: HealthStatus,
    /// Passes in a row; reset by a counted failure.
    pub consecutive_passes: u32,
    /// Counted failures in a row; reset by a pass. Failures inside the grace period of an
    /// instance that has never been healthy are not counted.
    pub consecutive_failures: u32,
    /// Why the last probe failed, for the operator.
    pub last_failure: Option<String>,
}

impl HealthState {
    pub fn new() -> Self {
        HealthState {
            status: HealthStatus::Unknown,
            consecutive_passes: 0,
            consecutive_failures: 0,
            last_failure: None,
        }
    }
}

impl Default for HealthState {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    Pass,
    Fail(String),
}

/// The thresholds of a [`HealthCheck`], with zero thresholds read as one (a threshold of zero
/// would mean "healthy before any probe", which no operator intends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub grace_period: Duration,
}

impl From<&HealthCheck> for HealthPolicy {
    fn from(check: &HealthCheck) -> Self {
        HealthPolicy {
            healthy_threshold: check.healthy_threshold.max(1),
            unhealthy_threshold: check.unhealthy_threshold.max(1),
            grace_period: check.grace_period.as_std(),
        }
    }
}

/// Advances the health state by one probe result observed `since_start` after the instance
/// started.
///
/// Guarantees: `Healthy` only after `healthy_threshold` passes in a row; `Unhealthy` only after
/// `unhealthy_threshold` counted failures in a row; an instance that has never had a verdict
/// cannot become unhealthy during its grace period (a slow boot is not a failure), while one
/// that was already judged is judged normally (the grace period protects start-up only).
pub fn step(
    policy: &HealthPolicy,
    state: &HealthState,
    result: &ProbeResult,
    since_start: Duration,
) -> HealthState {
    let healthy_threshold = policy.healthy_threshold.max(1);
    let unhealthy_threshold = policy.unhealthy_threshold.max(1);
    match result {
        ProbeResult::Pass => {
            let passes = state.consecutive_passes.saturating_add(1);
            HealthState {
                status: if passes >= healthy_threshold {
                    HealthStatus::Healthy
                } else {
                    state.status
                },
                consecutive_passes: passes,
                consecutive_failures: 0,
                last_failure: state.last_failure.clone(),
            }
        }
        ProbeResult::Fail(reason) => {
            let in_grace =
                state.status == HealthStatus::Unknown && since_start < policy.grace_period;
            if in_grace {
                return HealthState {
                    status: HealthStatus::Unknown,
                    consecutive_passes: 0,
                    consecutive_failures: 0,
                    last_failure: Some(reason.clone()),
                };
            }
            let failures = state.consecutive_failures.saturating_add(1);
            HealthState {
                status: if failures >= unhealthy_threshold {
                    HealthStatus::Unhealthy
                } else {
                    state.status
                },
                consecutive_passes: 0,
                consecutive_failures: failures,
                last_failure: Some(reason.clone()),
            }
        }
    }
}

/// What a probe task needs to know.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    pub address: SocketAddr,
    pub check: HealthCheck,
}

/// Probes `target` once, within the check's timeout.
pub async fn probe_once(client: &reqwest::Client, target: &ProbeTarget) -> ProbeResult {
    let timeout = target.check.timeout.as_std().max(Duration::from_millis(1));
    match target.check.protocol {
        HealthProtocol::Tcp => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target.address))
                .await
            {
                Ok(Ok(_stream)) => ProbeResult::Pass,
                Ok(Err(error)) => ProbeResult::Fail(format!("connect {}: {error}", target.address)),
                Err(_) => ProbeResult::Fail(format!(
                    "connect {}: timed out after {timeout:?}",
                    target.address
                )),
            }
        }
        HealthProtocol::Http => {
            let path = if target.check.path.starts_with('/') {
                target.check.path.clone()
            } else {
                format!("/{}", target.check.path)
            };
            let url = format!("http://{}{}", target.address, path);
            match client.get(&url).timeout(timeout).send().await {
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() || status.is_redirection() {
                        ProbeResult::Pass
                    } else {
                        ProbeResult::Fail(format!("GET {url}: status {status}"))
                    }
                }
                Err(error) if error.is_timeout() => {
                    ProbeResult::Fail(format!("GET {url}: timed out after {timeout:?}"))
                }
                Err(error) => ProbeResult::Fail(format!("GET {url}: {error}")),
            }
        }
    }
}

/// A running probe task. Its owner cancels and awaits it with [`shutdown`](Self::shutdown);
/// dropping it cancels the task too.
#[derive(Debug)]
pub struct ProberHandle {
    state: watch::Receiver<HealthState>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl ProberHandle {
    /// The latest health state.
    pub fn current(&self) -> HealthState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change (for waiting on a verdict).
    pub fn subscribe(&self) -> watch::Receiver<HealthState> {
        self.state.clone()
    }

    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                tracing::warn!(%error, "health probe task ended abnormally");
            }
        }
    }
}

impl Drop for ProberHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Probe interval before an instance's first verdict, during its start-up grace.
const STARTUP_PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Starts a task that probes `target` every `interval` and publishes each new state.
/// `started_ago` is how long the instance has already been running (non-zero for an adopted
/// instance), so the grace period is measured from the instance's start, not the task's.
pub fn spawn_prober(
    client: reqwest::Client,
    target: ProbeTarget,
    started_ago: Duration,
    parent_cancel: &CancellationToken,
) -> ProberHandle {
    let (sender, receiver) = watch::channel(HealthState::new());
    let cancel = parent_cancel.child_token();
    let task_cancel = cancel.clone();
    let task = tokio::spawn(async move {
        let policy = HealthPolicy::from(&target.check);
        let interval = target
            .check
            .interval
            .as_std()
            .max(Duration::from_millis(50));
        let epoch = tokio::time::Instant::now()
            .checked_sub(started_ago)
            .unwrap_or_else(tokio::time::Instant::now);
        let mut state = HealthState::new();
        loop {
            let result = tokio::select! {
                () = task_cancel.cancelled() => return,
                result = probe_once(&client, &target) => result,
            };
            let next = step(&policy, &state, &result, epoch.elapsed());
            if next.status != state.status {
                tracing::info!(
                    address = %target.address,
                    from = ?state.status,
                    to = ?next.status,
                    last_failure = next.last_failure.as_deref().unwrap_or(""),
                    "health changed"
                );
            }
            state = next;
            sender.send_replace(state.clone());
            // Until the first verdict, within the start-up grace, probe quickly: a new
            // instance is reported healthy (and joins its pool) as soon as it serves, not an
            // interval later.
            let starting = state.status == HealthStatus::Unknown
                && epoch.elapsed() < target.check.grace_period.as_std();
            let pause = if starting {
                interval.min(STARTUP_PROBE_INTERVAL)
            } else {
                interval
            };
            tokio::select! {
                () = task_cancel.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    });
    ProberHandle {
        state: receiver,
        cancel,
        task: Some(task),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(healthy: u32, unhealthy: u32, grace_secs: u64) -> HealthPolicy {
        HealthPolicy {
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            grace_period: Duration::from_secs(grace_secs),
        }
    }

    fn fail() -> ProbeResult {
        ProbeResult::Fail("refused".into())
    }

    /// Runs a sequence of (result, seconds since start) and returns the statuses after each.
    fn run(policy: &HealthPolicy, steps: &[(bool, u64)]) -> Vec<HealthStatus> {
        let mut state = HealthState::new();
        steps
            .iter()
            .map(|(pass, at)| {
                let result = if *pass { ProbeResult::Pass } else { fail() };
                state = step(policy, &state, &result, Duration::from_secs(*at));
                state.status
            })
            .collect()
    }

    use HealthStatus::{Healthy as H, Unhealthy as X, Unknown as U};

    /// A named case: policy, (pass?, seconds since start) per probe, statuses expected after each.
    type Case<'a> = (&'a str, HealthPolicy, &'a [(bool, u64)], &'a [HealthStatus]);

    #[test]
    fn table() {
        let cases: &[Case<'_>] = &[
            (
                "one pass is enough with threshold 1",
                policy(1, 3, 30),
                &[(true, 1)],
                &[H],
            ),
            (
                "failures inside grace are ignored, then passes count",
                policy(2, 2, 30),
                &[(false, 1), (false, 2), (false, 3), (true, 4), (true, 5)],
                &[U, U, U, U, H],
            ),
            (
                "failures after grace make an unjudged instance unhealthy",
                policy(1, 2, 10),
                &[(false, 5), (false, 11), (false, 12)],
                &[U, U, X],
            ),
            (
                "grace protects start-up only: a healthy instance fails normally inside it",
                policy(1, 2, 30),
                &[(true, 1), (false, 2), (false, 3)],
                &[H, H, X],
            ),
            (
                "a pass resets the failure count",
                policy(1, 3, 0),
                &[
                    (true, 1),
                    (false, 2),
                    (false, 3),
                    (true, 4),
                    (false, 5),
                    (false, 6),
                ],
                &[H, H, H, H, H, H],
            ),
            (
                "recovery needs healthy_threshold passes in a row",
                policy(3, 1, 0),
                &[
                    (false, 1),
                    (true, 2),
                    (true, 3),
                    (false, 4),
                    (true, 5),
                    (true, 6),
                    (true, 7),
                ],
                &[X, X, X, X, X, X, H],
            ),
            (
                "zero thresholds act as one",
                policy(0, 0, 0),
                &[(false, 1), (true, 2)],
                &[X, H],
            ),
            (
                "failure exactly at the end of grace counts",
                policy(1, 1, 10),
                &[(false, 10)],
                &[X],
            ),
        ];
        for (name, policy, steps, expected) in cases {
            assert_eq!(run(policy, steps), *expected, "{name}");
        }
    }

    #[test]
    fn last_failure_is_kept_for_the_operator() {
        let policy = policy(1, 1, 0);
        let state = step(&policy, &HealthState::new(), &fail(), Duration::ZERO);
        assert_eq!(state.last_failure.as_deref(), Some("refused"));
        let state = step(&policy, &state, &ProbeResult::Pass, Duration::ZERO);
        assert_eq!(state.status, HealthStatus::Healthy);
    }

    /// Every reachable state, every input, inside and outside grace: the invariants of `step`.
    #[test]
    fn exhaustive_invariants() {
        for healthy_threshold in 0..4 {
            for unhealthy_threshold in 0..4 {
                let policy = policy(healthy_threshold, unhealthy_threshold, 10);
                for status in [U, H, X] {
                    for passes in 0..5 {
                        for failures in 0..5 {
                            let state = HealthState {
                                status,
                                consecutive_passes: passes,
                                consecutive_failures: failures,
                                last_failure: None,
                            };
                            for at in [0, 9, 10, 11] {
                                check_pass(&policy, &state, at);
                                check_fail(&policy, &state, at);
                            }
                        }
                    }
                }
            }
        }
    }

    fn check_pass(policy: &HealthPolicy, state: &HealthState, at: u64) {
        let next = step(policy, state, &ProbeResult::Pass, Duration::from_secs(at));
        assert_eq!(next.consecutive_failures, 0);
        assert_eq!(next.consecutive_passes, state.consecutive_passes + 1);
        if state.status != U {
            assert_ne!(next.status, U, "a pass never loses a verdict: {state:?}");
        }
        if next.consecutive_passes >= policy.healthy_threshold.max(1) {
            assert_eq!(next.status, H);
        } else {
            assert_eq!(
                next.status, state.status,
                "no verdict change before threshold"
            );
        }
        assert!(
            !(state.status == H && next.status != H),
            "a pass keeps healthy healthy"
        );
    }

    fn check_fail(policy: &HealthPolicy, state: &HealthState, at: u64) {
        let next = step(policy, state, &fail(), Duration::from_secs(at));
        assert_eq!(next.consecutive_passes, 0);
        if state.status != H {
            assert_ne!(next.status, H, "a failure never makes an instance healthy");
        }
        let in_grace = state.status == U && Duration::from_secs(at) < policy.grace_period;
        if in_grace {
            assert_eq!(next.status, U);
            assert_eq!(next.consecutive_failures, 0);
        } else {
            assert_eq!(next.consecutive_failures, state.consecutive_failures + 1);
            if next.consecutive_failures >= policy.unhealthy_threshold.max(1) {
                assert_eq!(next.status, X);
            } else {
                assert_eq!(next.status, state.status);
            }
        }
    }
}

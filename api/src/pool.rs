//! Load-balancer pools: what a tier's load balancers must serve, and what they report back.
//!
//! A `Pool` is a read model the leader computes from the replicated state (see the
//! controller's `views`): a tier's Running and healthy instances in state `ready`, and the
//! instances leaving the tier, which keep serving their open connections, in state `drain`.
//! LB agents receive every pool in their heartbeat answer and report, per tier, the pool
//! version they apply and HAProxy's statistics; the leader keeps those reports in memory and
//! ends a drain when every LB agent serving the tier says the instance has no session left.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::tier::{HealthCheck, LoadBalancer};

/// How a load balancer treats one server.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Takes new requests.
    Ready,
    /// Takes no new requests (except sticky ones, as HAProxy's `drain` does); finishes what
    /// it has. The instance is stopped only when its drain ends.
    Drain,
}

/// One server of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolServer {
    pub instance_id: Uuid,
    pub address: String,
    pub port: u16,
    /// HAProxy weight, 1 to 256.
    pub weight: u32,
    pub state: ServerState,
}

/// What a tier's load balancers must serve. Servers are sorted by instance id, so two pools
/// with the same content compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub tier: String,
    /// The Raft log index of the last command that changed this pool: strictly increasing per
    /// tier, so an LB agent can tell an old answer from a new one.
    pub version: u64,
    /// The tier's load-balancer spec (listen address, mode, algorithm, ...).
    pub load_balancer: LoadBalancer,
    /// The tier's health check, which the load balancer runs too (HTTP path or TCP connect,
    /// interval, thresholds), so a dead server leaves its rotation within one detection time
    /// even before the controller hears of it.
    pub health: HealthCheck,
    pub servers: Vec<PoolServer>,
}

/// HAProxy's figures for one server (`show stat`), or summed over a tier's servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbStats {
    /// HTTP requests (http mode) or sessions (tcp mode) per second over the last second.
    #[serde(default)]
    pub request_rate: f64,
    /// Sessions open now (`scur`).
    #[serde(default)]
    pub sessions: u64,
    /// Most sessions open at once since HAProxy started (`smax`).
    #[serde(default)]
    pub max_sessions: u64,
    /// Requests queued, waiting for a server (`qcur`).
    #[serde(default)]
    pub queue: u64,
    /// Average response time over the last 1024 requests, in ms (`rtime`).
    #[serde(default)]
    pub response_time_ms: f64,
    /// HTTP 5xx answers since HAProxy started (`hrsp_5xx`), a counter.
    #[serde(default)]
    pub http_5xx: u64,
    /// Requests or sessions since HAProxy started (`req_tot` or `stot`), a counter.
    #[serde(default)]
    pub total: u64,
}

/// One server as an LB agent sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbServerReport {
    pub instance_id: Uuid,
    /// HAProxy's view: `UP`, `DOWN`, `DRAIN`, `MAINT`, `NOLB`, ...
    pub status: String,
    pub stats: LbStats,
}

/// One tier as an LB agent serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbTierReport {
    pub tier: String,
    /// The pool version HAProxy runs now (0: none applied yet).
    pub version: u64,
    /// Why the tier's frontend does not serve (its listen address is taken or not local);
    /// absent while it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The backend's figures (the sum over its servers, with the backend's queue).
    pub stats: LbStats,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<LbServerReport>,
}

/// The longest [`LbTierReport::error`] kept, in bytes: the agent cuts what HAProxy said to it
/// and the controller cuts what any agent sends, so a report stays small in the leader's
/// memory, in `GET /v1/tiers/{name}/pool` and in the events it causes.
pub const MAX_LB_ERROR_BYTES: usize = 1024;

/// `text` cut to at most [`MAX_LB_ERROR_BYTES`] bytes on a character boundary, ending in `…`
/// when something was cut.
pub fn truncate_lb_error(text: &mut String) {
    if text.len() <= MAX_LB_ERROR_BYTES {
        return;
    }
    const MARK: &str = "…";
    let mut end = MAX_LB_ERROR_BYTES - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
}

impl LbReport {
    /// Cuts every tier's error to [`MAX_LB_ERROR_BYTES`].
    pub fn truncate_errors(&mut self) {
        for tier in &mut self.tiers {
            if let Some(error) = &mut tier.error {
                truncate_lb_error(error);
            }
        }
    }
}

/// What an LB agent adds to its heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LbReport {
    /// The pid of HAProxy's worker, so a reload (new pid) is visible from outside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_pid: Option<u32>,
    /// HAProxy reloads since the agent started.
    #[serde(default)]
    pub reloads: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<LbTierReport>,
}

/// `GET /v1/tiers/{name}/pool`: the pool and what each LB agent serving it reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolView {
    #[serde(flatten)]
    pub pool: Pool,
    /// Per LB node: the version it applied and its figures (leader memory; empty when the
    /// answering node has not heard from any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub balancers: Vec<BalancerView>,
}

/// One LB node's report about one tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BalancerView {
    pub node: String,
    /// The pid of that node's HAProxy worker (a reload changes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_pid: Option<u32>,
    /// HAProxy reloads on that node since its agent started.
    #[serde(default)]
    pub reloads: u64,
    pub report: LbTierReport,
    pub reported_at_ms: u64,
}

#[cfg(test)]
mod truncation_tests {
    use super::*;

    #[test]
    fn errors_are_cut_to_the_limit_on_a_char_boundary() {
        let mut short = "address in use".to_string();
        truncate_lb_error(&mut short);
        assert_eq!(short, "address in use");

        let mut exact = "x".repeat(MAX_LB_ERROR_BYTES);
        truncate_lb_error(&mut exact);
        assert_eq!(exact.len(), MAX_LB_ERROR_BYTES);
        assert!(!exact.ends_with('…'));

        // Three-byte characters: the cut never splits one.
        for prefix in 0..3 {
            let mut long = format!("{}{}", "a".repeat(prefix), "€".repeat(1000));
            truncate_lb_error(&mut long);
            assert!(long.len() <= MAX_LB_ERROR_BYTES, "{}", long.len());
            assert!(long.len() > MAX_LB_ERROR_BYTES - 6, "{}", long.len());
            assert!(long.ends_with('…'));
            assert!(long.starts_with(&"a".repeat(prefix)));
        }
    }
}

//! Agent upcalls under `/v1/agents`: registration (a Raft write, forwarded like any write) and
//! heartbeats (leader memory only). Registration takes the join token, an EC2 instance's
//! bootstrap token (its own node only) or the node's credential; heartbeats the credential.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::Json;
use strata_api::{
    Assignment, HeartbeatRequest, HeartbeatResponse, NodeRole, Phase, Pool, Problem,
    RegisterRequest, Registration,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::api::{node_answer, rejection_error, JsonBody};
use super::openapi::WriteErrors;
use super::{credential_digest, ApiError, Caller};
use crate::node::{now_ms, Controller};
use crate::state::{Command, CommandResult, NodeAuth};
use crate::views;

/// The agent routes; each handler's `#[utoipa::path]` is its entry in `/openapi.json`.
pub fn routes() -> OpenApiRouter<Arc<Controller>> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(heartbeat))
}

fn forbidden(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}

/// A fresh node credential: 256 random bits in hex.
fn new_credential() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// With the join token: a new node gets its credential in the answer (a registered node that
/// holds one is refused, and the attempt recorded as an event). With the node's credential:
/// the node's facts are updated, for that node only.
#[utoipa::path(post, path = "/v1/agents/register", tag = "agents",
    request_body(content = RegisterRequest),
    responses(
        (status = 200, description = "The node; with the join token, also its credential (shown this once)", body = Registration),
        (status = 403, description = "Not the join token or this node's credential, or the node already holds a credential (claims with the join token are refused)"),
        (status = 422, description = "An invalid registration, or the `--max-nodes` limit"),
        WriteErrors,
    ))]
async fn register(
    State(controller): State<Arc<Controller>>,
    Extension(caller): Extension<Caller>,
    JsonBody(registration): JsonBody<RegisterRequest>,
) -> Result<Json<Registration>, ApiError> {
    strata_api::validate::register(&registration).map_err(Problem::validation)?;
    let (auth, credential) = match caller {
        Caller::Join => {
            let credential = new_credential();
            let credential_hash = credential_digest(&credential);
            (NodeAuth::JoinToken { credential_hash }, Some(credential))
        }
        Caller::Node {
            id,
            credential_hash,
        } => {
            if id != registration.node_id {
                return Err(forbidden(format!(
                    "this credential is node {id:?}'s; it cannot register node {:?}",
                    registration.node_id
                )));
            }
            (NodeAuth::Credential { credential_hash }, None)
        }
        Caller::Boot { instance } => {
            // Apply decides whether it may (`State::bootstrap_refusal`), so that every node
            // judges the instance record alike.
            let credential = new_credential();
            let credential_hash = credential_digest(&credential);
            (
                NodeAuth::Bootstrap {
                    credential_hash,
                    instance,
                },
                Some(credential),
            )
        }
        Caller::Admin | Caller::Viewer => {
            return Err(forbidden("registration needs the join token"));
        }
    };
    let result = controller
        .propose(Command::RegisterNode {
            registration,
            auth: Some(auth),
            max_nodes: Some(controller.limits.max_nodes),
        })
        .await?;
    match result {
        CommandResult::Node { node } => {
            let Json(view) = node_answer(&controller, &node);
            Ok(Json(Registration {
                node: view,
                credential,
            }))
        }
        CommandResult::Rejected { rejection } => Err(rejection_error(rejection)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            format!("registration produced {other:?}"),
        )),
    }
}

/// Records the heartbeat in the leader's memory and answers with the node's assignments.
/// A follower answers 421 with the leader's address, so the agent can talk to it directly.
#[utoipa::path(post, path = "/v1/agents/heartbeat", tag = "agents",
    request_body(content = HeartbeatRequest),
    responses(
        (status = 200, description = "What the node must run (and, for a load balancer, serve)", body = HeartbeatResponse),
        (status = 403, description = "Not the credential of the node named in the body"),
        (status = 404, description = "The node is not registered"),
        (status = 421, description = "This node is not the leader; `leader` has the leader's address"),
        (status = 422, description = "An invalid heartbeat"),
    ))]
async fn heartbeat(
    State(controller): State<Arc<Controller>>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    strata_api::validate::heartbeat(&request).map_err(Problem::validation)?;
    // A node speaks for itself only (like Kubernetes' NodeRestriction): a heartbeat in
    // another node's name could read its templates and, reporting no instances, have its
    // healthy instances replaced.
    match &caller {
        Caller::Node { id, .. } if *id == request.node_id => {}
        Caller::Node { id, .. } => {
            return Err(forbidden(format!(
                "this credential is node {id:?}'s; it cannot heartbeat for node {:?}",
                request.node_id
            )))
        }
        _ => return Err(forbidden(
            "heartbeats need the node's own credential (register with the join token to get it)",
        )),
    }
    if !controller.is_leader() {
        let mut problem = Problem::new(
            421,
            "not-leader",
            "Not the leader",
            "heartbeats go to the leader; retry there",
        );
        problem.leader = controller.leader().map(|(_, address)| address);
        return Err(ApiError(problem));
    }
    let node = request.node_id.clone();
    let reported = Reported::of(&request);
    let Some(mut wanted) = wanted_by(&controller, &node) else {
        return Err(ApiError::not_found(format!(
            "node {node:?} is not registered; register first"
        )));
    };
    // The leader's memory keeps only what concerns the node: reports of instances placed on
    // it and, for a load balancer, of the tiers and servers it is told to serve. What else a
    // heartbeat carries (at most the 1 MiB a body may hold) is read and dropped, so the
    // memory heartbeats take grows with the cluster's real size, not with what agents send.
    let (instances, lb) = controller.state.read(|machine| {
        let state = &machine.state;
        let instances: Vec<_> = request
            .instances
            .into_iter()
            .filter(|report| {
                state
                    .instances
                    .get(&report.id)
                    .is_some_and(|instance| instance.node.as_deref() == Some(node.as_str()))
            })
            .collect();
        let serves = state
            .nodes
            .get(&node)
            .is_some_and(|record| record.has_role(NodeRole::LoadBalancer));
        let lb = request.lb.filter(|_| serves).map(|mut lb| {
            lb.tiers.retain(|tier| state.tiers.contains_key(&tier.tier));
            for tier in &mut lb.tiers {
                tier.servers.retain(|server| {
                    state
                        .instances
                        .get(&server.instance_id)
                        .is_some_and(|instance| instance.tier == tier.tier)
                });
            }
            lb
        });
        (instances, lb)
    });
    let at_ms = now_ms();
    // Only the node's own instances count for autoscaling too: a node cannot skew another
    // tier's CPU by reporting instances it does not run.
    let cpu = crate::autoscaler::cpu_samples(&controller, &instances);
    let from_balancer = lb.is_some();
    let changed = controller
        .liveness
        .record(&node, at_ms, request.metrics, instances, lb);
    // The autoscaler's windows: instance CPU, and for an LB node the tiers' traffic summed
    // over every LB node's latest report (this one's included).
    let term = controller.raft.metrics().borrow().current_term;
    let lb_reports = from_balancer.then(|| {
        (
            controller.liveness.lb_reports(),
            crate::autoscaler::lb_watched_tiers(&controller),
        )
    });
    controller.autoscaler.record_heartbeat(
        term,
        at_ms,
        &cpu,
        lb_reports
            .as_ref()
            .map(|(reports, watched)| (reports.as_slice(), watched)),
    );
    if changed {
        controller.liveness.wake.notify_one();
    }
    // Long poll: while the node already runs exactly what it is assigned (and, for a load
    // balancer, serves every pool at its current version), hold the answer until that
    // changes or the wait ends (like Nomad's blocking queries), so new work and pool changes
    // reach the agent at once without short heartbeat intervals.
    let wait = Duration::from_millis(request.wait_ms.min(MAX_HEARTBEAT_WAIT_MS));
    let deadline = tokio::time::Instant::now() + wait;
    let signal = controller.liveness.signal(&node);
    loop {
        if !reported.in_sync(&wanted) || tokio::time::Instant::now() >= deadline {
            break;
        }
        let notified = signal.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let pools_changed = controller.liveness.pools_changed.notified();
        tokio::pin!(pools_changed);
        pools_changed.as_mut().enable();
        // Re-read after arming the signals, so a change in between is not missed.
        wanted = wanted_by(&controller, &node).unwrap_or_default();
        if !reported.in_sync(&wanted) {
            break;
        }
        tokio::select! {
            () = &mut notified => {}
            () = &mut pools_changed, if wanted.pools.is_some() => {}
            () = tokio::time::sleep_until(deadline) => break,
        }
        wanted = wanted_by(&controller, &node).unwrap_or_default();
    }
    Ok(Json(HeartbeatResponse {
        assignments: wanted.assignments,
        pools: wanted.pools.unwrap_or_default(),
    }))
}

/// What a node must run and serve.
#[derive(Default)]
struct Wanted {
    assignments: Vec<Assignment>,
    /// Load-balancer nodes: every tier's pool.
    pools: Option<Vec<Pool>>,
}

/// What a heartbeat says the node runs and serves.
struct Reported {
    live: BTreeSet<Uuid>,
    /// Per frontend an LB node reports: the pool version it applied, or `None` when it cannot
    /// serve the tier (its listen address is taken there): such a tier counts as in sync
    /// whatever its version, or an LB node with one unservable tier would never be held.
    pools: BTreeMap<String, Option<u64>>,
}

impl Reported {
    fn of(request: &HeartbeatRequest) -> Self {
        Reported {
            live: request
                .instances
                .iter()
                .filter(|report| matches!(report.phase, Phase::Starting | Phase::Running))
                .map(|report| report.id)
                .collect(),
            pools: request
                .lb
                .iter()
                .flat_map(|lb| &lb.tiers)
                .map(|tier| {
                    let version = tier.error.is_none().then_some(tier.version);
                    (tier.tier.clone(), version)
                })
                .collect(),
        }
    }

    fn in_sync(&self, wanted: &Wanted) -> bool {
        let assigned: BTreeSet<Uuid> = wanted
            .assignments
            .iter()
            .map(|assignment| assignment.instance_id)
            .collect();
        let pools_in_sync = wanted.pools.as_ref().is_none_or(|pools| {
            pools.len() == self.pools.len()
                && pools.iter().all(|pool| match self.pools.get(&pool.tier) {
                    Some(Some(version)) => *version == pool.version,
                    Some(None) => true,
                    None => false,
                })
        });
        assigned == self.live && pools_in_sync
    }
}

/// What `node` must run and serve, or `None` when the node is not registered.
fn wanted_by(controller: &Controller, node: &str) -> Option<Wanted> {
    controller.state.read(|machine| {
        let state = &machine.state;
        let assignments = views::assignments_of(state, node)?;
        let pools = state
            .nodes
            .get(node)
            .filter(|record| record.has_role(NodeRole::LoadBalancer))
            .map(|_| views::pools(state));
        Some(Wanted { assignments, pools })
    })
}

/// Longest a heartbeat answer may be held.
const MAX_HEARTBEAT_WAIT_MS: u64 = 10_000;

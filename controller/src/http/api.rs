//! The public `/v1` API: tiers and the cluster.
//!
//! Writes validate first (422 with field paths), then go through `Controller::propose`, which
//! reaches the leader wherever the request landed. Reads are linearizable unless the client
//! asks for `?stale=true`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use strata_api::{
    AddMemberRequest, BalancerView, CustomMetricSample, Event, FieldError, HostMetrics, Instance,
    ItemList, Node, PoolView, Problem, ScaleRequest, Tier, TierSpec,
};

use super::ApiError;
use crate::node::{now_ms, Controller, MemberChange};
use crate::state::{Command, CommandResult, NodeRecord, Rejection, State as Replicated};
use crate::views::{node_view, tier_view, TierIndex};

pub fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/v1/tiers", get(list_tiers))
        .route(
            "/v1/tiers/{name}",
            get(get_tier).put(put_tier).delete(delete_tier),
        )
        .route("/v1/tiers/{name}/scale", post(scale_tier))
        .route("/v1/tiers/{name}/metrics", post(push_metric))
        .route("/v1/tiers/{name}/instances", get(tier_instances))
        .route("/v1/tiers/{name}/pool", get(tier_pool))
        .route("/v1/instances", get(list_instances))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node))
        .route("/v1/nodes/{id}/{action}", post(node_action))
        .route("/v1/events", get(list_events))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/members", post(add_member))
        .route("/v1/cluster/members/{id}", delete(remove_member))
}

/// A JSON request body: checks the content type (415), the size (413) and decodes with field
/// paths in every error (400 for malformed JSON, 422 for a well-formed body of the wrong shape).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string();
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        if !media_type.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                format!(
                    "the body must be application/json, not {:?}",
                    if content_type.is_empty() {
                        "(none)"
                    } else {
                        &content_type
                    }
                ),
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_rejection)?;
        strata_api::decode::decode_json(&bytes)
            .map(JsonBody)
            .map_err(ApiError)
    }
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
    while let Some(error) = source {
        if error.is::<super::serve::BodyTimeout>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                "Request body timeout",
                "the request body did not arrive within --body-timeout",
            );
        }
        source = error.source();
    }
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            "Request body too large",
            format!(
                "request bodies are limited to {} bytes",
                super::MAX_API_BODY
            ),
        )
    } else {
        ApiError::bad_request(format!("read request body: {}", rejection.body_text()))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadParams {
    #[serde(default)]
    stale: bool,
}

/// `?stale=&limit=&continue=` of a list.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(default)]
    stale: bool,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    after: Option<String>,
}

/// One page of `items` (sorted by their keys, which are strings ordered as the items are):
/// those after `after`, at most `limit`, and the key to continue from if more follow.
/// Continuing from a key, not an offset, keeps pages right while objects come and go.
fn page<T>(
    items: impl Iterator<Item = (String, T)>,
    limit: Option<usize>,
    after: Option<&str>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    use strata_api::list::{DEFAULT_PAGE, MAX_PAGE};
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError(Problem::validation(vec![FieldError::new(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        )])));
    }
    let mut page = Vec::new();
    let mut last = None;
    for (key, item) in items.filter(|(key, _)| after.is_none_or(|after| key.as_str() > after)) {
        if page.len() == limit {
            return Ok((page, last));
        }
        last = Some(key);
        page.push(item);
    }
    Ok((page, None))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    resource_version: Option<u64>,
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(params)| params)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

async fn read_barrier(controller: &Controller, stale: bool) -> Result<(), ApiError> {
    if !stale {
        controller.linearizable().await?;
    }
    Ok(())
}

async fn list_tiers(
    State(controller): State<Arc<Controller>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ItemList<Tier>>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    let now = now_ms();
    controller.state.read(|machine| {
        let index = TierIndex::of(&machine.state);
        let (items, next) = page(
            machine
                .state
                .tiers
                .iter()
                .map(|(name, tier)| (name.clone(), tier)),
            params.limit,
            params.after.as_deref(),
        )?;
        Ok(Json(ItemList {
            items: items
                .into_iter()
                .map(|tier| tier_view(&machine.state, &index, tier, now))
                .collect(),
            resource_version: Some(list_version(&machine.state, machine.last_applied)),
            next,
        }))
    })
}

async fn get_tier(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Tier>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    let now = now_ms();
    controller
        .state
        .read(|machine| {
            machine
                .state
                .tiers
                .get(&name)
                .map(|tier| tier_view(&machine.state, &TierIndex::of(&machine.state), tier, now))
        })
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("tier {name:?} does not exist")))
}

/// `GET /v1/tiers/{name}/pool`: the pool its load balancers must serve, and what each one
/// reports serving (the leader's memory). 404 when the tier does not exist or has no load
/// balancer.
async fn tier_pool(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<PoolView>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    let pool = controller.state.read(|machine| {
        let tier = machine
            .state
            .tiers
            .get(&name)
            .ok_or_else(|| ApiError::not_found(format!("tier {name:?} does not exist")))?;
        crate::views::pool_of(&TierIndex::of(&machine.state), tier).ok_or_else(|| {
            ApiError::not_found(format!(
                "tier {name:?} has no load balancer (no load_balancer.listen)"
            ))
        })
    })?;
    let reports = if params.stale {
        controller.liveness.lb_reports()
    } else {
        controller.lb_reports().await
    };
    let balancers = reports
        .into_iter()
        .filter_map(|(node, reported_at_ms, report)| {
            let worker_pid = report.worker_pid;
            let reloads = report.reloads;
            let report = report.tiers.into_iter().find(|tier| tier.tier == name)?;
            Some(BalancerView {
                node,
                worker_pid,
                reloads,
                report,
                reported_at_ms,
            })
        })
        .collect();
    Ok(Json(PoolView { pool, balancers }))
}

async fn put_tier(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
    JsonBody(spec): JsonBody<TierSpec>,
) -> Result<Response, ApiError> {
    strata_api::validate::put_tier(&name, &spec).map_err(Problem::validation)?;
    // Checked here for a quick answer, and again in apply (`max_tiers` in the command), where
    // the log orders writes racing on several nodes: only what fits is stored.
    let (count, exists) = controller.state.read(|machine| {
        (
            machine.state.tiers.len(),
            machine.state.tiers.contains_key(&name),
        )
    });
    if !exists && count as u64 >= controller.limits.max_tiers {
        let mut problem = Problem::validation(vec![FieldError::new(
            "name",
            format!(
                "the cluster already has {count} tiers, its limit (--max-tiers {})",
                controller.limits.max_tiers
            ),
        )]);
        problem.problem_type = "urn:strata:problem:limit".to_string();
        problem.title = "Limit reached".to_string();
        return Err(ApiError(problem));
    }
    let result = controller
        .propose(Command::PutTier {
            spec: Box::new(spec),
            max_tiers: Some(controller.limits.max_tiers),
        })
        .await?;
    write_response(result)
}

async fn delete_tier(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
    params: Result<Query<DeleteParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query(params)?;
    let result = controller
        .propose(Command::DeleteTier {
            name,
            expected_version: params.resource_version,
        })
        .await?;
    write_response(result)
}

/// `{"desired": N}` sets the count by hand (pausing the autoscaler), `{"auto": true}` hands
/// it back; older clients send only `desired`, which means what it always meant.
async fn scale_tier(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<ScaleRequest>,
) -> Result<Response, ApiError> {
    strata_api::validate::scale_request(&request).map_err(Problem::validation)?;
    let command = match request.desired {
        Some(desired) => Command::ScaleTier {
            name,
            desired,
            expected_version: request.resource_version,
        },
        None => Command::ResumeAutoscaling {
            name,
            expected_version: request.resource_version,
        },
    };
    let result = controller.propose(command).await?;
    write_response(result)
}

/// `POST /v1/tiers/{name}/metrics`: one custom metric sample for the autoscaler (204). It
/// lives in the leader's memory only; see `autoscaler::push_metric`.
async fn push_metric(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
    JsonBody(sample): JsonBody<CustomMetricSample>,
) -> Result<StatusCode, ApiError> {
    if let Err(errors) = strata_api::validate::custom_metric(&sample) {
        let mut problem = Problem::validation(errors);
        // A value that is not a number at all is malformed input (400), like `1e999` or
        // `NaN` in the JSON text, which never gets this far.
        if problem.errors.iter().any(|error| error.path == "value") {
            problem.status = 400;
        }
        return Err(ApiError(problem));
    }
    crate::autoscaler::push_metric(&controller, &name, &sample)
        .await
        .map_err(ApiError)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Maps an applied command's result to the HTTP answer.
fn write_response(result: CommandResult) -> Result<Response, ApiError> {
    match result {
        CommandResult::Tier { tier, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(tier)).into_response())
        }
        CommandResult::Deleted { tier } => Ok((StatusCode::OK, Json(tier)).into_response()),
        CommandResult::Node { .. }
        | CommandResult::Changed { .. }
        | CommandResult::Batch { .. } => Ok(StatusCode::NO_CONTENT.into_response()),
        CommandResult::Rejected { rejection } => Err(rejection_error(rejection)),
        CommandResult::None => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the command produced no result",
        )),
    }
}

pub(super) fn rejection_error(rejection: Rejection) -> ApiError {
    match rejection {
        Rejection::NotFound { kind, name } => {
            ApiError::not_found(format!("{kind} {name:?} does not exist"))
        }
        Rejection::Conflict {
            name,
            expected,
            current,
        } => {
            let mut problem = Problem::new(
                409,
                "conflict",
                "Conflict",
                if current == 0 {
                    format!("{name:?} does not exist (expected resource_version {expected})")
                } else {
                    format!(
                        "{name:?} is at resource_version {current}, not {expected}; re-read it and retry"
                    )
                },
            );
            problem.current_resource_version = Some(current);
            ApiError(problem)
        }
        Rejection::Invalid { errors } => ApiError(Problem::validation(errors)),
        Rejection::Forbidden { detail } => {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
        }
        Rejection::Limit { path, detail } => {
            let mut problem = Problem::validation(vec![FieldError::new(path, detail)]);
            problem.problem_type = "urn:strata:problem:limit".to_string();
            problem.title = "Limit reached".to_string();
            ApiError(problem)
        }
    }
}

async fn cluster_status(
    State(controller): State<Arc<Controller>>,
) -> Json<strata_api::ClusterStatus> {
    Json(controller.cluster_status())
}

async fn add_member(
    State(controller): State<Arc<Controller>>,
    JsonBody(request): JsonBody<AddMemberRequest>,
) -> Result<Json<strata_api::ClusterStatus>, ApiError> {
    strata_api::validate::add_member(&request).map_err(Problem::validation)?;
    controller
        .change_membership(MemberChange::Add {
            id: request.id,
            address: request.address,
            voter: request.voter,
        })
        .await?;
    Ok(Json(controller.cluster_status()))
}

async fn remove_member(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<Json<strata_api::ClusterStatus>, ApiError> {
    let id: u64 = id.parse().map_err(|_| {
        ApiError(Problem::validation(vec![FieldError::new(
            "id",
            format!("{id:?} is not a node id"),
        )]))
    })?;
    controller
        .change_membership(MemberChange::Remove { id })
        .await?;
    Ok(Json(controller.cluster_status()))
}

async fn list_nodes(
    State(controller): State<Arc<Controller>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ItemList<Node>>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    let mut heartbeats = heartbeats_for_read(&controller, params.stale).await;
    controller.state.read(|machine| {
        let (records, next) = page(
            machine
                .state
                .nodes
                .iter()
                .map(|(id, record)| (id.clone(), record)),
            params.limit,
            params.after.as_deref(),
        )?;
        Ok(Json(ItemList {
            items: records
                .into_iter()
                .map(|record| node_view(&machine.state, record, heartbeats.remove(&record.id)))
                .collect(),
            resource_version: Some(list_version(&machine.state, machine.last_applied)),
            next,
        }))
    })
}

async fn get_node(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<Node>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    let mut heartbeats = heartbeats_for_read(&controller, params.stale).await;
    controller
        .state
        .read(|machine| {
            machine
                .state
                .nodes
                .get(&id)
                .map(|record| node_view(&machine.state, record, heartbeats.remove(&id)))
        })
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("node {id:?} does not exist")))
}

/// The answer to a write that changed a node (registration, cordon, drain): its view with the
/// heartbeat data this node holds, so a write's answer never waits on a peer call for it.
pub fn node_answer(controller: &Controller, node: &NodeRecord) -> Json<Node> {
    let heard = controller.liveness.observation(&node.id);
    Json(
        controller
            .state
            .read(|machine| node_view(&machine.state, node, heard)),
    )
}

/// Heartbeat data for a node read: the leader's (asked for when this node follows), or this
/// node's own memory alone for a `?stale=true` read, which must not wait on the leader.
async fn heartbeats_for_read(
    controller: &Controller,
    stale: bool,
) -> std::collections::HashMap<String, (u64, HostMetrics)> {
    if stale {
        controller.liveness.observations()
    } else {
        controller.heartbeats().await
    }
}

/// `POST /v1/nodes/{id}/cordon|uncordon|drain`.
async fn node_action(
    State(controller): State<Arc<Controller>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Node>, ApiError> {
    let flags = |cordoned, draining| Command::SetNodeFlags {
        node: id.clone(),
        cordoned,
        draining,
    };
    let command = match action.as_str() {
        "cordon" => flags(true, false),
        "uncordon" => flags(false, false),
        "drain" => flags(true, true),
        "revoke" => Command::RevokeNode { node: id.clone() },
        _ => {
            return Err(ApiError::not_found(format!(
                "no node action {action:?}; use cordon, uncordon, drain or revoke"
            )))
        }
    };
    let result = controller.propose(command).await?;
    match result {
        // The leader's planners heard of it when it applied there (`wake_after_apply`).
        CommandResult::Node { node } => Ok(node_answer(&controller, &node)),
        CommandResult::Rejected { rejection } => Err(rejection_error(rejection)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            format!("node action produced {other:?}"),
        )),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceParams {
    #[serde(default)]
    stale: bool,
    tier: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    after: Option<String>,
}

async fn tier_instances(
    State(controller): State<Arc<Controller>>,
    Path(name): Path<String>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ItemList<Instance>>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    controller.state.read(|machine| {
        if !machine.state.tiers.contains_key(&name) {
            return Err(ApiError::not_found(format!("tier {name:?} does not exist")));
        }
        let (items, next) = page(
            instances_of(&machine.state, Some(&name)).into_iter(),
            params.limit,
            params.after.as_deref(),
        )?;
        Ok(Json(ItemList {
            items,
            resource_version: Some(list_version(&machine.state, machine.last_applied)),
            next,
        }))
    })
}

async fn list_instances(
    State(controller): State<Arc<Controller>>,
    params: Result<Query<InstanceParams>, QueryRejection>,
) -> Result<Json<ItemList<Instance>>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    controller.state.read(|machine| {
        let (items, next) = page(
            instances_of(&machine.state, params.tier.as_deref()).into_iter(),
            params.limit,
            params.after.as_deref(),
        )?;
        Ok(Json(ItemList {
            items,
            resource_version: Some(list_version(&machine.state, machine.last_applied)),
            next,
        }))
    })
}

/// Instances (of `tier`, or all) by tier, creation time and id, each with a page key that
/// sorts the same way (tier names hold no space, which sorts before every character they
/// may hold).
fn instances_of(state: &Replicated, tier: Option<&str>) -> Vec<(String, Instance)> {
    let mut items: Vec<(String, Instance)> = state
        .instances
        .values()
        .filter(|instance| tier.is_none_or(|tier| instance.tier == tier))
        .map(|instance| {
            let key = format!(
                "{} {:020} {}",
                instance.tier, instance.created_at_ms, instance.id
            );
            (key, instance.clone())
        })
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    items
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventParams {
    #[serde(default)]
    stale: bool,
    object: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    after: Option<String>,
}

async fn list_events(
    State(controller): State<Arc<Controller>>,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<Json<ItemList<Event>>, ApiError> {
    let params = query(params)?;
    read_barrier(&controller, params.stale).await?;
    controller.state.read(|machine| {
        let (items, next) = page(
            machine
                .state
                .events
                .iter()
                .filter(|event| {
                    params
                        .object
                        .as_ref()
                        .is_none_or(|object| &event.object == object)
                })
                .map(|event| (format!("{:020}", event.id), event.clone())),
            params.limit,
            params.after.as_deref(),
        )?;
        Ok(Json(ItemList {
            items,
            resource_version: Some(list_version(&machine.state, machine.last_applied)),
            next,
        }))
    })
}

/// A list's `resource_version`: the state's revision when it was read (at least every item's
/// version), and never below the applied log index, which lists reported before revisions.
fn list_version(
    state: &crate::state::State,
    applied: Option<openraft::LogId<crate::raft_types::NodeId>>,
) -> u64 {
    state.revision.max(applied.map_or(0, |id| id.index))
}

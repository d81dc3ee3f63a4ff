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
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use strata_api::{
    AddMemberRequest, BalancerView, ClusterStatus, CustomMetricSample, Event, FieldError,
    HostMetrics, Instance, ItemList, Node, PoolView, Problem, ScaleRequest, Tier, TierSpec,
};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openapi::{ReadErrors, WriteErrors};
use super::ApiError;
use crate::node::{now_ms, Controller, MemberChange};
use crate::state::{Command, CommandResult, NodeRecord, Rejection, State as Replicated};
use crate::views::{node_view, tier_view, TierIndex};

/// The `/v1` routes; each handler's `#[utoipa::path]` is its entry in `/openapi.json`.
pub fn routes() -> OpenApiRouter<Arc<Controller>> {
    OpenApiRouter::new()
        .routes(routes!(list_tiers))
        .routes(routes!(get_tier, put_tier, delete_tier))
        .routes(routes!(scale_tier))
        .routes(routes!(push_metric))
        .routes(routes!(tier_instances))
        .routes(routes!(tier_pool))
        .routes(routes!(list_instances))
        .routes(routes!(list_nodes))
        .routes(routes!(get_node))
        .routes(routes!(node_action))
        .routes(routes!(list_events))
        .routes(routes!(cluster_status))
        .routes(routes!(add_member))
        .routes(routes!(remove_member))
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

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ReadParams {
    /// Answer from this node's state without confirming it is current (no leader round trip).
    #[serde(default)]
    #[param(required = false)]
    stale: bool,
}

/// `?stale=&limit=&continue=` of a list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Answer from this node's state without confirming it is current (no leader round trip).
    #[serde(default)]
    #[param(required = false)]
    stale: bool,
    /// Items per page, 1 to 1000 (default 500).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `continue` of the previous page.
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

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeleteParams {
    /// Delete only if the tier is at this version (409 otherwise).
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

#[utoipa::path(get, path = "/v1/tiers", tag = "tiers", params(ListParams),
    responses(
        (status = 200, description = "A page of tiers, by name", body = ItemList<Tier>),
        (status = 422, description = "`limit` out of range"),
        ReadErrors,
    ))]
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

#[utoipa::path(get, path = "/v1/tiers/{name}", tag = "tiers", params(("name" = String, Path, description = "The tier's name"), ReadParams),
    responses(
        (status = 200, description = "The tier", body = Tier),
        (status = 404, description = "No such tier"),
        ReadErrors,
    ))]
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
#[utoipa::path(get, path = "/v1/tiers/{name}/pool", tag = "tiers", params(("name" = String, Path, description = "The tier's name"), ReadParams),
    responses(
        (status = 200, description = "The pool and each load balancer's report", body = PoolView),
        (status = 404, description = "No such tier, or it has no load balancer"),
        ReadErrors,
    ))]
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
                "tier {name:?} has no load balancer (neither load_balancer.listen nor load_balancer.target_group_arn)"
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

#[utoipa::path(put, path = "/v1/tiers/{name}", tag = "tiers", params(("name" = String, Path, description = "The tier's name")),
    request_body(content = TierSpec, description = "The tier; its `name` must be the path's. With `resource_version`, a compare-and-set"),
    responses(
        (status = 200, description = "The tier, updated", body = Tier),
        (status = 201, description = "The tier, created", body = Tier),
        (status = 409, description = "`resource_version` is not the tier's (`current_resource_version` says what it is)"),
        (status = 422, description = "An invalid tier (`errors[]` has every field path), a listen address another tier uses, or the `--max-tiers` limit"),
        WriteErrors,
    ))]
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

#[utoipa::path(delete, path = "/v1/tiers/{name}", tag = "tiers", params(("name" = String, Path, description = "The tier's name"), DeleteParams),
    responses(
        (status = 200, description = "The deleted tier; its instances drain", body = Tier),
        (status = 404, description = "No such tier"),
        (status = 409, description = "`resource_version` is not the tier's"),
        WriteErrors,
    ))]
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
#[utoipa::path(post, path = "/v1/tiers/{name}/scale", tag = "tiers", params(("name" = String, Path, description = "The tier's name")),
    request_body(content = ScaleRequest),
    responses(
        (status = 200, description = "The tier with its new count", body = Tier),
        (status = 404, description = "No such tier"),
        (status = 409, description = "`resource_version` is not the tier's"),
        (status = 422, description = "Neither or both of `desired` and `auto`, or `desired` outside `min..=max`"),
        WriteErrors,
    ))]
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
#[utoipa::path(post, path = "/v1/tiers/{name}/metrics", tag = "tiers", params(("name" = String, Path, description = "The tier's name")),
    request_body(content = CustomMetricSample),
    responses(
        (status = 204, description = "The leader recorded the sample"),
        (status = 400, description = "Malformed JSON, or a `value` that is not a finite number"),
        (status = 404, description = "No such tier"),
        (status = 422, description = "No policy of the tier uses this metric, or `instance` is no live instance of the tier"),
        (status = 503, description = "No leader took the sample (retry), or no quorum"),
    ))]
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

#[utoipa::path(get, path = "/v1/cluster", tag = "cluster",
    responses(
        (status = 200, description = "The Raft group as the answering node sees it (served without a quorum)", body = ClusterStatus),
    ))]
async fn cluster_status(State(controller): State<Arc<Controller>>) -> Json<ClusterStatus> {
    Json(controller.cluster_status())
}

#[utoipa::path(post, path = "/v1/cluster/members", tag = "cluster",
    request_body(content = AddMemberRequest),
    responses(
        (status = 200, description = "The group with the new member", body = ClusterStatus),
        (status = 409, description = "The membership change was refused: the id is a member at another address, the address is another member's, another change is in progress, or it would break the group"),
        (status = 503, description = "No leader, no quorum, or the member was added but has not caught up (`member-not-caught-up`)"),
        (status = 504, description = "The cluster did not answer within the write timeout"),
        (status = 500, description = "An internal error of the node"),
    ))]
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

#[utoipa::path(delete, path = "/v1/cluster/members/{id}", tag = "cluster",
    params(("id" = u64, Path, description = "The controller's node id")),
    responses(
        (status = 200, description = "The group without the member", body = ClusterStatus),
        (status = 409, description = "The membership change was refused"),
        (status = 422, description = "`id` is not a node id"),
        (status = 503, description = "No leader or no quorum"),
        (status = 504, description = "The cluster did not answer within the write timeout"),
        (status = 500, description = "An internal error of the node"),
    ))]
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

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes", params(ListParams),
    responses(
        (status = 200, description = "A page of nodes, by id", body = ItemList<Node>),
        (status = 422, description = "`limit` out of range"),
        ReadErrors,
    ))]
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

#[utoipa::path(get, path = "/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "The node's id"), ReadParams),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 404, description = "No such node"),
        ReadErrors,
    ))]
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
#[utoipa::path(post, path = "/v1/nodes/{id}/{action}", tag = "nodes",
    params(
        ("id" = String, Path, description = "The node's id"),
        ("action" = inline(NodeAction), Path, description = "`cordon`: no new instances; `uncordon`; `drain`: cordon and move its instances; `revoke`: forget its credential"),
    ),
    responses(
        (status = 200, description = "The node after the change", body = Node),
        (status = 404, description = "No such node, or no such action"),
        WriteErrors,
    ))]
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

/// The actions of `POST /v1/nodes/{id}/{action}`, for the document (the handler matches the
/// path segment, so that an unknown action is a 404 like any unknown path).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // only its schema is used
enum NodeAction {
    Cordon,
    Uncordon,
    Drain,
    Revoke,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct InstanceParams {
    /// Answer from this node's state without confirming it is current (no leader round trip).
    #[serde(default)]
    #[param(required = false)]
    stale: bool,
    /// Only this tier's instances.
    tier: Option<String>,
    /// Items per page, 1 to 1000 (default 500).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    after: Option<String>,
}

#[utoipa::path(get, path = "/v1/tiers/{name}/instances", tag = "instances", params(("name" = String, Path, description = "The tier's name"), ListParams),
    responses(
        (status = 200, description = "A page of the tier's instances, by creation time", body = ItemList<Instance>),
        (status = 404, description = "No such tier"),
        (status = 422, description = "`limit` out of range"),
        ReadErrors,
    ))]
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

#[utoipa::path(get, path = "/v1/instances", tag = "instances", params(InstanceParams),
    responses(
        (status = 200, description = "A page of instances, by tier and creation time", body = ItemList<Instance>),
        (status = 422, description = "`limit` out of range"),
        ReadErrors,
    ))]
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

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventParams {
    /// Answer from this node's state without confirming it is current (no leader round trip).
    #[serde(default)]
    #[param(required = false)]
    stale: bool,
    /// Only events about this object: `tier/web`, `node/host-1`, `instance/<uuid>`.
    object: Option<String>,
    /// Items per page, 1 to 1000 (default 500).
    #[param(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    after: Option<String>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventParams),
    responses(
        (status = 200, description = "A page of the latest 2,000 events, oldest first", body = ItemList<Event>),
        (status = 422, description = "`limit` out of range"),
        ReadErrors,
    ))]
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

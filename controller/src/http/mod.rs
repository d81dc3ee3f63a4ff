//! The HTTP surface of a controller node (the only module that knows axum): the public API
//! under `/v1`, peer traffic under `/raft`, `/healthz`, `/readyz`, `/metrics` and
//! `/openapi.json`.
//!
//! Invariants:
//! - Every route but the peer routes is registered through `documented_routes`, from which
//!   both the router and the OpenAPI document are built (`openapi`): nothing is served that
//!   the document does not describe, and the reverse.
//! - Every error body is `application/problem+json`; `problem_bodies` rewrites any error
//!   response produced outside our handlers (unknown route, wrong method) into one.
//! - `/v1` needs a bearer token: the admin token may do anything, the viewer token may only use
//!   safe methods. `/raft` needs the cluster secret. Health endpoints are open.
//! - Request bodies are limited to 1 MiB on `/v1` (413 beyond); peer bodies may be larger
//!   because they carry log batches and snapshot chunks.

mod agents;
mod api;
pub mod openapi;
mod peer;
pub mod serve;

use std::sync::{Arc, LazyLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use strata_api::{Problem, PROBLEM_CONTENT_TYPE};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::metrics;
use crate::node::{ClusterError, Controller};

/// Largest request body the public API accepts.
pub const MAX_API_BODY: usize = 1024 * 1024;
/// Largest peer message (log batches, snapshot chunks).
pub const MAX_PEER_BODY: usize = 256 * 1024 * 1024;

/// Every route of the node but the peer routes, each with its OpenAPI description: the one
/// list that `router` serves and `document` describes. `/v1` first, then the open routes.
fn documented_routes() -> (
    OpenApiRouter<Arc<Controller>>,
    OpenApiRouter<Arc<Controller>>,
) {
    let public = api::routes().merge(agents::routes());
    let open = OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics_text))
        .routes(routes!(openapi_json));
    (public, open)
}

/// The OpenAPI 3.1 document of the node's API (`GET /openapi.json`).
pub fn document() -> serde_json::Value {
    let (public, open) = documented_routes();
    let paths = OpenApiRouter::with_openapi(openapi::base())
        .merge(public)
        .merge(open)
        .into_openapi();
    openapi::finish(paths)
}

/// The document as served, encoded once.
static DOCUMENT: LazyLock<Vec<u8>> =
    LazyLock::new(|| serde_json::to_vec(&document()).unwrap_or_default());

/// Builds the node's router.
pub fn router(controller: Arc<Controller>) -> Router {
    let (public, open) = documented_routes();
    let public: Router<Arc<Controller>> = public
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
        .route_layer(middleware::from_fn_with_state(
            controller.clone(),
            require_quorum,
        ))
        .route_layer(middleware::from_fn_with_state(
            controller.clone(),
            require_api_token,
        ))
        .into();
    let peers = peer::routes()
        .layer(axum::extract::DefaultBodyLimit::max(MAX_PEER_BODY))
        .route_layer(middleware::from_fn_with_state(
            controller.clone(),
            require_cluster_secret,
        ));
    Router::new()
        .merge(public)
        .merge(peers)
        .merge(Router::from(open))
        .fallback(not_found)
        .layer(middleware::from_fn(problem_bodies))
        .with_state(controller)
}

/// An error answered as `application/problem+json`.
#[derive(Debug)]
pub struct ApiError(pub Problem);

impl ApiError {
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Self {
        ApiError(Problem::new(status.as_u16(), kind, title, detail))
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }
}

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        ApiError(problem)
    }
}

impl From<ClusterError> for ApiError {
    fn from(error: ClusterError) -> Self {
        let (status, kind, title) = match &error {
            ClusterError::NoLeader(_) | ClusterError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Cluster unavailable",
            ),
            ClusterError::OutcomeUnknown(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome-unknown",
                "Write outcome unknown",
            ),
            ClusterError::NoQuorum(..) => {
                (StatusCode::SERVICE_UNAVAILABLE, "no-quorum", "No quorum")
            }
            ClusterError::NotMember(..) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not-a-member",
                "Not a member of the cluster",
            ),
            ClusterError::Timeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "Cluster did not answer in time",
            ),
            ClusterError::NotCaughtUp(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "member-not-caught-up",
                "Member added, not caught up",
            ),
            ClusterError::Membership(_) => (
                StatusCode::CONFLICT,
                "membership",
                "Membership change refused",
            ),
            ClusterError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        };
        let mut problem = Problem::new(status.as_u16(), kind, title, error.to_string());
        if let ClusterError::NoQuorum(_, members) | ClusterError::NotMember(_, members) = error {
            problem.members = members;
        }
        ApiError(problem)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.0)
    }
}

fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"strata\""),
        );
    }
    response
}

/// Rewrites error responses that are not problem documents (axum's own 404/405/413 and the
/// like) into problem documents, so clients meet one error shape.
async fn problem_bodies(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| {
            value
                .as_bytes()
                .starts_with(PROBLEM_CONTENT_TYPE.as_bytes())
        });
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (kind, title) = match status {
        StatusCode::NOT_FOUND => ("not-found", "Not found"),
        StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "Method not allowed"),
        StatusCode::PAYLOAD_TOO_LARGE => ("too-large", "Request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported-media-type", "Unsupported media type"),
        _ if status.is_server_error() => ("internal", "Internal error"),
        _ => ("bad-request", "Bad request"),
    };
    let detail = format!(
        "{method} {path}: {}",
        status.canonical_reason().unwrap_or("error")
    );
    let mut rewritten = problem_response(&Problem::new(status.as_u16(), kind, title, detail));
    if let Some(allow) = response.headers().get(header::ALLOW) {
        rewritten.headers_mut().insert(header::ALLOW, allow.clone());
    }
    rewritten
}

async fn not_found(request: Request<Body>) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// The token of an `Authorization: Bearer <token>` header. The scheme is matched without
/// regard to case (RFC 7235, section 2.1: "case-insensitive token").
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The SHA-256 digest of a node credential, in lowercase hex: what the replicated node
/// record keeps. Credentials are 256 random bits, so a fast digest suffices (no password
/// stretching is needed against guessing).
pub fn credential_digest(credential: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(credential.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Compares secrets without stopping at the first differing byte, so response times do not
/// reveal how much of a guess was right.
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Who a bearer token speaks for. Agent handlers receive it as a request extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Viewer,
    /// The join token: may only register.
    Join,
    /// An EC2 instance's bootstrap token (`JoinToken::bootstrap_token`): may only register
    /// the node named after that instance, once.
    Boot {
        instance: uuid::Uuid,
    },
    /// A node's own credential: may register and heartbeat for that node only.
    Node {
        id: String,
        credential_hash: String,
    },
}

fn caller_of(controller: &Controller, token: &str) -> Option<Caller> {
    let tokens = &controller.tokens;
    if same_secret(token, &tokens.admin) {
        return Some(Caller::Admin);
    }
    if tokens
        .viewer
        .as_deref()
        .is_some_and(|viewer| same_secret(token, viewer))
    {
        return Some(Caller::Viewer);
    }
    if same_secret(token, &tokens.join.get()) {
        return Some(Caller::Join);
    }
    if let Some(instance) = tokens.join.bootstrap_instance(token) {
        return Some(Caller::Boot { instance });
    }
    // A digest looked up in a map: the map's comparisons see only the digest, which says
    // nothing about how close a guess of the credential was.
    let credential_hash = credential_digest(token);
    let id = controller.state.read(|machine| {
        machine
            .state
            .node_of_credential(&credential_hash)
            .map(str::to_string)
    })?;
    Some(Caller::Node {
        id,
        credential_hash,
    })
}

/// `/v1/agents/*` is for agents (the join token registers; a node credential registers and
/// heartbeats for its node); everything else under `/v1` is for admins, and for viewers on
/// safe methods. Neither admin nor viewer tokens are a node identity.
async fn require_api_token(
    State(controller): State<Arc<Controller>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = bearer(&request) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "send Authorization: Bearer <token>",
        )
        .into_response();
    };
    let Some(caller) = caller_of(&controller, token) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "the bearer token is not valid",
        )
        .into_response();
    };
    let agent_route = request.uri().path().starts_with("/v1/agents/");
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let refusal = match (&caller, agent_route) {
        (Caller::Admin, false) | (Caller::Join | Caller::Boot { .. } | Caller::Node { .. }, true) => {
            None
        }
        (Caller::Viewer, false) if safe => None,
        (Caller::Viewer, false) => {
            Some("the viewer token may only read; writes need the admin token")
        }
        (Caller::Admin | Caller::Viewer, true) => Some(
            "agent endpoints need the join token (to register) or a node's credential; the admin and viewer tokens are no node's identity",
        ),
        (Caller::Join, false) => Some("the join token may only register a node"),
        (Caller::Boot { .. }, false) => {
            Some("a bootstrap token may only register the node of its instance")
        }
        (Caller::Node { .. }, false) => Some("a node credential may only be used by its agent"),
    };
    match refusal {
        Some(detail) => {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail).into_response()
        }
        None => {
            let mut request = request;
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
    }
}

/// A node cut off from a quorum of voters answers at once with 503 `no-quorum` and the
/// members it knows, instead of holding the request until the write timeout; clients move
/// to the next server. `GET /v1/cluster` (which says so) and `?stale=true` reads, which
/// promise nothing about freshness, are still served.
async fn require_quorum(
    State(controller): State<Arc<Controller>>,
    request: Request,
    next: Next,
) -> Response {
    let exempt = request.uri().path() == "/v1/cluster" && request.method() == Method::GET
        || is_stale_read(&request);
    if exempt {
        return next.run(request).await;
    }
    match controller.refuse_without_quorum() {
        Ok(()) => next.run(request).await,
        Err(error) => ApiError::from(error).into_response(),
    }
}

fn is_stale_read(request: &Request) -> bool {
    request.method() == Method::GET
        && request
            .uri()
            .query()
            .is_some_and(|query| query.split('&').any(|pair| pair == "stale=true"))
}

async fn require_cluster_secret(
    State(controller): State<Arc<Controller>>,
    request: Request,
    next: Next,
) -> Response {
    match bearer(&request) {
        Some(secret) if same_secret(secret, &controller.tokens.cluster_secret) => {
            // A peer's connection is never closed to make room for another.
            if let Some(connection) = request.extensions().get::<Arc<serve::Connection>>() {
                connection.mark_peer();
            }
            next.run(request).await
        }
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "peer requests need the cluster secret",
        )
        .into_response(),
    }
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when this node knows a leader and has applied what it has seen committed.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "`ready`: this node knows a leader", body = String, content_type = "text/plain"),
        (status = 503, description = "This node knows no leader yet"),
    ))]
async fn readyz(State(controller): State<Arc<Controller>>) -> Result<&'static str, ApiError> {
    match controller.leader() {
        Some(_) => Ok("ready\n"),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Not ready",
            "this node knows no leader yet",
        )),
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain")))]
async fn metrics_text(State(controller): State<Arc<Controller>>) -> Response {
    let body = metrics::render(&controller);
    let mut response = body.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object, content_type = "application/json")))]
async fn openapi_json() -> Response {
    let mut response = DOCUMENT.clone().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

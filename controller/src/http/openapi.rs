//! The OpenAPI 3.1 document served at `GET /openapi.json`.
//!
//! How it stays true: the router and the document are built from the same values. Every
//! route outside `/raft` is registered with utoipa-axum's `routes!` on an `OpenApiRouter`
//! (utoipa-axum 0.2, the line for utoipa 5 and axum 0.8: "only handlers collected with
//! `routes!` macro will get registered to the OpenApi", docs.rs/utoipa-axum/0.2.0), whose
//! path, method and parameters come from the handler's `#[utoipa::path]` and whose bodies
//! come from the `ToSchema` derives on the `strata-api` types that serde reads and writes.
//! `super::router` and `super::document` both start from `super::documented_routes`, so a
//! route cannot be served without being described or described without being served; the
//! tests below check both directions against a running node.
//!
//! What a handler's annotation leaves out is added here by rules that mirror the code that
//! answers it, in one place each, rather than repeated on every handler:
//! - every error response is a problem document (`problem_bodies` makes it so);
//! - security: `require_api_token` decides who may call what under `/v1`;
//! - the answers of the layers every request crosses (`require_api_token`,
//!   `require_quorum`, `serve::handle`), and those of the extractors an operation uses
//!   (`Path`, `Query`, `JsonBody`).

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::{Tag, TagBuilder};
use utoipa::openapi::{ComponentsBuilder, Content, InfoBuilder, OpenApi, OpenApiBuilder, Ref};

/// The document's shell: title, version, the security schemes; the paths come from the
/// router.
pub fn base() -> OpenApi {
    let bearer = |description: &str| {
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(description.to_string()))
                .build(),
        )
    };
    // Error bodies are added to the responses by `finish`, so the schemas they refer to are
    // named here (with those they refer to, which `ToSchema::schemas` lists).
    let mut problem_schemas = Vec::new();
    <strata_api::Problem as utoipa::ToSchema>::schemas(&mut problem_schemas);
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Strata")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(DESCRIPTION))
                .build(),
        )
        .components(Some(
            ComponentsBuilder::new()
                .schema_from::<strata_api::Problem>()
                .schemas_from_iter(problem_schemas)
                .security_scheme(
                    ADMIN,
                    bearer("The admin token (`--admin-token-file`): every `/v1` operation except the agents'."),
                )
                .security_scheme(
                    VIEWER,
                    bearer("The viewer token (`--viewer-token-file`): `GET` operations under `/v1` except the agents'."),
                )
                .security_scheme(
                    JOIN,
                    bearer("The join token (`--join-token-file`), or an EC2 instance's bootstrap token (`strata-boot.<uuid>.<mac>`, its own node only, once): `POST /v1/agents/register` only; the answer carries the node's own credential."),
                )
                .security_scheme(
                    NODE,
                    bearer("A node's credential, returned once by its registration: registration and heartbeats of that node only."),
                )
                .build(),
        ))
        .tags(Some(tags()))
        .build()
}

const ADMIN: &str = "admin";
const VIEWER: &str = "viewer";
const JOIN: &str = "join";
const NODE: &str = "node";

const DESCRIPTION: &str = "\
The REST API of a Strata control plane. Every controller node serves all of it: writes that \
reach a follower are forwarded to the leader, reads are linearizable unless `?stale=true`.\n\n\
Every error is an RFC 7807 problem document (`application/problem+json`) with `type`, \
`title`, `status`, `detail` and, for validation errors, `errors: [{path, message}]`. Unknown \
fields and query parameters are refused; request bodies are limited to 1 MiB.\n\n\
Peer traffic under `/raft/` (Raft RPCs and writes forwarded between controllers, \
authenticated with the cluster secret) is not part of this document: its bodies are \
openraft's types, versioned with the controller binary rather than offered to clients, and \
only other controllers of the same cluster may call it.";

fn tags() -> Vec<Tag> {
    [
        (
            "tiers",
            "Tiers: declared groups of identical VMs behind a load balancer",
        ),
        ("instances", "Instances of tiers"),
        ("nodes", "Agent hosts"),
        ("events", "What the control plane decided, and why"),
        ("cluster", "The controllers' Raft group"),
        ("agents", "Agent upcalls: registration and heartbeats"),
        ("operations", "Health, readiness, metrics and this document"),
    ]
    .into_iter()
    .map(|(name, description)| {
        TagBuilder::new()
            .name(name)
            .description(Some(description))
            .build()
    })
    .collect()
}

/// Completes the document the router collected (see the module doc) and encodes it.
pub fn finish(document: OpenApi) -> serde_json::Value {
    let mut document = complete_operations(document);
    document.components.get_or_insert_with(Default::default);
    let mut value = serde_json::to_value(&document).unwrap_or_default();
    merge_flattened(&mut value);
    name_unsigned_formats(&mut value);
    value
}

/// Unsigned integers are documented as `uint8` to `uint64` (utoipa's `non_strict_integers`):
/// what the server takes is `0..=u64::MAX`, which `int64` would misstate (and a fuzzer would
/// take a valid `2^63` for invalid input). utoipa 5.5 derives the names of its `KnownFormat`
/// with `rename_all = "kebab-case"`, which writes `UInt64` as `u-int64`
/// (utoipa-5.5.0/src/openapi/schema.rs, `enum KnownFormat`); this writes the names as the
/// OpenAPI format registry spells them.
fn name_unsigned_formats(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(object) => {
            if let Some(Value::String(format)) = object.get_mut("format") {
                if let Some(bits) = format.strip_prefix("u-int") {
                    *format = format!("uint{bits}");
                }
            }
            object.values_mut().for_each(name_unsigned_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(name_unsigned_formats),
        _ => {}
    }
}

fn complete_operations(mut document: OpenApi) -> OpenApi {
    for (path, item) in document.paths.paths.iter_mut() {
        let operations = [
            ("GET", item.get.as_mut()),
            ("PUT", item.put.as_mut()),
            ("POST", item.post.as_mut()),
            ("DELETE", item.delete.as_mut()),
            ("PATCH", item.patch.as_mut()),
            ("HEAD", item.head.as_mut()),
            ("OPTIONS", item.options.as_mut()),
            ("TRACE", item.trace.as_mut()),
        ];
        for (method, operation) in operations {
            if let Some(operation) = operation {
                complete(path, method, operation);
            }
        }
    }
    document
}

fn complete(path: &str, method: &str, operation: &mut Operation) {
    let api = path.starts_with("/v1/");
    let agent = path.starts_with("/v1/agents/");
    if api {
        // `require_api_token`.
        let schemes: &[&str] = match (agent, path) {
            (true, "/v1/agents/register") => &[JOIN, NODE],
            (true, _) => &[NODE],
            (false, _) if method == "GET" => &[ADMIN, VIEWER],
            (false, _) => &[ADMIN],
        };
        operation.security = Some(
            schemes
                .iter()
                .map(|scheme| SecurityRequirement::new::<_, [&str; 0], &str>(*scheme, []))
                .collect(),
        );
        add(
            operation,
            "401",
            "No bearer token, or one that is no token of this cluster",
        );
        add(
            operation,
            "403",
            if agent {
                "The token may not call agent operations (the admin and viewer tokens are no node's identity), or a node credential speaks for another node"
            } else {
                "The token may not do this (the viewer token only reads; join tokens and node credentials only serve agents)"
            },
        );
    } else {
        operation.security = Some(vec![SecurityRequirement::default()]);
    }
    // `require_quorum` (every `/v1` operation but `GET /v1/cluster` and stale reads) and
    // `serve::handle`'s connection limit (everything but `/raft`, `/healthz`, `/readyz`).
    let exempt_from_limit = path == "/healthz" || path == "/readyz";
    if api || !exempt_from_limit {
        add(
            operation,
            "503",
            if api && !(path == "/v1/cluster" && method == "GET") {
                "This node is cut off from a quorum of voters (`no-quorum`, with the members it knows), no leader took the request, or the node is at its connection limit (`overloaded`)"
            } else {
                "The node is at its connection limit (`overloaded`); retry shortly"
            },
        );
    }
    let parameters = operation.parameters.as_deref().unwrap_or_default();
    let has = |place: ParameterIn| {
        parameters
            .iter()
            .any(|parameter| parameter.parameter_in == place)
    };
    if has(ParameterIn::Path) || has(ParameterIn::Query) {
        add(
            operation,
            "400",
            "A path segment or query string that does not decode (unknown or malformed query parameters are refused)",
        );
    }
    if operation.request_body.is_some() {
        // `api::JsonBody`.
        add(
            operation,
            "400",
            "Malformed JSON, or a request body that could not be read",
        );
        add(
            operation,
            "408",
            "The request body did not arrive within `--body-timeout`",
        );
        add(operation, "413", "The request body is larger than 1 MiB");
        add(operation, "415", "The body is not `application/json`");
        add(
            operation,
            "422",
            "Well-formed JSON that does not fit the resource, or a value that fails validation: `errors[]` gives each field's path",
        );
        mark_json_only(operation.request_body.as_mut());
    }
    // `serve`: refused before routing, whatever the route (hyper's own answers are rewritten
    // into problem documents there).
    add(
        operation,
        "400",
        "A request that does not parse as HTTP/1.1",
    );
    add(
        operation,
        "414",
        "The request target is longer than the node accepts (8 KiB)",
    );
    add(
        operation,
        "431",
        "Request headers larger than the node accepts, or too many of them",
    );
    add(operation, "501", "A transfer coding other than `chunked`");
    for (status, response) in operation.responses.responses.iter_mut() {
        let is_error = status.starts_with('4') || status.starts_with('5');
        if let utoipa::openapi::RefOr::T(response) = response {
            if is_error && response.content.is_empty() {
                response.content.insert(
                    strata_api::PROBLEM_CONTENT_TYPE.to_string(),
                    Content::new(Some(Ref::from_schema_name("Problem"))),
                );
            }
        }
    }
}

/// `#[serde(flatten)]` reaches the document as `allOf: [{$ref: Inner}, {outer fields}]`.
/// That says the wrong thing when the inner type refuses unknown fields (`TierSpec`, `Pool`):
/// its `additionalProperties: false` would refuse the outer fields too, so no `Tier` could
/// ever conform. serde merges the fields into one object, and so does this: every such
/// `allOf` becomes one object with the properties and required fields of all its parts, open
/// to additional properties like the outer type (a struct with a flattened field cannot deny
/// unknown fields in serde).
fn merge_flattened(document: &mut serde_json::Value) {
    use serde_json::Value;
    let components = document
        .pointer("/components/schemas")
        .cloned()
        .unwrap_or(Value::Null);
    fn resolve<'a>(components: &'a Value, schema: &'a Value) -> &'a Value {
        match schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|reference| reference.strip_prefix("#/components/schemas/"))
        {
            Some(name) => components.get(name).unwrap_or(schema),
            None => schema,
        }
    }
    fn merge(components: &Value, parts: &[Value], into: &mut serde_json::Map<String, Value>) {
        for part in parts {
            let part = resolve(components, part);
            if let Some(nested) = part.get("allOf").and_then(Value::as_array) {
                merge(components, nested, into);
                continue;
            }
            if let Some(Value::Object(properties)) = part.get("properties") {
                let merged = into
                    .entry("properties")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Value::Object(merged) = merged {
                    merged.extend(properties.clone());
                }
            }
            if let Some(Value::Array(required)) = part.get("required") {
                let merged = into
                    .entry("required")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(merged) = merged {
                    merged.extend(required.iter().cloned());
                }
            }
        }
    }
    fn walk(components: &Value, value: &mut Value) {
        match value {
            Value::Object(object) => {
                if let Some(Value::Array(parts)) = object.remove("allOf") {
                    let mut merged = serde_json::Map::new();
                    merged.insert("type".to_string(), Value::String("object".to_string()));
                    merge(components, &parts, &mut merged);
                    object.extend(merged);
                }
                for child in object.values_mut() {
                    walk(components, child);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| walk(components, item)),
            _ => {}
        }
    }
    walk(&components, document);
}

/// Adds a response unless the handler's annotation already describes that status (its
/// description is the more precise one).
fn add(operation: &mut Operation, status: &str, description: &str) {
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| response(description).into());
}

fn response(description: &str) -> Response {
    ResponseBuilder::new().description(description).build()
}

/// `JsonBody` takes only `application/json`: say so, and that the body is required.
fn mark_json_only(body: Option<&mut RequestBody>) {
    if let Some(body) = body {
        body.required = Some(utoipa::openapi::Required::True);
        body.content.retain(|media, _| media == "application/json");
    }
}

/// Responses of an operation that reads through `read_barrier` (a linearizable read, unless
/// `?stale=true`): the `ClusterError`s of `Controller::linearizable`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its derived `IntoResponses` is used
pub enum ReadErrors {
    /// The leader could not confirm its leadership (`unavailable`, `no-quorum`), or this
    /// node was removed from the cluster (`not-a-member`, with the members)
    #[response(status = 503)]
    Unavailable,
    /// The cluster did not answer within the write timeout
    #[response(status = 504)]
    Timeout,
    /// An internal error of the node
    #[response(status = 500)]
    Internal,
}

/// Responses of an operation that writes through `Controller::propose` (on the leader, or
/// forwarded to it): its `ClusterError`s.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only its derived `IntoResponses` is used
pub enum WriteErrors {
    /// No leader took the write (`unavailable`, `no-quorum`), or it may or may not have
    /// applied (`outcome-unknown`): read before retrying a write that is not idempotent
    #[response(status = 503)]
    Unavailable,
    /// The cluster did not answer within the write timeout
    #[response(status = 504)]
    Timeout,
    /// An internal error of the node
    #[response(status = 500)]
    Internal,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{header, Method, Request, StatusCode};
    use serde_json::Value;
    use tower::ServiceExt;

    use crate::node::{Controller, JoinToken, Tokens};

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];

    /// Every (method, path) the document describes.
    fn operations(document: &Value) -> Vec<(String, String)> {
        let mut found = Vec::new();
        if let Some(Value::Object(paths)) = document.get("paths") {
            for (path, item) in paths {
                for method in METHODS {
                    if item.get(method).is_some() {
                        found.push((method.to_uppercase(), path.clone()));
                    }
                }
            }
        }
        found
    }

    /// The document's shape: what a client (and schemathesis) relies on.
    #[test]
    fn every_operation_has_security_and_problem_errors_and_every_ref_resolves() {
        let document = super::super::document();
        assert_eq!(document["openapi"], "3.1.0");
        let operations = operations(&document);
        assert!(operations.len() >= 20, "{operations:?}");
        assert!(
            operations
                .iter()
                .all(|(_, path)| !path.starts_with("/raft")),
            "peer routes are internal"
        );
        for (method, path) in &operations {
            let operation = &document["paths"][path][method.to_lowercase()];
            let security = operation["security"].as_array();
            assert!(security.is_some(), "{method} {path}: no security");
            let open = matches!(
                path.as_str(),
                "/healthz" | "/readyz" | "/metrics" | "/openapi.json"
            );
            assert_eq!(
                security.is_some_and(|all| all.iter().all(|one| one == &serde_json::json!({}))),
                open,
                "{method} {path}: security {security:?}"
            );
            let Some(Value::Object(responses)) = operation.get("responses") else {
                panic!("{method} {path}: no responses");
            };
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"][strata_api::PROBLEM_CONTENT_TYPE]["schema"]["$ref"],
                        "#/components/schemas/Problem",
                        "{method} {path} {status}"
                    );
                }
            }
            if !open {
                for status in ["401", "403", "503"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path}: no {status}"
                    );
                }
            }
        }
        // Every reference names a schema the document holds.
        fn refs(value: &Value, into: &mut Vec<String>) {
            match value {
                Value::Object(object) => {
                    if let Some(Value::String(reference)) = object.get("$ref") {
                        into.push(reference.clone());
                    }
                    object.values().for_each(|child| refs(child, into));
                }
                Value::Array(items) => items.iter().for_each(|item| refs(item, into)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&document, &mut all);
        for reference in all {
            let name = reference.trim_start_matches("#/components/schemas/");
            assert!(
                document["components"]["schemas"].get(name).is_some(),
                "dangling {reference}"
            );
        }
        // `limit`'s bounds are written in the parameters' attributes: they must be the
        // bounds `page` enforces.
        let limit = document["paths"]["/v1/tiers"]["get"]["parameters"]
            .as_array()
            .and_then(|all| all.iter().find(|parameter| parameter["name"] == "limit"));
        assert_eq!(
            limit.map(|limit| &limit["schema"]["minimum"]),
            Some(&1.into())
        );
        assert_eq!(
            limit.map(|limit| &limit["schema"]["maximum"]),
            Some(&strata_api::list::MAX_PAGE.into())
        );
        // Unsigned integers carry the registry's format names (see `name_unsigned_formats`).
        let instance = &document["components"]["schemas"]["Instance"]["properties"];
        assert_eq!(instance["resource_version"]["format"], "uint64");
        assert_eq!(instance["port"]["format"], "uint16");
        assert!(!document.to_string().contains("\"u-int"));
        // A flattened spec does not refuse the fields beside it (see `merge_flattened`).
        let tier = &document["components"]["schemas"]["Tier"];
        assert!(tier.get("allOf").is_none(), "{tier}");
        assert!(tier["properties"].get("generation").is_some());
        assert!(tier["properties"].get("template").is_some());
        assert!(tier.get("additionalProperties").is_none());
    }

    /// Routes are added only through `routes!` (which documents them): a plain `.route(`
    /// outside the peer routes would serve something the document does not describe.
    #[test]
    fn no_route_is_added_around_the_document() {
        for (file, text) in [
            ("api.rs", include_str!("api.rs")),
            ("agents.rs", include_str!("agents.rs")),
            ("mod.rs", include_str!("mod.rs")),
        ] {
            assert!(
                !text.contains(concat!(".route", "(")),
                "{file} adds a route without documenting it: use routes! on an OpenApiRouter"
            );
        }
    }

    async fn single_node() -> (Arc<Controller>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("temp dir: {error}"));
        let data_dir = dir.path().to_string_lossy().to_string();
        let config = <crate::Config as clap::Parser>::try_parse_from([
            "strata-controller",
            "--node-id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--insecure-http",
        ])
        .unwrap_or_else(|error| panic!("config: {error}"));
        let tokens = Tokens {
            admin: "admin-token".to_string(),
            viewer: None,
            cluster_secret: "cluster-secret".to_string(),
            join: JoinToken::new("join-token".to_string()),
        };
        let controller = Controller::start(&config, tokens, strata_api::tls::Transport::Plain)
            .await
            .unwrap_or_else(|error| panic!("start: {error:#}"));
        for _ in 0..200 {
            if controller.leader().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert!(controller.leader().is_some(), "no leader");
        (controller, dir)
    }

    async fn call(
        router: &axum::Router,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        let mut request = Request::builder().method(method.clone()).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = if matches!(method, Method::POST | Method::PUT) {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from("{}")
        } else {
            Body::empty()
        };
        let request = request
            .body(body)
            .unwrap_or_else(|error| panic!("request: {error}"));
        let response = router
            .clone()
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {});
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
            .await
            .unwrap_or_default();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The router serves exactly what the document describes: every documented operation
    /// reaches a handler (no fallback 404, no 405), every other method on a documented path
    /// is a 405, and `/openapi.json` is this document, served without a token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_router_serves_what_the_document_describes() {
        let (controller, _dir) = single_node().await;
        let router = super::super::router(controller);
        let document = super::super::document();
        let operations = operations(&document);
        let fill = |path: &str| {
            path.replace("{name}", "web")
                .replace("{id}", "1")
                .replace("{action}", "cordon")
        };
        for (method, path) in &operations {
            let (status, body) = call(&router, method, &fill(path), Some("admin-token")).await;
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            let detail = body["detail"].as_str().unwrap_or("");
            assert!(
                !detail.starts_with("no route for"),
                "{method} {path}: {status} {body}"
            );
            let documented = &document["paths"][path][method.to_lowercase()]["responses"];
            assert!(
                documented.get(status.as_str()).is_some(),
                "{method} {path} answered {status}, which the document does not list: {body}"
            );
        }
        for path in document["paths"]
            .as_object()
            .map(|paths| paths.keys())
            .into_iter()
            .flatten()
        {
            for method in METHODS {
                // axum answers HEAD for every GET route (RFC 9110: HEAD is GET without
                // the body), so HEAD is no separate operation.
                if method == "head" || document["paths"][path].get(method).is_some() {
                    continue;
                }
                // Tokens are checked before methods: agent paths need an agent's token.
                let token = if path.starts_with("/v1/agents/") {
                    "join-token"
                } else {
                    "admin-token"
                };
                let (status, _) =
                    call(&router, &method.to_uppercase(), &fill(path), Some(token)).await;
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but not documented"
                );
            }
        }
        let (status, served) = call(&router, "GET", "/openapi.json", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(served, document);
        let (status, body) = call(&router, "GET", "/v1/undocumented", Some("admin-token")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
}

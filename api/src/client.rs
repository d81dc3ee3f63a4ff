//! The HTTP client for the controllers' REST API, shared by `stratactl` and the tests.
//!
//! Any controller accepts any request (followers forward writes to the leader), so the client
//! needs no idea of who leads. It keeps talking to the last controller that answered; when a
//! controller cannot be reached, times out, or answers 502/503/504 (no leader yet, leader
//! unreachable), it tries the next one, backing off with jitter after each full round, until the
//! failover deadline. Any other answer, error or not, is returned at once: trying elsewhere
//! would only repeat it.
//!
//! A request that timed out may still have been applied; retrying it elsewhere is safe for the
//! API's writes because they are idempotent (PUT, scale to N, add member N) or report the
//! outcome distinctly (a retried DELETE answers 404).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cluster::{AddMemberRequest, ClusterStatus};
use crate::list::ItemList;
use crate::node::{Event, Instance, Node};
use crate::pool::PoolView;
use crate::problem::Problem;
use crate::tier::{ScaleRequest, Tier, TierSpec};
use crate::tls::Transport;

/// The controller `stratactl` talks to when no `--server` is given.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7001";

/// How to reach the controllers.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port`, `http://host:port` or `https://host:port` of each controller, in the
    /// order to try them. A bare `host:port` takes the transport's scheme.
    pub servers: Vec<String>,
    /// Plain HTTP, or TLS with the CA (and client certificate) to use.
    pub transport: Transport,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Limit on one attempt against one controller, connection included.
    pub request_timeout: Duration,
    /// Limit on all attempts of one call; after it the call fails with `Unreachable`.
    pub failover_deadline: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            servers: vec![DEFAULT_SERVER.to_string()],
            transport: Transport::Plain,
            token: None,
            request_timeout: Duration::from_secs(10),
            // Long enough to ride out a leader election and a controller restart.
            failover_deadline: Duration::from_secs(15),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A controller answered with an error. Bodies that were not problem+json are turned into
    /// a problem carrying the status and the body text.
    #[error("{0}")]
    Problem(Box<Problem>),
    /// No controller gave a usable answer before the failover deadline; one line per
    /// controller with its last error and how often it was tried.
    #[error("no controller answered:{}", bullet_list(.attempts))]
    Unreachable { attempts: Vec<String> },
    /// A controller answered 2xx with a body that is not what the call expects.
    #[error("could not read the controller's answer: {0}")]
    Decode(String),
    /// The configuration cannot work (no servers, unsupported scheme, bad address).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The problem a controller answered with, if it answered.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ClientError::Problem(problem) => Some(problem),
            _ => None,
        }
    }
}

/// The result of `put_tier`: the stored tier and whether the call created it (201) rather
/// than replacing it (200).
#[derive(Clone, Debug, PartialEq)]
pub struct PutTierOutcome {
    pub tier: Tier,
    pub created: bool,
}

/// A handle on the controller cluster. Cloning is cheap and clones share the choice of
/// controller, so a failover seen by one is used by all.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// Normalized base URLs without a trailing slash, such as `http://127.0.0.1:7001`.
    servers: Arc<[String]>,
    token: Option<String>,
    request_timeout: Duration,
    failover_deadline: Duration,
    /// Index into `servers` of the controller that answered last; the next call starts there.
    preferred: Arc<AtomicUsize>,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        let servers = config
            .servers
            .iter()
            .map(|server| normalize_server(server, &config.transport))
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err(ClientError::Config(
                "no controller address given".to_string(),
            ));
        }
        let builder = reqwest::Client::builder()
            // A controller that is down refuses at once; one that is cut off would otherwise
            // hold the whole request timeout before the client moves on.
            .connect_timeout(config.request_timeout.min(Duration::from_secs(2)))
            // Below the controllers' idle keep-alive timeout (--header-timeout): a pooled
            // connection is not reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(5));
        let http = config
            .transport
            .apply(builder)
            .build()
            .map_err(|error| ClientError::Config(format!("build HTTP client: {error}")))?;
        Ok(Client {
            http,
            servers: servers.into(),
            token: config.token,
            request_timeout: config.request_timeout,
            failover_deadline: config.failover_deadline,
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The controllers' base URLs, in the order they are tried.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// `PUT /v1/tiers/{name}`: creates or replaces a tier. A `resource_version` in the spec
    /// makes it a compare-and-set (409 when the tier changed meanwhile).
    pub async fn put_tier(&self, spec: &TierSpec) -> Result<PutTierOutcome, ClientError> {
        let path = format!("/v1/tiers/{}", encode_segment(&spec.name));
        let body = to_body(spec)?;
        let (status, bytes) = self.send(Method::PUT, &path, Some(body)).await?;
        Ok(PutTierOutcome {
            tier: from_body(&bytes)?,
            created: status == StatusCode::CREATED,
        })
    }

    /// `GET /v1/tiers/{name}`; `stale` allows the answering controller to read locally.
    pub async fn get_tier(&self, name: &str, stale: bool) -> Result<Tier, ClientError> {
        let path = format!("/v1/tiers/{}{}", encode_segment(name), stale_query(stale));
        self.call(Method::GET, &path, None).await
    }

    /// `GET /v1/tiers/{name}/pool`: the servers its load balancers must serve, and what each
    /// load balancer reports serving.
    pub async fn get_pool(&self, tier: &str, stale: bool) -> Result<PoolView, ClientError> {
        let path = format!(
            "/v1/tiers/{}/pool{}",
            encode_segment(tier),
            stale_query(stale)
        );
        self.call(Method::GET, &path, None).await
    }

    /// `GET /v1/tiers`, every page.
    pub async fn list_tiers(&self, stale: bool) -> Result<Vec<Tier>, ClientError> {
        let path = format!("/v1/tiers{}", stale_query(stale));
        self.list_all(&path).await
    }

    /// Every page of the list at `path` (which may carry a query), following `continue`.
    pub async fn list_all<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>, ClientError> {
        let mut items = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page_path = match &next {
                None => path.to_string(),
                Some(token) => format!(
                    "{path}{}continue={}",
                    if path.contains('?') { '&' } else { '?' },
                    encode_query_value(token)
                ),
            };
            let list: ItemList<T> = self.call(Method::GET, &page_path, None).await?;
            items.extend(list.items);
            match list.next {
                // A token that does not move would loop for ever.
                Some(token) if Some(&token) != next.as_ref() => next = Some(token),
                _ => return Ok(items),
            }
        }
    }

    /// `DELETE /v1/tiers/{name}`, optionally only if the tier still has `resource_version`.
    /// Returns the tier as it was deleted.
    pub async fn delete_tier(
        &self,
        name: &str,
        resource_version: Option<u64>,
    ) -> Result<Tier, ClientError> {
        let mut path = format!("/v1/tiers/{}", encode_segment(name));
        if let Some(version) = resource_version {
            path.push_str(&format!("?resource_version={version}"));
        }
        self.call(Method::DELETE, &path, None).await
    }

    /// `POST /v1/tiers/{name}/scale`: sets the manual instance count.
    pub async fn scale_tier(
        &self,
        name: &str,
        request: &ScaleRequest,
    ) -> Result<Tier, ClientError> {
        let path = format!("/v1/tiers/{}/scale", encode_segment(name));
        self.call(Method::POST, &path, Some(to_body(request)?))
            .await
    }

    /// `POST /v1/tiers/{name}/metrics`: one sample of a custom metric for the autoscaler.
    pub async fn push_metric(
        &self,
        tier: &str,
        sample: &crate::tier::CustomMetricSample,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/tiers/{}/metrics", encode_segment(tier));
        self.send(Method::POST, &path, Some(to_body(sample)?))
            .await
            .map(|_| ())
    }

    /// `GET /v1/cluster`: the answering controller's view of the Raft group.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        self.call(Method::GET, "/v1/cluster", None).await
    }

    /// `POST /v1/cluster/members`.
    pub async fn add_member(
        &self,
        request: &AddMemberRequest,
    ) -> Result<ClusterStatus, ClientError> {
        self.call(Method::POST, "/v1/cluster/members", Some(to_body(request)?))
            .await
    }

    /// `DELETE /v1/cluster/members/{id}`.
    pub async fn remove_member(&self, id: u64) -> Result<ClusterStatus, ClientError> {
        self.call(Method::DELETE, &format!("/v1/cluster/members/{id}"), None)
            .await
    }

    /// `GET /v1/nodes`: every registered agent host.
    pub async fn list_nodes(&self, stale: bool) -> Result<Vec<Node>, ClientError> {
        let path = format!("/v1/nodes{}", stale_query(stale));
        self.list_all(&path).await
    }

    /// `GET /v1/nodes/{id}`.
    pub async fn get_node(&self, id: &str, stale: bool) -> Result<Node, ClientError> {
        let path = format!("/v1/nodes/{}{}", encode_segment(id), stale_query(stale));
        self.call(Method::GET, &path, None).await
    }

    /// `POST /v1/nodes/{id}/cordon`: the node keeps its instances but gets no new ones.
    pub async fn cordon_node(&self, id: &str) -> Result<Node, ClientError> {
        self.node_action(id, "cordon").await
    }

    /// `POST /v1/nodes/{id}/uncordon`: the node takes new instances again.
    pub async fn uncordon_node(&self, id: &str) -> Result<Node, ClientError> {
        self.node_action(id, "uncordon").await
    }

    /// `POST /v1/nodes/{id}/drain`: the node's instances are replaced elsewhere. Answers once
    /// the drain is recorded, before the instances have moved.
    pub async fn drain_node(&self, id: &str) -> Result<Node, ClientError> {
        self.node_action(id, "drain").await
    }

    /// `POST /v1/nodes/{id}/revoke`: the node's credential stops working; its agent must
    /// register again with the join token.
    pub async fn revoke_node(&self, id: &str) -> Result<Node, ClientError> {
        self.node_action(id, "revoke").await
    }

    /// Instances of one tier (`GET /v1/tiers/{name}/instances`) or of all tiers
    /// (`GET /v1/instances`). The tier's own route is used so that a mistyped tier name
    /// answers 404 instead of an empty list.
    pub async fn list_instances(
        &self,
        tier: Option<&str>,
        stale: bool,
    ) -> Result<Vec<Instance>, ClientError> {
        let path = match tier {
            Some(tier) => format!(
                "/v1/tiers/{}/instances{}",
                encode_segment(tier),
                stale_query(stale)
            ),
            None => format!("/v1/instances{}", stale_query(stale)),
        };
        self.list_all(&path).await
    }

    /// `GET /v1/events`, optionally only those about `object` (`tier/web`, `node/host-1`,
    /// `instance/<uuid>`); oldest first.
    pub async fn list_events(
        &self,
        object: Option<&str>,
        stale: bool,
    ) -> Result<Vec<Event>, ClientError> {
        let mut query = Vec::new();
        if let Some(object) = object {
            query.push(format!("object={}", encode_query_value(object)));
        }
        if stale {
            query.push("stale=true".to_string());
        }
        let path = if query.is_empty() {
            "/v1/events".to_string()
        } else {
            format!("/v1/events?{}", query.join("&"))
        };
        self.list_all(&path).await
    }

    /// Any JSON call, for resources that have no typed method yet. `path` includes the query.
    /// An empty success body (204) gives `Value::Null`.
    pub async fn request_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = body.map(to_body).transpose()?;
        let (_, bytes) = self.send(method, path, body).await?;
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        from_body(&bytes)
    }

    /// `POST /v1/nodes/{id}/{action}` with no body; answers the node as changed.
    async fn node_action(&self, id: &str, action: &str) -> Result<Node, ClientError> {
        let path = format!("/v1/nodes/{}/{action}", encode_segment(id));
        self.call(Method::POST, &path, None).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (_, bytes) = self.send(method, path, body).await?;
        from_body(&bytes)
    }

    /// Runs one call with failover; returns the status and body of a 2xx answer.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        let started = Instant::now();
        let server_count = self.servers.len();
        let mut failures: Vec<Option<(String, u32)>> = vec![None; server_count];
        let mut index = self.preferred.load(Ordering::Relaxed) % server_count;
        let mut failed_attempts: u32 = 0;
        loop {
            let remaining = self.failover_deadline.saturating_sub(started.elapsed());
            let timeout = if failed_attempts == 0 {
                self.request_timeout
            } else {
                self.request_timeout.min(remaining)
            };
            match self
                .attempt(
                    &self.servers[index],
                    method.clone(),
                    path,
                    body.clone(),
                    timeout,
                )
                .await
            {
                Attempt::Answered(status, bytes) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    if status.is_success() {
                        return Ok((status, bytes));
                    }
                    return Err(ClientError::Problem(Box::new(problem_from_answer(
                        status, &bytes,
                    ))));
                }
                Attempt::TryElsewhere(reason) => {
                    tracing::debug!(server = %self.servers[index], %reason, "controller did not answer; trying the next one");
                    let entry = failures[index].get_or_insert_with(|| (String::new(), 0));
                    entry.0 = reason;
                    entry.1 += 1;
                }
            }
            failed_attempts += 1;
            index = (index + 1) % server_count;
            let remaining = self.failover_deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(self.unreachable(failures));
            }
            // Moving to a controller not yet tried in this round costs nothing; once all have
            // failed, wait before the next round so that an election can finish.
            if failed_attempts.is_multiple_of(server_count as u32) {
                let round = failed_attempts / server_count as u32;
                tokio::time::sleep(backoff(round).min(remaining)).await;
                if started.elapsed() >= self.failover_deadline {
                    return Err(self.unreachable(failures));
                }
            }
        }
    }

    async fn attempt(
        &self,
        base: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Attempt {
        let mut request = self
            .http
            .request(method, format!("{base}{path}"))
            .timeout(timeout)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => return Attempt::TryElsewhere(describe_transport_error(&error)),
        };
        let status = response.status();
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes.to_vec(),
            // The controller went away mid-answer; another may answer in full.
            Err(error) => return Attempt::TryElsewhere(describe_transport_error(&error)),
        };
        if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) {
            let problem = problem_from_answer(status, &bytes);
            return Attempt::TryElsewhere(format!("{status}: {}", problem.detail));
        }
        Attempt::Answered(status, bytes)
    }

    fn unreachable(&self, failures: Vec<Option<(String, u32)>>) -> ClientError {
        let attempts = self
            .servers
            .iter()
            .zip(failures)
            .filter_map(|(server, failure)| {
                failure.map(|(reason, count)| {
                    let times = if count == 1 {
                        String::new()
                    } else {
                        format!(" ({count} attempts)")
                    };
                    format!("{server}: {reason}{times}")
                })
            })
            .collect();
        ClientError::Unreachable { attempts }
    }
}

enum Attempt {
    Answered(StatusCode, Vec<u8>),
    TryElsewhere(String),
}

fn bullet_list(lines: &[String]) -> String {
    lines.iter().map(|line| format!("\n  {line}")).collect()
}

/// Exponential backoff from 50 ms, capped at 2 s, with the upper half randomized so that many
/// clients failing over together do not return in step.
fn backoff(round: u32) -> Duration {
    let ceiling_ms: u64 = (50u64 << round.min(6)).min(2000);
    let half = ceiling_ms / 2;
    let jitter = std::collections::hash_map::RandomState::new().hash_one(round) % (half + 1);
    Duration::from_millis(half + jitter)
}

fn normalize_server(server: &str, transport: &Transport) -> Result<String, ClientError> {
    let server = server.trim();
    let (scheme, host_port) = if let Some(rest) = server.strip_prefix("https://") {
        if matches!(transport, Transport::Plain) {
            return Err(ClientError::Config(format!(
                "{server}: https needs --ca-cert, the CA that signed the controllers' certificates"
            )));
        }
        ("https", rest)
    } else if let Some(rest) = server.strip_prefix("http://") {
        ("http", rest)
    } else if server.contains("://") {
        return Err(ClientError::Config(format!(
            "{server}: only http:// and https:// addresses are supported"
        )));
    } else {
        (transport.scheme(), server)
    };
    let host_port = host_port.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains('/') {
        return Err(ClientError::Config(format!(
            "{server:?}: give host:port, optionally after http:// or https://"
        )));
    }
    let base = format!("{scheme}://{host_port}");
    match reqwest::Url::parse(&base) {
        Ok(url) if url.host_str().is_some_and(|host| !host.is_empty()) => Ok(base),
        Ok(_) => Err(ClientError::Config(format!("{server:?}: no host"))),
        Err(error) => Err(ClientError::Config(format!("{server:?}: {error}"))),
    }
}

fn stale_query(stale: bool) -> &'static str {
    if stale {
        "?stale=true"
    } else {
        ""
    }
}

/// Percent-encodes one path segment, so a name typed by a user cannot change the route.
fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Percent-encodes a query value. `/` and `:` are legal in a query and stay readable, so an
/// object reference goes out as `object=tier/web`; `&`, `=`, `+`, `#` and the rest are escaped.
fn encode_query_value(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/' | b':') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn to_body<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(value)
        .map_err(|error| ClientError::Config(format!("encode request body: {error}")))
}

fn from_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|error| ClientError::Decode(error.to_string()))
}

/// The controller's problem document, or one made from the status and body text when the
/// answer came from something else (a proxy, an old server).
fn problem_from_answer(status: StatusCode, bytes: &[u8]) -> Problem {
    if let Ok(problem) = serde_json::from_slice::<Problem>(bytes) {
        return problem;
    }
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let detail = if text.is_empty() {
        "(empty body)".to_string()
    } else {
        text.chars().take(500).collect()
    };
    Problem::new(
        status.as_u16(),
        "http",
        status.canonical_reason().unwrap_or("HTTP error"),
        detail,
    )
}

/// reqwest's Display for a connect error is only "error sending request"; the cause chain says
/// what happened ("Connection refused").
fn describe_transport_error(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut root: &dyn std::error::Error = error;
    while let Some(source) = root.source() {
        root = source;
    }
    format!("{kind}: {root}")
}

#[cfg(test)]
mod tests;

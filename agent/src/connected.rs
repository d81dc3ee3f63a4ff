//! Connected mode: the agent registers its node with the controllers, heartbeats with host and
//! instance reports, and converges to the assignments each heartbeat answer carries.
//!
//! Invariants:
//! - Only a successful heartbeat answer changes what runs. While no controller answers, the
//!   agent keeps every instance as it is (a controller outage never stops workloads).
//! - Heartbeats go to the leader. The agent talks to any controller it was given; a follower
//!   answers 421 with the leader's address, which the agent then uses until it fails.
//! - A 404 to a heartbeat (the node is unknown, for example after the cluster was rebuilt)
//!   makes the agent register again.
//! - Identity: the join token is used only to register a node that has no credential yet.
//!   The answer carries the node's credential, which the agent writes to
//!   `DATA_DIR/node-credential` (0600) before using it, and sends as its bearer token from then
//!   on; a restarted agent reads it back and keeps its identity. When the controllers no
//!   longer accept it (401: revoked, or a rebuilt cluster), the agent forgets it and registers
//!   with the join token again.
//! - An LB agent (`lb` set) registers with the `load_balancer` role only, hands every answer's
//!   `pools` (the complete set) to its load balancer before the next heartbeat goes out, and
//!   reports HAProxy in `lb`. It always long-polls (`wait_ms` = the interval): it has no
//!   instance whose start-up needs prompt reports, and the leader answers as soon as a pool
//!   changes.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use strata_api::{
    Health, HeartbeatRequest, HeartbeatResponse, InstanceReport as ApiReport, NodeRole, Phase,
    Problem, RegisterRequest, Resources,
};

/// The node's credential, in the agent's data dir.
pub const CREDENTIAL_FILE: &str = "node-credential";

/// The credential kept in `data_dir`, if any.
fn load_credential(data_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(CREDENTIAL_FILE)).ok()?;
    let credential = text.trim();
    (!credential.is_empty()).then(|| credential.to_string())
}

/// Writes the credential atomically and durably, readable by the agent's user only.
fn store_credential(data_dir: &std::path::Path, credential: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(CREDENTIAL_FILE);
    let temporary = data_dir.join(format!("{CREDENTIAL_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(format!("{credential}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// Forgets a credential the controllers no longer accept.
fn forget_credential(data_dir: &std::path::Path) {
    match std::fs::remove_file(data_dir.join(CREDENTIAL_FILE)) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(%error, "remove the refused node credential"),
    }
}

use strata_api::tls::Transport;
use strata_api::validate::{limits, truncated};

use crate::health::HealthStatus;
use crate::host_metrics::HostMetricsSampler;
use crate::lb::{LbConfig, LbError, LoadBalancer};
use crate::supervisor::{
    Assignment, InstancePhase, InstanceReport, Supervisor, SupervisorConfig, SupervisorError,
};

/// How soon the next heartbeat goes out after the agent started or stopped something, or
/// while an instance is starting.
const STARTUP_REPORT_DELAY: Duration = Duration::from_millis(50);
/// Registration retries back off exponentially from one heartbeat interval up to this, each
/// wait drawn at random below its bound ("full jitter"), so that agents refused or cut off
/// together (a controller outage, a fleet restarted at once) do not retry in step: every
/// registration is a Raft write.
const MAX_REGISTER_BACKOFF: Duration = Duration::from_secs(10);

/// The bound after one more failed registration: doubled, at most `MAX_REGISTER_BACKOFF`.
fn next_register_backoff(bound: Duration) -> Duration {
    (bound * 2).min(MAX_REGISTER_BACKOFF)
}

/// An error with its causes, outermost first: reqwest's own message ("error sending request
/// for url ...") says nothing of why; the cause (connection refused, timed out, reset) does.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // hyper and reqwest sometimes repeat a cause's text in their own.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A wait drawn uniformly from `[0, bound]`.
fn jittered(bound: Duration) -> Duration {
    use rand::Rng;
    let millis = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
}

/// Settings of connected mode.
#[derive(Clone, Debug)]
pub struct ConnectedConfig {
    pub node_id: String,
    /// Controller addresses (`host:port`), any of them.
    pub controllers: Vec<String>,
    pub join_token: String,
    /// Plain HTTP or TLS (`--ca-cert`, with the node's client certificate for controllers
    /// that require one).
    pub transport: Transport,
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub supervisor: SupervisorConfig,
    pub interval: Duration,
    /// The load-balancer role: `Some` makes this node a load balancer (and not a worker).
    pub lb: Option<LbConfig>,
}

/// Why connected mode could not run.
#[derive(Debug, thiserror::Error)]
pub enum ConnectedError {
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("load balancer: {0}")]
    Lb(#[from] LbError),
    #[error("build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Why a call to the controllers failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the controllers do not know this node")]
    NotRegistered,
    #[error("no controller answered: {0}")]
    Unreachable(String),
    /// A controller refused the request for good (bad token, invalid data).
    #[error("refused: {0}")]
    Refused(Problem),
}

/// The agent's connection to the controller cluster.
pub struct ControllerLink {
    http: reqwest::Client,
    /// `http` or `https`: controllers and the leader hints they give are `host:port`.
    scheme: &'static str,
    controllers: Vec<String>,
    token: String,
    /// The controller to try first: the leader when known.
    preferred: Option<String>,
    /// Per-request limit, on top of any time the leader may hold a long-polled heartbeat.
    timeout: Duration,
}

impl ControllerLink {
    /// Sends `token` as the bearer token from now on.
    pub fn set_token(&mut self, token: String) {
        self.token = token;
    }

    pub fn new(
        controllers: Vec<String>,
        token: String,
        timeout: Duration,
        transport: &Transport,
    ) -> Result<Self, reqwest::Error> {
        let builder = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_millis(500)))
            // Below the controllers' idle keep-alive timeout (--header-timeout).
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let http = transport.apply(builder).build()?;
        Ok(ControllerLink {
            http,
            scheme: transport.scheme(),
            controllers,
            token,
            preferred: None,
            timeout,
        })
    }

    /// Candidates in the order to try: the preferred one, then the configured list.
    fn candidates(&self) -> Vec<String> {
        let mut list: Vec<String> = self.preferred.iter().cloned().collect();
        for controller in &self.controllers {
            if !list.contains(controller) {
                list.push(controller.clone());
            }
        }
        list
    }

    async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
        hold: Duration,
    ) -> Result<R, LinkError> {
        let mut failures = Vec::new();
        let mut queue = self.candidates();
        let mut hops = 0;
        while let Some(address) = (!queue.is_empty()).then(|| queue.remove(0)) {
            hops += 1;
            if hops > 8 {
                break;
            }
            let answer = self
                .http
                .post(format!("{}://{address}{path}", self.scheme))
                .bearer_auth(&self.token)
                .timeout(self.timeout + hold)
                .json(body)
                .send()
                .await;
            let response = match answer {
                Ok(response) => response,
                Err(error) => {
                    failures.push(format!("{address}: {}", error_chain(&error)));
                    if self.preferred.as_deref() == Some(address.as_str()) {
                        self.preferred = None;
                    }
                    continue;
                }
            };
            let status = response.status().as_u16();
            if response.status().is_success() {
                self.preferred = Some(address.clone());
                return response.json().await.map_err(|error| {
                    LinkError::Unreachable(format!(
                        "{address}: decode answer: {}",
                        error_chain(&error)
                    ))
                });
            }
            let text = response.text().await.unwrap_or_default();
            let problem: Option<Problem> = serde_json::from_str(&text).ok();
            match status {
                421 => {
                    if let Some(leader) = problem.as_ref().and_then(|p| p.leader.clone()) {
                        self.preferred = Some(leader.clone());
                        queue.retain(|candidate| candidate != &leader);
                        queue.insert(0, leader);
                    }
                    failures.push(format!("{address}: not the leader"));
                }
                404 if path.ends_with("/heartbeat") => return Err(LinkError::NotRegistered),
                400..=499 => {
                    return Err(LinkError::Refused(problem.unwrap_or_else(|| {
                        Problem::new(status, "refused", "Refused", text)
                    })))
                }
                _ => failures.push(format!("{address}: {status} {text}")),
            }
        }
        Err(LinkError::Unreachable(failures.join("; ")))
    }

    pub async fn register(
        &mut self,
        request: &RegisterRequest,
    ) -> Result<strata_api::Registration, LinkError> {
        self.post("/v1/agents/register", request, Duration::ZERO)
            .await
    }

    pub async fn heartbeat(
        &mut self,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, LinkError> {
        self.post(
            "/v1/agents/heartbeat",
            request,
            Duration::from_millis(request.wait_ms),
        )
        .await
    }
}

/// Runs connected mode until `shutdown` resolves. Instances keep running afterwards; the next
/// agent process adopts them.
pub async fn run(
    config: ConnectedConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ConnectedError> {
    let mut supervisor = Supervisor::open(config.supervisor.clone()).await?;
    let lb = match config.lb.clone() {
        Some(lb_config) => Some(LoadBalancer::start(lb_config).await?),
        None => None,
    };
    let roles = if lb.is_some() {
        vec![NodeRole::LoadBalancer]
    } else {
        strata_api::default_roles()
    };
    let mut sampler = HostMetricsSampler::new();
    let timeout = config
        .interval
        .clamp(Duration::from_millis(500), Duration::from_secs(3));
    let data_dir = config.supervisor.data_dir.clone();
    let mut credential = load_credential(&data_dir);
    let mut link = ControllerLink::new(
        config.controllers.clone(),
        credential
            .clone()
            .unwrap_or_else(|| config.join_token.clone()),
        timeout,
        &config.transport,
    )?;
    let registration = RegisterRequest {
        node_id: config.node_id.clone(),
        address: config.supervisor.advertise_ip.to_string(),
        zone: config.zone.clone(),
        labels: config.labels.clone(),
        capacity: config.capacity,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        roles,
    };
    let mut registered = false;
    // The bound of the next registration retry's wait; doubles with each failure.
    let mut register_backoff = config.interval;
    // When the next heartbeat goes out. A long-polled heartbeat already waited at the leader,
    // so the next one follows its answer at once; otherwise the agent waits an interval, or
    // only a moment while an instance is starting, so that its becoming healthy is reported
    // promptly.
    let mut next_delay = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(next_delay) => {}
        }
        next_delay = config.interval;
        if !registered {
            match link.register(&registration).await {
                Ok(answer) => {
                    if let Some(issued) = answer.credential {
                        // Kept before it is relied on: an agent that crashes right after
                        // registering must not come back without its identity.
                        if let Err(error) = store_credential(&data_dir, &issued) {
                            tracing::error!(%error, "store the node credential; registering again");
                            next_delay = jittered(register_backoff);
                            register_backoff = next_register_backoff(register_backoff);
                            continue;
                        }
                        link.set_token(issued.clone());
                        credential = Some(issued);
                    }
                    tracing::info!(node = %answer.node.id, status = ?answer.node.status, "registered");
                    registered = true;
                    register_backoff = config.interval;
                }
                Err(LinkError::Refused(problem))
                    if problem.status == 401 && credential.is_some() =>
                {
                    tracing::warn!(%problem, "the node credential is no longer accepted (revoked?); registering with the join token");
                    forget_credential(&data_dir);
                    credential = None;
                    link.set_token(config.join_token.clone());
                    next_delay = jittered(config.interval);
                }
                Err(failure) => {
                    next_delay = jittered(register_backoff);
                    register_backoff = next_register_backoff(register_backoff);
                    match failure {
                        LinkError::Refused(problem) => tracing::error!(
                            %problem, retry_in = ?next_delay,
                            "registration refused; check --join-token and the flags"
                        ),
                        error => {
                            tracing::warn!(%error, retry_in = ?next_delay, "register; retrying")
                        }
                    }
                    continue;
                }
            }
        }
        let metrics = sampler
            .sample()
            .inspect_err(|error| tracing::warn!(%error, "sample host metrics"))
            .ok();
        let instances: Vec<ApiReport> = supervisor.report().await.iter().map(api_report).collect();
        let starting = instances
            .iter()
            .any(|report| report.phase == Phase::Starting && report.health == Health::Unknown);
        let wait_ms = if starting && lb.is_none() {
            0
        } else {
            u64::try_from(config.interval.as_millis()).unwrap_or(u64::MAX)
        };
        let lb_report = match &lb {
            Some(lb) => Some(bounded_lb_report(lb.report().await)),
            None => None,
        };
        let request = HeartbeatRequest {
            node_id: config.node_id.clone(),
            metrics: metrics.map(api_metrics).unwrap_or_default(),
            instances,
            wait_ms,
            lb: lb_report,
        };
        match link.heartbeat(&request).await {
            Ok(answer) => {
                if let Some(lb) = &lb {
                    // First: a pool change reaches HAProxy within milliseconds of the answer.
                    let outcome = lb.apply(answer.pools.clone()).await;
                    if let Some(failure) = &outcome.failure {
                        tracing::warn!(%failure, "load balancer not converged; retrying");
                    }
                    for (tier, error) in &outcome.errors {
                        tracing::debug!(%tier, %error, "tier not served");
                    }
                }
                let desired: Vec<Assignment> = answer
                    .assignments
                    .into_iter()
                    .map(|assignment| Assignment {
                        instance_id: assignment.instance_id,
                        tier: assignment.tier,
                        template: assignment.template,
                        health: assignment.health,
                    })
                    .collect();
                let outcome = supervisor.converge(&desired).await;
                for failure in &outcome.failures {
                    tracing::warn!(instance = %failure.instance_id, error = %failure.error,
                        "converge action failed; retrying next tick");
                }
                next_delay = if !outcome.actions.is_empty() || starting {
                    // Report what changed, and a start-up's progress, without waiting an
                    // interval.
                    STARTUP_REPORT_DELAY
                } else if wait_ms > 0 {
                    Duration::ZERO
                } else {
                    config.interval
                };
            }
            Err(LinkError::Refused(problem)) if problem.status == 401 && credential.is_some() => {
                tracing::warn!(%problem, "the node credential is no longer accepted (revoked?); registering with the join token");
                forget_credential(&data_dir);
                credential = None;
                link.set_token(config.join_token.clone());
                registered = false;
                next_delay = jittered(config.interval);
            }
            Err(LinkError::NotRegistered) => {
                tracing::warn!("the controllers do not know this node; registering again");
                registered = false;
                // Whatever made the controllers forget this node likely made them forget
                // every node: spread the re-registrations over an interval.
                next_delay = jittered(config.interval);
            }
            Err(error) => tracing::warn!(%error, "heartbeat failed; instances keep running"),
        }
    }
    supervisor.shutdown().await;
    if let Some(lb) = lb {
        lb.shutdown().await;
    }
    Ok(())
}

/// The LB report cut to the controllers' limits (an HAProxy error message can be long).
fn bounded_lb_report(mut report: strata_api::LbReport) -> strata_api::LbReport {
    for tier in &mut report.tiers {
        if let Some(error) = &mut tier.error {
            *error = truncated(error, limits::REASON_BYTES);
        }
        tier.servers.truncate(limits::LB_SERVERS);
        for server in &mut tier.servers {
            server.status = truncated(&server.status, limits::LB_STATUS_BYTES);
        }
    }
    report.tiers.truncate(limits::LB_TIERS);
    report
}

fn api_metrics(metrics: crate::host_metrics::HostMetrics) -> strata_api::HostMetrics {
    strata_api::HostMetrics {
        cpu_percent: metrics.cpu_utilization.unwrap_or(0.0) * 100.0,
        memory_total_mb: metrics.memory_total_mb,
        memory_available_mb: metrics.memory_available_mb,
        load1: metrics.load_1m,
        load5: metrics.load_5m,
        load15: metrics.load_15m,
    }
}

/// The controller's view of one supervisor report.
pub fn api_report(report: &InstanceReport) -> ApiReport {
    ApiReport {
        id: report.instance_id,
        phase: match report.phase {
            InstancePhase::Starting => Phase::Starting,
            InstancePhase::Running => Phase::Running,
            InstancePhase::Failed => Phase::Failed,
            InstancePhase::Terminated => Phase::Terminated,
        },
        health: match report.health {
            HealthStatus::Unknown => Health::Unknown,
            HealthStatus::Healthy => Health::Healthy,
            HealthStatus::Unhealthy => Health::Unhealthy,
        },
        port: report.address.map(|address| address.port()),
        // Reported reasons are cut to what the controllers accept: a long last line of an
        // instance's stderr must not make the whole heartbeat refused.
        reason: report
            .reason
            .as_deref()
            .map(|reason| truncated(reason, limits::REASON_BYTES)),
        cpu_percent: report
            .cpu_utilization_percent
            .filter(|value| value.is_finite() && *value >= 0.0)
            .unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_retries_back_off_to_a_cap_with_jitter_below_the_bound() {
        let mut bound = Duration::from_secs(1);
        let mut bounds = Vec::new();
        for _ in 0..6 {
            bounds.push(bound.as_secs());
            bound = next_register_backoff(bound);
        }
        assert_eq!(bounds, [1, 2, 4, 8, 10, 10]);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(bound)).collect();
        assert!(waits.iter().all(|wait| *wait <= bound));
        // Spread out, not in step: 200 draws from 10,001 values are not all alike.
        assert!(waits.iter().any(|wait| *wait != waits[0]));
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }

    /// A failed heartbeat says why it failed, not only that a request failed.
    #[tokio::test]
    async fn a_failed_request_is_explained_by_its_cause() -> anyhow::Result<()> {
        // A port nothing listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let Ok(mut link) = ControllerLink::new(
            vec![format!("127.0.0.1:{port}")],
            "token".to_string(),
            Duration::from_millis(500),
            &Transport::Plain,
        ) else {
            panic!("build the link");
        };
        let request = HeartbeatRequest {
            node_id: "host-a".to_string(),
            metrics: strata_api::HostMetrics::default(),
            instances: Vec::new(),
            wait_ms: 0,
            lb: None,
        };
        match link.heartbeat(&request).await {
            Err(LinkError::Unreachable(text)) => {
                assert!(text.to_lowercase().contains("refused"), "{text}")
            }
            other => anyhow::bail!("expected an unreachable controller, got {other:?}"),
        }
        Ok(())
    }
}

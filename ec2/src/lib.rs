//! Strata's EC2 client: `aws-sdk-ec2` behind a small, non-generic API.
//!
//! Layout:
//! - `Ec2` (here): connect (endpoint, region, the standard credential chain), DescribeInstances
//!   by cluster tag, DescribeInstanceStatus, RunInstances, TerminateInstances, and the calls the
//!   tests need to set up a VPC against a moto server.
//! - `elb`: ELBv2 target groups (DescribeTargetHealth, RegisterTargets, DeregisterTargets),
//!   through the same configuration, retries and rate limit.
//! - `retry`: which errors are retried, exponential backoff with full jitter.
//! - `limit`: the token bucket that keeps every call under the configured rate.
//!
//! Why a crate of its own: the SDK's builders and fluent calls are generic code that is compiled
//! where it is used. Kept here, behind plain functions, they are compiled once; the controller
//! calls these functions and its incremental builds never re-instantiate SDK code (see
//! ARCHITECTURE.md for the measured cost).
//!
//! Invariants:
//! - The SDK's own retries are off (`RetryConfig::disabled()`): `retry` decides, so that every
//!   attempt passes the rate limiter and is counted.
//! - RunInstances is never retried after a failure whose outcome is unknown (a dropped
//!   connection, a timeout, a 5xx after the request was sent): the caller looks the instance up
//!   by its `strata:instance` tag before it launches again, because moto (unlike EC2) ignores
//!   client tokens.

pub mod elb;
pub mod limit;
pub mod retry;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, InstanceStateName, ResourceType, Tag, TagSpecification};

pub use elb::{Target, TargetState};
pub use limit::TokenBucket;
pub use retry::{Backoff, Ec2Error, ErrorClass};

/// Tag keys every instance Strata launches carries.
pub const TAG_CLUSTER: &str = "strata:cluster";
pub const TAG_TIER: &str = "strata:tier";
pub const TAG_INSTANCE: &str = "strata:instance";

/// How to reach EC2.
#[derive(Clone, Debug)]
pub struct Ec2Config {
    /// `None`: the region's public endpoint. A URL (`http://127.0.0.1:5000`) for moto or a
    /// VPC endpoint.
    pub endpoint: Option<String>,
    pub region: String,
    /// The call rate never exceeded, averaged over a second, and the burst allowed.
    pub calls_per_second: f64,
    pub burst: u32,
    /// Attempts per call for retryable errors (throttling, 5xx, connection failures).
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Connect and per-attempt deadlines: an unreachable endpoint fails fast.
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
    /// Fixed credentials (access key id, secret) instead of the standard chain: for tests'
    /// own clients of a moto server.
    pub static_credentials: Option<(String, String)>,
}

impl Default for Ec2Config {
    fn default() -> Self {
        Ec2Config {
            endpoint: None,
            region: "us-east-1".to_string(),
            calls_per_second: 10.0,
            burst: 10,
            max_attempts: 5,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(20),
            static_credentials: None,
        }
    }
}

/// An EC2 instance as DescribeInstances shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ec2Instance {
    pub id: String,
    pub state: Ec2State,
    pub private_ip: Option<String>,
    pub zone: Option<String>,
    pub subnet: Option<String>,
    pub image: Option<String>,
    pub instance_type: Option<String>,
    pub launch_time_ms: u64,
    pub tags: BTreeMap<String, String>,
}

impl Ec2Instance {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ec2State {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
}

impl Ec2State {
    /// Gone or going: it will never serve again.
    pub fn is_gone(self) -> bool {
        matches!(self, Ec2State::ShuttingDown | Ec2State::Terminated)
    }
}

/// What DescribeInstanceStatus says of a running instance: the worse of its instance and
/// system status checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusCheck {
    Ok,
    /// Checks not yet run (the first minutes after launch), or not enough data.
    Initializing,
    /// A check failed: the instance or its host is broken.
    Impaired,
}

/// One instance to launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// Idempotency token (the Strata instance uuid); EC2 honours it, moto does not.
    pub client_token: String,
    pub image: String,
    pub instance_type: String,
    pub subnet: Option<String>,
    pub security_groups: Vec<String>,
    pub key_name: Option<String>,
    pub iam_instance_profile: Option<String>,
    /// Plain text; base64-encoded here as RunInstances requires.
    pub user_data: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// The EC2 client with its retry policy and rate limit.
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    limiter: TokenBucket,
    max_attempts: u32,
    backoff: Backoff,
    /// Attempts sent (each passed the limiter), for metrics and the tests' rate check.
    attempts: AtomicU64,
}

impl Ec2 {
    /// Builds the client. Credentials come from the standard chain (environment, profile,
    /// web identity, ECS/instance role), resolved lazily on the first call, so a controller
    /// without credentials starts and reports the failure on its tiers.
    pub async fn connect(config: &Ec2Config) -> Ec2 {
        // TLS through rustls on ring, not the SDK's default aws-lc-rs (a cmake build); see
        // https://docs.rs/aws-smithy-http-client/latest/aws_smithy_http_client/struct.Builder.html
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        // `endpoint_url`, `region`, `retry_config`, `timeout_config` and `http_client` of
        // https://docs.rs/aws-config/latest/aws_config/struct.ConfigLoader.html. Retries are
        // disabled because `retry` does them (the SDK's standard mode would retry inside one
        // of our attempts, invisible to the rate limiter); see
        // https://docs.rs/aws-config/latest/aws_config/retry/struct.RetryConfig.html#method.disabled
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout)
                    .operation_attempt_timeout(config.attempt_timeout)
                    .build(),
            );
        if let Some((key, secret)) = &config.static_credentials {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                key.clone(),
                secret.clone(),
                None,
                None,
                "strata-static",
            ));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let shared = loader.load().await;
        Ec2 {
            client: aws_sdk_ec2::Client::new(&shared),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&shared),
            limiter: TokenBucket::new(config.calls_per_second, config.burst),
            max_attempts: config.max_attempts.max(1),
            backoff: config.backoff,
            attempts: AtomicU64::new(0),
        }
    }

    /// Attempts sent so far.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Every instance carrying `strata:cluster = cluster`, in any state but terminated ones
    /// that EC2 has already forgotten. Retried (a read is safe to repeat).
    pub async fn describe_cluster(&self, cluster: &str) -> Result<Vec<Ec2Instance>, Ec2Error> {
        self.describe(Some(cluster)).await
    }

    /// Every instance (tests).
    pub async fn describe_all(&self) -> Result<Vec<Ec2Instance>, Ec2Error> {
        self.describe(None).await
    }

    async fn describe(&self, cluster: Option<&str>) -> Result<Vec<Ec2Instance>, Ec2Error> {
        let mut found = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let token = next.clone();
            let page = self
                .retrying(true, || {
                    let mut call = self
                        .client
                        .describe_instances()
                        .set_next_token(token.clone());
                    if let Some(cluster) = cluster {
                        call = call.filters(
                            Filter::builder()
                                .name(format!("tag:{TAG_CLUSTER}"))
                                .values(cluster)
                                .build(),
                        );
                    }
                    async move { call.send().await.map_err(Ec2Error::from_sdk) }
                })
                .await?;
            for reservation in page.reservations() {
                for instance in reservation.instances() {
                    found.push(convert(instance));
                }
            }
            next = page.next_token().map(str::to_string);
            if next.as_deref().is_none_or(str::is_empty) {
                return Ok(found);
            }
        }
    }

    /// The status checks of `ids` (running instances; EC2 reports no other). An instance
    /// missing from the answer has no checks yet. Asked 100 ids at a time, EC2's bound.
    pub async fn describe_status(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, StatusCheck)>, Ec2Error> {
        use aws_sdk_ec2::types::SummaryStatus;
        let mut found = Vec::new();
        for chunk in ids.chunks(100) {
            let output = self
                .retrying(true, || {
                    let call = self
                        .client
                        .describe_instance_status()
                        .set_instance_ids(Some(chunk.to_vec()));
                    async move { call.send().await.map_err(Ec2Error::from_sdk) }
                })
                .await?;
            for status in output.instance_statuses() {
                let Some(id) = status.instance_id() else {
                    continue;
                };
                let checks = [
                    status
                        .instance_status()
                        .and_then(|summary| summary.status()),
                    status.system_status().and_then(|summary| summary.status()),
                ];
                let check = if checks.contains(&Some(&SummaryStatus::Impaired)) {
                    StatusCheck::Impaired
                } else if checks
                    .iter()
                    .all(|check| check == &Some(&SummaryStatus::Ok))
                {
                    StatusCheck::Ok
                } else {
                    StatusCheck::Initializing
                };
                found.push((id.to_string(), check));
            }
        }
        Ok(found)
    }

    /// Launches one instance. Retried only where the request surely did not run (throttled,
    /// refused connection); see the crate invariants.
    pub async fn run_instance(&self, launch: &Launch) -> Result<Ec2Instance, Ec2Error> {
        let tags: Vec<Tag> = launch
            .tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect();
        let output = self
            .retrying(false, || {
                let mut call = self
                    .client
                    .run_instances()
                    .client_token(&launch.client_token)
                    .image_id(&launch.image)
                    .instance_type(launch.instance_type.as_str().into())
                    .min_count(1)
                    .max_count(1)
                    .set_subnet_id(launch.subnet.clone())
                    .set_key_name(launch.key_name.clone())
                    .set_security_group_ids(
                        (!launch.security_groups.is_empty())
                            .then(|| launch.security_groups.clone()),
                    )
                    .set_user_data(launch.user_data.as_deref().map(base64_encode));
                // EC2 refuses a tag specification without tags.
                if !tags.is_empty() {
                    call = call.tag_specifications(
                        TagSpecification::builder()
                            .resource_type(ResourceType::Instance)
                            .set_tags(Some(tags.clone()))
                            .build(),
                    );
                }
                if let Some(profile) = &launch.iam_instance_profile {
                    call = call.iam_instance_profile(
                        aws_sdk_ec2::types::IamInstanceProfileSpecification::builder()
                            .name(profile)
                            .build(),
                    );
                }
                async move { call.send().await.map_err(Ec2Error::from_sdk) }
            })
            .await?;
        output
            .instances()
            .first()
            .map(convert)
            .ok_or_else(|| Ec2Error::Rejected {
                code: "EmptyReservation".to_string(),
                message: "RunInstances returned no instance".to_string(),
            })
    }

    /// Terminates instances. Safe to repeat: terminating a terminated instance succeeds.
    pub async fn terminate(&self, ids: &[String]) -> Result<(), Ec2Error> {
        if ids.is_empty() {
            return Ok(());
        }
        self.retrying(true, || {
            let call = self
                .client
                .terminate_instances()
                .set_instance_ids(Some(ids.to_vec()));
            async move { call.send().await.map_err(Ec2Error::from_sdk) }
        })
        .await?;
        Ok(())
    }

    /// The user data instance `id` was launched with, decoded (DescribeInstanceAttribute
    /// `userData`); `None` when it has none. For tests and operators' tools: what a launched
    /// instance can read from its metadata service.
    pub async fn user_data(&self, id: &str) -> Result<Option<String>, Ec2Error> {
        let answer = self
            .retrying(true, || {
                let call = self
                    .client
                    .describe_instance_attribute()
                    .instance_id(id)
                    .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData);
                async move { call.send().await.map_err(Ec2Error::from_sdk) }
            })
            .await?;
        Ok(answer
            .user_data()
            .and_then(|value| value.value())
            .and_then(base64_decode))
    }

    /// Test set-up: a VPC with one /24 subnet per zone. Returns (vpc, [(subnet, zone)]).
    pub async fn create_vpc_with_subnets(
        &self,
        zones: &[&str],
    ) -> Result<(String, Vec<(String, String)>), Ec2Error> {
        let vpc = self
            .retrying(true, || {
                let call = self.client.create_vpc().cidr_block("10.42.0.0/16");
                async move { call.send().await.map_err(Ec2Error::from_sdk) }
            })
            .await?
            .vpc()
            .and_then(|vpc| vpc.vpc_id().map(str::to_string))
            .unwrap_or_default();
        let mut subnets = Vec::new();
        for (position, zone) in zones.iter().enumerate() {
            let subnet = self
                .retrying(true, || {
                    let call = self
                        .client
                        .create_subnet()
                        .vpc_id(&vpc)
                        .availability_zone(*zone)
                        .cidr_block(format!("10.42.{position}.0/24"));
                    async move { call.send().await.map_err(Ec2Error::from_sdk) }
                })
                .await?
                .subnet()
                .and_then(|subnet| subnet.subnet_id().map(str::to_string))
                .unwrap_or_default();
            subnets.push((subnet, zone.to_string()));
        }
        Ok((vpc, subnets))
    }

    /// Runs `attempt` under the rate limit, retrying retryable errors with full-jitter
    /// backoff. `repeatable`: whether an attempt whose outcome is unknown may be repeated.
    pub(crate) async fn retrying<T, F, Fut>(
        &self,
        repeatable: bool,
        mut attempt: F,
    ) -> Result<T, Ec2Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Ec2Error>>,
    {
        let mut tries = 0;
        loop {
            self.limiter.acquire().await;
            self.attempts.fetch_add(1, Ordering::Relaxed);
            tries += 1;
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    let again = match error.class() {
                        ErrorClass::NotSent | ErrorClass::Throttled => true,
                        ErrorClass::Unknown => repeatable,
                        ErrorClass::Final => false,
                    };
                    if !again || tries >= self.max_attempts {
                        return Err(error);
                    }
                    let delay = self.backoff.delay(tries, &mut rand::thread_rng());
                    tracing::debug!(%error, tries, ?delay, "EC2 call failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn convert(instance: &aws_sdk_ec2::types::Instance) -> Ec2Instance {
    let state = match instance.state().and_then(|state| state.name()) {
        Some(InstanceStateName::Pending) => Ec2State::Pending,
        Some(InstanceStateName::Running) => Ec2State::Running,
        Some(InstanceStateName::Stopping) => Ec2State::Stopping,
        Some(InstanceStateName::Stopped) => Ec2State::Stopped,
        Some(InstanceStateName::ShuttingDown) => Ec2State::ShuttingDown,
        Some(InstanceStateName::Terminated) => Ec2State::Terminated,
        // An unknown state is treated as alive: terminating or replacing on a guess is worse.
        _ => Ec2State::Pending,
    };
    Ec2Instance {
        id: instance.instance_id().unwrap_or_default().to_string(),
        state,
        private_ip: instance.private_ip_address().map(str::to_string),
        zone: instance
            .placement()
            .and_then(|placement| placement.availability_zone())
            .map(str::to_string),
        subnet: instance.subnet_id().map(str::to_string),
        image: instance.image_id().map(str::to_string),
        instance_type: instance.instance_type().map(|t| t.as_str().to_string()),
        launch_time_ms: instance
            .launch_time()
            .and_then(|time| time.to_millis().ok())
            .map_or(0, |ms| ms.max(0) as u64),
        tags: instance
            .tags()
            .iter()
            .filter_map(|tag| Some((tag.key()?.to_string(), tag.value()?.to_string())))
            .collect(),
    }
}

/// Standard base64 with padding (RunInstances' `UserData`); small enough not to need a crate.
fn base64_encode(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for position in 0..4 {
            if position <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * position) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The inverse of `base64_encode`; `None` for text that is not base64 of UTF-8.
fn base64_decode(text: &str) -> Option<String> {
    let mut bits = 0u32;
    let mut held = 0u32;
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for byte in text.bytes().filter(|byte| !byte.is_ascii_whitespace()) {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        held += 6;
        if held >= 8 {
            held -= 8;
            out.push((bits >> held) as u8);
            bits &= (1 << held) - 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Ec2Error {
    pub(crate) fn from_sdk<E>(
        error: aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
    ) -> Ec2Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        use aws_sdk_ec2::error::SdkError;
        match &error {
            SdkError::ConstructionFailure(_) => Ec2Error::Rejected {
                code: "ConstructionFailure".to_string(),
                message: format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&error)),
            },
            SdkError::DispatchFailure(failure) => {
                let message = format!("{}", aws_sdk_ec2::error::DisplayErrorContext(&error));
                if failure.is_io() || failure.is_timeout() {
                    // A connect failure never reached the server; an IO error mid-request
                    // may have. The connector reports both as IO; refused connections say so.
                    let lower = message.to_lowercase();
                    if lower.contains("connection refused")
                        || lower.contains("client error (connect)")
                    {
                        Ec2Error::Unreachable(message)
                    } else {
                        Ec2Error::Unknown(message)
                    }
                } else if failure.is_user() {
                    // Credentials missing or refused before anything was sent.
                    Ec2Error::Rejected {
                        code: "Credentials".to_string(),
                        message,
                    }
                } else {
                    Ec2Error::Unknown(message)
                }
            }
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Ec2Error::Unknown(format!(
                "{}",
                aws_sdk_ec2::error::DisplayErrorContext(&error)
            )),
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().unwrap_or("Unknown").to_string();
                let message = service.err().message().unwrap_or_default().to_string();
                retry::classify_service(status, code, message)
            }
            _ => Ec2Error::Unknown(format!(
                "{}",
                aws_sdk_ec2::error::DisplayErrorContext(&error)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain), encoded);
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain));
        }
        let script = "#!/bin/sh\nexec agent --join-token 'x'\n";
        assert_eq!(
            base64_decode(&base64_encode(script)).as_deref(),
            Some(script)
        );
        assert_eq!(base64_decode("Zm9v!"), None);
    }
}

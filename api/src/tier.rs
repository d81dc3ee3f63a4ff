//! The Tier resource: a group of identical VMs behind a load balancer, with a scaling policy.
//!
//! `TierSpec` is what operators write (`stratactl apply -f`, `PUT /v1/tiers/{name}`); `Tier` is
//! what the controller returns: the spec plus its resource version, timestamps and status.
//! Unknown fields are rejected everywhere (`deny_unknown_fields`) so that a typo such as
//! `scalling:` fails loudly instead of being ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// The only `kind` a tier document may carry.
pub const TIER_KIND: &str = "Tier";

/// The operator's declaration of a tier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"name": "web", "template": {"driver": "process", "command": ["strata-workload"]}, "scaling": {"min": 0, "max": 3, "policies": [{"metric": "custom", "name": "queue", "target": 10.0}]}, "load_balancer": {"listen": "127.0.0.1:18080"}}))]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Optional in a request; when present it must be `Tier`. Lets one file hold several kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A DNS label: lowercase letters, digits and `-`, 1 to 63 characters.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// In a write: compare-and-set precondition (409 when the tier has another version).
    /// In a read: the Raft log index that last changed the tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
    #[serde(default)]
    pub provider: Provider,
    pub template: Template,
    #[serde(default)]
    pub health: HealthCheck,
    pub scaling: Scaling,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub rollout: Rollout,
}

/// How instances are replaced when the template changes or their node drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Instances allowed above `desired` while replacing (new ones start before old ones go).
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
    /// Ready instances allowed below `desired` while replacing (old ones go before new ones
    /// are ready).
    #[serde(default)]
    pub max_unavailable: u32,
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            max_surge: default_max_surge(),
            max_unavailable: 0,
        }
    }
}

fn default_max_surge() -> u32 {
    1
}

/// Where a tier's VMs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// On agent hosts, through the process or qemu driver.
    #[default]
    Local,
    /// EC2 instances launched by the controller.
    Ec2,
}

/// How a local instance is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    Process,
    Qemu,
}

/// What every instance of the tier looks like. Which fields apply depends on the provider and
/// driver; validation names the ones that are missing or out of place.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// local: `process` or `qemu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<Driver>,
    /// process: argv of the program; it finds its port in `PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// process and qemu: extra environment (process) or kernel command line values (qemu).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// process: the host user the program runs as (the agent must run as root); default: the
    /// agent's `--run-as`, else the agent's own user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// qemu: the guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<QemuImage>,
    /// CPU cores one instance reserves on its node (local) — for example 0.5.
    #[serde(default = "default_cpu")]
    pub cpu: f64,
    /// Memory one instance reserves on its node (local) and the VM's RAM (qemu).
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// The port the workload listens on inside a qemu guest, or on an EC2 instance.
    /// Process instances get theirs from the agent in `PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// ec2: the image to launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami: Option<String>,
    /// ec2: for example `t3.micro`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// ec2: the key pair to install for SSH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// ec2: the IAM instance profile (name) the instances run with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// ec2: the instance's user data (plain text); by default a script that starts
    /// `strata-agent` with the join token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Same values as an empty template in a file, so that code building templates by hand does
/// not get the invalid `cpu: 0, memory_mb: 0` a derived `Default` would give.
impl Default for Template {
    fn default() -> Self {
        Template {
            driver: None,
            command: Vec::new(),
            env: BTreeMap::new(),
            user: None,
            image: None,
            cpu: default_cpu(),
            memory_mb: default_memory_mb(),
            port: None,
            ami: None,
            instance_type: None,
            subnets: Vec::new(),
            security_groups: Vec::new(),
            key_name: None,
            iam_instance_profile: None,
            user_data: None,
            tags: BTreeMap::new(),
        }
    }
}

fn default_cpu() -> f64 {
    0.5
}

fn default_memory_mb() -> u64 {
    128
}

/// A qemu guest: a kernel and an initramfs booted directly (`-kernel`/`-initrd`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QemuImage {
    /// Path to the kernel on the agent host.
    pub kernel: String,
    /// Path to the initramfs on the agent host.
    pub initrd: String,
    /// Extra kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
}

/// How the agent decides an instance is healthy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default)]
    pub protocol: HealthProtocol,
    /// HTTP only: the path to GET; any 2xx or 3xx answer is healthy.
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout")]
    pub timeout: Duration,
    /// Consecutive passes that make an instance healthy.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make an instance unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Failures during this time after start do not count.
    #[serde(default = "default_grace_period")]
    pub grace_period: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            protocol: HealthProtocol::default(),
            path: default_health_path(),
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
            grace_period: default_grace_period(),
        }
    }
}

fn default_health_path() -> String {
    "/healthz".to_string()
}
fn default_health_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_healthy_threshold() -> u32 {
    1
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_grace_period() -> Duration {
    Duration::from_secs(30)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthProtocol {
    #[default]
    Http,
    Tcp,
}

/// How many instances the tier runs and how that number follows load.
///
/// The autoscaler (`controller/src/reconcile/autoscale.rs`) evaluates every policy, takes the
/// largest recommendation, scales in only when every policy agrees, and then bounds the result:
/// scale-in by the highest recommendation of the last `scale_in_stabilization`, both directions
/// by `max_step` / `max_step_percent` per `step_period`, scale-out by `cooldown`, and always by
/// `min`/`max` (raised or lowered by an active entry of `schedules`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    pub min: u32,
    pub max: u32,
    /// A manual count (`stratactl scale`); `min <= desired <= max`. When absent the
    /// autoscaler decides, starting from `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<ScalingPolicy>,
    /// Changes of `min`/`max` at given times (cron in a time zone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScalingSchedule>,
    /// An instance that became ready less than this long ago is still warming up: it counts
    /// toward the desired count, its CPU and custom per-instance metrics are left out of
    /// averages, and while any instance warms up the tier does not scale in (as AWS does).
    #[serde(default = "default_warmup")]
    pub warmup: Duration,
    /// Minimum time between two scale-outs. 0 lets every evaluation scale out; the step limits
    /// below still pace it.
    #[serde(default = "default_cooldown")]
    pub cooldown: Duration,
    /// Scale-in uses the highest recommendation seen during this window (like HPA). When
    /// absent the window adapts to the tier's observed start-up time (see
    /// [`Scaling::scale_in_window_ms`]); a value set here is used exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_in_stabilization: Option<Duration>,
    /// At most this many instances added or removed per `step_period`.
    #[serde(default = "default_max_step")]
    pub max_step: u32,
    /// When set, a period may also change the count by this percentage of the count at the
    /// period's start, whichever of the two allows more (HPA's `selectPolicy: Max`).
    #[serde(
        default = "default_max_step_percent",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_step_percent: Option<u32>,
    #[serde(default = "default_step_period")]
    pub step_period: Duration,
}

impl Scaling {
    /// A scaling block with the given bounds and every other field at its default, as a file
    /// with only `min` and `max` would give.
    pub fn with_bounds(min: u32, max: u32) -> Scaling {
        Scaling {
            min,
            max,
            desired: None,
            policies: Vec::new(),
            schedules: Vec::new(),
            warmup: default_warmup(),
            cooldown: default_cooldown(),
            scale_in_stabilization: None,
            max_step: default_max_step(),
            max_step_percent: default_max_step_percent(),
            step_period: default_step_period(),
        }
    }
}

/// How many observed start-ups long an adaptive scale-in window is.
pub const ADAPTIVE_STABILIZATION_STARTUPS: u64 = 3;
/// The bounds of an adaptive scale-in window, and the window until a start-up has been seen.
pub const ADAPTIVE_STABILIZATION_MIN: Duration = Duration::from_secs(60);
pub const ADAPTIVE_STABILIZATION_MAX: Duration = Duration::from_secs(300);

impl Scaling {
    /// The scale-in stabilization window in force, in milliseconds, and whether it adapts.
    ///
    /// An explicit `scale_in_stabilization` is used exactly. Otherwise the window is
    /// `clamp(ADAPTIVE_STABILIZATION_STARTUPS × observed start-up, 60 s, 300 s)`, and 300 s
    /// (HPA's default) until a start-up has been observed. Why start-ups: scaling in too early
    /// costs one start-up of under-capacity when the load comes back, so the window that is
    /// worth its instance-seconds is a few start-ups long (bench/README.md, "adaptive window").
    pub fn scale_in_window_ms(&self, observed_startup_ms: Option<u64>) -> (u64, bool) {
        match self.scale_in_stabilization {
            Some(explicit) => (explicit.as_millis(), false),
            None => (adaptive_scale_in_window_ms(observed_startup_ms), true),
        }
    }
}

/// See [`Scaling::scale_in_window_ms`].
pub fn adaptive_scale_in_window_ms(observed_startup_ms: Option<u64>) -> u64 {
    let (low, high) = (
        ADAPTIVE_STABILIZATION_MIN.as_millis(),
        ADAPTIVE_STABILIZATION_MAX.as_millis(),
    );
    match observed_startup_ms {
        None => high,
        Some(startup) => startup
            .saturating_mul(ADAPTIVE_STABILIZATION_STARTUPS)
            .clamp(low, high),
    }
}

// The defaults below are the policy `strata-bench autoscale` measured (bench/README.md): react
// within seconds on the way up, wait a stabilization window on the way down. The window is not
// a fixed default: a fixed 90 s saves instance-seconds when instances start in 30 s but costs
// SLO violations once they take a minute or more to start, so an unset window adapts to the
// observed start-up (`Scaling::scale_in_window_ms`).
fn default_warmup() -> Duration {
    Duration::from_secs(0)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(0)
}
fn default_max_step() -> u32 {
    4
}
fn default_max_step_percent() -> Option<u32> {
    Some(100)
}
fn default_step_period() -> Duration {
    Duration::from_secs(15)
}

/// Default `tolerance` of a target-tracking policy.
pub const DEFAULT_TOLERANCE: f64 = 0.05;
/// Default `reaction_time` of a policy: five heartbeats of one second. `strata-bench
/// autoscale` measured 10 s against 5 s on its traces: halving it cut the seconds in SLO
/// violation by about a third (1,179 to 802 over the built-in set) at the same
/// instance-seconds (bench/README.md). The stabilization window, not the average, is what
/// keeps scale-in calm.
pub const DEFAULT_REACTION_TIME: Duration = Duration::from_secs(5);

/// One scaling policy. `type` chooses the kind (target tracking unless said otherwise); the
/// fields of the other kind are refused by validation, as the template's are for the other
/// provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScalingPolicy {
    #[serde(default, rename = "type")]
    pub policy_type: PolicyType,
    pub metric: ScalingMetric,
    /// The custom metric's name (`metric: custom` only), as pushed to
    /// `POST /v1/tiers/{name}/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Target tracking: keep the per-instance average of the metric near this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// Target tracking: no change while `|value / target - 1| <= tolerance`
    /// (default [`DEFAULT_TOLERANCE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// How many seconds of the metric a decision averages (default [`DEFAULT_REACTION_TIME`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reaction_time: Option<Duration>,
    /// Step scaling: the adjustment for each range of the metric.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepAdjustment>,
    /// Step scaling: how `steps[].change` is read (default `change_in_capacity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adjustment_type: Option<AdjustmentType>,
    /// Step scaling with `percent_change_in_capacity`: change at least this many instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_adjustment_magnitude: Option<u32>,
}

impl ScalingPolicy {
    /// A target-tracking policy on a built-in metric with default tolerance and reaction time.
    pub fn target_tracking(metric: ScalingMetric, target: f64) -> ScalingPolicy {
        ScalingPolicy {
            policy_type: PolicyType::TargetTracking,
            metric,
            name: None,
            target: Some(target),
            tolerance: None,
            reaction_time: None,
            steps: Vec::new(),
            adjustment_type: None,
            min_adjustment_magnitude: None,
        }
    }

    pub fn tolerance(&self) -> f64 {
        self.tolerance.unwrap_or(DEFAULT_TOLERANCE)
    }

    pub fn reaction_time(&self) -> Duration {
        self.reaction_time.unwrap_or(DEFAULT_REACTION_TIME)
    }

    pub fn adjustment_type(&self) -> AdjustmentType {
        self.adjustment_type.unwrap_or_default()
    }

    /// What the policy watches, for people: `cpu_utilization`, `custom:queue_depth`.
    pub fn metric_label(&self) -> String {
        match (&self.metric, &self.name) {
            (ScalingMetric::Custom, Some(name)) => format!("custom:{name}"),
            (metric, _) => metric.wire_name().to_string(),
        }
    }

    /// One line for `stratactl describe`: `cpu_utilization target 60 (±5%, over 5s)`.
    pub fn summary(&self) -> String {
        let over = self.reaction_time();
        match self.policy_type {
            PolicyType::TargetTracking => format!(
                "{} target {} (±{}%, over {over})",
                self.metric_label(),
                self.target.unwrap_or(0.0),
                self.tolerance() * 100.0
            ),
            PolicyType::Step => format!(
                "{} in {} steps, {} (over {over})",
                self.metric_label(),
                self.steps.len(),
                self.adjustment_type().wire_name()
            ),
        }
    }
}

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PolicyType {
    /// Proportional, like HPA: `ceil(instances × value / target)`.
    #[default]
    TargetTracking,
    /// Thresholds to adjustments, like AWS step scaling.
    Step,
}

/// One step of a step policy: when `lower <= value < upper` (a missing bound is unbounded),
/// apply `change`. Bounds are absolute values of the metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepAdjustment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<f64>,
    /// Instances to add (negative: remove), the count to set, or the percentage to change by,
    /// depending on the policy's `adjustment_type`.
    pub change: i32,
}

/// How a step's `change` is read (AWS's adjustment types).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdjustmentType {
    /// Add or remove this many instances.
    #[default]
    ChangeInCapacity,
    /// Set the count to this.
    ExactCapacity,
    /// Change the count by this percentage (at least `min_adjustment_magnitude` instances).
    PercentChangeInCapacity,
}

impl AdjustmentType {
    pub fn wire_name(self) -> &'static str {
        match self {
            AdjustmentType::ChangeInCapacity => "change_in_capacity",
            AdjustmentType::ExactCapacity => "exact_capacity",
            AdjustmentType::PercentChangeInCapacity => "percent_change_in_capacity",
        }
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ScalingMetric {
    /// Percent of one instance's CPU reservation, 0 to 100.
    CpuUtilization,
    /// Requests per second per instance, from the load balancer.
    RequestsPerSecond,
    /// Concurrent sessions per instance, from the load balancer.
    ActiveConnections,
    /// Average response time in milliseconds, from the load balancer.
    ResponseTimeMs,
    /// Requests queued in the load balancer per instance.
    QueueLength,
    /// A metric pushed with `POST /v1/tiers/{name}/metrics`, named by the policy's `name`:
    /// per instance values are averaged, a per-tier value is divided by the serving instances.
    Custom,
}

impl ScalingMetric {
    pub fn wire_name(self) -> &'static str {
        match self {
            ScalingMetric::CpuUtilization => "cpu_utilization",
            ScalingMetric::RequestsPerSecond => "requests_per_second",
            ScalingMetric::ActiveConnections => "active_connections",
            ScalingMetric::ResponseTimeMs => "response_time_ms",
            ScalingMetric::QueueLength => "queue_length",
            ScalingMetric::Custom => "custom",
        }
    }
}

/// A scheduled change of the bounds: from each time `cron` fires in `time_zone`, for
/// `duration`, `min` and/or `max` replace the tier's own. When several are active, the one that
/// started last wins (a later entry in the list on a tie); if the result has `min > max`, `max`
/// is raised to `min`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScalingSchedule {
    /// Five fields, `minute hour day-of-month month day-of-week`, evaluated in `time_zone`, so
    /// `0 8 * * MON-FRI` is 08:00 local time in summer and in winter. Days of the week are
    /// written as names (`MON-FRI`): cron dialects number them differently. A local time that
    /// does not exist on a given day (inside a DST gap) does not fire that day.
    pub cron: String,
    /// An IANA time zone such as `Europe/Paris` (default `UTC`).
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// How long the change lasts after each start.
    pub duration: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

fn default_time_zone() -> String {
    "UTC".to_string()
}

/// Body of `POST /v1/tiers/{name}/metrics`: one sample of a custom metric, for the whole tier
/// or, with `instance`, for one instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"metric": "queue", "value": 12.5}))]
#[serde(deny_unknown_fields)]
pub struct CustomMetricSample {
    /// 1 to 63 lowercase letters, digits or `_`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9_]{0,62}$")]
    pub metric: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<uuid::Uuid>,
}

/// How the tier is exposed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    /// Where the load balancer listens, for example `0.0.0.0:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "0.0.0.0:8080")]
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub mode: LbMode,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Weight given to every instance (1 to 256).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// HTTP only: pin clients to a server with this cookie.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// How long a removed instance keeps serving its open connections.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Duration,
    /// A new server's weight ramps up over this time (HAProxy `slowstart`); 0 turns it off.
    #[serde(default = "default_slowstart")]
    pub slowstart: Duration,
    /// HAProxy `timeout connect`: how long to wait for a server to accept.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// HAProxy `timeout client` and `timeout server`: inactivity allowed on either side.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// HTTP only: terminate TLS with this PEM file (certificate and key) on the LB host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_certificate: Option<String>,
    /// Provider ec2 only, instead of `listen`: an ELBv2 target group (target type
    /// `instance`) whose membership Strata keeps equal to the tier's pool: ready instances
    /// registered on `template.port`, leaving ones deregistered, the target group's
    /// deregistration delay being their drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        example = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067"
    )]
    pub target_group_arn: Option<String>,
}

impl Default for LoadBalancer {
    fn default() -> Self {
        LoadBalancer {
            listen: None,
            mode: LbMode::default(),
            algorithm: Algorithm::default(),
            weight: default_weight(),
            sticky_cookie: None,
            drain_timeout: default_drain_timeout(),
            slowstart: default_slowstart(),
            connect_timeout: default_connect_timeout(),
            idle_timeout: default_idle_timeout(),
            tls_certificate: None,
            target_group_arn: None,
        }
    }
}

fn default_weight() -> u32 {
    100
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_slowstart() -> Duration {
    Duration::from_secs(2)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LbMode {
    #[default]
    Http,
    Tcp,
}

/// HAProxy's balance algorithms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    Roundrobin,
    StaticRr,
    Leastconn,
    Source,
    Uri,
    Random,
    First,
}

/// Where instances may go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub spread: Spread,
    /// Only nodes carrying all these labels are eligible.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Spread {
    #[default]
    Node,
    Zone,
}

/// A tier as the controller stores and returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Tier {
    #[serde(flatten)]
    pub spec: TierSpec,
    /// Incremented when what instances are started with changes (template, health check,
    /// provider); instances of an older generation are rolled. Scaling, load balancer and
    /// placement changes take effect without a new generation.
    pub generation: u64,
    /// Unix milliseconds, stamped by the leader that proposed the creating command.
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default)]
    pub status: TierStatus,
}

impl Tier {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The Raft log index that last changed this tier.
    pub fn resource_version(&self) -> u64 {
        self.spec.resource_version.unwrap_or(0)
    }
}

/// What the control plane observes and decides about a tier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TierStatus {
    /// The instance count the control plane is converging to.
    pub desired: u32,
    /// Instances that exist (any phase before Terminated).
    pub current: u32,
    /// Instances Running and healthy.
    pub ready: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scaling: Option<ScalingDecision>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// `host:port` of every Ready LB node's frontend for this tier (for DNS round robin);
    /// derived at read time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The Raft log index of the last command that changed the tier's pool (0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pool_version: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// One decision of the autoscaler or an operator, with its inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScalingDecision {
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub reason: String,
    /// An autoscaler decision: everything it saw and concluded (per-policy values, targets
    /// and recommendations, the windows and limits that bounded it). Absent for a decision
    /// made by an operator or a spec change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<Box<ScalingInputs>>,
}

/// Everything one autoscaler evaluation saw and concluded, for events, `status.last_scaling`
/// and `stratactl describe`: the planner (`controller::reconcile::autoscale`) fills it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScalingInputs {
    pub at_ms: u64,
    /// The desired count before and after.
    pub from: u32,
    pub to: u32,
    /// Instances ready and past warm-up, and instances starting or warming up.
    pub ready: u32,
    pub warming: u32,
    /// The bounds in force, and the schedule that set them (its index in `scaling.schedules`).
    pub min: u32,
    pub max: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<usize>,
    pub policies: Vec<PolicyEvaluation>,
    /// The largest recommendation of the policies, before any window or limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<u32>,
    /// Each window or limit that changed the count on its way to `to`, in the order applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bounded_by: Vec<ScalingBound>,
    /// The scale-in stabilization window in force, and whether it adapted to the observed
    /// start-up time (`scale_in_stabilization` unset) rather than being set explicitly.
    #[serde(default)]
    pub stabilization_ms: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stabilization_adaptive: bool,
    /// The median start-up time (created to ready) of the tier's recent instances, when any
    /// has become ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_startup_ms: Option<u64>,
    /// The decision in plain words.
    pub reason: String,
}

/// One policy's part in a decision.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyEvaluation {
    /// `cpu_utilization`, `custom:queue_depth`.
    pub metric: String,
    /// The averaged value; absent when data is missing or shorter than the reaction time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    /// The count this policy asks for; absent when it abstains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<u32>,
    /// Why it asks for that count or abstains.
    pub note: String,
}

/// A window or limit that bounded a decision, with the count it allowed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ScalingBound {
    /// Scale-in held at the highest recommendation of the window.
    Stabilization { window_ms: u64, highest: u32 },
    /// This leader has not yet watched a whole stabilization window, or an instance is
    /// starting or warming up: no scale-in.
    ScaleInHeld { why: String },
    /// A scale-out within the cooldown of the previous one.
    Cooldown { remaining_ms: u64 },
    /// The period's change limit.
    StepLimit {
        period_ms: u64,
        limit: u32,
        allowed: u32,
    },
    /// `min` or `max` (possibly scheduled).
    Bounds { min: u32, max: u32 },
}

/// A Kubernetes-style condition such as `Ready` or `ScalingLimited`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Condition {
    #[serde(rename = "type")]
    pub condition_type: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    pub since_ms: u64,
}

/// Body of `POST /v1/tiers/{name}/scale`: either `{"desired": N}`, which sets the count by
/// hand and pauses the tier's autoscaler, or `{"auto": true}`, which hands the count back to
/// the autoscaler (from the count it has now). Exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"desired": 2}))]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
}

impl ScaleRequest {
    /// Set the count by hand.
    pub fn manual(desired: u32) -> ScaleRequest {
        ScaleRequest {
            desired: Some(desired),
            ..ScaleRequest::default()
        }
    }

    /// Hand the count back to the autoscaler.
    pub fn automatic() -> ScaleRequest {
        ScaleRequest {
            auto: true,
            ..ScaleRequest::default()
        }
    }
}

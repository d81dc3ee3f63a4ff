//! Validation of resources; every failure carries its field path.
//!
//! Checks run after decoding, on values that already have the right types, and they never stop
//! at the first problem: an operator fixing a file wants the whole list at once. The same
//! functions run in `stratactl apply` (before anything is sent) and in the controller (before
//! anything is proposed), so both report identical paths and messages.

use std::collections::BTreeSet;

use crate::cluster::AddMemberRequest;
use crate::duration::Duration;
use crate::path;
use crate::problem::FieldError;
use crate::schedule::{CronSchedule, ScheduleError};
use crate::tier::{
    AdjustmentType, Algorithm, CustomMetricSample, Driver, HealthCheck, LbMode, LoadBalancer,
    Placement, PolicyType, Provider, ScaleRequest, Scaling, ScalingMetric, ScalingPolicy,
    ScalingSchedule, Template, TierSpec, TIER_KIND,
};

/// The largest tier; beyond this a typo (`max: 10000`) would be taken at its word.
pub const MAX_INSTANCES: u32 = 1000;
/// Bounds of `template.cpu`, in cores: a millicore at least (as in Kubernetes), so a
/// denormal like `5e-324` that no scheduler could account for is refused.
pub const MIN_CPU: f64 = 0.001;
pub const MAX_CPU: f64 = 256.0;
/// Bounds of `template.memory_mb`.
pub const MIN_MEMORY_MB: u64 = 16;
pub const MAX_MEMORY_MB: u64 = 1_048_576;
/// Environment variables the agent sets itself; a template may not override them.
pub const RESERVED_ENV: [&str; 2] = ["PORT", "STRATA_INSTANCE_ID"];
/// EC2 tag keys with this prefix are how the controller finds its own instances again.
pub const RESERVED_TAG_PREFIX: &str = "strata:";
/// Bounds of `load_balancer.weight` (HAProxy accepts 0..=256; 0 would mean "no traffic").
pub const MAX_WEIGHT: u32 = 256;
/// Bounds of the health check thresholds.
pub const MAX_THRESHOLD: u32 = 100;
/// EC2 refuses user data beyond this many bytes.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// Size limits on what a client or an agent sends. Every one is enforced with a field path and
/// listed in the README; together they bound what a spec, a registration or a heartbeat can
/// add to the replicated state and to the leader's memory.
pub mod limits {
    /// A tier spec, encoded as JSON.
    pub const TIER_SPEC_BYTES: usize = 64 * 1024;
    /// `template.command`: arguments, and bytes per argument.
    pub const COMMAND_ARGS: usize = 256;
    pub const COMMAND_ARG_BYTES: usize = 4096;
    /// `template.env`: entries, and bytes per name and per value.
    pub const ENV_ENTRIES: usize = 128;
    pub const ENV_NAME_BYTES: usize = 256;
    pub const ENV_VALUE_BYTES: usize = 4096;
    /// File paths and the kernel command line of a qemu image, the TLS certificate path.
    pub const PATH_BYTES: usize = 4096;
    /// `template.user`: a POSIX user name.
    pub const USER_BYTES: usize = 32;
    /// EC2's own limits: 50 tags, keys of 128 and values of 256 characters.
    pub const TAGS: usize = 50;
    pub const TAG_KEY_BYTES: usize = 128;
    pub const TAG_VALUE_BYTES: usize = 256;
    /// `template.subnets`, `template.security_groups`: entries, and bytes each.
    pub const EC2_IDS: usize = 16;
    pub const EC2_ID_BYTES: usize = 64;
    /// `load_balancer.target_group_arn` (EC2's own bound on an ARN).
    pub const ARN_BYTES: usize = 512;
    /// Node labels (registration, `placement.node_labels`).
    pub const LABELS: usize = 64;
    /// `scaling.policies` and `scaling.schedules`.
    pub const POLICIES: usize = 20;
    pub const SCHEDULES: usize = 50;
    /// Short strings: health check path, policy names, cron lines, time zones, metric names,
    /// cookie names.
    pub const SHORT_BYTES: usize = 256;
    /// An instance report's `reason` and an LB tier report's `error`.
    pub const REASON_BYTES: usize = 1024;
    /// Instance reports in one heartbeat.
    pub const HEARTBEAT_INSTANCES: usize = 10_000;
    /// An LB report: tiers, servers per tier, and bytes of a server's `status`.
    pub const LB_TIERS: usize = 1000;
    pub const LB_SERVERS: usize = 1000;
    pub const LB_STATUS_BYTES: usize = 64;
    /// A registration's `agent_version`.
    pub const AGENT_VERSION_BYTES: usize = 64;
    /// A node's `roles`.
    pub const ROLES: usize = 4;
}

/// `text` cut to at most `max` bytes, on a character boundary (agents cut what they report,
/// so a long line of an instance's stderr never makes a heartbeat refused).
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Bounds of `scaling.max_step_percent`.
pub const MAX_STEP_PERCENT: u32 = 1000;
/// The longest reaction time a policy may average over; the leader's metric windows keep
/// this much history.
pub const MAX_REACTION_TIME: Duration = Duration::from_secs(900);
/// Steps in one step policy.
pub const MAX_STEPS: usize = 20;

const ONE_MINUTE: Duration = Duration::from_secs(60);
const ONE_WEEK: Duration = Duration::from_secs(7 * 86_400);
const ONE_SECOND: Duration = Duration::from_secs(1);
const ONE_HOUR: Duration = Duration::from_secs(3600);
const ONE_DAY: Duration = Duration::from_secs(86_400);
const HUNDRED_MILLIS: Duration = Duration::from_millis(100);

/// Checks a tier declaration and returns every problem found, each with its field path.
pub fn tier_spec(spec: &TierSpec) -> Result<(), Vec<FieldError>> {
    let mut report = Report::default();
    if let Some(kind) = &spec.kind {
        if kind != TIER_KIND {
            report.fail(
                "kind",
                format!("must be {TIER_KIND:?} when present, not {kind:?}"),
            );
        }
    }
    if !is_dns_label(&spec.name) {
        report.fail(
            "name",
            "must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit",
        );
    }
    scaling(&mut report, &spec.scaling);
    template(&mut report, spec.provider, &spec.template);
    health(&mut report, &spec.health);
    load_balancer(&mut report, spec.provider, &spec.load_balancer);
    placement(&mut report, &spec.placement);
    rollout(&mut report, &spec.rollout);
    let size = serde_json::to_vec(spec).map_or(0, |bytes| bytes.len());
    if size > limits::TIER_SPEC_BYTES {
        report.fail(
            "spec",
            format!(
                "the tier is {size} bytes as JSON; at most {} are allowed",
                limits::TIER_SPEC_BYTES
            ),
        );
    }
    report.finish()
}

fn rollout(report: &mut Report, rollout: &crate::tier::Rollout) {
    if rollout.max_surge == 0 && rollout.max_unavailable == 0 {
        report.fail(
            "rollout",
            "max_surge and max_unavailable cannot both be 0: a rollout could never progress",
        );
    }
    if rollout.max_surge > 100 {
        report.fail("rollout.max_surge", "must be at most 100");
    }
    if rollout.max_unavailable > 100 {
        report.fail("rollout.max_unavailable", "must be at most 100");
    }
}

/// Checks the body of `PUT /v1/tiers/{name}`: the spec itself, and that its `name` is the one
/// in the URL, since a mismatch would store the tier under a name the caller did not address.
pub fn put_tier(name_in_path: &str, spec: &TierSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = tier_spec(spec).err().unwrap_or_default();
    if spec.name != name_in_path {
        errors.insert(
            0,
            FieldError::new(
                "name",
                format!("must match the name in the URL ({name_in_path:?})"),
            ),
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Checks `POST /v1/cluster/members`: a positive id and a `host:port` address.
pub fn add_member(request: &AddMemberRequest) -> Result<(), Vec<FieldError>> {
    let mut report = Report::default();
    // Id 0 is openraft's "no node" in several places; refusing it avoids a confusing cluster.
    if request.id == 0 {
        report.fail("id", "must be at least 1");
    }
    if !is_host_port(&request.address) {
        report.fail(
            "address",
            format!(
                "must be host:port with a port from 1 to 65535 and no scheme, not {:?}",
                request.address
            ),
        );
    }
    report.finish()
}

/// Checks the shape of `POST /v1/tiers/{name}/scale`: a count set by hand (`desired`) or the
/// count handed back to the autoscaler (`auto: true`), exactly one of them.
pub fn scale_request(request: &ScaleRequest) -> Result<(), Vec<FieldError>> {
    let mut report = Report::default();
    match (request.desired, request.auto) {
        (Some(_), true) => report.fail(
            "auto",
            "give either desired (set the count by hand) or auto: true (hand it back to the autoscaler), not both",
        ),
        (None, false) => report.fail(
            "desired",
            "is required, unless auto is true (hand the count back to the autoscaler)",
        ),
        _ => {}
    }
    report.finish()
}

/// Checks `POST /v1/tiers/{name}/scale` against the tier's current scaling bounds.
pub fn scale(request: &ScaleRequest, current: &Scaling) -> Result<(), Vec<FieldError>> {
    scale_request(request)?;
    let mut report = Report::default();
    let Some(desired) = request.desired else {
        return Ok(());
    };
    if desired < current.min || desired > current.max {
        report.fail(
            "desired",
            format!(
                "must be between scaling.min ({}) and scaling.max ({}) of the tier",
                current.min, current.max
            ),
        );
    }
    report.finish()
}

/// True for RFC 1123 labels.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// True for a DNS name made of labels separated by dots, at most 253 characters.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// True for a node label key: `name` or `prefix/name`, where the prefix is a DNS subdomain
/// (`example.com/zone`) and the name a label name (see [`is_label_value`]).
pub fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_value(name),
        None => is_label_value(key),
    }
}

/// True for a node label value (and the name part of a key): 1 to 63 letters, digits, `-`, `_`
/// or `.`, starting and ending with a letter or digit, as in Kubernetes.
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// True for `host:port` with a port from 1 to 65535, where host is an IPv4 address, a bracketed
/// IPv6 address (`[::1]:7001`) or a DNS name. A scheme (`http://`) is refused: members are
/// addressed by the controllers, which choose it themselves.
pub fn is_host_port(address: &str) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|port| port != 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        host.parse::<std::net::Ipv4Addr>().is_ok()
    } else {
        is_dns_subdomain(&host.to_ascii_lowercase())
    };
    port_ok && host_ok
}

/// True for a POSIX-portable user name as `useradd` accepts it by default: lowercase letters,
/// digits, `_` and `-`, not starting with a digit or `-`, at most 32 bytes.
pub fn is_user_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= limits::USER_BYTES
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
        && bytes
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || *b == b'_')
}

/// True for an RFC 6265 cookie name: an HTTP token, that is visible ASCII without separators.
pub fn is_cookie_token(name: &str) -> bool {
    const SEPARATORS: &[u8] = b"()<>@,;:\\\"/[]?={} \t";
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !SEPARATORS.contains(&b))
}

/// Collects failures so that every check runs and the caller gets the complete list.
#[derive(Default)]
struct Report {
    errors: Vec<FieldError>,
}

impl Report {
    fn fail(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }

    fn at_most(&mut self, path: &str, value: Duration, limit: Duration) {
        if value > limit {
            self.fail(path, format!("must be at most {limit}, not {value}"));
        }
    }

    fn at_least(&mut self, path: &str, value: Duration, limit: Duration) {
        if value < limit {
            self.fail(path, format!("must be at least {limit}, not {value}"));
        }
    }

    fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }
}

fn scaling(report: &mut Report, scaling: &Scaling) {
    if scaling.policies.len() > limits::POLICIES {
        report.fail(
            "scaling.policies",
            format!("at most {} policies", limits::POLICIES),
        );
    }
    if scaling.schedules.len() > limits::SCHEDULES {
        report.fail(
            "scaling.schedules",
            format!("at most {} schedules", limits::SCHEDULES),
        );
    }
    if scaling.max < 1 {
        report.fail("scaling.max", "must be at least 1");
    }
    if scaling.max > MAX_INSTANCES {
        report.fail("scaling.max", format!("must be at most {MAX_INSTANCES}"));
    }
    if scaling.min > scaling.max {
        report.fail(
            "scaling.min",
            format!("must not exceed scaling.max ({})", scaling.max),
        );
    }
    if let Some(desired) = scaling.desired {
        if desired < scaling.min || desired > scaling.max {
            report.fail(
                "scaling.desired",
                format!(
                    "must be between scaling.min ({}) and scaling.max ({})",
                    scaling.min, scaling.max
                ),
            );
        }
    }
    if scaling.max_step < 1 {
        report.fail("scaling.max_step", "must be at least 1");
    }
    report.at_most("scaling.cooldown", scaling.cooldown, ONE_DAY);
    if let Some(window) = scaling.scale_in_stabilization {
        report.at_most("scaling.scale_in_stabilization", window, ONE_DAY);
    }
    report.at_least("scaling.step_period", scaling.step_period, ONE_SECOND);
    report.at_most("scaling.step_period", scaling.step_period, ONE_DAY);

    if let Some(percent) = scaling.max_step_percent {
        if !(1..=MAX_STEP_PERCENT).contains(&percent) {
            report.fail(
                "scaling.max_step_percent",
                format!("must be between 1 and {MAX_STEP_PERCENT}"),
            );
        }
    }
    report.at_most("scaling.warmup", scaling.warmup, ONE_HOUR);

    let mut seen = BTreeSet::new();
    for (position, policy) in scaling.policies.iter().enumerate() {
        let policy_path = path::index("scaling.policies", position);
        scaling_policy(report, &policy_path, policy);
        // Two policies of one kind on one metric would leave the autoscaler to pick one
        // silently.
        if !seen.insert((policy.policy_type, policy.metric_label())) {
            report.fail(
                path::field(&policy_path, "metric"),
                "appears in an earlier policy of the same type; give each metric one target",
            );
        }
    }
    for (position, schedule) in scaling.schedules.iter().enumerate() {
        scaling_schedule(
            report,
            &path::index("scaling.schedules", position),
            schedule,
            scaling,
        );
    }
}

fn scaling_policy(report: &mut Report, policy_path: &str, policy: &ScalingPolicy) {
    let field = |name: &str| path::field(policy_path, name);
    match (&policy.metric, &policy.name) {
        (ScalingMetric::Custom, None) => {
            report.fail(field("name"), "is required for metric custom");
        }
        (ScalingMetric::Custom, Some(name)) if !is_metric_name(name) => report.fail(
            field("name"),
            format!("must be 1-63 lowercase letters, digits or '_', starting with a letter, not {name:?}"),
        ),
        (ScalingMetric::Custom, Some(_)) => {}
        (_, Some(_)) => report.fail(field("name"), "only applies to metric custom"),
        (_, None) => {}
    }
    if let Some(reaction) = policy.reaction_time {
        report.at_least(&field("reaction_time"), reaction, ONE_SECOND);
        report.at_most(&field("reaction_time"), reaction, MAX_REACTION_TIME);
    }
    const TARGET_ONLY: &str = "only applies to type target_tracking";
    const STEP_ONLY: &str = "only applies to type step";
    match policy.policy_type {
        PolicyType::TargetTracking => {
            match policy.target {
                None => report.fail(field("target"), "is required for type target_tracking"),
                Some(target) if !target.is_finite() || target <= 0.0 => {
                    report.fail(field("target"), "must be a finite number greater than 0")
                }
                Some(target)
                    if policy.metric == ScalingMetric::CpuUtilization && target > 100.0 =>
                {
                    report.fail(
                        field("target"),
                        "must be at most 100: cpu_utilization is a percentage of the reservation",
                    )
                }
                Some(_) => {}
            }
            if let Some(tolerance) = policy.tolerance {
                if !tolerance.is_finite() || !(0.0..1.0).contains(&tolerance) {
                    report.fail(
                        field("tolerance"),
                        "must be a finite number from 0 up to (not including) 1",
                    );
                }
            }
            if !policy.steps.is_empty() {
                report.fail(field("steps"), STEP_ONLY);
            }
            if policy.adjustment_type.is_some() {
                report.fail(field("adjustment_type"), STEP_ONLY);
            }
            if policy.min_adjustment_magnitude.is_some() {
                report.fail(field("min_adjustment_magnitude"), STEP_ONLY);
            }
        }
        PolicyType::Step => {
            if policy.target.is_some() {
                report.fail(field("target"), TARGET_ONLY);
            }
            if policy.tolerance.is_some() {
                report.fail(field("tolerance"), TARGET_ONLY);
            }
            step_adjustments(report, policy_path, policy);
        }
    }
}

fn step_adjustments(report: &mut Report, policy_path: &str, policy: &ScalingPolicy) {
    let steps_path = path::field(policy_path, "steps");
    if policy.steps.is_empty() {
        report.fail(
            steps_path.clone(),
            "is required for type step: at least one step",
        );
    }
    if policy.steps.len() > MAX_STEPS {
        report.fail(steps_path.clone(), format!("at most {MAX_STEPS} steps"));
    }
    let adjustment = policy.adjustment_type();
    if policy.min_adjustment_magnitude.is_some()
        && adjustment != AdjustmentType::PercentChangeInCapacity
    {
        report.fail(
            path::field(policy_path, "min_adjustment_magnitude"),
            "only applies to adjustment_type percent_change_in_capacity",
        );
    }
    let mut ranges = Vec::new();
    for (position, step) in policy.steps.iter().enumerate() {
        let step_path = path::index(&steps_path, position);
        let mut bounds_ok = true;
        for (name, bound) in [("lower", step.lower), ("upper", step.upper)] {
            if bound.is_some_and(|value| !value.is_finite()) {
                report.fail(path::field(&step_path, name), "must be a finite number");
                bounds_ok = false;
            }
        }
        let lower = step.lower.unwrap_or(f64::NEG_INFINITY);
        let upper = step.upper.unwrap_or(f64::INFINITY);
        if bounds_ok && lower >= upper {
            report.fail(
                path::field(&step_path, "upper"),
                format!("must be greater than lower ({lower})"),
            );
            bounds_ok = false;
        }
        let change_path = path::field(&step_path, "change");
        match adjustment {
            AdjustmentType::ExactCapacity if step.change < 0 => {
                report.fail(change_path, "must be at least 0 for exact_capacity");
            }
            AdjustmentType::PercentChangeInCapacity if step.change < -100 => {
                report.fail(change_path, "must be at least -100 percent");
            }
            _ if step.change.unsigned_abs() > MAX_INSTANCES * 10 => {
                report.fail(change_path, "is implausibly large");
            }
            _ => {}
        }
        if bounds_ok {
            // Bounds are `lower <= value < upper`, so ranges that only touch do not overlap.
            if let Some(&(other, _, _)) = ranges
                .iter()
                .find(|&&(_, other_lower, other_upper)| lower < other_upper && other_lower < upper)
            {
                report.fail(
                    step_path.clone(),
                    format!("overlaps steps[{other}]: a value would match both"),
                );
            }
            ranges.push((position, lower, upper));
        }
    }
}

fn scaling_schedule(
    report: &mut Report,
    schedule_path: &str,
    schedule: &ScalingSchedule,
    scaling: &Scaling,
) {
    let field = |name: &str| path::field(schedule_path, name);
    match CronSchedule::parse(&schedule.cron, &schedule.time_zone) {
        Ok(_) => {}
        Err(ScheduleError::Cron(message)) => report.fail(field("cron"), message),
        Err(ScheduleError::TimeZone(message)) => report.fail(field("time_zone"), message),
    }
    report.at_least(&field("duration"), schedule.duration, ONE_MINUTE);
    report.at_most(&field("duration"), schedule.duration, ONE_WEEK);
    if schedule.min.is_none() && schedule.max.is_none() {
        report.fail(schedule_path.to_string(), "must set min, max or both");
    }
    let max = schedule.max.unwrap_or(scaling.max);
    if let Some(min) = schedule.min {
        if min > max {
            report.fail(
                field("min"),
                format!("must not exceed the max it runs with ({max})"),
            );
        }
    }
    if let Some(max) = schedule.max {
        if !(1..=MAX_INSTANCES).contains(&max) {
            report.fail(
                field("max"),
                format!("must be between 1 and {MAX_INSTANCES}"),
            );
        }
    }
}

/// A custom metric name: `[a-z][a-z0-9_]*`, at most 63 characters.
pub fn is_metric_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

/// Checks the body of `POST /v1/tiers/{name}/metrics`.
pub fn custom_metric(sample: &CustomMetricSample) -> Result<(), Vec<FieldError>> {
    let mut report = Report::default();
    if !is_metric_name(&sample.metric) {
        report.fail(
            "metric",
            "must be 1-63 lowercase letters, digits or '_', starting with a letter",
        );
    }
    if !sample.value.is_finite() {
        report.fail("value", "must be a finite number");
    }
    report.finish()
}

fn template(report: &mut Report, provider: Provider, template: &Template) {
    if !template.cpu.is_finite() || template.cpu < MIN_CPU || template.cpu > MAX_CPU {
        report.fail(
            "template.cpu",
            format!("must be at least {MIN_CPU} and at most {MAX_CPU} cores"),
        );
    }
    if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&template.memory_mb) {
        report.fail(
            "template.memory_mb",
            format!("must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}"),
        );
    }
    if template.port == Some(0) {
        report.fail("template.port", "must be between 1 and 65535");
    }
    if template.env.len() > limits::ENV_ENTRIES {
        report.fail(
            "template.env",
            format!("at most {} variables", limits::ENV_ENTRIES),
        );
    }
    for (name, value) in &template.env {
        let entry_path = path::key("template.env", name);
        if value.contains('\0') {
            report.fail(
                entry_path.clone(),
                "must not contain a NUL byte (no program could receive it)",
            );
        } else if value.len() > limits::ENV_VALUE_BYTES {
            report.fail(
                entry_path.clone(),
                format!("must be at most {} bytes", limits::ENV_VALUE_BYTES),
            );
        }
        if name.len() > limits::ENV_NAME_BYTES {
            report.fail(
                entry_path,
                format!("the name must be at most {} bytes", limits::ENV_NAME_BYTES),
            );
        } else if !path::is_identifier(name) {
            report.fail(
                entry_path,
                "is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            );
        } else if RESERVED_ENV.contains(&name.as_str()) {
            report.fail(
                entry_path,
                "is reserved: the agent sets it for every instance",
            );
        }
    }
    match provider {
        Provider::Local => local_template(report, template),
        Provider::Ec2 => ec2_template(report, template),
    }
}

fn local_template(report: &mut Report, template: &Template) {
    const EC2_ONLY: &str = "only applies to provider ec2";
    if template.ami.is_some() {
        report.fail("template.ami", EC2_ONLY);
    }
    if template.instance_type.is_some() {
        report.fail("template.instance_type", EC2_ONLY);
    }
    if !template.subnets.is_empty() {
        report.fail("template.subnets", EC2_ONLY);
    }
    if !template.security_groups.is_empty() {
        report.fail("template.security_groups", EC2_ONLY);
    }
    if template.user_data.is_some() {
        report.fail("template.user_data", EC2_ONLY);
    }
    if template.key_name.is_some() {
        report.fail("template.key_name", EC2_ONLY);
    }
    if template.iam_instance_profile.is_some() {
        report.fail("template.iam_instance_profile", EC2_ONLY);
    }
    if !template.tags.is_empty() {
        report.fail("template.tags", EC2_ONLY);
    }

    match template.driver {
        None => report.fail(
            "template.driver",
            "is required for provider local: process or qemu",
        ),
        Some(Driver::Process) => {
            if template.command.is_empty() {
                report.fail("template.command", "is required for driver process");
            }
            if template.command.len() > limits::COMMAND_ARGS {
                report.fail(
                    "template.command",
                    format!("at most {} arguments", limits::COMMAND_ARGS),
                );
            }
            for (position, argument) in template.command.iter().enumerate() {
                let argument_path = path::index("template.command", position);
                if argument.is_empty() {
                    report.fail(argument_path, "must not be empty");
                } else if argument.contains('\0') {
                    report.fail(
                        argument_path,
                        "must not contain a NUL byte (no program could receive it)",
                    );
                } else if argument.len() > limits::COMMAND_ARG_BYTES {
                    report.fail(
                        argument_path,
                        format!("must be at most {} bytes", limits::COMMAND_ARG_BYTES),
                    );
                }
            }
            if let Some(user) = &template.user {
                if !is_user_name(user) {
                    report.fail(
                        "template.user",
                        format!(
                            "must be a user name: 1-{} lowercase letters, digits, '_' or '-', not starting with a digit or '-'",
                            limits::USER_BYTES
                        ),
                    );
                }
            }
            if template.image.is_some() {
                report.fail("template.image", "only applies to driver qemu");
            }
        }
        Some(Driver::Qemu) => {
            match &template.image {
                None => report.fail("template.image", "is required for driver qemu"),
                Some(image) => {
                    if image.kernel.trim().is_empty() {
                        report.fail("template.image.kernel", "must not be empty");
                    }
                    if image.initrd.trim().is_empty() {
                        report.fail("template.image.initrd", "must not be empty");
                    }
                    for (field, value) in [
                        ("template.image.kernel", Some(&image.kernel)),
                        ("template.image.initrd", Some(&image.initrd)),
                        ("template.image.append", image.append.as_ref()),
                    ] {
                        let Some(value) = value else { continue };
                        if value.contains('\0') {
                            report.fail(field, "must not contain a NUL byte");
                        } else if value.len() > limits::PATH_BYTES {
                            report.fail(
                                field,
                                format!("must be at most {} bytes", limits::PATH_BYTES),
                            );
                        }
                    }
                }
            }
            if template.user.is_some() {
                report.fail(
                    "template.user",
                    "only applies to driver process (qemu runs as the agent's user)",
                );
            }
            if template.port.is_none() {
                report.fail(
                    "template.port",
                    "is required for driver qemu: the guest port to forward",
                );
            }
            if !template.command.is_empty() {
                report.fail("template.command", "only applies to driver process");
            }
        }
    }
}

fn ec2_template(report: &mut Report, template: &Template) {
    const LOCAL_ONLY: &str = "only applies to provider local";
    if template.driver.is_some() {
        report.fail("template.driver", LOCAL_ONLY);
    }
    if !template.command.is_empty() {
        report.fail("template.command", LOCAL_ONLY);
    }
    if template.image.is_some() {
        report.fail("template.image", LOCAL_ONLY);
    }
    // An EC2 instance has no agent to hand it environment variables; silently dropping them
    // would be worse than refusing them.
    if !template.env.is_empty() {
        report.fail(
            "template.env",
            "only applies to provider local; configure EC2 instances through user_data",
        );
    }
    match &template.ami {
        None => report.fail("template.ami", "is required for provider ec2"),
        Some(ami) if !is_ami_id(ami) => report.fail(
            "template.ami",
            format!("must look like ami-0123456789abcdef0, not {ami:?}"),
        ),
        Some(_) => {}
    }
    match &template.instance_type {
        None => report.fail("template.instance_type", "is required for provider ec2"),
        Some(instance_type) if !is_instance_type(instance_type) => report.fail(
            "template.instance_type",
            format!("must look like t3.micro, not {instance_type:?}"),
        ),
        Some(_) => {}
    }
    if template.port.is_none() {
        report.fail(
            "template.port",
            "is required for provider ec2: the port the workload listens on",
        );
    }
    if template.user.is_some() {
        report.fail("template.user", LOCAL_ONLY);
    }
    for (field, list) in [
        ("template.subnets", &template.subnets),
        ("template.security_groups", &template.security_groups),
    ] {
        if list.len() > limits::EC2_IDS {
            report.fail(field, format!("at most {} entries", limits::EC2_IDS));
        }
        for (position, id) in list.iter().enumerate() {
            if id.len() > limits::EC2_ID_BYTES {
                report.fail(
                    path::index(field, position),
                    format!("must be at most {} bytes", limits::EC2_ID_BYTES),
                );
            }
        }
    }
    if template.tags.len() > limits::TAGS {
        report.fail("template.tags", format!("at most {} tags", limits::TAGS));
    }
    if template.subnets.is_empty() {
        report.fail(
            "template.subnets",
            "needs at least one subnet (several, in different availability zones, spread the instances)",
        );
    }
    for (position, subnet) in template.subnets.iter().enumerate() {
        if subnet.trim().is_empty() {
            report.fail(
                path::index("template.subnets", position),
                "must not be empty",
            );
        }
    }
    for (position, group) in template.security_groups.iter().enumerate() {
        if group.trim().is_empty() {
            report.fail(
                path::index("template.security_groups", position),
                "must not be empty",
            );
        }
    }
    if template
        .user_data
        .as_ref()
        .is_some_and(|data| data.len() > MAX_USER_DATA_BYTES)
    {
        report.fail(
            "template.user_data",
            format!("must be at most {MAX_USER_DATA_BYTES} bytes"),
        );
    }
    for (key, value) in &template.tags {
        let tag_path = path::key("template.tags", key);
        if key.is_empty() || key.chars().count() > 128 {
            report.fail(tag_path, "tag keys must have 1 to 128 characters");
        } else if key.starts_with(RESERVED_TAG_PREFIX) || key.starts_with("aws:") {
            report.fail(
                tag_path,
                "tag keys starting with strata: or aws: are reserved",
            );
        } else if value.chars().count() > 256 {
            report.fail(tag_path, "tag values must have at most 256 characters");
        }
    }
}

/// `ami-` followed by letters and digits (EC2 uses 8 or 17 hex digits; emulators vary).
fn is_ami_id(ami: &str) -> bool {
    ami.strip_prefix("ami-").is_some_and(|rest| {
        !rest.is_empty() && rest.len() <= 64 && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// `arn:PARTITION:elasticloadbalancing:REGION:ACCOUNT:targetgroup/NAME/ID`, the shape of
/// https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/API_TargetGroup.html
/// ARNs, printable ASCII only.
fn is_target_group_arn(arn: &str) -> bool {
    if arn.len() > limits::ARN_BYTES || !arn.bytes().all(|b| b.is_ascii_graphic()) {
        return false;
    }
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [scheme, partition, service, region, account, resource] = parts.as_slice() else {
        return false;
    };
    let Some(rest) = resource.strip_prefix("targetgroup/") else {
        return false;
    };
    *scheme == "arn"
        && partition.starts_with("aws")
        && *service == "elasticloadbalancing"
        && !region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && rest
            .split_once('/')
            .is_some_and(|(name, id)| !name.is_empty() && !id.is_empty() && !id.contains('/'))
}

/// `family.size`, such as `t3.micro` or `m7g.2xlarge`.
fn is_instance_type(instance_type: &str) -> bool {
    let part_ok = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    instance_type
        .split_once('.')
        .is_some_and(|(family, size)| part_ok(family) && part_ok(size))
}

fn health(report: &mut Report, health: &HealthCheck) {
    if health.path.len() > limits::SHORT_BYTES {
        report.fail(
            "health.path",
            format!("must be at most {} bytes", limits::SHORT_BYTES),
        );
    } else if !health.path.starts_with('/') {
        report.fail("health.path", "must start with '/'");
    } else if health
        .path
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        report.fail(
            "health.path",
            "must not contain spaces or control characters",
        );
    }
    report.at_least("health.interval", health.interval, HUNDRED_MILLIS);
    report.at_most("health.interval", health.interval, ONE_HOUR);
    report.at_least("health.timeout", health.timeout, HUNDRED_MILLIS);
    report.at_most("health.timeout", health.timeout, ONE_HOUR);
    // A probe still running when the next one starts would pile up probes on a slow instance.
    if health.timeout > health.interval {
        report.fail(
            "health.timeout",
            format!("must not exceed health.interval ({})", health.interval),
        );
    }
    for (field, threshold) in [
        ("health.healthy_threshold", health.healthy_threshold),
        ("health.unhealthy_threshold", health.unhealthy_threshold),
    ] {
        if !(1..=MAX_THRESHOLD).contains(&threshold) {
            report.fail(field, format!("must be between 1 and {MAX_THRESHOLD}"));
        }
    }
    report.at_most("health.grace_period", health.grace_period, ONE_HOUR);
}

fn load_balancer(report: &mut Report, provider: Provider, balancer: &LoadBalancer) {
    if let Some(arn) = &balancer.target_group_arn {
        if provider != Provider::Ec2 {
            report.fail(
                "load_balancer.target_group_arn",
                "only applies to provider ec2: a target group's targets are EC2 instances",
            );
        } else if balancer.listen.is_some() {
            report.fail(
                "load_balancer.target_group_arn",
                "a tier is served by HAProxy (listen) or by an ELBv2 target group, not both",
            );
        } else if !is_target_group_arn(arn) {
            report.fail(
                "load_balancer.target_group_arn",
                format!(
                    "must look like arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067 (at most {} bytes), not {:?}",
                    limits::ARN_BYTES,
                    truncated(arn, 80)
                ),
            );
        }
        for (field, set) in [
            (
                "load_balancer.sticky_cookie",
                balancer.sticky_cookie.is_some(),
            ),
            (
                "load_balancer.tls_certificate",
                balancer.tls_certificate.is_some(),
            ),
        ] {
            if set {
                report.fail(
                    field,
                    "only applies to HAProxy (listen); set it on the target group or its load balancer",
                );
            }
        }
    }
    if let Some(listen) = balancer.listen {
        if listen.port() == 0 {
            report.fail(
                "load_balancer.listen",
                "must name a port: clients need a fixed one to connect to",
            );
        }
    }
    if let Some(cookie) = &balancer.sticky_cookie {
        if balancer.mode != LbMode::Http {
            report.fail(
                "load_balancer.sticky_cookie",
                "only applies to mode http: a tcp balancer never sees cookies",
            );
        } else if cookie.len() > limits::SHORT_BYTES {
            report.fail(
                "load_balancer.sticky_cookie",
                format!("must be at most {} bytes", limits::SHORT_BYTES),
            );
        } else if !is_cookie_token(cookie) {
            report.fail(
                "load_balancer.sticky_cookie",
                format!("must be a cookie name (visible ASCII without separators), not {cookie:?}"),
            );
        }
    }
    if balancer.algorithm == Algorithm::Uri && balancer.mode != LbMode::Http {
        report.fail(
            "load_balancer.algorithm",
            "uri only applies to mode http: a tcp balancer never sees the request URI",
        );
    }
    if !(1..=MAX_WEIGHT).contains(&balancer.weight) {
        report.fail(
            "load_balancer.weight",
            format!("must be between 1 and {MAX_WEIGHT}"),
        );
    }
    report.at_most(
        "load_balancer.drain_timeout",
        balancer.drain_timeout,
        ONE_HOUR,
    );
    report.at_most("load_balancer.slowstart", balancer.slowstart, ONE_HOUR);
    report.at_least(
        "load_balancer.connect_timeout",
        balancer.connect_timeout,
        Duration::from_millis(1),
    );
    report.at_most(
        "load_balancer.connect_timeout",
        balancer.connect_timeout,
        ONE_HOUR,
    );
    report.at_least(
        "load_balancer.idle_timeout",
        balancer.idle_timeout,
        Duration::from_millis(1),
    );
    report.at_most(
        "load_balancer.idle_timeout",
        balancer.idle_timeout,
        ONE_HOUR,
    );
    if let Some(certificate) = &balancer.tls_certificate {
        if balancer.mode != LbMode::Http {
            report.fail(
                "load_balancer.tls_certificate",
                "only applies to mode http: a tcp balancer passes TLS through untouched",
            );
        } else if !certificate.starts_with('/')
            || certificate.len() > 4096
            || certificate
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            report.fail(
                "load_balancer.tls_certificate",
                "must be an absolute path on the load-balancer hosts, without spaces or control characters",
            );
        }
    }
}

fn placement(report: &mut Report, placement: &Placement) {
    if placement.node_labels.len() > limits::LABELS {
        report.fail(
            "placement.node_labels",
            format!("at most {} labels", limits::LABELS),
        );
    }
    for (key, value) in &placement.node_labels {
        let entry_path = path::key("placement.node_labels", key);
        if !is_label_key(key) {
            report.fail(
                entry_path.clone(),
                "key must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, optionally after a DNS prefix and '/' (example.com/zone)",
            );
        }
        if !is_label_value(value) {
            report.fail(
                entry_path,
                format!("value {value:?} must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"),
            );
        }
    }
}

#[cfg(test)]
mod tests;

/// Checks an agent's registration: a DNS-label node id, an IP address, a positive capacity and
/// well-formed labels.
pub fn register(request: &crate::node::RegisterRequest) -> Result<(), Vec<FieldError>> {
    let mut report = Report::default();
    if !is_dns_label(&request.node_id) {
        report.fail(
            "node_id",
            "must be a DNS label (lowercase letters, digits, '-')",
        );
    }
    if request.address.parse::<std::net::IpAddr>().is_err() {
        report.fail("address", "must be an IP address");
    }
    if !(request.capacity.cpu.is_finite()
        && request.capacity.cpu > 0.0
        && request.capacity.cpu <= 4096.0)
    {
        report.fail(
            "capacity.cpu",
            "must be a number of cores above 0 and at most 4096",
        );
    }
    if request.capacity.memory_mb == 0 {
        report.fail("capacity.memory_mb", "must be above 0");
    }
    if let Some(zone) = &request.zone {
        if !is_label_value(zone) || zone.is_empty() {
            report.fail(
                "zone",
                "must be a label value (letters, digits, '-', '_', '.')",
            );
        }
    }
    if request.labels.len() > limits::LABELS {
        report.fail("labels", format!("at most {} labels", limits::LABELS));
    }
    if request.roles.len() > limits::ROLES {
        report.fail("roles", format!("at most {} roles", limits::ROLES));
    }
    for (key, value) in &request.labels {
        if !is_label_key(key) {
            report.fail(format!("labels.{key}"), "is not a valid label key");
        } else if !is_label_value(value) {
            report.fail(format!("labels.{key}"), "is not a valid label value");
        }
    }
    if request.agent_version.len() > limits::AGENT_VERSION_BYTES {
        report.fail(
            "agent_version",
            format!("must be at most {} bytes", limits::AGENT_VERSION_BYTES),
        );
    }
    report.finish()
}

/// Checks a heartbeat: a DNS-label node id and finite, non-negative figures.
pub fn heartbeat(request: &crate::node::HeartbeatRequest) -> Result<(), Vec<FieldError>> {
    let mut report = Report::default();
    if !is_dns_label(&request.node_id) {
        report.fail(
            "node_id",
            "must be a DNS label (lowercase letters, digits, '-')",
        );
    }
    let metrics = &request.metrics;
    for (path, value) in [
        ("metrics.cpu_percent", metrics.cpu_percent),
        ("metrics.load1", metrics.load1),
        ("metrics.load5", metrics.load5),
        ("metrics.load15", metrics.load15),
    ] {
        if !value.is_finite() || value < 0.0 {
            report.fail(path, "must be a finite number, at least 0");
        }
    }
    if request.instances.len() > limits::HEARTBEAT_INSTANCES {
        report.fail(
            "instances",
            format!(
                "at most {} instances per heartbeat",
                limits::HEARTBEAT_INSTANCES
            ),
        );
    }
    for (index, instance) in request.instances.iter().enumerate() {
        if !instance.cpu_percent.is_finite() || instance.cpu_percent < 0.0 {
            report.fail(
                format!("instances[{index}].cpu_percent"),
                "must be a finite number, at least 0",
            );
        }
        if instance
            .reason
            .as_ref()
            .is_some_and(|reason| reason.len() > limits::REASON_BYTES)
        {
            report.fail(
                format!("instances[{index}].reason"),
                format!("must be at most {} bytes", limits::REASON_BYTES),
            );
        }
    }
    if let Some(lb) = &request.lb {
        if lb.tiers.len() > limits::LB_TIERS {
            report.fail("lb.tiers", format!("at most {} tiers", limits::LB_TIERS));
        }
        for (index, tier) in lb.tiers.iter().enumerate() {
            let tier_path = format!("lb.tiers[{index}]");
            if !is_dns_label(&tier.tier) {
                report.fail(format!("{tier_path}.tier"), "must be a tier name");
            }
            if tier
                .error
                .as_ref()
                .is_some_and(|error| error.len() > limits::REASON_BYTES)
            {
                report.fail(
                    format!("{tier_path}.error"),
                    format!("must be at most {} bytes", limits::REASON_BYTES),
                );
            }
            if tier.servers.len() > limits::LB_SERVERS {
                report.fail(
                    format!("{tier_path}.servers"),
                    format!("at most {} servers", limits::LB_SERVERS),
                );
            }
            for (position, server) in tier.servers.iter().enumerate() {
                if server.status.len() > limits::LB_STATUS_BYTES {
                    report.fail(
                        format!("{tier_path}.servers[{position}].status"),
                        format!("must be at most {} bytes", limits::LB_STATUS_BYTES),
                    );
                }
            }
        }
    }
    report.finish()
}

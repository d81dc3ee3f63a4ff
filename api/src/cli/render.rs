//! Text for people: aligned tables, `describe` pages and error lists. Everything here is a pure
//! function of its arguments (the current time included) so tests can pin the exact output.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cluster::ClusterStatus;
use crate::duration::Duration;
use crate::node::{Event, Instance, Node};
use crate::pool::{BalancerView, LbStats, PoolView};
use crate::problem::FieldError;
use crate::tier::{HealthProtocol, Provider, ScalingBound, ScalingInputs, Tier};

/// Milliseconds since the Unix epoch, the unit of every timestamp in the API.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Columns padded to their widest cell and separated by three spaces, like kubectl.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (column, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(column) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut text = String::new();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                let width = widths.get(column).copied().unwrap_or(0);
                let _ = write!(line, "{cell:<width$}   ");
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// NAME PROVIDER DESIRED CURRENT READY MIN MAX VERSION AGE.
pub fn tier_table(tiers: &[Tier], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = tiers
        .iter()
        .map(|tier| {
            vec![
                tier.name().to_string(),
                provider_label(tier),
                tier.status.desired.to_string(),
                tier.status.current.to_string(),
                tier.status.ready.to_string(),
                tier.spec.scaling.min.to_string(),
                tier.spec.scaling.max.to_string(),
                tier.resource_version().to_string(),
                age(tier.created_at_ms, now_ms),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "PROVIDER", "DESIRED", "CURRENT", "READY", "MIN", "MAX", "VERSION", "AGE",
        ],
        &rows,
    )
}

/// `local/process`, `local/qemu` or `ec2`: the provider and, for local tiers, the driver.
fn provider_label(tier: &Tier) -> String {
    match (tier.spec.provider, tier.spec.template.driver) {
        (Provider::Local, Some(driver)) => format!("local/{}", wire_name(&driver)),
        (provider, _) => wire_name(&provider),
    }
}

/// The spelling of an enum value in files and JSON (`cpu_utilization`, `static-rr`).
fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_string(),
    }
}

/// Compact elapsed time as kubectl prints it: `45s`, `12m`, `5h`, `3d`.
pub fn age(since_ms: u64, now_ms: u64) -> String {
    if since_ms == 0 {
        return "<unknown>".to_string();
    }
    let seconds = now_ms.saturating_sub(since_ms) / 1000;
    match seconds {
        0..120 => format!("{seconds}s"),
        120..7_200 => format!("{}m", seconds / 60),
        7_200..172_800 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

fn timestamp(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        return "<unknown>".to_string();
    }
    let at = UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
    format!(
        "{} ({} ago)",
        humantime::format_rfc3339_seconds(at),
        age(at_ms, now_ms)
    )
}

/// Label/value lines with the values aligned, as in `kubectl describe`.
struct Page {
    lines: Vec<(usize, String, String)>,
}

impl Page {
    fn line(&mut self, indent: usize, label: &str, value: impl Into<String>) {
        self.lines.push((indent, label.to_string(), value.into()));
    }

    fn render(&self) -> String {
        let width = self
            .lines
            .iter()
            .filter(|(_, _, value)| !value.is_empty())
            .map(|(indent, label, _)| indent + label.chars().count() + 1)
            .max()
            .unwrap_or(0);
        let mut text = String::new();
        for (indent, label, value) in &self.lines {
            let key = format!("{:indent$}{label}:", "");
            if value.is_empty() {
                let _ = writeln!(text, "{key}");
            } else {
                let _ = writeln!(text, "{key:<width$}  {value}");
            }
        }
        text
    }
}

/// What `describe` shows besides the object itself. `None` leaves a section out: the
/// controller did not offer it (an older one without the route).
#[derive(Clone, Copy, Debug, Default)]
pub struct Related<'a> {
    pub instances: Option<&'a [Instance]>,
    pub events: Option<&'a [Event]>,
    /// The tier's pool with what its load balancers report.
    pub pool: Option<&'a PoolView>,
}

/// How many of an object's events `describe` shows: the most recent ones.
pub const DESCRIBE_EVENTS: usize = 20;

/// The `describe tier` page: what was asked for, what is, why it changed last, and, when the
/// controller offers them, the tier's instances and its recent events.
pub fn describe_tier(tier: &Tier, related: Related<'_>, now_ms: u64) -> String {
    let spec = &tier.spec;
    let template = &spec.template;
    let mut page = Page { lines: Vec::new() };
    page.line(0, "Name", spec.name.clone());
    page.line(0, "Provider", provider_label(tier));
    page.line(0, "Resource version", tier.resource_version().to_string());
    page.line(0, "Generation", tier.generation.to_string());
    page.line(0, "Created", timestamp(tier.created_at_ms, now_ms));
    page.line(0, "Updated", timestamp(tier.updated_at_ms, now_ms));

    page.line(0, "Template", "");
    if !template.command.is_empty() {
        page.line(2, "Command", template.command.join(" "));
    }
    if let Some(image) = &template.image {
        page.line(2, "Kernel", image.kernel.clone());
        page.line(2, "Initrd", image.initrd.clone());
        if let Some(append) = &image.append {
            page.line(2, "Append", append.clone());
        }
    }
    if let Some(ami) = &template.ami {
        page.line(2, "AMI", ami.clone());
    }
    if let Some(instance_type) = &template.instance_type {
        page.line(2, "Instance type", instance_type.clone());
    }
    if !template.subnets.is_empty() {
        page.line(2, "Subnets", template.subnets.join(", "));
    }
    if !template.security_groups.is_empty() {
        page.line(2, "Security groups", template.security_groups.join(", "));
    }
    if spec.provider == Provider::Local {
        page.line(
            2,
            "Resources",
            format!("{} CPU, {} MiB", template.cpu, template.memory_mb),
        );
    }
    if let Some(port) = template.port {
        page.line(2, "Port", port.to_string());
    }
    if !template.env.is_empty() {
        page.line(2, "Environment", key_values(&template.env));
    }
    if !template.tags.is_empty() {
        page.line(2, "Tags", key_values(&template.tags));
    }

    let health = &spec.health;
    let probe = match health.protocol {
        HealthProtocol::Http => format!("http GET {}", health.path),
        HealthProtocol::Tcp => "tcp connect".to_string(),
    };
    page.line(
        0,
        "Health",
        format!(
            "{probe} every {}, timeout {}, healthy after {}, unhealthy after {}, grace {}",
            health.interval,
            health.timeout,
            health.healthy_threshold,
            health.unhealthy_threshold,
            health.grace_period
        ),
    );

    let scaling = &spec.scaling;
    page.line(0, "Scaling", "");
    let autoscaled = !scaling.policies.is_empty() || !scaling.schedules.is_empty();
    let manual = match scaling.desired {
        Some(desired) if autoscaled => format!(
            "{desired} (set by hand: the autoscaler is paused; `stratactl scale tier {} --auto` hands it back)",
            spec.name
        ),
        Some(desired) => format!("{desired} (set by hand)"),
        None => "decided by the autoscaler".to_string(),
    };
    page.line(2, "Range", format!("{} to {}", scaling.min, scaling.max));
    page.line(2, "Desired", manual);
    if scaling.policies.is_empty() {
        page.line(2, "Policies", "none");
    } else {
        let policies: Vec<String> = scaling
            .policies
            .iter()
            .map(|policy| policy.summary())
            .collect();
        page.line(2, "Policies", policies.join(", "));
    }
    page.line(
        2,
        "Pacing",
        format!(
            "cooldown {}, scale-in stabilization {}, at most {} per {}",
            scaling.cooldown,
            match scaling.scale_in_stabilization {
                Some(window) => window.to_string(),
                None => format!(
                    "adaptive ({} start-ups, {}..{}; {} until one is seen)",
                    crate::tier::ADAPTIVE_STABILIZATION_STARTUPS,
                    crate::tier::ADAPTIVE_STABILIZATION_MIN,
                    crate::tier::ADAPTIVE_STABILIZATION_MAX,
                    crate::tier::ADAPTIVE_STABILIZATION_MAX
                ),
            },
            scaling.max_step,
            scaling.step_period
        ),
    );

    let balancer = &spec.load_balancer;
    let mut balancing = format!(
        "mode {}, algorithm {}, weight {}, drain {}",
        wire_name(&balancer.mode),
        wire_name(&balancer.algorithm),
        balancer.weight,
        balancer.drain_timeout
    );
    if let Some(listen) = balancer.listen {
        balancing = format!("{balancing}, listening on {listen}");
    }
    if let Some(cookie) = &balancer.sticky_cookie {
        balancing = format!("{balancing}, sticky cookie {cookie}");
    }
    page.line(0, "Load balancer", balancing);

    let mut placement = format!("spread by {}", wire_name(&spec.placement.spread));
    if !spec.placement.node_labels.is_empty() {
        placement = format!(
            "{placement}, on nodes labelled {}",
            key_values(&spec.placement.node_labels)
        );
    }
    page.line(0, "Placement", placement);

    let status = &tier.status;
    page.line(0, "Status", "");
    page.line(
        2,
        "Instances",
        format!(
            "{} desired, {} current, {} ready",
            status.desired, status.current, status.ready
        ),
    );
    if !status.endpoints.is_empty() {
        page.line(2, "Endpoints", status.endpoints.join(", "));
    }
    match &status.last_scaling {
        Some(decision) => page.line(
            2,
            "Last scaling",
            format!(
                "{} to {} at {}: {}",
                decision.from,
                decision.to,
                timestamp(decision.at_ms, now_ms),
                decision.reason
            ),
        ),
        None => page.line(2, "Last scaling", "none yet"),
    }

    let mut text = page.render();
    text.push_str("Conditions:");
    if status.conditions.is_empty() {
        text.push_str("  none\n");
    } else {
        text.push('\n');
        let rows: Vec<Vec<String>> = status
            .conditions
            .iter()
            .map(|condition| {
                vec![
                    condition.condition_type.clone(),
                    if condition.status { "True" } else { "False" }.to_string(),
                    condition.reason.clone(),
                    age(condition.since_ms, now_ms),
                    condition.message.clone(),
                ]
            })
            .collect();
        text.push_str(&indented(&table(
            &["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            &rows,
        )));
    }
    if let Some(instances) = related.instances {
        let rows: Vec<Vec<String>> = instances
            .iter()
            .map(|instance| {
                vec![
                    short_id(instance),
                    or_dash(instance.node.as_deref()),
                    instance_address(instance),
                    wire_name(&instance.phase),
                    wire_name(&instance.health),
                    instance.generation.to_string(),
                    age(instance.created_at_ms, now_ms),
                    instance.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        section(
            &mut text,
            "Instances",
            &[
                "ID", "NODE", "ADDRESS", "PHASE", "HEALTH", "GEN", "AGE", "REASON",
            ],
            &rows,
        );
    }
    if let Some(pool) = related.pool {
        balancers_section(&mut text, &pool.balancers, now_ms);
    }
    if let Some(events) = related.events {
        decisions_section(&mut text, events, now_ms);
        events_section(&mut text, events, now_ms);
    }
    text
}

/// Event reasons that are decisions about a tier's count.
const SCALING_REASONS: [&str; 4] = [
    "ScaledOut",
    "ScaledIn",
    "ScaledByOperator",
    "AutoscalingResumed",
];

/// How many scaling decisions `describe tier` shows.
const DESCRIBE_DECISIONS: usize = 8;

/// `Scaling decisions:` the latest decisions about the count, in plain words, each
/// autoscaler decision with what every policy saw and what bounded it.
fn decisions_section(text: &mut String, events: &[Event], now_ms: u64) {
    let decisions: Vec<&Event> = events
        .iter()
        .filter(|event| SCALING_REASONS.contains(&event.reason.as_str()))
        .collect();
    let recent = &decisions[decisions.len().saturating_sub(DESCRIBE_DECISIONS)..];
    if recent.is_empty() {
        text.push_str("Scaling decisions:  none\n");
        return;
    }
    text.push_str("Scaling decisions:\n");
    for event in recent {
        match &event.scaling {
            Some(inputs) => {
                let _ = writeln!(
                    text,
                    "  {} ago  {}",
                    age(event.at_ms, now_ms),
                    inputs.reason
                );
                for line in decision_details(inputs) {
                    let _ = writeln!(text, "      {line}");
                }
            }
            None => {
                let _ = writeln!(
                    text,
                    "  {} ago  {}",
                    age(event.at_ms, now_ms),
                    event.message
                );
            }
        }
    }
}

/// One line per policy (what it saw, its target and what it asked for), then the windows and
/// limits that bounded the result.
fn decision_details(inputs: &ScalingInputs) -> Vec<String> {
    let mut lines = Vec::new();
    for policy in &inputs.policies {
        let value = policy
            .value
            .map_or_else(|| "no data".to_string(), |value| value.to_string());
        let target = policy
            .target
            .map_or_else(String::new, |target| format!(", target {target}"));
        let asks = policy.recommendation.map_or_else(
            || "abstains".to_string(),
            |count| format!("asks for {count}"),
        );
        lines.push(format!(
            "{}: {value}{target}, {asks} ({})",
            policy.metric, policy.note
        ));
    }
    for bound in &inputs.bounded_by {
        lines.push(match bound {
            ScalingBound::Stabilization { window_ms, highest } => format!(
                "held by the scale-in stabilization window ({}): its highest recommendation was {highest}",
                Duration::from_millis(*window_ms)
            ),
            ScalingBound::ScaleInHeld { why } => format!("scale-in held: {why}"),
            ScalingBound::Cooldown { remaining_ms } => format!(
                "in the scale-out cooldown for another {}",
                Duration::from_millis(*remaining_ms)
            ),
            ScalingBound::StepLimit {
                period_ms,
                limit,
                allowed,
            } => format!(
                "limited to {limit} per {} (allowed {allowed})",
                Duration::from_millis(*period_ms)
            ),
            ScalingBound::Bounds { min, max } => format!("bounded by min {min} and max {max}"),
        });
    }
    if inputs.stabilization_adaptive {
        let window = Duration::from_millis(inputs.stabilization_ms);
        lines.push(match inputs.observed_startup_ms {
            Some(startup) => format!(
                "scale-in window {window}, adaptive: {} × the observed start-up {}, within {}..{}",
                crate::tier::ADAPTIVE_STABILIZATION_STARTUPS,
                Duration::from_millis(startup),
                crate::tier::ADAPTIVE_STABILIZATION_MIN,
                crate::tier::ADAPTIVE_STABILIZATION_MAX
            ),
            None => format!("scale-in window {window}, adaptive: no start-up observed yet"),
        });
    }
    lines.push(format!(
        "{} ready, {} starting or warming up, bounds {}..{}",
        inputs.ready, inputs.warming, inputs.min, inputs.max
    ));
    lines
}

/// `get pool`: the servers the tier's load balancers must serve, then what each one reports.
pub fn pool_table(view: &PoolView, now_ms: u64) -> String {
    let pool = &view.pool;
    let balancer = &pool.load_balancer;
    let mut text = format!(
        "Tier {}, pool version {}, {} {} on {}\n",
        pool.tier,
        pool.version,
        wire_name(&balancer.mode),
        wire_name(&balancer.algorithm),
        balancer
            .listen
            .map_or_else(|| "-".to_string(), |listen| listen.to_string())
    );
    if pool.servers.is_empty() {
        text.push_str("No servers.\n");
    } else {
        let rows: Vec<Vec<String>> = pool
            .servers
            .iter()
            .map(|server| {
                vec![
                    server.instance_id.to_string().chars().take(8).collect(),
                    format!("{}:{}", server.address, server.port),
                    server.weight.to_string(),
                    wire_name(&server.state),
                ]
            })
            .collect();
        text.push_str(&table(&["SERVER", "ADDRESS", "WEIGHT", "STATE"], &rows));
    }
    balancers_section(&mut text, &view.balancers, now_ms);
    text
}

/// `Load balancers:` with each LB node's applied pool version and HAProxy's figures.
fn balancers_section(text: &mut String, balancers: &[BalancerView], now_ms: u64) {
    let rows: Vec<Vec<String>> = balancers
        .iter()
        .map(|balancer| {
            let report = &balancer.report;
            let mut row = vec![balancer.node.clone(), report.version.to_string()];
            row.extend(stats_cells(&report.stats));
            row.push(age(balancer.reported_at_ms, now_ms));
            row.push(report.error.clone().unwrap_or_default());
            row
        })
        .collect();
    section(
        text,
        "Load balancers",
        &[
            "NODE", "VERSION", "REQ/S", "SESSIONS", "QUEUE", "RESPONSE", "5XX", "REPORTED", "ERROR",
        ],
        &rows,
    );
}

fn stats_cells(stats: &LbStats) -> [String; 5] {
    [
        format!("{:.1}", stats.request_rate),
        stats.sessions.to_string(),
        stats.queue.to_string(),
        format!("{:.0}ms", stats.response_time_ms),
        stats.http_5xx.to_string(),
    ]
}

/// `Title:` and an indented table, or `Title:  none`.
fn section(text: &mut String, title: &str, headers: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        let _ = writeln!(text, "{title}:  none");
    } else {
        let _ = writeln!(text, "{title}:");
        text.push_str(&indented(&table(headers, rows)));
    }
}

/// The last `DESCRIBE_EVENTS` events, oldest first as the controller returns them.
fn events_section(text: &mut String, events: &[Event], now_ms: u64) {
    let recent = &events[events.len().saturating_sub(DESCRIBE_EVENTS)..];
    let rows: Vec<Vec<String>> = recent
        .iter()
        .map(|event| {
            vec![
                age(event.at_ms, now_ms),
                event.reason.clone(),
                event.message.clone(),
            ]
        })
        .collect();
    section(text, "Events", &["AGE", "REASON", "MESSAGE"], &rows);
}

fn indented(table: &str) -> String {
    table.lines().map(|line| format!("  {line}\n")).collect()
}

/// ID STATUS ROLES ADDRESS ZONE CPU(ALLOC/CAP) MEMORY(ALLOC/CAP) LOAD HEARTBEAT VERSION.
pub fn node_table(nodes: &[Node], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            vec![
                node.id.clone(),
                wire_name(&node.status),
                node_roles(node),
                node.address.clone(),
                or_dash(node.zone.as_deref()),
                format!(
                    "{}/{}",
                    cores(node.allocatable.cpu),
                    cores(node.capacity.cpu)
                ),
                format!(
                    "{}/{}",
                    memory(node.allocatable.memory_mb),
                    memory(node.capacity.memory_mb)
                ),
                format!("{:.2}", node.metrics.load1),
                heartbeat_age(node, now_ms),
                node.agent_version.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATUS",
            "ROLES",
            "ADDRESS",
            "ZONE",
            "CPU(ALLOC/CAP)",
            "MEMORY(ALLOC/CAP)",
            "LOAD",
            "HEARTBEAT",
            "VERSION",
        ],
        &rows,
    )
}

/// `worker`, `load-balancer`, or `ec2-instance` for the agent of an EC2 instance (it reports
/// the instance's health and takes no instances).
fn node_roles(node: &Node) -> String {
    if node.ec2_instance.is_some() {
        return "ec2-instance".to_string();
    }
    let roles: Vec<&str> = node
        .roles
        .iter()
        .map(|role| match role {
            crate::NodeRole::Worker => "worker",
            crate::NodeRole::LoadBalancer => "load-balancer",
        })
        .collect();
    if roles.is_empty() {
        "-".to_string()
    } else {
        roles.join(",")
    }
}

/// Time since the node's last heartbeat, or `-` when the answering controller has not seen
/// one (only the leader keeps heartbeats, in memory).
fn heartbeat_age(node: &Node, now_ms: u64) -> String {
    if node.last_heartbeat_ms == 0 {
        "-".to_string()
    } else {
        age(node.last_heartbeat_ms, now_ms)
    }
}

/// ID TIER NODE ADDRESS PHASE HEALTH GEN AGE REASON, with the id cut to 8 characters as
/// `docker ps` does; `-o json` has the full one.
pub fn instance_table(instances: &[Instance], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|instance| {
            vec![
                short_id(instance),
                instance.tier.clone(),
                or_dash(instance.node.as_deref()),
                instance_address(instance),
                wire_name(&instance.phase),
                wire_name(&instance.health),
                instance.generation.to_string(),
                age(instance.created_at_ms, now_ms),
                instance.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "TIER", "NODE", "ADDRESS", "PHASE", "HEALTH", "GEN", "AGE", "REASON",
        ],
        &rows,
    )
}

/// AGE OBJECT REASON MESSAGE, in the order given (the controller's: oldest first).
pub fn event_table(events: &[Event], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|event| {
            vec![
                age(event.at_ms, now_ms),
                event.object.clone(),
                event.reason.clone(),
                event.message.clone(),
            ]
        })
        .collect();
    table(&["AGE", "OBJECT", "REASON", "MESSAGE"], &rows)
}

/// The `describe node` page: identity, capacity and what is left of it, the agent's last
/// measurements, and, when the controller offers them, the node's instances and events.
pub fn describe_node(node: &Node, related: Related<'_>, now_ms: u64) -> String {
    let mut page = Page { lines: Vec::new() };
    page.line(0, "Name", node.id.clone());
    page.line(
        0,
        "Status",
        format!(
            "{} (ready: {}, cordoned: {}, draining: {})",
            wire_name(&node.status),
            yes_no(node.ready),
            yes_no(node.cordoned),
            yes_no(node.draining)
        ),
    );
    page.line(0, "Address", node.address.clone());
    page.line(0, "Zone", or_dash(node.zone.as_deref()));
    if node.labels.is_empty() {
        page.line(0, "Labels", "none");
    } else {
        page.line(0, "Labels", key_values(&node.labels));
    }
    page.line(0, "Agent version", node.agent_version.clone());
    page.line(0, "Resource version", node.resource_version.to_string());
    page.line(0, "Registered", timestamp(node.registered_at_ms, now_ms));
    if node.last_heartbeat_ms == 0 {
        page.line(0, "Last heartbeat", "not known to the answering controller");
    } else {
        page.line(
            0,
            "Last heartbeat",
            timestamp(node.last_heartbeat_ms, now_ms),
        );
    }
    page.line(0, "Capacity", "");
    page.line(2, "CPU", cores(node.capacity.cpu));
    page.line(2, "Memory", memory(node.capacity.memory_mb));
    page.line(0, "Allocatable", "");
    page.line(2, "CPU", cores(node.allocatable.cpu));
    page.line(2, "Memory", memory(node.allocatable.memory_mb));
    let metrics = &node.metrics;
    if *metrics == Default::default() {
        page.line(0, "Metrics", "none reported");
    } else {
        page.line(0, "Metrics", "");
        page.line(2, "CPU", format!("{:.1}% busy", metrics.cpu_percent));
        page.line(
            2,
            "Memory",
            format!(
                "{} available of {}",
                memory(metrics.memory_available_mb),
                memory(metrics.memory_total_mb)
            ),
        );
        page.line(
            2,
            "Load",
            format!(
                "{:.2} {:.2} {:.2}",
                metrics.load1, metrics.load5, metrics.load15
            ),
        );
    }
    let mut text = page.render();
    if let Some(instances) = related.instances {
        let rows: Vec<Vec<String>> = instances
            .iter()
            .map(|instance| {
                vec![
                    short_id(instance),
                    instance.tier.clone(),
                    instance_address(instance),
                    wire_name(&instance.phase),
                    wire_name(&instance.health),
                    age(instance.created_at_ms, now_ms),
                    instance.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        section(
            &mut text,
            "Instances",
            &["ID", "TIER", "ADDRESS", "PHASE", "HEALTH", "AGE", "REASON"],
            &rows,
        );
    }
    if let Some(events) = related.events {
        events_section(&mut text, events, now_ms);
    }
    text
}

fn short_id(instance: &Instance) -> String {
    instance.id.to_string().chars().take(8).collect()
}

/// `address:port`, the address alone before the port is known, or `-`.
fn instance_address(instance: &Instance) -> String {
    match (&instance.address, instance.port) {
        (Some(address), Some(port)) => format!("{address}:{port}"),
        (Some(address), None) => address.clone(),
        (None, _) => "-".to_string(),
    }
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_string()
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// CPU cores with at most two decimals and no trailing zeros: `8`, `6.5`, `0.25`.
fn cores(cpu: f64) -> String {
    let text = format!("{cpu:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// MiB as `512Mi`, or in GiB from 1 GiB up with at most one decimal: `16Gi`, `1.5Gi`.
fn memory(mb: u64) -> String {
    if mb < 1024 {
        return format!("{mb}Mi");
    }
    let text = format!("{:.1}", mb as f64 / 1024.0);
    format!("{}Gi", text.trim_end_matches('0').trim_end_matches('.'))
}

fn key_values(map: &std::collections::BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A summary line of the answering node's Raft state, then the members with the leader marked.
pub fn cluster_status(status: &ClusterStatus) -> String {
    let leader = match status.leader_id {
        Some(id) => format!("leader {id}"),
        None => "no leader".to_string(),
    };
    let quorum = if status.has_quorum {
        String::new()
    } else {
        format!(
            "NO QUORUM: no contact with a majority of voters for {} ms; this node refuses reads and writes\n",
            status.millis_since_quorum
        )
    };
    let mut text = format!(
        "Answered by node {} ({}); {leader}; term {}\n{quorum}Commit index {}, applied {}, last log {}, snapshot {}\n\n",
        status.node_id,
        status.role,
        status.term,
        status.commit_index,
        status.applied_index,
        status.last_log_index,
        status.snapshot_index
    );
    let rows: Vec<Vec<String>> = status
        .members
        .iter()
        .map(|member| {
            let role = if status.leader_id == Some(member.id) {
                "leader"
            } else if member.voter {
                "voter"
            } else {
                "learner"
            };
            let marker = if member.id == status.node_id { "*" } else { "" };
            vec![
                member.id.to_string(),
                member.address.clone(),
                role.to_string(),
                marker.to_string(),
            ]
        })
        .collect();
    text.push_str(&table(&["ID", "ADDRESS", "ROLE", "ANSWERED"], &rows));
    text
}

/// `label:` followed by one indented `path: message` line per error.
pub fn field_errors(label: &str, errors: &[FieldError]) -> String {
    let mut text = format!("{label} is invalid:");
    for error in errors {
        let _ = write!(text, "\n  {}: {}", error.path, error.message);
    }
    text
}

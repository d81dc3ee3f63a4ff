use clap::error::ErrorKind;
use clap::CommandFactory;

use super::*;
use crate::cluster::{ClusterStatus, Member};
use crate::node::{
    Event, Health, HostMetrics, Instance, Node, NodeRole, NodeStatus, Phase, Resources,
};
use crate::test_server::{Answer, FakeServer};
use crate::tier::{Condition, Provider, ScalingDecision, Tier, TierSpec, TierStatus};

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("stratactl").chain(args.iter().copied()))
}

fn parsed(args: &[&str]) -> Cli {
    parse(args).unwrap_or_else(|error| panic!("{args:?}: {error}"))
}

#[test]
fn help_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn global_defaults() {
    let cli = parsed(&["get", "tiers"]);
    assert_eq!(cli.server, [DEFAULT_SERVER]);
    assert_eq!(cli.output, OutputFormat::Table);
    assert!(!cli.stale);
    assert_eq!(cli.failover_deadline, Duration::from_secs(15));
    assert!(matches!(
        cli.command,
        Command::Get {
            resource: GetResource::Tier { name: None }
        }
    ));
}

#[test]
fn global_flags_anywhere() {
    let cli = parsed(&[
        "--server",
        "a:1,http://b:2",
        "get",
        "tier",
        "web",
        "-o",
        "yaml",
        "--stale",
        "--token",
        "t0k",
        "--failover-deadline",
        "2s",
    ]);
    assert_eq!(cli.server, ["a:1", "http://b:2"]);
    assert_eq!(cli.output, OutputFormat::Yaml);
    assert!(cli.stale);
    assert_eq!(cli.token.as_deref(), Some("t0k"));
    assert_eq!(cli.failover_deadline, Duration::from_secs(2));
    assert!(matches!(
        cli.command,
        Command::Get { resource: GetResource::Tier { name: Some(ref name) } } if name == "web"
    ));
}

#[test]
fn every_command_parses() {
    assert!(matches!(
        parsed(&["apply", "-f", "tiers.yaml"]).command,
        Command::Apply(ApplyArgs { ref filename }) if filename == "tiers.yaml"
    ));
    assert!(matches!(
        parsed(&["apply", "--filename", "-"]).command,
        Command::Apply(ApplyArgs { ref filename }) if filename == "-"
    ));
    assert!(matches!(
        parsed(&["describe", "tier", "web"]).command,
        Command::Describe { resource: DescribeResource::Tier { ref name } } if name == "web"
    ));
    assert!(matches!(
        parsed(&["delete", "tier", "web", "--resource-version", "7"]).command,
        Command::Delete {
            resource: DeleteResource::Tier {
                resource_version: Some(7),
                ..
            }
        }
    ));
    assert!(matches!(
        parsed(&["scale", "tier", "web", "--replicas", "3"]).command,
        Command::Scale {
            resource: ScaleResource::Tier {
                replicas_flag: Some(3),
                auto: false,
                resource_version: None,
                ..
            }
        }
    ));
    assert!(matches!(
        parsed(&["scale", "tier", "web", "3"]).command,
        Command::Scale {
            resource: ScaleResource::Tier {
                replicas: Some(3),
                replicas_flag: None,
                auto: false,
                ..
            }
        }
    ));
    assert!(matches!(
        parsed(&["scale", "tier", "web", "--auto"]).command,
        Command::Scale {
            resource: ScaleResource::Tier {
                replicas: None,
                replicas_flag: None,
                auto: true,
                ..
            }
        }
    ));
    assert!(matches!(
        parsed(&["cluster", "status"]).command,
        Command::Cluster {
            command: ClusterCommand::Status
        }
    ));
    assert!(matches!(
        parsed(&["cluster", "add-member", "--id", "4", "--address", "10.0.0.4:7001", "--learner"]).command,
        Command::Cluster {
            command: ClusterCommand::AddMember { id: 4, learner: true, ref address }
        } if address == "10.0.0.4:7001"
    ));
    assert!(matches!(
        parsed(&["cluster", "remove-member", "--id", "4"]).command,
        Command::Cluster {
            command: ClusterCommand::RemoveMember { id: 4 }
        }
    ));
}

#[test]
fn usage_errors_exit_with_2() {
    let cases: &[(&[&str], ErrorKind)] = &[
        (
            &["scale", "tier", "web"],
            ErrorKind::MissingRequiredArgument,
        ),
        (
            &["scale", "tier", "web", "3", "--auto"],
            ErrorKind::ArgumentConflict,
        ),
        (
            &["scale", "tier", "web", "--replicas", "-1"],
            ErrorKind::UnknownArgument,
        ),
        (
            &["scale", "tier", "web", "--replicas", "many"],
            ErrorKind::ValueValidation,
        ),
        (&["get", "tiers", "-o", "xml"], ErrorKind::InvalidValue),
        (
            &["get"],
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
        ),
        (&["frobnicate"], ErrorKind::InvalidSubcommand),
        (&["apply"], ErrorKind::MissingRequiredArgument),
        (
            &["get", "tiers", "--failover-deadline", "30"],
            ErrorKind::ValueValidation,
        ),
        (
            &["cluster", "add-member", "--id", "2"],
            ErrorKind::MissingRequiredArgument,
        ),
    ];
    for (args, kind) in cases {
        match parse(args) {
            Ok(cli) => panic!("{args:?} parsed as {cli:?}"),
            Err(error) => {
                assert_eq!(error.kind(), *kind, "{args:?}: {error}");
                assert_eq!(error.exit_code(), 2, "{args:?}");
            }
        }
    }
}

fn tier(name: &str, rv: u64) -> Tier {
    let spec: TierSpec = crate::decode::decode_json(
        format!(
            r#"{{"name":"{name}","resource_version":{rv},"template":{{"driver":"process","command":["strata-workload","--port-from-env"]}},
            "scaling":{{"min":1,"max":10,"policies":[{{"metric":"requests_per_second","target":200}}]}},
            "load_balancer":{{"listen":"0.0.0.0:8080","sticky_cookie":"SRV"}},
            "placement":{{"node_labels":{{"zone":"a"}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap_or_else(|problem| panic!("{problem}"));
    Tier {
        spec,
        generation: 2,
        created_at_ms: 1_000_000,
        updated_at_ms: 1_060_000,
        status: TierStatus {
            desired: 3,
            current: 3,
            ready: 2,
            last_scaling: Some(ScalingDecision {
                at_ms: 1_100_000,
                from: 2,
                to: 3,
                reason: "requests_per_second 260 > target 200".into(),
                inputs: None,
            }),
            conditions: vec![Condition {
                condition_type: "Ready".into(),
                status: false,
                reason: "InstancesStarting".into(),
                message: "2 of 3 instances ready".into(),
                since_ms: 1_100_000,
            }],
            ..TierStatus::default()
        },
    }
}

fn tier_json(name: &str, rv: u64) -> String {
    serde_json::to_string(&tier(name, rv)).unwrap_or_default()
}

#[test]
fn tier_table_is_aligned() {
    let mut second = tier("checkout-api", 12);
    second.status = TierStatus::default();
    second.created_at_ms = 1;
    let text = render::tier_table(&[tier("web", 7), second], 1_000_000 + 45_000);
    assert_eq!(
        text,
        "\
NAME           PROVIDER        DESIRED   CURRENT   READY   MIN   MAX   VERSION   AGE
web            local/process   3         3         2       1     10    7         45s
checkout-api   local/process   0         0         0       1     10    12        17m
"
    );
}

#[test]
fn ages_read_like_kubectl() {
    let cases = [
        (0, "0s"),
        (119_999, "119s"),
        (120_000, "2m"),
        (7_199_000, "119m"),
        (7_200_000, "2h"),
        (172_800_000, "2d"),
    ];
    for (elapsed, expected) in cases {
        assert_eq!(render::age(10, 10 + elapsed), expected, "{elapsed}");
    }
    assert_eq!(render::age(0, 5), "<unknown>");
}

#[test]
fn describe_shows_spec_status_conditions_and_last_decision() {
    let text = render::describe_tier(&tier("web", 7), render::Related::default(), 1_160_000);
    for expected in [
        "Name:",
        "web\n",
        "Provider:",
        "local/process",
        "Command:",
        "strata-workload --port-from-env",
        "Range:",
        "1 to 10",
        "decided by the autoscaler",
        "requests_per_second target 200",
        "mode http, algorithm roundrobin, weight 100, drain 30s, listening on 0.0.0.0:8080, sticky cookie SRV",
        "spread by node, on nodes labelled zone=a",
        "3 desired, 3 current, 2 ready",
        "2 to 3 at 1970-01-01T00:18:20Z (60s ago): requests_per_second 260 > target 200",
        "Conditions:\n  TYPE    STATUS   REASON              SINCE   MESSAGE\n  Ready   False    InstancesStarting   60s     2 of 3 instances ready\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    // Values line up in one column.
    let columns: Vec<usize> = text
        .lines()
        .filter(|line| line.starts_with("Name:") || line.starts_with("Provider:"))
        .map(|line| {
            line.len()
                - line
                    .split(':')
                    .nth(1)
                    .unwrap_or_default()
                    .trim_start()
                    .len()
        })
        .collect();
    assert_eq!(columns.len(), 2);
    assert_eq!(columns[0], columns[1]);
}

#[test]
fn cluster_status_marks_the_leader() {
    let status = ClusterStatus {
        node_id: 2,
        role: "follower".into(),
        leader_id: Some(1),
        term: 5,
        commit_index: 40,
        applied_index: 39,
        last_log_index: 41,
        snapshot_index: 20,
        members: vec![
            Member {
                id: 1,
                address: "10.0.0.1:7001".into(),
                voter: true,
            },
            Member {
                id: 2,
                address: "10.0.0.2:7001".into(),
                voter: true,
            },
            Member {
                id: 3,
                address: "10.0.0.3:7001".into(),
                voter: false,
            },
        ],
        has_quorum: true,
        millis_since_quorum: 12,
    };
    assert_eq!(
        render::cluster_status(&status),
        "\
Answered by node 2 (follower); leader 1; term 5
Commit index 40, applied 39, last log 41, snapshot 20

ID   ADDRESS         ROLE      ANSWERED
1    10.0.0.1:7001   leader
2    10.0.0.2:7001   voter     *
3    10.0.0.3:7001   learner
"
    );
    let cut_off = ClusterStatus {
        has_quorum: false,
        millis_since_quorum: 1400,
        ..status
    };
    assert!(render::cluster_status(&cut_off).contains(
        "term 5\nNO QUORUM: no contact with a majority of voters for 1400 ms; this node refuses reads and writes\nCommit index 40"
    ));
}

/// Runs a command line with `stdin` against `server`, returning the result, stdout and stderr.
async fn run_against(
    server: &FakeServer,
    args: &[&str],
    stdin: &str,
) -> (Result<(), CliError>, String, String) {
    let url = server.url();
    let mut full = vec!["--server", url.as_str(), "--failover-deadline", "1s"];
    full.extend_from_slice(args);
    let cli = parsed(&full);
    let mut input = stdin.as_bytes();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let result = execute(
        cli,
        &mut Streams {
            stdin: &mut input,
            stdout: &mut stdout,
            stderr: &mut stderr,
        },
    )
    .await;
    (
        result,
        String::from_utf8_lossy(&stdout).to_string(),
        String::from_utf8_lossy(&stderr).to_string(),
    )
}

fn tiers_server_answer(target: &str) -> Option<Answer> {
    match target {
        "PUT /v1/tiers/web" => Some((201, "application/json", tier_json("web", 3))),
        "PUT /v1/tiers/api" => Some((200, "application/json", tier_json("api", 4))),
        "PUT /v1/tiers/db" => Some((
            409,
            "application/problem+json",
            r#"{"type":"urn:strata:problem:conflict","title":"Conflict","status":409,"detail":"resource version mismatch","current_resource_version":9}"#.into(),
        )),
        "POST /v1/tiers/web/scale" => Some((
            422,
            "application/problem+json",
            r#"{"type":"urn:strata:problem:validation","title":"Invalid resource","status":422,"detail":"desired: out of range","errors":[{"path":"desired","message":"must be between scaling.min (1) and scaling.max (10) of the tier"}]}"#.into(),
        )),
        "GET /v1/tiers?stale=true" => Some((
            200,
            "application/json",
            format!(r#"{{"items":[{}]}}"#, tier_json("web", 3)),
        )),
        "DELETE /v1/tiers/web" => Some((200, "application/json", tier_json("web", 3))),
        _ => Some((404, "application/problem+json", r#"{"type":"urn:strata:problem:not-found","title":"Not found","status":404,"detail":"no such tier"}"#.into())),
    }
}

const TWO_TIERS: &str = "\
name: web
template: {driver: process, command: [strata-workload]}
scaling: {min: 1, max: 3}
---
kind: Tier
name: api
template: {driver: process, command: [strata-workload]}
scaling: {min: 1, max: 3}
";

#[tokio::test]
async fn apply_reports_created_and_configured() {
    let server = FakeServer::start(tiers_server_answer).await;
    let (result, stdout, stderr) = run_against(&server, &["apply", "-f", "-"], TWO_TIERS).await;
    assert!(result.is_ok(), "{result:?} {stderr}");
    assert_eq!(stdout, "tier/web created\ntier/api configured\n");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn apply_reads_files_and_prints_objects_as_json() {
    let server = FakeServer::start(tiers_server_answer).await;
    let directory = tempfile_dir();
    let file = directory.join("tiers.yaml");
    std::fs::write(&file, TWO_TIERS).unwrap_or_else(|error| panic!("write: {error}"));
    let path = file.to_string_lossy().to_string();
    let (result, stdout, _) = run_against(&server, &["apply", "-f", &path, "-o", "json"], "").await;
    assert!(result.is_ok(), "{result:?}");
    let printed: ItemList<Tier> =
        serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    assert_eq!(printed.items.len(), 2);
    let _ = std::fs::remove_dir_all(directory);
}

/// A fresh directory under the system temp dir, unique to this process and call.
fn tempfile_dir() -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let directory =
        std::env::temp_dir().join(format!("stratactl-test-{}-{unique}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap_or_else(|error| panic!("mkdir: {error}"));
    directory
}

#[tokio::test]
async fn apply_sends_nothing_when_any_document_is_invalid() {
    let server = FakeServer::start(tiers_server_answer).await;
    let text = format!(
        "{TWO_TIERS}---\nname: bad\ntemplate: {{driver: process}}\nscaling: {{min: 5, max: 3, mni: 1}}\n---\nkind: Node\nname: n1\n---\nname: Worse\ntemplate: {{driver: process, command: [x]}}\nscaling: {{min: 5, max: 3}}\n"
    );
    let (result, stdout, _) = run_against(&server, &["apply", "-f", "-"], &text).await;
    let message = result
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert_eq!(
        message,
        "\
nothing was applied; 3 documents have problems:
tier/bad (document 3) is invalid:
  scaling.mni: unknown field; expected one of `min`, `max`, `desired`, `policies`, `schedules`, `warmup`, `cooldown`, `scale_in_stabilization`, `max_step`, `max_step_percent`, `step_period`
document 4: unknown kind \"Node\"; stratactl apply accepts: Tier
tier/Worse (document 5) is invalid:
  name: must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit
  scaling.min: must not exceed scaling.max (3)"
    );
    assert!(stdout.is_empty());
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn apply_goes_on_after_a_server_error_and_fails_at_the_end() {
    let server = FakeServer::start(tiers_server_answer).await;
    let text = TWO_TIERS.replacen("name: web", "name: db", 1);
    let (result, stdout, stderr) = run_against(&server, &["apply", "-f", "-"], &text).await;
    assert_eq!(
        result.err().map(|error| error.to_string()).as_deref(),
        Some("1 of 2 resources could not be applied")
    );
    assert_eq!(stdout, "tier/api configured\n");
    assert!(
        stderr.starts_with("error: tier/db: Conflict (409): resource version mismatch\n"),
        "{stderr}"
    );
    assert!(stderr.contains("resource_version 9"), "{stderr}");
}

#[tokio::test]
async fn apply_refuses_empty_input() {
    let server = FakeServer::start(tiers_server_answer).await;
    let (result, _, _) = run_against(&server, &["apply", "-f", "-"], "---\n").await;
    assert!(
        matches!(result, Err(CliError::NoDocuments { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn server_validation_errors_show_their_paths() {
    let server = FakeServer::start(tiers_server_answer).await;
    let (result, _, _) =
        run_against(&server, &["scale", "tier", "web", "--replicas", "50"], "").await;
    assert_eq!(
        result.err().map(|error| error.to_string()).as_deref(),
        Some("Invalid resource (422):\n  desired: must be between scaling.min (1) and scaling.max (10) of the tier")
    );
}

#[tokio::test]
async fn get_delete_and_not_found() {
    let server = FakeServer::start(tiers_server_answer).await;
    let (result, stdout, _) = run_against(&server, &["get", "tiers", "--stale"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert!(stdout.starts_with("NAME   PROVIDER"), "{stdout}");
    assert!(stdout.contains("\nweb    local/process   3"), "{stdout}");

    let (result, stdout, _) = run_against(&server, &["delete", "tier", "web"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(stdout, "tier/web deleted\n");

    let (result, _, _) = run_against(&server, &["describe", "tier", "nope"], "").await;
    assert_eq!(
        result.err().map(|error| error.to_string()).as_deref(),
        Some("Not found (404): no such tier")
    );
}

#[tokio::test]
async fn add_member_is_checked_before_sending() {
    let server = FakeServer::start(tiers_server_answer).await;
    let (result, _, _) = run_against(
        &server,
        &[
            "cluster",
            "add-member",
            "--id",
            "0",
            "--address",
            "http://x:1",
        ],
        "",
    )
    .await;
    let message = result
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(
        message.starts_with("member is invalid:\n  id: must be at least 1\n  address: "),
        "{message}"
    );
    assert!(server.requests().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Nodes, instances and events

#[test]
fn node_instance_and_event_commands_parse() {
    assert!(matches!(
        parsed(&["get", "nodes"]).command,
        Command::Get {
            resource: GetResource::Node { id: None }
        }
    ));
    assert!(matches!(
        parsed(&["get", "node", "host-1", "-o", "json"]).command,
        Command::Get { resource: GetResource::Node { id: Some(ref id) } } if id == "host-1"
    ));
    assert!(matches!(
        parsed(&["get", "instances"]).command,
        Command::Get {
            resource: GetResource::Instance { tier: None }
        }
    ));
    assert!(matches!(
        parsed(&["get", "instance", "--tier", "web"]).command,
        Command::Get { resource: GetResource::Instance { tier: Some(ref tier) } } if tier == "web"
    ));
    assert!(matches!(
        parsed(&["get", "events"]).command,
        Command::Get {
            resource: GetResource::Event { object: None }
        }
    ));
    for object in [
        "tier/web",
        "node/host-1",
        "instance/6f1c2a34-0000-4000-8000-000000000001",
    ] {
        assert!(matches!(
            parsed(&["get", "events", "--object", object]).command,
            Command::Get { resource: GetResource::Event { object: Some(ref o) } } if o == object
        ));
    }
    assert!(matches!(
        parsed(&["describe", "node", "host-1"]).command,
        Command::Describe { resource: DescribeResource::Node { ref id } } if id == "host-1"
    ));
    assert!(matches!(
        parsed(&["cordon", "host-1"]).command,
        Command::Cordon { ref node } if node == "host-1"
    ));
    assert!(matches!(
        parsed(&["uncordon", "host-1"]).command,
        Command::Uncordon { ref node } if node == "host-1"
    ));
    assert!(matches!(
        parsed(&["drain", "host-1", "-o", "yaml"]).command,
        Command::Drain { ref node } if node == "host-1"
    ));
}

#[test]
fn node_command_usage_errors() {
    let cases: &[(&[&str], ErrorKind)] = &[
        (&["cordon"], ErrorKind::MissingRequiredArgument),
        (&["drain", "a", "b"], ErrorKind::UnknownArgument),
        (&["describe", "node"], ErrorKind::MissingRequiredArgument),
        (&["get", "instances", "web"], ErrorKind::UnknownArgument),
        (
            &["get", "events", "--object", "tiers/web"],
            ErrorKind::ValueValidation,
        ),
        (
            &["get", "events", "--object", "tier/"],
            ErrorKind::ValueValidation,
        ),
        (
            &["get", "events", "--object", "web"],
            ErrorKind::ValueValidation,
        ),
    ];
    for (args, kind) in cases {
        match parse(args) {
            Ok(cli) => panic!("{args:?} parsed as {cli:?}"),
            Err(error) => {
                assert_eq!(error.kind(), *kind, "{args:?}: {error}");
                assert_eq!(error.exit_code(), 2, "{args:?}");
            }
        }
    }
}

/// The reference time of the rendering tests.
const NOW_MS: u64 = 10_000_000;

fn node(id: &str) -> Node {
    Node {
        id: id.to_string(),
        address: "10.0.0.5".into(),
        zone: Some("a".into()),
        labels: [("disk".to_string(), "ssd".to_string())].into(),
        capacity: Resources {
            cpu: 8.0,
            memory_mb: 16384,
        },
        allocatable: Resources {
            cpu: 6.5,
            memory_mb: 12288,
        },
        status: NodeStatus::Ready,
        ready: true,
        cordoned: false,
        draining: false,
        agent_version: "0.1.0".into(),
        roles: vec![NodeRole::Worker],
        last_heartbeat_ms: NOW_MS - 3_000,
        metrics: HostMetrics {
            cpu_percent: 37.5,
            memory_total_mb: 16384,
            memory_available_mb: 10240,
            load1: 0.52,
            load5: 0.4,
            load15: 0.31,
        },
        ec2_instance: None,
        registered_at_ms: NOW_MS - 7_200_000,
        resource_version: 12,
    }
}

/// A node that has not heartbeated since the answering controller started.
fn silent_node() -> Node {
    Node {
        id: "host-22".into(),
        address: "10.0.0.22".into(),
        zone: None,
        labels: Default::default(),
        capacity: Resources {
            cpu: 4.0,
            memory_mb: 2048,
        },
        allocatable: Resources {
            cpu: 0.25,
            memory_mb: 512,
        },
        status: NodeStatus::NotReady,
        ready: false,
        cordoned: true,
        draining: false,
        agent_version: "0.1.1".into(),
        roles: vec![NodeRole::Worker],
        last_heartbeat_ms: 0,
        metrics: HostMetrics::default(),
        ec2_instance: None,
        registered_at_ms: NOW_MS - 600_000,
        resource_version: 30,
    }
}

fn instances() -> Vec<Instance> {
    let instance = |id: &str, tier: &str| Instance {
        id: id
            .parse()
            .unwrap_or_else(|error| panic!("uuid {id}: {error}")),
        tier: tier.to_string(),
        provider: Provider::Local,
        node: Some("host-1".into()),
        provider_id: None,
        address: Some("10.0.0.5".into()),
        port: Some(20001),
        phase: Phase::Running,
        health: Health::Healthy,
        generation: 2,
        reason: None,
        created_at_ms: NOW_MS - 300_000,
        updated_at_ms: NOW_MS - 250_000,
        ready_at_ms: NOW_MS - 250_000,
        drain_started_ms: 0,
        subnet: None,
        resource_version: 14,
    };
    let running = instance("6f1c2a34-0000-4000-8000-000000000001", "web");
    let mut pending = instance("0b9e77d1-0000-4000-8000-000000000002", "web");
    pending.node = Some("host-22".into());
    pending.address = None;
    pending.port = None;
    pending.phase = Phase::Pending;
    pending.health = Health::Unknown;
    pending.generation = 3;
    pending.reason = Some("replaces 6f1c2a34".into());
    pending.created_at_ms = NOW_MS - 45_000;
    let mut failed = instance("c3d4e5f6-0000-4000-8000-000000000003", "api");
    failed.provider = Provider::Ec2;
    failed.node = None;
    failed.provider_id = Some("i-0abc".into());
    failed.address = Some("172.31.0.9".into());
    failed.port = None;
    failed.phase = Phase::Failed;
    failed.health = Health::Unhealthy;
    failed.reason = Some("exited with status 1".into());
    vec![running, pending, failed]
}

fn events() -> Vec<Event> {
    vec![
        Event {
            id: 15,
            at_ms: NOW_MS - 600_000,
            object: "tier/web".into(),
            reason: "ScaledOut".into(),
            message: "requests_per_second 260 > target 200: 2 to 3".into(),
            scaling: None,
        },
        Event {
            id: 31,
            at_ms: NOW_MS - 30_000,
            object: "node/host-22".into(),
            reason: "NodeNotReady".into(),
            message: "no heartbeat for 40s".into(),
            scaling: None,
        },
    ]
}

#[test]
fn node_table_shows_roles_allocatable_of_capacity_and_heartbeat_age() {
    let mut balancer = node("lb-1");
    balancer.roles = vec![NodeRole::LoadBalancer];
    let mut ec2 = node("i-1");
    ec2.ec2_instance = Some(uuid::Uuid::from_u128(1));
    assert_eq!(
        render::node_table(&[node("host-1"), silent_node(), balancer, ec2], NOW_MS),
        "\
ID        STATUS     ROLES           ADDRESS     ZONE   CPU(ALLOC/CAP)   MEMORY(ALLOC/CAP)   LOAD   HEARTBEAT   VERSION
host-1    Ready      worker          10.0.0.5    a      6.5/8            12Gi/16Gi           0.52   3s          0.1.0
host-22   NotReady   worker          10.0.0.22   -      0.25/4           512Mi/2Gi           0.00   -           0.1.1
lb-1      Ready      load-balancer   10.0.0.5    a      6.5/8            12Gi/16Gi           0.52   3s          0.1.0
i-1       Ready      ec2-instance    10.0.0.5    a      6.5/8            12Gi/16Gi           0.52   3s          0.1.0
"
    );
}

#[test]
fn instance_table_shortens_ids_and_joins_address_and_port() {
    assert_eq!(
        render::instance_table(&instances(), NOW_MS),
        "\
ID         TIER   NODE      ADDRESS          PHASE     HEALTH      GEN   AGE   REASON
6f1c2a34   web    host-1    10.0.0.5:20001   Running   Healthy     2     5m
0b9e77d1   web    host-22   -                Pending   Unknown     3     45s   replaces 6f1c2a34
c3d4e5f6   api    -         172.31.0.9       Failed    Unhealthy   2     5m    exited with status 1
"
    );
}

#[test]
fn event_table_keeps_the_controllers_order() {
    assert_eq!(
        render::event_table(&events(), NOW_MS),
        "\
AGE   OBJECT         REASON         MESSAGE
10m   tier/web       ScaledOut      requests_per_second 260 > target 200: 2 to 3
30s   node/host-22   NodeNotReady   no heartbeat for 40s
"
    );
}

#[test]
fn describe_tier_lists_instances_and_the_last_twenty_events() {
    let web: Vec<Instance> = instances()
        .into_iter()
        .filter(|instance| instance.tier == "web")
        .collect();
    let many: Vec<Event> = (1..=25)
        .map(|n| Event {
            id: n,
            at_ms: NOW_MS - (30 - n) * 1_000,
            object: "tier/web".into(),
            reason: "ScaledOut".into(),
            message: format!("step {n}"),
            scaling: None,
        })
        .collect();
    let text = render::describe_tier(
        &tier("web", 7),
        render::Related {
            instances: Some(&web),
            events: Some(&many),
            pool: None,
        },
        NOW_MS,
    );
    let sections = text
        .split_once("\nInstances:\n")
        .map(|(_, rest)| format!("Instances:\n{rest}"))
        .unwrap_or_default();
    let mut expected = "\
Instances:
  ID         NODE      ADDRESS          PHASE     HEALTH    GEN   AGE   REASON
  6f1c2a34   host-1    10.0.0.5:20001   Running   Healthy   2     5m
  0b9e77d1   host-22   -                Pending   Unknown   3     45s   replaces 6f1c2a34
Scaling decisions:
"
    .to_string();
    // The last eight decisions about the count, then the last twenty events of any kind.
    for n in 18..=25 {
        expected.push_str(&format!("  {}s ago  step {n}\n", 30 - n));
    }
    expected.push_str("Events:\n  AGE   REASON      MESSAGE\n");
    for n in 6..=25 {
        let age = format!("{}s", 30 - n);
        expected.push_str(&format!("  {age:<3}   ScaledOut   step {n}\n"));
    }
    assert_eq!(sections, expected);
    assert!(text.contains("Conditions:\n  TYPE"), "{text}");

    let empty = render::describe_tier(
        &tier("web", 7),
        render::Related {
            instances: Some(&[]),
            events: Some(&[]),
            pool: None,
        },
        NOW_MS,
    );
    assert!(
        empty.ends_with("Instances:  none\nScaling decisions:  none\nEvents:  none\n"),
        "{empty}"
    );
    // The status block has an indented `Instances:` line of its own; the sections start a line.
    let older = render::describe_tier(&tier("web", 7), render::Related::default(), NOW_MS);
    assert!(
        !older.contains("\nInstances:") && !older.contains("\nEvents:"),
        "{older}"
    );
}

#[test]
fn describe_node_shows_capacity_metrics_instances_and_events() {
    let on_node: Vec<Instance> = instances().into_iter().take(1).collect();
    let text = render::describe_node(
        &node("host-1"),
        render::Related {
            instances: Some(&on_node),
            events: Some(&[]),
            pool: None,
        },
        NOW_MS,
    );
    assert_eq!(
        text,
        "\
Name:              host-1
Status:            Ready (ready: yes, cordoned: no, draining: no)
Address:           10.0.0.5
Zone:              a
Labels:            disk=ssd
Agent version:     0.1.0
Resource version:  12
Registered:        1970-01-01T00:46:40Z (2h ago)
Last heartbeat:    1970-01-01T02:46:37Z (3s ago)
Capacity:
  CPU:             8
  Memory:          16Gi
Allocatable:
  CPU:             6.5
  Memory:          12Gi
Metrics:
  CPU:             37.5% busy
  Memory:          10Gi available of 16Gi
  Load:            0.52 0.40 0.31
Instances:
  ID         TIER   ADDRESS          PHASE     HEALTH    AGE   REASON
  6f1c2a34   web    10.0.0.5:20001   Running   Healthy   5m
Events:  none
"
    );
    let silent = render::describe_node(&silent_node(), render::Related::default(), NOW_MS);
    for expected in [
        "NotReady (ready: no, cordoned: yes, draining: no)",
        "Zone:              -\n",
        "Labels:            none\n",
        "not known to the answering controller",
        "Metrics:           none reported\n",
        "Memory:          512Mi\n",
    ] {
        assert!(
            silent.contains(expected),
            "missing {expected:?} in\n{silent}"
        );
    }
}

/// Commands render ages against the real clock, so the fake controller moves the fixtures'
/// timestamps (every nonzero `*_ms` field) from `NOW_MS` to now: a heartbeat 3 s before
/// `NOW_MS` is 3 s old when printed.
fn at_real_time(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let offset = render::now_ms().saturating_sub(NOW_MS);
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| match value.as_u64() {
                    Some(ms) if key.ends_with("_ms") && ms != 0 => (key, Value::from(ms + offset)),
                    _ => (key, at_real_time(value)),
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(at_real_time).collect()),
        other => other,
    }
}

fn json_answer<T: serde::Serialize>(value: &T) -> Option<Answer> {
    let value = serde_json::to_value(value).unwrap_or_default();
    Some((200, "application/json", at_real_time(value).to_string()))
}

fn json_list<T: serde::Serialize>(items: Vec<T>) -> Option<Answer> {
    json_answer(&ItemList {
        items,
        resource_version: Some(40),
        next: None,
    })
}

fn not_found() -> Option<Answer> {
    Some((
        404,
        "application/problem+json",
        r#"{"type":"urn:strata:problem:not-found","title":"Not found","status":404,"detail":"no route"}"#.into(),
    ))
}

/// A controller with the node, instance and event routes; `with_events: false` is one from
/// before they existed, which knows only tiers.
fn node_server_answer(with_events: bool) -> impl Fn(&str) -> Option<Answer> + Send + Sync {
    move |target| {
        if target.starts_with("GET /v1/tiers/web")
            && !target.contains("/instances")
            && !target.contains("/pool")
        {
            return Some((200, "application/json", tier_json("web", 7)));
        }
        if !with_events {
            return not_found();
        }
        let node_json = |node: Node| json_answer(&node);
        match target {
            "GET /v1/nodes" => json_list(vec![node("host-1"), silent_node()]),
            "GET /v1/nodes/host-1" => node_json(node("host-1")),
            "POST /v1/nodes/host-1/cordon" => {
                let mut cordoned = node("host-1");
                cordoned.cordoned = true;
                cordoned.status = NodeStatus::Cordoned;
                node_json(cordoned)
            }
            "POST /v1/nodes/host-1/uncordon" => node_json(node("host-1")),
            "POST /v1/nodes/host-1/drain" => {
                let mut draining = node("host-1");
                draining.draining = true;
                draining.status = NodeStatus::Draining;
                node_json(draining)
            }
            "GET /v1/tiers/web/pool" => json_answer(&pool_view()),
            "GET /v1/instances" => json_list(instances()),
            "GET /v1/tiers/web/instances" => json_list(
                instances()
                    .into_iter()
                    .filter(|instance| instance.tier == "web")
                    .collect(),
            ),
            "GET /v1/events" => json_list(events()),
            "GET /v1/events?object=tier/web" => json_list(events()[..1].to_vec()),
            "GET /v1/events?object=node/host-1" | "GET /v1/events?object=tier/empty" => {
                json_list(Vec::<Event>::new())
            }
            _ => not_found(),
        }
    }
}

fn pool_view() -> crate::pool::PoolView {
    use crate::pool::*;
    let tier = tier("web", 7);
    PoolView {
        pool: Pool {
            tier: "web".into(),
            version: 41,
            load_balancer: tier.spec.load_balancer.clone(),
            health: tier.spec.health.clone(),
            servers: vec![PoolServer {
                instance_id: instances()[0].id,
                address: "10.0.0.5".into(),
                port: 20001,
                weight: 100,
                state: ServerState::Ready,
            }],
        },
        balancers: vec![BalancerView {
            node: "lb-1".into(),
            worker_pid: Some(4242),
            reloads: 0,
            report: LbTierReport {
                tier: "web".into(),
                version: 41,
                error: None,
                stats: LbStats {
                    request_rate: 12.5,
                    sessions: 3,
                    queue: 0,
                    response_time_ms: 4.0,
                    ..LbStats::default()
                },
                servers: Vec::new(),
            },
            reported_at_ms: NOW_MS - 1_000,
        }],
    }
}

#[tokio::test]
async fn get_pool_prints_servers_and_balancers() {
    let server = FakeServer::start(node_server_answer(true)).await;
    let (result, stdout, _) = run_against(&server, &["get", "pool", "web"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        stdout.starts_with("Tier web, pool version 41, http roundrobin on 0.0.0.0:8080\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SERVER     ADDRESS          WEIGHT   STATE\n6f1c2a34   10.0.0.5:20001   100      ready\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "\nLoad balancers:\n  NODE   VERSION   REQ/S   SESSIONS   QUEUE   RESPONSE   5XX"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("  lb-1   41        12.5    3          0       4ms"),
        "{stdout}"
    );
}

fn targets(server: &FakeServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .map(|request| request.split('|').next().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn describe_tier_adds_instances_and_events() {
    let server = FakeServer::start(node_server_answer(true)).await;
    let (result, stdout, _) = run_against(&server, &["describe", "tier", "web"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert!(stdout.starts_with("Name:"), "{stdout}");
    assert!(
        stdout.contains("\nInstances:\n  ID         NODE      ADDRESS          PHASE"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\n  6f1c2a34   host-1    10.0.0.5:20001   Running"),
        "{stdout}"
    );
    assert!(stdout.contains("\n  0b9e77d1   host-22   -"), "{stdout}");
    assert!(!stdout.contains("c3d4e5f6"), "{stdout}");
    assert!(
        stdout.contains("\nEvents:\n  AGE   REASON      MESSAGE\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ScaledOut   requests_per_second 260 > target 200: 2 to 3\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nLoad balancers:\n"), "{stdout}");
    assert_eq!(
        targets(&server),
        [
            "GET /v1/tiers/web",
            "GET /v1/tiers/web/instances",
            "GET /v1/events?object=tier/web",
            "GET /v1/tiers/web/pool",
        ]
    );
}

#[tokio::test]
async fn describe_tier_works_against_a_controller_without_instances_or_events() {
    let server = FakeServer::start(node_server_answer(false)).await;
    let (result, stdout, stderr) =
        run_against(&server, &["describe", "tier", "web", "--stale"], "").await;
    assert!(result.is_ok(), "{result:?} {stderr}");
    assert!(stdout.starts_with("Name:"), "{stdout}");
    assert!(stdout.contains("\nConditions:\n"), "{stdout}");
    assert!(!stdout.contains("\nInstances:"), "{stdout}");
    assert!(!stdout.contains("\nEvents:"), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(
        targets(&server),
        [
            "GET /v1/tiers/web?stale=true",
            "GET /v1/tiers/web/instances?stale=true",
            "GET /v1/events?object=tier/web&stale=true",
            "GET /v1/tiers/web/pool?stale=true",
        ]
    );
}

#[tokio::test]
async fn describe_fails_on_errors_other_than_a_missing_route() {
    let server = FakeServer::start(|target| {
        if target == "GET /v1/tiers/web" {
            Some((200, "application/json", tier_json("web", 7)))
        } else {
            Some((500, "text/plain", "boom".into()))
        }
    })
    .await;
    let (result, stdout, _) = run_against(&server, &["describe", "tier", "web"], "").await;
    assert_eq!(
        result.err().map(|error| error.to_string()).as_deref(),
        Some("Internal Server Error (500): boom")
    );
    assert!(stdout.is_empty(), "{stdout}");
}

#[tokio::test]
async fn describe_as_json_prints_the_object_alone() {
    let server = FakeServer::start(node_server_answer(true)).await;
    let (result, stdout, _) =
        run_against(&server, &["describe", "tier", "web", "-o", "json"], "").await;
    assert!(result.is_ok(), "{result:?}");
    let printed: Tier =
        serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    assert_eq!(printed, tier("web", 7));
    assert_eq!(targets(&server), ["GET /v1/tiers/web"]);
}

#[tokio::test]
async fn describe_node_picks_out_its_instances() {
    let server = FakeServer::start(node_server_answer(true)).await;
    let (result, stdout, _) = run_against(&server, &["describe", "node", "host-1"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        stdout.starts_with("Name:              host-1\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nInstances:\n  ID         TIER   ADDRESS          PHASE     HEALTH    AGE   REASON\n  6f1c2a34   web    10.0.0.5:20001   Running   Healthy   "),
        "{stdout}"
    );
    // Only host-1's instance: the pending one is on host-22 and the EC2 one on no node.
    assert_eq!(stdout.matches("   web    ").count(), 1, "{stdout}");
    assert!(!stdout.contains("c3d4e5f6"), "{stdout}");
    assert!(stdout.ends_with("\nEvents:  none\n"), "{stdout}");
    assert_eq!(
        targets(&server),
        [
            "GET /v1/nodes/host-1",
            "GET /v1/instances",
            "GET /v1/events?object=node/host-1",
        ]
    );
}

#[tokio::test]
async fn get_nodes_instances_and_events() {
    let server = FakeServer::start(node_server_answer(true)).await;

    let (result, stdout, _) = run_against(&server, &["get", "nodes"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        stdout.starts_with("ID        STATUS     ROLES    ADDRESS"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nhost-22   NotReady   worker   10.0.0.22   -      0.25/4"),
        "{stdout}"
    );

    let (result, stdout, _) =
        run_against(&server, &["get", "node", "host-1", "-o", "yaml"], "").await;
    assert!(result.is_ok(), "{result:?}");
    let printed: Node =
        serde_norway::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    // The fake controller moved the timestamps to the present; everything else is as sent.
    assert_eq!(
        printed,
        Node {
            last_heartbeat_ms: printed.last_heartbeat_ms,
            ec2_instance: None,
            registered_at_ms: printed.registered_at_ms,
            ..node("host-1")
        }
    );

    let (result, stdout, _) =
        run_against(&server, &["get", "instances", "--tier", "web"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(stdout.starts_with("ID         TIER   NODE"), "{stdout}");

    let (result, stdout, _) = run_against(&server, &["get", "instances", "-o", "json"], "").await;
    assert!(result.is_ok(), "{result:?}");
    let printed: ItemList<Instance> =
        serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    let ids: Vec<_> = printed.items.iter().map(|instance| instance.id).collect();
    let expected: Vec<_> = instances().iter().map(|instance| instance.id).collect();
    assert_eq!(ids, expected);

    let (result, stdout, _) = run_against(&server, &["get", "events"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        stdout.starts_with("AGE   OBJECT         REASON"),
        "{stdout}"
    );
    assert!(
        stdout.contains("   node/host-22   NodeNotReady   no heartbeat for 40s\n"),
        "{stdout}"
    );

    let (result, stdout, _) =
        run_against(&server, &["get", "events", "--object", "tier/empty"], "").await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(stdout, "No events.\n");

    assert_eq!(
        targets(&server),
        [
            "GET /v1/nodes",
            "GET /v1/nodes/host-1",
            "GET /v1/tiers/web/instances",
            "GET /v1/instances",
            "GET /v1/events",
            "GET /v1/events?object=tier/empty",
        ]
    );
}

#[tokio::test]
async fn cordon_uncordon_and_drain_say_what_happened() {
    let server = FakeServer::start(node_server_answer(true)).await;
    for (verb, expected) in [
        ("cordon", "node/host-1 cordoned\n"),
        ("uncordon", "node/host-1 uncordoned\n"),
        ("drain", "node/host-1 draining\n"),
    ] {
        let (result, stdout, _) = run_against(&server, &[verb, "host-1"], "").await;
        assert!(result.is_ok(), "{verb}: {result:?}");
        assert_eq!(stdout, expected);
    }
    let (result, stdout, _) = run_against(&server, &["drain", "host-1", "-o", "json"], "").await;
    assert!(result.is_ok(), "{result:?}");
    let printed: Node =
        serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    assert_eq!(printed.status, NodeStatus::Draining);
    // No body: the verb is the whole request.
    assert_eq!(
        server.requests()[..3],
        [
            "POST /v1/nodes/host-1/cordon||",
            "POST /v1/nodes/host-1/uncordon||",
            "POST /v1/nodes/host-1/drain||",
        ]
    );

    let (result, _, _) = run_against(&server, &["cordon", "host-9"], "").await;
    assert_eq!(
        result.err().map(|error| error.to_string()).as_deref(),
        Some("Not found (404): no route")
    );
}

#[test]
fn describe_tier_explains_autoscaler_decisions_and_a_pause() {
    use crate::tier::{PolicyEvaluation, ScalingBound, ScalingInputs};
    let inputs = ScalingInputs {
        at_ms: NOW_MS - 20_000,
        from: 2,
        to: 4,
        ready: 2,
        warming: 0,
        min: 2,
        max: 6,
        schedule: None,
        policies: vec![PolicyEvaluation {
            metric: "cpu_utilization".into(),
            value: Some(180.5),
            target: Some(50.0),
            recommendation: Some(8),
            note: "180.5 against target 50 on 2 instances asks for 8".into(),
        }],
        recommendation: Some(8),
        bounded_by: vec![ScalingBound::StepLimit {
            period_ms: 15_000,
            limit: 2,
            allowed: 4,
        }],
        stabilization_ms: 300_000,
        stabilization_adaptive: false,
        observed_startup_ms: None,
        reason: "scale out from 2 to 4: the policies ask for 8, limited to 2 more per 15s".into(),
    };
    let events = vec![
        Event {
            id: 1,
            at_ms: NOW_MS - 20_000,
            object: "tier/web".into(),
            reason: "ScaledOut".into(),
            message: inputs.reason.clone(),
            scaling: Some(Box::new(inputs)),
        },
        Event {
            id: 2,
            at_ms: NOW_MS - 5_000,
            object: "tier/web".into(),
            reason: "ScaledByOperator".into(),
            message: "desired 4 -> 3: scaled by an operator".into(),
            scaling: None,
        },
    ];
    let mut web = tier("web", 7);
    web.spec.scaling.policies = vec![crate::tier::ScalingPolicy::target_tracking(
        crate::tier::ScalingMetric::CpuUtilization,
        50.0,
    )];
    web.spec.scaling.desired = Some(3);
    let text = render::describe_tier(
        &web,
        render::Related {
            instances: None,
            events: Some(&events),
            pool: None,
        },
        NOW_MS,
    );
    assert!(
        text.contains("3 (set by hand: the autoscaler is paused; `stratactl scale tier web --auto` hands it back)"),
        "{text}"
    );
    let decisions = text
        .split_once("Scaling decisions:\n")
        .and_then(|(_, rest)| rest.split_once("Events:"))
        .map(|(section, _)| section.to_string())
        .unwrap_or_default();
    assert_eq!(
        decisions,
        "  20s ago  scale out from 2 to 4: the policies ask for 8, limited to 2 more per 15s
      cpu_utilization: 180.5, target 50, asks for 8 (180.5 against target 50 on 2 instances asks for 8)
      limited to 2 per 15s (allowed 4)
      2 ready, 0 starting or warming up, bounds 2..6
  5s ago  desired 4 -> 3: scaled by an operator
"
    );
}

#[test]
fn describe_tier_shows_whether_the_scale_in_window_adapts() {
    use crate::tier::{ScalingBound, ScalingInputs};
    let inputs = ScalingInputs {
        at_ms: NOW_MS - 20_000,
        from: 4,
        to: 4,
        ready: 4,
        min: 2,
        max: 6,
        bounded_by: vec![ScalingBound::Stabilization {
            window_ms: 120_000,
            highest: 4,
        }],
        stabilization_ms: 120_000,
        stabilization_adaptive: true,
        observed_startup_ms: Some(30_000),
        reason: "keep 4: the highest recommendation of the last 2m was 4".into(),
        ..ScalingInputs::default()
    };
    let events = vec![Event {
        id: 1,
        at_ms: NOW_MS - 20_000,
        object: "tier/web".into(),
        reason: "ScaledIn".into(),
        message: inputs.reason.clone(),
        scaling: Some(Box::new(inputs)),
    }];
    let mut web = tier("web", 7);
    web.spec.scaling.scale_in_stabilization = None;
    let related = render::Related {
        instances: None,
        events: Some(&events),
        pool: None,
    };
    let text = render::describe_tier(&web, related, NOW_MS);
    assert!(
        text.contains(
            "scale-in stabilization adaptive (3 start-ups, 1m..5m; 5m until one is seen)"
        ),
        "{text}"
    );
    assert!(
        text.contains("scale-in window 2m, adaptive: 3 × the observed start-up 30s, within 1m..5m"),
        "{text}"
    );
    web.spec.scaling.scale_in_stabilization = Some(crate::Duration::from_secs(45));
    let text = render::describe_tier(&web, related, NOW_MS);
    assert!(text.contains("scale-in stabilization 45s,"), "{text}");
}

use clap::error::ErrorKind;
use clap::CommandFactory;

use super::*;
use crate::cluster::{ClusterStatus, Member};
use crate::test_server::{Answer, FakeServer};
use crate::tier::{Condition, ScalingDecision, Tier, TierSpec, TierStatus};

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
                replicas: 3,
                resource_version: None,
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
            }),
            conditions: vec![Condition {
                condition_type: "Ready".into(),
                status: false,
                reason: "InstancesStarting".into(),
                message: "2 of 3 instances ready".into(),
                since_ms: 1_100_000,
            }],
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
    let text = render::describe_tier(&tier("web", 7), 1_160_000);
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
  scaling.mni: unknown field; expected one of `min`, `max`, `desired`, `policies`, `cooldown`, `scale_in_stabilization`, `max_step`, `step_period`
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

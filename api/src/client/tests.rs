//! The client against fake controllers on loopback: refusing, stuck, busy (503) and healthy ones.

use crate::test_server::{refusing_address, Answer, FakeServer};

use super::*;

fn client(servers: Vec<String>, deadline_ms: u64) -> Client {
    Client::new(ClientConfig {
        servers,
        transport: Transport::Plain,
        token: Some("secret-token".to_string()),
        request_timeout: Duration::from_millis(500),
        failover_deadline: Duration::from_millis(deadline_ms),
    })
    .unwrap_or_else(|error| panic!("client: {error}"))
}

const CLUSTER_JSON: &str = r#"{"node_id":2,"role":"follower","leader_id":1,"term":3,"commit_index":10,"applied_index":10,"last_log_index":10,"snapshot_index":0,"members":[{"id":1,"address":"127.0.0.1:7001","voter":true},{"id":2,"address":"127.0.0.1:7002","voter":true}]}"#;

fn cluster_answer() -> Option<Answer> {
    Some((200, "application/json", CLUSTER_JSON.to_string()))
}

fn unavailable() -> Option<Answer> {
    Some((
        503,
        "application/problem+json",
        r#"{"type":"urn:strata:problem:no-leader","title":"No leader","status":503,"detail":"election in progress"}"#.to_string(),
    ))
}

#[tokio::test]
async fn fails_over_from_a_refusing_server() {
    let good = FakeServer::start(|_| cluster_answer()).await;
    let client = client(vec![refusing_address().await, good.url()], 5_000);

    let status = client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.node_id, 2);
    assert_eq!(status.members.len(), 2);

    // Stickiness is shown by the 503 test, where the skipped server can count its requests.
    client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(good.requests().len(), 2);
    assert_eq!(good.requests()[0], "GET /v1/cluster|Bearer secret-token|");
}

#[tokio::test]
async fn fails_over_from_a_server_answering_503() {
    let busy = FakeServer::start(|_| unavailable()).await;
    let good = FakeServer::start(|_| cluster_answer()).await;
    let client = client(vec![busy.url(), good.url()], 5_000);

    client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        busy.requests().len(),
        1,
        "the 503 server is tried once, then skipped"
    );
    assert_eq!(good.requests().len(), 2);
}

#[tokio::test]
async fn fails_over_from_a_server_that_never_answers() {
    let stuck = FakeServer::start(|_| None).await;
    let good = FakeServer::start(|_| cluster_answer()).await;
    let client = client(vec![stuck.url(), good.url()], 5_000);

    let started = Instant::now();
    client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn retries_the_same_round_until_a_server_recovers() {
    // The only server answers 503 twice (an election), then succeeds.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let server = FakeServer::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) < 2 {
            unavailable()
        } else {
            cluster_answer()
        }
    })
    .await;
    let client = client(vec![server.url()], 5_000);
    client
        .cluster_status()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn client_errors_are_returned_without_failover() {
    let conflict = FakeServer::start(|_| {
        Some((
            409,
            "application/problem+json",
            r#"{"type":"urn:strata:problem:conflict","title":"Conflict","status":409,"detail":"tier web has resource version 12","current_resource_version":12}"#.to_string(),
        ))
    })
    .await;
    let other = FakeServer::start(|_| cluster_answer()).await;
    let client = client(vec![conflict.url(), other.url()], 5_000);

    let error = client.delete_tier("web", Some(11)).await.err();
    let problem = error.as_ref().and_then(ClientError::problem);
    assert_eq!(problem.map(|p| p.status), Some(409));
    assert_eq!(problem.and_then(|p| p.current_resource_version), Some(12));
    assert!(other.requests().is_empty());
    assert_eq!(
        conflict.requests(),
        ["DELETE /v1/tiers/web?resource_version=11|Bearer secret-token|"]
    );
}

#[tokio::test]
async fn non_problem_error_bodies_become_problems() {
    let server =
        FakeServer::start(|_| Some((404, "text/plain", "no such route".to_string()))).await;
    let client = client(vec![server.url()], 1_000);
    match client.get_tier("web", true).await {
        Err(ClientError::Problem(problem)) => {
            assert_eq!(problem.status, 404);
            assert_eq!(problem.detail, "no such route");
            assert_eq!(problem.title, "Not Found");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server.requests(),
        ["GET /v1/tiers/web?stale=true|Bearer secret-token|"]
    );
}

#[tokio::test]
async fn gives_up_at_the_deadline_naming_every_server() {
    let busy = FakeServer::start(|_| unavailable()).await;
    let refused = refusing_address().await;
    let client = client(vec![refused.clone(), busy.url()], 400);

    let started = Instant::now();
    let error = client.cluster_status().await.err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    match error {
        Some(ClientError::Unreachable { attempts }) => {
            assert_eq!(attempts.len(), 2, "{attempts:?}");
            assert!(
                attempts[0].starts_with(&format!("http://{refused}: cannot connect")),
                "{attempts:?}"
            );
            assert!(
                attempts[1].contains("503 Service Unavailable: election in progress"),
                "{attempts:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(busy.requests().len() >= 2, "retried within the deadline");
}

#[tokio::test]
async fn put_tier_reports_creation_and_sends_the_spec() {
    let tier_json = serde_json::json!({
        "name": "web",
        "template": {"driver": "process", "command": ["w"]},
        "scaling": {"min": 1, "max": 2},
        "resource_version": 7,
        "generation": 1,
        "created_at_ms": 1,
        "updated_at_ms": 1,
        "status": {"desired": 1, "current": 0, "ready": 0}
    })
    .to_string();
    let created = tier_json.clone();
    let server = FakeServer::start(move |_| Some((201, "application/json", created.clone()))).await;
    let client = client(vec![format!("http://{}/", server.url())], 1_000);

    let spec: TierSpec = crate::decode::decode_json(
        br#"{"name":"web","template":{"driver":"process","command":["w"]},"scaling":{"min":1,"max":2}}"#,
    )
    .unwrap_or_else(|p| panic!("{p}"));
    let outcome = client
        .put_tier(&spec)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(outcome.created);
    assert_eq!(outcome.tier.resource_version(), 7);

    let requests = server.requests();
    let (target, rest) = requests[0].split_once('|').unwrap_or_default();
    assert_eq!(target, "PUT /v1/tiers/web");
    let sent_body = rest
        .split_once('|')
        .map(|(_, body)| body)
        .unwrap_or_default();
    let sent: TierSpec =
        crate::decode::decode_json(sent_body.as_bytes()).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(sent, spec);
}

#[tokio::test]
async fn list_scale_and_generic_requests() {
    let server = FakeServer::start(|target| match target {
        "GET /v1/tiers" => Some((200, "application/json", r#"{"items":[]}"#.to_string())),
        "GET /v1/nodes" => Some((
            200,
            "application/json",
            r#"{"items":[{"id":"n1"}]}"#.to_string(),
        )),
        "DELETE /v1/cluster/members/3" => cluster_answer(),
        "POST /v1/cluster/members" => cluster_answer(),
        "POST /v1/nodes/n1/cordon" => Some((204, "application/json", String::new())),
        _ => Some((500, "text/plain", String::new())),
    })
    .await;
    let client = client(vec![server.url()], 1_000);

    assert!(client
        .list_tiers(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .is_empty());
    let nodes = client
        .request_json(Method::GET, "/v1/nodes", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(nodes["items"][0]["id"], "n1");
    let empty = client
        .request_json(
            Method::POST,
            "/v1/nodes/n1/cordon",
            Some(&serde_json::json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(empty, serde_json::Value::Null);
    client
        .remove_member(3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let request = AddMemberRequest {
        id: 3,
        address: "127.0.0.1:7003".into(),
        voter: false,
    };
    client
        .add_member(&request)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(server.requests().iter().any(|r| r == r#"POST /v1/cluster/members|Bearer secret-token|{"id":3,"address":"127.0.0.1:7003","voter":false}"#));

    // A 500 is the server's own answer: returned at once, as a problem.
    let error = client
        .scale_tier("web", &ScaleRequest::manual(2))
        .await
        .err();
    assert_eq!(
        error
            .as_ref()
            .and_then(ClientError::problem)
            .map(|p| p.status),
        Some(500)
    );
}

#[tokio::test]
async fn a_success_body_of_the_wrong_shape_is_a_decode_error() {
    let server =
        FakeServer::start(|_| Some((200, "application/json", "{\"x\":1}".to_string()))).await;
    let client = client(vec![server.url()], 1_000);
    assert!(matches!(
        client.cluster_status().await,
        Err(ClientError::Decode(_))
    ));
}

#[test]
fn server_addresses_are_normalized_or_refused() {
    let plain = Transport::Plain;
    assert_eq!(
        normalize_server("127.0.0.1:7001", &plain).ok().as_deref(),
        Some("http://127.0.0.1:7001")
    );
    assert_eq!(
        normalize_server(" http://c1:7001/ ", &plain)
            .ok()
            .as_deref(),
        Some("http://c1:7001")
    );
    for bad in [
        "",
        // https without a CA to trust: refused before any connection is tried.
        "https://c1:7001",
        "ftp://c1",
        "c1:7001/v1",
        "http://",
        "http://:80",
    ] {
        assert!(normalize_server(bad, &plain).is_err(), "{bad:?}");
    }
    // With TLS, a bare address takes https and an explicit scheme stays.
    let tls = Transport::Tls(std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    ));
    assert_eq!(
        normalize_server("c1:7001", &tls).ok().as_deref(),
        Some("https://c1:7001")
    );
    assert_eq!(
        normalize_server("https://c1:7001/", &tls).ok().as_deref(),
        Some("https://c1:7001")
    );
    assert_eq!(
        normalize_server("http://c1:7001", &tls).ok().as_deref(),
        Some("http://c1:7001")
    );
    assert!(matches!(
        Client::new(ClientConfig {
            servers: Vec::new(),
            ..ClientConfig::default()
        }),
        Err(ClientError::Config(_))
    ));
}

#[test]
fn path_segments_are_escaped() {
    assert_eq!(encode_segment("web-1"), "web-1");
    assert_eq!(encode_segment("../x?y"), "..%2Fx%3Fy");
}

#[test]
fn backoff_grows_and_stays_bounded() {
    for round in 0..40 {
        let delay = backoff(round);
        let ceiling = Duration::from_millis((50u64 << round.min(6)).min(2000));
        assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "round {round}: {delay:?}"
        );
    }
}

const NODE_JSON: &str = r#"{"id":"host-1","address":"10.0.0.5","zone":"a","capacity":{"cpu":8.0,"memory_mb":16384},"allocatable":{"cpu":6.5,"memory_mb":12288},"status":"Cordoned","ready":true,"cordoned":true,"draining":false,"agent_version":"0.1.0","last_heartbeat_ms":5000,"registered_at_ms":1000,"resource_version":12}"#;

const INSTANCE_JSON: &str = r#"{"id":"6f1c2a34-0000-4000-8000-000000000001","tier":"web","provider":"local","node":"host-1","address":"10.0.0.5","port":20001,"phase":"Running","health":"Healthy","generation":2,"created_at_ms":1000,"updated_at_ms":2000,"resource_version":14}"#;

const EVENT_JSON: &str =
    r#"{"id":15,"at_ms":3000,"object":"tier/web","reason":"ScaledOut","message":"2 to 3"}"#;

fn list_of(item: &str) -> Option<Answer> {
    Some((
        200,
        "application/json",
        format!(r#"{{"items":[{item}],"resource_version":20}}"#),
    ))
}

/// Answers every node, instance and event route this client knows, and 404 for anything
/// else, so a wrong path or query string fails the call.
fn node_routes(target: &str) -> Option<Answer> {
    match target {
        "GET /v1/nodes" | "GET /v1/nodes?stale=true" => list_of(NODE_JSON),
        "GET /v1/nodes/host-1"
        | "GET /v1/nodes/host-1?stale=true"
        | "POST /v1/nodes/host-1/cordon"
        | "POST /v1/nodes/host-1/uncordon"
        | "POST /v1/nodes/host-1/drain" => Some((200, "application/json", NODE_JSON.to_string())),
        "GET /v1/instances" | "GET /v1/tiers/web/instances?stale=true" => list_of(INSTANCE_JSON),
        "GET /v1/events" | "GET /v1/events?object=tier/web&stale=true" => list_of(EVENT_JSON),
        "GET /v1/events?object=instance/a%26b%3Dc" => list_of(""),
        _ => Some((
            404,
            "application/problem+json",
            r#"{"type":"urn:strata:problem:not-found","title":"Not found","status":404,"detail":"no route"}"#.to_string(),
        )),
    }
}

#[tokio::test]
async fn node_instance_and_event_calls_use_their_routes() {
    let server = FakeServer::start(node_routes).await;
    let client = client(vec![server.url()], 1_000);
    let fail = |error: ClientError| -> ! { panic!("{error}") };

    let nodes = client.list_nodes(false).await.unwrap_or_else(|e| fail(e));
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].status, crate::node::NodeStatus::Cordoned);
    assert_eq!(nodes[0].allocatable.memory_mb, 12288);
    client.list_nodes(true).await.unwrap_or_else(|e| fail(e));
    let node = client
        .get_node("host-1", true)
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(node.zone.as_deref(), Some("a"));
    client
        .get_node("host-1", false)
        .await
        .unwrap_or_else(|e| fail(e));
    client
        .cordon_node("host-1")
        .await
        .unwrap_or_else(|e| fail(e));
    client
        .uncordon_node("host-1")
        .await
        .unwrap_or_else(|e| fail(e));
    client
        .drain_node("host-1")
        .await
        .unwrap_or_else(|e| fail(e));

    let all = client
        .list_instances(None, false)
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(all[0].port, Some(20001));
    let web = client
        .list_instances(Some("web"), true)
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(web[0].phase, crate::node::Phase::Running);

    let events = client
        .list_events(None, false)
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(events[0].reason, "ScaledOut");
    client
        .list_events(Some("tier/web"), true)
        .await
        .unwrap_or_else(|e| fail(e));
    // Characters that would split the query are escaped; `/` stays readable.
    assert!(client
        .list_events(Some("instance/a&b=c"), false)
        .await
        .unwrap_or_else(|e| fail(e))
        .is_empty());

    let requests = server.requests();
    let targets: Vec<&str> = requests
        .iter()
        .map(|r| r.split('|').next().unwrap_or_default())
        .collect();
    assert_eq!(
        targets,
        [
            "GET /v1/nodes",
            "GET /v1/nodes?stale=true",
            "GET /v1/nodes/host-1?stale=true",
            "GET /v1/nodes/host-1",
            "POST /v1/nodes/host-1/cordon",
            "POST /v1/nodes/host-1/uncordon",
            "POST /v1/nodes/host-1/drain",
            "GET /v1/instances",
            "GET /v1/tiers/web/instances?stale=true",
            "GET /v1/events",
            "GET /v1/events?object=tier/web&stale=true",
            "GET /v1/events?object=instance/a%26b%3Dc",
        ]
    );
    // Node actions carry no body, and every call carries the token.
    assert_eq!(
        requests[4],
        "POST /v1/nodes/host-1/cordon|Bearer secret-token|"
    );
}

#[tokio::test]
async fn node_ids_cannot_change_the_route() {
    let server = FakeServer::start(node_routes).await;
    let client = client(vec![server.url()], 1_000);
    let error = client.drain_node("../tiers/web").await.err();
    assert_eq!(
        error
            .as_ref()
            .and_then(ClientError::problem)
            .map(|p| p.status),
        Some(404)
    );
    assert_eq!(
        server.requests()[0],
        "POST /v1/nodes/..%2Ftiers%2Fweb/drain|Bearer secret-token|"
    );
}

/// Lists follow `continue` until the last page.
#[tokio::test]
async fn lists_follow_continue_to_the_last_page() {
    let server = FakeServer::start(|target| match target {
        "GET /v1/events?object=tier%2Fweb" => Some((
            200,
            "application/json",
            r#"{"items":[1,2],"continue":"00000000000000000002"}"#.to_string(),
        )),
        "GET /v1/events?object=tier%2Fweb&continue=00000000000000000002" => {
            Some((200, "application/json", r#"{"items":[3]}"#.to_string()))
        }
        _ => Some((500, "text/plain", String::new())),
    })
    .await;
    let client = client(vec![server.url()], 1_000);
    let items: Vec<u32> = client
        .list_all("/v1/events?object=tier%2Fweb")
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", server.requests()));
    assert_eq!(items, [1, 2, 3]);
}

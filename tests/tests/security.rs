//! Security end to end: what a workload can see of the agent and the controllers, per-node
//! identity (a node speaks for itself only), credential revocation and join-token rotation,
//! and the modes of the files that hold secrets.
//!
//! These run when `STRATA_E2E=1` (deploy/test.sh and CI set it).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use strata_tests::{
    binary, e2e_enabled, eventually, kill_instances, secret_file, send, summary, until,
    workload_tier, AgentProcess, Cluster, ClusterOptions, ADMIN_TOKEN, CLUSTER_SECRET, JOIN_TOKEN,
    VIEWER_TOKEN,
};

/// A cluster with agents; kills the agents and every instance seen on drop.
struct Env {
    cluster: Cluster,
    agents: Vec<AgentProcess>,
    dir: tempfile::TempDir,
    seen: std::sync::Mutex<BTreeSet<String>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        let seen: Vec<String> = self
            .seen
            .lock()
            .map(|seen| seen.iter().cloned().collect())
            .unwrap_or_default();
        kill_instances(&seen);
    }
}

impl Env {
    async fn start(agents: &[(&str, &[&str])]) -> anyhow::Result<Env> {
        let cluster = Cluster::start(ClusterOptions {
            nodes: 1,
            heartbeat_grace: "3s",
            ..ClusterOptions::default()
        })
        .await?;
        let dir = tempfile::tempdir()?;
        let controllers = vec![cluster.address(1)];
        let mut started = Vec::new();
        for (node, flags) in agents {
            started.push(AgentProcess::start(dir.path(), node, &controllers, flags)?);
        }
        let env = Env {
            cluster,
            agents: started,
            dir,
            seen: std::sync::Mutex::default(),
        };
        for (node, _) in agents {
            env.wait_ready(node).await?;
        }
        Ok(env)
    }

    fn agent(&mut self, node: &str) -> &mut AgentProcess {
        match self.agents.iter_mut().find(|agent| agent.node_id == node) {
            Some(agent) => agent,
            None => panic!("no agent {node}"),
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let answer = send(
            &self.cluster.http,
            Method::GET,
            &self.cluster.url(1, path),
            Some(ADMIN_TOKEN),
            None,
        )
        .await?;
        anyhow::ensure!(answer.status == 200, "GET {path}: {answer:?}");
        Ok(answer.body)
    }

    async fn put_tier(&self, tier: &Value) -> anyhow::Result<()> {
        let name = tier["name"].as_str().unwrap_or_default();
        let answer = send(
            &self.cluster.http,
            Method::PUT,
            &self.cluster.url(1, &format!("/v1/tiers/{name}")),
            Some(ADMIN_TOKEN),
            Some(tier),
        )
        .await?;
        anyhow::ensure!(answer.status < 300, "PUT tier {name}: {answer:?}");
        Ok(())
    }

    async fn wait_ready(&self, node: &str) -> anyhow::Result<()> {
        eventually(
            Duration::from_secs(30),
            &format!("{node} Ready"),
            || async {
                let nodes = self
                    .get("/v1/nodes")
                    .await
                    .map_err(|error| error.to_string())?;
                let ready = nodes["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|n| n["id"] == node && n["status"] == "Ready");
                until(ready, (), || nodes.to_string())
            },
        )
        .await
    }

    /// Waits until `tier` has `count` Running, healthy instances; returns them.
    async fn running(&self, tier: &str, count: usize) -> anyhow::Result<Vec<Value>> {
        eventually(
            Duration::from_secs(40),
            &format!("{count} healthy instances of {tier}"),
            || async {
                let list = self
                    .get(&format!("/v1/tiers/{tier}/instances"))
                    .await
                    .map_err(|error| error.to_string())?;
                let instances: Vec<Value> = list["items"].as_array().cloned().unwrap_or_default();
                if let Ok(mut seen) = self.seen.lock() {
                    for instance in &instances {
                        if let Some(id) = instance["id"].as_str() {
                            seen.insert(id.to_string());
                        }
                    }
                }
                let healthy: Vec<Value> = instances
                    .iter()
                    .filter(|i| i["phase"] == "Running" && i["health"] == "Healthy")
                    .cloned()
                    .collect();
                let done = healthy.len() == count;
                until(done, healthy, || summary(&instances))
            },
        )
        .await
    }

    fn credential(&self, node: &str) -> anyhow::Result<String> {
        let path = self
            .dir
            .path()
            .join(format!("agent-{node}/node-credential"));
        Ok(std::fs::read_to_string(&path)?.trim().to_string())
    }

    /// A raw agent call: `path` with `token` and a JSON body; status and problem body.
    async fn agent_call(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> anyhow::Result<(u16, Value)> {
        let answer = send(
            &self.cluster.http,
            Method::POST,
            &self.cluster.url(1, path),
            Some(token),
            Some(body),
        )
        .await?;
        Ok((answer.status, answer.body))
    }
}

/// A directory anyone may write to (instances running as `nobody` write their findings here).
fn shared_dir(parent: &Path) -> anyhow::Result<PathBuf> {
    let dir = parent.join("out");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

/// Waits for `path` to exist and returns its text.
async fn read_when_written(path: &Path) -> anyhow::Result<String> {
    eventually(
        Duration::from_secs(30),
        &format!("{} written", path.display()),
        || async {
            match std::fs::read_to_string(path) {
                Ok(text) => Ok(Some(text)),
                Err(error) => Err(error.to_string()),
            }
        },
    )
    .await
}

/// The instance writes its environment, the agent's command line and environment
/// (`/proc/$PPID/...`: the agent is its parent) and the controller's command line to files,
/// then becomes the workload. Nothing in them may be a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_finds_no_secret_of_the_agent_or_the_controllers() -> anyhow::Result<()> {
    if !e2e_enabled("security") {
        return Ok(());
    }
    let env = Env::start(&[("host-a", &[])]).await?;
    let out = shared_dir(env.dir.path())?;
    let controller_pid = env
        .cluster
        .pid(1)
        .ok_or_else(|| anyhow::anyhow!("controller 1 has no pid"))?;
    let script = r#"
        env > "$OUT/env.tmp" && mv "$OUT/env.tmp" "$OUT/env"
        tr '\0' '\n' < /proc/$PPID/cmdline > "$OUT/agent-cmdline" 2>&1
        tr '\0' '\n' < /proc/$PPID/environ > "$OUT/agent-environ" 2>&1
        tr '\0' '\n' < /proc/$CONTROLLER_PID/cmdline > "$OUT/controller-cmdline" 2>&1
        echo done > "$OUT/done"
        exec "$WORKLOAD"
    "#;
    let mut tier = workload_tier("spy", 1, 1);
    tier["template"]["command"] = json!(["sh", "-c", script]);
    tier["template"]["env"] = json!({
        "OUT": out.display().to_string(),
        "CONTROLLER_PID": controller_pid.to_string(),
        "WORKLOAD": binary("strata-workload").display().to_string(),
    });
    env.put_tier(&tier).await?;
    env.running("spy", 1).await?;
    read_when_written(&out.join("done")).await?;

    let environment = std::fs::read_to_string(out.join("env"))?;
    let agent_cmdline = std::fs::read_to_string(out.join("agent-cmdline"))?;
    let agent_environ = std::fs::read_to_string(out.join("agent-environ"))?;
    let controller_cmdline = std::fs::read_to_string(out.join("controller-cmdline"))?;
    // The reads worked (the instance runs as the agent's user here, so /proc is open to it)
    // and read the right processes.
    assert!(
        agent_cmdline.contains("strata-agent") && agent_cmdline.contains("--join-token-file"),
        "{agent_cmdline}"
    );
    assert!(agent_environ.contains("RUST_LOG=info"), "{agent_environ}");
    assert!(
        controller_cmdline.contains("strata-controller")
            && controller_cmdline.contains("--admin-token-file"),
        "{controller_cmdline}"
    );
    let credential = env.credential("host-a")?;
    assert!(credential.len() >= 32, "credential {credential:?}");
    for (what, text) in [
        ("environment", &environment),
        ("agent command line", &agent_cmdline),
        ("agent environment", &agent_environ),
        ("controller command line", &controller_cmdline),
    ] {
        for secret in [
            ADMIN_TOKEN,
            VIEWER_TOKEN,
            CLUSTER_SECRET,
            JOIN_TOKEN,
            credential.as_str(),
        ] {
            assert!(
                !text.contains(secret),
                "the instance's {what} holds a secret: {text}"
            );
        }
    }
    // The environment is exactly what the agent hands over (sh adds PWD).
    let names: BTreeSet<&str> = environment
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    let expected: BTreeSet<&str> = [
        "PATH",
        "PORT",
        "STRATA_INSTANCE_ID",
        "OUT",
        "CONTROLLER_PID",
        "WORKLOAD",
        "PWD",
    ]
    .into();
    assert!(names.is_subset(&expected), "{names:?}");
    assert!(
        names.contains("PORT") && names.contains("STRATA_INSTANCE_ID") && names.contains("PATH"),
        "{names:?}"
    );
    Ok(())
}

/// With `--run-as nobody` an instance runs as nobody unless its template names a user, and
/// the agent's data dir (its credential) is closed to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_run_as_another_user_and_cannot_read_the_agents_files() -> anyhow::Result<()> {
    if !e2e_enabled("security") {
        return Ok(());
    }
    if !nix_is_root() {
        println!("skipped: running instances as another user needs root");
        return Ok(());
    }
    let env = Env::start(&[("host-a", &["--run-as", "nobody"])]).await?;
    let out = shared_dir(env.dir.path())?;
    let credential_path = env.dir.path().join("agent-host-a/node-credential");
    let script = r#"
        id -u > "$OUT/uid-$TIER"
        cat "$CREDENTIAL" > "$OUT/credential-$TIER" 2>&1
        echo done > "$OUT/done-$TIER"
        exec "$WORKLOAD"
    "#;
    for (name, user) in [("by-default", None), ("by-template", Some("daemon"))] {
        let mut tier = workload_tier(name, 1, 1);
        tier["template"]["command"] = json!(["sh", "-c", script]);
        tier["template"]["env"] = json!({
            "OUT": out.display().to_string(),
            "TIER": name,
            "CREDENTIAL": credential_path.display().to_string(),
            "WORKLOAD": binary("strata-workload").display().to_string(),
        });
        if let Some(user) = user {
            tier["template"]["user"] = json!(user);
        }
        env.put_tier(&tier).await?;
    }
    env.running("by-default", 1).await?;
    env.running("by-template", 1).await?;
    let credential = env.credential("host-a")?;
    for (name, uid) in [("by-default", "65534"), ("by-template", "1")] {
        read_when_written(&out.join(format!("done-{name}"))).await?;
        let seen_uid = std::fs::read_to_string(out.join(format!("uid-{name}")))?;
        assert_eq!(seen_uid.trim(), uid, "{name}");
        let read = std::fs::read_to_string(out.join(format!("credential-{name}")))?;
        assert!(!read.contains(&credential), "{name} read the credential");
        assert!(read.contains("Permission denied"), "{name}: {read}");
    }
    // Secrets on disk are their owner's alone.
    let mode = |path: &Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
    };
    assert_eq!(mode(&credential_path)?, 0o600);
    assert_eq!(mode(&env.dir.path().join("agent-host-a"))?, 0o700);
    let data_dir = &env.cluster.nodes[&1].data_dir;
    assert_eq!(mode(data_dir)?, 0o700);
    assert_eq!(mode(&data_dir.join("strata.db"))?, 0o600);
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn heartbeat(node: &str) -> Value {
    json!({"node_id": node, "instances": [], "wait_ms": 0})
}

fn registration(node: &str) -> Value {
    json!({"node_id": node, "address": "127.0.0.1",
           "capacity": {"cpu": 1.0, "memory_mb": 512}, "agent_version": "x"})
}

/// The issue's attack: a heartbeat in another node's name reporting no instances. With the
/// join token, another node's credential or the admin token it is refused with 403, and the
/// victim's instances keep running. A second agent claiming a registered id is refused and
/// on record; a restarted agent keeps its identity; a revoked credential stops working and
/// the agent registers again; a rotated join token replaces the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_speaks_for_itself_only() -> anyhow::Result<()> {
    if !e2e_enabled("security") {
        return Ok(());
    }
    let mut env = Env::start(&[("host-a", &[]), ("host-b", &[])]).await?;
    let mut tier = workload_tier("web", 2, 2);
    tier["placement"] = json!({"spread": "node"});
    env.put_tier(&tier).await?;
    let before = env.running("web", 2).await?;
    let on_b: BTreeSet<String> = before
        .iter()
        .filter(|i| i["node"] == "host-b")
        .filter_map(|i| i["id"].as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(!on_b.is_empty(), "nothing on host-b: {}", summary(&before));

    let credential_a = env.credential("host-a")?;
    let credential_b = env.credential("host-b")?;
    for (who, token) in [
        ("the join token", JOIN_TOKEN),
        ("host-a's credential", credential_a.as_str()),
        ("the admin token", ADMIN_TOKEN),
    ] {
        // Several, faster than the grace period, as an attacker would.
        for _ in 0..5 {
            let (status, body) = env
                .agent_call("/v1/agents/heartbeat", token, &heartbeat("host-b"))
                .await?;
            assert_eq!(status, 403, "heartbeat for host-b with {who}: {body}");
            assert_eq!(body["type"], "urn:strata:problem:forbidden", "{body}");
        }
    }
    let (status, body) = env
        .agent_call(
            "/v1/agents/register",
            &credential_a,
            &registration("host-b"),
        )
        .await?;
    assert_eq!(
        status, 403,
        "register host-b with host-a's credential: {body}"
    );
    // A second agent claiming host-b with the join token: refused, and on record.
    let (status, body) = env
        .agent_call("/v1/agents/register", JOIN_TOKEN, &registration("host-b"))
        .await?;
    assert_eq!(status, 403, "claim host-b with the join token: {body}");
    let events = env.get("/v1/events?object=node/host-b").await?;
    assert!(events.to_string().contains("NodeClaimRefused"), "{events}");
    // host-b's own credential works for host-b.
    let (status, body) = env
        .agent_call(
            "/v1/agents/register",
            &credential_b,
            &registration("host-b"),
        )
        .await?;
    // (This registration changed host-b's address facts to the same loopback address.)
    assert_eq!(status, 200, "{body}");
    assert!(body.get("credential").is_none(), "{body}");

    // Well past the heartbeat grace (3s): host-b's instances still run, unreplaced.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = env.running("web", 2).await?;
    let still_on_b: BTreeSet<String> = after
        .iter()
        .filter(|i| i["node"] == "host-b")
        .filter_map(|i| i["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(still_on_b, on_b, "{}", summary(&after));

    // An agent restarted with its data dir keeps its identity.
    env.agent("host-b").kill();
    env.agent("host-b").restart()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.wait_ready("host-b").await?;
    assert_eq!(env.credential("host-b")?, credential_b);
    let claims = |events: &Value| events.to_string().matches("NodeClaimRefused").count();
    assert_eq!(
        claims(&env.get("/v1/events?object=node/host-b").await?),
        1,
        "the restarted agent must not have claimed its node with the join token"
    );

    // Revocation through stratactl: the old credential stops working; the agent registers
    // again with the join token and gets a new one.
    let output = std::process::Command::new(binary("stratactl"))
        .args(["--server", &env.cluster.address(1)])
        .arg("--token-file")
        .arg(env.cluster.secrets_dir().join("admin-token"))
        .args(["revoke", "node", "host-b"])
        .output()?;
    assert!(output.status.success(), "{output:?}");
    let (status, body) = env
        .agent_call("/v1/agents/heartbeat", &credential_b, &heartbeat("host-b"))
        .await?;
    assert_eq!(status, 401, "a revoked credential: {body}");
    let renewed = eventually(Duration::from_secs(20), "host-b re-registers", || async {
        match env.credential("host-b") {
            Ok(credential) if !credential.is_empty() && credential != credential_b => {
                Ok(Some(credential))
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    env.wait_ready("host-b").await?;
    let (status, body) = env
        .agent_call("/v1/agents/heartbeat", &renewed, &heartbeat("host-b"))
        .await?;
    // (Answered, then corrected by the agent's own next heartbeat.)
    assert_eq!(status, 200, "{body}");
    let events = env.get("/v1/events?object=node/host-b").await?;
    assert!(
        events.to_string().contains("NodeCredentialRevoked"),
        "{events}"
    );

    // Join-token rotation: a new token in the file, SIGHUP; the old one stops registering.
    secret_file(
        &env.cluster.secrets_dir(),
        "join-token",
        "rotated-join-token",
    )?;
    let pid = env.cluster.pid(1).unwrap_or_default();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()?;
    assert!(status.success());
    // Probed with a node id of its own: until the reload lands the old token still registers,
    // and a probe that registered host-c would make host-c's registration below a claim on a
    // node that holds a credential.
    eventually(
        Duration::from_secs(10),
        "the old join token refused",
        || async {
            let (status, body) = env
                .agent_call(
                    "/v1/agents/register",
                    JOIN_TOKEN,
                    &registration("host-probe"),
                )
                .await
                .map_err(|error| error.to_string())?;
            until(status == 401, (), || format!("{status} {body}"))
        },
    )
    .await?;
    let (status, body) = env
        .agent_call(
            "/v1/agents/register",
            "rotated-join-token",
            &registration("host-c"),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["credential"].as_str().is_some_and(|c| c.len() == 64),
        "{body}"
    );
    // Registered nodes keep working.
    env.wait_ready("host-a").await?;
    Ok(())
}

/// Writes `request` on a fresh connection and returns the whole answer.
async fn raw_http(address: &str, request: &[u8]) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// The smaller holes: the bearer scheme in any case; transfer codings hyper would not decode;
/// errors from below the router as problem documents; NUL bytes and denormal CPU; a member
/// that cannot be reached answered promptly and truthfully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smaller_holes_are_closed() -> anyhow::Result<()> {
    if !e2e_enabled("security") {
        return Ok(());
    }
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        ..ClusterOptions::default()
    })
    .await?;
    let address = cluster.address(1);
    let http = &cluster.http;

    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let response = http
            .get(cluster.url(1, "/v1/tiers"))
            .header("Authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200, "{scheme}");
    }

    // Answers hyper would give without a body, and a coding it would not decode.
    let body = r#"{"name":"x"}"#;
    let cases: Vec<(String, &str, &str)> = vec![
        ("GARBAGE\r\n\r\n".to_string(), "400", "bad-request"),
        (
            format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "a".repeat(200_000)
            ),
            "431",
            "headers-too-large",
        ),
        (
            format!("GET /healthz?{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9_000)),
            "414",
            "uri-too-long",
        ),
        (
            format!(
                "PUT /v1/tiers/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            ),
            "501",
            "unsupported-transfer-coding",
        ),
    ];
    for (request, status, kind) in cases {
        let answer = raw_http(&address, request.as_bytes()).await?;
        let head: String = answer.chars().take(300).collect();
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{head}"
        );
        assert!(
            answer.contains(&format!("urn:strata:problem:{kind}")),
            "{head}"
        );
    }

    // Values no program could be started with.
    let mut tier = workload_tier("nul", 1, 1);
    tier["template"]["command"] = json!(["/bin/sh", "-c", "exit 0\u{0}"]);
    tier["template"]["env"] = json!({"A": "b\u{0}"});
    tier["template"]["cpu"] = json!(5e-324);
    let answer = send(
        http,
        Method::PUT,
        &cluster.url(1, "/v1/tiers/nul"),
        Some(ADMIN_TOKEN),
        Some(&tier),
    )
    .await?;
    assert_eq!(answer.status, 422, "{answer:?}");
    let paths: BTreeSet<String> = answer.body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|error| error["path"].as_str().map(str::to_string))
        .collect();
    let expected: BTreeSet<String> = ["template.command[2]", "template.env.A", "template.cpu"]
        .into_iter()
        .map(str::to_string)
        .collect();
    assert_eq!(paths, expected, "{answer:?}");

    // A member nobody answers at: told so within seconds, and it is on record as a learner.
    let unreachable = format!("127.0.0.1:{}", strata_tests::free_port());
    let started = std::time::Instant::now();
    let answer = send(
        http,
        Method::POST,
        &cluster.url(1, "/v1/cluster/members"),
        Some(ADMIN_TOKEN),
        Some(&json!({"id": 9, "address": unreachable, "voter": true})),
    )
    .await?;
    let took = started.elapsed();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(
        answer.body["type"], "urn:strata:problem:member-not-caught-up",
        "{answer:?}"
    );
    // The wait is CATCH_UP_WAIT (5 s), not the 30 s of the write deadline.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let status = cluster.status(1).await?;
    let member = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|member| member["id"] == 9)
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(member["voter"], false, "{status}");
    Ok(())
}

/// The limits through the API: each answered with a problem document naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_with_the_field_named() -> anyhow::Result<()> {
    if !e2e_enabled("security") {
        return Ok(());
    }
    let cluster = Cluster::start(ClusterOptions {
        nodes: 1,
        controller_args: vec!["--max-nodes", "2", "--max-tiers", "2"],
        ..ClusterOptions::default()
    })
    .await?;
    let http = &cluster.http;
    let call = |method: Method, path: &str, token: String, body: Value| {
        let url = cluster.url(1, path);
        async move { send(http, method, &url, Some(&token), Some(&body)).await }
    };
    let field_of = |answer: &strata_tests::Answer| -> Vec<String> {
        assert!(
            answer.content_type.starts_with("application/problem+json"),
            "{answer:?}"
        );
        answer.body["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|error| error["path"].as_str().map(str::to_string))
            .collect()
    };
    // Nodes: two register, the third is refused.
    let mut credential = String::new();
    for node in ["n-1", "n-2"] {
        let answer = call(
            Method::POST,
            "/v1/agents/register",
            JOIN_TOKEN.to_string(),
            registration(node),
        )
        .await?;
        assert_eq!(answer.status, 200, "{answer:?}");
        credential = answer.body["credential"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    let answer = call(
        Method::POST,
        "/v1/agents/register",
        JOIN_TOKEN.to_string(),
        registration("n-3"),
    )
    .await?;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(field_of(&answer), ["node_id"]);
    assert_eq!(answer.body["type"], "urn:strata:problem:limit");

    // A heartbeat's instance reason and LB error: 1,024 bytes at most.
    let mut beat = heartbeat("n-2");
    beat["instances"] = json!([{"id": uuid_text(1), "phase": "Failed", "health": "Unknown",
                                 "reason": "r".repeat(1025)}]);
    let answer = call(
        Method::POST,
        "/v1/agents/heartbeat",
        credential.clone(),
        beat,
    )
    .await?;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(field_of(&answer), ["instances[0].reason"]);
    let mut beat = heartbeat("n-2");
    beat["lb"] = json!({"tiers": [{"tier": "web", "version": 1, "error": "e".repeat(1025),
                                   "stats": {}}]});
    let answer = call(Method::POST, "/v1/agents/heartbeat", credential, beat).await?;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(field_of(&answer), ["lb.tiers[0].error"]);

    // Tiers: two fit, the third is refused; a replacement of an existing one is not.
    for name in ["t-1", "t-2"] {
        let answer = call(
            Method::PUT,
            &format!("/v1/tiers/{name}"),
            ADMIN_TOKEN.to_string(),
            workload_tier(name, 1, 1),
        )
        .await?;
        assert_eq!(answer.status, 201, "{answer:?}");
    }
    let answer = call(
        Method::PUT,
        "/v1/tiers/t-3",
        ADMIN_TOKEN.to_string(),
        workload_tier("t-3", 1, 1),
    )
    .await?;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(field_of(&answer), ["name"]);
    let answer = call(
        Method::PUT,
        "/v1/tiers/t-1",
        ADMIN_TOKEN.to_string(),
        workload_tier("t-1", 1, 2),
    )
    .await?;
    assert_eq!(answer.status, 200, "{answer:?}");
    // A spec beyond its size limits: the fields are named.
    let mut big = workload_tier("t-2", 1, 1);
    big["template"]["env"] = json!({"BIG": "v".repeat(5000)});
    let answer = call(Method::PUT, "/v1/tiers/t-2", ADMIN_TOKEN.to_string(), big).await?;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(field_of(&answer), ["template.env.BIG"]);

    // Lists come in pages: `limit`, then `continue` from the last key.
    let page = |query: &'static str| {
        let url = cluster.url(1, &format!("/v1/nodes{query}"));
        async move { send(http, Method::GET, &url, Some(ADMIN_TOKEN), None).await }
    };
    let first = page("?limit=1").await?;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["items"][0]["id"], "n-1", "{first:?}");
    assert_eq!(first.body["continue"], "n-1", "{first:?}");
    let second = page("?limit=1&continue=n-1").await?;
    assert_eq!(second.body["items"][0]["id"], "n-2", "{second:?}");
    assert!(second.body.get("continue").is_none(), "{second:?}");
    let bad = page("?limit=0").await?;
    assert_eq!(bad.status, 422, "{bad:?}");
    assert_eq!(field_of(&bad), ["limit"]);
    Ok(())
}

fn uuid_text(n: u128) -> String {
    format!("{:032x}", n)
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            if matches!(i, 8 | 12 | 16 | 20) {
                vec!['-', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

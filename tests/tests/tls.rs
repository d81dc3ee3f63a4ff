//! TLS end to end: a 3-node cluster serving mutual TLS (`--tls-cert`, `--client-ca`) with two
//! agents running a tier through it, `stratactl` with its certificate, and the clients it
//! refuses: no certificate, a certificate of another CA, plain HTTP. A controller given
//! neither TLS nor `--insecure-http` does not start. The whole agents suite also runs under
//! mutual TLS with `STRATA_E2E_TLS=1` (deploy/test.sh does so).
//!
//! These run when `STRATA_E2E=1` (deploy/test.sh and CI set it).

use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use strata_tests::{
    binary, e2e_enabled, eventually, kill_instances, send, until, workload_tier, AgentProcess,
    Cluster, ClusterOptions, Pki, ADMIN_TOKEN,
};

/// A client of the test PKI's CA, presenting `certificate` (from `pki`) if given.
fn client(pki: &Pki, certificate: Option<&str>) -> anyhow::Result<reqwest::Client> {
    Ok(pki
        .transport(certificate)?
        .apply(reqwest::Client::builder().timeout(Duration::from_secs(5)))
        .build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_runs_agents_and_refuses_strangers() -> anyhow::Result<()> {
    if !e2e_enabled("tls") {
        return Ok(());
    }
    let cluster = Cluster::start(ClusterOptions {
        tls: true,
        ..ClusterOptions::default()
    })
    .await?;
    let Some(pki) = cluster.pki.clone() else {
        anyhow::bail!("a TLS cluster has a PKI");
    };
    assert_eq!(cluster.scheme(), "https");
    let dir = tempfile::tempdir()?;
    let controllers: Vec<String> = (1..=3).map(|id| cluster.address(id)).collect();
    let mut agents = vec![
        AgentProcess::start(dir.path(), "host-a", &controllers, &[])?,
        AgentProcess::start(dir.path(), "host-b", &controllers, &[])?,
    ];
    let result = async {
        // Both agents register over TLS (and so the tier spreads over them).
        eventually(Duration::from_secs(30), "both nodes Ready", || async {
            let answer = send(
                &cluster.http,
                Method::GET,
                &cluster.url(1, "/v1/nodes"),
                Some(ADMIN_TOKEN),
                None,
            )
            .await
            .map_err(|error| error.to_string())?;
            let ready = answer.body["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| n["status"] == "Ready")
                .count();
            until(ready == 2, (), || answer.body.to_string())
        })
        .await?;
        // A write through a follower (forwarded to the leader over the TLS peer link) and the
        // agents, both over TLS, bring a tier up.
        let leader = cluster.status(1).await?["leader_id"].as_u64().unwrap_or(1);
        let follower = (1..=3).find(|id| *id != leader).unwrap_or(1);
        let answer = send(
            &cluster.http,
            Method::PUT,
            &cluster.url(follower, "/v1/tiers/web"),
            Some(ADMIN_TOKEN),
            Some(&workload_tier("web", 2, 4)),
        )
        .await?;
        assert!(answer.status < 300, "put tier: {answer:?}");
        let running = eventually(
            Duration::from_secs(60),
            "2 instances Running and healthy",
            || async {
                let answer = send(
                    &cluster.http,
                    Method::GET,
                    &cluster.url(1, "/v1/tiers/web/instances"),
                    Some(ADMIN_TOKEN),
                    None,
                )
                .await
                .map_err(|error| error.to_string())?;
                let items: Vec<Value> =
                    answer.body["items"].as_array().cloned().unwrap_or_default();
                let live: Vec<Value> = items
                    .into_iter()
                    .filter(|i| i["phase"] == "Running" && i["health"] == "Healthy")
                    .collect();
                if live.len() == 2 {
                    Ok(Some(live))
                } else {
                    Err(format!("{} live", live.len()))
                }
            },
        )
        .await?;
        let nodes: std::collections::BTreeSet<&str> =
            running.iter().filter_map(|i| i["node"].as_str()).collect();
        assert_eq!(nodes.len(), 2, "spread over both agents: {running:?}");

        // stratactl with the CA and its certificate reads the cluster; without the
        // certificate the handshake fails.
        let stratactl = |extra: &[String]| {
            Command::new(binary("stratactl"))
                .args(["--server", &cluster.address(2), "--token", ADMIN_TOKEN])
                .args(["--failover-deadline", "2s", "-o", "json"])
                .args(extra)
                .args(["get", "tiers"])
                .output()
        };
        let output = stratactl(&pki.client_flags("client"))?;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("\"web\""));
        let output = stratactl(&["--ca-cert".to_string(), pki.ca().display().to_string()])?;
        assert!(!output.status.success(), "no client certificate: refused");

        // Strangers: no certificate, a certificate of another CA, plain HTTP. Each fails before
        // a request is read, on a follower and on the leader alike.
        let no_certificate = client(&pki, None)?;
        let other = Pki::get("other")?;
        let other_ca = other
            .transport(Some("client"))?
            .apply(reqwest::Client::builder().timeout(Duration::from_secs(5)))
            .build()?;
        // Trusting the cluster's CA but presenting a certificate the other CA signed.
        let foreign_certificate =
            strata_api::tls::Transport::Tls(std::sync::Arc::new(strata_api::tls::client_config(
                &pki.ca(),
                Some(&strata_api::tls::Identity {
                    cert: other.cert("client"),
                    key: other.key("client"),
                }),
            )?))
            .apply(reqwest::Client::builder().timeout(Duration::from_secs(5)))
            .build()?;
        let plain = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        for id in 1..=3 {
            let url = cluster.url(id, "/v1/cluster");
            for (who, http) in [
                ("no certificate", &no_certificate),
                ("another CA's certificate", &foreign_certificate),
                ("a client trusting another CA", &other_ca),
            ] {
                let answer = http.get(&url).bearer_auth(ADMIN_TOKEN).send().await;
                assert!(answer.is_err(), "{who} on node {id}: {answer:?}");
            }
            let answer = plain
                .get(format!("http://{}/v1/cluster", cluster.address(id)))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await;
            assert!(
                answer.as_ref().map_or(true, |a| !a.status().is_success()),
                "plain HTTP on node {id}: {answer:?}"
            );
        }
        // The cluster kept serving its own clients meanwhile.
        let status = cluster.status(3).await?;
        assert!(status["leader_id"].as_u64().is_some(), "{status}");
        anyhow::Ok(())
    }
    .await;
    // Every instance the cluster knows of, whatever the outcome, so none outlives the test.
    let seen: Vec<String> = match send(
        &cluster.http,
        Method::GET,
        &cluster.url(1, "/v1/instances"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await
    {
        Ok(answer) => answer.body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["id"].as_str().map(str::to_string))
            .collect(),
        Err(_) => Vec::new(),
    };
    for agent in &mut agents {
        agent.kill();
    }
    kill_instances(&seen);
    if let Err(error) = &result {
        for agent in &agents {
            eprintln!("--- agent {}\n{}", agent.node_id, agent.log_tail());
        }
        for id in 1..=3 {
            eprintln!("--- node {id}\n{}", cluster.log_tail(id));
        }
        anyhow::bail!("{error:#}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_needs_tls_or_an_explicit_insecure_flag() -> anyhow::Result<()> {
    if !e2e_enabled("tls") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let output = Command::new(binary("strata-controller"))
        .args(["--node-id", "1", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .env_remove("STRATA_INSECURE_HTTP")
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("--insecure-http"),
        "{stderr}"
    );
    // A key without its certificate is refused by the flag parser.
    let pki = Pki::get("cluster")?;
    let output = Command::new(binary("strata-controller"))
        .args(["--node-id", "1", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("node"))
        .arg("--tls-key")
        .arg(pki.key("controller"))
        .output()?;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tls-cert"));
    Ok(())
}

/// A single controller on 127.0.0.1:`port` with its data under `dir`, serving TLS with the
/// flags `tls` (certificate, key, CAs), its output in `dir/node.log`.
fn tls_node(
    dir: &std::path::Path,
    port: u16,
    tls: &[(&str, &std::path::Path)],
) -> anyhow::Result<strata_tests::ProcessGuard> {
    let log = std::fs::File::create(dir.join("node.log"))?;
    let mut command = Command::new(binary("strata-controller"));
    command
        .args(["--node-id", "1", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("node"))
        .args(["--admin-token", ADMIN_TOKEN]);
    for (flag, path) in tls {
        command.arg(flag).arg(path);
    }
    strata_tests::ProcessGuard::spawn(command.stdout(log.try_clone()?).stderr(log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_a_client_ca_serves_clients_without_certificates() -> anyhow::Result<()> {
    if !e2e_enabled("tls") {
        return Ok(());
    }
    // The harness serves mutual TLS; this needs a node without --client-ca, started by hand.
    let pki = Pki::get("cluster")?;
    let dir = tempfile::tempdir()?;
    let port = strata_tests::free_port();
    let mut node = tls_node(
        dir.path(),
        port,
        &[
            ("--tls-cert", &pki.cert("controller")),
            ("--tls-key", &pki.key("controller")),
            ("--ca-cert", &pki.ca()),
        ],
    )?;
    let http = client(&pki, None)?;
    let url = format!("https://127.0.0.1:{port}/v1/cluster");
    let status = eventually(
        Duration::from_secs(20),
        "the node answers over TLS",
        || async {
            let answer = http
                .get(&url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .map_err(|error| error.to_string())?;
            answer
                .json::<Value>()
                .await
                .map(Some)
                .map_err(|error| error.to_string())
        },
    )
    .await?;
    assert!(status["leader_id"].is_u64(), "{status}");
    // A client that does not trust the server's CA refuses it.
    let other = client(&Pki::get("other")?, None)?;
    assert!(other.get(&url).send().await.is_err());
    node.kill();
    Ok(())
}

/// The certificate (DER) a TLS server on `port` presents, checked against `ca`.
fn served_certificate(port: u16, ca: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let config = strata_api::tls::client_config(ca, None)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    while connection.is_handshaking() {
        connection.complete_io(&mut socket)?;
    }
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.to_vec())
        .ok_or_else(|| anyhow::anyhow!("no certificate served"))
}

/// Replaces `to` with `from`'s content in one rename, as a certificate manager does.
fn install(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    let staging = to.with_extension("new");
    std::fs::copy(from, &staging)?;
    std::fs::rename(&staging, to)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_the_next_connection_without_a_restart(
) -> anyhow::Result<()> {
    if !e2e_enabled("tls") {
        return Ok(());
    }
    let pki = Pki::get("cluster")?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("node.pem"), dir.path().join("node-key.pem"));
    install(&pki.cert("controller"), &cert)?;
    install(&pki.key("controller"), &key)?;
    let port = strata_tests::free_port();
    let mut node = tls_node(
        dir.path(),
        port,
        &[
            ("--tls-cert", &cert),
            ("--tls-key", &key),
            ("--ca-cert", &pki.ca()),
        ],
    )?;
    let first = |name: &str| -> anyhow::Result<Vec<u8>> {
        Ok(strata_api::tls::load_certs(&pki.cert(name))?[0].to_vec())
    };
    let ca = pki.ca();
    let served = eventually(Duration::from_secs(20), "the node serves TLS", || {
        let ca = ca.clone();
        async move {
            served_certificate(port, &ca)
                .map(Some)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    assert!(
        served == first("controller")?,
        "the controller certificate first"
    );

    // Rotated: key then certificate (another of the CA's, for the same names). The pair is
    // mismatched for a moment; the node keeps serving the old one until both are in place.
    install(&pki.key("agent"), &key)?;
    assert!(served_certificate(port, &ca)? == first("controller")?);
    install(&pki.cert("agent"), &cert)?;
    assert!(
        served_certificate(port, &ca)? == first("agent")?,
        "the next connection gets the new certificate"
    );
    // A file that does not load leaves the last good pair in use.
    std::fs::write(&cert, "not a certificate")?;
    assert!(served_certificate(port, &ca)? == first("agent")?);
    // And the API answers over the new certificate, to a client of the same CA.
    install(&pki.cert("agent"), &cert)?;
    let http = client(&pki, None)?;
    let answer = http
        .get(format!("https://127.0.0.1:{port}/v1/cluster"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    node.kill();
    let log = std::fs::read_to_string(dir.path().join("node.log"))?;
    assert!(log.contains("TLS files reloaded"), "{log}");
    Ok(())
}

/// A client trusting the CAs in `trust`, presenting certificate `name` of `pki`.
fn presenting(trust: &std::path::Path, pki: &Pki, name: &str) -> anyhow::Result<reqwest::Client> {
    Ok(strata_api::tls::Transport::from_flags(
        Some(trust),
        Some(&pki.cert(name)),
        Some(&pki.key(name)),
    )?
    .apply(reqwest::Client::builder().timeout(Duration::from_secs(5)))
    .build()?)
}

/// Concatenates PEM files into `to`, in one rename.
fn bundle(files: &[std::path::PathBuf], to: &std::path::Path) -> anyhow::Result<()> {
    let mut text = String::new();
    for file in files {
        text.push_str(&std::fs::read_to_string(file)?);
    }
    let staging = to.with_extension("new");
    std::fs::write(&staging, text)?;
    std::fs::rename(&staging, to)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_bundles_are_followed_so_a_ca_rotates_without_a_restart() -> anyhow::Result<()> {
    if !e2e_enabled("tls") {
        return Ok(());
    }
    let (pki, next) = (Pki::get("cluster")?, Pki::get("other")?);
    let dir = tempfile::tempdir()?;
    // The node's client CA bundle, and a client's trust bundle, each with one CA at first.
    let (clients, trust) = (dir.path().join("clients.pem"), dir.path().join("trust.pem"));
    bundle(&[pki.ca()], &clients)?;
    bundle(&[next.ca()], &trust)?;
    let port = strata_tests::free_port();
    let mut node = tls_node(
        dir.path(),
        port,
        &[
            ("--tls-cert", &pki.cert("controller")),
            ("--tls-key", &pki.key("controller")),
            ("--client-ca", &clients),
            ("--ca-cert", &pki.ca()),
        ],
    )?;
    let url = format!("https://127.0.0.1:{port}/v1/cluster");
    let get = |http: reqwest::Client| {
        let url = url.clone();
        async move {
            http.get(&url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .map(|answer| answer.status().as_u16())
        }
    };
    // A client of the cluster's CA: the node is up.
    let known = client(&pki, Some("client"))?;
    eventually(
        Duration::from_secs(20),
        "the node answers over TLS",
        || async {
            get(known.clone())
                .await
                .map(|status| (status == 200).then_some(()))
                .map_err(|error| error.to_string())
        },
    )
    .await?;

    // Server side: a certificate of the next CA is refused, until the bundle holds that CA
    // (each check on a new client, so on a new connection: one established stays as it was).
    let newcomer = || presenting(&pki.ca(), &next, "client");
    assert!(get(newcomer()?).await.is_err(), "refused at first");
    bundle(&[pki.ca(), next.ca()], &clients)?;
    assert_eq!(
        get(newcomer()?).await?,
        200,
        "accepted once the bundle has its CA"
    );
    bundle(&[pki.ca()], &clients)?;
    assert!(
        get(newcomer()?).await.is_err(),
        "refused after the CA left the bundle"
    );

    // Client side: a client trusting only the next CA refuses the node's certificate, until
    // its trust bundle holds the cluster's CA too; the same client then connects.
    let follower = presenting(&trust, &pki, "client")?;
    assert!(get(follower.clone()).await.is_err(), "untrusted at first");
    bundle(&[next.ca(), pki.ca()], &trust)?;
    assert_eq!(
        get(follower).await?,
        200,
        "trusted once its bundle has the CA"
    );
    node.kill();
    Ok(())
}

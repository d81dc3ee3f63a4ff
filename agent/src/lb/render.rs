//! `haproxy.cfg` from a [`Layout`]: deterministic (same layout, same bytes), and complete:
//! every slot is written with the server it holds now, so an HAProxy started or reloaded from
//! the file serves the current pool without any Runtime API command.
//!
//! The keywords used, from HAProxy 2.6's configuration manual:
//! - global `master-worker` (3.1) and `stats socket ... level admin expose-fd listeners`
//!   (3.1, 5.1): the Runtime API; `expose-fd` lets a new process take the listening sockets
//!   over (in master-worker mode the master passes them anyway through its socketpairs).
//! - `balance` (4.2) for every algorithm; `hash-type consistent` for `source` and `uri`, which
//!   makes their weights dynamic and moves only the clients of a server that comes or goes.
//! - `cookie <name> insert indirect nocache dynamic` + `dynamic-cookie-key` (4.2): a server's
//!   cookie is a hash of its address, port and the key, so it needs no `cookie` on the server
//!   line (which slots cannot have) and two LB agents with the same key agree on it.
//! - `option httpchk GET <path>`, `check inter/rise/fall`, `timeout check` (4.2, 5.2).
//! - `retry-on conn-failure empty-response response-timeout`, `retries`, `option redispatch`
//!   (4.2; retry-on is ignored outside http mode, where `conn-failure` is the default).
//! - server `disabled` (5.2): a free slot starts in maintenance.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use strata_api::{Algorithm, LbMode, ServerState};

use super::layout::{backend_name, frontend_name, rendered_weights, server_name, Layout};

/// Where a free slot points. It is in maintenance, so HAProxy neither checks nor uses it.
pub const PLACEHOLDER: &str = "127.0.0.1:1";

/// How often a request may be retried on a failed connection or an empty answer.
const RETRIES: u32 = 3;

/// Old workers still finishing connections after a reload are stopped this long after it, so
/// frequent reloads cannot pile up processes.
const HARD_STOP_AFTER: &str = "10m";

/// Where the state dir's files live; the caller passes it so the file names absolute paths.
pub struct RenderPaths<'a> {
    pub admin_socket: &'a Path,
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

fn algorithm(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Roundrobin => "roundrobin",
        Algorithm::StaticRr => "static-rr",
        Algorithm::Leastconn => "leastconn",
        Algorithm::Source => "source",
        Algorithm::Uri => "uri",
        Algorithm::Random => "random",
        Algorithm::First => "first",
    }
}

fn mode(mode: LbMode) -> &'static str {
    match mode {
        LbMode::Http => "http",
        LbMode::Tcp => "tcp",
    }
}

/// The whole configuration file.
pub fn render(layout: &Layout, paths: &RenderPaths<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by strata-agent from the pools it serves; do not edit:"
    );
    let _ = writeln!(out, "# the agent rewrites it on every pool change.");
    let _ = writeln!(out, "global");
    let _ = writeln!(out, "    master-worker");
    let _ = writeln!(
        out,
        "    stats socket {} mode 600 level admin expose-fd listeners",
        paths.admin_socket.display()
    );
    let _ = writeln!(out, "    stats timeout 30s");
    let _ = writeln!(out, "    hard-stop-after {HARD_STOP_AFTER}");
    let _ = writeln!(out);
    let _ = writeln!(out, "defaults");
    let _ = writeln!(out, "    timeout connect 5s");
    let _ = writeln!(out, "    timeout client 30s");
    let _ = writeln!(out, "    timeout server 30s");
    for (tier, layout) in layout {
        let frontend = &layout.frontend;
        let http = frontend.mode == LbMode::Http;
        let backend = backend_name(tier);
        let _ = writeln!(out);
        let _ = writeln!(out, "# tier {tier}, pool version {}", layout.version);
        let _ = writeln!(out, "frontend {}", frontend_name(tier));
        let _ = writeln!(out, "    mode {}", mode(frontend.mode));
        match &frontend.tls_certificate {
            Some(certificate) => {
                let _ = writeln!(out, "    bind {} ssl crt {certificate}", frontend.listen);
            }
            None => {
                let _ = writeln!(out, "    bind {}", frontend.listen);
            }
        }
        let _ = writeln!(out, "    timeout client {}", millis(frontend.idle_timeout));
        if http {
            let _ = writeln!(out, "    option forwardfor");
        }
        let _ = writeln!(out, "    default_backend {backend}");
        let _ = writeln!(out);
        let _ = writeln!(out, "backend {backend}");
        let _ = writeln!(out, "    mode {}", mode(frontend.mode));
        let _ = writeln!(out, "    balance {}", algorithm(frontend.algorithm));
        if matches!(frontend.algorithm, Algorithm::Source | Algorithm::Uri) {
            let _ = writeln!(out, "    hash-type consistent");
        }
        let _ = writeln!(
            out,
            "    timeout connect {}",
            millis(frontend.connect_timeout)
        );
        let _ = writeln!(out, "    timeout server {}", millis(frontend.idle_timeout));
        let _ = writeln!(out, "    timeout check {}", millis(frontend.check.timeout));
        let _ = writeln!(out, "    retries {RETRIES}");
        let _ = writeln!(out, "    option redispatch");
        if http {
            let _ = writeln!(
                out,
                "    retry-on conn-failure empty-response response-timeout"
            );
        }
        if let Some(path) = &frontend.check.http_path {
            let _ = writeln!(out, "    option httpchk GET {path}");
        }
        if let (true, Some(cookie)) = (http, &frontend.sticky_cookie) {
            let _ = writeln!(out, "    cookie {cookie} insert indirect nocache dynamic");
            // The same on every LB agent, so LB1 and LB2 hand out the same cookies.
            let _ = writeln!(out, "    dynamic-cookie-key strata-{tier}");
        }
        let mut server_options = format!(
            "check inter {} rise {} fall {}",
            millis(frontend.check.interval),
            frontend.check.rise,
            frontend.check.fall
        );
        if !frontend.slowstart.is_zero() {
            let _ = write!(server_options, " slowstart {}", millis(frontend.slowstart));
        }
        let _ = writeln!(out, "    default-server {server_options}");
        let weights = rendered_weights(layout);
        for (index, slot) in layout.slots.iter().enumerate() {
            let name = server_name(index);
            let weight = weights[index];
            match slot {
                Some(server) => {
                    let address = std::net::SocketAddr::new(server.address, server.port);
                    let note = match server.state {
                        ServerState::Ready => "",
                        ServerState::Drain => "draining ",
                    };
                    let _ = writeln!(
                        out,
                        "    server {name} {address} weight {weight} # {note}instance {}",
                        server.instance_id
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "    server {name} {PLACEHOLDER} weight {weight} disabled # free"
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use strata_api::{Algorithm, HealthProtocol, LbMode, ServerState};

    use super::*;
    use crate::lb::layout::desired_layout;
    use crate::lb::layout::tests::{pool, server};

    fn golden_layout() -> Layout {
        let mut web = pool(
            "web",
            8080,
            41,
            vec![server(1, ServerState::Ready), server(2, ServerState::Drain)],
        );
        web.load_balancer.sticky_cookie = Some("STRATA".to_string());
        web.load_balancer.slowstart = strata_api::Duration::from_secs(2);
        let mut db = pool("db", 5432, 7, vec![server(3, ServerState::Ready)]);
        db.load_balancer.mode = LbMode::Tcp;
        db.load_balancer.algorithm = Algorithm::Source;
        db.health.protocol = HealthProtocol::Tcp;
        db.servers[0].weight = 30;
        let (layout, errors) = desired_layout(&[web, db], &Layout::new(), &BTreeMap::new());
        assert!(errors.is_empty());
        layout
    }

    fn golden_text() -> String {
        render(
            &golden_layout(),
            &RenderPaths {
                admin_socket: Path::new("/var/lib/strata/lb/admin.sock"),
            },
        )
    }

    /// The file for a tcp and an http tier. `STRATA_UPDATE_GOLDEN=1` rewrites the golden copy
    /// (review the diff).
    #[test]
    fn renders_the_golden_file() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/lb/testdata/haproxy.cfg");
        let text = golden_text();
        if std::env::var_os("STRATA_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).expect("write golden file");
        }
        let golden = std::fs::read_to_string(&path).expect("read golden file");
        assert_eq!(
            text,
            golden,
            "rendered file differs from {}",
            path.display()
        );
        assert_eq!(text, golden_text(), "rendering is deterministic");
    }

    /// HAProxy itself accepts the golden file (skipped where it is not installed).
    #[test]
    fn haproxy_accepts_the_golden_file() {
        let binary = Path::new("/usr/sbin/haproxy");
        if !binary.exists() {
            eprintln!("skipped: haproxy not installed");
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("haproxy.cfg");
        let text = render(
            &golden_layout(),
            &RenderPaths {
                admin_socket: &dir.path().join("admin.sock"),
            },
        );
        std::fs::write(&file, text).expect("write");
        let output = std::process::Command::new(binary)
            .args(["-c", "-f"])
            .arg(&file)
            .output()
            .expect("run haproxy -c");
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    #[test]
    fn every_algorithm_and_tls_are_written_as_haproxy_spells_them() {
        for (algorithm, keyword) in [
            (Algorithm::Roundrobin, "balance roundrobin\n"),
            (Algorithm::StaticRr, "balance static-rr\n"),
            (Algorithm::Leastconn, "balance leastconn\n"),
            (
                Algorithm::Source,
                "balance source\n    hash-type consistent\n",
            ),
            (Algorithm::Uri, "balance uri\n    hash-type consistent\n"),
            (Algorithm::Random, "balance random\n"),
            (Algorithm::First, "balance first\n"),
        ] {
            let mut web = pool("web", 8080, 1, vec![]);
            web.load_balancer.algorithm = algorithm;
            web.load_balancer.tls_certificate = Some("/etc/strata/web.pem".to_string());
            let (layout, _) = desired_layout(&[web], &Layout::new(), &BTreeMap::new());
            let text = render(
                &layout,
                &RenderPaths {
                    admin_socket: Path::new("/run/admin.sock"),
                },
            );
            assert!(text.contains(keyword), "{algorithm:?}:\n{text}");
            assert!(text.contains("bind 127.0.0.1:8080 ssl crt /etc/strata/web.pem\n"));
            assert_eq!(text.matches(" disabled # free").count(), 8);
        }
    }
}

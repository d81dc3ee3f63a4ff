//! Simulated hosts for end-to-end tests: each host is a Linux network namespace joined to a
//! bridge in the root namespace. Needs root (`CAP_NET_ADMIN`) and `ip` from iproute2. Every
//! namespace and link a run creates is removed when its `Network` is dropped, however the test
//! ends; a run that was killed outright is cleaned up by the next one (see `sweep_stale`).

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Prefixes of everything a run creates; the rest of each name is the test process's pid (and
/// a host letter), so parallel runs never collide and leftovers name the run that made them.
/// Interface names stay within Linux's 15 characters: 4 + 7 pid digits + 2 letters.
const NAMESPACE_PREFIX: &str = "strata-e2e-";
const BRIDGE_PREFIX: &str = "stbr";
const BRIDGE_VETH_PREFIX: &str = "stbv";
const HOST_VETH_PREFIX: &str = "sthv";

pub fn running_as_root() -> anyhow::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    // "Uid:	real	effective	saved	filesystem"
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(effective == "0")
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// One simulated host: a namespace with one end of a veth pair, the other end on the bridge.
pub struct Host {
    pub node_id: String,
    pub namespace: String,
    /// The end on the bridge, in the root namespace: the link the test takes down.
    pub bridge_veth: String,
    /// The end inside the namespace, carrying `ip`.
    pub host_veth: String,
    pub ip: Ipv4Addr,
}

/// The bridge and its hosts. Dropping it kills whatever still runs in the namespaces and deletes
/// the namespaces, the veths and the bridge; it exists before the first `ip` command that
/// creates anything, so a failed set-up is cleaned up too.
pub struct Network {
    pub bridge: String,
    pub bridge_ip: Ipv4Addr,
    pub hosts: Vec<Host>,
}

impl Network {
    pub fn create(node_ids: &[&str]) -> anyhow::Result<Network> {
        let pid = std::process::id();
        // Tests of one process (`cargo test` runs them on threads) tell their networks apart
        // by a letter after the pid; only the first sweeps, since later ones would take the
        // first one's links (same pid) for leftovers.
        static NETWORKS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let run = NETWORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if run == 0 {
            sweep_stale(pid);
        }
        let run = char::from(b'A' + run % 26);
        let _guard = SUBNET_CHOICE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let subnet = free_subnet(pid)?;
        let network = Network {
            bridge: format!("{BRIDGE_PREFIX}{pid}{run}"),
            bridge_ip: Ipv4Addr::new(10, 251, subnet, 1),
            hosts: node_ids
                .iter()
                .zip(b'a'..)
                .zip(10u8..)
                .map(|((node_id, letter), last)| {
                    let letter = char::from(letter);
                    Host {
                        node_id: node_id.to_string(),
                        namespace: format!("{NAMESPACE_PREFIX}{pid}-{run}{letter}"),
                        bridge_veth: format!("{BRIDGE_VETH_PREFIX}{pid}{run}{letter}"),
                        host_veth: format!("{HOST_VETH_PREFIX}{pid}{run}{letter}"),
                        ip: Ipv4Addr::new(10, 251, subnet, last),
                    }
                })
                .collect(),
        };
        network.set_up()?;
        Ok(network)
    }

    fn set_up(&self) -> anyhow::Result<()> {
        let bridge = self.bridge.as_str();
        ip(&["link", "add", bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.bridge_ip),
            "dev",
            bridge,
        ])?;
        ip(&["link", "set", bridge, "up"])?;
        for host in &self.hosts {
            let namespace = host.namespace.as_str();
            ip(&["netns", "add", namespace])?;
            ip(&[
                "link",
                "add",
                &host.bridge_veth,
                "type",
                "veth",
                "peer",
                "name",
                &host.host_veth,
            ])?;
            ip(&["link", "set", &host.host_veth, "netns", namespace])?;
            ip(&["link", "set", &host.bridge_veth, "master", bridge])?;
            ip(&["link", "set", &host.bridge_veth, "up"])?;
            ip(&[
                "-n",
                namespace,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                &host.host_veth,
            ])?;
            ip(&["-n", namespace, "link", "set", &host.host_veth, "up"])?;
            ip(&["-n", namespace, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub fn host(&self, node_id: &str) -> anyhow::Result<&Host> {
        self.hosts
            .iter()
            .find(|host| host.node_id == node_id)
            .with_context(|| format!("no host {node_id}"))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_namespace(&host.namespace);
            // Deleting the namespace deletes its veth pair; this covers a set-up that failed
            // before the peer moved into the namespace.
            let _ = ip(&["link", "del", &host.bridge_veth]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Kills (SIGKILL) every process in `namespace`, then deletes it. A namespace outlives its
/// name while a process holds it, so the processes go first.
pub fn remove_namespace(namespace: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(text) = ip(&["netns", "pids", namespace]) {
        let pids: Vec<&str> = text.split_whitespace().collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = ip(&["netns", "del", namespace]);
}

/// Removes what an earlier run left behind when it was killed before its cleanup ran: the
/// namespaces and links whose pid is no longer a live process (or is this process, which has
/// created nothing yet, so they are from a dead run whose pid was reused), and the controllers
/// that run listened on its bridge, which outlive a killed test in the root namespace.
fn sweep_stale(own_pid: u32) {
    let stale = |pid: &str| {
        pid.parse::<u32>()
            .is_ok_and(|pid| pid == own_pid || !alive(pid))
    };
    let namespaces = ip(&["netns", "list"]).unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let pid = name
            .strip_prefix(NAMESPACE_PREFIX)
            .and_then(|rest| rest.split('-').next());
        if pid.is_some_and(stale) {
            remove_namespace(name);
        }
    }
    // `ip -o link` lines read "7: stbv1234a@if6: <...> ...".
    let links = ip(&["-o", "link", "show"]).unwrap_or_default();
    for line in links.lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .and_then(|name| name.split('@').next())
        else {
            continue;
        };
        for prefix in [BRIDGE_VETH_PREFIX, HOST_VETH_PREFIX, BRIDGE_PREFIX] {
            let pid = name
                .strip_prefix(prefix)
                .map(|rest| rest.trim_end_matches(|c: char| c.is_ascii_alphabetic()));
            if pid.is_some_and(stale) {
                if prefix == BRIDGE_PREFIX {
                    kill_listeners_on_bridge(name);
                }
                let _ = ip(&["link", "del", name]);
                break;
            }
        }
    }
}

/// Whether `pid` is a process that has not exited. A killed test whose parent is gone can stay
/// a zombie for a while, until pid 1 reaps it; it counts as dead.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Kills (SIGKILL) the processes started with an argument `<address>:<port>` (a controller's
/// `--listen`) for the IPv4 address of `bridge`.
fn kill_listeners_on_bridge(bridge: &str) {
    // `ip -4 -o addr` lines read "9: stbr1234    inet 10.251.7.1/24 brd ...".
    let text = ip(&["-4", "-o", "addr", "show", "dev", bridge]).unwrap_or_default();
    let Some(address) = text
        .split_whitespace()
        .skip_while(|word| *word != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
    else {
        return;
    };
    let prefix = format!("{address}:");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let listens = std::fs::read(entry.path().join("cmdline")).is_ok_and(|bytes| {
            bytes
                .split(|byte| *byte == 0)
                .any(|arg| arg.starts_with(prefix.as_bytes()))
        });
        if listens && pid.parse::<u32>().is_ok() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    }
}

/// A third octet for 10.251.X.0/24 that no address or route here uses yet, starting from one
/// derived from the pid so that parallel runs start apart.
/// Held from choosing a subnet until its bridge has the address, so two networks of one
/// process never choose the same one.
static SUBNET_CHOICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn free_subnet(pid: u32) -> anyhow::Result<u8> {
    let used = format!(
        "{}\n{}",
        ip(&["-4", "-o", "addr", "show"])?,
        ip(&["-4", "route", "show", "table", "all"])?
    );
    let start = pid % 254;
    (0..254)
        .map(|offset| ((start + offset) % 254 + 1) as u8)
        .find(|octet| !used.contains(&format!("10.251.{octet}.")))
        .context("every 10.251.X.0/24 subnet is in use")
}

impl Network {
    /// Cuts `node_id` off from every other host (blackhole routes both ways) while the root
    /// namespace, where clients run, still reaches it: a partition, not a crash.
    pub fn cut_off(&self, node_id: &str) -> anyhow::Result<()> {
        let cut = self.host(node_id)?;
        for other in self.hosts.iter().filter(|host| host.node_id != node_id) {
            ip(&[
                "-n",
                &cut.namespace,
                "route",
                "add",
                "blackhole",
                &format!("{}/32", other.ip),
            ])?;
            ip(&[
                "-n",
                &other.namespace,
                "route",
                "add",
                "blackhole",
                &format!("{}/32", cut.ip),
            ])?;
        }
        Ok(())
    }

    /// Undoes `cut_off(node_id)`.
    pub fn heal(&self, node_id: &str) -> anyhow::Result<()> {
        let cut = self.host(node_id)?;
        for other in self.hosts.iter().filter(|host| host.node_id != node_id) {
            let _ = ip(&[
                "-n",
                &cut.namespace,
                "route",
                "del",
                "blackhole",
                &format!("{}/32", other.ip),
            ]);
            let _ = ip(&[
                "-n",
                &other.namespace,
                "route",
                "del",
                "blackhole",
                &format!("{}/32", cut.ip),
            ]);
        }
        Ok(())
    }
}

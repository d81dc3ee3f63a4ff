//! What HAProxy runs, as data: per tier a frontend (everything whose change needs a reload)
//! and a fixed number of server slots (what the Runtime API changes in place).
//!
//! Everything here is pure. [`desired_layout`] turns the pools the controller sends, and the
//! layout HAProxy runs now, into the layout it must run; [`plan`] lists what takes it from one
//! to the other.
//!
//! Invariants:
//! - An instance keeps its slot for as long as it is in its tier's pool: a slot is reassigned
//!   only after its instance left. A new instance takes the lowest slot that was already free,
//!   and a slot freed in the same round only when no other is left, so a connection still open
//!   to a leaving server is never in a slot that now names another one if it can be avoided.
//! - A tier's slot count never shrinks while the tier exists; it grows to
//!   `max(8, next power of two)` of its pool's size, so growth (a reload) is rare.
//! - Slot `i` (0-based) is HAProxy server `s{i+1}` of backend `be_{tier}`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use strata_api::{Algorithm, HealthProtocol, LbMode, Pool, ServerState};
use uuid::Uuid;

/// The fewest slots a backend gets.
pub const MIN_SLOTS: usize = 8;

/// A tier's health check as HAProxy runs it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    /// `None`: a TCP connect check; `Some(path)`: `GET path`, 2xx/3xx passes.
    pub http_path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// Everything about a tier whose change needs a reload (HAProxy cannot change it at run time).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frontend {
    pub listen: SocketAddr,
    pub mode: LbMode,
    pub algorithm: Algorithm,
    /// http only: the cookie that pins a client to a server.
    pub sticky_cookie: Option<String>,
    pub tls_certificate: Option<String>,
    /// The tier's default server weight, which free slots are written with.
    pub weight: u32,
    pub slowstart: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub check: Check,
}

/// One occupied slot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotServer {
    pub instance_id: Uuid,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub state: ServerState,
}

/// One tier as HAProxy serves it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierLayout {
    /// The pool version this layout was built from.
    pub version: u64,
    pub frontend: Frontend,
    /// `None`: a free slot (HAProxy `maint`, on a placeholder address).
    pub slots: Vec<Option<SlotServer>>,
    /// The weight each slot had when HAProxy last read the file ([`rendered_weights`] then):
    /// under static-rr the only weight besides 0 it accepts at run time.
    pub loaded_weights: Vec<u32>,
}

impl TierLayout {
    pub fn slot_of(&self, instance_id: Uuid) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.as_ref().is_some_and(|s| s.instance_id == instance_id))
    }
}

/// Every tier HAProxy serves, by tier name. It is saved beside `haproxy.cfg` (as JSON), so a
/// restarted agent knows which slot holds which instance in the file it finds.
pub type Layout = BTreeMap<String, TierLayout>;

/// The backend of a tier.
pub fn backend_name(tier: &str) -> String {
    format!("be_{tier}")
}

/// The frontend of a tier.
pub fn frontend_name(tier: &str) -> String {
    format!("fe_{tier}")
}

/// The HAProxy server name of slot `index`.
pub fn server_name(index: usize) -> String {
    format!("s{}", index + 1)
}

/// The slot index of an HAProxy server name (`s3` → 2).
pub fn slot_index(server: &str) -> Option<usize> {
    server
        .strip_prefix('s')?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

/// How many slots a pool of `servers` needs: `max(8, next power of two)`.
pub fn slots_for(servers: usize) -> usize {
    servers.next_power_of_two().max(MIN_SLOTS)
}

/// Why a pool cannot be served as it is; the tier is left out and reported with this.
pub fn frontend_of(pool: &Pool) -> Result<Frontend, String> {
    let balancer = &pool.load_balancer;
    let listen = balancer
        .listen
        .ok_or_else(|| "the tier has no load_balancer.listen address".to_string())?;
    let http = balancer.mode == LbMode::Http;
    let health = &pool.health;
    let http_path = match health.protocol {
        HealthProtocol::Http => Some(health.path.clone()),
        HealthProtocol::Tcp => None,
    };
    // HAProxy's configuration is words separated by spaces, with '#' starting a comment:
    // a value carrying either would change the file's meaning.
    for (field, value) in [
        ("health.path", http_path.as_deref()),
        (
            "load_balancer.sticky_cookie",
            balancer.sticky_cookie.as_deref(),
        ),
        (
            "load_balancer.tls_certificate",
            balancer.tls_certificate.as_deref(),
        ),
    ] {
        if let Some(value) = value {
            if value.is_empty()
                || value
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '#' || c == '"')
            {
                return Err(format!(
                    "{field} {value:?} cannot be written into haproxy.cfg (empty, or has spaces, '#' or quotes)"
                ));
            }
        }
    }
    Ok(Frontend {
        listen,
        mode: balancer.mode,
        algorithm: balancer.algorithm,
        sticky_cookie: balancer.sticky_cookie.clone().filter(|_| http),
        tls_certificate: balancer.tls_certificate.clone(),
        weight: balancer.weight.clamp(1, 256),
        slowstart: balancer.slowstart.as_std(),
        connect_timeout: balancer.connect_timeout.as_std(),
        idle_timeout: balancer.idle_timeout.as_std(),
        check: Check {
            http_path,
            interval: health.interval.as_std(),
            timeout: health.timeout.as_std(),
            rise: health.healthy_threshold.max(1),
            fall: health.unhealthy_threshold.max(1),
        },
    })
}

/// A pool's servers as slot contents; a server whose address is not an IP is left out
/// (HAProxy's `set server addr` takes IPs only) and named in the second list.
fn servers_of(pool: &Pool) -> (Vec<SlotServer>, Vec<String>) {
    let mut servers = Vec::new();
    let mut refused = Vec::new();
    let mut seen = BTreeSet::new();
    for server in &pool.servers {
        if !seen.insert(server.instance_id) {
            continue;
        }
        match server.address.parse::<IpAddr>() {
            Ok(address) if server.port != 0 => servers.push(SlotServer {
                instance_id: server.instance_id,
                address,
                port: server.port,
                weight: server.weight.clamp(1, 256),
                state: server.state,
            }),
            _ => refused.push(format!(
                "server {} at {:?} port {}",
                server.instance_id, server.address, server.port
            )),
        }
    }
    (servers, refused)
}

/// Assigns a pool's servers to slots, keeping every server that stays in its slot.
///
/// Guarantees: each server of `servers` is in exactly one slot; a server present in
/// `previous` keeps its index; the slot count is at least `previous`'s and at least
/// [`slots_for`] the pool.
pub fn assign_slots(
    servers: &[SlotServer],
    previous: Option<&[Option<SlotServer>]>,
) -> Vec<Option<SlotServer>> {
    let previous = previous.unwrap_or(&[]);
    let count = slots_for(servers.len()).max(previous.len());
    let mut slots: Vec<Option<SlotServer>> = vec![None; count];
    let wanted: BTreeMap<Uuid, &SlotServer> = servers.iter().map(|s| (s.instance_id, s)).collect();
    let mut placed = BTreeSet::new();
    for (index, slot) in previous.iter().enumerate() {
        if let Some(old) = slot {
            if let Some(new) = wanted.get(&old.instance_id) {
                slots[index] = Some((*new).clone());
                placed.insert(old.instance_id);
            }
        }
    }
    // Free before this round first, then freed by it.
    let was_free = |index: usize| previous.get(index).is_none_or(Option::is_none);
    let mut free: Vec<usize> = (0..count)
        .filter(|&i| slots[i].is_none() && was_free(i))
        .collect();
    free.extend((0..count).filter(|&i| slots[i].is_none() && !was_free(i)));
    let mut free = free.into_iter();
    for server in servers {
        if placed.contains(&server.instance_id) {
            continue;
        }
        if let Some(index) = free.next() {
            slots[index] = Some(server.clone());
        }
    }
    slots
}

/// The layout HAProxy must run for `pools`, and why the tiers left out are left out.
///
/// `current` is what it runs now (slots are kept stable against it); `refused` names tiers the
/// caller found unservable (a listen address that cannot be bound, a missing certificate).
/// Two tiers on one listen address: the first by name keeps it.
pub fn desired_layout(
    pools: &[Pool],
    current: &Layout,
    refused: &BTreeMap<String, String>,
) -> (Layout, BTreeMap<String, String>) {
    let mut layout = Layout::new();
    let mut errors = BTreeMap::new();
    let mut listeners: BTreeMap<SocketAddr, String> = BTreeMap::new();
    let mut pools: Vec<&Pool> = pools.iter().collect();
    pools.sort_by(|a, b| a.tier.cmp(&b.tier));
    for pool in pools {
        if layout.contains_key(&pool.tier) || errors.contains_key(&pool.tier) {
            continue;
        }
        if pool.load_balancer.listen.is_none() {
            // No frontend asked for: nothing to serve, nothing to report.
            continue;
        }
        if let Some(reason) = refused.get(&pool.tier) {
            errors.insert(pool.tier.clone(), reason.clone());
            continue;
        }
        let frontend = match frontend_of(pool) {
            Ok(frontend) => frontend,
            Err(reason) => {
                errors.insert(pool.tier.clone(), reason);
                continue;
            }
        };
        if let Some(other) = listeners.get(&frontend.listen) {
            errors.insert(
                pool.tier.clone(),
                format!(
                    "listen address {} is already served for tier {other}",
                    frontend.listen
                ),
            );
            continue;
        }
        listeners.insert(frontend.listen, pool.tier.clone());
        let (servers, unusable) = servers_of(pool);
        if !unusable.is_empty() {
            tracing::warn!(tier = %pool.tier, servers = ?unusable,
                "pool servers without an IP address and port are not served");
        }
        let previous = current.get(&pool.tier);
        let slots = assign_slots(&servers, previous.map(|tier| tier.slots.as_slice()));
        let mut tier = TierLayout {
            version: pool.version,
            frontend,
            slots,
            loaded_weights: Vec::new(),
        };
        tier.loaded_weights = match previous {
            // Kept until the next reload, which writes the file again.
            Some(previous)
                if previous.slots.len() == tier.slots.len()
                    && previous.frontend == tier.frontend =>
            {
                previous.loaded_weights.clone()
            }
            _ => rendered_weights(&tier),
        };
        layout.insert(pool.tier.clone(), tier);
    }
    (layout, errors)
}

/// A server's administrative state as the Runtime API sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AdminState {
    Ready,
    Drain,
    Maint,
}

impl AdminState {
    pub fn keyword(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

impl From<ServerState> for AdminState {
    fn from(state: ServerState) -> Self {
        match state {
            ServerState::Ready => AdminState::Ready,
            ServerState::Drain => AdminState::Drain,
        }
    }
}

/// One step from the running layout to the desired one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LbAction {
    /// `set server <backend>/<server> addr <ip> port <port>`.
    SetAddr {
        tier: String,
        slot: usize,
        address: IpAddr,
        port: u16,
    },
    /// `set server <backend>/<server> weight <weight>`.
    SetWeight {
        tier: String,
        slot: usize,
        weight: u32,
    },
    /// `set server <backend>/<server> state ready|drain|maint`.
    SetState {
        tier: String,
        slot: usize,
        state: AdminState,
    },
    /// Write `haproxy.cfg` for the desired layout (so a restarted HAProxy comes back with it).
    WriteConfig,
    /// Write the file, then reload HAProxy through the master CLI: something HAProxy cannot
    /// change at run time changed.
    Reload { reason: String },
}

/// Why the desired layout cannot be reached through the Runtime API, if it cannot.
fn reload_reason(current: &Layout, desired: &Layout) -> Option<String> {
    for tier in current.keys() {
        if !desired.contains_key(tier) {
            return Some(format!("tier {tier} left"));
        }
    }
    for (tier, want) in desired {
        let Some(have) = current.get(tier) else {
            return Some(format!("tier {tier} is new"));
        };
        if have.frontend != want.frontend {
            return Some(format!("tier {tier}'s frontend changed"));
        }
        if have.slots.len() != want.slots.len() {
            return Some(format!(
                "tier {tier} needs {} slots instead of {}",
                want.slots.len(),
                have.slots.len()
            ));
        }
        // static-rr: "the weight cannot change once set ... the only accepted values are 0
        // and 100% (or 0 and the initial weight)" (management guide 9.3, "set weight"), so a
        // slot that must take another weight than the one it was loaded with is reloaded.
        if want.frontend.algorithm == Algorithm::StaticRr {
            for (index, slot) in want.slots.iter().enumerate() {
                let Some(server) = slot else { continue };
                let loaded = have.loaded_weights.get(index).copied();
                if server.state == ServerState::Ready && loaded != Some(server.weight) {
                    return Some(format!(
                        "tier {tier} server {} needs weight {} under static-rr",
                        server_name(index),
                        server.weight
                    ));
                }
            }
        }
    }
    None
}

/// The weight each slot is written with in `haproxy.cfg`: its server's, 0 for a draining
/// server (the file has no keyword for drain; a weight of 0 is its equivalent: no new
/// requests except persistent ones), the tier's default weight for a free slot.
pub fn rendered_weights(tier: &TierLayout) -> Vec<u32> {
    tier.slots
        .iter()
        .map(|slot| match slot {
            Some(server) if server.state == ServerState::Drain => 0,
            Some(server) => server.weight,
            None => tier.frontend.weight,
        })
        .collect()
}

/// Plans the move from `current` (what HAProxy runs) to `desired`.
///
/// - Only servers changed: Runtime API commands, then `WriteConfig`; no reload. For each slot,
///   the address before the weight before the state, so a slot is never ready on an old
///   address or weight. Within a tier, servers are added before any is taken out (`drain`
///   or `maint` come last): a pool that swaps one server for another never passes through a
///   moment with neither, which HAProxy would answer with 503 (no server), a failure no retry
///   covers.
/// - A tier came or went, a frontend changed, a slot count changed (or a weight under
///   static-rr): one `Reload`, which writes the file itself; the new worker reads every slot
///   from it, so no Runtime API command is needed.
/// - Nothing changed (a new version with the same content): nothing, not even a write.
pub fn plan(current: &Layout, desired: &Layout) -> Vec<LbAction> {
    if let Some(reason) = reload_reason(current, desired) {
        return vec![LbAction::Reload { reason }];
    }
    let mut actions = Vec::new();
    for (tier, want) in desired {
        let Some(have) = current.get(tier) else {
            continue;
        };
        let mut tier_actions = Vec::new();
        for (slot, (old, new)) in have.slots.iter().zip(&want.slots).enumerate() {
            slot_actions(tier, slot, old.as_ref(), new.as_ref(), &mut tier_actions);
        }
        let (leaving, entering): (Vec<LbAction>, Vec<LbAction>) =
            tier_actions.into_iter().partition(|action| {
                matches!(
                    action,
                    LbAction::SetState {
                        state: AdminState::Drain | AdminState::Maint,
                        ..
                    }
                )
            });
        actions.extend(entering);
        actions.extend(leaving);
    }
    if !actions.is_empty() {
        actions.push(LbAction::WriteConfig);
    }
    actions
}

fn slot_actions(
    tier: &str,
    slot: usize,
    old: Option<&SlotServer>,
    new: Option<&SlotServer>,
    actions: &mut Vec<LbAction>,
) {
    let tier = tier.to_string();
    match (old, new) {
        (None, None) => {}
        (Some(_), None) => actions.push(LbAction::SetState {
            tier,
            slot,
            state: AdminState::Maint,
        }),
        (old, Some(new)) => {
            let same_instance = old.is_some_and(|old| old.instance_id == new.instance_id);
            let old = old.filter(|_| same_instance);
            if old.is_none_or(|old| old.address != new.address || old.port != new.port) {
                actions.push(LbAction::SetAddr {
                    tier: tier.clone(),
                    slot,
                    address: new.address,
                    port: new.port,
                });
            }
            // A server loaded from the file while draining has weight 0 there: becoming ready
            // again always sets its weight.
            let readied = new.state == ServerState::Ready
                && old.is_some_and(|old| old.state != ServerState::Ready);
            if readied || old.is_none_or(|old| old.weight != new.weight) {
                actions.push(LbAction::SetWeight {
                    tier: tier.clone(),
                    slot,
                    weight: new.weight,
                });
            }
            if old.is_none_or(|old| old.state != new.state) {
                actions.push(LbAction::SetState {
                    tier,
                    slot,
                    state: new.state.into(),
                });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use strata_api::{Duration as ApiDuration, HealthCheck, LoadBalancer, PoolServer};

    pub fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    pub fn server(n: u128, state: ServerState) -> PoolServer {
        PoolServer {
            instance_id: id(n),
            address: "127.0.0.1".to_string(),
            port: 9000 + n as u16,
            weight: 100,
            state,
        }
    }

    pub fn pool(tier: &str, port: u16, version: u64, servers: Vec<PoolServer>) -> Pool {
        Pool {
            tier: tier.to_string(),
            version,
            load_balancer: LoadBalancer {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], port))),
                slowstart: ApiDuration::from_secs(0),
                ..LoadBalancer::default()
            },
            health: HealthCheck::default(),
            servers,
        }
    }

    fn layout_of(pools: &[Pool], current: &Layout) -> Layout {
        let (layout, errors) = desired_layout(pools, current, &BTreeMap::new());
        assert!(errors.is_empty(), "{errors:?}");
        layout
    }

    fn occupants(layout: &Layout, tier: &str) -> Vec<Option<u128>> {
        layout[tier]
            .slots
            .iter()
            .map(|slot| slot.as_ref().map(|s| s.instance_id.as_u128()))
            .collect()
    }

    #[test]
    fn slot_counts_round_up_to_a_power_of_two_of_at_least_eight() {
        assert_eq!(
            [0, 1, 8, 9, 16, 17, 100].map(slots_for),
            [8, 8, 8, 16, 16, 32, 128]
        );
        assert_eq!(slot_index("s1"), Some(0));
        assert_eq!(slot_index("s12"), Some(11));
        assert_eq!(slot_index("s0"), None);
        assert_eq!(slot_index("BACKEND"), None);
    }

    #[test]
    fn instances_keep_their_slots_and_new_ones_prefer_slots_free_before() {
        let ready = ServerState::Ready;
        let first = layout_of(
            &[pool(
                "web",
                8080,
                1,
                vec![server(1, ready), server(2, ready), server(3, ready)],
            )],
            &Layout::new(),
        );
        assert_eq!(
            occupants(&first, "web"),
            [Some(1), Some(2), Some(3), None, None, None, None, None]
        );
        // 2 leaves, 4 arrives: 4 takes slot 4 (free before), not 2's.
        let second = layout_of(
            &[pool(
                "web",
                8080,
                2,
                vec![server(1, ready), server(3, ready), server(4, ready)],
            )],
            &first,
        );
        assert_eq!(
            occupants(&second, "web"),
            [Some(1), None, Some(3), Some(4), None, None, None, None]
        );
        // Growing past 8 keeps every slot where it was.
        let many: Vec<PoolServer> = [1, 3, 4]
            .into_iter()
            .chain(10..17)
            .map(|n| server(n, ready))
            .collect();
        let third = layout_of(&[pool("web", 8080, 3, many)], &second);
        let slots = occupants(&third, "web");
        assert_eq!(slots.len(), 16);
        assert_eq!(&slots[..4], [Some(1), Some(10), Some(3), Some(4)]);
        // Shrinking keeps the slot count.
        let fourth = layout_of(&[pool("web", 8080, 4, vec![server(4, ready)])], &third);
        assert_eq!(fourth["web"].slots.len(), 16);
        assert_eq!(fourth["web"].slot_of(id(4)), Some(3));
    }

    #[test]
    fn server_changes_are_runtime_commands_in_address_weight_state_order_adding_before_removing() {
        let ready = ServerState::Ready;
        let current = layout_of(
            &[pool(
                "web",
                8080,
                1,
                vec![server(1, ready), server(2, ready)],
            )],
            &Layout::new(),
        );
        let mut heavier = server(1, ready);
        heavier.weight = 50;
        let desired = layout_of(
            &[pool(
                "web",
                8080,
                2,
                vec![heavier, server(2, ServerState::Drain), server(3, ready)],
            )],
            &current,
        );
        let tier = "web".to_string();
        assert_eq!(
            plan(&current, &desired),
            vec![
                LbAction::SetWeight {
                    tier: tier.clone(),
                    slot: 0,
                    weight: 50
                },
                LbAction::SetAddr {
                    tier: tier.clone(),
                    slot: 2,
                    address: "127.0.0.1".parse().expect("ip"),
                    port: 9003,
                },
                LbAction::SetWeight {
                    tier: tier.clone(),
                    slot: 2,
                    weight: 100
                },
                LbAction::SetState {
                    tier: tier.clone(),
                    slot: 2,
                    state: AdminState::Ready
                },
                // Taken out after the new server is in.
                LbAction::SetState {
                    tier: tier.clone(),
                    slot: 1,
                    state: AdminState::Drain
                },
                LbAction::WriteConfig,
            ]
        );
        // Leaving: maintenance. Back from drain: weight again (the file wrote it as 0).
        let after = layout_of(&[pool("web", 8080, 3, vec![server(2, ready)])], &desired);
        assert_eq!(
            plan(&desired, &after),
            vec![
                LbAction::SetWeight {
                    tier: tier.clone(),
                    slot: 1,
                    weight: 100
                },
                LbAction::SetState {
                    tier: tier.clone(),
                    slot: 1,
                    state: AdminState::Ready
                },
                LbAction::SetState {
                    tier: tier.clone(),
                    slot: 0,
                    state: AdminState::Maint
                },
                LbAction::SetState {
                    tier,
                    slot: 2,
                    state: AdminState::Maint
                },
                LbAction::WriteConfig,
            ]
        );
    }

    #[test]
    fn the_same_content_under_a_new_version_changes_nothing() {
        let ready = ServerState::Ready;
        let current = layout_of(
            &[pool("web", 8080, 1, vec![server(1, ready)])],
            &Layout::new(),
        );
        let desired = layout_of(&[pool("web", 8080, 9, vec![server(1, ready)])], &current);
        assert_eq!(plan(&current, &desired), vec![]);
        assert_eq!(desired["web"].version, 9);
    }

    #[test]
    fn frontend_tier_and_slot_count_changes_reload() {
        let ready = ServerState::Ready;
        let base = pool("web", 8080, 1, vec![server(1, ready)]);
        let current = layout_of(std::slice::from_ref(&base), &Layout::new());
        let reloads = |desired: &Layout| {
            matches!(
                plan(&current, desired).as_slice(),
                [LbAction::Reload { .. }]
            )
        };
        let mut moved = base.clone();
        moved.load_balancer.listen = Some(SocketAddr::from(([127, 0, 0, 1], 8081)));
        assert!(reloads(&layout_of(&[moved], &current)));
        let mut cookie = base.clone();
        cookie.load_balancer.sticky_cookie = Some("SRV".to_string());
        assert!(reloads(&layout_of(&[cookie], &current)));
        let mut algorithm = base.clone();
        algorithm.load_balancer.algorithm = Algorithm::Leastconn;
        assert!(reloads(&layout_of(&[algorithm], &current)));
        let mut health = base.clone();
        health.health.path = "/ready".to_string();
        assert!(reloads(&layout_of(&[health], &current)));
        let mut timeouts = base.clone();
        timeouts.load_balancer.idle_timeout = ApiDuration::from_secs(5);
        assert!(reloads(&layout_of(&[timeouts], &current)));
        let mut tls = base.clone();
        tls.load_balancer.tls_certificate = Some("/etc/cert.pem".to_string());
        assert!(reloads(&layout_of(&[tls], &current)));
        let grown = pool("web", 8080, 2, (1..=9).map(|n| server(n, ready)).collect());
        assert!(reloads(&layout_of(&[grown], &current)));
        let other = pool("api", 8090, 1, vec![]);
        assert!(reloads(&layout_of(&[base.clone(), other], &current)));
        assert!(reloads(&Layout::new()));
        // Only the drain timeout changed: the controller's business, not HAProxy's.
        let mut drain = base;
        drain.load_balancer.drain_timeout = ApiDuration::from_secs(1);
        assert_eq!(plan(&current, &layout_of(&[drain], &current)), vec![]);
    }

    #[test]
    fn static_rr_takes_a_new_server_in_place_only_at_the_weight_its_slot_was_loaded_with() {
        let ready = ServerState::Ready;
        let mut base = pool("web", 8080, 1, vec![server(1, ready)]);
        base.load_balancer.algorithm = Algorithm::StaticRr;
        let current = layout_of(std::slice::from_ref(&base), &Layout::new());
        let mut same = base.clone();
        same.servers.push(server(2, ready));
        let actions = plan(&current, &layout_of(&[same], &current));
        assert!(
            !actions.iter().any(|a| matches!(a, LbAction::Reload { .. })),
            "{actions:?}"
        );
        let mut heavier = base;
        let mut two = server(2, ready);
        two.weight = 7;
        heavier.servers.push(two);
        let actions = plan(&current, &layout_of(&[heavier], &current));
        assert!(
            matches!(actions.as_slice(), [LbAction::Reload { .. }]),
            "{actions:?}"
        );
    }

    #[test]
    fn unservable_tiers_are_left_out_with_their_reason() {
        let ready = ServerState::Ready;
        let mut no_listen = pool("internal", 1, 1, vec![]);
        no_listen.load_balancer.listen = None;
        let mut bad_path = pool("bad", 8070, 1, vec![]);
        bad_path.health.path = "/a b".to_string();
        let refused = BTreeMap::from([("taken".to_string(), "port taken".to_string())]);
        let (layout, errors) = desired_layout(
            &[
                pool("web", 8080, 1, vec![server(1, ready)]),
                pool("zzz", 8080, 1, vec![]),
                pool("taken", 8090, 1, vec![]),
                no_listen,
                bad_path,
            ],
            &Layout::new(),
            &refused,
        );
        assert_eq!(layout.keys().collect::<Vec<_>>(), ["web"]);
        assert_eq!(errors.keys().collect::<Vec<_>>(), ["bad", "taken", "zzz"]);
        assert!(
            errors["zzz"].contains("already served for tier web"),
            "{errors:?}"
        );
    }
}

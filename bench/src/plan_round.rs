//! One planner round at fleet scale, in memory: the state `fleet` builds through the API and
//! Raft (`--nodes` nodes, `--tiers` tiers of `--instances-per-tier`, every instance Running
//! and healthy, every node heartbeating with a report of each instance it runs), built here by
//! applying the same commands to a `State` directly, then `--rounds` steady rounds of
//! `reconcile::plan` timed one by one.
//!
//! The cheap loop for work on the planners: no cluster, no simulator, seconds instead of
//! minutes. CPU time is the planning thread's own (`CLOCK_THREAD_CPUTIME_ID`), which another
//! build on the same cores moves much less than wall time; `perf stat -e instructions` or
//! callgrind on this command count work independent of the machine's load.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;
use strata_api::{Health, HostMetrics, InstanceReport, Phase, RegisterRequest, Resources};
use strata_controller::agents::thread_cpu_time;
use strata_controller::reconcile::{plan, NodeObservation, Observed, PlanConfig};
use strata_controller::state::{Command, Request, State};
use uuid::Uuid;

use crate::stats::round2;

#[derive(clap::Args)]
pub struct PlanRoundArgs {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 5_000)]
    tiers: usize,
    #[arg(long, default_value_t = 20)]
    instances_per_tier: u32,
    /// Steady rounds timed.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
}

#[derive(Debug, Serialize)]
pub struct PlanRoundReport {
    pub nodes: usize,
    pub tiers: usize,
    pub instances: usize,
    pub rounds: usize,
    /// Commands of a steady round: 0, or the state did not settle.
    pub steady_commands: usize,
    pub round_cpu_p50_ms: f64,
    pub round_cpu_min_ms: f64,
    pub round_wall_p50_ms: f64,
    pub round_wall_min_ms: f64,
    /// Building the state (not timed as rounds).
    pub build_s: f64,
    pub load_average_at_start: Option<[f64; 3]>,
}

/// The fleet benchmark's template and node capacity (`fleet::TEMPLATE_*`).
const TEMPLATE_CPU: f64 = 0.1;
const TEMPLATE_MEMORY_MB: u64 = 16;

struct World {
    state: State,
    index: u64,
    now: u64,
    next_id: u128,
    observed: HashMap<String, Arc<NodeObservation>>,
    config: PlanConfig,
}

impl World {
    fn apply(&mut self, command: Command) {
        self.index += 1;
        self.state.apply(
            self.index,
            &Request {
                at_ms: self.now,
                command,
            },
        );
    }

    fn plan(&mut self) -> Vec<Command> {
        let observed = Observed {
            leader_since_ms: 1_000,
            nodes: &self.observed,
        };
        let mut next = self.next_id;
        let commands = plan(&self.state, &observed, &self.config, self.now, &mut || {
            next += 1;
            Uuid::from_u128(next)
        });
        self.next_id = next;
        commands
    }

    /// Every node heartbeats now, reporting each instance it is assigned Running and healthy,
    /// as the fleet's simulated agents do (`heartbeats::echo_body`).
    fn heartbeat_all(&mut self) {
        let mut reports: BTreeMap<&str, Vec<InstanceReport>> = BTreeMap::new();
        for node in self.state.nodes.keys() {
            let assignments =
                strata_controller::views::assignments_of(&self.state, node).unwrap_or_default();
            let node_reports = assignments
                .iter()
                .enumerate()
                .map(|(slot, assignment)| InstanceReport {
                    id: assignment.instance_id,
                    phase: Phase::Running,
                    health: Health::Healthy,
                    port: Some(20_000 + slot as u16),
                    reason: None,
                    cpu_percent: 12.5,
                })
                .collect();
            reports.insert(node, node_reports);
        }
        for (node, reports) in reports {
            self.observed.insert(
                node.to_string(),
                Arc::new(NodeObservation {
                    last_seen_ms: self.now,
                    metrics: HostMetrics::default(),
                    reports,
                    lb: None,
                }),
            );
        }
    }
}

pub fn run_cli(args: PlanRoundArgs) -> Result<PlanRoundReport> {
    let load_average_at_start = crate::load_average();
    let built = Instant::now();
    let mut world = World {
        state: State::default(),
        index: 0,
        now: 1_000_000,
        next_id: 0,
        observed: HashMap::new(),
        config: PlanConfig {
            heartbeat_grace_ms: 15_000,
            ..PlanConfig::default()
        },
    };
    // Room for the instances with headroom, as `fleet` gives its nodes.
    let instances = args.tiers * args.instances_per_tier as usize;
    let per_node = instances.div_ceil(args.nodes.max(1)).max(1) as u64;
    for index in 0..args.nodes {
        world.apply(Command::RegisterNode {
            registration: RegisterRequest {
                node_id: format!("sim-{index:05}"),
                address: "127.0.0.1".to_string(),
                zone: None,
                labels: BTreeMap::new(),
                capacity: Resources {
                    cpu: (per_node * 2) as f64 * TEMPLATE_CPU,
                    memory_mb: per_node * 2 * TEMPLATE_MEMORY_MB,
                },
                agent_version: "bench".to_string(),
                roles: strata_api::default_roles(),
            },
            auth: None,
            max_nodes: None,
        });
    }
    world.heartbeat_all();
    for index in 0..args.tiers {
        let per_tier = args.instances_per_tier;
        let body = format!(
            r#"{{"name":"fleet-{index}","template":{{"driver":"process","command":["strata-workload"],"cpu":{TEMPLATE_CPU},"memory_mb":{TEMPLATE_MEMORY_MB}}},"scaling":{{"min":{per_tier},"max":{per_tier}}}}}"#
        );
        world.apply(Command::PutTier {
            spec: Box::new(serde_json::from_str(&body)?),
            max_tiers: None,
        });
    }
    // Place, then let the agents report until a round finds nothing to do.
    let mut settled = false;
    for _ in 0..10 {
        world.now += 1_000;
        world.heartbeat_all();
        let commands = world.plan();
        if commands.is_empty() {
            settled = true;
            break;
        }
        for command in commands {
            world.apply(command);
        }
    }
    if !settled {
        bail!("the state did not settle in 10 rounds");
    }
    let running = world
        .state
        .instances
        .values()
        .filter(|instance| instance.phase == Phase::Running)
        .count();
    if running != instances {
        bail!("{running} of {instances} instances Running after settling");
    }
    let build_s = round2(built.elapsed().as_secs_f64());
    eprintln!("[plan-round] {instances} instances Running after {build_s} s; timing rounds");

    let (mut cpu_ms, mut wall_ms, steady_commands) = time_rounds(&mut world, args.rounds);
    cpu_ms.sort_by(f64::total_cmp);
    wall_ms.sort_by(f64::total_cmp);
    let median = |values: &[f64]| round2(values.get(values.len() / 2).copied().unwrap_or(0.0));
    let min = |values: &[f64]| round2(values.first().copied().unwrap_or(0.0));
    Ok(PlanRoundReport {
        nodes: args.nodes,
        tiers: args.tiers,
        instances,
        rounds: args.rounds,
        steady_commands,
        round_cpu_p50_ms: median(&cpu_ms),
        round_cpu_min_ms: min(&cpu_ms),
        round_wall_p50_ms: median(&wall_ms),
        round_wall_min_ms: min(&wall_ms),
        build_s,
        load_average_at_start,
    })
}

/// The timed rounds: CPU and wall milliseconds of each, and the most commands one planned.
/// Its own function, never inlined, so that `valgrind --tool=callgrind
/// --collect-atstart=no --toggle-collect='*time_rounds*'` counts the rounds' instructions
/// and not the state's construction.
#[inline(never)]
fn time_rounds(world: &mut World, rounds: usize) -> (Vec<f64>, Vec<f64>, usize) {
    let mut cpu_ms = Vec::new();
    let mut wall_ms = Vec::new();
    let mut steady_commands = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let cpu_started = thread_cpu_time();
        let commands = world.plan();
        cpu_ms.push((thread_cpu_time() - cpu_started).as_secs_f64() * 1000.0);
        wall_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        steady_commands = steady_commands.max(commands.len());
    }
    (cpu_ms, wall_ms, steady_commands)
}

//! The EC2 planners as golden decisions over a state built by applying commands.

use std::collections::{BTreeMap, HashMap};

use strata_api::{Phase, RegisterRequest, Resources, TierSpec};
use strata_ec2::{Ec2Instance, Ec2State, TAG_CLUSTER, TAG_INSTANCE, TAG_TIER};
use uuid::Uuid;

use super::*;
use crate::reconcile::{plan, Observed};
use crate::state::{Command, Request, State};

struct World {
    state: State,
    index: u64,
    now: u64,
    next_id: u128,
}

impl World {
    fn new() -> World {
        let mut world = World {
            state: State::default(),
            index: 0,
            now: 1_000_000,
            next_id: 0,
        };
        // A Ready agent node with room: an EC2 tier must still never be placed on it.
        world.apply(Command::RegisterNode {
            registration: RegisterRequest {
                node_id: "host-1".to_string(),
                address: "127.0.0.1".to_string(),
                zone: None,
                labels: BTreeMap::new(),
                capacity: Resources {
                    cpu: 64.0,
                    memory_mb: 65536,
                },
                agent_version: "test".to_string(),
                roles: strata_api::default_roles(),
            },
            auth: None,
            max_nodes: None,
        });
        let spec: TierSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "provider": "ec2",
            "template": {
                "ami": "ami-12345678",
                "instance_type": "t3.micro",
                "port": 8080,
                "subnets": ["subnet-a", "subnet-b"],
            },
            "scaling": {"min": 0, "max": 10},
        }))
        .unwrap_or_else(|error| panic!("{error}"));
        world.apply(Command::PutTier {
            spec: Box::new(spec),
            max_tiers: None,
        });
        world
    }

    fn apply(&mut self, command: Command) -> crate::state::CommandResult {
        self.index += 1;
        self.state.apply(
            self.index,
            &Request {
                at_ms: self.now,
                command,
            },
        )
    }

    fn scale(&mut self, desired: u32) {
        self.apply(Command::ScaleTier {
            name: "web".to_string(),
            desired,
            expected_version: None,
        });
    }

    /// One round of the records planner, applied.
    fn plan_records(&mut self) -> Vec<Command> {
        let nodes = HashMap::new();
        let observed = Observed {
            leader_since_ms: self.now,
            nodes: &nodes,
        };
        let mut next = self.next_id;
        let commands = plan(
            &self.state,
            &observed,
            &crate::reconcile::PlanConfig::default(),
            self.now,
            &mut || {
                next += 1;
                Uuid::from_u128(next)
            },
        );
        self.next_id = next;
        for command in commands.clone() {
            self.apply(command);
        }
        commands
    }

    fn sync(&mut self, observed: &Ec2Observed) -> SyncPlan {
        let plan = plan_sync(
            &self.state,
            observed,
            &SyncConfig {
                unknown_grace_ms: 10_000,
            },
            self.now,
        );
        for command in plan.commands.clone() {
            self.apply(command);
        }
        plan
    }

    /// Puts `web` behind the ELBv2 target group `TARGET_GROUP`.
    fn behind_target_group(&mut self) {
        let mut spec = self.state.tiers["web"].spec.clone();
        spec.load_balancer.target_group_arn = Some(TARGET_GROUP.to_string());
        self.apply(Command::PutTier {
            spec: Box::new(spec),
            max_tiers: None,
        });
    }

    /// `web` scaled to `desired`, its records planned and each given a running instance:
    /// `running`'s pairs.
    fn scaled_and_running(&mut self, desired: u32) -> Vec<(Uuid, String)> {
        self.scale(desired);
        self.plan_records();
        self.running()
    }

    /// `(uuid, EC2 id)` of every record in uuid order, each given a running instance `i-N`.
    fn running(&mut self) -> Vec<(Uuid, String)> {
        let pairs: Vec<(Uuid, String)> = self
            .state
            .instances
            .keys()
            .enumerate()
            .map(|(n, id)| (*id, format!("i-{n}")))
            .collect();
        self.sync(&synced(self.instances_for(&pairs)));
        pairs
    }

    fn instances_for(&self, pairs: &[(Uuid, String)]) -> Vec<Ec2Instance> {
        pairs
            .iter()
            .map(|(id, ec2_id)| ec2(ec2_id, Some(*id), Ec2State::Running, 1_000_000))
            .collect()
    }

    fn live(&self) -> Vec<&strata_api::Instance> {
        self.state
            .instances
            .values()
            .filter(|instance| instance.phase.is_live())
            .collect()
    }

    fn per_subnet(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for instance in self.live() {
            *counts
                .entry(instance.subnet.clone().unwrap_or_default())
                .or_default() += 1;
        }
        counts
    }
}

fn ec2(id: &str, uuid: Option<Uuid>, state: Ec2State, launched: u64) -> Ec2Instance {
    let mut tags = BTreeMap::from([
        (TAG_CLUSTER.to_string(), "strata".to_string()),
        (TAG_TIER.to_string(), "web".to_string()),
    ]);
    if let Some(uuid) = uuid {
        tags.insert(TAG_INSTANCE.to_string(), uuid.to_string());
    }
    Ec2Instance {
        id: id.to_string(),
        state,
        private_ip: Some(format!("10.0.0.{}", id.len())),
        zone: Some("us-east-1a".to_string()),
        subnet: Some("subnet-a".to_string()),
        image: Some("ami-12345678".to_string()),
        instance_type: Some("t3.micro".to_string()),
        launch_time_ms: launched,
        tags,
    }
}

const TARGET_GROUP: &str =
    "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067";

fn target(id: &str, state: strata_ec2::TargetState) -> strata_ec2::Target {
    strata_ec2::Target {
        id: id.to_string(),
        port: Some(8080),
        state,
    }
}

/// `instances` described, and the target group holding `targets`.
fn with_group(instances: Vec<Ec2Instance>, targets: Vec<strata_ec2::Target>) -> Ec2Observed {
    Ec2Observed {
        target_groups: BTreeMap::from([(TARGET_GROUP.to_string(), Ok(targets))]),
        ..synced(instances)
    }
}

fn synced(instances: Vec<Ec2Instance>) -> Ec2Observed {
    Ec2Observed {
        synced: true,
        instances,
        ..Ec2Observed::default()
    }
}

#[test]
fn records_spread_over_subnets_and_never_go_to_agents() {
    let mut world = World::new();
    world.scale(5);
    let commands = world.plan_records();
    let created: Vec<&NewInstance> = commands
        .iter()
        .flat_map(|command| match command {
            Command::CreateInstances { instances, .. } => instances.iter().collect(),
            _ => Vec::new(),
        })
        .collect();
    let subnets: Vec<&str> = created
        .iter()
        .map(|new| new.subnet.as_deref().unwrap_or_default())
        .collect();
    assert_eq!(
        subnets,
        ["subnet-a", "subnet-b", "subnet-a", "subnet-b", "subnet-a"]
    );
    assert!(created.iter().all(|new| new.node.is_empty()));
    assert_eq!(world.live().len(), 5);
    assert!(world
        .live()
        .iter()
        .all(|instance| instance.node.is_none() && instance.phase == Phase::Pending));
    // Nothing more to decide until EC2 answers.
    assert!(world.plan_records().is_empty());
}

#[test]
fn scale_in_keeps_the_subnets_balanced_and_drains_the_oldest() {
    let mut world = World::new();
    world.scale(5);
    world.plan_records();
    world.now += 1_000;
    world.scale(2);
    world.plan_records();
    assert_eq!(
        world.per_subnet(),
        BTreeMap::from([("subnet-a".to_string(), 1), ("subnet-b".to_string(), 1)])
    );
}

#[test]
fn nothing_is_launched_before_a_describe_succeeded() {
    let mut world = World::new();
    world.scale(2);
    world.plan_records();
    let plan = world.sync(&Ec2Observed::default());
    assert!(plan.calls.is_empty() && plan.commands.is_empty());
    let failed = world.sync(&Ec2Observed {
        synced: false,
        error: Some("endpoint unreachable".to_string()),
        ..Ec2Observed::default()
    });
    assert!(failed.calls.is_empty());
    // One event per change, on the tier: the same failure again records nothing.
    assert!(matches!(
        failed.commands.as_slice(),
        [Command::RecordEvent { reason, .. }] if reason == EC2_CALL_FAILED
    ));
    let again = world.sync(&Ec2Observed {
        synced: false,
        error: Some("endpoint unreachable".to_string()),
        ..Ec2Observed::default()
    });
    assert!(again.commands.is_empty());
    let back = world.sync(&synced(Vec::new()));
    assert!(matches!(
        back.commands.as_slice(),
        [Command::RecordEvent { reason, .. }] if reason == EC2_REACHABLE
    ));
    assert_eq!(back.calls.len(), 2);
}

#[test]
fn launches_missing_adopts_tagged_and_terminates_duplicates_and_unknowns() {
    let mut world = World::new();
    world.scale(3);
    world.plan_records();
    let ids: Vec<Uuid> = world.state.instances.keys().copied().collect();
    world.now = 2_000_000;
    let plan = world.sync(&synced(vec![
        // Launched for ids[0] by a leader that crashed before recording it; and launched twice.
        ec2("i-first", Some(ids[0]), Ec2State::Running, 1_500_000),
        ec2("i-second", Some(ids[0]), Ec2State::Running, 1_600_000),
        // Tagged for this cluster, claimed by nobody: old enough to go, and too young to.
        ec2(
            "i-unknown-old",
            Some(Uuid::from_u128(999)),
            Ec2State::Running,
            1_000_000,
        ),
        ec2("i-unknown-young", None, Ec2State::Running, 1_995_000),
    ]));
    let mut calls = plan.calls.clone();
    calls.sort_by_key(|call| format!("{call:?}"));
    let launched: Vec<Uuid> = calls
        .iter()
        .filter_map(|call| match call {
            Ec2Call::Launch { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect();
    assert_eq!(launched.len(), 2);
    assert!(!launched.contains(&ids[0]));
    let terminated: Vec<&str> = calls
        .iter()
        .filter_map(|call| match call {
            Ec2Call::Terminate { ec2_id, .. } => Some(ec2_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(terminated, ["i-second", "i-unknown-old"]);
    let adopted = &world.state.instances[&ids[0]];
    assert_eq!(adopted.provider_id.as_deref(), Some("i-first"));
    assert_eq!(adopted.phase, Phase::Running);
    assert_eq!(adopted.health, strata_api::Health::Healthy);
}

#[test]
fn an_instance_terminated_behind_our_back_fails_and_is_replaced() {
    let mut world = World::new();
    world.scale(1);
    world.plan_records();
    let id = *world.state.instances.keys().next().unwrap_or(&Uuid::nil());
    world.sync(&synced(vec![ec2(
        "i-1",
        Some(id),
        Ec2State::Running,
        1_000_000,
    )]));
    assert_eq!(world.state.instances[&id].phase, Phase::Running);
    world.sync(&synced(vec![ec2(
        "i-1",
        Some(id),
        Ec2State::Terminated,
        1_000_000,
    )]));
    assert_eq!(world.state.instances[&id].phase, Phase::Failed);
    world.plan_records();
    assert_eq!(world.live().len(), 1);
    assert_ne!(world.live()[0].id, id);
}

#[test]
fn a_stopping_instance_is_terminated_then_recorded_stopped() {
    let mut world = World::new();
    world.scale(1);
    world.plan_records();
    let id = *world.state.instances.keys().next().unwrap_or(&Uuid::nil());
    world.sync(&synced(vec![ec2(
        "i-1",
        Some(id),
        Ec2State::Running,
        1_000_000,
    )]));
    world.scale(0);
    world.plan_records(); // drain; no load balancer, so `pools` ends it at once
    world.plan_records();
    assert_eq!(world.state.instances[&id].phase, Phase::Stopping);
    let plan = world.sync(&synced(vec![ec2(
        "i-1",
        Some(id),
        Ec2State::Running,
        1_000_000,
    )]));
    assert!(matches!(
        plan.calls.as_slice(),
        [Ec2Call::Terminate { ec2_id, .. }] if ec2_id == "i-1"
    ));
    world.sync(&synced(vec![ec2(
        "i-1",
        Some(id),
        Ec2State::ShuttingDown,
        1_000_000,
    )]));
    assert_eq!(world.state.instances[&id].phase, Phase::Terminated);
}

#[test]
fn a_target_group_holds_exactly_the_ready_instances_and_ends_their_drains() {
    use strata_ec2::TargetState::{Draining, Healthy};
    let mut world = World::new();
    world.behind_target_group();
    let pairs = world.scaled_and_running(2);
    let instances = world.instances_for(&pairs);
    for (id, _) in &pairs {
        assert_eq!(
            world.state.instances[id].port,
            Some(8080),
            "the pool's port"
        );
    }

    // Both ready instances are registered, in one call, on the tier's port; a target nobody
    // put there is deregistered.
    let plan = world.sync(&with_group(
        instances.clone(),
        vec![target("i-foreign", Healthy)],
    ));
    assert_eq!(
        plan.calls,
        [
            Ec2Call::Register {
                tier: "web".to_string(),
                arn: TARGET_GROUP.to_string(),
                targets: vec![("i-0".to_string(), 8080), ("i-1".to_string(), 8080)],
            },
            Ec2Call::Deregister {
                tier: "web".to_string(),
                arn: TARGET_GROUP.to_string(),
                targets: vec![("i-foreign".to_string(), 8080)],
            },
        ]
    );
    let both = vec![target("i-0", Healthy), target("i-1", Healthy)];
    assert!(world
        .sync(&with_group(instances.clone(), both.clone()))
        .calls
        .is_empty());

    // Scale in: the drained instance leaves the group first, and its drain ends only once the
    // group no longer lists it (not while it drains there).
    world.now += 1_000;
    world.scale(1);
    world.plan_records();
    let drained: Vec<Uuid> = pairs
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| world.state.instances[id].phase == Phase::Draining)
        .collect();
    assert_eq!(drained.len(), 1);
    let (gone, kept) = if drained[0] == pairs[0].0 {
        (&pairs[0], &pairs[1])
    } else {
        (&pairs[1], &pairs[0])
    };
    world.plan_records();
    assert_eq!(
        world.state.instances[&gone.0].phase,
        Phase::Draining,
        "pools leave a target-group drain to the EC2 executor"
    );
    let plan = world.sync(&with_group(instances.clone(), both));
    assert_eq!(
        plan.calls,
        [Ec2Call::Deregister {
            tier: "web".to_string(),
            arn: TARGET_GROUP.to_string(),
            targets: vec![(gone.1.clone(), 8080)],
        }]
    );
    assert_eq!(world.state.instances[&gone.0].phase, Phase::Draining);
    let plan = world.sync(&with_group(
        instances.clone(),
        vec![target(&kept.1, Healthy), target(&gone.1, Draining)],
    ));
    assert!(plan.calls.is_empty());
    assert_eq!(world.state.instances[&gone.0].phase, Phase::Draining);
    world.sync(&with_group(
        instances.clone(),
        vec![target(&kept.1, Healthy)],
    ));
    assert_eq!(world.state.instances[&gone.0].phase, Phase::Stopping);
    let plan = world.sync(&with_group(instances, vec![target(&kept.1, Healthy)]));
    assert!(matches!(
        plan.calls.as_slice(),
        [Ec2Call::Terminate { ec2_id, .. }] if *ec2_id == gone.1
    ));
}

#[test]
fn a_long_deregistration_delay_is_bounded_by_the_drain_timeout() {
    let mut world = World::new();
    world.behind_target_group();
    let pairs = world.scaled_and_running(1);
    world.now += 1_000;
    world.scale(0);
    world.plan_records();
    let id = pairs[0].0;
    assert_eq!(world.state.instances[&id].phase, Phase::Draining);
    world.plan_records();
    assert_eq!(world.state.instances[&id].phase, Phase::Draining);
    world.now += world.state.tiers["web"]
        .spec
        .load_balancer
        .drain_timeout
        .as_millis();
    world.plan_records();
    assert_eq!(world.state.instances[&id].phase, Phase::Stopping);
}

#[test]
fn a_group_that_cannot_be_described_is_left_alone_and_reported_once() {
    let mut world = World::new();
    world.behind_target_group();
    let pairs = world.scaled_and_running(1);
    let failing = Ec2Observed {
        target_groups: BTreeMap::from([(
            TARGET_GROUP.to_string(),
            Err("TargetGroupNotFound".to_string()),
        )]),
        ..synced(world.instances_for(&pairs))
    };
    let plan = world.sync(&failing);
    assert!(plan.calls.is_empty());
    assert!(matches!(
        plan.commands.as_slice(),
        [Command::RecordEvent { reason, message, .. }]
            if reason == EC2_CALL_FAILED && message.contains("DescribeTargetHealth")
    ));
    assert!(world.sync(&failing).commands.is_empty());
    let back = world.sync(&with_group(world.instances_for(&pairs), Vec::new()));
    assert!(matches!(
        back.commands.as_slice(),
        [Command::RecordEvent { reason, .. }] if reason == EC2_REACHABLE
    ));
    assert_eq!(back.calls.len(), 1, "registers the ready instance");
}

#[test]
fn an_impaired_instance_is_replaced() {
    let mut world = World::new();
    let pairs = world.scaled_and_running(2);
    let mut observed = synced(world.instances_for(&pairs));
    observed.status = HashMap::from([
        (pairs[0].1.clone(), strata_ec2::StatusCheck::Impaired),
        (pairs[1].1.clone(), strata_ec2::StatusCheck::Initializing),
    ]);
    world.sync(&observed);
    let sick = &world.state.instances[&pairs[0].0];
    assert_eq!(sick.health, strata_api::Health::Unhealthy);
    assert!(sick
        .reason
        .as_deref()
        .unwrap_or_default()
        .contains("impaired"));
    assert_eq!(
        world.state.instances[&pairs[1].0].health,
        strata_api::Health::Healthy,
        "checks still initializing do not hold an instance back"
    );
    world.plan_records();
    assert_eq!(world.state.instances[&pairs[0].0].phase, Phase::Draining);
    assert_eq!(world.live().len(), 2, "a replacement is recorded");
    assert!(world
        .live()
        .iter()
        .all(|instance| instance.id != pairs[0].0));
}

#[test]
fn a_roll_counts_outdated_instances_on_their_way_out_toward_the_surge() {
    let mut world = World::new();
    let old = world.scaled_and_running(3);
    let mut spec = world.state.tiers["web"].spec.clone();
    spec.template.ami = Some("ami-87654321".to_string());
    world.apply(Command::PutTier {
        spec: Box::new(spec),
        max_tiers: None,
    });
    let not_final = |world: &World| {
        world
            .state
            .instances
            .values()
            .filter(|instance| !instance.phase.is_final())
            .count()
    };
    // One surge instance; once it runs, one old instance drains and, with no load balancer,
    // stops at once. Until EC2 has terminated it, no second new instance is recorded.
    world.plan_records();
    assert_eq!(not_final(&world), 4);
    let all = world.running();
    world.plan_records();
    world.plan_records();
    let leaving = old
        .iter()
        .filter(|(id, _)| world.state.instances[id].phase == Phase::Stopping)
        .count();
    assert_eq!(leaving, 1);
    assert_eq!(not_final(&world), 4, "desired 3 + max_surge 1");
    // EC2 reports it shutting down: its record ends, and the next new one is recorded.
    let mut described = world.instances_for(&all);
    for instance in &mut described {
        let uuid = instance
            .tag(TAG_INSTANCE)
            .and_then(|tag| Uuid::parse_str(tag).ok());
        if uuid.is_some_and(|id| world.state.instances[&id].phase == Phase::Stopping) {
            instance.state = Ec2State::ShuttingDown;
        }
    }
    world.sync(&synced(described));
    world.plan_records();
    assert_eq!(not_final(&world), 4);
}

/// A worker's registration of `node`, as an agent sends it.
fn registration(node: &str) -> RegisterRequest {
    RegisterRequest {
        node_id: node.to_string(),
        address: "10.0.0.9".to_string(),
        zone: None,
        labels: BTreeMap::new(),
        capacity: Resources {
            cpu: 64.0,
            memory_mb: 65536,
        },
        agent_version: "test".to_string(),
        roles: strata_api::default_roles(),
    }
}

fn register(node: &str, auth: crate::state::NodeAuth) -> Command {
    Command::RegisterNode {
        registration: registration(node),
        auth: Some(auth),
        max_nodes: None,
    }
}

fn boot(instance: Uuid, hash: &str) -> crate::state::NodeAuth {
    crate::state::NodeAuth::Bootstrap {
        credential_hash: hash.to_string(),
        instance,
    }
}

fn forbidden(result: &crate::state::CommandResult) -> bool {
    matches!(
        result,
        crate::state::CommandResult::Rejected {
            rejection: crate::state::Rejection::Forbidden { .. }
        }
    )
}

#[test]
fn an_instances_agent_registers_its_own_node_once_takes_no_work_and_leaves_with_it() {
    let mut world = World::new();
    world.scale(2);
    world.plan_records();
    let ids: Vec<Uuid> = world.state.instances.keys().copied().collect();
    let (first, second) = (ids[0], ids[1]);

    // Its own node only, a worker only, and only for an instance of the state.
    assert!(forbidden(
        &world.apply(register("host-x", boot(first, "h0")))
    ));
    assert!(forbidden(
        &world.apply(register(&second.to_string(), boot(first, "h0")))
    ));
    let mut balancer = registration(&first.to_string());
    balancer.roles = vec![strata_api::NodeRole::LoadBalancer];
    assert!(forbidden(&world.apply(Command::RegisterNode {
        registration: balancer,
        auth: Some(boot(first, "h0")),
        max_nodes: None,
    })));
    let stranger = Uuid::from_u128(999);
    assert!(forbidden(
        &world.apply(register(&stranger.to_string(), boot(stranger, "h0")))
    ));
    assert!(
        world.state.nodes.len() == 1,
        "{:?}",
        world.state.nodes.keys()
    );

    // Once: the node then holds a credential, which alone speaks for it (and keeps the
    // instance it belongs to).
    let node = first.to_string();
    world.apply(register(&node, boot(first, "h1")));
    assert_eq!(world.state.nodes[&node].ec2_instance, Some(first));
    assert!(forbidden(&world.apply(register(&node, boot(first, "h2")))));
    assert_eq!(world.state.node_of_credential("h2"), None);
    world.apply(register(
        &node,
        crate::state::NodeAuth::Credential {
            credential_hash: "h1".to_string(),
        },
    ));
    assert_eq!(world.state.nodes[&node].ec2_instance, Some(first));
    world.apply(register(&second.to_string(), boot(second, "h3")));

    // No work: a local tier with the only agent host cordoned is placed nowhere.
    world.apply(Command::SetNodeFlags {
        node: "host-1".to_string(),
        cordoned: true,
        draining: false,
    });
    let spec: TierSpec = serde_json::from_value(serde_json::json!({
        "name": "jobs",
        "template": {"driver": "process", "command": ["sleep", "1000"], "cpu": 0.1, "memory_mb": 16},
        "scaling": {"min": 1, "max": 1},
    }))
    .unwrap_or_else(|error| panic!("{error}"));
    world.apply(Command::PutTier {
        spec: Box::new(spec),
        max_tiers: None,
    });
    world.plan_records();
    assert!(
        world
            .state
            .instances
            .values()
            .all(|instance| instance.node.is_none()),
        "{:?}",
        world.state.instances
    );
    // The tier is placeable: uncordoned, host-1 takes it.
    world.apply(Command::SetNodeFlags {
        node: "host-1".to_string(),
        cordoned: false,
        draining: false,
    });
    world.plan_records();
    let placed: Vec<Option<&str>> = world
        .state
        .instances
        .values()
        .filter(|instance| instance.tier == "jobs")
        .map(|instance| instance.node.as_deref())
        .collect();
    assert_eq!(placed, [Some("host-1")]);

    // The first instance is gone: its node, once NotReady, is removed with its credential;
    // the second's NotReady node stays while its instance lives.
    world.apply(Command::RemoveInstances { ids: vec![first] });
    assert!(!world
        .plan_records()
        .iter()
        .any(|command| matches!(command, Command::RemoveNode { .. })));
    for id in [first, second] {
        world.apply(Command::SetNodeReady {
            node: id.to_string(),
            ready: false,
            reason: "test".to_string(),
        });
    }
    let removals: Vec<Command> = world
        .plan_records()
        .into_iter()
        .filter(|command| matches!(command, Command::RemoveNode { .. }))
        .collect();
    assert_eq!(removals.len(), 1, "{removals:?}");
    assert!(!world.state.nodes.contains_key(&node));
    assert!(world.state.nodes.contains_key(&second.to_string()));
    assert_eq!(world.state.node_of_credential("h1"), None);
    assert!(world
        .state
        .events
        .iter()
        .any(|event| event.reason == "NodeRemoved" && event.object == format!("node/{node}")));
    assert!(world
        .plan_records()
        .iter()
        .all(|command| !matches!(command, Command::RemoveNode { .. })));
}

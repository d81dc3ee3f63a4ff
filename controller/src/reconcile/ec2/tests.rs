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

fn synced(instances: Vec<Ec2Instance>) -> Ec2Observed {
    Ec2Observed {
        synced: true,
        error: None,
        instances,
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
        instances: Vec::new(),
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
        instances: Vec::new(),
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

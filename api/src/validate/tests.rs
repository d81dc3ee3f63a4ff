//! One row per rule: a valid tier, one change, and the exact paths that must be reported.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::tier::{HealthProtocol, QemuImage};

fn process_tier() -> TierSpec {
    TierSpec {
        kind: None,
        name: "web".to_string(),
        resource_version: None,
        provider: Provider::Local,
        template: Template {
            driver: Some(Driver::Process),
            command: vec!["strata-workload".to_string(), "--name".to_string()],
            ..Template::default()
        },
        health: HealthCheck::default(),
        scaling: Scaling {
            policies: vec![ScalingPolicy::target_tracking(
                ScalingMetric::CpuUtilization,
                60.0,
            )],
            max_step: 2,
            step_period: Duration::from_secs(60),
            ..Scaling::with_bounds(1, 4)
        },
        load_balancer: LoadBalancer::default(),
        placement: Placement::default(),
        rollout: crate::tier::Rollout::default(),
    }
}

fn qemu_tier() -> TierSpec {
    let mut spec = process_tier();
    spec.template = Template {
        driver: Some(Driver::Qemu),
        image: Some(QemuImage {
            kernel: "/var/lib/strata/vmlinuz".to_string(),
            initrd: "/var/lib/strata/initrd.img".to_string(),
            append: None,
        }),
        port: Some(8080),
        ..Template::default()
    };
    spec
}

fn ec2_tier() -> TierSpec {
    let mut spec = process_tier();
    spec.provider = Provider::Ec2;
    spec.template = Template {
        ami: Some("ami-0123456789abcdef0".to_string()),
        instance_type: Some("t3.micro".to_string()),
        port: Some(8080),
        subnets: vec!["subnet-1".to_string()],
        security_groups: vec!["sg-1".to_string()],
        user_data: Some("#!/bin/sh\n".to_string()),
        tags: BTreeMap::from([("team".to_string(), "web".to_string())]),
        ..Template::default()
    };
    spec
}

fn paths(spec: &TierSpec) -> Vec<String> {
    match tier_spec(spec) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_iter().map(|error| error.path).collect(),
    }
}

type Case = (
    &'static str,
    fn() -> TierSpec,
    fn(&mut TierSpec),
    &'static [&'static str],
);

fn check(cases: &[Case]) {
    let mut failures = Vec::new();
    for (label, base, change, expected) in cases {
        let mut spec = base();
        change(&mut spec);
        let got = paths(&spec);
        if got != *expected {
            failures.push(format!("{label}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn valid_bases_pass() {
    for base in [process_tier, qemu_tier, ec2_tier] {
        assert_eq!(tier_spec(&base()), Ok(()));
    }
}

#[test]
fn identity_rules() {
    check(&[
        (
            "kind Tier",
            process_tier,
            |s| s.kind = Some("Tier".into()),
            &[],
        ),
        (
            "kind other",
            process_tier,
            |s| s.kind = Some("Node".into()),
            &["kind"],
        ),
        (
            "kind lowercase",
            process_tier,
            |s| s.kind = Some("tier".into()),
            &["kind"],
        ),
        (
            "empty name",
            process_tier,
            |s| s.name = String::new(),
            &["name"],
        ),
        (
            "upper name",
            process_tier,
            |s| s.name = "Web".into(),
            &["name"],
        ),
        (
            "leading dash",
            process_tier,
            |s| s.name = "-web".into(),
            &["name"],
        ),
        (
            "trailing dash",
            process_tier,
            |s| s.name = "web-".into(),
            &["name"],
        ),
        ("63 chars", process_tier, |s| s.name = "a".repeat(63), &[]),
        (
            "64 chars",
            process_tier,
            |s| s.name = "a".repeat(64),
            &["name"],
        ),
        ("dot", process_tier, |s| s.name = "a.b".into(), &["name"]),
    ]);
}

#[test]
fn scaling_rules() {
    check(&[
        (
            "max 0",
            process_tier,
            |s| {
                s.scaling.min = 0;
                s.scaling.max = 0
            },
            &["scaling.max"],
        ),
        (
            "min over max",
            process_tier,
            |s| s.scaling.min = 5,
            &["scaling.min"],
        ),
        ("min equals max", process_tier, |s| s.scaling.min = 4, &[]),
        ("max 1000", process_tier, |s| s.scaling.max = 1000, &[]),
        (
            "max 1001",
            process_tier,
            |s| s.scaling.max = 1001,
            &["scaling.max"],
        ),
        (
            "desired in range",
            process_tier,
            |s| s.scaling.desired = Some(4),
            &[],
        ),
        (
            "desired above",
            process_tier,
            |s| s.scaling.desired = Some(5),
            &["scaling.desired"],
        ),
        (
            "desired below",
            process_tier,
            |s| {
                s.scaling.min = 2;
                s.scaling.desired = Some(1)
            },
            &["scaling.desired"],
        ),
        (
            "max_step 0",
            process_tier,
            |s| s.scaling.max_step = 0,
            &["scaling.max_step"],
        ),
        (
            "cooldown 24h",
            process_tier,
            |s| s.scaling.cooldown = Duration::from_secs(86_400),
            &[],
        ),
        (
            "cooldown over 24h",
            process_tier,
            |s| s.scaling.cooldown = Duration::from_secs(86_401),
            &["scaling.cooldown"],
        ),
        (
            "stabilization over 24h",
            process_tier,
            |s| s.scaling.scale_in_stabilization = Some(Duration::from_secs(86_401)),
            &["scaling.scale_in_stabilization"],
        ),
        (
            "step_period 1s",
            process_tier,
            |s| s.scaling.step_period = Duration::from_secs(1),
            &[],
        ),
        (
            "step_period 999ms",
            process_tier,
            |s| s.scaling.step_period = Duration::from_millis(999),
            &["scaling.step_period"],
        ),
        (
            "step_period over 24h",
            process_tier,
            |s| s.scaling.step_period = Duration::from_secs(86_401),
            &["scaling.step_period"],
        ),
    ]);
}

#[test]
fn policy_rules() {
    fn policies(spec: &mut TierSpec, list: &[(ScalingMetric, f64)]) {
        spec.scaling.policies = list
            .iter()
            .map(|&(metric, target)| ScalingPolicy::target_tracking(metric, target))
            .collect();
    }
    check(&[
        (
            "zero target",
            process_tier,
            |s| policies(s, &[(ScalingMetric::RequestsPerSecond, 0.0)]),
            &["scaling.policies[0].target"],
        ),
        (
            "negative target",
            process_tier,
            |s| policies(s, &[(ScalingMetric::QueueLength, -1.0)]),
            &["scaling.policies[0].target"],
        ),
        (
            "nan target",
            process_tier,
            |s| policies(s, &[(ScalingMetric::QueueLength, f64::NAN)]),
            &["scaling.policies[0].target"],
        ),
        (
            "infinite target",
            process_tier,
            |s| policies(s, &[(ScalingMetric::QueueLength, f64::INFINITY)]),
            &["scaling.policies[0].target"],
        ),
        (
            "cpu 100",
            process_tier,
            |s| policies(s, &[(ScalingMetric::CpuUtilization, 100.0)]),
            &[],
        ),
        (
            "cpu over 100",
            process_tier,
            |s| policies(s, &[(ScalingMetric::CpuUtilization, 100.5)]),
            &["scaling.policies[0].target"],
        ),
        (
            "rps over 100 is fine",
            process_tier,
            |s| policies(s, &[(ScalingMetric::RequestsPerSecond, 5000.0)]),
            &[],
        ),
        (
            "second policy bad",
            process_tier,
            |s| {
                policies(
                    s,
                    &[
                        (ScalingMetric::CpuUtilization, 50.0),
                        (ScalingMetric::ResponseTimeMs, 0.0),
                    ],
                )
            },
            &["scaling.policies[1].target"],
        ),
        (
            "metric twice",
            process_tier,
            |s| {
                policies(
                    s,
                    &[
                        (ScalingMetric::ActiveConnections, 5.0),
                        (ScalingMetric::CpuUtilization, 50.0),
                        (ScalingMetric::ActiveConnections, 9.0),
                    ],
                )
            },
            &["scaling.policies[2].metric"],
        ),
    ]);
}

#[test]
fn template_resource_rules() {
    check(&[
        (
            "cpu 0",
            process_tier,
            |s| s.template.cpu = 0.0,
            &["template.cpu"],
        ),
        (
            "cpu negative",
            process_tier,
            |s| s.template.cpu = -1.0,
            &["template.cpu"],
        ),
        (
            "cpu nan",
            process_tier,
            |s| s.template.cpu = f64::NAN,
            &["template.cpu"],
        ),
        ("cpu 256", process_tier, |s| s.template.cpu = 256.0, &[]),
        (
            "cpu 257",
            process_tier,
            |s| s.template.cpu = 257.0,
            &["template.cpu"],
        ),
        (
            "memory 15",
            process_tier,
            |s| s.template.memory_mb = 15,
            &["template.memory_mb"],
        ),
        (
            "memory 16",
            process_tier,
            |s| s.template.memory_mb = 16,
            &[],
        ),
        (
            "memory max",
            process_tier,
            |s| s.template.memory_mb = 1_048_576,
            &[],
        ),
        (
            "memory over",
            process_tier,
            |s| s.template.memory_mb = 1_048_577,
            &["template.memory_mb"],
        ),
        (
            "qemu port 0",
            qemu_tier,
            |s| s.template.port = Some(0),
            &["template.port"],
        ),
        (
            "qemu port max",
            qemu_tier,
            |s| s.template.port = Some(65535),
            &[],
        ),
        (
            "env ok",
            process_tier,
            |s| {
                s.template.env.insert("_LOG_LEVEL2".into(), "debug".into());
            },
            &[],
        ),
        (
            "env bad name",
            process_tier,
            |s| {
                s.template.env.insert("1BAD".into(), "x".into());
            },
            &["template.env[\"1BAD\"]"],
        ),
        (
            "env dash",
            process_tier,
            |s| {
                s.template.env.insert("A-B".into(), "x".into());
            },
            &["template.env[\"A-B\"]"],
        ),
        (
            "env PORT",
            process_tier,
            |s| {
                s.template.env.insert("PORT".into(), "80".into());
            },
            &["template.env.PORT"],
        ),
        (
            "env instance id",
            process_tier,
            |s| {
                s.template
                    .env
                    .insert("STRATA_INSTANCE_ID".into(), "x".into());
            },
            &["template.env.STRATA_INSTANCE_ID"],
        ),
    ]);
}

#[test]
fn local_template_rules() {
    check(&[
        (
            "no driver",
            process_tier,
            |s| s.template.driver = None,
            &["template.driver"],
        ),
        (
            "process no command",
            process_tier,
            |s| s.template.command.clear(),
            &["template.command"],
        ),
        (
            "process empty argument",
            process_tier,
            |s| s.template.command.push(String::new()),
            &["template.command[2]"],
        ),
        (
            "process empty program",
            process_tier,
            |s| s.template.command[0] = String::new(),
            &["template.command[0]"],
        ),
        (
            "process with image",
            process_tier,
            |s| s.template.image = qemu_tier().template.image,
            &["template.image"],
        ),
        (
            "qemu no image",
            qemu_tier,
            |s| s.template.image = None,
            &["template.image"],
        ),
        (
            "qemu empty kernel and initrd",
            qemu_tier,
            |s| {
                s.template.image = Some(QemuImage {
                    kernel: String::new(),
                    initrd: " ".into(),
                    append: None,
                })
            },
            &["template.image.kernel", "template.image.initrd"],
        ),
        (
            "qemu no port",
            qemu_tier,
            |s| s.template.port = None,
            &["template.port"],
        ),
        (
            "qemu with command",
            qemu_tier,
            |s| s.template.command = vec!["x".into()],
            &["template.command"],
        ),
        (
            "local ami",
            process_tier,
            |s| s.template.ami = Some("ami-1".into()),
            &["template.ami"],
        ),
        (
            "local with every ec2 field",
            process_tier,
            |s| {
                let ec2 = ec2_tier().template;
                s.template.ami = ec2.ami;
                s.template.instance_type = ec2.instance_type;
                s.template.subnets = ec2.subnets;
                s.template.security_groups = ec2.security_groups;
                s.template.user_data = ec2.user_data;
                s.template.tags = ec2.tags;
                s.template.key_name = Some("ops".into());
                s.template.iam_instance_profile = Some("web".into());
            },
            &[
                "template.ami",
                "template.instance_type",
                "template.subnets",
                "template.security_groups",
                "template.user_data",
                "template.key_name",
                "template.iam_instance_profile",
                "template.tags",
            ],
        ),
    ]);
}

#[test]
fn ec2_template_rules() {
    check(&[
        (
            "no ami",
            ec2_tier,
            |s| s.template.ami = None,
            &["template.ami"],
        ),
        (
            "bad ami prefix",
            ec2_tier,
            |s| s.template.ami = Some("img-123".into()),
            &["template.ami"],
        ),
        (
            "bare ami prefix",
            ec2_tier,
            |s| s.template.ami = Some("ami-".into()),
            &["template.ami"],
        ),
        (
            "ami with symbol",
            ec2_tier,
            |s| s.template.ami = Some("ami-12_3".into()),
            &["template.ami"],
        ),
        (
            "short ami",
            ec2_tier,
            |s| s.template.ami = Some("ami-12345678".into()),
            &[],
        ),
        (
            "no instance type",
            ec2_tier,
            |s| s.template.instance_type = None,
            &["template.instance_type"],
        ),
        (
            "bad instance type",
            ec2_tier,
            |s| s.template.instance_type = Some("micro".into()),
            &["template.instance_type"],
        ),
        (
            "no port",
            ec2_tier,
            |s| s.template.port = None,
            &["template.port"],
        ),
        (
            "port 0",
            ec2_tier,
            |s| s.template.port = Some(0),
            &["template.port"],
        ),
        (
            "driver",
            ec2_tier,
            |s| s.template.driver = Some(Driver::Process),
            &["template.driver"],
        ),
        (
            "command",
            ec2_tier,
            |s| s.template.command = vec!["x".into()],
            &["template.command"],
        ),
        (
            "image",
            ec2_tier,
            |s| s.template.image = qemu_tier().template.image,
            &["template.image"],
        ),
        (
            "env",
            ec2_tier,
            |s| {
                s.template.env.insert("A".into(), "b".into());
            },
            &["template.env"],
        ),
        (
            "no subnets",
            ec2_tier,
            |s| s.template.subnets.clear(),
            &["template.subnets"],
        ),
        (
            "empty subnet",
            ec2_tier,
            |s| s.template.subnets.push(String::new()),
            &["template.subnets[1]"],
        ),
        (
            "empty security group",
            ec2_tier,
            |s| s.template.security_groups.insert(0, String::new()),
            &["template.security_groups[0]"],
        ),
        (
            "huge user data",
            ec2_tier,
            |s| s.template.user_data = Some("x".repeat(16 * 1024 + 1)),
            &["template.user_data"],
        ),
        (
            "reserved tag",
            ec2_tier,
            |s| {
                s.template.tags.insert("strata:tier".into(), "x".into());
            },
            &["template.tags[\"strata:tier\"]"],
        ),
        (
            "aws tag",
            ec2_tier,
            |s| {
                s.template.tags.insert("aws:x".into(), "x".into());
            },
            &["template.tags[\"aws:x\"]"],
        ),
        (
            "empty tag key",
            ec2_tier,
            |s| {
                s.template.tags.insert(String::new(), "x".into());
            },
            &["template.tags[\"\"]"],
        ),
    ]);
}

const TARGET_GROUP: &str =
    "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067";

#[test]
fn target_group_rules() {
    check(&[
        (
            "ec2 tier with a target group",
            ec2_tier,
            |s| s.load_balancer.target_group_arn = Some(TARGET_GROUP.into()),
            &[],
        ),
        (
            "local tier with a target group",
            process_tier,
            |s| s.load_balancer.target_group_arn = Some(TARGET_GROUP.into()),
            &["load_balancer.target_group_arn"],
        ),
        (
            "target group and listen",
            ec2_tier,
            |s| {
                s.load_balancer.target_group_arn = Some(TARGET_GROUP.into());
                s.load_balancer.listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
            },
            &["load_balancer.target_group_arn"],
        ),
        (
            "not an arn",
            ec2_tier,
            |s| s.load_balancer.target_group_arn = Some("web-targets".into()),
            &["load_balancer.target_group_arn"],
        ),
        (
            "a load balancer's arn",
            ec2_tier,
            |s| {
                s.load_balancer.target_group_arn = Some(
                    "arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/web/50dc6c495c0c9188".into(),
                )
            },
            &["load_balancer.target_group_arn"],
        ),
        (
            "short account",
            ec2_tier,
            |s| {
                s.load_balancer.target_group_arn =
                    Some("arn:aws:elasticloadbalancing:us-east-1:1234:targetgroup/web/73e2".into())
            },
            &["load_balancer.target_group_arn"],
        ),
        (
            "arn with a space",
            ec2_tier,
            |s| s.load_balancer.target_group_arn = Some(format!("{TARGET_GROUP} x")),
            &["load_balancer.target_group_arn"],
        ),
        (
            "huge arn",
            ec2_tier,
            |s| {
                s.load_balancer.target_group_arn =
                    Some(format!("{TARGET_GROUP}{}", "a".repeat(600)))
            },
            &["load_balancer.target_group_arn"],
        ),
        (
            "haproxy-only fields with a target group",
            ec2_tier,
            |s| {
                s.load_balancer.target_group_arn = Some(TARGET_GROUP.into());
                s.load_balancer.sticky_cookie = Some("srv".into());
                s.load_balancer.tls_certificate = Some("/etc/ssl/web.pem".into());
            },
            &[
                "load_balancer.sticky_cookie",
                "load_balancer.tls_certificate",
            ],
        ),
    ]);
}

#[test]
fn health_rules() {
    check(&[
        (
            "relative path",
            process_tier,
            |s| s.health.path = "healthz".into(),
            &["health.path"],
        ),
        (
            "path with space",
            process_tier,
            |s| s.health.path = "/a b".into(),
            &["health.path"],
        ),
        (
            "tcp keeps default path",
            process_tier,
            |s| s.health.protocol = HealthProtocol::Tcp,
            &[],
        ),
        (
            "interval 100ms",
            process_tier,
            |s| {
                s.health.interval = Duration::from_millis(100);
                s.health.timeout = Duration::from_millis(100)
            },
            &[],
        ),
        (
            "interval 99ms",
            process_tier,
            |s| {
                s.health.interval = Duration::from_millis(99);
                s.health.timeout = Duration::from_millis(99)
            },
            &["health.interval", "health.timeout"],
        ),
        (
            "interval over 1h",
            process_tier,
            |s| s.health.interval = Duration::from_secs(3601),
            &["health.interval"],
        ),
        (
            "timeout over 1h",
            process_tier,
            |s| {
                s.health.interval = Duration::from_secs(3600);
                s.health.timeout = Duration::from_secs(3601)
            },
            &["health.timeout", "health.timeout"],
        ),
        (
            "timeout over interval",
            process_tier,
            |s| s.health.timeout = Duration::from_secs(3),
            &["health.timeout"],
        ),
        (
            "timeout equals interval",
            process_tier,
            |s| s.health.timeout = s.health.interval,
            &[],
        ),
        (
            "healthy 0",
            process_tier,
            |s| s.health.healthy_threshold = 0,
            &["health.healthy_threshold"],
        ),
        (
            "unhealthy 101",
            process_tier,
            |s| s.health.unhealthy_threshold = 101,
            &["health.unhealthy_threshold"],
        ),
        (
            "thresholds 100",
            process_tier,
            |s| {
                s.health.healthy_threshold = 100;
                s.health.unhealthy_threshold = 100
            },
            &[],
        ),
        (
            "grace 1h",
            process_tier,
            |s| s.health.grace_period = Duration::from_secs(3600),
            &[],
        ),
        (
            "grace over 1h",
            process_tier,
            |s| s.health.grace_period = Duration::from_secs(3601),
            &["health.grace_period"],
        ),
    ]);
}

#[test]
fn load_balancer_rules() {
    check(&[
        (
            "cookie http",
            process_tier,
            |s| s.load_balancer.sticky_cookie = Some("SRV".into()),
            &[],
        ),
        (
            "cookie tcp",
            process_tier,
            |s| {
                s.load_balancer.mode = LbMode::Tcp;
                s.load_balancer.sticky_cookie = Some("SRV".into())
            },
            &["load_balancer.sticky_cookie"],
        ),
        (
            "cookie with space",
            process_tier,
            |s| s.load_balancer.sticky_cookie = Some("my cookie".into()),
            &["load_balancer.sticky_cookie"],
        ),
        (
            "cookie with equals",
            process_tier,
            |s| s.load_balancer.sticky_cookie = Some("a=b".into()),
            &["load_balancer.sticky_cookie"],
        ),
        (
            "empty cookie",
            process_tier,
            |s| s.load_balancer.sticky_cookie = Some(String::new()),
            &["load_balancer.sticky_cookie"],
        ),
        (
            "tls certificate http",
            process_tier,
            |s| s.load_balancer.tls_certificate = Some("/etc/strata/web.pem".into()),
            &[],
        ),
        (
            "tls certificate tcp",
            process_tier,
            |s| {
                s.load_balancer.mode = LbMode::Tcp;
                s.load_balancer.tls_certificate = Some("/etc/strata/web.pem".into())
            },
            &["load_balancer.tls_certificate"],
        ),
        (
            "relative tls certificate",
            process_tier,
            |s| s.load_balancer.tls_certificate = Some("web.pem".into()),
            &["load_balancer.tls_certificate"],
        ),
        (
            "zero connect timeout",
            process_tier,
            |s| s.load_balancer.connect_timeout = Duration::from_millis(0),
            &["load_balancer.connect_timeout"],
        ),
        (
            "day-long idle timeout",
            process_tier,
            |s| s.load_balancer.idle_timeout = Duration::from_secs(86_400),
            &["load_balancer.idle_timeout"],
        ),
        (
            "day-long slowstart",
            process_tier,
            |s| s.load_balancer.slowstart = Duration::from_secs(86_400),
            &["load_balancer.slowstart"],
        ),
        (
            "uri http",
            process_tier,
            |s| s.load_balancer.algorithm = Algorithm::Uri,
            &[],
        ),
        (
            "uri tcp",
            process_tier,
            |s| {
                s.load_balancer.mode = LbMode::Tcp;
                s.load_balancer.algorithm = Algorithm::Uri
            },
            &["load_balancer.algorithm"],
        ),
        (
            "source tcp",
            process_tier,
            |s| {
                s.load_balancer.mode = LbMode::Tcp;
                s.load_balancer.algorithm = Algorithm::Source
            },
            &[],
        ),
        (
            "weight 0",
            process_tier,
            |s| s.load_balancer.weight = 0,
            &["load_balancer.weight"],
        ),
        (
            "weight 256",
            process_tier,
            |s| s.load_balancer.weight = 256,
            &[],
        ),
        (
            "weight 257",
            process_tier,
            |s| s.load_balancer.weight = 257,
            &["load_balancer.weight"],
        ),
        (
            "drain 1h",
            process_tier,
            |s| s.load_balancer.drain_timeout = Duration::from_secs(3600),
            &[],
        ),
        (
            "drain over 1h",
            process_tier,
            |s| s.load_balancer.drain_timeout = Duration::from_secs(3601),
            &["load_balancer.drain_timeout"],
        ),
        (
            "listen port 0",
            process_tier,
            |s| s.load_balancer.listen = "0.0.0.0:0".parse().ok(),
            &["load_balancer.listen"],
        ),
        (
            "listen port 8080",
            process_tier,
            |s| s.load_balancer.listen = "0.0.0.0:8080".parse().ok(),
            &[],
        ),
    ]);
}

#[test]
fn placement_rules() {
    fn label(spec: &mut TierSpec, key: &str, value: &str) {
        spec.placement.node_labels.insert(key.into(), value.into());
    }
    check(&[
        ("plain label", process_tier, |s| label(s, "zone", "eu-1a"), &[]),
        ("prefixed key", process_tier, |s| label(s, "example.com/zone", "a"), &[]),
        ("empty key", process_tier, |s| label(s, "", "a"), &["placement.node_labels[\"\"]"]),
        ("empty value", process_tier, |s| label(s, "zone", ""), &["placement.node_labels.zone"]),
        ("63 char key", process_tier, |s| label(s, &"k".repeat(63), "a"), &[]),
        ("64 char key", process_tier, |s| label(s, &"k".repeat(64), "a"), &["placement.node_labels.kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"]),
        ("64 char value", process_tier, |s| label(s, "zone", &"v".repeat(64)), &["placement.node_labels.zone"]),
        ("empty name after prefix", process_tier, |s| label(s, "example.com/", "a"), &["placement.node_labels[\"example.com/\"]"]),
        ("bad prefix", process_tier, |s| label(s, "Example_com/zone", "a"), &["placement.node_labels[\"Example_com/zone\"]"]),
        ("two slashes", process_tier, |s| label(s, "a/b/c", "a"), &["placement.node_labels[\"a/b/c\"]"]),
        ("value with space", process_tier, |s| label(s, "zone", "a b"), &["placement.node_labels.zone"]),
        ("bad key and value", process_tier, |s| label(s, "-k", "-v"), &["placement.node_labels[\"-k\"]", "placement.node_labels[\"-k\"]"]),
    ]);
}

#[test]
fn label_key_length_is_counted_on_the_name_part() {
    // Kubernetes counts 63 on the name and 253 on the prefix; a 64-char plain key is too long.
    assert!(!is_label_key(&"k".repeat(64)));
    assert!(is_label_key(&format!("{}/{}", "a.b", "k".repeat(63))));
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut spec = process_tier();
    spec.name = "Bad Name".into();
    spec.scaling.min = 9;
    spec.template.cpu = 0.0;
    spec.health.path = "x".into();
    spec.load_balancer.weight = 0;
    assert_eq!(
        paths(&spec),
        [
            "name",
            "scaling.min",
            "template.cpu",
            "health.path",
            "load_balancer.weight"
        ]
    );
}

#[test]
fn put_tier_requires_the_url_name() {
    let spec = process_tier();
    assert_eq!(put_tier("web", &spec), Ok(()));
    let paths: Vec<String> = put_tier("api", &spec)
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|error| error.path)
        .collect();
    assert_eq!(paths, ["name"]);
    let mut bad = process_tier();
    bad.scaling.max = 0;
    bad.scaling.min = 0;
    let paths: Vec<String> = put_tier("api", &bad)
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|error| error.path)
        .collect();
    assert_eq!(paths, ["name", "scaling.max"]);
}

#[test]
fn add_member_rules() {
    let cases: &[(u64, &str, &[&str])] = &[
        (1, "127.0.0.1:7001", &[]),
        (2, "controller-2.example.com:7001", &[]),
        (3, "[::1]:7001", &[]),
        (0, "127.0.0.1:7001", &["id"]),
        (1, "127.0.0.1", &["address"]),
        (1, "127.0.0.1:0", &["address"]),
        (1, "127.0.0.1:65536", &["address"]),
        (1, "http://127.0.0.1:7001", &["address"]),
        (1, ":7001", &["address"]),
        (1, "300.1.1.1:7001", &["address"]),
        (1, "[nonsense]:7001", &["address"]),
        (1, "host:+80", &["address"]),
        (0, "", &["id", "address"]),
    ];
    for (id, address, expected) in cases {
        let request = AddMemberRequest {
            id: *id,
            address: address.to_string(),
            voter: true,
        };
        let got: Vec<String> = add_member(&request)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|error| error.path)
            .collect();
        assert_eq!(got, *expected, "id {id} address {address:?}");
    }
}

#[test]
fn scale_rules() {
    let scaling = process_tier().scaling; // min 1, max 4
    for (desired, ok) in [(0, false), (1, true), (4, true), (5, false)] {
        let request = ScaleRequest::manual(desired);
        match scale(&request, &scaling) {
            Ok(()) => assert!(ok, "desired {desired} should be refused"),
            Err(errors) => {
                assert!(!ok, "desired {desired} should be accepted");
                assert_eq!(errors.len(), 1);
                assert_eq!(errors[0].path, "desired");
            }
        }
    }
    assert_eq!(scale(&ScaleRequest::automatic(), &scaling), Ok(()));
    let both = ScaleRequest {
        auto: true,
        ..ScaleRequest::manual(2)
    };
    let paths = |request: &ScaleRequest| -> Vec<String> {
        scale(request, &scaling)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|error| error.path)
            .collect()
    };
    assert_eq!(paths(&both), ["auto"]);
    assert_eq!(paths(&ScaleRequest::default()), ["desired"]);
}

#[test]
fn cookie_tokens() {
    for good in ["SERVERID", "srv_id", "a-b.c", "x!#$%&'*+^`|~"] {
        assert!(is_cookie_token(good), "{good:?}");
    }
    for bad in ["", "a b", "a;b", "a,b", "é", "a\tb", "a\"b", "(x)"] {
        assert!(!is_cookie_token(bad), "{bad:?}");
    }
}

/// The RFC 1123 label rule written a second, independent way: a three-state scan.
fn reference_dns_label(name: &str) -> bool {
    let chars: Vec<char> = name.chars().collect();
    if chars.is_empty() || chars.len() > 63 {
        return false;
    }
    let alnum = |c: char| c.is_ascii_digit() || c.is_ascii_lowercase();
    for (position, &c) in chars.iter().enumerate() {
        let edge = position == 0 || position == chars.len() - 1;
        let allowed = if edge { alnum(c) } else { alnum(c) || c == '-' };
        if !allowed {
            return false;
        }
    }
    true
}

proptest! {
    #[test]
    fn dns_label_matches_reference_on_likely_labels(name in "[a-z0-9-]{0,66}") {
        prop_assert_eq!(is_dns_label(&name), reference_dns_label(&name));
    }

    #[test]
    fn dns_label_matches_reference_on_any_text(name in "\\PC{0,70}") {
        prop_assert_eq!(is_dns_label(&name), reference_dns_label(&name));
    }

    #[test]
    fn dns_label_matches_reference_near_the_edges(name in "[a-zA-Z0-9_. -]{60,65}") {
        prop_assert_eq!(is_dns_label(&name), reference_dns_label(&name));
    }
}

#[test]
fn rollout_must_make_progress_and_stay_bounded() {
    let mut spec = process_tier();
    spec.rollout = crate::tier::Rollout {
        max_surge: 0,
        max_unavailable: 0,
    };
    let errors = crate::validate::tier_spec(&spec).err().unwrap_or_default();
    assert!(errors.iter().any(|e| e.path == "rollout"), "{errors:?}");
    spec.rollout.max_surge = 101;
    let errors = crate::validate::tier_spec(&spec).err().unwrap_or_default();
    assert!(
        errors.iter().any(|e| e.path == "rollout.max_surge"),
        "{errors:?}"
    );
    spec.rollout = crate::tier::Rollout {
        max_surge: 0,
        max_unavailable: 1,
    };
    assert!(crate::validate::tier_spec(&spec).is_ok());
}

fn policy(change: impl Fn(&mut ScalingPolicy)) -> impl Fn(&mut TierSpec) {
    move |spec: &mut TierSpec| change(&mut spec.scaling.policies[0])
}

fn step_policy(spec: &mut TierSpec, steps: &[(Option<f64>, Option<f64>, i32)]) {
    let policy = &mut spec.scaling.policies[0];
    policy.policy_type = PolicyType::Step;
    policy.target = None;
    policy.steps = steps
        .iter()
        .map(|&(lower, upper, change)| crate::tier::StepAdjustment {
            lower,
            upper,
            change,
        })
        .collect();
}

fn schedule(spec: &mut TierSpec, cron: &str, time_zone: &str) {
    spec.scaling.schedules = vec![crate::tier::ScalingSchedule {
        cron: cron.to_string(),
        time_zone: time_zone.to_string(),
        duration: Duration::from_secs(3600),
        min: Some(3),
        max: None,
    }];
}

#[test]
fn target_tracking_rules() {
    check(&[
        (
            "custom metric with a name",
            process_tier,
            |s| {
                policy(|p| {
                    p.metric = ScalingMetric::Custom;
                    p.name = Some("queue_depth".to_string());
                })(s)
            },
            &[],
        ),
        (
            "custom metric without a name",
            process_tier,
            |s| policy(|p| p.metric = ScalingMetric::Custom)(s),
            &["scaling.policies[0].name"],
        ),
        (
            "custom metric with a bad name",
            process_tier,
            |s| {
                policy(|p| {
                    p.metric = ScalingMetric::Custom;
                    p.name = Some("Queue Depth".to_string());
                })(s)
            },
            &["scaling.policies[0].name"],
        ),
        (
            "name on a built-in metric",
            process_tier,
            |s| policy(|p| p.name = Some("cpu".to_string()))(s),
            &["scaling.policies[0].name"],
        ),
        (
            "missing target",
            process_tier,
            |s| policy(|p| p.target = None)(s),
            &["scaling.policies[0].target"],
        ),
        (
            "tolerance nan",
            process_tier,
            |s| policy(|p| p.tolerance = Some(f64::NAN))(s),
            &["scaling.policies[0].tolerance"],
        ),
        (
            "tolerance negative",
            process_tier,
            |s| policy(|p| p.tolerance = Some(-0.1))(s),
            &["scaling.policies[0].tolerance"],
        ),
        (
            "tolerance 0 is allowed",
            process_tier,
            |s| policy(|p| p.tolerance = Some(0.0))(s),
            &[],
        ),
        (
            "reaction time under a second",
            process_tier,
            |s| policy(|p| p.reaction_time = Some(Duration::from_millis(500)))(s),
            &["scaling.policies[0].reaction_time"],
        ),
        (
            "reaction time over 15 minutes",
            process_tier,
            |s| policy(|p| p.reaction_time = Some(Duration::from_secs(901)))(s),
            &["scaling.policies[0].reaction_time"],
        ),
        (
            "steps on a target policy",
            process_tier,
            |s| {
                policy(|p| {
                    p.steps = vec![crate::tier::StepAdjustment {
                        lower: None,
                        upper: None,
                        change: 1,
                    }]
                })(s)
            },
            &["scaling.policies[0].steps"],
        ),
        (
            "a step and a target policy on one metric",
            process_tier,
            |s| {
                let mut step = s.scaling.policies[0].clone();
                step.policy_type = PolicyType::Step;
                step.target = None;
                step.steps = vec![crate::tier::StepAdjustment {
                    lower: Some(90.0),
                    upper: None,
                    change: 2,
                }];
                s.scaling.policies.push(step);
            },
            &[],
        ),
        (
            "two custom metrics of different names",
            process_tier,
            |s| {
                let mut custom = ScalingPolicy::target_tracking(ScalingMetric::Custom, 5.0);
                custom.name = Some("a".to_string());
                let mut other = custom.clone();
                other.name = Some("b".to_string());
                s.scaling.policies = vec![custom, other];
            },
            &[],
        ),
        (
            "one custom metric twice",
            process_tier,
            |s| {
                let mut custom = ScalingPolicy::target_tracking(ScalingMetric::Custom, 5.0);
                custom.name = Some("a".to_string());
                s.scaling.policies = vec![custom.clone(), custom];
            },
            &["scaling.policies[1].metric"],
        ),
    ]);
}

#[test]
fn step_policy_rules() {
    check(&[
        (
            "three steps that touch",
            process_tier,
            |s| {
                step_policy(
                    s,
                    &[
                        (None, Some(30.0), -1),
                        (Some(70.0), Some(90.0), 1),
                        (Some(90.0), None, 3),
                    ],
                )
            },
            &[],
        ),
        (
            "no steps",
            process_tier,
            |s| step_policy(s, &[]),
            &["scaling.policies[0].steps"],
        ),
        (
            "overlapping steps",
            process_tier,
            |s| step_policy(s, &[(Some(70.0), Some(90.0), 1), (Some(80.0), None, 3)]),
            &["scaling.policies[0].steps[1]"],
        ),
        (
            "two unbounded steps overlap",
            process_tier,
            |s| step_policy(s, &[(None, None, 1), (Some(80.0), None, 3)]),
            &["scaling.policies[0].steps[1]"],
        ),
        (
            "upper not above lower",
            process_tier,
            |s| step_policy(s, &[(Some(90.0), Some(90.0), 1)]),
            &["scaling.policies[0].steps[0].upper"],
        ),
        (
            "infinite bound",
            process_tier,
            |s| step_policy(s, &[(Some(f64::INFINITY), None, 1)]),
            &["scaling.policies[0].steps[0].lower"],
        ),
        (
            "nan bound",
            process_tier,
            |s| step_policy(s, &[(None, Some(f64::NAN), 1)]),
            &["scaling.policies[0].steps[0].upper"],
        ),
        (
            "target on a step policy",
            process_tier,
            |s| {
                step_policy(s, &[(Some(80.0), None, 1)]);
                s.scaling.policies[0].target = Some(60.0);
            },
            &["scaling.policies[0].target"],
        ),
        (
            "negative exact capacity",
            process_tier,
            |s| {
                step_policy(s, &[(Some(80.0), None, -1)]);
                s.scaling.policies[0].adjustment_type = Some(AdjustmentType::ExactCapacity);
            },
            &["scaling.policies[0].steps[0].change"],
        ),
        (
            "percent below -100",
            process_tier,
            |s| {
                step_policy(s, &[(Some(80.0), None, -101)]);
                s.scaling.policies[0].adjustment_type =
                    Some(AdjustmentType::PercentChangeInCapacity);
            },
            &["scaling.policies[0].steps[0].change"],
        ),
        (
            "min_adjustment_magnitude with percent",
            process_tier,
            |s| {
                step_policy(s, &[(Some(80.0), None, 50)]);
                s.scaling.policies[0].adjustment_type =
                    Some(AdjustmentType::PercentChangeInCapacity);
                s.scaling.policies[0].min_adjustment_magnitude = Some(2);
            },
            &[],
        ),
        (
            "min_adjustment_magnitude without percent",
            process_tier,
            |s| {
                step_policy(s, &[(Some(80.0), None, 1)]);
                s.scaling.policies[0].min_adjustment_magnitude = Some(2);
            },
            &["scaling.policies[0].min_adjustment_magnitude"],
        ),
    ]);
}

#[test]
fn schedule_rules() {
    check(&[
        (
            "weekday mornings in Paris",
            process_tier,
            |s| schedule(s, "0 8 * * MON-FRI", "Europe/Paris"),
            &[],
        ),
        (
            "invalid cron",
            process_tier,
            |s| schedule(s, "0 25 * * *", "UTC"),
            &["scaling.schedules[0].cron"],
        ),
        (
            "six fields",
            process_tier,
            |s| schedule(s, "0 0 8 * * *", "UTC"),
            &["scaling.schedules[0].cron"],
        ),
        (
            "numbered days of the week",
            process_tier,
            |s| schedule(s, "0 8 * * 1-5", "UTC"),
            &["scaling.schedules[0].cron"],
        ),
        (
            "unknown time zone",
            process_tier,
            |s| schedule(s, "0 8 * * *", "Europe/Atlantis"),
            &["scaling.schedules[0].time_zone"],
        ),
        (
            "neither min nor max",
            process_tier,
            |s| {
                schedule(s, "0 8 * * *", "UTC");
                s.scaling.schedules[0].min = None;
            },
            &["scaling.schedules[0]"],
        ),
        (
            "scheduled min above the tier's max",
            process_tier,
            |s| {
                schedule(s, "0 8 * * *", "UTC");
                s.scaling.schedules[0].min = Some(5);
            },
            &["scaling.schedules[0].min"],
        ),
        (
            "scheduled min above the tier's max, with its own max",
            process_tier,
            |s| {
                schedule(s, "0 8 * * *", "UTC");
                s.scaling.schedules[0].min = Some(5);
                s.scaling.schedules[0].max = Some(8);
            },
            &[],
        ),
        (
            "duration under a minute",
            process_tier,
            |s| {
                schedule(s, "0 8 * * *", "UTC");
                s.scaling.schedules[0].duration = Duration::from_secs(59);
            },
            &["scaling.schedules[0].duration"],
        ),
    ]);
}

#[test]
fn pacing_rules() {
    check(&[
        (
            "max_step_percent 0",
            process_tier,
            |s| s.scaling.max_step_percent = Some(0),
            &["scaling.max_step_percent"],
        ),
        (
            "max_step_percent off",
            process_tier,
            |s| s.scaling.max_step_percent = None,
            &[],
        ),
        (
            "warmup over an hour",
            process_tier,
            |s| s.scaling.warmup = Duration::from_secs(3601),
            &["scaling.warmup"],
        ),
    ]);
}

#[test]
fn custom_metric_samples() {
    let sample = |metric: &str, value: f64| CustomMetricSample {
        metric: metric.to_string(),
        value,
        instance: None,
    };
    assert_eq!(custom_metric(&sample("queue_depth", 3.0)), Ok(()));
    for (bad, path) in [
        (sample("queue_depth", f64::NAN), "value"),
        (sample("queue_depth", f64::INFINITY), "value"),
        (sample("Queue", 1.0), "metric"),
    ] {
        let errors = custom_metric(&bad).expect_err("invalid");
        assert_eq!(errors[0].path, path);
    }
}

/// Every size limit on a spec, at its bound (accepted) and one past it (refused with the
/// field's path); NUL bytes and denormal CPU values are refused with theirs.
#[test]
fn spec_limits_and_unstartable_values() {
    check(&[
        (
            "cpu denormal",
            process_tier,
            |s| s.template.cpu = 5e-324,
            &["template.cpu"],
        ),
        (
            "cpu a millicore",
            process_tier,
            |s| s.template.cpu = 0.001,
            &[],
        ),
        (
            "NUL in an argument",
            process_tier,
            |s| s.template.command[1] = "a\0b".to_string(),
            &["template.command[1]"],
        ),
        (
            "NUL in an env value",
            process_tier,
            |s| {
                s.template.env.insert("GREETING".into(), "hi\0".into());
            },
            &["template.env.GREETING"],
        ),
        (
            "arguments at the limit",
            process_tier,
            |s| s.template.command = vec!["a".to_string(); limits::COMMAND_ARGS],
            &[],
        ),
        (
            "too many arguments",
            process_tier,
            |s| s.template.command = vec!["a".to_string(); limits::COMMAND_ARGS + 1],
            &["template.command"],
        ),
        (
            "an argument too long",
            process_tier,
            |s| s.template.command[0] = "a".repeat(limits::COMMAND_ARG_BYTES + 1),
            &["template.command[0]"],
        ),
        (
            "an env value too long",
            process_tier,
            |s| {
                s.template
                    .env
                    .insert("BIG".into(), "v".repeat(limits::ENV_VALUE_BYTES + 1));
            },
            &["template.env.BIG"],
        ),
        (
            "too many env entries",
            process_tier,
            |s| {
                for index in 0..=limits::ENV_ENTRIES {
                    s.template.env.insert(format!("V{index}"), "1".into());
                }
            },
            &["template.env"],
        ),
        (
            "a user",
            process_tier,
            |s| s.template.user = Some("nobody".into()),
            &[],
        ),
        (
            "a user that is no user name",
            process_tier,
            |s| s.template.user = Some("root; rm".into()),
            &["template.user"],
        ),
        (
            "a user on qemu",
            qemu_tier,
            |s| s.template.user = Some("nobody".into()),
            &["template.user"],
        ),
        (
            "a user on ec2",
            ec2_tier,
            |s| s.template.user = Some("nobody".into()),
            &["template.user"],
        ),
        (
            "a kernel path too long",
            qemu_tier,
            |s| {
                if let Some(image) = &mut s.template.image {
                    image.kernel = format!("/{}", "k".repeat(limits::PATH_BYTES));
                }
            },
            &["template.image.kernel"],
        ),
        (
            "too many tags",
            ec2_tier,
            |s| {
                for index in 0..=limits::TAGS {
                    s.template.tags.insert(format!("t{index}"), "v".into());
                }
            },
            &["template.tags"],
        ),
        (
            "too many subnets",
            ec2_tier,
            |s| s.template.subnets = vec!["subnet-1".to_string(); limits::EC2_IDS + 1],
            &["template.subnets"],
        ),
        (
            "too many node labels",
            process_tier,
            |s| {
                for index in 0..=limits::LABELS {
                    s.placement
                        .node_labels
                        .insert(format!("k{index}"), "v".into());
                }
            },
            &["placement.node_labels"],
        ),
        (
            "a health path too long",
            process_tier,
            |s| s.health.path = format!("/{}", "p".repeat(limits::SHORT_BYTES)),
            &["health.path"],
        ),
        (
            "a spec too large as a whole",
            process_tier,
            |s| {
                // Each value within its own limit, the whole beyond the spec's.
                for index in 0..20 {
                    s.template
                        .env
                        .insert(format!("V{index}"), "v".repeat(limits::ENV_VALUE_BYTES));
                }
            },
            &["spec"],
        ),
    ]);
}

#[test]
fn policy_count_limit() {
    let mut spec = process_tier();
    let policy = spec.scaling.policies[0].clone();
    spec.scaling.policies = vec![policy; limits::POLICIES + 1];
    // (The copies also repeat one metric, which is refused on its own.)
    assert!(paths(&spec).contains(&"scaling.policies".to_string()));
}

fn registration() -> crate::node::RegisterRequest {
    crate::node::RegisterRequest {
        node_id: "host-a".into(),
        address: "127.0.0.1".into(),
        zone: None,
        labels: BTreeMap::new(),
        capacity: crate::node::Resources {
            cpu: 2.0,
            memory_mb: 1024,
        },
        agent_version: "1".into(),
        roles: crate::node::default_roles(),
    }
}

fn register_paths(request: &crate::node::RegisterRequest) -> Vec<String> {
    register(request).map_or_else(
        |errors| errors.into_iter().map(|e| e.path).collect(),
        |()| Vec::new(),
    )
}

fn heartbeat_paths(request: &crate::node::HeartbeatRequest) -> Vec<String> {
    heartbeat(request).map_or_else(
        |errors| errors.into_iter().map(|e| e.path).collect(),
        |()| Vec::new(),
    )
}

#[test]
fn registration_limits() {
    assert!(register_paths(&registration()).is_empty());
    let mut labels = registration();
    for index in 0..=limits::LABELS {
        labels.labels.insert(format!("k{index}"), "v".into());
    }
    assert_eq!(register_paths(&labels), ["labels"]);
    let mut version = registration();
    version.agent_version = "v".repeat(limits::AGENT_VERSION_BYTES + 1);
    assert_eq!(register_paths(&version), ["agent_version"]);
    let mut roles = registration();
    roles.roles = vec![crate::node::NodeRole::Worker; limits::ROLES + 1];
    assert_eq!(register_paths(&roles), ["roles"]);
}

#[test]
fn heartbeat_limits() {
    use crate::node::{Health, HeartbeatRequest, InstanceReport, Phase};
    use crate::pool::{LbReport, LbServerReport, LbTierReport};
    let report = |reason: usize| InstanceReport {
        id: uuid::Uuid::nil(),
        phase: Phase::Failed,
        health: Health::Unknown,
        port: None,
        reason: Some("r".repeat(reason)),
        cpu_percent: 0.0,
    };
    let request = |instances: Vec<InstanceReport>, lb: Option<LbReport>| HeartbeatRequest {
        node_id: "host-a".into(),
        metrics: Default::default(),
        instances,
        wait_ms: 0,
        lb,
    };
    assert!(heartbeat_paths(&request(vec![report(limits::REASON_BYTES)], None)).is_empty());
    assert_eq!(
        heartbeat_paths(&request(vec![report(limits::REASON_BYTES + 1)], None)),
        ["instances[0].reason"]
    );
    assert_eq!(
        heartbeat_paths(&request(
            vec![report(0); limits::HEARTBEAT_INSTANCES + 1],
            None
        )),
        ["instances"]
    );
    let tier = |error: usize, servers: usize, status: usize| LbTierReport {
        tier: "web".into(),
        version: 1,
        error: Some("e".repeat(error)),
        stats: Default::default(),
        servers: vec![
            LbServerReport {
                instance_id: uuid::Uuid::nil(),
                status: "s".repeat(status),
                stats: Default::default(),
            };
            servers
        ],
    };
    let lb = |tiers: Vec<LbTierReport>| {
        Some(LbReport {
            worker_pid: None,
            reloads: 0,
            tiers,
        })
    };
    assert!(heartbeat_paths(&request(
        Vec::new(),
        lb(vec![tier(limits::REASON_BYTES, 1, 4)])
    ))
    .is_empty());
    assert_eq!(
        heartbeat_paths(&request(
            Vec::new(),
            lb(vec![tier(limits::REASON_BYTES + 1, 1, 4)])
        )),
        ["lb.tiers[0].error"]
    );
    assert_eq!(
        heartbeat_paths(&request(
            Vec::new(),
            lb(vec![tier(0, limits::LB_SERVERS + 1, 4)])
        )),
        ["lb.tiers[0].servers"]
    );
    assert_eq!(
        heartbeat_paths(&request(
            Vec::new(),
            lb(vec![tier(0, 1, limits::LB_STATUS_BYTES + 1)])
        )),
        ["lb.tiers[0].servers[0].status"]
    );
    assert_eq!(
        heartbeat_paths(&request(
            Vec::new(),
            lb(vec![tier(0, 0, 0); limits::LB_TIERS + 1])
        )),
        ["lb.tiers"]
    );
}

#[test]
fn truncation_keeps_characters_whole() {
    assert_eq!(truncated("héllo", 2), "h");
    assert_eq!(truncated("héllo", 3), "hé");
    assert_eq!(truncated("short", 100), "short");
}

/// Every example in `deploy/examples/` decodes and validates, so the demo and the README never
/// show a file the API would refuse.
#[test]
fn the_example_tiers_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        for document in crate::decode::decode_documents(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        {
            let spec: TierSpec = crate::decode::decode_value(document)
                .unwrap_or_else(|p| panic!("{}: {p}", path.display()));
            if let Err(errors) = crate::validate::tier_spec(&spec) {
                panic!("{}: {errors:?}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} examples in {}", dir.display());
}

//! ELBv2 target groups (`aws-sdk-elasticloadbalancingv2`): what a group holds, and
//! registering and deregistering instances on it. Same client configuration, retries and
//! rate limit as the EC2 calls (one token bucket for both APIs).
//!
//! Calls, from https://docs.aws.amazon.com/elasticloadbalancing/latest/APIReference/:
//! `DescribeTargetHealth` without `Targets` lists every registered target, draining ones
//! included, with its state (`initial`, `healthy`, `unhealthy`, `unused`, `draining`,
//! `unavailable`); `RegisterTargets` is idempotent, so it is safe to repeat after an outcome
//! is unknown, and so is `DeregisterTargets` here (a target already gone counts as done). A
//! deregistered target stays `draining` for the group's
//! `deregistration_delay.timeout_seconds`, then leaves the list. moto lists only registered
//! targets and drops a deregistered one at once (no `draining`), and refuses to register an
//! instance that is not running.

use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealthStateEnum};

use crate::{Ec2, Ec2Error};

/// A target as DescribeTargetHealth shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The EC2 instance id (target type `instance`).
    pub id: String,
    pub port: Option<u16>,
    pub state: TargetState,
}

/// ELBv2's target health states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    Initial,
    Healthy,
    Unhealthy,
    /// Registered, but not used (no listener forwards to the group, or a stopped instance).
    Unused,
    /// Deregistered; finishing its open connections.
    Draining,
    Unavailable,
    Other,
}

impl TargetState {
    /// Registered and not on its way out.
    pub fn is_registered(self) -> bool {
        self != TargetState::Draining
    }
}

impl Ec2 {
    /// Every target of the group `arn`, draining ones included.
    pub async fn describe_targets(&self, arn: &str) -> Result<Vec<Target>, Ec2Error> {
        let output = self
            .retrying(true, || {
                let call = self
                    .elb
                    .describe_target_health()
                    .target_group_arn(arn.to_string());
                async move { call.send().await.map_err(Ec2Error::from_sdk) }
            })
            .await?;
        Ok(output
            .target_health_descriptions()
            .iter()
            .filter_map(|description| {
                let target = description.target()?;
                let state = match description
                    .target_health()
                    .and_then(|health| health.state())
                {
                    Some(TargetHealthStateEnum::Initial) => TargetState::Initial,
                    Some(TargetHealthStateEnum::Healthy) => TargetState::Healthy,
                    Some(TargetHealthStateEnum::Unhealthy) => TargetState::Unhealthy,
                    Some(TargetHealthStateEnum::Unused) => TargetState::Unused,
                    Some(TargetHealthStateEnum::Draining) => TargetState::Draining,
                    Some(TargetHealthStateEnum::Unavailable) => TargetState::Unavailable,
                    _ => TargetState::Other,
                };
                Some(Target {
                    id: target.id()?.to_string(),
                    port: target.port().and_then(|port| u16::try_from(port).ok()),
                    state,
                })
            })
            .collect())
    }

    /// Registers `(instance id, port)` targets on the group `arn`.
    pub async fn register_targets(
        &self,
        arn: &str,
        targets: &[(String, u16)],
    ) -> Result<(), Ec2Error> {
        if targets.is_empty() {
            return Ok(());
        }
        self.retrying(true, || {
            let call = self
                .elb
                .register_targets()
                .target_group_arn(arn.to_string())
                .set_targets(Some(descriptions(targets)));
            async move { call.send().await.map_err(Ec2Error::from_sdk) }
        })
        .await?;
        Ok(())
    }

    /// Deregisters `(instance id, port)` targets from the group `arn`; each drains for the
    /// group's deregistration delay. A target that is not registered (any more) is what was
    /// asked for: moto answers `InvalidTarget` for it and stops at the first one, so a batch
    /// it refuses is retried one target at a time.
    pub async fn deregister_targets(
        &self,
        arn: &str,
        targets: &[(String, u16)],
    ) -> Result<(), Ec2Error> {
        if targets.is_empty() {
            return Ok(());
        }
        match self.deregister_batch(arn, targets).await {
            Err(error) if is_invalid_target(&error) && targets.len() > 1 => {
                for target in targets {
                    match self
                        .deregister_batch(arn, std::slice::from_ref(target))
                        .await
                    {
                        Err(error) if is_invalid_target(&error) => {}
                        outcome => outcome?,
                    }
                }
                Ok(())
            }
            Err(error) if is_invalid_target(&error) => Ok(()),
            outcome => outcome,
        }
    }

    async fn deregister_batch(&self, arn: &str, targets: &[(String, u16)]) -> Result<(), Ec2Error> {
        self.retrying(true, || {
            let call = self
                .elb
                .deregister_targets()
                .target_group_arn(arn.to_string())
                .set_targets(Some(descriptions(targets)));
            async move { call.send().await.map_err(Ec2Error::from_sdk) }
        })
        .await?;
        Ok(())
    }

    /// Test set-up: an HTTP target group of target type `instance` in `vpc`. Returns its ARN.
    pub async fn create_target_group(
        &self,
        name: &str,
        vpc: &str,
        port: u16,
    ) -> Result<String, Ec2Error> {
        let output = self
            .retrying(true, || {
                let call = self
                    .elb
                    .create_target_group()
                    .name(name)
                    .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
                    .port(i32::from(port))
                    .vpc_id(vpc)
                    .target_type(aws_sdk_elasticloadbalancingv2::types::TargetTypeEnum::Instance);
                async move { call.send().await.map_err(Ec2Error::from_sdk) }
            })
            .await?;
        output
            .target_groups()
            .first()
            .and_then(|group| group.target_group_arn())
            .map(str::to_string)
            .ok_or_else(|| Ec2Error::Rejected {
                code: "EmptyResponse".to_string(),
                message: "CreateTargetGroup returned no target group".to_string(),
            })
    }
}

fn is_invalid_target(error: &Ec2Error) -> bool {
    matches!(error, Ec2Error::Rejected { code, .. } if code == "InvalidTarget")
}

fn descriptions(targets: &[(String, u16)]) -> Vec<TargetDescription> {
    targets
        .iter()
        .map(|(id, port)| {
            TargetDescription::builder()
                .id(id)
                .port(i32::from(*port))
                .build()
        })
        .collect()
}

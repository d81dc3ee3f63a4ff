//! The replicated state machine: a closed command enum and its deterministic `apply`.
//!
//! Invariants:
//! - `apply` reads no clock and no randomness: times come from `Request::at_ms`, stamped by the
//!   leader that proposed the command, so every replica computes the same state.
//! - An object's `resource_version` is the log index of the command that last changed it.
//!   Compare-and-set is decided here, at apply time, against the state at that log position, so
//!   a retried write with the same precondition can never apply twice.
//! - Rejections (not found, conflict, invalid) are results, not errors: the entry is still
//!   applied (as a no-op) and every replica rejects it the same way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use strata_api::{FieldError, ScalingDecision, Tier, TierSpec, TierStatus};

/// A command with the time the leader stamped on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Unix milliseconds on the proposing leader.
    pub at_ms: u64,
    pub command: Command,
}

/// Every change of replicated state. Closed: adding a variant is a protocol change that every
/// node must understand before the leader may propose it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Create or replace a tier. `spec.resource_version` is the compare-and-set precondition:
    /// `Some(0)` means "must not exist yet", `Some(v)` "must be at version v".
    PutTier { spec: TierSpec },
    DeleteTier {
        name: String,
        expected_version: Option<u64>,
    },
    /// Set the manual desired count.
    ScaleTier {
        name: String,
        desired: u32,
        expected_version: Option<u64>,
    },
}

/// The outcome of applying one entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CommandResult {
    /// Entries without a command (blank, membership) have no outcome.
    None,
    Tier {
        tier: Box<Tier>,
        created: bool,
    },
    Deleted {
        tier: Box<Tier>,
    },
    Rejected {
        rejection: Rejection,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    NotFound {
        kind: String,
        name: String,
    },
    /// The precondition did not hold; `current` is the object's version now (0: absent).
    Conflict {
        name: String,
        expected: u64,
        current: u64,
    },
    Invalid {
        errors: Vec<FieldError>,
    },
}

/// The replicated data. Serialized whole into snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub tiers: BTreeMap<String, Tier>,
}

impl State {
    /// Applies one command at log index `index`. Deterministic: see the module invariants.
    pub fn apply(&mut self, index: u64, request: &Request) -> CommandResult {
        match &request.command {
            Command::PutTier { spec } => self.put_tier(index, request.at_ms, spec),
            Command::DeleteTier {
                name,
                expected_version,
            } => self.delete_tier(name, *expected_version),
            Command::ScaleTier {
                name,
                desired,
                expected_version,
            } => self.scale_tier(index, request.at_ms, name, *desired, *expected_version),
        }
    }

    fn check_version(&self, name: &str, expected: Option<u64>) -> Result<(), Rejection> {
        let current = self.tiers.get(name).map_or(0, Tier::resource_version);
        match expected {
            Some(expected) if expected != current => Err(Rejection::Conflict {
                name: name.to_string(),
                expected,
                current,
            }),
            _ => Ok(()),
        }
    }

    fn put_tier(&mut self, index: u64, at_ms: u64, spec: &TierSpec) -> CommandResult {
        if let Err(rejection) = self.check_version(&spec.name, spec.resource_version) {
            return CommandResult::Rejected { rejection };
        }
        let mut stored_spec = spec.clone();
        stored_spec.resource_version = Some(index);
        stored_spec.kind = Some(strata_api::TIER_KIND.to_string());
        let scaling = &stored_spec.scaling;
        let tier = match self.tiers.get(&spec.name) {
            None => {
                let desired = scaling.desired.unwrap_or(scaling.min);
                Tier {
                    generation: 1,
                    created_at_ms: at_ms,
                    updated_at_ms: at_ms,
                    status: TierStatus {
                        desired,
                        last_scaling: Some(ScalingDecision {
                            at_ms,
                            from: 0,
                            to: desired,
                            reason: "tier created".to_string(),
                        }),
                        ..TierStatus::default()
                    },
                    spec: stored_spec,
                }
            }
            Some(existing) => {
                let mut old_spec = existing.spec.clone();
                old_spec.resource_version = stored_spec.resource_version;
                let generation = if old_spec == stored_spec {
                    existing.generation
                } else {
                    existing.generation + 1
                };
                let mut status = existing.status.clone();
                let before = status.desired;
                status.desired = scaling
                    .desired
                    .unwrap_or(before)
                    .clamp(scaling.min, scaling.max);
                if status.desired != before {
                    status.last_scaling = Some(ScalingDecision {
                        at_ms,
                        from: before,
                        to: status.desired,
                        reason: format!(
                            "spec changed: min {} max {} desired {}",
                            scaling.min,
                            scaling.max,
                            scaling
                                .desired
                                .map_or_else(|| "unset".to_string(), |d| d.to_string())
                        ),
                    });
                }
                Tier {
                    generation,
                    created_at_ms: existing.created_at_ms,
                    updated_at_ms: at_ms,
                    status,
                    spec: stored_spec,
                }
            }
        };
        let created = !self.tiers.contains_key(&spec.name);
        self.tiers.insert(spec.name.clone(), tier.clone());
        CommandResult::Tier {
            tier: Box::new(tier),
            created,
        }
    }

    fn delete_tier(&mut self, name: &str, expected: Option<u64>) -> CommandResult {
        if !self.tiers.contains_key(name) {
            return not_found(name);
        }
        if let Err(rejection) = self.check_version(name, expected) {
            return CommandResult::Rejected { rejection };
        }
        match self.tiers.remove(name) {
            Some(tier) => CommandResult::Deleted {
                tier: Box::new(tier),
            },
            None => not_found(name),
        }
    }

    fn scale_tier(
        &mut self,
        index: u64,
        at_ms: u64,
        name: &str,
        desired: u32,
        expected: Option<u64>,
    ) -> CommandResult {
        if let Err(rejection) = self.check_version(name, expected) {
            return CommandResult::Rejected { rejection };
        }
        let Some(tier) = self.tiers.get_mut(name) else {
            return not_found(name);
        };
        let scaling = &tier.spec.scaling;
        if desired < scaling.min || desired > scaling.max {
            return CommandResult::Rejected {
                rejection: Rejection::Invalid {
                    errors: vec![FieldError::new(
                        "desired",
                        format!(
                            "must be between scaling.min ({}) and scaling.max ({})",
                            scaling.min, scaling.max
                        ),
                    )],
                },
            };
        }
        let before = tier.status.desired;
        tier.spec.scaling.desired = Some(desired);
        tier.spec.resource_version = Some(index);
        tier.updated_at_ms = at_ms;
        tier.status.desired = desired;
        tier.status.last_scaling = Some(ScalingDecision {
            at_ms,
            from: before,
            to: desired,
            reason: "scaled by an operator".to_string(),
        });
        CommandResult::Tier {
            tier: Box::new(tier.clone()),
            created: false,
        }
    }
}

fn not_found(name: &str) -> CommandResult {
    CommandResult::Rejected {
        rejection: Rejection::NotFound {
            kind: "tier".to_string(),
            name: name.to_string(),
        },
    }
}

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
    PutTier { spec: Box<TierSpec> },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, min: u32, max: u32) -> TierSpec {
        let body = serde_json::json!({
            "name": name,
            "template": {"driver": "process", "command": ["app"]},
            "scaling": {"min": min, "max": max},
        });
        match serde_json::from_value(body) {
            Ok(spec) => spec,
            Err(error) => panic!("test spec: {error}"),
        }
    }

    fn put(spec: TierSpec) -> Request {
        Request {
            at_ms: 1000,
            command: Command::PutTier {
                spec: Box::new(spec),
            },
        }
    }

    fn tier_of(result: CommandResult) -> Tier {
        match result {
            CommandResult::Tier { tier, .. } | CommandResult::Deleted { tier } => *tier,
            other => panic!("expected a tier, got {other:?}"),
        }
    }

    #[test]
    fn create_sets_version_generation_and_desired_min() {
        let mut state = State::default();
        let result = state.apply(7, &put(spec("web", 2, 5)));
        assert!(matches!(result, CommandResult::Tier { created: true, .. }));
        let tier = tier_of(result);
        assert_eq!(tier.resource_version(), 7);
        assert_eq!(tier.generation, 1);
        assert_eq!(tier.status.desired, 2);
        assert_eq!(tier.created_at_ms, 1000);
    }

    #[test]
    fn compare_and_set_applies_once() {
        let mut state = State::default();
        state.apply(3, &put(spec("web", 1, 5)));
        let mut cas = spec("web", 1, 6);
        cas.resource_version = Some(3);
        assert!(matches!(
            state.apply(4, &put(cas.clone())),
            CommandResult::Tier { created: false, .. }
        ));
        // The same precondition again (a retry) is a conflict, not a second application.
        assert_eq!(
            state.apply(5, &put(cas)),
            CommandResult::Rejected {
                rejection: Rejection::Conflict {
                    name: "web".to_string(),
                    expected: 3,
                    current: 4
                }
            }
        );
        // Version 0 means "must not exist".
        let mut create_only = spec("web", 1, 5);
        create_only.resource_version = Some(0);
        assert!(matches!(
            state.apply(6, &put(create_only)),
            CommandResult::Rejected {
                rejection: Rejection::Conflict { current: 4, .. }
            }
        ));
    }

    #[test]
    fn unchanged_spec_keeps_generation_and_changed_spec_bumps_it() {
        let mut state = State::default();
        state.apply(1, &put(spec("web", 1, 5)));
        assert_eq!(
            tier_of(state.apply(2, &put(spec("web", 1, 5)))).generation,
            1
        );
        assert_eq!(
            tier_of(state.apply(3, &put(spec("web", 1, 9)))).generation,
            2
        );
    }

    #[test]
    fn scale_checks_bounds_and_records_the_decision() {
        let mut state = State::default();
        state.apply(1, &put(spec("web", 1, 5)));
        let scale = |desired, expected_version| Request {
            at_ms: 2000,
            command: Command::ScaleTier {
                name: "web".to_string(),
                desired,
                expected_version,
            },
        };
        assert!(matches!(
            state.apply(2, &scale(9, None)),
            CommandResult::Rejected {
                rejection: Rejection::Invalid { .. }
            }
        ));
        let tier = tier_of(state.apply(3, &scale(4, Some(1))));
        assert_eq!(tier.status.desired, 4);
        assert_eq!(tier.resource_version(), 3);
        let decision = tier
            .status
            .last_scaling
            .unwrap_or_else(|| panic!("no decision"));
        assert_eq!((decision.from, decision.to, decision.at_ms), (1, 4, 2000));
        // Narrowing max below the manual count clamps it.
        assert_eq!(
            tier_of(state.apply(4, &put(spec("web", 1, 3))))
                .status
                .desired,
            3
        );
    }

    #[test]
    fn delete_and_missing_tiers() {
        let mut state = State::default();
        let delete = Request {
            at_ms: 1,
            command: Command::DeleteTier {
                name: "web".to_string(),
                expected_version: None,
            },
        };
        assert!(matches!(
            state.apply(1, &delete),
            CommandResult::Rejected {
                rejection: Rejection::NotFound { .. }
            }
        ));
        state.apply(2, &put(spec("web", 1, 5)));
        assert!(matches!(
            state.apply(3, &delete),
            CommandResult::Deleted { .. }
        ));
        assert!(state.tiers.is_empty());
    }

    proptest::proptest! {
        /// Two replicas applying the same log reach the same state, whatever the commands.
        #[test]
        fn apply_is_deterministic(ops in proptest::collection::vec((0u8..4, 0u32..6, 0u64..8), 1..60)) {
            let log: Vec<Request> = ops
                .iter()
                .enumerate()
                .map(|(i, (kind, value, version))| {
                    let name = format!("t{}", value % 3);
                    let expected_version = (*version > 0).then_some(*version);
                    let command = match kind {
                        0 => Command::PutTier { spec: Box::new(spec(&name, 0, 5 + value)) },
                        1 => Command::ScaleTier { name, desired: *value, expected_version },
                        2 => Command::DeleteTier { name, expected_version },
                        _ => {
                            let mut s = spec(&name, 1, 5);
                            s.resource_version = expected_version;
                            Command::PutTier { spec: Box::new(s) }
                        }
                    };
                    Request { at_ms: 1000 + i as u64, command }
                })
                .collect();
            let mut first = State::default();
            let mut second = State::default();
            for (index, request) in log.iter().enumerate() {
                let a = first.apply(index as u64 + 1, request);
                let b = second.apply(index as u64 + 1, request);
                proptest::prop_assert_eq!(a, b);
            }
            proptest::prop_assert_eq!(&first, &second);
            for tier in first.tiers.values() {
                let scaling = &tier.spec.scaling;
                proptest::prop_assert!(tier.status.desired >= scaling.min && tier.status.desired <= scaling.max);
            }
        }
    }
}

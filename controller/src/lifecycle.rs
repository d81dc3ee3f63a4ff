//! The instance lifecycle as a state machine: `step(phase, event) -> phase`.
//!
//! `Pending → Starting → Running → Draining → Stopping → Terminated`, with `Failed` and `Lost`
//! as ends of their own. `Draining` keeps the instance running while load balancers finish its
//! sessions (pool state `drain`); only `Stopping` tells its agent to stop it. Final phases never change again, so a late or repeated report from an agent can
//! never resurrect an instance the control plane has given up on.

use serde::{Deserialize, Serialize};
use strata_api::Phase;

/// What can happen to an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceEvent {
    /// Its agent reports the VM started but not yet healthy.
    Started,
    /// Its agent reports the VM passed its health check.
    BecameReady,
    /// The control plane wants it gone (scale-in, replacement, tier deleted, node drained).
    Drain,
    /// Its drain ended (no session left on any load balancer, or the drain timeout passed):
    /// its agent may stop it.
    DrainEnded,
    /// Its agent reports it stopped, or no longer runs it after a drain.
    Stopped,
    /// Its agent reports it could not start or exited on its own.
    Failed,
    /// Its node stopped heartbeating.
    NodeLost,
}

/// The phase after `event`. Events that make no sense in a phase leave it unchanged.
pub fn step(phase: Phase, event: InstanceEvent) -> Phase {
    use InstanceEvent as E;
    use Phase as P;
    match (phase, event) {
        (P::Terminated | P::Failed | P::Lost, _) => phase,
        (_, E::NodeLost) => P::Lost,
        (P::Draining | P::Stopping, E::Stopped | E::Failed) => P::Terminated,
        (P::Draining, E::Started | E::BecameReady | E::Drain) => P::Draining,
        (P::Draining | P::Stopping, E::DrainEnded) => P::Stopping,
        (P::Stopping, E::Started | E::BecameReady | E::Drain) => P::Stopping,
        // Only a draining instance has a drain to end.
        (P::Pending | P::Starting | P::Running, E::DrainEnded) => phase,
        (_, E::Drain) => P::Draining,
        (_, E::Failed) => P::Failed,
        // A live instance that stopped without being asked to has failed.
        (P::Pending | P::Starting | P::Running, E::Stopped) => P::Failed,
        (P::Pending | P::Starting, E::Started) => P::Starting,
        (P::Running, E::Started) => P::Running,
        (P::Pending | P::Starting | P::Running, E::BecameReady) => P::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Phase; 8] = [
        Phase::Pending,
        Phase::Starting,
        Phase::Running,
        Phase::Draining,
        Phase::Stopping,
        Phase::Terminated,
        Phase::Failed,
        Phase::Lost,
    ];
    const EVENTS: [InstanceEvent; 7] = [
        InstanceEvent::Started,
        InstanceEvent::BecameReady,
        InstanceEvent::Drain,
        InstanceEvent::DrainEnded,
        InstanceEvent::Stopped,
        InstanceEvent::Failed,
        InstanceEvent::NodeLost,
    ];

    /// The whole transition table, written out so a change to it is a visible decision.
    #[test]
    fn every_phase_and_event() {
        use InstanceEvent as E;
        use Phase as P;
        let expected = |phase: P, event: E| -> P {
            let row = match phase {
                P::Pending => [
                    P::Starting,
                    P::Running,
                    P::Draining,
                    P::Pending,
                    P::Failed,
                    P::Failed,
                    P::Lost,
                ],
                P::Starting => [
                    P::Starting,
                    P::Running,
                    P::Draining,
                    P::Starting,
                    P::Failed,
                    P::Failed,
                    P::Lost,
                ],
                P::Running => [
                    P::Running,
                    P::Running,
                    P::Draining,
                    P::Running,
                    P::Failed,
                    P::Failed,
                    P::Lost,
                ],
                P::Draining => [
                    P::Draining,
                    P::Draining,
                    P::Draining,
                    P::Stopping,
                    P::Terminated,
                    P::Terminated,
                    P::Lost,
                ],
                P::Stopping => [
                    P::Stopping,
                    P::Stopping,
                    P::Stopping,
                    P::Stopping,
                    P::Terminated,
                    P::Terminated,
                    P::Lost,
                ],
                P::Terminated => [P::Terminated; 7],
                P::Failed => [P::Failed; 7],
                P::Lost => [P::Lost; 7],
            };
            row[EVENTS.iter().position(|e| *e == event).unwrap_or(0)]
        };
        for phase in PHASES {
            for event in EVENTS {
                assert_eq!(
                    step(phase, event),
                    expected(phase, event),
                    "{phase:?} + {event:?}"
                );
            }
        }
    }

    #[test]
    fn final_phases_are_absorbing_and_no_path_leads_back_to_pending() {
        for phase in PHASES {
            for event in EVENTS {
                let next = step(phase, event);
                if phase.is_final() {
                    assert_eq!(next, phase);
                }
                if phase != Phase::Pending {
                    assert_ne!(next, Phase::Pending);
                }
            }
        }
    }
}

//! The Strata agent's host-side machinery.
//!
//! Layout: `driver` starts, inspects, adopts and stops instances (`process` and `qemu`, both
//! as process groups, in `driver::group`); `state` persists one record per instance in the
//! agent's data dir; `supervisor` plans (pure) and executes convergence to the assigned
//! instances and reports their phase, health and CPU; `health` is the probe state machine and
//! its task; `host_metrics` and `procfs` read `/proc`; `standalone` converges to an assignment
//! file (what the `strata-agent` binary runs); `workload` is the `strata-workload` app; `lb` is
//! the load-balancer role, a local HAProxy driven through its Runtime API.
//!
//! Invariants: every instance leads its own process group and is identified by pid *and*
//! start time, so a recycled pid is never signalled; a record is on disk before the agent
//! relies on a started instance; instances outlive the agent process and are adopted, never
//! restarted, by the next one.

pub mod connected;
pub mod driver;
pub mod health;
pub mod host_metrics;
pub mod lb;
pub mod procfs;
pub mod standalone;
pub mod state;
pub mod supervisor;
pub mod workload;

pub use driver::{Driver, DriverError, DriverKind, InstanceRecord};
pub use health::{HealthState, HealthStatus};
pub use host_metrics::{HostMetrics, HostMetricsSampler};
pub use supervisor::{
    Action, Assignment, ConvergeOutcome, InstancePhase, InstanceReport, Supervisor,
    SupervisorConfig,
};

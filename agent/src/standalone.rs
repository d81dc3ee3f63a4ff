//! Standalone mode: the agent converges to an assignment file instead of a controller's
//! answers, and prints each heartbeat it would send as one JSON line on stdout.
//!
//! It is what the agent binary runs until the controller protocol exists, and it stays useful
//! afterwards for running instances on one host without a control plane. The file is re-read
//! on every tick (edit it to change what runs); a file that cannot be read or parsed keeps the
//! previous assignments, so a typo never stops every instance.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::host_metrics::{HostMetrics, HostMetricsSampler};
use crate::supervisor::{
    Assignment, InstanceReport, Supervisor, SupervisorConfig, SupervisorError,
};

#[derive(Clone, Debug)]
pub struct StandaloneConfig {
    pub node_id: String,
    pub supervisor: SupervisorConfig,
    /// A JSON array of [`Assignment`]s.
    pub assignments: PathBuf,
    /// Time between two converge-and-report ticks.
    pub interval: Duration,
}

/// What one tick reports: the body a heartbeat will carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    pub at_ms: u64,
    /// `None` when `/proc` could not be read (the error is logged).
    pub host: Option<HostMetrics>,
    pub instances: Vec<InstanceReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum AssignmentFileError {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub fn read_assignments(path: &Path) -> Result<Vec<Assignment>, AssignmentFileError> {
    let text = std::fs::read(path).map_err(|source| AssignmentFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| AssignmentFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs ticks until `shutdown` resolves, then stops the probers and returns. Instances keep
/// running: the next agent process adopts them.
pub async fn run(
    config: StandaloneConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SupervisorError> {
    let mut supervisor = Supervisor::open(config.supervisor.clone()).await?;
    let mut sampler = HostMetricsSampler::new();
    let mut desired: Option<Vec<Assignment>> = None;
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        match read_assignments(&config.assignments) {
            Ok(assignments) => desired = Some(assignments),
            Err(error) => tracing::error!(%error, "keeping the previous assignments"),
        }
        // Until a file has been read once, nothing is known about what should run, and
        // adopted instances are left alone rather than stopped.
        if let Some(desired) = &desired {
            let outcome = supervisor.converge(desired).await;
            for failure in &outcome.failures {
                tracing::warn!(instance = %failure.instance_id, error = %failure.error,
                    "converge action failed; retrying next tick");
            }
        }
        let host = sampler
            .sample()
            .inspect_err(|error| tracing::warn!(%error, "sample host metrics"))
            .ok();
        let heartbeat = Heartbeat {
            node_id: config.node_id.clone(),
            at_ms: crate::driver::unix_millis(),
            host,
            instances: supervisor.report().await,
        };
        match serde_json::to_string(&heartbeat) {
            Ok(line) => println!("{line}"),
            Err(error) => tracing::error!(%error, "encode heartbeat"),
        }
    }
    supervisor.shutdown().await;
    Ok(())
}

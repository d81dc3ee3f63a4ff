//! Strata's public API: resource types, their validation, `application/problem+json` errors,
//! the HTTP client that fails over between controllers, and the `stratactl` CLI.
//!
//! Layout: `tier`, `node` (nodes, instances, events and the agent protocol) and `cluster` hold
//! the serde types (`pool`: load-balancer pools and LB reports) and `list` the `{"items": [...]}` envelope; `validate` checks them and
//! reports every problem with its field path (built by `path`); `problem` is the RFC 7807 error
//! body; `schedule` parses the cron + time zone of scheduled scaling; `duration` is the `500ms`/`3s`/`1m` duration type used in files and flags; `decode`
//! turns bodies and files into typed values with the field path in every error; `client` talks
//! to any controller; `cli` implements `stratactl`, whose `main` is `src/bin/stratactl.rs`.
//!
//! Invariant: this crate knows nothing of axum or sqlx; the controller depends on it, never the
//! reverse. The wire types derive `utoipa::ToSchema`, from which the controller's OpenAPI
//! document takes their schemas (utoipa reads the same serde attributes serde does).

pub mod cli;
pub mod client;
pub mod cluster;
pub mod decode;
pub mod duration;
pub mod list;
pub mod node;
pub mod path;
pub mod pool;
pub mod problem;
pub mod schedule;
pub mod tier;
pub mod tls;
pub mod validate;

#[cfg(test)]
mod test_server;

pub use client::{Client, ClientConfig, ClientError, PutTierOutcome};
pub use cluster::{AddMemberRequest, ClusterStatus, Member};
pub use duration::Duration;
pub use list::ItemList;
pub use node::*;
pub use pool::*;
pub use problem::{FieldError, Problem, PROBLEM_CONTENT_TYPE};
pub use tier::*;

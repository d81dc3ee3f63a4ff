//! Strata's public API: resource types, their validation, `application/problem+json` errors,
//! the HTTP client that fails over between controllers, and the `stratactl` CLI.
//!
//! Layout: `tier` and `cluster` hold the serde types; `validate` checks them and reports every
//! problem with its field path; `problem` is the RFC 7807 error body; `duration` is the
//! `500ms`/`3s`/`1m` duration type used in files and flags; `client` talks to any controller;
//! `cli` implements `stratactl`.
//!
//! Invariant: this crate knows nothing of axum or sqlx; the controller depends on it, never the
//! reverse.

pub mod client;
pub mod cluster;
pub mod decode;
pub mod duration;
pub mod list;
pub mod path;
pub mod problem;
pub mod tier;
pub mod validate;

pub use client::{Client, ClientConfig, ClientError, PutTierOutcome};
pub use cluster::{AddMemberRequest, ClusterStatus, Member};
pub use duration::Duration;
pub use list::ItemList;
pub use problem::{FieldError, Problem, PROBLEM_CONTENT_TYPE};
pub use tier::*;

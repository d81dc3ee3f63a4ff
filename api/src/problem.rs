//! RFC 7807 `application/problem+json` error bodies.
//!
//! Every error the controller returns has this shape, so clients can branch on `status` and
//! show `errors[].path` next to the offending field.

use serde::{Deserialize, Serialize};

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// One field-level validation failure. `path` is a dotted path into the request body,
/// with indices for lists: `scaling.policies[1].target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// An RFC 7807 problem document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI reference naming the problem class, e.g. `urn:strata:problem:validation`.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For 409 conflicts: the resource version the object has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_resource_version: Option<u64>,
    /// For 421 answers to agents: the address of the leader to talk to instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// For 503 `no-quorum`: the members the answering node knows, so a client can try another.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<crate::cluster::Member>,
}

impl Problem {
    /// A problem of class `kind` (the last segment of its `type` URN).
    pub fn new(status: u16, kind: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            problem_type: format!("urn:strata:problem:{kind}"),
            title: title.to_string(),
            status,
            detail: detail.into(),
            errors: Vec::new(),
            current_resource_version: None,
            leader: None,
            members: Vec::new(),
        }
    }

    /// A 422 carrying field errors.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = match errors.as_slice() {
            [one] => format!("{}: {}", one.path, one.message),
            many => format!("{} fields are invalid", many.len()),
        };
        Problem {
            errors,
            ..Problem::new(422, "validation", "Invalid resource", detail)
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.title, self.status, self.detail)?;
        for error in &self.errors {
            write!(f, "\n  {}: {}", error.path, error.message)?;
        }
        Ok(())
    }
}

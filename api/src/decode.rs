//! Turning request bodies and tier files into typed values, with errors that name the field.
//!
//! `decode_json` is what the controller's handlers call on a body: text that is not JSON at all
//! is a 400 (`malformed`), JSON that does not fit the type is a 422 (`validation`) whose single
//! field error carries the path of the offending field, the unknown one included
//! (`scaling.mni`), so the operator can fix the file without guessing.
//!
//! `decode_documents` reads what operators write by hand: YAML with several `---` documents, a
//! JSON object, or a JSON array of objects.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_path_to_error::Segment;

use crate::path;
use crate::problem::{FieldError, Problem};

/// Decodes a JSON request body into `T`, refusing trailing data.
///
/// Errors: syntax or premature end of input → 400 with kind `malformed` and the line and column
/// in `detail`; a value that does not fit `T` (unknown or missing field, wrong type, bad enum
/// value, bad duration) → 422 with one `errors[]` entry holding the field path.
///
/// A body that decodes is decoded once, without path tracking (which costs an allocation per
/// field on every request); only a failing body is decoded again with `serde_path_to_error` to
/// name the field. Both passes run the same `Deserialize` impl on the same bytes, so they fail
/// alike.
pub fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(problem_from)?;
    deserializer.end().map_err(|error| malformed(&error))?;
    Ok(value)
}

/// Decodes an already parsed JSON value (one document of a file) into `T`; every error is a 422
/// with the field path, since the text itself was already accepted.
pub fn decode_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(problem_from)
}

/// Why a file of documents could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DocumentsError {
    /// The text looked like JSON (it starts with `{` or `[`) but is neither JSON nor YAML.
    #[error("invalid JSON at line {line} column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    /// A YAML document could not be parsed; `document` counts from 1.
    #[error("invalid YAML in document {document}: {message}")]
    Yaml { document: usize, message: String },
    /// A document (counted from 1 in the file, or an array element) is not a mapping.
    #[error("document {document} is {found}, not an object with fields such as name and scaling")]
    NotAnObject {
        document: usize,
        found: &'static str,
    },
}

/// Splits a file into its documents, each a JSON object.
///
/// YAML may hold several documents separated by `---`; JSON may be one object or an array of
/// objects (a YAML document holding a list is treated the same way). Empty documents are skipped
/// so that a leading or trailing `---` does no harm.
pub fn decode_documents(text: &str) -> Result<Vec<serde_json::Value>, DocumentsError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => return objects_of(vec![value]),
            Err(json_error) => {
                // YAML's flow style (`{name: web}`) also starts with a brace; only when YAML
                // cannot read it either is the JSON error the one worth showing.
                return match yaml_documents(text) {
                    Ok(values) => objects_of(values),
                    Err(_) => Err(DocumentsError::Json {
                        line: json_error.line(),
                        column: json_error.column(),
                        message: message_without_location(&json_error),
                    }),
                };
            }
        }
    }
    objects_of(yaml_documents(text)?)
}

fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>, DocumentsError> {
    let mut values = Vec::new();
    for (position, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value =
            serde_json::Value::deserialize(document).map_err(|error| DocumentsError::Yaml {
                document: position + 1,
                message: error.to_string(),
            })?;
        values.push(value);
    }
    Ok(values)
}

/// Flattens top-level arrays, drops empty documents and refuses anything but objects.
fn objects_of(values: Vec<serde_json::Value>) -> Result<Vec<serde_json::Value>, DocumentsError> {
    let mut items = Vec::new();
    for value in values {
        match value {
            serde_json::Value::Array(elements) => items.extend(elements),
            other => items.push(other),
        }
    }
    let mut objects = Vec::new();
    for (position, item) in items.into_iter().enumerate() {
        let found = match &item {
            serde_json::Value::Object(_) => {
                objects.push(item);
                continue;
            }
            serde_json::Value::Null => continue,
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "a list",
        };
        return Err(DocumentsError::NotAnObject {
            document: position + 1,
            found,
        });
    }
    Ok(objects)
}

fn problem_from(error: serde_path_to_error::Error<serde_json::Error>) -> Problem {
    let last_key = match error.path().iter().next_back() {
        Some(Segment::Map { key }) => Some(key.clone()),
        _ => None,
    };
    let parent = render_path(error.path());
    let inner = error.into_inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            // Text that is not JSON inside a field (`"value": 1e999`, `NaN`) still names it.
            let mut problem = malformed(&inner);
            // (A path with an unknown segment, as at the end of the input, names nothing.)
            if !parent.is_empty() && !parent.contains('?') {
                problem.errors = vec![FieldError::new(parent, message_without_location(&inner))];
            }
            problem
        }
        serde_json::error::Category::Data | serde_json::error::Category::Io => {
            let message = message_without_location(&inner);
            Problem::validation(vec![field_error(&parent, last_key.as_deref(), &message)])
        }
    }
}

fn malformed(error: &serde_json::Error) -> Problem {
    Problem::new(
        400,
        "malformed",
        "Malformed JSON",
        format!(
            "{} at line {} column {}",
            message_without_location(error),
            error.line(),
            error.column()
        ),
    )
}

/// serde reports a missing or duplicate field at the enclosing object; the operator needs the path of the
/// field itself, so the field name moves from the message into the path. An unknown field is
/// already the last segment of the path (`last_key`), so only the message is reworded.
fn field_error(parent: &str, last_key: Option<&str>, message: &str) -> FieldError {
    if let Some(name) = quoted_after(message, "unknown field `") {
        let expected = message
            .split_once(", expected ")
            .map(|(_, rest)| format!("; expected {rest}"))
            .unwrap_or_default();
        let field_path = if last_key == Some(name) {
            parent.to_string()
        } else {
            path::key(parent, name)
        };
        return FieldError::new(field_path, format!("unknown field{expected}"));
    }
    if let Some(name) = quoted_after(message, "missing field `") {
        return FieldError::new(path::key(parent, name), "is required");
    }
    if let Some(name) = quoted_after(message, "duplicate field `") {
        return FieldError::new(path::key(parent, name), "duplicate field: give it once");
    }
    let shown = if parent.is_empty() {
        path::ROOT
    } else {
        parent
    };
    FieldError::new(shown, message)
}

fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

fn render_path(segments: &serde_path_to_error::Path) -> String {
    let mut rendered = String::new();
    for segment in segments.iter() {
        rendered = match segment {
            Segment::Seq { index } => path::index(&rendered, *index),
            Segment::Map { key } => path::key(&rendered, key),
            // Enum variants are not fields the operator wrote; the field holding the enum is
            // already in the path.
            Segment::Enum { .. } => rendered,
            Segment::Unknown => path::field(&rendered, "?"),
        };
    }
    rendered
}

/// serde_json appends " at line L column C" to its messages; the location is reported in its
/// own words (or is meaningless, for errors about a parsed value).
fn message_without_location(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    match message.strip_suffix(&suffix) {
        Some(stripped) => stripped.to_string(),
        None => message,
    }
}

#[cfg(test)]
mod tests;

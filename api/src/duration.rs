//! Durations as operators write them: `500ms`, `3s`, `1m`, `1h 30m`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration that serializes as a human string (`"1m 30s"`) and parses the same forms
/// on the command line and in tier files. Plain numbers are refused: a bare `30` could mean
/// seconds or milliseconds, and guessing wrong silently is worse than an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Duration(std::time::Duration::from_millis(millis))
    }

    pub fn as_std(self) -> std::time::Duration {
        self.0
    }

    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl From<std::time::Duration> for Duration {
    fn from(value: std::time::Duration) -> Self {
        Duration(value)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// The reason a duration string was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (write it like 500ms, 3s, 1m)")]
pub struct ParseDurationError {
    input: String,
    reason: String,
}

impl FromStr for Duration {
    type Err = ParseDurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(input.trim())
            .map(Duration)
            .map_err(|error| ParseDurationError {
                input: input.to_string(),
                reason: error.to_string(),
            })
    }
}

/// In the OpenAPI document a duration is a string in humantime's syntax: the API writes
/// `humantime::format_duration` (`"1m 30s"`) and reads what `humantime::parse_duration`
/// accepts. No pattern is given: humantime's grammar (units from `ns` to `y`, spaces between
/// parts) is wider than a short regular expression would say, and the server's 422 names the
/// field when a string does not parse.
impl utoipa::PartialSchema for Duration {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "A duration such as `500ms`, `3s`, `1m` or `1h 30m` (a bare number is refused)",
            ))
            .examples(["30s"])
            .into()
    }
}

impl utoipa::ToSchema for Duration {}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"500ms\", \"3s\" or \"1m\"")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Duration, E> {
                value.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operator_forms() {
        assert_eq!(
            "500ms".parse::<Duration>().ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!("3s".parse::<Duration>().ok(), Some(Duration::from_secs(3)));
        assert_eq!("1m".parse::<Duration>().ok(), Some(Duration::from_secs(60)));
        assert!("30".parse::<Duration>().is_err());
        assert!("soon".parse::<Duration>().is_err());
    }

    #[test]
    fn round_trips_through_json() {
        let d = Duration::from_millis(1500);
        let json = serde_json::to_string(&d).unwrap_or_default();
        assert_eq!(json, "\"1s 500ms\"");
        assert_eq!(serde_json::from_str::<Duration>(&json).ok(), Some(d));
        assert!(serde_json::from_str::<Duration>("30").is_err());
    }
}

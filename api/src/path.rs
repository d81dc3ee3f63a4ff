//! Field paths as they appear in `FieldError::path`: `scaling.policies[1].target`,
//! `template.env.PORT`, `placement.node_labels["example.com/zone"]`.
//!
//! Validation and decoding both build paths here, so a client sees the same spelling for a field
//! whether the server refused it while parsing or while checking it.

/// The path shown for an error about the whole document rather than one of its fields.
pub const ROOT: &str = "(root)";

/// `parent.name`, or `name` at the top level.
pub fn field(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// `parent[index]`.
pub fn index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// A map entry: `parent.key` when the key reads like an identifier, otherwise
/// `parent["key"]` so that keys holding dots or slashes stay unambiguous.
pub fn key(parent: &str, key: &str) -> String {
    if is_identifier(key) {
        field(parent, key)
    } else {
        format!("{parent}[{key:?}]")
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: the shape of environment variable names and of plain map keys.
pub fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) if first.is_ascii_alphabetic() || first == '_' => {
            chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_dotted_and_indexed_paths() {
        assert_eq!(field("", "name"), "name");
        assert_eq!(field("scaling", "min"), "scaling.min");
        assert_eq!(index("scaling.policies", 1), "scaling.policies[1]");
        assert_eq!(key("template.env", "PORT"), "template.env.PORT");
        assert_eq!(
            key("placement.node_labels", "example.com/zone"),
            "placement.node_labels[\"example.com/zone\"]"
        );
        assert_eq!(key("template.env", "1X"), "template.env[\"1X\"]");
    }

    #[test]
    fn identifiers_follow_the_environment_variable_rule() {
        for good in ["A", "_", "PORT", "my_var2", "_1"] {
            assert!(is_identifier(good), "{good:?} should be an identifier");
        }
        for bad in ["", "1A", "A-B", "A.B", "É", "A B"] {
            assert!(!is_identifier(bad), "{bad:?} should not be an identifier");
        }
    }
}

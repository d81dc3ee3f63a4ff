//! Validation of resources; every failure carries its field path.

use crate::problem::FieldError;
use crate::tier::TierSpec;

/// Checks a tier declaration and returns every problem found, each with its field path.
pub fn tier_spec(spec: &TierSpec) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    if !is_dns_label(&spec.name) {
        errors.push(FieldError::new(
            "name",
            "must be a DNS label: 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit",
        ));
    }
    if spec.scaling.min > spec.scaling.max {
        errors.push(FieldError::new(
            "scaling.min",
            "must not exceed scaling.max",
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// True for RFC 1123 labels.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

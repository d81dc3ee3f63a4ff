//! The envelope of every collection the API returns.

use serde::{Deserialize, Serialize};

/// Body of `GET /v1/tiers` and later collections: `{"items": [...], "resource_version": N}`.
/// An object rather than a bare array so that fields such as a continuation token can be added
/// without breaking clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemList<T> {
    pub items: Vec<T>,
    /// The revision the list was read at (at least every item's `resource_version`), when the
    /// server reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<u64>,
    /// More items follow: pass this as `?continue=` (with the same filters) for the next
    /// page. Absent on the last page.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Items per page when a list request names no `limit`, and the largest `limit` allowed.
pub const DEFAULT_PAGE: usize = 500;
pub const MAX_PAGE: usize = 1000;

impl<T> ItemList<T> {
    pub fn new(items: Vec<T>) -> Self {
        ItemList {
            items,
            resource_version: None,
            next: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_with_and_without_a_version() {
        let bare: Result<ItemList<u32>, _> = serde_json::from_str(r#"{"items":[1,2]}"#);
        assert_eq!(bare.ok(), Some(ItemList::new(vec![1, 2])));
        let versioned: Result<ItemList<u32>, _> =
            serde_json::from_str(r#"{"items":[],"resource_version":9}"#);
        assert_eq!(
            versioned.ok().and_then(|list| list.resource_version),
            Some(9)
        );
    }
}

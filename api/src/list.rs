//! The envelope of every collection the API returns.

use serde::{Deserialize, Serialize};

/// Body of `GET /v1/tiers` and later collections: `{"items": [...]}`. An object rather than a
/// bare array so that fields such as a continuation token can be added without breaking
/// clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemList<T> {
    pub items: Vec<T>,
}

impl<T> ItemList<T> {
    pub fn new(items: Vec<T>) -> Self {
        ItemList { items }
    }
}

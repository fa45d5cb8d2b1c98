//! The catalog: resource ids, validation of published entries, search over a node's subtree ([`search`]) and
//! questions its subtree does not cover asked up the tree ([`discover`]).

use std::fmt;
use std::str::FromStr;

use fedgate_proto::v1::{CatalogEntry, ShareMode, ShareType};

use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Uscc};
use crate::limits::{Bounded, LimitsConfig, excerpt};

pub mod discover;
pub mod search;

pub use search::{
    INDEXED_PREFIX_CHARS, IndexToken, TOKENIZER_VERSION, Term, entry_tokens, finish_page,
    is_long_word, matches, query_tokens, search_query, subtree_prefix, terms,
};

/// Longest local code a provider may choose, whatever the limits say: ids are stored and routed as they are.
const MAX_LOCAL_CODE: usize = 64;

/// A resource id `"<node code>:<local code>"`: the node that holds the resource and the provider's own code.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceId {
    node: DivisionCode,
    local: String,
}

impl ResourceId {
    /// Builds an id from its parts, checking the local code.
    pub fn new(node: DivisionCode, local: &str) -> Result<Self> {
        check_local_code(local)?;
        Ok(Self {
            node,
            local: local.to_owned(),
        })
    }

    /// The node that holds the resource.
    pub fn node(&self) -> DivisionCode {
        self.node
    }

    /// The provider-chosen part.
    pub fn local(&self) -> &str {
        &self.local
    }
}

fn check_local_code(local: &str) -> Result<()> {
    if local.is_empty() || local.len() > MAX_LOCAL_CODE {
        return Err(Error::InvalidArgument(format!(
            "resource local code {:?} must have 1 to {MAX_LOCAL_CODE} characters",
            excerpt(local)
        )));
    }
    if let Some(c) = local
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::InvalidArgument(format!(
            "resource local code {:?} contains {c:?}; only letters, digits, '.', '_' and '-' are allowed",
            excerpt(local)
        )));
    }
    Ok(())
}

impl FromStr for ResourceId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let Some((node, local)) = s.split_once(':') else {
            return Err(Error::InvalidArgument(format!(
                "resource id {:?} must have the form \"<node code>:<local code>\"",
                excerpt(s)
            )));
        };
        let node = node
            .parse::<DivisionCode>()
            .map_err(|e| Error::InvalidArgument(format!("resource id {:?}: {e}", excerpt(s))))?;
        Self::new(node, local)
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.local)
    }
}

/// Parses the `resource_id` field of a request, naming the field on error.
pub fn parse_resource_id(field: &str, value: &str) -> Result<ResourceId> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    value
        .parse()
        .map_err(|e: Error| Error::InvalidArgument(format!("{field}: {e}")))
}

fn is_field_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Validates an entry an agency publishes at `node` (within `limits`: lengths, counts, no control characters
/// but tabs and line breaks in texts) and completes the parts the node owns.
pub fn prepare_publish(
    node: DivisionCode,
    provider: &Uscc,
    mut entry: CatalogEntry,
    now_rfc3339: String,
    limits: &LimitsConfig,
) -> Result<CatalogEntry> {
    entry.check_limits(limits)?;
    let id = if entry.id.contains(':') {
        let id = parse_resource_id("entry.id", &entry.id)?;
        if id.node() != node {
            return Err(Error::InvalidArgument(format!(
                "entry.id {:?} names node {} but this is node {node}",
                excerpt(&entry.id),
                id.node()
            )));
        }
        id
    } else {
        ResourceId::new(node, &entry.id)
            .map_err(|e| Error::InvalidArgument(format!("entry.id: {e}")))?
    };
    if !entry.provider_uscc.is_empty() && entry.provider_uscc != provider.as_str() {
        return Err(Error::PermissionDenied(format!(
            "entry.provider_uscc {:?} differs from the caller's certificate ({provider})",
            excerpt(&entry.provider_uscc)
        )));
    }
    if entry.title.trim().is_empty() {
        return Err(Error::InvalidArgument("entry.title is required".into()));
    }
    let share_type = ShareType::try_from(entry.share_type).unwrap_or(ShareType::Unspecified);
    if share_type == ShareType::Unspecified {
        return Err(Error::InvalidArgument(format!(
            "entry.share_type of {id} must be UNCONDITIONAL, CONDITIONAL or NOT_SHARED"
        )));
    }
    if entry.fields.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "entry.fields of {id} must list at least one data item"
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &entry.fields {
        if !is_field_name(&f.name) {
            return Err(Error::InvalidArgument(format!(
                "entry.fields of {id}: field name {:?} must be 1-64 letters, digits or '_'",
                excerpt(&f.name)
            )));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "entry.fields of {id}: field {:?} is listed twice",
                excerpt(&f.name)
            )));
        }
    }
    if !entry.key_field.is_empty() && !seen.contains(entry.key_field.as_str()) {
        return Err(Error::InvalidArgument(format!(
            "entry.key_field {:?} of {id} is not one of its fields",
            excerpt(&entry.key_field)
        )));
    }
    if entry
        .share_modes
        .iter()
        .any(|m| ShareMode::try_from(*m).is_err() || *m == ShareMode::Unspecified as i32)
    {
        return Err(Error::InvalidArgument(format!(
            "entry.share_modes of {id} contains an unknown mode"
        )));
    }
    if entry.share_modes.is_empty() {
        entry.share_modes.push(ShareMode::Query as i32);
    }
    for r in &entry.related {
        parse_resource_id("entry.related", r)?;
    }
    entry.id = id.to_string();
    entry.node_code = node.to_string();
    entry.provider_uscc = provider.to_string();
    entry.updated_at = now_rfc3339;
    Ok(entry)
}

/// Validates a batch an agency publishes at `node`: each entry as [`prepare_publish`] does (errors name the
/// entry's index), at least one entry, no id twice.
pub fn prepare_batch(
    node: DivisionCode,
    provider: &Uscc,
    entries: Vec<CatalogEntry>,
    now_rfc3339: &str,
    limits: &LimitsConfig,
) -> Result<Vec<CatalogEntry>> {
    if entries.is_empty() {
        return Err(Error::InvalidArgument(
            "entries must hold at least one entry".into(),
        ));
    }
    let mut seen = std::collections::HashMap::with_capacity(entries.len());
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let entry = prepare_publish(node, provider, entry, now_rfc3339.to_owned(), limits)
            .map_err(|e| e.within(&format!("entries[{i}]")))?;
        if let Some(first) = seen.insert(entry.id.clone(), i) {
            return Err(Error::InvalidArgument(format!(
                "entries[{i}].id {} repeats entries[{first}].id",
                entry.id
            )));
        }
        out.push(entry);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_ids_parse_and_reject() {
        let id: ResourceId = "350102:marriage".parse().expect("valid id");
        assert_eq!(id.node().to_string(), "350102");
        assert_eq!(id.local(), "marriage");
        assert!("350102".parse::<ResourceId>().is_err());
        assert!("35010:x".parse::<ResourceId>().is_err());
        assert!("350102:a b".parse::<ResourceId>().is_err());
        assert!("350102:".parse::<ResourceId>().is_err());
    }
}

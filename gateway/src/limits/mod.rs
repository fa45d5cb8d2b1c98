//! Bounded input: every string, list and message an agency or a neighbour sends has a configured limit, checked at
//! the edge before any work and refused with INVALID_ARGUMENT naming the field and the limit; errors quote at most
//! a short excerpt of a bad value; no audit record or catalog item can outgrow what an upward batch carries.
//!
//! The limits and their defaults are listed in `docs/security.md`.

mod console;
mod demand;
mod guard;
mod messages;

use std::fmt::Display;

use fedgate_proto::v1::AuditRecord;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use guard::{Guard, GuardLayer};
pub use messages::{Bounded, check_forward, refusal};

/// Characters of a bad value an error message quotes at most.
pub const EXCERPT_CHARS: usize = 32;
/// Characters an audit record's purpose or detail keeps at most, whatever wrote it.
pub const RECORD_TEXT_CHARS: usize = 8192;
/// Characters any other text field of an audit record keeps at most.
pub const RECORD_FIELD_CHARS: usize = 256;
/// Route entries an audit record keeps at most, and characters per entry.
pub const RECORD_ROUTE: usize = 64;
/// Characters per route entry of an audit record.
const RECORD_ROUTE_CHARS: usize = 32;
/// Largest encoded audit record: what [`bound_record`] guarantees, and what a parent accepts from a child.
pub const MAX_RECORD_BYTES: usize = 128 * 1024;
/// Largest catalog entry any configuration may allow, and what a parent accepts from a child.
pub const MAX_ENTRY_CEILING: usize = 1024 * 1024;
/// Characters of a status message a node answers with at most.
pub const MAX_STATUS_CHARS: usize = 2048;

/// The limits on what a node accepts, from the `[limits]` section of its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Characters of a caller-chosen request id.
    pub max_request_id_chars: usize,
    /// Characters of any other identifier: application, objection and grant ids, node codes, agency codes,
    /// audit outcomes, software versions, route entries.
    pub max_id_chars: usize,
    /// Characters of a resource's local code (the part after "<node code>:").
    pub max_local_code_chars: usize,
    /// Characters of a share key or an objection's record key.
    pub max_key_chars: usize,
    /// Characters of a purpose, scenario, reason, description, evidence, resolution or usage requirement.
    pub max_text_chars: usize,
    /// Characters of a catalog entry's title.
    pub max_title_chars: usize,
    /// Characters of a catalog entry's summary.
    pub max_summary_chars: usize,
    /// Characters of a catalog entry's short texts: format, update frequency, a field's type and description.
    pub max_entry_text_chars: usize,
    /// Elements of a classification path (entry or search).
    pub max_classification_depth: usize,
    /// Characters of one classification element.
    pub max_classification_chars: usize,
    /// Fields of a catalog entry, and fields named in one request (asked, granted, clear, dimensions).
    pub max_fields: usize,
    /// Characters of a field name.
    pub max_field_name_chars: usize,
    /// Related resource ids of a catalog entry.
    pub max_related: usize,
    /// Values of one verify share.
    pub max_verify_values: usize,
    /// Characters of one verify value.
    pub max_verify_value_chars: usize,
    /// Fields one statistics share groups by.
    pub max_group_by: usize,
    /// Entries of a forwarded request's route (and of a revocation's).
    pub max_route_hops: usize,
    /// Characters of a catalog search text.
    pub max_search_chars: usize,
    /// Words of a catalog search text.
    pub max_search_words: usize,
    /// Characters of one search word.
    pub max_search_word_chars: usize,
    /// Entries of one catalog search page.
    pub max_search_page: u32,
    /// Entries of one batch publication (`Agency.PublishBatch`).
    pub max_batch_entries: usize,
    /// Records of one bulk or open-data page.
    pub max_bulk_page: u32,
    /// Records of one audit query page.
    pub max_audit_page: u32,
    /// Characters of a page token.
    pub max_page_token_chars: usize,
    /// Bytes of a signed grant presented with a share.
    pub max_grant_bytes: usize,
    /// Bytes of one encoded catalog entry.
    pub max_entry_bytes: usize,
    /// Days a grant may run from its issue at most; an unconditional grant gets exactly this.
    pub max_grant_days: u32,
    /// Bytes of one message this node decodes (every listener).
    pub max_message_bytes: usize,
    /// Bytes of one upward batch this node sends its parent (kept under the parent's `max_message_bytes`).
    pub max_push_bytes: usize,
    /// Bytes of the entries of one catalog search page (kept under a client's 4 MiB default).
    pub max_page_bytes: usize,
    /// Demands of one listing page.
    pub max_demand_page: u32,
    /// Demands one agency may have open (filed or assigned) at the province at once.
    pub max_open_demands: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_id_chars: 64,
            max_id_chars: 128,
            max_local_code_chars: 64,
            max_key_chars: 256,
            max_text_chars: 2000,
            max_title_chars: 200,
            max_summary_chars: 4000,
            max_entry_text_chars: 500,
            max_classification_depth: 8,
            max_classification_chars: 64,
            max_fields: 200,
            max_field_name_chars: 64,
            max_related: 32,
            max_verify_values: 32,
            max_verify_value_chars: 1024,
            max_group_by: 8,
            max_route_hops: 16,
            max_search_chars: 256,
            max_search_words: 8,
            max_search_word_chars: 64,
            max_search_page: 500,
            max_batch_entries: 1000,
            max_bulk_page: 5000,
            max_audit_page: 1000,
            max_page_token_chars: 1024,
            max_grant_bytes: 64 * 1024,
            max_entry_bytes: 256 * 1024,
            max_grant_days: 365,
            max_message_bytes: 4 * 1024 * 1024,
            max_push_bytes: 3 * 1024 * 1024,
            max_page_bytes: 3 * 1024 * 1024,
            max_demand_page: 200,
            max_open_demands: 100,
        }
    }
}

impl LimitsConfig {
    /// Refuses settings that would let a record or an item outgrow a stream, or that no request could meet;
    /// `hop_limit` is the routing hop limit in force. The error names the first problem of [`Self::problems`].
    pub fn validate(&self, hop_limit: u32) -> Result<()> {
        match self.problems(hop_limit).into_iter().next() {
            Some((key, message)) => Err(Error::InvalidArgument(format!("{key}: {message}"))),
            None => Ok(()),
        }
    }

    /// Every setting [`Self::validate`] refuses, as its key (`limits.max_fields`) and what is wrong with it.
    pub fn problems(&self, hop_limit: u32) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut bad =
            |key: &str, message: String| problems.push((format!("limits.{key}"), message));
        let zero = [
            ("max_request_id_chars", self.max_request_id_chars),
            ("max_id_chars", self.max_id_chars),
            ("max_local_code_chars", self.max_local_code_chars),
            ("max_key_chars", self.max_key_chars),
            ("max_text_chars", self.max_text_chars),
            ("max_title_chars", self.max_title_chars),
            ("max_fields", self.max_fields),
            ("max_field_name_chars", self.max_field_name_chars),
            ("max_search_words", self.max_search_words),
            ("max_search_word_chars", self.max_search_word_chars),
            ("max_batch_entries", self.max_batch_entries),
            ("max_grant_days", self.max_grant_days as usize),
            ("max_push_bytes", self.max_push_bytes),
            ("max_page_bytes", self.max_page_bytes),
            ("max_demand_page", self.max_demand_page as usize),
            ("max_open_demands", self.max_open_demands),
            ("max_search_page", self.max_search_page as usize),
            ("max_audit_page", self.max_audit_page as usize),
        ];
        for (key, _) in zero.iter().filter(|(_, v)| *v == 0) {
            bad(key, "must be at least 1".into());
        }
        if self.max_text_chars > RECORD_TEXT_CHARS {
            bad(
                "max_text_chars",
                format!(
                    "{} is above {RECORD_TEXT_CHARS}, what an audit record keeps",
                    self.max_text_chars
                ),
            );
        }
        if self.max_entry_bytes > MAX_ENTRY_CEILING {
            bad(
                "max_entry_bytes",
                format!(
                    "{} is above {MAX_ENTRY_CEILING}, what a parent accepts in one item",
                    self.max_entry_bytes
                ),
            );
        }
        let one_item = self.max_entry_bytes.max(MAX_RECORD_BYTES) + 64 * 1024;
        if self.max_message_bytes < one_item {
            bad(
                "max_message_bytes",
                format!(
                    "{} cannot carry one catalog entry or audit record with its batch ({one_item} bytes)",
                    self.max_message_bytes
                ),
            );
        }
        if self.max_bulk_page > crate::policy::MAX_BULK_PAGE || self.max_bulk_page == 0 {
            bad(
                "max_bulk_page",
                format!(
                    "{} must be 1 to {}",
                    self.max_bulk_page,
                    crate::policy::MAX_BULK_PAGE
                ),
            );
        }
        if self.max_route_hops <= hop_limit as usize {
            bad(
                "max_route_hops",
                format!(
                    "{} must exceed routing.hop_limit {hop_limit}: a route holds every node passed",
                    self.max_route_hops
                ),
            );
        }
        problems
    }

    /// Longest full resource id: a node code, ':' and a local code.
    pub fn max_resource_id_chars(&self) -> usize {
        7 + self.max_local_code_chars
    }

    /// Seconds a grant may run at most.
    pub fn max_grant_secs(&self) -> i64 {
        i64::from(self.max_grant_days) * 24 * 3600
    }
}

/// One limit: its value and its configuration key, for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit {
    max: usize,
    key: &'static str,
}

/// The [`Limit`] of a `LimitsConfig` field, named after the field.
macro_rules! limit {
    ($limits:expr, $key:ident) => {
        $crate::limits::Limit::new($limits.$key as usize, stringify!($key))
    };
}
pub(crate) use limit;

impl Limit {
    /// A limit of `max` under the configuration key `key`.
    pub(crate) const fn new(max: usize, key: &'static str) -> Self {
        Self { max, key }
    }
}

/// At most [`EXCERPT_CHARS`] characters of `value`, with "…" when something was cut: what an error may quote.
pub fn excerpt(value: &str) -> String {
    match value.char_indices().nth(EXCERPT_CHARS) {
        None => value.to_owned(),
        Some((at, _)) => format!("{}…", &value[..at]),
    }
}

/// `value` cut to at most `max` characters, the last being "…" when something was cut.
pub fn clamp(value: &str, max: usize) -> String {
    let mut s = value.to_owned();
    clamp_in_place(&mut s, max);
    s
}

fn clamp_in_place(value: &mut String, max: usize) {
    if max == 0 {
        value.clear();
        return;
    }
    if let Some((at, _)) = value.char_indices().nth(max - 1)
        && value[at..].chars().nth(1).is_some()
    {
        value.truncate(at);
        value.push('…');
    }
}

/// Refuses an identifier-like value: longer than `limit` characters, or holding any control character.
pub(crate) fn ident(field: impl Display, value: &str, limit: Limit) -> Result<()> {
    length(&field, value, limit)?;
    controls(&field, value, false)
}

/// Refuses a free text: longer than `limit` characters, or holding a control character other than tab and line
/// breaks.
pub(crate) fn text(field: impl Display, value: &str, limit: Limit) -> Result<()> {
    length(&field, value, limit)?;
    controls(&field, value, true)
}

/// Refuses a list of more than `limit` entries.
pub(crate) fn count(field: impl Display, n: usize, limit: Limit) -> Result<()> {
    if n > limit.max {
        return Err(Error::InvalidArgument(format!(
            "{field} has {n} entries, above the limit of {} (limits.{})",
            limit.max, limit.key
        )));
    }
    Ok(())
}

/// Refuses a list of identifiers: too many, or one of them refused by [`ident`].
pub(crate) fn idents(field: &str, values: &[String], n: Limit, each: Limit) -> Result<()> {
    count(field, values.len(), n)?;
    for (i, v) in values.iter().enumerate() {
        ident(format_args!("{field}[{i}]"), v, each)?;
    }
    Ok(())
}

/// Refuses an encoding of more than `limit` bytes.
pub(crate) fn bytes(field: impl Display, n: usize, limit: Limit) -> Result<()> {
    if n > limit.max {
        return Err(Error::InvalidArgument(format!(
            "{field} has {n} bytes, above the limit of {} (limits.{})",
            limit.max, limit.key
        )));
    }
    Ok(())
}

/// Refuses a page size above `limit`.
pub(crate) fn page(field: impl Display, n: u32, limit: Limit) -> Result<()> {
    if n as usize > limit.max {
        return Err(Error::InvalidArgument(format!(
            "{field} {n} is above the limit of {} (limits.{})",
            limit.max, limit.key
        )));
    }
    Ok(())
}

fn length(field: &impl Display, value: &str, limit: Limit) -> Result<()> {
    // A value of at most `max` bytes has at most `max` characters: count only longer ones.
    if value.len() > limit.max {
        let n = value.chars().count();
        if n > limit.max {
            return Err(Error::InvalidArgument(format!(
                "{field} has {n} characters, above the limit of {} (limits.{})",
                limit.max, limit.key
            )));
        }
    }
    Ok(())
}

fn controls(field: &impl Display, value: &str, text: bool) -> Result<()> {
    let bad = |c: char| c.is_control() && !(text && matches!(c, '\t' | '\n' | '\r'));
    match value.chars().enumerate().find(|(_, c)| bad(*c)) {
        Some((at, c)) => Err(Error::InvalidArgument(format!(
            "{field} contains the control character U+{:04X} at character {}",
            u32::from(c),
            at + 1
        ))),
        None => Ok(()),
    }
}

/// Cuts every field of an audit record to what a record may hold, so that no record, whoever wrote it, can
/// outgrow an upward batch ([`MAX_RECORD_BYTES`]). Input limits keep real records well inside these bounds.
pub fn bound_record(r: &mut AuditRecord) {
    clamp_in_place(&mut r.purpose, RECORD_TEXT_CHARS);
    clamp_in_place(&mut r.detail, RECORD_TEXT_CHARS);
    for s in [
        &mut r.node_code,
        &mut r.actor,
        &mut r.consumer_uscc,
        &mut r.provider_uscc,
        &mut r.resource_id,
        &mut r.grant_id,
        &mut r.request_id,
        &mut r.outcome,
        &mut r.consumer_node,
        &mut r.mode,
    ] {
        clamp_in_place(s, RECORD_FIELD_CHARS);
    }
    r.route.truncate(RECORD_ROUTE);
    for hop in &mut r.route {
        clamp_in_place(hop, RECORD_ROUTE_CHARS);
    }
    r.response_digest.truncate(64);
    r.prev_hash.truncate(64);
    r.hash.truncate(64);
    r.signature.truncate(128);
    // A node's own endorsement is small; one larger than a statement may be would be refused above anyway.
    if r.key_endorsement.as_ref().is_some_and(|e| {
        e.body.len() > crate::statement::MAX_BODY
            || e.certificate.len() > crate::statement::MAX_CERTIFICATE
            || e.signature.len() > 512
            || e.kind.len() > 64
            || e.scheme.len() > 64
    }) {
        r.key_endorsement = None;
    }
}

#[cfg(test)]
mod tests;

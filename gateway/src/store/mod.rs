//! Durable state of a node behind one trait: the subtree catalog, the upward outboxes and children's cursors.
//!
//! SQL lives only in the implementations ([`sqlite`] and [`postgres`]); everything else talks to `Arc<dyn Store>`.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use fedgate_proto::v1::{AuditRecord, CatalogChange, CatalogEntry, ShareType, Stream};
use prost::Message;

use crate::catalog::Term;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Why storage failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A file or directory of the store could not be created or read.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A stored blob could not be decoded.
    #[error("stored record {what} is corrupt: {error}")]
    Corrupt {
        /// Which record.
        what: String,
        /// Decoder message.
        error: String,
    },
    /// The database does not hold the tables this build expects.
    #[error("database schema: {0}")]
    Schema(String),
    /// A child's stream skipped sequence numbers.
    #[error("stream of node {child} has a gap: expected sequence {expected}, got {got}")]
    Gap {
        /// The child's code.
        child: String,
        /// The next sequence number the store could apply.
        expected: u64,
        /// What arrived instead.
        got: u64,
    },
    /// A record of a chain was to be stored under a sequence number the chain already holds: another writer of
    /// the same node extended the chain, a commit reported failed had committed, or a recovery re-chained it. The
    /// writer re-reads the head and chains its records after it.
    #[error(
        "the chain of node {node} already holds a record at or after #{seq}: it moved on under its writer"
    )]
    HeadConflict {
        /// The chain.
        node: String,
        /// The sequence number taken.
        seq: u64,
    },
}

/// Filters of a catalog search; every set filter must match (as [`crate::catalog::matches`] decides).
#[derive(Debug, Clone, Default)]
pub struct CatalogQuery {
    /// Terms of the text that must all occur in title or summary.
    pub terms: Vec<Term>,
    /// Provider agency code.
    pub provider_uscc: Option<String>,
    /// Classification path prefix.
    pub classification: Vec<String>,
    /// Share type.
    pub share_type: Option<ShareType>,
    /// Prefix of node codes: "35" for a province, "3501" for a city, a full code for a county.
    pub node_prefix: Option<String>,
    /// Only entries at positions above this one (pagination).
    pub after: Option<u64>,
    /// Maximum entries.
    pub limit: u32,
    /// Stop reading after the entry that brings the encoded entries read above this many bytes, so that a page
    /// holds at most one entry more than its budget in memory; unbounded when absent.
    pub max_bytes: Option<usize>,
}

/// One entry a search found, with its position in this node's catalog (the order of search results and the
/// key pages continue from).
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogHit {
    /// Position of the entry in this node's catalog: fixed when the entry first reached it.
    pub position: u64,
    /// The entry.
    pub entry: CatalogEntry,
}

/// Where a node's catalog changes go besides its own catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// The node has a parent: every change is appended to the catalog outbox that the uplink ships.
    Parent,
    /// The node has no parent (the province): changes are applied and never queued.
    Root,
}

impl Upstream {
    /// Where a node's changes go, by whether it has a parent.
    pub fn of(has_parent: bool) -> Self {
        if has_parent { Self::Parent } else { Self::Root }
    }
}

/// A catalog row as stored, including withdrawn entries (kept so versions only grow).
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// The entry at its latest version.
    pub entry: CatalogEntry,
    /// Whether the latest change withdrew it.
    pub withdrawn: bool,
}

/// One item of an upward stream as stored in an outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Sequence number in this node's stream.
    pub seq: u64,
    /// The encoded item body (for the catalog stream, an encoded `CatalogChange`).
    pub payload: Vec<u8>,
}

/// Chains records after a chain head: given the head (`None` for an empty chain), returns the records to append.
pub type ChainAt<'a> = dyn Fn(Option<&AuditRecord>) -> Vec<AuditRecord> + Send + Sync + 'a;

/// Filters of an audit query; every set filter must match.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Records where this agency is the consumer or the provider.
    pub party: Option<String>,
    /// Records whose other party is this agency (with `party`).
    pub counterpart: Option<String>,
    /// Only records written by nodes whose code starts with this prefix.
    pub node_prefix: Option<String>,
    /// At or after this time (ns).
    pub from_ns: Option<i64>,
    /// Before this time (ns).
    pub to_ns: Option<i64>,
    /// About this resource.
    pub resource_id: Option<String>,
    /// With this outcome.
    pub outcome: Option<String>,
    /// Only records after this stream position (pagination).
    pub after_fwd_seq: Option<u64>,
    /// Maximum records.
    pub limit: u32,
}

/// Kinds of governance documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocKind {
    /// An `Application`.
    Application,
    /// A `SignedGrant` this node issued.
    Grant,
    /// A `RevocationNotice` this node recorded.
    Revocation,
    /// An `Objection`.
    Objection,
}

impl DocKind {
    /// Name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Application => "application",
            DocKind::Grant => "grant",
            DocKind::Revocation => "revocation",
            DocKind::Objection => "objection",
        }
    }
}

/// One governance document with the columns it is found by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Kind.
    pub kind: DocKind,
    /// Id.
    pub id: String,
    /// Provider agency concerned.
    pub provider_uscc: String,
    /// Consumer agency concerned.
    pub consumer_uscc: String,
    /// Kind-specific state number.
    pub state: i32,
    /// Deadline (seconds since the epoch), 0 if none.
    pub due_at: i64,
    /// Encoded message.
    pub body: Vec<u8>,
}

/// Filters of a document listing.
#[derive(Debug, Clone, Default)]
pub struct DocQuery {
    /// Provider agency.
    pub provider_uscc: Option<String>,
    /// Consumer agency.
    pub consumer_uscc: Option<String>,
    /// State.
    pub state: Option<i32>,
    /// Only documents due before this instant (seconds).
    pub due_before: Option<i64>,
}

/// A node's durable state.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Returns the catalog row with this id, withdrawn or not.
    async fn entry(&self, id: &str) -> Result<Option<StoredEntry>, StoreError>;
    /// Searches live entries, in the order of their catalog positions.
    async fn search(&self, query: &CatalogQuery) -> Result<Vec<CatalogHit>, StoreError>;
    /// The catalog rows with these ids that exist, withdrawn or not, in no particular order.
    async fn entries(&self, ids: &[String]) -> Result<Vec<StoredEntry>, StoreError>;
    /// Counts live entries.
    async fn count_entries(&self) -> Result<u64, StoreError>;
    /// Stores a local entry under the next version and, under a parent, appends the change to the catalog
    /// outbox, atomically.
    async fn publish_local(
        &self,
        entry: CatalogEntry,
        upstream: Upstream,
    ) -> Result<CatalogEntry, StoreError> {
        let mut stored = self.publish_local_batch(vec![entry], upstream).await?;
        stored.pop().ok_or_else(|| StoreError::Corrupt {
            what: "publication".into(),
            error: "a batch of one stored nothing".into(),
        })
    }
    /// Stores local entries, each under its next version, and under a parent appends their changes to the
    /// catalog outbox, in order, in one transaction. Returns the stored entries in the same order.
    async fn publish_local_batch(
        &self,
        entries: Vec<CatalogEntry>,
        upstream: Upstream,
    ) -> Result<Vec<CatalogEntry>, StoreError>;
    /// Withdraws a local entry under the next version and, under a parent, appends the change, atomically;
    /// `None` if unknown.
    async fn withdraw_local(&self, id: &str, upstream: Upstream)
    -> Result<Option<u64>, StoreError>;
    /// Applies a child's catalog items above its cursor in order, under a parent re-appending each to this
    /// node's outbox, and advances the cursor, atomically. Returns the new cursor.
    async fn apply_child_catalog(
        &self,
        child: &str,
        items: &[(u64, CatalogChange)],
        upstream: Upstream,
    ) -> Result<u64, StoreError>;
    /// Deletes every item of a stream's outbox (a node without a parent keeps none); returns how many.
    async fn clear_outbox(&self, stream: Stream) -> Result<u64, StoreError>;
    /// Last sequence number applied of a child's stream.
    async fn cursor(&self, child: &str, stream: Stream) -> Result<u64, StoreError>;
    /// Outbox items of a stream after a sequence number, oldest first.
    async fn outbox_after(
        &self,
        stream: Stream,
        after: u64,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError>;
    /// Highest sequence number in a stream's outbox; 0 when empty.
    async fn outbox_head(&self, stream: Stream) -> Result<u64, StoreError>;

    /// Next value of a named counter (1 for the first call).
    async fn next_id(&self, name: &str) -> Result<u64, StoreError>;
    /// Inserts or replaces a governance document.
    async fn put_doc(&self, doc: &Doc) -> Result<(), StoreError>;
    /// One governance document.
    async fn doc(&self, kind: DocKind, id: &str) -> Result<Option<Doc>, StoreError>;
    /// Governance documents of a kind matching the filters, by id.
    async fn docs(&self, kind: DocKind, query: &DocQuery) -> Result<Vec<Doc>, StoreError>;

    /// Records that the parent acknowledged `stream` up to `seq`.
    async fn set_uplink_acked(&self, stream: Stream, seq: u64) -> Result<(), StoreError>;
    /// How far the parent acknowledged `stream`, as last recorded.
    async fn uplink_acked(&self, stream: Stream) -> Result<u64, StoreError>;

    /// Appends records this node wrote (already chained), atomically, in order; [`StoreError::HeadConflict`] when
    /// the chain already holds one of their sequence numbers.
    async fn audit_append(&self, records: &[AuditRecord]) -> Result<(), StoreError>;
    /// Appends records to `node`'s chain after its head read under the chain's write lock: `chain` is given the
    /// head and returns the records, so no other writer can come between. Returns what was appended.
    async fn audit_append_at_head(
        &self,
        node: &str,
        chain: &ChainAt<'_>,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// Stores the signature of a record already appended (the chain head the writer signs late); the record must
    /// differ from the stored one only in its signature, which no hash covers. [`StoreError::HeadConflict`] when
    /// the store holds another record (another hash) under its sequence number.
    async fn audit_seal(&self, record: &AuditRecord) -> Result<(), StoreError>;
    /// The last record of `node`'s chain held here.
    async fn audit_head(&self, node: &str) -> Result<Option<AuditRecord>, StoreError>;
    /// Applies a child's audit items above its cursor in order and advances the cursor, atomically; each record
    /// must already have been checked by the caller. An item without a record is one this node already holds (a
    /// child that recovered sends again what it had sent before): it only advances the cursor. Returns the new
    /// cursor.
    async fn apply_child_audit(
        &self,
        child: &str,
        items: &[(u64, Option<AuditRecord>)],
    ) -> Result<u64, StoreError>;
    /// Records matching a query with their stream positions, oldest first.
    async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<(u64, AuditRecord)>, StoreError>;
    /// Records of `node`'s chain with sequence numbers above `after`, in chain order.
    async fn audit_chain(
        &self,
        node: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError>;
    /// Codes of the nodes whose records are held here.
    async fn audit_nodes(&self) -> Result<Vec<String>, StoreError>;
    /// The oldest records of each chain, up to the first written at or after `before_ns`, at stream positions up
    /// to `max_fwd_seq`, oldest first: always a run from the start of what the store holds of each chain, and
    /// never a chain's last record, so every chain keeps its head.
    async fn audit_archivable(
        &self,
        before_ns: i64,
        max_fwd_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError>;
    /// Deletes a chain's records up to `seq`, never its last record (they are in an archive already).
    async fn audit_delete_chain_upto(&self, node: &str, seq: u64) -> Result<u64, StoreError>;
    /// Deletes the records at these stream positions (after they were archived).
    async fn audit_delete(&self, fwd_seqs: &[u64]) -> Result<u64, StoreError>;
    /// Number of audit records held here.
    async fn audit_count(&self) -> Result<u64, StoreError>;
    /// The pinned public key of a node.
    async fn node_key(&self, node: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Pins a node's public key if none is pinned yet; returns the pinned key (the old one if it differs).
    async fn pin_node_key(&self, node: &str, key: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Pins a node's new public key after its chain rotated to it.
    async fn replace_node_key(&self, node: &str, key: &[u8]) -> Result<(), StoreError>;

    /// Notes that answers of `resource_id` were served to `node`, which may cache them until `until_unix`.
    async fn note_served(
        &self,
        resource_id: &str,
        node: &str,
        until_unix: i64,
    ) -> Result<(), StoreError>;
    /// Nodes that may still cache answers of `resource_id` at `now_unix`.
    async fn served_nodes(
        &self,
        resource_id: &str,
        now_unix: i64,
    ) -> Result<Vec<String>, StoreError>;

    /// The catalog rows of `node`'s own entries with ids after `after_id`, by id; withdrawn ones too, each at the
    /// version of its withdrawal.
    async fn own_entries(
        &self,
        node: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredEntry>, StoreError>;

    /// Closes the store's connections once their work is done; the store is not used afterwards.
    async fn close(&self) {}
}

/// Decodes a stored catalog entry.
fn decode_entry(id: &str, blob: &[u8]) -> Result<CatalogEntry, StoreError> {
    CatalogEntry::decode(blob).map_err(|e| StoreError::Corrupt {
        what: format!("catalog entry {id}"),
        error: e.to_string(),
    })
}

/// A search page being collected from the candidates an index returns in position order: each candidate is
/// checked against the query exactly, and the page ends at its limit or byte budget.
struct Page<'q> {
    query: &'q CatalogQuery,
    hits: Vec<CatalogHit>,
    bytes: usize,
    /// Position of the last candidate seen: where the next read of candidates continues.
    after: Option<u64>,
    done: bool,
}

/// Most candidates read at once.
const CANDIDATES_PER_READ: u32 = 1024;

impl<'q> Page<'q> {
    fn new(query: &'q CatalogQuery) -> Self {
        Self {
            query,
            hits: Vec::new(),
            bytes: 0,
            after: query.after,
            done: query.limit == 0,
        }
    }

    /// How many candidates the next read asks for; 0 once the page is complete.
    fn wanted(&self) -> u32 {
        if self.done {
            return 0;
        }
        let left = self.query.limit.saturating_sub(self.hits.len() as u32);
        left.clamp(1, CANDIDATES_PER_READ)
    }

    /// Offers the candidate at `position`; false once the page is complete.
    fn offer(&mut self, position: u64, id: &str, blob: &[u8]) -> Result<bool, StoreError> {
        self.after = Some(position);
        let entry = decode_entry(id, blob)?;
        if crate::catalog::matches(self.query, &entry) {
            self.bytes = self.bytes.saturating_add(blob.len());
            self.hits.push(CatalogHit { position, entry });
            if self.hits.len() >= self.query.limit as usize
                || self.query.max_bytes.is_some_and(|max| self.bytes > max)
            {
                self.done = true;
            }
        }
        Ok(!self.done)
    }

    /// A read of `asked` candidates returned `got`: fewer means the candidates are exhausted.
    fn read(&mut self, asked: u32, got: usize) {
        if got < asked as usize {
            self.done = true;
        }
    }
}

/// Decodes a stored audit record.
fn decode_audit(blob: &[u8]) -> Result<AuditRecord, StoreError> {
    AuditRecord::decode(blob).map_err(|e| StoreError::Corrupt {
        what: "audit record".into(),
        error: e.to_string(),
    })
}

/// The error for a seal of a record the store does not hold.
fn unsealed(record: &AuditRecord) -> StoreError {
    StoreError::Corrupt {
        what: format!("audit record {}#{}", record.node_code, record.seq),
        error: "the record to sign is not stored".into(),
    }
}

/// A failed insert of a node's own records as what it means: a unique violation is a sequence number its chain
/// already holds (positions are assigned by the store and never collide).
fn chain_conflict(e: StoreError, first: &AuditRecord) -> StoreError {
    match e {
        StoreError::Database(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            StoreError::HeadConflict {
                node: first.node_code.clone(),
                seq: first.seq,
            }
        }
        other => other,
    }
}

/// A sequence number as the signed integer both databases store (saturating).
fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored integer as a sequence number (negative values, which are never written, read as 0).
fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The items of a pushed batch above the cursor, which must follow it without a gap; and the new cursor.
fn fresh_items<'a, T>(
    child: &str,
    mut applied: u64,
    items: &'a [(u64, T)],
) -> Result<(Vec<&'a T>, u64), StoreError> {
    let mut fresh = Vec::with_capacity(items.len());
    for (seq, item) in items {
        if *seq <= applied {
            continue;
        }
        if *seq != applied.saturating_add(1) {
            return Err(StoreError::Gap {
                child: child.to_owned(),
                expected: applied.saturating_add(1),
                got: *seq,
            });
        }
        fresh.push(item);
        applied = *seq;
    }
    Ok((fresh, applied))
}

/// The bounds of a query for `node`'s own entries after `after_id`: ids are `<node>:<local code>`, so they sort
/// above `"<node>:"` (which is no id) and below `"<node>;"` (`;` follows `:`). Returns (ids above, ids below).
pub(crate) fn own_id_range(node: &str, after_id: &str) -> (String, String) {
    let start = format!("{node}:");
    let above = if after_id > start.as_str() {
        after_id.to_owned()
    } else {
        start
    };
    (above, format!("{node};"))
}

/// One step of applying catalog changes in their order: a run of upserts of distinct ids (one multi-row
/// statement), or one withdrawal.
pub(crate) enum ApplyStep<'a> {
    /// Upserts, no id twice.
    Upserts(Vec<&'a CatalogEntry>),
    /// A withdrawal of an id at a version.
    Withdraw(&'a str, u64),
}

/// Splits catalog changes into [`ApplyStep`]s, keeping their order: a run of upserts ends where an id repeats or
/// a withdrawal comes.
pub(crate) fn apply_steps<'a>(changes: &[&'a CatalogChange]) -> Vec<ApplyStep<'a>> {
    use fedgate_proto::v1::catalog_change::Change;
    let mut steps = Vec::new();
    let mut run: Vec<&CatalogEntry> = Vec::new();
    let mut ids: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for change in changes {
        match &change.change {
            Some(Change::Upsert(e)) => {
                if !ids.insert(e.id.as_str()) {
                    steps.push(ApplyStep::Upserts(std::mem::take(&mut run)));
                    ids.clear();
                    ids.insert(e.id.as_str());
                }
                run.push(e);
            }
            Some(Change::Withdraw(w)) => {
                if !run.is_empty() {
                    steps.push(ApplyStep::Upserts(std::mem::take(&mut run)));
                }
                ids.clear();
                steps.push(ApplyStep::Withdraw(&w.id, w.version));
            }
            None => {}
        }
    }
    if !run.is_empty() {
        steps.push(ApplyStep::Upserts(run));
    }
    steps
}

#[cfg(test)]
mod tests {
    use fedgate_proto::v1::{Withdrawal, catalog_change::Change};

    use super::*;

    fn upsert(id: &str) -> CatalogChange {
        CatalogChange {
            change: Some(Change::Upsert(CatalogEntry {
                id: id.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn runs_of_upserts_end_where_an_id_repeats_or_a_withdrawal_comes() {
        let withdraw = CatalogChange {
            change: Some(Change::Withdraw(Withdrawal {
                id: "b".into(),
                version: 3,
            })),
        };
        let changes = [upsert("a"), upsert("b"), upsert("a"), withdraw, upsert("c")];
        let refs: Vec<&CatalogChange> = changes.iter().collect();
        let shape: Vec<String> = apply_steps(&refs)
            .into_iter()
            .map(|s| match s {
                ApplyStep::Upserts(run) => run.iter().map(|e| e.id.as_str()).collect::<String>(),
                ApplyStep::Withdraw(id, v) => format!("-{id}@{v}"),
            })
            .collect();
        assert_eq!(shape, ["ab", "a", "-b@3", "c"]);
    }
}

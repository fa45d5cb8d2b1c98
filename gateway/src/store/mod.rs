//! Durable state of a node behind one trait: the subtree catalog, the upward outboxes and children's cursors.
//!
//! SQL lives only in the implementations ([`sqlite`] and [`postgres`]); everything else talks to `Arc<dyn Store>`.

pub mod postgres;
pub mod retry;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use fedgate_proto::v1::OperationRecord;
use fedgate_proto::v1::{AuditRecord, CatalogChange, CatalogEntry, ShareType, Stream};
use prost::Message;

use crate::catalog::Term;

pub use postgres::PgStore;
pub use retry::Retrying;
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
    /// The database stayed locked by other work (another transaction, another process) for longer than this
    /// node waits, retries included; nothing was changed and the call may be retried.
    #[error("the database of node {node} stayed locked for {waited_ms} ms: {cause}")]
    Busy {
        /// The node whose database it is.
        node: String,
        /// How long the operation waited and retried.
        waited_ms: u64,
        /// What the database answered last.
        cause: String,
    },
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
    /// A subscription's outbox was not where its producer expected it: another writer appended meanwhile.
    #[error("the outbox of subscription {id} is at #{head}: it moved on under another writer")]
    FlowMoved {
        /// The subscription.
        id: String,
        /// Its outbox's head.
        head: u64,
    },
    /// A recovery found this node's history inconsistent with what its parent holds in a way it cannot repair.
    #[error("cannot recover: {0}")]
    Unrecoverable(String),
}

impl StoreError {
    /// Whether the operation failed only because other work held the database's locks: SQLite's "database is
    /// locked" or "database table is locked" (SQLITE_BUSY, SQLITE_LOCKED and their extended codes), PostgreSQL's
    /// lock timeout (55P03), serialization failure (40001) or deadlock (40P01), no free connection within the
    /// pool's wait, or [`StoreError::Busy`]. Such an operation changed nothing and may be run again.
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Busy { .. } => true,
            StoreError::Database(e) => contended(e),
            _ => false,
        }
    }
}

/// Whether `e` is lock contention (see [`StoreError::is_busy`]).
fn contended(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => {
            if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                // The primary result code is the low byte of the extended one.
                let primary = db
                    .code()
                    .and_then(|c| c.parse::<i64>().ok())
                    .map(|c| c & 0xff);
                return matches!(primary, Some(SQLITE_BUSY | SQLITE_LOCKED));
            }
            if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                return matches!(pg.code(), "55P03" | "40001" | "40P01");
            }
            false
        }
        _ => false,
    }
}

/// SQLite's primary result code for a lock held by another connection.
const SQLITE_BUSY: i64 = 5;
/// SQLite's primary result code for a table locked within the same connection's shared cache.
const SQLITE_LOCKED: i64 = 6;

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

/// Where an upward stream stood when the first run that has not compared its history with the parent's started
/// (see [`Store::mark_unconfirmed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkMark {
    /// The stream's end then: the higher of its head and the parent's acknowledgement. Positions above it were
    /// written by runs that have not compared what they wrote with what the parent holds.
    pub head: u64,
    /// For the audit stream, the head of the node's own chain then (0 for the catalog stream).
    pub own_seq: u64,
}

/// What a node does with what its parent holds of its own audit chain and stream, as it recovers at Join (see
/// [`Store::recover_audit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecovery {
    /// This node.
    pub node: String,
    /// The parent's cursor of this node's audit stream.
    pub cursor: u64,
    /// [`UplinkMark::head`] of the audit stream.
    pub mark: u64,
    /// The last sequence number of this node's chain on which this node and its parent agree; the records taken
    /// back (staged) follow it, and this node's own records after it are re-chained after them.
    pub common: u64,
}

/// What a node does with what its parent holds of its own catalog entries and stream (see
/// [`Store::recover_catalog`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRecovery {
    /// This node.
    pub node: String,
    /// The parent's cursor of this node's catalog stream.
    pub cursor: u64,
    /// [`UplinkMark::head`] of the catalog stream.
    pub mark: u64,
}

/// What a recovery changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records or entries taken back from the parent.
    pub taken_back: u64,
    /// Own records re-chained after the ones taken back (audit), or local changes published again above the
    /// parent's version (catalog).
    pub redone: u64,
    /// Stream items moved to positions after the parent's cursor.
    pub moved: u64,
}

/// What is staged of what the parent holds of this node's own, waiting for a recovery to apply it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Staged {
    /// Records (audit) or entries (catalog) staged.
    pub count: u64,
    /// The last staged audit record, in chain order.
    pub last_record: Option<AuditRecord>,
    /// The last staged catalog entry id, in id order.
    pub last_id: Option<String>,
}

/// Chains records after a chain head: given the head (`None` for an empty chain), returns the records to append.
pub type ChainAt<'a> = dyn Fn(Option<&AuditRecord>) -> Vec<AuditRecord> + Send + Sync + 'a;

/// Re-chains a run of a node's own records after `(seq, hash)`; `last` when the run ends the chain (its last
/// record must then be signed). Returns the records in the same order with new sequence numbers, links, hashes
/// and signatures.
pub type Rechain<'a> =
    dyn Fn(&[AuditRecord], (u64, &[u8]), bool) -> Vec<AuditRecord> + Send + Sync + 'a;

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

/// Filters of a query of operational records; every set filter must match.
#[derive(Debug, Clone, Default)]
pub struct OperationQuery {
    /// Calls that came in at or after this time (ns).
    pub from_ns: Option<i64>,
    /// Calls that came in before this time (ns).
    pub to_ns: Option<i64>,
    /// This method ("Agency.Share").
    pub method: Option<String>,
    /// About this resource.
    pub resource_id: Option<String>,
    /// Of consumers at this node.
    pub consumer_node: Option<String>,
    /// Of this consumer agency.
    pub consumer_uscc: Option<String>,
    /// With this gRPC code.
    pub code: Option<i32>,
    /// Only records after this position (pagination).
    pub after: Option<u64>,
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
    /// A `Demand` (held at the province).
    Demand,
    /// A flow-back subscription held at the resource's node (`flowback::Held`).
    Subscription,
    /// A flow-back subscription as its subscriber's node holds it (`flowback::Held`).
    Received,
    /// The applicant's node's copy of an application one of its agencies filed (`own_view`).
    HeldApplication,
    /// A grant one of this node's agencies holds, as its node keeps it (`own_view`).
    HeldGrant,
    /// A notice to one of this node's agencies, by sequence number (`own_view`).
    Notice,
    /// At the resource's node: the agency's request to end a subscription, by the subscription's id (`flowback`).
    Unsubscribe,
    /// A real-name console account, by login (`console`).
    ConsoleUser,
    /// A console session, by the SHA-256 of its cookie (`console`).
    ConsoleSession,
}

impl DocKind {
    /// Name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Application => "application",
            DocKind::Grant => "grant",
            DocKind::Revocation => "revocation",
            DocKind::Objection => "objection",
            DocKind::Demand => "demand",
            DocKind::Subscription => "subscription",
            DocKind::Received => "received",
            DocKind::HeldApplication => "held_application",
            DocKind::HeldGrant => "held_grant",
            DocKind::Notice => "notice",
            DocKind::Unsubscribe => "unsubscribe",
            DocKind::ConsoleUser => "console_user",
            DocKind::ConsoleSession => "console_session",
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
    /// Only documents whose id sorts after this one (pagination: the last id of the previous page).
    pub after_id: Option<String>,
    /// Maximum documents; all when absent.
    pub limit: Option<u32>,
}

/// Which end of a flow-back subscription a node keeps items of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSide {
    /// At the resource's node: the items produced, waiting to be shipped.
    Outbox,
    /// At the subscriber's node: the items received.
    Inbox,
}

impl FlowSide {
    /// Number stored in the database.
    pub fn as_i64(self) -> i64 {
        match self {
            FlowSide::Outbox => 1,
            FlowSide::Inbox => 2,
        }
    }
}

/// One change of a diffed subscription's snapshot: a key's record digest, or `None` when the key went.
pub type SnapshotChange = (String, Option<Vec<u8>>);

/// A change another process sharing the store committed, which this process may hold a copy of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// A grant was revoked.
    Revoked(String),
    /// A local catalog entry was published or withdrawn.
    Entry(String),
    /// Changes may have been missed (the feed reconnected): every copy should be read again.
    Missed,
}

/// Changes committed by every process sharing a store, in commit order.
#[async_trait]
pub trait ChangeFeed: Send {
    /// The next change; waits for one.
    async fn next(&mut self) -> Result<StoreChange, StoreError>;
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
    /// Governance documents of a kind matching the filters, by id (bytewise order), a page at a time when the
    /// query sets `limit`.
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
    /// the store holds another record (another hash) under its sequence number, or a record after it (another
    /// replica's writer chained on: the unsigned record may already have been forwarded as it is).
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

    /// Takes the lease `name` for `holder` for `ttl`, or renews it if `holder` has it; whether `holder` holds it
    /// now (a lease another holder renewed less than its `ttl` ago is left to it).
    async fn take_lease(&self, name: &str, holder: &str, ttl: Duration)
    -> Result<bool, StoreError>;
    /// Who holds the lease `name`, unless it ran out.
    async fn lease_holder(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Gives up the lease `name` if `holder` has it, so another can take it at once.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// A feed of the changes every process sharing this store commits; `None` for a store only one process opens
    /// (SQLite), whose changes this process makes itself.
    async fn change_feed(&self) -> Result<Option<Box<dyn ChangeFeed>>, StoreError>;

    // Recovery of what a node lost after it had forwarded it (see `crate::uplink`).

    /// For each upward stream without such a note, notes where it stands now (the higher of its head and the
    /// parent's acknowledgement) and, for the audit stream, the head of `node`'s own chain: what is written from
    /// here on has not been compared with what the parent holds, until [`Store::confirm_uplink`] or a recovery
    /// removes the note. A node with a parent calls it when it starts, before it writes anything.
    async fn mark_unconfirmed(&self, node: &str) -> Result<(), StoreError>;
    /// The note [`Store::mark_unconfirmed`] left for `stream`, while it is there.
    async fn uplink_mark(&self, stream: Stream) -> Result<Option<UplinkMark>, StoreError>;
    /// Removes the note of `stream`: its parent holds nothing this node lost.
    async fn confirm_uplink(&self, stream: Stream) -> Result<(), StoreError>;
    /// Stages records of this node's own chain taken back from its parent (checked by the caller, in chain order,
    /// continuing what is staged), for [`Store::recover_audit`].
    async fn stage_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError>;
    /// Stages this node's own catalog entries as its parent holds them (in id order, after what is staged), for
    /// [`Store::recover_catalog`].
    async fn stage_catalog(&self, entries: &[StoredEntry]) -> Result<(), StoreError>;
    /// What is staged for `stream`.
    async fn staged(&self, stream: Stream) -> Result<Staged, StoreError>;
    /// Drops what is staged for `stream`.
    async fn clear_staged(&self, stream: Stream) -> Result<(), StoreError>;
    /// Recovers the audit stream in one transaction: moves the items written since the mark to consecutive
    /// positions after the parent's cursor (and after the staged records), re-chains this node's own records after
    /// `plan.common` with `rechain` to follow the staged ones, stores the staged records at the positions the
    /// parent already counts as applied, continues the stream after the parent's cursor, and removes the mark.
    async fn recover_audit(
        &self,
        plan: &AuditRecovery,
        rechain: &Rechain<'_>,
    ) -> Result<Recovered, StoreError>;
    /// Recovers the catalog stream in one transaction: takes back each staged entry that is newer than this
    /// node's copy and was not changed here since the mark (its change stored at the positions after the mark,
    /// which the parent already counts as applied), moves the items written since the mark to consecutive
    /// positions after the parent's cursor (and after those), publishes again above the parent's version each
    /// entry changed here since the mark that the parent's version would hide, continues the stream after the
    /// parent's cursor, and removes the mark.
    async fn recover_catalog(&self, plan: &CatalogRecovery) -> Result<Recovered, StoreError>;
    /// Moves the items of `stream` after position `after` to consecutive positions from `after + 1` and makes
    /// `after` the acknowledged position, for a parent that lost what it had acknowledged (its cursor is `after`)
    /// when positions between are missing here; returns how many items moved.
    async fn close_up(&self, stream: Stream, after: u64) -> Result<u64, StoreError>;
    /// Items of `stream` at positions above `after`.
    async fn count_after(&self, stream: Stream, after: u64) -> Result<u64, StoreError>;
    /// The catalog rows of `node`'s own entries with ids after `after_id`, by id; withdrawn ones too, each at the
    /// version of its withdrawal.
    async fn own_entries(
        &self,
        node: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredEntry>, StoreError>;

    /// In one transaction: stores `doc` (a subscription's state at the resource's node, such as the provider
    /// position its items reach), appends `items` to its outbox at the positions after `head`, and applies
    /// `snapshot` to its snapshot of digests; returns the outbox's new head. [`StoreError::FlowMoved`], with
    /// nothing changed, when the outbox's head is not `head`.
    async fn flow_append(
        &self,
        doc: &Doc,
        head: u64,
        items: &[Vec<u8>],
        snapshot: &[SnapshotChange],
    ) -> Result<u64, StoreError>;
    /// Items of subscription `id` kept on `side` at positions above `after`, at most `limit`, in order.
    async fn flow_items(
        &self,
        side: FlowSide,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Highest position of subscription `id` kept on `side` (0 when none).
    async fn flow_head(&self, side: FlowSide, id: &str) -> Result<u64, StoreError>;
    /// At the subscriber's node: stores the consecutive items of subscription `id` that follow its inbox's head
    /// (skipping those at or below it, stopping at a gap), and `doc` with them in one transaction when given;
    /// returns the inbox's head afterwards.
    async fn flow_receive(
        &self,
        id: &str,
        items: &[(u64, Vec<u8>)],
        doc: Option<&Doc>,
    ) -> Result<u64, StoreError>;
    /// The snapshot of digests of subscription `id`, keys after `after_key`, at most `limit`, by key.
    async fn flow_snapshot(
        &self,
        id: &str,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Stores operational records (what the node saw of calls it handled), in one transaction.
    async fn ops_append(&self, records: &[OperationRecord]) -> Result<(), StoreError>;
    /// Operational records matching `query`, by position, each with its position (the paging cursor).
    async fn ops_query(
        &self,
        query: &OperationQuery,
    ) -> Result<Vec<(u64, OperationRecord)>, StoreError>;
    /// Deletes operational records of calls that came in before `before_ns`; returns how many.
    async fn ops_purge(&self, before_ns: i64) -> Result<u64, StoreError>;
    /// Deletes the oldest operational records beyond the newest `keep`; returns how many.
    async fn ops_trim(&self, keep: u64) -> Result<u64, StoreError>;

    /// Closes the store's connections once their work is done; the store is not used afterwards.
    async fn close(&self) {}

    /// Checks, cheaply and once (no retry), that the storage still answers as configured: a fresh connection to
    /// the SQLite file, a round trip to the PostgreSQL server. Health and readiness probes call it.
    async fn ping(&self) -> Result<(), StoreError>;
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

/// Decodes a stored operational record.
fn decode_operation(blob: &[u8]) -> Result<OperationRecord, StoreError> {
    OperationRecord::decode(blob).map_err(|e| StoreError::Corrupt {
        what: "operational record".into(),
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

/// What a recovery does with one of this node's own entries that its parent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryFix {
    /// Nothing: this node's copy is as new as the parent's, or newer.
    Keep,
    /// Store the parent's copy here (it holds a change this node lost), without queuing it again.
    TakeBack,
    /// Publish this node's copy again under this version (above the parent's), since it was changed here after
    /// the loss and the parent's version would hide it.
    Republish(u64),
}

/// Decides what a recovery does with an entry the parent holds (`parent`) given this node's copy (`local`) and
/// whether this node changed it since the mark.
pub(crate) fn entry_fix(
    parent: &StoredEntry,
    local: Option<&StoredEntry>,
    changed_here: bool,
) -> EntryFix {
    let vp = parent.entry.version;
    let Some(local) = local else {
        return EntryFix::TakeBack;
    };
    let vl = local.entry.version;
    let same = vp == vl && parent.withdrawn == local.withdrawn && parent.entry == local.entry;
    if same || vp < vl {
        return EntryFix::Keep;
    }
    // The parent's copy is newer, or as new with other content (both came from this node's history, the
    // parent's from the part this node lost).
    if changed_here {
        EntryFix::Republish(vp.saturating_add(1))
    } else {
        EntryFix::TakeBack
    }
}

/// The change that publishes `entry` (withdrawn or not) as it is.
pub(crate) fn change_of(entry: &StoredEntry) -> CatalogChange {
    use fedgate_proto::v1::{Withdrawal, catalog_change::Change};
    CatalogChange {
        change: Some(if entry.withdrawn {
            Change::Withdraw(Withdrawal {
                id: entry.entry.id.clone(),
                version: entry.entry.version,
            })
        } else {
            Change::Upsert(entry.entry.clone())
        }),
    }
}

/// The ids of `node`'s own entries that encoded catalog changes touch.
pub(crate) fn own_ids_changed<'a>(
    node: &str,
    payloads: impl IntoIterator<Item = &'a [u8]>,
) -> Result<std::collections::HashSet<String>, StoreError> {
    use fedgate_proto::v1::catalog_change::Change;
    let prefix = format!("{node}:");
    let mut ids = std::collections::HashSet::new();
    for p in payloads {
        let change = CatalogChange::decode(p).map_err(|e| StoreError::Corrupt {
            what: "catalog outbox item".into(),
            error: e.to_string(),
        })?;
        let id = match change.change {
            Some(Change::Upsert(e)) => e.id,
            Some(Change::Withdraw(w)) => w.id,
            None => continue,
        };
        if id.starts_with(&prefix) {
            ids.insert(id);
        }
    }
    Ok(ids)
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

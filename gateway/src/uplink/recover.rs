//! Recovery at Join of a node that lost items it had already forwarded: restored from an older backup, or its
//! last commits lost (SQLite's `synchronous=NORMAL` in a power cut). Both look the same from here: the store is
//! a consistent state from before the loss, and the parent holds more of this node than the node itself.
//!
//! When a node with a parent starts, its store notes where each upward stream stands ([`Store::mark_unconfirmed`]);
//! what is written after that mark has not been compared with what the parent holds. At each Join the parent
//! tells its cursor of each stream and the head of this node's own audit chain as it holds it, and:
//!
//! - if the cursor is at or below the mark and the parent's copy of the chain is a prefix of this node's chain,
//!   nothing was lost: the mark goes, and the stream continues from the cursor (closing up positions that a
//!   parent which itself lost what it had acknowledged would otherwise miss);
//! - otherwise the parent holds items this node lost. The node takes back what the parent holds of its own (its
//!   own audit records after the last one both agree on; its own catalog entries), a page at a time, into a
//!   staging table, then applies it in one transaction: the items written since the mark move to positions after
//!   the parent's cursor, its own records written after the loss are re-chained after those taken back, the
//!   records taken back take positions the parent already counts as applied (so they are not shipped again),
//!   catalog entries the parent holds newer are taken back, local changes since the loss that the parent's
//!   version would hide are published again above it, and the stream continues after the cursor. Nothing is
//!   skipped and no sequence number is used twice; the parent skips records it already holds that come again.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::{AuditOperation, JoinResponse, Stream, TakeBackRequest, TakeBackResponse};
use tonic::transport::Channel;

use super::SessionError;
use crate::audit::{self, AuditLog, ChainVerifier, GENESIS_HASH, RecoverError};
use crate::catalog::parse_resource_id;
use crate::ident::DivisionCode;
use crate::metrics::NodeMetrics;
use crate::store::{
    AuditRecovery, CatalogRecovery, Recovered, Store, StoreError, StoredEntry, UplinkMark,
};
use crate::topology::Neighbour;

/// Records or entries asked for per TakeBack call.
const PAGE: u32 = 1000;
/// Longest one TakeBack call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a stream's session needs to recover: this node's audit writer (which re-chains and re-signs its own
/// records) and its counters.
#[derive(Clone)]
pub struct Recovery {
    /// This node's audit writer.
    pub audit: AuditLog,
    /// This node's counters.
    pub metrics: Arc<NodeMetrics>,
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recovery").finish_non_exhaustive()
    }
}

/// One stream's view of a Join.
struct Joined<'a> {
    stream: Stream,
    me: DivisionCode,
    parent: &'a Neighbour,
    client: &'a mut FederationClient<Channel>,
    store: &'a dyn Store,
    recovery: &'a Recovery,
    /// The parent's cursor of this stream.
    cursor: u64,
    /// The mark, or where the stream ends when there is none (nothing unconfirmed).
    mark: UplinkMark,
    /// The higher of the stream's head and the parent's last recorded acknowledgement.
    end: u64,
    /// The parent's last recorded acknowledgement.
    acked: u64,
}

/// After `join`, makes `stream` agree with what the parent holds of this node (recovering if the parent holds items
/// this node lost); returns the position the stream continues from, the parent's cursor.
pub(super) async fn reconcile(
    stream: Stream,
    me: DivisionCode,
    parent: &Neighbour,
    client: &mut FederationClient<Channel>,
    join: &JoinResponse,
    store: &dyn Store,
    recovery: &Recovery,
) -> Result<u64, SessionError> {
    let cursor = join
        .cursors
        .iter()
        .find(|c| c.stream == stream as i32)
        .map_or(0, |c| c.applied_seq);
    let acked = store.uplink_acked(stream).await?;
    let end = store.outbox_head(stream).await?.max(acked);
    let mark = store.uplink_mark(stream).await?.unwrap_or(UplinkMark {
        head: end,
        own_seq: 0,
    });
    let mut j = Joined {
        stream,
        me,
        parent,
        client,
        store,
        recovery,
        cursor,
        mark,
        end,
        acked,
    };
    match stream {
        Stream::Audit => {
            let head = join
                .own_chain_head
                .as_ref()
                .map(|h| (h.seq, h.hash.clone()));
            j.audit(head).await
        }
        _ => j.catalog().await,
    }
}

impl Joined<'_> {
    /// Reconciles the audit stream; `parent_head` is the last record of this node's chain the parent holds.
    async fn audit(&mut self, parent_head: Option<(u64, Vec<u8>)>) -> Result<u64, SessionError> {
        let me = self.me.to_string();
        let (parent_seq, parent_hash) = parent_head.unwrap_or((0, GENESIS_HASH.to_vec()));
        let local = self.store.audit_head(&me).await?.map_or(0, |h| h.seq);
        let common = self.common(parent_seq, &parent_hash, local).await?;
        let chain_lost = parent_seq > common;
        if !chain_lost && self.cursor <= self.mark.head {
            return self.nothing_lost().await;
        }
        if self.cursor <= self.mark.head {
            return Err(StoreError::Unrecoverable(format!(
                "the parent holds this node's chain up to #{parent_seq}, which this node holds only up to #{common} \
                 (of #{local}), but its cursor {} is not past what this node had written when it started ({})",
                self.cursor, self.mark.head
            ))
            .into());
        }
        tracing::warn!(stream = "audit", parent = %self.parent.code, cursor = self.cursor, mark = self.mark.head,
            parent_head = parent_seq, head = local, common,
            "the parent holds audit items this node lost (restored from a backup, or its last commits lost): \
             recovering");
        if chain_lost {
            self.take_back_records(common, parent_seq).await?;
        } else {
            self.store.clear_staged(Stream::Audit).await?;
        }
        let plan = AuditRecovery {
            node: me,
            cursor: self.cursor,
            mark: self.mark.head,
            common,
        };
        let done = self
            .recovery
            .audit
            .recover(plan)
            .await
            .map_err(|e| match e {
                RecoverError::Store(e) => SessionError::Store(e),
                RecoverError::Stopped => SessionError::Store(StoreError::Unrecoverable(
                    "the audit writer has stopped".into(),
                )),
            })?;
        let detail = format!(
            "recovered at Join with parent {}: took back records {}..={parent_seq} of this node's chain; re-chained \
             {} records written here after the loss to follow them; moved {} stream items above the parent's cursor \
             {}",
            self.parent.code,
            common + 1,
            done.redone,
            done.moved,
            self.cursor
        );
        self.report(done, detail).await;
        Ok(self.cursor)
    }

    /// Reconciles the catalog stream.
    async fn catalog(&mut self) -> Result<u64, SessionError> {
        if self.cursor <= self.mark.head {
            return self.nothing_lost().await;
        }
        tracing::warn!(stream = "catalog", parent = %self.parent.code, cursor = self.cursor, mark = self.mark.head,
            "the parent holds catalog items this node lost (restored from a backup, or its last commits lost): \
             recovering");
        self.take_back_entries().await?;
        let done = self
            .store
            .recover_catalog(&CatalogRecovery {
                node: self.me.to_string(),
                cursor: self.cursor,
                mark: self.mark.head,
            })
            .await?;
        let detail = format!(
            "recovered at Join with parent {}: took back {} of this node's catalog entries; published again above \
             the parent's version {} entries changed here after the loss; moved {} stream items above the parent's \
             cursor {}",
            self.parent.code, done.taken_back, done.redone, done.moved, self.cursor
        );
        self.report(done, detail).await;
        Ok(self.cursor)
    }

    /// The parent holds nothing this node lost: the mark goes. If the parent lost what it had acknowledged and
    /// positions after its cursor are missing here (left by an earlier recovery), the items after it close up.
    async fn nothing_lost(&mut self) -> Result<u64, SessionError> {
        let stream = self.stream;
        if self.cursor < self.acked {
            let held = self.store.count_after(stream, self.cursor).await?;
            if held < self.end - self.cursor {
                let moved = self.store.close_up(stream, self.cursor).await?;
                tracing::warn!(stream = stream.as_str_name(), parent = %self.parent.code, cursor = self.cursor,
                    acked = self.acked, moved,
                    "the parent lost items it had acknowledged; positions after its cursor closed up");
            }
        }
        self.store.confirm_uplink(stream).await?;
        Ok(self.cursor)
    }

    /// The last sequence number of this node's chain that this node and its parent both hold with the same hash
    /// (0 when none); `parent_seq` and `parent_hash` are the parent's head, `local` this node's.
    async fn common(
        &mut self,
        parent_seq: u64,
        parent_hash: &[u8],
        local: u64,
    ) -> Result<u64, SessionError> {
        if parent_seq == 0 {
            return Ok(0);
        }
        if parent_seq <= local {
            if self.local_hash(parent_seq).await?.as_deref() == Some(parent_hash) {
                return Ok(parent_seq);
            }
        } else if self.agree(local).await? {
            // The usual restore: this node's chain is a prefix of the parent's copy.
            return Ok(local);
        }
        // Records before the mark came from before the loss; those after it may fork from the parent's.
        let (mut lo, mut hi) = (0, parent_seq.min(local));
        let own = self.mark.own_seq.min(hi);
        if own > 0 && self.agree(own).await? {
            lo = own;
            if own < hi && !self.agree(own + 1).await? {
                return Ok(own);
            }
        }
        // The last agreeing record lies in [lo, hi): lo agrees, hi does not.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.agree(mid).await? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Whether this node and its parent hold record `seq` of this node's chain with the same hash (records one
    /// of them no longer holds, archived, count as agreeing: they are years old).
    async fn agree(&mut self, seq: u64) -> Result<bool, SessionError> {
        if seq == 0 {
            return Ok(true);
        }
        let page = self.take_back(Stream::Audit, seq - 1, "", 1).await?;
        let parent = page.records.into_iter().next().filter(|r| r.seq == seq);
        let local = self.local_hash(seq).await?;
        Ok(match (parent, local) {
            (Some(p), Some(l)) => p.hash == l,
            _ => true,
        })
    }

    /// The hash of record `seq` of this node's chain here.
    async fn local_hash(&self, seq: u64) -> Result<Option<Vec<u8>>, SessionError> {
        let rows = self
            .store
            .audit_chain(self.me.as_str(), seq.saturating_sub(1), 1)
            .await?;
        Ok(rows.into_iter().find(|r| r.seq == seq).map(|r| r.hash))
    }

    /// Stages the parent's records `common + 1 ..= parent_seq` of this node's chain, each checked to continue the
    /// chain with this node's key; continues what an interrupted recovery staged.
    async fn take_back_records(
        &mut self,
        common: u64,
        parent_seq: u64,
    ) -> Result<(), SessionError> {
        let me = self.me.to_string();
        let staged = self.store.staged(Stream::Audit).await?;
        let resume = staged
            .last_record
            .filter(|r| r.seq == common + staged.count && r.seq <= parent_seq);
        let (mut after, prev) = match resume {
            Some(r) => (r.seq, r.hash),
            None => {
                self.store.clear_staged(Stream::Audit).await?;
                let prev = match common {
                    0 => GENESIS_HASH.to_vec(),
                    c => self.local_hash(c).await?.ok_or_else(|| {
                        StoreError::Unrecoverable(format!(
                            "record #{c} of this node's chain is not held here"
                        ))
                    })?,
                };
                (common, prev)
            }
        };
        let key = self.store.node_key(&me).await?;
        let mut verifier = if after == 0 {
            ChainVerifier::new(&me, None)
        } else {
            ChainVerifier::resume(&me, key, after, prev)
        };
        while after < parent_seq {
            let page = self.take_back(Stream::Audit, after, "", PAGE).await?;
            let mut records = page.records;
            records.retain(|r| r.seq <= parent_seq);
            let Some(last) = records.last().map(|r| r.seq) else {
                break;
            };
            for r in &records {
                verifier.push(r).map_err(|e| {
                    StoreError::Unrecoverable(format!(
                        "the parent handed back a record that does not continue this node's chain: {e}"
                    ))
                })?;
            }
            self.store.stage_audit(&records).await?;
            after = last;
        }
        if after < parent_seq || verifier.unsigned_tail() > 0 {
            return Err(StoreError::Unrecoverable(format!(
                "the parent handed back this node's chain up to #{after} of #{parent_seq}, not ending signed"
            ))
            .into());
        }
        Ok(())
    }

    /// Stages the parent's copies of this node's own catalog entries; continues what an interrupted recovery
    /// staged.
    async fn take_back_entries(&mut self) -> Result<(), SessionError> {
        let mut after_id = self
            .store
            .staged(Stream::Catalog)
            .await?
            .last_id
            .unwrap_or_default();
        loop {
            let page = self.take_back(Stream::Catalog, 0, &after_id, PAGE).await?;
            let mut entries = Vec::with_capacity(page.entries.len());
            for held in page.entries {
                let entry = held.entry.ok_or_else(|| {
                    StoreError::Unrecoverable(
                        "the parent handed back an empty catalog entry".into(),
                    )
                })?;
                let own = parse_resource_id("entry.id", &entry.id)
                    .is_ok_and(|id| id.node() == self.me && entry.node_code == self.me.as_str());
                if !own || entry.id <= after_id {
                    return Err(StoreError::Unrecoverable(format!(
                        "the parent handed back entry {:?}, which is not this node's next own entry",
                        entry.id
                    ))
                    .into());
                }
                after_id.clone_from(&entry.id);
                entries.push(StoredEntry {
                    entry,
                    withdrawn: held.withdrawn,
                });
            }
            self.store.stage_catalog(&entries).await?;
            if !page.more || entries.is_empty() {
                return Ok(());
            }
        }
    }

    /// One TakeBack call to the parent.
    async fn take_back(
        &mut self,
        stream: Stream,
        after_seq: u64,
        after_id: &str,
        limit: u32,
    ) -> Result<TakeBackResponse, SessionError> {
        let mut req = crate::telemetry::traced(TakeBackRequest {
            stream: stream as i32,
            after_seq,
            after_id: after_id.to_owned(),
            limit,
        });
        req.set_timeout(CALL_TIMEOUT);
        Ok(self.client.take_back(req).await?.into_inner())
    }

    /// Says what a recovery did: in the log, the metrics and this node's audit chain.
    async fn report(&self, done: Recovered, detail: String) {
        let stream = self.stream.as_str_name();
        let labels = [(
            "stream",
            if self.stream == Stream::Audit {
                "audit"
            } else {
                "catalog"
            },
        )];
        let m = &self.recovery.metrics;
        m.uplink_recoveries.get_or_create(&labels).inc();
        m.uplink_taken_back
            .get_or_create(&labels)
            .inc_by(done.taken_back);
        m.uplink_redone.get_or_create(&labels).inc_by(done.redone);
        m.uplink_moved.get_or_create(&labels).inc_by(done.moved);
        tracing::warn!(stream, parent = %self.parent.code, taken_back = done.taken_back, redone = done.redone,
            moved = done.moved, continues_after = self.cursor, "{detail}");
        let mut record = audit::event(
            AuditOperation::Recovery,
            crate::ident::Peer::Node(self.parent.code).to_uri(),
        );
        record.detail = detail;
        if let Err(e) = self.recovery.audit.record(record).await {
            tracing::error!(stream, error = %e, "the recovery is not in the audit trail");
        }
    }
}

//! A store that fails on request: the real SQLite store underneath, with an audit commit or signature failing
//! once, before or after it took effect, as a database can (a lost connection, a timeout, an error reported after
//! the commit).

use std::sync::{Arc, Mutex};

use crate::store::OperationQuery;
use async_trait::async_trait;
use fedgate_proto::v1::OperationRecord;
use fedgate_proto::v1::{AuditRecord, CatalogChange, CatalogEntry, Stream};

use crate::store::{
    AuditQuery, AuditRecovery, CatalogHit, CatalogQuery, CatalogRecovery, ChainAt, Doc, DocKind,
    DocQuery, FlowSide, OutboxItem, Rechain, Recovered, SnapshotChange, Staged, Store, StoreError,
    StoredEntry, UplinkMark, Upstream,
};

/// How the next audit commit or signature fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// The commit fails and nothing is stored.
    Lost,
    /// The records are stored, and the commit is reported failed.
    CommittedButFailed,
    /// The signature of the head fails and is not stored.
    SealLost,
}

/// A store whose next audit commit or signature fails as set.
pub(super) struct Faulty {
    inner: Arc<dyn Store>,
    next: Mutex<Option<Fault>>,
}

impl Faulty {
    pub(super) fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            next: Mutex::new(None),
        }
    }

    /// Makes the next audit commit or signature (whichever `fault` is about) fail.
    pub(super) fn fail_next(&self, fault: Fault) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault);
    }

    fn take(&self, seal: bool) -> Option<Fault> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        match *next {
            Some(Fault::SealLost) if seal => next.take(),
            Some(Fault::Lost | Fault::CommittedButFailed) if !seal => next.take(),
            _ => None,
        }
    }
}

fn failure() -> StoreError {
    StoreError::Database(sqlx::Error::PoolTimedOut)
}

#[async_trait]
impl Store for Faulty {
    async fn audit_append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        match self.take(false) {
            Some(Fault::Lost) => Err(failure()),
            Some(_) => {
                self.inner.audit_append(records).await?;
                Err(failure())
            }
            None => self.inner.audit_append(records).await,
        }
    }

    async fn audit_seal(&self, record: &AuditRecord) -> Result<(), StoreError> {
        match self.take(true) {
            Some(_) => Err(failure()),
            None => self.inner.audit_seal(record).await,
        }
    }

    async fn entry(&self, id: &str) -> Result<Option<StoredEntry>, StoreError> {
        self.inner.entry(id).await
    }

    async fn search(&self, query: &CatalogQuery) -> Result<Vec<CatalogHit>, StoreError> {
        self.inner.search(query).await
    }

    async fn entries(&self, ids: &[String]) -> Result<Vec<StoredEntry>, StoreError> {
        self.inner.entries(ids).await
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        self.inner.count_entries().await
    }

    async fn publish_local(
        &self,
        entry: CatalogEntry,
        upstream: Upstream,
    ) -> Result<CatalogEntry, StoreError> {
        self.inner.publish_local(entry, upstream).await
    }

    async fn publish_local_batch(
        &self,
        entries: Vec<CatalogEntry>,
        upstream: Upstream,
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        self.inner.publish_local_batch(entries, upstream).await
    }

    async fn withdraw_local(
        &self,
        id: &str,
        upstream: Upstream,
    ) -> Result<Option<u64>, StoreError> {
        self.inner.withdraw_local(id, upstream).await
    }

    async fn apply_child_catalog(
        &self,
        child: &str,
        items: &[(u64, CatalogChange)],
        upstream: Upstream,
    ) -> Result<u64, StoreError> {
        self.inner.apply_child_catalog(child, items, upstream).await
    }

    async fn clear_outbox(&self, stream: Stream) -> Result<u64, StoreError> {
        self.inner.clear_outbox(stream).await
    }

    async fn cursor(&self, child: &str, stream: Stream) -> Result<u64, StoreError> {
        self.inner.cursor(child, stream).await
    }

    async fn outbox_after(
        &self,
        stream: Stream,
        after: u64,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        self.inner.outbox_after(stream, after, limit).await
    }

    async fn outbox_head(&self, stream: Stream) -> Result<u64, StoreError> {
        self.inner.outbox_head(stream).await
    }

    async fn next_id(&self, name: &str) -> Result<u64, StoreError> {
        self.inner.next_id(name).await
    }

    async fn put_doc(&self, doc: &Doc) -> Result<(), StoreError> {
        self.inner.put_doc(doc).await
    }

    async fn doc(&self, kind: DocKind, id: &str) -> Result<Option<Doc>, StoreError> {
        self.inner.doc(kind, id).await
    }

    async fn docs(&self, kind: DocKind, query: &DocQuery) -> Result<Vec<Doc>, StoreError> {
        self.inner.docs(kind, query).await
    }

    async fn set_uplink_acked(&self, stream: Stream, seq: u64) -> Result<(), StoreError> {
        self.inner.set_uplink_acked(stream, seq).await
    }

    async fn uplink_acked(&self, stream: Stream) -> Result<u64, StoreError> {
        self.inner.uplink_acked(stream).await
    }

    async fn audit_append_at_head(
        &self,
        node: &str,
        chain: &ChainAt<'_>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.audit_append_at_head(node, chain).await
    }

    async fn audit_head(&self, node: &str) -> Result<Option<AuditRecord>, StoreError> {
        self.inner.audit_head(node).await
    }

    async fn apply_child_audit(
        &self,
        child: &str,
        items: &[(u64, Option<AuditRecord>)],
    ) -> Result<u64, StoreError> {
        self.inner.apply_child_audit(child, items).await
    }

    async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        self.inner.audit_query(query).await
    }

    async fn audit_chain(
        &self,
        node: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.audit_chain(node, after, limit).await
    }

    async fn audit_nodes(&self) -> Result<Vec<String>, StoreError> {
        self.inner.audit_nodes().await
    }

    async fn audit_archivable(
        &self,
        before_ns: i64,
        max_fwd_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        self.inner
            .audit_archivable(before_ns, max_fwd_seq, limit)
            .await
    }

    async fn audit_delete_chain_upto(&self, node: &str, seq: u64) -> Result<u64, StoreError> {
        self.inner.audit_delete_chain_upto(node, seq).await
    }

    async fn audit_delete(&self, fwd_seqs: &[u64]) -> Result<u64, StoreError> {
        self.inner.audit_delete(fwd_seqs).await
    }

    async fn ops_append(&self, records: &[OperationRecord]) -> Result<(), StoreError> {
        self.inner.ops_append(records).await
    }

    async fn ops_query(
        &self,
        query: &OperationQuery,
    ) -> Result<Vec<(u64, OperationRecord)>, StoreError> {
        self.inner.ops_query(query).await
    }

    async fn ops_purge(&self, before_ns: i64) -> Result<u64, StoreError> {
        self.inner.ops_purge(before_ns).await
    }

    async fn ops_trim(&self, keep: u64) -> Result<u64, StoreError> {
        self.inner.ops_trim(keep).await
    }

    async fn audit_count(&self) -> Result<u64, StoreError> {
        self.inner.audit_count().await
    }

    async fn node_key(&self, node: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.node_key(node).await
    }

    async fn pin_node_key(&self, node: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.pin_node_key(node, key).await
    }

    async fn replace_node_key(&self, node: &str, key: &[u8]) -> Result<(), StoreError> {
        self.inner.replace_node_key(node, key).await
    }

    async fn note_served(
        &self,
        resource_id: &str,
        node: &str,
        until_unix: i64,
    ) -> Result<(), StoreError> {
        self.inner.note_served(resource_id, node, until_unix).await
    }

    async fn served_nodes(
        &self,
        resource_id: &str,
        now_unix: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.served_nodes(resource_id, now_unix).await
    }

    async fn mark_unconfirmed(&self, node: &str) -> Result<(), StoreError> {
        self.inner.mark_unconfirmed(node).await
    }

    async fn uplink_mark(&self, stream: Stream) -> Result<Option<UplinkMark>, StoreError> {
        self.inner.uplink_mark(stream).await
    }

    async fn confirm_uplink(&self, stream: Stream) -> Result<(), StoreError> {
        self.inner.confirm_uplink(stream).await
    }

    async fn stage_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.inner.stage_audit(records).await
    }

    async fn stage_catalog(&self, entries: &[StoredEntry]) -> Result<(), StoreError> {
        self.inner.stage_catalog(entries).await
    }

    async fn staged(&self, stream: Stream) -> Result<Staged, StoreError> {
        self.inner.staged(stream).await
    }

    async fn clear_staged(&self, stream: Stream) -> Result<(), StoreError> {
        self.inner.clear_staged(stream).await
    }

    async fn recover_audit(
        &self,
        plan: &AuditRecovery,
        rechain: &Rechain<'_>,
    ) -> Result<Recovered, StoreError> {
        self.inner.recover_audit(plan, rechain).await
    }

    async fn recover_catalog(&self, plan: &CatalogRecovery) -> Result<Recovered, StoreError> {
        self.inner.recover_catalog(plan).await
    }

    async fn close_up(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        self.inner.close_up(stream, after).await
    }

    async fn count_after(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        self.inner.count_after(stream, after).await
    }

    async fn own_entries(
        &self,
        node: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.inner.own_entries(node, after_id, limit).await
    }

    async fn flow_append(
        &self,
        doc: &Doc,
        head: u64,
        items: &[Vec<u8>],
        snapshot: &[SnapshotChange],
    ) -> Result<u64, StoreError> {
        self.inner.flow_append(doc, head, items, snapshot).await
    }

    async fn flow_items(
        &self,
        side: FlowSide,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.inner.flow_items(side, id, after, limit).await
    }

    async fn flow_head(&self, side: FlowSide, id: &str) -> Result<u64, StoreError> {
        self.inner.flow_head(side, id).await
    }

    async fn flow_receive(
        &self,
        id: &str,
        items: &[(u64, Vec<u8>)],
        doc: Option<&Doc>,
    ) -> Result<u64, StoreError> {
        self.inner.flow_receive(id, items, doc).await
    }

    async fn flow_snapshot(
        &self,
        id: &str,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.flow_snapshot(id, after_key, limit).await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.inner.take_lease(name, holder, ttl).await
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.inner.lease_holder(name).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.inner.release_lease(name, holder).await
    }

    async fn change_feed(&self) -> Result<Option<Box<dyn crate::store::ChangeFeed>>, StoreError> {
        self.inner.change_feed().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

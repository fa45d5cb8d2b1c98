//! Store operations that fail on lock contention are run again, with backoff, until a bound; past it they fail as
//! [`StoreError::Busy`], which the node answers UNAVAILABLE (see `crate::error`), never INTERNAL.
//!
//! Every [`Store`] operation is one transaction (or one statement), so an attempt that failed on a lock changed
//! nothing and running it again is safe. The backends already wait for locks themselves (SQLite's busy timeout,
//! PostgreSQL's `lock_timeout`, both set to the same bound); what reaches this layer is what waiting cannot cure —
//! a serialization failure or deadlock that PostgreSQL resolved by aborting the transaction, SQLite refusing a
//! lock at once — and contention that outlasted the bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::OperationQuery;
use async_trait::async_trait;
use fedgate_proto::v1::OperationRecord;
use fedgate_proto::v1::{AuditRecord, CatalogChange, CatalogEntry, Stream};
use rand::Rng;

use super::{
    AuditQuery, AuditRecovery, CatalogHit, CatalogQuery, CatalogRecovery, ChainAt, ChangeFeed, Doc,
    DocKind, DocQuery, FlowSide, OutboxItem, Rechain, Recovered, SnapshotChange, Staged, Store,
    StoreError, StoredEntry, UplinkMark, Upstream,
};

/// Wait before the first retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// A [`Store`] that retries operations failing on lock contention for up to a bound, then answers
/// [`StoreError::Busy`] naming the node.
pub struct Retrying {
    inner: Arc<dyn Store>,
    node: String,
    bound: Duration,
}

impl std::fmt::Debug for Retrying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retrying")
            .field("node", &self.node)
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl Retrying {
    /// `inner`, the store of node `node`, with contended operations retried for up to `bound` in all.
    pub fn new(inner: Arc<dyn Store>, node: impl Into<String>, bound: Duration) -> Self {
        Self {
            inner,
            node: node.into(),
            bound,
        }
    }

    /// Runs `op` until it succeeds, fails for another reason than contention, or `bound` has passed since the
    /// first attempt.
    async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send,
        T: Send,
    {
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 1u32;
        loop {
            let err = match op().await {
                Err(e) if e.is_busy() && !matches!(e, StoreError::Busy { .. }) => e,
                other => return other,
            };
            let waited = started.elapsed();
            // Half to all of the backoff, so that writers refused together do not come back together.
            let pause = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            if waited + pause >= self.bound {
                tracing::warn!(node = %self.node, attempts, waited_ms = waited.as_millis() as u64, error = %err,
                    "store operation gave up on a locked database");
                return Err(StoreError::Busy {
                    node: self.node.clone(),
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    cause: err.to_string(),
                });
            }
            tracing::debug!(node = %self.node, attempts, error = %err, "store operation retried after contention");
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempts += 1;
        }
    }
}

#[async_trait]
impl Store for Retrying {
    async fn entry(&self, id: &str) -> Result<Option<StoredEntry>, StoreError> {
        self.run(|| self.inner.entry(id)).await
    }

    async fn search(&self, query: &CatalogQuery) -> Result<Vec<CatalogHit>, StoreError> {
        self.run(|| self.inner.search(query)).await
    }

    async fn entries(&self, ids: &[String]) -> Result<Vec<StoredEntry>, StoreError> {
        self.run(|| self.inner.entries(ids)).await
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        self.run(|| self.inner.count_entries()).await
    }

    async fn publish_local_batch(
        &self,
        entries: Vec<CatalogEntry>,
        upstream: Upstream,
    ) -> Result<Vec<CatalogEntry>, StoreError> {
        self.run(|| self.inner.publish_local_batch(entries.clone(), upstream))
            .await
    }

    async fn withdraw_local(
        &self,
        id: &str,
        upstream: Upstream,
    ) -> Result<Option<u64>, StoreError> {
        self.run(|| self.inner.withdraw_local(id, upstream)).await
    }

    async fn apply_child_catalog(
        &self,
        child: &str,
        items: &[(u64, CatalogChange)],
        upstream: Upstream,
    ) -> Result<u64, StoreError> {
        self.run(|| self.inner.apply_child_catalog(child, items, upstream))
            .await
    }

    async fn clear_outbox(&self, stream: Stream) -> Result<u64, StoreError> {
        self.run(|| self.inner.clear_outbox(stream)).await
    }

    async fn cursor(&self, child: &str, stream: Stream) -> Result<u64, StoreError> {
        self.run(|| self.inner.cursor(child, stream)).await
    }

    async fn outbox_after(
        &self,
        stream: Stream,
        after: u64,
        limit: u32,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        self.run(|| self.inner.outbox_after(stream, after, limit))
            .await
    }

    async fn outbox_head(&self, stream: Stream) -> Result<u64, StoreError> {
        self.run(|| self.inner.outbox_head(stream)).await
    }

    async fn next_id(&self, name: &str) -> Result<u64, StoreError> {
        self.run(|| self.inner.next_id(name)).await
    }

    async fn put_doc(&self, doc: &Doc) -> Result<(), StoreError> {
        self.run(|| self.inner.put_doc(doc)).await
    }

    async fn doc(&self, kind: DocKind, id: &str) -> Result<Option<Doc>, StoreError> {
        self.run(|| self.inner.doc(kind, id)).await
    }

    async fn docs(&self, kind: DocKind, query: &DocQuery) -> Result<Vec<Doc>, StoreError> {
        self.run(|| self.inner.docs(kind, query)).await
    }

    async fn set_uplink_acked(&self, stream: Stream, seq: u64) -> Result<(), StoreError> {
        self.run(|| self.inner.set_uplink_acked(stream, seq)).await
    }

    async fn uplink_acked(&self, stream: Stream) -> Result<u64, StoreError> {
        self.run(|| self.inner.uplink_acked(stream)).await
    }

    async fn audit_append(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.run(|| self.inner.audit_append(records)).await
    }

    async fn audit_seal(&self, record: &AuditRecord) -> Result<(), StoreError> {
        self.run(|| self.inner.audit_seal(record)).await
    }

    async fn audit_head(&self, node: &str) -> Result<Option<AuditRecord>, StoreError> {
        self.run(|| self.inner.audit_head(node)).await
    }

    async fn apply_child_audit(
        &self,
        child: &str,
        items: &[(u64, Option<AuditRecord>)],
    ) -> Result<u64, StoreError> {
        self.run(|| self.inner.apply_child_audit(child, items))
            .await
    }

    async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        self.run(|| self.inner.audit_query(query)).await
    }

    async fn audit_chain(
        &self,
        node: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.run(|| self.inner.audit_chain(node, after, limit))
            .await
    }

    async fn audit_nodes(&self) -> Result<Vec<String>, StoreError> {
        self.run(|| self.inner.audit_nodes()).await
    }

    async fn audit_archivable(
        &self,
        before_ns: i64,
        max_fwd_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        self.run(|| self.inner.audit_archivable(before_ns, max_fwd_seq, limit))
            .await
    }

    async fn audit_delete_chain_upto(&self, node: &str, seq: u64) -> Result<u64, StoreError> {
        self.run(|| self.inner.audit_delete_chain_upto(node, seq))
            .await
    }

    async fn audit_delete(&self, fwd_seqs: &[u64]) -> Result<u64, StoreError> {
        self.run(|| self.inner.audit_delete(fwd_seqs)).await
    }

    async fn ops_append(&self, records: &[OperationRecord]) -> Result<(), StoreError> {
        self.run(|| self.inner.ops_append(records)).await
    }

    async fn ops_query(
        &self,
        query: &OperationQuery,
    ) -> Result<Vec<(u64, OperationRecord)>, StoreError> {
        self.run(|| self.inner.ops_query(query)).await
    }

    async fn ops_purge(&self, before_ns: i64) -> Result<u64, StoreError> {
        self.run(|| self.inner.ops_purge(before_ns)).await
    }

    async fn ops_trim(&self, keep: u64) -> Result<u64, StoreError> {
        self.run(|| self.inner.ops_trim(keep)).await
    }

    async fn audit_count(&self) -> Result<u64, StoreError> {
        self.run(|| self.inner.audit_count()).await
    }

    async fn node_key(&self, node: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(|| self.inner.node_key(node)).await
    }

    async fn pin_node_key(&self, node: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.run(|| self.inner.pin_node_key(node, key)).await
    }

    async fn replace_node_key(&self, node: &str, key: &[u8]) -> Result<(), StoreError> {
        self.run(|| self.inner.replace_node_key(node, key)).await
    }

    async fn note_served(
        &self,
        resource_id: &str,
        node: &str,
        until_unix: i64,
    ) -> Result<(), StoreError> {
        self.run(|| self.inner.note_served(resource_id, node, until_unix))
            .await
    }

    async fn served_nodes(
        &self,
        resource_id: &str,
        now_unix: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.run(|| self.inner.served_nodes(resource_id, now_unix))
            .await
    }

    async fn audit_append_at_head(
        &self,
        node: &str,
        chain: &ChainAt<'_>,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.run(|| self.inner.audit_append_at_head(node, chain))
            .await
    }

    async fn mark_unconfirmed(&self, node: &str) -> Result<(), StoreError> {
        self.run(|| self.inner.mark_unconfirmed(node)).await
    }

    async fn uplink_mark(&self, stream: Stream) -> Result<Option<UplinkMark>, StoreError> {
        self.run(|| self.inner.uplink_mark(stream)).await
    }

    async fn confirm_uplink(&self, stream: Stream) -> Result<(), StoreError> {
        self.run(|| self.inner.confirm_uplink(stream)).await
    }

    async fn stage_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError> {
        self.run(|| self.inner.stage_audit(records)).await
    }

    async fn stage_catalog(&self, entries: &[StoredEntry]) -> Result<(), StoreError> {
        self.run(|| self.inner.stage_catalog(entries)).await
    }

    async fn staged(&self, stream: Stream) -> Result<Staged, StoreError> {
        self.run(|| self.inner.staged(stream)).await
    }

    async fn clear_staged(&self, stream: Stream) -> Result<(), StoreError> {
        self.run(|| self.inner.clear_staged(stream)).await
    }

    async fn recover_audit(
        &self,
        plan: &AuditRecovery,
        rechain: &Rechain<'_>,
    ) -> Result<Recovered, StoreError> {
        self.run(|| self.inner.recover_audit(plan, rechain)).await
    }

    async fn recover_catalog(&self, plan: &CatalogRecovery) -> Result<Recovered, StoreError> {
        self.run(|| self.inner.recover_catalog(plan)).await
    }

    async fn close_up(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        self.run(|| self.inner.close_up(stream, after)).await
    }

    async fn count_after(&self, stream: Stream, after: u64) -> Result<u64, StoreError> {
        self.run(|| self.inner.count_after(stream, after)).await
    }

    async fn own_entries(
        &self,
        node: &str,
        after_id: &str,
        limit: u32,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        self.run(|| self.inner.own_entries(node, after_id, limit))
            .await
    }

    async fn flow_append(
        &self,
        doc: &Doc,
        head: u64,
        items: &[Vec<u8>],
        snapshot: &[SnapshotChange],
    ) -> Result<u64, StoreError> {
        self.run(|| self.inner.flow_append(doc, head, items, snapshot))
            .await
    }

    async fn flow_items(
        &self,
        side: FlowSide,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.run(|| self.inner.flow_items(side, id, after, limit))
            .await
    }

    async fn flow_head(&self, side: FlowSide, id: &str) -> Result<u64, StoreError> {
        self.run(|| self.inner.flow_head(side, id)).await
    }

    async fn flow_receive(
        &self,
        id: &str,
        items: &[(u64, Vec<u8>)],
        doc: Option<&Doc>,
    ) -> Result<u64, StoreError> {
        self.run(|| self.inner.flow_receive(id, items, doc)).await
    }

    async fn flow_snapshot(
        &self,
        id: &str,
        after_key: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.run(|| self.inner.flow_snapshot(id, after_key, limit))
            .await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.run(|| self.inner.take_lease(name, holder, ttl)).await
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.run(|| self.inner.lease_holder(name)).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.run(|| self.inner.release_lease(name, holder)).await
    }

    async fn change_feed(&self) -> Result<Option<Box<dyn ChangeFeed>>, StoreError> {
        self.inner.change_feed().await
    }

    async fn close(&self) {
        self.inner.close().await;
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // A probe reports what it finds now: waiting out contention would only delay the answer.
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use sqlx::{ConnectOptions, Connection};

    use super::*;
    use crate::store::SqliteStore;

    /// Another connection to the database file that holds its write lock until the returned sender fires.
    async fn hold_write_lock(path: &Path) -> tokio::sync::oneshot::Sender<()> {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .connect()
            .await
            .expect("second connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .expect("write lock");
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = released.await;
            let _ = sqlx::query("COMMIT").execute(&mut conn).await;
            let _ = conn.close().await;
        });
        release
    }

    fn record(node: &str, seq: u64) -> AuditRecord {
        AuditRecord {
            node_code: node.into(),
            seq,
            outcome: "OK".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_write_that_reads_first_waits_for_the_lock_instead_of_failing_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n.db");
        let store = SqliteStore::open_with(&path, Duration::from_secs(20))
            .await
            .expect("open");
        let release = hold_write_lock(&path).await;
        // Applying a child's records reads its cursor before it writes: a deferred transaction would be refused
        // the lock at once, whatever the busy timeout.
        let apply = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .apply_child_audit("350102", &[(1, Some(record("350102", 1)))])
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !apply.is_finished(),
            "the write waits while the lock is held"
        );
        let _ = release.send(());
        let applied = apply
            .await
            .expect("task")
            .expect("applied once the lock is free");
        assert_eq!(applied, 1);
        store.close().await;
    }

    #[tokio::test]
    async fn contention_shorter_than_the_bound_is_waited_out_and_longer_is_busy_naming_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n.db");
        let bound = Duration::from_millis(400);
        let inner = SqliteStore::open_with(&path, bound).await.expect("open");
        let store = Retrying::new(Arc::new(inner), "350100", bound);
        assert_eq!(store.next_id("t").await.expect("first"), 1);

        // Held for less than the bound: the call waits and succeeds.
        let release = hold_write_lock(&path).await;
        let short = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = release.send(());
        });
        assert_eq!(store.next_id("t").await.expect("waited out"), 2);
        short.await.expect("release");

        // Held for longer: the call gives up after about the bound, as busy, having changed nothing.
        let release = hold_write_lock(&path).await;
        let began = Instant::now();
        let err = store.next_id("t").await.expect_err("busy");
        let waited = began.elapsed();
        assert!(err.is_busy(), "{err}");
        match &err {
            StoreError::Busy { node, .. } => assert_eq!(node, "350100"),
            other => panic!("not Busy: {other}"),
        }
        assert!(waited >= bound, "gave up after {waited:?}");
        assert!(waited < bound * 5, "gave up only after {waited:?}");
        let _ = release.send(());
        assert_eq!(store.next_id("t").await.expect("after release"), 3);
        store.close().await;
    }
}

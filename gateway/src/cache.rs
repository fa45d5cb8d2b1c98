//! The consumer node's cache of authorized answers, so repeated cross-level requests do not cross the province
//! again. An answer is keyed by everything that shaped it — the exact grant token included — so it is only ever
//! served to a request the provider's node would have answered the same way; revocation purges it.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::{Hop, ShareMode, ShareRequest};
use moka::future::Cache;
use prost::Message;
use sha2::{Digest, Sha256};

/// A cached answer.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    /// Encoded `ShareResponse` as the provider's node produced it.
    pub response: Vec<u8>,
    /// Route it took when it was fetched.
    pub route: Vec<Hop>,
    /// Grant it was served under, empty for none.
    pub grant_id: String,
    /// The resource it answers, whose changes purge it.
    pub resource_id: String,
    /// How long it may be served: this node's limit, and no longer than the provider's node allowed.
    pub ttl: Duration,
}

impl CachedAnswer {
    /// Bytes the answer holds, for the cache's byte bound.
    fn size(&self) -> usize {
        self.response.len()
            + self.grant_id.len()
            + self.resource_id.len()
            + self
                .route
                .iter()
                .map(|h| h.node_code.len() + h.seen_peer.len() + h.action.len() + 16)
                .sum::<usize>()
            + 64
    }
}

/// Each answer lives as long as it was allowed to.
struct AnswerExpiry;

impl moka::Expiry<String, Arc<CachedAnswer>> for AnswerExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<CachedAnswer>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Authorized answers by request shape, bounded in count, bytes and age.
#[derive(Clone)]
pub struct ShareCache {
    inner: Cache<String, Arc<CachedAnswer>>,
    ttl: Duration,
}

impl std::fmt::Debug for ShareCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

impl ShareCache {
    /// A cache keeping answers for at most `ttl`, at most `capacity` of them and at most `max_bytes` in all.
    pub fn new(ttl: Duration, capacity: u64, max_bytes: u64) -> Self {
        // Every answer weighs at least max_bytes / capacity, so neither bound can be passed.
        let floor = u32::try_from(max_bytes / capacity.max(1)).unwrap_or(u32::MAX);
        Self {
            inner: Cache::builder()
                .max_capacity(if capacity == 0 { 0 } else { max_bytes })
                .weigher(move |_, v: &Arc<CachedAnswer>| {
                    u32::try_from(v.size()).unwrap_or(u32::MAX).max(floor)
                })
                .expire_after(AnswerExpiry)
                .support_invalidation_closures()
                .build(),
            ttl,
        }
    }

    /// The longest this node keeps an answer.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The cache key of a request by `consumer`, or `None` if such requests are not cached (bulk pages).
    pub fn key(consumer: &str, req: &ShareRequest) -> Option<String> {
        let mode = ShareMode::try_from(req.mode).unwrap_or(ShareMode::Query);
        if mode == ShareMode::Bulk {
            return None;
        }
        let mut h = Sha256::new();
        let mut part = |s: &[u8]| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s);
        };
        // Answers under a grant belong to its grantee; unconditional answers to any agency of the node.
        match &req.grant {
            Some(g) => {
                part(consumer.as_bytes());
                part(&g.encode_to_vec());
            }
            None => part(b"*"),
        }
        part(req.resource_id.as_bytes());
        part(&(mode as i32).to_le_bytes());
        part(req.key.as_bytes());
        let mut fields = req.fields.clone();
        fields.sort();
        for f in &fields {
            part(f.as_bytes());
        }
        part(b"|");
        let mut values: Vec<_> = req.verify_values.iter().collect();
        values.sort();
        for (k, v) in values {
            part(k.as_bytes());
            part(v.as_bytes());
        }
        part(b"|");
        for g in &req.group_by {
            part(g.as_bytes());
        }
        Some(hex::encode(h.finalize()))
    }

    /// The cached answer for a key.
    pub async fn get(&self, key: &str) -> Option<Arc<CachedAnswer>> {
        self.inner.get(key).await
    }

    /// Stores an answer for the shorter of its own allowance and this node's limit; one allowed no time at all
    /// is not stored.
    pub async fn insert(&self, key: String, mut answer: CachedAnswer) {
        answer.ttl = answer.ttl.min(self.ttl);
        if answer.ttl.is_zero() {
            return;
        }
        self.inner.insert(key, Arc::new(answer)).await;
    }

    /// Drops every answer of a resource.
    pub fn purge_resource(&self, resource_id: &str) {
        let id = resource_id.to_owned();
        if let Err(e) = self
            .inner
            .invalidate_entries_if(move |_, v| v.resource_id == id)
        {
            tracing::error!(error = %e, "cache purge failed; clearing the whole cache");
            self.inner.invalidate_all();
        }
    }

    /// Drops every answer served under a grant.
    pub fn purge_grant(&self, grant_id: &str) {
        let id = grant_id.to_owned();
        if let Err(e) = self
            .inner
            .invalidate_entries_if(move |_, v| v.grant_id == id)
        {
            tracing::error!(error = %e, "cache purge failed; clearing the whole cache");
            self.inner.invalidate_all();
        }
    }

    /// Answers held.
    pub fn len(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Bytes held, as weighed for the byte bound.
    pub async fn weighed_bytes(&self) -> u64 {
        self.inner.run_pending_tasks().await;
        self.inner.weighted_size()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// At the provider's node: which nodes were served answers of which entries, and may still cache them, so a change
/// of an entry purges exactly those caches. Kept in the store (a node that restarts still knows) and noted there
/// once per node and entry per half allowance, not per answer.
#[derive(Clone)]
pub struct ServedNodes {
    store: Arc<dyn crate::store::Store>,
    allowance: Duration,
    noted: Cache<(String, String), ()>,
}

impl std::fmt::Debug for ServedNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedNodes")
            .field("allowance", &self.allowance)
            .finish_non_exhaustive()
    }
}

impl ServedNodes {
    /// Served nodes kept in `store`, each answer allowed to be cached for `allowance`.
    pub fn new(store: Arc<dyn crate::store::Store>, allowance: Duration) -> Self {
        Self {
            store,
            allowance,
            noted: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live((allowance / 2).max(Duration::from_millis(1)))
                .build(),
        }
    }

    /// How long a consumer's node may cache an answer from here.
    pub fn allowance(&self) -> Duration {
        self.allowance
    }

    /// Notes that `node` was served an answer of `resource_id` at `now_unix`.
    pub async fn note(
        &self,
        resource_id: &str,
        node: &str,
        now_unix: i64,
    ) -> Result<(), crate::store::StoreError> {
        if self.allowance.is_zero() {
            return Ok(());
        }
        let key = (resource_id.to_owned(), node.to_owned());
        if self.noted.contains_key(&key) {
            return Ok(());
        }
        // Until a full allowance after the latest answer that the in-memory note lets pass unnoted.
        let secs =
            i64::try_from((self.allowance + self.allowance / 2).as_secs()).unwrap_or(i64::MAX);
        self.store
            .note_served(
                resource_id,
                node,
                now_unix.saturating_add(secs).saturating_add(1),
            )
            .await?;
        self.noted.insert(key, ()).await;
        Ok(())
    }

    /// Nodes that may still hold cached answers of `resource_id`.
    pub async fn holders(
        &self,
        resource_id: &str,
        now_unix: i64,
    ) -> Result<Vec<String>, crate::store::StoreError> {
        self.store.served_nodes(resource_id, now_unix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(resource: &str, bytes: usize, ttl: Duration) -> CachedAnswer {
        CachedAnswer {
            response: vec![0; bytes],
            route: Vec::new(),
            grant_id: String::new(),
            resource_id: resource.into(),
            ttl,
        }
    }

    #[tokio::test]
    async fn the_cache_stays_within_its_bytes_and_count() {
        let cache = ShareCache::new(Duration::from_secs(60), 1000, 64 * 1024);
        for i in 0..200 {
            cache
                .insert(
                    format!("k{i}"),
                    answer("350102:a", 4096, Duration::from_secs(60)),
                )
                .await;
        }
        let bytes = cache.weighed_bytes().await;
        assert!(bytes <= 64 * 1024, "{bytes} bytes held");
        assert!(cache.len() <= 16, "{} answers held", cache.len());

        // Small answers are bounded by count: each weighs at least max_bytes / capacity.
        let small = ShareCache::new(Duration::from_secs(60), 10, 64 * 1024);
        for i in 0..100 {
            small
                .insert(
                    format!("k{i}"),
                    answer("350102:a", 1, Duration::from_secs(60)),
                )
                .await;
        }
        small.weighed_bytes().await;
        assert!(small.len() <= 10, "{} answers held", small.len());
    }

    #[tokio::test]
    async fn answers_live_no_longer_than_allowed_and_go_with_their_resource() {
        let cache = ShareCache::new(Duration::from_secs(60), 100, 1 << 20);
        cache
            .insert("none".into(), answer("350102:a", 10, Duration::ZERO))
            .await;
        assert!(cache.get("none").await.is_none());
        cache
            .insert("a".into(), answer("350102:a", 10, Duration::from_secs(60)))
            .await;
        cache
            .insert("b".into(), answer("350102:b", 10, Duration::from_secs(60)))
            .await;
        cache.purge_resource("350102:a");
        assert!(cache.get("a").await.is_none());
        assert!(cache.get("b").await.is_some());
    }
}

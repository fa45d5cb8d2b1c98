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
}

/// Authorized answers by request shape, bounded in size and age.
#[derive(Clone)]
pub struct ShareCache {
    inner: Cache<String, Arc<CachedAnswer>>,
}

impl std::fmt::Debug for ShareCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareCache")
            .field("entries", &self.inner.entry_count())
            .finish()
    }
}

impl ShareCache {
    /// A cache keeping answers for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: u64) -> Self {
        Self {
            inner: Cache::builder()
                .time_to_live(ttl)
                .max_capacity(capacity)
                .support_invalidation_closures()
                .build(),
        }
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

    /// Stores an answer.
    pub async fn insert(&self, key: String, answer: CachedAnswer) {
        self.inner.insert(key, Arc::new(answer)).await;
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

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

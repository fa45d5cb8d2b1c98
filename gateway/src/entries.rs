//! This node's own catalog entries in memory, for the share path: a share served here reads its entry without a
//! store round trip. Every local publish or withdrawal drops the entry it changed once its change is committed;
//! a short time to live bounds what a change made outside this process (a restore) can leave behind.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fedgate_proto::v1::CatalogEntry;
use moka::sync::Cache;

use crate::ident::DivisionCode;
use crate::store::{Store, StoreError};

/// Entries kept at most.
const CAPACITY: u64 = 100_000;
/// How long an entry is trusted without a change having been seen.
const TIME_TO_LIVE: Duration = Duration::from_secs(10);

/// The live entries this node provides, by id; `None` for an id that is unknown, withdrawn or another node's.
#[derive(Clone)]
pub struct LocalEntries {
    node: DivisionCode,
    store: Arc<dyn Store>,
    cache: Cache<String, Option<Arc<CatalogEntry>>>,
    /// Counts committed changes; a load that began before a change does not fill the cache.
    changes: Arc<Mutex<u64>>,
}

impl LocalEntries {
    /// An empty cache over `store` for node `node`.
    pub fn new(node: DivisionCode, store: Arc<dyn Store>) -> Self {
        Self {
            node,
            store,
            cache: Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TIME_TO_LIVE)
                .build(),
            changes: Arc::new(Mutex::new(0)),
        }
    }

    /// The live entry `id` if this node provides it.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<CatalogEntry>>, StoreError> {
        if let Some(hit) = self.cache.get(id) {
            return Ok(hit);
        }
        let before = self.change_count();
        let entry = self
            .store
            .entry(id)
            .await?
            .filter(|s| !s.withdrawn && s.entry.node_code == self.node.as_str())
            .map(|s| Arc::new(s.entry));
        let changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        if *changes == before {
            self.cache.insert(id.to_owned(), entry.clone());
        }
        Ok(entry)
    }

    /// Forgets entry `id`: called once a change of it is committed.
    pub fn changed(&self, id: &str) {
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        *changes = changes.wrapping_add(1);
        self.cache.invalidate(id);
    }

    /// Forgets every entry: changes may have been missed.
    pub fn all_changed(&self) {
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        *changes = changes.wrapping_add(1);
        self.cache.invalidate_all();
    }

    fn change_count(&self) -> u64 {
        *self.changes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Upstream;
    use crate::store::sqlite::SqliteStore;

    fn entry(id: &str, node: &str, title: &str) -> CatalogEntry {
        CatalogEntry {
            id: id.into(),
            node_code: node.into(),
            title: title.into(),
            provider_uscc: "11350100MB0000000X".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_change_is_seen_at_once_and_other_nodes_entries_are_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("n.db"))
                .await
                .expect("open"),
        );
        let node: DivisionCode = "350102".parse().expect("code");
        let entries = LocalEntries::new(node, store.clone());
        assert!(entries.get("350102:a").await.expect("get").is_none());
        store
            .publish_local(entry("350102:a", "350102", "first"), Upstream::Parent)
            .await
            .expect("publish");
        assert!(
            entries.get("350102:a").await.expect("get").is_none(),
            "unknown until its change is reported"
        );
        entries.changed("350102:a");
        let got = entries.get("350102:a").await.expect("get").expect("live");
        assert_eq!(got.title, "first");
        store
            .publish_local(entry("350102:a", "350102", "second"), Upstream::Parent)
            .await
            .expect("publish");
        entries.changed("350102:a");
        let got = entries.get("350102:a").await.expect("get").expect("live");
        assert_eq!(got.title, "second");
        store
            .withdraw_local("350102:a", Upstream::Parent)
            .await
            .expect("withdraw");
        entries.changed("350102:a");
        assert!(entries.get("350102:a").await.expect("get").is_none());

        store
            .publish_local(entry("350103:b", "350103", "elsewhere"), Upstream::Parent)
            .await
            .expect("publish");
        assert!(entries.get("350103:b").await.expect("get").is_none());
    }
}

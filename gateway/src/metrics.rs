//! Counters a node keeps about its own work, for operators and tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of one node since it started.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Catalog stream items received from children (including ones skipped as already applied).
    pub catalog_items_received: AtomicU64,
    /// Catalog stream items received from children that were new and applied.
    pub catalog_items_applied: AtomicU64,
    /// Audit records received from children and stored.
    pub audit_items_applied: AtomicU64,
    /// Shares this node served as the provider's node.
    pub shares_served: AtomicU64,
    /// Shares this node forwarded to a neighbour.
    pub shares_forwarded: AtomicU64,
    /// TLS handshakes refused (unknown CA, no fedgate identity, timeout).
    pub tls_handshakes_refused: AtomicU64,
    /// Shares that failed at or below this node.
    pub shares_failed: AtomicU64,
}

impl NodeMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

//! What a node counts about its own work, for operators (the OpenMetrics endpoint) and tests.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set of the per-stream gauges: `stream="catalog"` or `stream="audit"`.
pub type StreamLabels = [(&'static str, &'static str); 1];
/// Label set of refused connections: `listener` ("backbone", "open_data", "metrics") and `reason`.
pub type RefusedLabels = [(&'static str, &'static str); 2];

/// The metrics of one node since it started, registered for exposition.
#[derive(Debug)]
pub struct NodeMetrics {
    /// Catalog stream items received from children (including ones skipped as already applied).
    pub catalog_items_received: Counter,
    /// Catalog stream items received from children that were new and applied.
    pub catalog_items_applied: Counter,
    /// Audit records received from children and stored.
    pub audit_items_applied: Counter,
    /// Shares this node served as the provider's node.
    pub shares_served: Counter,
    /// Shares this node forwarded to a neighbour.
    pub shares_forwarded: Counter,
    /// Connections refused on the TLS listeners (unknown CA, no fedgate identity, timeout, over a cap).
    pub tls_handshakes_refused: Counter,
    /// Connections refused, by listener and reason (`tls_error`, `no_identity`, `timeout`, `over_cap`).
    pub connections_refused: Family<RefusedLabels, Counter>,
    /// Calls refused over a limit, by reason (`agency_rate`, `agency_in_flight`, `forward_rate`,
    /// `forward_in_flight`, `calls_in_flight`).
    pub calls_refused: Family<StreamLabels, Counter>,
    /// Shares that failed at or below this node.
    pub shares_failed: Counter,
    /// Highest position written to each upward stream, as of the last scrape.
    pub uplink_head: Family<StreamLabels, Gauge>,
    /// Highest position of each upward stream the parent acknowledged.
    pub uplink_acked: Family<StreamLabels, Gauge>,
    /// Positions written but not yet acknowledged by the parent: the forwarding lag.
    pub uplink_lag: Family<StreamLabels, Gauge>,
    /// 1 while the link to the parent is up for the stream.
    pub uplink_connected: Family<StreamLabels, Gauge>,
    /// 1 while this process holds the stream's lease and ships it (of a node's replicas, one does).
    pub uplink_shipping: Family<StreamLabels, Gauge>,
    /// Audit records this node wrote to its own chain.
    pub audit_records_written: Counter,
    /// Audit batches the store refused (their callers got an error).
    pub audit_batches_failed: Counter,
    /// Records per audit group commit.
    pub audit_batch_records: Histogram,
    /// Time from handing an audit batch to the store to its commit, in seconds (what every share waits for).
    pub audit_commit_seconds: Histogram,
    /// Audit batches and signatures that found the chain moved on under this writer (another writer of the node,
    /// a commit reported failed that had committed, a recovery) and were chained after the stored head.
    pub audit_head_conflicts: Counter,
    /// Audit records children sent again that this node already held (skipped; a child that recovered, or whose
    /// own parent did, sends again what it had sent).
    pub audit_items_duplicate: Counter,
    /// Recoveries of each upward stream at Join, after this node lost items it had forwarded.
    pub uplink_recoveries: Family<StreamLabels, Counter>,
    /// Audit records and catalog entries taken back from the parent by recoveries.
    pub uplink_taken_back: Family<StreamLabels, Counter>,
    /// Own audit records re-chained, and local catalog changes published again, by recoveries.
    pub uplink_redone: Family<StreamLabels, Counter>,
    /// Stream items moved to positions after the parent's cursor by recoveries.
    pub uplink_moved: Family<StreamLabels, Counter>,
    /// Operational monitoring: per-call time and size histograms (see `opmon`).
    pub ops: crate::opmon::OpMetrics,
    /// Certificate reloads and the expiry of the node's own certificate.
    pub certificates: crate::tls::reload::CertificateMetrics,
    registry: Registry,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    /// Zeroed metrics, registered under the `fedgate_` prefix.
    pub fn new() -> Self {
        let mut m = Self {
            catalog_items_received: Counter::default(),
            catalog_items_applied: Counter::default(),
            audit_items_applied: Counter::default(),
            shares_served: Counter::default(),
            shares_forwarded: Counter::default(),
            tls_handshakes_refused: Counter::default(),
            connections_refused: Family::default(),
            calls_refused: Family::default(),
            shares_failed: Counter::default(),
            uplink_head: Family::default(),
            uplink_acked: Family::default(),
            uplink_lag: Family::default(),
            uplink_connected: Family::default(),
            uplink_shipping: Family::default(),
            audit_records_written: Counter::default(),
            audit_batches_failed: Counter::default(),
            // 1 to 8192 records.
            audit_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            // 100 µs to about 3 s.
            audit_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            audit_head_conflicts: Counter::default(),
            audit_items_duplicate: Counter::default(),
            uplink_recoveries: Family::default(),
            uplink_taken_back: Family::default(),
            uplink_redone: Family::default(),
            uplink_moved: Family::default(),
            ops: crate::opmon::OpMetrics::default(),
            certificates: Default::default(),
            registry: Registry::with_prefix("fedgate"),
        };
        let r = &mut m.registry;
        r.register(
            "catalog_items_received",
            "Catalog stream items received from children",
            m.catalog_items_received.clone(),
        );
        r.register(
            "catalog_items_applied",
            "Catalog stream items from children that were new and applied",
            m.catalog_items_applied.clone(),
        );
        r.register(
            "audit_items_applied",
            "Audit records received from children and stored",
            m.audit_items_applied.clone(),
        );
        r.register(
            "shares_served",
            "Shares served here as the provider's node",
            m.shares_served.clone(),
        );
        r.register(
            "shares_forwarded",
            "Shares forwarded to a neighbouring node",
            m.shares_forwarded.clone(),
        );
        r.register(
            "tls_handshakes_refused",
            "Connections refused on the TLS listeners (unknown CA, no fedgate identity, timeout, over a cap)",
            m.tls_handshakes_refused.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused, by listener and reason",
            m.connections_refused.clone(),
        );
        r.register(
            "calls_refused",
            "Calls refused over a rate or concurrency limit, by reason",
            m.calls_refused.clone(),
        );
        r.register(
            "shares_failed",
            "Shares that failed at or below this node",
            m.shares_failed.clone(),
        );
        r.register(
            "uplink_head",
            "Highest position written to the upward stream",
            m.uplink_head.clone(),
        );
        r.register(
            "uplink_acked",
            "Highest position of the upward stream the parent acknowledged",
            m.uplink_acked.clone(),
        );
        r.register(
            "uplink_lag",
            "Positions of the upward stream not yet acknowledged by the parent",
            m.uplink_lag.clone(),
        );
        r.register(
            "uplink_connected",
            "1 while the link to the parent is up",
            m.uplink_connected.clone(),
        );
        r.register(
            "uplink_shipping",
            "1 while this replica holds the upward stream's lease and ships it",
            m.uplink_shipping.clone(),
        );
        r.register(
            "audit_records_written",
            "Audit records this node wrote to its own chain",
            m.audit_records_written.clone(),
        );
        r.register(
            "audit_batches_failed",
            "Audit batches the store refused",
            m.audit_batches_failed.clone(),
        );
        r.register(
            "audit_batch_records",
            "Records per audit group commit",
            m.audit_batch_records.clone(),
        );
        r.register(
            "audit_commit_seconds",
            "Time from handing an audit batch to the store to its commit",
            m.audit_commit_seconds.clone(),
        );
        r.register(
            "audit_head_conflicts",
            "Audit batches and signatures that found the chain moved on under this writer and were chained after the stored head",
            m.audit_head_conflicts.clone(),
        );
        r.register(
            "audit_items_duplicate",
            "Audit records children sent again that this node already held",
            m.audit_items_duplicate.clone(),
        );
        r.register(
            "uplink_recoveries",
            "Recoveries of the upward stream at Join after this node lost items it had forwarded",
            m.uplink_recoveries.clone(),
        );
        r.register(
            "uplink_taken_back",
            "Audit records and catalog entries taken back from the parent by recoveries",
            m.uplink_taken_back.clone(),
        );
        r.register(
            "uplink_redone",
            "Own audit records re-chained and local catalog changes published again by recoveries",
            m.uplink_redone.clone(),
        );
        r.register(
            "uplink_moved",
            "Stream items moved to positions after the parent's cursor by recoveries",
            m.uplink_moved.clone(),
        );
        m.ops.register(r);
        m.certificates.register(r);
        m
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// Reads a counter.
    pub fn get(counter: &Counter) -> u64 {
        counter.get()
    }

    /// Every metric in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The running totals a node's periodic summary log line compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Shares served as the provider's node.
    pub shares_served: u64,
    /// Shares forwarded to a neighbour.
    pub shares_forwarded: u64,
    /// Shares that failed at or below this node.
    pub shares_failed: u64,
    /// Connections refused on the TLS listeners.
    pub handshakes_refused: u64,
    /// Audit records written.
    pub audit_records: u64,
    /// Operational records stored.
    pub operations: u64,
}

impl Totals {
    /// What happened since `earlier`, or `None` when nothing did (an idle node logs no summary).
    pub fn since(&self, earlier: &Totals) -> Option<Totals> {
        let d = |now: u64, then: u64| now.saturating_sub(then);
        let delta = Totals {
            shares_served: d(self.shares_served, earlier.shares_served),
            shares_forwarded: d(self.shares_forwarded, earlier.shares_forwarded),
            shares_failed: d(self.shares_failed, earlier.shares_failed),
            handshakes_refused: d(self.handshakes_refused, earlier.handshakes_refused),
            audit_records: d(self.audit_records, earlier.audit_records),
            operations: d(self.operations, earlier.operations),
        };
        (delta != Totals::default()).then_some(delta)
    }
}

impl NodeMetrics {
    /// The totals since the node started.
    pub fn totals(&self) -> Totals {
        Totals {
            shares_served: self.shares_served.get(),
            shares_forwarded: self.shares_forwarded.get(),
            shares_failed: self.shares_failed.get(),
            handshakes_refused: self.tls_handshakes_refused.get(),
            audit_records: self.audit_records_written.get(),
            operations: self.ops.stored.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_summary_counts_what_happened_since_the_last_and_an_idle_interval_has_none() {
        let m = super::NodeMetrics::default();
        let start = m.totals();
        assert_eq!(m.totals().since(&start), None);
        m.shares_served.inc_by(3);
        m.audit_records_written.inc();
        let delta = m.totals().since(&start).expect("something happened");
        assert_eq!(
            (
                delta.shares_served,
                delta.audit_records,
                delta.shares_failed
            ),
            (3, 1, 0)
        );
        let later = m.totals();
        assert_eq!(m.totals().since(&later), None);
    }

    use super::*;

    #[test]
    fn counters_and_stream_gauges_are_exposed_under_the_fedgate_prefix() {
        let m = NodeMetrics::new();
        NodeMetrics::add(&m.shares_served, 3);
        m.uplink_lag.get_or_create(&[("stream", "audit")]).set(7);
        let text = m.encode().unwrap_or_default();
        assert!(text.contains("fedgate_shares_served_total 3\n"), "{text}");
        assert!(
            text.contains("fedgate_uplink_lag{stream=\"audit\"} 7\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

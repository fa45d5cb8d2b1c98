//! The histograms of operational monitoring: time at this hop and at the next, per method, hop (what this node
//! did with the call), resource, consumer node and outcome, and the sizes of requests and responses per method.
//!
//! Label values are bounded so that no caller can mint series: the method is one of the services' methods
//! (an unknown one counts as "_unknown"); the resource and the consumer node are named only for calls answered
//! OK (the resource then is in the catalog and the consumer node was vouched for), at most
//! [`MAX_LABEL_VALUES`] of each, further ones counting as "_other"; the hop is one of three (see [`hop`]); the
//! outcome is one of the 17 gRPC codes.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use fedgate_proto::v1::OperationRecord;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Distinct resources (and distinct consumer nodes) named in labels at most.
pub const MAX_LABEL_VALUES: usize = 2000;

/// Labels of the time histograms: `method`, `hop`, `resource`, `consumer_node`, `outcome`.
pub type CallLabels = [(&'static str, String); 5];
/// Labels of the size histograms: `method`.
pub type MethodLabels = [(&'static str, String); 1];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 0.5 ms to about 33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

fn bytes() -> Histogram {
    // 64 B to 256 MiB.
    Histogram::new(exponential_buckets(64.0, 4.0, 12))
}

/// The operational metrics of one node.
#[derive(Debug)]
pub struct OpMetrics {
    /// Time from a request's arrival to the end of its response at this node, in seconds.
    pub duration: Histograms<CallLabels>,
    /// Time spent waiting for the next hop or provider, in seconds (calls that made one).
    pub next_hop: Histograms<CallLabels>,
    /// Bytes of request bodies received.
    pub request_bytes: Histograms<MethodLabels>,
    /// Bytes of response bodies sent.
    pub response_bytes: Histograms<MethodLabels>,
    /// Records dropped because the writer's buffer was full (or the node was stopping).
    pub dropped: Counter,
    /// Records stored.
    pub stored: Counter,
    /// Records lost because the store refused their batch.
    pub failed: Counter,
    resources: Mutex<HashSet<String>>,
    consumer_nodes: Mutex<HashSet<String>>,
}

impl Default for OpMetrics {
    fn default() -> Self {
        Self {
            duration: Family::new_with_constructor(seconds),
            next_hop: Family::new_with_constructor(seconds),
            request_bytes: Family::new_with_constructor(bytes),
            response_bytes: Family::new_with_constructor(bytes),
            dropped: Counter::default(),
            stored: Counter::default(),
            failed: Counter::default(),
            resources: Mutex::default(),
            consumer_nodes: Mutex::default(),
        }
    }
}

/// `value` if it may be a label value: already one, or a new one within the bound; else "_other".
fn bounded(seen: &Mutex<HashSet<String>>, value: &str) -> String {
    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
    if seen.contains(value) || (seen.len() < MAX_LABEL_VALUES && seen.insert(value.to_owned())) {
        value.to_owned()
    } else {
        "_other".to_owned()
    }
}

/// What this node did with a call, from its next hop: "forwarded" to a neighbour node, "provider" (called the
/// provider agency), or "answered" here without calling on (cache hits, local answers, refusals).
pub fn hop(next_hop: &str) -> &'static str {
    if next_hop.starts_with("urn:fedgate:node:") {
        "forwarded"
    } else if next_hop.starts_with("urn:fedgate:agency:") {
        "provider"
    } else {
        "answered"
    }
}

impl OpMetrics {
    /// Registers the metrics in `r` (under the registry's prefix).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "op_duration_seconds",
            "Time from a request's arrival to the end of its response at this node, by method, hop, resource, consumer node and outcome",
            self.duration.clone(),
        );
        r.register(
            "op_next_hop_seconds",
            "Time spent waiting for the next hop or the provider, by method, hop, resource, consumer node and outcome",
            self.next_hop.clone(),
        );
        r.register(
            "op_request_bytes",
            "Bytes of request bodies received, by method",
            self.request_bytes.clone(),
        );
        r.register(
            "op_response_bytes",
            "Bytes of response bodies sent, by method",
            self.response_bytes.clone(),
        );
        r.register(
            "op_records_dropped",
            "Operational records dropped because the writer's buffer was full",
            self.dropped.clone(),
        );
        r.register(
            "op_records_stored",
            "Operational records stored",
            self.stored.clone(),
        );
        r.register(
            "op_records_failed",
            "Operational records lost because the store refused their batch",
            self.failed.clone(),
        );
    }

    /// Counts one finished call.
    pub(super) fn observe(&self, r: &OperationRecord, at_hop: Duration, at_next: Option<Duration>) {
        let ok = r.code == tonic::Code::Ok as i32;
        let method = if r.code == tonic::Code::Unimplemented as i32 {
            "_unknown".to_owned()
        } else {
            r.method.clone()
        };
        let named = |seen: &Mutex<HashSet<String>>, v: &str| {
            if ok && !v.is_empty() {
                bounded(seen, v)
            } else {
                String::new()
            }
        };
        let labels: CallLabels = [
            ("method", method.clone()),
            ("hop", hop(&r.next_hop).to_owned()),
            ("resource", named(&self.resources, &r.resource_id)),
            (
                "consumer_node",
                named(&self.consumer_nodes, &r.consumer_node),
            ),
            ("outcome", super::code_name(r.code).to_owned()),
        ];
        self.duration
            .get_or_create(&labels)
            .observe(at_hop.as_secs_f64());
        if let Some(next) = at_next {
            self.next_hop
                .get_or_create(&labels)
                .observe(next.as_secs_f64());
        }
        let method: MethodLabels = [("method", method)];
        self.request_bytes
            .get_or_create(&method)
            .observe(r.request_bytes as f64);
        self.response_bytes
            .get_or_create(&method)
            .observe(r.response_bytes as f64);
    }
}

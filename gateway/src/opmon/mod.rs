//! Operational monitoring, after X-Road's op-monitoring: for every call a node handles, when the request came in
//! and went on to the next hop or provider, when the response came back and went out, their sizes, the peers,
//! the resource, consumer and mode the request names, and the outcome — never data values.
//!
//! [`OpMonLayer`] sits on the gRPC server stacks and times each fedgate call; the router notes the request's
//! envelope ([`note_envelope`]) and each call to the next hop or provider ([`next_hop`]) into the call it
//! serves. Finished records feed the histograms of [`OpMetrics`] and go through a bounded channel to a writer
//! that stores them in batches (a full channel drops the record and counts it; a call never waits) and purges
//! them after `[op_monitoring] retention_days`. Operators read them with `Operator.ListOperations`.

mod hook;
mod layer;
mod metrics;
mod query;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::OperationRecord;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::ident::DivisionCode;
use crate::metrics::NodeMetrics;
use crate::store::Store;

pub use hook::{next_hop, note_envelope};
pub use layer::{OpMon, OpMonLayer};
pub use metrics::OpMetrics;
pub use query::{code_name, list_operations, parse_code};

/// `[op_monitoring]`: whether operational records are kept, for how long, and how many may wait to be stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpMonitoringConfig {
    /// Whether records are stored; the histograms are kept either way.
    pub enabled: bool,
    /// Days records are kept before they are deleted (at least 1).
    pub retention_days: u32,
    /// Records kept at most; the oldest beyond are deleted (checked every minute).
    pub max_records: u64,
    /// Records waiting to be stored at most; past it new records are dropped and counted
    /// (`fedgate_op_records_dropped_total`).
    pub max_buffered: usize,
}

impl Default for OpMonitoringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            retention_days: 7,
            max_records: 10_000_000,
            max_buffered: 10_000,
        }
    }
}

/// The monitor of one node: where finished calls are counted and sent to be stored.
#[derive(Clone)]
pub struct OpMonitor {
    node: DivisionCode,
    records: Option<mpsc::Sender<OperationRecord>>,
    metrics: Arc<NodeMetrics>,
}

impl std::fmt::Debug for OpMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpMonitor")
            .field("node", &self.node)
            .field("enabled", &self.records.is_some())
            .finish_non_exhaustive()
    }
}

impl OpMonitor {
    /// The monitor of `node` and its writer task, which stores records into `store` until `shutdown`, then
    /// stores what is buffered and stops.
    pub fn start(
        config: &OpMonitoringConfig,
        node: DivisionCode,
        store: Arc<dyn Store>,
        metrics: Arc<NodeMetrics>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (records, writer) = if config.enabled {
            let (tx, rx) = mpsc::channel(config.max_buffered.max(1));
            let keep = writer::Keep {
                retention: Duration::from_secs(u64::from(config.retention_days.max(1)) * 86_400),
                max_records: config.max_records.max(1),
            };
            let task = tokio::spawn(writer::run(rx, store, metrics.clone(), keep, shutdown));
            (Some(tx), task)
        } else {
            (None, tokio::spawn(async {}))
        };
        (
            Self {
                node,
                records,
                metrics,
            },
            writer,
        )
    }

    /// The tower layer that times the calls of a server stack.
    pub fn layer(&self) -> OpMonLayer {
        OpMonLayer::new(self.clone())
    }

    /// Counts a finished call in the histograms and hands its record to the writer without waiting.
    fn finish(&self, record: OperationRecord, at_hop: Duration, at_next: Option<Duration>) {
        self.metrics.ops.observe(&record, at_hop, at_next);
        let Some(tx) = &self.records else {
            return;
        };
        if tx.try_send(record).is_err() {
            self.metrics.ops.dropped.inc();
        }
    }
}

/// Nanoseconds since the Unix epoch, now.
fn now_nanos() -> i64 {
    crate::audit::now_nanos()
}

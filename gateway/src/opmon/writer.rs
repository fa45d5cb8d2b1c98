//! Stores operational records in batches as they come, and once a minute deletes those past their retention
//! and the oldest beyond the cap.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::OperationRecord;
use tokio::sync::{mpsc, watch};

use crate::metrics::NodeMetrics;
use crate::store::Store;

/// Records stored in one statement at most.
const BATCH: usize = 256;
/// How often records past their retention or beyond the cap are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// How many records are kept: those of the last `retention`, at most `max_records`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Keep {
    pub(super) retention: Duration,
    pub(super) max_records: u64,
}

/// Stores what comes through `rx` until `shutdown`, then what is left in it.
pub(super) async fn run(
    mut rx: mpsc::Receiver<OperationRecord>,
    store: Arc<dyn Store>,
    metrics: Arc<NodeMetrics>,
    keep: Keep,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut purge = tokio::time::interval(PURGE_EVERY);
    purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => Some(n),
            _ = purge.tick() => None,
            _ = shutdown.wait_for(|s| *s) => Some(0),
        };
        match got {
            None => purge_old(store.as_ref(), keep).await,
            Some(0) => break,
            Some(_) => store_batch(store.as_ref(), &metrics, &mut batch).await,
        }
    }
    // Stopping (or every sender gone): what is buffered is stored, later records are dropped.
    rx.close();
    if !batch.is_empty() {
        store_batch(store.as_ref(), &metrics, &mut batch).await;
    }
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        store_batch(store.as_ref(), &metrics, &mut batch).await;
    }
}

async fn store_batch(store: &dyn Store, metrics: &NodeMetrics, batch: &mut Vec<OperationRecord>) {
    let n = batch.len() as u64;
    match store.ops_append(batch).await {
        Ok(()) => {
            metrics.ops.stored.inc_by(n);
        }
        Err(e) => {
            metrics.ops.failed.inc_by(n);
            tracing::warn!(error = %e, records = n, "operational records not stored");
        }
    }
    batch.clear();
}

async fn purge_old(store: &dyn Store, keep: Keep) {
    let retention = i64::try_from(keep.retention.as_nanos()).unwrap_or(i64::MAX);
    let before = super::now_nanos().saturating_sub(retention);
    match store.ops_purge(before).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            deleted = n,
            "operational records past their retention deleted"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "operational records past their retention not deleted")
        }
    }
    match store.ops_trim(keep.max_records).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            deleted = n,
            max_records = keep.max_records,
            "oldest operational records beyond the cap deleted"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "operational records beyond the cap not deleted")
        }
    }
}

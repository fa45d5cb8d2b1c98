//! A hop's audit record, written whatever becomes of the hop's caller.
//!
//! A hop's future is dropped when its caller goes away: the agency cancels or its deadline passes, the node
//! before it gives up, the link breaks, the node shuts down. The provider may have been called by then, so the
//! hop must still leave its record. Every hop holds its record in a [`HopRecord`] while it works; dropped before
//! it was written, the record is queued for the audit writer with the outcome `CANCELLED`. Once a hop writes its
//! record, the write runs as a task of its own, so a caller leaving during the write does not lose it either.

use fedgate_proto::v1::AuditRecord;
use tracing::Instrument;

use crate::audit::{self, AuditError, AuditLog};

/// What the record of a hop whose caller went away says happened.
const CANCELLED_DETAIL: &str =
    "cancelled before it was answered: the caller went away or the node stopped the call";

/// The audit record of one hop until it is written (see the module documentation).
pub(crate) struct HopRecord {
    audit: AuditLog,
    record: AuditRecord,
    armed: bool,
}

impl HopRecord {
    /// Holds `record` for a hop that starts now.
    pub(crate) fn new(audit: &AuditLog, record: AuditRecord) -> Self {
        Self {
            audit: audit.clone(),
            record,
            armed: true,
        }
    }

    /// The record, for the hop to fill in as it learns more (provider, grant, outcome).
    pub(crate) fn record(&mut self) -> &mut AuditRecord {
        &mut self.record
    }

    /// Writes the record and waits until it is durable.
    pub(crate) async fn write(mut self) -> Result<u64, AuditError> {
        self.armed = false;
        durably(&self.audit, std::mem::take(&mut self.record)).await
    }

    /// The hop ended without needing the record (a relay's `FORWARDED` record stands for it).
    pub(crate) fn discard(mut self) {
        self.armed = false;
    }
}

impl Drop for HopRecord {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut r = std::mem::take(&mut self.record);
        r.outcome = audit::outcome(tonic::Code::Cancelled);
        r.detail = if r.detail.is_empty() {
            CANCELLED_DETAIL.to_owned()
        } else {
            format!("{CANCELLED_DETAIL}; {}", r.detail)
        };
        r.time_unix_nanos = audit::now_nanos();
        tracing::debug!(request = %r.request_id, resource = %r.resource_id, "hop cancelled; recorded");
        self.audit.record_detached(r);
    }
}

/// Writes `record` and waits until it is durable, in a task of its own: the write completes even if the caller
/// stops waiting for it.
pub(crate) async fn durably(audit: &AuditLog, record: AuditRecord) -> Result<u64, AuditError> {
    let audit = audit.clone();
    let span = tracing::info_span!(
        "audit.commit",
        fedgate.operation = record.operation().as_str_name(),
        fedgate.outcome = %record.outcome,
        otel.status_code = tracing::field::Empty,
    );
    let recorded = span.clone();
    let written = tokio::spawn(async move { audit.record(record).await }.instrument(span))
        .await
        .unwrap_or(Err(AuditError::Stopped));
    if written.is_err() {
        recorded.record("otel.status_code", "error");
    }
    written
}

//! The audit trail: every operation that touches a node is recorded there, hash-chained, made durable before the
//! operation is answered, its chain head signed by the node's key per interval or per N records, and forwarded up
//! the tree by the uplink in signed prefixes.

pub mod archive;
mod chaining;
pub mod export;
#[cfg(test)]
mod tests;
pub mod verify;
mod writer;

use fedgate_proto::v1::{AuditOperation, AuditRecord};
use prost::Message;
use sha2::{Digest, Sha256};

pub use verify::{
    ChainSummary, ChainVerifier, StoreVerifyError, VerifyError, verify_live_store, verify_records,
    verify_store,
};

pub use writer::{AuditLog, ChildApplyError, RecoverError, SignPolicy};

/// Hash that precedes the first record of every chain.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// Why a record could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The store refused the batch.
    #[error("audit store failed: {0}")]
    Store(String),
    /// The writer has stopped (the node is shutting down).
    #[error("the audit writer has stopped")]
    Stopped,
}

/// SHA-256 of a record's encoding with `hash` and `signature` empty.
///
/// The record is encoded as it is, and the two fields' bytes are left out of what is hashed: proto3 omits empty
/// fields, so the rest is exactly the encoding of the record with both emptied (no copy of the record is made).
pub fn record_hash(record: &AuditRecord) -> [u8; 32] {
    let bytes = record.encode_to_vec();
    let mut h = Sha256::new();
    let mut start = 0;
    let mut at = 0;
    while at < bytes.len() {
        let Some((tag, end)) = field_end(&bytes, at) else {
            // Unreachable for bytes prost just wrote; hash what is left rather than panic.
            break;
        };
        if tag == HASH_FIELD || tag == SIGNATURE_FIELD {
            h.update(&bytes[start..at]);
            start = end;
        }
        at = end;
    }
    h.update(&bytes[start..]);
    h.finalize().into()
}

/// Field number of `AuditRecord.hash`.
const HASH_FIELD: u64 = 17;
/// Field number of `AuditRecord.signature`.
const SIGNATURE_FIELD: u64 = 18;

/// Reads a varint at `at`: its value and the position after it.
fn varint(bytes: &[u8], mut at: usize) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(at)?;
        at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some((v, at));
        }
    }
    None
}

/// The field number of the protobuf field that starts at `at`, and where it ends.
fn field_end(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let (key, at) = varint(bytes, at)?;
    let end = match key & 7 {
        0 => varint(bytes, at)?.1,
        1 => at.checked_add(8)?,
        2 => {
            let (len, at) = varint(bytes, at)?;
            at.checked_add(usize::try_from(len).ok()?)?
        }
        5 => at.checked_add(4)?,
        _ => return None,
    };
    (end <= bytes.len()).then_some((key >> 3, end))
}

/// SHA-256 of a response, recorded instead of the data itself.
pub fn digest(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// The outcome of a relaying node's record, written as it passes a request on (see `route::Router::dispatch`);
/// a relay that fails records the failure again under its gRPC code name.
pub const FORWARDED: &str = "FORWARDED";

/// The gRPC code name used as a record's outcome.
pub fn outcome(code: tonic::Code) -> String {
    code_name(code).to_owned()
}

/// The canonical name of a gRPC code (`PERMISSION_DENIED`), as records and span attributes spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A new record of `operation` by `actor`, stamped now; the writer fills node, sequence and hashes.
pub fn event(operation: AuditOperation, actor: impl Into<String>) -> AuditRecord {
    AuditRecord {
        operation: operation as i32,
        actor: actor.into(),
        time_unix_nanos: now_nanos(),
        outcome: "OK".to_owned(),
        ..Default::default()
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

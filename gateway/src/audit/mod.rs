//! The audit trail: every operation that touches a node is recorded there, hash-chained, signed per batch by the
//! node's key, made durable before the operation is answered, and forwarded up the tree by the uplink.

pub mod archive;
pub mod export;
pub mod verify;

use std::sync::Arc;

use fedgate_proto::v1::{AuditOperation, AuditRecord, Stream};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::grant::GrantKey;
use crate::ident::DivisionCode;
use crate::metrics::NodeMetrics;
use crate::store::{Store, StoreError};
use crate::uplink::Uplink;

pub use verify::{
    ChainSummary, ChainVerifier, StoreVerifyError, VerifyError, verify_records, verify_store,
};

/// Hash that precedes the first record of every chain.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Records written in one transaction at most.
const MAX_BATCH: usize = 8192;
/// Times the writer yields to let more callers join a batch before writing it.
const JOIN_ROUNDS: usize = 3;
/// Records waiting for the writer at most; callers wait beyond that.
const QUEUE: usize = 65_536;

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
pub fn record_hash(record: &AuditRecord) -> [u8; 32] {
    let mut r = record.clone();
    r.hash.clear();
    r.signature.clear();
    Sha256::digest(r.encode_to_vec()).into()
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
    .to_owned()
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

struct Pending {
    record: AuditRecord,
    done: Option<oneshot::Sender<Result<u64, AuditError>>>,
}

/// Handle to a node's audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    public_key: [u8; 32],
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("public_key", &hex::encode(self.public_key))
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Starts the writer of `node`'s chain, continuing from the chain head in `store`; a new chain opens with a
    /// record announcing the node's public key, carrying `endorsement` (the node's certificate-signed
    /// endorsement of that key) so every level above can check it.
    pub async fn start(
        node: DivisionCode,
        store: Arc<dyn Store>,
        (key, endorsement): (Arc<GrantKey>, Option<fedgate_proto::v1::SignedStatement>),
        uplink: Uplink,
        metrics: Arc<NodeMetrics>,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        let head = store.audit_head(node.as_str()).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let log = Self {
            tx,
            public_key: key.public_key(),
        };
        let fresh = head.is_none();
        let head = head.map_or((0, GENESIS_HASH.to_vec()), |h| (h.seq, h.hash));
        let writer = Writer {
            node,
            node_code: node.to_string(),
            scratch: Vec::new(),
            store: store.clone(),
            key,
            uplink,
            metrics,
            seq: head.0,
            prev: head.1,
        };
        let task = tokio::spawn(writer.run(rx));
        let own = store.node_key(node.as_str()).await?;
        let announce = |operation| {
            let mut r = event(operation, format!("urn:fedgate:node:{node}"));
            r.detail = hex::encode(log.public_key);
            r.key_endorsement = endorsement.clone();
            r
        };
        let first = if fresh {
            Some(announce(AuditOperation::ChainStart))
        } else if own.as_deref().is_some_and(|k| k != log.public_key) {
            // The node's key was replaced: the chain says so before anything is signed with the new key.
            tracing::warn!(%node, key = %hex::encode(log.public_key), "audit key rotated");
            Some(announce(AuditOperation::KeyRotation))
        } else {
            None
        };
        if let Some(record) = first {
            log.record(record).await.map_err(|e| StoreError::Corrupt {
                what: "audit chain start".into(),
                error: e.to_string(),
            })?;
        }
        if own.as_deref() != Some(log.public_key.as_slice()) {
            store
                .replace_node_key(node.as_str(), &log.public_key)
                .await?;
        }
        Ok((log, task))
    }

    /// This node's audit public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// Writes a record and waits until it is durable; returns its sequence number.
    pub async fn record(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                record,
                done: Some(done),
            })
            .await
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// Queues a record without waiting (for callers that cannot wait, such as the TLS acceptor).
    pub fn record_detached(&self, record: AuditRecord) {
        if let Err(e) = self.tx.try_send(Pending { record, done: None }) {
            tracing::error!(error = %e, "audit queue full; record written synchronously later");
            let tx = self.tx.clone();
            if let mpsc::error::TrySendError::Full(p) = e {
                tokio::spawn(async move {
                    let _ = tx.send(p).await;
                });
            }
        }
    }
}

struct Writer {
    node: DivisionCode,
    /// `node` as text, copied into every record.
    node_code: String,
    /// Scratch buffer for the encoding that is hashed.
    scratch: Vec<u8>,
    store: Arc<dyn Store>,
    key: Arc<GrantKey>,
    uplink: Uplink,
    metrics: Arc<NodeMetrics>,
    seq: u64,
    prev: Vec<u8>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            // Let callers that are already runnable (typically those just answered) join this batch, as long as
            // they keep coming.
            for _ in 0..JOIN_ROUNDS {
                tokio::task::yield_now().await;
                let before = batch.len();
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                if batch.len() == before {
                    break;
                }
            }
            self.write(&mut batch).await;
            batch.clear();
        }
    }

    async fn write(&mut self, batch: &mut [Pending]) {
        let (seq, prev) = (self.seq, self.prev.clone());
        let mut records: Vec<AuditRecord> = Vec::with_capacity(batch.len());
        for p in batch.iter_mut() {
            let mut r = std::mem::take(&mut p.record);
            // No record may outgrow an upward batch, whatever its caller put in it.
            crate::limits::bound_record(&mut r);
            self.seq += 1;
            r.node_code.clone_from(&self.node_code);
            r.seq = self.seq;
            r.prev_hash = std::mem::take(&mut self.prev);
            r.hash.clear();
            r.signature.clear();
            self.scratch.clear();
            // Encoding into a Vec cannot run out of room; the fallback only keeps this free of panics.
            let hash = match r.encode(&mut self.scratch) {
                Ok(()) => Sha256::digest(&self.scratch).to_vec(),
                Err(_) => record_hash(&r).to_vec(),
            };
            self.prev.clone_from(&hash);
            r.hash = hash;
            records.push(r);
        }
        if let Some(last) = records.last_mut() {
            last.signature = self
                .key
                .sign_bytes(crate::grant::Domain::AuditBatch, &last.hash)
                .to_vec();
        }
        let started = std::time::Instant::now();
        let result = self.store.audit_append(&records).await;
        match result {
            Ok(()) => {
                self.metrics
                    .audit_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .audit_batch_records
                    .observe(records.len() as f64);
                NodeMetrics::add(&self.metrics.audit_records_written, records.len() as u64);
                self.uplink.wake(Stream::Audit);
                for (p, r) in batch.iter_mut().zip(&records) {
                    if let Some(done) = p.done.take() {
                        let _ = done.send(Ok(r.seq));
                    }
                }
            }
            Err(e) => {
                tracing::error!(node = %self.node, error = %e, "audit batch not written");
                NodeMetrics::add(&self.metrics.audit_batches_failed, 1);
                self.seq = seq;
                self.prev = prev;
                for p in batch.iter_mut() {
                    if let Some(done) = p.done.take() {
                        let _ = done.send(Err(AuditError::Store(e.to_string())));
                    }
                }
            }
        }
    }
}

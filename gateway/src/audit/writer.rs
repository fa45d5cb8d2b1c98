//! The audit writer: one task per node that chains records, commits them in groups, signs the chain head per
//! interval or per N records, and applies children's forwarded records in the same order as its own.
//!
//! A record is durable before its caller is answered; the signature that covers it may follow up to
//! [`SignPolicy::every`] later (the records between two signatures are covered through the hash chain). Only a
//! chain's head can be unsigned, and the uplink ships only signed prefixes, so no record leaves the node before a
//! signature covers it. Before a child's batch is stored, the node's own head is signed, so a run of unsigned own
//! records never has another chain's records inside it: the outbox can be cut wherever every chain is signed.
//!
//! The store's head is the truth. The writer keeps the head in memory to chain each batch without a read, and
//! re-reads it after any failed commit or signature (a commit reported failed may have committed). When a batch
//! finds its sequence numbers taken ([`StoreError::HeadConflict`]: another writer of the same node on the same
//! database, or a recovery that re-chained this node's records), it is chained again after the head read under
//! the chain's write lock and stored in the same transaction, so writers that share a chain interleave without
//! error; a chain is started (CHAIN_START) only by the writer that finds it empty.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::{AuditOperation, AuditRecord, Stream};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::chaining::{chain, rechained, starts_kept, starts_once};
use super::{AuditError, GENESIS_HASH, event};
use crate::grant::{Domain, GrantKey};
use crate::ident::DivisionCode;
use crate::metrics::NodeMetrics;
use crate::store::{AuditRecovery, Recovered, Store, StoreError};
use crate::uplink::Uplink;

/// Records written in one transaction at most.
const MAX_BATCH: usize = 8192;
/// Times the writer yields to let more callers join a batch before writing it.
const JOIN_ROUNDS: usize = 3;
/// Records waiting for the writer at most; callers wait beyond that.
const QUEUE: usize = 65_536;
/// How long after a head conflict the writer chains every batch after the head read under the chain's lock (another
/// writer is likely still active) instead of after the head it remembers.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

/// When the writer signs its chain head: whichever limit is reached first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignPolicy {
    /// Longest a written record waits for a signature (and so for being shipped upward).
    pub every: Duration,
    /// Most records between two signatures.
    pub records: u64,
    /// Most encoded bytes of records between two signatures.
    pub bytes: usize,
}

impl Default for SignPolicy {
    fn default() -> Self {
        Self {
            every: Duration::from_millis(100),
            records: 256,
            bytes: 256 * 1024,
        }
    }
}

/// Why a child's forwarded records could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ChildApplyError {
    /// The store refused them (a gap in the child's stream among other things).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer has stopped (the node is shutting down).
    #[error("the audit writer has stopped")]
    Stopped,
}

/// Why a recovery of this node's chain could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The store refused it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer has stopped (the node is shutting down).
    #[error("the audit writer has stopped")]
    Stopped,
}

struct Pending {
    record: AuditRecord,
    done: Option<oneshot::Sender<Result<u64, AuditError>>>,
}

/// A child's checked records (`None`: one this node already holds), to be stored after this node's own head is
/// signed.
struct ChildBatch {
    child: String,
    items: Vec<(u64, Option<AuditRecord>)>,
    done: oneshot::Sender<Result<u64, ChildApplyError>>,
}

/// A recovery of this node's chain, applied between two batches.
struct RecoverJob {
    plan: AuditRecovery,
    done: oneshot::Sender<Result<Recovered, RecoverError>>,
}

// Records are nearly every job: boxing them would add an allocation per record to save nothing.
#[allow(clippy::large_enum_variant)]
enum Job {
    Record(Pending),
    Child(ChildBatch),
    Recover(RecoverJob),
}

/// Handle to a node's audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
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
    /// Starts the writer of `node`'s chain with the default [`SignPolicy`]; see [`AuditLog::start_with`].
    pub async fn start(
        node: DivisionCode,
        store: Arc<dyn Store>,
        key: (Arc<GrantKey>, Option<fedgate_proto::v1::SignedStatement>),
        uplink: Uplink,
        metrics: Arc<NodeMetrics>,
    ) -> Result<(Self, JoinHandle<()>), StoreError> {
        Self::start_with(SignPolicy::default(), node, store, key, uplink, metrics).await
    }

    /// Starts the writer of `node`'s chain, continuing from the chain head in `store` (signing it first if a
    /// stop cut it short before its signature); a new chain opens with a record announcing the node's public key,
    /// carrying `endorsement` (the node's certificate-signed endorsement of that key) so every level above can
    /// check it.
    pub async fn start_with(
        policy: SignPolicy,
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
        let own = store.node_key(node.as_str()).await?;
        let (seq, prev) = head
            .as_ref()
            .map_or((0, GENESIS_HASH.to_vec()), |h| (h.seq, h.hash.clone()));
        let mut writer = Writer {
            node,
            node_code: node.to_string(),
            scratch: Vec::new(),
            store: store.clone(),
            key,
            uplink,
            metrics,
            policy,
            seq,
            prev,
            open: Open::default(),
            stale: false,
            contended: None,
        };
        if let Some(h) = head.filter(|h| h.signature.is_empty()) {
            // Stopped (or killed) between a commit and the signature that would have covered it.
            if own.as_deref().is_none_or(|k| k == log.public_key) {
                // The key that wrote the tail signs it, before anything else is written.
                writer.open.head = Some(h);
                writer.seal().await?;
            }
            // Otherwise the key that wrote it is gone: the KEY_ROTATION record written next, endorsed by the
            // node's certificate, is signed with the new key and covers the tail through the chain.
        }
        let task = tokio::spawn(writer.run(rx));
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
            .send(Job::Record(Pending {
                record,
                done: Some(done),
            }))
            .await
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }

    /// Queues a record without waiting (for callers that cannot wait, such as the TLS acceptor).
    pub fn record_detached(&self, record: AuditRecord) {
        if let Err(e) = self
            .tx
            .try_send(Job::Record(Pending { record, done: None }))
        {
            tracing::error!(error = %e, "audit queue full; record written synchronously later");
            let tx = self.tx.clone();
            if let mpsc::error::TrySendError::Full(p) = e {
                tokio::spawn(async move {
                    let _ = tx.send(p).await;
                });
            }
        }
    }

    /// Stores a child's checked records above its cursor (see [`Store::apply_child_audit`]; `None` for a record
    /// this node already holds) after signing this node's own unsigned head, if any; returns the child's new
    /// cursor.
    pub async fn apply_child(
        &self,
        child: &str,
        items: Vec<(u64, Option<AuditRecord>)>,
    ) -> Result<u64, ChildApplyError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Child(ChildBatch {
                child: child.to_owned(),
                items,
                done,
            }))
            .await
            .map_err(|_| ChildApplyError::Stopped)?;
        wait.await.map_err(|_| ChildApplyError::Stopped)?
    }

    /// Applies a recovery of this node's chain and stream (see [`Store::recover_audit`]) between two batches,
    /// re-chaining and re-signing this node's records after the ones taken back with this node's key; the writer
    /// continues after the recovered head.
    pub async fn recover(&self, plan: AuditRecovery) -> Result<Recovered, RecoverError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Recover(RecoverJob { plan, done }))
            .await
            .map_err(|_| RecoverError::Stopped)?;
        wait.await.map_err(|_| RecoverError::Stopped)?
    }
}

/// The unsigned run at the head of the chain.
#[derive(Default)]
struct Open {
    /// Its last record, as stored (without a signature); `None` when the head is signed.
    head: Option<AuditRecord>,
    /// Its records.
    records: u64,
    /// Their encoded bytes.
    bytes: usize,
    /// When it must be signed at the latest.
    due: Option<Instant>,
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
    policy: SignPolicy,
    seq: u64,
    prev: Vec<u8>,
    open: Open,
    /// A commit or signature failed: `seq`, `prev` and `open` may not be the store's, which is read again first.
    stale: bool,
    /// When a batch last found its sequence numbers taken.
    contended: Option<Instant>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        loop {
            let due = self.open.due;
            let received = tokio::select! {
                biased;
                n = rx.recv_many(&mut jobs, MAX_BATCH) => n,
                () = sleep_until(due), if due.is_some() => {
                    let _ = self.seal().await;
                    continue;
                }
            };
            if received == 0 {
                break;
            }
            // Let callers that are already runnable (typically those just answered) join this batch, as long as
            // they keep coming.
            for _ in 0..JOIN_ROUNDS {
                tokio::task::yield_now().await;
                let before = jobs.len();
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                if jobs.len() == before {
                    break;
                }
            }
            self.process(&mut jobs).await;
        }
        // Shutting down: sign what is not signed yet, so the chain ends with a signature.
        if self.seal().await.is_err() {
            tracing::error!(node = %self.node, "audit chain tail left unsigned at shutdown; signed at the next start");
        }
    }

    /// Writes the jobs in order: consecutive records as one batch, each child's records after this node's head is
    /// signed.
    async fn process(&mut self, jobs: &mut Vec<Job>) {
        let mut batch: Vec<Pending> = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            match job {
                Job::Record(p) => batch.push(p),
                Job::Child(c) => {
                    if !batch.is_empty() {
                        self.write(&mut batch, true).await;
                        batch.clear();
                    }
                    let result = match self.seal().await {
                        Ok(()) => self
                            .store
                            .apply_child_audit(&c.child, &c.items)
                            .await
                            .map_err(ChildApplyError::from),
                        Err(e) => Err(e.into()),
                    };
                    let _ = c.done.send(result);
                }
                Job::Recover(r) => {
                    if !batch.is_empty() {
                        self.write(&mut batch, true).await;
                        batch.clear();
                    }
                    let result = self.recover(&r.plan).await;
                    let _ = r.done.send(result);
                }
            }
        }
        if !batch.is_empty() {
            self.write(&mut batch, false).await;
        }
    }

    /// Reads the chain head from the store (after a failure, or once the chain moved on under this writer) and
    /// continues from it: an unsigned head is signed within the interval, whoever wrote it.
    async fn reload(&mut self) -> Result<(), StoreError> {
        let head = self.store.audit_head(&self.node_code).await?;
        (self.seq, self.prev) = head
            .as_ref()
            .map_or((0, GENESIS_HASH.to_vec()), |h| (h.seq, h.hash.clone()));
        self.open = match head {
            Some(h) if h.signature.is_empty() => Open {
                head: Some(h),
                records: 1,
                bytes: 0,
                due: Some(Instant::now() + self.policy.every),
            },
            _ => Open::default(),
        };
        self.stale = false;
        Ok(())
    }

    /// Signs the unsigned head, if there is one, and stores the signature.
    async fn seal(&mut self) -> Result<(), StoreError> {
        if self.stale {
            self.reload().await?;
        }
        // A second attempt signs the head read again, when the first found its record replaced.
        for _ in 0..2 {
            let Some(mut head) = self.open.head.take() else {
                self.open = Open::default();
                return Ok(());
            };
            head.signature = self.key.sign_bytes(Domain::AuditBatch, &head.hash).to_vec();
            match self.store.audit_seal(&head).await {
                Ok(()) => {
                    self.open = Open::default();
                    self.uplink.wake(Stream::Audit);
                    return Ok(());
                }
                Err(StoreError::HeadConflict { .. }) => {
                    // Another record holds its place now (a recovery re-chained it): sign what the store holds.
                    NodeMetrics::add(&self.metrics.audit_head_conflicts, 1);
                    tracing::warn!(node = %self.node, seq = head.seq, "audit chain head moved on under this writer");
                    self.reload().await?;
                }
                Err(e) => {
                    tracing::error!(node = %self.node, seq = head.seq, error = %e, "audit chain head not signed; retrying");
                    head.signature.clear();
                    self.open.head = Some(head);
                    self.open.due = Some(Instant::now() + self.policy.every);
                    self.stale = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Applies a recovery: this node's records after those taken back are re-chained and re-signed with this
    /// writer's key; the writer then continues from the store's head.
    async fn recover(&mut self, plan: &AuditRecovery) -> Result<Recovered, RecoverError> {
        if let Err(e) = self.seal().await {
            tracing::warn!(node = %self.node, error = %e, "audit head not signed before a recovery; it is re-chained");
        }
        let key = self.key.clone();
        let node = self.node_code.clone();
        let rechain = move |old: &[AuditRecord], after: (u64, &[u8]), last: bool| {
            rechained(&node, old, after, &key, last)
        };
        let result = self.store.recover_audit(plan, &rechain).await;
        if let Err(e) = self.reload().await {
            tracing::error!(node = %self.node, error = %e, "audit head not read after a recovery");
            self.stale = true;
        }
        Ok(result?)
    }

    /// Chains, commits and answers one batch; signs its last record when `sign` or when the policy says so.
    async fn write(&mut self, batch: &mut [Pending], sign: bool) {
        if self.stale
            && let Err(e) = self.reload().await
        {
            tracing::error!(node = %self.node, error = %e, "audit head not read; batch refused");
            NodeMetrics::add(&self.metrics.audit_batches_failed, 1);
            answer_failed(batch, &e);
            return;
        }
        let mut records: Vec<AuditRecord> = Vec::with_capacity(batch.len());
        for p in batch.iter_mut() {
            let mut r = std::mem::take(&mut p.record);
            // No record may outgrow an upward batch, whatever its caller put in it.
            crate::limits::bound_record(&mut r);
            records.push(r);
        }
        let policy = self.policy;
        let (open_records, open_bytes, open_due) =
            (self.open.records, self.open.bytes, self.open.due);
        let signs = move |n: usize, bytes: usize| {
            sign || open_records + n as u64 >= policy.records
                || open_bytes + bytes >= policy.bytes
                || open_due.is_some_and(|d| d <= Instant::now())
        };
        let started = std::time::Instant::now();
        let contended = self
            .contended
            .is_some_and(|at| at.elapsed() < CONTENDED_FOR);
        // Which records of the batch are written (a CHAIN_START that finds the chain started is not).
        let mut kept = starts_once(&mut records, self.seq);
        let mut written = false;
        let mut bytes = 0;
        if !contended {
            bytes = chain(
                &self.node_code,
                &mut records,
                (self.seq, &self.prev),
                &mut self.scratch,
            );
            if signs(records.len(), bytes)
                && let Some(last) = records.last_mut()
            {
                last.signature = self.key.sign_bytes(Domain::AuditBatch, &last.hash).to_vec();
            }
            match self.store.audit_append(&records).await {
                Ok(()) => written = true,
                Err(StoreError::HeadConflict { .. }) => {
                    NodeMetrics::add(&self.metrics.audit_head_conflicts, 1);
                    tracing::debug!(node = %self.node, seq = self.seq + 1,
                        "audit chain moved on under this writer; chaining after the stored head");
                    self.contended = Some(Instant::now());
                }
                Err(e) => return self.failed(batch, &e),
            }
        }
        if !written {
            // After the head read under the chain's write lock: no other writer comes between.
            let (key, node) = (self.key.clone(), self.node_code.clone());
            let originals = &records;
            let at_head = move |head: Option<&AuditRecord>| {
                let after = head.map_or((0, GENESIS_HASH.to_vec()), |h| (h.seq, h.hash.clone()));
                let mut chained = originals.clone();
                starts_once(&mut chained, after.0);
                let bytes = chain(&node, &mut chained, (after.0, &after.1), &mut Vec::new());
                if signs(chained.len(), bytes)
                    && let Some(last) = chained.last_mut()
                {
                    last.signature = key.sign_bytes(Domain::AuditBatch, &last.hash).to_vec();
                }
                chained
            };
            match self
                .store
                .audit_append_at_head(&self.node_code, &at_head)
                .await
            {
                Ok(chained) => {
                    let after = chained.first().map_or(1, |r| r.seq - 1);
                    let mut again = starts_kept(&records, after).into_iter();
                    for k in kept.iter_mut().filter(|k| **k) {
                        *k = again.next().unwrap_or(false);
                    }
                    bytes = chained.iter().map(Message::encoded_len).sum();
                    records = chained;
                }
                Err(e) => return self.failed(batch, &e),
            }
        }
        self.metrics
            .audit_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .audit_batch_records
            .observe(records.len() as f64);
        NodeMetrics::add(&self.metrics.audit_records_written, records.len() as u64);
        let mut stored = records.iter();
        for (p, keep) in batch.iter_mut().zip(&kept) {
            // A CHAIN_START that found the chain started is answered with the chain's first record.
            let seq = if *keep {
                stored.next().map_or(1, |r| r.seq)
            } else {
                1
            };
            if let Some(done) = p.done.take() {
                let _ = done.send(Ok(seq));
            }
        }
        let Some(last) = records.pop() else { return };
        self.seq = last.seq;
        self.prev.clone_from(&last.hash);
        if !last.signature.is_empty() {
            self.open = Open::default();
            self.uplink.wake(Stream::Audit);
        } else {
            self.open.records += records.len() as u64 + 1;
            self.open.bytes += bytes;
            self.open.head = Some(last);
            self.open
                .due
                .get_or_insert_with(|| Instant::now() + self.policy.every);
        }
    }

    /// A batch the store refused: its callers get the error, and the head is read again before the next one.
    fn failed(&mut self, batch: &mut [Pending], e: &StoreError) {
        tracing::error!(node = %self.node, error = %e, "audit batch not written");
        NodeMetrics::add(&self.metrics.audit_batches_failed, 1);
        self.stale = true;
        answer_failed(batch, e);
    }
}

/// Answers every caller of `batch` with the store's error.
fn answer_failed(batch: &mut [Pending], e: &StoreError) {
    for p in batch.iter_mut() {
        if let Some(done) = p.done.take() {
            let _ = done.send(Err(AuditError::Store(e.to_string())));
        }
    }
}

/// Sleeps until `due` (never called without one).
async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

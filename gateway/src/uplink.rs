//! One mechanism for everything that flows up: each stream's durable outbox is shipped to the parent in
//! acknowledged batches, resumed from the parent's cursor after any outage, and applied idempotently there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::{
    AuditRecord, CatalogChange, JoinRequest, PushRequest, Stream, StreamItem, stream_item,
};
use prost::Message;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::ident::DivisionCode;
use crate::ship::{
    self, Backoff, BatchSize, CallFailed, LEASE_TTL, MIN_BATCH_BYTES as MIN_PUSH_BYTES, hold_lease,
    replica_id, too_large,
};
use crate::store::{OutboxItem, Store, StoreError};
use crate::topology::Neighbour;

mod recover;

pub use recover::Recovery;

/// Items shipped in one push.
const BATCH: u32 = 512;
/// Items of one audit push at most, when a chain runs longer than [`BATCH`] without a signature (the parent's
/// limit per push).
const MAX_AUDIT_PUSH: u32 = 4096;
/// Least time between the starts of two audit pushes that are not full.
const SHIP_EVERY: Duration = Duration::from_millis(100);
/// Bytes of a push request around its items.
const PUSH_OVERHEAD: usize = 16;
/// Deadline of each call to the parent unless configured (`[routing] uplink_call_timeout_ms`).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stream with nothing to ship waits before it joins again: a parent that restarted from an older
/// state (restored, or its last commits lost) is then noticed, and given again what it lost, even when nothing
/// new comes to ship.
const IDLE_REJOIN: Duration = Duration::from_secs(30);

/// Progress of one upward stream, readable while it runs.
#[derive(Debug, Default)]
pub struct StreamStatus {
    /// Highest sequence number the parent has acknowledged.
    pub acked: AtomicU64,
    /// Whether the link to the parent is currently up.
    pub connected: AtomicBool,
    /// Whether this process holds the stream's lease (of the replicas sharing a store, one ships each stream).
    pub leased: AtomicBool,
}

/// A snapshot of one upward stream, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamProgress {
    /// Highest position written to the stream.
    pub head: u64,
    /// Highest position the parent acknowledged.
    pub acked: u64,
    /// Whether the link to the parent is up.
    pub connected: bool,
    /// Whether this process ships the stream (holds its lease).
    pub shipping: bool,
}

impl StreamProgress {
    /// Positions written but not yet acknowledged: the forwarding lag.
    pub fn lag(&self) -> u64 {
        self.head.saturating_sub(self.acked)
    }
}

/// The upward side of a node: one shipper task per stream, woken when the outbox grows.
#[derive(Debug, Clone)]
pub struct Uplink {
    wake: Arc<[Notify; 2]>,
    status: Arc<[StreamStatus; 2]>,
    key: Arc<std::sync::OnceLock<([u8; 32], Option<fedgate_proto::v1::SignedStatement>)>>,
    max_push_bytes: usize,
    ship_every: Duration,
    /// Who this process is among the replicas sharing the store, as named in the leases it takes.
    replica: Arc<str>,
    call_timeout: Duration,
}

impl Default for Uplink {
    fn default() -> Self {
        Self::new()
    }
}

fn slot(stream: Stream) -> usize {
    match stream {
        Stream::Audit => 1,
        _ => 0,
    }
}

/// Why one session with the parent ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("parent call failed: {0}")]
    Call(#[from] tonic::Status),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored outbox item {seq} is corrupt: {error}")]
    Corrupt { seq: u64, error: String },
    #[error("parent applied up to {applied} of a batch ending at {sent}")]
    Behind { applied: u64, sent: u64 },
    #[error("this replica lost the stream's lease: {0}")]
    LeaseLost(String),
    #[error("parent did not answer {call} within {after:?}")]
    Stalled { call: &'static str, after: Duration },
    #[error("parent refuses item {seq} ({bytes} bytes) alone as too large: {status}")]
    TooLarge {
        seq: u64,
        bytes: usize,
        status: tonic::Status,
    },
}

/// The leading items that fit in `budget` encoded bytes (always at least one), and their size.
fn fit(items: &mut Vec<StreamItem>, budget: usize) -> usize {
    let (keep, total) = fit_len(items, budget);
    items.truncate(keep);
    total
}

/// How many leading items fit in `budget` encoded bytes (at least one, if there is one).
fn fit_count(items: &[StreamItem], budget: usize) -> usize {
    fit_len(items, budget).0
}

fn fit_len(items: &[StreamItem], budget: usize) -> (usize, usize) {
    ship::fit_len(items, budget, PUSH_OVERHEAD)
}

impl From<CallFailed> for SessionError {
    fn from(e: CallFailed) -> Self {
        match e {
            CallFailed::Status(s) => SessionError::Call(s),
            CallFailed::Stalled { call, after } => SessionError::Stalled { call, after },
        }
    }
}

impl Uplink {
    /// An uplink with nothing running yet.
    pub fn new() -> Self {
        Self {
            wake: Arc::new([Notify::new(), Notify::new()]),
            status: Arc::new([StreamStatus::default(), StreamStatus::default()]),
            key: Arc::new(std::sync::OnceLock::new()),
            max_push_bytes: 3 * 1024 * 1024,
            ship_every: SHIP_EVERY,
            replica: Arc::from(replica_id()),
            call_timeout: CALL_TIMEOUT,
        }
    }

    /// An uplink whose calls to the parent each fail after `timeout` without an answer (the session is then
    /// dropped and started again on a new connection).
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Runs one call to the parent under the call deadline, which the parent is told too (`grpc-timeout`).
    async fn call<Req, Resp, F, Fut>(
        &self,
        name: &'static str,
        body: Req,
        call: F,
    ) -> Result<Resp, SessionError>
    where
        F: FnOnce(tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        Ok(ship::call_with_deadline(name, self.call_timeout, body, call).await?)
    }

    /// Who this process is among the replicas of its node, as its leases name it.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// An uplink whose audit pushes that are not full start at most once per `every`.
    pub fn with_ship_every(mut self, every: Duration) -> Self {
        self.ship_every = every;
        self
    }

    /// An uplink whose pushes carry at most `bytes` encoded bytes (under the parent's message limit).
    pub fn with_max_push_bytes(mut self, bytes: usize) -> Self {
        self.max_push_bytes = bytes.max(MIN_PUSH_BYTES);
        self
    }

    /// Sets the audit public key this node announces when it joins its parent, with the node's
    /// certificate-signed endorsement of it.
    pub fn set_audit_key(
        &self,
        key: [u8; 32],
        endorsement: Option<fedgate_proto::v1::SignedStatement>,
    ) {
        let _ = self.key.set((key, endorsement));
    }

    /// Tells the shipper of `stream` that its outbox grew.
    pub fn wake(&self, stream: Stream) {
        self.wake[slot(stream)].notify_one();
    }

    /// Progress of `stream`.
    pub fn status(&self, stream: Stream) -> &StreamStatus {
        &self.status[slot(stream)]
    }

    /// Where `stream` stands now: its outbox head in `store`, what the parent acknowledged, whether the link is up.
    pub async fn progress(
        &self,
        stream: Stream,
        store: &dyn Store,
    ) -> Result<StreamProgress, StoreError> {
        let status = self.status(stream);
        let shipping = status.leased.load(Ordering::Relaxed);
        Ok(StreamProgress {
            head: store.outbox_head(stream).await?,
            // Another replica ships it: what it last recorded.
            acked: if shipping {
                status.acked.load(Ordering::Relaxed)
            } else {
                store.uplink_acked(stream).await?
            },
            connected: status.connected.load(Ordering::Relaxed),
            shipping,
        })
    }

    /// Ships `stream` to `parent` until `shutdown` turns true, while this process holds the stream's lease (so that
    /// of several replicas sharing the store one ships it at a time, and another takes over when it dies),
    /// recovering at each Join what this node lost of what it had forwarded (see [`Recovery`]).
    pub async fn run(
        self,
        stream: Stream,
        me: DivisionCode,
        parent: Neighbour,
        store: Arc<dyn Store>,
        recovery: Recovery,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::default();
        let mut size = BatchSize {
            items: BATCH,
            bytes: self.max_push_bytes,
        };
        let lease = match stream {
            Stream::Audit => "uplink:audit",
            _ => "uplink:catalog",
        };
        let status = self.status(stream);
        let mut channel = parent.channel();
        let mut generation = parent.generation();
        let mut idled = false;
        loop {
            if parent.generation() != generation {
                // A certificate reload renewed the parent's channel: the next session uses new connections.
                generation = parent.generation();
                channel = parent.channel();
            }
            match store.take_lease(lease, &self.replica, LEASE_TTL).await {
                Ok(true) => {
                    if !status.leased.swap(true, Ordering::Relaxed) {
                        tracing::info!(stream = stream.as_str_name(), replica = %self.replica, "shipping this stream");
                    }
                }
                Ok(false) => {
                    // Another replica ships it: look again when its lease could have run out.
                    status.leased.store(false, Ordering::Relaxed);
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(LEASE_TTL / 3) => continue,
                    }
                }
                Err(e) => {
                    status.leased.store(false, Ordering::Relaxed);
                    tracing::warn!(stream = stream.as_str_name(), error = %e, "uplink lease not taken");
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(backoff.failed()) => continue,
                    }
                }
            }
            let session = self.session(
                stream,
                me,
                (&parent, FederationClient::new(channel.clone())),
                (&store, &recovery),
                (&mut backoff, &mut size),
                idled,
            );
            let outcome = tokio::select! {
                _ = shutdown.changed() => {
                    status.leased.store(false, Ordering::Relaxed);
                    let _ = store.release_lease(lease, &self.replica).await;
                    return;
                }
                res = session => res,
                lost = hold_lease(store.as_ref(), lease, &self.replica) => Err(SessionError::LeaseLost(lost)),
            };
            status.connected.store(false, Ordering::Relaxed);
            // A session that ended idle is joined again quietly; the first join and one after a failure are news.
            idled = outcome.is_ok();
            if outcome.is_ok() {
                // Idle for a while: join again at once.
                continue;
            }
            if let Err(e) = &outcome {
                tracing::warn!(stream = stream.as_str_name(), parent = %parent.code, error = %e,
                    "uplink interrupted; retrying in {:?}", backoff.wait);
                // Another replica whose link works may take the stream meanwhile.
                status.leased.store(false, Ordering::Relaxed);
                let _ = store.release_lease(lease, &self.replica).await;
            }
            if let Err(SessionError::Stalled { .. }) = outcome {
                // The connection may be the part that stopped answering: the next session opens another.
                channel = parent.fresh_channel();
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(backoff.failed()) => {}
            }
            // A link that drops before a batch is acknowledged loses the parent's work on it: ship less next time.
            size.interrupted();
        }
    }

    async fn session(
        &self,
        stream: Stream,
        me: DivisionCode,
        (parent, mut client): (&Neighbour, FederationClient<tonic::transport::Channel>),
        (store, recovery): (&Arc<dyn Store>, &Recovery),
        (backoff, size): (&mut Backoff, &mut BatchSize),
        quiet: bool,
    ) -> Result<(), SessionError> {
        let join = JoinRequest {
            node_code: me.to_string(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            audit_public_key: self.key.get().map(|k| k.0.to_vec()).unwrap_or_default(),
            key_endorsement: self.key.get().and_then(|k| k.1.clone()),
        };
        let generation = parent.generation();
        let join = self.call("Join", join, |req| client.join(req)).await?;
        // The parent's cursor, once this node's stream agrees with what the parent holds of it.
        let mut acked = recover::reconcile(
            stream,
            me,
            parent,
            &mut client,
            &join,
            store.as_ref(),
            recovery,
        )
        .await?;
        let status = self.status(stream);
        status.acked.store(acked, Ordering::Relaxed);
        status.connected.store(true, Ordering::Relaxed);
        store.set_uplink_acked(stream, acked).await?;
        if quiet {
            tracing::debug!(stream = stream.as_str_name(), parent = %parent.code, acked, "uplink joined again after idling");
        } else {
            tracing::info!(stream = stream.as_str_name(), parent = %parent.code, acked, "uplink joined");
        }
        // When the last audit push started, if it was not full.
        let mut last_push: Option<tokio::time::Instant> = None;
        loop {
            if parent.generation() != generation {
                // The channel was renewed after a certificate reload: join again on the new one.
                return Ok(());
            }
            let items = match stream {
                Stream::Audit => {
                    // Fewer, fuller pushes: after one that was not full, the next waits for the interval.
                    if let Some(at) = last_push {
                        tokio::time::sleep_until(at + self.ship_every).await;
                    }
                    signed_prefix(store.as_ref(), acked, size).await?
                }
                _ => {
                    let items = store.outbox_after(stream, acked, size.items).await?;
                    let mut items: Vec<StreamItem> = items
                        .into_iter()
                        .map(|i| to_stream_item(stream, i))
                        .collect::<Result<Vec<_>, _>>()?;
                    fit(&mut items, size.bytes);
                    items
                }
            };
            if items.is_empty() {
                // Caught up (or only an unsigned head is left, which the writer signs and wakes for): the link
                // works, so the next interruption is retried quickly again.
                backoff.progressed();
                let woken =
                    tokio::time::timeout(IDLE_REJOIN, self.wake[slot(stream)].notified()).await;
                if woken.is_err() {
                    return Ok(());
                }
                continue;
            }
            last_push = (items.len() < size.items as usize).then(tokio::time::Instant::now);
            let bytes = PUSH_OVERHEAD
                + items
                    .iter()
                    .map(|i| prost::encoding::message::encoded_len(2, i))
                    .sum::<usize>();
            let (first, last) = (
                items.first().map_or(acked, |i| i.seq),
                items.last().map_or(acked, |i| i.seq),
            );
            let count = items.len();
            let push = PushRequest {
                stream: stream as i32,
                items,
            };
            let batch = tracing::info_span!(
                "uplink.batch",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                fedgate.node = %me,
                fedgate.parent = %parent.code,
                fedgate.stream = stream.as_str_name(),
                fedgate.items = count,
                fedgate.first_seq = first,
                fedgate.last_seq = last,
            );
            let pushed = self
                .call("Push", push, |req| client.push(req))
                .instrument(batch.clone())
                .await;
            if pushed.is_err() {
                batch.record("otel.status_code", "error");
            }
            let resp = match pushed {
                Ok(resp) => resp,
                Err(SessionError::Call(status))
                    if too_large(&status) && count > 1 && size.bytes > MIN_PUSH_BYTES =>
                {
                    // The parent takes less than this node sends: send less, at once.
                    size.refused(bytes);
                    tracing::warn!(stream = stream.as_str_name(), parent = %parent.code, bytes, count,
                        next = size.bytes, error = %status, "parent refused a push as too large; sending smaller ones");
                    continue;
                }
                Err(SessionError::Call(status)) if too_large(&status) && count == 1 => {
                    return Err(SessionError::TooLarge {
                        seq: first,
                        bytes,
                        status,
                    });
                }
                Err(e) => return Err(e),
            };
            if resp.applied_seq < last {
                return Err(SessionError::Behind {
                    applied: resp.applied_seq,
                    sent: last,
                });
            }
            acked = resp.applied_seq;
            status.acked.store(acked, Ordering::Relaxed);
            store.set_uplink_acked(stream, acked).await?;
            // Another replica of this node that started meanwhile marked where the stream stood then: the parent
            // now holds everything up to there from this node, so nothing was lost before it.
            if store
                .uplink_mark(stream)
                .await?
                .is_some_and(|m| acked >= m.head)
            {
                store.confirm_uplink(stream).await?;
            }
            backoff.progressed();
            size.acknowledged(BATCH);
        }
    }
}

/// The audit items to push next: the longest run after `acked` that fits `size` and ends where every chain it
/// carries ends with a signed record; if no such end fits, the run up to the first one (a push never leaves a
/// chain's end unsigned). Empty when nothing signed is waiting.
async fn signed_prefix(
    store: &dyn Store,
    acked: u64,
    size: &BatchSize,
) -> Result<Vec<StreamItem>, SessionError> {
    let mut limit = size.items;
    loop {
        let rows = store.outbox_after(Stream::Audit, acked, limit).await?;
        let more = rows.len() as u64 == u64::from(limit);
        let mut items = rows
            .into_iter()
            .map(|i| to_stream_item(Stream::Audit, i))
            .collect::<Result<Vec<_>, _>>()?;
        let ends = signed_ends(&items);
        let fitting = fit_count(&items, size.bytes);
        let keep = match ends.iter().rev().find(|&&e| e <= fitting) {
            Some(&e) => e,
            None => match ends.first() {
                Some(&e) => e,
                None if more && limit < MAX_AUDIT_PUSH => {
                    // A run longer than the batch without a signed end: look further.
                    limit = (limit * 2).min(MAX_AUDIT_PUSH);
                    continue;
                }
                None => 0,
            },
        };
        items.truncate(keep);
        return Ok(items);
    }
}

/// The lengths of the prefixes of `items` after which every chain they carry ends with a signed record, shortest
/// first.
fn signed_ends(items: &[StreamItem]) -> Vec<usize> {
    let mut open: std::collections::HashSet<&str> = Default::default();
    let mut ends = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if let Some(stream_item::Body::Audit(r)) = &item.body {
            if r.signature.is_empty() {
                open.insert(r.node_code.as_str());
            } else {
                open.remove(r.node_code.as_str());
            }
        }
        if open.is_empty() {
            ends.push(i + 1);
        }
    }
    ends
}

fn to_stream_item(stream: Stream, item: OutboxItem) -> Result<StreamItem, SessionError> {
    let body = match stream {
        Stream::Catalog => stream_item::Body::Catalog(
            CatalogChange::decode(item.payload.as_slice()).map_err(|e| SessionError::Corrupt {
                seq: item.seq,
                error: e.to_string(),
            })?,
        ),
        _ => {
            stream_item::Body::Audit(AuditRecord::decode(item.payload.as_slice()).map_err(|e| {
                SessionError::Corrupt {
                    seq: item.seq,
                    error: e.to_string(),
                }
            })?)
        }
    };
    Ok(StreamItem {
        seq: item.seq,
        body: Some(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::MIN_BACKOFF;

    fn record(seq: u64, purpose_len: usize) -> StreamItem {
        StreamItem {
            seq,
            body: Some(stream_item::Body::Audit(AuditRecord {
                purpose: "p".repeat(purpose_len),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn batches_fit_their_byte_budget_and_carry_at_least_one_item() {
        let mut items: Vec<StreamItem> = (1..=10).map(|s| record(s, 1000)).collect();
        let bytes = fit(&mut items, 4000);
        assert_eq!(
            items.len(),
            3,
            "three records of about 1 kB fit in 4000 bytes"
        );
        assert!(bytes <= 4000, "{bytes}");
        let sent = PushRequest {
            stream: Stream::Audit as i32,
            items: items.clone(),
        };
        assert!(
            sent.encoded_len() <= bytes,
            "the estimate covers the request"
        );

        let mut big = vec![record(1, 100_000), record(2, 10)];
        let bytes = fit(&mut big, 4000);
        assert_eq!(
            big.len(),
            1,
            "an item larger than the budget still travels alone"
        );
        assert!(bytes > 100_000);

        let mut size = BatchSize {
            items: BATCH,
            bytes: 3 << 20,
        };
        size.refused(1 << 20);
        assert_eq!(size.bytes, 512 << 10, "half of what was refused");
        size.refused(1000);
        assert_eq!(size.bytes, MIN_PUSH_BYTES, "never below the minimum");
    }

    fn audit(node: &str, seq: u64, signed: bool) -> StreamItem {
        StreamItem {
            seq,
            body: Some(stream_item::Body::Audit(AuditRecord {
                node_code: node.into(),
                signature: if signed { vec![1; 64] } else { Vec::new() },
                ..Default::default()
            })),
        }
    }

    #[test]
    fn audit_pushes_end_only_where_every_chain_is_signed() {
        // Own records 1-3 (signed at 3), a child's block ending signed, own 4-5 unsigned.
        let items = [
            audit("350100", 1, false),
            audit("350100", 2, false),
            audit("350100", 3, true),
            audit("350102", 1, false),
            audit("350103", 1, true),
            audit("350102", 2, true),
            audit("350100", 4, false),
            audit("350100", 5, false),
        ];
        assert_eq!(signed_ends(&items), [3, 6]);
        assert!(signed_ends(&items[..2]).is_empty(), "nothing signed yet");
    }

    #[test]
    fn reconnection_waits_grow_until_a_session_makes_progress() {
        let mut backoff = Backoff::default();
        let waits: Vec<u64> = (0..9)
            .map(|_| u64::try_from(backoff.failed().as_millis()).unwrap_or(u64::MAX))
            .collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.progressed();
        assert_eq!(backoff.failed(), MIN_BACKOFF);
        assert_eq!(backoff.failed(), MIN_BACKOFF * 2);
    }
}

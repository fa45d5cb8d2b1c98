//! What every durable, acknowledged stream between nodes shares, whichever way it flows: batches bounded in items
//! and bytes (halved when the far side refuses one as too large), reconnection backoff, a deadline on every call,
//! and the lease that lets one replica of a node ship a stream at a time. The uplink (up the tree) and the
//! flow-back shipper (down it) both ship through these.

use std::time::Duration;

use crate::store::Store;

/// Smallest batch after repeated failures, so a flaky link still makes progress.
pub const MIN_BATCH: u32 = 16;
/// Smallest byte budget of a batch after the far side refused larger ones as too large.
pub const MIN_BATCH_BYTES: usize = 16 * 1024;
/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Wait before the first reconnection attempt.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// How long a replica's hold on shipping a stream lasts unless renewed: another replica of the node takes the
/// stream over within about this long after the holder dies.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// How much one batch carries: at most `items` items of at most `bytes` encoded bytes in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSize {
    /// Items at most.
    pub items: u32,
    /// Encoded bytes at most.
    pub bytes: usize,
}

impl BatchSize {
    /// The far side refused a batch of `sent` bytes as too large: the next carries at most half of it.
    pub fn refused(&mut self, sent: usize) {
        self.bytes = (sent / 2).max(MIN_BATCH_BYTES).min(self.bytes);
    }

    /// A link dropped before a batch was acknowledged (the far side's work on it is lost): ship less next time.
    pub fn interrupted(&mut self) {
        self.items = (self.items / 2).max(MIN_BATCH);
    }

    /// A batch was acknowledged: grow back toward `max` items.
    pub fn acknowledged(&mut self, max: u32) {
        self.items = (self.items * 2).min(max);
    }
}

/// Whether the far side refused a batch for its size: over its message limit (OUT_OF_RANGE), or out of room
/// (RESOURCE_EXHAUSTED).
pub fn too_large(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    )
}

/// How many leading `items` fit in `budget` encoded bytes as a repeated field of a message of `overhead` bytes
/// besides (at least one, if there is one), and their encoded size with the overhead.
pub fn fit_len<M: prost::Message>(items: &[M], budget: usize, overhead: usize) -> (usize, usize) {
    let mut total = overhead;
    let mut keep = 0;
    for item in items {
        let n = prost::encoding::message::encoded_len(2, item);
        if keep > 0 && total + n > budget {
            break;
        }
        total += n;
        keep += 1;
    }
    (keep, total)
}

/// Why one call to the far side gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallFailed {
    /// It answered with an error.
    #[error("call failed: {0}")]
    Status(#[from] tonic::Status),
    /// It did not answer in time.
    #[error("no answer to {call} within {after:?}")]
    Stalled {
        /// The call.
        call: &'static str,
        /// The deadline.
        after: Duration,
    },
}

/// Runs one call under `timeout`, which the far side is told too (`grpc-timeout`).
pub async fn call_with_deadline<Req, Resp, F, Fut>(
    name: &'static str,
    timeout: Duration,
    body: Req,
    call: F,
) -> Result<Resp, CallFailed>
where
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    let mut req = crate::telemetry::traced(body);
    req.set_timeout(timeout);
    let began = tokio::time::Instant::now();
    let stalled = CallFailed::Stalled {
        call: name,
        after: timeout,
    };
    match tokio::time::timeout(timeout, call(req)).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        // The channel enforces the same `grpc-timeout` and may notice first (CANCELLED "Timeout expired"), or
        // the far side gives up (DEADLINE_EXCEEDED): either way no answer came in time.
        Ok(Err(s)) if past_deadline(&s, began.elapsed(), timeout) => Err(stalled),
        Ok(Err(s)) => Err(CallFailed::Status(s)),
        Err(_) => Err(stalled),
    }
}

/// Whether `status`, after `elapsed` of a call under `timeout`, means that the deadline passed.
fn past_deadline(status: &tonic::Status, elapsed: Duration, timeout: Duration) -> bool {
    matches!(
        status.code(),
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    ) && elapsed >= timeout
}

/// Renews `lease` for `holder` every third of [`LEASE_TTL`]; returns why it could not be renewed.
pub async fn hold_lease(store: &dyn Store, lease: &str, holder: &str) -> String {
    loop {
        tokio::time::sleep(LEASE_TTL / 3).await;
        match store.take_lease(lease, holder, LEASE_TTL).await {
            Ok(true) => {}
            Ok(false) => return "another replica holds it".into(),
            Err(e) => return format!("renewal failed: {e}"),
        }
    }
}

/// A name for this process among the replicas of its node: host, process id and a random part (a restarted
/// process is a new replica).
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into());
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Wait before reconnecting: doubles with every interruption, and falls back to the minimum only once a session
/// has made progress (a batch acknowledged, or the outbox caught up). A far side that answers but keeps refusing
/// the same batch is therefore retried ever more slowly, not every few milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the next attempt.
    pub wait: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { wait: MIN_BACKOFF }
    }
}

impl Backoff {
    /// The wait before the next attempt; the one after it is twice as long, up to [`MAX_BACKOFF`].
    pub fn failed(&mut self) -> Duration {
        let wait = self.wait;
        self.wait = (self.wait * 2).min(MAX_BACKOFF);
        wait
    }

    /// The session got somewhere: the next interruption is retried after the minimum wait.
    pub fn progressed(&mut self) {
        self.wait = MIN_BACKOFF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel's own deadline expiring a moment before ours is a stall, not an answer.
    #[tokio::test]
    async fn a_deadline_noticed_by_the_channel_is_a_stall() {
        let timeout = Duration::from_millis(30);
        let got = call_with_deadline("Push", timeout, (), |_req| async move {
            tokio::time::sleep(timeout).await;
            Err::<tonic::Response<()>, _>(tonic::Status::cancelled("Timeout expired"))
        })
        .await;
        assert!(
            matches!(got, Err(CallFailed::Stalled { call: "Push", .. })),
            "{got:?}"
        );
    }

    /// A refusal that comes in time stays the far side's answer, whatever its code.
    #[tokio::test]
    async fn an_early_cancellation_is_the_far_sides_answer() {
        let got = call_with_deadline("Push", Duration::from_secs(5), (), |_req| async {
            Err::<tonic::Response<()>, _>(tonic::Status::cancelled("the parent is stopping"))
        })
        .await;
        assert!(
            matches!(&got, Err(CallFailed::Status(s)) if s.code() == tonic::Code::Cancelled),
            "{got:?}"
        );
    }
}

//! What the router tells the monitor about the call it serves: the request's envelope, and each call it makes
//! to the next hop or provider. Both find the call through a task-local set by the layer, and do nothing outside
//! a monitored call (background work: uplink, flow-back, retried revocations).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fedgate_proto::v1::Envelope;

tokio::task_local! {
    static CALL: Arc<Mutex<Exchange>>;
}

/// What the router noted about one call.
#[derive(Debug, Default, Clone)]
pub(super) struct Exchange {
    pub request_id: String,
    pub resource_id: String,
    pub consumer_uscc: String,
    pub consumer_node: String,
    pub mode: i32,
    /// The peer of the last call on.
    pub next_hop: String,
    /// When the first call on was sent.
    pub request_out_ns: i64,
    /// When the last call on returned.
    pub response_in_ns: i64,
    /// Time spent in calls on, in all.
    pub at_next: Option<Duration>,
}

/// The shared state of one call.
pub(super) type Cell = Arc<Mutex<Exchange>>;

/// Runs `fut` as the monitored call `cell`.
pub(super) async fn scope<F: Future>(cell: Cell, fut: F) -> F::Output {
    CALL.scope(cell, fut).await
}

/// What was noted of `cell` so far.
pub(super) fn read(cell: &Cell) -> Exchange {
    cell.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

fn with(f: impl FnOnce(&mut Exchange)) {
    let _ = CALL.try_with(|c| f(&mut c.lock().unwrap_or_else(PoisonError::into_inner)));
}

/// Notes the request id, resource, consumer and mode of the request the current call carries (the first
/// envelope noted wins: a call dispatching many pages names the first).
pub fn note_envelope(env: &Envelope) {
    with(|x| {
        if x.request_id.is_empty() {
            x.request_id = crate::limits::clamp(&env.request_id, 128);
            x.resource_id = crate::limits::clamp(&env.resource_id, 256);
            x.consumer_uscc = crate::limits::clamp(&env.consumer_uscc, 64);
            x.consumer_node = crate::limits::clamp(&env.consumer_node, 64);
            x.mode = env.mode;
        }
    });
}

/// Runs `call`, a call of the current call's next hop or provider `peer` (a peer URI), noting when it was sent
/// and when it returned.
pub async fn next_hop<F: Future>(peer: impl FnOnce() -> String, call: F) -> F::Output {
    if CALL.try_with(|_| ()).is_err() {
        return call.await;
    }
    let out_ns = super::now_nanos();
    let started = Instant::now();
    let result = call.await;
    let spent = started.elapsed();
    let in_ns = super::now_nanos();
    with(|x| {
        if x.request_out_ns == 0 {
            x.request_out_ns = out_ns;
        }
        x.response_in_ns = in_ns;
        x.next_hop = peer();
        x.at_next = Some(x.at_next.unwrap_or_default() + spent);
    });
    result
}

//! Audit of refusals that can come in floods — refused handshakes per source address, calls refused for being
//! over a limit per caller — as at most one record per source or caller and interval.
//!
//! The first refusal of a source that was quiet is recorded at once, with its own detail. Later ones are
//! counted by reason and written as one summary record at the end of the interval ("37 refused handshakes from
//! 10.0.0.9 in 60 s: timeout 30, over cap 7"). A source stays known while it keeps being refused; one that was
//! quiet for a whole interval is forgotten, so its next refusal is recorded at once again. At most
//! [`MAX_SOURCES`] sources are told apart in one interval; refusals of further ones are summarised together.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fedgate_proto::v1::{AuditOperation, AuditRecord};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::{self, AuditLog};

/// Sources or callers told apart within one interval.
pub const MAX_SOURCES: usize = 10_000;
/// The actor of the summary of sources past [`MAX_SOURCES`].
const OTHERS: &str = "(other sources)";

/// What was refused: decides the record's operation, outcome and wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalKind {
    /// A connection refused at or before its TLS handshake.
    Handshake,
    /// A call refused for being over a rate or concurrency limit.
    Call,
}

impl RefusalKind {
    fn operation(self) -> AuditOperation {
        match self {
            RefusalKind::Handshake => AuditOperation::TlsRefused,
            RefusalKind::Call => AuditOperation::LimitRefused,
        }
    }

    fn outcome(self) -> &'static str {
        match self {
            RefusalKind::Handshake => "UNAUTHENTICATED",
            RefusalKind::Call => "RESOURCE_EXHAUSTED",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            RefusalKind::Handshake => "refused handshakes from",
            RefusalKind::Call => "calls refused over limits for",
        }
    }
}

/// One refusal to note.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// What was refused.
    pub kind: RefusalKind,
    /// Who: "tcp:<address>" for a connection, the caller's URI for a call.
    pub actor: String,
    /// The reason, as a short label ("timeout", "over_cap", "agency_rate", ...); the summary counts by it.
    pub reason: &'static str,
    /// The full refusal, for the record written at once.
    pub detail: String,
    /// The consumer agency, for a call of an agency (so the agency finds the record in its own audit).
    pub consumer_uscc: String,
}

#[derive(Debug, Default)]
struct Entry {
    /// Refusals counted this interval, by reason (not the one recorded at once).
    counts: BTreeMap<&'static str, u64>,
    /// Whether the source was refused at all this interval.
    refused: bool,
    consumer_uscc: String,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<(RefusalKind, String), Entry>,
}

impl State {
    /// Counts `r`; true when it is to be recorded at once (its source was not known this interval).
    fn count(&mut self, r: &Refusal) -> bool {
        let mut key = (r.kind, r.actor.clone());
        if !self.entries.contains_key(&key) && self.entries.len() >= MAX_SOURCES {
            key.1 = OTHERS.to_owned();
        }
        let known = self.entries.contains_key(&key);
        let entry = self.entries.entry(key).or_default();
        entry.refused = true;
        if entry.consumer_uscc.is_empty() {
            entry.consumer_uscc.clone_from(&r.consumer_uscc);
        }
        if known {
            *entry.counts.entry(r.reason).or_insert(0) += 1;
        }
        !known
    }
}

struct Inner {
    audit: AuditLog,
    interval: Duration,
    state: Mutex<State>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last holder is gone (the listeners have stopped): write what is still counted.
        let records = summaries(&mut self.lock(), self.interval);
        for r in records {
            self.audit.record_detached(r);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The summarising audit of refusals of one node.
#[derive(Clone)]
pub struct RefusalLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RefusalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalLog")
            .field("interval", &self.inner.interval)
            .finish_non_exhaustive()
    }
}

impl RefusalLog {
    /// Refusals written to `audit`, summarised per `interval`.
    pub fn new(audit: AuditLog, interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                audit,
                interval,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Notes a refusal: recorded at once if its source was quiet, else counted for the interval's summary.
    pub fn note(&self, refusal: Refusal) {
        let immediate = self.inner.lock().count(&refusal);
        if immediate {
            let mut r = audit::event(refusal.kind.operation(), refusal.actor);
            r.outcome = refusal.kind.outcome().to_owned();
            r.detail = refusal.detail;
            r.consumer_uscc = refusal.consumer_uscc;
            self.inner.audit.record_detached(r);
        }
    }

    /// Writes the summaries of the interval that just ended and forgets the sources that were quiet in it.
    pub fn flush(&self) {
        let records = summaries(&mut self.inner.lock(), self.inner.interval);
        for r in records {
            self.inner.audit.record_detached(r);
        }
    }

    /// Flushes once per interval until `shutdown` turns true, then once more.
    pub fn spawn_flusher(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(log.inner.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => break,
                    _ = tick.tick() => log.flush(),
                }
            }
            log.flush();
        })
    }
}

/// The summary records of `state`'s interval; resets the counts and drops quiet sources.
fn summaries(state: &mut State, interval: Duration) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    state.entries.retain(|(kind, actor), entry| {
        let total: u64 = entry.counts.values().sum();
        if total > 0 {
            let reasons = entry
                .counts
                .iter()
                .map(|(reason, n)| format!("{} {n}", reason.replace('_', " ")))
                .collect::<Vec<_>>()
                .join(", ");
            let mut r = audit::event(kind.operation(), actor.clone());
            r.outcome = kind.outcome().to_owned();
            r.consumer_uscc = entry.consumer_uscc.clone();
            r.detail = format!(
                "{total} {} {actor} in {} ms: {reasons}",
                kind.noun(),
                interval.as_millis()
            );
            out.push(r);
        }
        let keep = entry.refused;
        entry.counts.clear();
        entry.refused = false;
        keep
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(actor: &str, reason: &'static str) -> Refusal {
        Refusal {
            kind: RefusalKind::Handshake,
            actor: actor.to_owned(),
            reason,
            detail: format!("{reason} from {actor}"),
            consumer_uscc: String::new(),
        }
    }

    #[test]
    fn a_flood_from_one_source_is_one_record_at_once_then_one_summary_per_interval() {
        let mut state = State::default();
        let interval = Duration::from_secs(60);
        assert!(state.count(&refusal("tcp:10.0.0.9", "timeout")));
        for _ in 0..30 {
            assert!(!state.count(&refusal("tcp:10.0.0.9", "timeout")));
        }
        for _ in 0..7 {
            assert!(!state.count(&refusal("tcp:10.0.0.9", "over_cap")));
        }
        let first = summaries(&mut state, interval);
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].detail,
            "37 refused handshakes from tcp:10.0.0.9 in 60000 ms: over cap 7, timeout 30"
        );
        assert_eq!(first[0].actor, "tcp:10.0.0.9");
        // Still being refused: the next interval's refusals are summarised only.
        assert!(!state.count(&refusal("tcp:10.0.0.9", "timeout")));
        assert_eq!(summaries(&mut state, interval).len(), 1);
        // A quiet interval: nothing written, and the source is forgotten.
        assert!(summaries(&mut state, interval).is_empty());
        assert!(state.entries.is_empty());
        assert!(state.count(&refusal("tcp:10.0.0.9", "timeout")));
        // A single refusal recorded at once needs no summary.
        assert!(summaries(&mut state, interval).is_empty());
    }
}

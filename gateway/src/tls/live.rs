//! The open connections of the mutual-TLS listener, checked again whenever the trust material changes and once
//! a minute: a connection whose client certificate has since been revoked (a serial in the list or a CRL),
//! has expired, or is no longer issued by a CA of the bundle is closed, with the calls and streams on it, and
//! the closing is audited as a refused handshake would be. A reload thus reaches the connections already open,
//! not only the new ones.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::PeerInfo;
use super::dynamic::DynamicTls;
use crate::accept::ConnInfo;

/// How often open connections are checked when nothing changed (certificates expire without a reload).
pub const RECHECK_EVERY: Duration = Duration::from_secs(60);

/// The open connections of one mutual-TLS listener.
#[derive(Clone, Default)]
pub struct LiveConnections(Arc<Mutex<Vec<ConnInfo<PeerInfo>>>>);

impl std::fmt::Debug for LiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConnections")
            .field("open", &self.open().len())
            .finish()
    }
}

/// A connection closed because its peer is no longer trusted, and why.
#[derive(Debug, Clone)]
pub struct Distrusted {
    /// Who was on it.
    pub peer: PeerInfo,
    /// Why its certificate no longer passes.
    pub reason: String,
}

impl LiveConnections {
    /// Keeps track of `conn` until it ends.
    pub fn add(&self, conn: &ConnInfo<PeerInfo>) {
        let mut open = self.lock();
        // Connections that ended are dropped as the list grows, so it stays within the listener's cap.
        if open.len() >= 64 && open.len().is_power_of_two() {
            open.retain(|c| !c.is_closed());
        }
        open.push(conn.clone());
    }

    /// The connections still open.
    pub fn open(&self) -> Vec<ConnInfo<PeerInfo>> {
        let mut open = self.lock();
        open.retain(|c| !c.is_closed());
        open.clone()
    }

    /// Checks every open connection under the material `tls` holds now and closes those that fail.
    pub fn sweep(&self, tls: &DynamicTls) -> Vec<Distrusted> {
        let mut closed = Vec::new();
        for conn in self.open() {
            if let Err(reason) = tls.still_trusted(&conn.info.certificate, &conn.info.intermediates)
            {
                conn.close();
                closed.push(Distrusted {
                    peer: conn.info.clone(),
                    reason,
                });
            }
        }
        closed
    }

    /// Sweeps after every reload of `tls` and every [`RECHECK_EVERY`], telling `on_closed` of each connection
    /// closed, until `shutdown`.
    pub async fn watch(
        self,
        tls: DynamicTls,
        on_closed: impl Fn(Distrusted) + Send + 'static,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut reloads = tls.subscribe();
        let mut tick = tokio::time::interval(RECHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                changed = reloads.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            for d in self.sweep(&tls) {
                tracing::warn!(peer = %d.peer.peer, remote = %d.peer.remote, reason = %d.reason,
                    "closed an open connection: its peer's certificate is no longer trusted");
                on_closed(d);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ConnInfo<PeerInfo>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

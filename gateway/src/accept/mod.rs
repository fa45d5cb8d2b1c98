//! Admission of connections on every listener: a handshake timeout, caps on pending handshakes and on open
//! connections per source address and in total (a connection over a cap is closed at once), TCP keepalive,
//! and closing connections that stay idle.
//!
//! Each accepted connection runs its handshake in its own task, so a silent client holds up nobody but itself,
//! and only while it stays within its source's caps. The stream [`incoming`] returns feeds
//! `Server::serve_with_incoming_shutdown` (tonic) or, through [`HttpListener`], `axum::serve`.

mod conn;
mod gate;
mod stop;

pub use conn::{
    Activity, CallGuard, ConnInfo, Guarded, ResponseFuture, TrackCalls, TrackCallsLayer, Tracked,
};
pub use gate::{Gate, GatePermit, GateRefusal, SourceKey};
pub use stop::{StopCalls, StopCallsLayer};

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::tls::HandshakeFailure;

/// Established connections buffered for the server before handshake tasks wait to hand theirs over.
const ACCEPTED_QUEUE: usize = 64;
/// Pause after a non-connection accept error (e.g. out of file descriptors) before retrying.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// `[connections]`: handshake timeouts, connection caps, HTTP/2 keepalive and idle timeouts of the node's
/// listeners (the backbone's mutual-TLS listener, the open-data listener and the metrics listener).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Milliseconds a client may take to complete the TLS handshake (backbone and open-data listeners).
    pub handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once on one listener, over all sources.
    pub max_pending_handshakes: usize,
    /// TLS handshakes in progress at once from one source address (an IPv4 address or an IPv6 /64).
    pub max_pending_handshakes_per_source: usize,
    /// Open connections (handshaking or established) on the backbone listener.
    pub max_connections: usize,
    /// Open connections on the backbone listener from one source address.
    pub max_connections_per_source: usize,
    /// Seconds a backbone connection may stay with no call in flight before it is closed; 0 keeps it.
    pub idle_timeout_secs: u64,
    /// Seconds a backbone connection may live before the node asks its client to reconnect (HTTP/2 GOAWAY;
    /// calls in flight finish), so that connections move onto reloaded certificates; 0 keeps them.
    pub max_connection_age_secs: u64,
    /// Seconds the calls and streams of a connection past its age may still run before it is closed; 0 waits.
    pub max_connection_age_grace_secs: u64,
    /// Calls (HTTP/2 streams) open at once on one connection.
    pub max_concurrent_streams: u32,
    /// Calls in flight at once on the backbone listener, over all connections.
    pub max_calls_in_flight: usize,
    /// Calls in flight at once on the backbone listener from one source address.
    pub max_calls_in_flight_per_source: usize,
    /// Seconds between the server's HTTP/2 pings on a connection; 0 sends none.
    pub http2_keepalive_interval_secs: u64,
    /// Seconds the server waits for a ping's answer before it closes the connection.
    pub http2_keepalive_timeout_secs: u64,
    /// Seconds of TCP silence before the kernel probes the peer; 0 turns TCP keepalive off.
    pub tcp_keepalive_secs: u64,
    /// Open connections on the open-data listener.
    pub open_data_max_connections: usize,
    /// Open connections on the open-data listener from one source address.
    pub open_data_max_connections_per_source: usize,
    /// Seconds an open-data connection may stay with no call in flight, from the end of its handshake.
    pub open_data_idle_timeout_secs: u64,
    /// Open connections on the metrics listener.
    pub metrics_max_connections: usize,
    /// Seconds a metrics connection may stay silent before it is closed.
    pub metrics_idle_timeout_secs: u64,
    /// Milliseconds over which refused handshakes (per source address) and refused calls (per caller) are
    /// summarised in one audit record; the first refusal of a quiet source or caller is recorded at once.
    pub refusal_summary_ms: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            handshake_timeout_ms: 10_000,
            max_pending_handshakes: 1024,
            max_pending_handshakes_per_source: 64,
            max_connections: 4096,
            max_connections_per_source: 256,
            idle_timeout_secs: 300,
            max_connection_age_secs: 3600,
            max_connection_age_grace_secs: 300,
            max_concurrent_streams: 200,
            max_calls_in_flight: 4096,
            max_calls_in_flight_per_source: 1024,
            http2_keepalive_interval_secs: 30,
            http2_keepalive_timeout_secs: 20,
            tcp_keepalive_secs: 60,
            open_data_max_connections: 1024,
            open_data_max_connections_per_source: 16,
            open_data_idle_timeout_secs: 30,
            metrics_max_connections: 64,
            metrics_idle_timeout_secs: 30,
            refusal_summary_ms: 60_000,
        }
    }
}

/// `secs` as a duration, `None` for 0.
fn nonzero_secs(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl ConnectionsConfig {
    /// The limits of the backbone's mutual-TLS listener.
    pub fn backbone(&self) -> ListenerLimits {
        ListenerLimits {
            listener: "backbone",
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms.max(1)),
            max_pending: self.max_pending_handshakes,
            max_pending_per_source: self.max_pending_handshakes_per_source,
            max_connections: self.max_connections,
            max_connections_per_source: self.max_connections_per_source,
            idle_timeout: nonzero_secs(self.idle_timeout_secs),
            idle_by: IdleBy::Calls,
            tcp_keepalive: nonzero_secs(self.tcp_keepalive_secs),
            closing: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// The limits of the public open-data listener.
    pub fn open_data(&self) -> ListenerLimits {
        ListenerLimits {
            listener: "open_data",
            max_connections: self.open_data_max_connections,
            max_connections_per_source: self.open_data_max_connections_per_source,
            idle_timeout: nonzero_secs(self.open_data_idle_timeout_secs),
            ..self.backbone()
        }
    }

    /// The limits of the console's HTTPS listener (HTTP/1 and HTTP/2; idle means no bytes either way).
    pub fn console(&self) -> ListenerLimits {
        ListenerLimits {
            listener: "console",
            idle_by: IdleBy::Bytes,
            ..self.open_data()
        }
    }

    /// The limits of the plain-HTTP metrics listener (no handshake; idle means no bytes either way).
    pub fn metrics(&self) -> ListenerLimits {
        ListenerLimits {
            listener: "metrics",
            max_connections: self.metrics_max_connections,
            max_connections_per_source: self.metrics_max_connections,
            idle_timeout: nonzero_secs(self.metrics_idle_timeout_secs),
            idle_by: IdleBy::Bytes,
            ..self.backbone()
        }
    }

    /// The interval over which refusals are summarised in one audit record.
    pub fn refusal_summary(&self) -> Duration {
        Duration::from_millis(self.refusal_summary_ms.max(1))
    }
}

/// What makes a connection idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleBy {
    /// No call in flight (HTTP/2: pings and window updates do not count); calls are marked by [`TrackCallsLayer`].
    Calls,
    /// No byte read or written (HTTP/1).
    Bytes,
}

/// The limits one listener applies to its connections.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// The listener's name in metrics and logs.
    pub listener: &'static str,
    /// Time a client may take to complete its handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once.
    pub max_pending: usize,
    /// Handshakes in progress at once from one source.
    pub max_pending_per_source: usize,
    /// Open connections at once.
    pub max_connections: usize,
    /// Open connections at once from one source.
    pub max_connections_per_source: usize,
    /// Time a connection may stay idle before it is closed; `None` keeps it.
    pub idle_timeout: Option<Duration>,
    /// What counts as idle.
    pub idle_by: IdleBy,
    /// TCP keepalive time; `None` leaves keepalive off.
    pub tcp_keepalive: Option<Duration>,
    /// Cancelled to close every connection of the listener at once, calls in flight and all (the node's stop
    /// once its shutdown grace has passed).
    pub closing: tokio_util::sync::CancellationToken,
}

/// The handshake a listener runs on each accepted TCP connection.
pub trait Handshake: Clone + Send + Sync + 'static {
    /// The established connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What the handshake learnt about the client (its verified identity, say).
    type Info: Clone + Send + Sync + 'static;
    /// Runs the handshake; the listener bounds it by its handshake timeout.
    fn handshake(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> impl Future<Output = Result<(Self::Io, Self::Info), HandshakeFailure>> + Send;

    /// Told of each connection once it is admitted (to keep track of the open connections).
    fn established(&self, _conn: &ConnInfo<Self::Info>) {}
}

/// No handshake: the TCP connection as it is (the plain-HTTP metrics listener).
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTcp;

impl Handshake for PlainTcp {
    type Io = TcpStream;
    type Info = ();

    async fn handshake(
        &self,
        tcp: TcpStream,
        _remote: SocketAddr,
    ) -> Result<(TcpStream, ()), HandshakeFailure> {
        Ok((tcp, ()))
    }
}

/// What the accept loop hands the server: an admitted connection, or an accept error.
pub type Accepted<IO, I> = Result<Tracked<IO, I>, io::Error>;

/// Callback told about each refused connection.
pub type OnRefused = Arc<dyn Fn(HandshakeFailure) + Send + Sync>;

/// Accepts connections on `listener` under `limits`, running `handshake` on each in its own task.
///
/// A connection over a cap is closed at once; one whose handshake fails or times out is dropped. Either way
/// `on_refused` is told and the stream goes on; accept errors are logged and retried. Accepting starts on
/// first poll and stops (releasing the listener, and abandoning handshakes in progress) once the stream is
/// dropped.
pub fn incoming<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    limits: ListenerLimits,
    on_refused: OnRefused,
) -> impl Stream<Item = Accepted<H::Io, H::Info>> + Send + 'static {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    // Spawn lazily so that building the stream outside a runtime cannot panic.
    let start = futures::stream::once(async move {
        tokio::spawn(accept_loop(listener, handshake, limits, on_refused, tx));
    })
    .filter_map(|()| futures::future::ready(None));
    start.chain(ReceiverStream::new(rx))
}

/// Whether an accept error concerns only the one connection (so retrying at once is right).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Sets TCP_NODELAY and keepalive on an accepted connection.
fn configure(tcp: &TcpStream, remote: SocketAddr, keepalive: Option<Duration>) {
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(%remote, error = %e, "could not set TCP_NODELAY");
    }
    if let Some(time) = keepalive {
        let ka = socket2::TcpKeepalive::new().with_time(time);
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
            debug!(%remote, error = %e, "could not set TCP keepalive");
        }
    }
}

/// Accepts TCP connections until the receiving stream is dropped, spawning a handshake for each admitted one.
async fn accept_loop<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    limits: ListenerLimits,
    on_refused: OnRefused,
    tx: mpsc::Sender<Accepted<H::Io, H::Info>>,
) {
    let connections = Gate::new(limits.max_connections, limits.max_connections_per_source);
    let pending = Gate::new(limits.max_pending, limits.max_pending_per_source);
    let limits = Arc::new(limits);
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => break,
            r = listener.accept() => r,
        };
        let (tcp, remote) = match accepted {
            Ok(pair) => pair,
            Err(e) if is_connection_error(&e) => {
                debug!(error = %e, "accepting a TCP connection failed; continuing");
                continue;
            }
            Err(e) => {
                warn!(listener = limits.listener, error = %e, "accepting a TCP connection failed; retrying shortly");
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        let source = SourceKey::of(remote.ip());
        let admitted = connections
            .try_enter(source)
            .map_err(|cap| ("open connections", cap))
            .and_then(|conn| {
                pending
                    .try_enter(source)
                    .map(|handshaking| (conn, handshaking))
                    .map_err(|cap| ("handshakes in progress", cap))
            });
        let (conn_permit, pending_permit) = match admitted {
            Ok(permits) => permits,
            Err((what, cap)) => {
                drop(tcp);
                on_refused(HandshakeFailure::OverCap {
                    remote,
                    limit: format!("{what} over {cap}"),
                });
                continue;
            }
        };
        configure(&tcp, remote, limits.tcp_keepalive);
        let handshake = handshake.clone();
        let on_refused = on_refused.clone();
        let tx = tx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                _ = tx.closed() => return,
                r = tokio::time::timeout(limits.handshake_timeout, handshake.handshake(tcp, remote)) => r,
            };
            drop(pending_permit);
            let (io, info) = match result {
                Err(_) => return on_refused(HandshakeFailure::Timeout { remote }),
                Ok(Err(failure)) => return on_refused(failure),
                Ok(Ok(established)) => established,
            };
            let conn = Tracked::new(io, info, remote, conn_permit, &limits);
            handshake.established(conn.conn_info());
            if tx.send(Ok(conn)).await.is_err() {
                debug!(%remote, "server stopped; dropping established connection");
            }
        });
    }
    debug!(listener = limits.listener, "stopped accepting connections");
}

/// The admitted connections of a listener running handshake `H`.
type AcceptedStream<H> =
    Pin<Box<dyn Stream<Item = Accepted<<H as Handshake>::Io, <H as Handshake>::Info>> + Send>>;

/// Admitted connections of a listener as an `axum::serve` listener: plain TCP (the metrics endpoint) or after a
/// handshake (the console's TLS).
pub struct HttpListener<H: Handshake = PlainTcp> {
    rx: AcceptedStream<H>,
    local: SocketAddr,
}

impl HttpListener<PlainTcp> {
    /// Serves `listener` under `limits`; refusals go to `on_refused`.
    pub fn new(
        listener: TcpListener,
        limits: ListenerLimits,
        on_refused: OnRefused,
    ) -> io::Result<Self> {
        Self::with_handshake(listener, PlainTcp, limits, on_refused)
    }
}

impl<H: Handshake> HttpListener<H> {
    /// Serves `listener` under `limits`, running `handshake` on each connection; refusals go to `on_refused`.
    pub fn with_handshake(
        listener: TcpListener,
        handshake: H,
        limits: ListenerLimits,
        on_refused: OnRefused,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            rx: Box::pin(incoming(listener, handshake, limits, on_refused)),
            local,
        })
    }
}

impl<H: Handshake> axum::serve::Listener for HttpListener<H>
where
    H::Info: Unpin,
{
    type Io = Tracked<H::Io, H::Info>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.next().await {
                Some(Ok(conn)) => {
                    let remote = conn.conn_info().remote;
                    return (conn, remote);
                }
                Some(Err(e)) => debug!(error = %e, "accepting an HTTP connection failed"),
                // The accept loop ended (it never does while this listener holds the stream).
                None => futures::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The client address of a connection an [`HttpListener`] admitted, for `axum`'s `ConnectInfo`.
#[derive(Debug, Clone, Copy)]
pub struct Remote(pub SocketAddr);

impl<H: Handshake>
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpListener<H>>>
    for Remote
where
    H::Info: Unpin,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpListener<H>>) -> Self {
        Remote(*stream.remote_addr())
    }
}

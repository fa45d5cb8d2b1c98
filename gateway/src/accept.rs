//! Admission of connections on every listener: a handshake timeout, caps on pending handshakes and on open
//! connections per source address and in total (a connection over a cap is closed at once), TCP keepalive,
//! and closing connections that stay idle.
//!
//! Each accepted connection runs its handshake in its own task, so a silent client holds up nobody but itself,
//! and only while it stays within its source's caps. The stream [`incoming`] returns feeds
//! `Server::serve_with_incoming_shutdown` (tonic) or, through [`HttpListener`], `axum::serve`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
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
}

/// The address a per-source cap counts by: an IPv4 address, or the /64 network of an IPv6 address (one host
/// commonly holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The key of a client address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => SourceKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    SourceKey(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Which cap of a [`Gate`] refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateRefusal {
    /// The cap over all sources, with its value.
    Total(usize),
    /// The cap of one source, with its value.
    Source(usize),
}

impl fmt::Display for GateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateRefusal::Total(n) => write!(f, "the cap of {n} over all sources"),
            GateRefusal::Source(n) => write!(f, "the cap of {n} per source address"),
        }
    }
}

/// Counts what is held per source and in total, refusing entries over either cap (a counting semaphore per
/// source and one over all, that never waits).
#[derive(Debug)]
pub struct Gate {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_source: HashMap<SourceKey, usize>,
}

impl Gate {
    /// A gate admitting `max_total` holders, at most `max_per_source` of them from one source.
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            state: Mutex::new(GateState::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters for `source`, or says which cap is full.
    pub fn try_enter(self: &Arc<Self>, source: SourceKey) -> Result<GatePermit, GateRefusal> {
        let mut s = self.lock();
        if s.total >= self.max_total {
            return Err(GateRefusal::Total(self.max_total));
        }
        if s.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            return Err(GateRefusal::Source(self.max_per_source));
        }
        *s.per_source.entry(source).or_insert(0) += 1;
        s.total += 1;
        Ok(GatePermit {
            gate: self.clone(),
            source,
        })
    }

    /// Holders at the moment.
    pub fn in_use(&self) -> usize {
        self.lock().total
    }
}

/// One entry into a [`Gate`]; leaving is dropping it.
#[derive(Debug)]
pub struct GatePermit {
    gate: Arc<Gate>,
    source: SourceKey,
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.total = s.total.saturating_sub(1);
        if let Some(held) = s.per_source.get_mut(&self.source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                s.per_source.remove(&self.source);
            }
        }
    }
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
            if tx.send(Ok(conn)).await.is_err() {
                debug!(%remote, "server stopped; dropping established connection");
            }
        });
    }
    debug!(listener = limits.listener, "stopped accepting connections");
}

/// When a connection last did something, and how many calls it has in flight.
#[derive(Debug)]
struct ActivityState {
    base: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

/// The activity of one connection, shared by the connection and the calls on it.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityState>);

impl Activity {
    fn new() -> Self {
        Self(Arc::new(ActivityState {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }))
    }

    fn touch(&self) {
        let ms = u64::try_from(self.0.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks a call in flight until the guard is dropped.
    pub fn begin_call(&self) -> CallGuard {
        self.0.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        CallGuard(self.clone())
    }

    /// Calls in flight on the connection.
    pub fn calls_in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Relaxed)
    }

    /// When the connection becomes idle if nothing happens meanwhile (never earlier than `timeout` from now
    /// while a call is in flight).
    fn idle_deadline(&self, timeout: Duration) -> (Instant, bool) {
        if self.calls_in_flight() > 0 {
            return (Instant::now() + timeout, false);
        }
        let last = self.0.base + Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
        (last + timeout, true)
    }
}

/// A call in flight on a connection; dropping it ends the call.
#[derive(Debug)]
pub struct CallGuard(Activity);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a server knows about an admitted connection; tonic puts it in each request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo<I> {
    /// The client's socket address.
    pub remote: SocketAddr,
    /// What the handshake learnt.
    pub info: I,
    activity: Activity,
}

impl<I> ConnInfo<I> {
    /// The connection's activity (to mark calls in flight).
    pub fn activity(&self) -> &Activity {
        &self.activity
    }
}

/// An admitted, established connection: it holds its place under the listener's caps until it closes, and
/// fails its reads once it has been idle longer than the listener allows (the server then closes it).
pub struct Tracked<IO, I> {
    io: IO,
    info: ConnInfo<I>,
    idle_timeout: Option<Duration>,
    idle_by: IdleBy,
    timer: Pin<Box<Sleep>>,
    _permit: GatePermit,
}

impl<IO, I> Tracked<IO, I> {
    fn new(
        io: IO,
        info: I,
        remote: SocketAddr,
        permit: GatePermit,
        limits: &ListenerLimits,
    ) -> Self {
        let activity = Activity::new();
        activity.touch();
        Self {
            io,
            info: ConnInfo {
                remote,
                info,
                activity,
            },
            idle_timeout: limits.idle_timeout,
            idle_by: limits.idle_by,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            _permit: permit,
        }
    }

    /// What is known about the connection.
    pub fn conn_info(&self) -> &ConnInfo<I> {
        &self.info
    }

    /// The underlying connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Whether the connection has been idle past its timeout; otherwise arms the timer to wake the reader.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.idle_timeout else {
            return false;
        };
        loop {
            let (deadline, idle) = self.info.activity.idle_deadline(timeout);
            if idle && deadline <= Instant::now() {
                return true;
            }
            let deadline = tokio::time::Instant::from_std(deadline);
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
        }
    }
}

impl<IO, I> fmt::Debug for Tracked<IO, I>
where
    I: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracked")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl<IO: AsyncRead + Unpin, I: Unpin> AsyncRead for Tracked<IO, I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if this.idle_by == IdleBy::Bytes && buf.filled().len() > before {
                    this.info.activity.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending if this.idle_expired(cx) => {
                debug!(remote = %this.info.remote, "closing an idle connection");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle past the listener's idle timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Tracked<IO, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if this.idle_by == IdleBy::Bytes && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.info.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if this.idle_by == IdleBy::Bytes && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.info.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO, I> tonic::transport::server::Connected for Tracked<IO, I>
where
    I: Clone + Send + Sync + 'static,
{
    type ConnectInfo = ConnInfo<I>;

    fn connect_info(&self) -> ConnInfo<I> {
        self.info.clone()
    }
}

/// A tower layer marking each call in flight on its connection (for [`IdleBy::Calls`]) until its response
/// body ends; `I` is the listener's handshake info type.
pub struct TrackCallsLayer<I>(PhantomData<fn() -> I>);

impl<I> TrackCallsLayer<I> {
    /// The layer.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<I> Default for TrackCallsLayer<I> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I> Clone for TrackCallsLayer<I> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<S, I> tower::Layer<S> for TrackCallsLayer<I> {
    type Service = TrackCalls<S, I>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackCalls {
            inner,
            _info: PhantomData,
        }
    }
}

/// The service of [`TrackCallsLayer`].
pub struct TrackCalls<S, I> {
    inner: S,
    _info: PhantomData<fn() -> I>,
}

impl<S: Clone, I> Clone for TrackCalls<S, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _info: PhantomData,
        }
    }
}

/// A boxed response future of the layers here.
pub type ResponseFuture<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send + 'static>>;

impl<S, I, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TrackCalls<S, I>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
    I: Send + Sync + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnInfo<I>>()
            .map(|c| c.activity.begin_call());
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            Ok(resp.map(|body| tonic::body::Body::new(Guarded::new(body, guard))))
        })
    }
}

/// A response body that holds `guard` until the body ends or is dropped.
pub struct Guarded<B, G> {
    inner: Pin<Box<B>>,
    guard: Option<G>,
}

impl<B, G> Guarded<B, G> {
    /// `body`, holding `guard`.
    pub fn new(body: B, guard: G) -> Self {
        Self {
            inner: Box::pin(body),
            guard: Some(guard),
        }
    }
}

impl<B, G> http_body::Body for Guarded<B, G>
where
    B: http_body::Body,
    G: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = this.inner.as_mut().poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            this.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Admitted connections of a plain-TCP listener as an `axum::serve` listener.
pub struct HttpListener {
    rx: Pin<Box<dyn Stream<Item = Accepted<TcpStream, ()>> + Send>>,
    local: SocketAddr,
}

impl HttpListener {
    /// Serves `listener` under `limits`; refusals go to `on_refused`.
    pub fn new(
        listener: TcpListener,
        limits: ListenerLimits,
        on_refused: OnRefused,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            rx: Box::pin(incoming(listener, PlainTcp, limits, on_refused)),
            local,
        })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Tracked<TcpStream, ()>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.next().await {
                Some(Ok(conn)) => {
                    let remote = conn.info.remote;
                    return (conn, remote);
                }
                Some(Err(e)) => debug!(error = %e, "accepting a metrics connection failed"),
                // The accept loop ended (it never does while this listener holds the stream).
                None => futures::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_by_ipv4_address_or_ipv6_network() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap_or(IpAddr::V4([0; 4].into()));
        assert_eq!(SourceKey::of(v4).to_string(), "10.1.2.3");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap_or(v4);
        assert_eq!(SourceKey::of(mapped), SourceKey::of(v4));
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(v4);
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap_or(v4);
        assert_eq!(SourceKey::of(a), SourceKey::of(b));
        assert_eq!(SourceKey::of(a).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn a_gate_caps_each_source_and_the_total_and_frees_on_drop() {
        let gate = Gate::new(3, 2);
        let one = SourceKey::of(IpAddr::V4([10, 0, 0, 1].into()));
        let two = SourceKey::of(IpAddr::V4([10, 0, 0, 2].into()));
        let a = gate.try_enter(one).expect("first");
        let _b = gate.try_enter(one).expect("second");
        assert_eq!(gate.try_enter(one).err(), Some(GateRefusal::Source(2)));
        let _c = gate.try_enter(two).expect("another source");
        assert_eq!(gate.try_enter(two).err(), Some(GateRefusal::Total(3)));
        drop(a);
        assert_eq!(gate.in_use(), 2);
        assert!(gate.try_enter(one).is_ok());
        assert_eq!(gate.in_use(), 2, "the permit above was dropped at once");
    }
}

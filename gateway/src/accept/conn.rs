//! An admitted connection: it keeps its place under the listener's caps while open, knows whether calls are in
//! flight on it, and closes itself once idle past the listener's timeout.

use std::fmt;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};
use tracing::debug;

use super::{GatePermit, IdleBy, ListenerLimits};

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
    /// Cancelled when the connection is closed, by the node or because it ended.
    closer: CancellationToken,
}

impl<I> ConnInfo<I> {
    /// The connection's activity (to mark calls in flight).
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Closes the connection at once: its next read or write fails, and the calls on it with it.
    pub fn close(&self) {
        self.closer.cancel();
    }

    /// Whether the connection has been closed or has ended.
    pub fn is_closed(&self) -> bool {
        self.closer.is_cancelled()
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
    /// Resolves when the listener closes all its connections or the node closes this one.
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Marks the connection closed once it ends, for those holding its [`ConnInfo`].
    _ended: DropGuard,
    _permit: GatePermit,
}

impl<IO, I> Tracked<IO, I> {
    pub(super) fn new(
        io: IO,
        info: I,
        remote: SocketAddr,
        permit: GatePermit,
        limits: &ListenerLimits,
    ) -> Self {
        let activity = Activity::new();
        activity.touch();
        // A token of its own: polling it never contends with the listener's other connections.
        let closer = limits.closing.child_token();
        Self {
            io,
            info: ConnInfo {
                remote,
                info,
                activity,
                closer: closer.clone(),
            },
            idle_timeout: limits.idle_timeout,
            idle_by: limits.idle_by,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            closing: Box::pin(closer.clone().cancelled_owned()),
            _ended: closer.drop_guard(),
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

    /// The error every read and write fails with once the listener closes its connections (registering the
    /// task to be woken then).
    fn closed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.closing.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the node closed the connection (it is shutting down, or the peer is no longer trusted)",
            )
        })
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
        if let Some(e) = this.closed(cx) {
            return Poll::Ready(Err(e));
        }
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
        if let Some(e) = this.closed(cx) {
            return Poll::Ready(Err(e));
        }
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if this.idle_by == IdleBy::Bytes && matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.info.activity.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_flush(cx)
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
        if let Some(e) = this.closed(cx) {
            return Poll::Ready(Err(e));
        }
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

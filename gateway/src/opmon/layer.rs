//! The tower layer that times every fedgate call of a server stack and counts its bytes: request in when the
//! call reaches the layer, response out when its body has ended; the gRPC code from the headers (an error
//! answered at once) or the trailers. A call whose caller goes away first is recorded CANCELLED.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use fedgate_proto::v1::OperationRecord;
use futures::future::BoxFuture;
use http::{Extensions, HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;

use super::OpMonitor;
use super::hook::{self, Cell};

/// Path prefix of the monitored services; health and reflection pass untouched.
const FEDGATE_PATH: &str = "/fedgate.v1.";

/// Wraps a server stack's routes in an [`OpMon`].
#[derive(Clone, Debug)]
pub struct OpMonLayer {
    monitor: OpMonitor,
}

impl OpMonLayer {
    /// A layer reporting to `monitor`.
    pub fn new(monitor: OpMonitor) -> Self {
        Self { monitor }
    }
}

impl<S> tower::Layer<S> for OpMonLayer {
    type Service = OpMon<S>;

    fn layer(&self, inner: S) -> OpMon<S> {
        OpMon {
            inner,
            monitor: self.monitor.clone(),
        }
    }
}

/// Times the fedgate calls through it and reports each to the node's monitor.
#[derive(Clone, Debug)]
pub struct OpMon<S> {
    inner: S,
    monitor: OpMonitor,
}

impl<S> tower::Service<Request<Body>> for OpMon<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(method) = method_of(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let request_bytes = Arc::new(AtomicU64::new(0));
        let mut pending = Pending {
            monitor: self.monitor.clone(),
            cell: Cell::default(),
            method,
            caller: caller(req.extensions()),
            request_in_ns: super::now_nanos(),
            started: Instant::now(),
            request_bytes: request_bytes.clone(),
            response_bytes: 0,
            code: None,
            done: false,
        };
        let req = req.map(|body| {
            Body::new(Counted {
                inner: Box::pin(body),
                bytes: request_bytes,
            })
        });
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = hook::scope(pending.cell.clone(), call).await?;
            pending.code = grpc_code(resp.headers());
            Ok(resp.map(|body| {
                Body::new(Observed {
                    inner: Box::pin(body),
                    pending,
                })
            }))
        })
    }
}

/// "Agency.Share" for "/fedgate.v1.Agency/Share"; `None` for other services.
fn method_of(path: &str) -> Option<String> {
    let (service, method) = path.strip_prefix(FEDGATE_PATH)?.split_once('/')?;
    Some(crate::limits::clamp(&format!("{service}.{method}"), 64))
}

/// The caller as operators know it: its certificate identity, else "public:<ip>" on the open-data listener.
fn caller(ext: &Extensions) -> String {
    if let Some(p) = crate::tls::peer_info_in(ext) {
        return p.peer.to_uri();
    }
    match ext.get::<crate::accept::ConnInfo<()>>() {
        Some(c) => format!("public:{}", c.remote.ip()),
        None => String::new(),
    }
}

/// The `grpc-status` of a header or trailer map.
fn grpc_code(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// One call being answered; reported once, when its response ends or is dropped.
struct Pending {
    monitor: OpMonitor,
    cell: Cell,
    method: String,
    caller: String,
    request_in_ns: i64,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    code: Option<i32>,
    done: bool,
}

impl Pending {
    fn report(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let x = hook::read(&self.cell);
        let record = OperationRecord {
            node_code: self.monitor.node.to_string(),
            request_id: x.request_id,
            method: std::mem::take(&mut self.method),
            caller: std::mem::take(&mut self.caller),
            next_hop: x.next_hop,
            resource_id: x.resource_id,
            consumer_uscc: x.consumer_uscc,
            consumer_node: x.consumer_node,
            mode: x.mode,
            request_in_unix_nanos: self.request_in_ns,
            request_out_unix_nanos: x.request_out_ns,
            response_in_unix_nanos: x.response_in_ns,
            response_out_unix_nanos: super::now_nanos(),
            request_bytes: self.request_bytes.load(Ordering::Relaxed),
            response_bytes: self.response_bytes,
            code: self.code.unwrap_or(tonic::Code::Cancelled as i32),
        };
        self.monitor
            .finish(record, self.started.elapsed(), x.at_next);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.report();
    }
}

/// A request body counting the bytes read from it.
struct Counted {
    inner: Pin<Box<Body>>,
    bytes: Arc<AtomicU64>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let r = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &r
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body counting its bytes, reading the code from its trailers, and reporting the call at its end.
struct Observed {
    inner: Pin<Box<Body>>,
    pending: Pending,
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let r = self.inner.as_mut().poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.pending.response_bytes += data.len() as u64;
                } else if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                    self.pending.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                self.pending.code = Some(status.code() as i32);
                self.pending.report();
            }
            Poll::Ready(None) => {
                // A body that ends without a status is not a gRPC answer.
                if self.pending.code.is_none() {
                    self.pending.code = Some(tonic::Code::Unknown as i32);
                }
                self.pending.report();
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

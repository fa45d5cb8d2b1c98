//! The outermost layer of every listener: a request body that is not well-formed gRPC framing, or whose message
//! does not decode, is refused with INVALID_ARGUMENT (never tonic's INTERNAL) and audited, naming the RPC.
//!
//! Decoding failures are marked by the codec of the generated services ([`fedgate_proto::codec`]); framing is
//! checked here, on the body as it streams in, so nothing is buffered beyond what tonic reads anyway.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use fedgate_proto::codec::{MALFORMED_KEY, malformed};
use futures::future::BoxFuture;
use http::{Extensions, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::audit::{self, AuditLog};

/// Path prefix of the fedgate services; other services (health, reflection) pass untouched.
const FEDGATE_PATH: &str = "/fedgate.v1.";
/// Bytes of a gRPC message header: the compression flag and the length.
const HEADER: usize = 5;

/// Wraps a listener's routes in a [`Guard`].
#[derive(Clone)]
pub struct GuardLayer {
    audit: AuditLog,
}

impl GuardLayer {
    /// A layer auditing refusals into `audit`.
    pub fn new(audit: AuditLog) -> Self {
        Self { audit }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            audit: self.audit.clone(),
        }
    }
}

/// Checks the framing of fedgate request bodies and audits refusals of malformed messages.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    audit: AuditLog,
}

impl<S> tower::Service<Request<Body>> for Guard<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let rpc = rpc_name(req.uri().path());
        let actor = actor(req.extensions());
        let req = match rpc {
            Some(_) => req.map(|body| Body::new(Framed::new(body))),
            None => req,
        };
        // The clone is ready only once polled; keep the one that was (tower's clone-and-swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let audit = self.audit.clone();
        Box::pin(async move {
            let mut resp = inner.call(req).await?;
            if rpc.is_none() {
                standard_decode_error(&mut resp);
            }
            if resp.headers_mut().remove(MALFORMED_KEY).is_some() {
                let message = Status::from_header_map(resp.headers())
                    .map(|s| s.message().to_owned())
                    .unwrap_or_default();
                let mut r = audit::event(fedgate_proto::v1::AuditOperation::AuthRefused, actor);
                r.outcome = audit::outcome(tonic::Code::InvalidArgument);
                r.detail = format!("{}: {message}", rpc.unwrap_or_default());
                if let Err(e) = audit.record(r).await {
                    tracing::error!(error = %e, "refusal of a malformed message not audited");
                }
            }
            Ok(resp)
        })
    }
}

/// The standard services (health, reflection) decode with prost's own codec, which answers a body that does not
/// decode as INTERNAL: when that answer comes at once (in the headers), it is the caller's mistake and says so.
fn standard_decode_error(resp: &mut Response<Body>) {
    let Some(status) = Status::from_header_map(resp.headers()) else {
        return;
    };
    if status.code() == tonic::Code::Internal && status.message().starts_with("failed to decode") {
        let refused = Status::invalid_argument(crate::limits::clamp(status.message(), 256));
        if let Err(e) = refused.add_header(resp.headers_mut()) {
            tracing::debug!(error = %e, "decode error left as it was");
        }
    }
}

/// "Agency.Share" for "/fedgate.v1.Agency/Share"; `None` for other services.
fn rpc_name(path: &str) -> Option<String> {
    let (service, method) = path.strip_prefix(FEDGATE_PATH)?.split_once('/')?;
    Some(crate::limits::clamp(&format!("{service}.{method}"), 64))
}

/// The caller as audit records name it: its certificate identity, else "public:<ip>" on the open-data listener.
fn actor(ext: &Extensions) -> String {
    if let Some(p) = crate::tls::peer_info_in(ext) {
        return p.peer.to_uri();
    }
    if let Some(c) = ext.get::<crate::accept::ConnInfo<()>>() {
        return format!("public:{}", c.remote.ip());
    }
    let tcp = ext
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .map(TlsConnectInfo::get_ref)
        .or_else(|| ext.get::<TcpConnectInfo>());
    match tcp.and_then(TcpConnectInfo::remote_addr) {
        Some(addr) => format!("public:{}", addr.ip()),
        None => String::new(),
    }
}

/// A request body checked frame by frame against gRPC's length-prefixed framing: flag 0 (no compression is
/// accepted), whole messages, at least one. A violation ends the body with a [`malformed`] status, which tonic
/// answers as it is.
struct Framed {
    inner: Body,
    header: [u8; HEADER],
    have: usize,
    remaining: usize,
    messages: u64,
    done: bool,
}

impl Framed {
    fn new(inner: Body) -> Self {
        Self {
            inner,
            header: [0; HEADER],
            have: 0,
            remaining: 0,
            messages: 0,
            done: false,
        }
    }

    fn scan(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (HEADER - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < HEADER {
                continue;
            }
            match self.header[0] {
                0 => {}
                1 => {
                    return Err(malformed(
                        "the message is marked compressed, but this node accepts no compression",
                    ));
                }
                flag => {
                    return Err(malformed(format!(
                        "the message header has compression flag {flag}; only 0 is accepted"
                    )));
                }
            }
            let [_, a, b, c, d] = self.header;
            self.remaining = u32::from_be_bytes([a, b, c, d]) as usize;
            self.have = 0;
            self.messages += 1;
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), Status> {
        if self.have > 0 || self.remaining > 0 {
            return Err(malformed(
                "the request body ends inside a message: it was cut short",
            ));
        }
        if self.messages == 0 {
            return Err(malformed("the request body carries no message"));
        }
        Ok(())
    }
}

impl HttpBody for Framed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.scan(data)
                {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => {
                this.done = true;
                Poll::Ready(this.finish().err().map(Err))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed() -> Framed {
        Framed::new(Body::empty())
    }

    #[test]
    fn framing_is_checked_across_chunks() {
        let mut f = framed();
        f.scan(&[0, 0, 0]).expect("partial header");
        f.scan(&[0, 3, b'a']).expect("header and part of the body");
        assert!(f.finish().is_err(), "cut short");
        f.scan(b"bc").expect("rest of the body");
        f.finish().expect("one whole message");
        f.scan(&[0, 0, 0, 0, 0])
            .expect("an empty message is a message");
        f.finish().expect("two whole messages");

        let e = framed().scan(&[2, 0, 0, 0, 0]).expect_err("bad flag");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(fedgate_proto::codec::is_malformed(&e));
        assert!(framed().scan(&[1, 0, 0, 0, 0]).is_err(), "compressed");
        assert!(framed().finish().is_err(), "no message");
    }

    #[test]
    fn rpc_names_come_from_fedgate_paths_only() {
        assert_eq!(
            rpc_name("/fedgate.v1.Agency/Share").as_deref(),
            Some("Agency.Share")
        );
        assert_eq!(rpc_name("/grpc.health.v1.Health/Check"), None);
        assert_eq!(rpc_name("/fedgate.v1.Agency"), None);
    }
}

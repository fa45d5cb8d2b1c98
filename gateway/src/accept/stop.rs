//! Cutting off the calls still in flight when a stopping node's shutdown grace has passed: each is answered
//! UNAVAILABLE at once (its handler is dropped, and every hop records it as cancelled), before the node closes
//! its connections.

use std::task::{Context, Poll};

use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::ResponseFuture;
use crate::ident::DivisionCode;

/// A tower layer answering every call still in flight UNAVAILABLE once `stop` is cancelled.
#[derive(Debug, Clone)]
pub struct StopCallsLayer {
    node: DivisionCode,
    stop: CancellationToken,
}

impl StopCallsLayer {
    /// The layer of node `node`'s server, cutting calls off when `stop` is cancelled.
    pub fn new(node: DivisionCode, stop: CancellationToken) -> Self {
        Self { node, stop }
    }
}

impl<S> tower::Layer<S> for StopCallsLayer {
    type Service = StopCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StopCalls {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`StopCallsLayer`].
#[derive(Debug, Clone)]
pub struct StopCalls<S> {
    inner: S,
    layer: StopCallsLayer,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for StopCalls<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = self.inner.call(req);
        let StopCallsLayer { node, stop } = self.layer.clone();
        Box::pin(async move {
            tokio::select! {
                answered = call => Ok(answered?.map(tonic::body::Body::new)),
                () = stop.cancelled() => Ok(Status::unavailable(format!(
                    "node {node} is shutting down and cut this call off; retry it"
                ))
                .into_http()),
            }
        })
    }
}

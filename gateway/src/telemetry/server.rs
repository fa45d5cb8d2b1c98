//! The server side of trace propagation: one span per incoming call, continuing the caller's trace.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::ident::DivisionCode;

/// A tower layer giving every call a server span of node `node`, child of the trace context the call carries.
#[derive(Debug, Clone, Copy)]
pub struct TraceLayer {
    node: DivisionCode,
}

impl TraceLayer {
    /// The layer of node `node`'s servers.
    pub fn new(node: DivisionCode) -> Self {
        Self { node }
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceCalls {
            inner,
            node: self.node,
        }
    }
}

/// The service of [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct TraceCalls<S> {
    inner: S,
    node: DivisionCode,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TraceCalls<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let name = path.trim_start_matches('/');
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            fedgate.node = %self.node,
            fedgate.outcome = tracing::field::Empty,
            fedgate.kind = tracing::field::Empty,
            fedgate.resource = tracing::field::Empty,
            fedgate.consumer = tracing::field::Empty,
            fedgate.consumer_node = tracing::field::Empty,
            fedgate.mode = tracing::field::Empty,
        );
        let parent = super::extract(req.headers());
        // Without an OpenTelemetry layer the span has no trace of its own: the caller's context is handed on as
        // it came, so a node that does not export still keeps its neighbours' traces whole.
        let passed_on = match span.set_parent(parent.clone()) {
            Err(_) if parent.span().span_context().is_valid() => Some(parent),
            _ => None,
        };
        let call = span.in_scope(|| self.inner.call(req));
        let recorded = span.clone();
        let answered = async move {
            let answer = call.await;
            if let Ok(resp) = &answer {
                // A failed unary call answers in its headers (trailers-only); a streamed answer began well.
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                recorded.record("rpc.grpc.status_code", code as i32);
                recorded.record("fedgate.outcome", super::code_name(code));
                if code != tonic::Code::Ok {
                    recorded.record("otel.status_code", "error");
                }
                tracing::debug!(code = super::code_name(code), "call answered");
            }
            answer
        }
        .instrument(span);
        match passed_on {
            Some(cx) => Box::pin(answered.with_context(cx)),
            None => Box::pin(answered),
        }
    }
}

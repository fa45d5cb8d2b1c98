//! Traces and logs: W3C trace context carried between nodes in gRPC metadata, a server span per call, and the
//! OpenTelemetry export and log format a node runs with.
//!
//! Spans are ordinary `tracing` spans. When OTLP export is configured (see [`install`]), a
//! `tracing-opentelemetry` layer turns them into OpenTelemetry spans; otherwise they cost what any `tracing`
//! span costs, and a trace context that arrives with a call is still handed on to the next hop unchanged.
//!
//! Span attributes name the node, resource, consumer, mode and outcome of an operation; never a key, a field's
//! value or anything else a request or answer carries as data.

mod install;
mod logs;
mod propagate;
mod server;

pub use install::{LogFormat, Telemetry, TelemetryError, install, otlp_configured, service_name};
pub use logs::{LogLayer, log_layer};
pub use propagate::{current_trace_id, extract, inject, traced};
pub use server::{TraceCalls, TraceLayer};

pub use crate::audit::code_name;

/// The span attribute naming the node a span was recorded at (in-process federations share one exporter).
pub const NODE: &str = "fedgate.node";

/// Records `result`'s outcome on `span` (declared with `fedgate.outcome` and `otel.status_code` fields): the
/// gRPC code name, and an error status when it failed.
pub fn record_outcome<T>(span: &tracing::Span, result: &crate::error::Result<T>) {
    match result {
        Ok(_) => {
            span.record("fedgate.outcome", "OK");
        }
        Err(e) => {
            span.record("fedgate.outcome", code_name(e.code()));
            span.record("otel.status_code", "error");
        }
    }
}

/// Names the request the current server span serves: its kind, resource, consumer and mode (identifiers only).
pub fn annotate_hop(env: &fedgate_proto::v1::Envelope) {
    use fedgate_proto::v1::{RequestKind, ShareMode};
    let span = tracing::Span::current();
    let kind = RequestKind::try_from(env.kind).unwrap_or(RequestKind::Share);
    span.record("fedgate.kind", kind.as_str_name());
    span.record("fedgate.resource", env.resource_id.as_str());
    span.record("fedgate.consumer", env.consumer_uscc.as_str());
    span.record("fedgate.consumer_node", env.consumer_node.as_str());
    if kind == RequestKind::Share {
        let mode = ShareMode::try_from(env.mode).unwrap_or(ShareMode::Query);
        span.record("fedgate.mode", mode.as_str_name());
    }
}

#[cfg(test)]
mod tests;

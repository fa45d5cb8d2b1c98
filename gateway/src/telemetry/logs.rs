//! Log lines as text or JSON, each carrying the trace id of the trace it was written in.

use std::fmt::Write as _;

use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use super::LogFormat;

/// A log layer over subscriber `S`, as [`log_layer`] builds it.
pub type LogLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// The log layer writing `format` lines to `writer` (`ansi`: colour text lines). A line written inside a trace
/// ends with `trace_id=<32 hex digits>` (text) or carries a top-level `"trace_id"` field (JSON).
pub fn log_layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> LogLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .event_format(WithTraceId {
                inner: tracing_subscriber::fmt::format().with_ansi(ansi),
                format,
            })
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .event_format(WithTraceId {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
                format,
            })
            .boxed(),
    }
}

/// An event format that adds the current trace id to the line `inner` writes.
struct WithTraceId<F> {
    inner: F,
    format: LogFormat,
}

impl<S, N, F> FormatEvent<S, N> for WithTraceId<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let Some(trace_id) = super::current_trace_id() else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        match (self.format, body.strip_suffix('}')) {
            (LogFormat::Json, Some(object)) => {
                writeln!(writer, "{object},\"trace_id\":\"{trace_id}\"}}")
            }
            _ => {
                let mut out = String::with_capacity(body.len() + 48);
                let _ = write!(out, "{body} trace_id={trace_id}");
                writeln!(writer, "{out}")
            }
        }
    }
}

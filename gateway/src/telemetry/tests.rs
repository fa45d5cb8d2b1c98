use std::sync::{Arc, Mutex};

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

use super::*;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().map(|b| b.clone()).unwrap_or_default()).into_owned()
    }
}

/// Logs one line outside any span and one inside a span, with `format`; returns the output and the span's
/// trace id.
fn two_lines(format: LogFormat) -> (String, String) {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let out = Buffer::default();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("unit")))
        .with(log_layer(format, out.clone(), false));
    let trace_id = tracing::subscriber::with_default(subscriber, || {
        tracing::info!("outside");
        let span = tracing::info_span!("work");
        let id = span.context().span().span_context().trace_id().to_string();
        span.in_scope(|| tracing::info!(step = 1, "inside"));
        id
    });
    (out.text(), trace_id)
}

#[test]
fn text_lines_inside_a_trace_end_with_its_id_and_others_carry_none() {
    let (text, trace_id) = two_lines(LogFormat::Text);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].ends_with("outside"), "{}", lines[0]);
    assert!(!lines[0].contains("trace_id"));
    assert!(
        lines[1].ends_with(&format!("step=1 trace_id={trace_id}")),
        "{}",
        lines[1]
    );
}

#[test]
fn json_lines_inside_a_trace_carry_its_id_as_a_field() {
    let (text, trace_id) = two_lines(LogFormat::Json);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].get("trace_id").is_none());
    assert_eq!(lines[0]["fields"]["message"], "outside");
    assert_eq!(lines[1]["trace_id"], trace_id);
    assert_eq!(lines[1]["fields"]["step"], 1);
    assert_eq!(lines[1]["span"]["name"], "work");
}

#[test]
fn log_formats_parse_from_their_names_only() {
    assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
    assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
    assert!("yaml".parse::<LogFormat>().is_err());
}

/// A node that exports nothing still hands the caller's trace context on to the next hop.
#[tokio::test]
async fn without_an_exporter_the_server_layer_passes_the_callers_context_on() {
    use tower::{Layer as _, Service as _, ServiceExt as _};
    let code: crate::ident::DivisionCode = "350102".parse().expect("code");
    let inner = tower::service_fn(|_req: http::Request<()>| async {
        let onward = traced(());
        let tp = onward
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok::<_, std::convert::Infallible>(http::Response::new(tp))
    });
    let mut svc = TraceLayer::new(code).layer(inner);
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = http::Request::builder()
        .uri("/fedgate.v1.Federation/Forward")
        .header("traceparent", sent)
        .body(())
        .expect("request");
    let subscriber = tracing_subscriber::registry();
    let _guard = tracing::subscriber::set_default(subscriber);
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("answered");
    assert_eq!(resp.body(), sent);
}

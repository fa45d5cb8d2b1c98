//! Installing a process's tracing: the log layer, and OpenTelemetry export over OTLP when the standard
//! environment variables ask for it.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::ident::DivisionCode;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?} is neither text nor json")),
        }
    }
}

/// Why tracing could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from the environment.
    #[error("OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The environment asks for an OTLP protocol other than gRPC, the one built in.
    #[error("{variable}={value:?}: only the OTLP gRPC protocol (\"grpc\", port 4317) is built in")]
    Protocol {
        /// The variable that names it.
        variable: &'static str,
        /// What it names.
        value: String,
    },
    /// A global subscriber was installed already.
    #[error("tracing is installed already: {0}")]
    Installed(#[from] tracing_subscriber::util::TryInitError),
}

/// The installed tracing of a process; [`Telemetry::shutdown`] flushes the spans not yet exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("fedgate: flushing traces: {e}");
        }
    }
}

/// Whether `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` names an endpoint.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Refuses an `OTEL_EXPORTER_OTLP_*PROTOCOL` other than `grpc` (spans would go, unread, to a port that speaks
/// another protocol).
fn check_protocol() -> Result<(), TelemetryError> {
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(value) = std::env::var(variable)
            && !value.trim().is_empty()
            && value.trim() != "grpc"
        {
            return Err(TelemetryError::Protocol { variable, value });
        }
    }
    Ok(())
}

/// The service name node `code` exports its spans under: `OTEL_SERVICE_NAME`, else `fedgate-<code>`.
pub fn service_name(code: DivisionCode) -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| format!("fedgate-{code}"))
}

/// Installs the process's global subscriber: `RUST_LOG` (else `default_filter`), log lines in `format` on
/// standard error, and, when [`otlp_configured`], spans exported over OTLP/gRPC as `service`. Must be called
/// inside a Tokio runtime (the exporter's channel runs on it), which must outlive [`Telemetry::shutdown`].
pub fn install(
    service: Option<&str>,
    format: LogFormat,
    default_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = match service {
        Some(name) if otlp_configured() => {
            check_protocol()?;
            Some(otlp_provider(name)?)
        }
        _ => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("fedgate")));
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(super::log_layer(format, std::io::stderr, ansi))
        .try_init()?;
    Ok(Telemetry { provider })
}

/// A tracer provider batching spans to the OTLP/gRPC endpoint the environment names.
fn otlp_provider(service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}

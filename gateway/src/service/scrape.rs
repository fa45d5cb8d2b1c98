//! The metrics endpoint: `GET /metrics` in the OpenMetrics text format, on a listener of its own, for the
//! operator's scraper. It carries counts and stream positions only, never a record or a name.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fedgate_proto::v1::Stream;

use crate::metrics::NodeMetrics;
use crate::store::Store;
use crate::uplink::Uplink;

/// What a scrape reads: the node's counters, and the upward streams' positions.
#[derive(Clone)]
pub struct ScrapeState {
    metrics: Arc<NodeMetrics>,
    store: Arc<dyn Store>,
    /// Absent on the province.
    uplink: Option<Uplink>,
}

impl ScrapeState {
    /// The state of one node's endpoint.
    pub fn new(metrics: Arc<NodeMetrics>, store: Arc<dyn Store>, uplink: Option<Uplink>) -> Self {
        Self {
            metrics,
            store,
            uplink,
        }
    }
}

/// The endpoint's routes.
pub fn router(state: ScrapeState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(state)
}

async fn scrape(State(s): State<ScrapeState>) -> Response {
    if let Some(uplink) = &s.uplink {
        for stream in [Stream::Catalog, Stream::Audit] {
            let p = match uplink.progress(stream, s.store.as_ref()).await {
                Ok(p) => p,
                Err(e) => {
                    return (StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}\n"))
                        .into_response();
                }
            };
            let labels = [("stream", stream_label(stream))];
            let m = &s.metrics;
            m.uplink_head.get_or_create(&labels).set(gauge(p.head));
            m.uplink_acked.get_or_create(&labels).set(gauge(p.acked));
            m.uplink_lag.get_or_create(&labels).set(gauge(p.lag()));
            m.uplink_connected
                .get_or_create(&labels)
                .set(i64::from(p.connected));
            m.uplink_shipping
                .get_or_create(&labels)
                .set(i64::from(p.shipping));
        }
    }
    match s.metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n").into_response(),
    }
}

fn stream_label(stream: Stream) -> &'static str {
    match stream {
        Stream::Audit => "audit",
        _ => "catalog",
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

//! What a node tells probes about itself, in one place: the gRPC health service of each listener and the HTTP
//! `/livez` and `/readyz` of the metrics listener read the same state, so they never disagree.
//!
//! A node is ready while its storage answers and it is not draining. Whether its parent is reachable does not
//! count: a county whose city is down still serves its own agencies, and taking it out of service would turn one
//! outage into two (the uplink's state is in `/metrics`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::store::Store;

/// How often the storage is probed.
pub const STORAGE_PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one storage probe may take before the storage counts as unavailable.
pub const STORAGE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a node is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The node is stopping: it lets calls in flight finish and takes no new ones.
    Draining,
    /// The last storage probe failed, for this reason.
    Storage(String),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Draining => f.write_str("draining"),
            NotReady::Storage(why) => write!(f, "storage unavailable: {why}"),
        }
    }
}

/// The node's readiness as every probe reports it, and the health services that publish it.
#[derive(Clone, Default)]
pub struct Probe {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    draining: AtomicBool,
    /// Why the last storage probe failed; `None` while it answers.
    storage: Mutex<Option<String>>,
    /// The health reporter of each gRPC listener and the services that listener serves.
    listeners: Mutex<Vec<(HealthReporter, Vec<&'static str>)>>,
    /// Held while statuses are published, so that a late storage result never overwrites the drain.
    publishing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("ready", &self.readiness())
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// A probe of a node that is starting: ready until a storage probe fails or the node drains.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ready, or every reason the node is not.
    pub fn readiness(&self) -> Result<(), Vec<NotReady>> {
        let mut why = Vec::new();
        if self.inner.draining.load(Ordering::SeqCst) {
            why.push(NotReady::Draining);
        }
        if let Some(e) = lock(&self.inner.storage).clone() {
            why.push(NotReady::Storage(e));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }

    /// The health service of one gRPC listener, answering for the overall server ("") and for each of
    /// `services` (fully qualified names) with the node's readiness.
    pub async fn health_service(&self, services: &[&'static str]) -> HealthServer<HealthService> {
        let reporter = HealthReporter::new();
        let status = self.status();
        reporter.set_service_status("", status).await;
        for s in services {
            reporter.set_service_status(*s, status).await;
        }
        lock(&self.inner.listeners).push((reporter.clone(), services.to_vec()));
        HealthServer::new(HealthService::from_health_reporter(reporter))
    }

    /// Marks the node as draining: every service of every listener turns NOT_SERVING, and each `Watch` stream
    /// ends after it has told its watcher, so that no watcher holds the drain open.
    pub async fn drain(&self) {
        let _publishing = self.inner.publishing.lock().await;
        self.inner.draining.store(true, Ordering::SeqCst);
        for (mut reporter, services) in self.listeners() {
            for s in std::iter::once("").chain(services) {
                reporter
                    .set_service_status(s, ServingStatus::NotServing)
                    .await;
                reporter.clear_service_status(s).await;
            }
        }
    }

    /// Probes `store` every `every`, each probe bounded by `timeout`, until `shutdown`; turns every service
    /// NOT_SERVING while the storage fails and SERVING again once it answers.
    pub async fn watch_storage(
        self,
        store: Arc<dyn Store>,
        (every, timeout): (Duration, Duration),
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let problem = match tokio::time::timeout(timeout, store.ping()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {} ms", timeout.as_millis())),
            };
            self.set_storage(problem).await;
        }
    }

    /// Records the outcome of a storage probe and publishes it when it changes the node's readiness.
    async fn set_storage(&self, problem: Option<String>) {
        let _publishing = self.inner.publishing.lock().await;
        {
            let mut storage = lock(&self.inner.storage);
            if storage.is_some() == problem.is_some() {
                *storage = problem;
                return;
            }
            match &problem {
                Some(e) => {
                    tracing::warn!(error = %e, "storage does not answer: health NOT_SERVING")
                }
                None => tracing::info!("storage answers again: health SERVING"),
            }
            *storage = problem;
        }
        if self.inner.draining.load(Ordering::SeqCst) {
            return;
        }
        let status = self.status();
        for (reporter, services) in self.listeners() {
            for s in std::iter::once("").chain(services) {
                reporter.set_service_status(s, status).await;
            }
        }
    }

    fn status(&self) -> ServingStatus {
        match self.readiness() {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        }
    }

    fn listeners(&self) -> Vec<(HealthReporter, Vec<&'static str>)> {
        lock(&self.inner.listeners).clone()
    }
}

/// `GET /livez` (200 while the process answers) and `GET /readyz` (200 when ready, else 503 naming each
/// reason), for the metrics listener.
pub fn routes(probe: Probe) -> axum::Router {
    axum::Router::new()
        .route("/livez", get(|| async { "live\n" }))
        .route("/readyz", get(readyz))
        .with_state(probe)
}

async fn readyz(State(probe): State<Probe>) -> Response {
    match probe.readiness() {
        Ok(()) => "ready\n".into_response(),
        Err(why) => {
            let why: Vec<String> = why.iter().map(ToString::to_string).collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", why.join("; ")),
            )
                .into_response()
        }
    }
}

/// The guarded value, also after a panic elsewhere (the state is a flag and a message: never half-written).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_names_every_reason() {
        let probe = Probe::new();
        assert_eq!(probe.readiness(), Ok(()));
        probe.set_storage(Some("gone".into())).await;
        assert_eq!(
            probe.readiness(),
            Err(vec![NotReady::Storage("gone".into())])
        );
        probe.drain().await;
        assert_eq!(
            probe.readiness(),
            Err(vec![NotReady::Draining, NotReady::Storage("gone".into())])
        );
        probe.set_storage(None).await;
        assert_eq!(probe.readiness(), Err(vec![NotReady::Draining]));
    }
}

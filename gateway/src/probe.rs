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
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response as GrpcResponse, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_check_response};
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
    pub async fn health_service(&self, services: &[&'static str]) -> HealthServer<ListenerHealth> {
        HealthServer::new(self.listener_health(services).await)
    }

    async fn listener_health(&self, services: &[&'static str]) -> ListenerHealth {
        let reporter = HealthReporter::new();
        let status = self.status();
        reporter.set_service_status("", status).await;
        for s in services {
            reporter.set_service_status(*s, status).await;
        }
        lock(&self.inner.listeners).push((reporter.clone(), services.to_vec()));
        ListenerHealth {
            probe: self.clone(),
            services: services.to_vec(),
            reporter: HealthService::from_health_reporter(reporter),
        }
    }

    /// Marks the node as draining: every service of every listener turns NOT_SERVING (`Check` keeps answering
    /// so), and each `Watch` stream ends after it has told its watcher, so that no watcher holds the drain open.
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

/// The gRPC health service of one listener: the reporter's statuses while the node runs; once it drains,
/// NOT_SERVING for every service the listener serves, each `Watch` answering once and ending.
#[derive(Debug)]
pub struct ListenerHealth {
    probe: Probe,
    services: Vec<&'static str>,
    reporter: HealthService,
}

impl ListenerHealth {
    /// NOT_SERVING for a service of this listener while the node drains; `None` while it runs.
    fn draining(&self, service: &str) -> Option<Result<HealthCheckResponse, Status>> {
        if !self.probe.inner.draining.load(Ordering::SeqCst) {
            return None;
        }
        if !service.is_empty() && !self.services.contains(&service) {
            return Some(Err(Status::not_found(format!(
                "service {service:?} is not served on this listener"
            ))));
        }
        Some(Ok(HealthCheckResponse {
            status: health_check_response::ServingStatus::NotServing.into(),
        }))
    }
}

#[tonic::async_trait]
impl Health for ListenerHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<GrpcResponse<HealthCheckResponse>, Status> {
        match self.draining(&request.get_ref().service) {
            Some(answer) => answer.map(GrpcResponse::new),
            None => self.reporter.check(request).await,
        }
    }

    type WatchStream = BoxStream<'static, Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        if let Some(answer) = self.draining(&request.get_ref().service) {
            return Ok(GrpcResponse::new(stream::once(async { answer }).boxed()));
        }
        let watching = self.reporter.watch(request).await?.into_inner();
        Ok(GrpcResponse::new(watching.boxed()))
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

    async fn check(health: &ListenerHealth, service: &str) -> Result<i32, tonic::Code> {
        let asked = Request::new(HealthCheckRequest {
            service: service.into(),
        });
        health
            .check(asked)
            .await
            .map(|r| r.into_inner().status)
            .map_err(|s| s.code())
    }

    #[tokio::test]
    async fn check_and_watch_answer_not_serving_through_the_drain() {
        use health_check_response::ServingStatus as S;
        let probe = Probe::new();
        let health = &probe.listener_health(&["fedgate.v1.Agency"]).await;
        assert_eq!(
            check(health, "fedgate.v1.Agency").await,
            Ok(S::Serving.into())
        );
        let mut before = health
            .watch(Request::new(HealthCheckRequest { service: "".into() }))
            .await
            .map(GrpcResponse::into_inner)
            .ok();
        probe.drain().await;
        for s in ["", "fedgate.v1.Agency"] {
            assert_eq!(check(health, s).await, Ok(S::NotServing.into()), "{s:?}");
        }
        assert_eq!(
            check(health, "fedgate.v1.Provider").await,
            Err(tonic::Code::NotFound)
        );
        let mut during = health
            .watch(Request::new(HealthCheckRequest {
                service: "fedgate.v1.Agency".into(),
            }))
            .await
            .map(GrpcResponse::into_inner)
            .ok();
        for stream in [&mut before, &mut during] {
            let stream = stream.as_mut().expect("a watch stream");
            let mut seen = Vec::new();
            while let Some(next) = stream.next().await {
                seen.push(next.map(|r| r.status).map_err(|s| s.code()));
            }
            assert_eq!(seen.last(), Some(&Ok(S::NotServing.into())), "{seen:?}");
        }
    }
}

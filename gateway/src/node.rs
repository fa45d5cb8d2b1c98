//! Assembles a node from its configuration and serves it until shut down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fedgate_proto::v1::agency_server::{self, AgencyServer};
use fedgate_proto::v1::federation_server::{self, FederationServer};
use fedgate_proto::v1::open_data_server::{self, OpenDataServer};
use fedgate_proto::v1::operator_server::{self, OperatorServer};
use fedgate_proto::v1::{KeyEndorsement, Stream};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::accept::{self, SourceKey, StopCallsLayer, TrackCallsLayer};
use crate::admission::Admission;
use crate::assertion::Assertions;
use crate::audit::AuditLog;
use crate::cache::{ServedNodes, ShareCache};
use crate::clock::{Clock, SystemClock};
use crate::config::{Checked, NodeConfig, StorageConfig};
use crate::downlink::Downlink;
use crate::governance::{Governance, SCAN_PAGE};
use crate::grant::{GrantError, GrantKey};
use crate::ident::{DivisionCode, Peer};
use crate::limits::GuardLayer;
use crate::metrics::NodeMetrics;
use crate::probe::{Probe, STORAGE_PROBE_EVERY, STORAGE_PROBE_TIMEOUT};
use crate::refusals::{Refusal, RefusalKind, RefusalLog};
use crate::route::Router;
use crate::service::{
    AgencyService, FederationService, OpenDataService, OperatorService, reflect, scrape,
};
use crate::statement::StatementVerifier;
use crate::store::{PgStore, Retrying, SqliteStore, Store, StoreChange, StoreError};
use crate::tls::dynamic::DynamicTls;
use crate::tls::reload::{CertReloader, ReloadTargets};
use crate::tls::trust::TrustFiles;
use crate::tls::{self, HandshakeFailure};
use crate::topology::Topology;
use crate::uplink::{Recovery, Uplink};

/// Why a node could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::error::Error),
    /// TLS files could not be loaded or used.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// Storage failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The configured storage could not be opened.
    #[error("cannot open storage {at}: {error}")]
    StoreOpen {
        /// The file or the URL (without password).
        at: String,
        /// What went wrong.
        error: StoreError,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// Address from the configuration.
        addr: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The node's signing key could not be loaded or created.
    #[error("signing key: {0}")]
    Key(#[from] GrantError),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A running node.
pub struct NodeHandle {
    code: DivisionCode,
    addr: SocketAddr,
    open_data_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    console_addr: Option<SocketAddr>,
    console: crate::console::Console,
    store: Arc<dyn Store>,
    uplink: Uplink,
    metrics: Arc<NodeMetrics>,
    audit: Option<AuditLog>,
    audit_writer: JoinHandle<()>,
    governance: Governance,
    own_view: crate::own_view::OwnView,
    probe: Probe,
    /// The metrics listener (also `/livez` and `/readyz`): stopped by its token once the node has drained.
    metrics_server: Option<(tokio_util::sync::CancellationToken, JoinHandle<()>)>,
    shutdown: watch::Sender<bool>,
    grace: std::time::Duration,
    stopping: tokio_util::sync::CancellationToken,
    closing: tokio_util::sync::CancellationToken,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
    certificates: CertReloader,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("code", &self.code)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Binds the configured listen address.
pub async fn bind(config: &NodeConfig) -> Result<TcpListener, NodeError> {
    Ok(listen(&config.listen).await?.0)
}

/// Starts a node on its configured address.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    let listener = bind(&config).await?;
    start_on(config, listener).await
}

/// Starts a node on an already bound listener (tests bind every node's port before starting any).
pub async fn start_on(config: NodeConfig, listener: TcpListener) -> Result<NodeHandle, NodeError> {
    start_with_clock(config, listener, Arc::new(SystemClock::default())).await
}

/// Starts a node on a bound listener with the given clock (tests move time forward to reach deadlines).
pub async fn start_with_clock(
    config: NodeConfig,
    listener: TcpListener,
    clock: Arc<dyn Clock>,
) -> Result<NodeHandle, NodeError> {
    // The same checks as `fedgate check-config`, every problem named at once.
    let Checked {
        trust,
        key_path,
        calendar,
        ..
    } = config.check().map_err(|problems| {
        let all: Vec<String> = problems.iter().map(ToString::to_string).collect();
        NodeError::Config(crate::error::Error::InvalidArgument(all.join("; ")))
    })?;
    let limits = config.limits;
    let trust_files = TrustFiles::of(&config);
    let tls = trust.material.clone();
    let revoked = trust.revoked.clone();
    let dynamic_tls = DynamicTls::new(trust.state.clone(), revoked.clone());
    let topology = Arc::new(Topology::from_config(&config, &dynamic_tls)?);
    let code = topology.code;
    // Contention never reaches a caller as a storage failure: it is waited for and retried up to the bound.
    let store: Arc<dyn Store> = Arc::new(Retrying::new(
        open_store(&config.storage).await?,
        code.to_string(),
        config.storage.busy_timeout(),
    ));
    if topology.parent.is_some() {
        // Before anything is written: what this run writes is compared with what the parent holds at its Join.
        store.mark_unconfirmed(code.as_str()).await?;
    }
    let addr = listener.local_addr().map_err(|error| NodeError::Bind {
        addr: config.listen.clone(),
        error,
    })?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    // Cancelled once the shutdown grace has passed: calls still in flight are answered UNAVAILABLE at once.
    let stopping = tokio_util::sync::CancellationToken::new();
    // Cancelled a moment later: every listener then drops its connections.
    let closing = tokio_util::sync::CancellationToken::new();
    let limits_of = |mut l: accept::ListenerLimits| {
        l.closing = closing.clone();
        l
    };
    let uplink = Uplink::new()
        .with_max_push_bytes(limits.max_push_bytes)
        .with_call_timeout(std::time::Duration::from_millis(
            config.routing.uplink_call_timeout_ms,
        ));
    let metrics = Arc::new(NodeMetrics::default());
    let key = Arc::new(GrantKey::load_or_create(&key_path)?);
    let signer = trust.signer.clone();
    let verifier = Arc::new(
        StatementVerifier::with_crls(&tls.ca_pem, &trust.crls, revoked.clone())
            .map_err(trust_error)?,
    );
    let certificates = CertReloader::new(
        code,
        trust_files,
        &trust,
        ReloadTargets {
            tls: dynamic_tls.clone(),
            signer: signer.clone(),
            verifier: verifier.clone(),
            topology: topology.clone(),
            metrics: metrics.clone(),
        },
    );
    let endorsement = signer
        .sign(&KeyEndorsement {
            node_code: code.to_string(),
            public_key: key.public_key().to_vec(),
            issued_at: clock.unix(),
        })
        .map_err(trust_error)?;
    uplink.set_audit_key(key.public_key(), Some(endorsement.clone()));
    let (audit_log, audit_writer) = AuditLog::start(
        code,
        store.clone(),
        (key.clone(), Some(endorsement.clone())),
        uplink.clone(),
        metrics.clone(),
    )
    .await?;
    let governance = Governance::new(
        code,
        store.clone(),
        key.clone(),
        (signer.clone(), verifier.clone(), endorsement),
        Arc::new(calendar),
        clock.clone(),
        audit_log.clone(),
    )
    .with_max_grant_days(limits.max_grant_days)
    .with_max_open_demands(limits.max_open_demands);
    let clock_for_downlink = clock.clone();
    let assertions = Assertions::new(
        signer,
        verifier,
        clock,
        std::time::Duration::from_secs(config.trust.assertion_window_secs.max(1)),
    );
    let ttl = std::time::Duration::from_secs(config.cache.ttl_secs);
    let cache = ShareCache::new(ttl, config.cache.capacity, config.cache.max_bytes);
    let downlink = Downlink::new(
        topology.clone(),
        (
            governance.clone(),
            cache.clone(),
            ServedNodes::new(store.clone(), ttl),
        ),
        (assertions.signer().clone(), assertions.verifier().clone()),
        clock_for_downlink,
        std::time::Duration::from_millis(config.routing.default_timeout_ms),
    );
    let flowback = crate::flowback::Flowback::new(
        topology.clone(),
        store.clone(),
        (governance.clone(), audit_log.clone()),
        (assertions.signer().clone(), assertions.verifier().clone()),
        governance.clock().clone(),
        (
            config.flowback.clone(),
            usize::try_from(config.routing.hop_limit).unwrap_or(usize::MAX),
        ),
    );
    let router = Router::new(
        topology.clone(),
        store.clone(),
        config.routing.clone(),
        metrics.clone(),
        audit_log.clone(),
        (governance.clone(), cache, assertions, downlink),
    )
    .with_flowback(flowback.clone());

    let mut tasks = vec![certificates.spawn(shutdown_rx.clone())];
    let (opmon, opmon_writer) = crate::opmon::OpMonitor::start(
        &config.op_monitoring,
        code,
        store.clone(),
        metrics.clone(),
        shutdown_rx.clone(),
    );
    tasks.push(opmon_writer);
    tasks.push(tokio::spawn(log_summary(
        metrics.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(warn_overdue(
        governance.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::flowback::run(
        flowback,
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(deliver_revocations(
        router.clone(),
        std::time::Duration::from_millis(config.trust.revocation_retry_ms.max(10)),
        shutdown_rx.clone(),
    )));
    if let Some(feed) = store.change_feed().await? {
        tasks.push(tokio::spawn(follow_changes(
            feed,
            governance.clone(),
            router.clone(),
            shutdown_rx.clone(),
        )));
    }
    if let Some(parent) = &topology.parent {
        for stream in [Stream::Catalog, Stream::Audit] {
            tasks.push(tokio::spawn(uplink.clone().run(
                stream,
                code,
                parent.clone(),
                store.clone(),
                Recovery {
                    audit: audit_log.clone(),
                    metrics: metrics.clone(),
                },
                shutdown_rx.clone(),
            )));
        }
    } else {
        // A node without a parent ships nothing: what an earlier build or configuration queued is dropped.
        let dropped = store.clear_outbox(Stream::Catalog).await?;
        if dropped > 0 {
            tracing::info!(dropped, "catalog outbox emptied: this node has no parent");
        }
    }

    // Health and readiness, shared by every listener's health service and the metrics listener's probes.
    let probe = Probe::new();
    tasks.push(tokio::spawn(probe.clone().watch_storage(
        store.clone(),
        (STORAGE_PROBE_EVERY, STORAGE_PROBE_TIMEOUT),
        shutdown_rx.clone(),
    )));
    let backbone_services = [
        federation_server::SERVICE_NAME,
        agency_server::SERVICE_NAME,
        operator_server::SERVICE_NAME,
        reflect::HEALTH_SERVICE,
    ];
    let health = probe
        .health_service(&reflect::with_reflection(&backbone_services))
        .await;
    let (reflection, reflection_v1alpha) =
        reflect::reflection(&backbone_services).map_err(reflection_error)?;

    let federation = FederationService::new(
        topology.clone(),
        store.clone(),
        router.clone(),
        uplink.clone(),
        metrics.clone(),
        audit_log.clone(),
    )
    .with_limits(limits);
    let connections = &config.connections;
    let refusals = RefusalLog::new(audit_log.clone(), connections.refusal_summary());
    tasks.push(refusals.spawn_flusher(shutdown_rx.clone()));
    let on_refused = |listener: &'static str| -> accept::OnRefused {
        let refusals = refusals.clone();
        let metrics = metrics.clone();
        Arc::new(move |f: HandshakeFailure| {
            if listener != "metrics" {
                NodeMetrics::add(&metrics.tls_handshakes_refused, 1);
            }
            metrics
                .connections_refused
                .get_or_create(&[("listener", listener), ("reason", f.reason())])
                .inc();
            tracing::debug!(node = %code, listener, failure = %f, "connection refused");
            refusals.note(Refusal {
                kind: RefusalKind::Handshake,
                actor: format!("tcp:{}", SourceKey::of(f.remote().ip())),
                reason: f.reason(),
                detail: format!("{listener} listener: {f}"),
                consumer_uscc: String::new(),
            });
        })
    };
    let metrics_stop = tokio_util::sync::CancellationToken::new();
    let mut metrics_server = None;
    let metrics_addr = match &config.metrics {
        Some(m) => {
            let (listener, addr) = listen(&m.listen).await?;
            let listener = accept::HttpListener::new(
                listener,
                limits_of(connections.metrics()),
                on_refused("metrics"),
            )
            .map_err(|error| NodeError::Bind {
                addr: m.listen.clone(),
                error,
            })?;
            let app = scrape::router(scrape::ScrapeState::new(
                metrics.clone(),
                store.clone(),
                topology.parent.is_some().then(|| uplink.clone()),
            ))
            .merge(crate::probe::routes(probe.clone()));
            // Serves through the drain, so that `/readyz` says the node is draining; stops once it has drained.
            let stop = metrics_stop.clone();
            metrics_server = Some(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "metrics endpoint stopped");
                }
            }));
            tracing::info!(node = %code, %addr, "metrics endpoint serving");
            Some(addr)
        }
        None => None,
    };
    let open_data_addr = match &config.open_data {
        Some(open) => {
            let (listener, open_addr) = listen(&open.listen).await?;
            let svc = OpenDataService::new(
                router.clone(),
                store.clone(),
                open.requests_per_minute,
                open.max_pages_per_call,
            )
            .with_limits(limits);
            let incoming = accept::incoming(
                listener,
                tls::ServerTls::new(dynamic_tls.public_server_config()?),
                limits_of(connections.open_data()),
                on_refused("open_data"),
            );
            let open_services = [open_data_server::SERVICE_NAME, reflect::HEALTH_SERVICE];
            let (open_reflection, open_reflection_v1alpha) =
                reflect::reflection(&open_services).map_err(reflection_error)?;
            let server = http2_server(connections)
                .layer(crate::telemetry::TraceLayer::new(code))
                .layer(TrackCallsLayer::<()>::new())
                .layer(opmon.layer())
                .layer(GuardLayer::new(audit_log.clone()))
                .layer(StopCallsLayer::new(code, stopping.clone()))
                .add_service(
                    probe
                        .health_service(&reflect::with_reflection(&open_services))
                        .await,
                )
                .add_service(open_reflection)
                .add_service(open_reflection_v1alpha)
                .add_service(
                    OpenDataServer::new(svc).max_decoding_message_size(limits.max_message_bytes),
                );
            let mut stop = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = server
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
                {
                    tracing::error!(error = %e, "open-data endpoint stopped");
                }
            }));
            tracing::info!(node = %code, addr = %open_addr, "open-data endpoint serving");
            Some(open_addr)
        }
        None => None,
    };
    let console = crate::console::Console::new(
        router.clone(),
        store.clone(),
        (
            audit_log.clone(),
            refusals.clone(),
            governance.clock().clone(),
        ),
        topology.parent.is_some().then(|| uplink.clone()),
        (config.console.clone().unwrap_or_default(), limits),
    );
    let console_addr = match &config.console {
        Some(cc) => {
            let (listener, console_addr) = listen(&cc.listen).await?;
            let listener = accept::HttpListener::with_handshake(
                listener,
                tls::ServerTls::new(dynamic_tls.console_server_config()?),
                limits_of(connections.console()),
                on_refused("console"),
            )
            .map_err(|error| NodeError::Bind {
                addr: cc.listen.clone(),
                error,
            })?;
            tasks.push(console.clone().spawn(listener, shutdown_rx.clone()));
            tracing::info!(node = %code, addr = %console_addr, "console serving");
            Some(console_addr)
        }
        None => None,
    };
    let agency = AgencyService::new(
        topology.clone(),
        store.clone(),
        router,
        uplink.clone(),
        audit_log.clone(),
    )
    .with_limits(limits)
    .with_own_view(config.own_view.clone());
    let own_view = agency.own_view().clone();
    tasks.push(tokio::spawn(own_view.clone().run(shutdown_rx.clone())));
    let admission = Admission::new(
        &config.rate_limits,
        connections.max_calls_in_flight,
        connections.max_calls_in_flight_per_source,
        refusals.clone(),
        metrics.clone(),
    );
    tasks.push(tokio::spawn(shrink_rate_state(
        admission.clone(),
        shutdown_rx.clone(),
    )));
    let mutual_tls = tls::MutualTls::new(dynamic_tls.server_config()?, revoked);
    tasks.push(tokio::spawn({
        let refusals = refusals.clone();
        let metrics = metrics.clone();
        mutual_tls.live().clone().watch(
            dynamic_tls.clone(),
            move |d: tls::live::Distrusted| {
                const REASON: &str = "no_longer_trusted";
                metrics
                    .connections_refused
                    .get_or_create(&[("listener", "backbone"), ("reason", REASON)])
                    .inc();
                let consumer_uscc = match &d.peer.peer {
                    Peer::Agency(uscc) => uscc.as_str().to_owned(),
                    Peer::Node(_) => String::new(),
                };
                refusals.note(Refusal {
                    kind: RefusalKind::Handshake,
                    actor: d.peer.peer.to_uri(),
                    reason: REASON,
                    detail: format!(
                        "backbone listener: closed the open connection from {}: the certificate of {} no longer passes: {}",
                        d.peer.remote, d.peer.peer, d.reason
                    ),
                    consumer_uscc,
                });
            },
            shutdown_rx.clone(),
        )
    }));
    let incoming = accept::incoming(
        listener,
        mutual_tls,
        limits_of(connections.backbone()),
        on_refused("backbone"),
    );
    let mut stop = shutdown_rx.clone();
    let server = tokio::spawn(
        http2_server(connections)
            .layer(crate::telemetry::TraceLayer::new(code))
            .layer(TrackCallsLayer::<tls::PeerInfo>::new())
            .layer(opmon.layer())
            .layer(admission.layer())
            .layer(GuardLayer::new(audit_log.clone()))
            .layer(StopCallsLayer::new(code, stopping.clone()))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                FederationServer::new(federation)
                    .max_decoding_message_size(limits.max_message_bytes),
            )
            .add_service(
                AgencyServer::new(agency).max_decoding_message_size(limits.max_message_bytes),
            )
            .add_service(
                OperatorServer::new(
                    OperatorService::new(
                        code,
                        governance.clone(),
                        store.clone(),
                        topology.parent.is_some().then(|| uplink.clone()),
                        audit_log.clone(),
                    )
                    .with_limits(limits)
                    .with_accounts(console.accounts().clone()),
                )
                .max_decoding_message_size(limits.max_message_bytes),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
    );
    tracing::info!(node = %code, %addr, "node serving");
    Ok(NodeHandle {
        code,
        addr,
        open_data_addr,
        metrics_addr,
        console_addr,
        console,
        store,
        uplink,
        metrics,
        audit: Some(audit_log),
        audit_writer,
        governance,
        own_view,
        probe,
        metrics_server: metrics_server.map(|task| (metrics_stop, task)),
        shutdown,
        grace: std::time::Duration::from_secs(config.shutdown_grace_secs),
        stopping,
        closing,
        server,
        tasks,
        certificates,
    })
}

/// Reflection that cannot be built from the compiled descriptors is a broken build, reported as configuration.
fn reflection_error(e: tonic_reflection::server::Error) -> NodeError {
    NodeError::Config(crate::error::Error::InvalidArgument(format!(
        "reflection: {e}"
    )))
}

/// A node whose signing material or CA bundle cannot be used is misconfigured.
fn trust_error(e: crate::statement::StatementError) -> NodeError {
    NodeError::Config(crate::error::Error::InvalidArgument(format!("tls: {e}")))
}

/// Offers revocations still owed to a neighbour again, every `period`, until each is acknowledged.
async fn deliver_revocations(
    router: Router,
    period: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match router.downlink().deliver_revocations().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(delivered = n, "pending revocations handed on"),
            Err(e) => tracing::warn!(error = %e, "pending revocations not handed on"),
        }
    }
}

/// Follows the changes other replicas of this node commit to the shared store: a revocation joins the known
/// ones at once, a changed entry's copy is dropped; after a gap in the feed every copy is read again.
async fn follow_changes(
    mut feed: Box<dyn crate::store::ChangeFeed>,
    governance: Governance,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let change = tokio::select! {
            c = feed.next() => c,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let followed = match change {
            Ok(StoreChange::Revoked(id)) => {
                let noted = governance.revoked_elsewhere(&id).await;
                if let Ok(flowback) = router.flowback() {
                    flowback.wake();
                }
                noted
            }
            Ok(StoreChange::Entry(id)) => {
                router.changed_elsewhere(Some(&id));
                Ok(())
            }
            Ok(StoreChange::Missed) => {
                router.changed_elsewhere(None);
                governance.reload_revocations().await
            }
            Err(e) => {
                tracing::warn!(error = %e, "change feed interrupted; reading again");
                router.changed_elsewhere(None);
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                governance.reload_revocations().await
            }
        };
        if let Err(e) = followed {
            tracing::warn!(error = %e, "a change committed by another replica was not followed");
        }
    }
}

/// A tonic server with the HTTP/2 settings of `[connections]` (TCP keepalive is set by the accept loop).
fn http2_server(c: &accept::ConnectionsConfig) -> tonic::transport::Server {
    let secs = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(secs(c.http2_keepalive_interval_secs))
        .http2_keepalive_timeout(secs(c.http2_keepalive_timeout_secs))
        .max_concurrent_streams(c.max_concurrent_streams);
    if let Some(age) = secs(c.max_connection_age_secs) {
        server = server.max_connection_age(age);
        if let Some(grace) = secs(c.max_connection_age_grace_secs) {
            server = server.max_connection_age_grace(grace);
        }
    }
    server
}

/// Forgets the rate state of quiet callers once a minute.
async fn shrink_rate_state(admission: Admission, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => admission.shrink(),
        }
    }
}

/// How long a stopping node lets the answers of the calls it cut off go out before it closes every connection.
const ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a stopping node waits for its server once its connections are closed, and for its audit writer.
const STOP_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Stale entries named one by one in each scan's warnings; the rest are counted.
const STALE_WARNINGS: u64 = 100;

/// How often a node logs a summary of its activity.
const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Every [`SUMMARY_EVERY`], logs one INFO line counting what the node did in the interval (nothing on an idle
/// node): under steady load the log holds summaries, not a line per operation.
async fn log_summary(metrics: Arc<NodeMetrics>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SUMMARY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut last = metrics.totals();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let now = metrics.totals();
        if let Some(d) = now.since(&last) {
            tracing::info!(
                interval_secs = SUMMARY_EVERY.as_secs(),
                shares_served = d.shares_served,
                shares_forwarded = d.shares_forwarded,
                shares_failed = d.shares_failed,
                handshakes_refused = d.handshakes_refused,
                audit_records = d.audit_records,
                operations = d.operations,
                "activity summary"
            );
        }
        last = now;
    }
}

/// Once a minute, logs a warning for every application, objection and demand still open past its deadline and for
/// the node's stale catalog entries, reading the store a page at a time.
async fn warn_overdue(governance: Governance, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        match governance.open_overdue(SCAN_PAGE).await {
            Ok((apps, objections)) => {
                for a in &apps {
                    tracing::warn!(application = %a.id, resource = %a.resource_id, due_at = a.due_at,
                        "application is overdue: no decision within its deadline");
                }
                for o in &objections {
                    tracing::warn!(objection = %o.id, resource = %o.resource_id, due_at = o.due_at,
                        "objection is overdue: not resolved within its deadline");
                }
            }
            Err(e) => tracing::error!(error = %e, "overdue scan failed"),
        }
        match governance.open_overdue_demands(SCAN_PAGE).await {
            Ok(demands) => {
                for d in &demands {
                    tracing::warn!(demand = %d.id, consumer = %d.consumer_uscc, state = d.state,
                        "demand is overdue: not assigned or answered within its deadline");
                }
            }
            Err(e) => tracing::error!(error = %e, "overdue demand scan failed"),
        }
        let mut named = 0u64;
        let scanned = governance
            .scan_stale(SCAN_PAGE, |page| {
                for s in page {
                    if named < STALE_WARNINGS {
                        let id = s.entry.as_ref().map(|e| e.id.as_str()).unwrap_or_default();
                        tracing::warn!(resource = %id, reason = %s.reason, "catalog entry is stale");
                    }
                    named += 1;
                }
            })
            .await;
        match scanned {
            Ok(stale) if stale > STALE_WARNINGS => tracing::warn!(
                stale,
                "catalog entries are stale; `fedgate report` lists them"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "stale-entry scan failed"),
        }
    }
}

impl NodeHandle {
    /// This node's code.
    pub fn code(&self) -> DivisionCode {
        self.code
    }

    /// The address the node listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the public open-data endpoint, if this node runs one.
    pub fn open_data_addr(&self) -> Option<SocketAddr> {
        self.open_data_addr
    }

    /// The node's console (its accounts exist whether or not it listens).
    pub fn console(&self) -> &crate::console::Console {
        &self.console
    }

    /// Where the console listens, if it is configured.
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console_addr
    }

    /// The address of the metrics endpoint, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Reloads the node's certificate, key, CA bundle and revocation lists (SIGHUP; the files are watched too).
    pub fn certificates(&self) -> &CertReloader {
        &self.certificates
    }

    /// The node's counters.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }

    /// The node's store, for operator tools and tests.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Highest sequence number of `stream` the parent has acknowledged.
    pub fn uplink_acked(&self, stream: Stream) -> u64 {
        self.uplink.status(stream).acked.load(Ordering::Relaxed)
    }

    /// Items of `stream` written here but not yet acknowledged by the parent.
    pub async fn uplink_lag(&self, stream: Stream) -> Result<u64, StoreError> {
        let head = self.store.outbox_head(stream).await?;
        Ok(head.saturating_sub(self.uplink_acked(stream)))
    }

    /// The governance of this node's resources.
    pub fn governance(&self) -> &Governance {
        &self.governance
    }

    /// What this node keeps of its agencies' applications, grants and notices.
    pub fn own_view(&self) -> &crate::own_view::OwnView {
        &self.own_view
    }

    /// This node's audit log.
    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// Stops accepting, lets calls in flight finish for up to the configured grace (`shutdown_grace_secs`), then
    /// closes every connection, cutting off the calls still running (each hop records them as cancelled); stops
    /// the background tasks, lets the audit writer sign the chain's head, and closes storage.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        let NodeHandle {
            code,
            store,
            audit,
            audit_writer,
            governance,
            own_view,
            probe,
            metrics_server,
            shutdown,
            grace,
            stopping,
            closing,
            mut server,
            mut tasks,
            ..
        } = self;
        // Health turns NOT_SERVING and `/readyz` 503 before the listeners stop accepting.
        probe.drain().await;
        let _ = shutdown.send(true);
        let mut drain = Box::pin(async {
            for t in &mut tasks {
                let _ = t.await;
            }
            (&mut server).await
        });
        let served = match tokio::time::timeout(grace, &mut drain).await {
            Ok(served) => Some(served),
            Err(_) => {
                tracing::warn!(node = %code, ?grace, "calls still in flight after the shutdown grace; cutting them off");
                stopping.cancel();
                match tokio::time::timeout(ANSWER_MARGIN, &mut drain).await {
                    Ok(served) => Some(served),
                    Err(_) => {
                        // What is left (streams, connections that carry nothing) goes with its connection.
                        closing.cancel();
                        tokio::time::timeout(STOP_MARGIN, &mut drain).await.ok()
                    }
                }
            }
        };
        drop(drain);
        if let Some((stop, task)) = metrics_server {
            stop.cancel();
            if tokio::time::timeout(STOP_MARGIN, task).await.is_err() {
                tracing::warn!(node = %code, "the metrics endpoint did not stop in time");
            }
        }
        let served = served.unwrap_or_else(|| {
            tracing::error!(node = %code, "the server did not stop after its connections were closed");
            server.abort();
            for t in &tasks {
                t.abort();
            }
            Ok(Ok(()))
        });
        let served = match served {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(node = %code, error = %e, "server task failed");
                Ok(())
            }
        };
        // The writer drains, signs the chain's head and stops once every handle to it is gone.
        drop(audit);
        drop(governance);
        drop(own_view);
        match tokio::time::timeout(STOP_MARGIN, audit_writer).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(node = %code, error = %e, "audit writer failed"),
            Err(_) => tracing::error!(node = %code,
                "the audit writer did not stop in time; an unsigned head is signed at the next start"),
        }
        store.close().await;
        tracing::info!(node = %code, "node stopped");
        served.map_err(NodeError::from)
    }

    /// Resolves when the server stops by itself (an error) — for the daemon to notice.
    pub fn is_finished(&self) -> bool {
        self.server.is_finished()
    }
}

/// Opens (creating or migrating as needed) the store the configuration names.
pub async fn open_store(storage: &StorageConfig) -> Result<Arc<dyn Store>, NodeError> {
    let opened: Result<Arc<dyn Store>, StoreError> = match storage {
        StorageConfig::Sqlite { path, .. } => SqliteStore::open_with(path, storage.busy_timeout())
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>),
        StorageConfig::Postgres { url, .. } => PgStore::connect_with(url, storage.busy_timeout())
            .await
            .map(|s| Arc::new(s) as Arc<dyn Store>),
    };
    opened.map_err(|error| NodeError::StoreOpen {
        at: storage.describe(),
        error,
    })
}

/// A listener on `addr` (from the configuration) and the address it got.
async fn listen(addr: &str) -> Result<(TcpListener, SocketAddr), NodeError> {
    let failed = |error| NodeError::Bind {
        addr: addr.to_owned(),
        error,
    };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

//! The exchange console: server-rendered pages on the node's console listener (TLS with the node's federation
//! certificate) for operators, auditors and agency reviewers signed in under real-name accounts. Each request
//! takes one path: TLS, security headers, the session (a proof of who is signed in), the role's proof, the CSRF
//! check of a form, then the same governance operation the gRPC services run; every action and refusal is
//! audited in the node's chain under the user.

use std::sync::Arc;

use axum::Router as Routes;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::audit::AuditLog;
use crate::clock::Clock;
use crate::ident::DivisionCode;
use crate::limits::LimitsConfig;
use crate::route::Router;
use crate::store::Store;
use crate::uplink::Uplink;

pub mod accounts;
mod audit_pages;
mod catalog;
mod federation;
pub mod i18n;
mod review;
mod session;
mod sign_in;
mod stats;
mod view;

pub use accounts::Accounts;
pub use session::{Auditing, Operating, Reviewing, Signed};

/// The `[console]` section: where the console listens and how sessions and sign-ins are limited.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Address of the console's HTTPS listener, e.g. "127.0.0.1:7443"; keep it on a management network.
    pub listen: String,
    /// Seconds a session lasts from sign-in.
    pub session_secs: u64,
    /// Failed sign-ins in a row after which an account is locked.
    pub lockout_after: u32,
    /// Seconds a locked account stays locked.
    pub lockout_secs: u64,
    /// Sign-in attempts one client address may make per minute.
    pub sign_ins_per_minute: u32,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7443".into(),
            session_secs: 8 * 3600,
            lockout_after: 5,
            lockout_secs: 15 * 60,
            sign_ins_per_minute: 30,
        }
    }
}

/// What the console's pages read and act through.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    node: DivisionCode,
    store: Arc<dyn Store>,
    router: Router,
    uplink: Option<Uplink>,
    audit: AuditLog,
    /// Where sign-ins over the rate are counted and summarised per source.
    refusals: crate::refusals::RefusalLog,
    clock: Arc<dyn Clock>,
    accounts: Accounts,
    config: ConsoleConfig,
    limits: LimitsConfig,
    sign_ins: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
}

impl Console {
    /// The console of the node `router` serves; `uplink` is `None` on the province.
    pub fn new(
        router: Router,
        store: Arc<dyn Store>,
        (audit, refusals, clock): (AuditLog, crate::refusals::RefusalLog, Arc<dyn Clock>),
        uplink: Option<Uplink>,
        (config, limits): (ConsoleConfig, LimitsConfig),
    ) -> Self {
        let topology = router.topology();
        let node = topology.code;
        let accounts = Accounts::new(
            (store.clone(), audit.clone(), clock.clone()),
            format!("fedgate {node}"),
            accounts::Lockout {
                after: config.lockout_after.max(1),
                secs: i64::try_from(config.lockout_secs).unwrap_or(i64::MAX),
            },
            topology.agencies.keys().cloned().collect(),
        );
        let per_minute =
            std::num::NonZeroU32::new(config.sign_ins_per_minute.max(1)).unwrap_or(NON_ZERO);
        Self {
            inner: Arc::new(Inner {
                node,
                store,
                router,
                uplink,
                audit,
                refusals,
                clock,
                accounts,
                config,
                limits,
                sign_ins: governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute)),
            }),
        }
    }

    /// The accounts this console signs users in with.
    pub fn accounts(&self) -> &Accounts {
        &self.inner.accounts
    }

    /// The pages, under their security headers.
    pub fn routes(&self) -> Routes {
        Routes::new()
            .route("/", get(sign_in::home))
            .route("/login", get(sign_in::form).post(sign_in::submit))
            .route("/logout", post(sign_in::sign_out))
            .route("/lang", get(sign_in::language))
            .route("/account", get(sign_in::account))
            .route("/account/password", post(sign_in::change_password))
            .route("/static/console.css", get(view::stylesheet))
            .route("/federation", get(federation::page))
            .route("/catalog", get(catalog::search))
            .route("/catalog/entry", get(catalog::entry))
            .route("/reports", get(federation::reports))
            .route("/stats", get(stats::page))
            .route("/audit", get(audit_pages::search))
            .route("/audit/request", get(audit_pages::request))
            .route("/review", get(review::queue))
            .route("/review/application", get(review::application))
            .route("/review/decide", post(review::decide))
            .route("/grants", get(review::grants))
            .route("/grants/revoke", post(review::revoke))
            .route("/objections", get(review::objections))
            .route("/objections/resolve", post(review::resolve))
            .fallback(view::not_found)
            .layer(axum::middleware::from_fn(view::security_headers))
            .with_state(self.clone())
    }
}

const NON_ZERO: std::num::NonZeroU32 = std::num::NonZeroU32::MIN;

impl Console {
    /// Serves the console on `listener` (TLS with the node's certificate) until `shutdown` turns true.
    pub fn spawn(
        self,
        listener: crate::accept::HttpListener<crate::tls::ServerTls>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let app = self
            .routes()
            .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
            .into_make_service_with_connect_info::<crate::accept::Remote>();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "console stopped");
            }
        })
    }
}

/// Largest form body the console reads.
const MAX_FORM_BYTES: usize = 64 * 1024;

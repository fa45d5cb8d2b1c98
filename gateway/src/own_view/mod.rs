//! An agency's own view at its node: the applications it filed through this node, the grants it holds and the
//! notices it is told.
//!
//! Applications live at the providers' nodes; every Apply and GetApplication answer for an agency of this node
//! passes through it, and the node keeps its own copy of each (a governance document of kind
//! `held_application`), with each grant it carried (`held_grant`). Pending copies are refreshed by a periodic
//! scan ([`OwnView::run`]) that asks the provider's node with the routed GetApplication. Revocations reaching
//! this node as the grantee's node mark the held grant revoked. Notices (`notice`, numbered by one counter of
//! the node) tell an agency that a grant was revoked, that a grant expires within the notice period (once per
//! grant), or that an application was decided.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::{
    Application, ApplicationState, Grant, GrantStatus, HeldApplication, HeldGrant, NoticeKind,
    Revocation, RevocationNotice, SignedGrant,
};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Uscc};
use crate::route::Router;
use crate::store::{Doc, DocKind, Store};

mod list;
mod notices;
mod scan;

pub use notices::NoticeDraft;
pub use scan::ScanReport;

/// State of a held grant not revoked whose expiry notice is still to come.
const GRANT_HELD: i32 = 0;
/// State of a held grant that was revoked.
const GRANT_REVOKED: i32 = 1;
/// State of a held grant not revoked whose expiry notice was given.
const GRANT_EXPIRY_TOLD: i32 = 2;

/// What a node keeps of its agencies' applications and grants, and when it tells them (`[own_view]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnViewConfig {
    /// An agency is told once when a grant it holds has this many days of validity left, or fewer.
    pub expiry_notice_days: u32,
    /// How often pending applications are refreshed from their providers' nodes and held grants checked, in
    /// milliseconds.
    pub refresh_ms: u64,
    /// Pending applications asked of providers' nodes at once.
    pub refresh_concurrency: usize,
}

impl Default for OwnViewConfig {
    fn default() -> Self {
        Self {
            expiry_notice_days: 7,
            refresh_ms: 60_000,
            refresh_concurrency: 4,
        }
    }
}

/// The held copy of an application as stored: what the agency is shown and the certificate its node vouches
/// with when it refreshes the copy.
#[derive(Clone, PartialEq, prost::Message)]
struct HeldApplicationDoc {
    #[prost(message, optional, tag = "1")]
    held: Option<HeldApplication>,
    #[prost(bytes = "vec", tag = "2")]
    agency_certificate: Vec<u8>,
}

/// A held grant as stored.
#[derive(Clone, PartialEq, prost::Message)]
struct HeldGrantDoc {
    #[prost(message, optional, tag = "1")]
    grant: Option<SignedGrant>,
    #[prost(int64, tag = "2")]
    revoked_at: i64,
    #[prost(string, tag = "3")]
    revoke_reason: String,
}

/// The own view of the agencies of one node.
#[derive(Clone)]
pub struct OwnView {
    node: DivisionCode,
    store: Arc<dyn Store>,
    router: Router,
    config: OwnViewConfig,
    /// Serializes changes of held documents and their notices within this process, so that each change is
    /// told once.
    changes: Arc<tokio::sync::Mutex<()>>,
    /// The last notice sequence number made here; watchers wait for it to move.
    latest: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set when the node stops: watchers end their streams.
    stopped: Arc<tokio::sync::watch::Sender<bool>>,
}

fn decode<M: Message + Default>(what: &str, body: &[u8]) -> Result<M> {
    M::decode(body).map_err(|e| {
        Error::Store(crate::store::StoreError::Corrupt {
            what: what.to_owned(),
            error: e.to_string(),
        })
    })
}

impl OwnView {
    /// The own view of the agencies of the router's node.
    pub fn new(store: Arc<dyn Store>, router: Router, config: OwnViewConfig) -> Self {
        Self {
            node: router.topology().code,
            store,
            router,
            config,
            changes: Arc::default(),
            latest: Arc::new(tokio::sync::watch::channel(0).0),
            stopped: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    fn now(&self) -> i64 {
        self.router.governance().clock().unix()
    }

    /// Keeps what an answer about an application says, when `agency` filed it through this node: the copy,
    /// its grant, and a notice when it was pending here and is decided now. `certificate` is the agency's,
    /// which the node vouches with when it refreshes the copy.
    pub async fn application_seen(
        &self,
        agency: &Uscc,
        certificate: Option<Arc<[u8]>>,
        app: &Application,
    ) -> Result<()> {
        if app.consumer_uscc != agency.as_str() || app.consumer_node != self.node.as_str() {
            return Ok(());
        }
        let _one = self.changes.lock().await;
        let old = self.held_application(&app.id).await?;
        let was_pending = old.as_ref().is_some_and(|(h, _)| {
            h.application.as_ref().map(|a| a.state) == Some(ApplicationState::Pending as i32)
        });
        let certificate = certificate
            .map(|c| c.to_vec())
            .or_else(|| old.map(|(_, c)| c))
            .unwrap_or_default();
        let held = HeldApplication {
            application: Some(app.clone()),
            refreshed_at: self.now(),
            refresh_error: String::new(),
        };
        self.put_application(agency.as_str(), &held, certificate)
            .await?;
        if let Some(signed) = &app.grant {
            self.hold_grant(agency.as_str(), signed).await?;
        }
        if was_pending && app.state != ApplicationState::Pending as i32 {
            let state = ApplicationState::try_from(app.state).unwrap_or_default();
            self.notify(NoticeDraft {
                agency: agency.to_string(),
                kind: NoticeKind::ApplicationDecided,
                application_id: app.id.clone(),
                resource_id: app.resource_id.clone(),
                grant_id: grant_id(app.grant.as_ref()),
                expires_at: app
                    .grant
                    .as_ref()
                    .and_then(|g| Grant::decode(g.grant.as_slice()).ok())
                    .map_or(0, |g| g.expires_at),
                state,
                detail: format!(
                    "application {} {}: {}",
                    app.id,
                    if state == ApplicationState::Approved {
                        "approved"
                    } else {
                        "rejected"
                    },
                    app.reason
                ),
            })
            .await?;
        }
        Ok(())
    }

    /// Notes that a refresh of a held application failed, keeping the copy as it was.
    async fn refresh_failed(&self, id: &str, error: &Error) -> Result<()> {
        let _one = self.changes.lock().await;
        let Some((mut held, certificate)) = self.held_application(id).await? else {
            return Ok(());
        };
        held.refresh_error = crate::limits::clamp(&error.to_string(), 512);
        let agency = held
            .application
            .as_ref()
            .map(|a| a.consumer_uscc.clone())
            .unwrap_or_default();
        self.put_application(&agency, &held, certificate).await
    }

    async fn held_application(&self, id: &str) -> Result<Option<(HeldApplication, Vec<u8>)>> {
        let Some(doc) = self.store.doc(DocKind::HeldApplication, id).await? else {
            return Ok(None);
        };
        let d: HeldApplicationDoc = decode("held application", &doc.body)?;
        Ok(d.held.map(|h| (h, d.agency_certificate)))
    }

    async fn put_application(
        &self,
        agency: &str,
        held: &HeldApplication,
        certificate: Vec<u8>,
    ) -> Result<()> {
        let app = held.application.clone().unwrap_or_default();
        self.store
            .put_doc(&Doc {
                kind: DocKind::HeldApplication,
                id: app.id.clone(),
                provider_uscc: String::new(),
                consumer_uscc: agency.to_owned(),
                state: app.state,
                due_at: app.due_at,
                body: HeldApplicationDoc {
                    held: Some(held.clone()),
                    agency_certificate: certificate,
                }
                .encode_to_vec(),
            })
            .await?;
        Ok(())
    }

    /// Keeps a grant an agency of this node was issued, unless already held; one already revoked here is held
    /// as revoked.
    async fn hold_grant(&self, agency: &str, signed: &SignedGrant) -> Result<()> {
        let g: Grant = decode("grant", &signed.grant)?;
        if self.store.doc(DocKind::HeldGrant, &g.id).await?.is_some() {
            return Ok(());
        }
        self.put_grant(
            agency,
            &g,
            GRANT_HELD,
            &HeldGrantDoc {
                grant: Some(signed.clone()),
                ..Default::default()
            },
        )
        .await?;
        if self.router.governance().is_revoked(&g.id).await? {
            self.mark_revoked(&g.id, self.recorded_revocation(&g.id).await?)
                .await?;
        }
        Ok(())
    }

    async fn put_grant(
        &self,
        agency: &str,
        g: &Grant,
        state: i32,
        doc: &HeldGrantDoc,
    ) -> Result<()> {
        self.store
            .put_doc(&Doc {
                kind: DocKind::HeldGrant,
                id: g.id.clone(),
                provider_uscc: String::new(),
                consumer_uscc: agency.to_owned(),
                state,
                due_at: g.expires_at,
                body: doc.encode_to_vec(),
            })
            .await?;
        Ok(())
    }

    /// Marks a held grant revoked on a revocation that reached this node, and tells its holder once.
    pub async fn grant_revoked(&self, r: &Revocation) -> Result<()> {
        let _one = self.changes.lock().await;
        self.mark_revoked(&r.grant_id, Some((r.revoked_at, r.reason.clone())))
            .await
    }

    /// The time and reason of a revocation recorded here.
    async fn recorded_revocation(&self, grant_id: &str) -> Result<Option<(i64, String)>> {
        let Some(doc) = self.store.doc(DocKind::Revocation, grant_id).await? else {
            return Ok(None);
        };
        let notice: RevocationNotice = decode("revocation", &doc.body)?;
        Ok(notice
            .revocation
            .and_then(|s| Revocation::decode(s.body.as_slice()).ok())
            .map(|r| (r.revoked_at, r.reason)))
    }

    /// Marks a held grant revoked (callers hold `changes`).
    async fn mark_revoked(&self, grant_id: &str, how: Option<(i64, String)>) -> Result<()> {
        let Some(doc) = self.store.doc(DocKind::HeldGrant, grant_id).await? else {
            return Ok(());
        };
        if doc.state == GRANT_REVOKED {
            return Ok(());
        }
        let mut held: HeldGrantDoc = decode("held grant", &doc.body)?;
        let g: Grant = decode(
            "grant",
            held.grant
                .as_ref()
                .map(|s| s.grant.as_slice())
                .unwrap_or_default(),
        )?;
        let (at, reason) = how.unwrap_or_else(|| (self.now(), String::new()));
        held.revoked_at = at;
        held.revoke_reason = reason.clone();
        self.put_grant(&doc.consumer_uscc, &g, GRANT_REVOKED, &held)
            .await?;
        self.notify(NoticeDraft {
            agency: doc.consumer_uscc.clone(),
            kind: NoticeKind::GrantRevoked,
            grant_id: g.id.clone(),
            application_id: g.application_id.clone(),
            resource_id: g.resource_id.clone(),
            expires_at: g.expires_at,
            state: ApplicationState::Unspecified,
            detail: format!(
                "grant {} was revoked by node {}: {reason}",
                g.id, g.issuer_node
            ),
        })
        .await
    }

    /// The grant as the agency sees it now.
    fn held_grant(&self, doc: &Doc) -> Result<HeldGrant> {
        let held: HeldGrantDoc = decode("held grant", &doc.body)?;
        let g: Grant = decode(
            "grant",
            held.grant
                .as_ref()
                .map(|s| s.grant.as_slice())
                .unwrap_or_default(),
        )?;
        let now = self.now();
        let status = if doc.state == GRANT_REVOKED {
            GrantStatus::Revoked
        } else if g.expires_at <= now {
            GrantStatus::Expired
        } else {
            GrantStatus::Active
        };
        Ok(HeldGrant {
            grant: held.grant,
            grant_id: g.id,
            resource_id: g.resource_id,
            application_id: g.application_id,
            expires_at: g.expires_at,
            remaining_secs: if status == GrantStatus::Active {
                g.expires_at - now
            } else {
                0
            },
            status: status as i32,
            revoked_at: held.revoked_at,
            revoke_reason: held.revoke_reason,
        })
    }

    /// Tells the holder of a grant, once, that it expires within the notice period.
    async fn expiry_near(&self, doc: &Doc) -> Result<()> {
        let _one = self.changes.lock().await;
        match self.store.doc(DocKind::HeldGrant, &doc.id).await? {
            Some(now) if now.state == GRANT_HELD => {}
            _ => return Ok(()),
        }
        let held: HeldGrantDoc = decode("held grant", &doc.body)?;
        let g: Grant = decode(
            "grant",
            held.grant
                .as_ref()
                .map(|s| s.grant.as_slice())
                .unwrap_or_default(),
        )?;
        let left = g.expires_at - self.now();
        self.put_grant(&doc.consumer_uscc, &g, GRANT_EXPIRY_TOLD, &held)
            .await?;
        self.notify(NoticeDraft {
            agency: doc.consumer_uscc.clone(),
            kind: NoticeKind::GrantExpiring,
            grant_id: g.id.clone(),
            application_id: g.application_id.clone(),
            resource_id: g.resource_id.clone(),
            expires_at: g.expires_at,
            state: ApplicationState::Unspecified,
            detail: if left > 0 {
                format!(
                    "grant {} for {} expires in {} h",
                    g.id,
                    g.resource_id,
                    (left + 3599) / 3600
                )
            } else {
                format!("grant {} for {} has expired", g.id, g.resource_id)
            },
        })
        .await
    }

    /// The notice period.
    fn notice_period(&self) -> i64 {
        i64::from(self.config.expiry_notice_days) * 24 * 3600
    }

    /// How often the periodic scan runs.
    fn period(&self) -> Duration {
        Duration::from_millis(self.config.refresh_ms.max(10))
    }
}

fn grant_id(signed: Option<&SignedGrant>) -> String {
    signed
        .and_then(|g| Grant::decode(g.grant.as_slice()).ok())
        .map(|g| g.id)
        .unwrap_or_default()
}

//! Share governance at the provider's node (seed 002 art. 19-25): applications, decisions, signed grants,
//! revocations and objections, with deadlines counted in working days.

use std::sync::Arc;

use fedgate_proto::v1::{
    Application, ApplicationState, ApplyRequest, AuditOperation, AuditRecord, CatalogEntry,
    DecideRequest, FileObjectionRequest, Grant, Objection, ObjectionState, ResolveObjectionRequest,
    Revocation, RevocationNotice, ShareMode, ShareType, SignedGrant, SignedStatement,
};
use prost::Message;

use crate::assertion::Vouched;
use crate::audit::{self, AuditLog};
use crate::calendar::WorkCalendar;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::grant::{self, GrantError, GrantKey};
use crate::ident::{DivisionCode, Peer, Uscc};
use crate::statement::{NodeSigner, StatementError, StatementVerifier, Verified};
use crate::store::{Doc, DocKind, DocQuery, Store};

pub mod demand;
mod scan;

pub use scan::{REPORT_STALE_ENTRIES, SCAN_PAGE, update_period};

/// State of a recorded revocation that the next node toward the grantee has acknowledged (or that ends here).
const REVOCATION_DELIVERED: i32 = 1;
/// State of a recorded revocation still owed to the next node toward the grantee.
const REVOCATION_PENDING: i32 = 2;
/// Longest grant lifetime, and the one given when the applicant asks for none, unless configured
/// (`limits.max_grant_days`): one year.
const DEFAULT_GRANT_SECS: i64 = 365 * 24 * 3600;
/// Longest text a caller may put in a purpose, scenario, reason or description.
const MAX_TEXT: usize = 2000;

/// Who takes a provider's decision: the agency itself, over gRPC with its certificate, or one of its reviewers,
/// signed in to the console under a real-name account. Either way the same operation runs; the audit record
/// names who acted.
#[derive(Debug, Clone)]
pub struct Acting {
    agency: Uscc,
    actor: String,
    by: Option<String>,
}

impl Acting {
    /// The agency, calling with its own certificate.
    pub fn agency(agency: Uscc) -> Self {
        Self {
            actor: Peer::Agency(agency.clone()).to_uri(),
            agency,
            by: None,
        }
    }

    /// A reviewer of `agency` with console account `login`, real name `name`.
    pub fn reviewer(agency: Uscc, login: &str, name: &str) -> Self {
        Self {
            agency,
            actor: format!("{USER_URI_PREFIX}{login}"),
            by: Some(name.to_owned()),
        }
    }

    /// The agency whose resource is decided on.
    pub fn uscc(&self) -> &Uscc {
        &self.agency
    }

    /// The audit record's actor.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// `detail`, followed by the real name of the console user who acted, if one did.
    pub fn detail(&self, detail: String) -> String {
        match &self.by {
            Some(name) => format!("{detail} (by {name} in the console)"),
            None => detail,
        }
    }
}

/// Prefix of a console user's actor URI in audit records: `urn:fedgate:user:<login>`.
pub const USER_URI_PREFIX: &str = "urn:fedgate:user:";

/// Governance of the resources held at one node.
#[derive(Clone)]
pub struct Governance {
    node: DivisionCode,
    store: Arc<dyn Store>,
    key: Arc<GrantKey>,
    signer: NodeSigner,
    verifier: Arc<StatementVerifier>,
    endorsement: SignedStatement,
    calendar: Arc<WorkCalendar>,
    clock: Arc<dyn Clock>,
    audit: AuditLog,
    max_grant_secs: i64,
    /// Demands one agency may have open at once (`limits.max_open_demands`).
    max_open_demands: usize,
    /// Grant ids this node knows revoked: read from the store at the first check, then kept as revocations are
    /// recorded, so that no share waits on a store read for it.
    revoked: Arc<tokio::sync::OnceCell<dashmap::DashSet<String>>>,
    /// Signed grants whose signatures checked lately, by [`OpenedKey`]: a grant used for many shares is verified
    /// once per [`OPENED_TTL`]. Expiry, use and revocation are checked at every use.
    opened: moka::sync::Cache<[u8; 32], Grant>,
}

/// How long a checked grant signature is trusted without checking it again: bounds how long a certificate that
/// expired meanwhile still vouches for its node's grant key.
const OPENED_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Checked grant signatures kept at most.
const OPENED_CAPACITY: u64 = 10_000;

/// Which check a cached grant passed.
#[derive(Clone, Copy)]
enum OpenedKey {
    /// Signed with this node's own key.
    Own = 1,
    /// Signed with a key its issuer's certificate endorsed.
    Endorsed = 2,
}

fn text(field: &str, value: &str, required: bool) -> Result<()> {
    if required && value.trim().is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if value.chars().count() > MAX_TEXT {
        return Err(Error::InvalidArgument(format!(
            "{field} is longer than {MAX_TEXT} characters"
        )));
    }
    Ok(())
}

fn decode<M: Message + Default>(what: &str, body: &[u8]) -> Result<M> {
    M::decode(body).map_err(|e| {
        Error::Store(crate::store::StoreError::Corrupt {
            what: what.to_owned(),
            error: e.to_string(),
        })
    })
}

/// Maps a refused grant to the status a caller sees.
pub fn grant_refusal(e: GrantError) -> Error {
    match e {
        GrantError::Malformed(m) => Error::InvalidArgument(format!("grant: {m}")),
        other => Error::PermissionDenied(other.to_string()),
    }
}

fn mode_of(m: i32) -> ShareMode {
    match ShareMode::try_from(m) {
        Ok(ShareMode::Unspecified) | Err(_) => ShareMode::Query,
        Ok(m) => m,
    }
}

impl Governance {
    /// Governance for `node`, signing grants with `key` and revocations with `signer`.
    pub fn new(
        node: DivisionCode,
        store: Arc<dyn Store>,
        key: Arc<GrantKey>,
        (signer, verifier, endorsement): (NodeSigner, Arc<StatementVerifier>, SignedStatement),
        calendar: Arc<WorkCalendar>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
    ) -> Self {
        Self {
            node,
            store,
            key,
            signer,
            verifier,
            endorsement,
            calendar,
            clock,
            audit,
            max_grant_secs: DEFAULT_GRANT_SECS,
            max_open_demands: crate::limits::LimitsConfig::default().max_open_demands,
            revoked: Arc::default(),
            opened: moka::sync::Cache::builder()
                .max_capacity(OPENED_CAPACITY)
                .time_to_live(OPENED_TTL)
                .build(),
        }
    }

    /// Governance whose grants run at most `days` days from their issue.
    pub fn with_max_grant_days(mut self, days: u32) -> Self {
        self.max_grant_secs = i64::from(days.max(1)) * 24 * 3600;
        self
    }

    /// Governance under which one agency may have at most `n` demands open at once.
    pub fn with_max_open_demands(mut self, n: usize) -> Self {
        self.max_open_demands = n.max(1);
        self
    }

    /// The node's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The working-day calendar in force.
    pub fn calendar(&self) -> &WorkCalendar {
        &self.calendar
    }

    /// This node's public key, which verifies its grants.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    async fn write(&self, record: AuditRecord) -> Result<()> {
        crate::route::durably(&self.audit, record)
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::Unavailable(format!(
                    "node {} could not write its audit trail: {e}",
                    self.node
                ))
            })
    }

    async fn local_entry(&self, resource_id: &str) -> Result<CatalogEntry> {
        self.store
            .entry(resource_id)
            .await?
            .filter(|s| !s.withdrawn && s.entry.node_code == self.node.as_str())
            .map(|s| s.entry)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "resource {resource_id} is not in the catalog of node {}",
                    self.node
                ))
            })
    }

    fn is_overdue(&self, due_at: i64, decided_at: i64) -> bool {
        let at = if decided_at > 0 {
            decided_at
        } else {
            self.clock.unix()
        };
        due_at > 0 && at >= due_at
    }

    async fn save_application(&self, a: &Application, provider: &str) -> Result<()> {
        self.store
            .put_doc(&Doc {
                kind: DocKind::Application,
                id: a.id.clone(),
                provider_uscc: provider.to_owned(),
                consumer_uscc: a.consumer_uscc.clone(),
                state: a.state,
                due_at: a.due_at,
                body: a.encode_to_vec(),
            })
            .await?;
        Ok(())
    }

    fn issue(
        &self,
        a: &Application,
        fields: Vec<String>,
        mode: ShareMode,
        expires_at: i64,
        clear: Vec<String>,
        grant_no: u64,
    ) -> SignedGrant {
        let g = Grant {
            id: format!("{}-g-{grant_no}", self.node),
            consumer_uscc: a.consumer_uscc.clone(),
            consumer_node: a.consumer_node.clone(),
            resource_id: a.resource_id.clone(),
            fields,
            mode: mode as i32,
            purpose: a.purpose.clone(),
            issued_at: self.clock.unix(),
            expires_at,
            issuer_node: self.node.to_string(),
            clear_fields: clear,
            application_id: a.id.clone(),
        };
        let mut signed = self.key.sign(&g);
        signed.key_endorsement = Some(self.endorsement.clone());
        signed
    }

    async fn save_grant(&self, signed: &SignedGrant, provider: &str) -> Result<Grant> {
        let g: Grant = decode("grant", &signed.grant)?;
        self.store
            .put_doc(&Doc {
                kind: DocKind::Grant,
                id: g.id.clone(),
                provider_uscc: provider.to_owned(),
                consumer_uscc: g.consumer_uscc.clone(),
                state: 0,
                due_at: g.expires_at,
                body: signed.encode_to_vec(),
            })
            .await?;
        Ok(g)
    }

    /// Files an application for a resource held here; unconditional resources are granted at once.
    pub async fn apply(&self, consumer: &Vouched, req: ApplyRequest) -> Result<Application> {
        text("purpose", &req.purpose, true)?;
        text("scenario", &req.scenario, true)?;
        let entry = self.local_entry(&req.resource_id).await?;
        let share_type = ShareType::try_from(entry.share_type).unwrap_or(ShareType::NotShared);
        let mut record = audit::event(AuditOperation::Application, Peer::Node(self.node).to_uri());
        record.consumer_uscc = consumer.uscc().to_owned();
        record.consumer_node = consumer.node().to_string();
        record.provider_uscc = entry.provider_uscc.clone();
        record.resource_id = entry.id.clone();
        record.purpose = req.purpose.clone();
        let result = self
            .file_application(consumer, &entry, share_type, req)
            .await;
        match &result {
            Ok(a) => {
                record.detail = format!(
                    "application {} {}",
                    a.id,
                    ApplicationState::try_from(a.state)
                        .unwrap_or_default()
                        .as_str_name()
                );
                record.grant_id = a
                    .grant
                    .as_ref()
                    .and_then(|g| Grant::decode(g.grant.as_slice()).ok())
                    .map(|g| g.id)
                    .unwrap_or_default();
            }
            Err(e) => {
                record.outcome = audit::outcome(e.code());
                record.detail = e.to_string();
            }
        }
        self.write(record).await?;
        result
    }

    async fn file_application(
        &self,
        consumer: &Vouched,
        entry: &CatalogEntry,
        share_type: ShareType,
        req: ApplyRequest,
    ) -> Result<Application> {
        if share_type == ShareType::NotShared || share_type == ShareType::Unspecified {
            return Err(Error::PermissionDenied(format!(
                "resource {} is not shared; applications are not accepted",
                entry.id
            )));
        }
        let mode = mode_of(req.mode);
        if !entry.share_modes.contains(&(mode as i32)) {
            return Err(Error::InvalidArgument(format!(
                "mode: resource {} does not offer {}",
                entry.id,
                mode.as_str_name()
            )));
        }
        for f in &req.fields {
            if !entry.fields.iter().any(|e| &e.name == f) {
                return Err(Error::InvalidArgument(format!(
                    "fields: {f:?} is not a field of resource {}",
                    entry.id
                )));
            }
        }
        let now = self.clock.now();
        let now_unix = now.unix_timestamp();
        if req.requested_expires_at != 0 && req.requested_expires_at <= now_unix {
            return Err(Error::InvalidArgument(format!(
                "requested_expires_at {} is not in the future",
                req.requested_expires_at
            )));
        }
        let latest = now_unix.saturating_add(self.max_grant_secs);
        if req.requested_expires_at > latest {
            return Err(Error::InvalidArgument(format!(
                "requested_expires_at {} is later than {latest}: grants run at most {} days (limits.max_grant_days)",
                req.requested_expires_at,
                self.max_grant_secs / 86_400
            )));
        }
        let fields = if req.fields.is_empty() {
            entry.fields.iter().map(|f| f.name.clone()).collect()
        } else {
            req.fields.clone()
        };
        let n = self.store.next_id("application").await?;
        let mut a = Application {
            id: format!("{}-a-{n}", self.node),
            consumer_uscc: consumer.uscc().to_owned(),
            consumer_node: consumer.node().to_string(),
            resource_id: entry.id.clone(),
            purpose: req.purpose.clone(),
            scenario: req.scenario.clone(),
            fields,
            mode: mode as i32,
            requested_expires_at: if req.requested_expires_at == 0 {
                latest
            } else {
                req.requested_expires_at
            },
            state: ApplicationState::Pending as i32,
            filed_at: now_unix,
            due_at: self.calendar.approval_deadline(now).unix_timestamp(),
            decided_at: 0,
            reason: String::new(),
            grant: None,
            overdue: false,
        };
        if share_type == ShareType::Unconditional {
            let grant_no = self.store.next_id("grant").await?;
            let signed = self.issue(
                &a,
                a.fields.clone(),
                mode,
                a.requested_expires_at,
                Vec::new(),
                grant_no,
            );
            self.save_grant(&signed, &entry.provider_uscc).await?;
            a.state = ApplicationState::Approved as i32;
            a.decided_at = now_unix;
            a.reason = "unconditional resource: granted on application".into();
            a.grant = Some(signed);
        }
        self.save_application(&a, &entry.provider_uscc).await?;
        Ok(a)
    }

    /// A document held here, with a refusal that names it when it is missing.
    async fn held_doc(&self, kind: DocKind, id: &str) -> Result<Doc> {
        self.store.doc(kind, id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "{} {id} is not held at node {}",
                kind.as_str(),
                self.node
            ))
        })
    }

    /// Whether `caller` may read a document filed by `filer` at `filer_node` about a resource that `provider`
    /// provides here: the filer through its own node, or the provider agency at this node.
    fn check_party(
        &self,
        (kind, id): (DocKind, &str),
        caller: &Vouched,
        (filer, filer_node): (&str, &str),
        provider: &str,
    ) -> Result<()> {
        let me = self.node;
        if caller.uscc() == filer && caller.node().as_str() == filer_node {
            return Ok(());
        }
        if caller.uscc() == provider && caller.node() == me {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{} {id} is answered only to the agency that filed it, through its own node, or to the provider agency at node {me}; not to {} at node {}",
            kind.as_str(),
            caller.uscc(),
            caller.node()
        )))
    }

    /// One application, visible to its applicant through its own node and to the provider agency here.
    pub async fn application(&self, caller: &Vouched, id: &str) -> Result<Application> {
        Ok(self.application_and_provider(caller, id).await?.0)
    }

    /// One application with the agency providing its resource.
    async fn application_and_provider(
        &self,
        caller: &Vouched,
        id: &str,
    ) -> Result<(Application, String)> {
        let doc = self.held_doc(DocKind::Application, id).await?;
        let mut a: Application = decode("application", &doc.body)?;
        self.check_party(
            (DocKind::Application, id),
            caller,
            (&a.consumer_uscc, &a.consumer_node),
            &doc.provider_uscc,
        )?;
        a.overdue = self.is_overdue(a.due_at, a.decided_at);
        Ok((a, doc.provider_uscc))
    }

    /// Applications for resources `provider` provides here, or filed by it here.
    pub async fn applications(
        &self,
        caller: &str,
        state: ApplicationState,
        overdue_only: bool,
    ) -> Result<Vec<Application>> {
        let state = (state != ApplicationState::Unspecified).then_some(state as i32);
        let mut out = Vec::new();
        for q in [
            DocQuery {
                provider_uscc: Some(caller.to_owned()),
                state,
                ..Default::default()
            },
            DocQuery {
                consumer_uscc: Some(caller.to_owned()),
                state,
                ..Default::default()
            },
        ] {
            for d in self.store.docs(DocKind::Application, &q).await? {
                if out.iter().any(|a: &Application| a.id == d.id) {
                    continue;
                }
                let mut a: Application = decode("application", &d.body)?;
                a.overdue = self.is_overdue(a.due_at, a.decided_at);
                if !overdue_only || a.overdue {
                    out.push(a);
                }
            }
        }
        out.sort_by_key(|a| a.filed_at);
        Ok(out)
    }

    /// Applications for resources `provider` provides here (not those it filed), oldest first.
    pub async fn provided_applications(
        &self,
        provider: &Uscc,
        state: ApplicationState,
    ) -> Result<Vec<Application>> {
        let q = DocQuery {
            provider_uscc: Some(provider.to_string()),
            state: (state != ApplicationState::Unspecified).then_some(state as i32),
            ..Default::default()
        };
        let mut out = Vec::new();
        for d in self.store.docs(DocKind::Application, &q).await? {
            let mut a: Application = decode("application", &d.body)?;
            a.overdue = self.is_overdue(a.due_at, a.decided_at);
            out.push(a);
        }
        out.sort_by_key(|a| a.filed_at);
        Ok(out)
    }

    /// One application for a resource `provider` provides here; another agency's is refused.
    pub async fn provided_application(&self, provider: &Uscc, id: &str) -> Result<Application> {
        let doc = self.held_doc(DocKind::Application, id).await?;
        if doc.provider_uscc != provider.as_str() {
            return Err(Error::PermissionDenied(format!(
                "application {id} is for a resource that {provider} does not provide"
            )));
        }
        let mut a: Application = decode("application", &doc.body)?;
        a.overdue = self.is_overdue(a.due_at, a.decided_at);
        Ok(a)
    }

    /// The grants issued here for resources `provider` provides, with whether each was revoked.
    pub async fn provided_grants(&self, provider: &Uscc) -> Result<Vec<(Grant, bool)>> {
        let q = DocQuery {
            provider_uscc: Some(provider.to_string()),
            ..Default::default()
        };
        let mut out = Vec::new();
        for d in self.store.docs(DocKind::Grant, &q).await? {
            let signed: SignedGrant = decode("grant", &d.body)?;
            let g: Grant = decode("grant", &signed.grant)?;
            let revoked = self.is_revoked(&g.id).await?;
            out.push((g, revoked));
        }
        out.sort_by_key(|(g, _)| std::cmp::Reverse(g.issued_at));
        Ok(out)
    }

    /// Approves or rejects an application for a resource `provider` provides here.
    pub async fn decide(&self, by: &Acting, req: DecideRequest) -> Result<Application> {
        let provider = by.uscc();
        let mut record = audit::event(
            if req.approve {
                AuditOperation::Approval
            } else {
                AuditOperation::Rejection
            },
            by.actor().to_owned(),
        );
        record.provider_uscc = provider.to_string();
        let result = self.decide_inner(provider, req).await;
        match &result {
            Ok(a) => {
                record.consumer_uscc = a.consumer_uscc.clone();
                record.consumer_node = a.consumer_node.clone();
                record.resource_id = a.resource_id.clone();
                record.purpose = a.purpose.clone();
                record.grant_id = a
                    .grant
                    .as_ref()
                    .and_then(|g| Grant::decode(g.grant.as_slice()).ok())
                    .map(|g| g.id)
                    .unwrap_or_default();
                record.detail = by.detail(format!(
                    "application {}{}",
                    a.id,
                    if a.overdue {
                        " (decided after its deadline)"
                    } else {
                        ""
                    }
                ));
            }
            Err(e) => {
                record.outcome = audit::outcome(e.code());
                record.detail = by.detail(e.to_string());
            }
        }
        self.write(record).await?;
        result
    }

    async fn decide_inner(&self, provider: &Uscc, req: DecideRequest) -> Result<Application> {
        text("reason", &req.reason, !req.approve)?;
        let (mut a, owner) = self
            .application_and_provider(
                &Vouched::local(provider, self.node, "", None),
                &req.application_id,
            )
            .await?;
        if owner != provider.as_str() {
            return Err(Error::PermissionDenied(format!(
                "application {} is for a resource that {provider} does not provide",
                a.id
            )));
        }
        if a.state != ApplicationState::Pending as i32 {
            return Err(Error::FailedPrecondition(format!(
                "application {} was already decided ({})",
                a.id,
                ApplicationState::try_from(a.state)
                    .unwrap_or_default()
                    .as_str_name()
            )));
        }
        let now = self.clock.unix();
        a.decided_at = now;
        a.reason = req.reason.clone();
        if !req.approve {
            a.state = ApplicationState::Rejected as i32;
        } else {
            let fields = if req.fields.is_empty() {
                a.fields.clone()
            } else {
                req.fields.clone()
            };
            if let Some(f) = fields.iter().find(|f| !a.fields.contains(f)) {
                return Err(Error::InvalidArgument(format!(
                    "fields: {f:?} was not asked for in application {}; approval may only narrow",
                    a.id
                )));
            }
            if let Some(f) = req.clear_fields.iter().find(|f| !fields.contains(f)) {
                return Err(Error::InvalidArgument(format!(
                    "clear_fields: {f:?} is not among the granted fields"
                )));
            }
            let mode = match ShareMode::try_from(req.mode) {
                Ok(ShareMode::Unspecified) => mode_of(a.mode),
                Ok(m)
                    if m as i32 == a.mode
                        || a.mode == ShareMode::Query as i32 && m == ShareMode::Verify =>
                {
                    m
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "mode: approval may keep {} or narrow QUERY to VERIFY only",
                        mode_of(a.mode).as_str_name()
                    )));
                }
            };
            let latest = now.saturating_add(self.max_grant_secs);
            let expires_at = match req.expires_at {
                0 => a.requested_expires_at.min(latest),
                t if t > latest => {
                    return Err(Error::InvalidArgument(format!(
                        "expires_at {t} is later than {latest}: grants run at most {} days (limits.max_grant_days)",
                        self.max_grant_secs / 86_400
                    )));
                }
                t if t <= now || t > a.requested_expires_at => {
                    return Err(Error::InvalidArgument(format!(
                        "expires_at {t} must be in the future and not after the requested expiry {}",
                        a.requested_expires_at
                    )));
                }
                t => t,
            };
            let grant_no = self.store.next_id("grant").await?;
            let signed = self.issue(
                &a,
                fields,
                mode,
                expires_at,
                req.clear_fields.clone(),
                grant_no,
            );
            self.save_grant(&signed, provider.as_str()).await?;
            a.state = ApplicationState::Approved as i32;
            a.grant = Some(signed);
        }
        a.overdue = self.is_overdue(a.due_at, a.decided_at);
        if a.overdue {
            tracing::warn!(application = %a.id, "application decided after its deadline");
        }
        self.save_application(&a, provider.as_str()).await?;
        Ok(a)
    }

    /// Revokes a grant issued here for a resource `provider` provides; returns the signed notice to send along
    /// the route.
    pub async fn revoke(
        &self,
        by: &Acting,
        grant_id: &str,
        reason: &str,
    ) -> Result<(Verified<Revocation>, RevocationNotice)> {
        let provider = by.uscc();
        text("reason", reason, true)?;
        let doc = self
            .store
            .doc(DocKind::Grant, grant_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "grant {grant_id} was not issued by node {}",
                    self.node
                ))
            })?;
        if doc.provider_uscc != provider.as_str() {
            return Err(Error::PermissionDenied(format!(
                "grant {grant_id} covers a resource of {}, not of {provider}",
                doc.provider_uscc
            )));
        }
        let signed: SignedGrant = decode("grant", &doc.body)?;
        let g: Grant = decode("grant", &signed.grant)?;
        let revocation = Revocation {
            grant_id: grant_id.to_owned(),
            issuer_node: self.node.to_string(),
            consumer_node: g.consumer_node.clone(),
            revoked_at: self.clock.unix(),
            reason: reason.to_owned(),
        };
        let signed = self.signer.sign(&revocation).map_err(|e| {
            Error::Unavailable(format!(
                "node {} cannot sign the revocation: {e}",
                self.node
            ))
        })?;
        let notice = RevocationNotice {
            revocation: Some(signed),
            route: vec![self.node.to_string()],
        };
        let checked = self.check_revocation(&notice)?;
        self.record_revocation(&checked, &notice, false).await?;
        let mut record = audit::event(AuditOperation::Revocation, by.actor().to_owned());
        record.provider_uscc = provider.to_string();
        record.consumer_uscc = g.consumer_uscc.clone();
        record.consumer_node = g.consumer_node.clone();
        record.resource_id = g.resource_id.clone();
        record.grant_id = g.id.clone();
        record.detail = by.detail(reason.to_owned());
        self.write(record).await?;
        Ok((checked, notice))
    }

    /// Checks a revocation notice: signed by a node's federation certificate, by the node that issued the
    /// grant (whose id names it), and naming that node as the issuer.
    pub fn check_revocation(&self, n: &RevocationNotice) -> Result<Verified<Revocation>> {
        let s = crate::statement::required(n.revocation.as_ref(), "revocation notice")?;
        let v: Verified<Revocation> = self.verifier.verify(s, self.clock.unix())?;
        let r = v.body();
        let issuer = grant_issuer(&r.grant_id)?;
        if v.signer() != issuer || r.issuer_node != issuer.as_str() {
            return Err(Error::PermissionDenied(format!(
                "grant {} was issued by node {issuer}; node {} may not revoke it",
                r.grant_id,
                v.signer()
            )));
        }
        Ok(v)
    }

    /// Stores a checked revocation seen here (issued here or passing through); `pending` while this node still
    /// owes it to the next node toward the grantee.
    pub async fn record_revocation(
        &self,
        v: &Verified<Revocation>,
        n: &RevocationNotice,
        pending: bool,
    ) -> Result<()> {
        self.store
            .put_doc(&Doc {
                kind: DocKind::Revocation,
                id: v.body().grant_id.clone(),
                provider_uscc: String::new(),
                consumer_uscc: String::new(),
                state: if pending {
                    REVOCATION_PENDING
                } else {
                    REVOCATION_DELIVERED
                },
                due_at: 0,
                body: n.encode_to_vec(),
            })
            .await?;
        self.revoked().await?.insert(v.body().grant_id.clone());
        Ok(())
    }

    /// Notes a revocation another replica of this node recorded.
    pub async fn revoked_elsewhere(&self, grant_id: &str) -> Result<()> {
        self.revoked().await?.insert(grant_id.to_owned());
        Ok(())
    }

    /// Reads every recorded revocation again (revocations may have been recorded elsewhere unseen).
    pub async fn reload_revocations(&self) -> Result<()> {
        let known = self.revoked().await?;
        for d in self
            .store
            .docs(DocKind::Revocation, &DocQuery::default())
            .await?
        {
            known.insert(d.id);
        }
        Ok(())
    }

    /// Whether a grant was revoked, as far as this node knows.
    pub async fn is_revoked(&self, grant_id: &str) -> Result<bool> {
        Ok(self.revoked().await?.contains(grant_id))
    }

    async fn revoked(&self) -> Result<&dashmap::DashSet<String>> {
        self.revoked
            .get_or_try_init(|| async {
                let ids = dashmap::DashSet::new();
                self.each_doc_page(
                    DocKind::Revocation,
                    DocQuery::default(),
                    SCAN_PAGE,
                    |docs| {
                        for d in docs {
                            ids.insert(d.id);
                        }
                        Ok(())
                    },
                )
                .await?;
                Ok::<_, Error>(ids)
            })
            .await
    }

    /// Checks a grant issued by any node, as the consumer's node does before a request leaves it: the issuer's
    /// certificate-signed endorsement of its key, then the grant's signature under that key. The issuer's node
    /// checks again with its own key ([`Governance::check_grant`]).
    pub fn check_foreign_grant(&self, signed: &SignedGrant) -> Result<Grant> {
        self.opened(OpenedKey::Endorsed, signed, || self.open_endorsed(signed))
    }

    /// The grant if `check` passes, from [`Governance::opened`] when the same check passed lately.
    fn opened(
        &self,
        how: OpenedKey,
        signed: &SignedGrant,
        check: impl FnOnce() -> Result<Grant>,
    ) -> Result<Grant> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update([how as u8]);
        h.update(signed.encode_to_vec());
        let key: [u8; 32] = h.finalize().into();
        if let Some(g) = self.opened.get(&key) {
            return Ok(g);
        }
        let g = check()?;
        self.opened.insert(key, g.clone());
        Ok(g)
    }

    fn open_endorsed(&self, signed: &SignedGrant) -> Result<Grant> {
        let claimed = Grant::decode(signed.grant.as_slice())
            .map_err(|e| Error::InvalidArgument(format!("grant: not an encoded Grant: {e}")))?;
        let issuer = grant_issuer(&claimed.id)?;
        let endorsement = crate::statement::required(signed.key_endorsement.as_ref(), "grant")
            .map_err(|e| Error::PermissionDenied(format!("grant {}: {e}", claimed.id)))?;
        let endorsed = self.verifier.check_endorsement(
            endorsement,
            issuer,
            &signed.public_key,
            self.clock.unix(),
        );
        match endorsed {
            Ok(()) if claimed.issuer_node == issuer.as_str() => {
                grant::open(signed, &signed.public_key).map_err(grant_refusal)
            }
            Ok(()) | Err(StatementError::NotEndorsed { .. }) => {
                Err(Error::PermissionDenied(format!(
                    "grant {} is not signed with a key that node {issuer} endorsed",
                    claimed.id
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks a grant presented for a share of `entry` held here; returns the grant.
    pub async fn check_grant(
        &self,
        signed: &SignedGrant,
        consumer: &Vouched,
        entry: &CatalogEntry,
        mode: ShareMode,
        fields: &[String],
    ) -> Result<Grant> {
        // A grant signed before this node's key rotated carries the endorsement of its older key.
        let g = if signed.public_key == self.key.public_key() || signed.key_endorsement.is_none() {
            self.opened(OpenedKey::Own, signed, || {
                grant::open(signed, &self.key.public_key()).map_err(grant_refusal)
            })?
        } else {
            self.check_foreign_grant(signed)?
        };
        if g.issuer_node != self.node.as_str() {
            return Err(Error::PermissionDenied(format!(
                "grant {} was issued by node {}, not by the resource's node {}",
                g.id, g.issuer_node, self.node
            )));
        }
        if self.is_revoked(&g.id).await? {
            return Err(Error::PermissionDenied(format!(
                "grant {} was revoked",
                g.id
            )));
        }
        grant::check(
            &g,
            &grant::Use {
                consumer_uscc: consumer.uscc(),
                consumer_node: consumer.node().as_str(),
                purpose: consumer.purpose(),
                resource_id: &entry.id,
                mode,
                fields,
                now_unix: self.clock.unix(),
            },
        )
        .map_err(grant_refusal)?;
        Ok(g)
    }

    /// Files an objection against a record of a resource held here.
    pub async fn file_objection(
        &self,
        consumer: &Vouched,
        req: FileObjectionRequest,
    ) -> Result<Objection> {
        text("description", &req.description, true)?;
        text("evidence", &req.evidence, false)?;
        if req.key.is_empty() {
            return Err(Error::InvalidArgument(
                "key is required: which record is wrong".into(),
            ));
        }
        let entry = self.local_entry(&req.resource_id).await?;
        let now = self.clock.now();
        let n = self.store.next_id("objection").await?;
        let o = Objection {
            id: format!("{}-o-{n}", self.node),
            consumer_uscc: consumer.uscc().to_owned(),
            consumer_node: consumer.node().to_string(),
            resource_id: entry.id.clone(),
            key: req.key.clone(),
            description: req.description.clone(),
            evidence: req.evidence.clone(),
            state: ObjectionState::Open as i32,
            filed_at: now.unix_timestamp(),
            due_at: self.calendar.objection_deadline(now).unix_timestamp(),
            resolved_at: 0,
            resolution: String::new(),
            overdue: false,
        };
        self.save_objection(&o, &entry.provider_uscc).await?;
        let mut record = audit::event(
            AuditOperation::Objection,
            format!("urn:fedgate:agency:{}", consumer.uscc()),
        );
        record.consumer_uscc = consumer.uscc().to_owned();
        record.consumer_node = consumer.node().to_string();
        record.provider_uscc = entry.provider_uscc.clone();
        record.resource_id = entry.id.clone();
        record.detail = format!("objection {}", o.id);
        self.write(record).await?;
        Ok(o)
    }

    async fn save_objection(&self, o: &Objection, provider: &str) -> Result<()> {
        self.store
            .put_doc(&Doc {
                kind: DocKind::Objection,
                id: o.id.clone(),
                provider_uscc: provider.to_owned(),
                consumer_uscc: o.consumer_uscc.clone(),
                state: o.state,
                due_at: o.due_at,
                body: o.encode_to_vec(),
            })
            .await?;
        Ok(())
    }

    /// One objection, visible to its filer through its own node and to the provider agency here.
    pub async fn objection(&self, caller: &Vouched, id: &str) -> Result<(Objection, String)> {
        let doc = self.held_doc(DocKind::Objection, id).await?;
        let mut o: Objection = decode("objection", &doc.body)?;
        self.check_party(
            (DocKind::Objection, id),
            caller,
            (&o.consumer_uscc, &o.consumer_node),
            &doc.provider_uscc,
        )?;
        o.overdue = self.is_overdue(o.due_at, o.resolved_at);
        Ok((o, doc.provider_uscc))
    }

    /// Objections about resources `provider` provides here.
    pub async fn objections(
        &self,
        provider: &str,
        state: ObjectionState,
        overdue_only: bool,
    ) -> Result<Vec<Objection>> {
        let q = DocQuery {
            provider_uscc: Some(provider.to_owned()),
            state: (state != ObjectionState::Unspecified).then_some(state as i32),
            ..Default::default()
        };
        let mut out = Vec::new();
        for d in self.store.docs(DocKind::Objection, &q).await? {
            let mut o: Objection = decode("objection", &d.body)?;
            o.overdue = self.is_overdue(o.due_at, o.resolved_at);
            if !overdue_only || o.overdue {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Confirms or corrects the record an objection is about.
    pub async fn resolve_objection(
        &self,
        by: &Acting,
        req: ResolveObjectionRequest,
    ) -> Result<Objection> {
        let provider = by.uscc();
        text("resolution", &req.resolution, true)?;
        let (mut o, owner) = self
            .objection(
                &Vouched::local(provider, self.node, "", None),
                &req.objection_id,
            )
            .await?;
        if owner != provider.as_str() {
            return Err(Error::PermissionDenied(format!(
                "objection {} is about a resource that {provider} does not provide",
                o.id
            )));
        }
        if o.state != ObjectionState::Open as i32 {
            return Err(Error::FailedPrecondition(format!(
                "objection {} is already resolved",
                o.id
            )));
        }
        o.state = if req.corrected {
            ObjectionState::Corrected
        } else {
            ObjectionState::Confirmed
        } as i32;
        o.resolved_at = self.clock.unix();
        o.resolution = req.resolution.clone();
        o.overdue = self.is_overdue(o.due_at, o.resolved_at);
        self.save_objection(&o, provider.as_str()).await?;
        let mut record = audit::event(AuditOperation::ObjectionResolved, by.actor().to_owned());
        record.provider_uscc = provider.to_string();
        record.consumer_uscc = o.consumer_uscc.clone();
        record.resource_id = o.resource_id.clone();
        record.detail = by.detail(format!(
            "objection {}: {}",
            o.id,
            ObjectionState::try_from(o.state)
                .unwrap_or_default()
                .as_str_name()
        ));
        self.write(record).await?;
        Ok(o)
    }
}

/// The node that issued a grant, from its id ("<node code>-g-<number>").
pub fn grant_issuer(grant_id: &str) -> Result<DivisionCode> {
    grant_id
        .split_once("-g-")
        .filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|(node, _)| node.parse().ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "grant id {:?} is not of the form <node code>-g-<number>",
                crate::limits::excerpt(grant_id)
            ))
        })
}

//! `fedgate.v1.Agency`: what a node serves to the agencies registered on it.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::agency_server::Agency;
use fedgate_proto::v1::{
    AnswerDemandRequest, Demand, FileDemandRequest, GetDemandRequest, ListDemandsRequest,
    ListDemandsResponse,
};
use fedgate_proto::v1::{
    Application, ApplicationState, ApplyRequest, AuditOperation, AuditRecord, CatalogEntry,
    DecideRequest, Envelope, FileObjectionRequest, GetApplicationRequest, GetEntryRequest,
    GetObjectionRequest, Grant, Hop, ListApplicationsRequest, ListApplicationsResponse,
    ListGrantsRequest, ListGrantsResponse, ListMyApplicationsRequest, ListMyApplicationsResponse,
    ListNoticesRequest, ListNoticesResponse, ListObjectionsRequest, ListObjectionsResponse, Notice,
    Objection, ObjectionState, PublishBatchRequest, PublishBatchResponse, PublishEntryRequest,
    PublishEntryResponse, QueryAuditRequest, QueryAuditResponse, RequestKind,
    ResolveObjectionRequest, RevokeRequest, RevokeResponse, SearchCatalogRequest,
    SearchCatalogResponse, ShareMode, ShareRequest, ShareResponse, Stream, WatchNoticesRequest,
    WithdrawEntryRequest, WithdrawEntryResponse,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{audit_query, caller, deadline};

mod own_view;
use crate::assertion::Vouched;
use crate::audit::{self, AuditLog};
use crate::cache::{CachedAnswer, ShareCache};
use crate::catalog::{self, parse_resource_id};
use crate::error::{Error, Result};
use crate::governance::Acting;
use crate::ident::{Peer, Uscc};
use crate::limits::{Bounded, LimitsConfig, excerpt};
use crate::route::{Router, action};
use crate::store::{Store, Upstream};
use crate::topology::Topology;
use crate::uplink::Uplink;

mod demand;

/// Characters a bulk page adds to the caller's request id ("-p" and the page number).
const PAGE_SUFFIX: usize = 22;

/// The Agency service of one node.
#[derive(Clone)]
pub struct AgencyService {
    /// The latest certificate each agency presented, which this node's assertions carry.
    certificates: Arc<dashmap::DashMap<Uscc, Arc<[u8]>>>,
    topology: Arc<Topology>,
    store: Arc<dyn Store>,
    router: Router,
    uplink: Uplink,
    audit: AuditLog,
    limits: LimitsConfig,
    /// What this node keeps of its agencies' applications and grants.
    own_view: crate::own_view::OwnView,
}

impl AgencyService {
    /// A service over this node's state.
    pub fn new(
        topology: Arc<Topology>,
        store: Arc<dyn Store>,
        router: Router,
        uplink: Uplink,
        audit: AuditLog,
    ) -> Self {
        Self {
            certificates: Arc::default(),
            own_view: crate::own_view::OwnView::new(
                store.clone(),
                router.clone(),
                Default::default(),
            ),
            topology,
            store,
            router,
            uplink,
            audit,
            limits: LimitsConfig::default(),
        }
    }

    /// The service keeping its agencies' own view as `config` says instead of the defaults.
    pub fn with_own_view(mut self, config: crate::own_view::OwnViewConfig) -> Self {
        self.own_view =
            crate::own_view::OwnView::new(self.store.clone(), self.router.clone(), config);
        self
    }

    /// The own view of this node's agencies (its periodic work runs as [`crate::own_view::OwnView::run`]).
    pub fn own_view(&self) -> &crate::own_view::OwnView {
        &self.own_view
    }

    /// The service with `limits` on what agencies send instead of the defaults.
    pub fn with_limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    /// Where this node's catalog changes go.
    fn upstream(&self) -> Upstream {
        Upstream::of(self.topology.parent.is_some())
    }

    /// The calling agency, registered on this node, and a message within the limits; a refusal is audited.
    async fn admitted<T: Bounded>(&self, req: &Request<T>, rpc: &str) -> Result<Uscc, Status> {
        let uscc = self.agency(req, rpc).await?;
        if let Err(e) = req.get_ref().check_limits(&self.limits) {
            let mut r = crate::limits::refusal(
                Peer::Agency(uscc.clone()).to_uri(),
                &format!("Agency.{rpc}"),
                &e,
            );
            r.consumer_uscc = uscc.to_string();
            r.consumer_node = self.topology.code.to_string();
            self.write(r).await?;
            return Err(e.into());
        }
        Ok(uscc)
    }

    /// The calling agency, which must be registered on this node, by configuration and by its certificate; a
    /// refusal is audited. Its certificate is kept to vouch for it in the assertions this node signs.
    async fn agency<T>(&self, req: &Request<T>, rpc: &str) -> Result<Uscc, Status> {
        let me = self.topology.code;
        let info = crate::tls::peer_info(req);
        let refusal = match caller(req) {
            Ok(Peer::Agency(uscc)) if self.topology.agencies.contains_key(&uscc) => {
                let registered = info.and_then(|p| p.registered_at);
                if let Some(p) = info.filter(|_| registered == Some(me)) {
                    if self
                        .certificates
                        .get(&uscc)
                        .is_none_or(|c| *c.value() != p.certificate)
                    {
                        self.certificates
                            .insert(uscc.clone(), p.certificate.clone());
                    }
                    return Ok(uscc);
                }
                (
                    Peer::Agency(uscc.clone()).to_uri(),
                    Error::PermissionDenied(format!(
                        "the certificate of agency {uscc} registers it at {}, not at node {me}",
                        registered.map_or_else(|| "no node".to_owned(), |n| format!("node {n}"))
                    )),
                )
            }
            Ok(other) => (
                other.to_uri(),
                Error::PermissionDenied(format!(
                    "{other} is not an agency registered on node {}",
                    self.topology.code
                )),
            ),
            Err(e) => (String::new(), e),
        };
        let (actor, err) = refusal;
        let mut r = audit::event(AuditOperation::AuthRefused, actor);
        r.outcome = audit::outcome(err.code());
        r.detail = format!("Agency.{rpc}: {err}");
        self.write(r).await?;
        Err(err.into())
    }

    /// Writes a record, failing the call if it cannot be made durable.
    async fn write(&self, record: AuditRecord) -> Result<(), Status> {
        self.audit.record(record).await.map(|_| ()).map_err(|e| {
            Status::unavailable(format!(
                "node {} could not write its audit trail, so the call is not answered; retry it: {e}",
                self.topology.code
            ))
        })
    }

    /// Discovery over this node's catalog and its ancestors'.
    fn discovery(&self) -> catalog::discover::Discovery<'_> {
        catalog::discover::Discovery {
            topology: &self.topology,
            store: self.store.as_ref(),
            limits: &self.limits,
            routing: self.router.limits(),
        }
    }

    /// How long a catalog question may take at most.
    fn discovery_timeout(&self) -> Duration {
        Duration::from_millis(self.router.limits().default_timeout_ms)
    }

    /// A live entry of this node's subtree.
    async fn subtree_entry(&self, id: &str) -> Result<CatalogEntry> {
        let rid = parse_resource_id("id", id)?;
        let me = self.topology.code;
        if !me.contains(&rid.node()) {
            return Err(Error::NotFound(format!(
                "resource {id} is held by node {}, outside the subtree of node {me}",
                rid.node()
            )));
        }
        self.store
            .entry(id)
            .await?
            .filter(|s| !s.withdrawn)
            .map(|s| s.entry)
            .ok_or_else(|| {
                Error::NotFound(format!("resource {id} is not in the catalog of node {me}"))
            })
    }

    async fn publish(&self, uscc: &Uscc, req: PublishEntryRequest) -> Result<CatalogEntry> {
        let entry = req
            .entry
            .ok_or_else(|| Error::InvalidArgument("entry is required".into()))?;
        let entry =
            catalog::prepare_publish(self.topology.code, uscc, entry, now_rfc3339(), &self.limits)?;
        let existing = self.store.entry(&entry.id).await?;
        if let Some(existing) = existing.filter(|e| e.entry.provider_uscc != uscc.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "resource {} belongs to agency {}, not {uscc}",
                entry.id, existing.entry.provider_uscc
            )));
        }
        let stored = self.store.publish_local(entry, self.upstream()).await?;
        self.uplink.wake(Stream::Catalog);
        self.router
            .entry_changed(&stored.id, stored.version)
            .await?;
        Ok(stored)
    }

    /// Validates, stores and announces a batch, all of it or nothing.
    async fn publish_batch_of(
        &self,
        uscc: &Uscc,
        entries: Vec<CatalogEntry>,
    ) -> Result<Vec<CatalogEntry>> {
        let entries = catalog::prepare_batch(
            self.topology.code,
            uscc,
            entries,
            &now_rfc3339(),
            &self.limits,
        )?;
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let foreign: std::collections::HashMap<String, String> = self
            .store
            .entries(&ids)
            .await?
            .into_iter()
            .filter(|e| e.entry.provider_uscc != uscc.as_str())
            .map(|e| (e.entry.id, e.entry.provider_uscc))
            .collect();
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| foreign.contains_key(*id))
        {
            return Err(Error::PermissionDenied(format!(
                "entries[{i}]: resource {id} belongs to agency {}, not {uscc}",
                foreign.get(id).map_or("", String::as_str)
            )));
        }
        let stored = self
            .store
            .publish_local_batch(entries, self.upstream())
            .await?;
        self.uplink.wake(Stream::Catalog);
        for chunk in stored.chunks(8) {
            let purges = chunk
                .iter()
                .map(|e| self.router.entry_changed(&e.id, e.version));
            for purged in futures::future::join_all(purges).await {
                purged?;
            }
        }
        Ok(stored)
    }

    async fn withdraw(&self, uscc: &Uscc, id: &str) -> Result<u64> {
        let entry = self.subtree_entry(id).await?;
        if entry.node_code != self.topology.code.as_str() || entry.provider_uscc != uscc.as_str() {
            return Err(Error::PermissionDenied(format!(
                "resource {id} is provided by agency {} at node {}, not by {uscc} here",
                entry.provider_uscc, entry.node_code
            )));
        }
        let version = self
            .store
            .withdraw_local(id, self.upstream())
            .await?
            .ok_or_else(|| Error::NotFound(format!("resource {id} is not in the catalog")))?;
        self.uplink.wake(Stream::Catalog);
        self.router.entry_changed(id, version).await?;
        Ok(version)
    }

    /// Sends a request of `kind` toward the node holding `target`, returning the provider node's encoded answer.
    async fn route_to(
        &self,
        uscc: &Uscc,
        (kind, target, resource_id): (RequestKind, crate::ident::DivisionCode, &str),
        share: Option<&ShareRequest>,
        request: Vec<u8>,
        deadline: std::time::Instant,
    ) -> Result<crate::route::Forwarded> {
        let me = self.topology.code;
        let grant_id = share
            .and_then(|s| s.grant.as_ref())
            .and_then(|g| Grant::decode(g.grant.as_slice()).ok())
            .map(|g| g.id)
            .unwrap_or_default();
        let env = Envelope {
            request_id: share
                .map(|s| s.request_id.clone())
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            resource_id: resource_id.to_owned(),
            target_node: target.to_string(),
            consumer_uscc: uscc.to_string(),
            consumer_node: me.to_string(),
            route: vec![Hop {
                node_code: me.to_string(),
                seen_peer: Peer::Agency(uscc.clone()).to_uri(),
                action: action::RECEIVED.to_owned(),
                elapsed_us: 0,
            }],
            hops_left: self.router.limits().hop_limit,
            timeout_ms: 0,
            purpose: share.map(|s| s.purpose.clone()).unwrap_or_default(),
            mode: share.map_or(0, |s| s.mode),
            kind: kind as i32,
            grant_id,
            open_data: false,
            assertion: None,
        };
        let certificate = self.certificates.get(uscc).map(|c| c.value().clone());
        let consumer = Vouched::local(uscc, me, &env.purpose, certificate);
        self.router
            .originate(env, request, deadline, consumer)
            .await
    }

    async fn route_share(
        &self,
        uscc: &Uscc,
        share: &mut ShareRequest,
        deadline: std::time::Instant,
    ) -> Result<ShareResponse> {
        let me = self.topology.code;
        let admission = tracing::info_span!(
            "admission",
            fedgate.node = %me,
            fedgate.resource = %share.resource_id,
            fedgate.consumer = %uscc,
            fedgate.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let admitted = self.admit(share).instrument(admission.clone()).await;
        crate::telemetry::record_outcome(&admission, &admitted);
        let (rid, grant_expiry) = match admitted {
            Ok(admitted) => admitted,
            Err(e) => {
                // Refused before any hop saw it: this node records the refusal itself.
                self.record_refusal(uscc, share, &e).await?;
                return Err(e);
            }
        };
        let governance = self.router.governance();
        let cache_key = (rid.node() != me)
            .then(|| ShareCache::key(uscc.as_str(), share))
            .flatten()
            .filter(|_| grant_expiry.is_none_or(|t| governance.clock().unix() < t));
        let hit = match &cache_key {
            Some(key) => {
                let lookup = tracing::info_span!(
                    "cache.lookup",
                    fedgate.node = %me,
                    fedgate.resource = %share.resource_id,
                    fedgate.hit = tracing::field::Empty,
                );
                let hit = self
                    .router
                    .cache()
                    .get(key)
                    .instrument(lookup.clone())
                    .await;
                lookup.record("fedgate.hit", hit.is_some());
                hit
            }
            None => None,
        };
        if let Some(hit) = hit {
            return self.answer_from_cache(uscc, share, &hit).await;
        }
        let out = self
            .route_to(
                uscc,
                (RequestKind::Share, rid.node(), &rid.to_string()),
                Some(share),
                share.encode_to_vec(),
                deadline,
            )
            .await?;
        let mut resp = ShareResponse::decode(out.response.as_slice()).map_err(|e| {
            Error::Upstream(Status::internal(format!(
                "provider node answered an undecodable response: {e}"
            )))
        })?;
        if let Some(key) = cache_key {
            self.router
                .cache()
                .insert(
                    key,
                    CachedAnswer {
                        response: out.response,
                        route: out.route.clone(),
                        grant_id: resp.grant_id.clone(),
                        resource_id: resp.resource_id.clone(),
                        ttl: Duration::from_millis(out.cacheable_ms),
                    },
                )
                .await;
        }
        resp.route = out.route;
        Ok(resp)
    }

    /// Checks what the consumer's node can check before routing: ids, the grant's form and revocation.
    async fn admit(
        &self,
        share: &mut ShareRequest,
    ) -> Result<(crate::catalog::ResourceId, Option<i64>)> {
        share.request_id = request_id(
            &share.request_id,
            self.limits.max_request_id_chars + PAGE_SUFFIX,
        )
        .inspect_err(|_| {
            share.request_id.clear();
        })?;
        let rid = parse_resource_id("resource_id", &share.resource_id)?;
        let mut grant_expiry = None;
        if let Some(signed) = &share.grant {
            let g = self.router.governance().check_foreign_grant(signed)?;
            if self.router.governance().is_revoked(&g.id).await? {
                return Err(Error::PermissionDenied(format!(
                    "grant {} was revoked",
                    g.id
                )));
            }
            if share.purpose.is_empty() {
                // The purpose the grant was issued for, unless the consumer states one (which must match).
                share.purpose = g.purpose.clone();
            }
            grant_expiry = Some(g.expires_at);
        }
        Ok((rid, grant_expiry))
    }

    async fn record_refusal(
        &self,
        uscc: &Uscc,
        share: &ShareRequest,
        e: &Error,
    ) -> Result<(), Error> {
        let mut r = audit::event(
            AuditOperation::ShareForward,
            Peer::Agency(uscc.clone()).to_uri(),
        );
        r.consumer_uscc = uscc.to_string();
        r.consumer_node = self.topology.code.to_string();
        r.resource_id = share.resource_id.clone();
        r.request_id = share.request_id.clone();
        r.purpose = share.purpose.clone();
        r.grant_id = share
            .grant
            .as_ref()
            .and_then(|g| Grant::decode(g.grant.as_slice()).ok())
            .map(|g| g.id)
            .unwrap_or_default();
        r.mode = ShareMode::try_from(share.mode)
            .unwrap_or(ShareMode::Query)
            .as_str_name()
            .to_owned();
        r.outcome = audit::outcome(e.code());
        r.detail = e.to_string();
        self.audit.record(r).await.map(|_| ()).map_err(|err| {
            Error::Unavailable(format!(
                "node {} could not write its audit trail: {err}",
                self.topology.code
            ))
        })
    }

    async fn answer_from_cache(
        &self,
        uscc: &Uscc,
        share: &ShareRequest,
        hit: &CachedAnswer,
    ) -> Result<ShareResponse> {
        let me = self.topology.code;
        let mut resp = ShareResponse::decode(hit.response.as_slice()).map_err(|e| {
            Error::Upstream(Status::internal(format!(
                "cached answer is undecodable: {e}"
            )))
        })?;
        let mut r = audit::event(
            AuditOperation::CacheHit,
            Peer::Agency(uscc.clone()).to_uri(),
        );
        r.consumer_uscc = uscc.to_string();
        r.consumer_node = me.to_string();
        r.resource_id = share.resource_id.clone();
        r.request_id = share.request_id.clone();
        r.purpose = share.purpose.clone();
        r.grant_id = hit.grant_id.clone();
        r.mode = ShareMode::try_from(share.mode)
            .unwrap_or(ShareMode::Query)
            .as_str_name()
            .to_owned();
        r.route = vec![me.to_string()];
        r.response_digest = audit::digest(&hit.response);
        self.audit.record(r).await.map_err(|e| {
            Error::Unavailable(format!("node {me} could not write its audit trail: {e}"))
        })?;
        resp.request_id = share.request_id.clone();
        resp.from_cache = true;
        resp.route = vec![Hop {
            node_code: me.to_string(),
            seen_peer: Peer::Agency(uscc.clone()).to_uri(),
            action: action::CACHE_HIT.to_owned(),
            elapsed_us: 0,
        }];
        Ok(resp)
    }

    /// Sends a governance request to the node named by an id like "350102-a-7".
    async fn route_by_id<M: Message + Default>(
        &self,
        uscc: &Uscc,
        kind: RequestKind,
        id: &str,
        request: Vec<u8>,
    ) -> Result<M> {
        let node = id
            .split_once('-')
            .and_then(|(n, _)| n.parse::<crate::ident::DivisionCode>().ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "id {:?} must start with the division code of the node that issued it",
                    excerpt(id)
                ))
            })?;
        let deadline = std::time::Instant::now()
            + Duration::from_millis(self.router.limits().default_timeout_ms);
        let out = self
            .route_to(uscc, (kind, node, ""), None, request, deadline)
            .await?;
        M::decode(out.response.as_slice()).map_err(|e| {
            Error::Upstream(Status::internal(format!(
                "node {node} answered an undecodable {}: {e}",
                kind.as_str_name()
            )))
        })
    }

    /// Checks a subscription here, sends it to the resource's node and keeps what that node answered.
    async fn subscribe_routed(
        &self,
        uscc: &Uscc,
        r: fedgate_proto::v1::SubscribeRequest,
    ) -> Result<fedgate_proto::v1::Subscription> {
        let flowback = self.router.flowback()?;
        let share = flowback.before_subscribe(uscc, &r).await?;
        let rid = parse_resource_id("resource_id", &r.resource_id)?;
        let deadline = std::time::Instant::now()
            + Duration::from_millis(self.router.limits().default_timeout_ms);
        let out = self
            .route_to(
                uscc,
                (RequestKind::Subscribe, rid.node(), &rid.to_string()),
                Some(&share),
                r.encode_to_vec(),
                deadline,
            )
            .await?;
        let sub =
            fedgate_proto::v1::Subscription::decode(out.response.as_slice()).map_err(|e| {
                Error::Upstream(Status::internal(format!(
                    "node {} answered an undecodable Subscription: {e}",
                    rid.node()
                )))
            })?;
        flowback.subscribed(&sub).await?;
        Ok(sub)
    }

    async fn unsubscribe_routed(
        &self,
        uscc: &Uscc,
        r: fedgate_proto::v1::UnsubscribeRequest,
    ) -> Result<fedgate_proto::v1::Subscription> {
        let flowback = self.router.flowback()?;
        let own = flowback.before_unsubscribe(uscc, &r).await?;
        let sub: fedgate_proto::v1::Subscription = self
            .route_by_resource(
                uscc,
                RequestKind::Unsubscribe,
                &own.resource_id,
                r.encode_to_vec(),
            )
            .await?;
        flowback.subscribed(&sub).await?;
        Ok(sub)
    }

    /// Sends a governance request about a resource to the resource's node.
    async fn route_by_resource<M: Message + Default>(
        &self,
        uscc: &Uscc,
        kind: RequestKind,
        resource_id: &str,
        request: Vec<u8>,
    ) -> Result<M> {
        let rid = parse_resource_id("resource_id", resource_id)?;
        let deadline = std::time::Instant::now()
            + Duration::from_millis(self.router.limits().default_timeout_ms);
        let out = self
            .route_to(
                uscc,
                (kind, rid.node(), &rid.to_string()),
                None,
                request,
                deadline,
            )
            .await?;
        M::decode(out.response.as_slice()).map_err(|e| {
            Error::Upstream(Status::internal(format!(
                "node {} answered an undecodable {}: {e}",
                rid.node(),
                kind.as_str_name()
            )))
        })
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The request id a caller gave (at most `max` letters, digits or '-'), or a new one.
fn request_id(given: &str, max: usize) -> Result<String> {
    if given.is_empty() {
        return Ok(uuid::Uuid::new_v4().to_string());
    }
    if given.len() > max || !given.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(Error::InvalidArgument(format!(
            "request_id {:?} must be 1-{max} letters, digits or '-'",
            excerpt(given)
        )));
    }
    Ok(given.to_owned())
}

/// Fills a record's outcome from a result.
fn conclude<T>(record: &mut AuditRecord, result: &Result<T>) {
    if let Err(e) = result {
        record.outcome = audit::outcome(e.code());
        record.detail = e.to_string();
    }
}

#[tonic::async_trait]
impl Agency for AgencyService {
    async fn publish_entry(
        &self,
        req: Request<PublishEntryRequest>,
    ) -> Result<Response<PublishEntryResponse>, Status> {
        let uscc = self.admitted(&req, "PublishEntry").await?;
        let mut record = audit::event(
            AuditOperation::CatalogPublish,
            Peer::Agency(uscc.clone()).to_uri(),
        );
        record.provider_uscc = uscc.to_string();
        record.resource_id = req
            .get_ref()
            .entry
            .as_ref()
            .map(|e| e.id.clone())
            .unwrap_or_default();
        let result = self.publish(&uscc, req.into_inner()).await;
        conclude(&mut record, &result);
        if let Ok(e) = &result {
            record.resource_id = e.id.clone();
            record.detail = format!("version {}", e.version);
        }
        self.write(record).await?;
        let stored = result?;
        tracing::debug!(id = %stored.id, version = stored.version, agency = %uscc, "catalog entry published");
        Ok(Response::new(PublishEntryResponse {
            entry: Some(stored),
        }))
    }

    async fn publish_batch(
        &self,
        req: Request<PublishBatchRequest>,
    ) -> Result<Response<PublishBatchResponse>, Status> {
        let uscc = self.admitted(&req, "PublishBatch").await?;
        let entries = req.into_inner().entries;
        let count = entries.len();
        let first_id = entries.first().map(|e| e.id.clone()).unwrap_or_default();
        let record = || {
            let mut r = audit::event(
                AuditOperation::CatalogPublish,
                Peer::Agency(uscc.clone()).to_uri(),
            );
            r.provider_uscc = uscc.to_string();
            r
        };
        let result = self.publish_batch_of(&uscc, entries).await;
        let stored = match result {
            Ok(stored) => stored,
            Err(e) => {
                let mut r = record();
                r.resource_id = first_id;
                r.outcome = audit::outcome(e.code());
                r.detail = format!("Agency.PublishBatch of {count} entries: {e}");
                self.write(r).await?;
                return Err(e.into());
            }
        };
        // One record per entry, as a single publication writes; written together, so one commit carries them.
        let writes = stored.iter().map(|e| {
            let mut r = record();
            r.resource_id = e.id.clone();
            r.detail = format!("version {}", e.version);
            self.write(r)
        });
        for written in futures::future::join_all(writes).await {
            written?;
        }
        tracing::debug!(entries = stored.len(), agency = %uscc, "catalog batch published");
        Ok(Response::new(PublishBatchResponse { entries: stored }))
    }

    async fn withdraw_entry(
        &self,
        req: Request<WithdrawEntryRequest>,
    ) -> Result<Response<WithdrawEntryResponse>, Status> {
        let uscc = self.admitted(&req, "WithdrawEntry").await?;
        let id = req.into_inner().id;
        let mut record = audit::event(
            AuditOperation::CatalogWithdraw,
            Peer::Agency(uscc.clone()).to_uri(),
        );
        record.provider_uscc = uscc.to_string();
        record.resource_id = id.clone();
        let result = self.withdraw(&uscc, &id).await;
        conclude(&mut record, &result);
        self.write(record).await?;
        Ok(Response::new(WithdrawEntryResponse { version: result? }))
    }

    async fn get_entry(
        &self,
        req: Request<GetEntryRequest>,
    ) -> Result<Response<CatalogEntry>, Status> {
        self.admitted(&req, "GetEntry").await?;
        let deadline = deadline(&req, self.discovery_timeout());
        let (entry, _) = self
            .discovery()
            .entry(&req.get_ref().id, Vec::new(), deadline)
            .await?;
        Ok(Response::new(entry))
    }

    async fn search_catalog(
        &self,
        req: Request<SearchCatalogRequest>,
    ) -> Result<Response<SearchCatalogResponse>, Status> {
        self.admitted(&req, "SearchCatalog").await?;
        let deadline = deadline(&req, self.discovery_timeout());
        let answer = self
            .discovery()
            .search(req.into_inner(), Vec::new(), deadline)
            .await?;
        Ok(Response::new(answer))
    }

    async fn share(&self, req: Request<ShareRequest>) -> Result<Response<ShareResponse>, Status> {
        let uscc = self.admitted(&req, "Share").await?;
        let limit = Duration::from_millis(self.router.limits().default_timeout_ms);
        let deadline = deadline(&req, limit);
        let mut share = req.into_inner();
        let result = self.route_share(&uscc, &mut share, deadline).await;
        Ok(Response::new(result?))
    }

    async fn query_audit(
        &self,
        req: Request<QueryAuditRequest>,
    ) -> Result<Response<QueryAuditResponse>, Status> {
        let uscc = self.admitted(&req, "QueryAudit").await?;
        let q = req.into_inner();
        let counterpart = if q.counterpart_uscc.is_empty() {
            None
        } else {
            Some(
                q.counterpart_uscc
                    .parse::<Uscc>()
                    .map_err(|e| Error::InvalidArgument(format!("counterpart_uscc: {e}")))?
                    .to_string(),
            )
        };
        Ok(Response::new(
            audit_query(
                self.store.as_ref(),
                &q,
                Some(uscc.to_string()),
                counterpart,
                None,
            )
            .await?,
        ))
    }

    type BulkStream = ReceiverStream<Result<ShareResponse, Status>>;

    async fn bulk(&self, req: Request<ShareRequest>) -> Result<Response<Self::BulkStream>, Status> {
        let uscc = self.admitted(&req, "Bulk").await?;
        let mut share = req.into_inner();
        share.mode = ShareMode::Bulk as i32;
        share.request_id = request_id(&share.request_id, self.limits.max_request_id_chars)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let svc = self.clone();
        tokio::spawn(async move {
            let base_id = share.request_id.clone();
            for page in 0u64.. {
                share.request_id = format!("{base_id}-p{page}");
                let deadline = std::time::Instant::now()
                    + Duration::from_millis(svc.router.limits().default_timeout_ms);
                let result = svc.route_share(&uscc, &mut share, deadline).await;
                let next = result.as_ref().map(|r| r.next_page_token.clone()).ok();
                if tx.send(result.map_err(Status::from)).await.is_err() {
                    return;
                }
                match next {
                    Some(token) if !token.is_empty() => share.page_token = token,
                    _ => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn apply(&self, req: Request<ApplyRequest>) -> Result<Response<Application>, Status> {
        let uscc = self.admitted(&req, "Apply").await?;
        let r = req.into_inner();
        let resource = r.resource_id.clone();
        let app = self
            .route_by_resource(&uscc, RequestKind::Apply, &resource, r.encode_to_vec())
            .await?;
        self.keep_seen(&uscc, &app).await;
        Ok(Response::new(app))
    }

    async fn get_application(
        &self,
        req: Request<GetApplicationRequest>,
    ) -> Result<Response<Application>, Status> {
        let uscc = self.admitted(&req, "GetApplication").await?;
        let r = req.into_inner();
        let id = r.id.clone();
        let app = self
            .route_by_id(&uscc, RequestKind::GetApplication, &id, r.encode_to_vec())
            .await?;
        self.keep_seen(&uscc, &app).await;
        Ok(Response::new(app))
    }

    async fn list_applications(
        &self,
        req: Request<ListApplicationsRequest>,
    ) -> Result<Response<ListApplicationsResponse>, Status> {
        let uscc = self.agency(&req, "ListApplications").await?;
        let r = req.into_inner();
        let state = ApplicationState::try_from(r.state)
            .map_err(|_| Error::InvalidArgument(format!("state {} is unknown", r.state)))?;
        let applications = self
            .router
            .governance()
            .applications(uscc.as_str(), state, r.overdue_only)
            .await?;
        Ok(Response::new(ListApplicationsResponse { applications }))
    }

    async fn decide(&self, req: Request<DecideRequest>) -> Result<Response<Application>, Status> {
        let uscc = self.admitted(&req, "Decide").await?;
        Ok(Response::new(
            self.router
                .governance()
                .decide(&Acting::agency(uscc), req.into_inner())
                .await?,
        ))
    }

    async fn revoke(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let uscc = self.admitted(&req, "Revoke").await?;
        let r = req.into_inner();
        let notified_nodes = self
            .router
            .revoke(&Acting::agency(uscc), &r.grant_id, &r.reason)
            .await?;
        Ok(Response::new(RevokeResponse { notified_nodes }))
    }

    async fn file_objection(
        &self,
        req: Request<FileObjectionRequest>,
    ) -> Result<Response<Objection>, Status> {
        let uscc = self.admitted(&req, "FileObjection").await?;
        let r = req.into_inner();
        let resource = r.resource_id.clone();
        Ok(Response::new(
            self.route_by_resource(&uscc, RequestKind::Objection, &resource, r.encode_to_vec())
                .await?,
        ))
    }

    async fn get_objection(
        &self,
        req: Request<GetObjectionRequest>,
    ) -> Result<Response<Objection>, Status> {
        let uscc = self.admitted(&req, "GetObjection").await?;
        let r = req.into_inner();
        let id = r.id.clone();
        Ok(Response::new(
            self.route_by_id(&uscc, RequestKind::GetObjection, &id, r.encode_to_vec())
                .await?,
        ))
    }

    async fn list_objections(
        &self,
        req: Request<ListObjectionsRequest>,
    ) -> Result<Response<ListObjectionsResponse>, Status> {
        let uscc = self.agency(&req, "ListObjections").await?;
        let r = req.into_inner();
        let state = ObjectionState::try_from(r.state)
            .map_err(|_| Error::InvalidArgument(format!("state {} is unknown", r.state)))?;
        let objections = self
            .router
            .governance()
            .objections(uscc.as_str(), state, r.overdue_only)
            .await?;
        Ok(Response::new(ListObjectionsResponse { objections }))
    }

    async fn subscribe(
        &self,
        req: Request<fedgate_proto::v1::SubscribeRequest>,
    ) -> Result<Response<fedgate_proto::v1::Subscription>, Status> {
        let uscc = self.admitted(&req, "Subscribe").await?;
        let r = req.into_inner();
        Ok(Response::new(self.subscribe_routed(&uscc, r).await?))
    }

    type ReadSubscriptionStream =
        ReceiverStream<Result<fedgate_proto::v1::ReadSubscriptionResponse, Status>>;

    async fn read_subscription(
        &self,
        req: Request<fedgate_proto::v1::ReadSubscriptionRequest>,
    ) -> Result<Response<Self::ReadSubscriptionStream>, Status> {
        let uscc = self.admitted(&req, "ReadSubscription").await?;
        let flowback = self.router.flowback()?;
        Ok(Response::new(flowback.read(&uscc, req.into_inner()).await?))
    }

    async fn unsubscribe(
        &self,
        req: Request<fedgate_proto::v1::UnsubscribeRequest>,
    ) -> Result<Response<fedgate_proto::v1::Subscription>, Status> {
        let uscc = self.admitted(&req, "Unsubscribe").await?;
        let r = req.into_inner();
        Ok(Response::new(self.unsubscribe_routed(&uscc, r).await?))
    }

    async fn list_subscriptions(
        &self,
        req: Request<fedgate_proto::v1::ListSubscriptionsRequest>,
    ) -> Result<Response<fedgate_proto::v1::ListSubscriptionsResponse>, Status> {
        let uscc = self.admitted(&req, "ListSubscriptions").await?;
        let flowback = self.router.flowback()?;
        Ok(Response::new(flowback.list(&uscc, req.get_ref()).await?))
    }

    async fn resolve_objection(
        &self,
        req: Request<ResolveObjectionRequest>,
    ) -> Result<Response<Objection>, Status> {
        let uscc = self.admitted(&req, "ResolveObjection").await?;
        Ok(Response::new(
            self.router
                .governance()
                .resolve_objection(&Acting::agency(uscc), req.into_inner())
                .await?,
        ))
    }

    async fn file_demand(
        &self,
        req: Request<FileDemandRequest>,
    ) -> Result<Response<Demand>, Status> {
        let uscc = self.admitted(&req, "FileDemand").await?;
        let r = req.into_inner().encode_to_vec();
        Ok(Response::new(
            self.to_province(&uscc, RequestKind::FileDemand, r).await?,
        ))
    }

    async fn get_demand(&self, req: Request<GetDemandRequest>) -> Result<Response<Demand>, Status> {
        let uscc = self.admitted(&req, "GetDemand").await?;
        let r = req.into_inner().encode_to_vec();
        Ok(Response::new(
            self.to_province(&uscc, RequestKind::GetDemand, r).await?,
        ))
    }

    async fn list_demands(
        &self,
        req: Request<ListDemandsRequest>,
    ) -> Result<Response<ListDemandsResponse>, Status> {
        let uscc = self.admitted(&req, "ListDemands").await?;
        let r = req.into_inner().encode_to_vec();
        Ok(Response::new(
            self.to_province(&uscc, RequestKind::ListDemands, r).await?,
        ))
    }

    async fn answer_demand(
        &self,
        req: Request<AnswerDemandRequest>,
    ) -> Result<Response<Demand>, Status> {
        let uscc = self.admitted(&req, "AnswerDemand").await?;
        let r = req.into_inner().encode_to_vec();
        Ok(Response::new(
            self.to_province(&uscc, RequestKind::AnswerDemand, r)
                .await?,
        ))
    }

    async fn list_my_applications(
        &self,
        req: Request<ListMyApplicationsRequest>,
    ) -> Result<Response<ListMyApplicationsResponse>, Status> {
        self.my_applications(req).await
    }

    async fn list_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        self.my_grants(req).await
    }

    async fn list_notices(
        &self,
        req: Request<ListNoticesRequest>,
    ) -> Result<Response<ListNoticesResponse>, Status> {
        self.my_notices(req).await
    }

    type WatchNoticesStream = ReceiverStream<Result<Notice, Status>>;

    async fn watch_notices(
        &self,
        req: Request<WatchNoticesRequest>,
    ) -> Result<Response<Self::WatchNoticesStream>, Status> {
        self.watch_my_notices(req).await
    }
}

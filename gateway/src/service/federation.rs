//! `fedgate.v1.Federation`: what a node serves to its parent and children.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::federation_server::Federation;
use fedgate_proto::v1::{
    AuditOperation, AuditRecord, CatalogChange, ChainHead, DiscoverRequest, DiscoverResponse,
    ForwardRequest, ForwardResponse, Hop, InvalidationAck, InvalidationNotice, JoinRequest,
    JoinResponse, PushRequest, PushResponse, Revocation, RevocationAck, RevocationNotice, Stream,
    StreamCursor, TakeBackRequest, TakeBackResponse, catalog_change, stream_item,
};
use tonic::{Request, Response, Status};

use super::{caller, deadline};
use crate::audit::{self, AuditLog, ChainVerifier, ChildApplyError, VerifyError};
use crate::catalog::parse_resource_id;
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Peer};
use crate::limits::{Bounded, LimitsConfig, excerpt};
use crate::metrics::NodeMetrics;
use crate::route::Router;
use crate::statement::Verified;
use crate::store::{Store, StoreError, Upstream};
use crate::topology::Topology;
use crate::uplink::Uplink;

mod discover;
mod take_back;

/// Largest batch a child may push at once.
const MAX_PUSH: usize = 4096;

/// The Federation service of one node.
#[derive(Clone)]
pub struct FederationService {
    topology: Arc<Topology>,
    store: Arc<dyn Store>,
    router: Router,
    uplink: Uplink,
    metrics: Arc<NodeMetrics>,
    audit: AuditLog,
    limits: LimitsConfig,
    /// Children that joined since this node started: only a child's first join is logged at INFO.
    joined: Arc<dashmap::DashSet<DivisionCode>>,
}

impl FederationService {
    /// A service over this node's state.
    pub fn new(
        topology: Arc<Topology>,
        store: Arc<dyn Store>,
        router: Router,
        uplink: Uplink,
        metrics: Arc<NodeMetrics>,
        audit: AuditLog,
    ) -> Self {
        Self {
            topology,
            store,
            router,
            uplink,
            metrics,
            audit,
            limits: LimitsConfig::default(),
            joined: Arc::default(),
        }
    }

    /// The service with `limits` on what neighbours send instead of the defaults.
    pub fn with_limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    /// Discovery over this node's subtree catalog and its ancestors'.
    fn discovery(&self) -> crate::catalog::discover::Discovery<'_> {
        crate::catalog::discover::Discovery {
            topology: &self.topology,
            store: self.store.as_ref(),
            limits: &self.limits,
            routing: self.router.limits(),
        }
    }

    /// Refuses (and audits) a message over the limits.
    async fn bounded<T: Bounded>(&self, req: &Request<T>, rpc: &str) -> Result<(), Status> {
        match req.get_ref().check_limits(&self.limits) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.refuse(actor_of(req), rpc, e).await),
        }
    }

    /// Records a refused call and returns the refusal.
    async fn refuse(&self, actor: String, rpc: &str, err: Error) -> Status {
        let mut r = audit::event(AuditOperation::AuthRefused, actor);
        r.outcome = audit::outcome(err.code());
        r.detail = format!("Federation.{rpc}: {err}");
        if let Err(e) = self.audit.record(r).await {
            tracing::error!(error = %e, "refusal not audited");
        }
        err.into()
    }

    /// The calling neighbour, with a refusal audited.
    async fn checked_neighbour<T>(
        &self,
        req: &Request<T>,
        rpc: &str,
    ) -> Result<DivisionCode, Status> {
        match self.neighbour(req) {
            Ok(c) => Ok(c),
            Err(e) => Err(self.refuse(actor_of(req), rpc, e).await),
        }
    }

    /// The calling child, with a refusal audited.
    async fn checked_child<T>(&self, req: &Request<T>, rpc: &str) -> Result<DivisionCode, Status> {
        match self.child(req) {
            Ok(c) => Ok(c),
            Err(e) => Err(self.refuse(actor_of(req), rpc, e).await),
        }
    }

    /// The calling node, which must be this node's parent or one of its children.
    fn neighbour<T>(&self, req: &Request<T>) -> Result<DivisionCode> {
        match caller(req)? {
            Peer::Node(code) if self.topology.is_neighbour(code) => Ok(code),
            other => Err(Error::PermissionDenied(format!(
                "{other} is not the parent or a child of node {}",
                self.topology.code
            ))),
        }
    }

    /// The calling node, which must be one of this node's children.
    fn child<T>(&self, req: &Request<T>) -> Result<DivisionCode> {
        let code = self.neighbour(req)?;
        if self.topology.children.contains_key(&code) {
            Ok(code)
        } else {
            Err(Error::PermissionDenied(format!(
                "node {code} is not a child of node {}",
                self.topology.code
            )))
        }
    }

    async fn push_catalog(&self, child: DivisionCode, req: PushRequest) -> Result<u64> {
        let mut items = Vec::with_capacity(req.items.len());
        for item in req.items {
            let Some(stream_item::Body::Catalog(change)) = item.body else {
                return Err(Error::InvalidArgument(format!(
                    "items[seq={}]: a catalog stream item must carry a catalog change",
                    item.seq
                )));
            };
            check_catalog_change(child, &change)?;
            items.push((item.seq, change));
        }
        NodeMetrics::add(&self.metrics.catalog_items_received, items.len() as u64);
        tracing::debug!(%child, first = items.first().map(|i| i.0), count = items.len(), "catalog push");
        let before = self.store.cursor(child.as_str(), Stream::Catalog).await?;
        let applied = self
            .store
            .apply_child_catalog(
                child.as_str(),
                &items,
                Upstream::of(self.topology.parent.is_some()),
            )
            .await
            .map_err(|e| match e {
                StoreError::Gap { expected, got, .. } => Error::FailedPrecondition(format!(
                    "catalog stream of node {child} skipped from {expected} to {got}; resend from {expected}"
                )),
                other => other.into(),
            })?;
        NodeMetrics::add(
            &self.metrics.catalog_items_applied,
            applied.saturating_sub(before),
        );
        self.uplink.wake(Stream::Catalog);
        Ok(applied)
    }
}

fn actor_of<T>(req: &Request<T>) -> String {
    caller(req).map(|p| p.to_uri()).unwrap_or_default()
}

impl FederationService {
    /// Checks and stores a child's audit batch: each record must continue its node's chain (hash, link and
    /// signature), come from the child's subtree, and each chain the batch carries must end with a signed record
    /// (a child ships only signed prefixes, so one signature per chain covers the whole batch).
    ///
    /// A record this node already holds (same node, sequence number and hash) is skipped but its position still
    /// advances the child's cursor: a child that recovered, or whose own parent did, sends again what it had sent.
    /// Another record under a sequence number held here is a fork, refused with DATA_LOSS.
    async fn push_audit(&self, child: DivisionCode, req: PushRequest) -> Result<u64> {
        let applied = self.store.cursor(child.as_str(), Stream::Audit).await?;
        let mut verifiers: std::collections::HashMap<String, (ChainVerifier, Option<Vec<u8>>)> =
            Default::default();
        let mut held = take_back::Held::default();
        let mut items = Vec::with_capacity(req.items.len());
        let mut duplicates = 0;
        for item in req.items {
            let Some(stream_item::Body::Audit(record)) = item.body else {
                return Err(Error::InvalidArgument(format!(
                    "items[seq={}]: an audit stream item must carry an audit record",
                    item.seq
                )));
            };
            if item.seq <= applied {
                continue;
            }
            let next = applied + 1 + items.len() as u64;
            check_origin(child, &record)?;
            if held.holds(self.store.as_ref(), child, &record).await? {
                duplicates += 1;
                items.push((item.seq, None));
                continue;
            }
            let gap = (item.seq != next).then_some(next);
            self.check_audit(child, &record, &mut verifiers, gap)
                .await?;
            items.push((item.seq, Some(record)));
        }
        for (v, _) in verifiers.values() {
            if v.unsigned_tail() > 0 {
                let (seq, _) = v.head();
                return Err(Error::InvalidArgument(format!(
                    "items: the push ends the chain of node {} at record {seq}, which no signature covers; only \
                     signed prefixes of a chain may be shipped",
                    v.node()
                )));
            }
        }
        let count = items.len() as u64 - duplicates;
        let applied = self
            .audit
            .apply_child(child.as_str(), items)
            .await
            .map_err(|e| match e {
                ChildApplyError::Store(StoreError::Gap { expected, got, .. }) => {
                    Error::FailedPrecondition(format!(
                        "audit stream of node {child} skipped from {expected} to {got}; resend from {expected}"
                    ))
                }
                ChildApplyError::Store(other) => other.into(),
                ChildApplyError::Stopped => {
                    Error::Unavailable(format!("node {} is shutting down", self.topology.code))
                }
            })?;
        // The key each chain ends with, once its records are stored: a rotation replaces the pinned key.
        for (v, pinned) in verifiers.values() {
            if let Some(key) = v.key()
                && pinned.as_deref() != Some(key)
            {
                self.store.replace_node_key(v.node(), key).await?;
            }
        }
        NodeMetrics::add(&self.metrics.audit_items_applied, count);
        NodeMetrics::add(&self.metrics.audit_items_duplicate, duplicates);
        if duplicates > 0 {
            tracing::info!(%child, duplicates, "audit records sent again by a child were already held here");
        }
        self.uplink.wake(Stream::Audit);
        Ok(applied)
    }

    async fn check_audit(
        &self,
        child: DivisionCode,
        record: &AuditRecord,
        verifiers: &mut std::collections::HashMap<String, (ChainVerifier, Option<Vec<u8>>)>,
        gap: Option<u64>,
    ) -> Result<()> {
        let origin = check_origin(child, record)?;
        if !verifiers.contains_key(&record.node_code) {
            let key = self.store.node_key(&record.node_code).await?;
            let v = match self.store.audit_head(&record.node_code).await? {
                Some(head) => {
                    ChainVerifier::resume(&record.node_code, key.clone(), head.seq, head.hash)
                }
                None => ChainVerifier::new(&record.node_code, key.clone()),
            };
            verifiers.insert(record.node_code.clone(), (v, key));
        }
        if record.operation == AuditOperation::ChainStart as i32
            || record.operation == AuditOperation::KeyRotation as i32
        {
            self.check_key_endorsement(origin, record)?;
        }
        let Some((v, _)) = verifiers.get_mut(&record.node_code) else {
            return Err(Error::InvalidArgument("audit verifier missing".into()));
        };
        v.push(record).map_err(|e| match (e, gap) {
            // Not the chain's next record, at a gap in positions: a child that does not know this node restarted
            // from an older state and is ahead of it. A request to resend from the cursor, not a broken chain.
            (VerifyError::Sequence { .. }, Some(next)) => Error::FailedPrecondition(format!(
                "audit stream of node {child} skipped from {next}; resend from {next}"
            )),
            (e, _) => {
                tracing::error!(%child, error = %e, "audit record from child fails verification");
                Error::DataLoss(format!("audit record from node {child} refused: {e}"))
            }
        })
    }

    /// Checks what this node can check of a forwarded envelope before it takes the next step: the route ends at
    /// the sender, the request travels the way the tree allows, and its grant is not revoked here.
    async fn admit_forward(
        &self,
        from: DivisionCode,
        envelope: Option<fedgate_proto::v1::Envelope>,
    ) -> Result<fedgate_proto::v1::Envelope> {
        let env = envelope.ok_or_else(|| Error::InvalidArgument("envelope is required".into()))?;
        let me = self.topology.code;
        match env.route.last() {
            Some(last) if last.node_code == from.as_str() => {}
            other => {
                return Err(Error::PermissionDenied(format!(
                    "envelope.route ends at {:?} but the sending certificate is for node {from}",
                    other.map(|h| excerpt(&h.node_code)).unwrap_or_default()
                )));
            }
        }
        let consumer_node: DivisionCode = env
            .consumer_node
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("envelope.consumer_node: {e}")))?;
        let target: DivisionCode = env
            .target_node
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("envelope.target_node: {e}")))?;
        let from_child = self.topology.children.contains_key(&from);
        if env.open_data && from_child {
            return Err(Error::PermissionDenied(format!(
                "open-data downloads come from the province downward; node {from} may not send one up"
            )));
        }
        if from_child && !from.contains(&consumer_node) {
            return Err(Error::PermissionDenied(format!(
                "node {from} forwarded a request of node {consumer_node}, which is outside its subtree"
            )));
        }
        if !from_child && (me.contains(&consumer_node) || !me.contains(&target)) {
            return Err(Error::PermissionDenied(format!(
                "parent {from} may only send down requests from outside this subtree for resources inside it"
            )));
        }
        if env.route.first().map(|h| h.node_code.as_str()) != Some(env.consumer_node.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "envelope.route does not start at the consumer's node {consumer_node}"
            )));
        }
        if !env.resource_id.is_empty()
            && parse_resource_id("envelope.resource_id", &env.resource_id)?.node() != target
        {
            return Err(Error::InvalidArgument(format!(
                "envelope.target_node {target} is not the node of resource {}",
                env.resource_id
            )));
        }
        if !env.grant_id.is_empty() && self.router.governance().is_revoked(&env.grant_id).await? {
            return Err(Error::PermissionDenied(format!(
                "grant {} was revoked; node {me} refuses requests under it",
                env.grant_id
            )));
        }
        Ok(env)
    }

    /// Checks a relayed revocation: the route ends at the sender, and the grant's issuer signed it.
    fn admit_revocation(
        &self,
        from: DivisionCode,
        notice: &RevocationNotice,
    ) -> Result<Verified<Revocation>> {
        if notice.route.last().map(String::as_str) != Some(from.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "revocation route does not end at node {from}, which sent it"
            )));
        }
        self.router.governance().check_revocation(notice)
    }
}

impl FederationService {
    /// Whether a joining child's certificate endorses the key it presents (a rotated key, not pinned yet).
    fn endorses(&self, child: DivisionCode, req: &JoinRequest) -> bool {
        let Some(s) = req.key_endorsement.as_ref() else {
            return false;
        };
        let now = self.router.governance().clock().unix();
        let checked = self.router.assertions().verifier().check_endorsement(
            s,
            child,
            &req.audit_public_key,
            now,
        );
        if let Err(e) = &checked {
            tracing::warn!(%child, error = %e, "join endorsement refused");
        }
        checked.is_ok()
    }

    /// A chain's first record, and a record rotating its key, announce its node's key; the node's certificate must
    /// endorse that key, so that no node on the way can start or take over a chain in another node's name.
    fn check_key_endorsement(&self, origin: DivisionCode, record: &AuditRecord) -> Result<()> {
        let announced = hex::decode(&record.detail).unwrap_or_default();
        crate::statement::required(record.key_endorsement.as_ref(), "chain start record")
            .and_then(|s| {
                self.router.assertions().verifier().check_endorsement(
                    s,
                    origin,
                    &announced,
                    record.time_unix_nanos / 1_000_000_000,
                )
            })
            .map_err(|e| {
                Error::PermissionDenied(format!(
                    "the audit chain of node {origin} starts with a key its certificate does not endorse: {e}"
                ))
            })
    }
}

/// The node that wrote a forwarded record, which must be in the forwarding child's subtree.
fn check_origin(child: DivisionCode, record: &AuditRecord) -> Result<DivisionCode> {
    let origin: DivisionCode = record
        .node_code
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("audit record node_code: {e}")))?;
    if !child.contains(&origin) {
        return Err(Error::PermissionDenied(format!(
            "node {child} forwarded an audit record of node {origin}, outside its subtree"
        )));
    }
    Ok(origin)
}

/// A child may only register entries held in its own subtree.
fn check_catalog_change(child: DivisionCode, change: &CatalogChange) -> Result<()> {
    let (id, node) = match &change.change {
        Some(catalog_change::Change::Upsert(e)) => {
            let id = parse_resource_id("upsert.id", &e.id)?;
            if e.node_code != id.node().as_str() {
                return Err(Error::InvalidArgument(format!(
                    "upsert of {}: node_code {} differs from the id's node",
                    e.id, e.node_code
                )));
            }
            (e.id.clone(), id.node())
        }
        Some(catalog_change::Change::Withdraw(w)) => {
            let id = parse_resource_id("withdraw.id", &w.id)?;
            (w.id.clone(), id.node())
        }
        None => return Err(Error::InvalidArgument("catalog change is empty".into())),
    };
    if !child.contains(&node) {
        return Err(Error::PermissionDenied(format!(
            "node {child} may not change {id}, which belongs to node {node} outside its subtree"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let child = self.checked_child(&req, "Join").await?;
        self.bounded(&req, "Join").await?;
        if req.get_ref().node_code != child.as_str() {
            let err = Error::PermissionDenied(format!(
                "join names node {:?} but the certificate is for node {child}",
                excerpt(&req.get_ref().node_code)
            ));
            return Err(self.refuse(actor_of(&req), "Join", err).await);
        }
        let key = &req.get_ref().audit_public_key;
        if key.len() != 32 {
            return Err(Error::InvalidArgument(format!(
                "audit_public_key of node {child} has {} bytes, not 32",
                key.len()
            ))
            .into());
        }
        let pinned = self
            .store
            .pin_node_key(child.as_str(), key)
            .await
            .map_err(Error::from)?;
        if pinned != *key && !self.endorses(child, req.get_ref()) {
            let err = Error::PermissionDenied(format!(
                "node {child} presents audit key {} but {} is pinned for it, and no endorsement of the new key by \
                 its certificate",
                hex::encode(key),
                hex::encode(&pinned)
            ));
            return Err(self.refuse(actor_of(&req), "Join", err).await);
        }
        let mut cursors = Vec::new();
        for stream in [Stream::Catalog, Stream::Audit] {
            cursors.push(StreamCursor {
                stream: stream as i32,
                applied_seq: self
                    .store
                    .cursor(child.as_str(), stream)
                    .await
                    .map_err(Error::from)?,
            });
        }
        let own_chain_head = self
            .store
            .audit_head(child.as_str())
            .await
            .map_err(Error::from)?
            .map(|h| ChainHead {
                seq: h.seq,
                hash: h.hash,
            });
        if self.joined.insert(child) {
            tracing::info!(%child, "child joined");
        } else {
            tracing::debug!(%child, "child joined again");
        }
        Ok(Response::new(JoinResponse {
            parent_code: self.topology.code.to_string(),
            cursors,
            own_chain_head,
        }))
    }

    async fn take_back(
        &self,
        req: Request<TakeBackRequest>,
    ) -> Result<Response<TakeBackResponse>, Status> {
        let child = self.checked_child(&req, "TakeBack").await?;
        self.bounded(&req, "TakeBack").await?;
        match take_back::answer(self.store.as_ref(), child, req.get_ref()).await {
            Ok(resp) => {
                tracing::info!(%child, stream = req.get_ref().stream, records = resp.records.len(),
                    entries = resp.entries.len(), "a child took back what this node holds of its own");
                Ok(Response::new(resp))
            }
            Err(e @ (Error::InvalidArgument(_) | Error::PermissionDenied(_))) => {
                Err(self.refuse(Peer::Node(child).to_uri(), "TakeBack", e).await)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn discover(
        &self,
        req: Request<DiscoverRequest>,
    ) -> Result<Response<DiscoverResponse>, Status> {
        let child = self.checked_child(&req, "Discover").await?;
        self.bounded(&req, "Discover").await?;
        let limit = Duration::from_millis(self.router.limits().default_timeout_ms);
        let deadline = deadline(&req, limit);
        let r = req.into_inner();
        let discovery = self.discovery();
        if let Err(e) = discovery.admit(child, &r) {
            return Err(self.refuse(Peer::Node(child).to_uri(), "Discover", e).await);
        }
        Ok(Response::new(
            discover::answer(&discovery, r, deadline).await?,
        ))
    }

    async fn push(&self, req: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let child = self.checked_child(&req, "Push").await?;
        self.bounded(&req, "Push").await?;
        let req = req.into_inner();
        if req.items.len() > MAX_PUSH {
            return Err(Error::InvalidArgument(format!(
                "items: {} items in one push exceed the limit of {MAX_PUSH}",
                req.items.len()
            ))
            .into());
        }
        let result = match Stream::try_from(req.stream) {
            Ok(Stream::Catalog) => self.push_catalog(child, req).await,
            Ok(Stream::Audit) => self.push_audit(child, req).await,
            _ => Err(Error::InvalidArgument(format!(
                "stream {} is unknown",
                req.stream
            ))),
        };
        let applied = match result {
            Ok(applied) => applied,
            // A batch refused for what it carries is recorded; storage trouble is the node's own.
            Err(
                e @ (Error::PermissionDenied(_) | Error::InvalidArgument(_) | Error::DataLoss(_)),
            ) => {
                return Err(self.refuse(Peer::Node(child).to_uri(), "Push", e).await);
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(PushResponse {
            applied_seq: applied,
        }))
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let from = self.checked_neighbour(&req, "Forward").await?;
        let here = req
            .get_ref()
            .envelope
            .as_ref()
            .map(|e| e.target_node.as_str())
            == Some(self.topology.code.as_str());
        if let Err(e) = crate::limits::check_forward(req.get_ref(), &self.limits, here) {
            return Err(self.refuse(actor_of(&req), "Forward", e).await);
        }
        let limit = Duration::from_millis(self.router.limits().default_timeout_ms);
        let mut deadline = deadline(&req, limit);
        let ForwardRequest { envelope, request } = req.into_inner();
        let mut env = match self.admit_forward(from, envelope).await {
            Ok(env) => env,
            Err(e) => return Err(self.refuse(Peer::Node(from).to_uri(), "Forward", e).await),
        };
        if env.timeout_ms > 0 {
            deadline =
                deadline.min(std::time::Instant::now() + Duration::from_millis(env.timeout_ms));
        }
        env.route.push(Hop {
            node_code: self.topology.code.to_string(),
            seen_peer: Peer::Node(from).to_uri(),
            action: String::new(),
            elapsed_us: 0,
        });
        let out = self.router.dispatch(env, request, deadline, None).await?;
        Ok(Response::new(ForwardResponse {
            response: out.response,
            route: out.route,
            cacheable_ms: out.cacheable_ms,
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevocationNotice>,
    ) -> Result<Response<RevocationAck>, Status> {
        let from = self.checked_neighbour(&req, "Revoke").await?;
        self.bounded(&req, "Revoke").await?;
        let mut notice = req.into_inner();
        let checked = match self.admit_revocation(from, &notice) {
            Ok(v) => v,
            Err(e) => return Err(self.refuse(Peer::Node(from).to_uri(), "Revoke", e).await),
        };
        let me = self.topology.code;
        notice.route.push(me.to_string());
        let revocation = checked.body();
        let mut r = audit::event(AuditOperation::Revocation, Peer::Node(from).to_uri());
        r.grant_id = revocation.grant_id.clone();
        r.consumer_node = revocation.consumer_node.clone();
        r.route = notice.route.clone();
        r.detail = format!(
            "relayed revocation from node {}: {}",
            revocation.issuer_node, revocation.reason
        );
        let result = self
            .router
            .downlink()
            .relay_revocation(&checked, notice)
            .await;
        if let Err(e) = &result {
            r.outcome = audit::outcome(e.code());
        }
        crate::route::durably(&self.audit, r).await.map_err(|e| {
            Status::unavailable(format!("node {me} could not write its audit trail: {e}"))
        })?;
        Ok(Response::new(RevocationAck { nodes: result? }))
    }

    async fn deliver(
        &self,
        req: Request<fedgate_proto::v1::DeliverRequest>,
    ) -> Result<Response<fedgate_proto::v1::DeliverResponse>, Status> {
        let from = self.checked_neighbour(&req, "Deliver").await?;
        self.bounded(&req, "Deliver").await?;
        let flowback = self.router.flowback()?;
        Ok(Response::new(
            flowback.deliver(Peer::Node(from), req.into_inner()).await?,
        ))
    }

    async fn invalidate(
        &self,
        req: Request<InvalidationNotice>,
    ) -> Result<Response<InvalidationAck>, Status> {
        let from = self.checked_neighbour(&req, "Invalidate").await?;
        self.bounded(&req, "Invalidate").await?;
        let mut notice = req.into_inner();
        let downlink = self.router.downlink();
        let checked = match notice
            .route
            .last()
            .filter(|last| last.as_str() == from.as_str())
            .ok_or_else(|| {
                Error::PermissionDenied(format!(
                    "invalidation route does not end at node {from}, which sent it"
                ))
            })
            .and_then(|_| downlink.check_invalidation(&notice))
        {
            Ok(v) => v,
            Err(e) => {
                return Err(self
                    .refuse(Peer::Node(from).to_uri(), "Invalidate", e)
                    .await);
            }
        };
        notice.route.push(self.topology.code.to_string());
        let nodes = downlink.relay_invalidation(&checked, notice).await?;
        Ok(Response::new(InvalidationAck { nodes }))
    }
}

//! The share path: one hop of a request toward the provider's node, or serving it there.
//!
//! Every hop checks the hop limit and the recorded route, shrinks the deadline, and forwards over the pooled
//! channel of the next neighbour. Intermediate nodes carry the consumer's request and the provider's answer as
//! opaque bytes; only the provider's node decodes them.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::provider_client::ProviderClient;
use fedgate_proto::v1::{
    AggregateRequest, ApplyRequest, AuditOperation, AuditRecord, Envelope, ExportRequest,
    FetchRequest, FileObjectionRequest, ForwardRequest, GetApplicationRequest, GetObjectionRequest,
    Hop, RequestKind, ShareMode, ShareRequest, ShareResponse,
};
use prost::Message;
use tonic::Status;
use tracing::Instrument;

use crate::assertion::{Assertions, Vouched};
use crate::audit::{self, AuditLog};
use crate::cache::ShareCache;
use crate::config::RoutingConfig;
use crate::downlink::Downlink;
use crate::entries::LocalEntries;
use crate::error::{Error, Result};
use crate::governance::Governance;
use crate::ident::DivisionCode;
use crate::metrics::NodeMetrics;
use crate::policy;
use crate::store::Store;
use crate::topology::{Direction, Topology};

mod hop_record;
mod revoke;

use hop_record::HopRecord;
pub(crate) use hop_record::durably;

/// What a hop returns: the provider node's encoded answer and the route with elapsed times.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// Encoded `ShareResponse`.
    pub response: Vec<u8>,
    /// The route, the consumer's node first and the provider's node last.
    pub route: Vec<Hop>,
    /// How long the consumer's node may cache the answer, in milliseconds; 0 for not at all.
    pub cacheable_ms: u64,
}

/// Routes shares for one node.
#[derive(Clone)]
pub struct Router {
    topology: Arc<Topology>,
    limits: RoutingConfig,
    metrics: Arc<NodeMetrics>,
    audit: AuditLog,
    governance: Governance,
    cache: ShareCache,
    assertions: Assertions,
    downlink: Downlink,
    entries: LocalEntries,
    flowback: Option<crate::flowback::Flowback>,
}

/// Action names recorded in a route.
pub mod action {
    /// The consumer's node received the request from its agency.
    pub const RECEIVED: &str = "received";
    /// Passed toward the parent.
    pub const FORWARDED_UP: &str = "forwarded-up";
    /// Passed toward a child.
    pub const FORWARDED_DOWN: &str = "forwarded-down";
    /// The provider's node served it.
    pub const SERVED: &str = "served";
    /// The consumer's node answered from its cache.
    pub const CACHE_HIT: &str = "cache-hit";
}

/// Converts a failed call to a neighbour or provider into an error naming it. A transport failure, or a call
/// cancelled on the far side while this node still waited for it (a link reset mid-request), is UNAVAILABLE:
/// the caller may retry; any other status is the far side's answer and passes through.
pub(crate) fn call_error(status: Status, who: &str) -> Error {
    if fedgate_proto::codec::is_malformed(&status) {
        // This node could not read the far side's answer: the far side's fault, not the caller's argument.
        return Error::DataLoss(format!(
            "{who} answered a message this node cannot read: {}",
            crate::limits::clamp(status.message(), 256)
        ));
    }
    if status.source().is_some() {
        Error::Unavailable(format!("{who} is unreachable: {}", status.message()))
    } else if status.code() == tonic::Code::Cancelled {
        Error::Unavailable(format!(
            "the call to {who} was cut off before it answered: {}",
            status.message()
        ))
    } else {
        // Only the code and a bounded message pass back: never the far side's metadata.
        Error::Upstream(Status::new(
            status.code(),
            crate::limits::clamp(status.message(), crate::limits::MAX_STATUS_CHARS),
        ))
    }
}

impl Router {
    /// A router over this node's topology and store.
    pub fn new(
        topology: Arc<Topology>,
        store: Arc<dyn Store>,
        limits: RoutingConfig,
        metrics: Arc<NodeMetrics>,
        audit: AuditLog,
        (governance, cache, assertions, downlink): (Governance, ShareCache, Assertions, Downlink),
    ) -> Self {
        Self {
            entries: LocalEntries::new(topology.code, store),
            topology,
            limits,
            metrics,
            audit,
            governance,
            cache,
            assertions,
            downlink,
            flowback: None,
        }
    }

    /// The router serving flow-back subscriptions with `flowback`.
    pub fn with_flowback(mut self, flowback: crate::flowback::Flowback) -> Self {
        self.flowback = Some(flowback);
        self
    }

    /// Flow-back subscriptions at this node.
    pub fn flowback(&self) -> Result<&crate::flowback::Flowback> {
        self.flowback.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "node {} does not serve flow-back subscriptions",
                self.topology.code
            ))
        })
    }

    /// Revocations and cache invalidations sent from this node.
    pub fn downlink(&self) -> &Downlink {
        &self.downlink
    }

    /// Follows a committed local publish or withdrawal of entry `id` at `version`: this node's copy of the entry
    /// is dropped, then every node that may cache answers from it is told (see [`Downlink::invalidate`]); an
    /// entry at its first version was never served, so no node holds answers of it.
    pub async fn entry_changed(&self, id: &str, version: u64) -> Result<Vec<String>> {
        self.entries.changed(id);
        if version <= 1 {
            return Ok(Vec::new());
        }
        self.downlink.invalidate(id, version).await
    }

    /// Follows a change another replica of this node committed: its copies here are dropped (the replica that made
    /// the change purged the caches elsewhere); `None` when changes may have been missed, which drops every copy.
    pub fn changed_elsewhere(&self, id: Option<&str>) {
        match id {
            Some(id) => self.entries.changed(id),
            None => self.entries.all_changed(),
        }
    }

    /// This node's consumer assertions: signing its own, checking other nodes'.
    pub fn assertions(&self) -> &Assertions {
        &self.assertions
    }

    /// The cache of authorized answers.
    pub fn cache(&self) -> &ShareCache {
        &self.cache
    }

    /// This node's topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The governance of this node's resources.
    pub fn governance(&self) -> &Governance {
        &self.governance
    }

    /// This node's audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The routing limits in force.
    pub fn limits(&self) -> &RoutingConfig {
        &self.limits
    }

    /// Starts a request this node vouches for (for its agency `consumer`, or for the public): signs its
    /// assertion when it must travel, then dispatches it.
    pub async fn originate(
        &self,
        mut env: Envelope,
        request: Vec<u8>,
        deadline: Instant,
        consumer: Vouched,
    ) -> Result<Forwarded> {
        self.vouch(&mut env, &request, &consumer)?;
        self.dispatch(env, request, deadline, Some(consumer)).await
    }

    /// Signs the assertion of a request this node starts, when it must travel to another node.
    pub fn vouch(&self, env: &mut Envelope, request: &[u8], consumer: &Vouched) -> Result<()> {
        if env.target_node != self.topology.code.as_str() {
            env.assertion = Some(self.assertions.sign(env, request, consumer)?);
        }
        Ok(())
    }

    /// Serves `env` here if this node holds the resource, else forwards it one hop. The envelope's last
    /// route entry must be this node's own hop. `local` is the consumer when this node itself vouched for it
    /// (its own agency, or its open-data endpoint); a forwarded request is served only under the assertion it
    /// carries. The hop's audit record is written before it is answered, and also when its caller goes away
    /// first (see `route::hop_record`).
    pub async fn dispatch(
        &self,
        env: Envelope,
        request: Vec<u8>,
        deadline: Instant,
        local: Option<Vouched>,
    ) -> Result<Forwarded> {
        crate::opmon::note_envelope(&env);
        let started = Instant::now();
        let me = self.topology.code;
        crate::telemetry::annotate_hop(&env);
        if local.is_none() && env.target_node != me.as_str() {
            return self.relay(env, request, deadline, started).await;
        }
        let target: DivisionCode = env.target_node.parse()?;
        let mut hop = HopRecord::new(&self.audit, share_record(&env, target == me));
        let result = self
            .hop(env, request, (target, deadline), local, hop.record())
            .await;
        hop.write().await.map_err(|e| unrecorded(me, e))?;
        let mut out = result?;
        self.stamp_elapsed(&mut out, started);
        Ok(out)
    }

    /// Serves or forwards `env` as [`Router::dispatch`] does but leaves this node's audit record of it to the
    /// caller: returns the outcome with the record [`Router::dispatch`] would have written, for a caller that
    /// records an operation of many dispatches once (an open-data download of many pages).
    pub async fn dispatch_unrecorded(
        &self,
        env: Envelope,
        request: Vec<u8>,
        deadline: Instant,
        local: Option<Vouched>,
    ) -> Result<(Result<Forwarded>, AuditRecord)> {
        crate::opmon::note_envelope(&env);
        let me = self.topology.code;
        crate::telemetry::annotate_hop(&env);
        let target: DivisionCode = env.target_node.parse()?;
        let mut record = share_record(&env, target == me);
        let result = self
            .hop(env, request, (target, deadline), local, &mut record)
            .await;
        Ok((result, record))
    }

    /// Serves `env` here (`target` is this node) or forwards it, filling in `record` as it goes, its outcome
    /// included.
    async fn hop(
        &self,
        mut env: Envelope,
        request: Vec<u8>,
        (target, deadline): (DivisionCode, Instant),
        local: Option<Vouched>,
        record: &mut AuditRecord,
    ) -> Result<Forwarded> {
        let started = Instant::now();
        let here = target == self.topology.code;
        let result = if here {
            set_action(&mut env, action::SERVED);
            self.serve_local(&env, &request, deadline, local, record)
                .await
                .map(|(response, cacheable_ms)| Forwarded {
                    response,
                    route: env.route,
                    cacheable_ms,
                })
        } else {
            self.forward(env, request, target, deadline).await
        };
        let counter = match (&result, here) {
            (Err(_), _) => &self.metrics.shares_failed,
            (Ok(_), true) => &self.metrics.shares_served,
            (Ok(_), false) => &self.metrics.shares_forwarded,
        };
        NodeMetrics::add(counter, 1);
        match &result {
            Ok(out) => record.response_digest = audit::digest(&out.response),
            Err(e) => {
                record.outcome = audit::outcome(e.code());
                record.detail = e.to_string();
            }
        }
        result.map(|mut out| {
            self.stamp_elapsed(&mut out, started);
            out
        })
    }

    /// Passes on a request that another node vouched for and another node serves. This hop's record states what
    /// is known before the call (who sent which request where, outcome [`audit::FORWARDED`]) and is made durable
    /// while the next node works on the request, so the record costs this hop no time of its own; a failure, or
    /// the caller going away first, is recorded again with its outcome.
    async fn relay(
        &self,
        env: Envelope,
        request: Vec<u8>,
        deadline: Instant,
        started: Instant,
    ) -> Result<Forwarded> {
        let me = self.topology.code;
        let target: DivisionCode = env.target_node.parse()?;
        let mut record = share_record(&env, false);
        record.outcome = audit::FORWARDED.to_owned();
        let mut failure = HopRecord::new(&self.audit, record.clone());
        let (written, result) = tokio::join!(
            hop_record::durably(&self.audit, record),
            self.forward(env, request, target, deadline)
        );
        if let Err(e) = written {
            failure.discard();
            return Err(unrecorded(me, e));
        }
        match result {
            Ok(mut out) => {
                failure.discard();
                NodeMetrics::add(&self.metrics.shares_forwarded, 1);
                self.stamp_elapsed(&mut out, started);
                Ok(out)
            }
            Err(e) => {
                NodeMetrics::add(&self.metrics.shares_failed, 1);
                let r = failure.record();
                r.time_unix_nanos = audit::now_nanos();
                r.outcome = audit::outcome(e.code());
                r.detail = e.to_string();
                failure.write().await.map_err(|e| unrecorded(me, e))?;
                Err(e)
            }
        }
    }

    /// Sets this node's hop of `out.route` to the time since `started`.
    fn stamp_elapsed(&self, out: &mut Forwarded, started: Instant) {
        let me = self.topology.code;
        if let Some(hop) = out
            .route
            .iter_mut()
            .rev()
            .find(|h| h.node_code == me.as_str())
        {
            hop.elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        }
    }

    async fn forward(
        &self,
        mut env: Envelope,
        request: Vec<u8>,
        target: DivisionCode,
        deadline: Instant,
    ) -> Result<Forwarded> {
        let me = self.topology.code;
        let (next, direction) = self.topology.next_hop(target)?;
        if env.hops_left == 0 {
            return Err(Error::FailedPrecondition(format!(
                "request {} reached the hop limit at node {me}",
                env.request_id
            )));
        }
        if env.route.iter().any(|h| h.node_code == next.code.as_str()) {
            return Err(Error::FailedPrecondition(format!(
                "request {} would loop: node {} is already on its route",
                env.request_id, next.code
            )));
        }
        let margin = Duration::from_millis(self.limits.hop_margin_ms);
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .and_then(|d| d.checked_sub(margin))
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Error::DeadlineExceeded(format!(
                    "deadline of request {} ran out at node {me}",
                    env.request_id
                ))
            })?;
        set_action(
            &mut env,
            match direction {
                Direction::Up => action::FORWARDED_UP,
                Direction::Down => action::FORWARDED_DOWN,
            },
        );
        env.hops_left -= 1;
        env.timeout_ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX);
        let span = tracing::info_span!(
            "forward",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            fedgate.node = %me,
            fedgate.next = %next.code,
            fedgate.direction = ?direction,
            fedgate.resource = %env.resource_id,
            fedgate.outcome = tracing::field::Empty,
        );
        let mut req = span.in_scope(|| {
            crate::telemetry::traced(ForwardRequest {
                envelope: Some(env),
                request,
            })
        });
        req.set_timeout(remaining);
        let mut client = FederationClient::new(next.channel());
        let peer = || crate::ident::Peer::Node(next.code).to_uri();
        let call = crate::opmon::next_hop(peer, client.forward(req));
        let answer = tokio::time::timeout(remaining, call)
            .instrument(span.clone())
            .await;
        let result = match answer {
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "deadline ran out waiting for node {}",
                next.code
            ))),
            Ok(Err(status)) => Err(call_error(
                status,
                &format!("node {} at {}", next.code, next.address),
            )),
            Ok(Ok(resp)) => {
                let r = resp.into_inner();
                Ok(Forwarded {
                    response: r.response,
                    route: r.route,
                    cacheable_ms: r.cacheable_ms,
                })
            }
        };
        crate::telemetry::record_outcome(&span, &result);
        result
    }

    async fn serve_local(
        &self,
        env: &Envelope,
        request: &[u8],
        deadline: Instant,
        local: Option<Vouched>,
        record: &mut AuditRecord,
    ) -> Result<(Vec<u8>, u64)> {
        let consumer = match local {
            Some(v) => v,
            None => self.assertions.check(env, request).await?,
        };
        let kind = RequestKind::try_from(env.kind).map_err(|_| {
            Error::InvalidArgument(format!("envelope.kind {} is unknown", env.kind))
        })?;
        let bad = |what: &str, e: prost::DecodeError| {
            Error::InvalidArgument(format!("request: not an encoded {what}: {e}"))
        };
        match kind {
            RequestKind::Share => {
                self.serve_share(env, &consumer, request, deadline, record)
                    .await
            }
            RequestKind::Apply => {
                let req = ApplyRequest::decode(request).map_err(|e| bad("ApplyRequest", e))?;
                same_resource(env, &req.resource_id)?;
                Ok((
                    self.governance.apply(&consumer, req).await?.encode_to_vec(),
                    0,
                ))
            }
            RequestKind::GetApplication => {
                let req = GetApplicationRequest::decode(request)
                    .map_err(|e| bad("GetApplicationRequest", e))?;
                Ok((
                    self.governance
                        .application(&consumer, &req.id)
                        .await?
                        .encode_to_vec(),
                    0,
                ))
            }
            RequestKind::Objection => {
                let req = FileObjectionRequest::decode(request)
                    .map_err(|e| bad("FileObjectionRequest", e))?;
                same_resource(env, &req.resource_id)?;
                Ok((
                    self.governance
                        .file_objection(&consumer, req)
                        .await?
                        .encode_to_vec(),
                    0,
                ))
            }
            RequestKind::Subscribe => {
                let req = fedgate_proto::v1::SubscribeRequest::decode(request)
                    .map_err(|e| bad("SubscribeRequest", e))?;
                same_resource(env, &req.resource_id)?;
                Ok((
                    self.flowback()?
                        .subscribe(&consumer, req)
                        .await?
                        .encode_to_vec(),
                    0,
                ))
            }
            RequestKind::Unsubscribe => {
                let req = fedgate_proto::v1::UnsubscribeRequest::decode(request)
                    .map_err(|e| bad("UnsubscribeRequest", e))?;
                Ok((
                    self.flowback()?
                        .unsubscribe(&consumer, &env.resource_id, req)
                        .await?
                        .encode_to_vec(),
                    0,
                ))
            }
            RequestKind::GetObjection => {
                let req = GetObjectionRequest::decode(request)
                    .map_err(|e| bad("GetObjectionRequest", e))?;
                Ok((
                    self.governance
                        .objection(&consumer, &req.id)
                        .await?
                        .0
                        .encode_to_vec(),
                    0,
                ))
            }
            RequestKind::FileDemand
            | RequestKind::GetDemand
            | RequestKind::ListDemands
            | RequestKind::AnswerDemand => Ok((
                self.governance
                    .serve_demand(kind, &consumer, request)
                    .await?,
                0,
            )),
        }
    }

    async fn serve_share(
        &self,
        env: &Envelope,
        consumer: &Vouched,
        request: &[u8],
        deadline: Instant,
        record: &mut AuditRecord,
    ) -> Result<(Vec<u8>, u64)> {
        let me = self.topology.code;
        let req = ShareRequest::decode(request).map_err(|e| {
            Error::InvalidArgument(format!("request: not an encoded ShareRequest: {e}"))
        })?;
        same_resource(env, &req.resource_id)?;
        if req.purpose != consumer.purpose() {
            return Err(Error::InvalidArgument(format!(
                "request {}: the share's purpose differs from the envelope's",
                env.request_id
            )));
        }
        let admission = tracing::info_span!(
            "admission",
            fedgate.node = %me,
            fedgate.resource = %env.resource_id,
            fedgate.consumer = %consumer.uscc(),
            fedgate.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let admitted = async {
            let entry = self.entries.get(&env.resource_id).await?.ok_or_else(|| {
                Error::NotFound(format!(
                    "resource {} is not in the catalog of node {me}",
                    env.resource_id
                ))
            })?;
            record.provider_uscc = entry.provider_uscc.clone();
            let mode = policy::requested_mode(&req)?;
            let grant = match &req.grant {
                _ if env.open_data => None,
                Some(signed) => {
                    let fields = policy::used_fields(&req, mode);
                    let g = self
                        .governance
                        .check_grant(signed, consumer, &entry, mode, &fields)
                        .await?;
                    record.grant_id = g.id.clone();
                    Some(g)
                }
                None => None,
            };
            let permit = if env.open_data {
                policy::authorize_open(&entry, &req)?
            } else {
                policy::authorize(&entry, &req, grant.as_ref())?
            };
            Ok((entry, permit))
        }
        .instrument(admission.clone())
        .await;
        crate::telemetry::record_outcome(&admission, &admitted);
        let (entry, permit) = admitted?;
        let uscc = entry.provider_uscc.as_str();
        let link = self
            .topology
            .agencies
            .values()
            .find(|a| a.uscc.as_str() == uscc)
            .and_then(|a| a.provider.as_ref())
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "provider agency {uscc} of {} has no Provider endpoint at node {me}",
                    entry.id
                ))
            })?;
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Error::DeadlineExceeded(format!(
                    "deadline of request {} ran out at node {me}",
                    env.request_id
                ))
            })?;
        let provider = ProviderCall {
            client: ProviderClient::new(link.channel()),
            who: format!("provider agency {uscc} at {}", link.address),
            uscc: uscc.to_owned(),
            remaining,
            node: me,
            resource: &entry.id,
            mode: permit.mode,
        };
        let mut resp = ShareResponse {
            request_id: env.request_id.clone(),
            resource_id: entry.id.clone(),
            entry_version: entry.version,
            grant_id: permit.grant_id.clone(),
            ..Default::default()
        };
        let fetch = |fields: Vec<String>| FetchRequest {
            request_id: env.request_id.clone(),
            resource_id: entry.id.clone(),
            key_field: permit.key_field.clone(),
            key: req.key.clone(),
            fields,
            consumer_uscc: consumer.uscc().to_owned(),
            consumer_node: consumer.node().to_string(),
            purpose: consumer.purpose().to_owned(),
        };
        match permit.mode {
            ShareMode::Verify => {
                let records = provider
                    .run(
                        |mut c, r| async move { c.fetch(r).await },
                        fetch(permit.fields.clone()),
                    )
                    .await?
                    .records;
                resp.checks = masking(me, permit.mode)
                    .in_scope(|| policy::verify(&req.verify_values, records.first()));
            }
            ShareMode::Statistics => {
                let groups = provider
                    .run(
                        |mut c, r| async move { c.aggregate(r).await },
                        AggregateRequest {
                            request_id: env.request_id.clone(),
                            resource_id: entry.id.clone(),
                            group_by: permit.fields.clone(),
                            consumer_uscc: consumer.uscc().to_owned(),
                        },
                    )
                    .await?
                    .groups;
                masking(me, permit.mode).in_scope(|| policy::check_groups(&entry, &groups))?;
                resp.groups = groups;
            }
            ShareMode::Bulk => {
                let page = provider
                    .run(
                        |mut c, r| async move { c.export(r).await },
                        ExportRequest {
                            request_id: env.request_id.clone(),
                            resource_id: entry.id.clone(),
                            fields: permit.fields.clone(),
                            page_token: req.page_token.clone(),
                            page_size: if req.page_size == 0 {
                                policy::DEFAULT_BULK_PAGE
                            } else {
                                req.page_size
                            },
                            consumer_uscc: consumer.uscc().to_owned(),
                        },
                    )
                    .await?;
                resp.records =
                    masking(me, permit.mode).in_scope(|| policy::shape(&permit, page.records));
                resp.next_page_token = page.next_page_token;
            }
            ShareMode::Query | ShareMode::Unspecified => {
                let records = provider
                    .run(
                        |mut c, r| async move { c.fetch(r).await },
                        fetch(permit.fields.clone()),
                    )
                    .await?
                    .records;
                resp.records =
                    masking(me, permit.mode).in_scope(|| policy::shape(&permit, records));
            }
        }
        let cacheable_ms = self.note_cacheable(env, consumer, permit.mode).await?;
        Ok((resp.encode_to_vec(), cacheable_ms))
    }

    /// How long the consumer's node may cache an answer served here, noting the node so that a change of the
    /// entry purges its cache; answers to this node's own agencies, open data and bulk pages are not cached.
    async fn note_cacheable(
        &self,
        env: &Envelope,
        consumer: &Vouched,
        mode: ShareMode,
    ) -> Result<u64> {
        let served = self.downlink.served();
        if env.open_data || mode == ShareMode::Bulk || consumer.node() == self.topology.code {
            return Ok(0);
        }
        served
            .note(
                &env.resource_id,
                consumer.node().as_str(),
                self.governance.clock().unix(),
            )
            .await?;
        Ok(u64::try_from(served.allowance().as_millis()).unwrap_or(u64::MAX))
    }
}

/// The answer of a hop whose record could not be made durable: it is not answered otherwise.
fn unrecorded(me: DivisionCode, e: audit::AuditError) -> Error {
    Error::Unavailable(format!(
        "node {me} could not record the request in its audit trail, so it is not answered: {e}"
    ))
}

/// The span of applying a permit's masking (or check) to what a provider answered.
fn masking(node: DivisionCode, mode: ShareMode) -> tracing::Span {
    tracing::info_span!("masking", fedgate.node = %node, fedgate.mode = mode.as_str_name())
}

/// One call to a provider agency with the request's remaining time.
struct ProviderCall<'a> {
    client: ProviderClient<tonic::transport::Channel>,
    who: String,
    uscc: String,
    remaining: Duration,
    node: DivisionCode,
    resource: &'a str,
    mode: ShareMode,
}

impl ProviderCall<'_> {
    async fn run<Req, Resp, F, Fut>(&self, call: F, req: Req) -> Result<Resp>
    where
        F: FnOnce(ProviderClient<tonic::transport::Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let span = tracing::info_span!(
            "provider.call",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            fedgate.node = %self.node,
            fedgate.provider = %self.uscc,
            fedgate.resource = self.resource,
            fedgate.mode = self.mode.as_str_name(),
            fedgate.outcome = tracing::field::Empty,
        );
        let mut req = span.in_scope(|| crate::telemetry::traced(req));
        req.set_timeout(self.remaining);
        let peer = || format!("urn:fedgate:agency:{}", self.uscc);
        let call = crate::opmon::next_hop(peer, call(self.client.clone(), req));
        let answer = tokio::time::timeout(self.remaining, call)
            .instrument(span.clone())
            .await;
        let result = self.answer(answer);
        crate::telemetry::record_outcome(&span, &result);
        result
    }

    /// The provider's answer, or the error naming why there was none.
    fn answer<Resp>(
        &self,
        answer: std::result::Result<
            std::result::Result<tonic::Response<Resp>, Status>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<Resp> {
        match answer {
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "deadline ran out waiting for provider agency {}",
                self.uscc
            ))),
            Ok(Err(status)) => Err(match call_error(status, &self.who) {
                Error::Upstream(s) => Error::Upstream(Status::new(
                    s.code(),
                    format!("provider agency {}: {}", self.uscc, s.message()),
                )),
                other => other,
            }),
            Ok(Ok(resp)) => Ok(resp.into_inner()),
        }
    }
}

fn same_resource(env: &Envelope, resource_id: &str) -> Result<()> {
    if resource_id != env.resource_id {
        return Err(Error::InvalidArgument(format!(
            "envelope names resource {} but the request names {resource_id}",
            env.resource_id
        )));
    }
    Ok(())
}

/// The audit record of one share at this node: served here, or passed on.
fn share_record(env: &Envelope, served: bool) -> AuditRecord {
    let mode = ShareMode::try_from(env.mode).unwrap_or(ShareMode::Query);
    let kind = RequestKind::try_from(env.kind).unwrap_or(RequestKind::Share);
    let operation = match (served, mode) {
        (_, _) if kind != RequestKind::Share => AuditOperation::ShareForward,
        (false, _) => AuditOperation::ShareForward,
        (true, ShareMode::Verify) => AuditOperation::ShareVerify,
        (true, ShareMode::Statistics) => AuditOperation::ShareStatistics,
        (true, ShareMode::Bulk) => AuditOperation::ShareBulk,
        (true, _) => AuditOperation::ShareQuery,
    };
    let actor = env
        .route
        .last()
        .map(|h| h.seen_peer.clone())
        .unwrap_or_default();
    let mut r = audit::event(operation, actor);
    r.consumer_uscc = env.consumer_uscc.clone();
    r.consumer_node = env.consumer_node.clone();
    r.resource_id = env.resource_id.clone();
    r.request_id = env.request_id.clone();
    r.purpose = env.purpose.clone();
    r.mode = mode.as_str_name().to_owned();
    r.route = env.route.iter().map(|h| h.node_code.clone()).collect();
    r.grant_id = env.grant_id.clone();
    if kind != RequestKind::Share {
        r.detail = kind.as_str_name().to_owned();
    }
    r
}

fn set_action(env: &mut Envelope, action: &str) {
    if let Some(hop) = env.route.last_mut() {
        hop.action = action.to_owned();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_cut_off_on_the_far_side_is_unavailable_and_other_answers_pass_through() {
        let cut = call_error(Status::cancelled("stream reset"), "node 350100");
        assert_eq!(Status::from(cut).code(), tonic::Code::Unavailable);
        let denied = call_error(Status::permission_denied("no grant"), "node 350100");
        let denied = Status::from(denied);
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "no grant");
    }
}

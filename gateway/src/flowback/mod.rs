//! Flow-back subscriptions: a resource's records flowing down the tree to a subscriber's node, the downward twin
//! of the uplink.
//!
//! At the resource's node a subscription (made under a grant of mode BULK, checked and shaped exactly as a bulk
//! share is) has a durable outbox. Its producer ([`produce`]) appends the first full export and then the
//! provider's changes (`Provider.Changes`, or, for a provider without them, periodic full exports diffed against a
//! snapshot of digests), each batch in the same transaction as the provider position it reached. Its shipper
//! ([`shipper`]) sends the outbox after the subscriber node's acknowledgement in batches signed by this node
//! (`DeliveryBatch`), hop by hop with `Federation.Deliver`, through the same batching, backoff, deadlines and
//! leases as the uplink ([`crate::ship`]). The subscriber's node ([`receive`]) checks each batch's signature,
//! signer and digest, stores its items idempotently and answers how far it holds the subscription; its agency
//! reads them as a resumable stream. Revocation or expiry of the grant ends the subscription at the resource's
//! node: nothing more is produced, items not yet shipped are withheld, and a last item says why; so does the
//! agency's own `Unsubscribe` ([`unsubscribe`]).

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::{
    AuditOperation, AuditRecord, CatalogEntry, Grant, ShareMode, ShareRequest, SignedGrant,
    SubscribeRequest, Subscription, SubscriptionEnd, SubscriptionEndReason, SubscriptionState,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::assertion::Vouched;
use crate::audit::{self, AuditLog};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::governance::Governance;
use crate::ident::{DivisionCode, Peer};
use crate::policy::{self, Permit};
use crate::statement::{NodeSigner, StatementVerifier};
use crate::store::{Doc, DocKind, DocQuery, Store};
use crate::topology::Topology;

pub mod agency;
mod produce;
pub mod receive;
mod shipper;
mod unsubscribe;

/// Limits and intervals of flow-back subscriptions (`[flowback]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowbackConfig {
    /// How often a subscription's producer asks its provider for changes when the last answer had none.
    pub poll_ms: u64,
    /// How often a provider without `Changes` is exported in full and diffed.
    pub diff_every_secs: u64,
    /// Items of one delivery batch at most.
    pub max_batch_items: u32,
    /// Encoded bytes of one delivery batch's items at most.
    pub max_batch_bytes: usize,
    /// Active subscriptions one agency may hold at one resource's node.
    pub max_per_agency: u32,
    /// Records asked of the provider per export page or changes call.
    pub provider_page: u32,
    /// Deadline of each call to the provider or to the next node.
    pub call_timeout_ms: u64,
    /// Records of one resource a diffed subscription follows at most (its snapshot is read whole).
    pub max_diff_records: u64,
}

impl Default for FlowbackConfig {
    fn default() -> Self {
        Self {
            poll_ms: 1000,
            diff_every_secs: 60,
            max_batch_items: 512,
            max_batch_bytes: 1 << 20,
            max_per_agency: 32,
            provider_page: 1000,
            call_timeout_ms: 20_000,
            max_diff_records: 1_000_000,
        }
    }
}

impl FlowbackConfig {
    fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms.max(10))
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms.max(1))
    }
}

/// A subscription as a node keeps it (the body of its `Subscription` or `Received` document).
#[derive(Clone, PartialEq, Message)]
pub struct Held {
    /// The subscription as its agency sees it.
    #[prost(message, optional, tag = "1")]
    pub subscription: Option<Subscription>,
    /// At the resource's node: the grant it runs under.
    #[prost(message, optional, tag = "2")]
    pub grant: Option<SignedGrant>,
    /// At the resource's node: the provider's change-log position the outbox reaches.
    #[prost(string, tag = "3")]
    pub position: String,
    /// At the resource's node: whether the first export is complete.
    #[prost(bool, tag = "4")]
    pub exported: bool,
    /// At the resource's node: whether the provider has no change log, so full exports are diffed.
    #[prost(bool, tag = "5")]
    pub diffed: bool,
    /// At the resource's node: when the next diffed export is due (seconds since the epoch).
    #[prost(int64, tag = "6")]
    pub next_diff_at: i64,
    /// At the resource's node: the export page to continue the first export from.
    #[prost(string, tag = "7")]
    pub export_token: String,
    /// At the resource's node, once ended: the outbox position of the end item (items before it that were not
    /// shipped are withheld).
    #[prost(uint64, tag = "8")]
    pub end_seq: u64,
    /// Whether the provider's position was taken (before the first export).
    #[prost(bool, tag = "9")]
    pub positioned: bool,
    /// At the resource's node, once ended: whether the subscriber's node acknowledged the end item, so nothing
    /// is left to ship.
    #[prost(bool, tag = "10")]
    pub finished: bool,
}

impl Held {
    fn sub(&self) -> &Subscription {
        static EMPTY: std::sync::OnceLock<Subscription> = std::sync::OnceLock::new();
        self.subscription
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Subscription::default))
    }

    fn ended(&self) -> bool {
        self.sub().state == SubscriptionState::Ended as i32
    }

    /// The document that stores it as `kind`.
    fn doc(&self, kind: DocKind, provider_uscc: &str) -> Doc {
        let s = self.sub();
        Doc {
            kind,
            id: s.id.clone(),
            provider_uscc: provider_uscc.to_owned(),
            consumer_uscc: s.consumer_uscc.clone(),
            state: s.state,
            due_at: 0,
            body: self.encode_to_vec(),
        }
    }

    fn from_doc(doc: &Doc) -> Result<Self> {
        Held::decode(doc.body.as_slice()).map_err(|e| {
            Error::Store(crate::store::StoreError::Corrupt {
                what: format!("subscription {}", doc.id),
                error: e.to_string(),
            })
        })
    }
}

/// Flow-back subscriptions at one node: those it produces and ships (of its own resources) and those it
/// receives (for its agencies).
#[derive(Clone)]
pub struct Flowback {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Arc<Topology>,
    store: Arc<dyn Store>,
    governance: Governance,
    audit: AuditLog,
    signer: NodeSigner,
    verifier: Arc<StatementVerifier>,
    clock: Arc<dyn Clock>,
    config: FlowbackConfig,
    max_route_hops: usize,
    replica: String,
    /// Woken when a subscription is made here or its grant may have changed.
    produced: Notify,
    /// Woken when items of any subscription were received here.
    received: Notify,
}

impl std::fmt::Debug for Flowback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flowback")
            .field("node", &self.inner.topology.code)
            .finish_non_exhaustive()
    }
}

impl Flowback {
    /// The flow-back side of the node `topology` describes.
    pub fn new(
        topology: Arc<Topology>,
        store: Arc<dyn Store>,
        (governance, audit): (Governance, AuditLog),
        (signer, verifier): (NodeSigner, Arc<StatementVerifier>),
        clock: Arc<dyn Clock>,
        (config, max_route_hops): (FlowbackConfig, usize),
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                topology,
                store,
                governance,
                audit,
                signer,
                verifier,
                clock,
                config,
                max_route_hops,
                replica: crate::ship::replica_id(),
                produced: Notify::new(),
                received: Notify::new(),
            }),
        }
    }

    fn me(&self) -> DivisionCode {
        self.inner.topology.code
    }

    /// Tells the producers that a subscription was made or a grant may have changed (revoked, expired).
    pub fn wake(&self) {
        self.inner.produced.notify_waiters();
    }

    async fn write(&self, record: AuditRecord) -> Result<()> {
        self.inner.audit.record(record).await.map_err(|e| {
            Error::Unavailable(format!(
                "node {} could not write its audit trail: {e}",
                self.me()
            ))
        })?;
        Ok(())
    }

    /// At the resource's node: makes a subscription for `consumer` (vouched for by its node), or returns the
    /// active one it already holds under the same grant and fields.
    pub async fn subscribe(
        &self,
        consumer: &Vouched,
        req: SubscribeRequest,
    ) -> Result<Subscription> {
        let mut record = audit::event(AuditOperation::Subscribe, consumer_uri(consumer));
        record.consumer_uscc = consumer.uscc().to_owned();
        record.consumer_node = consumer.node().to_string();
        record.resource_id = req.resource_id.clone();
        record.purpose = consumer.purpose().to_owned();
        let result = self.make(consumer, req, &mut record).await;
        if let Err(e) = &result {
            record.outcome = audit::outcome(e.code());
            record.detail = crate::limits::clamp(&e.to_string(), 512);
        }
        self.write(record).await?;
        result
    }

    async fn make(
        &self,
        consumer: &Vouched,
        req: SubscribeRequest,
        record: &mut AuditRecord,
    ) -> Result<Subscription> {
        let me = self.me();
        let entry = self.entry(&req.resource_id).await?;
        record.provider_uscc = entry.provider_uscc.clone();
        let signed = req.grant.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "a subscription to {} needs a grant of mode BULK: apply for one first",
                entry.id
            ))
        })?;
        let (grant, permit) = self.permit(&entry, consumer, &signed, &req.fields).await?;
        record.grant_id = grant.id.clone();
        let active = self
            .inner
            .store
            .docs(
                DocKind::Subscription,
                &DocQuery {
                    consumer_uscc: Some(consumer.uscc().to_owned()),
                    state: Some(SubscriptionState::Active as i32),
                    ..Default::default()
                },
            )
            .await?;
        for doc in &active {
            let held = Held::from_doc(doc)?;
            let s = held.sub();
            if s.grant_id == grant.id && s.fields == permit.fields && s.resource_id == entry.id {
                record.detail = format!("subscription {} already active", s.id);
                return Ok(s.clone());
            }
        }
        let max = self.inner.config.max_per_agency;
        if active.len() >= max as usize {
            return Err(Error::Upstream(tonic::Status::resource_exhausted(format!(
                "agency {} already holds {} active subscriptions at node {me}, the most it may (flowback.max_per_agency)",
                consumer.uscc(),
                active.len()
            ))));
        }
        let n = self.inner.store.next_id("subscription").await?;
        let subscription = Subscription {
            id: format!("{me}-s-{n}"),
            resource_id: entry.id.clone(),
            provider_node: me.to_string(),
            consumer_uscc: consumer.uscc().to_owned(),
            consumer_node: consumer.node().to_string(),
            grant_id: grant.id.clone(),
            fields: permit.fields.clone(),
            purpose: consumer.purpose().to_owned(),
            state: SubscriptionState::Active as i32,
            end: None,
            created_at: self.inner.clock.unix(),
            received_seq: 0,
        };
        let held = Held {
            subscription: Some(subscription.clone()),
            grant: Some(signed),
            ..Default::default()
        };
        self.inner
            .store
            .flow_append(
                &held.doc(DocKind::Subscription, &entry.provider_uscc),
                0,
                &[],
                &[],
            )
            .await?;
        record.detail = format!(
            "subscription {} of fields {}",
            subscription.id,
            permit.fields.join(",")
        );
        self.wake();
        Ok(subscription)
    }

    /// The live entry `resource_id` of this node.
    async fn entry(&self, resource_id: &str) -> Result<CatalogEntry> {
        let me = self.me();
        match self.inner.store.entry(resource_id).await? {
            Some(e) if !e.withdrawn => Ok(e.entry),
            _ => Err(Error::NotFound(format!(
                "resource {resource_id} is not in the catalog of node {me}"
            ))),
        }
    }

    /// Checks `signed` for a bulk share of `entry` to `consumer` and decides what it may see, exactly as a bulk
    /// share is checked and shaped.
    async fn permit(
        &self,
        entry: &CatalogEntry,
        consumer: &Vouched,
        signed: &SignedGrant,
        fields: &[String],
    ) -> Result<(Grant, Permit)> {
        let share = ShareRequest {
            resource_id: entry.id.clone(),
            mode: ShareMode::Bulk as i32,
            fields: fields.to_vec(),
            purpose: consumer.purpose().to_owned(),
            grant: Some(signed.clone()),
            ..Default::default()
        };
        let used = policy::used_fields(&share, ShareMode::Bulk);
        let grant = self
            .inner
            .governance
            .check_grant(signed, consumer, entry, ShareMode::Bulk, &used)
            .await?;
        let permit = policy::authorize(entry, &share, Some(&grant))?;
        Ok((grant, permit))
    }

    /// Ends a subscription held here: records why, appends its end item, and audits it.
    async fn end(
        &self,
        held: &mut Held,
        provider_uscc: &str,
        reason: SubscriptionEndReason,
        detail: String,
    ) -> Result<()> {
        let end = SubscriptionEnd {
            reason: reason as i32,
            detail: detail.clone(),
            ended_at: self.inner.clock.unix(),
        };
        let id = held.sub().id.clone();
        let head = self
            .inner
            .store
            .flow_head(crate::store::FlowSide::Outbox, &id)
            .await?;
        held.end_seq = head + 1;
        if let Some(s) = held.subscription.as_mut() {
            s.state = SubscriptionState::Ended as i32;
            s.end = Some(end.clone());
        }
        let item = fedgate_proto::v1::SubscriptionItem {
            seq: 0,
            body: Some(fedgate_proto::v1::subscription_item::Body::End(end)),
            snapshot: false,
        };
        self.inner
            .store
            .flow_append(
                &held.doc(DocKind::Subscription, provider_uscc),
                head,
                &[item.encode_to_vec()],
                &[],
            )
            .await?;
        let s = held.sub();
        let mut r = audit::event(
            AuditOperation::SubscriptionEnded,
            Peer::Node(self.me()).to_uri(),
        );
        r.provider_uscc = provider_uscc.to_owned();
        r.consumer_uscc = s.consumer_uscc.clone();
        r.consumer_node = s.consumer_node.clone();
        r.resource_id = s.resource_id.clone();
        r.grant_id = s.grant_id.clone();
        r.detail = format!(
            "subscription {id} ended ({}) at #{}: {detail}",
            reason.as_str_name(),
            held.end_seq
        );
        self.write(r).await
    }
}

fn consumer_uri(consumer: &Vouched) -> String {
    match consumer.uscc().parse() {
        Ok(uscc) => Peer::Agency(uscc).to_uri(),
        Err(_) => Peer::Node(consumer.node()).to_uri(),
    }
}

/// Runs the producers and shippers of the subscriptions held here until `shutdown` turns true: every poll
/// interval (or when woken) it starts a worker for each active subscription that has none.
pub async fn run(flowback: Flowback, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut workers: std::collections::HashMap<String, tokio::task::JoinHandle<()>> =
        Default::default();
    loop {
        workers.retain(|_, h| !h.is_finished());
        match flowback.open_subscriptions().await {
            Ok(ids) => {
                for id in ids {
                    if workers.contains_key(&id) {
                        continue;
                    }
                    let worker = shipper::Worker::new(flowback.clone(), id.clone());
                    let stop = shutdown.clone();
                    workers.insert(id, tokio::spawn(worker.run(stop)));
                }
            }
            Err(e) => tracing::warn!(error = %e, "flow-back subscriptions not read"),
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = flowback.inner.produced.notified() => {}
            _ = tokio::time::sleep(flowback.inner.config.poll() * 5) => {}
        }
    }
    for (_, h) in workers {
        let _ = h.await;
    }
}

impl Flowback {
    /// Subscriptions held here that still have something to do: active ones, and ended ones whose end item
    /// the subscriber's node has not acknowledged yet.
    async fn open_subscriptions(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .inner
                .store
                .docs(
                    DocKind::Subscription,
                    &DocQuery {
                        after_id: after.take(),
                        limit: Some(crate::governance::SCAN_PAGE),
                        ..Default::default()
                    },
                )
                .await?;
            let full = page.len() >= crate::governance::SCAN_PAGE as usize;
            for doc in page {
                after = Some(doc.id.clone());
                let held = Held::from_doc(&doc)?;
                if !held.finished {
                    ids.push(doc.id);
                }
            }
            if !full {
                return Ok(ids);
            }
        }
    }
}

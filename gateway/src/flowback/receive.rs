//! Delivery batches on their way down: every node checks a batch (signed by the subscription's resource node,
//! items matching the signed digest, bounded) before it passes it on; the subscriber's node stores its items
//! idempotently and answers how far it holds the subscription.

use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::{
    AuditOperation, DeliverRequest, DeliverResponse, DeliveryBatch, DeliveryItems, Subscription,
    SubscriptionState, subscription_item,
};
use prost::Message;
use sha2::{Digest, Sha256};

use super::{Flowback, Held, shipper::batch_detail};
use crate::audit;
use crate::catalog::parse_resource_id;
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Peer};
use crate::route::call_error;
use crate::statement::Verified;
use crate::store::{DocKind, FlowSide};

impl Flowback {
    /// Checks a batch arriving from `from` and passes it toward the subscriber's node, or applies it here when
    /// this is that node; a refusal at the subscriber's node is audited there.
    pub async fn deliver(&self, from: Peer, req: DeliverRequest) -> Result<DeliverResponse> {
        let checked = match self.check_batch(&req) {
            Ok(c) => c,
            Err(e) => {
                self.audit_refusal(&from, None, &e).await?;
                return Err(e);
            }
        };
        let me = self.me();
        let target: DivisionCode = checked
            .body()
            .consumer_node
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("batch.consumer_node: {e}")))?;
        if target != me {
            return self.relay(target, req).await;
        }
        match self.apply(&checked, &req.items).await {
            Ok((items, applied)) => {
                let s = checked.body();
                if !items.is_empty() {
                    let mut r = audit::event(AuditOperation::DeliveryReceived, from.to_uri());
                    r.consumer_uscc = s.consumer_uscc.clone();
                    r.consumer_node = s.consumer_node.clone();
                    r.resource_id = s.resource_id.clone();
                    r.grant_id = s.grant_id.clone();
                    r.route = req.route.clone();
                    r.detail = format!(
                        "{}; held up to #{applied}",
                        batch_detail(&s.subscription_id, &items)
                    );
                    self.write(r).await?;
                }
                Ok(DeliverResponse {
                    applied_seq: applied,
                })
            }
            Err(e) => {
                self.audit_refusal(&from, Some(checked.body()), &e).await?;
                Err(e)
            }
        }
    }

    async fn audit_refusal(
        &self,
        from: &Peer,
        batch: Option<&DeliveryBatch>,
        e: &Error,
    ) -> Result<()> {
        let mut r = audit::event(AuditOperation::DeliveryReceived, from.to_uri());
        r.outcome = audit::outcome(e.code());
        if let Some(b) = batch {
            r.consumer_uscc = b.consumer_uscc.clone();
            r.consumer_node = b.consumer_node.clone();
            r.resource_id = b.resource_id.clone();
            r.grant_id = b.grant_id.clone();
        }
        r.detail = format!(
            "delivery refused: {}",
            crate::limits::clamp(&e.to_string(), 512)
        );
        self.write(r).await
    }

    /// The batch's statement checked: signed by a node certificate, by the node the subscription id and the
    /// resource name, over exactly these items, within the batch limits.
    fn check_batch(&self, req: &DeliverRequest) -> Result<Verified<DeliveryBatch>> {
        let s = crate::statement::required(req.batch.as_ref(), "delivery")?;
        let v: Verified<DeliveryBatch> = self.inner.verifier.verify(s, self.inner.clock.unix())?;
        let b = v.body();
        let owner = b
            .subscription_id
            .split_once("-s-")
            .and_then(|(n, _)| n.parse::<DivisionCode>().ok())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "batch.subscription_id {:?} does not name a node",
                    crate::limits::excerpt(&b.subscription_id)
                ))
            })?;
        let holder = parse_resource_id("batch.resource_id", &b.resource_id)?.node();
        if v.signer() != owner || v.signer() != holder {
            return Err(Error::PermissionDenied(format!(
                "subscription {} of resource {} is produced by node {owner}; node {} may not deliver it",
                b.subscription_id,
                b.resource_id,
                v.signer()
            )));
        }
        if Sha256::digest(&req.items).as_slice() != b.items_digest.as_slice() {
            return Err(Error::DataLoss(format!(
                "the items of subscription {} #{}-#{} do not match what node {} signed: altered on the way",
                b.subscription_id,
                b.first_seq,
                b.last_seq,
                v.signer()
            )));
        }
        let max_items = u64::from(self.inner.config.max_batch_items.max(1));
        if b.last_seq < b.first_seq || b.last_seq - b.first_seq >= max_items {
            return Err(Error::InvalidArgument(format!(
                "batch #{}-#{} of subscription {}: more than {max_items} items or a reversed range",
                b.first_seq, b.last_seq, b.subscription_id
            )));
        }
        if req.route.len() > self.inner.max_route_hops {
            return Err(Error::FailedPrecondition(format!(
                "delivery of subscription {} passed {} nodes, above the hop limit",
                b.subscription_id,
                req.route.len()
            )));
        }
        Ok(v)
    }

    async fn relay(
        &self,
        target: DivisionCode,
        mut req: DeliverRequest,
    ) -> Result<DeliverResponse> {
        let me = self.me();
        let (next, _) = self.inner.topology.next_hop(target)?;
        if req.route.iter().any(|n| n == next.code.as_str()) {
            return Err(Error::FailedPrecondition(format!(
                "delivery toward node {target} would loop at node {}",
                next.code
            )));
        }
        req.route.push(me.to_string());
        let mut client = FederationClient::new(next.channel());
        let who = format!("node {} at {}", next.code, next.address);
        match crate::ship::call_with_deadline(
            "Deliver",
            self.inner.config.call_timeout(),
            req,
            |r| client.deliver(r),
        )
        .await
        {
            Ok(r) => Ok(r),
            Err(crate::ship::CallFailed::Status(s)) => Err(call_error(s, &who)),
            Err(e) => Err(Error::Unavailable(format!("{who}: {e}"))),
        }
    }

    /// Stores a checked batch at the subscriber's node; returns its items and how far this node holds the
    /// subscription afterwards.
    async fn apply(
        &self,
        checked: &Verified<DeliveryBatch>,
        items: &[u8],
    ) -> Result<(Vec<fedgate_proto::v1::SubscriptionItem>, u64)> {
        let me = self.me();
        let b = checked.body();
        if !self
            .inner
            .topology
            .agencies
            .keys()
            .any(|u| u.as_str() == b.consumer_uscc)
        {
            return Err(Error::PermissionDenied(format!(
                "agency {} is not registered at node {me}",
                crate::limits::excerpt(&b.consumer_uscc)
            )));
        }
        let items = DeliveryItems::decode(items)
            .map_err(|e| {
                Error::InvalidArgument(format!("items: not an encoded DeliveryItems: {e}"))
            })?
            .items;
        let consecutive = items
            .iter()
            .enumerate()
            .all(|(i, it)| it.seq == b.first_seq + i as u64);
        let count = b.last_seq.saturating_sub(b.first_seq) + u64::from(b.last_seq > 0);
        if !consecutive || items.len() as u64 != count {
            return Err(Error::InvalidArgument(format!(
                "batch #{}-#{} of subscription {}: its items are not those numbers in order",
                b.first_seq, b.last_seq, b.subscription_id
            )));
        }
        let held = self.received_doc(checked).await?;
        let head = self
            .inner
            .store
            .flow_head(FlowSide::Inbox, &b.subscription_id)
            .await?;
        if items.is_empty() {
            return Ok((items, head));
        }
        if b.first_seq > head + 1 {
            return Err(Error::FailedPrecondition(format!(
                "subscription {} is held here up to #{head}; a batch from #{} leaves a gap",
                b.subscription_id, b.first_seq
            )));
        }
        let rows: Vec<(u64, Vec<u8>)> = items.iter().map(|i| (i.seq, i.encode_to_vec())).collect();
        // The items are consecutive from at most the head's successor, so an end among them is applied with
        // them: the subscription is marked ended in the same transaction, never after its stream has ended.
        let ended = items.iter().find_map(|i| match &i.body {
            Some(subscription_item::Body::End(e)) => Some(e.clone()),
            _ => None,
        });
        let ended = ended.map(|end| {
            let mut held = held;
            if let Some(s) = held.subscription.as_mut() {
                s.state = SubscriptionState::Ended as i32;
                s.end = Some(end);
            }
            held.doc(DocKind::Received, "")
        });
        let applied = self
            .inner
            .store
            .flow_receive(&b.subscription_id, &rows, ended.as_ref())
            .await?;
        self.inner.received.notify_waiters();
        Ok((items, applied))
    }

    /// The subscription as this node holds it, recorded from the batch when this is its first.
    async fn received_doc(&self, checked: &Verified<DeliveryBatch>) -> Result<Held> {
        let b = checked.body();
        if let Some(doc) = self
            .inner
            .store
            .doc(DocKind::Received, &b.subscription_id)
            .await?
        {
            let held = Held::from_doc(&doc)?;
            let s = held.sub();
            if s.consumer_uscc != b.consumer_uscc || s.resource_id != b.resource_id {
                return Err(Error::PermissionDenied(format!(
                    "subscription {} is {}'s of resource {}, not what the batch names",
                    b.subscription_id, s.consumer_uscc, s.resource_id
                )));
            }
            return Ok(held);
        }
        let held = Held {
            subscription: Some(Subscription {
                id: b.subscription_id.clone(),
                resource_id: b.resource_id.clone(),
                provider_node: checked.signer().to_string(),
                consumer_uscc: b.consumer_uscc.clone(),
                consumer_node: b.consumer_node.clone(),
                grant_id: b.grant_id.clone(),
                state: SubscriptionState::Active as i32,
                created_at: self.inner.clock.unix(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.inner
            .store
            .put_doc(&held.doc(DocKind::Received, ""))
            .await?;
        Ok(held)
    }
}

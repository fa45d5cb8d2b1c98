//! The worker of one subscription at the resource's node: while this replica holds the subscription's lease, it
//! checks the grant, runs the producer and ships the outbox after the subscriber node's acknowledgement in signed
//! batches, through the same batching, backoff, deadlines and leases as the uplink ([`crate::ship`]).

use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::{
    AuditOperation, DeliverRequest, DeliveryBatch, DeliveryItems, Grant, SubscriptionEndReason,
    SubscriptionItem, subscription_item,
};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::produce::Step;
use super::{Flowback, Held};
use crate::assertion::Vouched;
use crate::audit;
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Peer};
use crate::route::call_error;
use crate::ship::{self, Backoff, BatchSize, CallFailed, LEASE_TTL, hold_lease, too_large};
use crate::store::{DocKind, FlowSide};

/// Bytes of a `DeliveryItems` message around its items.
const ITEMS_OVERHEAD: usize = 16;

/// Runs one subscription at the resource's node.
pub(super) struct Worker {
    fb: Flowback,
    id: String,
}

/// Returns once `stop` turns true.
async fn until_stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Why subscription `id` no longer runs, if it does not: its agency ended it, or its grant no longer lets it.
async fn stopped(
    fb: &Flowback,
    grant: &Grant,
    id: &str,
) -> Result<Option<(SubscriptionEndReason, String)>> {
    if let Some(detail) = fb.unsubscribed(id).await? {
        return Ok(Some((SubscriptionEndReason::Unsubscribed, detail)));
    }
    if fb.inner.governance.is_revoked(&grant.id).await? {
        return Ok(Some((
            SubscriptionEndReason::Revoked,
            format!("grant {} was revoked", grant.id),
        )));
    }
    if fb.inner.clock.unix() >= grant.expires_at {
        return Ok(Some((
            SubscriptionEndReason::Expired,
            format!("grant {} expired at {}", grant.id, grant.expires_at),
        )));
    }
    Ok(None)
}

impl Worker {
    pub(super) fn new(fb: Flowback, id: String) -> Self {
        Self { fb, id }
    }

    /// Works on the subscription until it is finished or `stop` turns true, while this replica holds its lease.
    pub(super) async fn run(self, mut stop: watch::Receiver<bool>) {
        let lease = format!("flowback:{}", self.id);
        let replica = self.fb.inner.replica.clone();
        let store = self.fb.inner.store.clone();
        let mut backoff = Backoff::default();
        let mut size = BatchSize {
            items: self.fb.inner.config.max_batch_items.max(1),
            bytes: self
                .fb
                .inner
                .config
                .max_batch_bytes
                .max(ship::MIN_BATCH_BYTES),
        };
        loop {
            match store.take_lease(&lease, &replica, LEASE_TTL).await {
                Ok(true) => {}
                Ok(false) => {
                    tokio::select! {
                        _ = until_stopped(&mut stop) => return,
                        _ = tokio::time::sleep(LEASE_TTL / 3) => continue,
                    }
                }
                Err(e) => {
                    tracing::warn!(subscription = %self.id, error = %e, "flow-back lease not taken");
                    tokio::select! {
                        _ = until_stopped(&mut stop) => return,
                        _ = tokio::time::sleep(backoff.failed()) => continue,
                    }
                }
            }
            let outcome = tokio::select! {
                _ = until_stopped(&mut stop) => {
                    let _ = store.release_lease(&lease, &replica).await;
                    return;
                }
                r = self.session(&mut backoff, &mut size) => r,
                lost = hold_lease(store.as_ref(), &lease, &replica) => {
                    Err(Error::Unavailable(format!("lease of subscription {} lost: {lost}", self.id)))
                }
            };
            let _ = store.release_lease(&lease, &replica).await;
            match outcome {
                Ok(()) => return,
                Err(e) => {
                    let wait = backoff.failed();
                    tracing::warn!(subscription = %self.id, error = %e,
                        "flow-back interrupted; retrying in {wait:?}");
                    size.interrupted();
                    tokio::select! {
                        _ = until_stopped(&mut stop) => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn load(&self) -> Result<(Held, String)> {
        let doc = self
            .fb
            .inner
            .store
            .doc(DocKind::Subscription, &self.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("subscription {} is not held here", self.id)))?;
        Ok((Held::from_doc(&doc)?, doc.provider_uscc))
    }

    /// Produces and ships until the subscription is finished; an error ends the session.
    async fn session(&self, backoff: &mut Backoff, size: &mut BatchSize) -> Result<()> {
        let fb = &self.fb;
        let (held, _) = self.load().await?;
        let grant = held
            .grant
            .as_ref()
            .and_then(|g| Grant::decode(g.grant.as_slice()).ok())
            .unwrap_or_default();
        // How far the subscriber's node holds the subscription.
        let mut acked = self.ship_batch(&held, &[]).await?;
        loop {
            let (mut held, provider_uscc) = self.load().await?;
            if held.finished {
                return Ok(());
            }
            let mut step = Step::Idle;
            if !held.ended() {
                if let Some((reason, detail)) = stopped(fb, &grant, &self.id).await? {
                    fb.end(&mut held, &provider_uscc, reason, detail).await?;
                    continue;
                }
                let sub = held.sub().clone();
                let consumer_node: DivisionCode = sub.consumer_node.parse()?;
                let consumer = Vouched::subscribed(&sub.consumer_uscc, consumer_node, &sub.purpose);
                let checked = match fb.entry(&sub.resource_id).await {
                    Ok(entry) => {
                        let signed = held.grant.clone().unwrap_or_default();
                        fb.permit(&entry, &consumer, &signed, &sub.fields).await
                    }
                    Err(e) => Err(e),
                };
                let permit = match checked {
                    Ok((_, permit)) => permit,
                    Err(e @ (Error::Store(_) | Error::Unavailable(_))) => return Err(e),
                    Err(e) => {
                        let reason = match stopped(fb, &grant, &self.id).await? {
                            Some((reason, _)) => reason,
                            None => SubscriptionEndReason::Withdrawn,
                        };
                        fb.end(&mut held, &provider_uscc, reason, e.to_string())
                            .await?;
                        continue;
                    }
                };
                step = fb.produce(&mut held, &provider_uscc, &permit).await?;
            }
            // Ship what is waiting.
            loop {
                let (held, provider_uscc) = self.load().await?;
                if !held.ended()
                    && let Some((reason, detail)) = stopped(fb, &grant, &self.id).await?
                {
                    // Revoked or expired meanwhile: nothing more leaves with data.
                    let mut held = held;
                    fb.end(&mut held, &provider_uscc, reason, detail).await?;
                    continue;
                }
                let rows = fb
                    .inner
                    .store
                    .flow_items(FlowSide::Outbox, &self.id, acked, size.items)
                    .await?;
                if rows.is_empty() {
                    if held.ended() && acked >= held.end_seq {
                        let mut held = held;
                        held.finished = true;
                        fb.inner
                            .store
                            .put_doc(&held.doc(DocKind::Subscription, &provider_uscc))
                            .await?;
                        return Ok(());
                    }
                    backoff.progressed();
                    break;
                }
                let mut items = rows
                    .into_iter()
                    .map(|(seq, body)| {
                        let mut item = SubscriptionItem::decode(body.as_slice()).map_err(|e| {
                            Error::DataLoss(format!(
                                "stored item {seq} of subscription {} is corrupt: {e}",
                                self.id
                            ))
                        })?;
                        item.seq = seq;
                        if held.ended() && seq < held.end_seq {
                            item.body = Some(subscription_item::Body::Withheld(true));
                            item.snapshot = false;
                        }
                        Ok(item)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (keep, bytes) = ship::fit_len(&items, size.bytes, ITEMS_OVERHEAD);
                items.truncate(keep);
                match self.ship_batch(&held, &items).await {
                    Ok(applied) => {
                        acked = applied;
                        self.audit_sent(&held, &provider_uscc, &items).await?;
                        backoff.progressed();
                        size.acknowledged(fb.inner.config.max_batch_items.max(1));
                    }
                    Err(Error::Upstream(s)) if too_large(&s) && items.len() > 1 => {
                        size.refused(bytes);
                    }
                    Err(e) => return Err(e),
                }
            }
            if step == Step::Idle {
                tokio::select! {
                    _ = fb.inner.produced.notified() => {}
                    _ = tokio::time::sleep(fb.inner.config.poll()) => {}
                }
            }
        }
    }

    async fn audit_sent(
        &self,
        held: &Held,
        provider_uscc: &str,
        items: &[SubscriptionItem],
    ) -> Result<()> {
        let s = held.sub();
        let mut r = audit::event(
            AuditOperation::DeliverySent,
            Peer::Node(self.fb.me()).to_uri(),
        );
        r.provider_uscc = provider_uscc.to_owned();
        r.consumer_uscc = s.consumer_uscc.clone();
        r.consumer_node = s.consumer_node.clone();
        r.resource_id = s.resource_id.clone();
        r.grant_id = s.grant_id.clone();
        r.purpose = s.purpose.clone();
        r.detail = batch_detail(&s.id, items);
        self.fb.write(r).await
    }

    /// Signs and sends one batch (possibly empty) toward the subscriber's node; returns how far that node holds
    /// the subscription, which must cover the batch.
    async fn ship_batch(&self, held: &Held, items: &[SubscriptionItem]) -> Result<u64> {
        let fb = &self.fb;
        let me = fb.me();
        let s = held.sub();
        let encoded = DeliveryItems {
            items: items.to_vec(),
        }
        .encode_to_vec();
        let batch = DeliveryBatch {
            subscription_id: s.id.clone(),
            resource_id: s.resource_id.clone(),
            consumer_node: s.consumer_node.clone(),
            consumer_uscc: s.consumer_uscc.clone(),
            grant_id: s.grant_id.clone(),
            first_seq: items.first().map_or(0, |i| i.seq),
            last_seq: items.last().map_or(0, |i| i.seq),
            items_digest: Sha256::digest(&encoded).to_vec(),
            signed_at_unix_ms: fb.inner.clock.now().unix_timestamp() * 1000,
        };
        let last = batch.last_seq;
        let signed = fb.inner.signer.sign(&batch).map_err(|e| {
            Error::Unavailable(format!("node {me} cannot sign a delivery batch: {e}"))
        })?;
        let req = DeliverRequest {
            batch: Some(signed),
            items: encoded,
            route: vec![me.to_string()],
        };
        let target: DivisionCode = s.consumer_node.parse()?;
        let applied = if target == me {
            fb.deliver(Peer::Node(me), req).await?.applied_seq
        } else {
            let (next, _) = fb.inner.topology.next_hop(target)?;
            let mut client = FederationClient::new(next.channel());
            let who = format!("node {} at {}", next.code, next.address);
            match ship::call_with_deadline("Deliver", fb.inner.config.call_timeout(), req, |r| {
                client.deliver(r)
            })
            .await
            {
                Ok(r) => r.applied_seq,
                Err(CallFailed::Status(s)) => return Err(call_error(s, &who)),
                Err(e) => return Err(Error::Unavailable(format!("{who}: {e}"))),
            }
        };
        if applied < last {
            return Err(Error::FailedPrecondition(format!(
                "node {target} holds subscription {} up to #{applied}, short of the batch ending at #{last}",
                s.id
            )));
        }
        Ok(applied)
    }
}

/// What an audit record says of a batch: the subscription, its sequence range and count, never data.
pub(super) fn batch_detail(id: &str, items: &[SubscriptionItem]) -> String {
    let (first, last) = (
        items.first().map_or(0, |i| i.seq),
        items.last().map_or(0, |i| i.seq),
    );
    let ended = items
        .iter()
        .any(|i| matches!(i.body, Some(subscription_item::Body::End(_))));
    format!(
        "subscription {id} items #{first}-#{last} ({} items{})",
        items.len(),
        if ended { ", with its end" } else { "" }
    )
}

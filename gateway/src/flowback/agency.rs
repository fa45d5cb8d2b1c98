//! What a subscriber's node does for its agencies: checks a subscription before it leaves, keeps what the
//! resource's node answered, lists the agency's subscriptions and streams what was received of one.

use std::time::Duration;

use fedgate_proto::v1::{
    AuditOperation, ListSubscriptionsRequest, ListSubscriptionsResponse, ReadSubscriptionRequest,
    ReadSubscriptionResponse, ShareMode, ShareRequest, SubscribeRequest, Subscription,
    SubscriptionItem, SubscriptionState, subscription_item,
};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Flowback, Held};
use crate::audit;
use crate::error::{Error, Result};
use crate::ident::{Peer, Uscc};
use crate::store::{DocKind, DocQuery, FlowSide};

/// Items of one ReadSubscription message at most.
const READ_BATCH: u32 = 256;
/// How often a reader waiting for items looks at the store, in case they arrived at another replica.
const READ_POLL: Duration = Duration::from_millis(500);

impl Flowback {
    /// At the subscriber's node, before a subscription leaves: the grant must be one any node can check, of
    /// mode BULK, naming `caller`; returns the share whose envelope carries it (purpose, mode, grant). A refusal
    /// is audited here.
    pub async fn before_subscribe(
        &self,
        caller: &Uscc,
        req: &SubscribeRequest,
    ) -> Result<ShareRequest> {
        let checked = self.check_subscribe(caller, req);
        if let Err(e) = &checked {
            let mut r = audit::event(
                AuditOperation::Subscribe,
                Peer::Agency(caller.clone()).to_uri(),
            );
            r.outcome = audit::outcome(e.code());
            r.consumer_uscc = caller.to_string();
            r.consumer_node = self.me().to_string();
            r.resource_id = req.resource_id.clone();
            r.purpose = req.purpose.clone();
            r.detail = crate::limits::clamp(&e.to_string(), 512);
            self.write(r).await?;
        }
        checked
    }

    fn check_subscribe(&self, caller: &Uscc, req: &SubscribeRequest) -> Result<ShareRequest> {
        let signed = req.grant.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "a subscription to {} needs a grant of mode BULK: apply for one first",
                req.resource_id
            ))
        })?;
        let grant = self.inner.governance.check_foreign_grant(signed)?;
        if grant.consumer_uscc != caller.as_str() {
            return Err(Error::PermissionDenied(format!(
                "grant {} was issued to agency {}, not to {caller}",
                grant.id, grant.consumer_uscc
            )));
        }
        if grant.resource_id != req.resource_id {
            return Err(Error::PermissionDenied(format!(
                "grant {} covers resource {}, not {}",
                grant.id, grant.resource_id, req.resource_id
            )));
        }
        if grant.mode != ShareMode::Bulk as i32 {
            return Err(Error::PermissionDenied(format!(
                "grant {} is of mode {}; a subscription needs mode BULK",
                grant.id,
                ShareMode::try_from(grant.mode)
                    .unwrap_or(ShareMode::Unspecified)
                    .as_str_name()
            )));
        }
        // A subscription stating no purpose of its own runs under the grant's.
        let purpose = if req.purpose.trim().is_empty() {
            grant.purpose.clone()
        } else {
            req.purpose.clone()
        };
        Ok(ShareRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            resource_id: req.resource_id.clone(),
            mode: ShareMode::Bulk as i32,
            fields: req.fields.clone(),
            purpose,
            grant: Some(signed.clone()),
            ..Default::default()
        })
    }

    /// At the subscriber's node: keeps the subscription the resource's node answered (what was received of it
    /// already stays).
    pub async fn subscribed(&self, sub: &Subscription) -> Result<()> {
        let held = match self.inner.store.doc(DocKind::Received, &sub.id).await? {
            Some(doc) => {
                let mut held = Held::from_doc(&doc)?;
                let kept = held.sub().clone();
                let mut s = sub.clone();
                if kept.state == SubscriptionState::Ended as i32 {
                    s.state = kept.state;
                    s.end = kept.end;
                }
                held.subscription = Some(s);
                held
            }
            None => Held {
                subscription: Some(sub.clone()),
                ..Default::default()
            },
        };
        self.inner
            .store
            .put_doc(&held.doc(DocKind::Received, ""))
            .await?;
        Ok(())
    }

    /// The subscription `id` of `caller` as this node holds it.
    pub(super) async fn own(&self, caller: &Uscc, id: &str) -> Result<Subscription> {
        let me = self.me();
        let doc = self
            .inner
            .store
            .doc(DocKind::Received, id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "subscription {} is not known at node {me}",
                    crate::limits::excerpt(id)
                ))
            })?;
        if doc.consumer_uscc != caller.as_str() {
            return Err(Error::PermissionDenied(format!(
                "subscription {id} is not {caller}'s"
            )));
        }
        let mut s = Held::from_doc(&doc)?.sub().clone();
        s.received_seq = self.inner.store.flow_head(FlowSide::Inbox, id).await?;
        Ok(s)
    }

    /// The caller's subscriptions known at this node.
    pub async fn list(
        &self,
        caller: &Uscc,
        req: &ListSubscriptionsRequest,
    ) -> Result<ListSubscriptionsResponse> {
        let state = (req.state != SubscriptionState::Unspecified as i32).then_some(req.state);
        let docs = self
            .inner
            .store
            .docs(
                DocKind::Received,
                &DocQuery {
                    consumer_uscc: Some(caller.to_string()),
                    state,
                    limit: Some(crate::governance::SCAN_PAGE),
                    ..Default::default()
                },
            )
            .await?;
        let mut subscriptions = Vec::with_capacity(docs.len());
        for doc in docs {
            subscriptions.push(self.own(caller, &doc.id).await?);
        }
        Ok(ListSubscriptionsResponse { subscriptions })
    }

    /// Streams what this node received of `caller`'s subscription after `after_seq`, then each item as it
    /// arrives, until the end item.
    pub async fn read(
        &self,
        caller: &Uscc,
        req: ReadSubscriptionRequest,
    ) -> Result<ReceiverStream<Result<ReadSubscriptionResponse, Status>>> {
        self.own(caller, &req.subscription_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let fb = self.clone();
        tokio::spawn(async move {
            let id = req.subscription_id;
            let mut after = req.after_seq;
            loop {
                // Registered before reading, so an arrival between the read and the wait is not missed.
                let arrived = fb.inner.received.notified();
                let rows = match fb
                    .inner
                    .store
                    .flow_items(FlowSide::Inbox, &id, after, READ_BATCH)
                    .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(Error::from(e)))).await;
                        return;
                    }
                };
                if rows.is_empty() {
                    tokio::select! {
                        _ = arrived => {}
                        _ = tokio::time::sleep(READ_POLL) => {}
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                let mut items = Vec::with_capacity(rows.len());
                let mut ended = false;
                for (seq, body) in rows {
                    after = seq;
                    let Ok(item) = SubscriptionItem::decode(body.as_slice()) else {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "item {seq} of subscription {id} is corrupt at this node"
                            ))))
                            .await;
                        return;
                    };
                    match item.body {
                        Some(subscription_item::Body::Withheld(_)) | None => continue,
                        Some(subscription_item::Body::End(_)) => ended = true,
                        _ => {}
                    }
                    items.push(item);
                }
                if !items.is_empty()
                    && tx
                        .send(Ok(ReadSubscriptionResponse { items }))
                        .await
                        .is_err()
                {
                    return;
                }
                if ended {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

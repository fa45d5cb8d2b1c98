//! Ending a subscription at its agency's request. The subscriber's node checks the request against the
//! subscription it holds for the agency and sends it to the resource's node, which checks the vouched consumer
//! again and leaves the request where the subscription's worker looks before each step; the worker ends it as it
//! ends one whose grant was revoked.

use fedgate_proto::v1::{
    AuditOperation, Subscription, SubscriptionEnd, SubscriptionEndReason, SubscriptionState,
    UnsubscribeRequest,
};

use super::{Flowback, Held, consumer_uri};
use crate::assertion::Vouched;
use crate::audit;
use crate::error::{Error, Result};
use crate::ident::{Peer, Uscc};
use crate::store::{Doc, DocKind};

impl Flowback {
    /// At the subscriber's node: the subscription `caller` asks to end, which must be its own here; a refusal is
    /// audited.
    pub async fn before_unsubscribe(
        &self,
        caller: &Uscc,
        req: &UnsubscribeRequest,
    ) -> Result<Subscription> {
        let own = self.own(caller, &req.subscription_id).await;
        if let Err(e) = &own {
            let mut r = audit::event(
                AuditOperation::SubscriptionEnded,
                Peer::Agency(caller.clone()).to_uri(),
            );
            r.outcome = audit::outcome(e.code());
            r.consumer_uscc = caller.to_string();
            r.consumer_node = self.me().to_string();
            r.detail = crate::limits::clamp(&e.to_string(), 512);
            self.write(r).await?;
        }
        own
    }

    /// At the resource's node: asks the worker of subscription `req.subscription_id` (of resource `resource_id`)
    /// to end it, when `consumer` is its subscriber; answers the subscription as it will stand. A refusal is
    /// audited.
    pub async fn unsubscribe(
        &self,
        consumer: &Vouched,
        resource_id: &str,
        req: UnsubscribeRequest,
    ) -> Result<Subscription> {
        let marked = self.mark_unsubscribed(consumer, resource_id, &req).await;
        if let Err(e) = &marked {
            let mut r = audit::event(AuditOperation::SubscriptionEnded, consumer_uri(consumer));
            r.outcome = audit::outcome(e.code());
            r.consumer_uscc = consumer.uscc().to_owned();
            r.consumer_node = consumer.node().to_string();
            r.resource_id = resource_id.to_owned();
            r.detail = crate::limits::clamp(&e.to_string(), 512);
            self.write(r).await?;
        }
        marked
    }

    async fn mark_unsubscribed(
        &self,
        consumer: &Vouched,
        resource_id: &str,
        req: &UnsubscribeRequest,
    ) -> Result<Subscription> {
        let me = self.me();
        let id = &req.subscription_id;
        let doc = self
            .inner
            .store
            .doc(DocKind::Subscription, id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "subscription {} is not held at node {me}",
                    crate::limits::excerpt(id)
                ))
            })?;
        let held = Held::from_doc(&doc)?;
        let mut s = held.sub().clone();
        if s.resource_id != resource_id {
            return Err(Error::InvalidArgument(format!(
                "subscription {id} is of resource {}, not {resource_id}",
                s.resource_id
            )));
        }
        if s.consumer_uscc != consumer.uscc() || s.consumer_node != consumer.node().to_string() {
            return Err(Error::PermissionDenied(format!(
                "subscription {id} is agency {}'s at node {}, not {}'s at {}",
                s.consumer_uscc,
                s.consumer_node,
                consumer.uscc(),
                consumer.node()
            )));
        }
        if held.ended() {
            return Ok(s);
        }
        self.inner
            .store
            .put_doc(&Doc {
                kind: DocKind::Unsubscribe,
                id: id.clone(),
                provider_uscc: doc.provider_uscc.clone(),
                consumer_uscc: s.consumer_uscc.clone(),
                state: 0,
                due_at: 0,
                body: req.reason.as_bytes().to_vec(),
            })
            .await?;
        self.inner.produced.notify_waiters();
        s.state = SubscriptionState::Ended as i32;
        s.end = Some(SubscriptionEnd {
            reason: SubscriptionEndReason::Unsubscribed as i32,
            detail: unsubscribed_detail(&req.reason),
            ended_at: self.inner.clock.unix(),
        });
        Ok(s)
    }

    /// Why the subscription's agency asked for subscription `id` to end, if it did.
    pub(super) async fn unsubscribed(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .inner
            .store
            .doc(DocKind::Unsubscribe, id)
            .await?
            .map(|d| unsubscribed_detail(&String::from_utf8_lossy(&d.body))))
    }
}

/// The end detail of a subscription its agency ended for `reason`.
fn unsubscribed_detail(reason: &str) -> String {
    if reason.trim().is_empty() {
        "ended by its agency".to_owned()
    } else {
        format!("ended by its agency: {reason}")
    }
}

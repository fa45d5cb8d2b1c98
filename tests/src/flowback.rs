//! Helpers of the flow-back subscription tests: a bulk grant, a subscription, and reading what the subscriber's
//! node received, for in-process and process-level federations alike.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{
    ApplyRequest, ReadSubscriptionRequest, ShareMode, SignedGrant, SubscribeRequest, Subscription,
    SubscriptionItem, subscription_item,
};
use tonic::transport::Channel;

/// The purpose every test subscription states (the grant's).
pub const PURPOSE: &str = "flow-back of registry records to the county";

/// A grant of mode BULK for `resource` (unconditionally shared, so granted at once) of `fields`.
pub async fn bulk_grant(
    client: &mut AgencyClient<Channel>,
    resource: &str,
    fields: &[&str],
) -> Result<SignedGrant> {
    let app = client
        .apply(ApplyRequest {
            resource_id: resource.into(),
            purpose: PURPOSE.into(),
            scenario: "local copy of the province's registry".into(),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            mode: ShareMode::Bulk as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner();
    app.grant
        .with_context(|| format!("application {} was not granted at once", app.id))
}

/// The subscription request for `resource` under `grant`.
pub fn subscribe_request(resource: &str, grant: &SignedGrant, fields: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        resource_id: resource.into(),
        grant: Some(grant.clone()),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        purpose: PURPOSE.into(),
    }
}

/// Subscribes to `resource` under `grant`.
pub async fn subscribe(
    client: &mut AgencyClient<Channel>,
    resource: &str,
    grant: &SignedGrant,
    fields: &[&str],
) -> Result<Subscription> {
    Ok(client
        .subscribe(subscribe_request(resource, grant, fields))
        .await?
        .into_inner())
}

/// What a reader got of a subscription.
#[derive(Debug, Default, Clone)]
pub struct Read {
    /// The items, in order.
    pub items: Vec<SubscriptionItem>,
    /// Whether the stream ended (after its end item).
    pub ended: bool,
}

impl Read {
    /// The last sequence number read.
    pub fn last_seq(&self) -> u64 {
        self.items.last().map_or(0, |i| i.seq)
    }

    /// The end item, if read.
    pub fn end(&self) -> Option<&fedgate_proto::v1::SubscriptionEnd> {
        self.items.iter().find_map(|i| match &i.body {
            Some(subscription_item::Body::End(e)) => Some(e),
            _ => None,
        })
    }
}

/// Reads subscription `id` after `after` until `want` items came or the stream ended, failing after `timeout`.
pub async fn read(
    client: &mut AgencyClient<Channel>,
    id: &str,
    after: u64,
    want: usize,
    timeout: Duration,
) -> Result<Read> {
    let mut stream = client
        .read_subscription(ReadSubscriptionRequest {
            subscription_id: id.into(),
            after_seq: after,
        })
        .await?
        .into_inner();
    let mut out = Read::default();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.items.len() < want {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => bail!(
                "subscription {id}: {} of {want} items after #{after} within {timeout:?}",
                out.items.len()
            ),
            Ok(Ok(Some(msg))) => out.items.extend(msg.items),
            Ok(Ok(None)) => {
                out.ended = true;
                return Ok(out);
            }
            Ok(Err(status)) => return Err(status.into()),
        }
    }
    Ok(out)
}

/// Checks that `items` continue `after` with consecutive sequence numbers, none twice.
pub fn assert_consecutive(after: u64, items: &[SubscriptionItem]) -> Result<()> {
    for (i, item) in items.iter().enumerate() {
        let expected = after + 1 + i as u64;
        if item.seq != expected {
            bail!("item {i} has #{}, expected #{expected}", item.seq);
        }
    }
    Ok(())
}

/// The value of `field` of an upserted record, if the item is one.
pub fn upsert_value<'a>(item: &'a SubscriptionItem, field: &str) -> Option<&'a str> {
    match &item.body {
        Some(subscription_item::Body::Upsert(r)) => r.values.get(field).map(String::as_str),
        _ => None,
    }
}

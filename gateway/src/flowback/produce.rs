//! The producer of a subscription at the resource's node: one step at a time, it takes the provider's change-log
//! position, then the first full export page by page, then the provider's changes (or, for a provider without
//! `Changes`, a full export diffed against the snapshot of digests), appending the items of each step to the
//! outbox in the same transaction as the position it reached, so a crash neither loses nor repeats a step.

use std::collections::{BTreeMap, HashMap, HashSet};

use fedgate_proto::v1::provider_client::ProviderClient;
use fedgate_proto::v1::{
    ChangesRequest, ExportRequest, Record, SubscriptionItem, record_change, subscription_item,
};
use prost::Message;
use sha2::{Digest, Sha256};

use super::{Flowback, Held};
use crate::error::{Error, Result};
use crate::policy::{self, Permit};
use crate::route::call_error;
use crate::ship::{CallFailed, call_with_deadline};
use crate::store::{DocKind, FlowSide, SnapshotChange};

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// It moved on and more is waiting at once.
    More,
    /// Nothing more until the next poll.
    Idle,
}

/// The digest a diffed subscription keeps of a record as the subscriber sees it.
fn digest(record: &Record) -> Vec<u8> {
    let sorted: BTreeMap<&String, &String> = record.values.iter().collect();
    let mut h = Sha256::new();
    for (k, v) in sorted {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().to_vec()
}

fn item(body: subscription_item::Body, snapshot: bool) -> Vec<u8> {
    SubscriptionItem {
        seq: 0,
        body: Some(body),
        snapshot,
    }
    .encode_to_vec()
}

/// A deleted record as the subscriber may see it: its key field alone, masked as in a record.
fn deleted(permit: &Permit, key: &str) -> Record {
    let mut r = Record::default();
    r.values.insert(permit.key_field.clone(), key.to_owned());
    policy::shape(permit, vec![r]).pop().unwrap_or_default()
}

impl Flowback {
    fn provider(&self, uscc: &str) -> Result<ProviderClient<tonic::transport::Channel>> {
        let me = self.me();
        self.inner
            .topology
            .agencies
            .values()
            .find(|a| a.uscc.as_str() == uscc)
            .and_then(|a| a.provider.as_ref())
            .map(|l| ProviderClient::new(l.channel()))
            .ok_or_else(|| {
                Error::Unavailable(format!(
                    "provider agency {uscc} has no Provider endpoint at node {me}"
                ))
            })
    }

    async fn provider_call<Req, Resp, F, Fut>(
        &self,
        uscc: &str,
        name: &'static str,
        body: Req,
        call: F,
    ) -> std::result::Result<Resp, tonic::Status>
    where
        F: FnOnce(ProviderClient<tonic::transport::Channel>, tonic::Request<Req>) -> Fut,
        Fut:
            std::future::Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let client = self
            .provider(uscc)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        match call_with_deadline(name, self.inner.config.call_timeout(), body, |r| {
            call(client, r)
        })
        .await
        {
            Ok(r) => Ok(r),
            Err(CallFailed::Status(s)) => Err(s),
            Err(e @ CallFailed::Stalled { .. }) => {
                Err(tonic::Status::deadline_exceeded(e.to_string()))
            }
        }
    }

    fn export_request(&self, held: &Held, permit: &Permit, token: &str) -> ExportRequest {
        let mut fields = permit.fields.clone();
        if !fields.contains(&permit.key_field) {
            // The key names each record in the snapshot; shaping drops it when it is not granted.
            fields.push(permit.key_field.clone());
        }
        ExportRequest {
            request_id: format!("{}-export", held.sub().id),
            resource_id: held.sub().resource_id.clone(),
            fields,
            page_token: token.to_owned(),
            page_size: self.inner.config.provider_page,
            consumer_uscc: held.sub().consumer_uscc.clone(),
        }
    }

    async fn append(
        &self,
        held: &Held,
        provider_uscc: &str,
        items: &[Vec<u8>],
        snapshot: &[SnapshotChange],
    ) -> Result<()> {
        let id = &held.sub().id;
        let head = self.inner.store.flow_head(FlowSide::Outbox, id).await?;
        self.inner
            .store
            .flow_append(
                &held.doc(DocKind::Subscription, provider_uscc),
                head,
                items,
                snapshot,
            )
            .await?;
        Ok(())
    }

    /// One step of the producer of `held`, whose provider is `provider_uscc` and which may see `permit`.
    pub(super) async fn produce(
        &self,
        held: &mut Held,
        provider_uscc: &str,
        permit: &Permit,
    ) -> Result<Step> {
        let who = format!("provider agency {provider_uscc}");
        let sub = held.sub().clone();
        if !held.positioned {
            let asked = ChangesRequest {
                request_id: format!("{}-position", sub.id),
                resource_id: sub.resource_id.clone(),
                after: String::new(),
                limit: 0,
                fields: permit.fields.clone(),
                consumer_uscc: sub.consumer_uscc.clone(),
            };
            match self
                .provider_call(provider_uscc, "Changes", asked, |mut c, r| async move {
                    c.changes(r).await
                })
                .await
            {
                Ok(r) => {
                    held.position = r.next;
                    held.diffed = false;
                }
                Err(s) if s.code() == tonic::Code::Unimplemented => held.diffed = true,
                Err(s) => return Err(call_error(s, &who)),
            }
            held.positioned = true;
            self.append(held, provider_uscc, &[], &[]).await?;
            return Ok(Step::More);
        }
        if !held.exported {
            let req = self.export_request(held, permit, &held.export_token);
            let page = self
                .provider_call(provider_uscc, "Export", req, |mut c, r| async move {
                    c.export(r).await
                })
                .await
                .map_err(|s| call_error(s, &who))?;
            let mut items = Vec::with_capacity(page.records.len());
            let mut snapshot = Vec::new();
            for raw in page.records {
                let key = raw
                    .values
                    .get(&permit.key_field)
                    .cloned()
                    .unwrap_or_default();
                let Some(shaped) = policy::shape(permit, vec![raw]).pop() else {
                    continue;
                };
                if held.diffed && !key.is_empty() {
                    snapshot.push((key, Some(digest(&shaped))));
                }
                items.push(item(subscription_item::Body::Upsert(shaped), true));
            }
            held.export_token = page.next_page_token;
            if held.export_token.is_empty() {
                held.exported = true;
                held.next_diff_at = self.next_diff();
            }
            self.append(held, provider_uscc, &items, &snapshot).await?;
            return Ok(if held.exported {
                Step::Idle
            } else {
                Step::More
            });
        }
        if held.diffed {
            if self.inner.clock.unix() < held.next_diff_at {
                return Ok(Step::Idle);
            }
            self.diff(held, provider_uscc, permit).await?;
            return Ok(Step::Idle);
        }
        let asked = ChangesRequest {
            request_id: format!("{}-changes", sub.id),
            resource_id: sub.resource_id.clone(),
            after: held.position.clone(),
            limit: self.inner.config.provider_page,
            fields: permit.fields.clone(),
            consumer_uscc: sub.consumer_uscc.clone(),
        };
        let answer = self
            .provider_call(provider_uscc, "Changes", asked, |mut c, r| async move {
                c.changes(r).await
            })
            .await
            .map_err(|s| call_error(s, &who))?;
        if answer.changes.is_empty() && answer.next == held.position {
            return Ok(Step::Idle);
        }
        let items: Vec<Vec<u8>> = answer
            .changes
            .into_iter()
            .filter_map(|c| match c.change? {
                record_change::Change::Upsert(r) => policy::shape(permit, vec![r])
                    .pop()
                    .map(|r| item(subscription_item::Body::Upsert(r), false)),
                record_change::Change::DeletedKey(k) => Some(item(
                    subscription_item::Body::Deleted(deleted(permit, &k)),
                    false,
                )),
            })
            .collect();
        held.position = answer.next;
        self.append(held, provider_uscc, &items, &[]).await?;
        Ok(if answer.more { Step::More } else { Step::Idle })
    }

    fn next_diff(&self) -> i64 {
        let every = i64::try_from(self.inner.config.diff_every_secs.max(1)).unwrap_or(i64::MAX);
        self.inner.clock.unix().saturating_add(every)
    }

    /// A full export compared with the snapshot: each new or changed record, then each key gone, appended page
    /// by page together with the snapshot's changes.
    async fn diff(&self, held: &mut Held, provider_uscc: &str, permit: &Permit) -> Result<()> {
        let id = held.sub().id.clone();
        let max = self.inner.config.max_diff_records;
        let mut known: HashMap<String, Vec<u8>> = HashMap::new();
        let mut after = String::new();
        loop {
            let page = self
                .inner
                .store
                .flow_snapshot(&id, &after, crate::governance::SCAN_PAGE)
                .await?;
            let full = page.len() >= crate::governance::SCAN_PAGE as usize;
            if let Some((k, _)) = page.last() {
                after = k.clone();
            }
            known.extend(page);
            if known.len() as u64 > max {
                return Err(Error::FailedPrecondition(format!(
                    "subscription {id}: the resource holds more than {max} records, more than a provider \
                     without a change log may be followed for (flowback.max_diff_records)"
                )));
            }
            if !full {
                break;
            }
        }
        let who = format!("provider agency {provider_uscc}");
        let mut seen: HashSet<String> = HashSet::with_capacity(known.len());
        let mut token = String::new();
        loop {
            let req = self.export_request(held, permit, &token);
            let page = self
                .provider_call(provider_uscc, "Export", req, |mut c, r| async move {
                    c.export(r).await
                })
                .await
                .map_err(|s| call_error(s, &who))?;
            let mut items = Vec::new();
            let mut snapshot = Vec::new();
            for raw in page.records {
                let key = raw
                    .values
                    .get(&permit.key_field)
                    .cloned()
                    .unwrap_or_default();
                let Some(shaped) = policy::shape(permit, vec![raw]).pop() else {
                    continue;
                };
                if key.is_empty() || !seen.insert(key.clone()) {
                    continue;
                }
                let d = digest(&shaped);
                if known.get(&key) != Some(&d) {
                    snapshot.push((key, Some(d)));
                    items.push(item(subscription_item::Body::Upsert(shaped), true));
                }
            }
            if !items.is_empty() {
                self.append(held, provider_uscc, &items, &snapshot).await?;
            }
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        let gone: Vec<String> = known.into_keys().filter(|k| !seen.contains(k)).collect();
        let items: Vec<Vec<u8>> = gone
            .iter()
            .map(|k| item(subscription_item::Body::Deleted(deleted(permit, k)), true))
            .collect();
        let snapshot: Vec<SnapshotChange> = gone.into_iter().map(|k| (k, None)).collect();
        held.next_diff_at = self.next_diff();
        self.append(held, provider_uscc, &items, &snapshot).await
    }
}

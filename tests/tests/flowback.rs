//! Flow-back subscriptions over real federations: a province resource flows back to a county, first export and
//! later changes exactly once; revocation, expiry and the agency's own Unsubscribe stop it at the provider's node; a provider without a change
//! log is diffed; forged or altered batches and wrong grants are refused with their exact codes and audited.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_gateway::ident::Peer;
use fedgate_gateway::statement::NodeSigner;
use fedgate_gateway::tls::TlsMaterial;
use fedgate_proto::v1::{
    AuditOperation, DeliverRequest, DeliveryBatch, DeliveryItems, Grant, ListSubscriptionsRequest,
    Record, RequestKind, RevokeRequest, ShareMode, ShareType, SubscriptionEndReason,
    SubscriptionItem, SubscriptionState, UnsubscribeRequest, subscription_item,
};
use fedgate_tests::flowback::{
    Read, assert_consecutive, bulk_grant, read, subscribe, subscribe_request, upsert_value,
};
use fedgate_tests::rogue::{RogueNode, assert_audited, now_ms};
use fedgate_tests::{Devnet, NodeSpec, code, eventually, federation_client, own_audit_records};
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::Code;

const PERSONS: usize = 200;
const RESOURCE: &str = "350000:household";
const FIELDS: [&str; 3] = ["id_number", "address", "household_no"];
const WAIT: Duration = Duration::from_secs(30);

/// Province 350000 with a provider; city 350100; county 350102 with the subscribing agency, and a second
/// consumer at 350103.
async fn federation(diff_every_secs: u64) -> Result<Devnet> {
    fedgate_tests::init();
    let provider = fedgate_node::devnet::ProviderSpec {
        household: ShareType::Unconditional,
        marriage: ShareType::Conditional,
        persons: PERSONS,
        seed: 7,
    };
    let net = Devnet::start_configured(
        vec![
            NodeSpec::new("350000")?.provider(2, "province provider", provider)?,
            NodeSpec::new("350100")?,
            NodeSpec::new("350102")?.consumer(1, "Gulou consumer")?,
            NodeSpec::new("350103")?.consumer(1, "Taijiang consumer")?,
        ],
        Default::default(),
        move |mut c| {
            c.flowback.poll_ms = 50;
            c.flowback.diff_every_secs = diff_every_secs;
            c.flowback.max_batch_items = 64;
            c
        },
    )
    .await?;
    net.wait_for_catalog(code("350000"), 2, WAIT).await?;
    Ok(net)
}

fn provider(net: &Devnet) -> Result<fedgate_examples::RegistryProvider> {
    net.provider_at(code("350000"))?
        .provider
        .clone()
        .context("the province's provider runs in this process")
}

fn person_id(net: &Devnet, i: usize) -> Result<String> {
    Ok(provider(net)?
        .registry()
        .sample_id(i)
        .context("registry too small")?
        .to_owned())
}

async fn audits(
    net: &Devnet,
    node: &str,
    op: AuditOperation,
) -> Result<Vec<fedgate_proto::v1::AuditRecord>> {
    Ok(own_audit_records(net, node)
        .await?
        .into_iter()
        .filter(|r| r.operation == op as i32)
        .collect())
}

fn is_upsert(i: &SubscriptionItem) -> bool {
    matches!(i.body, Some(subscription_item::Body::Upsert(_)))
}

#[tokio::test]
async fn a_province_resource_flows_back_to_a_county_first_export_then_changes_exactly_once()
-> Result<()> {
    let net = federation(60).await?;
    let consumer = net.consumer_at(code("350102"))?.uscc.clone();
    let mut c = net.client(&consumer).await?;
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    assert_eq!(sub.provider_node, "350000");
    assert_eq!(sub.consumer_node, "350102");
    assert!(sub.id.starts_with("350000-s-"), "{}", sub.id);
    // Subscribing again under the same grant is the same subscription.
    let again = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    assert_eq!(again.id, sub.id);

    let first = read(&mut c, &sub.id, 0, PERSONS, WAIT).await?;
    assert_consecutive(0, &first.items)?;
    assert!(first.items.iter().all(|i| is_upsert(i) && i.snapshot));
    for item in &first.items {
        let Some(subscription_item::Body::Upsert(r)) = &item.body else {
            bail!("not an upsert")
        };
        assert_eq!(r.values.len(), 3, "only the granted fields: {:?}", r.values);
        assert!(
            r.values["id_number"].contains("********"),
            "masked as in a bulk share"
        );
        assert!(
            r.values["address"].ends_with("****"),
            "masked as in a bulk share"
        );
    }

    // Later changes: two residents move, one is deleted.
    let p = provider(&net)?;
    let (a, b, gone) = (
        person_id(&net, 3)?,
        person_id(&net, 4)?,
        person_id(&net, 5)?,
    );
    assert!(p.edit(&a, |p| p.address = "测试新址一号楼101".into()));
    assert!(p.edit(&b, |p| p.household_no = "350000CHANGED".into()));
    assert!(p.delete(&gone));
    let later = read(&mut c, &sub.id, first.last_seq(), 3, WAIT).await?;
    assert_consecutive(first.last_seq(), &later.items)?;
    assert_eq!(
        upsert_value(&later.items[0], "address"),
        Some("测试新址一号****")
    );
    assert_eq!(
        upsert_value(&later.items[1], "household_no"),
        Some("350000CHANGED")
    );
    match &later.items[2].body {
        Some(subscription_item::Body::Deleted(r)) => {
            assert_eq!(r.values.len(), 1, "a deletion names the key only");
            assert!(r.values["id_number"].contains("********"));
        }
        other => bail!("expected a deletion, got {other:?}"),
    }
    assert!(later.items.iter().all(|i| !i.snapshot));

    // Resuming from any position gives exactly the rest, once.
    let resumed = read(&mut c, &sub.id, 150, PERSONS + 3 - 150, WAIT).await?;
    assert_consecutive(150, &resumed.items)?;
    let listed = c
        .list_subscriptions(ListSubscriptionsRequest::default())
        .await?
        .into_inner()
        .subscriptions;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].received_seq, PERSONS as u64 + 3);
    assert_eq!(listed[0].state, SubscriptionState::Active as i32);
    assert_eq!(listed[0].fields, FIELDS);

    // Nothing more comes: the subscriber's node holds each item once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let store = net.node(code("350102"))?.store().clone();
    let held = store
        .flow_items(fedgate_gateway::store::FlowSide::Inbox, &sub.id, 0, 10_000)
        .await?;
    assert_eq!(held.len(), PERSONS + 3);

    // Audited at both ends, naming the grant and the range, never the data.
    let g = Grant::decode(grant.grant.as_slice())?;
    let sent = audits(&net, "350000", AuditOperation::DeliverySent).await?;
    let received = audits(&net, "350102", AuditOperation::DeliveryReceived).await?;
    assert!(!sent.is_empty() && !received.is_empty());
    for r in sent.iter().chain(&received) {
        assert_eq!(r.grant_id, g.id);
        assert_eq!(r.resource_id, RESOURCE);
        assert_eq!(r.consumer_uscc, consumer.to_string());
        assert!(
            r.detail.contains(&sub.id) && r.detail.contains("items #"),
            "{}",
            r.detail
        );
        assert!(
            !r.detail.contains("测试"),
            "no data values in the audit: {}",
            r.detail
        );
    }
    let count = |rs: &[fedgate_proto::v1::AuditRecord]| -> u64 {
        rs.iter()
            .filter_map(|r| {
                let (_, n) = r.detail.split_once(" (")?;
                n.split(' ').next()?.parse::<u64>().ok()
            })
            .sum()
    };
    assert_eq!(count(&sent), PERSONS as u64 + 3, "every item sent once");
    assert_eq!(
        count(&received),
        PERSONS as u64 + 3,
        "every item received once"
    );
    assert_eq!(
        audits(&net, "350000", AuditOperation::Subscribe)
            .await?
            .len(),
        2,
        "both subscribe calls are audited at the provider's node"
    );
    net.shutdown().await
}

/// Reads until the stream ends, failing after [`WAIT`].
async fn read_to_end(
    c: &mut fedgate_proto::v1::agency_client::AgencyClient<tonic::transport::Channel>,
    id: &str,
    after: u64,
) -> Result<Read> {
    read(c, id, after, usize::MAX, WAIT).await
}

#[tokio::test]
async fn revocation_stops_a_subscription_at_once_and_its_stream_ends_saying_why() -> Result<()> {
    let net = federation(60).await?;
    let consumer = net.consumer_at(code("350102"))?.uscc.clone();
    let mut c = net.client(&consumer).await?;
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let g = Grant::decode(grant.grant.as_slice())?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    let first = read(&mut c, &sub.id, 0, PERSONS, WAIT).await?;

    let provider_agency = net.provider_at(code("350000"))?.uscc.clone();
    let mut pc = net.client(&provider_agency).await?;
    pc.revoke(RevokeRequest {
        grant_id: g.id.clone(),
        reason: "data sharing agreement ended".into(),
    })
    .await?;
    // Changed after the revocation: must never reach the county.
    let p = provider(&net)?;
    let moved = person_id(&net, 9)?;
    assert!(p.edit(&moved, |p| p.address = "撤销后新址".into()));

    let rest = read_to_end(&mut c, &sub.id, first.last_seq()).await?;
    assert!(rest.ended, "the stream ends");
    let end = rest.end().context("an end item")?;
    assert_eq!(end.reason, SubscriptionEndReason::Revoked as i32);
    assert!(end.detail.contains(&g.id), "{}", end.detail);
    assert!(
        rest.items.iter().all(|i| !is_upsert(i)),
        "nothing with data after the revocation: {:?}",
        rest.items
    );
    let listed = c
        .list_subscriptions(ListSubscriptionsRequest::default())
        .await?
        .into_inner()
        .subscriptions;
    assert_eq!(listed[0].state, SubscriptionState::Ended as i32);
    let ended = audits(&net, "350000", AuditOperation::SubscriptionEnded).await?;
    assert_eq!(ended.len(), 1);
    assert!(ended[0].detail.contains("REVOKED"), "{}", ended[0].detail);

    // A new subscription under the revoked grant is refused at the provider's node.
    let err = c
        .subscribe(subscribe_request(RESOURCE, &grant, &FIELDS))
        .await
        .expect_err("revoked grant");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("revoked"), "{}", err.message());
    net.shutdown().await
}

#[tokio::test]
async fn an_agency_ends_its_own_subscription_and_no_one_else_can() -> Result<()> {
    let net = federation(60).await?;
    let consumer = net.consumer_at(code("350102"))?.uscc.clone();
    let mut c = net.client(&consumer).await?;
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    let first = read(&mut c, &sub.id, 0, PERSONS, WAIT).await?;
    let ask = |reason: &str| UnsubscribeRequest {
        subscription_id: sub.id.clone(),
        reason: reason.into(),
    };

    // Another agency, at its own node: the subscription is not known there.
    let other = net.consumer_at(code("350103"))?.uscc.clone();
    let err = net
        .client(&other)
        .await?
        .unsubscribe(ask("not mine"))
        .await
        .expect_err("another agency's subscription");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert_audited(&net, "350103", "NOT_FOUND", &sub.id).await?;
    // Its node, signing honestly as itself, asks the resource's node directly: refused there.
    let rogue = RogueNode::new(&net, "350103")?
        .presenting(&net.consumer_at(code("350103"))?.cert.cert_pem)?;
    let mut env = rogue.envelope(
        "rogue-unsubscribe",
        (RESOURCE, "350000"),
        (other.as_str(), "350103"),
    );
    env.kind = RequestKind::Unsubscribe as i32;
    env.mode = 0;
    let req = ask("rogue");
    env.assertion = Some(rogue.assert(&env, &req.encode_to_vec(), now_ms(&net))?);
    let err = rogue
        .federation(&net, "350100")
        .await?
        .forward(RogueNode::forward(env, &req))
        .await
        .expect_err("a subscription ended by another node");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("at node 350102"),
        "{}",
        err.message()
    );
    assert_audited(&net, "350000", "PERMISSION_DENIED", "at node 350102").await?;

    // The subscriber ends it: nothing more is delivered, the stream ends saying why.
    let ended = c.unsubscribe(ask("no longer needed")).await?.into_inner();
    assert_eq!(ended.state, SubscriptionState::Ended as i32);
    let p = provider(&net)?;
    assert!(p.edit(&person_id(&net, 5)?, |p| p.address = "退订后新址".into()));
    let rest = read_to_end(&mut c, &sub.id, first.last_seq()).await?;
    let end = rest.end().context("an end item")?;
    assert_eq!(end.reason, SubscriptionEndReason::Unsubscribed as i32);
    assert!(end.detail.contains("no longer needed"), "{}", end.detail);
    assert!(rest.items.iter().all(|i| !is_upsert(i)), "{:?}", rest.items);
    let audited = audits(&net, "350000", AuditOperation::SubscriptionEnded).await?;
    assert!(
        audited
            .iter()
            .any(|r| r.outcome == "OK" && r.detail.contains("UNSUBSCRIBED")),
        "{audited:?}"
    );
    // Ending it again answers it as it is.
    let again = c.unsubscribe(ask("again")).await?.into_inner();
    assert_eq!(again.state, SubscriptionState::Ended as i32);
    net.shutdown().await
}

#[tokio::test]
async fn expiry_of_the_grant_ends_the_subscription() -> Result<()> {
    let net = federation(60).await?;
    let consumer = net.consumer_at(code("350102"))?.uscc.clone();
    let mut c = net.client(&consumer).await?;
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let g = Grant::decode(grant.grant.as_slice())?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    let first = read(&mut c, &sub.id, 0, PERSONS, WAIT).await?;
    let now = fedgate_gateway::clock::Clock::unix(net.clock());
    net.advance_clock(g.expires_at - now + 1);
    let p = provider(&net)?;
    assert!(p.edit(&person_id(&net, 11)?, |p| p.address = "过期后新址".into()));
    let rest = read_to_end(&mut c, &sub.id, first.last_seq()).await?;
    let end = rest.end().context("an end item")?;
    assert_eq!(end.reason, SubscriptionEndReason::Expired as i32);
    assert!(rest.items.iter().all(|i| !is_upsert(i)));
    net.shutdown().await
}

#[tokio::test]
async fn a_provider_without_a_change_log_is_followed_by_diffing_full_exports() -> Result<()> {
    let net = federation(1).await?;
    let p = provider(&net)?;
    p.changes().set_enabled(false);
    let consumer = net.consumer_at(code("350102"))?.uscc.clone();
    let mut c = net.client(&consumer).await?;
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    let first = read(&mut c, &sub.id, 0, PERSONS, WAIT).await?;
    assert_consecutive(0, &first.items)?;

    assert!(p.edit(&person_id(&net, 20)?, |p| p.household_no =
        "DIFFED-1".into()));
    // A change of a field not granted is no change to the subscriber.
    assert!(p.edit(&person_id(&net, 21)?, |p| p.phone = "13900000000".into()));
    assert!(p.delete(&person_id(&net, 22)?));
    let later = read(&mut c, &sub.id, first.last_seq(), 2, WAIT).await?;
    assert_consecutive(first.last_seq(), &later.items)?;
    assert_eq!(
        upsert_value(&later.items[0], "household_no"),
        Some("DIFFED-1")
    );
    assert!(matches!(
        later.items[1].body,
        Some(subscription_item::Body::Deleted(_))
    ));
    // Later diffs find nothing new.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let store = net.node(code("350102"))?.store().clone();
    let head = store
        .flow_head(fedgate_gateway::store::FlowSide::Inbox, &sub.id)
        .await?;
    assert_eq!(head, PERSONS as u64 + 2);
    net.shutdown().await
}

#[tokio::test]
async fn non_bulk_grants_and_grants_of_another_agency_are_refused_and_audited() -> Result<()> {
    let net = federation(60).await?;
    let consumer = net.consumer_at(code("350102"))?.uscc.clone();
    let other = net.consumer_at(code("350103"))?.uscc.clone();
    let mut c = net.client(&consumer).await?;
    let mut o = net.client(&other).await?;

    let query_grant = c
        .apply(fedgate_proto::v1::ApplyRequest {
            resource_id: RESOURCE.into(),
            purpose: fedgate_tests::flowback::PURPOSE.into(),
            scenario: "lookups".into(),
            fields: vec!["id_number".into()],
            mode: ShareMode::Verify as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner()
        .grant
        .context("granted")?;
    let err = c
        .subscribe(subscribe_request(RESOURCE, &query_grant, &["id_number"]))
        .await
        .expect_err("not a bulk grant");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("mode BULK"), "{}", err.message());

    let others = bulk_grant(&mut o, RESOURCE, &FIELDS).await?;
    let err = c
        .subscribe(subscribe_request(RESOURCE, &others, &FIELDS))
        .await
        .expect_err("someone else's grant");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("not to"), "{}", err.message());

    let refused: Vec<_> = audits(&net, "350102", AuditOperation::Subscribe)
        .await?
        .into_iter()
        .filter(|r| r.outcome == "PERMISSION_DENIED")
        .collect();
    assert_eq!(
        refused.len(),
        2,
        "both refusals audited at the subscriber's node"
    );
    assert!(
        refused
            .iter()
            .all(|r| r.consumer_uscc == consumer.to_string())
    );

    // Another agency cannot read a subscription that is not its own.
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    let err = o
        .read_subscription(fedgate_proto::v1::ReadSubscriptionRequest {
            subscription_id: sub.id.clone(),
            after_seq: 0,
        })
        .await
        .expect_err("not at its node");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    net.shutdown().await
}

/// A batch signed by `signer` (a node certificate of the federation) for `sub` carrying `items`.
fn batch(
    signer: &NodeSigner,
    sub: &fedgate_proto::v1::Subscription,
    items: &[SubscriptionItem],
) -> Result<DeliverRequest> {
    let encoded = DeliveryItems {
        items: items.to_vec(),
    }
    .encode_to_vec();
    let body = DeliveryBatch {
        subscription_id: sub.id.clone(),
        resource_id: sub.resource_id.clone(),
        consumer_node: sub.consumer_node.clone(),
        consumer_uscc: sub.consumer_uscc.clone(),
        grant_id: sub.grant_id.clone(),
        first_seq: items.first().map_or(0, |i| i.seq),
        last_seq: items.last().map_or(0, |i| i.seq),
        items_digest: Sha256::digest(&encoded).to_vec(),
        signed_at_unix_ms: 0,
    };
    Ok(DeliverRequest {
        batch: Some(signer.sign(&body)?),
        items: encoded,
        route: vec!["350000".into(), "350100".into()],
    })
}

fn signer_of(net: &Devnet, node: &str) -> Result<(NodeSigner, fedgate_gateway::pki::IssuedCert)> {
    let cert = net.ca().issue(&Peer::Node(code(node)), &[])?;
    let signer = NodeSigner::from_material(&TlsMaterial {
        ca_pem: net.ca().ca_pem(),
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
    })?;
    Ok((signer, cert))
}

#[tokio::test]
async fn a_relay_can_neither_forge_nor_alter_a_batch() -> Result<()> {
    let net = federation(60).await?;
    let consumer = net.consumer_at(code("350102"))?.uscc.clone();
    let mut c = net.client(&consumer).await?;
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    let first = read(&mut c, &sub.id, 0, PERSONS, WAIT).await?;
    let next = first.last_seq() + 1;
    let mut forged = Record::default();
    forged.values.insert("address".into(), "伪造的地址".into());
    let item = SubscriptionItem {
        seq: next,
        body: Some(subscription_item::Body::Upsert(forged)),
        snapshot: false,
    };

    // The relay (350100) signs a batch itself: not the subscription's node.
    let (relay, relay_cert) = signer_of(&net, "350100")?;
    let mut fc = federation_client(&net, "350102", &relay_cert).await?;
    let err = fc
        .deliver(batch(&relay, &sub, std::slice::from_ref(&item))?)
        .await
        .expect_err("forged");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("may not deliver"),
        "{}",
        err.message()
    );

    // A batch the provider's node signed, its items altered on the way.
    let (province, _) = signer_of(&net, "350000")?;
    let mut genuine = batch(
        &province,
        &sub,
        &[SubscriptionItem {
            seq: next,
            body: Some(subscription_item::Body::Withheld(true)),
            snapshot: false,
        }],
    )?;
    genuine.items = DeliveryItems {
        items: vec![item.clone()],
    }
    .encode_to_vec();
    let err = fc.deliver(genuine).await.expect_err("altered");
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());

    // A genuine batch that skips numbers leaves a gap.
    let mut gap = item.clone();
    gap.seq = next + 5;
    let err = fc
        .deliver(batch(&province, &sub, &[gap])?)
        .await
        .expect_err("gap");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    let refused: Vec<_> = audits(&net, "350102", AuditOperation::DeliveryReceived)
        .await?
        .into_iter()
        .filter(|r| r.outcome != "OK")
        .collect();
    let outcomes: Vec<&str> = refused.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        ["PERMISSION_DENIED", "DATA_LOSS", "FAILED_PRECONDITION"]
    );
    assert!(
        refused
            .iter()
            .all(|r| r.actor == Peer::Node(code("350100")).to_uri())
    );
    // Nothing forged was stored.
    let store = net.node(code("350102"))?.store().clone();
    eventually(
        "the subscriber's node holds only what the province sent",
        WAIT,
        || {
            let store = store.clone();
            let id = sub.id.clone();
            async move {
                let rows = store
                    .flow_items(fedgate_gateway::store::FlowSide::Inbox, &id, 0, 10_000)
                    .await?;
                Ok(rows.len() == PERSONS
                    && rows
                        .iter()
                        .all(|(_, b)| !String::from_utf8_lossy(b).contains("伪造")))
            }
        },
    )
    .await?;
    net.shutdown().await
}

/// Reads every item of `id` from the start, waiting until `total` came.
async fn read_all(
    fed: &fedgate_tests::process::ProcessFederation,
    uscc: &fedgate_gateway::ident::Uscc,
    id: &str,
    total: usize,
) -> Result<Read> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        // Each attempt on a fresh connection: the node may have just restarted.
        let attempt = async {
            let mut c = fed.client(uscc).await?;
            read(&mut c, id, 0, total, Duration::from_secs(20)).await
        };
        match attempt.await {
            Ok(r) if r.items.len() >= total => return Ok(r),
            Ok(r) => bail!("stream of {id} ended after {} items", r.items.len()),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "subscription not complete yet");
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::test]
async fn changes_cross_a_parent_outage_and_sigkills_of_the_intermediate_and_the_provider_node_exactly_once()
-> Result<()> {
    use fedgate_tests::process::ProcessFederation;
    fedgate_tests::init();
    let provider_spec = fedgate_node::devnet::ProviderSpec {
        household: ShareType::Unconditional,
        marriage: ShareType::Conditional,
        persons: PERSONS,
        seed: 7,
    };
    let mut fed = ProcessFederation::start_configured(
        vec![
            NodeSpec::new("350000")?.provider(2, "province provider", provider_spec)?,
            NodeSpec::new("350100")?,
            NodeSpec::new("350102")?.consumer(1, "Gulou consumer")?,
        ],
        &[],
        &|c| {
            c.flowback.poll_ms = 50;
            c.flowback.max_batch_items = 16;
            c.flowback.call_timeout_ms = 2000;
        },
    )
    .await?;
    let consumer = fed.consumer_at(code("350102"))?.uscc.clone();
    let p = fed
        .provider_at(code("350000"))?
        .provider
        .clone()
        .context("provider in this process")?;
    let id_of = |i: usize| -> Result<String> {
        Ok(p.registry().sample_id(i).context("registry")?.to_owned())
    };
    let mut c = fed.client(&consumer).await?;
    let grant = bulk_grant(&mut c, RESOURCE, &FIELDS).await?;
    let sub = subscribe(&mut c, RESOURCE, &grant, &FIELDS).await?;
    read(&mut c, &sub.id, 0, PERSONS, WAIT).await?;
    drop(c);

    // The subscriber's parent goes away; changes made meanwhile wait at the province.
    fed.terminate(code("350100")).await?;
    for i in 0..5 {
        assert!(p.edit(&id_of(i)?, |r| r.household_no = format!("OUTAGE-{i}")));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.start_node(code("350100")).await?;
    read_all(&fed, &consumer, &sub.id, PERSONS + 5).await?;

    // The intermediate node is killed while changes keep coming.
    for i in 5..10 {
        assert!(p.edit(&id_of(i)?, |r| r.household_no = format!("KILL-{i}")));
    }
    fed.kill9(code("350100")).await?;
    for i in 10..15 {
        assert!(p.edit(&id_of(i)?, |r| r.household_no = format!("KILL-{i}")));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    fed.start_node(code("350100")).await?;
    read_all(&fed, &consumer, &sub.id, PERSONS + 15).await?;

    // The province's node itself is killed between changes: its outbox and provider position commit together.
    for i in 15..18 {
        assert!(p.edit(&id_of(i)?, |r| r.household_no = format!("KILL-{i}")));
    }
    fed.kill9(code("350000")).await?;
    for i in 18..20 {
        assert!(p.edit(&id_of(i)?, |r| r.household_no = format!("KILL-{i}")));
    }
    fed.start_node(code("350000")).await?;
    let all = read_all(&fed, &consumer, &sub.id, PERSONS + 20).await?;
    assert_consecutive(0, &all.items)?;
    let changes: Vec<&str> = all.items[PERSONS..]
        .iter()
        .filter_map(|i| upsert_value(i, "household_no"))
        .collect();
    let expected: Vec<String> = (0..20)
        .map(|i| {
            if i < 5 {
                format!("OUTAGE-{i}")
            } else {
                format!("KILL-{i}")
            }
        })
        .collect();
    assert_eq!(changes, expected, "each change once, in order");
    // Nothing more arrives than was changed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = read_all(&fed, &consumer, &sub.id, PERSONS + 20).await?;
    assert_eq!(again.items.len(), PERSONS + 20);
    let mut c = fed.client(&consumer).await?;
    let listed = c
        .list_subscriptions(ListSubscriptionsRequest::default())
        .await?
        .into_inner()
        .subscriptions;
    assert_eq!(listed[0].received_seq, PERSONS as u64 + 20);
    fed.shutdown().await
}

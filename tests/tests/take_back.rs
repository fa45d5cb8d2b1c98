//! The parent's side of a recovery, over an in-process federation: `Federation.TakeBack` answers a child only
//! what the parent holds of the child's own (identity from the certificate, bounded pages, refusals audited);
//! records a child sends again that the parent holds are skipped while its cursor advances, and another record
//! under a held sequence number is refused as a fork; and a child whose parent holds a record of its chain that
//! the child lacks takes it back when it joins, then goes on after it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fedgate_gateway::audit::record_hash;
use fedgate_gateway::grant::{Domain, GrantKey};
use fedgate_gateway::ident::Peer;
use fedgate_gateway::store::{SqliteStore, Store};
use fedgate_proto::v1::{
    AuditOperation, AuditRecord, PushRequest, Stream, StreamItem, TakeBackRequest, stream_item,
};
use fedgate_tests::rogue::assert_audited;
use fedgate_tests::{code, eventually, federation_client, key_at, query, standard};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

fn take_back(stream: Stream, after_seq: u64, after_id: &str, limit: u32) -> TakeBackRequest {
    TakeBackRequest {
        stream: stream as i32,
        after_seq,
        after_id: after_id.to_owned(),
        limit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_back_answers_a_child_only_its_own_chain_and_entries() -> Result<()> {
    let net = standard().await?;
    let city = net.node(code("350100"))?.store().clone();
    let gulou = net.node(code("350102"))?.store().clone();
    eventually("the city holds records of 350102", WAIT, || async {
        Ok(city.audit_chain("350102", 0, 10).await?.len() >= 3)
    })
    .await?;

    let as_gulou = net.ca().issue(&Peer::Node(code("350102")), &[])?;
    let mut client = federation_client(&net, "350100", &as_gulou).await?;
    let page = client
        .take_back(take_back(Stream::Audit, 0, "", 2))
        .await?
        .into_inner();
    assert!(page.more && page.entries.is_empty());
    assert_eq!(page.records, gulou.audit_chain("350102", 0, 2).await?);
    let next = client
        .take_back(take_back(Stream::Audit, 2, "", 0))
        .await?
        .into_inner();
    assert!(next.records.iter().all(|r| r.node_code == "350102"));
    assert_eq!(next.records.first().map(|r| r.seq), Some(3));

    let entries = client
        .take_back(take_back(Stream::Catalog, 0, "", 0))
        .await?
        .into_inner();
    let ids: Vec<&str> = entries
        .entries
        .iter()
        .filter_map(|e| e.entry.as_ref().map(|e| e.id.as_str()))
        .collect();
    ensure!(!ids.is_empty(), "the city holds entries of 350102");
    assert!(ids.iter().all(|id| id.starts_with("350102:")), "{ids:?}");
    assert!(!entries.more);
    let held = city.own_entries("350102", "", 100).await?;
    assert_eq!(ids.len(), held.len());

    // Bad pages are refused for what is wrong, and recorded.
    for (req, needle) in [
        (take_back(Stream::Audit, 0, "", 1001), "limit"),
        (
            take_back(Stream::Catalog, 0, "350103:household", 0),
            "after_id",
        ),
        (
            take_back(Stream::Audit, 0, "350102:household", 0),
            "after_id",
        ),
        (take_back(Stream::Catalog, 5, "", 0), "after_seq"),
        (take_back(Stream::Unspecified, 0, "", 0), "stream"),
    ] {
        let err = client.take_back(req).await.expect_err(needle);
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().starts_with(needle), "{}", err.message());
    }
    assert_audited(
        &net,
        "350100",
        "INVALID_ARGUMENT",
        "Federation.TakeBack: limit",
    )
    .await?;

    // Only a child takes back, and only its own: a sibling of the city and the city's parent are refused.
    for (node, who) in [
        ("350200", "not the parent or a child"),
        ("350000", "not a child"),
    ] {
        let cert = net.ca().issue(&Peer::Node(code(node)), &[])?;
        let mut other = federation_client(&net, "350100", &cert).await?;
        let err = other
            .take_back(take_back(Stream::Audit, 0, "", 0))
            .await
            .expect_err(node);
        assert_eq!(err.code(), Code::PermissionDenied, "{node}");
        assert!(err.message().contains(who), "{}", err.message());
        assert_audited(&net, "350100", "PERMISSION_DENIED", &format!("{node} is")).await?;
    }
    net.shutdown().await
}

/// `node`'s audit record `seq` after `prev`, signed with `key`.
fn chained(node: &str, seq: u64, prev: &[u8], detail: &str, key: &GrantKey) -> AuditRecord {
    let mut r =
        fedgate_gateway::audit::event(AuditOperation::Admin, format!("urn:fedgate:node:{node}"));
    r.node_code = node.to_owned();
    r.seq = seq;
    r.prev_hash = prev.to_vec();
    r.detail = detail.to_owned();
    r.hash = record_hash(&r).to_vec();
    r.signature = key.sign_bytes(Domain::AuditBatch, &r.hash).to_vec();
    r
}

fn push(items: Vec<(u64, AuditRecord)>) -> PushRequest {
    PushRequest {
        stream: Stream::Audit as i32,
        items: items
            .into_iter()
            .map(|(seq, r)| StreamItem {
                seq,
                body: Some(stream_item::Body::Audit(r)),
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_again_are_skipped_a_fork_is_refused_and_a_child_takes_back_what_it_lacks()
-> Result<()> {
    let mut net = standard().await?;
    let county = code("350103");
    let city = net.node(code("350100"))?.store().clone();
    // The county's consumer shares twice: records of the county's own.
    let consumer = net.consumer_at(county)?.uscc.clone();
    let mut agency = net.client(&consumer).await?;
    for i in 0..2 {
        let key = key_at(&net, "350100", i)?;
        agency
            .share(query("350100:household", &key, &["name"]))
            .await?;
    }
    let county_store = net.node(county)?.store().clone();
    eventually("the city holds every record of 350103", WAIT, || async {
        let own = county_store.audit_chain("350103", 0, 1000).await?;
        Ok(!own.is_empty() && city.audit_chain("350103", 0, 1000).await? == own)
    })
    .await?;
    net.stop_node(county).await?;
    let config = net.node_config(county)?.clone();
    let key = GrantKey::load_or_create(&config.signing_key_path().context("key path")?)?;
    let db = match &config.storage {
        fedgate_gateway::config::StorageConfig::Sqlite { path, .. } => path.clone(),
        other => anyhow::bail!("unexpected storage {other:?}"),
    };
    let stopped = SqliteStore::open(&db).await?;
    let chain = stopped.audit_chain("350103", 0, 1000).await?;
    stopped.close().await;
    let held_at_city = city.audit_chain("350103", 0, 1000).await?;
    assert_eq!(held_at_city, chain, "the city holds the county's chain");
    let head = chain.last().context("a chain")?.clone();

    // As the county: its first two records again, at positions after the city's cursor.
    let cert = net.ca().issue(&Peer::Node(county), &[])?;
    let mut client = federation_client(&net, "350100", &cert).await?;
    let cursor = city.cursor("350103", Stream::Audit).await?;
    let before = city.audit_count().await?;
    let duplicates = net
        .node(code("350100"))?
        .metrics()
        .audit_items_duplicate
        .get();
    let applied = client
        .push(push(vec![
            (cursor + 1, chain[0].clone()),
            (cursor + 2, chain[1].clone()),
        ]))
        .await?
        .into_inner()
        .applied_seq;
    assert_eq!(
        applied,
        cursor + 2,
        "the cursor advances over records sent again"
    );
    assert_eq!(city.audit_count().await?, before, "nothing is stored twice");
    assert_eq!(
        net.node(code("350100"))?
            .metrics()
            .audit_items_duplicate
            .get(),
        duplicates + 2
    );

    // Another record under a sequence number the city holds: a fork.
    let fork = chained("350103", head.seq, &head.prev_hash, "a forged past", &key);
    let err = client
        .push(push(vec![(cursor + 3, fork)]))
        .await
        .expect_err("a fork");
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("forks"), "{}", err.message());
    assert_audited(&net, "350100", "DATA_LOSS", "forks").await?;
    assert_eq!(city.cursor("350103", Stream::Audit).await?, cursor + 2);

    // Records past a gap, as a county that does not know the city restarted from an older state sends them: a
    // request to resend from the cursor.
    let ahead = chained("350103", head.seq + 5, &head.hash, "ahead", &key);
    let err = client
        .push(push(vec![(cursor + 7, ahead)]))
        .await
        .expect_err("a gap");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains(&format!("resend from {}", cursor + 3)),
        "{}",
        err.message()
    );

    // A record continuing the chain, which the county itself never stored (as if it lost it afterwards).
    let lost = chained(
        "350103",
        head.seq + 1,
        &head.hash,
        "lost by the county",
        &key,
    );
    client.push(push(vec![(cursor + 3, lost.clone())])).await?;
    assert_eq!(city.audit_head("350103").await?.as_ref(), Some(&lost));

    // The county starts again: the city holds more of its chain than it does, so it takes that back at Join,
    // and its own records follow it.
    net.restart_node(county).await?;
    let store = net.node(county)?.store().clone();
    eventually("the county holds the record it lacked", WAIT, || async {
        let chain = store.audit_chain("350103", head.seq, 10).await?;
        Ok(chain.first() == Some(&lost))
    })
    .await?;
    eventually("the county's recovery reaches the city", WAIT, || async {
        let mine = store.audit_chain("350103", 0, 10_000).await?;
        let there = city.audit_chain("350103", 0, 10_000).await?;
        Ok(mine.len() > chain.len() + 1 && there == mine)
    })
    .await?;
    let mine = store.audit_chain("350103", 0, 10_000).await?;
    let mut v = fedgate_gateway::audit::ChainVerifier::new("350103", None);
    for r in &mine {
        v.push(r)?;
    }
    ensure!(
        mine.iter()
            .any(|r| r.operation == AuditOperation::Recovery as i32),
        "the county's chain records the recovery"
    );
    let recovered = net
        .node(county)?
        .metrics()
        .uplink_recoveries
        .get_or_create(&[("stream", "audit")])
        .get();
    assert_eq!(recovered, 1);
    net.shutdown().await
}

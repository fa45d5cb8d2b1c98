//! Batch publication over real nodes, and the province, which has no parent, keeping no catalog outbox.

use std::time::Duration;

use anyhow::{Context, Result};
use fedgate_proto::v1::{
    AuditOperation, CatalogEntry, GetEntryRequest, PublishBatchRequest, SearchCatalogRequest,
    Stream,
};
use fedgate_tests::{code, eventually, own_audit_records, standard};
use tonic::Code;

fn entries(template: &CatalogEntry, names: &[&str]) -> Vec<CatalogEntry> {
    names
        .iter()
        .map(|n| CatalogEntry {
            id: (*n).to_owned(),
            title: format!("婚姻登记 batch {n}"),
            version: 0,
            ..template.clone()
        })
        .collect()
}

fn publications(
    records: &[fedgate_proto::v1::AuditRecord],
) -> Vec<&fedgate_proto::v1::AuditRecord> {
    records
        .iter()
        .filter(|r| r.operation == AuditOperation::CatalogPublish as i32)
        .collect()
}

#[tokio::test]
async fn a_batch_is_stored_whole_audited_per_entry_and_reaches_the_province() -> Result<()> {
    let net = standard().await?;
    let gulou = code("350102");
    let province = code("350000");
    let provider = net.provider_at(gulou)?;
    let mut client = net.client(&provider.uscc).await?;
    let template = provider.published[0].clone();
    let before = publications(&own_audit_records(&net, "350102").await?).len();
    let at_province = net.catalog_size(province).await?;

    let stored = client
        .publish_batch(PublishBatchRequest {
            entries: entries(&template, &["b1", "b2", "b3"]),
        })
        .await?
        .into_inner()
        .entries;
    let ids: Vec<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["350102:b1", "350102:b2", "350102:b3"]);
    assert!(
        stored
            .iter()
            .all(|e| e.version == 1 && e.node_code == "350102")
    );

    // One record per entry, as single publications write.
    let records = own_audit_records(&net, "350102").await?;
    let published = publications(&records);
    assert_eq!(published.len(), before + 3);
    let new: Vec<(&str, &str, &str)> = published[before..]
        .iter()
        .map(|r| {
            (
                r.resource_id.as_str(),
                r.outcome.as_str(),
                r.detail.as_str(),
            )
        })
        .collect();
    assert_eq!(
        new,
        [
            ("350102:b1", "OK", "version 1"),
            ("350102:b2", "OK", "version 1"),
            ("350102:b3", "OK", "version 1")
        ]
    );

    net.wait_for_catalog(province, at_province + 3, Duration::from_secs(10))
        .await?;
    let found = net
        .client(&net.consumer_at(province)?.uscc)
        .await?
        .search_catalog(SearchCatalogRequest {
            text: "婚姻 batch".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .entries;
    let mut found: Vec<&str> = found.iter().map(|e| e.id.as_str()).collect();
    found.sort();
    assert_eq!(found, ["350102:b1", "350102:b2", "350102:b3"]);

    // The province has no parent: it applied every change of the province and queued none of them.
    let province_node = net.node(province)?;
    assert_eq!(province_node.store().outbox_head(Stream::Catalog).await?, 0);
    assert_eq!(province_node.uplink_lag(Stream::Catalog).await?, 0);
    eventually(
        "Fuzhou's outbox is acknowledged",
        Duration::from_secs(10),
        || async {
            Ok(net
                .node(code("350100"))?
                .uplink_lag(Stream::Catalog)
                .await?
                == 0)
        },
    )
    .await?;
    assert!(
        net.node(code("350100"))?
            .store()
            .outbox_head(Stream::Catalog)
            .await?
            > 0,
        "a node under a parent keeps its outbox"
    );
    net.shutdown().await
}

#[tokio::test]
async fn a_refused_batch_stores_nothing_and_names_the_entry() -> Result<()> {
    let net = standard().await?;
    let gulou = code("350102");
    let provider = net.provider_at(gulou)?;
    let mut client = net.client(&provider.uscc).await?;
    let template = provider.published[0].clone();
    let foreign = net.provider_at(code("350100"))?.published[0].clone();

    let get = |id: &str| GetEntryRequest { id: id.to_owned() };
    let mut untitled = entries(&template, &["ok1", "bad", "ok2"]);
    untitled[1].title = " ".into();
    let mut too_long = entries(&template, &["ok1", "ok2", "long"]);
    too_long[2].title = "x".repeat(10_000);
    let mut twice = entries(&template, &["ok1", "ok2", "ok1"]);
    twice[2].summary = "again".into();
    let mut elsewhere = entries(&template, &["ok1", "ok2"]);
    elsewhere[1].id = foreign.id.clone();
    let mut someone_elses = entries(&template, &["ok1", "ok2"]);
    someone_elses[0].provider_uscc = net.consumer_at(gulou)?.uscc.to_string();
    let names: Vec<String> = (0..1001).map(|i| format!("e{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let over = entries(&template, &names);
    let cases: Vec<(Vec<CatalogEntry>, Code, &[&str])> = vec![
        (
            untitled,
            Code::InvalidArgument,
            &["entries[1]", "entry.title"],
        ),
        (
            too_long,
            Code::InvalidArgument,
            &["entries[2]", "entry.title", "limits.max_title_chars"],
        ),
        (
            twice,
            Code::InvalidArgument,
            &["entries[2].id", "entries[0].id"],
        ),
        (
            elsewhere,
            Code::InvalidArgument,
            &["entries[1]", "entry.id"],
        ),
        (
            someone_elses,
            Code::PermissionDenied,
            &["entries[0]", "entry.provider_uscc"],
        ),
        (
            over,
            Code::InvalidArgument,
            &["entries", "limits.max_batch_entries"],
        ),
        (Vec::new(), Code::InvalidArgument, &["entries"]),
    ];
    for (batch, code_expected, words) in cases {
        let before = own_audit_records(&net, "350102").await?.len();
        let err = client
            .publish_batch(PublishBatchRequest { entries: batch })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code_expected, "{}", err.message());
        for w in words {
            assert!(err.message().contains(w), "{w} in {:?}", err.message());
        }
        let status = client
            .get_entry(get("350102:ok1"))
            .await
            .expect_err("nothing stored");
        assert_eq!(status.code(), Code::NotFound);
        // The refusal is audited at the node, with its code.
        let records = own_audit_records(&net, "350102").await?;
        let last = records.last().context("a record")?;
        assert!(records.len() > before, "{}", err.message());
        assert_eq!(
            last.outcome,
            fedgate_gateway::audit::outcome(code_expected),
            "{:?}",
            last.detail
        );
        assert!(
            last.operation == AuditOperation::CatalogPublish as i32
                || last.operation == AuditOperation::AuthRefused as i32
                || last.detail.contains("PublishBatch"),
            "{last:?}"
        );
    }

    // Registering an entry another agency provides is refused whole, naming it.
    let mut takeover = entries(&template, &["ok1", "ok2"]);
    let consumer = net.consumer_at(gulou)?.uscc.clone();
    let mut theirs = net.client(&consumer).await?;
    let own = theirs
        .publish_batch(PublishBatchRequest {
            entries: entries(&template, &["theirs"])
                .into_iter()
                .map(|e| CatalogEntry {
                    provider_uscc: String::new(),
                    ..e
                })
                .collect(),
        })
        .await?
        .into_inner()
        .entries;
    takeover[1].id = own[0].id.clone();
    let err = client
        .publish_batch(PublishBatchRequest { entries: takeover })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("entries[1]"), "{}", err.message());
    assert_eq!(
        client
            .get_entry(get("350102:ok1"))
            .await
            .expect_err("none")
            .code(),
        Code::NotFound
    );
    net.shutdown().await
}

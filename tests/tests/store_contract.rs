//! The contract of `Store`, run against every backend: each scenario is an async fn over `Arc<dyn Store>`, and
//! [`contract!`] turns it into one test on a fresh SQLite file and one on a fresh PostgreSQL database (skipped,
//! passing, when `FEDGATE_TEST_POSTGRES` is unset; failing when `FEDGATE_REQUIRE_POSTGRES=1` and it is).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail, ensure};
use fedgate_gateway::catalog::terms;
use fedgate_gateway::store::OperationQuery;
use fedgate_gateway::store::{
    AuditQuery, AuditRecovery, CatalogHit, CatalogQuery, CatalogRecovery, Doc, DocKind, DocQuery,
    FlowSide, OutboxItem, PgStore, Recovered, SqliteStore, Store, StoreError, StoredEntry,
    UplinkMark, Upstream,
};
use fedgate_proto::v1::OperationRecord;
use fedgate_proto::v1::{
    AuditRecord, CatalogChange, CatalogEntry, ShareType, Stream, Withdrawal, catalog_change,
};
use fedgate_tests::postgres::scratch_database;
use prost::Message;

/// Runs `scenario` on a new SQLite store in a temporary directory.
async fn on_sqlite<F, Fut>(scenario: F) -> Result<()>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open(&dir.path().join("contract.db")).await?);
    let result = scenario(store.clone()).await;
    store.close().await;
    result
}

/// Runs `scenario` on a new PostgreSQL store in a scratch database, dropped afterwards (also when the scenario
/// panics: it runs as a task of its own).
async fn on_postgres<F, Fut>(scenario: F) -> Result<()>
where
    F: FnOnce(Arc<dyn Store>) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    let store = match PgStore::connect(&db.url).await {
        Ok(store) => Arc::new(store),
        Err(e) => {
            db.drop_database().await?;
            return Err(e).context("connecting the PostgreSQL store");
        }
    };
    let result = tokio::spawn(scenario(store.clone())).await;
    store.close().await;
    db.drop_database().await?;
    match result {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(e.into()),
    }
}

/// One test per backend for each scenario.
macro_rules! contract {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::on_sqlite(super::$scenario).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::on_postgres(super::$scenario).await
                }
            )*
        }
    };
}

contract!(
    catalog_versions_withdrawals_and_outbox,
    catalog_search_filters_and_pagination,
    catalog_search_pages_through_candidates_the_index_over_matches,
    catalog_search_long_prefixes_match_every_word_they_start,
    catalog_batches_publish_in_one_step,
    a_root_keeps_no_catalog_outbox,
    child_catalog_cursor_gap_and_idempotence,
    uplink_ack_only_grows,
    leases_go_to_one_holder_at_a_time,
    audit_append_head_chain_and_positions,
    a_late_signature_replaces_only_its_record,
    appending_at_the_head_serializes_writers_of_a_chain,
    audit_query_filters_and_pagination,
    child_audit_cursor_gap_and_idempotence,
    audit_archival_and_deletion,
    governance_docs_and_id_counters,
    governance_docs_are_read_in_keyset_pages,
    node_keys_are_pinned_on_first_sight,
    served_nodes_are_kept_until_their_answers_expire,
    concurrent_writers_commit_in_position_order,
    marks_of_unconfirmed_runs_are_kept_until_removed,
    a_recovered_audit_stream_takes_back_rechains_and_moves,
    a_recovered_stream_continues_after_the_parents_cursor,
    a_recovered_catalog_takes_back_and_publishes_again_above_the_parent,
    positions_close_up_after_a_parent_lost_what_it_acknowledged,
    own_entries_are_listed_by_id_withdrawn_ones_too,
    flow_outbox_appends_after_its_head_with_its_state_and_snapshot,
    flow_inbox_stores_each_item_once_and_stops_at_a_gap,
    operational_records_filter_page_and_purge,
);

// ---------------------------------------------------------------------------------------------------------------
// Helpers

fn entry(id: &str, title: &str, summary: &str, class: &[&str], share: ShareType) -> CatalogEntry {
    let node = id.split(':').next().unwrap_or_default();
    CatalogEntry {
        id: id.to_owned(),
        title: title.to_owned(),
        summary: summary.to_owned(),
        provider_uscc: format!("P{node}"),
        node_code: node.to_owned(),
        classification: class.iter().map(|c| (*c).to_owned()).collect(),
        format: "table".into(),
        share_type: share as i32,
        ..Default::default()
    }
}

fn upsert(e: &CatalogEntry) -> CatalogChange {
    CatalogChange {
        change: Some(catalog_change::Change::Upsert(e.clone())),
    }
}

fn withdrawal(id: &str, version: u64) -> CatalogChange {
    CatalogChange {
        change: Some(catalog_change::Change::Withdraw(Withdrawal {
            id: id.to_owned(),
            version,
        })),
    }
}

fn with_version(e: &CatalogEntry, version: u64) -> CatalogEntry {
    CatalogEntry {
        version,
        ..e.clone()
    }
}

fn rec(node: &str, seq: u64, time_ns: i64) -> AuditRecord {
    AuditRecord {
        node_code: node.to_owned(),
        seq,
        time_unix_nanos: time_ns,
        operation: 3,
        actor: format!("urn:fedgate:node:{node}"),
        outcome: "OK".into(),
        request_id: format!("{node}-{seq}"),
        route: vec![node.to_owned()],
        prev_hash: vec![seq as u8; 32],
        hash: vec![!(seq as u8); 32],
        ..Default::default()
    }
}

fn ids(hits: &[CatalogHit]) -> Vec<&str> {
    hits.iter().map(|h| h.entry.id.as_str()).collect()
}

fn seqs(items: &[OutboxItem]) -> Vec<u64> {
    items.iter().map(|i| i.seq).collect()
}

fn changes(items: &[OutboxItem]) -> Result<Vec<CatalogChange>> {
    items
        .iter()
        .map(|i| Ok(CatalogChange::decode(i.payload.as_slice())?))
        .collect()
}

fn records(items: &[OutboxItem]) -> Result<Vec<AuditRecord>> {
    items
        .iter()
        .map(|i| Ok(AuditRecord::decode(i.payload.as_slice())?))
        .collect()
}

/// (node, seq) of positioned records.
fn chain_ids(rows: &[(u64, AuditRecord)]) -> Vec<(String, u64)> {
    rows.iter()
        .map(|(_, r)| (r.node_code.clone(), r.seq))
        .collect()
}

fn positions(rows: &[(u64, AuditRecord)]) -> Vec<u64> {
    rows.iter().map(|(p, _)| *p).collect()
}

fn expect_gap<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    child: &str,
    expected: u64,
    got: u64,
) -> Result<()> {
    match result {
        Err(StoreError::Gap {
            child: c,
            expected: e,
            got: g,
        }) if c == child && e == expected && g == got => Ok(()),
        other => bail!("expected a gap {child} {expected}->{got}, got {other:?}"),
    }
}

async fn all_live(store: &dyn Store) -> Result<Vec<CatalogEntry>> {
    Ok(store
        .search(&CatalogQuery {
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_iter()
        .map(|h| h.entry)
        .collect())
}

// ---------------------------------------------------------------------------------------------------------------
// Catalog

async fn catalog_versions_withdrawals_and_outbox(store: Arc<dyn Store>) -> Result<()> {
    assert_eq!(store.count_entries().await?, 0);
    assert!(store.entry("350102:household").await?.is_none());
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 0);
    assert!(store.outbox_after(Stream::Catalog, 0, 10).await?.is_empty());

    // The store numbers versions itself, whatever the caller put in.
    let mut e = entry(
        "350102:household",
        "Household register",
        "Residents",
        &["civil-affairs", "household"],
        ShareType::Unconditional,
    );
    e.version = 99;
    let v1 = store.publish_local(e.clone(), Upstream::Parent).await?;
    assert_eq!(v1, with_version(&e, 1));
    let stored = store.entry(&e.id).await?.context("stored")?;
    assert_eq!(stored.entry, v1);
    assert!(!stored.withdrawn);
    assert_eq!(store.count_entries().await?, 1);
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 1);

    e.title = "Household register (户籍)".into();
    let v2 = store.publish_local(e.clone(), Upstream::Parent).await?;
    assert_eq!(v2.version, 2);
    assert_eq!(store.entry(&e.id).await?.context("stored")?.entry, v2);

    assert_eq!(
        store.withdraw_local(&e.id, Upstream::Parent).await?,
        Some(3)
    );
    let stored = store.entry(&e.id).await?.context("stored")?;
    assert!(stored.withdrawn);
    assert_eq!(
        stored.entry, v2,
        "a withdrawal keeps the last published body"
    );
    assert_eq!(store.count_entries().await?, 0);
    assert!(all_live(store.as_ref()).await?.is_empty());

    assert_eq!(
        store
            .withdraw_local("350102:unknown", Upstream::Parent)
            .await?,
        None
    );
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 3);

    // Publishing again continues after the withdrawal's version.
    let v4 = store.publish_local(e.clone(), Upstream::Parent).await?;
    assert_eq!(v4.version, 4);
    let stored = store.entry(&e.id).await?.context("stored")?;
    assert!(!stored.withdrawn);
    assert_eq!(stored.entry, v4);
    assert_eq!(store.count_entries().await?, 1);

    let all = store.outbox_after(Stream::Catalog, 0, 100).await?;
    assert_eq!(seqs(&all), vec![1, 2, 3, 4]);
    assert_eq!(
        changes(&all)?,
        vec![upsert(&v1), upsert(&v2), withdrawal(&e.id, 3), upsert(&v4)]
    );
    let page = store.outbox_after(Stream::Catalog, 1, 2).await?;
    assert_eq!(seqs(&page), vec![2, 3]);
    assert_eq!(page, all[1..3].to_vec());
    assert!(store.outbox_after(Stream::Catalog, 4, 10).await?.is_empty());
    assert!(store.outbox_after(Stream::Catalog, 0, 0).await?.is_empty());
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 4);

    // The catalog stream is not the audit stream.
    assert_eq!(store.outbox_head(Stream::Audit).await?, 0);
    assert!(store.outbox_after(Stream::Audit, 0, 10).await?.is_empty());
    assert_eq!(store.outbox_head(Stream::Unspecified).await?, 0);
    Ok(())
}

/// A prefix longer than the index's own prefix lists matches every word starting with it, whether few or many
/// words do, and only while an entry holding one is live.
async fn catalog_search_long_prefixes_match_every_word_they_start(
    store: Arc<dyn Store>,
) -> Result<()> {
    let mut want = Vec::new();
    for n in 0..80 {
        let id = format!("350102:w{n:02}");
        let title = format!("Wordfamily{n} registry");
        store
            .publish_local(
                entry(&id, &title, "", &["misc"], ShareType::Conditional),
                Upstream::Parent,
            )
            .await?;
        want.push(id);
    }
    store
        .publish_local(
            entry(
                "350102:gone",
                "Wordfamilygone",
                "",
                &["misc"],
                ShareType::Conditional,
            ),
            Upstream::Parent,
        )
        .await?;
    store
        .withdraw_local("350102:gone", Upstream::Parent)
        .await?;
    let search = |t: &str| {
        let q = CatalogQuery {
            terms: terms(t),
            limit: 200,
            ..Default::default()
        };
        let store = store.clone();
        async move {
            Ok::<_, anyhow::Error>(
                ids(&store.search(&q).await?)
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(
        search("wordfamily").await?,
        want,
        "more words than are looked up one by one"
    );
    assert_eq!(search("registry wordfam").await?, want);
    assert_eq!(
        search("wordfamily7").await?,
        [
            "350102:w07",
            "350102:w70",
            "350102:w71",
            "350102:w72",
            "350102:w73",
            "350102:w74",
            "350102:w75",
            "350102:w76",
            "350102:w77",
            "350102:w78",
            "350102:w79"
        ]
    );
    assert_eq!(search("registry wordfamily12").await?, ["350102:w12"]);
    assert_eq!(search("wordfamily12 ").await?, ["350102:w12"]);
    assert!(
        search("wordfamily registry").await?.is_empty(),
        "a completed word is whole"
    );
    assert!(search("wordfamilyg").await?.is_empty(), "withdrawn");
    assert!(search("wordfamilyx").await?.is_empty());
    Ok(())
}

async fn catalog_search_filters_and_pagination(store: Arc<dyn Store>) -> Result<()> {
    use ShareType::{Conditional, NotShared, Unconditional};
    let entries = [
        entry(
            "350102:household",
            "Household Register",
            "Residents of Gulou",
            &["civil-affairs", "household"],
            Unconditional,
        ),
        entry(
            "350102:marriage",
            "Marriage records",
            "Marriages registered in Gulou",
            &["civil-affairs", "marriage"],
            Conditional,
        ),
        entry(
            "350103:births",
            "Birth certificates",
            "Medical birth certificates",
            &["health"],
            NotShared,
        ),
        entry(
            "350203:household",
            "HOUSEHOLD register",
            "Residents of Xiamen",
            &["civil-affairs"],
            Unconditional,
        ),
        entry(
            "351000:permits",
            "Ärzte permits",
            "Licensed physicians",
            &["civil-affairs-extra", "permits"],
            Unconditional,
        ),
        // A classification path of multi-byte characters: prefixes are compared in characters.
        entry(
            "350103:hukou",
            "户籍人口",
            "常住人口",
            &["户籍", "人口"],
            Conditional,
        ),
        entry(
            "350104:marriage-cn",
            "婚姻登记信息",
            "民政局婚姻登记",
            &["民政"],
            Conditional,
        ),
        // Holds every bigram of 户籍人口 but not the run itself.
        entry("350104:split", "户籍 籍人 人口", "", &["民政"], Conditional),
        entry(
            "350104:mixed",
            "户籍Household证明",
            "",
            &["民政"],
            Conditional,
        ),
        entry("350102:Zeta", "zeta", "", &["misc"], Conditional),
        entry("350102:a-b", "dash", "", &["misc"], Conditional),
        entry("350102:a.b", "dot", "", &["misc"], Conditional),
        entry("350102:a_b", "underscore", "", &["misc"], Conditional),
        entry(
            "350102:old",
            "Old household list",
            "",
            &["civil-affairs"],
            Unconditional,
        ),
    ];
    for e in &entries {
        store.publish_local(e.clone(), Upstream::Parent).await?;
    }
    assert_eq!(
        store.withdraw_local("350102:old", Upstream::Parent).await?,
        Some(2)
    );
    assert_eq!(store.count_entries().await?, 13);

    let search = |q: CatalogQuery| {
        let store = store.clone();
        async move {
            let q = CatalogQuery {
                limit: if q.limit == 0 { 100 } else { q.limit },
                ..q
            };
            Ok::<_, anyhow::Error>(
                ids(&store.search(&q).await?)
                    .into_iter()
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            )
        }
    };
    let text = |t: &str| CatalogQuery {
        terms: terms(t),
        ..Default::default()
    };

    // No filter: every live entry, in the order entries reached the store.
    let everything = search(CatalogQuery::default()).await?;
    let expected: Vec<String> = entries
        .iter()
        .map(|e| e.id.clone())
        .filter(|id| id != "350102:old")
        .collect();
    assert_eq!(everything, expected);
    let full = all_live(store.as_ref()).await?;
    for e in &full {
        let stored = store.entry(&e.id).await?.context("stored")?;
        assert_eq!(&stored.entry, e);
    }

    // Words: a completed query word matches that word of title or summary, the word the text ends in (still
    // being typed) any word that starts with it; letters folded to lower case; withdrawn entries never.
    assert_eq!(
        search(text("household")).await?,
        ["350102:household", "350203:household", "350104:mixed"]
    );
    assert_eq!(
        search(text("household xiamen")).await?,
        ["350203:household"]
    );
    assert_eq!(
        search(text("gulou regist")).await?,
        ["350102:household", "350102:marriage"],
        "the last word matches as it is typed"
    );
    assert!(
        search(text("regist gulou")).await?.is_empty(),
        "a completed word matches a whole word only"
    );
    assert_eq!(
        search(text("gulou register")).await?,
        ["350102:household", "350102:marriage"]
    );
    assert_eq!(
        search(text("gulou register ")).await?,
        ["350102:household"],
        "a word followed by a space is completed"
    );
    assert_eq!(search(text("register, gulou")).await?, ["350102:household"]);
    assert_eq!(search(text("marriage.")).await?, ["350102:marriage"]);
    assert!(search(text("marriag ")).await?.is_empty());
    assert!(search(text("house 户籍")).await?.is_empty());
    assert_eq!(search(text("household户籍")).await?, ["350104:mixed"]);
    assert_eq!(
        search(text("register residents")).await?,
        ["350102:household", "350203:household"],
        "title and summary are searched as one text"
    );
    assert_eq!(search(text("ÄRZTE Permits")).await?, ["351000:permits"]);
    assert_eq!(search(text("ärz")).await?, ["351000:permits"]);
    assert!(
        search(text("ouse")).await?.is_empty(),
        "the inside of a word is no match"
    );
    assert!(search(text("rzte")).await?.is_empty());
    assert!(search(text("household nowhere")).await?.is_empty());
    assert!(search(text("old")).await?.is_empty(), "withdrawn");
    assert_eq!(search(text("")).await?, everything);

    // Chinese: one character, two-character words as they are typed, longer runs exactly.
    assert_eq!(
        search(text("户籍")).await?,
        ["350103:hukou", "350104:split", "350104:mixed"]
    );
    assert_eq!(
        search(text("户")).await?,
        ["350103:hukou", "350104:split", "350104:mixed"]
    );
    assert_eq!(search(text("婚姻")).await?, ["350104:marriage-cn"]);
    assert_eq!(search(text("婚")).await?, ["350104:marriage-cn"]);
    assert_eq!(search(text("登记信息")).await?, ["350104:marriage-cn"]);
    assert_eq!(
        search(text("人口")).await?,
        ["350103:hukou", "350104:split"]
    );
    assert_eq!(
        search(text("户籍人口")).await?,
        ["350103:hukou"],
        "an entry holding only the run's bigrams does not match"
    );
    assert_eq!(search(text("籍人口")).await?, ["350103:hukou"]);
    assert!(search(text("婚姻户籍")).await?.is_empty());
    // Mixed scripts: each run of a script is a term, and every term must match.
    assert_eq!(search(text("户籍household")).await?, ["350104:mixed"]);
    assert_eq!(search(text("证明 house")).await?, ["350104:mixed"]);
    assert!(search(text("户籍 marriage")).await?.is_empty());

    // Provider.
    assert_eq!(
        search(CatalogQuery {
            provider_uscc: Some("P350103".into()),
            ..Default::default()
        })
        .await?,
        ["350103:births", "350103:hukou"]
    );
    assert!(
        search(CatalogQuery {
            provider_uscc: Some("p350103".into()),
            ..Default::default()
        })
        .await?
        .is_empty()
    );

    // Classification: the path itself or anything below it, never a sibling sharing a prefix.
    let class = |c: &[&str]| CatalogQuery {
        classification: c.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    };
    assert_eq!(
        search(class(&["civil-affairs"])).await?,
        ["350102:household", "350102:marriage", "350203:household"]
    );
    assert_eq!(
        search(class(&["civil-affairs", "household"])).await?,
        ["350102:household"]
    );
    assert_eq!(
        search(class(&["civil-affairs-extra"])).await?,
        ["351000:permits"]
    );
    assert_eq!(search(class(&["户籍"])).await?, ["350103:hukou"]);
    assert_eq!(search(class(&["户籍", "人口"])).await?, ["350103:hukou"]);
    assert!(search(class(&["户"])).await?.is_empty());
    assert!(search(class(&["civil"])).await?.is_empty());
    assert!(search(class(&["Civil-affairs"])).await?.is_empty());

    // Share type.
    assert_eq!(
        search(CatalogQuery {
            share_type: Some(NotShared),
            ..Default::default()
        })
        .await?,
        ["350103:births"]
    );
    assert_eq!(
        search(CatalogQuery {
            share_type: Some(Unconditional),
            ..Default::default()
        })
        .await?,
        ["350102:household", "350203:household", "351000:permits"]
    );

    // Node prefix: province, city, county.
    let prefix = |p: &str| CatalogQuery {
        node_prefix: Some(p.to_owned()),
        ..Default::default()
    };
    assert_eq!(search(prefix("35")).await?, everything);
    assert_eq!(search(prefix("3502")).await?, ["350203:household"]);
    assert_eq!(
        search(prefix("350103")).await?,
        ["350103:births", "350103:hukou"]
    );
    assert_eq!(search(prefix("351")).await?, ["351000:permits"]);
    assert_eq!(search(prefix("3501")).await?.len(), 11);
    assert!(search(prefix("3503")).await?.is_empty());
    assert_eq!(search(prefix("")).await?, everything);

    // Filters combine.
    assert_eq!(
        search(CatalogQuery {
            terms: terms("household"),
            classification: vec!["civil-affairs".into()],
            share_type: Some(Unconditional),
            node_prefix: Some("3501".into()),
            provider_uscc: Some("P350102".into()),
            ..Default::default()
        })
        .await?,
        ["350102:household"]
    );
    assert_eq!(
        search(CatalogQuery {
            terms: terms("户籍"),
            node_prefix: Some("350104".into()),
            ..Default::default()
        })
        .await?,
        ["350104:split", "350104:mixed"]
    );

    // Pagination by position: each page continues after the last position of the one before.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .search(&CatalogQuery {
                after,
                limit: 2,
                ..Default::default()
            })
            .await?;
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.position);
        paged.extend(ids(&page).into_iter().map(str::to_owned));
    }
    assert_eq!(paged, everything);
    let first = store
        .search(&CatalogQuery {
            limit: 2,
            ..Default::default()
        })
        .await?;
    assert_eq!(
        search(CatalogQuery {
            after: Some(first[1].position),
            limit: 2,
            ..Default::default()
        })
        .await?,
        everything[2..4]
    );
    assert!(
        store
            .search(&CatalogQuery {
                limit: 0,
                ..Default::default()
            })
            .await?
            .is_empty()
    );

    // An entry keeps its position through withdrawal and publication again.
    let old = store
        .publish_local(entries[13].clone(), Upstream::Parent)
        .await?;
    assert_eq!(old.version, 3);
    let hits = store
        .search(&CatalogQuery {
            limit: 100,
            ..text("old")
        })
        .await?;
    assert_eq!(ids(&hits), ["350102:old"]);
    let last = store
        .search(&CatalogQuery {
            limit: 100,
            ..Default::default()
        })
        .await?;
    assert_eq!(last.last().map(|h| h.position), Some(hits[0].position));
    assert!(hits[0].position > first[1].position);
    // An update is found under its new text only.
    let mut renamed = entries[0].clone();
    renamed.title = "人口普查".into();
    store.publish_local(renamed, Upstream::Parent).await?;
    assert_eq!(
        search(text("household")).await?,
        ["350203:household", "350104:mixed", "350102:old"]
    );
    assert_eq!(search(text("人口普查 gulou")).await?, ["350102:household"]);
    Ok(())
}

async fn catalog_search_pages_through_candidates_the_index_over_matches(
    store: Arc<dyn Store>,
) -> Result<()> {
    // Decoys hold every bigram of 户籍人口 without the run; one entry in five is a true match.
    let mut batch = Vec::new();
    let mut wanted = Vec::new();
    for i in 0..50 {
        let id = format!("350102:e{i:02}");
        let title = if i % 5 == 3 {
            wanted.push(id.clone());
            format!("户籍人口 {i}")
        } else {
            format!("户籍 籍人 人口 {i}")
        };
        batch.push(entry(&id, &title, "", &["misc"], ShareType::Conditional));
    }
    let stored = store.publish_local_batch(batch, Upstream::Parent).await?;
    assert_eq!(stored.len(), 50);
    for limit in [1, 2, 3, 100] {
        let mut found = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .search(&CatalogQuery {
                    terms: terms("户籍人口"),
                    after,
                    limit,
                    ..Default::default()
                })
                .await?;
            assert!(page.len() <= limit as usize);
            let Some(last) = page.last() else { break };
            after = Some(last.position);
            found.extend(ids(&page).into_iter().map(str::to_owned));
        }
        assert_eq!(found, wanted, "pages of {limit}");
    }
    // A byte budget ends a page after the entry that exceeds it.
    let page = store
        .search(&CatalogQuery {
            terms: terms("人口"),
            limit: 100,
            max_bytes: Some(1),
            ..Default::default()
        })
        .await?;
    assert_eq!(page.len(), 1);
    Ok(())
}

async fn catalog_batches_publish_in_one_step(store: Arc<dyn Store>) -> Result<()> {
    let a = entry("350102:a", "A", "", &["misc"], ShareType::Conditional);
    let b = entry("350102:b", "B", "", &["misc"], ShareType::Conditional);
    store.publish_local(a.clone(), Upstream::Parent).await?;
    let mut a2 = a.clone();
    a2.title = "A2".into();
    let mut a3 = a.clone();
    a3.title = "A3".into();
    let stored = store
        .publish_local_batch(vec![b.clone(), a2.clone(), a3.clone()], Upstream::Parent)
        .await?;
    assert_eq!(
        stored,
        vec![
            with_version(&b, 1),
            with_version(&a2, 2),
            with_version(&a3, 3)
        ],
        "each entry under its next version, a repeated id one after the other"
    );
    assert_eq!(
        store.entry("350102:a").await?.context("a")?.entry,
        with_version(&a3, 3)
    );
    let out = store.outbox_after(Stream::Catalog, 1, 10).await?;
    assert_eq!(seqs(&out), vec![2, 3, 4]);
    assert_eq!(
        changes(&out)?,
        stored.iter().map(upsert).collect::<Vec<_>>()
    );
    assert_eq!(search_ids(&store, "a3").await?, ["350102:a"]);
    assert!(search_ids(&store, "a2").await?.is_empty());
    let mut found: Vec<String> = store
        .entries(&["350102:b".into(), "350102:a".into(), "350102:zz".into()])
        .await?
        .into_iter()
        .map(|s| s.entry.id)
        .collect();
    found.sort();
    assert_eq!(found, ["350102:a", "350102:b"]);
    assert!(
        store
            .publish_local_batch(Vec::new(), Upstream::Parent)
            .await?
            .is_empty()
    );
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 4);
    Ok(())
}

async fn search_ids(store: &Arc<dyn Store>, text: &str) -> Result<Vec<String>> {
    Ok(ids(&store
        .search(&CatalogQuery {
            terms: terms(text),
            limit: 100,
            ..Default::default()
        })
        .await?)
    .into_iter()
    .map(str::to_owned)
    .collect())
}

async fn a_root_keeps_no_catalog_outbox(store: Arc<dyn Store>) -> Result<()> {
    let a = entry("350102:a", "A", "", &["misc"], ShareType::Conditional);
    let b = entry("350103:b", "B", "", &["misc"], ShareType::Conditional);
    assert_eq!(
        store
            .publish_local(a.clone(), Upstream::Root)
            .await?
            .version,
        1
    );
    store
        .publish_local_batch(vec![a.clone(), b.clone()], Upstream::Root)
        .await?;
    assert_eq!(
        store.withdraw_local("350103:b", Upstream::Root).await?,
        Some(2)
    );
    assert_eq!(
        store
            .apply_child_catalog(
                "350100",
                &[(
                    1,
                    upsert(&with_version(
                        &entry("350101:c", "C", "", &[], ShareType::Conditional),
                        1
                    ))
                )],
                Upstream::Root,
            )
            .await?,
        1
    );
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 0);
    assert!(store.outbox_after(Stream::Catalog, 0, 10).await?.is_empty());
    assert_eq!(store.count_entries().await?, 2);
    assert_eq!(search_ids(&store, "c").await?, ["350101:c"]);

    // What was queued before (under a parent) is cleared at once; the audit log, its own outbox, never.
    store.publish_local(b.clone(), Upstream::Parent).await?;
    store.audit_append(&[rec("350000", 1, 1)]).await?;
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 1);
    assert_eq!(store.clear_outbox(Stream::Catalog).await?, 1);
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 0);
    assert_eq!(store.clear_outbox(Stream::Audit).await?, 0);
    assert_eq!(store.audit_count().await?, 1);
    assert_eq!(store.count_entries().await?, 3);
    Ok(())
}

async fn child_catalog_cursor_gap_and_idempotence(store: Arc<dyn Store>) -> Result<()> {
    let child = "350102";
    let a = with_version(
        &entry("350102:a", "Alpha", "", &["x"], ShareType::Unconditional),
        5,
    );
    let b = with_version(
        &entry("350102:b", "Beta", "", &["x"], ShareType::Conditional),
        1,
    );
    assert_eq!(store.cursor(child, Stream::Catalog).await?, 0);

    let batch = vec![(1, upsert(&a)), (2, upsert(&b))];
    assert_eq!(
        store
            .apply_child_catalog(child, &batch, Upstream::Parent)
            .await?,
        2
    );
    assert_eq!(store.cursor(child, Stream::Catalog).await?, 2);
    assert_eq!(store.cursor(child, Stream::Audit).await?, 0);
    assert_eq!(store.cursor("350103", Stream::Catalog).await?, 0);
    // A child's versions are kept as sent.
    assert_eq!(store.entry("350102:a").await?.context("a")?.entry, a);
    assert_eq!(store.entry("350102:b").await?.context("b")?.entry, b);
    let out = store.outbox_after(Stream::Catalog, 0, 100).await?;
    assert_eq!(seqs(&out), vec![1, 2]);
    assert_eq!(changes(&out)?, vec![upsert(&a), upsert(&b)]);

    // Re-sending applied items changes nothing.
    assert_eq!(
        store
            .apply_child_catalog(child, &batch, Upstream::Parent)
            .await?,
        2
    );
    assert_eq!(
        store
            .apply_child_catalog(child, &batch[..1], Upstream::Parent)
            .await?,
        2
    );
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 2);
    assert_eq!(store.count_entries().await?, 2);

    // An overlapping batch applies only what is new.
    let overlap = vec![(2, upsert(&b)), (3, withdrawal("350102:a", 6))];
    assert_eq!(
        store
            .apply_child_catalog(child, &overlap, Upstream::Parent)
            .await?,
        3
    );
    let stored = store.entry("350102:a").await?.context("a")?;
    assert!(stored.withdrawn);
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 3);
    assert_eq!(
        changes(&store.outbox_after(Stream::Catalog, 2, 100).await?)?,
        vec![withdrawal("350102:a", 6)]
    );

    // Gaps are refused, atomically, wherever they are in the batch.
    let c = with_version(
        &entry("350102:c", "Gamma", "", &["x"], ShareType::Unconditional),
        1,
    );
    expect_gap(
        store
            .apply_child_catalog(child, &[(5, upsert(&c))], Upstream::Parent)
            .await,
        child,
        4,
        5,
    )?;
    expect_gap(
        store
            .apply_child_catalog(child, &[(4, upsert(&c)), (6, upsert(&b))], Upstream::Parent)
            .await,
        child,
        5,
        6,
    )?;
    assert_eq!(store.cursor(child, Stream::Catalog).await?, 3);
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 3);
    assert!(store.entry("350102:c").await?.is_none());

    // Older versions do not overwrite newer ones, but are still forwarded in order.
    let old_a = with_version(&a, 4);
    assert_eq!(
        store
            .apply_child_catalog(
                child,
                &[(4, upsert(&old_a)), (5, withdrawal("350102:b", 1))],
                Upstream::Parent,
            )
            .await?,
        5
    );
    let stored = store.entry("350102:a").await?.context("a")?;
    assert!(
        stored.withdrawn,
        "version 4 is older than the withdrawal (6)"
    );
    assert_eq!(stored.entry, a);
    assert!(
        !store.entry("350102:b").await?.context("b")?.withdrawn,
        "a withdrawal must be newer than the stored version"
    );
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 5);

    // A newer upsert brings a withdrawn entry back; an unknown withdrawal is forwarded and stores nothing.
    let new_a = with_version(&a, 7);
    assert_eq!(
        store
            .apply_child_catalog(
                child,
                &[(6, upsert(&new_a)), (7, withdrawal("350102:zz", 3))],
                Upstream::Parent,
            )
            .await?,
        7
    );
    let stored = store.entry("350102:a").await?.context("a")?;
    assert!(!stored.withdrawn);
    assert_eq!(stored.entry, new_a);
    assert!(store.entry("350102:zz").await?.is_none());
    assert_eq!(
        changes(&store.outbox_after(Stream::Catalog, 3, 100).await?)?,
        vec![
            upsert(&old_a),
            withdrawal("350102:b", 1),
            upsert(&new_a),
            withdrawal("350102:zz", 3)
        ]
    );

    // A local publication of a child's entry continues its version.
    assert_eq!(
        store
            .publish_local(a.clone(), Upstream::Parent)
            .await?
            .version,
        8
    );

    // Empty batches; a second child's cursor is its own, and its items join the same outbox.
    assert_eq!(
        store
            .apply_child_catalog(child, &[], Upstream::Parent)
            .await?,
        7
    );
    assert_eq!(
        store
            .apply_child_catalog("350103", &[], Upstream::Parent)
            .await?,
        0
    );
    let d = with_version(
        &entry("350103:d", "Delta", "", &["x"], ShareType::Unconditional),
        2,
    );
    assert_eq!(
        store
            .apply_child_catalog("350103", &[(1, upsert(&d))], Upstream::Parent)
            .await?,
        1
    );
    assert_eq!(store.cursor("350103", Stream::Catalog).await?, 1);
    assert_eq!(store.cursor(child, Stream::Catalog).await?, 7);
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 9);
    assert_eq!(store.count_entries().await?, 3);
    Ok(())
}

async fn uplink_ack_only_grows(store: Arc<dyn Store>) -> Result<()> {
    assert_eq!(store.uplink_acked(Stream::Catalog).await?, 0);
    assert_eq!(store.uplink_acked(Stream::Audit).await?, 0);
    store.set_uplink_acked(Stream::Catalog, 5).await?;
    assert_eq!(store.uplink_acked(Stream::Catalog).await?, 5);
    store.set_uplink_acked(Stream::Catalog, 3).await?;
    assert_eq!(store.uplink_acked(Stream::Catalog).await?, 5);
    store.set_uplink_acked(Stream::Catalog, 0).await?;
    assert_eq!(store.uplink_acked(Stream::Catalog).await?, 5);
    store.set_uplink_acked(Stream::Catalog, 9).await?;
    assert_eq!(store.uplink_acked(Stream::Catalog).await?, 9);
    assert_eq!(store.uplink_acked(Stream::Audit).await?, 0);
    store.set_uplink_acked(Stream::Audit, 0).await?;
    assert_eq!(store.uplink_acked(Stream::Audit).await?, 0);
    // Stored as a signed 64-bit integer: saturates.
    store.set_uplink_acked(Stream::Audit, u64::MAX).await?;
    assert_eq!(
        store.uplink_acked(Stream::Audit).await?,
        i64::MAX.unsigned_abs()
    );
    assert_eq!(store.uplink_acked(Stream::Catalog).await?, 9);
    Ok(())
}

async fn leases_go_to_one_holder_at_a_time(store: Arc<dyn Store>) -> Result<()> {
    let long = std::time::Duration::from_secs(60);
    ensure!(
        store.take_lease("uplink:AUDIT", "a", long).await?,
        "a free lease is taken"
    );
    ensure!(
        !store.take_lease("uplink:AUDIT", "b", long).await?,
        "a held lease is not taken"
    );
    ensure!(
        store.take_lease("uplink:AUDIT", "a", long).await?,
        "its holder renews it"
    );
    assert_eq!(
        store.lease_holder("uplink:AUDIT").await?.as_deref(),
        Some("a")
    );
    assert_eq!(store.lease_holder("uplink:nothing").await?, None);
    ensure!(
        store.take_lease("uplink:CATALOG", "b", long).await?,
        "leases are independent"
    );
    store.release_lease("uplink:AUDIT", "b").await?;
    ensure!(
        !store.take_lease("uplink:AUDIT", "b", long).await?,
        "only the holder releases it"
    );
    store.release_lease("uplink:AUDIT", "a").await?;
    ensure!(
        store.take_lease("uplink:AUDIT", "b", long).await?,
        "a released lease is taken at once"
    );

    // A lease nobody renews runs out and goes to whoever asks next.
    let short = std::time::Duration::from_millis(50);
    ensure!(store.take_lease("uplink:CATALOG", "b", short).await?);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !store.take_lease("uplink:CATALOG", "a", long).await? {
        ensure!(
            std::time::Instant::now() < deadline,
            "the lease never ran out"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    ensure!(
        !store.take_lease("uplink:CATALOG", "b", short).await?,
        "the new holder keeps it"
    );
    assert_eq!(
        store.lease_holder("uplink:CATALOG").await?.as_deref(),
        Some("a")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Audit

async fn a_late_signature_replaces_only_its_record(store: Arc<dyn Store>) -> Result<()> {
    let written = vec![
        rec("350102", 1, 1_000),
        rec("350100", 1, 1_050),
        rec("350102", 2, 1_100),
    ];
    store.audit_append(&written).await?;
    let before = store.outbox_after(Stream::Audit, 0, 10).await?;
    let mut head = written[2].clone();
    head.signature = vec![5; 64];
    store.audit_seal(&head).await?;
    assert_eq!(store.audit_head("350102").await?, Some(head.clone()));
    let after = store.outbox_after(Stream::Audit, 0, 10).await?;
    assert_eq!(
        after.iter().map(|i| i.seq).collect::<Vec<_>>(),
        before.iter().map(|i| i.seq).collect::<Vec<_>>(),
        "the record keeps its stream position"
    );
    assert_eq!(
        records(&after)?,
        [written[0].clone(), written[1].clone(), head]
    );
    // A record the store does not hold cannot be signed into it.
    let mut missing = rec("350102", 9, 2_000);
    missing.signature = vec![5; 64];
    assert!(store.audit_seal(&missing).await.is_err());
    // Nor can a record the store holds otherwise under that sequence number (re-chained since): its signature
    // would land on another record.
    let mut replaced = rec("350102", 1, 1_000);
    replaced.hash = vec![1; 32];
    replaced.signature = vec![5; 64];
    match store.audit_seal(&replaced).await {
        Err(StoreError::HeadConflict { node, seq }) if node == "350102" && seq == 1 => {}
        other => bail!("expected a head conflict, got {other:?}"),
    }
    assert_eq!(
        records(&store.outbox_after(Stream::Audit, 0, 10).await?)?[0],
        written[0]
    );
    assert_eq!(store.audit_count().await?, 3);
    Ok(())
}

/// Records chained after `head` (a chain start if there is none), as a writer that takes the head under the
/// chain's lock makes them.
fn chained_after(node: &str, head: Option<&AuditRecord>, n: u64) -> Vec<AuditRecord> {
    let (mut seq, mut prev) = head.map_or((0, vec![0; 32]), |h| (h.seq, h.hash.clone()));
    (0..n)
        .map(|_| {
            seq += 1;
            let mut r = rec(node, seq, i64::try_from(seq).unwrap_or_default());
            r.operation = if seq == 1 { 1 } else { 3 };
            r.prev_hash = std::mem::take(&mut prev);
            r.hash.clear();
            r.hash = fedgate_gateway::audit::record_hash(&r).to_vec();
            prev.clone_from(&r.hash);
            r
        })
        .collect()
}

async fn appending_at_the_head_serializes_writers_of_a_chain(store: Arc<dyn Store>) -> Result<()> {
    const WRITERS: u64 = 4;
    const BATCHES: u64 = 20;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for b in 0..BATCHES {
                    let n = 1 + (w + b) % 2;
                    let chain = move |head: Option<&AuditRecord>| chained_after("350102", head, n);
                    let written = store.audit_append_at_head("350102", &chain).await?;
                    ensure!(written.len() as u64 == n, "wrote {} of {n}", written.len());
                    seqs.extend(written.iter().map(|r| r.seq));
                }
                Ok::<_, anyhow::Error>(seqs)
            })
        })
        .collect();
    let mut all = BTreeSet::new();
    for t in tasks {
        for seq in t.await?? {
            ensure!(all.insert(seq), "record {seq} written twice");
        }
    }
    let chain = store.audit_chain("350102", 0, 1000).await?;
    let total = chain.len() as u64;
    assert_eq!(all, (1..=total).collect::<BTreeSet<u64>>());
    assert_eq!(
        chain.iter().filter(|r| r.operation == 1).count(),
        1,
        "one writer found the chain empty"
    );
    for pair in chain.windows(2) {
        assert_eq!(
            pair[1].prev_hash, pair[0].hash,
            "record {} links",
            pair[1].seq
        );
    }
    // The optimistic append after a stale head is refused as a conflict, and nothing of it is stored.
    let stale = chained_after("350102", chain.get(chain.len() - 2), 2);
    assert!(matches!(
        store.audit_append(&stale).await,
        Err(StoreError::HeadConflict { .. })
    ));
    assert_eq!(store.audit_count().await?, total);
    Ok(())
}

async fn audit_append_head_chain_and_positions(store: Arc<dyn Store>) -> Result<()> {
    assert_eq!(store.audit_count().await?, 0);
    assert!(store.audit_head("350102").await?.is_none());
    assert!(store.audit_nodes().await?.is_empty());
    store.audit_append(&[]).await?;
    assert_eq!(store.audit_count().await?, 0);

    let mut full = rec("350102", 1, 1_000);
    full.consumer_uscc = "C1".into();
    full.provider_uscc = "P1".into();
    full.resource_id = "350102:household".into();
    full.grant_id = "G-1".into();
    full.purpose = "checking (核查)".into();
    full.route = vec!["350100".into(), "350102".into()];
    full.detail = "x".repeat(1000);
    full.response_digest = vec![7; 32];
    full.signature = vec![9; 64];
    full.consumer_node = "350100".into();
    full.mode = "QUERY".into();
    let first = vec![
        full,
        rec("350100", 1, 900),
        rec("350102", 2, 1_100),
        rec("350102", 3, 1_200),
    ];
    let second = vec![
        rec("350100", 2, 1_300),
        rec("350102", 4, 1_250),
        rec("350100", 3, 1_400),
        rec("350102", 5, 1_500),
    ];
    store.audit_append(&first).await?;
    store.audit_append(&second).await?;
    let written: Vec<AuditRecord> = first.iter().chain(&second).cloned().collect();
    assert_eq!(store.audit_count().await?, 8);
    assert_eq!(store.audit_head("350102").await?, Some(written[7].clone()));
    assert_eq!(store.audit_head("350100").await?, Some(written[6].clone()));
    assert!(store.audit_head("350103").await?.is_none());
    assert_eq!(store.audit_nodes().await?, ["350100", "350102"]);

    // The upward audit stream: positions 1.. in append order, payloads the encoded records.
    assert_eq!(store.outbox_head(Stream::Audit).await?, 8);
    let all = store.outbox_after(Stream::Audit, 0, 100).await?;
    assert_eq!(seqs(&all), (1..=8).collect::<Vec<_>>());
    assert_eq!(records(&all)?, written);
    assert_eq!(
        seqs(&store.outbox_after(Stream::Audit, 3, 2).await?),
        vec![4, 5]
    );
    assert!(store.outbox_after(Stream::Audit, 8, 10).await?.is_empty());
    assert_eq!(store.outbox_head(Stream::Catalog).await?, 0);

    // Chains in chain order.
    let chain = store.audit_chain("350102", 0, 100).await?;
    assert_eq!(
        chain,
        vec![
            written[0].clone(),
            written[2].clone(),
            written[3].clone(),
            written[5].clone(),
            written[7].clone()
        ]
    );
    let part = store.audit_chain("350102", 2, 2).await?;
    assert_eq!(part.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert!(store.audit_chain("350102", 5, 10).await?.is_empty());
    assert!(store.audit_chain("350102", 0, 0).await?.is_empty());
    assert!(store.audit_chain("350103", 0, 10).await?.is_empty());

    // A batch is all or nothing: a duplicate (node, seq) at its end rejects all of it, as a head conflict (the
    // chain moved on under its writer).
    let bad = vec![rec("350102", 6, 1_600), rec("350102", 5, 1_700)];
    match store.audit_append(&bad).await {
        Err(StoreError::HeadConflict { node, seq }) if node == "350102" && seq == 6 => {}
        other => bail!("expected a head conflict of 350102, got {other:?}"),
    }
    assert_eq!(store.audit_count().await?, 8);
    assert_eq!(store.audit_head("350102").await?, Some(written[7].clone()));
    assert_eq!(store.outbox_head(Stream::Audit).await?, 8);
    // ... and leaves no hole in the stream.
    store.audit_append(&bad[..1]).await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Audit, 8, 10).await?),
        vec![9]
    );

    // Large batches, beyond any single statement's size, are appended in order and atomically too.
    let big: Vec<AuditRecord> = (1..=10_000).map(|s| rec("350203", s, s as i64)).collect();
    let mut big_bad = big.clone();
    big_bad.push(rec("350203", 1, 0));
    assert!(store.audit_append(&big_bad).await.is_err());
    assert_eq!(store.audit_count().await?, 9);
    store.audit_append(&big).await?;
    assert_eq!(store.audit_count().await?, 10_009);
    assert_eq!(store.outbox_head(Stream::Audit).await?, 10_009);
    let tail = store.outbox_after(Stream::Audit, 9, 20_000).await?;
    assert_eq!(seqs(&tail), (10..=10_009).collect::<Vec<_>>());
    assert_eq!(records(&tail)?, big);
    assert_eq!(store.audit_head("350203").await?, big.last().cloned());
    assert_eq!(store.audit_nodes().await?, ["350100", "350102", "350203"]);
    Ok(())
}

async fn audit_query_filters_and_pagination(store: Arc<dyn Store>) -> Result<()> {
    let make = |node: &str, seq, t, consumer: &str, provider: &str, res: &str, outcome: &str| {
        AuditRecord {
            consumer_uscc: consumer.to_owned(),
            provider_uscc: provider.to_owned(),
            resource_id: res.to_owned(),
            outcome: outcome.to_owned(),
            ..rec(node, seq, t)
        }
    };
    let rs = [
        make("350102", 1, 100, "C1", "P1", "R1", "OK"),
        make("350102", 2, 200, "C2", "P1", "R2", "PERMISSION_DENIED"),
        make("350103", 1, 300, "C1", "P2", "R1", "OK"),
        make("350203", 1, 400, "C3", "P3", "R3", "OK"),
        make("351000", 1, 500, "C1", "P3", "R1", "INTERNAL"),
        make("350100", 1, -50, "", "", "", "OK"),
    ];
    store.audit_append(&rs[..3]).await?;
    store.audit_append(&rs[3..]).await?;

    let query = |q: AuditQuery| {
        let store = store.clone();
        async move {
            let q = AuditQuery {
                limit: if q.limit == 0 { 100 } else { q.limit },
                ..q
            };
            let rows = store.audit_query(&q).await?;
            Ok::<_, anyhow::Error>(rows)
        }
    };
    // Which of `rs` a query returned (1-based, as the positions are).
    let which = |rows: &[(u64, AuditRecord)]| -> Result<Vec<u64>> {
        for (p, r) in rows {
            ensure!(
                usize::try_from(*p)
                    .ok()
                    .and_then(|i| rs.get(i.checked_sub(1)?))
                    == Some(r),
                "position {p} holds {r:?}"
            );
        }
        Ok(positions(rows))
    };
    let s = |v: &str| Some(v.to_owned());

    assert_eq!(
        which(&query(AuditQuery::default()).await?)?,
        [1, 2, 3, 4, 5, 6]
    );
    // Party: consumer or provider; counterpart: the other side, only with a party.
    let party = |p: &str| AuditQuery {
        party: s(p),
        ..Default::default()
    };
    assert_eq!(which(&query(party("C1")).await?)?, [1, 3, 5]);
    assert_eq!(which(&query(party("P1")).await?)?, [1, 2]);
    assert_eq!(which(&query(party("P3")).await?)?, [4, 5]);
    assert!(query(party("c1")).await?.is_empty());
    assert_eq!(
        which(
            &query(AuditQuery {
                party: s("C1"),
                counterpart: s("P1"),
                ..Default::default()
            })
            .await?
        )?,
        [1]
    );
    assert_eq!(
        which(
            &query(AuditQuery {
                party: s("P3"),
                counterpart: s("C1"),
                ..Default::default()
            })
            .await?
        )?,
        [5]
    );
    assert_eq!(
        which(
            &query(AuditQuery {
                counterpart: s("P1"),
                ..Default::default()
            })
            .await?
        )?,
        [1, 2, 3, 4, 5, 6],
        "a counterpart without a party filters nothing"
    );

    // Time: from inclusive, to exclusive.
    let time = |from: Option<i64>, to: Option<i64>| AuditQuery {
        from_ns: from,
        to_ns: to,
        ..Default::default()
    };
    assert_eq!(which(&query(time(Some(200), None)).await?)?, [2, 3, 4, 5]);
    assert_eq!(which(&query(time(None, Some(400))).await?)?, [1, 2, 3, 6]);
    assert_eq!(which(&query(time(Some(200), Some(400))).await?)?, [2, 3]);
    assert_eq!(which(&query(time(None, Some(0))).await?)?, [6]);
    assert!(query(time(Some(400), Some(400))).await?.is_empty());

    // Resource, outcome.
    assert_eq!(
        which(
            &query(AuditQuery {
                resource_id: s("R1"),
                ..Default::default()
            })
            .await?
        )?,
        [1, 3, 5]
    );
    assert_eq!(
        which(
            &query(AuditQuery {
                outcome: s("OK"),
                ..Default::default()
            })
            .await?
        )?,
        [1, 3, 4, 6]
    );
    assert!(
        query(AuditQuery {
            outcome: s("ok"),
            ..Default::default()
        })
        .await?
        .is_empty()
    );

    // Node prefix: the writing node's subtree.
    let prefix = |p: &str| AuditQuery {
        node_prefix: s(p),
        ..Default::default()
    };
    assert_eq!(which(&query(prefix("3501")).await?)?, [1, 2, 3, 6]);
    assert_eq!(which(&query(prefix("350102")).await?)?, [1, 2]);
    assert_eq!(which(&query(prefix("351")).await?)?, [5]);
    assert_eq!(which(&query(prefix("35")).await?)?, [1, 2, 3, 4, 5, 6]);
    assert_eq!(which(&query(prefix("")).await?)?, [1, 2, 3, 4, 5, 6]);
    assert!(query(prefix("3502031")).await?.is_empty());

    // All together.
    assert_eq!(
        which(
            &query(AuditQuery {
                party: s("C1"),
                counterpart: s("P2"),
                node_prefix: s("3501"),
                from_ns: Some(300),
                to_ns: Some(301),
                resource_id: s("R1"),
                outcome: s("OK"),
                ..Default::default()
            })
            .await?
        )?,
        [3]
    );

    // Pagination by position.
    assert_eq!(
        which(
            &query(AuditQuery {
                after_fwd_seq: Some(2),
                limit: 2,
                ..Default::default()
            })
            .await?
        )?,
        [3, 4]
    );
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = query(AuditQuery {
            party: s("C1"),
            after_fwd_seq: after,
            limit: 1,
            ..Default::default()
        })
        .await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        paged.extend(which(&page)?);
    }
    assert_eq!(paged, [1, 3, 5]);
    assert!(
        store
            .audit_query(&AuditQuery {
                limit: 0,
                ..Default::default()
            })
            .await?
            .is_empty()
    );
    Ok(())
}

async fn child_audit_cursor_gap_and_idempotence(store: Arc<dyn Store>) -> Result<()> {
    let child = "350100";
    // A child forwards records of its whole subtree.
    let items: Vec<(u64, Option<AuditRecord>)> = vec![
        (1, Some(rec("350100", 1, 10))),
        (2, Some(rec("350102", 1, 11))),
        (3, Some(rec("350100", 2, 12))),
        (4, Some(rec("350102", 2, 13))),
        (5, Some(rec("350100", 3, 14))),
    ];
    assert_eq!(store.cursor(child, Stream::Audit).await?, 0);
    assert_eq!(store.apply_child_audit(child, &items[..2]).await?, 2);
    assert_eq!(store.cursor(child, Stream::Audit).await?, 2);
    assert_eq!(store.cursor(child, Stream::Catalog).await?, 0);
    assert_eq!(store.audit_count().await?, 2);

    // Re-sent items change nothing; an overlapping batch adds only the new ones.
    assert_eq!(store.apply_child_audit(child, &items[..2]).await?, 2);
    assert_eq!(store.apply_child_audit(child, &items[..3]).await?, 3);
    assert_eq!(store.audit_count().await?, 3);
    assert_eq!(store.apply_child_audit(child, &[]).await?, 3);

    // Gaps are refused atomically.
    expect_gap(
        store.apply_child_audit(child, &items[4..]).await,
        child,
        4,
        5,
    )?;
    expect_gap(
        store
            .apply_child_audit(child, &[items[3].clone(), (6, Some(rec("350100", 4, 15)))])
            .await,
        child,
        5,
        6,
    )?;
    assert_eq!(store.cursor(child, Stream::Audit).await?, 3);
    assert_eq!(store.audit_count().await?, 3);

    // A record the store already holds under its (node, seq) fails the batch, which leaves nothing behind.
    let duplicate = vec![items[3].clone(), (5, Some(rec("350102", 1, 99)))];
    assert!(store.apply_child_audit(child, &duplicate).await.is_err());
    assert_eq!(store.cursor(child, Stream::Audit).await?, 3);
    assert_eq!(store.audit_count().await?, 3);

    assert_eq!(store.apply_child_audit(child, &items).await?, 5);
    assert_eq!(store.audit_count().await?, 5);
    // This node's stream holds them in arrival order at consecutive positions, failed batches notwithstanding.
    let out = store.outbox_after(Stream::Audit, 0, 100).await?;
    assert_eq!(seqs(&out), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        records(&out)?,
        items
            .iter()
            .filter_map(|(_, r)| r.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(store.audit_head("350102").await?, items[3].1.clone());
    assert_eq!(store.audit_nodes().await?, ["350100", "350102"]);

    // Own records and a second child's interleave in the same stream.
    store.audit_append(&[rec("350000", 1, 20)]).await?;
    assert_eq!(
        store
            .apply_child_audit("350200", &[(1, Some(rec("350200", 1, 21)))])
            .await?,
        1
    );
    assert_eq!(store.cursor("350200", Stream::Audit).await?, 1);
    assert_eq!(store.cursor(child, Stream::Audit).await?, 5);
    let out = store.outbox_after(Stream::Audit, 5, 100).await?;
    assert_eq!(seqs(&out), vec![6, 7]);
    assert_eq!(
        records(&out)?,
        vec![rec("350000", 1, 20), rec("350200", 1, 21)]
    );

    // Items the caller found already held here (a recovered child sending again what it had sent) advance the
    // cursor without being stored again; new ones among them are stored in order.
    let again: Vec<(u64, Option<AuditRecord>)> =
        vec![(6, None), (7, Some(rec("350100", 4, 30))), (8, None)];
    assert_eq!(store.apply_child_audit(child, &again).await?, 8);
    assert_eq!(store.audit_count().await?, 8);
    let out = store.outbox_after(Stream::Audit, 7, 100).await?;
    assert_eq!(seqs(&out), vec![8]);
    assert_eq!(records(&out)?, vec![rec("350100", 4, 30)]);
    expect_gap(
        store.apply_child_audit(child, &[(10, None)]).await,
        child,
        9,
        10,
    )?;
    Ok(())
}

async fn audit_archival_and_deletion(store: Arc<dyn Store>) -> Result<()> {
    // Chain 350102 stamped when requests started (times not monotonic); chain 350103 interleaved.
    let a = |seq, t| rec("350102", seq, t);
    let b = |seq, t| rec("350103", seq, t);
    let written = vec![
        a(1, 10), // 1
        b(1, 1),  // 2
        a(2, 5),  // 3
        a(3, 20), // 4
        b(2, 2),  // 5
        a(4, 3),  // 6
        a(5, 30), // 7
    ];
    store.audit_append(&written).await?;
    let ids = |rows: Vec<(u64, AuditRecord)>| -> Result<Vec<u64>> {
        for (p, r) in &rows {
            ensure!(
                usize::try_from(*p)
                    .ok()
                    .and_then(|i| written.get(i.checked_sub(1)?))
                    == Some(r),
                "position {p} holds {r:?}"
            );
        }
        Ok(positions(&rows))
    };

    // 350102's first record is too recent, so nothing of it; 350103 keeps its head.
    assert_eq!(ids(store.audit_archivable(8, u64::MAX, 100).await?)?, [2]);
    assert_eq!(
        ids(store.audit_archivable(25, u64::MAX, 100).await?)?,
        [1, 2, 3, 4, 6]
    );
    assert_eq!(
        ids(store.audit_archivable(i64::MAX, u64::MAX, 100).await?)?,
        [1, 2, 3, 4, 6]
    );
    assert_eq!(
        ids(store.audit_archivable(i64::MIN, u64::MAX, 100).await?)?,
        Vec::<u64>::new()
    );
    assert_eq!(ids(store.audit_archivable(25, 3, 100).await?)?, [1, 2, 3]);
    assert_eq!(ids(store.audit_archivable(25, u64::MAX, 2).await?)?, [1, 2]);
    assert_eq!(
        chain_ids(&store.audit_archivable(25, 4, 100).await?),
        [
            ("350102".to_owned(), 1),
            ("350103".to_owned(), 1),
            ("350102".to_owned(), 2),
            ("350102".to_owned(), 3)
        ]
    );

    // Deleting by position.
    assert_eq!(store.audit_delete(&[]).await?, 0);
    assert_eq!(store.audit_delete(&[1, 2, 2, 99]).await?, 2);
    assert_eq!(store.audit_delete(&[1, 2]).await?, 0);
    assert_eq!(store.audit_count().await?, 5);
    assert_eq!(
        ids(store.audit_archivable(25, u64::MAX, 100).await?)?,
        [3, 4, 6]
    );
    assert_eq!(store.audit_chain("350102", 0, 100).await?.len(), 4);
    assert_eq!(store.audit_nodes().await?, ["350102", "350103"]);

    // Deleting a chain up to a sequence number never takes its last record.
    assert_eq!(store.audit_delete_chain_upto("350102", 2).await?, 1);
    assert_eq!(store.audit_delete_chain_upto("350102", 2).await?, 0);
    assert_eq!(store.audit_delete_chain_upto("350102", 9).await?, 2);
    assert_eq!(store.audit_delete_chain_upto("350102", 9).await?, 0);
    assert_eq!(store.audit_delete_chain_upto("350103", 2).await?, 0);
    assert_eq!(store.audit_delete_chain_upto("350999", 2).await?, 0);
    assert_eq!(store.audit_count().await?, 2);
    assert_eq!(store.audit_head("350102").await?, Some(written[6].clone()));
    assert_eq!(store.audit_head("350103").await?, Some(written[4].clone()));
    assert!(
        store
            .audit_archivable(i64::MAX, u64::MAX, 100)
            .await?
            .is_empty()
    );

    // Positions are never reused, even once the highest was deleted; the head is the highest one held.
    assert_eq!(store.audit_delete(&[7]).await?, 1);
    assert_eq!(store.outbox_head(Stream::Audit).await?, 5);
    assert_eq!(store.audit_nodes().await?, ["350103"]);
    store.audit_append(&[a(6, 40)]).await?;
    let out = store.outbox_after(Stream::Audit, 0, 100).await?;
    assert_eq!(seqs(&out), vec![5, 8]);
    assert_eq!(store.outbox_head(Stream::Audit).await?, 8);
    assert_eq!(store.audit_count().await?, 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Governance, keys

async fn governance_docs_and_id_counters(store: Arc<dyn Store>) -> Result<()> {
    assert_eq!(store.next_id("grant").await?, 1);
    assert_eq!(store.next_id("grant").await?, 2);
    assert_eq!(store.next_id("application").await?, 1);
    assert_eq!(store.next_id("grant").await?, 3);
    assert_eq!(store.next_id("Grant").await?, 1);

    let doc = |kind, id: &str, provider: &str, consumer: &str, state, due_at| Doc {
        kind,
        id: id.to_owned(),
        provider_uscc: provider.to_owned(),
        consumer_uscc: consumer.to_owned(),
        state,
        due_at,
        body: format!("{id}/{state}").into_bytes(),
    };
    assert!(store.doc(DocKind::Application, "A-1").await?.is_none());
    let docs = [
        doc(DocKind::Application, "A-1", "P1", "C1", 1, 100),
        doc(DocKind::Application, "A-10", "P1", "C2", 2, 50),
        doc(DocKind::Application, "A-9", "P2", "C1", 1, 0),
        doc(DocKind::Application, "a-2", "P1", "C1", 1, 300),
        doc(DocKind::Objection, "A-1", "P9", "C9", 7, 10),
        doc(DocKind::Grant, "G-1", "P1", "C1", 0, 0),
        doc(DocKind::Revocation, "R-1", "P1", "C1", 0, 0),
    ];
    for d in &docs {
        store.put_doc(d).await?;
    }
    assert_eq!(
        store.doc(DocKind::Application, "A-1").await?.as_ref(),
        Some(&docs[0])
    );
    assert_eq!(
        store.doc(DocKind::Objection, "A-1").await?.as_ref(),
        Some(&docs[4])
    );
    assert_eq!(
        store.doc(DocKind::Grant, "G-1").await?.as_ref(),
        Some(&docs[5])
    );
    assert_eq!(
        store.doc(DocKind::Revocation, "R-1").await?.as_ref(),
        Some(&docs[6])
    );
    assert!(store.doc(DocKind::Grant, "A-1").await?.is_none());

    // Replacing a document.
    let replaced = doc(DocKind::Application, "A-1", "P1", "C3", 3, 0);
    store.put_doc(&replaced).await?;
    assert_eq!(
        store.doc(DocKind::Application, "A-1").await?,
        Some(replaced.clone())
    );

    let list = |q: DocQuery| {
        let store = store.clone();
        async move {
            Ok::<_, anyhow::Error>(
                store
                    .docs(DocKind::Application, &q)
                    .await?
                    .into_iter()
                    .map(|d| d.id)
                    .collect::<Vec<_>>(),
            )
        }
    };
    // By id, bytewise.
    assert_eq!(
        list(DocQuery::default()).await?,
        ["A-1", "A-10", "A-9", "a-2"]
    );
    let all = store
        .docs(DocKind::Application, &DocQuery::default())
        .await?;
    assert_eq!(
        all,
        vec![replaced, docs[1].clone(), docs[2].clone(), docs[3].clone()]
    );
    assert_eq!(
        list(DocQuery {
            provider_uscc: Some("P1".into()),
            ..Default::default()
        })
        .await?,
        ["A-1", "A-10", "a-2"]
    );
    assert_eq!(
        list(DocQuery {
            consumer_uscc: Some("C1".into()),
            ..Default::default()
        })
        .await?,
        ["A-9", "a-2"]
    );
    assert_eq!(
        list(DocQuery {
            state: Some(1),
            ..Default::default()
        })
        .await?,
        ["A-9", "a-2"]
    );
    // Due before: strictly, and never documents without a deadline.
    assert_eq!(
        list(DocQuery {
            due_before: Some(300),
            ..Default::default()
        })
        .await?,
        ["A-10"]
    );
    assert_eq!(
        list(DocQuery {
            due_before: Some(301),
            ..Default::default()
        })
        .await?,
        ["A-10", "a-2"]
    );
    assert_eq!(
        list(DocQuery {
            provider_uscc: Some("P1".into()),
            consumer_uscc: Some("C1".into()),
            state: Some(1),
            due_before: Some(i64::MAX),
            ..Default::default()
        })
        .await?,
        ["a-2"]
    );
    assert!(
        list(DocQuery {
            provider_uscc: Some("P9".into()),
            ..Default::default()
        })
        .await?
        .is_empty()
    );
    assert_eq!(
        store
            .docs(
                DocKind::Objection,
                &DocQuery {
                    due_before: Some(11),
                    ..Default::default()
                }
            )
            .await?,
        vec![docs[4].clone()]
    );
    Ok(())
}

/// Pages of a listing (`after_id`, `limit`) are consecutive runs of the whole listing, whatever their size,
/// never longer than asked, and combine with the other filters.
async fn governance_docs_are_read_in_keyset_pages(store: Arc<dyn Store>) -> Result<()> {
    // Ids whose bytewise order differs from the order they are written in, of two providers and two states.
    let ids: Vec<String> = (0..23)
        .map(|i| format!("350100-a-{}", (i * 7) % 23))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        store
            .put_doc(&Doc {
                kind: DocKind::Application,
                id: id.clone(),
                provider_uscc: if i % 2 == 0 { "P1" } else { "P2" }.to_owned(),
                consumer_uscc: "C1".to_owned(),
                state: if i % 3 == 0 { 2 } else { 1 },
                due_at: 100,
                body: id.clone().into_bytes(),
            })
            .await?;
    }
    store
        .put_doc(&Doc {
            kind: DocKind::Objection,
            id: "350100-a-5".to_owned(),
            provider_uscc: "P1".to_owned(),
            consumer_uscc: "C1".to_owned(),
            state: 1,
            due_at: 100,
            body: Vec::new(),
        })
        .await?;
    let listing = |q: &DocQuery| {
        let store = store.clone();
        let q = q.clone();
        async move {
            Ok::<_, anyhow::Error>(
                store
                    .docs(DocKind::Application, &q)
                    .await?
                    .into_iter()
                    .map(|d| d.id)
                    .collect::<Vec<_>>(),
            )
        }
    };
    for filter in [
        DocQuery::default(),
        DocQuery {
            provider_uscc: Some("P2".to_owned()),
            ..Default::default()
        },
        DocQuery {
            state: Some(1),
            due_before: Some(200),
            ..Default::default()
        },
    ] {
        let whole = listing(&filter).await?;
        let mut sorted = whole.clone();
        sorted.sort();
        assert_eq!(whole, sorted, "listed by id");
        for page in [1u32, 2, 5, 22, 23, 100] {
            let mut paged = Vec::new();
            let mut q = DocQuery {
                limit: Some(page),
                ..filter.clone()
            };
            loop {
                let got = listing(&q).await?;
                ensure!(
                    got.len() <= page as usize,
                    "a page of {page} held {}",
                    got.len()
                );
                let Some(last) = got.last().cloned() else {
                    break;
                };
                paged.extend(got);
                q.after_id = Some(last);
            }
            assert_eq!(paged, whole, "pages of {page} with {filter:?}");
        }
    }
    assert_eq!(listing(&DocQuery::default()).await?.len(), 23);
    Ok(())
}

async fn node_keys_are_pinned_on_first_sight(store: Arc<dyn Store>) -> Result<()> {
    assert!(store.node_key("350102").await?.is_none());
    assert_eq!(store.pin_node_key("350102", &[1; 32]).await?, vec![1; 32]);
    assert_eq!(
        store.pin_node_key("350102", &[2; 32]).await?,
        vec![1; 32],
        "the first key stays"
    );
    assert_eq!(store.node_key("350102").await?, Some(vec![1; 32]));
    assert!(store.node_key("350103").await?.is_none());
    assert_eq!(store.pin_node_key("350103", &[2; 32]).await?, vec![2; 32]);
    assert_eq!(store.node_key("350103").await?, Some(vec![2; 32]));
    assert_eq!(store.node_key("350102").await?, Some(vec![1; 32]));
    // A rotation replaces the key.
    store.replace_node_key("350102", &[3; 32]).await?;
    assert_eq!(store.node_key("350102").await?, Some(vec![3; 32]));
    store.replace_node_key("350104", &[4; 32]).await?;
    assert_eq!(store.node_key("350104").await?, Some(vec![4; 32]));
    Ok(())
}

async fn served_nodes_are_kept_until_their_answers_expire(store: Arc<dyn Store>) -> Result<()> {
    assert!(store.served_nodes("350102:a", 100).await?.is_empty());
    store.note_served("350102:a", "350203", 160).await?;
    store.note_served("350102:a", "350103", 130).await?;
    store.note_served("350102:b", "350200", 500).await?;
    assert_eq!(
        store.served_nodes("350102:a", 100).await?,
        vec!["350103", "350203"]
    );
    assert_eq!(store.served_nodes("350102:a", 140).await?, vec!["350203"]);
    // A later answer extends the note, an earlier one does not shorten it; an expired one is gone.
    store.note_served("350102:a", "350103", 200).await?;
    store.note_served("350102:a", "350103", 120).await?;
    assert_eq!(store.served_nodes("350102:a", 170).await?, vec!["350103"]);
    assert!(store.served_nodes("350102:a", 201).await?.is_empty());
    assert_eq!(store.served_nodes("350102:b", 201).await?, vec!["350200"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Concurrency

/// Reads `stream` as the uplink does (by position after the last acknowledged one, acknowledging the highest
/// seen) until `done` was set before a read that found nothing; returns every item seen.
async fn drain(
    store: Arc<dyn Store>,
    stream: Stream,
    done: Arc<AtomicBool>,
) -> Result<Vec<OutboxItem>> {
    let mut acked = 0;
    let mut seen = Vec::new();
    loop {
        let finished = done.load(Ordering::SeqCst);
        let items = store.outbox_after(stream, acked, 7).await?;
        if items.is_empty() {
            if finished {
                return Ok(seen);
            }
            tokio::task::yield_now().await;
            continue;
        }
        for item in &items {
            ensure!(
                item.seq == acked + 1,
                "{stream:?} reader acknowledged {acked} and then saw {}",
                item.seq
            );
            acked = item.seq;
        }
        seen.extend(items);
    }
}

async fn concurrent_writers_commit_in_position_order(store: Arc<dyn Store>) -> Result<()> {
    const WRITERS: u64 = 8;
    const BATCHES: u64 = 30;
    const PUBLISHERS: u64 = 4;
    const PUBLICATIONS: u64 = 15;
    const IDS: u64 = 3;

    let done = Arc::new(AtomicBool::new(false));
    let audit_reader = tokio::spawn(drain(store.clone(), Stream::Audit, done.clone()));
    let catalog_reader = tokio::spawn(drain(store.clone(), Stream::Catalog, done.clone()));

    let mut tasks = Vec::new();
    // Audit: each writer its own chain, batches of 1 to 3 records.
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let node = format!("3501{w:02}");
            let mut seq = 0;
            for b in 0..BATCHES {
                let batch: Vec<AuditRecord> = (0..=b % 3)
                    .map(|_| {
                        seq += 1;
                        rec(&node, seq, i64::try_from(seq).unwrap_or_default())
                    })
                    .collect();
                store.audit_append(&batch).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    // Two children pushing the same audit batches twice over, concurrently: each item is stored once.
    for child in ["350200", "350300"] {
        for _ in 0..2 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for from in (1..=20).step_by(5) {
                    let items: Vec<(u64, Option<AuditRecord>)> = (from..from + 5)
                        .map(|s| (s, Some(rec(child, s, 0))))
                        .collect();
                    store.apply_child_audit(child, &items).await?;
                }
                Ok(())
            }));
        }
    }
    // Catalog: publishers racing on the same ids.
    for _ in 0..PUBLISHERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PUBLICATIONS {
                let id = format!("350102:e{}", i % IDS);
                store
                    .publish_local(
                        entry(&id, "t", "s", &["x"], ShareType::Unconditional),
                        Upstream::Parent,
                    )
                    .await?;
            }
            Ok(())
        }));
    }
    // Id counters.
    let counters: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..25 {
                    got.push(store.next_id("grant").await?);
                }
                Ok::<_, anyhow::Error>(got)
            })
        })
        .collect();

    for t in tasks {
        t.await??;
    }
    let mut ids = BTreeSet::new();
    for c in counters {
        for id in c.await?? {
            ensure!(ids.insert(id), "id {id} handed out twice");
        }
    }
    assert_eq!(ids, (1..=100).collect::<BTreeSet<u64>>());
    done.store(true, Ordering::SeqCst);

    // The audit reader saw every record exactly once, at consecutive positions.
    let audit = audit_reader.await??;
    let own: u64 = (0..BATCHES).map(|b| b % 3 + 1).sum::<u64>() * WRITERS;
    let total = own + 40;
    assert_eq!(seqs(&audit), (1..=total).collect::<Vec<_>>());
    assert_eq!(store.audit_count().await?, total);
    let mut by_node: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in records(&audit)? {
        by_node.entry(r.node_code).or_default().push(r.seq);
    }
    assert_eq!(by_node.len(), usize::try_from(WRITERS)? + 2);
    for (node, chain) in &by_node {
        let len = if node == "350200" || node == "350300" {
            20
        } else {
            own / WRITERS
        };
        assert_eq!(
            chain,
            &(1..=len).collect::<Vec<_>>(),
            "chain of {node}, in order"
        );
    }
    assert_eq!(store.cursor("350200", Stream::Audit).await?, 20);
    assert_eq!(store.cursor("350300", Stream::Audit).await?, 20);

    // The catalog reader saw every change once; concurrent publications of an id got consecutive versions.
    let catalog = catalog_reader.await??;
    let publications = PUBLISHERS * PUBLICATIONS;
    assert_eq!(seqs(&catalog), (1..=publications).collect::<Vec<_>>());
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for change in changes(&catalog)? {
        let Some(catalog_change::Change::Upsert(e)) = change.change else {
            bail!("unexpected change {change:?}");
        };
        versions.entry(e.id).or_default().push(e.version);
    }
    let per_id = publications / IDS;
    for (id, v) in &versions {
        assert_eq!(v, &(1..=per_id).collect::<Vec<_>>(), "versions of {id}");
        assert_eq!(
            store.entry(id).await?.context("entry")?.entry.version,
            per_id
        );
    }
    assert_eq!(versions.len(), usize::try_from(IDS)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Contention: another session holds a lock the store needs. Both backends wait for it up to the node's bound,
// then answer Busy naming the node (which the node answers UNAVAILABLE); a failed attempt changes nothing.

/// The bound of the contention tests.
const BUSY: std::time::Duration = std::time::Duration::from_millis(600);

/// A lock another session holds until the sender fires (or is dropped).
type Held = tokio::sync::oneshot::Sender<()>;

/// Holds the write lock of the SQLite database at `path` from a connection of its own.
async fn hold_sqlite(path: std::path::PathBuf) -> Result<Held> {
    let lock = fedgate_tests::db_lock::WriteLock::take(&path).await?;
    let (held, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = released.await;
        let _ = lock.release().await;
    });
    Ok(held)
}

/// Holds an exclusive lock on the counters' table of the PostgreSQL database at `url` from a session of its own.
async fn hold_postgres(url: String) -> Result<Held> {
    use sqlx::Connection;
    let mut conn = sqlx::postgres::PgConnection::connect(&url).await?;
    sqlx::query("BEGIN").execute(&mut conn).await?;
    sqlx::query("LOCK TABLE id_counter IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await?;
    let (held, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = released.await;
        let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
        let _ = conn.close().await;
    });
    Ok(held)
}

/// A lock held for less than the bound is waited out; one held for longer fails the operation as busy after
/// about the bound, changing nothing; once it is released the operation succeeds.
async fn contention_is_waited_for_then_busy<F, Fut>(store: Arc<dyn Store>, hold: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Held>>,
{
    use std::time::{Duration, Instant};
    let store = fedgate_gateway::store::Retrying::new(store, "350100", BUSY);
    assert_eq!(store.next_id("c").await?, 1);

    let held = hold().await?;
    let release = tokio::spawn(async move {
        tokio::time::sleep(BUSY / 4).await;
        let _ = held.send(());
    });
    let began = Instant::now();
    assert_eq!(store.next_id("c").await?, 2, "a short lock is waited out");
    ensure!(began.elapsed() >= BUSY / 4, "the call waited for the lock");
    release.await?;

    let held = hold().await?;
    let began = Instant::now();
    let err = store
        .next_id("c")
        .await
        .expect_err("the lock outlasts the bound");
    let waited = began.elapsed();
    ensure!(err.is_busy(), "not busy: {err}");
    match &err {
        StoreError::Busy { node, .. } => assert_eq!(node, "350100"),
        other => bail!("not StoreError::Busy: {other}"),
    }
    ensure!(
        waited >= BUSY && waited < BUSY * 4 + Duration::from_secs(1),
        "gave up after {waited:?} (bound {BUSY:?})"
    );
    let _ = held.send(());
    assert_eq!(
        store.next_id("c").await?,
        3,
        "the refused call changed nothing"
    );
    store.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_contention_is_waited_for_then_busy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("contract.db");
    let store = Arc::new(SqliteStore::open_with(&path, BUSY).await?);
    contention_is_waited_for_then_busy(store, || hold_sqlite(path.clone())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_contention_is_waited_for_then_busy() -> Result<()> {
    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    let result = async {
        let store = Arc::new(PgStore::connect_with(&db.url, BUSY).await?);
        contention_is_waited_for_then_busy(store, || hold_postgres(db.url.clone())).await
    }
    .await;
    db.drop_database().await?;
    result
}

/// A deadlock between the store and another session, which PostgreSQL breaks by aborting the store's
/// transaction, is retried: the operation succeeds once the other session is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_deadlocks_are_retried() -> Result<()> {
    use sqlx::Connection;
    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    let result = async {
        // Longer than PostgreSQL's deadlock_timeout (1 s), so the deadlock is detected before any lock wait ends.
        let bound = std::time::Duration::from_secs(8);
        let inner: Arc<dyn Store> = Arc::new(PgStore::connect_with(&db.url, bound).await?);
        let store = Arc::new(fedgate_gateway::store::Retrying::new(
            inner, "350000", bound,
        ));
        // The other session holds the audit positions' row; the store's append takes the audit stream's lock,
        // then waits for that row; the other session then asks for the stream's lock: each waits for the other.
        let mut other = sqlx::postgres::PgConnection::connect(&db.url).await?;
        sqlx::query("BEGIN").execute(&mut other).await?;
        sqlx::query("UPDATE audit_position SET last = last")
            .execute(&mut other)
            .await?;
        let append = tokio::spawn({
            let store = store.clone();
            async move { store.audit_append(&[rec("350000", 1, 1)]).await }
        });
        let mut watch = sqlx::postgres::PgConnection::connect(&db.url).await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE NOT l.granted AND a.query LIKE 'UPDATE audit_position%'",
            )
            .fetch_one(&mut watch)
            .await?;
            if waiting > 0 {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "the append never waited for the row"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let stream_lock = 0x6665_6467_6174_0000_i64 + i64::from(Stream::Audit as i32);
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(stream_lock)
            .execute(&mut other)
            .await
            .context(
                "the other session got the stream lock once the store's transaction was aborted",
            )?;
        sqlx::query("ROLLBACK").execute(&mut other).await?;
        append.await?.context("the append succeeds on its retry")?;
        let head = store.audit_head("350000").await?.context("head")?;
        assert_eq!(head.seq, 1);
        assert_eq!(store.audit_count().await?, 1, "stored once");
        other.close().await?;
        watch.close().await?;
        store.close().await;
        Ok(())
    }
    .await;
    db.drop_database().await?;
    result
}

// ---------------------------------------------------------------------------------------------------------------
// Two writers of one node on one database

/// Two stores on one new SQLite file, as two processes of one node open it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_writers_of_one_node_share_its_chain() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("shared.db");
    let a = Arc::new(SqliteStore::open(&path).await?);
    let b = Arc::new(SqliteStore::open(&path).await?);
    let result = two_writers_of_one_node_share_its_chain(a.clone(), b.clone()).await;
    a.close().await;
    b.close().await;
    result
}

/// Two stores (two pools) on one new PostgreSQL database, as two replicas of one node connect to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_writers_of_one_node_share_its_chain() -> Result<()> {
    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    let result = async {
        let a = Arc::new(PgStore::connect(&db.url).await?);
        let b = Arc::new(PgStore::connect(&db.url).await?);
        let result = tokio::spawn(two_writers_of_one_node_share_its_chain(
            a.clone(),
            b.clone(),
        ))
        .await;
        a.close().await;
        b.close().await;
        result?
    }
    .await;
    db.drop_database().await?;
    result
}

/// Two audit writers of node 350100 with the same key, each on its own store of one database, start on an empty
/// chain at once and write concurrently: every record is answered, the chain has each exactly once, starts once,
/// and verifies.
async fn two_writers_of_one_node_share_its_chain(
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
) -> Result<()> {
    use fedgate_gateway::audit::{AuditLog, ChainVerifier, SignPolicy, event};
    use fedgate_gateway::grant::GrantKey;
    use fedgate_gateway::metrics::NodeMetrics;
    use fedgate_gateway::uplink::Uplink;
    use fedgate_proto::v1::AuditOperation;

    const PER_WRITER: usize = 120;
    let node = "350100".parse()?;
    let key = Arc::new(GrantKey::generate());
    let policy = SignPolicy {
        every: std::time::Duration::from_millis(20),
        records: 16,
        bytes: usize::MAX,
    };
    let start = |store: Arc<dyn Store>| {
        AuditLog::start_with(
            policy,
            node,
            store,
            (key.clone(), None),
            Uplink::new(),
            Arc::new(NodeMetrics::new()),
        )
    };
    let (wa, wb) = tokio::join!(start(a.clone()), start(b.clone()));
    let ((la, ta), (lb, tb)) = (wa?, wb?);
    let write = |log: AuditLog| {
        tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(PER_WRITER);
            for i in 0..PER_WRITER {
                seqs.push(
                    log.record(event(AuditOperation::CatalogPublish, format!("w{i}")))
                        .await?,
                );
            }
            Ok::<_, anyhow::Error>(seqs)
        })
    };
    let (sa, sb) = tokio::join!(write(la), write(lb));
    let mut answered = BTreeSet::new();
    for seq in sa??.into_iter().chain(sb??) {
        ensure!(
            answered.insert(seq),
            "record {seq} answered to both writers"
        );
    }
    ta.await?;
    tb.await?;
    let chain = a.audit_chain("350100", 0, 10_000).await?;
    assert_eq!(chain.len(), 2 * PER_WRITER + 1);
    assert_eq!(
        chain
            .iter()
            .filter(|r| r.operation == AuditOperation::ChainStart as i32)
            .count(),
        1,
        "the chain starts once"
    );
    let mut v = ChainVerifier::new("350100", None);
    for r in &chain {
        v.push(r)?;
    }
    v.finish()?;
    assert_eq!(v.key(), Some(key.public_key().as_slice()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Recovery of what a node lost after forwarding it

async fn marks_of_unconfirmed_runs_are_kept_until_removed(store: Arc<dyn Store>) -> Result<()> {
    assert_eq!(store.uplink_mark(Stream::Audit).await?, None);
    store
        .audit_append(&chained_after("350102", None, 3))
        .await?;
    store.audit_append(&[rec("350121", 1, 5)]).await?;
    store
        .publish_local(
            entry("350102:a", "a", "s", &["x"], ShareType::Unconditional),
            Upstream::Parent,
        )
        .await?;
    store.set_uplink_acked(Stream::Catalog, 1).await?;
    store.mark_unconfirmed("350102").await?;
    assert_eq!(
        store.uplink_mark(Stream::Audit).await?,
        Some(UplinkMark {
            head: 4,
            own_seq: 3
        })
    );
    assert_eq!(
        store.uplink_mark(Stream::Catalog).await?,
        Some(UplinkMark {
            head: 1,
            own_seq: 0
        })
    );
    // A later start keeps the first mark: what was written since has still not been compared.
    store.audit_append(&[rec("350121", 2, 6)]).await?;
    store.mark_unconfirmed("350102").await?;
    assert_eq!(
        store.uplink_mark(Stream::Audit).await?.map(|m| m.head),
        Some(4)
    );
    store.confirm_uplink(Stream::Audit).await?;
    assert_eq!(store.uplink_mark(Stream::Audit).await?, None);
    assert!(store.uplink_mark(Stream::Catalog).await?.is_some());
    // The mark is where the stream ends: past the parent's acknowledgement when that is higher.
    store.set_uplink_acked(Stream::Audit, 9).await?;
    store.mark_unconfirmed("350102").await?;
    assert_eq!(
        store.uplink_mark(Stream::Audit).await?,
        Some(UplinkMark {
            head: 9,
            own_seq: 3
        })
    );
    Ok(())
}

/// A re-chaining that links and hashes records after `(seq, hash)` as a writer does, and marks each record it
/// signs with a recognisable signature.
fn relink(old: &[AuditRecord], after: (u64, &[u8]), last: bool) -> Vec<AuditRecord> {
    let (mut seq, mut prev) = (after.0, after.1.to_vec());
    let n = old.len();
    old.iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            seq += 1;
            r.seq = seq;
            r.prev_hash = std::mem::take(&mut prev);
            r.hash.clear();
            let signed = !r.signature.is_empty() || (last && i + 1 == n);
            r.signature.clear();
            r.hash = fedgate_gateway::audit::record_hash(&r).to_vec();
            if signed {
                r.signature = vec![7; 64];
            }
            prev.clone_from(&r.hash);
            r
        })
        .collect()
}

async fn a_recovered_audit_stream_takes_back_rechains_and_moves(
    store: Arc<dyn Store>,
) -> Result<()> {
    // Before the loss, and forwarded: own records 1-3, a child's 1-2 (positions 1-5).
    let before = chained_after("350102", None, 3);
    store.audit_append(&before).await?;
    let child: Vec<(u64, Option<AuditRecord>)> =
        (1..=2).map(|s| (s, Some(rec("350121", s, 0)))).collect();
    store.apply_child_audit("350121", &child).await?;
    // The store comes back from a backup here; the run that starts marks it.
    store.mark_unconfirmed("350102").await?;
    // Written after the loss, before the parent was reached: own 4'-5' on the stale head, a child's record.
    let stale = chained_after("350102", before.last(), 2);
    store.audit_append(&stale[..1]).await?;
    store
        .apply_child_audit("350121", &[(3, Some(rec("350121", 3, 0)))])
        .await?;
    store.audit_append(&stale[1..]).await?;
    // The parent holds the lost records 4-6 of this chain, and counts positions up to 10 as applied.
    let lost = chained_after("350102", before.last(), 3);
    store.stage_audit(&lost[..2]).await?;
    store.stage_audit(&lost[2..]).await?;
    let staged = store.staged(Stream::Audit).await?;
    assert_eq!(staged.count, 3);
    assert_eq!(staged.last_record.as_ref(), lost.last());

    let plan = AuditRecovery {
        node: "350102".into(),
        cursor: 10,
        mark: 5,
        common: 3,
    };
    let done = store.recover_audit(&plan, &relink).await?;
    assert_eq!(
        done,
        Recovered {
            taken_back: 3,
            redone: 2,
            moved: 3
        }
    );
    let chain = store.audit_chain("350102", 0, 100).await?;
    assert_eq!(
        chain.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert_eq!(
        &chain[..6],
        [before.clone(), lost.clone()].concat().as_slice()
    );
    for pair in chain.windows(2) {
        assert_eq!(
            pair[1].prev_hash, pair[0].hash,
            "record {} links",
            pair[1].seq
        );
    }
    assert_eq!(
        chain[6].request_id, stale[0].request_id,
        "re-chained in order"
    );
    assert_eq!(
        chain[7].signature,
        vec![7; 64],
        "the re-chained end is signed"
    );
    // Positions: those taken back where the parent counts them applied; what was written since the mark after
    // the parent's cursor, in its order; the stream goes on after them.
    let all = store.outbox_after(Stream::Audit, 0, 100).await?;
    assert_eq!(seqs(&all), vec![1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13]);
    let ids: Vec<(String, u64)> = records(&all)?
        .into_iter()
        .map(|r| (r.node_code, r.seq))
        .collect();
    let id = |n: &str, s| (n.to_owned(), s);
    assert_eq!(
        &ids[5..],
        [
            id("350102", 4),
            id("350102", 5),
            id("350102", 6),
            id("350102", 7),
            id("350121", 3),
            id("350102", 8)
        ]
    );
    assert_eq!(store.uplink_acked(Stream::Audit).await?, 10);
    assert_eq!(store.uplink_mark(Stream::Audit).await?, None);
    assert_eq!(store.staged(Stream::Audit).await?.count, 0);
    store
        .audit_append(&chained_after("350102", chain.last(), 1))
        .await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Audit, 13, 10).await?),
        vec![14]
    );
    assert_eq!(store.audit_count().await?, 12);
    Ok(())
}

async fn a_recovered_stream_continues_after_the_parents_cursor(
    store: Arc<dyn Store>,
) -> Result<()> {
    // The parent counts positions up to 9 applied; this node holds 3 and wrote nothing since its start.
    let before = chained_after("350102", None, 3);
    store.audit_append(&before).await?;
    for id in ["350102:a", "350102:b"] {
        store
            .publish_local(
                entry(id, "t", "s", &["x"], ShareType::Unconditional),
                Upstream::Parent,
            )
            .await?;
    }
    store.mark_unconfirmed("350102").await?;
    let plan = AuditRecovery {
        node: "350102".into(),
        cursor: 9,
        mark: 3,
        common: 3,
    };
    let done = store.recover_audit(&plan, &relink).await?;
    assert_eq!(done, Recovered::default());
    store
        .audit_append(&chained_after("350102", before.last(), 1))
        .await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Audit, 3, 10).await?),
        vec![10]
    );
    let done = store
        .recover_catalog(&CatalogRecovery {
            node: "350102".into(),
            cursor: 6,
            mark: 2,
        })
        .await?;
    assert_eq!(done, Recovered::default());
    store
        .publish_local(
            entry("350102:c", "t", "s", &["x"], ShareType::Unconditional),
            Upstream::Parent,
        )
        .await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Catalog, 0, 10).await?),
        vec![1, 2, 7]
    );
    Ok(())
}

fn held(e: &CatalogEntry, withdrawn: bool) -> StoredEntry {
    StoredEntry {
        entry: e.clone(),
        withdrawn,
    }
}

async fn a_recovered_catalog_takes_back_and_publishes_again_above_the_parent(
    store: Arc<dyn Store>,
) -> Result<()> {
    let e = |id: &str, title: &str| entry(id, title, "s", &["x"], ShareType::Unconditional);
    // Before the loss, forwarded: a, b, e at version 1, and a child's entry (positions 1-4).
    for id in ["350102:a", "350102:b", "350102:e"] {
        store.publish_local(e(id, "old"), Upstream::Parent).await?;
    }
    store
        .apply_child_catalog(
            "350121",
            &[(1, upsert(&with_version(&e("350121:k", "kid"), 1)))],
            Upstream::Parent,
        )
        .await?;
    store.mark_unconfirmed("350102").await?;
    // After the loss: e changed again here (its version 2 here), f published new (positions 5-6).
    store
        .publish_local(e("350102:e", "changed here"), Upstream::Parent)
        .await?;
    store
        .publish_local(e("350102:f", "new here"), Upstream::Parent)
        .await?;
    // The parent holds this node's lost changes (it applied positions up to 9): a at 2, b withdrawn at 2, c new,
    // d withdrawn (never seen here), e at 3.
    let parent = [
        held(&with_version(&e("350102:a", "lost update"), 2), false),
        held(&with_version(&e("350102:b", "old"), 2), true),
        held(&with_version(&e("350102:c", "lost new"), 1), false),
        held(&with_version(&e("350102:d", "gone"), 2), true),
        held(&with_version(&e("350102:e", "lost change"), 3), false),
        held(&with_version(&e("350102:f", "new here"), 1), false),
    ];
    store.stage_catalog(&parent[..3]).await?;
    store.stage_catalog(&parent[3..]).await?;
    assert_eq!(
        store.staged(Stream::Catalog).await?.last_id.as_deref(),
        Some("350102:f")
    );
    let done = store
        .recover_catalog(&CatalogRecovery {
            node: "350102".into(),
            cursor: 9,
            mark: 4,
        })
        .await?;
    assert_eq!(
        done,
        Recovered {
            taken_back: 4,
            redone: 1,
            moved: 2
        }
    );
    let get = |id: &'static str| {
        let store = store.clone();
        async move { store.entry(id).await?.context(id) }
    };
    let a = get("350102:a").await?;
    assert_eq!(
        (a.entry.version, a.entry.title.as_str(), a.withdrawn),
        (2, "lost update", false)
    );
    assert!(get("350102:b").await?.withdrawn);
    assert_eq!(get("350102:c").await?.entry.title, "lost new");
    assert!(get("350102:d").await?.withdrawn);
    let ee = get("350102:e").await?;
    assert_eq!(
        (ee.entry.version, ee.entry.title.as_str()),
        (4, "changed here"),
        "the change made here after the loss wins, above the parent's version"
    );
    assert_eq!(get("350102:f").await?.entry.version, 1);
    assert_eq!(search_ids(&store, "lost").await?, ["350102:a", "350102:c"]);
    // The stream: the changes taken back where the parent counts them applied (there to ship if the parent loses
    // them in turn), what was written since the mark after the cursor, then the publication above the parent's.
    let back = store.outbox_after(Stream::Catalog, 4, 100).await?;
    assert_eq!(seqs(&back), vec![5, 6, 7, 8, 10, 11, 12]);
    let taken: Vec<(String, u64)> = changes(&back[..4])?
        .into_iter()
        .map(|c| match c.change {
            Some(catalog_change::Change::Upsert(e)) => (e.id, e.version),
            Some(catalog_change::Change::Withdraw(w)) => (w.id, w.version),
            None => (String::new(), 0),
        })
        .collect();
    let id_v = |id: &str, v| (id.to_owned(), v);
    assert_eq!(
        taken,
        [
            id_v("350102:a", 2),
            id_v("350102:b", 2),
            id_v("350102:c", 1),
            id_v("350102:d", 2)
        ]
    );
    let out = store.outbox_after(Stream::Catalog, 9, 100).await?;
    assert_eq!(seqs(&out), vec![10, 11, 12]);
    let versions: Vec<(String, u64)> = changes(&out)?
        .into_iter()
        .filter_map(|c| match c.change {
            Some(catalog_change::Change::Upsert(e)) => Some((e.id, e.version)),
            _ => None,
        })
        .collect();
    assert_eq!(
        versions,
        [
            ("350102:e".to_owned(), 2),
            ("350102:f".to_owned(), 1),
            ("350102:e".to_owned(), 4)
        ]
    );
    assert_eq!(store.uplink_acked(Stream::Catalog).await?, 9);
    assert_eq!(store.uplink_mark(Stream::Catalog).await?, None);
    assert_eq!(store.staged(Stream::Catalog).await?.count, 0);
    // Versions go on from the parent's: withdrawn entries taken back (one never seen here) come back at 3.
    for id in ["350102:b", "350102:d"] {
        let again = store.publish_local(e(id, "back"), Upstream::Parent).await?;
        assert_eq!(again.version, 3, "{id}");
    }
    assert_eq!(
        seqs(&store.outbox_after(Stream::Catalog, 12, 10).await?),
        vec![13, 14]
    );
    let own = store.own_entries("350102", "", 10).await?;
    assert!(own.iter().all(|r| !r.withdrawn));
    Ok(())
}

async fn positions_close_up_after_a_parent_lost_what_it_acknowledged(
    store: Arc<dyn Store>,
) -> Result<()> {
    // A recovery left positions 4-9 empty (the parent counted them applied).
    let before = chained_after("350102", None, 3);
    store.audit_append(&before).await?;
    store.mark_unconfirmed("350102").await?;
    store
        .recover_audit(
            &AuditRecovery {
                node: "350102".into(),
                cursor: 9,
                mark: 3,
                common: 3,
            },
            &relink,
        )
        .await?;
    let after = chained_after("350102", before.last(), 2);
    store.audit_append(&after).await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Audit, 0, 10).await?),
        vec![1, 2, 3, 10, 11]
    );
    assert_eq!(store.count_after(Stream::Audit, 2).await?, 3);
    // The parent now holds only up to position 2 (it was restored itself): what follows closes up after it.
    assert_eq!(store.close_up(Stream::Audit, 2).await?, 3);
    assert_eq!(
        seqs(&store.outbox_after(Stream::Audit, 0, 10).await?),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(store.uplink_acked(Stream::Audit).await?, 2);
    store
        .audit_append(&chained_after("350102", after.last(), 1))
        .await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Audit, 5, 10).await?),
        vec![6]
    );
    let chain = store.audit_chain("350102", 0, 10).await?;
    assert_eq!(chain.len(), 6);

    // The catalog stream the same way.
    store
        .publish_local(
            entry("350102:a", "t", "s", &["x"], ShareType::Unconditional),
            Upstream::Parent,
        )
        .await?;
    store
        .recover_catalog(&CatalogRecovery {
            node: "350102".into(),
            cursor: 8,
            mark: 1,
        })
        .await?;
    store
        .publish_local(
            entry("350102:b", "t", "s", &["x"], ShareType::Unconditional),
            Upstream::Parent,
        )
        .await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Catalog, 0, 10).await?),
        vec![1, 9]
    );
    assert_eq!(store.close_up(Stream::Catalog, 0).await?, 2);
    assert_eq!(
        seqs(&store.outbox_after(Stream::Catalog, 0, 10).await?),
        vec![1, 2]
    );
    store
        .publish_local(
            entry("350102:c", "t", "s", &["x"], ShareType::Unconditional),
            Upstream::Parent,
        )
        .await?;
    assert_eq!(
        seqs(&store.outbox_after(Stream::Catalog, 0, 10).await?),
        vec![1, 2, 3]
    );
    Ok(())
}

async fn own_entries_are_listed_by_id_withdrawn_ones_too(store: Arc<dyn Store>) -> Result<()> {
    let e = |id: &str| entry(id, "t", "s", &["x"], ShareType::Unconditional);
    for id in ["350102:c", "350102:a", "350102:b", "350103:a", "350100:z"] {
        store.publish_local(e(id), Upstream::Parent).await?;
    }
    store
        .apply_child_catalog(
            "350121",
            &[(1, upsert(&with_version(&e("350121:a"), 1)))],
            Upstream::Parent,
        )
        .await?;
    store.withdraw_local("350102:b", Upstream::Parent).await?;
    let ids = |rows: Vec<StoredEntry>| -> Vec<(String, bool)> {
        rows.into_iter()
            .map(|r| (r.entry.id, r.withdrawn))
            .collect()
    };
    assert_eq!(
        ids(store.own_entries("350102", "", 10).await?),
        [
            ("350102:a".to_owned(), false),
            ("350102:b".to_owned(), true),
            ("350102:c".to_owned(), false)
        ]
    );
    assert_eq!(
        ids(store.own_entries("350102", "350102:a", 1).await?),
        [("350102:b".to_owned(), true)]
    );
    assert!(
        store
            .own_entries("350102", "350102:c", 10)
            .await?
            .is_empty()
    );
    assert!(store.own_entries("350101", "", 10).await?.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Flow-back subscriptions

fn subscription_doc(id: &str, state: i32, body: &[u8]) -> Doc {
    Doc {
        kind: DocKind::Subscription,
        id: id.into(),
        provider_uscc: "provider".into(),
        consumer_uscc: "consumer".into(),
        state,
        due_at: 0,
        body: body.to_vec(),
    }
}

async fn flow_outbox_appends_after_its_head_with_its_state_and_snapshot(
    store: Arc<dyn Store>,
) -> Result<()> {
    let id = "350000-s-1";
    ensure!(store.flow_head(FlowSide::Outbox, id).await? == 0);
    let head = store
        .flow_append(
            &subscription_doc(id, 1, b"position 3"),
            0,
            &[b"a".to_vec(), b"b".to_vec()],
            &[("k1".into(), Some(vec![1])), ("k2".into(), Some(vec![2]))],
        )
        .await?;
    ensure!(head == 2, "{head}");
    let doc = store
        .doc(DocKind::Subscription, id)
        .await?
        .context("stored")?;
    ensure!(doc.body == b"position 3" && doc.state == 1);

    // A writer that believes the head is elsewhere changes nothing.
    match store
        .flow_append(&subscription_doc(id, 2, b"stale"), 1, &[b"x".to_vec()], &[])
        .await
    {
        Err(StoreError::FlowMoved { head: 2, .. }) => {}
        other => bail!("expected FlowMoved at 2, got {other:?}"),
    }
    let doc = store
        .doc(DocKind::Subscription, id)
        .await?
        .context("stored")?;
    ensure!(doc.body == b"position 3", "the state stayed");
    ensure!(store.flow_head(FlowSide::Outbox, id).await? == 2);

    let head = store
        .flow_append(
            &subscription_doc(id, 1, b"position 4"),
            2,
            &[b"c".to_vec()],
            &[("k1".into(), None), ("k2".into(), Some(vec![9]))],
        )
        .await?;
    ensure!(head == 3);
    let items = store.flow_items(FlowSide::Outbox, id, 1, 10).await?;
    ensure!(
        items == vec![(2, b"b".to_vec()), (3, b"c".to_vec())],
        "{items:?}"
    );
    ensure!(
        store.flow_items(FlowSide::Outbox, id, 0, 1).await?.len() == 1,
        "limit"
    );
    ensure!(
        store.flow_head(FlowSide::Inbox, id).await? == 0,
        "sides apart"
    );
    ensure!(
        store.flow_head(FlowSide::Outbox, "350000-s-2").await? == 0,
        "subscriptions apart"
    );
    let snapshot = store.flow_snapshot(id, "", 10).await?;
    ensure!(snapshot == vec![("k2".to_owned(), vec![9])], "{snapshot:?}");
    store
        .flow_append(
            &subscription_doc(id, 1, b"position 4"),
            3,
            &[],
            &[("k0".into(), Some(vec![0])), ("k3".into(), Some(vec![3]))],
        )
        .await?;
    let page = store.flow_snapshot(id, "k0", 1).await?;
    ensure!(
        page == vec![("k2".to_owned(), vec![9])],
        "keyset page: {page:?}"
    );

    // Two writers at the same head: exactly one appends.
    let (doc_a, doc_b) = (subscription_doc(id, 1, b"a"), subscription_doc(id, 1, b"b"));
    let (items_a, items_b) = ([b"a".to_vec()], [b"b".to_vec()]);
    let (a, b) = tokio::join!(
        store.flow_append(&doc_a, 3, &items_a, &[]),
        store.flow_append(&doc_b, 3, &items_b, &[]),
    );
    ensure!(a.is_ok() != b.is_ok(), "one wins: {a:?} {b:?}");
    ensure!(store.flow_head(FlowSide::Outbox, id).await? == 4);
    Ok(())
}

async fn flow_inbox_stores_each_item_once_and_stops_at_a_gap(store: Arc<dyn Store>) -> Result<()> {
    let id = "350000-s-7";
    let item = |seq: u64| (seq, format!("item {seq}").into_bytes());
    ensure!(
        store
            .flow_receive(id, &[item(1), item(2), item(3)], None)
            .await?
            == 3
    );
    // Sent again with more: the known ones are skipped.
    ensure!(
        store
            .flow_receive(id, &[item(2), item(3), item(4)], None)
            .await?
            == 4
    );
    // A gap: nothing after it is stored.
    ensure!(store.flow_receive(id, &[item(6), item(7)], None).await? == 4);
    // Consecutive up to a gap inside the batch; the subscription's document is written with the items.
    let mut ended = subscription_doc(id, 2, b"ended");
    ended.kind = DocKind::Received;
    ensure!(
        store
            .flow_receive(id, &[item(5), item(7)], Some(&ended))
            .await?
            == 5
    );
    let held = store.doc(DocKind::Received, id).await?;
    ensure!(
        held.as_ref().map(|d| d.body.as_slice()) == Some(b"ended".as_slice()),
        "{held:?}"
    );
    let items = store.flow_items(FlowSide::Inbox, id, 0, 100).await?;
    ensure!(
        items.iter().map(|(s, _)| *s).collect::<Vec<_>>() == vec![1, 2, 3, 4, 5],
        "{items:?}"
    );
    ensure!(items[3].1 == b"item 4", "the first copy kept");
    ensure!(store.flow_head(FlowSide::Inbox, id).await? == 5);
    ensure!(store.flow_head(FlowSide::Outbox, id).await? == 0);
    Ok(())
}

fn op(i: i64, method: &str, resource: &str, consumer_node: &str, code: i32) -> OperationRecord {
    OperationRecord {
        node_code: "350102".into(),
        request_id: format!("r{i}"),
        method: method.into(),
        caller: "urn:fedgate:node:350100".into(),
        resource_id: resource.into(),
        consumer_node: consumer_node.into(),
        consumer_uscc: format!("U{consumer_node}"),
        request_in_unix_nanos: 1_000 + i,
        response_out_unix_nanos: 2_000 + i,
        request_bytes: 10,
        response_bytes: 20,
        code,
        ..Default::default()
    }
}

async fn operational_records_filter_page_and_purge(store: Arc<dyn Store>) -> Result<()> {
    let all = OperationQuery {
        limit: 100,
        ..Default::default()
    };
    assert!(store.ops_query(&all).await?.is_empty());
    store.ops_append(&[]).await?;
    let batch: Vec<OperationRecord> = (0..6)
        .map(|i| match i % 3 {
            0 => op(i, "Federation.Forward", "350102:household", "350203", 0),
            1 => op(i, "Federation.Forward", "350102:marriage", "350100", 9),
            _ => op(i, "Agency.Share", "350102:household", "350102", 0),
        })
        .collect();
    store.ops_append(&batch[..4]).await?;
    store.ops_append(&batch[4..]).await?;
    let ids = |rows: &[(u64, OperationRecord)]| {
        rows.iter()
            .map(|(_, r)| r.request_id.clone())
            .collect::<Vec<_>>()
    };
    let rows = store.ops_query(&all).await?;
    assert_eq!(ids(&rows), ["r0", "r1", "r2", "r3", "r4", "r5"]);
    assert_eq!(rows[0].1, batch[0], "a record reads back as it was stored");
    ensure!(rows.windows(2).all(|w| w[0].0 < w[1].0), "positions grow");
    let q = |f: fn(&mut OperationQuery)| {
        let mut q = all.clone();
        f(&mut q);
        q
    };
    let by = async |query: OperationQuery| -> Result<Vec<String>> {
        Ok(ids(&store.ops_query(&query).await?))
    };
    assert_eq!(
        by(q(|q| q.method = Some("Agency.Share".into()))).await?,
        ["r2", "r5"]
    );
    assert_eq!(
        by(q(|q| q.resource_id = Some("350102:marriage".into()))).await?,
        ["r1", "r4"]
    );
    assert_eq!(
        by(q(|q| q.consumer_node = Some("350203".into()))).await?,
        ["r0", "r3"]
    );
    assert_eq!(
        by(q(|q| q.consumer_uscc = Some("U350100".into()))).await?,
        ["r1", "r4"]
    );
    assert_eq!(by(q(|q| q.code = Some(9))).await?, ["r1", "r4"]);
    assert_eq!(
        by(q(|q| q.from_ns = Some(1_002))).await?,
        ["r2", "r3", "r4", "r5"]
    );
    assert_eq!(by(q(|q| q.to_ns = Some(1_002))).await?, ["r0", "r1"]);
    assert_eq!(
        by(q(|q| {
            q.method = Some("Federation.Forward".into());
            q.code = Some(0);
            q.from_ns = Some(1_001);
        }))
        .await?,
        ["r3"]
    );
    // Pages continue after the last position read.
    let first = store
        .ops_query(&OperationQuery {
            limit: 4,
            ..all.clone()
        })
        .await?;
    assert_eq!(ids(&first), ["r0", "r1", "r2", "r3"]);
    let next = OperationQuery {
        after: first.last().map(|(p, _)| *p),
        limit: 4,
        ..all.clone()
    };
    assert_eq!(by(next).await?, ["r4", "r5"]);
    // The purge deletes calls that came in before the bound, and only those.
    assert_eq!(store.ops_purge(1_003).await?, 3);
    assert_eq!(by(all.clone()).await?, ["r3", "r4", "r5"]);
    assert_eq!(store.ops_purge(1_003).await?, 0);
    // The trim keeps the newest records and deletes the oldest beyond the cap.
    assert_eq!(store.ops_trim(5).await?, 0);
    assert_eq!(store.ops_trim(2).await?, 1);
    assert_eq!(by(all.clone()).await?, ["r4", "r5"]);
    assert_eq!(store.ops_trim(2).await?, 0);
    Ok(())
}

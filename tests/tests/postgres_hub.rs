//! A federation whose province keeps its state in PostgreSQL while the cities and counties use SQLite: catalog,
//! shares across the tree, audit forwarding and a province restart behave as on SQLite.
//!
//! Needs a server: `FEDGATE_TEST_POSTGRES` (see `.ci/postgres`); without it the test says so and does nothing,
//! unless `FEDGATE_REQUIRE_POSTGRES=1`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_gateway::audit::verify_store;
use fedgate_gateway::config::StorageConfig;
use fedgate_gateway::store::{PgStore, Store, StoreError};
use fedgate_node::devnet::Devnet;
use fedgate_tests::postgres::scratch_database;
use fedgate_tests::process::fedgate_binary;
use fedgate_tests::{code, eventually, init, key_at, query, standard_topology};

#[tokio::test]
async fn a_province_on_postgresql_serves_routes_and_collects_the_whole_audit_trail() -> Result<()> {
    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    init();
    let province = code("350000");
    let mut specs = standard_topology()?;
    let Some(root) = specs.iter_mut().find(|s| s.code == province) else {
        bail!("the standard topology has no province");
    };
    root.storage = Some(StorageConfig::postgres(db.url.clone()));
    let mut net = Devnet::start(specs).await?;
    net.wait_for_catalog(province, 6, Duration::from_secs(20))
        .await?;

    // A county-to-county share crosses the province.
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let resp = siming
        .share(query("350102:household", &key, &["name"]))
        .await?
        .into_inner();
    let hops: Vec<&str> = resp.route.iter().map(|h| h.node_code.as_str()).collect();
    assert_eq!(hops, ["350203", "350200", "350000", "350100", "350102"]);
    assert_eq!(resp.records.len(), 1);

    // The province keeps its catalog across a restart, and the shares keep crossing it.
    net.stop_node(province).await?;
    net.restart_node(province).await?;
    assert_eq!(net.catalog_size(province).await?, 6);
    let resp = siming
        .share(query("350102:household", &key, &["name"]))
        .await?
        .into_inner();
    assert_eq!(resp.records.len(), 1);

    // Every node's chain reaches the province whole.
    let nodes = net.node_codes();
    eventually(
        "every chain reaches the province",
        Duration::from_secs(20),
        || async {
            let hub = net.node(province)?.store();
            for n in &nodes {
                let own = net.node(*n)?.store().audit_head(n.as_str()).await?;
                let held = hub.audit_head(n.as_str()).await?;
                if own.map(|r| r.seq) != held.map(|r| r.seq) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await?;
    let chains = verify_store(
        net.node(province)?.store().as_ref(),
        &HashMap::new(),
        &HashMap::new(),
    )
    .await
    .context("verifying the province's store")?;
    assert_eq!(chains.len(), nodes.len(), "one chain per node: {chains:?}");

    // The operator's command reads the same database by its URL.
    let out = tokio::process::Command::new(fedgate_binary().await?)
        .args(["audit", "verify", "--db", &db.url])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("OK: {} chains verified", nodes.len())),
        "{text}"
    );

    net.shutdown().await?;
    db.drop_database().await
}

#[tokio::test]
async fn audit_tools_open_only_a_database_that_holds_fedgate_tables() -> Result<()> {
    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    let refused = PgStore::connect_existing(&db.url).await;
    assert!(
        matches!(refused, Err(StoreError::Schema(_))),
        "an empty database is refused, not migrated: {refused:?}"
    );
    PgStore::connect(&db.url).await?.close().await;
    let store = PgStore::connect_existing(&db.url).await?;
    assert_eq!(store.audit_count().await?, 0);
    store.close().await;
    db.drop_database().await
}

#[tokio::test]
async fn a_writer_stuck_behind_a_lock_gives_up_instead_of_waiting_forever() -> Result<()> {
    use sqlx::Connection;

    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    let store = PgStore::connect(&db.url).await?;
    // Another session holds the audit stream's position row, as a stuck transaction would.
    let mut other = sqlx::postgres::PgConnection::connect(&db.url).await?;
    let mut held = other.begin().await?;
    sqlx::query("SELECT last FROM audit_position FOR UPDATE")
        .execute(&mut *held)
        .await?;
    let record = fedgate_proto::v1::AuditRecord {
        node_code: "350000".into(),
        seq: 1,
        outcome: "OK".into(),
        ..Default::default()
    };
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        store.audit_append(std::slice::from_ref(&record)),
    )
    .await
    .context("the append still waits after 30 s")?;
    assert!(
        matches!(&refused, Err(StoreError::Database(e)) if e.to_string().contains("lock timeout")),
        "{refused:?}"
    );
    held.rollback().await?;
    store.audit_append(std::slice::from_ref(&record)).await?;
    assert_eq!(store.audit_count().await?, 1);
    store.close().await;
    other.close().await?;
    db.drop_database().await
}

#[tokio::test]
async fn replicas_sharing_a_database_hear_each_others_revocations_and_catalog_changes() -> Result<()>
{
    use fedgate_gateway::store::{Doc, DocKind, StoreChange, Upstream};

    let Some(db) = scratch_database().await? else {
        return Ok(());
    };
    let writer = PgStore::connect(&db.url).await?;
    let listener = PgStore::connect(&db.url).await?;
    let Some(mut feed) = listener.change_feed().await? else {
        bail!("a PostgreSQL store has a change feed");
    };
    let doc = |kind, id: &str| Doc {
        kind,
        id: id.into(),
        provider_uscc: String::new(),
        consumer_uscc: String::new(),
        state: 0,
        due_at: 0,
        body: Vec::new(),
    };
    // An application is nothing another replica keeps a copy of; a revocation is.
    writer.put_doc(&doc(DocKind::Application, "app-1")).await?;
    writer.put_doc(&doc(DocKind::Revocation, "grant-7")).await?;
    let entry = fedgate_proto::v1::CatalogEntry {
        id: "350000:household".into(),
        node_code: "350000".into(),
        title: "household".into(),
        ..Default::default()
    };
    writer.publish_local(entry.clone(), Upstream::Root).await?;
    writer
        .withdraw_local("350000:household", Upstream::Root)
        .await?;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .context("no change arrived within 10 s")??,
        );
    }
    assert_eq!(
        seen,
        [
            StoreChange::Revoked("grant-7".into()),
            StoreChange::Entry("350000:household".into()),
            StoreChange::Entry("350000:household".into()),
        ]
    );
    writer.close().await;
    listener.close().await;
    db.drop_database().await
}

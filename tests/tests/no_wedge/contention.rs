//! Storage contention: waited for inside the node, then UNAVAILABLE naming the node, never INTERNAL.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_gateway::config::{NodeConfig, RoutingConfig, StorageConfig};
use fedgate_gateway::ident::Peer;
use fedgate_proto::v1::{
    AuditOperation, CatalogChange, PublishEntryRequest, PushRequest, ShareType, Stream, StreamItem,
    catalog_change, stream_item,
};
use fedgate_tests::db_lock::WriteLock;
use fedgate_tests::{Devnet, NodeSpec, code, federation_client, init, own_audit_records, registry};
use tonic::Code;

use super::{WAIT, new_entry};

/// `[storage] busy_timeout_ms` of the contention test's nodes.
const BUSY_MS: u64 = 800;

/// The node configuration with the contention test's busy timeout.
fn with_busy_timeout(mut config: NodeConfig) -> NodeConfig {
    if let StorageConfig::Sqlite {
        busy_timeout_ms, ..
    } = &mut config.storage
    {
        *busy_timeout_ms = BUSY_MS;
    }
    config
}

#[tokio::test]
async fn a_locked_database_is_waited_for_then_answered_unavailable_and_nothing_is_lost()
-> Result<()> {
    use ShareType::{Conditional, Unconditional};
    init();
    let province = code("350000");
    let city = code("350100");
    let specs = vec![
        NodeSpec::new("350000")?.provider(
            2,
            "province provider",
            registry(Unconditional, Conditional, 5),
        )?,
        NodeSpec::new("350100")?.provider(
            2,
            "Fuzhou provider",
            registry(Unconditional, Conditional, 3),
        )?,
    ];
    let net = Devnet::start_configured(specs, RoutingConfig::default(), with_busy_timeout).await?;
    net.wait_for_catalog(province, 4, WAIT).await?;
    let db = match &net.node_config(province)?.storage {
        StorageConfig::Sqlite { path, .. } => path.clone(),
        other => bail!("the province is not on SQLite: {other:?}"),
    };
    let here = net.provider_at(province)?;
    let template = here.published[0].clone();
    let mut publisher = net.client(&here.uscc).await?;
    let fuzhou = net.provider_at(city)?;
    let mut city_publisher = net.client(&fuzhou.uscc).await?;
    let publish = |local: &str| PublishEntryRequest {
        entry: Some(new_entry(&template, local)),
    };

    // Another connection holds the province's write lock for longer than the node waits.
    let lock = WriteLock::take(&db).await?;
    let began = Instant::now();
    let refused = publisher
        .publish_entry(publish("while-locked"))
        .await
        .expect_err("a publish against a locked database cannot succeed");
    let took = began.elapsed();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("node 350000") && refused.message().contains("retry"),
        "the answer names the node and says to retry: {}",
        refused.message()
    );
    assert!(
        took >= Duration::from_millis(BUSY_MS),
        "the node waited for the lock first: answered after {took:?}"
    );
    // A push from the city (one it already delivered, so applying it again changes nothing) meets the same lock,
    // and is told the same: the uplink retries it like any other interruption.
    let city_cert = net.ca().issue(&Peer::Node(city), &[])?;
    let mut as_city = federation_client(&net, "350000", &city_cert).await?;
    let replayed = as_city
        .push(PushRequest {
            stream: Stream::Catalog as i32,
            items: vec![StreamItem {
                seq: 1,
                body: Some(stream_item::Body::Catalog(CatalogChange {
                    change: Some(catalog_change::Change::Upsert(fuzhou.published[0].clone())),
                })),
            }],
        })
        .await
        .expect_err("a push against a locked database cannot succeed");
    assert_eq!(replayed.code(), Code::Unavailable, "{replayed:?}");
    assert!(
        replayed.message().contains("node 350000") && replayed.message().contains("retry"),
        "{}",
        replayed.message()
    );
    // The city's change waits in its outbox while the province cannot store it.
    let city_entry = city_publisher
        .publish_entry(PublishEntryRequest {
            entry: Some(new_entry(&fuzhou.published[0], "during-lock")),
        })
        .await?
        .into_inner()
        .entry
        .context("stored entry")?;
    let province_store = net.node(province)?.store().clone();
    tokio::time::sleep(Duration::from_millis(2 * BUSY_MS)).await;
    assert!(
        province_store.entry(&city_entry.id).await?.is_none(),
        "the locked province stored nothing"
    );
    lock.release().await?;

    // Once the lock is gone the same publish succeeds and the city's change arrives: nothing was lost.
    let stored = publisher
        .publish_entry(publish("while-locked"))
        .await?
        .into_inner()
        .entry
        .context("stored entry")?;
    assert_eq!(
        (stored.id.as_str(), stored.version),
        ("350000:while-locked", 1),
        "the refused attempt stored nothing"
    );
    net.wait_for_catalog(province, 6, WAIT).await?;
    let arrived = province_store
        .entry(&city_entry.id)
        .await?
        .context("the city's change reached the province")?;
    assert_eq!(arrived.entry.version, 1);
    let published: Vec<_> = own_audit_records(&net, "350000")
        .await?
        .into_iter()
        .filter(|r| {
            r.operation == AuditOperation::CatalogPublish as i32
                && r.resource_id == "350000:while-locked"
        })
        .map(|r| r.outcome)
        .collect();
    assert_eq!(published, ["OK"], "the successful publish is recorded once");

    // A lock held for less than the node waits costs only time.
    let lock = WriteLock::take(&db).await?;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(BUSY_MS / 4)).await;
        lock.release().await
    });
    let began = Instant::now();
    let stored = publisher
        .publish_entry(publish("brief-lock"))
        .await?
        .into_inner()
        .entry
        .context("stored entry")?;
    assert_eq!(stored.version, 1);
    assert!(
        began.elapsed() >= Duration::from_millis(BUSY_MS / 4),
        "the publish waited for the lock"
    );
    release.await??;
    net.shutdown().await
}

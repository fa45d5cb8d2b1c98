//! A parent that stops answering is dropped within the uplink's call deadline and reached again.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fedgate_proto::v1::{CatalogEntry, PublishBatchRequest, ShareType};
use fedgate_tests::process::{AuditDump, ProcessFederation, catalog_count};
use fedgate_tests::{NodeSpec, code, init, registry};

use super::{SERIAL, WAIT, new_entry};

/// `[routing] uplink_call_timeout_ms` of the stalled-parent test's nodes.
const UPLINK_TIMEOUT_MS: u64 = 1000;

#[tokio::test]
async fn a_parent_that_stops_answering_is_dropped_and_both_streams_resume_without_loss()
-> Result<()> {
    use ShareType::{Conditional, Unconditional};
    let _serial = SERIAL.lock().await;
    init();
    let province = code("350000");
    let city = code("350100");
    let specs = vec![
        NodeSpec::new("350000")?.consumer(1, "province consumer")?,
        NodeSpec::new("350100")?.provider(
            2,
            "Fuzhou provider",
            registry(Unconditional, Conditional, 3),
        )?,
    ];
    let fed = ProcessFederation::start_configured(specs, &[city], &|c| {
        c.routing.uplink_call_timeout_ms = UPLINK_TIMEOUT_MS;
    })
    .await?;
    let root_db = fed.db_path(province)?.to_path_buf();
    wait_catalog(&root_db, 2).await?;
    fed.wait_audit_settled(WAIT).await?;

    // The province stops answering on the connection the city's streams use, and on every new one.
    let relay = fed.relay(city)?;
    assert!(relay.stall() >= 1, "the city's link was open");
    // The city goes on working: its provider publishes, which the city must ship up.
    let provider = fed.provider_at(city)?;
    let entries: Vec<CatalogEntry> = (0..20)
        .map(|i| new_entry(&provider.published[0], &format!("stalled-{i:02}")))
        .collect();
    fed.client(&provider.uscc)
        .await?
        .publish_batch(PublishBatchRequest { entries })
        .await?;
    // The pushes on the silent connection run into their deadline: the uplink drops the connection and tries
    // a new one (which the stalled parent accepts and never serves either). Without a deadline it would wait
    // for HTTP/2 keepalive, 20 to 30 s.
    let began = Instant::now();
    while relay.stats().stalled.load(Ordering::Relaxed) == 0 {
        if began.elapsed() > Duration::from_secs(10) {
            bail!(
                "the city kept waiting on the silent connection for {:?}",
                began.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        catalog_count(&root_db).await?,
        2,
        "nothing reached the stalled province"
    );

    // The province answers again on new connections: both streams resume; nothing is lost or duplicated.
    relay.resume();
    let resumed = Instant::now();
    wait_catalog(&root_db, 22).await?;
    let settled = fed.wait_audit_settled(WAIT).await?;
    eprintln!(
        "streams resumed: catalog after {:?}, audit after {:?}",
        resumed.elapsed(),
        settled.elapsed
    );
    assert_eq!(catalog_count(&root_db).await?, 22);
    // The frozen connections are still open at the province; close them before stopping it.
    relay.cut();
    let mut fed = fed;
    fed.stop_all().await?;
    let root = AuditDump::read(&root_db).await?;
    let own = AuditDump::read(fed.db_path(city)?).await?;
    assert_eq!(
        root.chain("350100"),
        own.chain("350100"),
        "the province holds the city's records exactly once"
    );
    root.verify("350100", None)?;
    fed.shutdown().await
}

/// Waits until the database at `db` holds `n` live catalog entries.
async fn wait_catalog(db: &std::path::Path, n: u64) -> Result<()> {
    let began = Instant::now();
    loop {
        let have = catalog_count(db).await?;
        if have == n {
            return Ok(());
        }
        if have > n || began.elapsed() > WAIT {
            bail!(
                "{} holds {have} catalog entries, expected {n}",
                db.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

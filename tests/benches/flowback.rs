//! Delivery throughput of a flow-back subscription: `cargo bench -p fedgate-tests --bench flowback`.
//!
//! Three real nodes in this process (province 350000 with a provider of `FLOWBACK_BENCH_RECORDS` residents, city
//! 350100, county 350102 with the subscriber; mTLS, SQLite); the county's agency subscribes to
//! `350000:household` under a bulk grant and reads its stream. Timed: from `Subscribe` until the county's agency
//! has read the whole first export, then from the first of `FLOWBACK_BENCH_CHANGES` provider changes until it has
//! read them all. `FLOWBACK_BENCH_BATCH` sets `[flowback] max_batch_items` (default 512).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fedgate_proto::v1::ShareType;
use fedgate_tests::flowback::{assert_consecutive, bulk_grant, read, subscribe};
use fedgate_tests::{Devnet, NodeSpec, code};

fn knob(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

async fn run() -> Result<()> {
    let records = knob("FLOWBACK_BENCH_RECORDS", 100_000)?;
    let changes = knob("FLOWBACK_BENCH_CHANGES", 10_000)?;
    let batch = u32::try_from(knob("FLOWBACK_BENCH_BATCH", 512)?)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let net = Devnet::start_configured(
        vec![
            NodeSpec::new("350000")?.provider(
                2,
                "province provider",
                fedgate_node::devnet::ProviderSpec {
                    household: ShareType::Unconditional,
                    marriage: ShareType::Conditional,
                    persons: records,
                    seed: 11,
                },
            )?,
            NodeSpec::new("350100")?,
            NodeSpec::new("350102")?.consumer(1, "county consumer")?,
        ],
        Default::default(),
        move |mut c| {
            c.flowback.poll_ms = 20;
            c.flowback.max_batch_items = batch;
            c
        },
    )
    .await?;
    net.wait_for_catalog(code("350000"), 2, Duration::from_secs(60))
        .await?;
    let fields = ["id_number", "name", "address", "household_no"];
    let uscc = net.consumer_at(code("350102"))?.uscc.clone();
    let mut c = net.client(&uscc).await?;
    let grant = bulk_grant(&mut c, "350000:household", &fields).await?;
    let started = Instant::now();
    let sub = subscribe(&mut c, "350000:household", &grant, &fields).await?;
    let first = read(&mut c, &sub.id, 0, records, Duration::from_secs(3600)).await?;
    let export = started.elapsed();
    assert_consecutive(0, &first.items)?;

    let p = net
        .provider_at(code("350000"))?
        .provider
        .clone()
        .context("provider in this process")?;
    let ids: Vec<String> = (0..changes)
        .filter_map(|i| p.registry().sample_id(i % records).map(str::to_owned))
        .collect();
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        p.edit(id, |r| r.household_no = format!("BENCH-{i}"));
    }
    let later = read(
        &mut c,
        &sub.id,
        first.last_seq(),
        ids.len(),
        Duration::from_secs(3600),
    )
    .await?;
    let follow = started.elapsed();
    assert_consecutive(first.last_seq(), &later.items)?;

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    println!("flow-back delivery, province -> city -> county, batch {batch} items");
    println!(
        "  first export: {records} records in {:.2} s = {:.0} records/s",
        export.as_secs_f64(),
        rate(records, export)
    );
    println!(
        "  changes:      {} changes in {:.2} s = {:.0} changes/s (from the first change to the last read)",
        ids.len(),
        follow.as_secs_f64(),
        rate(ids.len(), follow)
    );
    net.shutdown().await
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

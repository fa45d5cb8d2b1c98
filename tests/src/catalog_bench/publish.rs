//! Publication over real nodes (in-process `Devnet`, real mTLS, SQLite files): batch publication at one county,
//! and a whole province publishing at once until the province holds every entry.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fedgate_gateway::ident::DivisionCode;
use fedgate_node::devnet::{Devnet, NodeSpec};
use fedgate_proto::v1::{CatalogEntry, PublishBatchRequest};

use super::corpus;
use super::{BatchResult, ConvergenceResult, Latencies};

/// Entry `i` as an agency sends it: a local code, the node and provider left for the node to fill in.
fn to_publish(i: usize, nodes: &[DivisionCode]) -> Result<CatalogEntry> {
    let mut e = corpus::entry(i, nodes)?;
    e.id = format!("e{i}");
    e.node_code.clear();
    e.provider_uscc.clear();
    e.version = 0;
    e.updated_at.clear();
    Ok(e)
}

async fn wait_for(net: &Devnet, node: DivisionCode, n: u64, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let have = net.catalog_size(node).await?;
        if have >= n {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("node {node} holds {have} entries after {timeout:?}, expected {n}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One agency at county 350102 publishes `batches` batches of `size` entries, one call after the other.
pub async fn batch_publish(batches: usize, size: usize) -> Result<BatchResult> {
    let codes = ["350000", "350100", "350102"];
    let specs = codes
        .iter()
        .map(|c| NodeSpec::new(c)?.consumer(1, "publisher"))
        .collect::<Result<Vec<_>>>()?;
    let net = Devnet::start(specs).await?;
    let county: DivisionCode = "350102".parse()?;
    let nodes = vec![county];
    let agency = net.consumer_at(county)?.uscc.clone();
    let mut client = net.client(&agency).await?;
    let mut latencies = Latencies::default();
    let start = Instant::now();
    for b in 0..batches {
        let entries = (b * size..(b + 1) * size)
            .map(|i| to_publish(i, &nodes))
            .collect::<Result<Vec<_>>>()?;
        let t = Instant::now();
        let stored = client
            .publish_batch(PublishBatchRequest { entries })
            .await
            .with_context(|| format!("batch {b}"))?
            .into_inner()
            .entries;
        latencies.push(t.elapsed());
        ensure!(
            stored.len() == size,
            "batch {b} stored {} entries",
            stored.len()
        );
    }
    let published = start.elapsed();
    let total = (batches * size) as u64;
    wait_for(&net, "350000".parse()?, total, Duration::from_secs(600)).await?;
    let at_province = start.elapsed();
    net.shutdown().await?;
    Ok(BatchResult {
        entries: batches * size,
        batch: size,
        latencies,
        published,
        at_province,
    })
}

/// Every node of a province of `cities` cities with `counties` counties each publishes `per_node` entries at
/// once (one agency per node, batches of at most 1 000); measured from the first call until the province holds
/// them all. Then `queries` searches of each discovery kind from a county and at the province
/// ([`super::discovery`]).
pub async fn converge(
    cities: u32,
    counties: u32,
    per_node: usize,
    queries: usize,
) -> Result<ConvergenceResult> {
    let nodes = corpus::nodes_of(cities, counties)?;
    let specs = nodes
        .iter()
        .map(|c| NodeSpec::new(c.as_str())?.consumer(1, "publisher"))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    // The discovery phase asks searches back to back from one agency: measured is the search, not the agency's
    // rate limit.
    let net = Devnet::start_configured(specs, Default::default(), |mut c| {
        c.rate_limits.agency_calls_per_second = 100_000;
        c.rate_limits.agency_burst = 100_000;
        c
    })
    .await?;
    let startup = started.elapsed();
    let mut clients = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let agency = net.consumer_at(*node)?.uscc.clone();
        clients.push(net.client(&agency).await?);
    }
    let province: DivisionCode = "350000".parse()?;
    let before = net.catalog_size(province).await?;
    let total = (nodes.len() * per_node) as u64;
    let mut batches = Vec::with_capacity(nodes.len());
    for (n, node) in nodes.iter().enumerate() {
        let one = vec![*node];
        let mut mine = Vec::new();
        let mut i = 0;
        while i < per_node {
            let end = (i + 1000).min(per_node);
            mine.push(
                (i..end)
                    .map(|k| to_publish(n * per_node + k, &one))
                    .collect::<Result<Vec<_>>>()?,
            );
            i = end;
        }
        batches.push(mine);
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(nodes.len());
    for (mut client, mine) in clients.into_iter().zip(batches) {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Latencies::default();
            for entries in mine {
                let t = Instant::now();
                client
                    .publish_batch(PublishBatchRequest { entries })
                    .await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>((latencies, Instant::now()))
        }));
    }
    let mut latencies = Latencies::default();
    let mut last_answer = start;
    for t in tasks {
        let (l, done) = t.await??;
        latencies.extend(l);
        last_answer = last_answer.max(done);
    }
    wait_for(&net, province, before + total, Duration::from_secs(600)).await?;
    let converged = start.elapsed();
    let discovery = if queries > 0 && counties > 0 {
        Some(super::discovery::measure(&net, &nodes, queries).await?)
    } else {
        None
    };
    net.shutdown().await?;
    Ok(ConvergenceResult {
        nodes: nodes.len(),
        per_node,
        startup,
        published: last_answer.duration_since(start),
        converged,
        latencies,
        discovery,
    })
}

//! Discovery from a county over the converged province (111 nodes, 111 000 entries in the full run): the same
//! searches asked by an agency at a county (routed up to the province, which answers) and by an agency at the
//! province (answered there), interleaved in one run; and what holding the whole catalog costs, as the province's
//! store holds it, against what a county holds.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, ensure};
use fedgate_gateway::ident::DivisionCode;
use fedgate_node::devnet::Devnet;
use fedgate_proto::v1::SearchCatalogRequest;

use super::{Latencies, QueryKind};

/// The query kinds measured: text (Chinese, rare and typed words) and a filter.
pub const KINDS: [QueryKind; 4] = [
    QueryKind::ChineseWord,
    QueryKind::RareWord,
    QueryKind::Prefix,
    QueryKind::ShareType,
];

/// One kind of search asked at a county and at the province.
#[derive(Debug, Clone)]
pub struct DiscoveryRow {
    /// The kind.
    pub kind: QueryKind,
    /// Asked by an agency at the county, answered by the province (one per search, end to end over mTLS).
    pub routed: Latencies,
    /// Asked by an agency at the province, answered there.
    pub local: Latencies,
    /// Entries one page held, on average.
    pub mean_results: f64,
}

/// What discovery measured.
#[derive(Debug, Clone)]
pub struct DiscoveryResult {
    /// The county that asked.
    pub county: DivisionCode,
    /// Entries the province held.
    pub province_entries: u64,
    /// Entries the county held.
    pub county_entries: u64,
    /// Bytes of the province's SQLite store (database and WAL files) after the run.
    pub province_store_bytes: u64,
    /// Bytes of the county's.
    pub county_store_bytes: u64,
    /// One row per kind.
    pub rows: Vec<DiscoveryRow>,
}

fn store_bytes(dir: &Path, node: DivisionCode) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|s| std::fs::metadata(dir.join(format!("node-{node}.db{s}"))).ok())
        .map(|m| m.len())
        .sum()
}

/// Runs `queries` searches of each kind of [`KINDS`] from the last county of `nodes` and from the province.
pub async fn measure(
    net: &Devnet,
    nodes: &[DivisionCode],
    queries: usize,
) -> Result<DiscoveryResult> {
    let province: DivisionCode = "350000".parse()?;
    let county = *nodes
        .iter()
        .rev()
        .find(|n| n.parent().is_some_and(|p| p.parent().is_some()))
        .ok_or_else(|| anyhow::anyhow!("no county among the nodes"))?;
    let mut at_county = net.client(&net.consumer_at(county)?.uscc).await?;
    let mut at_province = net.client(&net.consumer_at(province)?.uscc).await?;
    let mut rows = Vec::new();
    for kind in KINDS {
        let mut routed = Latencies::default();
        let mut local = Latencies::default();
        let mut found = 0usize;
        // One unmeasured round of each first: warm page cache and connections.
        for k in 0..queries.min(4) {
            let req = kind.request(k, nodes)?;
            at_county.search_catalog(req.clone()).await?;
            at_province.search_catalog(req).await?;
        }
        for k in 0..queries {
            let req: SearchCatalogRequest = kind.request(k, nodes)?;
            let t = Instant::now();
            let far = at_county.search_catalog(req.clone()).await?.into_inner();
            routed.push(t.elapsed());
            let t = Instant::now();
            let near = at_province.search_catalog(req).await?.into_inner();
            local.push(t.elapsed());
            ensure!(
                far.answered_by == "350000" && far.entries == near.entries,
                "{}: the county's answer differs from the province's",
                kind.name()
            );
            found += far.entries.len();
        }
        rows.push(DiscoveryRow {
            kind,
            routed,
            local,
            mean_results: found as f64 / queries.max(1) as f64,
        });
    }
    Ok(DiscoveryResult {
        county,
        province_entries: net.catalog_size(province).await?,
        county_entries: net.catalog_size(county).await?,
        province_store_bytes: store_bytes(net.dir(), province),
        county_store_bytes: store_bytes(net.dir(), county),
        rows,
    })
}

impl std::fmt::Display for DiscoveryResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<std::time::Duration>| {
            d.map_or_else(|| "-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
        };
        writeln!(
            f,
            "\ndiscovery: searches from county {} (routed up two hops, answered by the province) and the same at the \
             province, interleaved; the province holds {} entries in {:.1} MiB of store (its audit records \
             included), the county {} in {:.1} MiB",
            self.county,
            self.province_entries,
            self.province_store_bytes as f64 / (1024.0 * 1024.0),
            self.county_entries,
            self.county_store_bytes as f64 / (1024.0 * 1024.0)
        )?;
        writeln!(
            f,
            "\n| query | county p50 ms | county p99 ms | province p50 ms | province p99 ms | p50 ratio | entries per page |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|")?;
        for r in &self.rows {
            let ratio = match (r.routed.quantile(0.5), r.local.quantile(0.5)) {
                (Some(a), Some(b)) if !b.is_zero() => {
                    format!("{:.1}", a.as_secs_f64() / b.as_secs_f64())
                }
                _ => "-".into(),
            };
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {ratio} | {:.1} |",
                r.kind.name(),
                ms(r.routed.quantile(0.5)),
                ms(r.routed.quantile(0.99)),
                ms(r.local.quantile(0.5)),
                ms(r.local.quantile(0.99)),
                r.mean_results
            )?;
        }
        Ok(())
    }
}

//! The catalog-at-province-scale benchmark: search over 111 000 and 1 000 000 entries, batch publication of
//! 111 000 entries, and a 111-node province converging after every node published 1 000 entries.
//!
//! Search runs on a store filled through its own apply path ([`search::fill`]: the province applying its
//! children's pushes, without the network), the queries built exactly as the province's Agency service builds
//! them. Publication and convergence run over real nodes ([`publish`]). `cargo bench -p fedgate-tests --bench
//! catalog_scale` runs it in full; [`CatalogBenchConfig::quick`] is the smoke-test size
//! (`tests/tests/catalog_bench_smoke.rs`); figures in `docs/benchmarks.md`.

pub mod corpus;
pub mod discovery;
pub mod publish;
pub mod search;

use std::fmt;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{Context, Result};
use fedgate_gateway::store::PgStore;

pub use search::QueryKind;

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct CatalogBenchConfig {
    /// Catalog sizes searched.
    pub search_sizes: Vec<usize>,
    /// Searches of each kind per size.
    pub queries: usize,
    /// Batches published one after the other at one county, and entries per batch.
    pub batches: (usize, usize),
    /// Cities, counties per city and entries per node of the converging province.
    pub province: (u32, u32, usize),
    /// Also search a PostgreSQL store of each size, in a scratch database of the test server
    /// (`FEDGATE_TEST_POSTGRES`).
    pub postgres: bool,
}

impl CatalogBenchConfig {
    /// The full run: search over 111 000 and 1 000 000 entries, 111 batches of 1 000, 111 nodes × 1 000.
    pub fn full() -> Self {
        Self {
            search_sizes: vec![111_000, 1_000_000],
            queries: 200,
            batches: (111, 1000),
            province: (10, 10, 1000),
            postgres: false,
        }
    }

    /// A few seconds: small sizes, every scenario once.
    pub fn quick() -> Self {
        Self {
            search_sizes: vec![3_000],
            queries: 10,
            batches: (3, 200),
            province: (2, 2, 50),
            postgres: false,
        }
    }

    /// [`CatalogBenchConfig::full`] (or [`CatalogBenchConfig::quick`] with `CATALOG_BENCH_QUICK=1`) changed by
    /// `CATALOG_BENCH_SIZES` (comma-separated), `CATALOG_BENCH_QUERIES`, `CATALOG_BENCH_BATCHES` (`count x size`,
    /// `0x0` skips), `CATALOG_BENCH_PROVINCE` (`cities x counties x entries`, `0x0x0` skips) and
    /// `CATALOG_BENCH_POSTGRES=1`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let nums = |k: &str, v: &str, sep: char| -> Result<Vec<usize>> {
            v.split(sep)
                .map(|n| {
                    n.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{k}={v}"))
                })
                .collect()
        };
        let mut c = if var("CATALOG_BENCH_QUICK").is_some_and(|v| v != "0") {
            Self::quick()
        } else {
            Self::full()
        };
        c.postgres = var("CATALOG_BENCH_POSTGRES").is_some_and(|v| v != "0");
        if let Some(v) = var("CATALOG_BENCH_SIZES") {
            c.search_sizes = nums("CATALOG_BENCH_SIZES", &v, ',')?;
        }
        if let Some(v) = var("CATALOG_BENCH_QUERIES") {
            c.queries = v
                .parse()
                .with_context(|| format!("CATALOG_BENCH_QUERIES={v}"))?;
        }
        if let Some(v) = var("CATALOG_BENCH_BATCHES") {
            match nums("CATALOG_BENCH_BATCHES", &v, 'x')?[..] {
                [n, size] => c.batches = (n, size),
                _ => anyhow::bail!("CATALOG_BENCH_BATCHES={v}: expected COUNTxSIZE"),
            }
        }
        if let Some(v) = var("CATALOG_BENCH_PROVINCE") {
            match nums("CATALOG_BENCH_PROVINCE", &v, 'x')?[..] {
                [cities, counties, n] => {
                    c.province = (u32::try_from(cities)?, u32::try_from(counties)?, n)
                }
                _ => anyhow::bail!("CATALOG_BENCH_PROVINCE={v}: expected CITIESxCOUNTIESxENTRIES"),
            }
        }
        Ok(c)
    }
}

/// Measured durations, in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    /// Adds one.
    pub fn push(&mut self, d: Duration) {
        self.0
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds all of `other`.
    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none was measured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The nearest-rank `q` quantile.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let mut v = self.0.clone();
        v.sort_unstable();
        let n = v.len();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(Duration::from_micros(v[rank - 1]))
    }
}

/// One kind of search at one catalog size.
#[derive(Debug, Clone)]
pub struct SearchRow {
    /// The store's backend.
    pub backend: &'static str,
    /// Entries in the catalog.
    pub entries: usize,
    /// The kind of query.
    pub kind: QueryKind,
    /// One per search.
    pub latencies: Latencies,
    /// Entries one page held, on average.
    pub mean_results: f64,
}

/// Batch publication at one county.
#[derive(Debug, Clone)]
pub struct BatchResult {
    /// Entries published.
    pub entries: usize,
    /// Entries per call.
    pub batch: usize,
    /// One per call.
    pub latencies: Latencies,
    /// From the first call until the last was answered.
    pub published: Duration,
    /// From the first call until the province held every entry.
    pub at_province: Duration,
}

/// A province publishing at once.
#[derive(Debug, Clone)]
pub struct ConvergenceResult {
    /// Nodes.
    pub nodes: usize,
    /// Entries each node published.
    pub per_node: usize,
    /// Time to start the federation.
    pub startup: Duration,
    /// From the first call until the last was answered.
    pub published: Duration,
    /// From the first call until the province held every entry.
    pub converged: Duration,
    /// One per call.
    pub latencies: Latencies,
    /// Searches from a county routed to the province against the same searches at the province.
    pub discovery: Option<discovery::DiscoveryResult>,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct CatalogReport {
    /// Filling each searched store: backend, entries and time.
    pub fills: Vec<(&'static str, usize, Duration)>,
    /// Bytes of each filled SQLite store (database and WAL), which holds only the catalog: what a node holding
    /// the whole catalog of that size would keep.
    pub catalog_bytes: Vec<(usize, u64)>,
    /// Search rows.
    pub search: Vec<SearchRow>,
    /// Batch publication, unless skipped.
    pub batch: Option<BatchResult>,
    /// Convergence, unless skipped.
    pub convergence: Option<ConvergenceResult>,
}

/// Runs every scenario of `config`.
pub async fn run(config: CatalogBenchConfig) -> Result<CatalogReport> {
    let mut report = CatalogReport::default();
    for &n in &config.search_sizes {
        let dir = tempfile::tempdir()?;
        let filled = search::fill(&dir.path().join("province.db"), n).await?;
        report.fills.push(("sqlite", filled.entries, filled.took));
        let bytes: u64 = ["province.db", "province.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(dir.path().join(f)).ok())
            .map(|m| m.len())
            .sum();
        report.catalog_bytes.push((filled.entries, bytes));
        report
            .search
            .extend(search::measure("sqlite", &filled.store, n, config.queries).await?);
        filled.store.close().await;
        if config.postgres {
            let db = crate::postgres::scratch_database()
                .await?
                .context("CATALOG_BENCH_POSTGRES needs FEDGATE_TEST_POSTGRES")?;
            let store = Arc::new(PgStore::connect(&db.url).await?);
            let filled = search::fill_store(store, n).await?;
            report.fills.push(("postgres", filled.entries, filled.took));
            report
                .search
                .extend(search::measure("postgres", &filled.store, n, config.queries).await?);
            filled.store.close().await;
            db.drop_database().await?;
        }
    }
    let (batches, size) = config.batches;
    if batches > 0 && size > 0 {
        report.batch = Some(publish::batch_publish(batches, size).await?);
    }
    let (cities, counties, per_node) = config.province;
    if per_node > 0 {
        report.convergence =
            Some(publish::converge(cities, counties, per_node, config.queries).await?);
    }
    Ok(report)
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
}

impl fmt::Display for CatalogReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (backend, n, took) in &self.fills {
            writeln!(
                f,
                "{backend}: filled {n} entries through the store's apply path in {:.1} s ({:.0} entries/s)",
                took.as_secs_f64(),
                *n as f64 / took.as_secs_f64().max(1e-9)
            )?;
        }
        for (n, bytes) in &self.catalog_bytes {
            writeln!(
                f,
                "sqlite: a store holding only the catalog of {n} entries takes {:.1} MiB ({:.0} bytes per entry)",
                *bytes as f64 / (1024.0 * 1024.0),
                *bytes as f64 / (*n).max(1) as f64
            )?;
        }
        if !self.search.is_empty() {
            writeln!(
                f,
                "\n| store | entries | query | p50 ms | p99 ms | max ms | entries per page |"
            )?;
            writeln!(f, "|---|---:|---|---:|---:|---:|---:|")?;
            for r in &self.search {
                writeln!(
                    f,
                    "| {} | {} | {} | {} | {} | {} | {:.1} |",
                    r.backend,
                    r.entries,
                    r.kind.name(),
                    ms(r.latencies.quantile(0.5)),
                    ms(r.latencies.quantile(0.99)),
                    ms(r.latencies.quantile(1.0)),
                    r.mean_results
                )?;
            }
        }
        if let Some(b) = &self.batch {
            writeln!(
                f,
                "\nbatch publish: {} entries in calls of {} at one county: {:.1} s ({:.0} entries/s), call p50 {} ms \
                 p99 {} ms; at the province after {:.1} s",
                b.entries,
                b.batch,
                b.published.as_secs_f64(),
                b.entries as f64 / b.published.as_secs_f64().max(1e-9),
                ms(b.latencies.quantile(0.5)),
                ms(b.latencies.quantile(0.99)),
                b.at_province.as_secs_f64()
            )?;
        }
        if let Some(c) = &self.convergence {
            writeln!(
                f,
                "\nconvergence: {} nodes x {} entries (started in {:.1} s): every call answered after {:.2} s \
                 (call p50 {} ms, p99 {} ms); the province held all {} entries {:.2} s after the first call",
                c.nodes,
                c.per_node,
                c.startup.as_secs_f64(),
                c.published.as_secs_f64(),
                ms(c.latencies.quantile(0.5)),
                ms(c.latencies.quantile(0.99)),
                c.nodes * c.per_node,
                c.converged.as_secs_f64()
            )?;
            if let Some(d) = &c.discovery {
                write!(f, "{d}")?;
            }
        }
        Ok(())
    }
}

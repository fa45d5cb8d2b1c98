//! The share-path benchmark: what one share costs on each path through the federation, against the provider
//! called directly and against plain nginx proxies, all measured in one run.
//!
//! The six-node standard topology ([`crate::standard_topology`]) runs as separate `fedgate node` processes
//! ([`ProcessFederation`]: real mTLS, SQLite, the example civil-registry providers in this process), so the CPU
//! time of every node is read from `/proc`. Each row of the report is one path at one concurrency, driven by a
//! closed-loop load generator ([`load`]); see `docs/benchmarks.md` for the method and the figures.
//!
//! `cargo bench -p fedgate-tests --bench share_path` runs it in full; [`BenchConfig::quick`] is the smoke-test
//! size (`tests/tests/bench_smoke.rs`).

mod calls;
pub mod cpu;
pub mod load;
pub mod nginx;
mod path;
mod provider;
mod report;
mod rows;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

pub use path::{ROWS, SharePath};
pub use report::{Ratios, Report, RowResult};

/// How long and how hard each row runs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Load applied before each row's measurement (connections, caches, nginx upstream connections).
    pub warmup: Duration,
    /// Longest measurement of one row.
    pub duration: Duration,
    /// Most requests measured in one row (at least two per caller are always sent).
    pub max_requests: u64,
    /// Most client connections (HTTP/2) the callers of one row share; a row with fewer callers opens one each.
    pub connections: usize,
    /// Residents in the registry behind node 350102: every uncached cross-city share asks for a new one.
    pub persons: usize,
    /// Wait after each row until every audit record it caused has reached the province, and count that work
    /// in the row's CPU time (off in quick mode).
    pub settle: bool,
    /// Only these paths (by [`SharePath::name`]); all when empty.
    pub only: Vec<SharePath>,
    /// The nginx binary for the baselines; those rows are skipped without one.
    pub nginx: Option<PathBuf>,
}

impl BenchConfig {
    /// The full benchmark: 5 s or 100 000 requests per row after 1 s of warm-up.
    pub fn full() -> Self {
        Self {
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(5),
            max_requests: 100_000,
            connections: 8,
            persons: 200_000,
            settle: true,
            only: Vec::new(),
            nginx: nginx::find_nginx(),
        }
    }

    /// A few seconds in all: a handful of requests per row, enough to see every path answer.
    pub fn quick() -> Self {
        Self {
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(300),
            max_requests: 60,
            connections: 4,
            persons: 3_000,
            settle: false,
            only: Vec::new(),
            nginx: nginx::find_nginx(),
        }
    }

    /// [`BenchConfig::full`] (or [`BenchConfig::quick`] with `SHARE_BENCH_QUICK=1`) changed by the environment:
    /// `SHARE_BENCH_SECS`, `SHARE_BENCH_WARMUP_MS`, `SHARE_BENCH_REQUESTS`, `SHARE_BENCH_CONNECTIONS`,
    /// `SHARE_BENCH_PERSONS`, `SHARE_BENCH_SETTLE` (0 or 1), `SHARE_BENCH_ONLY` (path names, comma-separated)
    /// and `NGINX` (the binary, or `none`).
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str| -> Result<Option<u64>> {
            var(k)
                .map(|v| {
                    v.parse::<u64>()
                        .with_context(|| format!("{k}={v} is not a number"))
                })
                .transpose()
        };
        let mut c = if var("SHARE_BENCH_QUICK").is_some_and(|v| v != "0") {
            Self::quick()
        } else {
            Self::full()
        };
        if let Some(s) = var("SHARE_BENCH_SECS") {
            let secs: f64 = s
                .parse()
                .with_context(|| format!("SHARE_BENCH_SECS={s} is not a number"))?;
            c.duration = Duration::try_from_secs_f64(secs)
                .map_err(|e| anyhow!("SHARE_BENCH_SECS={s}: {e}"))?;
        }
        if let Some(ms) = num("SHARE_BENCH_WARMUP_MS")? {
            c.warmup = Duration::from_millis(ms);
        }
        if let Some(n) = num("SHARE_BENCH_REQUESTS")? {
            c.max_requests = n.max(1);
        }
        if let Some(n) = num("SHARE_BENCH_CONNECTIONS")? {
            c.connections = usize::try_from(n.max(1))?;
        }
        if let Some(n) = num("SHARE_BENCH_PERSONS")? {
            c.persons = usize::try_from(n)?;
        }
        if let Some(n) = num("SHARE_BENCH_SETTLE")? {
            c.settle = n != 0;
        }
        if let Some(list) = var("SHARE_BENCH_ONLY") {
            c.only = list
                .split(',')
                .map(|n| {
                    SharePath::from_name(n.trim()).ok_or_else(|| {
                        anyhow!(
                            "SHARE_BENCH_ONLY: no path {n:?}; paths: {}",
                            SharePath::ALL.map(SharePath::name).join(", ")
                        )
                    })
                })
                .collect::<Result<_>>()?;
        }
        if c.persons < 2 * calls::HOT_KEYS {
            bail!(
                "SHARE_BENCH_PERSONS must be at least {}",
                2 * calls::HOT_KEYS
            );
        }
        Ok(c)
    }
}

/// Runs the benchmark: starts the federation and the proxies, measures every row, stops everything.
pub async fn run(config: BenchConfig) -> Result<Report> {
    rows::run(config).await
}

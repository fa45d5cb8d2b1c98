//! Search at the province: a store filled with the benchmark's catalog through the store's own apply path (as
//! the province applies its cities' pushes), then queries of each kind, each built from a `SearchCatalogRequest`
//! exactly as the province's Agency service builds it, timed through the store's search and the page's finish.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use fedgate_gateway::catalog;
use fedgate_gateway::ident::DivisionCode;
use fedgate_gateway::limits::LimitsConfig;
use fedgate_gateway::store::{SqliteStore, Store, Upstream};
use fedgate_proto::v1::{CatalogChange, SearchCatalogRequest, ShareType, catalog_change};

use super::corpus::{self, CHINESE, DOMAINS, PROVIDERS_PER_NODE, RARE_WORDS};
use super::{Latencies, SearchRow};

/// Items applied in one transaction while filling the store (as one push of a child would be).
const FILL_BATCH: usize = 1000;

/// A filled store and how long filling it took.
pub struct Filled {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Entries in it.
    pub entries: usize,
    /// Time to apply them all.
    pub took: Duration,
}

/// Fills a new SQLite store at `path` with `n` entries of the benchmark's catalog.
pub async fn fill(path: &Path, n: usize) -> Result<Filled> {
    fill_store(Arc::new(SqliteStore::open(path).await?), n).await
}

/// Fills an empty `store` with `n` entries of the benchmark's catalog.
pub async fn fill_store(store: Arc<dyn Store>, n: usize) -> Result<Filled> {
    let nodes = corpus::nodes()?;
    let start = Instant::now();
    let mut seq = 0u64;
    let mut i = 0usize;
    while i < n {
        let end = (i + FILL_BATCH).min(n);
        let mut items = Vec::with_capacity(end - i);
        for k in i..end {
            seq += 1;
            items.push((
                seq,
                CatalogChange {
                    change: Some(catalog_change::Change::Upsert(corpus::entry(k, &nodes)?)),
                },
            ));
        }
        store
            .apply_child_catalog("350100", &items, Upstream::Root)
            .await?;
        i = end;
    }
    let took = start.elapsed();
    ensure!(
        store.count_entries().await? == n as u64,
        "the store holds every entry"
    );
    Ok(Filled {
        store,
        entries: n,
        took,
    })
}

/// The kinds of query measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// A word about one entry in 50 000.
    RareWord,
    /// A two-character Chinese word (about one entry in six).
    ChineseWord,
    /// A single Chinese character.
    ChineseChar,
    /// A completed English word (more text follows it) and a Chinese word.
    Mixed,
    /// A Chinese word and a whole English word the text ends in, so still matched as a prefix.
    MixedTyped,
    /// The first three letters of a common word, as a user types it.
    Prefix,
    /// One provider's entries.
    Provider,
    /// One top-level classification.
    Classification,
    /// One share type.
    ShareType,
    /// The twentieth page of a share-type filter, following page tokens.
    DeepPage,
}

impl QueryKind {
    /// Every kind, in the report's order.
    pub const ALL: [QueryKind; 10] = [
        QueryKind::RareWord,
        QueryKind::ChineseWord,
        QueryKind::ChineseChar,
        QueryKind::Mixed,
        QueryKind::MixedTyped,
        QueryKind::Prefix,
        QueryKind::Provider,
        QueryKind::Classification,
        QueryKind::ShareType,
        QueryKind::DeepPage,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            QueryKind::RareWord => "rare word",
            QueryKind::ChineseWord => "Chinese word (2 chars)",
            QueryKind::ChineseChar => "Chinese character",
            QueryKind::Mixed => "English word + Chinese",
            QueryKind::MixedTyped => "Chinese + English word typed",
            QueryKind::Prefix => "word prefix (3 letters)",
            QueryKind::Provider => "provider filter",
            QueryKind::Classification => "classification",
            QueryKind::ShareType => "share type",
            QueryKind::DeepPage => "share type, page 20",
        }
    }

    /// The `k`-th request of this kind.
    pub fn request(self, k: usize, nodes: &[DivisionCode]) -> Result<SearchCatalogRequest> {
        let mut r = SearchCatalogRequest::default();
        match self {
            QueryKind::RareWord => r.text = corpus::rare_word(k % RARE_WORDS),
            QueryKind::ChineseWord => r.text = CHINESE[k % CHINESE.len()].to_owned(),
            QueryKind::ChineseChar => {
                r.text = CHINESE[k % CHINESE.len()]
                    .chars()
                    .take(1)
                    .collect::<String>()
            }
            QueryKind::Mixed => {
                r.text = format!("insurance {}", CHINESE[k % CHINESE.len()]);
            }
            QueryKind::MixedTyped => {
                r.text = format!("{} insurance", CHINESE[k % CHINESE.len()]);
            }
            QueryKind::Prefix => {
                r.text = ["reg", "pen", "cer", "veh", "emp", "wel"][k % 6].to_owned();
            }
            QueryKind::Provider => {
                let node = nodes[(k * 37) % nodes.len()];
                r.provider_uscc =
                    corpus::provider(node, 1 + (k as u32 % PROVIDERS_PER_NODE))?.to_string();
            }
            QueryKind::Classification => {
                r.classification = vec![DOMAINS[k % DOMAINS.len()].to_owned()];
            }
            QueryKind::ShareType | QueryKind::DeepPage => {
                r.share_type = [
                    ShareType::Unconditional,
                    ShareType::Conditional,
                    ShareType::NotShared,
                ][k % 3] as i32;
            }
        }
        Ok(r)
    }
}

/// Runs `queries` searches of each kind at the province over `store`; each row's latencies and the entries its
/// searches returned.
pub async fn measure(
    backend: &'static str,
    store: &Arc<dyn Store>,
    entries: usize,
    queries: usize,
) -> Result<Vec<SearchRow>> {
    let nodes = corpus::nodes()?;
    let province: DivisionCode = "350000".parse()?;
    let limits = LimitsConfig::default();
    let mut rows = Vec::new();
    for kind in QueryKind::ALL {
        let mut latencies = Latencies::default();
        let mut found = 0usize;
        // One unmeasured round first, so that every row reads from a warm page cache.
        for k in 0..queries.min(8) {
            let req = kind.request(k, &nodes)?;
            let q = catalog::search_query(province, &req, &limits)?;
            store.search(&q).await?;
        }
        for k in 0..queries {
            let mut req = kind.request(k, &nodes)?;
            if kind == QueryKind::DeepPage {
                for _ in 0..19 {
                    let q = catalog::search_query(province, &req, &limits)?;
                    let (_, token) = catalog::finish_page(store.search(&q).await?, &q);
                    req.page_token = token;
                }
            }
            let start = Instant::now();
            let q = catalog::search_query(province, &req, &limits)?;
            let (page, _) = catalog::finish_page(store.search(&q).await?, &q);
            latencies.push(start.elapsed());
            found += page.len();
        }
        rows.push(SearchRow {
            backend,
            entries,
            kind,
            latencies,
            mean_results: found as f64 / queries.max(1) as f64,
        });
    }
    Ok(rows)
}

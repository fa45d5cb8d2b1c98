//! The catalog-at-scale benchmark in quick mode: every scenario runs over a real store and real nodes and every
//! search finds what the catalog holds (no timing is asserted).

use anyhow::Result;
use fedgate_tests::catalog_bench::{self, CatalogBenchConfig, QueryKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_of_the_quick_catalog_benchmark_runs() -> Result<()> {
    let config = CatalogBenchConfig::quick();
    let report = catalog_bench::run(config.clone()).await?;
    println!("{report}");
    assert_eq!(
        report.search.len(),
        config.search_sizes.len() * QueryKind::ALL.len()
    );
    for row in &report.search {
        assert_eq!(row.latencies.len(), config.queries, "{}", row.kind.name());
        assert!(row.mean_results > 0.0, "{} found nothing", row.kind.name());
    }
    let batch = report.batch.expect("batch publication ran");
    assert_eq!(batch.entries, config.batches.0 * config.batches.1);
    assert_eq!(batch.latencies.len(), config.batches.0);
    let converged = report.convergence.expect("convergence ran");
    let (cities, counties, per_node) = config.province;
    assert_eq!(
        converged.nodes,
        1 + cities as usize * (1 + counties as usize)
    );
    assert_eq!(converged.per_node, per_node);
    let discovery = converged.discovery.expect("discovery ran");
    assert_eq!(
        discovery.province_entries as usize,
        converged.nodes * per_node
    );
    for row in &discovery.rows {
        assert_eq!(row.routed.len(), config.queries, "{}", row.kind.name());
        assert!(row.mean_results > 0.0, "{} found nothing", row.kind.name());
    }
    assert!(discovery.province_store_bytes > discovery.county_store_bytes);
    assert_eq!(report.catalog_bytes.len(), config.search_sizes.len());
    Ok(())
}

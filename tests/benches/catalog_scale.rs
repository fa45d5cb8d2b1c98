//! The catalog-at-province-scale benchmark: `cargo bench -p fedgate-tests --bench catalog_scale` (knobs in
//! `fedgate_tests::catalog_bench::CatalogBenchConfig::from_env`; method and figures in `docs/benchmarks.md`).

use fedgate_tests::catalog_bench::{self, CatalogBenchConfig};

fn main() -> anyhow::Result<()> {
    let config = CatalogBenchConfig::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(catalog_bench::run(config))?;
    println!("{report}");
    Ok(())
}

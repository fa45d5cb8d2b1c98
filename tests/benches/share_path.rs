//! The share-path benchmark: `cargo bench -p fedgate-tests --bench share_path` (knobs in
//! `fedgate_tests::bench::BenchConfig::from_env`; method and figures in `docs/benchmarks.md`).

use fedgate_tests::bench::{self, BenchConfig};

fn main() -> anyhow::Result<()> {
    let config = BenchConfig::from_env()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench::run(config))?;
    println!("{report}");
    Ok(())
}

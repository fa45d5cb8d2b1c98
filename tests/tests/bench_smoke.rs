//! The share-path benchmark in quick mode: every row runs over the real federation and answers without an
//! error (no timing is asserted). The nginx rows run when nginx is installed and are skipped otherwise.

use anyhow::Result;
use fedgate_tests::bench::{self, BenchConfig, ROWS, SharePath};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_the_quick_benchmark_answers() -> Result<()> {
    let config = BenchConfig::quick();
    let nginx = config.nginx.is_some();
    let report = bench::run(config).await?;
    println!("{report}");
    assert_eq!(report.rows.len(), ROWS.len());
    for r in &report.rows {
        let name = format!("{} c={}", r.path.name(), r.concurrency);
        match &r.outcome {
            None => {
                assert!(
                    !nginx && matches!(r.path, SharePath::Nginx1 | SharePath::Nginx4),
                    "{name} was skipped: {:?}",
                    r.skipped
                );
            }
            Some(o) => {
                assert_eq!(o.errors, 0, "{name}: {:?}", o.first_error);
                assert!(
                    o.ok >= r.concurrency as u64,
                    "{name}: only {} answers",
                    o.ok
                );
                assert!(o.percentile_us(0.99).is_some(), "{name}: no latencies");
                for node in ["350102", "350000"] {
                    assert!(r.cpu_of(node).is_some(), "{name}: no CPU time of {node}");
                }
            }
        }
    }
    // Every share writes audit records where it is served; a direct call writes none.
    let same_node = report
        .row(SharePath::SameNode, 1)
        .map(|r| r.audit_per_request);
    assert!(same_node.is_some_and(|a| a >= 1.0), "{same_node:?}");
    let direct = report
        .row(SharePath::Direct, 1)
        .map(|r| r.audit_per_request);
    assert_eq!(direct, Some(0.0));
    let ratios = report.ratios();
    assert!(ratios.same_node_over_direct_p50.is_some());
    assert!(ratios.per_hop_added_us.is_some());
    Ok(())
}

//! The metrics endpoint of real nodes: counters follow the shares, and the forwarding lag shows a parent that is
//! down and drains when it is back.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_node::devnet::Devnet;
use fedgate_tests::{code, eventually, key_at, query, standard};

/// Status code and body of `GET path` on the node's metrics endpoint.
async fn get(net: &Devnet, node: &str, path: &str) -> Result<(u16, String)> {
    let addr = net
        .node(code(node))?
        .metrics_addr()
        .context("the metrics endpoint is configured")?;
    fedgate_tests::probe::http_get(addr, path).await
}

/// The value of the sample `name` (with its labels) in an exposition.
fn sample(text: &str, name: &str) -> Option<i64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

async fn metric(net: &Devnet, node: &str, name: &str) -> Result<Option<i64>> {
    let (status, body) = get(net, node, "/metrics").await?;
    if status != 200 {
        bail!("GET /metrics on {node}: {status} {body}");
    }
    Ok(sample(&body, name))
}

#[tokio::test]
async fn counters_follow_shares_and_the_lag_shows_a_parent_down() -> Result<()> {
    let mut net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    siming
        .share(query("350102:household", &key, &["name"]))
        .await?;
    assert_eq!(
        metric(&net, "350102", "fedgate_shares_served_total").await?,
        Some(1)
    );
    assert_eq!(
        metric(&net, "350203", "fedgate_shares_forwarded_total").await?,
        Some(1)
    );
    // Every node on the route recorded the share durably before answering.
    for node in ["350203", "350200", "350000", "350100", "350102"] {
        let written = metric(&net, node, "fedgate_audit_records_written_total").await?;
        let commits = metric(&net, node, "fedgate_audit_commit_seconds_count").await?;
        assert!(
            written.unwrap_or(0) >= 2 && commits.unwrap_or(0) >= 1,
            "node {node}: {written:?} records in {commits:?} commits"
        );
        assert_eq!(
            metric(&net, node, "fedgate_audit_batches_failed_total").await?,
            Some(0)
        );
    }
    assert_eq!(get(&net, "350102", "/nothing").await?.0, 404);
    // The province has no parent, so no stream gauges.
    assert_eq!(
        metric(&net, "350000", "fedgate_uplink_lag{stream=\"audit\"}").await?,
        None
    );

    let city = "350100";
    eventually(
        "the city's audit stream drains",
        Duration::from_secs(20),
        || async {
            Ok(
                metric(&net, city, "fedgate_uplink_lag{stream=\"audit\"}").await? == Some(0)
                    && metric(&net, city, "fedgate_uplink_connected{stream=\"audit\"}").await?
                        == Some(1),
            )
        },
    )
    .await?;

    // With the province down, a share inside the city's subtree still works and its records wait at the city.
    net.stop_node(code("350000")).await?;
    let mut taijiang = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    taijiang
        .share(query("350102:household", &key, &["name"]))
        .await?;
    eventually(
        "the lag shows the records waiting",
        Duration::from_secs(20),
        || async {
            Ok(metric(&net, city, "fedgate_uplink_lag{stream=\"audit\"}")
                .await?
                .unwrap_or(0)
                > 0
                && metric(&net, city, "fedgate_uplink_connected{stream=\"audit\"}").await?
                    == Some(0))
        },
    )
    .await?;

    net.restart_node(code("350000")).await?;
    eventually(
        "the lag drains once the province is back",
        Duration::from_secs(30),
        || async {
            Ok(metric(&net, city, "fedgate_uplink_lag{stream=\"audit\"}").await? == Some(0))
        },
    )
    .await?;
    net.shutdown().await
}

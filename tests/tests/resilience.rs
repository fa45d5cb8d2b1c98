//! A node keeps serving its subtree while its parent is down, and catches up when it returns.

use std::time::Duration;

use anyhow::Result;
use fedgate_proto::v1::PublishEntryRequest;
use fedgate_tests::{code, key_at, query, standard};
use tonic::Code;

#[tokio::test]
async fn a_child_serves_its_subtree_while_its_parent_is_down() -> Result<()> {
    let mut net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let fuzhou = code("350100");
    net.stop_node(fuzhou).await?;

    let mut gulou = net.client(&net.consumer_at(code("350102"))?.uscc).await?;
    let resp = gulou
        .share(query("350102:household", &key, &["name"]))
        .await?
        .into_inner();
    assert_eq!(resp.records.len(), 1);

    let mut taijiang = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let err = taijiang
        .share(query("350102:household", &key, &["name"]))
        .await
        .expect_err("the city is down");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("350100"), "{}", err.message());

    // Cross-city requests that need Fuzhou fail the same way at the province.
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let err = siming
        .share(query("350102:household", &key, &["name"]))
        .await
        .expect_err("the city is down");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("350100"), "{}", err.message());

    // Publishing goes on; the change waits in the county's outbox.
    let provider = net.provider_at(code("350102"))?;
    let mut entry = provider.published[0].clone();
    entry.id = "death-registry".into();
    net.client(&provider.uscc)
        .await?
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?;
    assert_eq!(
        net.node(code("350102"))?
            .uplink_lag(fedgate_proto::v1::Stream::Catalog)
            .await?,
        1
    );

    net.restart_node(fuzhou).await?;
    net.wait_for_catalog(code("350000"), 7, Duration::from_secs(20))
        .await?;
    let resp = taijiang
        .share(query("350102:household", &key, &["name"]))
        .await?
        .into_inner();
    assert_eq!(resp.records.len(), 1);
    net.shutdown().await
}

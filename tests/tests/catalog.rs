//! Catalog registration, upward propagation and search over real nodes.

use std::time::Duration;

use anyhow::Result;
use fedgate_proto::v1::{
    GetEntryRequest, PublishEntryRequest, SearchCatalogRequest, ShareType, WithdrawEntryRequest,
};
use fedgate_tests::{code, eventually, standard};
use tonic::Code;

fn search(text: &str) -> SearchCatalogRequest {
    SearchCatalogRequest {
        text: text.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn catalog_reaches_the_province_and_resumes_after_a_province_restart() -> Result<()> {
    let mut net = standard().await?;
    let province = code("350000");
    let fuzhou = code("350100");
    assert_eq!(net.catalog_size(province).await?, 6);
    assert_eq!(
        net.catalog_size(fuzhou).await?,
        4,
        "Fuzhou holds its own and Gulou's entries"
    );
    assert_eq!(net.catalog_size(code("350203")).await?, 2);

    net.stop_node(province).await?;
    let gulou = net.provider_at(code("350102"))?.uscc.clone();
    let mut client = net.client(&gulou).await?;
    let mut entry = net.provider_at(code("350102"))?.published[0].clone();
    entry.id = "birth-registry".into();
    entry.title = "Birth certificates (出生医学证明)".into();
    entry.version = 0;
    let stored = client
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?
        .into_inner()
        .entry
        .expect("stored entry");
    assert_eq!(stored.id, "350102:birth-registry");
    assert_eq!(stored.version, 1);
    net.wait_for_catalog(fuzhou, 5, Duration::from_secs(10))
        .await?;

    net.restart_node(province).await?;
    net.wait_for_catalog(province, 7, Duration::from_secs(20))
        .await?;
    let m = net.node(province)?.metrics();
    assert_eq!(
        m.catalog_items_received.get(),
        1,
        "after the restart only the one new change travels to the province"
    );

    let found = net
        .client(&net.consumer_at(province)?.uscc)
        .await?
        .search_catalog(search("出生医学证明"))
        .await?
        .into_inner();
    assert_eq!(found.entries.len(), 1);
    assert_eq!(found.entries[0].id, "350102:birth-registry");

    // A withdrawal travels up the same way.
    client
        .withdraw_entry(WithdrawEntryRequest {
            id: "350102:birth-registry".into(),
        })
        .await?;
    eventually(
        "withdrawal reaches the province",
        Duration::from_secs(10),
        || async { Ok(net.catalog_size(province).await? == 6) },
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn search_covers_the_subtree_with_filters() -> Result<()> {
    let net = standard().await?;
    let province = code("350000");
    let mut at_province = net.client(&net.consumer_at(province)?.uscc).await?;
    let all = at_province.search_catalog(search("")).await?.into_inner();
    assert_eq!(all.entries.len(), 6);

    let xiamen = at_province
        .search_catalog(SearchCatalogRequest {
            node_code: "350200".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(xiamen.entries.iter().all(|e| e.node_code == "350203"));
    assert_eq!(xiamen.entries.len(), 2);

    let not_shared = at_province
        .search_catalog(SearchCatalogRequest {
            share_type: ShareType::NotShared as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(not_shared.entries.len(), 1);
    assert_eq!(not_shared.entries[0].id, "350203:marriage");

    let gulou_provider = net.provider_at(code("350102"))?.uscc.to_string();
    let by_provider = at_province
        .search_catalog(SearchCatalogRequest {
            provider_uscc: gulou_provider.clone(),
            classification: vec!["civil-affairs".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(by_provider.entries.len(), 2);
    assert!(
        by_provider
            .entries
            .iter()
            .all(|e| e.provider_uscc == gulou_provider)
    );

    let paged = at_province
        .search_catalog(SearchCatalogRequest {
            page_size: 4,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(paged.entries.len(), 4);
    let rest = at_province
        .search_catalog(SearchCatalogRequest {
            page_size: 4,
            page_token: paged.next_page_token.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(rest.entries.len(), 2);
    assert!(rest.next_page_token.is_empty());

    // A county searches its own subtree when it names itself; anything wider is answered above it (see
    // tests/tests/discovery.rs).
    let mut at_taijiang = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let own = at_taijiang
        .search_catalog(SearchCatalogRequest {
            node_code: "350103".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(own.entries.is_empty());
    assert_eq!(own.answered_by, "350103");
    let found = at_taijiang
        .get_entry(GetEntryRequest {
            id: "350102:household".into(),
        })
        .await?
        .into_inner();
    assert_eq!(found.id, "350102:household");
    let wider = at_taijiang
        .search_catalog(SearchCatalogRequest {
            node_code: "350102".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(wider.answered_by, "350100");
    assert_eq!(wider.entries.len(), 2);

    let err = at_province
        .search_catalog(SearchCatalogRequest {
            provider_uscc: "11350102000000002X".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad check character");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("11350102000000002X"),
        "{}",
        err.message()
    );
    net.shutdown().await
}

#[tokio::test]
async fn publishing_validates_entries() -> Result<()> {
    let net = standard().await?;
    let gulou = net.provider_at(code("350102"))?;
    let mut client = net.client(&gulou.uscc).await?;
    let base = gulou.published[0].clone();

    let mut bad_id = base.clone();
    bad_id.id = "350103:household".into();
    let err = client
        .publish_entry(PublishEntryRequest {
            entry: Some(bad_id),
        })
        .await
        .expect_err("id of another node");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("350103"), "{}", err.message());

    let mut bad_field = base.clone();
    bad_field.key_field = "nope".into();
    let err = client
        .publish_entry(PublishEntryRequest {
            entry: Some(bad_field),
        })
        .await
        .expect_err("key field not listed");
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut no_type = base.clone();
    no_type.share_type = ShareType::Unspecified as i32;
    let err = client
        .publish_entry(PublishEntryRequest {
            entry: Some(no_type),
        })
        .await
        .expect_err("share type required");
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut nul = base.clone();
    nul.summary = "residents\0 of Gulou".into();
    let err = client
        .publish_entry(PublishEntryRequest { entry: Some(nul) })
        .await
        .expect_err("control character in the summary");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("entry.summary contains the control character U+0000 at character 10"),
        "{}",
        err.message()
    );

    // Another agency of the same node may not overwrite the provider's entry.
    let consumer = net.consumer_at(code("350102"))?;
    let mut other = net.client(&consumer.uscc).await?;
    let err = other
        .publish_entry(PublishEntryRequest {
            entry: Some(base.clone()),
        })
        .await
        .expect_err("entry of another agency");
    assert_eq!(err.code(), Code::PermissionDenied);

    // A republish bumps the version.
    let again = client
        .publish_entry(PublishEntryRequest { entry: Some(base) })
        .await?
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(again.version, 2);
    net.shutdown().await
}

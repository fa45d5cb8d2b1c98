//! Cached answers follow the catalog: a new version, a re-classification or a withdrawal of an entry purges the
//! answers of it at every node that was served them, before the provider's publish is answered; only the
//! entry's node may ask for that.

use anyhow::Result;
use fedgate_proto::v1::{
    CacheInvalidation, InvalidationNotice, PublishEntryRequest, ShareType, WithdrawEntryRequest,
};
use fedgate_tests::rogue::{RogueNode, assert_audited};
use fedgate_tests::{code, key_at, query, standard};
use tonic::Code;

#[tokio::test]
async fn a_changed_or_withdrawn_entry_is_never_served_from_a_cache() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let req = query("350102:household", &key, &["name"]);
    assert!(!siming.share(req.clone()).await?.into_inner().from_cache);
    assert!(siming.share(req.clone()).await?.into_inner().from_cache);

    // The provider makes its household records conditional: the publish purges Siming's cached answer.
    let provider = net.provider_at(code("350102"))?;
    let mut entry = provider
        .published
        .iter()
        .find(|e| e.id == "350102:household")
        .cloned()
        .expect("published household entry");
    entry.share_type = ShareType::Conditional as i32;
    let mut publisher = net.client(&provider.uscc).await?;
    publisher
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?;
    let err = siming
        .share(req.clone())
        .await
        .expect_err("the cached answer of an entry that became conditional was served");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // A withdrawal purges too.
    let fuzhou_key = key_at(&net, "350100", 0)?;
    let city = query("350100:household", &fuzhou_key, &["name"]);
    siming.share(city.clone()).await?;
    assert!(siming.share(city.clone()).await?.into_inner().from_cache);
    let fuzhou = net.provider_at(code("350100"))?;
    net.client(&fuzhou.uscc)
        .await?
        .withdraw_entry(WithdrawEntryRequest {
            id: "350100:household".into(),
        })
        .await?;
    let err = siming
        .share(city)
        .await
        .expect_err("the cached answer of a withdrawn entry was served");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    net.shutdown().await
}

#[tokio::test]
async fn only_the_entrys_node_may_purge_its_answers() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let req = query("350102:household", &key, &["name"]);
    siming.share(req.clone()).await?;

    let rogue = RogueNode::new(&net, "350200")?;
    let forged = rogue.signer().sign(&CacheInvalidation {
        resource_id: "350102:household".into(),
        version: 99,
        consumer_node: "350203".into(),
        changed_at: 0,
    })?;
    let err = rogue
        .federation(&net, "350203")
        .await?
        .invalidate(InvalidationNotice {
            invalidation: Some(forged),
            route: vec!["350102".into(), "350200".into()],
        })
        .await
        .expect_err("a node purged answers of another node's entry");
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("may not invalidate"),
        "{}",
        err.message()
    );
    assert_audited(
        &net,
        "350203",
        "PERMISSION_DENIED",
        "Federation.Invalidate: resource 350102:household is held by node 350102",
    )
    .await?;
    assert!(siming.share(req).await?.into_inner().from_cache);
    net.shutdown().await
}

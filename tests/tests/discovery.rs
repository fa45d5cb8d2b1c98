//! Discovery from anywhere: a county agency searches the whole province's catalog and reads any entry from its
//! own node; questions its subtree does not cover are answered by the lowest ancestor that covers them.

use std::collections::BTreeSet;

use anyhow::Result;
use fedgate_gateway::ident::Peer;
use fedgate_proto::v1::{
    DiscoverRequest, GetEntryRequest, SearchCatalogRequest, SearchCatalogResponse, ShareType,
    discover_request,
};
use fedgate_tests::rogue::assert_audited;
use fedgate_tests::{code, federation_client, key_at, query, standard};
use tonic::Code;

fn search(text: &str, node_code: &str) -> SearchCatalogRequest {
    SearchCatalogRequest {
        text: text.to_owned(),
        node_code: node_code.to_owned(),
        ..Default::default()
    }
}

fn ids(page: &SearchCatalogResponse) -> BTreeSet<&str> {
    page.entries.iter().map(|e| e.id.as_str()).collect()
}

#[tokio::test]
async fn a_county_finds_and_reads_entries_of_another_city() -> Result<()> {
    let net = standard().await?;
    let taijiang = net.consumer_at(code("350103"))?.uscc.clone();
    let mut client = net.client(&taijiang).await?;

    // Chinese two-character words, over entries of the whole province; Taijiang itself holds none.
    let households = client
        .search_catalog(search("户籍", ""))
        .await?
        .into_inner();
    assert_eq!(households.answered_by, "350000");
    assert_eq!(
        ids(&households),
        BTreeSet::from(["350100:household", "350102:household", "350203:household"])
    );
    let marriages = client
        .search_catalog(search("婚姻", "350200"))
        .await?
        .into_inner();
    assert_eq!(marriages.answered_by, "350000");
    assert_eq!(ids(&marriages), BTreeSet::from(["350203:marriage"]));
    assert_eq!(
        marriages.entries[0].share_type,
        ShareType::NotShared as i32,
        "a not-shared entry is listed with its metadata"
    );
    // A filter inside an ancestor's subtree is answered there, not at the province.
    let in_fuzhou = client
        .search_catalog(search("婚姻", "350100"))
        .await?
        .into_inner();
    assert_eq!(in_fuzhou.answered_by, "350100");
    assert_eq!(
        ids(&in_fuzhou),
        BTreeSet::from(["350100:marriage", "350102:marriage"])
    );
    // Its own subtree is searched here.
    let own = client
        .search_catalog(search("", "350103"))
        .await?
        .into_inner();
    assert_eq!(own.answered_by, "350103");
    assert!(own.entries.is_empty());

    // Reading an entry of another city.
    let entry = client
        .get_entry(GetEntryRequest {
            id: "350203:household".into(),
        })
        .await?
        .into_inner();
    assert_eq!(entry.node_code, "350203");
    assert!(entry.title.contains("户籍登记"), "{}", entry.title);
    let err = client
        .get_entry(GetEntryRequest {
            id: "350203:nothing".into(),
        })
        .await
        .expect_err("no such entry");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("350203:nothing"),
        "{}",
        err.message()
    );

    // Outside the province, or malformed: refused at the county before any hop.
    for (filter, needle) in [("360000", "outside"), ("35010", "node_code")] {
        let err = client
            .search_catalog(search("", filter))
            .await
            .expect_err("bad filter");
        assert_eq!(err.code(), Code::InvalidArgument, "{filter}: {err:?}");
        assert!(err.message().contains(needle), "{}", err.message());
    }

    // What was found is shared as before: the unconditional one is served, the not-shared one refused.
    let key = key_at(&net, "350203", 0)?;
    let served = client
        .share(query("350203:household", &key, &["name"]))
        .await?
        .into_inner();
    assert_eq!(served.records.len(), 1);
    let err = client
        .share(query("350203:marriage", &key, &[]))
        .await
        .expect_err("not shared");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    net.shutdown().await
}

#[tokio::test]
async fn routed_pages_are_the_answering_nodes_pages() -> Result<()> {
    let net = standard().await?;
    let mut at_county = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let mut at_province = net.client(&net.consumer_at(code("350000"))?.uscc).await?;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let ask = SearchCatalogRequest {
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        };
        let routed = at_county.search_catalog(ask.clone()).await?.into_inner();
        let local = at_province.search_catalog(ask).await?.into_inner();
        assert_eq!(routed.answered_by, "350000");
        assert_eq!(local.answered_by, "350000");
        assert_eq!(routed.entries, local.entries, "the same page");
        assert_eq!(
            routed.next_page_token, local.next_page_token,
            "the same token"
        );
        assert!(routed.entries.len() <= 2);
        seen.extend(routed.entries.into_iter().map(|e| e.id));
        if routed.next_page_token.is_empty() {
            break;
        }
        token = routed.next_page_token;
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 6);
    assert_eq!(distinct.len(), 6, "no entry twice across pages: {seen:?}");

    let err = at_county
        .search_catalog(SearchCatalogRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument);
    net.shutdown().await
}

#[tokio::test]
async fn a_parent_that_cannot_be_reached_is_named() -> Result<()> {
    let mut net = standard().await?;
    let mut client = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    net.stop_node(code("350100")).await?;
    let err = client
        .search_catalog(search("户籍", ""))
        .await
        .expect_err("parent down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("350100"), "{}", err.message());
    let err = client
        .get_entry(GetEntryRequest {
            id: "350203:household".into(),
        })
        .await
        .expect_err("parent down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("350100"), "{}", err.message());
    // The node's own subtree is still answered, here.
    let own = client
        .search_catalog(search("", "350103"))
        .await?
        .into_inner();
    assert_eq!(own.answered_by, "350103");
    net.shutdown().await
}

#[tokio::test]
async fn only_children_may_ask_and_only_for_their_subtree() -> Result<()> {
    let net = standard().await?;
    let question = |route: &[&str]| DiscoverRequest {
        question: Some(discover_request::Question::Search(
            SearchCatalogRequest::default(),
        )),
        route: route.iter().map(|s| (*s).to_owned()).collect(),
    };

    // An agency presenting its own certificate.
    let agency = net.consumer_at(code("350102"))?.uscc.clone();
    let cert = net.ca().issue_agency(&agency, code("350102"), &[])?;
    let mut as_agency = federation_client(&net, "350100", &cert).await?;
    let err = as_agency
        .discover(question(&["350102"]))
        .await
        .expect_err("an agency is no child");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_audited(&net, "350100", "PERMISSION_DENIED", "Federation.Discover").await?;

    // A sibling city and the parent are not children of Fuzhou.
    for (who, route) in [("350200", "350200"), ("350000", "350000")] {
        let cert = net.ca().issue(&Peer::Node(code(who)), &[])?;
        let mut client = federation_client(&net, "350100", &cert).await?;
        let err = client
            .discover(question(&[route]))
            .await
            .expect_err("not a child");
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
        assert!(err.message().contains(who), "{}", err.message());
    }

    // A child whose route does not end at itself, or names a node outside its subtree.
    let gulou = net.ca().issue(&Peer::Node(code("350102")), &[])?;
    let mut as_gulou = federation_client(&net, "350100", &gulou).await?;
    for route in [&["350103"][..], &["350203", "350102"][..]] {
        let err = as_gulou
            .discover(question(route))
            .await
            .expect_err("route not the child's");
        assert_eq!(err.code(), Code::PermissionDenied, "{route:?}: {err:?}");
    }
    assert_audited(
        &net,
        "350100",
        "PERMISSION_DENIED",
        "outside the subtree of node 350102",
    )
    .await?;

    // Bounded exactly as the agency call is.
    let err = as_gulou
        .discover(DiscoverRequest {
            question: Some(discover_request::Question::Search(SearchCatalogRequest {
                text: "x".repeat(100_000),
                ..Default::default()
            })),
            route: vec!["350102".into()],
        })
        .await
        .expect_err("text over the limit");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("search"), "{}", err.message());

    // The child itself is answered.
    let page = as_gulou.discover(question(&["350102"])).await?.into_inner();
    assert_eq!(page.answered_by, "350000");
    net.shutdown().await
}

//! Mutual TLS and identity: who may call what, proven against real nodes.

use std::time::Duration;

use anyhow::Result;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::DevCa;
use fedgate_node::devnet::agency_code;
use fedgate_proto::v1::{
    Envelope, ForwardRequest, Hop, JoinRequest, PublishEntryRequest, SearchCatalogRequest,
};
use fedgate_tests::{code, eventually, federation_client, key_at, query, standard};
use tonic::Code;

fn forward(route_last: &str, consumer_node: &str) -> ForwardRequest {
    ForwardRequest {
        envelope: Some(Envelope {
            request_id: "forged".into(),
            resource_id: "350102:household".into(),
            target_node: "350102".into(),
            consumer_uscc: "11350203000000001D".into(),
            consumer_node: consumer_node.into(),
            route: vec![Hop {
                node_code: route_last.into(),
                seen_peer: String::new(),
                action: "forwarded-down".into(),
                elapsed_us: 0,
            }],
            hops_left: 4,
            timeout_ms: 5_000,
            ..Default::default()
        }),
        request: Vec::new(),
    }
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_refused_at_the_handshake() -> Result<()> {
    let net = standard().await?;
    let gulou = net.consumer_at(code("350102"))?;
    let mut good = net.client(&gulou.uscc).await?;
    good.search_catalog(SearchCatalogRequest::default()).await?;

    let rogue = DevCa::generate("rogue root")?;
    let forged = rogue.issue(&Peer::Agency(gulou.uscc.clone()), &[])?;
    let refused_before = net
        .node(code("350102"))?
        .metrics()
        .tls_handshakes_refused
        .get();
    let mut client = net.client_with(code("350102"), &forged).await?;
    let err = client
        .search_catalog(SearchCatalogRequest::default())
        .await
        .expect_err("the node must refuse a certificate it did not issue");
    // TLS 1.3 finishes the client's side of the handshake first, so the refusal arrives as the server's alert
    // on the first call.
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert!(
        format!("{err:?}").contains("received fatal alert: UnknownCA"),
        "{err:?}"
    );
    let node = net.node(code("350102"))?;
    eventually(
        "the node counts the refused handshake",
        Duration::from_secs(5),
        || async { Ok(node.metrics().tls_handshakes_refused.get() > refused_before) },
    )
    .await?;
    // The good client still works.
    good.search_catalog(SearchCatalogRequest::default()).await?;

    // A client that expects a different node is refused by its own hostname verification.
    let err = fedgate_examples::connect_agency(
        &net.node_url(code("350102"))?,
        "350103",
        net.ca().ca_pem(),
        &gulou.cert.cert_pem,
        &gulou.cert.key_pem,
    )
    .await
    .expect_err("node 350102 cannot pass as 350103");
    let text = format!("{err:?}");
    assert!(
        text.contains("NotValidForName") || text.contains("not valid for name"),
        "{text}"
    );
    net.shutdown().await
}

#[tokio::test]
async fn identities_come_from_certificates_not_from_requests() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    // An agency registered on 350102 is not registered on 350103.
    let gulou = net.consumer_at(code("350102"))?;
    let mut wrong_node = net.client_with(code("350103"), &gulou.cert).await?;
    let err = wrong_node
        .share(query("350102:household", &key, &[]))
        .await
        .expect_err("not registered there");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains(gulou.uscc.as_str()),
        "{}",
        err.message()
    );

    // A certificate from the right CA for an agency nobody registered.
    let stranger = net
        .ca()
        .issue(&Peer::Agency(agency_code(code("350102"), 77)?), &[])?;
    let mut client = net.client_with(code("350102"), &stranger).await?;
    let err = client
        .search_catalog(SearchCatalogRequest::default())
        .await
        .expect_err("unregistered agency");
    assert_eq!(err.code(), Code::PermissionDenied);

    // A node certificate may not use the Agency service.
    let node_cert = net.ca().issue(&Peer::Node(code("350103")), &[])?;
    let mut client = net.client_with(code("350100"), &node_cert).await?;
    let err = client
        .search_catalog(SearchCatalogRequest::default())
        .await
        .expect_err("nodes are not agencies");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Publishing under another agency's code is refused.
    let provider = net.provider_at(code("350102"))?;
    let mut entry = provider.published[0].clone();
    entry.id = "spoofed".into();
    entry.provider_uscc = provider.uscc.to_string();
    let mut consumer = net.client(&gulou.uscc).await?;
    let err = consumer
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await
        .expect_err("claims another agency");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Federation calls: only the parent and children, and only as themselves.
    let taijiang = net.ca().issue(&Peer::Node(code("350103")), &[])?;
    let mut as_taijiang = federation_client(&net, "350102", &taijiang).await?;
    let err = as_taijiang
        .forward(forward("350103", "350103"))
        .await
        .expect_err("a sibling is not a neighbour");
    assert_eq!(err.code(), Code::PermissionDenied);

    let fuzhou = net.ca().issue(&Peer::Node(code("350100")), &[])?;
    let mut as_fuzhou = federation_client(&net, "350102", &fuzhou).await?;
    let err = as_fuzhou
        .forward(forward("350200", "350203"))
        .await
        .expect_err("route claims another sender");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("350100"), "{}", err.message());

    let mut child_of_fuzhou = federation_client(&net, "350100", &taijiang).await?;
    let err = child_of_fuzhou
        .join(JoinRequest {
            node_code: "350102".into(),
            software_version: String::new(),
            audit_public_key: vec![7; 32],
            key_endorsement: None,
        })
        .await
        .expect_err("join under another code");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = child_of_fuzhou
        .join(JoinRequest {
            node_code: "350103".into(),
            software_version: String::new(),
            audit_public_key: vec![7; 32],
            key_endorsement: None,
        })
        .await
        .expect_err("a key other than the pinned one");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("pinned"), "{}", err.message());
    let real_key = net
        .node(code("350103"))?
        .audit()
        .expect("running node")
        .public_key();
    let joined = child_of_fuzhou
        .join(JoinRequest {
            node_code: "350103".into(),
            software_version: String::new(),
            audit_public_key: real_key.to_vec(),
            key_endorsement: None,
        })
        .await?
        .into_inner();
    assert_eq!(joined.parent_code, "350100");

    // A child may not forward requests of nodes outside its subtree.
    let err = child_of_fuzhou
        .forward(forward("350103", "350203"))
        .await
        .expect_err("consumer outside the child's subtree");
    assert_eq!(err.code(), Code::PermissionDenied);
    net.shutdown().await
}

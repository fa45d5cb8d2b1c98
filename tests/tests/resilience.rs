//! A node keeps serving its subtree while its parent is down, and catches up when it returns.

use std::time::Duration;

use anyhow::Result;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::tls::{TlsMaterial, client_tls};
use fedgate_proto::v1::operator_client::OperatorClient;
use fedgate_proto::v1::{
    OperatorAuditRequest, PublishEntryRequest, QueryAuditRequest, Stream, UplinkStatusRequest,
};
use fedgate_tests::Devnet;
use tonic::transport::Channel;

/// An operator of `node`: a client presenting the node's own identity.
fn operator(net: &Devnet, node: &str) -> Result<OperatorClient<Channel>> {
    let cert = net.ca().issue(&Peer::Node(code(node)), &[])?;
    let tls = TlsMaterial {
        ca_pem: net.ca().ca_pem(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
    };
    let channel = tonic::transport::Endpoint::from_shared(net.node_url(code(node))?)?
        .tls_config(client_tls(&tls, &Peer::Node(code(node))))?
        .connect_lazy();
    Ok(OperatorClient::new(channel))
}
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
            .uplink_lag(Stream::Catalog)
            .await?,
        1
    );
    // Operators see the forwarding lag.
    let mut gulou_operator = operator(&net, "350102")?;
    let status = gulou_operator
        .uplink_status(UplinkStatusRequest {})
        .await?
        .into_inner();
    let catalog = status
        .streams
        .iter()
        .find(|s| s.stream == Stream::Catalog as i32)
        .expect("catalog stream");
    assert_eq!(catalog.lag, 1);
    assert!(!catalog.connected);
    let audit = status
        .streams
        .iter()
        .find(|s| s.stream == Stream::Audit as i32)
        .expect("audit stream");
    assert!(
        audit.lag > 0,
        "the served share and the publication wait to be forwarded"
    );

    net.restart_node(fuzhou).await?;
    net.wait_for_catalog(code("350000"), 7, Duration::from_secs(20))
        .await?;
    let resp = taijiang
        .share(query("350102:household", &key, &["name"]))
        .await?
        .into_inner();
    assert_eq!(resp.records.len(), 1);
    fedgate_tests::eventually(
        "audit forwarding catches up",
        Duration::from_secs(20),
        || {
            let mut op = gulou_operator.clone();
            async move {
                let s = op.uplink_status(UplinkStatusRequest {}).await?.into_inner();
                Ok(s.streams.iter().all(|s| s.lag == 0 && s.connected))
            }
        },
    )
    .await?;

    // The province's operator sees the county's records, including the refusals while the city was down.
    let province = operator(&net, "350000")?;
    let query = OperatorAuditRequest {
        query: Some(QueryAuditRequest {
            outcome: "UNAVAILABLE".into(),
            ..Default::default()
        }),
        agency: String::new(),
        node_code: "350100".into(),
    };
    fedgate_tests::eventually(
        "the Taijiang refusal reaches the province",
        Duration::from_secs(20),
        || {
            let (mut op, q) = (province.clone(), query.clone());
            async move {
                let records = op.query_audit(q).await?.into_inner().records;
                Ok(records.iter().any(|r| r.node_code == "350103"))
            }
        },
    )
    .await?;
    let records = province
        .clone()
        .query_audit(query)
        .await?
        .into_inner()
        .records;
    assert!(records.iter().all(|r| r.node_code.starts_with("3501")));
    let err = operator(&net, "350103")?
        .query_audit(OperatorAuditRequest {
            query: None,
            agency: String::new(),
            node_code: "350102".into(),
        })
        .await
        .expect_err("outside the subtree");
    assert_eq!(err.code(), Code::InvalidArgument);
    net.shutdown().await
}

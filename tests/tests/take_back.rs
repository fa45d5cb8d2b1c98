//! The parent's side of a recovery, over an in-process federation: `Federation.TakeBack` answers a child only
//! what the parent holds of the child's own (identity from the certificate, bounded pages, refusals audited).

use std::time::Duration;

use anyhow::{Result, ensure};
use fedgate_gateway::ident::Peer;
use fedgate_proto::v1::{Stream, TakeBackRequest};
use fedgate_tests::rogue::assert_audited;
use fedgate_tests::{code, eventually, federation_client, standard};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

fn take_back(stream: Stream, after_seq: u64, after_id: &str, limit: u32) -> TakeBackRequest {
    TakeBackRequest {
        stream: stream as i32,
        after_seq,
        after_id: after_id.to_owned(),
        limit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_back_answers_a_child_only_its_own_chain_and_entries() -> Result<()> {
    let net = standard().await?;
    let city = net.node(code("350100"))?.store().clone();
    let gulou = net.node(code("350102"))?.store().clone();
    eventually("the city holds records of 350102", WAIT, || async {
        Ok(city.audit_chain("350102", 0, 10).await?.len() >= 3)
    })
    .await?;

    let as_gulou = net.ca().issue(&Peer::Node(code("350102")), &[])?;
    let mut client = federation_client(&net, "350100", &as_gulou).await?;
    let page = client
        .take_back(take_back(Stream::Audit, 0, "", 2))
        .await?
        .into_inner();
    assert!(page.more && page.entries.is_empty());
    assert_eq!(page.records, gulou.audit_chain("350102", 0, 2).await?);
    let next = client
        .take_back(take_back(Stream::Audit, 2, "", 0))
        .await?
        .into_inner();
    assert!(next.records.iter().all(|r| r.node_code == "350102"));
    assert_eq!(next.records.first().map(|r| r.seq), Some(3));

    let entries = client
        .take_back(take_back(Stream::Catalog, 0, "", 0))
        .await?
        .into_inner();
    let ids: Vec<&str> = entries
        .entries
        .iter()
        .filter_map(|e| e.entry.as_ref().map(|e| e.id.as_str()))
        .collect();
    ensure!(!ids.is_empty(), "the city holds entries of 350102");
    assert!(ids.iter().all(|id| id.starts_with("350102:")), "{ids:?}");
    assert!(!entries.more);
    let held = city.own_entries("350102", "", 100).await?;
    assert_eq!(ids.len(), held.len());

    // Bad pages are refused for what is wrong, and recorded.
    for (req, needle) in [
        (take_back(Stream::Audit, 0, "", 1001), "limit"),
        (
            take_back(Stream::Catalog, 0, "350103:household", 0),
            "after_id",
        ),
        (
            take_back(Stream::Audit, 0, "350102:household", 0),
            "after_id",
        ),
        (take_back(Stream::Catalog, 5, "", 0), "after_seq"),
        (take_back(Stream::Unspecified, 0, "", 0), "stream"),
    ] {
        let err = client.take_back(req).await.expect_err(needle);
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().starts_with(needle), "{}", err.message());
    }
    assert_audited(
        &net,
        "350100",
        "INVALID_ARGUMENT",
        "Federation.TakeBack: limit",
    )
    .await?;

    // Only a child takes back, and only its own: a sibling of the city and the city's parent are refused.
    for (node, who) in [
        ("350200", "not the parent or a child"),
        ("350000", "not a child"),
    ] {
        let cert = net.ca().issue(&Peer::Node(code(node)), &[])?;
        let mut other = federation_client(&net, "350100", &cert).await?;
        let err = other
            .take_back(take_back(Stream::Audit, 0, "", 0))
            .await
            .expect_err(node);
        assert_eq!(err.code(), Code::PermissionDenied, "{node}");
        assert!(err.message().contains(who), "{}", err.message());
        assert_audited(&net, "350100", "PERMISSION_DENIED", &format!("{node} is")).await?;
    }
    net.shutdown().await
}

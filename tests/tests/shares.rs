//! Share requests routed across the tree, and the status codes of refusals.

use anyhow::Result;
use fedgate_gateway::config::RoutingConfig;
use fedgate_proto::v1::ShareResponse;
use fedgate_tests::{Devnet, code, key_at, query, standard, standard_topology};
use tonic::Code;

fn route(resp: &ShareResponse) -> Vec<(&str, &str)> {
    resp.route
        .iter()
        .map(|h| (h.node_code.as_str(), h.action.as_str()))
        .collect()
}

#[tokio::test]
async fn shares_travel_within_a_county_across_counties_and_across_cities() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;

    let mut gulou = net.client(&net.consumer_at(code("350102"))?.uscc).await?;
    let resp = gulou
        .share(query(
            "350102:household",
            &key,
            &["id_number", "name", "gender"],
        ))
        .await?
        .into_inner();
    assert_eq!(route(&resp), vec![("350102", "served")]);
    assert_eq!(resp.records.len(), 1);
    let r = &resp.records[0].values;
    assert_eq!(r.len(), 3, "only the requested fields: {r:?}");
    assert_eq!(
        r["id_number"],
        format!("{}********{}", &key[..6], &key[14..])
    );
    assert!(
        r["name"].chars().skip(1).all(|c| c == '*'),
        "name is masked: {}",
        r["name"]
    );
    assert!(r["gender"] == "male" || r["gender"] == "female");

    let mut taijiang = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let resp = taijiang
        .share(query("350102:household", &key, &["name"]))
        .await?
        .into_inner();
    assert_eq!(
        route(&resp),
        vec![
            ("350103", "forwarded-up"),
            ("350100", "forwarded-down"),
            ("350102", "served")
        ]
    );
    assert_eq!(resp.records.len(), 1);
    assert_eq!(resp.route[1].seen_peer, "urn:fedgate:node:350103");
    assert_eq!(resp.route[2].seen_peer, "urn:fedgate:node:350100");
    assert!(resp.route[0].seen_peer.starts_with("urn:fedgate:agency:"));

    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let resp = siming
        .share(query("350102:household", &key, &[]))
        .await?
        .into_inner();
    assert_eq!(
        route(&resp),
        vec![
            ("350203", "forwarded-up"),
            ("350200", "forwarded-up"),
            ("350000", "forwarded-down"),
            ("350100", "forwarded-down"),
            ("350102", "served"),
        ]
    );
    assert_eq!(resp.records[0].values.len(), 7, "all household fields");
    assert!(resp.route.iter().all(|h| h.elapsed_us > 0));
    // Elapsed times include the hops below, so they shrink toward the provider.
    assert!(
        resp.route
            .windows(2)
            .all(|w| w[0].elapsed_us >= w[1].elapsed_us)
    );

    // An unknown key answers OK with no records.
    let other = key_at(&net, "350203", 0)?;
    let resp = siming
        .share(query("350102:household", &other, &["name"]))
        .await?
        .into_inner();
    assert!(resp.records.is_empty());

    // The province reaches down; a caller-chosen request id comes back.
    let mut province = net.client(&net.consumer_at(code("350000"))?.uscc).await?;
    let mut req = query("350203:household", &key_at(&net, "350203", 1)?, &["name"]);
    req.request_id = "trace-42".into();
    let resp = province.share(req).await?.into_inner();
    assert_eq!(resp.request_id, "trace-42");
    assert_eq!(resp.records.len(), 1);
    net.shutdown().await
}

#[tokio::test]
async fn refusals_carry_the_right_status() -> Result<()> {
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let mut check = async |req, code: Code, needle: &str| -> Result<()> {
        let err = siming.share(req).await.expect_err("must be refused");
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(
            err.message().contains(needle),
            "{:?} should mention {needle:?}",
            err.message()
        );
        Ok(())
    };
    check(
        query("350102:no-such-resource", &key, &[]),
        Code::NotFound,
        "350102:no-such-resource",
    )
    .await?;
    check(
        query("350104:household", &key, &[]),
        Code::NotFound,
        "350104",
    )
    .await?;
    check(
        query("350a02:household", &key, &[]),
        Code::InvalidArgument,
        "350a02",
    )
    .await?;
    check(
        query("household", &key, &[]),
        Code::InvalidArgument,
        "resource_id",
    )
    .await?;
    check(
        query("350102:household", "350102199001011234", &[]),
        Code::InvalidArgument,
        "key",
    )
    .await?;
    check(
        query("350102:household", &key, &["salary"]),
        Code::InvalidArgument,
        "salary",
    )
    .await?;
    check(
        query("350102:marriage", &key, &[]),
        Code::FailedPrecondition,
        "approval required",
    )
    .await?;
    check(
        query("350203:marriage", &key, &[]),
        Code::PermissionDenied,
        "not shared",
    )
    .await?;
    let mut bad_id = query("350102:household", &key, &[]);
    bad_id.request_id = "no spaces allowed".into();
    check(bad_id, Code::InvalidArgument, "request_id").await?;
    net.shutdown().await
}

#[tokio::test]
async fn the_hop_limit_stops_long_routes() -> Result<()> {
    fedgate_tests::init();
    let routing = RoutingConfig {
        hop_limit: 2,
        ..RoutingConfig::default()
    };
    let net = Devnet::start_with(standard_topology()?, routing).await?;
    let key = key_at(&net, "350102", 0)?;
    let mut taijiang = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    taijiang
        .share(query("350102:household", &key, &["name"]))
        .await?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let err = siming
        .share(query("350102:household", &key, &["name"]))
        .await
        .expect_err("four hops exceed a limit of two");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("hop limit"), "{}", err.message());
    net.shutdown().await
}

/// Each node a share passes records it once: the consumer's and the provider's node with its outcome and the
/// digest of the answer, each relay as it passes the request on; a relay whose next node refuses records that too.
#[tokio::test]
async fn every_hop_records_a_share_once_and_a_relay_records_a_refusal_it_passed_back() -> Result<()>
{
    let net = standard().await?;
    let key = key_at(&net, "350102", 0)?;
    let mut siming = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let mut req = query("350102:household", &key, &["name"]);
    req.request_id = "relay-ok".into();
    siming.share(req).await?;
    let mut req = query("350102:no-such-resource", &key, &["name"]);
    req.request_id = "relay-refused".into();
    let err = siming.share(req).await.expect_err("no such resource");
    assert_eq!(err.code(), Code::NotFound);

    let mut digests = Vec::new();
    for node in ["350203", "350200", "350000", "350100", "350102"] {
        let records = fedgate_tests::own_audit_records(&net, node).await?;
        let of = |id: &str| -> Vec<(String, bool)> {
            records
                .iter()
                .filter(|r| r.request_id == id)
                .map(|r| (r.outcome.clone(), r.response_digest.is_empty()))
                .collect()
        };
        let relay = !matches!(node, "350203" | "350102");
        if relay {
            assert_eq!(
                of("relay-ok"),
                vec![("FORWARDED".to_owned(), true)],
                "{node}"
            );
            assert_eq!(
                of("relay-refused"),
                vec![
                    ("FORWARDED".to_owned(), true),
                    ("NOT_FOUND".to_owned(), true)
                ],
                "{node}"
            );
        } else {
            assert_eq!(of("relay-ok"), vec![("OK".to_owned(), false)], "{node}");
            assert_eq!(
                of("relay-refused"),
                vec![("NOT_FOUND".to_owned(), true)],
                "{node}"
            );
            let r = records.iter().find(|r| r.request_id == "relay-ok");
            digests.extend(r.map(|r| r.response_digest.clone()));
        }
    }
    assert_eq!(digests.len(), 2);
    assert_eq!(digests[0], digests[1], "both ends record the same answer");
    net.shutdown().await
}

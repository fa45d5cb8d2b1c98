//! Bounded input: oversized values are refused at the edge with INVALID_ARGUMENT naming the field and the limit,
//! the refusal is audited, and no stream jams.

use std::time::Duration;

use anyhow::{Result, bail};
use bytes::Bytes;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::limits::LimitsConfig;
use fedgate_gateway::store::AuditQuery;
use fedgate_proto::v1::{
    ApplyRequest, AuditOperation, DecideRequest, Envelope, ForwardRequest, Grant, Hop,
    PublishEntryRequest, SearchCatalogRequest, ShareMode,
};
use fedgate_tests::raw::{RawChannel, frame};
use fedgate_tests::{Devnet, code, eventually, init, key_at, query, standard, standard_topology};
use prost::Message;
use tonic::Code;

/// A purpose this long still fits in a share request under a node's default 4 MiB message limit, but an audit
/// record carrying it does not fit in any push.
const NEARLY_4_MIB: usize = 4 * 1024 * 1024 - 100;
/// A summary this long still fits in a publish request under the default message limit.
const SUMMARY_4_MIB: usize = 4 * 1024 * 1024 - 2048;

/// Whether `node` holds a record written by `origin` about `request_id`.
async fn holds_record(net: &Devnet, node: &str, origin: &str, request_id: &str) -> Result<bool> {
    let rows = net
        .node(code(node))?
        .store()
        .audit_query(&AuditQuery {
            node_prefix: Some(origin.to_owned()),
            limit: 100_000,
            ..Default::default()
        })
        .await?;
    Ok(rows.iter().any(|(_, r)| r.request_id == request_id))
}

/// The refusal records `node` wrote for calls of `rpc` (AUTH_REFUSED, INVALID_ARGUMENT).
async fn refusals(net: &Devnet, node: &str, rpc: &str) -> Result<Vec<String>> {
    let rows = net
        .node(code(node))?
        .store()
        .audit_query(&AuditQuery {
            node_prefix: Some(node.to_owned()),
            outcome: Some("INVALID_ARGUMENT".into()),
            limit: 100_000,
            ..Default::default()
        })
        .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, r)| {
            r.operation == AuditOperation::AuthRefused as i32 && r.detail.starts_with(rpc)
        })
        .map(|(_, r)| r.detail)
        .collect())
}

/// The start of a status message, for assertion output.
fn head(s: &str) -> String {
    s.chars().take(300).collect()
}

#[tokio::test]
async fn an_oversized_purpose_or_summary_is_refused_and_the_streams_keep_flowing() -> Result<()> {
    let net = standard().await?;
    let gulou = code("350102");
    let consumer = net.consumer_at(gulou)?.uscc.clone();
    let mut client = net.client(&consumer).await?;
    let key = key_at(&net, "350102", 0)?;

    let mut big = query("350102:household", &key, &[]);
    big.request_id = "jam-purpose".into();
    big.purpose = "p".repeat(NEARLY_4_MIB);
    let err = match client.share(big).await {
        Ok(_) => bail!("a share with a 4 MiB purpose was served"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{}", head(err.message()));
    assert!(
        err.message().contains("purpose") && err.message().contains("limits.max_text_chars"),
        "{}",
        head(err.message())
    );
    assert!(err.message().len() < 512, "{}", head(err.message()));
    let refused = refusals(&net, "350102", "Agency.Share").await?;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("limits.max_text_chars"), "{refused:?}");

    let provider = net.provider_at(gulou)?;
    let mut entry = provider.published[0].clone();
    entry.id = "jam-summary".into();
    entry.version = 0;
    entry.summary = "s".repeat(SUMMARY_4_MIB);
    let mut publisher = net.client(&provider.uscc).await?;
    let err = match publisher
        .publish_entry(PublishEntryRequest {
            entry: Some(entry.clone()),
        })
        .await
    {
        Ok(_) => bail!("an entry with a 4 MiB summary was published"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{}", head(err.message()));
    assert!(
        err.message().contains("entry.summary")
            && err.message().contains("limits.max_summary_chars"),
        "{}",
        head(err.message())
    );
    assert_eq!(
        refusals(&net, "350102", "Agency.PublishEntry").await?.len(),
        1
    );

    // Both streams still reach the province.
    let mut after = query("350102:household", &key, &[]);
    after.request_id = "after-jam".into();
    client.share(after).await?;
    entry.id = "after-jam".into();
    entry.summary = "published after the refused one".into();
    publisher
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?;
    eventually(
        "the province holds the record of the share after the refused one",
        Duration::from_secs(20),
        || holds_record(&net, "350000", "350102", "after-jam"),
    )
    .await?;
    net.wait_for_catalog(code("350000"), 7, Duration::from_secs(20))
        .await?;
    net.shutdown().await
}

/// Waits for the refusal of a malformed call of `rpc` by `actor` at `node`.
async fn malformed_audited(net: &Devnet, node: &str, rpc: &str, actor: &str) -> Result<()> {
    eventually(
        &format!("node {node} audits the malformed {rpc} call of {actor}"),
        Duration::from_secs(5),
        || async {
            let rows = net
                .node(code(node))?
                .store()
                .audit_query(&AuditQuery {
                    node_prefix: Some(node.to_owned()),
                    outcome: Some("INVALID_ARGUMENT".into()),
                    limit: 100_000,
                    ..Default::default()
                })
                .await?;
            Ok(rows.iter().any(|(_, r)| {
                r.operation == AuditOperation::AuthRefused as i32
                    && r.actor == actor
                    && r.detail.starts_with(&format!("{rpc}: "))
            }))
        },
    )
    .await
}

#[tokio::test]
async fn malformed_messages_are_invalid_argument_and_audited_on_every_listener() -> Result<()> {
    let net = standard().await?;
    let t = Duration::from_secs(5);
    let gulou = net.consumer_at(code("350102"))?;
    let agency = RawChannel::node(&net, "350102", &gulou.cert)?;
    let not_a_share = frame(&[0xff, 0xff, 0xff, 0x07]);
    let bodies: [(&str, Bytes, &str); 5] = [
        ("undecodable", not_a_share, "not a valid ShareRequest"),
        ("empty", Bytes::new(), "carries no message"),
        (
            "cut short",
            Bytes::from_static(&[0, 0, 0, 0, 10, 1, 2]),
            "cut short",
        ),
        (
            "bad flag",
            Bytes::from_static(&[7, 0, 0, 0, 0]),
            "compression flag 7",
        ),
        (
            "compressed",
            Bytes::from_static(&[1, 0, 0, 0, 0]),
            "compressed",
        ),
    ];
    for (what, body, needle) in bodies {
        let a = agency.call("/fedgate.v1.Agency/Share", body, t).await?;
        assert_eq!(a.code, Code::InvalidArgument, "{what}: {a:?}");
        assert!(a.message.contains(needle), "{what}: {a:?}");
    }
    let actor = Peer::Agency(gulou.uscc.clone()).to_uri();
    malformed_audited(&net, "350102", "Agency.Share", &actor).await?;
    // The connection still serves well-formed calls.
    let ok = agency
        .call(
            "/fedgate.v1.Agency/SearchCatalog",
            frame(&SearchCatalogRequest::default().encode_to_vec()),
            t,
        )
        .await?;
    assert_eq!(ok.code, Code::Ok, "{ok:?}");

    let child = net.ca().issue(&Peer::Node(code("350102")), &[])?;
    let federation = RawChannel::node(&net, "350100", &child)?;
    let a = federation
        .call("/fedgate.v1.Federation/Push", frame(&[0x0a, 0x80]), t)
        .await?;
    assert_eq!(a.code, Code::InvalidArgument, "{a:?}");
    malformed_audited(&net, "350100", "Federation.Push", "urn:fedgate:node:350102").await?;

    let own = net.ca().issue(&Peer::Node(code("350100")), &[])?;
    let operator = RawChannel::node(&net, "350100", &own)?;
    let a = operator
        .call("/fedgate.v1.Operator/QueryAudit", frame(&[0x12]), t)
        .await?;
    assert_eq!(a.code, Code::InvalidArgument, "{a:?}");
    malformed_audited(
        &net,
        "350100",
        "Operator.QueryAudit",
        "urn:fedgate:node:350100",
    )
    .await?;

    let public = RawChannel::open_data(&net)?;
    let a = public
        .call(
            "/fedgate.v1.OpenData/Download",
            frame(&[0x1a, 0x05, 0x61]),
            t,
        )
        .await?;
    assert_eq!(a.code, Code::InvalidArgument, "{a:?}");
    malformed_audited(&net, "350000", "OpenData.Download", "public:127.0.0.1").await?;
    net.shutdown().await
}

#[tokio::test]
async fn oversized_values_are_refused_at_the_consumer_node_with_a_short_message() -> Result<()> {
    let net = standard().await?;
    let gulou = net.consumer_at(code("350102"))?.uscc.clone();
    let mut client = net.client(&gulou).await?;
    let key = key_at(&net, "350203", 0)?;

    // A key too large for a forwarded request is the consumer's mistake, not an unreachable neighbour.
    let mut share = query("350203:household", &key, &[]);
    share.key = "1".repeat(NEARLY_4_MIB);
    let err = client.share(share).await.expect_err("oversized key");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", head(err.message()));
    assert!(
        err.message().contains("key") && err.message().contains("limits.max_key_chars"),
        "{}",
        head(err.message())
    );
    assert!(
        refusals(&net, "350102", "Agency.Share")
            .await?
            .iter()
            .any(|d| d.contains("limits.max_key_chars")),
        "the consumer's node audits the refusal"
    );

    let mut share = query(&"3".repeat(1 << 20), &key, &[]);
    share.purpose = "fine".into();
    let err = client
        .share(share)
        .await
        .expect_err("oversized resource id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 256, "{}", head(err.message()));

    // A value within the limits but invalid is quoted as a short excerpt only.
    let err = client
        .search_catalog(SearchCatalogRequest {
            node_code: "9".repeat(100),
            ..Default::default()
        })
        .await
        .expect_err("not a division code");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(&format!("\"{}…\"", "9".repeat(32))),
        "{}",
        err.message()
    );
    assert!(err.message().len() < 256, "{}", err.message());

    // Search: bounded in words and word length, never a storage failure.
    let words = vec!["w"; 1000].join(" ");
    let err = client
        .search_catalog(SearchCatalogRequest {
            text: words,
            ..Default::default()
        })
        .await
        .expect_err("a thousand words");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("limits.max_search_chars")
            || err.message().contains("limits.max_search_words"),
        "{}",
        err.message()
    );
    let err = client
        .search_catalog(SearchCatalogRequest {
            text: "a".repeat(100),
            ..Default::default()
        })
        .await
        .expect_err("a word too long");
    assert!(
        err.message().contains("limits.max_search_word_chars"),
        "{}",
        err.message()
    );
    let eight = client
        .search_catalog(SearchCatalogRequest {
            text: "registry household marriage civil affairs record data bureau".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(eight.entries.len() <= 6);
    let nul = client
        .search_catalog(SearchCatalogRequest {
            text: "house\u{0}hold".into(),
            ..Default::default()
        })
        .await
        .expect_err("a NUL in the search text");
    assert_eq!(nul.code(), Code::InvalidArgument);
    net.shutdown().await
}

#[tokio::test]
async fn grants_expire_no_later_than_the_configured_maximum() -> Result<()> {
    let net = standard().await?;
    let taijiang = net.consumer_at(code("350103"))?.uscc.clone();
    let mut client = net.client(&taijiang).await?;
    let apply = |resource: &str, expires: i64| ApplyRequest {
        resource_id: resource.into(),
        purpose: "eligibility check".into(),
        scenario: "allowance".into(),
        fields: Vec::new(),
        mode: ShareMode::Query as i32,
        requested_expires_at: expires,
    };
    let err = client
        .apply(apply("350102:household", i64::MAX))
        .await
        .expect_err("a grant that never expires");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("limits.max_grant_days"),
        "{}",
        err.message()
    );

    let a = client
        .apply(apply("350102:household", 0))
        .await?
        .into_inner();
    let signed = a
        .grant
        .clone()
        .expect("an unconditional resource is granted at once");
    let g = Grant::decode(signed.grant.as_slice())?;
    assert_eq!(g.expires_at - g.issued_at, 365 * 24 * 3600, "{g:?}");

    let pending = client
        .apply(apply("350102:marriage", 0))
        .await?
        .into_inner();
    let provider = net.provider_at(code("350102"))?;
    let mut p = net.client(&provider.uscc).await?;
    let err = p
        .decide(DecideRequest {
            application_id: pending.id.clone(),
            approve: true,
            expires_at: g.issued_at + 400 * 24 * 3600,
            ..Default::default()
        })
        .await
        .expect_err("a decision beyond the maximum");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("limits.max_grant_days"),
        "{}",
        err.message()
    );
    net.shutdown().await
}

#[tokio::test]
async fn an_oversized_envelope_from_a_neighbour_is_refused_and_audited() -> Result<()> {
    let net = standard().await?;
    let child = net.ca().issue(&Peer::Node(code("350102")), &[])?;
    let federation = RawChannel::node(&net, "350100", &child)?;
    let hop = Hop {
        node_code: "350102".into(),
        seen_peer: "urn:fedgate:node:350102".into(),
        action: "forwarded-up".into(),
        elapsed_us: 0,
    };
    let req = ForwardRequest {
        envelope: Some(Envelope {
            request_id: "long-route".into(),
            resource_id: "350203:household".into(),
            target_node: "350203".into(),
            consumer_uscc: net.consumer_at(code("350102"))?.uscc.to_string(),
            consumer_node: "350102".into(),
            route: vec![hop; 17],
            hops_left: 4,
            timeout_ms: 5_000,
            ..Default::default()
        }),
        request: Vec::new(),
    };
    let a = federation
        .call(
            "/fedgate.v1.Federation/Forward",
            frame(&req.encode_to_vec()),
            Duration::from_secs(5),
        )
        .await?;
    assert_eq!(a.code, Code::InvalidArgument, "{a:?}");
    assert!(a.message.contains("limits.max_route_hops"), "{a:?}");
    assert!(
        refusals(&net, "350100", "Federation.Forward")
            .await?
            .iter()
            .any(|d| d.contains("limits.max_route_hops"))
    );
    net.shutdown().await
}

#[tokio::test]
async fn a_parent_that_takes_smaller_batches_still_receives_the_audit_stream() -> Result<()> {
    init();
    let mut specs = standard_topology()?;
    let small = LimitsConfig {
        max_message_bytes: 512 * 1024,
        ..LimitsConfig::default()
    };
    specs[0] = specs[0].clone().limits(small);
    // The pile is sent as fast as the nodes answer; the agency's call rate is not what this test is about.
    let mut net = Devnet::start_configured(specs, Default::default(), |mut c| {
        c.rate_limits.agency_calls_per_second = 100_000;
        c.rate_limits.agency_burst = 100_000;
        c
    })
    .await?;
    let province = code("350000");
    net.wait_for_catalog(province, 6, Duration::from_secs(20))
        .await?;
    net.stop_node(province).await?;

    // Records of about 6 kB each pile up at the city while the province is away; as the city's pushes grow back
    // after the outage, one passes 512 KiB and the province refuses it.
    let gulou = net.consumer_at(code("350102"))?.uscc.clone();
    let key = key_at(&net, "350102", 0)?;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(net.client(&gulou).await?);
    }
    let mut tasks = Vec::new();
    for (n, mut c) in clients.into_iter().enumerate() {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..80 {
                let mut s = query("350102:household", &key, &[]);
                s.request_id = format!("pile-{n}-{i}");
                s.purpose = "界".repeat(2000);
                c.share(s).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let fuzhou = net.node(code("350100"))?;
    eventually(
        "the city holds the pile for its parent",
        Duration::from_secs(20),
        || async { Ok(fuzhou.uplink_lag(fedgate_proto::v1::Stream::Audit).await? >= 320) },
    )
    .await?;

    net.restart_node(province).await?;
    eventually(
        "the province receives every record of the pile",
        Duration::from_secs(30),
        || async {
            let mut all = true;
            for n in 0..4 {
                all &= holds_record(&net, "350000", "350102", &format!("pile-{n}-79")).await?;
            }
            Ok(all)
        },
    )
    .await?;
    net.shutdown().await
}

#[tokio::test]
async fn a_malformed_health_check_is_invalid_argument_too() -> Result<()> {
    let net = standard().await?;
    let gulou = net.consumer_at(code("350102"))?;
    let channel = RawChannel::node(&net, "350102", &gulou.cert)?;
    let t = Duration::from_secs(5);
    let bad = channel
        .call(
            "/grpc.health.v1.Health/Check",
            frame(&[0xff, 0xff, 0xff, 0x07]),
            t,
        )
        .await?;
    assert_eq!(bad.code, Code::InvalidArgument, "{bad:?}");
    // A well-formed check is still answered.
    let ok = channel
        .call("/grpc.health.v1.Health/Check", frame(&[]), t)
        .await?;
    assert_eq!(ok.code, Code::Ok, "{ok:?}");
    net.shutdown().await
}

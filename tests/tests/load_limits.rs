//! Connections and load against real nodes: silent connections and floods of handshakes from one source,
//! agencies and neighbours over their rates, open-data downloads of tiny pages, idle public connections.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_gateway::ident::Peer;
use fedgate_node::devnet::Devnet;
use fedgate_proto::v1::{
    AuditOperation, AuditRecord, DownloadRequest, Envelope, ForwardRequest, Hop,
    SearchCatalogRequest, ShareResponse, ShareType,
};
use fedgate_tests::{
    NodeSpec, code, connect_from, eventually, federation_client, init, open_data_client,
    open_dataset, own_audit_records, registry,
};
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic_types::StatusExt;

/// How long a test waits for anything that should happen promptly.
const DEADLINE: Duration = Duration::from_secs(20);

/// Province 350000 with a consumer; city 350100 with a consumer and a provider whose household register is
/// unconditional; county 350102 under it with a consumer.
async fn small_net(tweak: impl Fn(&mut fedgate_gateway::config::NodeConfig)) -> Result<Devnet> {
    init();
    let specs = vec![
        NodeSpec::new("350000")?.consumer(1, "province consumer")?,
        NodeSpec::new("350100")?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou provider",
                registry(ShareType::Unconditional, ShareType::Conditional, 3),
            )?,
        NodeSpec::new("350102")?.consumer(1, "Gulou consumer")?,
    ];
    let net = Devnet::start_configured(specs, Default::default(), |mut c| {
        tweak(&mut c);
        c
    })
    .await?;
    net.wait_for_catalog(code("350000"), 2, DEADLINE).await?;
    Ok(net)
}

/// Records of `operation` by `actor` among `node`'s own.
async fn records_of(
    net: &Devnet,
    node: &str,
    operation: AuditOperation,
    actor: &str,
) -> Result<Vec<AuditRecord>> {
    Ok(own_audit_records(net, node)
        .await?
        .into_iter()
        .filter(|r| r.operation == operation as i32 && r.actor == actor)
        .collect())
}

/// The refusals a set of records stands for: 1 for a record written at once, N for a summary of N.
fn refusals_in(records: &[AuditRecord]) -> Result<u64> {
    let mut n = 0;
    for r in records {
        n += if r.detail.contains(" refused handshakes from ")
            || r.detail.contains(" calls refused ")
        {
            r.detail
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("a summary starts with its count: {}", r.detail))?
        } else {
            1
        };
    }
    Ok(n)
}

/// Whether the peer closed `conn` (end of file or reset) within `within`.
async fn closed_within(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn silent_connections_from_one_source_hold_off_no_one_and_are_audited_in_summary()
-> Result<()> {
    const SILENT: usize = 1100;
    // A long handshake timeout: no silent connection times out while the test looks at the audit.
    let net = small_net(|c| {
        c.connections.refusal_summary_ms = 1000;
        c.connections.handshake_timeout_ms = 60_000;
    })
    .await?;
    let node = net.node(code("350100"))?;
    let per_source = net
        .node_config(code("350100"))?
        .connections
        .max_pending_handshakes_per_source;
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(connect_from([127, 0, 0, 2], node.addr()).await?);
    }

    // An agency from another address gets its handshake and its answer at once, not after the silent
    // connections' handshakes time out.
    let consumer = net.consumer_at(code("350100"))?;
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(8), async {
        let mut client = net.client(&consumer.uscc).await?;
        client
            .search_catalog(SearchCatalogRequest::default())
            .await
            .map_err(anyhow::Error::from)
    })
    .await
    .context("a real client must not wait behind silent connections")??;
    assert!(!answer.into_inner().entries.is_empty());
    let waited = started.elapsed();

    // Every connection past the per-source cap on handshakes in progress was closed at once.
    let mut closed = 0;
    for conn in &mut silent {
        if closed_within(conn, Duration::from_millis(50)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= SILENT - per_source,
        "{closed} of {SILENT} silent connections closed; the cap is {per_source}"
    );
    let over_cap = || {
        node.metrics()
            .connections_refused
            .get_or_create(&[("listener", "backbone"), ("reason", "over_cap")])
            .get()
    };
    assert!(over_cap() >= (SILENT - per_source) as u64, "{}", over_cap());

    // The audit holds one record written at once and then summaries, whose counts add up to the metric.
    eventually("the refusals are summarised", DEADLINE, || async {
        let records =
            records_of(&net, "350100", AuditOperation::TlsRefused, "tcp:127.0.0.2").await?;
        Ok(refusals_in(&records)? == over_cap())
    })
    .await?;
    let records = records_of(&net, "350100", AuditOperation::TlsRefused, "tcp:127.0.0.2").await?;
    assert!(
        records[0].detail.contains("closed at once"),
        "{}",
        records[0].detail
    );
    assert_eq!(records[0].outcome, "UNAUTHENTICATED");
    let summaries = &records[1..];
    assert!(!summaries.is_empty());
    for s in summaries {
        assert!(
            s.detail
                .contains("refused handshakes from tcp:127.0.0.2 in 1000 ms: over cap"),
            "{}",
            s.detail
        );
    }
    // At most one summary per interval of the time the flood lasted (plus the interval it ended in).
    let intervals = (started.elapsed().as_millis() / 1000) as usize + 2;
    assert!(
        summaries.len() <= intervals,
        "{} summaries over {intervals} intervals",
        summaries.len()
    );
    println!(
        "{SILENT} silent connections: real client answered after {waited:?}; {closed} closed at once; \
         {} audit records",
        records.len()
    );
    drop(silent);
    net.shutdown().await
}

#[tokio::test]
async fn an_agency_over_its_rate_gets_resource_exhausted_with_retry_info_and_an_audit_record()
-> Result<()> {
    let net = small_net(|c| {
        c.rate_limits.agency_calls_per_second = 1;
        c.rate_limits.agency_burst = 3;
        c.connections.refusal_summary_ms = 500;
    })
    .await?;
    let consumer = net.consumer_at(code("350102"))?;
    let mut client = net.client(&consumer.uscc).await?;
    let mut refused = Vec::new();
    for _ in 0..13 {
        if let Err(e) = client.search_catalog(SearchCatalogRequest::default()).await {
            refused.push(e);
        }
    }
    // The burst of 3 passes (a fourth may pass as the bucket refills during the calls).
    assert!(
        (9..=10).contains(&refused.len()),
        "{} refused",
        refused.len()
    );
    let err = &refused[0];
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains(consumer.uscc.as_str()),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("1 calls per second (burst 3)"),
        "{}",
        err.message()
    );
    let retry = err
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .context("RESOURCE_EXHAUSTED carries a RetryInfo")?;
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );

    // Another agency at the same node is not affected.
    let other = net.provider_at(code("350100"))?;
    let mut other_client = net.client(&other.uscc).await?;
    other_client
        .search_catalog(SearchCatalogRequest::default())
        .await?;

    // One record at once, then a summary for the rest, all naming the agency as the consumer.
    let actor = Peer::Agency(consumer.uscc.clone()).to_uri();
    eventually("the rate refusals are audited", DEADLINE, || async {
        let records = records_of(&net, "350102", AuditOperation::LimitRefused, &actor).await?;
        Ok(refusals_in(&records)? == refused.len() as u64)
    })
    .await?;
    let records = records_of(&net, "350102", AuditOperation::LimitRefused, &actor).await?;
    assert!(
        records.len() < refused.len(),
        "summarised, not one per refusal"
    );
    assert!(
        records[0]
            .detail
            .starts_with("fedgate.v1.Agency/SearchCatalog refused: agency"),
        "{}",
        records[0].detail
    );
    for r in &records {
        assert_eq!(r.outcome, "RESOURCE_EXHAUSTED");
        assert_eq!(r.consumer_uscc, consumer.uscc.as_str());
    }
    let metric = net
        .node(code("350102"))?
        .metrics()
        .calls_refused
        .get_or_create(&[("reason", "agency_rate")])
        .get();
    assert_eq!(metric, refused.len() as u64);

    // Once the bucket refills the agency is served again.
    let deadline = Instant::now() + DEADLINE;
    while let Err(e) = client.search_catalog(SearchCatalogRequest::default()).await {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(Instant::now() < deadline, "the agency is not served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    net.shutdown().await
}

/// A forward from `from` whose envelope the receiving node refuses (its route does not end at the sender).
fn refused_forward() -> ForwardRequest {
    ForwardRequest {
        envelope: Some(Envelope {
            request_id: "flood".into(),
            resource_id: "350100:household".into(),
            target_node: "350100".into(),
            consumer_node: "350102".into(),
            route: vec![Hop {
                node_code: "350103".into(),
                ..Default::default()
            }],
            hops_left: 4,
            ..Default::default()
        }),
        request: Vec::new(),
    }
}

#[tokio::test]
async fn a_neighbour_flooding_forward_gets_resource_exhausted_with_retry_info() -> Result<()> {
    let net = small_net(|c| {
        c.rate_limits.forward_calls_per_second = 1;
        c.rate_limits.forward_burst = 2;
        c.connections.refusal_summary_ms = 500;
    })
    .await?;
    // A client holding the child's node certificate.
    let child = net.ca().issue(&Peer::Node(code("350102")), &[])?;
    let mut client = federation_client(&net, "350100", &child).await?;
    let mut codes = Vec::new();
    let mut exhausted = Vec::new();
    for _ in 0..12 {
        match client.forward(refused_forward()).await {
            Ok(_) => bail!("a forged route must not be served"),
            Err(e) if e.code() == Code::ResourceExhausted => exhausted.push(e),
            Err(e) => codes.push(e.code()),
        }
    }
    // Within its burst the neighbour's forwards reach the service, which refuses the forged route.
    assert!(!codes.is_empty() && codes.len() <= 3, "{codes:?}");
    assert!(
        codes.iter().all(|c| *c == Code::PermissionDenied),
        "{codes:?}"
    );
    let err = &exhausted[0];
    assert!(err.message().contains("node 350102"), "{}", err.message());
    let retry = err
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .context("RetryInfo")?;
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    let actor = Peer::Node(code("350102")).to_uri();
    eventually("the forward refusals are audited", DEADLINE, || async {
        let records = records_of(&net, "350100", AuditOperation::LimitRefused, &actor).await?;
        Ok(refusals_in(&records)? == exhausted.len() as u64)
    })
    .await?;
    let records = records_of(&net, "350100", AuditOperation::LimitRefused, &actor).await?;
    assert!(
        records[0]
            .detail
            .starts_with("fedgate.v1.Federation/Forward refused: node 350102"),
        "{}",
        records[0].detail
    );
    net.shutdown().await
}

/// Every page of one download call.
async fn download(
    client: &mut fedgate_proto::v1::open_data_client::OpenDataClient<tonic::transport::Channel>,
    page_token: &str,
) -> Result<Vec<ShareResponse>> {
    let mut stream = client
        .download(DownloadRequest {
            resource_id: "350100:household".into(),
            fields: vec!["name".into(), "id_number".into()],
            page_token: page_token.to_owned(),
            page_size: 1,
        })
        .await?
        .into_inner();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await? {
        pages.push(page);
    }
    Ok(pages)
}

/// The download records of the province (one per call), oldest first.
async fn downloads(net: &Devnet) -> Result<Vec<AuditRecord>> {
    Ok(own_audit_records(net, "350000")
        .await?
        .into_iter()
        .filter(|r| {
            r.operation == AuditOperation::ShareBulk as i32 && r.actor.starts_with("public:")
        })
        .collect())
}

#[tokio::test]
async fn an_open_data_download_of_one_record_pages_is_bounded_per_call_and_audited_once_per_call()
-> Result<()> {
    let net = small_net(|_| {}).await?;
    let per_call = net
        .node_config(code("350000"))?
        .open_data
        .as_ref()
        .context("the province serves open data")?
        .max_pages_per_call as usize;
    open_dataset(&net, "350100", "household").await?;
    eventually(
        "the opened entry reaches the province",
        DEADLINE,
        || async {
            let entry = net
                .node(code("350000"))?
                .store()
                .entry("350100:household")
                .await?;
            Ok(entry.is_some_and(|e| e.entry.open))
        },
    )
    .await?;
    let mut public = open_data_client(&net, "350000").await?;
    let city_before = own_audit_records(&net, "350100").await?.len();

    let first = download(&mut public, "").await?;
    assert_eq!(first.len(), per_call, "a call stops at its page limit");
    assert!(first.iter().all(|p| p.records.len() == 1));
    let token = first
        .last()
        .map(|p| p.next_page_token.clone())
        .unwrap_or_default();
    assert!(!token.is_empty(), "the last page tells where to go on");
    let second = download(&mut public, &token).await?;
    assert_eq!(second.len(), 200 - per_call);
    assert_eq!(
        second.last().map(|p| p.next_page_token.as_str()),
        Some(""),
        "the dataset ends"
    );

    // One record per call at the province, with pages and outcome.
    let calls = downloads(&net).await?;
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(calls[0].outcome, "OK");
    assert!(
        calls[0]
            .detail
            .contains(&format!("{per_call} pages of up to 1, {per_call} records")),
        "{}",
        calls[0].detail
    );
    assert!(
        calls[0].detail.contains("continues at token"),
        "{}",
        calls[0].detail
    );
    assert!(calls[1].detail.ends_with("complete"), "{}", calls[1].detail);
    assert_eq!(calls[0].resource_id, "350100:household");
    // And the provider's node served each call in one request: one record per call there too.
    eventually("the city's records are written", DEADLINE, || async {
        Ok(own_audit_records(&net, "350100").await?.len() >= city_before + 2)
    })
    .await?;
    let city: Vec<_> = own_audit_records(&net, "350100")
        .await?
        .into_iter()
        .skip(city_before)
        .filter(|r| r.resource_id == "350100:household")
        .collect();
    assert_eq!(city.len(), 2, "{city:#?}");
    for (call, served) in calls.iter().zip(&city) {
        assert_eq!(served.request_id, format!("{}-p0", call.request_id));
    }

    // A token from the middle of a call resumes right after its page.
    let middle = &first[per_call / 2];
    let resumed = download(&mut public, &middle.next_page_token).await?;
    assert_eq!(
        resumed.first().map(|p| &p.records),
        Some(&first[per_call / 2 + 1].records)
    );
    // A token this endpoint never issued is refused.
    let err = download(&mut public, "not-a-token")
        .await
        .expect_err("foreign token");
    let status = err
        .downcast_ref::<tonic::Status>()
        .context("a gRPC status")?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    net.shutdown().await
}

#[tokio::test]
async fn idle_and_excess_open_data_connections_are_closed() -> Result<()> {
    let net = small_net(|c| {
        c.connections.open_data_idle_timeout_secs = 1;
        c.connections.open_data_max_connections_per_source = 2;
        c.connections.handshake_timeout_ms = 500;
    })
    .await?;
    let province = net.node(code("350000"))?;
    let addr = province.open_data_addr().context("open data")?;
    let refused = |reason: &'static str| {
        province
            .metrics()
            .connections_refused
            .get_or_create(&[("listener", "open_data"), ("reason", reason)])
            .get()
    };

    // A TLS connection that never sends a request is closed after the idle timeout.
    let tcp = connect_from([127, 0, 0, 3], addr).await?;
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(net.ca().ca_pem().as_bytes())
        {
            roots.add(cert?)?;
        }
        roots
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("350000.node.fedgate")?;
    let mut tls = connector.connect(name, tcp).await?;
    let opened = Instant::now();
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection must be closed");
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "{:?}",
        opened.elapsed()
    );

    // A TCP connection that never starts its handshake is dropped at the handshake timeout.
    let before = refused("timeout");
    let mut silent = connect_from([127, 0, 0, 3], addr).await?;
    assert!(closed_within(&mut silent, DEADLINE).await);
    eventually("the timeout is counted", DEADLINE, || async {
        Ok(refused("timeout") > before)
    })
    .await?;

    // Past two open connections from one source, more are closed at once.
    let _a = connect_from([127, 0, 0, 4], addr).await?;
    let _b = connect_from([127, 0, 0, 4], addr).await?;
    let mut third = connect_from([127, 0, 0, 4], addr).await?;
    assert!(closed_within(&mut third, Duration::from_millis(400)).await);
    assert!(refused("over_cap") >= 1);
    // The public endpoint still serves others.
    let mut public = open_data_client(&net, "350000").await?;
    public
        .list_datasets(fedgate_proto::v1::ListDatasetsRequest::default())
        .await?;
    net.shutdown().await
}

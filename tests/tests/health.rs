//! Health and reflection as the stock clients of `tonic-health` and `tonic-reflection` see them, over real TLS
//! against real nodes: reflection v1 and v1alpha list exactly what each listener serves; health is SERVING per
//! service, NOT_SERVING while the node drains and while its storage is gone, and `/readyz` says the same.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fedgate_gateway::config::StorageConfig;
use fedgate_gateway::ident::Peer;
use fedgate_node::devnet::{Devnet, NodeSpec};
use fedgate_tests::probe::http_get;
use fedgate_tests::{channel_to, code, eventually, init, key_at, query, registry, standard};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BACKBONE: [&str; 6] = [
    "fedgate.v1.Agency",
    "fedgate.v1.Federation",
    "fedgate.v1.Operator",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

const OPEN_DATA: [&str; 4] = [
    "fedgate.v1.OpenData",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// An mTLS channel to `node`'s backbone listener with the node's own identity.
fn backbone(net: &Devnet, node: &str) -> Result<Channel> {
    let cert = net.ca().issue(&Peer::Node(code(node)), &[])?;
    channel_to(net, node, &cert)
}

/// A TLS channel (no client certificate) to the root's open-data listener.
async fn open_data(net: &Devnet, root: &str) -> Result<Channel> {
    let addr = net
        .node(code(root))?
        .open_data_addr()
        .context("the root runs the open-data endpoint")?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(net.ca().ca_pem()))
        .domain_name(format!("{root}.node.fedgate"));
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// The services reflection v1 lists on `channel`, and whether it describes `symbol`.
async fn list_v1(channel: Channel, symbol: &str) -> Result<(BTreeSet<String>, bool)> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
    let asks = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(symbol.to_owned()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(asks))
        .await?
        .into_inner();
    let mut listed = BTreeSet::new();
    let mut described = false;
    while let Some(ServerReflectionResponse {
        message_response, ..
    }) = answers.message().await?
    {
        match message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                listed.extend(l.service.into_iter().map(|s| s.name));
            }
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                described = !f.file_descriptor_proto.is_empty();
            }
            other => bail!("unexpected reflection answer {other:?}"),
        }
    }
    Ok((listed, described))
}

/// The services reflection v1alpha lists on `channel`, and whether it describes `symbol`.
async fn list_v1alpha(channel: Channel, symbol: &str) -> Result<(BTreeSet<String>, bool)> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};
    let asks = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(symbol.to_owned()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(asks))
        .await?
        .into_inner();
    let mut listed = BTreeSet::new();
    let mut described = false;
    while let Some(ServerReflectionResponse {
        message_response, ..
    }) = answers.message().await?
    {
        match message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                listed.extend(l.service.into_iter().map(|s| s.name));
            }
            Some(MessageResponse::FileDescriptorResponse(f)) => {
                described = !f.file_descriptor_proto.is_empty();
            }
            other => bail!("unexpected reflection answer {other:?}"),
        }
    }
    Ok((listed, described))
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_exactly_what_each_listener_serves() -> Result<()> {
    let net = standard().await?;
    for node in ["350000", "350102"] {
        let channel = backbone(&net, node)?;
        for (version, (listed, described)) in [
            ("v1", list_v1(channel.clone(), "fedgate.v1.Operator").await?),
            (
                "v1alpha",
                list_v1alpha(channel.clone(), "fedgate.v1.Operator").await?,
            ),
        ] {
            assert_eq!(listed, set(&BACKBONE), "{version} at {node}");
            assert!(described, "{version} at {node} describes Operator");
        }
    }
    let channel = open_data(&net, "350000").await?;
    for (version, (listed, described)) in [
        ("v1", list_v1(channel.clone(), "fedgate.v1.OpenData").await?),
        (
            "v1alpha",
            list_v1alpha(channel.clone(), "fedgate.v1.OpenData").await?,
        ),
    ] {
        assert_eq!(
            listed,
            set(&OPEN_DATA),
            "{version} on the open-data listener"
        );
        assert!(described, "{version} describes OpenData");
    }
    net.shutdown().await
}

async fn status(client: &mut HealthClient<Channel>, service: &str) -> Result<ServingStatus, Code> {
    client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(|r| r.into_inner().status())
        .map_err(|s| s.code())
}

#[tokio::test]
async fn health_is_per_service_and_turns_not_serving_while_the_node_drains() -> Result<()> {
    let mut net = standard().await?;
    let mut health = HealthClient::new(backbone(&net, "350102")?);
    for s in std::iter::once("").chain(BACKBONE) {
        assert_eq!(
            status(&mut health, s).await,
            Ok(ServingStatus::Serving),
            "{s:?}"
        );
    }
    // A service this listener does not serve is unknown to its health service.
    for s in ["fedgate.v1.Provider", "fedgate.v1.OpenData"] {
        assert_eq!(status(&mut health, s).await, Err(Code::NotFound), "{s}");
    }
    let mut open = HealthClient::new(open_data(&net, "350000").await?);
    for s in std::iter::once("").chain(OPEN_DATA) {
        assert_eq!(
            status(&mut open, s).await,
            Ok(ServingStatus::Serving),
            "{s:?}"
        );
    }
    assert_eq!(
        status(&mut open, "fedgate.v1.Agency").await,
        Err(Code::NotFound)
    );

    // A watcher sees the drain begin; its stream then ends, so it does not hold the drain open.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "fedgate.v1.Federation".into(),
        })
        .await?
        .into_inner();
    let first = watch.message().await?.context("a first status")?;
    assert_eq!(first.status(), ServingStatus::Serving);
    let node = net.take_node(code("350102"))?;
    let started = Instant::now();
    let stopping = tokio::spawn(node.shutdown());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .context("the watcher heard of the drain")??
        .context("a status before the stream ends")?;
    assert_eq!(next.status(), ServingStatus::NotServing);
    let end = tokio::time::timeout(Duration::from_secs(10), watch.message()).await;
    assert!(
        matches!(end, Ok(Ok(None)) | Ok(Err(_))),
        "the watch ends with the drain: {end:?}"
    );
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .context("the node stopped")???;
    assert!(
        started.elapsed()
            < Duration::from_secs(fedgate_gateway::config::DEFAULT_SHUTDOWN_GRACE_SECS),
        "the watcher did not hold the drain for the whole grace ({:?})",
        started.elapsed()
    );
    net.shutdown().await
}

/// While a call in flight holds the drain open, `/readyz` answers 503 naming the drain; the call is still
/// answered in full.
#[tokio::test]
async fn readyz_says_draining_while_a_call_in_flight_holds_the_drain_open() -> Result<()> {
    use fedgate_proto::v1::ShareType::{Conditional, Unconditional};
    init();
    let city = code("350100");
    let latency = Duration::from_secs(4);
    let mut net = Devnet::start(vec![
        NodeSpec::new("350100")?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou provider",
                registry(Unconditional, Conditional, 3),
            )?
            .provider_latency(latency),
    ])
    .await?;
    let metrics = net
        .node(city)?
        .metrics_addr()
        .context("the metrics listener")?;
    assert_eq!(http_get(metrics, "/readyz").await?, (200, "ready\n".into()));
    let provider = net
        .provider_at(city)?
        .provider
        .clone()
        .context("the provider serves a registry")?;
    let mut consumer = net.client(&net.consumer_at(city)?.uscc).await?;
    let share = query("350100:household", &key_at(&net, "350100", 0)?, &["name"]);
    let call = tokio::spawn(async move { consumer.share(share).await });
    eventually("the provider has the call", Duration::from_secs(10), || {
        let received = provider.received();
        async move { Ok(received > 0) }
    })
    .await?;

    let started = Instant::now();
    let stopping = tokio::spawn(net.take_node(city)?.shutdown());
    eventually(
        "/readyz says the node drains",
        Duration::from_secs(5),
        || async {
            let (status, body) = http_get(metrics, "/readyz").await?;
            Ok(status == 503 && body == "not ready: draining\n")
        },
    )
    .await?;
    assert!(
        !call.is_finished(),
        "the drain was seen while the call still ran ({:?} into the drain)",
        started.elapsed()
    );
    let answered = call
        .await?
        .map_err(|s| anyhow::anyhow!("the call in flight failed: {s:?}"))?;
    assert_eq!(answered.into_inner().records.len(), 1);
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .context("the node stopped")???;
    net.shutdown().await
}

#[tokio::test]
async fn health_and_readyz_follow_the_storage_away_and_back() -> Result<()> {
    init();
    let data = tempfile::tempdir()?;
    let db_dir = data.path().join("db");
    let moved = data.path().join("db.unmounted");
    std::fs::create_dir(&db_dir)?;
    let net = Devnet::start(vec![
        NodeSpec::new("350000")?.storage(StorageConfig::sqlite(db_dir.join("350000.db"))),
    ])
    .await?;
    let node = net.node(code("350000"))?;
    let metrics = node.metrics_addr().context("the metrics listener")?;
    let mut health = HealthClient::new(backbone(&net, "350000")?);
    assert_eq!(http_get(metrics, "/livez").await?, (200, "live\n".into()));
    assert_eq!(http_get(metrics, "/readyz").await?, (200, "ready\n".into()));

    // The database's directory goes away (a volume unmounted): the pooled connections still hold the file,
    // but a new one cannot be opened, and the node says so.
    std::fs::rename(&db_dir, &moved)?;
    eventually("health NOT_SERVING", Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            Ok(
                status(&mut health, "").await == Ok(ServingStatus::NotServing)
                    && status(&mut health, "fedgate.v1.Agency").await
                        == Ok(ServingStatus::NotServing),
            )
        }
    })
    .await?;
    let (code_, body) = http_get(metrics, "/readyz").await?;
    assert_eq!(code_, 503, "{body}");
    assert!(
        body.starts_with("not ready: storage unavailable: "),
        "{body}"
    );
    assert_eq!(http_get(metrics, "/livez").await?.0, 200, "still live");

    std::fs::rename(&moved, &db_dir)?;
    eventually("health SERVING again", Duration::from_secs(10), || {
        let mut health = health.clone();
        async move { Ok(status(&mut health, "fedgate.v1.Operator").await == Ok(ServingStatus::Serving)) }
    })
    .await?;
    assert_eq!(status(&mut health, "").await, Ok(ServingStatus::Serving));
    assert_eq!(http_get(metrics, "/readyz").await?, (200, "ready\n".into()));
    net.shutdown().await
}

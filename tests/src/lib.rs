//! Harness for fedgate's integration tests: real federations on loopback (see `fedgate_node::devnet`),
//! plus the small helpers every test uses.

pub mod bench;
pub mod catalog_bench;
pub mod certs;
pub mod console;
pub mod db_lock;
pub mod flowback;
pub mod guide;
pub mod postgres;
pub mod probe;
pub mod process;
pub mod raw;
pub mod rogue;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
pub use fedgate_gateway::ident::DivisionCode;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::IssuedCert;
use fedgate_gateway::store::AuditQuery;
use fedgate_gateway::tls::{TlsMaterial, client_tls};
pub use fedgate_node::devnet::{Devnet, NodeSpec, ProviderSpec};
use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::open_data_client::OpenDataClient;
use fedgate_proto::v1::operator_client::OperatorClient;
use fedgate_proto::v1::{AuditRecord, PublishEntryRequest, ShareMode, ShareRequest, ShareType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Installs the rustls provider and a test log writer; safe to call from every test.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Parses a division code known to be valid.
pub fn code(s: &str) -> DivisionCode {
    match s.parse() {
        Ok(c) => c,
        Err(e) => panic!("test code {s}: {e}"),
    }
}

/// A small registry provider.
pub fn registry(household: ShareType, marriage: ShareType, seed: u64) -> ProviderSpec {
    ProviderSpec {
        household,
        marriage,
        persons: 200,
        seed,
    }
}

/// The standard test federation: province 350000; cities 350100 and 350200; counties 350102, 350103 (under
/// 350100) and 350203 (under 350200). Providers at 350100, 350102 and 350203; a consumer on every node.
///
/// Share types: 350102 household unconditional, marriage conditional; 350203 household unconditional,
/// marriage not shared; 350100 household unconditional, marriage conditional.
pub fn standard_topology() -> Result<Vec<NodeSpec>> {
    use ShareType::{Conditional, NotShared, Unconditional};
    Ok(vec![
        NodeSpec::new("350000")?.consumer(1, "province consumer")?,
        NodeSpec::new("350100")?
            .consumer(1, "Fuzhou consumer")?
            .provider(
                2,
                "Fuzhou provider",
                registry(Unconditional, Conditional, 3),
            )?,
        NodeSpec::new("350200")?.consumer(1, "Xiamen consumer")?,
        NodeSpec::new("350102")?
            .consumer(1, "Gulou consumer")?
            .provider(2, "Gulou provider", registry(Unconditional, Conditional, 1))?,
        NodeSpec::new("350103")?.consumer(1, "Taijiang consumer")?,
        NodeSpec::new("350203")?
            .consumer(1, "Siming consumer")?
            .provider(2, "Siming provider", registry(Unconditional, NotShared, 2))?,
    ])
}

/// Starts the standard federation and waits until the province holds all six entries.
pub async fn standard() -> Result<Devnet> {
    init();
    let net = Devnet::start(standard_topology()?).await?;
    net.wait_for_catalog(code("350000"), 6, Duration::from_secs(20))
        .await?;
    Ok(net)
}

/// A query share request.
pub fn query(resource: &str, key: &str, fields: &[&str]) -> ShareRequest {
    ShareRequest {
        request_id: String::new(),
        resource_id: resource.to_owned(),
        mode: ShareMode::Query as i32,
        key: key.to_owned(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        purpose: "integration test".to_owned(),
        ..Default::default()
    }
}

/// A valid ID number held by the provider agency at `node`.
pub fn key_at(net: &Devnet, node: &str, i: usize) -> Result<String> {
    let p = net.provider_at(code(node))?;
    match p.registry.as_ref().and_then(|r| r.sample_id(i)) {
        Some(k) => Ok(k.to_owned()),
        None => bail!("provider at {node} has no record {i}"),
    }
}

/// Polls `check` until it returns true, failing after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every audit record `node` wrote itself, oldest first.
pub async fn own_audit_records(net: &Devnet, node: &str) -> Result<Vec<AuditRecord>> {
    let store = net.node(code(node))?.store().clone();
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let rows = store
            .audit_query(&AuditQuery {
                node_prefix: Some(node.to_owned()),
                after_fwd_seq: after,
                limit: 1000,
                ..Default::default()
            })
            .await?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        after = Some(*last);
        out.extend(
            rows.into_iter()
                .map(|(_, r)| r)
                .filter(|r| r.node_code == node),
        );
    }
    Ok(out)
}

/// A lazily connecting mTLS channel to `node` presenting `cert` (any certificate of the federation's CA).
pub fn channel_to(net: &Devnet, node: &str, cert: &IssuedCert) -> Result<Channel> {
    let tls = TlsMaterial {
        ca_pem: net.ca().ca_pem(),
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
    };
    Ok(Endpoint::from_shared(net.node_url(code(node))?)?
        .tls_config(client_tls(&tls, &Peer::Node(code(node))))?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// A Federation client of `node` presenting `cert` (any certificate of the federation's CA).
pub async fn federation_client(
    net: &Devnet,
    node: &str,
    cert: &IssuedCert,
) -> Result<FederationClient<Channel>> {
    Ok(FederationClient::new(channel_to(net, node, cert)?))
}

/// An Operator client of `node` presenting `cert` (the node's own certificate makes it the node's operator).
pub fn operator_client_with(
    net: &Devnet,
    node: &str,
    cert: &IssuedCert,
) -> Result<OperatorClient<Channel>> {
    Ok(OperatorClient::new(channel_to(net, node, cert)?))
}

/// The operator of `node`: an Operator client presenting a certificate of the node's own identity.
pub fn operator_client(net: &Devnet, node: &str) -> Result<OperatorClient<Channel>> {
    let cert = net.ca().issue(&Peer::Node(code(node)), &[])?;
    operator_client_with(net, node, &cert)
}

/// A client of the root's public open-data endpoint (TLS, no client certificate).
pub async fn open_data_client(net: &Devnet, root: &str) -> Result<OpenDataClient<Channel>> {
    let addr = net
        .node(code(root))?
        .open_data_addr()
        .context("the root runs the open-data endpoint")?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(net.ca().ca_pem()))
        .domain_name(format!("{root}.node.fedgate"));
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(OpenDataClient::new(channel))
}

/// Marks the provider's published entry `<node>:<local>` as open data.
pub async fn open_dataset(net: &Devnet, node: &str, local: &str) -> Result<()> {
    let provider = net.provider_at(code(node))?;
    let mut entry = provider
        .published
        .iter()
        .find(|e| e.id.ends_with(&format!(":{local}")))
        .cloned()
        .with_context(|| format!("no published entry {node}:{local}"))?;
    entry.open = true;
    net.client(&provider.uscc)
        .await?
        .publish_entry(PublishEntryRequest { entry: Some(entry) })
        .await?;
    Ok(())
}

/// A TCP connection to `addr` from the loopback address `from` (per-source limits tell loopback addresses
/// apart, so a test can play several sources).
pub async fn connect_from(
    from: [u8; 4],
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from((from, 0)))?;
    Ok(socket.connect(addr).await?)
}

/// The body of `GET /metrics` on `node`'s metrics endpoint (OpenMetrics text); fails on any other status.
pub async fn metrics_text(net: &Devnet, node: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = net
        .node(code(node))?
        .metrics_addr()
        .context("the metrics endpoint is configured")?;
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await?;
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        bail!("not an HTTP response: {raw:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics on {node}: {head}");
    }
    Ok(body.to_owned())
}

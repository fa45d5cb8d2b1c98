//! Harness for fedgate's integration tests: real federations on loopback (see `fedgate_node::devnet`),
//! plus the small helpers every test uses.

pub mod bench;
pub mod postgres;
pub mod process;
pub mod rogue;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
pub use fedgate_gateway::ident::DivisionCode;
pub use fedgate_node::devnet::{Devnet, NodeSpec, ProviderSpec};
use fedgate_proto::v1::{ShareMode, ShareRequest, ShareType};

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

//! A whole federation on loopback for the demo and the integration tests: a temporary PKI, real nodes on
//! ephemeral ports with SQLite files, and example provider agencies publishing their catalogs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fedgate_examples::{
    ProviderTls, Registry, RegistryProvider, civil_affairs_entries, connect_agency, publish_all,
};
use fedgate_gateway::clock::SystemClock;
use fedgate_gateway::config::{
    AgencyConfig, MetricsConfig, NodeConfig, OpenDataConfig, PeerNode, RoutingConfig,
    StorageConfig, TlsFiles,
};
use fedgate_gateway::ident::{DivisionCode, Peer, Uscc};
use fedgate_gateway::limits::LimitsConfig;
use fedgate_gateway::node::{self, NodeHandle};
use fedgate_gateway::pki::{DevCa, IssuedCert, write_pem_files};
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{CatalogEntry, ShareType};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;

/// Calls per minute each client may make to the root's open-data endpoint.
pub const OPEN_DATA_RATE: u32 = 120;
/// Pages one open-data download call streams at most.
pub const OPEN_DATA_PAGES_PER_CALL: u32 = 100;

/// One node of a development federation.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Its division code; its parent is the nearest listed ancestor.
    pub code: DivisionCode,
    /// Agencies registered on it.
    pub agencies: Vec<AgencySpec>,
    /// Its store; an SQLite file in the federation's directory when absent.
    pub storage: Option<StorageConfig>,
    /// Its input limits; the defaults when absent.
    pub limits: Option<LimitsConfig>,
}

/// An agency of a development federation.
#[derive(Debug, Clone)]
pub struct AgencySpec {
    /// Its code.
    pub uscc: Uscc,
    /// Display name.
    pub name: String,
    /// The civil-affairs registry it provides, if any.
    pub provider: Option<ProviderSpec>,
    /// How long its Provider service takes to answer each call.
    pub latency: Duration,
}

/// A civil-affairs registry served by a provider agency, and the share types of its two resources.
#[derive(Debug, Clone, Copy)]
pub struct ProviderSpec {
    /// Share type of `<node>:household`.
    pub household: ShareType,
    /// Share type of `<node>:marriage`.
    pub marriage: ShareType,
    /// Persons generated.
    pub persons: usize,
    /// Generator seed.
    pub seed: u64,
}

impl NodeSpec {
    /// A node with no agencies.
    pub fn new(code: &str) -> Result<Self> {
        Ok(Self {
            code: code.parse().map_err(|e| anyhow!("node {code}: {e}"))?,
            agencies: Vec::new(),
            storage: None,
            limits: None,
        })
    }

    /// The node enforces `limits` instead of the defaults.
    pub fn limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = Some(limits);
        self
    }

    /// The node keeps its state in `storage` instead of an SQLite file of the federation.
    pub fn storage(mut self, storage: StorageConfig) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Adds a consumer agency numbered `n` at this node.
    pub fn consumer(mut self, n: u32, name: &str) -> Result<Self> {
        self.agencies.push(AgencySpec {
            uscc: agency_code(self.code, n)?,
            name: name.to_owned(),
            provider: None,
            latency: Duration::ZERO,
        });
        Ok(self)
    }

    /// Adds a provider agency numbered `n` at this node.
    pub fn provider(mut self, n: u32, name: &str, spec: ProviderSpec) -> Result<Self> {
        self.agencies.push(AgencySpec {
            uscc: agency_code(self.code, n)?,
            name: name.to_owned(),
            provider: Some(spec),
            latency: Duration::ZERO,
        });
        Ok(self)
    }

    /// The provider agencies of this node answer each call `latency` after it arrived.
    pub fn provider_latency(mut self, latency: Duration) -> Self {
        for a in &mut self.agencies {
            a.latency = latency;
        }
        self
    }
}

/// A valid unified social credit code of a government agency (category 11) registered at `node`.
pub fn agency_code(node: DivisionCode, n: u32) -> Result<Uscc> {
    Uscc::with_check(&format!("11{node}{n:09}")).map_err(|e| anyhow!("agency code: {e}"))
}

/// A running agency of the federation.
#[derive(Debug)]
pub struct DevAgency {
    /// Its code.
    pub uscc: Uscc,
    /// Display name.
    pub name: String,
    /// Node it is registered on.
    pub node: DivisionCode,
    /// Its certificate and key.
    pub cert: IssuedCert,
    /// The registry it serves, if it is a provider.
    pub registry: Option<Arc<Registry>>,
    /// Its Provider service, if it is a provider (a clone sharing the service's counters).
    pub provider: Option<RegistryProvider>,
    /// Catalog entries it published, as stored by its node.
    pub published: Vec<CatalogEntry>,
}

/// The agencies of a development federation, by code, with the lookups tests use.
#[derive(Debug, Default)]
pub struct Agencies(BTreeMap<Uscc, DevAgency>);

impl std::ops::Deref for Agencies {
    type Target = BTreeMap<Uscc, DevAgency>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Agencies {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Agencies {
    /// One agency.
    pub fn agency(&self, uscc: &Uscc) -> Result<&DevAgency> {
        self.0
            .get(uscc)
            .ok_or_else(|| anyhow!("no agency {uscc} in this federation"))
    }

    /// The first agency at `node` that serves a registry.
    pub fn provider_at(&self, node: DivisionCode) -> Result<&DevAgency> {
        self.0
            .values()
            .find(|a| a.node == node && a.registry.is_some())
            .ok_or_else(|| anyhow!("no provider agency at node {node}"))
    }

    /// The first consumer (non-provider) agency at `node`.
    pub fn consumer_at(&self, node: DivisionCode) -> Result<&DevAgency> {
        self.0
            .values()
            .find(|a| a.node == node && a.registry.is_none())
            .ok_or_else(|| anyhow!("no consumer agency at node {node}"))
    }
}

struct DevNode {
    config: NodeConfig,
    addr: SocketAddr,
    handle: Option<NodeHandle>,
}

/// A running development federation. Dropping it without [`Devnet::shutdown`] aborts its tasks.
pub struct Devnet {
    dir: tempfile::TempDir,
    ca: DevCa,
    nodes: BTreeMap<DivisionCode, DevNode>,
    agencies: Agencies,
    stop_providers: watch::Sender<bool>,
    clock: Arc<SystemClock>,
}

fn loopback_listener() -> impl std::future::Future<Output = std::io::Result<TcpListener>> {
    TcpListener::bind("127.0.0.1:0")
}

/// Issues an agency's certificate into `pki` and, for a provider, starts its registry service on loopback until
/// `stop` turns true; returns the agency's node configuration and its handle.
pub async fn start_agency(
    ca: &DevCa,
    pki: &Path,
    node: DivisionCode,
    a: &AgencySpec,
    stop: watch::Receiver<bool>,
) -> Result<(AgencyConfig, DevAgency)> {
    let cert = ca.issue_agency(&a.uscc, node, &[])?;
    write_pem_files(pki, &format!("agency-{}", a.uscc), &cert)?;
    let mut provider_addr = None;
    let mut registry = None;
    let mut service = None;
    if let Some(p) = a.provider {
        let reg = Arc::new(Registry::generate(node.as_str(), p.seed, p.persons)?);
        let listener = loopback_listener().await?;
        provider_addr = Some(format!("https://{}", listener.local_addr()?));
        let tls = ProviderTls {
            ca_pem: ca.ca_pem().into_bytes(),
            cert_pem: cert.cert_pem.clone().into_bytes(),
            key_pem: cert.key_pem.clone().into_bytes(),
        };
        let provider = RegistryProvider::new(reg.clone(), node.to_string()).with_latency(a.latency);
        service = Some(provider.clone());
        let mut stop = stop;
        let uscc = a.uscc.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) =
                fedgate_examples::serve_provider(listener, tls, provider, shutdown).await
            {
                tracing::error!(agency = %uscc, error = %e, "provider stopped");
            }
        });
        registry = Some(reg);
    }
    Ok((
        AgencyConfig {
            uscc: a.uscc.to_string(),
            name: a.name.clone(),
            provider: provider_addr,
        },
        DevAgency {
            uscc: a.uscc.clone(),
            name: a.name.clone(),
            node,
            cert,
            registry,
            provider: service,
            published: Vec::new(),
        },
    ))
}

/// Nearest ancestor of `code` among `codes`.
fn parent_in(code: DivisionCode, codes: &[DivisionCode]) -> Option<DivisionCode> {
    let mut p = code.parent();
    while let Some(c) = p {
        if codes.contains(&c) {
            return Some(c);
        }
        p = c.parent();
    }
    None
}

impl Devnet {
    /// Starts every node and provider of `specs` on loopback and publishes the providers' catalogs.
    pub async fn start(specs: Vec<NodeSpec>) -> Result<Self> {
        Self::start_with(specs, RoutingConfig::default()).await
    }

    /// Like [`Devnet::start`], with routing limits for every node.
    pub async fn start_with(specs: Vec<NodeSpec>, routing: RoutingConfig) -> Result<Self> {
        Self::start_configured(specs, routing, |config| config).await
    }

    /// Like [`Devnet::start_with`], passing each node's configuration through `tweak` before the node starts
    /// (tests tighten limits this way).
    pub async fn start_configured(
        specs: Vec<NodeSpec>,
        routing: RoutingConfig,
        tweak: impl Fn(NodeConfig) -> NodeConfig,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fedgate-devnet-")
            .tempdir()?;
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki)?;
        let ca = DevCa::generate("fedgate devnet root")?;
        let ca_path = pki.join("ca.crt");
        std::fs::write(&ca_path, ca.ca_pem())?;

        let codes: Vec<DivisionCode> = specs.iter().map(|s| s.code).collect();
        let mut listeners = BTreeMap::new();
        for s in &specs {
            if listeners
                .insert(s.code, loopback_listener().await?)
                .is_some()
            {
                bail!("node {} is listed twice", s.code);
            }
        }
        let addrs: BTreeMap<DivisionCode, SocketAddr> = listeners
            .iter()
            .map(|(c, l)| Ok((*c, l.local_addr()?)))
            .collect::<Result<_>>()?;
        let address = |c: &DivisionCode| format!("https://{}", addrs[c]);

        let (stop_providers, stop_rx) = watch::channel(false);
        let mut agencies = Agencies::default();
        let mut agency_configs: BTreeMap<DivisionCode, Vec<AgencyConfig>> = BTreeMap::new();
        for s in &specs {
            for a in &s.agencies {
                let (config, agency) = start_agency(&ca, &pki, s.code, a, stop_rx.clone()).await?;
                agency_configs.entry(s.code).or_default().push(config);
                agencies.insert(a.uscc.clone(), agency);
            }
        }

        let mut nodes = BTreeMap::new();
        for s in &specs {
            let cert = ca.issue(&Peer::Node(s.code), &[])?;
            let (cert_path, key_path) = write_pem_files(&pki, &format!("node-{}", s.code), &cert)?;
            let parent = parent_in(s.code, &codes).map(|p| PeerNode {
                code: p.to_string(),
                address: address(&p),
                replicas: Vec::new(),
            });
            let children = codes
                .iter()
                .filter(|c| parent_in(**c, &codes) == Some(s.code))
                .map(|c| PeerNode {
                    code: c.to_string(),
                    address: address(c),
                    replicas: Vec::new(),
                })
                .collect();
            let config = NodeConfig {
                code: s.code.to_string(),
                listen: addrs[&s.code].to_string(),
                tls: TlsFiles {
                    ca: ca_path.clone(),
                    cert: cert_path,
                    key: key_path,
                },
                storage: s.storage.clone().unwrap_or_else(|| {
                    StorageConfig::sqlite(dir.path().join(format!("node-{}.db", s.code)))
                }),
                parent,
                children,
                agencies: agency_configs.remove(&s.code).unwrap_or_default(),
                routing: routing.clone(),
                signing_key: Some(dir.path().join(format!("node-{}.key", s.code))),
                audit: Default::default(),
                calendar: Default::default(),
                cache: Default::default(),
                open_data: parent_in(s.code, &codes).is_none().then(|| OpenDataConfig {
                    listen: "127.0.0.1:0".into(),
                    requests_per_minute: OPEN_DATA_RATE,
                    max_pages_per_call: OPEN_DATA_PAGES_PER_CALL,
                }),
                metrics: Some(MetricsConfig {
                    listen: "127.0.0.1:0".into(),
                }),
                trust: Default::default(),
                connections: Default::default(),
                rate_limits: Default::default(),
                limits: s.limits.unwrap_or_default(),
                flowback: Default::default(),
                shutdown_grace_secs: fedgate_gateway::config::DEFAULT_SHUTDOWN_GRACE_SECS,
                own_view: Default::default(),
                op_monitoring: Default::default(),
                console: None,
            };
            let config = tweak(config);
            std::fs::write(
                dir.path().join(format!("node-{}.toml", s.code)),
                toml::to_string(&config).context("writing the node configuration")?,
            )?;
            nodes.insert(
                s.code,
                DevNode {
                    config,
                    addr: addrs[&s.code],
                    handle: None,
                },
            );
        }
        let clock = Arc::new(SystemClock::default());
        for (code, listener) in listeners {
            let n = nodes.get_mut(&code).context("node vanished")?;
            n.handle =
                Some(node::start_with_clock(n.config.clone(), listener, clock.clone()).await?);
        }

        let mut net = Self {
            dir,
            ca,
            nodes,
            agencies,
            stop_providers,
            clock,
        };
        net.publish_catalogs(&specs).await?;
        Ok(net)
    }

    async fn publish_catalogs(&mut self, specs: &[NodeSpec]) -> Result<()> {
        for s in specs {
            for a in &s.agencies {
                let Some(p) = a.provider else { continue };
                let mut client = self.client(&a.uscc).await?;
                let stored =
                    publish_all(&mut client, civil_affairs_entries(p.household, p.marriage))
                        .await
                        .map_err(|e| anyhow!("publishing the catalog of {}: {e}", a.uscc))?;
                if let Some(agency) = self.agencies.get_mut(&a.uscc) {
                    agency.published = stored;
                }
            }
        }
        Ok(())
    }

    /// Moves every node's clock forward (deadlines and expiries come nearer).
    pub fn advance_clock(&self, secs: i64) {
        self.clock.advance(secs);
    }

    /// The clock every node of this federation uses.
    pub fn clock(&self) -> &SystemClock {
        &self.clock
    }

    /// The directory holding the PKI and databases.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The development CA, to issue more certificates.
    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    /// The CA certificate file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("pki").join("ca.crt")
    }

    /// The codes of all nodes.
    pub fn node_codes(&self) -> Vec<DivisionCode> {
        self.nodes.keys().copied().collect()
    }

    /// The `https://` address of a node.
    pub fn node_url(&self, code: DivisionCode) -> Result<String> {
        Ok(format!("https://{}", self.dev_node(code)?.addr))
    }

    /// The configuration a node runs with.
    pub fn node_config(&self, code: DivisionCode) -> Result<&NodeConfig> {
        Ok(&self.dev_node(code)?.config)
    }

    /// The running node, if it is up.
    pub fn node(&self, code: DivisionCode) -> Result<&NodeHandle> {
        self.dev_node(code)?
            .handle
            .as_ref()
            .ok_or_else(|| anyhow!("node {code} is stopped"))
    }

    fn dev_node(&self, code: DivisionCode) -> Result<&DevNode> {
        self.nodes
            .get(&code)
            .ok_or_else(|| anyhow!("no node {code} in this federation"))
    }

    /// All agencies.
    pub fn agencies(&self) -> impl Iterator<Item = &DevAgency> {
        self.agencies.values()
    }

    /// One agency.
    pub fn agency(&self, uscc: &Uscc) -> Result<&DevAgency> {
        self.agencies.agency(uscc)
    }

    /// The first agency at `node` that serves a registry.
    pub fn provider_at(&self, node: DivisionCode) -> Result<&DevAgency> {
        self.agencies.provider_at(node)
    }

    /// The first consumer (non-provider) agency at `node`.
    pub fn consumer_at(&self, node: DivisionCode) -> Result<&DevAgency> {
        self.agencies.consumer_at(node)
    }

    /// A client of an agency's own node, authenticated with the agency's certificate.
    pub async fn client(&self, uscc: &Uscc) -> Result<AgencyClient<Channel>> {
        let a = self.agency(uscc)?;
        self.client_with(a.node, &a.cert).await
    }

    /// A client of `node` authenticated with any certificate signed by this federation's CA.
    pub async fn client_with(
        &self,
        node: DivisionCode,
        cert: &IssuedCert,
    ) -> Result<AgencyClient<Channel>> {
        Ok(connect_agency(
            &self.node_url(node)?,
            node.as_str(),
            self.ca.ca_pem(),
            &cert.cert_pem,
            &cert.key_pem,
        )
        .await?)
    }

    /// Live catalog entries a node holds.
    pub async fn catalog_size(&self, code: DivisionCode) -> Result<u64> {
        Ok(self.node(code)?.store().count_entries().await?)
    }

    /// Waits until `code` holds at least `n` live entries, or fails after `timeout`.
    pub async fn wait_for_catalog(
        &self,
        code: DivisionCode,
        n: u64,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let have = self.catalog_size(code).await?;
            if have >= n {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("node {code} holds {have} catalog entries after {timeout:?}; expected {n}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Catalog entries published by all provider agencies.
    pub fn published_entries(&self) -> usize {
        self.agencies.values().map(|a| a.published.len()).sum()
    }

    /// Stops a node gracefully, keeping its database.
    pub async fn stop_node(&mut self, code: DivisionCode) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&code)
            .ok_or_else(|| anyhow!("no node {code}"))?;
        if let Some(h) = n.handle.take() {
            h.shutdown().await?;
        }
        Ok(())
    }

    /// Takes a running node out of the federation's hands, for a test that stops it itself (and watches it
    /// drain); the node counts as stopped afterwards.
    pub fn take_node(&mut self, code: DivisionCode) -> Result<NodeHandle> {
        self.nodes
            .get_mut(&code)
            .and_then(|n| n.handle.take())
            .ok_or_else(|| anyhow!("node {code} is not running"))
    }

    /// Starts a stopped node again on its old address with its old database.
    pub async fn restart_node(&mut self, code: DivisionCode) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&code)
            .ok_or_else(|| anyhow!("no node {code}"))?;
        if n.handle.is_some() {
            bail!("node {code} is running");
        }
        let listener = TcpListener::bind(n.addr)
            .await
            .with_context(|| format!("rebinding {} for node {code}", n.addr))?;
        n.handle =
            Some(node::start_with_clock(n.config.clone(), listener, self.clock.clone()).await?);
        Ok(())
    }

    /// Changes the configuration a stopped node starts with next (operators edit a node's file the same way).
    pub fn reconfigure_node(
        &mut self,
        code: DivisionCode,
        change: impl FnOnce(&mut NodeConfig),
    ) -> Result<()> {
        let n = self
            .nodes
            .get_mut(&code)
            .ok_or_else(|| anyhow!("no node {code}"))?;
        if n.handle.is_some() {
            bail!("node {code} is running; stop it first");
        }
        change(&mut n.config);
        Ok(())
    }

    /// Stops every node and provider and removes the federation's files.
    pub async fn shutdown(mut self) -> Result<()> {
        self.stop_all().await
    }

    /// Stops every node and provider and hands over the directory with the PKI and databases.
    pub async fn shutdown_keep(mut self) -> Result<tempfile::TempDir> {
        self.stop_all().await?;
        Ok(self.dir)
    }

    async fn stop_all(&mut self) -> Result<()> {
        let codes: Vec<_> = self.nodes.keys().copied().collect();
        for c in codes.into_iter().rev() {
            self.stop_node(c).await?;
        }
        let _ = self.stop_providers.send(true);
        Ok(())
    }
}

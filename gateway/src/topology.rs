//! Where this node sits in the tree: its parent, children and agencies, with one pooled channel each.
//!
//! Routing needs no table: the next hop toward node `t` is the child whose code contains `t`, else the parent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::{AgencyConfig, NodeConfig, PeerNode};
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Peer, Uscc};
use crate::tls::dynamic::{Connector, DynamicTls, plain_uri};

/// A neighbouring node and its pooled HTTP/2 channel.
#[derive(Debug, Clone)]
pub struct Neighbour {
    /// Its division code.
    pub code: DivisionCode,
    /// Its address as configured.
    pub address: String,
    /// The channels to its replicas, renewed after a certificate reload.
    links: Arc<Links>,
}

impl Neighbour {
    /// The lazily connected, reconnecting channel shared by every request to it (over the replicas that answer,
    /// in turn); after a certificate reload, a new one on new connections.
    pub fn channel(&self) -> Channel {
        self.links.channel()
    }

    /// A new channel to the neighbour on connections of its own, for a caller that gave up on the shared one
    /// (a connection that stopped answering stays open until HTTP/2 keepalive notices).
    pub fn fresh_channel(&self) -> Channel {
        self.links.fresh()
    }

    /// Increases each time the shared channel is renewed; a long-lived caller takes [`Neighbour::channel`]
    /// again when it changed.
    pub fn generation(&self) -> u64 {
        self.links.generation.load(Ordering::Relaxed)
    }
}

/// One channel per replica of one peer, made with the node's TLS connector, swapped whole on renewal.
struct Links {
    endpoints: Vec<Endpoint>,
    connector: Connector,
    current: ArcSwap<Vec<Channel>>,
    alive: Vec<AtomicBool>,
    turn: AtomicUsize,
    generation: AtomicU64,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("replicas", &self.endpoints.len())
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Links {
    fn new(endpoints: Vec<Endpoint>, connector: Connector) -> Arc<Self> {
        let current = endpoints
            .iter()
            .map(|e| e.connect_with_connector_lazy(connector.clone()))
            .collect();
        let links = Arc::new(Self {
            alive: endpoints.iter().map(|_| AtomicBool::new(true)).collect(),
            endpoints,
            connector,
            current: ArcSwap::from_pointee(current),
            turn: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
        });
        if links.endpoints.len() > 1 {
            tokio::spawn(watch_replicas(Arc::downgrade(&links)));
        }
        links
    }

    /// The index of the replica the next call goes to: in turn over those that answer, or over all when none
    /// does (so calls fail at once rather than wait for one).
    fn pick(&self) -> usize {
        let n = self.endpoints.len();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let alive: Vec<usize> = (0..n)
            .filter(|i| self.alive[*i].load(Ordering::Relaxed))
            .collect();
        match alive.as_slice() {
            [] => turn % n.max(1),
            some => some[turn % some.len()],
        }
    }

    fn channel(&self) -> Channel {
        let current = self.current.load();
        current[self.pick().min(current.len() - 1)].clone()
    }

    fn fresh(&self) -> Channel {
        self.endpoints[self.pick()].connect_with_connector_lazy(self.connector.clone())
    }

    /// New channels on new connections, made with the TLS material in use now; calls still running on the old
    /// ones finish there, and the old connections close once nothing holds them.
    fn renew(&self) {
        let current = self
            .endpoints
            .iter()
            .map(|e| e.connect_with_connector_lazy(self.connector.clone()))
            .collect();
        self.current.store(Arc::new(current));
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

/// An agency registered on this node.
#[derive(Debug, Clone)]
pub struct Agency {
    /// Its code.
    pub uscc: Uscc,
    /// Display name.
    pub name: String,
    /// Its Provider service, if it provides data.
    pub provider: Option<ProviderLink>,
}

/// The address of an agency's Provider service and the pooled channel to it.
#[derive(Debug, Clone)]
pub struct ProviderLink {
    /// Its address as configured.
    pub address: String,
    links: Arc<Links>,
}

impl ProviderLink {
    /// Lazily connected, reconnecting channel; after a certificate reload, a new one on new connections.
    pub fn channel(&self) -> Channel {
        self.links.channel()
    }
}

/// The next hop of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Toward the parent.
    Up,
    /// Toward a child.
    Down,
}

/// This node's place in the federation.
#[derive(Debug, Clone)]
pub struct Topology {
    /// This node's code.
    pub code: DivisionCode,
    /// The parent, absent on the province.
    pub parent: Option<Neighbour>,
    /// Children by code.
    pub children: HashMap<DivisionCode, Neighbour>,
    /// Agencies by code.
    pub agencies: HashMap<Uscc, Agency>,
}

/// How often the replicas of a neighbour are checked.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a replica may take to answer a check before it counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Keeps track of which replicas of a neighbour answer a health check, checking each every [`PROBE_EVERY`]
/// over its current channel: one that stops answering gets no new calls within about a second, so calls fail
/// over to the others, and gets them again once it answers. Ends when the links are dropped.
async fn watch_replicas(links: std::sync::Weak<Links>) {
    loop {
        let Some(l) = links.upgrade() else { return };
        let channels = l.current.load_full();
        let alive: Vec<bool> = futures::future::join_all(channels.iter().map(|c| {
            let mut p = HealthClient::new(c.clone());
            async move {
                let check = p.check(HealthCheckRequest::default());
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, check).await,
                    Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
                )
            }
        }))
        .await;
        for (i, up) in alive.into_iter().enumerate() {
            let was = l.alive[i].swap(up, Ordering::Relaxed);
            if was && !up {
                tracing::warn!(address = %l.endpoints[i].uri(), "replica of a neighbour does not answer; calls go to the others");
            }
        }
        drop(l);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

fn endpoint(address: &str, what: &str, connect_timeout: Duration) -> Result<Endpoint> {
    let uri = plain_uri(address)
        .map_err(|e| Error::InvalidArgument(format!("{what} address {address:?}: {e}")))?;
    let endpoint = Endpoint::from(uri)
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint)
}

fn connector(tls: &DynamicTls, what: &str, server: &Peer) -> Result<Connector> {
    tls.connector(server)
        .map_err(|e| Error::InvalidArgument(format!("{what} TLS settings: {e}")))
}

fn neighbour(p: &PeerNode, what: &str, tls: &DynamicTls, timeout: Duration) -> Result<Neighbour> {
    let code: DivisionCode = p
        .code
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("{what}.code: {e}")))?;
    let endpoints = std::iter::once(&p.address)
        .chain(&p.replicas)
        .map(|a| endpoint(a, what, timeout))
        .collect::<Result<Vec<_>>>()?;
    Ok(Neighbour {
        code,
        address: p.address.clone(),
        links: Links::new(endpoints, connector(tls, what, &Peer::Node(code))?),
    })
}

fn agency(a: &AgencyConfig, tls: &DynamicTls, timeout: Duration) -> Result<Agency> {
    let uscc: Uscc = a
        .uscc
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("agencies.uscc: {e}")))?;
    let provider = a
        .provider
        .as_ref()
        .map(|address| -> Result<ProviderLink> {
            let what = format!("agency {uscc} provider");
            Ok(ProviderLink {
                address: address.clone(),
                links: Links::new(
                    vec![endpoint(address, &what, timeout)?],
                    connector(tls, &what, &Peer::Agency(uscc.clone()))?,
                ),
            })
        })
        .transpose()?;
    Ok(Agency {
        uscc,
        name: a.name.clone(),
        provider,
    })
}

impl Topology {
    /// Builds the topology from configuration, checking that parent and children fit this node's code.
    pub fn from_config(config: &NodeConfig, tls: &DynamicTls) -> Result<Self> {
        let code: DivisionCode = config
            .code
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("code: {e}")))?;
        let timeout = Duration::from_millis(config.routing.connect_timeout_ms);
        let parent = config
            .parent
            .as_ref()
            .map(|p| neighbour(p, "parent", tls, timeout))
            .transpose()?;
        if let Some(p) = parent.as_ref().filter(|p| !p.code.is_parent_of(&code)) {
            return Err(Error::InvalidArgument(format!(
                "parent.code {} is not the parent of node {code}",
                p.code
            )));
        }
        let mut children = HashMap::new();
        for c in &config.children {
            let n = neighbour(c, "children", tls, timeout)?;
            if !code.is_parent_of(&n.code) {
                return Err(Error::InvalidArgument(format!(
                    "children.code {} is not a child of node {code}",
                    n.code
                )));
            }
            if children.insert(n.code, n).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "children.code {} is listed twice",
                    c.code
                )));
            }
        }
        let mut agencies = HashMap::new();
        for a in &config.agencies {
            let a = agency(a, tls, timeout)?;
            let uscc = a.uscc.clone();
            if agencies.insert(uscc.clone(), a).is_some() {
                return Err(Error::InvalidArgument(format!(
                    "agencies.uscc {uscc} is listed twice"
                )));
            }
        }
        Ok(Self {
            code,
            parent,
            children,
            agencies,
        })
    }

    /// The neighbour a request for `target` goes to next, or an error naming why there is none.
    pub fn next_hop(&self, target: DivisionCode) -> Result<(&Neighbour, Direction)> {
        if let Some(child) = self.code.child_toward(&target) {
            return self
                .children
                .get(&child)
                .map(|n| (n, Direction::Down))
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "node {target} is unknown: node {} has no child {child}",
                        self.code
                    ))
                });
        }
        self.parent
            .as_ref()
            .map(|p| (p, Direction::Up))
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "node {target} is not part of the federation under {}",
                    self.code
                ))
            })
    }

    /// Opens new channels to every neighbour and provider with the TLS material in use now (after a certificate
    /// reload): new calls use new connections, calls running on the old ones finish there.
    pub fn renew_channels(&self) {
        for n in self.parent.iter().chain(self.children.values()) {
            n.links.renew();
        }
        for p in self.agencies.values().filter_map(|a| a.provider.as_ref()) {
            p.links.renew();
        }
    }

    /// Whether `code` is this node's parent or one of its children.
    pub fn is_neighbour(&self, code: DivisionCode) -> bool {
        self.children.contains_key(&code) || self.parent.as_ref().is_some_and(|p| p.code == code)
    }
}

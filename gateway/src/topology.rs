//! Where this node sits in the tree: its parent, children and agencies, with one pooled channel each.
//!
//! Routing needs no table: the next hop toward node `t` is the child whose code contains `t`, else the parent.

use std::collections::HashMap;
use std::time::Duration;

use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::config::{AgencyConfig, NodeConfig, PeerNode};
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Peer, Uscc};
use crate::tls::{TlsMaterial, client_tls};

/// A neighbouring node and its pooled HTTP/2 channel.
#[derive(Debug, Clone)]
pub struct Neighbour {
    /// Its division code.
    pub code: DivisionCode,
    /// Its address as configured.
    pub address: String,
    /// Lazily connected, reconnecting channel shared by every request to it.
    pub channel: Channel,
    /// How `channel` was made (one endpoint per replica): [`Neighbour::fresh_channel`] opens another one the
    /// same way.
    endpoints: Vec<Endpoint>,
}

impl Neighbour {
    /// A new channel to the neighbour on connections of its own, for a caller that gave up on the shared one
    /// (a connection that stopped answering stays open until HTTP/2 keepalive notices).
    pub fn fresh_channel(&self) -> Channel {
        balanced(&self.endpoints)
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
    /// Lazily connected, reconnecting channel.
    pub channel: Channel,
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

fn channel(
    address: &str,
    what: &str,
    tls: &TlsMaterial,
    server: &Peer,
    connect_timeout: Duration,
) -> Result<Channel> {
    Ok(endpoint(address, what, tls, server, connect_timeout)?.connect_lazy())
}

/// How often the replicas of a neighbour are checked.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a replica may take to answer a check before it counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// One channel over `endpoints`, the replicas of one node: calls are spread over those that answer a health
/// check (see [`watch_replicas`]).
fn balanced(endpoints: &[Endpoint]) -> Channel {
    match endpoints {
        [one] => one.connect_lazy(),
        many => {
            let (channel, changes) = Channel::balance_channel(many.len());
            tokio::spawn(watch_replicas(many.to_vec(), changes));
            channel
        }
    }
}

/// Keeps the replicas that answer a health check in a balanced channel's set, checking each every
/// [`PROBE_EVERY`]: one that stops answering leaves the set within about a second, so calls fail over to the
/// others, and comes back once it answers again. When none answers, all stay in, so calls fail at once rather
/// than wait for one. Ends when the channel is dropped.
async fn watch_replicas(
    endpoints: Vec<Endpoint>,
    changes: tokio::sync::mpsc::Sender<Change<usize, Endpoint>>,
) {
    let probes: Vec<HealthClient<Channel>> = endpoints
        .iter()
        .map(|e| HealthClient::new(e.connect_lazy()))
        .collect();
    let mut member = vec![false; endpoints.len()];
    loop {
        let alive: Vec<bool> = futures::future::join_all(probes.iter().map(|p| {
            let mut p = p.clone();
            async move {
                let check = p.check(HealthCheckRequest::default());
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, check).await,
                    Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32
                )
            }
        }))
        .await;
        let none = !alive.iter().any(|a| *a);
        for (i, endpoint) in endpoints.iter().enumerate() {
            let wanted = alive[i] || none;
            if wanted != member[i] {
                let change = if wanted {
                    Change::Insert(i, endpoint.clone())
                } else {
                    tracing::warn!(address = %endpoint.uri(), "replica of a neighbour does not answer; calls go to the others");
                    Change::Remove(i)
                };
                if changes.send(change).await.is_err() {
                    return;
                }
                member[i] = wanted;
            }
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

fn endpoint(
    address: &str,
    what: &str,
    tls: &TlsMaterial,
    server: &Peer,
    connect_timeout: Duration,
) -> Result<Endpoint> {
    let endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|e| Error::InvalidArgument(format!("{what} address {address:?}: {e}")))?
        .tls_config(client_tls(tls, server))
        .map_err(|e| Error::InvalidArgument(format!("{what} TLS settings: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint)
}

fn neighbour(p: &PeerNode, what: &str, tls: &TlsMaterial, timeout: Duration) -> Result<Neighbour> {
    let code: DivisionCode = p
        .code
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("{what}.code: {e}")))?;
    let endpoints = std::iter::once(&p.address)
        .chain(&p.replicas)
        .map(|a| endpoint(a, what, tls, &Peer::Node(code), timeout))
        .collect::<Result<Vec<_>>>()?;
    Ok(Neighbour {
        code,
        address: p.address.clone(),
        channel: balanced(&endpoints),
        endpoints,
    })
}

fn agency(a: &AgencyConfig, tls: &TlsMaterial, timeout: Duration) -> Result<Agency> {
    let uscc: Uscc = a
        .uscc
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("agencies.uscc: {e}")))?;
    let provider = a
        .provider
        .as_ref()
        .map(|address| -> Result<ProviderLink> {
            Ok(ProviderLink {
                address: address.clone(),
                channel: channel(
                    address,
                    &format!("agency {uscc} provider"),
                    tls,
                    &Peer::Agency(uscc.clone()),
                    timeout,
                )?,
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
    pub fn from_config(config: &NodeConfig, tls: &TlsMaterial) -> Result<Self> {
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

    /// Whether `code` is this node's parent or one of its children.
    pub fn is_neighbour(&self, code: DivisionCode) -> bool {
        self.children.contains_key(&code) || self.parent.as_ref().is_some_and(|p| p.code == code)
    }
}

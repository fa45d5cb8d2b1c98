//! What the provider's node sends toward other nodes after the fact: grant revocations, carried durably until
//! each node on the way has acknowledged them, and cache invalidations of changed catalog entries, carried to
//! every node that may hold answers of the entry. Both are statements signed by the node that may make them and
//! checked by every node that relays them; both travel hop by hop over the tree, as requests do.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::{CacheInvalidation, InvalidationNotice, Revocation, RevocationNotice};
use tracing::Instrument;

use crate::cache::{ServedNodes, ShareCache};
use crate::catalog::parse_resource_id;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::governance::{Governance, SCAN_PAGE};
use crate::ident::DivisionCode;
use crate::route::call_error;
use crate::statement::{self, NodeSigner, StatementVerifier, Verified};
use crate::topology::Topology;

/// Revocations reaching this node as their grantee's node kept for a slow listener; one that falls further
/// behind scans instead.
const ARRIVALS: usize = 1024;

/// The sending side of revocations and cache invalidations at one node.
#[derive(Clone)]
pub struct Downlink {
    topology: Arc<Topology>,
    governance: Governance,
    cache: ShareCache,
    served: ServedNodes,
    signer: NodeSigner,
    verifier: Arc<StatementVerifier>,
    clock: Arc<dyn Clock>,
    timeout: Duration,
    /// Revocations that reached their grantee's node, this one.
    arrived: tokio::sync::broadcast::Sender<Revocation>,
}

impl std::fmt::Debug for Downlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downlink")
            .field("node", &self.topology.code)
            .finish_non_exhaustive()
    }
}

impl Downlink {
    /// The downlink of the node `topology` describes; each call to a neighbour may take `timeout`.
    pub fn new(
        topology: Arc<Topology>,
        (governance, cache, served): (Governance, ShareCache, ServedNodes),
        (signer, verifier): (NodeSigner, Arc<StatementVerifier>),
        clock: Arc<dyn Clock>,
        timeout: Duration,
    ) -> Self {
        Self {
            topology,
            governance,
            cache,
            served,
            signer,
            verifier,
            clock,
            timeout,
            arrived: tokio::sync::broadcast::channel(ARRIVALS).0,
        }
    }

    /// The nodes served answers of this node's entries.
    pub fn served(&self) -> &ServedNodes {
        &self.served
    }

    /// Revocations as they reach their grantee's node, this one (own view of its agencies' grants).
    pub fn arrivals(&self) -> tokio::sync::broadcast::Receiver<Revocation> {
        self.arrived.subscribe()
    }

    /// Carries a checked revocation toward the grantee's node: records it and purges the cache here, then hands
    /// it to the next node. Returns the nodes that recorded it, this one first; where the next node cannot take
    /// it now, this node keeps it pending and [`Downlink::deliver_revocations`] hands it on later. The notice's
    /// route must already end with this node.
    pub async fn relay_revocation(
        &self,
        checked: &Verified<Revocation>,
        notice: RevocationNotice,
    ) -> Result<Vec<String>> {
        let me = self.topology.code;
        let next = self.toward(&checked.body().consumer_node, &notice.route)?;
        self.governance
            .record_revocation(checked, &notice, next.is_some())
            .await?;
        self.cache.purge_grant(&checked.body().grant_id);
        if next.is_none() {
            // Nobody listening is fine: the own view also finds recorded revocations when it scans.
            let _ = self.arrived.send(checked.body().clone());
        }
        let mut nodes = vec![me.to_string()];
        if let Some(next) = next {
            match self.hand_revocation(&notice, next).await {
                Ok(more) => {
                    nodes.extend(more);
                    self.governance
                        .record_revocation(checked, &notice, false)
                        .await?;
                }
                Err(e) => tracing::warn!(
                    grant = %checked.body().grant_id,
                    %next,
                    error = %e,
                    "revocation kept pending; it is handed on when the next node answers"
                ),
            }
        }
        Ok(nodes)
    }

    /// Hands every pending revocation to the next node toward its grantee, reading them a page at a time;
    /// returns how many were delivered.
    pub async fn deliver_revocations(&self) -> Result<usize> {
        let mut delivered = 0;
        let mut after = None;
        loop {
            let page = self
                .governance
                .pending_revocations(after.take(), SCAN_PAGE)
                .await?;
            let full = page.len() >= SCAN_PAGE as usize;
            for (id, notice) in page {
                after = Some(id);
                let checked = self.governance.check_revocation(&notice)?;
                let Some(next) = self.toward(&checked.body().consumer_node, &notice.route)? else {
                    continue;
                };
                match self.hand_revocation(&notice, next).await {
                    Ok(_) => {
                        self.governance
                            .record_revocation(&checked, &notice, false)
                            .await?;
                        delivered += 1;
                    }
                    Err(e) => tracing::debug!(
                        grant = %checked.body().grant_id,
                        error = %e,
                        "revocation still pending"
                    ),
                }
            }
            if !full || after.is_none() {
                return Ok(delivered);
            }
        }
    }

    /// At the entry's node, after a change of `resource_id` to `version`: purges the answers of it that every
    /// served node may still cache, waiting until each has acknowledged or could not be reached. Returns the
    /// nodes that could not be reached now; they are offered the notice again until their answers expire.
    pub async fn invalidate(&self, resource_id: &str, version: u64) -> Result<Vec<String>> {
        let me = self.topology.code;
        self.cache.purge_resource(resource_id);
        let now = self.clock.unix();
        let holders = self.served.holders(resource_id, now).await?;
        let sends = holders
            .iter()
            .filter(|n| n.as_str() != me.as_str())
            .map(|node| async move {
                let notice = self.invalidation(resource_id, version, node, now)?;
                let result = self.relay_invalidation_from_here(notice.clone()).await;
                Ok::<_, Error>((node.clone(), notice, result))
            });
        let mut unreached = Vec::new();
        for outcome in futures::future::join_all(sends).await {
            let (node, notice, result) = outcome?;
            if let Err(e) = result {
                tracing::warn!(resource = resource_id, %node, error = %e, "cached answers not purged yet");
                self.retry_invalidation(notice, now);
                unreached.push(node);
            }
        }
        Ok(unreached)
    }

    fn invalidation(
        &self,
        resource_id: &str,
        version: u64,
        node: &str,
        now: i64,
    ) -> Result<InvalidationNotice> {
        let signed = self
            .signer
            .sign(&CacheInvalidation {
                resource_id: resource_id.to_owned(),
                version,
                consumer_node: node.to_owned(),
                changed_at: now,
            })
            .map_err(|e| {
                Error::Unavailable(format!(
                    "node {} cannot sign the invalidation: {e}",
                    self.topology.code
                ))
            })?;
        Ok(InvalidationNotice {
            invalidation: Some(signed),
            route: vec![self.topology.code.to_string()],
        })
    }

    async fn relay_invalidation_from_here(
        &self,
        notice: InvalidationNotice,
    ) -> Result<Vec<String>> {
        let checked = self.check_invalidation(&notice)?;
        self.relay_invalidation(&checked, notice).await
    }

    /// Offers a notice again, with growing pauses, until the answers it purges would have expired anyway.
    fn retry_invalidation(&self, notice: InvalidationNotice, changed_at: i64) {
        let downlink = self.clone();
        let allowance = i64::try_from(self.served.allowance().as_secs()).unwrap_or(i64::MAX);
        let until = changed_at.saturating_add(allowance.saturating_mul(2));
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            while downlink.clock.unix() <= until {
                tokio::time::sleep(pause).await;
                if downlink
                    .relay_invalidation_from_here(notice.clone())
                    .await
                    .is_ok()
                {
                    return;
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Checks an invalidation: signed by a node's federation certificate, by the node that holds the entry.
    pub fn check_invalidation(
        &self,
        n: &InvalidationNotice,
    ) -> Result<Verified<CacheInvalidation>> {
        let s = statement::required(n.invalidation.as_ref(), "invalidation notice")?;
        let v: Verified<CacheInvalidation> = self.verifier.verify(s, self.clock.unix())?;
        let holder = parse_resource_id("invalidation resource_id", &v.body().resource_id)?.node();
        if v.signer() != holder {
            return Err(Error::PermissionDenied(format!(
                "resource {} is held by node {holder}; node {} may not invalidate its answers",
                v.body().resource_id,
                v.signer()
            )));
        }
        Ok(v)
    }

    /// Purges the answers a checked invalidation names here and hands it on toward its destination; returns
    /// the nodes that purged, this one first. The notice's route must already end with this node.
    pub async fn relay_invalidation(
        &self,
        checked: &Verified<CacheInvalidation>,
        notice: InvalidationNotice,
    ) -> Result<Vec<String>> {
        self.cache.purge_resource(&checked.body().resource_id);
        let mut nodes = vec![self.topology.code.to_string()];
        if let Some(next) = self.toward(&checked.body().consumer_node, &notice.route)? {
            let (neighbour, _) = self.topology.next_hop(next)?;
            let span = self.forward_span(neighbour.code, "Invalidate");
            let mut client = FederationClient::new(neighbour.channel());
            let mut req = span.in_scope(|| crate::telemetry::traced(notice));
            req.set_timeout(self.timeout);
            let peer = || crate::ident::Peer::Node(neighbour.code).to_uri();
            let ack = crate::opmon::next_hop(peer, client.invalidate(req));
            let ack = ack.instrument(span.clone()).await.map_err(|s| {
                call_error(
                    s,
                    &format!("node {} at {}", neighbour.code, neighbour.address),
                )
            });
            crate::telemetry::record_outcome(&span, &ack);
            nodes.extend(ack?.into_inner().nodes);
        }
        Ok(nodes)
    }

    /// The next node toward `destination`, or `None` when it is this one; refuses a notice that would loop.
    fn toward(&self, destination: &str, route: &[String]) -> Result<Option<DivisionCode>> {
        let target: DivisionCode = destination
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("notice destination: {e}")))?;
        if target == self.topology.code {
            return Ok(None);
        }
        let (next, _) = self.topology.next_hop(target)?;
        if route.iter().any(|n| n == next.code.as_str()) {
            return Err(Error::FailedPrecondition(format!(
                "notice toward node {target} would loop at node {}",
                next.code
            )));
        }
        Ok(Some(next.code))
    }

    /// Hands a revocation to neighbour `next`; returns the nodes that recorded it from there on.
    async fn hand_revocation(
        &self,
        notice: &RevocationNotice,
        next: DivisionCode,
    ) -> Result<Vec<String>> {
        let (neighbour, _) = self.topology.next_hop(next)?;
        let span = self.forward_span(neighbour.code, "Revoke");
        let mut client = FederationClient::new(neighbour.channel());
        let mut req = span.in_scope(|| crate::telemetry::traced(notice.clone()));
        req.set_timeout(self.timeout);
        let peer = || crate::ident::Peer::Node(neighbour.code).to_uri();
        let ack = crate::opmon::next_hop(peer, client.revoke(req));
        let ack = ack.instrument(span.clone()).await.map_err(|s| {
            call_error(
                s,
                &format!("node {} at {}", neighbour.code, neighbour.address),
            )
        });
        crate::telemetry::record_outcome(&span, &ack);
        Ok(ack?.into_inner().nodes)
    }

    /// The client span of handing a notice to neighbour `next` (its server span is the next hop's child).
    fn forward_span(&self, next: DivisionCode, rpc: &'static str) -> tracing::Span {
        tracing::info_span!(
            "forward",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            fedgate.node = %self.topology.code,
            fedgate.next = %next,
            fedgate.direction = "Down",
            rpc.method = rpc,
            fedgate.outcome = tracing::field::Empty,
        )
    }
}

//! `fedgate.v1.Federation`: what a node serves to its parent and children.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::federation_server::Federation;
use fedgate_proto::v1::{
    CatalogChange, ForwardRequest, ForwardResponse, Hop, JoinRequest, JoinResponse, PushRequest,
    PushResponse, Stream, StreamCursor, catalog_change, stream_item,
};
use tonic::{Request, Response, Status};

use super::{caller, deadline};
use crate::catalog::parse_resource_id;
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Peer};
use crate::metrics::NodeMetrics;
use crate::route::Router;
use crate::store::{Store, StoreError};
use crate::topology::Topology;
use crate::uplink::Uplink;

/// Largest batch a child may push at once.
const MAX_PUSH: usize = 4096;

/// The Federation service of one node.
#[derive(Clone)]
pub struct FederationService {
    topology: Arc<Topology>,
    store: Arc<dyn Store>,
    router: Router,
    uplink: Uplink,
    metrics: Arc<NodeMetrics>,
}

impl FederationService {
    /// A service over this node's state.
    pub fn new(
        topology: Arc<Topology>,
        store: Arc<dyn Store>,
        router: Router,
        uplink: Uplink,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        Self {
            topology,
            store,
            router,
            uplink,
            metrics,
        }
    }

    /// The calling node, which must be this node's parent or one of its children.
    fn neighbour<T>(&self, req: &Request<T>) -> Result<DivisionCode> {
        match caller(req)? {
            Peer::Node(code) if self.topology.is_neighbour(code) => Ok(code),
            other => Err(Error::PermissionDenied(format!(
                "{other} is not the parent or a child of node {}",
                self.topology.code
            ))),
        }
    }

    /// The calling node, which must be one of this node's children.
    fn child<T>(&self, req: &Request<T>) -> Result<DivisionCode> {
        let code = self.neighbour(req)?;
        if self.topology.children.contains_key(&code) {
            Ok(code)
        } else {
            Err(Error::PermissionDenied(format!(
                "node {code} is not a child of node {}",
                self.topology.code
            )))
        }
    }

    async fn push_catalog(&self, child: DivisionCode, req: PushRequest) -> Result<u64> {
        let mut items = Vec::with_capacity(req.items.len());
        for item in req.items {
            let Some(stream_item::Body::Catalog(change)) = item.body else {
                return Err(Error::InvalidArgument(format!(
                    "items[seq={}]: a catalog stream item must carry a catalog change",
                    item.seq
                )));
            };
            check_catalog_change(child, &change)?;
            items.push((item.seq, change));
        }
        NodeMetrics::add(&self.metrics.catalog_items_received, items.len() as u64);
        tracing::debug!(%child, first = items.first().map(|i| i.0), count = items.len(), "catalog push");
        let before = self.store.cursor(child.as_str(), Stream::Catalog).await?;
        let applied = self
            .store
            .apply_child_catalog(child.as_str(), &items)
            .await
            .map_err(|e| match e {
                StoreError::Gap { expected, got, .. } => Error::FailedPrecondition(format!(
                    "catalog stream of node {child} skipped from {expected} to {got}; resend from {expected}"
                )),
                other => other.into(),
            })?;
        NodeMetrics::add(
            &self.metrics.catalog_items_applied,
            applied.saturating_sub(before),
        );
        self.uplink.wake(Stream::Catalog);
        Ok(applied)
    }
}

/// A child may only register entries held in its own subtree.
fn check_catalog_change(child: DivisionCode, change: &CatalogChange) -> Result<()> {
    let (id, node) = match &change.change {
        Some(catalog_change::Change::Upsert(e)) => {
            let id = parse_resource_id("upsert.id", &e.id)?;
            if e.node_code != id.node().as_str() {
                return Err(Error::InvalidArgument(format!(
                    "upsert of {}: node_code {} differs from the id's node",
                    e.id, e.node_code
                )));
            }
            (e.id.clone(), id.node())
        }
        Some(catalog_change::Change::Withdraw(w)) => {
            let id = parse_resource_id("withdraw.id", &w.id)?;
            (w.id.clone(), id.node())
        }
        None => return Err(Error::InvalidArgument("catalog change is empty".into())),
    };
    if !child.contains(&node) {
        return Err(Error::PermissionDenied(format!(
            "node {child} may not change {id}, which belongs to node {node} outside its subtree"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let child = self.child(&req)?;
        if req.get_ref().node_code != child.as_str() {
            return Err(Error::PermissionDenied(format!(
                "join names node {:?} but the certificate is for node {child}",
                req.get_ref().node_code
            ))
            .into());
        }
        let mut cursors = Vec::new();
        for stream in [Stream::Catalog, Stream::Audit] {
            cursors.push(StreamCursor {
                stream: stream as i32,
                applied_seq: self
                    .store
                    .cursor(child.as_str(), stream)
                    .await
                    .map_err(Error::from)?,
            });
        }
        tracing::info!(%child, "child joined");
        Ok(Response::new(JoinResponse {
            parent_code: self.topology.code.to_string(),
            cursors,
        }))
    }

    async fn push(&self, req: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let child = self.child(&req)?;
        let req = req.into_inner();
        if req.items.len() > MAX_PUSH {
            return Err(Error::InvalidArgument(format!(
                "items: {} items in one push exceed the limit of {MAX_PUSH}",
                req.items.len()
            ))
            .into());
        }
        let applied = match Stream::try_from(req.stream) {
            Ok(Stream::Catalog) => self.push_catalog(child, req).await?,
            Ok(Stream::Audit) => {
                return Err(Status::unimplemented(
                    "the audit stream is not accepted by this node yet",
                ));
            }
            _ => {
                return Err(
                    Error::InvalidArgument(format!("stream {} is unknown", req.stream)).into(),
                );
            }
        };
        Ok(Response::new(PushResponse {
            applied_seq: applied,
        }))
    }

    async fn forward(
        &self,
        req: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let from = self.neighbour(&req)?;
        let limit = Duration::from_millis(self.router.limits().default_timeout_ms);
        let mut deadline = deadline(&req, limit);
        let ForwardRequest { envelope, request } = req.into_inner();
        let mut env = envelope.ok_or_else(|| Status::invalid_argument("envelope is required"))?;
        let me = self.topology.code;
        match env.route.last() {
            Some(last) if last.node_code == from.as_str() => {}
            other => {
                return Err(Error::PermissionDenied(format!(
                    "envelope.route ends at {:?} but the sending certificate is for node {from}",
                    other.map(|h| h.node_code.as_str()).unwrap_or("")
                ))
                .into());
            }
        }
        let consumer_node: DivisionCode = env
            .consumer_node
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("envelope.consumer_node: {e}")))?;
        let target: DivisionCode = env
            .target_node
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("envelope.target_node: {e}")))?;
        let from_child = self.topology.children.contains_key(&from);
        if from_child && !from.contains(&consumer_node) {
            return Err(Error::PermissionDenied(format!(
                "node {from} forwarded a request of node {consumer_node}, which is outside its subtree"
            ))
            .into());
        }
        if !from_child && (me.contains(&consumer_node) || !me.contains(&target)) {
            return Err(Error::PermissionDenied(format!(
                "parent {from} may only send down requests from outside this subtree for resources inside it"
            ))
            .into());
        }
        if parse_resource_id("envelope.resource_id", &env.resource_id)?.node() != target {
            return Err(Error::InvalidArgument(format!(
                "envelope.target_node {target} is not the node of resource {}",
                env.resource_id
            ))
            .into());
        }
        if env.timeout_ms > 0 {
            deadline =
                deadline.min(std::time::Instant::now() + Duration::from_millis(env.timeout_ms));
        }
        env.route.push(Hop {
            node_code: me.to_string(),
            seen_peer: Peer::Node(from).to_uri(),
            action: String::new(),
            elapsed_us: 0,
        });
        let out = self.router.dispatch(env, request, deadline).await?;
        Ok(Response::new(ForwardResponse {
            response: out.response,
            route: out.route,
        }))
    }
}

//! `fedgate.v1.Agency`: what a node serves to the agencies registered on it.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::agency_server::Agency;
use fedgate_proto::v1::{
    CatalogEntry, Envelope, GetEntryRequest, Hop, PublishEntryRequest, PublishEntryResponse,
    SearchCatalogRequest, SearchCatalogResponse, ShareRequest, ShareResponse, Stream,
    WithdrawEntryRequest, WithdrawEntryResponse,
};
use prost::Message;
use tonic::{Request, Response, Status};

use super::{caller, deadline};
use crate::catalog::{self, parse_resource_id};
use crate::error::{Error, Result};
use crate::ident::{Peer, Uscc};
use crate::route::{Router, action};
use crate::store::Store;
use crate::topology::Topology;
use crate::uplink::Uplink;

/// Longest request id a caller may choose.
const MAX_REQUEST_ID: usize = 64;

/// The Agency service of one node.
#[derive(Clone)]
pub struct AgencyService {
    topology: Arc<Topology>,
    store: Arc<dyn Store>,
    router: Router,
    uplink: Uplink,
}

impl AgencyService {
    /// A service over this node's state.
    pub fn new(
        topology: Arc<Topology>,
        store: Arc<dyn Store>,
        router: Router,
        uplink: Uplink,
    ) -> Self {
        Self {
            topology,
            store,
            router,
            uplink,
        }
    }

    /// The calling agency, which must be registered on this node.
    fn agency<T>(&self, req: &Request<T>) -> Result<Uscc> {
        match caller(req)? {
            Peer::Agency(uscc) if self.topology.agencies.contains_key(&uscc) => Ok(uscc),
            other => Err(Error::PermissionDenied(format!(
                "{other} is not an agency registered on node {}",
                self.topology.code
            ))),
        }
    }

    /// A live entry of this node's subtree.
    async fn subtree_entry(&self, id: &str) -> Result<CatalogEntry> {
        let rid = parse_resource_id("id", id)?;
        let me = self.topology.code;
        if !me.contains(&rid.node()) {
            return Err(Error::NotFound(format!(
                "resource {id} is held by node {}, outside the subtree of node {me}",
                rid.node()
            )));
        }
        self.store
            .entry(id)
            .await?
            .filter(|s| !s.withdrawn)
            .map(|s| s.entry)
            .ok_or_else(|| {
                Error::NotFound(format!("resource {id} is not in the catalog of node {me}"))
            })
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn request_id(given: &str) -> Result<String> {
    if given.is_empty() {
        return Ok(uuid::Uuid::new_v4().to_string());
    }
    if given.len() > MAX_REQUEST_ID || !given.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Error::InvalidArgument(format!(
            "request_id {given:?} must be 1-{MAX_REQUEST_ID} letters, digits or '-'"
        )));
    }
    Ok(given.to_owned())
}

#[tonic::async_trait]
impl Agency for AgencyService {
    async fn publish_entry(
        &self,
        req: Request<PublishEntryRequest>,
    ) -> Result<Response<PublishEntryResponse>, Status> {
        let uscc = self.agency(&req)?;
        let entry = req
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let entry = catalog::prepare_publish(self.topology.code, &uscc, entry, now_rfc3339())?;
        let existing = self.store.entry(&entry.id).await.map_err(Error::from)?;
        if let Some(existing) = existing.filter(|e| e.entry.provider_uscc != uscc.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "resource {} belongs to agency {}, not {uscc}",
                entry.id, existing.entry.provider_uscc
            ))
            .into());
        }
        let stored = self.store.publish_local(entry).await.map_err(Error::from)?;
        self.uplink.wake(Stream::Catalog);
        tracing::info!(id = %stored.id, version = stored.version, agency = %uscc, "catalog entry published");
        Ok(Response::new(PublishEntryResponse {
            entry: Some(stored),
        }))
    }

    async fn withdraw_entry(
        &self,
        req: Request<WithdrawEntryRequest>,
    ) -> Result<Response<WithdrawEntryResponse>, Status> {
        let uscc = self.agency(&req)?;
        let id = req.into_inner().id;
        let entry = self.subtree_entry(&id).await?;
        if entry.node_code != self.topology.code.as_str() || entry.provider_uscc != uscc.as_str() {
            return Err(Error::PermissionDenied(format!(
                "resource {id} is provided by agency {} at node {}, not by {uscc} here",
                entry.provider_uscc, entry.node_code
            ))
            .into());
        }
        let version = self
            .store
            .withdraw_local(&id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| Status::not_found(format!("resource {id} is not in the catalog")))?;
        self.uplink.wake(Stream::Catalog);
        Ok(Response::new(WithdrawEntryResponse { version }))
    }

    async fn get_entry(
        &self,
        req: Request<GetEntryRequest>,
    ) -> Result<Response<CatalogEntry>, Status> {
        self.agency(&req)?;
        Ok(Response::new(self.subtree_entry(&req.get_ref().id).await?))
    }

    async fn search_catalog(
        &self,
        req: Request<SearchCatalogRequest>,
    ) -> Result<Response<SearchCatalogResponse>, Status> {
        self.agency(&req)?;
        let query = catalog::search_query(self.topology.code, req.get_ref())?;
        let entries = self.store.search(&query).await.map_err(Error::from)?;
        let next_page_token = catalog::next_page_token(&entries, query.limit);
        Ok(Response::new(SearchCatalogResponse {
            entries,
            next_page_token,
        }))
    }

    async fn share(&self, req: Request<ShareRequest>) -> Result<Response<ShareResponse>, Status> {
        let uscc = self.agency(&req)?;
        let limit = Duration::from_millis(self.router.limits().default_timeout_ms);
        let deadline = deadline(&req, limit);
        let mut share = req.into_inner();
        share.request_id = request_id(&share.request_id)?;
        let rid = parse_resource_id("resource_id", &share.resource_id)?;
        let me = self.topology.code;
        let env = Envelope {
            request_id: share.request_id.clone(),
            resource_id: rid.to_string(),
            target_node: rid.node().to_string(),
            consumer_uscc: uscc.to_string(),
            consumer_node: me.to_string(),
            route: vec![Hop {
                node_code: me.to_string(),
                seen_peer: Peer::Agency(uscc.clone()).to_uri(),
                action: action::RECEIVED.to_owned(),
                elapsed_us: 0,
            }],
            hops_left: self.router.limits().hop_limit,
            timeout_ms: 0,
        };
        let out = self
            .router
            .dispatch(env, share.encode_to_vec(), deadline)
            .await?;
        let mut resp = ShareResponse::decode(out.response.as_slice()).map_err(|e| {
            Status::internal(format!(
                "provider node answered an undecodable response: {e}"
            ))
        })?;
        resp.route = out.route;
        Ok(Response::new(resp))
    }
}

//! `fedgate.v1.OpenData`: the province's public endpoint for open data — TLS without client certificates,
//! rate-limited per client address, and only unconditionally open resources, always masked.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate_proto::v1::open_data_server::OpenData;
use fedgate_proto::v1::{
    AuditOperation, DownloadRequest, Envelope, Hop, ListDatasetsRequest, ListDatasetsResponse,
    OpenDataset, RequestKind, ShareMode, ShareRequest, ShareResponse, ShareType,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::catalog::{parse_resource_id, subtree_prefix};
use crate::error::{Error, Result};
use crate::limits::{Bounded, LimitsConfig};
use crate::route::{Router, action};
use crate::store::{CatalogQuery, Store};

/// Datasets listed at most.
const MAX_LISTED: u32 = 500;

/// The OpenData service of the province.
#[derive(Clone)]
pub struct OpenDataService {
    router: Router,
    store: Arc<dyn Store>,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    per_minute: u32,
    limits: LimitsConfig,
}

impl OpenDataService {
    /// A service allowing each client address `per_minute` calls.
    pub fn new(router: Router, store: Arc<dyn Store>, per_minute: u32) -> Self {
        let rate = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            router,
            store,
            limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(rate))),
            per_minute: rate.get(),
            limits: LimitsConfig::default(),
        }
    }

    /// The service with `limits` on what the public sends instead of the defaults.
    pub fn with_limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses (and audits) a request over the limits.
    fn bounded<T: Bounded>(&self, req: &Request<T>, ip: IpAddr, rpc: &str) -> Result<(), Status> {
        req.get_ref().check_limits(&self.limits).map_err(|e| {
            let r = crate::limits::refusal(format!("public:{ip}"), rpc, &e);
            self.router.audit().record_detached(r);
            e.into()
        })
    }

    fn admit<T>(&self, req: &Request<T>) -> Result<IpAddr, Status> {
        let ip = req
            .remote_addr()
            .map(|a| a.ip())
            .ok_or_else(|| Status::internal("the client's address is unknown"))?;
        if self.limiter.check_key(&ip).is_err() {
            let status = Status::resource_exhausted(format!(
                "rate limit of {} requests per minute exceeded for {ip}; retry later",
                self.per_minute
            ));
            let mut r = audit::event(AuditOperation::AuthRefused, format!("public:{ip}"));
            r.outcome = audit::outcome(status.code());
            r.detail = format!("OpenData: {}", status.message());
            self.router.audit().record_detached(r);
            return Err(status);
        }
        Ok(ip)
    }

    async fn open_entry(&self, id: &str) -> Result<fedgate_proto::v1::CatalogEntry> {
        let rid = parse_resource_id("resource_id", id)?;
        self.store
            .entry(&rid.to_string())
            .await?
            .filter(|s| !s.withdrawn && s.entry.open)
            .map(|s| s.entry)
            .ok_or_else(|| Error::NotFound(format!("no open dataset {id}")))
    }
}

#[tonic::async_trait]
impl OpenData for OpenDataService {
    async fn list_datasets(
        &self,
        req: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        let ip = self.admit(&req)?;
        self.bounded(&req, ip, "OpenData.ListDatasets")?;
        let me = self.router.topology().code;
        let entries = self
            .store
            .search(&CatalogQuery {
                words: req
                    .get_ref()
                    .text
                    .split_whitespace()
                    .map(str::to_lowercase)
                    .collect(),
                node_prefix: Some(subtree_prefix(me)),
                limit: 100_000,
                ..Default::default()
            })
            .await
            .map_err(Error::from)?;
        let datasets = entries
            .into_iter()
            .filter(|e| e.open)
            .take(MAX_LISTED as usize)
            .map(|entry| OpenDataset {
                downloadable: entry.share_type == ShareType::Unconditional as i32,
                entry: Some(entry),
            })
            .collect();
        Ok(Response::new(ListDatasetsResponse { datasets }))
    }

    type DownloadStream = ReceiverStream<Result<ShareResponse, Status>>;

    async fn download(
        &self,
        req: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let ip = self.admit(&req)?;
        self.bounded(&req, ip, "OpenData.Download")?;
        let d = req.into_inner();
        let entry = match self.open_entry(&d.resource_id).await.and_then(|e| {
            if e.share_type == ShareType::Unconditional as i32 {
                Ok(e)
            } else {
                Err(Error::FailedPrecondition(format!(
                    "dataset {} is opened on application only: an agency applies for it through Agency.Apply",
                    e.id
                )))
            }
        }) {
            Ok(e) => e,
            Err(e) => {
                let mut r = audit::event(AuditOperation::ShareBulk, format!("public:{ip}"));
                r.resource_id = d.resource_id.clone();
                r.outcome = audit::outcome(e.code());
                r.detail = format!("OpenData.Download: {e}");
                self.router.audit().record_detached(r);
                return Err(e.into());
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let router = self.router.clone();
        tokio::spawn(async move {
            let me = router.topology().code;
            let base = uuid::Uuid::new_v4().to_string();
            let mut share = ShareRequest {
                resource_id: entry.id.clone(),
                mode: ShareMode::Bulk as i32,
                fields: d.fields.clone(),
                page_token: d.page_token.clone(),
                page_size: d.page_size,
                purpose: "open data download".into(),
                ..Default::default()
            };
            for page in 0u64.. {
                share.request_id = format!("{base}-p{page}");
                let env = Envelope {
                    request_id: share.request_id.clone(),
                    resource_id: entry.id.clone(),
                    target_node: entry.node_code.clone(),
                    consumer_uscc: String::new(),
                    consumer_node: me.to_string(),
                    route: vec![Hop {
                        node_code: me.to_string(),
                        seen_peer: format!("public:{ip}"),
                        action: action::RECEIVED.to_owned(),
                        elapsed_us: 0,
                    }],
                    hops_left: router.limits().hop_limit,
                    timeout_ms: 0,
                    purpose: share.purpose.clone(),
                    mode: ShareMode::Bulk as i32,
                    kind: RequestKind::Share as i32,
                    grant_id: String::new(),
                    open_data: true,
                };
                let deadline =
                    Instant::now() + Duration::from_millis(router.limits().default_timeout_ms);
                let result = router
                    .dispatch(env, share.encode_to_vec(), deadline)
                    .await
                    .and_then(|out| {
                        let mut r =
                            ShareResponse::decode(out.response.as_slice()).map_err(|e| {
                                Error::Upstream(Status::internal(format!("undecodable page: {e}")))
                            })?;
                        r.route = out.route;
                        Ok(r)
                    });
                let next = result.as_ref().map(|r| r.next_page_token.clone()).ok();
                if tx.send(result.map_err(Status::from)).await.is_err() {
                    return;
                }
                match next {
                    Some(t) if !t.is_empty() => share.page_token = t,
                    _ => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

//! `fedgate.v1.OpenData`: the province's public endpoint for open data — TLS without client certificates,
//! rate-limited per client address, and only unconditionally open resources, always masked. A download call
//! streams at most `[open_data] max_pages_per_call` pages and is audited once, whatever its page size.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedgate_proto::v1::open_data_server::OpenData;
use fedgate_proto::v1::{
    AuditOperation, AuditRecord, DownloadRequest, Envelope, Hop, ListDatasetsRequest,
    ListDatasetsResponse, OpenDataset, RequestKind, ShareMode, ShareRequest, ShareResponse,
    ShareType,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::assertion::Vouched;
use crate::audit;
use crate::catalog::{parse_resource_id, subtree_prefix};
use crate::error::{Error, Result};
use crate::limits::{Bounded, LimitsConfig};
use crate::policy;
use crate::route::{Router, action};
use crate::store::{CatalogQuery, Store};
use crate::tls::client_addr;

/// Datasets listed at most.
const MAX_LISTED: u32 = 500;

/// The OpenData service of the province.
#[derive(Clone)]
pub struct OpenDataService {
    router: Router,
    store: Arc<dyn Store>,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    per_minute: u32,
    max_pages: u32,
    limits: LimitsConfig,
}

impl OpenDataService {
    /// A service allowing each client address `per_minute` calls, each download `max_pages` pages.
    pub fn new(router: Router, store: Arc<dyn Store>, per_minute: u32, max_pages: u32) -> Self {
        let rate = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            router,
            store,
            limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(rate))),
            per_minute: rate.get(),
            max_pages,
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
        let ip = client_addr(req)
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
                terms: crate::catalog::terms(&req.get_ref().text),
                node_prefix: Some(subtree_prefix(me)),
                limit: 100_000,
                ..Default::default()
            })
            .await
            .map_err(Error::from)?;
        let datasets = entries
            .into_iter()
            .map(|hit| hit.entry)
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
        let checked = match self.open_entry(&d.resource_id).await.and_then(|e| {
            if e.share_type != ShareType::Unconditional as i32 {
                return Err(Error::FailedPrecondition(format!(
                    "dataset {} is opened on application only: an agency applies for it through Agency.Apply",
                    e.id
                )));
            }
            let page_size = match d.page_size {
                0 => policy::DEFAULT_BULK_PAGE,
                n if n > policy::MAX_BULK_PAGE => {
                    return Err(Error::InvalidArgument(format!(
                        "page_size {n} exceeds the maximum of {}",
                        policy::MAX_BULK_PAGE
                    )));
                }
                n => n,
            };
            Ok((e, page_size, Position::parse(&d.page_token)?))
        }) {
            Ok(checked) => checked,
            Err(e) => {
                let mut r = audit::event(AuditOperation::ShareBulk, format!("public:{ip}"));
                r.resource_id = d.resource_id.clone();
                r.outcome = audit::outcome(e.code());
                r.detail = format!("OpenData.Download: {e}");
                self.router.audit().record_detached(r);
                return Err(e.into());
            }
        };
        let (entry, page_size, start) = checked;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let download = Download {
            router: self.router.clone(),
            entry,
            fields: d.fields,
            page_size,
            max_pages: self.max_pages.max(1),
            ip,
            tx,
        };
        tokio::spawn(download.run(start));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Where a download stands: a provider's page position and how many records of that page were delivered.
/// Clients hold it as the token `"<skip>.<provider's token>"`; the empty token is the start.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    skip: u32,
    upstream: String,
}

impl Position {
    fn parse(token: &str) -> Result<Self> {
        if token.is_empty() {
            return Ok(Self {
                skip: 0,
                upstream: String::new(),
            });
        }
        token
            .split_once('.')
            .and_then(|(skip, upstream)| {
                let skip = skip.parse::<u32>().ok()?;
                (skip < policy::MAX_BULK_PAGE).then(|| Self {
                    skip,
                    upstream: upstream.to_owned(),
                })
            })
            .ok_or_else(|| {
                let shown: String = token.chars().take(32).collect();
                Error::InvalidArgument(format!(
                    "page_token {shown:?} is not a token this endpoint issued"
                ))
            })
    }

    fn token(&self) -> String {
        format!("{}.{}", self.skip, self.upstream)
    }
}

/// One `Download` call: fetches provider pages as large as the call's pages allow (so a small page size does
/// not multiply the hops), cuts them into the client's pages, stops after `max_pages`, and writes one audit
/// record for the call before its last page goes out.
struct Download {
    router: Router,
    entry: fedgate_proto::v1::CatalogEntry,
    fields: Vec<String>,
    page_size: u32,
    max_pages: u32,
    ip: IpAddr,
    tx: tokio::sync::mpsc::Sender<Result<ShareResponse, Status>>,
}

/// What a download did, for its audit record.
#[derive(Default)]
struct Tally {
    pages: u32,
    records: u64,
    fetches: u32,
    digest: Sha256,
    record: Option<AuditRecord>,
}

impl Download {
    /// The request of one provider page of `size` records at `upstream`.
    fn envelope(&self, request_id: &str) -> Envelope {
        let me = self.router.topology().code;
        Envelope {
            request_id: request_id.to_owned(),
            resource_id: self.entry.id.clone(),
            target_node: self.entry.node_code.clone(),
            consumer_uscc: String::new(),
            consumer_node: me.to_string(),
            route: vec![Hop {
                node_code: me.to_string(),
                seen_peer: format!("public:{}", self.ip),
                action: action::RECEIVED.to_owned(),
                elapsed_us: 0,
            }],
            hops_left: self.router.limits().hop_limit,
            timeout_ms: 0,
            purpose: PURPOSE.into(),
            mode: ShareMode::Bulk as i32,
            kind: RequestKind::Share as i32,
            grant_id: String::new(),
            open_data: true,
            assertion: None,
        }
    }

    /// Fetches the provider page at `upstream` holding `size` records.
    async fn fetch(
        &self,
        request_id: &str,
        upstream: &str,
        size: u32,
        tally: &mut Tally,
    ) -> Result<ShareResponse> {
        let share = ShareRequest {
            request_id: request_id.to_owned(),
            resource_id: self.entry.id.clone(),
            mode: ShareMode::Bulk as i32,
            fields: self.fields.clone(),
            page_token: upstream.to_owned(),
            page_size: size,
            purpose: PURPOSE.into(),
            ..Default::default()
        };
        let deadline =
            Instant::now() + Duration::from_millis(self.router.limits().default_timeout_ms);
        let request = share.encode_to_vec();
        let mut env = self.envelope(request_id);
        let me = self.router.topology().code;
        let public = Vouched::open_data(me);
        self.router.vouch(&mut env, &request, &public)?;
        let (result, record) = self
            .router
            .dispatch_unrecorded(env, request, deadline, Some(public))
            .await?;
        tally.fetches += 1;
        tally.record.get_or_insert(record);
        let out = result?;
        let mut r = ShareResponse::decode(out.response.as_slice())
            .map_err(|e| Error::Upstream(Status::internal(format!("undecodable page: {e}"))))?;
        r.route = out.route;
        Ok(r)
    }

    async fn run(self, start: Position) {
        let base = uuid::Uuid::new_v4().to_string();
        let mut tally = Tally::default();
        let mut held: Option<ShareResponse> = None;
        let mut pos = Some(start.clone());
        let outcome = self.pages(&base, &mut pos, &mut held, &mut tally).await;
        if outcome.is_ok() && held.is_none() {
            // An empty dataset still answers one (empty) page.
            let page = ShareResponse {
                request_id: base.clone(),
                resource_id: self.entry.id.clone(),
                entry_version: self.entry.version,
                ..Default::default()
            };
            tally.digest.update(page.encode_to_vec());
            held = Some(page);
        }
        let me = self.router.topology().code;
        let mut r = tally.record.take().unwrap_or_else(|| {
            let mut r = audit::event(AuditOperation::ShareBulk, String::new());
            r.resource_id = self.entry.id.clone();
            r.consumer_node = me.to_string();
            r.route = vec![me.to_string()];
            r
        });
        r.operation = AuditOperation::ShareBulk as i32;
        r.actor = format!("public:{}", self.ip);
        r.provider_uscc = self.entry.provider_uscc.clone();
        r.request_id = base;
        r.mode = ShareMode::Bulk.as_str_name().to_owned();
        r.purpose = PURPOSE.into();
        r.response_digest = tally.digest.finalize().to_vec();
        let from = if start.upstream.is_empty() && start.skip == 0 {
            "the start".to_owned()
        } else {
            format!("token {}", start.token())
        };
        let ending = match (&outcome, &pos) {
            (Err(e), _) => format!("failed: {e}"),
            (Ok(()), Some(next)) => format!("continues at token {}", next.token()),
            (Ok(()), None) => "complete".to_owned(),
        };
        r.outcome = match &outcome {
            Ok(()) => "OK".to_owned(),
            Err(e) => audit::outcome(e.code()),
        };
        r.detail = format!(
            "OpenData.Download from {from}: {} pages of up to {}, {} records, {} provider pages; {ending}",
            tally.pages, self.page_size, tally.records, tally.fetches
        );
        if let Err(e) = self.router.audit().record(r).await {
            let _ = self
                .tx
                .send(Err(Status::unavailable(format!(
                    "node {me} could not record the download in its audit trail: {e}"
                ))))
                .await;
            return;
        }
        if let Some(last) = held
            && self.tx.send(Ok(last)).await.is_err()
        {
            return;
        }
        if let Err(e) = outcome {
            let _ = self.tx.send(Err(e.into())).await;
        }
    }

    /// Streams pages from `pos` until the dataset ends (`pos` becomes `None`), the call's page limit is
    /// reached, or something fails; the last page stays in `held`.
    async fn pages(
        &self,
        base: &str,
        pos: &mut Option<Position>,
        held: &mut Option<ShareResponse>,
        tally: &mut Tally,
    ) -> Result<()> {
        let page = self.page_size as usize;
        while let Some(at) = pos.clone() {
            // Each provider page yields at least one page unless the dataset shrank meanwhile; either way a
            // call makes at most `max_pages` provider requests.
            if tally.pages >= self.max_pages || tally.fetches >= self.max_pages {
                return Ok(());
            }
            let wanted = u64::from(self.max_pages - tally.pages) * u64::from(self.page_size);
            let size = (u64::from(at.skip) + wanted).min(u64::from(policy::MAX_BULK_PAGE));
            let size = u32::try_from(size).unwrap_or(policy::MAX_BULK_PAGE);
            let request_id = format!("{base}-p{}", tally.fetches);
            let resp = self.fetch(&request_id, &at.upstream, size, tally).await?;
            let total = resp.records.len();
            let mut used = (at.skip as usize).min(total);
            let mut rest = resp.records.into_iter().skip(used).peekable();
            *pos = if resp.next_page_token.is_empty() {
                None
            } else {
                Some(Position {
                    skip: 0,
                    upstream: resp.next_page_token.clone(),
                })
            };
            while rest.peek().is_some() {
                if tally.pages >= self.max_pages {
                    *pos = Some(Position {
                        skip: u32::try_from(used).unwrap_or(0),
                        upstream: at.upstream.clone(),
                    });
                    break;
                }
                let records: Vec<_> = rest.by_ref().take(page).collect();
                used += records.len();
                let next = if used < total {
                    Position {
                        skip: u32::try_from(used).unwrap_or(0),
                        upstream: at.upstream.clone(),
                    }
                    .token()
                } else {
                    pos.as_ref().map(Position::token).unwrap_or_default()
                };
                tally.records += records.len() as u64;
                tally.pages += 1;
                let out = ShareResponse {
                    request_id: base.to_owned(),
                    resource_id: resp.resource_id.clone(),
                    entry_version: resp.entry_version,
                    records,
                    next_page_token: next,
                    grant_id: resp.grant_id.clone(),
                    route: resp.route.clone(),
                    ..Default::default()
                };
                tally.digest.update(out.encode_to_vec());
                if let Some(previous) = held.replace(out)
                    && self.tx.send(Ok(previous)).await.is_err()
                {
                    return Err(Error::Upstream(Status::cancelled(
                        "the client went away before the download ended",
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The purpose every open-data request states.
const PURPOSE: &str = "open data download";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_tokens_round_trip_and_foreign_ones_are_refused() {
        let start = Position::parse("").unwrap_or(Position {
            skip: 9,
            upstream: "x".into(),
        });
        assert_eq!(
            start,
            Position {
                skip: 0,
                upstream: String::new()
            }
        );
        let p = Position {
            skip: 7,
            upstream: "1.2".into(),
        };
        assert_eq!(Position::parse(&p.token()).ok(), Some(p));
        for bad in ["17", "x.1", "5000.1", "-1.0"] {
            let e = Position::parse(bad).err().map(|e| e.code());
            assert_eq!(e, Some(tonic::Code::InvalidArgument), "{bad}");
        }
    }
}

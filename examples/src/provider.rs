//! The `fedgate.v1.Provider` service of a civil-affairs agency, answering its node's fetches, aggregates and
//! exports from a [`Registry`].
//!
//! The service accepts calls only from its own node: the caller's client certificate must carry the URI SAN
//! `urn:fedgate:node:<code>` of the node code given to [`RegistryProvider::new`]. It is meant to be served over
//! mutual TLS with [`serve_provider`]; without TLS every call is refused as unauthenticated.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fedgate_proto::v1::provider_server::Provider;
use fedgate_proto::v1::{
    AggregateRequest, AggregateResponse, ChangesRequest, ChangesResponse, Dimension, ExportRequest,
    ExportResponse, FetchRequest, FetchResponse, StatGroup,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::changelog::ChangeLog;
use crate::registry::{KEY_FIELD, Registry, Resource};

/// URI SAN prefix of node certificates.
pub const NODE_URI_PREFIX: &str = "urn:fedgate:node:";

/// Records per [`Provider::export`] page when the request gives no page size.
pub const DEFAULT_EXPORT_PAGE_SIZE: u32 = 1000;

/// Largest page size [`Provider::export`] accepts.
pub const MAX_EXPORT_PAGE_SIZE: u32 = 5000;

/// The Provider service backed by a civil-affairs [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryProvider {
    registry: Arc<Registry>,
    node_code: String,
    latency: Duration,
    received: Arc<AtomicU64>,
    changes: Arc<ChangeLog>,
}

impl RegistryProvider {
    /// A provider serving `registry` to the node with division code `node_code` only.
    pub fn new(registry: impl Into<Arc<Registry>>, node_code: impl Into<String>) -> Self {
        Self {
            registry: registry.into(),
            node_code: node_code.into(),
            latency: Duration::ZERO,
            received: Arc::new(AtomicU64::new(0)),
            changes: Arc::default(),
        }
    }

    /// The provider answering every call `latency` after it arrived, as a slow registry back end would.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Calls that reached the service (authorized or not) since it started, counted as they arrive; shared by
    /// every clone.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// Counts a call and waits out the configured latency.
    async fn arrive(&self) {
        self.received.fetch_add(1, Ordering::SeqCst);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// The registry this provider serves, as generated (see [`RegistryProvider::changes`] for what changed).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry shared with the provider's clones.
    pub fn shared_registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The changes made to the registry since it was generated, which every answer reflects.
    pub fn changes(&self) -> &Arc<ChangeLog> {
        &self.changes
    }

    /// Changes, adds or deletes (`None`) a resident; returns whether anything changed.
    pub fn edit(&self, id_number: &str, f: impl FnOnce(&mut crate::Person)) -> bool {
        match self.changes.current(&self.registry, id_number) {
            Some(mut p) => {
                f(&mut p);
                self.changes.upsert(&self.registry, p);
                true
            }
            None => false,
        }
    }

    /// Deletes a resident; returns whether it existed.
    pub fn delete(&self, id_number: &str) -> bool {
        self.changes.delete(&self.registry, id_number)
    }

    /// Answers `Changes` without any caller check.
    pub fn changes_page(&self, request: &ChangesRequest) -> Result<ChangesResponse, Status> {
        let resource = self.resource(&request.resource_id)?;
        self.changes.changes(resource, request)
    }

    /// The division code of the only node allowed to call.
    pub fn node_code(&self) -> &str {
        &self.node_code
    }

    /// Answers a fetch without any caller check: the lookup behind [`Provider::fetch`].
    ///
    /// `resource_id` is `"<node code>:<local code>"` (the node code must be this provider's node) or a bare local
    /// code; an unknown resource is NOT_FOUND. The key field must be `id_number` (empty means `id_number`), else
    /// INVALID_ARGUMENT. A key that matches no resident gives zero records. Only the requested `fields` that the
    /// resource has are returned, every field when none is requested.
    pub fn lookup(&self, request: &FetchRequest) -> Result<FetchResponse, Status> {
        let resource = self.resource(&request.resource_id)?;
        if !request.key_field.is_empty() && request.key_field != KEY_FIELD {
            return Err(Status::invalid_argument(format!(
                "resource {:?} is keyed by {KEY_FIELD:?}, not {:?}",
                request.resource_id, request.key_field
            )));
        }
        let records = self
            .changes
            .current(&self.registry, request.key.trim())
            .map(|p| p.record(resource, &request.fields))
            .into_iter()
            .collect();
        Ok(FetchResponse { records })
    }

    /// Answers an aggregate without any caller check: the counting behind [`Provider::aggregate`].
    ///
    /// Counts the residents grouped by the values of the `group_by` fields, which may be any fields of the
    /// resource (another name is INVALID_ARGUMENT naming it; an unknown resource is NOT_FOUND, as for
    /// [`lookup`](Self::lookup)). Every group is returned, however small: suppressing small groups is the node's
    /// job. Groups are sorted by their dimension values, compared in the order of `group_by`; each group's
    /// dimensions follow that order too. With no `group_by` the answer is a single group without dimensions
    /// holding the number of residents (0 for an empty registry).
    pub fn aggregate_counts(
        &self,
        request: &AggregateRequest,
    ) -> Result<AggregateResponse, Status> {
        let resource = self.resource(&request.resource_id)?;
        if let Some(unknown) = request
            .group_by
            .iter()
            .find(|f| !resource.fields().contains(&f.as_str()))
        {
            return Err(Status::invalid_argument(format!(
                "resource {:?} has no field {unknown:?} to group by (its fields: {})",
                request.resource_id,
                resource.fields().join(", ")
            )));
        }
        let persons: Vec<crate::Person> = self
            .changes
            .range(&self.registry, 0, usize::MAX)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        if request.group_by.is_empty() {
            return Ok(AggregateResponse {
                groups: vec![StatGroup {
                    dimensions: Vec::new(),
                    count: persons.len() as u64,
                }],
            });
        }
        let mut counts: BTreeMap<Vec<&str>, u64> = BTreeMap::new();
        for person in &persons {
            let key = request
                .group_by
                .iter()
                .map(|f| person.field(f).unwrap_or_default())
                .collect();
            *counts.entry(key).or_default() += 1;
        }
        let groups = counts
            .into_iter()
            .map(|(values, count)| StatGroup {
                dimensions: request
                    .group_by
                    .iter()
                    .zip(values)
                    .map(|(field, value)| Dimension {
                        field: field.clone(),
                        value: value.to_owned(),
                    })
                    .collect(),
                count,
            })
            .collect();
        Ok(AggregateResponse { groups })
    }

    /// Answers an export without any caller check: the paging behind [`Provider::export`].
    ///
    /// Pages over every resident in registry order (the order of [`Registry::persons`], which never changes).
    /// `page_token` is the index of the first resident of the page in decimal (empty for 0); anything else, or
    /// an index past the end, is INVALID_ARGUMENT. `page_size` is 1 to [`MAX_EXPORT_PAGE_SIZE`], 0 meaning
    /// [`DEFAULT_EXPORT_PAGE_SIZE`]; a larger size is INVALID_ARGUMENT. Records hold the requested `fields` the
    /// resource has (every field when none is requested), as for [`lookup`](Self::lookup). `next_page_token` is
    /// the index after the page, empty once the last resident has been returned. An unknown resource is
    /// NOT_FOUND.
    ///
    /// Only the residents of the page are read, so a page costs the same however large the registry is.
    pub fn export_page(&self, request: &ExportRequest) -> Result<ExportResponse, Status> {
        let resource = self.resource(&request.resource_id)?;
        let len = self.changes.index_len(&self.registry);
        let start = parse_page_token(&request.page_token, len)?;
        let size = match request.page_size {
            0 => DEFAULT_EXPORT_PAGE_SIZE,
            n if n > MAX_EXPORT_PAGE_SIZE => {
                return Err(Status::invalid_argument(format!(
                    "page size {n} is larger than {MAX_EXPORT_PAGE_SIZE}"
                )));
            }
            n => n,
        };
        let end = start.saturating_add(size as usize).min(len);
        let records = self
            .changes
            .range(&self.registry, start, end)
            .iter()
            .map(|(_, p)| p.record(resource, &request.fields))
            .collect();
        let next_page_token = if end < len {
            end.to_string()
        } else {
            String::new()
        };
        Ok(ExportResponse {
            records,
            next_page_token,
        })
    }

    /// The resource named by `resource_id`: `"<node code>:<local code>"` with this provider's node code, or a
    /// bare local code; NOT_FOUND otherwise.
    fn resource(&self, resource_id: &str) -> Result<Resource, Status> {
        let local = match resource_id.split_once(':') {
            Some((node, local)) if node == self.node_code => local,
            Some(_) => "",
            None => resource_id,
        };
        Resource::from_local_code(local).ok_or_else(|| {
            Status::not_found(format!(
                "resource {resource_id:?} is not provided here (this provider serves {})",
                Resource::ALL
                    .iter()
                    .map(|r| format!("{}:{}", self.node_code, r.local_code()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Checks that the caller presented the certificate of this provider's node; returns its URI on success.
    fn authorize<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let Some(certs) = request.peer_certs() else {
            return Err(Status::unauthenticated(
                "no client certificate: the provider accepts only mutual-TLS calls from its node",
            ));
        };
        let Some(leaf) = certs.first() else {
            return Err(Status::unauthenticated("empty client certificate chain"));
        };
        let expected = format!("{NODE_URI_PREFIX}{}", self.node_code);
        let uris = fedgate_uris(leaf.as_ref());
        if uris.contains(&expected) {
            return Ok(expected);
        }
        let peer = if uris.is_empty() {
            "a peer without a fedgate identity".to_owned()
        } else {
            uris.join(", ")
        };
        Err(Status::permission_denied(format!(
            "{peer} may not call this provider; only {expected} may"
        )))
    }
}

#[tonic::async_trait]
impl Provider for RegistryProvider {
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        self.arrive().await;
        let peer = match self.authorize(&request) {
            Ok(peer) => peer,
            Err(status) => {
                tracing::warn!(message = status.message(), "refused fetch");
                return Err(status);
            }
        };
        let req = request.get_ref();
        let result = self.lookup(req);
        tracing::info!(
            request_id = %req.request_id,
            resource_id = %req.resource_id,
            consumer_uscc = %req.consumer_uscc,
            consumer_node = %req.consumer_node,
            purpose = %req.purpose,
            caller = %peer,
            records = result.as_ref().map(|r| r.records.len()).unwrap_or(0),
            "fetch"
        );
        result.map(Response::new)
    }

    async fn aggregate(
        &self,
        request: Request<AggregateRequest>,
    ) -> Result<Response<AggregateResponse>, Status> {
        self.arrive().await;
        let peer = match self.authorize(&request) {
            Ok(peer) => peer,
            Err(status) => {
                tracing::warn!(message = status.message(), "refused aggregate");
                return Err(status);
            }
        };
        let req = request.into_inner();
        // Counting walks the whole registry: keep it off the async workers.
        let provider = self.clone();
        let (req, result) = tokio::task::spawn_blocking(move || {
            let result = provider.aggregate_counts(&req);
            (req, result)
        })
        .await
        .map_err(|e| Status::internal(format!("counting failed: {e}")))?;
        tracing::info!(
            request_id = %req.request_id,
            resource_id = %req.resource_id,
            consumer_uscc = %req.consumer_uscc,
            group_by = %req.group_by.join(","),
            caller = %peer,
            groups = result.as_ref().map(|r| r.groups.len()).unwrap_or(0),
            error = result.as_ref().err().map(Status::message).unwrap_or_default(),
            "aggregate"
        );
        result.map(Response::new)
    }

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<ExportResponse>, Status> {
        self.arrive().await;
        let peer = match self.authorize(&request) {
            Ok(peer) => peer,
            Err(status) => {
                tracing::warn!(message = status.message(), "refused export");
                return Err(status);
            }
        };
        let req = request.get_ref();
        let result = self.export_page(req);
        tracing::info!(
            request_id = %req.request_id,
            resource_id = %req.resource_id,
            consumer_uscc = %req.consumer_uscc,
            page_token = %req.page_token,
            page_size = req.page_size,
            caller = %peer,
            records = result.as_ref().map(|r| r.records.len()).unwrap_or(0),
            next_page_token = result.as_ref().map(|r| r.next_page_token.as_str()).unwrap_or_default(),
            error = result.as_ref().err().map(Status::message).unwrap_or_default(),
            "export"
        );
        result.map(Response::new)
    }

    async fn changes(
        &self,
        request: Request<ChangesRequest>,
    ) -> Result<Response<ChangesResponse>, Status> {
        self.serve_changes(request).await
    }
}

impl RegistryProvider {
    async fn serve_changes(
        &self,
        request: Request<ChangesRequest>,
    ) -> Result<Response<ChangesResponse>, Status> {
        self.arrive().await;
        let peer = match self.authorize(&request) {
            Ok(peer) => peer,
            Err(status) => {
                tracing::warn!(message = status.message(), "refused changes");
                return Err(status);
            }
        };
        let req = request.get_ref();
        let result = self.changes_page(req);
        tracing::info!(
            request_id = %req.request_id,
            resource_id = %req.resource_id,
            after = %req.after,
            caller = %peer,
            changes = result.as_ref().map(|r| r.changes.len()).unwrap_or(0),
            error = result.as_ref().err().map(Status::message).unwrap_or_default(),
            "changes"
        );
        result.map(Response::new)
    }
}

/// The start index encoded in an export page token: empty is 0, otherwise decimal digits only, at most `len`.
fn parse_page_token(token: &str, len: usize) -> Result<usize, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    let start = if token.bytes().all(|b| b.is_ascii_digit()) {
        token.parse::<usize>().ok()
    } else {
        None
    };
    match start {
        Some(start) if start <= len => Ok(start),
        Some(_) => Err(Status::invalid_argument(format!(
            "page token {token:?} is past the end of the registry ({len} records)"
        ))),
        None => Err(Status::invalid_argument(format!(
            "page token {token:?} is not a token this provider issued (a decimal record index)"
        ))),
    }
}

/// The `urn:fedgate:` URI SANs of a DER certificate; empty when it does not parse or has none.
pub fn fedgate_uris(cert_der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("urn:fedgate:") => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// PEM material of a provider agency's TLS endpoint.
#[derive(Debug, Clone)]
pub struct ProviderTls {
    /// Federation CA certificate(s) that sign node certificates.
    pub ca_pem: Vec<u8>,
    /// The agency's certificate chain (URI SAN `urn:fedgate:agency:<uscc>`, DNS `<uscc>.agency.fedgate`).
    pub cert_pem: Vec<u8>,
    /// The agency's private key.
    pub key_pem: Vec<u8>,
}

/// Serves `provider` over mutual TLS on `listener` until `shutdown` completes, always with `tls` (see
/// [`crate::provider_tls::serve_provider_reloading`] for material that changes).
///
/// Clients must present a certificate signed by `tls.ca_pem`. The process must have installed a rustls crypto
/// provider first (`rustls::crypto::ring::default_provider().install_default()`).
pub async fn serve_provider(
    listener: TcpListener,
    tls: ProviderTls,
    provider: RegistryProvider,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::provider_tls::ServeError> {
    let (_fixed, current) = tokio::sync::watch::channel(crate::provider_tls::server_config(&tls)?);
    Ok(
        crate::provider_tls::serve_provider_reloading(listener, current, provider, shutdown)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::Pki;
    use fedgate_proto::v1::provider_client::ProviderClient;
    use tonic::Code;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

    fn provider() -> RegistryProvider {
        let registry = Registry::generate("350102", 7, 200).unwrap_or_else(|e| panic!("{e}"));
        RegistryProvider::new(registry, "350102")
    }

    fn fetch(resource_id: &str, key: &str, fields: &[&str]) -> FetchRequest {
        FetchRequest {
            request_id: "t-1".into(),
            resource_id: resource_id.into(),
            key_field: "id_number".into(),
            key: key.into(),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            ..FetchRequest::default()
        }
    }

    #[test]
    fn lookup_returns_requested_fields() {
        let p = provider();
        let id = p.registry().sample_id(3).unwrap_or_default().to_owned();
        let all = p
            .lookup(&fetch("350102:household", &id, &[]))
            .unwrap_or_default();
        assert_eq!(all.records.len(), 1);
        assert_eq!(
            all.records[0].values.len(),
            Resource::Household.fields().len()
        );
        assert_eq!(all.records[0].values.get("id_number"), Some(&id));

        let some = p
            .lookup(&fetch("350102:marriage", &id, &["marital_status", "phone"]))
            .unwrap_or_default();
        assert_eq!(some.records.len(), 1);
        let keys: Vec<_> = some.records[0].values.keys().collect();
        assert_eq!(keys, vec!["marital_status"]);

        let bare = p
            .lookup(&fetch("household", &id, &["name"]))
            .unwrap_or_default();
        assert_eq!(bare.records.len(), 1);
    }

    #[test]
    fn lookup_errors() {
        let p = provider();
        let id = p.registry().sample_id(0).unwrap_or_default().to_owned();
        let none = p.lookup(&fetch("350102:household", "350102190001010000", &[]));
        assert!(none.is_ok_and(|r| r.records.is_empty()));

        let unknown = p.lookup(&fetch("350102:births", &id, &[]));
        assert!(
            unknown
                .as_ref()
                .is_err_and(|s| s.code() == Code::NotFound && s.message().contains("births"))
        );
        let other_node = p.lookup(&fetch("350103:household", &id, &[]));
        assert!(other_node.is_err_and(|s| s.code() == Code::NotFound));

        let mut bad_key = fetch("350102:household", &id, &[]);
        bad_key.key_field = "phone".into();
        assert!(
            p.lookup(&bad_key)
                .is_err_and(|s| s.code() == Code::InvalidArgument)
        );
    }

    fn aggregate(resource_id: &str, group_by: &[&str]) -> AggregateRequest {
        AggregateRequest {
            request_id: "t-agg".into(),
            resource_id: resource_id.into(),
            group_by: group_by.iter().map(|f| (*f).to_owned()).collect(),
            ..AggregateRequest::default()
        }
    }

    fn export(resource_id: &str, fields: &[&str], token: &str, size: u32) -> ExportRequest {
        ExportRequest {
            request_id: "t-exp".into(),
            resource_id: resource_id.into(),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            page_token: token.into(),
            page_size: size,
            ..ExportRequest::default()
        }
    }

    fn values(group: &StatGroup) -> Vec<&str> {
        group.dimensions.iter().map(|d| d.value.as_str()).collect()
    }

    #[test]
    fn aggregate_counts_add_up() {
        let p = provider();
        let total = p.registry().len() as u64;

        let all = p
            .aggregate_counts(&aggregate("350102:household", &[]))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(all.groups.len(), 1);
        assert!(all.groups[0].dimensions.is_empty());
        assert_eq!(all.groups[0].count, total);

        let by_gender = p
            .aggregate_counts(&aggregate("350102:household", &["gender"]))
            .unwrap_or_else(|s| panic!("{s:?}"));
        let genders: Vec<_> = by_gender.groups.iter().map(values).collect();
        assert_eq!(genders, vec![vec!["female"], vec!["male"]]);
        assert_eq!(by_gender.groups.iter().map(|g| g.count).sum::<u64>(), total);
        let males = p
            .registry()
            .persons()
            .iter()
            .filter(|q| q.gender.as_str() == "male")
            .count() as u64;
        assert_eq!(by_gender.groups[1].count, males);

        let two = p
            .aggregate_counts(&aggregate(
                "marriage",
                &["marital_status", "registration_office"],
            ))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(two.groups.iter().map(|g| g.count).sum::<u64>(), total);
        assert!(two.groups.iter().all(|g| {
            let fields: Vec<_> = g.dimensions.iter().map(|d| d.field.as_str()).collect();
            fields == ["marital_status", "registration_office"] && g.count > 0
        }));
        let keys: Vec<_> = two.groups.iter().map(values).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted, "groups are sorted and distinct");

        // Small groups are not suppressed here: one group per resident.
        let fine = p
            .aggregate_counts(&aggregate("350102:household", &["id_number"]))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(fine.groups.len() as u64, total);
        assert!(fine.groups.iter().all(|g| g.count == 1));
    }

    #[test]
    fn aggregate_errors() {
        let p = provider();
        let unknown = p.aggregate_counts(&aggregate("350102:household", &["gender", "shoe_size"]));
        assert!(
            unknown.as_ref().is_err_and(
                |s| s.code() == Code::InvalidArgument && s.message().contains("shoe_size")
            ),
            "{unknown:?}"
        );
        // A field of the other resource is not a field of this one.
        let other = p.aggregate_counts(&aggregate("350102:marriage", &["phone"]));
        assert!(
            other
                .is_err_and(|s| s.code() == Code::InvalidArgument && s.message().contains("phone"))
        );
        let missing = p.aggregate_counts(&aggregate("350102:births", &["gender"]));
        assert!(missing.is_err_and(|s| s.code() == Code::NotFound));
        let elsewhere = p.aggregate_counts(&aggregate("350103:household", &[]));
        assert!(elsewhere.is_err_and(|s| s.code() == Code::NotFound));

        let empty = RegistryProvider::new(
            Registry::generate("350102", 7, 0).unwrap_or_else(|e| panic!("{e}")),
            "350102",
        );
        let none = empty
            .aggregate_counts(&aggregate("household", &[]))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(none.groups.len(), 1);
        assert_eq!(none.groups[0].count, 0);
        let none = empty
            .aggregate_counts(&aggregate("household", &["gender"]))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert!(none.groups.is_empty());
    }

    /// Follows the page tokens from the start; returns the ID numbers in order and the number of pages.
    fn export_all(
        p: &RegistryProvider,
        resource_id: &str,
        fields: &[&str],
        size: u32,
    ) -> (Vec<String>, usize) {
        let mut ids = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = p
                .export_page(&export(resource_id, fields, &token, size))
                .unwrap_or_else(|s| panic!("{s:?}"));
            pages += 1;
            let limit = if size == 0 {
                DEFAULT_EXPORT_PAGE_SIZE
            } else {
                size
            };
            assert!(page.records.len() <= limit as usize);
            for r in &page.records {
                ids.push(r.values.get("id_number").cloned().unwrap_or_default());
            }
            if page.next_page_token.is_empty() {
                return (ids, pages);
            }
            assert!(!page.records.is_empty());
            token = page.next_page_token;
            assert!(pages <= p.registry().len() + 1, "paging does not end");
        }
    }

    #[test]
    fn export_pages_cover_registry_once() {
        let p = provider();
        let expected: Vec<String> = p.registry().id_numbers().map(str::to_owned).collect();
        for size in [1, 7, 50, 199, 200, 201, 5000] {
            let (ids, pages) = export_all(&p, "350102:household", &["id_number", "name"], size);
            assert_eq!(ids, expected, "page size {size}");
            assert_eq!(
                pages,
                expected.len().div_ceil(size as usize),
                "page size {size}"
            );
        }
        // Default page size: everything in one page.
        let (ids, pages) = export_all(&p, "marriage", &[], 0);
        assert_eq!((ids, pages), (expected, 1));

        let page = p
            .export_page(&export(
                "350102:marriage",
                &["marital_status", "phone"],
                "10",
                5,
            ))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(page.next_page_token, "15");
        assert_eq!(page.records.len(), 5);
        for (r, person) in page.records.iter().zip(&p.registry().persons()[10..15]) {
            let keys: Vec<_> = r.values.keys().collect();
            assert_eq!(keys, vec!["marital_status"]);
            assert_eq!(
                r.values.get("marital_status").map(String::as_str),
                Some(person.marital_status.as_str())
            );
        }
        let all_fields = p
            .export_page(&export("350102:household", &[], "", 1))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(
            all_fields.records[0].values.len(),
            Resource::Household.fields().len()
        );

        // A token at the very end gives an empty last page.
        let end = p
            .export_page(&export("household", &[], "200", 10))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert!(end.records.is_empty() && end.next_page_token.is_empty());
    }

    #[test]
    fn export_errors() {
        let p = provider();
        for token in [
            "abc",
            "-1",
            "+5",
            " 5",
            "5 ",
            "1e3",
            "201",
            "99999999999999999999999",
        ] {
            let bad = p.export_page(&export("350102:household", &[], token, 10));
            assert!(
                bad.as_ref()
                    .is_err_and(|s| s.code() == Code::InvalidArgument),
                "token {token:?}: {bad:?}"
            );
        }
        let too_big = p.export_page(&export(
            "350102:household",
            &[],
            "",
            MAX_EXPORT_PAGE_SIZE + 1,
        ));
        assert!(
            too_big
                .is_err_and(|s| s.code() == Code::InvalidArgument && s.message().contains("5001"))
        );
        let largest = p.export_page(&export("350102:household", &[], "", MAX_EXPORT_PAGE_SIZE));
        assert!(largest.is_ok_and(|r| r.records.len() == 200));
        let missing = p.export_page(&export("350102:births", &[], "", 10));
        assert!(missing.is_err_and(|s| s.code() == Code::NotFound));
    }

    #[test]
    fn export_pages_a_large_registry_quickly() {
        let registry = Registry::generate("350102", 3, 200_000).unwrap_or_else(|e| panic!("{e}"));
        let p = RegistryProvider::new(registry, "350102");
        let started = std::time::Instant::now();
        // A page deep into the registry costs no more than the first one.
        let page = p
            .export_page(&export("350102:household", &["id_number"], "195000", 5000))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(page.records.len(), 5000);
        assert!(page.next_page_token.is_empty());
        assert_eq!(
            page.records[0].values.get("id_number").map(String::as_str),
            p.registry().sample_id(195_000)
        );
        let (ids, pages) = export_all(&p, "350102:household", &["id_number"], 5000);
        assert_eq!((ids.len(), pages), (200_000, 40));
        let counts = p
            .aggregate_counts(&aggregate("350102:household", &["gender"]))
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(counts.groups.iter().map(|g| g.count).sum::<u64>(), 200_000);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "took {:?}",
            started.elapsed()
        );
    }

    async fn call_as(
        pki: &Pki,
        port: u16,
        node: &str,
        request: FetchRequest,
    ) -> Result<FetchResponse, Status> {
        client_as(pki, port, node)
            .await
            .fetch(request)
            .await
            .map(Response::into_inner)
    }

    async fn client_as(pki: &Pki, port: u16, node: &str) -> ProviderClient<Channel> {
        client_to(pki, port, node)
            .await
            .unwrap_or_else(|e| panic!("connect: {e:?}"))
    }

    async fn client_to(
        pki: &Pki,
        port: u16,
        node: &str,
    ) -> Result<ProviderClient<Channel>, tonic::transport::Error> {
        let (cert, key) = pki.leaf(
            &format!("urn:fedgate:node:{node}"),
            &[&format!("{node}.node.fedgate")],
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .identity(Identity::from_pem(cert, key))
            .domain_name("91350102ma2xxxxx0a.agency.fedgate");
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .and_then(|e| e.tls_config(tls))?
            .connect()
            .await?;
        Ok(ProviderClient::new(channel))
    }

    #[tokio::test]
    async fn a_reloaded_certificate_and_ca_serve_new_connections_without_a_restart() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let material = |pki: &Pki| {
            let (cert_pem, key_pem) = pki.leaf(
                "urn:fedgate:agency:91350102MA2XXXXX0A",
                &["91350102ma2xxxxx0a.agency.fedgate"],
            );
            ProviderTls {
                ca_pem: pki.ca_pem.clone().into_bytes(),
                cert_pem: cert_pem.into_bytes(),
                key_pem: key_pem.into_bytes(),
            }
        };
        let (old, new) = (Pki::new(), Pki::new());
        let config = |tls: &ProviderTls| {
            crate::provider_tls::server_config(tls).unwrap_or_else(|e| panic!("{e}"))
        };
        let (reload, current) = tokio::sync::watch::channel(config(&material(&old)));
        let p = provider();
        let id = p.registry().sample_id(1).unwrap_or_default().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::provider_tls::serve_provider_reloading(
            listener,
            current,
            p,
            async {
                let _ = stopped.await;
            },
        ));
        let asked = || fetch("350102:household", &id, &["name"]);
        let before = call_as(&old, port, "350102", asked())
            .await
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(before.records.len(), 1);

        // A broken file is refused before it is installed; the material in use stays.
        let mut broken = material(&new);
        broken.key_pem =
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n".to_vec();
        assert!(crate::provider_tls::server_config(&broken).is_err());

        reload
            .send(config(&material(&new)))
            .unwrap_or_else(|e| panic!("{e}"));
        let after = call_as(&new, port, "350102", asked())
            .await
            .unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(after.records.len(), 1);
        assert!(
            client_to(&old, port, "350102").await.is_err(),
            "a client trusting only the old CA no longer gets in"
        );
        let _ = stop.send(());
        let _ = server.await;
    }

    #[tokio::test]
    async fn serves_only_its_node_over_mtls() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = Pki::new();
        let (cert_pem, key_pem) = pki.leaf(
            "urn:fedgate:agency:91350102MA2XXXXX0A",
            &["91350102ma2xxxxx0a.agency.fedgate"],
        );
        let tls = ProviderTls {
            ca_pem: pki.ca_pem.clone().into_bytes(),
            cert_pem: cert_pem.into_bytes(),
            key_pem: key_pem.into_bytes(),
        };
        let p = provider();
        let id = p.registry().sample_id(1).unwrap_or_default().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_provider(listener, tls, p, async {
            let _ = stopped.await;
        }));

        let ok = call_as(
            &pki,
            port,
            "350102",
            fetch("350102:household", &id, &["name"]),
        )
        .await;
        let ok = ok.unwrap_or_else(|s| panic!("{s:?}"));
        assert_eq!(ok.records.len(), 1);
        assert_eq!(ok.records[0].values.len(), 1);

        let denied = call_as(&pki, port, "350103", fetch("350102:household", &id, &[])).await;
        let status = denied.err().unwrap_or_else(|| panic!("350103 was served"));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status.message().contains("urn:fedgate:node:350103"),
            "{}",
            status.message()
        );

        let mut node = client_as(&pki, port, "350102").await;
        let counts = node
            .aggregate(aggregate("350102:household", &["gender"]))
            .await
            .unwrap_or_else(|s| panic!("{s:?}"))
            .into_inner();
        assert_eq!(counts.groups.iter().map(|g| g.count).sum::<u64>(), 200);
        let page = node
            .export(export("350102:household", &["id_number"], "", 150))
            .await
            .unwrap_or_else(|s| panic!("{s:?}"))
            .into_inner();
        assert_eq!(
            (page.records.len(), page.next_page_token.as_str()),
            (150, "150")
        );

        let mut other = client_as(&pki, port, "350103").await;
        let denied = other
            .aggregate(aggregate("350102:household", &[]))
            .await
            .map(Response::into_inner);
        assert!(denied.is_err_and(|s| s.code() == Code::PermissionDenied));
        let denied = other
            .export(export("350102:household", &[], "", 10))
            .await
            .map(Response::into_inner);
        assert!(denied.is_err_and(|s| s.code() == Code::PermissionDenied));

        let _ = stop.send(());
        let served = server.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(served.is_ok(), "{served:?}");
    }
}

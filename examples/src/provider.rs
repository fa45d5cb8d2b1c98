//! The `fedgate.v1.Provider` service of a civil-affairs agency, answering its node's fetches from a [`Registry`].
//!
//! The service accepts calls only from its own node: the caller's client certificate must carry the URI SAN
//! `urn:fedgate:node:<code>` of the node code given to [`RegistryProvider::new`]. It is meant to be served over
//! mutual TLS with [`serve_provider`]; without TLS every call is refused as unauthenticated.

use std::future::Future;
use std::sync::Arc;

use fedgate_proto::v1::provider_server::{Provider, ProviderServer};
use fedgate_proto::v1::{FetchRequest, FetchResponse};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::registry::{KEY_FIELD, Registry, Resource};

/// URI SAN prefix of node certificates.
pub const NODE_URI_PREFIX: &str = "urn:fedgate:node:";

/// The Provider service backed by a civil-affairs [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryProvider {
    registry: Arc<Registry>,
    node_code: String,
}

impl RegistryProvider {
    /// A provider serving `registry` to the node with division code `node_code` only.
    pub fn new(registry: impl Into<Arc<Registry>>, node_code: impl Into<String>) -> Self {
        Self {
            registry: registry.into(),
            node_code: node_code.into(),
        }
    }

    /// The registry this provider serves.
    pub fn registry(&self) -> &Registry {
        &self.registry
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
        let local = match request.resource_id.split_once(':') {
            Some((node, local)) if node == self.node_code => local,
            Some(_) => "",
            None => request.resource_id.as_str(),
        };
        let Some(resource) = Resource::from_local_code(local) else {
            return Err(Status::not_found(format!(
                "resource {:?} is not provided here (this provider serves {})",
                request.resource_id,
                Resource::ALL
                    .iter()
                    .map(|r| format!("{}:{}", self.node_code, r.local_code()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if !request.key_field.is_empty() && request.key_field != KEY_FIELD {
            return Err(Status::invalid_argument(format!(
                "resource {:?} is keyed by {KEY_FIELD:?}, not {:?}",
                request.resource_id, request.key_field
            )));
        }
        let records = self
            .registry
            .lookup(resource, &request.key, &request.fields)
            .into_iter()
            .collect();
        Ok(FetchResponse { records })
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

/// Serves `provider` over mutual TLS on `listener` until `shutdown` completes.
///
/// Clients must present a certificate signed by `tls.ca_pem`. The process must have installed a rustls crypto
/// provider first (`rustls::crypto::ring::default_provider().install_default()`).
pub async fn serve_provider(
    listener: TcpListener,
    tls: ProviderTls,
    provider: RegistryProvider,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(tls.cert_pem, tls.key_pem))
        .client_ca_root(Certificate::from_pem(tls.ca_pem));
    Server::builder()
        .tls_config(config)?
        .add_service(ProviderServer::new(provider))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::Pki;
    use fedgate_proto::v1::provider_client::ProviderClient;
    use tonic::Code;
    use tonic::transport::{ClientTlsConfig, Endpoint};

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

    async fn call_as(
        pki: &Pki,
        port: u16,
        node: &str,
        request: FetchRequest,
    ) -> Result<FetchResponse, Status> {
        let (cert, key) = pki.leaf(
            &format!("urn:fedgate:node:{node}"),
            &[&format!("{node}.node.fedgate")],
        );
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .identity(Identity::from_pem(cert, key))
            .domain_name("91350102ma2xxxxx0a.agency.fedgate");
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .and_then(|e| e.tls_config(tls))
            .unwrap_or_else(|e| panic!("{e}"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect: {e:?}"));
        ProviderClient::new(channel)
            .fetch(request)
            .await
            .map(Response::into_inner)
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

        let _ = stop.send(());
        let served = server.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(served.is_ok(), "{served:?}");
    }
}

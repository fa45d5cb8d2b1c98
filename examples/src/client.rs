//! Connecting an agency to its node's `fedgate.v1.Agency` service over mutual TLS, and publishing entries.

use std::time::Duration;

use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{CatalogEntry, PublishEntryRequest};
use tonic::Status;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long establishing the connection to the node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS server name of the node with division code `node_code`: `<code>.node.fedgate`.
pub fn node_domain_name(node_code: &str) -> String {
    format!("{node_code}.node.fedgate")
}

/// The TLS server name of the agency with this unified social credit code: `<uscc lowercase>.agency.fedgate`.
pub fn agency_domain_name(uscc: &str) -> String {
    format!("{}.agency.fedgate", uscc.to_ascii_lowercase())
}

/// Connects to the Agency service of node `node_code` at `node_addr` (e.g. `"https://127.0.0.1:7400"`).
///
/// The node's certificate must be signed by `ca_pem` and name `<node_code>.node.fedgate`, which pins the node's
/// identity; the agency authenticates with `cert_pem`/`key_pem`. The process must have installed a rustls crypto
/// provider first (`rustls::crypto::ring::default_provider().install_default()`).
pub async fn connect_agency(
    node_addr: &str,
    node_code: &str,
    ca_pem: impl AsRef<[u8]>,
    cert_pem: impl AsRef<[u8]>,
    key_pem: impl AsRef<[u8]>,
) -> Result<AgencyClient<Channel>, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name(node_domain_name(node_code));
    let channel = Endpoint::from_shared(node_addr.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(AgencyClient::new(channel))
}

/// Publishes `entries` one by one and returns them as the node stored them (full id, node code, version).
///
/// Stops at the first refusal and returns its status.
pub async fn publish_all(
    client: &mut AgencyClient<Channel>,
    entries: impl IntoIterator<Item = CatalogEntry>,
) -> Result<Vec<CatalogEntry>, Status> {
    let mut stored = Vec::new();
    for entry in entries {
        let id = entry.id.clone();
        let response = client
            .publish_entry(PublishEntryRequest { entry: Some(entry) })
            .await?
            .into_inner();
        match response.entry {
            Some(entry) => stored.push(entry),
            None => {
                return Err(Status::internal(format!(
                    "the node accepted {id:?} but returned no entry"
                )));
            }
        }
    }
    Ok(stored)
}

/// A one-line description of a gRPC error for people: `"<message> (gRPC <Code> = <number>)"`.
pub fn describe_status(status: &Status) -> String {
    let code = status.code();
    let message = if status.message().is_empty() {
        code.description()
    } else {
        status.message()
    };
    format!("{message} (gRPC {code:?} = {})", code as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::Pki;
    use fedgate_proto::v1::agency_server::{Agency, AgencyServer};
    use fedgate_proto::v1::{
        GetEntryRequest, PublishEntryResponse, SearchCatalogRequest, SearchCatalogResponse,
        ShareRequest, ShareResponse, ShareType, WithdrawEntryRequest, WithdrawEntryResponse,
    };
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Server, ServerTlsConfig};
    use tonic::{Code, Request, Response};

    #[test]
    fn domain_names() {
        assert_eq!(node_domain_name("350102"), "350102.node.fedgate");
        assert_eq!(
            agency_domain_name("91350102MA2YD0TQ1K"),
            "91350102ma2yd0tq1k.agency.fedgate"
        );
    }

    #[test]
    fn status_description() {
        let s = Status::new(Code::PermissionDenied, "no grant");
        assert_eq!(describe_status(&s), "no grant (gRPC PermissionDenied = 7)");
        let s = Status::new(Code::Unavailable, "");
        assert!(describe_status(&s).ends_with("(gRPC Unavailable = 14)"));
    }

    /// A node stand-in that stores published entries the way the contract says a node does.
    struct FakeNode {
        code: String,
    }

    #[tonic::async_trait]
    impl Agency for FakeNode {
        async fn publish_entry(
            &self,
            request: Request<PublishEntryRequest>,
        ) -> Result<Response<PublishEntryResponse>, Status> {
            let Some(mut entry) = request.into_inner().entry else {
                return Err(Status::invalid_argument("no entry"));
            };
            if entry.id == "refused" {
                return Err(Status::permission_denied("not yours"));
            }
            entry.id = format!("{}:{}", self.code, entry.id);
            entry.node_code = self.code.clone();
            entry.version = 1;
            Ok(Response::new(PublishEntryResponse { entry: Some(entry) }))
        }
        async fn withdraw_entry(
            &self,
            _: Request<WithdrawEntryRequest>,
        ) -> Result<Response<WithdrawEntryResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn get_entry(
            &self,
            _: Request<GetEntryRequest>,
        ) -> Result<Response<CatalogEntry>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn search_catalog(
            &self,
            _: Request<SearchCatalogRequest>,
        ) -> Result<Response<SearchCatalogResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn share(&self, _: Request<ShareRequest>) -> Result<Response<ShareResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
    }

    #[tokio::test]
    async fn publishes_to_the_pinned_node() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = Pki::new();
        let (node_cert, node_key) = pki.leaf("urn:fedgate:node:350102", &["350102.node.fedgate"]);
        let (cert, key) = pki.leaf(
            "urn:fedgate:agency:91350102MA2YD0TQ1K",
            &["91350102ma2yd0tq1k.agency.fedgate"],
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener
            .local_addr()
            .map(|a| format!("https://{a}"))
            .unwrap_or_default();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(node_cert, node_key))
            .client_ca_root(Certificate::from_pem(&pki.ca_pem));
        let router = Server::builder()
            .tls_config(tls)
            .unwrap_or_else(|e| panic!("{e}"))
            .add_service(AgencyServer::new(FakeNode {
                code: "350102".into(),
            }));
        let server = tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));

        let mut client = connect_agency(&addr, "350102", &pki.ca_pem, &cert, &key)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        let entries =
            crate::civil_affairs_entries(ShareType::Unconditional, ShareType::Conditional);
        let stored = publish_all(&mut client, entries)
            .await
            .unwrap_or_else(|s| panic!("{s:?}"));
        let ids: Vec<_> = stored.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["350102:household", "350102:marriage"]);

        let refused = CatalogEntry {
            id: "refused".into(),
            ..CatalogEntry::default()
        };
        let err = publish_all(&mut client, [refused]).await.err();
        assert_eq!(err.map(|s| s.code()), Some(Code::PermissionDenied));

        // The same server is not node 350103: hostname verification refuses it.
        let wrong = connect_agency(&addr, "350103", &pki.ca_pem, &cert, &key).await;
        assert!(wrong.is_err());
        server.abort();
    }

    #[tokio::test]
    async fn bad_address_is_an_error() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = connect_agency("not a uri", "350102", "", "", "").await;
        assert!(r.is_err());
    }
}

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

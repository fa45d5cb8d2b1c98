//! Connecting an agency to its node's `fedgate.v1.Agency` service over mutual TLS, publishing entries, and
//! handling what a consumer keeps between calls: signed grant files and exported records.

use std::io;
use std::path::Path;
use std::time::Duration;

use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{CatalogEntry, Grant, PublishEntryRequest, Record, SignedGrant};
use prost::Message;
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

/// Connects to the Agency service of node `node_code` at `node_addr` (e.g. `"https://127.0.0.1:7400"`); a node
/// that runs as several replicas is given as their addresses separated by commas, and calls are spread over
/// them (a replica that is down fails the calls sent to it until the connection to it is found broken, so a
/// caller retries an `UNAVAILABLE` call).
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
    let endpoint = |addr: &str| -> Result<Endpoint, tonic::transport::Error> {
        Endpoint::from_shared(addr.trim().to_owned())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tls_config(tls.clone())
    };
    let addrs: Vec<&str> = node_addr
        .split(',')
        .filter(|a| !a.trim().is_empty())
        .collect();
    let channel = if addrs.len() > 1 {
        let endpoints = addrs
            .iter()
            .map(|a| endpoint(a))
            .collect::<Result<Vec<_>, _>>()?;
        Channel::balance_list(endpoints.into_iter())
    } else {
        endpoint(node_addr)?.connect().await?
    };
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

/// Decodes the [`Grant`] a signed grant carries, without checking its signature (only nodes can do that: they
/// know the issuers' keys).
pub fn decode_grant(signed: &SignedGrant) -> Result<Grant, prost::DecodeError> {
    Grant::decode(signed.grant.as_slice())
}

/// Reads a grant file: the prost encoding of a [`SignedGrant`], as [`write_signed_grant`] writes it.
///
/// Fails with [`io::ErrorKind::InvalidData`] when the file does not decode, lacks the grant bytes or the
/// signature, or its grant bytes are not a [`Grant`] with an id.
pub fn read_signed_grant(path: &Path) -> io::Result<SignedGrant> {
    let bytes = std::fs::read(path)?;
    let invalid = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a signed grant file: {why}", path.display()),
        )
    };
    let signed = SignedGrant::decode(bytes.as_slice()).map_err(|e| invalid(e.to_string()))?;
    if signed.grant.is_empty() || signed.signature.is_empty() {
        return Err(invalid("it has no grant or no signature".to_owned()));
    }
    let grant =
        decode_grant(&signed).map_err(|e| invalid(format!("its grant does not decode: {e}")))?;
    if grant.id.is_empty() {
        return Err(invalid("its grant has no id".to_owned()));
    }
    Ok(signed)
}

/// Writes a grant file: the prost encoding of `grant`, which [`read_signed_grant`] reads back.
pub fn write_signed_grant(path: &Path, grant: &SignedGrant) -> io::Result<()> {
    std::fs::write(path, grant.encode_to_vec())
}

/// One record as a single line of JSON (no trailing newline): an object of its fields in name order.
pub fn record_json(record: &Record) -> String {
    let mut values: Vec<_> = record.values.iter().collect();
    values.sort();
    let object = values
        .into_iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed() -> SignedGrant {
        let grant = Grant {
            id: "350102-g-7".into(),
            consumer_uscc: "113501030000000018".into(),
            resource_id: "350102:marriage".into(),
            fields: vec!["marital_status".into()],
            ..Grant::default()
        };
        SignedGrant {
            grant: grant.encode_to_vec(),
            signature: vec![7; 64],
            public_key: vec![9; 32],
            key_endorsement: None,
        }
    }

    #[test]
    fn grant_files_round_trip() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("grant.bin");
        write_signed_grant(&path, &signed()).unwrap_or_else(|e| panic!("{e}"));
        let back = read_signed_grant(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, signed());
        let grant = decode_grant(&back).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(grant.id, "350102-g-7");
        assert_eq!(grant.fields, ["marital_status"]);
    }

    #[test]
    fn bad_grant_files_are_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let missing = read_signed_grant(&dir.path().join("none"));
        assert!(missing.is_err_and(|e| e.kind() == io::ErrorKind::NotFound));

        let cases: [(&str, Vec<u8>); 3] = [
            ("empty", Vec::new()),
            ("pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n".to_vec()),
            (
                "unsigned",
                SignedGrant {
                    signature: Vec::new(),
                    ..signed()
                }
                .encode_to_vec(),
            ),
        ];
        for (name, bytes) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
            let err = read_signed_grant(&path);
            assert!(
                err.as_ref()
                    .is_err_and(|e| e.kind() == io::ErrorKind::InvalidData),
                "{name}: {err:?}"
            );
        }
    }

    #[test]
    fn records_become_sorted_json_lines() {
        let record = Record {
            values: [
                ("name", "张*"),
                ("id_number", "350102********1234"),
                ("note", "a \"quoted\"\nline"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        };
        let line = record_json(&record);
        assert_eq!(
            line,
            r#"{"id_number":"350102********1234","name":"张*","note":"a \"quoted\"\nline"}"#
        );
        assert!(!line.contains('\n'));
        assert_eq!(record_json(&Record::default()), "{}");
    }
}

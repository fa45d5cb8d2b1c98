//! A dishonest node for adversarial tests: it holds a valid node certificate from the federation CA and uses the
//! project's own signing code, but writes whatever it likes into envelopes, assertions and notices.

use anyhow::{Result, bail};
use fedgate_gateway::assertion::assertion_for;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::IssuedCert;
use fedgate_gateway::statement::NodeSigner;
use fedgate_gateway::tls::TlsMaterial;
use fedgate_proto::v1::federation_client::FederationClient;
use fedgate_proto::v1::{Envelope, ForwardRequest, Hop, RequestKind, ShareMode, SignedStatement};
use prost::Message;
use tonic::transport::Channel;

use crate::{Devnet, code};

/// A node that lies, holding a valid certificate for its code.
pub struct RogueNode {
    code: String,
    cert: IssuedCert,
    signer: NodeSigner,
    agency_certificate: Vec<u8>,
}

impl RogueNode {
    /// A rogue with a fresh certificate for node `code` issued by the federation's CA.
    pub fn new(net: &Devnet, node: &str) -> Result<Self> {
        let cert = net.ca().issue(&Peer::Node(code(node)), &[])?;
        let signer = NodeSigner::from_material(&TlsMaterial {
            ca_pem: net.ca().ca_pem(),
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.clone(),
        })?;
        Ok(Self {
            code: node.to_owned(),
            cert,
            signer,
            agency_certificate: Vec::new(),
        })
    }

    /// The rogue puts `cert_pem` (an agency's certificate, which is public) into the assertions it signs.
    pub fn presenting(mut self, cert_pem: &str) -> Result<Self> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        self.agency_certificate = CertificateDer::from_pem_slice(cert_pem.as_bytes())?.to_vec();
        Ok(self)
    }

    /// The rogue's certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.cert.cert_pem
    }

    /// The rogue's own signer, for statements it makes in its own name.
    pub fn signer(&self) -> &NodeSigner {
        &self.signer
    }

    /// A Federation client of node `neighbour`, presenting the rogue's certificate.
    pub async fn federation(
        &self,
        net: &Devnet,
        neighbour: &str,
    ) -> Result<FederationClient<Channel>> {
        crate::federation_client(net, neighbour, &self.cert).await
    }

    /// An envelope for a share of `resource` held at `target`, claiming `consumer_uscc` at `consumer_node`,
    /// with a route that starts at the consumer's node and ends at the rogue.
    pub fn envelope(
        &self,
        request_id: &str,
        (resource, target): (&str, &str),
        (consumer_uscc, consumer_node): (&str, &str),
    ) -> Envelope {
        let mut route = vec![Hop {
            node_code: consumer_node.to_owned(),
            seen_peer: format!("urn:fedgate:agency:{consumer_uscc}"),
            action: "received".into(),
            elapsed_us: 0,
        }];
        if consumer_node != self.code {
            route.push(Hop {
                node_code: self.code.clone(),
                seen_peer: format!("urn:fedgate:node:{consumer_node}"),
                action: "forwarded-up".into(),
                elapsed_us: 0,
            });
        }
        Envelope {
            request_id: request_id.to_owned(),
            resource_id: resource.to_owned(),
            target_node: target.to_owned(),
            consumer_uscc: consumer_uscc.to_owned(),
            consumer_node: consumer_node.to_owned(),
            route,
            hops_left: 6,
            timeout_ms: 5_000,
            purpose: String::new(),
            mode: ShareMode::Query as i32,
            kind: RequestKind::Share as i32,
            ..Default::default()
        }
    }

    /// The assertion the rogue signs in its own name for `env` and `request`, issued at `issued_at_ms`; the
    /// consumer node it names is whatever the envelope says.
    pub fn assert(
        &self,
        env: &Envelope,
        request: &[u8],
        issued_at_ms: i64,
    ) -> Result<SignedStatement> {
        let a = assertion_for(env, request, &self.agency_certificate, issued_at_ms);
        Ok(self.signer.sign(&a)?)
    }

    /// A Forward request of `env` carrying `request`.
    pub fn forward(env: Envelope, request: &impl Message) -> ForwardRequest {
        ForwardRequest {
            envelope: Some(env),
            request: request.encode_to_vec(),
        }
    }
}

/// Milliseconds since the Unix epoch by the federation's clock.
pub fn now_ms(net: &Devnet) -> i64 {
    use fedgate_gateway::clock::Clock;
    let t = net.clock().now();
    t.unix_timestamp() * 1000 + i64::from(t.millisecond())
}

/// Asserts that `node` wrote a record with `outcome` whose detail contains `needle`.
pub async fn assert_audited(net: &Devnet, node: &str, outcome: &str, needle: &str) -> Result<()> {
    let rows = crate::own_audit_records(net, node).await?;
    let found: Vec<_> = rows.iter().filter(|r| r.outcome == outcome).collect();
    if found.iter().any(|r| r.detail.contains(needle)) {
        return Ok(());
    }
    bail!(
        "node {node} holds no {outcome} record mentioning {needle:?}; it holds: {:?}",
        found.iter().map(|r| &r.detail).collect::<Vec<_>>()
    )
}

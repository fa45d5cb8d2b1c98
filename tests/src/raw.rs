//! Raw gRPC calls: any bytes as a request body, over a real TLS channel to a node, for tests that send what no
//! generated client would (malformed framing, undecodable messages, fuzzed bodies).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::IssuedCert;
use fedgate_gateway::tls::{TlsMaterial, client_tls};
use http_body_util::{BodyExt, Full};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::{Devnet, code};

/// A channel to one listener of a devnet node, on which any body can be sent.
#[derive(Clone)]
pub struct RawChannel {
    channel: Channel,
    authority: String,
}

/// How a raw call ended.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The gRPC status (OK for a successful call).
    pub code: Code,
    /// Its message.
    pub message: String,
}

impl RawChannel {
    /// The mTLS listener of `node`, presenting `cert`.
    pub fn node(net: &Devnet, node: &str, cert: &IssuedCert) -> Result<Self> {
        let tls = TlsMaterial {
            ca_pem: net.ca().ca_pem(),
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.clone(),
        };
        let url = net.node_url(code(node))?;
        let channel = Endpoint::from_shared(url.clone())?
            .tls_config(client_tls(&tls, &Peer::Node(code(node))))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self {
            channel,
            authority: url,
        })
    }

    /// The province's public open-data listener, without a client certificate.
    pub fn open_data(net: &Devnet) -> Result<Self> {
        let addr = net
            .node(code("350000"))?
            .open_data_addr()
            .context("the province runs the open-data endpoint")?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(net.ca().ca_pem()))
            .domain_name("350000.node.fedgate");
        let url = format!("https://{addr}");
        let channel = Endpoint::from_shared(url.clone())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self {
            channel,
            authority: url,
        })
    }

    /// Sends `body` as it is (framing included) to `path` ("/fedgate.v1.Agency/Share") and reads the whole
    /// answer within `timeout`; fails if no answer comes in time.
    pub async fn call(&self, path: &str, body: Bytes, timeout: Duration) -> Result<Answer> {
        let uri = format!("{}{path}", self.authority);
        let req = http::Request::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", format!("{}m", timeout.as_millis()))
            .body(tonic::body::Body::new(Full::new(body)))?;
        let channel = self.channel.clone();
        let exchange = async move {
            let resp = channel.oneshot(req).await?;
            if let Some(s) = Status::from_header_map(resp.headers()) {
                return Ok::<_, anyhow::Error>(answer(&s));
            }
            let collected = resp.into_body().collect().await;
            let trailers = match collected {
                Ok(c) => c.trailers().cloned(),
                Err(status) => return Ok(answer(&status)),
            };
            match trailers.as_ref().and_then(Status::from_header_map) {
                Some(s) => Ok(answer(&s)),
                None => bail!("the answer to {path} carries no grpc-status"),
            }
        };
        match tokio::time::timeout(timeout + Duration::from_secs(5), exchange).await {
            Ok(r) => r,
            Err(_) => bail!("{path} did not answer within {timeout:?} and a grace period"),
        }
    }
}

fn answer(s: &Status) -> Answer {
    Answer {
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// `message` framed as one uncompressed gRPC message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
    Bytes::from(out)
}

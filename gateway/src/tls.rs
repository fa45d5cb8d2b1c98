//! Mutual TLS for the backbone: rustls server configurations, the tonic client configuration, and the
//! handshakes [`crate::accept::incoming`] runs on each connection: [`MutualTls`] verifies the client's
//! certificate and attaches the verified [`Peer`] to every request as [`PeerInfo`]; [`ServerTls`] (the
//! open-data listener) asks for no client certificate.
//!
//! Reading the caller's identity in a handler (or interceptor): [`peer_info`]. tonic inserts the
//! `Connected::ConnectInfo` of the IO type into each request's extensions as-is when the server has no
//! `tls_config` of its own; so do **not** also call `Server::builder().tls_config(..)`. With these streams
//! `Request::remote_addr()` and `Request::peer_certs()` return `None` (they look for tonic's own
//! `TcpConnectInfo`/`TlsConnectInfo`); use `PeerInfo::remote` or [`client_addr`] instead.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::accept::{ConnInfo, Handshake};
use crate::ident::{IdentError, Peer};
use crate::pki;

pub mod dynamic;
pub mod live;
pub mod reload;
pub mod trust;
mod watch;

/// The URI SAN prefix that marks a fedgate identity.
const FEDGATE_URI_PREFIX: &str = "urn:fedgate:";

/// Why TLS material, a TLS configuration or a peer certificate was rejected.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    ReadFile {
        /// Which file: "CA certificate", "certificate" or "private key".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A PEM file was read but holds no usable item of the expected kind.
    #[error("{what} file {} is unusable: {reason}", path.display())]
    BadFile {
        /// Which file: "CA certificate", "certificate" or "private key".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// PEM text held no usable item of the expected kind.
    #[error("{what} PEM is unusable: {reason}")]
    Pem {
        /// Which PEM: "CA certificate", "certificate" or "private key".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA certificate could not be used as a trust anchor.
    #[error("CA certificate cannot be used as a trust anchor: {reason}")]
    TrustAnchor {
        /// Why webpki rejected it.
        reason: String,
    },
    /// The client certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {reason}")]
    Verifier {
        /// Why it failed.
        reason: String,
    },
    /// rustls rejected the configuration (e.g. the key does not match the certificate).
    #[error("rustls rejected the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// A peer certificate is not valid X.509 DER.
    #[error("peer certificate is not valid X.509: {reason}")]
    CertParse {
        /// The parser's complaint.
        reason: String,
    },
    /// A peer certificate carries no `urn:fedgate:` URI SAN.
    #[error("certificate {subject:?} has no urn:fedgate: URI SAN naming a node or agency")]
    NoPeerUri {
        /// The certificate's subject.
        subject: String,
    },
    /// A peer certificate carries several `urn:fedgate:` URI SANs.
    #[error(
        "certificate {subject:?} has several urn:fedgate: URI SANs {uris:?}; exactly one is allowed"
    )]
    MultiplePeerUris {
        /// The certificate's subject.
        subject: String,
        /// The URIs found.
        uris: Vec<String>,
    },
    /// A peer certificate's fedgate URI SAN is malformed.
    #[error("certificate has an invalid fedgate identity: {0}")]
    Identity(#[from] IdentError),
    /// The client completed the handshake without a certificate.
    #[error("the client presented no certificate")]
    NoPeerCertificate,
    /// The client's certificate was revoked by the federation.
    #[error("the client certificate {serial} is revoked")]
    Revoked {
        /// Its serial number, hex.
        serial: String,
    },
}

/// The CA, certificate and key (all PEM) a node or agency uses for mutual TLS.
#[derive(Clone)]
pub struct TlsMaterial {
    /// Trust anchor(s), PEM.
    pub ca_pem: String,
    /// Own certificate chain (leaf first), PEM.
    pub cert_pem: String,
    /// Own private key, PEM.
    pub key_pem: String,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Parses every certificate in `pem`; `what` names it in errors.
fn parse_certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "no CERTIFICATE block found where a {what} was expected"
        ));
    }
    Ok(certs)
}

/// Parses the first private key in `pem`.
fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no PRIVATE KEY block (PKCS#8, PKCS#1 or SEC1) found".to_owned()
        }
        other => format!("malformed PEM: {other}"),
    })
}

impl TlsMaterial {
    /// Reads and sanity-checks the three PEM files; errors name the offending file.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| TlsError::ReadFile {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let bad = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |reason: String| TlsError::BadFile { what, path, reason }
        };
        let ca_pem = read("CA certificate", ca)?;
        parse_certs("CA certificate", &ca_pem).map_err(bad("CA certificate", ca))?;
        let cert_pem = read("certificate", cert)?;
        parse_certs("certificate", &cert_pem).map_err(bad("certificate", cert))?;
        let key_pem = read("private key", key)?;
        parse_key(&key_pem).map_err(bad("private key", key))?;
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// The identity in this material's own (leaf) certificate.
    pub fn own_peer(&self) -> Result<Peer, TlsError> {
        let certs = parse_certs("certificate", &self.cert_pem).map_err(|reason| TlsError::Pem {
            what: "certificate",
            reason,
        })?;
        match certs.first() {
            Some(leaf) => peer_from_cert(leaf),
            None => Err(TlsError::Pem {
                what: "certificate",
                reason: "no certificate".to_owned(),
            }),
        }
    }
}

/// The ring crypto provider, passed explicitly so that no process-wide default is needed.
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server configuration that requires a client certificate issued by `m.ca_pem`,
/// presents `m.cert_pem`/`m.key_pem`, and offers ALPN `h2`.
pub fn server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_err = |what: &'static str| move |reason: String| TlsError::Pem { what, reason };
    let mut roots = rustls::RootCertStore::empty();
    for ca in parse_certs("CA certificate", &m.ca_pem).map_err(pem_err("CA certificate"))? {
        roots.add(ca).map_err(|e| TlsError::TrustAnchor {
            reason: e.to_string(),
        })?;
    }
    let chain = parse_certs("certificate", &m.cert_pem).map_err(pem_err("certificate"))?;
    let key = parse_key(&m.key_pem).map_err(pem_err("private key"))?;

    let provider = ring_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier {
            reason: e.to_string(),
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls server configuration presenting `m.cert_pem`/`m.key_pem` without asking for a client certificate
/// (the public open-data listener), offering ALPN `h2`.
pub fn public_server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_err = |what: &'static str| move |reason: String| TlsError::Pem { what, reason };
    let chain = parse_certs("certificate", &m.cert_pem).map_err(pem_err("certificate"))?;
    let key = parse_key(&m.key_pem).map_err(pem_err("private key"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A tonic client TLS configuration presenting `m`'s certificate, trusting `m.ca_pem`, and
/// verifying that the server's certificate names `server` (via [`pki::server_name`]).
pub fn client_tls(m: &TlsMaterial, server: &Peer) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&m.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &m.cert_pem,
            &m.key_pem,
        ))
        .domain_name(pki::server_name(server))
}

/// The fedgate identity in a DER certificate: its single `urn:fedgate:` URI SAN.
pub fn peer_from_cert(der: &[u8]) -> Result<Peer, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::CertParse {
        reason: e.to_string(),
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::CertParse {
            reason: format!("bad subjectAltName extension: {e}"),
        })?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with(FEDGATE_URI_PREFIX) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => Ok(Peer::from_uri(uri)?),
        [] => Err(TlsError::NoPeerUri {
            subject: cert.subject().to_string(),
        }),
        many => Err(TlsError::MultiplePeerUris {
            subject: cert.subject().to_string(),
            uris: many.iter().map(|u| (*u).to_owned()).collect(),
        }),
    }
}

/// Who is on the other end of an accepted mutual-TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The identity verified from the client certificate.
    pub peer: Peer,
    /// The client's socket address.
    pub remote: SocketAddr,
    /// The client's certificate (DER), as verified.
    pub certificate: Arc<[u8]>,
    /// The chain the client sent after its certificate, to verify it again after a reload.
    pub intermediates: Arc<[rustls::pki_types::CertificateDer<'static>]>,
    /// For an agency, the node its certificate says it is registered at.
    pub registered_at: Option<crate::ident::DivisionCode>,
}

/// The node an agency's certificate says the agency is registered at (its subject's organizational unit).
pub fn registered_node(der: &[u8]) -> Option<crate::ident::DivisionCode> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let ou = cert.subject().iter_organizational_unit().next()?;
    ou.as_str().ok()?.parse().ok()
}

/// The verified caller of a request served over [`MutualTls`] connections, if any.
pub fn peer_info<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    peer_info_in(req.extensions())
}

/// The verified caller in a request's extensions, for layers that see the HTTP request rather than tonic's.
pub fn peer_info_in(ext: &http::Extensions) -> Option<&PeerInfo> {
    ext.get::<ConnInfo<PeerInfo>>()
        .map(|c| &c.info)
        .or_else(|| ext.get::<PeerInfo>())
}

/// The client address of a request served over connections admitted by [`crate::accept::incoming`].
pub fn client_addr<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<ConnInfo<PeerInfo>>()
        .map(|c| c.remote)
        .or_else(|| ext.get::<ConnInfo<()>>().map(|c| c.remote))
        .or_else(|| ext.get::<PeerInfo>().map(|p| p.remote))
        .or_else(|| req.remote_addr())
}

/// A refused incoming connection, reported to the `on_refused` callback of [`crate::accept::incoming`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeFailure {
    /// The TLS handshake failed (bad or untrusted client certificate, protocol error, ...).
    #[error("TLS handshake with {remote} failed: {error}")]
    Tls {
        /// The client's address.
        remote: SocketAddr,
        /// What went wrong.
        error: String,
    },
    /// The handshake succeeded but the client certificate names no valid fedgate identity.
    #[error("client {remote} has no usable fedgate identity: {error}")]
    Identity {
        /// The client's address.
        remote: SocketAddr,
        /// What went wrong.
        error: String,
    },
    /// The client did not complete the handshake within the timeout.
    #[error("TLS handshake with {remote} timed out")]
    Timeout {
        /// The client's address.
        remote: SocketAddr,
    },
    /// The connection was closed at once: its source, or the listener, was at a cap.
    #[error("connection from {remote} closed at once: {limit}")]
    OverCap {
        /// The client's address.
        remote: SocketAddr,
        /// Which cap was full.
        limit: String,
    },
}

impl HandshakeFailure {
    /// The address of the refused client.
    pub fn remote(&self) -> SocketAddr {
        match self {
            HandshakeFailure::Tls { remote, .. }
            | HandshakeFailure::Identity { remote, .. }
            | HandshakeFailure::Timeout { remote }
            | HandshakeFailure::OverCap { remote, .. } => *remote,
        }
    }

    /// The kind of refusal, as a metric label: `tls_error` (bad or untrusted certificate, protocol error, closed
    /// mid-handshake), `no_identity`, `timeout` or `over_cap`.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeFailure::Tls { .. } => "tls_error",
            HandshakeFailure::Identity { .. } => "no_identity",
            HandshakeFailure::Timeout { .. } => "timeout",
            HandshakeFailure::OverCap { .. } => "over_cap",
        }
    }
}

/// The handshake of the backbone listener: TLS with a client certificate from the federation's CA that names
/// a fedgate identity.
#[derive(Clone)]
pub struct MutualTls(
    TlsAcceptor,
    crate::statement::RevokedSerials,
    live::LiveConnections,
);

impl MutualTls {
    /// Handshakes under `config` (from [`server_config`]), refusing client certificates in `revoked`.
    pub fn new(
        config: Arc<rustls::ServerConfig>,
        revoked: crate::statement::RevokedSerials,
    ) -> Self {
        Self(TlsAcceptor::from(config), revoked, Default::default())
    }

    /// The connections this handshake has admitted that are still open.
    pub fn live(&self) -> &live::LiveConnections {
        &self.2
    }
}

impl Handshake for MutualTls {
    type Io = TlsStream<TcpStream>;
    type Info = PeerInfo;

    async fn handshake(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> Result<(Self::Io, PeerInfo), HandshakeFailure> {
        let stream = self
            .0
            .accept(tcp)
            .await
            .map_err(|e| HandshakeFailure::Tls {
                remote,
                error: e.to_string(),
            })?;
        let identity = match stream.get_ref().1.peer_certificates() {
            Some([leaf, rest @ ..]) => match self.1.revoked(leaf) {
                Some(serial) => Err(TlsError::Revoked { serial }),
                None => peer_from_cert(leaf).map(|peer| {
                    let rest: Arc<[_]> = rest.iter().map(|c| c.clone().into_owned()).collect();
                    (peer, Arc::<[u8]>::from(leaf.as_ref()), rest)
                }),
            },
            _ => Err(TlsError::NoPeerCertificate),
        };
        match identity {
            Ok((peer, certificate, intermediates)) => {
                tracing::debug!(%peer, %remote, "mutual TLS connection established");
                let registered_at = registered_node(&certificate);
                Ok((
                    stream,
                    PeerInfo {
                        peer,
                        remote,
                        certificate,
                        intermediates,
                        registered_at,
                    },
                ))
            }
            Err(e) => Err(HandshakeFailure::Identity {
                remote,
                error: e.to_string(),
            }),
        }
    }

    fn established(&self, conn: &crate::accept::ConnInfo<PeerInfo>) {
        self.2.add(conn);
    }
}

/// The handshake of the open-data listener: TLS with the node's certificate, no client certificate.
#[derive(Clone)]
pub struct ServerTls(TlsAcceptor);

impl ServerTls {
    /// Handshakes under `config` (from [`public_server_config`]).
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        Self(TlsAcceptor::from(config))
    }
}

impl Handshake for ServerTls {
    type Io = TlsStream<TcpStream>;
    type Info = ();

    async fn handshake(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> Result<(Self::Io, ()), HandshakeFailure> {
        let stream = self
            .0
            .accept(tcp)
            .await
            .map_err(|e| HandshakeFailure::Tls {
                remote,
                error: e.to_string(),
            })?;
        Ok((stream, ()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::{self, ConnectionsConfig, ListenerLimits};
    use crate::ident::DivisionCode;
    use crate::pki::{DevCa, IssuedCert};
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, SanType};
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, mpsc::UnboundedReceiver, oneshot};
    use tonic::transport::{Channel, Server};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::health_server::HealthServer;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_health::server::{HealthReporter, HealthService};

    fn install_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    fn node(code: &str) -> Peer {
        Peer::Node(code.parse::<DivisionCode>().unwrap())
    }

    fn material(ca: &DevCa, cert: &IssuedCert) -> TlsMaterial {
        TlsMaterial {
            ca_pem: ca.ca_pem(),
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.clone(),
        }
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    /// A leaf from `ca` with custom URI SANs (for identity-failure cases).
    fn leaf_with_uris(ca: &DevCa, uris: &[&str]) -> IssuedCert {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "odd certificate");
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params
            .subject_alt_names
            .push(SanType::DnsName("localhost".try_into().unwrap()));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(30);
        ca.sign(&params, "odd certificate").unwrap()
    }

    /// The backbone's default limits with a handshake timeout of `timeout`.
    fn limits(timeout: Duration) -> ListenerLimits {
        ListenerLimits {
            handshake_timeout: timeout,
            ..ConnectionsConfig::default().backbone()
        }
    }

    struct TestServer {
        addr: SocketAddr,
        failures: UnboundedReceiver<HandshakeFailure>,
        seen: Arc<Mutex<Vec<PeerInfo>>>,
        shutdown: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl TestServer {
        async fn start(server: &TlsMaterial, limits: ListenerLimits) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (fail_tx, failures) = mpsc::unbounded_channel();
            let on_failure: accept::OnRefused = Arc::new(move |f| {
                let _ = fail_tx.send(f);
            });
            let stream = accept::incoming(
                listener,
                MutualTls::new(server_config(server).unwrap(), Default::default()),
                limits,
                on_failure,
            );
            let seen = Arc::new(Mutex::new(Vec::new()));
            let seen2 = seen.clone();
            let health = HealthServer::with_interceptor(
                HealthService::from_health_reporter(HealthReporter::new()),
                move |req: tonic::Request<()>| {
                    let info = peer_info(&req)
                        .cloned()
                        .ok_or_else(|| tonic::Status::unauthenticated("no PeerInfo"))?;
                    seen2.lock().unwrap().push(info);
                    Ok(req)
                },
            );
            let (shutdown, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(
                Server::builder()
                    .add_service(health)
                    .serve_with_incoming_shutdown(stream, async {
                        let _ = rx.await;
                    }),
            );
            TestServer {
                addr,
                failures,
                seen,
                shutdown: Some(shutdown),
                task,
            }
        }

        async fn next_failure(&mut self) -> HandshakeFailure {
            tokio::time::timeout(Duration::from_secs(15), self.failures.recv())
                .await
                .expect("no handshake failure reported before the deadline")
                .expect("failure channel closed")
        }

        async fn stop(mut self) {
            if let Some(tx) = self.shutdown.take() {
                let _ = tx.send(());
            }
            tokio::time::timeout(Duration::from_secs(15), self.task)
                .await
                .expect("server did not shut down")
                .unwrap()
                .unwrap();
        }
    }

    async fn health_check(
        addr: SocketAddr,
        client: &TlsMaterial,
        server: &Peer,
    ) -> Result<ServingStatus, String> {
        let channel = Channel::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(client_tls(client, server))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| format!("call: {e:?}"))?;
        Ok(resp.into_inner().status())
    }

    #[tokio::test]
    async fn mutual_tls_health_check_sees_client_identity() {
        install_provider();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let server_peer = node("350100");
        let server = material(&ca, &ca.issue(&server_peer, &[]).unwrap());
        let client = material(&ca, &ca.issue(&node("350102"), &[]).unwrap());
        let mut srv = TestServer::start(&server, limits(Duration::from_secs(10))).await;

        // A client that connects but never speaks TLS must not hold up others.
        let _silent = TcpStream::connect(srv.addr).await.unwrap();

        let status = health_check(srv.addr, &client, &server_peer).await.unwrap();
        assert_eq!(status, ServingStatus::Serving);
        let seen = srv.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].peer, node("350102"));
        assert!(seen[0].remote.ip().is_loopback());
        assert!(srv.failures.try_recv().is_err());

        // The client pins the server's identity: expecting another node fails.
        let err = health_check(srv.addr, &client, &node("350200"))
            .await
            .unwrap_err();
        assert!(err.contains("connect"), "{err}");
        srv.stop().await;
    }

    #[tokio::test]
    async fn client_from_foreign_ca_is_rejected() {
        install_provider();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let rogue = DevCa::generate("fedgate test CA").unwrap();
        let server_peer = node("350100");
        let server = material(&ca, &ca.issue(&server_peer, &[]).unwrap());
        // Trusts the real CA (so it accepts the server) but presents a rogue-issued certificate.
        let mut client = material(&ca, &rogue.issue(&node("350102"), &[]).unwrap());
        client.ca_pem = ca.ca_pem();
        let mut srv = TestServer::start(&server, limits(Duration::from_secs(10))).await;

        let err = health_check(srv.addr, &client, &server_peer)
            .await
            .unwrap_err();
        assert!(!err.is_empty());
        let failure = srv.next_failure().await;
        assert!(
            matches!(&failure, HandshakeFailure::Tls { error, .. } if error.contains("certificate")),
            "{failure:?}"
        );
        assert!(failure.remote().ip().is_loopback());
        assert!(srv.seen.lock().unwrap().is_empty());

        // The stream survives failures: a good client still gets through.
        let good = material(&ca, &ca.issue(&node("350102"), &[]).unwrap());
        assert_eq!(
            health_check(srv.addr, &good, &server_peer).await.unwrap(),
            ServingStatus::Serving
        );
        srv.stop().await;
    }

    #[tokio::test]
    async fn client_without_fedgate_identity_is_dropped() {
        install_provider();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let server_peer = node("350100");
        let server = material(&ca, &ca.issue(&server_peer, &[]).unwrap());
        let client = material(&ca, &leaf_with_uris(&ca, &["https://example.org/"]));
        let mut srv = TestServer::start(&server, limits(Duration::from_secs(10))).await;

        assert!(health_check(srv.addr, &client, &server_peer).await.is_err());
        let failure = srv.next_failure().await;
        assert!(
            matches!(&failure, HandshakeFailure::Identity { error, .. } if error.contains("no urn:fedgate:")),
            "{failure:?}"
        );
        assert!(srv.seen.lock().unwrap().is_empty());
        srv.stop().await;
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        install_provider();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let server = material(&ca, &ca.issue(&node("350100"), &[]).unwrap());
        let mut srv = TestServer::start(&server, limits(Duration::from_millis(200))).await;
        let silent = TcpStream::connect(srv.addr).await.unwrap();
        let failure = srv.next_failure().await;
        assert_eq!(
            failure,
            HandshakeFailure::Timeout {
                remote: silent.local_addr().unwrap()
            }
        );
        assert!(failure.to_string().contains("timed out"));
        srv.stop().await;
    }

    /// A TCP connection to `addr` from the loopback address `from`.
    async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((from, 0)))
            .expect("bind a loopback source address");
        socket.connect(addr).await.unwrap()
    }

    #[tokio::test]
    async fn connections_over_a_source_cap_are_closed_at_once_and_others_still_get_in() {
        install_provider();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let server_peer = node("350100");
        let server = material(&ca, &ca.issue(&server_peer, &[]).unwrap());
        let client = material(&ca, &ca.issue(&node("350102"), &[]).unwrap());
        let mut srv = TestServer::start(
            &server,
            ListenerLimits {
                max_pending_per_source: 4,
                ..limits(Duration::from_secs(30))
            },
        )
        .await;
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push(connect_from([127, 0, 0, 2], srv.addr).await);
        }
        // The fifth from the same source is closed without a handshake: the read sees end of file.
        let mut over = connect_from([127, 0, 0, 2], srv.addr).await;
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(&mut over, &mut byte),
        )
        .await
        .expect("closed before the deadline")
        .unwrap_or(0);
        assert_eq!(n, 0);
        let failure = srv.next_failure().await;
        assert_eq!(failure.reason(), "over_cap", "{failure}");
        assert!(failure.to_string().contains("per source"), "{failure}");
        // Another source is not held up by the silent four.
        let status = health_check(srv.addr, &client, &server_peer).await.unwrap();
        assert_eq!(status, ServingStatus::Serving);
        drop(silent);
        srv.stop().await;
    }

    #[tokio::test]
    async fn an_established_connection_without_calls_is_closed_after_the_idle_timeout() {
        install_provider();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let server_peer = node("350100");
        let server = material(&ca, &ca.issue(&server_peer, &[]).unwrap());
        let client = material(&ca, &ca.issue(&node("350102"), &[]).unwrap());
        let srv = TestServer::start(
            &server,
            ListenerLimits {
                idle_timeout: Some(Duration::from_millis(300)),
                ..limits(Duration::from_secs(10))
            },
        )
        .await;
        let tcp = TcpStream::connect(srv.addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder_with_provider(ring_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates({
                    let mut roots = rustls::RootCertStore::empty();
                    roots
                        .add(CertificateDer::from_pem_slice(ca.ca_pem().as_bytes()).unwrap())
                        .unwrap();
                    roots
                })
                .with_client_auth_cert(
                    parse_certs("certificate", &client.cert_pem).unwrap(),
                    parse_key(&client.key_pem).unwrap(),
                )
                .unwrap(),
        ));
        let name = rustls::pki_types::ServerName::try_from(pki::server_name(&server_peer)).unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        // The server closes the connection it never got a call on; reading sees the end.
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the idle connection must be closed");
        srv.stop().await;
    }

    #[test]
    fn peer_from_client_certificate() {
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let client = ca.issue(&node("350102"), &[]).unwrap();
        assert_eq!(
            peer_from_cert(&der(&client.cert_pem)).unwrap(),
            node("350102")
        );
        let agency = Peer::Agency("91350100M000100Y43".parse().unwrap());
        let issued = ca.issue(&agency, &[]).unwrap();
        assert_eq!(peer_from_cert(&der(&issued.cert_pem)).unwrap(), agency);
        let m = material(&ca, &client);
        assert_eq!(m.own_peer().unwrap(), node("350102"));

        let none = leaf_with_uris(&ca, &["https://example.org/"]);
        assert!(matches!(
            peer_from_cert(&der(&none.cert_pem)),
            Err(TlsError::NoPeerUri { .. })
        ));
        let two = leaf_with_uris(&ca, &["urn:fedgate:node:350100", "urn:fedgate:node:350102"]);
        let e = peer_from_cert(&der(&two.cert_pem)).unwrap_err();
        assert!(
            matches!(&e, TlsError::MultiplePeerUris { uris, .. } if uris.len() == 2),
            "{e}"
        );
        let bad = leaf_with_uris(&ca, &["urn:fedgate:node:350001"]);
        let e = peer_from_cert(&der(&bad.cert_pem)).unwrap_err();
        assert!(matches!(e, TlsError::Identity(_)), "{e}");
        assert!(e.to_string().contains("350001"), "{e}");
        assert!(matches!(
            peer_from_cert(b"not a certificate"),
            Err(TlsError::CertParse { .. })
        ));
    }

    #[test]
    fn load_material_and_build_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let issued = ca.issue(&node("350100"), &[]).unwrap();
        let (crt, key) = pki::write_pem_files(dir.path(), "350100", &issued).unwrap();
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, ca.ca_pem()).unwrap();

        let m = TlsMaterial::load(&ca_path, &crt, &key).unwrap();
        assert_eq!(m.cert_pem, issued.cert_pem);
        assert!(!format!("{m:?}").contains("PRIVATE KEY"));
        let config = server_config(&m).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);

        let missing = dir.path().join("missing.crt");
        let e = TlsMaterial::load(&missing, &crt, &key).unwrap_err();
        assert!(matches!(
            e,
            TlsError::ReadFile {
                what: "CA certificate",
                ..
            }
        ));
        assert!(e.to_string().contains("missing.crt"), "{e}");
        // A key where the certificate should be, and vice versa.
        let e = TlsMaterial::load(&ca_path, &key, &key).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::BadFile {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("350100.key"), "{e}");
        let e = TlsMaterial::load(&ca_path, &crt, &crt).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::BadFile {
                    what: "private key",
                    ..
                }
            ),
            "{e}"
        );

        // A key that does not belong to the certificate is refused by rustls.
        let other = ca.issue(&node("350102"), &[]).unwrap();
        let mismatched = TlsMaterial {
            key_pem: other.key_pem,
            ..m.clone()
        };
        assert!(matches!(
            server_config(&mismatched),
            Err(TlsError::Config(_))
        ));
        let no_ca = TlsMaterial {
            ca_pem: String::new(),
            ..m
        };
        assert!(matches!(
            server_config(&no_ca),
            Err(TlsError::Pem {
                what: "CA certificate",
                ..
            })
        ));
    }
}

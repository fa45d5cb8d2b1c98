//! TLS whose certificate, trust bundle and revocation lists change while the node runs.
//!
//! One [`DynamicTls`] per node holds the material in use ([`TrustState`]); rustls asks it at every handshake
//! (a [`ResolvesServerCert`] and [`ResolvesClientCert`] for the node's certificate, a client-certificate
//! verifier and a server-certificate verifier built from the CA bundle and CRLs), so a reload reaches every new
//! handshake of every listener and of every outgoing connection without rebuilding either. Existing connections
//! keep the material they were made with; [`crate::topology`] opens new outgoing ones after a reload.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{TlsError, TlsMaterial, parse_certs, parse_key, ring_provider};
use crate::ident::Peer;
use crate::statement::RevokedSerials;

/// One consistent set of TLS material: the node's certificate and key, and the verifiers built from the CA
/// bundle and the certificate revocation lists.
#[derive(Clone)]
pub struct TrustState {
    key: Arc<CertifiedKey>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<dyn ServerCertVerifier>,
}

impl fmt::Debug for TrustState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustState")
            .field("chain", &self.key.cert.len())
            .finish_non_exhaustive()
    }
}

impl TrustState {
    /// Builds the state from PEM material and DER revocation lists: the key must belong to the certificate, the
    /// CA bundle must hold usable trust anchors and every CRL must parse.
    pub fn build(
        m: &TlsMaterial,
        crls: &[CertificateRevocationListDer<'static>],
    ) -> Result<Self, TlsError> {
        let pem_err = |what: &'static str| move |reason: String| TlsError::Pem { what, reason };
        let mut roots = rustls::RootCertStore::empty();
        for ca in parse_certs("CA certificate", &m.ca_pem).map_err(pem_err("CA certificate"))? {
            roots.add(ca).map_err(|e| TlsError::TrustAnchor {
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let chain = parse_certs("certificate", &m.cert_pem).map_err(pem_err("certificate"))?;
        let key = parse_key(&m.key_pem).map_err(pem_err("private key"))?;
        let provider = ring_provider();
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(TlsError::Config)?;
        let verifier = |e: String| TlsError::Verifier { reason: e };
        let mut client =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .with_crls(crls.iter().cloned());
        let mut server =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .with_crls(crls.iter().cloned());
        if !crls.is_empty() {
            // A CRL speaks for the certificates of its own CA; those of another CA in the bundle are not unknown.
            client = client
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
            server = server
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        Ok(Self {
            key: Arc::new(key),
            client_verifier: client.build().map_err(|e| verifier(e.to_string()))?,
            server_verifier: server.build().map_err(|e| verifier(e.to_string()))?,
        })
    }

    /// The node's own certificate (DER), leaf first.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.key.cert.first()
    }
}

struct Inner {
    state: ArcSwap<TrustState>,
    revoked: RevokedSerials,
    generation: watch::Sender<u64>,
    client: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
}

/// The TLS material a node uses now, shared by every listener and outgoing connection; see the module docs.
#[derive(Clone)]
pub struct DynamicTls(Arc<Inner>);

impl fmt::Debug for DynamicTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamicTls")
            .field("generation", &*self.0.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl DynamicTls {
    /// TLS starting with `state`, refusing peers whose certificates are in `revoked` (shared with the caller).
    pub fn new(state: TrustState, revoked: RevokedSerials) -> Self {
        Self(Arc::new(Inner {
            state: ArcSwap::from_pointee(state),
            revoked,
            generation: watch::channel(0).0,
            client: std::sync::OnceLock::new(),
        }))
    }

    /// TLS from PEM material without revocation lists (tests and tools).
    pub fn from_material(m: &TlsMaterial) -> Result<Self, TlsError> {
        Ok(Self::new(
            TrustState::build(m, &[])?,
            RevokedSerials::default(),
        ))
    }

    /// Uses `state` for every handshake from now on and tells the subscribers (see [`DynamicTls::subscribe`]).
    pub fn install(&self, state: TrustState) {
        self.0.state.store(Arc::new(state));
        self.0.generation.send_modify(|g| *g += 1);
    }

    /// Changes each time new material is installed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.generation.subscribe()
    }

    /// The node's own leaf certificate in use now (DER).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.0.state.load().leaf().cloned()
    }

    /// Whether a client certificate (DER) and the chain it came with still pass under the material in use now
    /// (trust bundle, CRLs, revoked serials, validity); why not, if not.
    pub fn still_trusted(
        &self,
        leaf: &[u8],
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), String> {
        if let Some(serial) = self.0.revoked.revoked(leaf) {
            return Err(format!("its serial {serial} is revoked"));
        }
        self.0
            .state
            .load()
            .client_verifier
            .verify_client_cert(&CertificateDer::from(leaf), intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The revoked serials this TLS refuses.
    pub fn revoked(&self) -> &RevokedSerials {
        &self.0.revoked
    }

    /// A server configuration that requires a client certificate from the current CA bundle, presents the
    /// current certificate and offers ALPN `h2`. Sessions are not resumed, so every connection is verified
    /// under the material in use when it is made.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(Arc::new(ClientVerifier(self.0.clone())))
            .with_cert_resolver(Arc::new(Resolver(self.0.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(config))
    }

    /// The server configuration of the console: as the open-data listener's, offering ALPN `h2` and `http/1.1`.
    pub fn console_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::clone(&*self.public_server_config()?);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The server configuration of the public open-data listener: the current certificate, no client
    /// certificate asked for, ALPN `h2`.
    pub fn public_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.0.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client configuration of every outgoing connection: the current certificate, the server's checked
    /// against the current CA bundle, CRLs and revoked serials; no session resumption.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        if let Some(c) = self.0.client.get() {
            return Ok(c.clone());
        }
        let mut config = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier(self.0.clone())))
            .with_client_cert_resolver(Arc::new(Resolver(self.0.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        Ok(self.0.client.get_or_init(|| config).clone())
    }

    /// A connector for tonic endpoints that opens TLS to `server` (pinned by [`crate::pki::server_name`]) with
    /// the material in use at each connection.
    pub fn connector(&self, server: &Peer) -> Result<Connector, TlsError> {
        let name = ServerName::try_from(crate::pki::server_name(server)).map_err(|e| {
            TlsError::Verifier {
                reason: format!("server name of {server}: {e}"),
            }
        })?;
        Ok(Connector {
            tls: tokio_rustls::TlsConnector::from(self.client_config()?),
            name,
        })
    }
}

/// Presents the node's current certificate, as a server and as a client.
#[derive(Clone)]
struct Resolver(Arc<Inner>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.state.load().key.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.state.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates with the verifier of the current CA bundle and CRLs.
struct ClientVerifier(Arc<Inner>);

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientVerifier")
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle changes under a reload; no hints lets a client present the one certificate it has.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .state
            .load()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .state
            .load()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .state
            .load()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .state
            .load()
            .client_verifier
            .supported_verify_schemes()
    }
}

/// Verifies a neighbour's or provider's server certificate with the current CA bundle and CRLs, and refuses
/// revoked serials.
struct ServerVerifier(Arc<Inner>);

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerVerifier")
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.0.state.load().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )?;
        if let Some(serial) = self.0.revoked.revoked(end_entity) {
            tracing::warn!(server = %server_name.to_str(), %serial,
                "refused the server certificate of a neighbour: its serial is revoked");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .state
            .load()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .state
            .load()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .state
            .load()
            .server_verifier
            .supported_verify_schemes()
    }
}

/// Opens TCP to the endpoint's address and TLS over it with the node's current material, for
/// `Endpoint::connect_with_connector_lazy` (the endpoint's URI is `http://host:port`: TLS is done here).
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let name = self.name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "address has no host")
                })?;
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The `http://host:port` URI a tonic endpoint is made with for `address` (`https://host[:port]` as
/// configured; TLS is the [`Connector`]'s), the port made explicit.
pub fn plain_uri(address: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = address.parse().map_err(|e| format!("{e}"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(other) => {
            return Err(format!(
                "scheme {other:?}: only https is used between nodes"
            ));
        }
        None => return Err("no scheme: write https://host:port".to_owned()),
    }
    let host = uri.host().ok_or_else(|| "no host".to_owned())?;
    let port = uri.port_u16().unwrap_or(443);
    format!("http://{host}:{port}")
        .parse()
        .map_err(|e| format!("{e}"))
}

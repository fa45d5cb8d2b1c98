//! Mutual TLS for the backbone: rustls server configuration, the tonic client configuration, and
//! an accept stream for `Server::serve_with_incoming_shutdown` that performs each handshake in
//! its own task and attaches the verified [`Peer`] to every request as [`PeerInfo`].
//!
//! Reading the caller's identity in a handler (or interceptor):
//! `request.extensions().get::<PeerInfo>()`, or [`peer_info`]. tonic inserts the
//! `Connected::ConnectInfo` of the IO type into each request's extensions as-is when the server
//! has no `tls_config` of its own; so do **not** also call `Server::builder().tls_config(..)`.
//! With this stream `Request::remote_addr()` and `Request::peer_certs()` return `None` (they look
//! for tonic's own `TcpConnectInfo`/`TlsConnectInfo`); use `PeerInfo::remote` instead.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ident::{IdentError, Peer};
use crate::pki;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes run at once; further connections wait in the kernel backlog.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// Established connections buffered for the server before handshakes wait.
const ACCEPTED_QUEUE: usize = 64;
/// Pause after a non-connection accept error (e.g. out of file descriptors) before retrying.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
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

/// Who is on the other end of an accepted connection; tonic puts it in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The identity verified from the client certificate.
    pub peer: Peer,
    /// The client's socket address.
    pub remote: SocketAddr,
}

/// The verified caller of a request served over [`incoming`], if any.
pub fn peer_info<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// An established, identity-checked mutual-TLS server connection.
pub struct TlsConn {
    /// The TLS stream.
    inner: TlsStream<TcpStream>,
    /// The verified peer and its address.
    info: PeerInfo,
}

impl TlsConn {
    /// The verified peer and its address.
    pub fn peer_info(&self) -> &PeerInfo {
        &self.info
    }

    /// The underlying TLS stream.
    pub fn get_ref(&self) -> &TlsStream<TcpStream> {
        &self.inner
    }
}

impl fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConn")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// A rejected incoming connection, reported to the `on_failure` callback of [`incoming`].
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
}

impl HandshakeFailure {
    /// The address of the rejected client.
    pub fn remote(&self) -> SocketAddr {
        match self {
            HandshakeFailure::Tls { remote, .. }
            | HandshakeFailure::Identity { remote, .. }
            | HandshakeFailure::Timeout { remote } => *remote,
        }
    }
}

/// Callback told about each rejected connection.
type OnFailure = Arc<dyn Fn(HandshakeFailure) + Send + Sync>;

/// Accepts mutual-TLS connections on `listener` for `Server::serve_with_incoming_shutdown`.
///
/// Each handshake runs in its own task with a 10 s timeout; connections whose client certificate
/// lacks a valid fedgate URI SAN are dropped. Failures go to `on_failure` and `tracing::warn!`
/// and never end the stream; accept errors are logged and retried. Accepting starts on first
/// poll and stops (releasing the listener) once the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    on_failure: Arc<dyn Fn(HandshakeFailure) + Send + Sync>,
) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
    incoming_with_timeout(listener, config, on_failure, HANDSHAKE_TIMEOUT)
}

/// [`incoming`] with a configurable handshake timeout.
fn incoming_with_timeout(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    on_failure: OnFailure,
    timeout: Duration,
) -> impl Stream<Item = Result<TlsConn, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    // Spawn lazily so that building the stream outside a runtime cannot panic.
    let start = futures::stream::once(async move {
        tokio::spawn(accept_loop(listener, acceptor, on_failure, timeout, tx));
    })
    .filter_map(|()| futures::future::ready(None));
    start.chain(ReceiverStream::new(rx))
}

/// Whether an accept error concerns only the one connection (so retrying at once is right).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Accepts TCP connections until the receiving stream is dropped, spawning a handshake for each.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    on_failure: OnFailure,
    timeout: Duration,
    tx: mpsc::Sender<Result<TlsConn, io::Error>>,
) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = tx.closed() => break,
            r = listener.accept() => r,
        };
        let (tcp, remote) = match accepted {
            Ok(pair) => pair,
            Err(e) if is_connection_error(&e) => {
                debug!(error = %e, "accepting a TCP connection failed; continuing");
                continue;
            }
            Err(e) => {
                warn!(error = %e, "accepting a TCP connection failed; retrying shortly");
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                }
            }
        };
        let acceptor = acceptor.clone();
        let on_failure = on_failure.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = handshake(acceptor, tcp, remote, timeout).await;
            drop(permit);
            match result {
                Ok(conn) => {
                    debug!(peer = %conn.info.peer, %remote, "mutual TLS connection established");
                    if tx.send(Ok(conn)).await.is_err() {
                        debug!(%remote, "server stopped; dropping established connection");
                    }
                }
                Err(failure) => {
                    tracing::debug!(%remote, %failure, "rejected incoming connection");
                    on_failure(failure);
                }
            }
        });
    }
    debug!("stopped accepting connections");
}

/// Runs the TLS handshake on `tcp` and extracts the client's identity.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
) -> Result<TlsConn, HandshakeFailure> {
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(%remote, error = %e, "could not set TCP_NODELAY");
    }
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Err(_) => return Err(HandshakeFailure::Timeout { remote }),
        Ok(Err(e)) => {
            return Err(HandshakeFailure::Tls {
                remote,
                error: e.to_string(),
            });
        }
        Ok(Ok(stream)) => stream,
    };
    let identity = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => peer_from_cert(leaf),
        _ => Err(TlsError::NoPeerCertificate),
    };
    match identity {
        Ok(peer) => Ok(TlsConn {
            inner: stream,
            info: PeerInfo { peer, remote },
        }),
        Err(e) => Err(HandshakeFailure::Identity {
            remote,
            error: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::DivisionCode;
    use crate::pki::{DevCa, IssuedCert};
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, SanType};
    use std::sync::Mutex;
    use tokio::sync::{mpsc::UnboundedReceiver, oneshot};
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

    struct TestServer {
        addr: SocketAddr,
        failures: UnboundedReceiver<HandshakeFailure>,
        seen: Arc<Mutex<Vec<PeerInfo>>>,
        shutdown: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl TestServer {
        async fn start(server: &TlsMaterial, timeout: Duration) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (fail_tx, failures) = mpsc::unbounded_channel();
            let on_failure: OnFailure = Arc::new(move |f| {
                let _ = fail_tx.send(f);
            });
            let stream = incoming_with_timeout(
                listener,
                server_config(server).unwrap(),
                on_failure,
                timeout,
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
        let mut srv = TestServer::start(&server, HANDSHAKE_TIMEOUT).await;

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
        let mut srv = TestServer::start(&server, HANDSHAKE_TIMEOUT).await;

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
        let mut srv = TestServer::start(&server, HANDSHAKE_TIMEOUT).await;

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
        let mut srv = TestServer::start(&server, Duration::from_millis(200)).await;
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

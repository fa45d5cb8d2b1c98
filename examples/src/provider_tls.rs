//! The provider's TLS endpoint with material that can change while it serves: every new handshake uses the
//! certificate, key and CA bundle last installed, so an agency rotates its certificate without a restart
//! (the `civil-registry-provider` binary re-reads its files on SIGHUP). Connections already open keep the
//! material they were made with until they close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::provider_server::ProviderServer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

use crate::provider::{ProviderTls, RegistryProvider};

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server at most.
const ACCEPTED_QUEUE: usize = 64;

/// Why PEM material cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsMaterialError {
    /// A PEM file does not hold what it should.
    #[error("{what}: {reason}")]
    Pem {
        /// Which file: "CA certificate", "certificate" or "private key".
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// rustls refused the material (the key does not match the certificate, an unusable CA, ...).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Why a provider endpoint could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Its TLS material cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsMaterialError),
    /// The server failed.
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The rustls configuration of a provider endpoint serving `tls`: its certificate, client certificates required
/// from the CA bundle, ALPN `h2`.
pub fn server_config(tls: &ProviderTls) -> Result<Arc<rustls::ServerConfig>, TlsMaterialError> {
    let pem = |what: &'static str| {
        move |e: rustls::pki_types::pem::Error| TlsMaterialError::Pem {
            what,
            reason: e.to_string(),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        roots
            .add(ca.map_err(pem("CA certificate"))?)
            .map_err(|e| TlsMaterialError::Config(e.to_string()))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<_, _>>()
        .map_err(pem("certificate"))?;
    if chain.is_empty() {
        return Err(TlsMaterialError::Pem {
            what: "certificate",
            reason: "no certificate in the PEM".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(pem("private key"))?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| TlsMaterialError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsMaterialError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `provider` over mutual TLS on `listener` until `shutdown` completes, each new connection under the
/// configuration `tls` holds at its handshake (see [`server_config`]).
pub async fn serve_provider_reloading(
    listener: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    provider: RegistryProvider,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = mpsc::channel::<std::io::Result<_>>(ACCEPTED_QUEUE);
    let accepting = tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        eprintln!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Small request/response exchanges must not wait for delayed ACKs.
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => eprintln!("TLS handshake with {remote} failed: {e}"),
                    Err(_) => eprintln!("TLS handshake with {remote} timed out"),
                }
            });
        }
    });
    let served = Server::builder()
        .add_service(ProviderServer::new(provider))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    accepting.abort();
    served
}

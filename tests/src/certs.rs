//! Certificate helpers for the rotation tests: which certificate a node presents, handshakes with a chosen
//! certificate, files replaced as an operator (or a Kubernetes secret update) replaces them, and a loop of live
//! calls that records every failure.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::{IssuedCert, server_name};
use fedgate_gateway::tls::trust::certificate_info;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::task::JoinHandle;

/// The serial (hex, no leading zeros) of the first certificate in `pem`.
pub fn serial_of(pem: &str) -> Result<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())?;
    Ok(certificate_info(&der)?.serial)
}

/// Completes a TLS handshake with `addr` from the loopback address `from` as `client` (trusting `ca_pem`,
/// expecting `server`'s name) and returns the serial of the certificate the server presented; an error if the
/// handshake fails either way.
pub async fn presented_serial(
    from: [u8; 4],
    addr: SocketAddr,
    ca_pem: &str,
    server: &Peer,
    client: &IssuedCert,
) -> Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca?)?;
    }
    let chain = CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = crate::connect_from(from, addr).await?;
    let name = ServerName::try_from(server_name(server))?;
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .context("handshake timed out")??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| anyhow!("the server presented no certificate"))?;
    // In TLS 1.3 the server checks the client's certificate after the client's side completed: a refusal
    // arrives as an alert or a close on the first read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .context("no answer after the handshake")??;
    if n == 0 {
        anyhow::bail!("the server closed the connection after the handshake");
    }
    Ok(certificate_info(&leaf)?.serial)
}

/// Replaces `path` with `text` as an operator's tooling does: a temporary file beside it, renamed over it.
pub fn replace_file(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.new"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Writes a new certificate and key over a node's files: the key first, then the certificate.
pub fn replace_pair(cert_path: &Path, key_path: &Path, cert: &IssuedCert) -> Result<()> {
    replace_file(key_path, &cert.key_pem)?;
    replace_file(cert_path, &cert.cert_pem)
}

/// A loop of calls running until stopped, counting successes and keeping every failure.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    task: JoinHandle<Vec<String>>,
}

impl Traffic {
    /// Calls `call` again and again (one at a time) until [`Traffic::stop`].
    pub fn start<F, Fut>(mut call: F) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ok.clone());
        let task = tokio::spawn(async move {
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match call().await {
                    Ok(()) => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(format!("{e:#}")),
                }
            }
            failures
        });
        Self { stop, ok, task }
    }

    /// Calls that succeeded so far.
    pub fn succeeded(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` further calls succeeded (bounded by `timeout`).
    pub async fn wait_more(&self, more: u64, timeout: Duration) -> Result<()> {
        let target = self.succeeded() + more;
        crate::eventually("more successful calls", timeout, || async {
            Ok(self.succeeded() >= target)
        })
        .await
    }

    /// Stops the loop and returns the successes and the failures.
    pub async fn stop(self) -> Result<(u64, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await?;
        Ok((self.ok.load(Ordering::Relaxed), failures))
    }
}

//! The node's certificate, key, CA bundle, certificate revocation list and revoked serials, loaded and checked
//! as one set ([`load_trust`], also what `fedgate check-config` checks), and reloaded while the node runs
//! ([`CertReloader`]: on SIGHUP, and when the files change — a watch on their directories, debounced, which
//! also sees the atomic rename of a Kubernetes secret update).
//!
//! A reload that fails keeps the material in use, logs a warning and counts
//! `fedgate_certificate_reloads_total{outcome="failed"}`; one that succeeds reaches every new handshake at once
//! (see [`super::dynamic`]), the statement signer and verifier, and renews the channels to neighbours and
//! providers so that new calls use new connections.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::dynamic::{DynamicTls, TrustState};
use super::{TlsError, TlsMaterial, peer_from_cert};
use crate::config::NodeConfig;
use crate::ident::{DivisionCode, Peer};
use crate::metrics::NodeMetrics;
use crate::statement::{NodeSigner, RevokedSerials, StatementVerifier};
use crate::topology::Topology;

/// How long the files must be quiet after a change before they are read.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often the expiry gauge is brought up to date.
const EXPIRY_TICK: Duration = Duration::from_secs(60);
/// How often the expiry warning is repeated.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Why the TLS and trust material cannot be used, naming the configuration key of the culprit.
#[derive(Debug, Error)]
#[error("{key}: {reason}")]
pub struct TrustError {
    /// The configuration key: `tls.ca`, `tls.cert`, `tls.key`, `trust.crl`, `trust.revoked_serials` or `config`.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl TrustError {
    fn new(key: &'static str, reason: impl std::fmt::Display) -> Self {
        Self {
            key,
            reason: reason.to_string(),
        }
    }
}

/// The files and settings the trust material is read from (from `[tls]` and `[trust]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustFiles {
    /// The CA bundle.
    pub ca: PathBuf,
    /// The node's certificate chain.
    pub cert: PathBuf,
    /// The node's private key.
    pub key: PathBuf,
    /// A certificate revocation list, PEM or DER.
    pub crl: Option<PathBuf>,
    /// Revoked serials, hex.
    pub revoked_serials: Vec<String>,
    /// Days before expiry from which the node warns.
    pub warning_days: u64,
}

impl TrustFiles {
    /// The trust files a configuration names.
    pub fn of(config: &NodeConfig) -> Self {
        Self {
            ca: config.tls.ca.clone(),
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            crl: config.trust.crl.clone(),
            revoked_serials: config.trust.revoked_serials.clone(),
            warning_days: config.trust.cert_expiry_warning_days,
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.ca.clone(), self.cert.clone(), self.key.clone()];
        p.extend(self.crl.clone());
        p
    }
}

/// What a certificate says of itself, for logs, metrics and `fedgate report`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Whom it names.
    pub peer: Peer,
    /// Its serial number, hex, without leading zeros.
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

/// Reads the identity, serial and validity of a DER certificate.
pub fn certificate_info(der: &[u8]) -> Result<CertificateInfo, TlsError> {
    let (_, x509) = X509Certificate::from_der(der).map_err(|e| TlsError::CertParse {
        reason: e.to_string(),
    })?;
    let serial = x509.raw_serial();
    let first = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    Ok(CertificateInfo {
        peer: peer_from_cert(der)?,
        serial: hex::encode(&serial[first..]),
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
    })
}

/// Reads a certificate revocation list file: PEM (one or more `X509 CRL` blocks) or DER.
pub fn read_crl(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TrustError> {
    let bytes = std::fs::read(path).map_err(|e| {
        TrustError::new("trust.crl", format!("cannot read {}: {e}", path.display()))
    })?;
    let pem: Result<Vec<_>, _> = CertificateRevocationListDer::pem_slice_iter(&bytes).collect();
    let crls = match pem {
        Ok(list) if !list.is_empty() => list,
        _ if bytes.first() == Some(&0x30) => vec![CertificateRevocationListDer::from(bytes)],
        _ => {
            return Err(TrustError::new(
                "trust.crl",
                format!("{} holds no X509 CRL in PEM or DER", path.display()),
            ));
        }
    };
    for crl in &crls {
        webpki::OwnedCertRevocationList::from_der(crl).map_err(|e| {
            TrustError::new(
                "trust.crl",
                format!("{} does not parse: {e:?}", path.display()),
            )
        })?;
    }
    Ok(crls)
}

/// The trust material of a node, read and checked as one set.
pub struct LoadedTrust {
    /// The PEM files as read.
    pub material: TlsMaterial,
    /// The rustls material built from them.
    pub state: TrustState,
    /// The revocation lists read from `trust.crl`.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// The revoked serials.
    pub revoked: RevokedSerials,
    /// A signer with the certificate's key.
    pub signer: NodeSigner,
    /// The node's certificate.
    pub certificate: CertificateInfo,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for LoadedTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedTrust")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

/// Maps a [`TlsError`] of [`TlsMaterial::load`] or [`TrustState::build`] to the key of the file at fault.
fn keyed(e: TlsError) -> TrustError {
    let key = match &e {
        TlsError::ReadFile { what, .. }
        | TlsError::BadFile { what, .. }
        | TlsError::Pem { what, .. } => match *what {
            "CA certificate" => "tls.ca",
            "private key" => "tls.key",
            _ => "tls.cert",
        },
        TlsError::TrustAnchor { .. } => "tls.ca",
        TlsError::Verifier { .. } => "trust.crl",
        TlsError::Config(_) => "tls.key",
        _ => "tls.cert",
    };
    let reason = match &e {
        TlsError::Config(rustls::Error::InconsistentKeys(_)) => {
            "the private key does not belong to the certificate in tls.cert".to_owned()
        }
        _ => e.to_string(),
    };
    TrustError { key, reason }
}

/// Reads and checks the trust material of node `node` at `now_unix`: every file parses, the key belongs to
/// the certificate, the certificate names this node, is valid now, chains to a CA of the bundle, and is
/// neither in the revoked serials nor in the CRL.
pub fn load_trust(
    files: &TrustFiles,
    node: DivisionCode,
    now_unix: i64,
) -> Result<LoadedTrust, TrustError> {
    let material = TlsMaterial::load(&files.ca, &files.cert, &files.key).map_err(keyed)?;
    let crls = match &files.crl {
        Some(p) => read_crl(p)?,
        None => Vec::new(),
    };
    let revoked = RevokedSerials::parse(&files.revoked_serials)
        .map_err(|e| TrustError::new("trust.revoked_serials", e))?;
    let state = TrustState::build(&material, &crls).map_err(keyed)?;
    let leaf = state
        .leaf()
        .cloned()
        .ok_or_else(|| TrustError::new("tls.cert", "no certificate"))?;
    let certificate = certificate_info(&leaf).map_err(|e| TrustError::new("tls.cert", e))?;
    if certificate.peer != Peer::Node(node) {
        return Err(TrustError::new(
            "tls.cert",
            format!(
                "the certificate names {}, not this node ({})",
                certificate.peer.to_uri(),
                Peer::Node(node).to_uri()
            ),
        ));
    }
    if now_unix > certificate.not_after {
        return Err(TrustError::new(
            "tls.cert",
            format!(
                "the certificate {} expired at {}",
                certificate.serial,
                rfc3339(certificate.not_after)
            ),
        ));
    }
    if now_unix < certificate.not_before {
        return Err(TrustError::new(
            "tls.cert",
            format!(
                "the certificate {} is not valid before {}",
                certificate.serial,
                rfc3339(certificate.not_before)
            ),
        ));
    }
    check_chain(&material, &crls, &leaf, now_unix)?;
    if revoked.contains_serial(&hex::decode(&certificate.serial).unwrap_or_default()) {
        return Err(TrustError::new(
            "tls.cert",
            format!(
                "the certificate's serial {} is listed in trust.revoked_serials",
                certificate.serial
            ),
        ));
    }
    let signer = NodeSigner::from_material(&material).map_err(|e| TrustError::new("tls.key", e))?;
    let mut h = Sha256::new();
    for part in [&material.ca_pem, &material.cert_pem, &material.key_pem] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for crl in &crls {
        h.update(crl.as_ref());
        h.update([0]);
    }
    let mut serials = files.revoked_serials.clone();
    serials.sort();
    for s in &serials {
        h.update(s.as_bytes());
        h.update([0]);
    }
    Ok(LoadedTrust {
        material,
        state,
        crls,
        revoked,
        signer,
        certificate,
        fingerprint: h.finalize().into(),
    })
}

/// Checks that `leaf` chains to a CA of the bundle for both server and client use at `now_unix`, and that no
/// CRL names it.
fn check_chain(
    m: &TlsMaterial,
    crls: &[CertificateRevocationListDer<'static>],
    leaf: &CertificateDer<'_>,
    now_unix: i64,
) -> Result<(), TrustError> {
    let mut anchors = Vec::new();
    for der in CertificateDer::pem_slice_iter(m.ca_pem.as_bytes()) {
        let der = der.map_err(|e| TrustError::new("tls.ca", e))?;
        anchors.push(
            webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| TrustError::new("tls.ca", format!("{e:?}")))?
                .to_owned(),
        );
    }
    let intermediates: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
            .skip(1)
            .filter_map(Result::ok)
            .collect();
    let owned: Vec<webpki::CertRevocationList<'static>> = crls
        .iter()
        .filter_map(|c| webpki::OwnedCertRevocationList::from_der(c).ok())
        .map(webpki::CertRevocationList::from)
        .collect();
    let refs: Vec<&webpki::CertRevocationList<'_>> = owned.iter().collect();
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| TrustError::new("tls.cert", format!("{e:?}")))?;
    let now = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now_unix).unwrap_or(0)));
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        let revocation = webpki::RevocationOptionsBuilder::new(&refs).ok().map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::EndEntity)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .build()
        });
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertRevoked => TrustError::new(
                "tls.cert",
                "the certificate is revoked by the CRL in trust.crl",
            ),
            other => TrustError::new(
                "tls.cert",
                format!("the certificate does not verify under the CA bundle in tls.ca: {other:?}"),
            ),
        })?;
    }
    Ok(())
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Label set of the certificate metrics: `outcome` of a reload, `kind` of a certificate.
pub type CertLabels = [(&'static str, &'static str); 1];

/// Certificate reloads and expiry, registered with the node's metrics.
#[derive(Debug, Default)]
pub struct CertificateMetrics {
    /// Reloads by outcome: `ok`, `failed` (the old material kept).
    pub reloads: Family<CertLabels, Counter>,
    /// Seconds until the certificate expires (negative once expired), `kind="node"`.
    pub expiry_seconds: Family<CertLabels, Gauge>,
}

impl CertificateMetrics {
    /// Registers the metrics in `r`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "certificate_reloads",
            "Reloads of the node's certificate, key, CA bundle and revocation lists, by outcome",
            self.reloads.clone(),
        );
        r.register(
            "certificate_expiry_seconds",
            "Seconds until the node's own certificate expires",
            self.expiry_seconds.clone(),
        );
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold what is in use already.
    Unchanged,
    /// New material is in use; the node's certificate now is this one.
    Changed(CertificateInfo),
}

/// The parts of a running node a reload reaches.
pub struct ReloadTargets {
    /// The TLS of every listener and outgoing connection.
    pub tls: DynamicTls,
    /// The statement signer (every clone follows).
    pub signer: NodeSigner,
    /// The statement verifier.
    pub verifier: Arc<StatementVerifier>,
    /// The channels to neighbours and providers, renewed after a reload.
    pub topology: Arc<Topology>,
    /// Where reloads and expiry are counted.
    pub metrics: Arc<NodeMetrics>,
}

struct Current {
    fingerprint: [u8; 32],
    certificate: CertificateInfo,
}

struct Inner {
    node: DivisionCode,
    files: Mutex<TrustFiles>,
    config_file: Mutex<Option<PathBuf>>,
    targets: ReloadTargets,
    current: Mutex<Current>,
    events: mpsc::UnboundedSender<()>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
}

/// Reloads a running node's trust material; clones share one state. See the module docs.
#[derive(Clone)]
pub struct CertReloader(Arc<Inner>);

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("node", &self.0.node)
            .finish_non_exhaustive()
    }
}

impl CertReloader {
    /// A reloader of node `node`'s material, now `loaded` (read from `files`), reaching `targets`.
    pub fn new(
        node: DivisionCode,
        files: TrustFiles,
        loaded: &LoadedTrust,
        targets: ReloadTargets,
    ) -> Self {
        let (events, receiver) = mpsc::unbounded_channel();
        let r = Self(Arc::new(Inner {
            node,
            files: Mutex::new(files),
            config_file: Mutex::new(None),
            targets,
            current: Mutex::new(Current {
                fingerprint: loaded.fingerprint,
                certificate: loaded.certificate.clone(),
            }),
            events,
            receiver: Mutex::new(Some(receiver)),
        }));
        r.update_expiry(now_unix());
        r
    }

    /// The node's certificate in use now.
    pub fn certificate(&self) -> CertificateInfo {
        lock(&self.0.current).certificate.clone()
    }

    /// Reads `[tls]` and `[trust]` from the configuration file `path` at every reload from now on (SIGHUP, or a
    /// change of the file, which is watched too).
    pub fn watch_config_file(&self, path: &Path) {
        *lock(&self.0.config_file) = Some(path.to_owned());
        if let Err(e) = hub::subscribe(&[path.to_owned()], self.0.events.clone()) {
            tracing::warn!(file = %path.display(), error = %e,
                "cannot watch the configuration file; SIGHUP still reloads it");
        }
    }

    /// Reads and checks the material again and puts it in use if it changed; a failure keeps the material in
    /// use, logs a warning and is counted.
    pub fn reload(&self) -> Result<Reloaded, TrustError> {
        let outcome = self.try_reload();
        let metrics = &self.0.targets.metrics.certificates;
        match &outcome {
            Ok(Reloaded::Unchanged) => {}
            Ok(Reloaded::Changed(c)) => {
                metrics.reloads.get_or_create(&[("outcome", "ok")]).inc();
                tracing::info!(node = %self.0.node, serial = %c.serial, not_after = %rfc3339(c.not_after),
                    "certificates reloaded; new connections use them");
            }
            Err(e) => {
                metrics
                    .reloads
                    .get_or_create(&[("outcome", "failed")])
                    .inc();
                tracing::warn!(node = %self.0.node, error = %e,
                    "certificate reload failed; the material in use is kept");
            }
        }
        outcome
    }

    fn try_reload(&self) -> Result<Reloaded, TrustError> {
        let config_file = lock(&self.0.config_file).clone();
        let files = match config_file {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    TrustError::new("config", format!("cannot read {}: {e}", path.display()))
                })?;
                let config: NodeConfig = toml::from_str(&text)
                    .map_err(|e| TrustError::new("config", format!("{}: {e}", path.display())))?;
                TrustFiles::of(&config)
            }
            None => lock(&self.0.files).clone(),
        };
        // One reload at a time: the files' lock is held while the material is swapped.
        let mut held = lock(&self.0.files);
        let loaded = load_trust(&files, self.0.node, now_unix())?;
        let mut current = lock(&self.0.current);
        if current.fingerprint == loaded.fingerprint {
            *held = files;
            return Ok(Reloaded::Unchanged);
        }
        let t = &self.0.targets;
        t.verifier
            .reload(&loaded.material.ca_pem, &loaded.crls)
            .map_err(|e| TrustError::new("tls.ca", e))?;
        t.tls.revoked().replace(&loaded.revoked);
        t.tls.install(loaded.state);
        t.signer
            .adopt(&loaded.signer)
            .map_err(|e| TrustError::new("tls.cert", e))?;
        t.topology.renew_channels();
        *current = Current {
            fingerprint: loaded.fingerprint,
            certificate: loaded.certificate.clone(),
        };
        *held = files;
        drop(current);
        drop(held);
        self.update_expiry(now_unix());
        Ok(Reloaded::Changed(loaded.certificate))
    }

    /// Sets the expiry gauge from the certificate in use; returns the seconds left.
    fn update_expiry(&self, now: i64) -> i64 {
        let left = lock(&self.0.current).certificate.not_after - now;
        self.0
            .targets
            .metrics
            .certificates
            .expiry_seconds
            .get_or_create(&[("kind", "node")])
            .set(left);
        left
    }

    /// Reloads whenever the watched files change (debounced) and keeps the expiry gauge current, logging a
    /// warning once a day while the certificate expires within `trust.cert_expiry_warning_days`; until
    /// `shutdown` turns true.
    pub fn spawn(&self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let this = self.clone();
        let receiver = lock(&self.0.receiver).take();
        let paths = lock(&self.0.files).paths();
        if let Err(e) = hub::subscribe(&paths, self.0.events.clone()) {
            tracing::warn!(node = %self.0.node, error = %e,
                "cannot watch the certificate files; SIGHUP still reloads them");
        }
        tokio::spawn(async move {
            let Some(mut events) = receiver else { return };
            let mut tick = tokio::time::interval(EXPIRY_TICK);
            let mut warned: Option<tokio::time::Instant> = None;
            loop {
                let changed = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tick.tick() => false,
                    Some(()) = events.recv() => true,
                };
                if changed {
                    // Let a burst of writes (certificate, then key; a secret's rename) settle.
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
                    if this.reload().is_err() {
                        continue;
                    }
                }
                this.check_expiry(&mut warned);
            }
        })
    }

    fn check_expiry(&self, warned: &mut Option<tokio::time::Instant>) {
        let left = self.update_expiry(now_unix());
        let days = lock(&self.0.files).warning_days;
        let within = left < i64::try_from(days.saturating_mul(86_400)).unwrap_or(i64::MAX);
        if within && warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            let c = self.certificate();
            tracing::warn!(node = %self.0.node, serial = %c.serial, not_after = %rfc3339(c.not_after),
                days_left = left / 86_400,
                "the node's certificate expires soon: issue a new one (`fedgate certs issue`) and replace the files");
            *warned = Some(tokio::time::Instant::now());
        } else if !within {
            *warned = None;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One file watcher for the whole process (inotify instances are few), telling each subscriber when a file it
/// named changes in its directory, or when the directory's `..data` link of a Kubernetes secret is swapped.
mod hub {
    use super::*;
    use notify::{RecursiveMode, Watcher};
    use std::collections::HashSet;

    struct Subscriber {
        dir: PathBuf,
        names: Vec<OsString>,
        tx: mpsc::UnboundedSender<()>,
    }

    struct Hub {
        watcher: notify::RecommendedWatcher,
        watched: HashSet<PathBuf>,
        subscribers: Arc<Mutex<Vec<Subscriber>>>,
    }

    static HUB: Mutex<Option<Hub>> = Mutex::new(None);

    fn notify_subscribers(subscribers: &Mutex<Vec<Subscriber>>, event: notify::Event) {
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let mut subs = lock(subscribers);
        subs.retain(|s| !s.tx.is_closed());
        for path in &event.paths {
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            let secret_swap = name.to_string_lossy().starts_with("..");
            for s in subs.iter().filter(|s| s.dir == dir) {
                if secret_swap || s.names.iter().any(|n| n == name) {
                    let _ = s.tx.send(());
                }
            }
        }
    }

    /// Sends on `tx` whenever one of `paths` changes.
    pub(super) fn subscribe(
        paths: &[PathBuf],
        tx: mpsc::UnboundedSender<()>,
    ) -> Result<(), notify::Error> {
        let mut hub = lock(&HUB);
        if hub.is_none() {
            let subscribers: Arc<Mutex<Vec<Subscriber>>> = Arc::default();
            let subs = subscribers.clone();
            let watcher =
                notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                    if let Ok(event) = res {
                        notify_subscribers(&subs, event);
                    }
                })?;
            *hub = Some(Hub {
                watcher,
                watched: HashSet::new(),
                subscribers,
            });
        }
        let Some(hub) = hub.as_mut() else {
            return Ok(());
        };
        for path in paths {
            let Some(name) = path.file_name() else {
                continue;
            };
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let dir = std::fs::canonicalize(&parent)?;
            if hub.watched.insert(dir.clone()) {
                if let Err(e) = hub.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                    hub.watched.remove(&dir);
                    return Err(e);
                }
            }
            let mut subs = lock(&hub.subscribers);
            match subs
                .iter_mut()
                .find(|s| s.dir == dir && s.tx.same_channel(&tx))
            {
                Some(s) => s.names.push(name.to_owned()),
                None => subs.push(Subscriber {
                    dir,
                    names: vec![name.to_owned()],
                    tx: tx.clone(),
                }),
            }
        }
        Ok(())
    }
}

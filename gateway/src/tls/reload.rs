//! Reloading the node's trust material while it runs ([`CertReloader`]: on SIGHUP, and when the files change —
//! a watch on their directories, debounced, which also sees the atomic rename of a Kubernetes secret update);
//! the set is read and checked by [`super::trust::load_trust`].
//!
//! A reload that fails keeps the material in use, logs a warning and counts
//! `fedgate_certificate_reloads_total{outcome="failed"}`; one that succeeds reaches every new handshake at once
//! (see [`super::dynamic`]), the statement signer and verifier, and renews the channels to neighbours and
//! providers so that new calls use new connections.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::dynamic::DynamicTls;
use super::trust::{
    CertificateInfo, LoadedTrust, TrustError, TrustFiles, load_trust, now_unix, rfc3339,
};
use super::watch as hub;
use crate::config::NodeConfig;
use crate::ident::DivisionCode;
use crate::metrics::NodeMetrics;
use crate::statement::{NodeSigner, StatementVerifier};
use crate::topology::Topology;

/// How long the files must be quiet after a change before they are read.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often the expiry gauge is brought up to date.
const EXPIRY_TICK: Duration = Duration::from_secs(60);
/// How often the expiry warning is repeated.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

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
            let renew = renewal_advice(self.0.node, &lock(&self.0.files));
            tracing::warn!(node = %self.0.node, serial = %c.serial, not_after = %rfc3339(c.not_after),
                days_left = left / 86_400, "the node's certificate expires soon: {renew}");
            *warned = Some(tokio::time::Instant::now());
        } else if !within {
            *warned = None;
        }
    }
}

/// What the expiry warning tells the operator to do: the `fedgate certs` command that issues node `node` a new
/// certificate from the CA kept beside its CA bundle, and where the new files go.
pub fn renewal_advice(node: DivisionCode, files: &TrustFiles) -> String {
    let dir = match files.ca.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let command = renewal_command(node, dir);
    let issued = |ext: &str| dir.join(format!("node-{node}.{ext}"));
    let (crt, key) = (issued("crt"), issued("key"));
    let place = if crt == files.cert && key == files.key {
        "it replaces the files in use, which the node then reloads".to_owned()
    } else {
        format!(
            "then put {} at {} and {} at {}; the node reloads them",
            crt.display(),
            files.cert.display(),
            key.display(),
            files.key.display()
        )
    };
    format!(
        "issue a new one with `{command}` where that directory holds the CA's ca.crt and ca.key; {place}"
    )
}

/// `fedgate certs --ca-existing --out <ca_dir> --node <node>`, each argument quoted for a POSIX shell.
pub fn renewal_command(node: DivisionCode, ca_dir: &Path) -> String {
    format!(
        "fedgate certs --ca-existing --out {} --node {node}",
        shell_word(&ca_dir.display().to_string())
    )
}

/// `word` as one word of a POSIX shell command line.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=+,@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(ca: &str, cert: &str, key: &str) -> TrustFiles {
        TrustFiles {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            crl: None,
            revoked_serials: Vec::new(),
            warning_days: 30,
        }
    }

    #[test]
    fn the_renewal_advice_names_the_certs_command_of_this_node()
    -> Result<(), Box<dyn std::error::Error>> {
        let node: DivisionCode = "350100".parse()?;
        let beside = renewal_advice(
            node,
            &files(
                "/etc/fedgate/pki/ca.crt",
                "/etc/fedgate/pki/node-350100.crt",
                "/etc/fedgate/pki/node-350100.key",
            ),
        );
        assert!(
            beside.contains("`fedgate certs --ca-existing --out /etc/fedgate/pki --node 350100`"),
            "{beside}"
        );
        assert!(beside.contains("it replaces the files in use"), "{beside}");
        let elsewhere = renewal_advice(
            node,
            &files(
                "/run/secrets/ca.crt",
                "/etc/fedgate/tls.crt",
                "/etc/fedgate/tls.key",
            ),
        );
        assert!(
            elsewhere.contains("then put /run/secrets/node-350100.crt at /etc/fedgate/tls.crt"),
            "{elsewhere}"
        );
        assert_eq!(
            renewal_command(node, Path::new("/srv/my pki/it's")),
            "fedgate certs --ca-existing --out '/srv/my pki/it'\\''s' --node 350100"
        );
        Ok(())
    }
}

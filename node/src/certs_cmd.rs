//! `fedgate certs`: a development PKI — a new CA with node and agency certificates, or one more certificate
//! from the CA already in the directory (never replacing it); and the node's reload on SIGHUP.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedgate_gateway::ident::{DivisionCode, Peer, Uscc};
use fedgate_gateway::pki::{DevCa, IssuedCert};

use crate::exit::ConfigError;

/// What `fedgate certs` was asked for.
#[derive(Debug)]
pub struct CertsRequest {
    /// Directory of the PEM files.
    pub out: PathBuf,
    /// Node codes to issue certificates for.
    pub nodes: Vec<String>,
    /// Agencies as `USCC[@NODE]`.
    pub agencies: Vec<String>,
    /// Issue from `out/ca.crt` + `out/ca.key` instead of creating a CA.
    pub ca_existing: bool,
}

/// Checks every code first (exit 78 naming the bad one), then creates the CA or loads the existing one, and
/// writes each certificate and key.
pub fn run(req: CertsRequest) -> Result<()> {
    let mut peers = Vec::new();
    for n in &req.nodes {
        peers.push(Peer::Node(
            n.parse()
                .map_err(|e| ConfigError(format!("--node {n}: {e}")))?,
        ));
    }
    let mut registered = Vec::new();
    for a in &req.agencies {
        let (code, node) = a
            .split_once('@')
            .map_or((a.as_str(), None), |(c, n)| (c, Some(n)));
        let uscc = code
            .parse::<Uscc>()
            .map_err(|e| ConfigError(format!("--agency {a}: {e}")))?;
        let node = match node {
            Some(n) => n
                .parse::<DivisionCode>()
                .map_err(|e| ConfigError(format!("--agency {a}: node {e}")))?,
            None => uscc.registering_division_code().ok_or_else(|| {
                ConfigError(format!(
                    "--agency {a}: the code names no division; give the node as USCC@NODE"
                ))
            })?,
        };
        registered.push((uscc, node));
    }
    let out = &req.out;
    let (ca_crt, ca_key) = (out.join("ca.crt"), out.join("ca.key"));
    let ca = if req.ca_existing {
        if req.nodes.is_empty() && req.agencies.is_empty() {
            return Err(ConfigError(
                "--ca-existing: name the certificates to issue with --node or --agency".into(),
            )
            .into());
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| {
                ConfigError(format!(
                    "--ca-existing: cannot read {}: {e} (the CA and its key must both be there)",
                    p.display()
                ))
            })
        };
        let ca = DevCa::from_pem(&read(&ca_crt)?, &read(&ca_key)?)
            .map_err(|e| ConfigError(format!("--ca-existing: {}: {e}", ca_crt.display())))?;
        println!("{}  (existing CA, kept)", ca_crt.display());
        ca
    } else {
        if ca_crt.exists() || ca_key.exists() {
            return Err(ConfigError(format!(
                "{} already holds a CA; it is never replaced: pass --ca-existing to issue more certificates from \
                 it, or give another --out directory",
                out.display()
            ))
            .into());
        }
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let ca = DevCa::generate("fedgate development root")?;
        write_atomically(&ca_crt, &ca.ca_pem(), false)?;
        write_atomically(&ca_key, &ca.ca_key_pem(), true)?;
        println!("{}", ca_crt.display());
        ca
    };
    for peer in &peers {
        let name = match peer {
            Peer::Node(c) => format!("node-{c}"),
            Peer::Agency(u) => format!("agency-{u}"),
        };
        let crt = write_leaf(out, &name, &ca.issue(peer, &[])?)?;
        println!("{}  ({})", crt.display(), peer.to_uri());
    }
    for (uscc, node) in &registered {
        let crt = write_leaf(
            out,
            &format!("agency-{uscc}"),
            &ca.issue_agency(uscc, *node, &[])?,
        )?;
        println!(
            "{}  ({}, registered at node {node})",
            crt.display(),
            Peer::Agency(uscc.clone()).to_uri()
        );
    }
    Ok(())
}

/// Writes `<out>/<name>.key` then `<out>/<name>.crt`, each by an atomic rename, so that a node watching the
/// files reads either the old pair or the new one.
fn write_leaf(out: &Path, name: &str, cert: &IssuedCert) -> Result<PathBuf> {
    let (crt, key) = (
        out.join(format!("{name}.crt")),
        out.join(format!("{name}.key")),
    );
    write_atomically(&key, &cert.key_pem, true)?;
    write_atomically(&crt, &cert.cert_pem, false)?;
    Ok(crt)
}

/// Writes `text` to a temporary file beside `path` and renames it over `path` (mode 0600 if `secret`).
fn write_atomically(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reloads the node's certificates at every SIGHUP until the process ends.
pub async fn reload_on_hangup(certificates: fedgate_gateway::tls::reload::CertReloader) {
    #[cfg(unix)]
    {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload only when their files change");
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading certificates");
            // A failure is logged and counted by the reloader; the material in use is kept.
            let _ = certificates.reload();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = certificates;
        std::future::pending::<()>().await
    }
}

/// The `fedgate report` line on the node's own certificate: serial, expiry, days left, and a warning within
/// `trust.cert_expiry_warning_days`.
pub fn expiry_line(config: &fedgate_gateway::config::NodeConfig) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let path = &config.tls.cert;
    let info = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| CertificateDer::from_pem_slice(&pem).map_err(|e| e.to_string()))
        .and_then(|der| {
            fedgate_gateway::tls::trust::certificate_info(&der).map_err(|e| e.to_string())
        });
    match info {
        Err(e) => format!("node certificate {}: unreadable: {e}", path.display()),
        Ok(c) => {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let days = (c.not_after - now).div_euclid(86_400);
            let at = time::OffsetDateTime::from_unix_timestamp(c.not_after)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default();
            let warn = i64::try_from(config.trust.cert_expiry_warning_days).unwrap_or(i64::MAX);
            let note = if days < 0 {
                "  EXPIRED"
            } else if days < warn {
                "  WARNING: expires within trust.cert_expiry_warning_days"
            } else {
                ""
            };
            format!(
                "node certificate {} (serial {}): expires {at}, in {days} days{note}",
                path.display(),
                c.serial
            )
        }
    }
}

//! The node's certificate, key, CA bundle, certificate revocation list and revoked serials, read and checked as
//! one set: what start-up, every reload ([`super::reload`]) and `fedgate check-config` check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use sha2::{Digest, Sha256};
use thiserror::Error;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::dynamic::TrustState;
use super::{TlsError, TlsMaterial, peer_from_cert};
use crate::config::NodeConfig;
use crate::ident::{DivisionCode, Peer};
use crate::statement::{NodeSigner, RevokedSerials};

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
    pub(super) fn new(key: &'static str, reason: impl std::fmt::Display) -> Self {
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

    pub(super) fn paths(&self) -> Vec<PathBuf> {
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
    pub(super) fingerprint: [u8; 32],
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

pub(super) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub(super) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevCa, write_pem_files};

    fn node(code: &str) -> DivisionCode {
        code.parse().unwrap()
    }

    /// Writes the CA and a certificate of `holder` into `dir`, and returns the files naming them.
    fn files(dir: &Path, ca: &DevCa, holder: &str) -> TrustFiles {
        let issued = ca.issue(&Peer::Node(node(holder)), &[]).unwrap();
        let (cert, key) = write_pem_files(dir, holder, &issued).unwrap();
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca.ca_pem()).unwrap();
        TrustFiles {
            ca: ca_path,
            cert,
            key,
            crl: None,
            revoked_serials: Vec::new(),
            warning_days: 30,
        }
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn every_defect_of_the_set_is_named_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let good = files(dir.path(), &ca, "350100");
        let loaded = load_trust(&good, node("350100"), now()).unwrap();
        assert_eq!(loaded.certificate.peer, Peer::Node(node("350100")));

        let e = load_trust(&good, node("350102"), now()).unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(e.reason.contains("350100"), "{e}");

        let other = files(dir.path(), &ca, "350102");
        let mismatched = TrustFiles {
            key: other.key.clone(),
            ..good.clone()
        };
        let e = load_trust(&mismatched, node("350100"), now()).unwrap_err();
        assert_eq!(e.key, "tls.key", "{e}");

        let e = load_trust(&good, node("350100"), loaded.certificate.not_after + 1).unwrap_err();
        assert!(e.reason.contains("expired"), "{e}");

        let revoked = TrustFiles {
            revoked_serials: vec![loaded.certificate.serial.clone()],
            ..good.clone()
        };
        let e = load_trust(&revoked, node("350100"), now()).unwrap_err();
        assert!(e.reason.contains("revoked_serials"), "{e}");
        let bad_serial = TrustFiles {
            revoked_serials: vec!["not hex".into()],
            ..good.clone()
        };
        assert_eq!(
            load_trust(&bad_serial, node("350100"), now())
                .unwrap_err()
                .key,
            "trust.revoked_serials"
        );

        let foreign = DevCa::generate("fedgate other CA").unwrap();
        let untrusted = files(&dir.path().join("other"), &foreign, "350100");
        let e = load_trust(
            &TrustFiles {
                ca: good.ca.clone(),
                ..untrusted
            },
            node("350100"),
            now(),
        )
        .unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(e.reason.contains("CA bundle"), "{e}");
    }

    #[test]
    fn a_crl_of_the_ca_revokes_at_load_and_in_statements() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let good = files(dir.path(), &ca, "350100");
        let loaded = load_trust(&good, node("350100"), now()).unwrap();
        let serial = hex::decode(&loaded.certificate.serial).unwrap();

        // A CRL naming another serial changes nothing; one naming this certificate refuses it.
        let crl_path = dir.path().join("ca.crl");
        std::fs::write(&crl_path, ca.revocation_list(&[vec![7, 7, 7]], 30).unwrap()).unwrap();
        let with_crl = TrustFiles {
            crl: Some(crl_path.clone()),
            ..good.clone()
        };
        let ok = load_trust(&with_crl, node("350100"), now()).unwrap();
        assert_eq!(ok.crls.len(), 1);
        std::fs::write(&crl_path, ca.revocation_list(&[serial], 30).unwrap()).unwrap();
        let e = load_trust(&with_crl, node("350100"), now()).unwrap_err();
        assert_eq!(e.key, "tls.cert", "{e}");
        assert!(e.reason.contains("CRL"), "{e}");

        // The statement verifier refuses what that certificate signed once the CRL is in use.
        let crls = read_crl(&crl_path).unwrap();
        let v = crate::statement::StatementVerifier::new(&ca.ca_pem(), RevokedSerials::default())
            .unwrap();
        let s = ok
            .signer
            .sign(&fedgate_proto::v1::KeyEndorsement::default())
            .unwrap();
        v.verify::<fedgate_proto::v1::KeyEndorsement>(&s, now())
            .unwrap();
        v.reload(&ca.ca_pem(), &crls).unwrap();
        let e = v
            .verify::<fedgate_proto::v1::KeyEndorsement>(&s, now())
            .unwrap_err();
        assert!(
            matches!(e, crate::statement::StatementError::Revoked { .. }),
            "{e}"
        );

        std::fs::write(&crl_path, "not a CRL").unwrap();
        assert_eq!(read_crl(&crl_path).unwrap_err().key, "trust.crl");
    }
}

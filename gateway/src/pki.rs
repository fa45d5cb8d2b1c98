//! A development PKI (rcgen, ECDSA P-256) for `fedgate certs`, the demo and tests: one CA that
//! issues leaf certificates whose URI SAN carries the holder's [`Peer`] identity.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, string::Ia5String,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

use crate::ident::Peer;

/// Days a leaf certificate stays valid after issuance.
pub const LEAF_VALIDITY_DAYS: i64 = 825;
/// Days the development CA stays valid after generation.
pub const CA_VALIDITY_DAYS: i64 = 3650;

/// Why a certificate could not be generated, issued or loaded.
#[derive(Debug, Error)]
pub enum PkiError {
    /// rcgen failed while performing the named step.
    #[error("could not {step}: {source}")]
    Rcgen {
        /// What was being done, e.g. "sign the certificate for urn:fedgate:node:350100".
        step: String,
        /// The underlying rcgen error.
        source: rcgen::Error,
    },
    /// An extra DNS name is not a valid IA5 (ASCII) DNS name.
    #[error("extra DNS name {name:?} is not usable in a certificate: {reason}")]
    InvalidDnsName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The CA certificate or key given to [`DevCa::from_pem`] is unusable.
    #[error("CA certificate/key is unusable: {reason}")]
    InvalidCa {
        /// What is wrong with it.
        reason: String,
    },
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM encoded.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM encoded.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A self-signed development certificate authority able to issue fedgate leaf certificates.
pub struct DevCa {
    /// The issuer (DN, key identifier method, key usages and signing key).
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM encoded.
    cert_pem: String,
    /// The CA private key, PEM encoded.
    key_pem: String,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Wraps an rcgen error with the step that failed.
fn rcgen_err(step: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let step = step.into();
    move |source| PkiError::Rcgen { step, source }
}

/// Certificate parameters of a development CA named `common_name` (without validity).
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl DevCa {
    /// Generates a new self-signed CA with an ECDSA P-256 key and the given common name.
    pub fn generate(common_name: &str) -> Result<DevCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("generate the CA key"))?;
        let mut params = ca_params(common_name);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(rcgen_err(format!(
            "self-sign the CA certificate {common_name:?}"
        )))?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Reloads a CA written earlier from [`DevCa::ca_pem`] and [`DevCa::ca_key_pem`].
    pub fn from_pem(ca_cert_pem: &str, ca_key_pem: &str) -> Result<DevCa, PkiError> {
        let invalid = |reason: String| PkiError::InvalidCa { reason };
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes())
            .map_err(|e| invalid(format!("CA certificate is not PEM: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| invalid(format!("CA certificate is not X.509: {e}")))?;
        if !cert.is_ca() {
            return Err(invalid(format!(
                "certificate {:?} is not a CA certificate",
                cert.subject().to_string()
            )));
        }
        // Only the DevCa subject shape (a single UTF8String CN) can be re-encoded byte-identically.
        let attrs: Vec<_> = cert.subject().iter_attributes().collect();
        let common_name = match attrs.as_slice() {
            [attr]
                if attr.attr_type() == &x509_parser::oid_registry::OID_X509_COMMON_NAME
                    && attr.attr_value().tag() == x509_parser::asn1_rs::Tag::Utf8String =>
            {
                attr.as_str()
                    .map_err(|e| invalid(format!("CA common name is not a UTF-8 string: {e}")))?
            }
            _ => {
                return Err(invalid(format!(
                    "CA subject {:?} is not a single UTF8String common name as DevCa writes it",
                    cert.subject().to_string()
                )));
            }
        };
        let key = KeyPair::from_pem(ca_key_pem).map_err(rcgen_err("parse the CA private key"))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(format!(
                "the private key does not belong to CA certificate {common_name:?}"
            )));
        }
        Ok(DevCa {
            issuer: Issuer::new(ca_params(common_name), key),
            cert_pem: ca_cert_pem.to_owned(),
            key_pem: ca_key_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM encoded (the trust anchor every node and agency loads).
    pub fn ca_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PKCS#8 PEM encoded (keep it off production nodes).
    pub fn ca_key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// Issues a leaf certificate for `peer` (URI SAN, DNS SANs `server_name(peer)`, `localhost`
    /// and `extra_dns`, IP SAN 127.0.0.1; serverAuth + clientAuth; valid now-1d..now+825d).
    pub fn issue(&self, peer: &Peer, extra_dns: &[&str]) -> Result<IssuedCert, PkiError> {
        self.issue_registered(peer, None, extra_dns)
    }

    /// Issues an agency's certificate that names the node it is registered at (its subject's organizational
    /// unit), so that any node can tell which node may vouch for it.
    pub fn issue_agency(
        &self,
        uscc: &crate::ident::Uscc,
        node: crate::ident::DivisionCode,
        extra_dns: &[&str],
    ) -> Result<IssuedCert, PkiError> {
        self.issue_registered(&Peer::Agency(uscc.clone()), Some(node), extra_dns)
    }

    fn issue_registered(
        &self,
        peer: &Peer,
        registered_at: Option<crate::ident::DivisionCode>,
        extra_dns: &[&str],
    ) -> Result<IssuedCert, PkiError> {
        let uri = peer.to_uri();
        let mut sans = vec![SanType::URI(
            Ia5String::try_from(uri.as_str())
                .map_err(rcgen_err(format!("encode URI SAN {uri:?}")))?,
        )];
        let mut push = |san: SanType| {
            if !sans.contains(&san) {
                sans.push(san);
            }
        };
        let own = server_name(peer);
        for name in [own.as_str(), "localhost"] {
            let dns =
                Ia5String::try_from(name).map_err(rcgen_err(format!("encode DNS SAN {name:?}")))?;
            push(SanType::DnsName(dns));
        }
        push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        for &name in extra_dns {
            if name.eq_ignore_ascii_case(&own) {
                continue;
            }
            push(extra_san(name)?);
        }

        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name(peer));
        if let Some(node) = registered_at {
            dn.push(DnType::OrganizationalUnitName, node.to_string());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        self.sign(&params, &uri)
    }

    /// A certificate revocation list (PEM) signed by this CA that names the certificates of `serials` (big-endian
    /// bytes), valid from a day ago for `days` days (`[trust] crl`).
    pub fn revocation_list(&self, serials: &[Vec<u8>], days: i64) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::days(1),
            next_update: now + Duration::days(days),
            crl_number: rcgen::SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: now - Duration::hours(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .map_err(rcgen_err("sign the certificate revocation list"))?
            .pem()
            .map_err(rcgen_err("encode the certificate revocation list"))
    }

    /// Signs `params` with a fresh P-256 key; `what` names the subject in errors.
    pub(crate) fn sign(
        &self,
        params: &CertificateParams,
        what: &str,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err(format!("generate the key for {what}")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err(format!("sign the certificate for {what}")))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Turns an extra SAN given on the command line into an IP or DNS SAN.
fn extra_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |reason: &str| PkiError::InvalidDnsName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("it must be 1 to 253 characters long"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*'))
    {
        return Err(bad(
            "only ASCII letters, digits, '-', '.' and '*' are allowed",
        ));
    }
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    if lower == "fedgate" || lower.ends_with(".fedgate") {
        // Clients pin peers by these names; an extra one would let this cert impersonate another peer.
        return Err(bad(
            "names under .fedgate are reserved for the holder's own identity",
        ));
    }
    Ia5String::try_from(name)
        .map(SanType::DnsName)
        .map_err(|e| bad(&e.to_string()))
}

/// The subject common name of a leaf certificate.
fn common_name(peer: &Peer) -> String {
    match peer {
        Peer::Node(code) => format!("fedgate node {code}"),
        Peer::Agency(uscc) => format!("fedgate agency {uscc}"),
    }
}

/// The DNS name in `peer`'s certificate that clients verify: `350100.node.fedgate` or
/// `<uscc lowercased>.agency.fedgate`.
pub fn server_name(peer: &Peer) -> String {
    match peer {
        Peer::Node(code) => format!("{code}.node.fedgate"),
        Peer::Agency(uscc) => format!("{}.agency.fedgate", uscc.as_str().to_ascii_lowercase()),
    }
}

/// Writes `<dir>/<name>.crt` and `<dir>/<name>.key` (the key with mode 0600 on unix), creating
/// `dir` if needed, and returns both paths.
pub fn write_pem_files(
    dir: &Path,
    name: &str,
    cert: &IssuedCert,
) -> io::Result<(PathBuf, PathBuf)> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.contains('\0')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("certificate file name {name:?} must be a plain file name without separators"),
        ));
    }
    fs::create_dir_all(dir)?;
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    fs::write(&cert_path, cert.cert_pem.as_bytes())?;
    write_private(&key_path, cert.key_pem.as_bytes())?;
    Ok((cert_path, key_path))
}

/// Writes a file readable only by its owner (mode 0600 on unix, also if it already existed).
fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path)?;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::{DivisionCode, Uscc};
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    use rustls::server::WebPkiClientVerifier;
    use std::sync::Arc;
    use x509_parser::prelude::*;

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    struct Sans {
        uris: Vec<String>,
        dns: Vec<String>,
        ips: Vec<Vec<u8>>,
    }

    fn sans(der: &[u8]) -> Sans {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        let ext = cert.subject_alternative_name().unwrap().unwrap();
        let mut out = Sans {
            uris: vec![],
            dns: vec![],
            ips: vec![],
        };
        for n in &ext.value.general_names {
            match n {
                GeneralName::URI(u) => out.uris.push(u.to_string()),
                GeneralName::DNSName(d) => out.dns.push(d.to_string()),
                GeneralName::IPAddress(ip) => out.ips.push(ip.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        out
    }

    /// Verifies `leaf_pem` as a client certificate under `ca_pem` with rustls/webpki.
    fn verify_under(ca_pem: &str, leaf_pem: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(der(ca_pem))).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&CertificateDer::from(der(leaf_pem)), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn node_certificate() {
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let peer = Peer::Node("350100".parse::<DivisionCode>().unwrap());
        let issued = ca
            .issue(
                &peer,
                &[
                    "node-a.example",
                    "10.0.0.7",
                    "localhost",
                    "350100.NODE.fedgate",
                ],
            )
            .unwrap();
        let d = der(&issued.cert_pem);
        let s = sans(&d);
        assert_eq!(s.uris, vec!["urn:fedgate:node:350100".to_string()]);
        assert_eq!(
            s.dns,
            vec!["350100.node.fedgate", "localhost", "node-a.example"]
        );
        assert_eq!(s.ips, vec![vec![127, 0, 0, 1], vec![10, 0, 0, 7]]);
        assert_eq!(server_name(&peer), "350100.node.fedgate");

        let (_, cert) = X509Certificate::from_der(&d).unwrap();
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec!["fedgate node 350100"]);
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let validity = cert.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
        assert!((825..=826).contains(&days), "{days}");
        assert!(validity.is_valid());
        assert!(issued.key_pem.contains("BEGIN PRIVATE KEY"));
        assert!(!format!("{issued:?}").contains("BEGIN PRIVATE KEY"));
        verify_under(&ca.ca_pem(), &issued.cert_pem).unwrap();
    }

    #[test]
    fn agency_certificate() {
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let uscc = Uscc::with_check("91350100M000100Y4").unwrap();
        let peer = Peer::Agency(uscc);
        let issued = ca.issue(&peer, &[]).unwrap();
        let s = sans(&der(&issued.cert_pem));
        assert_eq!(
            s.uris,
            vec!["urn:fedgate:agency:91350100M000100Y43".to_string()]
        );
        assert_eq!(
            s.dns,
            vec!["91350100m000100y43.agency.fedgate", "localhost"]
        );
        assert_eq!(s.ips, vec![vec![127, 0, 0, 1]]);
        assert_eq!(server_name(&peer), "91350100m000100y43.agency.fedgate");
        verify_under(&ca.ca_pem(), &issued.cert_pem).unwrap();
    }

    #[test]
    fn foreign_ca_does_not_verify() {
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let other = DevCa::generate("fedgate test CA").unwrap();
        let peer = Peer::Node("350102".parse().unwrap());
        let issued = other.issue(&peer, &[]).unwrap();
        assert!(verify_under(&ca.ca_pem(), &issued.cert_pem).is_err());
    }

    #[test]
    fn bad_extra_dns_rejected() {
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let peer = Peer::Node("350102".parse().unwrap());
        for bad in [
            "",
            "bad name",
            "节点.example",
            "350000.node.fedgate",
            "*.NODE.fedgate.",
        ] {
            let e = ca.issue(&peer, &[bad]).unwrap_err();
            assert!(matches!(e, PkiError::InvalidDnsName { .. }), "{e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn reload_ca_from_pem() {
        let ca = DevCa::generate("fedgate reload CA").unwrap();
        let again = DevCa::from_pem(&ca.ca_pem(), &ca.ca_key_pem()).unwrap();
        let issued = again
            .issue(&Peer::Node("350000".parse().unwrap()), &[])
            .unwrap();
        verify_under(&ca.ca_pem(), &issued.cert_pem).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));

        let other = DevCa::generate("other").unwrap();
        let e = DevCa::from_pem(&ca.ca_pem(), &other.ca_key_pem()).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        let leaf = ca
            .issue(&Peer::Node("350000".parse().unwrap()), &[])
            .unwrap();
        let e = DevCa::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
        assert!(DevCa::from_pem("garbage", &ca.ca_key_pem()).is_err());
    }

    #[test]
    fn writes_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let issued = ca
            .issue(&Peer::Node("350100".parse().unwrap()), &[])
            .unwrap();
        let sub = dir.path().join("certs");
        let (crt, key) = write_pem_files(&sub, "350100", &issued).unwrap();
        assert_eq!(crt, sub.join("350100.crt"));
        assert_eq!(key, sub.join("350100.key"));
        assert_eq!(fs::read_to_string(&crt).unwrap(), issued.cert_pem);
        assert_eq!(fs::read_to_string(&key).unwrap(), issued.key_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        // Rewriting keeps the key private and replaces the content.
        let again = ca
            .issue(&Peer::Node("350100".parse().unwrap()), &[])
            .unwrap();
        write_pem_files(&sub, "350100", &again).unwrap();
        assert_eq!(fs::read_to_string(&key).unwrap(), again.key_pem);
        for bad in ["", "..", "a/b", "a\\b"] {
            let e = write_pem_files(&sub, bad, &issued).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
    }
}

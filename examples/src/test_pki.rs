//! A throw-away federation PKI for tests (rcgen).

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// A test CA issuing node and agency certificates.
pub(crate) struct Pki {
    /// The CA certificate (PEM).
    pub(crate) ca_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params =
            CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test federation CA");
        let issuer = CertifiedIssuer::self_signed(params, key).unwrap_or_else(|e| panic!("{e}"));
        Self {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    /// (cert PEM, key PEM) with the given URI SAN and DNS names.
    pub(crate) fn leaf(&self, uri: &str, dns: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut names: Vec<String> = dns.iter().map(|d| (*d).to_owned()).collect();
        names.push("localhost".into());
        names.push("127.0.0.1".into());
        let mut params = CertificateParams::new(names).unwrap_or_else(|e| panic!("{e}"));
        let uri = uri.try_into().unwrap_or_else(|e| panic!("{e}"));
        params.subject_alt_names.push(SanType::URI(uri));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("{e}"));
        (cert.pem(), key.serialize_pem())
    }
}

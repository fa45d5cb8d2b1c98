//! Signed statements: what one node asserts to the rest of the federation (a consumer assertion, a
//! revocation, the endorsement of its audit key), signed with the key of its federation certificate.
//!
//! Any node checks a statement with the federation CA alone: the certificate travels with the statement, must
//! chain to the CA, must name a node in its URI SAN and must not be revoked; the signature covers the
//! statement's kind, so a signature made for one kind never passes for another. A checked statement becomes a
//! [`Verified`] value naming its signer; nothing else in the crate can make one.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use fedgate_proto::v1::{
    CacheInvalidation, ConsumerAssertion, KeyEndorsement, Revocation, SignedStatement,
};
use prost::Message;
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use thiserror::Error;
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ident::{DivisionCode, Peer};
use crate::limits::excerpt;
use crate::tls::{TlsMaterial, peer_from_cert};

/// Largest statement body accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// Largest signer certificate accepted.
pub const MAX_CERTIFICATE: usize = 8 * 1024;
/// Largest signature accepted.
const MAX_SIGNATURE: usize = 512;
/// Verified certificates remembered, so a chain is checked once and not per statement.
const MAX_CACHED_CERTIFICATES: usize = 4096;
/// What every signed message starts with.
const DOMAIN: &[u8] = b"fedgate-statement/v1";

/// Why a statement was refused or could not be made; each names what was wrong.
#[derive(Debug, Error)]
pub enum StatementError {
    /// The message carries no statement where one is required.
    #[error("{what} carries no signed statement")]
    Missing {
        /// What should have carried it.
        what: &'static str,
    },
    /// The statement is of another kind than the one expected here.
    #[error("statement is of kind {got:?}, not {expected}")]
    WrongKind {
        /// The kind required here.
        expected: &'static str,
        /// The kind it claims (at most a short prefix).
        got: String,
    },
    /// A part of the statement is larger than accepted.
    #[error("statement {what} has {len} bytes, more than the limit of {max}")]
    Oversized {
        /// Which part.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The signature scheme is not one this node knows.
    #[error("statement signature scheme {0:?} is unknown")]
    UnknownScheme(String),
    /// The signer's certificate does not verify under the federation CA, or is not valid at the time.
    #[error("statement certificate is not a valid federation certificate: {0}")]
    BadCertificate(String),
    /// The certificate is valid but names no node.
    #[error("statement is signed by {0}, which is not a node")]
    NotANode(String),
    /// The certificate was revoked by the federation.
    #[error("the certificate {serial} of {peer} is revoked")]
    Revoked {
        /// Whom the certificate names.
        peer: Peer,
        /// The certificate's serial number, hex.
        serial: String,
    },
    /// The signature does not verify over the statement.
    #[error("{kind} statement of node {signer} carries a signature that does not verify")]
    BadSignature {
        /// The statement's kind.
        kind: &'static str,
        /// The node the certificate names.
        signer: DivisionCode,
    },
    /// The body does not decode as its kind.
    #[error("{kind} statement body does not decode: {reason}")]
    Malformed {
        /// The statement's kind.
        kind: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// A valid key endorsement, but of another key or by another node than the one it should be.
    #[error(
        "the key is not endorsed by node {node}'s certificate (the endorsement is node {signer}'s, of another key or node)"
    )]
    NotEndorsed {
        /// The node whose key it should be.
        node: DivisionCode,
        /// The node that signed the endorsement.
        signer: DivisionCode,
    },
    /// This node's own signing material is unusable.
    #[error("signing material: {0}")]
    Signing(String),
}

impl StatementError {
    /// Whether the error is a structural defect of the message (INVALID_ARGUMENT) rather than a failed proof
    /// (PERMISSION_DENIED).
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            Self::WrongKind { .. }
                | Self::Oversized { .. }
                | Self::UnknownScheme(_)
                | Self::Malformed { .. }
        )
    }
}

impl From<StatementError> for crate::error::Error {
    fn from(e: StatementError) -> Self {
        if e.is_malformed() {
            crate::error::Error::InvalidArgument(e.to_string())
        } else {
            crate::error::Error::PermissionDenied(e.to_string())
        }
    }
}

/// A kind of statement: its name, signed with it, and its body type.
pub trait Kind: Message + Default {
    /// The kind's name, as carried in `SignedStatement.kind`.
    const KIND: &'static str;
}

impl Kind for ConsumerAssertion {
    const KIND: &'static str = "fedgate.v1.ConsumerAssertion";
}

impl Kind for Revocation {
    const KIND: &'static str = "fedgate.v1.Revocation";
}

impl Kind for CacheInvalidation {
    const KIND: &'static str = "fedgate.v1.CacheInvalidation";
}

impl Kind for KeyEndorsement {
    const KIND: &'static str = "fedgate.v1.KeyEndorsement";
}

impl Kind for fedgate_proto::v1::DeliveryBatch {
    const KIND: &'static str = "fedgate.v1.DeliveryBatch";
}

/// A signature scheme; new schemes (such as SM2 with SM3) are added here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// ECDSA over P-256 with SHA-256, ASN.1 DER signatures (the development PKI's node keys).
    EcdsaP256Sha256,
    /// Ed25519.
    Ed25519,
}

impl Scheme {
    /// The scheme's name in `SignedStatement.scheme`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Scheme::Ed25519 => "ed25519",
        }
    }

    /// The scheme named `name`.
    pub fn from_name(name: &str) -> Result<Self, StatementError> {
        match name {
            "ecdsa-p256-sha256" => Ok(Scheme::EcdsaP256Sha256),
            "ed25519" => Ok(Scheme::Ed25519),
            other => Err(StatementError::UnknownScheme(excerpt(other))),
        }
    }

    fn tls(self) -> rustls::SignatureScheme {
        match self {
            Scheme::EcdsaP256Sha256 => rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
            Scheme::Ed25519 => rustls::SignatureScheme::ED25519,
        }
    }

    fn verification(self) -> &'static dyn rustls::pki_types::SignatureVerificationAlgorithm {
        match self {
            Scheme::EcdsaP256Sha256 => webpki::ring::ECDSA_P256_SHA256,
            Scheme::Ed25519 => webpki::ring::ED25519,
        }
    }
}

/// The bytes a signature covers.
fn signed_message(kind: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + kind.len() + body.len() + 2);
    m.extend_from_slice(DOMAIN);
    m.push(0);
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// Signs statements for this node with the key of its federation certificate; every clone follows
/// [`NodeSigner::adopt`], so a certificate reloaded at run time signs everything made after it.
#[derive(Clone)]
pub struct NodeSigner {
    node: DivisionCode,
    current: Arc<ArcSwap<SigningCert>>,
}

/// The certificate and key a [`NodeSigner`] signs with at the moment.
struct SigningCert {
    certificate: Vec<u8>,
    scheme: Scheme,
    key: Arc<dyn rustls::sign::SigningKey>,
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner")
            .field("node", &self.node)
            .field("scheme", &self.current.load().scheme)
            .finish_non_exhaustive()
    }
}

impl NodeSigner {
    /// The signer of the node whose certificate and key `m` holds.
    pub fn from_material(m: &TlsMaterial) -> Result<Self, StatementError> {
        let bad = |e: String| StatementError::Signing(e);
        let certificate = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
            .next()
            .ok_or_else(|| bad("no certificate".into()))?
            .map_err(|e| bad(format!("certificate PEM: {e}")))?;
        let node = match peer_from_cert(&certificate).map_err(|e| bad(e.to_string()))? {
            Peer::Node(code) => code,
            other => return Err(StatementError::NotANode(other.to_uri())),
        };
        let der = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes())
            .map_err(|e| bad(format!("private key PEM: {e}")))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| bad(format!("private key: {e}")))?;
        let scheme = [Scheme::EcdsaP256Sha256, Scheme::Ed25519]
            .into_iter()
            .find(|s| key.choose_scheme(&[s.tls()]).is_some())
            .ok_or_else(|| bad("the key is neither ECDSA P-256 nor Ed25519".into()))?;
        Ok(Self {
            node,
            current: Arc::new(ArcSwap::from_pointee(SigningCert {
                certificate: certificate.to_vec(),
                scheme,
                key,
            })),
        })
    }

    /// The node this signer speaks for.
    pub fn node(&self) -> DivisionCode {
        self.node
    }

    /// The certificate (DER) statements are signed under now.
    pub fn certificate(&self) -> Vec<u8> {
        self.current.load().certificate.clone()
    }

    /// Signs from now on (in this signer and every clone of it) with `other`'s certificate and key, which must
    /// be the same node's.
    pub fn adopt(&self, other: &NodeSigner) -> Result<(), StatementError> {
        if other.node != self.node {
            return Err(StatementError::Signing(format!(
                "the new certificate is node {}'s, not node {}'s",
                other.node, self.node
            )));
        }
        self.current.store(other.current.load_full());
        Ok(())
    }

    /// Signs `body` as a statement of its kind.
    pub fn sign<T: Kind>(&self, body: &T) -> Result<SignedStatement, StatementError> {
        let body = body.encode_to_vec();
        let current = self.current.load();
        let signer = current
            .key
            .choose_scheme(&[current.scheme.tls()])
            .ok_or_else(|| StatementError::Signing("the key lost its scheme".into()))?;
        let signature = signer
            .sign(&signed_message(T::KIND, &body))
            .map_err(|e| StatementError::Signing(e.to_string()))?;
        Ok(SignedStatement {
            kind: T::KIND.to_owned(),
            body,
            certificate: current.certificate.clone(),
            scheme: current.scheme.name().to_owned(),
            signature,
        })
    }
}

/// A statement whose signature and certificate were checked: its body and the node that signed it.
#[derive(Debug, Clone)]
pub struct Verified<T> {
    signer: DivisionCode,
    body: T,
}

impl<T> Verified<T> {
    /// The node that signed the statement, from its certificate.
    pub fn signer(&self) -> DivisionCode {
        self.signer
    }

    /// The statement's body.
    pub fn body(&self) -> &T {
        &self.body
    }
}

/// What is remembered of a verified certificate.
#[derive(Debug, Clone)]
struct CheckedCert {
    peer: Peer,
    registered_at: Option<DivisionCode>,
    not_before: i64,
    not_after: i64,
    /// Its serial number without leading zeros, checked against the revoked serials at every use.
    serial: Vec<u8>,
    /// The [`TrustAnchors::generation`] it was checked under; another one checks it again.
    generation: u64,
}

/// Serial numbers of federation certificates the CA revoked: refused at every listener and for every statement.
/// Clones share one list, so [`RevokedSerials::replace`] reaches every listener and verifier at once.
#[derive(Debug, Clone, Default)]
pub struct RevokedSerials(Arc<ArcSwap<HashSet<Vec<u8>>>>);

impl RevokedSerials {
    /// The serials given in hex (as `openssl x509 -serial` prints them, colons allowed).
    pub fn parse(serials: &[String]) -> Result<Self, StatementError> {
        let mut set = HashSet::new();
        for s in serials {
            let hex_text: String = s.chars().filter(|c| *c != ':').collect();
            let serial = hex::decode(&hex_text).map_err(|e| {
                StatementError::Signing(format!("revoked serial {:?}: {e}", excerpt(s)))
            })?;
            set.insert(strip_leading_zeros(&serial).to_vec());
        }
        Ok(Self(Arc::new(ArcSwap::from_pointee(set))))
    }

    /// Takes `other`'s serials as this list's (and every clone's) from now on.
    pub fn replace(&self, other: &RevokedSerials) {
        self.0.store(other.0.load_full());
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    /// Whether no serial is revoked.
    pub fn is_empty(&self) -> bool {
        self.0.load().is_empty()
    }

    /// Whether `serial` (big-endian bytes, leading zeros allowed) is revoked.
    pub fn contains_serial(&self, serial: &[u8]) -> bool {
        self.0.load().contains(strip_leading_zeros(serial))
    }

    /// The serial (hex) of the certificate `der` if it is revoked.
    pub fn revoked(&self, der: &[u8]) -> Option<String> {
        if self.0.load().is_empty() {
            return None;
        }
        let (_, x509) = X509Certificate::from_der(der).ok()?;
        let serial = strip_leading_zeros(x509.raw_serial());
        self.contains_serial(serial).then(|| hex::encode(serial))
    }
}

/// The trust anchors and certificate revocation lists statements are checked against, swapped whole on reload.
struct TrustAnchors {
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<webpki::CertRevocationList<'static>>,
    /// Increases with every reload, so certificates checked under an earlier bundle are checked again.
    generation: u64,
}

impl TrustAnchors {
    fn parse(
        ca_pem: &str,
        crls: &[CertificateRevocationListDer<'_>],
        generation: u64,
    ) -> Result<Self, StatementError> {
        let bad = |e: String| StatementError::Signing(format!("CA bundle: {e}"));
        let mut anchors = Vec::new();
        for der in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let der = der.map_err(|e| bad(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| bad(format!("{e:?}")))?
                .to_owned();
            anchors.push(anchor);
        }
        if anchors.is_empty() {
            return Err(bad("no CA certificate".into()));
        }
        let crls = crls
            .iter()
            .map(|der| {
                webpki::OwnedCertRevocationList::from_der(der)
                    .map(webpki::CertRevocationList::from)
                    .map_err(|e| {
                        StatementError::Signing(format!("certificate revocation list: {e:?}"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            anchors,
            crls,
            generation,
        })
    }
}

/// Checks statements against the federation CA and its list of revoked certificates.
pub struct StatementVerifier {
    trust: ArcSwap<TrustAnchors>,
    revoked: RevokedSerials,
    checked: DashMap<[u8; 32], CheckedCert>,
}

impl std::fmt::Debug for StatementVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let trust = self.trust.load();
        f.debug_struct("StatementVerifier")
            .field("anchors", &trust.anchors.len())
            .field("crls", &trust.crls.len())
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

impl StatementVerifier {
    /// A verifier trusting the CA certificates in `ca_pem` and refusing the certificates in `revoked`.
    pub fn new(ca_pem: &str, revoked: RevokedSerials) -> Result<Self, StatementError> {
        Self::with_crls(ca_pem, &[], revoked)
    }

    /// A verifier trusting the CA certificates in `ca_pem` and refusing the certificates in `revoked` and those
    /// the revocation lists `crls` (each signed by its CA) name.
    pub fn with_crls(
        ca_pem: &str,
        crls: &[CertificateRevocationListDer<'_>],
        revoked: RevokedSerials,
    ) -> Result<Self, StatementError> {
        Ok(Self {
            trust: ArcSwap::from_pointee(TrustAnchors::parse(ca_pem, crls, 0)?),
            revoked,
            checked: DashMap::new(),
        })
    }

    /// Trusts the CA certificates in `ca_pem` and applies the revocation lists `crls` from now on; every
    /// certificate is checked again at its next use.
    pub fn reload(
        &self,
        ca_pem: &str,
        crls: &[CertificateRevocationListDer<'_>],
    ) -> Result<(), StatementError> {
        let generation = self.trust.load().generation + 1;
        self.trust
            .store(Arc::new(TrustAnchors::parse(ca_pem, crls, generation)?));
        self.checked.clear();
        Ok(())
    }

    /// Checks `s` as a statement of kind `T` made at `at` (seconds since the Unix epoch): the certificate
    /// chains to the CA and was valid then, names a node and is not revoked, and the signature verifies.
    pub fn verify<T: Kind>(
        &self,
        s: &SignedStatement,
        at_unix: i64,
    ) -> Result<Verified<T>, StatementError> {
        if s.kind != T::KIND {
            return Err(StatementError::WrongKind {
                expected: T::KIND,
                got: excerpt(&s.kind),
            });
        }
        for (what, len, max) in [
            ("body", s.body.len(), MAX_BODY),
            ("certificate", s.certificate.len(), MAX_CERTIFICATE),
            ("signature", s.signature.len(), MAX_SIGNATURE),
        ] {
            if len > max {
                return Err(StatementError::Oversized { what, len, max });
            }
        }
        let scheme = Scheme::from_name(&s.scheme)?;
        let cert = self.check_certificate(&s.certificate, at_unix)?;
        let signer = match cert.peer {
            Peer::Node(code) => code,
            other => return Err(StatementError::NotANode(other.to_uri())),
        };
        let der = CertificateDer::from(s.certificate.as_slice());
        let ee = EndEntityCert::try_from(&der)
            .map_err(|e| StatementError::BadCertificate(format!("{e:?}")))?;
        ee.verify_signature(
            scheme.verification(),
            &signed_message(T::KIND, &s.body),
            &s.signature,
        )
        .map_err(|_| StatementError::BadSignature {
            kind: T::KIND,
            signer,
        })?;
        let body = T::decode(s.body.as_slice()).map_err(|e| StatementError::Malformed {
            kind: T::KIND,
            reason: e.to_string(),
        })?;
        Ok(Verified { signer, body })
    }

    /// Checks that `s` is `node`'s certificate-signed endorsement of `key`, valid at `at_unix`.
    pub fn check_endorsement(
        &self,
        s: &SignedStatement,
        node: DivisionCode,
        key: &[u8],
        at_unix: i64,
    ) -> Result<(), StatementError> {
        let v: Verified<KeyEndorsement> = self.verify(s, at_unix)?;
        if v.signer() != node || v.body().node_code != node.as_str() || v.body().public_key != key {
            return Err(StatementError::NotEndorsed {
                node,
                signer: v.signer(),
            });
        }
        Ok(())
    }

    /// Checks an agency's certificate as valid at `at_unix`: chains to the CA, not revoked; returns the agency
    /// and the node the certificate registers it at.
    pub fn verify_agency(
        &self,
        der: &[u8],
        at_unix: i64,
    ) -> Result<(crate::ident::Uscc, Option<DivisionCode>), StatementError> {
        if der.len() > MAX_CERTIFICATE {
            return Err(StatementError::Oversized {
                what: "agency certificate",
                len: der.len(),
                max: MAX_CERTIFICATE,
            });
        }
        let cert = self.check_certificate(der, at_unix)?;
        match cert.peer {
            Peer::Agency(uscc) => Ok((uscc, cert.registered_at)),
            other => Err(StatementError::BadCertificate(format!(
                "{} is not an agency",
                other.to_uri()
            ))),
        }
    }

    /// Checks a signer certificate once per trust bundle and remembers it; later statements only check the
    /// validity window and the revoked serials.
    fn check_certificate(&self, der: &[u8], at_unix: i64) -> Result<CheckedCert, StatementError> {
        let digest: [u8; 32] = Sha256::digest(der).into();
        let trust = self.trust.load_full();
        let cached = self
            .checked
            .get(&digest)
            .map(|c| c.clone())
            .filter(|c| c.generation == trust.generation);
        let cert = match cached {
            Some(c) => c,
            None => {
                let c = self.check_chain(der, &trust)?;
                if self.checked.len() >= MAX_CACHED_CERTIFICATES {
                    self.checked.clear();
                }
                self.checked.insert(digest, c.clone());
                c
            }
        };
        if self.revoked.contains_serial(&cert.serial) {
            return Err(StatementError::Revoked {
                peer: cert.peer,
                serial: hex::encode(&cert.serial),
            });
        }
        if at_unix < cert.not_before || at_unix > cert.not_after {
            return Err(StatementError::BadCertificate(format!(
                "the certificate of {} is not valid at unix time {at_unix}",
                cert.peer
            )));
        }
        Ok(cert)
    }

    fn check_chain(&self, der: &[u8], trust: &TrustAnchors) -> Result<CheckedCert, StatementError> {
        let bad = |e: String| StatementError::BadCertificate(e);
        let (_, x509) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        let not_before = x509.validity().not_before.timestamp();
        let not_after = x509.validity().not_after.timestamp();
        let serial = strip_leading_zeros(x509.raw_serial()).to_vec();
        let peer = peer_from_cert(der).map_err(|e| bad(e.to_string()))?;
        let cert = CertificateDer::from(der);
        let ee = EndEntityCert::try_from(&cert).map_err(|e| bad(format!("{e:?}")))?;
        // The chain is checked within the certificate's own validity window; the statement's time is checked
        // against that window by the caller, so statements made before a rotation stay verifiable.
        let when = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(not_before.max(0)).unwrap_or(0) + 1,
        ));
        let crls: Vec<&webpki::CertRevocationList<'_>> = trust.crls.iter().collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crls).ok().map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::EndEntity)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .build()
        });
        let verified = ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &trust.anchors,
            &[],
            when,
            KeyUsage::client_auth(),
            revocation,
            None,
        );
        match verified {
            Ok(_) => {}
            Err(webpki::Error::CertRevoked) => {
                return Err(StatementError::Revoked {
                    peer,
                    serial: hex::encode(&serial),
                });
            }
            Err(e) => return Err(bad(format!("{e:?}"))),
        }
        Ok(CheckedCert {
            registered_at: crate::tls::registered_node(der),
            peer,
            not_before,
            not_after,
            serial,
            generation: trust.generation,
        })
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[i..]
}

/// Requires a statement where one must be present.
pub fn required<'a>(
    s: Option<&'a SignedStatement>,
    what: &'static str,
) -> Result<&'a SignedStatement, StatementError> {
    s.ok_or(StatementError::Missing { what })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::DevCa;

    fn material(ca: &DevCa, peer: &Peer) -> TlsMaterial {
        let issued = ca.issue(peer, &[]).unwrap();
        TlsMaterial {
            ca_pem: ca.ca_pem(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        }
    }

    fn node(code: &str) -> Peer {
        Peer::Node(code.parse().unwrap())
    }

    fn endorsement() -> KeyEndorsement {
        KeyEndorsement {
            node_code: "350102".into(),
            public_key: vec![7; 32],
            issued_at: 1,
        }
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn a_signed_statement_verifies_and_names_its_signer() {
        let ca = DevCa::generate("test").unwrap();
        let signer = NodeSigner::from_material(&material(&ca, &node("350102"))).unwrap();
        let verifier = StatementVerifier::new(&ca.ca_pem(), RevokedSerials::default()).unwrap();
        let s = signer.sign(&endorsement()).unwrap();
        let v = verifier.verify::<KeyEndorsement>(&s, now()).unwrap();
        assert_eq!(v.signer().as_str(), "350102");
        assert_eq!(v.body(), &endorsement());
        // Checked again from the remembered certificate.
        verifier.verify::<KeyEndorsement>(&s, now()).unwrap();
    }

    #[test]
    fn altered_body_kind_and_signature_are_refused() {
        let ca = DevCa::generate("test").unwrap();
        let signer = NodeSigner::from_material(&material(&ca, &node("350102"))).unwrap();
        let verifier = StatementVerifier::new(&ca.ca_pem(), RevokedSerials::default()).unwrap();
        let s = signer.sign(&endorsement()).unwrap();

        let mut altered = s.clone();
        altered.body[3] ^= 1;
        assert!(matches!(
            verifier.verify::<KeyEndorsement>(&altered, now()),
            Err(StatementError::BadSignature { .. })
        ));
        let mut sig = s.clone();
        sig.signature.clear();
        assert!(matches!(
            verifier.verify::<KeyEndorsement>(&sig, now()),
            Err(StatementError::BadSignature { .. })
        ));
        // The same bytes under another kind: the kind is part of what is signed.
        let mut other = s.clone();
        other.kind = Revocation::KIND.into();
        assert!(matches!(
            verifier.verify::<Revocation>(&other, now()),
            Err(StatementError::BadSignature { .. })
        ));
        assert!(matches!(
            verifier.verify::<Revocation>(&s, now()),
            Err(StatementError::WrongKind { .. })
        ));
        let mut scheme = s.clone();
        scheme.scheme = "sm2".into();
        assert!(matches!(
            verifier.verify::<KeyEndorsement>(&scheme, now()),
            Err(StatementError::UnknownScheme(_))
        ));
    }

    #[test]
    fn a_foreign_ca_an_agency_and_a_revoked_certificate_are_refused() {
        let ca = DevCa::generate("test").unwrap();
        let foreign = DevCa::generate("foreign").unwrap();
        let verifier = StatementVerifier::new(&ca.ca_pem(), RevokedSerials::default()).unwrap();
        let rogue = NodeSigner::from_material(&material(&foreign, &node("350102"))).unwrap();
        let s = rogue.sign(&endorsement()).unwrap();
        assert!(matches!(
            verifier.verify::<KeyEndorsement>(&s, now()),
            Err(StatementError::BadCertificate(_))
        ));

        let agency = Peer::Agency("11350102000000001R".parse().unwrap());
        assert!(matches!(
            NodeSigner::from_material(&material(&ca, &agency)),
            Err(StatementError::NotANode(_))
        ));

        let m = material(&ca, &node("350102"));
        let signer = NodeSigner::from_material(&m).unwrap();
        let der = CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, x509) = X509Certificate::from_der(&der).unwrap();
        let serial = hex::encode(x509.raw_serial());
        let strict =
            StatementVerifier::new(&ca.ca_pem(), RevokedSerials::parse(&[serial]).unwrap())
                .unwrap();
        let s = signer.sign(&endorsement()).unwrap();
        assert!(matches!(
            strict.verify::<KeyEndorsement>(&s, now()),
            Err(StatementError::Revoked { .. })
        ));
        // Outside the certificate's validity window.
        assert!(matches!(
            verifier.verify::<KeyEndorsement>(&s, 0),
            Err(StatementError::BadCertificate(_))
        ));
    }

    #[test]
    fn statements_made_before_a_certificate_rotation_still_verify() {
        let ca = DevCa::generate("test").unwrap();
        let verifier = StatementVerifier::new(&ca.ca_pem(), RevokedSerials::default()).unwrap();
        let old = NodeSigner::from_material(&material(&ca, &node("350102"))).unwrap();
        let before = old.sign(&endorsement()).unwrap();
        // The node's certificate and key are replaced; both generations verify, each under its own certificate.
        let new = NodeSigner::from_material(&material(&ca, &node("350102"))).unwrap();
        let after = new.sign(&endorsement()).unwrap();
        assert_ne!(before.certificate, after.certificate);
        for s in [&before, &after] {
            let v = verifier.verify::<KeyEndorsement>(s, now()).unwrap();
            assert_eq!(v.signer().as_str(), "350102");
        }
        // A signature of one generation does not pass under the other's certificate.
        let mut mixed = after.clone();
        mixed.certificate = before.certificate.clone();
        assert!(matches!(
            verifier.verify::<KeyEndorsement>(&mixed, now()),
            Err(StatementError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_reloaded_bundle_revoked_list_and_signer_apply_at_once() {
        let ca = DevCa::generate("fedgate test CA").unwrap();
        let next = DevCa::generate("fedgate next CA").unwrap();
        let m = material(&ca, &node("350100"));
        let signer = NodeSigner::from_material(&m).unwrap();
        let clone = signer.clone();
        let revoked = RevokedSerials::default();
        let v = StatementVerifier::new(&ca.ca_pem(), revoked.clone()).unwrap();
        let s = clone.sign(&endorsement()).unwrap();
        v.verify::<KeyEndorsement>(&s, now()).unwrap();

        // A serial listed later is refused although its chain was checked and remembered before.
        let (_, x509) = X509Certificate::from_der(&s.certificate).unwrap();
        revoked.replace(&RevokedSerials::parse(&[hex::encode(x509.raw_serial())]).unwrap());
        let e = v.verify::<KeyEndorsement>(&s, now()).unwrap_err();
        assert!(matches!(e, StatementError::Revoked { .. }), "{e}");
        revoked.replace(&RevokedSerials::default());

        // Moved to a certificate of the next CA: every clone signs with it; verifiers follow their bundle.
        let moved = material(&next, &node("350100"));
        signer
            .adopt(&NodeSigner::from_material(&moved).unwrap())
            .unwrap();
        let s2 = clone.sign(&endorsement()).unwrap();
        assert_ne!(s2.certificate, s.certificate);
        assert!(matches!(
            v.verify::<KeyEndorsement>(&s2, now()),
            Err(StatementError::BadCertificate(_))
        ));
        v.reload(&format!("{}{}", ca.ca_pem(), next.ca_pem()), &[])
            .unwrap();
        v.verify::<KeyEndorsement>(&s2, now()).unwrap();
        v.verify::<KeyEndorsement>(&s, now()).unwrap();
        // Without the old CA, the old certificate's statements are refused at their next check.
        v.reload(&next.ca_pem(), &[]).unwrap();
        assert!(v.verify::<KeyEndorsement>(&s, now()).is_err());
        // Another node's certificate is never adopted.
        let other = NodeSigner::from_material(&material(&ca, &node("350200"))).unwrap();
        assert!(signer.adopt(&other).is_err());
    }

    #[test]
    fn oversized_parts_are_refused_before_any_work() {
        let ca = DevCa::generate("test").unwrap();
        let verifier = StatementVerifier::new(&ca.ca_pem(), RevokedSerials::default()).unwrap();
        let s = SignedStatement {
            kind: KeyEndorsement::KIND.into(),
            body: vec![0; MAX_BODY + 1],
            ..Default::default()
        };
        let e = verifier.verify::<KeyEndorsement>(&s, now()).unwrap_err();
        assert!(e.is_malformed(), "{e}");
        assert!(e.to_string().contains("16384"), "{e}");
    }
}

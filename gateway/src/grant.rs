//! Signed grants: the provider's node signs each grant it issues (Ed25519), so any node on the route can
//! verify it without a round trip, and every request is checked against it (seed 002 art. 22-25).
//!
//! A [`SignedGrant`] carries the prost encoding of a [`Grant`], the issuer's signature over exactly those
//! bytes and the issuer's public key. [`open`] accepts it only if that key is the one the caller trusts for
//! the issuer and the signature verifies; [`check`] then decides whether one concrete use (consumer,
//! resource, mode, fields, time) lies inside the grant. Revocation is not part of the token; the caller
//! checks its revocation list separately.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use fedgate_proto::v1::{Grant, ShareMode, SignedGrant};
use prost::Message;
use rand::RngCore;
use thiserror::Error;

/// Why a grant was refused or a grant key could not be used; every variant names what was wrong.
#[derive(Debug, Error)]
pub enum GrantError {
    /// The signature does not verify over the grant bytes (altered or forged token).
    #[error("{}signature does not verify against the issuer's key: the token was altered or forged", id_prefix(.grant_id.as_deref()))]
    BadSignature {
        /// Id of the grant the token claims to carry, when its bytes decode at all.
        grant_id: Option<String>,
    },
    /// The token was signed by a key other than the one trusted for its issuer.
    #[error(
        "{}token is signed by key {presented}, not by the issuer's trusted key {trusted}",
        id_prefix(.grant_id.as_deref())
    )]
    UntrustedIssuer {
        /// Id of the grant the token claims to carry, when its bytes decode at all.
        grant_id: Option<String>,
        /// The public key in the token, hex.
        presented: String,
        /// The key trusted for the issuer, hex.
        trusted: String,
    },
    /// The token or a key is structurally invalid (wrong length, undecodable grant, invalid key).
    #[error("malformed grant token: {0}")]
    Malformed(String),
    /// The caller is not the grantee.
    #[error("grant {grant_id} was issued to {grantee}, not to {caller}")]
    WrongGrantee {
        /// The grant's id.
        grant_id: String,
        /// The grantee agency's USCC.
        grantee: String,
        /// The calling agency's USCC.
        caller: String,
    },
    /// The grant names another node for its grantee.
    #[error("grant {grant_id} was issued to an agency at node {granted}, not at node {asked}")]
    WrongNode {
        /// The grant's id.
        grant_id: String,
        /// The grantee's node.
        granted: String,
        /// The node vouching for the caller.
        asked: String,
    },
    /// The use states another purpose than the one the grant was issued for.
    #[error("grant {grant_id} was issued for the purpose {granted:?}, not {asked:?}")]
    WrongPurpose {
        /// The grant's id.
        grant_id: String,
        /// The granted purpose.
        granted: String,
        /// The purpose stated (at most a prefix).
        asked: String,
    },
    /// The grant is for another resource.
    #[error("grant {grant_id} is for resource {granted}, not for {asked}")]
    WrongResource {
        /// The grant's id.
        grant_id: String,
        /// The resource the grant covers.
        granted: String,
        /// The resource asked for.
        asked: String,
    },
    /// The grant's expiry has passed.
    #[error("grant {grant_id} expired at {} (unix {expired_at})", unix_to_rfc3339(*.expired_at))]
    Expired {
        /// The grant's id.
        grant_id: String,
        /// Its expiry, seconds since the Unix epoch.
        expired_at: i64,
    },
    /// The grant allows another mode.
    #[error("grant {grant_id} allows mode {granted} only, not {asked}")]
    ModeNotGranted {
        /// The grant's id.
        grant_id: String,
        /// The granted mode's proto name (`SHARE_MODE_VERIFY`, …).
        granted: String,
        /// The requested mode's proto name.
        asked: String,
    },
    /// A requested field is outside the grant.
    #[error("grant {grant_id} does not include field {field:?}")]
    FieldNotGranted {
        /// The grant's id.
        grant_id: String,
        /// The first requested field not in the grant.
        field: String,
    },
    /// The grant key file could not be read or written.
    #[error("grant key file {}: {source}", .path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The grant key file exists but does not hold a key.
    #[error("grant key file {}: {reason}", .path.display())]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its contents.
        reason: String,
    },
}

/// `"grant <id>: "` when the id is known, nothing otherwise.
fn id_prefix(grant_id: Option<&str>) -> String {
    grant_id
        .map(|id| format!("grant {id}: "))
        .unwrap_or_default()
}

/// An instant as RFC 3339 UTC, or the bare number when it is out of range.
fn unix_to_rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// A node's grant-signing key (Ed25519); also signs audit checkpoints.
#[derive(Clone)]
pub struct GrantKey {
    /// The secret key and its public half.
    key: SigningKey,
}

impl fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantKey")
            .field("public_key", &self.public_key_hex())
            .finish_non_exhaustive()
    }
}

impl GrantKey {
    /// A fresh random key from the operating system's CSPRNG (via `rand::rng`).
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let key = Self::from_bytes(secret);
        secret.fill(0);
        key
    }

    /// The key with this 32-byte secret.
    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// Loads the key stored (as 64 hex digits) at `path`, or creates one there with mode 0600.
    pub fn load_or_create(path: &Path) -> Result<Self, GrantError> {
        let io_err = |source| GrantError::Io {
            path: path.to_path_buf(),
            source,
        };
        match fs::read_to_string(path) {
            Ok(text) => return Self::parse_key_file(path, &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err)?;
        }
        let key = Self::generate();
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = match options.open(path) {
            Ok(file) => file,
            // Another process created it in between: use its key.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(path).map_err(io_err)?;
                return Self::parse_key_file(path, &text);
            }
            Err(e) => return Err(io_err(e)),
        };
        let mut text = hex::encode(key.key.to_bytes()).into_bytes();
        text.push(b'\n');
        let written = file.write_all(&text).and_then(|()| file.sync_all());
        // Best effort not to leave the secret in freed memory.
        text.fill(0);
        written.map_err(io_err)?;
        tracing::info!(path = %path.display(), public_key = %key.public_key_hex(), "created grant key");
        Ok(key)
    }

    /// Parses the contents of the key file at `path` (named in errors, and warned about if others may read it).
    pub fn parse_key_file(path: &Path, text: &str) -> Result<Self, GrantError> {
        let bad = |reason: String| GrantError::BadKeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let hex_text = text.trim();
        if hex_text.len() != 64 {
            return Err(bad(format!(
                "expected 64 hex digits (a 32-byte Ed25519 secret), found {} characters",
                hex_text.len()
            )));
        }
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut secret).map_err(|e| bad(format!("not hex: {e}")))?;
        let key = Self::from_bytes(secret);
        secret.fill(0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "grant key file is readable by others; it should be mode 0600"
                );
            }
        }
        Ok(key)
    }

    /// The 32-byte Ed25519 public key other nodes trust for this node.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key as 64 lowercase hex digits (for configuration and logs).
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.public_key())
    }

    /// Signs a grant: encodes it, signs exactly those bytes and attaches the public key.
    pub fn sign(&self, grant: &Grant) -> SignedGrant {
        let bytes = grant.encode_to_vec();
        let signature = self.sign_bytes(Domain::Grant, &bytes);
        SignedGrant {
            grant: bytes,
            signature: signature.to_vec(),
            public_key: self.public_key().to_vec(),
            key_endorsement: None,
        }
    }

    /// An Ed25519 signature over `msg` in `domain`, so a signature made for one use never passes for another.
    pub fn sign_bytes(&self, domain: Domain, msg: &[u8]) -> [u8; 64] {
        self.key.sign(&domain.message(msg)).to_bytes()
    }
}

/// What a node's Ed25519 key signs; each use is its own domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// A grant's encoding.
    Grant,
    /// The hash of the last record of an audit batch.
    AuditBatch,
}

impl Domain {
    fn tag(self) -> &'static [u8] {
        match self {
            Domain::Grant => b"fedgate.v1.Grant",
            Domain::AuditBatch => b"fedgate.v1.AuditBatch",
        }
    }

    /// The bytes a signature in this domain covers: the domain's tag, a zero byte, then `msg`.
    fn message(self, msg: &[u8]) -> Vec<u8> {
        let tag = self.tag();
        let mut m = Vec::with_capacity(tag.len() + 1 + msg.len());
        m.extend_from_slice(tag);
        m.push(0);
        m.extend_from_slice(msg);
        m
    }
}

/// Verifies an Ed25519 signature in `domain` (strict: rejects weak keys and malleable signatures).
pub fn verify_signature(
    domain: Domain,
    public_key: &[u8],
    msg: &[u8],
    signature: &[u8],
) -> Result<(), GrantError> {
    let key: &[u8; 32] = public_key.try_into().map_err(|_| {
        GrantError::Malformed(format!(
            "public key must be 32 bytes, got {}",
            public_key.len()
        ))
    })?;
    let key = VerifyingKey::from_bytes(key).map_err(|e| {
        GrantError::Malformed(format!(
            "public key {} is not an Ed25519 key: {e}",
            hex::encode(key)
        ))
    })?;
    let signature: &[u8; 64] = signature.try_into().map_err(|_| {
        GrantError::Malformed(format!(
            "signature must be 64 bytes, got {}",
            signature.len()
        ))
    })?;
    key.verify_strict(&domain.message(msg), &Signature::from_bytes(signature))
        .map_err(|_| GrantError::BadSignature { grant_id: None })
}

/// Opens a signed grant: the issuer key must be `trusted_key` and the signature must verify.
pub fn open(signed: &SignedGrant, trusted_key: &[u8]) -> Result<Grant, GrantError> {
    // Only for naming the grant in an error; nothing in it is trusted before the signature verifies.
    let claimed_id = || {
        Grant::decode(signed.grant.as_slice())
            .ok()
            .map(|g| g.id)
            .filter(|id| !id.is_empty())
    };
    if signed.public_key.as_slice() != trusted_key {
        return Err(GrantError::UntrustedIssuer {
            grant_id: claimed_id(),
            presented: hex::encode(&signed.public_key),
            trusted: hex::encode(trusted_key),
        });
    }
    verify_signature(
        Domain::Grant,
        &signed.public_key,
        &signed.grant,
        &signed.signature,
    )
    .map_err(|e| match e {
        GrantError::BadSignature { .. } => GrantError::BadSignature {
            grant_id: claimed_id(),
        },
        other => other,
    })?;
    Grant::decode(signed.grant.as_slice())
        .map_err(|e| GrantError::Malformed(format!("grant bytes do not decode: {e}")))
}

/// One concrete use of a grant, as seen by the node serving a request.
#[derive(Clone, Copy, Debug)]
pub struct Use<'a> {
    /// The consumer agency, as vouched for.
    pub consumer_uscc: &'a str,
    /// The node that vouches for the consumer.
    pub consumer_node: &'a str,
    /// The purpose the consumer states for this use.
    pub purpose: &'a str,
    /// The full resource id asked for.
    pub resource_id: &'a str,
    /// The mode asked for (`UNSPECIFIED` counts as `QUERY`, as for share requests).
    pub mode: ShareMode,
    /// The fields asked for; empty means "all granted fields".
    pub fields: &'a [String],
    /// The current time, seconds since the Unix epoch.
    pub now_unix: i64,
}

/// Checks that a use lies inside a grant: grantee and its node, resource, purpose, expiry, mode, then fields.
pub fn check(grant: &Grant, u: &Use<'_>) -> Result<(), GrantError> {
    if grant.consumer_uscc != u.consumer_uscc {
        return Err(GrantError::WrongGrantee {
            grant_id: grant.id.clone(),
            grantee: grant.consumer_uscc.clone(),
            caller: u.consumer_uscc.to_owned(),
        });
    }
    if grant.consumer_node != u.consumer_node {
        return Err(GrantError::WrongNode {
            grant_id: grant.id.clone(),
            granted: grant.consumer_node.clone(),
            asked: u.consumer_node.to_owned(),
        });
    }
    if grant.resource_id != u.resource_id {
        return Err(GrantError::WrongResource {
            grant_id: grant.id.clone(),
            granted: grant.resource_id.clone(),
            asked: u.resource_id.to_owned(),
        });
    }
    if grant.purpose != u.purpose {
        return Err(GrantError::WrongPurpose {
            grant_id: grant.id.clone(),
            granted: grant.purpose.clone(),
            asked: u.purpose.chars().take(64).collect(),
        });
    }
    if u.now_unix >= grant.expires_at {
        return Err(GrantError::Expired {
            grant_id: grant.id.clone(),
            expired_at: grant.expires_at,
        });
    }
    let asked = match u.mode {
        ShareMode::Unspecified => ShareMode::Query,
        mode => mode,
    };
    let granted = ShareMode::try_from(grant.mode).ok();
    if granted != Some(asked) {
        return Err(GrantError::ModeNotGranted {
            grant_id: grant.id.clone(),
            granted: granted.map_or_else(
                || format!("unknown mode {}", grant.mode),
                |m| m.as_str_name().to_owned(),
            ),
            asked: asked.as_str_name().to_owned(),
        });
    }
    if let Some(field) = u.fields.iter().find(|f| !grant.fields.contains(f)) {
        return Err(GrantError::FieldNotGranted {
            grant_id: grant.id.clone(),
            field: field.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDER: &str = "11350203000000001D";
    const OTHER: &str = "11350102000000001R";
    const RESOURCE: &str = "350102/11350102000000002P/population-basic";

    fn grant() -> Grant {
        Grant {
            id: "350102-g-7".into(),
            consumer_uscc: PROVIDER.into(),
            consumer_node: "350203".into(),
            resource_id: RESOURCE.into(),
            fields: vec!["name".into(), "id_number".into(), "address".into()],
            mode: ShareMode::Query as i32,
            purpose: "social assistance eligibility".into(),
            issued_at: 1_727_400_000,
            expires_at: 1_730_000_000,
            issuer_node: "350102".into(),
            clear_fields: vec!["name".into()],
            application_id: "350102-a-3".into(),
        }
    }

    fn fields(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn use_of<'a>(fields: &'a [String]) -> Use<'a> {
        Use {
            consumer_uscc: PROVIDER,
            consumer_node: "350203",
            purpose: "social assistance eligibility",
            resource_id: RESOURCE,
            mode: ShareMode::Query,
            fields,
            now_unix: 1_728_000_000,
        }
    }

    #[test]
    fn sign_open_roundtrip() {
        let key = GrantKey::generate();
        let signed = key.sign(&grant());
        assert_eq!(signed.public_key, key.public_key().to_vec());
        assert_eq!(signed.signature.len(), 64);
        assert_eq!(signed.grant, grant().encode_to_vec());
        assert_eq!(open(&signed, &key.public_key()).unwrap(), grant());
        verify_signature(
            Domain::AuditBatch,
            &key.public_key(),
            b"checkpoint",
            &key.sign_bytes(Domain::AuditBatch, b"checkpoint"),
        )
        .unwrap();
        // The same bytes in another domain do not verify.
        assert!(
            verify_signature(
                Domain::Grant,
                &key.public_key(),
                b"checkpoint",
                &key.sign_bytes(Domain::AuditBatch, b"checkpoint"),
            )
            .is_err()
        );
    }

    #[test]
    fn from_bytes_is_deterministic() {
        let a = GrantKey::from_bytes([7; 32]);
        let b = GrantKey::from_bytes([7; 32]);
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(
            a.sign_bytes(Domain::Grant, b"x"),
            b.sign_bytes(Domain::Grant, b"x")
        );
        assert_ne!(
            GrantKey::generate().public_key(),
            GrantKey::generate().public_key()
        );
    }

    #[test]
    fn altered_grant_bytes_fail_the_signature() {
        let key = GrantKey::generate();
        let mut signed = key.sign(&grant());
        // Re-encode a widened grant under the old signature.
        let mut widened = grant();
        widened.fields.push("phone".into());
        signed.grant = widened.encode_to_vec();
        let err = open(&signed, &key.public_key()).unwrap_err();
        assert!(
            matches!(&err, GrantError::BadSignature { grant_id: Some(id) } if id == "350102-g-7"),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("grant 350102-g-7: signature does not verify"),
            "{err}"
        );

        // A flipped byte anywhere, and a flipped signature byte.
        let mut signed = key.sign(&grant());
        signed.grant[3] ^= 1;
        assert!(matches!(
            open(&signed, &key.public_key()),
            Err(GrantError::BadSignature { .. })
        ));
        let mut signed = key.sign(&grant());
        signed.signature[10] ^= 1;
        assert!(matches!(
            open(&signed, &key.public_key()),
            Err(GrantError::BadSignature { .. })
        ));
    }

    #[test]
    fn truncated_signature_is_malformed() {
        let key = GrantKey::generate();
        let mut signed = key.sign(&grant());
        signed.signature.truncate(63);
        let err = open(&signed, &key.public_key()).unwrap_err();
        assert!(matches!(err, GrantError::Malformed(_)), "{err}");
        assert!(
            err.to_string()
                .contains("signature must be 64 bytes, got 63"),
            "{err}"
        );
    }

    #[test]
    fn undecodable_but_signed_bytes_are_malformed() {
        let key = GrantKey::generate();
        let junk = vec![0xff, 0xff, 0xff];
        let signed = SignedGrant {
            signature: key.sign_bytes(Domain::Grant, &junk).to_vec(),
            grant: junk,
            public_key: key.public_key().to_vec(),
            key_endorsement: None,
        };
        assert!(matches!(
            open(&signed, &key.public_key()),
            Err(GrantError::Malformed(_))
        ));
    }

    #[test]
    fn other_key_is_an_untrusted_issuer() {
        let issuer = GrantKey::from_bytes([1; 32]);
        let trusted = GrantKey::from_bytes([2; 32]);
        let signed = issuer.sign(&grant());
        let err = open(&signed, &trusted.public_key()).unwrap_err();
        match &err {
            GrantError::UntrustedIssuer {
                grant_id,
                presented,
                trusted: t,
            } => {
                assert_eq!(grant_id.as_deref(), Some("350102-g-7"));
                assert_eq!(presented, &issuer.public_key_hex());
                assert_eq!(t, &trusted.public_key_hex());
            }
            other => panic!("expected UntrustedIssuer, got {other}"),
        }
        assert!(err.to_string().contains(&trusted.public_key_hex()), "{err}");

        // A forger who swaps in the trusted key without its secret fails the signature instead.
        let mut forged = signed.clone();
        forged.public_key = trusted.public_key().to_vec();
        assert!(matches!(
            open(&forged, &trusted.public_key()),
            Err(GrantError::BadSignature { .. })
        ));
    }

    #[test]
    fn check_accepts_a_use_inside_the_grant() {
        let g = grant();
        check(&g, &use_of(&fields(&["name", "address"]))).unwrap();
        check(&g, &use_of(&[])).unwrap();
        check(
            &g,
            &Use {
                mode: ShareMode::Unspecified,
                ..use_of(&[])
            },
        )
        .unwrap();
        check(
            &g,
            &Use {
                now_unix: g.expires_at - 1,
                ..use_of(&[])
            },
        )
        .unwrap();
    }

    #[test]
    fn check_wrong_grantee() {
        let err = check(
            &grant(),
            &Use {
                consumer_uscc: OTHER,
                ..use_of(&[])
            },
        )
        .unwrap_err();
        assert!(matches!(err, GrantError::WrongGrantee { .. }));
        assert_eq!(
            err.to_string(),
            "grant 350102-g-7 was issued to 11350203000000001D, not to 11350102000000001R"
        );
    }

    #[test]
    fn check_wrong_resource() {
        let err = check(
            &grant(),
            &Use {
                resource_id: "350102/x/other",
                ..use_of(&[])
            },
        )
        .unwrap_err();
        assert!(matches!(err, GrantError::WrongResource { .. }));
        assert_eq!(
            err.to_string(),
            format!("grant 350102-g-7 is for resource {RESOURCE}, not for 350102/x/other")
        );
    }

    #[test]
    fn check_expired() {
        let g = grant();
        let err = check(
            &g,
            &Use {
                now_unix: g.expires_at,
                ..use_of(&[])
            },
        )
        .unwrap_err();
        assert!(matches!(
            err,
            GrantError::Expired {
                expired_at: 1_730_000_000,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "grant 350102-g-7 expired at 2024-10-27T03:33:20Z (unix 1730000000)"
        );
    }

    #[test]
    fn check_mode_not_granted() {
        let err = check(
            &grant(),
            &Use {
                mode: ShareMode::Verify,
                ..use_of(&[])
            },
        )
        .unwrap_err();
        assert!(matches!(err, GrantError::ModeNotGranted { .. }));
        assert_eq!(
            err.to_string(),
            "grant 350102-g-7 allows mode SHARE_MODE_QUERY only, not SHARE_MODE_VERIFY"
        );

        let verify_only = Grant {
            mode: ShareMode::Verify as i32,
            ..grant()
        };
        let err = check(&verify_only, &use_of(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "grant 350102-g-7 allows mode SHARE_MODE_VERIFY only, not SHARE_MODE_QUERY"
        );

        let unknown = Grant {
            mode: 42,
            ..grant()
        };
        let err = check(&unknown, &use_of(&[])).unwrap_err();
        assert!(err.to_string().contains("unknown mode 42"), "{err}");
    }

    #[test]
    fn check_field_not_granted() {
        let err = check(&grant(), &use_of(&fields(&["name", "phone"]))).unwrap_err();
        assert!(matches!(&err, GrantError::FieldNotGranted { field, .. } if field == "phone"));
        assert_eq!(
            err.to_string(),
            "grant 350102-g-7 does not include field \"phone\""
        );
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let key = GrantKey::from_bytes([0xab; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex::encode([0xab; 32])), "{shown}");
        assert!(!shown.contains("171, 171"), "{shown}");
        assert!(shown.contains(&key.public_key_hex()), "{shown}");
    }

    #[test]
    fn load_or_create_persists_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("grant.key");
        let created = GrantKey::load_or_create(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let loaded = GrantKey::load_or_create(&path).unwrap();
        assert_eq!(loaded.public_key(), created.public_key());
        let signed = created.sign(&grant());
        assert_eq!(open(&signed, &loaded.public_key()).unwrap(), grant());
    }

    #[test]
    fn bad_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grant.key");
        fs::write(&path, "not a key\n").unwrap();
        let err = GrantKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, GrantError::BadKeyFile { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        fs::write(&path, "zz".repeat(32)).unwrap();
        let err = GrantKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("not hex"), "{err}");
    }

    #[test]
    fn unreadable_key_path_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let err = GrantKey::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, GrantError::Io { .. }), "{err}");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }
}

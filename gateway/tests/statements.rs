//! Property tests of the signed-statement and grant decoders: whatever bytes a neighbour sends as a statement,
//! a revocation or a grant, checking never panics and never accepts anything but what the signer signed.

use std::sync::OnceLock;

use fedgate_gateway::grant::{self, GrantKey};
use fedgate_gateway::ident::Peer;
use fedgate_gateway::pki::DevCa;
use fedgate_gateway::statement::{NodeSigner, RevokedSerials, StatementVerifier};
use fedgate_gateway::tls::TlsMaterial;
use fedgate_proto::v1::{
    ConsumerAssertion, Grant, KeyEndorsement, Revocation, SignedGrant, SignedStatement,
};
use proptest::prelude::*;
use prost::Message;

struct Fixture {
    signer: NodeSigner,
    verifier: StatementVerifier,
    signed: SignedStatement,
    key: GrantKey,
    grant: SignedGrant,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = DevCa::generate("properties").expect("CA");
        let cert = ca
            .issue(&Peer::Node("350102".parse().expect("code")), &[])
            .expect("certificate");
        let signer = NodeSigner::from_material(&TlsMaterial {
            ca_pem: ca.ca_pem(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
        })
        .expect("signer");
        let verifier =
            StatementVerifier::new(&ca.ca_pem(), RevokedSerials::default()).expect("verifier");
        let signed = signer
            .sign(&Revocation {
                grant_id: "350102-g-1".into(),
                issuer_node: "350102".into(),
                consumer_node: "350203".into(),
                revoked_at: 1,
                reason: "test".into(),
            })
            .expect("signed");
        let key = GrantKey::from_bytes([3; 32]);
        let grant = key.sign(&Grant {
            id: "350102-g-1".into(),
            ..Default::default()
        });
        Fixture {
            signer,
            verifier,
            signed,
            key,
            grant,
        }
    })
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_statements_are_refused_without_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        let f = fixture();
        if let Ok(s) = SignedStatement::decode(bytes.as_slice()) {
            prop_assert!(f.verifier.verify::<Revocation>(&s, now()).is_err());
            prop_assert!(f.verifier.verify::<ConsumerAssertion>(&s, now()).is_err());
            prop_assert!(f.verifier.verify::<KeyEndorsement>(&s, now()).is_err());
        }
        prop_assert!(f.verifier.verify_agency(&bytes, now()).is_err());
    }

    #[test]
    fn any_change_to_a_signed_statement_is_refused(part in 0usize..4, at in any::<usize>(), flip in 1u8..=255) {
        let f = fixture();
        let mut s = f.signed.clone();
        let target = match part {
            0 => &mut s.body,
            1 => &mut s.signature,
            2 => &mut s.certificate,
            _ => {
                s.kind.push('x');
                &mut Vec::new()
            }
        };
        if !target.is_empty() {
            let i = at % target.len();
            target[i] ^= flip;
        }
        prop_assert!(f.verifier.verify::<Revocation>(&s, now()).is_err());
        // The untouched statement still verifies.
        prop_assert!(f.verifier.verify::<Revocation>(&f.signed, now()).is_ok());
    }

    #[test]
    fn arbitrary_grant_tokens_never_open(bytes in prop::collection::vec(any::<u8>(), 0..600), at in any::<usize>(), flip in 1u8..=255) {
        let f = fixture();
        if let Ok(g) = SignedGrant::decode(bytes.as_slice()) {
            prop_assert!(grant::open(&g, &f.key.public_key()).is_err());
        }
        let mut altered = f.grant.clone();
        let i = at % altered.grant.len().max(1);
        if let Some(b) = altered.grant.get_mut(i) {
            *b ^= flip;
            prop_assert!(grant::open(&altered, &f.key.public_key()).is_err());
        }
        prop_assert!(grant::open(&f.grant, &f.key.public_key()).is_ok());
        // Signing arbitrary bodies as the node works and verifies only as their own kind.
        let s = f.signer.sign(&KeyEndorsement { node_code: "350102".into(), public_key: bytes.clone(), issued_at: 1 })
            .expect("signs");
        prop_assert!(f.verifier.verify::<KeyEndorsement>(&s, now()).is_ok());
        prop_assert!(f.verifier.verify::<Revocation>(&s, now()).is_err());
    }
}

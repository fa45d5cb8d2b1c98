//! Consumer assertions: the consumer's node signs what it vouches for about a request (which agency, from
//! which node, for which resource, under which grant, mode and purpose, and a digest of the request bytes),
//! and the node that serves the request checks it. A checked assertion is a [`Vouched`] consumer, which the
//! governance steps require; an envelope's own consumer fields are never trusted without it.

use std::sync::Arc;
use std::time::Duration;

use fedgate_proto::v1::{ConsumerAssertion, Envelope, RequestKind, SignedStatement};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::ident::{DivisionCode, Uscc};
use crate::limits::excerpt;
use crate::statement::{self, NodeSigner, StatementVerifier, Verified};

/// Assertions remembered against replay.
const REPLAY_CAPACITY: u64 = 1_000_000;

/// A consumer whose identity was vouched for: by this node, from the agency's certificate, or by the
/// consumer's node, from a checked assertion. Only this module makes one.
#[derive(Debug, Clone)]
pub struct Vouched {
    uscc: String,
    node: DivisionCode,
    purpose: String,
    certificate: Option<Arc<[u8]>>,
}

impl Vouched {
    /// An agency authenticated at this node by `certificate`.
    pub(crate) fn local(
        uscc: &Uscc,
        node: DivisionCode,
        purpose: &str,
        certificate: Option<Arc<[u8]>>,
    ) -> Self {
        Self {
            uscc: uscc.to_string(),
            node,
            purpose: purpose.to_owned(),
            certificate,
        }
    }

    /// The consumer of a flow-back subscription, as it was vouched for when the subscription was made here.
    pub(crate) fn subscribed(uscc: &str, node: DivisionCode, purpose: &str) -> Self {
        Self {
            uscc: uscc.to_owned(),
            node,
            purpose: purpose.to_owned(),
            certificate: None,
        }
    }

    /// The public, downloading open data through this node's open-data endpoint.
    pub(crate) fn open_data(node: DivisionCode) -> Self {
        Self {
            uscc: String::new(),
            node,
            purpose: String::new(),
            certificate: None,
        }
    }

    /// The consumer agency (empty for a public open-data download).
    pub fn uscc(&self) -> &str {
        &self.uscc
    }

    /// The node that vouches for it.
    pub fn node(&self) -> DivisionCode {
        self.node
    }

    /// The purpose it stated.
    pub fn purpose(&self) -> &str {
        &self.purpose
    }
}

/// Makes this node's assertions and checks other nodes'.
#[derive(Clone)]
pub struct Assertions {
    signer: NodeSigner,
    verifier: Arc<StatementVerifier>,
    clock: Arc<dyn Clock>,
    window: Duration,
    seen: moka::future::Cache<(DivisionCode, String, i64, i32), ()>,
}

impl std::fmt::Debug for Assertions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assertions")
            .field("signer", &self.signer)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// What a node vouches for about `env` and its `request` bytes, as of `issued_at_ms`, for the agency whose
/// certificate (DER) is `agency_certificate` (empty for open data).
pub fn assertion_for(
    env: &Envelope,
    request: &[u8],
    agency_certificate: &[u8],
    issued_at_ms: i64,
) -> ConsumerAssertion {
    ConsumerAssertion {
        request_id: env.request_id.clone(),
        consumer_uscc: env.consumer_uscc.clone(),
        consumer_node: env.consumer_node.clone(),
        resource_id: env.resource_id.clone(),
        target_node: env.target_node.clone(),
        kind: env.kind,
        grant_id: env.grant_id.clone(),
        mode: env.mode,
        purpose: env.purpose.clone(),
        request_digest: request_digest(request),
        issued_at_unix_ms: issued_at_ms,
        open_data: env.open_data,
        agency_certificate: agency_certificate.to_vec(),
    }
}

/// The SHA-256 of request bytes, as an assertion carries it.
pub fn request_digest(request: &[u8]) -> Vec<u8> {
    Sha256::digest(request).to_vec()
}

impl Assertions {
    /// Assertions signed by `signer`, checked by `verifier`, fresh for `window` either side of this node's clock.
    pub fn new(
        signer: NodeSigner,
        verifier: Arc<StatementVerifier>,
        clock: Arc<dyn Clock>,
        window: Duration,
    ) -> Self {
        let seen = moka::future::Cache::builder()
            .max_capacity(REPLAY_CAPACITY)
            .time_to_live(window.saturating_mul(2).max(Duration::from_secs(1)))
            .build();
        Self {
            signer,
            verifier,
            clock,
            window,
            seen,
        }
    }

    /// The statement verifier, for the other statements a node checks.
    pub fn verifier(&self) -> &Arc<StatementVerifier> {
        &self.verifier
    }

    /// This node's statement signer.
    pub fn signer(&self) -> &NodeSigner {
        &self.signer
    }

    fn now_ms(&self) -> i64 {
        let t = self.clock.now();
        t.unix_timestamp()
            .saturating_mul(1000)
            .saturating_add(i64::from(t.millisecond()))
    }

    /// Signs the assertion of a request this node sends on behalf of its agency (or, for open data, of the
    /// public), vouching for the envelope's consumer fields and the request bytes.
    pub fn sign(
        &self,
        env: &Envelope,
        request: &[u8],
        consumer: &Vouched,
    ) -> Result<SignedStatement> {
        let certificate = consumer.certificate.as_deref().unwrap_or_default();
        let a = assertion_for(env, request, certificate, self.now_ms());
        self.signer.sign(&a).map_err(|e| {
            Error::Unavailable(format!(
                "node {} cannot sign its assertion: {e}",
                self.signer.node()
            ))
        })
    }

    /// Checks the assertion an envelope carries against the envelope and the request bytes: signed by the
    /// node it names as the consumer's, fresh, not seen before, and agreeing field by field.
    pub async fn check(&self, env: &Envelope, request: &[u8]) -> Result<Vouched> {
        let s = statement::required(env.assertion.as_ref(), "envelope")?;
        let now_ms = self.now_ms();
        let v: Verified<ConsumerAssertion> = self.verifier.verify(s, now_ms / 1000)?;
        let signer = v.signer();
        let a = v.body();
        if a.consumer_node != signer.as_str() {
            return Err(Error::PermissionDenied(format!(
                "the assertion names consumer node {:?} but is signed by node {signer}",
                excerpt(&a.consumer_node)
            )));
        }
        let differs = |field: &str| {
            Error::PermissionDenied(format!(
                "envelope.{field} differs from what node {signer} signed for request {}",
                excerpt(&a.request_id)
            ))
        };
        let fields: [(&str, bool); 10] = [
            ("request_id", a.request_id == env.request_id),
            ("consumer_uscc", a.consumer_uscc == env.consumer_uscc),
            ("consumer_node", a.consumer_node == env.consumer_node),
            ("resource_id", a.resource_id == env.resource_id),
            ("target_node", a.target_node == env.target_node),
            ("kind", a.kind == env.kind),
            ("grant_id", a.grant_id == env.grant_id),
            ("mode", a.mode == env.mode),
            ("purpose", a.purpose == env.purpose),
            ("open_data", a.open_data == env.open_data),
        ];
        if let Some((field, _)) = fields.iter().find(|(_, same)| !same) {
            return Err(differs(field));
        }
        if a.request_digest != request_digest(request) {
            return Err(Error::PermissionDenied(format!(
                "the request bytes of {} are not the ones node {signer} signed",
                excerpt(&a.request_id)
            )));
        }
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        if (now_ms - a.issued_at_unix_ms).abs() > window_ms {
            return Err(Error::PermissionDenied(format!(
                "the assertion of request {} by node {signer} was issued at {} ms, outside the freshness window of {} s",
                excerpt(&a.request_id),
                a.issued_at_unix_ms,
                self.window.as_secs()
            )));
        }
        if a.open_data {
            let target: DivisionCode = a.target_node.parse()?;
            if signer.level() != crate::ident::Level::Province || !signer.contains(&target) {
                return Err(Error::PermissionDenied(format!(
                    "open-data downloads are vouched for by the province, not by node {signer}"
                )));
            }
        } else {
            self.check_registration(a, signer, now_ms / 1000)?;
        }
        let key = (
            signer,
            a.request_id.clone(),
            a.issued_at_unix_ms,
            RequestKind::try_from(a.kind).map_or(-1, |k| k as i32),
        );
        if !self.seen.entry(key).or_insert(()).await.is_fresh() {
            return Err(Error::PermissionDenied(format!(
                "the assertion of request {} by node {signer} was already used: a replay",
                excerpt(&a.request_id)
            )));
        }
        Ok(Vouched {
            uscc: a.consumer_uscc.clone(),
            node: signer,
            purpose: a.purpose.clone(),
            certificate: None,
        })
    }

    /// The consumer agency's certificate must be the federation's, name that agency, and register it at the
    /// node that signed the assertion: no node can vouch for an agency registered elsewhere.
    fn check_registration(
        &self,
        a: &ConsumerAssertion,
        signer: DivisionCode,
        at: i64,
    ) -> Result<()> {
        if a.agency_certificate.is_empty() {
            return Err(Error::PermissionDenied(format!(
                "the assertion of node {signer} carries no certificate of agency {}",
                excerpt(&a.consumer_uscc)
            )));
        }
        let (uscc, registered) = self.verifier.verify_agency(&a.agency_certificate, at)?;
        if uscc.as_str() != a.consumer_uscc {
            return Err(Error::PermissionDenied(format!(
                "the assertion of node {signer} names agency {} but carries the certificate of {uscc}",
                excerpt(&a.consumer_uscc)
            )));
        }
        if registered != Some(signer) {
            return Err(Error::PermissionDenied(format!(
                "agency {uscc} is registered at {}, not at node {signer}, which vouched for it",
                registered.map_or_else(|| "no node".to_owned(), |n| format!("node {n}"))
            )));
        }
        Ok(())
    }
}

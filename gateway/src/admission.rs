//! Admission of calls on the backbone listener, before any service sees them: calls in flight per source
//! address and in total, and for each agency (keyed by the USCC of its certificate) and each neighbour's
//! `Federation.Forward` (keyed by its node code) a rate (governor's keyed GCRA limiter) and a cap on calls in
//! flight. A call over a limit is answered RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` detail saying when
//! to try again; every refusal is audited through the [`RefusalLog`] (one record at once, then one summary per
//! caller and interval, so a flood does not become a flood of records).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::accept::{ConnInfo, Gate, GatePermit, Guarded, ResponseFuture, SourceKey};
use crate::ident::Peer;
use crate::metrics::NodeMetrics;
use crate::refusals::{Refusal, RefusalKind, RefusalLog};
use crate::tls::PeerInfo;

/// The gRPC path prefix of the Agency service.
const AGENCY_PREFIX: &str = "/fedgate.v1.Agency/";
/// The gRPC path of a neighbour's forwarded request.
const FORWARD_PATH: &str = "/fedgate.v1.Federation/Forward";
/// What a caller over a cap on calls in flight is told to wait before it retries.
const IN_FLIGHT_RETRY: Duration = Duration::from_millis(100);

/// `[rate_limits]`: per-agency limits at the agency's node and per-neighbour limits on `Federation.Forward`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// Calls per second one agency may make to its node's Agency service, sustained.
    pub agency_calls_per_second: u32,
    /// Calls one agency may make at once above its sustained rate (the bucket's size).
    pub agency_burst: u32,
    /// Calls of one agency in flight at once (a bulk export counts until its stream ends).
    pub agency_max_in_flight: usize,
    /// `Federation.Forward` calls per second one neighbour may make, sustained.
    pub forward_calls_per_second: u32,
    /// `Federation.Forward` calls one neighbour may make at once above its sustained rate.
    pub forward_burst: u32,
    /// `Federation.Forward` calls of one neighbour in flight at once.
    pub forward_max_in_flight: usize,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            agency_calls_per_second: 100,
            agency_burst: 200,
            agency_max_in_flight: 64,
            forward_calls_per_second: 2000,
            forward_burst: 4000,
            forward_max_in_flight: 1024,
        }
    }
}

/// A rate and a cap on calls in flight, per key.
struct KeyedLimit {
    rate: DefaultKeyedRateLimiter<String>,
    per_second: u32,
    burst: u32,
    in_flight: Mutex<HashMap<String, usize>>,
    max_in_flight: usize,
}

/// Why a call was refused, with when to retry.
struct Over {
    reason: &'static str,
    message: String,
    retry: Duration,
}

impl KeyedLimit {
    fn new(per_second: u32, burst: u32, max_in_flight: usize) -> Self {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Self {
            rate: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            per_second: rate.get(),
            burst: burst.get(),
            in_flight: Mutex::new(HashMap::new()),
            max_in_flight,
        }
    }

    /// Admits one call of `key` (`who` names it in messages) or says why not.
    fn admit(
        self: &Arc<Self>,
        key: &str,
        who: &str,
        labels: [&'static str; 2],
    ) -> Result<KeyPermit, Over> {
        {
            let mut flying = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            let n = flying.get(key).copied().unwrap_or(0);
            if n >= self.max_in_flight {
                return Err(Over {
                    reason: labels[1],
                    message: format!(
                        "{who} has {n} calls in flight, the most allowed; retry when one has ended"
                    ),
                    retry: IN_FLIGHT_RETRY,
                });
            }
            if let Err(not_until) = self.rate.check_key(&key.to_owned()) {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                return Err(Over {
                    reason: labels[0],
                    message: format!(
                        "{who} is over its rate of {} calls per second (burst {}); retry in {} ms",
                        self.per_second,
                        self.burst,
                        wait.as_millis().max(1)
                    ),
                    retry: wait.max(Duration::from_millis(1)),
                });
            }
            *flying.entry(key.to_owned()).or_insert(0) += 1;
        }
        Ok(KeyPermit {
            limit: self.clone(),
            key: key.to_owned(),
        })
    }

    /// Forgets rate state of keys that are back to a full bucket.
    fn shrink(&self) {
        self.rate.retain_recent();
        self.rate.shrink_to_fit();
    }
}

/// One call in flight under a [`KeyedLimit`].
struct KeyPermit {
    limit: Arc<KeyedLimit>,
    key: String,
}

impl Drop for KeyPermit {
    fn drop(&mut self) {
        let mut flying = self
            .limit
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = flying.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                flying.remove(&self.key);
            }
        }
    }
}

/// What an admitted call holds until its response ends.
struct Admitted {
    _source: Option<GatePermit>,
    _key: Option<KeyPermit>,
}

struct State {
    calls: Arc<Gate>,
    agencies: Arc<KeyedLimit>,
    forwards: Arc<KeyedLimit>,
    refusals: RefusalLog,
    metrics: Arc<NodeMetrics>,
}

/// The call admission of one node's backbone listener; [`Admission::layer`] puts it in front of the services.
#[derive(Clone)]
pub struct Admission {
    state: Arc<State>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").finish_non_exhaustive()
    }
}

impl Admission {
    /// Admission under `limits`, with `max_calls` in flight in total and `max_calls_per_source` per source.
    pub fn new(
        limits: &RateLimitsConfig,
        max_calls: usize,
        max_calls_per_source: usize,
        refusals: RefusalLog,
        metrics: Arc<NodeMetrics>,
    ) -> Self {
        Self {
            state: Arc::new(State {
                calls: Gate::new(max_calls, max_calls_per_source),
                agencies: Arc::new(KeyedLimit::new(
                    limits.agency_calls_per_second,
                    limits.agency_burst,
                    limits.agency_max_in_flight,
                )),
                forwards: Arc::new(KeyedLimit::new(
                    limits.forward_calls_per_second,
                    limits.forward_burst,
                    limits.forward_max_in_flight,
                )),
                refusals,
                metrics,
            }),
        }
    }

    /// The tower layer that admits each call.
    pub fn layer(&self) -> AdmissionLayer {
        AdmissionLayer(self.clone())
    }

    /// Forgets the rate state of callers that have gone quiet (call now and then).
    pub fn shrink(&self) {
        self.state.agencies.shrink();
        self.state.forwards.shrink();
    }

    /// Admits a call to `path` from the connection `conn`, or answers why not.
    fn admit(&self, path: &str, conn: Option<&ConnInfo<PeerInfo>>) -> Result<Admitted, Status> {
        // A connection not admitted by the accept loop has no verified caller: the services refuse it.
        let Some(conn) = conn else {
            return Ok(Admitted {
                _source: None,
                _key: None,
            });
        };
        let s = &self.state;
        let rpc = path.trim_start_matches('/');
        let source = SourceKey::of(conn.remote.ip());
        let source_permit = s.calls.try_enter(source).map_err(|cap| {
            self.refuse(
                &conn.info.peer,
                "",
                rpc,
                Over {
                    reason: "calls_in_flight",
                    message: format!(
                        "calls in flight from {source} are over {cap}; retry when one has ended"
                    ),
                    retry: IN_FLIGHT_RETRY,
                },
            )
        })?;
        let key = match &conn.info.peer {
            Peer::Agency(uscc) if path.starts_with(AGENCY_PREFIX) => Some(
                s.agencies
                    .admit(
                        uscc.as_str(),
                        &format!("agency {uscc}"),
                        ["agency_rate", "agency_in_flight"],
                    )
                    .map_err(|over| self.refuse(&conn.info.peer, uscc.as_str(), rpc, over))?,
            ),
            Peer::Node(code) if path == FORWARD_PATH => Some(
                s.forwards
                    .admit(
                        code.as_str(),
                        &format!("node {code}"),
                        ["forward_rate", "forward_in_flight"],
                    )
                    .map_err(|over| self.refuse(&conn.info.peer, "", rpc, over))?,
            ),
            _ => None,
        };
        Ok(Admitted {
            _source: Some(source_permit),
            _key: key,
        })
    }

    /// Counts and audits a refusal and builds its answer.
    fn refuse(&self, peer: &Peer, consumer_uscc: &str, rpc: &str, over: Over) -> Status {
        self.state
            .metrics
            .calls_refused
            .get_or_create(&[("reason", over.reason)])
            .inc();
        self.state.refusals.note(Refusal {
            kind: RefusalKind::Call,
            actor: peer.to_uri(),
            reason: over.reason,
            detail: format!("{rpc} refused: {}", over.message),
            consumer_uscc: consumer_uscc.to_owned(),
        });
        resource_exhausted(over.message, over.retry)
    }
}

/// RESOURCE_EXHAUSTED with `message` and a `google.rpc.RetryInfo` detail of `retry`.
pub fn resource_exhausted(message: String, retry: Duration) -> Status {
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry)),
    )
}

/// The tower layer of [`Admission`].
#[derive(Clone)]
pub struct AdmissionLayer(Admission);

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            admission: self.0.clone(),
        }
    }
}

/// The service of [`AdmissionLayer`].
#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    admission: Admission,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AdmissionService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo<PeerInfo>>();
        match self.admission.admit(req.uri().path(), conn) {
            Ok(admitted) => {
                let call = self.inner.call(req);
                Box::pin(async move {
                    let resp = call.await?;
                    Ok(resp.map(|body| tonic::body::Body::new(Guarded::new(body, admitted))))
                })
            }
            Err(status) => Box::pin(futures::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_its_rate_is_told_when_to_retry_and_others_are_not_affected() {
        let limit = Arc::new(KeyedLimit::new(1, 2, 10));
        let labels = ["rate", "in_flight"];
        let _a = limit.admit("a", "agency a", labels).ok().expect("first");
        let _b = limit.admit("a", "agency a", labels).ok().expect("burst");
        let over = limit
            .admit("a", "agency a", labels)
            .err()
            .expect("over the rate");
        assert_eq!(over.reason, "rate");
        assert!(over.retry > Duration::ZERO && over.retry <= Duration::from_secs(1));
        assert!(
            over.message.contains("1 calls per second (burst 2)"),
            "{}",
            over.message
        );
        assert!(limit.admit("b", "agency b", labels).is_ok());
        let status = resource_exhausted(over.message, over.retry);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let retry = status.get_details_retry_info().expect("RetryInfo detail");
        assert_eq!(retry.retry_delay, Some(over.retry));
    }

    #[test]
    fn calls_in_flight_are_capped_per_key_until_they_end() {
        let limit = Arc::new(KeyedLimit::new(1000, 1000, 2));
        let labels = ["rate", "in_flight"];
        let a = limit.admit("a", "agency a", labels).ok().expect("first");
        let _b = limit.admit("a", "agency a", labels).ok().expect("second");
        let over = limit.admit("a", "agency a", labels).err().expect("third");
        assert_eq!(over.reason, "in_flight");
        drop(a);
        assert!(limit.admit("a", "agency a", labels).is_ok());
    }
}

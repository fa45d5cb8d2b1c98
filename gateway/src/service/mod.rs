//! The tonic services of a node: thin adapters that read the caller's identity from its certificate,
//! validate the message into typed values and call the gateway's modules.

mod agency;
mod federation;
mod open_data;
mod operator;

pub use agency::AgencyService;
pub use federation::FederationService;
pub use open_data::OpenDataService;
pub use operator::OperatorService;

use std::time::{Duration, Instant};

use tonic::Request;

use crate::error::{Error, Result};
use crate::ident::Peer;
use crate::tls::peer_info;

/// The authenticated identity of the caller of `req`, from its TLS certificate.
fn caller<T>(req: &Request<T>) -> Result<Peer> {
    peer_info(req).map(|p| p.peer.clone()).ok_or_else(|| {
        Error::PermissionDenied("the connection carries no verified client certificate".into())
    })
}

/// The deadline of a call: the caller's `grpc-timeout`, capped by `default`.
fn deadline<T>(req: &Request<T>, default: Duration) -> Instant {
    let asked = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    Instant::now() + asked.map_or(default, |a| a.min(default))
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("10q"), None);
    }
}

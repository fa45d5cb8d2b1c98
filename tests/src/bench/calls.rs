//! The requests each path sends and the checks of their answers.

use std::time::Duration;

use fedgate_examples::describe_status;
use fedgate_proto::v1::agency_client::AgencyClient;
use fedgate_proto::v1::{ShareMode, ShareRequest, ShareResponse, SignedGrant};
use tonic::transport::Channel;

/// Keys (registry residents) the rows that repeat requests cycle through; uncached shares use the others.
pub(super) const HOT_KEYS: usize = 1000;
/// Time one call may take.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Fields a query asks for.
pub(super) const HOUSEHOLD_FIELDS: [&str; 4] = ["name", "gender", "birth_date", "address"];
/// Fields the conditional share's grant covers.
pub(super) const MARRIAGE_FIELDS: [&str; 2] = ["name", "marital_status"];
/// The purpose every share states.
pub(super) const PURPOSE: &str = "share-path benchmark";
/// The node serving every share: its provider holds the registry.
pub(super) const SERVING: &str = "350102";

/// The `n`th request's key among the repeated ones.
pub(super) fn hot_key(keys: &[String], n: u64) -> String {
    keys[usize::try_from(n % HOT_KEYS as u64).unwrap_or(0)].clone()
}

/// A query of the unconditional household resource.
pub(super) fn household(key: &str) -> ShareRequest {
    ShareRequest {
        resource_id: format!("{SERVING}:household"),
        mode: ShareMode::Query as i32,
        key: key.to_owned(),
        fields: HOUSEHOLD_FIELDS.map(str::to_owned).to_vec(),
        purpose: PURPOSE.to_owned(),
        ..Default::default()
    }
}

/// A query of the conditional resource under `grant`, stating no purpose: the node takes the grant's.
pub(super) fn marriage(key: &str, grant: &SignedGrant) -> ShareRequest {
    ShareRequest {
        resource_id: format!("{SERVING}:marriage"),
        mode: ShareMode::Query as i32,
        key: key.to_owned(),
        fields: MARRIAGE_FIELDS.map(str::to_owned).to_vec(),
        grant: Some(grant.clone()),
        ..Default::default()
    }
}

/// Sends one share and returns its answer or a description of its failure.
pub(super) async fn share(
    client: &mut AgencyClient<Channel>,
    req: ShareRequest,
) -> Result<ShareResponse, String> {
    let mut r = tonic::Request::new(req);
    r.set_timeout(CALL_TIMEOUT);
    client
        .share(r)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| describe_status(&s))
}

/// Accepts an answer of exactly one record.
pub(super) fn one_record(n: usize) -> Result<(), String> {
    if n == 1 {
        Ok(())
    } else {
        Err(format!("answered {n} records instead of one"))
    }
}

/// Accepts a share's answer: one record, answered from the cache or not as expected, under the expected grant.
pub(super) fn check_share(
    resp: &ShareResponse,
    from_cache: bool,
    grant_id: Option<&str>,
) -> Result<(), String> {
    one_record(resp.records.len())?;
    if resp.from_cache != from_cache {
        return Err(format!(
            "answered {} the cache, expected {}",
            if resp.from_cache { "from" } else { "without" },
            if from_cache {
                "a cache hit"
            } else {
                "the whole route"
            }
        ));
    }
    if let Some(id) = grant_id
        && resp.grant_id != id
    {
        return Err(format!("served under grant {:?}, not {id}", resp.grant_id));
    }
    Ok(())
}

//! No wedges, no spurious failures (issue 11), over real nodes and node processes, one concern per module:
//! storage contention is waited for and answered UNAVAILABLE only past its bound, never INTERNAL
//! ([`contention`]); periodic scans read the store a page at a time ([`scans`]); a parent that stops answering
//! is dropped and reached again ([`uplink`]); a hop whose caller goes away still records the request
//! ([`cancel`]); a stopping node drains within its grace ([`shutdown`]); the exit status tells a configuration
//! error from a runtime failure ([`exit`]).

mod cancel;
mod contention;
mod exit;
mod scans;
mod shutdown;
mod uplink;

use std::time::Duration;

use fedgate_proto::v1::CatalogEntry;

/// Deadline of every wait for progress.
const WAIT: Duration = Duration::from_secs(30);

/// The tests that start node processes run one at a time, so that two cores suffice.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A new entry of the agency that published `template`, under the local code `local`.
fn new_entry(template: &CatalogEntry, local: &str) -> CatalogEntry {
    CatalogEntry {
        id: local.to_owned(),
        title: format!("Register {local}"),
        version: 0,
        ..template.clone()
    }
}

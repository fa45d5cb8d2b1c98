//! The exit status of `fedgate`: what kind of failure ended it, so that a supervisor can tell a configuration to
//! fix from a runtime failure to retry (sysexits.h codes; `docs/operations.md`, "Exit codes").

use std::process::ExitCode;

use fedgate_gateway::node::NodeError;

/// The configuration cannot be used: a missing or unreadable file, a syntax error, an unknown key, an invalid
/// value, unusable TLS files or signing key (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// Something the node needs is unavailable: its listen address (in use, not local), its database (cannot be
/// opened or reached) (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// The node failed while running: its server stopped by itself, or the runtime could not start
/// (EX_SOFTWARE).
pub const EXIT_SOFTWARE: u8 = 70;

/// A configuration problem, reported with [`EXIT_CONFIG`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A resource the node needs is unavailable, reported with [`EXIT_UNAVAILABLE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// A failure of the running node, reported with [`EXIT_SOFTWARE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Software(pub String);

/// Why a node could not start, as the error its exit status is read from.
pub fn start_failure(what: String, e: NodeError) -> anyhow::Error {
    let message = format!("{what}: {e}");
    match e {
        NodeError::Config(_) | NodeError::Tls(_) | NodeError::Key(_) => ConfigError(message).into(),
        NodeError::Bind { .. } | NodeError::StoreOpen { .. } | NodeError::Store(_) => {
            Unavailable(message).into()
        }
        NodeError::Serve(_) => Software(message).into(),
    }
}

/// The exit status of a command that failed with `e`: the code of its kind, 1 for any other failure.
pub fn status_of(e: &anyhow::Error) -> ExitCode {
    if e.downcast_ref::<ConfigError>().is_some() {
        ExitCode::from(EXIT_CONFIG)
    } else if e.downcast_ref::<Unavailable>().is_some() {
        ExitCode::from(EXIT_UNAVAILABLE)
    } else if e.downcast_ref::<Software>().is_some() {
        ExitCode::from(EXIT_SOFTWARE)
    } else {
        ExitCode::FAILURE
    }
}

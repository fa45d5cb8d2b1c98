//! The errors a node answers with, and their one mapping to a gRPC status.

use tonic::{Code, Status};

/// Why a request to a node failed; each variant maps to exactly one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value in the request is malformed; names the field and the value.
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist here.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is well-formed but the system is not in a state to serve it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A node or agency on the way could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline ran out.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Data arrived damaged or altered.
    #[error("{0}")]
    DataLoss(String),
    /// The caller is over a quota (names it and its limit).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A status returned by a node or provider further along, passed back unchanged.
    #[error("{}", .0.message())]
    Upstream(Status),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl Error {
    /// The error with `context` (where in the request it arose, such as "entries[3]") before its message; errors
    /// that are not about the request stay as they are.
    pub fn within(self, context: &str) -> Self {
        let wrap = |m: String| format!("{context}: {m}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(wrap(m)),
            Error::NotFound(m) => Error::NotFound(wrap(m)),
            Error::PermissionDenied(m) => Error::PermissionDenied(wrap(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(wrap(m)),
            other => other,
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::DataLoss(_) => Code::DataLoss,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Upstream(s) => s.code(),
            Error::Store(e) if e.is_busy() => Code::Unavailable,
            Error::Store(_) => Code::Internal,
        }
    }
}

impl From<crate::ident::IdentError> for Error {
    fn from(e: crate::ident::IdentError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Upstream(s) => s,
            Error::Store(err) if err.is_busy() => {
                tracing::warn!(error = %err, "storage busy; call answered UNAVAILABLE");
                Status::unavailable(busy_message(&err))
            }
            Error::Store(err) => {
                tracing::error!(error = %err, "storage failure");
                Status::internal("storage failure at this node; the operator has been told")
            }
            other => Status::new(
                other.code(),
                crate::limits::clamp(&other.to_string(), crate::limits::MAX_STATUS_CHARS),
            ),
        }
    }
}

/// What a caller is told when the node's database stayed locked: which node, and that the call may be retried.
fn busy_message(err: &crate::store::StoreError) -> String {
    match err {
        crate::store::StoreError::Busy {
            node, waited_ms, ..
        } => format!(
            "node {node} is busy: its database stayed locked by other work for {waited_ms} ms and nothing was \
             changed; retry the call"
        ),
        _ => "this node is busy: its database is locked by other work and nothing was changed; retry the call"
            .to_owned(),
    }
}

/// Shorthand for results whose error is a node [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The engine's domain errors. Each variant says what kind of failure it is, so the binary
//! maps it to an HTTP status and a gRPC code in exactly one place per protocol, without
//! reading messages.

use crate::{definitions, nodes};

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named thing does not exist (HTTP 404, gRPC NOT_FOUND).
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// A definition is invalid (HTTP 422, gRPC INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(definitions::Problems),
    /// A request is wrong: a bad body or argument (HTTP 400, gRPC INVALID_ARGUMENT).
    #[error("{0}")]
    BadRequest(String),
    /// Run options are wrong or missing; each problem names the graph, label and field
    /// (HTTP 400, gRPC INVALID_ARGUMENT).
    #[error("{0}")]
    BadOptions(definitions::Problems),
    /// The node already runs a workflow (HTTP 409, gRPC ALREADY_EXISTS: the node's one
    /// active workflow exists).
    #[error("node {node} is busy: workflow {workflow} is running on it")]
    NodeBusy { node: String, workflow: String },
    /// What the request would create exists already: a node id, an identifier another node
    /// owns (HTTP 409, gRPC ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request conflicts with current state: a workflow still running or already
    /// finished, a library definition, a subgraph whose parent still runs (HTTP 409, gRPC
    /// FAILED_PRECONDITION).
    #[error("{0}")]
    Conflict(String),
    /// The engine is shutting down or stopped after a store failure (HTTP 503, gRPC
    /// UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// The store failed or holds something unreadable (HTTP 500, gRPC INTERNAL).
    #[error("store error: {0}")]
    Store(String),
}

impl From<metalgraph_store::Error> for Error {
    fn from(e: metalgraph_store::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Store(format!("a store operation did not complete: {e}"))
    }
}

impl From<definitions::Error> for Error {
    fn from(e: definitions::Error) -> Self {
        use definitions::Error as D;
        match e {
            D::Invalid(p) => Error::Invalid(p),
            D::BadOptions(p) => Error::BadOptions(p),
            D::NotFound { kind, name } => Error::NotFound { kind, id: name },
            e @ D::LibraryReadOnly { .. } => Error::Conflict(e.to_string()),
            D::Store(e) => e.into(),
            e @ (D::Corrupt { .. } | D::Incomplete(_)) => Error::Store(e.to_string()),
        }
    }
}

impl From<nodes::Error> for Error {
    fn from(e: nodes::Error) -> Self {
        use nodes::Error as N;
        match e {
            N::NotFound(id) => Error::NotFound { kind: "node", id },
            N::Invalid(m) => Error::BadRequest(m),
            e @ (N::IdentifierTaken { .. } | N::Exists(_)) => Error::AlreadyExists(e.to_string()),
            // A node that runs a workflow cannot be deleted: a failed precondition.
            e @ (N::Busy { .. } | N::Conflict(_)) => Error::Conflict(e.to_string()),
            N::Store(e) => e.into(),
            e @ (N::Corrupt(..) | N::Incomplete(_)) => Error::Store(e.to_string()),
        }
    }
}

/// Runs blocking store work on tokio's blocking pool, so that no async worker ever waits on
/// a disk read or an `fsync`. Every public operation of the engine that touches the store
/// goes through here.
pub(crate) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<tokio::task::JoinError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

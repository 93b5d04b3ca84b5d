//! The controller's errors: typed by what failed, each with a category for the
//! `sjob_operator_reconcile_errors_total{category}` metric and the logs.

use crate::operator::engine_client::ClientError;
use crate::operator::resources::ResourceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Engine(#[from] ClientError),
    #[error("{0}")]
    Resources(#[from] ResourceError),
    #[error("{0}")]
    Finalizer(String),
    /// The status write kept meeting other writers' changes.
    #[error("StatefulJob {job}: the status write kept conflicting with other writers")]
    StatusConflict { job: String },
    /// A deleted Savepoint whose files a job still needs: kept, retried later.
    #[error("savepoint {name} is kept: {reason}")]
    InUse { name: String, reason: String },
    #[error("cannot dispose {path}: {reason}")]
    Dispose { path: String, reason: String },
}

impl Error {
    /// The category this error is counted under.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kubernetes_api",
            Error::Engine(_) => "engine",
            Error::Resources(_) => "resources",
            Error::Finalizer(_) => "finalizer",
            Error::StatusConflict { .. } => "status_conflict",
            Error::InUse { .. } => "savepoint_in_use",
            Error::Dispose { .. } => "dispose",
        }
    }
}

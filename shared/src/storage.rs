//! What every store of the services shares: the error a storage call fails with, and a store as a
//! `/health/deep` dependency. Each service defines its own store trait and backends.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Cause, cause};
use crate::health::Unhealthy;

/// Why a storage call failed. Messages are for logs only: they never reach clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is throttling; the caller should answer 503 with
    /// `Retry-After`.
    #[error("storage unavailable: {message}")]
    Unavailable { message: String, retry_after: Duration },
    /// The database refused the connection string's credentials (authentication failed). Answered
    /// like `Unavailable` (503, `Retry-After`). The command was never sent (authentication comes
    /// before it on a new connection), so a store slot may run the call again on a client rebuilt
    /// with a rotated connection string ([`slot`]).
    #[error("the database refused the credentials: {message}")]
    CredentialsRejected { message: String },
    /// The stored data could not be read or written for another reason: the cause (redb's,
    /// serde's or the driver's error, or a message scrubbed of connection strings) is for logs.
    #[error("storage failure")]
    Internal(#[source] Cause),
}

impl StoreError {
    /// An [`Internal`](Self::Internal) failure caused by `e`: an error value, or a message when
    /// there is none (already scrubbed of connection strings).
    pub fn internal(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self::Internal(cause(e))
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            retry_after: Duration::from_secs(1),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Failures of the embedded store (redb), of (de)serialising stored records and of blocking tasks
/// are internal: `?` turns them into [`StoreError::Internal`] with the error as its source.
macro_rules! internal_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self::internal(e)
            }
        }
    )*};
}

internal_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error,
    tokio::task::JoinError,
    std::io::Error,
);

/// A store as a `/health/deep` dependency named `database`.
pub struct StoreHealth<F>(pub F);

#[async_trait]
impl<F, Fut> crate::health::Dependency for StoreHealth<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = StoreResult<()>> + Send,
{
    fn name(&self) -> &'static str {
        "database"
    }

    async fn check(&self) -> Result<(), Unhealthy> {
        (self.0)().await.map_err(|e| {
            Unhealthy(match e {
            // Scrubbed of connection strings where they are made (`mongo::describe`).
            StoreError::Unavailable { message, .. } => format!("unreachable: {message}"),
            StoreError::CredentialsRejected { message } => {
                format!(
                    "authentication failed: the database refused the credentials of the connection string ({message})"
                )
            }
                StoreError::Internal(_) => "failing".to_owned(),
            })
        })
    }
}

//! What every store of the services shares: the error a storage call fails with, and a store as a
//! `/health/deep` dependency. Each service defines its own store trait and backends.

use std::time::Duration;

use async_trait::async_trait;

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
    /// The stored data could not be read or written for another reason.
    #[error("storage failure: {0}")]
    Internal(String),
}

impl StoreError {
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            retry_after: Duration::from_secs(1),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

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

    async fn check(&self) -> Result<(), String> {
        (self.0)().await.map_err(|e| match e {
            // Scrubbed of connection strings where they are made (`mongo::describe`).
            StoreError::Unavailable { message, .. } => format!("unreachable: {message}"),
            StoreError::CredentialsRejected { message } => {
                format!(
                    "authentication failed: the database refused the credentials of the connection string ({message})"
                )
            }
            StoreError::Internal(_) => "failing".to_owned(),
        })
    }
}

//! Storage seams. Each service talks to its data only through these traits, so every backend
//! (the embedded store, MongoDB/Cosmos DB) runs the same contract suite ([`contract`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{BallotRecord, CastOutcome, PollQuery, PollRecord, Tally};

pub mod contract;
pub mod embedded;
pub mod mongo;
pub mod slot;

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

/// Polls, owned by the poll service.
#[async_trait]
pub trait PollStore: Send + Sync + 'static {
    /// Stores a new poll. Ids are generated randomly; a clash is an error.
    async fn create(&self, poll: &PollRecord) -> StoreResult<()>;
    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>>;
    /// Newest first (`created_at`, then `id`, both descending), strictly after `query.after`,
    /// at most `query.limit` polls, filtered by status at `query.now`.
    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>>;
    /// Replaces the poll if its stored revision is still `expected_revision`. Returns false when
    /// the poll is gone or was changed concurrently.
    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool>;
    /// Deletes the poll; false when there was none.
    async fn delete(&self, id: &str) -> StoreResult<bool>;
    /// Cheap round trip to the database, for `/health/deep`.
    async fn ping(&self) -> StoreResult<()>;
}

/// Ballots and tallies, owned by the vote service.
#[async_trait]
pub trait BallotStore: Send + Sync + 'static {
    /// Stores the ballot and counts it, unless a ballot with the same `(poll_id, key)` exists, in
    /// which case the stored one is returned untouched. `Accepted` is returned only once the
    /// ballot is durable. The uniqueness is enforced by the storage, under any concurrency.
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome>;
    /// The poll's tally as maintained alongside the ballots.
    async fn tally(&self, poll_id: &str) -> StoreResult<Tally>;
    /// Tallies for several polls, in the order asked.
    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>>;
    /// Whether a ballot with this voter key exists for the poll. `keyed_by_voter` says the poll's
    /// ballots are keyed by their voter key (`ip` and `voter` dedupe), so this voter's ballot, if
    /// any, is the one with the key `voter`: a store may then look it up by its identity alone.
    async fn has_voted(&self, poll_id: &str, voter: &str, keyed_by_voter: bool) -> StoreResult<bool>;
    /// Counts the stored ballots of the poll one by one (the ground truth the tally must equal).
    async fn recount(&self, poll_id: &str) -> StoreResult<Tally>;
    /// [`recount`](Self::recount) of several polls, in the order asked (a store may read them all
    /// in one pass).
    async fn recount_many(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        let mut out = Vec::with_capacity(poll_ids.len());
        for id in poll_ids {
            out.push(self.recount(id).await?);
        }
        Ok(out)
    }
    /// Deletes every ballot and the tally of the poll; returns how many ballots were deleted.
    async fn purge(&self, poll_id: &str) -> StoreResult<u64>;
    async fn ping(&self) -> StoreResult<()>;
    /// Makes the poll's kept tally equal to its stored ballots again (idempotent), after anything
    /// that may have lost or replayed updates of it (a database failover). A store whose tallies
    /// change in the same transaction as the ballots has nothing to repair: it reports 0 counters.
    async fn repair(&self, poll_id: &str) -> StoreResult<Repair>;
    /// [`repair`](Self::repair) of every poll whose tally may have changed since `since` (every
    /// poll with ballots when `None`).
    async fn repair_since(&self, since: Option<chrono::DateTime<chrono::Utc>>) -> StoreResult<Vec<Repair>>;
}

/// What a [`BallotStore::repair`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Repair {
    pub poll_id: String,
    /// Ballots of the poll read.
    pub ballots: u64,
    /// Counters checked.
    pub counters: u64,
    /// Counters rewritten or created.
    pub corrected: u64,
}

pub type DynPollStore = Arc<dyn PollStore>;
pub type DynBallotStore = Arc<dyn BallotStore>;

/// A store as a `/health/deep` dependency named `database`.
pub struct StoreHealth<F>(pub F);

#[async_trait]
impl<F, Fut> crate::http::Dependency for StoreHealth<F>
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

/// Opens the poll service's store as configured. With MongoDB the returned store is a [`slot::Slot`]
/// that a background task fills once the database answers (and refills when the connection string
/// changes); until then calls fail with `Unavailable` and readiness waits for "database".
pub async fn open_poll_store(
    config: &crate::Config,
    readiness: &Arc<crate::http::Readiness>,
    source: ConnectionSource,
) -> Result<DynPollStore, String> {
    match config.storage.effective_backend() {
        crate::config::Backend::Mongodb => {
            let config = config.clone();
            let rejected = source.credentials_rejected;
            let wait = rebuild_wait(&config, &rejected);
            let slot = slot::connect_in_background(readiness.clone(), source.uris, wait, move |uri| {
                let mut settings = config.mongo_settings(&uri, "poll");
                settings.on_credentials_rejected = rejected.clone();
                async move {
                    let client = mongo::build_client(&settings).await?;
                    let store = mongo::MongoPollStore::open(client, &settings.database, settings.tuning()).await?;
                    Ok(Arc::new(store) as Arc<dyn PollStore>)
                }
            });
            Ok(slot)
        }
        _ => {
            let path = config.storage.data_dir.join("poll.redb");
            let store = embedded::EmbeddedPollStore::open(&path).map_err(|e| e.to_string())?;
            Ok(Arc::new(store))
        }
    }
}

/// Opens the vote service's store as configured (see [`open_poll_store`]).
pub async fn open_ballot_store(
    config: &crate::Config,
    readiness: &Arc<crate::http::Readiness>,
    source: ConnectionSource,
) -> Result<DynBallotStore, String> {
    match config.storage.effective_backend() {
        crate::config::Backend::Mongodb => {
            let config = config.clone();
            let rejected = source.credentials_rejected;
            let wait = rebuild_wait(&config, &rejected);
            let slot = slot::connect_in_background(readiness.clone(), source.uris, wait, move |uri| {
                let mut settings = config.mongo_settings(&uri, "vote");
                settings.on_credentials_rejected = rejected.clone();
                async move {
                    let client = mongo::build_client(&settings).await?;
                    let store = mongo::MongoBallotStore::open(client, &settings.database, settings.tuning()).await?;
                    Ok(Arc::new(store) as Arc<dyn BallotStore>)
                }
            });
            Ok(slot)
        }
        _ => {
            let path = config.storage.data_dir.join("vote.redb");
            let store = embedded::EmbeddedBallotStore::open(&path).map_err(|e| e.to_string())?;
            Ok(Arc::new(store))
        }
    }
}

/// How long a call the database refused for its credentials waits for a client rebuilt with a
/// rotated connection string: the operation timeout when the refusal is heard (Key Vault reads the
/// secret again), else not at all (the connection string cannot change).
fn rebuild_wait(config: &crate::Config, rejected: &mongo::CredentialsRejected) -> Duration {
    if rejected.is_heard() {
        Duration::from_millis(config.storage.operation_timeout_ms)
    } else {
        Duration::ZERO
    }
}

/// Where the MongoDB connection string comes from, and where to report that the database refused it.
#[derive(Clone)]
pub struct ConnectionSource {
    /// The current connection string (`None` until known); a new value is a rotation.
    pub uris: tokio::sync::watch::Receiver<Option<crate::Secret>>,
    /// Reported when the database refuses the credentials (Key Vault then reads the secret at once).
    pub credentials_rejected: mongo::CredentialsRejected,
    /// Key Vault's state for `/health/deep`, when the connection string comes from there.
    pub health: Option<Arc<dyn crate::http::Dependency>>,
}

/// The connection string as configured: from Key Vault when `keyvault` is in use (fetched in the
/// background, refreshed, readiness waiting for "secret" until loaded), else `storage.mongodb_uri`,
/// a value that never changes. Errors are start-up errors (no usable Azure credential, …).
pub fn connection_source(
    config: &crate::Config,
    readiness: &Arc<crate::http::Readiness>,
) -> Result<ConnectionSource, String> {
    if config.keyvault.in_use() {
        return crate::keyvault::start(&config.keyvault, readiness);
    }
    let uri = config.storage.mongodb_uri.clone();
    let (tx, rx) = tokio::sync::watch::channel((!uri.is_empty()).then_some(uri));
    // Keep the sender alive for the life of the process so receivers never see "closed".
    std::mem::forget(tx);
    Ok(ConnectionSource {
        uris: rx,
        credentials_rejected: mongo::CredentialsRejected::default(),
        health: None,
    })
}

//! The poll service's storage: the [`PollStore`] seam, its backends (the embedded store and
//! MongoDB/Cosmos DB), the contract every backend passes ([`contract`]), and [`open`], which picks
//! the backend as configured.

use std::sync::Arc;

use async_trait::async_trait;
use shared::Config;
use shared::config::Backend;
use shared::health::Readiness;
use shared::instrumented::Observed;
use shared::keyvault::ConnectionSource;
use shared::metrics::Metrics;
use shared::slot::Slot;
use shared::storage::StoreResult;

use crate::record::{PollQuery, PollRecord};

pub mod contract;
pub mod embedded;
pub mod mongo;

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

pub type DynPollStore = Arc<dyn PollStore>;

/// Opens the store as configured, observed (spans and `pollvote_db_operation_duration_seconds`).
/// With MongoDB it is a [`Slot`] filled in the background once the database answers (see
/// [`shared::mongo::open_in_background`]).
pub fn open(
    config: &Config,
    readiness: &Arc<Readiness>,
    source: ConnectionSource,
    metrics: Arc<Metrics>,
) -> StoreResult<DynPollStore> {
    let store: DynPollStore = match config.storage.effective_backend() {
        Backend::Mongodb => {
            shared::mongo::open_in_background(config, readiness, source, "poll", |client, settings| async move {
                let store = mongo::MongoPollStore::open(client, &settings.database, settings.retry_policy()).await?;
                Ok(Arc::new(store) as DynPollStore)
            })
        }
        _ => Arc::new(embedded::EmbeddedPollStore::open(
            &config.storage.data_dir.join("poll.redb"),
        )?),
    };
    Ok(Arc::new(ObservedPolls {
        inner: store,
        o: Observed::new(config, metrics, "poll"),
    }))
}

#[async_trait]
impl PollStore for Slot<dyn PollStore> {
    async fn create(&self, poll: &PollRecord) -> StoreResult<()> {
        self.call(|s| async move { s.create(poll).await }).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        self.call(|s| async move { s.get(id).await }).await
    }
    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        self.call(|s| async move { s.list(query).await }).await
    }
    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool> {
        self.call(|s| async move { s.replace(poll, expected_revision).await })
            .await
    }
    async fn delete(&self, id: &str) -> StoreResult<bool> {
        self.call(|s| async move { s.delete(id).await }).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.call(|s| async move { s.ping().await }).await
    }
}

struct ObservedPolls {
    inner: DynPollStore,
    o: Observed,
}

#[async_trait]
impl PollStore for ObservedPolls {
    async fn create(&self, poll: &PollRecord) -> StoreResult<()> {
        self.o.call("polls", "create", self.inner.create(poll)).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        self.o.call("polls", "get", self.inner.get(id)).await
    }
    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        self.o.call("polls", "list", self.inner.list(query)).await
    }
    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool> {
        self.o
            .call("polls", "replace", self.inner.replace(poll, expected_revision))
            .await
    }
    async fn delete(&self, id: &str) -> StoreResult<bool> {
        self.o.call("polls", "delete", self.inner.delete(id)).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.o.call("polls", "ping", self.inner.ping()).await
    }
}

//! A store that is filled in the background and can be replaced while in use.
//!
//! With MongoDB the services start serving at once (probes answer, `/readyz` says why it is not
//! ready), while a task connects, creates collections and indexes, and then puts the store in the
//! slot. When the connection string changes (Key Vault rotation), a new client and store are built
//! and swapped in; requests already running keep the old store (`Arc`) until they finish, so none
//! is dropped. If the new one cannot connect, the old one keeps serving.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{BallotStore, PollStore, StoreError, StoreResult};
use crate::Secret;
use crate::domain::{BallotRecord, CastOutcome, PollQuery, PollRecord, Tally};
use crate::http::Readiness;

const WHAT: &str = "database";

pub struct Slot<T: ?Sized> {
    current: RwLock<Option<Arc<T>>>,
}

impl<T: ?Sized> Slot<T> {
    pub fn empty() -> Self {
        Self {
            current: RwLock::new(None),
        }
    }

    pub fn set(&self, store: Arc<T>) {
        if let Ok(mut c) = self.current.write() {
            *c = Some(store);
        }
    }

    pub fn is_set(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }

    fn get(&self) -> StoreResult<Arc<T>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.clone())
            .ok_or_else(|| StoreError::unavailable("not connected to the database yet"))
    }
}

/// Starts the task that (re)builds the store for every connection string `uris` yields, retrying
/// with backoff while the database is unreachable. Returns the slot the task fills.
pub fn connect_in_background<T, F, Fut>(
    readiness: Arc<Readiness>,
    mut uris: watch::Receiver<Option<Secret>>,
    open: F,
) -> Arc<Slot<T>>
where
    T: ?Sized + Send + Sync + 'static,
    Slot<T>: Send + Sync,
    F: Fn(Secret) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StoreResult<Arc<T>>> + Send,
{
    let slot = Arc::new(Slot::<T>::empty());
    readiness.wait_for(WHAT, "connecting");
    let filled = slot.clone();
    tokio::spawn(async move {
        loop {
            let uri = uris.borrow_and_update().clone();
            if let Some(uri) = uri {
                let mut delay = Duration::from_millis(200);
                loop {
                    match open(uri.clone()).await {
                        Ok(store) => {
                            let rotated = filled.is_set();
                            filled.set(store);
                            readiness.resolve(WHAT);
                            tracing::info!(rotated, "database connected");
                            break;
                        }
                        Err(e) => {
                            let why = match &e {
                                StoreError::Unavailable { .. } => "the database is unreachable".to_owned(),
                                StoreError::Internal(m) => m.clone(),
                            };
                            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot open the database");
                            if !filled.is_set() {
                                readiness.wait_for(WHAT, why);
                            }
                            tokio::select! {
                                () = tokio::time::sleep(delay) => {}
                                changed = uris.changed() => {
                                    if changed.is_err() { return; }
                                    break;
                                }
                            }
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                if uris.has_changed().unwrap_or(false) {
                    continue;
                }
            } else if !filled.is_set() {
                readiness.wait_for(WHAT, "waiting for the connection string");
            }
            if uris.changed().await.is_err() {
                return;
            }
        }
    });
    slot
}

#[async_trait]
impl PollStore for Slot<dyn PollStore> {
    async fn create(&self, poll: &PollRecord) -> StoreResult<()> {
        self.get()?.create(poll).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        Slot::get(self)?.get(id).await
    }
    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        self.get()?.list(query).await
    }
    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool> {
        self.get()?.replace(poll, expected_revision).await
    }
    async fn delete(&self, id: &str) -> StoreResult<bool> {
        self.get()?.delete(id).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.get()?.ping().await
    }
}

#[async_trait]
impl BallotStore for Slot<dyn BallotStore> {
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome> {
        self.get()?.cast(ballot).await
    }
    async fn tally(&self, poll_id: &str) -> StoreResult<Tally> {
        self.get()?.tally(poll_id).await
    }
    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.get()?.tallies(poll_ids).await
    }
    async fn has_voted(&self, poll_id: &str, voter: &str, keyed_by_voter: bool) -> StoreResult<bool> {
        self.get()?.has_voted(poll_id, voter, keyed_by_voter).await
    }
    async fn recount(&self, poll_id: &str) -> StoreResult<Tally> {
        self.get()?.recount(poll_id).await
    }

    async fn recount_many(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.get()?.recount_many(poll_ids).await
    }
    async fn purge(&self, poll_id: &str) -> StoreResult<u64> {
        self.get()?.purge(poll_id).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.get()?.ping().await
    }
}

//! Polls in the embedded store: one redb file (`poll.redb`), see [`shared::embedded`].

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shared::embedded::{blocking, internal, open};
use shared::storage::StoreResult;

use super::PollStore;
use crate::record::{PollQuery, PollRecord, StatusFilter};

const POLLS: TableDefinition<&str, &[u8]> = TableDefinition::new("polls");
/// (created_at in microseconds, id) → (), for newest-first listing.
const POLLS_BY_CREATED: TableDefinition<(i64, &str), ()> = TableDefinition::new("polls_by_created");
/// redb's page cache per file (its default is 1 GiB, which a busy store fills with its whole file:
/// the vote service reached 300 MB of RSS in the load benchmark). Pages beyond it are read from
/// the operating system's page cache, which the process's RSS does not include. Half of it at
/// most is redb's write buffer, far more than one group commit dirties. The ballot store's was
/// 32 MiB until the benchmark showed it was most of the vote service's RSS once full (51 MiB
/// during the first hot-poll, 84–114 MiB after); at 8 MiB the vote service stays at 26–46 MiB
/// with the same throughput (the OS page cache serves the rest).
const POLL_CACHE_BYTES: usize = 16 << 20;

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// Polls in a redb file.
pub struct EmbeddedPollStore {
    db: Arc<Database>,
}

impl EmbeddedPollStore {
    /// Opens (or creates) the store at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let db = open(path, POLL_CACHE_BYTES)?;
        let tx = db.begin_write().map_err(internal)?;
        tx.open_table(POLLS).map_err(internal)?;
        tx.open_table(POLLS_BY_CREATED).map_err(internal)?;
        tx.commit().map_err(internal)?;
        Ok(Self { db })
    }
}

fn matches(p: &PollRecord, filter: Option<StatusFilter>, now: DateTime<Utc>) -> bool {
    use shared::contract::PollStatus;
    match filter {
        None => true,
        Some(StatusFilter::Open) => p.status_at(now) == PollStatus::Open,
        Some(StatusFilter::Closed) => p.status_at(now) == PollStatus::Closed,
    }
}

#[async_trait]
impl PollStore for EmbeddedPollStore {
    async fn create(&self, poll: &PollRecord) -> StoreResult<()> {
        let db = self.db.clone();
        let poll = poll.clone();
        blocking(move || {
            let doc = serde_json::to_vec(&poll).map_err(internal)?;
            let tx = db.begin_write().map_err(internal)?;
            {
                let mut polls = tx.open_table(POLLS).map_err(internal)?;
                if polls.get(poll.id.as_str()).map_err(internal)?.is_some() {
                    return Err(internal(format!("poll id {} already exists", poll.id)));
                }
                polls.insert(poll.id.as_str(), doc.as_slice()).map_err(internal)?;
                let mut idx = tx.open_table(POLLS_BY_CREATED).map_err(internal)?;
                idx.insert((micros(poll.created_at), poll.id.as_str()), ())
                    .map_err(internal)?;
            }
            tx.commit().map_err(internal)
        })
        .await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        let tx = self.db.begin_read().map_err(internal)?;
        let polls = tx.open_table(POLLS).map_err(internal)?;
        match polls.get(id).map_err(internal)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(internal)?)),
            None => Ok(None),
        }
    }

    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        let db = self.db.clone();
        let query = query.clone();
        blocking(move || {
            let tx = db.begin_read().map_err(internal)?;
            let polls = tx.open_table(POLLS).map_err(internal)?;
            let idx = tx.open_table(POLLS_BY_CREATED).map_err(internal)?;
            let range = match &query.after {
                Some(c) => idx.range(..(micros(c.created_at), c.id.as_str())),
                None => idx.range::<(i64, &str)>(..),
            }
            .map_err(internal)?;
            let mut out = Vec::with_capacity(query.limit);
            for entry in range.rev() {
                let (k, _) = entry.map_err(internal)?;
                let (_, id) = k.value();
                let Some(doc) = polls.get(id).map_err(internal)? else {
                    continue;
                };
                let poll: PollRecord = serde_json::from_slice(doc.value()).map_err(internal)?;
                if matches(&poll, query.status, query.now) {
                    out.push(poll);
                    if out.len() >= query.limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool> {
        let db = self.db.clone();
        let poll = poll.clone();
        blocking(move || {
            let doc = serde_json::to_vec(&poll).map_err(internal)?;
            let tx = db.begin_write().map_err(internal)?;
            {
                let mut polls = tx.open_table(POLLS).map_err(internal)?;
                let current: PollRecord = match polls.get(poll.id.as_str()).map_err(internal)? {
                    Some(v) => serde_json::from_slice(v.value()).map_err(internal)?,
                    None => return Ok(false),
                };
                if current.revision != expected_revision {
                    return Ok(false);
                }
                polls.insert(poll.id.as_str(), doc.as_slice()).map_err(internal)?;
            }
            tx.commit().map_err(internal)?;
            Ok(true)
        })
        .await
    }

    async fn delete(&self, id: &str) -> StoreResult<bool> {
        let db = self.db.clone();
        let id = id.to_owned();
        blocking(move || {
            let tx = db.begin_write().map_err(internal)?;
            let existed = {
                let mut polls = tx.open_table(POLLS).map_err(internal)?;
                let removed = polls.remove(id.as_str()).map_err(internal)?;
                match removed {
                    Some(v) => {
                        let poll: PollRecord = serde_json::from_slice(v.value()).map_err(internal)?;
                        drop(v);
                        let mut idx = tx.open_table(POLLS_BY_CREATED).map_err(internal)?;
                        idx.remove((micros(poll.created_at), id.as_str())).map_err(internal)?;
                        true
                    }
                    None => false,
                }
            };
            tx.commit().map_err(internal)?;
            Ok(existed)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        self.db.begin_read().map(drop).map_err(internal)
    }
}

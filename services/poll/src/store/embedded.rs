//! Polls in the embedded store: one redb file (`poll.redb`), see [`shared::embedded`].

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shared::embedded::{blocking, open};
use shared::storage::{StoreError, StoreResult};

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
        let tx = db.begin_write()?;
        tx.open_table(POLLS)?;
        tx.open_table(POLLS_BY_CREATED)?;
        tx.commit()?;
        Ok(Self { db })
    }
}

fn matches(p: &PollRecord, filter: Option<StatusFilter>, now: DateTime<Utc>) -> bool {
    use shared::contract::PollStatus;
    match filter {
        None => true,
        Some(StatusFilter::Scheduled) => p.status_at(now) == PollStatus::Scheduled,
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
            let doc = serde_json::to_vec(&poll)?;
            let tx = db.begin_write()?;
            {
                let mut polls = tx.open_table(POLLS)?;
                if polls.get(poll.id.as_str())?.is_some() {
                    return Err(StoreError::internal(format!("poll id {} already exists", poll.id)));
                }
                polls.insert(poll.id.as_str(), doc.as_slice())?;
                let mut idx = tx.open_table(POLLS_BY_CREATED)?;
                idx.insert((micros(poll.created_at), poll.id.as_str()), ())?;
            }
            Ok(tx.commit()?)
        })
        .await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        let tx = self.db.begin_read()?;
        let polls = tx.open_table(POLLS)?;
        match polls.get(id)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        let db = self.db.clone();
        let query = query.clone();
        blocking(move || {
            let tx = db.begin_read()?;
            let polls = tx.open_table(POLLS)?;
            let idx = tx.open_table(POLLS_BY_CREATED)?;
            let range = match &query.after {
                Some(c) => idx.range(..(micros(c.created_at), c.id.as_str())),
                None => idx.range::<(i64, &str)>(..),
            }?;
            let mut out = Vec::with_capacity(query.limit);
            for entry in range.rev() {
                let (k, _) = entry?;
                let (_, id) = k.value();
                let Some(doc) = polls.get(id)? else {
                    continue;
                };
                let poll: PollRecord = serde_json::from_slice(doc.value())?;
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
            let doc = serde_json::to_vec(&poll)?;
            let tx = db.begin_write()?;
            {
                let mut polls = tx.open_table(POLLS)?;
                let current: PollRecord = match polls.get(poll.id.as_str())? {
                    Some(v) => serde_json::from_slice(v.value())?,
                    None => return Ok(false),
                };
                if current.revision != expected_revision {
                    return Ok(false);
                }
                polls.insert(poll.id.as_str(), doc.as_slice())?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn delete(&self, id: &str) -> StoreResult<bool> {
        let db = self.db.clone();
        let id = id.to_owned();
        blocking(move || {
            let tx = db.begin_write()?;
            let existed = {
                let mut polls = tx.open_table(POLLS)?;
                let removed = polls.remove(id.as_str())?;
                match removed {
                    Some(v) => {
                        let poll: PollRecord = serde_json::from_slice(v.value())?;
                        drop(v);
                        let mut idx = tx.open_table(POLLS_BY_CREATED)?;
                        idx.remove((micros(poll.created_at), id.as_str()))?;
                        true
                    }
                    None => false,
                }
            };
            tx.commit()?;
            Ok(existed)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(self.db.begin_read().map(drop)?)
    }
}

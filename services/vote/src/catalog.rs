//! The vote service's cache of poll definitions, read from the poll service's internal endpoint.
//!
//! Entries live `ttl` (under a second, so a poll closed or deleted through the poll service stops
//! accepting ballots within one second; `closes_at` itself is checked on every ballot). Concurrent
//! misses for one poll share a single fetch. Unknown polls are cached too; failures are not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::Problem;
use shared::internal::{PeerClient, PollDefinition};
use shared::metrics::Metrics;
use tokio::sync::OnceCell;

type Fetched = Result<Option<Arc<PollDefinition>>, Problem>;

struct Entry {
    fetched_at: Instant,
    cell: Arc<OnceCell<Fetched>>,
}

pub struct Catalog {
    peer: PeerClient,
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    metrics: Option<Arc<Metrics>>,
}

const MAX_ENTRIES: usize = 50_000;

impl Catalog {
    pub fn new(peer: PeerClient, ttl: Duration) -> Self {
        Self {
            peer,
            ttl,
            entries: Mutex::new(HashMap::new()),
            metrics: None,
        }
    }

    /// Counts hits and misses (`pollvote_cache_requests_total{cache="poll_catalog"}`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The poll's definition, `None` when the poll does not exist; 503 when the poll service
    /// cannot answer.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<PollDefinition>>, Problem> {
        let cell = {
            let mut entries = self.entries.lock().map_err(|_| Problem::internal())?;
            let fresh = entries
                .get(id)
                .filter(|e| e.fetched_at.elapsed() < self.ttl && !matches!(e.cell.get(), Some(Err(_))));
            if let Some(m) = &self.metrics {
                m.cache_lookup("poll_catalog", fresh.is_some());
            }
            match fresh {
                Some(e) => e.cell.clone(),
                None => {
                    if entries.len() >= MAX_ENTRIES {
                        let ttl = self.ttl;
                        entries.retain(|_, e| e.fetched_at.elapsed() < ttl);
                    }
                    let cell = Arc::new(OnceCell::new());
                    entries.insert(
                        id.to_owned(),
                        Entry {
                            fetched_at: Instant::now(),
                            cell: cell.clone(),
                        },
                    );
                    cell
                }
            }
        };
        cell.get_or_init(|| async {
            self.peer
                .get_json::<PollDefinition>("/internal/polls/{id}", &format!("/internal/polls/{id}"))
                .await
                .map(|d| d.map(Arc::new))
        })
        .await
        .clone()
    }
}

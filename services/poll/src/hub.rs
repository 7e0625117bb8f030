//! The results hub: one per process keeps, per watched poll, a single poller that reads the poll
//! and its tally (from the vote service) every `interval` and publishes a snapshot on a `watch`
//! channel when something changed. Every subscriber of that poll reads the same snapshot: the work
//! is done once per poll, not once per subscriber. The poller stops when the last subscriber
//! leaves. Because it reads the shared tally, ballots accepted by any vote-service replica show up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use shared::contract::{PollStatus, Tally};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{Votes, votes as votes_of};
use crate::record::PollRecord;
use crate::snapshots::Snapshots;

#[derive(Clone, Debug)]
pub enum Snapshot {
    /// The poller has not read the poll yet.
    Pending,
    Live {
        poll: Arc<PollRecord>,
        tally: Arc<Tally>,
        /// The counts as clients see them, computed once for every subscriber.
        votes: Arc<Votes>,
        status: PollStatus,
    },
    /// The poll was deleted.
    Gone,
}

/// How long a new subscriber waits for the hub's first snapshot before answering 503 (the hub
/// retries every interval meanwhile); under the request timeout.
pub const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(8);

pub struct Hub {
    polls: Mutex<HashMap<String, Arc<watch::Sender<Snapshot>>>>,
    /// The pollers read the same snapshots as `GET /api/polls/{id}`.
    snapshots: Arc<Snapshots>,
    interval: Duration,
    shutdown: CancellationToken,
}

impl Hub {
    pub fn new(snapshots: Arc<Snapshots>, interval: Duration, shutdown: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            polls: Mutex::new(HashMap::new()),
            snapshots,
            interval,
            shutdown,
        })
    }

    /// How many polls have a poller running.
    pub fn watched(&self) -> usize {
        self.polls.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn subscribe(self: &Arc<Self>, id: &str) -> watch::Receiver<Snapshot> {
        let Ok(mut polls) = self.polls.lock() else {
            let (_, rx) = watch::channel(Snapshot::Pending);
            return rx;
        };
        if let Some(tx) = polls.get(id) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Snapshot::Pending);
        let tx = Arc::new(tx);
        polls.insert(id.to_owned(), tx.clone());
        let hub = Arc::clone(self);
        let id = id.to_owned();
        tokio::spawn(async move { hub.poll_loop(id, tx).await });
        rx
    }

    async fn poll_loop(self: Arc<Self>, id: String, tx: Arc<watch::Sender<Snapshot>>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => break,
            }
            if tx.receiver_count() == 0 {
                // Re-check under the lock so that a subscriber arriving now is not orphaned.
                if let Ok(mut polls) = self.polls.lock()
                    && tx.receiver_count() == 0
                {
                    polls.remove(&id);
                    return;
                }
            }
            let (poll, tally, votes) = match self.snapshots.get(&id).await {
                // An `after_vote` poll's snapshot has no tally: one call here reads it.
                Ok(Some(snap)) => match self.snapshots.tally(&snap).await {
                    Ok(tally) => (snap.poll.clone(), tally, snap.votes.clone()),
                    Err(e) => {
                        tracing::debug!(poll_id = %id, error = %e.detail, "results stream: tally read failed");
                        continue;
                    }
                },
                Ok(None) => {
                    tx.send_replace(Snapshot::Gone);
                    break;
                }
                Err(e) => {
                    tracing::debug!(poll_id = %id, error = %e.detail, "results stream: poll read failed");
                    continue;
                }
            };
            let status = poll.status_at(Utc::now());
            tx.send_if_modified(|current| {
                let changed = match current {
                    Snapshot::Live {
                        poll: p,
                        tally: t,
                        status: s,
                        ..
                    } => p.revision != poll.revision || **t != *tally || *s != status,
                    _ => true,
                };
                if changed {
                    let votes = votes.unwrap_or_else(|| Arc::new(votes_of(&poll, &tally)));
                    *current = Snapshot::Live {
                        poll,
                        tally,
                        votes,
                        status,
                    };
                }
                changed
            });
        }
        if let Ok(mut polls) = self.polls.lock() {
            polls.remove(&id);
        }
    }
}

//! Reads of one poll shared by its concurrent readers.
//!
//! A [`Snapshot`] is a poll's definition and tally, read together (one storage read and one call
//! to the vote service; no call for a poll that shows its counts only to voters, whose every read
//! asks the vote service with the caller's voter keys anyway) and kept for [`TTL`]: every reader of the poll during that time is served
//! from it, and a crowd of readers arriving when it is missing or expired waits for one load
//! (single flight). The view that does not depend on the caller is serialised once per snapshot,
//! with its `ETag`. Writes of this process drop the poll's snapshot, so an admin reads their own
//! change at once; other replicas' changes and new ballots show up within the TTL (plus the vote
//! service's own tally freshness).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderValue;
use chrono::Utc;
use shared::Problem;
use shared::contract::{PollStatus, ResultsVisibility, Tally, sha256_hex};

use crate::record::PollRecord;
use crate::store::DynPollStore;

use crate::model::{PollView, Votes, votes as votes_of};
use crate::votes::VoteClient;

/// How long a snapshot serves readers.
pub const TTL: Duration = Duration::from_millis(250);
/// Polls kept at most.
const CAPACITY: u64 = 100_000;

/// A poll and its tally as read at one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub poll: Arc<PollRecord>,
    /// `None` for an `after_vote` poll: whoever reads it needs the caller's `voted` as well, which
    /// comes with the counts in the one call the reader makes (see [`Snapshots::tally`]).
    pub tally: Option<Arc<Tally>>,
    /// The counts as clients see them, computed once from `tally` (when there is one).
    pub votes: Option<Arc<Votes>>,
    /// The poll's status when read (a snapshot is not served past a change of it by the clock).
    pub status: PollStatus,
    /// The view of every caller who is not the admin, when it does not depend on the caller
    /// (results `always` or `after_close`; `after_vote` needs the caller's ballot).
    pub public: Option<Rendered>,
}

/// A serialised view and its validator.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub body: Bytes,
    pub etag: HeaderValue,
    /// The admin sees the same view too: it is the same for everyone, so shared caches may keep it.
    pub shared: bool,
}

impl Rendered {
    pub fn new(body: Vec<u8>, shared: bool) -> Self {
        Self {
            etag: etag_of(&body),
            body: Bytes::from(body),
            shared,
        }
    }
}

/// A strong validator of a representation: a hash of its bytes, so it changes exactly when the
/// poll's revision, its status or its counts change the view.
pub fn etag_of(body: &[u8]) -> HeaderValue {
    let hash = sha256_hex(&[body]);
    HeaderValue::from_str(&format!("\"{}\"", &hash[..32])).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// Whether every caller (the admin included) gets the same view of `poll`.
pub fn same_for_everyone(poll: &PollRecord, status: PollStatus) -> bool {
    match poll.results {
        ResultsVisibility::Always => true,
        ResultsVisibility::AfterClose => status == PollStatus::Closed,
        ResultsVisibility::AfterVote => false,
    }
}

pub struct Snapshots {
    cache: moka::future::Cache<String, Option<Arc<Snapshot>>>,
    store: DynPollStore,
    votes: VoteClient,
}

impl Snapshots {
    pub fn new(store: DynPollStore, votes: VoteClient) -> Self {
        Self {
            cache: moka::future::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TTL)
                .build(),
            store,
            votes,
        }
    }

    /// The poll's snapshot (`None`: there is no such poll), loaded once for every concurrent caller
    /// when missing or expired.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<Snapshot>>, Problem> {
        for _ in 0..2 {
            let found = self
                .cache
                .try_get_with(id.to_owned(), self.load(id))
                .await
                .map_err(|e: Arc<Problem>| (*e).clone())?;
            match found {
                // `closes_at` passed since it was read: read again.
                Some(s) if s.poll.status_at(Utc::now()) != s.status => self.cache.invalidate(id).await,
                other => return Ok(other),
            }
        }
        self.load(id).await
    }

    /// The snapshot's tally, read from the vote service when the snapshot has none (`after_vote`).
    pub async fn tally(&self, snap: &Snapshot) -> Result<Arc<Tally>, Problem> {
        match &snap.tally {
            Some(t) => Ok(t.clone()),
            None => Ok(Arc::new(self.votes.tally(&snap.poll).await?)),
        }
    }

    /// Drops the poll's snapshot (this process changed or deleted it).
    pub async fn invalidate(&self, id: &str) {
        self.cache.invalidate(id).await;
    }

    async fn load(&self, id: &str) -> Result<Option<Arc<Snapshot>>, Problem> {
        let Some(poll) = self.store.get(id).await? else {
            return Ok(None);
        };
        let tally = match poll.results {
            ResultsVisibility::AfterVote => None,
            _ => Some(self.votes.tally(&poll).await?),
        };
        let now = Utc::now();
        let status = poll.status_at(now);
        let votes = tally.as_ref().map(|t| Arc::new(votes_of(&poll, t)));
        let public = votes.as_ref().map(|votes| {
            let shown = crate::access::results_visible(&poll, now, false, false);
            let view = PollView::with_votes(&poll, shown.then(|| (**votes).clone()), now);
            Rendered::new(
                serde_json::to_vec(&view).unwrap_or_default(),
                same_for_everyone(&poll, status),
            )
        });
        Ok(Some(Arc::new(Snapshot {
            poll: Arc::new(poll),
            tally: tally.map(Arc::new),
            votes,
            status,
            public,
        })))
    }
}

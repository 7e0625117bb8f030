//! The vote service's storage: the [`BallotStore`] seam, its backends (the embedded store and
//! MongoDB/Cosmos DB), the contract every backend passes ([`contract`]), and [`open`], which picks
//! the backend as configured.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use shared::Config;
use shared::config::Backend;
use shared::contract::Tally;
use shared::health::Readiness;
use shared::instrumented::Observed;
use shared::internal::BallotLine;
use shared::keyvault::ConnectionSource;
use shared::metrics::Metrics;
use shared::slot::Slot;
use shared::storage::StoreResult;

use crate::ballot::{BallotRecord, CastOutcome, Marked};

pub mod contract;
pub mod embedded;
pub mod mongo;

/// Every stored ballot of a poll, read as it is consumed (bounded memory for any number of
/// ballots), in the store's order. An error ends it.
pub type BallotStream = futures_util::stream::BoxStream<'static, StoreResult<BallotLine>>;

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
    /// For each poll, in the order asked, whether a ballot of any of the `voters` (voter keys)
    /// exists for it: one storage round trip for the whole page (none when either list is
    /// empty). Each poll comes with `keyed_by_voter`, saying its ballots are keyed by their voter
    /// key (`ip` and `voter` dedupe), so a voter's ballot, if any, is the one with the key `voter`:
    /// a store may then look it up by its identity alone. `false` is always a correct hint (the
    /// general lookup also finds ballots keyed by voter).
    async fn voted(&self, polls: &[(String, bool)], voters: &[String]) -> StoreResult<Vec<bool>>;
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
    /// Gives the stored ballot `ballot` (the same `(poll_id, key)` and ballot id) a new receipt,
    /// replacing its earlier one: an idempotent retry whose first answer was lost gets a working
    /// receipt. `false` when no such ballot is stored (any more).
    async fn reissue_receipt(&self, ballot: &BallotRecord, receipt_hash: &str) -> StoreResult<bool>;
    /// What its voter asked for the stored ballot `ballot` (its `(poll_id, key)` and ballot id,
    /// as read before): its marks replaced, or the ballot withdrawn (the voter may then vote
    /// again). Applied only if that ballot is still stored under that id (not withdrawn, not cast
    /// anew since), to the marks stored *then* (concurrent changes of one ballot apply one after
    /// the other, each counted once); the tally changes with it, in the same atomic step.
    async fn revise(&self, ballot: &BallotRecord, change: Revision) -> StoreResult<Revised>;
    /// The stored ballot with this ballot id, if any (a voter checking a receipt).
    async fn ballot(&self, ballot_id: &str) -> StoreResult<Option<BallotRecord>>;
    /// Every stored ballot of the poll, streamed (the export).
    async fn ballots(&self, poll_id: &str) -> StoreResult<BallotStream>;
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

/// A voter's change of their ballot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revision {
    /// New marks in place of the stored ones.
    Replace(Marked),
    /// No ballot any more.
    Withdraw,
}

/// What a [`BallotStore::revise`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Revised {
    /// The ballot as stored now.
    Replaced(Box<BallotRecord>),
    Withdrawn,
    /// No such ballot (any more): nothing changed.
    Gone,
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

pub type DynBallotStore = Arc<dyn BallotStore>;

/// Opens the store as configured, observed (spans and `pollvote_db_operation_duration_seconds`).
/// With MongoDB it is a [`Slot`] filled in the background once the database answers (see
/// [`shared::mongo::open_in_background`]).
pub fn open(
    config: &Config,
    readiness: &Arc<Readiness>,
    source: ConnectionSource,
    metrics: Arc<Metrics>,
) -> StoreResult<DynBallotStore> {
    let store: DynBallotStore = match config.storage.effective_backend() {
        Backend::Mongodb => {
            let tuning = mongo::Tuning {
                tally_cache_ttl: Duration::from_millis(config.storage.tally_cache_ttl_ms),
                batches_in_flight: config.storage.write_batches_in_flight as usize,
            };
            shared::mongo::open_in_background(config, readiness, source, "vote", move |client, settings| async move {
                let store =
                    mongo::MongoBallotStore::open(client, &settings.database, settings.retry_policy(), tuning).await?;
                Ok(Arc::new(store) as DynBallotStore)
            })
        }
        _ => Arc::new(embedded::EmbeddedBallotStore::open(
            &config.storage.data_dir.join("vote.redb"),
        )?),
    };
    Ok(Arc::new(ObservedBallots {
        inner: store,
        o: Observed::new(config, metrics, "vote"),
    }))
}

#[async_trait]
impl BallotStore for Slot<dyn BallotStore> {
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome> {
        // A ballot's identity is its `_id`: casting it again is safe in any case.
        self.call(|s| {
            let ballot = ballot.clone();
            async move { s.cast(ballot).await }
        })
        .await
    }
    async fn tally(&self, poll_id: &str) -> StoreResult<Tally> {
        self.call(|s| async move { s.tally(poll_id).await }).await
    }
    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.call(|s| async move { s.tallies(poll_ids).await }).await
    }
    async fn voted(&self, polls: &[(String, bool)], voters: &[String]) -> StoreResult<Vec<bool>> {
        self.call(|s| async move { s.voted(polls, voters).await }).await
    }
    async fn recount(&self, poll_id: &str) -> StoreResult<Tally> {
        self.call(|s| async move { s.recount(poll_id).await }).await
    }

    async fn recount_many(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.call(|s| async move { s.recount_many(poll_ids).await }).await
    }
    async fn reissue_receipt(&self, ballot: &BallotRecord, receipt_hash: &str) -> StoreResult<bool> {
        self.call(|s| async move { s.reissue_receipt(ballot, receipt_hash).await })
            .await
    }
    async fn revise(&self, ballot: &BallotRecord, change: Revision) -> StoreResult<Revised> {
        // Safe to repeat: a retry finds the change applied (same marks) or the ballot gone.
        self.call(|s| {
            let change = change.clone();
            async move { s.revise(ballot, change).await }
        })
        .await
    }
    async fn ballot(&self, ballot_id: &str) -> StoreResult<Option<BallotRecord>> {
        self.call(|s| async move { s.ballot(ballot_id).await }).await
    }
    async fn ballots(&self, poll_id: &str) -> StoreResult<BallotStream> {
        self.call(|s| async move { s.ballots(poll_id).await }).await
    }
    async fn purge(&self, poll_id: &str) -> StoreResult<u64> {
        self.call(|s| async move { s.purge(poll_id).await }).await
    }
    async fn repair(&self, poll_id: &str) -> StoreResult<Repair> {
        self.call(|s| async move { s.repair(poll_id).await }).await
    }
    async fn repair_since(&self, since: Option<chrono::DateTime<chrono::Utc>>) -> StoreResult<Vec<Repair>> {
        self.call(|s| async move { s.repair_since(since).await }).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.call(|s| async move { s.ping().await }).await
    }
}

struct ObservedBallots {
    inner: DynBallotStore,
    o: Observed,
}

#[async_trait]
impl BallotStore for ObservedBallots {
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome> {
        self.o.call("ballots", "cast", self.inner.cast(ballot)).await
    }
    async fn tally(&self, poll_id: &str) -> StoreResult<Tally> {
        self.o.call("ballots", "tally", self.inner.tally(poll_id)).await
    }
    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.o.call("ballots", "tallies", self.inner.tallies(poll_ids)).await
    }
    async fn voted(&self, polls: &[(String, bool)], voters: &[String]) -> StoreResult<Vec<bool>> {
        self.o.call("ballots", "voted", self.inner.voted(polls, voters)).await
    }
    async fn recount(&self, poll_id: &str) -> StoreResult<Tally> {
        self.o.call("ballots", "recount", self.inner.recount(poll_id)).await
    }
    async fn recount_many(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.o
            .call("ballots", "recount_many", self.inner.recount_many(poll_ids))
            .await
    }
    async fn reissue_receipt(&self, ballot: &BallotRecord, receipt_hash: &str) -> StoreResult<bool> {
        self.o
            .call(
                "ballots",
                "reissue_receipt",
                self.inner.reissue_receipt(ballot, receipt_hash),
            )
            .await
    }
    async fn revise(&self, ballot: &BallotRecord, change: Revision) -> StoreResult<Revised> {
        self.o
            .call("ballots", "revise", self.inner.revise(ballot, change))
            .await
    }
    async fn ballot(&self, ballot_id: &str) -> StoreResult<Option<BallotRecord>> {
        self.o.call("ballots", "get", self.inner.ballot(ballot_id)).await
    }
    /// Observed until the stream is open (its first batch read); the reading of the rest is the
    /// export's, measured by its HTTP request.
    async fn ballots(&self, poll_id: &str) -> StoreResult<BallotStream> {
        self.o.call("ballots", "export", self.inner.ballots(poll_id)).await
    }
    async fn purge(&self, poll_id: &str) -> StoreResult<u64> {
        self.o.call("ballots", "purge", self.inner.purge(poll_id)).await
    }
    async fn repair(&self, poll_id: &str) -> StoreResult<Repair> {
        self.o.call("ballots", "repair", self.inner.repair(poll_id)).await
    }
    async fn repair_since(&self, since: Option<chrono::DateTime<chrono::Utc>>) -> StoreResult<Vec<Repair>> {
        self.o
            .call("ballots", "repair_since", self.inner.repair_since(since))
            .await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.o.call("ballots", "ping", self.inner.ping()).await
    }
}

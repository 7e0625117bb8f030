//! Ballots and tallies in the embedded store: one redb file (`vote.redb`), see [`shared::embedded`].
//!
//! redb gives ACID transactions with a single writer; a commit returns only after the data is
//! fsynced (`Durability::Immediate`), so what it acknowledges survives `kill -9`.
//!
//! Ballots go through a group-commit writer: one thread takes every ballot waiting in its queue,
//! applies them in one write transaction (each sees the ones before it, so the `(poll, key)`
//! uniqueness check and the tally update are serialised by the database's only writer), commits
//! once, and only then answers each caller. Under load many ballots share one fsync.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use shared::contract::Tally;
use shared::embedded::{blocking, open};
use shared::internal::BallotLine;
use shared::storage::{StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

use super::{BallotStore, Revised, Revision};
use crate::ballot::{BallotRecord, CastOutcome};

/// (poll id, ballot key) → ballot JSON. The key is the ballot's identity: unique per poll.
const BALLOTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("ballots");
/// Ballots read ahead of an export's consumer.
const EXPORT_BUFFER: usize = 1024;
/// (poll id, voter key) → (), answers "has this voter voted" for ballots whose key is not the voter
/// key (`none` dedupe); the other ballots are found in `BALLOTS` by the voter key itself. (Files
/// written before this held a row for every ballot; both are read.)
const VOTERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("voters");
/// ballot id → (poll id, ballot key): finds a ballot by the id its voter knows. (Ballots stored
/// before receipts existed have no row: nobody holds a receipt for them.)
const BALLOT_IDS: TableDefinition<&str, (&str, &str)> = TableDefinition::new("ballot_ids");
/// poll id → tally JSON (without its rankings), updated in the same transaction as the ballot it
/// counts.
const TALLIES: TableDefinition<&str, &[u8]> = TableDefinition::new("tallies");
/// (poll id, ranking key) → ballots with that ranking (ranked polls): a row per distinct ranking,
/// so a ballot updates one small row instead of rewriting a tally that holds tens of thousands.
const RANKINGS: TableDefinition<(&str, &str), u64> = TableDefinition::new("rankings");

/// Most ballots applied in one transaction.
const MAX_BATCH: usize = 2048;

/// redb's page cache per file (its default is 1 GiB, which a busy store fills with its whole file:
/// the vote service reached 300 MB of RSS in the load benchmark). Pages beyond it are read from
/// the operating system's page cache, which the process's RSS does not include. Half of it at
/// most is redb's write buffer, far more than one group commit dirties. The ballot store's was
/// 32 MiB until the benchmark showed it was most of the vote service's RSS once full (51 MiB
/// during the first hot-poll, 84–114 MiB after); at 8 MiB the vote service stays at 26–46 MiB
/// with the same throughput (the OS page cache serves the rest).
const BALLOT_CACHE_BYTES: usize = 8 << 20;

/// What the writer thread applies: a new ballot, or a new receipt for a stored one (an idempotent
/// replay), each in the next group commit.
enum Job {
    Cast {
        ballot: BallotRecord,
        /// The ballot's JSON, serialised by the caller so that the writer thread (which every
        /// ballot goes through, one at a time) does not spend its time on it.
        doc: Vec<u8>,
        reply: oneshot::Sender<StoreResult<CastOutcome>>,
        /// The caller's span: its batch's span is a child of (or linked to) it.
        span: tracing::Span,
    },
    Reissue {
        poll_id: String,
        key: String,
        id: String,
        receipt_hash: String,
        reply: oneshot::Sender<StoreResult<bool>>,
        span: tracing::Span,
    },
    /// A voter's change of their ballot (see [`BallotStore::revise`]).
    Revise {
        poll_id: String,
        key: String,
        id: String,
        change: Revision,
        at: chrono::DateTime<chrono::Utc>,
        reply: oneshot::Sender<StoreResult<Revised>>,
        span: tracing::Span,
    },
}

impl Job {
    fn span(&self) -> &tracing::Span {
        match self {
            Self::Cast { span, .. } | Self::Reissue { span, .. } | Self::Revise { span, .. } => span,
        }
    }

    /// Answers the caller with what applying the job did.
    fn answer(self, applied: Result<Applied, StoreError>) {
        match (self, applied) {
            // The caller's own ballot goes back to it: no copy on the writer thread.
            (Self::Cast { ballot, reply, .. }, Ok(Applied::Accepted)) => {
                let _ = reply.send(Ok(CastOutcome::Accepted(ballot)));
            }
            (Self::Cast { reply, .. }, Ok(Applied::Duplicate(stored))) => {
                let _ = reply.send(Ok(CastOutcome::Duplicate(*stored)));
            }
            (Self::Reissue { reply, .. }, Ok(Applied::Reissued(done))) => {
                let _ = reply.send(Ok(done));
            }
            (Self::Revise { reply, .. }, Ok(Applied::Revised(done))) => {
                let _ = reply.send(Ok(done));
            }
            (job, Err(e)) => job.fail(e),
            (job, Ok(_)) => job.fail(StoreError::internal("the writer's outcome does not match its job")),
        }
    }

    fn fail(self, e: StoreError) {
        match self {
            Self::Cast { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Reissue { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Revise { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// What happened to one job of a committed batch (an error concerns that job only: it was not
/// applied).
enum Applied {
    Accepted,
    Duplicate(Box<BallotRecord>),
    /// Whether the ballot (same identity and id) was there to get the new receipt.
    Reissued(bool),
    Revised(Revised),
}

/// Ballots and tallies in a redb file, written through the group-commit writer.
pub struct EmbeddedBallotStore {
    db: Arc<Database>,
    jobs: mpsc::Sender<Job>,
}

impl EmbeddedBallotStore {
    /// Opens (or creates) the store at `path` and starts its writer thread, which stops when the
    /// store is dropped.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let db = open(path, BALLOT_CACHE_BYTES)?;
        let tx = db.begin_write()?;
        tx.open_table(BALLOTS)?;
        tx.open_table(VOTERS)?;
        tx.open_table(BALLOT_IDS)?;
        tx.open_table(TALLIES)?;
        tx.open_table(RANKINGS)?;
        tx.commit()?;
        let (jobs, rx) = mpsc::channel(MAX_BATCH * 4);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("ballot-writer".into())
            .spawn(move || writer(writer_db, rx))?;
        Ok(Self { db, jobs })
    }
}

fn writer(db: Arc<Database>, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        shared::metrics::storage().batch_size.observe(batch.len() as f64);
        let span = shared::metrics::batch_span(
            "redb",
            "commit",
            "ballots",
            &batch.iter().map(Job::span).collect::<Vec<_>>(),
        );
        let committed = span.in_scope(|| apply_batch(&db, &batch));
        drop(span);
        match committed {
            Ok(applied) => {
                for (job, applied) in batch.drain(..).zip(applied) {
                    job.answer(applied);
                }
            }
            // Each caller's answer (a 500) logs the cause: not logged here too.
            Err(e) => {
                for job in batch.drain(..) {
                    job.fail(e.clone());
                }
            }
        }
    }
}

/// Applies every job of the batch in one transaction. The outer error means nothing was
/// committed; an inner error concerns one job only (it was not applied).
///
/// Each poll's tally is read once and written once per batch (under load a batch holds up to
/// one ballot per waiting client, mostly for the same hot poll), and a voter row is written only
/// when the voter key differs from the ballot key (`none` dedupe): with `ip` and `voter` dedupe the
/// ballot row itself, keyed by the voter, answers [`BallotStore::voted`]. Fewer B-tree pages
/// touched per ballot is fewer pages written per commit, which is what bounds the writer.
fn apply_batch(db: &Database, batch: &[Job]) -> StoreResult<Vec<Result<Applied, StoreError>>> {
    let tx = db.begin_write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut ballots = tx.open_table(BALLOTS)?;
        let mut voters = tx.open_table(VOTERS)?;
        let mut ids = tx.open_table(BALLOT_IDS)?;
        let mut tallies = tx.open_table(TALLIES)?;
        let mut rankings = tx.open_table(RANKINGS)?;
        let mut counted: HashMap<&str, Tally> = HashMap::new();
        // The poll's tally as this transaction has it so far.
        macro_rules! tally_of {
            ($poll:expr) => {
                match counted.entry($poll) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(match tallies.get($poll)? {
                        Some(v) => serde_json::from_slice(v.value())?,
                        None => Tally::default(),
                    }),
                }
            };
        }
        for job in batch {
            let (b, doc) = match job {
                Job::Cast { ballot, doc, .. } => (ballot, doc),
                Job::Revise {
                    poll_id,
                    key,
                    id,
                    change,
                    at,
                    ..
                } => {
                    let row = (poll_id.as_str(), key.as_str());
                    let b = match stored_as(&ballots, row, id)? {
                        Ok(Some(b)) => b,
                        Ok(None) => {
                            outcomes.push(Ok(Applied::Revised(Revised::Gone)));
                            continue;
                        }
                        Err(e) => {
                            outcomes.push(Err(e));
                            continue;
                        }
                    };
                    let tally = tally_of!(poll_id.as_str());
                    tally.remove_n(b.marks(), 1);
                    let done = match change {
                        Revision::Replace(marked) => {
                            let b = b.replaced(marked.clone(), *at);
                            tally.add(b.marks());
                            ballots.insert(row, serde_json::to_vec(&b)?.as_slice())?;
                            Revised::Replaced(Box::new(b))
                        }
                        // The voter row stays (`none` dedupe: the voter may have other ballots).
                        Revision::Withdraw => {
                            ballots.remove(row)?;
                            ids.remove(id.as_str())?;
                            Revised::Withdrawn
                        }
                    };
                    outcomes.push(Ok(Applied::Revised(done)));
                    continue;
                }
                Job::Reissue {
                    poll_id,
                    key,
                    id,
                    receipt_hash,
                    ..
                } => {
                    let key = (poll_id.as_str(), key.as_str());
                    outcomes.push(match stored_as(&ballots, key, id)? {
                        Ok(Some(mut b)) => {
                            b.receipt_hash = Some(receipt_hash.clone());
                            let doc = serde_json::to_vec(&b)?;
                            ballots.insert(key, doc.as_slice())?;
                            ids.insert(id.as_str(), key)?;
                            Ok(Applied::Reissued(true))
                        }
                        Ok(None) => Ok(Applied::Reissued(false)),
                        Err(e) => Err(e),
                    });
                    continue;
                }
            };
            let key = (b.poll_id.as_str(), b.key.as_str());
            if let Some(existing) = ballots.get(key)? {
                outcomes.push(
                    serde_json::from_slice(existing.value())
                        .map(|stored| Applied::Duplicate(Box::new(stored)))
                        .map_err(StoreError::from),
                );
                continue;
            }
            let tally = tally_of!(b.poll_id.as_str());
            ballots.insert(key, doc.as_slice())?;
            if b.receipt_hash.is_some() {
                ids.insert(b.id.as_str(), key)?;
            }
            if let Some(voter) = b.voter.as_deref().filter(|v| *v != b.key) {
                voters.insert((b.poll_id.as_str(), voter), ())?;
            }
            tally.add(b.marks());
            outcomes.push(Ok(Applied::Accepted));
        }
        for (poll_id, tally) in &mut counted {
            // Rankings go to their own rows (the stored tally has none).
            // (A replaced or withdrawn ranking comes as a count below zero, modulo 2^64.)
            for (key, n) in std::mem::take(&mut tally.rankings) {
                let row = (*poll_id, key.as_str());
                let was = rankings.get(row)?.map_or(0, |v| v.value());
                match was.wrapping_add(n) {
                    0 => rankings.remove(row).map(drop)?,
                    now => rankings.insert(row, now).map(drop)?,
                }
            }
            let doc = serde_json::to_vec(tally)?;
            tallies.insert(*poll_id, doc.as_slice())?;
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

/// The ballot stored at `row` if it is still ballot `id` (`None`: no ballot there, or another
/// one). The inner error (its row does not parse) concerns one job; the outer one the batch.
fn stored_as(
    ballots: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    row: (&str, &str),
    id: &str,
) -> StoreResult<StoreResult<Option<BallotRecord>>> {
    let Some(v) = ballots.get(row)? else {
        return Ok(Ok(None));
    };
    Ok(serde_json::from_slice::<BallotRecord>(v.value())
        .map(|b| (b.id == id).then_some(b))
        .map_err(StoreError::from))
}

fn poll_range(poll_id: &str) -> std::ops::Range<(&str, &str)> {
    // Ballot and voter keys are printable ASCII (< 0x7f), so this covers every key of the poll.
    (poll_id, "")..(poll_id, "\u{7f}")
}

/// A poll's tally: its row, and its rankings' rows.
fn tally_in(
    tallies: &impl ReadableTable<&'static str, &'static [u8]>,
    rankings: &impl ReadableTable<(&'static str, &'static str), u64>,
    poll_id: &str,
) -> StoreResult<Tally> {
    let mut tally: Tally = match tallies.get(poll_id)? {
        Some(v) => serde_json::from_slice(v.value())?,
        None => Tally::default(),
    };
    for entry in rankings.range(poll_range(poll_id))? {
        let (k, n) = entry?;
        tally.rankings.insert(k.value().1.to_owned(), n.value());
    }
    Ok(tally)
}

fn read_tally(db: &Database, poll_id: &str) -> StoreResult<Tally> {
    let tx = db.begin_read()?;
    tally_in(&tx.open_table(TALLIES)?, &tx.open_table(RANKINGS)?, poll_id)
}

#[async_trait]
impl BallotStore for EmbeddedBallotStore {
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome> {
        if ballot.key.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(StoreError::internal("ballot keys must be printable ASCII"));
        }
        let doc = serde_json::to_vec(&ballot)?;
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Cast {
                ballot,
                doc,
                reply,
                span: shared::metrics::caller_span(),
            })
            .await
            .map_err(|_| StoreError::unavailable("ballot writer stopped"))?;
        rx.await.map_err(|_| StoreError::unavailable("ballot writer stopped"))?
    }

    async fn tally(&self, poll_id: &str) -> StoreResult<Tally> {
        read_tally(&self.db, poll_id)
    }

    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        let tx = self.db.begin_read()?;
        let (tallies, rankings) = (tx.open_table(TALLIES)?, tx.open_table(RANKINGS)?);
        poll_ids.iter().map(|id| tally_in(&tallies, &rankings, id)).collect()
    }

    /// One read transaction for the page. Both lookups are by key here, so the hint is not needed.
    async fn voted(&self, polls: &[(String, bool)], voters: &[String]) -> StoreResult<Vec<bool>> {
        if polls.is_empty() || voters.is_empty() {
            return Ok(vec![false; polls.len()]);
        }
        let tx = self.db.begin_read()?;
        // A ballot keyed by the voter key itself (`ip` and `voter` dedupe) has no voter row.
        let ballots = tx.open_table(BALLOTS)?;
        let voter_rows = tx.open_table(VOTERS)?;
        let mut out = Vec::with_capacity(polls.len());
        for (poll_id, _keyed_by_voter) in polls {
            let mut voted = false;
            for voter in voters {
                let key = (poll_id.as_str(), voter.as_str());
                let by_key = match ballots.get(key)? {
                    Some(v) => {
                        let b: BallotRecord = serde_json::from_slice(v.value())?;
                        b.voter.as_deref() == Some(voter.as_str())
                    }
                    None => false,
                };
                if by_key || voter_rows.get(key)?.is_some() {
                    voted = true;
                    break;
                }
            }
            out.push(voted);
        }
        Ok(out)
    }

    async fn recount(&self, poll_id: &str) -> StoreResult<Tally> {
        let db = self.db.clone();
        let poll_id = poll_id.to_owned();
        blocking(move || {
            let tx = db.begin_read()?;
            let ballots = tx.open_table(BALLOTS)?;
            let mut tally = Tally::default();
            for entry in ballots.range(poll_range(&poll_id))? {
                let (_, v) = entry?;
                let b: BallotRecord = serde_json::from_slice(v.value())?;
                tally.add(b.marks());
            }
            Ok(tally)
        })
        .await
    }

    /// Tallies change in the ballot's own transaction: there is nothing to repair.
    async fn repair(&self, poll_id: &str) -> StoreResult<super::Repair> {
        Ok(super::Repair {
            poll_id: poll_id.to_owned(),
            ..super::Repair::default()
        })
    }

    async fn repair_since(&self, _since: Option<chrono::DateTime<chrono::Utc>>) -> StoreResult<Vec<super::Repair>> {
        Ok(Vec::new())
    }

    /// Through the writer thread, in the next group commit (with the ballots being cast).
    async fn reissue_receipt(&self, ballot: &BallotRecord, receipt_hash: &str) -> StoreResult<bool> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Reissue {
                poll_id: ballot.poll_id.clone(),
                key: ballot.key.clone(),
                id: ballot.id.clone(),
                receipt_hash: receipt_hash.to_owned(),
                reply,
                span: shared::metrics::caller_span(),
            })
            .await
            .map_err(|_| StoreError::unavailable("ballot writer stopped"))?;
        rx.await.map_err(|_| StoreError::unavailable("ballot writer stopped"))?
    }

    /// Through the writer thread, in the next group commit: the ballot's row and its poll's tally
    /// change in one transaction.
    async fn revise(&self, ballot: &BallotRecord, change: Revision) -> StoreResult<Revised> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Revise {
                poll_id: ballot.poll_id.clone(),
                key: ballot.key.clone(),
                id: ballot.id.clone(),
                change,
                at: chrono::Utc::now(),
                reply,
                span: shared::metrics::caller_span(),
            })
            .await
            .map_err(|_| StoreError::unavailable("ballot writer stopped"))?;
        rx.await.map_err(|_| StoreError::unavailable("ballot writer stopped"))?
    }

    async fn ballot(&self, ballot_id: &str) -> StoreResult<Option<BallotRecord>> {
        let tx = self.db.begin_read()?;
        let ids = tx.open_table(BALLOT_IDS)?;
        let Some(at) = ids.get(ballot_id)? else {
            return Ok(None);
        };
        let (poll_id, key) = at.value();
        let ballots = tx.open_table(BALLOTS)?;
        match ballots.get((poll_id, key))? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    /// A read transaction walks the poll's ballots on a blocking thread, handing them over through
    /// a bounded channel: memory stays bounded, and writers go on meanwhile (redb reads see the
    /// snapshot they began with). Stops early when the stream is dropped.
    async fn ballots(&self, poll_id: &str) -> StoreResult<super::BallotStream> {
        let (tx, rx) = mpsc::channel::<StoreResult<BallotLine>>(EXPORT_BUFFER);
        let db = self.db.clone();
        let poll_id = poll_id.to_owned();
        tokio::task::spawn_blocking(move || {
            let walk = || -> StoreResult<()> {
                let read = db.begin_read()?;
                let ballots = read.open_table(BALLOTS)?;
                for entry in ballots.range(poll_range(&poll_id))? {
                    let (_, v) = entry?;
                    let b: BallotRecord = serde_json::from_slice(v.value())?;
                    let line = BallotLine {
                        id: b.id,
                        created_at: b.created_at,
                        choices: b.choices,
                        ranking: b.ranking,
                        scores: b.scores,
                    };
                    if tx.blocking_send(Ok(line)).is_err() {
                        break; // nobody reads any more
                    }
                }
                Ok(())
            };
            if let Err(e) = walk() {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }

    async fn purge(&self, poll_id: &str) -> StoreResult<u64> {
        let db = self.db.clone();
        let poll_id = poll_id.to_owned();
        blocking(move || {
            let tx = db.begin_write()?;
            let removed = {
                let mut ballots = tx.open_table(BALLOTS)?;
                let mut ids = tx.open_table(BALLOT_IDS)?;
                for entry in ballots.range(poll_range(&poll_id))? {
                    let (_, v) = entry?;
                    let b: BallotRecord = serde_json::from_slice(v.value())?;
                    ids.remove(b.id.as_str())?;
                }
                let mut n = 0u64;
                ballots.retain_in(poll_range(&poll_id), |_, _| {
                    n += 1;
                    false
                })?;
                let mut voters = tx.open_table(VOTERS)?;
                voters.retain_in(poll_range(&poll_id), |_, _| false)?;
                let mut tallies = tx.open_table(TALLIES)?;
                tallies.remove(poll_id.as_str())?;
                let mut rankings = tx.open_table(RANKINGS)?;
                rankings.retain_in(poll_range(&poll_id), |_, _| false)?;
                n
            };
            tx.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        if self.jobs.is_closed() {
            return Err(StoreError::unavailable("ballot writer stopped"));
        }
        Ok(self.db.begin_read().map(drop)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::sample_ballot;

    async fn voted_one(store: &EmbeddedBallotStore, poll: &str, voter: &str, keyed_by_voter: bool) -> bool {
        let polls = [(poll.to_owned(), keyed_by_voter)];
        store.voted(&polls, &[voter.to_owned()]).await.expect("voted") == [true]
    }

    #[tokio::test]
    async fn voted_for_ballots_keyed_by_voter_and_by_other_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedBallotStore::open(&dir.path().join("vote.redb")).expect("open");
        let poll = "0123456789abcdef01234567";
        // `ip`/`voter` dedupe: the key is the voter key, no voter row is written.
        store.cast(sample_ballot(poll, "ip:one", &[0])).await.expect("cast");
        // `none` dedupe: a random key, the voter in its own row.
        let mut b = sample_ballot(poll, "r:0001", &[1]);
        b.voter = Some("ip:two".into());
        store.cast(b).await.expect("cast");
        // A key that looks like a voter key but belongs to another voter.
        let mut b = sample_ballot(poll, "id:three", &[1]);
        b.voter = Some("id:four".into());
        store.cast(b).await.expect("cast");

        for (voter, voted) in [
            ("ip:one", true),
            ("ip:two", true),
            ("id:four", true),
            ("id:three", false),
            ("r:0001", false),
            ("ip:nobody", false),
        ] {
            assert_eq!(voted_one(&store, poll, voter, false).await, voted, "{voter}");
        }
        let tally = store.tally(poll).await.expect("tally");
        assert_eq!(tally, store.recount(poll).await.expect("recount"));
        assert_eq!(tally.total, 3);
        assert_eq!(store.purge(poll).await.expect("purge"), 3);
        assert!(!voted_one(&store, poll, "ip:two", false).await);
        assert!(!voted_one(&store, poll, "ip:one", true).await);
    }

    #[tokio::test]
    async fn one_batch_counts_every_ballot_of_every_poll() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedBallotStore::open(&dir.path().join("vote.redb")).expect("open"));
        let polls = ["0123456789abcdef0123456a", "0123456789abcdef0123456b"];
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let store = store.clone();
            let poll = polls[(i % 2) as usize];
            // Every fifth ballot repeats an earlier voter of the same poll.
            let voter = if i % 5 == 4 { i - 2 } else { i };
            tasks.push(tokio::spawn(async move {
                store.cast(sample_ballot(poll, &format!("id:{voter}"), &[i % 3])).await
            }));
        }
        let mut accepted = 0;
        for t in tasks {
            if let CastOutcome::Accepted(_) = t.await.expect("join").expect("cast") {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 400);
        let mut total = 0;
        for poll in polls {
            let tally = store.tally(poll).await.expect("tally");
            assert_eq!(tally, store.recount(poll).await.expect("recount"), "{poll}");
            total += tally.total;
        }
        assert_eq!(total, 400);
    }
}

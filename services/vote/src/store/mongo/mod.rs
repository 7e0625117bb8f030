//! Ballots and their tallies in MongoDB / Cosmos DB (on [`shared::mongo`]).
//!
//! `ballots` (vote service database, default `vote`): one document per ballot, with
//! `_id = "<poll_id>:<key>"`. The poll id is 24 hex characters, so the `_id` is unambiguous.
//!
//! # Exactly once, without transactions
//!
//! A ballot's identity *is* its `_id`, so a second insert of the same `(poll, key)` fails with
//! duplicate key (11000) in the database itself, under any concurrency, on every replica and
//! every MongoDB-protocol server: there is no check-then-insert. On 11000 the stored ballot is
//! read back and returned as [`CastOutcome::Duplicate`] (or as `Accepted` when it is this very
//! ballot, same ballot id, e.g. after the driver retried an insert whose first reply was lost).
//! The insert uses write concern `{w: "majority", j: true}`, so `Accepted` means durable.
//! Concurrent ballots share one unordered `insertMany` (group commit, see [`writer`]); a
//! duplicate in a batch fails alone, with the same 11000.
//!
//! # Tallies: counters that are a cache of the ballots
//!
//! There are no multi-document transactions to lean on (several Cosmos DB tiers and
//! MongoDB-protocol servers have none), so a vote stays exactly one write, and the counters are
//! kept so that a crash at any instant cannot make them count a ballot twice or lose one for good:
//!
//! - every batch of this process (writer `w`, random per store) has a sequence number `s`, written
//!   into its ballots; a counter document per (poll, writer) holds the counts of that writer's
//!   ballots in batches `s <= seq`, and only moves by one conditional update from a known `seq`
//!   (the `counters` module), after every batch up to the new `seq` is acknowledged (the
//!   [`applier`]); a retry or a replay finds `seq` moved and changes nothing;
//! - a tally is the sum of the counters plus one aggregation of the ballots no counter covers yet
//!   (`s > seq` per writer, index `{poll_id, w, s}`): every stored ballot is counted once, by its
//!   counter or by that tail, at every instant, and a refresh costs the writers plus the new
//!   ballots, not the poll's size. This process's own part comes from memory (the `tallies`
//!   module), so it reads its own writes at once; other writers' part is kept for
//!   `tally_cache_ttl` and then refreshed in the background;
//! - a batch whose outcome is unclear (the command failed or timed out as a whole, or one of its
//!   revisions did) holds the
//!   counter back until it has settled, then its stored ballots are counted in the database;
//! - writers hold a lease (`<ballots>_writers`); a dead writer's tail is adopted by another
//!   replica once no batch of it can still land; [`BallotStore::repair`] rebuilds counters from
//!   the ballots (after a failover); `recount` reads the ballots one by one (one streamed cursor) as the
//!   ground truth the tally must equal.
//!
//! # Replaced and withdrawn ballots: revisions inside the ballot's document
//!
//! A ballot's document stays its identity for good. Its top-level marks, `w` and `s` are its
//! first contribution to the tally and never change. A voter's change is a *revision*, appended
//! to the document's `revs` array by one conditional single-document update (`{_id, v: n}` →
//! `$push` the revision, `$set: {v: n + 1, cur, gone, …}`), so it is atomic with the ballot's new
//! state: a crash at any instant leaves it applied or not, never half. A revision
//! `{w, s, t, c/r/x, sc/sr/sx}` holds what it adds (`c`, `r`, `x`: the new marks; none for a
//! withdrawal) and what it takes away (`sc`, `sr`, `sx`: the marks it replaced; none for a vote
//! cast again after a withdrawal), and the writer and batch that made it, exactly like a new
//! ballot: the counters count revisions by their own `(w, s)` with the same rule (counter when
//! `s <= seq`, else the tail, index `{poll_id, revs.w, revs.s}`), taking away what they take away.
//! Concurrent changes of one ballot serialise on `v`: one wins per version, the others read the
//! ballot again and apply theirs to the marks it has then. A withdrawn ballot keeps its document
//! (`gone: true`, the ballot id no longer found); a vote cast again by the same identity is a
//! revision of it that adds the new marks under a new ballot id and receipt. `t` is a random
//! token, so a retried update whose first reply was lost recognises its own revision.
//!
//! # Shard key (MongoDB sharded clusters, Cosmos DB partition keys)
//!
//! shard key, and `_id` is only unique per shard (per logical partition on Cosmos DB) unless it
//! is the shard key. Because the ballot `_id` embeds the poll id, every copy of one `_id` routes
//! to the same shard/partition, whose `_id` index then rejects the duplicate: exactly-once holds
//! cluster-wide. `poll_id` also keeps a poll's ballots together, so the tally aggregation and
//! `purge` are single-partition, and `voted` reaches only its polls' partitions. Sharding by `_id`
//! alone would spread a hot poll better but turn every tally into a cross-partition fan-out; the
//! compound key on MongoDB keeps chunks splittable inside one huge poll. Cost on Cosmos DB: a
//! logical partition holds at most 20 GB (tens of millions of ballots per poll) and one poll's
//! write rate is bounded by one physical partition.
//! Create sharded collections before the first start, e.g. MongoDB:
//! `sh.shardCollection("vote.ballots", {poll_id: 1, _id: 1})`,
//! `sh.shardCollection("poll.polls", {_id: "hashed"})`; Cosmos DB:
//! `sh.shardCollection("vote.ballots", {poll_id: 1, _id: 1})`; Cosmos DB:
//! `db.runCommand({customAction: "CreateCollection", collection: "ballots", shardKey: "poll_id"})`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::{Document, doc};
use mongodb::error::Error as MongoError;
use mongodb::{Client, Collection, Database};
use shared::contract::Tally;
use shared::internal::BallotLine;
use shared::mongo::{
    Decision, RetryPolicy, bad, classify, database, ensure_collection, fmt_time, index, opt_bson, opt_str, req_str,
    req_time, uint_of,
};
use shared::storage::{StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

mod counters;
mod tallies;
mod writer;
use counters::Counters;
use tallies::{Read, Tallies};
use writer::{InsertJob, Job, ReviseJob, Writer, applier, lease_keeper};

use super::{BallotStore, Repair, Revised, Revision};
use crate::ballot::{BallotRecord, CastOutcome, Marked};

/// The collection of ballots (its counters and writer leases are `<ballots>_counters` and
/// `<ballots>_writers`).
pub const BALLOTS_COLLECTION: &str = "ballots";

/// How the ballot store behaves besides its retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// How long other writers' part of a tally may be served from this process's memory; zero
    /// refreshes it on every read.
    pub tally_cache_ttl: Duration,
    /// Ballot batches (`insertMany`) in flight at once (see the [`writer`]).
    pub batches_in_flight: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            tally_cache_ttl: Duration::from_millis(250),
            batches_in_flight: 2,
        }
    }
}

fn ballot_id(poll_id: &str, key: &str) -> String {
    format!("{poll_id}:{key}")
}

/// The stored document of a ballot (public so the load benchmark's raw-driver reference writes
/// exactly what the store writes).
pub fn ballot_to_doc(b: &BallotRecord) -> Document {
    let list = |v: &[u32]| v.iter().map(|&c| i64::from(c)).collect::<Vec<_>>();
    let mut d = doc! {
        "_id": ballot_id(&b.poll_id, &b.key),
        "poll_id": &b.poll_id,
        "key": &b.key,
        "ballot_id": &b.id,
        "voter": opt_bson(b.voter.clone()),
        "choices": b.choices.iter().map(|&c| i64::from(c)).collect::<Vec<_>>(),
        "idempotency_key": opt_bson(b.idempotency_key.clone()),
        "fingerprint": &b.fingerprint,
        "created_at": fmt_time(b.created_at),
        "receipt_hash": opt_bson(b.receipt_hash.clone()),
    };
    // Only ranked and score ballots have these: a choice ballot's document is as it always was.
    if let Some(r) = &b.ranking {
        d.insert("ranking", list(r));
    }
    if let Some(x) = &b.scores {
        d.insert("scores", list(x));
    }
    d
}

/// The fields of a ballot document that say what it marks now (the projection of the passes
/// that count ballots): its first marks, and its current ones once revised (`cur`, `gone`).
const MARK_FIELDS: [&str; 5] = ["choices", "ranking", "scores", "cur", "gone"];

/// What counts in a tally: a ballot's first marks, or a revision of a ballot.
#[derive(Debug, Clone, Copy)]
enum Entries {
    Ballots,
    Revisions,
}

impl Entries {
    /// The aggregation path of an entry's `field` (`poll_id`, `w`, `s`).
    fn path(self, field: &str) -> String {
        match (self, field) {
            (Self::Revisions, "w" | "s") => format!("$revs.{field}"),
            _ => format!("${field}"),
        }
    }
}

/// The marks as a revision or a `cur` field stores them (`c`, `r`, `x`).
fn marks_doc(m: &Marked, prefix: &str) -> Document {
    let list = |v: &[u32]| v.iter().map(|&c| i64::from(c)).collect::<Vec<_>>();
    let mut d = doc! { format!("{prefix}c"): list(&m.choices) };
    if let Some(r) = &m.ranking {
        d.insert(format!("{prefix}r"), list(r));
    }
    if let Some(x) = &m.scores {
        d.insert(format!("{prefix}x"), list(x));
    }
    d
}

/// Whether a ballot document is withdrawn.
fn is_gone(d: &Document) -> bool {
    d.get_bool("gone").unwrap_or(false)
}

/// A ballot document's revision number (0: never revised).
fn version_of(d: &Document) -> u64 {
    d.get("v").and_then(uint_of).unwrap_or(0)
}

/// What a ballot document marks now: its `cur` once revised, else its first marks.
fn current_marks(d: &Document) -> StoreResult<Marked> {
    match d.get_document("cur") {
        Ok(cur) => {
            let mut m = Document::new();
            for (from, to) in [("c", "choices"), ("r", "ranking"), ("x", "scores")] {
                if let Some(v) = cur.get(from) {
                    m.insert(to, v.clone());
                }
            }
            marks_of(&m)
        }
        Err(_) => marks_of(d),
    }
}

fn list_of(d: &Document, field: &str) -> StoreResult<Option<Vec<u32>>> {
    match d.get(field) {
        None | Some(mongodb::bson::Bson::Null) => Ok(None),
        Some(mongodb::bson::Bson::Array(list)) => list
            .iter()
            .map(|c| uint_of(c).and_then(|v| u32::try_from(v).ok()).ok_or_else(|| bad(field)))
            .collect::<StoreResult<Vec<u32>>>()
            .map(Some),
        Some(_) => Err(bad(field)),
    }
}

/// What a ballot document (or a group key of the same fields) marks.
fn marks_of(d: &Document) -> StoreResult<Marked> {
    Ok(Marked {
        choices: list_of(d, "choices")?.ok_or_else(|| bad("choices"))?,
        ranking: list_of(d, "ranking")?,
        scores: list_of(d, "scores")?,
    })
}

/// A projection of [`MARK_FIELDS`] plus `extra`.
fn mark_projection(extra: &[&str]) -> Document {
    MARK_FIELDS
        .iter()
        .chain(extra)
        .map(|f| ((*f).to_owned(), 1.into()))
        .collect()
}

/// The ballot a document holds now (whether it is withdrawn is [`is_gone`]).
fn doc_to_ballot(d: &Document) -> StoreResult<BallotRecord> {
    let m = current_marks(d)?;
    Ok(BallotRecord {
        id: req_str(d, "ballot_id")?,
        poll_id: req_str(d, "poll_id")?,
        key: req_str(d, "key")?,
        voter: opt_str(d, "voter")?,
        choices: m.choices,
        ranking: m.ranking,
        scores: m.scores,
        idempotency_key: opt_str(d, "idempotency_key")?,
        fingerprint: req_str(d, "fingerprint")?,
        created_at: req_time(d, "created_at")?,
        receipt_hash: opt_str(d, "receipt_hash")?,
        updated_at: match d.get("updated_at") {
            None | Some(mongodb::bson::Bson::Null) => None,
            Some(_) => Some(req_time(d, "updated_at")?),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Ballots

/// Ballots in MongoDB / Cosmos DB, with their tally counters (see the module docs).
pub struct MongoBallotStore {
    db: Database,
    ballots: Collection<Document>,
    retry: RetryPolicy,
    /// What the writer, the applier, the lease keeper and the tally reads share.
    shared: Writer,
    /// The group-commit writer's queue (see [`writer`]).
    inserts: mpsc::Sender<Job>,
    /// Held while a read refreshes tallies nothing was kept for.
    inline: Arc<tokio::sync::Mutex<()>>,
    /// Stops the store's background tasks when the store is dropped.
    _stop: tokio_util::sync::DropGuard,
}

fn lock(tallies: &Mutex<Tallies>) -> MutexGuard<'_, Tallies> {
    tallies.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When this writer's lease was last renewed.
struct Lease {
    base: Instant,
    /// Milliseconds after `base`, plus one (0: never).
    renewed: AtomicU64,
}

impl Lease {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            renewed: AtomicU64::new(0),
        }
    }

    fn renew(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.renewed.store(ms + 1, Ordering::Relaxed);
    }

    fn held(&self) -> bool {
        match self.renewed.load(Ordering::Relaxed) {
            0 => false,
            r => {
                let since = Duration::from_millis(r - 1);
                self.base.elapsed().saturating_sub(since) < counters::WRITE_LEASE
            }
        }
    }
}

impl MongoBallotStore {
    /// Opens the store on `database` (usually `vote`), creates its collections and indexes and
    /// takes this writer's lease. Starts the store's writer, applier and lease tasks, so it must be
    /// called inside a tokio runtime.
    pub async fn open(client: Client, database_name: &str, retry: RetryPolicy, tuning: Tuning) -> StoreResult<Self> {
        let db = database(&client, database_name, &retry);
        let poll_voter = index("poll_voter", doc! { "poll_id": 1, "voter": 1 });
        let poll_writer_seq = index("poll_writer_seq", doc! { "poll_id": 1, "w": 1, "s": 1 });
        // A voter checking a receipt names only the ballot id (on a sharded cluster this one read
        // goes to every shard).
        let ballot_id = index("ballot_id", doc! { "ballot_id": 1 });
        // Revisions by writer and batch, as ballots are by `poll_writer_seq` (a multikey index).
        let poll_revision_seq = index(
            "poll_revision_writer_seq",
            doc! { "poll_id": 1, "revs.w": 1, "revs.s": 1 },
        );
        ensure_collection(
            &db,
            BALLOTS_COLLECTION,
            vec![poll_voter, poll_writer_seq, ballot_id, poll_revision_seq],
            &retry,
        )
        .await?;
        let ballots: Collection<Document> = db.collection(BALLOTS_COLLECTION);
        let me = rand::random::<i64>();
        let (counters, existed) = Counters::open(&db, &ballots, &retry, me).await?;
        counters.heartbeat().await?;
        let lease = Arc::new(Lease::new());
        lease.renew();
        // After this, no attempt of a failed batch can still land (its attempts are bounded by
        // the deadline; the margin covers a server finishing one it had already received).
        let settle = retry.deadline.saturating_mul(2) + Duration::from_secs(5);
        let shared = Writer {
            counters,
            tallies: Arc::new(Mutex::new(Tallies::new(tuning.tally_cache_ttl, settle))),
            lease,
            applier: Arc::new(tokio::sync::Notify::new()),
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let (inserts, queue) = mpsc::channel(INSERT_QUEUE);
        tokio::spawn(writer::writer(shared.clone(), queue, tuning.batches_in_flight.max(1)));
        tokio::spawn(applier(shared.clone(), stop.clone()));
        tokio::spawn(lease_keeper(shared.clone(), stop.clone()));
        if !existed {
            let n = retry.run(|| ballots.estimated_document_count()).await?;
            if n > 0 {
                // Ballots written before counters existed: count them into counters once.
                let c = shared.counters.clone();
                tokio::spawn(async move {
                    tracing::warn!(ballots = n, "creating tally counters for existing ballots");
                    match repair_all(&c, None).await {
                        Ok(r) => tracing::warn!(polls = r.len(), "tally counters created for existing ballots"),
                        Err(e) => {
                            tracing::error!(error = %shared::error::Chain(&e), "creating tally counters failed; run the repair")
                        }
                    }
                });
            }
        }
        Ok(Self {
            db,
            ballots,
            retry,
            shared,
            inserts,
            inline: Arc::new(tokio::sync::Mutex::new(())),
            _stop: stop.drop_guard(),
        })
    }

    /// Inserts one ballot document through the writer: `true` when stored now, `false` when its
    /// `_id` already existed. Returns once the insert is acknowledged with the store's write
    /// concern (durable).
    async fn insert(&self, doc: Document, ballot: &BallotRecord) -> StoreResult<bool> {
        let (reply, answer) = oneshot::channel();
        let job = InsertJob {
            doc,
            poll_id: ballot.poll_id.clone(),
            marks: Marked {
                choices: ballot.choices.clone(),
                ranking: ballot.ranking.clone(),
                scores: ballot.scores.clone(),
            },
            reply,
            span: shared::metrics::caller_span(),
        };
        self.inserts
            .send(Job::Insert(job))
            .await
            .map_err(|_| StoreError::internal("the ballot writer has stopped"))?;
        answer
            .await
            .map_err(|_| StoreError::internal("the ballot writer dropped a ballot"))?
    }

    /// Appends a revision to the ballot document `id` through the writer, if the document is
    /// still at version `from`: `true` when applied, `false` when another change came first.
    /// It takes away `sub` and adds `add` (see the module docs) and sets `set` besides.
    async fn submit_revision(
        &self,
        (id, poll_id): (String, &str),
        from: u64,
        (add, sub): (Option<Marked>, Option<Marked>),
        set: Document,
    ) -> StoreResult<bool> {
        let (reply, answer) = oneshot::channel();
        let job = ReviseJob {
            id,
            poll_id: poll_id.to_owned(),
            from,
            add,
            sub,
            set,
            reply,
            span: shared::metrics::caller_span(),
        };
        self.inserts
            .send(Job::Revise(job))
            .await
            .map_err(|_| StoreError::internal("the ballot writer has stopped"))?;
        answer
            .await
            .map_err(|_| StoreError::internal("the ballot writer dropped a revision"))?
    }

    async fn find_doc(&self, id: &str) -> StoreResult<Option<Document>> {
        self.retry.run(|| self.ballots.find_one(doc! { "_id": id })).await
    }

    /// Folds the uncounted ballots of dead writers (whose lease ran out) into their counters;
    /// returns how many writers were adopted. Every replica does this by itself every
    /// ~30 s; public for operators' tools and tests.
    pub async fn adopt_dead_writers(&self) -> StoreResult<usize> {
        self.shared.counters.adopt_dead().await
    }

    /// Counts the stored ballots of one poll with one cursor whose every batch (not the whole
    /// pass) is bounded, by [`RECOUNT_BATCH_DEADLINE`], so a million ballots are read in full.
    /// (Chunks by `_id` range with a limit are not used: some servers scan the rest of the range
    /// for each.)
    async fn recount_streamed(&self, poll_id: &str) -> StoreResult<Tally> {
        let filter = doc! { "poll_id": poll_id };
        let failed = |e: MongoError| pass_failed(&self.retry, e, "a recount");
        let first_batch = RetryPolicy {
            deadline: RECOUNT_BATCH_DEADLINE,
            ..self.retry.clone()
        };
        let mut cursor = first_batch
            .run(|| {
                self.ballots
                    .find(filter.clone())
                    .projection(mark_projection(&[]))
                    .batch_size(10_000)
            })
            .await?;
        let mut tally = Tally::default();
        loop {
            match tokio::time::timeout(RECOUNT_BATCH_DEADLINE, cursor.advance()).await {
                Ok(Ok(true)) => {
                    let d: Document = cursor.deserialize_current().map_err(failed)?;
                    if !is_gone(&d) {
                        tally.add(current_marks(&d)?.marks());
                    }
                }
                Ok(Ok(false)) => return Ok(tally),
                Ok(Err(e)) => return Err(failed(e)),
                Err(_) => {
                    return Err(StoreError::unavailable(format!(
                        "a batch of the recount took longer than {} s",
                        RECOUNT_BATCH_DEADLINE.as_secs()
                    )));
                }
            }
        }
    }
}

#[async_trait]
impl BallotStore for MongoBallotStore {
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome> {
        let id = ballot_id(&ballot.poll_id, &ballot.key);
        let doc = ballot_to_doc(&ballot);
        // A duplicate whose original vanished (purged meanwhile), or a withdrawn ballot another
        // change of got first, is tried again, a few times.
        for _ in 0..5 {
            let inserted = self.insert(doc.clone(), &ballot).await?;
            if inserted {
                return Ok(CastOutcome::Accepted(ballot));
            }
            let Some(stored) = self.find_doc(&id).await? else {
                continue;
            };
            if is_gone(&stored) {
                // Withdrawn: this ballot takes its place, as a revision of its document.
                let mut set = ballot_to_doc(&ballot);
                for field in ["_id", "poll_id", "key", "choices", "ranking", "scores"] {
                    set.remove(field);
                }
                set.insert("updated_at", mongodb::bson::Bson::Null);
                let change = (Some(ballot.marked()), None);
                if self
                    .submit_revision((id.clone(), &ballot.poll_id), version_of(&stored), change, set)
                    .await?
                {
                    return Ok(CastOutcome::Accepted(ballot));
                }
                continue;
            }
            let stored = doc_to_ballot(&stored)?;
            // This very ballot (an insert repeated after a lost reply, by the driver or the writer).
            if stored.id == ballot.id {
                return Ok(CastOutcome::Accepted(stored));
            }
            return Ok(CastOutcome::Duplicate(stored));
        }
        Err(StoreError::internal(format!(
            "ballot {id} kept vanishing between insert and read"
        )))
    }

    async fn tally(&self, poll_id: &str) -> StoreResult<Tally> {
        let mut all = self.tallies(&[poll_id.to_owned()]).await?;
        Ok(all.pop().unwrap_or_default())
    }

    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        let handle = self.shared.clone();
        let (mut out, missing) = handle.read_kept(poll_ids);
        let cache = &shared::metrics::storage().tally_cache;
        for (result, n) in [("hit", poll_ids.len() - missing.len()), ("miss", missing.len())] {
            let labels = shared::metrics::CacheLabels { cache: "tally", result };
            cache.get_or_create(&labels).inc_by(n as u64);
        }
        if !missing.is_empty() {
            // In a task of its own, so that a caller giving up (a client's timeout) does not
            // cancel a refresh the next read can use; and one inline refresh at a time, so a crowd
            // of first reads of one poll (a thousand result streams opening) makes one refresh.
            let gate = self.inline.clone();
            let task = tokio::spawn(async move {
                let keeps = lock(&handle.tallies).keeps();
                let _gate = if keeps { Some(gate.lock_owned().await) } else { None };
                let (mut filled, missing) = handle.read_kept(&missing);
                if !missing.is_empty() {
                    let mut fresh = handle.refresh(&missing).await?.into_iter();
                    for slot in filled.iter_mut().filter(|t| t.is_none()) {
                        *slot = fresh.next();
                    }
                }
                Ok::<_, StoreError>(filled)
            });
            let filled = task.await??;
            let mut filled = filled.into_iter();
            for slot in out.iter_mut().filter(|t| t.is_none()) {
                *slot = filled.next().flatten();
            }
        }
        // A withdrawal may be counted before the ballot it withdraws (parts read at different
        // instants): never shown below zero.
        Ok(out.into_iter().map(|t| t.unwrap_or_default().clamped()).collect())
    }

    /// One aggregation for the page: ballots of the voters found by identity (`_id` lookups are
    /// cheap on every server, FerretDB's SQLite backend included, which scans a collection for
    /// any other filter) and, for the polls whose ballots are not keyed by voter, by the
    /// `{poll_id, voter}` index; grouped by poll, so at most one document per poll comes back
    /// however many ballots a voter has on a `none` dedupe poll. Every branch names its polls,
    /// so a sharded collection routes it to their shards only.
    async fn voted(&self, polls: &[(String, bool)], voters: &[String]) -> StoreResult<Vec<bool>> {
        if polls.is_empty() || voters.is_empty() {
            return Ok(vec![false; polls.len()]);
        }
        let ids: Vec<String> = polls
            .iter()
            .flat_map(|(poll_id, _)| voters.iter().map(move |v| ballot_id(poll_id, v)))
            .collect();
        let unkeyed: Vec<&str> = polls
            .iter()
            .filter(|(_, keyed_by_voter)| !keyed_by_voter)
            .map(|(poll_id, _)| poll_id.as_str())
            .collect();
        let all: Vec<&str> = polls.iter().map(|(poll_id, _)| poll_id.as_str()).collect();
        // (A withdrawn ballot keyed by its voter is no vote; on `none` polls, as on the embedded
        // store, a voter who cast a ballot has voted.)
        let mut any_of = vec![
            doc! { "poll_id": { "$in": &all }, "_id": { "$in": &ids }, "voter": { "$in": voters }, "gone": { "$ne": true } },
        ];
        if !unkeyed.is_empty() {
            any_of.push(doc! { "poll_id": { "$in": &unkeyed }, "voter": { "$in": voters } });
        }
        let filter = match any_of.len() {
            1 => any_of.remove(0),
            _ => doc! { "$or": any_of },
        };
        let pipeline = vec![doc! { "$match": filter }, doc! { "$group": { "_id": "$poll_id" } }];
        let found = counters::collect(&self.ballots, &self.retry, pipeline).await?;
        let found: std::collections::HashSet<&str> = found.iter().filter_map(|d| d.get_str("_id").ok()).collect();
        Ok(polls
            .iter()
            .map(|(poll_id, _)| found.contains(poll_id.as_str()))
            .collect())
    }

    async fn recount(&self, poll_id: &str) -> StoreResult<Tally> {
        self.recount_streamed(poll_id).await
    }

    async fn recount_many(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        let mut out = Vec::with_capacity(poll_ids.len());
        for id in poll_ids {
            out.push(self.recount_streamed(id).await?);
        }
        Ok(out)
    }

    /// One single-document update, matched on the ballot's `_id` and ballot id (a retry of it sets
    /// the same hash again).
    async fn reissue_receipt(&self, ballot: &BallotRecord, receipt_hash: &str) -> StoreResult<bool> {
        let filter = doc! { "_id": ballot_id(&ballot.poll_id, &ballot.key), "ballot_id": &ballot.id };
        let res = self
            .retry
            .run(|| {
                self.ballots
                    .update_one(filter.clone(), doc! { "$set": { "receipt_hash": receipt_hash } })
            })
            .await?;
        Ok(res.matched_count == 1)
    }

    /// Reads the ballot, then appends the revision through the writer at the version read; when
    /// another change of it came first, reads it again and applies this one to what it holds then.
    async fn revise(&self, ballot: &BallotRecord, change: Revision) -> StoreResult<Revised> {
        let id = ballot_id(&ballot.poll_id, &ballot.key);
        // 64 voters' devices changing one ballot at once take 64 rounds at worst.
        for _ in 0..MAX_REVISION_ROUNDS {
            let Some(d) = self.find_doc(&id).await? else {
                return Ok(Revised::Gone);
            };
            if is_gone(&d) || d.get_str("ballot_id").ok() != Some(ballot.id.as_str()) {
                return Ok(Revised::Gone);
            }
            let stored = doc_to_ballot(&d)?;
            let at = Utc::now();
            let (add, set, done) = match &change {
                Revision::Replace(m) => (
                    Some(m.clone()),
                    doc! { "updated_at": fmt_time(at) },
                    Revised::Replaced(Box::new(stored.clone().replaced(m.clone(), at))),
                ),
                Revision::Withdraw => (None, Document::new(), Revised::Withdrawn),
            };
            let change = (add, Some(stored.marked()));
            if self
                .submit_revision((id.clone(), &ballot.poll_id), version_of(&d), change, set)
                .await?
            {
                return Ok(done);
            }
        }
        Err(StoreError::unavailable(format!(
            "ballot {} kept changing; try again",
            ballot.id
        )))
    }

    async fn ballot(&self, ballot_id: &str) -> StoreResult<Option<BallotRecord>> {
        let found = self
            .retry
            .run(|| self.ballots.find_one(doc! { "ballot_id": ballot_id }))
            .await?;
        found.as_ref().filter(|d| !is_gone(d)).map(doc_to_ballot).transpose()
    }

    /// One cursor over the poll's ballots (only the exported fields), read batch by batch as the
    /// stream is consumed, each batch bounded by [`RECOUNT_BATCH_DEADLINE`] like a recount's.
    async fn ballots(&self, poll_id: &str) -> StoreResult<super::BallotStream> {
        let first_batch = RetryPolicy {
            deadline: RECOUNT_BATCH_DEADLINE,
            ..self.retry.clone()
        };
        let cursor = first_batch
            .run(|| {
                self.ballots
                    .find(doc! { "poll_id": poll_id, "gone": { "$ne": true } })
                    .projection(mark_projection(&["ballot_id", "created_at"]))
                    .batch_size(EXPORT_BATCH)
            })
            .await?;
        let retry = self.retry.clone();
        Ok(Box::pin(futures_util::stream::unfold(Some(cursor), move |cursor| {
            let retry = retry.clone();
            async move {
                let mut cursor = cursor?;
                let item = match tokio::time::timeout(RECOUNT_BATCH_DEADLINE, cursor.advance()).await {
                    Ok(Ok(true)) => cursor
                        .deserialize_current()
                        .map_err(|e| pass_failed(&retry, e, "an export"))
                        .and_then(|d| {
                            let m = current_marks(&d)?;
                            Ok(BallotLine {
                                id: req_str(&d, "ballot_id")?,
                                created_at: req_time(&d, "created_at")?,
                                choices: m.choices,
                                ranking: m.ranking,
                                scores: m.scores,
                            })
                        }),
                    Ok(Ok(false)) => return None,
                    Ok(Err(e)) => Err(pass_failed(&retry, e, "an export")),
                    Err(_) => Err(StoreError::unavailable(format!(
                        "a batch of the export took longer than {} s",
                        RECOUNT_BATCH_DEADLINE.as_secs()
                    ))),
                };
                // An error ends the stream.
                let next = item.is_ok().then_some(cursor);
                Some((item, next))
            }
        })))
    }

    async fn purge(&self, poll_id: &str) -> StoreResult<u64> {
        let res = self
            .retry
            .run(|| self.ballots.delete_many(doc! { "poll_id": poll_id }))
            .await?;
        self.shared.counters.purge(poll_id).await?;
        lock(&self.shared.tallies).purged(poll_id);
        Ok(res.deleted_count)
    }

    async fn ping(&self) -> StoreResult<()> {
        shared::mongo::ping(&self.db, &self.retry).await
    }

    async fn repair(&self, poll_id: &str) -> StoreResult<Repair> {
        let report = self.shared.counters.repair(poll_id).await?;
        self.shared.forget_kept(poll_id);
        Ok(report)
    }

    async fn repair_since(&self, since: Option<DateTime<Utc>>) -> StoreResult<Vec<Repair>> {
        let reports = repair_all(&self.shared.counters, since).await?;
        for r in &reports {
            self.shared.forget_kept(&r.poll_id);
        }
        Ok(reports)
    }
}

/// Repairs every poll touched since `since` (all polls with ballots when `None`).
async fn repair_all(counters: &Counters, since: Option<DateTime<Utc>>) -> StoreResult<Vec<Repair>> {
    let polls = counters.touched_since(since).await?;
    let mut out = Vec::with_capacity(polls.len());
    for poll in polls {
        out.push(counters.repair(&poll).await?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Group commit of ballots, and the counters that follow them

/// Most times a change of a ballot is tried again after other changes of it came first.
const MAX_REVISION_ROUNDS: usize = 256;
/// Ballots waiting for the writer at most; `cast` waits for room beyond that (back-pressure).
const INSERT_QUEUE: usize = 8192;
/// Most ballots in one `insertMany` (far below the server's 100,000 and 48 MB limits).
const MAX_BATCH: usize = 1000;
/// Bound of one batch of a recount (an audit reads every ballot of a poll; some servers compute a
/// whole result before its first batch: SecantusDB takes about 4 s for a million ballots).
const RECOUNT_BATCH_DEADLINE: Duration = Duration::from_secs(60);
/// Ballots per batch of an export's cursor.
const EXPORT_BATCH: u32 = 1000;

/// The error of a pass over many ballots (a recount, an export) whose cursor failed midway: it
/// cannot be resumed where it stopped, so a transient failure is reported as unavailability.
fn pass_failed(retry: &RetryPolicy, e: MongoError, pass: &str) -> StoreError {
    match retry.decide(classify(&e), u32::MAX, Duration::MAX) {
        Decision::GiveUp(e) => e,
        Decision::Retry(_) => StoreError::unavailable(format!("the database failed during {pass}")),
    }
}
/// Counter updates sent at once by the applier.
const UPDATES_AT_ONCE: usize = 16;
/// The applier's rounds start at most this often; the tail a refresh aggregates is about this
/// much of the writers' ballots.
const APPLY_EVERY: Duration = Duration::from_millis(50);

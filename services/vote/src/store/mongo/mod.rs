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
//! # Replaced and withdrawn ballots: revisions are documents of their own
//!
//! A stored document is never changed (only a replay's receipt is). A voter's change is a
//! *revision*: a new document `_id = "<poll_id>:<key>#<v>"` (`v` = 1, 2, …, ten digits, so that a
//! ballot's documents are adjacent and in order in the `_id` index), holding the whole ballot as
//! it is after the change (ballot id, receipt hash, marks; `gone: true` and no marks for a
//! withdrawal), what it takes away (`sc`, `sr`, `sx`: the marks it replaces; none for a vote cast
//! again after a withdrawal) and `d`, what it does to the number of ballots (0, -1, +1). It is
//! inserted through the same group-commit writer as ballots, with the batch's `w` and `s`, so the
//! counters and tails count it exactly like a ballot (adding its marks, taking away `sc`/`sr`/
//! `sx`), and a crash cannot split a change: its one document is stored or not. The latest
//! document of a ballot (its highest `_id`) is the ballot now. Concurrent changes of one ballot
//! race for the same `v`, whose `_id` lets one in (11000 for the others, which read the ballot
//! again and apply their change to what it holds then). A withdrawn ballot's identity may vote
//! again: a revision that adds the new ballot, with its new id and receipt. The audit's recount
//! reads each ballot's latest document (the `_id` index, in order), not the deltas, so it checks
//! the counters' arithmetic.
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
    req_time, to_i64, uint_of,
};
use shared::storage::{StoreError, StoreResult};
use tokio::sync::{mpsc, oneshot};

mod counters;
mod tallies;
mod writer;
use counters::Counters;
use tallies::{Read, Tallies};
use writer::{InsertJob, Writer, applier, lease_keeper};

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

/// The fields of a ballot document that say what it marks (the projection of the passes that
/// count ballots).
const MARK_FIELDS: [&str; 3] = ["choices", "ranking", "scores"];

/// The `_id` of revision `v` of the ballot whose `_id` is `base`.
fn revision_id(base: &str, v: u64) -> String {
    format!("{base}#{v:010}")
}

/// The documents of the ballot whose `_id` is `base` (itself and its revisions): the `_id` range
/// `[base, base + "$")`. (The range alone: SecantusDB plans a `poll_id` equality beside it on
/// another index, or, hinted, walks far more of the `_id` index than the range: 100–250 ms
/// instead of 1 ms. On a sharded cluster this lookup is therefore not targeted by `poll_id`.)
fn documents_of(base: &str) -> Document {
    doc! { "_id": { "$gte": base, "$lt": format!("{base}$") } }
}

/// Whether a ballot's latest document withdraws it.
fn is_gone(d: &Document) -> bool {
    d.get_bool("gone").unwrap_or(false)
}

/// A ballot document's revision number (0: the ballot as first cast).
fn version_of(d: &Document) -> u64 {
    d.get("v").and_then(uint_of).unwrap_or(0)
}

/// Revision `v` of ballot `b` (as it is after the change: see the module docs): it takes away
/// `sub`, adds `b`'s marks unless it withdraws the ballot, and changes the number of ballots by
/// `d`.
///
/// `t`, a random token, tells the change that stored it: an insert retried after a lost reply
/// meets its own document (11000) and recognises it.
fn revision_doc(b: &BallotRecord, v: u64, sub: Option<&Marked>, withdraws: bool) -> Document {
    let list = |v: &[u32]| v.iter().map(|&c| i64::from(c)).collect::<Vec<_>>();
    let mut d = ballot_to_doc(b);
    d.insert("_id", revision_id(&ballot_id(&b.poll_id, &b.key), v));
    d.insert("v", to_i64(v));
    d.insert("t", rand::random::<i64>());
    let delta = match (sub, withdraws) {
        (None, _) => 1,
        (Some(_), false) => 0,
        (Some(_), true) => -1,
    };
    d.insert("d", delta);
    if let Some(at) = b.updated_at {
        d.insert("updated_at", fmt_time(at));
    }
    if withdraws {
        for field in MARK_FIELDS {
            d.remove(field);
        }
        d.insert("gone", true);
    }
    if let Some(m) = sub {
        d.insert("sc", list(&m.choices));
        if let Some(r) = &m.ranking {
            d.insert("sr", list(r));
        }
        if let Some(x) = &m.scores {
            d.insert("sx", list(x));
        }
    }
    d
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

/// The ballot a document (a ballot's or a revision's, not a withdrawal's) holds.
fn doc_to_ballot(d: &Document) -> StoreResult<BallotRecord> {
    let m = marks_of(d)?;
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
        revision: version_of(d),
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
    inserts: mpsc::Sender<InsertJob>,
    /// Lookups of ballots by id, answered in batches (see [`lookups_task`]).
    lookups: mpsc::Sender<Lookup>,
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
        ensure_collection(
            &db,
            BALLOTS_COLLECTION,
            vec![poll_voter, poll_writer_seq, ballot_id],
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
        let (lookups, asked) = mpsc::channel(INSERT_QUEUE);
        tokio::spawn(lookups_task(ballots.clone(), retry.clone(), asked));
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
            lookups,
            inline: Arc::new(tokio::sync::Mutex::new(())),
            _stop: stop.drop_guard(),
        })
    }

    /// Inserts one document (a ballot, or a revision of one) through the writer: `true` when
    /// stored now, `false` when its `_id` already existed. It adds `add` to its poll's tally and
    /// takes away `sub`. Returns once the insert is acknowledged with the store's write concern
    /// (durable).
    async fn insert(
        &self,
        doc: Document,
        poll_id: &str,
        (add, sub): (Option<Marked>, Option<Marked>),
    ) -> StoreResult<bool> {
        let (reply, answer) = oneshot::channel();
        let job = InsertJob {
            doc,
            poll_id: poll_id.to_owned(),
            add,
            sub,
            reply,
            span: shared::metrics::caller_span(),
        };
        self.inserts
            .send(job)
            .await
            .map_err(|_| StoreError::internal("the ballot writer has stopped"))?;
        answer
            .await
            .map_err(|_| StoreError::internal("the ballot writer dropped a ballot"))?
    }

    /// The latest document of the ballot `(poll_id, key)`: the ballot as it is now (see the
    /// module docs), if it was ever cast.
    async fn latest(&self, poll_id: &str, key: &str) -> StoreResult<Option<Document>> {
        let filter = documents_of(&ballot_id(poll_id, key));
        self.retry
            .run(|| self.ballots.find_one(filter.clone()).sort(doc! { "_id": -1 }))
            .await
    }

    /// One cursor over the poll's documents in `_id` order (a ballot's revisions right after it),
    /// with `projection`; its first batch bounded by [`RECOUNT_BATCH_DEADLINE`].
    async fn in_order(
        &self,
        poll_id: &str,
        projection: Document,
        batch: u32,
    ) -> StoreResult<mongodb::Cursor<Document>> {
        let first_batch = RetryPolicy {
            deadline: RECOUNT_BATCH_DEADLINE,
            ..self.retry.clone()
        };
        // The poll's `_id` range alone (see [`documents_of`]).
        let filter = doc! { "_id": { "$gte": format!("{poll_id}:"), "$lt": format!("{poll_id};") } };
        first_batch
            .run(|| {
                self.ballots
                    .find(filter.clone())
                    .sort(doc! { "_id": 1 })
                    .projection(projection.clone())
                    .batch_size(batch)
            })
            .await
    }

    /// Folds the uncounted ballots of dead writers (whose lease ran out) into their counters;
    /// returns how many writers were adopted. Every replica does this by itself every
    /// ~30 s; public for operators' tools and tests.
    pub async fn adopt_dead_writers(&self) -> StoreResult<usize> {
        self.shared.counters.adopt_dead().await
    }

    /// Counts the ballots of one poll as they are now (each one's latest document, unless it
    /// withdraws it) with one cursor in `_id` order whose every batch (not the whole pass) is
    /// bounded, by [`RECOUNT_BATCH_DEADLINE`], so a million ballots are read in full.
    async fn recount_streamed(&self, poll_id: &str) -> StoreResult<Tally> {
        let mut cursor = self
            .in_order(poll_id, mark_projection(&["key", "gone"]), 10_000)
            .await?;
        let mut tally = Tally::default();
        let mut latest = Latest::default();
        loop {
            let next = next_document(&self.retry, &mut cursor, "a recount").await?;
            let done = next.is_none();
            if let Some(d) = latest.push(next) {
                tally.add(marks_of(&d)?.marks());
            }
            if done {
                return Ok(tally);
            }
        }
    }
}

/// The next document of a pass over many (a recount, an export), its batch bounded by
/// [`RECOUNT_BATCH_DEADLINE`]; `None` at the end.
async fn next_document(
    retry: &RetryPolicy,
    cursor: &mut mongodb::Cursor<Document>,
    pass: &str,
) -> StoreResult<Option<Document>> {
    match tokio::time::timeout(RECOUNT_BATCH_DEADLINE, cursor.advance()).await {
        Ok(Ok(true)) => cursor
            .deserialize_current()
            .map(Some)
            .map_err(|e| pass_failed(retry, e, pass)),
        Ok(Ok(false)) => Ok(None),
        Ok(Err(e)) => Err(pass_failed(retry, e, pass)),
        Err(_) => Err(StoreError::unavailable(format!(
            "a batch of {pass} took longer than {} s",
            RECOUNT_BATCH_DEADLINE.as_secs()
        ))),
    }
}

/// Follows a poll's documents in `_id` order and hands out each ballot's latest document, unless
/// it withdraws the ballot.
#[derive(Default)]
struct Latest {
    pending: Option<Document>,
}

impl Latest {
    /// Takes the next document (`None`: the end); returns the previous ballot's latest document
    /// once it is known to be its latest. (A document without a `key` is a ballot of its own.)
    fn push(&mut self, next: Option<Document>) -> Option<Document> {
        let same_ballot = match (&self.pending, &next) {
            (Some(p), Some(n)) => p.get_str("key").is_ok_and(|k| n.get_str("key").ok() == Some(k)),
            _ => false,
        };
        let done = if same_ballot { None } else { self.pending.take() };
        if next.is_some() {
            self.pending = next;
        }
        done.filter(|d| !is_gone(d))
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
            if self
                .insert(doc.clone(), &ballot.poll_id, (Some(ballot.marked()), None))
                .await?
            {
                return Ok(CastOutcome::Accepted(ballot));
            }
            let Some(stored) = self.latest(&ballot.poll_id, &ballot.key).await? else {
                continue;
            };
            if is_gone(&stored) {
                // Withdrawn: this ballot takes its place, as the next revision.
                let v = version_of(&stored) + 1;
                let revision = revision_doc(&ballot, v, None, false);
                if self
                    .insert(revision, &ballot.poll_id, (Some(ballot.marked()), None))
                    .await?
                {
                    return Ok(CastOutcome::Accepted(BallotRecord { revision: v, ..ballot }));
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

    /// One aggregation for the page: the documents of the voters' ballots of these polls (index
    /// `{poll_id, voter}`; a revision keeps its ballot's voter), counted per poll by what they do
    /// to the number of ballots (`d`: a ballot as first cast has none and adds one, a withdrawal
    /// takes one away, a vote again adds one), so at most four groups per poll come back however
    /// many ballots a voter has on a `none` poll. Ballots keyed by their voter (`ip`, `voter`
    /// dedupe) count when one of them is not withdrawn; on `none` polls (`keyed_by_voter: false`),
    /// as on the embedded store, a voter who cast a ballot has voted. Every branch names its polls,
    /// so a sharded collection routes it to their shards only.
    async fn voted(&self, polls: &[(String, bool)], voters: &[String]) -> StoreResult<Vec<bool>> {
        if polls.is_empty() || voters.is_empty() {
            return Ok(vec![false; polls.len()]);
        }
        let all: Vec<&str> = polls.iter().map(|(poll_id, _)| poll_id.as_str()).collect();
        let pipeline = vec![
            doc! { "$match": { "poll_id": { "$in": &all }, "voter": { "$in": voters } } },
            doc! { "$group": { "_id": { "p": "$poll_id", "d": "$d" }, "n": { "$sum": 1 } } },
        ];
        let found = counters::collect(&self.ballots, &self.retry, pipeline).await?;
        // Per poll: (ballots cast, withdrawn, cast again).
        let mut counts: std::collections::HashMap<&str, (u64, u64, u64)> = std::collections::HashMap::new();
        for g in &found {
            let key = g.get_document("_id").map_err(|_| bad("voted group"))?;
            let Ok(poll) = key.get_str("p") else { continue };
            let n = g.get("n").and_then(uint_of).unwrap_or(0);
            let c = counts.entry(poll).or_default();
            match key
                .get("d")
                .and_then(|d| d.as_i32().map(i64::from).or_else(|| d.as_i64()))
            {
                None => c.0 += n,
                Some(-1) => c.1 += n,
                Some(1) => c.2 += n,
                Some(_) => {}
            }
        }
        Ok(polls
            .iter()
            .map(|(poll_id, keyed_by_voter)| {
                let (cast, withdrawn, again) = counts.get(poll_id.as_str()).copied().unwrap_or_default();
                if *keyed_by_voter {
                    cast + again > withdrawn
                } else {
                    cast + again > 0
                }
            })
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

    /// One single-document update of the ballot's latest document, matched on its `_id` and
    /// ballot id (a retry of it sets the same hash again).
    async fn reissue_receipt(&self, ballot: &BallotRecord, receipt_hash: &str) -> StoreResult<bool> {
        let Some(latest) = self.latest(&ballot.poll_id, &ballot.key).await? else {
            return Ok(false);
        };
        if is_gone(&latest) {
            return Ok(false);
        }
        let filter = doc! { "_id": req_str(&latest, "_id")?, "ballot_id": &ballot.id };
        let res = self
            .retry
            .run(|| {
                self.ballots
                    .update_one(filter.clone(), doc! { "$set": { "receipt_hash": receipt_hash } })
            })
            .await?;
        Ok(res.matched_count == 1)
    }

    /// Inserts the next revision through the writer, first for the ballot as the caller read it
    /// (`ballot.revision`, its marks), then, when another change of it took that revision number
    /// first, for the ballot as it is then (read again).
    async fn revise(&self, ballot: &BallotRecord, change: Revision) -> StoreResult<Revised> {
        let base = ballot_id(&ballot.poll_id, &ballot.key);
        let mut read = Some(ballot.clone());
        // 64 voters' devices changing one ballot at once take 64 rounds at worst.
        for _ in 0..MAX_REVISION_ROUNDS {
            let stored = match read.take() {
                Some(b) => b,
                None => match self.latest(&ballot.poll_id, &ballot.key).await? {
                    Some(d) if !is_gone(&d) && d.get_str("ballot_id").ok() == Some(ballot.id.as_str()) => {
                        doc_to_ballot(&d)?
                    }
                    _ => return Ok(Revised::Gone),
                },
            };
            let was = stored.marked();
            let v = stored.revision + 1;
            let (revision, add, done) = match &change {
                Revision::Replace(m) => {
                    let mut now = stored.replaced(m.clone(), Utc::now());
                    now.revision = v;
                    let revision = revision_doc(&now, v, Some(&was), false);
                    (revision, Some(m.clone()), Revised::Replaced(Box::new(now)))
                }
                Revision::Withdraw => (revision_doc(&stored, v, Some(&was), true), None, Revised::Withdrawn),
            };
            let token = revision.get("t").cloned();
            if self.insert(revision, &ballot.poll_id, (add, Some(was))).await? {
                return Ok(done);
            }
            // Revision `v` exists: another change's, or this one's (an insert retried after a
            // lost reply).
            let id = revision_id(&base, v);
            let existing = self.retry.run(|| self.ballots.find_one(doc! { "_id": &id })).await?;
            if existing.is_some_and(|d| d.get("t") == token.as_ref()) {
                return Ok(done);
            }
        }
        Err(StoreError::unavailable(format!(
            "ballot {} kept changing; try again",
            ballot.id
        )))
    }

    /// The ballot with this id as it is now, unless withdrawn.
    async fn ballot(&self, ballot_id: &str) -> StoreResult<Option<BallotRecord>> {
        // The newest document carrying the id: a ballot's documents carry its id from its cast (or
        // vote again) to its withdrawal, which carries it too; so it is the ballot's latest
        // document, or its withdrawal.
        let (reply, answer) = oneshot::channel();
        let lookup = Lookup {
            ballot_id: ballot_id.to_owned(),
            reply,
        };
        self.lookups
            .send(lookup)
            .await
            .map_err(|_| StoreError::internal("the ballot lookups have stopped"))?;
        let newest = answer
            .await
            .map_err(|_| StoreError::internal("the ballot lookups dropped a lookup"))??;
        newest.filter(|d| !is_gone(d)).as_ref().map(doc_to_ballot).transpose()
    }

    /// One cursor over the poll's documents in `_id` order (only the exported fields), read batch
    /// by batch as the stream is consumed, each batch bounded by [`RECOUNT_BATCH_DEADLINE`] like a
    /// recount's; each ballot's latest document makes its line.
    async fn ballots(&self, poll_id: &str) -> StoreResult<super::BallotStream> {
        let projection = mark_projection(&["ballot_id", "created_at", "key", "gone"]);
        let cursor = self.in_order(poll_id, projection, EXPORT_BATCH).await?;
        let retry = self.retry.clone();
        let line = |d: Document| -> StoreResult<BallotLine> {
            let m = marks_of(&d)?;
            Ok(BallotLine {
                id: req_str(&d, "ballot_id")?,
                created_at: req_time(&d, "created_at")?,
                choices: m.choices,
                ranking: m.ranking,
                scores: m.scores,
            })
        };
        let state = Some((cursor, Latest::default()));
        Ok(Box::pin(futures_util::stream::unfold(state, move |state| {
            let retry = retry.clone();
            async move {
                let (mut cursor, mut latest) = state?;
                loop {
                    let next = match next_document(&retry, &mut cursor, "an export").await {
                        Ok(next) => next,
                        // An error ends the stream.
                        Err(e) => return Some((Err(e), None)),
                    };
                    let done = next.is_none();
                    match latest.push(next) {
                        Some(d) => {
                            let state = (!done).then_some((cursor, latest));
                            return Some((line(d), state));
                        }
                        None if done => return None,
                        None => {}
                    }
                }
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

/// A ballot looked up by its id (`GET`, `PUT`, `DELETE /api/votes/{id}`): the newest document
/// carrying the id.
struct Lookup {
    ballot_id: String,
    reply: oneshot::Sender<StoreResult<Option<Document>>>,
}

/// Answers lookups of ballots by id in batches, as the writer stores ballots: it takes the first
/// waiting lookup, then every other one already waiting (up to [`MAX_LOOKUPS`]), and reads all
/// their documents with one `find` (`ballot_id: {$in: …}`, index `ballot_id`), a few batches in
/// flight at once. On a server where a command costs far more than a document (SecantusDB), this
/// is what lets a voter's change cost about what a new ballot does. Runs until the store is
/// dropped.
async fn lookups_task(ballots: Collection<Document>, retry: RetryPolicy, mut asked: mpsc::Receiver<Lookup>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT));
    while let Some(first) = asked.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_LOOKUPS {
            match asked.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let (ballots, retry) = (ballots.clone(), retry.clone());
        tokio::spawn(async move {
            let ids: Vec<&str> = batch.iter().map(|l| l.ballot_id.as_str()).collect();
            let filter = doc! { "ballot_id": { "$in": &ids } };
            let found: StoreResult<Vec<Document>> = retry
                .run(|| async {
                    use futures_util::TryStreamExt as _;
                    ballots.find(filter.clone()).await?.try_collect().await
                })
                .await;
            drop(slot);
            match found {
                Ok(docs) => {
                    // The newest (highest `_id`) document of each id.
                    let mut newest: std::collections::HashMap<String, Document> = std::collections::HashMap::new();
                    for d in docs {
                        let (Ok(id), Ok(at)) = (d.get_str("ballot_id"), d.get_str("_id")) else {
                            continue;
                        };
                        let newer = newest
                            .get(id)
                            .is_none_or(|n| n.get_str("_id").is_ok_and(|was| was < at));
                        if newer {
                            newest.insert(id.to_owned(), d);
                        }
                    }
                    for l in batch {
                        let _ = l.reply.send(Ok(newest.get(&l.ballot_id).cloned()));
                    }
                }
                Err(e) => {
                    for l in batch {
                        let _ = l.reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// Most ballot ids looked up by one `find`.
const MAX_LOOKUPS: usize = 256;
/// Lookup batches in flight at once.
const LOOKUPS_IN_FLIGHT: usize = 4;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_in_id_order_yields_each_ballots_latest_document_unless_withdrawn() {
        let doc = |id: &str, key: &str, gone: bool| doc! { "_id": id, "key": key, "gone": gone };
        let walk = [
            doc("p:a", "a", false),
            doc("p:a#0000000001", "a", false),
            doc("p:b", "b", false),
            doc("p:b#0000000001", "b", true),
            doc("p:c", "c", false),
            doc("p:d", "d", false),
            doc("p:d#0000000001", "d", true),
            doc("p:d#0000000002", "d", false),
        ];
        let mut latest = Latest::default();
        let mut out = Vec::new();
        for d in walk.into_iter().map(Some).chain([None]) {
            out.extend(latest.push(d).map(|d| d.get_str("_id").expect("_id").to_owned()));
        }
        assert_eq!(out, ["p:a#0000000001", "p:c", "p:d#0000000002"]);
        // Revision ids sort after their ballot's and in their own order.
        assert!(revision_id("p:a", 2) > revision_id("p:a", 1) && revision_id("p:a", 1).as_str() > "p:a");
        assert!(revision_id("p:a", 10) > revision_id("p:a", 9));
    }
}

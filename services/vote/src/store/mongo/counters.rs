//! The tally counter documents, the writers' leases, and the repair of counters from ballots
//! (the design is argued in the `mongo` module docs; the in-memory side is the `tallies` module).
//!
//! - `<ballots>_counters`: one document per (poll, writer), `_id = "<poll_id>:<w>"`,
//!   `{poll_id, w, seq, n, o: {"<option>": count}, at}`: the counts of every ballot of that poll
//!   written by `w` in batches `s <= seq`, and of every revision of a ballot (a replacement, a
//!   withdrawal, a vote again after one: a document of its own, see the `mongo` module docs)
//!   stored by `w` in those batches: what it took away and what it added. A writer's revisions may
//!   take away more than its ballots added (it withdrew ballots another writer stored), so counts
//!   are kept modulo 2^64 (stored as the same 64 bits in an `Int64`; see [`Tally::remove_n`]); the
//!   sum of all counters and tails is the exact tally. Only ever moved by one conditional single-document
//!   update (`{_id, seq: from}` → `$inc` the batch counts, `$set: {seq: to}`), so a retry after a
//!   lost reply cannot count a batch twice, and a ballot is counted by its counter exactly when its
//!   `s` is at most the counter's `seq`.
//! - `<ballots>_writers`: one document per live writer (vote process), `{_id: w, at}`, renewed
//!   every few seconds: the writer's lease. A writer stops sending ballots when it could not renew
//!   it for [`WRITE_LEASE`]; another replica adopts its uncounted ballots after [`LEASE`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Collection, Database};

use super::tallies::{Plan, Refreshed};
use shared::contract::Tally;
use shared::mongo::{RetryPolicy, bad, ensure_collection, index, is_duplicate_key, req_str, to_i64, uint_of};

use shared::storage::{StoreError, StoreResult};

use crate::ballot::Marked;
use crate::store::Repair;

/// How often a writer renews its lease (and, failing, how soon it tries again).
pub(super) const HEARTBEAT: Duration = Duration::from_secs(5);
pub(super) const HEARTBEAT_RETRY: Duration = Duration::from_secs(1);
/// A writer that could not renew its lease for this long sends no more ballots until it can.
pub(super) const WRITE_LEASE: Duration = Duration::from_secs(20);
/// A writer whose lease was not renewed for this long is dead: its uncounted ballots are adopted.
/// It exceeds [`WRITE_LEASE`] plus the longest a sent batch can take to land.
pub(super) const LEASE: Duration = Duration::from_secs(60);
/// How often a replica looks for dead writers.
pub(super) const ADOPT_EVERY: Duration = Duration::from_secs(30);
/// Deadline of the O(ballots) passes of a repair (not bound by one operation's deadline).
const REPAIR_DEADLINE: Duration = Duration::from_secs(600);

fn counter_id(poll: &str, w: i64) -> String {
    format!("{poll}:{w}")
}

fn now() -> mongodb::bson::DateTime {
    mongodb::bson::DateTime::now()
}

/// A count as a counter stores it: its 64 bits as an `Int64` (a count below zero modulo 2^64 is
/// stored as that negative number, and `$inc` keeps adding modulo 2^64 as long as the true sums
/// fit in 63 bits).
#[allow(clippy::cast_possible_wrap)]
fn stored(n: u64) -> i64 {
    n as i64
}

/// A count stored by [`stored`].
#[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)]
fn count_of(b: &Bson) -> Option<u64> {
    match b {
        Bson::Int32(i) => Some(i64::from(*i) as u64),
        Bson::Int64(i) => Some(*i as u64),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Some((*f as i64) as u64),
        _ => None,
    }
}

/// Adds a counter document's per-key counts (`o`, `sc`: per option index; `rk`: per ranking) to
/// `t`.
fn read_counts(d: &Document, field: &str, t: &mut Tally) -> StoreResult<()> {
    let Ok(o) = d.get_document(field) else {
        return Ok(());
    };
    for (k, v) in o {
        let n = count_of(v).ok_or_else(|| bad("counter count"))?;
        match field {
            "rk" => {
                let count = t.rankings.entry(k.clone()).or_default();
                *count = count.wrapping_add(n);
            }
            _ => {
                let i: usize = k.parse().map_err(|_| bad("counter option"))?;
                let v = if field == "sc" { &mut t.sums } else { &mut t.by_option };
                if v.len() <= i {
                    v.resize(i + 1, 0);
                }
                v[i] = v[i].wrapping_add(n);
            }
        }
    }
    Ok(())
}

/// `(seq, counts)` of a counter document: `n` ballots, `o` per option, and for score polls `sc`
/// (score sums per option), for ranked polls `rk` (ballots per ranking).
fn counts_of(d: &Document) -> StoreResult<(u64, Tally)> {
    let seq = d.get("seq").and_then(uint_of).ok_or_else(|| bad("counter seq"))?;
    let total = d.get("n").and_then(count_of).ok_or_else(|| bad("counter n"))?;
    let mut t = Tally {
        total,
        ..Tally::default()
    };
    for field in ["o", "sc", "rk"] {
        read_counts(d, field, &mut t)?;
    }
    Ok((seq, t))
}

fn writer_of(d: &Document, key: &str) -> StoreResult<i64> {
    match d.get(key) {
        Some(Bson::Int64(w)) => Ok(*w),
        Some(Bson::Int32(w)) => Ok(i64::from(*w)),
        _ => Err(bad("writer id")),
    }
}

/// The non-zero per-key counts of a tally, by counter field (`o`, `sc`, `rk`).
fn keyed_counts(t: &Tally) -> [(&'static str, Vec<(String, u64)>); 3] {
    let indexed = |v: &[u64]| -> Vec<(String, u64)> {
        v.iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i.to_string(), *n))
            .collect()
    };
    [
        ("o", indexed(&t.by_option)),
        ("sc", indexed(&t.sums)),
        (
            "rk",
            t.rankings
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.clone(), *n))
                .collect(),
        ),
    ]
}

fn inc_of(delta: &Tally) -> Document {
    let mut inc = doc! { "n": stored(delta.total) };
    for (field, counts) in keyed_counts(delta) {
        for (k, n) in counts {
            inc.insert(format!("{field}.{k}"), stored(n));
        }
    }
    inc
}

/// The counter fields holding `t` (`n`, `o`, `sc`, `rk`), to `$set` or insert.
fn counts_doc(t: &Tally) -> Document {
    let mut d = doc! { "n": stored(t.total) };
    for (field, counts) in keyed_counts(t) {
        let sub: Document = counts.into_iter().map(|(k, n)| (k, Bson::Int64(stored(n)))).collect();
        d.insert(field, sub);
    }
    d
}

/// The `$group` key of the passes that count ballots and revisions: what they add (`c`, `r`,
/// `x`), what they take away (`sc`, `sr`, `sx`) and how they change the number of ballots (`d`,
/// revisions only), plus `extra` (name → field: `poll_id`, `w`, `s`).
fn group_key(extra: &[(&str, &str)]) -> Document {
    let mut key: Document = extra
        .iter()
        .map(|(name, field)| ((*name).to_owned(), Bson::String(format!("${field}"))))
        .collect();
    for (name, field) in [
        ("c", "choices"),
        ("r", "ranking"),
        ("x", "scores"),
        ("sc", "sc"),
        ("sr", "sr"),
        ("sx", "sx"),
        ("d", "d"),
    ] {
        key.insert(name, format!("${field}"));
    }
    key
}

/// Counts `n` entries of one group (see [`group_key`]) into `t`.
fn count_group(t: &mut Tally, key: &Document, n: u64) -> StoreResult<()> {
    let marks = |prefix: &str| -> StoreResult<Option<Marked>> {
        let mut d = Document::new();
        for (from, to) in [("c", "choices"), ("r", "ranking"), ("x", "scores")] {
            if let Some(v) = key.get(format!("{prefix}{from}")) {
                d.insert(to, v.clone());
            }
        }
        if d.is_empty() {
            return Ok(None);
        }
        super::marks_of(&d).map(Some)
    };
    if let Some(m) = marks("s")? {
        t.remove_n(m.marks(), n);
    }
    if let Some(m) = marks("")? {
        t.add_n(m.marks(), n);
    }
    Ok(())
}

/// Counts the documents (ballots and revisions) matching `filter`, grouped by what they change
/// and by `extra` (see [`group_key`]): each group's key and count.
pub(super) async fn count_groups(
    ballots: &Collection<Document>,
    retry: &RetryPolicy,
    filter: &Document,
    extra: &[(&str, &str)],
) -> StoreResult<Vec<(Document, u64)>> {
    let pipeline = vec![
        doc! { "$match": filter.clone() },
        doc! { "$group": { "_id": group_key(extra), "n": { "$sum": 1 } } },
    ];
    collect(ballots, retry, pipeline)
        .await?
        .into_iter()
        .map(|g| {
            let key = g.get_document("_id").map_err(|_| bad("tally group"))?.clone();
            let n = g.get("n").and_then(uint_of).ok_or_else(|| bad("tally count"))?;
            Ok((key, n))
        })
        .collect()
}

/// Runs an aggregation to the end, within `retry`.
pub(super) async fn collect(
    coll: &Collection<Document>,
    retry: &RetryPolicy,
    pipeline: Vec<Document>,
) -> StoreResult<Vec<Document>> {
    let pipeline = &pipeline;
    retry
        .run(|| async move {
            coll.aggregate(pipeline.clone())
                .await?
                .try_collect::<Vec<Document>>()
                .await
        })
        .await
}

/// The collections of the tally bookkeeping, and this process's writer id.
#[derive(Clone)]
pub(super) struct Counters {
    pub counters: Collection<Document>,
    /// The same collection with write concern `{w: 1, j: false}`, for the applier's routine
    /// updates: losing one (a crash, a rollback) only leaves its ballots in the tail, where every
    /// refresh counts them, and the writer finds its counter behind and catches it up.
    fast: Collection<Document>,
    pub writers: Collection<Document>,
    pub ballots: Collection<Document>,
    pub retry: RetryPolicy,
    pub me: i64,
}

impl Counters {
    /// Creates the collections and indexes (idempotent).
    pub async fn open(
        db: &Database,
        ballots: &Collection<Document>,
        retry: &RetryPolicy,
        me: i64,
    ) -> StoreResult<(Self, bool)> {
        let (counters_name, writers_name) = (
            format!("{}_counters", ballots.name()),
            format!("{}_writers", ballots.name()),
        );
        let existed = retry.run(|| db.list_collection_names()).await?.contains(&counters_name);
        let by_poll = index("poll", doc! { "poll_id": 1 });
        let by_writer = index("writer", doc! { "w": 1 });
        let by_time = index("at", doc! { "at": 1 });
        ensure_collection(db, &counters_name, vec![by_poll, by_writer, by_time], retry).await?;
        ensure_collection(db, &writers_name, Vec::new(), retry).await?;
        let fast = mongodb::options::CollectionOptions::builder()
            .write_concern(
                mongodb::options::WriteConcern::builder()
                    .w(mongodb::options::Acknowledgment::Nodes(1))
                    .journal(false)
                    .build(),
            )
            .build();
        let this = Self {
            counters: db.collection(&counters_name),
            fast: db.collection_with_options(&counters_name, fast),
            writers: db.collection(&writers_name),
            ballots: ballots.clone(),
            retry: retry.clone(),
            me,
        };
        Ok((this, existed))
    }

    /// Renews this writer's lease.
    pub async fn heartbeat(&self) -> StoreResult<()> {
        let (filter, update) = (doc! { "_id": self.me }, doc! { "$set": { "at": now() } });
        self.retry
            .run(|| self.writers.update_one(filter.clone(), update.clone()).upsert(true))
            .await?;
        Ok(())
    }

    /// Our counter of `poll`, created (at sequence 0) unless it exists: `(seq, counts)`.
    pub async fn register(&self, poll: &str) -> StoreResult<(u64, Tally)> {
        let filter = doc! { "_id": counter_id(poll, self.me) };
        let update = doc! { "$setOnInsert": {
            "poll_id": poll, "w": self.me, "seq": 0_i64, "n": 0_i64, "o": {}, "sc": {}, "rk": {}, "at": now(),
        } };
        for _ in 0..3 {
            let found = self
                .retry
                .run(|| async {
                    let r = self
                        .counters
                        .find_one_and_update(filter.clone(), update.clone())
                        .upsert(true)
                        .return_document(ReturnDocument::After)
                        .await;
                    match r {
                        // Two upserts of one new `_id` at once: one of them fails; read it again.
                        Err(e) if is_duplicate_key(&e) => Ok(None),
                        other => other,
                    }
                })
                .await?;
            if let Some(d) = found {
                return counts_of(&d);
            }
        }
        Err(StoreError::internal(format!(
            "cannot register the tally counter of poll {poll}"
        )))
    }

    /// Moves writer `w`'s counter of `poll` from `from` to `to`, adding `delta`: the counter after,
    /// or `None` when it was not at `from` (or does not exist). `fast`: without waiting for the
    /// journal or a majority (see [`Counters::fast`]).
    pub async fn advance(
        &self,
        poll: &str,
        w: i64,
        (from, to): (u64, u64),
        delta: &Tally,
        fast: bool,
    ) -> StoreResult<Option<(u64, Tally)>> {
        let filter = doc! { "_id": counter_id(poll, w), "seq": to_i64(from) };
        let update = doc! { "$inc": inc_of(delta), "$set": { "seq": to_i64(to), "at": now() } };
        let coll = if fast { &self.fast } else { &self.counters };
        let found = self
            .retry
            .run(|| {
                coll.find_one_and_update(filter.clone(), update.clone())
                    .return_document(ReturnDocument::After)
            })
            .await?;
        found.as_ref().map(counts_of).transpose()
    }

    /// Writer `w`'s counter of `poll`.
    pub async fn read(&self, poll: &str, w: i64) -> StoreResult<Option<(u64, Tally)>> {
        let filter = doc! { "_id": counter_id(poll, w) };
        let found = self.retry.run(|| self.counters.find_one(filter.clone())).await?;
        found.as_ref().map(counts_of).transpose()
    }

    /// Creates writer `w`'s counter of `poll` at `(seq, counts)`; `false` if it exists.
    pub async fn create(&self, poll: &str, w: i64, seq: u64, counts: &Tally) -> StoreResult<bool> {
        let mut d = doc! { "_id": counter_id(poll, w), "poll_id": poll, "w": w, "seq": to_i64(seq), "at": now() };
        d.extend(counts_doc(counts));
        self.retry
            .run(|| async {
                match self.counters.insert_one(d.clone()).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_duplicate_key(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await
    }

    /// Writer `w`'s ballots of `poll` in batches after `after` (up to `upto`): their counts and
    /// the last batch seen (served by the `{poll_id, w, s}` index).
    pub async fn count_range(&self, poll: &str, w: i64, after: u64, upto: Option<u64>) -> StoreResult<(Tally, u64)> {
        let mut s = doc! { "$gt": to_i64(after) };
        if let Some(upto) = upto {
            s.insert("$lte", to_i64(upto));
        }
        let filter = doc! { "poll_id": poll, "w": w, "s": s };
        let mut t = Tally::default();
        for (key, n) in count_groups(&self.ballots, &self.retry, &filter, &[]).await? {
            count_group(&mut t, &key, n)?;
        }
        // The last batch, from the index's end (not `$max`, which some servers lack).
        let newest = self
            .retry
            .run(|| {
                self.ballots
                    .find_one(filter.clone())
                    .sort(doc! { "poll_id": -1, "w": -1, "s": -1 })
                    .projection(doc! { "s": 1 })
            })
            .await?;
        let last = newest
            .and_then(|d| d.get("s").and_then(uint_of))
            .unwrap_or(after)
            .max(after);
        Ok((t, last))
    }

    /// Our ballots stored by batch `seq`, by poll (an unclear batch that has settled).
    pub async fn count_batch(&self, seq: u64, polls: &[String]) -> StoreResult<HashMap<String, Tally>> {
        if polls.is_empty() {
            return Ok(HashMap::new());
        }
        let filter = doc! { "$or": polls.iter().map(|p| doc! { "poll_id": p, "w": self.me, "s": to_i64(seq) }).collect::<Vec<_>>() };
        let mut out: HashMap<String, Tally> = HashMap::new();
        for (key, n) in count_groups(&self.ballots, &self.retry, &filter, &[("p", "poll_id")]).await? {
            count_group(out.entry(req_str(&key, "p")?).or_default(), &key, n)?;
        }
        Ok(out)
    }

    /// One refresh of the planned polls: the counters, then every ballot no counter covers yet
    /// (other writers' batches after their counter, and ballots without a writer), and our
    /// unclear batches. Its cost is the number of counters plus the uncounted ballots, whatever
    /// the number of ballots counted already.
    pub async fn refresh(&self, plans: &[Plan]) -> StoreResult<HashMap<String, Refreshed>> {
        let ids: Vec<&str> = plans.iter().map(|p| p.poll.as_str()).collect();
        let known: HashSet<&str> = plans.iter().filter(|p| p.own_known).map(|p| p.poll.as_str()).collect();
        let filter = &doc! { "poll_id": { "$in": &ids } };
        let found: Vec<Document> = self
            .retry
            .run(|| async move { self.counters.find(filter.clone()).await?.try_collect().await })
            .await?;
        let mut out: HashMap<String, Refreshed> =
            ids.iter().map(|id| ((*id).to_owned(), Refreshed::default())).collect();
        // One clause per poll and writer, each an equality prefix of the `{poll_id, w, s}` index
        // (a `$in` on `poll_id` inside an `$or` is planned as a scan by some servers).
        let mut tails: Vec<Document> = ids.iter().map(|id| doc! { "poll_id": *id, "w": Bson::Null }).collect();
        for d in &found {
            let poll = req_str(d, "poll_id")?;
            let w = writer_of(d, "w")?;
            let (seq, counts) = counts_of(d)?;
            let Some(r) = out.get_mut(&poll) else { continue };
            if w == self.me && known.contains(poll.as_str()) {
                r.own_doc = Some((seq, counts));
            } else {
                r.others.merge(&counts);
                tails.push(doc! { "poll_id": &poll, "w": w, "s": { "$gt": to_i64(seq) } });
            }
        }
        let tails = doc! { "$or": tails };
        for (key, n) in count_groups(&self.ballots, &self.retry, &tails, &[("p", "poll_id")]).await? {
            if let Some(r) = out.get_mut(&req_str(&key, "p")?) {
                count_group(&mut r.others, &key, n)?;
            }
        }
        let unclear: Vec<Document> = plans
            .iter()
            .filter(|p| p.own_known && !p.unclear.is_empty())
            .map(|p| {
                let seqs: Vec<i64> = p.unclear.iter().map(|&s| to_i64(s)).collect();
                doc! { "poll_id": &p.poll, "w": self.me, "s": { "$in": seqs } }
            })
            .collect();
        if !unclear.is_empty() {
            let unclear = doc! { "$or": unclear };
            let extra = [("p", "poll_id"), ("s", "s")];
            for (key, n) in count_groups(&self.ballots, &self.retry, &unclear, &extra).await? {
                let s = key.get("s").and_then(uint_of).ok_or_else(|| bad("batch"))?;
                if let Some(r) = out.get_mut(&req_str(&key, "p")?) {
                    count_group(r.unclear.entry(s).or_default(), &key, n)?;
                }
            }
        }
        Ok(out)
    }

    /// Folds the uncounted ballots of writers whose lease ran out (dead processes) into their
    /// counters, then forgets those writers. Returns how many writers were adopted.
    pub async fn adopt_dead(&self) -> StoreResult<usize> {
        let expired = mongodb::bson::DateTime::from_millis(now().timestamp_millis() - LEASE.as_millis() as i64);
        let filter = doc! { "at": { "$lt": expired }, "_id": { "$ne": self.me } };
        let dead: Vec<Document> = self
            .retry
            .run(|| async { self.writers.find(filter.clone()).limit(16).await?.try_collect().await })
            .await?;
        for d in &dead {
            let w = writer_of(d, "_id")?;
            let theirs = doc! { "w": w };
            let counters: Vec<Document> = self
                .retry
                .run(|| async { self.counters.find(theirs.clone()).await?.try_collect().await })
                .await?;
            for c in &counters {
                let poll = req_str(c, "poll_id")?;
                let (seq, _) = counts_of(c)?;
                let (tail, last) = self.count_range(&poll, w, seq, None).await?;
                if !tail.is_zero() || last > seq {
                    // `None`: another replica adopted it first.
                    self.advance(&poll, w, (seq, last), &tail, false).await?;
                }
            }
            let gone = doc! { "_id": w, "at": d.get("at").cloned().unwrap_or(Bson::Null) };
            self.retry.run(|| self.writers.delete_one(gone.clone())).await?;
            tracing::info!(
                writer = w,
                counters = counters.len(),
                "adopted the uncounted ballots of a dead writer"
            );
        }
        Ok(dead.len())
    }

    /// Makes every counter of `poll` equal to what its ballots say (an idempotent recount; see
    /// the `mongo` module docs for when it runs). Counters are rewritten at their own sequence,
    /// conditionally, so a live writer's concurrent update is never lost; writers with ballots
    /// but no counter get one.
    pub async fn repair(&self, poll: &str) -> StoreResult<Repair> {
        let slow = RetryPolicy {
            deadline: REPAIR_DEADLINE,
            ..self.retry.clone()
        };
        for _ in 0..5 {
            if let Some(report) = self.repair_once(poll, &slow).await? {
                return Ok(report);
            }
        }
        Err(StoreError::unavailable(format!(
            "the counters of poll {poll} kept moving during the repair; try again"
        )))
    }

    /// One attempt: `None` when a counter moved meanwhile.
    async fn repair_once(&self, poll: &str, slow: &RetryPolicy) -> StoreResult<Option<Repair>> {
        // Per writer and batch, in one pass: the counts of the poll's ballots.
        let filter = doc! { "poll_id": poll };
        let mut batches: HashMap<i64, BTreeMap<u64, Tally>> = HashMap::new();
        let mut ballots = 0;
        for (key, n) in count_groups(&self.ballots, slow, &filter, &[("w", "w"), ("s", "s")]).await? {
            // Ballots, not their revisions (which carry `d`).
            if !key.contains_key("d") {
                ballots += n;
            }
            let Ok(w) = writer_of(&key, "w") else { continue }; // without a writer: always in the tail
            let s = key.get("s").and_then(uint_of).unwrap_or(0);
            count_group(batches.entry(w).or_default().entry(s).or_default(), &key, n)?;
        }
        let filter = doc! { "poll_id": poll };
        let counters: Vec<Document> = slow
            .run(|| async { self.counters.find(filter.clone()).await?.try_collect().await })
            .await?;
        let mut report = Repair {
            poll_id: poll.to_owned(),
            ballots,
            counters: counters.len() as u64,
            corrected: 0,
        };
        let mut seen = HashSet::new();
        for c in &counters {
            let w = writer_of(c, "w")?;
            seen.insert(w);
            let (seq, counts) = counts_of(c)?;
            let mut expected = Tally::default();
            if let Some(b) = batches.get(&w) {
                for t in b.range(..=seq).map(|(_, t)| t) {
                    expected.merge(t);
                }
            }
            let expected = expected.trimmed();
            if expected == counts.clone().trimmed() {
                continue;
            }
            let filter = doc! { "_id": counter_id(poll, w), "seq": to_i64(seq) };
            let mut set = counts_doc(&expected);
            set.insert("at", now());
            let update = doc! { "$set": set };
            let r = slow
                .run(|| self.counters.update_one(filter.clone(), update.clone()))
                .await?;
            if r.matched_count == 0 {
                return Ok(None);
            }
            tracing::warn!(
                poll,
                writer = w,
                was = counts.total,
                now = expected.total,
                "tally counter repaired"
            );
            report.corrected += 1;
        }
        let alive_since = mongodb::bson::DateTime::from_millis(now().timestamp_millis() - LEASE.as_millis() as i64);
        for (w, b) in &batches {
            if seen.contains(w) {
                continue;
            }
            let live = doc! { "_id": *w, "at": { "$gte": alive_since } };
            let alive = slow.run(|| self.writers.find_one(live.clone())).await?.is_some();
            let created = if alive {
                // Its ballots stay in the tail; the writer folds them in when it next writes.
                self.create(poll, *w, 0, &Tally::default()).await?
            } else {
                let mut all = Tally::default();
                for t in b.values() {
                    all.merge(t);
                }
                let last = b.keys().next_back().copied().unwrap_or(0);
                self.create(poll, *w, last, &all).await?
            };
            if !created {
                return Ok(None);
            }
            tracing::warn!(poll, writer = w, "tally counter recreated from the ballots");
            report.corrected += 1;
            report.counters += 1;
        }
        Ok(Some(report))
    }

    /// The polls whose counters changed since `since`, or whose writers were alive since then
    /// (a failover may have rolled back their latest updates); all polls with ballots when `None`.
    pub async fn touched_since(&self, since: Option<chrono::DateTime<chrono::Utc>>) -> StoreResult<Vec<String>> {
        let slow = RetryPolicy {
            deadline: REPAIR_DEADLINE,
            ..self.retry.clone()
        };
        let Some(since) = since else {
            let pipeline = vec![doc! { "$group": { "_id": "$poll_id" } }];
            let groups = collect(&self.ballots, &slow, pipeline).await?;
            return Ok(groups
                .iter()
                .filter_map(|g| g.get_str("_id").ok().map(str::to_owned))
                .collect());
        };
        let t = mongodb::bson::DateTime::from_millis(since.timestamp_millis());
        let live = doc! { "at": { "$gte": t } };
        let writers: Vec<i64> = slow
            .run(|| async {
                self.writers
                    .find(live.clone())
                    .await?
                    .try_collect::<Vec<Document>>()
                    .await
            })
            .await?
            .iter()
            .filter_map(|d| writer_of(d, "_id").ok())
            .collect();
        let filter = doc! { "$or": [ { "at": { "$gte": t } }, { "w": { "$in": writers } } ] };
        let mut polls: Vec<String> = slow
            .run(|| async {
                self.counters
                    .find(filter.clone())
                    .projection(doc! { "poll_id": 1 })
                    .await?
                    .map(|d| d.map(|d| d.get_str("poll_id").map(str::to_owned).unwrap_or_default()))
                    .try_collect()
                    .await
            })
            .await?;
        polls.sort();
        polls.dedup();
        polls.retain(|p| !p.is_empty());
        Ok(polls)
    }

    /// Deletes the counters of `poll` (its ballots are being deleted).
    pub async fn purge(&self, poll: &str) -> StoreResult<()> {
        let filter = doc! { "poll_id": poll };
        self.retry.run(|| self.counters.delete_many(filter.clone())).await?;
        Ok(())
    }
}

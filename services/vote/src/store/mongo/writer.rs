//! The ballot store's group-commit writer (one unordered `insertMany` per batch of concurrent
//! ballots, several batches in flight), the applier that moves this writer's counters, and the
//! lease keeper.

use mongodb::error::ErrorKind;
use shared::mongo::{DUPLICATE_KEY, DUPLICATE_KEY_LEGACY, Decision, Failure, THROTTLED, to_i64};

use super::tallies::Change;
use super::*;

/// A document to insert: a new ballot (it adds its marks) or a revision of one (see the `mongo`
/// module docs: it takes away the marks it replaces, and adds its own unless it withdraws).
pub(super) struct InsertJob {
    pub(super) doc: Document,
    pub(super) poll_id: String,
    pub(super) add: Option<Marked>,
    pub(super) sub: Option<Marked>,
    pub(super) reply: oneshot::Sender<StoreResult<bool>>,
    /// The caller's span: its batch's span is a child of (or linked to) it.
    pub(super) span: tracing::Span,
}

/// What the writer's batches, the applier, the lease keeper and the tally reads share.
#[derive(Clone)]
pub(super) struct Writer {
    pub(super) counters: Counters,
    pub(super) tallies: Arc<Mutex<Tallies>>,
    pub(super) lease: Arc<Lease>,
    /// Woken when a batch finishes.
    pub(super) applier: Arc<tokio::sync::Notify>,
}

impl Writer {
    /// The kept tallies of `poll_ids` (`None` where nothing usable is kept) and the ids without
    /// one. Stale ones are served as they are (exact for this process's own ballots) while one
    /// background refresh renews them.
    pub(super) fn read_kept(&self, poll_ids: &[String]) -> (Vec<Option<Tally>>, Vec<String>) {
        let now = Instant::now();
        let mut out = Vec::with_capacity(poll_ids.len());
        let (mut missing, mut stale) = (Vec::new(), Vec::new());
        {
            let mut t = lock(&self.tallies);
            for id in poll_ids {
                out.push(match t.read(id, now) {
                    Read::Fresh(tally) | Read::Refreshing(tally) => Some(tally),
                    Read::Stale(tally) => {
                        stale.push(id.clone());
                        Some(tally)
                    }
                    Read::Missing => {
                        missing.push(id.clone());
                        None
                    }
                });
            }
        }
        if !stale.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.refresh(&stale).await {
                    tracing::warn!(error = %shared::error::Chain(&e), "tally refresh failed");
                }
            });
        }
        (out, missing)
    }

    /// Reads the counters and uncounted ballots of `polls` and keeps the result; the tallies to
    /// serve, in order.
    pub(super) async fn refresh(&self, polls: &[String]) -> StoreResult<Vec<Tally>> {
        let plans = lock(&self.tallies).plan(polls, Instant::now());
        let start = Instant::now();
        match self.counters.refresh(&plans).await {
            Ok(mut read) => {
                shared::metrics::storage()
                    .tally_refresh
                    .observe(start.elapsed().as_secs_f64());
                let now = Instant::now();
                let mut t = lock(&self.tallies);
                let served = plans
                    .iter()
                    .map(|p| t.fill(p, read.remove(&p.poll).unwrap_or_default(), now))
                    .collect();
                if t.has_suspects() {
                    self.applier.notify_one();
                }
                Ok(served)
            }
            Err(e) => {
                lock(&self.tallies).abandon(polls);
                Err(e)
            }
        }
    }

    /// Drops the kept tally of `poll` (its counters were repaired): the next read refreshes.
    pub(super) fn forget_kept(&self, poll: &str) {
        lock(&self.tallies).forget_kept(poll);
    }
}

/// The group-commit writer. It takes the first waiting ballot, waits for one of `in_flight`
/// slots, then takes every other ballot already waiting (up to [`MAX_BATCH`]) and stores them
/// all with one unordered `insertMany` under the store's write concern (`{w: "majority",
/// j: true}`): one round trip and one journal commit for the whole batch. While a batch is in
/// flight, the next one gathers, so under load batches grow by themselves and at rest a lone
/// ballot goes out at once. Each caller is answered only when its batch is acknowledged, so
/// `Accepted` still means durable.
///
/// Unordered means every document is tried: a duplicate `_id` (11000) fails that document alone,
/// and its caller gets `false` (then reads the stored ballot, as for a single insert). Nothing
/// else changes about exactly-once: the uniqueness is still the `_id` index's, and retrying a
/// batch after a lost reply is safe because the documents already stored come back as 11000,
/// which `cast` recognises by the ballot id as its own.
///
/// Before a batch goes out, this writer's counter of every poll in it exists (registered once per
/// poll), and its lease is held. Each batch gets a sequence number, written into its documents
/// with the writer id (`s`, `w`); its stored ballots are added to this process's own counts
/// before any caller is answered (so a replica reads its own writes at once), and the applier is
/// woken to fold them into the counters.
pub(super) async fn writer(w: Writer, mut queue: mpsc::Receiver<InsertJob>, in_flight: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let w = w.clone();
        shared::metrics::storage().batch_size.observe(batch.len() as f64);
        let span = shared::metrics::batch_span(
            "mongodb",
            "insertMany",
            BALLOTS_COLLECTION,
            &batch.iter().map(|j| &j.span).collect::<Vec<_>>(),
        );
        let work = async move {
            if let Err(e) = w.prepare(&batch).await {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
                drop(slot);
                return;
            }
            let seq = lock(&w.tallies).begin_batch();
            let docs: Vec<Document> = batch
                .iter_mut()
                .map(|j| {
                    let mut d = std::mem::take(&mut j.doc);
                    d.insert("w", w.counters.me);
                    d.insert("s", to_i64(seq));
                    d
                })
                .collect();
            let (outcomes, clear) = insert_batch(&w.counters.ballots, &w.counters.retry, docs).await;
            {
                let stored: Vec<(&str, Change<'_>)> = batch
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, o)| matches!(o, Ok(true)))
                    .map(|(j, _)| {
                        let change = Change {
                            add: j.add.as_ref().map(Marked::marks),
                            sub: j.sub.as_ref().map(Marked::marks),
                        };
                        (j.poll_id.as_str(), change)
                    })
                    .collect();
                let polls = batch.iter().map(|j| j.poll_id.as_str());
                lock(&w.tallies).finish_batch(seq, clear.then_some(stored.as_slice()), polls, Instant::now());
            }
            w.applier.notify_one();
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
            drop(slot);
        };
        tokio::spawn(tracing::Instrument::instrument(work, span));
    }
}

impl Writer {
    /// Checks the lease and registers this writer's counters of the batch's new polls.
    pub(super) async fn prepare(&self, batch: &[InsertJob]) -> StoreResult<()> {
        if !self.lease.held() {
            return Err(StoreError::unavailable(
                "this vote process could not renew its writer lease (the database is unreachable)",
            ));
        }
        let mut new: Vec<&str> = {
            let t = lock(&self.tallies);
            batch
                .iter()
                .map(|j| j.poll_id.as_str())
                .filter(|p| !t.is_registered(p))
                .collect()
        };
        new.sort_unstable();
        new.dedup();
        if new.is_empty() {
            return Ok(());
        }
        let found = futures_util::future::join_all(new.iter().map(|p| self.counters.register(p))).await;
        let mut t = lock(&self.tallies);
        let mut failed = None;
        for (poll, r) in new.iter().zip(found) {
            match r {
                Ok((seq, counted)) => t.registered(poll, seq, counted),
                Err(e) => failed = Some(e),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Folds finished batches into this writer's counters, one conditional update per poll (see the
/// `tallies` and `counters` modules); resolves unclear batches once settled, and resynchronises
/// counters found elsewhere than where this process left them. Runs until the store is dropped
/// (then makes one last round).
pub(super) async fn applier(w: Writer, stop: tokio_util::sync::CancellationToken) {
    let mut backoff = Duration::ZERO;
    loop {
        let wait = if backoff.is_zero() {
            lock(&w.tallies)
                .next_settle()
                .map_or(Duration::from_secs(60), |t| t.saturating_duration_since(Instant::now()))
        } else {
            backoff
        };
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = w.applier.notified() => false,
            () = tokio::time::sleep(wait) => false,
        };
        match apply_round(&w).await {
            Ok(()) => backoff = Duration::ZERO,
            Err(e) => {
                tracing::warn!(error = %shared::error::Chain(&e), "tally counter update failed; retrying");
                backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
            }
        }
        if stopping {
            return;
        }
        // Rounds at most this often: under load one update per poll folds many batches.
        tokio::time::sleep(APPLY_EVERY).await;
    }
}

pub(super) async fn apply_round(w: &Writer) -> StoreResult<()> {
    use futures_util::StreamExt;
    let settled = lock(&w.tallies).settled(Instant::now());
    for (seq, polls) in settled {
        let counts = w.counters.count_batch(seq, &polls).await?;
        lock(&w.tallies).resolved(seq, counts);
    }
    let (updates, suspects) = {
        let mut t = lock(&w.tallies);
        (t.updates_due(), t.take_suspects())
    };
    let me = w.counters.me;
    let moves = updates
        .into_iter()
        .map(|u| (u.poll, Some((u.from, u.delta)), u.to))
        .chain(suspects.into_iter().map(|(poll, to)| (poll, None, to)));
    let results: Vec<(String, StoreResult<(u64, Tally)>)> = futures_util::stream::iter(moves)
        .map(|(poll, update, to)| async move {
            let r = async {
                if let Some((from, delta)) = &update
                    && let Some(done) = w.counters.advance(&poll, me, (*from, to), delta, true).await?
                {
                    return Ok(done);
                }
                resync(&w.counters, &poll, to).await
            }
            .await;
            (poll, r)
        })
        .buffer_unordered(UPDATES_AT_ONCE)
        .collect()
        .await;
    let mut t = lock(&w.tallies);
    let mut failed = None;
    for (poll, r) in results {
        match r {
            Ok((seq, counted)) => t.updated(&poll, seq, counted),
            Err(e) => {
                t.update_failed(&poll);
                failed = Some(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Our counter of `poll` is not where this process left it (a failover rolled it back, or a
/// repair recreated it): brings it to `to` from the stored ballots themselves (every batch up to
/// `to` is finished and clear, so the count is exact).
pub(super) async fn resync(c: &Counters, poll: &str, to: u64) -> StoreResult<(u64, Tally)> {
    for _ in 0..3 {
        match c.read(poll, c.me).await? {
            Some((seq, counts)) if seq >= to => return Ok((seq, counts)),
            Some((seq, _)) => {
                let (caught, _) = c.count_range(poll, c.me, seq, Some(to)).await?;
                if let Some(done) = c.advance(poll, c.me, (seq, to), &caught, false).await? {
                    tracing::warn!(
                        poll,
                        from = seq,
                        to,
                        "tally counter was behind; caught up from the ballots"
                    );
                    return Ok(done);
                }
            }
            None => {
                let (all, _) = c.count_range(poll, c.me, 0, Some(to)).await?;
                if c.create(poll, c.me, to, &all).await? {
                    tracing::warn!(poll, to, "tally counter was missing; recreated from the ballots");
                    return Ok((to, all));
                }
            }
        }
    }
    Err(StoreError::unavailable(format!(
        "the tally counter of poll {poll} kept moving"
    )))
}

/// Renews this writer's lease every few seconds, and now and then adopts the uncounted ballots
/// of dead writers. Runs until the store is dropped.
pub(super) async fn lease_keeper(w: Writer, stop: tokio_util::sync::CancellationToken) {
    let jitter = || Duration::from_millis(rand::random::<u64>() % 10_000);
    let mut next_adoption = Instant::now() + jitter();
    loop {
        let wait = match w.counters.heartbeat().await {
            Ok(()) => {
                w.lease.renew();
                counters::HEARTBEAT
            }
            Err(e) => {
                tracing::debug!(error = %e, "writer lease not renewed");
                counters::HEARTBEAT_RETRY
            }
        };
        if Instant::now() >= next_adoption {
            if let Err(e) = w.counters.adopt_dead().await {
                tracing::debug!(error = %e, "adopting dead writers failed");
            }
            next_adoption = Instant::now() + counters::ADOPT_EVERY + jitter();
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the server said about one document of an `insertMany`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DocOutcome {
    Stored,
    /// Its `_id` exists.
    Duplicate,
    /// Throttled (16500): worth sending again.
    Throttled,
    /// Refused for another reason (the server's code).
    Refused(i32),
}

/// The per-document outcome of an unordered `insertMany` of `n` documents, from its error (a
/// batch with write errors); `None` when the command as a whole failed (network, write concern,
/// throttling of the whole command, ...), which the retry policy handles.
pub(super) fn doc_outcomes(n: usize, result: &Result<(), MongoError>) -> Option<Vec<DocOutcome>> {
    let e = match result {
        Ok(()) => return Some(vec![DocOutcome::Stored; n]),
        Err(e) => e,
    };
    let ErrorKind::InsertMany(m) = e.kind.as_ref() else {
        return None;
    };
    if m.write_concern_error.is_some() {
        return None;
    }
    let mut out = vec![DocOutcome::Stored; n];
    for w in m.write_errors.as_deref()? {
        let slot = out.get_mut(w.index)?;
        *slot = match w.code {
            DUPLICATE_KEY | DUPLICATE_KEY_LEGACY => DocOutcome::Duplicate,
            THROTTLED => DocOutcome::Throttled,
            code => DocOutcome::Refused(code),
        };
    }
    Some(out)
}

/// Stores `docs` with unordered `insertMany`s: whole-command failures go through the retry
/// policy (deadline, backoff, 16500); documents throttled one by one are sent again with the same
/// backoff, within the same deadline. One answer per document, in order: `true` stored, `false`
/// duplicate `_id`; and whether every document's outcome is known (no command failed or timed
/// out as a whole, which may have stored documents nobody was told about).
pub(super) async fn insert_batch(
    ballots: &Collection<Document>,
    retry: &RetryPolicy,
    docs: Vec<Document>,
) -> (Vec<StoreResult<bool>>, bool) {
    // Attempts sent, and attempts whose every document's outcome came back.
    let (sent_attempts, known_attempts) = (AtomicU32::new(0), AtomicU32::new(0));
    let start = Instant::now();
    let mut answers: Vec<Option<StoreResult<bool>>> = docs.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..docs.len()).collect();
    let mut retries = 0;
    while !pending.is_empty() {
        let chunk: Vec<&Document> = pending.iter().map(|&i| &docs[i]).collect();
        let sent = retry
            .run(|| async {
                // Counted before sending: an attempt cut short by the deadline is unclear too.
                sent_attempts.fetch_add(1, Ordering::Relaxed);
                let result = ballots
                    .insert_many(chunk.iter().copied())
                    .ordered(false)
                    .await
                    .map(|_| ());
                match doc_outcomes(chunk.len(), &result) {
                    Some(outcomes) => {
                        known_attempts.fetch_add(1, Ordering::Relaxed);
                        Ok(outcomes)
                    }
                    None => Err(result.expect_err("a whole-command failure is an error")),
                }
            })
            .await;
        let outcomes = match sent {
            Ok(o) => o,
            Err(e) => {
                for &i in &pending {
                    answers[i] = Some(Err(e.clone()));
                }
                break;
            }
        };
        let mut again = Vec::new();
        for (&i, outcome) in pending.iter().zip(outcomes) {
            answers[i] = match outcome {
                DocOutcome::Stored => Some(Ok(true)),
                DocOutcome::Duplicate => Some(Ok(false)),
                DocOutcome::Throttled => {
                    again.push(i);
                    None
                }
                DocOutcome::Refused(code) => Some(Err(StoreError::internal(format!(
                    "the database refused a ballot (error {code})"
                )))),
            };
        }
        if again.is_empty() {
            break;
        }
        let failure = Failure::Throttled {
            retry_after: None,
            message: format!("{} of {} ballots throttled", again.len(), pending.len()),
        };
        match retry.decide(failure, retries, start.elapsed()) {
            Decision::Retry(delay) => {
                tokio::time::sleep(delay).await;
                retries += 1;
                pending = again;
            }
            Decision::GiveUp(e) => {
                for &i in &again {
                    answers[i] = Some(Err(e.clone()));
                }
                break;
            }
        }
    }
    let answers = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(StoreError::internal("ballot left unanswered"))))
        .collect();
    let clear = sent_attempts.load(Ordering::Relaxed) == known_attempts.load(Ordering::Relaxed);
    (answers, clear)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_errors_are_read_document_by_document() {
        assert_eq!(doc_outcomes(2, &Ok(())), Some(vec![DocOutcome::Stored; 2]));
        let partial: mongodb::error::InsertManyError = mongodb::bson::deserialize_from_document(doc! {
            "writeErrors": [
                { "index": 1, "code": 11000, "errmsg": "E11000 duplicate key" },
                { "index": 2, "code": 16500, "errmsg": "Error=16500, RetryAfterMs=5" },
                { "index": 3, "code": 121, "errmsg": "Document failed validation" },
            ],
        })
        .expect("insert many error");
        let err = MongoError::from(ErrorKind::InsertMany(partial));
        assert_eq!(
            doc_outcomes(5, &Err(err)),
            Some(vec![
                DocOutcome::Stored,
                DocOutcome::Duplicate,
                DocOutcome::Throttled,
                DocOutcome::Refused(121),
                DocOutcome::Stored,
            ])
        );
        // A write-concern failure leaves durability unknown: the whole batch is retried.
        let unsure: mongodb::error::InsertManyError = mongodb::bson::deserialize_from_document(doc! {
            "writeConcernError": { "code": 64, "errmsg": "waiting for replication timed out" },
        })
        .expect("insert many error");
        assert_eq!(
            doc_outcomes(1, &Err(MongoError::from(ErrorKind::InsertMany(unsure)))),
            None
        );
        // So is a command that failed as a whole, and an index the batch does not have.
        let unreachable = MongoError::from(ErrorKind::Io(std::sync::Arc::new(
            std::io::ErrorKind::ConnectionReset.into(),
        )));
        assert_eq!(doc_outcomes(1, &Err(unreachable)), None);
        let odd: mongodb::error::InsertManyError = mongodb::bson::deserialize_from_document(doc! {
            "writeErrors": [{ "index": 9, "code": 11000, "errmsg": "dup" }],
        })
        .expect("insert many error");
        assert_eq!(
            doc_outcomes(1, &Err(MongoError::from(ErrorKind::InsertMany(odd)))),
            None
        );
    }
}

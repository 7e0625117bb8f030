//! This process's side of the tally counters (see the `counters` module for the documents), and
//! the tallies it keeps between refreshes. Pure bookkeeping: no I/O here.
//!
//! Every batch this writer sends gets a sequence number `s` (written into its documents with the
//! writer id `w`). Per poll, the process remembers its counter document as it last wrote it
//! (`counter_seq`, `counted`), and its own acknowledged ballots in later batches (`pending`), batch
//! by batch. A batch is *collected* once it and every batch before it are finished and clear;
//! the applier then folds a poll's pending batches up to the collected sequence into its counter
//! document with one conditional update (from `counter_seq` to the collected sequence).
//!
//! A batch whose outcome is not known document by document (the command failed or timed out as a
//! whole) is *unclear*: some of its documents may be stored, unknown which. It holds collection
//! back until it has settled (no retry of it can still land), then its stored documents are
//! counted in the database and it becomes an ordinary pending batch. Until then, refreshes count
//! its documents in the database, batch by batch.
//!
//! A tally served = the other writers' part (their counters plus their uncounted tails, as of the
//! last refresh) + this process's own part, from memory (`counted` + every pending batch), so a
//! replica reads its own writes at once + its unclear batches as the last refresh counted them.
//! When the database's copy of our counter is at the sequence we wrote, its counts are used
//! instead of ours (a repair may have corrected them); when it is somewhere else, the poll is
//! *suspect* and the applier resynchronises it from the ballots.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use shared::contract::{Marks, Tally};

/// Polls whose own state is remembered; past this, idle fully counted ones are forgotten (they
/// are registered again, reading their counter back, when this process next writes to them).
const CAPACITY: usize = 100_000;
/// A kept tally older than the TTL but younger than this many TTLs is served while it is
/// refreshed in the background; older, a read refreshes at once (unless a refresh is under way).
const SERVE_STALE_TTLS: u32 = 5;
/// A kept tally not read for this many TTLs is forgotten.
const FORGET_AFTER_TTLS: u32 = 10;

#[derive(Debug)]
pub(super) struct Tallies {
    ttl: Duration,
    /// How long after an unclear batch's failure none of its documents can still land.
    settle: Duration,
    next_seq: u64,
    in_flight: BTreeSet<u64>,
    unclear: BTreeMap<u64, Unclear>,
    own: HashMap<String, Own>,
    /// Polls with pending batches not yet in their counter.
    dirty: BTreeSet<String>,
    /// Polls whose counter document differs from what this process wrote.
    suspect: BTreeSet<String>,
    kept: HashMap<String, Kept>,
}

#[derive(Debug)]
struct Unclear {
    settle_at: Instant,
    polls: Vec<String>,
}

#[derive(Debug, Default)]
struct Own {
    counter_seq: u64,
    counted: Tally,
    pending: BTreeMap<u64, Tally>,
    unclear: BTreeSet<u64>,
    /// A counter update is under way; its answer sets `counter_seq`.
    updating: bool,
}

impl Own {
    fn pending_sum(&self) -> Tally {
        let mut t = Tally::default();
        for p in self.pending.values() {
            t.merge(p);
        }
        t
    }

    fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.unclear.is_empty() && !self.updating
    }
}

/// What one stored document changes in its poll's tally: a new ballot adds its marks; a revision
/// takes away the marks it replaced and adds its new ones (a withdrawal adds none; a ballot cast
/// again after its withdrawal takes none away).
#[derive(Debug, Clone, Copy)]
pub(super) struct Change<'a> {
    pub add: Option<Marks<'a>>,
    pub sub: Option<Marks<'a>>,
}

impl Change<'_> {
    pub(super) fn apply(&self, t: &mut Tally) {
        if let Some(m) = self.sub {
            t.remove_n(m, 1);
        }
        if let Some(m) = self.add {
            t.add(m);
        }
    }
}

/// What one refresh read from the database for one poll.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Refreshed {
    /// Other writers' counters plus their uncounted ballots (and ballots without a writer).
    pub others: Tally,
    /// Our counter document, `(seq, counts)`, when our part comes from memory.
    pub own_doc: Option<(u64, Tally)>,
    /// Our unclear batches' stored ballots, by batch.
    pub unclear: BTreeMap<u64, Tally>,
}

#[derive(Debug)]
struct Kept {
    db: Refreshed,
    /// Whether our part came from memory (else the refresh counted it like another writer's).
    own_known: bool,
    at: Instant,
    refreshing: bool,
}

/// What a read finds.
#[derive(Debug, PartialEq)]
pub(super) enum Read {
    /// A kept tally younger than the TTL, with our own ballots up to now.
    Fresh(Tally),
    /// The same, but older than the TTL: serve it and start a refresh (this read was told to).
    Stale(Tally),
    /// Older than the TTL, and a refresh is already under way: serve it.
    Refreshing(Tally),
    /// Nothing kept, or too old: refresh now.
    Missing,
}

/// What a refresh of one poll must ask the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    pub poll: String,
    /// Whether our part comes from memory (else our counter and tail are read like the others').
    pub own_known: bool,
    /// Our unclear batches with documents of this poll.
    pub unclear: Vec<u64>,
}

/// A counter update the applier must make: from `from` to `to`, adding `delta`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Update {
    pub poll: String,
    pub from: u64,
    pub to: u64,
    pub delta: Tally,
}

impl Tallies {
    /// A zero `ttl` keeps no tally: every read refreshes.
    pub(super) fn new(ttl: Duration, settle: Duration) -> Self {
        Self {
            ttl,
            settle,
            next_seq: 1,
            in_flight: BTreeSet::new(),
            unclear: BTreeMap::new(),
            own: HashMap::new(),
            dirty: BTreeSet::new(),
            suspect: BTreeSet::new(),
            kept: HashMap::new(),
        }
    }

    pub(super) fn keeps(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// Whether this process has a counter document for `poll` (and may write ballots of it).
    pub(super) fn is_registered(&self, poll: &str) -> bool {
        self.own.contains_key(poll)
    }

    /// Our counter document for `poll` exists with `(seq, counted)`.
    pub(super) fn registered(&mut self, poll: &str, seq: u64, counted: Tally) {
        if self.own.contains_key(poll) {
            return;
        }
        if self.own.len() >= CAPACITY {
            self.forget_idle();
        }
        self.own.insert(
            poll.to_owned(),
            Own {
                counter_seq: seq,
                counted,
                ..Own::default()
            },
        );
        // A kept tally counted our (then unknown) counter like another writer's.
        self.kept.remove(poll);
    }

    fn forget_idle(&mut self) {
        let idle: Vec<String> = self
            .own
            .iter()
            .filter(|(p, o)| o.is_idle() && !self.dirty.contains(*p))
            .map(|(p, _)| p.clone())
            .collect();
        for p in idle {
            self.own.remove(&p);
            self.kept.remove(&p);
        }
    }

    /// A new batch is about to be sent; returns its sequence number (the documents' `s`).
    pub(super) fn begin_batch(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.insert(seq);
        seq
    }

    /// Every batch up to this one is finished and clear: the counters may cover it.
    pub(super) fn collected(&self) -> u64 {
        let first_open = self.in_flight.first().copied().unwrap_or(self.next_seq);
        let first_unclear = self.unclear.keys().next().copied().unwrap_or(self.next_seq);
        first_open.min(first_unclear) - 1
    }

    /// The batch `seq` is over. `stored` holds the poll and tally change of each document known
    /// to be stored (or revised) by it, when every document's outcome is known (`None`: unclear, see the module docs;
    /// `polls` are then the polls of all its documents).
    pub(super) fn finish_batch<'a>(
        &mut self,
        seq: u64,
        stored: Option<&[(&'a str, Change<'a>)]>,
        polls: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) {
        self.in_flight.remove(&seq);
        match stored {
            Some(stored) => {
                for &(poll, change) in stored {
                    // A poll purged meanwhile has no counter any more: its ballots are not counted.
                    if let Some(own) = self.own.get_mut(poll) {
                        change.apply(own.pending.entry(seq).or_default());
                        self.dirty.insert(poll.to_owned());
                    }
                }
            }
            None => {
                let mut touched: Vec<String> = Vec::new();
                for poll in polls {
                    if let Some(own) = self.own.get_mut(poll)
                        && own.unclear.insert(seq)
                    {
                        touched.push(poll.to_owned());
                        self.kept.remove(poll);
                    }
                }
                self.unclear.insert(
                    seq,
                    Unclear {
                        settle_at: now + self.settle,
                        polls: touched,
                    },
                );
            }
        }
    }

    /// Unclear batches that have settled: `(seq, polls)` to count in the database.
    pub(super) fn settled(&self, now: Instant) -> Vec<(u64, Vec<String>)> {
        self.unclear
            .iter()
            .filter(|(_, u)| u.settle_at <= now)
            .map(|(&s, u)| (s, u.polls.clone()))
            .collect()
    }

    /// When the next unclear batch settles.
    pub(super) fn next_settle(&self) -> Option<Instant> {
        self.unclear.values().map(|u| u.settle_at).min()
    }

    /// The settled unclear batch `seq` stored `counts` (by poll): it is pending like any other.
    pub(super) fn resolved(&mut self, seq: u64, mut counts: HashMap<String, Tally>) {
        let Some(u) = self.unclear.remove(&seq) else {
            return;
        };
        for poll in u.polls {
            if let Some(own) = self.own.get_mut(&poll) {
                own.unclear.remove(&seq);
                if let Some(t) = counts.remove(&poll).filter(|t| !t.is_zero()) {
                    own.pending.insert(seq, t);
                    self.dirty.insert(poll.clone());
                }
            }
        }
    }

    /// The counter updates to make now (each poll at most once at a time).
    pub(super) fn updates_due(&mut self) -> Vec<Update> {
        let to = self.collected();
        let mut out = Vec::new();
        for poll in &self.dirty {
            let Some(own) = self.own.get_mut(poll) else { continue };
            if own.updating || own.counter_seq >= to {
                continue;
            }
            let mut delta = Tally::default();
            let mut any = false;
            for t in own.pending.range(..=to).map(|(_, t)| t) {
                delta.merge(t);
                any = true;
            }
            if !any {
                continue;
            }
            own.updating = true;
            out.push(Update {
                poll: poll.clone(),
                from: own.counter_seq,
                to,
                delta,
            });
        }
        out
    }

    pub(super) fn has_suspects(&self) -> bool {
        !self.suspect.is_empty()
    }

    /// Polls to resynchronise from the database, with the sequence their counter should reach
    /// (marked as updating).
    pub(super) fn take_suspects(&mut self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for poll in std::mem::take(&mut self.suspect) {
            if let Some(own) = self.own.get_mut(&poll)
                && !own.updating
            {
                own.updating = true;
                out.push((poll, own.counter_seq));
            }
        }
        out
    }

    /// Our counter of `poll` is now `(seq, counted)` in the database (an update succeeded, or a
    /// resync read it): batches up to `seq` are in it.
    pub(super) fn updated(&mut self, poll: &str, seq: u64, counted: Tally) {
        let Some(own) = self.own.get_mut(poll) else { return };
        own.updating = false;
        own.counter_seq = seq;
        own.counted = counted;
        own.pending = own.pending.split_off(&(seq + 1));
        if own.pending.is_empty() {
            self.dirty.remove(poll);
        }
    }

    /// A counter update or resync of `poll` failed; it is tried again later.
    pub(super) fn update_failed(&mut self, poll: &str) {
        if let Some(own) = self.own.get_mut(poll) {
            own.updating = false;
        }
    }

    /// Ballots of `poll` were deleted, with its counters.
    pub(super) fn purged(&mut self, poll: &str) {
        self.own.remove(poll);
        self.kept.remove(poll);
        self.dirty.remove(poll);
        self.suspect.remove(poll);
    }

    fn serve(&self, poll: &str, kept: &Kept) -> Option<Tally> {
        let own = self.own.get(poll);
        if kept.own_known != own.is_some() {
            return None;
        }
        let mut t = kept.db.others.clone();
        if let Some(own) = own {
            match &kept.db.own_doc {
                Some((seq, counts)) if *seq == own.counter_seq && !own.updating => t.merge(counts),
                _ => t.merge(&own.counted),
            }
            t.merge(&own.pending_sum());
            for (seq, counts) in &kept.db.unclear {
                if own.unclear.contains(seq) {
                    t.merge(counts);
                }
            }
        }
        Some(t)
    }

    pub(super) fn read(&mut self, poll: &str, now: Instant) -> Read {
        let Some(kept) = self.kept.get(poll) else {
            return Read::Missing;
        };
        let Some(tally) = self.serve(poll, kept) else {
            return Read::Missing;
        };
        let age = now.duration_since(kept.at);
        if age < self.ttl {
            Read::Fresh(tally)
        } else if kept.refreshing {
            Read::Refreshing(tally)
        } else if age < self.ttl.saturating_mul(SERVE_STALE_TTLS) {
            if let Some(k) = self.kept.get_mut(poll) {
                k.refreshing = true;
            }
            Read::Stale(tally)
        } else {
            Read::Missing
        }
    }

    /// What to ask the database to refresh `polls`.
    pub(super) fn plan(&mut self, polls: &[String], now: Instant) -> Vec<Plan> {
        if let Some(forget) = now.checked_sub(self.ttl.saturating_mul(FORGET_AFTER_TTLS))
            && self.kept.len() > 1024
        {
            self.kept.retain(|_, k| k.refreshing || k.at >= forget);
        }
        polls
            .iter()
            .map(|poll| {
                if let Some(k) = self.kept.get_mut(poll) {
                    k.refreshing = true;
                }
                let own = self.own.get(poll);
                Plan {
                    poll: poll.clone(),
                    own_known: own.is_some(),
                    unclear: own.map(|o| o.unclear.iter().copied().collect()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The refresh planned as `plan` read `db`: keeps it and returns the tally to serve.
    pub(super) fn fill(&mut self, plan: &Plan, db: Refreshed, now: Instant) -> Tally {
        if let (Some(own), Some((seq, _))) = (self.own.get(&plan.poll), &db.own_doc)
            && *seq != own.counter_seq
            && !own.updating
        {
            self.suspect.insert(plan.poll.clone());
        }
        let kept = Kept {
            db,
            own_known: plan.own_known,
            at: now,
            refreshing: false,
        };
        let tally = self.serve(&plan.poll, &kept).unwrap_or_else(|| {
            // Registered meanwhile: what the database said, our newest batches aside.
            let mut t = kept.db.others.clone();
            if let Some((_, c)) = &kept.db.own_doc {
                t.merge(c);
            }
            t
        });
        if self.keeps() && kept.own_known == self.own.contains_key(&plan.poll) {
            self.kept.insert(plan.poll.clone(), kept);
        } else {
            self.kept.remove(&plan.poll);
        }
        tally
    }

    /// Drops the kept tally of `poll`.
    pub(super) fn forget_kept(&mut self, poll: &str) {
        self.kept.remove(poll);
    }

    /// The refresh of `polls` failed.
    pub(super) fn abandon(&mut self, polls: &[String]) {
        for p in polls {
            if let Some(k) = self.kept.get_mut(p) {
                k.refreshing = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn added(choices: &[u32]) -> Change<'_> {
        Change {
            add: Some(Marks::choices(choices)),
            sub: None,
        }
    }

    fn t(by_option: &[u64]) -> Tally {
        Tally {
            total: by_option.iter().sum(),
            by_option: by_option.to_vec(),
            ..Tally::default()
        }
    }

    const TTL: Duration = Duration::from_secs(1);
    const SETTLE: Duration = Duration::from_secs(10);

    fn refreshed(others: &[u64], own_doc: Option<(u64, &[u64])>) -> Refreshed {
        Refreshed {
            others: t(others),
            own_doc: own_doc.map(|(s, c)| (s, t(c))),
            unclear: BTreeMap::new(),
        }
    }

    #[test]
    fn own_ballots_are_served_at_once_and_folded_into_the_counter_in_order() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL, SETTLE);
        s.registered("p", 0, t(&[]));
        let plan = s.plan(&["p".into()], now).remove(0);
        assert_eq!(s.fill(&plan, refreshed(&[5], Some((0, &[]))), now), t(&[5]));
        let b1 = s.begin_batch();
        let b2 = s.begin_batch();
        // Batch 2 ends first: served at once, but not collected while batch 1 is in flight.
        s.finish_batch(b2, Some(&[("p", added(&[1]))]), ["p"], now);
        assert_eq!(s.read("p", now), Read::Fresh(t(&[5, 1])));
        assert_eq!(s.collected(), 0);
        assert!(s.updates_due().is_empty());
        s.finish_batch(b1, Some(&[("p", added(&[0])), ("p", added(&[1]))]), ["p"], now);
        assert_eq!(s.read("p", now), Read::Fresh(t(&[6, 2])));
        let due = s.updates_due();
        assert_eq!(
            due,
            vec![Update {
                poll: "p".into(),
                from: 0,
                to: 2,
                delta: t(&[1, 2])
            }]
        );
        // One update at a time per poll.
        assert!(s.updates_due().is_empty());
        // While it is under way, a refresh that sees the counter already moved is not suspect.
        assert_eq!(s.read("p", now), Read::Fresh(t(&[6, 2])));
        s.updated("p", 2, t(&[1, 2]));
        assert_eq!(s.read("p", now), Read::Fresh(t(&[6, 2])));
        assert!(s.updates_due().is_empty());
        assert!(s.dirty.is_empty());
    }

    #[test]
    fn revisions_take_away_what_they_replace_even_from_other_writers_ballots() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL, SETTLE);
        s.registered("p", 0, t(&[]));
        let plan = s.plan(&["p".into()], now).remove(0);
        // Three ballots for option 0, all written by other writers.
        assert_eq!(s.fill(&plan, refreshed(&[3], Some((0, &[]))), now), t(&[3]));
        let b = s.begin_batch();
        // One of them is replaced by option 1, another is withdrawn.
        let (zero, one) = ([0], [1]);
        let replaced = Change {
            add: Some(Marks::choices(&one)),
            sub: Some(Marks::choices(&zero)),
        };
        let withdrawn = Change {
            add: None,
            sub: Some(Marks::choices(&zero)),
        };
        s.finish_batch(b, Some(&[("p", replaced), ("p", withdrawn)]), ["p"], now);
        assert_eq!(s.read("p", now), Read::Fresh(t(&[1, 1])));
        // Our counter takes what its ballots changed: below zero (modulo 2^64) where they took
        // away more than they added.
        let due = s.updates_due();
        let minus = |n: u64| n.wrapping_neg();
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].delta.total, due[0].delta.by_option.clone()),
            (minus(1), vec![minus(2), 1])
        );
        s.updated("p", b, due[0].delta.clone());
        assert_eq!(s.read("p", now), Read::Fresh(t(&[1, 1])));
    }

    #[test]
    fn unclear_batches_hold_collection_back_until_counted() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL, SETTLE);
        s.registered("p", 0, t(&[]));
        let b1 = s.begin_batch();
        s.finish_batch(b1, None, ["p"], now);
        let b2 = s.begin_batch();
        s.finish_batch(b2, Some(&[("p", added(&[0]))]), ["p"], now);
        assert_eq!(s.collected(), 0);
        assert!(s.updates_due().is_empty());
        // A refresh counts the unclear batch in the database.
        assert_eq!(s.read("p", now), Read::Missing);
        let plan = s.plan(&["p".into()], now).remove(0);
        assert_eq!(plan.unclear, vec![b1]);
        let mut db = refreshed(&[], Some((0, &[])));
        db.unclear.insert(b1, t(&[0, 1]));
        assert_eq!(s.fill(&plan, db, now), t(&[1, 1]));
        assert!(s.settled(now).is_empty());
        let later = now + SETTLE;
        assert_eq!(s.settled(later), vec![(b1, vec!["p".to_owned()])]);
        s.resolved(b1, HashMap::from([("p".to_owned(), t(&[0, 1]))]));
        // Counted once: now from memory, no longer from the refresh's unclear counts.
        assert_eq!(s.read("p", now), Read::Fresh(t(&[1, 1])));
        assert_eq!(s.collected(), 2);
        let due = s.updates_due();
        assert_eq!(due[0].delta, t(&[1, 1]));
        assert_eq!((due[0].from, due[0].to), (0, 2));
    }

    #[test]
    fn a_counter_moved_by_someone_else_makes_the_poll_suspect() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL, SETTLE);
        s.registered("p", 3, t(&[4]));
        let plan = s.plan(&["p".into()], now).remove(0);
        // A repair rewrote our counter at the same sequence: its counts win.
        assert_eq!(s.fill(&plan, refreshed(&[1], Some((3, &[2]))), now), t(&[3]));
        assert!(s.take_suspects().is_empty());
        // The database lost updates (a failover): our counter is behind what we wrote.
        let plan = s.plan(&["p".into()], now).remove(0);
        assert_eq!(s.fill(&plan, refreshed(&[1], Some((1, &[1]))), now), t(&[5]));
        assert_eq!(s.take_suspects(), vec![("p".to_owned(), 3)]);
        s.updated("p", 3, t(&[3]));
        assert_eq!(s.read("p", now), Read::Fresh(t(&[4])));
    }

    #[test]
    fn stale_tallies_are_served_while_one_refresh_runs() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL, SETTLE);
        let plan = s.plan(&["p".into()], now).remove(0);
        assert!(!plan.own_known);
        s.fill(&plan, refreshed(&[3], None), now);
        let later = now + TTL;
        assert_eq!(s.read("p", later), Read::Stale(t(&[3])));
        assert_eq!(s.read("p", later), Read::Refreshing(t(&[3])));
        s.abandon(&["p".into()]);
        assert_eq!(s.read("p", later), Read::Stale(t(&[3])));
        s.abandon(&["p".into()]);
        // Long unread, it is not served without asking the database.
        assert_eq!(s.read("p", now + TTL * SERVE_STALE_TTLS), Read::Missing);
        // Registering (this process writes to the poll now) drops what was counted without it.
        s.registered("p", 0, t(&[]));
        assert_eq!(s.read("p", later), Read::Missing);
    }

    #[test]
    fn a_purge_forgets_the_poll() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL, SETTLE);
        s.registered("p", 0, t(&[]));
        let b = s.begin_batch();
        s.purged("p");
        s.finish_batch(b, Some(&[("p", added(&[0]))]), ["p"], now);
        assert!(!s.is_registered("p"));
        assert!(s.updates_due().is_empty());
        assert_eq!(s.read("p", now), Read::Missing);
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let now = Instant::now();
        let mut s = Tallies::new(Duration::ZERO, SETTLE);
        s.registered("p", 0, t(&[]));
        let b = s.begin_batch();
        s.finish_batch(b, Some(&[("p", added(&[0]))]), ["p"], now);
        let plan = s.plan(&["p".into()], now).remove(0);
        assert_eq!(s.fill(&plan, refreshed(&[2], Some((0, &[]))), now), t(&[3]));
        assert_eq!(s.read("p", now), Read::Missing);
    }
}

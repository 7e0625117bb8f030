//! Which of this process's own ballots a computed tally covers, so that it can be kept exact
//! between aggregations without recomputing it after every ballot.
//!
//! Every batch the writer sends gets a sequence number `s`, and each of its documents carries
//! `w` (this store's random writer id) and `s`. An aggregation planned with a *cutoff* `c`
//! excludes this writer's documents with `s > c` (`$nor: [{w, s: {$gt: c}}]`), so what it counts
//! of our own ballots does not depend on which in-flight inserts it happened to see: exactly the
//! batches up to `c`, which were all finished before it started (`c` is below every batch in
//! flight). Our ballots in later batches are added from memory, batch by batch, when the batch is
//! acknowledged; the result is "aggregation + own batches after the cutoff", exact for this
//! process at every instant, and as fresh as the aggregation for other replicas' ballots.
//!
//! A batch whose outcome is not known document by document (the command failed as a whole, was
//! retried, or timed out) is *unclear*: some of its documents may be stored, unknown which. It is
//! never added from memory; instead every tally whose cutoff is below it is dropped, and until no
//! batch before it is in flight any more, tallies come from plain aggregations that are not
//! kept. A purge is handled the same way (every batch in flight may have lost its documents).
//!
//! Kept tallies are refreshed (one aggregation per poll at a time, in the background) once older
//! than the TTL; meanwhile the last one plus our own newer batches is served.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::domain::Tally;

/// Polls remembered at most; past this the state starts over.
const CAPACITY: usize = 10_000;
/// A kept tally not refreshed for this many TTLs (nobody reads it) is forgotten.
const FORGET_AFTER_TTLS: u32 = 10;
/// A kept tally older than the TTL but younger than this many TTLs is served while it is
/// refreshed in the background; older, a read aggregates at once (unless a refresh is under way).
const SERVE_STALE_TTLS: u32 = 5;

#[derive(Debug)]
pub(super) struct Tallies {
    ttl: Duration,
    next_seq: u64,
    in_flight: BTreeSet<u64>,
    unclear: BTreeSet<u64>,
    /// Bumped whenever kept tallies may have lost ballots (unclear batch, purge, reset), so an
    /// aggregation planned before cannot be kept.
    epoch: u64,
    polls: HashMap<String, PollTallies>,
}

#[derive(Debug, Default)]
struct PollTallies {
    base: Option<Base>,
    /// Cutoffs of aggregations under way.
    pending: Vec<u64>,
    /// Our own stored ballots per batch, for batches after the oldest cutoff in use.
    own: BTreeMap<u64, Tally>,
}

#[derive(Debug)]
struct Base {
    tally: Tally,
    cutoff: u64,
    at: Instant,
}

/// What a read finds.
#[derive(Debug, PartialEq)]
pub(super) enum Read {
    /// A kept tally younger than the TTL, plus our own newer ballots.
    Fresh(Tally),
    /// The same, but older than the TTL (not by much): serve it and start a refresh (this read
    /// was told to).
    Stale(Tally),
    /// Older than the TTL, and a refresh is already under way: serve it.
    Refreshing(Tally),
    /// Nothing kept, or too old: aggregate now.
    Missing,
}

/// How to aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// Exclude our own batches after `cutoff`; the result may be kept (see [`Tallies::fill`]).
    Cutoff { cutoff: u64, epoch: u64 },
    /// Count everything; the result is served once and not kept.
    Plain,
}

impl PollTallies {
    fn with_own(&self, base: &Base) -> Tally {
        let mut t = base.tally.clone();
        for own in self.own.range(base.cutoff + 1..).map(|(_, t)| t) {
            t.merge(own);
        }
        t
    }

    /// The oldest cutoff still in use by this poll's kept tally or aggregations under way.
    fn oldest_cutoff(&self) -> Option<u64> {
        self.base
            .iter()
            .map(|b| b.cutoff)
            .chain(self.pending.iter().copied())
            .min()
    }

    fn prune(&mut self, safe: u64) {
        let keep_after = self.oldest_cutoff().unwrap_or(safe).min(safe);
        self.own = self.own.split_off(&(keep_after + 1));
    }

    fn is_idle(&self) -> bool {
        self.base.is_none() && self.pending.is_empty() && self.own.is_empty()
    }
}

impl Tallies {
    /// A zero `ttl` keeps nothing: every read aggregates.
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            next_seq: 1,
            in_flight: BTreeSet::new(),
            unclear: BTreeSet::new(),
            epoch: 0,
            polls: HashMap::new(),
        }
    }

    /// Whether tallies are kept at all (a non-zero TTL).
    pub(super) fn keeps(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// Every batch up to this one is finished; no aggregation planned from now on will have a
    /// lower cutoff.
    fn safe_cutoff(&self) -> u64 {
        self.in_flight.first().map_or(self.next_seq, |&s| s) - 1
    }

    /// A new batch is about to be sent; returns its sequence number (the documents' `s`).
    pub(super) fn begin_batch(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.insert(seq);
        seq
    }

    /// The batch `seq` is over. `stored` holds the poll and choices of each document known to be
    /// stored by it, when every document's outcome is known (`None`: unclear, see the module docs;
    /// `polls` are then the polls of all its documents).
    pub(super) fn finish_batch<'a>(
        &mut self,
        seq: u64,
        stored: Option<&[(&'a str, &'a [u32])]>,
        polls: impl IntoIterator<Item = &'a str>,
    ) {
        self.in_flight.remove(&seq);
        if !self.keeps() {
            return;
        }
        let safe = self.safe_cutoff();
        match stored {
            Some(stored) => {
                for &(poll, choices) in stored {
                    // With nothing kept or under way, later aggregations (cutoff ≥ `safe`) count it.
                    let needed = self.polls.get(poll).is_some_and(|p| !p.is_idle()) || seq > safe;
                    if needed {
                        let p = self.polls.entry(poll.to_owned()).or_default();
                        p.own.entry(seq).or_default().add(choices);
                    }
                }
                let forget_before = Instant::now().checked_sub(self.ttl.saturating_mul(FORGET_AFTER_TTLS));
                for &(poll, _) in stored {
                    if let Some(p) = self.polls.get_mut(poll) {
                        // A tally nobody read for long would otherwise collect every later batch.
                        if p.base.as_ref().is_some_and(|b| forget_before.is_some_and(|f| b.at < f)) {
                            p.base = None;
                        }
                        p.prune(safe);
                        if p.is_idle() {
                            self.polls.remove(poll);
                        }
                    }
                }
            }
            None => {
                self.unclear.insert(seq);
                self.epoch += 1;
                for poll in polls {
                    if let Some(p) = self.polls.get_mut(poll)
                        && p.base.as_ref().is_some_and(|b| b.cutoff < seq)
                    {
                        p.base = None;
                    }
                }
            }
        }
        self.unclear = self.unclear.split_off(&(safe + 1));
        if self.polls.len() > CAPACITY {
            self.reset();
        }
    }

    /// Forgets everything (ballots of `poll` were deleted while batches may be in flight).
    pub(super) fn purged(&mut self, poll: &str) {
        self.polls.remove(poll);
        self.epoch += 1;
        // Every batch in flight may have had its documents deleted, or not.
        self.unclear.extend(self.in_flight.iter().copied());
    }

    fn reset(&mut self) {
        self.polls.clear();
        self.epoch += 1;
    }

    pub(super) fn read(&mut self, poll: &str, now: Instant) -> Read {
        let ttl = self.ttl;
        let Some(p) = self.polls.get_mut(poll) else {
            return Read::Missing;
        };
        let Some(base) = &p.base else {
            return Read::Missing;
        };
        let age = now.duration_since(base.at);
        if age < ttl {
            Read::Fresh(p.with_own(base))
        } else if !p.pending.is_empty() {
            Read::Refreshing(p.with_own(base))
        } else if age < ttl.saturating_mul(SERVE_STALE_TTLS) {
            Read::Stale(p.with_own(base))
        } else {
            Read::Missing
        }
    }

    /// Plans an aggregation of `polls` (registering it, so our batches finished meanwhile are
    /// kept for it). Every `Cutoff` plan must be ended with [`fill`](Self::fill) or
    /// [`abandon`](Self::abandon).
    pub(super) fn plan<'a>(&mut self, polls: impl IntoIterator<Item = &'a str>) -> Plan {
        let cutoff = self.safe_cutoff();
        if !self.keeps() || self.unclear.iter().any(|&s| s > cutoff) {
            return Plan::Plain;
        }
        for poll in polls {
            self.polls.entry(poll.to_owned()).or_default().pending.push(cutoff);
        }
        Plan::Cutoff {
            cutoff,
            epoch: self.epoch,
        }
    }

    fn unregister(&mut self, poll: &str, cutoff: u64) -> Option<&mut PollTallies> {
        let p = self.polls.get_mut(poll)?;
        if let Some(i) = p.pending.iter().position(|&c| c == cutoff) {
            p.pending.swap_remove(i);
        }
        Some(p)
    }

    /// The aggregation planned as `plan` for `poll` counted `counted`; returns the tally to serve
    /// (with our own later batches) and keeps it unless something was lost meanwhile.
    pub(super) fn fill(&mut self, poll: &str, plan: Plan, counted: Tally, now: Instant) -> Tally {
        let Plan::Cutoff { cutoff, epoch } = plan else {
            return counted;
        };
        let safe = self.safe_cutoff();
        let current = self.epoch == epoch;
        let Some(p) = self.unregister(poll, cutoff) else {
            return counted;
        };
        let base = Base {
            tally: counted,
            cutoff,
            at: now,
        };
        let tally = p.with_own(&base);
        if current && p.base.as_ref().is_none_or(|b| b.cutoff <= cutoff) {
            p.base = Some(base);
        }
        p.prune(safe);
        tally
    }

    /// The aggregation planned as `plan` failed.
    pub(super) fn abandon<'a>(&mut self, polls: impl IntoIterator<Item = &'a str>, plan: Plan) {
        if let Plan::Cutoff { cutoff, .. } = plan {
            let safe = self.safe_cutoff();
            for poll in polls {
                if let Some(p) = self.unregister(poll, cutoff) {
                    p.prune(safe);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(by_option: &[u64]) -> Tally {
        Tally {
            total: by_option.iter().sum(),
            by_option: by_option.to_vec(),
        }
    }

    const TTL: Duration = Duration::from_secs(1);

    #[test]
    fn own_batches_after_the_cutoff_are_added_exactly_once() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL);
        let b1 = s.begin_batch();
        s.finish_batch(b1, Some(&[("p", &[0])]), ["p"]);
        // Batch 2 is in flight while the aggregation runs: it is excluded from it, whatever the
        // database had stored when it looked.
        let b2 = s.begin_batch();
        assert_eq!(s.read("p", now), Read::Missing);
        let plan = s.plan(["p"]);
        assert_eq!(plan, Plan::Cutoff { cutoff: 1, epoch: 0 });
        s.finish_batch(b2, Some(&[("p", &[1]), ("p", &[1]), ("q", &[0])]), ["p", "q"]);
        // The aggregation (batch 1 only, by its filter) ends after batch 2 was acknowledged.
        assert_eq!(s.fill("p", plan, t(&[1]), now), t(&[1, 2]));
        assert_eq!(s.read("p", now), Read::Fresh(t(&[1, 2])));
        let b3 = s.begin_batch();
        s.finish_batch(b3, Some(&[("p", &[0])]), ["p"]);
        assert_eq!(s.read("p", now), Read::Fresh(t(&[2, 2])));
        // "q" had nothing kept or planned when batch 2 ended after every earlier batch: an
        // aggregation from now on counts it, so nothing was kept for it.
        assert_eq!(s.read("q", now), Read::Missing);
        assert!(s.polls.get("q").is_none_or(PollTallies::is_idle));
    }

    #[test]
    fn stale_tallies_are_served_while_one_refresh_runs() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL);
        let plan = s.plan(["p"]);
        s.fill("p", plan, t(&[3]), now);
        let later = now + TTL;
        assert_eq!(s.read("p", later), Read::Stale(t(&[3])));
        let refresh = s.plan(["p"]);
        assert_eq!(s.read("p", later), Read::Refreshing(t(&[3])));
        let b = s.begin_batch();
        s.finish_batch(b, Some(&[("p", &[0])]), ["p"]);
        assert_eq!(s.read("p", later), Read::Refreshing(t(&[4])));
        assert_eq!(s.fill("p", refresh, t(&[3]), later), t(&[4]));
        assert_eq!(s.read("p", later), Read::Fresh(t(&[4])));
        // A failed refresh leaves the stale tally to be refreshed again.
        let refresh = s.plan(["p"]);
        s.abandon(["p"], refresh);
        assert_eq!(s.read("p", later + TTL), Read::Stale(t(&[4])));
        // Long unread, it is not served without asking the database.
        assert_eq!(s.read("p", later + TTL * SERVE_STALE_TTLS), Read::Missing);
        let inline = s.plan(["p"]);
        assert_eq!(s.fill("p", inline, t(&[9]), later + TTL * SERVE_STALE_TTLS), t(&[9]));
    }

    #[test]
    fn unclear_batches_are_left_to_the_database() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL);
        let plan = s.plan(["p"]);
        s.fill("p", plan, t(&[0]), now);
        let b1 = s.begin_batch();
        let b2 = s.begin_batch();
        // An aggregation planned while both are in flight...
        let racing = s.plan(["p"]);
        // ...batch 2 fails as a whole: its documents may or may not be stored.
        s.finish_batch(b2, None, ["p"]);
        assert_eq!(s.read("p", now), Read::Missing, "the kept tally could miss them");
        // Batch 1 is still in flight, so no cutoff can cover batch 2 yet: plain aggregations.
        assert_eq!(s.plan(["p"]), Plan::Plain);
        assert_eq!(s.fill("p", Plan::Plain, t(&[5]), now), t(&[5]));
        assert_eq!(s.read("p", now), Read::Missing);
        // The racing aggregation must not be kept either.
        s.fill("p", racing, t(&[0]), now);
        assert_eq!(s.read("p", now), Read::Missing);
        s.finish_batch(b1, Some(&[("p", &[0])]), ["p"]);
        let plan = s.plan(["p"]);
        assert_eq!(plan, Plan::Cutoff { cutoff: 2, epoch: 1 });
        assert_eq!(s.fill("p", plan, t(&[6]), now), t(&[6]));
        assert_eq!(s.read("p", now), Read::Fresh(t(&[6])));
        assert!(s.unclear.is_empty());
    }

    #[test]
    fn a_purge_drops_the_poll_and_distrusts_batches_in_flight() {
        let now = Instant::now();
        let mut s = Tallies::new(TTL);
        let plan = s.plan(["p"]);
        s.fill("p", plan, t(&[2]), now);
        let b = s.begin_batch();
        s.purged("p");
        s.finish_batch(b, Some(&[("p", &[0])]), ["p"]);
        assert_eq!(s.read("p", now), Read::Missing);
        let plan = s.plan(["p"]);
        assert!(matches!(plan, Plan::Cutoff { cutoff: 1, .. }));
        assert_eq!(s.fill("p", plan, t(&[1]), now), t(&[1]));
    }

    #[test]
    fn tallies_nobody_reads_do_not_collect_batches() {
        let ttl = Duration::from_millis(1);
        let mut s = Tallies::new(ttl);
        let plan = s.plan(["p"]);
        s.fill("p", plan, t(&[0]), Instant::now());
        std::thread::sleep(ttl * (FORGET_AFTER_TTLS + 5));
        for _ in 0..100 {
            let b = s.begin_batch();
            s.finish_batch(b, Some(&[("p", &[0])]), ["p"]);
        }
        assert!(s.polls.is_empty(), "{:?}", s.polls);
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let now = Instant::now();
        let mut s = Tallies::new(Duration::ZERO);
        assert_eq!(s.plan(["p"]), Plan::Plain);
        let b = s.begin_batch();
        s.finish_batch(b, Some(&[("p", &[0])]), ["p"]);
        assert_eq!(s.read("p", now), Read::Missing);
        assert!(s.polls.is_empty());
    }
}

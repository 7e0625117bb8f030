//! The contract between the services, besides the internal wire types ([`crate::internal`]): poll
//! ids, the poll settings the vote service acts on, the status rule, tallies, and the voter-key
//! derivation both services must agree on.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// Length of a poll id: 24 lowercase hex characters, the shape of a MongoDB ObjectId, so polls
/// written by the predecessor (whose `_id` is an ObjectId) keep their ids.
pub const POLL_ID_LEN: usize = 24;
/// A poll id's pattern, as the OpenAPI documents state it.
pub const POLL_ID_PATTERN: &str = "^[0-9a-fA-F]{24}$";

/// Most options a poll can have.
pub const MAX_OPTIONS: usize = 20;
/// Longest option text, in characters.
pub const MAX_OPTION_LEN: usize = 200;

/// Creates a new poll id: 4 bytes of seconds since the epoch (so ids sort roughly by creation
/// time, like ObjectIds) followed by 8 random bytes.
pub fn new_poll_id(now: DateTime<Utc>) -> String {
    let mut bytes = [0u8; 12];
    let secs = u32::try_from(now.timestamp().max(0)).unwrap_or(u32::MAX);
    bytes[..4].copy_from_slice(&secs.to_be_bytes());
    rand::rng().fill_bytes(&mut bytes[4..]);
    hex::encode(bytes)
}

/// Whether `id` has the shape of a poll id (24 hex characters, either case).
pub fn is_valid_poll_id(id: &str) -> bool {
    id.len() == POLL_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Normalises a syntactically valid poll id (hex digits are case-insensitive).
pub fn normalise_poll_id(id: &str) -> Option<String> {
    is_valid_poll_id(id).then(|| id.to_ascii_lowercase())
}

/// Who may see a poll's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResultsVisibility {
    /// Everyone, at any time.
    #[default]
    Always,
    /// Only callers who have voted on the poll (and the poll's admin).
    AfterVote,
    /// Only once the poll is closed (and the poll's admin at any time).
    AfterClose,
}

/// How the vote service recognises a second ballot from the same voter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum DedupePolicy {
    /// One ballot per client address.
    #[default]
    Ip,
    /// One ballot per opaque `voter_id` (body) or `X-Voter-Id` (header).
    Voter,
    /// No deduplication (idempotency keys still make retries safe).
    None,
}

/// A poll's lifecycle state, derived from `opens_at`, `closes_at` and `closed_at` at a given
/// instant: `scheduled` before `opens_at`, `open` until `closes_at` or an explicit close, then
/// `closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PollStatus {
    Scheduled,
    Open,
    Closed,
}

/// When a poll opens and closes: its scheduled opening (`opens_at`), its scheduled close
/// (`closes_at`) and its explicit close (`closed_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Schedule {
    pub opens_at: Option<DateTime<Utc>>,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
}

impl Schedule {
    /// The poll's status at `now`: the one rule both services apply. A close (explicit or
    /// scheduled) wins over a scheduled opening.
    pub fn status_at(&self, now: DateTime<Utc>) -> PollStatus {
        if self.closed_at.is_some() || self.closes_at.is_some_and(|t| t <= now) {
            PollStatus::Closed
        } else if self.opens_at.is_some_and(|t| t > now) {
            PollStatus::Scheduled
        } else {
            PollStatus::Open
        }
    }
}

/// How a poll's ballots mark its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum VotingMethod {
    /// Pick `min_choices` to `max_choices` options (approval voting when several).
    #[default]
    Choice,
    /// Rank 1 to `max_choices` distinct options, best first (instant runoff, Condorcet).
    Ranked,
    /// Give every option an integer score from 0 to `max_score` (omitted options score 0).
    Score,
}

/// Whether a ballot's voter may replace or withdraw it (with its receipt) while the poll is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum BallotChanges {
    /// `PUT` and `DELETE /api/votes/{id}` work while the poll is open.
    #[default]
    Allowed,
    /// Ballots are final once cast.
    Locked,
}

/// A score poll's `max_score` when none is given.
pub const DEFAULT_MAX_SCORE: u32 = 5;
/// The highest `max_score` a score poll may have.
pub const MAX_SCORE: u32 = 10;
/// The most distinct rankings a ranked poll may allow (its options and `max_choices` decide how
/// many): the ranked tally keeps a count per distinct ranking, and this bounds its size (a few
/// MiB at most, within one MongoDB document) and the time to compute the results from it.
pub const MAX_RANKINGS: u64 = 150_000;

/// How many distinct rankings of 1 to `max_len` of `n` options exist: the sum over `k` of
/// `n! / (n - k)!` (saturating).
pub fn possible_rankings(n: usize, max_len: u32) -> u64 {
    let mut total = 0u64;
    let mut arrangements = 1u64;
    for k in 0..(max_len as usize).min(n) {
        arrangements = arrangements.saturating_mul((n - k) as u64);
        total = total.saturating_add(arrangements);
    }
    total
}

/// What one ballot marks, borrowed from wherever it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Marks<'a> {
    /// The options the ballot counts for in `by_option`: the chosen ones (`choice`), the first
    /// preference (`ranked`), the ones scored above 0 (`score`); ascending except for `ranked`.
    pub choices: &'a [u32],
    /// `ranked`: the ranking, best first.
    pub ranking: Option<&'a [u32]>,
    /// `score`: every option's score, in option order.
    pub scores: Option<&'a [u32]>,
}

impl<'a> Marks<'a> {
    /// A `choice` ballot's marks.
    pub fn choices(choices: &'a [u32]) -> Self {
        Self {
            choices,
            ranking: None,
            scores: None,
        }
    }
}

/// The counts for one poll: `total` ballots, per option index how many ballots count for it (see
/// [`Marks::choices`]), and what the poll's method needs besides: the score sums of a `score`
/// poll, the ballots per distinct ranking of a `ranked` poll (keyed by [`ranking_key`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tally {
    pub total: u64,
    pub by_option: Vec<u64>,
    /// `score` polls: per option index, the sum of its scores.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sums: Vec<u64>,
    /// `ranked` polls: ballots per distinct ranking.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rankings: BTreeMap<String, u64>,
}

/// A ranking as a tally keys it: the option indices, best first, joined by `-` (no `.` or `$`, so
/// it is a MongoDB field name as it is).
pub fn ranking_key(ranking: &[u32]) -> String {
    let parts: Vec<String> = ranking.iter().map(u32::to_string).collect();
    parts.join("-")
}

/// The ranking a [`ranking_key`] stands for (`None` if it is not one).
pub fn parse_ranking_key(key: &str) -> Option<Vec<u32>> {
    key.split('-').map(|p| p.parse().ok()).collect()
}

/// Adds `n` at `v[i]`, modulo 2^64 (see [`Tally::remove_n`]).
fn add_at(v: &mut Vec<u64>, i: usize, n: u64) {
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] = v[i].wrapping_add(n);
}

impl Tally {
    /// Counts for exactly `n` options (missing trailing counts are zero; score sums too when the
    /// tally has any).
    pub fn padded(mut self, n: usize) -> Self {
        if self.by_option.len() < n {
            self.by_option.resize(n, 0);
        }
        if !self.sums.is_empty() && self.sums.len() < n {
            self.sums.resize(n, 0);
        }
        self
    }

    /// Adds one ballot.
    pub fn add(&mut self, marks: Marks<'_>) {
        self.add_n(marks, 1);
    }

    /// Adds `n` ballots marked alike.
    pub fn add_n(&mut self, marks: Marks<'_>, n: u64) {
        self.total = self.total.wrapping_add(n);
        for &c in marks.choices {
            add_at(&mut self.by_option, c as usize, n);
        }
        if let Some(scores) = marks.scores {
            if self.sums.len() < scores.len() {
                self.sums.resize(scores.len(), 0);
            }
            for (i, &s) in scores.iter().enumerate() {
                add_at(&mut self.sums, i, u64::from(s).wrapping_mul(n));
            }
        }
        if let Some(ranking) = marks.ranking {
            let count = self.rankings.entry(ranking_key(ranking)).or_default();
            *count = count.wrapping_add(n);
        }
    }

    /// Takes away `n` ballots marked alike (replaced or withdrawn ones).
    ///
    /// Counts are kept modulo 2^64, so a part of a tally may hold more removals than additions
    /// (a withdrawal counted apart from the ballot it withdraws) and still add up to the exact
    /// tally with the other parts; [`Tally::clamped`] reads a sum that may be short of some parts.
    pub fn remove_n(&mut self, marks: Marks<'_>, n: u64) {
        self.add_n(marks, n.wrapping_neg());
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &Tally) {
        self.total = self.total.wrapping_add(other.total);
        for (i, &n) in other.by_option.iter().enumerate() {
            add_at(&mut self.by_option, i, n);
        }
        for (i, &n) in other.sums.iter().enumerate() {
            add_at(&mut self.sums, i, n);
        }
        for (k, &n) in &other.rankings {
            let count = self.rankings.entry(k.clone()).or_default();
            *count = count.wrapping_add(n);
        }
    }

    /// Whether every count is zero.
    pub fn is_zero(&self) -> bool {
        self.total == 0
            && self.by_option.iter().all(|&n| n == 0)
            && self.sums.iter().all(|&n| n == 0)
            && self.rankings.values().all(|&n| n == 0)
    }

    /// The tally with every count that is below zero (modulo 2^64, see [`Tally::remove_n`]) read
    /// as zero: a sum of parts read at different instants may count a withdrawal before the
    /// ballot it withdraws.
    pub fn clamped(mut self) -> Self {
        let clamp = |n: &mut u64| {
            if *n > i64::MAX as u64 {
                *n = 0;
            }
        };
        clamp(&mut self.total);
        self.by_option.iter_mut().for_each(clamp);
        self.sums.iter_mut().for_each(clamp);
        self.rankings.values_mut().for_each(clamp);
        self.rankings.retain(|_, n| *n > 0);
        self
    }

    /// The same counts without trailing zero per-option counts or sums and without zero ranking
    /// counts: two tallies of the same ballots are equal once trimmed, however they were kept.
    pub fn trimmed(mut self) -> Self {
        while self.by_option.last() == Some(&0) {
            self.by_option.pop();
        }
        while self.sums.last() == Some(&0) {
            self.sums.pop();
        }
        self.rankings.retain(|_, n| *n > 0);
        self
    }

    /// The distinct rankings and their counts (keys that are not rankings are skipped).
    pub fn ranking_counts(&self) -> Vec<(Vec<u32>, u64)> {
        self.rankings
            .iter()
            .filter_map(|(k, &n)| parse_ranking_key(k).map(|r| (r, n)))
            .collect()
    }
}

/// Hex SHA-256 of `parts` joined by NUL bytes.
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// The stable, non-reversible key of a voter identity (`ip:<address>` or `id:<voter id>`), as
/// stored in ballots and used by both services for `after_vote` visibility.
pub fn voter_key(kind: VoterKind, value: &str) -> String {
    let tag = match kind {
        VoterKind::Address => "ip",
        VoterKind::VoterId => "id",
    };
    format!("{tag}:{}", &sha256_hex(&[tag.as_bytes(), value.as_bytes()])[..32])
}

/// Where a voter identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoterKind {
    Address,
    VoterId,
}

/// Validates an opaque voter id: 1–128 visible ASCII characters.
pub fn validate_voter_id(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must contain only visible ASCII characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_ids_are_objectid_shaped_and_unique() {
        let now = Utc::now();
        let a = new_poll_id(now);
        let b = new_poll_id(now);
        assert!(is_valid_poll_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_valid_poll_id("xyz"));
        assert!(!is_valid_poll_id(&"g".repeat(24)));
        assert_eq!(normalise_poll_id(&"AB".repeat(12)), Some("ab".repeat(12)));
    }

    #[test]
    fn status_follows_opening_close_time_and_explicit_close() {
        let now = Utc::now();
        let secs = chrono::Duration::seconds;
        let later = Some(now + secs(10));
        let closes = |closes_at, closed_at| Schedule {
            opens_at: None,
            closes_at,
            closed_at,
        };
        assert_eq!(closes(later, None).status_at(now), PollStatus::Open);
        assert_eq!(closes(later, None).status_at(now + secs(10)), PollStatus::Closed);
        assert_eq!(closes(None, Some(now)).status_at(now), PollStatus::Closed);
        assert_eq!(closes(None, None).status_at(now), PollStatus::Open);

        let scheduled = Schedule {
            opens_at: Some(now + secs(5)),
            closes_at: later,
            closed_at: None,
        };
        assert_eq!(scheduled.status_at(now), PollStatus::Scheduled);
        assert_eq!(
            scheduled.status_at(now + secs(5)),
            PollStatus::Open,
            "open from opens_at on"
        );
        assert_eq!(scheduled.status_at(now + secs(10)), PollStatus::Closed);
        let closed_early = Schedule {
            closed_at: Some(now),
            ..scheduled
        };
        assert_eq!(
            closed_early.status_at(now),
            PollStatus::Closed,
            "a close wins over the opening"
        );
    }

    #[test]
    fn voter_keys_depend_on_kind_and_value() {
        assert_eq!(
            voter_key(VoterKind::Address, "1.2.3.4"),
            voter_key(VoterKind::Address, "1.2.3.4")
        );
        assert_ne!(voter_key(VoterKind::Address, "x"), voter_key(VoterKind::VoterId, "x"));
        assert!(voter_key(VoterKind::VoterId, "x").starts_with("id:"));
        assert!(validate_voter_id("abc-123").is_ok());
        assert!(validate_voter_id("").is_err());
        assert!(validate_voter_id("a b").is_err());
        assert!(validate_voter_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn tally_adds_and_pads() {
        let mut t = Tally::default();
        t.add(Marks::choices(&[0, 2]));
        t.add(Marks::choices(&[2]));
        assert_eq!(t.total, 2);
        assert_eq!(t.clone().padded(4).by_option, vec![1, 0, 2, 0]);
        assert!(t.sums.is_empty() && t.rankings.is_empty(), "a choice tally has neither");
    }

    #[test]
    fn tally_keeps_score_sums_and_rankings() {
        let mut t = Tally::default();
        t.add(Marks {
            choices: &[0, 2],
            ranking: None,
            scores: Some(&[3, 0, 5]),
        });
        t.add_n(
            Marks {
                choices: &[2],
                ranking: None,
                scores: Some(&[0, 0, 1]),
            },
            2,
        );
        assert_eq!(
            (t.total, t.by_option.clone(), t.sums.clone()),
            (3, vec![1, 0, 3], vec![3, 0, 7])
        );

        let mut r = Tally::default();
        r.add(Marks {
            choices: &[2],
            ranking: Some(&[2, 0]),
            scores: None,
        });
        r.add_n(
            Marks {
                choices: &[2],
                ranking: Some(&[2, 0]),
                scores: None,
            },
            4,
        );
        r.add(Marks {
            choices: &[1],
            ranking: Some(&[1]),
            scores: None,
        });
        assert_eq!(r.ranking_counts(), vec![(vec![1], 1), (vec![2, 0], 5)]);
        assert_eq!(ranking_key(&[12, 0, 3]), "12-0-3");
        assert_eq!(parse_ranking_key("12-0-3"), Some(vec![12, 0, 3]));
        assert_eq!(parse_ranking_key("1.2"), None);

        let mut merged = t.clone();
        merged.merge(&r);
        assert_eq!(merged.total, 9);
        assert_eq!(merged.by_option, vec![1, 1, 8]);
        assert_eq!(merged.rankings.len(), 2);
        let padded = Tally {
            by_option: vec![1, 0, 0],
            sums: vec![2, 0],
            ..Tally::default()
        };
        assert_eq!(
            padded.trimmed(),
            Tally {
                by_option: vec![1],
                sums: vec![2],
                ..Tally::default()
            }
        );
    }

    #[test]
    fn possible_rankings_count_every_partial_ranking() {
        assert_eq!(possible_rankings(3, 3), 3 + 6 + 6);
        assert_eq!(possible_rankings(4, 2), 4 + 12);
        assert_eq!(possible_rankings(8, 8), 109_600);
        assert!(possible_rankings(9, 9) > MAX_RANKINGS);
        assert!(possible_rankings(20, 20) > 6 * 10u64.pow(18));
        assert_eq!(possible_rankings(2, 0), 0);
    }
}

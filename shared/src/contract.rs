//! The contract between the services, besides the internal wire types ([`crate::internal`]): poll
//! ids, the poll settings the vote service acts on, the status rule, tallies, and the voter-key
//! derivation both services must agree on.

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

/// The counts for one poll: `total` ballots, and per option index how many ballots chose it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Tally {
    pub total: u64,
    pub by_option: Vec<u64>,
}

impl Tally {
    /// Counts for exactly `n` options (missing trailing counts are zero).
    pub fn padded(mut self, n: usize) -> Self {
        if self.by_option.len() < n {
            self.by_option.resize(n, 0);
        }
        self
    }

    /// Adds one ballot choosing `choices`.
    pub fn add(&mut self, choices: &[u32]) {
        self.add_n(choices, 1);
    }

    /// Adds `n` ballots each choosing `choices`.
    pub fn add_n(&mut self, choices: &[u32], n: u64) {
        self.total += n;
        for &c in choices {
            let i = c as usize;
            if self.by_option.len() <= i {
                self.by_option.resize(i + 1, 0);
            }
            self.by_option[i] += n;
        }
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &Tally) {
        self.total += other.total;
        if self.by_option.len() < other.by_option.len() {
            self.by_option.resize(other.by_option.len(), 0);
        }
        for (a, b) in self.by_option.iter_mut().zip(&other.by_option) {
            *a += b;
        }
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
        t.add(&[0, 2]);
        t.add(&[2]);
        assert_eq!(t.total, 2);
        assert_eq!(t.clone().padded(4).by_option, vec![1, 0, 2, 0]);
    }
}

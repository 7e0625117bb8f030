//! The poll service's domain: a poll as stored, the rules a poll's fields follow, how a change
//! (a merge patch) applies to a poll, and a listing as the storage sees it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::FieldError;
use shared::contract::{
    BallotChanges, DEFAULT_MAX_SCORE, DedupePolicy, MAX_OPTION_LEN, MAX_OPTIONS, MAX_RANKINGS, MAX_SCORE, PollStatus,
    ResultsVisibility, Schedule, VotingMethod, possible_rankings,
};
use shared::internal::PollDefinition;
use utoipa::ToSchema;

pub const MAX_NAME: usize = 200;
pub const MAX_DESC: usize = 2000;
pub const MIN_OPTIONS: usize = 2;

/// A poll as stored by the poll service. Storage adapters map it to their own layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PollRecord {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub desc: String,
    pub options: Vec<String>,
    /// How ballots mark the options (polls stored before methods existed: `choice`).
    #[serde(default)]
    pub method: VotingMethod,
    /// Fewest options a `choice` ballot picks or a `ranked` ballot ranks.
    #[serde(default = "one")]
    pub min_choices: u32,
    /// Most options a `choice` ballot picks or a `ranked` ballot ranks (a `score` poll's is its
    /// number of options).
    pub max_choices: u32,
    /// A `score` poll's highest score (kept at the default for other methods).
    #[serde(default = "default_max_score")]
    pub max_score: u32,
    /// When ballots start to count (`None`: from creation). Polls stored before scheduled openings
    /// existed have none.
    #[serde(default)]
    pub opens_at: Option<DateTime<Utc>>,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub results: ResultsVisibility,
    pub dedupe: DedupePolicy,
    /// Whether voters may replace or withdraw their ballots (polls stored before: allowed).
    #[serde(default)]
    pub changes: BallotChanges,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// SHA-256 (hex) of the admin token. `None` for polls written by the predecessor, which had no
    /// admin token: those cannot be changed through the API.
    pub admin_token_hash: Option<String>,
    /// Votes the predecessor counted in the poll document itself (`votes.count`), before ballots
    /// were stored one by one. Zero for polls created by this service.
    #[serde(default)]
    pub legacy_votes: u64,
    /// Incremented on every change; used for optimistic concurrency on updates.
    pub revision: u64,
}

fn one() -> u32 {
    1
}

fn default_max_score() -> u32 {
    DEFAULT_MAX_SCORE
}

impl PollRecord {
    /// The poll's status at `now`.
    pub fn status_at(&self, now: DateTime<Utc>) -> PollStatus {
        self.schedule().status_at(now)
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            closed_at: self.closed_at,
        }
    }

    /// This poll with `update` applied and checked, at `now`: a closed poll cannot change, the
    /// opening time of a poll that has opened cannot change, and every field problem is listed.
    /// (Whether options and dedupe may still change depends on the ballots, which the caller asks
    /// the vote service about.)
    pub fn apply(&self, update: &PollUpdate, now: DateTime<Utc>) -> Result<PollRecord, UpdateRefused> {
        let status = self.status_at(now);
        if status == PollStatus::Closed {
            return Err(UpdateRefused::Closed);
        }
        if update.opens_at.is_some_and(|t| t != self.opens_at) && status != PollStatus::Scheduled {
            return Err(UpdateRefused::AlreadyOpen);
        }
        let mut errors = Vec::new();
        let mut next = self.clone();
        if let Some(name) = &update.name {
            next.name = check_name(name, &mut errors);
        }
        if let Some(desc) = &update.desc {
            next.desc = check_desc(desc, &mut errors);
        }
        if let Some(options) = &update.options {
            next.options = check_options(options, &mut errors);
            if next.method == VotingMethod::Score {
                next.max_choices = next.options.len() as u32;
            }
        }
        for (field, value, to) in [
            ("min_choices", update.min_choices, &mut next.min_choices),
            ("max_choices", update.max_choices, &mut next.max_choices),
        ] {
            if let Some(v) = value {
                if self.method == VotingMethod::Score {
                    errors.push(FieldError::new(field, "does not apply to a score poll"));
                }
                *to = v;
            }
        }
        if update.min_choices.is_some() || update.max_choices.is_some() || update.options.is_some() {
            check_ballot_rules(&next, &mut errors);
        }
        if let Some(closes_at) = update.closes_at {
            if let Some(t) = closes_at {
                check_closes_at(t, now, &mut errors);
            }
            next.closes_at = closes_at;
        }
        if let Some(opens_at) = update.opens_at {
            next.opens_at = opens_at;
        }
        if update.opens_at.is_some() || update.closes_at.is_some() {
            check_order(next.opens_at, next.closes_at, &mut errors);
        }
        if let Some(r) = update.results {
            next.results = r;
        }
        if let Some(d) = update.dedupe {
            next.dedupe = d;
        }
        if let Some(c) = update.changes {
            next.changes = c;
        }
        if !errors.is_empty() {
            return Err(UpdateRefused::Invalid(errors));
        }
        Ok(next)
    }
}

/// A change to a poll: each field present is set (`closes_at: Some(None)` removes the close time,
/// `opens_at: Some(None)` opens a scheduled poll now).
#[derive(Debug, Clone, Default)]
pub struct PollUpdate {
    pub name: Option<String>,
    pub desc: Option<String>,
    pub options: Option<Vec<String>>,
    pub min_choices: Option<u32>,
    pub max_choices: Option<u32>,
    pub opens_at: Option<Option<DateTime<Utc>>>,
    pub closes_at: Option<Option<DateTime<Utc>>>,
    pub results: Option<ResultsVisibility>,
    pub dedupe: Option<DedupePolicy>,
    pub changes: Option<BallotChanges>,
}

/// Why [`PollRecord::apply`] refused a change.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateRefused {
    /// The poll is closed and can no longer change.
    Closed,
    /// The poll has opened: its opening time can no longer change.
    AlreadyOpen,
    /// These fields break the rules.
    Invalid(Vec<FieldError>),
}

/// Which polls a listing returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    Scheduled,
    Open,
    Closed,
}

/// Position in the newest-first order of polls: a page continues strictly after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// A listing request as the storage sees it.
#[derive(Debug, Clone)]
pub struct PollQuery {
    pub limit: usize,
    pub after: Option<PollCursor>,
    pub status: Option<StatusFilter>,
    pub now: DateTime<Utc>,
}

/// Length limits apply to the text as sent (as the schema's `maxLength` does), before trimming.
pub fn check_name(name: &str, errors: &mut Vec<FieldError>) -> String {
    let n = name.trim();
    if n.is_empty() {
        errors.push(FieldError::new("name", "must not be empty"));
    } else if name.chars().count() > MAX_NAME {
        errors.push(FieldError::new(
            "name",
            format!("must be at most {MAX_NAME} characters"),
        ));
    }
    n.to_owned()
}

pub fn check_desc(desc: &str, errors: &mut Vec<FieldError>) -> String {
    if desc.chars().count() > MAX_DESC {
        errors.push(FieldError::new(
            "desc",
            format!("must be at most {MAX_DESC} characters"),
        ));
    }
    desc.trim().to_owned()
}

/// Trims the options and checks count, length and distinctness (trimmed, case-insensitive).
pub fn check_options(options: &[impl AsRef<str>], errors: &mut Vec<FieldError>) -> Vec<String> {
    if options.len() < MIN_OPTIONS || options.len() > MAX_OPTIONS {
        errors.push(FieldError::new(
            "options",
            format!(
                "must have {MIN_OPTIONS} to {MAX_OPTIONS} options (got {})",
                options.len()
            ),
        ));
    }
    let mut seen: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(options.len());
    for (i, o) in options.iter().enumerate() {
        let o = o.as_ref();
        let t = o.trim();
        if t.is_empty() {
            errors.push(FieldError::new(format!("options[{i}]"), "must not be empty"));
        } else if o.chars().count() > MAX_OPTION_LEN {
            errors.push(FieldError::new(
                format!("options[{i}]"),
                format!("must be at most {MAX_OPTION_LEN} characters"),
            ));
        } else {
            let folded = t.to_lowercase();
            if let Some(j) = seen.iter().position(|s| *s == folded) {
                errors.push(FieldError::new(
                    format!("options[{i}]"),
                    format!("duplicates options[{j}]"),
                ));
            }
        }
        seen.push(t.to_lowercase());
        out.push(t.to_owned());
    }
    out
}

pub fn check_max_choices(max: u32, n_options: usize, errors: &mut Vec<FieldError>) {
    if max == 0 || max as usize > n_options.max(1) {
        errors.push(FieldError::new(
            "max_choices",
            format!("must be between 1 and the number of options ({n_options})"),
        ));
    }
}

pub fn check_closes_at(t: DateTime<Utc>, now: DateTime<Utc>, errors: &mut Vec<FieldError>) {
    if t <= now {
        errors.push(FieldError::new("closes_at", "must be in the future"));
    }
}

/// The ballot rules of a poll: 1 ≤ `min_choices` ≤ `max_choices` ≤ its options; a ranked poll
/// allows at most [`MAX_RANKINGS`] distinct rankings; a score poll's `max_score` is 1 to
/// [`MAX_SCORE`].
pub fn check_ballot_rules(p: &PollRecord, errors: &mut Vec<FieldError>) {
    let n = p.options.len();
    check_max_choices(p.max_choices, n, errors);
    if p.min_choices == 0 || p.min_choices > p.max_choices {
        errors.push(FieldError::new(
            "min_choices",
            format!("must be between 1 and max_choices ({})", p.max_choices),
        ));
    }
    match p.method {
        VotingMethod::Ranked => {
            let rankings = possible_rankings(n, p.max_choices);
            if rankings > MAX_RANKINGS {
                errors.push(FieldError::new(
                    "max_choices",
                    format!(
                        "ranking up to {} of {n} options allows {rankings} distinct rankings; a ranked poll allows at \
                         most {MAX_RANKINGS}: lower max_choices",
                        p.max_choices
                    ),
                ));
            }
        }
        VotingMethod::Score if p.max_score == 0 || p.max_score > MAX_SCORE => {
            errors.push(FieldError::new(
                "max_score",
                format!("must be between 1 and {MAX_SCORE}"),
            ));
        }
        _ => {}
    }
}

/// A poll closes after it opens.
pub fn check_order(opens_at: Option<DateTime<Utc>>, closes_at: Option<DateTime<Utc>>, errors: &mut Vec<FieldError>) {
    if let (Some(opens), Some(closes)) = (opens_at, closes_at)
        && closes <= opens
    {
        errors.push(FieldError::new("closes_at", "must be after opens_at"));
    }
}

impl From<&PollRecord> for PollDefinition {
    fn from(p: &PollRecord) -> Self {
        Self {
            id: p.id.clone(),
            options: p.options.clone(),
            method: p.method,
            min_choices: p.min_choices,
            max_choices: p.max_choices,
            max_score: p.max_score,
            dedupe: p.dedupe,
            results: p.results,
            changes: p.changes,
            opens_at: p.opens_at,
            closes_at: p.closes_at,
            closed_at: p.closed_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    /// An open poll of options a and b, created `now`.
    fn sample(now: DateTime<Utc>) -> PollRecord {
        PollRecord {
            id: shared::contract::new_poll_id(now),
            name: "n".into(),
            desc: "d".into(),
            options: opts(&["a", "b"]),
            method: VotingMethod::Choice,
            min_choices: 1,
            max_choices: 1,
            max_score: DEFAULT_MAX_SCORE,
            opens_at: None,
            closes_at: None,
            closed_at: None,
            results: ResultsVisibility::Always,
            dedupe: DedupePolicy::Ip,
            changes: BallotChanges::Allowed,
            created_at: now,
            updated_at: now,
            admin_token_hash: None,
            legacy_votes: 0,
            revision: 1,
        }
    }

    #[test]
    fn options_are_trimmed_and_distinct_case_insensitively() {
        let mut e = Vec::new();
        assert_eq!(check_options(&opts(&[" red ", "Green"]), &mut e), vec!["red", "Green"]);
        assert!(e.is_empty());
        check_options(&opts(&["Red", " red", ""]), &mut e);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].field, "options[1]");
        assert_eq!(e[1].field, "options[2]");
        let mut e = Vec::new();
        check_options(&opts(&["only"]), &mut e);
        assert_eq!(e[0].field, "options");
    }

    #[test]
    fn lengths_count_the_text_as_sent() {
        let mut e = Vec::new();
        assert_eq!(check_name(&format!(" {} ", "x".repeat(198)), &mut e).len(), 198);
        assert!(e.is_empty(), "{e:?}");
        check_name(&format!("x{}", " ".repeat(200)), &mut e);
        check_options(&opts(&["a", &format!("{}b", " ".repeat(200))]), &mut e);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[1].field, "options[1]");
    }

    #[test]
    fn names_and_choices_are_bounded() {
        let mut e = Vec::new();
        check_name("   ", &mut e);
        check_name(&"x".repeat(201), &mut e);
        check_max_choices(3, 2, &mut e);
        check_max_choices(0, 2, &mut e);
        assert_eq!(e.len(), 4);
        let mut e = Vec::new();
        check_name(&"é".repeat(200), &mut e);
        assert!(e.is_empty(), "length counts characters, not bytes");
    }

    #[test]
    fn a_patch_changes_only_what_it_names_and_never_a_closed_poll() {
        let now = Utc::now();
        let poll = sample(now);
        let update = PollUpdate {
            desc: Some(" new ".into()),
            max_choices: Some(2),
            ..PollUpdate::default()
        };
        let next = poll.apply(&update, now).expect("applies");
        assert_eq!(
            (next.desc.as_str(), next.max_choices, next.name.as_str()),
            ("new", 2, "n")
        );
        let too_many = PollUpdate {
            max_choices: Some(3),
            name: Some(" ".into()),
            ..PollUpdate::default()
        };
        match poll.apply(&too_many, now) {
            Err(UpdateRefused::Invalid(e)) => assert_eq!(e.len(), 2, "{e:?}"),
            other => panic!("{other:?}"),
        }
        let closed = PollRecord {
            closed_at: Some(now),
            ..poll
        };
        assert_eq!(closed.apply(&update, now), Err(UpdateRefused::Closed));
    }

    #[test]
    fn the_opening_time_changes_only_before_the_poll_opens_and_stays_before_the_close() {
        let now = Utc::now();
        let secs = chrono::Duration::seconds;
        let scheduled = PollRecord {
            opens_at: Some(now + secs(60)),
            closes_at: Some(now + secs(120)),
            ..sample(now)
        };
        let later = PollUpdate {
            opens_at: Some(Some(now + secs(90))),
            ..PollUpdate::default()
        };
        assert_eq!(
            scheduled.apply(&later, now).expect("moves").opens_at,
            Some(now + secs(90))
        );
        let open_now = PollUpdate {
            opens_at: Some(None),
            ..PollUpdate::default()
        };
        let opened = scheduled.apply(&open_now, now).expect("opens now");
        assert_eq!(opened.status_at(now), PollStatus::Open);

        let after_close = PollUpdate {
            opens_at: Some(Some(now + secs(120))),
            ..PollUpdate::default()
        };
        match scheduled.apply(&after_close, now) {
            Err(UpdateRefused::Invalid(e)) => assert_eq!(e[0].field, "closes_at", "{e:?}"),
            other => panic!("{other:?}"),
        }
        let close_before_opening = PollUpdate {
            closes_at: Some(Some(now + secs(30))),
            ..PollUpdate::default()
        };
        assert!(matches!(
            scheduled.apply(&close_before_opening, now),
            Err(UpdateRefused::Invalid(_))
        ));

        // Once open, the opening time is history: changing it is refused, restating it is not.
        let at_opening = now + secs(60);
        assert_eq!(scheduled.apply(&later, at_opening), Err(UpdateRefused::AlreadyOpen));
        let same = PollUpdate {
            opens_at: Some(scheduled.opens_at),
            name: Some("renamed".into()),
            ..PollUpdate::default()
        };
        assert_eq!(scheduled.apply(&same, at_opening).expect("no change").name, "renamed");
    }
}

//! The poll service's API types (separate from the stored [`PollRecord`], whose rules are in
//! [`crate::record`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use shared::contract::{BallotChanges, DedupePolicy, PollStatus, ResultsVisibility, Tally, VotingMethod};

use crate::methods;

use crate::record::{MIN_OPTIONS, PollRecord, PollUpdate};
use shared::contract::MAX_OPTIONS;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ArrayBuilder, Schema};
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// The schema's pattern for text that must not be only white space: one character that `str::trim`
/// does not remove (the `#[schema(pattern = ...)]` attributes repeat it, as they take literals only).
pub const NOT_BLANK: &str = r"[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";

/// A new poll.
///
/// Rules JSON Schema cannot state, answered with 400 naming the field all the same: options are
/// distinct after trimming, case-insensitively; `max_choices` is at most the number of options;
/// `closes_at` is in the future and after `opens_at`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePoll {
    /// 1–200 characters, not only white space (surrounding white space is trimmed).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]",
        example = "Favourite colour"
    )]
    pub name: String,
    /// Up to 2000 characters.
    #[serde(default)]
    #[schema(max_length = 2000, example = "Pick one")]
    pub desc: Option<String>,
    /// 2–20 distinct non-empty options (distinct after trimming, case-insensitively).
    pub options: OptionList,
    /// How ballots mark the options (default `choice`): `choice` picks `min_choices` to
    /// `max_choices` options; `ranked` ranks `min_choices` to `max_choices` options, best first
    /// (results by instant runoff, with the Condorcet winner and the pairwise matrix); `score`
    /// gives every option a whole number from 0 to `max_score`.
    #[serde(default)]
    pub method: Option<VotingMethod>,
    /// Fewest options a `choice` ballot picks or a `ranked` ballot ranks: 1 (the default) to
    /// `max_choices`. Not for `score` polls.
    #[serde(default)]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 20)]
    pub min_choices: Option<WholeNumber>,
    /// Most options a `choice` ballot picks (default 1) or a `ranked` ballot ranks (default: all
    /// of them), at most the number of options. A ranked poll allows at most 150,000 distinct
    /// rankings (e.g. all 8 of 8 options, or 4 of 15). Not for `score` polls.
    #[serde(default)]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 20)]
    pub max_choices: Option<WholeNumber>,
    /// A `score` poll's highest score: 1 to 10 (default 5). Only for `score` polls.
    #[serde(default)]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10)]
    pub max_score: Option<WholeNumber>,
    /// When voting starts (RFC 3339; default: at once). Until then the poll is `scheduled` and
    /// ballots are refused with 409 `poll-not-open`.
    #[serde(default)]
    pub opens_at: Option<DateTime<Utc>>,
    /// When voting stops (RFC 3339, in the future, after `opens_at`).
    #[serde(default)]
    pub closes_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub results: Option<ResultsVisibility>,
    #[serde(default)]
    pub dedupe: Option<DedupePolicy>,
    /// Whether voters may replace or withdraw their ballots with their receipts while the poll
    /// is open (default `allowed`).
    #[serde(default)]
    pub changes: Option<BallotChanges>,
}

/// One option: 1–200 characters, not only white space (surrounding white space is trimmed).
///
/// "White space" is what `str::trim` removes (Unicode `White_Space`), spelt out in the pattern so
/// that every regex dialect agrees with the server.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, min_length = 1, max_length = 200, pattern = r"[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")]
pub struct OptionText(pub String);

impl AsRef<str> for OptionText {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A poll's options: 2–20 of them, distinct (after trimming, case-insensitively, which the schema
/// can state only for exact duplicates: `uniqueItems`).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct OptionList(pub Vec<OptionText>);

impl PartialSchema for OptionList {
    fn schema() -> RefOr<Schema> {
        ArrayBuilder::new()
            .items(OptionText::schema())
            .min_items(Some(MIN_OPTIONS))
            .max_items(Some(MAX_OPTIONS))
            .unique_items(true)
            .examples([serde_json::json!(["red", "green", "blue"])])
            .into()
    }
}

impl ToSchema for OptionList {}

/// A whole number as JSON Schema's `integer` means it: `8` and `8.0` are the same number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WholeNumber(pub u32);

impl<'de> Deserialize<'de> for WholeNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WholeNumber;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<WholeNumber, E> {
                u32::try_from(v)
                    .map(WholeNumber)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<WholeNumber, E> {
                u32::try_from(v)
                    .map(WholeNumber)
                    .map_err(|_| E::custom(format!("{v} is out of range")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<WholeNumber, E> {
                if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                    Ok(WholeNumber(v as u32))
                } else {
                    Err(E::custom(format!("expected a whole number, got {v}")))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Changes to a poll (JSON merge patch: absent fields stay, `closes_at: null` removes the closing time).
///
/// The rules of a new poll that JSON Schema cannot state (see `CreatePoll`) apply to the changed
/// poll, answered with 400 naming the field.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePoll {
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub desc: Option<String>,
    /// Only while the poll has no votes.
    #[serde(default)]
    #[schema(value_type = Option<OptionList>)]
    pub options: Option<OptionList>,
    /// Not for `score` polls.
    #[serde(default)]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 20)]
    pub min_choices: Option<WholeNumber>,
    /// Not for `score` polls.
    #[serde(default)]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 20)]
    pub max_choices: Option<WholeNumber>,
    /// Only while the poll is `scheduled` (409 `poll-already-open` afterwards; sending the value
    /// it has is not a change); `null` opens it now.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub opens_at: Option<Option<DateTime<Utc>>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub closes_at: Option<Option<DateTime<Utc>>>,
    #[serde(default)]
    pub results: Option<ResultsVisibility>,
    /// Only while the poll has no votes.
    #[serde(default)]
    pub dedupe: Option<DedupePolicy>,
    /// Whether voters may replace or withdraw their ballots from now on.
    #[serde(default)]
    pub changes: Option<BallotChanges>,
}

impl UpdatePoll {
    /// The change this patch asks for.
    pub fn to_update(&self) -> PollUpdate {
        PollUpdate {
            name: self.name.clone(),
            desc: self.desc.clone(),
            options: self.options.as_ref().map(|o| o.0.iter().map(|t| t.0.clone()).collect()),
            min_choices: self.min_choices.as_ref().map(|m| m.0),
            max_choices: self.max_choices.as_ref().map(|m| m.0),
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            results: self.results,
            dedupe: self.dedupe,
            changes: self.changes,
        }
    }
}

fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The poll in the path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PollIdPath {
    /// Poll id: 24 hexadecimal characters (either case).
    #[param(example = "6740a0c3f1e2d3c4b5a69788", pattern = "^[0-9a-fA-F]{24}$")]
    pub id: String,
}

/// Listing parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1–100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// Opaque cursor from a previous page's `Link: rel="next"`.
    #[param(min_length = 27, max_length = 27, pattern = "^[A-Za-z0-9_-]{26}[AEIMQUYcgkosw048]$")]
    pub cursor: Option<String>,
    /// Only scheduled, only open or only closed polls.
    #[param(inline)]
    pub status: Option<crate::record::StatusFilter>,
}

/// Parameters of reads whose visibility may depend on the caller.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ViewerParams {
    /// The caller's voter id, 1–128 visible ASCII characters (for `after_vote` results on
    /// `voter`-deduplicated polls; the `X-Voter-Id` header works too).
    #[param(min_length = 1, max_length = 128, pattern = "^[!-~]+$")]
    pub voter_id: Option<String>,
}

impl ViewerParams {
    /// The voter id, checked like the vote service checks it.
    pub fn voter_id(&self) -> Result<Option<&str>, shared::Problem> {
        match self.voter_id.as_deref() {
            None => Ok(None),
            Some(v) => shared::contract::validate_voter_id(v)
                .map(|()| Some(v))
                .map_err(|msg| shared::Problem::invalid("query.voter_id", msg)),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OptionCount {
    pub option: String,
    /// Ballots counting for the option: that chose it (`choice`), ranked it first (`ranked`),
    /// scored it above 0 (`score`).
    pub count: u64,
    /// `score` polls: the sum of its scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sum: Option<u64>,
    /// `score` polls: its mean score over every ballot (an option a ballot leaves out scores 0
    /// on it); 0 without ballots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
}

/// Counts: ballots in total and per option, in option order; for `ranked` polls the results of
/// the ranking methods too.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Votes {
    pub count: u64,
    pub by_option: Vec<OptionCount>,
    /// `ranked` polls only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranked: Option<RankedResults>,
}

/// A `ranked` poll's results.
///
/// Instant runoff: each round every ballot counts for its highest-ranked option still in the
/// running; an option with more than half of the round's counted ballots wins, else the option
/// with the fewest votes is eliminated. Ties for fewest are broken by the earlier rounds' counts,
/// latest round first (the option with fewer votes there goes), and then by option order (the
/// option listed last goes). A ballot whose ranked options are all eliminated is exhausted.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RankedResults {
    /// The instant-runoff winner (`null` without ballots).
    pub winner: Option<String>,
    /// Every round, first preferences first.
    pub rounds: Vec<RunoffRound>,
    /// The option more voters rank above each other option than the reverse, if there is one.
    pub condorcet_winner: Option<String>,
    /// `pairwise[a][b]`: ballots ranking `options[a]` above `options[b]` (an unranked option is
    /// below every ranked one), in option order.
    pub pairwise: Vec<Vec<u64>>,
}

/// One round of an instant runoff.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunoffRound {
    /// 1, 2, …
    pub round: u32,
    /// Votes of the options still in the running, in option order.
    pub counts: Vec<OptionVotes>,
    /// Ballots with no option left in the running.
    pub exhausted: u64,
    /// The option eliminated after this round (`null` in the last one).
    pub eliminated: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OptionVotes {
    pub option: String,
    pub votes: u64,
}

/// A poll as clients see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PollView {
    #[schema(example = "6740a0c3f1e2d3c4b5a69788")]
    pub id: String,
    pub name: String,
    pub desc: String,
    pub options: Vec<String>,
    pub method: VotingMethod,
    pub min_choices: u32,
    pub max_choices: u32,
    /// `score` polls only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_score: Option<u32>,
    pub status: PollStatus,
    pub opens_at: Option<DateTime<Utc>>,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub results: ResultsVisibility,
    pub dedupe: DedupePolicy,
    /// Whether voters may replace or withdraw their ballots (`PUT`/`DELETE /api/votes/{id}`).
    pub changes: BallotChanges,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// `null` while the poll's `results` setting hides the counts from this caller.
    pub votes: Option<Votes>,
}

/// The poll just created, with its admin token: shown only here, stored only as a hash.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedPoll {
    #[serde(flatten)]
    pub poll: PollView,
    /// Send as `Authorization: Bearer <admin_token>` to change, close or delete the poll.
    pub admin_token: String,
}

impl PollView {
    pub fn new(p: &PollRecord, tally: Option<&Tally>, now: DateTime<Utc>) -> Self {
        Self::with_votes(p, tally.map(|t| votes(p, t)), now)
    }

    /// The view with counts already computed (see [`votes`]; a ranked poll's results are worth
    /// computing once per tally, not once per reader).
    pub fn with_votes(p: &PollRecord, votes: Option<Votes>, now: DateTime<Utc>) -> Self {
        Self {
            id: p.id.clone(),
            name: p.name.clone(),
            desc: p.desc.clone(),
            options: p.options.clone(),
            method: p.method,
            min_choices: p.min_choices,
            max_choices: p.max_choices,
            max_score: (p.method == VotingMethod::Score).then_some(p.max_score),
            status: p.status_at(now),
            opens_at: p.opens_at,
            closes_at: p.closes_at,
            closed_at: p.closed_at,
            results: p.results,
            dedupe: p.dedupe,
            changes: p.changes,
            created_at: p.created_at,
            updated_at: p.updated_at,
            votes,
        }
    }
}

/// A poll's counts as clients see them.
pub fn votes(p: &PollRecord, t: &Tally) -> Votes {
    let score = p.method == VotingMethod::Score;
    let text = |i: u32| p.options.get(i as usize).cloned().unwrap_or_default();
    Votes {
        count: t.total + p.legacy_votes,
        by_option: p
            .options
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let sum = score.then(|| t.sums.get(i).copied().unwrap_or(0));
                OptionCount {
                    option: o.clone(),
                    count: t.by_option.get(i).copied().unwrap_or(0),
                    sum,
                    mean: sum.map(|s| if t.total == 0 { 0.0 } else { s as f64 / t.total as f64 }),
                }
            })
            .collect(),
        ranked: (p.method == VotingMethod::Ranked).then(|| {
            let r = methods::ranked(p.options.len(), &t.ranking_counts());
            RankedResults {
                winner: r.winner.map(text),
                rounds: (1u32..)
                    .zip(r.rounds)
                    .map(|(round, x)| RunoffRound {
                        round,
                        counts: (0u32..)
                            .zip(x.counts)
                            .filter_map(|(i, c)| c.map(|votes| OptionVotes { option: text(i), votes }))
                            .collect(),
                        exhausted: x.exhausted,
                        eliminated: x.eliminated.map(text),
                    })
                    .collect(),
                condorcet_winner: r.condorcet_winner.map(text),
                pairwise: r.pairwise,
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The characters of `NOT_BLANK`'s class, read from its escapes.
    fn blank_class() -> Vec<char> {
        let class = NOT_BLANK.trim_start_matches("[^").trim_end_matches(']');
        let mut out = Vec::new();
        let mut rest = class;
        let mut range_from = None;
        while !rest.is_empty() {
            let (c, tail) = match rest.strip_prefix('\\') {
                Some(t) if t.starts_with('u') => (
                    char::from_u32(u32::from_str_radix(&t[1..5], 16).expect("hex")).expect("char"),
                    &t[5..],
                ),
                Some(t) => {
                    let c = match t.chars().next() {
                        Some('t') => '\t',
                        Some('n') => '\n',
                        Some('v') => '\u{b}',
                        Some('f') => '\u{c}',
                        Some('r') => '\r',
                        other => panic!("unexpected escape {other:?}"),
                    };
                    (c, &t[1..])
                }
                None if rest.starts_with('-') => {
                    range_from = out.pop();
                    rest = &rest[1..];
                    continue;
                }
                None => (rest.chars().next().expect("char"), &rest[1..]),
            };
            match range_from.take() {
                Some(from) => out.extend(from..=c),
                None => out.push(c),
            }
            rest = tail;
        }
        out
    }

    #[test]
    fn the_not_blank_pattern_excludes_exactly_what_trim_removes() {
        let whitespace: Vec<char> = (char::MIN..=char::MAX).filter(|c| c.is_whitespace()).collect();
        let mut class = blank_class();
        class.sort_unstable();
        assert_eq!(class, whitespace);
        let schema = serde_json::to_value(CreatePoll::schema()).expect("schema");
        assert_eq!(schema["properties"]["name"]["pattern"], NOT_BLANK);
        let schema = serde_json::to_value(UpdatePoll::schema()).expect("schema");
        assert_eq!(schema["properties"]["name"]["pattern"], NOT_BLANK);
        let schema = serde_json::to_value(OptionText::schema()).expect("schema");
        assert_eq!(schema["pattern"], NOT_BLANK);
    }

    #[test]
    fn whole_numbers_accept_integral_floats_only() {
        let parse = |s: &str| serde_json::from_str::<WholeNumber>(s);
        assert_eq!(parse("3").expect("int").0, 3);
        assert_eq!(parse("3.0").expect("integral float").0, 3);
        assert_eq!(parse("3e0").expect("exponent").0, 3);
        for bad in ["3.5", "-1", "-1.0", "4294967296", "1e10", "\"3\"", "null"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

//! The poll service's API types (separate from the stored [`PollRecord`]) and their validation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use shared::FieldError;
use shared::domain::{DedupePolicy, PollRecord, PollStatus, ResultsVisibility, Tally};
use utoipa::{IntoParams, ToSchema};

pub const MAX_NAME: usize = 200;
pub const MAX_DESC: usize = 2000;
pub const MIN_OPTIONS: usize = 2;
pub const MAX_OPTIONS: usize = 20;
pub const MAX_OPTION_LEN: usize = 200;

/// A new poll.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePoll {
    /// 1–200 characters.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S", example = "Favourite colour")]
    pub name: String,
    /// Up to 2000 characters.
    #[serde(default)]
    #[schema(max_length = 2000, example = "Pick one")]
    pub desc: Option<String>,
    /// 2–20 distinct non-empty options (distinct after trimming, case-insensitively).
    #[schema(min_items = 2, max_items = 20, example = json!(["red", "green", "blue"]))]
    pub options: Vec<OptionText>,
    /// How many options one ballot may choose: 1 to the number of options (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 20)]
    pub max_choices: Option<u32>,
    /// When voting stops (RFC 3339, in the future).
    #[serde(default)]
    pub closes_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub results: Option<ResultsVisibility>,
    #[serde(default)]
    pub dedupe: Option<DedupePolicy>,
}

/// One option: 1–200 characters, not only white space.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, min_length = 1, max_length = 200, pattern = r"\S")]
pub struct OptionText(pub String);

/// Changes to a poll (JSON merge patch: absent fields stay, `closes_at: null` removes the closing time).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePoll {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub desc: Option<String>,
    /// Only while the poll has no votes.
    #[serde(default)]
    #[schema(min_items = 2, max_items = 20)]
    pub options: Option<Vec<OptionText>>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 20)]
    pub max_choices: Option<u32>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub closes_at: Option<Option<DateTime<Utc>>>,
    #[serde(default)]
    pub results: Option<ResultsVisibility>,
    /// Only while the poll has no votes.
    #[serde(default)]
    pub dedupe: Option<DedupePolicy>,
}

fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Listing parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1–100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// Opaque cursor from a previous page's `Link: rel="next"`.
    pub cursor: Option<String>,
    /// Only open or only closed polls.
    pub status: Option<shared::domain::StatusFilter>,
}

/// Parameters of reads whose visibility may depend on the caller.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ViewerParams {
    /// The caller's voter id (for `after_vote` results on `voter`-deduplicated polls; the
    /// `X-Voter-Id` header works too).
    pub voter_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OptionCount {
    pub option: String,
    pub count: u64,
}

/// Counts: ballots in total and per option, in option order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Votes {
    pub count: u64,
    pub by_option: Vec<OptionCount>,
}

/// A poll as clients see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PollView {
    #[schema(example = "6740a0c3f1e2d3c4b5a69788")]
    pub id: String,
    pub name: String,
    pub desc: String,
    pub options: Vec<String>,
    pub max_choices: u32,
    pub status: PollStatus,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub results: ResultsVisibility,
    pub dedupe: DedupePolicy,
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
        let votes = tally.map(|t| Votes {
            count: t.total + p.legacy_votes,
            by_option: p
                .options
                .iter()
                .enumerate()
                .map(|(i, o)| OptionCount {
                    option: o.clone(),
                    count: t.by_option.get(i).copied().unwrap_or(0),
                })
                .collect(),
        });
        Self {
            id: p.id.clone(),
            name: p.name.clone(),
            desc: p.desc.clone(),
            options: p.options.clone(),
            max_choices: p.max_choices,
            status: p.status_at(now),
            closes_at: p.closes_at,
            closed_at: p.closed_at,
            results: p.results,
            dedupe: p.dedupe,
            created_at: p.created_at,
            updated_at: p.updated_at,
            votes,
        }
    }
}

pub fn check_name(name: &str, errors: &mut Vec<FieldError>) -> String {
    let n = name.trim();
    if n.is_empty() {
        errors.push(FieldError::new("name", "must not be empty"));
    } else if n.chars().count() > MAX_NAME {
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
pub fn check_options(options: &[OptionText], errors: &mut Vec<FieldError>) -> Vec<String> {
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
    for (i, OptionText(o)) in options.iter().enumerate() {
        let t = o.trim();
        if t.is_empty() {
            errors.push(FieldError::new(format!("options[{i}]"), "must not be empty"));
        } else if t.chars().count() > MAX_OPTION_LEN {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<OptionText> {
        v.iter().map(|s| OptionText((*s).to_owned())).collect()
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
}

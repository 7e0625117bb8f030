//! The vote service's domain: a ballot as stored and what storing it did, and the rules that make
//! a ballot from a request — its identity by the poll's dedupe, its choices matched to the poll's
//! options, the fingerprint that tells an idempotent retry from a reused key.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::contract::{DedupePolicy, Marks, VoterKind, VotingMethod, sha256_hex, voter_key};
use shared::internal::PollDefinition;

/// A ballot about to be stored.
///
/// `key` is the ballot's identity within its poll and is unique in the storage: the voter key for
/// `ip`/`voter` dedupe, `i:<idempotency key>` for `none` with an idempotency key, and a random
/// `r:<uuid>` otherwise. A second ballot with the same `(poll_id, key)` is rejected by the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BallotRecord {
    pub id: String,
    pub poll_id: String,
    pub key: String,
    /// Hash of the voter's identity (address or voter id), kept so that `after_vote` visibility can
    /// be answered for polls without dedupe too.
    pub voter: Option<String>,
    /// The option indices the ballot counts for in `by_option`, distinct: the chosen ones,
    /// ascending (`choice`); the first preference (`ranked`); the ones scored above 0, ascending
    /// (`score`).
    pub choices: Vec<u32>,
    /// `ranked` polls: the ranking, best first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<Vec<u32>>,
    /// `score` polls: every option's score, in option order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<u32>>,
    pub idempotency_key: Option<String>,
    /// Hash of what the request asked for, to tell an idempotent retry from a key reused for a
    /// different request.
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
    /// SHA-256 (hex) of the ballot's receipt, the secret its voter got in the answer that stored
    /// it (or in the latest idempotent retry of it). `None` for ballots stored before receipts
    /// existed: nobody can show them.
    #[serde(default)]
    pub receipt_hash: Option<String>,
    /// When its voter last replaced its marks (`PUT /api/votes/{id}`), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// How many changes of its identity's ballot (replacements, withdrawals, votes again) came
    /// before this state of it, where a store keeps them apart (MongoDB); a change read at one
    /// revision applies only if no other came first. Not stored in the ballot itself.
    #[serde(skip)]
    pub revision: u64,
}

/// What happened to a ballot handed to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum CastOutcome {
    /// Stored durably and counted.
    Accepted(BallotRecord),
    /// A ballot with the same identity already exists; it is returned and nothing changed.
    Duplicate(BallotRecord),
}

impl BallotRecord {
    /// A new ballot of `poll_id` with the identity `key` (see [`identity`]), cast by `voter`,
    /// marked `marked` (see [`mark`]), with the request's idempotency key if any.
    pub fn new(poll_id: String, key: String, voter: String, marked: Marked, idempotency_key: Option<String>) -> Self {
        let fingerprint = fingerprint(&poll_id, &marked, &voter);
        Self {
            // Time-ordered (UUIDv7): new ids land at the end of the stores' id indexes instead of at
            // random pages, so a group commit writes fewer pages.
            id: uuid::Uuid::now_v7().to_string(),
            poll_id,
            key,
            voter: Some(voter),
            choices: marked.choices,
            ranking: marked.ranking,
            scores: marked.scores,
            idempotency_key,
            fingerprint,
            created_at: Utc::now(),
            receipt_hash: None,
            updated_at: None,
            revision: 0,
        }
    }

    /// What the ballot marks, owned.
    pub fn marked(&self) -> Marked {
        Marked {
            choices: self.choices.clone(),
            ranking: self.ranking.clone(),
            scores: self.scores.clone(),
        }
    }

    /// The ballot with new marks, replaced at `at`.
    pub fn replaced(mut self, marked: Marked, at: DateTime<Utc>) -> Self {
        self.choices = marked.choices;
        self.ranking = marked.ranking;
        self.scores = marked.scores;
        self.updated_at = Some(at);
        self
    }

    /// What the ballot marks, as a tally counts it.
    pub fn marks(&self) -> Marks<'_> {
        Marks {
            choices: &self.choices,
            ranking: self.ranking.as_deref(),
            scores: self.scores.as_deref(),
        }
    }

    /// Gives the ballot a new receipt: returns the receipt, keeps only its hash.
    pub fn issue_receipt(&mut self) -> String {
        let receipt = shared::secret::new_token();
        self.receipt_hash = Some(receipt_hash(&receipt));
        receipt
    }

    /// The hash a receipt is stored as.
    pub fn hash_receipt(receipt: &str) -> String {
        receipt_hash(receipt)
    }

    /// Whether `receipt` is this ballot's (a constant-time comparison of hashes).
    pub fn has_receipt(&self, receipt: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        self.receipt_hash
            .as_deref()
            .is_some_and(|hash| bool::from(receipt_hash(receipt).as_bytes().ct_eq(hash.as_bytes())))
    }
}

fn receipt_hash(receipt: &str) -> String {
    sha256_hex(&[b"ballot-receipt", receipt.as_bytes()])
}

/// Why a ballot cannot be made from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// `field` names a text that is not one of the poll's options.
    UnknownOption { field: String, text: String },
    /// `field` chooses (ranks, scores) an option already chosen.
    DuplicateOption { field: String, text: String },
    /// More choices (ranks) than the poll's `max_choices`.
    TooManyChoices { field: &'static str, max: u32, got: usize },
    /// Fewer choices (ranks) than the poll's `min_choices`.
    TooFewChoices { field: &'static str, min: u32, got: usize },
    /// A score outside 0 to the poll's `max_score`.
    ScoreOutOfRange { field: String, max: u32, got: i64 },
    /// The ballot marks the poll in another method's shape (`field` is the one it gave).
    WrongShape { field: &'static str, method: VotingMethod },
    /// The poll deduplicates by voter id and the request has none.
    VoterIdRequired,
}

/// What a request marks, in the shape it gave (which must be the poll's method's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marking {
    /// `option` (one text) or `options` (several): a `choice` ballot.
    Choice { texts: Vec<String>, single: bool },
    /// `ranking`: texts, best first.
    Ranking(Vec<String>),
    /// `scores`: text → score.
    Scores(Vec<(String, i64)>),
}

impl Marking {
    /// The request field this shape is given in.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Choice { single: true, .. } => "option",
            Self::Choice { single: false, .. } => "options",
            Self::Ranking(_) => "ranking",
            Self::Scores(_) => "scores",
        }
    }
}

/// A ballot's marks, as stored: see the fields of [`BallotRecord`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marked {
    pub choices: Vec<u32>,
    pub ranking: Option<Vec<u32>>,
    pub scores: Option<Vec<u32>>,
}

impl Marked {
    pub fn marks(&self) -> Marks<'_> {
        Marks {
            choices: &self.choices,
            ranking: self.ranking.as_deref(),
            scores: self.scores.as_deref(),
        }
    }
}

/// The rules of the poll a ballot is marked by.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub options: &'a [String],
    pub method: VotingMethod,
    pub min_choices: u32,
    pub max_choices: u32,
    pub max_score: u32,
}

impl<'a> From<&'a PollDefinition> for Rules<'a> {
    fn from(d: &'a PollDefinition) -> Self {
        Self {
            options: &d.options,
            method: d.method,
            min_choices: d.min_choices,
            max_choices: d.max_choices,
            max_score: d.max_score,
        }
    }
}

/// The option a text names: exact match first, then trimmed and case-insensitive.
fn option_index(options: &[String], text: &str) -> Option<u32> {
    let idx = options.iter().position(|o| o == text).or_else(|| {
        let folded = text.trim().to_lowercase();
        options.iter().position(|o| o.to_lowercase() == folded)
    })?;
    // A poll has at most MAX_OPTIONS options.
    Some(idx as u32)
}

/// Matches a list of texts to distinct option indices, in the order given; `field(i)` names the
/// `i`th text in a refusal.
fn distinct_options(
    options: &[String],
    texts: &[String],
    field: impl Fn(usize) -> String,
) -> Result<Vec<u32>, Refused> {
    let mut out = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let Some(idx) = option_index(options, text) else {
            return Err(Refused::UnknownOption {
                field: field(i),
                text: text.clone(),
            });
        };
        if out.contains(&idx) {
            return Err(Refused::DuplicateOption {
                field: field(i),
                text: text.clone(),
            });
        }
        out.push(idx);
    }
    Ok(out)
}

/// Checks a count of choices (ranks) against `min_choices`..=`max_choices`.
fn check_count(field: &'static str, rules: &Rules<'_>, got: usize) -> Result<(), Refused> {
    if got > rules.max_choices as usize {
        return Err(Refused::TooManyChoices {
            field,
            max: rules.max_choices,
            got,
        });
    }
    if got < rules.min_choices as usize {
        return Err(Refused::TooFewChoices {
            field,
            min: rules.min_choices,
            got,
        });
    }
    Ok(())
}

/// Makes a ballot's marks from what the request marks, by the poll's rules: option texts match
/// exactly first, then trimmed and case-insensitively; each option is marked at most once; a
/// `choice` ballot picks and a `ranked` ballot ranks `min_choices` to `max_choices` options; a
/// `score` ballot scores options 0 to `max_score` (the others score 0). Refusals name the field:
/// `option`, `options[i]`, `ranking[i]`, `scores.<text>`.
pub fn mark(rules: &Rules<'_>, marking: &Marking) -> Result<Marked, Refused> {
    let wanted = match (rules.method, marking) {
        (VotingMethod::Choice, Marking::Choice { .. })
        | (VotingMethod::Ranked, Marking::Ranking(_))
        | (VotingMethod::Score, Marking::Scores(_)) => None,
        (method, m) => Some(Refused::WrongShape {
            field: m.field(),
            method,
        }),
    };
    if let Some(refused) = wanted {
        return Err(refused);
    }
    match marking {
        Marking::Choice { texts, single } => {
            let mut choices = distinct_options(rules.options, texts, |i| {
                if *single {
                    "option".to_owned()
                } else {
                    format!("options[{i}]")
                }
            })?;
            check_count(marking.field(), rules, choices.len())?;
            choices.sort_unstable();
            Ok(Marked {
                choices,
                ..Marked::default()
            })
        }
        Marking::Ranking(texts) => {
            let ranking = distinct_options(rules.options, texts, |i| format!("ranking[{i}]"))?;
            check_count("ranking", rules, ranking.len())?;
            Ok(Marked {
                choices: ranking.first().copied().into_iter().collect(),
                ranking: Some(ranking),
                scores: None,
            })
        }
        Marking::Scores(given) => {
            let mut scores = vec![0u32; rules.options.len()];
            let mut seen = Vec::with_capacity(given.len());
            for (text, score) in given {
                let field = || format!("scores.{text}");
                let Some(idx) = option_index(rules.options, text) else {
                    return Err(Refused::UnknownOption {
                        field: field(),
                        text: text.clone(),
                    });
                };
                if seen.contains(&idx) {
                    return Err(Refused::DuplicateOption {
                        field: field(),
                        text: text.clone(),
                    });
                }
                seen.push(idx);
                let in_range = u32::try_from(*score).ok().filter(|s| *s <= rules.max_score);
                let Some(score) = in_range else {
                    return Err(Refused::ScoreOutOfRange {
                        field: field(),
                        max: rules.max_score,
                        got: *score,
                    });
                };
                scores[idx as usize] = score;
            }
            let choices = (0u32..).zip(&scores).filter(|(_, s)| **s > 0).map(|(i, _)| i).collect();
            Ok(Marked {
                choices,
                ranking: None,
                scores: Some(scores),
            })
        }
    }
}

/// A ballot's identity within its poll (`key`, unique in the storage) and its voter key, by the
/// poll's dedupe: the address for `ip`, the voter id for `voter`, and for `none` a key from the
/// idempotency key (so a retry is the same ballot) or a random one, the voter being the voter id
/// or else the address (for `after_vote` visibility).
pub fn identity(
    dedupe: DedupePolicy,
    address: IpAddr,
    voter_id: Option<&str>,
    idempotency_key: Option<&str>,
) -> Result<(String, String), Refused> {
    let address_key = voter_key(VoterKind::Address, &address.to_string());
    let id_key = voter_id.map(|v| voter_key(VoterKind::VoterId, v));
    Ok(match dedupe {
        DedupePolicy::Ip => (address_key.clone(), address_key),
        DedupePolicy::Voter => {
            let k = id_key.ok_or(Refused::VoterIdRequired)?;
            (k.clone(), k)
        }
        DedupePolicy::None => {
            let key = match idempotency_key {
                Some(k) => format!("i:{}", sha256_hex(&[k.as_bytes()])),
                // Time-ordered, like ballot ids: a poll's new ballots append to its key range.
                None => format!("r:{}", uuid::Uuid::now_v7().simple()),
            };
            (key, id_key.unwrap_or(address_key))
        }
    })
}

/// What a request asked for, to tell an idempotent retry from a key reused for another ballot.
/// (A `choice` ballot's is what it was before other methods existed.)
pub fn fingerprint(poll_id: &str, marked: &Marked, voter: &str) -> String {
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let choice_text = list(&marked.choices);
    let mut parts: Vec<&[u8]> = vec![poll_id.as_bytes(), choice_text.as_bytes(), voter.as_bytes()];
    let ranking = marked.ranking.as_deref().map(|r| format!("ranking:{}", list(r)));
    let scores = marked.scores.as_deref().map(|s| format!("scores:{}", list(s)));
    parts.extend(ranking.iter().chain(&scores).map(String::as_bytes));
    sha256_hex(&parts)
}

/// What a ballot refused as a duplicate of `existing` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    /// The same request again (same idempotency key, same fingerprint): answer it as the first.
    Retry,
    /// The idempotency key was used for a different ballot.
    KeyReused,
    /// The voter has a ballot already.
    AlreadyVoted,
}

/// Classifies `attempt`, which the store refused because `existing` has its identity.
pub fn duplicate(existing: &BallotRecord, attempt: &BallotRecord) -> Duplicate {
    match &attempt.idempotency_key {
        Some(k) if existing.idempotency_key.as_deref() == Some(k.as_str()) => {
            if existing.fingerprint == attempt.fingerprint {
                Duplicate::Retry
            } else {
                Duplicate::KeyReused
            }
        }
        _ => Duplicate::AlreadyVoted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(method: VotingMethod, min: u32, max: u32) -> Rules<'static> {
        static OPTS: std::sync::LazyLock<Vec<String>> =
            std::sync::LazyLock::new(|| vec!["Red".into(), "Green".into(), "Blue".into()]);
        Rules {
            options: &OPTS,
            method,
            min_choices: min,
            max_choices: max,
            max_score: 5,
        }
    }

    fn texts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn choices_match_exactly_then_folded_and_are_bounded() {
        let c = |v: &[&str], min, max| {
            mark(
                &rules(VotingMethod::Choice, min, max),
                &Marking::Choice {
                    texts: texts(v),
                    single: v.len() == 1,
                },
            )
            .map(|m| m.choices)
        };
        assert_eq!(c(&["Blue", " red "], 1, 2), Ok(vec![0, 2]));
        assert_eq!(
            c(&["Pink"], 1, 1),
            Err(Refused::UnknownOption {
                field: "option".into(),
                text: "Pink".into()
            })
        );
        assert_eq!(
            c(&["red", "RED"], 1, 2),
            Err(Refused::DuplicateOption {
                field: "options[1]".into(),
                text: "RED".into()
            })
        );
        assert_eq!(
            c(&["Red", "Green"], 1, 1),
            Err(Refused::TooManyChoices {
                field: "options",
                max: 1,
                got: 2
            })
        );
        assert_eq!(
            c(&["Red"], 2, 3),
            Err(Refused::TooFewChoices {
                field: "option",
                min: 2,
                got: 1
            })
        );
    }

    #[test]
    fn rankings_keep_their_order_and_count_the_first_preference() {
        let r = |v: &[&str], min, max| mark(&rules(VotingMethod::Ranked, min, max), &Marking::Ranking(texts(v)));
        assert_eq!(
            r(&["blue", "Red"], 1, 3),
            Ok(Marked {
                choices: vec![2],
                ranking: Some(vec![2, 0]),
                scores: None
            })
        );
        assert_eq!(
            r(&["Blue", "Red", "blue"], 1, 3),
            Err(Refused::DuplicateOption {
                field: "ranking[2]".into(),
                text: "blue".into()
            })
        );
        assert_eq!(
            r(&["Blue", "Pink"], 1, 3),
            Err(Refused::UnknownOption {
                field: "ranking[1]".into(),
                text: "Pink".into()
            })
        );
        assert_eq!(
            r(&["Blue", "Red"], 1, 1),
            Err(Refused::TooManyChoices {
                field: "ranking",
                max: 1,
                got: 2
            })
        );
        assert_eq!(
            r(&["Blue"], 2, 3),
            Err(Refused::TooFewChoices {
                field: "ranking",
                min: 2,
                got: 1
            })
        );
    }

    #[test]
    fn scores_cover_every_option_and_stay_in_range() {
        let s = |v: &[(&str, i64)]| {
            mark(
                &rules(VotingMethod::Score, 1, 3),
                &Marking::Scores(v.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect()),
            )
        };
        assert_eq!(
            s(&[("blue", 5), ("Red", 0)]),
            Ok(Marked {
                choices: vec![2],
                ranking: None,
                scores: Some(vec![0, 0, 5])
            })
        );
        assert_eq!(
            s(&[]).map(|m| m.scores),
            Ok(Some(vec![0, 0, 0])),
            "all zero is a ballot"
        );
        for bad in [6, -1, i64::MAX] {
            assert_eq!(
                s(&[("Red", bad)]),
                Err(Refused::ScoreOutOfRange {
                    field: "scores.Red".into(),
                    max: 5,
                    got: bad
                })
            );
        }
        assert_eq!(
            s(&[("Red", 1), ("red", 2)]),
            Err(Refused::DuplicateOption {
                field: "scores.red".into(),
                text: "red".into()
            })
        );
        assert!(matches!(s(&[("Pink", 1)]), Err(Refused::UnknownOption { .. })));
    }

    #[test]
    fn a_ballot_in_another_methods_shape_is_refused() {
        let ranking = Marking::Ranking(texts(&["Red"]));
        let choice = Marking::Choice {
            texts: texts(&["Red"]),
            single: true,
        };
        assert_eq!(
            mark(&rules(VotingMethod::Choice, 1, 1), &ranking),
            Err(Refused::WrongShape {
                field: "ranking",
                method: VotingMethod::Choice
            })
        );
        assert_eq!(
            mark(&rules(VotingMethod::Score, 1, 1), &choice),
            Err(Refused::WrongShape {
                field: "option",
                method: VotingMethod::Score
            })
        );
    }

    #[test]
    fn fingerprints_tell_methods_apart_and_keep_choice_ones() {
        let choice = Marked {
            choices: vec![0],
            ..Marked::default()
        };
        let ranked = Marked {
            choices: vec![0],
            ranking: Some(vec![0, 1]),
            scores: None,
        };
        let ranked2 = Marked {
            choices: vec![0],
            ranking: Some(vec![0, 2]),
            scores: None,
        };
        // A choice ballot's fingerprint is the one stored before other methods existed.
        assert_eq!(fingerprint("p", &choice, "v"), sha256_hex(&[b"p", b"0", b"v"]));
        assert_ne!(fingerprint("p", &ranked, "v"), fingerprint("p", &choice, "v"));
        assert_ne!(fingerprint("p", &ranked, "v"), fingerprint("p", &ranked2, "v"));
    }

    #[test]
    fn identity_follows_the_dedupe_policy() {
        let addr: IpAddr = "10.0.0.1".parse().expect("ip");
        let (k, v) = identity(DedupePolicy::Ip, addr, Some("x"), None).expect("ip");
        assert_eq!(
            (k.as_str(), v.as_str()),
            (v.as_str(), voter_key(VoterKind::Address, "10.0.0.1").as_str())
        );
        let (k, v) = identity(DedupePolicy::Voter, addr, Some("x"), None).expect("voter");
        assert_eq!(k, voter_key(VoterKind::VoterId, "x"));
        assert_eq!(k, v);
        assert_eq!(
            identity(DedupePolicy::Voter, addr, None, None),
            Err(Refused::VoterIdRequired)
        );
        let (a, _) = identity(DedupePolicy::None, addr, None, Some("key")).expect("none");
        let (b, _) = identity(DedupePolicy::None, addr, None, Some("key")).expect("none");
        assert_eq!(a, b, "an idempotency key names one ballot");
        let (c, _) = identity(DedupePolicy::None, addr, None, None).expect("none");
        assert!(c.starts_with("r:"));
    }

    #[test]
    fn a_duplicate_is_a_retry_only_with_the_same_key_and_request() {
        let pick = |c: u32| Marked {
            choices: vec![c],
            ..Marked::default()
        };
        let first = BallotRecord::new("p".into(), "k".into(), "v".into(), pick(0), Some("idem".into()));
        let again = BallotRecord::new("p".into(), "k".into(), "v".into(), pick(0), Some("idem".into()));
        let other = BallotRecord::new("p".into(), "k".into(), "v".into(), pick(1), Some("idem".into()));
        let plain = BallotRecord::new("p".into(), "k".into(), "v".into(), pick(0), None);
        assert_eq!(duplicate(&first, &again), Duplicate::Retry);
        assert_eq!(duplicate(&first, &other), Duplicate::KeyReused);
        assert_eq!(duplicate(&first, &plain), Duplicate::AlreadyVoted);
    }
}

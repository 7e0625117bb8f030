//! The vote service's domain: a ballot as stored and what storing it did, and the rules that make
//! a ballot from a request — its identity by the poll's dedupe, its choices matched to the poll's
//! options, the fingerprint that tells an idempotent retry from a reused key.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::contract::{DedupePolicy, VoterKind, sha256_hex, voter_key};

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
    /// Chosen option indices, distinct and ascending.
    pub choices: Vec<u32>,
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
    /// choosing `choices` (distinct, ascending), with the request's idempotency key if any.
    pub fn new(
        poll_id: String,
        key: String,
        voter: String,
        choices: Vec<u32>,
        idempotency_key: Option<String>,
    ) -> Self {
        let fingerprint = fingerprint(&poll_id, &choices, &voter);
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            poll_id,
            key,
            voter: Some(voter),
            choices,
            idempotency_key,
            fingerprint,
            created_at: Utc::now(),
            receipt_hash: None,
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
    /// `field` chooses an option already chosen.
    DuplicateOption { field: String, text: String },
    /// More choices than the poll's `max_choices`.
    TooManyChoices { max: u32, got: usize },
    /// The poll deduplicates by voter id and the request has none.
    VoterIdRequired,
}

/// Maps the chosen texts to option indices (exact match first, then trimmed and case-insensitive),
/// distinct and ascending, at most `max_choices` of them. A single choice is the field `option`,
/// several are `options[i]`.
pub fn match_choices(options: &[String], max_choices: u32, chosen: &[String]) -> Result<Vec<u32>, Refused> {
    let mut out = Vec::with_capacity(chosen.len());
    for (i, text) in chosen.iter().enumerate() {
        let field = || {
            if chosen.len() == 1 {
                "option".to_owned()
            } else {
                format!("options[{i}]")
            }
        };
        let idx = options.iter().position(|o| o == text).or_else(|| {
            let folded = text.trim().to_lowercase();
            options.iter().position(|o| o.to_lowercase() == folded)
        });
        let Some(idx) = idx else {
            return Err(Refused::UnknownOption {
                field: field(),
                text: text.clone(),
            });
        };
        // A poll has at most MAX_OPTIONS options.
        let idx = idx as u32;
        if out.contains(&idx) {
            return Err(Refused::DuplicateOption {
                field: field(),
                text: text.clone(),
            });
        }
        out.push(idx);
    }
    if out.len() > max_choices as usize {
        return Err(Refused::TooManyChoices {
            max: max_choices,
            got: out.len(),
        });
    }
    out.sort_unstable();
    Ok(out)
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
                None => format!("r:{}", uuid::Uuid::new_v4().simple()),
            };
            (key, id_key.unwrap_or(address_key))
        }
    })
}

/// What a request asked for, to tell an idempotent retry from a key reused for another ballot.
pub fn fingerprint(poll_id: &str, choices: &[u32], voter: &str) -> String {
    let choice_text: Vec<String> = choices.iter().map(u32::to_string).collect();
    sha256_hex(&[poll_id.as_bytes(), choice_text.join(",").as_bytes(), voter.as_bytes()])
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

    fn opts() -> Vec<String> {
        vec!["Red".into(), "Green".into(), "Blue".into()]
    }

    #[test]
    fn choices_match_exactly_then_folded_and_are_bounded() {
        let c = |v: &[&str], max| match_choices(&opts(), max, &v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(c(&["Blue", " red "], 2), Ok(vec![0, 2]));
        assert_eq!(
            c(&["Pink"], 1),
            Err(Refused::UnknownOption {
                field: "option".into(),
                text: "Pink".into()
            })
        );
        assert_eq!(
            c(&["red", "RED"], 2),
            Err(Refused::DuplicateOption {
                field: "options[1]".into(),
                text: "RED".into()
            })
        );
        assert_eq!(c(&["Red", "Green"], 1), Err(Refused::TooManyChoices { max: 1, got: 2 }));
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
        let first = BallotRecord::new("p".into(), "k".into(), "v".into(), vec![0], Some("idem".into()));
        let again = BallotRecord::new("p".into(), "k".into(), "v".into(), vec![0], Some("idem".into()));
        let other = BallotRecord::new("p".into(), "k".into(), "v".into(), vec![1], Some("idem".into()));
        let plain = BallotRecord::new("p".into(), "k".into(), "v".into(), vec![0], None);
        assert_eq!(duplicate(&first, &again), Duplicate::Retry);
        assert_eq!(duplicate(&first, &other), Duplicate::KeyReused);
        assert_eq!(duplicate(&first, &plain), Duplicate::AlreadyVoted);
    }
}

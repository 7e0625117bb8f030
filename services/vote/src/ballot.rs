//! The vote service's records: a ballot as stored, and what storing it did.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
}

/// What happened to a ballot handed to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum CastOutcome {
    /// Stored durably and counted.
    Accepted(BallotRecord),
    /// A ballot with the same identity already exists; it is returned and nothing changed.
    Duplicate(BallotRecord),
}

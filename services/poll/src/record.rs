//! The poll service's records: a poll as stored, and a listing as the storage sees it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::contract::{DedupePolicy, PollStatus, ResultsVisibility, status_at};
use shared::internal::PollDefinition;
use utoipa::ToSchema;

/// A poll as stored by the poll service. Storage adapters map it to their own layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PollRecord {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub desc: String,
    pub options: Vec<String>,
    pub max_choices: u32,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub results: ResultsVisibility,
    pub dedupe: DedupePolicy,
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

impl PollRecord {
    /// The poll's status at `now`.
    pub fn status_at(&self, now: DateTime<Utc>) -> PollStatus {
        status_at(self.closes_at, self.closed_at, now)
    }
}

/// Which polls a listing returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
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

impl From<&PollRecord> for PollDefinition {
    fn from(p: &PollRecord) -> Self {
        Self {
            id: p.id.clone(),
            options: p.options.clone(),
            max_choices: p.max_choices,
            dedupe: p.dedupe,
            results: p.results,
            closes_at: p.closes_at,
            closed_at: p.closed_at,
        }
    }
}

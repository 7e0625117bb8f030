//! Who may see and do what with a poll: the id in the path, the admin token (the one secret that
//! changes a poll), and whether a caller sees the counts (`results`).

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use shared::contract::{PollStatus, ResultsVisibility, normalise_poll_id, sha256_hex};
use shared::http::bearer_token;
use shared::{Problem, ProblemKind};
use subtle::ConstantTimeEq;

use crate::record::PollRecord;

pub fn parse_id(id: &str) -> Result<String, Problem> {
    normalise_poll_id(id).ok_or_else(|| Problem::invalid("id", "must be a poll id: 24 hexadecimal characters"))
}

pub fn hash_token(token: &str) -> String {
    sha256_hex(&[b"admin-token", token.as_bytes()])
}

/// Whether the request carries this poll's admin token (constant-time comparison of hashes).
pub fn is_admin(p: &PollRecord, headers: &HeaderMap) -> bool {
    match (bearer_token(headers), &p.admin_token_hash) {
        (Some(token), Some(hash)) => bool::from(hash_token(token).as_bytes().ct_eq(hash.as_bytes())),
        _ => false,
    }
}

pub fn authorize(p: &PollRecord, headers: &HeaderMap) -> Result<(), Problem> {
    if bearer_token(headers).is_none() {
        return Err(Problem::unauthorized(
            "this operation needs `Authorization: Bearer <admin_token>`",
        ));
    }
    if p.admin_token_hash.is_none() {
        return Err(Problem::new(
            ProblemKind::Forbidden,
            "this poll predates admin tokens and cannot be changed",
        ));
    }
    if is_admin(p, headers) {
        Ok(())
    } else {
        Err(Problem::unauthorized("the admin token is not valid for this poll"))
    }
}

/// Whether the counts are shown to this caller.
pub fn results_visible(p: &PollRecord, now: DateTime<Utc>, voted: bool, admin: bool) -> bool {
    admin
        || match p.results {
            ResultsVisibility::Always => true,
            ResultsVisibility::AfterVote => voted,
            ResultsVisibility::AfterClose => p.status_at(now) == PollStatus::Closed,
        }
}

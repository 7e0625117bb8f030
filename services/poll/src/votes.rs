//! The poll service's view of the vote service: tallies (and whether the caller voted) through
//! `GET /internal/tallies`, and ballot purges after a poll is deleted.

use std::net::IpAddr;

use axum::http::HeaderMap;
use shared::Problem;
use shared::contract::{DedupePolicy, ResultsVisibility, Tally, VoterKind, voter_key};

use crate::record::PollRecord;
use shared::internal::{PeerClient, TalliesQuery, TalliesResponse};

/// Everything that may identify the caller as a voter.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    pub keys: Vec<String>,
    /// Whether the caller proved to be the poll's admin (sees results always).
    pub admin_of: Option<String>,
}

impl Viewer {
    pub fn new(addr: IpAddr, headers: &HeaderMap, voter_id: Option<&str>) -> Self {
        let mut keys = vec![voter_key(VoterKind::Address, &addr.to_string())];
        let header_id = headers.get("x-voter-id").and_then(|v| v.to_str().ok());
        for id in [voter_id, header_id].into_iter().flatten() {
            if shared::contract::validate_voter_id(id).is_ok() {
                keys.push(voter_key(VoterKind::VoterId, id));
            }
        }
        Self { keys, admin_of: None }
    }
}

/// The longest a ballot export may take.
const EXPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Clone)]
pub struct VoteClient {
    pub peer: PeerClient,
}

impl VoteClient {
    /// Tallies of `polls` in order, plus whether `viewer` voted on each: one call to the vote
    /// service, which needs nothing else to answer (each poll's dedupe comes with it).
    pub async fn tallies(&self, polls: &[&PollRecord], viewer: Option<&Viewer>) -> Result<Vec<(Tally, bool)>, Problem> {
        if polls.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = polls.iter().map(|p| p.id.as_str()).collect();
        let needs_voter = polls.iter().any(|p| p.results == ResultsVisibility::AfterVote);
        let voters = viewer
            .filter(|_| needs_voter)
            .map(|v| v.keys.as_slice())
            .unwrap_or_default();
        // Ballots of `ip`/`voter` dedupe polls are keyed by the voter key: the vote service finds
        // a voter's by its identity.
        let keyed: Vec<(&str, bool)> = polls
            .iter()
            .map(|p| (p.id.as_str(), p.dedupe != DedupePolicy::None))
            .collect();
        let req = self
            .peer
            .http()
            .get(self.peer.url("/internal/tallies"))
            .query(&TalliesQuery::new(&keyed, voters));
        let res = self
            .peer
            .send("/internal/tallies", req)
            .await
            .map_err(|e| self.peer.unavailable(e))?;
        if !res.status().is_success() {
            return Err(self.peer.unavailable(format!("tallies answered {}", res.status())));
        }
        let body: TalliesResponse = res.json().await.map_err(|e| self.peer.unavailable(e))?;
        if body.tallies.len() != polls.len() || body.tallies.iter().zip(&ids).any(|(t, id)| t.poll_id != *id) {
            return Err(self.peer.unavailable("tallies answer does not match the request"));
        }
        Ok(body
            .tallies
            .into_iter()
            .map(|t| {
                let voted = t.voted;
                (t.tally(), voted)
            })
            .collect())
    }

    /// The tally of one poll (caller-independent).
    pub async fn tally(&self, poll: &PollRecord) -> Result<Tally, Problem> {
        Ok(self
            .tallies(&[poll], None)
            .await?
            .pop()
            .map(|(t, _)| t)
            .unwrap_or_default())
    }

    /// Every stored ballot of the poll, as the vote service streams it (newline-delimited
    /// [`shared::internal::BallotLine`]s), read as it is consumed. A failure after the answer began
    /// ends the stream with an error.
    pub async fn ballots(
        &self,
        poll_id: &str,
    ) -> Result<impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Send + 'static, Problem>
    {
        use futures_util::TryStreamExt as _;
        let url = self.peer.url(&format!("/internal/polls/{poll_id}/ballots"));
        // The client's timeout bounds a whole request, body included: an export of a million
        // ballots takes longer than any call, so it gets a bound of its own.
        let req = self.peer.http().get(url).timeout(EXPORT_TIMEOUT);
        let res = self
            .peer
            .send("/internal/polls/{id}/ballots", req)
            .await
            .map_err(|e| self.peer.unavailable(e))?;
        if !res.status().is_success() {
            return Err(self
                .peer
                .unavailable(format!("the ballot export answered {}", res.status())));
        }
        Ok(res.bytes_stream().map_err(std::io::Error::other))
    }

    /// Deletes the ballots of a deleted poll. Best effort: a failure is logged (the vote service
    /// refuses new ballots for the poll either way, since the poll is gone).
    pub async fn purge(&self, poll_id: &str) {
        let url = self.peer.url(&format!("/internal/polls/{poll_id}/ballots"));
        match self
            .peer
            .send("/internal/polls/{id}/ballots", self.peer.http().delete(url))
            .await
        {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(poll_id, status = %r.status(), "ballot purge refused"),
            Err(e) => tracing::warn!(poll_id, error = %e, "ballot purge failed"),
        }
    }
}

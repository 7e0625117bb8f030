//! The internal service-to-service API (paths under `/internal/`, never routed by the ingress):
//! its wire types, and a client both services use to call the other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use crate::contract::{
    BallotChanges, DEFAULT_MAX_SCORE, DedupePolicy, PollStatus, ResultsVisibility, Schedule, Tally, VotingMethod,
};
use crate::health::{Dependency, Unhealthy};
use crate::metrics::{Metrics, PeerLabels};
use crate::problem::Problem;

/// What the vote service needs to know about a poll: `GET /internal/polls/{id}` on the poll service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PollDefinition {
    pub id: String,
    pub options: Vec<String>,
    /// Absent from a poll service that predates voting methods: `choice`.
    #[serde(default)]
    pub method: VotingMethod,
    /// Fewest options a `choice` or `ranked` ballot marks (absent: 1).
    #[serde(default = "one")]
    pub min_choices: u32,
    pub max_choices: u32,
    /// Highest score of a `score` poll (absent: the default).
    #[serde(default = "default_max_score")]
    pub max_score: u32,
    pub dedupe: DedupePolicy,
    pub results: ResultsVisibility,
    /// Absent from a poll service that predates ballot changes: allowed.
    #[serde(default)]
    pub changes: BallotChanges,
    /// Absent from a poll service that predates scheduled openings: open at once.
    #[serde(default)]
    pub opens_at: Option<DateTime<Utc>>,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
}

fn one() -> u32 {
    1
}

fn default_max_score() -> u32 {
    DEFAULT_MAX_SCORE
}

impl PollDefinition {
    pub fn status_at(&self, now: DateTime<Utc>) -> PollStatus {
        Schedule {
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            closed_at: self.closed_at,
        }
        .status_at(now)
    }
}

/// The query of `GET /internal/tallies?ids=a,b&keyed=1,0&voters=k1,k2` on the vote service: the
/// counts of a page of polls, and whether the caller voted on each. It carries everything the vote
/// service needs, so that it answers from its own store without calling the poll service back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TalliesQuery {
    /// The polls, comma-separated (at most [`MAX_TALLIES`]).
    pub ids: String,
    /// Per poll of `ids`, in order and comma-separated, `1` when its ballots are keyed by their
    /// voter (its dedupe is `ip` or `voter`, not `none`), else `0`: the vote service then looks a
    /// voter's ballot up by its identity alone. Absent: `0` for every poll, which is always
    /// correct, only costlier. Sent only with `voters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyed: Option<String>,
    /// The caller's voter keys, comma-separated (at most [`MAX_VOTER_KEYS`] are read): `voted`
    /// says whether any of them has a ballot on the poll. Absent: `voted` is `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voters: Option<String>,
}

/// Most polls in one [`TalliesQuery`].
pub const MAX_TALLIES: usize = 200;
/// Most voter keys of one [`TalliesQuery`] the vote service reads.
pub const MAX_VOTER_KEYS: usize = 4;

impl TalliesQuery {
    /// The query for `polls` (id, whether its ballots are keyed by voter) and the caller's voter
    /// keys (none: `voted` is not wanted).
    pub fn new(polls: &[(&str, bool)], voters: &[String]) -> Self {
        let ids: Vec<&str> = polls.iter().map(|(id, _)| *id).collect();
        let wanted = !voters.is_empty();
        let keyed: Vec<&str> = polls.iter().map(|(_, k)| if *k { "1" } else { "0" }).collect();
        Self {
            ids: ids.join(","),
            keyed: wanted.then(|| keyed.join(",")),
            voters: wanted.then(|| voters.join(",")),
        }
    }

    /// Whether each of the `n` polls of `ids` is keyed by voter (`Err`: why `keyed` is invalid).
    pub fn keyed_by_voter(&self, n: usize) -> Result<Vec<bool>, &'static str> {
        let Some(keyed) = self.keyed.as_deref() else {
            return Ok(vec![false; n]);
        };
        let flags: Vec<bool> = keyed
            .split(',')
            .map(|f| match f {
                "1" => Ok(true),
                "0" => Ok(false),
                _ => Err("must be `1` or `0` per poll"),
            })
            .collect::<Result<_, _>>()?;
        if flags.len() != n {
            return Err("must have one flag per poll of `ids`");
        }
        Ok(flags)
    }

    /// The voter keys (the first [`MAX_VOTER_KEYS`]).
    pub fn voter_keys(&self) -> Vec<String> {
        self.voters
            .as_deref()
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .take(MAX_VOTER_KEYS)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One poll's counts, an answer to a [`TalliesQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TallyView {
    pub poll_id: String,
    pub total: u64,
    pub by_option: Vec<u64>,
    /// `score` polls: the score sums per option (absent otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sums: Vec<u64>,
    /// `ranked` polls: ballots per distinct ranking (absent otherwise).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rankings: BTreeMap<String, u64>,
    /// Whether any of the given voter keys has a ballot on this poll.
    pub voted: bool,
}

impl TallyView {
    pub fn new(poll_id: String, t: Tally, voted: bool) -> Self {
        Self {
            poll_id,
            total: t.total,
            by_option: t.by_option,
            sums: t.sums,
            rankings: t.rankings,
            voted,
        }
    }

    /// The counts without the poll id and `voted`.
    pub fn tally(self) -> Tally {
        Tally {
            total: self.total,
            by_option: self.by_option,
            sums: self.sums,
            rankings: self.rankings,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TalliesResponse {
    pub tallies: Vec<TallyView>,
}

/// One line of `GET /internal/polls/{id}/ballots` on the vote service (newline-delimited JSON,
/// streamed): a stored ballot as an export shows it. Never its voter key, voter hash or
/// idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BallotLine {
    pub id: String,
    pub created_at: DateTime<Utc>,
    /// Chosen option indices, ascending (`ranked`: the first preference; `score`: the options
    /// scored above 0).
    pub choices: Vec<u32>,
    /// `ranked` polls: the ranking, best first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<Vec<u32>>,
    /// `score` polls: every option's score, in option order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<u32>>,
}

/// How long callers should wait before retrying when the other service is unreachable.
pub const PEER_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An HTTP client for the other service. Failures become 503 problems naming the service. Each
/// call made with [`PeerClient::send`] is a client span, carries the current request's
/// `X-Request-Id` and W3C trace context, and is measured (`pollvote_peer_request_duration_seconds`).
#[derive(Clone)]
pub struct PeerClient {
    name: &'static str,
    base: String,
    http: reqwest::Client,
    metrics: Option<Arc<Metrics>>,
}

/// The HTTP client for the other service could not be built (a start-up error).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for {name}")]
pub struct PeerClientError {
    pub name: &'static str,
    #[source]
    pub source: reqwest::Error,
}

impl PeerClient {
    pub fn new(name: &'static str, base: &str, timeout: Duration) -> Result<Self, PeerClientError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_millis(500)))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|source| PeerClientError { name, source })?;
        Ok(Self {
            name,
            base: base.trim_end_matches('/').to_owned(),
            http,
            metrics: None,
        })
    }

    /// Measures every call in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The peer's short name for metrics and spans (`poll`, `vote`).
    fn short_name(&self) -> &'static str {
        self.name.split(' ').next().unwrap_or(self.name)
    }

    /// Sends `req` to the other service; `route` is the internal route's template (a metric
    /// label and the span's name, never the raw path).
    pub async fn send(
        &self,
        route: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, reqwest::Error> {
        use tracing::Instrument as _;
        let mut request = req.build()?;
        let method = request.method().clone();
        let span = if crate::telemetry::span_wanted() {
            tracing::info_span!(
                "peer",
                otel.name = %format_args!("{method} {route}"),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                peer.service = self.short_name(),
                http.request.method = %method,
                url.template = route,
                server.address = request.url().host_str().unwrap_or(""),
                http.response.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        crate::telemetry::inject(&span, request.headers_mut());
        let started = Instant::now();
        let res = self.http.execute(request).instrument(span.clone()).await;
        let outcome = match &res {
            Ok(r) if r.status().is_success() => "2xx",
            Ok(r) if r.status().is_client_error() => "4xx",
            Ok(r) if r.status().is_server_error() => "5xx",
            Ok(_) => "other",
            Err(e) if e.is_timeout() => "timeout",
            Err(e) if e.is_connect() => "connect",
            Err(_) => "error",
        };
        if let Ok(r) = &res {
            span.record("http.response.status_code", r.status().as_u16());
        }
        if !matches!(outcome, "2xx" | "4xx") {
            span.record("otel.status_code", "ERROR");
        }
        if let Some(m) = &self.metrics {
            m.peer_duration
                .get_or_create(&PeerLabels {
                    peer: self.short_name(),
                    route,
                    outcome,
                })
                .observe(started.elapsed().as_secs_f64());
        }
        res
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The problem to answer when the peer failed.
    pub fn unavailable(&self, err: impl std::fmt::Display) -> Problem {
        tracing::warn!(peer = self.name, error = %err, "call to the other service failed");
        Problem::unavailable(
            format!("the {} is unavailable; retry later", self.name),
            PEER_RETRY_AFTER,
        )
    }

    /// GETs `path` (of route template `route`) and decodes JSON; `Ok(None)` on 404.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        route: &'static str,
        path: &str,
    ) -> Result<Option<T>, Problem> {
        let res = self
            .send(route, self.http.get(self.url(path)))
            .await
            .map_err(|e| self.unavailable(e))?;
        match res.status() {
            s if s.is_success() => res.json::<T>().await.map(Some).map_err(|e| self.unavailable(e)),
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.unavailable(format!("answered {s}"))),
        }
    }
}

#[async_trait]
impl Dependency for PeerClient {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn check(&self) -> Result<(), Unhealthy> {
        let res = self.http.get(self.url("/healthz")).send().await.map_err(|e| {
            Unhealthy::from(if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "connection refused or unreachable"
            } else {
                "request failed"
            })
        })?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", res.status()).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_query_carries_each_polls_key_and_the_voters() {
        let voters = vec!["ip:1.2.3.4".to_owned(), "id:alice".to_owned()];
        let q = TalliesQuery::new(&[("a", true), ("b", false), ("c", true)], &voters);
        assert_eq!(q.ids, "a,b,c");
        assert_eq!(q.keyed.as_deref(), Some("1,0,1"));
        assert_eq!(q.keyed_by_voter(3), Ok(vec![true, false, true]));
        assert_eq!(q.voter_keys(), voters);
        assert!(q.keyed_by_voter(2).is_err(), "one flag per poll");

        // Without voters nothing but the ids is sent, and nothing is keyed.
        let q = TalliesQuery::new(&[("a", true)], &[]);
        assert_eq!((q.keyed.as_deref(), q.voters.as_deref()), (None, None));
        assert_eq!(q.keyed_by_voter(1), Ok(vec![false]));
        assert!(q.voter_keys().is_empty());

        let q = TalliesQuery {
            ids: "a".into(),
            keyed: Some("yes".into()),
            voters: Some("k1,,k2,k3,k4,k5".into()),
        };
        assert!(q.keyed_by_voter(1).is_err());
        assert_eq!(q.voter_keys(), ["k1", "k2", "k3", "k4"]);
    }
}

//! The internal service-to-service API (paths under `/internal/`, never routed by the ingress):
//! its wire types, and a client both services use to call the other.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{DedupePolicy, PollRecord, PollStatus, ResultsVisibility};
use crate::http::Dependency;
use crate::problem::Problem;

/// What the vote service needs to know about a poll: `GET /internal/polls/{id}` on the poll service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PollDefinition {
    pub id: String,
    pub options: Vec<String>,
    pub max_choices: u32,
    pub dedupe: DedupePolicy,
    pub results: ResultsVisibility,
    pub closes_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
}

impl PollDefinition {
    pub fn status_at(&self, now: DateTime<Utc>) -> PollStatus {
        if self.closed_at.is_some() || self.closes_at.is_some_and(|t| t <= now) {
            PollStatus::Closed
        } else {
            PollStatus::Open
        }
    }
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

/// One poll's counts: `GET /internal/tallies?ids=a,b&voters=k1,k2` on the vote service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TallyView {
    pub poll_id: String,
    pub total: u64,
    pub by_option: Vec<u64>,
    /// Whether any of the given voter keys has a ballot on this poll.
    pub voted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TalliesResponse {
    pub tallies: Vec<TallyView>,
}

/// How long callers should wait before retrying when the other service is unreachable.
pub const PEER_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An HTTP client for the other service. Failures become 503 problems naming the service.
#[derive(Clone)]
pub struct PeerClient {
    name: &'static str,
    base: String,
    http: reqwest::Client,
}

impl PeerClient {
    pub fn new(name: &'static str, base: &str, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_millis(500)))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the HTTP client for {name}: {e}"))?;
        Ok(Self {
            name,
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
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

    /// GETs `path` and decodes JSON; `Ok(None)` on 404.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<Option<T>, Problem> {
        let res = self
            .http
            .get(self.url(path))
            .send()
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

    async fn check(&self) -> Result<(), String> {
        let res = self.http.get(self.url("/healthz")).send().await.map_err(|e| {
            if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "connection refused or unreachable".to_owned()
            } else {
                "request failed".to_owned()
            }
        })?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", res.status()))
        }
    }
}

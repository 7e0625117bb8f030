//! The vote service's cache of poll definitions, read from the poll service's internal endpoint.
//!
//! Entries live `ttl` (under a second, so a poll closed or deleted through the poll service stops
//! accepting ballots within one second; `closes_at` itself is checked on every ballot), at most
//! [`CAPACITY`] of them (moka evicts the least useful first). Concurrent misses for one poll share
//! a single fetch. Unknown polls are cached too; failures are not.

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;
use shared::Problem;
use shared::internal::{PeerClient, PollDefinition};
use shared::metrics::Metrics;

pub const CAPACITY: u64 = 50_000;

pub struct Catalog {
    peer: PeerClient,
    cache: Cache<String, Option<Arc<PollDefinition>>>,
    metrics: Option<Arc<Metrics>>,
}

impl Catalog {
    pub fn new(peer: PeerClient, ttl: Duration) -> Self {
        let cache = Cache::builder().max_capacity(CAPACITY).time_to_live(ttl).build();
        Self {
            peer,
            cache,
            metrics: None,
        }
    }

    /// Counts hits and misses (`pollvote_cache_requests_total{cache="poll_catalog"}`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The poll's definition, `None` when the poll does not exist; 503 when the poll service
    /// cannot answer. A miss is the one caller whose fetch filled the entry (the coalescing of
    /// `try_get_with`); callers that found it, or waited for that fetch, are hits.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<PollDefinition>>, Problem> {
        let fetch = async {
            let path = format!("/internal/polls/{id}");
            let found = self
                .peer
                .get_json::<PollDefinition>("/internal/polls/{id}", &path)
                .await?;
            Ok(found.map(Arc::new))
        };
        let found = self.cache.entry_by_ref(id).or_try_insert_with(fetch).await;
        if let Some(m) = &self.metrics {
            m.cache_lookup("poll_catalog", matches!(&found, Ok(e) if !e.is_fresh()));
        }
        found.map(|e| e.into_value()).map_err(|e: Arc<Problem>| (*e).clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Json;
    use axum::extract::{Path, State};
    use shared::contract::{DedupePolicy, ResultsVisibility};

    use super::*;

    /// A poll service whose definitions take 100 ms to read; counts the reads.
    async fn poll_service() -> (PeerClient, Arc<AtomicUsize>) {
        let reads = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(
                "/internal/polls/{id}",
                axum::routing::get(
                    |State(reads): State<Arc<AtomicUsize>>, Path(id): Path<String>| async move {
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Json(PollDefinition {
                            id,
                            options: vec!["a".into(), "b".into()],
                            method: shared::contract::VotingMethod::Choice,
                            min_choices: 1,
                            max_choices: 1,
                            max_score: shared::contract::DEFAULT_MAX_SCORE,
                            dedupe: DedupePolicy::None,
                            changes: shared::contract::BallotChanges::Allowed,
                            results: ResultsVisibility::Always,
                            opens_at: None,
                            closes_at: None,
                            closed_at: None,
                        })
                    },
                ),
            )
            .with_state(reads.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (
            PeerClient::new("poll service", &base, Duration::from_secs(5)).expect("client"),
            reads,
        )
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch_and_entries_expire() {
        let (peer, reads) = poll_service().await;
        let metrics = Arc::new(Metrics::new("vote"));
        let catalog = Catalog::new(peer, Duration::from_secs(1)).with_metrics(metrics.clone());
        let gets = (0..20).map(|_| catalog.get("p1"));
        for got in futures_util::future::join_all(gets).await {
            assert_eq!(got.expect("answered").expect("known").id, "p1");
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1, "20 concurrent gets, one fetch");
        let text = metrics.encode();
        for (result, n) in [("hit", 19), ("miss", 1)] {
            assert!(
                text.lines().any(|l| l.contains(r#"cache="poll_catalog""#)
                    && l.contains(&format!(r#"result="{result}""#))
                    && l.ends_with(&format!(" {n}"))),
                "{result} {n}: {text}"
            );
        }
        catalog.get("p1").await.expect("answered");
        assert_eq!(reads.load(Ordering::SeqCst), 1, "fresh: no fetch");
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        catalog.get("p1").await.expect("answered");
        assert_eq!(reads.load(Ordering::SeqCst), 2, "expired after the TTL: fetched again");
    }
}

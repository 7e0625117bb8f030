//! Storage calls made observable: the services wrap their store in [`poll_store`] /
//! [`ballot_store`], so that every call is a client span (`db.system.name`, `db.namespace`,
//! `db.collection.name`, `db.operation.name`) when tracing is on, and is measured in
//! `pollvote_db_operation_duration_seconds{operation, outcome}` always (`ok`, `unavailable`,
//! `error`, or `cancelled` when the caller gave up waiting).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::Instrument as _;

use crate::config::{Backend, Config};
use crate::domain::{BallotRecord, CastOutcome, PollQuery, PollRecord, Tally};
use crate::metrics::{DbLabels, Metrics};
use crate::store::{BallotStore, DynBallotStore, DynPollStore, PollStore, StoreError, StoreResult};

struct Observed {
    metrics: Arc<Metrics>,
    system: &'static str,
    namespace: String,
}

impl Observed {
    fn new(config: &Config, metrics: Arc<Metrics>, default_db: &str) -> Self {
        let system = match config.storage.effective_backend() {
            Backend::Mongodb => "mongodb",
            _ => "redb",
        };
        let namespace = if config.storage.database.is_empty() {
            default_db.to_owned()
        } else {
            config.storage.database.clone()
        };
        Self {
            metrics,
            system,
            namespace,
        }
    }

    async fn call<T>(
        &self,
        collection: &'static str,
        operation: &'static str,
        fut: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let span = if crate::telemetry::span_wanted() {
            tracing::info_span!(
                "db",
                otel.name = %format_args!("{operation} {collection}"),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                db.system.name = self.system,
                db.namespace = %self.namespace,
                db.collection.name = collection,
                db.operation.name = operation,
            )
        } else {
            tracing::Span::none()
        };
        let mut pending = Pending {
            metrics: &self.metrics,
            operation,
            started: Instant::now(),
            done: false,
        };
        let out = fut.instrument(span.clone()).await;
        let outcome = match &out {
            Ok(_) => "ok",
            Err(StoreError::Internal(_)) => "error",
            Err(_) => "unavailable",
        };
        if outcome != "ok" {
            span.record("otel.status_code", "ERROR");
        }
        pending.finish(outcome);
        out
    }
}

/// Records a storage call's duration once: with its outcome when it completes, as `cancelled`
/// when its caller gave up on it (a timeout, a client that went away).
struct Pending<'a> {
    metrics: &'a Metrics,
    operation: &'static str,
    started: Instant,
    done: bool,
}

impl Pending<'_> {
    fn finish(&mut self, outcome: &'static str) {
        self.done = true;
        self.metrics
            .db_duration
            .get_or_create(&DbLabels {
                operation: self.operation,
                outcome,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.finish("cancelled");
        }
    }
}

struct ObservedPolls {
    inner: DynPollStore,
    o: Observed,
}

/// The poll store, observed.
pub fn poll_store(inner: DynPollStore, config: &Config, metrics: Arc<Metrics>) -> DynPollStore {
    Arc::new(ObservedPolls {
        inner,
        o: Observed::new(config, metrics, "poll"),
    })
}

#[async_trait]
impl PollStore for ObservedPolls {
    async fn create(&self, poll: &PollRecord) -> StoreResult<()> {
        self.o.call("polls", "create", self.inner.create(poll)).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        self.o.call("polls", "get", self.inner.get(id)).await
    }
    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        self.o.call("polls", "list", self.inner.list(query)).await
    }
    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool> {
        self.o
            .call("polls", "replace", self.inner.replace(poll, expected_revision))
            .await
    }
    async fn delete(&self, id: &str) -> StoreResult<bool> {
        self.o.call("polls", "delete", self.inner.delete(id)).await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.o.call("polls", "ping", self.inner.ping()).await
    }
}

struct ObservedBallots {
    inner: DynBallotStore,
    o: Observed,
}

/// The ballot store, observed.
pub fn ballot_store(inner: DynBallotStore, config: &Config, metrics: Arc<Metrics>) -> DynBallotStore {
    Arc::new(ObservedBallots {
        inner,
        o: Observed::new(config, metrics, "vote"),
    })
}

#[async_trait]
impl BallotStore for ObservedBallots {
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome> {
        self.o.call("ballots", "cast", self.inner.cast(ballot)).await
    }
    async fn tally(&self, poll_id: &str) -> StoreResult<Tally> {
        self.o.call("ballots", "tally", self.inner.tally(poll_id)).await
    }
    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.o.call("ballots", "tallies", self.inner.tallies(poll_ids)).await
    }
    async fn has_voted(&self, poll_id: &str, voter: &str, keyed_by_voter: bool) -> StoreResult<bool> {
        self.o
            .call(
                "ballots",
                "has_voted",
                self.inner.has_voted(poll_id, voter, keyed_by_voter),
            )
            .await
    }
    async fn recount(&self, poll_id: &str) -> StoreResult<Tally> {
        self.o.call("ballots", "recount", self.inner.recount(poll_id)).await
    }
    async fn recount_many(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        self.o
            .call("ballots", "recount_many", self.inner.recount_many(poll_ids))
            .await
    }
    async fn purge(&self, poll_id: &str) -> StoreResult<u64> {
        self.o.call("ballots", "purge", self.inner.purge(poll_id)).await
    }
    async fn repair(&self, poll_id: &str) -> StoreResult<crate::store::Repair> {
        self.o.call("ballots", "repair", self.inner.repair(poll_id)).await
    }
    async fn repair_since(
        &self,
        since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> StoreResult<Vec<crate::store::Repair>> {
        self.o
            .call("ballots", "repair_since", self.inner.repair_since(since))
            .await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.o.call("ballots", "ping", self.inner.ping()).await
    }
}

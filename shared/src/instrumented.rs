//! Storage calls made observable: each service wraps its store so that every call is a client span (`db.system.name`, `db.namespace`,
//! `db.collection.name`, `db.operation.name`) when tracing is on, and is measured in
//! `pollvote_db_operation_duration_seconds{operation, outcome}` always (`ok`, `unavailable`,
//! `error`, or `cancelled` when the caller gave up waiting).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument as _;

use crate::config::{Backend, Config};
use crate::metrics::{DbLabels, Metrics};
use crate::storage::{StoreError, StoreResult};

pub struct Observed {
    metrics: Arc<Metrics>,
    system: &'static str,
    namespace: String,
}

impl Observed {
    pub fn new(config: &Config, metrics: Arc<Metrics>, default_db: &str) -> Self {
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

    pub async fn call<T>(
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

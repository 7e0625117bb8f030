//! Operational endpoints shared by both services: `/`, `/healthz`, `/readyz`, `/health/deep`,
//! `/metrics`. Liveness is in-process only; readiness is "initialised and not draining" and
//! deliberately ignores the database, so that an outage shared by every replica does not empty
//! the Service (requests then get our 503s instead of the ingress's 502s); `/health/deep` checks
//! every dependency for monitoring.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use crate::health::{Dependency, Readiness};
use crate::metrics::Metrics;
use crate::problem::{Problem, ProblemBody};

/// What the operational endpoints need.
pub struct Ops {
    pub service: &'static str,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub dependencies: Vec<Arc<dyn Dependency>>,
}

#[derive(Serialize, ToSchema)]
pub struct Status {
    #[schema(example = "poll")]
    pub service: String,
    #[schema(example = "ok")]
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct DependencyState {
    /// `up` or `down`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub latency_ms: u64,
}

#[derive(Serialize, ToSchema)]
pub struct DeepHealth {
    pub service: String,
    /// `ok` when every dependency is up and the service is ready, else `degraded`.
    pub status: String,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_detail: Option<String>,
    pub dependencies: BTreeMap<String, DependencyState>,
}

fn ok(service: &str) -> Json<Status> {
    Json(Status {
        service: service.to_owned(),
        status: "ok".into(),
    })
}

/// Probe compatibility with the predecessor: always 200 while the process serves HTTP.
#[utoipa::path(get, path = "/", tag = "operations", responses((status = 200, body = Status)))]
async fn root(State(ops): State<Arc<Ops>>) -> Json<Status> {
    ok(ops.service)
}

/// Liveness: in-process only.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Status)))]
async fn healthz(State(ops): State<Arc<Ops>>) -> Json<Status> {
    ok(ops.service)
}

/// Readiness: initialised (config valid, secret loaded, storage client built) and not draining.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, body = Status),
    (status = 503, body = ProblemBody, content_type = "application/problem+json"),
))]
async fn readyz(State(ops): State<Arc<Ops>>) -> Response {
    match ops.readiness.state() {
        Ok(()) => ok(ops.service).into_response(),
        Err(why) => Problem::unavailable(format!("not ready ({why})"), Duration::from_secs(1)).into_response(),
    }
}

/// Each dependency's state, for monitoring (503 when any is down).
#[utoipa::path(get, path = "/health/deep", tag = "operations", responses(
    (status = 200, body = DeepHealth),
    (status = 503, body = DeepHealth),
))]
async fn deep(State(ops): State<Arc<Ops>>) -> Response {
    let checks = ops.dependencies.iter().map(|d| {
        let d = Arc::clone(d);
        async move {
            let started = Instant::now();
            let result = match tokio::time::timeout(Duration::from_secs(3), d.check()).await {
                Ok(r) => r,
                Err(_) => Err("no answer within 3 s".into()),
            };
            let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let state = match result {
                Ok(()) => DependencyState {
                    status: "up".into(),
                    detail: None,
                    latency_ms,
                },
                Err(e) => DependencyState {
                    status: "down".into(),
                    detail: Some(e.0),
                    latency_ms,
                },
            };
            (d.name().to_owned(), state)
        }
    });
    let dependencies: BTreeMap<_, _> = futures_util::future::join_all(checks).await.into_iter().collect();
    let ready = ops.readiness.state();
    let healthy = ready.is_ok() && dependencies.values().all(|d| d.status == "up");
    let body = DeepHealth {
        service: ops.service.to_owned(),
        status: if healthy { "ok" } else { "degraded" }.into(),
        ready: ready.is_ok(),
        ready_detail: ready.err().map(|r| r.0),
        dependencies,
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut res = (status, Json(body)).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Prometheus metrics: OpenMetrics 1.0 when `Accept` asks for `application/openmetrics-text`
/// (Prometheus does), the Prometheus text format 0.0.4 otherwise.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, content(
        (String = "text/plain"),
        (String = "application/openmetrics-text"),
    ))
))]
async fn metrics(State(ops): State<Arc<Ops>>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (body, content_type) = ops.metrics.encode_for(accept);
    let mut res = body.into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// The operational routes, documented.
pub fn router(ops: Arc<Ops>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(root))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(deep))
        .routes(routes!(metrics))
        .with_state(ops)
}

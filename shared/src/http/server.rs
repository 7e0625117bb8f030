//! Assembles a service's router with the shared middleware stack, docs and ops routes, and runs it
//! with graceful shutdown.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use super::middleware::{self, ClientIpPolicy, WriteLimiter};
use super::ops::{self, Ops, Readiness};
use crate::config::Config;
use crate::problem::Problem;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the final router: API routes + ops routes + `/openapi.json` + `/docs`, behind the
/// shared middleware. `describe` fills in the document's info before it is served.
pub fn assemble(api: OpenApiRouter, ops: Arc<Ops>, config: &Config, describe: impl FnOnce(&mut OpenApi)) -> Router {
    let metrics = ops.metrics.clone();
    let (router, mut openapi) = api.merge(ops::router(ops)).split_for_parts();
    describe(&mut openapi);
    let mut router = router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
        .fallback(|| async { Problem::not_found("no such resource") });

    let server = &config.server;
    if let Some(limiter) = WriteLimiter::new(config.rate_limit.writes_per_minute) {
        let sweeper = Arc::downgrade(&limiter);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                match sweeper.upgrade() {
                    Some(l) => l.forget_idle(),
                    None => break,
                }
            }
        });
        router = router.layer(axum::middleware::from_fn_with_state(limiter, middleware::rate_limit));
    }
    let front_door: Arc<str> = Arc::from(server.front_door_id.trim());
    router
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(ClientIpPolicy::from_config(server)),
            middleware::client_addr,
        ))
        .layer(axum::middleware::from_fn_with_state(front_door, middleware::front_door))
        .layer(DefaultBodyLimit::max(server.body_limit_bytes))
        .layer(axum::middleware::from_fn_with_state(
            middleware::Timeouts {
                public: Duration::from_millis(server.request_timeout_ms),
                internal: Duration::from_millis(server.internal_request_timeout_ms),
            },
            middleware::timeout,
        ))
        .layer(CompressionLayer::new())
        .layer(cors(&server.cors_allowed_origins))
        .layer(axum::middleware::from_fn(middleware::problem_for_errors))
        .layer(CatchPanicLayer::custom(middleware::panic_response))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(axum::middleware::from_fn_with_state(metrics, middleware::observe))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-voter-id"),
            REQUEST_ID,
            HeaderName::from_static("traceparent"),
            HeaderName::from_static("tracestate"),
        ])
        .expose_headers([header::LOCATION, header::LINK, header::RETRY_AFTER, REQUEST_ID])
        .max_age(Duration::from_secs(600))
        .vary([header::ORIGIN])
        .allow_credentials(false)
}

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    router: Router,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
    drain: Duration,
}

impl Server {
    /// Binds `host:port` (port 0 picks a free one).
    pub async fn bind(
        host: &str,
        port: u16,
        router: Router,
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind((host, port)).await?;
        Ok(Self {
            listener,
            router,
            readiness,
            shutdown,
            drain,
        })
    }

    /// A server on `listener`, bound already (tests bind port 0 first and know the address before
    /// the service is built: no window in which something else could take the port).
    pub fn from_listener(
        listener: std::net::TcpListener,
        router: Router,
        readiness: Arc<Readiness>,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener: TcpListener::from_std(listener)?,
            router,
            readiness,
            shutdown,
            drain,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, marks itself not ready and
    /// lets in-flight requests finish, for at most the drain timeout.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self {
            listener,
            router,
            readiness,
            shutdown,
            drain,
        } = self;
        let signal = shutdown.clone();
        let serve = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                signal.cancelled().await;
                readiness.set_draining();
                tracing::info!("shutting down: draining in-flight requests");
            })
            .into_future();
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => r,
            () = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
                tracing::warn!(drain_ms = drain.as_millis() as u64, "drain timeout reached; closing remaining connections");
                Ok(())
            }
        }
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
}

//! Cross-cutting request handling: client address, Front Door check, write rate limits,
//! metrics, and turning every non-problem error response into a problem document.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::extract::ClientAddr;
use crate::config::{ClientIpSource, ServerConfig};
use crate::metrics::{HttpLabels, Metrics};
use crate::problem::{PROBLEM_JSON, Problem, ProblemKind};
use crate::telemetry::{self, RequestContext};
use tracing::Instrument as _;

/// Paths that answer without the Front Door header: probes, metrics and service-to-service calls.
pub fn is_exempt_path(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/health/deep" | "/metrics") || path.starts_with("/internal/")
}

/// How the client address is found.
#[derive(Debug, Clone)]
pub struct ClientIpPolicy {
    pub source: ClientIpSource,
    pub hops: usize,
}

impl ClientIpPolicy {
    pub fn from_config(c: &ServerConfig) -> Self {
        Self {
            source: c.client_ip_source,
            hops: c.trusted_proxy_hops.max(1),
        }
    }

    /// The client address: from the configured header when present and valid, else the peer.
    pub fn resolve(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        let from_header = match self.source {
            ClientIpSource::Peer => None,
            ClientIpSource::XAzureClientip => headers
                .get("x-azure-clientip")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse().ok()),
            ClientIpSource::XForwardedFor => {
                // Proxies append; the client is `hops` entries from the right. Several headers
                // are one list, in order.
                let entries: Vec<&str> = headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                entries
                    .len()
                    .checked_sub(self.hops)
                    .and_then(|i| entries.get(i))
                    .and_then(|s| parse_addr(s))
            }
        };
        from_header.unwrap_or(peer)
    }
}

fn parse_addr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

pub async fn client_addr(State(policy): State<Arc<ClientIpPolicy>>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let addr = policy.resolve(req.headers(), peer);
    req.extensions_mut().insert(ClientAddr(addr));
    next.run(req).await
}

/// Rejects requests that did not come through our Front Door, when an id is configured.
pub async fn front_door(State(id): State<Arc<str>>, req: Request, next: Next) -> Response {
    if id.is_empty() || is_exempt_path(req.uri().path()) {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get("x-azure-fdid")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == &*id);
    if ok {
        next.run(req).await
    } else {
        Problem::new(
            ProblemKind::Forbidden,
            "requests must come through the configured Front Door",
        )
        .into_response()
    }
}

/// Per-client limit on writes (POST, PUT, PATCH, DELETE under `/api/`).
pub struct WriteLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl WriteLimiter {
    /// `None` when `per_minute` is 0 (limiting off).
    pub fn new(per_minute: u32) -> Option<Arc<Self>> {
        let n = NonZeroU32::new(per_minute)?;
        Some(Arc::new(Self {
            limiter: RateLimiter::keyed(Quota::per_minute(n).allow_burst(n)),
        }))
    }

    /// Ok, or how long to wait.
    pub fn check(&self, addr: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&addr)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets clients whose budget is full again, so the table does not grow without bound.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

pub async fn rate_limit(State(limiter): State<Arc<WriteLimiter>>, req: Request, next: Next) -> Response {
    let is_write = matches!(
        *req.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    if is_write
        && req.uri().path().starts_with("/api/")
        && let Some(ClientAddr(addr)) = req.extensions().get::<ClientAddr>().copied()
        && let Err(wait) = limiter.check(addr)
    {
        return Problem::too_many_requests(wait).into_response();
    }
    next.run(req).await
}

/// Every request: a `request` span (a child of the caller's `traceparent`), the request's context
/// for calls to the other service ([`crate::telemetry::REQUEST`]), the HTTP duration metric, and
/// one INFO access log line (target `access`): method, matched route, status, latency and request
/// id; in JSON logs also `trace_id` and `span_id`. Never the query string or any header value
/// other than the request id.
pub async fn observe(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        request_id = %request_id,
    );
    let (local, sampled) = if telemetry::tracing_enabled() {
        telemetry::set_remote_parent(&span, req.headers());
        (None, telemetry::is_sampled(&span))
    } else {
        (Some(telemetry::local_trace(req.headers())), false)
    };
    let context = RequestContext {
        request_id,
        local,
        sampled,
    };
    let res = telemetry::REQUEST
        .scope(context.clone(), next.run(req).instrument(span.clone()))
        .await;
    let status = res.status().as_u16();
    let latency = started.elapsed();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    metrics
        .http_duration
        .get_or_create(&HttpLabels {
            http_request_method: method.as_str().to_owned(),
            http_route: route.clone(),
            http_response_status_code: status,
        })
        .observe(latency.as_secs_f64());
    telemetry::REQUEST.sync_scope(context, || {
        let _entered = span.enter();
        tracing::info!(
            target: "access",
            method = %method,
            route = %route,
            status,
            latency_ms = latency.as_micros() as f64 / 1000.0,
            request_id = %telemetry::REQUEST.with(|r| r.request_id.clone()),
            "request"
        );
    });
    res
}

/// Any error response without a JSON body (unknown route, wrong method, timeout, framework
/// rejections) becomes a problem document, keeping its status and headers such as `Allow`.
/// JSON error bodies are the handlers' own (problems, `/health/deep`) and pass unchanged.
/// Request deadlines: `public` for every route but `/internal/`, whose operator calls (an audit
/// or a repair of a poll with a million ballots) get `internal`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub public: Duration,
    pub internal: Duration,
}

/// Answers 503 when the handler has not answered within the route's deadline (the body is then
/// turned into a problem by [`problem_for_errors`]).
pub async fn timeout(State(t): State<Timeouts>, req: Request, next: Next) -> Response {
    let limit = if req.uri().path().starts_with("/internal/") {
        t.internal
    } else {
        t.public
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

pub async fn problem_for_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON) || v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let (parts, _) = res.into_parts();
    let problem = match status {
        StatusCode::NOT_FOUND => Problem::not_found("no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => Problem::new(
            ProblemKind::MethodNotAllowed,
            "this resource does not support that method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => Problem::new(ProblemKind::BodyTooLarge, "the request body is too large"),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
            Problem::unavailable("the request took too long", Duration::from_secs(1))
        }
        s if s.is_server_error() => Problem::internal(format!("a layer answered {s} without a body")),
        s => Problem::new(
            ProblemKind::ClientError(s),
            s.canonical_reason().unwrap_or("the request was refused"),
        ),
    };
    let mut out = problem.into_response();
    let status = out.status();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH && !out.headers().contains_key(name) {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    *out.status_mut() = status;
    out
}

/// The response for a panicking handler: a generic 500 problem (the panic is logged).
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let msg = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    Problem::internal(format!("handler panicked: {msg}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn client_address_comes_only_from_the_configured_source() {
        let peer: IpAddr = "10.0.0.9".parse().expect("ip");
        let spoofed = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4"), ("x-azure-clientip", "5.5.5.5")]);
        let peer_only = ClientIpPolicy {
            source: ClientIpSource::Peer,
            hops: 1,
        };
        assert_eq!(
            peer_only.resolve(&spoofed, peer),
            peer,
            "headers are ignored unless configured"
        );
        let xff = ClientIpPolicy {
            source: ClientIpSource::XForwardedFor,
            hops: 1,
        };
        assert_eq!(
            xff.resolve(&spoofed, peer),
            "1.2.3.4".parse::<IpAddr>().expect("ip"),
            "rightmost hop"
        );
        let xff2 = ClientIpPolicy {
            source: ClientIpSource::XForwardedFor,
            hops: 2,
        };
        assert_eq!(xff2.resolve(&spoofed, peer), "6.6.6.6".parse::<IpAddr>().expect("ip"));
        let xff3 = ClientIpPolicy {
            source: ClientIpSource::XForwardedFor,
            hops: 3,
        };
        assert_eq!(
            xff3.resolve(&spoofed, peer),
            peer,
            "too few entries falls back to the peer"
        );
        let azure = ClientIpPolicy {
            source: ClientIpSource::XAzureClientip,
            hops: 1,
        };
        assert_eq!(azure.resolve(&spoofed, peer), "5.5.5.5".parse::<IpAddr>().expect("ip"));
        assert_eq!(azure.resolve(&headers(&[("x-azure-clientip", "junk")]), peer), peer);
    }

    #[test]
    fn write_limiter_allows_the_quota_then_says_how_long_to_wait() {
        let limiter = WriteLimiter::new(3).expect("enabled");
        let a: IpAddr = "1.1.1.1".parse().expect("ip");
        let b: IpAddr = "2.2.2.2".parse().expect("ip");
        for _ in 0..3 {
            assert!(limiter.check(a).is_ok());
        }
        let wait = limiter.check(a).expect_err("fourth write in a minute");
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(limiter.check(b).is_ok(), "limits are per client");
        assert!(WriteLimiter::new(0).is_none(), "0 turns limiting off");
    }
}

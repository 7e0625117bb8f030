//! Logging and tracing: one `tracing` subscriber with an `EnvFilter` (`RUST_LOG` wins over
//! `log.level`) and a JSON or human format, plus OpenTelemetry traces exported over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! Without an endpoint there is no OpenTelemetry layer and no exporter at all; W3C trace context
//! still flows: a request keeps the caller's `traceparent` trace id (or gets a new one), has a span
//! id of its own, and both appear in its log lines and in the `traceparent` sent to the other
//! service. With an endpoint the ids are the OpenTelemetry spans' own.

use std::fmt::Write as _;
use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogConfig, LogFormat};

/// The crate targets whose spans become OpenTelemetry spans.
const TRACED_TARGETS: [&str; 3] = ["shared", "poll_service", "vote_service"];

static TRACING_ON: OnceLock<bool> = OnceLock::new();

/// Whether spans are exported (an OTLP endpoint was configured at start).
pub fn tracing_enabled() -> bool {
    TRACING_ON.get().copied().unwrap_or(false)
}

/// Whether a span made here would be kept: tracing is on and, inside a request, the request's
/// trace is sampled (outside requests the sampler decides).
pub fn span_wanted() -> bool {
    tracing_enabled() && REQUEST.try_with(|r| r.sampled).unwrap_or(true)
}

/// Whether `span`'s trace is sampled (starts its OpenTelemetry span; tracing on).
pub fn is_sampled(span: &tracing::Span) -> bool {
    span.context().span().span_context().is_sampled()
}

/// Keeps the tracer provider; [`Telemetry::shutdown`] flushes the spans still queued.
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter (blocking; a few hundred ms at most).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.shutdown();
        }
    }
}

fn otlp_endpoint_set() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let none = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    !disabled && !none && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The OTLP exporter could not be built (tracing then stays off; logs go on).
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter")]
pub struct ExporterError(#[source] opentelemetry_otlp::ExporterBuildError);

fn tracer_provider(service: &str) -> Result<SdkTracerProvider, ExporterError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(ExporterError)?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let instance = std::env::var("HOSTNAME")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|h| format!("{h}/{}", std::process::id()))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .with_attributes([
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            opentelemetry::KeyValue::new("service.instance.id", instance),
            opentelemetry::KeyValue::new("service.namespace", "pollvote"),
        ])
        .build();
    // The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (the SDK reads them;
    // default parentbased_always_on).
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Installs the global subscriber without exporting spans (in-process tests). A second call
/// (tests start several apps) is a no-op.
pub fn init(log: &LogConfig) {
    let _ = install(log, None);
}

/// Installs the global subscriber for the service `service`, exporting spans when an OTLP
/// endpoint is configured.
pub fn init_service(log: &LogConfig, service: &str) -> Telemetry {
    install(log, Some(service))
}

fn install(log: &LogConfig, service: Option<&str>) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (provider, problem) = match service.filter(|_| otlp_endpoint_set()) {
        Some(service) => match tracer_provider(service) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let targets = TRACED_TARGETS
            .iter()
            .fold(Targets::new(), |t, name| t.with_target(*name, LevelFilter::INFO));
        // No per-poll timing, thread or source-location attributes and no OpenTelemetry context
        // activation on every poll of a request's future: the ids are read from the spans
        // themselves (`span.context()`), and every unsampled request stays cheap.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("pollvote"))
            .with_error_records_to_exceptions(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_context_activation(false)
            .with_filter(targets)
    });
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .event_format(WithTraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let installed = tracing_subscriber::registry().with(fmt).with(otel).try_init().is_ok();
    if installed {
        let _ = TRACING_ON.set(provider.is_some());
    }
    if let Some(e) = problem {
        tracing::error!(error = %crate::error::Chain(&e), "tracing is off: the OTLP exporter could not be built");
    }
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

/// W3C trace context of one request when no OpenTelemetry layer is installed.
#[derive(Debug, Clone)]
pub struct LocalTrace {
    pub trace_id: String,
    pub span_id: String,
    pub flags: String,
    pub tracestate: Option<HeaderValue>,
}

/// What a request carries through its handler: its request id, and its trace context when
/// tracing is off. Set for the handler's task by the request middleware.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub local: Option<LocalTrace>,
    /// Whether the request's trace is sampled (tracing on): its storage, batch and peer spans are
    /// made only then.
    pub sampled: bool,
}

tokio::task_local! {
    pub static REQUEST: RequestContext;
}

fn random_hex(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2);
    loop {
        out.clear();
        for _ in 0..bytes {
            let _ = write!(out, "{:02x}", rand::random::<u8>());
        }
        if out.bytes().any(|b| b != b'0') {
            return out;
        }
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

/// The caller's `traceparent` (version 00 layout), if valid: (trace id, parent span id, flags).
pub fn parse_traceparent(headers: &HeaderMap) -> Option<(String, String, String)> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let mut parts = v.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version == "ff" || !is_hex(version, 2) && version != "00" || !is_hex(trace, 32) || !is_hex(parent, 16) {
        return None;
    }
    if flags.len() != 2 || !flags.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((trace.to_owned(), parent.to_owned(), flags.to_owned()))
}

/// The trace context of a request when tracing is off: the caller's trace id (or a new one) and
/// a new span id of this request.
pub fn local_trace(headers: &HeaderMap) -> LocalTrace {
    let (trace_id, flags) = match parse_traceparent(headers) {
        Some((t, _, f)) => (t, f),
        None => (random_hex(16), "00".to_owned()),
    };
    LocalTrace {
        trace_id,
        span_id: random_hex(8),
        flags,
        tracestate: headers.get("tracestate").cloned(),
    }
}

/// Makes `span` a child of the caller's `traceparent` (tracing on).
pub fn set_remote_parent(span: &tracing::Span, headers: &HeaderMap) {
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&opentelemetry_http::HeaderExtractor(headers)));
    let _ = span.set_parent(cx);
}

/// Trace and span id of `span` (tracing on) or of the current request (tracing off).
pub fn ids_of(span: &tracing::Span) -> Option<(String, String)> {
    if tracing_enabled() {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        return sc
            .is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()));
    }
    REQUEST
        .try_with(|r| r.local.as_ref().map(|l| (l.trace_id.clone(), l.span_id.clone())))
        .ok()
        .flatten()
}

/// Headers for a call to the other service made inside `span`: `traceparent`/`tracestate` and the
/// current request's `X-Request-Id`.
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if tracing_enabled() {
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
        });
    }
    let _ = REQUEST.try_with(|r| {
        if let Ok(v) = HeaderValue::from_str(&r.request_id) {
            headers.insert("x-request-id", v);
        }
        if let Some(l) = r.local.as_ref().filter(|_| !tracing_enabled()) {
            if let Ok(v) = HeaderValue::from_str(&format!("00-{}-{}-{}", l.trace_id, l.span_id, l.flags)) {
                headers.insert("traceparent", v);
            }
            if let Some(state) = &l.tracestate {
                headers.insert("tracestate", state.clone());
            }
        }
    });
}

/// Adds `"trace_id"` and `"span_id"` in front of a JSON log line written inside a traced span or
/// a request.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = if tracing_enabled() {
            ctx.lookup_current().and_then(|span| {
                tracing::dispatcher::get_default(|d| tracing_opentelemetry::get_otel_context(&span.id(), d))
                    .map(|cx| cx.span().span_context().clone())
                    .filter(|sc| sc.is_valid())
                    .map(|sc| (sc.trace_id().to_string(), sc.span_id().to_string()))
            })
        } else {
            REQUEST
                .try_with(|r| r.local.as_ref().map(|l| (l.trace_id.clone(), l.span_id.clone())))
                .ok()
                .flatten()
        };
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_strictly_and_a_local_trace_keeps_its_trace_id() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let (t, p, f) = parse_traceparent(&h).expect("valid");
        assert_eq!(
            (t.as_str(), p.as_str(), f.as_str()),
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
        );
        let local = local_trace(&h);
        assert_eq!(local.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(local.span_id, "00f067aa0ba902b7");
        assert!(is_hex(&local.span_id, 16));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "junk",
        ] {
            h.insert("traceparent", HeaderValue::from_static(bad));
            assert!(parse_traceparent(&h).is_none(), "{bad}");
        }
        let fresh = local_trace(&HeaderMap::new());
        assert!(is_hex(&fresh.trace_id, 32) && fresh.flags == "00");
    }
}

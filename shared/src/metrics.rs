//! Prometheus metrics. One registry per app (no global state), so tests can run many apps in one
//! process. HTTP metrics follow the OpenTelemetry HTTP conventions as Prometheus names them
//! (`http_server_request_duration_seconds` by `http_request_method`, `http_route` — the matched
//! route, never the raw path — and `http_response_status_code`); process metrics use the
//! Prometheus client conventions (`process_*`); the services' own series start with `pollvote_`.
//!
//! `/metrics` answers OpenMetrics 1.0 when the scraper asks for it (Prometheus does) and the
//! Prometheus text format 0.0.4 otherwise, each with its own content type.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub http_request_method: String,
    pub http_route: String,
    pub http_response_status_code: u16,
}

/// A call to the other service: which one, which internal route, and how it ended (`2xx`,
/// `4xx`, `5xx`, `timeout`, `connect`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: &'static str,
    pub route: &'static str,
    pub outcome: &'static str,
}

/// One storage call: the store method and how it ended (`ok`, `unavailable`, `error`,
/// `cancelled`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DbLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    rustc: &'static str,
}

/// Storage internals that run outside any app's reach (the MongoDB retry policy, the group-commit
/// writers): one set per process, registered in every app's registry (tests that run several apps
/// in one process see their sum).
pub struct StorageMetrics {
    /// Answers "throttled" (Cosmos DB 16500) from the database.
    pub throttled: Counter,
    /// Storage calls sent again after a throttled answer.
    pub retries: Counter,
    /// Ballots per group-commit batch (one redb transaction, or one MongoDB `insertMany`).
    pub batch_size: Histogram,
    /// MongoDB tally reads by result: `hit` (a kept tally served), `miss` (aggregated now).
    pub tally_cache: Family<CacheLabels, Counter>,
    /// MongoDB: the database work of one tally refresh (counter documents plus the uncounted tail).
    pub tally_refresh: Histogram,
}

/// The process's [`StorageMetrics`].
pub fn storage() -> &'static StorageMetrics {
    static STORAGE: std::sync::OnceLock<StorageMetrics> = std::sync::OnceLock::new();
    STORAGE.get_or_init(|| {
        let tally_cache = Family::<CacheLabels, Counter>::default();
        for result in ["hit", "miss"] {
            let _ = tally_cache.get_or_create(&CacheLabels { cache: "tally", result });
        }
        StorageMetrics {
            throttled: Counter::default(),
            retries: Counter::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            tally_cache,
            tally_refresh: latency_histogram(),
        }
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Key Vault reads of the connection string (at start and every refresh): one set per process,
/// registered in every app's registry.
pub struct KeyVaultMetrics {
    /// Reads by outcome (`ok`, `error`).
    pub reads: Family<OutcomeLabel, Counter>,
    /// When a read last succeeded (Unix seconds; 0 before the first).
    pub last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The process's [`KeyVaultMetrics`].
pub fn keyvault() -> &'static KeyVaultMetrics {
    static KEYVAULT: std::sync::OnceLock<KeyVaultMetrics> = std::sync::OnceLock::new();
    KEYVAULT.get_or_init(|| {
        let reads = Family::<OutcomeLabel, Counter>::default();
        // Both series exist from the start (at 0), so that rates and alerts see the first failure.
        for outcome in ["ok", "error"] {
            let _ = reads.get_or_create(&OutcomeLabel { outcome });
        }
        KeyVaultMetrics {
            reads,
            last_success: Gauge::default(),
        }
    })
}

impl KeyVaultMetrics {
    /// Counts one read of the secret.
    pub fn read(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.reads.get_or_create(&OutcomeLabel { outcome }).inc();
        if ok {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.last_success.set(now);
        }
    }
}

/// The span a ballot's group-commit batch should descend from: the caller's current span when its
/// trace is wanted ([`crate::telemetry::span_wanted`]), a disabled span otherwise.
pub fn caller_span() -> tracing::Span {
    if crate::telemetry::span_wanted() {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    }
}

/// A span for one group-commit batch of `spans.len()` documents written to `collection` (their
/// writers' [`caller_span`]s): a child of the first traced writer's span and linked to the other
/// traced ones; a disabled span when none is traced.
pub fn batch_span(
    system: &'static str,
    operation: &'static str,
    collection: &'static str,
    spans: &[&tracing::Span],
) -> tracing::Span {
    let size = spans.len();
    let mut traced = spans.iter().filter(|s| !s.is_none());
    let Some(first) = traced.next() else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        parent: *first,
        "batch",
        otel.name = %format_args!("{operation} {collection}"),
        otel.kind = "client",
        db.system.name = system,
        db.collection.name = collection,
        db.operation.name = operation,
        db.operation.batch.size = size,
    );
    for other in traced {
        span.follows_from(*other);
    }
    span
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The app's metrics. Services register their own metrics with [`Metrics::register`] at start-up.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub http_duration: Histograms<HttpLabels>,
    pub peer_duration: Histograms<PeerLabels>,
    pub db_duration: Histograms<DbLabels>,
    pub cache: Family<CacheLabels, Counter>,
    pub sse_subscribers: Gauge,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_labels(std::iter::once(("service".into(), service.to_owned().into())));
        let http_duration: Histograms<HttpLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests, by method, matched route and status code",
            http_duration.clone(),
        );
        let peer_duration: Histograms<PeerLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "pollvote_peer_request_duration_seconds",
            "Calls to the other service, by peer, internal route and outcome (2xx, 4xx, 5xx, timeout, connect, error)",
            peer_duration.clone(),
        );
        let db_duration: Histograms<DbLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "pollvote_db_operation_duration_seconds",
            "Storage calls, by operation and outcome (ok, unavailable, error, cancelled)",
            db_duration.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "pollvote_cache_requests",
            "Cache look-ups by cache (poll_catalog) and result (hit, miss)",
            cache.clone(),
        );
        let sse_subscribers = Gauge::default();
        registry.register(
            "pollvote_sse_subscribers",
            "Live results streams (Server-Sent Events) open now",
            sse_subscribers.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                rustc: option_env!("CARGO_PKG_RUST_VERSION").unwrap_or("unknown"),
            })
            .set(1);
        registry.register("pollvote_build_info", "Always 1; the build's version", build);
        let st = storage();
        registry.register(
            "pollvote_db_throttled",
            "Throttled answers (Cosmos DB 16500) from the database, in this process",
            st.throttled.clone(),
        );
        registry.register(
            "pollvote_db_retries",
            "Storage calls sent again after a throttled answer, in this process",
            st.retries.clone(),
        );
        registry.register(
            "pollvote_tally_cache_requests",
            "MongoDB tally reads: a kept tally served (hit) or an aggregation now (miss), in this process",
            st.tally_cache.clone(),
        );
        registry.register(
            "pollvote_tally_refresh_duration_seconds",
            "MongoDB: database time of one tally refresh (counters plus the uncounted tail), in this process",
            st.tally_refresh.clone(),
        );
        registry.register(
            "pollvote_db_write_batch_size",
            "Ballots per group-commit batch (one redb transaction or one insertMany), in this process",
            st.batch_size.clone(),
        );
        let kv = keyvault();
        registry.register(
            "pollvote_keyvault_reads",
            "Key Vault reads of the connection string by outcome (ok, error), in this process",
            kv.reads.clone(),
        );
        registry.register(
            "pollvote_keyvault_last_success_timestamp_seconds",
            "When a Key Vault read last succeeded (Unix time; 0 before the first), in this process",
            kv.last_success.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector::new()));
        Self {
            registry: Mutex::new(registry),
            http_duration,
            peer_duration,
            db_duration,
            cache,
            sse_subscribers,
        }
    }

    /// Adds a metric to the registry.
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// Counts a cache look-up.
    pub fn cache_lookup(&self, cache: &'static str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache.get_or_create(&CacheLabels { cache, result }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }

    /// The exposition and its content type for a request's `Accept` header: OpenMetrics when
    /// accepted, the Prometheus text format otherwise.
    pub fn encode_for(&self, accept: Option<&str>) -> (String, &'static str) {
        let open = self.encode();
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (open, OPENMETRICS)
        } else {
            (openmetrics_to_prometheus_text(&open), PROMETHEUS_TEXT)
        }
    }
}

/// Rewrites the OpenMetrics text this crate encodes as the Prometheus text format 0.0.4: counter
/// families are named with their `_total` samples, `# UNIT` and `# EOF` are dropped.
pub fn openmetrics_to_prometheus_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut help: Option<&str> = None;
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let counter = kind == "counter" && !name.ends_with("_total");
            if let Some(h) = help.take() {
                if counter {
                    let text = h
                        .strip_prefix("# HELP ")
                        .and_then(|h| h.strip_prefix(name))
                        .unwrap_or("");
                    out.push_str(&format!("# HELP {name}_total{text}\n"));
                } else {
                    out.push_str(h);
                    out.push('\n');
                }
            }
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                _ => "untyped",
            };
            if counter {
                out.push_str(&format!("# TYPE {name}_total {kind}\n"));
            } else {
                out.push_str(&format!("# TYPE {name} {kind}\n"));
            }
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `process_*` metrics of this process, read from `/proc` at each scrape (Linux; elsewhere only
/// the start time).
#[derive(Debug)]
struct ProcessCollector {
    start: f64,
}

impl ProcessCollector {
    fn new() -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Self { start }
    }
}

/// CPU seconds (user + system) from `/proc/self/stat`, at the usual 100 ticks per second.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn status_kib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = cpu_seconds() {
            let m = ConstCounter::new(cpu);
            m.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                m.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                status_kib("VmRSS:").map(|k| k * 1024.0),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                status_kib("VmSize:").map(|k| k * 1024.0),
            ),
            ("process_open_fds", "Number of open file descriptors", open_fds()),
            ("process_max_fds", "Maximum number of open file descriptors", max_fds()),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                Some(self.start),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = ConstGauge::new(v);
                m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_expositions_name_counters_and_carry_process_and_build_metrics() {
        let m = Metrics::new("test");
        m.cache_lookup("poll_catalog", true);
        m.http_duration
            .get_or_create(&HttpLabels {
                http_request_method: "GET".into(),
                http_route: "/x".into(),
                http_response_status_code: 200,
            })
            .observe(0.01);
        let (open, ct) = m.encode_for(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"));
        assert_eq!(ct, OPENMETRICS);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE pollvote_cache_requests counter"), "{open}");
        let (text, ct) = m.encode_for(None);
        assert_eq!(ct, PROMETHEUS_TEXT);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains("# TYPE pollvote_cache_requests_total counter"), "{text}");
        assert!(
            text.contains("# HELP pollvote_cache_requests_total Cache look-ups"),
            "{text}"
        );
        assert!(text.contains("pollvote_build_info{"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.contains("process_cpu_seconds_total"), "{text}");
        assert!(text.contains("http_server_request_duration_seconds_bucket{"), "{text}");
    }
}

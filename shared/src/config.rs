//! Layered configuration: built-in defaults (`config/default.toml`, compiled in) → the same file
//! on disk, if present → `config/<APP_ENV>.toml` → `POLLVOTE__<SECTION>__<KEY>` environment
//! variables → short aliases (`PORT`, `DATA_DIR`, `POLL_API`, …, and the predecessor's names).
//! Unknown keys are errors, and loading reports every problem at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::secret::Secret;

const BUILTIN_DEFAULTS: &str = include_str!("../../config/default.toml");
const ENV_PREFIX: &str = "POLLVOTE__";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub rate_limit: RateLimitConfig,
    pub log: LogConfig,
    pub storage: StorageConfig,
    pub services: ServicesConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub request_timeout_ms: u64,
    pub body_limit_bytes: usize,
    pub drain_timeout_ms: u64,
    pub cors_allowed_origins: Vec<String>,
    pub client_ip_source: ClientIpSource,
    pub trusted_proxy_hops: usize,
    pub front_door_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIpSource {
    Peer,
    XForwardedFor,
    XAzureClientip,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub writes_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Auto,
    Embedded,
    Mongodb,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub mongodb_uri: Secret,
    pub database: String,
    pub max_pool_size: u32,
    pub min_pool_size: u32,
    pub connect_timeout_ms: u64,
    pub server_selection_timeout_ms: u64,
    pub operation_timeout_ms: u64,
    pub tally_cache_ttl_ms: u64,
}

impl StorageConfig {
    /// The backend actually used once `auto` is resolved.
    pub fn effective_backend(&self) -> Backend {
        match self.backend {
            Backend::Auto if self.mongodb_uri.is_empty() => Backend::Embedded,
            Backend::Auto => Backend::Mongodb,
            b => b,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesConfig {
    pub poll_url: String,
    pub vote_url: String,
    pub poll_cache_ttl_ms: u64,
    pub timeout_ms: u64,
}

/// Everything wrong with the configuration, listed at once.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// Where configuration comes from: a directory of TOML files and a set of environment variables.
#[derive(Debug, Clone)]
pub struct Sources {
    pub config_dir: PathBuf,
    pub env: BTreeMap<String, String>,
}

impl Sources {
    /// The process environment; files from `CONFIG_DIR` (default `config`).
    pub fn from_process() -> Self {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let config_dir = env
            .get("CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config"));
        Self { config_dir, env }
    }
}

/// How a short environment variable maps onto a key.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
}

/// Short names, including the predecessor's. Later entries win over earlier ones.
const ALIASES: &[(&str, &str, Kind)] = &[
    ("PORT", "server.port", Kind::Int),
    ("REQUEST_TIMEOUT_MS", "server.request_timeout_ms", Kind::Int),
    ("DRAIN_TIMEOUT_MS", "server.drain_timeout_ms", Kind::Int),
    ("CLIENT_IP_SOURCE", "server.client_ip_source", Kind::Str),
    ("TRUSTED_PROXY_HOPS", "server.trusted_proxy_hops", Kind::Int),
    ("FRONT_DOOR_ID", "server.front_door_id", Kind::Str),
    ("RATE_LIMIT_PER_MINUTE", "rate_limit.writes_per_minute", Kind::Int),
    ("LOG_FORMAT", "log.format", Kind::Str),
    ("DATA_DIR", "storage.data_dir", Kind::Str),
    ("COSMOSDB_CONNECTION_STRING", "storage.mongodb_uri", Kind::Str),
    ("MONGODB_CONNECTION_STRING", "storage.mongodb_uri", Kind::Str),
    ("POLL_API", "services.poll_url", Kind::Str),
    ("VOTE_API", "services.vote_url", Kind::Str),
];

impl Config {
    /// Loads and validates the configuration, reporting every problem found.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut merged: Table = match BUILTIN_DEFAULTS.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError {
                    problems: vec![format!("built-in defaults: {e}")],
                });
            }
        };
        let known = merged.clone();

        let mut files = vec![(sources.config_dir.join("default.toml"), false)];
        if let Some(env_name) = sources.env.get("APP_ENV").filter(|s| !s.is_empty()) {
            if env_name.contains(['/', '\\']) || env_name.starts_with('.') {
                problems.push(format!("APP_ENV `{env_name}` is not a plain name"));
            } else {
                files.push((sources.config_dir.join(format!("{env_name}.toml")), true));
            }
        }
        for (path, required) in files {
            match read_table(&path) {
                Ok(Some(t)) => {
                    check_known(&known, &t, "", &path.display().to_string(), &mut problems);
                    merge(&mut merged, t);
                }
                Ok(None) if required => problems.push(format!("{}: file not found (named by APP_ENV)", path.display())),
                Ok(None) => {}
                Err(e) => problems.push(e),
            }
        }

        // POLLVOTE__SECTION__KEY=value
        for (name, raw) in &sources.env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if path.len() != 2 || lookup(&known, &path).is_none() {
                problems.push(format!("{name}: unknown configuration key `{}`", path.join(".")));
                continue;
            }
            let template = lookup(&known, &path).cloned();
            set(&mut merged, &path, env_value(raw, template.as_ref()));
        }
        for (name, key, kind) in ALIASES {
            let Some(raw) = sources.env.get(*name) else { continue };
            if raw.is_empty() && !matches!(kind, Kind::Str) {
                continue;
            }
            let path: Vec<String> = key.split('.').map(str::to_owned).collect();
            let value = match kind {
                Kind::Str => Value::String(raw.clone()),
                Kind::Int => match raw.trim().parse::<i64>() {
                    Ok(n) => Value::Integer(n),
                    Err(_) => {
                        problems.push(format!("{name}: `{raw}` is not a whole number"));
                        continue;
                    }
                },
            };
            if *key == "storage.mongodb_uri" && raw.is_empty() {
                continue;
            }
            set(&mut merged, &path, value);
        }

        let config = deserialize_sections(merged, &mut problems);
        if let Some(c) = &config {
            c.validate(&mut problems);
        }
        match config {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(ConfigError { problems }),
        }
    }

    fn validate(&self, problems: &mut Vec<String>) {
        let s = &self.server;
        if s.host.parse::<std::net::IpAddr>().is_err() {
            problems.push(format!("server.host: `{}` is not an IP address", s.host));
        }
        if s.request_timeout_ms == 0 {
            problems.push("server.request_timeout_ms: must be greater than 0".into());
        }
        if s.body_limit_bytes < 1024 {
            problems.push("server.body_limit_bytes: must be at least 1024".into());
        }
        if s.trusted_proxy_hops == 0 {
            problems.push("server.trusted_proxy_hops: must be at least 1".into());
        }
        for origin in &s.cors_allowed_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                problems.push(format!(
                    "server.cors_allowed_origins: `{origin}` is not `*` or an http(s) origin"
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!("log.level: `{}` is not a valid filter: {e}", self.log.level));
        }
        for (key, url) in [
            ("services.poll_url", &self.services.poll_url),
            ("services.vote_url", &self.services.vote_url),
        ] {
            if reqwest::Url::parse(url)
                .map(|u| !matches!(u.scheme(), "http" | "https"))
                .unwrap_or(true)
            {
                problems.push(format!("{key}: `{url}` is not an http(s) URL"));
            }
        }
        if self.services.poll_cache_ttl_ms >= 1000 {
            problems
                .push("services.poll_cache_ttl_ms: must be under 1000 (closed polls stop voting within 1 s)".into());
        }
        if self.services.timeout_ms == 0 {
            problems.push("services.timeout_ms: must be greater than 0".into());
        }
        if self.storage.backend == Backend::Mongodb && self.storage.mongodb_uri.is_empty() {
            problems.push("storage.mongodb_uri: required when storage.backend is `mongodb`".into());
        }
        let uri = self.storage.mongodb_uri.expose();
        if !(uri.is_empty() || uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
            // Never echo the value: it may hold credentials.
            problems.push("storage.mongodb_uri: must start with mongodb:// or mongodb+srv://".into());
        }
        let st = &self.storage;
        for (key, v) in [
            ("storage.connect_timeout_ms", st.connect_timeout_ms),
            ("storage.server_selection_timeout_ms", st.server_selection_timeout_ms),
            ("storage.operation_timeout_ms", st.operation_timeout_ms),
        ] {
            if v == 0 {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if st.max_pool_size != 0 && st.min_pool_size > st.max_pool_size {
            problems.push("storage.min_pool_size: must not exceed storage.max_pool_size".into());
        }
        if st.operation_timeout_ms >= self.server.request_timeout_ms {
            problems.push("storage.operation_timeout_ms: must be shorter than server.request_timeout_ms".into());
        }
        if self.storage.effective_backend() == Backend::Embedded && self.storage.data_dir.as_os_str().is_empty() {
            problems.push("storage.data_dir: must not be empty".into());
        }
    }

    /// The MongoDB settings for `uri` (from config or Key Vault) and this service's database.
    pub fn mongo_settings(&self, uri: &Secret, default_database: &str) -> crate::store::mongo::MongoSettings {
        let st = &self.storage;
        let database = if st.database.is_empty() {
            default_database
        } else {
            st.database.as_str()
        };
        let mut s = crate::store::mongo::MongoSettings::new(uri.expose(), database);
        s.app_name = Some(format!("pollvote-{default_database}"));
        s.max_pool_size = (st.max_pool_size > 0).then_some(st.max_pool_size);
        s.min_pool_size = (st.min_pool_size > 0).then_some(st.min_pool_size);
        s.connect_timeout = std::time::Duration::from_millis(st.connect_timeout_ms);
        s.server_selection_timeout = std::time::Duration::from_millis(st.server_selection_timeout_ms);
        s.operation_timeout = std::time::Duration::from_millis(st.operation_timeout_ms);
        s.tally_cache_ttl = std::time::Duration::from_millis(st.tally_cache_ttl_ms);
        s
    }

    /// The listen port: the configured one, or the service's default when 0.
    pub fn port_or(&self, default: u16) -> u16 {
        if self.server.port == 0 {
            default
        } else {
            self.server.port
        }
    }
}

fn parse_bool(raw: &str) -> Option<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

fn read_table(path: &Path) -> Result<Option<Table>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse::<Table>()
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn check_known(known: &Table, t: &Table, prefix: &str, source: &str, problems: &mut Vec<String>) {
    for (k, v) in t {
        let full = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (known.get(k), v) {
            (None, _) => problems.push(format!("{source}: unknown configuration key `{full}`")),
            (Some(Value::Table(kt)), Value::Table(vt)) => check_known(kt, vt, &full, source, problems),
            (Some(Value::Table(_)), _) => problems.push(format!("{source}: `{full}` must be a table")),
            _ => {}
        }
    }
}

fn merge(into: &mut Table, from: Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

fn lookup<'a>(t: &'a Table, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let v = t.get(first)?;
    if rest.is_empty() {
        Some(v)
    } else {
        lookup(v.as_table()?, rest)
    }
}

fn set(t: &mut Table, path: &[String], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        t.insert(first.clone(), value);
    } else if let Some(Value::Table(inner)) = t.get_mut(first) {
        set(inner, rest, value);
    }
}

/// An environment value typed like the default it replaces: numbers and booleans are parsed,
/// arrays are comma-separated, anything else is a string (type errors surface on deserialising).
fn env_value(raw: &str, template: Option<&Value>) -> Value {
    match template {
        Some(Value::Integer(_)) => raw
            .trim()
            .parse()
            .map(Value::Integer)
            .unwrap_or_else(|_| Value::String(raw.into())),
        Some(Value::Boolean(_)) => parse_bool(raw)
            .map(Value::Boolean)
            .unwrap_or_else(|| Value::String(raw.into())),
        Some(Value::Array(_)) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
        _ => Value::String(raw.into()),
    }
}

/// Deserialises each section on its own so that errors in several sections are all reported.
fn deserialize_sections(merged: Table, problems: &mut Vec<String>) -> Option<Config> {
    fn section<T: serde::de::DeserializeOwned>(t: &Table, name: &str, problems: &mut Vec<String>) -> Option<T> {
        let v = t.get(name).cloned().unwrap_or(Value::Table(Table::new()));
        match serde_path_to_error::deserialize::<_, T>(v) {
            Ok(x) => Some(x),
            Err(e) => {
                let path = e.path().to_string();
                let key = if path == "." {
                    name.to_owned()
                } else {
                    format!("{name}.{path}")
                };
                problems.push(format!("{key}: {}", e.into_inner()));
                None
            }
        }
    }
    let server = section(&merged, "server", problems);
    let rate_limit = section(&merged, "rate_limit", problems);
    let log = section(&merged, "log", problems);
    let storage = section(&merged, "storage", problems);
    let services = section(&merged, "services", problems);
    Some(Config {
        server: server?,
        rate_limit: rate_limit?,
        log: log?,
        storage: storage?,
        services: services?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(env: &[(&str, &str)], dir: &Path) -> Sources {
        Sources {
            config_dir: dir.to_path_buf(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn defaults_load_without_any_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config::load(&sources(&[], dir.path())).expect("defaults are valid");
        assert_eq!(c.port_or(4000), 4000);
        assert_eq!(c.storage.effective_backend(), Backend::Embedded);
        assert_eq!(c.rate_limit.writes_per_minute, 120);
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("default.toml"),
            "[server]\nport = 1111\nrequest_timeout_ms = 7000\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("staging.toml"), "[server]\nport = 2222\n").expect("write");
        let c = Config::load(&sources(
            &[
                ("APP_ENV", "staging"),
                ("POLLVOTE__SERVER__BODY_LIMIT_BYTES", "4096"),
                ("RATE_LIMIT_PER_MINUTE", "0"),
            ],
            dir.path(),
        ))
        .expect("valid");
        assert_eq!(c.server.port, 2222, "the APP_ENV file overrides default.toml");
        assert_eq!(c.server.request_timeout_ms, 7000, "default.toml overrides built-ins");
        assert_eq!(c.server.body_limit_bytes, 4096, "prefixed env overrides files");
        assert_eq!(c.rate_limit.writes_per_minute, 0);
        let c = Config::load(&sources(&[("APP_ENV", "staging"), ("PORT", "3333")], dir.path())).expect("valid");
        assert_eq!(c.server.port, 3333, "aliases win over files");
    }

    #[test]
    fn predecessor_variables_are_aliases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config::load(&sources(
            &[
                ("COSMOSDB_CONNECTION_STRING", "mongodb://a/"),
                ("POLL_API", "http://poll:8080"),
            ],
            dir.path(),
        ))
        .expect("valid");
        assert_eq!(c.storage.mongodb_uri.expose(), "mongodb://a/");
        assert_eq!(c.storage.effective_backend(), Backend::Mongodb);
        assert_eq!(c.services.poll_url, "http://poll:8080");
        let c = Config::load(&sources(
            &[
                ("COSMOSDB_CONNECTION_STRING", "mongodb://a/"),
                ("MONGODB_CONNECTION_STRING", "mongodb://b/"),
            ],
            dir.path(),
        ))
        .expect("valid");
        assert_eq!(
            c.storage.mongodb_uri.expose(),
            "mongodb://b/",
            "MONGODB_CONNECTION_STRING wins"
        );
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("default.toml"),
            "[server]\nport = \"x\"\nwat = 1\n[nope]\n",
        )
        .expect("write");
        let err = Config::load(&sources(
            &[
                ("POLLVOTE__LOG__FORMAT", "xml"),
                ("POLLVOTE__SERVER__NOPE", "1"),
                ("RATE_LIMIT_PER_MINUTE", "many"),
                ("MONGODB_CONNECTION_STRING", "postgres://secret-password@x"),
                ("POLL_API", "not a url"),
                ("APP_ENV", "missing"),
            ],
            dir.path(),
        ))
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "unknown configuration key `server.wat`",
            "unknown configuration key `nope`",
            "POLLVOTE__SERVER__NOPE",
            "RATE_LIMIT_PER_MINUTE",
            "server.port",
            "log.format",
            "missing.toml",
        ] {
            assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
        }
        assert!(
            !text.contains("secret-password"),
            "the connection string leaked:\n{text}"
        );
        // Once types are right, semantic problems are all listed too.
        let err = Config::load(&sources(
            &[
                ("MONGODB_CONNECTION_STRING", "postgres://secret-password@x"),
                ("POLL_API", "not a url"),
            ],
            dir.path().join("none").as_path(),
        ))
        .expect_err("invalid");
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(!err.to_string().contains("secret-password"));
    }
}

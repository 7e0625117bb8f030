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
    pub keyvault: KeyVaultConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub request_timeout_ms: u64,
    /// The deadline of `/internal/` requests (audits and repairs read every ballot of a poll).
    pub internal_request_timeout_ms: u64,
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
    pub write_batches_in_flight: u32,
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

/// Reading the MongoDB connection string from Azure Key Vault (see [`crate::keyvault`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyVaultConfig {
    /// `auto`: on when `url` is set. `USE_KEYVAULT` (the predecessor's switch) sets it.
    pub enabled: Switch,
    /// The vault, `https://<name>.vault.azure.net/`.
    pub url: String,
    pub secret_name: String,
    /// Key Vault REST API version; empty means the SDK's default.
    pub api_version: String,
    /// Whether the resource named in the vault's authentication challenge must match the vault's
    /// domain (off only for a vault on localhost, such as a test double).
    pub verify_challenge_resource: bool,
    /// How often the secret is read again (rotation); it is also read at once when the database
    /// refuses the current credentials.
    pub refresh_interval_ms: u64,
    /// Timeout of one request to the vault or the token endpoint.
    pub timeout_ms: u64,
    /// Start-up: failed reads are retried with exponential backoff from `retry_initial_ms` up to
    /// `retry_max_ms`; past this deadline without the secret the failure is logged as an error
    /// (readiness stays 503, and reads go on every `retry_max_ms`).
    pub startup_deadline_ms: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
}

impl KeyVaultConfig {
    /// Whether the connection string comes from Key Vault.
    pub fn in_use(&self) -> bool {
        match self.enabled {
            Switch::On => true,
            Switch::Off => false,
            Switch::Auto => !self.url.trim().is_empty(),
        }
    }
}

/// `auto`, `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`; empty is `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    Auto,
    On,
    Off,
}

impl Serialize for Switch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Switch::Auto => s.serialize_str("auto"),
            Switch::On => s.serialize_bool(true),
            Switch::Off => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for Switch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(b) => Ok(if b { Switch::On } else { Switch::Off }),
            Raw::Text(t) if t.trim().is_empty() || t.trim().eq_ignore_ascii_case("auto") => Ok(Switch::Auto),
            Raw::Text(t) => match parse_bool(&t) {
                Some(true) => Ok(Switch::On),
                Some(false) => Ok(Switch::Off),
                None => Err(serde::de::Error::custom(format!("`{t}` is not true, false or auto"))),
            },
        }
    }
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
    Bool,
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
    ("USE_KEYVAULT", "keyvault.enabled", Kind::Str),
    ("KEYVAULT_URL", "keyvault.url", Kind::Str),
    ("KEYVAULT_SECRET_NAME", "keyvault.secret_name", Kind::Str),
    ("KEYVAULT_API_VERSION", "keyvault.api_version", Kind::Str),
    (
        "KEYVAULT_VERIFY_CHALLENGE_RESOURCE",
        "keyvault.verify_challenge_resource",
        Kind::Bool,
    ),
    (
        "KEYVAULT_REFRESH_INTERVAL_MS",
        "keyvault.refresh_interval_ms",
        Kind::Int,
    ),
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
                Kind::Bool => match parse_bool(raw) {
                    Some(b) => Value::Boolean(b),
                    None => {
                        problems.push(format!("{name}: `{raw}` is not true or false"));
                        continue;
                    }
                },
            };
            if *key == "storage.mongodb_uri" && raw.is_empty() {
                continue;
            }
            set(&mut merged, &path, value);
        }

        let mut config = deserialize_sections(merged, &mut problems);
        if let Some(c) = &mut config {
            // With Key Vault, `auto` means MongoDB: the connection string arrives after start.
            if c.keyvault.in_use() && c.storage.backend == Backend::Auto {
                c.storage.backend = Backend::Mongodb;
            }
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
        if s.internal_request_timeout_ms < s.request_timeout_ms {
            problems.push("server.internal_request_timeout_ms: must be at least server.request_timeout_ms".into());
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
        if self.storage.backend == Backend::Mongodb && self.storage.mongodb_uri.is_empty() && !self.keyvault.in_use() {
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
            ("storage.write_batches_in_flight", u64::from(st.write_batches_in_flight)),
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
        self.validate_keyvault(problems);
    }

    fn validate_keyvault(&self, problems: &mut Vec<String>) {
        let kv = &self.keyvault;
        let url = kv.url.trim();
        if kv.in_use() {
            if url.is_empty() {
                problems.push("keyvault.url: required when Key Vault is enabled (set KEYVAULT_URL)".into());
            }
            if !self.storage.mongodb_uri.is_empty() {
                problems.push(
                    "storage.mongodb_uri: set while Key Vault is enabled; the connection string comes from one place \
                     (unset MONGODB_CONNECTION_STRING/COSMOSDB_CONNECTION_STRING or set USE_KEYVAULT=false)"
                        .into(),
                );
            }
            if self.storage.backend == Backend::Embedded {
                problems.push("storage.backend: `embedded` while Key Vault is enabled (Key Vault holds a MongoDB connection string)".into());
            }
        }
        if !url.is_empty() {
            match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "https" && u.host_str().is_some() && u.query().is_none() => {}
                Ok(u) if u.scheme() == "http" => problems.push(format!(
                    "keyvault.url: `{url}` must use https (the bearer token is never sent over plain HTTP)"
                )),
                _ => problems.push(format!(
                    "keyvault.url: `{url}` is not an https URL such as https://<name>.vault.azure.net/"
                )),
            }
        }
        let name = &kv.secret_name;
        if name.is_empty() || name.len() > 127 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            problems.push(format!(
                "keyvault.secret_name: `{name}` is not a Key Vault secret name (1 to 127 letters, digits and dashes)"
            ));
        }
        if !kv
            .api_version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            problems.push(format!(
                "keyvault.api_version: `{}` is not an API version such as 7.4 or 2025-07-01",
                kv.api_version
            ));
        }
        if kv.refresh_interval_ms < 1000 {
            problems.push("keyvault.refresh_interval_ms: must be at least 1000".into());
        }
        for (key, v) in [
            ("keyvault.timeout_ms", kv.timeout_ms),
            ("keyvault.startup_deadline_ms", kv.startup_deadline_ms),
            ("keyvault.retry_initial_ms", kv.retry_initial_ms),
        ] {
            if v == 0 {
                problems.push(format!("{key}: must be greater than 0"));
            }
        }
        if kv.retry_max_ms < kv.retry_initial_ms {
            problems.push("keyvault.retry_max_ms: must not be shorter than keyvault.retry_initial_ms".into());
        }
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
    let keyvault = section(&merged, "keyvault", problems);
    Some(Config {
        server: server?,
        rate_limit: rate_limit?,
        log: log?,
        storage: storage?,
        services: services?,
        keyvault: keyvault?,
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

    #[test]
    fn key_vault_is_off_by_default_and_on_with_a_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config::load(&sources(&[], dir.path())).expect("valid");
        assert!(!c.keyvault.in_use());
        assert_eq!(c.keyvault.secret_name, "cosmosdb-connection-string");
        assert!(c.keyvault.verify_challenge_resource);
        let c = Config::load(&sources(
            &[
                ("KEYVAULT_URL", "https://my-keyvault.vault.azure.net/"),
                ("KEYVAULT_SECRET_NAME", "db-uri"),
                ("KEYVAULT_API_VERSION", "7.4"),
                ("KEYVAULT_VERIFY_CHALLENGE_RESOURCE", "false"),
                ("KEYVAULT_REFRESH_INTERVAL_MS", "1000"),
                ("POLLVOTE__KEYVAULT__STARTUP_DEADLINE_MS", "5000"),
            ],
            dir.path(),
        ))
        .expect("valid");
        assert!(c.keyvault.in_use(), "a URL alone turns it on");
        assert_eq!(
            c.storage.effective_backend(),
            Backend::Mongodb,
            "auto means MongoDB with Key Vault"
        );
        assert_eq!(
            (c.keyvault.secret_name.as_str(), c.keyvault.api_version.as_str()),
            ("db-uri", "7.4")
        );
        assert!(!c.keyvault.verify_challenge_resource);
        assert_eq!(
            (c.keyvault.refresh_interval_ms, c.keyvault.startup_deadline_ms),
            (1000, 5000)
        );
    }

    #[test]
    fn use_keyvault_is_the_predecessors_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = ("KEYVAULT_URL", "https://kv.vault.azure.net/");
        for (raw, on) in [
            ("true", true),
            ("True", true),
            ("1", true),
            ("false", false),
            ("no", false),
            ("", true),
        ] {
            let c = Config::load(&sources(&[("USE_KEYVAULT", raw), url], dir.path())).expect("valid");
            assert_eq!(c.keyvault.in_use(), on, "USE_KEYVAULT={raw}");
        }
        // Off: the connection string comes from the environment as before.
        let c = Config::load(&sources(
            &[
                ("USE_KEYVAULT", "false"),
                url,
                ("MONGODB_CONNECTION_STRING", "mongodb://db/"),
            ],
            dir.path(),
        ))
        .expect("valid");
        assert_eq!(c.storage.mongodb_uri.expose(), "mongodb://db/");
        let err = Config::load(&sources(&[("USE_KEYVAULT", "maybe")], dir.path())).expect_err("invalid");
        assert!(err.to_string().contains("keyvault.enabled"), "{err}");
    }

    #[test]
    fn key_vault_settings_are_validated_without_echoing_the_connection_string() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Config::load(&sources(&[("USE_KEYVAULT", "true")], dir.path())).expect_err("no url");
        assert!(err.to_string().contains("keyvault.url: required"), "{err}");
        let err = Config::load(&sources(
            &[
                ("KEYVAULT_URL", "http://kv.vault.azure.net/"),
                ("KEYVAULT_SECRET_NAME", "no_underscores"),
                ("KEYVAULT_API_VERSION", "7.4; drop"),
                ("KEYVAULT_VERIFY_CHALLENGE_RESOURCE", "perhaps"),
                ("KEYVAULT_REFRESH_INTERVAL_MS", "10"),
                ("MONGODB_CONNECTION_STRING", "mongodb://user:secret-password@db/"),
                ("POLLVOTE__STORAGE__BACKEND", "embedded"),
                ("POLLVOTE__KEYVAULT__RETRY_MAX_MS", "1"),
            ],
            dir.path(),
        ))
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "KEYVAULT_VERIFY_CHALLENGE_RESOURCE: `perhaps` is not true or false",
            "keyvault.url: `http://kv.vault.azure.net/` must use https",
            "keyvault.secret_name: `no_underscores`",
            "keyvault.api_version",
            "keyvault.refresh_interval_ms",
            "storage.mongodb_uri: set while Key Vault is enabled",
            "storage.backend: `embedded` while Key Vault is enabled",
            "keyvault.retry_max_ms",
        ] {
            assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
        }
        assert!(
            !text.contains("secret-password"),
            "the connection string leaked:\n{text}"
        );
        let err = Config::load(&sources(&[("KEYVAULT_URL", "not a url")], dir.path())).expect_err("invalid");
        assert!(err.to_string().contains("is not an https URL"), "{err}");
    }
}

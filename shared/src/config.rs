//! Layered configuration: built-in defaults (`config/default.toml`, compiled in) → the same file
//! on disk, if present → `config/<APP_ENV>.toml` → `POLLVOTE__<SECTION>__<KEY>` environment
//! variables → short aliases (`PORT`, `DATA_DIR`, `POLL_API`, …, and the predecessor's names).
//! Unknown keys are errors, and loading reports every problem at once. The layers are merged and
//! deserialised by figment; what figment has no notion of (unknown keys, typing environment values
//! like their defaults, the aliases) is done here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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

/// Short names, including the predecessor's, typed like their key's default (an empty one is unset
/// unless the key is a string). Later entries win over earlier ones.
const ALIASES: &[(&str, &str)] = &[
    ("PORT", "server.port"),
    ("REQUEST_TIMEOUT_MS", "server.request_timeout_ms"),
    ("DRAIN_TIMEOUT_MS", "server.drain_timeout_ms"),
    ("CLIENT_IP_SOURCE", "server.client_ip_source"),
    ("TRUSTED_PROXY_HOPS", "server.trusted_proxy_hops"),
    ("FRONT_DOOR_ID", "server.front_door_id"),
    ("RATE_LIMIT_PER_MINUTE", "rate_limit.writes_per_minute"),
    ("LOG_FORMAT", "log.format"),
    ("DATA_DIR", "storage.data_dir"),
    ("COSMOSDB_CONNECTION_STRING", "storage.mongodb_uri"),
    ("MONGODB_CONNECTION_STRING", "storage.mongodb_uri"),
    ("POLL_API", "services.poll_url"),
    ("VOTE_API", "services.vote_url"),
    ("USE_KEYVAULT", "keyvault.enabled"),
    ("KEYVAULT_URL", "keyvault.url"),
    ("KEYVAULT_SECRET_NAME", "keyvault.secret_name"),
    ("KEYVAULT_API_VERSION", "keyvault.api_version"),
    (
        "KEYVAULT_VERIFY_CHALLENGE_RESOURCE",
        "keyvault.verify_challenge_resource",
    ),
    ("KEYVAULT_REFRESH_INTERVAL_MS", "keyvault.refresh_interval_ms"),
];

impl Config {
    /// Loads and validates the configuration, reporting every problem found.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let builtin = Toml::string(BUILTIN_DEFAULTS);
        let known = match builtin.data() {
            Ok(mut d) => d.remove(&Profile::Default).unwrap_or_default(),
            Err(e) => {
                return Err(ConfigError {
                    problems: vec![format!("built-in defaults: {e}")],
                });
            }
        };
        let mut figment = Figment::from(builtin);

        let mut files = vec![(sources.config_dir.join("default.toml"), false)];
        if let Some(env_name) = sources.env.get("APP_ENV").filter(|s| !s.is_empty()) {
            if env_name.contains(['/', '\\']) || env_name.starts_with('.') {
                problems.push(format!("APP_ENV `{env_name}` is not a plain name"));
            } else {
                files.push((sources.config_dir.join(format!("{env_name}.toml")), true));
            }
        }
        for (path, required) in files {
            if let Ok(false) = path.try_exists() {
                if required {
                    problems.push(format!("{}: file not found (named by APP_ENV)", path.display()));
                }
                continue;
            }
            // Parsed here first: a layer that fails poisons the whole figment, and the other
            // layers must still be checked so that every problem is listed.
            let file = Toml::file_exact(&path);
            match file.data() {
                Ok(mut data) => {
                    let data = data.remove(&Profile::Default).unwrap_or_default();
                    check_known(&known, &data, "", &path.display().to_string(), &mut problems);
                    figment = figment.merge(file);
                }
                Err(e) => problems.push(format!("{}: {}", path.display(), without_source_lines(&e.to_string()))),
            }
        }

        // POLLVOTE__SECTION__KEY=value, then the short names. Not figment's `Env`: it reads the
        // process environment (`Sources.env` is a map) and guesses types from the text, where a
        // value here is typed like the default it replaces.
        let prefixed = sources.env.iter().filter_map(|(name, raw)| {
            let key = name.strip_prefix(ENV_PREFIX)?.split("__").map(str::to_ascii_lowercase);
            Some((name.as_str(), key.collect::<Vec<_>>(), raw, false))
        });
        let aliases = ALIASES.iter().filter_map(|(name, key)| {
            let raw = sources.env.get(*name)?;
            Some((*name, key.split('.').map(str::to_owned).collect(), raw, true))
        });
        for (name, key, raw, alias) in prefixed.chain(aliases) {
            let template = match key.as_slice() {
                [section, field] => known.get(section).and_then(Value::as_dict).and_then(|d| d.get(field)),
                _ => None,
            };
            let Some(template) = template else {
                problems.push(format!("{name}: unknown configuration key `{}`", key.join(".")));
                continue;
            };
            // An empty short name is unset, unless its key is a string; but an empty connection
            // string never hides the other name's.
            let is_str = matches!(template, Value::String(..));
            if alias && raw.is_empty() && (!is_str || key == ["storage", "mongodb_uri"]) {
                continue;
            }
            match typed(raw, template) {
                Ok(value) => {
                    figment = figment.merge(Var {
                        name: name.to_owned(),
                        key: key.join("."),
                        value,
                    });
                }
                Err(e) => problems.push(format!("{name}: `{raw}` {e}")),
            }
        }

        // Each section on its own, so that errors in several sections are all reported.
        let server = section(&figment, "server", &mut problems);
        let rate_limit = section(&figment, "rate_limit", &mut problems);
        let log = section(&figment, "log", &mut problems);
        let storage = section(&figment, "storage", &mut problems);
        let services = section(&figment, "services", &mut problems);
        let keyvault = section(&figment, "keyvault", &mut problems);
        if let (Some(server), Some(rate_limit), Some(log), Some(storage), Some(services), Some(keyvault)) =
            (server, rate_limit, log, storage, services, keyvault)
        {
            let mut c = Config {
                server,
                rate_limit,
                log,
                storage,
                services,
                keyvault,
            };
            // With Key Vault, `auto` means MongoDB: the connection string arrives after start.
            if c.keyvault.in_use() && c.storage.backend == Backend::Auto {
                c.storage.backend = Backend::Mongodb;
            }
            c.validate(&mut problems);
            if problems.is_empty() {
                return Ok(c);
            }
        }
        Err(ConfigError { problems })
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

/// Flags keys of a file that the built-in defaults do not have (hand-written: figment has no
/// notion of unknown keys, and serde's `deny_unknown_fields` stops at the first one).
fn check_known(known: &Dict, dict: &Dict, prefix: &str, source: &str, problems: &mut Vec<String>) {
    for (k, v) in dict {
        let full = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (known.get(k), v) {
            (None, _) => problems.push(format!("{source}: unknown configuration key `{full}`")),
            (Some(Value::Dict(_, kd)), Value::Dict(_, vd)) => check_known(kd, vd, &full, source, problems),
            (Some(Value::Dict(..)), _) => problems.push(format!("{source}: `{full}` must be a table")),
            _ => {}
        }
    }
}

/// An environment value typed like the default it replaces: whole numbers and booleans are
/// parsed, arrays are comma-separated, anything else is a string.
fn typed(raw: &str, template: &Value) -> Result<Value, &'static str> {
    Ok(match template {
        Value::Num(..) => raw.trim().parse::<i64>().map_err(|_| "is not a whole number")?.into(),
        Value::Bool(..) => parse_bool(raw).ok_or("is not true or false")?.into(),
        Value::Array(..) => raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Value::from)
            .collect::<Vec<_>>()
            .into(),
        _ => raw.into(),
    })
}

/// One key set by one environment variable: a figment layer whose errors name the variable.
struct Var {
    name: String,
    key: String,
    value: Value,
}

impl Provider for Var {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = figment::util::nest(&self.key, self.value.clone()).into_dict();
        Ok(Profile::Default.collect(dict.unwrap_or_default()))
    }
}

/// One section of the merged layers; what is wrong becomes `section.key: error (where it was set)`.
fn section<T: DeserializeOwned>(figment: &Figment, name: &str, problems: &mut Vec<String>) -> Option<T> {
    let errors = match figment.extract_inner(name) {
        Ok(v) => return Some(v),
        Err(e) => e,
    };
    for e in errors {
        // `extract_inner` appends the section after the path inside it.
        let inner = e.path.strip_suffix(&[name.to_owned()]).unwrap_or(&e.path);
        let key = std::iter::once(name).chain(inner.iter().map(String::as_str));
        let origin = match &e.metadata {
            Some(Metadata {
                source: Some(Source::File(p)),
                ..
            }) => format!(" (in {})", p.display()),
            Some(md) => format!(" (from {})", md.name),
            None => String::new(),
        };
        problems.push(format!("{}: {}{origin}", key.collect::<Vec<_>>().join("."), e.kind));
    }
    None
}

/// A TOML error without the quoted lines of the file, which may hold a connection string.
fn without_source_lines(message: &str) -> String {
    let quoted = |l: &&str| l.trim_start().starts_with(|c: char| c.is_ascii_digit() || c == '|');
    message.lines().filter(|l| !quoted(l)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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

    #[test]
    fn environment_values_are_typed_like_their_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = Config::load(&sources(
            &[
                (
                    "POLLVOTE__SERVER__CORS_ALLOWED_ORIGINS",
                    "https://a.example, https://b.example,",
                ),
                ("POLLVOTE__keyvault__Verify_Challenge_Resource", "no"),
                ("POLLVOTE__SERVER__FRONT_DOOR_ID", "123"),
                ("POLLVOTE__SERVER__PORT", "4444"),
                ("POLLVOTE__STORAGE__DATA_DIR", "/var/lib/pollvote"),
                ("DATA_DIR", "/data"),
                // An empty short variable for a number or a boolean is unset.
                ("PORT", ""),
                ("KEYVAULT_VERIFY_CHALLENGE_RESOURCE", ""),
                // ... and an empty connection string does not hide the other name.
                ("COSMOSDB_CONNECTION_STRING", "mongodb://a/"),
                ("MONGODB_CONNECTION_STRING", ""),
            ],
            dir.path(),
        ))
        .expect("valid");
        assert_eq!(
            c.server.cors_allowed_origins,
            ["https://a.example", "https://b.example"],
            "arrays are comma-separated"
        );
        assert!(!c.keyvault.verify_challenge_resource, "keys are case-insensitive");
        assert_eq!(c.server.front_door_id, "123", "a string stays a string");
        assert_eq!(c.server.port, 4444);
        assert_eq!(
            c.storage.data_dir,
            Path::new("/data"),
            "aliases win over POLLVOTE__ variables"
        );
        assert_eq!(c.storage.mongodb_uri.expose(), "mongodb://a/");
        // An empty short variable for a string sets it empty.
        let err = Config::load(&sources(&[("DATA_DIR", "")], dir.path())).expect_err("empty data dir");
        assert!(err.to_string().contains("storage.data_dir: must not be empty"), "{err}");
        let err = Config::load(&sources(
            &[
                ("POLLVOTE__SERVER", "1"),
                ("POLLVOTE__SERVER__PORT__X", "1"),
                ("POLLVOTE__SERVER__REQUEST_TIMEOUT_MS", "soon"),
                ("POLLVOTE__STORAGE__MONGODB_URI", "postgres://u:hunter2@db/"),
                ("POLL_API", "not a url"),
            ],
            dir.path(),
        ))
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "POLLVOTE__SERVER: unknown configuration key `server`",
            "POLLVOTE__SERVER__PORT__X: unknown configuration key `server.port.x`",
            "POLLVOTE__SERVER__REQUEST_TIMEOUT_MS: `soon` is not a whole number",
            "storage.mongodb_uri: must start with mongodb://",
            "services.poll_url",
        ] {
            assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
        }
        assert!(!text.contains("hunter2"), "the connection string leaked:\n{text}");
    }

    #[test]
    fn files_are_checked_for_keys_tables_and_syntax_without_echoing_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("default.toml"),
            "log = \"json\"\n[keyvault]\nnope = 1\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("broken.toml"),
            "[storage]\nmongodb_uri = \"mongodb://u:hunter2@db/\n",
        )
        .expect("write");
        let err = Config::load(&sources(
            &[("APP_ENV", "broken"), ("RATE_LIMIT_PER_MINUTE", "many")],
            dir.path(),
        ))
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "default.toml: unknown configuration key `keyvault.nope`",
            "default.toml: `log` must be a table",
            "broken.toml: TOML parse error at line 2",
            "RATE_LIMIT_PER_MINUTE: `many` is not a whole number",
        ] {
            assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
        }
        assert!(!text.contains("hunter2"), "the connection string leaked:\n{text}");
        for name in ["../etc/passwd", ".hidden", "a\\b"] {
            let err = Config::load(&sources(&[("APP_ENV", name)], dir.path())).expect_err("not a plain name");
            assert!(err.to_string().contains("is not a plain name"), "{err}");
        }
    }

    #[test]
    fn errors_name_where_the_value_was_set() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("default.toml"), "[server]\nport = \"x\"\n").expect("write");
        let err = Config::load(&sources(&[("LOG_FORMAT", "xml")], dir.path())).expect_err("invalid");
        let text = err.to_string();
        let file = dir.path().join("default.toml");
        for needle in [
            format!(
                "server.port: invalid type: found string \"x\", expected u16 (in {})",
                file.display()
            ),
            "log.format: unknown variant: found `xml`".to_owned(),
            "(from LOG_FORMAT)".to_owned(),
        ] {
            assert!(text.contains(&needle), "`{needle}` missing from:\n{text}");
        }
    }
}

//! MongoDB / Azure Cosmos DB plumbing, with the official `mongodb` driver: the process's client
//! ([`build_client`]) and its settings, the write concern every write uses, idempotent collection
//! and index creation, the retry policy and the classification of driver errors, and the helpers
//! that read and write the documents' fields. Each service's store builds on it (the poll
//! service's `polls`, the vote service's `ballots` and its counters).
//!
//! # Cosmos DB and failures
//!
//! `retryWrites=false` in the connection string is honoured (the driver parses it; nothing here
//! overrides it). Throttling (error 16500, `RetryAfterMs=` in the message) is retried by
//! [`RetryPolicy`] with bounded exponential backoff that honours `RetryAfterMs`, within one
//! deadline per operation; then it surfaces as [`StoreError::Unavailable`] (503 + `Retry-After`).
//! Network, server-selection and timeout errors become `Unavailable` with `retry_after` 1 s at
//! once (the driver already retried once where that is safe). A refused login (a wrong or rotated
//! password) is [`StoreError::CredentialsRejected`] (503 too), reported through
//! [`CredentialsRejected`] so that Key Vault is read again at once. A server certificate the
//! `tlsCAFile` does not vouch for is named first in the message (`TLS: … refused (invalid peer
//! certificate: …)`). No transactions, no change streams.
//! Error messages are for logs, and are scrubbed of connection strings before they leave here.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{Acknowledgment, ClientOptions, DatabaseOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Database, IndexModel};

use crate::backoff::Backoff;
use crate::config::{Config, StorageConfig};
use crate::health::Readiness;
use crate::keyvault::{ConnectionSource, CredentialsRejected};
use crate::secret::Secret;
use crate::slot::Slot;
use crate::storage::{StoreError, StoreResult};

pub const DUPLICATE_KEY: i32 = 11000;
pub const DUPLICATE_KEY_LEGACY: i32 = 11001;
pub const THROTTLED: i32 = 16500;
pub const NAMESPACE_EXISTS: i32 = 48;
pub const AUTHENTICATION_FAILED: i32 = 18;

/// How to reach the database. `uri` is a [`Secret`]: it is never logged, and `Debug` masks it.
#[derive(Clone, Debug)]
pub struct MongoSettings {
    /// `mongodb://…` or `mongodb+srv://…`, with credentials and options (`retryWrites=false`,
    /// `tls=true`, … are honoured as given).
    pub uri: Secret,
    /// Database name: `poll` for the poll service, `vote` for the vote service.
    pub database: String,
    /// Reported to the server (`appName`); the URI's own wins when this is `None`.
    pub app_name: Option<String>,
    /// Connection pool bounds per server; `None` keeps the URI's or the driver's default.
    pub max_pool_size: Option<u32>,
    pub min_pool_size: Option<u32>,
    pub connect_timeout: Duration,
    /// How long an operation waits for a usable server before failing (then: 503).
    pub server_selection_timeout: Duration,
    /// Deadline of one store call, retries and backoff included.
    pub operation_timeout: Duration,
    /// Told when the server refuses the URI's credentials (Key Vault then reads the secret again).
    pub on_credentials_rejected: CredentialsRejected,
}

impl MongoSettings {
    /// Settings with the defaults below for everything but the URI and database.
    pub fn new(uri: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            uri: Secret::new(uri.into()),
            database: database.into(),
            app_name: None,
            max_pool_size: None,
            min_pool_size: None,
            connect_timeout: Duration::from_secs(3),
            server_selection_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(5),
            on_credentials_rejected: CredentialsRejected::default(),
        }
    }

    /// The settings for `uri` (from config or Key Vault) and the service's database (the storage
    /// section's `database`, else `default_database`).
    pub fn from_config(storage: &StorageConfig, uri: &Secret, default_database: &str) -> Self {
        let database = if storage.database.is_empty() {
            default_database
        } else {
            storage.database.as_str()
        };
        let mut s = Self::new(uri.expose(), database);
        s.app_name = Some(format!("pollvote-{default_database}"));
        s.max_pool_size = (storage.max_pool_size > 0).then_some(storage.max_pool_size);
        s.min_pool_size = (storage.min_pool_size > 0).then_some(storage.min_pool_size);
        s.connect_timeout = Duration::from_millis(storage.connect_timeout_ms);
        s.server_selection_timeout = Duration::from_millis(storage.server_selection_timeout_ms);
        s.operation_timeout = Duration::from_millis(storage.operation_timeout_ms);
        s
    }

    /// How a store built on these settings retries: within `operation_timeout`, reporting refused
    /// credentials.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            deadline: self.operation_timeout,
            on_credentials_rejected: self.on_credentials_rejected.clone(),
            ..RetryPolicy::default()
        }
    }
}

/// Builds the process's one client. No I/O happens here except the DNS look-ups of a
/// `mongodb+srv://` URI; servers are contacted lazily, so this succeeds while the database is down.
pub async fn build_client(settings: &MongoSettings) -> StoreResult<Client> {
    let mut options = ClientOptions::parse(settings.uri.expose()).await.map_err(|e| {
        let message = scrub(
            &format!("invalid MongoDB connection string: {}", describe(&e)),
            settings.uri.expose(),
        );
        match classify(&e) {
            Failure::Unreachable { .. } => StoreError::unavailable(message),
            _ => StoreError::internal(message),
        }
    })?;
    if settings.app_name.is_some() {
        options.app_name.clone_from(&settings.app_name);
    }
    if settings.max_pool_size.is_some() {
        options.max_pool_size = settings.max_pool_size;
    }
    if settings.min_pool_size.is_some() {
        options.min_pool_size = settings.min_pool_size;
    }
    options.connect_timeout = Some(settings.connect_timeout);
    options.server_selection_timeout = Some(settings.server_selection_timeout);
    // `retry_writes` is left as the URI says (Cosmos DB needs `retryWrites=false`).
    Client::with_options(options).map_err(|e| {
        StoreError::internal(scrub(
            &format!("cannot build MongoDB client: {}", describe(&e)),
            settings.uri.expose(),
        ))
    })
}

/// Opens a service's MongoDB store in the background: a [`Slot`] that a task fills once the
/// database answers (and refills with a new client when the connection string changes); until
/// then calls fail with `Unavailable` and readiness waits for "database". `open` makes the store
/// on a new client for the settings of `default_database` (see [`MongoSettings::from_config`]).
pub fn open_in_background<T, F, Fut>(
    config: &Config,
    readiness: &Arc<Readiness>,
    source: ConnectionSource,
    default_database: &'static str,
    open: F,
) -> Arc<Slot<T>>
where
    T: ?Sized + Send + Sync + 'static,
    Slot<T>: Send + Sync,
    F: Fn(Client, MongoSettings) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StoreResult<Arc<T>>> + Send + 'static,
{
    let storage = config.storage.clone();
    let rejected = source.credentials_rejected;
    // A call the database refused for its credentials waits for a client rebuilt with a rotated
    // connection string: the operation timeout when the refusal is heard (Key Vault reads the
    // secret again), else not at all (the connection string cannot change).
    let wait = if rejected.is_heard() {
        Duration::from_millis(storage.operation_timeout_ms)
    } else {
        Duration::ZERO
    };
    let open = Arc::new(open);
    crate::slot::connect_in_background(readiness.clone(), source.uris, wait, move |uri| {
        let mut settings = MongoSettings::from_config(&storage, &uri, default_database);
        settings.on_credentials_rejected = rejected.clone();
        let open = open.clone();
        async move {
            let client = build_client(&settings).await?;
            open(client, settings).await
        }
    })
}

/// The database handle every write goes through: `{w: "majority", j: true}`, and a server-side
/// write-concern timeout equal to the operation deadline (so a write never waits forever for a
/// majority).
pub fn database(client: &Client, name: &str, retry: &RetryPolicy) -> Database {
    let wc = WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .w_timeout(retry.deadline)
        .build();
    client.database_with_options(name, DatabaseOptions::builder().write_concern(wc).build())
}

/// Creates `name` unless it exists, then `indexes` (creating an existing identical index is a no-op).
pub async fn ensure_collection(
    db: &Database,
    name: &str,
    indexes: Vec<IndexModel>,
    retry: &RetryPolicy,
) -> StoreResult<()> {
    let existing = retry.run(|| db.list_collection_names()).await?;
    if !existing.iter().any(|n| n == name) {
        retry
            .run(|| async move {
                match db.create_collection(name).await {
                    Err(e) if codes(&e).contains(&NAMESPACE_EXISTS) => Ok(()),
                    other => other,
                }
            })
            .await?;
    }
    // One index per command: FerretDB 1.24 drops the connection when one `createIndexes` names
    // several indexes that all exist already.
    let coll = db.collection::<Document>(name);
    for index in indexes {
        retry.run(|| coll.create_index(index.clone())).await?;
    }
    Ok(())
}

pub fn index(name: &str, keys: Document) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_owned()).build())
        .build()
}

// ---------------------------------------------------------------------------------------------
// Retry policy and error classification

/// What a failed driver call means for the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Cosmos DB throttling (16500): worth retrying after `retry_after` (its `RetryAfterMs`).
    Throttled {
        retry_after: Option<Duration>,
        message: String,
    },
    /// The database cannot be reached (network, server selection, timeouts, failover).
    Unreachable { message: String },
    /// The database refused the credentials (a rotated or wrong password): not retried here.
    CredentialsRejected { message: String },
    /// Anything else: a bug or bad data, not worth retrying.
    Fatal { message: String },
}

/// What to do after a failure.
#[derive(Debug)]
pub enum Decision {
    /// Sleep this long, then try again.
    Retry(Duration),
    /// Stop and report this.
    GiveUp(StoreError),
}

/// Bounded exponential backoff for throttled calls, within one deadline per store call.
///
/// The n-th retry (n from 0) waits `max(RetryAfterMs, backoff.delay(n))` (jittered by default: a
/// burst of throttled requests does not come back as one); there are at most `max_retries`
/// retries, and none that would end past `deadline` (counted from the first attempt). Then: `StoreError::Unavailable` with the server's hint (at least 1 s) as
/// `retry_after`. Unreachable-database errors are not retried here (server selection already
/// waited); they become `Unavailable` with 1 s at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff: Backoff,
    pub deadline: Duration,
    /// Told about every failure that is the server refusing our credentials.
    pub on_credentials_rejected: CredentialsRejected,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 6,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)).with_jitter(),
            deadline: Duration::from_secs(5),
            on_credentials_rejected: CredentialsRejected::default(),
        }
    }
}

impl RetryPolicy {
    /// The pure decision after a failure, given how many retries were already made and how much
    /// time has passed since the first attempt.
    pub fn decide(&self, failure: Failure, retries_done: u32, elapsed: Duration) -> Decision {
        match failure {
            Failure::Throttled { retry_after, message } => {
                let delay = self.backoff.delay(retries_done).max(retry_after.unwrap_or_default());
                if retries_done >= self.max_retries || elapsed.saturating_add(delay) >= self.deadline {
                    Decision::GiveUp(StoreError::Unavailable {
                        message: format!("database throttled (16500) after {retries_done} retries: {message}"),
                        retry_after: retry_after.unwrap_or_default().max(Duration::from_secs(1)),
                    })
                } else {
                    Decision::Retry(delay)
                }
            }
            Failure::Unreachable { message } => Decision::GiveUp(StoreError::unavailable(message)),
            Failure::CredentialsRejected { message } => Decision::GiveUp(StoreError::CredentialsRejected { message }),
            Failure::Fatal { message } => Decision::GiveUp(StoreError::internal(message)),
        }
    }

    /// Runs `op` until it succeeds or [`decide`](Self::decide) gives up, sleeping with tokio.
    pub async fn run<T, Op, Fut>(&self, op: Op) -> StoreResult<T>
    where
        Op: FnMut() -> Fut,
        Fut: IntoFuture<Output = mongodb::error::Result<T>>,
    {
        self.run_with_sleep(op, tokio::time::sleep).await
    }

    /// [`run`](Self::run) with an injected `sleep` (tests record the backoff instead of waiting).
    /// Every attempt is also bounded by what is left of the deadline. Time passed counts the
    /// sleeps asked for even when the injected `sleep` returns at once.
    pub async fn run_with_sleep<T, Op, Fut, Sleep, SleepFut>(&self, mut op: Op, mut sleep: Sleep) -> StoreResult<T>
    where
        Op: FnMut() -> Fut,
        Fut: IntoFuture<Output = mongodb::error::Result<T>>,
        Sleep: FnMut(Duration) -> SleepFut,
        SleepFut: Future<Output = ()>,
    {
        let start = Instant::now();
        let mut slept = Duration::ZERO;
        let elapsed = |slept: Duration| start.elapsed().max(slept);
        let mut retries = 0;
        loop {
            let left = self.deadline.saturating_sub(elapsed(slept));
            let failure = match tokio::time::timeout(left, op().into_future()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    if credentials_rejected(&e) {
                        self.on_credentials_rejected.report();
                    }
                    classify(&e)
                }
                Err(_) => Failure::Unreachable {
                    message: format!("database call timed out after {} ms", self.deadline.as_millis()),
                },
            };
            if matches!(failure, Failure::Throttled { .. }) {
                crate::metrics::storage().throttled.inc();
            }
            match self.decide(failure, retries, elapsed(slept)) {
                Decision::Retry(delay) => {
                    crate::metrics::storage().retries.inc();
                    tracing::debug!(
                        retry = retries + 1,
                        delay_ms = delay.as_millis() as u64,
                        "database throttled"
                    );
                    sleep(delay).await;
                    slept += delay;
                    retries += 1;
                }
                Decision::GiveUp(e) => return Err(e),
            }
        }
    }
}

/// Every server error code carried by `e` (command, write, write-concern and bulk write errors).
pub fn codes(e: &MongoError) -> Vec<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => vec![c.code],
        ErrorKind::Write(WriteFailure::WriteError(w)) => vec![w.code],
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => vec![w.code],
        ErrorKind::InsertMany(m) => m
            .write_errors
            .iter()
            .flatten()
            .map(|w| w.code)
            .chain(m.write_concern_error.iter().map(|w| w.code))
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether `e` is a duplicate-key error (the unique `_id` refused a second ballot or poll).
pub fn is_duplicate_key(e: &MongoError) -> bool {
    codes(e)
        .iter()
        .any(|c| matches!(*c, DUPLICATE_KEY | DUPLICATE_KEY_LEGACY))
}

/// Whether the server refused the credentials: a failed handshake, `AuthenticationFailed` (18), or
/// what the driver makes of a refused handshake for the operations queued behind it (the pool is
/// cleared, then the server is unknown until a handshake succeeds), whose cause it keeps as text
/// only. None of these operations was sent.
pub fn credentials_rejected(e: &MongoError) -> bool {
    let refused_before = |message: &str| message.contains("AuthenticationFailed") || message.contains("SCRAM failure");
    match e.kind.as_ref() {
        ErrorKind::Authentication { .. } => true,
        ErrorKind::ConnectionPoolCleared { message, .. } | ErrorKind::ServerSelection { message, .. } => {
            refused_before(message)
        }
        _ => codes(e).contains(&AUTHENTICATION_FAILED),
    }
}

/// The error's kind and server message, without labels or the server's raw reply.
pub fn describe(e: &MongoError) -> String {
    let text = match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => format!("write error {}: {}", w.code, w.message),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!("write concern error {}: {}", w.code, w.message)
        }
        ErrorKind::InsertMany(_) => format!("insert error, codes {:?}", codes(e)),
        kind => kind.to_string(),
    };
    let text = match tls_refusal(&text) {
        Some(reason) => format!(
            "TLS: the database's certificate was refused ({reason}; is tlsCAFile the CA that signed it?): {text}"
        ),
        None => text,
    };
    scrub(&text, "")
}

/// rustls's reason for refusing the server's certificate (`invalid peer certificate: UnknownIssuer`),
/// which the driver buries in its topology description when no server can be selected.
fn tls_refusal(text: &str) -> Option<&str> {
    let from = text.find("invalid peer certificate")?;
    let rest = &text[from..];
    Some(rest[..rest.find([',', '}', '\n']).unwrap_or(rest.len())].trim_end())
}

/// Removes connection strings (and `secret`, when not empty) from a message.
pub fn scrub(message: &str, secret: &str) -> String {
    let mut out = if secret.is_empty() {
        message.to_owned()
    } else {
        message.replace(secret, "<redacted>")
    };
    for scheme in ["mongodb+srv://", "mongodb://"] {
        let mut from = 0;
        while let Some(pos) = out[from..].find(scheme).map(|p| p + from) {
            let end = out[pos..]
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                .map_or(out.len(), |e| e + pos);
            out.replace_range(pos..end, "<redacted connection string>");
            from = pos + "<redacted connection string>".len();
        }
    }
    out
}

/// `RetryAfterMs=<n>` in a Cosmos DB throttling message.
fn retry_after_hint(message: &str) -> Option<Duration> {
    let rest = &message[message.find("RetryAfterMs=")? + "RetryAfterMs=".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().map(Duration::from_millis)
}

/// Server error codes that mean "no usable primary right now" (failover, shutdown, network).
const UNREACHABLE_CODES: &[i32] = &[6, 7, 50, 64, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436];

/// Sorts a driver error into throttled / unreachable / fatal.
pub fn classify(e: &MongoError) -> Failure {
    let message = describe(e);
    let codes = codes(e);
    if codes.contains(&THROTTLED) {
        let retry_after = retry_after_hint(&message);
        return Failure::Throttled { retry_after, message };
    }
    if credentials_rejected(e) {
        return Failure::CredentialsRejected { message };
    }
    let unreachable = matches!(
        e.kind.as_ref(),
        ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::DnsResolve { .. }
            | ErrorKind::Shutdown
    ) || codes.iter().any(|c| UNREACHABLE_CODES.contains(c));
    if unreachable {
        Failure::Unreachable { message }
    } else {
        Failure::Fatal { message }
    }
}

// ---------------------------------------------------------------------------------------------
// Documents

/// Times are stored as fixed-width RFC 3339 strings so that they sort as strings. Only years
/// 0–9999 have that shape; a listing cursor beyond them (any well-formed cursor is a position)
/// compares after (`~`) or before (empty) every stored time.
pub fn fmt_time(t: DateTime<Utc>) -> String {
    match t.year() {
        y if y > 9999 => "~".to_owned(),
        y if y < 0 => String::new(),
        _ => t.to_rfc3339_opts(SecondsFormat::Nanos, true),
    }
}

pub fn bad(what: &str) -> StoreError {
    StoreError::internal(format!("malformed stored document: {what}"))
}

pub fn time_of(b: &Bson) -> Option<DateTime<Utc>> {
    match b {
        Bson::String(s) => DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc)),
        Bson::DateTime(d) => DateTime::<Utc>::from_timestamp_millis(d.timestamp_millis()),
        _ => None,
    }
}

pub fn opt_time(d: &Document, key: &str) -> StoreResult<Option<DateTime<Utc>>> {
    match d.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(b) => time_of(b).map(Some).ok_or_else(|| bad(key)),
    }
}

pub fn req_time(d: &Document, key: &str) -> StoreResult<DateTime<Utc>> {
    opt_time(d, key)?.ok_or_else(|| bad(key))
}

pub fn uint_of(b: &Bson) -> Option<u64> {
    match b {
        Bson::Int32(i) => u64::try_from(*i).ok(),
        Bson::Int64(i) => u64::try_from(*i).ok(),
        Bson::Double(f) if *f >= 0.0 && f.fract() == 0.0 => Some(*f as u64),
        _ => None,
    }
}

pub fn opt_str(d: &Document, key: &str) -> StoreResult<Option<String>> {
    match d.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(key)),
    }
}

pub fn req_str(d: &Document, key: &str) -> StoreResult<String> {
    opt_str(d, key)?.ok_or_else(|| bad(key))
}

pub fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub fn opt_bson<T: Into<Bson>>(v: Option<T>) -> Bson {
    v.map_or(Bson::Null, Into::into)
}

pub fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

pub fn enum_of<T: serde::de::DeserializeOwned>(d: &Document, key: &str) -> StoreResult<T> {
    let s = req_str(d, key)?;
    serde_json::from_value(serde_json::Value::String(s)).map_err(|_| bad(key))
}

pub async fn ping(db: &Database, retry: &RetryPolicy) -> StoreResult<()> {
    retry.run(|| db.run_command(doc! { "ping": 1 })).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_are_scrubbed() {
        let msg = "failed to reach mongodb://user:pa55@host:10255/?ssl=true and mongodb+srv://u:p@x.net now";
        let out = scrub(msg, "");
        assert!(!out.contains("pa55") && !out.contains("u:p@"), "{out}");
        assert_eq!(scrub("secret-part here", "secret-part"), "<redacted> here");
        let settings = MongoSettings::new("mongodb://user:hunter2@h/", "vote");
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn refused_credentials_are_reported_and_answered_503() {
        let notify = std::sync::Arc::new(tokio::sync::Notify::new());
        let policy = RetryPolicy {
            on_credentials_rejected: CredentialsRejected::notifying(notify.clone()),
            ..RetryPolicy::default()
        };
        // `AuthenticationFailed` (18), as a server answers a refused login (a failed handshake is
        // `ErrorKind::Authentication`, which the driver alone can make).
        let command: mongodb::error::CommandError = mongodb::bson::deserialize_from_document(doc! {
            "code": 18, "codeName": "AuthenticationFailed", "errmsg": "Authentication failed.",
        })
        .expect("command error");
        let refused = MongoError::from(ErrorKind::Command(command));
        assert!(credentials_rejected(&refused));
        let result = policy.run(|| async { Err::<(), _>(refused.clone()) }).await;
        assert!(
            matches!(result, Err(StoreError::CredentialsRejected { .. })),
            "{result:?}"
        );
        let response = axum::response::IntoResponse::into_response(crate::Problem::from(result.expect_err("refused")));
        assert_eq!(response.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        assert!(matches!(classify(&refused), Failure::CredentialsRejected { .. }));
        tokio::time::timeout(Duration::from_secs(1), notify.notified())
            .await
            .expect("a refused login is reported");
        // Other failures are not reported.
        let unreachable = MongoError::from(ErrorKind::Io(std::sync::Arc::new(
            std::io::ErrorKind::ConnectionRefused.into(),
        )));
        assert!(!credentials_rejected(&unreachable));
        let quiet = RetryPolicy {
            on_credentials_rejected: CredentialsRejected::notifying(notify.clone()),
            deadline: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        let _ = quiet.run(|| async { Err::<(), _>(unreachable.clone()) }).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), notify.notified())
                .await
                .is_err(),
            "an unreachable server is not a refusal"
        );
    }

    #[test]
    fn a_refused_server_certificate_is_named_up_front() {
        let topology = "Server selection timeout: No available servers. Topology: { Type: Unknown, Servers: [ { \
                        Address: 127.0.0.1:25617, Type: Unknown, Error: Kind: I/O error: invalid peer certificate: \
                        UnknownIssuer, labels: {} } ] }";
        assert_eq!(tls_refusal(topology), Some("invalid peer certificate: UnknownIssuer"));
        assert_eq!(
            tls_refusal("I/O error: invalid peer certificate: BadSignature"),
            Some("invalid peer certificate: BadSignature")
        );
        assert_eq!(tls_refusal("I/O error: connection refused"), None);
        let e = MongoError::from(ErrorKind::Io(std::sync::Arc::new(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        ))));
        let Failure::Unreachable { message } = classify(&e) else {
            panic!("a refused certificate is an unreachable database")
        };
        assert!(
            message.starts_with(
                "TLS: the database's certificate was refused (invalid peer certificate: UnknownIssuer; is tlsCAFile the CA that signed it?)"
            ),
            "{message}"
        );
    }

    #[test]
    fn retry_after_is_read_from_cosmos_messages() {
        let m = "Error=16500, RetryAfterMs=72, Details='Response status code does not indicate success'";
        assert_eq!(retry_after_hint(m), Some(Duration::from_millis(72)));
        assert_eq!(retry_after_hint("Request rate is large"), None);
    }
}

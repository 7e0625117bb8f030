//! MongoDB / Azure Cosmos DB for MongoDB storage, with the official `mongodb` driver.
//!
//! One [`mongodb::Client`] per process ([`build_client`]) is shared by the stores; each store takes
//! the client and a database name and, in its `open` constructor, creates its collections and
//! indexes idempotently before anything is written (Cosmos DB only builds unique indexes on empty
//! collections; here the only uniqueness relied on is `_id`'s, which every server enforces).
//!
//! # Layout
//!
//! `polls` (poll service database, default `poll`): one document per poll, `_id` the poll id as an
//! ObjectId (the 24-hex id *is* an ObjectId's hex), so new polls and the predecessor's look alike.
//! Times are RFC 3339 strings with nanoseconds in UTC (`2025-01-02T03:04:05.123456789Z`): fixed
//! width, so they compare and sort as strings, and they round-trip exactly. A document without a
//! `revision` field is the predecessor's (`{_id: ObjectId, name, desc, options: [..],
//! votes: {count}}`) and reads as a poll created at its ObjectId's timestamp, `max_choices` 1,
//! results `always`, dedupe `ip`, no admin token, `legacy_votes = votes.count`, revision 0.
//! Listing sorts by `{created_at: -1, _id: -1}` (index `newest_first`); a legacy poll has no
//! `created_at`, sorts as null, i.e. after every new poll, then by ObjectId (its creation time).
//!
//! `ballots` (vote service database, default `vote`): one document per ballot, with
//! `_id = "<poll_id>:<key>"`. The poll id is 24 hex characters, so the `_id` is unambiguous.
//!
//! # Exactly once, without transactions
//!
//! A ballot's identity *is* its `_id`, so a second insert of the same `(poll, key)` fails with
//! duplicate key (11000) in the database itself, under any concurrency, on every replica and
//! every MongoDB-protocol server: there is no check-then-insert. On 11000 the stored ballot is
//! read back and returned as [`CastOutcome::Duplicate`] (or as `Accepted` when it is this very
//! ballot, same ballot id, e.g. after the driver retried an insert whose first reply was lost).
//! The insert uses write concern `{w: "majority", j: true}`, so `Accepted` means durable.
//! Concurrent ballots share one unordered `insertMany` (group commit, see [`writer`]); a
//! duplicate in a batch fails alone, with the same 11000.
//!
//! # Tallies: counters that are a cache of the ballots
//!
//! There are no multi-document transactions to lean on (several Cosmos DB tiers and
//! MongoDB-protocol servers have none), so a vote stays exactly one write, and the counters are
//! kept so that a crash at any instant cannot make them count a ballot twice or lose one for good:
//!
//! - every batch of this process (writer `w`, random per store) has a sequence number `s`, written
//!   into its ballots; a counter document per (poll, writer) holds the counts of that writer's
//!   ballots in batches `s <= seq`, and only moves by one conditional update from a known `seq`
//!   (the `counters` module), after every batch up to the new `seq` is acknowledged (the
//!   [`applier`]); a retry or a replay finds `seq` moved and changes nothing;
//! - a tally is the sum of the counters plus one aggregation of the ballots no counter covers yet
//!   (`s > seq` per writer, index `{poll_id, w, s}`): every stored ballot is counted once, by its
//!   counter or by that tail, at every instant, and a refresh costs the writers plus the new
//!   ballots, not the poll's size. This process's own part comes from memory (the `tallies`
//!   module), so it reads its own writes at once; other writers' part is kept for
//!   `tally_cache_ttl` and then refreshed in the background;
//! - a batch whose outcome is unclear (the command failed or timed out as a whole) holds the
//!   counter back until it has settled, then its stored ballots are counted in the database;
//! - writers hold a lease (`<ballots>_writers`); a dead writer's tail is adopted by another
//!   replica once no batch of it can still land; [`BallotStore::repair`] rebuilds counters from
//!   the ballots (after a failover); `recount` reads the ballots one by one (one streamed cursor) as the
//!   ground truth the tally must equal.
//!
//! # Shard keys (MongoDB sharded clusters, Cosmos DB partition keys)
//!
//! - `polls`: `_id` (hashed on MongoDB). Polls are few and read by id; the listing is a
//!   scatter-gather either way. `_id` is the only unique key, so uniqueness holds cluster-wide.
//! - `ballots`: `poll_id`, and on MongoDB `{poll_id: 1, _id: 1}`. A unique index must contain the
//!   shard key, and `_id` is only unique per shard (per logical partition on Cosmos DB) unless it
//!   is the shard key. Because the ballot `_id` embeds the poll id, every copy of one `_id` routes
//!   to the same shard/partition, whose `_id` index then rejects the duplicate: exactly-once holds
//!   cluster-wide. `poll_id` also keeps a poll's ballots together, so the tally aggregation,
//!   `has_voted` and `purge` are single-partition. Sharding by `_id` alone would spread a hot poll
//!   better but turn every tally into a cross-partition fan-out; the compound key on MongoDB keeps
//!   chunks splittable inside one huge poll. Cost on Cosmos DB: a logical partition holds at most
//!   20 GB (tens of millions of ballots per poll) and one poll's write rate is bounded by one
//!   physical partition.
//!   Create sharded collections before the first start, e.g. MongoDB:
//!   `sh.shardCollection("vote.ballots", {poll_id: 1, _id: 1})`,
//!   `sh.shardCollection("poll.polls", {_id: "hashed"})`; Cosmos DB:
//!   `db.runCommand({customAction: "CreateCollection", collection: "ballots", shardKey: "poll_id"})`.
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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use mongodb::bson::{Bson, Document, doc, oid::ObjectId};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{Acknowledgment, ClientOptions, DatabaseOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, Database, IndexModel};
use tokio::sync::{mpsc, oneshot};

mod counters;
mod tallies;
use counters::Counters;
use tallies::{Read, Tallies};

use super::{BallotStore, PollStore, Repair, StoreError, StoreResult};
use crate::domain::{
    BallotRecord, CastOutcome, DedupePolicy, PollQuery, PollRecord, ResultsVisibility, StatusFilter, Tally,
};

/// Default collection names.
pub const POLLS_COLLECTION: &str = "polls";
pub const BALLOTS_COLLECTION: &str = "ballots";

const DUPLICATE_KEY: i32 = 11000;
const DUPLICATE_KEY_LEGACY: i32 = 11001;
const THROTTLED: i32 = 16500;
const NAMESPACE_EXISTS: i32 = 48;
const AUTHENTICATION_FAILED: i32 = 18;

/// How to reach the database. `uri` is a secret: it is never logged, and `Debug` masks it.
#[derive(Clone)]
pub struct MongoSettings {
    /// `mongodb://…` or `mongodb+srv://…`, with credentials and options (`retryWrites=false`,
    /// `tls=true`, … are honoured as given).
    pub uri: String,
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
    /// How long a computed tally may be served from this process's cache; zero disables it.
    pub tally_cache_ttl: Duration,
    /// Ballot batches (`insertMany`) in flight at once (see [`MongoBallotStore`]'s writer).
    pub write_batches_in_flight: usize,
    pub polls_collection: String,
    pub ballots_collection: String,
    /// Told when the server refuses the URI's credentials (Key Vault then reads the secret again).
    pub on_credentials_rejected: CredentialsRejected,
}

impl MongoSettings {
    /// Settings with the defaults below for everything but the URI and database.
    pub fn new(uri: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            database: database.into(),
            app_name: None,
            max_pool_size: None,
            min_pool_size: None,
            connect_timeout: Duration::from_secs(3),
            server_selection_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(5),
            tally_cache_ttl: Duration::from_millis(250),
            write_batches_in_flight: 2,
            polls_collection: POLLS_COLLECTION.into(),
            ballots_collection: BALLOTS_COLLECTION.into(),
            on_credentials_rejected: CredentialsRejected::default(),
        }
    }

    /// The per-store knobs of these settings.
    pub fn tuning(&self) -> StoreTuning {
        StoreTuning {
            retry: RetryPolicy {
                deadline: self.operation_timeout,
                on_credentials_rejected: self.on_credentials_rejected.clone(),
                ..RetryPolicy::default()
            },
            tally_cache_ttl: self.tally_cache_ttl,
            polls_collection: self.polls_collection.clone(),
            ballots_collection: self.ballots_collection.clone(),
            batches_in_flight: self.write_batches_in_flight,
        }
    }
}

impl std::fmt::Debug for MongoSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoSettings")
            .field("uri", &"<redacted>")
            .field("database", &self.database)
            .field("app_name", &self.app_name)
            .field("max_pool_size", &self.max_pool_size)
            .field("min_pool_size", &self.min_pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("server_selection_timeout", &self.server_selection_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("tally_cache_ttl", &self.tally_cache_ttl)
            .field("write_batches_in_flight", &self.write_batches_in_flight)
            .field("polls_collection", &self.polls_collection)
            .field("ballots_collection", &self.ballots_collection)
            .finish()
    }
}

/// Builds the process's one client. No I/O happens here except the DNS look-ups of a
/// `mongodb+srv://` URI; servers are contacted lazily, so this succeeds while the database is down.
pub async fn build_client(settings: &MongoSettings) -> StoreResult<Client> {
    let mut options = ClientOptions::parse(settings.uri.as_str()).await.map_err(|e| {
        let message = scrub(
            &format!("invalid MongoDB connection string: {}", describe(&e)),
            &settings.uri,
        );
        match classify(&e) {
            Failure::Unreachable { .. } => StoreError::unavailable(message),
            _ => StoreError::Internal(message),
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
        StoreError::Internal(scrub(
            &format!("cannot build MongoDB client: {}", describe(&e)),
            &settings.uri,
        ))
    })
}

/// Per-store behaviour, see [`MongoSettings::tuning`].
#[derive(Debug, Clone)]
pub struct StoreTuning {
    pub retry: RetryPolicy,
    pub tally_cache_ttl: Duration,
    pub polls_collection: String,
    pub ballots_collection: String,
    /// Ballot batches (`insertMany`) in flight at once; see [`MongoBallotStore`]'s writer.
    pub batches_in_flight: usize,
}

impl Default for StoreTuning {
    fn default() -> Self {
        MongoSettings::new(String::new(), String::new()).tuning()
    }
}

/// The database handle every write goes through: `{w: "majority", j: true}`, and a server-side
/// write-concern timeout equal to the operation deadline (so a write never waits forever for a
/// majority).
fn database(client: &Client, name: &str, retry: &RetryPolicy) -> Database {
    let wc = WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .w_timeout(retry.deadline)
        .build();
    client.database_with_options(name, DatabaseOptions::builder().write_concern(wc).build())
}

/// Creates `name` unless it exists, then `indexes` (creating an existing identical index is a no-op).
async fn ensure_collection(
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

fn index(name: &str, keys: Document) -> IndexModel {
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
/// The n-th retry (n from 0) waits `max(RetryAfterMs, min(base_delay * 2^n, max_delay))`; there
/// are at most `max_retries` retries, and none that would end past `deadline` (counted from the
/// first attempt). Then: `StoreError::Unavailable` with the server's hint (at least 1 s) as
/// `retry_after`. Unreachable-database errors are not retried here (server selection already
/// waited); they become `Unavailable` with 1 s at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub deadline: Duration,
    /// Told about every failure that is the server refusing our credentials.
    pub on_credentials_rejected: CredentialsRejected,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 6,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            deadline: Duration::from_secs(5),
            on_credentials_rejected: CredentialsRejected::default(),
        }
    }
}

/// Where "the database refused our credentials" is reported: a rotated password then gets the
/// connection string read again from Key Vault at once instead of at the next refresh. Does
/// nothing unless made with [`CredentialsRejected::notifying`].
#[derive(Clone, Default)]
pub struct CredentialsRejected(Option<std::sync::Arc<tokio::sync::Notify>>);

impl CredentialsRejected {
    /// Reports to `notify` (one stored permit however many failures: the reader coalesces them).
    pub fn notifying(notify: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self(Some(notify))
    }

    /// Whether a report reaches someone (who may then change the connection string).
    pub fn is_heard(&self) -> bool {
        self.0.is_some()
    }

    pub fn report(&self) {
        if let Some(n) = &self.0 {
            n.notify_one();
        }
    }
}

impl std::fmt::Debug for CredentialsRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "CredentialsRejected(reported)"
        } else {
            "CredentialsRejected(ignored)"
        })
    }
}

impl PartialEq for CredentialsRejected {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for CredentialsRejected {}

impl RetryPolicy {
    /// The pure decision after a failure, given how many retries were already made and how much
    /// time has passed since the first attempt.
    pub fn decide(&self, failure: Failure, retries_done: u32, elapsed: Duration) -> Decision {
        match failure {
            Failure::Throttled { retry_after, message } => {
                let exp = self
                    .base_delay
                    .saturating_mul(2u32.saturating_pow(retries_done.min(31)));
                let delay = exp.min(self.max_delay).max(retry_after.unwrap_or_default());
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
            Failure::Fatal { message } => Decision::GiveUp(StoreError::Internal(message)),
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
fn codes(e: &MongoError) -> Vec<i32> {
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
fn describe(e: &MongoError) -> String {
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
fn scrub(message: &str, secret: &str) -> String {
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
fn fmt_time(t: DateTime<Utc>) -> String {
    match t.year() {
        y if y > 9999 => "~".to_owned(),
        y if y < 0 => String::new(),
        _ => t.to_rfc3339_opts(SecondsFormat::Nanos, true),
    }
}

fn bad(what: &str) -> StoreError {
    StoreError::Internal(format!("malformed stored document: {what}"))
}

fn time_of(b: &Bson) -> Option<DateTime<Utc>> {
    match b {
        Bson::String(s) => DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc)),
        Bson::DateTime(d) => DateTime::<Utc>::from_timestamp_millis(d.timestamp_millis()),
        _ => None,
    }
}

fn opt_time(d: &Document, key: &str) -> StoreResult<Option<DateTime<Utc>>> {
    match d.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(b) => time_of(b).map(Some).ok_or_else(|| bad(key)),
    }
}

fn req_time(d: &Document, key: &str) -> StoreResult<DateTime<Utc>> {
    opt_time(d, key)?.ok_or_else(|| bad(key))
}

fn uint_of(b: &Bson) -> Option<u64> {
    match b {
        Bson::Int32(i) => u64::try_from(*i).ok(),
        Bson::Int64(i) => u64::try_from(*i).ok(),
        Bson::Double(f) if *f >= 0.0 && f.fract() == 0.0 => Some(*f as u64),
        _ => None,
    }
}

fn opt_str(d: &Document, key: &str) -> StoreResult<Option<String>> {
    match d.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(Bson::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(key)),
    }
}

fn req_str(d: &Document, key: &str) -> StoreResult<String> {
    opt_str(d, key)?.ok_or_else(|| bad(key))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn opt_bson<T: Into<Bson>>(v: Option<T>) -> Bson {
    v.map_or(Bson::Null, Into::into)
}

fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn enum_of<T: serde::de::DeserializeOwned>(d: &Document, key: &str) -> StoreResult<T> {
    let s = req_str(d, key)?;
    serde_json::from_value(serde_json::Value::String(s)).map_err(|_| bad(key))
}

/// Parses a 24-hex poll id as the ObjectId it is stored as.
fn poll_oid(id: &str) -> Option<ObjectId> {
    ObjectId::parse_str(id).ok()
}

fn poll_to_doc(p: &PollRecord) -> StoreResult<Document> {
    let oid =
        poll_oid(&p.id).ok_or_else(|| StoreError::Internal(format!("poll id {:?} is not 24 hex digits", p.id)))?;
    Ok(doc! {
        "_id": oid,
        "name": &p.name,
        "desc": &p.desc,
        "options": &p.options,
        "max_choices": i64::from(p.max_choices),
        "closes_at": opt_bson(p.closes_at.map(fmt_time)),
        "closed_at": opt_bson(p.closed_at.map(fmt_time)),
        "results": enum_str(&p.results),
        "dedupe": enum_str(&p.dedupe),
        "created_at": fmt_time(p.created_at),
        "updated_at": fmt_time(p.updated_at),
        "admin_token_hash": opt_bson(p.admin_token_hash.clone()),
        "legacy_votes": to_i64(p.legacy_votes),
        "revision": to_i64(p.revision),
    })
}

fn doc_to_poll(d: &Document) -> StoreResult<PollRecord> {
    let oid = d.get_object_id("_id").map_err(|_| bad("_id"))?;
    if !d.contains_key("revision") {
        return Ok(legacy_poll(oid, d));
    }
    Ok(PollRecord {
        id: oid.to_hex(),
        name: req_str(d, "name")?,
        desc: opt_str(d, "desc")?.unwrap_or_default(),
        options: string_list(d, "options")?,
        max_choices: d
            .get("max_choices")
            .and_then(uint_of)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad("max_choices"))?,
        closes_at: opt_time(d, "closes_at")?,
        closed_at: opt_time(d, "closed_at")?,
        results: enum_of::<ResultsVisibility>(d, "results")?,
        dedupe: enum_of::<DedupePolicy>(d, "dedupe")?,
        created_at: req_time(d, "created_at")?,
        updated_at: req_time(d, "updated_at")?,
        admin_token_hash: opt_str(d, "admin_token_hash")?,
        legacy_votes: d.get("legacy_votes").and_then(uint_of).unwrap_or(0),
        revision: d.get("revision").and_then(uint_of).ok_or_else(|| bad("revision"))?,
    })
}

fn string_list(d: &Document, key: &str) -> StoreResult<Vec<String>> {
    let list = d.get_array(key).map_err(|_| bad(key))?;
    list.iter()
        .map(|b| match b {
            Bson::String(s) => Ok(s.clone()),
            _ => Err(bad(key)),
        })
        .collect()
}

/// A poll written by the predecessor: `{_id: ObjectId, name, desc, options: [..], votes: {count}}`.
/// Read leniently: whatever is missing takes the predecessor's implicit default.
fn legacy_poll(oid: ObjectId, d: &Document) -> PollRecord {
    let created = DateTime::<Utc>::from_timestamp_millis(oid.timestamp().timestamp_millis()).unwrap_or_default();
    let text = |b: &Bson| match b {
        Bson::String(s) => s.clone(),
        other => other.to_string(),
    };
    PollRecord {
        id: oid.to_hex(),
        name: d.get("name").map(text).unwrap_or_default(),
        desc: d.get("desc").map(text).unwrap_or_default(),
        options: d
            .get_array("options")
            .map(|a| a.iter().map(text).collect())
            .unwrap_or_default(),
        max_choices: 1,
        closes_at: None,
        closed_at: None,
        results: ResultsVisibility::Always,
        dedupe: DedupePolicy::Ip,
        created_at: created,
        updated_at: created,
        admin_token_hash: None,
        legacy_votes: d
            .get_document("votes")
            .ok()
            .and_then(|v| v.get("count"))
            .and_then(uint_of)
            .unwrap_or(0),
        revision: 0,
    }
}

fn ballot_id(poll_id: &str, key: &str) -> String {
    format!("{poll_id}:{key}")
}

/// The stored document of a ballot (public so the load benchmark's raw-driver reference writes
/// exactly what the store writes).
pub fn ballot_to_doc(b: &BallotRecord) -> Document {
    doc! {
        "_id": ballot_id(&b.poll_id, &b.key),
        "poll_id": &b.poll_id,
        "key": &b.key,
        "ballot_id": &b.id,
        "voter": opt_bson(b.voter.clone()),
        "choices": b.choices.iter().map(|&c| i64::from(c)).collect::<Vec<_>>(),
        "idempotency_key": opt_bson(b.idempotency_key.clone()),
        "fingerprint": &b.fingerprint,
        "created_at": fmt_time(b.created_at),
    }
}

fn choices_of(d: &Document) -> StoreResult<Vec<u32>> {
    let list = d.get_array("choices").map_err(|_| bad("choices"))?;
    list.iter()
        .map(|c| {
            uint_of(c)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad("choices"))
        })
        .collect()
}

fn doc_to_ballot(d: &Document) -> StoreResult<BallotRecord> {
    Ok(BallotRecord {
        id: req_str(d, "ballot_id")?,
        poll_id: req_str(d, "poll_id")?,
        key: req_str(d, "key")?,
        voter: opt_str(d, "voter")?,
        choices: choices_of(d)?,
        idempotency_key: opt_str(d, "idempotency_key")?,
        fingerprint: req_str(d, "fingerprint")?,
        created_at: req_time(d, "created_at")?,
    })
}

// ---------------------------------------------------------------------------------------------
// Polls

/// Polls in MongoDB / Cosmos DB.
pub struct MongoPollStore {
    db: Database,
    polls: Collection<Document>,
    retry: RetryPolicy,
}

impl MongoPollStore {
    /// Opens the store on `database` (usually `poll`) and creates its collection and indexes.
    pub async fn open(client: Client, database_name: &str, tuning: StoreTuning) -> StoreResult<Self> {
        let db = database(&client, database_name, &tuning.retry);
        let newest_first = index("newest_first", doc! { "created_at": -1, "_id": -1 });
        ensure_collection(&db, &tuning.polls_collection, vec![newest_first], &tuning.retry).await?;
        let polls = db.collection(&tuning.polls_collection);
        Ok(Self {
            db,
            polls,
            retry: tuning.retry,
        })
    }
}

impl MongoPollStore {
    /// Whether the listing cursor points at a legacy poll: one without `revision` (and so without
    /// `created_at`). When the poll is gone, the cursor's own shape tells: a legacy poll's
    /// `created_at` is its ObjectId's whole second.
    async fn is_legacy(&self, oid: ObjectId, created_at: DateTime<Utc>) -> StoreResult<bool> {
        let found = self
            .retry
            .run(|| {
                self.polls
                    .find_one(doc! { "_id": oid })
                    .projection(doc! { "revision": 1 })
            })
            .await?;
        Ok(match found {
            Some(d) => !d.contains_key("revision"),
            None => {
                created_at.timestamp_subsec_nanos() == 0
                    && created_at.timestamp_millis() == oid.timestamp().timestamp_millis()
            }
        })
    }
}

/// The documents strictly after the cursor in `{created_at: -1, _id: -1}` order. A legacy poll
/// (no `created_at`) sorts as null: after every new poll, among legacy polls by ObjectId.
fn after_filter(created_at: DateTime<Utc>, oid: ObjectId, cursor_is_legacy: bool) -> Document {
    if cursor_is_legacy {
        return doc! { "created_at": Bson::Null, "_id": { "$lt": oid } };
    }
    let t = fmt_time(created_at);
    doc! { "$or": [
        { "created_at": { "$lt": &t } },
        { "created_at": &t, "_id": { "$lt": oid } },
        { "created_at": Bson::Null },
    ] }
}

fn status_filter(status: StatusFilter, now: DateTime<Utc>) -> Document {
    let now = fmt_time(now);
    match status {
        StatusFilter::Open => doc! {
            "closed_at": Bson::Null,
            "$or": [ { "closes_at": Bson::Null }, { "closes_at": { "$gt": &now } } ],
        },
        StatusFilter::Closed => doc! {
            "$or": [ { "closed_at": { "$ne": Bson::Null } }, { "closes_at": { "$lte": &now } } ],
        },
    }
}

#[async_trait]
impl PollStore for MongoPollStore {
    async fn create(&self, poll: &PollRecord) -> StoreResult<()> {
        let doc = &poll_to_doc(poll)?;
        let inserted = self
            .retry
            .run(|| async move {
                match self.polls.insert_one(doc.clone()).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_duplicate_key(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if !inserted {
            // Our own insert, retried by the driver after a lost reply, also lands here: it is
            // ours when the stored document is exactly what we wrote.
            if self.get(&poll.id).await?.as_ref() != Some(poll) {
                return Err(StoreError::Internal(format!("poll id {} already exists", poll.id)));
            }
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> StoreResult<Option<PollRecord>> {
        let Some(oid) = poll_oid(id) else { return Ok(None) };
        let found = self.retry.run(|| self.polls.find_one(doc! { "_id": oid })).await?;
        found.as_ref().map(doc_to_poll).transpose()
    }

    async fn list(&self, query: &PollQuery) -> StoreResult<Vec<PollRecord>> {
        let mut clauses = Vec::new();
        if let Some(c) = &query.after {
            let Some(oid) = poll_oid(&c.id) else {
                return Err(StoreError::Internal(format!(
                    "listing cursor id {:?} is not a poll id",
                    c.id
                )));
            };
            clauses.push(after_filter(
                c.created_at,
                oid,
                self.is_legacy(oid, c.created_at).await?,
            ));
        }
        if let Some(s) = query.status {
            clauses.push(status_filter(s, query.now));
        }
        let filter = &if clauses.is_empty() {
            doc! {}
        } else {
            doc! { "$and": clauses }
        };
        let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
        let docs = self
            .retry
            .run(|| async move {
                let mut cursor = self
                    .polls
                    .find(filter.clone())
                    .sort(doc! { "created_at": -1, "_id": -1 })
                    .limit(limit)
                    .await?;
                let mut out = Vec::new();
                while cursor.advance().await? {
                    out.push(cursor.deserialize_current()?);
                }
                Ok(out)
            })
            .await?;
        docs.iter().map(doc_to_poll).collect()
    }

    async fn replace(&self, poll: &PollRecord, expected_revision: u64) -> StoreResult<bool> {
        let Some(oid) = poll_oid(&poll.id) else {
            return Ok(false);
        };
        let doc = poll_to_doc(poll)?;
        // A legacy poll has no `revision` field: it is revision 0.
        let filter = if expected_revision == 0 {
            doc! { "_id": oid, "$or": [ { "revision": 0_i64 }, { "revision": { "$exists": false } } ] }
        } else {
            doc! { "_id": oid, "revision": to_i64(expected_revision) }
        };
        let res = self
            .retry
            .run(|| self.polls.replace_one(filter.clone(), doc.clone()))
            .await?;
        Ok(res.matched_count == 1)
    }

    async fn delete(&self, id: &str) -> StoreResult<bool> {
        let Some(oid) = poll_oid(id) else { return Ok(false) };
        let res = self.retry.run(|| self.polls.delete_one(doc! { "_id": oid })).await?;
        Ok(res.deleted_count == 1)
    }

    async fn ping(&self) -> StoreResult<()> {
        ping(&self.db, &self.retry).await
    }
}

async fn ping(db: &Database, retry: &RetryPolicy) -> StoreResult<()> {
    retry.run(|| db.run_command(doc! { "ping": 1 })).await.map(drop)
}

// ---------------------------------------------------------------------------------------------
// Ballots

/// Ballots in MongoDB / Cosmos DB, with their tally counters (see the module docs).
pub struct MongoBallotStore {
    db: Database,
    ballots: Collection<Document>,
    retry: RetryPolicy,
    /// What the writer, the applier, the lease keeper and the tally reads share.
    shared: Writer,
    /// The group-commit writer's queue (see [`writer`]).
    inserts: mpsc::Sender<InsertJob>,
    /// Held while a read refreshes tallies nothing was kept for.
    inline: Arc<tokio::sync::Mutex<()>>,
    /// Stops the store's background tasks when the store is dropped.
    _stop: tokio_util::sync::DropGuard,
}

fn lock(tallies: &Mutex<Tallies>) -> MutexGuard<'_, Tallies> {
    tallies.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When this writer's lease was last renewed.
struct Lease {
    base: Instant,
    /// Milliseconds after `base`, plus one (0: never).
    renewed: AtomicU64,
}

impl Lease {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            renewed: AtomicU64::new(0),
        }
    }

    fn renew(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.renewed.store(ms + 1, Ordering::Relaxed);
    }

    fn held(&self) -> bool {
        match self.renewed.load(Ordering::Relaxed) {
            0 => false,
            r => {
                let since = Duration::from_millis(r - 1);
                self.base.elapsed().saturating_sub(since) < counters::WRITE_LEASE
            }
        }
    }
}

impl MongoBallotStore {
    /// Opens the store on `database` (usually `vote`), creates its collections and indexes and
    /// takes this writer's lease. Starts the store's writer, applier and lease tasks, so it must be
    /// called inside a tokio runtime.
    pub async fn open(client: Client, database_name: &str, tuning: StoreTuning) -> StoreResult<Self> {
        let db = database(&client, database_name, &tuning.retry);
        let poll_voter = index("poll_voter", doc! { "poll_id": 1, "voter": 1 });
        let poll_writer_seq = index("poll_writer_seq", doc! { "poll_id": 1, "w": 1, "s": 1 });
        ensure_collection(
            &db,
            &tuning.ballots_collection,
            vec![poll_voter, poll_writer_seq],
            &tuning.retry,
        )
        .await?;
        let ballots: Collection<Document> = db.collection(&tuning.ballots_collection);
        let me = rand::random::<i64>();
        let (counters, existed) = Counters::open(&db, &ballots, &tuning.retry, me).await?;
        counters.heartbeat().await?;
        let lease = Arc::new(Lease::new());
        lease.renew();
        // After this, no attempt of a failed batch can still land (its attempts are bounded by
        // the deadline; the margin covers a server finishing one it had already received).
        let settle = tuning.retry.deadline.saturating_mul(2) + Duration::from_secs(5);
        let shared = Writer {
            counters,
            tallies: Arc::new(Mutex::new(Tallies::new(tuning.tally_cache_ttl, settle))),
            lease,
            applier: Arc::new(tokio::sync::Notify::new()),
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let (inserts, queue) = mpsc::channel(INSERT_QUEUE);
        tokio::spawn(writer(shared.clone(), queue, tuning.batches_in_flight.max(1)));
        tokio::spawn(applier(shared.clone(), stop.clone()));
        tokio::spawn(lease_keeper(shared.clone(), stop.clone()));
        if !existed {
            let n = tuning.retry.run(|| ballots.estimated_document_count()).await?;
            if n > 0 {
                // Ballots written before counters existed: count them into counters once.
                let c = shared.counters.clone();
                tokio::spawn(async move {
                    tracing::warn!(ballots = n, "creating tally counters for existing ballots");
                    match repair_all(&c, None).await {
                        Ok(r) => tracing::warn!(polls = r.len(), "tally counters created for existing ballots"),
                        Err(e) => tracing::error!(error = %e, "creating tally counters failed; run the repair"),
                    }
                });
            }
        }
        Ok(Self {
            db,
            ballots,
            retry: tuning.retry,
            shared,
            inserts,
            inline: Arc::new(tokio::sync::Mutex::new(())),
            _stop: stop.drop_guard(),
        })
    }

    /// Inserts one ballot document through the writer: `true` when stored now, `false` when its
    /// `_id` already existed. Returns once the insert is acknowledged with the store's write
    /// concern (durable).
    async fn insert(&self, doc: Document, ballot: &BallotRecord) -> StoreResult<bool> {
        let (reply, answer) = oneshot::channel();
        let job = InsertJob {
            doc,
            poll_id: ballot.poll_id.clone(),
            choices: ballot.choices.clone(),
            reply,
            span: crate::metrics::caller_span(),
        };
        self.inserts
            .send(job)
            .await
            .map_err(|_| StoreError::Internal("the ballot writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Internal("the ballot writer dropped a ballot".into()))?
    }

    async fn find_ballot(&self, id: &str) -> StoreResult<Option<BallotRecord>> {
        let found = self.retry.run(|| self.ballots.find_one(doc! { "_id": id })).await?;
        found.as_ref().map(doc_to_ballot).transpose()
    }

    /// Folds the uncounted ballots of dead writers (whose lease ran out) into their counters;
    /// returns how many writers were adopted. Every replica does this by itself every
    /// ~30 s; public for operators' tools and tests.
    pub async fn adopt_dead_writers(&self) -> StoreResult<usize> {
        self.shared.counters.adopt_dead().await
    }

    /// Counts the stored ballots of one poll with one cursor whose every batch (not the whole
    /// pass) is bounded, by [`RECOUNT_BATCH_DEADLINE`], so a million ballots are read in full.
    /// (Chunks by `_id` range with a limit are not used: some servers scan the rest of the range
    /// for each.)
    async fn recount_streamed(&self, poll_id: &str) -> StoreResult<Tally> {
        let filter = doc! { "poll_id": poll_id };
        let failed = |e: MongoError| match self.retry.decide(classify(&e), u32::MAX, Duration::MAX) {
            Decision::GiveUp(e) => e,
            Decision::Retry(_) => StoreError::unavailable("the database failed during a recount"),
        };
        let first_batch = RetryPolicy {
            deadline: RECOUNT_BATCH_DEADLINE,
            ..self.retry.clone()
        };
        let mut cursor = first_batch
            .run(|| {
                self.ballots
                    .find(filter.clone())
                    .projection(doc! { "choices": 1 })
                    .batch_size(10_000)
            })
            .await?;
        let mut tally = Tally::default();
        loop {
            match tokio::time::timeout(RECOUNT_BATCH_DEADLINE, cursor.advance()).await {
                Ok(Ok(true)) => {
                    let d: Document = cursor.deserialize_current().map_err(failed)?;
                    tally.add(&choices_of(&d)?);
                }
                Ok(Ok(false)) => return Ok(tally),
                Ok(Err(e)) => return Err(failed(e)),
                Err(_) => {
                    return Err(StoreError::unavailable(format!(
                        "a batch of the recount took longer than {} s",
                        RECOUNT_BATCH_DEADLINE.as_secs()
                    )));
                }
            }
        }
    }
}

#[async_trait]
impl BallotStore for MongoBallotStore {
    async fn cast(&self, ballot: BallotRecord) -> StoreResult<CastOutcome> {
        let id = ballot_id(&ballot.poll_id, &ballot.key);
        let doc = ballot_to_doc(&ballot);
        // A duplicate whose original vanished (purged meanwhile) is tried again, a few times.
        for _ in 0..3 {
            let inserted = self.insert(doc.clone(), &ballot).await?;
            if inserted {
                return Ok(CastOutcome::Accepted(ballot));
            }
            match self.find_ballot(&id).await? {
                // This very ballot (an insert repeated after a lost reply, by the driver or the writer).
                Some(stored) if stored.id == ballot.id => return Ok(CastOutcome::Accepted(stored)),
                Some(stored) => return Ok(CastOutcome::Duplicate(stored)),
                None => continue,
            }
        }
        Err(StoreError::Internal(format!(
            "ballot {id} kept vanishing between insert and read"
        )))
    }

    async fn tally(&self, poll_id: &str) -> StoreResult<Tally> {
        let mut all = self.tallies(&[poll_id.to_owned()]).await?;
        Ok(all.pop().unwrap_or_default())
    }

    async fn tallies(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        let handle = self.shared.clone();
        let (mut out, missing) = handle.read_kept(poll_ids);
        let cache = &crate::metrics::storage().tally_cache;
        for (result, n) in [("hit", poll_ids.len() - missing.len()), ("miss", missing.len())] {
            let labels = crate::metrics::CacheLabels { cache: "tally", result };
            cache.get_or_create(&labels).inc_by(n as u64);
        }
        if !missing.is_empty() {
            // In a task of its own, so that a caller giving up (a client's timeout) does not
            // cancel a refresh the next read can use; and one inline refresh at a time, so a crowd
            // of first reads of one poll (a thousand result streams opening) makes one refresh.
            let gate = self.inline.clone();
            let task = tokio::spawn(async move {
                let keeps = lock(&handle.tallies).keeps();
                let _gate = if keeps { Some(gate.lock_owned().await) } else { None };
                let (mut filled, missing) = handle.read_kept(&missing);
                if !missing.is_empty() {
                    let mut fresh = handle.refresh(&missing).await?.into_iter();
                    for slot in filled.iter_mut().filter(|t| t.is_none()) {
                        *slot = fresh.next();
                    }
                }
                Ok::<_, StoreError>(filled)
            });
            let filled = task
                .await
                .map_err(|e| StoreError::Internal(format!("tally task failed: {e}")))??;
            let mut filled = filled.into_iter();
            for slot in out.iter_mut().filter(|t| t.is_none()) {
                *slot = filled.next().flatten();
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// By the ballot's identity first (`_id` lookups are cheap on every server, FerretDB's
    /// SQLite backend included, which scans a collection for any other filter); then, unless the
    /// poll's ballots are keyed by voter, by the `{poll_id, voter}` index.
    async fn has_voted(&self, poll_id: &str, voter: &str, keyed_by_voter: bool) -> StoreResult<bool> {
        let by_id = doc! { "_id": ballot_id(poll_id, voter) };
        let found = self
            .retry
            .run(|| self.ballots.find_one(by_id.clone()).projection(doc! { "voter": 1 }))
            .await?;
        if found.is_some_and(|d| d.get_str("voter").ok() == Some(voter)) {
            return Ok(true);
        }
        if keyed_by_voter {
            return Ok(false);
        }
        let filter = doc! { "poll_id": poll_id, "voter": voter };
        let found = self
            .retry
            .run(|| self.ballots.find_one(filter.clone()).projection(doc! { "_id": 1 }))
            .await?;
        Ok(found.is_some())
    }

    async fn recount(&self, poll_id: &str) -> StoreResult<Tally> {
        self.recount_streamed(poll_id).await
    }

    async fn recount_many(&self, poll_ids: &[String]) -> StoreResult<Vec<Tally>> {
        let mut out = Vec::with_capacity(poll_ids.len());
        for id in poll_ids {
            out.push(self.recount_streamed(id).await?);
        }
        Ok(out)
    }

    async fn purge(&self, poll_id: &str) -> StoreResult<u64> {
        let res = self
            .retry
            .run(|| self.ballots.delete_many(doc! { "poll_id": poll_id }))
            .await?;
        self.shared.counters.purge(poll_id).await?;
        lock(&self.shared.tallies).purged(poll_id);
        Ok(res.deleted_count)
    }

    async fn ping(&self) -> StoreResult<()> {
        ping(&self.db, &self.retry).await
    }

    async fn repair(&self, poll_id: &str) -> StoreResult<Repair> {
        let report = self.shared.counters.repair(poll_id).await?;
        self.shared.forget_kept(poll_id);
        Ok(report)
    }

    async fn repair_since(&self, since: Option<DateTime<Utc>>) -> StoreResult<Vec<Repair>> {
        let reports = repair_all(&self.shared.counters, since).await?;
        for r in &reports {
            self.shared.forget_kept(&r.poll_id);
        }
        Ok(reports)
    }
}

/// Repairs every poll touched since `since` (all polls with ballots when `None`).
async fn repair_all(counters: &Counters, since: Option<DateTime<Utc>>) -> StoreResult<Vec<Repair>> {
    let polls = counters.touched_since(since).await?;
    let mut out = Vec::with_capacity(polls.len());
    for poll in polls {
        out.push(counters.repair(&poll).await?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Group commit of ballots, and the counters that follow them

/// Ballots waiting for the writer at most; `cast` waits for room beyond that (back-pressure).
const INSERT_QUEUE: usize = 8192;
/// Most ballots in one `insertMany` (far below the server's 100,000 and 48 MB limits).
const MAX_BATCH: usize = 1000;
/// Bound of one batch of a recount (an audit reads every ballot of a poll; some servers compute a
/// whole result before its first batch: SecantusDB takes about 4 s for a million ballots).
const RECOUNT_BATCH_DEADLINE: Duration = Duration::from_secs(60);
/// Counter updates sent at once by the applier.
const UPDATES_AT_ONCE: usize = 16;
/// The applier's rounds start at most this often; the tail a refresh aggregates is about this
/// much of the writers' ballots.
const APPLY_EVERY: Duration = Duration::from_millis(50);

struct InsertJob {
    doc: Document,
    poll_id: String,
    choices: Vec<u32>,
    reply: oneshot::Sender<StoreResult<bool>>,
    /// The caller's span: its batch's span is a child of (or linked to) it.
    span: tracing::Span,
}

/// What the writer's batches, the applier, the lease keeper and the tally reads share.
#[derive(Clone)]
struct Writer {
    counters: Counters,
    tallies: Arc<Mutex<Tallies>>,
    lease: Arc<Lease>,
    /// Woken when a batch finishes.
    applier: Arc<tokio::sync::Notify>,
}

impl Writer {
    /// The kept tallies of `poll_ids` (`None` where nothing usable is kept) and the ids without
    /// one. Stale ones are served as they are (exact for this process's own ballots) while one
    /// background refresh renews them.
    fn read_kept(&self, poll_ids: &[String]) -> (Vec<Option<Tally>>, Vec<String>) {
        let now = Instant::now();
        let mut out = Vec::with_capacity(poll_ids.len());
        let (mut missing, mut stale) = (Vec::new(), Vec::new());
        {
            let mut t = lock(&self.tallies);
            for id in poll_ids {
                out.push(match t.read(id, now) {
                    Read::Fresh(tally) | Read::Refreshing(tally) => Some(tally),
                    Read::Stale(tally) => {
                        stale.push(id.clone());
                        Some(tally)
                    }
                    Read::Missing => {
                        missing.push(id.clone());
                        None
                    }
                });
            }
        }
        if !stale.is_empty() {
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.refresh(&stale).await {
                    tracing::warn!(error = %e, "tally refresh failed");
                }
            });
        }
        (out, missing)
    }

    /// Reads the counters and uncounted ballots of `polls` and keeps the result; the tallies to
    /// serve, in order.
    async fn refresh(&self, polls: &[String]) -> StoreResult<Vec<Tally>> {
        let plans = lock(&self.tallies).plan(polls, Instant::now());
        let start = Instant::now();
        match self.counters.refresh(&plans).await {
            Ok(mut read) => {
                crate::metrics::storage()
                    .tally_refresh
                    .observe(start.elapsed().as_secs_f64());
                let now = Instant::now();
                let mut t = lock(&self.tallies);
                let served = plans
                    .iter()
                    .map(|p| t.fill(p, read.remove(&p.poll).unwrap_or_default(), now))
                    .collect();
                if t.has_suspects() {
                    self.applier.notify_one();
                }
                Ok(served)
            }
            Err(e) => {
                lock(&self.tallies).abandon(polls);
                Err(e)
            }
        }
    }

    /// Drops the kept tally of `poll` (its counters were repaired): the next read refreshes.
    fn forget_kept(&self, poll: &str) {
        lock(&self.tallies).forget_kept(poll);
    }
}

/// The group-commit writer. It takes the first waiting ballot, waits for one of `in_flight`
/// slots, then takes every other ballot already waiting (up to [`MAX_BATCH`]) and stores them
/// all with one unordered `insertMany` under the store's write concern (`{w: "majority",
/// j: true}`): one round trip and one journal commit for the whole batch. While a batch is in
/// flight, the next one gathers, so under load batches grow by themselves and at rest a lone
/// ballot goes out at once. Each caller is answered only when its batch is acknowledged, so
/// `Accepted` still means durable.
///
/// Unordered means every document is tried: a duplicate `_id` (11000) fails that document alone,
/// and its caller gets `false` (then reads the stored ballot, as for a single insert). Nothing
/// else changes about exactly-once: the uniqueness is still the `_id` index's, and retrying a
/// batch after a lost reply is safe because the documents already stored come back as 11000,
/// which `cast` recognises by the ballot id as its own.
///
/// Before a batch goes out, this writer's counter of every poll in it exists (registered once per
/// poll), and its lease is held. Each batch gets a sequence number, written into its documents
/// with the writer id (`s`, `w`); its stored ballots are added to this process's own counts
/// before any caller is answered (so a replica reads its own writes at once), and the applier is
/// woken to fold them into the counters.
async fn writer(w: Writer, mut queue: mpsc::Receiver<InsertJob>, in_flight: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let w = w.clone();
        crate::metrics::storage().batch_size.observe(batch.len() as f64);
        let span = crate::metrics::batch_span(
            "mongodb",
            "insertMany",
            &batch.iter().map(|j| &j.span).collect::<Vec<_>>(),
        );
        let work = async move {
            if let Err(e) = w.prepare(&batch).await {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
                drop(slot);
                return;
            }
            let seq = lock(&w.tallies).begin_batch();
            let docs: Vec<Document> = batch
                .iter_mut()
                .map(|j| {
                    let mut d = std::mem::take(&mut j.doc);
                    d.insert("w", w.counters.me);
                    d.insert("s", to_i64(seq));
                    d
                })
                .collect();
            let (outcomes, clear) = insert_batch(&w.counters.ballots, &w.counters.retry, docs).await;
            {
                let stored: Vec<(&str, &[u32])> = batch
                    .iter()
                    .zip(&outcomes)
                    .filter(|(_, o)| matches!(o, Ok(true)))
                    .map(|(j, _)| (j.poll_id.as_str(), j.choices.as_slice()))
                    .collect();
                let polls = batch.iter().map(|j| j.poll_id.as_str());
                lock(&w.tallies).finish_batch(seq, clear.then_some(stored.as_slice()), polls, Instant::now());
            }
            w.applier.notify_one();
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
            drop(slot);
        };
        tokio::spawn(tracing::Instrument::instrument(work, span));
    }
}

impl Writer {
    /// Checks the lease and registers this writer's counters of the batch's new polls.
    async fn prepare(&self, batch: &[InsertJob]) -> StoreResult<()> {
        if !self.lease.held() {
            return Err(StoreError::unavailable(
                "this vote process could not renew its writer lease (the database is unreachable)",
            ));
        }
        let mut new: Vec<&str> = {
            let t = lock(&self.tallies);
            batch
                .iter()
                .map(|j| j.poll_id.as_str())
                .filter(|p| !t.is_registered(p))
                .collect()
        };
        new.sort_unstable();
        new.dedup();
        if new.is_empty() {
            return Ok(());
        }
        let found = futures_util::future::join_all(new.iter().map(|p| self.counters.register(p))).await;
        let mut t = lock(&self.tallies);
        let mut failed = None;
        for (poll, r) in new.iter().zip(found) {
            match r {
                Ok((seq, counted)) => t.registered(poll, seq, counted),
                Err(e) => failed = Some(e),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// Folds finished batches into this writer's counters, one conditional update per poll (see the
/// `tallies` and `counters` modules); resolves unclear batches once settled, and resynchronises
/// counters found elsewhere than where this process left them. Runs until the store is dropped
/// (then makes one last round).
async fn applier(w: Writer, stop: tokio_util::sync::CancellationToken) {
    let mut backoff = Duration::ZERO;
    loop {
        let wait = if backoff.is_zero() {
            lock(&w.tallies)
                .next_settle()
                .map_or(Duration::from_secs(60), |t| t.saturating_duration_since(Instant::now()))
        } else {
            backoff
        };
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = w.applier.notified() => false,
            () = tokio::time::sleep(wait) => false,
        };
        match apply_round(&w).await {
            Ok(()) => backoff = Duration::ZERO,
            Err(e) => {
                tracing::warn!(error = %e, "tally counter update failed; retrying");
                backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
            }
        }
        if stopping {
            return;
        }
        // Rounds at most this often: under load one update per poll folds many batches.
        tokio::time::sleep(APPLY_EVERY).await;
    }
}

async fn apply_round(w: &Writer) -> StoreResult<()> {
    use futures_util::StreamExt;
    let settled = lock(&w.tallies).settled(Instant::now());
    for (seq, polls) in settled {
        let counts = w.counters.count_batch(seq, &polls).await?;
        lock(&w.tallies).resolved(seq, counts);
    }
    let (updates, suspects) = {
        let mut t = lock(&w.tallies);
        (t.updates_due(), t.take_suspects())
    };
    let me = w.counters.me;
    let moves = updates
        .into_iter()
        .map(|u| (u.poll, Some((u.from, u.delta)), u.to))
        .chain(suspects.into_iter().map(|(poll, to)| (poll, None, to)));
    let results: Vec<(String, StoreResult<(u64, Tally)>)> = futures_util::stream::iter(moves)
        .map(|(poll, update, to)| async move {
            let r = async {
                if let Some((from, delta)) = &update
                    && let Some(done) = w.counters.advance(&poll, me, (*from, to), delta, true).await?
                {
                    return Ok(done);
                }
                resync(&w.counters, &poll, to).await
            }
            .await;
            (poll, r)
        })
        .buffer_unordered(UPDATES_AT_ONCE)
        .collect()
        .await;
    let mut t = lock(&w.tallies);
    let mut failed = None;
    for (poll, r) in results {
        match r {
            Ok((seq, counted)) => t.updated(&poll, seq, counted),
            Err(e) => {
                t.update_failed(&poll);
                failed = Some(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Our counter of `poll` is not where this process left it (a failover rolled it back, or a
/// repair recreated it): brings it to `to` from the stored ballots themselves (every batch up to
/// `to` is finished and clear, so the count is exact).
async fn resync(c: &Counters, poll: &str, to: u64) -> StoreResult<(u64, Tally)> {
    for _ in 0..3 {
        match c.read(poll, c.me).await? {
            Some((seq, counts)) if seq >= to => return Ok((seq, counts)),
            Some((seq, _)) => {
                let (caught, _) = c.count_range(poll, c.me, seq, Some(to)).await?;
                if let Some(done) = c.advance(poll, c.me, (seq, to), &caught, false).await? {
                    tracing::warn!(
                        poll,
                        from = seq,
                        to,
                        "tally counter was behind; caught up from the ballots"
                    );
                    return Ok(done);
                }
            }
            None => {
                let (all, _) = c.count_range(poll, c.me, 0, Some(to)).await?;
                if c.create(poll, c.me, to, &all).await? {
                    tracing::warn!(poll, to, "tally counter was missing; recreated from the ballots");
                    return Ok((to, all));
                }
            }
        }
    }
    Err(StoreError::unavailable(format!(
        "the tally counter of poll {poll} kept moving"
    )))
}

/// Renews this writer's lease every few seconds, and now and then adopts the uncounted ballots
/// of dead writers. Runs until the store is dropped.
async fn lease_keeper(w: Writer, stop: tokio_util::sync::CancellationToken) {
    let jitter = || Duration::from_millis(rand::random::<u64>() % 10_000);
    let mut next_adoption = Instant::now() + jitter();
    loop {
        let wait = match w.counters.heartbeat().await {
            Ok(()) => {
                w.lease.renew();
                counters::HEARTBEAT
            }
            Err(e) => {
                tracing::debug!(error = %e, "writer lease not renewed");
                counters::HEARTBEAT_RETRY
            }
        };
        if Instant::now() >= next_adoption {
            if let Err(e) = w.counters.adopt_dead().await {
                tracing::debug!(error = %e, "adopting dead writers failed");
            }
            next_adoption = Instant::now() + counters::ADOPT_EVERY + jitter();
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the server said about one document of an `insertMany`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DocOutcome {
    Stored,
    /// Its `_id` exists.
    Duplicate,
    /// Throttled (16500): worth sending again.
    Throttled,
    /// Refused for another reason (the server's code).
    Refused(i32),
}

/// The per-document outcome of an unordered `insertMany` of `n` documents, from its error (a
/// batch with write errors); `None` when the command as a whole failed (network, write concern,
/// throttling of the whole command, ...), which the retry policy handles.
fn doc_outcomes(n: usize, result: &Result<(), MongoError>) -> Option<Vec<DocOutcome>> {
    let e = match result {
        Ok(()) => return Some(vec![DocOutcome::Stored; n]),
        Err(e) => e,
    };
    let ErrorKind::InsertMany(m) = e.kind.as_ref() else {
        return None;
    };
    if m.write_concern_error.is_some() {
        return None;
    }
    let mut out = vec![DocOutcome::Stored; n];
    for w in m.write_errors.as_deref()? {
        let slot = out.get_mut(w.index)?;
        *slot = match w.code {
            DUPLICATE_KEY | DUPLICATE_KEY_LEGACY => DocOutcome::Duplicate,
            THROTTLED => DocOutcome::Throttled,
            code => DocOutcome::Refused(code),
        };
    }
    Some(out)
}

/// Stores `docs` with unordered `insertMany`s: whole-command failures go through the retry
/// policy (deadline, backoff, 16500); documents throttled one by one are sent again with the same
/// backoff, within the same deadline. One answer per document, in order: `true` stored, `false`
/// duplicate `_id`; and whether every document's outcome is known (no command failed or timed
/// out as a whole, which may have stored documents nobody was told about).
async fn insert_batch(
    ballots: &Collection<Document>,
    retry: &RetryPolicy,
    docs: Vec<Document>,
) -> (Vec<StoreResult<bool>>, bool) {
    // Attempts sent, and attempts whose every document's outcome came back.
    let (sent_attempts, known_attempts) = (AtomicU32::new(0), AtomicU32::new(0));
    let start = Instant::now();
    let mut answers: Vec<Option<StoreResult<bool>>> = docs.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..docs.len()).collect();
    let mut retries = 0;
    while !pending.is_empty() {
        let chunk: Vec<&Document> = pending.iter().map(|&i| &docs[i]).collect();
        let sent = retry
            .run(|| async {
                // Counted before sending: an attempt cut short by the deadline is unclear too.
                sent_attempts.fetch_add(1, Ordering::Relaxed);
                let result = ballots
                    .insert_many(chunk.iter().copied())
                    .ordered(false)
                    .await
                    .map(|_| ());
                match doc_outcomes(chunk.len(), &result) {
                    Some(outcomes) => {
                        known_attempts.fetch_add(1, Ordering::Relaxed);
                        Ok(outcomes)
                    }
                    None => Err(result.expect_err("a whole-command failure is an error")),
                }
            })
            .await;
        let outcomes = match sent {
            Ok(o) => o,
            Err(e) => {
                for &i in &pending {
                    answers[i] = Some(Err(e.clone()));
                }
                break;
            }
        };
        let mut again = Vec::new();
        for (&i, outcome) in pending.iter().zip(outcomes) {
            answers[i] = match outcome {
                DocOutcome::Stored => Some(Ok(true)),
                DocOutcome::Duplicate => Some(Ok(false)),
                DocOutcome::Throttled => {
                    again.push(i);
                    None
                }
                DocOutcome::Refused(code) => Some(Err(StoreError::Internal(format!(
                    "the database refused a ballot (error {code})"
                )))),
            };
        }
        if again.is_empty() {
            break;
        }
        let failure = Failure::Throttled {
            retry_after: None,
            message: format!("{} of {} ballots throttled", again.len(), pending.len()),
        };
        match retry.decide(failure, retries, start.elapsed()) {
            Decision::Retry(delay) => {
                tokio::time::sleep(delay).await;
                retries += 1;
                pending = again;
            }
            Decision::GiveUp(e) => {
                for &i in &again {
                    answers[i] = Some(Err(e.clone()));
                }
                break;
            }
        }
    }
    let answers = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(StoreError::Internal("ballot left unanswered".into()))))
        .collect();
    let clear = sent_attempts.load(Ordering::Relaxed) == known_attempts.load(Ordering::Relaxed);
    (answers, clear)
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
    fn batch_errors_are_read_document_by_document() {
        assert_eq!(doc_outcomes(2, &Ok(())), Some(vec![DocOutcome::Stored; 2]));
        let partial: mongodb::error::InsertManyError = mongodb::bson::deserialize_from_document(doc! {
            "writeErrors": [
                { "index": 1, "code": 11000, "errmsg": "E11000 duplicate key" },
                { "index": 2, "code": 16500, "errmsg": "Error=16500, RetryAfterMs=5" },
                { "index": 3, "code": 121, "errmsg": "Document failed validation" },
            ],
        })
        .expect("insert many error");
        let err = MongoError::from(ErrorKind::InsertMany(partial));
        assert_eq!(
            doc_outcomes(5, &Err(err)),
            Some(vec![
                DocOutcome::Stored,
                DocOutcome::Duplicate,
                DocOutcome::Throttled,
                DocOutcome::Refused(121),
                DocOutcome::Stored,
            ])
        );
        // A write-concern failure leaves durability unknown: the whole batch is retried.
        let unsure: mongodb::error::InsertManyError = mongodb::bson::deserialize_from_document(doc! {
            "writeConcernError": { "code": 64, "errmsg": "waiting for replication timed out" },
        })
        .expect("insert many error");
        assert_eq!(
            doc_outcomes(1, &Err(MongoError::from(ErrorKind::InsertMany(unsure)))),
            None
        );
        // So is a command that failed as a whole, and an index the batch does not have.
        let unreachable = MongoError::from(ErrorKind::Io(std::sync::Arc::new(
            std::io::ErrorKind::ConnectionReset.into(),
        )));
        assert_eq!(doc_outcomes(1, &Err(unreachable)), None);
        let odd: mongodb::error::InsertManyError = mongodb::bson::deserialize_from_document(doc! {
            "writeErrors": [{ "index": 9, "code": 11000, "errmsg": "dup" }],
        })
        .expect("insert many error");
        assert_eq!(
            doc_outcomes(1, &Err(MongoError::from(ErrorKind::InsertMany(odd)))),
            None
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

    #[test]
    fn legacy_polls_take_the_predecessors_defaults() {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").expect("oid");
        let d = doc! { "_id": oid, "name": "Lunch?", "desc": "d", "options": ["a", "b"], "votes": { "count": 7 } };
        let p = doc_to_poll(&d).expect("legacy poll");
        assert_eq!(p.id, "65a1b2c3d4e5f60718293a4b");
        assert_eq!(p.created_at.timestamp(), 0x65a1_b2c3);
        assert_eq!((p.max_choices, p.legacy_votes, p.revision), (1, 7, 0));
        assert_eq!(p.options, vec!["a".to_owned(), "b".to_owned()]);
        assert!(p.admin_token_hash.is_none());
    }
}

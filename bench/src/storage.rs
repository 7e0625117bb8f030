//! Reference points: what the storage itself does, without HTTP, for one ballot per write at the
//! same concurrency as the HTTP scenarios.
//!
//! - embedded: `EmbeddedBallotStore::cast` on a temporary redb file;
//! - mongodb: the driver's `insert_one` of the store's own ballot document, with the store's write
//!   concern, against the server the services use (the raw reference), and, for information,
//!   `MongoBallotStore::cast` on that server (the store API: group commit, retries and duplicate
//!   handling included). Each goes into a scratch database of its own, dropped afterwards.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mongodb::bson::doc;
use mongodb::options::{Acknowledgment, DatabaseOptions, IndexOptions, WriteConcern};
use mongodb::{Client, IndexModel};
use serde::Serialize;
use shared::error::Chain;
use shared::mongo::{self, MongoSettings};
use vote_service::ballot::{BallotRecord, CastOutcome};
use vote_service::store::BallotStore;
use vote_service::store::embedded::EmbeddedBallotStore;
use vote_service::store::mongo::{BALLOTS_COLLECTION, MongoBallotStore, Tuning, ballot_to_doc};

use crate::load::Latency;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Embedded,
    Mongodb,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(Self::Embedded),
            "mongodb" => Ok(Self::Mongodb),
            other => Err(format!("unknown backend {other:?} (embedded, mongodb)")),
        }
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Mongodb => "mongodb",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreReference {
    /// What was measured, in words.
    pub what: String,
    pub clients: usize,
    pub duration_s: f64,
    /// Acknowledged writes.
    pub writes: u64,
    pub writes_per_s: f64,
    pub latency: Latency,
    /// Failed writes (each task gives up after 100).
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// No write failed and what is stored afterwards matches the acknowledged writes: the store's
    /// tally = its recount = writes (store API), or the collection's document count = writes
    /// (driver).
    pub consistent: bool,
}

/// The write concern of every store write: `{w: "majority", j: true}` with a server-side timeout
/// equal to the store's operation deadline (as `shared::mongo` sets it).
fn store_write_concern(settings: &MongoSettings) -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .w_timeout(settings.operation_timeout)
        .build()
}

/// The ballot a reference writer stores: new (poll, key) each call, like `POST /polls/{id}/votes`.
fn ballot(poll_id: &str, client: usize, n: u64) -> BallotRecord {
    let key = format!("k{client}-{n}");
    BallotRecord {
        id: format!("{client}-{n}"),
        poll_id: poll_id.to_owned(),
        voter: Some(key.clone()),
        key,
        choices: vec![(n % 3) as u32],
        ranking: None,
        scores: None,
        idempotency_key: None,
        fingerprint: "0".repeat(64),
        created_at: chrono::Utc::now(),
        // Every ballot the service stores has a receipt (and so, on the embedded store, an id row).
        receipt_hash: Some("0".repeat(64)),
        updated_at: None,
        revision: 0,
    }
}

const POLL_ID: &str = "0000000000000000000000aa";

struct Run {
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Histogram<u64>,
    elapsed: f64,
}

/// `clients` tasks, each calling `write(client, n)` back to back for `duration` (closed loop).
async fn closed_loop<F, Fut>(clients: usize, duration: Duration, write: F) -> Result<Run, String>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let write = Arc::new(write);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let write = write.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            let (mut n, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline && n < 10_000_000 {
                let t = Instant::now();
                match write(c, n + errors).await {
                    Ok(()) => {
                        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                        n += 1;
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                        errors += 1;
                        if errors > 100 {
                            break;
                        }
                    }
                }
            }
            (n, errors, first_error, hist)
        }));
    }
    let mut run = Run {
        writes: 0,
        errors: 0,
        first_error: None,
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        elapsed: 0.0,
    };
    for t in tasks {
        let (n, e, first, h) = t.await.map_err(|e| e.to_string())?;
        run.writes += n;
        run.errors += e;
        if run.first_error.is_none() {
            run.first_error = first;
        }
        let _ = run.hist.add(&h);
    }
    run.elapsed = start.elapsed().as_secs_f64();
    Ok(run)
}

impl Run {
    fn reference(self, what: String, clients: usize, stored_ok: bool) -> StoreReference {
        StoreReference {
            what,
            clients,
            duration_s: self.elapsed,
            writes: self.writes,
            writes_per_s: self.writes as f64 / self.elapsed.max(1e-9),
            latency: Latency::of(&self.hist),
            errors: self.errors,
            consistent: self.errors == 0 && stored_ok,
            first_error: self.first_error,
        }
    }
}

/// `store.cast` of new ballots; consistent when tally = recount = acknowledged writes.
async fn cast_rate(
    store: Arc<dyn BallotStore>,
    what: String,
    clients: usize,
    duration: Duration,
) -> Result<StoreReference, String> {
    let s = store.clone();
    let run = closed_loop(clients, duration, move |c, n| {
        let s = s.clone();
        async move {
            match s.cast(ballot(POLL_ID, c, n)).await {
                Ok(CastOutcome::Accepted(_)) => Ok(()),
                Ok(other) => Err(format!("not accepted: {other:?}")),
                Err(e) => Err(Chain(&e).to_string()),
            }
        }
    })
    .await?;
    let tally = store.tally(POLL_ID).await.map_err(|e| Chain(&e).to_string())?;
    let recount = store.recount(POLL_ID).await.map_err(|e| Chain(&e).to_string())?;
    let ok = tally == recount && tally.total == run.writes;
    Ok(run.reference(what, clients, ok))
}

/// The storage's raw ballot write rate: `clients` tasks each storing one new ballot per call.
/// Embedded: `EmbeddedBallotStore::cast`. MongoDB: the driver's `insert_one` (`uri` is required),
/// into the scratch database `bench_reference_<run_id>`.
pub async fn raw_write_rate(
    backend: Backend,
    scratch: &Path,
    uri: Option<&str>,
    run_id: &str,
    clients: usize,
    duration: Duration,
) -> Result<StoreReference, String> {
    match backend {
        Backend::Embedded => embedded_rate(scratch, clients, duration).await,
        Backend::Mongodb => {
            let uri = uri.ok_or("--backend mongodb needs --mongodb-uri")?;
            let name = format!("bench_reference_{run_id}");
            with_scratch_database(uri, &name, driver_insert_rate(uri, &name, clients, duration)).await
        }
    }
}

/// `MongoBallotStore::cast` against the server (scratch database `bench_store_<run_id>`).
pub async fn mongo_store_cast_rate(
    uri: &str,
    run_id: &str,
    clients: usize,
    duration: Duration,
) -> Result<StoreReference, String> {
    let name = format!("bench_store_{run_id}");
    with_scratch_database(uri, &name, async {
        let mut settings = MongoSettings::new(uri, name.as_str());
        // The reference reads the tally once, after the load: no cached value may stand in for it.
        let tuning = Tuning {
            tally_cache_ttl: Duration::ZERO,
            ..Tuning::default()
        };
        // Its closing tally and recount read every ballot written, which on a server without
        // indexes (FerretDB's SQLite backend scans the collection) takes longer than a request may.
        settings.operation_timeout = Duration::from_secs(60);
        let client = mongo::build_client(&settings)
            .await
            .map_err(|e| Chain(&e).to_string())?;
        let store = MongoBallotStore::open(client, &name, settings.retry_policy(), tuning)
            .await
            .map_err(|e| Chain(&e).to_string())?;
        let what = format!(
            "store API: `MongoBallotStore::cast` (the vote service's write path without HTTP: group commit, \
             {{w: majority, j: true}}, retries), driver pool {}",
            pool_size(&settings)
        );
        cast_rate(Arc::new(store), what, clients, duration).await
    })
    .await
}

fn pool_size(settings: &MongoSettings) -> String {
    settings
        .max_pool_size
        .map_or("default (10 connections)".into(), |n| format!("{n} connections"))
}

/// Runs `body`, then drops the database `name` whatever the outcome.
async fn with_scratch_database<T>(
    uri: &str,
    name: &str,
    body: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let out = body.await;
    let dropped = drop_database(uri, name).await;
    let out = out?;
    dropped?;
    Ok(out)
}

async fn driver_insert_rate(
    uri: &str,
    name: &str,
    clients: usize,
    duration: Duration,
) -> Result<StoreReference, String> {
    let settings = MongoSettings::new(uri, name);
    let client = mongo::build_client(&settings)
        .await
        .map_err(|e| Chain(&e).to_string())?;
    let db = client.database_with_options(
        name,
        DatabaseOptions::builder()
            .write_concern(store_write_concern(&settings))
            .build(),
    );
    // Shaped like the store's collection: `_id` plus the store's one secondary index.
    let coll = db.collection::<mongodb::bson::Document>(BALLOTS_COLLECTION);
    db.create_collection(BALLOTS_COLLECTION)
        .await
        .map_err(|e| format!("create collection: {e}"))?;
    let index = IndexModel::builder()
        .keys(doc! { "poll_id": 1, "voter": 1 })
        .options(IndexOptions::builder().name("poll_voter".to_owned()).build())
        .build();
    coll.create_index(index)
        .await
        .map_err(|e| format!("create index: {e}"))?;
    let c2 = coll.clone();
    let run = closed_loop(clients, duration, move |c, n| {
        let coll = c2.clone();
        async move {
            let doc = ballot_to_doc(&ballot(POLL_ID, c, n));
            coll.insert_one(doc).await.map(|_| ()).map_err(|e| e.to_string())
        }
    })
    .await?;
    let stored = coll
        .count_documents(doc! { "poll_id": POLL_ID })
        .await
        .map_err(|e| format!("count_documents: {e}"))?;
    let what = format!(
        "raw driver: `insert_one` of the store's ballot document, {{w: majority, j: true}}, collection with the \
         store's index, driver pool {}",
        pool_size(&settings)
    );
    let ok = stored == run.writes;
    Ok(run.reference(what, clients, ok))
}

/// Drops database `name` (the benchmark's own scratch or service database).
pub async fn drop_database(uri: &str, name: &str) -> Result<(), String> {
    let client = mongo::build_client(&MongoSettings::new(uri, name))
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(30), client.database(name).drop())
        .await
        .map_err(|_| format!("dropping database {name}: no answer in 30 s"))?
        .map_err(|e| format!("dropping database {name}: {e}"))
}

/// What the server says it is (`buildInfo`), e.g. `SecantusDB 0.5.3-beta.196 (MongoDB 8.2.11 protocol,
/// WiredTiger)`.
pub async fn server_description(uri: &str) -> Result<String, String> {
    let client: Client = mongo::build_client(&MongoSettings::new(uri, "admin"))
        .await
        .map_err(|e| e.to_string())?;
    let info = client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await
        .map_err(|e| format!("buildInfo: {e}"))?;
    let version = info.get_str("version").unwrap_or("?");
    Ok(
        match (info.get_str("ferretdbVersion"), info.get_str("secantusVersion")) {
            (Ok(f), _) => format!("FerretDB {f} (MongoDB {version} protocol)"),
            (_, Ok(s)) => format!("SecantusDB {s} (MongoDB {version} protocol, WiredTiger)"),
            _ => format!("MongoDB {version}"),
        },
    )
}

async fn embedded_rate(scratch: &Path, clients: usize, duration: Duration) -> Result<StoreReference, String> {
    let dir = tempfile::tempdir_in(scratch).map_err(|e| e.to_string())?;
    let store: Arc<dyn BallotStore> =
        Arc::new(EmbeddedBallotStore::open(&dir.path().join("reference.redb")).map_err(|e| e.to_string())?);
    let what = "raw store: `EmbeddedBallotStore::cast` (redb, group commit, fsync per commit) on a temp file".into();
    cast_rate(store, what, clients, duration).await
}

/// The disk's rate of small synchronous writes (write + fdatasync, one thread): the cost of one
/// durable commit, which group commit amortises over many ballots.
pub async fn fsync_rate(scratch: &Path, duration: Duration) -> Result<f64, String> {
    let dir = tempfile::tempdir_in(scratch).map_err(|e| e.to_string())?;
    let path = dir.path().join("fsync.bin");
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < duration && n < 1_000_000 {
            f.write_all(&[0u8; 128]).map_err(|e| e.to_string())?;
            f.sync_data().map_err(|e| e.to_string())?;
            n += 1;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .await
    .map_err(|e| e.to_string())?
}

//! Reference point: what the storage itself does, without HTTP, for one ballot per write at the
//! same concurrency as the HTTP scenarios. Per backend; the MongoDB reference (the driver's
//! `insert_one` against the same server) is added here when that backend lands.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use shared::domain::{BallotRecord, CastOutcome};
use shared::store::BallotStore;
use shared::store::embedded::EmbeddedBallotStore;

use crate::load::Latency;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Embedded,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(Self::Embedded),
            "mongodb" => Err("--backend mongodb: the MongoDB backend and its reference are not built yet".into()),
            other => Err(format!("unknown backend {other:?} (embedded)")),
        }
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreReference {
    /// What was measured, in words.
    pub what: String,
    pub clients: usize,
    pub duration_s: f64,
    pub writes: u64,
    pub writes_per_s: f64,
    pub latency: Latency,
    /// The store's own tally and recount agree with the number of writes.
    pub consistent: bool,
}

/// The storage's raw ballot write rate: `clients` tasks each storing one new ballot per call.
pub async fn raw_write_rate(
    backend: Backend,
    scratch: &Path,
    clients: usize,
    duration: Duration,
) -> Result<StoreReference, String> {
    match backend {
        Backend::Embedded => embedded_rate(scratch, clients, duration).await,
    }
}

async fn embedded_rate(scratch: &Path, clients: usize, duration: Duration) -> Result<StoreReference, String> {
    let dir = tempfile::tempdir_in(scratch).map_err(|e| e.to_string())?;
    let store: Arc<dyn BallotStore> =
        Arc::new(EmbeddedBallotStore::open(&dir.path().join("reference.redb")).map_err(|e| e.to_string())?);
    let poll_id = "0000000000000000000000aa".to_owned();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (store, poll_id) = (store.clone(), poll_id.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            let mut n = 0u64;
            let mut errors = 0u64;
            while Instant::now() < deadline && n < 10_000_000 {
                let key = format!("k{c}-{n}");
                let ballot = BallotRecord {
                    id: format!("{c}-{n}"),
                    poll_id: poll_id.clone(),
                    voter: Some(key.clone()),
                    key,
                    choices: vec![(n % 3) as u32],
                    idempotency_key: None,
                    fingerprint: "0".repeat(64),
                    created_at: chrono::Utc::now(),
                };
                let t = Instant::now();
                match store.cast(ballot).await {
                    Ok(CastOutcome::Accepted(_)) => {
                        let _ = hist.record(t.elapsed().as_micros().max(1) as u64);
                        n += 1;
                    }
                    _ => {
                        errors += 1;
                        if errors > 100 {
                            break;
                        }
                    }
                }
            }
            (n, errors, hist)
        }));
    }
    let mut writes = 0;
    let mut errors = 0;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    for t in tasks {
        let (n, e, h) = t.await.map_err(|e| e.to_string())?;
        writes += n;
        errors += e;
        let _ = hist.add(&h);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let tally = store.tally(&poll_id).await.map_err(|e| e.to_string())?;
    let recount = store.recount(&poll_id).await.map_err(|e| e.to_string())?;
    drop(store);
    Ok(StoreReference {
        what: "EmbeddedBallotStore::cast (redb, group commit, fsync per commit) on a temp file".into(),
        clients,
        duration_s: elapsed,
        writes,
        writes_per_s: writes as f64 / elapsed,
        latency: Latency::of(&hist),
        consistent: errors == 0 && tally == recount && tally.total == writes,
    })
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

//! The embedded store's plumbing: one [redb](https://docs.rs/redb) file per service, opened with
//! a bounded page cache, and its blocking calls run off the async runtime. Each service's store
//! (its tables and transactions) builds on it.
//!
//! redb gives ACID transactions with a single writer; a commit returns only after the data is
//! fsynced (`Durability::Immediate`), so what it acknowledges survives `kill -9`.

use std::path::Path;
use std::sync::Arc;

use redb::Database;

use crate::storage::{StoreError, StoreResult};

pub fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// Opens (or creates) the redb file at `path` with a page cache of `cache_bytes` (redb's default
/// is 1 GiB, which a busy store fills with its whole file; pages beyond the cache are read from the
/// operating system's page cache, which the process's RSS does not include).
pub fn open(path: &Path, cache_bytes: usize) -> StoreResult<Arc<Database>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| internal(format!("cannot create {}: {e}", dir.display())))?;
    }
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| internal(format!("cannot open {}: {e}", path.display())))?;
    Ok(Arc::new(db))
}

pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

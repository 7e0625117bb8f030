//! The embedded store's plumbing: one [redb](https://docs.rs/redb) file per service, opened with
//! a bounded page cache, and its blocking calls run off the async runtime. Each service's store
//! (its tables and transactions) builds on it.
//!
//! redb gives ACID transactions with a single writer; a commit returns only after the data is
//! fsynced (`Durability::Immediate`), so what it acknowledges survives `kill -9`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::Database;

use crate::storage::{StoreError, StoreResult};

/// The embedded store's file could not be opened (it becomes [`StoreError::Internal`]).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create {}", .0.display())]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("cannot open {}", .0.display())]
    Open(PathBuf, #[source] redb::DatabaseError),
}

impl From<OpenError> for StoreError {
    fn from(e: OpenError) -> Self {
        Self::internal(e)
    }
}

/// Opens (or creates) the redb file at `path` with a page cache of `cache_bytes` (redb's default
/// is 1 GiB, which a busy store fills with its whole file; pages beyond the cache are read from the
/// operating system's page cache, which the process's RSS does not include).
pub fn open(path: &Path, cache_bytes: usize) -> StoreResult<Arc<Database>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| OpenError::CreateDir(dir.to_owned(), e))?;
    }
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| OpenError::Open(path.to_owned(), e))?;
    Ok(Arc::new(db))
}

pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
    tokio::task::spawn_blocking(f).await?
}

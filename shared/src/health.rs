//! Health as the service's parts see it: the start-up and shutdown state behind `/readyz`
//! ([`Readiness`]) and the dependencies `/health/deep` checks ([`Dependency`]). The operational
//! endpoints that answer them are in [`crate::http::ops`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

/// Something the service needs (database, the other service, Key Vault).
#[async_trait]
pub trait Dependency: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Ok when usable; otherwise a short reason without secrets.
    async fn check(&self) -> Result<(), Unhealthy>;
}

/// Why a `/health/deep` dependency is not usable: a short reason without secrets (the probe
/// shows it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unhealthy(pub String);

/// Why the service is not ready (`/readyz`): starting (and what it waits for) or draining.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(pub String);

macro_rules! reason {
    ($($t:ident),*) => {$(
        impl From<String> for $t {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
        /// The reason's text.
        impl std::ops::Deref for $t {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
    )*};
}

reason!(Unhealthy, NotReady);

/// Start-up and shutdown state behind `/readyz`: ready once the server is built and every
/// pending start-up condition (storage connected, secret loaded) is resolved, until draining.
#[derive(Debug, Default)]
pub struct Readiness {
    initialised: AtomicBool,
    draining: AtomicBool,
    pending: std::sync::Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    pub fn set_initialised(&self) {
        self.initialised.store(true, Ordering::SeqCst);
    }
    /// Records (or updates) a start-up condition that is not met yet, and why.
    pub fn wait_for(&self, what: &'static str, reason: impl Into<String>) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert(what, reason.into());
        }
    }
    /// The start-up condition is met.
    pub fn resolve(&self, what: &'static str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(what);
        }
    }
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    /// Ok when ready, else why not.
    pub fn state(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::SeqCst) {
            Err("draining: shutting down".into())
        } else if !self.initialised.load(Ordering::SeqCst) {
            Err("starting".into())
        } else {
            let pending = self.pending.lock().map(|p| p.clone()).unwrap_or_default();
            if pending.is_empty() {
                Ok(())
            } else {
                let why: Vec<String> = pending.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                Err(format!("starting: {}", why.join("; ")).into())
            }
        }
    }
}

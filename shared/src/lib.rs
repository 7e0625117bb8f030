//! The library both services build on. The **platform**: configuration, the HTTP server and its
//! middleware, errors as problem+json, health, metrics, telemetry, secrets (Key Vault and the
//! connection-string source), MongoDB plumbing, the embedded store's plumbing, the swappable store
//! slot and the storage error. The **contract** between the services: the internal wire types and
//! the peer client ([`internal`]), ids, the poll settings the vote service acts on, the status
//! rule, tallies and the voter key ([`contract`]). It names no service's records or stores: each
//! service owns its data layer.

pub mod backoff;
pub mod config;
pub mod contract;
pub mod embedded;
pub mod error;
pub mod health;
pub mod http;
pub mod instrumented;
pub mod internal;
pub mod keyvault;
pub mod metrics;
pub mod mongo;
pub mod problem;
pub mod secret;
pub mod service;
pub mod slot;
pub mod storage;
pub mod telemetry;

pub use config::Config;
pub use problem::{FieldError, Problem, ProblemKind};
pub use secret::Secret;

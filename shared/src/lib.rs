//! The library shared by the poll and vote services: configuration, storage adapters, HTTP
//! plumbing (errors as problem+json, middleware, health, metrics, docs), telemetry and shutdown.

pub mod config;
pub mod domain;
pub mod http;
pub mod instrumented;
pub mod internal;
pub mod keyvault;
pub mod metrics;
pub mod problem;
pub mod secret;
pub mod service;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use problem::{FieldError, Problem};
pub use secret::Secret;

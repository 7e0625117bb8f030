//! The end-to-end HTTP suites and the storage contract on every backend (`storage::`) in one test binary (one link of the whole stack instead of one per
//! suite). Select a suite with a test-name filter: `cargo test -p api-tests --test api -- vote::`.
//!
//! The suites share this process: none of them sets environment variables or other process-wide
//! state (child processes get their environment through `Proc`; tracing is initialised once by
//! `shared::telemetry::init`; every service has metrics registries of its own).

mod changes;
mod faults;
mod keyvault;
mod methods;
mod poll;
mod storage;
mod vote;

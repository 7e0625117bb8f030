//! HTTP plumbing shared by both services.

pub mod extract;
pub mod middleware;
pub mod ops;
pub mod server;

pub use extract::{AppJson, AppQuery, ClientAddr, bearer_token};
pub use ops::{Dependency, Ops, Readiness};
pub use server::{Server, assemble, cancel_on_signals};

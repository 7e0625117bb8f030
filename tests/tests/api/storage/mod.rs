//! The storage contract of both services' stores, on every backend: the embedded store, and
//! MongoDB-protocol servers (SecantusDB in the test command).

mod embedded;
mod mongo;

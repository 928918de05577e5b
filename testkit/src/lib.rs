//! `staged-testkit`: everything that stands in for the daemon's surroundings, shared by the
//! daemon's tests, `staged-bench` and `staged demo`.
//!
//! - [`scout`]: the tape system's Scout API over real HTTP, with the Kafka recall messages
//!   staging causes.
//! - [`metadata`]: the MWA metadata service's `data_files` endpoint.
//! - [`tempdir`]: a temporary directory removed on drop.
//! - [`pg`]: a PostgreSQL database created for one run and dropped after it.
//! - [`jwt`]: WLCG token issuers: a key, its JWKS and PEM files, and tokens signed with it.
//!
//! The invariant this crate keeps: it never depends on `staged`. The daemon depends on it
//! (for `staged demo`), so its simulators are configured with plain values, and nothing here
//! is on the daemon's production path.

pub mod jwt;
pub mod metadata;
pub mod pg;
pub mod scout;
pub mod tempdir;

pub use tempdir::TempDir;

//! `staged`: stages radio-telescope data from a tape archive onto disk on request and tells
//! the requester when it is ready.
//!
//! The crate is the daemon. Its modules, in the order a request meets them:
//! [`config`] (the TOML file), [`telemetry`] (logs), [`app`] (wiring and lifecycle),
//! [`api`] (the ASVO-compatible HTTP API), [`store`] (SQLite or PostgreSQL, all SQL lives
//! there) and [`reports`] (failure report files).

pub mod api;
pub mod app;
pub mod config;
pub mod reports;
pub mod store;
pub mod telemetry;

//! `staged`: stages radio-telescope data from a tape archive onto disk on request and tells
//! the requester when it is ready.
//!
//! The crate is the daemon. Its modules, in the order a request meets them:
//! [`config`] (the TOML file, parsed once into the types the daemon runs on),
//! [`telemetry`] (logs), [`app`] (wiring and lifecycle), [`api`] (the ASVO-compatible HTTP
//! API), [`store`] (SQLite or PostgreSQL, all SQL lives there), [`engine`] (each stored
//! job from accepted to called back) and [`reports`] (failure report files). The tape
//! system's two peers have their own modules: [`scout`] (the Scout API client) and
//! [`kafka`] (recall messages into the store). Everything telescope-specific runs in a
//! WebAssembly [`adapter`], whose HTTP is bounded by an [`allow_list`]. Shared by several
//! of them: [`backoff`] (the one retry policy), [`error_text`] (an error as one line) and
//! [`histograms`] (the bucket layouts of `/metrics`' histograms).
//! [`net_guard`] keeps callbacks off link-local, metadata-service and unspecified addresses;
//! [`systemd`] tells a service manager when the daemon is ready, alive, reloading, stopping;
//! [`auth`] holds the API's tokens and scopes; [`wlcg_token`] verifies WLCG bearer tokens
//! (JWTs) offline; [`tls_trust`] how outbound HTTPS checks its peers;
//! [`import_env`] turns the original service's `.envrc` into a config.
//! The simulators live in the `staged-testkit` crate, which [`demo`] (`staged demo`) uses.

pub mod adapter;
pub mod allow_list;
pub mod api;
pub mod app;
pub mod auth;
pub mod backoff;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error_text;
pub mod histograms;
pub mod import_env;
pub mod kafka;
pub mod net_guard;
pub mod reports;
pub mod scout;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls_trust;
pub mod wlcg_token;

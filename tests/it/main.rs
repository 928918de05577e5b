//! The integration tests, one binary so that wasmtime and librdkafka are linked once: a
//! module per part of the daemon, the fault suite ([`faults`]), and the harness they share
//! ([`common`]). `cargo test -p staged --test it <module>::` runs one module.

#[macro_use]
mod common;

mod adapter;
mod adapter_daemon;
mod api;
mod auth;
mod dashboard;
mod engine;
mod faults;
mod health;
mod kafka;
mod metrics;
mod outbound_tls;
mod process;
mod scout;
mod store;
mod systemd;
mod tape_rest;
mod tls;

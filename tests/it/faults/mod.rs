//! The fault suite: each fault is injected for real (a full disk, a failed commit, a
//! database restart, hostile Scout, Kafka and callback peers, hostile HTTP clients) and each
//! test asserts the same invariant: every 202 is stored and reaches exactly one callback (a
//! repeat only for a job in flight at a crash); nothing acknowledged is lost; the daemon
//! recovers without a restart where the fault goes away.
//!
//! Each fault test records its figures in the [`ledger`]; `.ci/run` prints them as one table
//! after the tests (`bash .ci/fault-table`).
//!
//! A module per kind of fault; `cargo test -p staged --test it faults::` runs just these.

mod callbacks;
mod crash;
mod failing_vfs;
mod http;
mod kafka;
mod ledger;
mod props;
mod scout;
mod store;

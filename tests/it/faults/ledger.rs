//! What each fault cost: jobs acknowledged, stored, called back and lost, one row per fault
//! and backend, written as a file under the test target's scratch directory so that rows from
//! parallel tests never interleave. `bash .ci/fault-table` prints them.
#![allow(dead_code)]

use std::path::PathBuf;

/// One fault's figures. `lost` counts acknowledged jobs that were neither stored nor called
/// back; the fault's test fails when it is not zero, after recording the row.
#[derive(Debug, Clone)]
pub struct Row {
    pub fault: &'static str,
    pub backend: &'static str,
    pub acknowledged: u64,
    pub stored: u64,
    pub called_back: u64,
    pub lost: u64,
}

/// Where rows go: `target/tmp/fault-suite/`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fault-suite")
}

/// Records a row (replacing an earlier run's row for the same fault and backend).
pub fn record(row: &Row) {
    let dir = dir();
    std::fs::create_dir_all(&dir).expect("creating the fault ledger directory");
    let name: String = format!("{}-{}", row.fault, row.backend)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let line = format!(
        "{}\t{}\t{}\t{}\t{}\t{}\n",
        row.fault, row.backend, row.acknowledged, row.stored, row.called_back, row.lost
    );
    std::fs::write(dir.join(format!("{name}.tsv")), line).expect("writing a fault ledger row");
}

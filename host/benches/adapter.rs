//! What an adapter costs the daemon, on the freshly built MWA component:
//! - `map-event-paths` for batches of 1,000 Kafka names (one call per polled batch);
//! - an instantiate-and-call of a trivial export (the fixed cost every call pays);
//! - the same batches from two tasks at once (the machine has two cores).
//!
//! Run with `cargo bench -p staged --bench adapter`; it prints, it does not assert.

use std::time::{Duration, Instant};

use staged::adapter::{Adapters, JobSummaryForAdapter};
use staged::config::AdapterConfig;

fn wasm(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("STAGED_ADAPTERS_DIR")).join(format!("adapter_{name}.wasm"))
}

fn stats(label: &str, mut samples: Vec<Duration>, per: usize) {
    samples.sort();
    let n = samples.len();
    let total: Duration = samples.iter().sum();
    let mean = total / n as u32;
    let pct = |p: f64| samples[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "{label:<44} n={n:<6} mean {:>9.1} µs  p50 {:>9.1} µs  p99 {:>9.1} µs  ({:.3} µs per item)",
        mean.as_secs_f64() * 1e6,
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6 / per as f64,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut config = AdapterConfig {
        wasm: Some(wasm("mwa")),
        ..AdapterConfig::default()
    };
    config.settings.insert("mount_prefix".into(), "/vss".into());
    let started = Instant::now();
    let adapters = Adapters::from_config(&config).await.expect("mwa loads");
    println!(
        "load (read, compile, link, check info+schema): {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let a = adapters.current().unwrap();
    println!("instance allocator: {}", a.allocator());

    // Half ours (some under the mount point), half another telescope's.
    let names: Vec<String> = (0..1000)
        .map(|i| match i % 4 {
            0 => format!(
                "mwa/mwaingest-1234567890/1234567890/1234567890_{i:04}_ch{:03}.fits",
                i % 24
            ),
            1 => format!("/vss/mwa/mwaingest-1234567890/1234567890/1234567890_{i:04}.fits"),
            _ => format!("other/telescope/run{i}/file{i}.dat"),
        })
        .collect();
    for _ in 0..20 {
        a.map_event_paths(&names).await.unwrap();
    }
    let mut samples = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let out = a.map_event_paths(&names).await.unwrap();
        samples.push(t.elapsed());
        assert_eq!(out.len(), 1000);
    }
    stats("map-event-paths, batch of 1,000 names", samples, 1000);

    let one = vec![names[0].clone()];
    let mut samples = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        a.map_event_paths(&one).await.unwrap();
        samples.push(t.elapsed());
    }
    stats("instantiate + map-event-paths of 1 name", samples, 1);

    let job = JobSummaryForAdapter {
        job_id: 1,
        return_code: 0,
        total_files: 10,
        ready_files: 10,
        ..Default::default()
    };
    let mut samples = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        a.callback_comment(&job).await.unwrap();
        samples.push(t.elapsed());
    }
    stats("instantiate + callback-comment", samples, 1);

    let t = Instant::now();
    let rounds = 500;
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let a = a.clone();
            let names = names.clone();
            tokio::spawn(async move {
                for _ in 0..rounds {
                    a.map_event_paths(&names).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "map-event-paths from 2 tasks: {:.0} names/s ({} batches of 1,000 in {:.2} s)",
        (2 * rounds * 1000) as f64 / secs,
        2 * rounds,
        secs
    );
}

//! The last hour's throughput, for the dashboard's sparklines: jobs accepted, files settled
//! by recall messages, callbacks delivered.
//!
//! Invariant: memory is bounded (one sample every [`SAMPLE_EVERY`], [`SAMPLES`] kept) and
//! sampling reads counters the daemon keeps anyway, never the store. The series are the
//! differences between consecutive samples, so a restart of the daemon starts them afresh
//! rather than showing a spike.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::EngineCounters;
use crate::kafka::IngestStatus;

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: an hour's worth.
pub const SAMPLES: usize = 360;

/// The counters at one moment, cumulative since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sample {
    at_ms: i64,
    accepted: u64,
    files: u64,
    callbacks: u64,
}

/// The series, shared by the sampler and the dashboard.
#[derive(Debug, Default)]
pub struct Throughput {
    /// Jobs acknowledged with 202; counted by the intake handler.
    pub accepted: AtomicU64,
    samples: Mutex<VecDeque<Sample>>,
}

/// Per-interval counts, oldest first, and the interval's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub interval_secs: u64,
    /// Start of the first interval (ms since the epoch), if there is one.
    pub since_ms: Option<i64>,
    pub accepted: Vec<u64>,
    pub files: Vec<u64>,
    pub callbacks: Vec<u64>,
}

/// Where the sampled counters live.
#[derive(Clone, Default)]
pub struct Sources {
    pub engine: Option<Arc<EngineCounters>>,
    pub kafka: Option<IngestStatus>,
}

impl Throughput {
    fn now(&self, sources: &Sources) -> Sample {
        Sample {
            at_ms: crate::store::now_ms(),
            accepted: self.accepted.load(Ordering::Relaxed),
            files: sources.kafka.as_ref().map_or(0, |k| k.counters().changed),
            callbacks: sources
                .engine
                .as_ref()
                .map_or(0, |e| e.callbacks_delivered.load(Ordering::Relaxed)),
        }
    }

    /// Takes one sample, dropping the oldest beyond [`SAMPLES`].
    pub fn sample(&self, sources: &Sources) {
        let s = self.now(sources);
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back(s);
        while samples.len() > SAMPLES + 1 {
            samples.pop_front();
        }
    }

    /// The series so far, with the interval in progress (up to now) as its last point.
    pub fn series(&self, sources: &Sources) -> Series {
        let now = self.now(sources);
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let points: Vec<Sample> = samples.iter().copied().chain([now]).collect();
        let diff = |f: fn(&Sample) -> u64| -> Vec<u64> {
            points
                .windows(2)
                .map(|w| f(&w[1]).saturating_sub(f(&w[0])))
                .collect()
        };
        Series {
            interval_secs: SAMPLE_EVERY.as_secs(),
            since_ms: (points.len() > 1).then(|| points[0].at_ms),
            accepted: diff(|s| s.accepted),
            files: diff(|s| s.files),
            callbacks: diff(|s| s.callbacks),
        }
    }

    /// Samples every [`SAMPLE_EVERY`] until the task is aborted.
    pub fn start_sampling(self: &Arc<Self>, sources: Sources) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        me.sample(&sources);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                me.sample(&sources);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_differences_and_bounded() {
        let t = Throughput::default();
        let engine = Arc::new(EngineCounters::default());
        let sources = Sources {
            engine: Some(engine.clone()),
            kafka: None,
        };
        assert_eq!(t.series(&sources).accepted, Vec::<u64>::new());
        t.sample(&sources);
        t.accepted.fetch_add(3, Ordering::Relaxed);
        engine.callbacks_delivered.fetch_add(2, Ordering::Relaxed);
        t.sample(&sources);
        t.accepted.fetch_add(1, Ordering::Relaxed);
        let s = t.series(&sources);
        assert_eq!(s.accepted, vec![3, 1]);
        assert_eq!(s.callbacks, vec![2, 0]);
        assert_eq!(s.files, vec![0, 0]);
        for _ in 0..SAMPLES * 2 {
            t.sample(&sources);
        }
        assert_eq!(t.series(&sources).accepted.len(), SAMPLES + 1);
    }
}

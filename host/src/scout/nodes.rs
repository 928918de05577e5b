//! The set of Scout nodes a client rotates over, and what it has seen of each.
//!
//! Invariant: a node that failed (connect error, timeout, 5xx) is out of the rotation until
//! its cool-down ends; then the next call that lands on it is the probe that brings it back
//! (success) or ejects it again (failure). When every node is ejected, the one whose cool-down
//! ends first is tried anyway, so a call is never refused for want of a node.
//!
//! Among the nodes in the rotation, load decides: each pick looks at the next two in the
//! rotation and takes the second only when its expected cost (recent latency times calls in
//! flight) is under half the first's and at least `MARGIN_US` less (power of two choices),
//! so a node that answers slowly is given less work while the others carry it, and nodes
//! about as fast as each other (a few milliseconds of noise) keep plain round-robin. Every `PROBE_EVERY`th pick takes the rotation's next node regardless,
//! so that a slow node's latency is measured again and it gets its share back once it
//! recovers. With equal load (nothing measured yet) the pick is plain round-robin.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use url::Url;

/// One node's counters, for metrics. Latency is summed over successful answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub base: String,
    pub successes: u64,
    pub failures: u64,
    /// Sum of the latencies of answered calls (any status), in microseconds.
    pub latency_us_total: u64,
    pub answered: u64,
    pub ejected: bool,
    /// Recent latency (moving average of answered calls), in microseconds.
    pub recent_latency_us: u64,
}

/// One pick in this many ignores load, so that every node keeps being measured.
const PROBE_EVERY: usize = 16;
/// Differences in expected cost below this (microseconds) are noise, not load.
const MARGIN_US: u128 = 20_000;

pub(crate) struct Node {
    pub base: Url,
    successes: AtomicU64,
    failures: AtomicU64,
    latency_us_total: AtomicU64,
    answered: AtomicU64,
    /// Exponential moving average (1/8) of answered calls' latency; 0 = none yet.
    ewma_us: AtomicU64,
    in_flight: AtomicU64,
    /// Milliseconds since the pool's epoch until which the node is out; 0 = in.
    ejected_until_ms: AtomicI64,
}

pub(crate) struct NodePool {
    nodes: Vec<Node>,
    next: AtomicUsize,
    epoch: Instant,
    cool_down: Duration,
}

impl NodePool {
    pub fn new(bases: Vec<Url>, cool_down: Duration) -> NodePool {
        NodePool {
            nodes: bases
                .into_iter()
                .map(|base| Node {
                    base,
                    successes: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    latency_us_total: AtomicU64::new(0),
                    answered: AtomicU64::new(0),
                    ewma_us: AtomicU64::new(0),
                    in_flight: AtomicU64::new(0),
                    ejected_until_ms: AtomicI64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            cool_down,
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// Of the next two nodes in the rotation that are not cooling down (skipping `avoid`,
    /// nodes this call already tried, while any other is available), the less loaded.
    pub fn pick(&self, avoid: &[usize]) -> usize {
        let n = self.nodes.len();
        let now = self.now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let usable = |i: usize| self.nodes[i].ejected_until_ms.load(Ordering::Relaxed) <= now;
        for pass_avoid in [true, false] {
            let mut candidates = (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| usable(i) && !(pass_avoid && avoid.contains(&i)));
            let Some(first) = candidates.next() else {
                continue;
            };
            return match candidates.next() {
                Some(second)
                    if !start.is_multiple_of(PROBE_EVERY)
                        && self.much_less_loaded(second, first) =>
                {
                    second
                }
                _ => first,
            };
        }
        // Everything is cooling down: probe the node that comes back first.
        (0..n)
            .min_by_key(|&i| self.nodes[i].ejected_until_ms.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// What a call on node `i` is expected to cost: its recent latency, times the calls
    /// it already has in flight plus this one. A node not measured yet is taken to be as
    /// slow as the slowest measured one, not as fast as nothing: otherwise a slow node would
    /// draw every call until its first answer.
    fn load(&self, i: usize) -> u128 {
        let node = &self.nodes[i];
        let mut latency = node.ewma_us.load(Ordering::Relaxed);
        if latency == 0 {
            latency = self
                .nodes
                .iter()
                .map(|n| n.ewma_us.load(Ordering::Relaxed))
                .max()
                .unwrap_or(0);
        }
        latency.max(1) as u128 * (node.in_flight.load(Ordering::Relaxed) as u128 + 1)
    }

    fn much_less_loaded(&self, a: usize, b: usize) -> bool {
        let (a, b) = (self.load(a), self.load(b));
        a.saturating_mul(2) < b && b - a >= MARGIN_US
    }

    /// Counts a call in flight on node `i` until the guard drops.
    pub fn busy(&self, i: usize) -> Busy<'_> {
        let node = &self.nodes[i];
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(node)
    }

    /// The node answered (whatever the status): it is healthy.
    pub fn answered(&self, i: usize, latency: Duration, success: bool) {
        let node = &self.nodes[i];
        node.answered.fetch_add(1, Ordering::Relaxed);
        let us = latency.as_micros() as u64;
        node.latency_us_total.fetch_add(us, Ordering::Relaxed);
        // Racing updates may lose a sample; an estimate does not need every one.
        let old = node.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            us.max(1)
        } else {
            (old * 7 + us) / 8
        };
        node.ewma_us.store(new.max(1), Ordering::Relaxed);
        if success {
            node.successes.fetch_add(1, Ordering::Relaxed);
        }
        node.ejected_until_ms.store(0, Ordering::Relaxed);
    }

    /// The node failed to answer usefully: count it and take it out for the cool-down.
    pub fn failed(&self, i: usize) {
        let node = &self.nodes[i];
        node.failures.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ms() + self.cool_down.as_millis() as i64;
        node.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
    }

    pub fn stats(&self) -> Vec<NodeStats> {
        let now = self.now_ms();
        self.nodes
            .iter()
            .map(|n| NodeStats {
                base: n.base.to_string(),
                successes: n.successes.load(Ordering::Relaxed),
                failures: n.failures.load(Ordering::Relaxed),
                latency_us_total: n.latency_us_total.load(Ordering::Relaxed),
                answered: n.answered.load(Ordering::Relaxed),
                ejected: n.ejected_until_ms.load(Ordering::Relaxed) > now,
                recent_latency_us: n.ewma_us.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// A call in flight on one node.
pub(crate) struct Busy<'a>(&'a Node);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, cool: Duration) -> NodePool {
        NodePool::new(
            (0..n)
                .map(|i| Url::parse(&format!("http://node{i}:1/")).unwrap())
                .collect(),
            cool,
        )
    }

    #[test]
    fn round_robin_skips_ejected_and_probes_back() {
        let p = pool(3, Duration::from_millis(50));
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[])).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        p.failed(1);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[])).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        std::thread::sleep(Duration::from_millis(60));
        let picks: Vec<usize> = (0..3).map(|_| p.pick(&[])).collect();
        assert!(picks.contains(&1), "{picks:?}");
    }

    #[test]
    fn a_slow_node_gets_only_its_probes() {
        let p = pool(3, Duration::from_secs(60));
        p.answered(0, Duration::from_millis(500), true);
        p.answered(1, Duration::from_millis(5), true);
        p.answered(2, Duration::from_millis(5), true);
        let picks: Vec<usize> = (0..160).map(|_| p.pick(&[])).collect();
        let slow = picks.iter().filter(|&&i| i == 0).count();
        assert!(slow <= 160 / PROBE_EVERY, "{slow} of 160");
        assert!(slow >= 1, "still probed");
        // Calls in flight count too: a node with many is passed over.
        let p = pool(2, Duration::from_secs(60));
        p.answered(0, Duration::from_millis(30), true);
        p.answered(1, Duration::from_millis(30), true);
        let _held: Vec<_> = (0..5).map(|_| p.busy(0)).collect();
        p.pick(&[]); // the probe
        let picks: Vec<usize> = (1..PROBE_EVERY).map(|_| p.pick(&[])).collect();
        assert!(picks.iter().all(|&i| i == 1), "{picks:?}");
        // A few milliseconds apart is noise: round-robin.
        let p = pool(2, Duration::from_secs(60));
        p.answered(0, Duration::from_millis(6), true);
        p.answered(1, Duration::from_millis(2), true);
        p.pick(&[]);
        let picks: Vec<usize> = (1..5).map(|_| p.pick(&[])).collect();
        assert_eq!(picks, vec![1, 0, 1, 0]);
    }

    #[test]
    fn all_ejected_still_gives_a_node_and_avoid_is_a_preference() {
        let p = pool(2, Duration::from_secs(60));
        p.failed(0);
        std::thread::sleep(Duration::from_millis(2));
        p.failed(1);
        assert_eq!(p.pick(&[]), 0, "the one back first");
        let p = pool(2, Duration::from_secs(60));
        assert_eq!(p.pick(&[0]), 1);
        assert!(p.pick(&[0, 1]) < 2, "all avoided: the rotation goes on");
    }
}

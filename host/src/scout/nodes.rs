//! The set of Scout nodes a client rotates over, and what it has seen of each.
//!
//! Invariant: a node that failed (connect error, timeout, 5xx) is out of the rotation until
//! its cool-down ends; then the next call that lands on it is the probe that brings it back
//! (success) or ejects it again (failure). When every node is ejected, the one whose cool-down
//! ends first is tried anyway, so a call is never refused for want of a node.

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
}

pub(crate) struct Node {
    pub base: Url,
    successes: AtomicU64,
    failures: AtomicU64,
    latency_us_total: AtomicU64,
    answered: AtomicU64,
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

    /// The next node in the rotation that is not cooling down, skipping `avoid` (nodes this
    /// call already tried) while any other is available.
    pub fn pick(&self, avoid: &[usize]) -> usize {
        let n = self.nodes.len();
        let now = self.now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let usable = |i: usize| self.nodes[i].ejected_until_ms.load(Ordering::Relaxed) <= now;
        for pass_avoid in [true, false] {
            for k in 0..n {
                let i = (start + k) % n;
                if usable(i) && !(pass_avoid && avoid.contains(&i)) {
                    return i;
                }
            }
        }
        // Everything is cooling down: probe the node that comes back first.
        (0..n)
            .min_by_key(|&i| self.nodes[i].ejected_until_ms.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// The node answered (whatever the status): it is healthy.
    pub fn answered(&self, i: usize, latency: Duration, success: bool) {
        let node = &self.nodes[i];
        node.answered.fetch_add(1, Ordering::Relaxed);
        node.latency_us_total
            .fetch_add(latency.as_micros() as u64, Ordering::Relaxed);
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
            })
            .collect()
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

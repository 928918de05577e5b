//! The bucket layouts of the daemon's histograms, in one place, so that every duration in
//! `/metrics` is cut at the same edges and two of them can be compared bucket by bucket.
//!
//! The histograms themselves live where the work is measured (the intake writers, the
//! Scout client, the notifier, the adapter runtime) and reach `/metrics` the way their
//! counters do: `api::metrics` registers a clone of each at scrape time (a clone shares the
//! same figures).
//!
//! Invariant, kept by each family's owner: a histogram's labels are drawn from a fixed set
//! (an operation, an export name) or from the configuration (the Scout nodes), never from
//! the data, so the number of series is bounded whatever the daemon handles.

use std::time::Instant;

use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::histogram::exponential_buckets;

/// Durations of one request or call: 1 ms to about 33 s, doubling (16 edges). Anything
/// slower is past every timeout the daemon sets by default and lands in `+Inf`.
pub fn request_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Durations that include waiting and retries (a callback from its job's end to its
/// delivery): 1 ms to about 70 minutes, doubling (23 edges).
pub fn delivery_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 23))
}

/// Sizes of a batch: 1 to 16,384, doubling (15 edges; `database.intake_batch_max` is
/// 1,024 by default).
pub fn batch_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// A family of [`request_seconds`] histograms, one per label set.
pub type RequestSeconds<L> = Family<L, Histogram, fn() -> Histogram>;

/// An empty [`RequestSeconds`] family.
pub fn request_seconds_family<L>() -> RequestSeconds<L>
where
    L: Clone + std::hash::Hash + Eq,
{
    Family::new_with_constructor(request_seconds as fn() -> Histogram)
}

/// Seconds since `start`, as a histogram takes them.
pub fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket edges as encoded, so the tests check what a scrape shows.
    fn edges(h: Histogram) -> Vec<String> {
        let mut r = prometheus_client::registry::Registry::default();
        r.register("h", "h", h);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        text.lines()
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn request_buckets_start_at_a_millisecond_and_double() {
        let e = edges(request_seconds());
        assert_eq!(e.first().map(String::as_str), Some("0.001"));
        assert_eq!(e.get(1).map(String::as_str), Some("0.002"));
        assert_eq!(e.get(15).map(String::as_str), Some("32.768"));
        assert_eq!(e.last().map(String::as_str), Some("+Inf"));
        assert_eq!(e.len(), 17);
    }

    #[test]
    fn delivery_buckets_reach_an_hour() {
        let e = edges(delivery_seconds());
        assert_eq!(e.len(), 24);
        assert_eq!(e[22], "4194.304");
    }

    #[test]
    fn batch_buckets_hold_the_default_batch_bound() {
        let e = edges(batch_sizes());
        assert!(e.contains(&"1024.0".to_string()), "{e:?}");
        assert_eq!(e[0], "1.0");
    }
}

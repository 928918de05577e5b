//! What the adapter's calls cost and how they fail, for `/metrics`.
//!
//! One [`AdapterMetrics`] per configured adapter, kept across reloads: the adapter's
//! source owns it and every adapter loaded from that source shares it, so a reload does not
//! reset the figures.
//!
//! Invariants:
//! - Every export call that gets an instance slot is timed once (`runtime::call`), whatever
//!   its outcome; a call refused before it runs (input over the limit) is not timed.
//! - Every [`AdapterError`] is counted once, where it is made.
//! - Labels are the WIT export names and the kinds of failure, both fixed sets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::AdapterError;
use crate::histograms::{self, RequestSeconds};

/// The label of a call's duration.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ExportLabels {
    /// The WIT export, as `wit/adapter.wit` names it.
    pub export: &'static str,
}

/// The labels of a failed call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    pub export: &'static str,
    /// [`AdapterError::kind`].
    pub reason: &'static str,
}

/// Call durations by export and failures by export and kind. Cheap to clone; clones
/// share figures.
#[derive(Clone)]
pub struct AdapterMetrics {
    pub call_seconds: RequestSeconds<ExportLabels>,
    pub failures: Family<FailureLabels, Counter>,
}

impl Default for AdapterMetrics {
    fn default() -> Self {
        Self {
            call_seconds: histograms::request_seconds_family(),
            failures: Family::default(),
        }
    }
}

impl AdapterMetrics {
    pub(crate) fn called(&self, export: &'static str, seconds: f64) {
        self.call_seconds
            .get_or_create(&ExportLabels { export })
            .observe(seconds);
    }

    /// Counts `e`, and hands it back, so that the place that makes an error counts it.
    pub(crate) fn failed(&self, e: AdapterError) -> AdapterError {
        self.failures
            .get_or_create(&FailureLabels {
                export: e.export(),
                reason: e.kind(),
            })
            .inc();
        e
    }
}

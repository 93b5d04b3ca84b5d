//! The operator's Prometheus metrics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;

pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    /// Failed reconciles by the error's category (kubernetes_api, engine, …).
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Upgrades by result: completed, rolled_back, blocked.
    pub upgrades: IntCounterVec,
    pub savepoint_duration: Histogram,
    pub savepoint_size: Histogram,
    /// Writes to the Kubernetes API by kind (status, apply, delete, event).
    pub api_writes: IntCounterVec,
    jobs_by_phase: IntGaugeVec,
    phases: Mutex<HashMap<String, String>>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // The metric definitions are constants: a failure here is a programming error.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("sjob_operator".into()), None)
            .unwrap_or_else(|_| Registry::new());
        let reconciles = must(IntCounter::new("reconciles_total", "Reconciles run"));
        let reconcile_errors = must(IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Reconciles that failed, by the error's category",
            ),
            &["category"],
        ));
        let reconcile_duration = must(Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time spent in one reconcile")
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        ));
        let upgrades = must(IntCounterVec::new(
            Opts::new("upgrades_total", "Upgrades by result"),
            &["result"],
        ));
        let savepoint_duration = must(Histogram::with_opts(
            HistogramOpts::new(
                "savepoint_duration_seconds",
                "From the savepoint request to its completion",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
            ]),
        ));
        let savepoint_size = must(Histogram::with_opts(
            HistogramOpts::new("savepoint_size_bytes", "Bytes of state in a savepoint")
                .buckets(prometheus::exponential_buckets(1024.0, 8.0, 10).unwrap_or_default()),
        ));
        let api_writes = must(IntCounterVec::new(
            Opts::new(
                "api_writes_total",
                "Writes to the Kubernetes API, by what was written",
            ),
            &["kind"],
        ));
        let jobs_by_phase = must(IntGaugeVec::new(
            Opts::new("jobs", "StatefulJobs by phase"),
            &["phase"],
        ));
        must(registry.register(Box::new(reconciles.clone())));
        must(registry.register(Box::new(reconcile_errors.clone())));
        for h in [&reconcile_duration, &savepoint_duration, &savepoint_size] {
            must(registry.register(Box::new(h.clone())));
        }
        must(registry.register(Box::new(upgrades.clone())));
        must(registry.register(Box::new(api_writes.clone())));
        must(registry.register(Box::new(jobs_by_phase.clone())));
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            upgrades,
            savepoint_duration,
            savepoint_size,
            api_writes,
            jobs_by_phase,
            phases: Mutex::new(HashMap::new()),
        }
    }

    /// Records a job's phase (None: the job is gone).
    pub fn set_phase(&self, key: &str, phase: Option<String>) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        match phase {
            Some(p) => {
                phases.insert(key.to_owned(), p);
            }
            None => {
                phases.remove(key);
            }
        }
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for p in phases.values() {
            *counts.entry(p.as_str()).or_default() += 1;
        }
        self.jobs_by_phase.reset();
        for (p, n) in counts {
            self.jobs_by_phase.with_label_values(&[p]).set(n);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_counted_per_job() {
        let m = Metrics::new();
        m.set_phase("a/x", Some("Running".into()));
        m.set_phase("a/y", Some("Running".into()));
        m.set_phase("a/z", Some("Upgrading".into()));
        m.set_phase("a/y", None);
        m.upgrades.with_label_values(&["completed"]).inc();
        let text = m.render();
        assert!(
            text.contains("sjob_operator_jobs{phase=\"Running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sjob_operator_jobs{phase=\"Upgrading\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sjob_operator_upgrades_total{result=\"completed\"} 1"),
            "{text}"
        );
    }
}

//! What the operator measures, and the small HTTP server that shows it: `GET /healthz` (200
//! while the process runs) and `GET /metrics` (Prometheus text, `sluice_operator_` prefix).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::leader::Gate;

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    leader: Gauge,
    /// The gate of the controller that runs, if one does: the `leader` gauge is read from it
    /// when the metrics are rendered, so it drops at the renew deadline itself.
    gate: Mutex<Option<Gate>>,
}

/// The label of a failed reconcile: its error's category (`controller::Error::category`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailureLabels {
    /// `kubernetes`, `spec`, `credentials`, `destination`, `cleanup`, `leadership` or
    /// `finalizer`.
    pub category: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_operator");
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "Reconciles of SegmentIntegrations, successful or not",
            reconciles.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciles that failed and were retried with backoff, by error category",
            failures.clone(),
        );
        // 5 ms to about 40 s: a reconcile waits on the database for at most 15 s.
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica runs the controller and may write (it holds the leader Lease \
             and renewed it within the renew deadline), else 0",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            gate: Mutex::new(None),
        }
    }
}

impl Metrics {
    /// Counts a finished reconcile and its duration.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a failed reconcile of the error category `category`.
    pub fn failed(&self, category: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { category })
            .inc();
    }

    /// Follows `gate` in the `leader` gauge: the controller runs while it is open.
    pub fn follow(&self, gate: Gate) {
        *self.gate.lock().unwrap_or_else(PoisonError::into_inner) = Some(gate);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let leading = self
            .gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(Gate::is_leading);
        self.leader.set(i64::from(leading));
        sluice_ingest::metrics::encode(&self.registry)
    }
}

/// `GET /healthz` and `GET /metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(render))
        .with_state(metrics)
}

/// Serves [`router`] on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics)).await
}

async fn render(State(metrics): State<Arc<Metrics>>) -> Response {
    sluice_ingest::metrics::exposition(metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_failures_and_durations_are_rendered() {
        let metrics = Metrics::default();
        metrics.reconciled(Duration::from_millis(20));
        metrics.reconciled(Duration::from_millis(30));
        metrics.failed("destination");
        let text = metrics.render();
        assert!(
            text.contains("sluice_operator_reconciles_total 2"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_reconcile_failures_total{category=\"destination\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_reconcile_duration_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn the_leader_gauge_follows_the_gate() {
        let metrics = Metrics::default();
        assert!(metrics.render().contains("sluice_operator_leader 0"));
        metrics.follow(Gate::unconditional());
        assert!(metrics.render().contains("sluice_operator_leader 1"));
        metrics.follow(Gate::ended());
        assert!(metrics.render().contains("sluice_operator_leader 0"));
    }
}

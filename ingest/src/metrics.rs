//! Prometheus metrics of the ingest service, served as text at `GET /metrics`, and the one
//! way both binaries serve their registry ([`exposition`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::event::Table;

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The HTTP status code answered.
    pub status: u16,
}

/// Labels of per-table counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// The destination table.
    pub table: String,
}

/// Every metric the service exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabels, Counter>,
    loaded: Family<TableLabels, Counter>,
    skipped: Family<TableLabels, Counter>,
    excluded: Family<TableLabels, Counter>,
    rejected: Family<TableLabels, Counter>,
    batch_rows: Histogram,
    commit_seconds: Histogram,
    queue_depth: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `sluice_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sluice");
        let requests = Family::<StatusLabels, Counter>::default();
        let loaded = Family::<TableLabels, Counter>::default();
        let skipped = Family::<TableLabels, Counter>::default();
        let excluded = Family::<TableLabels, Counter>::default();
        let rejected = Family::<TableLabels, Counter>::default();
        let batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let queue_depth = Gauge::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by status",
            requests.clone(),
        );
        registry.register(
            "events_loaded",
            "Events committed to the database, by table",
            loaded.clone(),
        );
        registry.register(
            "events_skipped",
            "Valid events acknowledged but not loaded because their table is not selected",
            skipped.clone(),
        );
        registry.register(
            "values_excluded",
            "Values the column selection kept out of the warehouse, by table",
            excluded.clone(),
        );
        registry.register(
            "records_rejected",
            "Records the database refused, kept in _sdc_rejected, by table",
            rejected.clone(),
        );
        registry.register(
            "batch_rows",
            "Rows written per batch (one transaction)",
            batch_rows.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time to write and commit one batch",
            commit_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Events received and waiting for their commit",
            queue_depth.clone(),
        );
        Metrics {
            registry,
            requests,
            loaded,
            skipped,
            excluded,
            rejected,
            batch_rows,
            commit_seconds,
            queue_depth,
        }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }

    /// Counts an answered request.
    pub fn request(&self, status: u16) {
        self.requests.get_or_create(&StatusLabels { status }).inc();
    }

    fn by_table(family: &Family<TableLabels, Counter>, table: Table, n: usize) {
        family
            .get_or_create(&TableLabels {
                table: table.name().to_owned(),
            })
            .inc_by(n as u64);
    }

    /// Counts committed events.
    pub fn loaded(&self, table: Table, n: usize) {
        Self::by_table(&self.loaded, table, n);
    }

    /// Counts skipped events.
    pub fn skipped(&self, table: Table, n: usize) {
        Self::by_table(&self.skipped, table, n);
    }

    /// Counts values the column selection excluded.
    pub fn excluded(&self, table: Table, n: usize) {
        Self::by_table(&self.excluded, table, n);
    }

    /// Counts rejected records.
    pub fn rejected(&self, table: Table, n: usize) {
        Self::by_table(&self.rejected, table, n);
    }

    /// Records a committed batch.
    pub fn batch(&self, rows: usize, seconds: f64) {
        self.batch_rows.observe(rows as f64);
        self.commit_seconds.observe(seconds);
    }

    /// Moves the queue depth by `delta` events.
    pub fn queue(&self, delta: i64) {
        self.queue_depth.inc_by(delta);
    }
}

/// The content type of the OpenMetrics text format that [`prometheus_client`]'s encoder writes
/// (OpenMetrics 1.0, section "Text format"), which Prometheus negotiates and reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// The answer to `GET /metrics`: `text` (from [`encode`]) with its [`CONTENT_TYPE`].
pub fn exposition(text: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

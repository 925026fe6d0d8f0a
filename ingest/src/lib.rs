//! Sluice's ingest service: receives Segment events over HTTP and loads them, keyed by
//! `message_id`, into Stitch-compatible tables in PostgreSQL or SQLite.
//!
//! The pieces, in the order an event meets them:
//! [`protocol`] (routes, authentication) -> [`json`] (lenient decoding) -> [`event`]
//! (validation) -> [`normalize`] (flat, typed records) -> [`load`] (queue, batcher, writers,
//! with [`naming`] for column names) -> the tables of [`schema`].
//! What was refused is kept by [`refused`] (the extraction log), what was loaded by
//! [`activity`]; [`status_page`] shows both at `GET /`.
//! [`run`] wires them together and serves at once, while [`startup`] prepares the schema; the
//! operator uses [`load::Warehouse`] to create schemas and to drop what it created
//! ([`load::ownership`]).

pub mod activity;
pub mod config;
pub mod event;
pub mod json;
pub mod load;
pub mod metrics;
pub mod naming;
pub mod normalize;
pub mod protocol;
pub mod refused;
pub mod schema;
pub mod selection;
pub mod startup;
pub mod status_page;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

use load::{LoadError, Loader, Warehouse};
use metrics::Metrics;
use protocol::{AppState, Auth, ConnectionLimits, CorsOrigins, WriteKeys};
use schema::Dialect;
use startup::Readiness;

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database or schema could not be prepared.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The column selection cannot be used.
    #[error(transparent)]
    Selection(#[from] selection::SelectionError),
    /// The listening socket failed.
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// `sluice-ingest erase`: deletes every row of `user_id` from every event table of the
/// configured schema and records it in `_sdc_deletions` (one transaction), under a message id of
/// its own (`erase:` and the time). The schema must have been prepared by the service.
pub async fn erase(config: &Config, user_id: &str) -> Result<load::Deletion, LoadError> {
    let warehouse =
        Warehouse::connect_with(&config.database_url, &config.schema, 1, config.timeouts())?;
    let request = load::DeletionRequest {
        message_id: format!(
            "erase:{}",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        ),
        user_id: user_id.to_owned(),
    };
    warehouse.delete_user(&request).await
}

/// `sluice-ingest reset`: resets `tables` of the configured schema, each to its next table
/// version, in one transaction ([`load::reset`]), keeping or dropping the old rows as
/// `old_rows` says. The schema must have been prepared by the service.
pub async fn reset(
    config: &Config,
    tables: &[event::Table],
    old_rows: load::OldRows,
) -> Result<Vec<load::TableReset>, LoadError> {
    let warehouse =
        Warehouse::connect_with(&config.database_url, &config.schema, 1, config.timeouts())?;
    let requests: Vec<load::ResetRequest> = tables
        .iter()
        .map(|&table| load::ResetRequest {
            table,
            version: None,
        })
        .collect();
    warehouse.reset_tables(&requests, old_rows).await
}

/// Runs the service on `listener` until `shutdown` resolves, then stops accepting requests,
/// lets the ones in flight finish (their events are committed and answered) and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tables = config.selected_tables();
    let selection = config.selection()?;
    // Each writer's connection, kept between batches on PostgreSQL (`load::postgres::Kept`),
    // and a second one it may take (for DDL, or to retry a refused batch row by row); two more for
    // catalog reads, deletions and the status page.
    let connections = 2 * config.writers + 2;
    let warehouse = Warehouse::connect_with(
        &config.database_url,
        &config.schema,
        connections,
        config.timeouts(),
    )?
    .with_column_budgets(selection.column_budgets());
    let dialect = warehouse.dialect();
    let readiness = Readiness::preparing();
    let preparing = tokio::spawn({
        let (warehouse, tables, readiness) = (warehouse.clone(), tables.clone(), readiness.clone());
        let owner = config.owner();
        async move {
            startup::prepare_schema(&warehouse, &tables, owner.as_ref(), &readiness).await;
        }
    });
    let metrics = Arc::new(Metrics::new());
    let (loader, batcher) = Loader::start(
        warehouse.clone(),
        config.loader(dialect == Dialect::Sqlite),
        metrics.clone(),
    );
    let auth = Auth::new(config.shared_secret.as_deref(), config.api_key.as_deref())
        .accept_first_event_signatures(config.accept_first_event_signatures);
    if auth.is_open() {
        tracing::warn!(
            "no shared secret or API key configured: /v1/webhook accepts unauthenticated requests"
        );
    } else if config.accept_first_event_signatures && config.shared_secret.is_some() {
        tracing::warn!(
            "--accept-first-event-signatures is on: a batch signed on its first event only is \
             accepted, so events appended to a captured signed batch would be loaded"
        );
    }
    let refusals = Arc::new(refused::RefusalLog::new(config.refused_log_size as usize));
    let flushing = tokio::spawn(refused::flush_every_interval(
        refusals.clone(),
        warehouse.clone(),
    ));
    let write_keys = WriteKeys::new(&config.write_keys);
    if write_keys.is_open() {
        tracing::warn!(
            "no write keys configured: the Tracking API (/v1/track, /v1/batch, ...) accepts any request"
        );
    }
    let warehouse_for_flush = warehouse.clone();
    let app = protocol::router(AppState {
        loader,
        warehouse,
        auth,
        write_keys,
        cors_origins: CorsOrigins::new(&config.cors_origins),
        tables,
        selection: Arc::new(selection),
        metrics,
        max_body_bytes: config.max_body_bytes,
        body_read_timeout: config.body_read_timeout,
        commit_timeout: config.commit_timeout(),
        readiness,
        refusals: refusals.clone(),
        honour_deletes: config.honour_deletes,
        settings: Arc::new(config.shown()),
    });
    let address = listener.local_addr()?;
    tracing::info!(
        listen = %address,
        database = %dialect,
        schema = %config.schema,
        status_page = %format!("http://{address}/"),
        "sluice-ingest is serving"
    );
    let limits = ConnectionLimits {
        max_connections: config.max_http_connections,
        header_read_timeout: config.header_read_timeout,
    };
    protocol::serve(listener, app, limits, shutdown).await;
    preparing.abort();
    flushing.abort();
    if let Err(error) = refused::flush(&refusals, &warehouse_for_flush).await {
        tracing::warn!(%error, "the last refusal counts could not be added to _sdc_refusals");
    }
    // The router, and with it every Loader handle, is gone: the batcher drains and ends.
    if let Err(e) = batcher.await {
        tracing::error!(error = %e, "the batcher ended abnormally");
    }
    tracing::info!("stopped");
    Ok(())
}

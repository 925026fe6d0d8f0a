//! Sluice's ingest service: receives Segment events over HTTP and loads them, keyed by
//! `message_id`, into Stitch-compatible tables in PostgreSQL or SQLite.
//!
//! The pieces, in the order an event meets them:
//! [`protocol`] (routes, authentication) -> [`json`] (lenient decoding) -> [`event`]
//! (validation) -> [`normalize`] (flat, typed records) -> [`load`] (queue, batcher, writers,
//! with [`naming`] for column names) -> the tables of [`schema`].
//! [`run`] wires them together; the operator uses [`load::Warehouse`] to create schemas.

pub mod config;
pub mod event;
pub mod json;
pub mod load;
pub mod metrics;
pub mod naming;
pub mod normalize;
pub mod protocol;
pub mod schema;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

use load::{LoadError, Loader, Warehouse};
use metrics::Metrics;
use protocol::{AppState, Auth, CorsOrigins, WriteKeys};
use schema::Dialect;

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database or schema could not be prepared.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The listening socket failed.
    #[error("cannot serve HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the service on `listener` until `shutdown` resolves, then stops accepting requests,
/// lets the ones in flight finish (their events are committed and answered) and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tables = config.selected_tables();
    let connections = config.writers + 2;
    let warehouse = Warehouse::connect(&config.database_url, &config.schema, connections)?;
    let dialect = warehouse.dialect();
    prepare_schema(&warehouse, &tables).await?;
    let metrics = Arc::new(Metrics::new());
    let (loader, batcher) = Loader::start(
        warehouse.clone(),
        config.loader(dialect == Dialect::Sqlite),
        metrics.clone(),
    );
    let auth = Auth::new(config.shared_secret.as_deref(), config.api_key.as_deref());
    if auth.is_open() {
        tracing::warn!(
            "no shared secret or API key configured: /v1/webhook accepts unauthenticated requests"
        );
    }
    let write_keys = WriteKeys::new(&config.write_keys);
    if write_keys.is_open() {
        tracing::warn!(
            "no write keys configured: the Tracking API (/v1/track, /v1/batch, ...) accepts any request"
        );
    }
    let app = protocol::router(AppState {
        loader,
        warehouse,
        auth,
        write_keys,
        cors_origins: CorsOrigins::new(&config.cors_origins),
        tables,
        metrics,
        max_body_bytes: config.max_body_bytes,
    });
    tracing::info!(
        listen = %listener.local_addr()?,
        database = %dialect,
        schema = %config.schema,
        "sluice-ingest is serving"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    // The router, and with it every Loader handle, is gone: the batcher drains and ends.
    if let Err(e) = batcher.await {
        tracing::error!(error = %e, "the batcher ended abnormally");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Creates the schema and tables, retrying while the database is not up yet, so that the
/// service and its database can start in any order.
async fn prepare_schema(warehouse: &Warehouse, tables: &[event::Table]) -> Result<(), LoadError> {
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match warehouse.ensure_schema(tables).await {
            Ok(()) => return Ok(()),
            Err(LoadError::Unavailable(reason)) => {
                tracing::warn!(%reason, retry_in = ?delay, "database not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(10));
            }
            Err(other) => return Err(other),
        }
    }
}

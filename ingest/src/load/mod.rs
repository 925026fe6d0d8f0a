//! Loading: the bounded queue, the batcher with group commit, and the database writers.
//!
//! ```text
//! receiver --Job--> queue --> batcher --Batch--> writer (one transaction) --> COMMIT --> ack
//! ```
//!
//! A job is acknowledged only after the transaction that holds its records has committed.

/// Binds the parameters of [`schema::upsert_loads_sql`] for `$loads` (a `&[TableLoad]`) of the
/// minute `$minute` to `$query`, each time encoded by `$time`: the same parameters on both
/// databases; only the times' encoding differs.
macro_rules! bind_loads {
    ($query:expr, $loads:expr, $minute:expr, $time:expr) => {{
        let mut query = $query;
        for load in $loads {
            query = query
                .bind(load.table.name())
                .bind($time($minute))
                .bind(load.loaded)
                .bind(load.rejected)
                .bind(load.columns_added)
                .bind(load.first_received_at.map($time))
                .bind(load.last_received_at.map($time));
        }
        query
    }};
}

mod batcher;
mod deletion;
mod objects;
pub mod ownership;
pub mod plan;
mod postgres;
mod privilege;
pub mod reset;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use tokio::sync::Mutex;

pub use batcher::{Job, LoadSummary, Loader, LoaderConfig, Outcome, Submitted, Writer};
pub use deletion::{Deletion, DeletionRequest};
pub use ownership::{Claim, Dropped, OWNERSHIP_TABLE, Owner};
pub use plan::Item;
pub use reset::{OldRows, ResetRequest, TableReset};

use crate::event::Table;
use crate::naming::KeyPath;
use crate::schema::{
    self, Catalog, ColumnRecord, ColumnType, ColumnsFingerprint, Dialect, InvalidSchemaName,
    NewColumn, add_columns_sql, validate_schema_name,
};
use plan::{Evolution, TableRows, dedup};

/// Why loading failed. Each variant says what to check.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// The database URL is not one Sluice can use.
    #[error(
        "unsupported database URL {0:?}: use postgres://user:password@host:port/database or sqlite://path/to/file.db"
    )]
    BadUrl(String),
    /// The schema name is not acceptable.
    #[error(transparent)]
    Schema(#[from] InvalidSchemaName),
    /// The database could not be reached or refused the work for a reason that may pass
    /// (connection lost, timeout, lock contention). The sender should retry.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error that retrying will not fix without a change.
    #[error("the database refused the batch: {0}")]
    Database(String),
    /// A table reset cannot be carried out as asked (a kept name taken, the schema not prepared);
    /// nothing was changed. The message says what to do.
    #[error("{0}")]
    ResetRefused(String),
    /// The queue has no room for the events; the sender should retry later.
    #[error("the load queue is full")]
    QueueFull,
    /// The loader is shutting down and takes no new work.
    #[error("the loader is shutting down")]
    ShuttingDown,
    /// The database role lacks a privilege (SQLSTATE 42501): no outage to wait out, but a
    /// grant to give.
    #[error("the database role lacks a privilege ({message}); {grant}")]
    PermissionDenied {
        /// The database's message.
        message: String,
        /// The statement that grants what is missing.
        grant: String,
    },
    /// A table Sluice created cannot be dropped: objects Sluice did not create depend on it.
    #[error(
        "cannot drop table {schema}.{table}, which Sluice created: objects Sluice did not create \
         depend on it ({detail}); drop or change them first (nothing was dropped)"
    )]
    DropBlocked {
        /// The schema.
        schema: String,
        /// The table.
        table: String,
        /// The database's message and detail, naming the dependent objects.
        detail: String,
    },
    /// Another owner (integration) claimed the schema (see [`ownership`]).
    #[error(
        "schema {schema} is already used by {owner} (uid {uid}); two integrations cannot share \
         a schema: give this one a schema of its own"
    )]
    SchemaClaimed {
        /// The schema.
        schema: String,
        /// The name of the owner holding it.
        owner: String,
        /// That owner's UID.
        uid: String,
    },
}

/// How an error from the database should be handled. Errors are classified by their code
/// (PostgreSQL's SQLSTATE class, SQLite's primary result code), never by their message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Something in some record was refused (a value, a row's size, a column its keys need):
    /// find the record, set it aside in `_sdc_rejected`, and commit the rest of its batch.
    Data,
    /// The catalog Sluice holds is stale (a column changed under it): re-read and retry.
    Stale,
    /// The database cannot take work now (connection, timeout, lock, disk, shutdown, missing
    /// privilege): answer 503 so the sender retries, and change nothing.
    Unavailable,
}

fn classify(error: &sqlx::Error, dialect: Dialect) -> Failure {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match dialect {
                Dialect::Postgres => postgres::classify(&code),
                Dialect::Sqlite => sqlite::classify(&code),
            }
        }
        sqlx::Error::Encode(_) | sqlx::Error::InvalidArgument(_) => Failure::Data,
        _ => Failure::Unavailable,
    }
}

/// A row of `_sdc_columns` as read: table, column, key path (JSON), column type, split of.
type RecordRow = (String, String, Option<String>, String, Option<String>);

/// Reads a row of `_sdc_columns`; rows Sluice cannot read (edited by hand) are left out.
fn record_of_row(row: RecordRow) -> Option<ColumnRecord> {
    let (table, column, key_path, column_type, split_of) = row;
    let key_path = match key_path {
        Some(text) => Some(KeyPath::from_json(&text)?),
        None => None,
    };
    Some(ColumnRecord {
        table: table.parse().ok()?,
        column,
        key_path,
        column_type: ColumnType::from_catalog(&column_type)?,
        split_of,
    })
}

#[derive(Debug, Clone)]
enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// A destination: a database connection pool and the schema Sluice loads into.
///
/// This is also the library entry point the operator uses to create a schema and its tables
/// ([`Warehouse::ensure_owned_schema`]) and to drop what it created ([`Warehouse::drop_owned`]).
///
/// Clones share the pool and the cached [`Catalog`] (the columns Sluice knows each table has),
/// so that the batcher's writers read the catalog from the database once, not per batch.
#[derive(Debug, Clone)]
pub struct Warehouse {
    pool: Pool,
    schema: String,
    known: Arc<Mutex<Catalog>>,
    budgets: Arc<BTreeMap<Table, usize>>,
    /// The writers' connections between batches (PostgreSQL only).
    kept: Arc<postgres::Kept>,
}

/// A record the database refused, kept in `_sdc_rejected` with the reason.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The table the record was meant for.
    pub table: Table,
    /// Its `message_id`.
    pub message_id: String,
    /// Why it was refused.
    pub reason: String,
    /// The event as received.
    pub record: String,
}

impl Rejected {
    /// The rejection of `item` for `reason`.
    fn of(item: &Item, reason: String) -> Rejected {
        Rejected {
            table: item.record.table,
            message_id: item.record.message_id.clone(),
            reason,
            record: String::from_utf8_lossy(&item.raw).into_owned(),
        }
    }
}

/// One event table's figures in `_sdc_loads` over a period, as [`Warehouse::loads_since`]
/// reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadFigures {
    /// The event table's name.
    pub table_name: String,
    /// Rows upserted in the period (redeliveries included).
    pub rows_loaded: i64,
    /// Records set aside in `_sdc_rejected` in the period.
    pub rows_rejected: i64,
    /// The latest `_sdc_received_at` of any row ever loaded into the table; `None` when none was.
    pub last_received_at: Option<DateTime<Utc>>,
}

/// A row of `_sdc_rejected` without the record itself, as the status page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    /// When the record was set aside.
    pub rejected_at: DateTime<Utc>,
    /// The table it was meant for.
    pub table_name: String,
    /// Its `message_id`.
    pub message_id: Option<String>,
    /// Why the database refused it.
    pub reason: String,
}

/// What one transaction adds to a table's row of `_sdc_loads` for the current minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TableLoad {
    table: Table,
    loaded: i64,
    rejected: i64,
    columns_added: i64,
    first_received_at: Option<DateTime<Utc>>,
    last_received_at: Option<DateTime<Utc>>,
}

impl TableLoad {
    fn new(table: Table) -> TableLoad {
        TableLoad {
            table,
            loaded: 0,
            rejected: 0,
            columns_added: 0,
            first_received_at: None,
            last_received_at: None,
        }
    }

    /// The loads of `tables` written from `items`, of which the `refused` records were set
    /// aside instead.
    fn of_rows(tables: &[TableRows<'_>], items: &[Item], refused: &[Rejected]) -> Vec<TableLoad> {
        tables
            .iter()
            .map(|rows| {
                let mut load = TableLoad::new(rows.table);
                for &i in &rows.items {
                    let item = &items[i];
                    let set_aside = refused.iter().any(|r| {
                        r.table == item.record.table && r.message_id == item.record.message_id
                    });
                    if set_aside {
                        load.rejected += 1;
                        continue;
                    }
                    load.loaded += 1;
                    let at = item.received_at;
                    load.first_received_at = Some(load.first_received_at.map_or(at, |t| t.min(at)));
                    load.last_received_at = Some(load.last_received_at.map_or(at, |t| t.max(at)));
                }
                load
            })
            .collect()
    }
}

/// The start of the minute of `at`.
fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp().div_euclid(60) * 60, 0).unwrap_or(at)
}

/// How long the database may keep Sluice waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Longest wait for a pooled connection, connecting included (default 5 s).
    pub acquire: Duration,
    /// Longest a statement may run: PostgreSQL's `statement_timeout`, SQLite's busy timeout
    /// (default 10 s).
    pub statement: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            acquire: Duration::from_secs(5),
            statement: Duration::from_secs(10),
        }
    }
}

impl Warehouse {
    /// Opens a pool for `url` (`postgres://…` or `sqlite://…`) without connecting yet, so the
    /// process can start while the database is down. `connections` caps the pool; the
    /// timeouts are the defaults ([`Timeouts::default`]).
    pub fn connect(url: &str, schema: &str, connections: u32) -> Result<Warehouse, LoadError> {
        Warehouse::connect_with(url, schema, connections, Timeouts::default())
    }

    /// [`Warehouse::connect`] with these timeouts.
    pub fn connect_with(
        url: &str,
        schema: &str,
        connections: u32,
        timeouts: Timeouts,
    ) -> Result<Warehouse, LoadError> {
        validate_schema_name(schema)?;
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Pool::Postgres(postgres::pool(url, connections, timeouts)?)
        } else if let Some(path) = sqlite::path_of(url) {
            Pool::Sqlite(sqlite::pool(path, schema, connections, timeouts)?)
        } else {
            return Err(LoadError::BadUrl(url.to_owned()));
        };
        Ok(Warehouse {
            pool,
            schema: schema.to_owned(),
            known: Arc::default(),
            budgets: Arc::default(),
            kept: Arc::default(),
        })
    }

    /// The schema this warehouse loads into.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// This warehouse with a column budget per table (the column selection's `maxColumns`): a
    /// table stops growing columns at its budget and later keys go to `_sdc_overflow`.
    pub fn with_column_budgets(mut self, budgets: BTreeMap<Table, usize>) -> Warehouse {
        self.budgets = Arc::new(budgets);
        self
    }

    /// The SQL dialect of the database.
    pub fn dialect(&self) -> Dialect {
        match self.pool {
            Pool::Postgres(_) => Dialect::Postgres,
            Pool::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// The PostgreSQL pool, when this is PostgreSQL (for tests and reports).
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(pool) => Some(pool),
            Pool::Sqlite(_) => None,
        }
    }

    /// The SQLite pool, when this is SQLite (for tests and reports).
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.pool {
            Pool::Sqlite(pool) => Some(pool),
            Pool::Postgres(_) => None,
        }
    }

    fn failure(&self, error: &sqlx::Error) -> Failure {
        classify(error, self.dialect())
    }

    fn error(&self, error: sqlx::Error) -> LoadError {
        match self.failure(&error) {
            Failure::Unavailable => LoadError::Unavailable(error.to_string()),
            Failure::Data | Failure::Stale => LoadError::Database(error.to_string()),
        }
    }

    /// Creates the schema, the event tables in `tables`, `_sdc_rejected`, `_sdc_columns`,
    /// `_sdc_loads`, `_sdc_refusals`, `_sdc_deletions` and `_sdc_table_versions` if they are missing, and records the tables' base
    /// columns in `_sdc_columns`. Safe to run from several processes at once; changes nothing
    /// that exists, and needs no privilege for what exists (a schema created beforehand needs only `USAGE` and `CREATE` on it, not
    /// `CREATE` on the database).
    pub async fn ensure_schema(&self, tables: &[Table]) -> Result<(), LoadError> {
        let mut tx = self.ddl_transaction().await?;
        self.create_missing(&mut tx, tables).await?;
        tx.commit().await.map_err(|e| self.error(e))
    }

    /// Whether the database answers and the schema's tables exist.
    pub async fn ready(&self, tables: &[Table]) -> Result<(), LoadError> {
        let catalog = self.catalog().await?;
        match tables.iter().find(|t| catalog.table(**t).is_empty()) {
            Some(missing) => Err(LoadError::Database(format!(
                "table {}.{} does not exist",
                self.schema, missing
            ))),
            None => Ok(()),
        }
    }

    /// Reads the columns of every event table in the schema, and the key paths `_sdc_columns`
    /// records for them.
    pub async fn catalog(&self) -> Result<Catalog, LoadError> {
        let read = match &self.pool {
            Pool::Postgres(pool) => match pool.acquire().await {
                Ok(mut conn) => postgres::catalog(&mut conn, &self.schema).await,
                Err(e) => Err(e),
            },
            Pool::Sqlite(pool) => match pool.acquire().await {
                Ok(mut conn) => sqlite::catalog(&mut conn, &self.schema).await,
                Err(e) => Err(e),
            },
        };
        read.map_err(|e| self.error(e))
    }

    /// Rows per event table, with column counts: the operator's loading report.
    pub async fn table_report(&self) -> Result<Vec<(Table, usize)>, LoadError> {
        let catalog = self.catalog().await?;
        let mut report: Vec<(Table, usize)> = catalog
            .0
            .iter()
            .map(|(table, columns)| (*table, columns.len()))
            .collect();
        report.sort();
        Ok(report)
    }

    /// The `limit` most recent rows of `_sdc_rejected`, newest first, without the records
    /// themselves.
    pub async fn latest_rejected(&self, limit: u32) -> Result<Vec<RejectedRow>, LoadError> {
        use crate::schema::{REJECTED, quote_ident};
        let sql = format!(
            "{} ORDER BY {} DESC LIMIT {limit}",
            REJECTED.select_sql(
                &self.schema,
                &["_sdc_rejected_at", "table_name", "message_id", "reason"]
            ),
            quote_ident("_sdc_rejected_at")
        );
        type Row = (DateTime<Utc>, String, Option<String>, String);
        let rows: Vec<Row> = match &self.pool {
            Pool::Postgres(pool) => sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool).await,
            Pool::Sqlite(pool) => sqlx::query_as(AssertSqlSafe(sql)).fetch_all(pool).await,
        }
        .map_err(|e| self.error(e))?;
        Ok(rows
            .into_iter()
            .map(
                |(rejected_at, table_name, message_id, reason)| RejectedRow {
                    rejected_at,
                    table_name,
                    message_id,
                    reason,
                },
            )
            .collect())
    }

    /// Adds refusal counts to `_sdc_refusals`, in one transaction.
    pub async fn add_refusals(
        &self,
        counts: &[crate::refused::RefusalCount],
    ) -> Result<(), LoadError> {
        let mut tx = self.begin().await.map_err(|e| self.error(e))?;
        // Four parameters per row: well inside both databases' limits.
        for chunk in counts.chunks(500) {
            let sql = schema::upsert_refusals_sql(self.dialect(), &self.schema, chunk.len());
            macro_rules! bind_counts {
                ($time:expr) => {{
                    let mut query = sqlx::query(AssertSqlSafe(sql));
                    for c in chunk {
                        query = query
                            .bind($time(c.minute))
                            .bind(c.route.as_str())
                            .bind(c.reason.code())
                            .bind(c.count);
                    }
                    query
                }};
            }
            match &mut tx {
                Tx::Postgres(tx) => bind_counts!(|t: DateTime<Utc>| t)
                    .execute(&mut **tx)
                    .await
                    .map(drop),
                Tx::Sqlite(tx) => {
                    bind_counts!(|t: DateTime<Utc>| crate::normalize::format_timestamp(&t))
                        .execute(&mut **tx)
                        .await
                        .map(drop)
                }
            }
            .map_err(|e| self.error(e))?;
        }
        tx.commit().await.map_err(|e| self.error(e))
    }

    /// Refused requests per reason code since `since`, from `_sdc_refusals`, by reason: what
    /// every replica refused.
    pub async fn refusals_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, i64)>, LoadError> {
        let sql = schema::refusals_since_sql(self.dialect(), &self.schema);
        self.fetch_since(sql, since).await
    }

    /// The rows of `sql`, whose one parameter is the time `since` (as each database stores
    /// times).
    async fn fetch_since<T>(&self, sql: String, since: DateTime<Utc>) -> Result<Vec<T>, LoadError>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        match &self.pool {
            Pool::Postgres(pool) => {
                sqlx::query_as(AssertSqlSafe(sql))
                    .bind(since)
                    .fetch_all(pool)
                    .await
            }
            Pool::Sqlite(pool) => {
                sqlx::query_as(AssertSqlSafe(sql))
                    .bind(crate::normalize::format_timestamp(&since))
                    .fetch_all(pool)
                    .await
            }
        }
        .map_err(|e| self.error(e))
    }

    /// Each event table's figures in `_sdc_loads`, by table name: the rows loaded and rejected
    /// in the minutes that start at or after `since` (what every replica committed), and the
    /// latest `_sdc_received_at` ever loaded. A table with no row in `_sdc_loads` is left out.
    pub async fn loads_since(&self, since: DateTime<Utc>) -> Result<Vec<LoadFigures>, LoadError> {
        let sql = schema::loads_report_sql(self.dialect(), &self.schema);
        type Row = (String, i64, i64, Option<DateTime<Utc>>);
        let rows: Vec<Row> = self.fetch_since(sql, since).await?;
        Ok(rows
            .into_iter()
            .map(
                |(table_name, rows_loaded, rows_rejected, last_received_at)| LoadFigures {
                    table_name,
                    rows_loaded,
                    rows_rejected,
                    last_received_at,
                },
            )
            .collect())
    }

    /// Adds the columns an [`Evolution`] asks for, under the schema's DDL lock: names them
    /// against the catalog as it is now ([`schema::TableColumns::plan_columns`]), skips any that
    /// another writer added meanwhile, and records them in `_sdc_columns` in the same
    /// transaction. Once committed, adds them to the cached catalog, in place: a table may have
    /// [`schema::COLUMN_LIMIT`] columns, and a stream whose every event brings new keys evolves
    /// at every batch.
    async fn evolve(&self, evolution: &Evolution) -> Result<(), LoadError> {
        let mut tx = self.ddl_transaction().await?;
        // The catalog is read again only when another writer (or a reset) changed a table
        // being evolved since this one last knew it: on a stream whose every event brings new
        // keys, re-reading every column at each step would cost more than the step.
        let before = tx
            .columns_fingerprints(&self.schema)
            .await
            .map_err(|e| self.error(e))?;
        let plan_on = |current: &Catalog| -> Vec<(Table, Vec<NewColumn>)> {
            evolution
                .0
                .iter()
                .map(|(table, needs)| (*table, current.table(*table).plan_columns(*table, needs)))
                .collect()
        };
        let (planned, reread) = {
            let known = self.known.lock().await;
            let current = evolution
                .0
                .iter()
                .all(|(table, _)| is_current(&known, *table, &before));
            if current {
                (plan_on(&known), None)
            } else {
                drop(known);
                let reread = match &mut tx {
                    Tx::Postgres(tx) => postgres::catalog(tx, &self.schema).await,
                    Tx::Sqlite(tx) => sqlite::catalog(tx, &self.schema).await,
                }
                .map_err(|e| self.error(e))?;
                (plan_on(&reread), Some(reread))
            }
        };
        let mut records = Vec::new();
        let mut loads = Vec::new();
        for (table, new) in &planned {
            let add: Vec<(&str, ColumnType)> = new
                .iter()
                .filter(|c| !c.exists)
                .map(|c| (c.record.column.as_str(), c.record.column_type))
                .collect();
            if !add.is_empty() {
                tracing::info!(schema = %self.schema, %table, columns = add.len(), "adding columns");
                loads.push(TableLoad {
                    columns_added: i64::try_from(add.len()).unwrap_or(i64::MAX),
                    ..TableLoad::new(*table)
                });
            }
            for sql in add_columns_sql(self.dialect(), &self.schema, *table, &add) {
                tx.execute(&sql).await.map_err(|e| self.error(e))?;
            }
            records.extend(new.iter().map(|c| c.record.clone()));
        }
        let now = Utc::now();
        tx.insert_records(&self.schema, &records, now)
            .await
            .map_err(|e| self.error(e))?;
        tx.record_loads(&self.schema, &loads, now)
            .await
            .map_err(|e| self.error(e))?;
        let after = tx
            .columns_fingerprints(&self.schema)
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;

        merge_evolution(
            &mut *self.known.lock().await,
            &planned,
            reread,
            &before,
            &after,
        );
        Ok(())
    }

    /// A transaction holding the schema's DDL lock: a transaction-scoped advisory lock on
    /// PostgreSQL, an immediate (write-locked) transaction on SQLite.
    async fn ddl_transaction(&self) -> Result<Tx, LoadError> {
        let tx = match &self.pool {
            Pool::Postgres(pool) => Tx::Postgres(
                postgres::ddl_transaction(pool, &self.schema)
                    .await
                    .map_err(|e| self.error(e))?,
            ),
            Pool::Sqlite(pool) => Tx::Sqlite(
                pool.begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(|e| self.error(e))?,
            ),
        };
        Ok(tx)
    }

    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match &self.pool {
            Pool::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            Pool::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// Writes a batch in one transaction and commits it: adds the columns it needs first,
    /// then upserts every table's rows. A record whose columns the database refuses keeps its
    /// new keys in `_sdc_overflow`; a record the database refuses goes to `_sdc_rejected`. The
    /// rest of the batch is committed either way.
    pub async fn write(&self, items: Vec<Item>) -> Result<LoadSummary, LoadError> {
        let catalog = &self.known;
        let mut items = dedup(items);
        let mut refreshed = false;
        if catalog.lock().await.0.is_empty() {
            let current = self.catalog().await?;
            *catalog.lock().await = current;
        }
        let mut isolated = false;
        let mut evolved = false;
        loop {
            let tables = match self.plan(&items, &mut evolved).await {
                Ok(tables) => tables,
                Err(LoadError::Database(error)) if !isolated => {
                    tracing::warn!(%error, "columns for the batch refused; adding them record by record");
                    items = self.isolate_ddl_failures(items, &mut evolved).await?;
                    isolated = true;
                    continue;
                }
                Err(other) => return Err(other),
            };
            let error = match self.insert_all(&tables, &items).await {
                Ok(()) => return Ok(LoadSummary::of(&tables, &[], evolved)),
                Err(error) => error,
            };
            match self.failure(&error) {
                Failure::Stale if !refreshed => {
                    tracing::warn!(%error, "the table changed under the loader; re-reading its columns");
                    *catalog.lock().await = self.catalog().await?;
                    refreshed = true;
                }
                Failure::Data | Failure::Stale => {
                    tracing::warn!(%error, "batch refused; loading its records one by one");
                    let refused = self.insert_each(&tables, &items).await?;
                    return Ok(LoadSummary::of(&tables, &refused, evolved));
                }
                Failure::Unavailable => return Err(LoadError::Unavailable(error.to_string())),
            }
        }
    }

    /// Adds the columns of each item alone; an item whose columns the database refuses adds
    /// none and keeps its new keys in `_sdc_overflow` instead, so that one event's keys never
    /// fail its batch.
    async fn isolate_ddl_failures(
        &self,
        mut items: Vec<Item>,
        evolved: &mut bool,
    ) -> Result<Vec<Item>, LoadError> {
        for item in &mut items {
            match self.plan(std::slice::from_ref(item), evolved).await {
                Ok(_) => {}
                Err(LoadError::Database(reason)) => {
                    tracing::warn!(table = %item.record.table, message_id = %item.record.message_id, %reason,
                        "columns refused; the record's new keys go to _sdc_overflow");
                    item.adds_columns = false;
                }
                Err(other) => return Err(other),
            }
        }
        Ok(items)
    }

    /// Plans the batch against the catalog, evolving the schema until every column exists.
    /// Sets `evolved` once it has taken a step of schema evolution ([`Warehouse::evolve`]: the
    /// DDL lock, and the columns added unless another writer had added them meanwhile), even if
    /// a later step fails.
    async fn plan<'a>(
        &self,
        items: &'a [Item],
        evolved: &mut bool,
    ) -> Result<Vec<TableRows<'a>>, LoadError> {
        let batched_at = Utc::now();
        // Each round adds columns; a concurrent writer can cause at most a few more rounds.
        for _ in 0..8 {
            let evolution = {
                let current = self.known.lock().await;
                match plan::plan_with_budgets(&current, items, batched_at, &self.budgets) {
                    Ok(tables) => return Ok(tables),
                    Err(evolution) => evolution,
                }
            };
            self.evolve(&evolution).await?;
            *evolved = true;
        }
        Err(LoadError::Database(
            "the schema kept changing while columns were being added; will retry".to_owned(),
        ))
    }

    /// Upserts every table's rows in one transaction, with their line in `_sdc_loads`: on
    /// PostgreSQL one statement (one round trip), on SQLite one transaction.
    async fn insert_all(
        &self,
        tables: &[TableRows<'_>],
        items: &[Item],
    ) -> Result<(), sqlx::Error> {
        let loads = TableLoad::of_rows(tables, items, &[]);
        if let Pool::Postgres(pool) = &self.pool {
            if tables.is_empty() {
                return Ok(());
            }
            // Both steps of the load run on the writer's kept connection, kept again if both
            // succeed (a failed one goes back to the pool, which tests it).
            let (mut conn, taken) = self.kept.take(pool).await?;
            postgres::load(&mut conn, &self.schema, tables, items, &loads, Utc::now()).await?;
            self.kept.keep(conn, taken);
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for rows in tables {
            tx.insert(&self.schema, rows).await?;
        }
        tx.record_loads(&self.schema, &loads, Utc::now()).await?;
        tx.commit().await
    }

    /// Loads record by record, each in a savepoint; the ones refused go to `_sdc_rejected`.
    async fn insert_each(
        &self,
        tables: &[TableRows<'_>],
        items: &[Item],
    ) -> Result<Vec<Rejected>, LoadError> {
        let mut tx = self.begin().await.map_err(|e| self.error(e))?;
        let mut rejected = Vec::new();
        for rows in tables {
            for (row, &item) in rows.rows.iter().zip(&rows.items) {
                let single = rows.with_rows(vec![row.clone()], vec![item]);
                tx.execute("SAVEPOINT sluice_record")
                    .await
                    .map_err(|e| self.error(e))?;
                match tx.insert(&self.schema, &single).await {
                    Ok(()) => tx.execute("RELEASE SAVEPOINT sluice_record").await,
                    Err(error) if self.failure(&error) != Failure::Unavailable => {
                        rejected.push(Rejected::of(&items[item], error.to_string()));
                        tx.execute("ROLLBACK TO SAVEPOINT sluice_record").await
                    }
                    Err(error) => Err(error),
                }
                .map_err(|e| self.error(e))?;
            }
        }
        let now = Utc::now();
        for record in &rejected {
            tracing::warn!(table = %record.table, message_id = %record.message_id, reason = %record.reason, "record rejected");
            tx.insert_rejected(&self.schema, record, now)
                .await
                .map_err(|e| self.error(e))?;
        }
        let loads = TableLoad::of_rows(tables, items, &rejected);
        tx.record_loads(&self.schema, &loads, now)
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(rejected)
    }
}

/// Whether `known` holds `table` as `_sdc_columns` described it in `fingerprints` (read under
/// the DDL lock): its fingerprint is known and the same.
fn is_current(
    known: &Catalog,
    table: Table,
    fingerprints: &HashMap<Table, ColumnsFingerprint>,
) -> bool {
    let fingerprint = known.table(table).fingerprint.as_ref();
    fingerprint.is_some() && fingerprint == fingerprints.get(&table)
}

/// Adds the columns an evolution committed to the cached catalog `known`, in place.
///
/// `planned` was planned against `reread` (the catalog read again under the DDL lock), or else
/// against `known` when each of its tables had the fingerprint `before` (read under the lock).
/// With `reread`, it becomes the cache, and every table gets its fingerprint from `after` (read
/// under the lock after the DDL). Without, `known` may have changed since it was planned
/// against (a reset empties it; a writer whose insert found a stale column reads it again,
/// without the lock and without fingerprints): a table gets the columns and `after`'s
/// fingerprint only if it still has `before`'s. Any other is left as it is, and the next
/// evolution of it reads the catalog again.
fn merge_evolution(
    known: &mut Catalog,
    planned: &[(Table, Vec<NewColumn>)],
    reread: Option<Catalog>,
    before: &HashMap<Table, ColumnsFingerprint>,
    after: &HashMap<Table, ColumnsFingerprint>,
) {
    let current: Vec<Table> = match reread {
        Some(reread) => {
            *known = reread;
            let mut tables: Vec<Table> = known.0.keys().copied().collect();
            tables.extend(planned.iter().map(|(table, _)| *table));
            tables.sort();
            tables.dedup();
            tables
        }
        None => planned
            .iter()
            .map(|(table, _)| *table)
            .filter(|table| is_current(known, *table, before))
            .collect(),
    };
    for table in current {
        let columns = known.0.entry(table).or_default();
        let new = planned.iter().filter(|(t, _)| *t == table);
        for c in new.flat_map(|(_, new)| new) {
            columns.insert(&c.record, c.sql_type);
        }
        columns.fingerprint = after.get(&table).cloned();
    }
}

/// An open transaction on either database.
enum Tx {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Tx {
    async fn execute(&mut self, sql: &str) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => sqlx::query(AssertSqlSafe(sql.to_owned()))
                .execute(&mut **tx)
                .await
                .map(drop),
            Tx::Sqlite(tx) => sqlx::query(AssertSqlSafe(sql.to_owned()))
                .execute(&mut **tx)
                .await
                .map(drop),
        }
    }

    async fn insert(&mut self, schema: &str, rows: &TableRows<'_>) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => postgres::insert(tx, schema, rows).await,
            Tx::Sqlite(tx) => sqlite::insert(tx, schema, rows).await,
        }
    }

    /// Records columns in `_sdc_columns` (those already there are left as they are).
    async fn insert_records(
        &mut self,
        schema: &str,
        records: &[ColumnRecord],
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        // Well inside both databases' limits on bound parameters (six per record).
        for chunk in records.chunks(1000) {
            let sql = schema::insert_columns_sql(self.dialect(), schema, chunk.len());
            // The same parameters on both databases; only the time's encoding differs.
            macro_rules! bind_chunk {
                ($at:expr) => {{
                    let mut query = sqlx::query(AssertSqlSafe(sql));
                    for r in chunk {
                        query = query
                            .bind(r.table.name())
                            .bind(r.column.as_str())
                            .bind(r.key_path.as_ref().map(KeyPath::to_json))
                            .bind(r.column_type.sql())
                            .bind(r.split_of.as_deref())
                            .bind($at);
                    }
                    query
                }};
            }
            match self {
                Tx::Postgres(tx) => {
                    bind_chunk!(at).execute(&mut **tx).await?;
                }
                Tx::Sqlite(tx) => {
                    let at = crate::normalize::format_timestamp(&at);
                    bind_chunk!(at.as_str()).execute(&mut **tx).await?;
                }
            }
        }
        Ok(())
    }

    /// The rows of `sql`, a query without parameters.
    async fn fetch_all<T>(&mut self, sql: String) -> Result<Vec<T>, sqlx::Error>
    where
        T: Send + Unpin + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        match self {
            Tx::Postgres(tx) => {
                sqlx::query_as(AssertSqlSafe(sql))
                    .fetch_all(&mut **tx)
                    .await
            }
            Tx::Sqlite(tx) => {
                sqlx::query_as(AssertSqlSafe(sql))
                    .fetch_all(&mut **tx)
                    .await
            }
        }
    }

    /// The [`ColumnsFingerprint`] of every table recorded in `_sdc_columns`.
    async fn columns_fingerprints(
        &mut self,
        schema: &str,
    ) -> Result<HashMap<Table, ColumnsFingerprint>, sqlx::Error> {
        let sql = schema::columns_fingerprints_sql(schema);
        let rows: Vec<(String, i64, Option<String>)> = self.fetch_all(sql).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(table, records, last_added_at)| {
                let fingerprint = ColumnsFingerprint {
                    records,
                    last_added_at,
                };
                Some((table.parse().ok()?, fingerprint))
            })
            .collect())
    }

    /// Adds `loads` to their tables' rows of `_sdc_loads` for the minute of `at`.
    async fn record_loads(
        &mut self,
        schema: &str,
        loads: &[TableLoad],
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        if loads.is_empty() {
            return Ok(());
        }
        let minute = minute_of(at);
        let sql = schema::upsert_loads_sql(self.dialect(), schema, &schema::Rows::new(loads.len()));
        match self {
            Tx::Postgres(tx) => {
                let query = sqlx::query(AssertSqlSafe(sql));
                bind_loads!(query, loads, minute, |t: DateTime<Utc>| t)
                    .execute(&mut **tx)
                    .await?;
            }
            Tx::Sqlite(tx) => {
                let query = sqlx::query(AssertSqlSafe(sql));
                bind_loads!(query, loads, minute, |t: DateTime<Utc>| {
                    crate::normalize::format_timestamp(&t)
                })
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }

    fn dialect(&self) -> Dialect {
        match self {
            Tx::Postgres(_) => Dialect::Postgres,
            Tx::Sqlite(_) => Dialect::Sqlite,
        }
    }

    async fn insert_rejected(
        &mut self,
        schema: &str,
        record: &Rejected,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => postgres::insert_rejected(tx, schema, record, at).await,
            Tx::Sqlite(tx) => sqlite::insert_rejected(tx, schema, record, at).await,
        }
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Postgres(tx) => tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
    }
}

/// The upsert's `ON CONFLICT` clause, shared by both databases: the newest version of an event
/// (highest `_sdc_sequence`) wins, whichever transaction commits last.
fn on_conflict_sql(rows: &TableRows<'_>) -> String {
    use crate::schema::quote_ident;
    let sets = rows
        .update_columns
        .iter()
        .map(|c| format!("{0} = excluded.{0}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let key = quote_ident("message_id");
    let sequence = quote_ident("_sdc_sequence");
    format!(
        " ON CONFLICT ({key}) DO UPDATE SET {sets} \
         WHERE t.{sequence} IS NULL OR t.{sequence} <= excluded.{sequence}"
    )
}

/// The default time a sender is asked to wait before retrying (`Retry-After`).
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::TableColumns;

    fn fingerprint(records: i64) -> ColumnsFingerprint {
        ColumnsFingerprint {
            records,
            last_added_at: Some(format!("2026-11-30 00:00:{records:02}+00")),
        }
    }

    fn fingerprints(records: i64) -> HashMap<Table, ColumnsFingerprint> {
        HashMap::from([(Table::Track, fingerprint(records))])
    }

    /// A cache whose `track` has its base columns, as of `fingerprint(records)`.
    fn cache(records: i64) -> Catalog {
        let mut track = TableColumns::new_table(Table::Track);
        track.fingerprint = Some(fingerprint(records));
        Catalog(HashMap::from([(Table::Track, track)]))
    }

    /// The column a `properties.plan` text adds to `catalog`'s `track`.
    fn planned(catalog: &Catalog) -> Vec<(Table, Vec<NewColumn>)> {
        let needs = [(KeyPath::new(["properties", "plan"]), ColumnType::Text)];
        let new = catalog
            .table(Table::Track)
            .plan_columns(Table::Track, &needs);
        vec![(Table::Track, new)]
    }

    #[test]
    fn an_unchanged_cache_gets_the_columns_and_the_new_fingerprint() {
        let mut known = cache(10);
        let planned = planned(&known);
        merge_evolution(
            &mut known,
            &planned,
            None,
            &fingerprints(10),
            &fingerprints(11),
        );
        let track = known.table(Table::Track);
        assert_eq!(track.get("properties__plan"), Some(Some(ColumnType::Text)));
        assert_eq!(track.fingerprint, Some(fingerprint(11)));
    }

    #[test]
    fn a_cache_emptied_or_read_again_meanwhile_is_left_for_the_next_evolution_to_read() {
        let planned = planned(&cache(10));
        // A reset emptied the cache between the plan and the merge.
        let mut emptied = Catalog::default();
        merge_evolution(
            &mut emptied,
            &planned,
            None,
            &fingerprints(10),
            &fingerprints(11),
        );
        assert_eq!(emptied, Catalog::default());
        // A writer read the catalog again meanwhile, without fingerprints.
        let mut read = cache(10);
        if let Some(track) = read.0.get_mut(&Table::Track) {
            track.fingerprint = None;
        }
        let as_read = read.clone();
        merge_evolution(
            &mut read,
            &planned,
            None,
            &fingerprints(10),
            &fingerprints(11),
        );
        assert_eq!(read, as_read);
        assert_eq!(read.table(Table::Track).get("properties__plan"), None);
    }

    #[test]
    fn a_catalog_read_again_under_the_lock_replaces_the_cache() {
        let mut known = cache(3);
        let mut reread = cache(10);
        reread
            .0
            .insert(Table::Page, TableColumns::new_table(Table::Page));
        let planned = planned(&reread);
        let after = HashMap::from([
            (Table::Track, fingerprint(11)),
            (Table::Page, fingerprint(20)),
        ]);
        merge_evolution(&mut known, &planned, Some(reread), &fingerprints(3), &after);
        let track = known.table(Table::Track);
        assert_eq!(track.get("properties__plan"), Some(Some(ColumnType::Text)));
        assert_eq!(track.fingerprint, Some(fingerprint(11)));
        assert_eq!(known.table(Table::Page).fingerprint, Some(fingerprint(20)));
    }
}

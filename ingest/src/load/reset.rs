//! Table-level reset: an event table emptied and started again at a new table version, while
//! loaders in any number of processes keep loading.
//!
//! The version is a property of the table itself: the `DEFAULT` of its `_sdc_table_version`
//! column ([`schema::TABLE_VERSION_COLUMN`]), which the loader never writes. A reset, in one
//! transaction under the schema's DDL lock (the one schema evolution takes):
//!
//! 1. locks the table (`ACCESS EXCLUSIVE` on PostgreSQL, which waits for the load transactions
//!    writing to it and holds off new ones; SQLite's write lock does the same for the file);
//! 2. renames it to `track__v<old version>` ([`schema::kept_table_name`]), its indexes with it, or
//!    drops it;
//! 3. creates an empty table of the same name with the base columns, its version the new one;
//! 4. moves what describes the old table along: its `_sdc_columns` records, `_sdc_loads` rows,
//!    `_sdc_rejected` rows and `_sdc_ownership` row follow it to its new name (a dropped table's
//!    column records and rejected records go with it; its loads stay as history);
//! 5. records the reset in `_sdc_table_versions`.
//!
//! A load that commits before the reset committed is in the old table at the old version; one
//! that waited for the lock finds the name `track` bound to the new table (PostgreSQL resolves a
//! name again after waiting for its lock) and its rows take the new table's default version. No
//! row can land in the new table with the old version, or in the old table after the switch.
//! The waiting loader's cached catalog still lists the old table's columns: its insert fails as
//! "undefined column" ([`super::Failure::Stale`]), it re-reads the catalog and adds the columns
//! again, in the same batch, before anything is acknowledged.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;

use super::ownership::OWNERSHIP;
use super::privilege::Need;
use super::{LoadError, Tx, Warehouse};
use crate::event::Table;
use crate::normalize::format_timestamp;
use crate::schema::{
    self, COLUMNS, COLUMNS_TABLE, ColumnRecord, LOADS, REJECTED, VERSIONS, VERSIONS_TABLE,
    create_table_sql, kept_table_name, qualified, quote_ident,
};

/// What a reset does with the rows of the version it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum OldRows {
    /// Keep them, in a table named after their version (`track__v0`): the default.
    #[default]
    Keep,
    /// Drop them (`DROP TABLE`, never `CASCADE`: a view on the table stops the reset).
    Drop,
}

/// One table a reset is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetRequest {
    /// The table.
    pub table: Table,
    /// The version to start: `None` for the next one (current + 1). A table already at this
    /// version or a later one is left as it is, so a request carried out once is not carried
    /// out again.
    pub version: Option<i64>,
}

/// What a reset of one table did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableReset {
    /// The table.
    pub table: Table,
    /// The version its rows had until the reset.
    pub previous_version: i64,
    /// The version of every row loaded since.
    pub version: i64,
    /// Where the previous version's rows are (`track__v0`); `None` when they were dropped, or
    /// when the table did not exist.
    pub kept_as: Option<String>,
    /// How many rows the previous version held (kept or dropped).
    pub previous_rows: i64,
    /// When the reset committed (UTC, the transaction's time as Sluice took it).
    pub reset_at: DateTime<Utc>,
}

/// Why a reset cannot be carried out as asked, before anything changed.
fn refused(reason: String) -> LoadError {
    LoadError::ResetRefused(reason)
}

impl Warehouse {
    /// Each event table's current version (`_sdc_table_versions`); a table never reset is at 0
    /// and not listed.
    pub async fn table_versions(&self) -> Result<BTreeMap<Table, i64>, LoadError> {
        let mut tx = self.begin().await.map_err(|e| self.error(e))?;
        let existing = tx.existing(&self.schema).await.map_err(|e| self.error(e))?;
        if !existing.relations.contains(VERSIONS_TABLE) {
            return Ok(BTreeMap::new());
        }
        tx.table_versions(&self.schema)
            .await
            .map_err(|e| self.error(e))
    }

    /// The latest reset of each event table ever reset, in table order, from
    /// `_sdc_table_versions` (empty when no table was ever reset).
    pub async fn latest_resets(&self) -> Result<Vec<TableReset>, LoadError> {
        let mut tx = self.begin().await.map_err(|e| self.error(e))?;
        let existing = tx.existing(&self.schema).await.map_err(|e| self.error(e))?;
        if !existing.relations.contains(VERSIONS_TABLE) {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = VERSIONS.columns.iter().map(|(name, _)| *name).collect();
        let sql = format!(
            "{} ORDER BY {}, {}",
            VERSIONS.select_sql(&self.schema, &names),
            quote_ident("table_name"),
            quote_ident("version")
        );
        type Row<T> = (String, i64, T, i64, Option<String>, i64);
        let rows: Vec<Row<DateTime<Utc>>> = match &mut tx {
            Tx::Postgres(tx) => sqlx::query_as(AssertSqlSafe(sql))
                .fetch_all(&mut **tx)
                .await
                .map_err(|e| self.error(e))?,
            Tx::Sqlite(tx) => {
                let rows: Vec<Row<String>> = sqlx::query_as(AssertSqlSafe(sql))
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(|e| self.error(e))?;
                rows.into_iter()
                    .filter_map(|(t, v, at, p, k, r)| {
                        let at = DateTime::parse_from_rfc3339(&at).ok()?.with_timezone(&Utc);
                        Some((t, v, at, p, k, r))
                    })
                    .collect()
            }
        };
        let mut latest: BTreeMap<Table, TableReset> = BTreeMap::new();
        for (table, version, reset_at, previous_version, kept_as, previous_rows) in rows {
            let Ok(table) = table.parse::<Table>() else {
                continue;
            };
            latest.insert(
                table,
                TableReset {
                    table,
                    previous_version,
                    version,
                    kept_as,
                    previous_rows,
                    reset_at,
                },
            );
        }
        Ok(latest.into_values().collect())
    }

    /// Resets the `requests`' tables in one transaction (see the [module](self)), doing
    /// `old_rows` with the rows of the versions it ends; returns what it did per table, in table
    /// order, leaving out a table already at its requested version. The schema must have been
    /// prepared (by the service or the operator). Errors, each with nothing changed: a table
    /// whose kept name is taken or the schema not prepared ([`LoadError::ResetRefused`]), a
    /// view on a table to drop ([`LoadError::DropBlocked`]), the database unavailable or a lock
    /// not granted within the statement timeout ([`LoadError::Unavailable`]; retry).
    pub async fn reset_tables(
        &self,
        requests: &[ResetRequest],
        old_rows: OldRows,
    ) -> Result<Vec<TableReset>, LoadError> {
        if requests.is_empty() {
            // The operator calls this at every reconcile: no DDL lock when nothing is asked.
            return Ok(Vec::new());
        }
        let mut tx = self.ddl_transaction().await?;
        let existing = tx.existing(&self.schema).await.map_err(|e| self.error(e))?;
        if !existing.schema || !existing.relations.contains(COLUMNS_TABLE) {
            return Err(refused(format!(
                "schema {} has not been prepared: start sluice-ingest (or let the operator \
                 reconcile) once before resetting a table",
                self.schema
            )));
        }
        if !existing.relations.contains(VERSIONS_TABLE) {
            // A schema prepared by an earlier release.
            tx.execute(&VERSIONS.create_sql(&self.schema))
                .await
                .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
            tx.record_created(&self.schema, VERSIONS_TABLE, &existing)
                .await
                .map_err(|e| self.error(e))?;
        }
        let current = tx
            .table_versions(&self.schema)
            .await
            .map_err(|e| self.error(e))?;
        let mut plan: BTreeMap<Table, (i64, i64)> = BTreeMap::new();
        for request in requests {
            let from = current.get(&request.table).copied().unwrap_or(0);
            let to = request.version.unwrap_or(from + 1);
            if to > from {
                plan.insert(request.table, (from, to));
            }
        }
        for (table, (from, _)) in &plan {
            let kept = kept_table_name(*table, *from);
            if old_rows == OldRows::Keep
                && existing.relations.contains(table.name())
                && existing.relations.contains(&kept)
            {
                return Err(refused(format!(
                    "cannot keep the rows of {}.{table} as {kept}: a relation of that name \
                     exists; rename or drop it, or reset with the old rows dropped (nothing \
                     was changed)",
                    self.schema
                )));
            }
        }
        let present: Vec<&str> = plan
            .keys()
            .map(|t| t.name())
            .filter(|name| existing.relations.contains(*name))
            .collect();
        if let Tx::Postgres(_) = tx
            && !present.is_empty()
        {
            // One statement for every table, in name order, so two resets cannot deadlock.
            let names: Vec<String> = present
                .iter()
                .map(|name| qualified(&self.schema, name))
                .collect();
            tx.execute(&format!(
                "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                names.join(", ")
            ))
            .await
            .map_err(|e| self.error(e))?;
        }
        // Microseconds, as both databases store it: what is printed is what is recorded.
        let reset_at = Utc::now().trunc_subsecs(6);
        let mut resets = Vec::new();
        for (table, (from, to)) in plan {
            let exists = present.contains(&table.name());
            let kept_as =
                (exists && old_rows == OldRows::Keep).then(|| kept_table_name(table, from));
            let previous_rows = if exists {
                tx.count_rows(&self.schema, table.name())
                    .await
                    .map_err(|e| self.error(e))?
            } else {
                0
            };
            if exists {
                self.end_version(&mut tx, table, from, kept_as.as_deref())
                    .await?;
            }
            tx.execute(&create_table_sql(&self.schema, table, to))
                .await
                .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
            tx.insert_records(&self.schema, &ColumnRecord::base(table), reset_at)
                .await
                .map_err(|e| self.error(e))?;
            tx.record_created(&self.schema, table.name(), &existing)
                .await
                .map_err(|e| self.error(e))?;
            let reset = TableReset {
                table,
                previous_version: from,
                version: to,
                kept_as,
                previous_rows,
                reset_at,
            };
            tx.record_reset(&self.schema, &reset)
                .await
                .map_err(|e| self.error(e))?;
            resets.push(reset);
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        // This process's loader re-reads the catalog before its next batch.
        *self.known.lock().await = schema::Catalog::default();
        for reset in &resets {
            tracing::info!(schema = %self.schema, table = %reset.table, version = reset.version,
                kept_as = reset.kept_as.as_deref().unwrap_or("(dropped)"), rows = reset.previous_rows,
                "table reset");
        }
        Ok(resets)
    }

    /// Renames (`kept_as`) or drops the table at version `from`, with what describes it.
    async fn end_version(
        &self,
        tx: &mut Tx,
        table: Table,
        from: i64,
        kept_as: Option<&str>,
    ) -> Result<(), LoadError> {
        let name = table.name();
        let dialect = self.dialect();
        let history = kept_table_name(table, from);
        match kept_as {
            Some(kept) => {
                let indexes = tx
                    .index_names(&self.schema, name)
                    .await
                    .map_err(|e| self.error(e))?;
                tx.execute(&schema::rename_sql("TABLE", &self.schema, name, kept))
                    .await
                    .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
                // PostgreSQL names a table's indexes (its primary key's, `track_pkey`) in the
                // schema's namespace of relations: they follow the table, so that the new
                // table's can be created. SQLite renames its own automatic indexes.
                for index in indexes {
                    let Some(rest) = index.strip_prefix(name) else {
                        continue;
                    };
                    let renamed = format!("{kept}{rest}");
                    if renamed.len() <= crate::naming::MAX_IDENTIFIER_BYTES {
                        tx.execute(&schema::rename_sql("INDEX", &self.schema, &index, &renamed))
                            .await
                            .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
                    }
                }
                for system in [&COLUMNS, &REJECTED] {
                    let sql = schema::rename_rows_sql(dialect, &self.schema, system, "table_name");
                    tx.bind_two(&sql, kept, name)
                        .await
                        .map_err(|e| self.error(e))?;
                }
                tx.rename_owned(&self.schema, name, kept)
                    .await
                    .map_err(|e| self.error(e))?;
            }
            None => {
                tx.drop_table(self, name).await?;
                for system in [&COLUMNS, &REJECTED] {
                    let sql = schema::delete_rows_sql(dialect, &self.schema, system);
                    tx.bind_two(&sql, name, "")
                        .await
                        .map_err(|e| self.error(e))?;
                }
            }
        }
        // The loading report of the version ended stays, under the version's name.
        let sql = schema::rename_rows_sql(dialect, &self.schema, &LOADS, "table_name");
        tx.bind_two(&sql, &history, name)
            .await
            .map_err(|e| self.error(e))
    }
}

impl Tx {
    /// Each event table's current version, from `_sdc_table_versions` (which must exist).
    pub(super) async fn table_versions(
        &mut self,
        schema: &str,
    ) -> Result<BTreeMap<Table, i64>, sqlx::Error> {
        let sql = schema::table_versions_sql(schema);
        let rows: Vec<(String, i64)> = self.fetch_all(sql).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(table, version)| Some((table.parse().ok()?, version)))
            .collect())
    }

    /// Runs `sql` with its text parameters: `first`, and `second` when `sql` has a second.
    async fn bind_two(&mut self, sql: &str, first: &str, second: &str) -> Result<(), sqlx::Error> {
        let two = sql.contains(&self.dialect().placeholder(2));
        match self {
            Tx::Postgres(tx) => {
                let query = sqlx::query(AssertSqlSafe(sql.to_owned())).bind(first);
                let query = if two { query.bind(second) } else { query };
                query.execute(&mut **tx).await.map(drop)
            }
            Tx::Sqlite(tx) => {
                let query = sqlx::query(AssertSqlSafe(sql.to_owned())).bind(first);
                let query = if two { query.bind(second) } else { query };
                query.execute(&mut **tx).await.map(drop)
            }
        }
    }

    /// How many rows `table` holds.
    async fn count_rows(&mut self, schema: &str, table: &str) -> Result<i64, sqlx::Error> {
        let sql = schema::count_rows_sql(schema, table);
        match self {
            Tx::Postgres(tx) => {
                sqlx::query_scalar(AssertSqlSafe(sql))
                    .fetch_one(&mut **tx)
                    .await
            }
            Tx::Sqlite(tx) => {
                sqlx::query_scalar(AssertSqlSafe(sql))
                    .fetch_one(&mut **tx)
                    .await
            }
        }
    }

    /// The names of `table`'s indexes (PostgreSQL; none on SQLite, which renames its own).
    async fn index_names(&mut self, schema: &str, table: &str) -> Result<Vec<String>, sqlx::Error> {
        match self {
            Tx::Postgres(tx) => {
                sqlx::query_scalar(
                    "SELECT i.relname::text FROM pg_index x \
                     JOIN pg_class i ON i.oid = x.indexrelid \
                     JOIN pg_class c ON c.oid = x.indrelid \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 ORDER BY 1",
                )
                .bind(schema)
                .bind(table)
                .fetch_all(&mut **tx)
                .await
            }
            Tx::Sqlite(_) => Ok(Vec::new()),
        }
    }

    /// Drops `table` (never `CASCADE`); an object of someone else's that depends on it stops
    /// the reset with [`LoadError::DropBlocked`].
    async fn drop_table(&mut self, warehouse: &Warehouse, table: &str) -> Result<(), LoadError> {
        let sql = super::ownership::drop_table_sql(&warehouse.schema, table);
        match self {
            Tx::Postgres(tx) => warehouse.drop_or_explain(tx, &sql, table).await,
            Tx::Sqlite(_) => self
                .execute(&sql)
                .await
                .map_err(|e| warehouse.ddl_error(e, Need::CreateInSchema)),
        }
    }

    /// Where the schema is owned (`_sdc_ownership`, PostgreSQL), the table `from` that Sluice
    /// created is recorded under its new name `to`.
    async fn rename_owned(
        &mut self,
        schema: &str,
        from: &str,
        to: &str,
    ) -> Result<(), sqlx::Error> {
        if !self.owned(schema).await? {
            return Ok(());
        }
        let column = quote_ident("object_name");
        let sql = format!(
            "UPDATE {} SET {column} = $1 WHERE {} = 'table' AND {column} = $2",
            qualified(schema, OWNERSHIP.name),
            quote_ident("object_type")
        );
        self.bind_two(&sql, to, from).await
    }

    /// Where the schema is owned (`_sdc_ownership`, PostgreSQL), records `table` as created by
    /// Sluice for the schema's owner (a record already there is kept).
    async fn record_created(
        &mut self,
        schema: &str,
        table: &str,
        existing: &super::objects::Existing,
    ) -> Result<(), sqlx::Error> {
        if !existing.relations.contains(OWNERSHIP.name) {
            return Ok(());
        }
        let (own, kind) = (
            qualified(schema, OWNERSHIP.name),
            quote_ident("object_type"),
        );
        let sql = format!(
            "INSERT INTO {own} ({kind}, {}, {}, {uid}, {name}) \
             SELECT 'table', $1, true, {uid}, {name} FROM {own} WHERE {kind} = 'schema' \
             ON CONFLICT DO NOTHING",
            quote_ident("object_name"),
            quote_ident("created"),
            uid = quote_ident("owner_uid"),
            name = quote_ident("owner_name"),
        );
        self.bind_two(&sql, table, "").await
    }

    /// Whether the schema records ownership (PostgreSQL only).
    async fn owned(&mut self, schema: &str) -> Result<bool, sqlx::Error> {
        match self {
            Tx::Postgres(tx) => {
                sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n \
                     ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2)",
                )
                .bind(schema)
                .bind(OWNERSHIP.name)
                .fetch_one(&mut **tx)
                .await
            }
            Tx::Sqlite(_) => Ok(false),
        }
    }

    /// Records a reset in `_sdc_table_versions`.
    async fn record_reset(&mut self, schema: &str, reset: &TableReset) -> Result<(), sqlx::Error> {
        let sql = VERSIONS.insert_sql(self.dialect(), schema, VERSIONS.columns.len(), 1);
        macro_rules! bind_reset {
            ($at:expr) => {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(reset.table.name())
                    .bind(reset.version)
                    .bind($at)
                    .bind(reset.previous_version)
                    .bind(reset.kept_as.as_deref())
                    .bind(reset.previous_rows)
            };
        }
        match self {
            Tx::Postgres(tx) => bind_reset!(reset.reset_at)
                .execute(&mut **tx)
                .await
                .map(drop),
            Tx::Sqlite(tx) => {
                let at = format_timestamp(&reset.reset_at);
                bind_reset!(at.as_str()).execute(&mut **tx).await.map(drop)
            }
        }
    }
}

impl Warehouse {
    /// Gives each of `tables` (event tables that existed) whose `_sdc_table_version` has no
    /// default the default of its current version: tables created before versions were a
    /// property of the table had none. PostgreSQL only (SQLite cannot change a column's
    /// default; see the README). A role that may not alter a table it did not create keeps
    /// it as it is, with a warning: rows then get NULL there until its first reset.
    pub(super) async fn default_missing_versions(
        &self,
        tx: &mut Tx,
        tables: &[Table],
        versions: &BTreeMap<Table, i64>,
    ) -> Result<(), LoadError> {
        let Tx::Postgres(pg) = tx else {
            return Ok(());
        };
        let names: Vec<&str> = tables.iter().map(|t| t.name()).collect();
        let lacking: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_attribute a \
             JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = ANY($2) AND a.attname = $3 \
             AND NOT a.attisdropped AND NOT a.atthasdef",
        )
        .bind(&self.schema)
        .bind(&names)
        .bind(schema::TABLE_VERSION_COLUMN)
        .fetch_all(&mut **pg)
        .await
        .map_err(|e| self.error(e))?;
        for name in lacking {
            let Ok(table) = name.parse::<Table>() else {
                continue;
            };
            let version = versions.get(&table).copied().unwrap_or(0);
            let sql = format!(
                "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {version}",
                qualified(&self.schema, &name),
                quote_ident(schema::TABLE_VERSION_COLUMN)
            );
            tx.execute("SAVEPOINT sluice_version_default")
                .await
                .map_err(|e| self.error(e))?;
            let outcome = tx.execute(&sql).await;
            let end = match outcome {
                Ok(()) => "RELEASE SAVEPOINT sluice_version_default",
                Err(error) => {
                    tracing::warn!(schema = %self.schema, table = %name, %error,
                        "cannot give _sdc_table_version its default; rows get NULL there until the table is reset");
                    "ROLLBACK TO SAVEPOINT sluice_version_default"
                }
            };
            tx.execute(end).await.map_err(|e| self.error(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_rows_are_kept_unless_asked_otherwise() {
        assert_eq!(OldRows::default(), OldRows::Keep);
    }

    #[test]
    fn a_reset_serializes_for_people_and_programs() {
        let reset = TableReset {
            table: Table::Track,
            previous_version: 0,
            version: 1,
            kept_as: Some("track__v0".to_owned()),
            previous_rows: 3,
            reset_at: DateTime::from_timestamp(0, 0).expect("epoch"),
        };
        assert_eq!(
            serde_json::to_value(&reset).expect("json"),
            serde_json::json!({
                "table": "track", "previousVersion": 0, "version": 1,
                "keptAs": "track__v0", "previousRows": 3, "resetAt": "1970-01-01T00:00:00Z"
            })
        );
    }
}

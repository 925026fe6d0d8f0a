//! What exists in a schema before Sluice creates anything, and creating only what is missing.
//!
//! Looking first matters for least privilege: PostgreSQL checks `CREATE` on the database for
//! `CREATE SCHEMA IF NOT EXISTS` (and `CREATE` on the schema for `CREATE TABLE IF NOT EXISTS`)
//! before it looks whether the object exists. A schema a DBA created beforehand is therefore
//! used as it is, with no statement that needs more than it was granted. What this step created
//! is reported, so that ownership can be recorded ([`super::ownership`]).

use std::collections::HashSet;

use super::privilege::Need;
use super::{LoadError, Tx, Warehouse};
use crate::event::Table;
use chrono::Utc;

use crate::schema::{
    COLUMNS_TABLE, ColumnRecord, DELETIONS, DELETIONS_TABLE, LOADS, LOADS_TABLE, REFUSALS,
    REFUSALS_TABLE, REJECTED_TABLE, VERSIONS, VERSIONS_TABLE, create_columns_sql,
    create_rejected_sql, create_schema_sql, create_table_sql, qualified,
};

/// The schema and the relations in it, as they were before a step changed anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Existing {
    /// Whether the schema exists (always on SQLite, where attaching creates it).
    pub(super) schema: bool,
    /// The names of the relations (tables, views, ...) in the schema.
    pub(super) relations: HashSet<String>,
}

/// What [`Warehouse::create_missing`] created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Created {
    /// Whether it created the schema.
    pub(super) schema: bool,
    /// The tables it created.
    pub(super) tables: Vec<String>,
}

impl Tx {
    /// The schema and its relations as they are now.
    pub(super) async fn existing(&mut self, schema: &str) -> Result<Existing, sqlx::Error> {
        match self {
            Tx::Postgres(tx) => {
                let exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                )
                .bind(schema)
                .fetch_one(&mut **tx)
                .await?;
                let relations: Vec<String> = sqlx::query_scalar(
                    "SELECT c.relname::text FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
                )
                .bind(schema)
                .fetch_all(&mut **tx)
                .await?;
                Ok(Existing {
                    schema: exists,
                    relations: relations.into_iter().collect(),
                })
            }
            Tx::Sqlite(tx) => {
                let sql = format!(
                    "SELECT name FROM {} WHERE type IN ('table', 'view')",
                    qualified(schema, "sqlite_master")
                );
                let relations: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&mut **tx)
                    .await?;
                Ok(Existing {
                    schema: true,
                    relations: relations.into_iter().collect(),
                })
            }
        }
    }
}

impl Warehouse {
    /// Creates, inside a transaction holding the schema's DDL lock, the schema, the event
    /// tables in `tables` (at their current version), `_sdc_rejected`, `_sdc_columns`,
    /// `_sdc_loads`, `_sdc_refusals`, `_sdc_deletions` and `_sdc_table_versions` where they do
    /// not exist yet, records the tables' base columns in `_sdc_columns`, gives an event table
    /// created by an earlier release the table version default it lacks (PostgreSQL), and says
    /// what it created. Nothing that exists is created again, or needs a privilege to create.
    pub(super) async fn create_missing(
        &self,
        tx: &mut Tx,
        tables: &[Table],
    ) -> Result<Created, LoadError> {
        let existing = tx.existing(&self.schema).await.map_err(|e| self.error(e))?;
        let mut created = Created::default();
        if !existing.schema
            && let Some(sql) = create_schema_sql(self.dialect(), &self.schema)
        {
            tx.execute(&sql)
                .await
                .map_err(|e| self.ddl_error(e, Need::CreateSchema))?;
            created.schema = true;
        }
        let versions = if existing.relations.contains(VERSIONS_TABLE) {
            tx.table_versions(&self.schema)
                .await
                .map_err(|e| self.error(e))?
        } else {
            Default::default()
        };
        let version = |t: &Table| versions.get(t).copied().unwrap_or(0);
        let statements = tables
            .iter()
            .map(|t| (t.name(), create_table_sql(&self.schema, *t, version(t))))
            .chain([
                (REJECTED_TABLE, create_rejected_sql(&self.schema)),
                (COLUMNS_TABLE, create_columns_sql(&self.schema)),
                (LOADS_TABLE, LOADS.create_sql(&self.schema)),
                (REFUSALS_TABLE, REFUSALS.create_sql(&self.schema)),
                (DELETIONS_TABLE, DELETIONS.create_sql(&self.schema)),
                (VERSIONS_TABLE, VERSIONS.create_sql(&self.schema)),
            ]);
        for (name, sql) in statements {
            if existing.relations.contains(name) {
                continue;
            }
            tx.execute(&sql)
                .await
                .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
            created.tables.push(name.to_owned());
        }
        let records: Vec<ColumnRecord> =
            tables.iter().flat_map(|t| ColumnRecord::base(*t)).collect();
        tx.insert_records(&self.schema, &records, Utc::now())
            .await
            .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
        let found: Vec<Table> = tables
            .iter()
            .copied()
            .filter(|t| existing.relations.contains(t.name()))
            .collect();
        self.default_missing_versions(tx, &found, &versions).await?;
        Ok(created)
    }
}

//! Which schema objects Sluice created, and for whom: the `_sdc_ownership` table in the schema.
//!
//! The operator's `deletionPolicy: Drop` must destroy only what Sluice created, and one schema
//! must not be shared by two integrations (deleting one would drop the other's rows). So when an
//! owner (a `SegmentIntegration`, by UID) prepares a schema, [`Warehouse::ensure_owned_schema`]
//! records, in one transaction under the schema's DDL lock:
//!
//! - a claim on the schema (`object_type = 'schema'`), with whether Sluice created the schema or
//!   found it (an adopted schema, such as `public` or one holding a team's dbt models, is never
//!   dropped as a whole);
//! - each table it created (`object_type = 'table'`); tables that existed before are used but
//!   never recorded, so never dropped.
//!
//! A schema claimed by another owner is refused ([`LoadError::SchemaClaimed`]).
//! [`Warehouse::drop_owned`] drops the recorded tables (never `CASCADE`: a view of the user's on
//! them stops the drop instead of vanishing), then the schema only if Sluice created it and
//! nothing else is left in it. PostgreSQL only: a SQLite file belongs to its one process.

use sqlx::{Postgres, Transaction};

use super::privilege::Need;
use super::{LoadError, Tx, Warehouse};
use crate::event::Table;
use crate::schema::{Dialect, SystemTable, qualified, quote_ident};

/// The table, in each owned schema, that records what Sluice created there and for whom.
pub const OWNERSHIP_TABLE: &str = "_sdc_ownership";

/// PostgreSQL's SQLSTATE for "cannot drop ... because other objects depend on it".
const DEPENDENT_OBJECTS_STILL_EXIST: &str = "2BP01";

/// Who Sluice creates schema objects for: in the operator, the `SegmentIntegration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// A stable unique identity: the resource's UID.
    pub uid: String,
    /// A name for people, e.g. `SegmentIntegration analytics/shop`.
    pub name: String,
}

/// The claim an owner holds on a schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Whether Sluice created the schema (else it was adopted, and is never dropped whole).
    pub created_schema: bool,
    /// The tables Sluice created for this owner, sorted.
    pub tables: Vec<String>,
}

/// What [`Warehouse::drop_owned`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The tables it dropped, sorted.
    pub tables: Vec<String>,
    /// Whether it dropped the schema.
    pub schema: bool,
    /// Why the schema was kept, when it was.
    pub kept: Option<String>,
}

/// `_sdc_ownership`: what Sluice created in the schema, for whom.
pub const OWNERSHIP: SystemTable = SystemTable {
    name: OWNERSHIP_TABLE,
    columns: &[
        ("object_type", "text NOT NULL"),
        ("object_name", "text NOT NULL"),
        ("created", "boolean NOT NULL"),
        ("owner_uid", "text NOT NULL"),
        ("owner_name", "text NOT NULL"),
        ("recorded_at", "timestamptz NOT NULL DEFAULT now()"),
    ],
    primary_key: &["object_type", "object_name"],
};

/// `CREATE TABLE IF NOT EXISTS` for the ownership table.
pub fn create_ownership_sql(schema: &str) -> String {
    OWNERSHIP.create_sql(schema)
}

/// `INSERT` of one ownership row that keeps an existing one (a claim keeps whether the schema
/// was created, whoever runs again); parameters: type, name, created, owner UID, owner name.
pub fn record_sql(schema: &str) -> String {
    let insert = OWNERSHIP.insert_sql(Dialect::Postgres, schema, 5, 1);
    format!("{insert} ON CONFLICT DO NOTHING")
}

/// `DROP TABLE` without `CASCADE`: objects of others that depend on it stop the drop.
pub fn drop_table_sql(schema: &str, table: &str) -> String {
    format!("DROP TABLE IF EXISTS {}", qualified(schema, table))
}

/// `DROP SCHEMA` without `CASCADE`: it fails while anything is left in the schema.
pub fn drop_empty_schema_sql(schema: &str) -> String {
    format!("DROP SCHEMA {}", quote_ident(schema))
}

/// The PostgreSQL transaction in `tx`; ownership is recorded on PostgreSQL only.
fn postgres(tx: &mut Tx) -> Result<&mut Transaction<'static, Postgres>, LoadError> {
    match tx {
        Tx::Postgres(tx) => Ok(tx),
        Tx::Sqlite(_) => Err(LoadError::Database(
            "ownership of schema objects is recorded on PostgreSQL only; a SQLite file belongs \
             to the one process that writes it"
                .to_owned(),
        )),
    }
}

/// The claim recorded on the schema: owner UID, owner name, whether Sluice created the schema.
async fn recorded_claim(
    tx: &mut Transaction<'static, Postgres>,
    schema: &str,
) -> Result<Option<(String, String, bool)>, sqlx::Error> {
    let sql = format!(
        "{} WHERE {} = 'schema'",
        OWNERSHIP.select_sql(schema, &["owner_uid", "owner_name", "created"]),
        quote_ident("object_type")
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_optional(&mut **tx)
        .await
}

/// The tables recorded as created for `uid`, sorted.
async fn recorded_tables(
    tx: &mut Transaction<'static, Postgres>,
    schema: &str,
    uid: &str,
) -> Result<Vec<String>, sqlx::Error> {
    let sql = format!(
        "{} WHERE {} = 'table' AND {} = $1 ORDER BY 1",
        OWNERSHIP.select_sql(schema, &["object_name"]),
        quote_ident("object_type"),
        quote_ident("owner_uid")
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(uid)
        .fetch_all(&mut **tx)
        .await
}

impl Warehouse {
    /// [`Warehouse::ensure_schema`] on behalf of `owner`, recording what it creates in
    /// `_sdc_ownership`. Refuses, changing nothing, a schema that another owner claimed. On
    /// SQLite it is `ensure_schema` and records nothing.
    pub async fn ensure_owned_schema(
        &self,
        tables: &[Table],
        owner: &Owner,
    ) -> Result<Claim, LoadError> {
        let mut tx = self.ddl_transaction().await?;
        if matches!(tx, Tx::Sqlite(_)) {
            self.create_missing(&mut tx, tables).await?;
            tx.commit().await.map_err(|e| self.error(e))?;
            return Ok(Claim {
                created_schema: false,
                tables: Vec::new(),
            });
        }
        let existing = tx.existing(&self.schema).await.map_err(|e| self.error(e))?;
        let had_ownership = existing.relations.contains(OWNERSHIP_TABLE);
        if had_ownership {
            let claim = recorded_claim(postgres(&mut tx)?, &self.schema)
                .await
                .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
            if let Some((uid, name, _)) = claim
                && uid != owner.uid
            {
                return Err(LoadError::SchemaClaimed {
                    schema: self.schema.clone(),
                    owner: name,
                    uid,
                });
            }
        }
        let mut created = self.create_missing(&mut tx, tables).await?;
        let pg = postgres(&mut tx)?;
        if !had_ownership {
            sqlx::query(sqlx::AssertSqlSafe(create_ownership_sql(&self.schema)))
                .execute(&mut **pg)
                .await
                .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
            created.tables.push(OWNERSHIP_TABLE.to_owned());
        }
        let record = record_sql(&self.schema);
        let rows = std::iter::once(("schema", self.schema.as_str(), created.schema)).chain(
            created
                .tables
                .iter()
                .map(|table| ("table", table.as_str(), true)),
        );
        for (object_type, name, was_created) in rows {
            sqlx::query(sqlx::AssertSqlSafe(record.clone()))
                .bind(object_type)
                .bind(name)
                .bind(was_created)
                .bind(&owner.uid)
                .bind(&owner.name)
                .execute(&mut **pg)
                .await
                .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
        }
        let claim = recorded_claim(pg, &self.schema)
            .await
            .map_err(|e| self.error(e))?;
        let tables = recorded_tables(pg, &self.schema, &owner.uid)
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(Claim {
            created_schema: claim.is_some_and(|(_, _, created)| created),
            tables,
        })
    }

    /// Drops what Sluice created for `owner` in the schema: the tables recorded for it, the
    /// ownership table, and the schema if Sluice created it and nothing else is left in it.
    /// Tables it did not create, and objects of others, stay. All or nothing: an object of
    /// someone else's that depends on a table (a view, say) fails the whole drop.
    pub async fn drop_owned(&self, owner: &Owner) -> Result<Dropped, LoadError> {
        let mut tx = self.ddl_transaction().await?;
        let existing = tx.existing(&self.schema).await.map_err(|e| self.error(e))?;
        let pg = postgres(&mut tx)?;
        if !existing.relations.contains(OWNERSHIP_TABLE) {
            let kept = if existing.schema {
                format!(
                    "schema {} holds no record ({OWNERSHIP_TABLE}) of anything Sluice created",
                    self.schema
                )
            } else {
                format!("schema {} does not exist", self.schema)
            };
            return Ok(Dropped {
                kept: Some(kept),
                ..Dropped::default()
            });
        }
        let claim = recorded_claim(pg, &self.schema)
            .await
            .map_err(|e| self.ddl_error(e, Need::CreateInSchema))?;
        let created_schema = match claim {
            Some((uid, _, created)) if uid == owner.uid => created,
            Some((_, name, _)) => {
                return Ok(Dropped {
                    kept: Some(format!(
                        "schema {} belongs to {name}; nothing in it was created for {}",
                        self.schema, owner.name
                    )),
                    ..Dropped::default()
                });
            }
            None => false,
        };
        let mut dropped = Dropped::default();
        let tables = recorded_tables(pg, &self.schema, &owner.uid)
            .await
            .map_err(|e| self.error(e))?;
        for table in tables.iter().filter(|t| *t != OWNERSHIP_TABLE) {
            self.drop_or_explain(pg, &drop_table_sql(&self.schema, table), table)
                .await?;
            dropped.tables.push(table.clone());
        }
        self.drop_or_explain(
            pg,
            &drop_table_sql(&self.schema, OWNERSHIP_TABLE),
            OWNERSHIP_TABLE,
        )
        .await?;
        dropped.tables.push(OWNERSHIP_TABLE.to_owned());
        dropped.tables.sort();
        if created_schema {
            sqlx::query("SAVEPOINT sluice_drop_schema")
                .execute(&mut **pg)
                .await
                .map_err(|e| self.error(e))?;
            match sqlx::query(sqlx::AssertSqlSafe(drop_empty_schema_sql(&self.schema)))
                .execute(&mut **pg)
                .await
            {
                Ok(_) => dropped.schema = true,
                Err(sqlx::Error::Database(db))
                    if db.code().as_deref() == Some(DEPENDENT_OBJECTS_STILL_EXIST) =>
                {
                    sqlx::query("ROLLBACK TO SAVEPOINT sluice_drop_schema")
                        .execute(&mut **pg)
                        .await
                        .map_err(|e| self.error(e))?;
                    dropped.kept = Some(format!(
                        "schema {} still holds objects Sluice did not create",
                        self.schema
                    ));
                }
                Err(error) => return Err(self.error(error)),
            }
        } else {
            dropped.kept = Some(format!(
                "schema {} existed before Sluice used it",
                self.schema
            ));
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(dropped)
    }

    /// Runs a `DROP TABLE`, turning "other objects depend on it" into a sentence that says what
    /// to do.
    pub(super) async fn drop_or_explain(
        &self,
        pg: &mut Transaction<'static, Postgres>,
        sql: &str,
        table: &str,
    ) -> Result<(), LoadError> {
        match sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut **pg)
            .await
        {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(db))
                if db.code().as_deref() == Some(DEPENDENT_OBJECTS_STILL_EXIST) =>
            {
                let detail = db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .and_then(|pg| pg.detail())
                    .map(|detail| format!(": {detail}"))
                    .unwrap_or_default();
                Err(LoadError::DropBlocked {
                    schema: self.schema.clone(),
                    table: table.to_owned(),
                    detail: format!("{}{detail}", db.message()),
                })
            }
            Err(error) => Err(self.error(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_never_cascade_and_quote_names() {
        assert_eq!(
            drop_table_sql("s", "group"),
            "DROP TABLE IF EXISTS \"s\".\"group\""
        );
        assert_eq!(drop_empty_schema_sql("a\"b"), "DROP SCHEMA \"a\"\"b\"");
        for sql in [
            drop_table_sql("s", "t"),
            drop_empty_schema_sql("s"),
            create_ownership_sql("s"),
        ] {
            assert!(!sql.to_uppercase().contains("CASCADE"), "{sql}");
        }
    }

    #[test]
    fn a_claim_is_recorded_once() {
        let sql = record_sql("s");
        assert!(
            sql.starts_with("INSERT INTO \"s\".\"_sdc_ownership\""),
            "{sql}"
        );
        assert!(sql.ends_with("ON CONFLICT DO NOTHING"), "{sql}");
    }
}

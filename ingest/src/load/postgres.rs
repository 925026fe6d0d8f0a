//! The PostgreSQL writer: one `INSERT ... SELECT FROM UNNEST(...)` per table and batch, with one
//! array parameter per column, so a batch costs one round trip whatever its size.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha1::{Digest, Sha1};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use super::plan::TableRows;
use super::{Failure, LoadError, Rejected, on_conflict_sql};
use crate::normalize::{ColumnType, SqlValue};
use crate::schema::{Dialect, insert_rejected_sql, qualified, quote_ident};

/// A lazily connecting pool: the process starts, and `/readyz` reports, while the database is
/// down.
pub(super) fn pool(url: &str, connections: u32) -> Result<PgPool, LoadError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| LoadError::BadUrl(format!("{url}: {e}")))?
        .application_name("sluice-ingest");
    Ok(PgPoolOptions::new()
        .max_connections(connections.max(1))
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// Maps a SQLSTATE to how the loader reacts.
pub(super) fn classify(code: &str) -> Failure {
    match code {
        // undefined column / table, datatype mismatch: someone changed the table.
        "42703" | "42P01" | "42804" => Failure::Stale,
        // data exceptions, integrity violations, a row or value too large.
        _ if code.starts_with("22") || code.starts_with("23") || code.starts_with("54") => {
            Failure::Data
        }
        _ => Failure::Unavailable,
    }
}

/// `(table, column, type)` for every column of every table in `schema`.
pub(super) async fn columns<'e>(
    executor: impl sqlx::Executor<'e, Database = Postgres>,
    schema: &str,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod) \
         FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(schema)
    .fetch_all(executor)
    .await
}

/// Begins a transaction that holds the schema's DDL advisory lock until it ends, so that two
/// processes never create or alter the same objects at once (PostgreSQL's `IF NOT EXISTS`
/// checks are not safe against concurrent creation).
pub(super) async fn ddl_transaction(
    pool: &PgPool,
    schema: &str,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key(schema))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

fn lock_key(schema: &str) -> i64 {
    let digest = Sha1::digest(format!("sluice-ddl:{schema}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Upserts one table's rows.
pub(super) async fn insert(
    tx: &mut Transaction<'static, Postgres>,
    schema: &str,
    rows: &TableRows<'_>,
) -> Result<(), sqlx::Error> {
    let names = rows
        .columns
        .iter()
        .map(|(name, _)| quote_ident(name))
        .collect::<Vec<_>>()
        .join(", ");
    let arrays = rows
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| match ty {
            ColumnType::Json => format!("${}::text[]::jsonb[]", i + 1),
            other => format!("${}::{}[]", i + 1, other.sql()),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "INSERT INTO {} AS t ({names}) SELECT * FROM UNNEST({arrays}){}",
        qualified(schema, rows.table.name()),
        on_conflict_sql(rows)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (i, (_, ty)) in rows.columns.iter().enumerate() {
        let cells = rows.rows.iter().map(|row| row[i].as_deref());
        query = match ty {
            ColumnType::Text | ColumnType::Json => query.bind(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Text(s) | SqlValue::Json(s)) => Some(s.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::BigInt => query.bind(
                cells
                    .map(|v| match v {
                        Some(SqlValue::BigInt(n)) => Some(*n),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::Double => query.bind(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Double(n)) => Some(*n),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::Boolean => query.bind(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Boolean(b)) => Some(*b),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::Timestamp => query.bind(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Timestamp(t)) => Some(*t),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
        };
    }
    query.execute(&mut **tx).await.map(drop)
}

/// Inserts one row into `_sdc_rejected`.
pub(super) async fn insert_rejected(
    tx: &mut Transaction<'static, Postgres>,
    schema: &str,
    record: &Rejected,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let sql = insert_rejected_sql(Dialect::Postgres, schema);
    sqlx::query(AssertSqlSafe(sql))
        .bind(at)
        .bind(record.table.name())
        .bind(strip_nul(&record.message_id))
        .bind(strip_nul(&record.reason))
        .bind(strip_nul(&record.record))
        .execute(&mut **tx)
        .await
        .map(drop)
}

/// PostgreSQL text cannot hold U+0000; the rejected copy shows it as `\u0000` instead.
fn strip_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\\u0000").into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_reactions() {
        assert_eq!(classify("22021"), Failure::Data);
        assert_eq!(classify("23502"), Failure::Data);
        assert_eq!(classify("54000"), Failure::Data);
        assert_eq!(classify("42703"), Failure::Stale);
        assert_eq!(classify("08006"), Failure::Unavailable);
        assert_eq!(classify("40P01"), Failure::Unavailable);
    }

    #[test]
    fn lock_key_is_per_schema() {
        assert_eq!(lock_key("a"), lock_key("a"));
        assert_ne!(lock_key("a"), lock_key("b"));
    }
}

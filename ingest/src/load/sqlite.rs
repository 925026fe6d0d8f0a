//! The SQLite writer, Sluice's embedded default.
//!
//! The schema is a database file attached under the schema's name to every connection, so the
//! SQL (`"segment"."track"`) and the table and column names are the same as on PostgreSQL.
//! Each connection's main database is a private in-memory one that holds nothing.

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{
    AssertSqlSafe, Connection, Executor, Sqlite, SqliteConnection, SqlitePool, Transaction,
};

use super::plan::TableRows;
use super::{Failure, LoadError, Rejected, Timeouts, on_conflict_sql};
use crate::json;
use crate::normalize::{SqlValue, format_timestamp};
use crate::schema::{
    Catalog, Dialect, insert_rejected_sql, qualified, quote_ident, select_columns_sql,
};

/// SQLite's default cap on bound parameters per statement (`SQLITE_MAX_VARIABLE_NUMBER`).
const MAX_PARAMETERS: usize = 32_766;

/// The most rows one `INSERT` names. Each connection caches a prepared statement per row
/// count, and one of hundreds of rows of a wide table holds megabytes; past a few dozen rows
/// the cost per statement is already spread thin. (Measured with the ingest benchmark: batches
/// of 100 load as fast as with statements of 512 rows, and peak RSS fell from 72 to 49 MiB.)
const MAX_ROWS_PER_STATEMENT: usize = 64;

/// The file path in a `sqlite://path` or `sqlite:path` URL.
pub(super) fn path_of(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// A pool whose connections attach the schema file and make it durable: write-ahead log,
/// `synchronous = FULL` (a commit survives power loss, as an acknowledgement promises).
/// A statement waits up to the statement timeout for another process's lock.
pub(super) fn pool(
    path: &str,
    schema: &str,
    connections: u32,
    timeouts: Timeouts,
) -> Result<SqlitePool, LoadError> {
    let path = path.to_owned();
    let schema = quote_ident(schema);
    let options = SqliteConnectOptions::new()
        .filename(":memory:")
        .create_if_missing(true)
        .busy_timeout(timeouts.statement);
    Ok(SqlitePoolOptions::new()
        .max_connections(connections.max(1))
        .acquire_timeout(timeouts.acquire)
        // A transaction that SQLite rolled back by itself (a full disk, an I/O error) leaves
        // the connection's transaction count behind; reused, it would refuse every BEGIN. Such
        // a connection is closed instead of going back to the pool. The ping runs after any
        // rollback still queued on the connection, so the count is current.
        .after_release(|conn, _| {
            Box::pin(async move {
                conn.ping().await?;
                Ok(!conn.is_in_transaction())
            })
        })
        .after_connect(move |conn, _| {
            let path = path.clone();
            let schema = schema.clone();
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!("ATTACH DATABASE ?1 AS {schema}")))
                    .bind(path)
                    .execute(&mut *conn)
                    .await?;
                conn.execute(AssertSqlSafe(format!(
                    "PRAGMA {schema}.journal_mode = WAL; PRAGMA {schema}.synchronous = FULL"
                )))
                .await?;
                Ok(())
            })
        })
        .connect_lazy_with(options))
}

/// Maps an SQLite result code to how the loader reacts, by its primary code (the low byte of
/// an extended code; "Result and Error Codes" in SQLite's documentation).
pub(super) fn classify(code: &str) -> Failure {
    let primary = code.parse::<i32>().unwrap_or(0) & 0xff;
    match primary {
        // SQLITE_ERROR: "no such column", "no such table" and the like; if re-reading the
        // catalog does not help, the loader treats it as the record's (a name, too many
        // columns).
        1 => Failure::Stale,
        // TOOBIG, CONSTRAINT, MISMATCH, RANGE: a value or row of one record.
        18 | 19 | 20 | 25 => Failure::Data,
        // BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN and the rest: the
        // database file, not the data.
        _ => Failure::Unavailable,
    }
}

/// Reads the columns of every event table of the attached schema and the records of
/// `_sdc_columns`.
pub(super) async fn catalog(
    conn: &mut SqliteConnection,
    schema: &str,
) -> Result<Catalog, sqlx::Error> {
    let sql = format!(
        "SELECT m.name, p.name, p.type FROM {}.sqlite_master AS m, pragma_table_info(m.name, ?1) AS p \
         WHERE m.type = 'table'",
        quote_ident(schema)
    );
    let columns: Vec<(String, String, String)> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(schema)
        .fetch_all(&mut *conn)
        .await?;
    let records: Vec<super::RecordRow> = sqlx::query_as(AssertSqlSafe(select_columns_sql(schema)))
        .fetch_all(&mut *conn)
        .await?;
    Ok(Catalog::from_rows(
        columns,
        records.into_iter().filter_map(super::record_of_row),
    ))
}

/// `items` in chunks whose lengths are powers of two, each at most `most` long and as long as
/// possible: 37 items, at most 100 a chunk, are chunks of 32, 4 and 1.
fn power_of_two_chunks<T>(items: &[T], most: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let length = 1 << rest.len().min(most.max(1)).ilog2();
        let (chunk, tail) = rest.split_at(length);
        rest = tail;
        Some(chunk)
    })
}

/// Upserts one table's rows, in statements of a power of two rows each, as many as SQLite's
/// parameter cap allows, up to [`MAX_ROWS_PER_STATEMENT`]: prepared statements are cached per
/// connection by their text, so the number of different texts (one per row count) stays
/// small, and so does the memory they hold.
pub(super) async fn insert(
    tx: &mut Transaction<'static, Sqlite>,
    schema: &str,
    rows: &TableRows<'_>,
) -> Result<(), sqlx::Error> {
    let width = rows.columns.len();
    let names = rows
        .columns
        .iter()
        .map(|(name, _)| quote_ident(name))
        .collect::<Vec<_>>()
        .join(", ");
    let tuple = format!("({})", vec!["?"; width].join(", "));
    let table = qualified(schema, rows.table.name());
    let conflict = on_conflict_sql(rows);
    for chunk in power_of_two_chunks(
        &rows.rows,
        (MAX_PARAMETERS / width.max(1)).clamp(1, MAX_ROWS_PER_STATEMENT),
    ) {
        let sql = format!(
            "INSERT INTO {table} AS t ({names}) VALUES {}{conflict}",
            vec![tuple.as_str(); chunk.len()].join(", "),
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for value in chunk.iter().flatten().map(Option::as_deref) {
            query = match value {
                None => query.bind(None::<&str>),
                Some(SqlValue::Text(s) | SqlValue::Json(s)) => query.bind(s.as_str()),
                Some(SqlValue::BigInt(n)) => query.bind(*n),
                // SQLite stores NaN as NULL; the column keeps the text 'NaN' instead (its type
                // is only an affinity), so the value is not lost. Infinities are REAL values.
                Some(SqlValue::Double(n)) if n.is_nan() => query.bind(json::non_finite_name(*n)),
                Some(SqlValue::Double(n)) => query.bind(*n),
                Some(SqlValue::Boolean(b)) => query.bind(*b),
                Some(SqlValue::Timestamp(t)) => query.bind(format_timestamp(t)),
            };
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Inserts one row into `_sdc_rejected`.
pub(super) async fn insert_rejected(
    tx: &mut Transaction<'static, Sqlite>,
    schema: &str,
    record: &Rejected,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let sql = insert_rejected_sql(Dialect::Sqlite, schema);
    sqlx::query(AssertSqlSafe(sql))
        .bind(format_timestamp(&at))
        .bind(record.table.name())
        .bind(record.message_id.as_str())
        .bind(record.reason.as_str())
        .bind(record.record.as_str())
        .execute(&mut **tx)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_in_chunks_of_powers_of_two() {
        let lengths = |n: usize, most: usize| -> Vec<usize> {
            let items = vec![0; n];
            power_of_two_chunks(&items, most)
                .map(<[i32]>::len)
                .collect()
        };
        assert_eq!(lengths(37, 100), [32, 4, 1]);
        assert_eq!(lengths(300, 100), [64, 64, 64, 64, 32, 8, 4]);
        assert_eq!(lengths(1, 1), [1]);
        assert_eq!(lengths(3, 0), [1, 1, 1]);
        assert!(lengths(0, 10).is_empty());
    }

    #[test]
    fn urls_name_a_file() {
        assert_eq!(path_of("sqlite://sluice.db"), Some("sluice.db"));
        assert_eq!(
            path_of("sqlite:///var/lib/s.db?mode=rwc"),
            Some("/var/lib/s.db")
        );
        assert_eq!(path_of("sqlite:data/s.db"), Some("data/s.db"));
        assert_eq!(path_of("sqlite::memory:"), None);
        assert_eq!(path_of("postgres://x"), None);
    }

    /// The durability an acknowledgement promises, on every connection (the settings are per
    /// connection): a commit returns only after `fsync` (`synchronous = FULL`, 2), through the
    /// write-ahead log. The fault tests cannot show a missing `fsync` (see `Ext4::fail` in the
    /// tests crate), so it is checked here.
    #[tokio::test]
    async fn every_connection_commits_through_fsync() {
        let dir = std::env::temp_dir().join(format!("sluice-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("segment.db");
        let pool = pool(
            path.to_str().expect("UTF-8 path"),
            "segment",
            2,
            Timeouts::default(),
        )
        .expect("pool");
        let mut first = pool.acquire().await.expect("a connection");
        let mut second = pool.acquire().await.expect("another connection");
        for conn in [&mut first, &mut second] {
            let (synchronous,): (i64,) = sqlx::query_as(r#"PRAGMA "segment".synchronous"#)
                .fetch_one(&mut **conn)
                .await
                .expect("synchronous");
            assert_eq!(synchronous, 2, "synchronous = FULL");
            let (journal,): (String,) = sqlx::query_as(r#"PRAGMA "segment".journal_mode"#)
                .fetch_one(&mut **conn)
                .await
                .expect("journal_mode");
            assert_eq!(journal, "wal");
        }
        drop((first, second));
        pool.close().await;
        std::fs::remove_dir_all(&dir).expect("remove the temp dir");
    }

    #[test]
    fn result_codes_map_to_reactions() {
        assert_eq!(classify("5"), Failure::Unavailable);
        assert_eq!(classify("2067"), Failure::Data);
        assert_eq!(classify("1"), Failure::Stale);
    }
}

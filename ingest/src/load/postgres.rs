//! The PostgreSQL writer: one `INSERT ... SELECT unnest(...), ...` per table and batch, with one
//! array parameter per column, all of a batch's tables and its `_sdc_loads` line in one
//! statement, so a batch costs one round trip whatever its size.

use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha1::{Digest, Sha1};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Postgres, Transaction};

use super::plan::TableRows;
use super::{Failure, LoadError, Rejected, TableLoad, Timeouts, minute_of, on_conflict_sql};
use crate::normalize::SqlValue;
use crate::schema::{
    Catalog, ColumnType, Dialect, Rows, insert_rejected_sql, qualified, quote_ident,
    select_columns_sql, upsert_loads_sql,
};

/// A lazily connecting pool: the process starts, and `/readyz` reports, while the database is
/// down. Every connection runs with `statement_timeout`. A connection idle for more than
/// [`IDLE_CHECK`] is tested before it is handed out (one the server closed, by a restart say, is
/// replaced); one in steady use is not, which would cost a round trip per batch. A connection
/// is tested when it comes back (one that does not answer within the acquire timeout, as over
/// a stalled network, is dropped rather than kept: it would hold its place in the pool until
/// the network heals); a writer's connection does not come back after each batch, see
/// [`Kept`].
pub(super) fn pool(url: &str, connections: u32, timeouts: Timeouts) -> Result<PgPool, LoadError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| LoadError::BadUrl(format!("{url}: {e}")))?
        .application_name("sluice-ingest")
        .options([(
            "statement_timeout",
            format!("{}ms", timeouts.statement.as_millis()),
        )]);
    let check = timeouts.acquire;
    Ok(PgPoolOptions::new()
        .max_connections(connections.max(1))
        .acquire_timeout(timeouts.acquire)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > IDLE_CHECK {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .after_release(move |conn, _| {
            Box::pin(async move {
                match tokio::time::timeout(check, conn.ping()).await {
                    Ok(answer) => answer.map(|()| true),
                    Err(_) => Err(sqlx::Error::PoolTimedOut),
                }
            })
        })
        .connect_lazy_with(options))
}

/// How long a pooled or kept connection may sit idle before it is tested again when handed out.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// How long a writer keeps a connection it took from the pool before giving it back, so that
/// the pool's own limits (`max_lifetime`, `idle_timeout`) still apply to it.
const KEPT_AT_MOST: Duration = Duration::from_secs(60);

/// The connections the batcher's writers keep between batches.
///
/// A connection given back to sqlx's pool is tested there with a round trip (`after_release`
/// in [`pool`], then sqlx's own check): two round trips per batch, which PostgreSQL and the
/// ingest both pay for, and which delay the connection's next batch. A writer instead keeps its
/// connection here after a batch that committed, and [`Kept::take`]s it again for the next
/// one. Kept connections go back to the pool (which tests them and closes the broken ones, and
/// applies its lifetime and idle limits) at the next batch once they have sat idle for more than
/// [`IDLE_CHECK`], and after a batch once they have been kept for [`KEPT_AT_MOST`]; so while
/// the service is idle, the connections of its last batches stay open, checked out of the pool,
/// until the next one. After a failed batch the connection goes back to the pool at once.
///
/// No more connections are kept than writers have loaded at once. A writer may use a second
/// connection meanwhile (for DDL, or to retry a refused batch row by row), so the pool holds
/// `2 × writers + 2` (see [`crate::run`]).
#[derive(Default)]
pub(super) struct Kept(Mutex<Vec<KeptConnection>>);

/// A kept connection, with when it was taken from the pool and when it was last used.
struct KeptConnection {
    conn: PoolConnection<Postgres>,
    taken: Instant,
    used: Instant,
}

impl Kept {
    /// The most recently kept connection used within [`IDLE_CHECK`], or else one from `pool`
    /// (which tests a connection idle for longer); the kept ones idle for longer go back to the
    /// pool first. Returns the connection with when it was taken from the pool, for
    /// [`Kept::keep`].
    ///
    /// # Errors
    /// The pool's: no connection within the acquire timeout, or none can be opened.
    pub(super) async fn take(
        &self,
        pool: &PgPool,
    ) -> Result<(PoolConnection<Postgres>, Instant), sqlx::Error> {
        let (fresh, stale) = {
            let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let stale: Vec<_> = kept
                .extract_if(.., |k| now.duration_since(k.used) > IDLE_CHECK)
                .collect();
            (kept.pop(), stale)
        };
        // Dropping a `PoolConnection` gives it back to the pool (in a task of its own), here
        // outside the lock.
        drop(stale);
        match fresh {
            Some(kept) => Ok((kept.conn, kept.taken)),
            None => Ok((pool.acquire().await?, Instant::now())),
        }
    }

    /// Keeps `conn`, taken from the pool at `taken`, for the next batch; gives it back to the
    /// pool instead if it has been kept for [`KEPT_AT_MOST`].
    pub(super) fn keep(&self, conn: PoolConnection<Postgres>, taken: Instant) {
        if taken.elapsed() >= KEPT_AT_MOST {
            return;
        }
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(KeptConnection {
                conn,
                taken,
                used: Instant::now(),
            });
    }
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_tuple("Kept").field(&kept).finish()
    }
}

/// Maps a SQLSTATE to how the loader reacts, by its class (the first two characters), with
/// the few codes inside a class that need another reaction named first. The classes are
/// PostgreSQL's (Appendix A, "PostgreSQL Error Codes").
pub(super) fn classify(code: &str) -> Failure {
    match code {
        // undefined column / table, datatype mismatch, duplicate column: the table changed
        // under the loader (by hand, or another writer's DDL).
        "42703" | "42P01" | "42804" | "42701" => return Failure::Stale,
        // insufficient privilege: a grant is missing, which no record can cause or fix.
        "42501" => return Failure::Unavailable,
        _ => {}
    }
    match code.get(..2).unwrap_or_default() {
        // 0A feature not supported, 21 cardinality violation, 22 data exception, 23 integrity
        // constraint violation, 42 syntax error or access rule violation (e.g. a name the
        // database reserves), 44 WITH CHECK OPTION violation, 54 program limit exceeded (row
        // too big, too many columns): something in one record.
        "0A" | "21" | "22" | "23" | "42" | "44" | "54" => Failure::Data,
        // 08 connection exception, 25 invalid transaction state, 40 transaction rollback
        // (serialization, deadlock), 53 insufficient resources (disk full, out of memory, too
        // many connections), 55 object not in prerequisite state (lock not available), 57
        // operator intervention (shutdown, statement timeout), 58 system error (I/O), XX
        // internal error, and anything else: the database, not the data.
        _ => Failure::Unavailable,
    }
}

/// Reads the columns of every event table of `schema` and the records of `_sdc_columns`.
pub(super) async fn catalog(conn: &mut PgConnection, schema: &str) -> Result<Catalog, sqlx::Error> {
    let table_columns = columns(&mut *conn, schema).await?;
    let records: Vec<super::RecordRow> = sqlx::query_as(AssertSqlSafe(select_columns_sql(schema)))
        .fetch_all(&mut *conn)
        .await?;
    Ok(Catalog::from_rows(
        table_columns,
        records.into_iter().filter_map(super::record_of_row),
    ))
}

/// `(table, column, type)` for every column of every table in `schema`.
async fn columns(
    conn: &mut PgConnection,
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
    .fetch_all(conn)
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

/// Upserts one table's rows (on a connection inside a transaction).
pub(super) async fn insert(
    conn: &mut PgConnection,
    schema: &str,
    rows: &TableRows<'_>,
) -> Result<(), sqlx::Error> {
    let sql = format!("{}{}", insert_sql(schema, rows, 1), on_conflict_sql(rows));
    bind_rows(sqlx::query(AssertSqlSafe(sql)), rows)
        .execute(conn)
        .await
        .map(drop)
}

/// Loads a batch and adds `loads` to `_sdc_loads` (for the minute of `at`), in two steps.
///
/// First, one statement, which PostgreSQL runs as a transaction of its own (one round trip per
/// batch), inserts every table's rows that are new and the `_sdc_loads` line, and returns the
/// `message_id`s it inserted:
///
/// ```sql
/// WITH w0 AS (INSERT INTO "s"."page" ... ON CONFLICT ("message_id") DO NOTHING
///             RETURNING 0, "message_id"),
///      w1 AS (INSERT INTO "s"."track" ... RETURNING 1, "message_id"),
///      loads AS (INSERT INTO "s"."_sdc_loads" AS t (...) SELECT * FROM (VALUES (...)) AS v
///                WHERE (SELECT count(*) FROM w0) + (SELECT count(*) FROM w1) >= 0
///                ON CONFLICT ...)
/// SELECT * FROM w0 UNION ALL SELECT * FROM w1
/// ```
///
/// The condition makes the tables' inserts complete before the `_sdc_loads` rows are written,
/// so the lock on a table's row of the minute, which concurrent writers wait for, is held only
/// from then until the commit.
///
/// Then the rows that were not new (redeliveries, whose row the newest version must replace)
/// are upserted with the full statement, which names every column of the table ([`insert`]),
/// in a transaction of their own. The first statement names only the batch's columns:
/// PostgreSQL resolves each column name of a statement by a linear search of the table's
/// columns, so a statement naming all of a wide table's columns costs time quadratic in its
/// width, paid at every batch while new keys keep changing the statement.
///
/// The batch is acknowledged only after both steps; when the second fails, the sender's retry
/// upserts again (and counts again in `_sdc_loads`, like any redelivery). Both steps run on
/// `conn`, which is a writer's [`Kept`] connection.
pub(super) async fn load(
    conn: &mut PgConnection,
    schema: &str,
    tables: &[TableRows<'_>],
    items: &[super::Item],
    loads: &[TableLoad],
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let mut sql = String::new();
    let mut first = 1;
    for (i, rows) in tables.iter().enumerate() {
        sql.push_str(if i == 0 { "WITH " } else { ", " });
        sql.push_str(&format!(
            "w{i} AS ({} ON CONFLICT ({}) DO NOTHING RETURNING {i}, {})",
            insert_sql(schema, rows, first),
            quote_ident("message_id"),
            quote_ident("message_id")
        ));
        first += rows.columns.len();
    }
    let condition = (0..tables.len())
        .map(|i| format!("(SELECT count(*) FROM w{i})"))
        .collect::<Vec<_>>()
        .join(" + ");
    let condition = format!("{condition} >= 0");
    let rows = Rows {
        count: loads.len(),
        first,
        condition: Some(&condition),
    };
    sql.push_str(&format!(
        ", loads AS ({}) ",
        upsert_loads_sql(Dialect::Postgres, schema, &rows)
    ));
    sql.push_str(
        &(0..tables.len())
            .map(|i| format!("SELECT * FROM w{i}"))
            .collect::<Vec<_>>()
            .join(" UNION ALL "),
    );
    let mut query = sqlx::query_as(AssertSqlSafe(sql));
    for rows in tables {
        query = bind_rows(query, rows);
    }
    let inserted: Vec<(i32, String)> =
        bind_loads!(query, loads, minute_of(at), |t: DateTime<Utc>| t)
            .fetch_all(&mut *conn)
            .await?;
    let inserted: std::collections::HashSet<(usize, &str)> = inserted
        .iter()
        .map(|(i, id)| (usize::try_from(*i).unwrap_or(usize::MAX), id.as_str()))
        .collect();
    let redelivered: Vec<TableRows<'_>> = tables
        .iter()
        .enumerate()
        .filter_map(|(i, rows)| {
            let (kept, kept_items): (Vec<_>, Vec<usize>) = rows
                .rows
                .iter()
                .zip(&rows.items)
                .filter(|&(_, &item)| {
                    !inserted.contains(&(i, items[item].record.message_id.as_str()))
                })
                .map(|(row, &item)| (row.clone(), item))
                .unzip();
            (!kept.is_empty()).then(|| rows.with_rows(kept, kept_items))
        })
        .collect();
    if redelivered.is_empty() {
        return Ok(());
    }
    let mut tx = conn.begin().await?;
    for rows in &redelivered {
        insert(&mut tx, schema, rows).await?;
    }
    tx.commit().await
}

/// The `INSERT` of one table's rows without its conflict clause, its parameters (one array
/// per column) numbered from `first`. The arrays are expanded by `unnest` in the select list,
/// which PostgreSQL runs in lockstep without materializing each one (as `FROM UNNEST(...)`
/// does).
fn insert_sql(schema: &str, rows: &TableRows<'_>, first: usize) -> String {
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
            ColumnType::Json => format!("unnest(${}::text[]::jsonb[])", first + i),
            other => format!("unnest(${}::{}[])", first + i, other.sql()),
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {} AS t ({names}) SELECT {arrays}",
        qualified(schema, rows.table.name()),
    )
}

/// Binds one array per column of `rows`, in column order.
fn bind_rows<'q, Q: Bind<'q>>(mut query: Q, rows: &'q TableRows<'_>) -> Q {
    for (i, (_, ty)) in rows.columns.iter().enumerate() {
        let cells = rows.rows.iter().map(|row| row[i].as_deref());
        query = match ty {
            ColumnType::Text | ColumnType::Json => query.bind_value(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Text(s) | SqlValue::Json(s)) => Some(s.as_str()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::BigInt => query.bind_value(
                cells
                    .map(|v| match v {
                        Some(SqlValue::BigInt(n)) => Some(*n),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::Double => query.bind_value(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Double(n)) => Some(*n),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::Boolean => query.bind_value(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Boolean(b)) => Some(*b),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
            ColumnType::Timestamp => query.bind_value(
                cells
                    .map(|v| match v {
                        Some(SqlValue::Timestamp(t)) => Some(*t),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            ),
        };
    }
    query
}

/// A query that takes parameters: [`sqlx::query::Query`] and [`sqlx::query::QueryAs`].
trait Bind<'q>: Sized {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>;
}

impl<'q> Bind<'q> for sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
    {
        self.bind(value)
    }
}

impl<'q, O> Bind<'q> for sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
    fn bind_value<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
    {
        self.bind(value)
    }
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
    fn sqlstates_map_to_reactions_by_class() {
        use Failure::*;
        for (code, expected, what) in [
            ("0A000", Data, "feature not supported"),
            (
                "21000",
                Data,
                "cardinality violation (a key twice in one upsert)",
            ),
            ("22021", Data, "invalid byte sequence"),
            ("22P05", Data, "unsupported Unicode escape"),
            ("22003", Data, "numeric value out of range"),
            ("23502", Data, "not-null violation"),
            ("42939", Data, "reserved name"),
            ("42601", Data, "syntax error (a zero-length name)"),
            ("44000", Data, "WITH CHECK OPTION violation"),
            ("54000", Data, "row too big"),
            ("54011", Data, "too many columns"),
            ("42703", Stale, "undefined column"),
            ("42P01", Stale, "undefined table"),
            ("42804", Stale, "datatype mismatch"),
            ("42701", Stale, "duplicate column"),
            ("42501", Unavailable, "insufficient privilege"),
            ("08006", Unavailable, "connection failure"),
            ("25P02", Unavailable, "in failed transaction"),
            ("40001", Unavailable, "serialization failure"),
            ("40P01", Unavailable, "deadlock"),
            ("53100", Unavailable, "disk full"),
            ("53300", Unavailable, "too many connections"),
            ("55P03", Unavailable, "lock not available"),
            ("57P01", Unavailable, "admin shutdown"),
            ("57014", Unavailable, "statement timeout"),
            ("58030", Unavailable, "I/O error"),
            ("XX000", Unavailable, "internal error"),
            ("", Unavailable, "no code"),
        ] {
            assert_eq!(classify(code), expected, "{code} {what}");
        }
    }

    #[test]
    fn lock_key_is_per_schema() {
        assert_eq!(lock_key("a"), lock_key("a"));
        assert_ne!(lock_key("a"), lock_key("b"));
    }
}

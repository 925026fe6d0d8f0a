//! The destination schema: names, base tables and the DDL text that creates and evolves them.
//!
//! Everything here is pure text; [`crate::load::Warehouse`] runs it. Every identifier passes
//! through [`quote_ident`], the one quoting function, whatever its origin.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::event::Table;
use crate::naming::{self, Claim, KeyPath};

/// The SQL type of a column, as Sluice creates it. The same names serve PostgreSQL and SQLite
/// (SQLite keeps declared type names verbatim and derives a fitting affinity from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ColumnType {
    /// `text`
    Text,
    /// `bigint`
    BigInt,
    /// `double precision`
    Double,
    /// `boolean`
    Boolean,
    /// `timestamptz`
    Timestamp,
    /// `jsonb`
    Json,
}

impl ColumnType {
    /// Every column type.
    pub const ALL: [ColumnType; 6] = [
        ColumnType::Text,
        ColumnType::BigInt,
        ColumnType::Double,
        ColumnType::Boolean,
        ColumnType::Timestamp,
        ColumnType::Json,
    ];

    /// The type's name in DDL.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::BigInt => "bigint",
            ColumnType::Double => "double precision",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamp => "timestamptz",
            ColumnType::Json => "jsonb",
        }
    }

    /// The suffix of the split column that holds values of this type when a column of the same
    /// key path already has another type (Stitch's convention; `__js` is Sluice's for JSON).
    pub fn split_suffix(self) -> &'static str {
        match self {
            ColumnType::Text => "__st",
            ColumnType::BigInt => "__bi",
            ColumnType::Double => "__do",
            ColumnType::Boolean => "__bo",
            ColumnType::Timestamp => "__ti",
            ColumnType::Json => "__js",
        }
    }

    /// Reads a type name from a database catalog: PostgreSQL's `format_type` spelling or
    /// the declared type that SQLite keeps. `None` for types Sluice never creates.
    pub fn from_catalog(name: &str) -> Option<ColumnType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "text" => Some(ColumnType::Text),
            "bigint" => Some(ColumnType::BigInt),
            "double precision" => Some(ColumnType::Double),
            "boolean" => Some(ColumnType::Boolean),
            "timestamptz" | "timestamp with time zone" => Some(ColumnType::Timestamp),
            "jsonb" => Some(ColumnType::Json),
            _ => None,
        }
    }

    /// Whether a column of this type can store a value of type `value`: the same type, or an
    /// integer in a `double precision` column (JSON writers print `10.0` as `10`).
    pub fn accepts(self, value: ColumnType) -> bool {
        self == value || (self == ColumnType::Double && value == ColumnType::BigInt)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sql())
    }
}

/// The SQL dialect of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL: the schema is a namespace in the database.
    Postgres,
    /// SQLite: the schema is a database file attached under the schema's name.
    Sqlite,
}

impl Dialect {
    /// The `n`th (from 1) numbered parameter: `$n` on PostgreSQL, `?n` on SQLite.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            Dialect::Sqlite => format!("?{n}"),
        }
    }
}

/// A table stops growing new columns at this many; later keys go to its `_sdc_overflow` column.
/// PostgreSQL allows 1600 columns per table, counting dropped ones; the margin leaves room for
/// the split columns of columns that already exist.
pub const COLUMN_LIMIT: usize = 1500;

/// The table that receives records that cannot be loaded, with the reason.
pub const REJECTED_TABLE: &str = "_sdc_rejected";

/// The jsonb column that receives keys of a table that has reached [`COLUMN_LIMIT`].
pub const OVERFLOW_COLUMN: &str = "_sdc_overflow";

/// The system columns every loaded row gets a value for, in Stitch's names and order:
/// when Sluice received the event, when its batch was written, its load order (which redelivery
/// wins) and the table version. [`base_columns`] creates them; the loader fills the first three
/// ([`ROW_SYSTEM_COLUMNS`]), the table fills the version ([`TABLE_VERSION_COLUMN`]).
pub const SYSTEM_COLUMNS: [(&str, ColumnType); 4] = [
    ROW_SYSTEM_COLUMNS[0],
    ROW_SYSTEM_COLUMNS[1],
    ROW_SYSTEM_COLUMNS[2],
    (TABLE_VERSION_COLUMN, ColumnType::BigInt),
];

/// The system columns the loader writes a value into for each row.
pub const ROW_SYSTEM_COLUMNS: [(&str, ColumnType); 3] = [
    ("_sdc_received_at", ColumnType::Timestamp),
    ("_sdc_batched_at", ColumnType::Timestamp),
    ("_sdc_sequence", ColumnType::BigInt),
];

/// The column that holds a row's table version (Stitch's `_sdc_table_version`). The loader never
/// writes it: its value is the column's `DEFAULT`, which a table is created with and which only a
/// reset changes (by creating a new table, see [`crate::load::reset`]). So a row gets the version
/// of the table it lands in, whichever table that is when its transaction runs.
pub const TABLE_VERSION_COLUMN: &str = "_sdc_table_version";

/// Quotes an identifier for SQL (PostgreSQL and SQLite alike): wrapped in `"`, inner `"`
/// doubled. Identifiers are generated by [`crate::normalize`] or validated by
/// [`validate_schema_name`] first; quoting is the second, independent line of defence.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// Column names, each through [`quote_ident`], joined by `, `.
pub fn column_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One of Sluice's own tables in the destination schema (`_sdc_rejected`, `_sdc_columns`,
/// `_sdc_ownership`): its name and columns, from which its DDL and DML are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemTable {
    /// The table's name.
    pub name: &'static str,
    /// Each column's name and SQL declaration (type and constraints), in order.
    pub columns: &'static [(&'static str, &'static str)],
    /// The primary key's columns; empty for none.
    pub primary_key: &'static [&'static str],
}

/// The rows an `INSERT` of a [`SystemTable`] writes: how many, the number of their first
/// parameter (parameters run row by row in column order), and optionally a condition that must
/// hold for any to be written (an SQL expression, e.g. one that makes the statement wait for a
/// data-modifying `WITH` query to complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rows<'a> {
    /// How many rows.
    pub count: usize,
    /// The number of the first parameter (from 1).
    pub first: usize,
    /// A condition on writing them, or none.
    pub condition: Option<&'a str>,
}

impl Rows<'_> {
    /// `count` rows with parameters numbered from 1, and no condition.
    pub fn new(count: usize) -> Rows<'static> {
        Rows {
            count,
            first: 1,
            condition: None,
        }
    }
}

impl SystemTable {
    /// `CREATE TABLE IF NOT EXISTS`, the same text on PostgreSQL and SQLite.
    pub fn create_sql(&self, schema: &str) -> String {
        let mut parts: Vec<String> = self
            .columns
            .iter()
            .map(|(name, declaration)| format!("{} {declaration}", quote_ident(name)))
            .collect();
        if !self.primary_key.is_empty() {
            let key = column_list(self.primary_key.iter().copied());
            parts.push(format!("PRIMARY KEY ({key})"));
        }
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            qualified(schema, self.name),
            parts.join(", ")
        )
    }

    /// `INSERT` of `rows` rows into the first `columns` columns (the rest take their defaults),
    /// parameters numbered row by row from 1.
    pub fn insert_sql(
        &self,
        dialect: Dialect,
        schema: &str,
        columns: usize,
        rows: usize,
    ) -> String {
        self.values_insert_sql(dialect, schema, columns, &Rows::new(rows))
    }

    /// `INSERT` of `rows` into the first `columns` columns: `VALUES`, or with a condition,
    /// `SELECT * FROM (VALUES ...) AS v WHERE condition`.
    fn values_insert_sql(
        &self,
        dialect: Dialect,
        schema: &str,
        columns: usize,
        rows: &Rows<'_>,
    ) -> String {
        let names = column_list(self.columns[..columns].iter().map(|(name, _)| *name));
        let tuples = (0..rows.count)
            .map(|row| {
                let first = rows.first + row * columns;
                let placeholders = (first..first + columns)
                    .map(|i| dialect.placeholder(i))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("({placeholders})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        let table = qualified(schema, self.name);
        match rows.condition {
            None => format!("INSERT INTO {table} ({names}) VALUES {tuples}"),
            Some(condition) => format!(
                "INSERT INTO {table} ({names}) SELECT * FROM (VALUES {tuples}) AS v WHERE {condition}"
            ),
        }
    }

    /// `INSERT` of `rows` rows (every column, parameters row by row) that, where a row with the
    /// same primary key exists (`t`), adds each of `sums` to it and applies `sets` (further
    /// `column = expression` assignments): for tables of counts that several writers add to.
    pub fn adding_upsert_sql(
        &self,
        dialect: Dialect,
        schema: &str,
        rows: &Rows<'_>,
        sums: &[&str],
        sets: &[String],
    ) -> String {
        let insert = self.values_insert_sql(dialect, schema, self.columns.len(), rows);
        // The existing row is `t`, as in the event tables' upsert.
        let target = qualified(schema, self.name);
        let insert = insert.replacen(&target, &format!("{target} AS t"), 1);
        let assignments: Vec<String> = sums
            .iter()
            .map(|c| {
                let c = quote_ident(c);
                format!("{c} = t.{c} + excluded.{c}")
            })
            .chain(sets.iter().cloned())
            .collect();
        format!(
            "{insert} ON CONFLICT ({}) DO UPDATE SET {}",
            column_list(self.primary_key.iter().copied()),
            assignments.join(", ")
        )
    }

    /// `SELECT` of `columns` (each quoted) from the table, without a `WHERE`.
    pub fn select_sql(&self, schema: &str, columns: &[&str]) -> String {
        format!(
            "SELECT {} FROM {}",
            column_list(columns.iter().copied()),
            qualified(schema, self.name)
        )
    }
}

/// The pattern a schema name must match: what Stitch derives from a display name, and what
/// every destination accepts unquoted. The operator's CRD uses the same pattern.
pub const SCHEMA_NAME_PATTERN: &str = "^[a-z_][a-z0-9_]{0,62}$";

/// A schema name that Sluice will not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid schema name {0:?}: use 1 to 63 lowercase letters, digits and underscores, not starting with a digit"
)]
pub struct InvalidSchemaName(pub String);

/// Checks a schema name against [`SCHEMA_NAME_PATTERN`], and refuses the names PostgreSQL
/// reserves (`pg_*`, `information_schema`).
pub fn validate_schema_name(name: &str) -> Result<(), InvalidSchemaName> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    let reserved = name.starts_with("pg_") || name == "information_schema";
    if first_ok && rest_ok && name.len() <= 63 && !reserved {
        Ok(())
    } else {
        Err(InvalidSchemaName(name.to_owned()))
    }
}

/// Derives a schema name from an integration's display name as Stitch does: lowercase, every
/// run of characters other than letters and digits becomes one `_` ("Stitch Segment" ->
/// `stitch_segment`). A name starting with a digit gets a leading `_`; an empty one becomes
/// `segment`.
pub fn schema_name_from_display_name(display_name: &str) -> String {
    let mut out = String::new();
    for c in display_name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let mut name = out.trim_matches('_').to_owned();
    if name.is_empty() {
        name = "segment".to_owned();
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name.truncate(63);
    if name.starts_with("pg_") {
        name.insert(0, '_');
        name.truncate(63);
    }
    name
}

/// A column every event table is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseColumn {
    /// The column name.
    pub name: &'static str,
    /// Its type.
    pub ty: ColumnType,
    /// The top-level Segment key it holds (`None` for Sluice's system columns).
    pub key: Option<&'static str>,
}

/// The columns every table is created with: the key, Sluice's system columns, the fields every
/// Segment call has, and the fields its own call requires. Other columns appear as keys arrive.
pub fn base_columns(table: Table) -> Vec<BaseColumn> {
    use ColumnType::*;
    let column = |name, ty, key| BaseColumn { name, ty, key };
    let mut columns = vec![column("message_id", Text, Some("messageId"))];
    columns.extend(SYSTEM_COLUMNS.map(|(name, ty)| column(name, ty, None)));
    columns.extend([
        column(OVERFLOW_COLUMN, Json, None),
        column("type", Text, Some("type")),
        column("user_id", Text, Some("userId")),
        column("anonymous_id", Text, Some("anonymousId")),
        column("timestamp", Timestamp, Some("timestamp")),
        column("original_timestamp", Timestamp, Some("originalTimestamp")),
        column("sent_at", Timestamp, Some("sentAt")),
        column("received_at", Timestamp, Some("receivedAt")),
    ]);
    columns.extend(match table {
        Table::Alias => vec![column("previous_id", Text, Some("previousId"))],
        Table::Group => vec![column("group_id", Text, Some("groupId"))],
        Table::Page | Table::Screen => vec![column("name", Text, Some("name"))],
        Table::Track => vec![column("event", Text, Some("event"))],
        Table::Identify => vec![],
    });
    columns
}

/// `CREATE SCHEMA IF NOT EXISTS`, or nothing on SQLite (where attaching creates the schema).
pub fn create_schema_sql(dialect: Dialect, schema: &str) -> Option<String> {
    match dialect {
        Dialect::Postgres => Some(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(schema)
        )),
        Dialect::Sqlite => None,
    }
}

/// `CREATE TABLE IF NOT EXISTS` for one of the event tables at table version `version`: keyed by
/// `message_id`, with `version` as the default of [`TABLE_VERSION_COLUMN`].
pub fn create_table_sql(schema: &str, table: Table, version: i64) -> String {
    let columns = base_columns(table)
        .into_iter()
        .map(|c| {
            let constraint = match c.name {
                "message_id" => " NOT NULL PRIMARY KEY".to_owned(),
                TABLE_VERSION_COLUMN => format!(" DEFAULT {version}"),
                _ => String::new(),
            };
            format!("{} {}{constraint}", quote_ident(c.name), c.ty.sql())
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({columns})",
        qualified(schema, table.name())
    )
}

/// `_sdc_rejected`: records the database refused, with the reason. The record is kept as JSON
/// text, since a record is rejected precisely when the database refused some value in it (a NUL
/// character, say, which neither `text` nor `jsonb` can hold).
pub const REJECTED: SystemTable = SystemTable {
    name: REJECTED_TABLE,
    columns: &[
        ("_sdc_rejected_at", "timestamptz NOT NULL"),
        ("table_name", "text NOT NULL"),
        ("message_id", "text"),
        ("reason", "text NOT NULL"),
        ("record", "text NOT NULL"),
    ],
    primary_key: &[],
};

/// `CREATE TABLE IF NOT EXISTS` for `_sdc_rejected`.
pub fn create_rejected_sql(schema: &str) -> String {
    REJECTED.create_sql(schema)
}

/// `INSERT` of one `_sdc_rejected` row, parameters in order: rejected at, table name,
/// message id, reason, record.
pub fn insert_rejected_sql(dialect: Dialect, schema: &str) -> String {
    REJECTED.insert_sql(dialect, schema, REJECTED.columns.len(), 1)
}

/// `ALTER TABLE ... ADD COLUMN` for each of `columns`: one statement on PostgreSQL (which adds
/// them all in one catalog change), one per column on SQLite (which takes one at a time). Run
/// under the schema's DDL lock after reading the catalog, so it never races another writer.
pub fn add_columns_sql(
    dialect: Dialect,
    schema: &str,
    table: Table,
    columns: &[(&str, ColumnType)],
) -> Vec<String> {
    let alter = format!("ALTER TABLE {}", qualified(schema, table.name()));
    let add =
        |(name, ty): &(&str, ColumnType)| format!("ADD COLUMN {} {}", quote_ident(name), ty.sql());
    match dialect {
        Dialect::Postgres if !columns.is_empty() => vec![format!(
            "{alter} {}",
            columns.iter().map(add).collect::<Vec<_>>().join(", ")
        )],
        Dialect::Postgres => Vec::new(),
        Dialect::Sqlite => columns
            .iter()
            .map(|column| format!("{alter} {}", add(column)))
            .collect(),
    }
}

/// The table that records which key path each column holds.
pub const COLUMNS_TABLE: &str = "_sdc_columns";

/// `CREATE TABLE IF NOT EXISTS` for `_sdc_columns`: one row per column of every event table,
/// written in the same transaction as the DDL that adds the column. `key_path` is the JSON
/// array of keys from the event's top level (NULL for Sluice's system columns); `column_type` the
/// type of values the column was made for; `split_of` the column whose type conflict made it
/// (NULL for the first column of a key path).
pub fn create_columns_sql(schema: &str) -> String {
    COLUMNS.create_sql(schema)
}

/// `_sdc_columns`, described at [`create_columns_sql`].
pub const COLUMNS: SystemTable = SystemTable {
    name: COLUMNS_TABLE,
    columns: &[
        ("table_name", "text NOT NULL"),
        ("column_name", "text NOT NULL"),
        ("key_path", "text"),
        ("column_type", "text NOT NULL"),
        ("split_of", "text"),
        ("_sdc_added_at", "timestamptz NOT NULL"),
    ],
    primary_key: &["table_name", "column_name"],
};

/// The loading report: one row per event table and minute.
pub const LOADS_TABLE: &str = "_sdc_loads";

/// `_sdc_loads`: per event table and minute (UTC, the start of the minute the rows were
/// committed in), the rows upserted (`rows_loaded`, redeliveries included), the records set
/// aside in `_sdc_rejected` (`rows_rejected`), the columns added (`columns_added`), and the
/// first and last `_sdc_received_at` of the rows loaded. Each count is added in the same
/// transaction as the rows (or columns) it counts, so the report is exact.
pub const LOADS: SystemTable = SystemTable {
    name: LOADS_TABLE,
    columns: &[
        ("table_name", "text NOT NULL"),
        ("minute", "timestamptz NOT NULL"),
        ("rows_loaded", "bigint NOT NULL"),
        ("rows_rejected", "bigint NOT NULL"),
        ("columns_added", "bigint NOT NULL"),
        ("first_received_at", "timestamptz"),
        ("last_received_at", "timestamptz"),
    ],
    primary_key: &["table_name", "minute"],
};

/// `INSERT` of `rows` rows of [`LOADS`] (parameters in its column order, row by row) that adds
/// to a row of the same table and minute where there is one: counts are summed, the first
/// received time is the earlier and the last the later (a NULL one counts as unknown). The
/// same text on PostgreSQL and SQLite (whose timestamps are text of one fixed format, so they
/// compare as times).
pub fn upsert_loads_sql(dialect: Dialect, schema: &str, rows: &Rows<'_>) -> String {
    let pick = |c: &str, newer: &str| {
        let c = quote_ident(c);
        format!(
            "{c} = CASE WHEN excluded.{c} IS NULL THEN t.{c} \
             WHEN t.{c} IS NULL OR excluded.{c} {newer} t.{c} THEN excluded.{c} ELSE t.{c} END"
        )
    };
    LOADS.adding_upsert_sql(
        dialect,
        schema,
        rows,
        &["rows_loaded", "rows_rejected", "columns_added"],
        &[
            pick("first_received_at", "<"),
            pick("last_received_at", ">"),
        ],
    )
}

/// Refused requests per minute, route and reason, added to by every replica (see
/// [`crate::refused`]); the operator reports the last hour's in the `SegmentIntegration`
/// status.
pub const REFUSALS_TABLE: &str = "_sdc_refusals";

/// `_sdc_refusals`: per minute (UTC, its start), route and reason code, how many requests were
/// refused.
pub const REFUSALS: SystemTable = SystemTable {
    name: REFUSALS_TABLE,
    columns: &[
        ("minute", "timestamptz NOT NULL"),
        ("route", "text NOT NULL"),
        ("reason", "text NOT NULL"),
        ("refused", "bigint NOT NULL"),
    ],
    primary_key: &["minute", "route", "reason"],
};

/// `INSERT` of `rows` rows of [`REFUSALS`] that adds `refused` to a row of the same minute,
/// route and reason where there is one.
pub fn upsert_refusals_sql(dialect: Dialect, schema: &str, rows: usize) -> String {
    REFUSALS.adding_upsert_sql(dialect, schema, &Rows::new(rows), &["refused"], &[])
}

/// Refusals per reason since `$1` (a time), as `(reason, count)`, by reason.
pub fn refusals_since_sql(dialect: Dialect, schema: &str) -> String {
    format!(
        "SELECT {reason}, CAST(sum({refused}) AS bigint) FROM {table} WHERE {minute} >= {since} \
         GROUP BY {reason} ORDER BY {reason}",
        reason = quote_ident("reason"),
        refused = quote_ident("refused"),
        minute = quote_ident("minute"),
        table = qualified(schema, REFUSALS_TABLE),
        since = dialect.placeholder(1),
    )
}

/// Per event table in [`LOADS`], as `(table name, rows loaded since $1, rows rejected since $1,
/// latest last received time)`, by table name: the figures of the operator's loading report.
/// "Since `$1`" (a time) counts the minutes that start at or after it; the latest received time
/// is over every minute, NULL when no row was ever loaded.
pub fn loads_report_sql(dialect: Dialect, schema: &str) -> String {
    let since = |c: &str| {
        format!(
            "CAST(COALESCE(sum(CASE WHEN {minute} >= {p} THEN {c} END), 0) AS bigint)",
            minute = quote_ident("minute"),
            p = dialect.placeholder(1),
            c = quote_ident(c),
        )
    };
    format!(
        "SELECT {name}, {loaded}, {rejected}, max({last}) FROM {table} GROUP BY {name} \
         ORDER BY {name}",
        name = quote_ident("table_name"),
        loaded = since("rows_loaded"),
        rejected = since("rows_rejected"),
        last = quote_ident("last_received_at"),
        table = qualified(schema, LOADS_TABLE),
    )
}

/// The record of user deletion requests carried out.
pub const DELETIONS_TABLE: &str = "_sdc_deletions";

/// `_sdc_deletions`: per deletion request (its message id) and event table, the user whose rows
/// were deleted, how many rows were deleted and when. Never any of the deleted data. A request is
/// recorded in the transaction that deletes its rows, once per message id.
pub const DELETIONS: SystemTable = SystemTable {
    name: DELETIONS_TABLE,
    columns: &[
        ("message_id", "text NOT NULL"),
        ("table_name", "text NOT NULL"),
        ("user_id", "text NOT NULL"),
        ("rows_deleted", "bigint NOT NULL"),
        ("_sdc_deleted_at", "timestamptz NOT NULL"),
    ],
    primary_key: &["message_id", "table_name"],
};

/// `DELETE` of every row of an event table (`track`) or of a table keeping an earlier version
/// of one (`track__v0`) whose `user_id` is `$1`.
pub fn delete_user_rows_sql(dialect: Dialect, schema: &str, table: &str) -> String {
    format!(
        "DELETE FROM {} WHERE {} = {}",
        qualified(schema, table),
        quote_ident("user_id"),
        dialect.placeholder(1)
    )
}

/// `INSERT` of `rows` rows of [`DELETIONS`] (parameters in its column order, row by row); a row
/// already recorded for the same message id and table is kept as it is.
pub fn insert_deletions_sql(dialect: Dialect, schema: &str, rows: usize) -> String {
    let insert = DELETIONS.insert_sql(dialect, schema, DELETIONS.columns.len(), rows);
    format!("{insert} ON CONFLICT DO NOTHING")
}

/// `UPDATE` of the rows deleted (`$1`) in the [`DELETIONS`] row of message id `$2` and table
/// name `$3`.
pub fn count_deletion_sql(dialect: Dialect, schema: &str) -> String {
    format!(
        "UPDATE {} SET {} = {} WHERE {} = {} AND {} = {}",
        qualified(schema, DELETIONS_TABLE),
        quote_ident("rows_deleted"),
        dialect.placeholder(1),
        quote_ident("message_id"),
        dialect.placeholder(2),
        quote_ident("table_name"),
        dialect.placeholder(3)
    )
}

/// The recorded deletion of message id `$1`, as `(table name, user id, rows deleted)`, by table.
pub fn recorded_deletion_sql(dialect: Dialect, schema: &str) -> String {
    format!(
        "{} WHERE {} = {} ORDER BY {}",
        DELETIONS.select_sql(schema, &["table_name", "user_id", "rows_deleted"]),
        quote_ident("message_id"),
        dialect.placeholder(1),
        quote_ident("table_name")
    )
}

/// The table that records each event table's versions: one row per reset.
pub const VERSIONS_TABLE: &str = "_sdc_table_versions";

/// `_sdc_table_versions`: one row per table reset. `version` is the table's version from
/// `reset_at` on (every row loaded since has it in `_sdc_table_version`); `previous_version` the
/// one it ended, whose `previous_rows` rows were kept in `kept_as` (`track__v0`) or dropped
/// (`kept_as` NULL). A table without a row here is at version 0.
pub const VERSIONS: SystemTable = SystemTable {
    name: VERSIONS_TABLE,
    columns: &[
        ("table_name", "text NOT NULL"),
        ("version", "bigint NOT NULL"),
        ("reset_at", "timestamptz NOT NULL"),
        ("previous_version", "bigint NOT NULL"),
        ("kept_as", "text"),
        ("previous_rows", "bigint NOT NULL"),
    ],
    primary_key: &["table_name", "version"],
};

/// `SELECT` of each table's current version (the highest in [`VERSIONS`]): table name, version.
pub fn table_versions_sql(schema: &str) -> String {
    format!(
        "SELECT {0}, max({1}) FROM {2} GROUP BY {0}",
        quote_ident("table_name"),
        quote_ident("version"),
        qualified(schema, VERSIONS_TABLE)
    )
}

/// `SELECT` of the tables that keep the rows of earlier table versions, as recorded in
/// [`VERSIONS`] (`track__v0`, ...), in name order; some may have been dropped by hand since.
pub fn kept_tables_sql(schema: &str) -> String {
    format!(
        "SELECT DISTINCT {0} FROM {1} WHERE {0} IS NOT NULL ORDER BY {0}",
        quote_ident("kept_as"),
        qualified(schema, VERSIONS_TABLE)
    )
}

/// The name the rows of `table` at `version` are kept under when a reset ends that version:
/// `track__v0`. Event tables are named by [`Table::name`] alone, so no other table of Sluice's
/// has this shape.
pub fn kept_table_name(table: Table, version: i64) -> String {
    format!("{}__v{version}", table.name())
}

/// `ALTER TABLE ... RENAME TO ...` for a table or, on PostgreSQL, `ALTER INDEX` for an index
/// (`kind` `TABLE` or `INDEX`), within `schema`.
pub fn rename_sql(kind: &str, schema: &str, from: &str, to: &str) -> String {
    format!(
        "ALTER {kind} {} RENAME TO {}",
        qualified(schema, from),
        quote_ident(to)
    )
}

/// `UPDATE` of a system table's `column` (one naming a table: `table_name`, `object_name`) from
/// the second parameter to the first: the rows that describe a table follow it to its new name.
pub fn rename_rows_sql(
    dialect: Dialect,
    schema: &str,
    system: &SystemTable,
    column: &str,
) -> String {
    let column = quote_ident(column);
    format!(
        "UPDATE {} SET {column} = {} WHERE {column} = {}",
        qualified(schema, system.name),
        dialect.placeholder(1),
        dialect.placeholder(2)
    )
}

/// `DELETE` of a system table's rows whose `table_name` is the first parameter.
pub fn delete_rows_sql(dialect: Dialect, schema: &str, system: &SystemTable) -> String {
    format!(
        "DELETE FROM {} WHERE {} = {}",
        qualified(schema, system.name),
        quote_ident("table_name"),
        dialect.placeholder(1)
    )
}

/// `SELECT count(*)` of a table's rows.
pub fn count_rows_sql(schema: &str, table: &str) -> String {
    format!("SELECT count(*) FROM {}", qualified(schema, table))
}

/// `SELECT` of every record of `_sdc_columns`: table name, column name, key path, column type,
/// split of.
pub fn select_columns_sql(schema: &str) -> String {
    let names = COLUMNS.columns[..5].iter().map(|(name, _)| *name);
    COLUMNS.select_sql(schema, &names.collect::<Vec<_>>())
}

/// A column recorded in `_sdc_columns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnRecord {
    /// The event table.
    pub table: Table,
    /// The column.
    pub column: String,
    /// The key path whose values it holds; `None` for Sluice's system columns.
    pub key_path: Option<KeyPath>,
    /// The type of values it was made for.
    pub column_type: ColumnType,
    /// The first column of the same key path, when this one is a split.
    pub split_of: Option<String>,
}

impl ColumnRecord {
    /// The records of a table's base columns, written when the table is created.
    pub fn base(table: Table) -> Vec<ColumnRecord> {
        base_columns(table)
            .into_iter()
            .map(|c| ColumnRecord {
                table,
                column: c.name.to_owned(),
                key_path: c.key.map(|k| KeyPath::new([k])),
                column_type: c.ty,
                split_of: None,
            })
            .collect()
    }
}

/// `INSERT` of `rows` records into `_sdc_columns`, ignoring ones already there. Parameters, per
/// record in order: table name, column name, key path (JSON text), column type, split of,
/// added at.
pub fn insert_columns_sql(dialect: Dialect, schema: &str, rows: usize) -> String {
    let insert = COLUMNS.insert_sql(dialect, schema, COLUMNS.columns.len(), rows);
    format!("{insert} ON CONFLICT DO NOTHING")
}

/// One column of a key path, as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathColumn {
    /// The column name.
    pub name: String,
    /// Its type in the database (`None` for a type Sluice does not write: altered by hand).
    pub sql_type: Option<ColumnType>,
    /// The type of values it was made for.
    pub made_for: ColumnType,
}

/// The columns of one table: what the database reports, and what `_sdc_columns` records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableColumns {
    /// Every column and its type. A type Sluice never creates (a column someone altered by
    /// hand) is `None`: no value is written to it; values of its key path go to a split.
    pub columns: FxHashMap<String, Option<ColumnType>>,
    /// The columns of each recorded key path: its first column, then its splits.
    pub paths: FxHashMap<KeyPath, Vec<PathColumn>>,
    /// Every column name recorded in `_sdc_columns` (system columns too).
    pub recorded: FxHashSet<String>,
    /// What `_sdc_columns` held for the table when these columns were known to be current (see
    /// [`ColumnsFingerprint`]); `None` when not known.
    pub fingerprint: Option<ColumnsFingerprint>,
    /// [`TableColumns::update_columns`], computed at its first use after the last
    /// [`TableColumns::insert`].
    update_columns: UpdateColumns,
}

/// The cache behind [`TableColumns::update_columns`]. It is derived from `columns`, so it plays
/// no part in comparisons.
#[derive(Debug, Clone, Default)]
struct UpdateColumns(std::sync::OnceLock<Arc<[String]>>);

impl PartialEq for UpdateColumns {
    fn eq(&self, _: &UpdateColumns) -> bool {
        true
    }
}

impl Eq for UpdateColumns {}

/// A cheap summary of a table's rows in `_sdc_columns`: how many, and the latest time one was
/// added (as the database writes it as text). Every column Sluice adds is recorded there in
/// the transaction that adds it, and a reset moves or drops the table's records and records
/// its new base columns, so while the summary is unchanged the table's columns are those known
/// ([`crate::load::Warehouse`] then adds columns without re-reading the catalog).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnsFingerprint {
    /// Rows of the table in `_sdc_columns`.
    pub records: i64,
    /// The latest `_sdc_added_at` among them, as text.
    pub last_added_at: Option<String>,
}

/// `(table_name, records, latest _sdc_added_at as text)` of every table in `_sdc_columns`: the
/// [`ColumnsFingerprint`]s, the same text on PostgreSQL and SQLite.
pub fn columns_fingerprints_sql(schema: &str) -> String {
    let table = quote_ident("table_name");
    let added = quote_ident("_sdc_added_at");
    format!(
        "SELECT {table}, count(*), CAST(max({added}) AS text) FROM {} GROUP BY {table}",
        qualified(schema, COLUMNS_TABLE)
    )
}

impl TableColumns {
    /// The columns of `table` as [`crate::load::Warehouse::ensure_schema`] creates and records
    /// them: its base columns, each holding its Segment key.
    pub fn new_table(table: Table) -> TableColumns {
        let mut columns = TableColumns::default();
        for record in ColumnRecord::base(table) {
            columns.insert(&record, Some(record.column_type));
        }
        columns
    }

    /// The type of `column`, if it exists: `Some(None)` for a type Sluice does not write.
    pub fn get(&self, column: &str) -> Option<Option<ColumnType>> {
        self.columns.get(column).copied()
    }

    /// How many columns the table has.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether the table has no columns (does not exist).
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// Whether a name is free for a new column.
    fn claim(&self, name: &str) -> Claim {
        if self.recorded.contains(name) {
            Claim::Taken
        } else if self.columns.contains_key(name) {
            Claim::Unrecorded
        } else {
            Claim::Free
        }
    }

    /// Every column an upsert overwrites, sorted: all the columns of a type Sluice writes but
    /// the key (`message_id`). Built once per set of columns, not per batch: a table may have
    /// [`COLUMN_LIMIT`] of them. (After changing `columns` directly rather than through
    /// [`TableColumns::insert`], as [`Catalog::from_rows`] does before any use, it is rebuilt
    /// only if it was not used yet.)
    pub fn update_columns(&self) -> Arc<[String]> {
        self.update_columns
            .0
            .get_or_init(|| {
                let mut names: Vec<String> = self
                    .columns
                    .iter()
                    .filter(|(name, ty)| ty.is_some() && name.as_str() != "message_id")
                    .map(|(name, _)| name.clone())
                    .collect();
                names.sort();
                names.into()
            })
            .clone()
    }

    /// Adds a column and its record (as the database will have them once the DDL commits).
    /// Adding a record that is already there changes nothing.
    pub fn insert(&mut self, record: &ColumnRecord, sql_type: Option<ColumnType>) {
        self.update_columns = UpdateColumns::default();
        self.columns.insert(record.column.clone(), sql_type);
        self.recorded.insert(record.column.clone());
        if let Some(path) = &record.key_path {
            let column = PathColumn {
                name: record.column.clone(),
                sql_type,
                made_for: record.column_type,
            };
            let columns = self.paths.entry(path.clone()).or_default();
            if let Some(known) = columns.iter_mut().find(|c| c.name == column.name) {
                *known = column;
                return;
            }
            // The first column of a path comes first, whatever order the records came in.
            if record.split_of.is_none() {
                columns.insert(0, column);
            } else {
                columns.push(column);
            }
        }
    }

    /// The columns to add so that every `(key path, type)` of `needs` has a column that takes
    /// its values, in the order they get them: key paths whose candidate name is clean first
    /// (so `user_id` keeps `properties__user_id` when `userId` arrives with it), then by key
    /// path. A path's first column is named by [`naming::assign`]; a later type gets a split
    /// column (`<first>__st`, ...). Stops at [`COLUMN_LIMIT`] columns: later values go to
    /// `_sdc_overflow`. Pure: the caller runs the DDL and records what this returns.
    pub fn plan_columns(&self, table: Table, needs: &[(KeyPath, ColumnType)]) -> Vec<NewColumn> {
        let mut sorted: Vec<(&KeyPath, ColumnType, (bool, bool))> = needs
            .iter()
            .map(|(path, ty)| {
                let c = naming::candidate(path);
                (path, *ty, (!c.exact, !c.clean))
            })
            .collect();
        sorted.sort_by(|a, b| (a.2, a.0, a.1).cmp(&(b.2, b.0, b.1)));
        sorted.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let mut planned = Planned {
            table: self,
            added: TableColumns::default(),
            new: 0,
        };
        let mut new = Vec::new();
        for (path, ty, _) in sorted {
            // At most two rounds: a first column adopted from before `_sdc_columns` may have
            // another type, and then the value needs a split as well.
            for _ in 0..2 {
                if planned.len() >= COLUMN_LIMIT {
                    return new;
                }
                let served = planned
                    .path_columns(path)
                    .any(|c| c.made_for == ty || c.sql_type.is_some_and(|t| t.accepts(ty)));
                if served {
                    break;
                }
                let split_of = planned.path_columns(path).next().map(|c| c.name.clone());
                let name = match &split_of {
                    None => naming::assign(path, |n| planned.claim(n)),
                    Some(first) => {
                        let split = naming::split_column_name(first, ty);
                        if planned.claim(&split) == Claim::Taken {
                            naming::assign(&KeyPath::new([split.as_str()]), |n| planned.claim(n))
                        } else {
                            split
                        }
                    }
                };
                let adopted = planned.get(&name);
                let record = ColumnRecord {
                    table,
                    column: name,
                    key_path: Some(path.clone()),
                    column_type: adopted.flatten().unwrap_or(ty),
                    split_of,
                };
                let sql_type = adopted.unwrap_or(Some(ty));
                planned.added.insert(&record, sql_type);
                planned.new += usize::from(adopted.is_none());
                new.push(NewColumn {
                    exists: adopted.is_some(),
                    sql_type,
                    record,
                });
            }
        }
        new
    }
}

/// A table's columns with the columns [`TableColumns::plan_columns`] has planned so far on
/// top, without copying the table's (which may be [`COLUMN_LIMIT`] of them).
struct Planned<'a> {
    table: &'a TableColumns,
    added: TableColumns,
    /// Columns of `added` the table does not have (the others are adopted).
    new: usize,
}

impl Planned<'_> {
    fn len(&self) -> usize {
        self.table.len() + self.new
    }

    /// The columns of `path`: the table's first (its first column comes first), then the
    /// planned ones.
    fn path_columns<'p>(&'p self, path: &KeyPath) -> impl Iterator<Item = &'p PathColumn> {
        let table = self.table.paths.get(path).into_iter().flatten();
        table.chain(self.added.paths.get(path).into_iter().flatten())
    }

    fn claim(&self, name: &str) -> Claim {
        match (self.table.claim(name), self.added.claim(name)) {
            (Claim::Taken, _) | (_, Claim::Taken) => Claim::Taken,
            (Claim::Unrecorded, _) | (_, Claim::Unrecorded) => Claim::Unrecorded,
            _ => Claim::Free,
        }
    }

    fn get(&self, column: &str) -> Option<Option<ColumnType>> {
        self.added.get(column).or_else(|| self.table.get(column))
    }
}

/// A column [`TableColumns::plan_columns`] decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewColumn {
    /// What `_sdc_columns` records for it.
    pub record: ColumnRecord,
    /// Whether the column exists already (made before `_sdc_columns` was kept): it is
    /// recorded, not added.
    pub exists: bool,
    /// Its type in the database: the record's, or an adopted column's own (`None` for a type
    /// Sluice does not write).
    pub sql_type: Option<ColumnType>,
}

/// What the database holds for each event table of a schema.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog(pub HashMap<Table, TableColumns>);

impl Catalog {
    /// The columns of `table` (empty if it does not exist).
    pub fn table(&self, table: Table) -> &TableColumns {
        static EMPTY: std::sync::OnceLock<TableColumns> = std::sync::OnceLock::new();
        self.0
            .get(&table)
            .unwrap_or_else(|| EMPTY.get_or_init(TableColumns::default))
    }

    /// Builds a catalog from the database's `(table, column, type)` list and the records of
    /// `_sdc_columns`. Tables other than the event tables are left out.
    pub fn from_rows(
        columns: impl IntoIterator<Item = (String, String, String)>,
        records: impl IntoIterator<Item = ColumnRecord>,
    ) -> Catalog {
        let mut catalog = Catalog::default();
        for (table, column, ty) in columns {
            if let Ok(table) = table.parse::<Table>() {
                catalog
                    .0
                    .entry(table)
                    .or_default()
                    .columns
                    .insert(column, ColumnType::from_catalog(&ty));
            }
        }
        for record in records {
            let Some(columns) = catalog.0.get_mut(&record.table) else {
                continue;
            };
            // A record whose column is gone (dropped by hand) no longer maps its key path.
            if let Some(sql_type) = columns.get(&record.column) {
                columns.insert(&record, sql_type);
            }
        }
        catalog
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::Sqlite => "SQLite",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_inner_quotes() {
        assert_eq!(quote_ident("group"), "\"group\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(qualified("s", "t"), "\"s\".\"t\"");
    }

    #[test]
    fn schema_names_follow_stitch() {
        assert_eq!(
            schema_name_from_display_name("Stitch Segment"),
            "stitch_segment"
        );
        assert_eq!(
            schema_name_from_display_name("  My -- App (prod)! "),
            "my_app_prod"
        );
        assert_eq!(schema_name_from_display_name("2024 events"), "_2024_events");
        assert_eq!(schema_name_from_display_name("!!!"), "segment");
        assert_eq!(schema_name_from_display_name("pg_stuff"), "_pg_stuff");
        for display in ["Stitch Segment", "2024 events", "!!!", &"x".repeat(100)] {
            let name = schema_name_from_display_name(display);
            assert_eq!(validate_schema_name(&name), Ok(()), "{name}");
        }
    }

    #[test]
    fn schema_names_are_validated() {
        for good in ["segment", "_x", "stitch_segment_2"] {
            assert_eq!(validate_schema_name(good), Ok(()));
        }
        for bad in [
            "",
            "Segment",
            "1abc",
            "a-b",
            "a\"b",
            "pg_catalog",
            "information_schema",
            &"a".repeat(64),
        ] {
            assert!(validate_schema_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn system_tables_quote_every_identifier_and_number_parameters_row_by_row() {
        assert_eq!(
            COLUMNS.create_sql("s"),
            "CREATE TABLE IF NOT EXISTS \"s\".\"_sdc_columns\" (\"table_name\" text NOT NULL, \
             \"column_name\" text NOT NULL, \"key_path\" text, \"column_type\" text NOT NULL, \
             \"split_of\" text, \"_sdc_added_at\" timestamptz NOT NULL, \
             PRIMARY KEY (\"table_name\", \"column_name\"))"
        );
        assert_eq!(
            REJECTED.insert_sql(Dialect::Sqlite, "s", 2, 2),
            "INSERT INTO \"s\".\"_sdc_rejected\" (\"_sdc_rejected_at\", \"table_name\") \
             VALUES (?1, ?2), (?3, ?4)"
        );
        assert!(insert_columns_sql(Dialect::Postgres, "s", 2).ends_with(
            "VALUES ($1, $2, $3, $4, $5, $6), ($7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING"
        ));
        assert_eq!(
            COLUMNS.select_sql("a\"b", &["key_path"]),
            "SELECT \"key_path\" FROM \"a\"\"b\".\"_sdc_columns\""
        );
    }

    #[test]
    fn deletion_sql_quotes_identifiers_and_binds_the_user() {
        assert_eq!(
            delete_user_rows_sql(Dialect::Postgres, "a\"b", "group"),
            "DELETE FROM \"a\"\"b\".\"group\" WHERE \"user_id\" = $1"
        );
        assert_eq!(
            delete_user_rows_sql(Dialect::Sqlite, "s", "track__v0"),
            "DELETE FROM \"s\".\"track__v0\" WHERE \"user_id\" = ?1"
        );
        assert!(insert_deletions_sql(Dialect::Postgres, "s", 2).ends_with(
            "VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10) ON CONFLICT DO NOTHING"
        ));
        assert_eq!(
            count_deletion_sql(Dialect::Postgres, "s"),
            "UPDATE \"s\".\"_sdc_deletions\" SET \"rows_deleted\" = $1 \
             WHERE \"message_id\" = $2 AND \"table_name\" = $3"
        );
        assert_eq!(
            recorded_deletion_sql(Dialect::Sqlite, "s"),
            "SELECT \"table_name\", \"user_id\", \"rows_deleted\" FROM \"s\".\"_sdc_deletions\" \
             WHERE \"message_id\" = ?1 ORDER BY \"table_name\""
        );
    }

    #[test]
    fn loads_report_sums_the_period_and_takes_the_latest_received_time_ever() {
        let period = |p: &str, c: &str| {
            format!(
                "CAST(COALESCE(sum(CASE WHEN \"minute\" >= {p} THEN \"{c}\" END), 0) AS bigint)"
            )
        };
        assert_eq!(
            loads_report_sql(Dialect::Postgres, "s\"x"),
            format!(
                "SELECT \"table_name\", {}, {}, max(\"last_received_at\") \
                 FROM \"s\"\"x\".\"_sdc_loads\" GROUP BY \"table_name\" ORDER BY \"table_name\"",
                period("$1", "rows_loaded"),
                period("$1", "rows_rejected")
            )
        );
        assert!(loads_report_sql(Dialect::Sqlite, "s").contains("\"minute\" >= ?1"));
    }

    #[test]
    fn table_ddl_quotes_reserved_words_and_keys_message_id() {
        let sql = create_table_sql("segment", Table::Group, 0);
        assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS \"segment\".\"group\" ("));
        assert!(sql.contains("\"message_id\" text NOT NULL PRIMARY KEY"));
        assert!(sql.contains("\"_sdc_table_version\" bigint DEFAULT 0,"));
        assert!(sql.contains("\"group_id\" text"));
        assert!(sql.contains("\"timestamp\" timestamptz"));
    }

    #[test]
    fn the_loader_writes_every_system_column_but_the_table_version() {
        let written: Vec<&str> = ROW_SYSTEM_COLUMNS.iter().map(|(name, _)| *name).collect();
        let all: Vec<&str> = SYSTEM_COLUMNS.iter().map(|(name, _)| *name).collect();
        assert_eq!(all[..3], written[..]);
        assert_eq!(all[3], TABLE_VERSION_COLUMN);
        assert!(
            create_table_sql("s", Table::Track, 7)
                .contains("\"_sdc_table_version\" bigint DEFAULT 7")
        );
    }

    #[test]
    fn kept_tables_are_named_after_the_version_they_hold() {
        assert_eq!(kept_table_name(Table::Track, 0), "track__v0");
        assert_eq!(kept_table_name(Table::Group, 12), "group__v12");
        assert!(kept_table_name(Table::Track, 3).parse::<Table>().is_err());
    }

    #[test]
    fn reset_statements_quote_every_name() {
        assert_eq!(
            rename_sql("TABLE", "s", "group", "group__v0"),
            "ALTER TABLE \"s\".\"group\" RENAME TO \"group__v0\""
        );
        assert_eq!(
            rename_rows_sql(Dialect::Sqlite, "s", &COLUMNS, "table_name"),
            "UPDATE \"s\".\"_sdc_columns\" SET \"table_name\" = ?1 WHERE \"table_name\" = ?2"
        );
        assert_eq!(
            delete_rows_sql(Dialect::Postgres, "s", &REJECTED),
            "DELETE FROM \"s\".\"_sdc_rejected\" WHERE \"table_name\" = $1"
        );
        assert_eq!(
            table_versions_sql("s"),
            "SELECT \"table_name\", max(\"version\") FROM \"s\".\"_sdc_table_versions\" GROUP BY \"table_name\""
        );
    }

    #[test]
    fn add_columns_quotes_generated_names() {
        let columns = [("x\"; drop", ColumnType::BigInt), ("b", ColumnType::Text)];
        assert_eq!(
            add_columns_sql(Dialect::Postgres, "s", Table::Track, &columns),
            vec![
                "ALTER TABLE \"s\".\"track\" ADD COLUMN \"x\"\"; drop\" bigint, ADD COLUMN \"b\" text"
            ]
        );
        assert_eq!(
            add_columns_sql(Dialect::Sqlite, "s", Table::Track, &columns),
            vec![
                "ALTER TABLE \"s\".\"track\" ADD COLUMN \"x\"\"; drop\" bigint",
                "ALTER TABLE \"s\".\"track\" ADD COLUMN \"b\" text"
            ]
        );
    }

    #[test]
    fn loads_add_to_the_minute_of_their_table() {
        let sql = upsert_loads_sql(Dialect::Postgres, "s", &Rows::new(2));
        assert!(
            sql.starts_with("INSERT INTO \"s\".\"_sdc_loads\" AS t (\"table_name\", \"minute\""),
            "{sql}"
        );
        assert!(sql.contains("($8, $9, $10, $11, $12, $13, $14)"), "{sql}");
        assert!(sql.contains("ON CONFLICT (\"table_name\", \"minute\") DO UPDATE SET"));
        assert!(sql.contains("\"rows_loaded\" = t.\"rows_loaded\" + excluded.\"rows_loaded\""));
        assert!(sql.contains("excluded.\"first_received_at\" < t.\"first_received_at\""));
        assert!(sql.contains("excluded.\"last_received_at\" > t.\"last_received_at\""));
        assert!(upsert_loads_sql(Dialect::Sqlite, "s", &Rows::new(1)).contains("(?1, ?2, ?3"));
        let refusals = upsert_refusals_sql(Dialect::Postgres, "s", 1);
        assert!(
            refusals.ends_with(
                "ON CONFLICT (\"minute\", \"route\", \"reason\") DO UPDATE SET \
                 \"refused\" = t.\"refused\" + excluded.\"refused\""
            ),
            "{refusals}"
        );
    }

    #[test]
    fn catalog_type_names_round_trip() {
        for t in ColumnType::ALL {
            assert_eq!(ColumnType::from_catalog(t.sql()), Some(t));
        }
        assert_eq!(
            ColumnType::from_catalog("timestamp with time zone"),
            Some(ColumnType::Timestamp)
        );
        assert_eq!(ColumnType::from_catalog("numeric"), None);
    }

    fn path(keys: &[&str]) -> KeyPath {
        KeyPath::new(keys.iter().copied())
    }

    #[test]
    fn clean_names_win_among_keys_that_arrive_together() {
        let table = TableColumns::new_table(Table::Track);
        let needs = [
            (path(&["properties", "UserID"]), ColumnType::Text),
            (path(&["properties", "userId"]), ColumnType::Text),
            (path(&["properties", "user_id"]), ColumnType::Text),
            (path(&["user_id"]), ColumnType::Text),
            (path(&["xmin"]), ColumnType::BigInt),
        ];
        let new = table.plan_columns(Table::Track, &needs);
        let name = |keys: &[&str]| {
            new.iter()
                .find(|c| c.record.key_path == Some(path(keys)))
                .map(|c| c.record.column.clone())
                .expect("planned")
        };
        assert_eq!(name(&["properties", "user_id"]), "properties__user_id");
        assert!(name(&["properties", "userId"]).starts_with("properties__user_id_"));
        assert!(name(&["properties", "UserID"]).starts_with("properties__user_id_"));
        assert_ne!(
            name(&["properties", "userId"]),
            name(&["properties", "UserID"])
        );
        // The top-level `userId` holds `user_id`; a client's own `user_id` key gets a hash.
        assert!(name(&["user_id"]).starts_with("user_id_"));
        assert!(name(&["xmin"]).starts_with("xmin_"));
    }

    #[test]
    fn a_new_key_with_two_types_gets_its_column_and_a_split_in_one_plan() {
        let table = TableColumns::new_table(Table::Track);
        let p = path(&["properties", "seats"]);
        let new = table.plan_columns(
            Table::Track,
            &[
                (p.clone(), ColumnType::BigInt),
                (p.clone(), ColumnType::Text),
            ],
        );
        assert_eq!(new.len(), 2, "{new:?}");
        let first = new
            .iter()
            .find(|c| c.record.split_of.is_none())
            .expect("first");
        let split = new
            .iter()
            .find(|c| c.record.split_of.is_some())
            .expect("split");
        assert_eq!(first.record.column, "properties__seats");
        assert_eq!(split.record.split_of.as_deref(), Some("properties__seats"));
        assert!(split.record.column.starts_with("properties__seats__"));
    }

    #[test]
    fn update_columns_follow_inserts_and_a_record_added_twice_counts_once() {
        let mut table = TableColumns::new_table(Table::Track);
        let before = table.update_columns();
        assert!(!before.contains(&"message_id".to_owned()));
        let p = path(&["properties", "plan"]);
        let new = table.plan_columns(Table::Track, &[(p.clone(), ColumnType::Text)]);
        for _ in 0..2 {
            table.insert(&new[0].record, Some(ColumnType::Text));
        }
        let after = table.update_columns();
        assert_eq!(after.len(), before.len() + 1);
        assert!(after.contains(&"properties__plan".to_owned()));
        assert!(after.windows(2).all(|w| w[0] < w[1]), "sorted: {after:?}");
        assert_eq!(table.paths[&p].len(), 1);
    }

    #[test]
    fn a_second_type_gets_a_split_of_the_first_column() {
        let mut table = TableColumns::new_table(Table::Track);
        let p = path(&["properties", "seats"]);
        for record in table.plan_columns(Table::Track, &[(p.clone(), ColumnType::BigInt)]) {
            table.insert(&record.record, Some(record.record.column_type));
        }
        let new = table.plan_columns(
            Table::Track,
            &[
                (p.clone(), ColumnType::Text),
                (p.clone(), ColumnType::Double),
            ],
        );
        let names: Vec<(&str, Option<&str>)> = new
            .iter()
            .map(|c| (c.record.column.as_str(), c.record.split_of.as_deref()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("properties__seats__st", Some("properties__seats")),
                ("properties__seats__do", Some("properties__seats"))
            ]
        );
        // An integer in a double column needs nothing new.
        let mut doubles = TableColumns::new_table(Table::Track);
        for record in doubles.plan_columns(Table::Track, &[(p.clone(), ColumnType::Double)]) {
            doubles.insert(&record.record, Some(record.record.column_type));
        }
        assert!(
            doubles
                .plan_columns(Table::Track, &[(p, ColumnType::BigInt)])
                .is_empty()
        );
    }

    #[test]
    fn columns_made_before_the_record_was_kept_are_adopted() {
        let mut table = TableColumns::new_table(Table::Track);
        table
            .columns
            .insert("properties__plan".to_owned(), Some(ColumnType::Text));
        let new = table.plan_columns(
            Table::Track,
            &[(path(&["properties", "plan"]), ColumnType::Text)],
        );
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].record.column, "properties__plan");
        assert!(new[0].exists);
    }

    #[test]
    fn planning_stops_at_the_column_limit() {
        let mut table = TableColumns::new_table(Table::Identify);
        let needs: Vec<(KeyPath, ColumnType)> = (0..2000)
            .map(|i| {
                (
                    path(&["traits", &format!("attr_{i:04}")]),
                    ColumnType::BigInt,
                )
            })
            .collect();
        let new = table.plan_columns(Table::Identify, &needs);
        assert_eq!(new.len() + table.len(), COLUMN_LIMIT);
        for record in &new {
            table.insert(&record.record, Some(ColumnType::BigInt));
        }
        assert!(table.plan_columns(Table::Identify, &needs).is_empty());
    }

    #[test]
    fn records_round_trip_through_the_catalog() {
        let table = TableColumns::new_table(Table::Group);
        let columns = table.columns.iter().map(|(c, t)| {
            (
                "group".to_owned(),
                c.clone(),
                t.map(|t| t.sql()).unwrap_or("x").to_owned(),
            )
        });
        let catalog = Catalog::from_rows(columns, ColumnRecord::base(Table::Group));
        assert_eq!(catalog.table(Table::Group), &table);
        assert_eq!(
            catalog.table(Table::Group).paths[&path(&["groupId"])][0].name,
            "group_id"
        );
    }
}

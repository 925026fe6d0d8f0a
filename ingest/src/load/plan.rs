//! Placing a batch of records onto the columns a table has: the pure half of loading.
//!
//! A value goes to the column its key path holds (`_sdc_columns`) when that column's type takes
//! it; otherwise to the path's split column for its type (`name__st`, `name__bi`, ...). A key
//! path or type without a column yet is reported as missing, so the writer can add the columns
//! and plan again. Two limits send values to the table's `_sdc_overflow` JSON column instead,
//! so that nothing is dropped:
//!
//! - a table stops growing at [`COLUMN_LIMIT`] columns, and a record whose columns the
//!   database refused adds none ([`Item::adds_columns`]);
//! - a row holds at most [`ROW_BYTES_LIMIT`] bytes of values that PostgreSQL cannot move out of
//!   the row (8 per number, boolean or timestamp; at most 24 per text or JSON value, see
//!   [`SqlValue::row_bytes`]). PostgreSQL refuses rows over 8160 bytes ("row is too big"); the
//!   margin covers the row header and the null bitmap. Segment's own fields (`messageId`,
//!   `userId`, `event`, the timestamps, ...) always get their columns; the other values are
//!   placed in key order until the limit, and the rest of the row goes to `_sdc_overflow`.
//!
//! `_sdc_overflow` holds the values in their original shape: `{"traits": {"attr_1999": 1999}}`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::event::Table;
use crate::json;
use crate::naming::KeyPath;
use crate::normalize::{Record, SqlValue};
use crate::schema::{
    COLUMN_LIMIT, Catalog, ColumnType, OVERFLOW_COLUMN, ROW_SYSTEM_COLUMNS, TableColumns,
    base_columns,
};

/// The most bytes of values a row keeps in columns that cannot be moved out of the row (see
/// the module documentation).
pub const ROW_BYTES_LIMIT: usize = 7000;

/// A record on its way to the database, with what the receiver knew of it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The flattened event.
    pub record: Record,
    /// When the HTTP request carrying it arrived.
    pub received_at: DateTime<Utc>,
    /// Load order (`_sdc_sequence`): increases with arrival, so the newest redelivery wins.
    pub sequence: i64,
    /// The event exactly as it was received, kept for `_sdc_rejected`.
    pub raw: Bytes,
    /// Whether the record may add columns. Cleared when the database refused the columns it
    /// asked for: its values without a column then go to `_sdc_overflow`, so the record still
    /// loads and cannot fail its batch again.
    pub adds_columns: bool,
}

/// The rows of one table in a batch, column-aligned and ready to insert. Values are borrowed
/// from the batch's items where they need no conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRows<'a> {
    /// The table.
    pub table: Table,
    /// The columns written, with the type of each column in the database.
    pub columns: Vec<(String, ColumnType)>,
    /// One entry per row, aligned with `columns`.
    pub rows: Vec<Vec<Option<Cow<'a, SqlValue>>>>,
    /// For each row, the index of its item in the batch.
    pub items: Vec<usize>,
    /// Every column an upsert overwrites: all the table's columns of a type Sluice writes,
    /// but the key. Columns absent from a redelivered event become NULL, so the row is exactly
    /// the latest version of the event. Shared with the catalog
    /// ([`crate::schema::TableColumns::update_columns`]).
    pub update_columns: Arc<[String]>,
}

impl<'a> TableRows<'a> {
    /// `rows` (with their items' indexes in the batch) in place of these rows, with the same
    /// columns: a record loaded alone, or the redeliveries of a batch.
    pub fn with_rows(
        &self,
        rows: Vec<Vec<Option<Cow<'a, SqlValue>>>>,
        items: Vec<usize>,
    ) -> TableRows<'a> {
        TableRows {
            table: self.table,
            columns: self.columns.clone(),
            rows,
            items,
            update_columns: self.update_columns.clone(),
        }
    }
}

/// Columns that must be added before a batch can be written: per table, the key paths and the
/// types of values that have no column yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evolution(pub Vec<(Table, Vec<(KeyPath, ColumnType)>)>);

/// Plans a whole batch. Items are expected deduplicated (see [`dedup`]).
pub fn plan<'a>(
    catalog: &Catalog,
    items: &'a [Item],
    batched_at: DateTime<Utc>,
) -> Result<Vec<TableRows<'a>>, Evolution> {
    plan_with_budgets(catalog, items, batched_at, &BTreeMap::new())
}

/// [`plan`] with a column budget per table (the column selection's `maxColumns`; a table not
/// named has [`COLUMN_LIMIT`]): a table stops growing columns at its budget, and later keys go
/// to `_sdc_overflow`.
pub fn plan_with_budgets<'a>(
    catalog: &Catalog,
    items: &'a [Item],
    batched_at: DateTime<Utc>,
    budgets: &BTreeMap<Table, usize>,
) -> Result<Vec<TableRows<'a>>, Evolution> {
    let mut by_table: HashMap<Table, Vec<usize>> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        by_table.entry(item.record.table).or_default().push(i);
    }
    let mut tables: Vec<Table> = by_table.keys().copied().collect();
    tables.sort();
    let mut planned = Vec::new();
    let mut evolution = Evolution::default();
    for table in tables {
        match plan_table(
            table,
            catalog.table(table),
            items,
            &by_table[&table],
            batched_at,
            budgets.get(&table).copied().unwrap_or(COLUMN_LIMIT),
        ) {
            Ok(rows) => planned.push(rows),
            Err(missing) => evolution.0.push((table, missing)),
        }
    }
    if evolution.0.is_empty() {
        Ok(planned)
    } else {
        Err(evolution)
    }
}

/// Keeps one item per table and `message_id`: the one with the highest sequence. A statement
/// may not touch the same key twice, and the newest version is the one to keep.
pub fn dedup(items: Vec<Item>) -> Vec<Item> {
    let mut newest: HashMap<(Table, String), usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let key = (item.record.table, item.record.message_id.clone());
        match newest.get(&key) {
            Some(&j) if items[j].sequence >= item.sequence => {}
            _ => {
                newest.insert(key, i);
            }
        }
    }
    let mut keep: Vec<usize> = newest.into_values().collect();
    keep.sort_unstable();
    let mut items: Vec<Option<Item>> = items.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| items[i].take()).collect()
}

/// Where the values of one key path and type go.
#[derive(Debug, Clone, Copy)]
enum Target<'c> {
    /// A column that exists, with its type.
    Column(&'c str, ColumnType),
    /// No column yet; the table has room for one.
    Missing,
    /// No column, and none can be added.
    Overflow,
}

/// A placement decided once per key path and type, then used for every row.
#[derive(Debug, Clone, Copy)]
struct Placement<'c> {
    target: Target<'c>,
    /// Whether the value is one of Segment's own top-level fields, placed whatever the row's
    /// size.
    base: bool,
    /// The target column's position in the statement, once a value has gone there.
    position: Option<usize>,
}

fn plan_table<'a, 'c>(
    table: Table,
    existing: &'c TableColumns,
    items: &'a [Item],
    indexes: &[usize],
    batched_at: DateTime<Utc>,
    budget: usize,
) -> Result<TableRows<'a>, Vec<(KeyPath, ColumnType)>> {
    let base_keys: Vec<&'static str> = base_columns(table).iter().filter_map(|c| c.key).collect();
    let mut missing: Vec<(KeyPath, ColumnType)> = Vec::new();
    let mut missing_seen: FxHashSet<(&'a KeyPath, ColumnType)> = FxHashSet::default();
    let mut columns: Vec<(String, ColumnType)> = Vec::new();
    let mut positions: FxHashMap<&str, usize> = FxHashMap::default();
    let mut position = |name: &'c str, ty: ColumnType, columns: &mut Vec<(String, ColumnType)>| {
        *positions.entry(name).or_insert_with(|| {
            columns.push((name.to_owned(), ty));
            columns.len() - 1
        })
    };
    let mut placed_at: FxHashMap<(&'a KeyPath, ColumnType), Placement<'c>> = FxHashMap::default();
    let mut sparse_rows: Vec<Vec<(usize, Cow<'a, SqlValue>)>> = Vec::with_capacity(indexes.len());
    let system_positions: Vec<usize> = ROW_SYSTEM_COLUMNS
        .iter()
        .map(|(name, ty)| position(name, *ty, &mut columns))
        .collect();
    for &i in indexes {
        let item = &items[i];
        let mut row = Vec::with_capacity(item.record.fields.len() + 5);
        let system_values = [
            SqlValue::Timestamp(item.received_at),
            SqlValue::Timestamp(batched_at),
            SqlValue::BigInt(item.sequence),
        ];
        // The table version, which the table fills in, takes 8 bytes of the row as well.
        let mut row_bytes = (system_values.len() + 1) * 8;
        for (p, value) in system_positions.iter().zip(system_values) {
            row.push((*p, Cow::Owned(value)));
        }
        let mut overflow: Vec<(&'a KeyPath, &'a SqlValue)> = Vec::new();
        for field in &item.record.fields {
            let ty = field.value.column_type();
            let placement = placed_at.entry((&field.path, ty)).or_insert_with(|| {
                let room = existing.len() + missing.len() < budget;
                Placement {
                    target: target(existing, &field.path, ty, room),
                    base: is_base_key(&field.path, &base_keys),
                    position: None,
                }
            });
            let fits = placement.base || row_bytes + field.value.row_bytes() <= ROW_BYTES_LIMIT;
            match placement.target {
                Target::Column(name, column_ty) if fits => {
                    row_bytes += field.value.row_bytes();
                    let p = *placement
                        .position
                        .get_or_insert_with(|| position(name, column_ty, &mut columns));
                    row.push((p, coerce(Cow::Borrowed(&field.value), column_ty)));
                }
                Target::Missing if fits && item.adds_columns => {
                    row_bytes += field.value.row_bytes();
                    if missing_seen.insert((&field.path, ty)) {
                        missing.push((field.path.clone(), ty));
                    }
                }
                _ => overflow.push((&field.path, &field.value)),
            }
        }
        if !overflow.is_empty() {
            let p = position(OVERFLOW_COLUMN, ColumnType::Json, &mut columns);
            row.push((p, Cow::Owned(SqlValue::Json(overflow_json(&overflow)))));
        }
        sparse_rows.push(row);
    }
    if !missing.is_empty() {
        return Err(missing);
    }
    let rows = sparse_rows
        .into_iter()
        .map(|row| {
            let mut dense = vec![None; columns.len()];
            for (position, value) in row {
                dense[position] = Some(value);
            }
            dense
        })
        .collect();
    Ok(TableRows {
        table,
        columns,
        rows,
        items: indexes.to_vec(),
        update_columns: existing.update_columns(),
    })
}

/// Whether a key path is one of the table's Segment fields (`messageId`, `userId`, ...).
fn is_base_key(path: &KeyPath, base_keys: &[&str]) -> bool {
    let mut keys = path.keys();
    matches!((keys.next(), keys.next()), (Some(key), None) if base_keys.contains(&key))
}

/// Where values of type `ty` at `path` go, given the table's columns. `room` says whether the
/// table may grow another column.
fn target<'c>(
    existing: &'c TableColumns,
    path: &KeyPath,
    ty: ColumnType,
    room: bool,
) -> Target<'c> {
    match existing.paths.get(path) {
        Some(columns) => {
            if let Some((name, column_ty)) = columns.iter().find_map(|c| {
                c.sql_type
                    .filter(|t| t.accepts(ty))
                    .map(|t| (c.name.as_str(), t))
            }) {
                Target::Column(name, column_ty)
            } else if columns.iter().any(|c| c.made_for == ty) || !room {
                // Its column for this type was altered to another type by hand, or the table
                // is full.
                Target::Overflow
            } else {
                Target::Missing
            }
        }
        None if room => Target::Missing,
        None => Target::Overflow,
    }
}

fn coerce(value: Cow<'_, SqlValue>, column: ColumnType) -> Cow<'_, SqlValue> {
    match (value.as_ref(), column) {
        (SqlValue::BigInt(i), ColumnType::Double) => Cow::Owned(SqlValue::Double(*i as f64)),
        _ => value,
    }
}

/// The overflow column's JSON: the values nested under their keys as in the event. `values`
/// come in the record's order, in which the leaves of one object are adjacent.
fn overflow_json(values: &[(&KeyPath, &SqlValue)]) -> String {
    let mut out = b"{".to_vec();
    let mut open: Vec<&str> = Vec::new();
    let mut first = true;
    for (path, value) in values {
        let keys: Vec<&str> = path.keys().collect();
        let (leaf, parents) = keys.split_last().unwrap_or((&"", &[]));
        let shared = open.iter().zip(parents).take_while(|(a, b)| a == b).count();
        while open.len() > shared {
            open.pop();
            out.push(b'}');
            first = false;
        }
        for key in &parents[shared..] {
            if !first {
                out.push(b',');
            }
            json::write_string(key, &mut out);
            out.extend_from_slice(b":{");
            open.push(key);
            first = true;
        }
        if !first {
            out.push(b',');
        }
        json::write_string(leaf, &mut out);
        out.push(b':');
        value.write_json(&mut out);
        first = false;
    }
    // The objects still open, and the outer one.
    out.extend(std::iter::repeat_n(b'}', open.len() + 1));
    json::utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Call, validate};
    use crate::normalize::normalize;
    use serde_json::{Value, json};

    fn item(event: Value, sequence: i64) -> Item {
        let envelope = validate(&event).expect("valid");
        let Call::Load(table) = envelope.call else {
            panic!()
        };
        let record = normalize(table, &envelope, event.as_object().expect("object").clone());
        Item {
            record,
            received_at: Utc::now(),
            sequence,
            raw: Bytes::from(event.to_string()),
            adds_columns: true,
        }
    }

    fn path(keys: &[&str]) -> KeyPath {
        KeyPath::new(keys.iter().copied())
    }

    /// A new table's catalog with columns for `extra` key paths, as the loader records them.
    fn catalog_with(table: Table, extra: &[(&[&str], ColumnType)]) -> Catalog {
        let mut columns = TableColumns::new_table(table);
        // One at a time, as events arriving one after the other would add them.
        for (keys, ty) in extra {
            for new in columns.plan_columns(table, &[(path(keys), *ty)]) {
                columns.insert(&new.record, Some(new.record.column_type));
            }
        }
        Catalog(HashMap::from([(table, columns)]))
    }

    fn track(props: Value) -> Value {
        json!({"type": "track", "messageId": "m1", "userId": "u", "event": "E", "properties": props})
    }

    fn value<'r>(rows: &'r TableRows<'_>, column: &str) -> Option<&'r SqlValue> {
        let pos = rows.columns.iter().position(|(c, _)| c == column)?;
        rows.rows[0][pos].as_deref()
    }

    #[test]
    fn new_keys_are_reported_missing() {
        let catalog = catalog_with(Table::Track, &[]);
        let items = [item(track(json!({"plan": "pro", "seats": 3})), 1)];
        let evolution = plan(&catalog, &items, Utc::now()).expect_err("needs columns");
        assert_eq!(
            evolution.0,
            vec![(
                Table::Track,
                vec![
                    (path(&["properties", "plan"]), ColumnType::Text),
                    (path(&["properties", "seats"]), ColumnType::BigInt)
                ]
            )]
        );
    }

    #[test]
    fn conflicting_type_goes_to_split_column() {
        let seats: &[&str] = &["properties", "seats"];
        let catalog = catalog_with(Table::Track, &[(seats, ColumnType::BigInt)]);
        let items = [item(track(json!({"seats": "three"})), 1)];
        let evolution = plan(&catalog, &items, Utc::now()).expect_err("needs split");
        assert_eq!(evolution.0[0].1, vec![(path(seats), ColumnType::Text)]);
        let catalog = catalog_with(
            Table::Track,
            &[(seats, ColumnType::BigInt), (seats, ColumnType::Text)],
        );
        let rows = plan(&catalog, &items, Utc::now()).expect("planned");
        assert_eq!(
            value(&rows[0], "properties__seats__st"),
            Some(&SqlValue::Text("three".into()))
        );
        assert_eq!(value(&rows[0], "properties__seats"), None);
    }

    #[test]
    fn integers_widen_into_double_columns() {
        let catalog = catalog_with(
            Table::Track,
            &[(&["properties", "price"], ColumnType::Double)],
        );
        let items = [item(track(json!({"price": 10})), 1)];
        let rows = plan(&catalog, &items, Utc::now()).expect("planned");
        assert_eq!(
            value(&rows[0], "properties__price"),
            Some(&SqlValue::Double(10.0))
        );
    }

    #[test]
    fn full_table_overflows_into_json_in_the_events_shape() {
        let mut catalog = catalog_with(Table::Track, &[]);
        let columns = catalog.0.get_mut(&Table::Track).expect("table");
        while columns.len() < COLUMN_LIMIT {
            let name = format!("c{}", columns.len());
            columns.columns.insert(name, Some(ColumnType::Text));
        }
        let items = [item(
            track(
                json!({"brand_new": "kept", "deep": {"a": 1, "b": {"c": f64::NAN.to_string()}}, "z": true}),
            ),
            1,
        )];
        let rows = plan(&catalog, &items, Utc::now()).expect("no new columns past the limit");
        let Some(SqlValue::Json(text)) = value(&rows[0], OVERFLOW_COLUMN) else {
            panic!("overflow is json")
        };
        let overflow: Value = serde_json::from_str(text).expect("json");
        assert_eq!(
            overflow,
            json!({"properties": {"brand_new": "kept", "deep": {"a": 1, "b": {"c": "NaN"}}, "z": true}})
        );
    }

    #[test]
    fn wide_rows_keep_their_first_values_in_columns_and_the_rest_in_overflow() {
        let traits: serde_json::Map<String, Value> = (0..2000)
            .map(|i| (format!("attr_{i:04}"), json!(i)))
            .collect();
        let event =
            json!({"type": "identify", "messageId": "wide", "userId": "u", "traits": traits});
        let items = [item(event, 1)];
        let catalog = catalog_with(Table::Identify, &[]);
        let Err(evolution) = plan(&catalog, &items, Utc::now()) else {
            panic!("needs columns")
        };
        let wanted = evolution.0[0].1.len();
        assert!((700..900).contains(&wanted), "{wanted} columns asked for");
        let with: Vec<(Vec<String>, ColumnType)> = evolution.0[0]
            .1
            .iter()
            .map(|(p, t)| (p.keys().map(str::to_owned).collect(), *t))
            .collect();
        let refs: Vec<(Vec<&str>, ColumnType)> = with
            .iter()
            .map(|(k, t)| (k.iter().map(String::as_str).collect(), *t))
            .collect();
        let extra: Vec<(&[&str], ColumnType)> = refs.iter().map(|(k, t)| (&k[..], *t)).collect();
        let catalog = catalog_with(Table::Identify, &extra);
        let rows = plan(&catalog, &items, Utc::now()).expect("planned");
        let placed = rows[0].rows[0].iter().filter(|v| v.is_some()).count();
        let Some(SqlValue::Json(text)) = value(&rows[0], OVERFLOW_COLUMN) else {
            panic!("overflow")
        };
        let overflow: Value = serde_json::from_str(text).expect("json");
        let spilled = overflow["traits"].as_object().expect("traits").len();
        assert_eq!(wanted + spilled, 2000);
        assert_eq!(overflow["traits"]["attr_1999"], json!(1999));
        assert!(
            placed > wanted,
            "message_id and the system columns are placed too"
        );
        assert_eq!(
            value(&rows[0], "message_id"),
            Some(&SqlValue::Text("wide".into()))
        );
    }

    #[test]
    fn a_record_that_may_not_add_columns_overflows_its_new_keys() {
        let catalog = catalog_with(
            Table::Track,
            &[(&["properties", "known"], ColumnType::Text)],
        );
        let mut refused = item(track(json!({"known": "k", "new": 1})), 1);
        refused.adds_columns = false;
        let items = [refused];
        let rows = plan(&catalog, &items, Utc::now()).expect("nothing to add");
        assert_eq!(
            value(&rows[0], "properties__known"),
            Some(&SqlValue::Text("k".into()))
        );
        let Some(SqlValue::Json(text)) = value(&rows[0], OVERFLOW_COLUMN) else {
            panic!("overflow")
        };
        assert_eq!(text, r#"{"properties":{"new":1}}"#);
    }

    #[test]
    fn dedup_keeps_newest_per_table_and_key() {
        let a1 = item(track(json!({"v": 1})), 1);
        let a2 = item(track(json!({"v": 2})), 2);
        let mut other = item(json!({"type": "page", "messageId": "m1", "userId": "u"}), 3);
        other.record.message_id = "m1".into();
        let kept = dedup(vec![a2, a1, other]);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].sequence, 2);
        assert_eq!(kept[1].record.table, Table::Page);
    }

    #[test]
    fn upsert_overwrites_every_known_column_but_the_key() {
        let catalog = catalog_with(Table::Track, &[(&["properties", "old"], ColumnType::Text)]);
        let items = [item(track(json!({"old": "v"})), 1)];
        let rows = plan(&catalog, &items, Utc::now()).expect("planned");
        assert!(
            rows[0]
                .update_columns
                .contains(&"properties__old".to_owned())
        );
        assert!(!rows[0].update_columns.contains(&"message_id".to_owned()));
    }
}

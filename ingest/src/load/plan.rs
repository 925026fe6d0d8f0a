//! Placing a batch of records onto the columns a table has: the pure half of loading.
//!
//! A value goes to the column of its name when that column's type accepts it; otherwise to the
//! split column (`name__st`, `name__bi`, ...). A column that does not exist yet is reported as
//! missing, so the writer can add it and plan again. Once a table has [`COLUMN_LIMIT`] columns,
//! new keys go to its `_sdc_overflow` JSON column instead: nothing is dropped.

use std::borrow::Cow;
use std::collections::HashMap;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;
use serde_json::Map;

use crate::event::Table;
use crate::normalize::{ColumnType, Record, SqlValue, split_column_name};
use crate::schema::{COLUMN_LIMIT, Catalog, OVERFLOW_COLUMN, TableColumns};

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
    /// the latest version of the event.
    pub update_columns: Vec<String>,
}

/// Columns that must be added before a batch can be written, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evolution(pub Vec<(Table, Vec<(String, ColumnType)>)>);

/// Plans a whole batch. Items are expected deduplicated (see [`dedup`]).
pub fn plan<'a>(
    catalog: &Catalog,
    items: &'a [Item],
    batched_at: DateTime<Utc>,
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

enum Target<'a> {
    Column(Cow<'a, str>, ColumnType),
    Overflow,
}

fn plan_table<'a>(
    table: Table,
    existing: &TableColumns,
    items: &'a [Item],
    indexes: &[usize],
    batched_at: DateTime<Utc>,
) -> Result<TableRows<'a>, Vec<(String, ColumnType)>> {
    let mut missing: Vec<(String, ColumnType)> = Vec::new();
    let mut columns: Vec<(String, ColumnType)> = Vec::new();
    let mut positions: FxHashMap<String, usize> = FxHashMap::default();
    let mut placed_at: FxHashMap<(&'a str, ColumnType), Option<(usize, ColumnType)>> =
        FxHashMap::default();
    let mut sparse_rows: Vec<Vec<(usize, Cow<'a, SqlValue>)>> = Vec::with_capacity(indexes.len());
    for &i in indexes {
        let item = &items[i];
        let mut row = Vec::with_capacity(item.record.fields.len() + 4);
        let mut overflow = Map::new();
        let system = [
            ("_sdc_received_at", SqlValue::Timestamp(item.received_at)),
            ("_sdc_batched_at", SqlValue::Timestamp(batched_at)),
            ("_sdc_sequence", SqlValue::BigInt(item.sequence)),
            ("_sdc_table_version", SqlValue::BigInt(0)),
        ];
        let fields = item
            .record
            .fields
            .iter()
            .map(|f| (f.column.as_str(), Cow::Borrowed(&f.value)))
            .chain(system.into_iter().map(|(c, v)| (c, Cow::Owned(v))));
        for (column, value) in fields {
            let ty = value.column_type();
            // Each distinct (name, type) is placed once per batch, not once per row.
            let placed = match placed_at.get(&(column, ty)) {
                Some(&placed) => placed,
                None => {
                    let placed = match target(existing, &mut missing, column, ty) {
                        Target::Column(name, column_ty) => {
                            let position = match positions.get(name.as_ref()) {
                                Some(&p) => p,
                                None => {
                                    positions.insert(name.to_string(), columns.len());
                                    columns.push((name.into_owned(), column_ty));
                                    columns.len() - 1
                                }
                            };
                            Some((position, column_ty))
                        }
                        Target::Overflow => None,
                    };
                    placed_at.insert((column, ty), placed);
                    placed
                }
            };
            match placed {
                Some((position, column_ty)) => row.push((position, coerce(value, column_ty))),
                None => {
                    overflow.insert(column.to_owned(), value.to_json());
                }
            }
        }
        if !overflow.is_empty() {
            let value = SqlValue::Json(serde_json::Value::Object(overflow).to_string());
            let position = match positions.get(OVERFLOW_COLUMN) {
                Some(&p) => p,
                None => {
                    positions.insert(OVERFLOW_COLUMN.to_owned(), columns.len());
                    // A base column; if someone dropped it, it is missing and added back.
                    if existing.get(OVERFLOW_COLUMN).is_none() {
                        missing.push((OVERFLOW_COLUMN.to_owned(), ColumnType::Json));
                    }
                    columns.push((OVERFLOW_COLUMN.to_owned(), ColumnType::Json));
                    columns.len() - 1
                }
            };
            row.push((position, Cow::Owned(value)));
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
    let mut update_columns: Vec<String> = existing
        .0
        .iter()
        .filter(|(name, ty)| ty.is_some() && name.as_str() != "message_id")
        .map(|(name, _)| name.clone())
        .collect();
    update_columns.sort();
    Ok(TableRows {
        table,
        columns,
        rows,
        items: indexes.to_vec(),
        update_columns,
    })
}

/// Where a value of type `ty` for `column` goes, given the table's columns and those already
/// found missing in this batch.
fn target<'a>(
    existing: &TableColumns,
    missing: &mut Vec<(String, ColumnType)>,
    column: &'a str,
    ty: ColumnType,
) -> Target<'a> {
    let lookup = |name: &str, missing: &[(String, ColumnType)]| {
        existing.get(name).or_else(|| {
            missing
                .iter()
                .find(|(m, _)| m == name)
                .map(|(_, t)| Some(*t))
        })
    };
    let name: Cow<'a, str> = match lookup(column, missing) {
        Some(Some(existing_ty)) if existing_ty.accepts(ty) => {
            return Target::Column(Cow::Borrowed(column), existing_ty);
        }
        None => Cow::Borrowed(column),
        Some(_) => {
            let split = split_column_name(column, ty);
            match lookup(&split, missing) {
                Some(Some(existing_ty)) if existing_ty.accepts(ty) => {
                    return Target::Column(Cow::Owned(split), existing_ty);
                }
                None => Cow::Owned(split),
                Some(_) => return Target::Overflow,
            }
        }
    };
    if existing.len() + missing.len() < COLUMN_LIMIT {
        missing.push((name.to_string(), ty));
        // Planned as if present; the batch is planned again once the column exists.
        Target::Column(name, ty)
    } else {
        Target::Overflow
    }
}

fn coerce(value: Cow<'_, SqlValue>, column: ColumnType) -> Cow<'_, SqlValue> {
    match (value.as_ref(), column) {
        (SqlValue::BigInt(i), ColumnType::Double) => Cow::Owned(SqlValue::Double(*i as f64)),
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Call, validate};
    use crate::normalize::normalize;
    use crate::schema::base_columns;
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
        }
    }

    fn catalog_with(table: Table, extra: &[(&str, ColumnType)]) -> Catalog {
        let mut columns: FxHashMap<String, Option<ColumnType>> = base_columns(table)
            .into_iter()
            .map(|(n, t)| (n.to_owned(), Some(t)))
            .collect();
        for (n, t) in extra {
            columns.insert((*n).to_owned(), Some(*t));
        }
        Catalog(HashMap::from([(table, TableColumns(columns))]))
    }

    fn track(props: Value) -> Value {
        json!({"type": "track", "messageId": "m1", "userId": "u", "event": "E", "properties": props})
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
                    ("properties__plan".to_owned(), ColumnType::Text),
                    ("properties__seats".to_owned(), ColumnType::BigInt)
                ]
            )]
        );
    }

    #[test]
    fn conflicting_type_goes_to_split_column() {
        let catalog = catalog_with(Table::Track, &[("properties__seats", ColumnType::BigInt)]);
        let items = [item(track(json!({"seats": "three"})), 1)];
        let evolution = plan(&catalog, &items, Utc::now()).expect_err("needs split");
        assert_eq!(
            evolution.0[0].1,
            vec![("properties__seats__st".to_owned(), ColumnType::Text)]
        );
        let catalog = catalog_with(
            Table::Track,
            &[
                ("properties__seats", ColumnType::BigInt),
                ("properties__seats__st", ColumnType::Text),
            ],
        );
        let rows = plan(&catalog, &items, Utc::now()).expect("planned");
        let pos = rows[0]
            .columns
            .iter()
            .position(|(c, _)| c == "properties__seats__st")
            .expect("split column used");
        assert_eq!(
            rows[0].rows[0][pos].as_deref(),
            Some(&SqlValue::Text("three".into()))
        );
        assert!(
            !rows[0]
                .columns
                .iter()
                .any(|(c, _)| c == "properties__seats")
        );
    }

    #[test]
    fn integers_widen_into_double_columns() {
        let catalog = catalog_with(Table::Track, &[("properties__price", ColumnType::Double)]);
        let items = [item(track(json!({"price": 10})), 1)];
        let rows = plan(&catalog, &items, Utc::now()).expect("planned");
        let pos = rows[0]
            .columns
            .iter()
            .position(|(c, _)| c == "properties__price")
            .expect("column");
        assert_eq!(
            rows[0].rows[0][pos].as_deref(),
            Some(&SqlValue::Double(10.0))
        );
    }

    #[test]
    fn full_table_overflows_into_json() {
        let extra: Vec<(String, ColumnType)> = (0..COLUMN_LIMIT)
            .map(|i| (format!("c{i}"), ColumnType::Text))
            .collect();
        let extra_refs: Vec<(&str, ColumnType)> =
            extra.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let catalog = catalog_with(Table::Track, &extra_refs);
        let items = [item(track(json!({"brand_new": "kept"})), 1)];
        let rows = plan(&catalog, &items, Utc::now()).expect("no new columns past the limit");
        let pos = rows[0]
            .columns
            .iter()
            .position(|(c, _)| c == OVERFLOW_COLUMN)
            .expect("overflow column");
        let Some(SqlValue::Json(text)) = rows[0].rows[0][pos].as_deref() else {
            panic!("overflow is json")
        };
        let overflow: Value = serde_json::from_str(text).expect("json");
        assert_eq!(overflow, json!({"properties__brand_new": "kept"}));
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
        let catalog = catalog_with(Table::Track, &[("properties__old", ColumnType::Text)]);
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

//! Column naming as the loader does it: key paths arriving in batches get columns from
//! `TableColumns::plan_columns` and are recorded. However they arrive, no two key paths share a
//! column, no name is empty, longer than 63 bytes, or one the databases or Sluice reserve, and
//! a path's column never changes.
#![no_main]

use std::collections::{HashMap, HashSet};

use libfuzzer_sys::fuzz_target;
use sluice_ingest::event::Table;
use sluice_ingest::naming::{KeyPath, MAX_IDENTIFIER_BYTES, is_reserved};
use sluice_ingest::schema::{ColumnType, TableColumns, base_columns};

fuzz_target!(|batches: Vec<Vec<(Vec<String>, u8)>>| {
    let mut table = TableColumns::new_table(Table::Track);
    let base: HashSet<&str> = base_columns(Table::Track).iter().map(|c| c.name).collect();
    let mut seen: HashMap<KeyPath, String> = HashMap::new();
    for batch in batches {
        let needs: Vec<(KeyPath, ColumnType)> = batch
            .iter()
            .filter(|(keys, _)| !keys.is_empty())
            .map(|(keys, ty)| {
                let ty = ColumnType::ALL[usize::from(*ty) % ColumnType::ALL.len()];
                (KeyPath::new(keys.iter().map(String::as_str)), ty)
            })
            .collect();
        for new in table.plan_columns(Table::Track, &needs) {
            table.insert(&new.record, Some(new.record.column_type));
        }
        for (path, columns) in &table.paths {
            let first = &columns[0].name;
            if let Some(before) = seen.insert(path.clone(), first.clone()) {
                assert_eq!(&before, first, "{path} moved");
            }
        }
    }
    let mut owners: HashMap<&str, &KeyPath> = HashMap::new();
    for (path, columns) in &table.paths {
        for column in columns {
            let name = column.name.as_str();
            if let Some(other) = owners.insert(name, path) {
                panic!("{name} holds {path} and {other}");
            }
            assert!(
                !name.is_empty() && name.len() <= MAX_IDENTIFIER_BYTES,
                "{name}"
            );
            let split = column.made_for != columns[0].made_for;
            assert!(
                split || base.contains(name) || !is_reserved(name),
                "{name} for {path}"
            );
        }
    }
});

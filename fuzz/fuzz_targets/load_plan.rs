//! Planning a batch onto a table, as the writer does between evolutions: every value of every
//! record lands in a column of its key path or in `_sdc_overflow`, no row is wider than the row
//! budget, and planning converges once the columns it asked for exist.
#![no_main]

use axum::body::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_ingest::event::{Call, validate};
use sluice_ingest::json;
use sluice_ingest::load::Item;
use sluice_ingest::load::plan::{dedup, plan};
use sluice_ingest::normalize::normalize;
use sluice_ingest::schema::{Catalog, TableColumns};

fuzz_target!(|data: &[u8]| {
    let Ok(repaired) = json::repair(data) else {
        return;
    };
    let Ok(Value::Array(events)) = json::parse::<Value>(&repaired) else {
        return;
    };
    let mut items = Vec::new();
    for (i, event) in events.into_iter().enumerate() {
        let Ok(envelope) = validate(&event) else {
            continue;
        };
        let (Call::Load(table), Value::Object(object)) = (envelope.call, event) else {
            continue;
        };
        items.push(Item {
            record: normalize(table, &envelope, object),
            received_at: chrono::Utc::now(),
            sequence: i as i64,
            raw: Bytes::new(),
            adds_columns: i % 7 != 3,
        });
    }
    let items = dedup(items);
    let mut catalog = Catalog::default();
    for table in sluice_ingest::event::Table::ALL {
        catalog.0.insert(table, TableColumns::new_table(table));
    }
    for _ in 0..4 {
        match plan(&catalog, &items, chrono::Utc::now()) {
            Ok(tables) => {
                let rows: usize = tables.iter().map(|t| t.rows.len()).sum();
                assert_eq!(rows, items.len());
                return;
            }
            Err(evolution) => {
                for (table, needs) in evolution.0 {
                    let columns = catalog.0.get_mut(&table).expect("every table");
                    for new in columns.plan_columns(table, &needs) {
                        columns.insert(&new.record, Some(new.record.column_type));
                    }
                }
            }
        }
    }
    panic!("planning did not converge");
});

//! Loading reports (issue 12, item 3): `_sdc_loads` holds, per table and minute, the rows
//! loaded and rejected, the columns added and the first and last `_sdc_received_at`, written in
//! the transactions that load them, so its figures equal what the tables hold.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_ingest::schema::base_columns;
use sluice_tests::ingest::{Backend, serve};

const SCHEMA: &str = "segment";

fn track(message_id: &str, event: &str) -> Value {
    json!({
        "type": "track", "messageId": message_id, "userId": "u1", "event": event,
        "properties": {"revenue": 1.5, "currency": "EUR"}
    })
}

async fn post(url: &str, body: String) -> Value {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON")
}

/// A table's figures in `_sdc_loads`, summed over its minutes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    loaded: i64,
    rejected: i64,
    columns_added: i64,
    first_received_at: Option<String>,
    last_received_at: Option<String>,
}

fn int(row: &serde_json::Map<String, Value>, key: &str) -> i64 {
    row[key]
        .as_i64()
        .unwrap_or_else(|| panic!("{key} in {row:?}"))
}

async fn loads_and_rejections_are_reported_per_table_and_minute(backend: Backend) {
    let (dest, server) = serve(backend, "loads", &[]).await;
    dest.forbid_track_event_forbidden(SCHEMA).await;
    let webhook = server.url("/v1/webhook");
    let batch = json!([
        track("t-1", "Order Completed"),
        track("t-2", "Order Completed"),
        track("t-3", "Product Viewed"),
        {"type": "identify", "messageId": "i-1", "userId": "u1", "traits": {"email": "a@b.c"}},
        {"type": "identify", "messageId": "i-2", "userId": "u2", "traits": {"plan": "pro"}},
    ]);
    post(&webhook, batch.to_string()).await;
    // A redelivery is one more upsert; a forbidden event is set aside in _sdc_rejected, in a
    // batch whose other record loads.
    post(&webhook, track("t-1", "Order Completed").to_string()).await;
    let mixed = json!([track("t-4", "Order Completed"), track("t-5", "Forbidden")]);
    let answer = post(&webhook, mixed.to_string()).await;
    assert_eq!(answer["rejected"], 1, "{answer}");

    let rows = dest.loads(SCHEMA).await;
    assert!(!rows.is_empty(), "no row in _sdc_loads");
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    for row in &rows {
        let minute = row["minute"].as_str().expect("minute");
        assert!(minute.ends_with(":00.000000Z"), "a whole minute: {minute}");
        let table = row["table_name"].as_str().expect("table_name").to_owned();
        let t = totals.entry(table).or_default();
        t.loaded += int(row, "rows_loaded");
        t.rejected += int(row, "rows_rejected");
        t.columns_added += int(row, "columns_added");
        let first = row.get("first_received_at").and_then(Value::as_str);
        let last = row.get("last_received_at").and_then(Value::as_str);
        if let Some(first) = first {
            t.first_received_at = Some(match t.first_received_at.take() {
                Some(known) => known.min(first.to_owned()),
                None => first.to_owned(),
            });
        }
        if let Some(last) = last {
            t.last_received_at = Some(match t.last_received_at.take() {
                Some(known) => known.max(last.to_owned()),
                None => last.to_owned(),
            });
        }
    }

    for (table, loaded, rejected) in [(Table::Track, 5, 1), (Table::Identify, 2, 0)] {
        let t = &totals[table.name()];
        assert_eq!(
            (t.loaded, t.rejected),
            (loaded, rejected),
            "{table}: {rows:?}"
        );
        // Exactly the columns the table has beyond the ones it was created with.
        let columns = dest.columns(SCHEMA, table).await.len();
        let added = columns - base_columns(table).len();
        assert!(added > 0);
        assert_eq!(t.columns_added, added as i64, "{table}: {rows:?}");
        // The received times span what the table holds: the first batch's time (t-1 was
        // redelivered later, t-2 and t-3 were not) to the last loaded record's.
        let received: Vec<String> = dest
            .rows(SCHEMA, table)
            .await
            .iter()
            .map(|r| r["_sdc_received_at"].as_str().expect("received").to_owned())
            .collect();
        assert_eq!(
            t.first_received_at.as_ref(),
            received.iter().min(),
            "{table}"
        );
        assert_eq!(
            t.last_received_at.as_ref(),
            received.iter().max(),
            "{table}"
        );
    }
    // The figures the operator reports agree: the last hour's sums, and the latest received
    // time ever loaded; a period after every load counts nothing.
    let warehouse = dest.warehouse(SCHEMA);
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let figures = warehouse.loads_since(hour_ago).await.expect("loads_since");
    let reported: Vec<(String, i64, i64, Option<String>)> = figures
        .iter()
        .map(|f| {
            let last = f.last_received_at.as_ref();
            let last = last.map(sluice_ingest::normalize::format_timestamp);
            (f.table_name.clone(), f.rows_loaded, f.rows_rejected, last)
        })
        .collect();
    let expected: Vec<(String, i64, i64, Option<String>)> = totals
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                t.loaded,
                t.rejected,
                t.last_received_at.clone(),
            )
        })
        .collect();
    assert_eq!(reported, expected);
    let later = chrono::Utc::now() + chrono::Duration::minutes(1);
    let none_since = warehouse.loads_since(later).await.expect("loads_since");
    assert!(
        none_since
            .iter()
            .all(|f| (f.rows_loaded, f.rows_rejected) == (0, 0) && f.last_received_at.is_some()),
        "{none_since:?}"
    );
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 4);
    assert_eq!(dest.rejected(SCHEMA).await.len(), 1);
    assert!(
        !totals.contains_key("page"),
        "no row for a table nothing was loaded into: {rows:?}"
    );
    server.stop().await;
}

sluice_tests::on_both_backends!(loads_and_rejections_are_reported_per_table_and_minute);

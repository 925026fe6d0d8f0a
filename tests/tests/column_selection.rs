//! Column selection on a real PostgreSQL server and on SQLite files: excluded values never reach
//! the database, a subtree asked for as JSON is one column, a pseudonymized value is the keyed
//! hash of its text (checked against an independent HMAC-SHA-256), an `include` list keeps only
//! what it names besides the fields every table has, and a column budget sends later keys to
//! `_sdc_overflow`.

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use sluice_ingest::event::Table;
use sluice_ingest::schema::base_columns;
use sluice_tests::ingest::{Destination, post_json, serve};

const SCHEMA: &str = "segment";
const KEY: &str = "a pseudonymization key of some length";
const IP: &str = "203.0.113.9";
const CARD: &str = "4111111111111111";

fn hmac_hex(text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).expect("any key length");
    mac.update(text.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn base(message_id: &str, kind: &str) -> Value {
    json!({
        "type": kind, "messageId": message_id, "userId": "u1",
        "timestamp": "2024-05-01T10:00:00.000Z",
        "context": {"ip": IP, "library": {"name": "analytics.js"}},
    })
}

async fn row_text(
    dest: &Destination,
    table: Table,
    message_id: &str,
) -> (serde_json::Map<String, Value>, String) {
    let row = dest
        .row(SCHEMA, table, message_id)
        .await
        .unwrap_or_else(|| panic!("{table} row {message_id}"));
    let text = Value::Object(row.clone()).to_string();
    (row, text)
}

/// The columns of `table` beyond those it is created with, sorted.
async fn added_columns(dest: &Destination, table: Table) -> Vec<String> {
    let base: Vec<&str> = base_columns(table).iter().map(|c| c.name).collect();
    let mut added: Vec<String> = dest
        .columns(SCHEMA, table)
        .await
        .into_keys()
        .filter(|name| !base.contains(&name.as_str()))
        .collect();
    added.sort();
    added
}

async fn selected_columns_load_as_the_selection_says(backend: sluice_tests::ingest::Backend) {
    let selection = json!({
        "*": {"exclude": ["context.ip", "properties.card"], "pseudonymize": ["traits.email", "properties.email"]},
        "track": {"json": ["properties.experiments"]},
        "page": {"include": ["properties.path"]},
    })
    .to_string();
    let flags = [
        "--column-selection",
        selection.as_str(),
        "--pseudonymization-key",
        KEY,
    ];
    let (dest, server) = serve(backend, "selection", &flags).await;
    let url = server.url("/v1/webhook");

    let mut track = base("t1", "track");
    track["event"] = json!("Order Completed");
    track["properties"] = json!({
        "card": {"number": CARD, "brand": "visa"},
        "experiments": {"e1": "a", "e2": "b"},
        "email": "ada@example.com",
        "revenue": 19.99,
    });
    let mut identify = base("i1", "identify");
    identify["traits"] = json!({"email": "ada@example.com", "plan": "pro"});
    let mut page = base("p1", "page");
    page["name"] = json!("Home");
    page["properties"] = json!({"path": "/", "title": "Welcome"});
    for event in [&track, &identify, &page] {
        let (status, body) = post_json(&url, event).await;
        assert_eq!((status, body["loaded"].clone()), (200, json!(1)), "{body}");
    }

    // Excluded values are nowhere: no column, no overflow, no rejected record.
    for (table, id) in [
        (Table::Track, "t1"),
        (Table::Identify, "i1"),
        (Table::Page, "p1"),
    ] {
        let (_, text) = row_text(&dest, table, id).await;
        assert!(!text.contains(IP), "{table}: {text}");
        assert!(!text.contains(CARD), "{table}: {text}");
        assert!(!text.contains("ada@example.com"), "{table}: {text}");
    }
    assert!(dest.rejected(SCHEMA).await.is_empty());
    // Every column beyond the ones each table is created with is one the selection lets in.
    for (table, expected) in [
        (
            Table::Track,
            &[
                "context__library__name",
                "properties__email",
                "properties__experiments",
                "properties__revenue",
            ][..],
        ),
        (
            Table::Identify,
            &["context__library__name", "traits__email", "traits__plan"][..],
        ),
        (Table::Page, &["properties__path"][..]),
    ] {
        assert_eq!(added_columns(&dest, table).await, expected, "{table}");
    }

    // The experiments are one JSON value; the e-mail is its keyed hash, in traits and properties.
    let (row, _) = row_text(&dest, Table::Track, "t1").await;
    let experiments = dest
        .column_of(SCHEMA, Table::Track, &["properties", "experiments"])
        .await;
    let stored = match &row[&experiments] {
        Value::String(text) => serde_json::from_str::<Value>(text).expect("JSON text"),
        other => other.clone(),
    };
    assert_eq!(stored, json!({"e1": "a", "e2": "b"}));
    let pseudonym = hmac_hex("ada@example.com");
    let email = dest
        .column_of(SCHEMA, Table::Track, &["properties", "email"])
        .await;
    assert_eq!(row[&email], json!(pseudonym));
    assert_eq!(row["properties__revenue"], json!(19.99));
    let (identify_row, _) = row_text(&dest, Table::Identify, "i1").await;
    assert_eq!(identify_row["traits__email"], json!(pseudonym));
    assert_eq!(identify_row["traits__plan"], json!("pro"));

    // include: only properties.path besides the fields every page has.
    let (page_row, _) = row_text(&dest, Table::Page, "p1").await;
    assert_eq!(page_row["properties__path"], json!("/"));
    assert_eq!(page_row["name"], json!("Home"));
    assert_eq!(page_row["user_id"], json!("u1"));

    // Counted per table, a subtree once: track lost context.ip and properties.card (2),
    // identify context.ip (1), page the whole context (not included) and properties.title (2).
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    for (table, n) in [("track", 2), ("identify", 1), ("page", 2)] {
        let line = format!("sluice_values_excluded_total{{table=\"{table}\"}} {n}");
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    server.stop().await;
}

async fn a_column_budget_sends_later_keys_to_overflow(backend: sluice_tests::ingest::Backend) {
    let budget = base_columns(Table::Track).len() + 2;
    let selection = json!({"track": {"maxColumns": budget}}).to_string();
    let (dest, server) = serve(backend, "budget", &["--column-selection", &selection]).await;
    let mut track = base("b1", "track");
    track["event"] = json!("Signed Up");
    track["context"] = json!({});
    track["properties"] = json!({"a": 1, "b": 2, "c": 3, "d": 4});
    let (status, body) = post_json(&server.url("/v1/webhook"), &track).await;
    assert_eq!(status, 200, "{body}");
    let columns = dest.columns(SCHEMA, Table::Track).await;
    assert_eq!(columns.len(), budget, "{columns:?}");
    let (row, _) = row_text(&dest, Table::Track, "b1").await;
    let overflow: Value = match &row["_sdc_overflow"] {
        Value::String(text) => serde_json::from_str(text).expect("JSON text"),
        other => other.clone(),
    };
    let mut seen: Vec<(String, Value)> = overflow["properties"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    for key in ["a", "b", "c", "d"] {
        let column = format!("properties__{key}");
        if let Some(value) = row.get(&column) {
            seen.push((key.to_owned(), value.clone()));
        }
    }
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        seen,
        [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .to_vec(),
        "every value kept once, in a column or the overflow"
    );
    server.stop().await;
}

sluice_tests::on_both_backends!(
    selected_columns_load_as_the_selection_says,
    a_column_budget_sends_later_keys_to_overflow,
);

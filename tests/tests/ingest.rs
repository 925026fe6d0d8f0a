//! The ingest service end to end, on a real PostgreSQL server and on SQLite files: every scenario
//! runs on both (see the `on_both_backends!` list at the bottom).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_ingest::load::plan::Item;
use sluice_ingest::naming::KeyPath;
use sluice_ingest::normalize::{Field, Record, SqlValue};
use sluice_ingest::protocol::sign;
use sluice_ingest::schema::ColumnType;
use sluice_tests::ingest::{Backend, Destination, Process, serve};

const SCHEMA: &str = "segment";

fn fixtures() -> Vec<Value> {
    let text = include_str!("../fixtures/segment-spec-examples.jsonl");
    text.lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("fixture line")["payload"].clone())
        .collect()
}

async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    post_with(url, body, &[]).await
}

async fn post_with(
    url: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url).body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn track(message_id: &str, properties: Value) -> Value {
    json!({
        "type": "track", "messageId": message_id, "userId": "u1", "event": "Order Completed",
        "timestamp": "2024-05-01T10:00:00.000Z", "properties": properties
    })
}

/// Counts rows of every event table and `_sdc_rejected`, and the columns of each table.
async fn snapshot(dest: &Destination) -> (Vec<usize>, Vec<usize>, usize) {
    let mut rows = Vec::new();
    let mut columns = Vec::new();
    for table in Table::ALL {
        rows.push(dest.rows(SCHEMA, table).await.len());
        columns.push(dest.columns(SCHEMA, table).await.len());
    }
    (rows, columns, dest.rejected(SCHEMA).await.len())
}

async fn fixtures_land_in_their_tables(backend: Backend) {
    let (dest, server) = serve(
        backend,
        "fixtures",
        &["--tables", "alias,group,identify,page,screen,track"],
    )
    .await;
    // The latest version of each (type, messageId): later fixtures redeliver earlier ids.
    let mut expected: HashMap<(String, String), Value> = HashMap::new();
    let (mut accepted, mut refused) = (0, 0);
    for payload in fixtures() {
        let (status, body) = post(&server.url("/v1/webhook"), payload.to_string()).await;
        let kind = payload["type"].as_str().unwrap_or_default().to_owned();
        match payload["messageId"].as_str() {
            Some(id) if !kind.is_empty() => {
                assert_eq!(status, 200, "{payload} -> {body}");
                accepted += 1;
                expected.insert((kind, id.to_owned()), payload.clone());
            }
            _ => {
                refused += 1;
                assert_eq!(status, 400, "{payload} -> {body}");
                let error = body["error"].as_str().expect("error message");
                assert!(
                    error.contains("messageId") || error.contains("type"),
                    "error names the missing field: {error}"
                );
            }
        }
    }
    assert!(accepted >= 9, "the spec's complete examples are accepted");
    assert!(refused >= 10, "the spec's partial examples are refused");
    for ((kind, id), payload) in &expected {
        let table: Table = kind.parse().expect("known table");
        dest.assert_event_stored(SCHEMA, table, payload, &[]).await;
        let row = dest
            .row(SCHEMA, table, id)
            .await
            .unwrap_or_else(|| panic!("{kind} {id} has a row"));
        for system in [
            "_sdc_received_at",
            "_sdc_batched_at",
            "_sdc_sequence",
            "_sdc_table_version",
        ] {
            assert!(row.contains_key(system), "{system} set");
        }
    }
    // Two track fixtures share a messageId: one row, holding the later one.
    let tracks = dest.rows(SCHEMA, Table::Track).await;
    let ids: HashSet<_> = tracks.iter().map(|r| r["message_id"].clone()).collect();
    assert_eq!(ids.len(), tracks.len());
    let shared = dest
        .row(SCHEMA, Table::Track, "ajs-f8ca1e4de5024d9430b3928bd8ac6b96")
        .await
        .expect("row");
    assert_eq!(shared["event"], "Button Clicked");
    server.stop().await;
}

async fn unselected_types_are_acknowledged_and_skipped(backend: Backend) {
    let (dest, server) = serve(backend, "skipped", &[]).await;
    let alias = json!({"type": "alias", "messageId": "a1", "userId": "u", "previousId": "p"});
    let (status, body) = post(&server.url("/v1/webhook"), alias.to_string()).await;
    assert_eq!((status, body["skipped"].clone()), (200, json!(1)));
    assert!(
        dest.columns(SCHEMA, Table::Alias).await.is_empty(),
        "no alias table"
    );
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("sluice_events_skipped_total{table=\"alias\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

async fn redelivered_event_is_one_row(backend: Backend) {
    let (dest, server) = serve(backend, "redelivery", &[]).await;
    let first = track("m-1", json!({"plan": "basic", "coupon": "SPRING"}));
    for _ in 0..3 {
        let (status, _) = post(&server.url("/v1/webhook"), first.to_string()).await;
        assert_eq!(status, 200);
    }
    let rows = dest.rows(SCHEMA, Table::Track).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["properties__plan"], "basic");
    // A changed redelivery replaces the row: new values, and no stale leftovers.
    let changed = track("m-1", json!({"plan": "pro"}));
    let (status, _) = post(&server.url("/v1/webhook"), changed.to_string()).await;
    assert_eq!(status, 200);
    let rows = dest.rows(SCHEMA, Table::Track).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["properties__plan"], "pro");
    assert!(!rows[0].contains_key("properties__coupon"), "{:?}", rows[0]);
    // Duplicates inside one batch are one row too, the last version.
    let batch = json!([track("m-2", json!({"n": 1})), track("m-2", json!({"n": 2}))]);
    let (status, _) = post(&server.url("/v1/webhook"), batch.to_string()).await;
    assert_eq!(status, 200);
    let row = dest.row(SCHEMA, Table::Track, "m-2").await.expect("row");
    assert_eq!(row["properties__n"], 2);
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 2);
    server.stop().await;
}

async fn type_conflict_goes_to_split_column(backend: Backend) {
    let (dest, server) = serve(backend, "split", &[]).await;
    for (id, seats) in [
        ("a", json!(3)),
        ("b", json!("three")),
        ("c", json!(true)),
        ("d", json!(2.5)),
    ] {
        let (status, _) = post(
            &server.url("/v1/webhook"),
            track(id, json!({"seats": seats})).to_string(),
        )
        .await;
        assert_eq!(status, 200);
    }
    let columns = dest.columns(SCHEMA, Table::Track).await;
    assert_eq!(columns["properties__seats"], Some(ColumnType::BigInt));
    assert_eq!(columns["properties__seats__st"], Some(ColumnType::Text));
    assert_eq!(columns["properties__seats__bo"], Some(ColumnType::Boolean));
    assert_eq!(columns["properties__seats__do"], Some(ColumnType::Double));
    let value = |id: &'static str, column: &'static str| {
        let dest = &dest;
        async move {
            dest.row(SCHEMA, Table::Track, id)
                .await
                .expect("row")
                .get(column)
                .cloned()
        }
    };
    assert_eq!(value("a", "properties__seats").await, Some(json!(3)));
    assert_eq!(
        value("b", "properties__seats__st").await,
        Some(json!("three"))
    );
    assert_eq!(value("b", "properties__seats").await, None);
    assert_eq!(value("c", "properties__seats__bo").await, Some(json!(true)));
    assert_eq!(value("d", "properties__seats__do").await, Some(json!(2.5)));
    // A timestamp that does not parse keeps its text in the split column.
    let odd = json!({"type": "page", "messageId": "p", "userId": "u", "timestamp": "yesterday"});
    assert_eq!(
        post(&server.url("/v1/webhook"), odd.to_string()).await.0,
        200
    );
    let row = dest.row(SCHEMA, Table::Page, "p").await.expect("row");
    assert_eq!(row["timestamp__st"], "yesterday");
    server.stop().await;
}

async fn sql_shaped_keys_become_safe_distinct_columns(backend: Backend) {
    let (dest, server) = serve(backend, "hostile", &[]).await;
    let long = "k".repeat(300);
    let longer = format!("{long}x");
    let keys = [
        "x\"; DROP TABLE \"track\"; --",
        "Robert'); DROP TABLE students;--",
        "a'b",
        "a;b",
        "--",
        "a--b",
        "group",
        "select",
        long.as_str(),
        longer.as_str(),
        "prénom",
        "名前",
        "emoji 🎉",
        "",
    ];
    let mut properties = serde_json::Map::new();
    for (i, key) in keys.iter().enumerate() {
        properties.insert((*key).to_owned(), json!(format!("value-{i}")));
    }
    let before = dest.columns(SCHEMA, Table::Track).await.len();
    let (status, body) = post(
        &server.url("/v1/webhook"),
        track("hostile", Value::Object(properties)).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let row = dest
        .row(SCHEMA, Table::Track, "hostile")
        .await
        .expect("row");
    let columns = dest.columns(SCHEMA, Table::Track).await;
    for (i, key) in keys.iter().enumerate() {
        let holders: Vec<_> = row
            .iter()
            .filter(|(_, v)| **v == json!(format!("value-{i}")))
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "value of key {key:?} stored exactly once: {holders:?}"
        );
        assert!(holders[0].0.len() <= 63);
    }
    assert!(
        columns.len() >= before + keys.len(),
        "each key has its own column"
    );
    for table in Table::DEFAULT {
        assert!(
            !dest.columns(SCHEMA, table).await.is_empty(),
            "{table} survives"
        );
    }
    server.stop().await;
}

async fn credentials_are_checked(backend: Backend) {
    let (dest, server) = serve(
        backend,
        "auth",
        &["--shared-secret", "s3cret", "--api-key", "key-1"],
    )
    .await;
    let url = server.url("/v1/webhook");
    let body = track("signed", json!({})).to_string();
    let basic = |key: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
        )
    };
    let refusals = [
        vec![],
        vec![("x-signature", sign(b"wrong", body.as_bytes()))],
        vec![("x-signature", "not hex".to_owned())],
        vec![("authorization", basic("key-2"))],
    ];
    for headers in &refusals {
        let (status, answer) = post_with(&url, body.clone(), headers).await;
        assert_eq!(status, 401, "{headers:?}");
        assert!(
            answer["error"]
                .as_str()
                .expect("message")
                .contains("credentials")
        );
    }
    assert!(
        dest.rows(SCHEMA, Table::Track).await.is_empty(),
        "nothing stored"
    );
    let signed = [("x-signature", sign(b"s3cret", body.as_bytes()))];
    assert_eq!(post_with(&url, body.clone(), &signed).await.0, 200);
    let keyed = track("keyed", json!({})).to_string();
    assert_eq!(
        post_with(&url, keyed, &[("authorization", basic("key-1"))])
            .await
            .0,
        200
    );
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 2);
    server.stop().await;
}

/// A Webhooks (Actions) batch as Segment signs it (the first event only), captured and replayed
/// with an event appended that would overwrite an existing row: refused by default, accepted
/// only with `--accept-first-event-signatures`. Whole-body credentials always work.
async fn batch_signed_on_first_event_only_is_refused_by_default(backend: Backend) {
    let flags = ["--shared-secret", "s3cret", "--api-key", "key-1"];
    let first = track("b-1", json!({"n": 1})).to_string();
    let second = track("b-2", json!({"n": 2})).to_string();
    let forged = track("victim", json!({"forged": true})).to_string();
    let first_signed = [("x-signature", sign(b"s3cret", first.as_bytes()))];
    let captured = format!("[{first},{second}]");
    let tampered = format!("[{first},{second},{forged}]");
    let api_key = [(
        "authorization",
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("key-1:")
        ),
    )];

    let (dest, server) = serve(backend, "firstsig", &flags).await;
    let url = server.url("/v1/webhook");
    let victim = track("victim", json!({"genuine": true})).to_string();
    assert_eq!(post_with(&url, victim, &api_key).await.0, 200);
    for body in [&tampered, &captured] {
        let (status, answer) = post_with(&url, body.clone(), &first_signed).await;
        assert_eq!(status, 401, "{answer}");
        let message = answer["error"].as_str().expect("message");
        assert!(
            message.contains("first event") && message.contains("--accept-first-event-signatures"),
            "{message}"
        );
    }
    let rows = dest.rows(SCHEMA, Table::Track).await;
    assert_eq!(rows.len(), 1, "nothing of the refused batches is stored");
    assert_eq!(rows[0]["properties__genuine"], json!(true));
    assert!(!rows[0].contains_key("properties__forged"));
    // Credentials that cover the whole body are accepted for a batch.
    let whole = [("x-signature", sign(b"s3cret", captured.as_bytes()))];
    assert_eq!(post_with(&url, captured.clone(), &whole).await.0, 200);
    let (status, answer) = post_with(&url, format!("[{second}]"), &api_key).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 3);
    server.stop().await;

    // With the opt-in, the same tampered batch passes: the risk the flag documents.
    let mut lenient = flags.to_vec();
    lenient.push("--accept-first-event-signatures");
    let (dest, server) = serve(backend, "firstsig_optin", &lenient).await;
    let (status, answer) = post_with(&server.url("/v1/webhook"), tampered, &first_signed).await;
    assert_eq!(status, 200, "{answer}");
    let victim = dest
        .row(SCHEMA, Table::Track, "victim")
        .await
        .expect("the appended event was loaded");
    assert_eq!(victim["properties__forged"], json!(true));
    server.stop().await;
}

async fn bad_input_is_refused_and_changes_nothing(backend: Backend) {
    let (dest, server) = serve(backend, "badinput", &["--max-body-bytes", "65536"]).await;
    let url = server.url("/v1/webhook");
    assert_eq!(
        post(&url, track("seed", json!({"a": 1})).to_string())
            .await
            .0,
        200
    );
    let before = snapshot(&dest).await;
    let deep = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let deep_event = format!(
        r#"{{"type":"track","messageId":"deep","userId":"u","event":"e","properties":{deep}}}"#
    );
    let oversize = track("big", json!({"blob": "x".repeat(70_000)})).to_string();
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"type\": \"track\", ".to_owned(), 400, "malformed JSON"),
        ("not json at all".to_owned(), 400, "malformed JSON"),
        (
            json!({"messageId": "m", "userId": "u"}).to_string(),
            400,
            "missing \"type\"",
        ),
        (
            json!({"type": "purchase", "messageId": "m"}).to_string(),
            400,
            "unknown type",
        ),
        (
            json!({"type": "track", "userId": "u", "event": "e"}).to_string(),
            400,
            "messageId",
        ),
        (json!("a string").to_string(), 400, "JSON object"),
        (
            json!([track("ok-1", json!({})), {"type": "track"}]).to_string(),
            400,
            "event 1",
        ),
        (deep_event, 400, "nested deeper than 512"),
        (oversize, 413, "larger than"),
        (
            json!({"type": "delete", "messageId": "d", "userId": "u"}).to_string(),
            501,
            "not supported",
        ),
    ];
    for (body, status, message) in cases {
        let (got, answer) = post(&url, body.clone()).await;
        assert_eq!(got, status, "{} -> {answer}", &body[..body.len().min(80)]);
        let error = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("JSON error body: {answer}"));
        assert!(
            error.contains(message),
            "{error:?} should mention {message:?}"
        );
    }
    assert_eq!(snapshot(&dest).await, before, "the database is unchanged");
    assert_eq!(
        post(&url, track("after", json!({"a": 2})).to_string())
            .await
            .0,
        200,
        "still serving"
    );
    assert!(
        dest.row(SCHEMA, Table::Track, "ok-1").await.is_none(),
        "a refused batch stores nothing"
    );
    server.stop().await;
}

async fn two_processes_evolving_one_schema_lose_nothing(backend: Backend) {
    let dest = Destination::new(backend, "twoprocs").await;
    let args = [
        "--database-url",
        dest.url.as_str(),
        "--max-batch-delay",
        "1ms",
    ];
    let (a, b) = tokio::join!(Process::spawn(&args, &[]), Process::spawn(&args, &[]));
    let client = reqwest::Client::new();
    let mut sends = Vec::new();
    for i in 0..120 {
        let target = if i % 2 == 0 {
            a.url("/v1/webhook")
        } else {
            b.url("/v1/webhook")
        };
        // Every event brings new columns; pairs of processes race on the same new names with
        // different types, which must end in split columns, not errors.
        let value = if i % 2 == 0 {
            json!(i)
        } else {
            json!(format!("s{i}"))
        };
        let body = track(
            &format!("e{i}"),
            json!({ format!("k{}", i / 2): value.clone(), format!("own{i}"): true, "shared": value }),
        );
        let client = client.clone();
        sends.push(tokio::spawn(async move {
            let r = client
                .post(target)
                .body(body.to_string())
                .send()
                .await
                .expect("sent");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }));
    }
    for send in sends {
        let (status, body) = send.await.expect("task");
        assert_eq!(status, 200, "{body}");
    }
    let rows = dest.rows(SCHEMA, Table::Track).await;
    assert_eq!(rows.len(), 120);
    for i in 0..120 {
        let row = rows
            .iter()
            .find(|r| r["message_id"] == json!(format!("e{i}")))
            .unwrap_or_else(|| panic!("e{i} landed"));
        assert_eq!(
            row.get(&format!("properties__own{i}")),
            Some(&json!(true)),
            "e{i}"
        );
        let expected = if i % 2 == 0 {
            json!(i)
        } else {
            json!(format!("s{i}"))
        };
        let held = row
            .iter()
            .filter(|(k, v)| k.starts_with(&format!("properties__k{}", i / 2)) && **v == expected)
            .count();
        assert_eq!(held, 1, "e{i} keeps its k value: {row:?}");
        let shared = row
            .iter()
            .filter(|(k, v)| k.starts_with("properties__shared") && **v == expected)
            .count();
        assert_eq!(shared, 1, "e{i} keeps its shared value");
    }
    drop((a, b));
}

async fn sigterm_commits_and_answers_what_was_received(backend: Backend) {
    let dest = Destination::new(backend, "sigterm").await;
    let process = Process::spawn(
        &[
            "--database-url",
            dest.url.as_str(),
            "--max-batch-delay",
            "3s",
            "--max-batch-rows",
            "100000",
        ],
        &[],
    )
    .await;
    let client = reqwest::Client::new();
    let mut sends = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        let url = process.url("/v1/webhook");
        sends.push(tokio::spawn(async move {
            let body = track(&format!("t{i}"), json!({"i": i})).to_string();
            client
                .post(url)
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    // The requests are waiting for the batch's 3 s delay when the signal arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    process.terminate();
    for send in sends {
        assert_eq!(send.await.expect("task").expect("answered"), 200);
    }
    assert!(process.wait().await, "exits with status 0");
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 20);
}

async fn full_queue_answers_503_with_retry_after(backend: Backend) {
    let (_dest, server) = serve(
        backend,
        "queuefull",
        &["--queue-capacity", "1", "--max-batch-delay", "2s"],
    )
    .await;
    let url = server.url("/v1/webhook");
    let first = tokio::spawn({
        let url = url.clone();
        async move { post(&url, track("q1", json!({})).to_string()).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = reqwest::Client::new()
        .post(&url)
        .body(track("q2", json!({})).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(first.await.expect("task"), 200);
    assert_eq!(
        post(&url, track("q2", json!({})).to_string()).await.0,
        200,
        "the retry succeeds"
    );
    server.stop().await;
}

/// A record the database refuses (here: a constraint the warehouse's owner added) goes to
/// `_sdc_rejected` with the reason and the event as received; the rest of its batch commits.
async fn refused_records_go_to_sdc_rejected(backend: Backend) {
    let (dest, server) = serve(backend, "rejected", &[]).await;
    dest.forbid_track_event_forbidden(SCHEMA).await;
    let mut forbidden = track("refused", json!({"note": "a\u{0}b"}));
    forbidden["event"] = json!("Forbidden");
    let batch = format!("[{}, {}]", track("fine", json!({"a": 1})), forbidden);
    let (status, body) = post(&server.url("/v1/webhook"), batch).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"ok": true, "loaded": 1, "rejected": 1, "skipped": 0})
    );
    assert!(dest.row(SCHEMA, Table::Track, "fine").await.is_some());
    assert!(dest.row(SCHEMA, Table::Track, "refused").await.is_none());
    let rejected = dest.rejected(SCHEMA).await;
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["message_id"], "refused");
    assert_eq!(rejected[0]["table_name"], "track");
    let record: Value =
        serde_json::from_str(rejected[0]["record"].as_str().expect("record")).expect("JSON");
    assert_eq!(record["properties"]["note"], "a\u{fffd}b");
    assert!(!rejected[0]["reason"].as_str().expect("reason").is_empty());
    // A NUL character is no reason to refuse: it loads as U+FFFD.
    let nul = r#"{"type":"track","messageId":"nul","userId":"u","event":"e","properties":{"note":"a\u0000b"}}"#;
    assert_eq!(post(&server.url("/v1/webhook"), nul).await.0, 200);
    let row = dest.row(SCHEMA, Table::Track, "nul").await.expect("row");
    assert_eq!(row["properties__note"], "a\u{fffd}b");
    server.stop().await;
}

async fn wide_tables_overflow_into_json(backend: Backend) {
    let (dest, server) = serve(backend, "overflow", &[]).await;
    // 17 events of 100 new keys each: the table reaches its column limit part way through,
    // as a long-lived table with ever-new property names would.
    let events: Vec<Value> = (0..17)
        .map(|e| {
            let properties: serde_json::Map<String, Value> = (0..100)
                .map(|k| (format!("p{e}_{k}"), json!(e * 100 + k)))
                .collect();
            track(&format!("wide{e}"), Value::Object(properties))
        })
        .collect();
    let (status, body) = post(&server.url("/v1/webhook"), Value::Array(events).to_string()).await;
    assert_eq!(status, 200, "{body}");
    let columns = dest.columns(SCHEMA, Table::Track).await;
    assert!(
        columns.len() <= sluice_ingest::schema::COLUMN_LIMIT,
        "{}",
        columns.len()
    );
    let mut overflowed = 0;
    for e in 0..17 {
        let row = dest
            .row(SCHEMA, Table::Track, &format!("wide{e}"))
            .await
            .expect("row");
        let overflow = row
            .get("_sdc_overflow")
            .and_then(|o| o.get("properties"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        overflowed += overflow.len();
        for k in 0..100 {
            let key = format!("p{e}_{k}");
            let column = format!("properties__{key}");
            let value = row.get(&column).or_else(|| overflow.get(&key));
            assert_eq!(value, Some(&json!(e * 100 + k)), "{key} kept");
        }
    }
    assert!(overflowed > 0, "some keys went to the overflow column");
    assert!(dest.rejected(SCHEMA).await.is_empty());
    server.stop().await;
}

async fn health_readiness_and_metrics_answer(backend: Backend) {
    let (_dest, server) = serve(backend, "probes", &[]).await;
    assert_eq!(
        reqwest::get(server.url("/healthz"))
            .await
            .expect("healthz")
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(server.url("/readyz"))
            .await
            .expect("readyz")
            .status(),
        200
    );
    assert_eq!(
        post(
            &server.url("/v1/webhook"),
            track("m", json!({})).to_string()
        )
        .await
        .0,
        200
    );
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for needle in [
        "sluice_events_loaded_total{table=\"track\"} 1",
        "sluice_http_requests_total{status=\"200\"}",
        "sluice_batch_rows_count 1",
        "sluice_commit_seconds_count 1",
        "sluice_queue_depth 0",
    ] {
        assert!(metrics.contains(needle), "{needle} in {metrics}");
    }
    assert_eq!(
        reqwest::get(server.url("/nope"))
            .await
            .expect("404")
            .status(),
        404
    );
    server.stop().await;
}

/// The `message_id`s of the `track` rows.
async fn track_ids(dest: &Destination) -> HashSet<String> {
    sluice_tests::sender::message_ids(dest, SCHEMA, Table::Track)
        .await
        .into_iter()
        .collect()
}

/// Terminates every connection to `database` (as a restart or an administrator would); returns
/// how many there were.
async fn terminate_backends(admin: &mut sqlx::PgConnection, database: &str) -> usize {
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(database)
    .fetch_all(admin)
    .await
    .expect("terminate the database's connections");
    terminated.into_iter().filter(|&done| done).count()
}

/// PostgreSQL only: a connection the server closed while it sat idle between batches (a
/// restart, `idle_session_timeout`, an administrator) is tested before the next batch and
/// replaced, so the next event loads at the first try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_while_idle_is_replaced_before_the_next_batch() {
    use sqlx::Connection;
    let (dest, server) = serve(Backend::Postgres, "idleclosed", &[]).await;
    let url = server.url("/v1/webhook");
    assert_eq!(
        post(&url, track("first", json!({})).to_string()).await.0,
        200
    );
    let database = dest.url.rsplit('/').next().expect("database name");
    let mut admin = sqlx::PgConnection::connect(&sluice_tests::postgres::admin_url())
        .await
        .expect("admin connection");
    assert!(
        terminate_backends(&mut admin, database).await > 0,
        "the ingest had a connection open"
    );
    // Longer than the idle time after which a connection is tested (1 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        post(&url, track("second", json!({})).to_string()).await.0,
        200,
        "the first try lands"
    );
    assert_eq!(
        track_ids(&dest).await,
        HashSet::from(["first", "second"].map(String::from))
    );
    server.stop().await;
}

/// PostgreSQL only: a database that refuses connections gets 503 with `Retry-After`, nothing is
/// acknowledged, and the same request succeeds once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_database_answers_503_then_recovers() {
    use sqlx::{Connection, Executor};
    let (dest, server) = serve(Backend::Postgres, "unavailable", &[]).await;
    let url = server.url("/v1/webhook");
    assert_eq!(
        post(&url, track("before", json!({})).to_string()).await.0,
        200
    );
    let database = dest
        .url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_owned();
    let mut admin = sqlx::PgConnection::connect(&sluice_tests::postgres::admin_url())
        .await
        .expect("admin connection");
    let set_allowed =
        |allowed: bool| format!("ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS {allowed}");
    admin
        .execute(sqlx::AssertSqlSafe(set_allowed(false)))
        .await
        .expect("refuse connections");
    terminate_backends(&mut admin, &database).await;
    let response = reqwest::Client::new()
        .post(&url)
        .body(track("during", json!({})).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    assert_eq!(
        reqwest::get(server.url("/readyz"))
            .await
            .expect("readyz")
            .status(),
        503
    );
    admin
        .execute(sqlx::AssertSqlSafe(set_allowed(true)))
        .await
        .expect("allow connections");
    assert_eq!(
        post(&url, track("during", json!({})).to_string()).await.0,
        200,
        "the retry lands"
    );
    assert_eq!(
        track_ids(&dest).await,
        HashSet::from(["before", "during"].map(String::from))
    );
    server.stop().await;
}

/// The batcher gives the senders of a batch that added columns a moment to send again
/// (`load::batcher::REGROUP`); the warehouse tells it which batches did: one with a key the table
/// has no column for yet, and not one whose keys all have theirs.
async fn a_written_batch_says_whether_it_added_columns(backend: Backend) {
    let dest = Destination::new(backend, "evolved").await;
    let warehouse = dest.warehouse(SCHEMA);
    warehouse
        .ensure_schema(&[Table::Track])
        .await
        .expect("schema");
    let batch = |id: &str, key: &str| {
        vec![Item {
            record: Record {
                table: Table::Track,
                message_id: id.to_owned(),
                fields: vec![
                    Field {
                        path: KeyPath::new(["messageId"]),
                        value: SqlValue::Text(id.to_owned()),
                    },
                    Field {
                        path: KeyPath::new(["properties", key]),
                        value: SqlValue::Text(format!("{key} of {id}")),
                    },
                ],
            },
            received_at: Utc::now(),
            sequence: 1,
            raw: Default::default(),
            adds_columns: true,
        }]
    };
    let mut evolved = Vec::new();
    for (id, key) in [("m1", "plan"), ("m2", "plan"), ("m3", "seats")] {
        let summary = warehouse.write(batch(id, key)).await.expect("written");
        assert_eq!(summary.loaded, vec![(Table::Track, 1)], "{id}");
        evolved.push(summary.evolved);
    }
    assert_eq!(evolved, [true, false, true]);
    let columns = dest.columns(SCHEMA, Table::Track).await;
    assert!(columns.contains_key("properties__plan") && columns.contains_key("properties__seats"));
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 3);
    let m2 = dest
        .row(SCHEMA, Table::Track, "m2")
        .await
        .expect("m2 loaded");
    assert_eq!(m2["properties__plan"], "plan of m2");
}

sluice_tests::on_both_backends!(
    a_written_batch_says_whether_it_added_columns,
    fixtures_land_in_their_tables,
    unselected_types_are_acknowledged_and_skipped,
    redelivered_event_is_one_row,
    type_conflict_goes_to_split_column,
    sql_shaped_keys_become_safe_distinct_columns,
    credentials_are_checked,
    batch_signed_on_first_event_only_is_refused_by_default,
    bad_input_is_refused_and_changes_nothing,
    two_processes_evolving_one_schema_lose_nothing,
    sigterm_commits_and_answers_what_was_received,
    full_queue_answers_503_with_retry_after,
    refused_records_go_to_sdc_rejected,
    wide_tables_overflow_into_json,
    health_readiness_and_metrics_answer,
);

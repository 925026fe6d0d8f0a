//! Real-world payloads: inputs shaped like public bug reports against other Segment loaders
//! (`tests/fixtures/real-world`, each with a sidecar `*.expect.md` that says what is right), and
//! for each fault kind more inputs of the same kind. Every scenario runs on PostgreSQL and on
//! SQLite (the `on_both_backends!` list at the bottom), through the routes the sidecars name.

use std::collections::{HashMap, HashSet};

use base64::Engine;
use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_ingest::json::MAX_DEPTH;
use sluice_ingest::naming::{DATABASE_SYSTEM_COLUMNS, MAX_IDENTIFIER_BYTES};
use sluice_ingest::normalize::MAX_FLATTEN_DEPTH;
use sluice_tests::ingest::{Backend, Destination, Process, Server, parse_body, serve};

const SCHEMA: &str = "segment";
const WRITE_KEY: &str = "wk-real-world";
const ALL_TABLES: &str = "alias,group,identify,page,screen,track";

/// A fixture file's bytes, exactly as they are.
fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/fixtures/real-world/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Starts the service on a fresh destination with every table and a write key.
async fn start(backend: Backend, label: &str) -> (Destination, Server) {
    serve(
        backend,
        label,
        &["--tables", ALL_TABLES, "--write-keys", WRITE_KEY],
    )
    .await
}

/// POSTs `body` to `path` (with the write key as Basic user) and returns status and body.
async fn post(server: &Server, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"));
    let response = reqwest::Client::new()
        .post(server.url(path))
        .header("content-type", "application/json")
        .header("authorization", format!("Basic {basic}"))
        .body(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn table_of(event: &Value) -> Table {
    event["type"]
        .as_str()
        .expect("type")
        .parse()
        .expect("a table")
}

/// The events of a fixture body: the `batch` of a Tracking API body, the elements of an array,
/// or the one event.
fn events_of(body: &Value) -> Vec<Value> {
    match body {
        Value::Array(items) => items.clone(),
        Value::Object(o) if o.contains_key("batch") => {
            o["batch"].as_array().expect("batch").clone()
        }
        one => vec![one.clone()],
    }
}

/// The keys the Tracking API sets itself (see `protocol::tracking::enrich`).
const TRACKING_REWRITES: [&str; 3] = ["timestamp", "originalTimestamp", "receivedAt"];

/// Asserts every event of `body` stored as sent.
async fn assert_all_stored(dest: &Destination, body: &Value, skip: &[&str]) {
    for event in events_of(body) {
        dest.assert_event_stored(SCHEMA, table_of(&event), &event, skip)
            .await;
    }
}

/// No column of any table holds two key paths, none is over 63 bytes, empty, or a database's
/// system column name.
async fn assert_names_sound(dest: &Destination) {
    for table in Table::ALL {
        let columns = dest.key_columns(SCHEMA, table).await;
        let mut owner: HashMap<&String, &Vec<String>> = HashMap::new();
        for (keys, names) in &columns {
            for name in names {
                if let Some(other) = owner.insert(name, keys) {
                    panic!("{table}.{name} holds {keys:?} and {other:?}");
                }
                assert!(
                    !name.is_empty() && name.len() <= MAX_IDENTIFIER_BYTES,
                    "{name}"
                );
                assert!(!DATABASE_SYSTEM_COLUMNS.contains(&name.as_str()), "{name}");
                assert!(!name.contains('\0'), "{name:?}");
            }
        }
    }
}

// ---- 01, 02: encoding -------------------------------------------------------------------

async fn nul_characters_become_replacement_characters(backend: Backend) {
    let (dest, server) = start(backend, "nul").await;
    let body = fixture("01-nul-byte.json");
    let (status, answer) = post(&server, "/v1/batch", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let identify = dest
        .row(SCHEMA, Table::Identify, "br-01-1")
        .await
        .expect("br-01-1");
    assert_eq!(identify["traits__email"], "\u{fffd}");
    assert_eq!(identify["traits__nickname"], "cm\u{fffd}x");
    let track = dest
        .row(SCHEMA, Table::Track, "br-01-2")
        .await
        .expect("br-01-2");
    assert_eq!(track["event"], "Signed Out\u{fffd}");
    let tag = dest
        .column_of(SCHEMA, Table::Track, &["properties", "src\u{fffd}0000tag"])
        .await;
    assert!(tag.starts_with("properties__src_0000tag"), "{tag}");
    assert_eq!(track[&tag], "kiosk");
    assert!(dest.row(SCHEMA, Table::Track, "br-01-3").await.is_some());
    assert!(dest.rejected(SCHEMA).await.is_empty());
    assert_all_stored(&dest, &parse_body(&body), &TRACKING_REWRITES).await;
    // The same kind: NUL in a key at the top level, in a nested key, and on the webhook; keys
    // that differ only in a NUL, a lone surrogate or a U+FFFD keep their own values.
    let keys = r#"{"type":"track","messageId":"nul-3","userId":"u","event":"e","properties":{"a\u0000":1,"a\ufffd":2,"b\ud800":3,"b\udc00":4,"b\ufffd":5}}"#;
    assert_eq!(post(&server, "/v1/webhook", keys).await.0, 200);
    let parsed = parse_body(keys.as_bytes());
    assert_eq!(
        parsed["properties"].as_object().expect("properties").len(),
        5
    );
    dest.assert_event_stored(SCHEMA, Table::Track, &parsed, &[])
        .await;
    let event = r#"{"type":"track","messageId":"nul-2","userId":"u\u0000","event":"e","a\u0000":{"b\u0000c":"\u0000\u0000"}}"#;
    let (status, answer) = post(&server, "/v1/webhook", event).await;
    assert_eq!(status, 200, "{answer}");
    let row = dest
        .row(SCHEMA, Table::Track, "nul-2")
        .await
        .expect("nul-2");
    assert_eq!(row["user_id"], "u\u{fffd}");
    dest.assert_event_stored(SCHEMA, Table::Track, &parse_body(event.as_bytes()), &[])
        .await;
    assert_names_sound(&dest).await;
    server.stop().await;
}

async fn lone_surrogates_become_replacement_characters(backend: Backend) {
    let (dest, server) = start(backend, "surrogate").await;
    let body = fixture("02-lone-surrogate-emoji.json");
    let (status, answer) = post(&server, "/v1/batch", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let row = dest
        .row(SCHEMA, Table::Track, "br-02-1")
        .await
        .expect("br-02-1");
    assert_eq!(row["properties__title"], "Weekend deal \u{fffd}");
    assert_eq!(row["properties__label"], "\u{fffd} tail first");
    assert_eq!(row["properties__pair_escaped"], "🚀");
    assert_eq!(row["properties__ok_emoji"], "launch 🚀 done");
    assert_eq!(row["properties__naïve_flag"], true);
    let fire = dest
        .column_of(SCHEMA, Table::Track, &["properties", "🔥score"])
        .await;
    assert_eq!(row[&fire], 10);
    let identify = dest
        .row(SCHEMA, Table::Identify, "br-02-2")
        .await
        .expect("br-02-2");
    assert_eq!(identify["traits__name"], "Zoë Quill 👩🏽‍💻");
    assert_eq!(identify["traits__bio"], "maker of 🇵🇹 tiles");
    assert_all_stored(&dest, &parse_body(&body), &TRACKING_REWRITES).await;
    // The same kind on the webhook: a lone low surrogate in a key, two highs in a row, and a
    // pair split by other text.
    let event = r#"{"type":"identify","messageId":"sur-2","userId":"u","traits":{"k\udc00":"\ud800\ud800","s":"\ud83dx\ude80"}}"#;
    assert_eq!(post(&server, "/v1/webhook", event).await.0, 200);
    let row = dest
        .row(SCHEMA, Table::Identify, "sur-2")
        .await
        .expect("sur-2");
    assert_eq!(row["traits__s"], "\u{fffd}x\u{fffd}");
    let key = dest
        .column_of(SCHEMA, Table::Identify, &["traits", "k\u{fffd}dc00"])
        .await;
    assert_eq!(row[&key], "\u{fffd}\u{fffd}");
    assert_names_sound(&dest).await;
    server.stop().await;
}

// ---- 04, 19: names -----------------------------------------------------------------------

async fn colliding_keys_keep_their_own_columns_for_good(backend: Backend) {
    let (dest, server) = start(backend, "collide").await;
    let body = fixture("04-snake-case-collision.json");
    let (status, answer) = post(&server, "/v1/webhook", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let parsed = parse_body(&body);
    assert_all_stored(&dest, &parsed, &[]).await;
    let columns = dest.key_columns(SCHEMA, Table::Track).await;
    let column = |key: &str| columns[&vec!["properties".to_owned(), key.to_owned()]][0].clone();
    // The key already in snake case keeps the plain name; the others get their own.
    assert_eq!(column("user_id"), "properties__user_id");
    assert_eq!(column("column_name"), "properties__column_name");
    assert_eq!(column("id"), "properties__id");
    let distinct: HashSet<String> = [
        "userId", "user_id", "UserID", "id", "ID", "Id", "planId", "PlanID",
    ]
    .iter()
    .map(|k| column(k))
    .collect();
    assert_eq!(distinct.len(), 8);
    let first = dest
        .row(SCHEMA, Table::Track, "br-04-1")
        .await
        .expect("br-04-1");
    let second = dest
        .row(SCHEMA, Table::Track, "br-04-2")
        .await
        .expect("br-04-2");
    assert_eq!(first[&column("UserID")], "u-pascal");
    assert_eq!(first[&column("userId")], "u-camel");
    assert_eq!(first["user_id"], "usr-1200");
    assert_eq!(second[&column("PlanID")], "p-pascal-2");
    assert_eq!(second[&column("user_id")], "u-snake-2");
    assert_eq!(second[&column("Id")], "title-2");
    let identify = dest.key_columns(SCHEMA, Table::Identify).await;
    let names: HashSet<&String> = ["firstName", "first_name", "FirstName"]
        .iter()
        .map(|k| &identify[&vec!["traits".to_owned(), (*k).to_owned()]][0])
        .collect();
    assert_eq!(names.len(), 3);
    // The same keys one event at a time, in another order and on a restarted service: every
    // key path lands where it did, whatever else its event holds.
    server.stop().await;
    let server = Server::start(sluice_tests::ingest::config(
        &dest.url,
        &["--tables", ALL_TABLES],
    ))
    .await;
    for (i, key) in ["Id", "UserID", "userId", "id", "PlanID"]
        .iter()
        .enumerate()
    {
        let event = json!({"type": "track", "messageId": format!("again-{i}"), "userId": "u",
            "event": "e", "properties": {key.to_string(): format!("v-{key}")}});
        assert_eq!(post(&server, "/v1/webhook", event.to_string()).await.0, 200);
        let row = dest
            .row(SCHEMA, Table::Track, &format!("again-{i}"))
            .await
            .expect("row");
        assert_eq!(row[&column(key)], format!("v-{key}"), "{key}");
    }
    assert_eq!(dest.key_columns(SCHEMA, Table::Track).await, {
        let mut now = dest.key_columns(SCHEMA, Table::Track).await;
        now.retain(|k, _| columns.contains_key(k));
        now
    });
    assert_names_sound(&dest).await;
    server.stop().await;
}

async fn degenerate_keys_each_get_a_column(backend: Backend) {
    let (dest, server) = start(backend, "degenerate").await;
    let body = fixture("19-symbol-empty-keys.json");
    let (status, answer) = post(&server, "/v1/webhook", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let parsed = parse_body(&body);
    assert_all_stored(&dest, &parsed, &[]).await;
    let columns = dest.key_columns(SCHEMA, Table::Track).await;
    let properties: Vec<&String> = parsed["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .map(|k| &columns[&vec!["properties".to_owned(), k.clone()]][0])
        .collect();
    assert_eq!(properties.iter().collect::<HashSet<_>>().len(), 14);
    for name in &properties {
        assert!(!name.chars().any(char::is_control), "{name:?}");
    }
    assert_eq!(
        columns[&vec!["properties".to_owned(), "1st_place".to_owned()]][0],
        "properties__1st_place"
    );
    // Several scripts: letters and digits are kept, lower-cased; keys that differ only in
    // symbols or in letters of another script never share a column.
    let event = json!({"type": "track", "messageId": "scripts", "userId": "u", "event": "e",
        "properties": {"Имя": 1, "имя": 2, "名前": 3, "Ünïcödé": 4, "صفحة": 5, "ページ": 6,
                       "a-b": 7, "a.b": 8, "a b": 9, "a_b": 10, "$a$b": 11}});
    assert_eq!(post(&server, "/v1/webhook", event.to_string()).await.0, 200);
    dest.assert_event_stored(SCHEMA, Table::Track, &event, &[])
        .await;
    let columns = dest.key_columns(SCHEMA, Table::Track).await;
    let name = |k: &str| columns[&vec!["properties".to_owned(), k.to_owned()]][0].clone();
    assert_eq!(name("名前"), "properties__名前");
    assert_eq!(name("ページ"), "properties__ページ");
    assert_eq!(name("a_b"), "properties__a_b");
    assert!(name("Имя") == "properties__имя" || name("имя") == "properties__имя");
    assert_ne!(name("Имя"), name("имя"));
    assert_eq!(name("Ünïcödé"), "properties__ünïcödé");
    assert_names_sound(&dest).await;
    server.stop().await;
}

// ---- 05: names the databases reserve ------------------------------------------------------

async fn reserved_and_system_names_load_under_safe_names(backend: Backend) {
    let (dest, server) = start(backend, "reserved").await;
    let body = fixture("05-reserved-words.json");
    let (status, answer) = post(&server, "/v1/webhook", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let parsed = parse_body(&body);
    assert_all_stored(&dest, &parsed, &[]).await;
    let group = dest
        .row(SCHEMA, Table::Group, "br-05-1")
        .await
        .expect("br-05-1");
    assert_eq!(group["traits__default"], true);
    assert_eq!(group["traits__order"], 3);
    assert_eq!(group["order"], 7);
    assert_eq!(group["user"], "top-level-user");
    for (key, value) in [
        ("xmin", json!(5)),
        ("tableoid", json!(99)),
        ("ctid", json!("(0,1)")),
        ("rowid", json!(11)),
        ("oid", json!(12)),
    ] {
        let column = dest.column_of(SCHEMA, Table::Group, &[key]).await;
        assert_ne!(column, key);
        assert!(column.starts_with(&format!("{key}_")), "{column}");
        assert_eq!(group[&column], value, "{key}");
    }
    let track = dest
        .row(SCHEMA, Table::Track, "br-05-2")
        .await
        .expect("br-05-2");
    assert_eq!(track["event"], "select");
    assert_eq!(track["properties__where"], "here");
    assert_names_sound(&dest).await;
    server.stop().await;
}

/// Every system column name of both databases, and Sluice's own, at the top level and nested,
/// many at once among ordinary events of concurrent requests: every request is answered 200 and
/// every row is there (a poison event must not fail its batch).
async fn poison_shaped_events_do_not_fail_their_batch(backend: Backend) {
    let (dest, server) = start(backend, "poison").await;
    let names = DATABASE_SYSTEM_COLUMNS
        .iter()
        .copied()
        .chain([
            "_sdc_sequence",
            "_sdc_received_at",
            "message_id",
            "amount__st",
            "x__bi",
            "",
            "\"",
            "a\"; DROP TABLE track; --",
        ])
        .collect::<Vec<_>>();
    let mut requests = Vec::new();
    for i in 0..60 {
        let event = if i % 3 == 0 {
            let name = names[(i / 3) % names.len()];
            json!({"type": "track", "messageId": format!("p-{i}"), "userId": "u", "event": "e",
                   name: i, "properties": {name: format!("v{i}")}})
        } else {
            json!({"type": "track", "messageId": format!("p-{i}"), "userId": "u", "event": "e",
                   "properties": {"plain": i}})
        };
        requests.push(event);
    }
    let sends = requests
        .iter()
        .map(|e| post(&server, "/v1/webhook", e.to_string()));
    for (status, answer) in futures::future::join_all(sends).await {
        assert_eq!(status, 200, "{answer}");
    }
    for event in &requests {
        dest.assert_event_stored(SCHEMA, Table::Track, event, &[])
            .await;
    }
    assert!(dest.rejected(SCHEMA).await.is_empty());
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 60);
    assert_names_sound(&dest).await;
    server.stop().await;
}

// ---- 07, 08, 09, 10: types -----------------------------------------------------------------

async fn numbers_widen_and_split_without_loss(backend: Backend) {
    let body = fixture("07-int-float-widening.json");
    let parsed = parse_body(&body);
    let events = events_of(&parsed);
    // As one batch, one event per request in file order, and in reverse order.
    let orders: [Vec<Value>; 3] = [
        vec![parsed.clone()],
        events.clone(),
        events.iter().rev().cloned().collect(),
    ];
    for (n, order) in orders.iter().enumerate() {
        let (dest, server) = start(backend, &format!("widen{n}")).await;
        for body in order {
            let (status, answer) = post(&server, "/v1/webhook", body.to_string()).await;
            assert_eq!(status, 200, "{answer}");
        }
        assert_all_stored(&dest, &parsed, &[]).await;
        if n < 2 {
            let r2 = dest
                .row(SCHEMA, Table::Track, "br-07-2")
                .await
                .expect("br-07-2");
            assert_eq!(r2["properties__price"], 20.0);
            assert_eq!(r2["properties__weight_kg"], 1.0);
            let r3 = dest
                .row(SCHEMA, Table::Track, "br-07-3")
                .await
                .expect("br-07-3");
            assert_eq!(r3["properties__qty__do"], 2.5);
        }
        server.stop().await;
    }
}

async fn a_trait_changing_type_splits_and_keeps_every_value(backend: Backend) {
    let (dest, server) = start(backend, "drift").await;
    let body = fixture("08-type-drift-created-at.json");
    let (status, answer) = post(&server, "/v1/webhook", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_all_stored(&dest, &parse_body(&body), &[]).await;
    let row = |id: &'static str| {
        let dest = &dest;
        async move { dest.row(SCHEMA, Table::Identify, id).await.expect(id) }
    };
    assert_eq!(row("br-08-1").await["traits__created_at"], "2021-09-12");
    assert_eq!(row("br-08-8").await["traits__created_at"], "1631404800");
    assert_eq!(row("br-08-2").await["traits__created_at__bi"], 1631404800);
    assert_eq!(row("br-08-3").await["traits__created_at__do"], 1631404800.5);
    assert_eq!(row("br-08-4").await["traits__created_at__bo"], true);
    assert_eq!(
        row("br-08-6").await["traits__created_at__seconds"],
        1631404800
    );
    assert_eq!(
        row("br-08-7").await["traits__created_at__js"],
        json!(["2021-09-12"])
    );
    assert!(row("br-08-5").await.get("traits__created_at").is_none());
    assert_eq!(row("br-08-2").await["traits__plan"], "pro");
    let columns = dest.columns(SCHEMA, Table::Identify).await;
    assert_eq!(
        columns["traits__plan"],
        Some(sluice_ingest::schema::ColumnType::Text)
    );
    server.stop().await;
}

async fn big_integers_keep_their_digits_and_doubles_round_trip(backend: Backend) {
    let (dest, server) = start(backend, "numbers").await;
    let body = fixture("09-big-numbers.json");
    let (status, answer) = post(&server, "/v1/track", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let row = dest
        .row(SCHEMA, Table::Track, "br-09-1")
        .await
        .expect("br-09-1");
    assert_eq!(row["properties__order_id"], json!(i64::MAX));
    for (key, digits) in [
        ("tweet_id", "9223372036854775808"),
        ("snowflake_u64", "18446744073709551615"),
        ("over_u64", "18446744073709551616"),
        ("ledger_total", "123456789012345678901234567890"),
        ("debt", "-9223372036854775809"),
    ] {
        assert_eq!(row[&format!("properties__{key}")], digits, "{key}");
    }
    assert_eq!(row["properties__max_double"], 1.7976931348623157e308);
    assert_eq!(row["properties__tiny"], 5e-324);
    assert_eq!(row["properties__neg_zero"].as_f64(), Some(0.0));
    assert_eq!(row["properties__int_as_exp"], 100.0);
    assert_eq!(row["properties__cents"], 19.99);
    assert_eq!(row["properties__precise_decimal"], 0.1);
    assert_all_stored(&dest, &parse_body(&body), &TRACKING_REWRITES).await;
    // The same kind: a big integer where a bigint column exists takes its text split, and
    // big integers as ids and inside arrays keep their digits too.
    let event = r#"{"type":"track","messageId":"big-2","userId":123456789012345678901234567890,"event":"e","properties":{"order_id":99999999999999999999,"list":[18446744073709551616]}}"#;
    assert_eq!(post(&server, "/v1/webhook", event).await.0, 200);
    let row = dest
        .row(SCHEMA, Table::Track, "big-2")
        .await
        .expect("big-2");
    assert_eq!(row["user_id"], "123456789012345678901234567890");
    assert_eq!(row["properties__order_id__st"], "99999999999999999999");
    dest.assert_event_stored(SCHEMA, Table::Track, &parse_body(event.as_bytes()), &[])
        .await;
    server.stop().await;
}

async fn nan_and_infinity_from_python_are_stored(backend: Backend) {
    let (dest, server) = start(backend, "nan").await;
    let body = String::from_utf8(fixture("10-nan-infinity-python.json"))
        .expect("utf-8")
        .replace("WRITE_KEY", WRITE_KEY);
    let (status, answer) = post(&server, "/v1/batch", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let one = dest
        .row(SCHEMA, Table::Track, "br-10-1")
        .await
        .expect("br-10-1");
    assert_eq!(one["properties__score"], "NaN");
    assert_eq!(one["properties__upper"], "Infinity");
    assert_eq!(one["properties__lower"], "-Infinity");
    assert_eq!(one["properties__score_str"], "NaN");
    assert_eq!(one["properties__flag_str"], "true");
    assert_eq!(one["properties__count_str"], "12");
    assert_eq!(one["properties__flag"], true);
    let two = dest
        .row(SCHEMA, Table::Track, "br-10-2")
        .await
        .expect("br-10-2");
    assert_eq!(two["properties__score"], 0.5);
    let columns = dest.columns(SCHEMA, Table::Track).await;
    use sluice_ingest::schema::ColumnType;
    assert_eq!(columns["properties__score"], Some(ColumnType::Double));
    assert_eq!(columns["properties__score_str"], Some(ColumnType::Text));
    assert_eq!(columns["properties__flag_str"], Some(ColumnType::Text));
    assert_all_stored(&dest, &parse_body(body.as_bytes()), &TRACKING_REWRITES).await;
    // On PostgreSQL the double column holds a real NaN, which SQL can find.
    if backend == Backend::Postgres {
        let pool = dest.warehouse(SCHEMA);
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM segment.track WHERE properties__score = 'NaN'::float8 AND properties__upper = 'Infinity'::float8",
        )
        .fetch_one(pool.postgres_pool().expect("postgres"))
        .await
        .expect("query");
        assert_eq!(n, 1);
    }
    server.stop().await;
}

// ---- 11: timestamps --------------------------------------------------------------------------

async fn unreadable_timestamps_are_kept_as_sent(backend: Backend) {
    let (dest, server) = start(backend, "timestamps").await;
    let body = fixture("11-epoch-ms-timestamps.json");
    let (status, answer) = post(&server, "/v1/batch", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let track = dest
        .row(SCHEMA, Table::Track, "br-11-1")
        .await
        .expect("br-11-1");
    assert_eq!(track["timestamp__bi"], 1796032800000i64);
    assert!(
        track.get("timestamp").is_none(),
        "no time is made up: {track:?}"
    );
    assert_eq!(track["sent_at__bi"], 1796032802000i64);
    assert_eq!(track["context__library__name"], "analytics-go");
    assert!(track.get("received_at").is_some());
    let identify = dest
        .row(SCHEMA, Table::Identify, "br-11-2")
        .await
        .expect("br-11-2");
    assert_eq!(identify["timestamp__bi"], 1796032801000i64);
    assert_eq!(identify["traits__trial_ends_at"], 1798761600);
    assert_eq!(identify["context__library__name"], "analytics-go");
    assert_all_stored(&dest, &parse_body(&body), &["receivedAt"]).await;
    // Each shape a timestamp may come in that Sluice cannot read keeps its raw value, on both
    // routes; microseconds are kept; an offset without a colon is read.
    let shapes = [
        ("ts-year", json!("10013-01-01T00:00:00Z"), "timestamp__st"),
        ("ts-date", json!("2026-02-30T10:00:00Z"), "timestamp__st"),
        ("ts-word", json!("yesterday"), "timestamp__st"),
        ("ts-bool", json!(true), "timestamp__bo"),
        ("ts-float", json!(1796032800.5), "timestamp__do"),
    ];
    for (route, extra) in [("/v1/webhook", "w"), ("/v1/track", "t")] {
        for (id, raw, column) in &shapes {
            let id = format!("{id}-{extra}");
            let event = json!({"type": "track", "messageId": id, "userId": "u", "event": "e", "timestamp": raw});
            let (status, answer) = post(&server, route, event.to_string()).await;
            assert_eq!(status, 200, "{answer}");
            let row = dest.row(SCHEMA, Table::Track, &id).await.expect("row");
            assert_eq!(&row[*column], raw, "{id}");
        }
        let id = format!("ts-micro-{extra}");
        let event = json!({"type": "track", "messageId": id, "userId": "u", "event": "e",
            "timestamp": "2026-11-30T15:30:00.123456+0530"});
        assert_eq!(post(&server, route, event.to_string()).await.0, 200);
        let row = dest.row(SCHEMA, Table::Track, &id).await.expect("row");
        assert_eq!(
            row.get("timestamp").and_then(Value::as_str),
            Some("2026-11-30T10:00:00.123456Z")
        );
    }
    server.stop().await;
}

// ---- 15: identity fields ------------------------------------------------------------------------

async fn numeric_ids_are_text(backend: Backend) {
    let (dest, server) = start(backend, "ids").await;
    let body = fixture("15-numeric-ids.json");
    let (status, answer) = post(&server, "/v1/batch", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let identify = dest
        .row(SCHEMA, Table::Identify, "br-15-1")
        .await
        .expect("br-15-1");
    assert_eq!(identify["user_id"], "12345");
    assert_eq!(identify["traits__account_id"], 678);
    assert_eq!(
        dest.row(SCHEMA, Table::Group, "br-15-2")
            .await
            .expect("group")["group_id"],
        "42"
    );
    assert_eq!(
        dest.row(SCHEMA, Table::Alias, "br-15-3")
            .await
            .expect("alias")["previous_id"],
        "987654321"
    );
    let numeric = dest
        .row(SCHEMA, Table::Track, "150004")
        .await
        .expect("150004");
    assert_eq!(numeric["properties__probe"], "br-15-4");
    assert_eq!(
        dest.row(SCHEMA, Table::Track, "br-15-5")
            .await
            .expect("br-15-5")["anonymous_id"],
        "5550001"
    );
    assert_eq!(
        dest.row(SCHEMA, Table::Identify, "br-15-7")
            .await
            .expect("br-15-7")["user_id"],
        "9007199254740993"
    );
    for table in Table::ALL {
        let columns = dest.columns(SCHEMA, table).await;
        assert!(
            !columns.keys().any(|c| c.contains("_id__")),
            "{table}: {columns:?}"
        );
    }
    assert_all_stored(&dest, &parse_body(&body), &TRACKING_REWRITES).await;
    // Every id field with every scalar type, on the webhook and the Tracking API; `150004` and
    // `"150004"` are one key.
    let mut n = 0;
    let types = [
        json!(7),
        json!(-7),
        json!(7.5),
        json!(true),
        json!("7"),
        json!(18446744073709551615u64),
    ];
    for route in ["/v1/webhook", "/v1/batch"] {
        for value in &types {
            for field in [
                "messageId",
                "userId",
                "anonymousId",
                "groupId",
                "previousId",
            ] {
                n += 1;
                let (kind, mut event) = if field == "previousId" {
                    (
                        Table::Alias,
                        json!({"type": "alias", "messageId": format!("id-{n}"), "userId": "u", "previousId": "p"}),
                    )
                } else {
                    (
                        Table::Group,
                        json!({"type": "group", "messageId": format!("id-{n}"), "userId": "u", "groupId": "g"}),
                    )
                };
                event[field] = match (field, value) {
                    // Distinct message ids per case: the number with the case's count.
                    ("messageId", Value::Number(_)) => json!(n * 1000),
                    _ => value.clone(),
                };
                let body = if route == "/v1/batch" {
                    json!({"batch": [event]})
                } else {
                    event.clone()
                };
                let (status, answer) = post(&server, route, body.to_string()).await;
                assert_eq!(status, 200, "{event} -> {answer}");
                dest.assert_event_stored(SCHEMA, kind, &event, &TRACKING_REWRITES)
                    .await;
            }
        }
    }
    let again = json!({"type": "track", "messageId": "150004", "userId": "12345", "event": "Numeric Message Id", "properties": {"probe": "again"}});
    assert_eq!(post(&server, "/v1/webhook", again.to_string()).await.0, 200);
    let rows = dest.rows(SCHEMA, Table::Track).await;
    assert_eq!(
        rows.iter().filter(|r| r["message_id"] == "150004").count(),
        1
    );
    server.stop().await;
}

// ---- 16, 17: size ------------------------------------------------------------------------------

async fn wide_events_fill_columns_then_overflow(backend: Backend) {
    let (dest, server) = start(backend, "wide").await;
    let body = fixture("16-wide-event.json");
    let (status, answer) = post(&server, "/v1/webhook", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let parsed = parse_body(&body);
    assert_all_stored(&dest, &parsed, &[]).await;
    assert!(dest.rejected(SCHEMA).await.is_empty());
    let columns = dest.columns(SCHEMA, Table::Identify).await;
    assert!(columns.len() <= sluice_ingest::schema::COLUMN_LIMIT);
    // A narrow identify still loads in columns afterwards.
    let narrow = json!({"type": "identify", "messageId": "narrow", "userId": "u", "traits": {"attr_0000": 5, "email": "a@b.c"}});
    assert_eq!(
        post(&server, "/v1/webhook", narrow.to_string()).await.0,
        200
    );
    let row = dest
        .row(SCHEMA, Table::Identify, "narrow")
        .await
        .expect("narrow");
    assert_eq!(row["traits__attr_0000"], 5);
    assert_eq!(row["traits__email"], "a@b.c");
    // Also one by one, the wide event on the Tracking API is over its 32 KB limit: a 400 that
    // names it.
    let first = &events_of(&parsed)[0];
    let (status, answer) = post(&server, "/v1/identify", first.to_string()).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().expect("error").contains("32 KB"),
        "{answer}"
    );
    server.stop().await;
}

async fn deep_events_load_with_their_tree_as_json(backend: Backend) {
    let (dest, server) = start(backend, "deep").await;
    let body = fixture("17-deep-nesting.json");
    let (status, answer) = post(&server, "/v1/webhook", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let parsed = parse_body(&body);
    assert_all_stored(&dest, &parsed, &[]).await;
    let one = dest
        .row(SCHEMA, Table::Track, "br-17-1")
        .await
        .expect("br-17-1");
    let two = dest
        .row(SCHEMA, Table::Track, "br-17-2")
        .await
        .expect("br-17-2");
    assert_eq!(one["properties__shallow"], "kept");
    assert_eq!(two["properties__shallow"], "kept-2");
    let columns = dest.key_columns(SCHEMA, Table::Track).await;
    let deep: Vec<(&Vec<String>, &Vec<String>)> = columns
        .iter()
        .filter(|(k, _)| k.get(1).map(String::as_str) == Some("tree"))
        .collect();
    assert_eq!(
        deep.len(),
        1,
        "one column holds the tree below the flattening depth"
    );
    assert_eq!(deep[0].0.len(), MAX_FLATTEN_DEPTH);
    let column = &deep[0].1[0];
    assert!(column.len() <= MAX_IDENTIFIER_BYTES);
    let text = |row: &serde_json::Map<String, Value>| row[column].to_string();
    assert!(text(&one).contains("bottom-1") && text(&two).contains("bottom-2"));
    // Deeper than the body limit: refused with a 400 that names it, and the process serves on.
    let hostile = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let (status, answer) = post(&server, "/v1/webhook", hostile).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains(&MAX_DEPTH.to_string()),
        "{answer}"
    );
    let mut nested = json!("bottom");
    for _ in 0..(MAX_DEPTH - 2) {
        nested = json!({ "a": nested });
    }
    let at_limit = json!({"type": "track", "messageId": "limit", "userId": "u", "event": "e", "properties": nested});
    assert_eq!(
        post(&server, "/v1/webhook", at_limit.to_string()).await.0,
        200
    );
    assert!(dest.row(SCHEMA, Table::Track, "limit").await.is_some());
    server.stop().await;
}

// ---- 20: duplicates in one batch -------------------------------------------------------------

async fn duplicates_in_a_batch_are_one_row_and_retries_change_nothing(backend: Backend) {
    let (dest, server) = start(backend, "duplicates").await;
    let body = fixture("20-dup-messageid-mixed-batch.json");
    for _ in 0..2 {
        let (status, answer) = post(&server, "/v1/batch", body.clone()).await;
        assert_eq!(status, 200, "{answer}");
        let tracks = dest.rows(SCHEMA, Table::Track).await;
        assert_eq!(tracks.len(), 2, "{tracks:?}");
        let step = tracks
            .iter()
            .find(|r| r["message_id"] == "br-20-1")
            .expect("br-20-1");
        assert_eq!(step["properties__step"], 2);
        let generated = tracks
            .iter()
            .find(|r| r["message_id"] != "br-20-1")
            .expect("generated");
        assert_eq!(generated["properties__probe"], "br-20-nomid");
        assert!(
            generated["message_id"]
                .as_str()
                .expect("id")
                .starts_with("sluice-")
        );
        for (table, id) in [
            (Table::Identify, "br-20-2"),
            (Table::Page, "br-20-3"),
            (Table::Screen, "br-20-4"),
            (Table::Group, "br-20-5"),
            (Table::Alias, "br-20-6"),
        ] {
            assert_eq!(dest.rows(SCHEMA, table).await.len(), 1, "{table}");
            assert!(dest.row(SCHEMA, table, id).await.is_some(), "{id}");
        }
    }
    server.stop().await;
}

/// A second process, started on the same schema after the first assigned names, maps the same
/// key paths to the same columns (it reads `_sdc_columns`), including ones that needed a hash.
async fn a_second_process_maps_keys_to_the_same_columns(backend: Backend) {
    let (dest, server) = start(backend, "second").await;
    let keys = ["userId", "user_id", "UserID", "$x", "", "xmin", "a__st"];
    let first = json!({"type": "track", "messageId": "one", "userId": "u", "event": "e",
        "properties": keys.iter().map(|k| (k.to_string(), json!(format!("1-{k}")))).collect::<serde_json::Map<_, _>>()});
    assert_eq!(post(&server, "/v1/webhook", first.to_string()).await.0, 200);
    let before = dest.key_columns(SCHEMA, Table::Track).await;
    server.stop().await;
    let process = Process::spawn(&["--database-url", &dest.url, "--schema", SCHEMA], &[]).await;
    for (i, key) in keys.iter().rev().enumerate() {
        let event = json!({"type": "track", "messageId": format!("two-{i}"), "userId": "u", "event": "e",
            "properties": {key.to_string(): format!("2-{key}")}});
        let response = reqwest::Client::new()
            .post(process.url("/v1/webhook"))
            .body(event.to_string())
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status().as_u16(), 200);
        let row = dest
            .row(SCHEMA, Table::Track, &format!("two-{i}"))
            .await
            .expect("row");
        let column = &before[&vec!["properties".to_owned(), key.to_string()]][0];
        assert_eq!(row[column], format!("2-{key}"), "{key}");
    }
    assert_eq!(dest.key_columns(SCHEMA, Table::Track).await, before);
    drop(process);
}

/// PostgreSQL only: a table that cannot grow (its dropped columns still count toward
/// PostgreSQL's 1600, and are never given back) refuses every new column with SQLSTATE 54011.
/// Events that need a new column still load, their new keys in `_sdc_overflow`; the other
/// events of the same batch and of concurrent requests load as usual; nothing is answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_columns_send_new_keys_to_overflow_not_the_batch_to_503() {
    let (dest, server) = start(Backend::Postgres, "refused-ddl").await;
    let base = dest.columns(SCHEMA, Table::Track).await.len();
    let fillers: Vec<String> = (0..(1600 - base)).map(|i| format!("filler_{i}")).collect();
    let alter = |verb: &str, suffix: &str| {
        let parts: Vec<String> = fillers
            .iter()
            .map(|c| format!("{verb} {c}{suffix}"))
            .collect();
        format!("ALTER TABLE segment.track {}", parts.join(", "))
    };
    dest.execute(SCHEMA, &alter("ADD COLUMN", " int")).await;
    dest.execute(SCHEMA, &alter("DROP COLUMN", "")).await;
    let event = |i: usize| {
        let properties = if i.is_multiple_of(2) {
            json!({"new_key": i})
        } else {
            json!({})
        };
        json!({"type": "track", "messageId": format!("ddl-{i}"), "userId": "u", "event": "e", "properties": properties})
    };
    let batch: Vec<Value> = (0..20).map(event).collect();
    let (status, answer) = post(
        &server,
        "/v1/webhook",
        Value::Array(batch.clone()).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let singles: Vec<Value> = (20..40).map(event).collect();
    let sends = singles
        .iter()
        .map(|e| post(&server, "/v1/webhook", e.to_string()));
    for (status, answer) in futures::future::join_all(sends).await {
        assert_eq!(status, 200, "{answer}");
    }
    for e in batch.iter().chain(&singles) {
        dest.assert_event_stored(SCHEMA, Table::Track, e, &[]).await;
    }
    let row = dest
        .row(SCHEMA, Table::Track, "ddl-2")
        .await
        .expect("ddl-2");
    assert_eq!(row["_sdc_overflow"], json!({"properties": {"new_key": 2}}));
    assert!(dest.rejected(SCHEMA).await.is_empty());
    server.stop().await;
}

/// More of the same kinds, found by trying: a wide row of short texts between integers (whose
/// alignment padding PostgreSQL counts), numbers no double or `numeric` holds, in columns and in
/// JSON, a leap second, and a `messageId` too long for any key.
async fn more_of_the_same_kinds(backend: Backend) {
    let (dest, server) = start(backend, "more").await;
    let mut wide = serde_json::Map::new();
    for i in 0..600 {
        wide.insert(format!("k{i:04}a"), json!(""));
        wide.insert(format!("k{i:04}b"), json!(i));
    }
    let events = [
        json!({"type": "track", "messageId": "padded", "userId": "u", "event": "e", "properties": wide}),
        parse_body(br#"{"type": "track", "messageId": "huge", "userId": "u", "event": "e", "properties": {"a": [1e200000], "t": 1e-400, "z": 2.5e-330, "n": 1e200000}}"#),
        json!({"type": "track", "messageId": "leap", "userId": "u", "event": "e", "timestamp": "2016-12-31T23:59:60Z"}),
    ];
    for route in ["/v1/webhook", "/v1/batch"] {
        for event in &events {
            let body = if route == "/v1/batch" {
                json!({"batch": [event]})
            } else {
                event.clone()
            };
            let body = sluice_ingest::json::to_json_text(&body);
            let (status, answer) = post(&server, route, body).await;
            assert_eq!(status, 200, "{answer}");
            let skip: &[&str] = if route == "/v1/batch" {
                &TRACKING_REWRITES
            } else {
                &[]
            };
            dest.assert_event_stored(SCHEMA, Table::Track, event, skip)
                .await;
        }
        assert!(
            dest.rejected(SCHEMA).await.is_empty(),
            "{:?}",
            dest.rejected(SCHEMA).await
        );
        let leap = dest.row(SCHEMA, Table::Track, "leap").await.expect("leap");
        assert_eq!(leap["timestamp"], "2017-01-01T00:00:00.000000Z");
        let huge = dest.row(SCHEMA, Table::Track, "huge").await.expect("huge");
        assert_eq!(huge["properties__t"], "1e-400");
        assert_eq!(huge["properties__a"], json!(["1e200000"]));
    }
    let long = json!({"type": "track", "messageId": "m".repeat(3000), "userId": "u", "event": "e"});
    let (status, answer) = post(&server, "/v1/webhook", long.to_string()).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().expect("error").contains("2000"),
        "{answer}"
    );
    server.stop().await;
}

sluice_tests::on_both_backends!(
    more_of_the_same_kinds,
    nul_characters_become_replacement_characters,
    lone_surrogates_become_replacement_characters,
    colliding_keys_keep_their_own_columns_for_good,
    degenerate_keys_each_get_a_column,
    reserved_and_system_names_load_under_safe_names,
    poison_shaped_events_do_not_fail_their_batch,
    numbers_widen_and_split_without_loss,
    a_trait_changing_type_splits_and_keeps_every_value,
    big_integers_keep_their_digits_and_doubles_round_trip,
    nan_and_infinity_from_python_are_stored,
    unreadable_timestamps_are_kept_as_sent,
    numeric_ids_are_text,
    wide_events_fill_columns_then_overflow,
    deep_events_load_with_their_tree_as_json,
    duplicates_in_a_batch_are_one_row_and_retries_change_nothing,
    a_second_process_maps_keys_to_the_same_columns,
);

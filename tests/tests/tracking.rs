//! Segment's HTTP Tracking API (`/v1/track`, `/v1/batch`, ...) end to end on PostgreSQL, with a
//! SQLite run of the main path.

use std::io::Write;

use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_ingest::normalize::parse_timestamp;
use sluice_tests::ingest::{Backend, Destination, serve};

const SCHEMA: &str = "segment";
const ALL_TABLES: &str = "alias,group,identify,page,screen,track";

fn basic(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

async fn send(url: &str, body: impl Into<reqwest::Body>, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("sent");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn row_count(dest: &Destination) -> usize {
    let mut n = 0;
    for table in Table::ALL {
        n += dest.rows(SCHEMA, table).await.len();
    }
    n
}

fn time(row: &serde_json::Map<String, Value>, column: &str) -> DateTime<Utc> {
    parse_timestamp(row[column].as_str().expect("timestamp text")).expect("timestamp")
}

async fn every_call_lands_through_long_and_short_routes(backend: Backend) {
    let (dest, server) = serve(
        backend,
        "tracking",
        &["--write-keys", "wk1,wk2", "--tables", ALL_TABLES],
    )
    .await;
    let auth = basic("wk1");
    let calls = [
        (
            "/v1/track",
            json!({"messageId": "t1", "userId": "u", "event": "Signed Up", "properties": {"plan": "pro"}}),
        ),
        (
            "/v1/t",
            json!({"messageId": "t2", "anonymousId": "a", "event": "Clicked"}),
        ),
        (
            "/v1/identify",
            json!({"messageId": "i1", "userId": "u", "traits": {"email": "u@example.com"}}),
        ),
        (
            "/v1/page",
            json!({"messageId": "p1", "userId": "u", "name": "Home"}),
        ),
        (
            "/v1/s",
            json!({"messageId": "s1", "userId": "u", "name": "Main"}),
        ),
        (
            "/v1/group",
            json!({"messageId": "g1", "userId": "u", "groupId": "acme"}),
        ),
        (
            "/v1/a",
            json!({"messageId": "a1", "userId": "u", "previousId": "anon"}),
        ),
    ];
    for (path, body) in &calls {
        let (status, answer) = send(
            &server.url(path),
            body.to_string(),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!((status, answer), (200, json!({"success": true})), "{path}");
    }
    // The write key may also come in the body, and is not stored.
    let in_body = json!({"writeKey": "wk2", "messageId": "t3", "userId": "u", "event": "Body Key"});
    assert_eq!(
        send(&server.url("/v1/track"), in_body.to_string(), &[])
            .await
            .0,
        200
    );
    let track = dest.row(SCHEMA, Table::Track, "t1").await.expect("t1");
    assert_eq!(track["type"], "track");
    assert_eq!(track["event"], "Signed Up");
    assert_eq!(track["properties__plan"], "pro");
    assert!(track.contains_key("received_at") && track.contains_key("timestamp"));
    assert_eq!(
        dest.row(SCHEMA, Table::Track, "t2").await.expect("t2")["anonymous_id"],
        "a"
    );
    let keyed = dest.row(SCHEMA, Table::Track, "t3").await.expect("t3");
    assert!(!keyed.contains_key("write_key"), "{keyed:?}");
    assert_eq!(
        dest.row(SCHEMA, Table::Identify, "i1").await.expect("i1")["traits__email"],
        "u@example.com"
    );
    assert_eq!(
        dest.row(SCHEMA, Table::Page, "p1").await.expect("p1")["name"],
        "Home"
    );
    assert_eq!(
        dest.row(SCHEMA, Table::Screen, "s1").await.expect("s1")["type"],
        "screen"
    );
    assert_eq!(
        dest.row(SCHEMA, Table::Group, "g1").await.expect("g1")["group_id"],
        "acme"
    );
    assert_eq!(
        dest.row(SCHEMA, Table::Alias, "a1").await.expect("a1")["previous_id"],
        "anon"
    );
    server.stop().await;
}

async fn batch_merges_context_and_is_all_or_nothing(backend: Backend) {
    let (dest, server) = serve(backend, "batch", &["--write-keys", "wk"]).await;
    let url = server.url("/v1/batch");
    let batch = json!({
        "writeKey": "wk",
        "context": {"library": {"name": "analytics-python", "version": "2.3.0"}, "ip": "10.0.0.1"},
        "batch": [
            {"type": "track", "messageId": "b1", "userId": "u", "event": "A", "context": {"ip": "1.2.3.4"}},
            {"type": "identify", "messageId": "b2", "userId": "u", "traits": {"name": "U"}}
        ]
    });
    assert_eq!(send(&url, batch.to_string(), &[]).await.0, 200);
    let b1 = dest.row(SCHEMA, Table::Track, "b1").await.expect("b1");
    assert_eq!(b1["context__ip"], "1.2.3.4", "the item's own context wins");
    assert_eq!(b1["context__library__name"], "analytics-python");
    let b2 = dest.row(SCHEMA, Table::Identify, "b2").await.expect("b2");
    assert_eq!(b2["context__ip"], "10.0.0.1");
    let before = row_count(&dest).await;
    let bad = json!({"writeKey": "wk", "batch": [
        {"type": "track", "messageId": "b3", "userId": "u", "event": "A"},
        {"type": "track", "messageId": "b4", "userId": "u"}
    ]});
    let (status, answer) = send(&url, bad.to_string(), &[]).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().expect("error").contains("event 1"),
        "{answer}"
    );
    assert_eq!(
        row_count(&dest).await,
        before,
        "a refused batch stores nothing"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_write_key_is_401_and_stores_nothing() {
    let (dest, server) = serve(Backend::Postgres, "writekey", &["--write-keys", "right"]).await;
    let event = json!({"messageId": "x", "userId": "u", "event": "E"}).to_string();
    for headers in [vec![], vec![("authorization", basic("wrong"))]] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, answer) = send(&server.url("/v1/track"), event.clone(), &headers).await;
        assert_eq!(status, 401);
        assert!(
            answer["error"]
                .as_str()
                .expect("error")
                .contains("write key")
        );
    }
    let in_body = json!({"writeKey": "wrong", "batch": [{"type": "track", "messageId": "y", "userId": "u", "event": "E"}]});
    assert_eq!(
        send(&server.url("/v1/batch"), in_body.to_string(), &[])
            .await
            .0,
        401
    );
    assert_eq!(row_count(&dest).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_decoded() {
    let (dest, server) = serve(Backend::Postgres, "gzip", &[]).await;
    let body =
        json!({"batch": [{"type": "track", "messageId": "z1", "userId": "u", "event": "Zipped"}]});
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(body.to_string().as_bytes())
        .expect("gzip");
    let zipped = encoder.finish().expect("gzip");
    let (status, answer) = send(
        &server.url("/v1/batch"),
        zipped,
        &[("content-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        dest.row(SCHEMA, Table::Track, "z1").await.expect("z1")["event"],
        "Zipped"
    );
    let (status, _) = send(
        &server.url("/v1/batch"),
        b"not gzip".to_vec(),
        &[("content-encoding", "gzip")],
    )
    .await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_and_named() {
    let (dest, server) = serve(Backend::Postgres, "limits", &[]).await;
    let big_event = json!({"messageId": "big", "userId": "u", "event": "E", "properties": {"blob": "x".repeat(33 * 1024)}});
    let (status, answer) = send(&server.url("/v1/track"), big_event.to_string(), &[]).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().expect("error").contains("32 KB"),
        "{answer}"
    );
    let items: Vec<Value> = (0..20)
        .map(|i| json!({"type": "track", "messageId": format!("m{i}"), "userId": "u", "event": "E", "properties": {"blob": "x".repeat(30 * 1024)}}))
        .collect();
    let (status, answer) = send(
        &server.url("/v1/batch"),
        json!({"batch": items}).to_string(),
        &[],
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().expect("error").contains("500 KB"),
        "{answer}"
    );
    let many: Vec<Value> = (0..2501)
        .map(
            |i| json!({"type": "track", "messageId": format!("n{i}"), "userId": "u", "event": "E"}),
        )
        .collect();
    let (status, answer) = send(
        &server.url("/v1/batch"),
        json!({"batch": many}).to_string(),
        &[],
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().expect("error").contains("2500"),
        "{answer}"
    );
    assert_eq!(row_count(&dest).await, 0, "nothing stored");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_request_without_message_id_is_one_row() {
    let (dest, server) = serve(Backend::Postgres, "retry", &[]).await;
    let event = json!({"userId": "u", "event": "No Id", "timestamp": "2024-05-01T10:00:00Z", "sentAt": "2024-05-01T10:00:01Z"});
    for _ in 0..3 {
        assert_eq!(
            send(&server.url("/v1/track"), event.to_string(), &[])
                .await
                .0,
            200
        );
    }
    let rows = dest.rows(SCHEMA, Table::Track).await;
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0]["message_id"]
            .as_str()
            .expect("id")
            .starts_with("sluice-")
    );
    let other = json!({"userId": "u", "event": "Another", "timestamp": "2024-05-01T10:00:00Z"});
    assert_eq!(
        send(&server.url("/v1/track"), other.to_string(), &[])
            .await
            .0,
        200
    );
    assert_eq!(dest.rows(SCHEMA, Table::Track).await.len(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_clock_skew_is_corrected() {
    let (dest, server) = serve(Backend::Postgres, "skew", &[]).await;
    // The client's clock runs far ahead: it stamped the call 5 s before sending it.
    let event = json!({"messageId": "skew", "userId": "u", "event": "E",
        "timestamp": "2030-01-01T00:00:00.000Z", "sentAt": "2030-01-01T00:00:05.000Z"});
    let before = Utc::now();
    assert_eq!(
        send(&server.url("/v1/track"), event.to_string(), &[])
            .await
            .0,
        200
    );
    let after = Utc::now();
    let row = dest.row(SCHEMA, Table::Track, "skew").await.expect("row");
    let received = time(&row, "received_at");
    assert!(before - chrono::Duration::milliseconds(1) <= received && received <= after);
    assert_eq!(
        time(&row, "original_timestamp"),
        parse_timestamp("2030-01-01T00:00:00Z").expect("t")
    );
    assert_eq!(
        time(&row, "timestamp"),
        received - chrono::Duration::seconds(5)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_of_allowed_origins_pass_cors() {
    let (_dest, server) = serve(
        Backend::Postgres,
        "cors",
        &["--cors-origins", "https://shop.example.com"],
    )
    .await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, server.url("/v1/t"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let allowed = preflight("https://shop.example.com")
        .await
        .expect("preflight");
    assert_eq!(allowed.status().as_u16(), 204);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert!(
        allowed.headers()["access-control-allow-methods"]
            .to_str()
            .expect("text")
            .contains("POST")
    );
    let other = preflight("https://evil.example.com")
        .await
        .expect("preflight");
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    let event = json!({"messageId": "c1", "userId": "u", "event": "E"}).to_string();
    let posted = client
        .post(server.url("/v1/t"))
        .header("origin", "https://shop.example.com")
        .body(event)
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status().as_u16(), 200);
    assert_eq!(
        posted.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    server.stop().await;
}

sluice_tests::on_both_backends!(
    every_call_lands_through_long_and_short_routes,
    batch_merges_context_and_is_all_or_nothing,
);

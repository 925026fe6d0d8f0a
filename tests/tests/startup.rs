//! Start-up and least privilege on a real PostgreSQL server: the HTTP server
//! answers from the start, events and `/readyz` wait for the schema with 503, a missing
//! privilege is reported with the grant to give, and a role without `CREATE` on the database
//! loads into a schema created for it beforehand.

use std::time::Duration;

use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_tests::ingest::{Backend, Destination, Server, config};
use sluice_tests::postgres::{create_role, fresh_database, run_as_admin, url_as};

const SCHEMA: &str = "segment";

fn track(message_id: &str) -> String {
    json!({
        "type": "track", "messageId": message_id, "userId": "u1", "event": "Order Completed",
        "timestamp": "2024-05-01T10:00:00.000Z", "properties": {"revenue": 1}
    })
    .to_string()
}

/// Status, `Retry-After` and body of a request.
async fn answer(request: reqwest::RequestBuilder) -> (u16, Option<String>, String) {
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, retry_after, response.text().await.expect("body"))
}

async fn get(url: String) -> (u16, Option<String>, String) {
    answer(reqwest::Client::new().get(url)).await
}

async fn post(url: String, body: String) -> (u16, Option<String>, String) {
    answer(reqwest::Client::new().post(url).body(body)).await
}

/// The `error` of a JSON error body, else the body.
fn message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.to_owned())
}

/// Polls `/readyz` until its status and message satisfy `done` (at most 60 s), and returns the
/// message.
async fn readyz_until(server: &Server, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        let (status, _, body) = get(server.url("/readyz")).await;
        let body = message(&body);
        if done(status, &body) {
            return body;
        }
        last = format!("{status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("/readyz never showed {what}; last answer: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_answer_while_the_database_is_unreachable() {
    // Port 1 on loopback: nothing listens, every connection is refused.
    let server = Server::spawn(config("postgres://sluice@127.0.0.1:1/warehouse", &[])).await;
    let (status, _, body) = get(server.url("/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _, body) = get(server.url("/metrics")).await;
    assert_eq!(status, 200);
    assert!(body.contains("sluice_queue_depth 0"), "{body}");
    readyz_until(&server, "the database not reachable", |status, body| {
        status == 503 && body.contains("not reachable")
    })
    .await;
    let (status, retry_after, _) = get(server.url("/readyz")).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("5")));
    for route in ["/v1/webhook", "/v1/track"] {
        let (status, retry_after, body) = post(server.url(route), track("early")).await;
        assert_eq!(status, 503, "{route}: {body}");
        assert_eq!(retry_after.as_deref(), Some("5"), "{route}");
        assert!(message(&body).contains("not ready"), "{route}: {body}");
    }
    // Still alive after several failed attempts to reach the database.
    assert_eq!(get(server.url("/healthz")).await.0, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_role_loads_into_a_schema_created_beforehand() {
    let url = fresh_database("least_privilege").await;
    let role = create_role("lp").await;
    run_as_admin(
        &url,
        &format!("CREATE SCHEMA {SCHEMA}; GRANT USAGE, CREATE ON SCHEMA {SCHEMA} TO \"{role}\""),
    )
    .await;
    let role_url = url_as(&url, &role);
    let server = Server::start(config(&role_url, &[])).await;
    for id in ["lp-1", "lp-2"] {
        let (status, _, body) = post(server.url("/v1/webhook"), track(id)).await;
        assert_eq!(status, 200, "{body}");
    }
    server.stop().await;

    let dest = Destination::existing(Backend::Postgres, &url);
    let ids: Vec<String> = dest
        .rows(SCHEMA, Table::Track)
        .await
        .iter()
        .map(|r| r["message_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, ["lp-1", "lp-2"]);
    // The role really had no CREATE on the database: the schema was used, not created.
    let can_create: bool =
        sqlx::query_scalar("SELECT has_database_privilege($1, current_database(), 'CREATE')")
            .bind(&role)
            .fetch_one(dest.warehouse(SCHEMA).postgres_pool().expect("postgres"))
            .await
            .expect("privilege check");
    assert!(!can_create);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_privileges_are_named_and_granting_them_recovers() {
    let url = fresh_database("missing_grant").await;
    let role = create_role("nogrant").await;
    let server = Server::spawn(config(&url_as(&url, &role), &[])).await;

    // No schema, and no CREATE on the database.
    let body = readyz_until(&server, "the database grant", |status, body| {
        status == 503 && body.contains("permission denied")
    })
    .await;
    let database = url.rsplit('/').next().expect("database name");
    assert!(
        body.contains(&format!(
            "GRANT CREATE ON DATABASE \"{database}\" TO \"{role}\""
        )),
        "{body}"
    );
    assert!(!body.contains("not reachable"), "{body}");

    // The schema exists now, without grants to the role.
    run_as_admin(&url, &format!("CREATE SCHEMA {SCHEMA}")).await;
    let grant = format!("GRANT USAGE, CREATE ON SCHEMA \"{SCHEMA}\" TO \"{role}\"");
    let body = readyz_until(&server, "the schema grant", |status, body| {
        status == 503 && body.contains("permission denied for schema")
    })
    .await;
    assert!(body.contains(&grant), "{body}");
    assert!(!body.contains("ON DATABASE"), "{body}");
    let (status, _, body) = post(server.url("/v1/webhook"), track("refused")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        message(&body).contains(&grant),
        "the event route says why: {body}"
    );

    // Given the grant the answer named, the service recovers without a restart.
    run_as_admin(
        &url,
        &format!("GRANT USAGE, CREATE ON SCHEMA {SCHEMA} TO \"{role}\""),
    )
    .await;
    readyz_until(&server, "ready", |status, _| status == 200).await;
    let (status, _, body) = post(server.url("/v1/webhook"), track("granted")).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_claimed_by_another_integration_keeps_the_ingest_unready() {
    let url = fresh_database("claimed").await;
    let owner = [
        "--integration-uid",
        "uid-a",
        "--integration-name",
        "SegmentIntegration t/a",
    ];
    let first = Server::start(config(&url, &owner)).await;
    assert_eq!(post(first.url("/v1/webhook"), track("a-1")).await.0, 200);
    first.stop().await;

    let other = [
        "--integration-uid",
        "uid-b",
        "--integration-name",
        "SegmentIntegration t/b",
    ];
    let second = Server::spawn(config(&url, &other)).await;
    let body = readyz_until(&second, "the claim", |status, body| {
        status == 503 && body.contains("already used by SegmentIntegration t/a (uid uid-a)")
    })
    .await;
    assert!(body.contains(SCHEMA), "{body}");
    let (status, _, _) = post(second.url("/v1/webhook"), track("b-1")).await;
    assert_eq!(status, 503, "the second integration loads nothing");
    second.stop().await;

    // The same owner again is welcome: a restart or a second replica.
    let again = Server::start(config(&url, &owner)).await;
    assert_eq!(post(again.url("/v1/webhook"), track("a-2")).await.0, 200);
    again.stop().await;
}

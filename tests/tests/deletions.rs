//! User deletion requests (issue 12, item 6): with `--honour-deletes` a Segment `delete` event
//! deletes every row of its user from every event table, once per message id, recorded in
//! `_sdc_deletions`; `sluice-ingest erase --user-id` does the same from the command line. Every
//! scenario runs on PostgreSQL and SQLite (the list at the bottom).

use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_tests::ingest::{Backend, Destination, Row, post_json, run_command, serve};

const SCHEMA: &str = "segment";

fn event(kind: &str, message_id: &str, user_id: &str) -> Value {
    let mut event = json!({
        "type": kind, "messageId": message_id, "userId": user_id,
        "timestamp": "2024-05-01T10:00:00.000Z",
    });
    match kind {
        "track" => event["event"] = json!("Order Completed"),
        "group" => event["groupId"] = json!("g1"),
        _ => {}
    }
    event
}

fn delete(message_id: &str, user_id: &str) -> Value {
    json!({"type": "delete", "messageId": message_id, "userId": user_id})
}

/// Events of u1 and u2 in track (2 + 1), identify (1 + 1), page (1 + 1) and group (0 + 1).
fn two_users() -> Value {
    json!([
        event("track", "t1", "u1"),
        event("track", "t2", "u1"),
        event("track", "t3", "u2"),
        event("identify", "i1", "u1"),
        event("identify", "i2", "u2"),
        event("page", "p1", "u1"),
        event("page", "p2", "u2"),
        event("group", "g2", "u2"),
    ])
}

/// Every row of every event table, by table, for comparing states.
async fn snapshot(dest: &Destination) -> Vec<(Table, Vec<Row>)> {
    let mut all = Vec::new();
    for table in Table::DEFAULT {
        all.push((table, dest.rows(SCHEMA, table).await));
    }
    all
}

/// The message ids of `user`'s rows in `table`, sorted.
async fn ids_of(dest: &Destination, table: Table, user: &str) -> Vec<String> {
    let mut ids: Vec<String> = dest
        .rows(SCHEMA, table)
        .await
        .into_iter()
        .filter(|r| r.get("user_id") == Some(&json!(user)))
        .filter_map(|r| {
            r.get("message_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    ids.sort();
    ids
}

/// `(message id, table, user id, rows deleted)` of every `_sdc_deletions` row.
async fn recorded(dest: &Destination) -> Vec<(String, String, String, i64)> {
    dest.deletions(SCHEMA)
        .await
        .into_iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().expect("text column").to_owned();
            let rows = r["rows_deleted"].as_i64().expect("a count");
            (
                text("message_id"),
                text("table_name"),
                text("user_id"),
                rows,
            )
        })
        .collect()
}

fn per_table(
    message_id: &str,
    user: &str,
    counts: [(&str, i64); 5],
) -> Vec<(String, String, String, i64)> {
    counts
        .into_iter()
        .map(|(t, n)| (message_id.to_owned(), t.to_owned(), user.to_owned(), n))
        .collect()
}

async fn a_delete_removes_every_row_of_its_user_once(backend: Backend) {
    let (dest, server) = serve(backend, "deletes", &["--honour-deletes"]).await;
    let url = server.url("/v1/webhook");
    let (status, answer) = post_json(&url, &two_users()).await;
    assert_eq!((status, &answer["loaded"]), (200, &json!(8)), "{answer}");

    let (status, answer) = post_json(&url, &delete("del-1", "u1")).await;
    assert_eq!(status, 200, "{answer}");
    let counts = json!({"group": 0, "identify": 1, "page": 1, "screen": 0, "track": 2});
    assert_eq!(
        answer["deleted"],
        json!([{"messageId": "del-1", "userId": "u1", "deleted": counts, "alreadyDone": false}])
    );
    for table in Table::DEFAULT {
        assert!(
            ids_of(&dest, table, "u1").await.is_empty(),
            "u1 rows left in {table}"
        );
    }
    assert_eq!(ids_of(&dest, Table::Track, "u2").await, ["t3"]);
    assert_eq!(ids_of(&dest, Table::Identify, "u2").await, ["i2"]);
    assert_eq!(ids_of(&dest, Table::Page, "u2").await, ["p2"]);
    assert_eq!(ids_of(&dest, Table::Group, "u2").await, ["g2"]);
    let expected = per_table(
        "del-1",
        "u1",
        [
            ("group", 0),
            ("identify", 1),
            ("page", 1),
            ("screen", 0),
            ("track", 2),
        ],
    );
    assert_eq!(recorded(&dest).await, expected);

    // A redelivery is acknowledged, recorded once, and changes nothing.
    let before = snapshot(&dest).await;
    let (status, answer) = post_json(&url, &delete("del-1", "u1")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["deleted"][0]["alreadyDone"], json!(true));
    assert_eq!(answer["deleted"][0]["deleted"], counts);
    assert_eq!(recorded(&dest).await, expected);
    assert_eq!(snapshot(&dest).await, before);

    // Deletion, not suppression: a later event of u1 loads as usual, and a redelivered
    // deletion request does not touch it.
    let (status, _) = post_json(&url, &event("track", "t4", "u1")).await;
    assert_eq!(status, 200);
    assert_eq!(ids_of(&dest, Table::Track, "u1").await, ["t4"]);
    let (status, _) = post_json(&url, &delete("del-1", "u1")).await;
    assert_eq!(status, 200);
    assert_eq!(ids_of(&dest, Table::Track, "u1").await, ["t4"]);
    server.stop().await;
}

async fn a_delete_in_a_batch_runs_after_the_batch_events(backend: Backend) {
    let (dest, server) = serve(backend, "deletes_batch", &["--honour-deletes"]).await;
    let url = server.url("/v1/webhook");
    // The delete comes first in the batch, yet runs after the batch's events have committed.
    let batch = json!([
        delete("del-3", "u3"),
        event("track", "t5", "u3"),
        event("track", "t6", "u4"),
    ]);
    let (status, answer) = post_json(&url, &batch).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["loaded"], json!(1 + 1));
    assert_eq!(answer["deleted"][0]["deleted"]["track"], json!(1));
    assert!(ids_of(&dest, Table::Track, "u3").await.is_empty());
    assert_eq!(ids_of(&dest, Table::Track, "u4").await, ["t6"]);

    // A delete without userId is refused, and nothing of the batch is loaded.
    let before = snapshot(&dest).await;
    let batch = json!([event("track", "t7", "u4"), {"type": "delete", "messageId": "del-4"}]);
    let (status, answer) = post_json(&url, &batch).await;
    assert_eq!(status, 400, "{answer}");
    let error = answer["error"].as_str().expect("an error message");
    assert!(
        error.contains("\"userId\"") && error.contains("delete"),
        "{error}"
    );
    assert_eq!(snapshot(&dest).await, before);

    server.stop().await;
}

async fn concurrent_deliveries_of_a_delete_carry_it_out_once(backend: Backend) {
    let (dest, server) = serve(backend, "deletes_concurrent", &["--honour-deletes"]).await;
    let url = server.url("/v1/webhook");
    assert_eq!(post_json(&url, &two_users()).await.0, 200);

    // Deliveries of one new request at the same time: carried out by one, recorded once.
    let sends: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post_json(&url, &delete("del-6", "u1")).await })
        })
        .collect();
    let mut first_times = 0;
    for send in sends {
        let (status, answer) = send.await.expect("sender");
        assert_eq!(status, 200, "{answer}");
        if answer["deleted"][0]["alreadyDone"] == json!(false) {
            first_times += 1;
        }
    }
    assert_eq!(first_times, 1, "one delivery carries the request out");
    let del6: Vec<_> = recorded(&dest)
        .await
        .into_iter()
        .filter(|r| r.0 == "del-6")
        .collect();
    assert_eq!(
        del6,
        per_table(
            "del-6",
            "u1",
            [
                ("group", 0),
                ("identify", 1),
                ("page", 1),
                ("screen", 0),
                ("track", 2)
            ]
        )
    );
    for table in Table::DEFAULT {
        assert!(
            ids_of(&dest, table, "u1").await.is_empty(),
            "u1 rows left in {table}"
        );
    }
    assert_eq!(ids_of(&dest, Table::Track, "u2").await, ["t3"]);
    server.stop().await;
}

async fn without_the_flag_a_delete_is_refused_with_501(backend: Backend) {
    let (dest, server) = serve(backend, "deletes_off", &[]).await;
    let url = server.url("/v1/webhook");
    assert_eq!(post_json(&url, &two_users()).await.0, 200);
    let before = snapshot(&dest).await;
    let (status, answer) = post_json(&url, &delete("del-5", "u1")).await;
    assert_eq!(status, 501, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("--honour-deletes"))
    );
    assert_eq!(snapshot(&dest).await, before);
    assert!(recorded(&dest).await.is_empty());
    server.stop().await;
}

async fn erase_deletes_a_users_rows_from_the_command_line(backend: Backend) {
    let (dest, server) = serve(backend, "erase", &[]).await;
    assert_eq!(
        post_json(&server.url("/v1/webhook"), &two_users()).await.0,
        200
    );
    server.stop().await;

    let printed = run_command(&["erase", "--user-id", "u2"], &dest.url, SCHEMA)
        .await
        .unwrap_or_else(|stderr| panic!("erase failed: {stderr}"));
    assert_eq!(
        printed["deleted"],
        json!({"group": 1, "identify": 1, "page": 1, "screen": 0, "track": 1})
    );
    assert_eq!(printed["userId"], json!("u2"));
    let message_id = printed["messageId"]
        .as_str()
        .expect("a message id")
        .to_owned();
    assert!(message_id.starts_with("erase:"), "{message_id}");

    for table in Table::DEFAULT {
        assert!(
            ids_of(&dest, table, "u2").await.is_empty(),
            "u2 rows left in {table}"
        );
    }
    assert_eq!(ids_of(&dest, Table::Track, "u1").await, ["t1", "t2"]);
    assert_eq!(ids_of(&dest, Table::Identify, "u1").await, ["i1"]);
    assert_eq!(ids_of(&dest, Table::Page, "u1").await, ["p1"]);
    assert_eq!(
        recorded(&dest).await,
        per_table(
            &message_id,
            "u2",
            [
                ("group", 1),
                ("identify", 1),
                ("page", 1),
                ("screen", 0),
                ("track", 1)
            ],
        )
    );
}

sluice_tests::on_both_backends!(
    a_delete_removes_every_row_of_its_user_once,
    a_delete_in_a_batch_runs_after_the_batch_events,
    concurrent_deliveries_of_a_delete_carry_it_out_once,
    without_the_flag_a_delete_is_refused_with_501,
    erase_deletes_a_users_rows_from_the_command_line,
);

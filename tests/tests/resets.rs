//! Table-level reset: `sluice-ingest reset --table track` empties a table and starts it again at
//! its next table version while the service keeps loading. The old rows are kept as
//! `track__v<old version>` (or dropped with `--drop-old`), every row's `_sdc_table_version` is the
//! version of the table it is in, and no acknowledged event is lost or lands in the wrong
//! version during the switch. Every scenario runs on PostgreSQL and SQLite (the list at the
//! bottom); the reset runs in a process of its own, as an operator's would.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_ingest::schema::{base_columns, qualified};
use sluice_tests::ingest::{Backend, Destination, post_json, run_command, serve};
use sluice_tests::sender::{Retry, Stream, start_streams, stop_streams};
use tokio::sync::watch;

const SCHEMA: &str = "segment";

/// Runs `sluice-ingest reset` with `args` on `dest`; its JSON on success, its standard error on
/// failure.
async fn reset(dest: &Destination, args: &[&str]) -> Result<Value, String> {
    let args: Vec<&str> = ["reset"].iter().chain(args).copied().collect();
    run_command(&args, &dest.url, SCHEMA).await
}

/// `(message_id, _sdc_table_version)` of every row of the table `name`.
async fn versions_of(dest: &Destination, name: &str) -> Vec<(String, Option<i64>)> {
    let sql = format!(
        "SELECT message_id, _sdc_table_version FROM {}",
        qualified(SCHEMA, name)
    );
    query(dest, &sql).await
}

/// Runs a query of two columns (text, bigint).
async fn query(dest: &Destination, sql: &str) -> Vec<(String, Option<i64>)> {
    let warehouse = dest.warehouse(SCHEMA);
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match dest.backend {
        Backend::Postgres => {
            sqlx::query_as(sql)
                .fetch_all(warehouse.postgres_pool().expect("postgres"))
                .await
        }
        Backend::Sqlite => {
            sqlx::query_as(sql)
                .fetch_all(warehouse.sqlite_pool().expect("sqlite"))
                .await
        }
    }
    .expect("query runs")
}

/// The relations of the schema.
async fn relations(dest: &Destination) -> HashSet<String> {
    let sql = match dest.backend {
        Backend::Postgres => format!(
            "SELECT c.relname::text, NULL::bigint FROM pg_class c JOIN pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname = '{SCHEMA}'"
        ),
        Backend::Sqlite => format!("SELECT name, NULL FROM {SCHEMA}.sqlite_master"),
    };
    query(dest, &sql)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// `_sdc_loads.rows_loaded` summed by table name.
async fn loaded_by_table(dest: &Destination) -> BTreeMap<String, i64> {
    let mut sums = BTreeMap::new();
    for row in dest.loads(SCHEMA).await {
        let table = row["table_name"].as_str().expect("name").to_owned();
        *sums.entry(table).or_default() += row["rows_loaded"].as_i64().expect("count");
    }
    sums
}

/// The columns `_sdc_columns` records for the table `name`, sorted.
async fn recorded_columns(dest: &Destination, name: &str) -> Vec<String> {
    let sql = format!(
        "SELECT column_name, NULL FROM {} WHERE table_name = '{name}' ORDER BY 1",
        qualified(SCHEMA, "_sdc_columns")
    );
    query(dest, &sql)
        .await
        .into_iter()
        .map(|(c, _)| c)
        .collect()
}

fn base_column_names(table: Table) -> Vec<String> {
    let mut names: Vec<String> = base_columns(table)
        .iter()
        .map(|c| c.name.to_owned())
        .collect();
    names.sort();
    names
}

fn track(message_id: &str) -> Value {
    json!({
        "type": "track", "messageId": message_id, "userId": "u1", "event": "Order Completed",
        "properties": {"revenue": 19.99, "currency": "EUR"}
    })
}

async fn load(url: &str, ids: &[&str]) {
    let batch: Vec<Value> = ids.iter().map(|id| track(id)).collect();
    let (status, answer) = post_json(url, &Value::Array(batch)).await;
    assert_eq!(status, 200, "{answer}");
}

async fn a_reset_while_events_flow_puts_every_acknowledged_event_once_in_its_version(
    backend: Backend,
) {
    let (dest, server) = serve(backend, "reset_flowing", &[]).await;
    let url = server.url("/v1/webhook");
    let retry = Retry {
        give_up_after: Duration::from_secs(120),
        ..Retry::default()
    };
    // Senders before, during and after the reset; they retry 5xx as Segment does.
    let (stop_before, before) = start_streams(&url, 4, 0, retry);
    let deadline = Instant::now() + Duration::from_secs(60);
    while versions_of(&dest, "track").await.len() < 200 {
        assert!(Instant::now() < deadline, "events are loading");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = reset(&dest, &["--table", "track"]).await.expect("reset");
    // Senders that start once the reset has completed: all of theirs belong to version 1.
    let (stop_after, stopped_after) = watch::channel(false);
    let after: Vec<_> = (0..2)
        .map(|i| {
            let stream = Stream {
                url: url.clone(),
                sender: 100 + i,
                batch: 1 + i,
                padding: 0,
                retry,
            };
            tokio::spawn(stream.run(stopped_after.clone()))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while versions_of(&dest, "track").await.len() < 200 {
        assert!(Instant::now() < deadline, "events load after the reset");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = stop_streams(stop_before, before).await;
    let after = stop_streams(stop_after, after).await;
    server.stop().await;

    let [printed] = done.as_array().expect("a list").as_slice() else {
        panic!("one table reset: {done}");
    };
    assert_eq!(printed["table"], "track");
    assert_eq!(printed["previousVersion"], 0);
    assert_eq!(printed["version"], 1);
    assert_eq!(printed["keptAs"], "track__v0");
    let old = versions_of(&dest, "track__v0").await;
    let new = versions_of(&dest, "track").await;
    // Nothing landed in the old table after the switch: it holds what it held at the reset.
    assert_eq!(printed["previousRows"], json!(old.len()), "rows kept");
    assert!(
        old.iter().all(|(_, v)| *v == Some(0)),
        "old rows are version 0"
    );
    assert!(
        new.iter().all(|(_, v)| *v == Some(1)),
        "new rows are version 1"
    );
    let mut where_stored: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, _) in &old {
        where_stored.entry(id).or_default().push("track__v0");
    }
    for (id, _) in &new {
        where_stored.entry(id).or_default().push("track");
    }
    let twice: Vec<_> = where_stored.iter().filter(|(_, t)| t.len() > 1).collect();
    assert!(twice.is_empty(), "events stored twice: {twice:?}");
    for ledger in [&before, &after] {
        assert_eq!(
            ledger.acked, ledger.sent,
            "every event sent was acknowledged"
        );
        let lost: Vec<_> = ledger
            .acked
            .iter()
            .filter(|id| !where_stored.contains_key(id.as_str()))
            .collect();
        assert!(lost.is_empty(), "acknowledged events lost: {lost:?}");
    }
    let in_new: HashSet<&str> = new.iter().map(|(id, _)| id.as_str()).collect();
    let misplaced: Vec<_> = after
        .acked
        .iter()
        .filter(|id| !in_new.contains(id.as_str()))
        .collect();
    assert!(
        misplaced.is_empty(),
        "events sent after the reset are not in version 1: {misplaced:?}"
    );
    let flowing_in_new = before
        .acked
        .iter()
        .filter(|id| in_new.contains(id.as_str()))
        .count();
    assert!(
        flowing_in_new > 0 && flowing_in_new < before.acked.len(),
        "the senders that ran through the reset loaded into both versions \
         ({flowing_in_new} of {} in version 1)",
        before.acked.len()
    );
    assert_eq!(
        where_stored.len(),
        before.sent.len() + after.sent.len(),
        "no row nobody sent"
    );
    // The loading report follows the rows: each version's rows under its own name.
    let loads = loaded_by_table(&dest).await;
    assert!(loads["track__v0"] >= old.len() as i64, "{loads:?}");
    assert!(loads["track"] >= new.len() as i64, "{loads:?}");
    // The new table got its columns back as its events needed them; the old keeps its records.
    assert!(
        recorded_columns(&dest, "track")
            .await
            .contains(&"properties__revenue".to_owned())
    );
    assert!(
        recorded_columns(&dest, "track__v0")
            .await
            .contains(&"properties__revenue".to_owned())
    );
    eprintln!(
        "reset while flowing: {} rows kept at version 0, {} at version 1 ({} of them sent \
         before the reset completed), {} answers 5xx",
        old.len(),
        new.len(),
        flowing_in_new,
        before.refused + after.refused
    );
}

async fn a_reset_with_drop_old_discards_the_rows_and_what_describes_them(backend: Backend) {
    let (dest, server) = serve(backend, "reset_drop", &[]).await;
    let url = server.url("/v1/webhook");
    load(&url, &["t1", "t2", "t3"]).await;

    let done = reset(&dest, &["--table", "track", "--drop-old"])
        .await
        .expect("reset");
    assert_eq!(done[0]["keptAs"], Value::Null);
    assert_eq!(done[0]["previousRows"], 3);
    assert_eq!(done[0]["version"], 1);
    let names = relations(&dest).await;
    assert!(!names.contains("track__v0"), "{names:?}");
    assert!(versions_of(&dest, "track").await.is_empty());
    assert_eq!(
        recorded_columns(&dest, "track").await,
        base_column_names(Table::Track)
    );
    assert!(recorded_columns(&dest, "track__v0").await.is_empty());

    // Loading goes on in the new table, which adds its columns again.
    load(&url, &["t1", "t4"]).await;
    assert_eq!(
        versions_of(&dest, "track")
            .await
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        BTreeMap::from([("t1".to_owned(), Some(1)), ("t4".to_owned(), Some(1))])
    );
    assert!(
        recorded_columns(&dest, "track")
            .await
            .contains(&"properties__currency".to_owned())
    );
    let loads = loaded_by_table(&dest).await;
    assert_eq!(loads.get("track__v0"), Some(&3), "{loads:?}");
    assert_eq!(loads.get("track"), Some(&2), "{loads:?}");
    server.stop().await;
}

async fn a_table_not_created_yet_is_created_at_the_new_version(backend: Backend) {
    let (dest, server) = serve(backend, "reset_missing", &["--tables", "track"]).await;
    assert!(!relations(&dest).await.contains("page"));
    let done = reset(&dest, &["--table", "page"]).await.expect("reset");
    assert_eq!(
        done,
        json!([{
            "table": "page", "previousVersion": 0, "version": 1, "keptAs": null,
            "previousRows": 0, "resetAt": done[0]["resetAt"]
        }])
    );
    let names = relations(&dest).await;
    assert!(
        names.contains("page") && !names.contains("page__v0"),
        "{names:?}"
    );
    dest.execute(
        SCHEMA,
        &format!(
            "INSERT INTO {} (message_id) VALUES ('p1')",
            qualified(SCHEMA, "page")
        ),
    )
    .await;
    assert_eq!(
        versions_of(&dest, "page").await,
        [("p1".to_owned(), Some(1))]
    );
    server.stop().await;
}

async fn a_second_reset_keeps_each_version_under_its_own_name(backend: Backend) {
    let (dest, server) = serve(backend, "reset_twice", &[]).await;
    let url = server.url("/v1/webhook");
    load(&url, &["a1", "a2"]).await;
    reset(&dest, &["--table", "track"])
        .await
        .expect("first reset");
    load(&url, &["b1", "b2", "b3"]).await;
    let done = reset(&dest, &["--table", "track", "--keep-old"])
        .await
        .expect("second reset");
    assert_eq!(done[0]["previousVersion"], 1);
    assert_eq!(done[0]["version"], 2);
    assert_eq!(done[0]["keptAs"], "track__v1");
    assert_eq!(done[0]["previousRows"], 3);
    load(&url, &["c1"]).await;
    server.stop().await;

    let sorted = |mut rows: Vec<(String, Option<i64>)>| {
        rows.sort();
        rows
    };
    let at = |ids: &[&str], v: i64| -> Vec<(String, Option<i64>)> {
        ids.iter().map(|id| ((*id).to_owned(), Some(v))).collect()
    };
    assert_eq!(
        sorted(versions_of(&dest, "track__v0").await),
        at(&["a1", "a2"], 0)
    );
    assert_eq!(
        sorted(versions_of(&dest, "track__v1").await),
        at(&["b1", "b2", "b3"], 1)
    );
    assert_eq!(sorted(versions_of(&dest, "track").await), at(&["c1"], 2));
    let history = query(
        &dest,
        &format!(
            "SELECT kept_as, version FROM {} WHERE table_name = 'track' ORDER BY version",
            qualified(SCHEMA, "_sdc_table_versions")
        ),
    )
    .await;
    assert_eq!(
        history,
        [
            ("track__v0".to_owned(), Some(1)),
            ("track__v1".to_owned(), Some(2))
        ]
    );
    let loads = loaded_by_table(&dest).await;
    assert_eq!(
        (loads["track__v0"], loads["track__v1"], loads["track"]),
        (2, 3, 1)
    );
    for kept in ["track__v0", "track__v1"] {
        assert!(
            recorded_columns(&dest, kept)
                .await
                .contains(&"properties__revenue".to_owned()),
            "{kept}'s columns stay recorded"
        );
    }
}

/// A user deletion request deletes the user's rows kept from earlier versions as well.
async fn a_user_deletion_reaches_the_rows_of_earlier_versions(backend: Backend) {
    let (dest, server) = serve(backend, "reset_erase", &[]).await;
    let url = server.url("/v1/webhook");
    let mut other = track("o1");
    other["userId"] = json!("u2");
    let (status, answer) = post_json(&url, &json!([track("a1"), track("a2"), other])).await;
    assert_eq!(status, 200, "{answer}");
    reset(&dest, &["--table", "track"])
        .await
        .expect("first reset");
    load(&url, &["b1"]).await;
    reset(&dest, &["--table", "track"])
        .await
        .expect("second reset");
    load(&url, &["c1"]).await;
    server.stop().await;

    let printed = run_command(&["erase", "--user-id", "u1"], &dest.url, SCHEMA)
        .await
        .expect("erase");
    assert_eq!(printed["deleted"]["track"], 1, "{printed}");
    assert_eq!(printed["deleted"]["track__v0"], 2, "{printed}");
    assert_eq!(printed["deleted"]["track__v1"], 1, "{printed}");
    assert!(versions_of(&dest, "track").await.is_empty());
    assert!(versions_of(&dest, "track__v1").await.is_empty());
    assert_eq!(
        versions_of(&dest, "track__v0").await,
        [("o1".to_owned(), Some(0))],
        "the other user's row stays"
    );
    let recorded = query(
        &dest,
        &format!(
            "SELECT table_name, rows_deleted FROM {} WHERE table_name LIKE 'track%' ORDER BY 1",
            qualified(SCHEMA, "_sdc_deletions")
        ),
    )
    .await;
    assert_eq!(
        recorded,
        [
            ("track".to_owned(), Some(1)),
            ("track__v0".to_owned(), Some(2)),
            ("track__v1".to_owned(), Some(1))
        ]
    );
}

async fn an_unknown_table_is_refused_and_changes_nothing(backend: Backend) {
    let (dest, server) = serve(backend, "reset_unknown", &[]).await;
    load(&server.url("/v1/webhook"), &["t1"]).await;
    server.stop().await;
    let before = relations(&dest).await;

    let error = reset(&dest, &["--table", "tracks"])
        .await
        .expect_err("refused");
    assert!(
        error.contains("invalid value 'tracks'") && error.contains("track"),
        "the error names the value and the tables: {error}"
    );
    let error = reset(&dest, &[]).await.expect_err("refused");
    assert!(
        error.contains("required") && error.contains("--table"),
        "{error}"
    );
    let error = reset(&dest, &["--table", "track", "--drop-old", "--keep-old"])
        .await
        .expect_err("refused");
    assert!(error.contains("cannot be used with"), "{error}");

    assert_eq!(relations(&dest).await, before);
    assert_eq!(
        versions_of(&dest, "track").await,
        [("t1".to_owned(), Some(0))]
    );
    assert!(
        query(
            &dest,
            &format!(
                "SELECT table_name, version FROM {}",
                qualified(SCHEMA, "_sdc_table_versions")
            )
        )
        .await
        .is_empty()
    );

    // A kept name already taken: refused, saying what to do, and nothing changes.
    dest.execute(
        SCHEMA,
        &format!(
            "CREATE TABLE {} (x integer)",
            qualified(SCHEMA, "track__v0")
        ),
    )
    .await;
    let error = reset(&dest, &["--table", "track"])
        .await
        .expect_err("refused");
    assert!(
        error.contains("cannot keep the rows of segment.track as track__v0")
            && error.contains("nothing was changed")
            && !error.contains("batch"),
        "{error}"
    );
    assert_eq!(
        versions_of(&dest, "track").await,
        [("t1".to_owned(), Some(0))]
    );
}

async fn reset_all_resets_every_loaded_table_in_one_step(backend: Backend) {
    let (dest, server) = serve(backend, "reset_all", &[]).await;
    let url = server.url("/v1/webhook");
    load(&url, &["t1"]).await;
    server.stop().await;
    let done = reset(&dest, &["--all"]).await.expect("reset");
    let tables: Vec<&str> = done
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| r["table"].as_str().expect("name"))
        .collect();
    assert_eq!(tables, ["group", "identify", "page", "screen", "track"]);
    let names = relations(&dest).await;
    for table in Table::DEFAULT {
        assert!(names.contains(&format!("{table}__v0")), "{names:?}");
        assert!(names.contains(table.name()), "{names:?}");
    }
    assert_eq!(
        versions_of(&dest, "track__v0").await,
        [("t1".to_owned(), Some(0))]
    );
}

/// A table created before the version was its column's default gets the default at start-up
/// (PostgreSQL; SQLite cannot change a default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_an_earlier_release_gets_its_version_default_at_start_up() {
    let (dest, server) = serve(Backend::Postgres, "reset_legacy", &[]).await;
    server.stop().await;
    dest.execute(
        SCHEMA,
        &format!(
            "ALTER TABLE {} ALTER COLUMN _sdc_table_version DROP DEFAULT",
            qualified(SCHEMA, "track")
        ),
    )
    .await;
    let server =
        sluice_tests::ingest::Server::start(sluice_tests::ingest::config(&dest.url, &[])).await;
    load(&server.url("/v1/webhook"), &["t1"]).await;
    server.stop().await;
    assert_eq!(
        versions_of(&dest, "track").await,
        [("t1".to_owned(), Some(0))]
    );
}

sluice_tests::on_both_backends!(
    a_reset_while_events_flow_puts_every_acknowledged_event_once_in_its_version,
    a_reset_with_drop_old_discards_the_rows_and_what_describes_them,
    a_table_not_created_yet_is_created_at_the_new_version,
    a_second_reset_keeps_each_version_under_its_own_name,
    a_user_deletion_reaches_the_rows_of_earlier_versions,
    an_unknown_table_is_refused_and_changes_nothing,
    reset_all_resets_every_loaded_table_in_one_step,
);

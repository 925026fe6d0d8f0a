//! Segment's official libraries, installed from PyPI and npm by the test command
//! (`tests/scripts/clients.sh`), send every kind of call to a running `sluice-ingest`; every event
//! is then found in PostgreSQL with the values the library sent.

use std::path::PathBuf;

use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_tests::ingest::{Backend, Destination, Server, serve};

const SCHEMA: &str = "segment";
const WRITE_KEY: &str = "wk-libraries";

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run `bash tests/run.sh`, or `eval \"$(bash tests/scripts/clients.sh)\"`")
    })
}

async fn run(command: &mut tokio::process::Command) {
    let output = command.output().await.expect("client runs");
    assert!(
        output.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Checks the six rows a client script sends (see tests/clients/send.*).
async fn assert_landed(
    dest: &Destination,
    run: &str,
    user: &str,
    expected: &[(Table, &str, Value)],
) {
    for table in Table::ALL {
        let id = format!("{run}-{table}");
        let row = dest
            .row(SCHEMA, table, &id)
            .await
            .unwrap_or_else(|| panic!("{id} landed in {table}"));
        assert_eq!(row["user_id"], user, "{id}");
        assert_eq!(row["type"], table.name());
        for key in [
            "received_at",
            "sent_at",
            "timestamp",
            "context__library__name",
        ] {
            assert!(row.contains_key(key), "{id} has {key}: {row:?}");
        }
    }
    for (table, column, value) in expected {
        let row = dest
            .row(SCHEMA, *table, &format!("{run}-{table}"))
            .await
            .expect("row");
        assert_eq!(row.get(*column), Some(value), "{table}.{column}");
    }
}

async fn server(label: &str) -> (Destination, Server) {
    let flags = [
        "--write-keys",
        WRITE_KEY,
        "--tables",
        "alias,group,identify,page,screen,track",
    ];
    serve(Backend::Postgres, label, &flags).await
}

fn python_expectations() -> Vec<(Table, &'static str, Value)> {
    vec![
        (Table::Track, "event", json!("Order Completed")),
        (Table::Track, "properties__revenue", json!(19.5)),
        (Table::Track, "properties__library", json!("python")),
        (
            Table::Track,
            "context__library__name",
            json!("analytics-python"),
        ),
        (Table::Identify, "traits__email", json!("py@example.com")),
        (Table::Page, "name", json!("Install")),
        (Table::Page, "properties__path", json!("/install")),
        (Table::Screen, "name", json!("Home")),
        (Table::Screen, "properties__seconds", json!(3)),
        (Table::Group, "group_id", json!("group-py")),
        (Table::Group, "traits__name", json!("Acme")),
        (Table::Alias, "previous_id", json!("anon-py")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_library_lands_every_call() {
    let (dest, server) = server("pylib").await;
    for (run_id, gzip) in [("py-plain", false), ("py-gzip", true)] {
        let mut command = tokio::process::Command::new(env("SLUICE_TEST_PYTHON"));
        command
            .arg(clients_dir().join("send.py"))
            .args([server.base.as_str(), WRITE_KEY, run_id]);
        if gzip {
            command.arg("--gzip");
        }
        run(&mut command).await;
        assert_landed(&dest, run_id, "user-py", &python_expectations()).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_library_lands_every_call() {
    let (dest, server) = server("nodelib").await;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(clients_dir().join("send.cjs"))
        .args([server.base.as_str(), WRITE_KEY, "node"])
        .env("NODE_PATH", env("SLUICE_TEST_NODE_PATH"));
    run(&mut command).await;
    let expected = vec![
        (Table::Track, "event", json!("Order Completed")),
        (Table::Track, "properties__revenue", json!(7.25)),
        (Table::Track, "properties__library", json!("node")),
        (
            Table::Track,
            "context__library__name",
            json!("@segment/analytics-node"),
        ),
        (Table::Identify, "traits__email", json!("node@example.com")),
        (Table::Page, "name", json!("Install")),
        (Table::Page, "category", json!("Docs")),
        (Table::Screen, "name", json!("Home")),
        (Table::Screen, "properties__seconds", json!(4)),
        (Table::Group, "group_id", json!("group-node")),
        (Table::Group, "traits__name", json!("Initech")),
        (Table::Alias, "previous_id", json!("anon-node")),
    ];
    assert_landed(&dest, "node", "user-node", &expected).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_with_a_wrong_write_key_stores_nothing() {
    let (dest, server) = server("pylib-wrong").await;
    let output = tokio::process::Command::new(env("SLUICE_TEST_PYTHON"))
        .arg(clients_dir().join("send.py"))
        .args([server.base.as_str(), "not-the-key", "wrong"])
        .output()
        .await
        .expect("client runs");
    assert!(!output.status.success(), "the library reports the 401");
    for table in Table::ALL {
        assert!(
            dest.rows(SCHEMA, table).await.is_empty(),
            "{table} is empty"
        );
    }
    server.stop().await;
}

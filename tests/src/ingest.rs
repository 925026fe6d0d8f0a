//! Running the ingest service in tests: in-process ([`Server`]) or as the real binary
//! ([`Process`]), against a fresh destination ([`Destination`]) on PostgreSQL or SQLite, and
//! reading back what landed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use serde_json::{Map, Value};
use sluice_ingest::event::{IDENTITY_KEYS, id_text};
use sluice_ingest::json::{self, Special};
use sluice_ingest::load::Warehouse;
use sluice_ingest::normalize::{
    MAX_FLATTEN_DEPTH, TIMESTAMP_KEYS, format_timestamp, parse_timestamp,
};
use sluice_ingest::schema::{COLUMNS_TABLE, ColumnType, qualified};
use sluice_ingest::{Config, event::Table};
use tokio::sync::oneshot;

/// The database kinds Sluice loads into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The test PostgreSQL server.
    Postgres,
    /// A SQLite file in a temporary folder.
    Sqlite,
}

/// An empty destination database of its own for one test.
#[derive(Debug)]
pub struct Destination {
    /// Which database.
    pub backend: Backend,
    /// Its URL, as `--database-url` takes it.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

/// A row as JSON, with values normalised across databases: timestamps as RFC 3339 UTC with
/// microseconds, booleans as booleans, JSON columns as JSON, non-finite doubles as the strings
/// `"NaN"`, `"Infinity"` and `"-Infinity"`; NULL columns left out.
pub type Row = Map<String, Value>;

impl Destination {
    /// A fresh database; `label` names it (for PostgreSQL) to ease debugging.
    pub async fn new(backend: Backend, label: &str) -> Destination {
        match backend {
            Backend::Postgres => Destination {
                backend,
                url: crate::postgres::fresh_database(label).await,
                _dir: None,
            },
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary folder");
                let url = format!("sqlite://{}", dir.path().join("sluice.db").display());
                Destination {
                    backend,
                    url,
                    _dir: Some(dir),
                }
            }
        }
    }

    /// A database that exists already (one the test prepared), at `url`.
    pub fn existing(backend: Backend, url: &str) -> Destination {
        Destination {
            backend,
            url: url.to_owned(),
            _dir: None,
        }
    }

    /// A warehouse handle on `schema` of this database.
    pub fn warehouse(&self, schema: &str) -> Warehouse {
        Warehouse::connect(&self.url, schema, 2).expect("valid destination")
    }

    /// The columns of `table` and their types (empty when the table does not exist).
    pub async fn columns(&self, schema: &str, table: Table) -> HashMap<String, Option<ColumnType>> {
        let catalog = self.warehouse(schema).catalog().await.expect("catalog");
        catalog
            .table(table)
            .columns
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Every row of an event table, by `message_id`.
    pub async fn rows(&self, schema: &str, table: Table) -> Vec<Row> {
        let columns = self.columns(schema, table).await;
        if columns.is_empty() {
            return Vec::new();
        }
        let texts = self.json_rows(schema, table.name()).await;
        texts
            .into_iter()
            .map(|text| {
                let Value::Object(raw) = json::parse(text.as_bytes()).expect("row as JSON") else {
                    panic!("row is not an object: {text}")
                };
                raw.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| {
                        let v = normalise(columns.get(&k).copied().flatten(), v);
                        (k, v)
                    })
                    .collect()
            })
            .collect()
    }

    /// The row of `table` with this `message_id`, if any.
    pub async fn row(&self, schema: &str, table: Table, message_id: &str) -> Option<Row> {
        self.rows(schema, table)
            .await
            .into_iter()
            .find(|r| r.get("message_id") == Some(&Value::from(message_id)))
    }

    /// Runs one SQL statement on this destination (schema `schema` attached on SQLite).
    pub async fn execute(&self, schema: &str, sql: &str) {
        let warehouse = self.warehouse(schema);
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self.backend {
            Backend::Postgres => sqlx::query(sql)
                .execute(warehouse.postgres_pool().expect("postgres"))
                .await
                .map(drop),
            Backend::Sqlite => sqlx::query(sql)
                .execute(warehouse.sqlite_pool().expect("sqlite"))
                .await
                .map(drop),
        }
        .expect("statement runs");
    }

    /// Makes the database refuse `track` rows whose `event` is `Forbidden`, as a warehouse owner's
    /// constraint would (a CHECK on PostgreSQL, a trigger on SQLite), so that such records go to
    /// `_sdc_rejected`. The table must exist.
    pub async fn forbid_track_event_forbidden(&self, schema: &str) {
        let table = sluice_ingest::schema::qualified(schema, "track");
        let sql = match self.backend {
            Backend::Postgres => {
                format!("ALTER TABLE {table} ADD CONSTRAINT no_test CHECK (event <> 'Forbidden')")
            }
            Backend::Sqlite => format!(
                "CREATE TRIGGER {}.no_test BEFORE INSERT ON track \
                 WHEN NEW.event = 'Forbidden' BEGIN SELECT RAISE(ABORT, 'forbidden event'); END",
                sluice_ingest::schema::quote_ident(schema)
            ),
        };
        self.execute(schema, &sql).await;
    }

    /// The columns `_sdc_columns` records for each key path of `table`: the path's first
    /// column, then its splits.
    pub async fn key_columns(
        &self,
        schema: &str,
        table: Table,
    ) -> HashMap<Vec<String>, Vec<String>> {
        let sql = format!(
            "SELECT column_name, key_path, split_of FROM {} WHERE table_name = '{}' AND key_path IS NOT NULL",
            qualified(schema, COLUMNS_TABLE),
            table.name()
        );
        let warehouse = self.warehouse(schema);
        let rows: Vec<(String, String, Option<String>)> = match self.backend {
            Backend::Postgres => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_all(warehouse.postgres_pool().expect("postgres"))
                .await
                .expect("read _sdc_columns"),
            Backend::Sqlite => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_all(warehouse.sqlite_pool().expect("sqlite"))
                .await
                .expect("read _sdc_columns"),
        };
        let mut out: HashMap<Vec<String>, Vec<String>> = HashMap::new();
        for (column, key_path, split_of) in rows {
            let keys: Vec<String> =
                serde_json::from_str(&key_path).expect("key path is a JSON array");
            let columns = out.entry(keys).or_default();
            if split_of.is_none() {
                columns.insert(0, column);
            } else {
                columns.push(column);
            }
        }
        out
    }

    /// The column that holds `keys`' values of the type first seen (panics if there is none).
    pub async fn column_of(&self, schema: &str, table: Table, keys: &[&str]) -> String {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        self.key_columns(schema, table)
            .await
            .remove(&keys)
            .and_then(|columns| columns.into_iter().next())
            .unwrap_or_else(|| panic!("no column for {keys:?}"))
    }

    /// Asserts that `event` (parsed as Sluice parses bodies, see [`parse_body`]) is stored in
    /// `table`: its row exists, and every value it holds is found in a column of its key path
    /// or under that path in `_sdc_overflow`, as the client sent it. Top-level keys in `skip`
    /// (ones the Tracking API rewrites) are not checked.
    pub async fn assert_event_stored(
        &self,
        schema: &str,
        table: Table,
        event: &Value,
        skip: &[&str],
    ) {
        let id = id_text(&event["messageId"])
            .expect("a messageId")
            .into_owned();
        let row = self
            .row(schema, table, &id)
            .await
            .unwrap_or_else(|| panic!("no {table} row for {id}"));
        let columns = self.key_columns(schema, table).await;
        let mut leaves = Vec::new();
        for (key, value) in event.as_object().expect("an event object") {
            if !skip.contains(&key.as_str()) {
                walk_leaves(&mut vec![key.clone()], value, &mut leaves);
            }
        }
        for (keys, expected) in leaves {
            let in_columns = columns
                .get(&keys)
                .into_iter()
                .flatten()
                .filter_map(|c| row.get(c));
            let in_overflow = keys
                .iter()
                .try_fold(row.get("_sdc_overflow"), |v, k| Some(v?.get(k)))
                .flatten();
            let found: Vec<&Value> = in_columns.chain(in_overflow).collect();
            assert!(
                found
                    .iter()
                    .any(|stored| stored_as_sent(&keys, &expected, stored)),
                "{table} {id}: {keys:?} = {expected} not found; its columns {:?} hold {found:?}",
                columns.get(&keys)
            );
        }
    }

    /// Rows in `_sdc_rejected`, as JSON objects.
    pub async fn rejected(&self, schema: &str) -> Vec<Row> {
        self.json_rows(schema, "_sdc_rejected")
            .await
            .into_iter()
            .map(|text| serde_json::from_str(&text).expect("row as JSON"))
            .collect()
    }

    /// Rows in `_sdc_deletions`, as JSON objects, ordered by message id and table (times as the
    /// database gives them).
    pub async fn deletions(&self, schema: &str) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .json_rows(schema, "_sdc_deletions")
            .await
            .into_iter()
            .map(|text| serde_json::from_str(&text).expect("row as JSON"))
            .collect();
        let key = |r: &Row| (r["message_id"].to_string(), r["table_name"].to_string());
        rows.sort_by_key(key);
        rows
    }

    /// Rows in `_sdc_loads`, as JSON objects, times normalised as in [`Destination::rows`].
    pub async fn loads(&self, schema: &str) -> Vec<Row> {
        self.json_rows(schema, "_sdc_loads")
            .await
            .into_iter()
            .map(|text| {
                let Value::Object(row) = serde_json::from_str(&text).expect("row as JSON") else {
                    panic!("row is not an object: {text}")
                };
                row.into_iter()
                    .map(|(k, v)| {
                        let time = ["minute", "first_received_at", "last_received_at"]
                            .contains(&k.as_str());
                        let v = if time {
                            normalise(Some(ColumnType::Timestamp), v)
                        } else {
                            v
                        };
                        (k, v)
                    })
                    .collect()
            })
            .collect()
    }

    async fn json_rows(&self, schema: &str, table: &str) -> Vec<String> {
        let warehouse = self.warehouse(schema);
        let from = qualified(schema, table);
        match self.backend {
            Backend::Postgres => {
                let sql = format!("SELECT row_to_json(t)::text FROM {from} t ORDER BY 1");
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_all(warehouse.postgres_pool().expect("postgres"))
                    .await
                    .expect("select rows")
            }
            Backend::Sqlite => {
                // Read natively, not through SQLite's JSON functions, which print doubles with
                // 15 digits and infinities as `Inf`.
                use sqlx::{Column, Row, TypeInfo, ValueRef};
                let sql = format!("SELECT * FROM {from} ORDER BY 1");
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .fetch_all(warehouse.sqlite_pool().expect("sqlite"))
                    .await
                    .expect("select rows");
                rows.iter()
                    .map(|row| {
                        let mut object = Map::new();
                        for (i, column) in row.columns().iter().enumerate() {
                            let raw = row.try_get_raw(i).expect("column");
                            let value = if raw.is_null() {
                                Value::Null
                            } else {
                                match raw.type_info().name() {
                                    "INTEGER" => Value::from(row.get::<i64, _>(i)),
                                    "REAL" => {
                                        let f = row.get::<f64, _>(i);
                                        serde_json::Number::from_f64(f)
                                            .map(Value::Number)
                                            .unwrap_or_else(|| {
                                                Value::from(json::non_finite_name(f))
                                            })
                                    }
                                    _ => Value::from(row.get::<String, _>(i)),
                                }
                            };
                            object.insert(column.name().to_owned(), value);
                        }
                        Value::Object(object).to_string()
                    })
                    .collect()
            }
        }
    }
}

/// Parses a request body as the service does: repaired ([`json::repair`]), then parsed.
pub fn parse_body(body: &[u8]) -> Value {
    let repaired = json::repair(body).expect("not too deep");
    json::parse(&repaired).expect("JSON once repaired")
}

/// The scalar leaves of a value (and the objects at the flattening depth), with their keys.
fn walk_leaves(path: &mut Vec<String>, value: &Value, out: &mut Vec<(Vec<String>, Value)>) {
    match value {
        Value::Null => {}
        Value::Object(map) if !map.is_empty() && path.len() < MAX_FLATTEN_DEPTH => {
            for (k, v) in map {
                path.push(k.clone());
                walk_leaves(path, v, out);
                path.pop();
            }
        }
        leaf => out.push((path.clone(), leaf.clone())),
    }
}

/// Whether a stored value (normalised by [`Destination::rows`]) is what the client sent.
fn stored_as_sent(keys: &[String], sent: &Value, stored: &Value) -> bool {
    let top = keys.len() == 1;
    if top && IDENTITY_KEYS.contains(&keys[0].as_str()) {
        return id_text(sent).as_deref() == stored.as_str();
    }
    match sent {
        Value::String(s) => match json::special(s) {
            Some(Special::NonFinite(f)) => stored.as_str() == Some(json::non_finite_name(f)),
            Some(Special::BigNumber(digits)) => stored.as_str() == Some(digits),
            None if top && TIMESTAMP_KEYS.contains(&keys[0].as_str()) => {
                stored.as_str() == Some(s.as_str())
                    || parse_timestamp(s).map(|t| format_timestamp(&t)).as_deref()
                        == stored.as_str()
            }
            None => stored.as_str() == Some(s.as_str()),
        },
        Value::Number(n) => match (n.as_i64(), stored) {
            (Some(i), Value::Number(m)) => m.as_i64() == Some(i) || m.as_f64() == Some(i as f64),
            (None, Value::Number(m)) => m.as_f64() == n.as_f64(),
            _ => false,
        },
        Value::Array(_) | Value::Object(_) => {
            let text = json::to_json_text(sent);
            json::parse::<Value>(text.as_bytes()).ok().as_ref() == Some(stored)
        }
        other => other == stored,
    }
}

fn normalise(ty: Option<ColumnType>, value: Value) -> Value {
    match (ty, value) {
        (Some(ColumnType::Timestamp), Value::String(s)) => {
            let t = parse_timestamp(&s).unwrap_or_else(|| panic!("stored timestamp {s:?}"));
            Value::String(format_timestamp(&t))
        }
        (Some(ColumnType::Boolean), Value::Number(n)) => Value::Bool(n.as_i64() != Some(0)),
        (Some(ColumnType::Json), Value::String(s)) => {
            json::parse(s.as_bytes()).unwrap_or(Value::String(s))
        }
        (Some(ColumnType::Double), Value::Number(n)) => Value::from(n.as_f64().expect("a number")),
        // row_to_json writes non-finite doubles as strings; SQLite keeps NaN as the text 'NaN'.
        (_, value) => value,
    }
}

/// POSTs `body` as JSON to `url`; answers the status and the JSON answer (`null` when the
/// answer is not JSON).
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The ingest configuration for `database_url` with extra flags, as the binary would parse it.
pub fn config(database_url: &str, flags: &[&str]) -> Config {
    let mut args = vec!["sluice-ingest", "--database-url", database_url];
    args.extend_from_slice(flags);
    Config::try_parse_from(args).expect("valid flags")
}

/// A fresh destination, and the service running in-process on it with `flags`.
pub async fn serve(backend: Backend, label: &str, flags: &[&str]) -> (Destination, Server) {
    let dest = Destination::new(backend, label).await;
    let server = Server::start(config(&dest.url, flags)).await;
    (dest, server)
}

/// The ingest service running inside the test process.
#[derive(Debug)]
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), sluice_ingest::RunError>>,
}

impl Server {
    /// Starts the service on a free loopback port and waits until it serves `/readyz`.
    pub async fn start(config: Config) -> Server {
        let server = Server::spawn(config).await;
        wait_ready(&server.base).await;
        server
    }

    /// Starts the service on a free loopback port without waiting for it to be ready: its
    /// socket accepts connections once this returns.
    pub async fn spawn(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(sluice_ingest::run(config, listener, async {
            let _ = signal.await;
        }));
        Server {
            base,
            shutdown: Some(shutdown),
            task,
        }
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Shuts down gracefully and waits for the end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task)
            .await
            .expect("server task")
            .expect("server ran");
    }
}

/// Polls `/readyz` until it answers 200 (at most 30 s).
pub async fn wait_ready(base: &str) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base} did not become ready");
}

/// The `sluice-ingest` binary built by cargo: `SLUICE_INGEST_BIN`, or beside the test binary.
pub fn ingest_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_INGEST_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/sluice-ingest
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("sluice-ingest"))
        .expect("target folder");
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p sluice-ingest`",
        path.display()
    );
    path
}

/// Runs a one-off command of the `sluice-ingest` binary (`erase`, `reset`) with `args`, on the
/// database at `url` and `schema` (the environment's settings left out): what it printed as
/// JSON when it succeeded, its standard error when it failed.
pub async fn run_command(args: &[&str], url: &str, schema: &str) -> Result<Value, String> {
    let output = tokio::process::Command::new(ingest_binary())
        .args(args)
        .args(["--database-url", url, "--schema", schema])
        .env_remove("SLUICE_DATABASE_URL")
        .env_remove("SLUICE_SCHEMA")
        .output()
        .await
        .expect("run sluice-ingest");
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("JSON on stdout"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// A free loopback port (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The `sluice-ingest` binary running as a child process; killed when dropped.
#[derive(Debug)]
pub struct Process {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    child: tokio::process::Child,
}

impl Process {
    /// Starts the binary with `args` and extra environment, listening on a free port, and
    /// waits until it is ready. Its output goes to the test's output.
    pub async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn_on(free_port(), args, env).await
    }

    /// [`Process::spawn`] on a given loopback port (to restart a process where it was).
    pub async fn spawn_on(port: u16, args: &[&str], env: &[(&str, &str)]) -> Process {
        let listen = format!("127.0.0.1:{port}");
        let mut command = tokio::process::Command::new(ingest_binary());
        command
            .args(args)
            .env("SLUICE_LISTEN", &listen)
            .env_remove("SLUICE_DATABASE_URL")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start sluice-ingest");
        let base = format!("http://{listen}");
        wait_ready(&base).await;
        Process { base, child }
    }

    /// The URL of `path` on this process.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("a port")
    }

    /// Kills the process with SIGKILL (no chance to finish anything, as in a node crash or an
    /// OOM kill) and waits until it is gone.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("wait");
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit (at most 30 s) and returns whether it exited with 0.
    pub async fn wait(mut self) -> bool {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("process exits within 30 s")
            .expect("wait")
            .success()
    }
}

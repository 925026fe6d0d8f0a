//! Running the ingest service in tests: in-process ([`Server`]) or as the real binary
//! ([`Process`]), against a fresh destination ([`Destination`]) on PostgreSQL or SQLite, and
//! reading back what landed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use serde_json::{Map, Value};
use sluice_ingest::load::Warehouse;
use sluice_ingest::normalize::{ColumnType, format_timestamp, parse_timestamp};
use sluice_ingest::schema::{qualified, quote_ident};
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
/// milliseconds, booleans as booleans, JSON columns as JSON; NULL columns left out.
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
            .0
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
        let texts = self.json_rows(schema, table.name(), columns.keys()).await;
        texts
            .into_iter()
            .map(|text| {
                let Value::Object(raw) = serde_json::from_str(&text).expect("row as JSON") else {
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

    /// Rows in `_sdc_rejected`, as JSON objects.
    pub async fn rejected(&self, schema: &str) -> Vec<Row> {
        let columns = [
            "_sdc_rejected_at",
            "table_name",
            "message_id",
            "reason",
            "record",
        ];
        self.json_rows(schema, "_sdc_rejected", columns.iter())
            .await
            .into_iter()
            .map(|text| serde_json::from_str(&text).expect("row as JSON"))
            .collect()
    }

    async fn json_rows<'a>(
        &self,
        schema: &str,
        table: &str,
        columns: impl Iterator<Item = &'a (impl AsRef<str> + 'a + ?Sized)>,
    ) -> Vec<String> {
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
                // json_object takes at most 127 arguments: merge objects of 50 columns each.
                let pairs: Vec<String> = columns
                    .map(|c| {
                        format!(
                            "'{0}', {1}",
                            c.as_ref().replace('\'', "''"),
                            quote_ident(c.as_ref())
                        )
                    })
                    .collect();
                let object = pairs
                    .chunks(50)
                    .map(|chunk| format!("json_object({})", chunk.join(", ")))
                    .reduce(|merged, next| format!("json_patch({merged}, {next})"))
                    .unwrap_or_else(|| "json_object()".to_owned());
                let sql = format!("SELECT {object} FROM {from} ORDER BY 1");
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_all(warehouse.sqlite_pool().expect("sqlite"))
                    .await
                    .expect("select rows")
            }
        }
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
            serde_json::from_str(&s).unwrap_or(Value::String(s))
        }
        (Some(ColumnType::Double), Value::Number(n)) => Value::from(n.as_f64().expect("a number")),
        (_, value) => value,
    }
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
        let port = free_port();
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

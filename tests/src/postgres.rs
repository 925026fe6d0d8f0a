//! The throwaway PostgreSQL server that `tests/run.sh` starts (`tests/scripts/postgres.sh`).
//!
//! Each test takes a database of its own ([`fresh_database`]), so tests run in parallel
//! without seeing each other's rows.

use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::{Connection, Executor, PgConnection};

/// The environment variable holding the server's admin URL.
pub const URL_VAR: &str = "SLUICE_TEST_POSTGRES_URL";

/// The admin URL of the test server. Panics with instructions when the tests were started
/// without `tests/run.sh` (or `tests/scripts/postgres.sh start DIR` and its `env` file).
pub fn admin_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{URL_VAR} is not set: run the tests with `bash tests/run.sh`, or start a server with \
             `tests/scripts/postgres.sh start DIR` and `source DIR/env`"
        )
    })
}

/// Creates an empty database named after `label` and returns its URL.
pub async fn fresh_database(label: &str) -> String {
    fresh_database_on(&admin_url(), label).await
}

/// Creates an empty database named after `label` on the server of `admin` (an admin URL) and
/// returns its URL.
pub async fn fresh_database_on(admin: &str, label: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "t_{}_{}_{}",
        label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            })
            .take(40)
            .collect::<String>(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = PgConnection::connect(admin)
        .await
        .expect("connect to the test PostgreSQL server");
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .await
        .expect("create a test database");
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    format!("{base}/{name}")
}

/// Creates a login role named after `label` with no privilege but the defaults (`CONNECT` and
/// `TEMPORARY` on databases, by `PUBLIC`), and returns its name. Roles are shared by every
/// database of the server, so the name carries the process id.
pub async fn create_role(label: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "r_{label}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = PgConnection::connect(&admin_url())
        .await
        .expect("connect to the test PostgreSQL server");
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE ROLE \"{name}\" LOGIN")))
        .await
        .expect("create a test role");
    name
}

/// `url` with its user name replaced by `role` (the test server trusts local connections, so
/// no password is needed).
pub fn url_as(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}@{host}")
}

/// Runs `sql` as the server's superuser in the database at `url`.
pub async fn run_as_admin(url: &str, sql: &str) {
    let admin_user = admin_url()
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(user, _)| user.to_owned())
        .expect("the admin URL names a user");
    let admin = url_as(url, &admin_user);
    let mut conn = PgConnection::connect(&admin)
        .await
        .expect("connect as the superuser");
    conn.execute(sqlx::AssertSqlSafe(sql.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// How a [`Cluster`] is shut down before it starts again (PostgreSQL's `pg_ctl -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Sessions are ended, a checkpoint is written: a planned restart.
    Fast,
    /// Every process is killed at once, as in a crash; the start recovers from the WAL.
    Immediate,
}

/// A PostgreSQL server of one test's own (`tests/scripts/postgres.sh` in a temporary folder),
/// for tests that restart it; stopped when dropped.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    /// Its admin URL (the superuser, database `postgres`).
    pub admin_url: String,
}

/// `tests/scripts/NAME`.
pub fn script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

/// Runs `bash tests/scripts/SCRIPT ARGS...` and panics with its output when it fails.
pub async fn run_script(name: &str, args: &[&str]) {
    let output = tokio::process::Command::new("bash")
        .arg(script(name))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        output.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Cluster {
    /// Initialises and starts a server on a free port.
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().to_str().expect("UTF-8 path").to_owned();
        run_script("postgres.sh", &["start", &path]).await;
        let env = std::fs::read_to_string(dir.path().join("env")).expect("env file");
        let admin_url = env
            .trim()
            .split_once('=')
            .map(|(_, url)| url.to_owned())
            .expect("export VAR=URL");
        Cluster { dir, admin_url }
    }

    /// Creates an empty database on this server and returns its URL.
    pub async fn fresh_database(&self, label: &str) -> String {
        fresh_database_on(&self.admin_url, label).await
    }

    /// Stops the server in `mode` and starts it again on the same port; returns once it
    /// accepts connections, having checked that the server really is a new one (its
    /// `pg_postmaster_start_time()` moved).
    pub async fn restart(&self, mode: Shutdown) {
        let before = self.started_at().await;
        let mode = match mode {
            Shutdown::Fast => "fast",
            Shutdown::Immediate => "immediate",
        };
        let path = self.dir.path().to_str().expect("UTF-8 path");
        run_script("postgres.sh", &["restart", path, mode]).await;
        let after = self.started_at().await;
        assert!(
            after > before,
            "the server was not restarted ({before} -> {after})"
        );
    }

    /// When the running server started (`pg_postmaster_start_time()`, as text).
    async fn started_at(&self) -> String {
        let mut connection = sqlx::PgConnection::connect(&self.admin_url)
            .await
            .expect("connect to the test server");
        sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
            .fetch_one(&mut connection)
            .await
            .expect("pg_postmaster_start_time")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script("postgres.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

//! The configuration of `sluice-ingest`: every flag, with an environment variable as fallback.
//! The README's configuration table lists the same flags.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::event::Table;
use crate::load::{LoaderConfig, Owner, Timeouts};
use crate::selection::{Selection, SelectionError};

/// Receives Segment events over HTTP and loads them into PostgreSQL or SQLite.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice-ingest", version, about, long_about = None)]
pub struct Config {
    /// Destination database: postgres://user:password@host:port/db or sqlite://path/to/file.db.
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        default_value = "sqlite://sluice.db",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// Schema the tables live in (on SQLite, the name the database file is attached under).
    #[arg(long, env = "SLUICE_SCHEMA", default_value = "segment", global = true)]
    pub schema: String,

    /// Address to listen on.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Shared secret: requests must carry X-Signature, the hex HMAC-SHA1 of the body.
    #[arg(long, env = "SLUICE_SHARED_SECRET", hide_env_values = true)]
    pub shared_secret: Option<String>,

    /// API key: requests may authenticate with HTTP Basic, the key as user name.
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Accept a batch (JSON array) on /v1/webhook whose X-Signature signs only its first event,
    /// as Segment's Webhooks (Actions) destination signs batches. Off by default: such a
    /// signature does not cover the other events, so whoever holds one signed batch can append
    /// events to it and replay it, overwriting rows by messageId. Prefer the API key
    /// (Authorization header) for batched delivery.
    #[arg(long, env = "SLUICE_ACCEPT_FIRST_EVENT_SIGNATURES")]
    pub accept_first_event_signatures: bool,

    /// Column selection, as JSON by table ("*" for all): key paths to exclude, to include only,
    /// to keep as one JSON value, to pseudonymize, and a column budget (maxColumns). `@PATH`
    /// reads the JSON from a file. See the README's "Column selection".
    #[arg(long, env = "SLUICE_COLUMN_SELECTION", default_value = "")]
    pub column_selection: String,

    /// Secret key (at least 16 bytes) of the HMAC-SHA-256 that pseudonymized values are stored
    /// as; needed when the column selection pseudonymizes anything.
    #[arg(long, env = "SLUICE_PSEUDONYMIZATION_KEY", hide_env_values = true)]
    pub pseudonymization_key: Option<String>,

    /// Write keys accepted by the HTTP Tracking API (/v1/track, /v1/batch, ...), comma-separated.
    /// With none, the Tracking API accepts any request.
    #[arg(
        long,
        env = "SLUICE_WRITE_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub write_keys: Vec<String>,

    /// Browser origins allowed to send to the Tracking API (CORS), comma-separated; * for any.
    #[arg(
        long,
        env = "SLUICE_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub cors_origins: Vec<String>,

    /// Tables to load, comma-separated; by default Stitch's five (all but alias). Events of
    /// other types are acknowledged and skipped.
    #[arg(
        long,
        env = "SLUICE_TABLES",
        value_enum,
        value_delimiter = ',',
        default_values_t = Table::DEFAULT
    )]
    pub tables: Vec<Table>,

    /// A batch is committed once it holds this many rows.
    #[arg(long, env = "SLUICE_MAX_BATCH_ROWS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_batch_rows: u32,

    /// How long a batch waits for more events before it is written (e.g. 0ms, 20ms, 1s). With
    /// 0, a batch is written as soon as a writer is free; it still grows while all are busy.
    #[arg(long, env = "SLUICE_MAX_BATCH_DELAY", default_value = "0ms", value_parser = parse_delay)]
    pub max_batch_delay: Duration,

    /// Events that may wait for their commit at once; past this, requests get 503.
    #[arg(long, env = "SLUICE_QUEUE_CAPACITY", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// Batches written concurrently, each on its own connection (SQLite always uses one). While
    /// one is being written, the next takes another writer only once it is full or its first
    /// event has waited 10 ms (`load::batcher::OVERLAP_AFTER`). On PostgreSQL each writer keeps
    /// its connection between batches and may take a second one (for DDL, or to retry a refused
    /// batch row by row): the pool holds up to 2 × writers + 2 connections.
    #[arg(long, env = "SLUICE_WRITERS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub writers: u32,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Longest wait for a database connection from the pool, connecting included (e.g. 5s);
    /// past it the request gets 503. Bounds how long a dead or stalled database can hold a
    /// request before anything is sent to it.
    #[arg(long, env = "SLUICE_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = parse_timeout)]
    pub db_acquire_timeout: Duration,

    /// Longest a database statement may run (e.g. 10s): PostgreSQL's `statement_timeout` on
    /// every connection, SQLite's busy timeout. A batch not committed within
    /// `--db-acquire-timeout` plus this is abandoned (rolled back, its connection closed), and
    /// a request waits no longer than that for its commit: then it gets 503 and the sender
    /// retries.
    #[arg(long, env = "SLUICE_STATEMENT_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub statement_timeout: Duration,

    /// Longest a client may take to send a request's headers, and longest an idle keep-alive
    /// connection is kept open (e.g. 10s); the connection is closed after it.
    #[arg(long, env = "SLUICE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub header_read_timeout: Duration,

    /// Longest a client may take to send a request's body once its headers are read (e.g.
    /// 30s); past it the answer is 408 and the connection is closed.
    #[arg(long, env = "SLUICE_BODY_READ_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    pub body_read_timeout: Duration,

    /// HTTP connections served at once; further ones wait in the listen backlog until one
    /// closes, so slow or idle clients cannot take every file descriptor.
    #[arg(long, env = "SLUICE_MAX_HTTP_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_http_connections: u32,

    /// Identity this service creates schema objects for (the operator sets its
    /// SegmentIntegration's UID): what it creates is recorded in the schema's _sdc_ownership
    /// table, and a schema recorded for another identity is refused. PostgreSQL only.
    #[arg(long, env = "SLUICE_INTEGRATION_UID")]
    pub integration_uid: Option<String>,

    /// Name for people of --integration-uid, recorded beside it (e.g. SegmentIntegration
    /// analytics/shop). Default: the UID.
    #[arg(long, env = "SLUICE_INTEGRATION_NAME", requires = "integration_uid")]
    pub integration_name: Option<String>,

    /// Refused requests kept in memory for GET /v1/refused and the status page, most recent
    /// first (0 keeps none; they are counted in /metrics either way).
    #[arg(long, env = "SLUICE_REFUSED_LOG_SIZE", default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub refused_log_size: u32,

    /// Carry out user deletion requests: a `delete` event on /v1/webhook deletes every row of
    /// its userId from every event table, and is recorded in _sdc_deletions. Off by default:
    /// such events are refused with 501.
    #[arg(long, env = "SLUICE_HONOUR_DELETES")]
    pub honour_deletes: bool,

    /// Log filter (tracing's EnvFilter syntax), e.g. info or sluice_ingest=debug.
    #[arg(long, env = "SLUICE_LOG", default_value = "info", global = true)]
    pub log: String,

    /// What to do instead of serving HTTP (by default, serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// A one-off task instead of the service.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Delete every row of one user from every event table of the schema, record it in
    /// _sdc_deletions and print what was deleted (JSON), for deletion requests that come by
    /// other routes than Segment. Uses --database-url and --schema.
    Erase {
        /// The user_id whose rows are deleted.
        #[arg(long)]
        user_id: String,
    },
    /// Reset event tables: empty each and start it again at its next table version, safely
    /// while the service keeps loading. The old rows are kept as <table>__v<old version> (e.g.
    /// track__v0) unless --drop-old; prints what was done (JSON). Uses --database-url and
    /// --schema; the schema must have been prepared by the service.
    Reset {
        /// A table to reset; repeat for several (e.g. --table track --table page).
        #[arg(
            long = "table",
            value_enum,
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        tables: Vec<Table>,
        /// Reset every table the service loads (--tables).
        #[arg(long)]
        all: bool,
        /// Drop the old rows instead of keeping them (DROP TABLE; a view on the table stops
        /// the reset).
        #[arg(long, conflicts_with = "keep_old")]
        drop_old: bool,
        /// Keep the old rows as <table>__v<old version> (the default).
        #[arg(long)]
        keep_old: bool,
    },
}

fn parse_delay(text: &str) -> Result<Duration, String> {
    let delay = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if delay > Duration::from_secs(60) {
        return Err("at most 60s".to_owned());
    }
    Ok(delay)
}

/// A timeout: 1 ms to 1 hour.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(3600) {
        return Err("between 1ms and 1h".to_owned());
    }
    Ok(timeout)
}

impl Config {
    /// The database timeouts.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            acquire: self.db_acquire_timeout,
            statement: self.statement_timeout,
        }
    }

    /// How long a request waits for its events' commit, and a batch may take to commit:
    /// `--db-acquire-timeout` plus `--statement-timeout`.
    pub fn commit_timeout(&self) -> Duration {
        self.db_acquire_timeout + self.statement_timeout
    }

    /// The loader's tuning from this configuration.
    pub fn loader(&self, sqlite: bool) -> LoaderConfig {
        LoaderConfig {
            max_batch_rows: self.max_batch_rows as usize,
            max_batch_delay: self.max_batch_delay,
            queue_capacity: self.queue_capacity as usize,
            // SQLite has one writer at a time; a second would only wait on the lock.
            writers: if sqlite { 1 } else { self.writers as usize },
            commit_timeout: self.commit_timeout(),
        }
    }

    /// The owner of the schema objects this service creates, when `--integration-uid` is set.
    pub fn owner(&self) -> Option<Owner> {
        let uid = self.integration_uid.clone().filter(|uid| !uid.is_empty())?;
        Some(Owner {
            name: self
                .integration_name
                .clone()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| uid.clone()),
            uid,
        })
    }

    /// The column selection in force: `--column-selection` (inline JSON, or `@PATH`) with the
    /// pseudonymization key.
    pub fn selection(&self) -> Result<Selection, SelectionError> {
        let text = match self.column_selection.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| SelectionError::Malformed(format!("cannot read {path}: {e}")))?,
            None => self.column_selection.clone(),
        };
        Selection::parse(&text, self.pseudonymization_key.as_deref())
    }

    /// The configuration in force as the status page shows it: name and value, with the
    /// database URL's password masked and secrets shown only as set or not.
    pub fn shown(&self) -> Vec<(&'static str, String)> {
        let secret = |value: Option<&str>| match value {
            Some(v) if !v.is_empty() => "set (hidden)".to_owned(),
            _ => "not set: open to anyone".to_owned(),
        };
        let ms = |d: Duration| humantime::format_duration(d).to_string();
        vec![
            ("database URL", mask_database_url(&self.database_url)),
            ("schema", self.schema.clone()),
            (
                "tables",
                self.selected_tables()
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("listen", self.listen.to_string()),
            ("max batch rows", self.max_batch_rows.to_string()),
            ("max batch delay", ms(self.max_batch_delay)),
            ("writers", self.writers.to_string()),
            ("queue capacity (events)", self.queue_capacity.to_string()),
            ("max body bytes", self.max_body_bytes.to_string()),
            ("commit timeout", ms(self.commit_timeout())),
            ("shared secret", secret(self.shared_secret.as_deref())),
            ("API key", secret(self.api_key.as_deref())),
            (
                "write keys",
                match self.write_keys.iter().filter(|k| !k.is_empty()).count() {
                    0 => "none: the Tracking API is open to anyone".to_owned(),
                    n => format!("{n} set (hidden)"),
                },
            ),
            (
                "accept first-event signatures",
                self.accept_first_event_signatures.to_string(),
            ),
            ("refused log size", self.refused_log_size.to_string()),
            ("honour deletes", self.honour_deletes.to_string()),
            (
                "column selection",
                if self.column_selection.trim().is_empty() {
                    "none: every key loads".to_owned()
                } else {
                    self.column_selection.clone()
                },
            ),
            (
                "pseudonymization key",
                match self.pseudonymization_key.as_deref() {
                    Some(key) if !key.is_empty() => "set (hidden)".to_owned(),
                    _ => "not set".to_owned(),
                },
            ),
        ]
    }

    /// The selected tables, deduplicated and sorted.
    pub fn selected_tables(&self) -> Vec<Table> {
        let mut tables = self.tables.clone();
        tables.sort();
        tables.dedup();
        tables
    }
}

/// What a URL parameter may carry a password under (libpq's `password`, `sslpassword`).
const PASSWORD_PARAMETERS: [&str; 2] = ["password", "sslpassword"];

/// `url` with its password, and any password parameter, replaced by `****`; a URL that cannot
/// be parsed is not shown at all.
pub fn mask_database_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(not shown: the URL cannot be parsed)".to_owned();
    };
    if parsed.password().is_some() && parsed.set_password(Some("****")).is_err() {
        return "(not shown: the URL cannot be parsed)".to_owned();
    }
    let has_secret_parameter = parsed
        .query_pairs()
        .any(|(k, _)| PASSWORD_PARAMETERS.contains(&k.to_ascii_lowercase().as_str()));
    if has_secret_parameter {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let secret = PASSWORD_PARAMETERS.contains(&k.to_ascii_lowercase().as_str());
                (
                    k.into_owned(),
                    if secret {
                        "****".to_owned()
                    } else {
                        v.into_owned()
                    },
                )
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_locally_on_sqlite() {
        let config = Config::try_parse_from(["sluice-ingest"]).expect("defaults parse");
        assert_eq!(config.database_url, "sqlite://sluice.db");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.schema, "segment");
        assert_eq!(config.selected_tables(), Table::DEFAULT.to_vec());
        assert_eq!(config.max_batch_delay, Duration::ZERO);
        assert!(!config.accept_first_event_signatures);
        assert_eq!(config.owner(), None);
        assert_eq!(config.commit_timeout(), Duration::from_secs(15));
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.body_read_timeout, Duration::from_secs(30));
        assert_eq!(config.max_http_connections, 1024);
        assert_eq!(config.refused_log_size, 200);
        assert!(Config::try_parse_from(["sluice-ingest", "--statement-timeout", "0s"]).is_err());
    }

    #[test]
    fn integration_identity_becomes_the_owner() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["sluice-ingest"];
            args.extend_from_slice(extra);
            Config::try_parse_from(args)
        };
        let owner = parse(&["--integration-uid", "u-1"])
            .expect("parses")
            .owner();
        assert_eq!(
            owner,
            Some(Owner {
                uid: "u-1".to_owned(),
                name: "u-1".to_owned()
            })
        );
        let named = parse(&["--integration-uid", "u-1", "--integration-name", "shop"])
            .expect("parses")
            .owner();
        assert_eq!(named.map(|o| o.name).as_deref(), Some("shop"));
        assert!(
            parse(&["--integration-name", "shop"]).is_err(),
            "a name needs a UID"
        );
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            mask_database_url(
                "postgres://sluice:s3cr%40t@db.example.com:5432/warehouse?sslmode=require"
            ),
            "postgres://sluice:****@db.example.com:5432/warehouse?sslmode=require"
        );
        let masked = mask_database_url("postgres://db/w?user=u&password=hunter2&sslpassword=x");
        assert!(
            !masked.contains("hunter2") && !masked.contains("=x"),
            "{masked}"
        );
        assert!(masked.contains("user=u"));
        assert_eq!(
            mask_database_url("sqlite://sluice.db"),
            "sqlite://sluice.db"
        );
        assert!(!mask_database_url("postgres://u:pw@[bad").contains("pw"));
        let config = Config::try_parse_from([
            "sluice-ingest",
            "--database-url",
            "postgres://u:topsecret@h/d",
            "--api-key",
            "key-123",
            "--shared-secret",
            "shh-456",
            "--write-keys",
            "wk-789",
        ])
        .expect("parses");
        let shown = format!("{:?}", config.shown());
        for secret in ["topsecret", "key-123", "shh-456", "wk-789"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }

    #[test]
    fn flags_select_tables_once_each_and_refuse_unknown_tables_and_empty_batches() {
        let config = Config::try_parse_from([
            "sluice-ingest",
            "--tables",
            "track,alias,track",
            "--max-batch-delay",
            "250ms",
            "--max-batch-rows",
            "50",
            "--accept-first-event-signatures",
        ])
        .expect("parses");
        assert!(config.accept_first_event_signatures);
        assert_eq!(config.selected_tables(), vec![Table::Alias, Table::Track]);
        assert_eq!(config.max_batch_delay, Duration::from_millis(250));
        assert_eq!(config.max_batch_rows, 50);
        let unknown = Config::try_parse_from(["sluice-ingest", "--tables", "orders"])
            .expect_err("orders is no table")
            .to_string();
        assert!(
            unknown.contains("alias, group, identify, page, screen, track"),
            "{unknown}"
        );
        let defaults = Config::try_parse_from(["sluice-ingest"]).expect("defaults");
        assert_eq!(defaults.selected_tables(), Table::DEFAULT.to_vec());
        assert!(Config::try_parse_from(["sluice-ingest", "--max-batch-rows", "0"]).is_err());
    }
}

//! The ingest benchmark (`bash tests/bench.sh ingest`): drives real `sluice-ingest` processes
//! (the release build) with many concurrent clients and realistic events, and prints, in one
//! run:
//!
//! - on PostgreSQL: events/s, p50/p99 acknowledgement latency, and CPU microseconds per event
//!   in the ingest process and in PostgreSQL (the postmaster and its backends), for single
//!   events and batches of 100 (webhook and `/v1/batch`) as fast as they are answered, then
//!   open-loop at half that rate;
//! - the **no-database ceiling**: the same single-event requests answered by a process that
//!   does not load their type (the whole HTTP path, without the database);
//! - the **COPY ceiling**: a `COPY` of the same rows into a table of the same shape;
//! - **schema evolution**: a stream in which every event brings two new keys, until the
//!   table's column cap, beside its DDL floor (the same columns added alone), and the same
//!   stream with its map kept as one JSON column by the `json` column selection;
//! - on SQLite: single events and batches beside a plain insert of the same rows in one
//!   transaction;
//! - the ratios the README's table quotes, and the ingest processes' peak RSS.
//!
//! It checks that every acknowledged event was committed, and asserts no timings. Knobs
//! (environment): `BENCH_EVENTS` (default 60000 per batch mode and for the no-database
//! ceiling; single-event modes send half), `BENCH_CLIENTS` (64), `BENCH_BATCH` (events per
//! request in batch modes, 100).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_ingest::schema::COLUMN_LIMIT;
use sluice_tests::ingest::{Backend, Destination, Process};
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Executor, PgConnection, Row, TypeInfo, ValueRef};

const SCHEMA: &str = "bench";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A track event shaped like Segment's own example (analytics.js context, a handful of
/// properties), about 1.3 KB of JSON.
fn event(mode: &str, i: usize) -> Value {
    let name = ["Order Completed", "Product Viewed", "Checkout Started"][i % 3];
    json!({
        "type": "track",
        "messageId": format!("{mode}-{i:09}"),
        "anonymousId": format!("anon-{:06}", i % 50_000),
        "userId": format!("user-{:06}", i % 20_000),
        "event": name,
        "channel": "browser",
        "timestamp": "2024-05-01T10:00:00.123Z",
        "sentAt": "2024-05-01T10:00:00.456Z",
        "receivedAt": "2024-05-01T10:00:00.789Z",
        "originalTimestamp": "2024-05-01T10:00:00.100Z",
        "version": 2,
        "integrations": {"All": true, "Mixpanel": false},
        "context": {
            "ip": "203.0.113.7",
            "locale": "en-US",
            "library": {"name": "analytics.js", "version": "2.11.1"},
            "page": {
                "path": "/academy/", "referrer": "https://example.com/", "search": "",
                "title": "Analytics Academy", "url": "https://example.com/academy/"
            },
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/113.0.0.0 Safari/537.36",
            "campaign": {"name": "TPS Innovation Newsletter", "source": "Newsletter", "medium": "email"},
        },
        "properties": {
            "order_id": format!("o-{i}"),
            "revenue": (i % 1000) as f64 + 0.99,
            "quantity": (i % 7) as i64,
            "currency": "EUR",
            "coupon": if i.is_multiple_of(2) { Value::Null } else { json!("SPRING") },
            "gift": i.is_multiple_of(5),
            "products": [{"sku": format!("sku-{}", i % 300), "price": 19.99}]
        }
    })
}

/// The column selection that keeps the evolving stream's map as one `jsonb` column.
const JSON_SELECTION: &str = r#"{"screen": {"json": ["properties.experiments"]}}"#;

/// A screen event whose `properties.experiments` map is keyed by experiment ids, two of them
/// seen for the first time in this event: every event adds two columns.
fn evolving_event(i: usize) -> Value {
    json!({
        "type": "screen",
        "messageId": format!("evolve-{i:09}"),
        "userId": format!("user-{:06}", i % 20_000),
        "name": "Home",
        "timestamp": "2024-05-01T10:00:00.123Z",
        "properties": {
            "variant": "b",
            "experiments": {
                format!("exp_{}", 2 * i): "control",
                format!("exp_{}", 2 * i + 1): "treatment",
            }
        }
    })
}

/// Request bodies of `per_request` events each, made by `make`, for `url`'s route: Tracking
/// API batches for `/v1/batch`, JSON arrays for webhook batches, single objects otherwise.
fn bodies(
    url: &str,
    events: usize,
    per_request: usize,
    make: impl Fn(usize) -> Value,
) -> Arc<Vec<String>> {
    Arc::new(
        (0..events.div_ceil(per_request))
            .map(|r| {
                let batch: Vec<Value> = (r * per_request..((r + 1) * per_request).min(events))
                    .map(&make)
                    .collect();
                if url.ends_with("/v1/batch") {
                    json!({ "batch": batch }).to_string()
                } else if per_request == 1 {
                    batch[0].to_string()
                } else {
                    Value::Array(batch).to_string()
                }
            })
            .collect(),
    )
}

#[derive(Debug)]
struct Run {
    events: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }
}

/// What a run sends: `events` events in `bodies`, `per_request` per body, from `clients`
/// concurrent clients as fast as they are answered (closed loop), or at `rate` events/s in
/// total (open loop).
struct Load {
    bodies: Arc<Vec<String>>,
    events: usize,
    per_request: usize,
    clients: usize,
    rate: Option<f64>,
}

impl Load {
    /// `events` track events of `mode`, `per_request` per request, for `url`.
    fn track(url: &str, mode: &str, events: usize, per_request: usize, clients: usize) -> Load {
        Load {
            bodies: bodies(url, events, per_request, |i| event(mode, i)),
            events,
            per_request,
            clients,
            rate: None,
        }
    }

    fn at(self, rate: f64) -> Load {
        Load {
            rate: Some(rate),
            ..self
        }
    }
}

async fn drive(url: &str, load: Load) -> Run {
    let Load {
        bodies,
        events,
        per_request,
        clients,
        rate,
    } = load;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, bodies, next, url) =
            (client.clone(), bodies.clone(), next.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= bodies.len() {
                    return latencies;
                }
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64((r * per_request) as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(bodies[r].clone())
                    .send()
                    .await
                    .expect("request");
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                assert_eq!(status, 200, "every request is acknowledged: {body}");
                latencies.push(sent.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    Run {
        events,
        seconds: started.elapsed().as_secs_f64(),
        latencies,
    }
}

/// `(pid, parent pid, CPU seconds used so far: user + system)` of every process.
fn processes() -> Vec<(u32, u32, f64)> {
    let of = |stat: &str| -> Option<(u32, u32, f64)> {
        let pid = stat.split_whitespace().next()?.parse().ok()?;
        let close = stat.rfind(')')?;
        let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some((pid, ppid, ticks / 100.0))
    };
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
                .filter_map(|stat| of(&stat))
                .collect()
        })
        .unwrap_or_default()
}

/// CPU seconds used so far by `pid` and, when `children`, by its child processes (a
/// postmaster's backends). Backends that ended are not counted; Sluice's pool keeps its
/// connections for the whole run.
fn cpu_seconds(pid: u32, children: bool) -> f64 {
    processes()
        .iter()
        .filter(|(p, parent, _)| *p == pid || (children && *parent == pid))
        .map(|(_, _, seconds)| seconds)
        .sum()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The postmaster of the PostgreSQL server at `url`: the parent of a backend.
async fn postmaster(url: &str) -> u32 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("backend pid");
    processes()
        .iter()
        .find(|(pid, _, _)| *pid == backend as u32)
        .map(|(_, parent, _)| *parent)
        .expect("the backend's parent")
}

/// Prints one line per measured run: rate, latency percentiles, CPU per event.
struct Table {
    ingest: u32,
    database: Option<u32>,
}

impl Table {
    fn header() {
        println!(
            "{:<40} {:>10} {:>9} {:>9} {:>13} {:>13}",
            "mode", "events/s", "p50 ms", "p99 ms", "ingest us/ev", "db us/ev"
        );
    }

    fn cpu(&self) -> (f64, f64) {
        (
            cpu_seconds(self.ingest, false),
            self.database.map_or(0.0, |pid| cpu_seconds(pid, true)),
        )
    }

    /// Sends `events` of the schema-evolution stream ([`evolving_event`]) to `url`, one per
    /// request from 8 senders as fast as they are answered, prints its line as `name`, and
    /// checks that every event is in `dest`'s `screen` table.
    async fn evolving(&self, name: &str, dest: &Destination, url: &str, events: usize) -> Run {
        let load = Load {
            bodies: bodies(url, events, 1, evolving_event),
            events,
            per_request: 1,
            clients: 8,
            rate: None,
        };
        let run = self.measure(name, url, load).await;
        assert_committed(dest, "screen", &[("evolve", events)]).await;
        run
    }

    /// Drives `load` at `url` and prints its line as `name`.
    async fn measure(&self, name: &str, url: &str, load: Load) -> Run {
        let before = self.cpu();
        let run = drive(url, load).await;
        let after = self.cpu();
        let per_event = |seconds: f64| seconds / run.events as f64 * 1e6;
        let database = match self.database {
            Some(_) => format!("{:>13.1}", per_event(after.1 - before.1)),
            None => format!("{:>13}", "-"),
        };
        println!(
            "{name:<40} {:>10.0} {:>9.2} {:>9.2} {:>13.1} {database}",
            run.rate(),
            run.percentile(0.50).as_secs_f64() * 1e3,
            run.percentile(0.99).as_secs_f64() * 1e3,
            per_event(after.0 - before.0),
        );
        run
    }
}

/// COPYs the rows of `bench.track` into an empty table of the same shape and returns rows/s.
async fn copy_ceiling(url: &str, rows: usize) -> f64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    conn.execute("CREATE TABLE bench.copy_target (LIKE bench.track INCLUDING ALL)")
        .await
        .expect("copy target");
    let mut out = conn
        .copy_out_raw("COPY bench.track TO STDOUT")
        .await
        .expect("copy out");
    let mut data = Vec::new();
    use futures::StreamExt;
    while let Some(chunk) = out.next().await {
        data.extend_from_slice(&chunk.expect("chunk"));
    }
    drop(out);
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw("COPY bench.copy_target FROM STDIN")
        .await
        .expect("copy in");
    copy.send(data).await.expect("send");
    let copied = copy.finish().await.expect("finish");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(copied as usize, rows);
    rows as f64 / seconds
}

/// The floor under schema evolution: adds `columns` text columns, 16 per `ALTER TABLE` (what a
/// batch of 8 events with two new keys each needs), each statement committed on its own, to
/// `bench.ddl_target` (made beforehand as a copy of the evolving table's shape), from one
/// connection with nothing else running; returns the seconds. No loader can evolve the same
/// columns faster: PostgreSQL's cost per added column (about a quarter of a millisecond
/// here at 1,500 columns) barely depends on how columns are grouped into statements.
async fn ddl_floor(url: &str, columns: usize) -> f64 {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let started = Instant::now();
    for first in (0..columns).step_by(16) {
        let adds = (first..columns.min(first + 16))
            .map(|i| format!("ADD COLUMN \"properties__experiments__exp_{i:07}_a\" text"))
            .collect::<Vec<_>>()
            .join(", ");
        conn.execute(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE bench.ddl_target {adds}"
        )))
        .await
        .expect("alter");
    }
    started.elapsed().as_secs_f64()
}

/// A SQLite value as read back, to insert again.
enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
}

/// Reads every row of `track` from the SQLite file at `url`, then inserts them again, with one
/// prepared `INSERT` per row in one transaction, into an empty table of the same columns with
/// the same unique index on `message_id`; returns rows/s of the insert.
async fn sqlite_insert_ceiling(url: &str, rows: usize) -> f64 {
    let mut conn = SqliteConnection::connect(url).await.expect("connect");
    let read = sqlx::query(r#"SELECT * FROM "track""#)
        .fetch_all(&mut conn)
        .await
        .expect("read rows");
    let columns = read[0].columns().len();
    let cells: Vec<Vec<Cell>> = read
        .iter()
        .map(|row| {
            (0..columns)
                .map(|i| {
                    let raw = row.try_get_raw(i).expect("cell");
                    if raw.is_null() {
                        return Cell::Null;
                    }
                    match raw.type_info().name() {
                        "INTEGER" | "BOOLEAN" => Cell::Integer(row.get(i)),
                        "REAL" => Cell::Real(row.get(i)),
                        _ => Cell::Text(row.get(i)),
                    }
                })
                .collect()
        })
        .collect();
    conn.execute(
        r#"CREATE TABLE "copy_target" AS SELECT * FROM "track" WHERE 0;
           CREATE UNIQUE INDEX "copy_target_message_id" ON "copy_target" ("message_id")"#,
    )
    .await
    .expect("copy target");
    let sql = format!(
        r#"INSERT INTO "copy_target" VALUES ({})"#,
        vec!["?"; columns].join(", ")
    );
    let started = Instant::now();
    let mut tx = conn.begin().await.expect("begin");
    for row in &cells {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
        for cell in row {
            query = match cell {
                Cell::Null => query.bind(None::<i64>),
                Cell::Integer(n) => query.bind(*n),
                Cell::Real(x) => query.bind(*x),
                Cell::Text(s) => query.bind(s.as_str()),
            };
        }
        query.execute(&mut *tx).await.expect("insert");
    }
    tx.commit().await.expect("commit");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(cells.len(), rows);
    rows as f64 / seconds
}

/// Rows of `table` in the destination whose `message_id` starts with `prefix`.
async fn count(dest: &Destination, table: &str, prefix: &str) -> usize {
    let schema_table = match dest.backend {
        Backend::Postgres => format!(r#""{SCHEMA}"."{table}""#),
        Backend::Sqlite => format!(r#""{table}""#),
    };
    let sql = format!("SELECT count(*) FROM {schema_table} WHERE message_id LIKE '{prefix}-%'");
    let n: i64 = match dest.backend {
        Backend::Postgres => {
            let mut conn = PgConnection::connect(&dest.url).await.expect("connect");
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut conn)
                .await
        }
        Backend::Sqlite => {
            let mut conn = SqliteConnection::connect(&dest.url).await.expect("connect");
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut conn)
                .await
        }
    }
    .expect("count");
    n as usize
}

/// Asserts that every event of each `(prefix, sent)` was committed to `table`.
async fn assert_committed(dest: &Destination, table: &str, sent: &[(&str, usize)]) {
    for (prefix, sent) in sent {
        let stored = count(dest, table, prefix).await;
        assert_eq!(
            stored, *sent,
            "{prefix}: every acknowledged event is committed"
        );
    }
}

async fn spawn(dest: &Destination, extra: &[&str]) -> Process {
    let mut args = vec![
        "--database-url",
        &dest.url,
        "--schema",
        SCHEMA,
        "--log",
        "warn",
    ];
    args.extend_from_slice(extra);
    Process::spawn(&args, &[]).await
}

#[tokio::main]
async fn main() {
    let events = env_usize("BENCH_EVENTS", 60_000);
    let singles = events / 2;
    let clients = env_usize("BENCH_CLIENTS", 64);
    let batch = env_usize("BENCH_BATCH", 100);
    let batch_clients = (clients / 4).max(1);
    println!(
        "sluice ingest benchmark: {events} events per batch mode and for the ceiling, {singles} \
         per single-event mode; {clients} clients for single events, {batch_clients} for batches \
         of {batch}"
    );

    // The no-database ceiling first, while nothing else has run: the same single-event
    // requests, answered by a process that does not load track events.
    let nodb_dest = Destination::new(Backend::Sqlite, "bench-nodb").await;
    let nodb = spawn(&nodb_dest, &["--tables", "identify"]).await;
    let url = nodb.url("/v1/webhook");
    let nodb_table = Table {
        ingest: nodb.pid(),
        database: None,
    };
    println!("\n== the HTTP path without the database (track not selected) ==");
    Table::header();
    drive(&url, Load::track(&url, "nodbwarmup", 2_000, 1, clients)).await;
    let ceiling = nodb_table
        .measure(
            "single events, not loaded",
            &url,
            Load::track(&url, "nodb", events, 1, clients),
        )
        .await;
    drop(nodb);

    println!("\n== PostgreSQL ==");
    let dest = Destination::new(Backend::Postgres, "bench").await;
    let process = spawn(&dest, &[]).await;
    let table = Table {
        ingest: process.pid(),
        database: Some(postmaster(&dest.url).await),
    };
    let url = process.url("/v1/webhook");
    let tracking_url = process.url("/v1/batch");
    // Warm-up: creates the columns, so schema evolution is not part of these figures.
    drive(&url, Load::track(&url, "warmup", 2_000, batch, 8)).await;
    Table::header();
    let single = table
        .measure(
            "single events, max rate",
            &url,
            Load::track(&url, "single", singles, 1, clients),
        )
        .await;
    let batched = table
        .measure(
            &format!("webhook batches of {batch}, max rate"),
            &url,
            Load::track(&url, "batch", events, batch, batch_clients),
        )
        .await;
    let tracking = table
        .measure(
            &format!("/v1/batch of {batch}, max rate"),
            &tracking_url,
            Load::track(&tracking_url, "tracking", events, batch, batch_clients),
        )
        .await;
    table
        .measure(
            "single events, half max rate",
            &url,
            Load::track(&url, "half", singles, 1, clients).at(single.rate() / 2.0),
        )
        .await;
    table
        .measure(
            &format!("webhook batches of {batch}, half max rate"),
            &url,
            Load::track(&url, "halfbatch", events, batch, batch_clients).at(batched.rate() / 2.0),
        )
        .await;
    let sent = [
        ("warmup", 2_000),
        ("single", singles),
        ("batch", events),
        ("tracking", events),
        ("half", singles),
        ("halfbatch", events),
    ];
    assert_committed(&dest, "track", &sent).await;

    // Every event brings two keys no event had before, until the column cap.
    let base_columns = {
        let mut conn = PgConnection::connect(&dest.url).await.expect("connect");
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_schema = 'bench' AND table_name = 'screen'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("columns");
        n as usize
    };
    // `properties_variant` is the one other key the events bring.
    let evolving = (COLUMN_LIMIT - base_columns - 1) / 2;
    {
        let mut conn = PgConnection::connect(&dest.url).await.expect("connect");
        conn.execute("CREATE TABLE bench.ddl_target (LIKE bench.screen INCLUDING ALL)")
            .await
            .expect("ddl target");
    }
    let evolution = table
        .evolving(
            "schema evolution, 2 new keys per event",
            &dest,
            &url,
            evolving,
        )
        .await;
    let pg_rss = peak_rss_mib(process.pid());
    let metrics = reqwest::get(process.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let batches = metric("sluice_batch_rows_count");
    println!(
        "batches of every mode above: {batches:.0}, mean {:.1} rows, mean write+commit {:.2} ms",
        metric("sluice_batch_rows_sum") / batches,
        metric("sluice_commit_seconds_sum") / batches * 1e3
    );
    drop(process);
    let rows: usize = sent.iter().map(|(_, n)| n).sum();
    let copy = copy_ceiling(&dest.url, rows).await;
    println!("COPY of the same {rows} rows into the same table shape: {copy:.0} rows/s");
    let ddl_seconds = ddl_floor(&dest.url, evolving * 2).await;
    let evolution_ceiling = evolving as f64 / ddl_seconds;
    println!(
        "the same {} columns added alone, 16 per ALTER TABLE: {ddl_seconds:.2} s, so at most \
         {evolution_ceiling:.0} events/s of schema evolution",
        evolving * 2
    );

    // The same stream with its map kept as one `jsonb` column (the `json` column selection):
    // no DDL after the first event, on a fresh database.
    let json_dest = Destination::new(Backend::Postgres, "bench-json").await;
    let json_process = spawn(&json_dest, &["--column-selection", JSON_SELECTION]).await;
    let json_table = Table {
        ingest: json_process.pid(),
        database: Some(postmaster(&json_dest.url).await),
    };
    let json_url = json_process.url("/v1/webhook");
    let json_events = singles;
    let as_json = json_table
        .evolving(
            "the same stream, map as one JSON column",
            &json_dest,
            &json_url,
            json_events,
        )
        .await;
    drop(json_process);

    println!("\n== SQLite ==");
    let lite_dest = Destination::new(Backend::Sqlite, "bench-sqlite").await;
    let lite = spawn(&lite_dest, &[]).await;
    let lite_table = Table {
        ingest: lite.pid(),
        database: None,
    };
    let url = lite.url("/v1/webhook");
    drive(&url, Load::track(&url, "warmup", 2_000, batch, 8)).await;
    Table::header();
    let lite_single = lite_table
        .measure(
            "single events, max rate",
            &url,
            Load::track(&url, "single", singles, 1, clients),
        )
        .await;
    let lite_batched = lite_table
        .measure(
            &format!("webhook batches of {batch}, max rate"),
            &url,
            Load::track(&url, "batch", events, batch, batch_clients),
        )
        .await;
    let lite_sent = [("warmup", 2_000), ("single", singles), ("batch", events)];
    assert_committed(&lite_dest, "track", &lite_sent).await;
    let lite_rss = peak_rss_mib(lite.pid());
    drop(lite);
    let lite_rows: usize = lite_sent.iter().map(|(_, n)| n).sum();
    let plain = sqlite_insert_ceiling(&lite_dest.url, lite_rows).await;
    println!("plain insert of the same {lite_rows} rows in one transaction: {plain:.0} rows/s");

    println!("\n== summary ==");
    println!("every acknowledged event was committed: checked by count per mode");
    println!(
        "PostgreSQL single events / no-database ceiling: {:.0} / {:.0} = {:.2}",
        single.rate(),
        ceiling.rate(),
        single.rate() / ceiling.rate()
    );
    println!(
        "PostgreSQL / COPY: webhook batches of {batch} {:.2}, /v1/batch of {batch} {:.2}, single events {:.2}",
        batched.rate() / copy,
        tracking.rate() / copy,
        single.rate() / copy
    );
    println!(
        "schema evolution / its DDL floor: {:.0} / {evolution_ceiling:.0} events/s = {:.2} \
         ({evolving} events, {} new columns)",
        evolution.rate(),
        evolution.rate() / evolution_ceiling,
        evolving * 2
    );
    println!(
        "the same stream with its map as one JSON column (`json` column selection): {:.0} \
         events/s ({json_events} events)",
        as_json.rate()
    );
    println!(
        "SQLite / plain insert: single events {:.2}, webhook batches of {batch} {:.2}",
        lite_single.rate() / plain,
        lite_batched.rate() / plain
    );
    println!(
        "peak RSS of sluice-ingest: {pg_rss:.1} MiB on PostgreSQL, {lite_rss:.1} MiB on SQLite"
    );
}

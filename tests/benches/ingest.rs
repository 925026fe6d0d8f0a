//! The ingest benchmark (`bash tests/bench.sh`): drives `POST /v1/webhook` of a real
//! `sluice-ingest` process with many concurrent clients and realistic events into PostgreSQL, and
//! prints events/s, acknowledgement latency percentiles, the process's peak RSS, and the rate of a
//! plain `COPY` of the same rows into a table of the same shape (the ceiling).
//!
//! Knobs (environment): `BENCH_EVENTS` (default 60000 per mode), `BENCH_CLIENTS` (64),
//! `BENCH_BATCH` (events per request in batch mode, 100).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::ingest::{Destination, Process};
use sqlx::{Connection, Executor, PgConnection};

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

/// Sends `events` events, `per_request` per request, from `clients` concurrent clients as fast
/// as they are answered (closed loop), or at `rate` events/s in total (open loop). Requests to
/// `/v1/batch` wrap their events as the Tracking API expects; webhook batches are JSON arrays.
async fn drive(
    url: &str,
    mode: &'static str,
    events: usize,
    per_request: usize,
    clients: usize,
    rate: Option<f64>,
) -> Run {
    let bodies: Arc<Vec<String>> = Arc::new(
        (0..events.div_ceil(per_request))
            .map(|r| {
                let batch: Vec<Value> = (r * per_request..((r + 1) * per_request).min(events))
                    .map(|i| event(mode, i))
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
    );
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
                let _ = response.bytes().await;
                assert_eq!(status, 200, "every request is acknowledged");
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

/// CPU seconds (user + system) used so far by the process `pid`, or by every process whose
/// command is `name` when `pid` is None.
fn cpu_seconds(pid: Option<u32>, name: &str) -> f64 {
    let ticks_of = |stat: &str| -> Option<(String, f64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some((comm, ticks / 100.0))
    };
    let pids: Vec<String> = match pid {
        Some(pid) => vec![pid.to_string()],
        None => std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default(),
    };
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| ticks_of(&stat))
        .filter(|(comm, _)| pid.is_some() || comm == name)
        .map(|(_, seconds)| seconds)
        .sum()
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// COPYs the rows Sluice loaded into an empty table of the same shape and returns rows/s.
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

async fn count(url: &str, mode: &str) -> usize {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bench.track WHERE message_id LIKE $1")
        .bind(format!("{mode}-%"))
        .fetch_one(&mut conn)
        .await
        .expect("count");
    n as usize
}

#[tokio::main]
async fn main() {
    let events = env_usize("BENCH_EVENTS", 60_000);
    let clients = env_usize("BENCH_CLIENTS", 64);
    let batch = env_usize("BENCH_BATCH", 100);
    let dest = Destination::new(sluice_tests::ingest::Backend::Postgres, "bench").await;
    let process = Process::spawn(
        &[
            "--database-url",
            &dest.url,
            "--schema",
            SCHEMA,
            "--log",
            "warn",
        ],
        &[],
    )
    .await;
    let url = process.url("/v1/webhook");
    // Warm-up: creates the columns, so schema evolution is not part of the figures.
    drive(&url, "warmup", 2_000, 100, 8, None).await;

    println!("sluice ingest benchmark: {events} events per mode, {clients} concurrent clients");
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>14} {:>14}",
        "mode", "events/s", "p50 ms", "p99 ms", "ingest us/ev", "postgres us/ev"
    );
    let pid = process.pid();
    let measure = |name: String, run: Run, cpu: (f64, f64)| {
        let ingest = (cpu_seconds(Some(pid), "") - cpu.0) / run.events as f64 * 1e6;
        let postgres = (cpu_seconds(None, "postgres") - cpu.1) / run.events as f64 * 1e6;
        println!(
            "{name:<34} {:>10.0} {:>9.2} {:>9.2} {ingest:>14.1} {postgres:>14.1}",
            run.rate(),
            run.percentile(0.50).as_secs_f64() * 1e3,
            run.percentile(0.99).as_secs_f64() * 1e3
        );
        run
    };
    let cpu = || (cpu_seconds(Some(pid), ""), cpu_seconds(None, "postgres"));
    let before = cpu();
    let single = drive(&url, "single", events / 4, 1, clients, None).await;
    let single = measure("single events, max rate".into(), single, before);
    let before = cpu();
    let batched = drive(&url, "batch", events, batch, clients / 4, None).await;
    let batched = measure(format!("batches of {batch}, max rate"), batched, before);
    let before = cpu();
    let tracking_url = process.url("/v1/batch");
    let tracking = drive(&tracking_url, "tracking", events, batch, clients / 4, None).await;
    let tracking = measure(format!("/v1/batch of {batch}, max rate"), tracking, before);
    let before = cpu();
    let half = drive(
        &url,
        "half",
        events / 4,
        1,
        clients,
        Some(single.rate() / 2.0),
    )
    .await;
    measure("single events, half max rate".into(), half, before);
    let before = cpu();
    let half_batched = drive(
        &url,
        "halfbatch",
        events,
        batch,
        clients / 4,
        Some(batched.rate() / 2.0),
    )
    .await;
    measure(
        format!("batches of {batch}, half max rate"),
        half_batched,
        before,
    );

    for (mode, sent) in [
        ("single", events / 4),
        ("batch", events),
        ("tracking", events),
        ("half", events / 4),
        ("halfbatch", events),
    ] {
        let stored = count(&dest.url, mode).await;
        assert_eq!(
            stored, sent,
            "{mode}: every acknowledged event is committed"
        );
    }
    println!("every acknowledged event is in PostgreSQL: checked by count per mode");
    let rss = peak_rss_kib(process.pid());
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
        "batches: {batches:.0}, mean {:.0} rows, mean write+commit {:.1} ms",
        metric("sluice_batch_rows_sum") / batches,
        metric("sluice_commit_seconds_sum") / batches * 1e3
    );
    let total: usize = 2_000 + events / 4 * 2 + events * 3;
    let ceiling = copy_ceiling(&dest.url, total).await;
    println!("peak RSS of sluice-ingest: {:.1} MiB", rss as f64 / 1024.0);
    println!("COPY of the same {total} rows into the same table shape: {ceiling:.0} rows/s");
    println!(
        "Sluice / COPY: single events {:.2}, webhook batches of {batch} {:.2}, /v1/batch of {batch} {:.2}",
        single.rate() / ceiling,
        batched.rate() / ceiling,
        tracking.rate() / ceiling
    );
}

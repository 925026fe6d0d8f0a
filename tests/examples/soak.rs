//! The ingest soak (issue 11, item 5): `sluice-ingest` as its own process against a PostgreSQL
//! server of its own that is restarted every few minutes, loaded open-loop at half the rate it
//! sustains, for half an hour by default. Every minute it prints the events acknowledged per
//! second, the p99 acknowledgement latency (from the first attempt to the 200, retries
//! included), the ingest's RSS, and how many answers were 503 and how many requests were cut off;
//! at the end, how many acknowledged events are missing from the table and how many are stored
//! more than once (both must be 0; the exit status says whether they were).
//!
//! Not part of the test command. Run it with `bash tests/soak.sh [MINUTES] [RESTART_SECONDS]`.
//! Settings (environment): `SOAK_MINUTES` (30), `SOAK_RESTART_SECONDS` (300), `SOAK_RATE`
//! (events/s; default: half the rate measured first), `SOAK_PROBE_SECONDS` (20, the measurement),
//! `SOAK_REPORT_SECONDS` (60), `SLUICE_INGEST_BIN` (default: the debug build beside this program).
//!
//! Senders are Segment-style ([`sluice_tests::sender`]): a request answered 5xx, cut off or not
//! answered in time is sent again with the same `messageId` after a growing delay.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sluice_ingest::event::Table;
use sluice_tests::ingest::{Backend, Destination, Process};
use sluice_tests::postgres::{Cluster, Shutdown};
use sluice_tests::sender::{self, Ledger, Retry, event, start_streams, stop_streams};
use tokio::sync::Semaphore;

/// Where the ingest writes (its default schema).
const SCHEMA: &str = "segment";
/// Requests in flight at most; beyond that the sender waits (it falls behind its rate).
const IN_FLIGHT: usize = 2048;
/// Closed-loop senders of the measurement.
const PROBE_SENDERS: usize = 32;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What happened in one reporting period.
#[derive(Default)]
struct Period {
    events: u64,
    latencies: Vec<Duration>,
    refused: usize,
    dropped: usize,
}

/// The resident set of `pid` (VmRSS), in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn p99(latencies: &mut [Duration]) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort_unstable();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[tokio::main]
async fn main() -> ExitCode {
    let minutes = setting("SOAK_MINUTES", 30);
    let restart_every = Duration::from_secs(setting("SOAK_RESTART_SECONDS", 300));
    let probe = Duration::from_secs(setting("SOAK_PROBE_SECONDS", 20));
    let report_every = Duration::from_secs(setting("SOAK_REPORT_SECONDS", 60));

    let cluster = Arc::new(Cluster::start().await);
    let url = cluster.fresh_database("soak").await;
    let dest = Destination::existing(Backend::Postgres, &url);
    let ingest = Process::spawn(&["--database-url", &url], &[("SLUICE_LOG", "warn")]).await;
    let webhook = ingest.url("/v1/webhook");
    // Long enough to outlast a restart of the database by far.
    let retry = Retry {
        give_up_after: Duration::from_secs(600),
        ..Retry::default()
    };

    // The maximum: closed-loop senders as fast as they are answered.
    let rate = match std::env::var("SOAK_RATE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(rate) => rate,
        None => {
            let started = Instant::now();
            let (stop, streams) = start_streams(&webhook, PROBE_SENDERS, 0, retry);
            tokio::time::sleep(probe).await;
            let measured = stop_streams(stop, streams).await;
            let max = measured.acked.len() as f64 / started.elapsed().as_secs_f64();
            println!("measured maximum: {max:.0} events/s ({PROBE_SENDERS} closed-loop senders)");
            sender::assert_delivered(&dest, SCHEMA, &measured).await;
            dest.execute(SCHEMA, "TRUNCATE segment.track").await;
            ((max / 2.0) as u64).max(1)
        }
    };
    println!(
        "soak: {minutes} min at {rate} events/s, PostgreSQL restarted every {restart_every:?}"
    );
    println!("minute  events/s  p99 ms  ingest RSS MiB  503s  cut off  restarts");

    let period = Arc::new(Mutex::new(Period::default()));
    let total = Arc::new(Mutex::new(Ledger::default()));
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let client = reqwest::Client::new();
    let restarts = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    // The restarts, alternately a planned (fast) and a crash (immediate) shutdown.
    let restarter = tokio::spawn({
        let cluster = cluster.clone();
        let restarts = restarts.clone();
        async move {
            let mut crash = false;
            loop {
                tokio::time::sleep(restart_every).await;
                let mode = if crash {
                    Shutdown::Immediate
                } else {
                    Shutdown::Fast
                };
                cluster.restart(mode).await;
                crash = !crash;
                restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });

    // The reports.
    let reporter = tokio::spawn({
        let period = period.clone();
        let restarts = restarts.clone();
        let pid = ingest.pid();
        async move {
            let mut minute = 0;
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + report_every, report_every);
            loop {
                ticks.tick().await;
                minute += 1;
                let mut done = std::mem::take(&mut *lock(&period));
                println!(
                    "{minute:>6}  {:>8.0}  {:>6.0}  {:>14.1}  {:>4}  {:>7}  {:>8}",
                    done.events as f64 / report_every.as_secs_f64(),
                    p99(&mut done.latencies).as_secs_f64() * 1000.0,
                    rss_mib(pid),
                    done.refused,
                    done.dropped,
                    restarts.load(std::sync::atomic::Ordering::Relaxed),
                );
            }
        }
    });

    // The load: open-loop, in slices of 10 ms.
    let slice = Duration::from_millis(10);
    let mut ticks = tokio::time::interval(slice);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    let mut sent: u64 = 0;
    let started = Instant::now();
    while Instant::now() < deadline {
        ticks.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let id = format!("soak-{sent}");
            sent += 1;
            lock(&total).sent.insert(id.clone());
            let (client, webhook, period, total) = (
                client.clone(),
                webhook.clone(),
                period.clone(),
                total.clone(),
            );
            tokio::spawn(async move {
                let _permit = permit;
                let body = event(&id, 0).to_string();
                let ids = [id];
                let mut ledger = Ledger::default();
                let attempt = Instant::now();
                ledger.deliver(&client, &webhook, &body, &ids, retry).await;
                let latency = attempt.elapsed();
                {
                    let mut period = lock(&period);
                    period.events += 1;
                    period.latencies.push(latency);
                    period.refused += ledger.refused;
                    period.dropped += ledger.dropped;
                }
                let mut total = lock(&total);
                total.acked.extend(ledger.acked);
                total.refused += ledger.refused;
                total.dropped += ledger.dropped;
            });
        }
    }
    // Every request answered (or given up on) before the count.
    let _all = in_flight.acquire_many(IN_FLIGHT as u32).await;
    restarter.abort();
    reporter.abort();

    let total = lock(&total).clone();
    let ids = sender::message_ids(&dest, SCHEMA, Table::Track).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let lost = total
        .acked
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    let duplicated = counts.values().filter(|n| **n > 1).count();
    let unacknowledged = total.sent.len() - total.acked.len();
    println!(
        "end: {} events sent, {} acknowledged, {} rows; lost {lost}, duplicated {duplicated}; \
         {} answers 503, {} requests cut off, {unacknowledged} never acknowledged; {} restarts",
        total.sent.len(),
        total.acked.len(),
        ids.len(),
        total.refused,
        total.dropped,
        restarts.load(std::sync::atomic::Ordering::Relaxed),
    );
    drop(ingest);
    if lost == 0 && duplicated == 0 && unacknowledged == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

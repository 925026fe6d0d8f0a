//! Senders that behave as Segment does when a destination fails: a request answered 5xx, cut
//! off or not answered in time is sent again, with the same `messageId`s, after a growing
//! delay, until it is acknowledged. Each sender keeps a [`Ledger`] of what it sent and what
//! was acknowledged, and [`assert_delivered`] checks both against the rows.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_ingest::event::Table;
use sluice_ingest::schema::qualified;
use tokio::sync::watch;

use crate::ingest::{Backend, Destination};

/// How a sender retries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// The first delay before a retry; it doubles up to `max_delay`.
    pub first_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
    /// How long the sender waits for an answer before it drops the request and retries.
    pub request_timeout: Duration,
    /// How long a sender keeps retrying one request before the test fails.
    pub give_up_after: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// What one sender sent and what came of it.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Every `messageId` sent, acknowledged or not.
    pub sent: HashSet<String>,
    /// The `messageId`s of requests answered 200.
    pub acked: HashSet<String>,
    /// Answers 5xx, with their bodies (the first few).
    pub refusals: Vec<(u16, String)>,
    /// How many answers were 5xx.
    pub refused: usize,
    /// Requests cut off or not answered within the request timeout.
    pub dropped: usize,
    /// The longest time any request took to be answered (200 or not) or dropped.
    pub slowest: Duration,
}

impl Ledger {
    /// All ledgers together.
    pub fn merge(ledgers: &[Ledger]) -> Ledger {
        let mut all = Ledger::default();
        for ledger in ledgers {
            all.sent.extend(ledger.sent.iter().cloned());
            all.acked.extend(ledger.acked.iter().cloned());
            let room = 5usize.saturating_sub(all.refusals.len());
            all.refusals
                .extend(ledger.refusals.iter().take(room).cloned());
            all.refused += ledger.refused;
            all.dropped += ledger.dropped;
            all.slowest = all.slowest.max(ledger.slowest);
        }
        all
    }

    /// Sends `body` (holding the events `ids`) to `url` until it is answered 200, retrying as
    /// Segment does. Panics on a 4xx (the request itself is wrong) or when `retry.give_up_after`
    /// passes.
    pub async fn deliver(
        &mut self,
        client: &reqwest::Client,
        url: &str,
        body: &str,
        ids: &[String],
        retry: Retry,
    ) {
        self.sent.extend(ids.iter().cloned());
        let started = Instant::now();
        let mut delay = retry.first_delay;
        loop {
            let attempt = Instant::now();
            let answer = client
                .post(url)
                .header("content-type", "application/json")
                .timeout(retry.request_timeout)
                .body(body.to_owned())
                .send()
                .await;
            let answer = match answer {
                Ok(response) => {
                    let status = response.status().as_u16();
                    Ok((status, response.text().await.unwrap_or_default()))
                }
                Err(error) => Err(error),
            };
            self.slowest = self.slowest.max(attempt.elapsed());
            let last = match answer {
                Ok((200, _)) => {
                    self.acked.extend(ids.iter().cloned());
                    return;
                }
                Ok((status, text)) if status >= 500 => {
                    self.refused += 1;
                    let last = format!("{status} {text}");
                    if self.refusals.len() < 5 {
                        self.refusals.push((status, text));
                    }
                    last
                }
                Ok((status, text)) => panic!("{url} answered {status}: {text}"),
                // Connection refused or reset, or no answer in time: the outcome is unknown.
                Err(error) => {
                    self.dropped += 1;
                    error.to_string()
                }
            };
            assert!(
                started.elapsed() < retry.give_up_after,
                "{ids:?} not acknowledged within {:?}; last answer: {last}",
                retry.give_up_after
            );
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(retry.max_delay);
        }
    }
}

/// What a streaming sender sends.
#[derive(Debug, Clone)]
pub struct Stream {
    /// The webhook URL.
    pub url: String,
    /// Names the sender's events (`s{sender}-{n}`).
    pub sender: usize,
    /// Events per request (1: a single event; more: a batch).
    pub batch: usize,
    /// Bytes of filler text in each event's properties.
    pub padding: usize,
    /// How it retries.
    pub retry: Retry,
}

/// A track event with this `messageId` and `padding` bytes of filler.
pub fn event(message_id: &str, padding: usize) -> Value {
    json!({
        "type": "track", "messageId": message_id, "userId": "u1", "event": "Order Completed",
        "timestamp": "2024-05-01T10:00:00.000Z",
        "properties": {"revenue": 19.99, "filler": "x".repeat(padding)}
    })
}

impl Stream {
    /// Sends request after request until `stop` turns true, each delivered (retried until
    /// acknowledged) before the next, and returns the ledger.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Ledger {
        let client = reqwest::Client::new();
        let mut ledger = Ledger::default();
        let mut n = 0;
        while !*stop.borrow_and_update() {
            let ids: Vec<String> = (0..self.batch)
                .map(|i| format!("s{}-{}", self.sender, n + i))
                .collect();
            n += self.batch;
            let events: Vec<Value> = ids.iter().map(|id| event(id, self.padding)).collect();
            let body = if self.batch == 1 {
                events[0].to_string()
            } else {
                Value::Array(events).to_string()
            };
            ledger
                .deliver(&client, &self.url, &body, &ids, self.retry)
                .await;
        }
        ledger
    }
}

/// `senders` streams to `url` (batches of 1 to 3 events) that run until the returned switch is
/// set; join the handles for their ledgers.
pub fn start_streams(
    url: &str,
    senders: usize,
    padding: usize,
    retry: Retry,
) -> (watch::Sender<bool>, Vec<tokio::task::JoinHandle<Ledger>>) {
    let (stop, stopped) = watch::channel(false);
    let handles = (0..senders)
        .map(|sender| {
            let stream = Stream {
                url: url.to_owned(),
                sender,
                batch: 1 + sender % 3,
                padding,
                retry,
            };
            tokio::spawn(stream.run(stopped.clone()))
        })
        .collect();
    (stop, handles)
}

/// Stops the streams and waits until each has delivered its last request.
pub async fn stop_streams(
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<Ledger>>,
) -> Ledger {
    let _ = stop.send(true);
    let mut ledgers = Vec::new();
    for handle in handles {
        ledgers.push(handle.await.expect("sender task"));
    }
    Ledger::merge(&ledgers)
}

/// The `message_id` of every row of `table`, duplicates included.
pub async fn message_ids(dest: &Destination, schema: &str, table: Table) -> Vec<String> {
    let sql = format!("SELECT message_id FROM {}", qualified(schema, table.name()));
    let warehouse = dest.warehouse(schema);
    let sql = sqlx::AssertSqlSafe(sql);
    match dest.backend {
        Backend::Postgres => sqlx::query_scalar(sql)
            .fetch_all(warehouse.postgres_pool().expect("postgres"))
            .await
            .expect("read message ids"),
        Backend::Sqlite => sqlx::query_scalar(sql)
            .fetch_all(warehouse.sqlite_pool().expect("sqlite"))
            .await
            .expect("read message ids"),
    }
}

/// Asserts the delivery guarantee on the `track` rows: every event acknowledged is there
/// exactly once, every event sent is there (its sender retried until acknowledged), and
/// nothing else is.
pub async fn assert_delivered(dest: &Destination, schema: &str, ledger: &Ledger) {
    let ids = message_ids(dest, schema, Table::Track).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events stored more than once: {twice:?}");
    let lost: Vec<_> = ledger
        .acked
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged events are missing: {lost:?}",
        lost.len()
    );
    let missing: Vec<_> = ledger
        .sent
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(missing.is_empty(), "sent events are missing: {missing:?}");
    let unknown: Vec<_> = counts
        .keys()
        .filter(|id| !ledger.sent.contains(**id))
        .collect();
    assert!(unknown.is_empty(), "rows nobody sent: {unknown:?}");
    assert_eq!(
        ledger.acked, ledger.sent,
        "every sent event was acknowledged"
    );
}

//! The extraction log: what was refused and why. Every request the service refuses (400, 401,
//! 408, 413, 415, 501) is counted by route and reason in `/metrics` and kept, most recent
//! first, in a bounded in-memory ring readable at `GET /v1/refused` and on the status page.
//!
//! An entry holds what the client was told, never what it sent: no body, no credentials.
//!
//! Counts per minute, route and reason are also added to the schema's `_sdc_refusals` table
//! every [`FLUSH_INTERVAL`] and at shutdown ([`flush`]), by every replica, so that the operator
//! can report the last hour's refusals of an integration without reaching its pods.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::load::{LoadError, Warehouse};

/// How often the counts are added to `_sdc_refusals`.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(10);

/// The most `(minute, route, reason)` counts held while the database cannot take them; past
/// it, new ones are dropped from the table (never from `/metrics`).
pub const MAX_PENDING_COUNTS: usize = 10_000;

/// The default number of refused requests kept (`--refused-log-size`).
pub const DEFAULT_CAPACITY: usize = 200;

/// The longest message kept per entry, in characters; longer ones are cut, so the ring's memory
/// stays bounded whatever a client makes the service say.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// The longest message id kept per entry, in characters.
pub const MAX_MESSAGE_ID_CHARS: usize = 200;

/// Why a request was refused, as a short code for metrics labels and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The body is not JSON (or nests deeper than the limit).
    MalformedJson,
    /// An event failed validation (not an object, missing or unknown `type`, missing
    /// `messageId`, identity or call-specific field).
    InvalidEvent,
    /// Missing or wrong credentials (shared secret, API key, write key).
    Unauthorized,
    /// The body, or one event of it, is larger than the limit.
    TooLarge,
    /// A batch holds more events than the limit.
    TooManyEvents,
    /// The body did not arrive within the body read timeout.
    BodyTimeout,
    /// The body's `Content-Encoding` is not one Sluice decodes.
    UnsupportedEncoding,
    /// A user deletion request, which Sluice carries out only with `--honour-deletes` (and
    /// never on the Tracking API).
    DeleteUnsupported,
}

impl Reason {
    /// The code as it appears in metrics and JSON, e.g. `malformed_json`.
    pub fn code(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::InvalidEvent => "invalid_event",
            Reason::Unauthorized => "unauthorized",
            Reason::TooLarge => "too_large",
            Reason::TooManyEvents => "too_many_events",
            Reason::BodyTimeout => "body_timeout",
            Reason::UnsupportedEncoding => "unsupported_encoding",
            Reason::DeleteUnsupported => "delete_unsupported",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// What a handler knows about a refusal it answers: attached to the answer (as a response
/// extension) and recorded by the router with the route and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: Reason,
    /// The error text the client got.
    pub message: String,
    /// The `messageId` of the event refused, when the refusal is about one event that has one.
    pub message_id: Option<String>,
}

/// One refused request, as the extraction log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedRequest {
    /// When the answer was sent.
    pub time: DateTime<Utc>,
    /// The request's path, e.g. `/v1/webhook`.
    pub route: String,
    /// The HTTP status answered.
    pub status: u16,
    /// Why.
    pub reason: Reason,
    /// The error text the client got (at most [`MAX_MESSAGE_CHARS`] characters).
    pub message: String,
    /// The `messageId` of the event refused, when known (at most [`MAX_MESSAGE_ID_CHARS`]).
    pub message_id: Option<String>,
}

/// How many requests to one route were refused for one reason in one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalCount {
    /// The start of the minute (UTC).
    pub minute: DateTime<Utc>,
    /// The request's path.
    pub route: String,
    /// Why.
    pub reason: Reason,
    /// How many.
    pub count: i64,
}

type CountKey = (i64, String, Reason);

/// The last refused requests, most recent first, at most `capacity` of them, and the counts
/// not yet added to `_sdc_refusals`.
#[derive(Debug)]
pub struct RefusalLog {
    capacity: usize,
    entries: Mutex<VecDeque<RefusedRequest>>,
    pending: Mutex<BTreeMap<CountKey, i64>>,
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new(DEFAULT_CAPACITY)
    }
}

impl RefusalLog {
    /// A log keeping the last `capacity` refusals (0 keeps none).
    pub fn new(capacity: usize) -> RefusalLog {
        RefusalLog {
            capacity,
            entries: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            pending: Mutex::default(),
        }
    }

    /// How many refusals the log keeps at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps `refusal` of a request to `route` answered with `status` at `time`, dropping the
    /// oldest entry when the log is full.
    pub fn record(&self, time: DateTime<Utc>, route: &str, status: u16, refusal: &Refusal) {
        self.add_count(
            (
                time.timestamp().div_euclid(60),
                route.to_owned(),
                refusal.reason,
            ),
            1,
        );
        if self.capacity == 0 {
            return;
        }
        let entry = RefusedRequest {
            time,
            route: route.to_owned(),
            status,
            reason: refusal.reason,
            message: cut(&refusal.message, MAX_MESSAGE_CHARS),
            message_id: refusal
                .message_id
                .as_deref()
                .map(|id| cut(id, MAX_MESSAGE_ID_CHARS)),
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() == self.capacity {
            entries.pop_back();
        }
        entries.push_front(entry);
    }

    fn add_count(&self, key: CountKey, n: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = pending.get_mut(&key) {
            *count += n;
        } else if pending.len() < MAX_PENDING_COUNTS {
            pending.insert(key, n);
        }
    }

    /// Takes the counts not yet added to `_sdc_refusals`.
    pub fn take_counts(&self) -> Vec<RefusalCount> {
        let pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        pending
            .into_iter()
            .map(|((minute, route, reason), count)| RefusalCount {
                minute: DateTime::from_timestamp(minute * 60, 0).unwrap_or_default(),
                route,
                reason,
                count,
            })
            .collect()
    }

    /// Gives back counts that could not be written, to be written with the next ones.
    pub fn restore_counts(&self, counts: Vec<RefusalCount>) {
        for c in counts {
            self.add_count(
                (c.minute.timestamp().div_euclid(60), c.route, c.reason),
                c.count,
            );
        }
    }

    /// The `limit` most recent refusals, most recent first.
    pub fn latest(&self, limit: usize) -> Vec<RefusedRequest> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.iter().take(limit).cloned().collect()
    }
}

/// Adds the counts held by `log` to `_sdc_refusals`; on failure they are kept for the next
/// flush, and the error is returned.
pub async fn flush(log: &RefusalLog, warehouse: &Warehouse) -> Result<(), LoadError> {
    let counts = log.take_counts();
    if counts.is_empty() {
        return Ok(());
    }
    if let Err(error) = warehouse.add_refusals(&counts).await {
        log.restore_counts(counts);
        return Err(error);
    }
    Ok(())
}

/// Flushes `log` every [`FLUSH_INTERVAL`], until dropped (the caller aborts the task and
/// flushes once more at shutdown).
pub async fn flush_every_interval(log: std::sync::Arc<RefusalLog>, warehouse: Warehouse) {
    loop {
        tokio::time::sleep(FLUSH_INTERVAL).await;
        if let Err(error) = flush(&log, &warehouse).await {
            tracing::debug!(%error, "refusal counts not written yet; will retry");
        }
    }
}

/// `text` cut to at most `max` characters, marked with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(n: usize) -> Refusal {
        Refusal {
            reason: Reason::InvalidEvent,
            message: format!("event {n} is missing messageId"),
            message_id: None,
        }
    }

    #[test]
    fn keeps_the_most_recent_first_and_no_more_than_its_capacity() {
        let log = RefusalLog::new(3);
        for n in 0..5 {
            log.record(Utc::now(), "/v1/webhook", 400, &refusal(n));
        }
        let messages: Vec<String> = log.latest(10).into_iter().map(|e| e.message).collect();
        assert_eq!(
            messages,
            [
                "event 4 is missing messageId",
                "event 3 is missing messageId",
                "event 2 is missing messageId"
            ]
        );
        assert_eq!(log.latest(1).len(), 1);
    }

    #[test]
    fn a_log_of_size_zero_keeps_nothing_but_counts() {
        let log = RefusalLog::new(0);
        log.record(Utc::now(), "/v1/webhook", 400, &refusal(1));
        assert!(log.latest(10).is_empty());
        assert_eq!(log.take_counts().len(), 1);
    }

    #[test]
    fn counts_add_up_per_minute_route_and_reason_and_survive_a_failed_write() {
        let log = RefusalLog::new(10);
        let minute = DateTime::from_timestamp(1_700_000_040, 0).expect("a time");
        for second in [0, 5, 59] {
            let at = minute + chrono::Duration::seconds(second);
            log.record(at, "/v1/webhook", 400, &refusal(1));
        }
        log.record(minute, "/v1/track", 400, &refusal(2));
        let counts = log.take_counts();
        assert_eq!(
            counts,
            [
                RefusalCount {
                    minute,
                    route: "/v1/track".to_owned(),
                    reason: Reason::InvalidEvent,
                    count: 1
                },
                RefusalCount {
                    minute,
                    route: "/v1/webhook".to_owned(),
                    reason: Reason::InvalidEvent,
                    count: 3
                },
            ]
        );
        assert!(log.take_counts().is_empty(), "taken once");
        log.restore_counts(counts);
        log.record(minute, "/v1/track", 400, &refusal(3));
        let again = log.take_counts();
        assert_eq!(again[0].count, 2);
        assert_eq!(again[1].count, 3);
    }

    #[test]
    fn long_messages_and_ids_are_cut() {
        let log = RefusalLog::new(1);
        let long = Refusal {
            reason: Reason::MalformedJson,
            message: "é".repeat(MAX_MESSAGE_CHARS + 5),
            message_id: Some("x".repeat(MAX_MESSAGE_ID_CHARS * 2)),
        };
        log.record(Utc::now(), "/v1/track", 400, &long);
        let entry = &log.latest(1)[0];
        assert_eq!(entry.message.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(entry.message.ends_with('…'));
        assert_eq!(
            entry.message_id.as_deref().map(|id| id.chars().count()),
            Some(MAX_MESSAGE_ID_CHARS + 1)
        );
    }

    #[test]
    fn entries_serialize_with_reason_codes() {
        let log = RefusalLog::new(1);
        log.record(
            Utc::now(),
            "/v1/webhook",
            413,
            &Refusal {
                reason: Reason::TooLarge,
                message: "request body is larger than 10 bytes".to_owned(),
                message_id: None,
            },
        );
        let json = serde_json::to_value(log.latest(1)).expect("serializes");
        assert_eq!(json[0]["reason"], "too_large");
        assert_eq!(json[0]["status"], 413);
        assert_eq!(json[0]["route"], "/v1/webhook");
        for reason in [
            Reason::MalformedJson,
            Reason::InvalidEvent,
            Reason::Unauthorized,
            Reason::TooLarge,
            Reason::TooManyEvents,
            Reason::BodyTimeout,
            Reason::UnsupportedEncoding,
            Reason::DeleteUnsupported,
        ] {
            assert_eq!(
                serde_json::to_value(reason).expect("serializes"),
                reason.code()
            );
        }
    }
}

//! Segment's HTTP Tracking API, so that any Segment library (or analytics.js) can send straight
//! to Sluice: `/v1/{track,identify,page,screen,group,alias,batch}` and analytics.js's short forms
//! `/v1/{t,i,p,s,g,a,b}`.
//!
//! What Segment's servers do to an event on the way in, Sluice does here, before the shared
//! validation, normalization and loading of [`super`]:
//! - `receivedAt` is the time the request arrived;
//! - `originalTimestamp` is the client's `timestamp` (or its own `originalTimestamp`), and
//!   `timestamp` is corrected for the client's clock skew: `receivedAt - (sentAt -
//!   originalTimestamp)`;
//! - an event without `messageId` gets one derived from its content, so a client's retry of the
//!   same request is still one row;
//! - a batch's top-level `context` and `integrations` are merged into each item (the item's own
//!   keys win), and so is its `sentAt`.
//!
//! Limits, as Segment documents them: 32 KB per event, 500 KB and 2500 events per batch.

use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sha1::{Digest, Sha1};

use super::{AppState, RequestError, commit, error, prepare, read_body, refuse, unavailable};
use crate::event::Table;
use crate::json;
use crate::normalize::{format_timestamp, parse_timestamp};
use crate::refused::{Reason, Refusal};

/// Largest event, in bytes of JSON.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Largest batch request body, in bytes (after gzip decoding).
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Most events in one batch.
pub const MAX_TRACKING_BATCH_EVENTS: usize = 2500;

/// What a route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// One event of the call its path names.
    Single(Table),
    /// `/v1/batch`.
    Batch,
}

/// The route of `/v1/{call}`: a call type (`track`), its one-letter short form (`t`), or `batch`
/// (`b`), as Segment's HTTP Tracking API documents them.
fn route(call: &str) -> Option<Route> {
    let short = |name: &str| &name[..1] == call;
    if call == "batch" || short("batch") {
        return Some(Route::Batch);
    }
    Table::ALL
        .into_iter()
        .find(|table| table.name() == call || short(table.name()))
        .map(Route::Single)
}

/// Write keys that may send events. With none configured every request is accepted.
#[derive(Clone, Default)]
pub struct WriteKeys(Vec<String>);

impl std::fmt::Debug for WriteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteKeys({} configured)", self.0.len())
    }
}

impl WriteKeys {
    /// The accepted keys; empty strings are ignored.
    pub fn new(keys: &[String]) -> WriteKeys {
        WriteKeys(keys.iter().filter(|k| !k.is_empty()).cloned().collect())
    }

    /// Whether requests are accepted without a write key.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    fn accepts(&self, key: Option<&str>) -> bool {
        self.is_open()
            || key.is_some_and(|key| {
                self.0
                    .iter()
                    .any(|k| super::auth::constant_time_eq(k.as_bytes(), key.as_bytes()))
            })
    }
}

/// A Tracking API request refused: the status to answer, why (for the extraction log) and
/// what was wrong.
#[derive(Debug)]
pub struct Refused(pub StatusCode, pub Reason, pub String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let Refused(status, reason, message) = self;
        refuse(
            status,
            Refusal {
                reason,
                message,
                message_id: None,
            },
        )
    }
}

fn bad(reason: Reason, message: impl Into<String>) -> Refused {
    Refused(StatusCode::BAD_REQUEST, reason, message.into())
}

/// Origins whose browsers may send events (CORS); `*` allows any.
#[derive(Debug, Clone, Default)]
pub struct CorsOrigins(Vec<String>);

impl CorsOrigins {
    /// The allowed origins, e.g. `https://shop.example.com`, or `*`.
    pub fn new(origins: &[String]) -> CorsOrigins {
        CorsOrigins(
            origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
        )
    }

    fn allows(&self, origin: &str) -> bool {
        self.0.iter().any(|o| o == "*" || o == origin)
    }
}

/// Answers CORS preflight requests and marks answers readable by allowed browser origins, so
/// analytics.js on a web page can send to Sluice.
pub(super) async fn cors(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .filter(|o| o.to_str().is_ok_and(|o| state.cors_origins.allows(o)))
        .cloned();
    let preflight = request.method() == axum::http::Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    if let Some(origin) = origin {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if preflight {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                header::HeaderValue::from_static("POST, OPTIONS"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                header::HeaderValue::from_static("Content-Type, Authorization, Content-Encoding"),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                header::HeaderValue::from_static("86400"),
            );
        }
    }
    response
}

/// The handler of every `/v1/{call}` route but the webhook. Takes the whole request, as the
/// webhook does, so that its headers are not cloned.
pub(super) async fn tracking(
    State(state): State<Arc<AppState>>,
    Path(call): Path<String>,
    request: Request,
) -> Response {
    let received_at = Utc::now();
    let (Parts { headers, .. }, body) = request.into_parts();
    let Some(route) = route(&call) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no such route /v1/{call}; see Segment's HTTP Tracking API"),
        );
    };
    let events = match decode(&state, &headers, body, route).await {
        Ok(events) => events,
        Err(response) => return response,
    };
    let enriched = events
        .into_iter()
        .map(|event| {
            // The event as enriched is what `_sdc_rejected` keeps, should the database refuse it.
            let event = Value::Object(enrich(event, received_at));
            let raw = Bytes::from(json::to_json_text(&event));
            (event, raw)
        })
        .collect();
    let (records, skipped) = match prepare(enriched, &state, route == Route::Batch) {
        // The Tracking API has no deletion call: deletion requests come by /v1/webhook.
        Ok((_, _, deletions)) if !deletions.is_empty() => {
            return RequestError::Delete.into_response();
        }
        Ok((records, skipped, _)) => (records, skipped),
        Err(refusal) => return refusal.into_response(),
    };
    match commit(&state, records, skipped, received_at).await {
        Ok(_) => (StatusCode::OK, axum::Json(json!({ "success": true }))).into_response(),
        Err(e) => unavailable(e),
    }
}

/// Reads, decompresses, parses, authenticates and splits a request into its events (with the
/// batch's shared fields merged in). Nothing here touches the database.
async fn decode(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    route: Route,
) -> Result<Vec<Map<String, Value>>, Response> {
    let body = read_body(state, body)
        .await
        .map_err(IntoResponse::into_response)?;
    parse(state, headers, body, route).map_err(IntoResponse::into_response)
}

fn parse(
    state: &AppState,
    headers: &HeaderMap,
    body: Bytes,
    route: Route,
) -> Result<Vec<Map<String, Value>>, Refused> {
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let mut object = decode_object(encoding, body, route == Route::Batch)?;
    let key = basic_user(headers).or_else(|| {
        object
            .get("writeKey")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    if !state.write_keys.accepts(key.as_deref()) {
        return Err(Refused(
            StatusCode::UNAUTHORIZED,
            Reason::Unauthorized,
            "missing or unknown write key: send it as the Basic user name or as \"writeKey\""
                .to_owned(),
        ));
    }
    object.remove("writeKey");
    match route {
        Route::Single(table) => {
            object
                .entry("type")
                .or_insert_with(|| Value::String(table.name().to_owned()));
            Ok(vec![object])
        }
        Route::Batch => split_batch(object),
    }
}

/// Decodes a Tracking API body: gzip if `content_encoding` says so, Segment's size limit (32 KB
/// for one event, 500 KB for a `batch` body, after decoding), then JSON ([`json::repair`]). The
/// answer is the body's object; anything else is a 400 (415 for an unknown encoding).
pub fn decode_object(
    content_encoding: Option<&str>,
    body: Bytes,
    batch: bool,
) -> Result<Map<String, Value>, Refused> {
    let limit = if batch {
        MAX_BATCH_BYTES
    } else {
        MAX_EVENT_BYTES
    };
    let body = decompress(content_encoding, body, limit)?;
    if body.len() > limit {
        let what = if batch { "batch" } else { "event" };
        return Err(bad(
            Reason::TooLarge,
            format!(
                "{what} is larger than the limit of {} ({} bytes)",
                kib(limit),
                body.len()
            ),
        ));
    }
    let malformed = |e: json::JsonError| bad(Reason::MalformedJson, format!("malformed JSON: {e}"));
    let repaired = json::repair(&body).map_err(malformed)?;
    match json::parse(&repaired).map_err(malformed)? {
        Value::Object(object) => Ok(object),
        _ => Err(bad(Reason::InvalidEvent, "the body must be a JSON object")),
    }
}

/// A byte limit as Segment's documentation writes it (`32 KB`: 1 KB = 1024 bytes).
fn kib(bytes: usize) -> String {
    format!("{} KB", bytes / 1024)
}

/// The events of a `/v1/batch` body: its `batch` array (at most [`MAX_TRACKING_BATCH_EVENTS`]
/// events of at most [`MAX_EVENT_BYTES`] each),
/// each with the batch's `context` and `integrations` merged under its own and the batch's
/// `sentAt` unless it has one.
pub fn split_batch(mut object: Map<String, Value>) -> Result<Vec<Map<String, Value>>, Refused> {
    let items = match object.remove("batch") {
        Some(Value::Array(items)) => items,
        _ => {
            return Err(bad(
                Reason::InvalidEvent,
                "missing \"batch\": a batch request holds an array of events",
            ));
        }
    };
    if items.len() > MAX_TRACKING_BATCH_EVENTS {
        return Err(bad(
            Reason::TooManyEvents,
            format!(
                "batch has {} events, more than the limit of {MAX_TRACKING_BATCH_EVENTS}",
                items.len()
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let Value::Object(mut item) = item else {
                return Err(bad(
                    Reason::InvalidEvent,
                    format!("event {index}: must be a JSON object"),
                ));
            };
            let size = json_len(&item);
            if size > MAX_EVENT_BYTES {
                return Err(bad(
                    Reason::TooLarge,
                    format!(
                        "event {index}: larger than the limit of {} ({size} bytes)",
                        kib(MAX_EVENT_BYTES)
                    ),
                ));
            }
            item.remove("writeKey");
            for shared in ["context", "integrations"] {
                if let Some(Value::Object(top)) = object.get(shared) {
                    merge_under(&mut item, shared, top);
                }
            }
            if let Some(sent_at) = object.get("sentAt") {
                item.entry("sentAt").or_insert_with(|| sent_at.clone());
            }
            Ok(item)
        })
        .collect()
}

/// The length of an object's JSON text, without building the text.
fn json_len(object: &Map<String, Value>) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, object);
    count.0
}

/// Puts the keys of `top` into `item[field]` where the item has none of its own.
fn merge_under(item: &mut Map<String, Value>, field: &str, top: &Map<String, Value>) {
    let entry = item
        .entry(field)
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(own) = entry {
        for (key, value) in top {
            own.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
}

fn decompress(encoding: Option<&str>, body: Bytes, limit: usize) -> Result<Bytes, Refused> {
    let encoding = encoding.map(|v| v.trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("identity") => Ok(body),
        Some("gzip") => {
            let mut out = Vec::new();
            // One byte past the limit is enough to say the body is too large.
            flate2::read::GzDecoder::new(&body[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| {
                    bad(
                        Reason::MalformedJson,
                        format!("cannot decode the gzip body: {e}"),
                    )
                })?;
            Ok(Bytes::from(out))
        }
        Some(other) => Err(Refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::UnsupportedEncoding,
            format!("unsupported Content-Encoding {other:?}: send gzip or none"),
        )),
    }
}

fn basic_user(headers: &HeaderMap) -> Option<String> {
    super::auth::basic_user(headers).filter(|user| !user.is_empty())
}

/// Sets what Segment's servers set: `receivedAt`, `originalTimestamp`, a skew-corrected
/// `timestamp`, and a `messageId` derived from the content when the client sent none.
///
/// A client time Sluice cannot read (an epoch number, `2026-02-30`, a year past 9999) is left
/// exactly as sent, so it lands in a split column (`timestamp__bi`, `timestamp__st`, ...), and
/// no `timestamp` is made up: the row's `timestamp` is NULL and `received_at` tells when it
/// arrived. A `sentAt` Sluice cannot read skips the skew correction: `timestamp` is then the
/// client's time.
pub fn enrich(mut event: Map<String, Value>, received_at: DateTime<Utc>) -> Map<String, Value> {
    if !event.contains_key("messageId") {
        let id = content_id(&event);
        event.insert("messageId".to_owned(), Value::String(id));
    }
    let time = |event: &Map<String, Value>, key: &str| {
        event
            .get(key)
            .and_then(Value::as_str)
            .and_then(parse_timestamp)
    };
    let unreadable = ["originalTimestamp", "timestamp"]
        .iter()
        .any(|key| event.get(*key).is_some_and(|v| !v.is_null()) && time(&event, key).is_none());
    if !unreadable {
        let original = time(&event, "originalTimestamp").or_else(|| time(&event, "timestamp"));
        let timestamp = corrected_timestamp(received_at, time(&event, "sentAt"), original);
        if let Some(original) = original {
            event.insert(
                "originalTimestamp".to_owned(),
                Value::String(format_timestamp(&original)),
            );
        }
        event.insert(
            "timestamp".to_owned(),
            Value::String(format_timestamp(&timestamp)),
        );
    }
    event.insert(
        "receivedAt".to_owned(),
        Value::String(format_timestamp(&received_at)),
    );
    event
}

/// Segment's clock-skew correction: `receivedAt - (sentAt - originalTimestamp)`. Without
/// `sentAt` the client's time is kept; without any client time, the arrival time is used.
pub fn corrected_timestamp(
    received_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
    original: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    match (sent_at, original) {
        (Some(sent_at), Some(original)) => received_at - (sent_at - original),
        (None, Some(original)) => original,
        (_, None) => received_at,
    }
}

/// A `messageId` for an event that has none: a hash of its content (keys in order, as
/// `serde_json` keeps them sorted), so the same request retried maps to the same row.
fn content_id(event: &Map<String, Value>) -> String {
    let canonical = Value::Object(event.clone()).to_string();
    format!(
        "sluice-{}",
        hex::encode(&Sha1::digest(canonical.as_bytes())[..16])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_timestamp(text).expect("timestamp")
    }

    #[test]
    fn every_route_and_short_form_is_known() {
        for (long, short) in [
            ("track", "t"),
            ("identify", "i"),
            ("page", "p"),
            ("screen", "s"),
            ("group", "g"),
            ("alias", "a"),
            ("batch", "b"),
        ] {
            assert_eq!(route(long), route(short));
            assert!(route(long).is_some());
        }
        assert_eq!(route("track"), Some(Route::Single(Table::Track)));
        for unknown in ["webhooks", "x", "", "tr"] {
            assert_eq!(route(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn clock_skew_is_corrected_as_segment_does() {
        // The client's clock is 1 hour 10 s fast: it stamped the call at 11:00:00 and sent it
        // at 11:00:05 (its time); the server received it at 10:00:00 (true time). The event
        // happened 5 s before it was sent, so at 09:59:55 true time.
        let received = at("2024-05-01T10:00:00.000Z");
        let corrected = corrected_timestamp(
            received,
            Some(at("2024-05-01T11:00:05.000Z")),
            Some(at("2024-05-01T11:00:00.000Z")),
        );
        assert_eq!(corrected, at("2024-05-01T09:59:55.000Z"));
        assert_eq!(
            corrected_timestamp(received, None, Some(at("2024-05-01T08:00:00Z"))),
            at("2024-05-01T08:00:00Z")
        );
        assert_eq!(corrected_timestamp(received, None, None), received);
    }

    #[test]
    fn enrich_sets_server_fields_and_keeps_client_time() {
        let event = serde_json::from_value(json!({
            "type": "track", "event": "E", "userId": "u",
            "timestamp": "2024-05-01T11:00:00Z", "sentAt": "2024-05-01T11:00:05Z"
        }))
        .expect("object");
        let received = at("2024-05-01T10:00:00Z");
        let enriched = enrich(event, received);
        assert_eq!(enriched["receivedAt"], "2024-05-01T10:00:00.000000Z");
        assert_eq!(enriched["originalTimestamp"], "2024-05-01T11:00:00.000000Z");
        assert_eq!(enriched["timestamp"], "2024-05-01T09:59:55.000000Z");
        assert!(
            enriched["messageId"]
                .as_str()
                .expect("id")
                .starts_with("sluice-")
        );
    }

    #[test]
    fn unreadable_client_times_are_left_as_sent() {
        let received = at("2024-05-01T10:00:00Z");
        for raw in [
            json!(1796032800000i64),
            json!("2026-02-30T00:00:00Z"),
            json!(true),
        ] {
            let event = serde_json::from_value(json!({
                "type": "track", "event": "E", "userId": "u", "timestamp": raw, "sentAt": 1796032802000i64
            }))
            .expect("object");
            let enriched = enrich(event, received);
            assert_eq!(enriched["timestamp"], raw);
            assert!(!enriched.contains_key("originalTimestamp"));
            assert_eq!(enriched["sentAt"], 1796032802000i64);
            assert_eq!(enriched["receivedAt"], "2024-05-01T10:00:00.000000Z");
        }
    }

    #[test]
    fn derived_message_ids_follow_content() {
        let a: Map<String, Value> =
            serde_json::from_value(json!({"type": "track", "event": "E", "userId": "u"}))
                .expect("object");
        let mut b = a.clone();
        assert_eq!(content_id(&a), content_id(&b));
        b.insert("event".into(), json!("F"));
        assert_ne!(content_id(&a), content_id(&b));
    }

    #[test]
    fn batch_context_merges_under_items() {
        let object = serde_json::from_value(json!({
            "batch": [
                {"type": "track", "event": "E", "userId": "u", "context": {"ip": "1.1.1.1"}},
                {"type": "identify", "userId": "u"}
            ],
            "context": {"ip": "9.9.9.9", "library": {"name": "x"}},
            "integrations": {"All": false},
            "sentAt": "2024-05-01T11:00:05Z"
        }))
        .expect("object");
        let items = split_batch(object).expect("valid batch");
        assert_eq!(
            items[0]["context"],
            json!({"ip": "1.1.1.1", "library": {"name": "x"}})
        );
        assert_eq!(
            items[1]["context"],
            json!({"ip": "9.9.9.9", "library": {"name": "x"}})
        );
        assert_eq!(items[1]["integrations"], json!({"All": false}));
        assert_eq!(items[1]["sentAt"], "2024-05-01T11:00:05Z");
    }

    #[test]
    fn batch_limits_name_the_limit() {
        let many = json!({"batch": vec![json!({"type": "track"}); MAX_TRACKING_BATCH_EVENTS + 1]});
        let Err(Refused(status, _, message)) =
            split_batch(serde_json::from_value(many).expect("object"))
        else {
            panic!("refused")
        };
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.contains("2500"), "{message}");
        let big = json!({"batch": [{"type": "track", "x": "y".repeat(MAX_EVENT_BYTES)}]});
        let Err(Refused(_, _, message)) = split_batch(serde_json::from_value(big).expect("object"))
        else {
            panic!("refused")
        };
        assert!(message.contains("32 KB"), "{message}");
    }
}

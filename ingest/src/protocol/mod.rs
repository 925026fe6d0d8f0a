//! The HTTP face of the ingest service: routes, authentication and answers.
//!
//! | route | what |
//! |---|---|
//! | `POST`/`PUT`/`PATCH /v1/webhook` | one Segment event (object) or a batch (array, up to 4000) |
//! | `GET /` | the status page: tables, activity, refusals, rejected records, configuration |
//! | `GET /v1/refused` | the last refused requests, most recent first (JSON) |
//! | `GET /healthz` | the process is alive |
//! | `GET /readyz` | the database answers and the schema's tables exist |
//! | `GET /metrics` | Prometheus text |
//!
//! The server answers from the start; until the schema is prepared ([`crate::startup`]),
//! `/readyz` and the event routes answer 503 with `Retry-After` and the reason.
//!
//! Answers: 200 only after the events are committed; 400 with `{"error": ...}` for bad input;
//! 401 for wrong credentials; 408 for a body not sent within the body read timeout; 413 for a
//! body over the limit; 501 for a user deletion request unless deletions are honoured
//! (`--honour-deletes`); 503 with `Retry-After` when the
//! database is unavailable, does not commit within the commit timeout, or the queue is full.

mod auth;
mod serve;
mod status;
mod tracking;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on};
use chrono::Utc;
use serde_json::{Value, json};

pub use auth::{Auth, Unauthorized, sign};
pub use serve::{ConnectionLimits, serve};
pub use tracking::{
    CorsOrigins, Refused, WriteKeys, corrected_timestamp, decode_object, enrich, split_batch,
};

use crate::event::{Call, InvalidEvent, Table, id_text, json_kind, validate};
use crate::json;
use crate::load::{Deletion, DeletionRequest, LoadError, Loader, Outcome, RETRY_AFTER, Warehouse};
use crate::metrics::Metrics;
use crate::normalize::{Record, normalize_selected};
use crate::refused::{Reason, Refusal, RefusalLog};
use crate::selection::Selection;
use crate::startup::Readiness;

/// The most events one webhook request may carry (Segment's Webhooks (Actions) batch size).
pub const MAX_WEBHOOK_EVENTS: usize = 4000;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Queues records for the batcher.
    pub loader: Loader,
    /// The destination, for readiness checks.
    pub warehouse: Warehouse,
    /// Webhook credentials.
    pub auth: Auth,
    /// Tracking API write keys.
    pub write_keys: WriteKeys,
    /// Browser origins allowed to send to the Tracking API.
    pub cors_origins: CorsOrigins,
    /// The tables selected for loading; events of other types are acknowledged and skipped.
    pub tables: Vec<Table>,
    /// The column selection: which key paths load, and how.
    pub selection: Arc<Selection>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Longest a client may take to send a body once its headers are read; then 408.
    pub body_read_timeout: Duration,
    /// Longest a request waits for its events' commit; then 503 (the events may still commit
    /// later, unacknowledged: the sender's retry is an upsert).
    pub commit_timeout: Duration,
    /// Whether the schema is prepared; events wait for it.
    pub readiness: Readiness,
    /// The last refused requests, for `GET /v1/refused` and the status page.
    pub refusals: Arc<RefusalLog>,
    /// Whether `delete` events on `/v1/webhook` delete the user's rows (`--honour-deletes`);
    /// when not, they are refused with 501.
    pub honour_deletes: bool,
    /// The configuration in force as the status page shows it, secrets masked
    /// ([`crate::Config::shown`]).
    pub settings: Arc<Vec<(&'static str, String)>>,
}

/// The router of the ingest service.
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route(
            "/v1/webhook",
            on(
                axum::routing::MethodFilter::POST
                    .or(axum::routing::MethodFilter::PUT)
                    .or(axum::routing::MethodFilter::PATCH),
                webhook,
            ),
        )
        .route("/v1/{call}", axum::routing::post(tracking::tracking))
        // Only the event routes above wait for the schema; the probes and metrics below do not.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_prepared,
        ))
        .route("/", get(status::page))
        .route("/v1/refused", get(refused))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route; events go to POST /v1/webhook",
            )
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            tracking::cors,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count_status))
        .with_state(state)
}

/// Answers 503 with `Retry-After` and the reason while the schema is not prepared yet.
async fn require_prepared(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    match state.readiness.waiting_for() {
        Some(reason) => unavailable(format!("not ready to load events yet: {reason}")),
        None => next.run(request).await,
    }
}

/// Counts every answer by status, and every refusal by route and reason, keeping the
/// refusal in the extraction log ([`crate::refused`]).
async fn count_status(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    // A clone of the URI shares its text (no copy); it is decoded only for a refusal.
    let uri = request.uri().clone();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state.metrics.request(status);
    if let Some(refusal) = response.extensions().get::<Refusal>() {
        // Refusals come only from the routes above, so decoded paths are a small, fixed set of
        // labels however a client spells them.
        let route = percent_encoding::percent_decode_str(uri.path()).decode_utf8_lossy();
        state.metrics.refused(&route, refusal.reason);
        state.refusals.record(Utc::now(), &route, status, refusal);
    }
    response
}

/// An error answer: the status and `{"error": message}`.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": message.to_string() }))).into_response()
}

/// A refusal: the status and `{"error": message}`, with the [`Refusal`] attached for the
/// extraction log.
fn refuse(status: StatusCode, refusal: Refusal) -> Response {
    let mut response = error(status, &refusal.message);
    response.extensions_mut().insert(refusal);
    response
}

/// A 401 for a request without acceptable credentials.
fn refuse_unauthorized(unauthorized: Unauthorized) -> Response {
    refuse(
        StatusCode::UNAUTHORIZED,
        Refusal {
            reason: Reason::Unauthorized,
            message: unauthorized.to_string(),
            message_id: None,
        },
    )
}

/// A 503 asking the sender to retry: Segment retries for hours, so nothing is lost.
fn unavailable(message: impl std::fmt::Display) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(RETRY_AFTER.as_secs()),
    );
    response
}

/// A request the service refuses, as an answer.
#[derive(Debug)]
enum RequestError {
    TooLarge(usize),
    SlowBody(Duration),
    Malformed(String),
    Invalid {
        index: Option<usize>,
        message_id: Option<String>,
        problem: InvalidEvent,
    },
    TooMany(usize),
    Delete,
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let refusal = |reason, message: String| Refusal {
            reason,
            message,
            message_id: None,
        };
        match self {
            RequestError::TooLarge(limit) => refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                refusal(
                    Reason::TooLarge,
                    format!("request body is larger than {limit} bytes"),
                ),
            ),
            RequestError::SlowBody(limit) => {
                let mut response = refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    refusal(
                        Reason::BodyTimeout,
                        format!(
                            "the request body did not arrive within {} ms",
                            limit.as_millis()
                        ),
                    ),
                );
                // The rest of the body may still be on its way: the connection cannot carry
                // another request.
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            RequestError::Malformed(reason) => refuse(
                StatusCode::BAD_REQUEST,
                refusal(Reason::MalformedJson, format!("malformed JSON: {reason}")),
            ),
            RequestError::Invalid {
                index,
                message_id,
                problem,
            } => {
                let message = match index {
                    Some(index) => format!("event {index}: {problem}"),
                    None => problem.to_string(),
                };
                let mut body = json!({ "error": message });
                if let Some(index) = index {
                    body["index"] = json!(index);
                }
                let mut response = (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
                response.extensions_mut().insert(Refusal {
                    reason: Reason::InvalidEvent,
                    message,
                    message_id,
                });
                response
            }
            RequestError::TooMany(n) => refuse(
                StatusCode::BAD_REQUEST,
                refusal(
                    Reason::TooManyEvents,
                    format!("a batch holds at most {MAX_WEBHOOK_EVENTS} events, this one has {n}"),
                ),
            ),
            RequestError::Delete => refuse(
                StatusCode::NOT_IMPLEMENTED,
                refusal(
                    Reason::DeleteUnsupported,
                    "user deletion requests (type \"delete\") are not supported by Sluice \
                     unless it runs with --honour-deletes (on /v1/webhook); delete the user's \
                     rows with SQL or `sluice-ingest erase --user-id ID`"
                        .to_owned(),
                ),
            ),
        }
    }
}

/// Reads a body up to the size limit, within the body read timeout, so that a client sending
/// slowly cannot hold a connection and its memory for long.
async fn read_body(state: &AppState, body: Body) -> Result<Bytes, RequestError> {
    let limit = state.max_body_bytes;
    match tokio::time::timeout(state.body_read_timeout, axum::body::to_bytes(body, limit)).await {
        Ok(read) => read.map_err(|_| RequestError::TooLarge(limit)),
        Err(_) => Err(RequestError::SlowBody(state.body_read_timeout)),
    }
}

/// Splits a body into its events: one object, or the elements of an array, each with the exact
/// bytes it came from (after [`json::repair`]).
fn parse_events(body: &Bytes) -> Result<Vec<(Value, Bytes)>, RequestError> {
    let malformed = |e: json::JsonError| RequestError::Malformed(e.to_string());
    let body = match json::repair(body).map_err(malformed)? {
        std::borrow::Cow::Borrowed(_) => body.clone(),
        std::borrow::Cow::Owned(repaired) => Bytes::from(repaired),
    };
    if body.trim_ascii_start().starts_with(b"[") {
        let elements: Vec<&serde_json::value::RawValue> = json::parse(&body).map_err(malformed)?;
        if elements.len() > MAX_WEBHOOK_EVENTS {
            return Err(RequestError::TooMany(elements.len()));
        }
        elements
            .into_iter()
            .map(|raw| {
                let value = json::parse(raw.get().as_bytes()).map_err(malformed)?;
                Ok((value, body.slice_ref(raw.get().as_bytes())))
            })
            .collect()
    } else {
        let value: Value = json::parse(&body).map_err(malformed)?;
        if !value.is_object() {
            return Err(RequestError::Invalid {
                index: None,
                message_id: None,
                problem: InvalidEvent::NotAnObject(json_kind(&value)),
            });
        }
        Ok(vec![(value, body)])
    }
}

/// Records ready to submit, each with the bytes it came from, the tables of skipped events, and
/// the user deletion requests (only when deletions are honoured).
type Prepared = (Vec<(Record, Bytes)>, Vec<Table>, Vec<DeletionRequest>);

/// Validates and normalizes events under the column selection (counting excluded values); returns
/// the records of selected tables, how many valid events were skipped because their table is
/// not selected, and the deletion requests. One bad event refuses the request; so does a
/// `delete` event when deletions are not honoured.
fn prepare(
    events: Vec<(Value, Bytes)>,
    state: &AppState,
    batch: bool,
) -> Result<Prepared, RequestError> {
    let tables = &state.tables;
    let mut records = Vec::with_capacity(events.len());
    let mut skipped = Vec::new();
    let mut deletions = Vec::new();
    for (index, (value, raw)) in events.into_iter().enumerate() {
        let envelope = validate(&value).map_err(|problem| RequestError::Invalid {
            index: batch.then_some(index),
            message_id: value
                .get("messageId")
                .and_then(id_text)
                .map(|id| id.into_owned()),
            problem,
        })?;
        let table =
            match envelope.call {
                Call::Delete if !state.honour_deletes => return Err(RequestError::Delete),
                Call::Delete => {
                    let user_id = value.get("userId").and_then(id_text).ok_or_else(|| {
                        RequestError::Invalid {
                            index: batch.then_some(index),
                            message_id: Some(envelope.message_id.clone()),
                            problem: InvalidEvent::MissingField("userId", "delete"),
                        }
                    })?;
                    deletions.push(DeletionRequest {
                        message_id: envelope.message_id,
                        user_id: user_id.into_owned(),
                    });
                    continue;
                }
                Call::Load(table) => table,
            };
        if !tables.contains(&table) {
            skipped.push(table);
            continue;
        }
        if let Value::Object(object) = value {
            let selection = state.selection.table(table);
            let (record, excluded) = normalize_selected(table, &envelope, object, selection);
            if excluded > 0 {
                state.metrics.excluded(table, excluded);
            }
            records.push((record, raw));
        }
    }
    Ok((records, skipped, deletions))
}

/// Takes the whole request, not `HeaderMap` and `Body`: axum's `HeaderMap` extractor clones
/// the headers (2% of the ingest's CPU on single events, with the drop of the copy).
async fn webhook(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let received_at = Utc::now();
    let (Parts { headers, .. }, body) = request.into_parts();
    let body = match read_body(&state, body).await {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    if let Err(unauthorized) = state.auth.check(&headers, &body) {
        return refuse_unauthorized(unauthorized);
    }
    let batch = body.trim_ascii_start().starts_with(b"[");
    let prepared = parse_events(&body).and_then(|events| prepare(events, &state, batch));
    let (records, skipped, deletions) = match prepared {
        Ok(prepared) => prepared,
        Err(refusal) => return refusal.into_response(),
    };
    let committed = match commit(&state, records, skipped, received_at).await {
        Ok(committed) => committed,
        Err(e) => return unavailable(e),
    };
    // Deletions run after the request's other events have committed, each in a transaction
    // of its own, so a delete in a batch with events of the same user always finds them.
    let mut deleted = Vec::with_capacity(deletions.len());
    for request in &deletions {
        // Boxed: a deletion's future is some 15 KB, which every request's future would
        // otherwise carry (and axum would copy into its box), deletion or not.
        match Box::pin(delete_user(&state, request)).await {
            Ok(deletion) => deleted.push(deletion),
            Err(e) => return unavailable(e),
        }
    }
    let mut body = json!({
        "ok": true,
        "loaded": committed.outcome.loaded,
        "rejected": committed.outcome.rejected,
        "skipped": committed.skipped,
    });
    if !deleted.is_empty() {
        body["deleted"] = json!(deleted);
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Carries out one user deletion request within the commit timeout.
async fn delete_user(state: &AppState, request: &DeletionRequest) -> Result<Deletion, LoadError> {
    match tokio::time::timeout(state.commit_timeout, state.warehouse.delete_user(request)).await {
        Ok(deletion) => {
            let deletion = deletion?;
            tracing::info!(
                message_id = %deletion.message_id,
                rows = deletion.deleted.values().sum::<i64>(),
                already_done = deletion.already_done,
                "user deletion request carried out"
            );
            Ok(deletion)
        }
        Err(_) => Err(LoadError::Unavailable(format!(
            "the deletion was not committed within {} ms",
            state.commit_timeout.as_millis()
        ))),
    }
}

/// What a request's events came to: loaded and rejected records, and events skipped because
/// their table is not selected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Committed {
    outcome: Outcome,
    skipped: usize,
}

/// Submits records and returns once they are committed, with what became of them.
async fn commit(
    state: &AppState,
    records: Vec<(Record, Bytes)>,
    skipped: Vec<Table>,
    received_at: chrono::DateTime<Utc>,
) -> Result<Committed, LoadError> {
    let mut outcome = Outcome::default();
    if !records.is_empty() {
        let answer = state.loader.submit(records, received_at)?;
        outcome = match tokio::time::timeout(state.commit_timeout, answer).await {
            Ok(answer) => answer.unwrap_or(Err(LoadError::ShuttingDown))?,
            Err(_) => {
                return Err(LoadError::Unavailable(format!(
                    "the events were not committed within {} ms",
                    state.commit_timeout.as_millis()
                )));
            }
        };
    }
    for table in &skipped {
        state.metrics.skipped(*table, 1);
    }
    Ok(Committed {
        outcome,
        skipped: skipped.len(),
    })
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if let Some(reason) = state.readiness.waiting_for() {
        return unavailable(reason);
    }
    let check = tokio::time::timeout(Duration::from_secs(3), state.warehouse.ready(&state.tables));
    match check.await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable("the database did not answer within 3 s"),
    }
}

/// `GET /v1/refused`: the extraction log, most recent first, behind the webhook's credentials
/// (the API key as the Basic user name, or `X-Signature` of the empty body).
async fn refused(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(unauthorized) = state.auth.check(&headers, b"") {
        return refuse_unauthorized(unauthorized);
    }
    let entries = state.refusals.latest(state.refusals.capacity());
    (StatusCode::OK, axum::Json(entries)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    crate::metrics::exposition(state.metrics.render())
}

//! `GET /`: the status page ([`crate::status_page`]), gathered from memory (activity, refused
//! requests, configuration) and the database (column counts, `_sdc_rejected`). It answers even
//! when the database does not: the page then says why those parts are missing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;

use super::{AppState, refuse_unauthorized};
use crate::status_page::{StatusView, TableStatus, render};

/// Refused requests and rejected records shown, most recent first.
const LATEST: usize = 20;

/// How long the page waits for the database before it renders without it.
const DATABASE_WAIT: Duration = Duration::from_secs(3);

/// The status page, behind the webhook's credentials when some are configured: a browser asks
/// for them (Basic, the API key as user name).
pub(super) async fn page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(unauthorized) = state.auth.check(&headers, b"") {
        let mut response = refuse_unauthorized(unauthorized);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Basic realm="sluice-ingest", charset="UTF-8""#),
        );
        return response;
    }
    let now = Utc::now();
    let from_database = tokio::time::timeout(DATABASE_WAIT, async {
        let columns = state.warehouse.table_report().await?;
        let rejected = state.warehouse.latest_rejected(LATEST as u32).await?;
        Ok::<_, crate::load::LoadError>((columns, rejected))
    })
    .await;
    let (columns, rejected, database_error) = match from_database {
        Ok(Ok((columns, rejected))) => (columns, rejected, None),
        Ok(Err(error)) => (Vec::new(), Vec::new(), Some(error.to_string())),
        Err(_) => (
            Vec::new(),
            Vec::new(),
            Some(format!(
                "the database did not answer within {} s",
                DATABASE_WAIT.as_secs()
            )),
        ),
    };
    let activity = state.metrics.activity().summary(now);
    let tables = state
        .tables
        .iter()
        .map(|table| {
            let count = columns.iter().find(|(t, _)| t == table).map(|(_, n)| *n);
            match activity.iter().find(|a| a.table == *table) {
                Some(summary) => TableStatus {
                    activity: summary.clone(),
                    columns: count,
                },
                None => TableStatus::idle(*table, count),
            }
        })
        .collect();
    let view = StatusView {
        now,
        waiting_for: state.readiness.waiting_for(),
        tables,
        database_error,
        refused: state.refusals.latest(LATEST),
        rejected,
        settings: state.settings.as_ref().clone(),
    };
    let mut response = Html(render(&view)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

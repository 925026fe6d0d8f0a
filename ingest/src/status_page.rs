//! The status page (`GET /`): a read-only HTML page, rendered here from a [`StatusView`] with
//! maud, which escapes every value it interpolates (table names, messages, message ids and
//! reasons may hold whatever a client sent). No script, no external asset: inline CSS, and one
//! inline SVG chart per table of the rows loaded each minute of the last hour.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use crate::activity::{MINUTES, Minute, TableSummary};
use crate::event::Table;
use crate::load::RejectedRow;
use crate::refused::RefusedRequest;

/// Everything the page shows, gathered by the handler.
#[derive(Debug, Clone)]
pub struct StatusView {
    /// When the page was rendered.
    pub now: DateTime<Utc>,
    /// Why events cannot be loaded yet (the schema is being prepared, say), or `None`.
    pub waiting_for: Option<String>,
    /// The selected tables, in order.
    pub tables: Vec<TableStatus>,
    /// Why the database could not be read for this page (columns, rejected records), if so.
    pub database_error: Option<String>,
    /// The latest refused requests, most recent first.
    pub refused: Vec<RefusedRequest>,
    /// The latest rows of `_sdc_rejected`, most recent first.
    pub rejected: Vec<RejectedRow>,
    /// The configuration in force, secrets masked: name and value.
    pub settings: Vec<(&'static str, String)>,
}

/// One table's line on the page.
#[derive(Debug, Clone)]
pub struct TableStatus {
    /// Loading activity since the process started.
    pub activity: TableSummary,
    /// Columns the table has, when the catalog could be read.
    pub columns: Option<usize>,
}

impl TableStatus {
    /// A table with no activity yet.
    pub fn idle(table: Table, columns: Option<usize>) -> TableStatus {
        TableStatus {
            activity: TableSummary {
                table,
                loaded: 0,
                rejected: 0,
                last_load: None,
                minutes: vec![Minute::default(); MINUTES],
            },
            columns,
        }
    }
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f5f7fa}
header{background:#16324f;color:#fff;padding:14px 24px}
header h1{font-size:20px;margin:0}
header p{margin:2px 0 0;opacity:.8}
main{padding:8px 24px 24px;max-width:1150px}
section{background:#fff;border:1px solid #dde3ea;border-radius:6px;padding:4px 16px 12px;margin-top:16px}
h2{font-size:16px;margin:10px 0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #edf0f4;vertical-align:middle}
th{font-weight:600;color:#4a5666;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f0f3f7;padding:1px 4px;border-radius:3px;word-break:break-all}
.banner{background:#fff4d6;border:1px solid #e8c867;border-radius:6px;padding:8px 12px;margin-top:16px}
.error{color:#a4262c}
.muted{color:#6b7785}
.reason{display:inline-block;background:#fde7e9;color:#a4262c;border-radius:3px;padding:0 6px;font-size:12px}
";

/// The page as HTML.
pub fn render(view: &StatusView) -> String {
    page(view).into_string()
}

fn page(view: &StatusView) -> Markup {
    let loaded: u64 = view.tables.iter().map(|t| t.activity.loaded).sum();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sluice ingest status" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { "Sluice ingest" }
                    p {
                        (loaded) " rows loaded since start · rendered " (time(view.now))
                        " · read-only; reload for fresh figures"
                    }
                }
                main {
                    @if let Some(reason) = &view.waiting_for {
                        p.banner { strong { "Not loading yet: " } (reason) }
                    }
                    @if let Some(error) = &view.database_error {
                        p.banner.error { strong { "Database: " } (error) }
                    }
                    (tables(view))
                    (refused(view))
                    (rejected(view))
                    (settings(view))
                }
            }
        }
    }
}

fn tables(view: &StatusView) -> Markup {
    html! {
        section #tables {
            h2 { "Tables" }
            table {
                thead { tr {
                    th { "table" } th.n { "rows loaded" } th.n { "rows rejected" } th.n { "columns" }
                    th { "last load" } th { "rows per minute, last hour" }
                } }
                tbody {
                    @for status in &view.tables {
                        @let activity = &status.activity;
                        tr data-table=(activity.table.name()) {
                            td { code { (activity.table.name()) } }
                            td.n.loaded { (activity.loaded) }
                            td.n.rejected { (activity.rejected) }
                            td.n.columns {
                                @match status.columns {
                                    Some(n) => (n),
                                    None => span.muted { "?" },
                                }
                            }
                            td {
                                @match activity.last_load {
                                    Some(at) => span title=(time(at)) { (ago(view.now, at)) },
                                    None => span.muted { "never" },
                                }
                            }
                            td { (chart(&activity.minutes)) }
                        }
                    }
                }
            }
            p.muted { "Rows loaded and rejected since this process started; rejected records are kept in "
                code { "_sdc_rejected" } "." }
        }
    }
}

/// Bars of rows loaded per minute (blue) with rejected records on top (red), oldest left.
fn chart(minutes: &[Minute]) -> Markup {
    const WIDTH: usize = 240;
    const HEIGHT: u64 = 36;
    let bar = WIDTH / minutes.len().max(1);
    let peak = minutes
        .iter()
        .map(|m| m.loaded + m.rejected)
        .max()
        .unwrap_or(0)
        .max(1);
    let total: u64 = minutes.iter().map(|m| m.loaded).sum();
    let scaled = |n: u64| {
        if n == 0 {
            0
        } else {
            (n * HEIGHT).div_ceil(peak).max(1)
        }
    };
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
            viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" {
            title { (total) " rows in the last hour; peak " (peak) " per minute" }
            rect x="0" y="0" width=(WIDTH) height=(HEIGHT) fill="#f0f3f7" {}
            @for (i, minute) in minutes.iter().enumerate() {
                @let loaded = scaled(minute.loaded);
                @let rejected = scaled(minute.rejected);
                @if loaded > 0 {
                    rect x=(i * bar) y=(HEIGHT - loaded) width=(bar.saturating_sub(1).max(1))
                        height=(loaded) fill="#2f6fb3" {}
                }
                @if rejected > 0 {
                    rect x=(i * bar) y=(HEIGHT.saturating_sub(loaded + rejected))
                        width=(bar.saturating_sub(1).max(1)) height=(rejected) fill="#c8373f" {}
                }
            }
        }
    }
}

fn refused(view: &StatusView) -> Markup {
    html! {
        section #refused {
            h2 { "Refused requests" }
            @if view.refused.is_empty() {
                p.muted { "None since start." }
            } @else {
                table {
                    thead { tr {
                        th { "time" } th { "route" } th.n { "status" } th { "reason" }
                        th { "message id" } th { "message" }
                    } }
                    tbody {
                        @for entry in &view.refused {
                            tr {
                                td { span title=(time(entry.time)) { (ago(view.now, entry.time)) } }
                                td { code { (entry.route) } }
                                td.n { (entry.status) }
                                td { span.reason { (entry.reason.code()) } }
                                td { @if let Some(id) = &entry.message_id { code { (id) } } }
                                td { (entry.message) }
                            }
                        }
                    }
                }
            }
            p.muted { "The same list as JSON: " code { "GET /v1/refused" }
                "; counts by route and reason: " code { "sluice_requests_refused_total" }
                " in " code { "/metrics" } "." }
        }
    }
}

fn rejected(view: &StatusView) -> Markup {
    html! {
        section #rejected {
            h2 { "Rejected records" }
            @if view.rejected.is_empty() {
                p.muted { "None in " code { "_sdc_rejected" } "." }
            } @else {
                table {
                    thead { tr {
                        th { "time" } th { "table" } th { "message id" } th { "reason" }
                    } }
                    tbody {
                        @for row in &view.rejected {
                            tr {
                                td { span title=(time(row.rejected_at)) { (ago(view.now, row.rejected_at)) } }
                                td { code { (row.table_name) } }
                                td { @if let Some(id) = &row.message_id { code { (id) } } }
                                td { (row.reason) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn settings(view: &StatusView) -> Markup {
    html! {
        section #configuration {
            h2 { "Configuration" }
            table {
                tbody {
                    @for (name, value) in &view.settings {
                        tr { th { (name) } td { code { (value) } } }
                    }
                }
            }
        }
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// How long before `now` `at` was, for people: `12 s ago`, `3 min ago`, `2 h ago`.
fn ago(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86_400 => format!("{} h ago", seconds / 3600),
        _ => time(at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refused::Reason;

    fn view() -> StatusView {
        let now = Utc::now();
        let mut track = TableStatus::idle(Table::Track, Some(14));
        track.activity.loaded = 42;
        track.activity.rejected = 1;
        track.activity.last_load = Some(now);
        track.activity.minutes[MINUTES - 1] = Minute {
            loaded: 42,
            rejected: 1,
        };
        StatusView {
            now,
            waiting_for: None,
            tables: vec![track, TableStatus::idle(Table::Page, None)],
            database_error: None,
            refused: vec![RefusedRequest {
                time: now,
                route: "/v1/webhook".to_owned(),
                status: 400,
                reason: Reason::InvalidEvent,
                message: "unknown type \"<img src=x onerror=alert(1)>\"".to_owned(),
                message_id: Some("<script>alert('id')</script>".to_owned()),
            }],
            rejected: vec![RejectedRow {
                rejected_at: now,
                table_name: "track</td><script>".to_owned(),
                message_id: Some("m-\"quoted\"&".to_owned()),
                reason: "value too long <b>".to_owned(),
            }],
            settings: vec![(
                "database URL",
                "postgres://sluice:****@db/warehouse".to_owned(),
            )],
        }
    }

    #[test]
    fn hostile_values_are_escaped() {
        let html = render(&view());
        assert!(!html.contains("<script>"), "a raw <script> in {html}");
        assert!(!html.contains("<img"), "a raw <img> in {html}");
        assert!(!html.contains("<b>"));
        assert!(html.contains("&lt;script&gt;alert('id')&lt;/script&gt;"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("track&lt;/td&gt;&lt;script&gt;"));
        assert!(html.contains("m-&quot;quoted&quot;&amp;"));
    }

    #[test]
    fn shows_tables_counts_and_a_chart() {
        let html = render(&view());
        assert!(html.contains(r#"<tr data-table="track">"#));
        assert!(html.contains(r#"<td class="n loaded">42</td>"#));
        assert!(html.contains(r#"<td class="n columns">14</td>"#));
        assert!(html.contains("<svg"));
        assert!(html.contains("42 rows in the last hour; peak 43 per minute"));
        assert!(html.contains("invalid_event"));
        assert!(html.contains("postgres://sluice:****@db/warehouse"));
        assert!(html.contains("never"), "page has not loaded yet");
    }

    #[test]
    fn ages_read_as_people_say_them() {
        let now = Utc::now();
        assert_eq!(ago(now, now - chrono::Duration::seconds(5)), "5 s ago");
        assert_eq!(ago(now, now - chrono::Duration::seconds(130)), "2 min ago");
        assert_eq!(ago(now, now - chrono::Duration::hours(3)), "3 h ago");
    }
}

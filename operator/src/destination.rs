//! The warehouse side of an integration: reading its URL from the user's Secret, and creating,
//! reporting on and dropping its schema through the ingest library (the same DDL the ingest
//! service runs), which records what it created for the integration and drops only that.
//!
//! Failures come back as [`Observation`]s: a reason and a sentence that say what to fix, ready to
//! go into the `SchemaReady` condition.

use std::time::Duration;

use chrono::SubsecRound;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use sluice_ingest::event::Table;
use sluice_ingest::load::{
    Claim, Dropped, LoadError, LoadFigures, OldRows, Owner, ResetRequest, TableReset, Warehouse,
};

use crate::crd::{RefusalReport, SecretKeyRef, TableReport, TableVersionReport};
use crate::status::{Observation, Reason};

/// The longest a reconcile waits on the database, so one unreachable warehouse cannot hold a
/// reconcile worker for long.
pub const DATABASE_TIMEOUT: Duration = Duration::from_secs(15);

/// Reads the database URL from `reference` in `namespace`.
pub async fn url(
    client: &Client,
    namespace: &str,
    reference: &SecretKeyRef,
) -> Result<String, Observation> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(&reference.name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(Observation::failed(
                Reason::SecretNotFound,
                format!(
                    "Secret {namespace}/{} named by spec.destination.urlSecretRef does not exist; \
                     create it with the database URL under key {:?}",
                    reference.name, reference.key
                ),
            ));
        }
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return Err(Observation::failed(
                Reason::SecretForbidden,
                format!(
                    "the operator may not read Secret {namespace}/{}: grant it get on secrets in \
                     this namespace",
                    reference.name
                ),
            ));
        }
        Err(error) => {
            return Err(Observation::failed(
                Reason::SecretUnreadable,
                format!(
                    "reading Secret {namespace}/{} failed: {error}",
                    reference.name
                ),
            ));
        }
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key))
        .ok_or_else(|| {
            Observation::failed(
                Reason::SecretKeyNotFound,
                format!(
                    "Secret {namespace}/{} has no key {:?}; put the database URL \
                     (postgres://user:password@host:port/database) under that key, or set \
                     spec.destination.urlSecretRef.key",
                    reference.name, reference.key
                ),
            )
        })?;
    let url = String::from_utf8(value.0.clone()).map_err(|_| {
        Observation::failed(
            Reason::InvalidDatabaseUrl,
            format!(
                "key {:?} of Secret {namespace}/{} is not UTF-8 text",
                reference.key, reference.name
            ),
        )
    })?;
    Ok(url.trim().to_owned())
}

fn warehouse(url: &str, schema: &str) -> Result<Warehouse, Observation> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(Observation::failed(
            Reason::InvalidDatabaseUrl,
            "the database URL must start with postgres:// or postgresql:// (an ingest Deployment \
             cannot share a SQLite file); fix the value in the Secret named by \
             spec.destination.urlSecretRef",
        ));
    }
    Warehouse::connect(url, schema, 1).map_err(|error| load_failure(&error))
}

/// The condition for a failure of the ingest library. The error's text never contains the URL
/// (sqlx leaves the password out of its messages).
fn load_failure(error: &LoadError) -> Observation {
    match error {
        LoadError::BadUrl(_) => Observation::failed(
            Reason::InvalidDatabaseUrl,
            "the database URL in the Secret named by spec.destination.urlSecretRef is not a \
             valid postgres:// URL",
        ),
        LoadError::Schema(invalid) => {
            Observation::failed(Reason::InvalidSchema, invalid.to_string())
        }
        LoadError::PermissionDenied { .. } => {
            Observation::failed(Reason::PermissionDenied, error.to_string())
        }
        LoadError::SchemaClaimed { .. } => {
            Observation::failed(Reason::SchemaClaimed, error.to_string())
        }
        LoadError::Unavailable(message) => Observation::failed(
            Reason::DatabaseUnavailable,
            format!(
                "the database cannot be reached ({message}); check the host and port in the URL \
                 and that the database accepts connections from the cluster"
            ),
        ),
        LoadError::DropBlocked { .. } => {
            Observation::failed(Reason::DropBlocked, error.to_string())
        }
        other => Observation::failed(
            Reason::DatabaseError,
            format!("the database refused to create the schema: {other}; check the role's rights"),
        ),
    }
}

fn timed_out() -> Observation {
    Observation::failed(
        Reason::DatabaseUnavailable,
        format!(
            "the database did not answer within {DATABASE_TIMEOUT:?}; check the host and port in \
             the URL and that the database accepts connections from the cluster"
        ),
    )
}

/// What the destination reports besides the schema's claim, as of `time`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reports {
    /// When the figures were read (RFC 3339, UTC, whole seconds); "the last hour" ends here.
    pub time: String,
    /// The tables with their column counts and loading figures.
    pub tables: Vec<TableReport>,
    /// Requests the ingest refused in the last hour, by reason.
    pub refused_last_hour: Vec<RefusalReport>,
    /// Each table ever reset, with its latest reset.
    pub table_versions: Vec<TableVersionReport>,
    /// The resets this call carried out, for their Events.
    pub resets: Vec<TableReset>,
}

/// A time as the status writes it: RFC 3339 in UTC, whole seconds (`2024-05-01T10:00:00Z`), so
/// that times of one status compare as text.
pub fn status_time(time: chrono::DateTime<chrono::Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The table report: each table of `columns` (with its column count) and its figures in
/// `loads` (no figures: nothing loaded, nothing rejected, no last load).
pub fn table_reports(columns: &[(Table, usize)], loads: &[LoadFigures]) -> Vec<TableReport> {
    columns
        .iter()
        .map(|(table, count)| {
            let figures = loads.iter().find(|l| l.table_name == table.name());
            TableReport {
                name: table.name().to_owned(),
                columns: i64::try_from(*count).unwrap_or(i64::MAX),
                rows_last_hour: figures.map_or(0, |f| f.rows_loaded),
                rejected_last_hour: figures.map_or(0, |f| f.rows_rejected),
                last_load_time: figures.and_then(|f| f.last_received_at).map(status_time),
            }
        })
        .collect()
}

/// Creates the schema and the selected tables for `owner` where missing, recording what it
/// created; carries out the `resets` whose version is above the table's (the ingest library's
/// [`Warehouse::reset_tables`], which leaves a table already at its version as it is, so each
/// is carried out once); and reports the claim, the tables with their column counts, the last
/// hour's rows loaded and rejected and the last load (from `_sdc_loads`), the last hour's
/// refused requests (from `_sdc_refusals`; every ingest replica adds to both tables) and the
/// tables' versions. A schema another integration claimed is refused (`SchemaClaimed`); a reset
/// that fails is `TableResetFailed`, with the schema left as it was before the reset.
pub async fn ensure_schema(
    url: &str,
    schema: &str,
    tables: &[Table],
    owner: &Owner,
    resets: &[ResetRequest],
    old_rows: OldRows,
) -> Result<(Claim, Reports), Observation> {
    let warehouse = warehouse(url, schema)?;
    // Whole seconds, so that the hour counted ends at the reported time.
    let now = chrono::Utc::now().trunc_subsecs(0);
    let since = now - chrono::Duration::hours(1);
    let work = async {
        let claim = warehouse
            .ensure_owned_schema(tables, owner)
            .await
            .map_err(|error| load_failure(&error))?;
        let done = warehouse
            .reset_tables(resets, old_rows)
            .await
            .map_err(|error| reset_failure(&error))?;
        let reports = async {
            let refused = warehouse.refusals_since(since).await?;
            let loads = warehouse.loads_since(since).await?;
            let versions = warehouse.latest_resets().await?;
            Ok::<_, LoadError>((warehouse.table_report().await?, loads, refused, versions))
        };
        let (columns, loads, refused, versions) =
            reports.await.map_err(|error| load_failure(&error))?;
        Ok::<_, Observation>((claim, columns, loads, refused, versions, done))
    };
    let (claim, columns, loads, refused, versions, resets) =
        tokio::time::timeout(DATABASE_TIMEOUT, work)
            .await
            .map_err(|_elapsed| timed_out())??;
    let refused_last_hour = refused
        .into_iter()
        .map(|(reason, count)| RefusalReport { reason, count })
        .collect();
    let table_versions = versions.iter().map(version_report).collect();
    Ok((
        claim,
        Reports {
            time: status_time(now),
            tables: table_reports(&columns, &loads),
            refused_last_hour,
            table_versions,
            resets,
        },
    ))
}

/// A table's latest reset as the status reports it.
fn version_report(reset: &TableReset) -> TableVersionReport {
    TableVersionReport {
        name: reset.table.name().to_owned(),
        version: reset.version,
        reset_at: reset
            .reset_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        kept_as: reset.kept_as.clone(),
        previous_rows: reset.previous_rows,
    }
}

/// The condition for a reset that failed: a reset that cannot be carried out as asked (a kept
/// name taken, a view on a table to drop) as `TableResetFailed`, the database's other reasons
/// (unreachable, a privilege missing) as for the schema.
fn reset_failure(error: &LoadError) -> Observation {
    match error {
        LoadError::Database(message) => Observation::failed(
            Reason::TableResetFailed,
            format!("spec.tableReset could not be carried out: {message}"),
        ),
        LoadError::ResetRefused(_) | LoadError::DropBlocked { .. } => Observation::failed(
            Reason::TableResetFailed,
            format!("spec.tableReset could not be carried out: {error}"),
        ),
        other => {
            let mut failure = load_failure(other);
            failure.message = format!(
                "spec.tableReset could not be carried out: {}",
                failure.message
            );
            failure
        }
    }
}

/// The note of the Normal Event for a reset carried out.
pub fn reset_note(reset: &TableReset) -> String {
    let rows = match &reset.kept_as {
        Some(kept) => format!(
            "its {} rows of version {} are kept in {kept}",
            reset.previous_rows, reset.previous_version
        ),
        None => format!(
            "its {} rows of version {} were dropped",
            reset.previous_rows, reset.previous_version
        ),
    };
    format!(
        "reset table {} to version {}: {rows}",
        reset.table, reset.version
    )
}

/// Drops what Sluice created for `owner` in the schema, and the schema only if Sluice created
/// it and nothing else is left in it.
pub async fn drop_owned(url: &str, schema: &str, owner: &Owner) -> Result<Dropped, Observation> {
    let warehouse = warehouse(url, schema)?;
    tokio::time::timeout(DATABASE_TIMEOUT, warehouse.drop_owned(owner))
        .await
        .map_err(|_elapsed| timed_out())?
        .map_err(|error| load_failure(&error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_postgres_urls_are_accepted() {
        let refused = warehouse("sqlite://x.db", "segment").expect_err("sqlite refused");
        assert_eq!(refused.reason, Reason::InvalidDatabaseUrl);
        let refused = warehouse("mysql://h/db", "segment").expect_err("mysql refused");
        assert_eq!(refused.reason, Reason::InvalidDatabaseUrl);
    }

    #[test]
    fn table_report_joins_columns_and_loading_figures_by_table() {
        let loaded = LoadFigures {
            table_name: "track".to_owned(),
            rows_loaded: 7,
            rows_rejected: 2,
            last_received_at: "2024-05-01T10:00:59.999999Z".parse().ok(),
        };
        let only_columns = LoadFigures {
            table_name: "identify".to_owned(),
            rows_loaded: 0,
            rows_rejected: 0,
            last_received_at: None,
        };
        let report = table_reports(
            &[(Table::Identify, 12), (Table::Page, 11), (Table::Track, 20)],
            &[loaded, only_columns],
        );
        let expected = |name: &str, columns, rows, rejected, last: Option<&str>| TableReport {
            name: name.to_owned(),
            columns,
            rows_last_hour: rows,
            rejected_last_hour: rejected,
            last_load_time: last.map(str::to_owned),
        };
        assert_eq!(
            report,
            [
                expected("identify", 12, 0, 0, None),
                expected("page", 11, 0, 0, None),
                expected("track", 20, 7, 2, Some("2024-05-01T10:00:59Z")),
            ]
        );
    }

    #[test]
    fn a_reset_note_says_where_the_old_rows_went() {
        let mut reset = TableReset {
            table: Table::Track,
            previous_version: 1,
            version: 2,
            kept_as: Some("track__v1".to_owned()),
            previous_rows: 42,
            reset_at: chrono::DateTime::from_timestamp(0, 0).expect("epoch"),
        };
        assert_eq!(
            reset_note(&reset),
            "reset table track to version 2: its 42 rows of version 1 are kept in track__v1"
        );
        reset.kept_as = None;
        assert_eq!(
            reset_note(&reset),
            "reset table track to version 2: its 42 rows of version 1 were dropped"
        );
        assert_eq!(version_report(&reset).reset_at, "1970-01-01T00:00:00Z");
    }

    #[test]
    fn a_reset_refused_as_asked_is_table_reset_failed_and_an_outage_is_not() {
        let blocked = reset_failure(&LoadError::DropBlocked {
            schema: "shop".to_owned(),
            table: "track".to_owned(),
            detail: "view shop.v depends on table shop.track".to_owned(),
        });
        assert_eq!(blocked.reason, Reason::TableResetFailed);
        assert!(
            blocked
                .message
                .starts_with("spec.tableReset could not be carried out: ")
                && blocked.message.contains("view shop.v"),
            "{}",
            blocked.message
        );
        let taken = reset_failure(&LoadError::ResetRefused("track__v0 exists".to_owned()));
        assert_eq!(taken.reason, Reason::TableResetFailed);
        assert_eq!(
            taken.message,
            "spec.tableReset could not be carried out: track__v0 exists"
        );
        let refused = reset_failure(&LoadError::Database("duplicate key".to_owned()));
        assert_eq!(refused.reason, Reason::TableResetFailed);
        let down = reset_failure(&LoadError::Unavailable("timeout".to_owned()));
        assert_eq!(down.reason, Reason::DatabaseUnavailable);
        assert!(
            down.message
                .starts_with("spec.tableReset could not be carried out: ")
        );
    }

    #[tokio::test]
    async fn unreachable_database_is_reported_as_unavailable() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let owner = Owner {
            uid: "u-1".to_owned(),
            name: "SegmentIntegration a/b".to_owned(),
        };
        let refused = ensure_schema(
            "postgres://u:p@127.0.0.1:1/db",
            "segment",
            &Table::DEFAULT,
            &owner,
            &[],
            OldRows::Keep,
        )
        .await
        .expect_err("nothing listens on port 1");
        assert_eq!(refused.reason, Reason::DatabaseUnavailable);
        assert!(!refused.message.contains("u:p"), "{}", refused.message);
    }
}

//! The warehouse side of an integration: reading its URL from the user's Secret, and creating,
//! reporting on and dropping its schema through the ingest library (the same DDL the ingest
//! service runs), which records what it created for the integration and drops only that.
//!
//! Failures come back as [`Observation`]s: a reason and a sentence that say what to fix, ready to
//! go into the `SchemaReady` condition.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use sluice_ingest::event::Table;
use sluice_ingest::load::{Claim, Dropped, LoadError, Owner, Warehouse};

use crate::crd::{RefusalReport, SecretKeyRef, TableReport};
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

/// What the destination reports besides the schema's claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Reports {
    /// The tables with their column counts.
    pub tables: Vec<TableReport>,
    /// Requests the ingest refused in the last hour, by reason.
    pub refused_last_hour: Vec<RefusalReport>,
}

/// Creates the schema and the selected tables for `owner` where missing, recording what it
/// created, and reports the claim, the tables with their column counts and the last hour's
/// refused requests (from `_sdc_refusals`, which every ingest replica adds to). A schema another
/// integration claimed is refused (`SchemaClaimed`).
pub async fn ensure_schema(
    url: &str,
    schema: &str,
    tables: &[Table],
    owner: &Owner,
) -> Result<(Claim, Reports), Observation> {
    let warehouse = warehouse(url, schema)?;
    let work = async {
        let claim = warehouse.ensure_owned_schema(tables, owner).await?;
        let since = chrono::Utc::now() - chrono::Duration::hours(1);
        let refused = warehouse.refusals_since(since).await?;
        Ok::<_, LoadError>((claim, warehouse.table_report().await?, refused))
    };
    let (claim, report, refused) = tokio::time::timeout(DATABASE_TIMEOUT, work)
        .await
        .map_err(|_elapsed| timed_out())?
        .map_err(|error| load_failure(&error))?;
    let report = report
        .into_iter()
        .map(|(table, columns)| TableReport {
            name: table.name().to_owned(),
            columns: i64::try_from(columns).unwrap_or(i64::MAX),
        })
        .collect();
    let refused_last_hour = refused
        .into_iter()
        .map(|(reason, count)| RefusalReport { reason, count })
        .collect();
    Ok((
        claim,
        Reports {
            tables: report,
            refused_last_hour,
        },
    ))
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
        )
        .await
        .expect_err("nothing listens on port 1");
        assert_eq!(refused.reason, Reason::DatabaseUnavailable);
        assert!(!refused.message.contains("u:p"), "{}", refused.message);
    }
}

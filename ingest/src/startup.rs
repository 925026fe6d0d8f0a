//! Start-up: the HTTP server answers from the first second while the schema is prepared in the
//! background. Until it is, `/readyz` and the event routes answer 503 with `Retry-After` and the
//! reason (the database not reachable yet, a missing privilege naming the grant to give, a
//! schema claimed by another integration), while `/healthz` and `/metrics` answer as usual, so
//! Kubernetes keeps a pod that is only waiting for its database instead of restarting it.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::event::Table;
use crate::load::{LoadError, Owner, Warehouse};

/// The first retry delay of the preparation; it doubles up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_millis(200);
/// The longest delay between two attempts to prepare the schema.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Whether the schema is prepared, shared by the preparing task and the HTTP handlers.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<RwLock<Option<String>>>);

impl Readiness {
    /// Not prepared yet.
    pub fn preparing() -> Readiness {
        Readiness(Arc::new(RwLock::new(Some(
            "the schema is being prepared".to_owned(),
        ))))
    }

    /// Why the service is not ready yet, or `None` once the schema is prepared.
    pub fn waiting_for(&self) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, state: Option<String>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = state;
    }
}

/// Creates the schema and tables (recording ownership for `owner`, when given), retrying every
/// failure with backoff, so that the service and its database can start in any order and a
/// missing grant takes effect once given, without a restart. Each failure is logged and shown
/// by `readiness`; the schema is ready when this returns.
pub async fn prepare_schema(
    warehouse: &Warehouse,
    tables: &[Table],
    owner: Option<&Owner>,
    readiness: &Readiness,
) {
    let mut delay = RETRY_FIRST;
    loop {
        let attempt = match owner {
            Some(owner) => warehouse.ensure_owned_schema(tables, owner).await.map(drop),
            None => warehouse.ensure_schema(tables).await,
        };
        match attempt {
            Ok(()) => {
                tracing::info!(schema = %warehouse.schema(), "schema and tables ready");
                readiness.set(None);
                return;
            }
            Err(LoadError::Unavailable(reason)) => {
                tracing::warn!(%reason, retry_in = ?delay, "database not reachable yet");
                readiness.set(Some(format!("the database is not reachable yet: {reason}")));
            }
            Err(error) => {
                tracing::error!(%error, retry_in = ?delay, "cannot prepare the schema");
                readiness.set(Some(error.to_string()));
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_waiting_and_is_shared() {
        let readiness = Readiness::preparing();
        let seen_by_handlers = readiness.clone();
        assert!(seen_by_handlers.waiting_for().is_some());
        readiness.set(Some("permission denied".to_owned()));
        assert_eq!(
            seen_by_handlers.waiting_for().as_deref(),
            Some("permission denied")
        );
        readiness.set(None);
        assert_eq!(seen_by_handlers.waiting_for(), None);
    }
}

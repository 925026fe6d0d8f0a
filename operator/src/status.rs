//! The status a reconcile reports: conditions from what it observed, with transition times that
//! move only when a condition's status changes, and the Events that a change of status warrants.
//! Pure; `controller` writes the result and publishes the Events.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::events::{Event, EventType};

use crate::crd::{
    Condition, ConditionStatus, RefusalReport, SegmentIntegrationStatus, TableReport,
    TableVersionReport,
};

/// The condition that sums up the others.
pub const READY: &str = "Ready";
/// The destination schema and its tables exist.
pub const SCHEMA_READY: &str = "SchemaReady";
/// At least one ingest pod is available.
pub const INGEST_AVAILABLE: &str = "IngestAvailable";

/// Every reason the operator writes, in conditions and Events: a CamelCase word for programs
/// (Kubernetes API conventions), written as the variant's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `Ready`: the schema is ready and the ingest service available.
    Ready,
    /// `Ready` is false because `SchemaReady` is.
    SchemaNotReady,
    /// `Ready` is false because `IngestAvailable` is.
    IngestUnavailable,
    /// The schema and its tables exist.
    SchemaReady,
    /// At least one ingest pod is available.
    MinimumReplicasAvailable,
    /// The ingest Deployment asks for no pod.
    ScaledToZero,
    /// No ingest pod is available yet.
    NoReplicasAvailable,
    /// The destination Secret does not exist.
    SecretNotFound,
    /// The operator may not read the destination Secret.
    SecretForbidden,
    /// Reading the destination Secret failed otherwise.
    SecretUnreadable,
    /// The destination Secret lacks the key.
    SecretKeyNotFound,
    /// The database URL is not one Sluice can use.
    InvalidDatabaseUrl,
    /// The schema name is not one Sluice will use.
    InvalidSchema,
    /// The database role lacks a privilege.
    PermissionDenied,
    /// Another integration owns the schema.
    SchemaClaimed,
    /// The database cannot be reached.
    DatabaseUnavailable,
    /// `Drop` is blocked by objects that depend on the tables.
    DropBlocked,
    /// The database refused otherwise.
    DatabaseError,
    /// A table was reset (`spec.tableReset`).
    TableReset,
    /// A reset asked for by `spec.tableReset` could not be carried out.
    TableResetFailed,
    /// The credentials Secret was created.
    CredentialsCreated,
    /// An optional child (Ingress, HorizontalPodAutoscaler) was deleted: the spec no longer asks
    /// for it.
    ChildDeleted,
    /// `Drop` removed the schema.
    SchemaDropped,
    /// `Drop` removed the tables Sluice created and kept the schema.
    TablesDropped,
    /// `Drop` could not be carried out.
    DropSchemaFailed,
    /// This replica lost the leader Lease before touching the warehouse.
    NotLeading,
    /// A reconcile failed for a reason no condition reports (see `controller::Error::category`).
    ReconcileFailed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The variant's name is the reason (`Reason::SchemaReady` is "SchemaReady").
        fmt::Debug::fmt(self, f)
    }
}

/// An observed state of one condition: whether it holds, a CamelCase reason, and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Whether the condition holds.
    pub ok: bool,
    /// Why, for programs.
    pub reason: Reason,
    /// What is the case, and what to do when it is not good.
    pub message: String,
}

impl Observation {
    /// A condition that holds.
    pub fn ok(reason: Reason, message: impl Into<String>) -> Self {
        Observation {
            ok: true,
            reason,
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn failed(reason: Reason, message: impl Into<String>) -> Self {
        Observation {
            ok: false,
            reason,
            message: message.into(),
        }
    }
}

/// `IngestAvailable` from the status of the ingest Deployment `name`, as the controller manager
/// reports it.
pub fn ingest_availability(name: &str, deployment: &Deployment) -> Observation {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.replicas)
        .unwrap_or(1);
    let available = deployment
        .status
        .as_ref()
        .and_then(|status| status.available_replicas)
        .unwrap_or(0);
    if available > 0 {
        Observation::ok(
            Reason::MinimumReplicasAvailable,
            format!("{available} of {desired} ingest pods of Deployment {name} are available"),
        )
    } else if desired == 0 {
        Observation::failed(
            Reason::ScaledToZero,
            format!(
                "spec.ingest.replicas is 0, so Deployment {name} runs no pod and no event can arrive"
            ),
        )
    } else {
        Observation::failed(
            Reason::NoReplicasAvailable,
            format!(
                "no ingest pod of Deployment {name} is available yet (0 of {desired}); if this \
                 lasts, see `kubectl describe deployment {name}` and the pods' logs"
            ),
        )
    }
}

/// `Ready` from the other two: true when both hold, else the first failure's reason.
pub fn readiness(schema: &Observation, ingest: &Observation) -> Observation {
    match (schema.ok, ingest.ok) {
        (true, true) => Observation::ok(
            Reason::Ready,
            "the schema is ready and the ingest service is available",
        ),
        (false, _) => Observation::failed(Reason::SchemaNotReady, schema.message.clone()),
        (true, false) => Observation::failed(Reason::IngestUnavailable, ingest.message.clone()),
    }
}

/// A condition of `type_` for `observation`, keeping the previous transition time when the
/// status did not change.
pub fn condition(
    type_: &str,
    observation: &Observation,
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Condition {
    let status = if observation.ok {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status,
        reason: observation.reason.to_string(),
        message: observation.message.clone(),
        last_transition_time,
        observed_generation: generation,
    }
}

/// Everything a reconcile observed, to be turned into a status.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The resource's `metadata.generation`.
    pub generation: Option<i64>,
    /// The schema in use.
    pub schema: String,
    /// The webhook URL.
    pub webhook_url: String,
    /// The credentials Secret's name.
    pub credentials_secret: String,
    /// `SchemaReady`.
    pub schema_ready: Observation,
    /// `IngestAvailable`.
    pub ingest_available: Observation,
    /// The loading report, when the destination answered; `None` keeps the previous report.
    pub tables: Option<Vec<TableReport>>,
    /// The last hour's refused requests by reason, when the destination answered; `None`
    /// keeps the previous figures.
    pub refused_last_hour: Option<Vec<RefusalReport>>,
    /// When `tables` and `refused_last_hour` were read; `None` keeps the previous time.
    pub report_time: Option<String>,
    /// The tables' versions, when the destination answered; `None` keeps the previous ones.
    pub table_versions: Option<Vec<TableVersionReport>>,
}

/// Whether figures read from the warehouse at `now` are to replace those of `previous`: when it
/// has none, when its `reportTime` is unreadable, or when that is at least `interval` old.
/// Figures of the last hour change with every load, and writing the status makes the
/// controller reconcile again, so without this bound a busy integration would be reconciled
/// and its status written over and over.
pub fn report_due(
    previous: Option<&SegmentIntegrationStatus>,
    now: DateTime<Utc>,
    interval: Duration,
) -> bool {
    let Some(time) = previous.and_then(|s| s.report_time.as_deref()) else {
        return true;
    };
    let Ok(time) = DateTime::parse_from_rfc3339(time) else {
        return true;
    };
    let age = now.signed_duration_since(time);
    age.to_std().is_ok_and(|age| age >= interval) || age < chrono::Duration::zero()
}

/// The latest `lastLoadTime` of `tables`, which are RFC 3339 times in UTC of one format
/// (`destination::status_time`), so the latest is the greatest text.
pub fn latest_load(tables: &[TableReport]) -> Option<String> {
    tables.iter().filter_map(|t| t.last_load_time.clone()).max()
}

/// The new status from what was observed and the previous status.
pub fn status(
    observed: &Observed,
    previous: Option<&SegmentIntegrationStatus>,
    now: &str,
) -> SegmentIntegrationStatus {
    let old = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let ready = readiness(&observed.schema_ready, &observed.ingest_available);
    let conditions = [
        (READY, &ready),
        (SCHEMA_READY, &observed.schema_ready),
        (INGEST_AVAILABLE, &observed.ingest_available),
    ]
    .into_iter()
    .map(|(type_, observation)| condition(type_, observation, observed.generation, old, now))
    .collect();
    let tables = observed
        .tables
        .clone()
        .or_else(|| previous.map(|s| s.tables.clone()))
        .unwrap_or_default();
    SegmentIntegrationStatus {
        observed_generation: observed.generation,
        conditions,
        schema: Some(observed.schema.clone()),
        webhook_url: Some(observed.webhook_url.clone()),
        credentials_secret: Some(observed.credentials_secret.clone()),
        last_load_time: latest_load(&tables),
        report_time: observed
            .report_time
            .clone()
            .or_else(|| previous.and_then(|s| s.report_time.clone())),
        tables,
        refused_last_hour: observed
            .refused_last_hour
            .clone()
            .or_else(|| previous.map(|s| s.refused_last_hour.clone()))
            .unwrap_or_default(),
        table_versions: observed
            .table_versions
            .clone()
            .or_else(|| previous.map(|s| s.table_versions.clone()))
            .unwrap_or_default(),
    }
}

/// The Events a change of status warrants: one per condition among `SchemaReady` and
/// `IngestAvailable` whose status or reason differs from `previous` (a new condition counts as a
/// change), Normal when it holds and Warning when it does not. `Ready` only sums these two up,
/// so it has no Event of its own.
pub fn events(
    previous: Option<&SegmentIntegrationStatus>,
    current: &SegmentIntegrationStatus,
) -> Vec<Event> {
    let find = |status: &SegmentIntegrationStatus, type_: &str| {
        status.conditions.iter().find(|c| c.type_ == type_).cloned()
    };
    [
        (SCHEMA_READY, "EnsureSchema"),
        (INGEST_AVAILABLE, "WatchIngest"),
    ]
    .into_iter()
    .filter_map(|(type_, failing_action)| {
        let now = find(current, type_)?;
        let before = previous.and_then(|p| find(p, type_));
        let same = before.is_some_and(|b| b.status == now.status && b.reason == now.reason);
        if same {
            return None;
        }
        let holds = now.status == ConditionStatus::True;
        Some(Event {
            type_: if holds {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: now.reason,
            note: Some(now.message),
            action: if holds { type_ } else { failing_action }.to_owned(),
            secondary: None,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    use super::*;

    fn observed(schema_ok: bool, ingest_ok: bool) -> Observed {
        Observed {
            generation: Some(3),
            schema: "shop".to_owned(),
            webhook_url: "http://x/v1/webhook".to_owned(),
            credentials_secret: "shop-credentials".to_owned(),
            schema_ready: if schema_ok {
                Observation::ok(Reason::SchemaReady, "ok")
            } else {
                Observation::failed(Reason::SecretNotFound, "create the secret")
            },
            ingest_available: if ingest_ok {
                Observation::ok(Reason::MinimumReplicasAvailable, "ok")
            } else {
                Observation::failed(Reason::NoReplicasAvailable, "wait")
            },
            tables: None,
            refused_last_hour: None,
            report_time: None,
            table_versions: None,
        }
    }

    #[test]
    fn ready_needs_both_and_names_the_first_failure() {
        let status = status(&observed(false, true), None, "t1");
        let ready = &status.conditions[0];
        assert_eq!(ready.type_, READY);
        assert_eq!(ready.status, ConditionStatus::False);
        assert_eq!(ready.reason, "SchemaNotReady");
        assert_eq!(ready.message, "create the secret");
        assert_eq!(ready.observed_generation, Some(3));
        let all_good = super::status(&observed(true, true), None, "t1");
        assert!(
            all_good
                .conditions
                .iter()
                .all(|c| c.status == ConditionStatus::True)
        );
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let first = status(&observed(true, false), None, "t1");
        let same = status(&observed(true, false), Some(&first), "t2");
        assert!(
            same.conditions
                .iter()
                .all(|c| c.last_transition_time == "t1")
        );
        let changed = status(&observed(true, true), Some(&same), "t3");
        let time = |type_: &str| {
            changed
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| c.last_transition_time.clone())
        };
        assert_eq!(time(SCHEMA_READY).as_deref(), Some("t1"));
        assert_eq!(time(INGEST_AVAILABLE).as_deref(), Some("t3"));
        assert_eq!(time(READY).as_deref(), Some("t3"));
    }

    #[test]
    fn table_report_is_kept_while_the_destination_is_unreachable() {
        let mut with_tables = observed(true, true);
        with_tables.tables = Some(vec![TableReport {
            name: "track".to_owned(),
            columns: 12,
            rows_last_hour: 5,
            rejected_last_hour: 1,
            last_load_time: Some("2024-05-01T10:00:00Z".to_owned()),
        }]);
        with_tables.report_time = Some("2024-05-01T10:01:00Z".to_owned());
        with_tables.refused_last_hour = Some(vec![RefusalReport {
            reason: "unauthorized".to_owned(),
            count: 3,
        }]);
        let first = status(&with_tables, None, "t1");
        let later = status(&observed(false, true), Some(&first), "t2");
        assert_eq!(later.tables, first.tables);
        assert_eq!(later.refused_last_hour, first.refused_last_hour);
        assert_eq!(later.report_time, first.report_time);
        assert_eq!(
            later.last_load_time.as_deref(),
            Some("2024-05-01T10:00:00Z")
        );
        let mut answered = observed(true, true);
        answered.refused_last_hour = Some(Vec::new());
        let fresh = status(&answered, Some(&first), "t3");
        assert!(
            fresh.refused_last_hour.is_empty(),
            "a destination that answers replaces the figures"
        );
    }

    fn table(name: &str, last_load_time: Option<&str>) -> TableReport {
        TableReport {
            name: name.to_owned(),
            columns: 10,
            rows_last_hour: 0,
            rejected_last_hour: 0,
            last_load_time: last_load_time.map(str::to_owned),
        }
    }

    #[test]
    fn last_load_is_the_latest_over_the_tables() {
        let mut observed = observed(true, true);
        observed.tables = Some(vec![
            table("identify", Some("2024-05-01T10:00:00Z")),
            table("page", None),
            table("track", Some("2024-05-01T09:59:59Z")),
        ]);
        let status = status(&observed, None, "t1");
        assert_eq!(
            status.last_load_time.as_deref(),
            Some("2024-05-01T10:00:00Z")
        );
        assert_eq!(latest_load(&[table("page", None)]), None);
    }

    #[test]
    fn figures_are_replaced_at_most_once_per_interval() {
        let minute = Duration::from_secs(60);
        let at = |time: &str| time.parse::<DateTime<Utc>>().expect("time");
        let reported = |time: Option<&str>| SegmentIntegrationStatus {
            report_time: time.map(str::to_owned),
            ..SegmentIntegrationStatus::default()
        };
        let now = at("2024-05-01T10:01:00Z");
        assert!(report_due(None, now, minute), "no status yet");
        assert!(
            report_due(Some(&reported(None)), now, minute),
            "no figures yet"
        );
        assert!(report_due(Some(&reported(Some("garbled"))), now, minute));
        let recent = reported(Some("2024-05-01T10:00:01Z"));
        assert!(!report_due(Some(&recent), now, minute));
        let a_minute_old = reported(Some("2024-05-01T10:00:00Z"));
        assert!(report_due(Some(&a_minute_old), now, minute));
        let from_the_future = reported(Some("2024-05-01T11:00:00Z"));
        assert!(
            report_due(Some(&from_the_future), now, minute),
            "a clock that went back does not freeze the figures"
        );
    }

    #[test]
    fn availability_follows_the_deployment_status() {
        let mut deployment = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        };
        assert_eq!(
            ingest_availability("shop-ingest", &deployment).reason,
            Reason::NoReplicasAvailable
        );
        deployment.status = Some(DeploymentStatus {
            available_replicas: Some(1),
            ..DeploymentStatus::default()
        });
        let available = ingest_availability("shop-ingest", &deployment);
        assert!(available.ok);
        assert!(available.message.contains("Deployment shop-ingest"));
        deployment.status = None;
        deployment.spec.as_mut().expect("spec").replicas = Some(0);
        assert_eq!(
            ingest_availability("shop-ingest", &deployment).reason,
            Reason::ScaledToZero
        );
    }

    #[test]
    fn events_follow_condition_changes_only() {
        let reasons = |events: Vec<Event>| {
            events
                .into_iter()
                .map(|e| (e.type_, e.reason, e.action))
                .collect::<Vec<_>>()
        };
        let first = status(&observed(false, true), None, "t1");
        assert_eq!(
            reasons(events(None, &first)),
            [
                (
                    EventType::Warning,
                    "SecretNotFound".to_owned(),
                    "EnsureSchema".to_owned()
                ),
                (
                    EventType::Normal,
                    "MinimumReplicasAvailable".to_owned(),
                    INGEST_AVAILABLE.to_owned()
                ),
            ]
        );
        let same = status(&observed(false, true), Some(&first), "t2");
        assert_eq!(reasons(events(Some(&first), &same)), []);
        let fixed = status(&observed(true, true), Some(&same), "t3");
        assert_eq!(
            reasons(events(Some(&same), &fixed)),
            [(
                EventType::Normal,
                "SchemaReady".to_owned(),
                SCHEMA_READY.to_owned()
            )]
        );
        let mut other_reason = observed(true, true);
        other_reason.schema_ready = Observation::failed(Reason::DatabaseUnavailable, "down");
        let down = status(&other_reason, Some(&fixed), "t4");
        let down_events = events(Some(&fixed), &down);
        assert_eq!(down_events.len(), 1);
        assert_eq!(down_events[0].note.as_deref(), Some("down"));
    }

    #[test]
    fn reasons_read_as_their_names() {
        assert_eq!(Reason::SchemaReady.to_string(), "SchemaReady");
        assert_eq!(Reason::InvalidDatabaseUrl.to_string(), "InvalidDatabaseUrl");
    }
}

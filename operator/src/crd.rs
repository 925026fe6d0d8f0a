//! The `SegmentIntegration` custom resource (`sluice.dev/v1alpha1`): what a team declares, and the
//! status the operator reports back.
//!
//! Validation lives in the generated CRD so that the API server enforces it for every client:
//! patterns, enums and bounds from the types below, and CEL rules for what a single field cannot
//! say (the schema is immutable, autoscaling bounds are ordered).

use std::collections::BTreeMap;

use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_ingest::event::Table;
use sluice_ingest::load::{OldRows, ResetRequest};
use sluice_ingest::schema::{SCHEMA_NAME_PATTERN, schema_name_from_display_name};
use sluice_ingest::selection::ColumnRules;

/// The message the API server answers with when an update changes, adds or removes
/// `spec.schema`.
pub const SCHEMA_IMMUTABLE_MESSAGE: &str =
    "spec.schema is immutable: it cannot be changed, added or removed after creation";

/// The message for changing `spec.displayName` of an integration whose schema is derived from it.
pub const DISPLAY_NAME_IMMUTABLE_MESSAGE: &str = "spec.displayName is immutable while spec.schema is not set, because the schema name is derived from it; set spec.schema when creating the resource to rename freely";

/// Declares one Segment integration: where its events land and how the ingest service runs.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "SegmentIntegration",
    plural = "segmentintegrations",
    shortname = "segint",
    namespaced,
    status = "SegmentIntegrationStatus",
    derive = "PartialEq",
    doc = "A Segment integration: an ingest service with a webhook URL, loading into a warehouse schema.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Schema","type":"string","jsonPath":".status.schema"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".status.webhookUrl"}"#,
    printcolumn = r#"{"name":"Last load","type":"date","jsonPath":".status.lastLoadTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.schema) == has(oldSelf.schema) && (!has(self.schema) || self.schema == oldSelf.schema)",
        "message": SCHEMA_IMMUTABLE_MESSAGE,
    },
    {
        "rule": "has(self.schema) || (has(self.displayName) == has(oldSelf.displayName) && (!has(self.displayName) || self.displayName == oldSelf.displayName))",
        "message": DISPLAY_NAME_IMMUTABLE_MESSAGE,
    },
    {
        // The rule on `versions` itself runs only while it exists: this one keeps it (and
        // `tableReset`) from being removed whole.
        "rule": "!has(oldSelf.tableReset) || !has(oldSelf.tableReset.versions) || size(oldSelf.tableReset.versions) == 0 || (has(self.tableReset) && has(self.tableReset.versions))",
        "message": TABLE_VERSION_DECREASE_MESSAGE,
    },
]))]
pub struct SegmentIntegrationSpec {
    /// Human name of the integration; the schema name is derived from it when `schema` is not
    /// set ("Stitch Segment" -> `stitch_segment`). Default: the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub display_name: Option<String>,

    /// Destination schema of the tables; immutable once the resource exists. Default: derived
    /// from `displayName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63), extend("pattern" = SCHEMA_NAME_PATTERN))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "!self.startsWith('pg_') && self != 'information_schema'",
        "message": "schema names starting with pg_ and information_schema are reserved by PostgreSQL",
    }]))]
    pub schema: Option<String>,

    /// The warehouse to load into.
    pub destination: Destination,

    /// Tables to load; events of other types are acknowledged and skipped.
    #[serde(default = "default_tables")]
    #[schemars(length(min = 1, max = 6), extend("x-kubernetes-list-type" = "set"))]
    pub tables: Vec<Table>,

    /// How the ingest service runs.
    #[serde(default)]
    pub ingest: IngestSpec,

    /// How Segment reaches the ingest service. A Service always exists.
    #[serde(default)]
    pub exposure: Exposure,

    /// Batching of the loader.
    #[serde(default)]
    pub loading: Loading,

    /// Column selection by table (`"*"`: every table; a table's rules add to those): key paths
    /// to exclude, to include only, to keep as one JSON value, to pseudonymize (with the
    /// `pseudonymizationKey` of the credentials Secret), and a column budget. Takes effect on
    /// the next rollout of the ingest; rows already loaded are never rewritten.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "column_selection_schema")]
    pub column_selection: BTreeMap<String, ColumnRules>,

    /// What happens to the schema and its rows when the resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Table-level reset: raise a table's version to empty it and start it again at that
    /// version, while the ingest keeps loading. The operator carries out each raise once.
    #[serde(default, skip_serializing_if = "TableResetSpec::is_empty")]
    pub table_reset: TableResetSpec,
}

/// `spec.tableReset`: the version each table should be at, and what a reset does with the rows
/// of the version it ends.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TableResetSpec {
    /// The version each table should be at, by table (`{track: 1}`). A table never reset is
    /// at version 0; when a value here is higher than the table's version in the warehouse,
    /// the operator resets the table to it, once (`sluice-ingest reset`). A version never
    /// decreases and a table once listed stays listed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "table_versions_schema")]
    pub versions: BTreeMap<String, i64>,
    /// What a reset does with the old rows: `Keep` them in a table named after their version
    /// (`track__v0`, the default) or `Drop` them.
    #[serde(default)]
    pub old_rows: OldRows,
}

/// The message the API server answers with when an update lowers or removes a table version.
pub const TABLE_VERSION_DECREASE_MESSAGE: &str = "spec.tableReset.versions: a table's version never decreases and a table once listed stays listed (a reset cannot be undone)";

impl TableResetSpec {
    /// Whether nothing is asked for (the field is then left out).
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.old_rows == OldRows::default()
    }
}

/// The schema of `spec.tableReset.versions`: a map of versions (at least 1) whose keys a CEL
/// rule limits to the tables, listed from [`Table::ALL`], and whose values never decrease.
fn table_versions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<BTreeMap<String, i64>>();
    let tables = Table::ALL.map(|t| format!("'{}'", t.name())).join(", ");
    schema.insert(
        "maxProperties".to_owned(),
        serde_json::json!(Table::ALL.len()),
    );
    schema.insert(
        "additionalProperties".to_owned(),
        serde_json::json!({"type": "integer", "format": "int64", "minimum": 1}),
    );
    schema.insert(
        "x-kubernetes-validations".to_owned(),
        serde_json::json!([
            {
                "rule": format!("self.all(k, k in [{tables}])"),
                "message": format!("tableReset.versions is keyed by table: {}", Table::names()),
            },
            {
                "rule": "oldSelf.all(k, k in self && self[k] >= oldSelf[k])",
                "message": TABLE_VERSION_DECREASE_MESSAGE,
            },
        ]),
    );
    schema
}

/// Where the warehouse is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// The Secret key (same namespace) holding `postgres://user:password@host:port/database`.
    pub url_secret_ref: SecretKeyRef,
}

/// A key of a Secret in the resource's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in the Secret's data.
    #[serde(default = "default_url_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_url_key() -> String {
    "url".to_owned()
}

/// The schema of `spec.columnSelection`: a map of [`ColumnRules`] whose keys a CEL rule limits to
/// `*` and the tables, listed from [`Table::ALL`].
fn column_selection_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<BTreeMap<String, ColumnRules>>();
    let tables = Table::ALL.map(|t| format!("'{}'", t.name())).join(", ");
    // A bound on the keys keeps the CEL rule's estimated cost within the API server's budget.
    schema.insert(
        "maxProperties".to_owned(),
        serde_json::json!(Table::ALL.len() + 1),
    );
    schema.insert(
        "x-kubernetes-validations".to_owned(),
        serde_json::json!([{
            "rule": format!("self.all(k, k == '*' || k in [{tables}])"),
            "message": format!(
                "columnSelection is keyed by \"*\" or a table: {}",
                Table::names()
            ),
        }]),
    );
    schema
}

fn default_tables() -> Vec<Table> {
    Table::DEFAULT.to_vec()
}

/// The ingest Deployment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngestSpec {
    /// Pods to run when autoscaling is not set.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// Container image of `sluice-ingest`. Default: the operator's `--ingest-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Requests and limits of the container, e.g. `{requests: {cpu: "100m", memory: "64Mi"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Horizontal pod autoscaling on CPU; replaces `replicas` when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Accept batches whose `X-Signature` signs only their first event, as Segment's Webhooks
    /// (Actions) destination signs them (`sluice-ingest --accept-first-event-signatures`).
    /// Off by default, and best left off: such a signature does not cover the other events, so
    /// whoever obtains one signed batch can append events to it and replay it, overwriting rows
    /// by `messageId`. For batched delivery send the API key in the `Authorization` header.
    #[serde(default)]
    pub accept_first_event_signatures: bool,
    /// Carry out Segment user deletion requests (`sluice-ingest --honour-deletes`): a `delete`
    /// event deletes every row of its `userId` from every event table, recorded in
    /// `_sdc_deletions`. Off by default: such events are refused with 501.
    #[serde(default)]
    pub honour_deletes: bool,
}

fn default_replicas() -> i32 {
    2
}

impl Default for IngestSpec {
    fn default() -> Self {
        IngestSpec {
            replicas: default_replicas(),
            image: None,
            resources: None,
            autoscaling: None,
            accept_first_event_signatures: false,
            honour_deletes: false,
        }
    }
}

/// Container resources, as quantities written as strings (`"250m"`, `"128Mi"`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Guaranteed resources by name (`cpu`, `memory`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Maximum resources by name (`cpu`, `memory`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// A HorizontalPodAutoscaler for the ingest Deployment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
}]))]
pub struct Autoscaling {
    /// Fewest pods.
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
    /// Most pods.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU use, in percent of the request, that the autoscaler aims for.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    #[serde(rename = "targetCPUUtilizationPercentage")]
    pub target_cpu_utilization_percentage: i32,
}

fn default_cpu_target() -> i32 {
    70
}

/// How the ingest service is reached from outside the cluster.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Exposure {
    /// An Ingress for the webhook; without it the webhook URL is the in-cluster Service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
}

/// The Ingress in front of the ingest Service.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Host name Segment posts to, e.g. `hooks.example.com`.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub host: String,
    /// IngressClass to use; default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Secret with the TLS certificate for `host`; without it TLS is left to the ingress
    /// controller's default certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// Annotations for the Ingress (e.g. for cert-manager or the controller).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Loader batching, passed to `sluice-ingest` as `--max-batch-rows` and `--max-batch-delay`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Loading {
    /// A batch commits once it holds this many rows.
    #[serde(default = "default_max_batch_rows")]
    #[schemars(range(min = 1, max = 100_000))]
    pub max_batch_rows: i32,
    /// How long a batch lingers for more events: `0`, up to `9999ms`, or up to `60s`.
    #[serde(default = "default_max_batch_delay")]
    #[schemars(regex(pattern = r"^(0|[0-9]{1,4}ms|([1-5]?[0-9]|60)s)$"))]
    pub max_batch_delay: String,
}

fn default_max_batch_rows() -> i32 {
    1000
}

fn default_max_batch_delay() -> String {
    "0ms".to_owned()
}

impl Default for Loading {
    fn default() -> Self {
        Loading {
            max_batch_rows: default_max_batch_rows(),
            max_batch_delay: default_max_batch_delay(),
        }
    }
}

/// What deleting the resource does to the warehouse.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Keep the schema and every row (the default).
    #[default]
    Retain,
    /// Drop the schema and every row in it.
    Drop,
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SegmentIntegrationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `SchemaReady` and `IngestAvailable`.
    #[serde(default)]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
    /// The schema the tables are in. Once set it stays, even when the spec does not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// The URL to paste into Segment's Webhooks destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// The Secret holding `sharedSecret` and `apiKey` for Segment's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// The loading report: each table of the schema, its columns and what was loaded into it,
    /// as of `reportTime`.
    #[serde(default)]
    pub tables: Vec<TableReport>,
    /// The latest `lastLoadTime` of `tables` (RFC 3339, UTC); absent while nothing was loaded.
    /// `kubectl get segmentintegrations` shows its age as `Last load`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_load_time: Option<String>,
    /// When `tables`, `lastLoadTime` and `refusedLastHour` were read from the warehouse
    /// (RFC 3339, UTC): at a reconcile (every 5 minutes at least), at most once per the
    /// operator's `--report-interval`; kept as they were while the warehouse does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_time: Option<String>,
    /// Requests the ingest refused in the hour before `reportTime`, by reason
    /// (`malformed_json`, `invalid_event`, `unauthorized`, `too_large`, ...), all replicas
    /// together; a reason with none is left out.
    #[serde(default)]
    pub refused_last_hour: Vec<RefusalReport>,
    /// Each table ever reset: its version and its latest reset, from the warehouse's
    /// `_sdc_table_versions`. A table not listed is at version 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"]
    ))]
    pub table_versions: Vec<TableVersionReport>,
}

/// A table's version and its latest reset.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TableVersionReport {
    /// The table's name.
    pub name: String,
    /// Its version: the `_sdc_table_version` of every row loaded since its latest reset.
    pub version: i64,
    /// When the latest reset committed (RFC 3339).
    pub reset_at: String,
    /// Where the rows of the version before are kept (`track__v0`); absent when they were
    /// dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_as: Option<String>,
    /// How many rows the version before held.
    pub previous_rows: i64,
}

/// A condition in the standard Kubernetes shape (`metav1.Condition`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `SchemaReady` or `IngestAvailable`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// A CamelCase word for programs.
    pub reason: String,
    /// A sentence for people: what is wrong and what to do.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A condition's status.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// Not known yet.
    Unknown,
}

/// One table of the loading report.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TableReport {
    /// The table's name.
    pub name: String,
    /// How many columns it has.
    pub columns: i64,
    /// Rows loaded into it in the hour before the status's `reportTime`, all replicas together:
    /// the sum of `rows_loaded` in `_sdc_loads` over the minutes that start at or after
    /// `reportTime` minus one hour (upserts, so a redelivered event counts again).
    #[serde(default)]
    pub rows_last_hour: i64,
    /// Records of this table the database refused in the same hour, set aside in
    /// `_sdc_rejected`: the sum of `rows_rejected` in `_sdc_loads` over the same minutes. The
    /// records themselves, of every hour, are in `_sdc_rejected`.
    #[serde(default)]
    pub rejected_last_hour: i64,
    /// The latest `_sdc_received_at` of any row ever loaded into it since its latest reset
    /// (`max(last_received_at)` in `_sdc_loads`; RFC 3339, UTC, whole seconds): when the most
    /// recent event loaded into it reached Sluice. Absent while nothing was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_load_time: Option<String>,
}

/// Refused requests of one reason.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RefusalReport {
    /// The reason code, as in the ingest's `sluice_requests_refused_total{reason}`.
    pub reason: String,
    /// How many requests.
    pub count: i64,
}

impl SegmentIntegration {
    /// The schema the integration loads into: `spec.schema`, else the one recorded in the
    /// status (so it never moves once chosen), else derived from the display name or the
    /// resource's name.
    pub fn schema_name(&self) -> String {
        if let Some(schema) = &self.spec.schema {
            return schema.clone();
        }
        if let Some(schema) = self.status.as_ref().and_then(|s| s.schema.clone()) {
            return schema;
        }
        let display = self
            .spec
            .display_name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default();
        schema_name_from_display_name(&display)
    }

    /// The resets `spec.tableReset.versions` asks for, in table order: each table to its version
    /// (the warehouse leaves a table already there as it is). A key that names no table is left
    /// out (the CRD refuses those).
    pub fn reset_requests(&self) -> Vec<ResetRequest> {
        self.spec
            .table_reset
            .versions
            .iter()
            .filter_map(|(name, version)| {
                Some(ResetRequest {
                    table: name.parse().ok()?,
                    version: Some(*version),
                })
            })
            .collect()
    }

    /// The selected tables as the loader names them, sorted and without duplicates.
    pub fn tables(&self) -> Vec<Table> {
        let mut tables = self.spec.tables.clone();
        tables.sort();
        tables.dedup();
        tables
    }
}

/// The CRD as YAML, as `sluice-operator crd` prints it and `crds/segmentintegration.yaml` holds
/// it.
pub fn crd_yaml() -> String {
    let crd = SegmentIntegration::crd();
    let yaml = serde_yaml_ng::to_string(&crd).expect("a CRD serializes to YAML");
    format!("# Generated by `cargo run -p sluice-operator -- crd`; do not edit by hand.\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(name: &str) -> SegmentIntegration {
        let spec: SegmentIntegrationSpec = serde_json::from_value(serde_json::json!({
            "destination": {"urlSecretRef": {"name": "warehouse"}}
        }))
        .expect("minimal spec");
        SegmentIntegration::new(name, spec)
    }

    #[test]
    fn committed_crd_matches_the_types() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/segmentintegration.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crd_yaml(),
            "crds/segmentintegration.yaml is stale: regenerate it with \
             `cargo run -p sluice-operator -- crd > crds/segmentintegration.yaml`"
        );
    }

    #[test]
    fn minimal_spec_takes_the_defaults() {
        let si = minimal("shop");
        assert_eq!(si.spec.ingest.replicas, 2);
        assert_eq!(si.tables(), Table::DEFAULT.to_vec());
        assert_eq!(si.spec.destination.url_secret_ref.key, "url");
        assert_eq!(si.spec.loading, Loading::default());
        assert_eq!(si.spec.deletion_policy, DeletionPolicy::Retain);
        assert!(!si.spec.ingest.accept_first_event_signatures);
        assert!(!si.spec.ingest.honour_deletes);
    }

    #[test]
    fn schema_is_derived_from_display_name_then_name_and_pinned_by_status() {
        let mut si = minimal("shop-events");
        assert_eq!(si.schema_name(), "shop_events");
        si.spec.display_name = Some("Stitch Segment".to_owned());
        assert_eq!(si.schema_name(), "stitch_segment");
        si.status = Some(SegmentIntegrationStatus {
            schema: Some("pinned".to_owned()),
            ..Default::default()
        });
        assert_eq!(si.schema_name(), "pinned");
        si.spec.schema = Some("explicit".to_owned());
        assert_eq!(si.schema_name(), "explicit");
    }

    #[test]
    fn table_versions_become_reset_requests_in_table_order() {
        let mut si = minimal("shop");
        assert!(si.reset_requests().is_empty());
        assert!(
            !serde_json::to_string(&si.spec)
                .expect("json")
                .contains("tableReset")
        );
        si.spec.table_reset.versions =
            BTreeMap::from([("track".to_owned(), 2), ("page".to_owned(), 1)]);
        assert_eq!(
            si.reset_requests(),
            [
                ResetRequest {
                    table: Table::Page,
                    version: Some(1)
                },
                ResetRequest {
                    table: Table::Track,
                    version: Some(2)
                },
            ]
        );
        assert_eq!(si.spec.table_reset.old_rows, OldRows::Keep);
    }

    #[test]
    fn crd_carries_validation_for_the_api_server() {
        let crd = serde_json::to_value(SegmentIntegration::crd()).expect("json");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let rules = spec["x-kubernetes-validations"].to_string();
        assert!(rules.contains(SCHEMA_IMMUTABLE_MESSAGE), "{rules}");
        assert!(
            rules.contains("has(self.tableReset) && has(self.tableReset.versions)"),
            "removing spec.tableReset.versions whole is refused: {rules}"
        );
        assert_eq!(
            spec["properties"]["schema"]["pattern"],
            serde_json::json!(SCHEMA_NAME_PATTERN)
        );
        let tables = &spec["properties"]["tables"]["items"]["enum"];
        assert_eq!(
            tables,
            &serde_json::json!(["alias", "group", "identify", "page", "screen", "track"])
        );
        assert_eq!(
            spec["properties"]["deletionPolicy"]["enum"],
            serde_json::json!(["Retain", "Drop"])
        );
    }
}

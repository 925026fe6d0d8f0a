//! The operator against a real API server and a real PostgreSQL: each test runs the
//! controller in-process, watching a namespace of the test's own, and checks what it made in the
//! API server and in the warehouse.
//!
//! No kubelet or controller manager runs here: Deployments get no pods (a test patches their
//! status as the controller manager would), and owner references are never garbage-collected
//! (deletion is proven through the operator's finalizer).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice_ingest::load::Warehouse;
use sluice_ingest::protocol::sign;
use sluice_operator::crd::{
    ConditionStatus, DISPLAY_NAME_IMMUTABLE_MESSAGE, RefusalReport, SCHEMA_IMMUTABLE_MESSAGE,
    TableReport,
};
use sluice_operator::leader::{self, Settings, Timing};
use sluice_operator::metrics::{self, Metrics};
use sluice_operator::{SegmentIntegration, controller};
use sluice_tests::ingest::{
    Backend, Destination, Process, Server, config as ingest_config, post_json,
};
use sluice_tests::kube::{
    TestNamespace, admin_client, api_status, eventually, eventually_gone, put_url_secret,
    restricted_client, restricted_user,
};
use sluice_tests::postgres::fresh_database;
use tokio::sync::oneshot;

mod support;
use support::{IMAGE, condition, integration, query_texts, report_pods_available, run_operator};

/// A namespace of the test's own with the CRD in place and the operator watching it. The
/// operator stops when this is dropped.
struct Harness {
    client: Client,
    namespace: String,
    metrics: Arc<Metrics>,
    _stop: oneshot::Sender<()>,
}

impl Harness {
    async fn start(prefix: &str) -> Harness {
        let client = admin_client().await.expect("admin client");
        let namespace = support::namespace(&client, prefix).await;
        Self::start_operator(client.clone(), client, namespace, prefix)
    }

    /// [`Harness::start`] with a fresh database (`label`) whose URL is in Secret `warehouse`;
    /// answers the URL too.
    async fn with_warehouse(prefix: &str, label: &str) -> (Harness, String) {
        let h = Harness::start(prefix).await;
        let url = fresh_database(label).await;
        h.put_url_secret("warehouse", &url).await;
        (h, url)
    }

    /// Runs the operator with `operator_client`; the test acts with `client`.
    fn start_operator(
        client: Client,
        operator_client: Client,
        namespace: String,
        prefix: &str,
    ) -> Harness {
        let metrics = Arc::new(Metrics::default());
        let stop = run_operator(
            operator_client,
            &namespace,
            &format!("test-{prefix}"),
            metrics.clone(),
        );
        Harness {
            client,
            namespace,
            metrics,
            _stop: stop,
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn integrations(&self) -> Api<SegmentIntegration> {
        self.api()
    }

    /// Creates (or replaces the value of) the Secret `name` with `url` under key `url`.
    async fn put_url_secret(&self, name: &str, url: &str) {
        put_url_secret(&self.client, &self.namespace, name, url)
            .await
            .expect("apply the warehouse Secret");
    }

    /// Creates a SegmentIntegration from the JSON of its spec.
    async fn create(&self, name: &str, spec: Value) -> SegmentIntegration {
        self.integrations()
            .create(&PostParams::default(), &integration(name, spec))
            .await
            .expect("create the SegmentIntegration")
    }

    /// Merge-patches the spec of `name`.
    async fn patch_spec(&self, name: &str, spec: Value) -> Result<SegmentIntegration, kube::Error> {
        self.integrations()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
    }

    /// Waits until the integration `name` has condition `type_` with `status`, and returns it.
    async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: ConditionStatus,
    ) -> SegmentIntegration {
        let api = self.integrations();
        eventually(&format!("{name} to have {type_}={status:?}"), || async {
            let si = api.get(name).await.ok()?;
            let found = condition(&si, type_)?;
            (found.status == status).then_some(si)
        })
        .await
    }
}

fn container(deployment: &Deployment) -> Container {
    deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .map(|pod| pod.containers[0].clone())
        .expect("a pod template with a container")
}

fn env_value(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn secret_value(secret: &Secret, key: &str) -> String {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .unwrap_or_else(|| panic!("key {key} in Secret {:?}", secret.metadata.name));
    String::from_utf8(bytes.0.clone()).expect("UTF-8")
}

/// The tables of `schema` in the database at `url`.
async fn tables_in(url: &str, schema: &str) -> Vec<String> {
    let warehouse = Warehouse::connect(url, schema, 1).expect("warehouse");
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
         ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(warehouse.postgres_pool().expect("postgres"))
    .await
    .expect("list tables")
}

fn spec_for(secret: &str) -> Value {
    json!({"destination": {"urlSecretRef": {"name": secret}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integration_provisions_credentials_deployment_service_schema_and_status() {
    let (h, url) = Harness::with_warehouse("provision", "operator_provision").await;
    h.create(
        "shop",
        json!({
            "displayName": "Shop Events",
            "destination": {"urlSecretRef": {"name": "warehouse"}},
            "loading": {"maxBatchRows": 500, "maxBatchDelay": "20ms"},
        }),
    )
    .await;

    let si = h
        .wait_condition("shop", "SchemaReady", ConditionStatus::True)
        .await;
    let uid = si.metadata.uid.clone().expect("uid");
    let status = si.status.clone().expect("status");
    assert_eq!(status.schema.as_deref(), Some("shop_events"));
    assert_eq!(status.observed_generation, si.metadata.generation);
    assert_eq!(
        status.credentials_secret.as_deref(),
        Some("shop-credentials")
    );
    assert_eq!(
        status.webhook_url,
        Some(format!(
            "http://shop-ingest.{}.svc.cluster.local/v1/webhook",
            h.namespace
        ))
    );
    let reported: Vec<&str> = status.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(reported, ["group", "identify", "page", "screen", "track"]);
    assert!(status.tables.iter().all(|t| t.columns > 5), "{status:?}");
    assert!(
        si.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.contains(&controller::FINALIZER.to_owned())),
        "the finalizer is in place"
    );
    // No pods run here, so the ingest is not available yet.
    let ingest = condition(&si, "IngestAvailable").expect("IngestAvailable");
    assert_eq!(ingest.status, ConditionStatus::False);
    assert_eq!(ingest.reason, "NoReplicasAvailable");
    let ready = condition(&si, "Ready").expect("Ready");
    assert_eq!(ready.status, ConditionStatus::False);
    assert_eq!(ready.reason, "IngestUnavailable");

    // The schema and its tables exist in PostgreSQL.
    assert_eq!(
        tables_in(&url, "shop_events").await,
        [
            "_sdc_columns",
            "_sdc_deletions",
            "_sdc_loads",
            "_sdc_ownership",
            "_sdc_refusals",
            "_sdc_rejected",
            "_sdc_table_versions",
            "group",
            "identify",
            "page",
            "screen",
            "track"
        ]
    );

    // Credentials: two random 64-hex-digit values, owned by the integration.
    let credentials = h
        .api::<Secret>()
        .get("shop-credentials")
        .await
        .expect("credentials Secret");
    let shared = secret_value(&credentials, "sharedSecret");
    let api_key = secret_value(&credentials, "apiKey");
    assert_eq!(shared.len(), 64);
    assert_eq!(api_key.len(), 64);
    assert_eq!(secret_value(&credentials, "pseudonymizationKey").len(), 64);
    assert_ne!(shared, api_key);
    let owner = &credentials
        .metadata
        .owner_references
        .clone()
        .expect("owner")[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (uid.as_str(), Some(true))
    );

    // The Deployment, owned by the integration and configured for it.
    let deployment = h
        .api::<Deployment>()
        .get("shop-ingest")
        .await
        .expect("ingest Deployment");
    let owner = &deployment.metadata.owner_references.clone().expect("owner")[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (uid.as_str(), Some(true))
    );
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let c = container(&deployment);
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    let env: Vec<(String, String)> = c
        .env
        .clone()
        .expect("env")
        .into_iter()
        .map(|e| {
            let value = match (e.value, e.value_from) {
                (Some(v), _) => v,
                (None, Some(from)) => {
                    let r = from.secret_key_ref.expect("a secretKeyRef");
                    format!("secret:{}/{}", r.name, r.key)
                }
                (None, None) => String::new(),
            };
            (e.name, value)
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("SLUICE_DATABASE_URL", "secret:warehouse/url"),
        (
            "SLUICE_SHARED_SECRET",
            "secret:shop-credentials/sharedSecret",
        ),
        ("SLUICE_API_KEY", "secret:shop-credentials/apiKey"),
        (
            "SLUICE_PSEUDONYMIZATION_KEY",
            "secret:shop-credentials/pseudonymizationKey",
        ),
        ("SLUICE_COLUMN_SELECTION", ""),
        ("SLUICE_SCHEMA", "shop_events"),
        ("SLUICE_TABLES", "group,identify,page,screen,track"),
        ("SLUICE_LISTEN", "0.0.0.0:8080"),
        ("SLUICE_MAX_BATCH_ROWS", "500"),
        ("SLUICE_MAX_BATCH_DELAY", "20ms"),
        ("SLUICE_ACCEPT_FIRST_EVENT_SIGNATURES", "false"),
        ("SLUICE_HONOUR_DELETES", "false"),
        ("SLUICE_INTEGRATION_UID", &uid),
        (
            "SLUICE_INTEGRATION_NAME",
            &format!("SegmentIntegration {}/shop", h.namespace),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(env, expected);
    // Probes, security context and the rest of the pod are the pure build step's, which
    // operator/src/build.rs tests; here what matters is that the applied object is wired to this
    // integration's real UID and Secrets.

    // The Service: port 80 to the container's http port, selecting the Deployment's pods.
    let service = h
        .api::<Service>()
        .get("shop-ingest")
        .await
        .expect("ingest Service");
    let spec = service.spec.expect("spec");
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.port, 80);
    assert_eq!(
        spec.selector,
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
    );

    // The controller manager reports pods available: IngestAvailable and Ready follow.
    report_pods_available(&h.api::<Deployment>(), "shop-ingest")
        .await
        .expect("patch the Deployment's status");
    let si = h
        .wait_condition("shop", "Ready", ConditionStatus::True)
        .await;
    let ingest = condition(&si, "IngestAvailable").expect("IngestAvailable");
    assert_eq!(ingest.status, ConditionStatus::True);
    assert_eq!(ingest.reason, "MinimumReplicasAvailable");

    // Events tell what happened, on the integration.
    let events = h.api::<Event>();
    eventually("Events about shop", || async {
        let reasons: Vec<String> = events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("shop"))
            .filter_map(|e| e.reason)
            .collect();
        [
            "CredentialsCreated",
            "SchemaReady",
            "MinimumReplicasAvailable",
        ]
        .iter()
        .all(|r| reasons.iter().any(|x| x == r))
        .then_some(())
    })
    .await;

    // The operator's /healthz and /metrics.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(metrics::serve(listener, h.metrics.clone()));
    let http = reqwest::Client::new();
    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    let reconciles: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sluice_operator_reconciles_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("a reconcile counter in {text}"));
    assert!(reconciles >= 2.0, "{text}");
    assert!(
        text.contains("sluice_operator_reconcile_duration_seconds_count"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_follow_the_spec_and_come_back_when_deleted() {
    let (h, _url) = Harness::with_warehouse("follow", "operator_follow").await;
    let mut spec = spec_for("warehouse");
    spec["exposure"] = json!({"ingress": {"host": "hooks.example.com", "className": "nginx"}});
    h.create("web", spec).await;
    let si = h
        .wait_condition("web", "SchemaReady", ConditionStatus::True)
        .await;
    assert_eq!(
        si.status.expect("status").webhook_url.as_deref(),
        Some("https://hooks.example.com/v1/webhook")
    );
    let ingresses = h.api::<Ingress>();
    let ingress = ingresses.get("web-ingest").await.expect("Ingress");
    let rule = &ingress.spec.expect("spec").rules.expect("rules")[0];
    assert_eq!(rule.host.as_deref(), Some("hooks.example.com"));
    let secrets = h.api::<Secret>();
    let credentials = secrets.get("web-credentials").await.expect("credentials");

    // Replicas and batch settings: the Deployment follows.
    h.patch_spec(
        "web",
        json!({"ingest": {"replicas": 3}, "loading": {"maxBatchRows": 50}}),
    )
    .await
    .expect("patch the spec");
    let deployments = h.api::<Deployment>();
    eventually(
        "the Deployment to have 3 replicas and 50 rows a batch",
        || async {
            let deployment = deployments.get("web-ingest").await.ok()?;
            let replicas = deployment.spec.as_ref()?.replicas;
            let rows = env_value(&container(&deployment), "SLUICE_MAX_BATCH_ROWS");
            (replicas == Some(3) && rows.as_deref() == Some("50")).then_some(())
        },
    )
    .await;

    // A child the integration controls but no longer desires (left by an older version, say)
    // is found by its label and deleted; one that merely carries the label is not ours.
    let services = h.api::<Service>();
    let mut stray = services.get("web-ingest").await.expect("Service");
    let mut foreign = stray.clone();
    for (service, name) in [(&mut stray, "web-stray"), (&mut foreign, "web-foreign")] {
        service.metadata = kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: service.metadata.labels.clone(),
            owner_references: service.metadata.owner_references.clone(),
            ..Default::default()
        };
        if let Some(spec) = service.spec.as_mut() {
            spec.cluster_ip = None;
            spec.cluster_ips = None;
        }
    }
    foreign.metadata.owner_references = None;
    for service in [&stray, &foreign] {
        services
            .create(&Default::default(), service)
            .await
            .expect("create a labelled Service");
    }

    // Without the ingress, the Ingress goes and the webhook URL is the Service's.
    h.patch_spec("web", json!({"exposure": {"ingress": null}}))
        .await
        .expect("remove the ingress");
    eventually_gone(&ingresses, "web-ingest").await;
    eventually_gone(&services, "web-stray").await;
    assert!(
        services
            .get_opt("web-foreign")
            .await
            .expect("get")
            .is_some(),
        "a Service not controlled by the integration stays"
    );
    let events = h.api::<Event>();
    eventually("an Event for each deleted child", || async {
        let notes: Vec<String> = events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("ChildDeleted"))
            .filter_map(|e| e.note)
            .collect();
        let deleted = |child: &str| notes.iter().any(|n| n.contains(child));
        (deleted("Ingress/web-ingest") && deleted("Service/web-stray")).then_some(())
    })
    .await;
    let integrations = h.integrations();
    let expected_url = format!(
        "http://web-ingest.{}.svc.cluster.local/v1/webhook",
        h.namespace
    );
    eventually("the webhook URL to be the Service's", || async {
        let si = integrations.get("web").await.ok()?;
        (si.status?.webhook_url? == expected_url).then_some(())
    })
    .await;

    // A Deployment deleted by hand comes back.
    let before = deployments.get("web-ingest").await.expect("Deployment");
    deployments
        .delete("web-ingest", &DeleteParams::default())
        .await
        .expect("delete the Deployment");
    eventually("the Deployment to be re-created", || async {
        let after = deployments.get_opt("web-ingest").await.ok()??;
        (after.metadata.uid != before.metadata.uid).then_some(())
    })
    .await;

    // Through all of it the credentials stayed the same.
    let after = secrets.get("web-credentials").await.expect("credentials");
    assert_eq!(after.data, credentials.data);
    assert_eq!(after.metadata.uid, credentials.metadata.uid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_rejects_schema_changes_and_invalid_values() {
    let h = Harness::start("cel").await;
    let untyped = Api::<DynamicObject>::namespaced_with(
        h.client.clone(),
        &h.namespace,
        &ApiResource::erase::<SegmentIntegration>(&()),
    );
    let mut spec = spec_for("warehouse");
    spec["schema"] = json!("analytics");
    h.create("fixed", spec).await;

    for (change, what) in [
        (json!({"schema": "marketing"}), "changing"),
        (json!({"schema": null}), "removing"),
    ] {
        let status = api_status(h.patch_spec("fixed", change).await);
        assert_eq!(status.code, 422, "{what} the schema: {status:?}");
        assert!(
            status.message.contains(SCHEMA_IMMUTABLE_MESSAGE),
            "{what} the schema: {status:?}"
        );
    }
    h.create("derived", spec_for("warehouse")).await;
    let status = api_status(h.patch_spec("derived", json!({"schema": "late"})).await);
    assert!(
        status.message.contains(SCHEMA_IMMUTABLE_MESSAGE),
        "adding a schema: {status:?}"
    );
    let status = api_status(
        h.patch_spec("derived", json!({"displayName": "Renamed"}))
            .await,
    );
    assert!(
        status.message.contains(DISPLAY_NAME_IMMUTABLE_MESSAGE),
        "renaming while the schema is derived: {status:?}"
    );
    // Other fields may change.
    h.patch_spec("fixed", json!({"ingest": {"replicas": 4}}))
        .await
        .expect("changing replicas is allowed");

    let invalid = [
        (json!({"schema": "Bad-Name"}), "spec.schema"),
        (json!({"schema": "pg_catalog"}), "reserved by PostgreSQL"),
        (json!({"tables": ["track", "orders"]}), "spec.tables[1]"),
        (json!({"deletionPolicy": "Delete"}), "spec.deletionPolicy"),
        (
            json!({"ingest": {"replicas": 1000}}),
            "spec.ingest.replicas",
        ),
        (
            json!({"ingest": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}),
            "minReplicas must not exceed",
        ),
        (
            json!({"loading": {"maxBatchRows": 0}}),
            "spec.loading.maxBatchRows",
        ),
        (
            json!({"loading": {"maxBatchDelay": "2h"}}),
            "spec.loading.maxBatchDelay",
        ),
        (
            json!({"columnSelection": {"orders": {"exclude": ["context.ip"]}}}),
            "columnSelection is keyed by",
        ),
        (
            json!({"columnSelection": {"track": {"maxColumns": 5000}}}),
            "maxColumns",
        ),
    ];
    for (i, (extra, expected)) in invalid.into_iter().enumerate() {
        let mut spec = spec_for("warehouse");
        for (k, v) in extra.as_object().expect("object") {
            spec[k] = v.clone();
        }
        // Untyped, since the Rust types cannot even hold some of these values.
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "SegmentIntegration",
            "metadata": {"name": format!("invalid-{i}")},
            "spec": spec,
        }))
        .expect("an object");
        let status = api_status(untyped.create(&PostParams::default(), &object).await);
        assert_eq!(status.code, 422, "{spec}: {status:?}");
        assert!(status.message.contains(expected), "{spec}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_and_bad_database_show_in_conditions_and_recover() {
    let h = Harness::start("recover").await;
    h.create("late", spec_for("warehouse")).await;
    let si = h
        .wait_condition("late", "SchemaReady", ConditionStatus::False)
        .await;
    let schema_ready = condition(&si, "SchemaReady").expect("SchemaReady");
    assert_eq!(schema_ready.reason, "SecretNotFound");
    assert!(
        schema_ready.message.contains("warehouse"),
        "{schema_ready:?}"
    );
    assert_eq!(
        condition(&si, "Ready").expect("Ready").reason,
        "SchemaNotReady"
    );
    // What does not depend on the warehouse is in place already.
    h.api::<Deployment>()
        .get("late-ingest")
        .await
        .expect("the Deployment exists without the warehouse");
    h.api::<Secret>()
        .get("late-credentials")
        .await
        .expect("the credentials exist without the warehouse");

    // A URL nothing answers on: DatabaseUnavailable.
    h.put_url_secret("warehouse", "postgres://sluice:pw@127.0.0.1:1/none")
        .await;
    let api = h.integrations();
    let si = eventually("SchemaReady to say DatabaseUnavailable", || async {
        let si = api.get("late").await.ok()?;
        (condition(&si, "SchemaReady")?.reason == "DatabaseUnavailable").then_some(si)
    })
    .await;
    let message = condition(&si, "SchemaReady").expect("SchemaReady").message;
    assert!(!message.contains("sluice:pw"), "no password in {message}");

    // Fixed: the schema is created.
    let url = fresh_database("operator_recover").await;
    h.put_url_secret("warehouse", &url).await;
    h.wait_condition("late", "SchemaReady", ConditionStatus::True)
        .await;
    assert!(tables_in(&url, "late").await.contains(&"track".to_owned()));
}

/// Creates an integration with `policy`, loads a row into its schema, deletes it, and returns
/// the database URL once the resource is gone.
async fn delete_with_policy(h: &Harness, name: &str, policy: &str) -> String {
    let url = fresh_database(&format!("operator_{name}")).await;
    h.put_url_secret("warehouse", &url).await;
    let mut spec = spec_for("warehouse");
    spec["schema"] = json!(name);
    spec["deletionPolicy"] = json!(policy);
    h.create(name, spec).await;
    h.wait_condition(name, "SchemaReady", ConditionStatus::True)
        .await;
    let warehouse = Warehouse::connect(&url, name, 1).expect("warehouse");
    let pool = warehouse.postgres_pool().expect("postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{name}\".track (message_id, event) VALUES ('m-1', 'Kept')"
    )))
    .execute(pool)
    .await
    .expect("insert a row");

    let api = h.integrations();
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete the SegmentIntegration");
    eventually(&format!("{name} to be gone"), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_with_drop_drops_the_schema_and_removes_the_finalizer() {
    let h = Harness::start("drop").await;
    let url = delete_with_policy(&h, "dropped", "Drop").await;
    assert_eq!(tables_in(&url, "dropped").await, Vec::<String>::new());
    let warehouse = Warehouse::connect(&url, "dropped", 1).expect("warehouse");
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'dropped'",
    )
    .fetch_one(warehouse.postgres_pool().expect("postgres"))
    .await
    .expect("count schemas");
    assert_eq!(schemas, 0, "the schema is dropped");
}

async fn schema_exists(url: &str, schema: &str) -> bool {
    !query_texts(
        url,
        &format!("SELECT nspname::text FROM pg_namespace WHERE nspname = '{schema}'"),
    )
    .await
    .is_empty()
}

/// Deletes the integration `name` and waits until it is gone (its finalizer has run).
async fn delete_and_wait(h: &Harness, name: &str) {
    let api = h.integrations();
    api.delete(name, &DeleteParams::default())
        .await
        .expect("delete the SegmentIntegration");
    eventually(&format!("{name} to be gone"), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// `deletionPolicy: Drop` on schemas that hold what users made: a schema that existed before
/// (`public`, with a team's table) is adopted and never dropped; in a schema Sluice created, a
/// table the user added later survives, and so does the schema. Only Sluice's tables go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_removes_only_what_sluice_created() {
    let (h, url) = Harness::with_warehouse("drop-owned", "operator_drop_owned").await;
    sluice_tests::postgres::run_as_admin(
        &url,
        "CREATE TABLE public.orders (id int PRIMARY KEY); INSERT INTO public.orders VALUES (7)",
    )
    .await;
    for (name, schema) in [("adopter", "public"), ("creator", "fresh_events")] {
        let mut spec = spec_for("warehouse");
        spec["schema"] = json!(schema);
        spec["deletionPolicy"] = json!("Drop");
        h.create(name, spec).await;
    }
    let adopter = h
        .wait_condition("adopter", "SchemaReady", ConditionStatus::True)
        .await;
    let message = condition(&adopter, "SchemaReady")
        .expect("SchemaReady")
        .message;
    assert!(message.contains("existed before"), "{message}");
    let creator = h
        .wait_condition("creator", "SchemaReady", ConditionStatus::True)
        .await;
    let message = condition(&creator, "SchemaReady")
        .expect("SchemaReady")
        .message;
    assert!(message.contains("created by Sluice"), "{message}");
    // What the ownership table says about the adopted schema.
    let claim = query_texts(
        &url,
        "SELECT object_type || ':' || object_name || ':' || created FROM public._sdc_ownership \
         ORDER BY 1",
    )
    .await;
    assert_eq!(
        claim,
        [
            "schema:public:false",
            "table:_sdc_columns:true",
            "table:_sdc_deletions:true",
            "table:_sdc_loads:true",
            "table:_sdc_ownership:true",
            "table:_sdc_refusals:true",
            "table:_sdc_rejected:true",
            "table:_sdc_table_versions:true",
            "table:group:true",
            "table:identify:true",
            "table:page:true",
            "table:screen:true",
            "table:track:true",
        ]
    );
    // A user's table in the schema Sluice created, after the fact.
    sluice_tests::postgres::run_as_admin(
        &url,
        "CREATE TABLE fresh_events.dbt_model (x int); INSERT INTO fresh_events.dbt_model VALUES (1)",
    )
    .await;

    delete_and_wait(&h, "adopter").await;
    delete_and_wait(&h, "creator").await;

    assert_eq!(tables_in(&url, "public").await, ["orders"]);
    assert_eq!(
        query_texts(&url, "SELECT id::text FROM public.orders").await,
        ["7"]
    );
    assert_eq!(tables_in(&url, "fresh_events").await, ["dbt_model"]);
    assert_eq!(
        query_texts(&url, "SELECT x::text FROM fresh_events.dbt_model").await,
        ["1"]
    );
    // The Event says what was kept and why.
    let notes: Vec<String> = h
        .api::<Event>()
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("TablesDropped"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("kept schema public") && n.contains("existed before")),
        "{notes:?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("kept schema fresh_events")
            && n.contains("objects Sluice did not create")),
        "{notes:?}"
    );
}

/// Two integrations naming one schema: the second is refused with `SchemaClaimed` instead of
/// sharing it, and deleting it with `Drop` leaves the first one's tables and rows alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_integration_on_a_claimed_schema_is_refused() {
    let (h, url) = Harness::with_warehouse("claimed", "operator_claimed").await;
    let mut spec = spec_for("warehouse");
    spec["schema"] = json!("shared");
    spec["deletionPolicy"] = json!("Drop");
    let first = h.create("first", spec.clone()).await;
    h.wait_condition("first", "SchemaReady", ConditionStatus::True)
        .await;
    sluice_tests::postgres::run_as_admin(
        &url,
        "INSERT INTO shared.track (message_id, event) VALUES ('m-1', 'Kept')",
    )
    .await;

    h.create("second", spec).await;
    let second = h
        .wait_condition("second", "SchemaReady", ConditionStatus::False)
        .await;
    let refused = condition(&second, "SchemaReady").expect("SchemaReady");
    assert_eq!(refused.reason, "SchemaClaimed");
    let first_uid = first.metadata.uid.clone().expect("uid");
    assert!(
        refused.message.contains(&format!(
            "already used by SegmentIntegration {}/first (uid {first_uid})",
            h.namespace
        )),
        "{}",
        refused.message
    );
    let ready = condition(&second, "Ready").expect("Ready");
    assert_eq!(ready.status, ConditionStatus::False);
    assert_eq!(ready.message, refused.message);

    delete_and_wait(&h, "second").await;
    assert_eq!(
        query_texts(&url, "SELECT event FROM shared.track").await,
        ["Kept"],
        "deleting the refused integration dropped nothing"
    );
    let still = h
        .wait_condition("first", "SchemaReady", ConditionStatus::True)
        .await;
    assert_eq!(still.metadata.uid, first.metadata.uid);

    // The owner's Drop then removes the schema it created, which holds nothing else.
    delete_and_wait(&h, "first").await;
    assert!(!schema_exists(&url, "shared").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_with_retain_keeps_every_row() {
    let h = Harness::start("retain").await;
    let url = delete_with_policy(&h, "kept", "Retain").await;
    let warehouse = Warehouse::connect(&url, "kept", 1).expect("warehouse");
    let events: Vec<String> = sqlx::query_scalar("SELECT event FROM kept.track")
        .fetch_all(warehouse.postgres_pool().expect("postgres"))
        .await
        .expect("select rows");
    assert_eq!(events, ["Kept"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_started_as_the_deployment_says_loads_a_signed_webhook() {
    let (h, url) = Harness::with_warehouse("wiring", "operator_wiring").await;
    let mut spec = spec_for("warehouse");
    spec["displayName"] = json!("Stitch Segment");
    spec["tables"] = json!(["track", "identify"]);
    h.create("wired", spec).await;
    h.wait_condition("wired", "SchemaReady", ConditionStatus::True)
        .await;

    // The container exactly as the operator declared it, Secret references resolved.
    let deployment = h
        .api::<Deployment>()
        .get("wired-ingest")
        .await
        .expect("Deployment");
    let c = container(&deployment);
    assert_eq!(c.command, Some(vec!["sluice-ingest".to_owned()]));
    let args = c.args.clone().unwrap_or_default();
    let secrets = h.api::<Secret>();
    let mut env = Vec::new();
    for var in c.env.clone().expect("env") {
        let value = match (var.value, var.value_from) {
            (Some(value), _) => value,
            (None, Some(from)) => {
                let selector = from.secret_key_ref.expect("secretKeyRef");
                let secret = secrets
                    .get(&selector.name)
                    .await
                    .expect("referenced Secret");
                secret_value(&secret, &selector.key)
            }
            (None, None) => String::new(),
        };
        env.push((var.name, value));
    }
    // The pod listens on 0.0.0.0:8080; here the process takes a free loopback port instead.
    let listen = env.iter().position(|(k, _)| k == "SLUICE_LISTEN");
    let listen = env.remove(listen.expect("SLUICE_LISTEN is set"));
    assert_eq!(listen.1, "0.0.0.0:8080");
    let shared_secret = env
        .iter()
        .find(|(k, _)| k == "SLUICE_SHARED_SECRET")
        .map(|(_, v)| v.clone())
        .expect("shared secret");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let process = Process::spawn(&args, &env_refs).await;

    let body = serde_json::to_vec(&json!({
        "type": "track", "messageId": "op-1", "userId": "u-1", "event": "Order Completed",
        "timestamp": "2024-05-01T10:00:00.000Z", "properties": {"revenue": 19.99}
    }))
    .expect("JSON");
    let http = reqwest::Client::new();
    let unsigned = http
        .post(process.url("/v1/webhook"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(unsigned.status(), 401, "credentials are required");
    let signed = http
        .post(process.url("/v1/webhook"))
        .header("content-type", "application/json")
        .header("x-signature", sign(shared_secret.as_bytes(), &body))
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(signed.status(), 200, "{:?}", signed.text().await);

    // Batches: a signature of the first event only is refused (the spec does not accept it);
    // the API key, as Segment's Actions destination can send it, covers the whole batch.
    let first = json!({
        "type": "track", "messageId": "op-2", "userId": "u-1", "event": "Batched",
        "timestamp": "2024-05-01T10:00:00.000Z"
    })
    .to_string();
    let batch = format!("[{first}]");
    let first_signed = http
        .post(process.url("/v1/webhook"))
        .header(
            "x-signature",
            sign(shared_secret.as_bytes(), first.as_bytes()),
        )
        .body(batch.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(first_signed.status(), 401);
    let api_key = env
        .iter()
        .find(|(k, _)| k == "SLUICE_API_KEY")
        .map(|(_, v)| v.clone())
        .expect("API key");
    let keyed = http
        .post(process.url("/v1/webhook"))
        .basic_auth(api_key, Some(""))
        .body(batch)
        .send()
        .await
        .expect("request");
    assert_eq!(keyed.status(), 200, "{:?}", keyed.text().await);

    let warehouse = Warehouse::connect(&url, "stitch_segment", 1).expect("warehouse");
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT message_id, event FROM stitch_segment.track ORDER BY 1")
            .fetch_all(warehouse.postgres_pool().expect("postgres"))
            .await
            .expect("select rows");
    assert_eq!(
        rows,
        [
            ("op-1".to_owned(), "Order Completed".to_owned()),
            ("op-2".to_owned(), "Batched".to_owned())
        ]
    );
    // Only the selected tables were created.
    assert_eq!(
        tables_in(&url, "stitch_segment").await,
        [
            "_sdc_columns",
            "_sdc_deletions",
            "_sdc_loads",
            "_sdc_ownership",
            "_sdc_refusals",
            "_sdc_rejected",
            "_sdc_table_versions",
            "identify",
            "track"
        ]
    );
    process.terminate();
    assert!(process.wait().await, "sluice-ingest exits 0 on SIGTERM");

    // The two refused requests (401) were added to _sdc_refusals (at the latest at shutdown);
    // the next reconcile, here caused by an annotation, reports them in the status.
    h.integrations()
        .patch(
            "wired",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"sluice.dev/test-nudge": "1"}}})),
        )
        .await
        .expect("annotate");
    let api = h.integrations();
    let refused = eventually("the status to report the refused requests", || async {
        let si = api.get("wired").await.ok()?;
        let refused = si.status?.refused_last_hour;
        (!refused.is_empty()).then_some(refused)
    })
    .await;
    assert_eq!(
        refused,
        [RefusalReport {
            reason: "unauthorized".to_owned(),
            count: 2
        }]
    );
}

/// What the tables of `schema` hold, as the status reports each of `tables`: its columns, its
/// rows and the records of it in `_sdc_rejected` (all loaded in the last hour), and the latest
/// `_sdc_received_at` in whole seconds.
async fn table_reports_from_the_tables(
    url: &str,
    schema: &str,
    tables: &[&str],
) -> Vec<TableReport> {
    let warehouse = Warehouse::connect(url, schema, 1).expect("warehouse");
    let pool = warehouse.postgres_pool().expect("postgres");
    let mut reports = Vec::new();
    for name in tables {
        let columns: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2",
        )
        .bind(schema)
        .bind(name)
        .fetch_one(pool)
        .await
        .expect("count columns");
        let table = sluice_ingest::schema::qualified(schema, name);
        let (rows, last): (i64, Option<chrono::DateTime<chrono::Utc>>) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*), max(_sdc_received_at) FROM {table}"
            )))
            .fetch_one(pool)
            .await
            .expect("count rows");
        let rejected_in = sluice_ingest::schema::qualified(schema, "_sdc_rejected");
        let rejected: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {rejected_in} WHERE table_name = $1"
        )))
        .bind(name)
        .fetch_one(pool)
        .await
        .expect("count rejected");
        reports.push(TableReport {
            name: (*name).to_owned(),
            columns,
            rows_last_hour: rows,
            rejected_last_hour: rejected,
            last_load_time: last.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        });
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_per_table_what_was_loaded_and_when() {
    let (h, url) = Harness::with_warehouse("loads", "operator_loads").await;
    let schema = "shop_loads";
    let tables = ["identify", "page", "track"];
    let mut spec = spec_for("warehouse");
    spec["schema"] = json!(schema);
    spec["tables"] = json!(tables);
    h.create("shop", spec).await;
    let si = h
        .wait_condition("shop", "SchemaReady", ConditionStatus::True)
        .await;

    // `kubectl get segmentintegrations` shows the age of the last load.
    let crd = Api::<CustomResourceDefinition>::all(h.client.clone())
        .get("segmentintegrations.sluice.dev")
        .await
        .expect("the CRD");
    let printed = crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default();
    let last_load = printed
        .iter()
        .find(|c| c.name == "Last load")
        .unwrap_or_else(|| panic!("a Last load column in {printed:?}"));
    assert_eq!(
        (last_load.type_.as_str(), last_load.json_path.as_str()),
        ("date", ".status.lastLoadTime")
    );

    // Nothing loaded yet: every table at zero, no last load.
    let status = si.status.expect("status");
    assert_eq!(
        status.tables,
        table_reports_from_the_tables(&url, schema, &tables).await
    );
    assert!(status.tables.iter().all(|t| t.last_load_time.is_none()));
    assert_eq!(status.last_load_time, None);
    assert!(status.report_time.is_some());

    // An ingest on the integration's schema loads tracks and an identify; the database refuses
    // one track, which goes to _sdc_rejected.
    Destination::existing(Backend::Postgres, &url)
        .forbid_track_event_forbidden(schema)
        .await;
    let ingest = Server::start(ingest_config(
        &url,
        &["--schema", schema, "--tables", "identify,page,track"],
    ))
    .await;
    let track = |id: &str, event: &str| {
        json!({"type": "track", "messageId": id, "userId": "u-1", "event": event,
               "properties": {"revenue": 19.99}})
    };
    let (code, answer) = post_json(
        &ingest.url("/v1/webhook"),
        &json!([
            track("t-1", "Order Completed"),
            track("t-2", "Product Viewed"),
            track("t-3", "Forbidden"),
            {"type": "identify", "messageId": "i-1", "userId": "u-1", "traits": {"plan": "pro"}},
        ]),
    )
    .await;
    assert_eq!(
        (code, &answer["loaded"], &answer["rejected"]),
        (200, &json!(3), &json!(1))
    );
    let (code, _) = post_json(&ingest.url("/v1/webhook"), &track("t-4", "Order Completed")).await;
    assert_eq!(code, 200);
    ingest.stop().await;

    // The next reconcile (here caused by an annotation) reports what the tables hold.
    let expected = table_reports_from_the_tables(&url, schema, &tables).await;
    assert_eq!(
        expected
            .iter()
            .map(|t| (t.name.as_str(), t.rows_last_hour, t.rejected_last_hour))
            .collect::<Vec<_>>(),
        [("identify", 1, 0), ("page", 0, 0), ("track", 3, 1)]
    );
    h.integrations()
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"sluice.dev/test-nudge": "1"}}})),
        )
        .await
        .expect("annotate");
    let api = h.integrations();
    let status = eventually("the status to report the loads", || async {
        let status = api.get("shop").await.ok()?.status?;
        (status.tables == expected).then_some(status)
    })
    .await;
    let latest = expected
        .iter()
        .filter_map(|t| t.last_load_time.clone())
        .max();
    assert!(latest.is_some());
    assert_eq!(status.last_load_time, latest);
    let reported: chrono::DateTime<chrono::Utc> = status
        .report_time
        .as_deref()
        .and_then(|t| t.parse().ok())
        .expect("an RFC 3339 report time");
    assert!(Some(reported.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)) >= latest);
}

/// Leader election timing for tests: short, in client-go's proportions.
fn short_timing() -> Timing {
    Timing::new(
        Duration::from_secs(3),
        Duration::from_secs(2),
        Duration::from_millis(500),
    )
    .expect("valid timing")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_lease_is_held_by_one_replica_at_a_time() {
    let client = admin_client().await.expect("admin client");
    let namespace = TestNamespace::create(&client, "lease")
        .await
        .expect("test namespace");
    let settings = |identity: &str| Settings {
        namespace: namespace.name().to_owned(),
        name: "sluice-operator".to_owned(),
        identity: identity.to_owned(),
        timing: short_timing(),
    };
    let first = leader::acquire(client.clone(), settings("first")).await;
    let waiting = tokio::spawn(leader::acquire(client.clone(), settings("second")));
    // Several renewal periods pass: the second replica keeps waiting.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !waiting.is_finished(),
        "the second replica waits while the first renews"
    );
    let leases = Api::<Lease>::namespaced(client.clone(), namespace.name());
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity);
    assert_eq!(
        holder(leases.get("sluice-operator").await.expect("Lease")).as_deref(),
        Some("first")
    );

    // Released: the second takes over at once.
    first.release().await;
    let second = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the second replica takes over")
        .expect("task");
    let lease = leases.get("sluice-operator").await.expect("Lease");
    assert_eq!(holder(lease.clone()).as_deref(), Some("second"));
    assert_eq!(lease.spec.and_then(|s| s.lease_transitions), Some(1));

    // A holder that stops renewing (a crashed pod) loses the Lease once it expires.
    drop(second);
    let third = tokio::time::timeout(
        Duration::from_secs(15),
        leader::acquire(client.clone(), settings("third")),
    )
    .await
    .expect("the third replica takes over an expired Lease");
    assert_eq!(
        holder(leases.get("sluice-operator").await.expect("Lease")).as_deref(),
        Some("third")
    );
    third.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_needs_no_more_than_its_rbac_rules() {
    let admin = admin_client().await.expect("admin client");
    let namespace = support::namespace(&admin, "rbac").await;
    // A ClusterRole with exactly the operator's rules, bound in this namespace only, to the
    // identity that has no other rights.
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some("sluice-operator-rbac-test".to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(sluice_operator::rbac::rules()),
        ..ClusterRole::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .patch(
            "sluice-operator-rbac-test",
            &PatchParams::apply("sluice-tests").force(),
            &Patch::Apply(role),
        )
        .await
        .expect("apply the ClusterRole");
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("sluice-operator".to_owned()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "ClusterRole".to_owned(),
            name: "sluice-operator-rbac-test".to_owned(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "User".to_owned(),
            name: restricted_user().expect("restricted user"),
            namespace: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), &namespace)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the RoleBinding");
    let restricted = restricted_client().await.expect("restricted client");
    // The authorizer sees new bindings shortly after they are made.
    let probe = Api::<SegmentIntegration>::namespaced(restricted.clone(), &namespace);
    eventually("the RoleBinding to take effect", || async {
        probe.list(&Default::default()).await.ok().map(|_| ())
    })
    .await;

    let h = Harness::start_operator(admin, restricted.clone(), namespace.clone(), "rbac");
    let url = fresh_database("operator_rbac").await;
    h.put_url_secret("warehouse", &url).await;
    let mut spec = spec_for("warehouse");
    spec["deletionPolicy"] = json!("Drop");
    spec["exposure"] = json!({"ingress": {"host": "hooks.example.com"}});
    spec["ingest"] = json!({"autoscaling": {"minReplicas": 1, "maxReplicas": 3}});
    h.create("limited", spec).await;
    h.wait_condition("limited", "SchemaReady", ConditionStatus::True)
        .await;
    h.api::<Deployment>()
        .get("limited-ingest")
        .await
        .expect("Deployment");
    h.api::<Ingress>()
        .get("limited-ingest")
        .await
        .expect("Ingress");
    let events = h.api::<Event>();
    eventually("an Event from the restricted operator", || async {
        (!events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty())
        .then_some(())
    })
    .await;
    h.patch_spec("limited", json!({"exposure": {"ingress": null}}))
        .await
        .expect("remove the ingress");
    let ingresses = h.api::<Ingress>();
    eventually_gone(&ingresses, "limited-ingest").await;
    let api = h.integrations();
    api.delete("limited", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the integration to be gone", || async {
        api.get_opt("limited").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(tables_in(&url, "limited").await, Vec::<String>::new());

    // Leader election with the same rights.
    let leadership = tokio::time::timeout(
        Duration::from_secs(10),
        leader::acquire(
            restricted,
            Settings {
                namespace,
                name: "sluice-operator".to_owned(),
                identity: "restricted".to_owned(),
                timing: short_timing(),
            },
        ),
    )
    .await
    .expect("the restricted identity takes the Lease");
    leadership.release().await;
}

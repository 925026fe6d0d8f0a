//! What the operator's integration tests (operator.rs, operator_resets.rs, chart.rs, leader.rs,
//! operator_faults.rs) share: a namespace with the CRD, the operator running in-process on it,
//! reading an integration's conditions, and querying the warehouse. Each test binary uses part
//! of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::{Value, json};
use sluice_operator::crd::{Condition, ConditionStatus};
use sluice_operator::metrics::Metrics;
use sluice_operator::{SegmentIntegration, controller};
use sluice_tests::kube::namespace_with_crd;
use tokio::sync::oneshot;

/// The image the test operator puts in Deployments (nothing pulls it here).
pub const IMAGE: &str = "sluice-ingest:test";

/// A namespace of the test's own, with the SegmentIntegration CRD applied for real.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    namespace_with_crd(client, &SegmentIntegration::crd(), prefix)
        .await
        .expect("the SegmentIntegration CRD is Established and the namespace created")
        .name()
        .to_owned()
}

/// The operator's `--report-interval` in tests: short, so that a test sees new loading figures
/// within seconds.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the operator in-process with `client` on `namespace`, as replica `instance`, counting
/// into `metrics`; it stops when the returned sender is dropped.
pub fn run_operator(
    client: Client,
    namespace: &str,
    instance: &str,
    metrics: Arc<Metrics>,
) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    let config = controller::Config {
        namespace: Some(namespace.to_owned()),
        ingest_image: IMAGE.to_owned(),
        instance: Some(instance.to_owned()),
        concurrency: 4,
        report_interval: REPORT_INTERVAL,
    };
    tokio::spawn(controller::run(client, config, metrics, async move {
        let _ = stopped.await;
    }));
    stop
}

/// A SegmentIntegration named `name` with the spec `spec` (JSON, as a user writes it).
pub fn integration(name: &str, spec: Value) -> SegmentIntegration {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "SegmentIntegration",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a SegmentIntegration")
}

/// The condition `type_` of `si`'s status.
pub fn condition(si: &SegmentIntegration, type_: &str) -> Option<Condition> {
    si.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

/// Whether `si` has condition `type_` with `status`.
pub fn condition_is(si: &SegmentIntegration, type_: &str, status: ConditionStatus) -> bool {
    condition(si, type_).is_some_and(|c| c.status == status)
}

/// Reports the pods of Deployment `name` available, as the controller manager would (no
/// controller manager runs on the test API server).
pub async fn report_pods_available(deployments: &Api<Deployment>, name: &str) -> kube::Result<()> {
    deployments
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2}}),
            ),
        )
        .await
        .map(drop)
}

/// Runs `sql` in the PostgreSQL database at `url` (as the test server's superuser) and returns
/// the first column of each row as text.
pub async fn query_texts(url: &str, sql: &str) -> Vec<String> {
    let warehouse = sluice_ingest::load::Warehouse::connect(url, "public", 1).expect("warehouse");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(warehouse.postgres_pool().expect("postgres"))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

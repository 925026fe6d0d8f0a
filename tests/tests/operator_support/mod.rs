//! What the operator's test files share: a namespace of the test's own with the operator running
//! in-process on it ([`Harness`]), and the small probes their assertions use. Each test binary
//! uses part of it.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::{Value, json};
use sluice_operator::crd::{Condition, ConditionStatus};
use sluice_operator::metrics::Metrics;
use sluice_operator::{SegmentIntegration, controller};
use sluice_tests::kube::{admin_client, namespace_with_crd, put_url_secret};
use tokio::sync::oneshot;

/// How long a test waits for the operator. Generous: the machine may be busy building.
pub const EVENTUAL: Duration = Duration::from_secs(90);

/// The image the test operator puts in Deployments (nothing pulls it here).
pub const IMAGE: &str = "sluice-ingest:test";

/// A namespace of the test's own with the CRD in place and the operator watching it. The
/// operator stops when this is dropped.
pub struct Harness {
    pub client: Client,
    pub namespace: String,
    pub metrics: Arc<Metrics>,
    _stop: oneshot::Sender<()>,
}

impl Harness {
    pub async fn start(prefix: &str) -> Harness {
        let client = admin_client().await.expect("admin client");
        let namespace = Self::namespace(&client, prefix).await;
        Self::start_operator(client.clone(), client, namespace, prefix)
    }

    /// A namespace of the test's own, with the CRD applied.
    pub async fn namespace(client: &Client, prefix: &str) -> String {
        namespace_with_crd(client, &SegmentIntegration::crd(), prefix)
            .await
            .expect("the SegmentIntegration CRD is Established and the namespace created")
            .name()
            .to_owned()
    }

    /// Runs the operator with `operator_client`; the test acts with `client`.
    pub fn start_operator(
        client: Client,
        operator_client: Client,
        namespace: String,
        prefix: &str,
    ) -> Harness {
        let (stop, stopped) = oneshot::channel::<()>();
        let config = controller::Config {
            namespace: Some(namespace.clone()),
            ingest_image: IMAGE.to_owned(),
            instance: Some(format!("test-{prefix}")),
            concurrency: 4,
        };
        let metrics = Arc::new(Metrics::default());
        tokio::spawn(controller::run(
            operator_client,
            config,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Harness {
            client,
            namespace,
            metrics,
            _stop: stop,
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn integrations(&self) -> Api<SegmentIntegration> {
        self.api()
    }

    /// Creates (or replaces the value of) the Secret `name` with `url` under key `url`.
    pub async fn put_url_secret(&self, name: &str, url: &str) {
        put_url_secret(&self.client, &self.namespace, name, url)
            .await
            .expect("apply the warehouse Secret");
    }

    /// Creates a SegmentIntegration from the JSON of its spec.
    pub async fn create(&self, name: &str, spec: Value) -> SegmentIntegration {
        self.integrations()
            .create(&PostParams::default(), &integration(name, spec))
            .await
            .expect("create the SegmentIntegration")
    }

    /// Merge-patches the spec of `name`.
    pub async fn patch_spec(
        &self,
        name: &str,
        spec: Value,
    ) -> Result<SegmentIntegration, kube::Error> {
        self.integrations()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
    }

    /// Waits until the integration `name` has condition `type_` with `status`, and returns it.
    pub async fn wait_condition(
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

pub fn integration(name: &str, spec: Value) -> SegmentIntegration {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "SegmentIntegration",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a SegmentIntegration")
}

pub fn condition(si: &SegmentIntegration, type_: &str) -> Option<Condition> {
    si.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

/// Polls `probe` until it returns `Some`, for at most [`EVENTUAL`].
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + EVENTUAL;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {EVENTUAL:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn spec_for(secret: &str) -> Value {
    json!({"destination": {"urlSecretRef": {"name": secret}}})
}

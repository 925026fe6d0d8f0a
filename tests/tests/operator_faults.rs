//! The operator under faults (issue 11, item 4): its control plane restarted during reconciles,
//! and the warehouse unreachable while a `Drop` deletion runs. The operator runs in-process; what
//! is asserted is what ends up in the API server and in PostgreSQL once the fault is over.
//!
//! The restart tests take a control plane of their own ([`ControlPlane`]): stopping the shared
//! one would break every other test of the run.

use std::time::Duration;

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice_operator::SegmentIntegration;
use sluice_operator::crd::ConditionStatus;
use sluice_operator::metrics::Metrics;
use sluice_tests::kube::{
    ControlPlane, Server, admin_client, eventually, eventually_gone, put_url_secret,
};
use sluice_tests::postgres::fresh_database;
use sluice_tests::toxiproxy::Toxiproxy;
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;

mod support;
use support::{condition_is, integration, report_pods_available, run_operator};

/// The integrations created just before the restart, while their first reconciles run.
const BEFORE: [&str; 3] = ["alpha", "bravo", "charlie"];
/// The one created after it.
const AFTER: &str = "delta";

/// The operator running in-process on a namespace of the test's own, which the test acts on
/// with `client`; stopped when dropped.
struct Operated {
    client: Client,
    namespace: String,
    _stop: oneshot::Sender<()>,
}

impl Operated {
    /// A namespace with the CRD on the API server of `client`, watched by an operator that uses
    /// `operator_client`, with a fresh database's URL in Secret `warehouse`; answers the URL too.
    async fn start(client: Client, operator_client: Client, prefix: &str) -> (Operated, String) {
        let namespace = support::namespace(&client, prefix).await;
        let stop = run_operator(
            operator_client,
            &namespace,
            &format!("test-{prefix}"),
            Arc::new(Metrics::default()),
        );
        let url = fresh_database(&format!("operator_{prefix}")).await;
        put_url_secret(&client, &namespace, "warehouse", &url)
            .await
            .expect("the warehouse Secret");
        let operated = Operated {
            client,
            namespace,
            _stop: stop,
        };
        (operated, url)
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates integration `name` with `spec` (the warehouse is Secret `warehouse`).
    async fn create(&self, name: &str, spec: Value) {
        let mut full = json!({"destination": {"urlSecretRef": {"name": "warehouse"}}});
        if let (Some(full), Value::Object(extra)) = (full.as_object_mut(), spec) {
            full.extend(extra);
        }
        self.api::<SegmentIntegration>()
            .create(&PostParams::default(), &integration(name, full))
            .await
            .expect("create the SegmentIntegration");
    }
}

/// Creates three integrations, stops `server` while they are being reconciled, brings it back,
/// changes things at once (a spec, a deleted child, a new integration), and checks that every
/// integration converges: its Deployment, Service and credentials Secret, `SchemaReady`, and
/// `Ready` once the Deployment reports pods available.
async fn integrations_converge_after_restart_of(server: Server, prefix: &str) {
    let control_plane = ControlPlane::start().await;
    let client = control_plane.admin_client().await.expect("admin client");
    let operator_client = control_plane.admin_client().await.expect("admin client");
    let (h, _url) = Operated::start(client, operator_client, prefix).await;
    for name in BEFORE {
        h.create(name, json!({})).await;
    }

    control_plane.down(server).await;
    // Long enough for the operator's requests and watches to fail and back off.
    tokio::time::sleep(Duration::from_secs(3)).await;
    control_plane.up(server).await;

    // Changed as soon as it is back, whether or not the operator's watches have resumed yet.
    let integrations = h.api::<SegmentIntegration>();
    integrations
        .patch(
            "alpha",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingest": {"replicas": 3}}})),
        )
        .await
        .expect("patch alpha's spec");
    let services = h.api::<Service>();
    let deleted = eventually("bravo's Service, to delete it", || async {
        services.get_opt("bravo-ingest").await.ok().flatten()
    })
    .await;
    services
        .delete("bravo-ingest", &DeleteParams::default())
        .await
        .expect("delete bravo's Service");
    h.create(AFTER, json!({})).await;

    let deployments = h.api::<Deployment>();
    let secrets = h.api::<Secret>();
    for name in BEFORE.into_iter().chain([AFTER]) {
        // SchemaReady, for the latest generation (alpha's spec changed after the restart).
        let si = eventually(
            &format!("{name} SchemaReady for its generation"),
            || async {
                let si = integrations.get(name).await.ok()?;
                let ready = condition_is(&si, "SchemaReady", ConditionStatus::True);
                let current = si.status.as_ref()?.observed_generation == si.metadata.generation;
                (ready && current).then_some(si)
            },
        )
        .await;
        let status = si.status.clone().expect("status");
        assert_eq!(
            status.credentials_secret.as_deref(),
            Some(format!("{name}-credentials").as_str())
        );
        let service = eventually(&format!("{name}'s Service"), || async {
            services
                .get_opt(&format!("{name}-ingest"))
                .await
                .ok()
                .flatten()
        })
        .await;
        if name == "bravo" {
            assert_ne!(
                service.metadata.uid, deleted.metadata.uid,
                "the deleted Service is put back"
            );
        }
        secrets
            .get(&format!("{name}-credentials"))
            .await
            .expect("the credentials Secret");
        // The spec change made after the restart is applied.
        let want = if name == "alpha" {
            3
        } else {
            si.spec.ingest.replicas
        };
        eventually(
            &format!("{name}'s Deployment with {want} replicas"),
            || async {
                let deployment = deployments.get(&format!("{name}-ingest")).await.ok()?;
                (deployment.spec?.replicas == Some(want)).then_some(())
            },
        )
        .await;
        // The controller manager would report pods available; Ready follows.
        report_pods_available(&deployments, &format!("{name}-ingest"))
            .await
            .expect("patch the Deployment's status");
        eventually(&format!("{name} Ready"), || async {
            let si = integrations.get(name).await.ok()?;
            condition_is(&si, "Ready", ConditionStatus::True).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_converge_after_the_api_server_restarts() {
    integrations_converge_after_restart_of(Server::ApiServer, "apiserver-restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_converge_after_etcd_restarts() {
    integrations_converge_after_restart_of(Server::Etcd, "etcd-restart").await;
}

/// The tables of `schema` in the database at `url`.
async fn tables(url: &str, schema: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
         ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(&mut conn)
    .await
    .expect("list tables")
}

async fn schema_exists(url: &str, schema: &str) -> bool {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(schema)
        .fetch_one(&mut conn)
        .await
        .expect("look the schema up")
}

/// `deletionPolicy: Drop` while the warehouse cannot be reached (Toxiproxy resets every
/// connection the operator opens to it): the resource stays, held by its finalizer, a Warning
/// Event says why, and the schema and every table are still there; once the warehouse is back
/// the drop completes and the resource goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_waits_for_an_unreachable_warehouse_and_completes_when_it_is_back() {
    let toxiproxy = Toxiproxy::start().await;
    let client = admin_client().await.expect("admin client");
    let (h, url) = Operated::start(client.clone(), client, "drop-unreachable").await;
    let (_, rest) = url.split_once('@').expect("postgres://user@host:port/db");
    let (upstream, _) = rest.split_once('/').expect("host:port/db");
    let proxy = toxiproxy.proxy("warehouse", upstream).await;
    put_url_secret(
        &h.client,
        &h.namespace,
        "warehouse",
        &url.replace(upstream, &proxy.listen),
    )
    .await
    .expect("the warehouse Secret, now through the proxy");
    h.create(
        "doomed",
        json!({"schema": "doomed", "deletionPolicy": "Drop"}),
    )
    .await;
    let integrations = h.api::<SegmentIntegration>();
    eventually("doomed SchemaReady", || async {
        let si = integrations.get("doomed").await.ok()?;
        condition_is(&si, "SchemaReady", ConditionStatus::True).then_some(())
    })
    .await;
    let created = tables(&url, "doomed").await;
    assert!(created.contains(&"track".to_owned()), "{created:?}");

    proxy
        .add("down", "reset_peer", "downstream", json!({"timeout": 0}))
        .await;
    integrations
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete the SegmentIntegration");
    let events = h.api::<Event>();
    let note = eventually("a Warning Event saying why the drop waits", || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("DropSchemaFailed")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("doomed")
            })?
            .note
    })
    .await;
    assert!(note.contains("cannot drop schema doomed"), "{note}");
    assert!(note.contains("Retain"), "the note says the way out: {note}");
    let held = integrations.get("doomed").await.expect("still there");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(
        held.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.contains(&sluice_operator::controller::FINALIZER.to_owned())),
        "the finalizer holds the resource"
    );
    assert_eq!(
        tables(&url, "doomed").await,
        created,
        "nothing is half-dropped"
    );

    proxy.remove("down").await;
    eventually_gone(&integrations, "doomed").await;
    assert!(
        !schema_exists(&url, "doomed").await,
        "the schema is dropped"
    );
}

//! Table-level reset through the `SegmentIntegration`: `spec.tableReset.versions` on a real API
//! server (its validation) and the operator, in-process against a real PostgreSQL, carrying out
//! a raised version once, reporting it in `status.tableVersions` and a `TableReset` Event.

use k8s_openapi::api::events::v1::Event;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice_operator::SegmentIntegration;
use sluice_operator::crd::{ConditionStatus, TABLE_VERSION_DECREASE_MESSAGE};
use sluice_operator::metrics::Metrics;
use sluice_tests::kube::{admin_client, api_status, eventually, put_url_secret};
use sluice_tests::postgres::fresh_database;

mod support;
use support::{condition, integration, query_texts, run_operator};

fn spec(extra: Value) -> Value {
    let mut spec =
        json!({"schema": "shop", "destination": {"urlSecretRef": {"name": "warehouse"}}});
    for (k, v) in extra.as_object().expect("object") {
        spec[k] = v.clone();
    }
    spec
}

async fn patch_spec(
    api: &Api<SegmentIntegration>,
    name: &str,
    spec: Value,
) -> Result<SegmentIntegration, kube::Error> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
}

/// The Events about `name` with `reason`.
async fn events(client: &Client, namespace: &str, name: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_unknown_tables_and_lower_versions() {
    let client = admin_client().await.expect("admin client");
    let namespace = support::namespace(&client, "reset-cel").await;
    let api = Api::<SegmentIntegration>::namespaced(client.clone(), &namespace);
    let untyped = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &namespace,
        &ApiResource::erase::<SegmentIntegration>(&()),
    );
    let invalid = [
        (
            json!({"versions": {"orders": 1}}),
            "tableReset.versions is keyed by table",
        ),
        (
            json!({"versions": {"track": 0}}),
            "spec.tableReset.versions.track",
        ),
        (
            json!({"versions": {"track": "two"}}),
            "spec.tableReset.versions.track",
        ),
        (json!({"oldRows": "Delete"}), "spec.tableReset.oldRows"),
    ];
    for (i, (reset, expected)) in invalid.into_iter().enumerate() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "SegmentIntegration",
            "metadata": {"name": format!("invalid-{i}")},
            "spec": spec(json!({"tableReset": reset})),
        }))
        .expect("an object");
        let status = api_status(untyped.create(&PostParams::default(), &object).await);
        assert_eq!(status.code, 422, "{reset}: {status:?}");
        assert!(status.message.contains(expected), "{reset}: {status:?}");
    }

    let si = integration(
        "shop",
        spec(json!({"tableReset": {"versions": {"track": 2}, "oldRows": "Drop"}})),
    );
    api.create(&PostParams::default(), &si)
        .await
        .expect("a valid tableReset is accepted");
    for (change, what) in [
        (json!({"versions": {"track": 1}}), "lowering a version"),
        (json!({"versions": {"track": null}}), "removing a table"),
        (json!({"versions": null}), "removing every version"),
        (Value::Null, "removing tableReset"),
    ] {
        let status = api_status(patch_spec(&api, "shop", json!({"tableReset": change})).await);
        assert_eq!(status.code, 422, "{what}: {status:?}");
        assert!(
            status.message.contains(TABLE_VERSION_DECREASE_MESSAGE),
            "{what}: {status:?}"
        );
    }
    let raised = patch_spec(
        &api,
        "shop",
        json!({"tableReset": {"versions": {"track": 3, "page": 1}}}),
    )
    .await
    .expect("raising a version and adding a table are allowed");
    assert_eq!(raised.spec.table_reset.versions["track"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_a_table_version_makes_the_operator_reset_the_table_once() {
    let client = admin_client().await.expect("admin client");
    let namespace = support::namespace(&client, "reset-once").await;
    let url = fresh_database("operator_reset_once").await;
    put_url_secret(&client, &namespace, "warehouse", &url)
        .await
        .expect("the warehouse Secret");
    let _stop = run_operator(
        client.clone(),
        &namespace,
        "test-reset-once",
        std::sync::Arc::new(Metrics::default()),
    );
    let api = Api::<SegmentIntegration>::namespaced(client.clone(), &namespace);
    api.create(
        &PostParams::default(),
        &integration("shop", spec(json!({}))),
    )
    .await
    .expect("create the SegmentIntegration");
    eventually("the schema to be ready", || async {
        let si = api.get("shop").await.ok()?;
        (condition(&si, "SchemaReady")?.status == ConditionStatus::True).then_some(())
    })
    .await;
    // Rows as the ingest would have loaded them.
    query_texts(
        &url,
        "INSERT INTO shop.track (message_id) VALUES ('a'), ('b') RETURNING message_id",
    )
    .await;

    patch_spec(
        &api,
        "shop",
        json!({"tableReset": {"versions": {"track": 1}}}),
    )
    .await
    .expect("raise the version of track");
    let si = eventually(
        "status.tableVersions to show track at version 1",
        || async {
            let si = api.get("shop").await.ok()?;
            let versions = &si.status.as_ref()?.table_versions;
            versions
                .iter()
                .any(|v| v.name == "track" && v.version == 1)
                .then_some(si)
        },
    )
    .await;
    let reported = &si.status.as_ref().expect("status").table_versions[0];
    assert_eq!(reported.kept_as.as_deref(), Some("track__v0"));
    assert_eq!(reported.previous_rows, 2);
    assert!(!reported.reset_at.is_empty());
    assert_eq!(
        query_texts(
            &url,
            "SELECT message_id || ':' || _sdc_table_version FROM shop.track__v0 ORDER BY 1"
        )
        .await,
        ["a:0", "b:0"]
    );
    assert!(
        query_texts(&url, "SELECT message_id FROM shop.track")
            .await
            .is_empty()
    );
    query_texts(
        &url,
        "INSERT INTO shop.track (message_id) VALUES ('c') RETURNING message_id",
    )
    .await;
    assert_eq!(
        query_texts(&url, "SELECT _sdc_table_version::text FROM shop.track").await,
        ["1"]
    );
    eventually("one TableReset Event", || async {
        let found = events(&client, &namespace, "shop", "TableReset").await;
        (found.len() == 1).then_some(())
    })
    .await;
    let event = &events(&client, &namespace, "shop", "TableReset").await[0];
    assert_eq!(event.type_.as_deref(), Some("Normal"));
    assert_eq!(
        event.note.as_deref(),
        Some("reset table track to version 1: its 2 rows of version 0 are kept in track__v0")
    );

    // Further reconciles (a spec change, and the periodic ones) reset nothing again.
    let changed = patch_spec(&api, "shop", json!({"ingest": {"replicas": 3}}))
        .await
        .expect("change the replicas");
    eventually("the change to be reconciled", || async {
        let si = api.get("shop").await.ok()?;
        (si.status.as_ref()?.observed_generation == changed.metadata.generation).then_some(())
    })
    .await;
    assert_eq!(
        query_texts(&url, "SELECT message_id FROM shop.track").await,
        ["c"],
        "the table was not reset again"
    );
    assert_eq!(
        query_texts(
            &url,
            "SELECT table_name || ':' || version FROM shop._sdc_table_versions"
        )
        .await,
        ["track:1"]
    );
    let once = events(&client, &namespace, "shop", "TableReset").await;
    assert_eq!(once.len(), 1);
    assert!(
        once[0].series.is_none(),
        "one Event, not a series: {:?}",
        once[0].series
    );

    // A reset that cannot be carried out is a condition and a Warning Event, and changes nothing.
    query_texts(&url, "CREATE TABLE shop.track__v1 (x int)").await;
    patch_spec(
        &api,
        "shop",
        json!({"tableReset": {"versions": {"track": 2}}}),
    )
    .await
    .expect("raise the version again");
    let failed = eventually("SchemaReady to be False with TableResetFailed", || async {
        let si = api.get("shop").await.ok()?;
        let schema = condition(&si, "SchemaReady")?;
        (schema.reason == "TableResetFailed").then_some(schema)
    })
    .await;
    assert_eq!(failed.status, ConditionStatus::False);
    assert!(failed.message.contains("track__v1"), "{}", failed.message);
    eventually("a Warning Event TableResetFailed", || async {
        let found = events(&client, &namespace, "shop", "TableResetFailed").await;
        found
            .iter()
            .any(|e| e.type_.as_deref() == Some("Warning"))
            .then_some(())
    })
    .await;
    assert_eq!(
        query_texts(&url, "SELECT message_id FROM shop.track").await,
        ["c"]
    );
    // Once the name is free, the reset is carried out.
    query_texts(&url, "DROP TABLE shop.track__v1").await;
    eventually("track at version 2", || async {
        let si = api.get("shop").await.ok()?;
        let ready = condition(&si, "SchemaReady")?.status == ConditionStatus::True;
        let versions = &si.status.as_ref()?.table_versions;
        (ready && versions.iter().any(|v| v.name == "track" && v.version == 2)).then_some(())
    })
    .await;
    assert_eq!(
        query_texts(&url, "SELECT message_id FROM shop.track__v1").await,
        ["c"]
    );
}

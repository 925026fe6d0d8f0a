//! Proves that the Kubernetes API server the test command starts is a real one: it
//! serves a CRD derived by kube-rs, enforces CEL rules and structural schemas, authorizes with RBAC,
//! and streams watches from its etcd.
//!
//! Needs the server of `tests/run.sh` (see `sluice_tests::kube`).

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sluice_tests::kube::{
    TestNamespace, admin_client, api_status, apply_crd, restricted_client, restricted_user,
};

/// The message of the CEL rule on [`GadgetSpec::schema`]; the tests assert that the server says it.
const IMMUTABLE_SCHEMA_MESSAGE: &str = "schema is immutable once set";

/// How long a test waits for something the server does asynchronously (RBAC cache, watch events).
const EVENTUAL: Duration = Duration::from_secs(20);

/// A small custom resource, declared the way the operator declares `SegmentIntegration`.
#[derive(CustomResource, Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[kube(
    group = "harness.sluice.dev",
    version = "v1",
    kind = "Gadget",
    namespaced
)]
pub struct GadgetSpec {
    /// May change at any time.
    pub size: i32,
    /// Fixed at creation, as `SegmentIntegration`'s warehouse schema is: a CEL transition rule in
    /// the CRD makes the server refuse any change.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self == oldSelf",
        "message": IMMUTABLE_SCHEMA_MESSAGE,
    }]))]
    pub schema: String,
}

fn gadget(name: &str, size: i32, schema: &str) -> Gadget {
    Gadget::new(
        name,
        GadgetSpec {
            size,
            schema: schema.to_owned(),
        },
    )
}

/// The admin client, and a namespace of the test's own with the Gadget CRD in place.
async fn gadget_namespace(prefix: &str) -> (Client, Api<Gadget>) {
    let client = admin_client().await.expect("admin client");
    apply_crd(&client, &Gadget::crd())
        .await
        .expect("the derived Gadget CRD is applied and Established");
    let namespace = TestNamespace::create(&client, prefix)
        .await
        .expect("test namespace");
    let api = Api::namespaced(client.clone(), namespace.name());
    (client, api)
}

#[tokio::test]
async fn derived_crd_serves_create_get_server_side_apply_and_delete() {
    let (_client, api) = gadget_namespace("crud").await;

    let created = api
        .create(&PostParams::default(), &gadget("first", 1, "analytics"))
        .await
        .expect("create");
    assert!(created.metadata.uid.is_some(), "the server assigns a uid");

    let fetched = api.get("first").await.expect("get");
    assert_eq!(fetched.spec, gadget("first", 1, "analytics").spec);
    assert_eq!(fetched.metadata.uid, created.metadata.uid);

    let manager = "sluice-harness-test";
    let applied = api
        .patch(
            "first",
            &PatchParams::apply(manager).force(),
            &Patch::Apply(gadget("first", 5, "analytics")),
        )
        .await
        .expect("server-side apply");
    assert_eq!(applied.spec.size, 5);
    let managed = applied.metadata.managed_fields.unwrap_or_default();
    assert!(
        managed.iter().any(|entry| {
            entry.manager.as_deref() == Some(manager) && entry.operation.as_deref() == Some("Apply")
        }),
        "the server records {manager} as an Apply field manager: {managed:?}"
    );
    assert_eq!(api.get("first").await.expect("get").spec.size, 5);

    api.delete("first", &Default::default())
        .await
        .expect("delete");
    assert!(
        api.get_opt("first").await.expect("get_opt").is_none(),
        "a custom object without finalizers is gone once deleted"
    );
}

#[tokio::test]
async fn cel_transition_rule_rejects_changing_an_immutable_field() {
    let (_client, api) = gadget_namespace("cel").await;
    api.create(&PostParams::default(), &gadget("fixed", 1, "analytics"))
        .await
        .expect("create");

    let params = PatchParams::apply("sluice-harness-test").force();
    let status = api_status(
        api.patch(
            "fixed",
            &params,
            &Patch::Apply(gadget("fixed", 1, "marketing")),
        )
        .await,
    );
    assert_eq!(status.code, 422, "rejected as Invalid: {status:?}");
    assert!(
        status.message.contains(IMMUTABLE_SCHEMA_MESSAGE),
        "the rule's message is in the answer: {status:?}"
    );
    assert_eq!(
        api.get("fixed").await.expect("get").spec.schema,
        "analytics"
    );

    // The rule guards only its own field.
    let resized = api
        .patch(
            "fixed",
            &params,
            &Patch::Apply(gadget("fixed", 2, "analytics")),
        )
        .await
        .expect("changing another field is allowed");
    assert_eq!(resized.spec.size, 2);
}

#[tokio::test]
async fn non_structural_schema_is_rejected() {
    let client = admin_client().await.expect("admin client");
    let api = Api::<CustomResourceDefinition>::all(client);
    // `spec` has properties but no `type`: not a structural schema, which apiextensions.k8s.io/v1
    // refuses.
    let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": "shapelesses.harness.sluice.dev" },
        "spec": {
            "group": "harness.sluice.dev",
            "scope": "Namespaced",
            "names": { "plural": "shapelesses", "singular": "shapeless", "kind": "Shapeless" },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": { "properties": { "size": { "type": "integer" } } } }
                } }
            }]
        }
    }))
    .expect("a CustomResourceDefinition object");

    let status = api_status(api.create(&PostParams::default(), &crd).await);
    assert_eq!(status.code, 422, "rejected as Invalid: {status:?}");
    assert!(
        status.message.contains("properties[spec].type")
            && status
                .message
                .contains("must not be empty for specified object fields"),
        "the server names the missing type: {status:?}"
    );
    assert!(
        api.get_opt("shapelesses.harness.sluice.dev")
            .await
            .expect("get_opt")
            .is_none(),
        "the CRD was not stored"
    );
}

#[tokio::test]
async fn restricted_identity_lists_secrets_only_once_a_role_grants_it() {
    let admin = admin_client().await.expect("admin client");
    let namespace = TestNamespace::create(&admin, "rbac")
        .await
        .expect("test namespace");
    let ns = namespace.name();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("credentials".to_owned()),
            ..ObjectMeta::default()
        },
        string_data: Some([("password".to_owned(), "hunter2".to_owned())].into()),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("admin creates a secret");

    let restricted = restricted_client().await.expect("restricted client");
    let secrets = Api::<Secret>::namespaced(restricted.clone(), ns);
    let status = api_status(secrets.list(&ListParams::default()).await);
    assert_eq!(status.code, 403, "forbidden before any grant: {status:?}");

    let role = Role {
        metadata: ObjectMeta {
            name: Some("read-secrets".to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_owned()]),
            verbs: vec!["get".to_owned(), "list".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("create Role");
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("read-secrets".to_owned()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: "read-secrets".to_owned(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "User".to_owned(),
            name: restricted_user().expect("restricted user name"),
            namespace: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create RoleBinding");

    // The authorizer reads roles from an informer cache, so the grant takes effect shortly after.
    let deadline = tokio::time::Instant::now() + EVENTUAL;
    let listed = loop {
        match secrets.list(&ListParams::default()).await {
            Ok(list) => break list,
            Err(kube::Error::Api(status))
                if status.code == 403 && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("listing secrets after the grant failed: {error}"),
        }
    };
    let names: Vec<_> = listed
        .items
        .iter()
        .filter_map(|secret| secret.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["credentials"]);

    // The Role is namespaced: the same identity is still refused elsewhere.
    let status = api_status(
        Api::<Secret>::namespaced(restricted, "default")
            .list(&ListParams::default())
            .await,
    );
    assert_eq!(
        status.code, 403,
        "forbidden outside the Role's namespace: {status:?}"
    );
}

/// Waits on a watch stream for the Gadget `name` to show `size`.
async fn watch_until_size<S>(stream: &mut S, name: &str, size: i32)
where
    S: futures::Stream<Item = Result<Gadget, watcher::Error>> + Unpin,
{
    let seen = tokio::time::timeout(EVENTUAL, async {
        while let Some(object) = stream.try_next().await.expect("watch stream") {
            if object.metadata.name.as_deref() == Some(name) && object.spec.size == size {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        seen,
        Ok(true),
        "the watch shows {name} with size {size} within {EVENTUAL:?}"
    );
}

#[tokio::test]
async fn watches_stream_changes_of_custom_objects() {
    let (_client, api) = gadget_namespace("watch").await;
    let params = PatchParams::apply("sluice-harness-test").force();
    // Both ways a watcher starts: list then watch, and the streaming list (`sendInitialEvents`),
    // which leans on etcd's watch progress notifications.
    let configs = [
        ("list-then-watch", watcher::Config::default()),
        (
            "streaming-list",
            watcher::Config::default().streaming_lists(),
        ),
    ];
    for (name, config) in configs {
        api.create(&PostParams::default(), &gadget(name, 1, "analytics"))
            .await
            .expect("create");
        let mut stream = watcher(api.clone(), config).applied_objects().boxed();
        watch_until_size(&mut stream, name, 1).await;
        api.patch(name, &params, &Patch::Apply(gadget(name, 2, "analytics")))
            .await
            .expect("apply");
        watch_until_size(&mut stream, name, 2).await;
    }
}

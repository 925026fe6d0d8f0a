//! The Helm chart (`charts/sluice/`): it lints strictly, renders with default and fully
//! populated values, refuses values outside its schema, ships the generated CRD, holds exactly the
//! operator's RBAC rules, is accepted by a real API server (server-side dry-run), and its RBAC
//! objects, applied for real, are enough for the operator to reconcile an integration completely,
//! while a copy of the chart missing one rule is not.
//!
//! helm and kubectl come from `tests/scripts/helm.sh` (`eval "$(bash tests/scripts/helm.sh)"`,
//! which `tests/run.sh` does); the API server and PostgreSQL from the test command as usual.
//!
//! The operator runs in-process as the chart's ServiceAccount: an admin client impersonates
//! `system:serviceaccount:<namespace>:<name>`, so the API server authorizes each request by the
//! chart's own bindings, unmodified, and by nothing else (impersonation drops the admin's groups).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_operator::SegmentIntegration;
use sluice_operator::crd::ConditionStatus;
use sluice_operator::leader::{self, Settings};
use sluice_operator::metrics::Metrics;
use sluice_tests::kube::{
    ADMIN_KUBECONFIG_ENV, EVENTUAL, admin_client, eventually, put_url_secret, within,
};
use sluice_tests::postgres::fresh_database;
use tokio::sync::oneshot;

mod support;
use support::{condition_is, integration, report_pods_available, run_operator};

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(var: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{var} is not set: run the tests with `bash tests/run.sh`, or first \
             `eval \"$(bash tests/scripts/helm.sh)\"`"
            )
        })
}

fn helm(args: &[&str]) -> Output {
    Command::new(tool("SLUICE_TEST_HELM"))
        .args(args)
        .output()
        .expect("run helm")
}

fn succeeded(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// `helm template` of `chart` as release `release` in `namespace`, with `extra` arguments.
fn render(chart: &Path, release: &str, namespace: &str, extra: &[&str]) -> String {
    let chart = chart.to_str().expect("UTF-8 path");
    let mut args = vec!["template", release, chart, "--namespace", namespace];
    args.extend_from_slice(extra);
    succeeded(&format!("helm {}", args.join(" ")), helm(&args))
}

/// The objects of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn full_values() -> String {
    chart_dir()
        .join("ci/full-values.yaml")
        .to_str()
        .expect("UTF-8 path")
        .to_owned()
}

/// A rule as a set of (group, resource, verb) triples: the same rights however they are grouped.
fn rights(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    set.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    set
}

/// The rules of every ClusterRole and Role in `objects`.
fn rendered_rules(objects: &[Value]) -> Vec<PolicyRule> {
    objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .flat_map(|o| {
            serde_json::from_value::<Vec<PolicyRule>>(o["rules"].clone()).expect("RBAC rules")
        })
        .collect()
}

#[test]
fn chart_lints_strictly_with_default_and_full_values() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("UTF-8 path");
    succeeded("helm lint --strict", helm(&["lint", "--strict", chart]));
    let full = full_values();
    succeeded(
        "helm lint --strict -f ci/full-values.yaml",
        helm(&["lint", "--strict", chart, "-f", full.as_str()]),
    );
}

#[test]
fn chart_renders_a_hardened_operator_deployment() {
    let objects = documents(&render(&chart_dir(), "sluice", "sluice-system", &[]));
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "ServiceAccount",
        ]),
        "the default install: no ServiceMonitor, metrics Service or NetworkPolicy"
    );
    let deployment = of_kind(&objects, "Deployment")[0];
    assert_eq!(deployment["metadata"]["name"], "sluice-operator");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "sluice-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "sluice-operator:0.1.0");
    assert_eq!(container["args"], json!(["run"]));
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "http", "{probe}");
    }
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert!(container["resources"]["requests"]["memory"].is_string());
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let value = e.get("value").cloned().unwrap_or_else(|| {
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .map(|path| json!(format!("field:{path}")))
                    .expect("a value or a fieldRef")
            });
            (e["name"].as_str().expect("name").to_owned(), value)
        })
        .collect();
    let expected: BTreeMap<String, Value> = [
        ("POD_NAME", "field:metadata.name"),
        ("POD_NAMESPACE", "field:metadata.namespace"),
        ("SLUICE_INGEST_IMAGE", "sluice-ingest:0.1.0"),
        ("SLUICE_OPERATOR_CONCURRENCY", "16"),
        ("SLUICE_OPERATOR_LISTEN", "0.0.0.0:8080"),
        ("SLUICE_LEADER_ELECTION", "true"),
        ("SLUICE_LEASE_NAME", "sluice-operator"),
        ("SLUICE_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), json!(v)))
    .collect();
    assert_eq!(env, expected);
    let pdb = of_kind(&objects, "PodDisruptionBudget")[0];
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn chart_renders_every_option_with_full_values() {
    let full = full_values();
    let objects = documents(&render(
        &chart_dir(),
        "sluice",
        "sluice-system",
        &["-f", full.as_str()],
    ));
    for kind in [
        "ServiceMonitor",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert_eq!(of_kind(&objects, kind).len(), 1, "one {kind}");
    }
    // One namespace watched: no cluster-wide rights at all.
    assert!(of_kind(&objects, "ClusterRole").is_empty());
    assert!(of_kind(&objects, "ClusterRoleBinding").is_empty());
    let roles = of_kind(&objects, "Role");
    assert!(
        roles
            .iter()
            .any(|r| r["metadata"]["namespace"] == "analytics"),
        "{roles:?}"
    );
    let deployment = of_kind(&objects, "Deployment")[0];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["image"],
        "registry.example.com/sluice/sluice-operator@sha256:\
         0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    let env = container["env"].as_array().expect("env");
    assert!(env.contains(&json!({"name": "SLUICE_OPERATOR_NAMESPACE", "value": "analytics"})));
    assert!(env.contains(&json!({"name": "RUST_BACKTRACE", "value": "1"})));
    assert_eq!(deployment["spec"]["replicas"], 3);
}

#[test]
fn values_outside_the_schema_fail_to_render() {
    let chart = chart_dir();
    let cases = [
        ("replicas: two\n", "replicas"),
        ("replica: 2\n", "replica"),
        ("image: {pullPolicy: Sometimes}\n", "pullPolicy"),
        ("operator: {concurrency: 0}\n", "concurrency"),
        (
            "operator: {watchNamespace: Not_A_Namespace}\n",
            "watchNamespace",
        ),
        ("serviceMonitor: {enabled: yes please}\n", "enabled"),
        (
            "replicas: 2\noperator: {leaderElection: false}\n",
            "leaderElection",
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, (values, expected)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&file, values).expect("write values");
        let output = helm(&[
            "template",
            "sluice",
            chart.to_str().expect("UTF-8 path"),
            "-f",
            file.to_str().expect("UTF-8 path"),
        ]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{values:?} must be refused");
        assert!(stderr.contains(expected), "{values:?}: {stderr}");
    }
}

#[test]
fn chart_ships_the_generated_crd() {
    let generated = std::fs::read(repo_root().join("crds/segmentintegration.yaml"))
        .expect("read crds/segmentintegration.yaml");
    let shipped = std::fs::read(chart_dir().join("crds/segmentintegration.yaml"))
        .expect("read charts/sluice/crds/segmentintegration.yaml");
    assert!(
        generated == shipped,
        "charts/sluice/crds/segmentintegration.yaml differs from crds/segmentintegration.yaml: \
         copy it again (cp crds/segmentintegration.yaml charts/sluice/crds/)"
    );
}

#[test]
fn chart_is_versioned_with_the_crates() {
    let chart: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("read Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn chart_rbac_holds_exactly_the_operator_rules() {
    let expected = rights(&sluice_operator::rbac::rules());
    for extra in [&[][..], &["--set", "operator.watchNamespace=analytics"][..]] {
        let objects = documents(&render(&chart_dir(), "sluice", "sluice-system", extra));
        assert_eq!(
            rights(&rendered_rules(&objects)),
            expected,
            "chart RBAC with {extra:?} vs sluice_operator::rbac::rules()"
        );
        // The Lease rule is namespaced, in the release namespace.
        let lease_role = of_kind(&objects, "Role")
            .into_iter()
            .find(|r| r["rules"][0]["resources"] == json!(["leases"]))
            .expect("a Role for the Lease");
        assert_eq!(lease_role["metadata"]["namespace"], "sluice-system");
        for kind in ["ClusterRole", "Role"] {
            for role in of_kind(&objects, kind) {
                let rules: Vec<PolicyRule> =
                    serde_json::from_value(role["rules"].clone()).expect("rules");
                let leases = rules.iter().any(|r| {
                    r.resources
                        .as_ref()
                        .is_some_and(|x| x.iter().any(|res| res == "leases"))
                });
                assert!(
                    !(kind == "ClusterRole" && leases),
                    "the Lease right is not cluster-wide"
                );
            }
        }
    }
    // No binding to anything but the chart's own ServiceAccount.
    let objects = documents(&render(&chart_dir(), "sluice", "sluice-system", &[]));
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        for binding in of_kind(&objects, kind) {
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": "sluice-operator",
                        "namespace": "sluice-system"}])
            );
        }
    }
}

/// `kubectl` with the admin identity of the test API server.
fn kubectl(args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let kubeconfig = std::env::var(ADMIN_KUBECONFIG_ENV).unwrap_or_else(|_| {
        panic!("{ADMIN_KUBECONFIG_ENV} is not set: run the tests with `bash tests/run.sh`")
    });
    let mut child = Command::new(tool("SLUICE_TEST_KUBECTL"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write manifests to kubectl");
    child.wait_with_output().expect("kubectl output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_chart_passes_server_side_dry_run() {
    let admin = admin_client().await.expect("admin client");
    let ns = support::namespace(&admin, "chart-dry-run").await;
    let watch = format!("operator.watchNamespace={ns}");
    let full = full_values();
    let full_args = ["-f", full.as_str(), "--set", watch.as_str()];
    for extra in [&[][..], &full_args[..]] {
        let rendered = render(&chart_dir(), &ns, &ns, extra);
        // The ServiceMonitor's CRD (Prometheus Operator) is not installed on the test server:
        // every other object goes to the server.
        let manifests: Vec<Value> = documents(&rendered)
            .into_iter()
            .filter(|o| o["kind"] != "ServiceMonitor")
            .collect();
        let stream: String = manifests
            .iter()
            .map(|o| format!("---\n{}\n", serde_json::to_string(o).expect("JSON")))
            .collect();
        let output = kubectl(
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=helm",
                "-f",
                "-",
            ],
            &stream,
        );
        let out = succeeded(
            &format!("kubectl apply --server-side --dry-run=server ({extra:?})"),
            output,
        );
        assert_eq!(
            out.lines().count(),
            manifests.len(),
            "every object answered: {out}"
        );
    }
}

/// Applies the chart at `chart` (with `extra` helm arguments) for real as release `ns` in namespace
/// `ns`, and returns a client that acts as its ServiceAccount.
async fn install_chart_objects(chart: &Path, ns: &str, extra: &[&str]) -> Client {
    let rendered = render(chart, ns, ns, extra);
    let objects = documents(&rendered);
    succeeded(
        "kubectl apply --server-side (the chart's objects)",
        kubectl(
            &["apply", "--server-side", "--field-manager=helm", "-f", "-"],
            &rendered,
        ),
    );
    let account = of_kind(&objects, "ServiceAccount")[0]["metadata"]["name"]
        .as_str()
        .expect("ServiceAccount name")
        .to_owned();
    let path = std::env::var(ADMIN_KUBECONFIG_ENV).expect("admin kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the admin kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("admin config");
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{account}"));
    Client::try_from(config).expect("impersonating client")
}

/// Runs the operator as `operator` on namespace `ns` and creates integration `shop` in it (with
/// an Ingress, an autoscaler and `deletionPolicy: Drop`); the operator stops when the returned
/// sender is dropped.
async fn operate_shop(admin: &Client, operator: Client, ns: &str) -> oneshot::Sender<()> {
    let stop = run_operator(
        operator,
        ns,
        &format!("chart-{ns}"),
        Arc::new(Metrics::default()),
    );
    let url = fresh_database("chart_rbac").await;
    put_url_secret(admin, ns, "warehouse", &url)
        .await
        .expect("create the warehouse Secret");
    let spec = json!({
        "destination": {"urlSecretRef": {"name": "warehouse"}},
        "deletionPolicy": "Drop",
        "exposure": {"ingress": {"host": "hooks.example.com"}},
        "ingest": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}},
    });
    Api::<SegmentIntegration>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &integration("shop", spec))
        .await
        .expect("create the SegmentIntegration");
    stop
}

/// Runs the operator as `operator` on namespace `ns` and drives one integration through its whole
/// life: schema, every child (Secret, Deployment, Service, Ingress, HPA), Ready, an Event, the
/// Ingress removed, deletion with `Drop`. The first step not reached within `limit` is the error.
async fn reconciles_completely(
    admin: &Client,
    operator: Client,
    ns: &str,
    limit: Duration,
) -> Result<(), String> {
    let _stop = operate_shop(admin, operator, ns).await;
    let integrations = Api::<SegmentIntegration>::namespaced(admin.clone(), ns);
    within(limit, "SchemaReady=True", || async {
        let si = integrations.get("shop").await.ok()?;
        condition_is(&si, "SchemaReady", ConditionStatus::True).then_some(())
    })
    .await?;
    within(limit, "the credentials Secret", || async {
        Api::<Secret>::namespaced(admin.clone(), ns)
            .get_opt("shop-credentials")
            .await
            .ok()?
    })
    .await?;
    within(limit, "the Service", || async {
        Api::<Service>::namespaced(admin.clone(), ns)
            .get_opt("shop-ingest")
            .await
            .ok()?
    })
    .await?;
    within(limit, "the Ingress", || async {
        Api::<Ingress>::namespaced(admin.clone(), ns)
            .get_opt("shop-ingest")
            .await
            .ok()?
    })
    .await?;
    within(limit, "the HorizontalPodAutoscaler", || async {
        Api::<HorizontalPodAutoscaler>::namespaced(admin.clone(), ns)
            .get_opt("shop-ingest")
            .await
            .ok()?
    })
    .await?;
    let deployments = Api::<Deployment>::namespaced(admin.clone(), ns);
    within(limit, "the Deployment", || async {
        deployments.get_opt("shop-ingest").await.ok()?
    })
    .await?;
    report_pods_available(&deployments, "shop-ingest")
        .await
        .map_err(|e| format!("patch the Deployment's status: {e}"))?;
    let ready = within(limit, "Ready=True", || async {
        let si = integrations.get("shop").await.ok()?;
        condition_is(&si, "Ready", ConditionStatus::True).then_some(si)
    })
    .await?;
    let url = ready.status.and_then(|s| s.webhook_url);
    // With an Ingress, the URL given to Segment is the Ingress's.
    if url.as_deref() != Some("https://hooks.example.com/v1/webhook") {
        return Err(format!("unexpected webhook URL {url:?}"));
    }
    let events = Api::<Event>::namespaced(admin.clone(), ns);
    within(limit, "an Event", || async {
        (!events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty())
        .then_some(())
    })
    .await?;
    integrations
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"exposure": {"ingress": null}}})),
        )
        .await
        .map_err(|e| format!("remove the ingress: {e}"))?;
    let ingresses = Api::<Ingress>::namespaced(admin.clone(), ns);
    within(limit, "the Ingress to be deleted", || async {
        ingresses
            .get_opt("shop-ingest")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    integrations
        .delete("shop", &DeleteParams::default())
        .await
        .map_err(|e| format!("delete: {e}"))?;
    within(limit, "the integration to be gone (finalizer)", || async {
        integrations
            .get_opt("shop")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_with_the_chart_rbac_reconciles_an_integration_completely() {
    let admin = admin_client().await.expect("admin client");
    let ns = support::namespace(&admin, "chart-rbac").await;
    let operator = install_chart_objects(&chart_dir(), &ns, &[]).await;
    // The authorizer sees new bindings shortly after they are made.
    let probe = Api::<SegmentIntegration>::namespaced(operator.clone(), &ns);
    within(EVENTUAL, "the chart's bindings to take effect", || async {
        probe.list(&Default::default()).await.ok().map(|_| ())
    })
    .await
    .expect("the chart's ServiceAccount may list integrations");

    reconciles_completely(&admin, operator.clone(), &ns, EVENTUAL)
        .await
        .expect("the operator reconciles with the chart's RBAC");

    // Leader election with the same rights, on the chart's Lease name, in the release namespace.
    let leadership = tokio::time::timeout(
        Duration::from_secs(10),
        leader::acquire(
            operator,
            Settings {
                namespace: ns.clone(),
                name: "sluice-operator".to_owned(),
                identity: "chart".to_owned(),
                timing: leader::Timing::default(),
            },
        ),
    )
    .await
    .expect("the chart's ServiceAccount takes the Lease");
    leadership.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_with_the_namespaced_chart_rbac_reconciles_its_namespace() {
    // operator.watchNamespace: a Role and RoleBinding in that namespace, nothing cluster-wide.
    let admin = admin_client().await.expect("admin client");
    let ns = support::namespace(&admin, "chart-ns-rbac").await;
    let watch = format!("operator.watchNamespace={ns}");
    let operator = install_chart_objects(&chart_dir(), &ns, &["--set", watch.as_str()]).await;
    let probe = Api::<SegmentIntegration>::namespaced(operator.clone(), &ns);
    within(EVENTUAL, "the chart's bindings to take effect", || async {
        probe.list(&Default::default()).await.ok().map(|_| ())
    })
    .await
    .expect("the chart's ServiceAccount may list integrations in its namespace");
    // Nothing outside it.
    let everywhere = Api::<SegmentIntegration>::all(operator.clone());
    assert!(
        everywhere.list(&Default::default()).await.is_err(),
        "no cluster-wide list right"
    );
    reconciles_completely(&admin, operator, &ns, EVENTUAL)
        .await
        .expect("the operator reconciles its namespace with the namespaced chart RBAC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_missing_one_rbac_rule_does_not_reconcile() {
    // A copy of the chart without the Deployment rule.
    let copy = tempfile::tempdir().expect("temp dir");
    let chart = copy.path().join("sluice");
    let status = Command::new("cp")
        .arg("-r")
        .arg(chart_dir())
        .arg(&chart)
        .status()
        .expect("cp");
    assert!(status.success(), "copy the chart");
    let helpers = chart.join("templates/_helpers.tpl");
    let text = std::fs::read_to_string(&helpers).expect("read _helpers.tpl");
    let rule = "- apiGroups: [\"apps\"]\n  resources: [\"deployments\"]\n  \
                verbs: [\"get\", \"list\", \"watch\", \"create\", \"patch\", \"delete\"]\n";
    assert!(
        text.contains(rule),
        "the Deployment rule is in _helpers.tpl"
    );
    std::fs::write(&helpers, text.replace(rule, "")).expect("write _helpers.tpl");
    let rendered = documents(&render(&chart, "x", "x", &[]));
    assert_eq!(
        rights(&rendered_rules(&rendered)).len() + 6,
        rights(&sluice_operator::rbac::rules()).len(),
        "exactly the six Deployment rights are gone"
    );

    let admin = admin_client().await.expect("admin client");
    let ns = support::namespace(&admin, "chart-norbac").await;
    let operator = install_chart_objects(&chart, &ns, &[]).await;
    let probe = Api::<SegmentIntegration>::namespaced(operator.clone(), &ns);
    within(EVENTUAL, "the chart's bindings to take effect", || async {
        probe.list(&Default::default()).await.ok().map(|_| ())
    })
    .await
    .expect("the chart's ServiceAccount may list integrations");

    let _stop = operate_shop(&admin, operator, &ns).await;
    // The operator says why it cannot go on: the API server's Forbidden answer, in a Warning
    // Event on the integration (and the reconcile_failures metric, category "kubernetes").
    let events = Api::<Event>::namespaced(admin.clone(), &ns);
    let note = eventually("a Warning Event with the Forbidden answer", || async {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter(|e| e.reason.as_deref() == Some("ReconcileFailed"))
            .filter_map(|e| e.note)
            .find(|note| note.contains("forbidden"))
    })
    .await;
    assert!(
        note.starts_with("kubernetes: ") && note.contains("deployments"),
        "the Event names the refused Deployment request: {note}"
    );
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
    assert!(
        deployments
            .get_opt("shop-ingest")
            .await
            .expect("get")
            .is_none(),
        "no Deployment was made without the right to make one"
    );
}

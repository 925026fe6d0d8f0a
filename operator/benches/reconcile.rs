//! The operator benchmark: creates many `SegmentIntegration`s at once for a release
//! build of `sluice-operator` running as its own process, and prints the time until every one has
//! its Deployment, Service and credentials Secret and `SchemaReady=True`, and the operator's peak
//! RSS. Targets: 300 integrations in under 60 s, under 64 MiB. It prints; it asserts no timing.
//!
//! Needs the test servers (`tests/scripts/postgres.sh start DIR`, `tests/scripts/kube-apiserver.sh
//! start DIR`, and their `env` files sourced) and the binary:
//!
//! ```sh
//! cargo build --release -p sluice-operator && cargo bench -p sluice-operator --bench reconcile
//! ```
//!
//! Knob: `BENCH_INTEGRATIONS` (default 300).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, CustomResourceExt};
use sluice_operator::crd::ConditionStatus;
use sluice_operator::{SegmentIntegration, SegmentIntegrationSpec};
use sluice_tests::kube::{ADMIN_KUBECONFIG_ENV, admin_client, namespace_with_crd, put_url_secret};
use sluice_tests::postgres::fresh_database;

const DEADLINE: Duration = Duration::from_secs(180);

fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("benchmark binary path");
    // target/release/deps/<bench> -> target/release/sluice-operator
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("sluice-operator"))
        .expect("target folder");
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --release -p sluice-operator`",
        path.display()
    );
    path
}

/// The operator's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn count_ready(api: &Api<SegmentIntegration>) -> usize {
    let Ok(list) = api.list(&ListParams::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|si| {
            si.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "SchemaReady" && c.status == ConditionStatus::True)
            })
        })
        .count()
}

async fn count<K>(api: &Api<K>, selector: &str) -> usize
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list_metadata(&ListParams::default().labels(selector))
        .await
        .map_or(0, |list| list.items.len())
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_INTEGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let kubeconfig = std::env::var(ADMIN_KUBECONFIG_ENV)
        .unwrap_or_else(|_| panic!("{ADMIN_KUBECONFIG_ENV} is not set: start the test servers"));
    let client = admin_client().await.expect("admin client");
    let namespace = namespace_with_crd(&client, &SegmentIntegration::crd(), "bench")
        .await
        .expect("CRD and namespace")
        .name()
        .to_owned();
    let url = fresh_database("operator_bench").await;
    put_url_secret(&client, &namespace, "warehouse", &url)
        .await
        .expect("warehouse Secret");

    let mut operator = tokio::process::Command::new(operator_binary())
        .args(["run", "--namespace", &namespace])
        .args(["--leader-election", "false", "--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start sluice-operator");
    let pid = operator.id().expect("running");

    let integrations = Api::<SegmentIntegration>::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let integrations = integrations.clone();
            async move {
                let spec: SegmentIntegrationSpec = serde_json::from_value(serde_json::json!({
                    "destination": {"urlSecretRef": {"name": "warehouse"}},
                    "ingest": {"replicas": 1},
                }))
                .expect("spec");
                integrations
                    .create(
                        &PostParams::default(),
                        &SegmentIntegration::new(&format!("bench-{i:04}"), spec),
                    )
                    .await
                    .expect("create a SegmentIntegration");
            }
        })
        .await;
    let created = started.elapsed();

    let managed = "app.kubernetes.io/managed-by=sluice-operator";
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    let services = Api::<Service>::namespaced(client.clone(), &namespace);
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    loop {
        let ready = count_ready(&integrations).await;
        let objects = [
            count(&deployments, managed).await,
            count(&services, managed).await,
            count(&secrets, managed).await,
        ];
        if ready == n && objects.iter().all(|&c| c == n) {
            break;
        }
        if started.elapsed() > DEADLINE {
            panic!(
                "after {DEADLINE:?}: {ready} of {n} SchemaReady, objects {objects:?} \
                 (Deployments, Services, Secrets)"
            );
        }
        if let Ok(Some(status)) = operator.try_wait() {
            panic!("sluice-operator exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed();
    let rss = peak_rss_kib(pid).map_or_else(
        || "unknown".to_owned(),
        |k| format!("{:.1}", k as f64 / 1024.0),
    );
    println!("operator benchmark: {n} SegmentIntegrations");
    println!(
        "  created in                 {:>8.2} s",
        created.as_secs_f64()
    );
    println!(
        "  all objects + SchemaReady  {:>8.2} s   (target < 60 s)",
        elapsed.as_secs_f64()
    );
    println!("  operator peak RSS          {rss:>8} MiB (target < 64 MiB)");
    let _ = operator.start_kill();
}

//! The operator's memory beside many Secrets (issue 11, item 4): with 5,000 Secrets of 10 KB each
//! in the namespace it watches, the operator's peak RSS should stay under 64 MiB, because it
//! watches Secrets as metadata only. It prints figures; it asserts nothing.
//!
//! It starts a control plane and a PostgreSQL server of its own, creates the Secrets, then for
//! each operator binary given (default `target/debug/sluice-operator`) runs it against that
//! namespace, has it reconcile a new integration to `SchemaReady=True`, and prints the process's
//! peak resident set (VmHWM). Passing an older build beside the new one compares them:
//!
//! ```sh
//! bash tests/secrets_rss.sh [OLD_BINARY ...]
//! ```
//!
//! Knobs: `BENCH_SECRETS` (default 5000), `BENCH_SECRET_KIB` (default 10).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, CustomResourceExt};
use sluice_operator::SegmentIntegration;
use sluice_operator::crd::ConditionStatus;
use sluice_tests::kube::{ControlPlane, namespace_with_crd, put_url_secret};
use sluice_tests::postgres::Cluster;

/// How long one operator may take to make its integration ready.
const DEADLINE: Duration = Duration::from_secs(300);

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The peak resident set (VmHWM) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn schema_ready(si: &SegmentIntegration) -> bool {
    si.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "SchemaReady" && c.status == ConditionStatus::True)
    })
}

/// Runs `binary` on `namespace` until it has made integration `name` ready, and answers its peak
/// RSS in KiB and how long that took.
async fn measure(
    binary: &PathBuf,
    control_plane: &ControlPlane,
    integrations: &Api<SegmentIntegration>,
    namespace: &str,
    name: &str,
) -> (Option<u64>, Duration) {
    let mut operator = tokio::process::Command::new(binary)
        .args(["run", "--namespace", namespace])
        .args(["--leader-election", "false", "--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", control_plane.kubeconfig())
        .env("SLUICE_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let pid = operator.id().expect("running");
    let started = Instant::now();
    let si: SegmentIntegration = serde_json::from_value(serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "SegmentIntegration",
        "metadata": {"name": name},
        "spec": {"destination": {"urlSecretRef": {"name": "warehouse"}}, "schema": name},
    }))
    .expect("a SegmentIntegration");
    integrations
        .create(&PostParams::default(), &si)
        .await
        .expect("create the SegmentIntegration");
    loop {
        if integrations
            .get(name)
            .await
            .is_ok_and(|si| schema_ready(&si))
        {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{} did not make {name} ready within {DEADLINE:?}",
            binary.display()
        );
        if let Ok(Some(status)) = operator.try_wait() {
            panic!("{} exited early: {status}", binary.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    // The watches' initial lists are over by now; a few more seconds catch a late peak.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = peak_rss_kib(pid);
    let _ = operator.kill().await;
    (rss, elapsed)
}

#[tokio::main]
async fn main() {
    let count = knob("BENCH_SECRETS", 5000);
    let kib = knob("BENCH_SECRET_KIB", 10);
    let binaries: Vec<PathBuf> = {
        let given: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
        if given.is_empty() {
            vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice-operator")]
        } else {
            given
        }
    };

    let control_plane = ControlPlane::start().await;
    let postgres = Cluster::start().await;
    let client = control_plane.admin_client().await.expect("admin client");
    let namespace = namespace_with_crd(&client, &SegmentIntegration::crd(), "secrets")
        .await
        .expect("CRD and namespace")
        .name()
        .to_owned();
    let url = postgres.fresh_database("secrets_rss").await;
    put_url_secret(&client, &namespace, "warehouse", &url)
        .await
        .expect("warehouse Secret");

    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    futures::stream::iter(0..count)
        .for_each_concurrent(16, |i| {
            let secrets = secrets.clone();
            async move {
                // Bytes that differ per Secret, as real keys and certificates do.
                let value: Vec<u8> = (0..kib * 1024)
                    .map(|j| ((i.wrapping_mul(31) ^ j.wrapping_mul(17)) % 251) as u8)
                    .collect();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("unrelated-{i:05}")),
                        ..ObjectMeta::default()
                    },
                    data: Some([("value".to_owned(), ByteString(value))].into()),
                    ..Secret::default()
                };
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .expect("create a Secret");
            }
        })
        .await;
    println!(
        "created {count} Secrets of {kib} KiB in namespace {namespace} in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let integrations = Api::<SegmentIntegration>::namespaced(client.clone(), &namespace);
    for (i, binary) in binaries.iter().enumerate() {
        let (rss, elapsed) = measure(
            binary,
            &control_plane,
            &integrations,
            &namespace,
            &format!("rss{i}"),
        )
        .await;
        let rss = rss.map_or_else(
            || "unknown".to_owned(),
            |k| format!("{:.1} MiB", k as f64 / 1024.0),
        );
        println!(
            "{}: peak RSS {rss} (target < 64 MiB); integration ready in {:.1} s",
            binary.display(),
            elapsed.as_secs_f64()
        );
    }
}

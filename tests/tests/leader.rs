//! Leader election against a real API server, through a fault-injecting TCP proxy: two operator
//! replicas run in-process, each with its own identity, its own Toxiproxy proxies
//! (one for the Lease's connection, one for the controller's) and the real controller, while the
//! test keeps changing an integration so that whoever leads keeps writing. Every write a replica's
//! controller sends is recorded with the instant it left (below the leader's fence, so only what
//! really left is seen), and the record is checked for overlap.
//!
//! Timing bounds here are correctness bounds derived from the configured durations: a leader's
//! last write leaves within the renew deadline of its last successful renewal, and the other
//! replica's first write at least `lease duration - renew deadline` after it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams, PostParams};
use kube::client::Body;
use kube::{Api, Client};
use serde_json::json;
use sluice_operator::leader::{self, Ended, Settings, Timing};
use sluice_operator::metrics::Metrics;
use sluice_operator::{SegmentIntegration, controller};
use sluice_tests::kube::{
    EVENTUAL, admin_client, admin_client_via, api_server_address, eventually,
};
use sluice_tests::toxiproxy::{Proxy, Toxiproxy};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

mod support;

const LEASE_DURATION: Duration = Duration::from_secs(4);
const RENEW_DEADLINE: Duration = Duration::from_millis(2500);
const RETRY_PERIOD: Duration = Duration::from_millis(500);
const LEASE_NAME: &str = "sluice-operator";

fn timing() -> Timing {
    Timing::new(LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD).expect("valid timing")
}

/// The least time between one replica's last write and another replica's first: the leader's
/// last write leaves before its last successful renewal was sent plus the renew deadline; the other
/// replica saw that renewal after it was sent, and waits the lease duration from then.
fn handover_gap() -> Duration {
    LEASE_DURATION - RENEW_DEADLINE
}

/// One write request a replica's controller sent.
#[derive(Debug, Clone)]
struct Write {
    identity: String,
    term: String,
    request: String,
    sent: Instant,
    /// When a success answer came back; `None` for no answer or an error.
    answered: Option<Instant>,
}

/// Every write of every replica, in the order they left.
#[derive(Debug, Clone, Default)]
struct Writes(Arc<Mutex<Vec<Write>>>);

impl Writes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Write>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn all(&self) -> Vec<Write> {
        self.lock().clone()
    }

    /// The first write by `identity` that left after `after`.
    fn first_by(&self, identity: &str, after: Instant) -> Option<Write> {
        self.lock()
            .iter()
            .find(|w| w.identity == identity && w.sent > after)
            .cloned()
    }
}

/// A client that records each write request (not the Lease's) in [`Writes`] as it leaves.
#[derive(Clone)]
struct Recorded {
    client: Client,
    writes: Writes,
    identity: String,
    term: String,
}

impl tower::Service<http::Request<Body>> for Recorded {
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let client = self.client.clone();
        let reads = matches!(
            *request.method(),
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        if reads {
            return async move { Ok(client.send(request).await?) }.boxed();
        }
        let index = {
            let mut writes = self.writes.lock();
            writes.push(Write {
                identity: self.identity.clone(),
                term: self.term.clone(),
                request: format!("{} {}", request.method(), request.uri().path()),
                sent: Instant::now(),
                answered: None,
            });
            writes.len() - 1
        };
        let writes = self.writes.clone();
        async move {
            let response = client.send(request).await?;
            if response.status().is_success() {
                writes.lock()[index].answered = Some(Instant::now());
            }
            Ok(response)
        }
        .boxed()
    }
}

/// Checks the writes for overlap: sorted by the instant each left, every term's writes form one
/// run (a term never writes again once another has), and when the writer changes to another
/// replica, the newcomer's first write left at least `gap` after the previous replica's last
/// write, and after every answer that replica got. Returns the runs' terms.
fn check_no_overlap(writes: &[Write], gap: Duration) -> Result<Vec<String>, String> {
    let mut writes = writes.to_vec();
    writes.sort_by_key(|w| w.sent);
    let mut runs: Vec<Vec<Write>> = Vec::new();
    for write in writes {
        match runs.last_mut() {
            Some(run) if run[0].term == write.term => run.push(write),
            _ => runs.push(vec![write]),
        }
    }
    let terms: Vec<String> = runs.iter().map(|run| run[0].term.clone()).collect();
    for (i, term) in terms.iter().enumerate() {
        if terms[..i].contains(term) {
            let shown = &terms[..terms.len().min(i + 1)];
            return Err(format!(
                "term {term} wrote again after another term had written; writers in order: \
                 {shown:?}"
            ));
        }
    }
    for pair in runs.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        let first = &after[0];
        let last = &before[before.len() - 1];
        if first.identity == last.identity {
            continue;
        }
        if first.sent < last.sent + gap {
            return Err(format!(
                "{} wrote ({}) only {:?} after {}'s last write ({}); at least {gap:?} expected",
                first.term,
                first.request,
                first.sent - last.sent,
                last.term,
                last.request
            ));
        }
        if let Some(late) = before
            .iter()
            .filter_map(|w| w.answered)
            .find(|answered| *answered > first.sent)
        {
            return Err(format!(
                "{} got an answer to a write {:?} after {} wrote first",
                last.term,
                late - first.sent,
                first.term
            ));
        }
    }
    Ok(terms)
}

/// A replica: runs terms of [`leader::lead`] with the real controller, as a restarted pod would
/// (new clients each term), until stopped. Its Lease and its controller use separate proxies, so a
/// test can cut either.
struct Replica {
    identity: String,
    lease: Proxy,
    work: Proxy,
    task: tokio::task::JoinHandle<()>,
}

/// What every replica of a test shares.
#[derive(Clone)]
struct Cluster {
    toxiproxy: Arc<Toxiproxy>,
    namespace: String,
    writes: Writes,
    terms: Arc<AtomicUsize>,
    ended: mpsc::UnboundedSender<(String, Ended)>,
    stop: watch::Receiver<bool>,
}

impl Cluster {
    async fn replica(&self, identity: &str) -> Replica {
        let upstream = api_server_address().await.expect("API server address");
        let proxy = |role: &str| {
            let name = format!("{}-{identity}-{role}", self.namespace);
            let upstream = upstream.clone();
            let toxiproxy = self.toxiproxy.clone();
            async move { toxiproxy.proxy(&name, &upstream).await }
        };
        let lease = proxy("lease").await;
        let work = proxy("work").await;
        let task = self.spawn(identity, &lease, &work);
        Replica {
            identity: identity.to_owned(),
            lease,
            work,
            task,
        }
    }

    /// Starts (or restarts, after a kill) the replica's terms.
    fn spawn(&self, identity: &str, lease: &Proxy, work: &Proxy) -> tokio::task::JoinHandle<()> {
        let cluster = self.clone();
        let identity = identity.to_owned();
        let (lease, work) = (lease.address(), work.address());
        tokio::spawn(async move {
            loop {
                let term = format!(
                    "{identity}#{}",
                    cluster.terms.fetch_add(1, Ordering::SeqCst)
                );
                let lease_client = admin_client_via(lease).await.expect("client");
                let work_client = admin_client_via(work).await.expect("client");
                let namespace = work_client.default_namespace().to_owned();
                let work_client = Client::new(
                    Recorded {
                        client: work_client,
                        writes: cluster.writes.clone(),
                        identity: identity.clone(),
                        term,
                    },
                    namespace,
                );
                let settings = Settings {
                    namespace: cluster.namespace.clone(),
                    name: LEASE_NAME.to_owned(),
                    identity: identity.clone(),
                    timing: timing(),
                };
                let config = controller::Config {
                    namespace: Some(cluster.namespace.clone()),
                    ingest_image: support::IMAGE.to_owned(),
                    instance: Some(identity.clone()),
                    concurrency: 4,
                    report_interval: support::REPORT_INTERVAL,
                };
                let mut stop = cluster.stop.clone();
                let stopped = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                let ended = leader::lead(
                    lease_client,
                    work_client,
                    settings,
                    stopped,
                    |client, gate, shutdown| {
                        controller::run_gated(
                            client,
                            config,
                            Arc::new(Metrics::default()),
                            gate,
                            shutdown,
                        )
                    },
                )
                .await;
                let _ = cluster.ended.send((identity.clone(), ended));
                if ended == Ended::Shutdown {
                    break;
                }
            }
        })
    }
}

/// A namespace with the CRD, an integration that the test keeps changing (so the leader keeps
/// writing), and what replicas need.
struct Scene {
    admin: Client,
    cluster: Cluster,
    ended: mpsc::UnboundedReceiver<(String, Ended)>,
    stop: watch::Sender<bool>,
    churn: tokio::task::JoinHandle<()>,
}

impl Scene {
    async fn start(prefix: &str) -> Scene {
        let admin = admin_client().await.expect("admin client");
        let namespace = support::namespace(&admin, prefix).await;
        let integrations = Api::<SegmentIntegration>::namespaced(admin.clone(), &namespace);
        let integration = support::integration(
            "busy",
            json!({"destination": {"urlSecretRef": {"name": "warehouse"}}}),
        );
        integrations
            .create(&PostParams::default(), &integration)
            .await
            .expect("create the integration");
        // Each change makes the leader apply the Deployment again: a steady stream of writes.
        let churn = tokio::spawn(async move {
            for i in 0_u64.. {
                let patch = json!({"spec": {"ingest": {"replicas": 1 + i % 2}}});
                let _ = integrations
                    .patch("busy", &PatchParams::default(), &Patch::Merge(patch))
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        let (stop, stopped) = watch::channel(false);
        let (ended_tx, ended) = mpsc::unbounded_channel();
        Scene {
            admin,
            cluster: Cluster {
                toxiproxy: Arc::new(Toxiproxy::start().await),
                namespace,
                writes: Writes::default(),
                terms: Arc::new(AtomicUsize::new(1)),
                ended: ended_tx,
                stop: stopped,
            },
            ended,
            stop,
            churn,
        }
    }

    async fn holder(&self) -> Option<String> {
        Api::<Lease>::namespaced(self.admin.clone(), &self.cluster.namespace)
            .get_opt(LEASE_NAME)
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    }

    /// Waits until `identity` holds the Lease and its controller has written after `after`.
    async fn leading_and_writing(&self, identity: &str, after: Instant) -> Write {
        eventually(&format!("{identity} to lead and write"), || async {
            let write = self.cluster.writes.first_by(identity, after)?;
            (self.holder().await.as_deref() == Some(identity)).then_some(write)
        })
        .await
    }

    /// Waits for a report that `identity`'s term ended as `how`.
    async fn ended(&mut self, identity: &str, how: Ended) {
        let deadline = Instant::now() + EVENTUAL;
        loop {
            let report = tokio::time::timeout_at(deadline, self.ended.recv())
                .await
                .unwrap_or_else(|_| panic!("{identity}'s term did not end as {how:?}"));
            if report == Some((identity.to_owned(), how)) {
                return;
            }
        }
    }

    async fn stop(self, replicas: &[&Replica]) -> Vec<Write> {
        self.churn.abort();
        let _ = self.stop.send(true);
        for replica in replicas {
            replica.lease.heal().await;
            replica.work.heal().await;
        }
        self.cluster.writes.all()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_stops_writing_before_the_other_replica_starts() {
    let mut scene = Scene::start("leader-partition").await;
    let start = Instant::now();
    let a = scene.cluster.replica("a").await;
    scene.leading_and_writing("a", start).await;
    let b = scene.cluster.replica("b").await;
    // b is a candidate and sees a renewing; let it look a few times.
    tokio::time::sleep(4 * RETRY_PERIOD).await;
    assert_eq!(scene.holder().await.as_deref(), Some("a"));

    // Only a's Lease connection is cut: its controller still reaches the API server and keeps
    // writing until the renew deadline stops it. (A full partition would stop its writes by
    // itself, proving nothing about the leader.)
    a.lease.partition().await;
    // Taken once the cut is in place: no renewal sent after this instant can succeed.
    let partitioned = Instant::now();
    let b_first = scene.leading_and_writing("b", partitioned).await;
    scene.ended("a", Ended::Lost).await;
    let writes = scene.stop(&[&a, &b]).await;

    let a_last = writes
        .iter()
        .filter(|w| w.identity == "a")
        .map(|w| w.sent)
        .max()
        .expect("a wrote");
    eprintln!(
        "a's last write {:?} after the partition; b's first {:?} after a's last",
        a_last.saturating_duration_since(partitioned),
        b_first.sent.saturating_duration_since(a_last)
    );
    assert!(
        a_last > partitioned,
        "a's controller kept writing after the Lease connection was cut"
    );
    // a's last successful renewal was sent before `partitioned`, so its fence closed before
    // `partitioned + RENEW_DEADLINE`; a write is recorded just after passing the fence.
    assert!(
        a_last < partitioned + RENEW_DEADLINE,
        "a's last write left {:?} after the partition, beyond the renew deadline {RENEW_DEADLINE:?}",
        a_last - partitioned
    );
    assert!(
        b_first.sent >= a_last + handover_gap(),
        "b's first write left {:?} after a's last; at least {:?} expected",
        b_first.sent.saturating_duration_since(a_last),
        handover_gap()
    );
    check_no_overlap(&writes, handover_gap()).expect("no overlapping writes");
    a.task.abort();
    b.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_write_at_the_same_time() {
    let mut scene = Scene::start("leader-overlap").await;
    let start = Instant::now();
    let mut replicas = vec![
        scene.cluster.replica("a").await,
        scene.cluster.replica("b").await,
    ];
    let mut leader = eventually("a replica to lead", || async { scene.holder().await }).await;
    scene.leading_and_writing(&leader, start).await;

    // Each round takes the leader away in another way, and waits for the other to write.
    for fault in [
        "lease-partition",
        "full-partition",
        "kill",
        "lease-partition",
    ] {
        let index = replicas
            .iter()
            .position(|r| r.identity == leader)
            .expect("the leader is one of ours");
        let other = replicas[1 - index].identity.clone();
        let at = Instant::now();
        let old = &mut replicas[index];
        match fault {
            "lease-partition" => old.lease.partition().await,
            "full-partition" => {
                old.lease.partition().await;
                old.work.partition().await;
            }
            _ => old.task.abort(),
        }
        scene.leading_and_writing(&other, at).await;
        match fault {
            "kill" => old.task = scene.cluster.spawn(&old.identity, &old.lease, &old.work),
            _ => {
                scene.ended(&old.identity, Ended::Lost).await;
                old.lease.heal().await;
                old.work.heal().await;
            }
        }
        leader = other;
    }
    let writes = scene.stop(&[&replicas[0], &replicas[1]]).await;
    let terms = check_no_overlap(&writes, handover_gap()).expect("no overlapping writes");
    eprintln!("{} writes by terms {terms:?}", writes.len());
    let writers: Vec<&str> = terms
        .iter()
        .filter_map(|term| term.split('#').next())
        .collect();
    let handovers = writers.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        handovers >= 4,
        "four handovers between replicas expected, saw terms {terms:?}"
    );
    for replica in replicas {
        replica.task.abort();
    }
}

#[test]
fn the_overlap_check_fails_on_overlapping_and_resumed_terms() {
    let t = Instant::now();
    let write = |term: &str, at_ms: u64| Write {
        identity: term.split('#').next().unwrap_or_default().to_owned(),
        term: term.to_owned(),
        request: "PATCH /x".to_owned(),
        sent: t + Duration::from_millis(at_ms),
        answered: Some(t + Duration::from_millis(at_ms + 5)),
    };
    let gap = Duration::from_millis(1500);
    let clean = [write("a#1", 0), write("a#1", 100), write("b#2", 2000)];
    assert_eq!(
        check_no_overlap(&clean, gap).expect("clean"),
        ["a#1", "b#2"]
    );
    // b starts while a still writes.
    let overlap = [write("a#1", 0), write("b#2", 50), write("a#1", 100)];
    assert!(check_no_overlap(&overlap, gap).is_err());
    // b starts too soon after a's last write.
    let close = [write("a#1", 0), write("b#2", 1000)];
    assert!(check_no_overlap(&close, gap).is_err());
    // a's write is answered after b began.
    let mut late = write("a#1", 0);
    late.answered = Some(t + Duration::from_millis(3000));
    assert!(check_no_overlap(&[late, write("b#2", 2000)], gap).is_err());
}

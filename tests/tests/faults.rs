//! Faults injected while senders stream events with Segment's retry behaviour: the ingest
//! killed, PostgreSQL restarted, a full disk, a faulty network to the database (Toxiproxy),
//! and clients that send slowly. Each test ends with the delivery guarantee
//! ([`assert_delivered`]): every event answered 200 is stored exactly once, and every event a
//! retrying sender sent is stored.
//!
//! Needs what `tests/run.sh` provides: the test PostgreSQL server, the `sluice-ingest` binary,
//! root (to mount small filesystems) and Go (Toxiproxy is built from its module on first use).

use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_ingest::event::Table;
use sluice_tests::filesystem::{Ext4, SmallFs};
use sluice_tests::ingest::{Backend, Destination, Process, Server, config, serve};
use sluice_tests::postgres::{Cluster, Shutdown, fresh_database, run_as_admin};
use sluice_tests::sender::{
    Ledger, Retry, assert_delivered, event, message_ids, start_streams, stop_streams,
};
use sluice_tests::toxiproxy::Toxiproxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::sleep;

const SCHEMA: &str = "segment";
const SENDERS: usize = 8;

/// One request, not retried: its status, body and how long it took.
async fn send_once(url: &str, body: String) -> (u16, Value, Duration) {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(60))
        .body(body)
        .send()
        .await
        .expect("an answer within 60 s");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, started.elapsed())
}

fn report(what: &str, ledger: &Ledger) {
    eprintln!(
        "{what}: {} events sent, {} acknowledged; {} answers 5xx, {} requests dropped; slowest \
         answer {:?}; first refusals {:?}",
        ledger.sent.len(),
        ledger.acked.len(),
        ledger.refused,
        ledger.dropped,
        ledger.slowest,
        ledger.refusals
    );
}

/// SIGKILL twice while 8 senders stream; each time the process is started again on the same
/// port and database. Requests cut off by the kill are retried by their senders.
async fn killed_ingest_loses_and_duplicates_nothing(backend: Backend) {
    let dest = Destination::new(backend, "sigkill").await;
    let args = ["--database-url", dest.url.as_str()];
    let mut process = Process::spawn(&args, &[]).await;
    let port = process.port();
    let (stop, streams) = start_streams(&process.url("/v1/webhook"), SENDERS, 0, Retry::default());
    for _ in 0..2 {
        sleep(Duration::from_millis(1000)).await;
        process.kill().await;
        sleep(Duration::from_millis(300)).await;
        process = Process::spawn_on(port, &args, &[]).await;
    }
    sleep(Duration::from_millis(1000)).await;
    let ledger = stop_streams(stop, streams).await;
    report("SIGKILL", &ledger);
    assert!(ledger.dropped > 0, "the kills cut requests off");
    assert_delivered(&dest, SCHEMA, &ledger).await;
    drop(process);
}

/// PostgreSQL restarted under load in `mode`, on a server of the test's own.
async fn postgres_restart_loses_and_duplicates_nothing(mode: Shutdown) {
    let cluster = Cluster::start().await;
    let url = cluster.fresh_database("restart").await;
    let dest = Destination::existing(Backend::Postgres, &url);
    let server = Server::start(config(&url, &[])).await;
    let (stop, streams) = start_streams(&server.url("/v1/webhook"), SENDERS, 0, Retry::default());
    for _ in 0..2 {
        sleep(Duration::from_millis(1000)).await;
        cluster.restart(mode).await;
    }
    sleep(Duration::from_millis(1500)).await;
    let ledger = stop_streams(stop, streams).await;
    report(&format!("PostgreSQL {mode:?} restart"), &ledger);
    // Requests in flight during a restart may fail (503) or wait for it to pass: either is
    // right, so long as nothing else is answered. The restart itself is checked by `restart`.
    assert!(
        ledger
            .refusals
            .iter()
            .all(|(status, body)| *status == 503 && body.contains("unavailable")),
        "{:?}",
        ledger.refusals
    );
    assert_delivered(&dest, SCHEMA, &ledger).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fast_restart_loses_and_duplicates_nothing() {
    postgres_restart_loses_and_duplicates_nothing(Shutdown::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_immediate_restart_loses_and_duplicates_nothing() {
    postgres_restart_loses_and_duplicates_nothing(Shutdown::Immediate).await;
}

/// Sends single events of `padding` bytes, not retried, until one is refused; returns the
/// refusal and the ids of the events sent (refused or not) for the senders' ledger.
async fn send_until_refused(url: &str, label: &str, padding: usize) -> (u16, Value, Vec<String>) {
    let mut ids = Vec::new();
    for i in 0..2000 {
        let id = format!("{label}-{i}");
        let (status, body, _) = send_once(url, event(&id, padding).to_string()).await;
        ids.push(id);
        if status != 200 {
            return (status, body, ids);
        }
    }
    panic!("2000 events of {padding} bytes were all stored on a full filesystem");
}

/// Delivers `ids` (events of `padding` bytes) as a retrying sender would, into `ledger`.
async fn redeliver(ledger: &mut Ledger, url: &str, ids: &[String], padding: usize) {
    let client = reqwest::Client::new();
    for id in ids {
        let body = event(id, padding).to_string();
        ledger
            .deliver(
                &client,
                url,
                &body,
                std::slice::from_ref(id),
                Retry::default(),
            )
            .await;
    }
}

/// PostgreSQL's tables on a 16 MiB filesystem that fills up (a tablespace on a tmpfs; the WAL
/// stays where it was, as a full data disk leaves it): 503 naming the full disk while it lasts
/// (for all but the few rows that fit in space reclaimed from refused batches), and loading
/// resumes, losing nothing, once the filler file is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_out_of_disk_answers_503_then_resumes() {
    let fs = SmallFs::mount(16, Some("postgres"));
    // A server of the test's own: a tablespace whose disk vanishes with a failed test would
    // leave a shared server unable to checkpoint. Dropped (stopped) before `fs` is unmounted.
    let cluster = Cluster::start().await;
    run_as_admin(
        &cluster.admin_url,
        &format!("CREATE TABLESPACE small LOCATION '{}'", fs.path().display()),
    )
    .await;
    let url = cluster.fresh_database("diskfull").await;
    let database = url.rsplit('/').next().expect("database name").to_owned();
    run_as_admin(
        &url,
        &format!("ALTER DATABASE \"{database}\" SET default_tablespace = small"),
    )
    .await;
    let dest = Destination::existing(Backend::Postgres, &url);
    let server = Server::start(config(&url, &[])).await;
    let webhook = server.url("/v1/webhook");
    let padding = 1500;
    let (stop, streams) = start_streams(&webhook, SENDERS, padding, Retry::default());
    sleep(Duration::from_millis(500)).await;
    let filled = fs.fill();
    let (status, body, probes) = send_until_refused(&webhook, "probe", padding).await;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().expect("an error message");
    assert!(
        error.contains("No space left on device") || error.contains("could not extend"),
        "the answer names the full disk: {error}"
    );
    // While the disk is full, a request is refused unless its rows fit in space PostgreSQL
    // reclaims from the rows of refused batches (page pruning); those commit as usual.
    let stored_when_full = message_ids(&dest, SCHEMA, Table::Track).await.len();
    let full: Vec<String> = (0..10).map(|i| format!("full-{i}")).collect();
    let mut refused = 0;
    for id in &full {
        let (status, body, _) = send_once(&webhook, event(id, padding).to_string()).await;
        match status {
            200 => {}
            503 => refused += 1,
            other => panic!("{other}: {body}"),
        }
    }
    assert!(refused > 0, "requests are refused while the disk is full");
    sleep(Duration::from_millis(1000)).await;
    let stored_before_free = message_ids(&dest, SCHEMA, Table::Track).await.len();
    fs.free();
    sleep(Duration::from_millis(1500)).await;
    let mut ledger = stop_streams(stop, streams).await;
    redeliver(&mut ledger, &webhook, &probes, padding).await;
    redeliver(&mut ledger, &webhook, &full, padding).await;
    report(&format!("disk full ({filled} filler bytes)"), &ledger);
    eprintln!(
        "disk full: {refused} of 10 requests refused; {} rows stored in the 1 s+ it lasted, {} \
         after it",
        stored_before_free - stored_when_full,
        ledger.acked.len() - stored_before_free
    );
    assert!(
        ledger.refused > 0,
        "senders were refused while the disk was full"
    );
    assert!(ledger.acked.len() > stored_before_free, "loading resumed");
    assert_delivered(&dest, SCHEMA, &ledger).await;
    server.stop().await;
    drop(cluster);
}

/// The database connection through Toxiproxy while senders stream: added latency, a slow
/// link, a stalled connection and reset connections. No request waits longer than the commit
/// timeout (`--db-acquire-timeout` + `--statement-timeout`, 3 s here) plus a margin; a
/// request that cannot commit gets 503; once a toxic is removed, the pool serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_network_to_postgres_answers_503_in_bounded_time_and_recovers() {
    const BOUND: Duration = Duration::from_secs(3);
    const MARGIN: Duration = Duration::from_millis(1500);
    let toxiproxy = Toxiproxy::start().await;
    let direct = fresh_database("toxic").await;
    let upstream = direct
        .split_once('@')
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(host, _)| host.to_owned())
        .expect("host:port in the URL");
    let proxy = toxiproxy.proxy("postgres", &upstream).await;
    let proxied = direct.replacen(&upstream, &proxy.listen, 1);
    let dest = Destination::existing(Backend::Postgres, &direct);
    let server = Server::start(config(
        &proxied,
        &["--db-acquire-timeout", "1s", "--statement-timeout", "2s"],
    ))
    .await;
    let webhook = server.url("/v1/webhook");
    let (stop, streams) = start_streams(&webhook, 4, 0, Retry::default());
    let mut probes = Ledger::default();
    let mut probe_sizes = Vec::new();
    let mut probe = 0;
    let mut send_probe = async |expect: Option<u16>, padding: usize| {
        probe += 1;
        let id = format!("probe-{probe}");
        probe_sizes.push((id.clone(), padding));
        let (status, body, took) = send_once(&webhook, event(&id, padding).to_string()).await;
        probes.sent.insert(id.clone());
        if status == 200 {
            probes.acked.insert(id);
        }
        if let Some(expected) = expect {
            assert_eq!(status, expected, "{body}");
        }
        assert!(took <= BOUND + MARGIN, "answered {status} after {took:?}");
        (status, body, took)
    };
    sleep(Duration::from_millis(500)).await;

    proxy
        .add(
            "latency",
            "latency",
            "downstream",
            serde_json::json!({"latency": 300}),
        )
        .await;
    let (_, _, took) = send_probe(Some(200), 0).await;
    assert!(took >= Duration::from_millis(300), "the latency applies");
    eprintln!("latency 300 ms: answered 200 in {took:?}");
    proxy.remove("latency").await;

    // 16 KB/s towards the database, the answers cut in small pieces: a 16 KB event takes
    // about a second to reach it.
    proxy
        .add(
            "slow",
            "bandwidth",
            "upstream",
            serde_json::json!({"rate": 16}),
        )
        .await;
    proxy
        .add(
            "sliced",
            "slicer",
            "downstream",
            serde_json::json!({"average_size": 16, "size_variation": 8, "delay": 1000}),
        )
        .await;
    let (_, _, took) = send_probe(Some(200), 16_000).await;
    assert!(took >= Duration::from_millis(500), "the link is slow");
    eprintln!("16 KB/s link, sliced answers: a 16 KB event answered 200 in {took:?}");
    sleep(Duration::from_millis(1000)).await;
    proxy.remove("slow").await;
    proxy.remove("sliced").await;

    // Stalled: nothing passes, the connections stay open.
    proxy
        .add(
            "stall",
            "timeout",
            "upstream",
            serde_json::json!({"timeout": 0}),
        )
        .await;
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let (_, body, took) = send_probe(Some(503), 0).await;
        let error = body["error"].as_str().expect("an error message");
        assert!(error.contains("unavailable"), "{error}");
        slowest = slowest.max(took);
    }
    eprintln!("stalled connection: 503 after at most {slowest:?} (bound {BOUND:?})");
    proxy.remove("stall").await;
    let recovery = Instant::now();
    while send_probe(None, 0).await.0 != 200 {
        assert!(
            recovery.elapsed() < Duration::from_secs(15),
            "the pool recovers"
        );
    }
    eprintln!("stall removed: 200 again after {:?}", recovery.elapsed());

    proxy
        .add(
            "reset",
            "reset_peer",
            "upstream",
            serde_json::json!({"timeout": 0}),
        )
        .await;
    let (_, body, took) = send_probe(Some(503), 0).await;
    eprintln!("reset connections: 503 after {took:?}: {body}");
    sleep(Duration::from_millis(1000)).await;
    proxy.remove("reset").await;
    let recovery = Instant::now();
    while send_probe(None, 0).await.0 != 200 {
        assert!(
            recovery.elapsed() < Duration::from_secs(15),
            "the pool recovers"
        );
    }
    eprintln!("reset removed: 200 again after {:?}", recovery.elapsed());

    sleep(Duration::from_millis(500)).await;
    let mut ledger = stop_streams(stop, streams).await;
    report("faulty network", &ledger);
    assert_eq!(
        ledger.dropped, 0,
        "no request was dropped or hung past 30 s"
    );
    assert!(
        ledger.slowest <= BOUND + MARGIN,
        "a sender waited {:?}",
        ledger.slowest
    );
    assert!(ledger.refused > 0, "senders saw the faults as 503");
    // Probes refused are redelivered, as Segment would.
    ledger.sent.extend(probes.sent.iter().cloned());
    ledger.acked.extend(probes.acked.iter().cloned());
    for (id, padding) in probe_sizes {
        if !probes.acked.contains(&id) {
            redeliver(&mut ledger, &webhook, &[id], padding).await;
        }
    }
    assert_delivered(&dest, SCHEMA, &ledger).await;
    server.stop().await;
}

/// SQLite's file on a 32 MiB filesystem that fills up: a commit that needs more space gets
/// 503 naming the full disk, loading resumes once the filler is deleted (without this, the
/// connection SQLite rolled back under sqlx refused every later transaction), nothing
/// acknowledged is lost and the file passes `PRAGMA integrity_check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_full_filesystem_answers_503_then_resumes_uncorrupted() {
    let fs = SmallFs::mount(32, None);
    let url = format!("sqlite://{}", fs.path().join("sluice.db").display());
    let dest = Destination::existing(Backend::Sqlite, &url);
    let server = Server::start(config(&url, &[])).await;
    let webhook = server.url("/v1/webhook");
    let padding = 1500;
    let (stop, streams) = start_streams(&webhook, SENDERS, padding, Retry::default());
    sleep(Duration::from_millis(500)).await;
    let filled = fs.fill();
    let (status, body, probes) = send_until_refused(&webhook, "probe", padding).await;
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().expect("an error message");
    assert!(
        error.contains("full") || error.contains("disk"),
        "the answer names the full disk: {error}"
    );
    // Commits that fit in the space SQLite's files already hold may still succeed (the log
    // is reused after a checkpoint); the others are refused until space is freed.
    sleep(Duration::from_millis(1000)).await;
    fs.free();
    sleep(Duration::from_millis(1500)).await;
    let mut ledger = stop_streams(stop, streams).await;
    redeliver(&mut ledger, &webhook, &probes, padding).await;
    report(
        &format!("SQLite disk full ({filled} filler bytes)"),
        &ledger,
    );
    assert!(
        ledger.refused > 0,
        "senders were refused while the disk was full"
    );
    assert_delivered(&dest, SCHEMA, &ledger).await;
    server.stop().await;
    let pool = dest.warehouse(SCHEMA);
    let check: Vec<String> = sqlx::query_scalar("PRAGMA segment.integrity_check")
        .fetch_all(pool.sqlite_pool().expect("sqlite"))
        .await
        .expect("integrity check");
    assert_eq!(check, vec!["ok".to_owned()]);
}

/// SQLite's file on an ext4 disk that turns read-only under load, as the kernel makes a disk
/// that reported an error (with commits under way, whose writes the filesystem holds frozen
/// while the error is raised: see [`Ext4::fail`] for why): 503 naming the I/O error while it
/// lasts. Once the disk has been checked (`e2fsck`) and mounted again and the ingest restarted,
/// as an administrator would, loading resumes, nothing acknowledged is lost and the file passes
/// `PRAGMA integrity_check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_on_a_disk_turned_read_only_answers_503_and_loses_nothing() {
    let mut disk = Ext4::mount(64);
    let url = format!("sqlite://{}", disk.path().join("sluice.db").display());
    let dest = Destination::existing(Backend::Sqlite, &url);
    let args = ["--database-url", url.as_str()];
    let process = Process::spawn(&args, &[]).await;
    let port = process.port();
    let webhook = process.url("/v1/webhook");
    let (stop, streams) = start_streams(&webhook, SENDERS, 0, Retry::default());
    sleep(Duration::from_millis(1000)).await;
    disk.fail();
    let refused: Vec<String> = (0..5).map(|i| format!("ro-{i}")).collect();
    for id in &refused {
        let (status, body, _) = send_once(&webhook, event(id, 0).to_string()).await;
        assert_eq!(status, 503, "{body}");
        let error = body["error"].as_str().expect("an error message");
        assert!(
            error.contains("I/O error") || error.contains("readonly"),
            "the answer names the failing disk: {error}"
        );
    }
    process.terminate();
    assert!(process.wait().await, "exits with status 0");
    disk.check();
    disk.remount();
    let process = Process::spawn_on(port, &args, &[]).await;
    sleep(Duration::from_millis(1000)).await;
    let mut ledger = stop_streams(stop, streams).await;
    redeliver(&mut ledger, &webhook, &refused, 0).await;
    report("SQLite disk turned read-only", &ledger);
    assert!(
        ledger.refused > 0,
        "senders were refused while the disk was read-only"
    );
    assert_delivered(&dest, SCHEMA, &ledger).await;
    drop(process);
    let check: Vec<String> = sqlx::query_scalar("PRAGMA segment.integrity_check")
        .fetch_all(dest.warehouse(SCHEMA).sqlite_pool().expect("sqlite"))
        .await
        .expect("integrity check");
    assert_eq!(check, vec!["ok".to_owned()]);
}

/// A connection that sends part of a request and then trickles: headers one line at a time,
/// or a body one byte at a time. Returns what the server answered before it closed the
/// connection, and when it closed it.
async fn slow_request(base: &str, body_phase: bool) -> (String, Duration) {
    let address = base.trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    let started = Instant::now();
    let head = if body_phase {
        "POST /v1/webhook HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000\r\n\r\n{"
    } else {
        "POST /v1/webhook HTTP/1.1\r\nhost: x\r\n"
    };
    let _ = stream.write_all(head.as_bytes()).await;
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for i in 0.. {
            sleep(Duration::from_millis(200)).await;
            let piece = if body_phase {
                " ".to_owned()
            } else {
                format!("x-slow-{i}: 1\r\n")
            };
            if writer.write_all(piece.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut answer)).await;
    let closed = started.elapsed();
    trickle.abort();
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

/// Twice as many slow clients as the connection limit (8), half of them trickling headers and
/// half a body: they are cut off after the header and body read timeouts (1 s each here), the
/// body ones with 408, and a normal sender waiting behind them is served right after. An idle
/// keep-alive connection is closed after the header timeout too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_pin_the_server() {
    let (dest, server) = serve(
        Backend::Sqlite,
        "slow",
        &[
            "--max-http-connections",
            "8",
            "--header-read-timeout",
            "1s",
            "--body-read-timeout",
            "1s",
        ],
    )
    .await;
    let started = Instant::now();
    let slow: Vec<_> = (0..16)
        .map(|i| {
            let base = server.base.clone();
            tokio::spawn(async move { slow_request(&base, i % 2 == 1).await })
        })
        .collect();
    sleep(Duration::from_millis(300)).await;
    // Every slot is taken by a slow client now; this sender waits in the backlog.
    let (status, body, took) =
        send_once(&server.url("/v1/webhook"), event("patient", 0).to_string()).await;
    assert_eq!(status, 200, "{body}");
    eprintln!("a normal sender behind 16 slow ones was answered after {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "served once the slow clients were cut off, after {took:?}"
    );
    // It waited for a slot: the limit held while the slow clients had every one.
    assert!(took > Duration::from_millis(500), "served after {took:?}");
    for (i, handle) in slow.into_iter().enumerate() {
        let (answer, closed) = handle.await.expect("slow client");
        assert!(
            closed < Duration::from_secs(6),
            "slow client {i} was closed after {closed:?}"
        );
        if i % 2 == 1 && !answer.is_empty() {
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        }
    }
    eprintln!("all 16 slow clients closed within {:?}", started.elapsed());
    // An idle keep-alive connection does not hold its slot either.
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut idle = TcpStream::connect(&address).await.expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send");
    let idle_since = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut answer))
        .await
        .expect("the idle connection is closed within 5 s")
        .expect("read");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    eprintln!(
        "idle keep-alive connection closed after {:?}",
        idle_since.elapsed()
    );
    assert_eq!(
        message_ids(&dest, SCHEMA, Table::Track).await,
        vec!["patient"]
    );
    server.stop().await;
}

sluice_tests::on_both_backends!(killed_ingest_loses_and_duplicates_nothing);

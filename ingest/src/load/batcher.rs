//! The bounded queue and the batcher: many requests share one transaction (group commit).
//!
//! A batch takes every job already queued, up to `max_batch_rows` rows, lingers up to
//! `max_batch_delay` for more, then goes to a free writer. While writers are busy the batch keeps
//! growing, so batches get larger exactly when the database is the bottleneck, and an idle
//! service commits an event at once (with the default delay of zero). While a batch is being
//! written the next one takes another writer only once it is full or has waited
//! [`OVERLAP_AFTER`]. After a batch that added columns, the next one waits up to [`REGROUP`]
//! (rounded up to the timer's 1 ms tick) for the senders that batch answered. The queue is
//! bounded in events: when it is full, [`Loader::submit`] fails at once and the receiver answers
//! 503, so memory stays bounded and the sender retries.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::plan::{Item, TableRows};
use super::{LoadError, Rejected, Warehouse};
use crate::event::Table;
use crate::metrics::Metrics;
use crate::normalize::Record;

/// Where the batcher sends its batches: [`Warehouse`] in production; the batcher's tests use
/// one without a database.
pub trait Writer: Clone + Send + Sync + 'static {
    /// Writes `items` in one transaction and answers what became of them. An error fails every
    /// job of the batch (their senders get 503 and retry).
    fn write(
        &self,
        items: Vec<Item>,
    ) -> impl Future<Output = Result<LoadSummary, LoadError>> + Send;
}

impl Writer for Warehouse {
    fn write(
        &self,
        items: Vec<Item>,
    ) -> impl Future<Output = Result<LoadSummary, LoadError>> + Send {
        Warehouse::write(self, items)
    }
}

/// Tuning of the loader.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// A batch is written once it has this many rows.
    pub max_batch_rows: usize,
    /// How long a batch waits for more events before it goes to a free writer.
    pub max_batch_delay: Duration,
    /// Events that may wait for a commit at once; beyond this, requests get 503.
    pub queue_capacity: usize,
    /// Batches written concurrently (each on its own connection).
    pub writers: usize,
    /// Longest a batch may take to commit, connection included; past it the batch is
    /// abandoned (its transaction rolled back, its connection dropped) and its jobs fail with
    /// [`LoadError::Unavailable`], so a stalled database never holds a writer for good.
    pub commit_timeout: Duration,
}

/// What one committed batch did, per table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Rows upserted, per table.
    pub loaded: Vec<(Table, usize)>,
    /// Records kept in `_sdc_rejected`, per table.
    pub rejected: Vec<(Table, usize)>,
    /// The table and `message_id` of each record kept in `_sdc_rejected`.
    pub rejected_records: Vec<(Table, String)>,
    /// Whether the batch took a step of schema evolution before it loaded (the DDL lock, and the
    /// columns added unless another writer had added them meanwhile).
    pub evolved: bool,
}

/// What became of one submitted job's records once their batch committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Records upserted into their tables.
    pub loaded: usize,
    /// Records the database refused, kept in `_sdc_rejected`.
    pub rejected: usize,
}

impl LoadSummary {
    /// The summary of a batch written as `tables`, of which the database refused `refused`,
    /// after a step of schema evolution if `evolved`.
    pub(super) fn of(tables: &[TableRows<'_>], refused: &[Rejected], evolved: bool) -> LoadSummary {
        let mut summary = LoadSummary {
            evolved,
            rejected_records: refused
                .iter()
                .map(|r| (r.table, r.message_id.clone()))
                .collect(),
            ..LoadSummary::default()
        };
        for rows in tables {
            let n = refused.iter().filter(|r| r.table == rows.table).count();
            summary.loaded.push((rows.table, rows.rows.len() - n));
            if n > 0 {
                summary.rejected.push((rows.table, n));
            }
        }
        summary
    }
}

/// Records submitted together, answered together.
#[derive(Debug)]
pub struct Job {
    items: Vec<Item>,
    queued_at: tokio::time::Instant,
    done: oneshot::Sender<Result<Outcome, LoadError>>,
    _queued: OwnedSemaphorePermit,
}

/// What [`Loader::submit`] hands back: wait on it for the commit and the job's [`Outcome`].
pub type Submitted = oneshot::Receiver<Result<Outcome, LoadError>>;

/// The handle the receiver uses to load records. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Loader {
    jobs: mpsc::UnboundedSender<Job>,
    queue: Arc<Semaphore>,
    capacity: usize,
    sequence: Arc<AtomicI64>,
    metrics: Arc<Metrics>,
}

impl Loader {
    /// Starts the batcher on `writer` (a [`Warehouse`]). The batcher runs until every clone of
    /// the returned [`Loader`] is dropped, then writes what is queued and ends the returned task.
    pub fn start<W: Writer>(
        writer: W,
        config: LoaderConfig,
        metrics: Arc<Metrics>,
    ) -> (Loader, tokio::task::JoinHandle<()>) {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let loader = Loader {
            jobs,
            queue: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
            capacity: config.queue_capacity.max(1),
            sequence: Arc::new(AtomicI64::new(0)),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(run(receiver, writer, config, metrics));
        (loader, task)
    }

    /// Queues records (each with the exact JSON it came from) for the next batch. Fails at once
    /// with [`LoadError::QueueFull`] when there is no room; otherwise the returned receiver
    /// resolves after the batch holding them has committed, or failed.
    pub fn submit(
        &self,
        records: Vec<(Record, Bytes)>,
        received_at: DateTime<Utc>,
    ) -> Result<Submitted, LoadError> {
        // A request larger than the whole queue takes all of it, rather than never fitting.
        let n = records.len().clamp(1, self.capacity);
        let n = u32::try_from(n).map_err(|_| LoadError::QueueFull)?;
        let queued = self
            .queue
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|e| match e {
                tokio::sync::TryAcquireError::Closed => LoadError::ShuttingDown,
                tokio::sync::TryAcquireError::NoPermits => LoadError::QueueFull,
            })?;
        let items = records
            .into_iter()
            .map(|(record, raw)| Item {
                record,
                received_at,
                sequence: self.next_sequence(),
                raw,
                adds_columns: true,
            })
            .collect::<Vec<_>>();
        let (done, answer) = oneshot::channel();
        self.metrics.queue(items.len() as i64);
        self.jobs
            .send(Job {
                items,
                queued_at: tokio::time::Instant::now(),
                done,
                _queued: queued,
            })
            .map_err(|_| LoadError::ShuttingDown)?;
        Ok(answer)
    }

    /// The next `_sdc_sequence`: nanoseconds since the epoch, strictly increasing within the
    /// process, so later arrivals win across processes too (up to clock skew).
    fn next_sequence(&self) -> i64 {
        let now = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let previous = self
            .sequence
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(previous + 1)
    }
}

/// How long a batch waits, while another is being written, before it takes a writer of its own.
/// Below it, a steady stream of events commits in one transaction at a time, each taking
/// everything that queued meanwhile: a commit costs PostgreSQL about 0.25 ms of CPU whatever its
/// size, so few large transactions load more events per CPU second than several small ones in
/// parallel (the ingest benchmark's single-event mode measures this). Above it, a slow batch
/// (new columns waiting for a lock, a large refused batch retried row by row) does not hold up
/// the batches behind it.
pub const OVERLAP_AFTER: Duration = Duration::from_millis(10);

/// How long after a batch that added columns the next batch may wait, before it is written, for
/// the senders that batch answered (each sends its next request at once). Tokio's timer rounds
/// the deadline up to its 1 ms tick, so the wait ends 1 - 2 ms after that batch's answers.
///
/// A step of schema evolution costs PostgreSQL several milliseconds whatever its size (the DDL
/// transaction, then planning the insert again against every column of the table). On a stream
/// whose every event brings new keys, the senders answered by one step otherwise form the next
/// batch apart from those that queued during the step, and the two groups take turns: in the
/// benchmark's stream (8 senders) a step served 4 events on average, 8 once they wait, and the
/// stream loads about 1.3 times as fast. After a batch that added no columns, the next never
/// waits: a batch costs little then (about 0.25 ms of PostgreSQL CPU, [`OVERLAP_AFTER`]), and two
/// groups taking turns keep both the ingest and the database busy. The ingest benchmark's
/// schema-evolution and single-event modes measure both.
pub const REGROUP: Duration = Duration::from_millis(1);

/// After a write that added columns, until the next batch takes it: how many jobs that write
/// answered, and when.
type Evolved = Arc<std::sync::Mutex<Option<(usize, tokio::time::Instant)>>>;

async fn run<W: Writer>(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    writer: W,
    config: LoaderConfig,
    metrics: Arc<Metrics>,
) {
    let writers = Arc::new(Semaphore::new(config.writers.max(1)));
    let evolved: Evolved = Arc::default();
    let max_rows = config.max_batch_rows.max(1);
    let mut tasks = JoinSet::new();
    let mut open = true;
    while open {
        let Some(first) = jobs.recv().await else {
            break;
        };
        let deadline = tokio::time::sleep(config.max_batch_delay);
        let overlap = tokio::time::sleep_until(first.queued_at + OVERLAP_AFTER);
        tokio::pin!(deadline, overlap);
        let mut rows = first.items.len();
        let mut batch = vec![first];
        let permit = loop {
            // Take everything already queued, up to a full batch.
            while open && rows < max_rows {
                match jobs.try_recv() {
                    Ok(job) => {
                        rows += job.items.len();
                        batch.push(job);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if rows >= max_rows || !open {
                break writers.clone().acquire_owned().await;
            }
            while tasks.try_join_next().is_some() {}
            // Linger for more events until the deadline. After it, an idle loader writes the
            // batch at once; while another batch is being written, this one keeps growing and
            // takes a writer of its own only once it has waited `OVERLAP_AFTER`.
            let now = tokio::time::Instant::now();
            let lingering = now < deadline.deadline();
            let may_write = tasks.is_empty() || now >= overlap.deadline();
            tokio::select! {
                biased;
                job = jobs.recv() => match job {
                    Some(job) => { rows += job.items.len(); batch.push(job); }
                    None => open = false,
                },
                () = &mut deadline, if lingering => {}
                permit = writers.clone().acquire_owned(), if !lingering && may_write => {
                    break permit;
                }
                _ = tasks.join_next(), if !lingering && !may_write => {}
                () = &mut overlap, if !lingering && !may_write => {}
            }
        };
        let Ok(permit) = permit else { break };
        let last = evolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((answered, at)) = last {
            let mut back = batch.iter().filter(|job| job.queued_at >= at).count();
            while open && back < answered && rows < max_rows {
                tokio::select! {
                    biased;
                    job = jobs.recv() => match job {
                        Some(job) => { rows += job.items.len(); back += 1; batch.push(job); }
                        None => open = false,
                    },
                    () = tokio::time::sleep_until(at + REGROUP) => break,
                }
            }
        }
        tasks.spawn(write_batch(
            writer.clone(),
            evolved.clone(),
            batch,
            metrics.clone(),
            config.commit_timeout,
            permit,
        ));
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!("loader drained");
}

async fn write_batch<W: Writer>(
    writer: W,
    evolved: Evolved,
    mut batch: Vec<Job>,
    metrics: Arc<Metrics>,
    commit_timeout: Duration,
    _busy: OwnedSemaphorePermit,
) {
    // Each job's records, to tell it which of them the database refused.
    let keys: Vec<Vec<(Table, String)>> = batch
        .iter()
        .map(|job| {
            job.items
                .iter()
                .map(|i| (i.record.table, i.record.message_id.clone()))
                .collect()
        })
        .collect();
    let items: Vec<Item> = batch
        .iter_mut()
        .flat_map(|job| std::mem::take(&mut job.items))
        .collect();
    let count = items.len();
    let started = Instant::now();
    let result = tokio::time::timeout(commit_timeout, writer.write(items))
        .await
        .unwrap_or_else(|_| {
            Err(LoadError::Unavailable(format!(
                "the batch did not commit within {} ms",
                commit_timeout.as_millis()
            )))
        });
    let elapsed = started.elapsed().as_secs_f64();
    let summary = match result {
        Ok(summary) => {
            metrics.batch(count, elapsed);
            for (table, n) in &summary.loaded {
                metrics.loaded(*table, *n);
            }
            for (table, n) in &summary.rejected {
                metrics.rejected(*table, *n);
            }
            Ok(summary)
        }
        Err(error) => {
            tracing::error!(%error, events = count, "batch not committed; senders will retry");
            Err(error)
        }
    };
    metrics.queue(-(count as i64));
    if summary.as_ref().is_ok_and(|summary| summary.evolved) {
        *evolved.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((batch.len(), tokio::time::Instant::now()));
    }
    for (job, keys) in batch.into_iter().zip(keys) {
        let answer = summary.as_ref().map_err(Clone::clone).map(|summary| {
            let rejected = keys
                .iter()
                .filter(|key| summary.rejected_records.contains(key))
                .count();
            Outcome {
                loaded: keys.len() - rejected,
                rejected,
            }
        });
        // A sender that went away (client disconnected) needs no answer; its rows are loaded.
        let _ = job.done.send(answer);
    }
}

#[cfg(test)]
mod tests {
    //! The batcher on its own: a writer that records each batch's message ids, can be held busy
    //! (a gate it waits on) and refuses chosen records, so lingering, growth while writers are
    //! busy, admission and outcomes are checked without a database, on tokio's paused clock.

    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;
    use crate::normalize::Record;

    #[derive(Clone)]
    struct Recording {
        /// Each batch's message ids once its write began (before the gate).
        started: Arc<Mutex<Vec<Vec<String>>>>,
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        /// Each write waits for one permit; start with none to hold the writer busy.
        gate: Arc<Semaphore>,
        /// Message ids "the database" refuses (kept in `_sdc_rejected`).
        refuse: HashSet<String>,
        /// Message ids whose batch adds columns.
        evolve: HashSet<String>,
        /// Whether every batch fails as if the database were down.
        down: bool,
    }

    impl Recording {
        fn open() -> Recording {
            Recording::gated(Semaphore::MAX_PERMITS)
        }

        fn gated(permits: usize) -> Recording {
            Recording {
                started: Arc::default(),
                batches: Arc::default(),
                gate: Arc::new(Semaphore::new(permits)),
                refuse: HashSet::new(),
                evolve: HashSet::new(),
                down: false,
            }
        }

        fn batches(&self) -> Vec<Vec<String>> {
            self.batches.lock().expect("lock").clone()
        }

        fn started(&self) -> Vec<Vec<String>> {
            self.started.lock().expect("lock").clone()
        }
    }

    impl Writer for Recording {
        fn write(
            &self,
            items: Vec<Item>,
        ) -> impl Future<Output = Result<LoadSummary, LoadError>> + Send {
            let this = self.clone();
            async move {
                let ids: Vec<String> = items.iter().map(|i| i.record.message_id.clone()).collect();
                this.started.lock().expect("lock").push(ids.clone());
                this.gate.acquire().await.expect("gate").forget();
                this.batches.lock().expect("lock").push(ids.clone());
                if this.down {
                    return Err(LoadError::Unavailable("the database is down".to_owned()));
                }
                let refused: Vec<(Table, String)> = ids
                    .iter()
                    .filter(|id| this.refuse.contains(*id))
                    .map(|id| (Table::Track, id.clone()))
                    .collect();
                Ok(LoadSummary {
                    loaded: vec![(Table::Track, ids.len() - refused.len())],
                    rejected: vec![(Table::Track, refused.len())],
                    rejected_records: refused,
                    evolved: ids.iter().any(|id| this.evolve.contains(id)),
                })
            }
        }
    }

    fn config(max_batch_rows: usize, delay_ms: u64, queue_capacity: usize) -> LoaderConfig {
        LoaderConfig {
            max_batch_rows,
            max_batch_delay: Duration::from_millis(delay_ms),
            queue_capacity,
            writers: 1,
            commit_timeout: Duration::from_secs(15),
        }
    }

    fn start(writer: &Recording, config: LoaderConfig) -> (Loader, tokio::task::JoinHandle<()>) {
        Loader::start(writer.clone(), config, Arc::new(Metrics::new()))
    }

    /// Submits one job of records with these message ids.
    fn submit(loader: &Loader, ids: &[&str]) -> Result<Submitted, LoadError> {
        let records = ids
            .iter()
            .map(|id| {
                let record = Record {
                    table: Table::Track,
                    message_id: (*id).to_owned(),
                    fields: Vec::new(),
                };
                (record, Bytes::new())
            })
            .collect();
        loader.submit(records, Utc::now())
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    fn ids(batches: &[&[&str]]) -> Vec<Vec<String>> {
        batches
            .iter()
            .map(|b| b.iter().map(|id| (*id).to_owned()).collect())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_writer_takes_an_event_at_once_and_batches_grow_while_it_is_busy() {
        let writer = Recording::gated(0);
        let (loader, _task) = start(&writer, config(1000, 0, 100));
        let first = submit(&loader, &["a"]).expect("queued");
        settle().await;
        let later: Vec<Submitted> = ["b", "c", "d"]
            .iter()
            .map(|id| submit(&loader, &[id]).expect("queued"))
            .collect();
        settle().await;
        writer.gate.add_permits(10);
        first.await.expect("answer").expect("committed");
        for answer in later {
            answer.await.expect("answer").expect("committed");
        }
        assert_eq!(writer.batches(), ids(&[&["a"], &["b", "c", "d"]]));
    }

    /// A loader of two held writers, `max_batch_rows` rows a batch, with the batch ["a"] being
    /// written; the answers so far.
    async fn writing_a_with_two_writers(
        max_batch_rows: usize,
    ) -> (Recording, Loader, Vec<Submitted>) {
        let writer = Recording::gated(0);
        let config = LoaderConfig {
            writers: 2,
            ..config(max_batch_rows, 0, 100)
        };
        let (loader, _task) = start(&writer, config);
        let answers = vec![submit(&loader, &["a"]).expect("queued")];
        settle().await;
        (writer, loader, answers)
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_writer_takes_a_batch_only_once_it_has_waited_overlap_after() {
        let (writer, loader, mut answers) = writing_a_with_two_writers(1000).await;
        answers.push(submit(&loader, &["b"]).expect("queued"));
        settle().await;
        answers.push(submit(&loader, &["c"]).expect("queued"));
        settle().await;
        // "a" is being written: the next batch grows rather than taking the idle second writer.
        assert_eq!(writer.started(), ids(&[&["a"]]));
        tokio::time::sleep(OVERLAP_AFTER).await;
        assert_eq!(writer.started(), ids(&[&["a"], &["b", "c"]]));

        // A batch whose predecessor commits within OVERLAP_AFTER goes at once to the freed writer.
        writer.gate.add_permits(2);
        settle().await;
        answers.push(submit(&loader, &["d"]).expect("queued"));
        settle().await;
        answers.push(submit(&loader, &["e"]).expect("queued"));
        settle().await;
        assert_eq!(writer.started().len(), 3, "{:?}", writer.started());
        writer.gate.add_permits(1);
        settle().await;
        assert_eq!(
            writer.started(),
            ids(&[&["a"], &["b", "c"], &["d"], &["e"]])
        );
        writer.gate.add_permits(10);
        for answer in answers {
            answer.await.expect("answer").expect("committed");
        }
    }

    /// With one writer of `writer`'s kind and `max_batch_rows`: "x" is written while "p"
    /// queues; x's write ends, and its sender sends "y" `back_after` later. The batches as they
    /// were started (whatever their outcome).
    async fn p_queued_while_x_was_written(
        writer: Recording,
        max_batch_rows: usize,
        back_after: Duration,
    ) -> Vec<Vec<String>> {
        let writer = Recording {
            gate: Arc::new(Semaphore::new(0)),
            ..writer
        };
        let (loader, _task) = start(&writer, config(max_batch_rows, 0, 100));
        let x = submit(&loader, &["x"]).expect("queued");
        settle().await;
        let p = submit(&loader, &["p"]).expect("queued");
        settle().await;
        writer.gate.add_permits(1);
        let _ = x.await.expect("answer");
        tokio::time::sleep(back_after).await;
        let y = submit(&loader, &["y"]).expect("queued");
        writer.gate.add_permits(10);
        for answer in [p, y] {
            let _ = answer.await.expect("answer");
        }
        writer.started()
    }

    /// A writer whose batch holding "x" adds columns.
    fn x_evolves() -> Recording {
        let mut writer = Recording::open();
        writer.evolve.insert("x".to_owned());
        writer
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_batch_that_added_columns_the_next_waits_for_the_senders_it_answered() {
        let waited = ids(&[&["x"], &["p", "y"]]);
        let not_waited = ids(&[&["x"], &["p"], &["y"]]);
        assert_eq!(
            p_queued_while_x_was_written(x_evolves(), 1000, REGROUP / 2).await,
            waited
        );
        // Without new columns the next batch goes at once.
        assert_eq!(
            p_queued_while_x_was_written(Recording::open(), 1000, REGROUP / 2).await,
            not_waited
        );
        // A sender that does not come back within REGROUP is not waited for.
        assert_eq!(
            p_queued_while_x_was_written(x_evolves(), 1000, REGROUP * 2).await,
            not_waited
        );
        // Nor is one that would not fit: the batch is full.
        assert_eq!(
            p_queued_while_x_was_written(x_evolves(), 1, REGROUP / 2).await,
            not_waited
        );
        // Nor after a write that failed (its senders retry when they will).
        let failing = Recording {
            down: true,
            ..x_evolves()
        };
        assert_eq!(
            p_queued_while_x_was_written(failing, 1000, REGROUP / 2).await,
            not_waited
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_takes_another_writer_at_once() {
        let (writer, loader, mut answers) = writing_a_with_two_writers(2).await;
        answers.push(submit(&loader, &["b"]).expect("queued"));
        answers.push(submit(&loader, &["c"]).expect("queued"));
        settle().await;
        assert_eq!(writer.started(), ids(&[&["a"], &["b", "c"]]));
        writer.gate.add_permits(10);
        for answer in answers {
            answer.await.expect("answer").expect("committed");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_lingers_for_more_events_until_its_delay() {
        let writer = Recording::open();
        let (loader, _task) = start(&writer, config(1000, 50, 100));
        let a = submit(&loader, &["a"]).expect("queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let b = submit(&loader, &["b"]).expect("queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = submit(&loader, &["c"]).expect("queued");
        for answer in [a, b, c] {
            answer.await.expect("answer").expect("committed");
        }
        assert_eq!(writer.batches(), ids(&[&["a", "b"], &["c"]]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_max_batch_rows_without_splitting_a_job() {
        let writer = Recording::gated(0);
        let (loader, _task) = start(&writer, config(3, 0, 100));
        let mut answers = vec![submit(&loader, &["a"]).expect("queued")];
        settle().await;
        answers.push(submit(&loader, &["b", "c"]).expect("queued"));
        answers.push(submit(&loader, &["d", "e"]).expect("queued"));
        answers.push(submit(&loader, &["f"]).expect("queued"));
        settle().await;
        writer.gate.add_permits(10);
        for answer in answers {
            answer.await.expect("answer").expect("committed");
        }
        assert_eq!(
            writer.batches(),
            ids(&[&["a"], &["b", "c", "d", "e"], &["f"]])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_at_once_and_has_room_again_after_the_commit() {
        let writer = Recording::gated(0);
        let (loader, _task) = start(&writer, config(1000, 0, 2));
        let held = submit(&loader, &["a", "b"]).expect("queued");
        assert!(matches!(submit(&loader, &["c"]), Err(LoadError::QueueFull)));
        writer.gate.add_permits(2);
        held.await.expect("answer").expect("committed");
        let again = submit(&loader, &["c"]).expect("room after the commit");
        again.await.expect("answer").expect("committed");
        // A job larger than the whole queue takes all of it rather than never fitting.
        let large = submit(&loader, &["d", "e", "f"]).expect("takes the whole queue");
        writer.gate.add_permits(1);
        large.await.expect("answer").expect("committed");
    }

    #[tokio::test(start_paused = true)]
    async fn each_job_learns_its_own_outcome_and_a_failed_batch_fails_every_job() {
        let mut writer = Recording::gated(0);
        writer.refuse.insert("b2".to_owned());
        let (loader, _task) = start(&writer, config(1000, 0, 100));
        let busy = submit(&loader, &["x"]).expect("queued");
        settle().await;
        let a = submit(&loader, &["a1"]).expect("queued");
        let b = submit(&loader, &["b1", "b2"]).expect("queued");
        settle().await;
        writer.gate.add_permits(10);
        busy.await.expect("answer").expect("committed");
        assert_eq!(
            a.await.expect("answer").expect("committed"),
            Outcome {
                loaded: 1,
                rejected: 0
            }
        );
        assert_eq!(
            b.await.expect("answer").expect("committed"),
            Outcome {
                loaded: 1,
                rejected: 1
            }
        );

        let mut down = Recording::open();
        down.down = true;
        let (loader, _task) = start(&down, config(1000, 0, 100));
        let answer = submit(&loader, &["m"]).expect("queued");
        assert!(matches!(
            answer.await.expect("answer"),
            Err(LoadError::Unavailable(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_not_committed_within_the_commit_timeout_fails_its_jobs() {
        let writer = Recording::gated(0);
        let (loader, _task) = start(&writer, config(1000, 0, 100));
        let started = tokio::time::Instant::now();
        let answer = submit(&loader, &["stuck"]).expect("queued");
        match answer.await.expect("answer") {
            Err(LoadError::Unavailable(message)) => {
                assert!(message.contains("15000 ms"), "{message}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_loader_writes_what_is_queued_and_ends_the_batcher() {
        let writer = Recording::gated(0);
        let (loader, task) = start(&writer, config(1000, 0, 100));
        let answers: Vec<Submitted> = ["a", "b", "c"]
            .iter()
            .map(|id| submit(&loader, &[id]).expect("queued"))
            .collect();
        settle().await;
        drop(loader);
        writer.gate.add_permits(3);
        task.await.expect("the batcher ends");
        for answer in answers {
            answer.await.expect("answer").expect("committed");
        }
        let written: usize = writer.batches().iter().map(Vec::len).sum();
        assert_eq!(written, 3);
    }
}

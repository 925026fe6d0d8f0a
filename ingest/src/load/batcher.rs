//! The bounded queue and the batcher: many requests share one transaction (group commit).
//!
//! A batch takes every job already queued, up to `max_batch_rows` rows, lingers up to
//! `max_batch_delay` for more, then goes to the first free writer. While every writer is busy the
//! batch keeps growing, so batches get larger exactly when the database is the bottleneck, and an
//! idle service commits an event at once (with the default delay of zero). The queue is
//! bounded in events: when it is full, [`Loader::submit`] fails at once and the receiver answers
//! 503, so memory stays bounded and the sender retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use super::plan::{Item, TableRows};
use super::{LoadError, Rejected, Warehouse};
use crate::event::Table;
use crate::metrics::Metrics;
use crate::normalize::Record;
use crate::schema::Catalog;

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
    /// The summary of a batch written as `tables`, of which the database refused `refused`.
    pub(super) fn of(tables: &[TableRows<'_>], refused: &[Rejected]) -> LoadSummary {
        let mut summary = LoadSummary {
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
    /// Starts the batcher on `warehouse`. The batcher runs until every clone of the returned
    /// [`Loader`] is dropped, then writes what is queued and ends the returned task.
    pub fn start(
        warehouse: Warehouse,
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
        let task = tokio::spawn(run(receiver, warehouse, config, metrics));
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

async fn run(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    warehouse: Warehouse,
    config: LoaderConfig,
    metrics: Arc<Metrics>,
) {
    let catalog = Arc::new(Mutex::new(Catalog::default()));
    let writers = Arc::new(Semaphore::new(config.writers.max(1)));
    let max_rows = config.max_batch_rows.max(1);
    let mut tasks = JoinSet::new();
    let mut open = true;
    while open {
        let Some(first) = jobs.recv().await else {
            break;
        };
        let deadline = tokio::time::Instant::now() + config.max_batch_delay;
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
            // Linger for more events until the deadline; after it, go as soon as a writer is
            // free, and keep growing the batch while every writer is busy.
            let lingering = tokio::time::Instant::now() < deadline;
            tokio::select! {
                biased;
                job = jobs.recv() => match job {
                    Some(job) => { rows += job.items.len(); batch.push(job); }
                    None => open = false,
                },
                () = tokio::time::sleep_until(deadline), if lingering => {}
                permit = writers.clone().acquire_owned(), if !lingering => break permit,
            }
        };
        let Ok(permit) = permit else { break };
        tasks.spawn(write_batch(
            warehouse.clone(),
            catalog.clone(),
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

async fn write_batch(
    warehouse: Warehouse,
    catalog: Arc<Mutex<Catalog>>,
    mut batch: Vec<Job>,
    metrics: Arc<Metrics>,
    commit_timeout: Duration,
    _writer: OwnedSemaphorePermit,
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
    let result = tokio::time::timeout(commit_timeout, warehouse.write(&catalog, items))
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

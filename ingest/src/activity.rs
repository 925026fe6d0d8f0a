//! Loading activity per table for the status page: rows loaded and rejected since the process
//! started, the time of the last load, and per-minute counts of the last hour (a ring of
//! [`MINUTES`] buckets per table). Fed by the batcher where it counts `sluice_events_loaded`
//! and `sluice_records_rejected`; memory only, so a restart starts from zero.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};

use crate::event::Table;

/// The minutes of history kept per table.
pub const MINUTES: usize = 60;

/// One minute's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Minute {
    /// Rows upserted in that minute.
    pub loaded: u64,
    /// Records set aside in `_sdc_rejected` in that minute.
    pub rejected: u64,
}

#[derive(Debug, Clone, Default)]
struct TableActivity {
    loaded: u64,
    rejected: u64,
    last_load: Option<DateTime<Utc>>,
    /// `(minute since the epoch, counts)`, indexed by that minute modulo [`MINUTES`]; a bucket
    /// whose minute is older than the hour is stale and reads as zero.
    buckets: Vec<(i64, Minute)>,
}

/// A table's activity as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSummary {
    /// The table.
    pub table: Table,
    /// Rows upserted since the process started.
    pub loaded: u64,
    /// Records set aside in `_sdc_rejected` since the process started.
    pub rejected: u64,
    /// When rows were last committed to the table.
    pub last_load: Option<DateTime<Utc>>,
    /// The last [`MINUTES`] minutes, oldest first, the current minute last.
    pub minutes: Vec<Minute>,
}

/// The activity of every table, shared by the batcher and the status page.
#[derive(Debug, Default)]
pub struct Activity {
    tables: Mutex<BTreeMap<Table, TableActivity>>,
}

fn minute_of(time: DateTime<Utc>) -> i64 {
    time.timestamp().div_euclid(60)
}

fn slot(minute: i64) -> usize {
    // rem_euclid of a positive modulus is in 0..MINUTES.
    usize::try_from(minute.rem_euclid(MINUTES as i64)).unwrap_or(0)
}

impl Activity {
    /// Counts `loaded` rows and `rejected` records of `table` committed at `at`.
    pub fn record(&self, table: Table, loaded: u64, rejected: u64, at: DateTime<Utc>) {
        if loaded == 0 && rejected == 0 {
            return;
        }
        let minute = minute_of(at);
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let activity = tables.entry(table).or_default();
        activity.loaded += loaded;
        activity.rejected += rejected;
        if loaded > 0 {
            activity.last_load = Some(activity.last_load.map_or(at, |last| last.max(at)));
        }
        if activity.buckets.is_empty() {
            activity.buckets = vec![(i64::MIN, Minute::default()); MINUTES];
        }
        let bucket = &mut activity.buckets[slot(minute)];
        if bucket.0 != minute {
            *bucket = (minute, Minute::default());
        }
        bucket.1.loaded += loaded;
        bucket.1.rejected += rejected;
    }

    /// Every table with activity, in table order, its minutes ending with the one of `now`.
    pub fn summary(&self, now: DateTime<Utc>) -> Vec<TableSummary> {
        let current = minute_of(now);
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        tables
            .iter()
            .map(|(table, activity)| TableSummary {
                table: *table,
                loaded: activity.loaded,
                rejected: activity.rejected,
                last_load: activity.last_load,
                minutes: (current - MINUTES as i64 + 1..=current)
                    .map(|minute| {
                        activity
                            .buckets
                            .get(slot(minute))
                            .filter(|(at, _)| *at == minute)
                            .map_or_else(Minute::default, |(_, counts)| *counts)
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(minute: i64, second: u32) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 / 60 * 60 + minute * 60 + i64::from(second), 0)
            .single()
            .expect("a time")
    }

    #[test]
    fn counts_by_minute_and_in_total() {
        let activity = Activity::default();
        activity.record(Table::Track, 3, 0, at(0, 5));
        activity.record(Table::Track, 2, 1, at(0, 50));
        activity.record(Table::Track, 4, 0, at(2, 1));
        activity.record(Table::Page, 1, 0, at(2, 2));
        let summary = activity.summary(at(2, 30));
        assert_eq!(
            summary.iter().map(|s| s.table).collect::<Vec<_>>(),
            [Table::Page, Table::Track]
        );
        let track = &summary[1];
        assert_eq!((track.loaded, track.rejected), (9, 1));
        assert_eq!(track.last_load, Some(at(2, 1)));
        assert_eq!(track.minutes.len(), MINUTES);
        assert_eq!(
            track.minutes[MINUTES - 3..],
            [
                Minute {
                    loaded: 5,
                    rejected: 1
                },
                Minute::default(),
                Minute {
                    loaded: 4,
                    rejected: 0
                }
            ]
        );
    }

    #[test]
    fn minutes_older_than_the_hour_are_forgotten_but_totals_stay() {
        let activity = Activity::default();
        activity.record(Table::Identify, 7, 0, at(0, 0));
        // The same bucket, an hour later: the old count must not be added to.
        activity.record(Table::Identify, 1, 0, at(MINUTES as i64, 0));
        let summary = activity.summary(at(MINUTES as i64, 10));
        assert_eq!(summary[0].loaded, 8);
        assert_eq!(
            summary[0].minutes.iter().map(|m| m.loaded).sum::<u64>(),
            1,
            "only the last hour is charted"
        );
        let later = activity.summary(at(3 * MINUTES as i64, 0));
        assert!(later[0].minutes.iter().all(|m| *m == Minute::default()));
    }

    #[test]
    fn empty_batches_leave_no_trace() {
        let activity = Activity::default();
        activity.record(Table::Group, 0, 0, at(0, 0));
        assert!(activity.summary(at(0, 0)).is_empty());
    }
}

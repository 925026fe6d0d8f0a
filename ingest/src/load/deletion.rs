//! User deletion requests: every row of one `user_id` deleted from every event table of the
//! schema and from the tables that keep earlier versions of them (`track__v0`, see
//! [`super::reset`]), and the request recorded in `_sdc_deletions`, in one transaction.
//!
//! A request is identified by its message id. One already recorded is not carried out again:
//! its recorded counts are returned as they were, so a redelivery changes nothing (and rows of
//! the user loaded since are kept: deletion, not suppression).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::AssertSqlSafe;

use super::{LoadError, Tx, Warehouse};
use crate::event::Table;
use crate::normalize::format_timestamp;
use crate::schema;

/// A user deletion request: which message asked for it, and whose rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletionRequest {
    /// The message id of the request (a Segment `delete` event's `messageId`); a request is
    /// carried out once per message id.
    pub message_id: String,
    /// The `user_id` whose rows are deleted.
    pub user_id: String,
}

/// What a deletion request came to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deletion {
    /// The request's message id.
    pub message_id: String,
    /// The user whose rows were deleted.
    pub user_id: String,
    /// Rows deleted per event table (every event table of the schema, 0 included), and per
    /// table keeping an earlier version of one (`track__v0`, see [`super::reset`]).
    pub deleted: BTreeMap<String, i64>,
    /// Whether the request had been carried out before (a redelivery): then nothing was
    /// deleted now, and `deleted` is what the first time deleted.
    pub already_done: bool,
}

impl Warehouse {
    /// Deletes every row of the request's user from every event table of the schema and from
    /// the tables that keep their earlier versions, and records the counts in `_sdc_deletions`,
    /// in one transaction; returns after the commit. A
    /// request whose message id is already recorded is not carried out again.
    pub async fn delete_user(&self, request: &DeletionRequest) -> Result<Deletion, LoadError> {
        let catalog = self.catalog().await?;
        let tables: Vec<Table> = Table::ALL
            .into_iter()
            .filter(|t| !catalog.table(*t).is_empty())
            .collect();
        let mut tx = self.begin().await.map_err(|e| self.error(e))?;
        // The request is claimed first: its rows of `_sdc_deletions` are inserted, counts still
        // 0. One recorded before, or being carried out by a concurrent transaction (on
        // PostgreSQL the insert waits for that one to end), conflicts: then nothing is deleted,
        // and what was recorded is read back. So two deliveries at once delete once.
        let claim: BTreeMap<String, i64> =
            tables.iter().map(|t| (t.name().to_owned(), 0)).collect();
        let claimed = tx
            .record_deletion(&self.schema, request, &claim, Utc::now())
            .await
            .map_err(|e| self.error(e))?;
        if claimed < claim.len() as u64 {
            // Dropping the transaction rolls back whatever part of the claim was inserted.
            drop(tx);
            let mut read = self.begin().await.map_err(|e| self.error(e))?;
            let recorded = read
                .recorded_deletion(&self.schema, &request.message_id)
                .await
                .map_err(|e| self.error(e))?;
            drop(read);
            let (user_id, deleted) = recorded.unwrap_or_else(|| (request.user_id.clone(), claim));
            return Ok(Deletion {
                message_id: request.message_id.clone(),
                user_id,
                deleted,
                already_done: true,
            });
        }
        let mut deleted = BTreeMap::new();
        for table in tables {
            let rows = tx
                .delete_user_rows(&self.schema, table.name(), &request.user_id)
                .await
                .map_err(|e| self.error(e))?;
            tx.count_deletion(&self.schema, &request.message_id, table, rows)
                .await
                .map_err(|e| self.error(e))?;
            deleted.insert(table.name().to_owned(), rows);
        }
        // The rows of earlier table versions that resets kept (`track__v0`) are the user's rows
        // too. Read after the event tables' deletions, which waited for any reset under way (it
        // locks them), so a table it kept is listed; a later reset waits for this transaction.
        let mut kept = BTreeMap::new();
        for name in tx
            .kept_tables(&self.schema)
            .await
            .map_err(|e| self.error(e))?
        {
            let rows = tx
                .delete_user_rows(&self.schema, &name, &request.user_id)
                .await
                .map_err(|e| self.error(e))?;
            kept.insert(name, rows);
        }
        tx.record_deletion(&self.schema, request, &kept, Utc::now())
            .await
            .map_err(|e| self.error(e))?;
        deleted.extend(kept);
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(Deletion {
            message_id: request.message_id.clone(),
            user_id: request.user_id.clone(),
            deleted,
            already_done: false,
        })
    }
}

/// A recorded deletion: the user and the rows deleted per table.
type Recorded = (String, BTreeMap<String, i64>);

impl Tx {
    /// The deletion recorded for `message_id`, if any.
    async fn recorded_deletion(
        &mut self,
        schema: &str,
        message_id: &str,
    ) -> Result<Option<Recorded>, sqlx::Error> {
        let sql = schema::recorded_deletion_sql(self.dialect(), schema);
        let rows: Vec<(String, String, i64)> = match self {
            Tx::Postgres(tx) => {
                sqlx::query_as(AssertSqlSafe(sql))
                    .bind(message_id)
                    .fetch_all(&mut **tx)
                    .await?
            }
            Tx::Sqlite(tx) => {
                sqlx::query_as(AssertSqlSafe(sql))
                    .bind(message_id)
                    .fetch_all(&mut **tx)
                    .await?
            }
        };
        let Some((_, user_id, _)) = rows.first() else {
            return Ok(None);
        };
        let user_id = user_id.clone();
        let counts = rows.into_iter().map(|(t, _, n)| (t, n)).collect();
        Ok(Some((user_id, counts)))
    }

    /// The tables that keep the rows of earlier table versions (`track__v0`) and still exist,
    /// in name order; none when no table was ever reset.
    async fn kept_tables(&mut self, schema: &str) -> Result<Vec<String>, sqlx::Error> {
        let existing = self.existing(schema).await?;
        if !existing.relations.contains(schema::VERSIONS_TABLE) {
            return Ok(Vec::new());
        }
        let sql = schema::kept_tables_sql(schema);
        let names: Vec<(String,)> = self.fetch_all(sql).await?;
        Ok(names
            .into_iter()
            .map(|(name,)| name)
            .filter(|name| existing.relations.contains(name))
            .collect())
    }

    /// Deletes the rows of `user_id` from the table `table`; returns how many.
    async fn delete_user_rows(
        &mut self,
        schema: &str,
        table: &str,
        user_id: &str,
    ) -> Result<i64, sqlx::Error> {
        let sql = schema::delete_user_rows_sql(self.dialect(), schema, table);
        let affected = match self {
            Tx::Postgres(tx) => sqlx::query(AssertSqlSafe(sql))
                .bind(user_id)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            Tx::Sqlite(tx) => sqlx::query(AssertSqlSafe(sql))
                .bind(user_id)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        };
        Ok(i64::try_from(affected).unwrap_or(i64::MAX))
    }

    /// Sets the rows deleted from `table` in the deletion recorded for `message_id`.
    async fn count_deletion(
        &mut self,
        schema: &str,
        message_id: &str,
        table: Table,
        rows: i64,
    ) -> Result<(), sqlx::Error> {
        let sql = schema::count_deletion_sql(self.dialect(), schema);
        macro_rules! bind_count {
            () => {
                sqlx::query(AssertSqlSafe(sql))
                    .bind(rows)
                    .bind(message_id)
                    .bind(table.name())
            };
        }
        match self {
            Tx::Postgres(tx) => bind_count!().execute(&mut **tx).await.map(drop),
            Tx::Sqlite(tx) => bind_count!().execute(&mut **tx).await.map(drop),
        }
    }

    /// Records a deletion in `_sdc_deletions`, one row per table, unless rows of its message id
    /// and those tables are there already; returns how many rows it inserted.
    async fn record_deletion(
        &mut self,
        schema: &str,
        request: &DeletionRequest,
        deleted: &BTreeMap<String, i64>,
        at: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error> {
        if deleted.is_empty() {
            return Ok(0);
        }
        let sql = schema::insert_deletions_sql(self.dialect(), schema, deleted.len());
        // The same parameters on both databases; only the time's encoding differs.
        macro_rules! bind_rows {
            ($at:expr) => {{
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for (table, rows) in deleted {
                    query = query
                        .bind(request.message_id.as_str())
                        .bind(table.as_str())
                        .bind(request.user_id.as_str())
                        .bind(*rows)
                        .bind($at);
                }
                query
            }};
        }
        match self {
            Tx::Postgres(tx) => Ok(bind_rows!(at).execute(&mut **tx).await?.rows_affected()),
            Tx::Sqlite(tx) => {
                let at = format_timestamp(&at);
                Ok(bind_rows!(at.as_str())
                    .execute(&mut **tx)
                    .await?
                    .rows_affected())
            }
        }
    }
}

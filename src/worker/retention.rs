//! Retention: keeps `queue.history` bounded. The launcher runs a pass every
//! `RETENTION_EVERY` ticks:
//! 1. history partitions older than every queue's retention are dropped whole (no DELETE);
//! 2. a queue (and terminal state) whose retention is shorter than that has its old rows
//!    deleted in batches of `BATCH` rows, each batch its own transaction, so that a pass
//!    never holds many row locks nor for long; same for old rows in the default partition
//!    and for `queue.schedule_runs` older than a day.
//!
//! Every statement runs under a short lock_timeout: retention waits for nobody; a partition
//! it could not lock is dropped on a later pass.

use super::{transaction, SqlError};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Rows per delete batch.
const BATCH: i64 = 1000;
/// A pass stops starting batches after this long; the rest waits for the next pass.
const PASS_BUDGET: Duration = Duration::from_millis(200);
/// How long a retention statement waits for a lock before giving up (until next pass).
const LOCK_TIMEOUT: &str = "100ms";

/// The longest retention of any queue and state: history older than that is garbage.
const MAX_RETENTION_SQL: &str = "
SELECT coalesce(max(greatest(q.retention, q.retention_succeeded, q.retention_failed,
                             q.retention_cancelled)), interval '7 days')::text
  FROM queue.queues q";

/// Daily partitions whose whole day ended before now - the longest retention.
const OLD_PARTITIONS_SQL: &str = "
SELECT c.relname::text
  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
 WHERE i.inhparent = 'queue.history'::regclass AND c.relname ~ '^history_[0-9]{8}$'
   AND (to_date(substr(c.relname, 9), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
       <= now() - ($1)::interval
 ORDER BY 1";

/// (queue, state, retention) whose retention is shorter than the longest.
const SHORT_RETENTIONS_SQL: &str = "
SELECT q.name, s.state, s.retention
  FROM queue.queues q
 CROSS JOIN LATERAL (VALUES ('succeeded', coalesce(q.retention_succeeded, q.retention)),
                            ('failed', coalesce(q.retention_failed, q.retention)),
                            ('cancelled', coalesce(q.retention_cancelled, q.retention)))
       AS s(state, retention)
 WHERE s.retention < ($1)::interval
 ORDER BY 1, 2";

/// One batch of a queue's terminal jobs in one state older than its retention, oldest
/// first (keyset on the (queue, finished_at) index). Each batch statement returns how
/// many rows it deleted.
const DELETE_QUEUE_BATCH_SQL: &str = "
WITH old AS (
    SELECT h.id, h.finished_at FROM queue.history h
     WHERE h.queue = $1 AND h.state = $2::queue.job_state AND h.finished_at < now() - $3::interval
     ORDER BY h.finished_at
     LIMIT $4
), d AS (
    DELETE FROM queue.history h USING old
     WHERE h.id = old.id AND h.finished_at = old.finished_at AND h.finished_at < now() - $3::interval
    RETURNING 1
)
SELECT count(*) FROM d";

/// One batch of rows in the default partition (days without a partition) past every
/// retention, and of schedule runs older than a day.
const DELETE_DEFAULT_BATCH_SQL: &str = "
WITH d AS (
    DELETE FROM queue.history_default
     WHERE ctid = ANY(ARRAY(SELECT ctid FROM queue.history_default
                             WHERE finished_at < now() - ($1)::interval LIMIT $2))
    RETURNING 1
)
SELECT count(*) FROM d";
const DELETE_RUNS_BATCH_SQL: &str = "
WITH d AS (
    DELETE FROM queue.schedule_runs
     WHERE ctid = ANY(ARRAY(SELECT ctid FROM queue.schedule_runs
                             WHERE fired_at < now() - interval '1 day' LIMIT $1))
    RETURNING 1
)
SELECT count(*) FROM d";

/// What a pass did, for the launcher's log.
#[derive(Default)]
pub struct Report {
    pub partitions_dropped: Vec<String>,
    /// (what, rows deleted, batches)
    pub deleted: Vec<(String, i64, i64)>,
}

/// One retention pass. Runs its own transactions (call it outside one).
pub fn run_pass() -> Result<Report, SqlError> {
    let started = Instant::now();
    let mut report = Report::default();
    let max = in_tx(|| Spi::get_one::<String>(MAX_RETENTION_SQL).map_err(SqlError::from))?
        .unwrap_or_else(|| "7 days".into());

    let parts = in_tx(|| {
        let mut names = Vec::new();
        Spi::connect(|c| -> Result<(), SqlError> {
            for row in c.select(OLD_PARTITIONS_SQL, None, &[max.as_str().into()])? {
                if let Some(n) = row.get::<String>(1)? {
                    names.push(n);
                }
            }
            Ok(())
        })?;
        Ok(names)
    })?;
    for part in parts {
        // format('%I'): the name comes from the catalog, quoted all the same.
        let dropped = in_tx(|| {
            // Partitions are members of the extension (see create_history_partitions).
            Spi::get_one_with_args::<String>(
                "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_depend WHERE classid = 'pg_class'::regclass
                                             AND objid = format('queue.%I', $1::text)::regclass
                                             AND deptype = 'e')
                             THEN format('ALTER EXTENSION pg_queue DROP TABLE queue.%I; ', $1::text)
                             ELSE '' END
                        || format('DROP TABLE queue.%I', $1::text)",
                &[part.as_str().into()],
            )?
            .map(|sql| Spi::run(&sql))
            .transpose()
            .map_err(SqlError::from)
        });
        match dropped {
            Ok(_) => report.partitions_dropped.push(part),
            Err(e) => {
                log!("pg_queue launcher: retention could not drop queue.{part}: {e}; will retry")
            }
        }
    }

    let shorts = in_tx(|| {
        let mut v = Vec::new();
        Spi::connect(|c| -> Result<(), SqlError> {
            for row in c.select(SHORT_RETENTIONS_SQL, None, &[max.as_str().into()])? {
                if let (Some(q), Some(s), Some(r)) = (
                    row.get::<String>(1)?,
                    row.get::<String>(2)?,
                    row.get::<pgrx::datum::Interval>(3)?,
                ) {
                    v.push((q, s, r));
                }
            }
            Ok(())
        })?;
        Ok(v)
    })?;
    for (queue, state, retention) in shorts {
        let n = batches(started, |limit| {
            Spi::get_one_with_args::<i64>(
                DELETE_QUEUE_BATCH_SQL,
                &[
                    queue.as_str().into(),
                    state.as_str().into(),
                    retention.into(),
                    limit.into(),
                ],
            )
        })?;
        report.push(format!("queue {queue} ({state})"), n);
    }
    let n = batches(started, |limit| {
        Spi::get_one_with_args::<i64>(
            DELETE_DEFAULT_BATCH_SQL,
            &[max.as_str().into(), limit.into()],
        )
    })?;
    report.push("default partition".into(), n);
    let n = batches(started, |limit| {
        Spi::get_one_with_args::<i64>(DELETE_RUNS_BATCH_SQL, &[limit.into()])
    })?;
    report.push("schedule runs".into(), n);
    Ok(report)
}

impl Report {
    fn push(&mut self, what: String, (rows, batches): (i64, i64)) {
        if rows > 0 {
            self.deleted.push((what, rows, batches));
        }
    }
}

/// Runs delete batches (each its own transaction) until one deletes less than a full batch
/// or the pass is over budget. Returns (rows, batches).
fn batches(
    started: Instant,
    batch: impl Fn(i64) -> Result<Option<i64>, pgrx::spi::SpiError> + Copy + std::panic::UnwindSafe,
) -> Result<(i64, i64), SqlError> {
    let (mut rows, mut count) = (0, 0);
    while started.elapsed() < PASS_BUDGET {
        let n = in_tx(move || batch(BATCH).map_err(SqlError::from))?.unwrap_or(0);
        rows += n;
        count += 1;
        if n < BATCH {
            break;
        }
    }
    Ok((rows, count))
}

/// A transaction whose statements give up on locks after LOCK_TIMEOUT.
fn in_tx<R>(
    f: impl FnOnce() -> Result<R, SqlError> + std::panic::UnwindSafe,
) -> Result<R, SqlError> {
    transaction(|| {
        Spi::run(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))?;
        f()
    })
    .and_then(|r| r)
}

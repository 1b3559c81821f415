//! Maintenance duties the launcher runs on its cadence: reaping jobs of dead executors and
//! creating history partitions ahead of time. Each is one bounded statement, callable from
//! any worker inside a transaction.

use super::SqlError;
use pgrx::prelude::*;

/// Most jobs one reap statement moves, so a tick never holds many row locks for long.
const REAP_LIMIT: i64 = 1000;

/// Returns running jobs of dead executors to queued (backoff applies, the failed attempt is
/// recorded with `message`) or, with no attempts left, to failed. A job is dead when its
/// executor is `dead`, or, with `dead` None, when its executor is not in `live` and it was
/// claimed before `cutoff` (an executor that registered after `live` was read can only have
/// claimed later). Jobs locked by a live batch are skipped. Returns how many moved.
const REAP_SQL: &str = "
WITH dead AS (
    SELECT id FROM queue.jobs
     WHERE state = 'running' AND worker_id IS NOT NULL
       AND CASE WHEN $2::uuid IS NOT NULL THEN worker_id = $2::uuid
                ELSE worker_id <> ALL($1::uuid[]) AND started_at < $3::timestamptz END
     ORDER BY id
     LIMIT $5
     FOR UPDATE SKIP LOCKED
), retried AS (
    UPDATE queue.jobs j
       SET state = 'queued', started_at = NULL, worker_pid = NULL, worker_id = NULL,
           lease_token = NULL,
           errors = j.errors || jsonb_build_object('attempt', j.attempts, 'at', clock_timestamp(),
                                                   'sqlstate', 'XX000', 'message', $4::text,
                                                   'worker_pid', j.worker_pid),
           run_at = clock_timestamp() + coalesce(
               (SELECT queue.backoff(q.backoff_base, q.backoff_max, j.attempts)
                  FROM queue.queues q WHERE q.name = j.queue), interval '0')
      FROM dead
     WHERE j.id = dead.id AND j.attempts < j.max_attempts
    RETURNING j.id
), failed AS (
    DELETE FROM queue.jobs j USING dead
     WHERE j.id = dead.id AND j.attempts >= j.max_attempts
    RETURNING j.*
), history AS (
    INSERT INTO queue.history (id, queue, state, payload, priority, run_at, attempts, max_attempts,
                               timeout, created_at, started_at, finished_at, worker_pid, errors)
    SELECT id, queue, 'failed', payload, priority, run_at, attempts, max_attempts, timeout,
           created_at, started_at, clock_timestamp(), worker_pid,
           errors || jsonb_build_object('attempt', attempts, 'at', clock_timestamp(),
                                        'sqlstate', 'XX000', 'message', $4::text,
                                        'worker_pid', worker_pid)
      FROM failed
    RETURNING 1
)
SELECT (SELECT count(*) FROM retried) + (SELECT count(*) FROM history)";

/// Runs REAP_SQL: the jobs of executor `dead`, or of every executor not in `live` claimed
/// before `cutoff` (read by the caller before it read the registry).
pub fn reap(
    live: &[pgrx::Uuid],
    dead: Option<pgrx::Uuid>,
    cutoff: Option<pgrx::datum::TimestampWithTimeZone>,
    message: &str,
) -> Result<i64, SqlError> {
    Spi::get_one_with_args::<i64>(
        REAP_SQL,
        &[
            live.to_vec().into(),
            dead.into(),
            cutoff.into(),
            message.into(),
            REAP_LIMIT.into(),
        ],
    )
    .map(|n| n.unwrap_or(0))
    .map_err(SqlError::from)
}

/// Creates tomorrow's and the next days' history partitions if missing.
pub fn create_partitions() -> Result<i32, SqlError> {
    Spi::get_one::<i32>("SELECT queue.create_history_partitions(3)")
        .map(|n| n.unwrap_or(0))
        .map_err(SqlError::from)
}

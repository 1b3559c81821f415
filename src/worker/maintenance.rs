//! Maintenance duties the launcher runs on its cadence: reaping jobs of dead executors and
//! expired consumer leases, announcing NOTIFY-queue jobs that became ready by time, and
//! creating history partitions ahead of time. Each is one bounded statement, callable from
//! any backend inside a transaction.

use super::SqlError;
use crate::shmem;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use std::time::Duration;

/// Most jobs one reap statement moves, so a tick never holds many row locks for long.
const REAP_LIMIT: i64 = 1000;

/// Returns running jobs whose owner is gone to queued (backoff applies, the failed attempt
/// is recorded with `message`, or 'lease expired') or, with no attempts left, to failed.
/// A job's owner is gone when its executor is `dead`; or, with `dead` None, when its
/// consumer's lease expired, or ($6, only once an executor left the registry) when its
/// executor is not in `live` and it was claimed before `cutoff` (an executor that registered
/// after `live` was read can only have claimed later). Jobs locked by a live batch (or a
/// consumer's call in progress) are skipped. Returns how many moved.
/// The candidates come from jobs_leases_idx, and from jobs_running_idx only when $6: under
/// a long transaction elsewhere that index keeps an entry for every job run since it began,
/// and reading them all every second cost the scheduler 45 ms after five minutes. Leases
/// are looked up by `lease_expires_at` alone (only a consumer's running job has one:
/// jobs_consumer_has_lease), so that no statistics can make the planner read them from
/// jobs_running_idx; and the jobs to move by `id = ANY` of the candidates, beside the join,
/// so that it fetches them by primary key rather than walk the whole of it (both happened,
/// under a held snapshot: 100 ms a tick, docs/design.md "Under a held snapshot").
const REAP_SQL: &str = "
WITH dead AS (
    -- The candidates are listed by the ARRAY below; the CASE says it again so that a row
    -- changed meanwhile is checked anew when locked. Its state tests are inside the CASE
    -- so that the planner cannot read this scan from jobs_running_idx.
    SELECT id, CASE WHEN consumer IS NULL THEN $4::text
                    ELSE 'lease expired (consumer ' || consumer || ')' END AS message
      FROM queue.jobs
     WHERE CASE WHEN $2::uuid IS NOT NULL THEN state = 'running' AND worker_id = $2::uuid
                WHEN consumer IS NOT NULL THEN state = 'running' AND lease_expires_at < clock_timestamp()
                ELSE $6 AND state = 'running' AND worker_id <> ALL($1::uuid[])
                     AND started_at < $3::timestamptz END
       AND id = ANY(ARRAY(
               SELECT id FROM queue.jobs
                WHERE lease_expires_at IS NOT NULL AND lease_expires_at < clock_timestamp()
               UNION ALL
               SELECT id FROM queue.jobs
                WHERE ($6 OR $2::uuid IS NOT NULL) AND state = 'running' AND consumer IS NULL
                  AND CASE WHEN $2::uuid IS NOT NULL THEN worker_id = $2::uuid
                           ELSE worker_id <> ALL($1::uuid[]) AND started_at < $3::timestamptz END))
     ORDER BY id
     LIMIT $5
     FOR UPDATE SKIP LOCKED
), retried AS (
    UPDATE queue.jobs j
       SET state = 'queued', started_at = NULL, worker_pid = NULL, worker_id = NULL,
           consumer = NULL, lease = NULL, lease_expires_at = NULL, lease_token = NULL, progress = NULL,
           errors = j.errors || (jsonb_build_object('attempt', j.attempts, 'at', clock_timestamp(),
                                                    'started_at', j.started_at,
                                                    'sqlstate', 'XX000', 'message', dead.message,
                                                    'worker_pid', j.worker_pid)
                                 || queue.progress_entry(j.progress)),
           run_at = clock_timestamp() + coalesce(
               (SELECT queue.backoff(q.backoff_base, q.backoff_max, j.attempts)
                  FROM queue.queues q WHERE q.name = j.queue), interval '0')
      FROM dead
     WHERE j.id = ANY(ARRAY(SELECT id FROM dead)) AND j.id = dead.id AND j.attempts < j.max_attempts
    RETURNING j.id
), failed AS (
    DELETE FROM queue.jobs j USING dead
     WHERE j.id = ANY(ARRAY(SELECT id FROM dead)) AND j.id = dead.id AND j.attempts >= j.max_attempts
    RETURNING j.*, dead.message
), history AS (
    INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts,
                               max_attempts, timeout, created_at, started_at, finished_at, worker_pid,
                               consumer, progress, snoozes, fair_key, errors)
    SELECT id, queue, 'failed', payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts, max_attempts, timeout,
           created_at, started_at, clock_timestamp(), worker_pid, consumer, progress, snoozes, fair_key,
           errors || (jsonb_build_object('attempt', attempts, 'at', clock_timestamp(),
                                         'started_at', started_at,
                                         'sqlstate', 'XX000', 'message', message,
                                         'worker_pid', worker_pid)
                      || queue.progress_entry(progress))
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
    executors: bool,
) -> Result<i64, SqlError> {
    super::plan_by_index();
    Spi::get_one_with_args::<i64>(
        REAP_SQL,
        &[
            live.to_vec().into(),
            dead.into(),
            cutoff.into(),
            message.into(),
            REAP_LIMIT.into(),
            executors.into(),
        ],
    )
    .map(|n| n.unwrap_or(0))
    .map_err(SqlError::from)
}

/// One reap pass as the scheduler runs it: jobs of consumers whose lease expired and, with
/// `executors`, of executors missing from the registry. Must run in a transaction. Returns
/// how many jobs moved, and whether that was all (a pass moves at most REAP_LIMIT).
pub fn reap_dead_owners(executors: bool) -> Result<(i64, bool), SqlError> {
    // Cutoff before reading the registry: see REAP_SQL.
    let cutoff = Spi::get_one::<TimestampWithTimeZone>("SELECT clock_timestamp()")?;
    let live: Vec<pgrx::Uuid> = shmem::executors()
        .into_iter()
        .map(|e| pgrx::Uuid::from_bytes(*e.id.as_bytes()))
        .collect();
    let n = reap(&live, None, cutoff, "executor died", executors)?;
    Ok((n, n < REAP_LIMIT))
}

/// Notifies the consumers of NOTIFY queues of jobs whose run_at passed in ($1 - $2
/// seconds, $3] ($1 NULL: ever). An enqueue of a ready job notifies by itself: only jobs
/// with run_at > created_at, in jobs_scheduled_idx, become ready by time. One
/// notification per queue and pass: the job's id when one became ready, empty when
/// several did. State is tested inside a CASE, here and in NEXT_DEADLINE_SQL, so that the
/// planner cannot read jobs_ready_idx instead (sql/schema.sql).
const ANNOUNCE_SQL: &str = "
WITH due AS (
    SELECT j.queue, count(*) AS n, min(j.id::text) AS id
      FROM queue.jobs j JOIN queue.queues q ON q.name = j.queue AND q.notify AND NOT q.paused
     WHERE j.run_at > j.created_at AND j.run_at <= $3
       AND j.run_at > coalesce($1 - make_interval(secs => $2), '-infinity')
       AND CASE j.state WHEN 'queued' THEN true END
     GROUP BY j.queue
)
SELECT count(pg_notify(queue.channel(queue), CASE WHEN n = 1 THEN id ELSE '' END)) FROM due";

/// When the launcher must look again: the next run_at of a NOTIFY-queue job, the next
/// expiry of a consumer's lease (from jobs_leases_idx alone: see REAP_SQL), or the next
/// plan of a schedule, whichever comes first.
const NEXT_DEADLINE_SQL: &str = "
SELECT ceil(extract(epoch FROM least(
           (SELECT min(j.run_at) FROM queue.jobs j JOIN queue.queues q ON q.name = j.queue AND q.notify
             WHERE j.run_at > j.created_at AND j.run_at > $1 AND CASE j.state WHEN 'queued' THEN true END),
           (SELECT min(lease_expires_at) FROM queue.jobs
             WHERE lease_expires_at IS NOT NULL AND lease_expires_at > $1),
           (SELECT min(next_run_at) FROM queue.schedule_defs WHERE enabled AND next_run_at > $1))
       - clock_timestamp()) * 1000)::int8";

/// Announces NOTIFY-queue jobs that became ready in (`since` - `lookback`, now] (`since`
/// None: ever), and says how long until the next deadline. A job whose run_at passed
/// before its enqueue committed is missed by the pass that covered its run_at; the caller
/// looks back now and then to catch it (a duplicate costs a consumer one empty claim).
/// Returns (now, the next `since`; time to the next deadline).
pub fn announce_ready(
    since: Option<TimestampWithTimeZone>,
    lookback: Duration,
) -> Result<(Option<TimestampWithTimeZone>, Option<Duration>), SqlError> {
    super::plan_by_index();
    let now = Spi::get_one::<TimestampWithTimeZone>("SELECT clock_timestamp()")?;
    Spi::get_one_with_args::<i64>(
        ANNOUNCE_SQL,
        &[since.into(), lookback.as_secs_f64().into(), now.into()],
    )?;
    let ms = Spi::get_one_with_args::<i64>(NEXT_DEADLINE_SQL, &[now.into()])?;
    Ok((now, ms.map(|ms| Duration::from_millis(ms.max(1) as u64))))
}

/// Forgets external consumers unseen for a day that hold no job.
pub fn forget_consumers() -> Result<(), SqlError> {
    Spi::run(
        "DELETE FROM queue.consumers c WHERE c.last_seen < now() - interval '1 day'
            AND NOT EXISTS (SELECT 1 FROM queue.jobs j WHERE j.consumer = c.name)",
    )
    .map_err(SqlError::from)
}

/// Creates tomorrow's and the next days' history partitions if missing.
pub fn create_partitions() -> Result<i32, SqlError> {
    Spi::get_one::<i32>("SELECT queue.create_history_partitions(3)")
        .map(|n| n.unwrap_or(0))
        .map_err(SqlError::from)
}

/// Marks the queues that hold their `max_pending_jobs` live jobs (the queue's limit, or the
/// server's `queue.max_pending_jobs` = $1) full, so that `enqueue` refuses with 54000, and
/// clears the mark once they drained below it. Counting a queue stops at its limit, and is
/// skipped altogether while no queue is marked and `queue.jobs` holds fewer rows (by its
/// statistics) than the smallest limit: the common case costs two catalog reads.
const MARK_FULL_SQL: &str = "
WITH lim AS (
    SELECT q.name, least(coalesce(q.max_pending_jobs, $1), $1) AS n, q.is_full FROM queue.queues q
), need AS (
    SELECT bool_or(l.is_full)
           OR greatest(pg_stat_get_live_tuples('queue.jobs'::regclass),
                       (SELECT c.reltuples::bigint FROM pg_class c WHERE c.oid = 'queue.jobs'::regclass))
              >= min(l.n) AS yes
      FROM lim l
), counted AS (
    SELECT l.name,
           (SELECT count(*) FROM (SELECT 1 FROM queue.jobs j WHERE j.queue = l.name LIMIT l.n) x) >= l.n AS at_limit
      FROM lim l
     WHERE (SELECT yes FROM need)
)
UPDATE queue.queues q SET is_full = c.at_limit
  FROM counted c
 WHERE q.name = c.name AND q.is_full IS DISTINCT FROM c.at_limit
RETURNING q.name, q.is_full";

/// Runs MARK_FULL_SQL; returns the queues whose mark changed, with the new mark.
pub fn mark_full_queues() -> Result<Vec<(String, bool)>, SqlError> {
    Spi::connect_mut(|client| {
        let mut changed = Vec::new();
        for row in client.update(
            MARK_FULL_SQL,
            None,
            &[crate::gucs::max_pending_jobs().into()],
        )? {
            if let (Some(name), Some(full)) = (row.get::<String>(1)?, row.get::<bool>(2)?) {
                changed.push((name, full));
            }
        }
        Ok(changed)
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{ANNOUNCE_SQL, NEXT_DEADLINE_SQL, REAP_SQL};
    use pgrx::datum::DatumWithOid;
    use pgrx::prelude::*;

    fn now() -> Option<pgrx::datum::TimestampWithTimeZone> {
        Spi::get_one("SELECT now()").expect("now()")
    }

    /// Asserts that none of the named plans reads `index`.
    fn assert_not_read<const N: usize>(index: &str, plans: [(&str, Vec<(String, bool)>); N]) {
        for (what, scans) in plans {
            assert!(scans.iter().all(|(i, _)| i != index), "{what}: {scans:?}");
        }
    }

    fn reap_args(executors: bool) -> Vec<DatumWithOid<'static>> {
        vec![
            Vec::<pgrx::Uuid>::new().into(),
            Option::<pgrx::Uuid>::None.into(),
            now().into(),
            "executor died".into(),
            1000i64.into(),
            executors.into(),
        ]
    }

    /// Under a long transaction elsewhere, jobs_running_idx holds an entry for every job
    /// run since it began: the scheduler's per-second lease lookups must not be able to read
    /// it, whatever the statistics say. With jobs_leases_idx gone, a query the planner could
    /// serve from jobs_running_idx would now be planned on it.
    #[pg_test]
    fn lease_lookups_cannot_read_the_running_jobs_index() {
        Spi::run("DROP INDEX queue.jobs_leases_idx").expect("drop");
        assert_not_read(
            "jobs_running_idx",
            [
                (
                    "reap",
                    crate::worker::index_scans(REAP_SQL, &reap_args(false)),
                ),
                (
                    "next deadline",
                    crate::worker::index_scans(NEXT_DEADLINE_SQL, &[now().into()]),
                ),
            ],
        );
    }

    /// The reap fetches the jobs it moves by primary key: a scan of jobs_pkey without an
    /// index condition walks an entry for every row version a long transaction keeps. The
    /// planner chose one for a drained queue (no live rows by the statistics), planning a
    /// join to the few candidates as a walk of the whole key.
    #[pg_test]
    fn the_reap_reads_the_primary_key_only_by_id() {
        Spi::run("ANALYZE queue.jobs").expect("analyze");
        for executors in [false, true] {
            let scans = crate::worker::index_scans(REAP_SQL, &reap_args(executors));
            assert!(
                scans.iter().any(|(index, _)| index == "jobs_pkey"),
                "{scans:?}"
            );
            assert!(
                scans
                    .iter()
                    .all(|(index, cond)| index != "jobs_pkey" || *cond),
                "executors {executors}: {scans:?}"
            );
        }
    }

    /// Jobs that become ready by time are read from jobs_scheduled_idx alone: a query that
    /// jobs_ready_idx could serve would be planned on it with that index gone (and was by
    /// some statistics: a walk of every entry a long transaction keeps there, each second).
    #[pg_test]
    fn scheduled_lookups_cannot_read_the_ready_index() {
        Spi::run("DROP INDEX queue.jobs_scheduled_idx").expect("drop");
        let announce_args = [now().into(), 1.0f64.into(), now().into()];
        assert_not_read(
            "jobs_ready_idx",
            [
                (
                    "announce",
                    crate::worker::index_scans(ANNOUNCE_SQL, &announce_args),
                ),
                (
                    "next deadline",
                    crate::worker::index_scans(NEXT_DEADLINE_SQL, &[now().into()]),
                ),
                (
                    "executor's next ready",
                    crate::worker::index_scans(crate::worker::executor::NEXT_READY_SQL, &[]),
                ),
            ],
        );
    }
}

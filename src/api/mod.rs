//! SQL functions written in Rust. The rest of the SQL API is plain SQL in `sql/`
//! (queues.sql, jobs.sql), where named arguments, defaults and errors read best.

mod enqueue;

use pgrx::prelude::*;
use std::cell::Cell;

/// A time-ordered UUIDv7 (RFC 9562), the id of every job: ids sort by creation time and
/// `queue.uuid_time(id)` tells which history partitions can hold a finished job.
#[pg_extern(volatile, parallel_safe)]
fn uuid_generate_v7() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes())
}

thread_local! {
    /// Jobs made ready by the current transaction, for which executors are woken at commit.
    static PENDING_WAKEUPS: Cell<usize> = const { Cell::new(0) };
    /// The earliest run_at of the jobs it made ready with a run_at of their own (i64::MAX:
    /// none), for which executors' claims look back at commit.
    static PENDING_REWIND: Cell<i64> = const { Cell::new(i64::MAX) };
    /// The commit and abort callbacks are registered for the current transaction.
    static AT_COMMIT: Cell<bool> = const { Cell::new(false) };
}

/// Wakes up to `jobs` idle executors once the current transaction commits (an executor
/// woken before the commit would not see the jobs yet). Does nothing on abort, and nothing
/// without shared_preload_libraries (executors then find the jobs by polling).
#[pg_extern(volatile)]
fn wake_executors(jobs: i32) {
    if jobs <= 0 {
        return;
    }
    PENDING_WAKEUPS.set(PENDING_WAKEUPS.get().saturating_add(jobs as usize));
    at_commit();
}

/// Jobs of this run_at became ready in the current transaction: a run_at in the past, or
/// dependents released long after they were enqueued. At commit, executors' claims and
/// full passes look back to it if it is behind where they may resume (worker/cursors.rs).
#[pg_extern(volatile, strict)]
fn rewind_executors(run_at: pgrx::datum::TimestampWithTimeZone) {
    rewind_executors_at_commit(run_at.into());
}

/// `queue.rewind_executors` with a run_at in Postgres microseconds.
pub fn rewind_executors_at_commit(run_at: i64) {
    PENDING_REWIND.set(PENDING_REWIND.get().min(run_at));
    at_commit();
}

/// Registers, once per transaction, what `wake_executors` and `rewind_executors` do at its
/// commit, and forgetting them at its abort.
fn at_commit() {
    if AT_COMMIT.replace(true) {
        return;
    }
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
        // SAFETY: both read the clock or the current transaction's start.
        let (now, start) = unsafe {
            (
                pg_sys::GetCurrentTimestamp(),
                pg_sys::GetCurrentTransactionStartTimestamp(),
            )
        };
        // Jobs of a run_at older than half the margin may sort behind where executors'
        // claims resume: those of a long transaction (its jobs' run_at is its start), and
        // those made ready with an earlier run_at of their own.
        let behind = now - crate::worker::cursors::MARGIN_US / 2;
        let wakeups = PENDING_WAKEUPS.replace(0);
        let mut rewind = PENDING_REWIND.replace(i64::MAX);
        if wakeups > 0 {
            rewind = rewind.min(start);
        }
        if rewind < behind {
            crate::shmem::request_rewind(rewind);
        }
        crate::shmem::wake_idle_executors(wakeups);
        AT_COMMIT.set(false);
    });
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || {
        PENDING_WAKEUPS.set(0);
        PENDING_REWIND.set(i64::MAX);
        AT_COMMIT.set(false);
    });
}

/// Asks the executor `worker_pid` to cancel the running job `id` (see shmem::request_cancel).
#[pg_extern(volatile, strict)]
fn request_cancel(id: pgrx::Uuid, worker_pid: i32) -> bool {
    crate::shmem::request_cancel(worker_pid, uuid::Uuid::from_bytes(*id.as_bytes()))
}

/// Inside a SQL handler: the job being run. No row anywhere else.
#[pg_extern(stable)]
#[allow(clippy::type_complexity)] // pgrx's name!() columns cannot go in a type alias
fn current_job() -> TableIterator<
    'static,
    (
        name!(id, pgrx::Uuid),
        name!(queue, String),
        name!(attempt, i32),
        name!(max_attempts, i32),
        name!(payload, pgrx::JsonB),
        name!(depends_on, Option<Vec<pgrx::Uuid>>),
    ),
> {
    let row = crate::worker::executor::current_job().map(|j| {
        (
            pgrx::Uuid::from_bytes(*j.id.as_bytes()),
            j.queue,
            j.attempt,
            j.max_attempts,
            pgrx::JsonB(serde_json::from_str(&j.payload).unwrap_or(serde_json::Value::Null)),
            j.depends_on,
        )
    });
    TableIterator::new(row)
}

/// Inside a SQL handler: reports the job's progress (NULL clears it). `queue.status` and
/// `queue.workers` show it at once, though the handler's transaction has not committed: it
/// is published in the executor's shared-memory slot, and kept with the attempt's outcome.
#[pg_extern(volatile)]
fn set_progress(progress: Option<pgrx::JsonB>) {
    let text = progress.map(|p| p.0.to_string());
    check_progress_size(text.as_deref().map_or(0, str::len));
    if !crate::worker::executor::set_progress(text) {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "queue.set_progress() works only in a handler that a pg_queue executor runs",
            "External consumers report progress with queue.heartbeat(id, lease_token, progress => ...)."
        );
    }
}

/// Internal: raises 54000 when a progress report is too large (heartbeat's check).
#[pg_extern(immutable, parallel_safe)]
fn check_progress(progress: Option<pgrx::JsonB>) {
    check_progress_size(progress.map_or(0, |p| p.0.to_string().len()));
}

fn check_progress_size(len: usize) {
    if len > crate::shmem::MAX_PROGRESS_SIZE {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("progress too large: {len} bytes"),
            format!(
                "A progress report may be at most {} bytes of JSON.",
                crate::shmem::MAX_PROGRESS_SIZE
            )
        );
    }
}

/// The progress executor `worker_id` publishes for job `id` while it runs it, if the
/// caller may see the job (NULL otherwise, the same as no report). For the views.
#[pg_extern(stable, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
fn job_progress(id: Option<pgrx::Uuid>, worker_id: Option<pgrx::Uuid>) -> Option<pgrx::JsonB> {
    let as_uuid = |u: pgrx::Uuid| uuid::Uuid::from_bytes(*u.as_bytes());
    let text = crate::shmem::progress(as_uuid(worker_id?), as_uuid(id?))?;
    // An API function (its SET clause): runs as the extension owner, the caller recorded.
    let sees = Spi::get_one_with_args::<bool>(
        "SELECT queue.sees_job(queue.caller(), j.queue, j.enqueued_by) FROM queue.jobs j WHERE j.id = $1",
        &[id?.into()],
    )
    .unwrap_or_else(|e| pgrx::error!("{e}"));
    if sees != Some(true) {
        return None;
    }
    serde_json::from_str(&text).ok().map(pgrx::JsonB)
}

/// The registered executors (shared memory), for `queue.workers`.
#[pg_extern(volatile)]
fn executors() -> TableIterator<
    'static,
    (
        name!(slot, i32),
        name!(pid, i32),
        name!(idle, bool),
        name!(executor_id, pgrx::Uuid),
    ),
> {
    let rows = crate::shmem::executors().into_iter().map(|e| {
        (
            e.slot as i32,
            e.pid,
            e.idle,
            pgrx::Uuid::from_bytes(*e.id.as_bytes()),
        )
    });
    TableIterator::new(rows.collect::<Vec<_>>())
}

/// One reap pass now, as the launcher runs it every `queue.maintenance_interval`.
#[pg_extern(volatile)]
fn reap() -> i64 {
    match crate::worker::maintenance::reap_dead_owners(true) {
        Ok((n, _)) => n,
        Err(e) => pgrx::error!("reap failed: {e}"),
    }
}

extension_sql!(
    r#"
COMMENT ON FUNCTION queue.uuid_generate_v7() IS 'A new time-ordered UUIDv7 (the kind of id every job has).';
COMMENT ON FUNCTION queue.wake_executors(integer) IS 'Internal: wakes idle executors for that many ready jobs when the current transaction commits.';
COMMENT ON FUNCTION queue.request_cancel(uuid, integer) IS 'Internal: asks an executor to interrupt the job it runs (used by queue.cancel).';
COMMENT ON FUNCTION queue.rewind_executors(timestamptz) IS 'Internal: jobs of that run_at became ready in this transaction; at commit, executors whose claims resume after it look back to it.';
COMMENT ON FUNCTION queue.current_job() IS 'Inside a SQL handler: the running job (id, queue, attempt, max_attempts, payload, depends_on). No row elsewhere.';
COMMENT ON FUNCTION queue.job_transitions() IS 'The legal moves between job states (the state machine every statement follows).';
COMMENT ON FUNCTION queue.set_progress(jsonb) IS 'Inside a SQL handler: reports the running job''s progress (at most 2048 bytes of JSON; NULL clears it). queue.status and queue.workers show it at once, before the handler commits; it is kept with the attempt''s outcome (in history, or in the failed attempt''s errors entry).';
COMMENT ON FUNCTION queue.check_progress(jsonb) IS 'Internal: raises 54000 when a progress report is larger than 2048 bytes of JSON.';
COMMENT ON FUNCTION queue.job_progress(uuid, uuid) IS 'Internal to the views: the progress an executor publishes for a job it runs, if the caller may see the job.';
COMMENT ON FUNCTION queue.executors() IS 'The in-database executors registered in shared memory (see the view queue.workers).';
COMMENT ON FUNCTION queue.reap() IS 'Runs one reaper pass now: running jobs of dead executors and of consumers whose lease expired go back to queued (or to failed when out of attempts). Returns how many moved. The launcher does this every queue.maintenance_interval.';
"#,
    name = "api_comments",
    requires = [
        uuid_generate_v7,
        wake_executors,
        rewind_executors,
        current_job,
        set_progress,
        check_progress,
        job_progress,
        job_transitions,
        executors,
        reap
    ]
);

/// The job state machine (src/state.rs) as a table: which moves are legal.
#[pg_extern(immutable, parallel_safe)]
fn job_transitions() -> TableIterator<
    'static,
    (
        name!(from_state, String),
        name!(to_state, String),
        name!(to_terminal, bool),
    ),
> {
    use crate::state::JobState;
    let rows = JobState::ALL.into_iter().flat_map(|from| {
        JobState::ALL
            .into_iter()
            .filter(move |&to| from.can_move_to(to))
            .map(move |to| {
                (
                    from.as_str().to_string(),
                    to.as_str().to_string(),
                    to.is_terminal(),
                )
            })
    });
    TableIterator::new(rows.collect::<Vec<_>>())
}

//! Executor: a dynamic background worker that claims ready jobs and runs their handlers.
//!
//! One transaction per batch: run the handlers of the jobs claimed in the previous
//! transaction, each in its own subtransaction, as the queue owner, under the job's
//! timeout; record every outcome in one statement; claim the next batch; commit. So a
//! handler's writes commit together with its job's completion (exactly-once effects), and
//! a claim is committed (`running`, attempt counted, owner recorded) before its handler
//! runs: a crash leaves the job `running` under a dead owner, and the reaper recovers it.

use super::{cursors, kept, transaction, SqlError};
use crate::security::sandbox;
use crate::{gucs, shmem};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::BuiltinOid::{
    BOOLOID, INT4ARRAYOID, INT4OID, INT8ARRAYOID, TEXTARRAYOID, TEXTOID, TIMESTAMPTZARRAYOID,
    TIMESTAMPTZOID, UUIDARRAYOID, UUIDOID,
};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgOid::BuiltIn;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The job a handler is running, for `queue.current_job()`.
#[derive(Clone)]
pub struct CurrentJob {
    pub id: uuid::Uuid,
    pub queue: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub payload: String,
    /// The jobs it was enqueued to wait for (`depends_on`), for a fan-in handler.
    pub depends_on: Option<Vec<pgrx::Uuid>>,
    /// How often it was snoozed, and the queue's limit (`queue.snooze()` checks).
    pub snoozes: i32,
    pub max_snoozes: i32,
}

thread_local! {
    static CURRENT_JOB: RefCell<Option<CurrentJob>> = const { RefCell::new(None) };
    /// The running handler's last `queue.set_progress()`, recorded with its outcome.
    static PROGRESS: RefCell<Option<String>> = const { RefCell::new(None) };
    /// This executor's registry slot (where its progress reports are published).
    static SLOT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

pub fn current_job() -> Option<CurrentJob> {
    CURRENT_JOB.with_borrow(|j| j.clone())
}

/// `queue.set_progress()`: records `text` (None clears) as the running job's progress,
/// published in shared memory at once. Returns false outside a handler that we run.
pub fn set_progress(text: Option<String>) -> bool {
    let (Some(job), Some(slot)) = (
        CURRENT_JOB.with_borrow(|j| j.as_ref().map(|j| j.id)),
        SLOT.get(),
    ) else {
        return false;
    };
    shmem::set_progress(slot, job, text.as_deref().unwrap_or(""));
    PROGRESS.set(text);
    true
}

/// How a queue's handler is called, read from `queue.queues` and `pg_proc` at claim time.
#[derive(Clone)]
struct Handler {
    /// `CALL s.p($1::jsonb)`, `SELECT s.f($1::jsonb)::text` (jsonb result kept) or
    /// `SELECT s.f($1::jsonb)`; Err says why the handler cannot run (it, or the queue's
    /// owner, no longer exists).
    call: Result<String, SqlError>,
    keeps_result: bool,
    /// The queue's owner: the handler runs as this role (security::sandbox).
    owner: pg_sys::Oid,
    search_path: String,
}

/// A job claimed by this executor and not yet recorded.
struct Claimed {
    id: pgrx::Uuid,
    lease_token: pgrx::Uuid,
    queue: String,
    attempt: i32,
    max_attempts: i32,
    payload: String,
    timeout_ms: i32,
    handler: Handler,
    depends_on: Option<Vec<pgrx::Uuid>>,
    snoozes: i32,
    max_snoozes: i32,
}

/// What running a job produced; becomes one row of the record statement.
struct Outcome {
    id: pgrx::Uuid,
    lease_token: pgrx::Uuid,
    /// `succeeded`, `queued` (retry later), `failed` or `cancelled`.
    state: crate::state::JobState,
    result: Option<String>,
    error: Option<String>,
    /// The handler's last progress report (kept in history, or in the attempt's error).
    progress: Option<String>,
    /// A snooze or throttle instead of an outcome (state `queued`, attempt not counted).
    signal: Option<crate::flow::Signal>,
}

/// This executor's life: its registry slot, identity and the jobs it holds.
struct Executor {
    slot: usize,
    id: pgrx::Uuid,
    claimed: VecDeque<Claimed>,
    /// Jobs to claim next: grows while batches finish within `queue.batch_time`.
    batch: i32,
    /// Round-robin offset over queues with ready jobs.
    turn: usize,
    /// Jobs claimed since the heap was last trimmed (see `trim_heap`).
    since_trim: usize,
}

/// Jobs between trims of an idle executor's heap.
const TRIM_EVERY: usize = 10_000;

/// Hands the malloc heap's free pages back to the kernel. Memory contexts free their
/// blocks to glibc, which keeps them: over a long drain the executor's private memory grew
/// by about 90 kB per million jobs while the bytes in use stayed flat (bench.py's `rss`
/// phase; docs/design.md "Memory"). Called only as the executor goes idle.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory; no pointer we hold is affected.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Entry point, started by the launcher: argument = registry slot, extra = database oid.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_queue_executor_main(arg: pg_sys::Datum) {
    super::attach_executor_signal_handlers();
    let slot = arg.value();
    let dboid: u32 = BackgroundWorker::get_extra().parse().unwrap_or(0);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(dboid)), None);
    super::report_appname(c"pg_queue executor");
    super::pin_session_settings();

    let id = uuid::Uuid::new_v4();
    if !shmem::register_executor(slot, id) {
        log!("pg_queue executor: no registry slot {slot}; exiting");
        return;
    }
    // SAFETY: runs at process exit (also after FATAL); frees our slot so the reaper sees
    // us gone and the launcher may start a replacement.
    unsafe { pg_sys::on_shmem_exit(Some(release_slot), pg_sys::Datum::from(slot)) };
    SLOT.set(Some(slot));
    log!("pg_queue executor started (slot {slot}, id {id})");

    let mut ex = Executor {
        slot,
        id: pgrx::Uuid::from_bytes(*id.as_bytes()),
        claimed: VecDeque::new(),
        batch: 1,
        turn: slot,
        since_trim: 0,
    };
    loop {
        super::reload_config_if_asked();
        if super::shutdown_requested() && ex.claimed.is_empty() {
            log!("pg_queue executor {slot} stopping");
            // Jobs it claimed and did not start went back to queued, keeping their place
            // in the claim order: behind other executors' cursors.
            shmem::request_rewind(i64::MIN);
            break;
        }
        let sleep = ex.tick();
        let stats_pending = super::report_table_stats();
        if let Some(timeout) = sleep {
            if ex.since_trim >= TRIM_EVERY {
                trim_heap();
                ex.since_trim = 0;
            }
            super::report_activity("idle", false);
            shmem::set_sleeping(slot);
            // Not idle for a whole poll interval with counts autovacuum has not seen.
            let timeout = stats_pending.map_or(timeout, |p| timeout.min(p));
            if !BackgroundWorker::wait_latch(Some(timeout)) {
                break; // postmaster died
            }
            cursors::woke_up();
        }
        pg_sys::check_for_interrupts!();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: std::ffi::c_int, arg: pg_sys::Datum) {
    // SAFETY: MyProcPid is this process's pid.
    shmem::release_executor(arg.value(), unsafe { pg_sys::MyProcPid });
}

impl Executor {
    /// One batch. Returns how long to sleep, or None to go on at once.
    fn tick(&mut self) -> Option<Duration> {
        let started = Instant::now();
        let claimed = std::mem::take(&mut self.claimed);
        let (slot, id, batch, turn) = (self.slot, self.id, self.batch, self.turn);
        let result = transaction(move || {
            // An Err must abort the transaction (handlers' writes must not commit without
            // their jobs' outcomes), so it becomes an ERROR here.
            let report =
                Spi::connect_mut(|client| run_batch(client, claimed, slot, id, batch, turn))
                    .unwrap_or_else(|e| pgrx::error!("{e}"));
            // The claim lock of a limited queue is held until the commit: not while the
            // disk syncs, so the other executors' claims and flushes go on meanwhile. The
            // flush still precedes every handler this executor starts.
            super::flush_after_commit();
            report
        });
        match result {
            Ok(BatchReport {
                leftover,
                claimed,
                next_ready_in,
                claim_next,
            }) => {
                let finished_in_time =
                    leftover.is_empty() && started.elapsed() < gucs::batch_time();
                self.batch = if finished_in_time {
                    (self.batch * 2).min(gucs::batch_size())
                } else {
                    (self.batch / 2).max(1)
                };
                self.turn = self.turn.wrapping_add(1);
                let worked = !leftover.is_empty() || !claimed.is_empty() || claim_next;
                self.since_trim += claimed.len();
                self.claimed = leftover;
                self.claimed.extend(claimed);
                if worked {
                    None
                } else {
                    Some(
                        next_ready_in
                            .map_or(gucs::poll_interval(), |d| d.min(gucs::poll_interval())),
                    )
                }
            }
            Err(e) => {
                // Our own bookkeeping failed (not a handler: those are caught per job). The
                // batch rolled back; hand its jobs to the reaper's rules right away.
                log!("pg_queue executor: batch failed: {e}; releasing its jobs");
                // If it failed in a walk from the head, that walk is over.
                shmem::head_pass_done(self.slot);
                // Its claims rolled back: those jobs are queued again, in their place.
                shmem::request_rewind(i64::MIN);
                self.release_jobs(&e);
                if !extension_exists() {
                    log!("pg_queue executor: extension pg_queue is gone; exiting");
                    // SAFETY: a clean exit; the launcher starts executors again when needed.
                    unsafe { pg_sys::proc_exit(0) };
                }
                Some(gucs::poll_interval())
            }
        }
    }

    /// After a failed batch: the jobs this executor holds go back to queued (or failed),
    /// counted as a failed attempt, as if it had died.
    fn release_jobs(&mut self, e: &SqlError) {
        self.claimed.clear();
        let id = self.id;
        let msg = format!("executor batch failed: {}", e.message);
        let r = transaction(move || super::maintenance::reap(&[], Some(id), None, &msg, true));
        if let Err(e2) = r.and_then(|r| r) {
            log!("pg_queue executor: could not release jobs: {e2}; exiting so the reaper does");
            // SAFETY: exit code 1: the slot is freed and the launcher starts a new executor.
            unsafe { pg_sys::proc_exit(1) };
        }
    }
}

struct BatchReport {
    leftover: VecDeque<Claimed>,
    claimed: VecDeque<Claimed>,
    next_ready_in: Option<Duration>,
    /// The batch committed its outcomes without claiming: claim in the next one, at once.
    claim_next: bool,
}

/// The body of one batch transaction.
fn run_batch(
    client: &mut SpiClient<'_>,
    mut claimed: VecDeque<Claimed>,
    slot: usize,
    executor_id: pgrx::Uuid,
    batch: i32,
    turn: usize,
) -> Result<BatchReport, SqlError> {
    let started = Instant::now();
    let mut outcomes = Vec::with_capacity(claimed.len());
    if !claimed.is_empty() {
        // Connections an earlier batch's handlers left open are not this owner's.
        sandbox::close_foreign_connections(client)?;
        // Stop starting handlers once asked to shut down or once the batch ran long enough.
        while !super::shutdown_requested() {
            let Some(job) = claimed.pop_front() else {
                break;
            };
            outcomes.push(run_job(&job, slot));
            if started.elapsed() >= gucs::batch_time() {
                break;
            }
        }
    }
    // The handlers are done: the rest of the batch is our own bookkeeping.
    super::plan_by_index();
    if super::shutdown_requested() {
        // Stopping: jobs claimed but not started go back to queued, attempt not counted.
        outcomes.extend(claimed.drain(..).map(|j| Outcome {
            id: j.id,
            lease_token: j.lease_token,
            state: crate::state::JobState::Queued,
            result: None,
            error: None,
            progress: None,
            signal: None,
        }));
    }
    record(client, &outcomes)?;
    let mut report = BatchReport {
        leftover: claimed,
        claimed: VecDeque::new(),
        next_ready_in: None,
        claim_next: false,
    };
    if !outcomes.is_empty() && cursors::costly_full_pass_due() {
        // A full pass walks from the head of every queue, past every dead entry a long
        // transaction elsewhere keeps: not while the jobs just finished still hold their
        // places under their queues' concurrency limits (until this batch commits).
        report.claim_next = true;
        return Ok(report);
    }
    if report.leftover.is_empty() && !super::shutdown_requested() {
        // Idle from before the claim's snapshot: an enqueue committing after it wakes us.
        shmem::set_idle(slot, true);
        if let Some(to) = shmem::take_rewind(slot) {
            cursors::rewind(to);
        }
        report.claimed = claim(client, executor_id, batch, turn)?;
        let rate_wake = rate_wake_in();
        if report.claimed.is_empty() && cursors::costly_full_pass_due() {
            report.claim_next = true;
        } else if report.claimed.is_empty() {
            report.next_ready_in = [next_ready_in(client)?, rate_wake, cursors::wake_in()]
                .into_iter()
                .flatten()
                .min();
        } else {
            shmem::set_idle(slot, false);
        }
    }
    Ok(report)
}

/// Runs one job's handler in a subtransaction and says what became of it.
fn run_job(job: &Claimed, slot: usize) -> Outcome {
    let id = uuid::Uuid::from_bytes(*job.id.as_bytes());
    let outcome = |state, result, error| Outcome {
        id: job.id,
        lease_token: job.lease_token,
        state,
        result,
        error,
        progress: PROGRESS.with_borrow(|p| p.clone()),
        signal: None,
    };
    let cancelled = |attempt| {
        log!(
            "pg_queue: job {id} (queue {}, attempt {attempt}) cancelled",
            job.queue
        );
        let e = SqlError {
            sqlstate: "57014".into(),
            message: "cancelled by queue.cancel()".into(),
            detail: None,
            hint: None,
        };
        outcome(
            crate::state::JobState::Cancelled,
            None,
            Some(error_json(&e, attempt)),
        )
    };
    PROGRESS.set(None);
    shmem::set_progress(slot, id, ""); // no report of an earlier attempt shows for this one
    if shmem::cancel_requested(slot, id) {
        return cancelled(job.attempt);
    }
    CURRENT_JOB.set(Some(CurrentJob {
        id,
        queue: job.queue.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        payload: job.payload.clone(),
        depends_on: job.depends_on.clone(),
        snoozes: job.snoozes,
        max_snoozes: job.max_snoozes,
    }));
    super::report_activity(
        &format!(
            "pg_queue: queue {} job {id} attempt {}/{}",
            job.queue, job.attempt, job.max_attempts
        ),
        true,
    );
    let result = match &job.handler.call {
        Err(why) => Err(why.clone()),
        Ok(sql) => call_handler(sql, job),
    };
    CURRENT_JOB.set(None);
    let signal = crate::flow::take_signal(result.as_ref().err().map(|e| e.sqlstate.as_str()));
    if let Some(signal) = signal {
        debug1!(
            "pg_queue: job {id} (queue {}, attempt {}) {signal:?}",
            job.queue,
            job.attempt
        );
        return Outcome {
            signal: Some(signal),
            ..outcome(crate::state::JobState::Queued, None, None)
        };
    }
    match result {
        Ok(result) => outcome(crate::state::JobState::Succeeded, result, None),
        Err(e) if e.sqlstate == "57014" && shmem::cancel_requested(slot, id) => {
            cancelled(job.attempt)
        }
        Err(mut e) => {
            if e.sqlstate == "57014" && super::handler_timed_out() {
                // The handler caught its timeout's cancel and was cancelled again.
                e.message = "canceling statement due to statement timeout".into();
            }
            let retry = job.attempt < job.max_attempts;
            log!(
                "pg_queue: job {id} (queue {}, attempt {}/{}) failed: {e}{}",
                job.queue,
                job.attempt,
                job.max_attempts,
                if retry {
                    "; will retry"
                } else {
                    "; no attempts left"
                }
            );
            let state = if retry {
                crate::state::JobState::Queued
            } else {
                crate::state::JobState::Failed
            };
            outcome(state, None, Some(error_json(&e, job.attempt)))
        }
    }
}

/// Calls the handler as the queue owner in a security-restricted operation
/// (security::sandbox), under the job's timeout, in a subtransaction: its writes roll
/// back unless it succeeds within its timeout with a result of allowed size.
fn call_handler(sql: &str, job: &Claimed) -> Result<Option<String>, SqlError> {
    let handler = &job.handler;
    let timeout_ms = job.timeout_ms;
    let payload = job.payload.as_str();
    let r = super::subtransaction(move || {
        let _witness = super::SqlstateWitness::new();
        let entered = sandbox::enter(handler.owner, Some(&handler.search_path));
        super::enter_handler(timeout_ms);
        let r = Spi::connect_mut(|client| -> Result<Option<String>, SqlError> {
            let plan = kept(client, sql, &[BuiltIn(TEXTOID)])?;
            let out = client.update(&*plan, None, &[payload.into()])?;
            Ok(if handler.keeps_result {
                out.first().get_one::<String>()?
            } else {
                None
            })
        });
        super::leave_handler();
        sandbox::leave(entered);
        // Any failure from here on is an ERROR, so the subtransaction rolls back.
        let result = r.unwrap_or_else(|e| pgrx::error!("{e}"));
        if super::handler_timed_out() {
            // It returned, but past its timeout (it caught the cancel): not a success.
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                "canceling statement due to statement timeout"
            );
        }
        if let Some(text) = &result {
            if text.len() > gucs::max_result_size() {
                ereport!(
                    PgLogLevel::ERROR,
                    PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    format!("result too large: {} bytes", text.len()),
                    format!(
                        "Results may be at most {} bytes (queue.max_result_size).",
                        gucs::max_result_size()
                    )
                );
            }
        }
        result
    });
    let r = r.map_err(|mut e| {
        if e.sqlstate == "XX000" {
            // pgrx names only the standard codes: take the handler's own from the witness.
            if let Some(code) = super::SqlstateWitness::last() {
                e.sqlstate = code;
            }
        }
        e
    });
    if r.is_err() {
        super::leave_handler(); // the ERROR skipped the call above
    }
    // Cursors and session locks outlive a subtransaction: drop what the handler left.
    sandbox::clear_residue();
    r
}

/// One element of a job's `errors` array (the database adds the time), with the attempt's
/// last progress report. Texts are cut to `queue.max_error_length` characters.
fn error_json(e: &SqlError, attempt: i32) -> String {
    let cut = |t: &str| -> String { t.chars().take(gucs::max_error_length()).collect() };
    let mut o = serde_json::Map::new();
    o.insert("attempt".into(), attempt.into());
    o.insert("sqlstate".into(), e.sqlstate.clone().into());
    o.insert("message".into(), cut(&e.message).into());
    if let Some(d) = &e.detail {
        o.insert("detail".into(), cut(d).into());
    }
    if let Some(h) = &e.hint {
        o.insert("hint".into(), cut(h).into());
    }
    // SAFETY: MyProcPid is this process's pid.
    o.insert("worker_pid".into(), unsafe { pg_sys::MyProcPid }.into());
    let progress =
        PROGRESS.with_borrow(|p| p.as_deref().and_then(|p| serde_json::from_str(p).ok()));
    if let Some(p) = progress {
        o.insert("progress".into(), p);
    }
    serde_json::Value::Object(o).to_string()
}

/// Records the outcomes of a batch in one statement, fenced on each job's lease token:
/// succeeded, failed and cancelled jobs move to history; retries go back to queued with
/// backoff; a job released unstarted (state queued, no error) goes back with its attempt
/// uncounted. Returns how many jobs it moved: fewer than the outcomes means a job was taken
/// from us while its handler ran (only `drop_queue(force => true)` does that: the reaper
/// never takes a registered executor's jobs), and the batch must not commit. `j.id =
/// ANY($1)` beside the join makes the planner fetch the batch's rows by primary key rather
/// than hash the whole jobs table. The lease token alone says the job is still ours and
/// running (only a running job has one: jobs_running_has_owner); `state = 'running'` here
/// would let the planner scan jobs_running_idx instead, which under an old snapshot holds
/// an entry for every job run since (docs/design.md "Under a held snapshot").
const RECORD_SQL: &str = "
WITH o AS (
    SELECT u.*, u.delay_ms * interval '1 millisecond' AS delay
      FROM unnest($1::uuid[], $2::uuid[], $3::text[]::queue.job_state[], $4::text[]::jsonb[],
                  $5::text[]::jsonb[], $6::text[]::jsonb[], $7::text[], $8::int8[])
             AS u(id, token, state, result, error, progress, signal, delay_ms)
), retried AS (
    UPDATE queue.jobs j
       SET state = 'queued', started_at = NULL, worker_pid = NULL, worker_id = NULL,
           lease_token = NULL,
           attempts = j.attempts - (o.error IS NULL)::int,
           snoozes = j.snoozes + (o.signal IS NOT DISTINCT FROM 'snooze')::int,
           errors = CASE WHEN o.error IS NULL THEN j.errors
                         ELSE j.errors || (o.error || jsonb_build_object('at', clock_timestamp(),
                                                                         'started_at', j.started_at)) END,
           run_at = CASE WHEN o.signal = 'snooze' THEN clock_timestamp() + o.delay
                         WHEN o.signal = 'throttle' THEN clock_timestamp() + (
                             SELECT queue.cooldown(q, o.delay) FROM queue.queues q WHERE q.name = j.queue)
                         WHEN o.error IS NULL THEN j.run_at
                         ELSE clock_timestamp() + coalesce(
               (SELECT queue.backoff(q.backoff_base, q.backoff_max, j.attempts)
                  FROM queue.queues q WHERE q.name = j.queue), interval '0') END
      FROM o
     WHERE j.id = ANY($1::uuid[])
       AND o.state = 'queued' AND j.id = o.id AND j.lease_token = o.token
    RETURNING j.queue, o.signal, o.delay
), finished AS (
    DELETE FROM queue.jobs j USING o
     WHERE j.id = ANY($1::uuid[])
       AND o.state <> 'queued' AND j.id = o.id AND j.lease_token = o.token
    RETURNING j.*, o.state AS new_state, o.result AS new_result, o.error AS new_error,
              o.progress AS new_progress
), moved AS (
    INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts,
                               max_attempts, timeout, created_at, started_at, finished_at, worker_pid,
                               result, progress, snoozes, fair_key, errors)
    SELECT id, queue, new_state, payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts, max_attempts, timeout,
           created_at, started_at, clock_timestamp(), worker_pid, new_result, new_progress, snoozes, fair_key,
           CASE WHEN new_error IS NULL THEN errors
                ELSE errors || (new_error || jsonb_build_object('at', clock_timestamp(),
                                                                'started_at', started_at)) END
      FROM finished
    RETURNING 1
), flow AS (
    -- Throttles cool their queue down; a success resets a queue's throttle count (only
    -- queues that have one pay for the call).
    SELECT queue.record_flow(t.queue, t.throttles, t.retry_after, t.successes)
      FROM (SELECT x.queue, count(*) FILTER (WHERE x.signal = 'throttle') AS throttles,
                   max(x.delay) FILTER (WHERE x.signal = 'throttle') AS retry_after,
                   count(*) FILTER (WHERE x.succeeded) AS successes
              FROM (SELECT r.queue, r.signal, r.delay, false AS succeeded FROM retried r
                    UNION ALL
                    SELECT f.queue, NULL, NULL, f.new_state = 'succeeded' FROM finished f) x
             GROUP BY x.queue) t
     WHERE t.throttles > 0
        OR (t.successes > 0 AND EXISTS (SELECT 1 FROM queue.queues q
                                         WHERE q.name = t.queue AND q.throttle_count > 0))
)
SELECT (SELECT count(*) FROM retried) + (SELECT count(*) FROM moved) + 0 * (SELECT count(*) FROM flow)";

fn record(client: &mut SpiClient<'_>, outcomes: &[Outcome]) -> Result<(), SqlError> {
    if outcomes.is_empty() {
        return Ok(());
    }
    let ids: Vec<pgrx::Uuid> = outcomes.iter().map(|o| o.id).collect();
    let tokens: Vec<pgrx::Uuid> = outcomes.iter().map(|o| o.lease_token).collect();
    let states: Vec<&str> = outcomes.iter().map(|o| o.state.as_str()).collect();
    let results: Vec<Option<&str>> = outcomes.iter().map(|o| o.result.as_deref()).collect();
    let errors: Vec<Option<&str>> = outcomes.iter().map(|o| o.error.as_deref()).collect();
    let progress: Vec<Option<&str>> = outcomes.iter().map(|o| o.progress.as_deref()).collect();
    let (signals, delays): (Vec<Option<&str>>, Vec<Option<i64>>) = outcomes
        .iter()
        .map(|o| crate::flow::Signal::columns(o.signal))
        .unzip();
    let plan = kept(
        client,
        RECORD_SQL,
        &[
            BuiltIn(UUIDARRAYOID),
            BuiltIn(UUIDARRAYOID),
            BuiltIn(TEXTARRAYOID),
            BuiltIn(TEXTARRAYOID),
            BuiltIn(TEXTARRAYOID),
            BuiltIn(TEXTARRAYOID),
            BuiltIn(TEXTARRAYOID),
            BuiltIn(INT8ARRAYOID),
        ],
    )?;
    let moved = client
        .update(
            &*plan,
            None,
            &[
                ids.into(),
                tokens.into(),
                states.into(),
                results.into(),
                errors.into(),
                progress.into(),
                signals.into(),
                delays.into(),
            ],
        )?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0);
    if moved != outcomes.len() as i64 {
        // An ERROR aborts the batch: no handler's writes commit without their job's outcome.
        return Err(SqlError::internal(format!(
            "{} of the batch's {} jobs were moved by another session while their handlers ran; \
             rolling the batch back",
            outcomes.len() as i64 - moved,
            outcomes.len()
        )));
    }
    Ok(())
}

/// The queues executors serve, with how to call their handlers and as whom (the owner, if
/// that role still exists), and the key of each one's first ready job. A queue with none
/// where we looked is left out, but for a full pass ($6: NULL keys, so that it records
/// where it looked; the handler's call is then formatted for every queue). A queue's ready jobs are looked for from where this executor's claims of it
/// resume, or from where a full pass looks ($1..$5: queue, priority, window start, run_at,
/// id; the head of the queue without one), in its window, and before it among higher
/// priorities (worker/cursors.rs); the first one's key is where a full pass claims from, so
/// that its walk past dead entries happens here, before the claim lock. The checks read the
/// index in claim order, so that the planner never scans the table.
const READY_QUEUES_SQL: &str = "
SELECT q.name, q.concurrency, q.owner::oid,
       (extract(epoch FROM q.timeout) * 1000)::int4,
       CASE WHEN p.oid IS NULL THEN NULL
            WHEN p.prokind = 'p' THEN format('CALL %I.%I($1::jsonb)', n.nspname, p.proname)
            WHEN p.prorettype = 'jsonb'::regtype THEN format('SELECT %I.%I($1::jsonb)::text', n.nspname, p.proname)
            ELSE format('SELECT %I.%I($1::jsonb)', n.nspname, p.proname) END,
       p.prokind = 'f' AND p.prorettype = 'jsonb'::regtype,
       q.search_path, EXISTS (SELECT 1 FROM pg_authid r WHERE r.oid = q.owner), q.max_snoozes,
       q.rate_limit, (extract(epoch FROM q.rate_window) * 1000000)::int8, q.fair_share,
       q.key_concurrency, f.priority, f.run_at, f.id
  FROM queue.queues q
  LEFT JOIN pg_proc p ON p.oid = to_regprocedure(q.handler)
  LEFT JOIN pg_namespace n ON n.oid = p.pronamespace
  LEFT JOIN unnest($1::text[], $2::int4[], $3::timestamptz[], $4::timestamptz[], $5::uuid[])
         AS c(name, priority, window_start, run_at, id)
         ON c.name = q.name
  LEFT JOIN LATERAL (
      (SELECT j.priority, j.run_at, j.id FROM queue.jobs j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= statement_timestamp()
          AND j.priority < coalesce(c.priority, -2147483648)
        ORDER BY j.priority, j.run_at, j.id LIMIT 1)
      UNION ALL
      (SELECT j.priority, j.run_at, j.id FROM queue.jobs j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= statement_timestamp()
          AND j.priority = c.priority AND j.run_at >= c.window_start AND j.run_at < c.run_at
        ORDER BY j.priority, j.run_at, j.id LIMIT 1)
      UNION ALL
      (SELECT j.priority, j.run_at, j.id FROM queue.jobs j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= statement_timestamp()
          AND (j.priority, j.run_at, j.id) >= (coalesce(c.priority, -2147483648),
                                               coalesce(c.run_at, '-infinity'),
                                               coalesce(c.id, '00000000-0000-0000-0000-000000000000'))
        ORDER BY j.priority, j.run_at, j.id LIMIT 1)
      LIMIT 1) f ON true
 WHERE (f.id IS NOT NULL OR $6) AND NOT q.paused AND NOT q.notify
   AND (q.throttled_until IS NULL OR q.throttled_until <= statement_timestamp())
 ORDER BY q.name";

/// Claims up to $2 ready jobs of one queue: `limit`, or less to stay within its concurrency
/// limit (counted by COUNT_RUNNING_SQL; $3 and $5 serve CLAIM_FAIR_SQL). Claims of a queue
/// with a limit are serialised by a transaction-scoped queue lock (src/locks.rs; released at our
/// commit), so that two executors counting its running jobs cannot both take the last place.
/// The jobs are taken in claim order: any of a higher priority than $6, those of run_at
/// from $7 to before $8 (the window), then from ($6, $8, $9), where this executor's claims
/// of the queue resume (worker/cursors.rs); the outer LIMIT locks only the rows it takes.
/// The claimed rows are updated by `id = ANY(ARRAY(...))`: the LIMIT is an expression the
/// planner cannot estimate, and a join on it would hash the whole jobs table.
const CLAIM_SQL: &str = "
WITH c AS (
    SELECT a.id FROM (
        SELECT id FROM queue.jobs
         WHERE queue = $1 AND state = 'queued' AND run_at <= statement_timestamp()
           AND priority < $6
         ORDER BY priority, run_at, id
         LIMIT $2
         FOR UPDATE SKIP LOCKED) a
    UNION ALL
    SELECT b.id FROM (
        SELECT id FROM queue.jobs
         WHERE queue = $1 AND state = 'queued' AND run_at <= statement_timestamp()
           AND priority = $6 AND run_at >= $7 AND run_at < $8
         ORDER BY priority, run_at, id
         LIMIT $2
         FOR UPDATE SKIP LOCKED) b
    UNION ALL
    SELECT c.id FROM (
        SELECT id FROM queue.jobs
         WHERE queue = $1 AND state = 'queued' AND run_at <= statement_timestamp()
           AND (priority, run_at, id) >= ($6, $8, $9)
         ORDER BY priority, run_at, id
         LIMIT $2
         FOR UPDATE SKIP LOCKED) c
    LIMIT CASE WHEN (SELECT NOT paused AND coalesce(throttled_until <= statement_timestamp(), true)
                       FROM queue.queues WHERE name = $1) IS NOT TRUE THEN 0
               ELSE $2 END
)
UPDATE queue.jobs j
   SET state = 'running', attempts = j.attempts + 1, started_at = statement_timestamp(),
       worker_pid = pg_backend_pid(), worker_id = $4, lease_token = gen_random_uuid()
 WHERE j.id = ANY(ARRAY(SELECT id FROM c))
RETURNING j.id, j.lease_token, j.attempts, j.max_attempts, j.payload::text,
          (extract(epoch FROM j.timeout) * 1000)::int4, j.depends_on, j.snoozes, j.priority, j.run_at";

/// CLAIM_SQL for a fair_share queue: the jobs come from queue.fair_pick (sql/fair.sql),
/// which rotates across keys from this executor's cursor ($7) within the per-key cap ($6).
const CLAIM_FAIR_SQL: &str = "
UPDATE queue.jobs j
   SET state = 'running', attempts = j.attempts + 1, started_at = statement_timestamp(),
       worker_pid = pg_backend_pid(), worker_id = $4, lease_token = gen_random_uuid()
 WHERE j.id = ANY(ARRAY(SELECT queue.fair_pick(
           $1, CASE WHEN $3 >= $5 THEN $2
                    ELSE greatest(0, least($2, $3 - (SELECT count(*) FROM queue.jobs
                                                      WHERE queue = $1 AND state = 'running'))) END,
           $6, $7, statement_timestamp())))
RETURNING j.id, j.lease_token, j.attempts, j.max_attempts, j.payload::text,
          (extract(epoch FROM j.timeout) * 1000)::int4, j.depends_on, j.snoozes, j.fair_key";

/// A concurrency limit this high is never reached by executors: each holds at most one
/// batch (64 executors x 64 jobs), and as many may still be held by dead ones until reaped.
/// Such a queue's claims skip the claim lock and the running count: executors claiming from
/// one queue then commit side by side instead of queueing behind each other's commit.
const UNLIMITED: i32 = 2 * gucs::MAX_EXECUTORS as i32 * gucs::MAX_BATCH;

/// A queue with ready jobs, and how to run them.
#[derive(Clone)]
struct ReadyQueue {
    name: String,
    concurrency: i32,
    max_snoozes: i32,
    rate: Option<crate::rate::Limit>,
    /// fair_share (claims rotate across keys) and its per-key cap.
    fair: bool,
    key_concurrency: Option<i32>,
    handler: Handler,
    timeout_ms: i32,
    /// The key of its first ready job when READY_QUEUES_SQL read it.
    first: Option<cursors::Key>,
}

/// How long a queue that had jobs to claim is claimed from first, without reading
/// READY_QUEUES_SQL: saves a catalog join per batch under load (also when jobs come one at
/// a time), bounds how long other queues wait for their turn, and how late a changed
/// handler or concurrency is seen (a pause is seen at once: CLAIM_SQL checks it).
const HOT_QUEUE_TTL: Duration = Duration::from_millis(100);

thread_local! {
    /// The queue the last jobs came from, and since when.
    static HOT_QUEUE: RefCell<Option<(Instant, ReadyQueue)>> = const { RefCell::new(None) };
}

/// Claims up to `limit` ready jobs of the first queue that has any, round-robin from
/// `turn`. Claims start where this executor's last ones of each queue ended, except in full
/// passes (worker/cursors.rs). Nothing claimed by a full pass means no job was ready; after
/// a cursor pass, only that none was where it looked: a full pass follows at once when due,
/// else the executor sleeps no longer than until it is (`cursors::wake_in`).
fn claim(
    client: &mut SpiClient<'_>,
    executor_id: pgrx::Uuid,
    limit: i32,
    turn: usize,
) -> Result<VecDeque<Claimed>, SqlError> {
    // SAFETY: statement_timestamp() in READY_QUEUES_SQL is now, not the batch's start.
    unsafe { pg_sys::SetCurrentStatementStartTimestamp() };
    let full = !cursors::cursor_first() && cursors::full_pass_due();
    let claimed = claim_pass(client, executor_id, limit, turn, full)?;
    if claimed.is_empty() && !full {
        if !cursors::full_pass_due() {
            cursors::found_nothing();
        } else if !cursors::costly_full_pass_due() {
            return claim_pass(client, executor_id, limit, turn, true);
        }
        // A costly one runs in a transaction of its own (run_batch): not under the claim
        // lock this pass may have taken.
    }
    Ok(claimed)
}

/// One claim pass over the queues (`full`: from the head of each).
fn claim_pass(
    client: &mut SpiClient<'_>,
    executor_id: pgrx::Uuid,
    limit: i32,
    turn: usize,
    full: bool,
) -> Result<VecDeque<Claimed>, SqlError> {
    let mut pass = full.then(cursors::full_pass_started);
    let slot = SLOT.get().unwrap_or(usize::MAX);
    let walk = pass.as_ref().is_some_and(|p| p.walks_dead_entries());
    if let Some(p) = pass
        .as_mut()
        .filter(|_| walk && !shmem::begin_head_pass(slot))
    {
        p.look_from_low_water();
    }
    let claimed = claim_from_queues(client, executor_id, limit, turn, pass.as_ref());
    if let Some(pass) = pass {
        if pass.from_head && walk {
            shmem::head_pass_done(slot);
        }
        cursors::full_pass_done(pass);
    }
    claimed
}

fn claim_from_queues(
    client: &mut SpiClient<'_>,
    executor_id: pgrx::Uuid,
    limit: i32,
    turn: usize,
    pass: Option<&cursors::FullPass>,
) -> Result<VecDeque<Claimed>, SqlError> {
    let full = pass.is_some();
    // A full pass reads where each queue's ready jobs begin (READY_QUEUES_SQL).
    let hot = HOT_QUEUE.with_borrow_mut(|h| match h.take() {
        Some((since, q)) if since.elapsed() < HOT_QUEUE_TTL && !full => Some((since, q)),
        _ => None,
    });
    if let Some((since, q)) = hot {
        let claimed = claim_from(client, executor_id, limit, &q, full)?;
        if !claimed.is_empty() {
            HOT_QUEUE.set(Some((since, q)));
            return Ok(claimed);
        }
    }
    let queues = ready_queues(client, pass)?;
    let n = queues.len();
    for i in 0..n {
        let q = &queues[(turn + i) % n];
        let claimed = claim_from(client, executor_id, limit, q, full)?;
        if !claimed.is_empty() {
            HOT_QUEUE.set(Some((Instant::now(), q.clone())));
            return Ok(claimed);
        }
    }
    Ok(VecDeque::new())
}

/// A key of the claim order as a timestamptz argument (-infinity below its range).
fn run_at_arg(us: i64) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(us)
        .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity())
}

/// The queues with ready jobs from where this executor looks: its cursors, or in a full
/// pass, the head or the low-water keys, which the pass moves to where it found each
/// queue's ready jobs to begin.
fn ready_queues(
    client: &mut SpiClient<'_>,
    pass: Option<&cursors::FullPass>,
) -> Result<Vec<ReadyQueue>, SqlError> {
    let mut queues = Vec::new();
    // SAFETY: reads the statement time that READY_QUEUES_SQL compares run_at with.
    let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    let starts = pass.map_or_else(cursors::starts, cursors::full_pass_starts);
    let names: Vec<&str> = starts.iter().map(|(q, _)| q.as_str()).collect();
    let priorities: Vec<i32> = starts.iter().map(|(_, k)| k.priority).collect();
    let window_starts: Vec<TimestampWithTimeZone> = starts
        .iter()
        .map(|(_, k)| run_at_arg(k.window_start()))
        .collect();
    let run_ats: Vec<TimestampWithTimeZone> =
        starts.iter().map(|(_, k)| run_at_arg(k.run_at)).collect();
    let ids: Vec<pgrx::Uuid> = starts
        .iter()
        .map(|(_, k)| pgrx::Uuid::from_bytes(k.id))
        .collect();
    let ready = kept(
        client,
        READY_QUEUES_SQL,
        &[
            BuiltIn(TEXTARRAYOID),
            BuiltIn(INT4ARRAYOID),
            BuiltIn(TIMESTAMPTZARRAYOID),
            BuiltIn(TIMESTAMPTZARRAYOID),
            BuiltIn(UUIDARRAYOID),
            BuiltIn(BOOLOID),
        ],
    )?;
    for row in client.update(
        &*ready,
        None,
        &[
            names.into(),
            priorities.into(),
            window_starts.into(),
            run_ats.into(),
            ids.into(),
            pass.is_some().into(),
        ],
    )? {
        let name: Option<String> = row.get(1)?;
        let Some(name) = name else { continue };
        let first = match (
            row.get::<i32>(14)?,
            row.get::<TimestampWithTimeZone>(15)?,
            row.get::<pgrx::Uuid>(16)?,
        ) {
            (Some(priority), Some(run_at), Some(id)) => Some(cursors::Key {
                priority,
                run_at: run_at.into(),
                id: *id.as_bytes(),
            }),
            _ => None,
        };
        if pass.is_some() {
            cursors::found_first(&name, first, now);
        }
        if first.is_none() {
            continue; // nothing ready where we looked
        }
        let call = match (row.get::<String>(5)?, row.get::<bool>(8)?) {
            (_, Some(false) | None) => Err(SqlError {
                sqlstate: "42704".into(),
                message: format!("owner of queue \"{name}\" no longer exists"),
                detail: None,
                hint: Some(
                    "Its handler runs as its owner: drop the queue and create it again.".into(),
                ),
            }),
            (None, _) => Err(SqlError {
                sqlstate: "42883".into(),
                message: format!("handler of queue \"{name}\" does not exist"),
                detail: None,
                hint: Some("Fix it with queue.alter_queue(name, handler => ...).".into()),
            }),
            (Some(sql), _) => Ok(sql),
        };
        queues.push(ReadyQueue {
            concurrency: row.get::<i32>(2)?.unwrap_or(1),
            max_snoozes: row.get::<i32>(9)?.unwrap_or(0),
            rate: match (row.get::<i32>(10)?, row.get::<i64>(11)?) {
                (Some(limit), Some(window_us)) => Some(crate::rate::Limit { limit, window_us }),
                _ => None,
            },
            fair: row.get::<bool>(12)?.unwrap_or(false),
            key_concurrency: row.get::<i32>(13)?,
            handler: Handler {
                owner: row.get::<pg_sys::Oid>(3)?.unwrap_or(pg_sys::Oid::INVALID),
                call,
                keeps_result: row.get::<bool>(6)?.unwrap_or(false),
                search_path: row.get::<String>(7)?.unwrap_or_default(),
            },
            name,
            timeout_ms: row.get::<i32>(4)?.unwrap_or(300_000),
            first,
        });
    }
    Ok(queues)
}

/// Claims up to `limit` ready jobs of queue `q` (CLAIM_SQL), within its rate limit.
fn claim_from(
    client: &mut SpiClient<'_>,
    executor_id: pgrx::Uuid,
    limit: i32,
    q: &ReadyQueue,
    full: bool,
) -> Result<VecDeque<Claimed>, SqlError> {
    // Claims of a limited queue take turns, so that its running count is exact; a per-key
    // cap is counted the same way.
    if q.concurrency < UNLIMITED || q.key_concurrency.is_some() {
        crate::locks::lock(&q.name, crate::locks::Purpose::Claim);
    }
    // The queue's room under its concurrency limit, counted after the lock.
    let mut limit = limit;
    if q.concurrency < UNLIMITED && !q.fair {
        // SAFETY: sets the backend's statement start time; no statement is running.
        unsafe { pg_sys::SetCurrentStatementStartTimestamp() };
        limit = limit.min((q.concurrency - count_running(client, &q.name)?).max(0));
        if limit == 0 {
            return Ok(VecDeque::new());
        }
    }
    // The claim's started_at (statement_timestamp()) is read after the lock and the count:
    // a queue's claims start in the order they take the lock, which its running count
    // relies on (count_running); a job that finished before the count did so before it;
    // and a rate limit books each start at exactly that time.
    // SAFETY: as above.
    unsafe { pg_sys::SetCurrentStatementStartTimestamp() };
    let Some(rate) = q.rate else {
        return claim_rows(client, executor_id, limit, q, full);
    };
    // SAFETY: reads the time just set.
    let started_at = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    // A budget that cannot be tracked (every slot in use) skips the queue, not the batch.
    let grant = match crate::rate::take(&q.name, rate, limit, started_at) {
        Ok(g) => g,
        Err(e) => {
            log!("pg_queue executor: queue {} not claimed: {e}", q.name);
            return Ok(VecDeque::new());
        }
    };
    if let Some(at) = grant.retry_at_us {
        RATE_WAKE.set(Some(RATE_WAKE.get().map_or(at, |w: i64| w.min(at))));
    }
    if grant.granted == 0 {
        return Ok(VecDeque::new());
    }
    let claimed = claim_rows(client, executor_id, grant.granted, q, full);
    let used = claimed.as_ref().map_or(0, |c| c.len() as i32);
    crate::rate::settle(&q.name, &grant, used);
    claimed
}

thread_local! {
    /// The earliest time (Postgres microseconds) a rate-limited queue that had no budget
    /// for this claim gets budget back: when the executor wakes next, at the latest.
    static RATE_WAKE: std::cell::Cell<Option<i64>> = const { std::cell::Cell::new(None) };
}

/// How long until a rate-limited queue skipped in the last claim gets budget back.
fn rate_wake_in() -> Option<Duration> {
    let at = RATE_WAKE.take()?;
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    Some(Duration::from_micros((at - now).max(1000) as u64))
}

fn claim_rows(
    client: &mut SpiClient<'_>,
    executor_id: pgrx::Uuid,
    limit: i32,
    q: &ReadyQueue,
    full: bool,
) -> Result<VecDeque<Claimed>, SqlError> {
    let mut types = vec![
        BuiltIn(TEXTOID),
        BuiltIn(INT4OID),
        BuiltIn(INT4OID),
        BuiltIn(UUIDOID),
        BuiltIn(INT4OID),
    ];
    let mut args = vec![
        q.name.as_str().into(),
        limit.into(),
        q.concurrency.into(),
        executor_id.into(),
        UNLIMITED.into(),
    ];
    let cursor = crate::fair::cursor(&q.name);
    if q.fair {
        types.extend([BuiltIn(INT4OID), BuiltIn(TEXTOID)]);
        args.extend([q.key_concurrency.into(), cursor.as_str().into()]);
    } else {
        let start = cursors::start(&q.name, full, q.first);
        types.extend([
            BuiltIn(INT4OID),
            BuiltIn(TIMESTAMPTZOID),
            BuiltIn(TIMESTAMPTZOID),
            BuiltIn(UUIDOID),
        ]);
        args.extend([
            start.priority.into(),
            run_at_arg(start.window_start()).into(),
            run_at_arg(start.run_at).into(),
            pgrx::Uuid::from_bytes(start.id).into(),
        ]);
    }
    let plan = kept(
        client,
        if q.fair { CLAIM_FAIR_SQL } else { CLAIM_SQL },
        &types,
    )?;
    let rows = client.update(&*plan, None, &args)?;
    let mut claimed = VecDeque::with_capacity(rows.len());
    let mut keys = Vec::new();
    let mut last: Option<cursors::Key> = None;
    for row in rows {
        let (Some(id), Some(lease_token)) = (row.get::<pgrx::Uuid>(1)?, row.get::<pgrx::Uuid>(2)?)
        else {
            continue;
        };
        if q.fair {
            keys.extend(row.get::<String>(9)?);
        } else if let (Some(priority), Some(run_at)) =
            (row.get::<i32>(9)?, row.get::<TimestampWithTimeZone>(10)?)
        {
            let key = cursors::Key {
                priority,
                run_at: run_at.into(),
                id: *id.as_bytes(),
            };
            last = last.max(Some(key));
        }
        claimed.push_back(Claimed {
            id,
            lease_token,
            queue: q.name.clone(),
            attempt: row.get::<i32>(3)?.unwrap_or(1),
            max_attempts: row.get::<i32>(4)?.unwrap_or(1),
            payload: row.get::<String>(5)?.unwrap_or_else(|| "{}".into()),
            timeout_ms: row.get::<i32>(6)?.unwrap_or(q.timeout_ms),
            depends_on: row.get::<Vec<pgrx::Uuid>>(7)?,
            snoozes: row.get::<i32>(8)?.unwrap_or(0),
            max_snoozes: q.max_snoozes,
            handler: q.handler.clone(),
        });
    }
    if q.fair {
        crate::fair::advance(&q.name, &keys);
    } else if let Some(last) = last {
        cursors::claimed(&q.name, last);
    }
    Ok(claimed)
}

/// Counts the running jobs of a limited queue, under its claim lock, from the oldest start
/// among them this executor last saw (cursors::running_from); from the first while the
/// clock is behind that start (stepped back), so that jobs claimed meanwhile are counted
/// and the oldest start moves back to them.
const COUNT_RUNNING_SQL: &str = "
SELECT count(*)::int4, coalesce(min(started_at), statement_timestamp())
  FROM queue.jobs
 WHERE queue = $1 AND state = 'running'
   AND started_at >= CASE WHEN $2 > statement_timestamp() THEN '-infinity' ELSE $2 END";

fn count_running(client: &mut SpiClient<'_>, queue: &str) -> Result<i32, SqlError> {
    let plan = kept(
        client,
        COUNT_RUNNING_SQL,
        &[BuiltIn(TEXTOID), BuiltIn(TIMESTAMPTZOID)],
    )?;
    let from = run_at_arg(cursors::running_from(queue));
    let row = client
        .update(&*plan, None, &[queue.into(), from.into()])?
        .first();
    if let Some(oldest) = row.get::<TimestampWithTimeZone>(2)? {
        cursors::counted_running(queue, oldest.into());
    }
    Ok(row.get::<i32>(1)?.unwrap_or(0))
}

/// When the next scheduled job becomes ready, or a queue's throttle cool-down ends, in ms
/// from now. From jobs_scheduled_idx alone: its state test is in a CASE (sql/schema.sql),
/// or some statistics plan it on jobs_ready_idx.
pub const NEXT_READY_SQL: &str = "
SELECT ceil(extract(epoch FROM least(
           (SELECT min(run_at) FROM queue.jobs
             WHERE run_at > created_at AND run_at > statement_timestamp()
               AND CASE state WHEN 'queued' THEN true END),
           (SELECT min(throttled_until) FROM queue.queues
             WHERE throttled_until > statement_timestamp()))
       - clock_timestamp()) * 1000)::int8";

/// How long until the next scheduled job becomes ready, or a queue's throttle cool-down
/// ends, if either is ahead.
fn next_ready_in(client: &mut SpiClient<'_>) -> Result<Option<Duration>, SqlError> {
    let plan = kept(client, NEXT_READY_SQL, &[])?;
    let ms = client.update(&*plan, None, &[])?.first().get_one::<i64>()?;
    Ok(ms.map(|ms| Duration::from_millis(ms.max(1) as u64)))
}

fn extension_exists() -> bool {
    transaction(|| {
        Spi::get_one::<bool>("SELECT to_regclass('queue.jobs') IS NOT NULL")
            .ok()
            .flatten()
            .unwrap_or(false)
    })
    .unwrap_or(false)
}

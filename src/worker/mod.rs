//! Background processes: the launcher (static worker, one per cluster: a scheduler per
//! database), schedulers (maintenance duties of one database) and executors (dynamic
//! workers that run handlers), plus the transaction, subtransaction, timeout and
//! signal plumbing they share.

pub mod cursors;
pub mod executor;
pub mod launcher;
pub mod maintenance;
mod metrics;
mod plans;
pub mod retention;
pub mod scheduler;
pub mod schema;
pub use plans::kept;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;
use std::ffi::CString;
use std::panic::UnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

// Symbols pgrx does not bind (utils/timeout.h, storage/ipc.h) or binds only as Rust
// wrappers that cannot be used as C signal handlers.
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn enable_timeout_every(
        id: std::ffi::c_int,
        fin_time: pg_sys::TimestampTz,
        delay_ms: std::ffi::c_int,
    );
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
    fn RegisterTimeout(
        id: std::ffi::c_int,
        handler: Option<unsafe extern "C-unwind" fn()>,
    ) -> std::ffi::c_int;
    #[link_name = "die"]
    fn pg_die(signal: std::ffi::c_int);
}
/// `STATEMENT_TIMEOUT` in enum TimeoutId (utils/timeout.h); the same value in PG 13-17.
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
/// `USER_TIMEOUT` in enum TimeoutId: asks RegisterTimeout for a free id. PG17 inserted
/// TRANSACTION_TIMEOUT before it.
#[cfg(not(any(feature = "pg17", feature = "pg18")))]
const USER_TIMEOUT: std::ffi::c_int = 12;
#[cfg(any(feature = "pg17", feature = "pg18"))]
const USER_TIMEOUT: std::ffi::c_int = 13;
/// While a handler runs, the handler check (shutdown, timeout) fires this often.
const HANDLER_CHECK_MS: std::ffi::c_int = 100;

/// An ERROR caught from SQL: what is recorded in a job's `errors`.
#[derive(Debug, Clone)]
pub struct SqlError {
    pub sqlstate: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl SqlError {
    fn from_caught(e: &CaughtError) -> SqlError {
        match e {
            CaughtError::PostgresError(r)
            | CaughtError::ErrorReport(r)
            | CaughtError::RustPanic { ereport: r, .. } => SqlError {
                sqlstate: sqlstate_text(r.sql_error_code() as i32),
                message: r.message().to_string(),
                detail: r.detail().map(str::to_string),
                hint: r.hint().map(str::to_string),
            },
        }
    }

    pub fn internal(message: impl Into<String>) -> SqlError {
        SqlError {
            sqlstate: "XX000".into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }
}

/// An SPI-level failure (not an ERROR, which unwinds to `transaction`/`subtransaction`).
impl From<pgrx::spi::SpiError> for SqlError {
    fn from(e: pgrx::spi::SpiError) -> SqlError {
        SqlError::internal(format!("SPI: {e}"))
    }
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate)
    }
}

/// The five-character SQLSTATE of a packed error code (MAKE_SQLSTATE packs 6 bits a char).
pub fn sqlstate_text(code: i32) -> String {
    (0..5)
        .map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char)
        .collect()
}

/// Runs `f` in its own transaction and commits it. An ERROR (or a Rust panic) aborts the
/// transaction and comes back as `Err`, so a worker's loop survives its own failures.
pub fn transaction<R>(f: impl FnOnce() -> R + UnwindSafe) -> Result<R, SqlError> {
    // SAFETY: called from a worker's main loop, outside any transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    FLUSH_AFTER_COMMIT.set(false);
    PgTryBuilder::new(move || {
        let r = f();
        // SAFETY: pairs with the Push/Start above; the body left no snapshot of its own.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
            if FLUSH_AFTER_COMMIT.replace(false) {
                pg_sys::XLogFlush(pg_sys::XactLastCommitEnd);
            }
        }
        Ok(r)
    })
    .catch_others(|e| {
        // SAFETY: pgrx has copied and flushed the error; abort releases locks, snapshots,
        // SPI connections and memory of the failed transaction.
        unsafe {
            pg_sys::AbortCurrentTransaction();
            pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        }
        Err(SqlError::from_caught(&e))
    })
    .execute()
}

thread_local! {
    /// The current transaction commits without waiting for its flush, which follows.
    static FLUSH_AFTER_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Inside `transaction`: its commit releases the transaction's locks before the commit
/// record is on disk, and `transaction` flushes it right after, before it returns. As
/// durable as the synchronous commit it replaces for everything this process does next,
/// but a queue's claim lock is no longer held while the disk syncs, and other sessions
/// may see the transaction one flush before a crash could no longer undo it
/// (docs/design.md "Commit, then flush"). Only where the commit would flush locally and
/// wait for no standby: otherwise the commit stays as configured.
pub fn flush_after_commit() {
    // SAFETY: reads of this transaction's state and this process's settings.
    if unsafe { pg_sys::GetTopTransactionIdIfAny() } == pg_sys::InvalidTransactionId {
        return; // wrote nothing (an idle executor's look for work): no commit record
    }
    // SAFETY: as above.
    let (level, standbys) = unsafe {
        let names = pg_sys::SyncRepStandbyNames;
        (
            pg_sys::synchronous_commit as u32,
            !names.is_null() && *names != 0,
        )
    };
    let local = pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_LOCAL_FLUSH;
    if level < local || (level > local && standbys) {
        return;
    }
    set_local(c"synchronous_commit", c"off");
    FLUSH_AFTER_COMMIT.set(true);
}

/// Plans the rest of the current transaction's statements without sequential scans, as
/// `SET LOCAL enable_seqscan = off` does, and once. pg_queue's own statements on
/// `queue.jobs` read a few rows through an index; after a burst, or while a long
/// transaction elsewhere keeps dead rows, the table has many pages and few live rows, and
/// the planner then estimates each lookup by primary key (`id = ANY(...)`) as a large
/// share of it: it chose a scan of every page for every batch, which held a queue's
/// pickup at 200 jobs/s for tens of seconds (docs/design.md "Under a held snapshot").
/// And with the kept plans' generic form (`plan_cache_mode`): planned by index whatever
/// the parameters, a statement need not be planned again for each batch (the batch's
/// record took 0.5 ms to plan, each time). Without bitmap scans too: a generic plan is
/// kept until the next ANALYZE, and when one counted a few live rows under a held
/// snapshot the claim was planned as a bitmap scan and a sort (no early stop at its
/// LIMIT) until the next; minutes of pickup p50 at 0.5–2 ms instead of 0.15 lined up with
/// such ANALYZEs (docs/design.md "Plans that statistics flipped").
/// Called only where no user code runs later in the transaction (after a batch's
/// handlers, not before them).
pub fn plan_by_index() {
    set_local(c"enable_seqscan", c"off");
    set_local(c"enable_bitmapscan", c"off");
    set_local(c"plan_cache_mode", c"force_generic_plan");
}

/// For tests: the index scans in the plan of `sql` as the workers plan it (plan_by_index),
/// each with whether it has an index condition. Nodes under a one-time filter count too.
#[cfg(any(test, feature = "pg_test"))]
pub fn index_scans(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Vec<(String, bool)> {
    fn walk(plan: &serde_json::Value, out: &mut Vec<(String, bool)>) {
        if let Some(index) = plan.get("Index Name").and_then(|i| i.as_str()) {
            out.push((index.to_string(), plan.get("Index Cond").is_some()));
        }
        for child in plan
            .get("Plans")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
        {
            walk(child, out);
        }
    }
    plan_by_index();
    let explain = format!("EXPLAIN (FORMAT JSON) {sql}");
    let plan = pgrx::Spi::get_one_with_args::<pgrx::Json>(&explain, args)
        .expect("EXPLAIN failed")
        .expect("EXPLAIN returned no plan");
    let mut out = Vec::new();
    walk(&plan.0[0]["Plan"], &mut out);
    out
}

/// A transaction-local setting (reverted at its end, also on abort), as SET LOCAL makes it.
fn set_local(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    // SAFETY: both strings outlive the call, which copies them; inside a transaction.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Runs `f` in an internal subtransaction, as PL/pgSQL runs an EXCEPTION block: an ERROR
/// inside rolls back exactly what `f` did and comes back as `Err`; the enclosing
/// transaction, its row locks and its SPI connection stay usable.
pub fn subtransaction<R>(f: impl FnOnce() -> R + UnwindSafe) -> Result<R, SqlError> {
    // SAFETY: inside a transaction; we restore the memory context and resource owner the
    // subtransaction functions switch, on both paths.
    unsafe {
        let old_cxt = pg_sys::CurrentMemoryContext;
        let old_owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(old_cxt);
        PgTryBuilder::new(move || {
            let r = f();
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(old_cxt);
            pg_sys::CurrentResourceOwner = old_owner;
            Ok(r)
        })
        .catch_others(move |e| {
            pg_sys::MemoryContextSwitchTo(old_cxt);
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(old_cxt);
            pg_sys::CurrentResourceOwner = old_owner;
            Err(SqlError::from_caught(&e))
        })
        .execute()
    }
}

thread_local! {
    /// The SQLSTATE of the last ERROR raised under a SqlstateWitness (0 = none).
    static LAST_SQLSTATE: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// While alive, notes the SQLSTATE of every error raised below it, through an error
/// context callback (Postgres calls those while it builds the error). pgrx reports a
/// SQLSTATE it has no name for as XX000, which would lose a handler's own codes
/// (`RAISE ... USING ERRCODE = 'AB123'`, or flow control's). Popped on drop, also when an
/// ERROR unwinds through it.
pub struct SqlstateWitness {
    cb: Box<pg_sys::ErrorContextCallback>,
}

impl SqlstateWitness {
    pub fn new() -> SqlstateWitness {
        LAST_SQLSTATE.set(0);
        // SAFETY: error_context_stack is this process's; the box outlives its place on the
        // stack, since drop takes it off before freeing it.
        unsafe {
            let mut cb = Box::new(pg_sys::ErrorContextCallback {
                previous: pg_sys::error_context_stack,
                callback: Some(note_sqlstate),
                arg: std::ptr::null_mut(),
            });
            pg_sys::error_context_stack = &mut *cb;
            SqlstateWitness { cb }
        }
    }

    /// The SQLSTATE of the last error raised under the witness, if any.
    pub fn last() -> Option<String> {
        let code = LAST_SQLSTATE.get();
        (code != 0).then(|| sqlstate_text(code))
    }
}

impl Drop for SqlstateWitness {
    fn drop(&mut self) {
        // SAFETY: restores the stack as it was when the witness was made.
        unsafe {
            if std::ptr::eq(pg_sys::error_context_stack, &*self.cb) {
                pg_sys::error_context_stack = self.cb.previous;
            }
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn note_sqlstate(_arg: *mut std::ffi::c_void) {
    // SAFETY: called by errfinish while an error is being built, as geterrcode requires.
    LAST_SQLSTATE.set(unsafe { pg_sys::geterrcode() });
}

/// A job's handler starts: arms the statement timeout for `ms` milliseconds (when it fires,
/// the handler fails with 57014 "canceling statement due to statement timeout"), lets SIGINT
/// in, and starts the periodic handler check. The timeout cannot be lifted from inside:
/// it is not the statement_timeout setting, a handler that catches the cancel is
/// cancelled again every HANDLER_CHECK_MS, one that returns late has its attempt failed,
/// and one still running `queue.shutdown_timeout` after its timeout ends the executor
/// (its batch is then reaped, the attempt counted).
pub fn enter_handler(ms: i32) {
    IN_HANDLER.store(true, Ordering::SeqCst);
    SHUTDOWN_GRACE_US.store(crate::gucs::shutdown_timeout_ms() * 1000, Ordering::SeqCst);
    // SAFETY: InitPostgres registered STATEMENT_TIMEOUT's handler in every backend; the
    // handler check's id was registered by attach_executor_signal_handlers.
    unsafe {
        let now = pg_sys::GetCurrentTimestamp();
        HANDLER_DEADLINE.store(now + ms.max(1) as i64 * 1000, Ordering::SeqCst);
        enable_timeout_after(STATEMENT_TIMEOUT, ms.max(1));
        let check = HANDLER_CHECK_ID.load(Ordering::Relaxed);
        if check >= 0 {
            let first = now + HANDLER_CHECK_MS as i64 * 1000;
            enable_timeout_every(check, first, HANDLER_CHECK_MS);
        }
    }
}

/// Whether the running (or just finished) handler went past its timeout.
pub fn handler_timed_out() -> bool {
    let deadline = HANDLER_DEADLINE.load(Ordering::SeqCst);
    // SAFETY: reads the clock.
    deadline != 0 && unsafe { pg_sys::GetCurrentTimestamp() } >= deadline
}

/// The handler ended: undoes `enter_handler` and forgets a cancel that arrived for it, so it
/// cannot hit the executor's own bookkeeping.
pub fn leave_handler() {
    IN_HANDLER.store(false, Ordering::SeqCst);
    // SAFETY: disabling an unarmed timeout is a no-op; the flags are this process's own.
    unsafe {
        disable_timeout(STATEMENT_TIMEOUT, false);
        let check = HANDLER_CHECK_ID.load(Ordering::Relaxed);
        if check >= 0 {
            disable_timeout(check, false);
        }
        pg_sys::QueryCancelPending = 0;
    }
}

/// True while a job's handler runs: only then does SIGINT (a cancel, a statement timeout)
/// interrupt anything. A cancel arriving between handlers must not fail the executor's own
/// bookkeeping; `queue.cancel()` leaves its request in shared memory for the next check.
static IN_HANDLER: AtomicBool = AtomicBool::new(false);

/// When SIGTERM arrived (a TimestampTz), 0 if it has not.
static SHUTDOWN_REQUESTED_AT: AtomicI64 = AtomicI64::new(0);
/// `queue.shutdown_timeout` in microseconds, copied when a handler starts (signal handlers
/// read only atomics).
static SHUTDOWN_GRACE_US: AtomicI64 = AtomicI64::new(0);
/// The timeout id of `handler_check`, registered at executor start (-1: none).
static HANDLER_CHECK_ID: AtomicI32 = AtomicI32::new(-1);
/// When the running handler's timeout expires (a TimestampTz); kept after the handler
/// returns, until the next starts, so that a late return can be told.
static HANDLER_DEADLINE: AtomicI64 = AtomicI64::new(0);

/// Whether this executor was asked to stop (SIGTERM).
pub fn shutdown_requested() -> bool {
    SHUTDOWN_REQUESTED_AT.load(Ordering::SeqCst) != 0
}

/// Executor SIGTERM handler: note the time and wake the loop. The running handler may go
/// on for `queue.shutdown_timeout` (see handler_check).
unsafe extern "C-unwind" fn on_sigterm(_signal: std::ffi::c_int) {
    // SAFETY: async-signal-safe: atomics, gettimeofday, SetLatch; errno preserved.
    unsafe {
        let saved = *libc::__errno_location();
        let _ = SHUTDOWN_REQUESTED_AT.compare_exchange(
            0,
            pg_sys::GetCurrentTimestamp().max(1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

/// Timeout handler, every HANDLER_CHECK_MS while a handler runs: past the handler's
/// timeout, cancel it again (it may have caught the first cancel); once the grace period
/// after SIGTERM or after the timeout is over, make the next CHECK_FOR_INTERRUPTS end the
/// process (as `die`).
unsafe extern "C-unwind" fn handler_check() {
    let stop_at = SHUTDOWN_REQUESTED_AT.load(Ordering::SeqCst);
    let deadline = HANDLER_DEADLINE.load(Ordering::SeqCst);
    let grace = SHUTDOWN_GRACE_US.load(Ordering::SeqCst);
    // SAFETY: called from the SIGALRM handler; flag writes and SetLatch only.
    unsafe {
        let now = pg_sys::GetCurrentTimestamp();
        if deadline != 0 && now >= deadline && IN_HANDLER.load(Ordering::SeqCst) {
            pg_sys::QueryCancelPending = 1;
            pg_sys::InterruptPending = 1;
        }
        if (stop_at != 0 && now - stop_at >= grace) || (deadline != 0 && now - deadline >= grace) {
            pg_sys::ProcDiePending = 1;
            pg_sys::InterruptPending = 1;
        }
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// SIGINT handler: Postgres' StatementCancelHandler, limited to the time a handler runs.
unsafe extern "C-unwind" fn on_sigint(_signal: std::ffi::c_int) {
    // SAFETY: async-signal-safe: flag writes and SetLatch, errno preserved, as Postgres does.
    unsafe {
        let saved = *libc::__errno_location();
        if IN_HANDLER.load(Ordering::SeqCst) && !pg_sys::proc_exit_inprogress {
            pg_sys::InterruptPending = 1;
            pg_sys::QueryCancelPending = 1;
        }
        pg_sys::SetLatch(pg_sys::MyLatch);
        *libc::__errno_location() = saved;
    }
}

/// Executors: SIGTERM asks for a graceful stop (`on_sigterm`, `handler_check`), SIGINT
/// interrupts only handlers, SIGHUP reloads settings.
pub fn attach_executor_signal_handlers() {
    attach_signal_handlers();
    // SAFETY: on_sigterm is async-signal-safe; RegisterTimeout runs once, at start.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(on_sigterm));
        HANDLER_CHECK_ID.store(
            RegisterTimeout(USER_TIMEOUT, Some(handler_check)),
            Ordering::Relaxed,
        );
    }
}

/// SIGTERM: Postgres' own handler, so the next CHECK_FOR_INTERRUPTS ends the process.
/// SIGHUP: pgrx's, which sets a flag and the latch. SIGINT: `on_sigint`.
pub fn attach_signal_handlers() {
    pgrx::bgworkers::BackgroundWorker::attach_signal_handlers(
        pgrx::bgworkers::SignalWakeFlags::SIGHUP,
    );
    // SAFETY: `die` is the standard backend SIGTERM handler; on_sigint is async-signal-safe.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(pg_die));
        pg_sys::pqsignal(pg_sys::SIGINT as i32, Some(on_sigint));
    }
}

/// Session settings of every worker connected to a database:
/// - search_path: its own statements name every object of pg_queue with its schema, and
///   nothing a user created elsewhere may stand in for a built-in function or operator.
///   Handlers get their queue's search_path (security::sandbox).
/// - jit off: the planner's cost of our statements follows the size of queue.jobs, which
///   a long transaction elsewhere inflates with dead rows; past jit_above_cost, each
///   maintenance pass compiled ~40 functions for 300 ms (measured under a held snapshot).
///   A handler that wants JIT sets it in its own SET clause.
pub fn pin_session_settings() {
    for (name, value) in [(c"search_path", c"pg_catalog, pg_temp"), (c"jit", c"off")] {
        // SAFETY: a session-level setting of this process, set at start outside transactions.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
            );
        }
    }
}

/// Re-reads postgresql.conf if SIGHUP arrived.
pub fn reload_config_if_asked() -> bool {
    if pgrx::bgworkers::BackgroundWorker::sighup_received() {
        // SAFETY: outside any transaction, as the postmaster's children do it.
        unsafe {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
        return true;
    }
    false
}

/// Shows `what` in pg_stat_activity.query for this process (state active, or idle).
pub fn report_activity(what: &str, active: bool) {
    let state = if active {
        pg_sys::BackendState::STATE_RUNNING
    } else {
        pg_sys::BackendState::STATE_IDLE
    };
    let text = CString::new(what.replace('\0', " ")).unwrap_or_default();
    // SAFETY: pgstat copies the string.
    unsafe { pg_sys::pgstat_report_activity(state, text.as_ptr()) }
}

/// Hands this process's table statistics (rows inserted, updated, deleted; dead tuples) to
/// the cumulative statistics system, at most once a second. A regular backend does this
/// when it goes idle; a background worker must do it itself, or autovacuum never learns of
/// the dead tuples its updates and deletes leave in queue.jobs. Call between transactions.
/// Returns how soon the counts it could not hand over yet may be (None: none left), so
/// that a worker going idle wakes to hand over its last second's counts.
pub fn report_table_stats() -> Option<std::time::Duration> {
    // SAFETY: outside a transaction, as PostgresMain calls it; false: rate-limited.
    let pending = unsafe { pg_sys::pgstat_report_stat(false) };
    // It asks to be called again in 10 s when it declined for being called within a second
    // of its last flush; a flush a second later is allowed.
    (pending > 0).then(|| std::time::Duration::from_millis(pending.clamp(1, 1000) as u64))
}

/// Sets application_name, so workers are recognisable in pg_stat_activity.
pub fn report_appname(name: &std::ffi::CStr) {
    // SAFETY: pgstat copies the string.
    unsafe { pg_sys::pgstat_report_appname(name.as_ptr()) }
}

#[cfg(test)]
mod unit_tests {
    #[test]
    fn sqlstate_round_trips() {
        // MAKE_SQLSTATE('5','7','0','1','4'): query_canceled
        let pack = |s: &str| {
            s.bytes()
                .enumerate()
                .map(|(i, b)| ((b - b'0') as i32) << (6 * i))
                .sum::<i32>()
        };
        for s in ["57014", "22023", "P0001", "XX000", "42704"] {
            assert_eq!(super::sqlstate_text(pack(s)), s);
        }
    }
}

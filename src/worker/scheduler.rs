//! Scheduler: one per database with the extension, started by the launcher (launcher.rs),
//! connected to that database. On every `queue.maintenance_interval` it reaps jobs of dead
//! executors and expired consumer leases, fires due cron schedules, announces NOTIFY-queue
//! jobs that became ready by time, keeps history partitions ahead and history within
//! retention, rolls up metrics, and keeps its database's share of `queue.max_workers`
//! executors running. Between ticks it wakes at the next such deadline (a plan time, a
//! lease expiring), so none of them is late. Where the extension is not installed (or once
//! it is dropped) it stops its executors and exits; the launcher starts it again at
//! CREATE EXTENSION.

use super::schema::{self, Schema};
use super::{maintenance, metrics, retention, transaction};
use crate::shmem::DbState;
use crate::{gucs, shmem};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Partitions are checked this often (and at start); they are made days ahead.
const PARTITION_INTERVAL: Duration = Duration::from_secs(600);
/// Once per tick, announcing looks this far back for jobs whose enqueue committed after
/// their run_at had passed (see maintenance::announce_ready).
const ANNOUNCE_LOOKBACK: Duration = Duration::from_secs(1);
/// Retention runs every this many ticks.
const RETENTION_EVERY_TICKS: u32 = 10;
/// Passes between ticks are at least this far apart.
const MIN_PASS_GAP: Duration = Duration::from_millis(5);
/// The reaper looks for jobs of executors gone from the registry when one left it, and at
/// least this often in any case (it reads an entry per job run since the oldest snapshot).
const EXECUTOR_REAP_INTERVAL: Duration = Duration::from_secs(60);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_queue_scheduler_main(arg: pg_sys::Datum) {
    super::attach_signal_handlers();
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    super::report_appname(c"pg_queue scheduler");
    super::pin_session_settings();
    let database = database_name();

    let mut last_partitions: Option<Instant> = None;
    let mut last_tick: Option<Instant> = None;
    let mut ticks: u32 = 0;
    let mut announced_until = None;
    let mut last_schema: Option<Schema> = None;
    let mut rolled_up = None;
    let mut serving = false;
    let mut last_share = None;
    let mut reaped = ReapedExecutors::default();
    loop {
        super::reload_config_if_asked();
        let interval = gucs::maintenance_interval();
        let mut sleep = interval;
        let found = schema::current();
        if last_schema.as_ref() != Some(&found) && found != Schema::Missing {
            say_schema(&found, &database);
        }
        if found == Schema::Missing {
            // Not installed here (or just dropped): stop the executors, then say so and go.
            manage_executors(0);
            forget_dead_executors();
            if shmem::occupied_slots(my_db()).is_empty() {
                if shmem::give_up_database() {
                    debug1!("pg_queue scheduler: no pg_queue in database \"{database}\"; stopping");
                    break;
                }
                serving = false;
                continue; // CREATE EXTENSION committed meanwhile: look again
            }
        }
        if let Schema::Served(_) = found {
            if !serving {
                shmem::set_database_state(DbState::Serving);
                serving = true;
            }
            // A pass runs every `interval` (a tick) and also at the deadlines the last pass
            // found (a scheduled NOTIFY-queue job, a consumer's lease expiring).
            let tick = last_tick.is_none_or(|t| t.elapsed() >= interval);
            if tick {
                last_tick = Some(Instant::now());
                if last_partitions.is_none_or(|t| t.elapsed() >= PARTITION_INTERVAL) {
                    partitions_and_consumers();
                    last_partitions = Some(Instant::now());
                }
                forget_dead_executors();
                mark_full_queues();
                if ticks.is_multiple_of(RETENTION_EVERY_TICKS) {
                    apply_retention();
                }
                if found.has(metrics::SINCE) {
                    metrics::roll_up_if_due(&mut rolled_up);
                }
                ticks = ticks.wrapping_add(1);
            }
            reaped.reap();
            fire_schedules();
            let lookback = if tick {
                ANNOUNCE_LOOKBACK
            } else {
                Duration::ZERO
            };
            match transaction(|| maintenance::announce_ready(announced_until, lookback)) {
                Ok(Ok((until, next))) => {
                    announced_until = until;
                    sleep = next.map_or(sleep, |d| d.min(sleep));
                }
                Ok(Err(e)) | Err(e) => {
                    log!("pg_queue scheduler: announcing ready jobs failed: {e}")
                }
            }
            if tick {
                manage_executors(my_share(&database, &mut last_share));
            }
            let to_tick =
                last_tick.map_or(Duration::ZERO, |t| interval.saturating_sub(t.elapsed()));
            sleep = sleep.min(to_tick).max(MIN_PASS_GAP);
        } else {
            manage_executors(0);
            if serving {
                shmem::set_database_state(DbState::Started);
                serving = false;
            }
        }
        last_schema = Some(found);
        super::report_activity("idle", false);
        // It wakes at least once a second while it serves the database: no extra wake.
        let _ = super::report_table_stats();
        if !BackgroundWorker::wait_latch(Some(sleep)) {
            break;
        }
    }
}

/// Marks queues at their pending-jobs limit full (and clears the mark), logging changes.
fn mark_full_queues() {
    match transaction(maintenance::mark_full_queues) {
        Ok(Ok(changed)) => {
            for (queue, full) in changed {
                if full {
                    log!("pg_queue scheduler: queue \"{queue}\" is full: enqueue refuses until its jobs drain");
                } else {
                    log!("pg_queue scheduler: queue \"{queue}\" accepts jobs again");
                }
            }
        }
        Ok(Err(e)) | Err(e) => log!("pg_queue scheduler: checking queue limits failed: {e}"),
    }
}

/// Enqueues the jobs of due cron schedules.
fn fire_schedules() {
    if let Ok(Err(e)) | Err(e) = transaction(crate::cron::fire_due) {
        log!("pg_queue scheduler: firing schedules failed: {e}");
    }
}

fn apply_retention() {
    match retention::run_pass() {
        Ok(report) => {
            for part in report.partitions_dropped {
                log!("pg_queue scheduler: retention dropped history partition {part}");
            }
            for (what, rows, batches) in report.deleted {
                log!("pg_queue scheduler: retention deleted {rows} rows of {what} in {batches} batches");
            }
        }
        Err(e) => log!("pg_queue scheduler: retention failed: {e}"),
    }
}

fn partitions_and_consumers() {
    match transaction(maintenance::create_partitions) {
        Ok(Ok(n)) if n > 0 => log!("pg_queue scheduler: created {n} history partitions"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) | Err(e) => log!("pg_queue scheduler: creating partitions failed: {e}"),
    }
    if let Ok(Err(e)) | Err(e) = transaction(maintenance::forget_consumers) {
        log!("pg_queue scheduler: forgetting old consumers failed: {e}");
    }
}

/// Logs what the launcher found when it changes: the extension created, updated, dropped,
/// or at a version this library cannot serve.
fn say_schema(found: &Schema, database: &str) {
    let library = schema::library();
    match found {
        Schema::Missing => {}
        Schema::Served(v) if v == library => {
            log!("pg_queue scheduler: serving \"{database}\" (pg_queue {v})")
        }
        Schema::Served(v) => log!(
            "pg_queue scheduler: serving \"{database}\" at schema version {v} with library \
             {library}; run ALTER EXTENSION pg_queue UPDATE for what {library} adds"
        ),
        Schema::Unknown(v) => warning!(
            "pg_queue scheduler: \"{database}\" has pg_queue schema version {v}, which library \
             {library} does not know; nothing runs until the library of version {v} is \
             installed and the server restarted"
        ),
    }
}

/// Frees registry slots whose process is gone without saying so (it died before it could
/// run its exit callback).
fn forget_dead_executors() {
    shmem::forget_dead_executors(my_db());
}

/// Which executors' jobs the reaper has looked at: as of how many exits from the registry,
/// and when.
#[derive(Default)]
struct ReapedExecutors {
    exits: Option<u64>,
    at: Option<Instant>,
}

impl ReapedExecutors {
    /// Running jobs whose consumer's lease expired go back to queued (or failed), and so do
    /// those of executors that are not alive, when one left the registry since the last
    /// look (or a minute passed).
    fn reap(&mut self) {
        let exits = shmem::executor_exits();
        let executors = exits.is_none()
            || self.exits != exits
            || self
                .at
                .is_none_or(|t| t.elapsed() >= EXECUTOR_REAP_INTERVAL);
        match transaction(|| maintenance::reap_dead_owners(executors)) {
            Ok(Ok((n, all))) => {
                if n > 0 {
                    log!("pg_queue scheduler: reaped {n} jobs of dead executors or expired leases");
                }
                if executors && all {
                    *self = ReapedExecutors {
                        exits,
                        at: Some(Instant::now()),
                    };
                }
            }
            Ok(Err(e)) | Err(e) => log!("pg_queue scheduler: reaping failed: {e}"),
        }
    }
}

/// This process's database.
fn my_db() -> u32 {
    // SAFETY: set once the worker connected to its database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

fn database_name() -> String {
    // A catalog lookup: in a transaction.
    BackgroundWorker::transaction(|| {
        // SAFETY: MyDatabaseId is the connected database; the name is palloc'd in the
        // transaction's memory context (or NULL if the database vanished).
        unsafe {
            let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
            if name.is_null() {
                return my_db().to_string();
            }
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    })
}

/// This database's share of `queue.max_workers`: an even split among the databases served
/// (the first ones, in oid order, get one more when it does not divide), at most
/// `queue.max_workers_per_database`, and at least one: a database is never left without
/// an executor, so with more databases than `queue.max_workers` the cluster runs one per
/// database (0 stops them all). Logs when it changes.
fn my_share(database: &str, last: &mut Option<usize>) -> usize {
    let serving = shmem::serving_databases();
    let total = gucs::max_workers();
    let share = share_of(total, &serving, my_db()).min(gucs::max_workers_per_database().max(1));
    if *last != Some(share) {
        if total > 0 && serving.len() > total {
            warning!(
                "pg_queue scheduler: {} databases are served and queue.max_workers is {total}: \
                 each runs one executor",
                serving.len()
            );
        } else if last.is_some() {
            log!("pg_queue scheduler: database \"{database}\" now runs {share} executors");
        }
        *last = Some(share);
    }
    share
}

/// `total` split evenly over `serving` (sorted), the remainder going to the first ones, at
/// least one each unless `total` is 0; none for a database not among them.
fn share_of(total: usize, serving: &[u32], me: u32) -> usize {
    let Some(rank) = serving.iter().position(|&d| d == me) else {
        return 0;
    };
    if total == 0 {
        return 0;
    }
    let n = serving.len();
    (total / n + usize::from(rank < total % n)).max(1)
}

/// Starts executors in free slots up to `want`, and asks the surplus to stop.
fn manage_executors(want: usize) {
    let occupied = shmem::occupied_slots(my_db());
    if occupied.len() > want {
        for &(slot, pid) in occupied.iter().rev().take(occupied.len() - want) {
            if pid > 0 {
                log!("pg_queue scheduler: stopping executor {pid} (slot {slot})");
                // SAFETY: SIGTERM to our own executor; it exits at its next interrupt check.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        return;
    }
    for _ in occupied.len()..want {
        let Some(slot) = shmem::reserve_slot() else {
            log!(
                "pg_queue scheduler: every executor slot is taken ({})",
                gucs::MAX_EXECUTORS
            );
            break;
        };
        if !start_executor(slot) {
            break;
        }
    }
}

fn start_executor(slot: usize) -> bool {
    // SAFETY: both are set for every connected background worker.
    let (dboid, my_pid) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
    let worker = BackgroundWorkerBuilder::new(&format!("pg_queue executor {slot}"))
        .set_type("pg_queue executor")
        .set_library("pg_queue")
        .set_function("pg_queue_executor_main")
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .set_extra(&dboid.to_u32().to_string())
        .enable_spi_access()
        .set_notify_pid(my_pid)
        .load_dynamic();
    let Ok(worker) = worker else {
        shmem::release_executor(slot, -my_pid);
        log!(
            "pg_queue scheduler: could not start an executor: no free background worker slot \
             (raise max_worker_processes or lower queue.max_workers)"
        );
        return false;
    };
    match worker.wait_for_startup() {
        Ok(pid) => {
            shmem::confirm_slot(slot, pid);
            log!("pg_queue scheduler: started executor {pid} (slot {slot})");
            true
        }
        Err(status) => {
            shmem::release_executor(slot, -my_pid);
            log!("pg_queue scheduler: executor for slot {slot} did not start: {status:?}");
            false
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::share_of;

    #[test]
    fn executors_are_split_evenly_and_the_remainder_goes_first() {
        assert_eq!(share_of(5, &[10, 20], 10), 3);
        assert_eq!(share_of(5, &[10, 20], 20), 2);
        assert_eq!(
            share_of(2, &[10, 20, 30], 30),
            1,
            "never none while executors run"
        );
        assert_eq!(share_of(0, &[10, 20], 10), 0);
        assert_eq!(share_of(4, &[10], 10), 4);
        assert_eq!(share_of(4, &[10], 99), 0, "a database not served gets none");
    }
}

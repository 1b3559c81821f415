//! Launcher: the static background worker. Connects to `queue.database`, waits for the
//! extension, then on every `queue.maintenance_interval` reaps jobs of dead executors and
//! expired consumer leases, fires due cron schedules, announces NOTIFY-queue jobs that
//! became ready by time, keeps history partitions ahead and history within retention, and
//! keeps `queue.max_workers` executors running. Between ticks it wakes at the next such
//! deadline (a plan time, a lease expiring), so none of them is late.
//! Registered with BgWorkerStart_RecoveryFinished: a standby runs nothing until promoted.

use super::schema::{self, Schema};
use super::{maintenance, retention, transaction};
use crate::{gucs, shmem};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// A crashed launcher is restarted after this long (also while `queue.database` does not
/// exist yet).
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// Partitions are checked this often (and at start); they are made days ahead.
const PARTITION_INTERVAL: Duration = Duration::from_secs(600);
/// Once per tick, announcing looks this far back for jobs whose enqueue committed after
/// their run_at had passed (see maintenance::announce_ready).
const ANNOUNCE_LOOKBACK: Duration = Duration::from_secs(1);
/// Retention runs every this many ticks.
const RETENTION_EVERY_TICKS: u32 = 10;
/// Passes between ticks are at least this far apart.
const MIN_PASS_GAP: Duration = Duration::from_millis(5);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_queue launcher")
        .set_type("pg_queue launcher")
        .set_library("pg_queue")
        .set_function("pg_queue_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(RESTART_DELAY))
        .load();
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_queue_launcher_main(_arg: pg_sys::Datum) {
    super::attach_signal_handlers();
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    super::report_appname(c"pg_queue launcher");
    super::pin_search_path();
    log!("pg_queue launcher started (database \"{database}\")");

    let mut last_partitions: Option<Instant> = None;
    let mut last_tick: Option<Instant> = None;
    let mut ticks: u32 = 0;
    let mut announced_until = None;
    let mut last_schema: Option<Schema> = None;
    loop {
        super::reload_config_if_asked();
        let interval = gucs::maintenance_interval();
        let mut sleep = interval;
        let found = schema::current();
        if last_schema.as_ref() != Some(&found) {
            say_schema(&found, &database);
            last_schema = Some(found.clone());
        }
        if let Schema::Served(_) = found {
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
                ticks = ticks.wrapping_add(1);
            }
            reap_dead_owners();
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
                Ok(Err(e)) | Err(e) => log!("pg_queue launcher: announcing ready jobs failed: {e}"),
            }
            if tick {
                manage_executors(gucs::max_workers());
            }
            let to_tick =
                last_tick.map_or(Duration::ZERO, |t| interval.saturating_sub(t.elapsed()));
            sleep = sleep.min(to_tick).max(MIN_PASS_GAP);
        } else {
            manage_executors(0);
        }
        super::report_activity("idle", false);
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
                    log!("pg_queue launcher: queue \"{queue}\" is full: enqueue refuses until its jobs drain");
                } else {
                    log!("pg_queue launcher: queue \"{queue}\" accepts jobs again");
                }
            }
        }
        Ok(Err(e)) | Err(e) => log!("pg_queue launcher: checking queue limits failed: {e}"),
    }
}

/// Enqueues the jobs of due cron schedules.
fn fire_schedules() {
    if let Ok(Err(e)) | Err(e) = transaction(crate::cron::fire_due) {
        log!("pg_queue launcher: firing schedules failed: {e}");
    }
}

fn apply_retention() {
    match retention::run_pass() {
        Ok(report) => {
            for part in report.partitions_dropped {
                log!("pg_queue launcher: retention dropped history partition {part}");
            }
            for (what, rows, batches) in report.deleted {
                log!("pg_queue launcher: retention deleted {rows} rows of {what} in {batches} batches");
            }
        }
        Err(e) => log!("pg_queue launcher: retention failed: {e}"),
    }
}

fn partitions_and_consumers() {
    match transaction(maintenance::create_partitions) {
        Ok(Ok(n)) if n > 0 => log!("pg_queue launcher: created {n} history partitions"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) | Err(e) => log!("pg_queue launcher: creating partitions failed: {e}"),
    }
    if let Ok(Err(e)) | Err(e) = transaction(maintenance::forget_consumers) {
        log!("pg_queue launcher: forgetting old consumers failed: {e}");
    }
}

/// Logs what the launcher found when it changes: the extension created, updated, dropped,
/// or at a version this library cannot serve.
fn say_schema(found: &Schema, database: &str) {
    let library = schema::library();
    match found {
        Schema::Missing => {
            log!("pg_queue launcher: waiting for CREATE EXTENSION pg_queue in \"{database}\"")
        }
        Schema::Served(v) if v == library => {
            log!("pg_queue launcher: serving \"{database}\" (pg_queue {v})")
        }
        Schema::Served(v) => log!(
            "pg_queue launcher: serving \"{database}\" at schema version {v} with library \
             {library}; run ALTER EXTENSION pg_queue UPDATE for what {library} adds"
        ),
        Schema::Unknown(v) => warning!(
            "pg_queue launcher: \"{database}\" has pg_queue schema version {v}, which library \
             {library} does not know; nothing runs until the library of version {v} is \
             installed and the server restarted"
        ),
    }
}

/// Frees registry slots whose process is gone without saying so (it died before it could
/// register its exit callback).
fn forget_dead_executors() {
    for (slot, pid) in shmem::occupied_slots() {
        // SAFETY: signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            shmem::release_executor(slot, pid);
        }
    }
}

/// Running jobs whose executor is not alive, or whose consumer's lease expired, go back to
/// queued (or failed).
fn reap_dead_owners() {
    match transaction(maintenance::reap_dead_owners) {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => log!("pg_queue launcher: reaped {n} jobs of dead executors or expired leases"),
        Ok(Err(e)) | Err(e) => log!("pg_queue launcher: reaping failed: {e}"),
    }
}

/// Starts executors in free slots up to `want`, and asks the surplus to stop.
fn manage_executors(want: usize) {
    let occupied = shmem::occupied_slots();
    if occupied.len() > want {
        for &(slot, pid) in occupied.iter().rev().take(occupied.len() - want) {
            log!("pg_queue launcher: stopping executor {pid} (slot {slot})");
            // SAFETY: SIGTERM to our own executor; it exits at its next interrupt check.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        return;
    }
    let taken: Vec<usize> = occupied.iter().map(|&(slot, _)| slot).collect();
    let free = (0..gucs::MAX_EXECUTORS).filter(|s| !taken.contains(s));
    for slot in free.take(want - occupied.len()) {
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
        log!(
            "pg_queue launcher: could not start an executor: no free background worker slot \
             (raise max_worker_processes or lower queue.max_workers)"
        );
        return false;
    };
    match worker.wait_for_startup() {
        Ok(pid) => {
            shmem::reserve_slot(slot, pid);
            log!("pg_queue launcher: started executor {pid} (slot {slot})");
            true
        }
        Err(status) => {
            log!("pg_queue launcher: executor for slot {slot} did not start: {status:?}");
            false
        }
    }
}

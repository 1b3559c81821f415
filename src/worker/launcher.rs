//! Launcher: the static background worker, one per cluster, connected to no database.
//! Every second it lists the databases to serve (`queue.databases`; templates and
//! databases that refuse connections are skipped) and starts a scheduler in each one it
//! has none in (scheduler.rs): the scheduler serves the database if the extension is
//! installed there and exits at once if not. After that, a database gets a scheduler again
//! when `CREATE EXTENSION pg_queue` commits in it (a backend wakes the launcher), when it
//! is new (CREATE DATABASE, maybe from a template that has the extension), or when its
//! scheduler stopped without saying the extension is gone.
//!
//! Backends also keep the database free for commands that need it to themselves: before
//! `DROP DATABASE`, `ALTER DATABASE ... RENAME` or `CREATE DATABASE ... TEMPLATE`, and
//! before `DROP EXTENSION pg_queue` (whose locks would race the workers'), the utility
//! hook here stops that database's scheduler and executors and keeps the launcher from
//! starting them again until the command is done.
//! Registered with BgWorkerStart_RecoveryFinished: a standby runs nothing until promoted.

use crate::{gucs, shmem};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder};
use pgrx::prelude::*;
use std::ffi::CStr;
use std::time::{Duration, Instant};

/// A crashed launcher is restarted after this long.
const RESTART_DELAY: Duration = Duration::from_secs(5);
/// How often the launcher looks at pg_database (it also wakes when a backend asks).
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// A scheduler that stopped without saying why is started again after this long.
const SCHEDULER_RESTART_MS: i64 = 5_000;
/// How long the launcher leaves a database alone before a command that needs it to itself.
const EVICT_HOLD_MS: i64 = 15_000;
/// How long that command waits for pg_queue's processes to leave the database.
const EVICT_WAIT: Duration = Duration::from_secs(10);

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
    BackgroundWorker::connect_worker_to_spi(None, None);
    super::report_appname(c"pg_queue launcher");
    shmem::set_launcher();
    log!("pg_queue launcher started");

    let mut warned_full: Vec<u32> = Vec::new();
    loop {
        super::reload_config_if_asked();
        let present = BackgroundWorker::transaction(databases_to_serve);
        let (stop, full) = shmem::sync_databases(&present.iter().map(|d| d.0).collect::<Vec<_>>());
        for pid in stop {
            // SAFETY: SIGTERM to a scheduler or executor of a database no longer served.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for oid in &full {
            if !warned_full.contains(oid) {
                warning!(
                    "pg_queue launcher: more than {} databases to serve; database {oid} is not served",
                    shmem::MAX_DATABASES
                );
            }
        }
        warned_full = full;
        shmem::restart_dead_schedulers(SCHEDULER_RESTART_MS);
        for oid in shmem::wanted_databases() {
            let name = present
                .iter()
                .find(|d| d.0 == oid)
                .map_or("?", |d| d.1.as_str());
            if !start_scheduler(oid, name) {
                break;
            }
        }
        super::report_activity("idle", false);
        if !BackgroundWorker::wait_latch(Some(SCAN_INTERVAL)) {
            break;
        }
    }
}

/// (oid, name) of the databases that allow connections, are not templates, and are in
/// `queue.databases` (every one when it is empty). Reads pg_database directly: the launcher
/// is connected to no database, so it can read shared catalogs only.
fn databases_to_serve() -> Vec<(u32, String)> {
    let allowed = gucs::databases();
    let mut found = Vec::new();
    // SAFETY: a heap scan of the shared catalog pg_database inside the transaction the
    // caller started; every tuple is read while the scan holds its buffer pin.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as _);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let db = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            let name = CStr::from_ptr(db.datname.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            let wanted = allowed.as_ref().is_none_or(|a| a.contains(&name));
            if db.datallowconn && !db.datistemplate && wanted {
                found.push((db.oid.to_u32(), name));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
    }
    found
}

/// Starts the scheduler of database `oid`. False when no background worker slot is free.
fn start_scheduler(oid: u32, name: &str) -> bool {
    // SAFETY: MyProcPid is this process's pid.
    let my_pid = unsafe { pg_sys::MyProcPid };
    let worker = BackgroundWorkerBuilder::new(&format!("pg_queue scheduler {name}"))
        .set_type("pg_queue scheduler")
        .set_library("pg_queue")
        .set_function("pg_queue_scheduler_main")
        .set_argument(Some(pg_sys::Datum::from(oid as usize)))
        .enable_spi_access()
        .set_notify_pid(my_pid)
        .load_dynamic();
    let Ok(worker) = worker else {
        log!(
            "pg_queue launcher: could not start the scheduler of database \"{name}\": no free \
             background worker slot (raise max_worker_processes)"
        );
        return false;
    };
    match worker.wait_for_startup() {
        Ok(pid) => shmem::scheduler_started(oid, pid),
        Err(status) => {
            log!(
                "pg_queue launcher: the scheduler of database \"{name}\" did not start: {status:?}"
            )
        }
    }
    true
}

// -- in backends: the utility hook -----------------------------------------------------

static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the utility hook (preloaded only: it relies on the shared memory).
pub fn init_hooks() {
    // SAFETY: _PG_init runs once per process, before any statement can reach the hook.
    unsafe {
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

// The raw symbol: pgrx's pg_sys binding would catch an ERROR of the statement and raise it
// again as a new one, which loses an SQLSTATE pgrx has no name for (a handler's own code:
// a handler is a CALL, so every handler runs under this hook).
unsafe extern "C-unwind" {
    #[link_name = "standard_ProcessUtility"]
    fn raw_standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

/// Not #[pg_guard], for the reason above: an ERROR of the statement passes through this
/// frame, which holds nothing to drop, as it would through a C one. Our own work is in
/// `before_utility`, which is guarded.
#[allow(clippy::too_many_arguments)] // the hook's C signature
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: pstmt is the statement being run; the previous hook (a C function pointer)
    // or the standard implementation gets exactly the arguments we were given.
    unsafe {
        let evicted = before_utility((*pstmt).utilityStmt);
        let run = PREV_PROCESS_UTILITY.unwrap_or(raw_standard_process_utility);
        run(
            pstmt,
            query_string,
            read_only_tree,
            context,
            params,
            query_env,
            dest,
            qc,
        );
        if evicted != 0 {
            after_utility(evicted);
        }
    }
}

/// Before a utility statement: stops pg_queue's processes in a database the statement
/// needs to itself (returning its oid, 0 if none), and after CREATE EXTENSION pg_queue
/// commits, wakes the launcher.
#[pg_guard]
unsafe extern "C-unwind" fn before_utility(stmt: *mut pg_sys::Node) -> u32 {
    // SAFETY: stmt is the utility statement's parse node.
    unsafe {
        if created_pg_queue(stmt) {
            pgrx::register_xact_callback(
                pgrx::PgXactCallbackEvent::Commit,
                shmem::want_this_database,
            );
        }
        if dropping_pg_queue(stmt) {
            // Its workers would otherwise take locks on the objects being dropped, in an
            // order that can deadlock with the DROP.
            return evict_oid(pg_sys::MyDatabaseId.to_u32());
        }
        database_needed_alone(stmt).map_or(0, |db| evict(&db))
    }
}

/// Whether the statement is DROP EXTENSION naming pg_queue.
///
/// # Safety
/// `stmt` is a valid parse node.
unsafe fn dropping_pg_queue(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the casts follow the node tags; extension names are String nodes.
    unsafe {
        if (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return false;
        }
        let drop = &*(stmt as *mut pg_sys::DropStmt);
        drop.removeType == pg_sys::ObjectType::OBJECT_EXTENSION
            && pgrx::PgList::<pg_sys::Node>::from_pg(drop.objects)
                .iter_ptr()
                .any(|n| {
                    (*n).type_ == pg_sys::NodeTag::T_String && {
                        let v = (*(n as *mut pg_sys::String)).sval;
                        !v.is_null() && CStr::from_ptr(v).to_bytes() == b"pg_queue"
                    }
                })
    }
}

/// The statement that needed the database is done (those commands cannot run in a
/// transaction block, so done is committed): the launcher may serve it again now (a
/// dropped one is gone from pg_database anyway). After an ERROR, the hold just expires.
#[pg_guard]
extern "C-unwind" fn after_utility(oid: u32) {
    shmem::release_database(oid);
}

/// The database a utility statement needs without other sessions in it: the one dropped,
/// renamed, or copied as a template.
///
/// # Safety
/// `stmt` is a valid parse node.
unsafe fn database_needed_alone(stmt: *mut pg_sys::Node) -> Option<String> {
    let cstr = |p: *const std::ffi::c_char| {
        // SAFETY: parse nodes hold NUL-terminated strings (or NULL).
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    // SAFETY: each cast follows the node's tag.
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => cstr((*(stmt as *mut pg_sys::DropdbStmt)).dbname),
            pg_sys::NodeTag::T_RenameStmt => {
                let r = &*(stmt as *mut pg_sys::RenameStmt);
                (r.renameType == pg_sys::ObjectType::OBJECT_DATABASE)
                    .then(|| cstr(r.subname))
                    .flatten()
            }
            pg_sys::NodeTag::T_CreatedbStmt => {
                let options = (*(stmt as *mut pg_sys::CreatedbStmt)).options;
                pgrx::PgList::<pg_sys::DefElem>::from_pg(options)
                    .iter_ptr()
                    .find(|d| cstr((**d).defname).as_deref() == Some("template"))
                    .and_then(|d| cstr(pg_sys::defGetString(d)))
            }
            _ => None,
        }
    }
}

/// Whether the statement is CREATE EXTENSION pg_queue.
///
/// # Safety
/// `stmt` is a valid parse node.
unsafe fn created_pg_queue(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the cast follows the node's tag; extname is a NUL-terminated string.
    unsafe {
        (*stmt).type_ == pg_sys::NodeTag::T_CreateExtensionStmt && {
            let name = (*(stmt as *mut pg_sys::CreateExtensionStmt)).extname;
            !name.is_null() && CStr::from_ptr(name).to_bytes() == b"pg_queue"
        }
    }
}

/// Stops the scheduler and executors of database `name`, keeps the launcher from starting
/// them again for a while, and waits (briefly) until they are gone. Returns its oid (0: no
/// such database).
fn evict(name: &str) -> u32 {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a catalog lookup by name; missing_ok returns InvalidOid for no such database.
    let oid = unsafe { pg_sys::get_database_oid(cname.as_ptr(), true) }.to_u32();
    evict_oid(oid)
}

/// `evict` by oid (0: nothing to do).
fn evict_oid(oid: u32) -> u32 {
    if oid == 0 {
        return 0;
    }
    // Until none is left: an executor its scheduler was starting when the signal came
    // shows up in the registry later, and is signalled then.
    let start = Instant::now();
    let mut signalled = Vec::new();
    loop {
        let pids = shmem::evict_database(oid, EVICT_HOLD_MS);
        let alive: Vec<i32> = pids.into_iter().filter(|&p| shmem::alive(p)).collect();
        if alive.is_empty() || start.elapsed() >= EVICT_WAIT {
            break;
        }
        for pid in alive {
            if !signalled.contains(&pid) {
                // SAFETY: SIGTERM to pg_queue's own workers of that database.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                signalled.push(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
        pg_sys::check_for_interrupts!();
    }
    oid
}

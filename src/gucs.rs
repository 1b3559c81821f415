//! Every `queue.*` setting: a private static with its doc, one `init`, public accessors.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

/// The databases served: a comma-separated allow-list; empty serves every database that
/// has the extension.
static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Deprecated (before 0.2.0 the one database served): an allow-list of one, when
/// `queue.databases` is empty.
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Most executors (dynamic background workers) in the cluster, shared by the databases.
static MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
/// Most executors one database gets.
static MAX_WORKERS_PER_DATABASE: GucSetting<i32> = GucSetting::<i32>::new(MAX_EXECUTORS as i32);
/// Longest an idle executor sleeps before looking for work: the fallback when no wake-up came.
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Most jobs an executor claims, runs and completes in one transaction.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(64);
/// An executor commits its batch once it has run handlers for this long.
static BATCH_TIME_MS: GucSetting<i32> = GucSetting::<i32>::new(50);
/// On SIGTERM (shutdown, or fewer `queue.max_workers`) an executor lets the running handler
/// finish for this long; after that it abandons the job, which is recovered on restart.
static SHUTDOWN_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// How often the launcher runs its maintenance duties (reaping, partitions).
static MAINTENANCE_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// How long per-minute metrics (`queue.metrics`) are kept, in minutes. Read by the SQL that
/// prunes them with current_setting().
static METRICS_RETENTION_MIN: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 60);

/// Largest payload `enqueue` accepts, in bytes (`pg_column_size` of the jsonb). A queue's
/// `max_payload_size` may only be lower.
static MAX_PAYLOAD_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// Largest result a handler or `complete` may keep, in bytes.
static MAX_RESULT_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// Longest error message (and detail, hint) kept per failed attempt, in characters.
static MAX_ERROR_LENGTH: GucSetting<i32> = GucSetting::<i32>::new(2048);
/// Most live jobs a queue may hold before `enqueue` answers "queue full". A queue's
/// `max_pending_jobs` may only be lower.
static MAX_PENDING_JOBS: GucSetting<i32> = GucSetting::<i32>::new(10_000_000);

/// Hard upper bound for `queue.max_workers`: the size of the shared executor registry.
pub const MAX_EXECUTORS: usize = 64;
/// Hard upper bound for `queue.batch_size`: more subtransactions per transaction than this
/// overflow the PGPROC subxid cache and slow every snapshot in the cluster.
pub const MAX_BATCH: i32 = 64;

pub fn init() {
    GucRegistry::define_int_guc(
        c"queue.max_workers",
        c"Maximum number of pg_queue executors in the cluster, shared by its databases.",
        c"Each executor is a background worker: keep max_worker_processes above this plus \
          one scheduler per database served plus the launcher.",
        &MAX_WORKERS,
        0,
        MAX_EXECUTORS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"queue.max_workers_per_database",
        c"Maximum number of pg_queue executors one database gets.",
        c"",
        &MAX_WORKERS_PER_DATABASE,
        1,
        MAX_EXECUTORS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"queue.databases",
        c"Databases pg_queue serves (comma-separated); empty: every database with the extension.",
        c"Templates and databases that do not allow connections are never served.",
        &DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"queue.poll_interval",
        c"Longest time an idle executor sleeps before checking for jobs.",
        c"Committed enqueues wake executors at once; this is only the fallback.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"queue.batch_size",
        c"Most jobs an executor claims and completes per transaction.",
        c"",
        &BATCH_SIZE,
        1,
        MAX_BATCH,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"queue.batch_time",
        c"An executor commits its batch after running handlers for this long.",
        c"",
        &BATCH_TIME_MS,
        1,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"queue.shutdown_timeout",
        c"How long a stopping executor lets its running handler finish.",
        c"After this the job is abandoned and recovered when the server runs again.",
        &SHUTDOWN_TIMEOUT_MS,
        0,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"queue.maintenance_interval",
        c"How often the launcher reaps jobs of dead executors and creates history partitions.",
        c"",
        &MAINTENANCE_INTERVAL_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"queue.metrics_retention",
        c"How long the launcher keeps per-minute metrics (queue.metrics).",
        c"Older minutes are deleted; the counters of queue.prometheus_metrics() keep counting.",
        &METRICS_RETENTION_MIN,
        60,
        366 * 24 * 60,
        GucContext::Sighup,
        GucFlags::UNIT_MIN,
    );
    init_limits();
}

/// Limits a superuser sets (PGC_SUSET: postgresql.conf, ALTER SYSTEM, or a superuser's
/// SET); queues may set lower ones. Read by the SQL API with current_setting().
fn init_limits() {
    let limits: [(&std::ffi::CStr, &std::ffi::CStr, &GucSetting<i32>, i32, i32); 4] = [
        (
            c"queue.max_payload_size",
            c"Largest job payload enqueue accepts, in bytes.",
            &MAX_PAYLOAD_SIZE,
            1,
            i32::MAX,
        ),
        (
            c"queue.max_result_size",
            c"Largest job result kept, in bytes.",
            &MAX_RESULT_SIZE,
            1,
            i32::MAX,
        ),
        (
            c"queue.max_error_length",
            c"Longest error text kept per failed attempt, in characters.",
            &MAX_ERROR_LENGTH,
            64,
            1024 * 1024,
        ),
        (
            c"queue.max_pending_jobs",
            c"Most live jobs a queue may hold before enqueue refuses with queue full.",
            &MAX_PENDING_JOBS,
            1,
            i32::MAX,
        ),
    ];
    for (name, short, setting, min, max) in limits {
        GucRegistry::define_int_guc(
            name,
            short,
            c"A queue may set a lower limit of its own.",
            setting,
            min,
            max,
            GucContext::Suset,
            GucFlags::default(),
        );
    }
}

/// Settings fixed at server start. Defining a PGC_POSTMASTER setting outside of
/// shared_preload_libraries processing is a FATAL error, so this runs only then.
pub fn init_postmaster() {
    GucRegistry::define_string_guc(
        c"queue.database",
        c"Deprecated: use queue.databases. The one database served, when that is empty.",
        c"",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// The allow-list of databases to serve; None serves every database.
pub fn databases() -> Option<Vec<String>> {
    let text = |g: &GucSetting<Option<CString>>| {
        g.get()
            .and_then(|s| s.into_string().ok())
            .filter(|s| !s.trim().is_empty())
    };
    let list = text(&DATABASES).or_else(|| text(&DATABASE))?;
    Some(list.split(',').map(|d| d.trim().to_string()).collect())
}

pub fn max_workers_per_database() -> usize {
    MAX_WORKERS_PER_DATABASE.get().max(0) as usize
}

pub fn max_workers() -> usize {
    (MAX_WORKERS.get().max(0) as usize).min(MAX_EXECUTORS)
}

pub fn poll_interval() -> Duration {
    Duration::from_millis(POLL_INTERVAL_MS.get().max(10) as u64)
}

pub fn batch_size() -> i32 {
    BATCH_SIZE.get().clamp(1, MAX_BATCH)
}

pub fn batch_time() -> Duration {
    Duration::from_millis(BATCH_TIME_MS.get().max(1) as u64)
}

pub fn maintenance_interval() -> Duration {
    Duration::from_millis(MAINTENANCE_INTERVAL_MS.get().max(100) as u64)
}

pub fn shutdown_timeout_ms() -> i64 {
    SHUTDOWN_TIMEOUT_MS.get().max(0) as i64
}

pub fn max_result_size() -> usize {
    MAX_RESULT_SIZE.get().max(1) as usize
}

pub fn max_error_length() -> usize {
    MAX_ERROR_LENGTH.get().max(64) as usize
}

pub fn max_payload_size() -> i32 {
    MAX_PAYLOAD_SIZE.get()
}

pub fn max_pending_jobs() -> i64 {
    MAX_PENDING_JOBS.get().max(1) as i64
}

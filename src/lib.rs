//! pg_queue: job queues run by background workers inside PostgreSQL.
//!
//! Vocabulary, used exactly so in the code, the SQL and the docs:
//! - **queue**: a named stream of jobs with its own settings (`queue.queues`).
//! - **job**: one unit of work: a payload for the queue's handler (`queue.jobs` while live,
//!   `queue.history` once terminal).
//! - **handler**: the SQL procedure or function `handler(payload jsonb)` a queue runs.
//! - **attempt**: one run of a job's handler; counted when the job is claimed.
//! - **claim**: taking ready jobs (`queued`, `run_at` reached) into `running`, committed
//!   before their handlers run, with an owner (executor) and a fresh lease token.
//! - **lease token**: a uuid that fences every transition out of `running`: a stale owner's
//!   completion matches no row.
//! - **executor**: a dynamic background worker that claims jobs and runs handlers.
//! - **launcher**: the static background worker (one per cluster) that starts a scheduler
//!   in every database with the extension.
//! - **scheduler**: a database's background worker: maintenance, cron, and its executors.
//! - **reap**: returning the jobs of an executor that died to `queued` (or `failed`).
//!
//! - **owner** (of a queue or schedule): the role that created it; handlers and schedules
//!   run as it. **caller**: the role that called an API function (`queue.caller()`).
//!
//! Layout: `gucs` (settings), `shmem` (executor registry and wake-ups), `state` (the job
//! state machine), `security` (who called the API; the sandbox other roles' code runs in),
//! `api` (SQL functions written in Rust; the rest of the API is SQL in `sql/`), `worker`
//! (launcher, executor, reaper, retention).

use pgrx::prelude::*;

/// `pg_finfo_<symbol>` of a C function written without `#[pg_extern]` (enqueue, the jobs
/// trigger): what tells Postgres it uses the version-1 calling convention.
macro_rules! v1_function_info {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn $finfo() -> &'static pgrx::pg_sys::Pg_finfo_record {
            static V1: pgrx::pg_sys::Pg_finfo_record =
                pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}

mod api;
mod cron;
mod fair;
mod flow;
mod gucs;
mod locks;
mod rate;
mod rows;
mod security;
mod shmem;
mod state;
mod worker;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/privileges.sql",
    name = "privileges",
    requires = ["schema", security::api::caller]
);
extension_sql_file!(
    "../sql/queues.sql",
    name = "queues",
    requires = ["privileges", api::wake_executors, locks::lock_queue]
);
extension_sql_file!(
    "../sql/jobs.sql",
    name = "jobs",
    requires = [
        "queues",
        api::uuid_generate_v7,
        api::wake_executors,
        api::rewind_executors,
        api::request_cancel,
        api::job_progress
    ]
);
extension_sql_file!(
    "../sql/dependencies.sql",
    name = "dependencies",
    requires = ["jobs"]
);
extension_sql_file!(
    "../sql/consumers.sql",
    name = "consumers",
    requires = ["jobs", api::executors, api::check_progress]
);
extension_sql_file!(
    "../sql/fair.sql",
    name = "fair",
    requires = ["jobs", fair::fair_cursor, fair::fair_advance]
);
extension_sql_file!(
    "../sql/flow.sql",
    name = "flow",
    requires = [
        "consumers",
        flow::signal_job,
        rate::rate_take,
        rate::rate_settle,
        rate::rate_wait_us
    ]
);
extension_sql_file!(
    "../sql/schedules.sql",
    name = "schedules",
    requires = ["jobs", cron::cron_next]
);
extension_sql_file!(
    "../sql/metrics.sql",
    name = "metrics",
    requires = ["consumers", "flow", "fair"]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Called in every process that loads the library. Settings that can change at run time are
/// defined everywhere; shared memory and the launcher only when preloaded.
#[pg_guard]
#[allow(non_snake_case)]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    security::init();
    // SAFETY: read-only flag set by the postmaster while it loads preload libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    gucs::init_postmaster();
    shmem::init();
    rate::init();
    worker::launcher::register();
    worker::launcher::init_hooks();
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_queue'",
            "queue.databases = 'pgrx_tests'",
        ]
    }
}

//! `queue.enqueue`, the call every producer makes, as a C function.
//!
//! Its common case (a queue the caller owns or may enqueue into, a payload that fits, no
//! unique key, dependencies, max_attempts or timeout of its own) runs here with two kept
//! plans: the queue's row with the privilege and size checks, then the INSERT. Everything
//! else (those options, every error) is handed to `queue.enqueue_sql` (sql/jobs.sql), the
//! whole of enqueue in PL/pgSQL, so each rule and each error message is written once.
//! In PL/pgSQL the common case spent as much CPU interpreting the function as inserting
//! the row (docs/design.md, "Performance").
//!
//! `queue.enqueue` has a SET clause, so it is an API function (src/security/api.rs): it
//! runs as the extension owner, and `caller()` is the role that called it.

use crate::security::api::caller;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::BuiltinOid::*;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgOid::{self, BuiltIn};

/// The queue, and whether the fast path may insert: the caller holds enqueue on it (as a
/// member of its owner, else by a grant), and the payload is within both size limits of a
/// queue that is not full.
const LOOKUP_SQL: &str = "\
SELECT q.name, q.max_attempts, q.paused, q.notify, q.fair_share,
       (pg_catalog.pg_has_role($2, q.owner, 'USAGE') OR queue.may($2, q, 'enqueue'))
       AND NOT q.is_full
       AND pg_catalog.pg_column_size($3) OPERATOR(pg_catalog.<=) LEAST(q.max_payload_size, $4)
  FROM queue.queues q
 WHERE q.name OPERATOR(pg_catalog.=) $1";

const INSERT_SQL: &str = "\
INSERT INTO queue.jobs (id, queue, state, payload, enqueued_by, priority, run_at, max_attempts,
                        created_at, fair_key)
VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, pg_catalog.now(), $8)";

const NOTIFY_SQL: &str = "SELECT pg_catalog.pg_notify(queue.channel($1), $2)";

/// Every argument, in order, for `queue.enqueue_sql`.
const DELEGATE_SQL: &str = "SELECT queue.enqueue_sql($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// The argument types of `queue.enqueue(queue, payload, run_at, priority, max_attempts,
/// timeout, unique_key, unique_for, depends_on, on_dependency_failure, fair_key)`.
const ARG_TYPES: [PgOid; 11] = [
    BuiltIn(TEXTOID),
    BuiltIn(JSONBOID),
    BuiltIn(TIMESTAMPTZOID),
    BuiltIn(INT4OID),
    BuiltIn(INT4OID),
    BuiltIn(INTERVALOID),
    BuiltIn(TEXTOID),
    BuiltIn(INTERVALOID),
    BuiltIn(UUIDARRAYOID),
    BuiltIn(TEXTOID),
    BuiltIn(TEXTOID),
];
const QUEUE: usize = 0;
const PAYLOAD: usize = 1;
const RUN_AT: usize = 2;
const PRIORITY: usize = 3;
const FAIR_KEY: usize = 10;
/// max_attempts through on_dependency_failure: any of them set takes the PL/pgSQL path.
const OPTIONS: std::ops::RangeInclusive<usize> = 4..=9;

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_pg_queue_enqueue() -> &'static pg_sys::Pg_finfo_record {
    static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `queue.enqueue(...)` (sql/jobs.sql declares it, with its defaults and comment).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_queue_enqueue(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: fcinfo is the call's, with the 11 arguments the SQL declaration gives.
    let args: Vec<DatumWithOid<'_>> = ARG_TYPES
        .iter()
        .enumerate()
        .map(|(i, oid)| unsafe {
            let oid = oid.value();
            if pgrx::fcinfo::pg_arg_is_null(fcinfo, i) {
                DatumWithOid::null_oid(oid)
            } else {
                DatumWithOid::new(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, i), oid)
            }
        })
        .collect();
    let common = [QUEUE, PAYLOAD, PRIORITY]
        .iter()
        .all(|&i| args[i].datum().is_some())
        && OPTIONS.clone().all(|i| args[i].datum().is_none());
    let id = common
        .then(|| fast_path(&args))
        .flatten()
        .unwrap_or_else(|| delegate(&args));
    id.into_datum().unwrap_or(pg_sys::Datum::from(0))
}

/// The common case, or None when `queue.enqueue_sql` must decide (an unknown queue, no
/// privilege, a payload too large, a full queue).
fn fast_path(args: &[DatumWithOid<'_>]) -> Option<pgrx::Uuid> {
    let who = caller();
    let raw = |i: usize| args[i].datum().map(|d| d.sans_lifetime());
    // SAFETY: the queue argument is a non-NULL text datum (the caller checked).
    let queue_name = raw(QUEUE).and_then(|d| unsafe { <&str>::from_datum(d, false) })?;
    // Before the lookup: a drop in progress is waited for, then seen (src/locks.rs).
    crate::locks::lock(queue_name, crate::locks::Purpose::Insert);
    Spi::connect_mut(|client| {
        let lookup = plan(
            client,
            LOOKUP_SQL,
            &[
                BuiltIn(TEXTOID),
                BuiltIn(OIDOID),
                BuiltIn(JSONBOID),
                BuiltIn(INT4OID),
            ],
        );
        let limit = crate::gucs::max_payload_size();
        let queue = client
            .update(
                &*lookup,
                Some(1),
                &[
                    raw_arg(raw(QUEUE), pg_sys::TEXTOID),
                    who.into(),
                    raw_arg(raw(PAYLOAD), pg_sys::JSONBOID),
                    limit.into(),
                ],
            )
            .unwrap_or_else(|e| pgrx::error!("{e}"));
        let row = queue.first();
        if row.is_empty() {
            return None;
        }
        let get = |n| row.get::<bool>(n).ok().flatten().unwrap_or(false);
        let (paused, notify, fair_share, allowed) = (get(3), get(4), get(5), get(6));
        let name: String = row.get(1).ok().flatten()?;
        let max_attempts: i32 = row.get(2).ok().flatten()?;
        if !allowed {
            return None;
        }
        let id = pgrx::Uuid::from_bytes(*uuid::Uuid::now_v7().as_bytes());
        // SAFETY: the transaction's start time, and an argument of this call.
        let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        let run_at = raw(RUN_AT).map_or(now, |d| d.value() as i64);
        let fair_key = match (fair_share, raw(FAIR_KEY)) {
            (true, None) => Some(""),
            _ => None,
        };
        let insert = plan(
            client,
            INSERT_SQL,
            &[
                BuiltIn(UUIDOID),
                BuiltIn(TEXTOID),
                BuiltIn(JSONBOID),
                BuiltIn(REGROLEOID),
                BuiltIn(INT4OID),
                BuiltIn(TIMESTAMPTZOID),
                BuiltIn(INT4OID),
                BuiltIn(TEXTOID),
            ],
        );
        client
            .update(
                &*insert,
                None,
                &[
                    id.into(),
                    name.as_str().into(),
                    raw_arg(raw(PAYLOAD), pg_sys::JSONBOID),
                    unsafe { DatumWithOid::new(pg_sys::Datum::from(who), pg_sys::REGROLEOID) },
                    raw_arg(raw(PRIORITY), pg_sys::INT4OID),
                    unsafe {
                        DatumWithOid::new(pg_sys::Datum::from(run_at), pg_sys::TIMESTAMPTZOID)
                    },
                    max_attempts.into(),
                    match fair_key {
                        Some(empty) => empty.into(),
                        None => raw_arg(raw(FAIR_KEY), pg_sys::TEXTOID),
                    },
                ],
            )
            .unwrap_or_else(|e| pgrx::error!("{e}"));
        // Ready now: wake an executor at commit, or tell the queue's consumers. A paused
        // queue wakes nobody (resume does).
        if run_at <= now && !paused {
            if notify {
                let notify = plan(client, NOTIFY_SQL, &[BuiltIn(TEXTOID), BuiltIn(TEXTOID)]);
                let text = uuid::Uuid::from_bytes(*id.as_bytes()).to_string();
                client
                    .update(
                        &*notify,
                        None,
                        &[name.as_str().into(), text.as_str().into()],
                    )
                    .unwrap_or_else(|e| pgrx::error!("{e}"));
            } else {
                crate::api::wake_executors(1);
                if run_at < now {
                    crate::api::rewind_executors_at_commit(run_at);
                }
            }
        }
        Some(id)
    })
}

/// `queue.enqueue_sql` with the same arguments: options, and every error.
fn delegate(args: &[DatumWithOid<'_>]) -> pgrx::Uuid {
    Spi::connect_mut(|client| {
        let delegate = plan(client, DELEGATE_SQL, &ARG_TYPES);
        let id = client
            .update(&*delegate, Some(1), args)
            .and_then(|r| r.first().get_one::<pgrx::Uuid>())
            .unwrap_or_else(|e| pgrx::error!("{e}"));
        id.unwrap_or_else(|| pgrx::error!("queue.enqueue_sql returned no id"))
    })
}

fn raw_arg(datum: Option<pg_sys::Datum>, oid: Oid) -> DatumWithOid<'static> {
    match datum {
        // SAFETY: an argument of the current call, of type oid, alive for the call.
        Some(d) => unsafe { DatumWithOid::new(d, oid) },
        None => DatumWithOid::null_oid(oid),
    }
}

/// The kept plan of `sql` (prepared once per backend).
fn plan(
    client: &pgrx::spi::SpiClient<'_>,
    sql: &str,
    types: &[PgOid],
) -> std::rc::Rc<pgrx::spi::OwnedPreparedStatement> {
    crate::worker::kept(client, sql, types).unwrap_or_else(|e| pgrx::error!("{e}"))
}

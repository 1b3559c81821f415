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

/// Whether a role that is not a member of the queue's owner was granted enqueue on it.
const GRANTED_SQL: &str = "\
SELECT queue.may($2, q, 'enqueue') FROM queue.queues q WHERE q.name OPERATOR(pg_catalog.=) $1";

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

v1_function_info!(pg_finfo_pg_queue_enqueue);

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
    // SAFETY: the payload argument is a non-NULL jsonb datum (the caller checked).
    let queue = unsafe { find_queue(raw(QUEUE)?, raw(PAYLOAD)?, who) }?;
    Spi::connect_mut(|client| {
        let allowed = queue.fits
            && (queue.member || {
                let granted = plan(client, GRANTED_SQL, &[BuiltIn(TEXTOID), BuiltIn(OIDOID)]);
                client
                    .select(
                        &*granted,
                        Some(1),
                        &[queue.name.as_str().into(), who.into()],
                    )
                    .and_then(|r| r.first().get_one::<bool>())
                    .unwrap_or_else(|e| pgrx::error!("{e}"))
                    .unwrap_or(false)
            });
        if !allowed {
            return None;
        }
        let Queue {
            name,
            max_attempts,
            paused,
            notify,
            fair_share,
            ..
        } = queue;
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

/// What the fast path needs of the queue's row.
struct Queue {
    name: String,
    max_attempts: i32,
    paused: bool,
    notify: bool,
    fair_share: bool,
    /// The caller is a member of the queue's owner (else a grant must say it may enqueue).
    member: bool,
    /// Not full, and the payload fits both the queue's and the server's size limits.
    fits: bool,
}

/// The columns of `queue.queues` that `find_queue` reads.
const QUEUE_COLUMNS: [&str; 8] = [
    "name",
    "owner",
    "max_attempts",
    "paused",
    "notify",
    "fair_share",
    "max_payload_size",
    "is_full",
];

/// The queue's row, read through its primary key like a query would (a new snapshot that
/// sees this transaction's earlier commands, the table share-locked to the end of the
/// transaction) without the cost of one: starting and ending a query's executor was a
/// fifth of an enqueue's CPU. None for an unknown queue.
///
/// # Safety
/// `name` must be a text datum and `payload` a jsonb datum, alive for the call.
unsafe fn find_queue(name: pg_sys::Datum, payload: pg_sys::Datum, who: Oid) -> Option<Queue> {
    // SAFETY: catalog look-ups, then one index scan of queue.queues under a registered
    // snapshot; the row's values are copied out before the scan ends. An error on the way
    // releases the snapshot, scan and relation with the transaction.
    unsafe {
        pg_sys::CommandCounterIncrement();
        let schema = pg_sys::get_namespace_oid(c"queue".as_ptr(), false);
        let table = pg_sys::get_relname_relid(c"queues".as_ptr(), schema);
        let index = pg_sys::get_relname_relid(c"queues_pkey".as_ptr(), schema);
        if table == pg_sys::InvalidOid || index == pg_sys::InvalidOid {
            pgrx::error!("queue.queues or its primary key is missing");
        }
        let rel = pg_sys::table_open(table, pg_sys::AccessShareLock as i32);
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        // The primary key's collation (the database default), which orders the index.
        pg_sys::ScanKeyEntryInitialize(
            &mut key,
            0,
            1,
            pg_sys::BTEqualStrategyNumber as u16,
            pg_sys::InvalidOid,
            pg_sys::DEFAULT_COLLATION_OID,
            pg_sys::Oid::from(pg_sys::F_TEXTEQ),
            name,
        );
        let scan = pg_sys::systable_beginscan(rel, index, true, snapshot, 1, &mut key);
        let tuple = pg_sys::systable_getnext(scan);
        let queue = (!tuple.is_null()).then(|| {
            let [name, owner, max_attempts, paused, notify, fair_share, max_size, is_full] =
                crate::rows::named_columns(tuple, (*rel).rd_att, &QUEUE_COLUMNS);
            let flag = |d: Option<pg_sys::Datum>| d.is_some_and(|d| d.value() != 0);
            let limit = crate::gucs::max_payload_size();
            let limit = max_size.map_or(limit, |d| (d.value() as i32).min(limit));
            let size = pg_sys::toast_datum_size(payload) as i64;
            let owner = owner.map_or(pg_sys::InvalidOid, |d| pg_sys::Oid::from(d.value() as u32));
            Queue {
                name: name
                    .and_then(|d| <&str>::from_datum(d, false))
                    .unwrap_or_default()
                    .to_owned(),
                max_attempts: max_attempts.map_or(0, |d| d.value() as i32),
                paused: flag(paused),
                notify: flag(notify),
                fair_share: flag(fair_share),
                member: pg_sys::has_privs_of_role(who, owner),
                fits: !flag(is_full) && size <= i64::from(limit),
            }
        });
        pg_sys::systable_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        queue
    }
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

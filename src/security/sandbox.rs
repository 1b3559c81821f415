//! Running another role's code inside a worker connected as a superuser: a handler, or a
//! schedule's enqueue. Modelled on what Postgres core does for VACUUM, REINDEX and
//! `REFRESH MATERIALIZED VIEW` (vacuum.c, matview.c):
//!
//! - `SetUserIdAndSecContext(owner, .. | SECURITY_LOCAL_USERID_CHANGE |
//!   SECURITY_RESTRICTED_OPERATION)`: the code runs as the owner and may not `SET ROLE`,
//!   `SET SESSION AUTHORIZATION`, create temporary tables, `PREPARE`, `LISTEN`, open
//!   `WITH HOLD` cursors, nor queue deferred trigger events;
//! - `SET CONSTRAINTS ALL IMMEDIATE` first, so that ordinary deferrable constraints (a
//!   `DEFERRABLE INITIALLY DEFERRED` foreign key) are checked inside the call, as the
//!   owner, instead of being queued for the worker's commit (which the restricted
//!   operation would refuse anyway);
//! - `NewGUCNestLevel()` before and `AtEOXact_GUC(false, ..)` after: every setting the code
//!   made is undone, `set_config(.., false)` included; `search_path` is pinned for the call;
//! - after the call, what a restricted operation still allows and would outlive it is
//!   dropped: cursors (portals), session-level advisory locks and `lastval()`; before a
//!   batch (one queue, so one owner), dblink and postgres_fdw connections.
//!
//! The worker's identity comes back on every path: `leave` on success, the subtransaction
//! abort (which restores user, security context and settings) on error.

use crate::worker::SqlError;
use pgrx::pg_sys::{self, Oid};
use pgrx::spi::SpiClient;
use std::ffi::{CStr, CString};

extern "C-unwind" {
    /// What `DISCARD SEQUENCES` runs (sequence.c); not in pgrx's bindings. Forgets
    /// `lastval()` and the sequence values cached by this backend; cannot fail.
    fn ResetSequenceCaches();
}

/// The identity and setting level to return to.
pub struct Entered {
    user: Oid,
    sec: i32,
    nest: i32,
}

/// Starts running code as `owner` in a restricted operation, with `search_path` pinned.
/// Must be called inside a subtransaction that rolls back if the code fails.
pub fn enter(owner: Oid, search_path: Option<&str>) -> Entered {
    let (mut user, mut sec) = (Oid::INVALID, 0);
    // SAFETY: plain reads and writes of this backend's user, security context, settings
    // and trigger state, as core does around security-restricted operations.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        all_constraints_immediate();
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION)
                as i32,
        );
        if let Some(path) = search_path {
            let value = CString::new(path.replace('\0', " ")).unwrap_or_default();
            // As RestrictSearchPath() in Postgres 17; an invalid value raises an ERROR
            // (the queue's setting was checked when it was set).
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        Entered { user, sec, nest }
    }
}

/// Ends a successful call started by `enter`: undoes its settings and restores the
/// worker's identity. (On error the subtransaction abort does both.)
pub fn leave(e: Entered) {
    // SAFETY: pairs with enter().
    unsafe {
        pg_sys::AtEOXact_GUC(false, e.nest);
        pg_sys::SetUserIdAndSecContext(e.user, e.sec);
    }
}

/// After the call, whether it succeeded or not (outside its subtransaction): drops the
/// cursors it left open (a later handler could FETCH from them), releases the
/// session-level advisory locks it took (they would be held by the worker for good) and
/// forgets `lastval()` (a later handler would read another owner's sequence value).
/// Workers open no cursors, take no session locks and use no sequence of their own.
pub fn clear_residue() {
    // SAFETY: no portal of the worker is open between its statements; active portals are
    // skipped by PortalHashTableDeleteAll anyway. ResetSequenceCaches only frees a hash.
    unsafe {
        pg_sys::PortalHashTableDeleteAll();
        pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID);
        ResetSequenceCaches();
    }
}

/// Before a batch: closes the connections handlers opened with dblink or postgres_fdw.
/// They outlive the transaction, and a later handler of another owner could use them
/// (a dblink connection is found by name, or is the unnamed one, and speaks with the
/// credentials of whoever opened it). postgres_fdw cannot close a connection its
/// transaction used, hence before the batch rather than after each job; a batch runs
/// one queue's jobs, so one owner's. Costs a symbol lookup unless a handler of this
/// executor loaded one of the two libraries.
pub fn close_foreign_connections(client: &mut SpiClient<'_>) -> Result<(), SqlError> {
    let dblink = library_loaded("dblink");
    let fdw = library_loaded("postgres_fdw");
    if !dblink && !fdw {
        return Ok(());
    }
    let installed = client.select(
        "SELECT e.extname::text, pg_catalog.quote_ident(n.nspname)
           FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
          WHERE e.extname IN ('dblink', 'postgres_fdw')",
        None,
        &[],
    )?;
    let mut statements = Vec::new();
    for row in installed {
        let (Some(ext), Some(schema)) = (row.get::<String>(1)?, row.get::<String>(2)?) else {
            continue;
        };
        // The schema is quoted by quote_ident; nothing else comes from outside.
        match ext.as_str() {
            "dblink" if dblink => statements.push(format!(
                "DO $close$
                 BEGIN
                     PERFORM {schema}.dblink_disconnect(c)
                        FROM pg_catalog.unnest({schema}.dblink_get_connections()) c;
                     BEGIN
                         PERFORM {schema}.dblink_disconnect();       -- the unnamed one
                     EXCEPTION WHEN connection_does_not_exist THEN
                     END;
                 END
                 $close$"
            )),
            "postgres_fdw" if fdw => {
                statements.push(format!("SELECT {schema}.postgres_fdw_disconnect_all()"))
            }
            _ => {}
        }
    }
    for sql in statements {
        client.update(&sql, None, &[])?;
    }
    Ok(())
}

/// Whether this process has loaded `$libdir/<name>` (dlopen with RTLD_NOLOAD loads nothing).
fn library_loaded(name: &str) -> bool {
    // SAFETY: pkglib_path is a NUL-terminated path set at process start.
    let dir = unsafe { CStr::from_ptr(std::ptr::addr_of!(pg_sys::pkglib_path).cast()) };
    let Ok(path) = CString::new(format!("{}/{name}.so", dir.to_string_lossy())) else {
        return false;
    };
    // SAFETY: a lookup among loaded objects; the handle it returns is released at once.
    unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
    }
    true
}

/// `SET CONSTRAINTS ALL IMMEDIATE`, also firing any event queued so far (none: the
/// restricted operation refuses to queue them).
unsafe fn all_constraints_immediate() {
    // SAFETY: a ConstraintsSetStmt node with no constraint list means ALL.
    unsafe {
        let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::ConstraintsSetStmt>())
            as *mut pg_sys::ConstraintsSetStmt;
        (*stmt).type_ = pg_sys::NodeTag::T_ConstraintsSetStmt;
        (*stmt).constraints = std::ptr::null_mut();
        (*stmt).deferred = false;
        pg_sys::AfterTriggerSetState(stmt);
    }
}

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
//!   dropped: cursors (portals) and session-level advisory locks.
//!
//! The worker's identity comes back on every path: `leave` on success, the subtransaction
//! abort (which restores user, security context and settings) on error.

use pgrx::pg_sys::{self, Oid};
use std::ffi::CString;

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
/// cursors it left open (a later handler could FETCH from them) and releases the
/// session-level advisory locks it took (they would be held by the worker for good).
/// Workers open no cursors and take no session locks of their own.
pub fn clear_residue() {
    // SAFETY: no portal of the worker is open between its statements; active portals are
    // skipped by PortalHashTableDeleteAll anyway.
    unsafe {
        pg_sys::PortalHashTableDeleteAll();
        pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID);
    }
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

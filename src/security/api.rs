//! Who called the API.
//!
//! Inside a SECURITY DEFINER function `current_user` is the function's owner and SQL has
//! no way to learn the role that called it, yet every privilege check needs that role.
//! So pg_queue's API functions are not SECURITY DEFINER: each carries a
//! `SET search_path = pg_catalog, pg_temp` clause instead, which makes Postgres call them
//! through `fmgr_security_definer`, and that calls `fmgr_hook` around the call. For a
//! function that belongs to the extension the hook, at its start, records the caller
//! (`GetUserId()`, the role whose privileges apply where the call was made) and switches
//! to the function's owner with SECURITY_LOCAL_USERID_CHANGE, exactly as SECURITY DEFINER
//! does; at its end, or when an error unwinds through it, it switches back (a
//! (sub)transaction abort would restore the user too). `queue.caller()` returns the
//! recorded role to the function's body.
//!
//! Rules that follow, for whoever writes SQL here:
//! - A function of the extension with a SET clause is an API function: it runs as the
//!   extension owner. Internal helpers have no SET clause and no EXECUTE for PUBLIC; they
//!   run as whatever called them (an API function, i.e. the owner, or a worker).
//! - An API function that calls another API function is that one's caller: our own code
//!   acting with our own rights, as with nested SECURITY DEFINER functions. Checks that
//!   concern the real caller take it as an argument instead (`queue.may(caller, ...)`).
//! - Without the library loaded (not in shared_preload_libraries) no hook runs: the
//!   functions then run as their caller and fail closed (no role may read the tables,
//!   and `queue.caller()` refuses).

use pgrx::pg_sys::{self, FmgrHookEventType, Oid};
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// One API call in progress: its function (by its FmgrInfo) and the identity it replaced.
struct Frame {
    flinfo: *const pg_sys::FmgrInfo,
    user: Oid,
    sec: i32,
}

thread_local! {
    /// API calls in progress, innermost last.
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
    /// Function oid -> its owner when it is an API function of pg_queue, None when not.
    /// Cleared whenever pg_proc changes (CREATE/ALTER/DROP FUNCTION, extension updates).
    static API_FUNCTIONS: RefCell<HashMap<Oid, Option<Oid>>> = RefCell::new(HashMap::new());
    static INVALIDATION_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

static mut PREV_FMGR_HOOK: pg_sys::fmgr_hook_type = None;

/// Installs the hook. Runs in `_PG_init`: in the postmaster when preloaded (inherited by
/// every backend), else in the backend that loads the library.
pub fn init() {
    // SAFETY: _PG_init runs once per process, before any function call can reach the hook.
    unsafe {
        PREV_FMGR_HOOK = pg_sys::fmgr_hook;
        pg_sys::fmgr_hook = Some(fmgr_hook);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn fmgr_hook(
    event: FmgrHookEventType::Type,
    flinfo: *mut pg_sys::FmgrInfo,
    private: *mut pg_sys::Datum,
) {
    // SAFETY: chaining to the hook installed before ours, with the arguments we were given.
    unsafe {
        if let Some(prev) = PREV_FMGR_HOOK {
            prev(event, flinfo, private);
        }
    }
    match event {
        FmgrHookEventType::FHET_START => {
            // SAFETY: flinfo is the FmgrInfo of the function being called.
            let fn_oid = unsafe { (*flinfo).fn_oid };
            if let Some(owner) = api_function_owner(fn_oid) {
                let (mut user, mut sec) = (Oid::INVALID, 0);
                // SAFETY: reads and sets this backend's current user and security context.
                unsafe {
                    pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
                    FRAMES.with_borrow_mut(|f| f.push(Frame { flinfo, user, sec }));
                    pg_sys::SetUserIdAndSecContext(
                        owner,
                        sec | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
                    );
                }
            }
        }
        _ => {
            // FHET_END or FHET_ABORT: undo our START for this very call, if we did one.
            let frame = FRAMES.with_borrow_mut(|f| match f.last() {
                Some(top) if std::ptr::eq(top.flinfo, flinfo) => f.pop(),
                _ => None,
            });
            if let Some(frame) = frame {
                // SAFETY: restores the identity saved at FHET_START.
                unsafe { pg_sys::SetUserIdAndSecContext(frame.user, frame.sec) };
            }
        }
    }
}

/// The owner of `fn_oid` when it is a function of the extension pg_queue (only functions
/// with a SET clause or SECURITY DEFINER reach the hook), None otherwise. Cached.
fn api_function_owner(fn_oid: Oid) -> Option<Oid> {
    if let Some(hit) = API_FUNCTIONS.with_borrow(|m| m.get(&fn_oid).copied()) {
        return hit;
    }
    register_invalidation();
    // SAFETY: catalog lookups inside the transaction that is calling the function.
    let owner = unsafe {
        let ext = pg_sys::get_extension_oid(c"pg_queue".as_ptr(), true);
        if ext == Oid::INVALID
            || pg_sys::getExtensionOfObject(pg_sys::ProcedureRelationId, fn_oid) != ext
        {
            None
        } else {
            let tuple = pg_sys::SearchSysCache1(
                pg_sys::SysCacheIdentifier::PROCOID as i32,
                pg_sys::Datum::from(fn_oid),
            );
            if tuple.is_null() {
                None
            } else {
                let owner =
                    (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tuple)).proowner;
                pg_sys::ReleaseSysCache(tuple);
                Some(owner)
            }
        }
    };
    API_FUNCTIONS.with_borrow_mut(|m| m.insert(fn_oid, owner));
    owner
}

fn register_invalidation() {
    if INVALIDATION_REGISTERED.get() {
        return;
    }
    INVALIDATION_REGISTERED.set(true);
    // SAFETY: registers a callback for the life of this backend (once: the flag above).
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::PROCOID as i32,
            Some(forget_functions),
            pg_sys::Datum::from(0),
        )
    };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_functions(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    API_FUNCTIONS.with_borrow_mut(|m| m.clear());
}

/// The role that called the API function running now (see the module doc). Internal:
/// only pg_queue's own functions call it.
#[pg_extern(volatile, parallel_restricted)]
pub(crate) fn caller() -> pg_sys::Oid {
    match FRAMES.with_borrow(|f| f.last().map(|top| top.user)) {
        Some(user) => user,
        None => {
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_queue's functions need the library preloaded",
                "Add pg_queue to shared_preload_libraries and restart the server."
            );
            unreachable!()
        }
    }
}

extension_sql!(
    r#"
COMMENT ON FUNCTION queue.caller() IS 'Internal: the role that called the pg_queue API function running now.';
REVOKE ALL ON FUNCTION queue.caller() FROM PUBLIC;
"#,
    name = "caller_comment",
    requires = [caller]
);

//! Queue locks: lock-manager entries held to the end of the transaction, one per queue and
//! purpose. They are userlocks, not advisory locks: no SQL function takes one, so no role
//! can hold a queue's lock to stall its claims or keep its jobs out (any role may call
//! `pg_advisory_lock`). pg_locks shows them as locktype `userlock`, classid the purpose's
//! key space and objid a hash of the queue's name; they write nothing (unlike a row lock).
//!
//! - **insert** (shared) and **drop** (exclusive): every path that inserts jobs holds its
//!   queue shared; `drop_queue` holds it exclusive. Without them a job enqueued in a
//!   transaction still open while its queue was dropped committed after the drop, with no
//!   queue: never run, and adopted by the next queue created with that name, whoever owns
//!   it. The drop now waits for such transactions and cancels their jobs; an insert that
//!   comes during a drop waits for it and then (at READ COMMITTED) no longer finds the
//!   queue. A REPEATABLE READ or SERIALIZABLE snapshot would still show it, so such a
//!   transaction that had to wait fails with 40001, to be retried.
//! - **claim** (exclusive): claims of a queue with a concurrency limit (or a per-key cap)
//!   take turns, executors' and consumers' alike, so that the running count they check
//!   is exact (docs/design.md, "Claims are serialised per queue").

use pgrx::prelude::*;

/// What a queue lock is taken for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Purpose {
    Insert,
    Drop,
    Claim,
}

impl Purpose {
    fn parse(purpose: &str) -> Option<Self> {
        match purpose {
            "insert" => Some(Self::Insert),
            "drop" => Some(Self::Drop),
            "claim" => Some(Self::Claim),
            _ => None,
        }
    }

    /// The key space ('pgqd' guards a queue's existence, 'pgqu' its claims) and the mode.
    fn space_and_mode(self) -> (u32, u32) {
        match self {
            Self::Insert => (0x7067_7164, pg_sys::ShareLock),
            Self::Drop => (0x7067_7164, pg_sys::ExclusiveLock),
            Self::Claim => (0x7067_7175, pg_sys::ExclusiveLock),
        }
    }
}

/// Internal: `queue.lock_queue(queue, 'insert' | 'drop' | 'claim')`.
#[pg_extern(volatile, strict)]
fn lock_queue(queue_name: &str, purpose: &str) {
    let Some(purpose) = Purpose::parse(purpose) else {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown queue lock purpose \"{purpose}\""),
            "Use insert, drop or claim."
        );
        return;
    };
    lock(queue_name, purpose);
}

/// Takes `queue_name`'s lock for `purpose` until the end of the transaction, waiting for
/// it if need be.
pub fn lock(queue_name: &str, purpose: Purpose) {
    // FNV-1a: a stable hash of the name, the same in every backend.
    let key = queue_name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let (space, mode) = purpose.space_and_mode();
    // SAFETY: a transaction-scoped lock on a tag of our own, in this database;
    // LockAcquire raises its own errors (out of shared memory, deadlock).
    let waited = unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: space,
            locktag_field3: key,
            locktag_field4: 2,
            locktag_type: pg_sys::LockTagType::LOCKTAG_USERLOCK as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        let mode = mode as pg_sys::LOCKMODE;
        if pg_sys::LockAcquire(&tag, mode, false, true)
            == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
        {
            pg_sys::LockAcquire(&tag, mode, false, false);
            true
        } else {
            false
        }
    };
    // SAFETY: reads the current transaction's isolation level.
    let snapshot_per_transaction =
        unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32;
    if waited && purpose == Purpose::Insert && snapshot_per_transaction {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!(
                "could not serialize access due to a concurrent change of queue \"{queue_name}\""
            ),
            "Another transaction dropped the queue, or tried to, while this one waited; this \
             transaction's snapshot cannot tell which. Retry the transaction."
        );
    }
}

extension_sql!(
    r#"
COMMENT ON FUNCTION queue.lock_queue(text, text) IS 'Internal: holds the queue until the end of the transaction: shared to insert jobs into it (insert), exclusive to drop it (drop), or to claim its jobs in turn (claim).';
"#,
    name = "locks_comments",
    requires = [lock_queue]
);

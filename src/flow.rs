//! Flow control from inside a handler (sql/flow.sql): `queue.snooze()` and
//! `queue.throttle()` record a signal here, then raise an ERROR with their own SQLSTATE,
//! which ends the handler's attempt and rolls its writes back. The executor treats the
//! attempt as snoozed or throttled only when it sees both: raising the code alone is an
//! ordinary failure, and a handler that catches the ERROR and carries on is not snoozed.

use pgrx::prelude::*;
use std::cell::Cell;

/// SQLSTATE of the ERROR `queue.snooze()` raises.
pub const SNOOZED: &str = "PQ001";
/// SQLSTATE of the ERROR `queue.throttle()` raises.
pub const THROTTLED: &str = "PQ002";

/// What a handler asked for instead of an outcome.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Signal {
    /// Run the job again after this many milliseconds.
    Snooze { delay_ms: i64 },
    /// The service pushed back; cool the queue down (at least `retry_after_ms`).
    Throttle { retry_after_ms: Option<i64> },
}

impl Signal {
    /// The `signal` and `delay_ms` columns of the executor's record statement.
    pub fn columns(signal: Option<Signal>) -> (Option<&'static str>, Option<i64>) {
        match signal {
            None => (None, None),
            Some(Signal::Snooze { delay_ms }) => (Some("snooze"), Some(delay_ms)),
            Some(Signal::Throttle { retry_after_ms }) => (Some("throttle"), retry_after_ms),
        }
    }
}

thread_local! {
    static SIGNAL: Cell<Option<Signal>> = const { Cell::new(None) };
}

/// The signal the running handler left, if its ERROR carries the matching SQLSTATE.
/// Clears it either way.
pub fn take_signal(sqlstate: Option<&str>) -> Option<Signal> {
    let signal = SIGNAL.take();
    match (signal, sqlstate) {
        (Some(s @ Signal::Snooze { .. }), Some(SNOOZED)) => Some(s),
        (Some(s @ Signal::Throttle { .. }), Some(THROTTLED)) => Some(s),
        _ => None,
    }
}

/// Internal (queue.snooze, queue.throttle): records `kind` for the job this executor runs.
#[pg_extern(volatile)]
fn signal_job(kind: &str, delay_ms: Option<i64>) {
    let Some(job) = crate::worker::executor::current_job() else {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("queue.{kind}() works only in a handler that a pg_queue executor runs"),
            format!(
                "External consumers call queue.{kind}(id, lease_token, ...) with the job they claimed."
            )
        );
        return;
    };
    let signal = match kind {
        "snooze" => {
            if job.snoozes >= job.max_snoozes {
                ereport!(
                    PgLogLevel::ERROR,
                    PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                    format!(
                        "job {} was snoozed {} times, the most queue \"{}\" allows",
                        job.id, job.snoozes, job.queue
                    ),
                    "This attempt fails instead; raise the queue's max_snoozes to allow more."
                );
            }
            Signal::Snooze {
                delay_ms: delay_ms.unwrap_or(0),
            }
        }
        _ => Signal::Throttle {
            retry_after_ms: delay_ms,
        },
    };
    SIGNAL.set(Some(signal));
}

extension_sql!(
    r#"
COMMENT ON FUNCTION queue.signal_job(text, bigint) IS 'Internal: records a snooze or throttle for the executor running the current handler.';
"#,
    name = "flow_comments",
    requires = [signal_job]
);

//! The job state machine: the one vocabulary of states (SQL enum `queue.job_state`) and the
//! transitions allowed between them. Every transition in the SQL is a guarded statement that
//! names the state it leaves, so two processes racing on one job cannot both win.
//!
//! Also the invariants of a live job's row, which `queue.jobs` enforces with a row trigger
//! calling [`pg_queue_jobs_invariants`].

use pgrx::prelude::*;

/// A job's state. Each doc line names who moves a job out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waits for dependencies (`depends_on`). Left when the last one finishes (queued; a
    /// failed or cancelled one cancels it unless it runs anyway), or by `cancel`.
    Waiting,
    /// Ready once `run_at` is reached. Left by an executor's claim, or by `cancel`.
    Queued,
    /// Claimed, with an owner and a lease token. Left by the owner's completion (succeeded,
    /// retry to queued, failed) or by the reaper when the owner died.
    Running,
    /// Terminal, in history. `retry` does not apply.
    Succeeded,
    /// Terminal, in history: attempts exhausted. `retry` moves it back to queued.
    Failed,
    /// Terminal, in history. `retry` moves it back to queued.
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 6] = [
        JobState::Waiting,
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The label of the `queue.job_state` enum value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn from_label(label: &[u8]) -> Option<JobState> {
        JobState::ALL
            .into_iter()
            .find(|s| s.as_str().as_bytes() == label)
    }

    /// Terminal jobs live in `queue.history`, the others in `queue.jobs`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether a job may move from `self` to `to` (docs/design.md, "Job states").
    pub fn can_move_to(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Waiting, Queued)
                | (Waiting, Cancelled)
                | (Queued, Running)
                | (Queued, Cancelled)
                | (Running, Succeeded)
                | (Running, Queued) // retry after a failed attempt, or reaped
                | (Running, Failed)
                | (Running, Cancelled)
                | (Failed, Queued) // queue.retry()
                | (Cancelled, Queued) // queue.retry()
                | (Failed, Waiting) // queue.retry() of a dependent
                | (Cancelled, Waiting) // queue.retry() of a dependent
        )
    }
}

/// A live job's row, as far as its invariants go: the columns' values, or only whether
/// they are set where that is all an invariant says.
#[derive(Clone, Copy)]
struct LiveRow<'a> {
    state: Option<JobState>,
    waiting_for: i32,
    on_dependency_failure: Option<&'a str>,
    attempts: i32,
    max_attempts: i32,
    timeout_us: Option<i128>,
    started: bool,
    lease_token: bool,
    worker: bool,
    consumer: bool,
    lease: bool,
    lease_expires: bool,
}

impl LiveRow<'_> {
    /// The first invariant the row breaks, as (name, what it says).
    fn broken_invariant(&self) -> Option<(&'static str, &'static str)> {
        use JobState::*;
        let running = self.state == Some(Running);
        let rules = [
            (
                matches!(self.state, Some(Waiting | Queued | Running)),
                "jobs_live_state",
                "A live job is waiting, queued or running; finished jobs are in queue.history.",
            ),
            (
                (self.state == Some(Waiting)) == (self.waiting_for > 0),
                "jobs_waiting_for_dependencies",
                "A job is waiting exactly while some of its dependencies have not finished (waiting_for > 0).",
            ),
            (
                matches!(self.on_dependency_failure, None | Some("cancel" | "run")),
                "jobs_dependency_failure_valid",
                "on_dependency_failure is cancel or run.",
            ),
            (
                (0..=self.max_attempts).contains(&self.attempts),
                "jobs_attempts_in_range",
                "attempts is between 0 and max_attempts.",
            ),
            (
                self.max_attempts > 0,
                "jobs_max_attempts_positive",
                "max_attempts is positive.",
            ),
            (
                self.timeout_us.is_none_or(|t| t > 0),
                "jobs_timeout_positive",
                "timeout is positive.",
            ),
            (
                running == (self.lease_token && self.started),
                "jobs_running_has_owner",
                "A job is running exactly when it has a lease_token and a started_at.",
            ),
            (
                !(self.worker && self.consumer),
                "jobs_one_owner",
                "An executor (worker_id) or a consumer owns a running job, not both.",
            ),
            (
                self.consumer == (self.lease && self.lease_expires) && (!self.consumer || running),
                "jobs_consumer_has_lease",
                "A consumer holds a running job, with a lease and its lease_expires_at.",
            ),
        ];
        rules
            .into_iter()
            .find(|(holds, _, _)| !holds)
            .map(|(_, name, says)| (name, says))
    }
}

/// The columns the invariants read.
const COLUMNS: [&str; 12] = [
    "state",
    "waiting_for",
    "on_dependency_failure",
    "attempts",
    "max_attempts",
    "timeout",
    "started_at",
    "lease_token",
    "worker_id",
    "consumer",
    "lease",
    "lease_expires_at",
];

v1_function_info!(pg_finfo_pg_queue_jobs_invariants);

/// The invariants of a row of `queue.jobs`: its BEFORE INSERT OR UPDATE row trigger
/// `jobs_invariants` (sql/jobs.sql). A trigger rather than a CHECK because Postgres reads a
/// CHECK's expression from its catalog text again for every INSERT and UPDATE statement:
/// one CHECK over these twelve columns cost an enqueue about 20 µs, a fifth of its CPU; a
/// trigger is looked up once per backend and reads the row as stored (no detoasting).
/// Returns the row unchanged, or raises check_violation naming the invariant it breaks.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn pg_queue_jobs_invariants(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the trigger manager for a row of an INSERT or UPDATE (checked
    // first, since only then is there a row), whose TriggerData gives the relation and it.
    unsafe {
        let context = (*fcinfo).context;
        let is_trigger = !context.is_null() && (*context).type_ == pg_sys::NodeTag::T_TriggerData;
        let event = if is_trigger {
            (*(context as *const pg_sys::TriggerData)).tg_event
        } else {
            0
        };
        let op = event & pg_sys::TRIGGER_EVENT_OPMASK;
        if event & pg_sys::TRIGGER_EVENT_ROW == 0
            || (op != pg_sys::TRIGGER_EVENT_INSERT && op != pg_sys::TRIGGER_EVENT_UPDATE)
        {
            pgrx::ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                "queue.jobs_invariants() is a row trigger function for INSERT or UPDATE"
            );
        }
        let trigger = &*(context as *const pg_sys::TriggerData);
        let tuple = if op == pg_sys::TRIGGER_EVENT_UPDATE {
            trigger.tg_newtuple
        } else {
            trigger.tg_trigtuple
        };
        let column = crate::rows::named_columns(tuple, (*trigger.tg_relation).rd_att, &COLUMNS);
        let int = |c: usize| column[c].map_or(0, |d| d.value() as i32);
        let interval_us = |c: usize| {
            column[c]
                .and_then(|d| pgrx::datum::Interval::from_datum(d, false))
                .map(|i| i.as_micros())
        };
        let row = LiveRow {
            state: column[0].and_then(job_state),
            waiting_for: int(1),
            on_dependency_failure: column[2].and_then(|d| <&str>::from_datum(d, false)),
            attempts: int(3),
            max_attempts: int(4),
            timeout_us: interval_us(5),
            started: column[6].is_some(),
            lease_token: column[7].is_some(),
            worker: column[8].is_some(),
            consumer: column[9].is_some(),
            lease: column[10].is_some(),
            lease_expires: column[11].is_some(),
        };
        if let Some((name, says)) = row.broken_invariant() {
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
                format!("new row for relation \"jobs\" violates check constraint \"{name}\""),
                says
            );
        }
        pg_sys::Datum::from(tuple)
    }
}

/// The state a `queue.job_state` value names, read from the catalog cache (no query, no
/// allocation); None for a value that is not one of ours.
fn job_state(value: pg_sys::Datum) -> Option<JobState> {
    // SAFETY: a syscache lookup by the value's oid; the tuple is released before returning
    // and the label is not used past it.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::ENUMOID as i32, value);
        if tuple.is_null() {
            return None;
        }
        let form = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_enum>(tuple);
        let label = std::ffi::CStr::from_ptr(form.enumlabel.data.as_ptr());
        let state = JobState::from_label(label.to_bytes());
        pg_sys::ReleaseSysCache(tuple);
        state
    }
}

#[cfg(test)]
mod unit_tests {
    use super::JobState::{self, *};
    use super::LiveRow;

    #[test]
    fn terminal_states_only_leave_by_retry() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobState::ALL {
                let allowed = from.can_move_to(to);
                assert_eq!(
                    allowed,
                    from != Succeeded && (to == Queued || to == Waiting),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    /// Each invariant of a live row, broken alone, is the one reported.
    #[test]
    fn each_broken_invariant_is_named() {
        let queued = LiveRow {
            state: Some(Queued),
            waiting_for: 0,
            on_dependency_failure: None,
            attempts: 0,
            max_attempts: 3,
            timeout_us: None,
            started: false,
            lease_token: false,
            worker: false,
            consumer: false,
            lease: false,
            lease_expires: false,
        };
        let leased = LiveRow {
            state: Some(Running),
            attempts: 1,
            started: true,
            lease_token: true,
            consumer: true,
            lease: true,
            lease_expires: true,
            ..queued
        };
        for valid in [
            queued,
            leased,
            LiveRow {
                state: Some(Waiting),
                waiting_for: 2,
                on_dependency_failure: Some("run"),
                ..queued
            },
            LiveRow {
                attempts: 3,
                timeout_us: Some(1),
                ..queued
            },
            LiveRow {
                consumer: false,
                lease: false,
                lease_expires: false,
                worker: true,
                ..leased
            },
        ] {
            assert_eq!(valid.broken_invariant(), None);
        }
        let cases = [
            (
                LiveRow {
                    state: Some(Succeeded),
                    ..queued
                },
                "jobs_live_state",
            ),
            (
                LiveRow {
                    state: None,
                    ..queued
                },
                "jobs_live_state",
            ),
            (
                LiveRow {
                    waiting_for: 1,
                    ..queued
                },
                "jobs_waiting_for_dependencies",
            ),
            (
                LiveRow {
                    state: Some(Waiting),
                    ..queued
                },
                "jobs_waiting_for_dependencies",
            ),
            (
                LiveRow {
                    on_dependency_failure: Some("skip"),
                    ..queued
                },
                "jobs_dependency_failure_valid",
            ),
            (
                LiveRow {
                    attempts: 4,
                    ..queued
                },
                "jobs_attempts_in_range",
            ),
            (
                LiveRow {
                    attempts: -1,
                    ..queued
                },
                "jobs_attempts_in_range",
            ),
            (
                LiveRow {
                    max_attempts: 0,
                    ..queued
                },
                "jobs_max_attempts_positive",
            ),
            (
                LiveRow {
                    timeout_us: Some(0),
                    ..queued
                },
                "jobs_timeout_positive",
            ),
            (
                LiveRow {
                    started: false,
                    ..leased
                },
                "jobs_running_has_owner",
            ),
            (
                LiveRow {
                    lease_token: true,
                    started: true,
                    ..queued
                },
                "jobs_running_has_owner",
            ),
            (
                LiveRow {
                    worker: true,
                    ..leased
                },
                "jobs_one_owner",
            ),
            (
                LiveRow {
                    lease: false,
                    ..leased
                },
                "jobs_consumer_has_lease",
            ),
            (
                LiveRow {
                    started: false,
                    lease_token: false,
                    state: Some(Queued),
                    attempts: 0,
                    ..leased
                },
                "jobs_consumer_has_lease",
            ),
        ];
        for (row, name) in cases {
            assert_eq!(row.broken_invariant().map(|(n, _)| n), Some(name));
        }
    }

    #[test]
    fn only_running_jobs_succeed_or_fail() {
        for from in JobState::ALL {
            assert_eq!(from.can_move_to(Succeeded), from == Running);
            assert_eq!(from.can_move_to(Failed), from == Running);
        }
    }
}

//! The job state machine: the one vocabulary of states (SQL enum `queue.job_state`) and the
//! transitions allowed between them. Every transition in the SQL is a guarded statement that
//! names the state it leaves, so two processes racing on one job cannot both win.

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

#[cfg(test)]
mod unit_tests {
    use super::JobState::{self, *};

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

    #[test]
    fn only_running_jobs_succeed_or_fail() {
        for from in JobState::ALL {
            assert_eq!(from.can_move_to(Succeeded), from == Running);
            assert_eq!(from.can_move_to(Failed), from == Running);
        }
    }
}

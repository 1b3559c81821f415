//! Claim cursors: where an executor's next claim of each queue starts in `jobs_ready_idx`.
//!
//! A claim takes the first ready jobs of a queue in (priority, run_at, id) order. Starting
//! at the head of the queue's part of the index, it steps over the entries of every job
//! claimed or finished since vacuum last ran; while some session holds an old snapshot,
//! those entries cannot be removed (nor marked dead), and each costs a heap visit. So under
//! a long transaction elsewhere, claims from the head grow slower by the second
//! (docs/design.md "Under a held snapshot"). An executor therefore remembers the key of
//! the last job it claimed from each queue and starts its next claim there: at that key for
//! jobs of its run_at, and `MARGIN_US` of run_at before it for jobs of earlier run_ats (the
//! window); jobs of a higher priority (lower number) are looked for from the head of theirs.
//! The window leaves out the earlier jobs of the last one's own run_at: those came from its
//! transaction (run_at is a transaction's now()), committed with it and were claimed in
//! order, so that a backlog enqueued in one transaction is not walked again by each claim.
//!
//! A job can become ready behind a cursor: committed by a transaction that began more than
//! the margin earlier (its run_at is its transaction's now()) or in the same microsecond as
//! the last one claimed, enqueued with a run_at in the past, released by its last
//! dependency, put back by a batch that rolled back, or skipped by a claim while another
//! transaction had its row locked. So:
//! - a transaction that made jobs ready and took longer than half the margin rewinds every
//!   executor's cursors to its start at commit, and one that made ready jobs of an earlier
//!   run_at (a past run_at, released dependents) to that run_at (`shmem::request_rewind`);
//!   a batch that rolled back, or jobs handed back at shutdown, rewind them to the head;
//! - full passes look for the first ready job of every queue (in the ready-queues check,
//!   before any claim lock: a limited queue's other claims do not wait for the walk; row
//!   locks do not hide a job from it) and claim from there, with its window: before an
//!   executor goes idle (an idle executor has seen every ready job), and otherwise at least
//!   every `MAX_FULL_INTERVAL`, within a fiftieth of the executor's time (the interval is
//!   49 times what the last full pass cost). Without an old snapshot a full pass costs
//!   what a cursor claim does, so nearly every claim is one, and each looks from the head.
//!
//! Under an old snapshot a walk from the head grows with every job claimed since the
//! snapshot was taken (100 ms after 5 minutes at 1 000 jobs/s, every 2 s per executor). So
//! each full pass remembers where it found each queue's ready jobs to begin (its low-water
//! key: the first ready job, or the pass's time when none was ready), and once a pass from
//! the head costs more than a commit, the next ones look from there: past the entries of
//! the jobs claimed since the last pass only. A job can become ready before a low-water key
//! in the ways it can behind a cursor, and the same rewinds move the low-water keys back; a
//! pass from the head still follows every `MIN_HEAD_INTERVAL`, or 49 times what the last
//! one cost, whichever is longer, in case anything else did: an executor idle since a pass
//! from the low-water keys wakes for it. One executor of a database at a time walks from
//! the head while that is costly (`shmem::begin_head_pass`); another whose walk is due
//! looks from the low-water keys meanwhile, and walks after it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How far behind the last claimed job's run_at a claim starts (Postgres microseconds):
/// jobs of short transactions that commit out of order are within it.
pub const MARGIN_US: i64 = 100_000;

/// The longest a job behind a cursor waits for a full pass (when full passes are costly).
const MAX_FULL_INTERVAL: Duration = Duration::from_secs(2);

/// The least time between two full passes from the head while they cost more than a commit
/// (the passes between them look from the low-water keys).
const MIN_HEAD_INTERVAL: Duration = Duration::from_secs(10);

/// A full pass takes at most this share of an executor's time (1/50): on 2 cores, more
/// CPU spent walking dead entries showed in the other executor's pickup tail.
const FULL_PASS_COST_SHARE: u32 = 50;

/// Cursors kept at most (one per queue claimed from).
const MAX_QUEUES: usize = 1024;

/// A position in a queue's claim order: priority, run_at (Postgres microseconds), id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub priority: i32,
    pub run_at: i64,
    /// The job's uuid, whose byte order is Postgres's.
    pub id: [u8; 16],
}

impl Key {
    /// Where a claim starts: the head of every queue.
    pub const HEAD: Key = Key {
        priority: i32::MIN,
        run_at: i64::MIN,
        id: [0; 16],
    };

    /// Where the window of earlier run_ats looked at from this key begins.
    pub fn window_start(&self) -> i64 {
        self.run_at.saturating_sub(MARGIN_US)
    }
}

struct Cursors {
    /// The key of the last job claimed from each queue.
    keys: HashMap<String, Key>,
    /// Each queue's low-water key: where the last full pass found its ready jobs to begin.
    low: HashMap<String, Key>,
    /// For queues with a concurrency limit: the oldest started_at among their running jobs
    /// when this executor last counted them (`running_from`).
    running_from: HashMap<String, i64>,
    /// When the next full pass is due.
    full_due: Instant,
    /// What the last full pass from the low-water keys cost.
    low_cost: Duration,
    /// When the next full pass must look from the head, and what the last one cost.
    head_due: Instant,
    head_cost: Duration,
    /// A full pass from the low-water keys followed the last one from the head: a job may
    /// be ready before them that no rewind announced, so the executor wakes for the next
    /// pass from the head.
    low_since_head: bool,
    /// The last claim was a cursor pass that found nothing (a job may still be ready
    /// behind a cursor): the executor wakes for the next full pass.
    unverified: bool,
    /// The executor woke from its latch since its last claim.
    woken: bool,
}

thread_local! {
    static CURSORS: RefCell<Cursors> = RefCell::new(Cursors {
        keys: HashMap::new(),
        low: HashMap::new(),
        running_from: HashMap::new(),
        full_due: Instant::now(),
        low_cost: Duration::ZERO,
        head_due: Instant::now(),
        head_cost: Duration::ZERO,
        low_since_head: false,
        unverified: false,
        woken: false,
    });
}

/// Moves every cursor and low-water key back to `to` (a run_at; `i64::MIN`: the head of
/// each queue), as `shmem::request_rewind` asked.
pub fn rewind(to: i64) {
    CURSORS.with_borrow_mut(|c| {
        for keys in [&mut c.keys, &mut c.low] {
            if to == i64::MIN {
                keys.clear();
            } else {
                for k in keys.values_mut().filter(|k| to <= k.run_at) {
                    k.run_at = to;
                    k.id = [0; 16];
                }
            }
        }
    })
}

/// Whether the next claim must be a full pass.
pub fn full_pass_due() -> bool {
    CURSORS.with_borrow(|c| Instant::now() >= c.full_due)
}

/// A full pass costing more than this is worth a transaction of its own (a commit).
const COSTLY_FULL_PASS: Duration = Duration::from_millis(2);

impl Cursors {
    /// Whether the next full pass looks from the head of every queue: while that costs no
    /// more than a commit, and otherwise when one is due.
    fn next_from_head(&self) -> bool {
        self.head_cost <= COSTLY_FULL_PASS || Instant::now() >= self.head_due
    }
}

/// Whether the next claim must be a full pass, and that pass will likely cost more than a
/// commit (a long transaction elsewhere keeps dead entries where it looks).
pub fn costly_full_pass_due() -> bool {
    CURSORS.with_borrow(|c| {
        let cost = if c.next_from_head() {
            c.head_cost
        } else {
            c.low_cost
        };
        Instant::now() >= c.full_due && cost > COSTLY_FULL_PASS
    })
}

/// The executor woke from its latch: most likely an enqueue woke it for jobs at its cursors.
pub fn woke_up() {
    CURSORS.with_borrow_mut(|c| c.woken = true);
}

/// Whether this claim may look at the cursors before the full pass that is due: the
/// executor was just woken and that pass is costly (a long transaction elsewhere). The job
/// that woke it then does not wait for the walk, which follows its batch (in a transaction
/// of its own, as every costly full pass). Called once per claim, it forgets the wake: only
/// the first claim after one looks at the cursors first, so under load the next is the
/// full pass.
pub fn cursor_first() -> bool {
    CURSORS.with_borrow_mut(|c| std::mem::take(&mut c.woken)) && costly_full_pass_due()
}

/// A cursor pass found nothing and no full pass is due yet.
pub fn found_nothing() {
    CURSORS.with_borrow_mut(|c| c.unverified = true);
}

/// How long an executor that found nothing may sleep before it must look again: until the
/// next full pass, if no full pass has looked since its last claim; until the next one from
/// the head, if one from the low-water keys has since the last.
pub fn wake_in() -> Option<Duration> {
    CURSORS.with_borrow(|c| {
        let full = c.unverified.then_some(c.full_due);
        let head = c.low_since_head.then_some(c.head_due);
        let at = full.into_iter().chain(head).min()?;
        Some(at.saturating_duration_since(Instant::now()))
    })
}

/// A full pass under way: when it started, and whether it looks from the head.
pub struct FullPass {
    started: Instant,
    pub from_head: bool,
}

impl FullPass {
    /// Whether it walks from the head past an old snapshot's dead entries (the last pass
    /// from the head cost more than a commit): one executor at a time does that
    /// (`shmem::begin_head_pass`).
    pub fn walks_dead_entries(&self) -> bool {
        self.from_head && CURSORS.with_borrow(|c| c.head_cost > COSTLY_FULL_PASS)
    }

    /// Another executor walks from the head: this pass looks from the low-water keys, and
    /// the next one tries the head again.
    pub fn look_from_low_water(&mut self) {
        self.from_head = false;
    }
}

/// Starts a full pass, for `full_pass_done`.
pub fn full_pass_started() -> FullPass {
    CURSORS.with_borrow_mut(|c| {
        c.unverified = false;
        FullPass {
            started: Instant::now(),
            from_head: c.next_from_head(),
        }
    })
}

/// A full pass ended: the next is due after FULL_PASS_COST_SHARE - 1 times its cost,
/// capped at MAX_FULL_INTERVAL; the next from the head, once one costs more than a commit,
/// that long after the last one from the head, and at least MIN_HEAD_INTERVAL.
pub fn full_pass_done(pass: FullPass) {
    let cost = pass.started.elapsed();
    let interval = cost * (FULL_PASS_COST_SHARE - 1);
    CURSORS.with_borrow_mut(|c| {
        c.full_due = Instant::now() + interval.min(MAX_FULL_INTERVAL);
        if pass.from_head {
            c.head_cost = cost;
            c.head_due = Instant::now() + interval.max(MIN_HEAD_INTERVAL);
        } else {
            c.low_cost = cost;
        }
        c.low_since_head = !pass.from_head;
    });
}

/// Where a full pass looks for each queue's first ready job: from the head, or from the
/// low-water keys (a queue without one from the head).
pub fn full_pass_starts(pass: &FullPass) -> Vec<(String, Key)> {
    if pass.from_head {
        return Vec::new();
    }
    CURSORS.with_borrow(|c| c.low.iter().map(|(q, k)| (q.clone(), *k)).collect())
}

/// A full pass found `queue`'s first ready job at `first`, or none ready at `now` (Postgres
/// microseconds, the pass's statement time): its low-water key. A job that becomes ready
/// before it later is of a transaction that began before it, as for a cursor (the window,
/// or a rewind).
pub fn found_first(queue: &str, first: Option<Key>, now: i64) {
    CURSORS.with_borrow_mut(|c| {
        let key = first.unwrap_or_else(|| Key {
            // Jobs of a higher priority are looked for from the head of theirs.
            priority: c
                .low
                .get(queue)
                .or(c.keys.get(queue))
                .map_or(0, |k| k.priority),
            run_at: now,
            id: [0; 16],
        });
        if let Some(low) = c.low.get_mut(queue) {
            *low = key; // a full pass records every queue: no allocation for known ones
            return;
        }
        if c.low.len() >= MAX_QUEUES {
            c.low.clear(); // queues come and go: start over rather than grow
        }
        c.low.insert(queue.to_string(), key);
    })
}

/// Where a claim of `queue` starts (with its window before it): its cursor, or the head of
/// the queue without one. A full pass starts at `first`, the first ready job it found from
/// the head before the claim lock (the walk past dead entries then holds no lock): a job
/// committed meanwhile behind it is one of a transaction that began before it, as for a
/// cursor; without `first`, from the head.
pub fn start(queue: &str, full: bool, first: Option<Key>) -> Key {
    if full {
        return first.unwrap_or(Key::HEAD);
    }
    CURSORS.with_borrow(|c| c.keys.get(queue).copied().unwrap_or(Key::HEAD))
}

/// Every queue's cursor (for the check of which queues have ready jobs).
pub fn starts() -> Vec<(String, Key)> {
    CURSORS.with_borrow(|c| c.keys.iter().map(|(q, k)| (q.clone(), *k)).collect())
}

/// A claim of `queue` took jobs up to `last` (the greatest key it claimed): every ready
/// job before it is taken or locked by another claim. `last` may be behind the cursor
/// (a full pass found jobs behind it): the next claims go on from there.
pub fn claimed(queue: &str, last: Key) {
    CURSORS.with_borrow_mut(|c| {
        if c.keys.len() >= MAX_QUEUES && !c.keys.contains_key(queue) {
            c.keys.clear(); // queues come and go: start over rather than grow
        }
        c.keys.insert(queue.to_string(), last);
    })
}

/// Where counting the running jobs of a limited queue may start (a started_at; i64::MIN:
/// from the first). The same dead entries as the claim's would stand in the count's way:
/// `jobs_running_idx` keeps an entry for every job run since an old snapshot was taken.
/// Counted under the queue's claim lock, every claim before committed, so each running job
/// was either counted then (started_at at or after the oldest) or claimed since (started
/// later still). The oldest start moves forward, but for a clock stepped back
/// (COUNT_RUNNING_SQL in executor.rs).
pub fn running_from(queue: &str) -> i64 {
    CURSORS.with_borrow(|c| c.running_from.get(queue).copied().unwrap_or(i64::MIN))
}

/// The oldest start among a limited queue's running jobs, just counted (or the count's
/// time when none runs).
pub fn counted_running(queue: &str, oldest: i64) {
    CURSORS.with_borrow_mut(|c| {
        if c.running_from.len() >= MAX_QUEUES && !c.running_from.contains_key(queue) {
            c.running_from.clear();
        }
        c.running_from.insert(queue.to_string(), oldest);
    })
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn cursors_resume_after_the_last_job_and_rewind_before_it() {
        let last = Key {
            priority: 0,
            run_at: 5_000_000,
            id: [7; 16],
        };
        claimed("q", last);
        // The claim resumes at the last job; its window covers the margin before its run_at.
        assert_eq!(start("q", false, None), last);
        assert_eq!(last.window_start(), 5_000_000 - MARGIN_US);
        assert_eq!(start("other", false, None), Key::HEAD);
        // A full pass starts at the first ready job it found, else at the head.
        assert_eq!(start("q", true, None), Key::HEAD);
        // A rewind to a later time keeps the cursor; to its run_at or before, every job of
        // that run_at is looked at again.
        rewind(6_000_000);
        assert_eq!(start("q", false, None), last);
        rewind(5_000_000);
        assert_eq!(start("q", false, None).id, [0; 16]);
        rewind(1_000_000);
        assert_eq!(start("q", false, None).run_at, 1_000_000);
        rewind(i64::MIN);
        assert_eq!(start("q", false, None), Key::HEAD);
    }

    #[test]
    fn a_woken_executor_claims_at_its_cursors_before_a_costly_full_pass_once() {
        // A cheap full pass is never put off.
        full_pass_done(full_pass_started());
        CURSORS.with_borrow_mut(|c| c.full_due = Instant::now());
        woke_up();
        assert!(!cursor_first());
        // A costly one is, for the first claim after a wake only.
        CURSORS.with_borrow_mut(|c| {
            c.head_cost = COSTLY_FULL_PASS * 2;
            c.low_cost = COSTLY_FULL_PASS * 2;
        });
        assert!(!cursor_first()); // not woken since the last claim
        woke_up();
        assert!(cursor_first());
        assert!(!cursor_first());
        // Not before it is due.
        CURSORS.with_borrow_mut(|c| c.full_due = Instant::now() + MAX_FULL_INTERVAL);
        woke_up();
        assert!(!cursor_first());
    }

    #[test]
    fn costly_full_passes_look_from_the_low_water_keys_between_passes_from_the_head() {
        let key = |priority, run_at| Key {
            priority,
            run_at,
            id: [1; 16],
        };
        // Cheap passes from the head: every one is from the head.
        let pass = full_pass_started();
        assert!(pass.from_head);
        found_first("q", Some(key(0, 5_000_000)), 9_000_000);
        full_pass_done(pass);
        assert!(full_pass_started().from_head);
        // A costly one: the next ones look from where it found each queue's jobs to begin.
        CURSORS.with_borrow_mut(|c| {
            c.head_cost = COSTLY_FULL_PASS * 2;
            c.head_due = Instant::now() + MIN_HEAD_INTERVAL;
        });
        let pass = full_pass_started();
        assert!(!pass.from_head);
        assert_eq!(
            full_pass_starts(&pass),
            vec![("q".to_string(), key(0, 5_000_000))]
        );
        // None ready: from the pass's time on, at the priority it looked at.
        found_first("q", Some(key(3, 6_000_000)), 9_000_000);
        found_first("q", None, 9_500_000);
        let low = full_pass_starts(&pass)[0].1;
        assert_eq!((low.priority, low.run_at, low.id), (3, 9_500_000, [0; 16]));
        full_pass_done(pass);
        // Rewinds move the low-water keys back as they do cursors.
        rewind(7_000_000);
        assert_eq!(
            full_pass_starts(&full_pass_started())[0].1.run_at,
            7_000_000
        );
        rewind(i64::MIN);
        assert!(full_pass_starts(&full_pass_started()).is_empty());
        // An executor idle since a pass from the low-water keys wakes for one from the head.
        let pass = full_pass_started();
        assert!(!pass.from_head);
        full_pass_done(pass);
        let wake = wake_in().expect("a wake-up for the pass from the head");
        assert!(
            wake > MAX_FULL_INTERVAL && wake <= MIN_HEAD_INTERVAL,
            "{wake:?}"
        );
        // Once due, a pass is from the head again, and after it the executor may sleep.
        CURSORS.with_borrow_mut(|c| c.head_due = Instant::now());
        let pass = full_pass_started();
        assert!(pass.from_head);
        full_pass_done(pass);
        assert_eq!(wake_in(), None);
    }
}

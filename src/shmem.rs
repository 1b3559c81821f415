//! Shared memory: the registry of live executors, used to wake idle executors when an
//! enqueue commits and to tell the reaper which executors are alive, and the databases the
//! launcher serves (one scheduler each).
//!
//! Nothing here is job state: every job's state is in the tables. The registry only holds
//! who is alive and who sleeps, and the progress its running handler last reported (read
//! while the handler's transaction is still open), and is rebuilt from nothing after a
//! crash restart.

use crate::gucs::MAX_EXECUTORS;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering,
};

/// Largest progress report, in bytes of JSON text (`queue.set_progress`, `heartbeat`).
pub const MAX_PROGRESS_SIZE: usize = 2048;
const PROGRESS_WORDS: usize = MAX_PROGRESS_SIZE / 8;

/// One executor's entry. `pid == 0` means the slot is free; a negative pid means the
/// scheduler of that pid reserved it and is starting an executor there.
pub struct Slot {
    pid: AtomicI32,
    /// The database the executor serves.
    db: AtomicU32,
    procno: AtomicI32,
    /// BUSY, LOOKING or SLEEPING: set by the executor, and back to BUSY by whoever wakes
    /// it, so that an enqueue wakes an idle executor rather than one busy with a handler.
    idle: AtomicU8,
    /// The executor's life id (a uuid), recorded on the jobs it claims.
    id_hi: AtomicU64,
    id_lo: AtomicU64,
    /// A job `queue.cancel()` asked this executor to stop (0 = none).
    cancel_hi: AtomicU64,
    cancel_lo: AtomicU64,
    progress: Progress,
    /// Jobs may have become ready at this run_at (Postgres microseconds) or later, behind
    /// where the executor's claims resume (worker/cursors.rs); i64::MAX = none since it
    /// last looked, i64::MIN = anywhere.
    rewind_to: AtomicI64,
    /// Since when (ms since the epoch) the executor walks its queues from the head past an
    /// old snapshot's dead entries (0: it does not): one executor of a database at a time.
    head_pass_since_ms: AtomicI64,
}

/// The last progress report of the job an executor runs: one writer (the executor), any
/// number of readers, under a sequence lock. The writer makes `seq` odd, writes, and makes
/// it even again; a reader retries while `seq` is odd or changed during its copy. Atomics
/// throughout, so a torn copy is detected and never undefined behaviour.
struct Progress {
    seq: AtomicU64,
    job_hi: AtomicU64,
    job_lo: AtomicU64,
    /// Bytes used in `text`; 0 = no report.
    len: AtomicU64,
    text: [AtomicU64; PROGRESS_WORDS],
}

impl Progress {
    fn new() -> Self {
        Progress {
            seq: AtomicU64::new(0),
            job_hi: AtomicU64::new(0),
            job_lo: AtomicU64::new(0),
            len: AtomicU64::new(0),
            text: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Records `text` (at most MAX_PROGRESS_SIZE bytes, checked by the caller) for `job`.
    fn write(&self, job: uuid::Uuid, text: &str) {
        let bytes = &text.as_bytes()[..text.len().min(MAX_PROGRESS_SIZE)];
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let (hi, lo) = job.as_u64_pair();
        self.job_hi.store(hi, Ordering::Relaxed);
        self.job_lo.store(lo, Ordering::Relaxed);
        for (word, chunk) in self.text.iter().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        self.len.store(bytes.len() as u64, Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The report recorded for `job`, if any. None also when the writer kept changing it
    /// for the whole of about 100 ms (a write is a few hundred stores, but the writer can be
    /// descheduled in the middle of one: so after a few spins the reader sleeps).
    fn read(&self, job: uuid::Uuid) -> Option<String> {
        let (hi, lo) = job.as_u64_pair();
        for attempt in 0..2000 {
            if attempt >= 100 {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            let before = self.seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let ours = self.job_hi.load(Ordering::Relaxed) == hi
                && self.job_lo.load(Ordering::Relaxed) == lo;
            let len = (self.len.load(Ordering::Relaxed) as usize).min(MAX_PROGRESS_SIZE);
            let mut bytes = Vec::with_capacity(len);
            if ours {
                for word in self.text.iter().take(len.div_ceil(8)) {
                    bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
                }
                bytes.truncate(len);
            }
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != before {
                continue;
            }
            return (ours && len > 0)
                .then(|| String::from_utf8(bytes).ok())
                .flatten();
        }
        None
    }
}

pub struct Registry {
    slots: [Slot; MAX_EXECUTORS],
    databases: [Database; MAX_DATABASES],
    /// The launcher's pgprocno, for setting its latch (-1 before it started).
    launcher_procno: AtomicI32,
    /// Executors that left the registry since the server started: while it stays the same,
    /// every job an executor holds belongs to a live one, and the reaper need not look.
    exits: AtomicU64,
}

/// Most databases the launcher serves at once.
pub const MAX_DATABASES: usize = 64;

/// One database the launcher knows. `oid == 0` means the entry is free. Only the launcher
/// takes and frees entries; schedulers and backends change `state` of their own database.
pub struct Database {
    oid: AtomicU32,
    state: AtomicU32,
    /// The scheduler's pid while one runs.
    pid: AtomicI32,
    /// A scheduler is not started before this (ms since the epoch): after one stopped, or
    /// while a DROP DATABASE is under way.
    not_before_ms: AtomicI64,
}

/// What the launcher knows of a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbState {
    /// A scheduler should run (to find out whether the extension is there, and serve it).
    Wanted = 1,
    /// A scheduler was started and looks for the extension.
    Started = 2,
    /// Its scheduler serves it: the extension is installed.
    Serving = 3,
    /// No extension there: nothing runs until CREATE EXTENSION (or a restart).
    Absent = 4,
}

impl DbState {
    fn from(v: u32) -> Option<DbState> {
        [
            DbState::Wanted,
            DbState::Started,
            DbState::Serving,
            DbState::Absent,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }
}

// SAFETY: only atomics, no pointers: valid in every process that maps the segment.
unsafe impl PGRXSharedMemory for Registry {}

impl Registry {
    fn new() -> Self {
        Registry {
            slots: std::array::from_fn(|_| Slot {
                pid: AtomicI32::new(0),
                db: AtomicU32::new(0),
                procno: AtomicI32::new(-1),
                idle: AtomicU8::new(BUSY),
                id_hi: AtomicU64::new(0),
                id_lo: AtomicU64::new(0),
                cancel_hi: AtomicU64::new(0),
                cancel_lo: AtomicU64::new(0),
                progress: Progress::new(),
                rewind_to: AtomicI64::new(i64::MAX),
                head_pass_since_ms: AtomicI64::new(0),
            }),
            databases: std::array::from_fn(|_| Database {
                oid: AtomicU32::new(0),
                state: AtomicU32::new(0),
                pid: AtomicI32::new(0),
                not_before_ms: AtomicI64::new(0),
            }),
            launcher_procno: AtomicI32::new(-1),
            exits: AtomicU64::new(0),
        }
    }
}

/// The database this process is connected to (0: none, as the launcher).
fn my_db() -> u32 {
    // SAFETY: set once a process connected to a database; InvalidOid (0) before.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// This process's pid.
fn my_pid() -> i32 {
    // SAFETY: MyProcPid is set at process start and never changes.
    unsafe { pg_sys::MyProcPid }
}

/// Whether process `pid` exists (signal 0 only checks).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 sends nothing.
    pid > 0
        && !(unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH))
}

static REGISTRY: PgAtomic<Registry> = unsafe { PgAtomic::new(c"pg_queue_registry") };

/// True in processes forked from a postmaster that preloaded pg_queue; without it there is
/// no registry (the library was loaded on demand) and wake-ups fall back to polling.
static ATTACHED: AtomicBool = AtomicBool::new(false);

pub fn init() {
    pg_shmem_init!(REGISTRY = Registry::new());
    ATTACHED.store(true, Ordering::Relaxed);
}

fn registry() -> Option<&'static Registry> {
    ATTACHED.load(Ordering::Relaxed).then(|| REGISTRY.get())
}

/// Records the calling executor in `slot`. Returns false when the registry is missing or
/// the slot index is out of range.
pub fn register_executor(slot: usize, id: uuid::Uuid) -> bool {
    let Some(slot) = registry().and_then(|r| r.slots.get(slot)) else {
        return false;
    };
    let (hi, lo) = id.as_u64_pair();
    slot.id_hi.store(hi, Ordering::Relaxed);
    slot.id_lo.store(lo, Ordering::Relaxed);
    // SAFETY: MyProc is set for every backend and background worker after InitProcess.
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    slot.procno.store(procno, Ordering::Relaxed);
    slot.idle.store(BUSY, Ordering::Relaxed);
    slot.head_pass_since_ms.store(0, Ordering::Relaxed);
    slot.db.store(my_db(), Ordering::Relaxed);
    slot.pid.store(my_pid(), Ordering::Release);
    true
}

/// Frees `slot` if it still belongs to `pid` (the executor at exit, or the launcher once it
/// saw the executor stop).
pub fn release_executor(slot: usize, pid: i32) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        if s.pid.load(Ordering::Acquire) != pid {
            return;
        }
        // The next executor in this slot is started only once pid is 0, so until it
        // registers, a reserved slot carries no id (its dead predecessor's jobs get reaped).
        s.id_hi.store(0, Ordering::Relaxed);
        s.id_lo.store(0, Ordering::Relaxed);
        if s.pid
            .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            if let Some(r) = registry() {
                r.exits.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// How many executors left the registry since the server started (None without one).
pub fn executor_exits() -> Option<u64> {
    registry().map(|r| r.exits.load(Ordering::Acquire))
}

/// An executor running handlers or its own bookkeeping: not woken by enqueues.
const BUSY: u8 = 0;
/// Claiming from a snapshot that a job committed now may be after: woken, it claims again
/// once this claim ends, which under a long transaction elsewhere can be a full pass of
/// tens of milliseconds (worker/cursors.rs).
const LOOKING: u8 = 1;
/// Waiting on its latch: woken, it claims at once. Enqueues wake these first.
const SLEEPING: u8 = 2;

/// The executor in `slot` is about to look for work (true) or found some (false).
pub fn set_idle(slot: usize, idle: bool) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        s.idle
            .store(if idle { LOOKING } else { BUSY }, Ordering::SeqCst);
    }
}

/// The executor in `slot` found no work and waits on its latch. Unless it was woken since
/// it began to look (its latch is set then, and the wait returns at once).
pub fn set_sleeping(slot: usize) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        let _ = s
            .idle
            .compare_exchange(LOOKING, SLEEPING, Ordering::SeqCst, Ordering::Relaxed);
    }
}

/// A registered executor, as `queue.workers` and the reaper see it.
pub struct ExecutorInfo {
    pub slot: usize,
    pub pid: i32,
    pub idle: bool,
    /// Its life id, recorded on the jobs it claims.
    pub id: uuid::Uuid,
}

/// Every registered executor of this process's database.
pub fn executors() -> Vec<ExecutorInfo> {
    let Some(r) = registry() else {
        return Vec::new();
    };
    let db = my_db();
    r.slots
        .iter()
        .enumerate()
        .filter_map(|(slot, s)| {
            let pid = s.pid.load(Ordering::Acquire);
            (pid > 0 && s.db.load(Ordering::Relaxed) == db).then(|| ExecutorInfo {
                slot,
                pid,
                idle: s.idle.load(Ordering::Relaxed) != BUSY,
                id: uuid::Uuid::from_u64_pair(
                    s.id_hi.load(Ordering::Relaxed),
                    s.id_lo.load(Ordering::Relaxed),
                ),
            })
        })
        .collect()
}

/// Sets the latch of up to `n` idle executors of this database: sleeping ones first, then
/// those still looking. Called after the enqueueing transaction committed, so that the
/// woken executors' next snapshot sees the jobs.
pub fn wake_idle_executors(n: usize) {
    let Some(r) = registry() else {
        return;
    };
    let db = my_db();
    let mut woken = 0;
    for state in [SLEEPING, LOOKING] {
        for s in r.slots.iter() {
            if woken >= n {
                return;
            }
            if s.pid.load(Ordering::Acquire) <= 0 || s.db.load(Ordering::Relaxed) != db {
                continue;
            }
            if s.idle
                .compare_exchange(state, BUSY, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                let procno = s.procno.load(Ordering::Relaxed);
                if procno >= 0 {
                    // SAFETY: procno indexes ProcGlobal->allProcs; a stale one only sets the
                    // latch of another process, which then wakes up for nothing.
                    unsafe { pg_sys::ProcSendSignal(procno) };
                }
                woken += 1;
            }
        }
    }
}

/// Tells every executor of this database that jobs may have become ready with a run_at
/// of `to` or later, behind where its claims resume (worker/cursors.rs): its next claim
/// looks from there. `i64::MIN`: from the head of every queue.
pub fn request_rewind(to: i64) {
    let Some(r) = registry() else {
        return;
    };
    let db = my_db();
    for s in r.slots.iter() {
        if s.pid.load(Ordering::Acquire) != 0 && s.db.load(Ordering::Relaxed) == db {
            s.rewind_to.fetch_min(to, Ordering::AcqRel);
        }
    }
}

/// The earliest run_at asked for by request_rewind since the executor in `slot` last
/// looked, if any.
pub fn take_rewind(slot: usize) -> Option<i64> {
    let s = registry()?.slots.get(slot)?;
    let to = s.rewind_to.swap(i64::MAX, Ordering::AcqRel);
    (to != i64::MAX).then_some(to)
}

/// A flag older than this is one its executor failed to clear (it is not a pass: those
/// take at most a fiftieth of an executor's time, and one from the head starts at most
/// every 10 s).
const HEAD_PASS_STALE_MS: i64 = 60_000;

/// The executor in `slot` is about to walk its queues from the head past an old
/// snapshot's dead entries (worker/cursors.rs). Two executors in such a walk at once left
/// both unable to claim for its length (jobs waited up to 250 ms), so one may while none
/// other of its database does; false: another does (the caller looks from the low-water
/// keys this time). `head_pass_done` clears it.
pub fn begin_head_pass(slot: usize) -> bool {
    let Some(r) = registry() else {
        return true;
    };
    let db = my_db();
    let others: Vec<&AtomicI64> = r
        .slots
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            *i != slot && s.pid.load(Ordering::Acquire) > 0 && s.db.load(Ordering::Relaxed) == db
        })
        .map(|(_, s)| &s.head_pass_since_ms)
        .collect();
    match r.slots.get(slot) {
        Some(s) => claim_head_pass(&s.head_pass_since_ms, &others, now_ms()),
        None => true,
    }
}

/// The walk `begin_head_pass` allowed ended (or never began).
pub fn head_pass_done(slot: usize) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        s.head_pass_since_ms.store(0, Ordering::SeqCst);
    }
}

/// Sets `mine` to `now`, then looks at the others' flags: with another set (and not
/// stale), clears `mine` and says no. Both stores precede both loads (SeqCst), so of two
/// executors that try at once, at most one goes on; both may back off, and try again at
/// their next full pass.
fn claim_head_pass(mine: &AtomicI64, others: &[&AtomicI64], now: i64) -> bool {
    mine.store(now, Ordering::SeqCst);
    let taken = others.iter().any(|o| {
        let since = o.load(Ordering::SeqCst);
        since != 0 && now - since < HEAD_PASS_STALE_MS
    });
    if taken {
        mine.store(0, Ordering::SeqCst);
    }
    !taken
}

/// Registry slots in use by database `db`: (slot, pid), the pid negative while its
/// scheduler starts an executor there.
pub fn occupied_slots(db: u32) -> Vec<(usize, i32)> {
    let Some(r) = registry() else {
        return Vec::new();
    };
    r.slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let pid = s.pid.load(Ordering::Acquire);
            (pid != 0 && s.db.load(Ordering::Relaxed) == db).then_some((i, pid))
        })
        .collect()
}

/// Takes a free slot for an executor this scheduler is about to start, marked with the
/// scheduler's negated pid until the executor registers. None when every slot is taken.
pub fn reserve_slot() -> Option<usize> {
    let r = registry()?;
    let mine = -my_pid();
    r.slots.iter().enumerate().find_map(|(i, s)| {
        s.pid
            .compare_exchange(0, mine, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            .then(|| {
                s.db.store(my_db(), Ordering::Relaxed);
                s.id_hi.store(0, Ordering::Relaxed);
                s.id_lo.store(0, Ordering::Relaxed);
                i
            })
    })
}

/// After the executor started: its pid in the slot, unless it registered itself already.
pub fn confirm_slot(slot: usize, pid: i32) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        let _ = s
            .pid
            .compare_exchange(-my_pid(), pid, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Frees the slots of `db` whose process is gone without saying so (it died before it
/// could run its exit callback, or its scheduler died while starting it).
pub fn forget_dead_executors(db: u32) {
    for (slot, pid) in occupied_slots(db) {
        if !alive(pid.abs()) {
            release_executor(slot, pid);
        }
    }
}

/// The pids of the executors of database `db`.
pub fn executor_pids(db: u32) -> Vec<i32> {
    occupied_slots(db)
        .into_iter()
        .filter_map(|(_, pid)| (pid > 0).then_some(pid))
        .collect()
}

/// Asks the executor with `pid` to cancel `job`: records the request in its slot, then
/// sends SIGINT, which interrupts the job's handler if it is running it now. Returns false
/// when no registered executor has that pid.
pub fn request_cancel(pid: i32, job: uuid::Uuid) -> bool {
    let Some(r) = registry() else {
        return false;
    };
    let Some(s) = r
        .slots
        .iter()
        .find(|s| pid > 0 && s.pid.load(Ordering::Acquire) == pid)
    else {
        return false;
    };
    let (hi, lo) = job.as_u64_pair();
    s.cancel_lo.store(lo, Ordering::Relaxed);
    s.cancel_hi.store(hi, Ordering::Release);
    // SAFETY: a signal to one of our executors; its SIGINT handler only interrupts handlers.
    unsafe { libc::kill(pid, libc::SIGINT) };
    true
}

/// Whether `queue.cancel()` asked the executor in `slot` to cancel `job`.
pub fn cancel_requested(slot: usize, job: uuid::Uuid) -> bool {
    registry().and_then(|r| r.slots.get(slot)).is_some_and(|s| {
        let (hi, lo) = job.as_u64_pair();
        s.cancel_hi.load(Ordering::Acquire) == hi && s.cancel_lo.load(Ordering::Relaxed) == lo
    })
}

/// Records the progress the handler of `job`, run by the executor in `slot`, reports; an
/// empty text clears it. Readers see it at once, whatever becomes of the transaction.
pub fn set_progress(slot: usize, job: uuid::Uuid, text: &str) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        s.progress.write(job, text);
    }
}

/// The last progress report of `job` while the executor with life id `executor` runs it.
pub fn progress(executor: uuid::Uuid, job: uuid::Uuid) -> Option<String> {
    let (hi, lo) = executor.as_u64_pair();
    let r = registry()?;
    let s = r.slots.iter().find(|s| {
        s.pid.load(Ordering::Acquire) > 0
            && s.id_hi.load(Ordering::Relaxed) == hi
            && s.id_lo.load(Ordering::Relaxed) == lo
    })?;
    s.progress.read(job)
}

// -- databases: the launcher's table --------------------------------------------------

fn databases() -> impl Iterator<Item = &'static Database> {
    registry().into_iter().flat_map(|r| r.databases.iter())
}

fn database(oid: u32) -> Option<&'static Database> {
    databases().find(|d| oid != 0 && d.oid.load(Ordering::Acquire) == oid)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The launcher: records itself, so that backends can wake it.
pub fn set_launcher() {
    if let Some(r) = registry() {
        // SAFETY: MyProc is set for every background worker after InitProcess.
        let procno = unsafe { (*pg_sys::MyProc).pgprocno };
        r.launcher_procno.store(procno, Ordering::Release);
    }
}

/// Sets the launcher's latch: something it should act on changed.
pub fn wake_launcher() {
    if let Some(r) = registry() {
        let procno = r.launcher_procno.load(Ordering::Acquire);
        if procno >= 0 {
            // SAFETY: as in wake_idle_executors.
            unsafe { pg_sys::ProcSendSignal(procno) };
        }
    }
}

/// The launcher, after listing the databases to serve: forgets the others and adds the new
/// ones, wanted. Returns the pids of the forgotten ones' schedulers and executors (to be
/// stopped) and the databases that found no free entry.
pub fn sync_databases(present: &[u32]) -> (Vec<i32>, Vec<u32>) {
    let mut stop = Vec::new();
    for d in databases() {
        let oid = d.oid.load(Ordering::Acquire);
        if oid != 0 && !present.contains(&oid) {
            stop.extend(d_pid(d));
            stop.extend(executor_pids(oid));
            d.oid.store(0, Ordering::Release);
        }
    }
    let mut full = Vec::new();
    for &oid in present {
        if database(oid).is_some() {
            continue;
        }
        let free = databases().find(|d| d.oid.load(Ordering::Acquire) == 0);
        match free {
            Some(d) => {
                d.state.store(DbState::Wanted as u32, Ordering::Relaxed);
                d.pid.store(0, Ordering::Relaxed);
                d.not_before_ms.store(0, Ordering::Relaxed);
                d.oid.store(oid, Ordering::Release);
            }
            None => full.push(oid),
        }
    }
    (stop, full)
}

fn d_pid(d: &Database) -> Option<i32> {
    let pid = d.pid.load(Ordering::Acquire);
    (pid > 0).then_some(pid)
}

/// The launcher: databases that want a scheduler now and have none running.
pub fn wanted_databases() -> Vec<u32> {
    let now = now_ms();
    databases()
        .filter(|d| {
            d.state.load(Ordering::Acquire) == DbState::Wanted as u32
                && d.not_before_ms.load(Ordering::Relaxed) <= now
                && d_pid(d).is_none_or(|p| !alive(p))
        })
        .map(|d| d.oid.load(Ordering::Acquire))
        .filter(|&oid| oid != 0)
        .collect()
}

/// The launcher started the scheduler `pid` for `oid`.
pub fn scheduler_started(oid: u32, pid: i32) {
    if let Some(d) = database(oid) {
        d.pid.store(pid, Ordering::Release);
        let _ = d.state.compare_exchange(
            DbState::Wanted as u32,
            DbState::Started as u32,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// The launcher: a scheduler that is gone without saying the extension is absent (it
/// failed, or was stopped) is started again after `delay_ms`.
pub fn restart_dead_schedulers(delay_ms: i64) {
    for d in databases() {
        let state = DbState::from(d.state.load(Ordering::Acquire));
        if matches!(state, Some(DbState::Started | DbState::Serving)) {
            if let Some(pid) = d_pid(d) {
                if alive(pid) {
                    continue;
                }
            }
            d.pid.store(0, Ordering::Relaxed);
            d.not_before_ms
                .fetch_max(now_ms() + delay_ms, Ordering::AcqRel);
            d.state.store(DbState::Wanted as u32, Ordering::Release);
        }
    }
}

/// A scheduler: what it found in its database (Serving, or Started while it cannot serve).
pub fn set_database_state(state: DbState) {
    if let Some(d) = database(my_db()) {
        d.state.store(state as u32, Ordering::Release);
    }
}

/// A scheduler that found no extension: records Absent and returns true (it may exit),
/// unless a CREATE EXTENSION committed since it looked (the state is Wanted again): then it
/// takes the database back (Started) and returns false, to look once more.
pub fn give_up_database() -> bool {
    let Some(d) = database(my_db()) else {
        return true;
    };
    loop {
        let state = d.state.load(Ordering::Acquire);
        let next = if state == DbState::Wanted as u32 {
            DbState::Started
        } else {
            DbState::Absent
        };
        if d.state
            .compare_exchange(state, next as u32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return next == DbState::Absent;
        }
    }
}

/// The databases being served, in oid order (every scheduler computes its share of the
/// executors from the same list).
pub fn serving_databases() -> Vec<u32> {
    let mut v: Vec<u32> = databases()
        .filter(|d| d.state.load(Ordering::Acquire) == DbState::Serving as u32)
        .map(|d| d.oid.load(Ordering::Acquire))
        .filter(|&oid| oid != 0)
        .collect();
    v.sort_unstable();
    v
}

/// A backend after CREATE EXTENSION pg_queue committed: the launcher starts a scheduler
/// for this database at once. One may be running already, looking for the extension from
/// before this commit: Wanted tells it to look again instead of giving up.
pub fn want_this_database() {
    if let Some(d) = database(my_db()) {
        for from in [DbState::Absent, DbState::Started] {
            let _ = d.state.compare_exchange(
                from as u32,
                DbState::Wanted as u32,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        d.not_before_ms.store(0, Ordering::Relaxed);
    }
    wake_launcher();
}

/// Before a DROP DATABASE (or another command that needs the database to itself): keeps
/// the launcher from starting a scheduler there for `hold_ms`, and returns the pids of the
/// scheduler and executors connected to it, to be stopped.
pub fn evict_database(oid: u32, hold_ms: i64) -> Vec<i32> {
    // Reserved slots carry their scheduler's negated pid: that scheduler is stopped too.
    let mut pids: Vec<i32> = occupied_slots(oid)
        .into_iter()
        .map(|(_, p)| p.abs())
        .collect();
    if let Some(d) = database(oid) {
        d.not_before_ms.store(now_ms() + hold_ms, Ordering::Release);
        pids.extend(d_pid(d));
        d.state.store(DbState::Wanted as u32, Ordering::Release);
    }
    pids
}

/// After the command that needed database `oid` to itself: no more hold.
pub fn release_database(oid: u32) {
    if let Some(d) = database(oid) {
        d.not_before_ms.store(0, Ordering::Release);
    }
    wake_launcher();
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{Progress, MAX_PROGRESS_SIZE};
    use pgrx::prelude::*;

    #[pg_test]
    fn one_executor_walks_from_the_head_at_a_time() {
        use super::{claim_head_pass, HEAD_PASS_STALE_MS};
        use std::sync::atomic::{AtomicI64, Ordering};
        let (a, b) = (AtomicI64::new(0), AtomicI64::new(0));
        assert!(claim_head_pass(&a, &[&b], 1_000));
        assert!(!claim_head_pass(&b, &[&a], 1_001), "a's walk is under way");
        assert_eq!(b.load(Ordering::SeqCst), 0, "b backed off");
        a.store(0, Ordering::SeqCst); // a's walk ended
        assert!(claim_head_pass(&b, &[&a], 1_002));
        // A flag its executor failed to clear stops nobody for long.
        assert!(!claim_head_pass(&a, &[&b], 1_002 + HEAD_PASS_STALE_MS - 1));
        assert!(claim_head_pass(&a, &[&b], 1_002 + HEAD_PASS_STALE_MS));
    }

    #[pg_test]
    fn progress_round_trips_every_length_and_belongs_to_one_job() {
        let p = Progress::new();
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        assert_eq!(p.read(a), None);
        for len in [1, 7, 8, 9, 100, MAX_PROGRESS_SIZE - 1, MAX_PROGRESS_SIZE] {
            let text: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            p.write(a, &text);
            assert_eq!(p.read(a).as_deref(), Some(text.as_str()));
            assert_eq!(p.read(b), None, "another job's report is not this one's");
        }
        p.write(a, "{}");
        assert_eq!(
            p.read(a).as_deref(),
            Some("{}"),
            "a shorter report leaves no tail"
        );
        p.write(a, "");
        assert_eq!(p.read(a), None, "an empty report clears it");
    }
}

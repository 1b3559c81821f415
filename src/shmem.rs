//! Shared memory: the registry of live executors, used to wake idle executors when an
//! enqueue commits and to tell the reaper which executors are alive.
//!
//! Nothing here is job state: every job's state is in the tables. The registry only holds
//! who is alive and who sleeps, and the progress its running handler last reported (read
//! while the handler's transaction is still open), and is rebuilt from nothing after a
//! crash restart.

use crate::gucs::MAX_EXECUTORS;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, Ordering};

/// Largest progress report, in bytes of JSON text (`queue.set_progress`, `heartbeat`).
pub const MAX_PROGRESS_SIZE: usize = 2048;
const PROGRESS_WORDS: usize = MAX_PROGRESS_SIZE / 8;

/// One executor's entry. `pid == 0` means the slot is free.
pub struct Slot {
    pid: AtomicI32,
    procno: AtomicI32,
    /// Set by the executor before it looks for work and cleared by whoever wakes it, so
    /// an enqueue wakes a sleeping executor rather than one busy with a long handler.
    idle: AtomicBool,
    /// The executor's life id (a uuid), recorded on the jobs it claims.
    id_hi: AtomicU64,
    id_lo: AtomicU64,
    /// A job `queue.cancel()` asked this executor to stop (0 = none).
    cancel_hi: AtomicU64,
    cancel_lo: AtomicU64,
    progress: Progress,
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
}

// SAFETY: only atomics, no pointers: valid in every process that maps the segment.
unsafe impl PGRXSharedMemory for Registry {}

impl Registry {
    fn new() -> Self {
        Registry {
            slots: std::array::from_fn(|_| Slot {
                pid: AtomicI32::new(0),
                procno: AtomicI32::new(-1),
                idle: AtomicBool::new(false),
                id_hi: AtomicU64::new(0),
                id_lo: AtomicU64::new(0),
                cancel_hi: AtomicU64::new(0),
                cancel_lo: AtomicU64::new(0),
                progress: Progress::new(),
            }),
        }
    }
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
    slot.idle.store(false, Ordering::Relaxed);
    // SAFETY: MyProcPid is set at process start and never changes.
    slot.pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
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
        let _ = s
            .pid
            .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Marks the executor in `slot` as about to look for work (true) or busy (false).
pub fn set_idle(slot: usize, idle: bool) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        s.idle.store(idle, Ordering::SeqCst);
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

/// Every registered executor.
pub fn executors() -> Vec<ExecutorInfo> {
    let Some(r) = registry() else {
        return Vec::new();
    };
    r.slots
        .iter()
        .enumerate()
        .filter_map(|(slot, s)| {
            let pid = s.pid.load(Ordering::Acquire);
            (pid != 0).then(|| ExecutorInfo {
                slot,
                pid,
                idle: s.idle.load(Ordering::Relaxed),
                id: uuid::Uuid::from_u64_pair(
                    s.id_hi.load(Ordering::Relaxed),
                    s.id_lo.load(Ordering::Relaxed),
                ),
            })
        })
        .collect()
}

/// Sets the latch of up to `n` idle executors. Called after the enqueueing transaction
/// committed, so that the woken executors' next snapshot sees the jobs.
pub fn wake_idle_executors(n: usize) {
    let Some(r) = registry() else {
        return;
    };
    let mut woken = 0;
    for s in r.slots.iter() {
        if woken >= n {
            break;
        }
        if s.pid.load(Ordering::Acquire) == 0 {
            continue;
        }
        if s.idle
            .compare_exchange(true, false, Ordering::SeqCst, Ordering::Relaxed)
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

/// Registry slots in use: (slot, pid).
pub fn occupied_slots() -> Vec<(usize, i32)> {
    let Some(r) = registry() else {
        return Vec::new();
    };
    r.slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let pid = s.pid.load(Ordering::Acquire);
            (pid != 0).then_some((i, pid))
        })
        .collect()
}

/// Marks `slot` as taken by a just-started executor before it registers itself, so the
/// launcher does not start a second one there.
pub fn reserve_slot(slot: usize, pid: i32) {
    if let Some(s) = registry().and_then(|r| r.slots.get(slot)) {
        let _ = s
            .pid
            .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed);
    }
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
        .find(|s| pid != 0 && s.pid.load(Ordering::Acquire) == pid)
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
        s.pid.load(Ordering::Acquire) != 0
            && s.id_hi.load(Ordering::Relaxed) == hi
            && s.id_lo.load(Ordering::Relaxed) == lo
    })?;
    s.progress.read(job)
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{Progress, MAX_PROGRESS_SIZE};
    use pgrx::prelude::*;

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

//! Rate limits (README "Flow control"): at most `limit` jobs of a queue start in any
//! window of `window`, counted across every executor and every consumer's `claim`.
//!
//! Each rate-limited queue has a slot in shared memory: a ring of start counts per
//! 1/BUCKETS of the window. A claim reserves its budget under the table's LWLock before
//! it claims (so two claims never both spend the last start) and gives back what it did
//! not use. The budget left at time t is `limit` minus the starts in the BUCKETS + 1
//! buckets that any window ending at t touches: a window never holds more than `limit`
//! starts, and the achieved rate is at least BUCKETS / (BUCKETS + 1) of the limit.
//!
//! A start is counted in the bucket of its job's `started_at`, which the caller takes
//! just before it reserves: every start lies in the windows it is counted in, even when
//! another process booked a later bucket in between (the check then also sums the
//! buckets between; a start more than SLACK buckets behind is refused). Shared memory is
//! lost in a crash restart: the first claim of a queue afterwards seeds its slot with the
//! attempts the tables show in the last window (running, finished, failed), counted as
//! if they had just started. Only snoozed and throttled runs leave no trace there.

use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory};
use std::cell::RefCell;

/// Rate-limited queues whose budgets are tracked at once (the least recently used slot
/// whose window has passed is reused).
pub const RATE_SLOTS: usize = 128;
/// Buckets per window.
const BUCKETS: i64 = 100;
/// How many buckets a reservation's start may lie behind the newest booked bucket.
const SLACK: i64 = 20;
const RING: usize = (BUCKETS + 1 + SLACK) as usize;

#[derive(Clone, Copy)]
struct RateSlot {
    used: bool,
    db: u32,
    name_len: u8,
    name: [u8; 64],
    limit: u32,
    window_us: i64,
    /// The newest bucket (time / bucket width) the ring holds counts for.
    last_bucket: i64,
    counts: [u32; RING],
    last_used_us: i64,
}

pub struct RateTable {
    slots: [RateSlot; RATE_SLOTS],
}

// SAFETY: plain data without pointers, valid in every process that maps it.
unsafe impl PGRXSharedMemory for RateTable {}

static RATES: PgLwLock<RateTable> = unsafe { PgLwLock::new(c"pg_queue_rates") };

const EMPTY: RateSlot = RateSlot {
    used: false,
    db: 0,
    name_len: 0,
    name: [0; 64],
    limit: 0,
    window_us: 0,
    last_bucket: 0,
    counts: [0; RING],
    last_used_us: 0,
};

pub fn init() {
    pg_shmem_init!(
        RATES = RateTable {
            slots: [EMPTY; RATE_SLOTS]
        }
    );
}

/// A queue's limit: `limit` starts per `window_us` microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    pub limit: i32,
    pub window_us: i64,
}

impl Limit {
    /// Rounded up, so that a window never touches more than BUCKETS + 1 buckets.
    fn width(&self) -> i64 {
        (self.window_us.max(1) as u64).div_ceil(BUCKETS as u64) as i64
    }
}

/// What a reservation got: `granted` starts, counted in `bucket`; when it got fewer than
/// it asked for, the time (microseconds, Postgres epoch) at which budget returns.
#[derive(Clone, Copy, Debug)]
pub struct Grant {
    pub granted: i32,
    pub bucket: i64,
    pub retry_at_us: Option<i64>,
}

impl RateSlot {
    fn is(&self, db: u32, name: &str) -> bool {
        self.used && self.db == db && &self.name[..self.name_len as usize] == name.as_bytes()
    }

    /// Moves the ring forward to bucket `now`, clearing the buckets it enters.
    fn advance(&mut self, now: i64) {
        if now <= self.last_bucket {
            return;
        }
        if now - self.last_bucket >= RING as i64 {
            self.counts = [0; RING];
        } else {
            for b in self.last_bucket + 1..=now {
                self.counts[b.rem_euclid(RING as i64) as usize] = 0;
            }
        }
        self.last_bucket = now;
    }

    /// Applies a changed setting: a new window re-buckets conservatively (every start
    /// still counted is counted as of now); a new limit only changes the budget.
    fn configure(&mut self, lim: Limit, now_us: i64) {
        if self.window_us != lim.window_us {
            let total: u32 = self.counts.iter().sum();
            self.counts = [0; RING];
            self.window_us = lim.window_us;
            self.last_bucket = now_us.div_euclid(lim.width());
            self.counts[self.last_bucket.rem_euclid(RING as i64) as usize] = total;
        }
        self.limit = lim.limit.max(0) as u32;
    }

    /// Reserves up to `wanted` starts at `at_us`: the budget is `limit` minus the starts
    /// booked in the BUCKETS buckets before that start's and every one after it.
    fn reserve(&mut self, lim: Limit, at_us: i64, wanted: i32) -> Grant {
        self.configure(lim, at_us);
        let at = at_us.div_euclid(lim.width());
        self.advance(at);
        self.last_used_us = self.last_used_us.max(at_us);
        if self.last_bucket - at > SLACK {
            // Older than the ring can check against: the caller claims again, later.
            return Grant {
                granted: 0,
                bucket: at,
                retry_at_us: Some(at_us),
            };
        }
        let used: u32 = (at - BUCKETS..=self.last_bucket)
            .map(|b| self.count(b))
            .sum();
        let left = self.limit.saturating_sub(used) as i32;
        let granted = wanted.clamp(0, left);
        self.counts[at.rem_euclid(RING as i64) as usize] += granted as u32;
        let retry_at_us = (granted < wanted).then(|| self.budget_returns_at(lim, at));
        Grant {
            granted,
            bucket: at,
            retry_at_us,
        }
    }

    fn count(&self, bucket: i64) -> u32 {
        self.counts[bucket.rem_euclid(RING as i64) as usize]
    }

    /// When budget returns: when the oldest bucket holding starts leaves the window.
    fn budget_returns_at(&self, lim: Limit, at: i64) -> i64 {
        let oldest = (at - BUCKETS..=self.last_bucket)
            .find(|&b| self.count(b) > 0)
            .unwrap_or(at);
        (oldest + BUCKETS + 1) * lim.width()
    }
}

/// Reserves up to `wanted` starts of queue `name` (database `db`). None when the queue
/// has no slot yet: the caller seeds one (`seed_and_reserve`), outside the lock.
fn reserve(db: u32, name: &str, lim: Limit, now_us: i64, wanted: i32) -> Option<Grant> {
    let mut t = RATES.exclusive();
    let slot = t.slots.iter_mut().find(|s| s.is(db, name))?;
    Some(slot.reserve(lim, now_us, wanted))
}

/// Creates the queue's slot with `seed` starts counted now (unless another process did
/// meanwhile), then reserves. Errors when every slot belongs to a queue active within
/// its window.
fn seed_and_reserve(
    db: u32,
    name: &str,
    lim: Limit,
    now_us: i64,
    wanted: i32,
    seed: u32,
) -> Result<Grant, String> {
    let mut t = RATES.exclusive();
    if let Some(slot) = t.slots.iter_mut().find(|s| s.is(db, name)) {
        return Ok(slot.reserve(lim, now_us, wanted));
    }
    let free = t
        .slots
        .iter_mut()
        .filter(|s| !s.used || s.last_used_us + s.window_us < now_us)
        .min_by_key(|s| (s.used, s.last_used_us))
        .ok_or_else(|| format!("more than {RATE_SLOTS} rate-limited queues are in use at once"))?;
    let len = name.len().min(64);
    *free = RateSlot {
        used: true,
        db,
        name_len: len as u8,
        name: [0; 64],
        limit: lim.limit.max(0) as u32,
        window_us: lim.window_us,
        last_bucket: now_us.div_euclid(lim.width()),
        counts: [0; RING],
        last_used_us: now_us,
    };
    free.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let now = free.last_bucket;
    free.counts[now.rem_euclid(RING as i64) as usize] = seed;
    Ok(free.reserve(lim, now_us, wanted))
}

/// Gives back `n` starts reserved in `bucket` and not used.
fn refund(db: u32, name: &str, bucket: i64, n: i32) {
    if n <= 0 {
        return;
    }
    let mut t = RATES.exclusive();
    if let Some(slot) = t.slots.iter_mut().find(|s| s.is(db, name)) {
        if bucket > slot.last_bucket - RING as i64 {
            let c = &mut slot.counts[bucket.rem_euclid(RING as i64) as usize];
            *c = c.saturating_sub(n as u32);
        }
    }
}

/// Attempts of queue `$1` the tables show started in the last `$2` microseconds (or
/// possibly so: an attempt that failed in them is counted even if it started before).
const SEED_SQL: &str = "
WITH w AS (SELECT clock_timestamp() - $2::float8 * interval '1 microsecond' AS since)
SELECT ((SELECT count(*) FROM queue.jobs j
          WHERE j.queue = $1 AND j.state = 'running' AND j.started_at > (SELECT since FROM w))
      + (SELECT count(*) FROM queue.jobs j CROSS JOIN jsonb_array_elements(j.errors) e
          WHERE j.queue = $1 AND (e ->> 'at')::timestamptz > (SELECT since FROM w))
      + (SELECT count(*) FROM queue.history h
          WHERE h.queue = $1 AND h.finished_at > (SELECT since FROM w) AND h.started_at IS NOT NULL)
      + (SELECT count(*) FROM queue.history h CROSS JOIN jsonb_array_elements(h.errors) e
          WHERE h.queue = $1 AND h.finished_at > (SELECT since FROM w) AND (e ->> 'at')::timestamptz > (SELECT since FROM w)))::int8";

fn database() -> u32 {
    // SAFETY: MyDatabaseId is set once the process is connected to a database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Reserves up to `wanted` starts of queue `name` for jobs that start at `now_us` (their
/// `started_at`, taken just before), seeding its slot from the tables on first use (SPI:
/// call it inside a transaction).
pub fn take(
    name: &str,
    lim: Limit,
    wanted: i32,
    now_us: i64,
) -> Result<Grant, crate::worker::SqlError> {
    let db = database();
    if let Some(g) = reserve(db, name, lim, now_us, wanted) {
        return Ok(g);
    }
    let seed =
        Spi::get_one_with_args::<i64>(SEED_SQL, &[name.into(), lim.window_us.into()])?.unwrap_or(0);
    seed_and_reserve(
        db,
        name,
        lim,
        now_us,
        wanted,
        seed.clamp(0, u32::MAX as i64) as u32,
    )
    .map_err(|message| crate::worker::SqlError {
        sqlstate: "54000".into(),
        message,
        detail: None,
        hint: Some(
            "Remove rate limits that are not needed (alter_queue(rate_limit => 'none')).".into(),
        ),
    })
}

/// Microseconds until queue `name` may start a job (0: now), without reserving.
fn wait_us(name: &str, lim: Limit) -> i64 {
    // SAFETY: reads the clock.
    let now_us = unsafe { pg_sys::GetCurrentTimestamp() };
    let mut t = RATES.exclusive();
    let Some(slot) = t.slots.iter_mut().find(|s| s.is(database(), name)) else {
        return 0; // no start counted since the server started: the first claim seeds it
    };
    let g = slot.reserve(lim, now_us, 1);
    slot.counts[g.bucket.rem_euclid(RING as i64) as usize] -= g.granted as u32;
    g.retry_at_us.map_or(0, |at| (at - now_us).max(0))
}

/// Internal (queue.rate_wait): microseconds until a rate-limited queue may start a job.
#[pg_extern(volatile)]
fn rate_wait_us(queue: &str, lim: i32, win: pgrx::datum::Interval) -> i64 {
    wait_us(
        queue,
        Limit {
            limit: lim,
            window_us: interval_us(win),
        },
    )
}

/// Gives back the unused part of a reservation.
pub fn settle(name: &str, grant: &Grant, used: i32) {
    refund(database(), name, grant.bucket, grant.granted - used);
}

thread_local! {
    /// A consumer's reservations in the current claim, by queue, until settled.
    static PENDING: RefCell<Vec<(String, Grant)>> = const { RefCell::new(Vec::new()) };
}

/// Internal (claim): reserves up to `wanted` starts of `queue`, limited to `lim` per
/// `win`, for the caller's claim, which settles it with rate_settle.
#[pg_extern(volatile)]
fn rate_take(queue: &str, lim: i32, win: pgrx::datum::Interval, wanted: i32) -> i32 {
    let window_us = interval_us(win);
    // The caller's started_at is the clock_timestamp() it read just before this call.
    // SAFETY: reads the clock.
    let now_us = unsafe { pg_sys::GetCurrentTimestamp() };
    let g = take(
        queue,
        Limit {
            limit: lim,
            window_us,
        },
        wanted,
        now_us,
    )
    .unwrap_or_else(|e| {
        let code = if e.sqlstate == "54000" {
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED
        } else {
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
        };
        ereport!(PgLogLevel::ERROR, code, e.message);
        unreachable!()
    });
    PENDING.with_borrow_mut(|p| {
        p.retain(|(q, _)| q != queue);
        p.push((queue.to_string(), g));
    });
    g.granted
}

/// Internal (claim): `used` of the starts reserved for `queue` were used; the rest go back.
#[pg_extern(volatile)]
fn rate_settle(queue: &str, used: i32) {
    let g = PENDING.with_borrow_mut(|p| {
        let i = p.iter().position(|(q, _)| q == queue)?;
        Some(p.swap_remove(i).1)
    });
    if let Some(g) = g {
        settle(queue, &g, used);
    }
}

/// Microseconds in an interval (a month counts 30 days, as Postgres's epoch does).
pub fn interval_us(i: pgrx::datum::Interval) -> i64 {
    i.micros() + (i.days() as i64 + i.months() as i64 * 30) * 86_400_000_000
}

extension_sql!(
    r#"
COMMENT ON FUNCTION queue.rate_take(text, integer, interval, integer) IS 'Internal: reserves starts of a rate-limited queue for a claim.';
COMMENT ON FUNCTION queue.rate_settle(text, integer) IS 'Internal: gives back the starts a claim reserved and did not use.';
COMMENT ON FUNCTION queue.rate_wait_us(text, integer, interval) IS 'Internal: microseconds until a rate-limited queue may start a job.';
"#,
    name = "rate_comments",
    requires = [rate_take, rate_settle, rate_wait_us]
);

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::{Limit, RateSlot, BUCKETS, RING};
    use pgrx::prelude::*;

    fn slot() -> RateSlot {
        RateSlot {
            used: true,
            db: 1,
            name_len: 1,
            name: [b'q'; 64],
            limit: 0,
            window_us: 1_000_000,
            last_bucket: 0,
            counts: [0; RING],
            last_used_us: 0,
        }
    }

    /// Fails if any sliding second of `starts` (microseconds) holds more than `limit`.
    fn assert_no_second_over(starts: &mut [i64], limit: usize) {
        starts.sort_unstable();
        for (i, &t) in starts.iter().enumerate() {
            let in_window = starts[i..]
                .iter()
                .take_while(|&&u| u < t + 1_000_000)
                .count();
            assert!(
                in_window <= limit,
                "{in_window} starts in the second from {t} us"
            );
        }
    }

    #[pg_test]
    fn no_window_ever_holds_more_than_the_limit() {
        // 10 per second, asked for greedily every millisecond for 5 s: every sliding
        // second holds at most 10 starts, and the rate is at least 100/101 of the limit.
        let lim = Limit {
            limit: 10,
            window_us: 1_000_000,
        };
        let mut s = slot();
        let mut starts = Vec::new();
        for ms in 0..5_000i64 {
            let g = s.reserve(lim, ms * 1000, 3);
            starts.extend(std::iter::repeat_n(ms * 1000, g.granted as usize));
            if g.granted < 3 {
                assert!(g.retry_at_us.unwrap() > ms * 1000);
            }
        }
        assert_no_second_over(&mut starts, 10);
        assert!(
            starts.len() >= 49 * BUCKETS as usize / (BUCKETS as usize + 1),
            "{}",
            starts.len()
        );
    }

    #[pg_test]
    fn starts_booked_out_of_order_keep_every_window() {
        // Reservations come in real-time order, each for a start read up to 300 ms before
        // (as a claim that waited for the lock): every sliding second of start times holds
        // at most 10, and starts older than the slack are refused, not miscounted.
        let lim = Limit {
            limit: 10,
            window_us: 1_000_000,
        };
        let mut s = slot();
        let (mut starts, mut refused, mut seed) = (Vec::new(), 0, 7u64);
        for ms in 0..10_000i64 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let at = (ms - (seed >> 33) as i64 % 300).max(0) * 1000;
            let g = s.reserve(lim, at, 2);
            starts.extend(std::iter::repeat_n(at, g.granted as usize));
            refused += i32::from(g.granted == 0 && s.last_bucket - at / 10_000 > super::SLACK);
        }
        assert_no_second_over(&mut starts, 10);
        assert!(refused > 0, "no start was behind the slack");
        assert!(starts.len() >= 80, "{} starts in 10 s", starts.len());
    }

    #[pg_test]
    fn budget_returns_when_the_oldest_start_leaves() {
        let lim = Limit {
            limit: 2,
            window_us: 1_000_000,
        };
        let mut s = slot();
        assert_eq!(s.reserve(lim, 0, 2).granted, 2);
        let g = s.reserve(lim, 500_000, 1);
        assert_eq!(g.granted, 0);
        let at = g.retry_at_us.unwrap();
        assert!((1_000_000..=1_020_000).contains(&at), "{at}");
        assert_eq!(s.reserve(lim, at - 1, 1).granted, 0);
        assert_eq!(s.reserve(lim, at, 1).granted, 1);
    }

    #[pg_test]
    fn a_new_window_keeps_every_start_counted() {
        let mut s = slot();
        let one_s = Limit {
            limit: 5,
            window_us: 1_000_000,
        };
        assert_eq!(s.reserve(one_s, 0, 5).granted, 5);
        let two_s = Limit {
            limit: 5,
            window_us: 2_000_000,
        };
        assert_eq!(s.reserve(two_s, 100_000, 1).granted, 0);
        assert_eq!(s.reserve(two_s, 2_200_000, 5).granted, 5);
    }
}

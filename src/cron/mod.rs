//! Cron schedules: `queue.cron_next()` for SQL, and firing due schedules, which the
//! launcher runs on every pass (sql/schedules.sql holds the tables and the SQL API).
//!
//! Exactly once per (schedule, plan time): a plan is fired by inserting its row into
//! `queue.schedule_runs` (primary key) and enqueuing its job in the same transaction that
//! advances the schedule's `last_plan_at`. A crash before the commit fires nothing; the
//! plan is then still due and fires after the restart, once.
//!
//! A schedule enqueues as its owner (security::sandbox), through `queue.enqueue`, which
//! checks that the owner may still enqueue into the queue: a plan whose enqueue fails
//! (privilege revoked, queue full or dropped) is recorded with the error and no job.

pub mod plan;

use crate::security::sandbox;
use crate::worker::{subtransaction, SqlError};
use chrono::{DateTime, Duration, Utc};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use plan::{parse_zone, Plan};

/// Postgres timestamps count microseconds from 2000-01-01 UTC.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Most plans one schedule fires in one pass (catch_up => 'all' after a long downtime):
/// the rest fire in the next passes.
const MAX_PLANS_PER_PASS: usize = 100;
/// Most schedules one pass handles.
const MAX_SCHEDULES_PER_PASS: i64 = 500;

fn to_chrono(t: TimestampWithTimeZone) -> Option<DateTime<Utc>> {
    t.is_finite()
        .then(|| DateTime::from_timestamp_micros(pg_sys::TimestampTz::from(t) + PG_EPOCH_MICROS))
        .flatten()
}

fn to_pg(t: DateTime<Utc>) -> Option<TimestampWithTimeZone> {
    TimestampWithTimeZone::try_from(t.timestamp_micros() - PG_EPOCH_MICROS).ok()
}

/// The first plan time of `cron` in `time_zone` strictly after `after`; NULL when it never
/// fires again. ERROR 22023 for an invalid expression or time zone.
#[pg_extern(immutable, parallel_safe)]
fn cron_next(
    cron: &str,
    after: TimestampWithTimeZone,
    time_zone: default!(&str, "'UTC'"),
) -> Option<TimestampWithTimeZone> {
    let invalid = |msg: String| -> ! {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            msg,
            "Use 5 fields (minute hour day month weekday), 6 with seconds first, @hourly/@daily/@weekly/@monthly/@yearly, or @every 10s."
        );
        unreachable!()
    };
    let plan = Plan::parse(cron)
        .unwrap_or_else(|e| invalid(format!("invalid cron expression \"{cron}\": {e}")));
    let tz = parse_zone(time_zone).unwrap_or_else(|e| invalid(e));
    plan.next_after(to_chrono(after)?, tz).and_then(to_pg)
}

extension_sql!(
    r#"COMMENT ON FUNCTION queue.cron_next(text, timestamptz, text) IS
    'The first plan time of a cron expression (5 or 6 fields, @hourly..., @every 10s) in time_zone after a time; NULL when it never fires again.';"#,
    name = "cron_comments",
    requires = [cron_next]
);

/// Due, enabled schedules, locked so that only one pass fires them.
const DUE_SQL: &str = "
SELECT s.name, s.cron, s.time_zone, s.overlap, s.catch_up,
       extract(epoch FROM s.catch_up_window)::float8, s.last_plan_at, clock_timestamp(),
       EXISTS (SELECT 1 FROM queue.jobs j WHERE j.id = s.last_job), s.owner::oid
  FROM queue.schedule_defs s
 WHERE s.enabled AND s.next_run_at <= clock_timestamp()
 ORDER BY s.next_run_at
 LIMIT $1
   FOR UPDATE SKIP LOCKED";

/// Whether a plan was handled already (fired or skipped).
const HANDLED_SQL: &str =
    "SELECT EXISTS (SELECT 1 FROM queue.schedule_runs WHERE schedule = $1 AND plan_at = $2)";

/// A plan's job, enqueued as the schedule's owner (so with the owner's privileges: the
/// schedule's row is read by the launcher beforehand, as the owner may not read it).
const ENQUEUE_SQL: &str = "
SELECT queue.enqueue($1, $2::jsonb, priority => $3, max_attempts => $4, timeout => $5::interval)";

/// The schedule's settings its jobs are enqueued with.
const JOB_SQL: &str = "
SELECT queue, payload::text, priority, max_attempts, timeout::text
  FROM queue.schedule_defs WHERE name = $1";

/// Records a handled plan: its job, or the error that kept it from enqueuing. Should two
/// passes race, the primary key fails the second and its enqueue rolls back with it.
const RUN_SQL: &str =
    "INSERT INTO queue.schedule_runs (schedule, plan_at, job, error) VALUES ($1, $2, $3, $4)";

/// Records a plan skipped because the previous job was still live (overlap => 'skip').
const SKIP_SQL: &str =
    "INSERT INTO queue.schedule_runs (schedule, plan_at) VALUES ($1, $2) ON CONFLICT DO NOTHING";

const ADVANCE_SQL: &str = "
UPDATE queue.schedule_defs
   SET last_plan_at = $2, next_run_at = $3,
       last_job = coalesce($4, last_job), last_fired_at = coalesce($5, last_fired_at)
 WHERE name = $1";

struct Due {
    name: String,
    plan: Result<Plan, String>,
    tz: Result<chrono_tz::Tz, String>,
    overlap: String,
    all: bool,
    window: Duration,
    last: DateTime<Utc>,
    now: DateTime<Utc>,
    previous_live: bool,
    owner: pg_sys::Oid,
}

/// Fires every due schedule. Must run in a transaction; each schedule in a subtransaction,
/// so one failing (its queue dropped, say) does not hold back the others. Returns how many
/// jobs were enqueued.
pub fn fire_due() -> Result<i64, SqlError> {
    let mut due = Vec::new();
    Spi::connect_mut(|client| -> Result<(), SqlError> {
        for row in client.update(DUE_SQL, None, &[MAX_SCHEDULES_PER_PASS.into()])? {
            let (Some(name), Some(cron), Some(zone)) = (
                row.get::<String>(1)?,
                row.get::<String>(2)?,
                row.get::<String>(3)?,
            ) else {
                continue;
            };
            let (Some(last), Some(now)) = (
                row.get::<TimestampWithTimeZone>(7)?.and_then(to_chrono),
                row.get::<TimestampWithTimeZone>(8)?.and_then(to_chrono),
            ) else {
                continue;
            };
            due.push(Due {
                name,
                plan: Plan::parse(&cron),
                tz: parse_zone(&zone),
                overlap: row.get::<String>(4)?.unwrap_or_default(),
                all: row.get::<String>(5)?.as_deref() == Some("all"),
                window: Duration::milliseconds(
                    (row.get::<f64>(6)?.unwrap_or(3600.0) * 1000.0) as i64,
                ),
                last,
                now,
                previous_live: row.get::<bool>(9)?.unwrap_or(false),
                owner: row.get::<pg_sys::Oid>(10)?.unwrap_or(pg_sys::Oid::INVALID),
            });
        }
        Ok(())
    })?;
    let mut fired = 0;
    for d in due {
        match subtransaction(std::panic::AssertUnwindSafe(|| fire_one(&d))) {
            Ok(Ok(n)) => fired += n,
            Ok(Err(e)) | Err(e) => log!(
                "pg_queue launcher: schedule \"{}\" failed to fire: {e}",
                d.name
            ),
        }
    }
    Ok(fired)
}

/// Fires plan `at` of schedule `d` unless it was handled already: enqueues its job as the
/// schedule's owner and records the run. Returns the job, None when the plan was handled
/// before or its enqueue failed (then the run carries the error).
fn fire_plan(d: &Due, at: Option<TimestampWithTimeZone>) -> Result<Option<pgrx::Uuid>, SqlError> {
    let name = d.name.as_str();
    if Spi::get_one_with_args::<bool>(HANDLED_SQL, &[name.into(), at.into()])? == Some(true) {
        return Ok(None);
    }
    let (queue, payload, priority, max_attempts, timeout) = Spi::connect(|client| {
        let row = client.select(JOB_SQL, Some(1), &[name.into()])?.first();
        Ok::<_, SqlError>((
            row.get::<String>(1)?,
            row.get::<String>(2)?,
            row.get::<i32>(3)?,
            row.get::<i32>(4)?,
            row.get::<String>(5)?,
        ))
    })?;
    let owner = d.owner;
    let enqueued = subtransaction(move || {
        let entered = sandbox::enter(owner, None);
        let job = Spi::get_one_with_args::<pgrx::Uuid>(
            ENQUEUE_SQL,
            &[
                queue.into(),
                payload.into(),
                priority.into(),
                max_attempts.into(),
                timeout.into(),
            ],
        );
        sandbox::leave(entered);
        job.unwrap_or_else(|e| pgrx::error!("{e}"))
    });
    let (job, error) = match enqueued {
        Ok(job) => (job, None),
        Err(e) => {
            log!("pg_queue launcher: schedule \"{name}\" could not enqueue: {e}");
            (None, Some(e.to_string()))
        }
    };
    Spi::run_with_args(RUN_SQL, &[name.into(), at.into(), job.into(), error.into()])?;
    Ok(job)
}

/// Handles the due plans of one schedule; returns how many jobs it enqueued.
fn fire_one(d: &Due) -> Result<i64, SqlError> {
    let (plan, tz) = match (&d.plan, &d.tz) {
        (Ok(p), Ok(tz)) => (p, *tz),
        (Err(e), _) | (_, Err(e)) => {
            // Validated when scheduled; only a time zone database change can get here.
            Spi::run_with_args(
                "UPDATE queue.schedule_defs SET next_run_at = NULL WHERE name = $1",
                &[d.name.as_str().into()],
            )?;
            return Err(SqlError::internal(format!("cannot compute its plans: {e}")));
        }
    };
    let waiting = d.overlap == "queue" && d.previous_live;
    if waiting {
        return Ok(0); // plans wait for the previous job; looked at again next pass
    }
    // 'queue' fires one plan at a time: the next waits for this one's job.
    let max = if d.overlap == "queue" {
        1
    } else {
        MAX_PLANS_PER_PASS
    };
    let plans = plan.due(tz, d.last, d.now, d.window, d.all, max);
    let skip = d.overlap == "skip" && d.previous_live;
    let (mut last_job, mut last_fired, mut fired) = (None, None, 0);
    for &p in &plans {
        let at = to_pg(p);
        if skip {
            Spi::run_with_args(SKIP_SQL, &[d.name.as_str().into(), at.into()])?;
            continue;
        }
        if let Some(job) = fire_plan(d, at)? {
            last_job = Some(job);
            last_fired = at;
            fired += 1;
        }
    }
    // Plans older than the window are dropped: never fired. Never before d.last: every
    // due plan is after it.
    let done = plans
        .last()
        .copied()
        .unwrap_or(d.last)
        .max(d.now - d.window);
    let next = plan.next_after(done, tz);
    Spi::run_with_args(
        ADVANCE_SQL,
        &[
            d.name.as_str().into(),
            to_pg(done).into(),
            next.and_then(to_pg).into(),
            last_job.into(),
            last_fired.into(),
        ],
    )?;
    if skip && !plans.is_empty() {
        log!(
            "pg_queue launcher: schedule \"{}\" skipped {} plan(s): its previous job is still running",
            d.name,
            plans.len()
        );
    }
    Ok(fired)
}

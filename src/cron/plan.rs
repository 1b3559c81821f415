//! Cron plans: parsing a schedule's expression and computing its plan times in a time zone.
//!
//! Expressions: 5 fields (minute hour day-of-month month day-of-week), or 6 with a leading
//! seconds field; lists, ranges, steps, names (MON, JAN), `L`/`W`/`#`; the nicknames
//! `@yearly @annually @monthly @weekly @daily @midnight @hourly`; and `@every <duration>`
//! (`10s`, `5m`, `1h30m`, `2d`), whose plan times are multiples of the duration since the
//! Unix epoch, so they do not drift and are the same after a restart.
//!
//! Parsing and matching are croner's; time zones are chrono-tz's IANA database. Plan times
//! are UTC instants. Across DST, as croniter (and, in spirit, Vixie cron) does: plan times
//! of a schedule at set hours that fall in the wall-clock hour a spring-forward skips run
//! once, at the end of the gap (02:15 and 02:30 in Europe/Paris on the last Sunday of
//! March both run at 03:00+02); croner drops some of them, so `next_after` and `latest_at`
//! add them (`Gap`). A wall-clock time that happens twice at fall-back runs once, the
//! first time. A schedule that runs every hour just goes on by the clock: nothing is
//! caught up at spring-forward, and the repeated hour runs again at fall-back.

use chrono::{DateTime, Duration, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// How often a schedule may fire at most.
const MIN_EVERY: i64 = 1;
/// `@every` longer than this is better written as a cron expression.
const MAX_EVERY: i64 = 366 * 86_400;

pub enum Plan {
    Cron(Box<Cron>),
    /// Every this many seconds since the epoch.
    Every(i64),
}

impl Plan {
    pub fn parse(expr: &str) -> Result<Plan, String> {
        let expr = expr.trim();
        if let Some(rest) = expr.strip_prefix("@every") {
            return parse_duration(rest.trim()).map(Plan::Every);
        }
        if expr.split_whitespace().count() > 6 {
            return Err(
                "at most 6 fields (seconds, minute, hour, day of month, month, day of week)".into(),
            );
        }
        CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map(|c| Plan::Cron(Box::new(c)))
            .map_err(|e| e.to_string())
    }

    /// The first plan time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        match self {
            Plan::Every(step) => {
                let secs = after.timestamp().div_euclid(*step) * step + step;
                Utc.timestamp_opt(secs, 0).single()
            }
            Plan::Cron(c) => {
                // A set-hour schedule runs a repeated wall-clock time once: skip the second.
                let mut from = after;
                let next = loop {
                    let n = c
                        .find_next_occurrence(&from.with_timezone(&tz), false)
                        .ok()
                        .map(|t| t.with_timezone(&Utc));
                    match n {
                        Some(t) if !every_hour(c) && second_pass(tz, t) => from = t,
                        n => break n,
                    }
                };
                // The first DST gap before it that holds a plan time runs first.
                let until = next.unwrap_or(after + Duration::days(366));
                gaps(tz, after, until)
                    .find(|g| !every_hour(c) && g.holds_plan(c))
                    .map(|g| g.end)
                    .or(next)
            }
        }
    }

    /// The last plan time at or before `at`.
    pub fn latest_at(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        match self {
            Plan::Every(step) => Utc
                .timestamp_opt(at.timestamp().div_euclid(*step) * step, 0)
                .single(),
            Plan::Cron(c) => {
                let mut upto = at;
                let prev = loop {
                    let p = c
                        .find_previous_occurrence(&upto.with_timezone(&tz), true)
                        .ok()
                        .map(|t| t.with_timezone(&Utc));
                    match p {
                        Some(t) if !every_hour(c) && second_pass(tz, t) => {
                            upto = t - Duration::seconds(1)
                        }
                        p => break p,
                    }
                };
                // A later DST gap holding a plan time ran at its end.
                let since = prev.unwrap_or(at - Duration::days(366));
                gaps(tz, since, at)
                    .filter(|g| !every_hour(c) && g.holds_plan(c) && g.end <= at)
                    .last()
                    .map(|g| g.end)
                    .or(prev)
            }
        }
    }

    /// Plan times due at `now`: after `last` and not before `now - window`, up to and
    /// including `now`, oldest first. With `all` false only the latest of them; with it,
    /// at most `max`.
    pub fn due(
        &self,
        tz: Tz,
        last: DateTime<Utc>,
        now: DateTime<Utc>,
        window: Duration,
        all: bool,
        max: usize,
    ) -> Vec<DateTime<Utc>> {
        let oldest = now - window;
        if !all {
            return self
                .latest_at(now, tz)
                .filter(|&t| t > last && t >= oldest)
                .into_iter()
                .collect();
        }
        let mut plans = Vec::new();
        // The first plan at or after `oldest` that is also after `last`.
        let mut t = self.next_after(last.max(oldest - Duration::seconds(1)), tz);
        while let Some(p) = t {
            if p > now || plans.len() >= max {
                break;
            }
            if p >= oldest && p > last {
                plans.push(p);
            }
            t = self.next_after(p, tz);
        }
        plans
    }
}

/// A wall-clock span that a spring-forward skips in some zone: local times from `from`
/// (inclusive) to `to` (exclusive) do not exist; `end` is the instant the clocks jump.
struct Gap {
    end: DateTime<Utc>,
    from: NaiveDateTime,
    to: NaiveDateTime,
}

impl Gap {
    /// Whether the expression names a wall-clock time inside the gap.
    fn holds_plan(&self, c: &Cron) -> bool {
        // Matching naive local times: evaluate in UTC, where every wall-clock time exists.
        let start = Utc.from_utc_datetime(&(self.from - Duration::seconds(1)));
        c.find_next_occurrence(&start, false)
            .is_ok_and(|t| t.naive_utc() < self.to)
    }
}

/// Whether the hour field allows every hour (`*`, `*/1`, `0-23`): such schedules are not
/// caught up after a spring-forward, as in croniter and Vixie cron.
fn every_hour(c: &Cron) -> bool {
    // Bit 1 is croner's ALL_BIT: the hour is in the field.
    (0..24).all(|h| c.pattern.hours.is_bit_set(h, 1).unwrap_or(false))
}

/// Whether `t` is the second of two instants with the same wall-clock time (fall-back).
fn second_pass(tz: Tz, t: DateTime<Utc>) -> bool {
    let wall = t.with_timezone(&tz).naive_local();
    matches!(tz.from_local_datetime(&wall), chrono::LocalResult::Ambiguous(_, later) if later == t)
}

fn offset_secs(tz: Tz, t: DateTime<Utc>) -> i32 {
    tz.offset_from_utc_datetime(&t.naive_utc())
        .fix()
        .local_minus_utc()
}

/// The spring-forward gaps of `tz` whose jump is in (`after`, `until`], in order. Offsets
/// are compared a day apart and a change is then found to the second by bisection (no
/// zone changes its offset twice within a day).
fn gaps(tz: Tz, after: DateTime<Utc>, until: DateTime<Utc>) -> impl Iterator<Item = Gap> {
    let mut t = after;
    std::iter::from_fn(move || {
        while t < until {
            let step = (t + Duration::days(1)).min(until);
            let (before, later) = (offset_secs(tz, t), offset_secs(tz, step));
            if before == later {
                t = step;
                continue;
            }
            // The first whole second whose offset is `later` (zones jump on whole seconds).
            let at = |secs: i64| Utc.timestamp_opt(secs, 0).single().unwrap_or(step);
            let (mut lo, mut hi) = (t.timestamp(), step.timestamp() + 1);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if offset_secs(tz, at(mid)) == before {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            let hi = at(hi);
            t = hi;
            if later > before {
                return Some(Gap {
                    end: hi,
                    from: hi.naive_utc() + Duration::seconds(before as i64),
                    to: hi.naive_utc() + Duration::seconds(later as i64),
                });
            }
        }
        None
    })
}

/// An IANA time zone name ("UTC", "Europe/Paris").
pub fn parse_zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("unknown time zone \"{name}\""))
}

/// `10s`, `5m`, `1h30m`, `2d` (parts may be separated by spaces) → seconds.
fn parse_duration(s: &str) -> Result<i64, String> {
    let bad = || format!("invalid @every duration \"{s}\": use e.g. 10s, 5m, 1h30m or 2d");
    if s.is_empty() {
        return Err(bad());
    }
    let (mut total, mut num) = (0i64, String::new());
    for ch in s.chars().filter(|c| !c.is_whitespace()) {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: i64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad());
    }
    if !(MIN_EVERY..=MAX_EVERY).contains(&total) {
        return Err(format!(
            "@every must be between 1 second and 366 days, not \"{s}\""
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, after: &str, tz: &str) -> String {
        Plan::parse(expr)
            .unwrap()
            .next_after(utc(after), parse_zone(tz).unwrap())
            .unwrap()
            .to_rfc3339()
    }

    /// (expression, after, time zone, expected next plan)
    fn check(cases: &[(&str, &str, &str, &str)]) {
        for &(expr, after, tz, want) in cases {
            assert_eq!(next(expr, after, tz), want, "{expr} after {after} in {tz}");
        }
    }

    #[test]
    fn five_and_six_fields_lists_ranges_steps_names() {
        check(&[
            (
                "*/15 * * * *",
                "2026-01-01T00:07:00Z",
                "UTC",
                "2026-01-01T00:15:00+00:00",
            ),
            (
                "30 */10 * * * *",
                "2026-01-01T00:00:31Z",
                "UTC",
                "2026-01-01T00:10:30+00:00",
            ),
            // 9-17/4 is 9, 13 and 17; 2026-01-02 is a Friday.
            (
                "0 9-17/4 * * MON-FRI",
                "2026-01-02T14:00:00Z",
                "UTC",
                "2026-01-02T17:00:00+00:00",
            ),
            (
                "0 9-17/4 * * MON-FRI",
                "2026-01-02T17:00:00Z",
                "UTC",
                "2026-01-05T09:00:00+00:00",
            ),
            (
                "0 0 1,15 JAN,JUL *",
                "2026-01-02T00:00:00Z",
                "UTC",
                "2026-01-15T00:00:00+00:00",
            ),
            (
                "0 12 * * sun",
                "2026-01-01T00:00:00Z",
                "UTC",
                "2026-01-04T12:00:00+00:00",
            ),
        ]);
    }

    #[test]
    fn nicknames() {
        check(&[
            (
                "@hourly",
                "2026-03-01T10:20:00Z",
                "UTC",
                "2026-03-01T11:00:00+00:00",
            ),
            (
                "@daily",
                "2026-03-01T10:20:00Z",
                "UTC",
                "2026-03-02T00:00:00+00:00",
            ),
            (
                "@weekly",
                "2026-03-04T10:20:00Z",
                "UTC",
                "2026-03-08T00:00:00+00:00",
            ),
            (
                "@monthly",
                "2026-03-04T10:20:00Z",
                "UTC",
                "2026-04-01T00:00:00+00:00",
            ),
            (
                "@yearly",
                "2026-03-04T10:20:00Z",
                "UTC",
                "2027-01-01T00:00:00+00:00",
            ),
        ]);
    }

    #[test]
    fn month_ends_and_leap_years() {
        // The 31st skips months without one; L is the last day of each month.
        check(&[
            (
                "0 0 31 * *",
                "2026-04-01T00:00:00Z",
                "UTC",
                "2026-05-31T00:00:00+00:00",
            ),
            (
                "0 0 L * *",
                "2026-02-01T00:00:00Z",
                "UTC",
                "2026-02-28T00:00:00+00:00",
            ),
            (
                "0 0 29 2 *",
                "2026-01-01T00:00:00Z",
                "UTC",
                "2028-02-29T00:00:00+00:00",
            ),
        ]);
    }

    #[test]
    fn time_zones_and_dst() {
        // 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer; New York's spring
        // forward is on another day (2026-03-08).
        check(&[
            (
                "0 9 * * *",
                "2026-01-10T12:00:00Z",
                "Europe/Paris",
                "2026-01-11T08:00:00+00:00",
            ),
            (
                "0 9 * * *",
                "2026-07-10T12:00:00Z",
                "Europe/Paris",
                "2026-07-11T07:00:00+00:00",
            ),
            (
                "0 12 * * *",
                "2026-03-07T18:00:00Z",
                "America/New_York",
                "2026-03-08T16:00:00+00:00",
            ),
        ]);
        // Spring forward (2026-03-29, 02:00 → 03:00 in Paris): 02:30 does not exist that
        // day; the plan runs at the next valid time, once.
        let spring = Plan::parse("30 2 * * *").unwrap();
        let paris = parse_zone("Europe/Paris").unwrap();
        let t = spring
            .next_after(utc("2026-03-28T12:00:00Z"), paris)
            .unwrap();
        assert_eq!(t.to_rfc3339(), "2026-03-29T01:00:00+00:00"); // 03:00 CEST
        assert_eq!(
            spring.next_after(t, paris).unwrap().to_rfc3339(),
            "2026-03-30T00:30:00+00:00"
        );
        // Fall back (2026-10-25, 03:00 → 02:00): 02:30 happens twice; it runs once.
        let plans = spring.due(
            paris,
            utc("2026-10-24T12:00:00Z"),
            utc("2026-10-25T12:00:00Z"),
            Duration::days(1),
            true,
            10,
        );
        assert_eq!(plans.len(), 1, "{plans:?}");
        // A plan skipped by spring-forward among others (issue 13's report): 02:15 runs at
        // 03:00, between 01:15 and 03:15, as croniter and Vixie cron have it.
        let listed = Plan::parse("15 1,2,3 * * 0").unwrap();
        let mut t = utc("2026-03-28T12:00:00Z");
        let mut got = Vec::new();
        for _ in 0..4 {
            t = listed.next_after(t, paris).unwrap();
            got.push(t.with_timezone(&paris).to_rfc3339());
        }
        assert_eq!(
            got,
            [
                "2026-03-29T01:15:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T03:15:00+02:00",
                "2026-04-05T01:15:00+02:00"
            ]
        );
        // The latest plan at 03:05 is the one that ran at 03:00.
        assert_eq!(
            listed
                .latest_at(utc("2026-03-29T01:05:00Z"), paris)
                .unwrap()
                .to_rfc3339(),
            "2026-03-29T01:00:00+00:00"
        );
    }

    #[test]
    fn every_is_anchored_to_the_epoch() {
        check(&[
            (
                "@every 10s",
                "2026-01-01T00:00:05Z",
                "UTC",
                "2026-01-01T00:00:10+00:00",
            ),
            (
                "@every 10s",
                "2026-01-01T00:00:10Z",
                "UTC",
                "2026-01-01T00:00:20+00:00",
            ),
            (
                "@every 1h30m",
                "2026-01-01T00:00:00Z",
                "UTC",
                "2026-01-01T01:30:00+00:00",
            ),
            (
                "@every 1 d",
                "2026-01-01T05:00:00Z",
                "Asia/Tokyo",
                "2026-01-02T00:00:00+00:00",
            ),
        ]);
        assert!(matches!(Plan::parse("@every 90s"), Ok(Plan::Every(90))));
    }

    #[test]
    fn rejects_bad_expressions() {
        for bad in [
            "",
            "* * * *",
            "* * * * * * *",
            "61 * * * *",
            "* 25 * * *",
            "* * * 13 *",
            "@every",
            "@every 0s",
            "@every 10x",
            "@every 5",
            "@every 400d",
            "@sometimes",
            "*/0 * * * *",
        ] {
            assert!(Plan::parse(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(parse_zone("Mars/Olympus").is_err());
        assert!(parse_zone("UTC").is_ok());
    }

    #[test]
    fn due_plans_after_downtime() {
        let every = Plan::parse("@every 1s").unwrap();
        let (last, now) = (utc("2026-01-01T00:00:00Z"), utc("2026-01-01T00:00:10Z"));
        let all = every.due(Tz::UTC, last, now, Duration::hours(1), true, 100);
        assert_eq!(all.len(), 10);
        assert_eq!(all[0], utc("2026-01-01T00:00:01Z"));
        assert_eq!(all[9], now);
        assert_eq!(
            every.due(Tz::UTC, last, now, Duration::hours(1), false, 100),
            vec![now]
        );
        // Bounded per call, and by the window.
        assert_eq!(
            every
                .due(Tz::UTC, last, now, Duration::hours(1), true, 3)
                .len(),
            3
        );
        let windowed = every.due(Tz::UTC, last, now, Duration::seconds(4), true, 100);
        assert_eq!(windowed.first(), Some(&utc("2026-01-01T00:00:06Z")));
        assert_eq!(windowed.len(), 5);
        // Nothing due twice, nothing before last.
        assert!(every
            .due(Tz::UTC, now, now, Duration::hours(1), true, 100)
            .is_empty());
        let cron = Plan::parse("0 * * * *").unwrap();
        let hours = cron.due(
            Tz::UTC,
            utc("2026-01-01T00:30:00Z"),
            utc("2026-01-01T03:10:00Z"),
            Duration::days(1),
            true,
            100,
        );
        assert_eq!(hours.len(), 3);
        assert_eq!(hours[2], utc("2026-01-01T03:00:00Z"));
    }
}

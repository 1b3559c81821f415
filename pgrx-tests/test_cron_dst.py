"""Cron plans across DST against croniter, an independent implementation (README
"Schedules and retention"): at spring-forward, plans in the skipped hour run once at its
end, exactly as croniter has them; at fall-back, a wall-clock time that happens twice
runs once for a schedule at set hours, where croniter runs it twice (the one documented
difference); a schedule that runs every hour goes on by the clock, as croniter."""
import datetime
import random
import zoneinfo

import pytest
from croniter import croniter

# (zone, an instant a few hours before spring-forward, one before fall-back), 2026.
EDGES = [
    ("Europe/Paris", "2026-03-28T22:00:00+00:00", "2026-10-24T22:00:00+00:00"),
    ("America/New_York", "2026-03-08T03:00:00+00:00", "2026-10-31T03:00:00+00:00"),
    ("Australia/Sydney", "2026-10-03T12:00:00+00:00", "2026-04-04T12:00:00+00:00"),
]

MINUTES = ["0", "15", "30", "45", "*/20", "5,35", "*/7", "59", "0-10/5"]
HOURS = ["*", "1", "2", "3", "1-4", "*/2", "2,3", "0-23/3", "1,2"]
DAYS_OF_WEEK = ["*", "0", "1-5", "6,0"]


def expressions(n, seed):
    rnd = random.Random(seed)
    return [f"{rnd.choice(MINUTES)} {rnd.choice(HOURS)} * * {rnd.choice(DAYS_OF_WEEK)}" for _ in range(n)]


def ours(db, expr, start, zone, n):
    """The next n plans after start, from queue.cron_next, as aware times in the zone."""
    rows = db.execute("""
        WITH RECURSIVE p(t, i) AS (
            SELECT queue.cron_next(%(e)s, %(s)s::timestamptz, %(z)s), 1
            UNION ALL SELECT queue.cron_next(%(e)s, p.t, %(z)s), p.i + 1 FROM p WHERE p.i < %(n)s)
        SELECT t FROM p ORDER BY i""", {"e": expr, "s": start, "z": zone, "n": n}).fetchall()
    return [r[0].astimezone(zoneinfo.ZoneInfo(zone)) for r in rows]


def every_hour(expr):
    hours = croniter(expr).expanded[1]
    return hours == ["*"] or len(hours) == 24


def theirs(expr, start, zone, n, once=False):
    """croniter's next plans; with once, a wall-clock time seen before is left out."""
    tz = zoneinfo.ZoneInfo(zone)
    it = croniter(expr, datetime.datetime.fromisoformat(start).astimezone(tz))
    out, seen = [], set()
    while len(out) < n:
        t = it.get_next(datetime.datetime)
        wall = t.replace(tzinfo=None, fold=0)
        if once and wall in seen:
            continue
        seen.add(wall)
        out.append(t)
    return out


@pytest.mark.parametrize("zone, spring, fall", EDGES)
def test_spring_forward_matches_croniter(db, zone, spring, fall):
    for expr in expressions(40, zone):
        assert ours(db, expr, spring, zone, 8) == theirs(expr, spring, zone, 8), expr


@pytest.mark.parametrize("zone, spring, fall", EDGES)
def test_fall_back_runs_each_wall_clock_time_once(db, zone, spring, fall):
    """A set-hour schedule runs a repeated wall-clock time once (croniter: twice); an
    every-hour schedule goes on by the clock through the repeated hour, as croniter."""
    for expr in expressions(40, zone + "fall"):
        want = theirs(expr, fall, zone, 8, once=not every_hour(expr))
        assert ours(db, expr, fall, zone, 8) == want, expr

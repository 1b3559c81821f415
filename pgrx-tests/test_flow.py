"""Flow control (README "Flow control"): snooze and throttle from handlers and consumers.
Neither counts an attempt; a throttle cools the whole queue down on an exponential curve
that a success resets."""
import datetime

import pytest

from conftest import plpgsql_queue, scalar, sqlstate, wait_for, wait_terminal

MS = datetime.timedelta(milliseconds=1)


def runs(db, name):
    """(payload n, start time) of every handler run that committed its log row."""
    return db.execute(f"SELECT n, at FROM {name}_runs ORDER BY at").fetchall()


def flow_queue(db, name, body, **opts):
    """A queue whose handler logs each run to `name`_runs (autonomously of its outcome:
    through a sequence, whose values survive a rollback) and then runs `body`."""
    db.execute(f"CREATE SEQUENCE {name}_seq")
    db.execute(f"CREATE TABLE {name}_runs (n int, at timestamptz)")
    plpgsql_queue(db, name, f"""
        PERFORM nextval('{name}_seq');
        INSERT INTO {name}_runs VALUES ((payload->>'n')::int, clock_timestamp());
        {body}""", **opts)


def test_snooze_runs_the_job_again_later_without_counting_an_attempt(db, name):
    # Snoozes twice (its log rows roll back with it), then succeeds.
    flow_queue(db, name, f"""
        IF currval('{name}_seq') <= 2 THEN PERFORM queue.snooze('300 milliseconds'); END IF;""",
               max_attempts=1)
    job = scalar(db, "SELECT queue.enqueue(%s, '{\"n\": 1}')", (name,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}
    state, attempts, snoozes, errors = db.execute(
        "SELECT state::text, attempts, snoozes, errors FROM queue.status(%s)", (job,)).fetchone()
    assert (state, attempts, snoozes, errors) == ("succeeded", 1, 2, [])
    assert len(runs(db, name)) == 1            # the snoozed runs' writes rolled back
    assert scalar(db, f"SELECT last_value FROM {name}_seq") == 3
    started, created = db.execute("SELECT started_at, created_at FROM queue.status(%s)", (job,)).fetchone()
    assert started - created >= 600 * MS


def test_max_snoozes_fails_the_attempt(db, name):
    flow_queue(db, name, "PERFORM queue.snooze('0 seconds');", max_attempts=1, max_snoozes=2)
    job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
    assert wait_terminal(db, name, 1) == {"failed": 1}
    attempts, snoozes, errors = db.execute(
        "SELECT attempts, snoozes, errors FROM queue.status(%s)", (job,)).fetchone()
    assert (attempts, snoozes) == (1, 2)
    assert errors[0]["sqlstate"] == "54000" and "snoozed 2 times" in errors[0]["message"]


def test_raising_the_code_by_hand_is_an_ordinary_failure(db, name):
    flow_queue(db, name, "RAISE EXCEPTION 'fake' USING ERRCODE = 'PQ001';", max_attempts=1)
    job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
    assert wait_terminal(db, name, 1) == {"failed": 1}
    assert db.execute("SELECT attempts, snoozes, errors->0->>'sqlstate' FROM queue.status(%s)",
                      (job,)).fetchone() == (1, 0, "PQ001")


def test_a_caught_snooze_is_not_a_snooze(db, name):
    flow_queue(db, name, """
        BEGIN PERFORM queue.snooze('1 hour'); EXCEPTION WHEN OTHERS THEN NULL; END;""")
    job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}
    assert scalar(db, "SELECT snoozes FROM queue.status(%s)", (job,)) == 0


def test_throttles_cool_the_queue_down_on_the_curve_and_a_success_resets_it(db, name):
    # Throttles on its first 3 runs, then succeeds. A throttled run rolls back, so each
    # records its time in a sequence of its own (setval is not transactional).
    for k in (1, 2, 3):
        db.execute(f"CREATE SEQUENCE {name}_t{k}")
    flow_queue(db, name, f"""
        IF currval('{name}_seq') <= 3 THEN
            PERFORM setval(format('{name}_t%s', currval('{name}_seq'))::regclass,
                           (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
            PERFORM queue.throttle();
        END IF;""", throttle_base="200 milliseconds", throttle_max="500 milliseconds")
    job = scalar(db, "SELECT queue.enqueue(%s, '{\"n\": 1}')", (name,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}
    t = [scalar(db, f"SELECT last_value FROM {name}_t{k}") for k in (1, 2, 3)]
    success = scalar(db, f"SELECT extract(epoch FROM at) * 1000 FROM {name}_runs")
    gaps = [t[1] - t[0], t[2] - t[1], float(success) - t[2]]
    # min(200 ms * 2^n, 500 ms) for n = 0, 1, 2; woken on time, not at the 1 s poll.
    for gap, cooldown in zip(gaps, (200, 400, 500)):
        assert cooldown <= gap < cooldown + 250, gaps
    assert db.execute("SELECT attempts, errors FROM queue.status(%s)", (job,)).fetchone() == (1, [])
    assert db.execute("SELECT consecutive_throttles, throttled_until FROM queue.stats WHERE queue = %s",
                      (name,)).fetchone() == (0, None)


def test_no_job_of_a_cooling_queue_starts_and_retry_after_lengthens_it(db, name):
    flow_queue(db, name, f"""
        IF (payload->>'n')::int = 1 AND currval('{name}_seq') = 1 THEN
            PERFORM queue.throttle('1 second');
        END IF;""", throttle_base="100 milliseconds")
    first = scalar(db, "SELECT queue.enqueue(%s, '{\"n\": 1}')", (name,))
    until, n = wait_for(lambda: db.execute(
        "SELECT throttled_until, consecutive_throttles FROM queue.stats WHERE queue = %s AND throttled_until IS NOT NULL",
        (name,)).fetchone(), what="the queue cooling down")
    assert n == 1
    second = scalar(db, "SELECT queue.enqueue(%s, '{\"n\": 2}')", (name,))
    assert wait_terminal(db, name, 2) == {"succeeded": 2}
    starts = [scalar(db, "SELECT started_at FROM queue.status(%s)", (j,)) for j in (first, second)]
    assert min(starts) >= until
    created = scalar(db, "SELECT created_at FROM queue.status(%s)", (first,))
    assert until - created >= datetime.timedelta(seconds=1)        # retry_after, not 100 ms


# --- external consumers ------------------------------------------------------------------

def claim(db, queue):
    return db.execute("SELECT id, lease_token FROM queue.claim(%s, 'c', 1)", (queue,)).fetchone()


def test_consumers_snooze_and_throttle(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, max_snoozes => 1, "
               "throttle_base => '300 milliseconds')", (name,))
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    _, token = claim(db, name)
    assert scalar(db, "SELECT queue.snooze(%s, %s, '200 milliseconds')", (job, token)) is True
    row = db.execute("SELECT state::text, attempts, snoozes, run_at - now() FROM queue.status(%s)",
                     (job,)).fetchone()
    assert row[:3] == ("queued", 0, 1) and row[3] > 100 * MS
    assert scalar(db, "SELECT queue.heartbeat(%s, %s)", (job, token)) is False      # the lease is gone
    _, token = wait_for(lambda: claim(db, name), what="the snoozed job ready again")
    assert sqlstate(db, "SELECT queue.snooze(%s, %s, '1 second')", (job, token)) == "54000"   # max_snoozes
    # A throttle: the job goes back, the queue gives nothing until the cool-down is over.
    assert scalar(db, "SELECT queue.throttle(%s, %s)", (job, token)) is True
    assert db.execute("SELECT attempts, snoozes FROM queue.status(%s)", (job,)).fetchone() == (0, 1)
    until = scalar(db, "SELECT throttled_until FROM queue.stats WHERE queue = %s", (name,))
    assert until is not None and claim(db, name) is None
    _, token = wait_for(lambda: claim(db, name), what="the cool-down over")
    assert scalar(db, "SELECT now() >= %s", (until,))
    assert scalar(db, "SELECT queue.complete(%s, %s)", (job, token)) is True
    assert scalar(db, "SELECT consecutive_throttles FROM queue.stats WHERE queue = %s", (name,)) == 0
    assert scalar(db, "SELECT queue.throttle(%s, %s)", (job, token)) is False       # finished: no-op


@pytest.mark.parametrize("call, code", [
    ("SELECT queue.snooze('1 second')", "55000"),
    ("SELECT queue.throttle()", "55000"),
    ("SELECT queue.snooze(NULL::interval)", "22004"),
    ("SELECT queue.snooze('-1 second')", "22023"),
    ("SELECT queue.throttle('8 days')", "22023"),
    ("SELECT queue.snooze(gen_random_uuid(), gen_random_uuid(), NULL)", "22004"),
    ("SELECT queue.create_queue('bad_flow', notify => true, throttle_base => '0 seconds')", "22023"),
    ("SELECT queue.create_queue('bad_flow', notify => true, throttle_base => '1 minute', throttle_max => '1 second')", "22023"),
    ("SELECT queue.create_queue('bad_flow', notify => true, max_snoozes => -1)", "22023"),
    ("SELECT queue.alter_queue(%(q)s, throttle_max => '8 days')", "22023"),
])
def test_bad_flow_input_changes_nothing(db, name, call, code):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    before = db.execute("SELECT * FROM queue.queues ORDER BY name").fetchall()
    assert sqlstate(db, call, {"q": name}) == code
    assert db.execute("SELECT * FROM queue.queues ORDER BY name").fetchall() == before
    assert scalar(db, "SELECT queue.snooze(gen_random_uuid(), gen_random_uuid(), '1 second')") is False

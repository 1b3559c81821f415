"""Cron schedules and retention on a real cluster: the launcher fires plans exactly once,
honours overlap and catch-up across a restart, and keeps history bounded in batches."""
import statistics
import time

from conftest import scalar, wait_for, wait_terminal


def handler_queue(db, name, body="", **settings):
    db.execute(f"CREATE TABLE {name} (job uuid, at timestamptz DEFAULT clock_timestamp())")
    db.execute(f"""CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN
                     INSERT INTO public.{name} (job) SELECT id FROM queue.current_job(); {body}
                   END $$""")
    args = "".join(f", {k} => %s" for k in settings)
    db.execute(f"SELECT queue.create_queue(%s, %s{args})", (name, f"{name}_h(jsonb)", *settings.values()))


def runs(db, schedule):
    return db.execute("SELECT plan_at, job, fired_at FROM queue.schedule_runs WHERE schedule = %s "
                      "ORDER BY plan_at", (schedule,)).fetchall()


def most_live_jobs(db, name, seconds):
    """Samples the queue's live jobs for `seconds`, then disables its schedule; returns the
    most seen at once."""
    most = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)))
        time.sleep(0.02)
    db.execute("SELECT queue.alter_schedule(%s, enabled => false)", (name,))
    return most


def test_every_second_fires_once_per_plan_and_the_jobs_run(db, name):
    handler_queue(db, name)
    db.execute("SELECT queue.schedule(%s, '@every 1s', %s, '{\"from\": \"cron\"}')", (name, name))
    wait_for(lambda: len(runs(db, name)) >= 5, timeout=30, what="5 plans fired")
    db.execute("SELECT queue.alter_schedule(%s, enabled => false)", (name,))
    fired = runs(db, name)
    plans = [r[0] for r in fired]
    # One run per whole second, consecutive, each with its own job.
    assert all((b - a).total_seconds() == 1 for a, b in zip(plans, plans[1:])), plans
    assert all(p.microsecond == 0 for p in plans)
    jobs = [r[1] for r in fired]
    assert None not in jobs and len(set(jobs)) == len(jobs)
    assert wait_terminal(db, name, len(jobs)) == {"succeeded": len(jobs)}
    assert scalar(db, f"SELECT count(DISTINCT job) FROM {name}") == len(jobs)
    assert scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s "
                      "AND payload = '{\"from\": \"cron\"}'", (name,)) == len(jobs)
    late = [(r[2] - r[0]).total_seconds() * 1000 for r in fired]
    print(f"\n@every 1s: {len(plans)} plans, fired after the plan time by p50 "
          f"{statistics.median(late):.1f} ms, max {max(late):.1f} ms")
    row = db.execute("SELECT last_job, last_job_state::text FROM queue.schedules WHERE name = %s",
                     (name,)).fetchone()
    assert row == (jobs[-1], "succeeded")


def test_overlap_skip_never_has_two_live_jobs(db, name):
    handler_queue(db, name, body="PERFORM pg_sleep(2.2);")
    db.execute("SELECT queue.schedule(%s, '@every 1s', %s, overlap => 'skip')", (name, name))
    most_live = most_live_jobs(db, name, seconds=7)
    fired = runs(db, name)
    skipped = [r for r in fired if r[1] is None]
    started = [r for r in fired if r[1] is not None]
    assert most_live == 1
    assert len(started) >= 2 and len(skipped) >= 2, fired
    # No plan both skipped and fired; one row per plan time.
    assert len({r[0] for r in fired}) == len(fired)


def test_overlap_queue_waits_for_the_previous_job(db, name):
    handler_queue(db, name, body="PERFORM pg_sleep(1.5);")
    db.execute("SELECT queue.schedule(%s, '@every 1s', %s, overlap => 'queue', catch_up => 'all')",
               (name, name))
    most_live = most_live_jobs(db, name, seconds=5)
    fired = runs(db, name)
    assert most_live == 1
    assert len(fired) >= 2 and all(r[1] is not None for r in fired), fired
    # Every plan is fired in order, late but none dropped: consecutive seconds.
    plans = [r[0] for r in fired]
    assert all((b - a).total_seconds() == 1 for a, b in zip(plans, plans[1:])), plans


def test_retention_deletes_old_terminal_jobs_in_batches(cluster, db, name):
    short, keep = f"{name}_short", f"{name}_keep"
    db.execute("SELECT queue.create_queue(%s, notify => true, retention => '1 hour', paused => true)", (short,))
    db.execute("SELECT queue.create_queue(%s, notify => true, paused => true)", (keep,))
    insert = """INSERT INTO queue.history (id, queue, state, payload, enqueued_by, priority, run_at,
                    attempts, max_attempts, created_at, finished_at, errors)
                SELECT queue.uuid_generate_v7(), %s, %s, '{}', current_user::regrole, 0, now(), 1, 1,
                       now() - interval '3 hours', now() - %s::interval, '[]'
                  FROM generate_series(1, %s)"""
    db.execute(insert, (short, "succeeded", "2 hours", 2500))
    db.execute(insert, (short, "failed", "2 hours", 30))
    db.execute(insert, (short, "succeeded", "10 minutes", 100))
    db.execute(insert, (keep, "succeeded", "2 hours", 40))      # its retention is 7 days
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[5]))", (short,))
    # A daily partition far older than every retention: dropped whole.
    db.execute("CREATE TABLE queue.history_20200101 PARTITION OF queue.history "
               "FOR VALUES FROM ('2020-01-01 00:00Z') TO ('2020-01-02 00:00Z')")
    db.execute(insert.replace("now() - %s::interval", "%s::timestamptz").replace(
        "now() - interval '3 hours'", "'2020-01-01 00:00Z'"), (keep, "succeeded", "2020-01-01 12:00Z", 10))

    def old_left():
        return scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s "
                          "AND finished_at < now() - interval '1 hour'", (short,))
    wait_for(lambda: old_left() == 0, timeout=60, interval=0.2, what="old history deleted")
    wait_for(lambda: scalar(db, "SELECT to_regclass('queue.history_20200101') IS NULL"),
             timeout=60, interval=0.2, what="old partition dropped")
    assert scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s", (short,)) == 100
    assert scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s", (keep,)) == 40
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (short,)) == 5
    log = cluster.log_text()
    assert f"retention deleted 2500 rows of queue {short} (succeeded) in 3 batches" in log, \
        [line for line in log.splitlines() if "retention" in line]
    assert f"retention deleted 30 rows of queue {short} (failed) in 1 batches" in log
    assert "retention dropped history partition history_20200101" in log


def test_history_stays_bounded_for_a_one_second_schedule(db, name):
    handler_queue(db, name, retention="1 second")
    db.execute("SELECT queue.schedule(%s, '@every 1s', %s)", (name, name))
    sizes = []
    deadline = time.monotonic() + 9
    while time.monotonic() < deadline:
        sizes.append(scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s", (name,)))
        time.sleep(0.25)
    db.execute("SELECT queue.alter_schedule(%s, enabled => false)", (name,))
    fired = len(runs(db, name))
    assert fired >= 8
    # Retention runs every 2 s here (10 ticks of 200 ms): at most a few seconds of jobs stay.
    assert max(sizes) <= 5, sizes
    assert scalar(db, f"SELECT count(*) FROM {name}") == fired     # all of them ran


def test_catch_up_after_downtime(cluster, name):
    every_missed, only_latest = f"{name}_all", f"{name}_latest"
    with cluster.connect() as db:
        handler_queue(db, every_missed)
        handler_queue(db, only_latest)
        db.execute("SELECT queue.schedule(%s, '@every 1s', %s, catch_up => 'all')", (every_missed, every_missed))
        db.execute("SELECT queue.schedule(%s, '@every 1s', %s, catch_up => 'latest')", (only_latest, only_latest))
        wait_for(lambda: len(runs(db, every_missed)) >= 2 and len(runs(db, only_latest)) >= 2,
                 timeout=30, what="both schedules firing")
    cluster.stop("fast")
    down_at = time.time()
    time.sleep(5)
    cluster.start()
    with cluster.connect() as db:
        up_at = time.time()
        wait_for(lambda: runs(db, every_missed)[-1][0].timestamp() >= up_at
                 and runs(db, only_latest)[-1][0].timestamp() >= up_at,
                 timeout=30, what="schedules firing after the restart")
        db.execute("SELECT queue.alter_schedule(%s, enabled => false)", (every_missed,))
        db.execute("SELECT queue.alter_schedule(%s, enabled => false)", (only_latest,))
        all_plans = [r[0] for r in runs(db, every_missed)]
        latest_plans = [r[0] for r in runs(db, only_latest)]
        # 'all': every plan time, the missed ones included, exactly once (no gap, no repeat).
        assert all((b - a).total_seconds() == 1 for a, b in zip(all_plans, all_plans[1:])), all_plans
        missed = [p for p in all_plans if down_at < p.timestamp() < up_at]
        assert len(missed) >= 4, (down_at, up_at, all_plans)
        # 'latest': of the missed plans only the last one fired: one gap of the downtime.
        gaps = [(b - a).total_seconds() for a, b in zip(latest_plans, latest_plans[1:])]
        assert sorted(gaps)[:-1] == [1.0] * (len(gaps) - 1) and gaps and max(gaps) >= 4, latest_plans
        for queue_name in (every_missed, only_latest):
            total = len(runs(db, queue_name))
            assert wait_terminal(db, queue_name, total) == {"succeeded": total}

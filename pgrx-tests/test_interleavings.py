"""Two-session scripts for claim vs reap vs complete (and cancel) interleavings. Each step
runs on its own connection in a fixed order; a step that must wait for another session's
lock is checked to be waiting on that lock (pg_stat_activity), not guessed from timing."""
import threading

import psycopg
import pytest

from conftest import plpgsql_queue, scalar, wait_for

CLUSTER_SETTINGS = {"queue.max_workers": "1"}


class Blocked:
    """Runs one statement on `conn` in a thread, to be joined after the session it waits
    for finished. `wait_until_blocked` proves it waits on a lock."""

    def __init__(self, conn, sql, params=None):
        self.conn, self.result, self.error = conn, None, None
        self.pid = conn.info.backend_pid
        self.thread = threading.Thread(target=self._run, args=(sql, params), daemon=True)
        self.thread.start()

    def _run(self, sql, params):
        try:
            self.result = self.conn.execute(sql, params).fetchone()[0]
        except psycopg.Error as e:
            self.error = e

    def wait_until_blocked(self, db):
        wait_for(lambda: scalar(db, "SELECT wait_event_type = 'Lock' FROM pg_stat_activity "
                                    "WHERE pid = %s", (self.pid,)),
                 timeout=10, interval=0.005, what=f"backend {self.pid} waiting on a lock")

    def join(self):
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error
        return self.result


@pytest.fixture
def session(cluster):
    """Connections with explicit transactions, one per simulated party."""
    conns = []

    def make():
        conn = cluster.connect(autocommit=False)
        conns.append(conn)
        return conn
    yield make
    for c in conns:
        c.close()


def notify_queue_with_claimed_job(db, name, lease="1 second"):
    db.execute("SELECT queue.create_queue(%s, notify => true, backoff_base => '1 hour', "
               "backoff_max => '1 hour')", (name,))
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    token = db.execute("SELECT lease_token FROM queue.claim(%s, 'c1', 1, %s)",
                       (name, lease)).fetchone()[0]
    return job, token


def job_row(db, job):
    return db.execute("SELECT state::text, attempts, consumer, last_error FROM queue.job_status "
                      "WHERE id = %s", (job,)).fetchone()


def test_reap_skips_a_job_whose_completion_is_in_flight(db, session, name):
    job, token = notify_queue_with_claimed_job(db, name)
    a = session()
    assert scalar(a, "SELECT queue.complete(%s, %s)", (job, token)) is True   # not committed
    # The lease expires while the completion is in flight; the launcher's reaper and ours
    # both skip the locked row.
    scalar(db, "SELECT pg_sleep(1.1)")
    assert scalar(db, "SELECT queue.reap()") == 0
    a.commit()
    assert job_row(db, job) == ("succeeded", 1, "c1", None)


def test_complete_after_reap_changes_nothing(db, session, name):
    job, token = notify_queue_with_claimed_job(db, name)
    r = session()
    # The reaper session holds the job's row first (so the launcher's reaper skips it),
    # then reaps it once the lease expired.
    r.execute("SELECT 1 FROM queue.jobs WHERE id = %s FOR UPDATE", (job,))
    scalar(db, "SELECT pg_sleep(1.1)")
    assert scalar(r, "SELECT queue.reap()") == 1
    # The late completion does not even wait for the reaper: its lease has expired.
    assert scalar(db, "SELECT queue.complete(%s, %s)", (job, token)) is False
    r.commit()
    assert scalar(db, "SELECT queue.complete(%s, %s)", (job, token)) is False
    assert job_row(db, job) == ("queued", 1, None, "lease expired (consumer c1)")
    # Nor can the old token touch the job once another consumer holds it.
    db.execute("UPDATE queue.jobs SET run_at = now() WHERE id = %s", (job,))
    token2 = scalar(db, "SELECT lease_token FROM queue.claim(%s, 'c2')", (name,))
    assert scalar(db, "SELECT queue.complete(%s, %s)", (job, token)) is False
    assert scalar(db, "SELECT queue.heartbeat(%s, %s)", (job, token)) is False
    assert job_row(db, job)[:3] == ("running", 2, "c2")
    assert token2 not in (None, token)


def test_concurrent_claims_never_exceed_the_concurrency_limit(db, session, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, concurrency => 3)", (name,))
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[10]))", (name,))
    a, b = session(), session()
    first = a.execute("SELECT id FROM queue.claim(%s, 'a', 3)", (name,)).fetchall()
    assert len(first) == 3                      # not committed yet
    second = Blocked(b, "SELECT count(*) FROM queue.claim(%s, 'b', 3)", (name,))
    second.wait_until_blocked(db)              # on the queue's claim lock
    a.commit()
    assert second.join() == 0                  # it counted a's three running jobs
    b.commit()
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s AND state = 'running'",
                  (name,)) == 3


def test_cancel_waits_for_a_completion_in_flight(db, session, name):
    job, token = notify_queue_with_claimed_job(db, name, lease="1 minute")
    a = session()
    assert scalar(a, "SELECT queue.complete(%s, %s)", (job, token)) is True
    cancel = Blocked(session(), "SELECT queue.cancel(%s)", (job,))
    cancel.wait_until_blocked(db)
    a.commit()
    assert cancel.join() is False              # the work was done: it stays succeeded
    assert job_row(db, job)[0] == "succeeded"


def test_complete_after_cancel_changes_nothing(db, session, name):
    job, token = notify_queue_with_claimed_job(db, name, lease="1 minute")
    c = session()
    assert scalar(c, "SELECT queue.cancel(%s)", (job,)) is True
    late = Blocked(session(), "SELECT queue.complete(%s, %s)", (job, token))
    late.wait_until_blocked(db)
    c.commit()
    assert late.join() is False
    assert job_row(db, job)[0] == "cancelled"


def test_reap_never_takes_a_live_executors_job(db, name):
    db.execute(f"CREATE TABLE {name} (job uuid)")
    db.execute(f"""CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN
                     INSERT INTO {name} SELECT id FROM queue.current_job(); PERFORM pg_sleep(1);
                   END $$""")
    db.execute("SELECT queue.create_queue(%s, %s)", (name, f"{name}_h(jsonb)"))
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    wait_for(lambda: scalar(db, "SELECT state = 'running' FROM queue.jobs WHERE id = %s", (job,)),
             timeout=30, interval=0.005, what="the job running")
    token = scalar(db, "SELECT lease_token FROM queue.jobs WHERE id = %s", (job,))
    for _ in range(10):
        scalar(db, "SELECT queue.reap()")
        assert job_row(db, job)[:2] == ("running", 1)
    assert scalar(db, "SELECT lease_token FROM queue.jobs WHERE id = %s", (job,)) == token
    wait_for(lambda: scalar(db, "SELECT state = 'succeeded' FROM queue.history WHERE id = %s",
                            (job,)), timeout=30, what="the job succeeded")
    assert job_row(db, job)[:2] == ("succeeded", 1)
    assert scalar(db, f"SELECT count(*) FROM {name}") == 1


def failed_job(db, name):
    """A job of a NOTIFY queue that failed for good, so that queue.retry() inserts it again."""
    job = scalar(db, "SELECT queue.enqueue(%s, max_attempts => 1)", (name,))
    token = db.execute("SELECT lease_token FROM queue.claim(%s, 'c1')", (name,)).fetchone()[0]
    assert scalar(db, "SELECT queue.fail(%s, %s, 'boom')", (job, token)) is True
    return job


# Every path that inserts jobs: the ids it returns (setup runs first, committed).
INSERTS = {
    "enqueue": (None, "SELECT array[queue.enqueue(%(q)s)]"),                      # C fast path
    "enqueue with options": (None, "SELECT array[queue.enqueue(%(q)s, max_attempts => 3)]"),
    "enqueue_unique": (None, "SELECT array_agg(id) FROM queue.enqueue_unique(%(q)s, 'k')"),
    "enqueue_many": (None, "SELECT array_agg(x) FROM queue.enqueue_many(%(q)s, ARRAY['{}'::jsonb, '{}']) x"),
    "retry": (failed_job, "SELECT CASE WHEN queue.retry(%(job)s) THEN array[%(job)s::uuid] END"),
}


@pytest.mark.parametrize("path", INSERTS)
def test_a_drop_waits_for_jobs_being_enqueued_and_cancels_them(db, session, name, path):
    """A job enqueued in a transaction still open when its queue is dropped used to commit
    after the drop, without a queue: never run, and adopted by the next queue of that name.
    The drop now waits for that transaction and cancels its jobs with the others."""
    setup, sql = INSERTS[path]
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    job = setup(db, name) if setup else None
    a = session()
    ids = scalar(a, sql, {"q": name, "job": job})            # not committed yet
    assert ids
    # A lock no SQL function takes (not an advisory lock): no role can hold it to keep jobs out.
    assert db.execute("SELECT locktype, mode FROM pg_locks WHERE pid = %s AND classid = x'70677164'::int::oid",
                      (a.info.backend_pid,)).fetchall() == [("userlock", "ShareLock")]
    b = session()
    drop = Blocked(b, "SELECT queue.drop_queue(%s, force => true)::text", (name,))
    drop.wait_until_blocked(db)
    a.commit()
    drop.join()
    b.commit()
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 0
    assert db.execute("SELECT state::text, errors -> -1 ->> 'message' FROM queue.history "
                      "WHERE id = ANY(%s)", (ids,)).fetchall() == [("cancelled", "queue dropped")] * len(ids)


@pytest.mark.parametrize("isolation,sqlstate", [("READ COMMITTED", "42704"), ("REPEATABLE READ", "40001")])
@pytest.mark.parametrize("path", INSERTS)
def test_an_enqueue_during_a_drop_waits_for_it_then_fails(db, session, name, path, isolation, sqlstate):
    """A job enqueued while a drop is in progress waits for the drop: at READ COMMITTED the
    queue is then gone (42704); a REPEATABLE READ snapshot still holds it, so 40001."""
    setup, sql = INSERTS[path]
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    job = setup(db, name) if setup else None
    b = session()
    b.execute("SELECT queue.drop_queue(%s, force => true)", (name,))
    a = session()
    a.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
    a.execute("SELECT 1")                                    # its snapshot: before the drop commits
    enqueue = Blocked(a, sql, {"q": name, "job": job})
    enqueue.wait_until_blocked(db)
    b.commit()
    with pytest.raises(psycopg.Error) as e:
        enqueue.join()
    assert e.value.sqlstate == sqlstate
    a.rollback()
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 0


def test_an_enqueue_waits_out_a_drop_that_rolls_back(db, session, name):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    b = session()
    b.execute("SELECT queue.drop_queue(%s, force => true)", (name,))
    a = session()
    enqueue = Blocked(a, "SELECT queue.enqueue(%s)", (name,))
    enqueue.wait_until_blocked(db)
    b.rollback()
    job = enqueue.join()
    a.commit()
    assert scalar(db, "SELECT queue FROM queue.jobs WHERE id = %s", (job,)) == name


def test_a_drop_without_force_refuses_a_job_enqueued_meanwhile(db, session, name):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    a = session()
    scalar(a, "SELECT queue.enqueue(%s)", (name,))
    b = session()
    drop = Blocked(b, "SELECT queue.drop_queue(%s)::text", (name,))
    drop.wait_until_blocked(db)
    a.commit()
    with pytest.raises(psycopg.Error) as e:
        drop.join()
    assert e.value.sqlstate == "55006"
    b.rollback()
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 1


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_drop_queue_needs_read_committed(db, session, name, isolation):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    b = session()
    b.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
    with pytest.raises(psycopg.Error) as e:
        b.execute("SELECT queue.drop_queue(%s, force => true)", (name,))
    assert e.value.sqlstate == "0A000"
    b.rollback()
    assert scalar(db, "SELECT count(*) FROM queue.queues WHERE name = %s", (name,)) == 1


def test_forced_drop_of_a_busy_queue_ends_and_cancels_every_job(db, name):
    """drop_queue(force) while the executor records batches of mixed outcomes: retries
    and successes, whose rows the record locks in two passes. The drop must neither fail
    with a deadlock nor leave a job behind: every job enqueued ends in history exactly
    once, succeeded or cancelled."""
    failures = []
    for rnd in range(8):
        q = f"{name}_{rnd}"
        plpgsql_queue(db, q, "IF (payload->>'n')::int % 2 = 0 THEN RAISE EXCEPTION 'even'; END IF;",
                      concurrency=10000, max_attempts=1000, backoff_base="1 millisecond",
                      backoff_max="1 millisecond")
        db.execute("SELECT count(*) FROM queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('n', g) "
                   "FROM generate_series(1, 3000) g))", (q,))
        wait_for(lambda: scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s", (q,)) > 200,
                 timeout=30, interval=0.005, what="the queue being worked")
        try:
            db.execute("SELECT queue.drop_queue(%s, force => true)", (q,))
        except psycopg.Error as e:
            failures.append((rnd, e.sqlstate, str(e).splitlines()[0]))
            db.execute("SELECT queue.drop_queue(%s, force => true)", (q,))
        wait_for(lambda: scalar(db, "SELECT count(*) = 0 FROM pg_stat_activity WHERE query LIKE %s",
                                (f"pg_queue: queue {q} job%",)), timeout=30, what="the handlers finished")
        assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (q,)) == 0
        assert db.execute("SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE state IN "
                          "('succeeded', 'cancelled')) FROM queue.history WHERE queue = %s",
                          (q,)).fetchone() == (3000, 3000, 3000)
    assert failures == []


def test_forced_drop_during_a_handler_never_leaves_effects_of_a_cancelled_job(db, name):
    """drop_queue(force) takes a running job from its executor. The executor's record then
    moves fewer jobs than it ran and rolls the whole batch back: the job ends cancelled
    without effects (never cancelled with its handler's writes committed)."""
    db.execute(f"CREATE TABLE {name} (job uuid)")
    db.execute(f"""CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN
                     INSERT INTO public.{name} SELECT id FROM queue.current_job(); PERFORM pg_sleep(1);
                   END $$""")
    db.execute("SELECT queue.create_queue(%s, %s)", (name, f"{name}_h(jsonb)"))
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    wait_for(lambda: scalar(db, "SELECT state = 'running' FROM queue.jobs WHERE id = %s", (job,)),
             timeout=30, interval=0.005, what="the job running")
    db.execute("SELECT queue.drop_queue(%s, force => true)", (name,))
    wait_for(lambda: scalar(db, "SELECT count(*) = 0 FROM pg_stat_activity WHERE query LIKE %s",
                            (f"pg_queue: queue {name} job%",)),
             timeout=30, what="the handler finished")
    assert (job_row(db, job)[0], scalar(db, f"SELECT count(*) FROM {name}")) == ("cancelled", 0)

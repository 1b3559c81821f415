"""Unique keys (README "Unique jobs"): one live job per (queue, unique_key), decided by an
index; unique_for extends the key past a success."""
import threading

import psycopg
import pytest

from conftest import in_threads, scalar, sqlstate, wait_for, wait_terminal


def jobs_of_key(db, queue, key):
    """How many jobs the key ever had: live and finished."""
    return scalar(db, """SELECT (SELECT count(*) FROM queue.jobs WHERE queue = %(q)s AND unique_key = %(k)s)
                              + (SELECT count(*) FROM queue.history WHERE queue = %(q)s AND unique_key = %(k)s)""",
                  {"q": queue, "k": key})


def test_a_second_enqueue_returns_the_live_job(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    first = scalar(db, "SELECT queue.enqueue(%s, '{\"n\": 1}', unique_key => 'mail:42')", (name,))
    again = scalar(db, "SELECT queue.enqueue(%s, '{\"n\": 2}', unique_key => 'mail:42')", (name,))
    assert again == first
    assert db.execute("SELECT * FROM queue.enqueue_unique(%s, 'mail:42', '{\"n\": 3}')",
                      (name,)).fetchone() == (first, False)
    other, created = db.execute("SELECT * FROM queue.enqueue_unique(%s, 'mail:43')", (name,)).fetchone()
    assert created and other != first
    # The first payload stands; keys are per queue.
    assert scalar(db, "SELECT payload FROM queue.status(%s)", (first,)) == {"n": 1}
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name + "_2",))
    assert scalar(db, "SELECT queue.enqueue(%s, unique_key => 'mail:42')", (name + "_2",)) != first
    assert scalar(db, "SELECT unique_key FROM queue.job_status WHERE id = %s", (first,)) == "mail:42"


def test_the_key_is_free_once_the_job_is_not_live(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    first = scalar(db, "SELECT queue.enqueue(%s, unique_key => 'k')", (name,))
    assert scalar(db, "SELECT queue.cancel(%s)", (first,)) is True
    second, created = db.execute("SELECT * FROM queue.enqueue_unique(%s, 'k')", (name,)).fetchone()
    assert created and second != first
    # Retrying the cancelled job while the key is live again would make two: refused.
    assert sqlstate(db, "SELECT queue.retry(%s)", (first,)) == "23505"
    assert scalar(db, "SELECT state::text FROM queue.status(%s)", (first,)) == "cancelled"
    assert jobs_of_key(db, name, "k") == 2


def test_one_live_job_under_concurrent_enqueues(cluster, db, name):
    """8 clients enqueue the same key 1 000 times each: one job, and every call returns it."""
    db.execute("SELECT queue.create_queue(%s, notify => true, paused => true)", (name,))
    ids = set()

    def client(_):
        with cluster.connect() as c:
            for _ in range(1000):
                ids.add(scalar(c, "SELECT queue.enqueue(%s, unique_key => 'same')", (name,)))

    in_threads(client, 8)
    assert len(ids) == 1
    assert jobs_of_key(db, name, "same") == 1


def test_unique_for_holds_while_jobs_finish_concurrently(cluster, db, name):
    """A consumer completes the key's job while 8 clients enqueue it with unique_for: the
    job that succeeded is found, never a second one made (the insert-then-look race)."""
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    stop, errors, made, calls = threading.Event(), [], [], [0]

    def producer():
        try:
            with cluster.connect() as c:
                while not stop.is_set():
                    _, created = c.execute("SELECT * FROM queue.enqueue_unique(%s, 'once', unique_for => '1 hour')",
                                           (name,)).fetchone()
                    calls[0] += 1
                    if created:
                        made.append(1)
        except Exception as e:     # reported below
            errors.append(e)

    threads = [threading.Thread(target=producer) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        with cluster.connect() as c:
            job = wait_for(lambda: c.execute("SELECT * FROM queue.claim(%s, 'c', 1)", (name,)).fetchone(),
                           what="the key's job")
            before = calls[0]
            assert c.execute("SELECT queue.complete(%s, %s)", (job[0], job[3])).fetchone() == (True,)
        # The producers run across the completion and well after it.
        wait_for(lambda: calls[0] > before + 500, what="enqueues after the completion")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert made == [1]
    assert jobs_of_key(db, name, "once") == 1


def test_unique_for_counts_successes_only_and_ends(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, max_attempts => 1)", (name,))

    def claim():
        return db.execute("SELECT id, lease_token FROM queue.claim(%s, 'c', 1)", (name,)).fetchone()

    failed = scalar(db, "SELECT queue.enqueue(%s, unique_key => 'a')", (name,))
    assert scalar(db, "SELECT queue.fail(%s, %s, 'boom')", claim()) is True
    # A failed job does not hold its key, even with unique_for.
    done, created = db.execute("SELECT * FROM queue.enqueue_unique(%s, 'a', unique_for => '1 hour')",
                               (name,)).fetchone()
    assert created and done != failed
    assert scalar(db, "SELECT queue.complete(%s, %s)", claim()) is True
    # A success holds it for unique_for; without unique_for only live jobs count.
    assert db.execute("SELECT * FROM queue.enqueue_unique(%s, 'a', unique_for => '1 hour')",
                      (name,)).fetchone() == (done, False)
    live = scalar(db, "SELECT queue.enqueue(%s, unique_key => 'a')", (name,))
    assert live not in (failed, done)
    db.execute("SELECT queue.cancel(%s)", (live,))
    # Once the window has passed, the key makes a new job.
    later = wait_for(lambda: (lambda r: r[1] and r[0])(db.execute(
        "SELECT * FROM queue.enqueue_unique(%s, 'a', unique_for => '0.5 s')", (name,)).fetchone()),
        timeout=10, what="the window to end")
    assert later not in (failed, done, live)
    assert jobs_of_key(db, name, "a") == 4


@pytest.mark.parametrize("call, state", [
    ("SELECT queue.enqueue(%(q)s, unique_for => '1 hour')", "22023"),
    ("SELECT queue.enqueue(%(q)s, unique_key => 'k', unique_for => '-1 s')", "22023"),
    ("SELECT queue.enqueue_unique(%(q)s, NULL)", "22004"),
    ("SELECT queue.enqueue_unique(%(q)s, 'k', NULL)", "22004"),
    ("SELECT queue.enqueue_unique('no_such_queue', 'k')", "42704"),
])
def test_bad_input_changes_nothing(db, name, call, state):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    assert sqlstate(db, call, {"q": name}) == state
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 0


def test_unique_for_needs_read_committed(cluster, db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    with cluster.connect(autocommit=False) as c:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert sqlstate(c, "SELECT queue.enqueue(%s, unique_key => 'k', unique_for => '1 h')",
                        (name,)) == "0A000"
        c.rollback()
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert scalar(c, "SELECT queue.enqueue(%s, unique_key => 'k')", (name,)) is not None
        c.commit()
    assert jobs_of_key(db, name, "k") == 1


def test_keyed_jobs_run_through_handlers(db, name):
    """A handler queue: a keyed job runs once; a second enqueue while it is live adds none."""
    db.execute(f"CREATE TABLE {name}_t (payload jsonb)")
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql "
               f"AS $$ INSERT INTO {name}_t VALUES (payload) $$")
    db.execute("SELECT queue.create_queue(%s, %s, paused => true)", (name, f"public.{name}_h(jsonb)"))
    for i in range(5):
        db.execute("SELECT queue.enqueue(%s, %s, unique_key => 'report')", (name, f'{{"i": {i}}}'))
    db.execute("SELECT queue.resume(%s)", (name,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}
    assert db.execute(f"SELECT payload FROM {name}_t").fetchall() == [({"i": 0},)]


def test_enqueue_many_with_keys(db, name):
    """Keys per payload: a key repeated within the call, or live already, gives that job's
    id again; NULL keys make plain jobs."""
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    live = scalar(db, "SELECT queue.enqueue(%s, unique_key => 'b')", (name,))
    ids = [r[0] for r in db.execute(
        "SELECT queue.enqueue_many(%s, ARRAY['{\"n\": 1}', '{\"n\": 2}', '{\"n\": 3}', '{}', '{}']::jsonb[], "
        "unique_keys => ARRAY['a', 'b', 'a', NULL, NULL])", (name,))]
    assert len(ids) == 5
    assert ids[0] == ids[2] and ids[1] == live
    assert len({ids[0], ids[1], ids[3], ids[4]}) == 4
    assert scalar(db, "SELECT payload FROM queue.status(%s)", (ids[0],)) == {"n": 1}
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 4
    assert sqlstate(db, "SELECT queue.enqueue_many(%s, ARRAY['{}']::jsonb[], unique_keys => ARRAY['x', 'y'])",
                    (name,)) == "22023"
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 4

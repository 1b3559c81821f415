"""Fair share (README "Flow control"): in a fair_share queue claims rotate across the
jobs' fair_keys, so one key's backlog does not hold back another key's jobs, and
key_concurrency caps each key's running jobs, for executors and consumers alike."""
import threading
import time

from conftest import plpgsql_queue, scalar, sqlstate, wait_for, wait_terminal

CLUSTER_SETTINGS = {"queue.max_workers": "2"}


def enqueue_many(db, queue, n, key):
    db.execute("SELECT count(*) FROM queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[%s]), "
               "fair_keys => array_fill(%s::text, ARRAY[%s]))", (queue, n, key, n))


def test_one_keys_backlog_does_not_delay_another_key(db, name):
    """Key A has 20 000 queued jobs; key B enqueues one every 100 ms: each B job starts
    within a batch, never behind A's backlog."""
    plpgsql_queue(db, name, "PERFORM pg_sleep(0.0005);", fair_share=True, concurrency=10000)
    enqueue_many(db, name, 20000, "A")
    wait_for(lambda: scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s", (name,)) > 100,
             what="A's backlog being worked")
    b_jobs = []
    for _ in range(30):
        b_jobs.append(scalar(db, "SELECT queue.enqueue(%s, fair_key => 'B')", (name,)))
        time.sleep(0.1)
    wait_for(lambda: scalar(db, "SELECT count(*) FROM queue.job_status WHERE id = ANY(%s) AND state = 'succeeded'",
                            (b_jobs,)) == 30, what="B's jobs")
    backlog = scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s AND fair_key = 'A'", (name,))
    waits = sorted(r[0] for r in db.execute(
        "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM queue.job_status WHERE id = ANY(%s)",
        (b_jobs,)))
    print(f"\nB's pickup with {backlog} of A's jobs still queued: p50 {waits[15]:.1f} ms, max {waits[-1]:.1f} ms")
    assert backlog > 1000                    # A's backlog was still there at the end
    assert waits[-1] < 100
    db.execute("SELECT queue.drop_queue(%s, force => true)", (name,))


def test_key_concurrency_is_never_exceeded(cluster, db, name):
    plpgsql_queue(db, name, "PERFORM pg_sleep(0.02);", fair_share=True, key_concurrency=2,
                  concurrency=10000, paused=True)
    for key in ("k1", "k2", "k3"):
        enqueue_many(db, name, 30, key)
    enqueue_many(db, name, 10, None)         # no key: the '' share, capped like the others
    most = []
    stop = threading.Event()

    def sample():
        with cluster.connect() as c:
            while not stop.is_set():
                most.append(scalar(c, "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM queue.jobs "
                                      "WHERE queue = %s AND state = 'running' GROUP BY fair_key) x", (name,)))
                time.sleep(0.003)

    sampler = threading.Thread(target=sample)
    sampler.start()
    db.execute("SELECT queue.resume(%s)", (name,))
    try:
        assert wait_terminal(db, name, 100) == {"succeeded": 100}
    finally:
        stop.set()
        sampler.join()
    assert max(most) == 2 and len(most) > 50


def test_consumers_rotate_across_keys_within_the_cap(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, fair_share => true, key_concurrency => 3, "
               "concurrency => 1000)", (name,))
    enqueue_many(db, name, 100, "A")
    b = scalar(db, "SELECT queue.enqueue(%s, fair_key => 'B')", (name,))
    # A claim of 2 visits one key; the next one the next key: B is not behind A's 100.
    got = [r[0] for _ in range(2) for r in db.execute("SELECT id FROM queue.claim(%s, 'c1', 2)", (name,))]
    assert b in got and len(got) == 3        # 2 of A, then B's one
    # A is capped at 3 running: however much is asked, no more of A.
    more = db.execute("SELECT id FROM queue.claim(%s, 'c1', 50)", (name,)).fetchall()
    assert len(got) + len(more) == 4
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s AND state = 'running' AND fair_key = 'A'",
                  (name,)) == 3


def test_turning_fair_share_on_and_off_loses_no_job(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, concurrency => 1000)", (name,))
    db.execute("SELECT count(*) FROM queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[5]))", (name,))
    db.execute("SELECT queue.alter_queue(%s, fair_share => true, key_concurrency => 10)", (name,))
    enqueue_many(db, name, 5, "t1")
    assert scalar(db, "SELECT count(*) FROM queue.claim(%s, 'c', 100)", (name,)) == 10
    job, token = db.execute("SELECT id, lease_token FROM queue.jobs WHERE queue = %s AND fair_key = 't1' LIMIT 1",
                            (name,)).fetchone()
    db.execute("SELECT queue.fail(%s, %s, 'once', retry_in => '0 seconds')", (job, token))
    db.execute("SELECT queue.alter_queue(%s, fair_share => false)", (name,))
    assert db.execute("SELECT fair_share, key_concurrency FROM queue.stats WHERE queue = %s",
                      (name,)).fetchone() == (False, None)
    assert scalar(db, "SELECT count(*) FROM queue.claim(%s, 'c', 100)", (name,)) == 1
    assert scalar(db, "SELECT fair_key FROM queue.status(%s)", (job,)) == "t1"


def test_bad_fair_settings_change_nothing(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    before = db.execute("SELECT * FROM queue.queues ORDER BY name").fetchall()
    for call in ("SELECT queue.create_queue(%(x)s, notify => true, key_concurrency => 2)",
                 "SELECT queue.create_queue(%(x)s, notify => true, fair_share => true, key_concurrency => 0)",
                 "SELECT queue.alter_queue(%(q)s, key_concurrency => 5)",
                 "SELECT queue.enqueue_many(%(q)s, ARRAY['{}', '{}']::jsonb[], fair_keys => ARRAY['a'])"):
        assert sqlstate(db, call, {"q": name, "x": name + "_x"}) == "22023", call
    assert db.execute("SELECT * FROM queue.queues ORDER BY name").fetchall() == before
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 0


def test_multi_queue_claims_serve_fair_queues_by_their_rotation(db, name):
    fair, plain = name + "_f", name + "_p"
    db.execute("SELECT queue.create_queue(%s, notify => true, fair_share => true, key_concurrency => 2, "
               "concurrency => 1000)", (fair,))
    db.execute("SELECT queue.create_queue(%s, notify => true, concurrency => 1000)", (plain,))
    enqueue_many(db, fair, 50, "A")
    enqueue_many(db, fair, 50, "B")
    db.execute("SELECT count(*) FROM queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[3]))", (plain,))
    got = db.execute("SELECT queue FROM queue.claim(ARRAY[%s, %s], 'm', 20)", (fair, plain)).fetchall()
    assert sorted(r[0] for r in got) == [fair] * 4 + [plain] * 3      # 2 per key, the plain queue's 3
    running = dict(db.execute("SELECT fair_key, count(*) FROM queue.jobs WHERE queue = %s AND state = 'running' "
                              "GROUP BY 1", (fair,)).fetchall())
    assert running == {"A": 2, "B": 2}
    assert scalar(db, "SELECT count(*) FROM queue.claim(ARRAY[%s, %s], 'm', 20)", (fair, plain)) == 0

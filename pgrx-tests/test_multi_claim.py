"""claim(queues text[], ...): one consumer serving several NOTIFY queues, in priority order
across them and within each queue's concurrency."""
import collections

import pytest

from conftest import in_threads, scalar, sqlstate


def notify_queue(db, name, **settings):
    args = "".join(f", {k} => %({k})s" for k in settings)
    db.execute(f"SELECT queue.create_queue(%(q)s, notify => true{args})", {"q": name, **settings})


def enqueue(db, queue, n, priority=0):
    return [r[0] for r in db.execute(
        "SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[%s]), priority => %s)",
        (queue, n, priority))]


def claim(db, queues, n, consumer="c"):
    return db.execute("SELECT id, queue, lease_token FROM queue.claim(%s::text[], %s, %s)",
                      (queues, consumer, n)).fetchall()


def test_priority_order_across_queues_and_each_queues_concurrency(db, name):
    a, b, c = name + "_a", name + "_b", name + "_c"
    notify_queue(db, a, concurrency=2)
    notify_queue(db, b)
    notify_queue(db, c)
    enqueue(db, a, 5)
    urgent = enqueue(db, b, 3, priority=-1)
    late = enqueue(db, c, 4, priority=5)
    got = claim(db, [a, b, c], 7)
    # b's urgent jobs first, then a's two (its concurrency), then c's lower-priority ones.
    assert collections.Counter(q for _, q, _ in got) == {b: 3, a: 2, c: 2}
    assert {i for i, q, _ in got if q == b} == set(urgent)
    assert {i for i, q, _ in got if q == c} == set(late[:2])
    # a stays at its limit; the tokens work as with a single-queue claim.
    assert collections.Counter(q for _, q, _ in claim(db, [a, b, c], 10)) == {c: 2}
    for job, _, token in got:
        assert scalar(db, "SELECT queue.complete(%s, %s)", (job, token)) is True
    assert collections.Counter(q for _, q, _ in claim(db, [a, c], 10)) == {a: 2}


def test_paused_queues_are_skipped_and_duplicates_count_once(db, name):
    a, b = name + "_a", name + "_b"
    notify_queue(db, a, paused=True)
    notify_queue(db, b)
    enqueue(db, a, 2)
    enqueue(db, b, 2)
    assert collections.Counter(q for _, q, _ in claim(db, [a, b, b], 10)) == {b: 2}


def test_concurrent_multi_queue_claims_take_each_job_once(cluster, db, name):
    queues = [f"{name}_{i}" for i in range(3)]
    for q in queues:
        notify_queue(db, q, concurrency=1000)
        enqueue(db, q, 300)
    taken = []

    def consumer(i):
        with cluster.connect() as conn:
            order = queues[i % 3:] + queues[:i % 3]     # each names them in its own order
            while rows := claim(conn, order, 25, consumer=f"c{i}"):
                taken.extend(r[0] for r in rows)

    in_threads(consumer, 4)
    assert len(taken) == len(set(taken)) == 900


@pytest.mark.parametrize("queues, code", [
    ("NULL::text[]", "22004"),
    ("ARRAY[NULL]::text[]", "22004"),
    ("'{}'::text[]", "22023"),
    ("ARRAY['no_such_queue']", "42704"),
    ("ARRAY[%(q)s, %(h)s]", "42809"),
])
def test_bad_queue_lists_change_nothing(db, name, queues, code):
    notify_queue(db, name)
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ SELECT 1 $$")
    db.execute("SELECT queue.create_queue(%s, %s)", (name + "_h", f"public.{name}_h(jsonb)"))
    enqueue(db, name, 1)
    params = {"q": name, "h": name + "_h"} if "%(" in queues else None
    assert sqlstate(db, f"SELECT * FROM queue.claim({queues}, 'c')", params) == code
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s AND state = 'running'", (name,)) == 0


def test_consume_privilege_on_every_queue(cluster, db, name):
    a, b = name + "_a", name + "_b"
    notify_queue(db, a)
    notify_queue(db, b)
    enqueue(db, a, 1)
    db.execute(f"CREATE ROLE {name}_w LOGIN")
    db.execute(f"GRANT USAGE ON SCHEMA queue TO {name}_w")
    db.execute("SELECT queue.grant(%s, %s, ARRAY['consume'])", (a, f"{name}_w"))
    with cluster.connect(user=f"{name}_w") as w:
        assert sqlstate(w, "SELECT * FROM queue.claim(%s::text[], 'c')", ([a, b],)) == "42501"
        assert len(claim(w, [a], 5)) == 1

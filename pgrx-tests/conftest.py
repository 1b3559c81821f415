"""Fixtures for the real-cluster suites: one cluster per test module, a connection, and
wait-with-deadline helpers (never bare sleeps)."""
import itertools
import os
import threading
import time

import psycopg

import pytest

from cluster import Cluster

_names = itertools.count(1)


@pytest.fixture(scope="module")
def cluster(request):
    settings = getattr(request.module, "CLUSTER_SETTINGS", {})
    c = Cluster(settings)
    c.start()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_queue")
    yield c
    if request.session.testsfailed and os.environ.get("CI"):
        print(f"\n--- server log of {c.dir} ---\n{c.log_text()[-20000:]}")
    c.destroy()


@pytest.fixture
def db(cluster):
    with cluster.connect() as conn:
        yield conn


@pytest.fixture
def name(request):
    """A queue/table name unique within the run."""
    return f"q_{request.node.name.split('[')[0][5:][:40]}_{next(_names)}"


def wait_for(fn, timeout=60.0, interval=0.02, what="condition"):
    """Polls fn() until it returns a truthy value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def in_threads(fn, n):
    """Runs fn(i) for i in range(n), each in its own thread; re-raises the first failure."""
    errors = []

    def run(i):
        try:
            fn(i)
        except Exception as e:     # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def sqlstate(conn, sql, params=None):
    """The SQLSTATE a statement fails with, or None when it succeeds."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def plpgsql_queue(conn, name, body, columns="n int", **opts):
    """A table `name` (`columns`) and a queue `name` whose procedure handler `name_h` runs
    `body` (PL/pgSQL, `payload` in scope), both created in the caller's first schema."""
    conn.execute(f"CREATE TABLE {name} ({columns})")
    conn.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN {body} END $$")
    args = "".join(f", {k} => %({k})s" for k in opts)
    conn.execute(f"SELECT queue.create_queue(%(q)s, %(h)s{args})",
                 {"q": name, "h": f"{name}_h(jsonb)", **opts})


def scalar(conn, sql, params=None):
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def wait_terminal(conn, queue, n, timeout=60.0):
    """Waits until `n` jobs of `queue` are terminal and none is live; returns state counts."""
    def done():
        live = scalar(conn, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (queue,))
        term = scalar(conn, "SELECT count(*) FROM queue.history WHERE queue = %s", (queue,))
        return live == 0 and term >= n
    wait_for(done, timeout, what=f"{n} terminal jobs in {queue}")
    return dict(conn.execute(
        "SELECT state::text, count(*) FROM queue.history WHERE queue = %s GROUP BY 1",
        (queue,)).fetchall())

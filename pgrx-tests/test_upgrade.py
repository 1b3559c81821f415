"""Upgrading in place (README "Upgrading"). A database at the released 0.1.0 schema (its
install script is kept in sql/releases/) is served by this library, is updated by
`ALTER EXTENSION pg_queue UPDATE` while jobs are enqueued and run, keeps its queues,
schedules, live jobs and history, and ends with the same catalog as a fresh install. A
schema this library does not know is refused, clearly, and served again once it matches.
"""
import filecmp
import glob
import os
import re
import shutil
import subprocess
import threading
import time

import psycopg
import pytest

from cluster import PG_BIN, Cluster
from conftest import scalar, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = "0.1.0"


def current_version():
    with open(os.path.join(REPO, "Cargo.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


def install_released_scripts():
    """Puts the released install scripts next to the installed extension, as a package of
    that release would have (the build installs only its own script and the updates)."""
    share = subprocess.check_output([os.path.join(PG_BIN, "pg_config"), "--sharedir"],
                                    text=True).strip()
    for script in glob.glob(os.path.join(REPO, "sql", "releases", "pg_queue--*.sql")):
        dest = os.path.join(share, "extension", os.path.basename(script))
        if not (os.path.exists(dest) and filecmp.cmp(script, dest, shallow=False)):
            shutil.copyfile(script, dest)


@pytest.fixture(scope="module")
def cluster(request):
    install_released_scripts()
    c = Cluster()
    c.start()
    with c.connect() as conn:
        conn.execute(f"CREATE EXTENSION pg_queue VERSION '{RELEASED}'")
    yield c
    if request.session.testsfailed and os.environ.get("CI"):
        print(f"\n--- server log of {c.dir} ---\n{c.log_text()[-20000:]}")
    c.destroy()


def executors(conn):
    return scalar(conn, "SELECT count(*) FROM pg_stat_activity "
                        "WHERE backend_type = 'pg_queue executor'")


def fill(conn):
    """Something of everything 0.1.0 stores: queues of both kinds, a schedule, a grant,
    history of each outcome, and live jobs queued, scheduled, waiting and claimed."""
    conn.execute("CREATE TABLE done (n int, at_version text)")
    conn.execute("""CREATE PROCEDURE work_h(payload jsonb) LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO done SELECT (payload->>'n')::int, extversion
            FROM pg_extension WHERE extname = 'pg_queue';
        END $$""")
    conn.execute("CREATE PROCEDURE broken_h(payload jsonb) LANGUAGE plpgsql AS $$ "
                 "BEGIN RAISE EXCEPTION 'broken'; END $$")
    conn.execute("SELECT queue.create_queue('work', 'work_h(jsonb)', concurrency => 4)")
    conn.execute("SELECT queue.create_queue('broken', 'broken_h(jsonb)', max_attempts => 1)")
    conn.execute("SELECT queue.create_queue('ext', notify => true, rate_limit => '1000/1s')")
    conn.execute("CREATE ROLE tenant LOGIN")
    conn.execute("GRANT USAGE ON SCHEMA queue TO tenant")
    conn.execute("SELECT queue.grant('work', 'tenant', ARRAY['enqueue', 'read'])")
    conn.execute("SELECT queue.schedule('yearly', '0 0 1 1 *', 'work', '{\"n\": -1}')")
    conn.execute("SELECT queue.enqueue_many('work', array_agg(jsonb_build_object('n', -1 - i))) "
                 "FROM generate_series(1, 200) i")
    conn.execute("SELECT queue.enqueue('broken', '{}')")
    cancelled = scalar(conn, "SELECT queue.enqueue('work', '{\"n\": -999}', run_at => now() + '1 day')")
    conn.execute("SELECT queue.cancel(%s)", (cancelled,))
    wait_for(lambda: scalar(conn, "SELECT count(*) FROM queue.jobs WHERE queue IN ('work', 'broken')") == 0, what="the first jobs finished")
    later = scalar(conn, "SELECT queue.enqueue('work', '{\"n\": -1000}', run_at => now() + '1 day')")
    waiting = scalar(conn, "SELECT queue.enqueue('work', '{\"n\": -1001}', depends_on => ARRAY[%s])",
                     (later,))
    for i in range(3):
        conn.execute("SELECT queue.enqueue('ext', %s)", (psycopg.types.json.Jsonb({"i": i}),))
    claimed = conn.execute("SELECT id, lease_token FROM queue.claim('ext', 'c1', 1, '1 hour')").fetchone()
    return {"later": later, "waiting": waiting, "claimed": claimed}


def snapshot(conn):
    """What an update must keep, as comparable values."""
    q = lambda sql: conn.execute(sql).fetchall()
    return {
        "queues": q("SELECT to_jsonb(q) - 'ready_at' FROM queue.queues q ORDER BY name"),
        "schedules": q("SELECT to_jsonb(s) FROM queue.schedules s ORDER BY name"),
        "grants": q("SELECT * FROM queue.grants ORDER BY 1, 2, 3"),
        "history": q("SELECT id, queue, state::text, attempts, errors FROM queue.history "
                     "WHERE (payload->>'n')::int < 0 OR queue <> 'work' ORDER BY id"),
        "live": q("SELECT id, queue, state::text, attempts, payload FROM queue.jobs "
                  "WHERE queue <> 'work' OR payload->>'n' IN ('-1000', '-1001') ORDER BY id"),
    }


def test_released_schema_is_served_and_updated_under_load(cluster):
    with cluster.connect() as conn:
        assert scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'pg_queue'") == RELEASED
        wait_for(lambda: f'at schema version {RELEASED} with library {current_version()}'
                 in cluster.log_text(), what="the launcher serving the released schema")
        kept = fill(conn)
        before = snapshot(conn)
        assert scalar(conn, "SELECT count(*) FROM done WHERE n <= -1") == 200

        # Load: producers enqueue numbered jobs, each in its own transaction, while the
        # update runs; executors run them throughout.
        stop = threading.Event()
        enqueued = []
        errors = []

        def produce(k):
            try:
                with cluster.connect() as p:
                    i = 0
                    while not stop.is_set():
                        n = k * 1_000_000 + i
                        p.execute("SELECT queue.enqueue('work', jsonb_build_object('n', %s::int))", (n,))
                        enqueued.append(n)
                        i += 1
            except Exception as e:      # re-raised below
                errors.append(e)

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM done WHERE n >= 0") >= 200,
                 what="jobs run on the released schema")
        conn.execute("ALTER EXTENSION pg_queue UPDATE")
        updated_at = len(enqueued)
        wait_for(lambda: len(enqueued) >= updated_at + 300, what="enqueues after the update")
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors

        assert scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'pg_queue'") == current_version()
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM queue.jobs WHERE queue = 'work' "
                                      "AND state <> 'waiting' AND run_at <= now()") == 0,
                 what="the load drained")
        # Every job enqueued ran exactly once, on either side of the update.
        runs = conn.execute("SELECT n, count(*) FROM done WHERE n >= 0 GROUP BY n").fetchall()
        assert sorted(n for n, _ in runs) == sorted(enqueued)
        assert [n for n, c in runs if c > 1] == []
        versions = dict(conn.execute(
            "SELECT at_version, count(*) FROM done WHERE n >= 0 GROUP BY 1").fetchall())
        assert versions.get(RELEASED, 0) > 0 and versions.get(current_version(), 0) > 0, versions
        # Nothing else changed: settings, schedules, grants, history, live jobs.
        after = snapshot(conn)
        for what in before:
            assert after[what] == before[what], what
        assert scalar(conn, "SELECT state::text FROM queue.jobs WHERE id = %s", (kept["waiting"],)) == "waiting"
        # The lease taken before the update still fences its job after it.
        job, token = kept["claimed"]
        conn.execute("SELECT queue.complete(%s, %s, '{\"ok\": true}')", (job, token))
        assert scalar(conn, "SELECT state::text FROM queue.history WHERE id = %s", (job,)) == "succeeded"
        # And the updated schema works as a fresh one: a new job, a role's enqueue.
        with cluster.connect(user="tenant") as t:
            t.execute("SELECT queue.enqueue('work', '{\"n\": -2000}')")
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM done WHERE n = -2000") == 1,
                 what="a job enqueued after the update")


def catalog(cluster, dbname):
    """The extension's objects as pg_dump sees them for pg_upgrade (binary-upgrade mode
    dumps every member object, with its ACL), without the OIDs that differ per database."""
    out = subprocess.run(
        [os.path.join(PG_BIN, "pg_dump"), "--schema-only", "--binary-upgrade",
         "-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres", "-d", dbname],
        check=True, capture_output=True, text=True).stdout
    volatile = re.compile(r"binary_upgrade_|relfrozenxid|^WHERE oid = '\d+'|^\\(un)?restrict |^-- Dumped")
    keep = [line for line in out.splitlines() if not volatile.search(line)]
    return "\n".join(keep)


def test_updated_catalog_equals_a_fresh_install(cluster):
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE updated")
        conn.execute("CREATE DATABASE fresh")
    with cluster.connect(dbname="updated") as conn:
        conn.execute(f"CREATE EXTENSION pg_queue VERSION '{RELEASED}'")
        conn.execute("ALTER EXTENSION pg_queue UPDATE")
    with cluster.connect(dbname="fresh") as conn:
        conn.execute("CREATE EXTENSION pg_queue")
    updated, fresh = catalog(cluster, "updated"), catalog(cluster, "fresh")
    assert "CREATE TABLE queue.jobs" in fresh and "GRANT" in fresh
    if updated != fresh:
        import difflib
        diff = "\n".join(difflib.unified_diff(fresh.splitlines(), updated.splitlines(),
                                              "fresh install", "updated", lineterm="", n=2))
        pytest.fail(f"the updated catalog differs from a fresh install:\n{diff[:20000]}")


def test_a_schema_the_library_does_not_know_is_refused(cluster):
    with cluster.connect() as conn:
        wait_for(lambda: executors(conn) == 2, what="executors")
        version = scalar(conn, "SELECT extversion FROM pg_extension WHERE extname = 'pg_queue'")
        # What a newer release's schema looks like to this library.
        conn.execute("UPDATE pg_extension SET extversion = '99.0.0' WHERE extname = 'pg_queue'")
        try:
            wait_for(lambda: "pg_queue schema version 99.0.0, which library" in cluster.log_text(),
                     what="the launcher's warning")
            wait_for(lambda: executors(conn) == 0, what="executors stopped")
            n = scalar(conn, "SELECT queue.enqueue('work', '{\"n\": -3000}')")
            time.sleep(1)
            assert scalar(conn, "SELECT state::text FROM queue.jobs WHERE id = %s", (n,)) == "queued"
        finally:
            conn.execute("UPDATE pg_extension SET extversion = %s WHERE extname = 'pg_queue'",
                         (version,))
        wait_for(lambda: scalar(conn, "SELECT count(*) FROM done WHERE n = -3000") == 1,
                 what="the job run once the versions match")

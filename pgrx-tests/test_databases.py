"""Several databases (README "Several databases"): one preloaded library serves every
database of the cluster where CREATE EXTENSION pg_queue ran, each with its own scheduler
and its share of queue.max_workers executors; jobs never cross databases; a new database
is served as soon as the extension is created in it; DROP DATABASE, DROP EXTENSION,
templates, the allow-list and databases that refuse connections are respected.
"""
import time

import psycopg

from conftest import scalar, wait_for

# Every database (no allow-list); 4 executors for the cluster.
CLUSTER_SETTINGS = {"queue.databases": "''", "queue.max_workers": "4",
                    "max_worker_processes": "32"}  # launcher + a scheduler and executor per database


def processes(db, kind):
    """{database: count} of pg_queue processes of one kind ('scheduler', 'executor')."""
    return dict(db.execute("SELECT datname, count(*) FROM pg_stat_activity "
                           "WHERE backend_type = %s GROUP BY 1", (f"pg_queue {kind}",)).fetchall())


def make_database(cluster, name, extension=True):
    with cluster.connect() as c:
        c.execute(f'CREATE DATABASE "{name}"')
    if extension:
        with cluster.connect(dbname=name) as c:
            c.execute("CREATE EXTENSION pg_queue")


def make_queue(conn, handler_body="INSERT INTO public.ran SELECT current_database(), payload"):
    conn.execute("CREATE TABLE ran (db text, payload jsonb)")
    conn.execute(f"CREATE PROCEDURE h(payload jsonb) LANGUAGE sql AS $$ {handler_body} $$")
    conn.execute("SELECT queue.create_queue('q', 'h(jsonb)')")


def drained(conn, n):
    return scalar(conn, "SELECT count(*) FROM queue.history WHERE queue = 'q' AND state = 'succeeded'") >= n


def test_every_database_with_the_extension_is_served_and_jobs_stay_in_theirs(cluster, db):
    make_database(cluster, "alpha")
    make_database(cluster, "beta")
    make_database(cluster, "gamma", extension=False)
    names = ["postgres", "alpha", "beta"]
    conns = {n: cluster.connect(dbname=n) for n in names}
    try:
        for n, c in conns.items():
            make_queue(c)
            c.execute("SELECT queue.enqueue_many('q', array_agg(jsonb_build_object('from', %s::text, 'i', i))) "
                      "FROM generate_series(1, 200) i", (n,))
        for n, c in conns.items():
            wait_for(lambda: drained(c, 200), what=f"the jobs of {n}")
            # Each job ran in the database it was enqueued in, once.
            rows = c.execute("SELECT db, payload->>'from', count(*), count(DISTINCT payload->>'i') "
                             "FROM ran GROUP BY 1, 2").fetchall()
            assert rows == [(n, n, 200, 200)], n
        # One scheduler per database with the extension, none where it is not.
        wait_for(lambda: processes(db, "scheduler") == {"postgres": 1, "alpha": 1, "beta": 1},
                 what="one scheduler per database")
        # queue.max_workers = 4 shared by three databases: 2, 1, 1 (by oid), never more.
        oids = [n for n, in db.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s) "
                                       "ORDER BY oid", (names,)).fetchall()]
        wait_for(lambda: processes(db, "executor") == {oids[0]: 2, oids[1]: 1, oids[2]: 1},
                 what="executors shared 2/1/1")
    finally:
        for c in conns.values():
            c.close()


def test_create_extension_in_a_new_database_is_served_at_once(cluster, db):
    make_database(cluster, "delta", extension=False)
    with cluster.connect(dbname="delta") as c:
        started = time.monotonic()
        c.execute("CREATE EXTENSION pg_queue")
        make_queue(c)
        c.execute("SELECT queue.enqueue('q', '{\"first\": true}')")
        wait_for(lambda: drained(c, 1), timeout=30, interval=0.01, what="the first job of a new database")
        print(f"\nfirst job after CREATE EXTENSION: {time.monotonic() - started:.3f} s")
        assert scalar(c, "SELECT count(*) FROM ran") == 1


def test_create_extension_right_after_create_database_is_served(cluster, db):
    """The launcher probes a new database while CREATE EXTENSION commits there: the probe
    must look again rather than record the database as without the extension."""
    for i in range(4):
        make_database(cluster, f"race{i}")     # CREATE DATABASE, then CREATE EXTENSION at once
    for i in range(4):
        with cluster.connect(dbname=f"race{i}") as c:
            make_queue(c)
            c.execute("SELECT queue.enqueue('q')")
            wait_for(lambda: drained(c, 1), what=f"a job in race{i}")
    for i in range(4):
        db.execute(f"DROP DATABASE race{i}")


def test_drop_database_with_executors_connected_succeeds(cluster, db):
    make_database(cluster, "epsilon")
    with cluster.connect(dbname="epsilon") as c:
        make_queue(c, "SELECT pg_sleep(0.5); INSERT INTO public.ran SELECT current_database(), payload")
        c.execute("SELECT queue.enqueue_many('q', array_fill('{}'::jsonb, ARRAY[20]))")
        wait_for(lambda: scalar(c, "SELECT count(*) FROM ran") > 0, what="jobs running in epsilon")
    assert processes(db, "executor").get("epsilon", 0) >= 1
    started = time.monotonic()
    db.execute("DROP DATABASE epsilon")
    print(f"\nDROP DATABASE with executors connected: {time.monotonic() - started:.3f} s")
    assert scalar(db, "SELECT count(*) FROM pg_database WHERE datname = 'epsilon'") == 0
    assert "epsilon" not in processes(db, "scheduler") and "epsilon" not in processes(db, "executor")


def test_drop_extension_stops_its_workers_and_create_brings_them_back(cluster, db):
    make_database(cluster, "zeta")
    with cluster.connect(dbname="zeta") as c:
        wait_for(lambda: processes(db, "scheduler").get("zeta") == 1, what="zeta served")
        c.execute("DROP EXTENSION pg_queue")
        wait_for(lambda: "zeta" not in processes(db, "scheduler") and "zeta" not in processes(db, "executor"),
                 what="zeta's workers gone")
        c.execute("CREATE EXTENSION pg_queue")
        make_queue(c)
        c.execute("SELECT queue.enqueue('q')")
        wait_for(lambda: drained(c, 1), what="a job after CREATE EXTENSION again")


def test_templates_refused_connections_and_the_allow_list_are_respected(cluster, db):
    make_database(cluster, "eta")
    with cluster.connect(dbname="eta") as c:
        make_queue(c)
    wait_for(lambda: processes(db, "scheduler").get("eta") == 1, what="eta served")
    # A template is not served, and can be copied (it needs to be free of sessions), copy
    # and all: the copy has the extension and is served.
    db.execute("ALTER DATABASE eta IS_TEMPLATE true")
    wait_for(lambda: "eta" not in processes(db, "scheduler"), what="the template left alone")
    db.execute("CREATE DATABASE theta TEMPLATE eta")
    with cluster.connect(dbname="theta") as c:
        c.execute("SELECT queue.enqueue('q', '{\"in\": \"theta\"}')")
        wait_for(lambda: drained(c, 1), what="a job in the copy of a template")
        assert scalar(c, "SELECT db FROM ran") == "theta"
    time.sleep(1.5)
    assert "eta" not in processes(db, "scheduler")
    # A database that refuses connections is not served.
    db.execute("ALTER DATABASE theta ALLOW_CONNECTIONS false")
    wait_for(lambda: "theta" not in processes(db, "scheduler"), what="theta left alone")
    db.execute("ALTER DATABASE theta ALLOW_CONNECTIONS true")
    wait_for(lambda: processes(db, "scheduler").get("theta") == 1, what="theta served again")
    # The allow-list.
    db.execute("ALTER SYSTEM SET queue.databases = 'postgres, theta'")
    db.execute("SELECT pg_reload_conf()")
    try:
        wait_for(lambda: set(processes(db, "scheduler")) == {"postgres", "theta"},
                 what="only the allowed databases served")
        wait_for(lambda: set(processes(db, "executor")) <= {"postgres", "theta"}, what="executors too")
    finally:
        db.execute("ALTER SYSTEM RESET queue.databases")
        db.execute("SELECT pg_reload_conf()")
    wait_for(lambda: processes(db, "scheduler").get("alpha") == 1, what="alpha served again")


def test_a_rename_waits_for_nothing(cluster, db):
    """ALTER DATABASE ... RENAME needs the database to itself, like DROP."""
    make_database(cluster, "iota")
    wait_for(lambda: processes(db, "scheduler").get("iota") == 1, what="iota served")
    db.execute("ALTER DATABASE iota RENAME TO kappa")
    wait_for(lambda: processes(db, "scheduler").get("kappa") == 1, timeout=60, what="kappa served")
    try:
        db.execute("DROP DATABASE kappa")
    except psycopg.Error as e:
        raise AssertionError(f"DROP DATABASE failed: {e}")

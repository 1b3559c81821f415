"""Graceful shutdown within queue.shutdown_timeout, and settings applied on reload."""
import os
import shutil
import subprocess
import time

from cluster import Cluster
from conftest import scalar, wait_for, wait_terminal


def executors(db):
    return scalar(db, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_queue executor'")


def set_and_reload(db, setting, value):
    db.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
    db.execute("SELECT pg_reload_conf()")


def make(db, name, seconds, timeout="60 s"):
    db.execute(f"CREATE TABLE {name} (job uuid, attempt int)")
    db.execute(f"""CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN
                     INSERT INTO {name} SELECT id, attempt FROM queue.current_job();
                     PERFORM pg_sleep({seconds}); END $$""")
    db.execute("SELECT queue.create_queue(%s, %s, timeout => %s)", (name, f"{name}_h(jsonb)", timeout))


def wait_running(cluster, db, name, job):
    wait_for(lambda: scalar(db, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s",
                            (f"pg_queue: queue {name} job {job}%",)) == 1, what="handler running")


def test_max_workers_applies_on_reload(db):
    wait_for(lambda: executors(db) == 2, timeout=20, what="two executors")
    set_and_reload(db, "queue.max_workers", 1)
    wait_for(lambda: executors(db) == 1, timeout=20, what="one executor")
    set_and_reload(db, "queue.max_workers", 3)
    wait_for(lambda: executors(db) == 3, timeout=20, what="three executors")
    set_and_reload(db, "queue.max_workers", 2)
    wait_for(lambda: executors(db) == 2, timeout=20, what="two executors")


def stop_with_job_in_flight(cluster, name, seconds, grace):
    """Starts a job whose handler sleeps `seconds`, stops the server (fast) while it runs
    with queue.shutdown_timeout = grace, starts it again. Returns (job, stop duration)."""
    with cluster.connect() as db:
        set_and_reload(db, "queue.shutdown_timeout", grace)
        make(db, name, seconds)
        job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
        wait_running(cluster, db, name, job)
    t0 = time.monotonic()
    cluster.stop(mode="fast")
    took = time.monotonic() - t0
    cluster.start()
    return job, took


def test_stop_lets_a_short_job_finish(cluster, name):
    job, took = stop_with_job_in_flight(cluster, name, 1.0, "10s")
    with cluster.connect() as db:
        # Finished during shutdown: one attempt, effects committed once.
        st = db.execute("SELECT state::text, attempts FROM queue.status(%s)", (job,)).fetchone()
        assert st == ("succeeded", 1), st
        assert scalar(db, f"SELECT count(*) FROM {name}") == 1
    assert took < 10, took
    print(f"\nfast shutdown with a 1 s job in flight took {took:.2f} s")


def test_stop_abandons_a_long_job_after_the_grace_period(cluster, name):
    job, took = stop_with_job_in_flight(cluster, name, 5.0, "300ms")
    assert took < 4, took  # did not wait for the 5 s handler
    with cluster.connect() as db:
        wait_terminal(db, name, 1, timeout=60)
        st = db.execute("SELECT state::text, attempts, errors->0->>'message' FROM queue.status(%s)",
                        (job,)).fetchone()
        assert st == ("succeeded", 2, "executor died"), st
        # The abandoned attempt's insert rolled back; the second one committed.
        assert db.execute(f"SELECT attempt FROM {name}").fetchall() == [(2,)]
        set_and_reload(db, "queue.shutdown_timeout", "5s")
    print(f"\nfast shutdown with a 5 s job in flight (grace 300 ms) took {took:.2f} s")


def test_standby_runs_nothing_until_promoted(cluster, name):
    with cluster.connect() as db:
        make(db, name, 0)
        db.execute("SELECT queue.pause(%s)", (name,))
        db.execute("SELECT queue.enqueue(%s)", (name,))
        db.execute("CHECKPOINT")
    standby = Cluster({"hot_standby": "on"})
    try:
        shutil.rmtree(standby.data)
        cmd = ["/usr/lib/postgresql/15/bin/pg_basebackup", "-h", cluster.dir, "-p", str(cluster.port),
               "-U", "postgres", "-D", standby.data, "-R", "-X", "stream"]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        subprocess.run(cmd, check=True)
        with open(os.path.join(standby.data, "postgresql.conf"), "a") as f:
            for k, v in standby.settings.items():
                f.write(f"{k} = {v}\n")
        standby.start()
        with standby.connect() as sdb:
            assert scalar(sdb, "SELECT pg_is_in_recovery()") is True
            # Give a would-be launcher its chance: the standby is up and replaying.
            wait_for(lambda: scalar(sdb, "SELECT count(*) FROM pg_stat_activity "
                                         "WHERE backend_type = 'walreceiver'") == 1, what="walreceiver")
            assert scalar(sdb, "SELECT count(*) FROM pg_stat_activity "
                               "WHERE backend_type LIKE 'pg_queue%'") == 0
            sdb.execute("SELECT pg_promote()")
            wait_for(lambda: scalar(sdb, "SELECT count(*) FROM pg_stat_activity "
                                         "WHERE backend_type = 'pg_queue executor'") == 2,
                     timeout=30, what="executors after promotion")
            sdb.execute("SELECT queue.resume(%s)", (name,))
            wait_terminal(sdb, name, 1)
    finally:
        standby.destroy()

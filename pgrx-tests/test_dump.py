"""pg_dump and restore keep what users made: queues, schedules and live jobs."""
import os
import subprocess

from cluster import PG_BIN
from conftest import scalar, wait_for


def test_dump_and_restore_keeps_queues_schedules_and_live_jobs(cluster, db, name, tmp_path):
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN END $$")
    db.execute("SELECT queue.create_queue(%s, %s, paused => true, max_attempts => 7)",
               (name, f"{name}_h(jsonb)"))
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{\"k\": 1}'::jsonb, ARRAY[3]))", (name,))
    db.execute("SELECT queue.schedule(%s, '0 3 * * *', %s, time_zone => 'Europe/Paris')", (name, name))
    # The launcher makes partitions beyond those of CREATE EXTENSION; make one the same way.
    db.execute("SELECT queue.create_history_partitions(5)")
    wait_for(lambda: scalar(db, "SELECT count(*) FROM pg_inherits "
                                "WHERE inhparent = 'queue.history'::regclass") >= 6,
             timeout=10, what="partitions ahead")
    dump = tmp_path / "dump.sql"
    conn = ["-h", cluster.dir, "-p", str(cluster.port), "-U", "postgres"]
    subprocess.run([f"{PG_BIN}/pg_dump", *conn, "-d", "postgres", "-f", str(dump)], check=True)
    db.execute("CREATE DATABASE restored")
    subprocess.run([f"{PG_BIN}/psql", *conn, "-d", "restored", "-v", "ON_ERROR_STOP=1", "-q",
                    "-f", str(dump)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PGOPTIONS": "-c client_min_messages=warning"})
    with cluster.connect(dbname="restored") as r:
        assert r.execute("SELECT handler, max_attempts, paused FROM queue.queues WHERE name = %s",
                         (name,)).fetchone() == (f"public.{name}_h(jsonb)", 7, True)
        assert scalar(r, "SELECT count(*) FROM queue.jobs WHERE queue = %s AND payload = '{\"k\": 1}'",
                      (name,)) == 3
        assert r.execute("SELECT cron, time_zone FROM queue.schedules WHERE name = %s",
                         (name,)).fetchone() == ("0 3 * * *", "Europe/Paris")

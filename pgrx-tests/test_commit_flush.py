"""An executor commits a batch without waiting for the disk and flushes it right after
(docs/design.md "Commit, then flush"): the claim must still be on disk before the handler
runs. Here nothing else flushes WAL for the executor: the WAL writer sleeps 10 s between
rounds, maintenance runs once an hour, and only one executor works. A handler that kills
its own backend (a crash restart of the cluster, which loses WAL not yet written) must
still find its attempt counted: after max_attempts crashes the job has failed. Were the
claim lost with the crash, the job would be claimed again at attempt 1, for ever."""
from conftest import wait_for

CLUSTER_SETTINGS = {"queue.max_workers": "1", "restart_after_crash": "on", "wal_writer_delay": "'10s'",
                    "queue.maintenance_interval": "'1h'", "autovacuum": "off"}


def status(cluster, job):
    try:
        with cluster.connect() as c:
            return c.execute("SELECT state::text, attempts, last_error FROM queue.status(%s)", (job,)).fetchone()
    except Exception:  # the cluster is restarting
        return None


def test_a_claim_is_on_disk_before_its_handler_runs(cluster, name):
    with cluster.connect() as c:
        c.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN "
                  "COPY (SELECT 1) TO PROGRAM 'kill -9 $PPID'; END $$")
        c.execute("SELECT queue.create_queue(%s, %s, max_attempts => 3, backoff_base => '10 ms', "
                  "backoff_max => '10 ms')", (name, f"{name}_h(jsonb)"))
        job = c.execute("SELECT queue.enqueue(%s)", (name,)).fetchone()[0]
    final = wait_for(lambda: (s := status(cluster, job)) and s[0] == "failed" and s,
                     timeout=120, interval=0.2, what="the crashing job to fail after 3 attempts")
    assert final == ("failed", 3, "executor died")
    # One crash per attempt: none was lost and run again.
    assert cluster.log_text().count("was terminated by signal 9") == 3

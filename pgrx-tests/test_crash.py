"""Crashes: kill -9 of an executor, of the launcher, and an immediate shutdown, with jobs
in flight. Every job must end terminal, and a SQL handler's effects must exist exactly
once per succeeded job (none for a failed one)."""
import random
import time

import psycopg

from conftest import wait_for

CLUSTER_SETTINGS = {"queue.max_workers": "2", "restart_after_crash": "on"}


def q(cluster, sql, params=None):
    """One statement on a fresh connection (connections die with a crash restart)."""
    with cluster.connect() as c:
        row = c.execute(sql, params).fetchone()
        return None if row is None else row[0]


def setup_queue(cluster, name, body="PERFORM pg_sleep(0.005);"):
    with cluster.connect() as c:
        c.execute(f"CREATE TABLE {name} (job uuid, attempt int)")
        # The job's advisory lock is held until its executor commits the batch (or dies):
        # a second owner running the job at the same time could not take it.
        c.execute(f"""CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN
                        IF NOT pg_try_advisory_xact_lock(hashtextextended((SELECT id::text FROM queue.current_job()), 0)) THEN
                            RAISE EXCEPTION 'two owners';
                        END IF;
                        INSERT INTO {name} SELECT id, attempt FROM queue.current_job();
                        {body} END $$""")
        c.execute("SELECT queue.create_queue(%s, %s, max_attempts => 50, "
                  "backoff_base => '10 ms', backoff_max => '100 ms')", (name, f"{name}_h(jsonb)"))


def workers(cluster, kind):
    with cluster.connect() as c:
        return [r[0] for r in c.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = %s", (f"pg_queue {kind}",))]


def wait_all_terminal(cluster, name, total, timeout=180):
    def done():
        try:
            return q(cluster, "SELECT count(*) FROM queue.history WHERE queue = %s", (name,)) == total \
                and q(cluster, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 0
        except Exception:
            return False
    wait_for(done, timeout, interval=0.1, what=f"all {total} jobs of {name} terminal")


def assert_exactly_once(cluster, name, total):
    with cluster.connect() as c:
        states = dict(c.execute("SELECT state::text, count(*) FROM queue.history WHERE queue = %s "
                                "GROUP BY 1", (name,)).fetchall())
        assert sum(states.values()) == total
        # One committed handler run per succeeded job, none for any other.
        bad = c.execute(f"""
            SELECT h.id, h.state, count(t.job) FROM queue.history h LEFT JOIN {name} t ON t.job = h.id
             WHERE h.queue = %s
             GROUP BY h.id, h.state
            HAVING count(t.job) <> CASE WHEN h.state = 'succeeded' THEN 1 ELSE 0 END""",
                        (name,)).fetchall()
        assert bad == []
        # No job ever ran on two owners at once.
        assert c.execute("SELECT count(*) FROM queue.history WHERE queue = %s "
                         "AND errors::text LIKE '%%two owners%%'", (name,)).fetchone()[0] == 0
        # The committed run is the job's last attempt: no earlier attempt's effects survived.
        assert c.execute(f"SELECT count(*) FROM {name} t JOIN queue.history h ON h.id = t.job "
                         "WHERE t.attempt <> h.attempts").fetchone()[0] == 0
        return states


def wait_for_running(cluster, name):
    wait_for(lambda: q(cluster, "SELECT count(*) FROM queue.jobs WHERE queue = %s "
                                "AND state = 'running'", (name,)) > 0,
             timeout=60, interval=0.005, what="a running job")


def enqueue(cluster, name, n):
    q(cluster, "SELECT count(*) FROM queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('i', i) "
               "FROM generate_series(1, %s) i))", (name, n))


def kill_and_recover(cluster, pid=None, stop_immediate=False):
    """kill -9 `pid` (or stop -m immediate + start); returns seconds until the jobs that were
    running at the kill are all back in queued or terminal, and new executors run."""
    old = set(workers(cluster, "executor"))
    killed_at = q(cluster, "SELECT clock_timestamp()")
    t0 = time.monotonic()
    if stop_immediate:
        cluster.stop(mode="immediate")
        cluster.start()
    else:
        cluster.kill9(pid)

    def recovered():
        try:
            new = set(workers(cluster, "executor"))
            stuck = q(cluster, "SELECT count(*) FROM queue.jobs WHERE state = 'running' "
                               "AND started_at < %s", (killed_at,))
            return len(new) == 2 and not (new & old) and stuck == 0
        except psycopg.OperationalError:  # still restarting
            return False
    wait_for(recovered, timeout=60, interval=0.01, what="recovery")
    return time.monotonic() - t0


def test_kill_9_executor_20_rounds(cluster, name):
    setup_queue(cluster, name)
    rounds, per_round = 20, 200
    recoveries = []
    for _ in range(rounds):
        enqueue(cluster, name, per_round)
        wait_for_running(cluster, name)
        recoveries.append(kill_and_recover(cluster, random.choice(workers(cluster, "executor"))))
    wait_all_terminal(cluster, name, rounds * per_round)
    states = assert_exactly_once(cluster, name, rounds * per_round)
    assert states == {"succeeded": rounds * per_round}
    reaped = q(cluster, "SELECT count(*) FROM queue.history WHERE queue = %s AND errors @> "
                        "'[{\"message\": \"executor died\"}]'", (name,))
    assert reaped > 0  # the kills did hit jobs in flight
    recoveries.sort()
    print(f"\nkill -9 executor: jobs in flight recovered and executors back in median "
          f"{recoveries[len(recoveries) // 2]:.2f} s, max {recoveries[-1]:.2f} s; {reaped} jobs reaped")


def test_kill_9_launcher(cluster, name):
    setup_queue(cluster, name)
    for _ in range(3):
        enqueue(cluster, name, 200)
        wait_for_running(cluster, name)
        kill_and_recover(cluster, workers(cluster, "launcher")[0])
    wait_all_terminal(cluster, name, 600)
    assert assert_exactly_once(cluster, name, 600) == {"succeeded": 600}


def test_immediate_shutdown_and_restart(cluster, name):
    setup_queue(cluster, name)
    for _ in range(3):
        enqueue(cluster, name, 200)
        wait_for_running(cluster, name)
        kill_and_recover(cluster, stop_immediate=True)
    wait_all_terminal(cluster, name, 600)
    assert assert_exactly_once(cluster, name, 600) == {"succeeded": 600}


def test_poison_handler_crashing_its_backend_ends_failed(cluster, name):
    """A handler that kills its own process with SIGKILL (a crash restart of the whole
    cluster, each time) is failed after max_attempts instead of crash-looping, because the
    attempt is counted when the job is claimed; other queues keep working."""
    with cluster.connect() as c:
        c.execute(f"CREATE PROCEDURE {name}_poison(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN "
                  "COPY (SELECT 1) TO PROGRAM 'kill -9 $PPID'; END $$")
        c.execute("SELECT queue.create_queue(%s, %s, max_attempts => 3, "
                  "backoff_base => '10 ms', backoff_max => '10 ms')",
                  (name + "_poison", f"{name}_poison(jsonb)"))
    setup_queue(cluster, name)
    enqueue(cluster, name, 100)
    # Last: from here on the cluster crashes under our feet until the job has failed.
    poison = q(cluster, "SELECT queue.enqueue(%s)", (name + "_poison",))
    wait_all_terminal(cluster, name + "_poison", 1, timeout=120)
    wait_all_terminal(cluster, name, 100, timeout=120)
    with cluster.connect() as c:
        st = c.execute("SELECT state::text, attempts, last_error FROM queue.status(%s)",
                       (poison,)).fetchone()
    assert st == ("failed", 3, "executor died")
    assert assert_exactly_once(cluster, name, 100) == {"succeeded": 100}


def test_kill_9_while_dependencies_finish(cluster, name):
    """Executors killed while parents finish and release their dependents: every dependent
    runs exactly once, after all its parents, and none is left waiting."""
    setup_queue(cluster, name)
    setup_queue(cluster, name + "_c")
    rounds, groups, parents = 5, 10, 20
    for _ in range(rounds):
        with cluster.connect() as c:
            for _ in range(groups):
                ids = [r[0] for r in c.execute(
                    "SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[%s]))", (name, parents))]
                c.execute("SELECT queue.enqueue(%s, depends_on => %s)", (name + "_c", ids))
        wait_for_running(cluster, name)
        kill_and_recover(cluster, random.choice(workers(cluster, "executor")))
    wait_all_terminal(cluster, name, rounds * groups * parents)
    wait_all_terminal(cluster, name + "_c", rounds * groups)
    assert assert_exactly_once(cluster, name, rounds * groups * parents) == \
        {"succeeded": rounds * groups * parents}
    assert assert_exactly_once(cluster, name + "_c", rounds * groups) == {"succeeded": rounds * groups}
    with cluster.connect() as c:
        early = c.execute("""
            SELECT count(*) FROM queue.history child, unnest(child.depends_on) p(id)
              JOIN queue.history parent ON parent.id = p.id
             WHERE child.queue = %s AND child.started_at < parent.finished_at""",
                          (name + "_c",)).fetchone()[0]
        assert early == 0
        assert c.execute("SELECT count(*) FROM queue.job_dependents").fetchone()[0] == 0

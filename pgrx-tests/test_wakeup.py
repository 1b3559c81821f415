"""Idle executors are woken by a committed enqueue, not by the poll fallback."""
from conftest import scalar, wait_for, wait_terminal

# A poll fallback this long makes a missing wake-up show as a ~60 s pickup.
CLUSTER_SETTINGS = {"queue.poll_interval": "'60s'"}


def test_idle_pickup_is_far_below_the_poll_interval(db, name):
    db.execute(f"CREATE TABLE {name} (id uuid, started timestamptz)")
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ "
               f"INSERT INTO {name} SELECT id, clock_timestamp() FROM queue.current_job() $$")
    db.execute("SELECT queue.create_queue(%s, %s)", (name, f"{name}_h(jsonb)"))
    # Executors start once the launcher sees the extension; then let them go idle.
    wait_for(lambda: scalar(db, "SELECT count(*) FROM pg_stat_activity "
                                "WHERE backend_type = 'pg_queue executor' AND state = 'idle'") == 2,
             what="2 idle executors")
    latencies = []
    for i in range(20):
        # Enqueue commit time ~ clock_timestamp() at the end of the autocommit statement.
        committed = scalar(db, "SELECT clock_timestamp() FROM (SELECT queue.enqueue(%s)) e", (name,))
        wait_terminal(db, name, i + 1, timeout=30)
        started = scalar(db, f"SELECT max(started) FROM {name}")
        latencies.append((started - committed).total_seconds())
    latencies.sort()
    print(f"idle pickup latency: p50 {latencies[10]*1000:.2f} ms, max {latencies[-1]*1000:.2f} ms")
    assert latencies[-1] < 5.0, latencies  # a missed wake-up would wait for the 60 s poll


def test_a_paused_queue_wakes_nobody_until_resumed(cluster, db, name):
    """Enqueues into a paused queue neither wake executors nor notify consumers (they
    could claim nothing); resume() does both."""
    import psycopg
    from psycopg import sql
    db.execute("SELECT queue.create_queue(%s, notify => true, paused => true)", (name,))
    with psycopg.connect(cluster.dsn(), autocommit=True) as listener:
        channel = scalar(listener, "SELECT queue.channel(%s)", (name,))
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        db.execute("SELECT queue.enqueue(%s)", (name,))
        db.execute("SELECT count(*) FROM queue.enqueue_many(%s, ARRAY['{}', '{}']::jsonb[])", (name,))
        assert list(listener.notifies(timeout=0.5)) == []
        db.execute("SELECT queue.resume(%s)", (name,))
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == [""]
    # Executors: a job enqueued while paused starts at resume, not at the 60 s poll.
    db.execute(f"CREATE TABLE {name}_t (at timestamptz)")
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ "
               f"INSERT INTO {name}_t VALUES (clock_timestamp()) $$")
    db.execute("SELECT queue.create_queue(%s, %s, paused => true)", (name + "_e", f"{name}_h(jsonb)"))
    db.execute("SELECT queue.enqueue(%s)", (name + "_e",))
    resumed = scalar(db, "SELECT clock_timestamp() FROM (SELECT queue.resume(%s)) r", (name + "_e",))
    wait_terminal(db, name + "_e", 1, timeout=30)
    assert (scalar(db, f"SELECT at FROM {name}_t") - resumed).total_seconds() < 5

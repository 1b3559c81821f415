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

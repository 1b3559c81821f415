"""Metrics (README "Monitoring"): per-minute rollups equal the history they summarize,
their percentiles are exact, queue.stats reads them, queue.prometheus_metrics() is valid
Prometheus text (prometheus_client's parser, and node_exporter's textfile collector), and
the postgres_exporter configuration in docs/monitoring works against a real exporter.
"""
import math
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import plpgsql_queue, scalar, wait_for, wait_terminal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENTS = ["enqueued", "started", "succeeded", "failed", "retried", "cancelled"]


def roll_up(conn):
    """What the launcher does once a minute, here up to now (the current minute is rolled
    up as far as it went, and again later)."""
    conn.execute("SELECT queue.roll_up_metrics(clock_timestamp())")


def rolled(conn, queue):
    row = conn.execute(
        f"SELECT {', '.join(f'coalesce(sum({e}), 0)' for e in EVENTS)} "
        "FROM queue.metrics WHERE queue = %s", (queue,)).fetchone()
    return dict(zip(EVENTS, row))


def from_history(conn, queue):
    """The same counts, straight from history (every job here is finished)."""
    row = conn.execute("""
        SELECT count(*),
               count(h.started_at)    -- the last attempt, and every retried one before it
                 + coalesce(sum((SELECT count(*) FROM jsonb_array_elements(h.errors) e
                                  WHERE e ? 'started_at' AND (e->>'attempt')::int < h.attempts)), 0),
               count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE state = 'failed'),
               coalesce(sum((SELECT count(*) FROM jsonb_array_elements(h.errors) e
                              WHERE e ? 'started_at' AND (e->>'attempt')::int < h.attempts)), 0),
               count(*) FILTER (WHERE state = 'cancelled')
          FROM queue.history h WHERE h.queue = %s""", (queue,)).fetchone()
    return dict(zip(EVENTS, map(int, row)))


def percentile_disc(values, p):
    """Postgres' percentile_disc: the first value whose cumulative fraction reaches p."""
    values = sorted(values)
    return values[max(0, math.ceil(p * len(values)) - 1)]


def test_rollup_counts_equal_history_and_percentiles_are_exact(db, name):
    ok, flaky, broken, later = (f"{name}_{s}" for s in ("ok", "flaky", "broken", "later"))
    plpgsql_queue(db, ok, f"INSERT INTO {ok} VALUES ((payload->>'n')::int); PERFORM pg_sleep((payload->>'n')::int / 10000.0);")
    plpgsql_queue(db, flaky, f"""IF (SELECT attempt FROM queue.current_job()) < 2 THEN
                                   RAISE EXCEPTION 'first attempt fails'; END IF;
                                 INSERT INTO {flaky} VALUES (1);""", backoff_base="10 ms")
    plpgsql_queue(db, broken, "RAISE EXCEPTION 'always';", max_attempts=2, backoff_base="10 ms")
    plpgsql_queue(db, later, f"INSERT INTO {later} VALUES (1);")
    db.execute("SELECT queue.enqueue_many(%s, array_agg(jsonb_build_object('n', i))) "
               "FROM generate_series(1, 50) i", (ok,))
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[20]))", (flaky,))
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[10]))", (broken,))
    for _ in range(5):
        job = scalar(db, "SELECT queue.enqueue(%s, '{}', run_at => now() + '1 day')", (later,))
        db.execute("SELECT queue.cancel(%s)", (job,))
    wait_terminal(db, ok, 50)
    wait_terminal(db, flaky, 20)
    wait_terminal(db, broken, 10)

    roll_up(db)
    expected = {
        ok: dict(enqueued=50, started=50, succeeded=50, failed=0, retried=0, cancelled=0),
        flaky: dict(enqueued=20, started=40, succeeded=20, failed=0, retried=20, cancelled=0),
        broken: dict(enqueued=10, started=20, succeeded=0, failed=10, retried=10, cancelled=0),
        later: dict(enqueued=5, started=0, succeeded=0, failed=0, retried=0, cancelled=5),
    }
    for q, want in expected.items():
        assert rolled(db, q) == want, q
        assert from_history(db, q) == want, q
    # Rolling up again changes nothing.
    roll_up(db)
    assert rolled(db, ok) == expected[ok]

    # Percentiles: per minute, exactly percentile_disc over that minute's finished jobs.
    rows = db.execute("SELECT date_trunc('minute', finished_at), started_at - run_at, "
                      "finished_at - started_at FROM queue.history WHERE queue = %s", (ok,)).fetchall()
    by_minute = {}
    for minute, wait, run in rows:
        by_minute.setdefault(minute, []).append((max(wait, type(wait)(0)), run))
    got = {m: (w50, w99, r50, r95, r99) for m, w50, w99, r50, r95, r99 in db.execute(
        "SELECT minute, wait_p50, wait_p99, run_p50, run_p95, run_p99 FROM queue.metrics "
        "WHERE queue = %s", (ok,)).fetchall()}
    assert set(got) == set(by_minute)
    for minute, pairs in by_minute.items():
        waits = [w for w, _ in pairs]
        runs = [r for _, r in pairs]
        assert got[minute] == (percentile_disc(waits, 0.5), percentile_disc(waits, 0.99),
                               percentile_disc(runs, 0.5), percentile_disc(runs, 0.95),
                               percentile_disc(runs, 0.99))
    # The handler sleeps n/10 ms for n = 1..50: run times spread up to 5 ms and more.
    assert max(runs for *_, runs in got.values()).total_seconds() >= 0.005

    # queue.stats reads the rollups and the history not rolled up yet: the same counts.
    stats = db.execute("SELECT succeeded_last_hour, failed_last_hour, cancelled_last_hour "
                       "FROM queue.stats WHERE queue = %s", (broken,)).fetchone()
    assert stats == (0, 10, 0)
    db.execute("SELECT queue.enqueue(%s, '{}')", (broken,))
    wait_terminal(db, broken, 11)
    assert scalar(db, "SELECT failed_last_hour FROM queue.stats WHERE queue = %s", (broken,)) == 11
    # The same when the launcher is minutes behind (history read from further back). In a
    # transaction that holds metrics_state, so that no roll-up moves it meanwhile.
    with db.transaction():
        db.execute("UPDATE queue.metrics_state SET rolled_until = now() - interval '10 minutes'")
        assert scalar(db, "SELECT failed_last_hour FROM queue.stats WHERE queue = %s", (broken,)) == 11
        db.execute("UPDATE queue.metrics_state SET rolled_until = NULL")
        assert scalar(db, "SELECT failed_last_hour FROM queue.stats WHERE queue = %s", (broken,)) == 11
        raise psycopg.Rollback()

    # Prometheus counters say the same.
    text = scalar(db, "SELECT queue.prometheus_metrics()")
    samples = {(s.name, s.labels.get("queue")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    for event, n in expected[flaky].items():
        assert samples[(f"pg_queue_{event}_total", flaky)] == n, event


def test_the_launcher_rolls_up_by_itself(db):
    wait_for(lambda: scalar(db, "SELECT rolled_until > now() - interval '2 minutes' "
                                "FROM queue.metrics_state"), what="the launcher's roll-up")


def test_prometheus_text_is_valid_and_filtered(cluster, db, name):
    plpgsql_queue(db, name, "PERFORM 1;", paused=True)
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[3]))", (name,))
    db.execute("SELECT queue.enqueue(%s, '{}', run_at => now() + '1 hour')", (name,))
    text = scalar(db, "SELECT queue.prometheus_metrics()")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["pg_queue_jobs"].type == "gauge"
    assert families["pg_queue_succeeded"].type == "counter"
    assert families["pg_queue_wait_seconds"].type == "summary"
    jobs = {(s.labels["queue"], s.labels["state"]): s.value for s in families["pg_queue_jobs"].samples}
    assert jobs[(name, "ready")] == 3 and jobs[(name, "scheduled")] == 1 and jobs[(name, "running")] == 0
    assert [s.value for s in families["pg_queue_executors"].samples] == [2]
    oldest = [s.value for s in families["pg_queue_oldest_ready_seconds"].samples if s.labels["queue"] == name]
    assert len(oldest) == 1 and oldest[0] >= 0

    # A role sees the queues it may read, and nothing of the others.
    db.execute(f"CREATE ROLE {name}_r LOGIN")
    db.execute(f"GRANT USAGE ON SCHEMA queue TO {name}_r")
    with cluster.connect(user=f"{name}_r") as r:
        assert name not in scalar(r, "SELECT queue.prometheus_metrics()")
        assert scalar(r, "SELECT count(*) FROM queue.metrics") == 0
        db.execute("SELECT queue.grant(%s, %s, ARRAY['read'])", (name, f"{name}_r"))
        assert f'pg_queue_jobs{{queue="{name}",state="ready"}} 3' in scalar(r, "SELECT queue.prometheus_metrics()")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(cmd, port, env=None):
    """Runs an exporter, returns the text of its /metrics."""
    proc = subprocess.Popen(cmd + [f"--web.listen-address=127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def get():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                return None
        return wait_for(get, timeout=30, interval=0.1, what=f"{cmd[0]} /metrics")
    finally:
        proc.terminate()
        proc.wait(10)


def test_node_exporter_textfile_collector_reads_it(db, name):
    """README "Monitoring": prometheus_metrics() written to a .prom file for node_exporter's
    textfile collector, which rejects (node_textfile_scrape_error 1) what it cannot parse."""
    plpgsql_queue(db, name, "PERFORM 1;", paused=True)
    db.execute("SELECT queue.enqueue(%s, '{}')", (name,))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pg_queue.prom"), "w") as f:
            f.write(scalar(db, "SELECT queue.prometheus_metrics()"))
        os.chmod(d, 0o755)
        text = scrape(["prometheus-node-exporter", "--collector.disable-defaults", "--collector.textfile",
                       f"--collector.textfile.directory={d}"], free_port())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("node_textfile_scrape_error", ())] == 0
    assert samples[("pg_queue_jobs", (("queue", name), ("state", "ready")))] == 1


def test_postgres_exporter_runs_the_documented_queries(cluster, db, name):
    plpgsql_queue(db, name, "PERFORM 1;", paused=True)
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[2]))", (name,))
    env = dict(os.environ, DATA_SOURCE_NAME=f"host={cluster.dir} port={cluster.port} user=postgres "
                                            "dbname=postgres sslmode=disable")
    text = scrape(["prometheus-postgres-exporter", "--disable-default-metrics", "--disable-settings-metrics",
                   "--extend.query-path=" + os.path.join(REPO, "docs", "monitoring", "postgres_exporter-queries.yaml")],
                  free_port(), env)
    samples = {(s.name, s.labels.get("queue")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("pg_queue_live_ready", name)] == 2, [k for k in samples if k[0].startswith("pg_queue")]
    assert ("pg_queue_live_oldest_ready_seconds", name) in samples


def test_metrics_are_kept_after_their_minute_is_final_and_pruned(db, name):
    """Counters stay monotonic: a minute more than 5 minutes old is added to the totals once,
    and survives the pruning of its row. Last in this module: it moves the roll-up days
    ahead."""
    plpgsql_queue(db, name, f"INSERT INTO {name} VALUES (1);")
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[7]))", (name,))
    wait_terminal(db, name, 7)
    roll_up(db)

    def counter():
        text = scalar(db, "SELECT queue.prometheus_metrics()")
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "pg_queue_succeeded_total" and s.labels["queue"] == name)
    assert counter() == 7
    # Roll up as if 10 minutes later: the minute is final, in the totals.
    db.execute("SELECT queue.roll_up_metrics(clock_timestamp() + interval '10 minutes')")
    assert scalar(db, "SELECT succeeded FROM queue.metrics_totals WHERE queue = %s", (name,)) == 7
    assert counter() == 7
    # And as if past metrics_retention (7 days): the row is pruned, the counter stays.
    db.execute("SELECT queue.roll_up_metrics(clock_timestamp() + interval '8 days')")
    assert scalar(db, "SELECT count(*) FROM queue.metrics WHERE queue = %s", (name,)) == 0
    assert counter() == 7

#!/usr/bin/env python3
"""pg_queue benchmark: Postgres's own floors (pgbench) and pg_queue's figures, measured in
one run on one throwaway cluster, reported as ratios. Run through bench/run.sh.

    bench/run.sh            durable commits (synchronous_commit = on, fsync = on)
    bench/run.sh --fast     synchronous_commit = off
    bench/run.sh --smoke    seconds-long run of every step with tiny sizes (CI)

On 2 noisy cores only ratios measured in the same run mean anything; absolute figures
are printed for the record.
"""
import argparse
import datetime
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "pgrx-tests"))
from cluster import Cluster, PG_BIN  # noqa: E402

# The phases, in the order a full run takes them (each is a Bench.<phase>_run method).
PHASES = ["enqueue", "peers", "drain", "graph", "rate", "fair", "latency", "history", "stats", "snapshot",
          "rss"]

SIZES = {
    # jobs per floor run (1 and 64 per transaction), jobs per drain, pickups timed, history
    # rows, jobs between the RSS readings, seconds per enqueue run, enqueue_many calls,
    # rounds of each pg_queue figure beside its floor, jobs in the fan-in graph, and
    # history rows (older than an hour, and of a busy last hour) under queue.stats, and the
    # held-snapshot phase: jobs/s offered, seconds per part (baseline, held, after), seconds
    # between samples
    "full": dict(floor_single=5_000, floor_batch=100_000, drain=50_000, latency=500,
                 history=5_000_000, rss=1_000_000, enqueue_secs=4, many_calls=10, rounds=3,
                 graph=10_000, stats_history=10_000_000, stats_hour=1_000_000,
                 snap_rate=1_000, snap_secs=300, snap_sample=10),
    "smoke": dict(floor_single=500, floor_batch=2_000, drain=2_000, latency=20,
                  history=20_000, rss=5_000, enqueue_secs=1, many_calls=2, rounds=1,
                  graph=1_000, stats_history=20_000, stats_hour=2_000,
                  snap_rate=200, snap_secs=4, snap_sample=1),
}

# The floors run on tables shaped exactly like queue.jobs and queue.history (same columns,
# constraints and indexes, partial claim index included, and queue.jobs' invariants
# trigger, which LIKE does not copy; history unpartitioned), with ids from the same UUIDv7
# function: what a hand-written worker on pg_queue's table design costs, without
# pg_queue's functions, executors or batching logic.
FLOOR_SCHEMA = """
CREATE TABLE floor_jobs (LIKE queue.jobs INCLUDING ALL);
CREATE TRIGGER floor_jobs_invariants BEFORE INSERT OR UPDATE ON floor_jobs
    FOR EACH ROW EXECUTE FUNCTION queue.jobs_invariants();
CREATE TABLE floor_history (LIKE queue.history INCLUDING ALL);
"""

FLOOR_INSERT = """INSERT INTO floor_jobs (id, queue, state, payload, enqueued_by, priority, run_at, max_attempts, created_at)
VALUES (queue.uuid_generate_v7(), 'floor', 'queued', '{"i": 1}', 'postgres', 0, now(), 5, now());"""

FLOOR_FILL = """INSERT INTO floor_jobs (id, queue, state, payload, enqueued_by, priority, run_at, max_attempts, created_at)
SELECT queue.uuid_generate_v7(), 'floor', 'queued', jsonb_build_object('i', i), 'postgres', 0, now(), 5, now()
  FROM generate_series(1, %s) i"""

# n jobs per transaction: claim them (running, attempt counted, owner token), then
# complete them (moved to history), as an external worker does; another client's claimed
# rows are not yet visible as running, so each client completes its own.
FLOOR_CLAIM_COMPLETE = """
BEGIN;
WITH c AS (SELECT id FROM floor_jobs WHERE queue = 'floor' AND state = 'queued' AND run_at <= now()
            ORDER BY priority, run_at, id LIMIT {n} FOR UPDATE SKIP LOCKED)
UPDATE floor_jobs j SET state = 'running', attempts = j.attempts + 1, started_at = now(),
       lease_token = gen_random_uuid()
 WHERE j.id = ANY(ARRAY(SELECT id FROM c));
WITH d AS (DELETE FROM floor_jobs WHERE queue = 'floor' AND state = 'running' RETURNING *)
INSERT INTO floor_history (id, queue, state, payload, enqueued_by, priority, run_at, attempts,
                           max_attempts, timeout, created_at, started_at, finished_at, errors)
SELECT id, queue, 'succeeded', payload, enqueued_by, priority, run_at, attempts, max_attempts, timeout,
       created_at, started_at, now(), errors FROM d;
COMMIT;
"""

# What a user would compare enqueue with (issue 14): a table shaped like a pgmq queue table
# (bigint identity key, read count, enqueued_at and vt, jsonb message, an index on vt),
# written as pgmq's send and send_batch do, and a bare two-column table.
PEER_SCHEMA = """
CREATE TABLE pgmq_shaped (
    msg_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    read_ct integer NOT NULL DEFAULT 0,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    vt timestamptz NOT NULL,
    message jsonb);
CREATE INDEX ON pgmq_shaped (vt ASC);
CREATE TABLE bare (id bigserial PRIMARY KEY, payload jsonb);
"""
PGMQ_SEND = "INSERT INTO pgmq_shaped (vt, message) VALUES (clock_timestamp(), '{\"i\": 1}') RETURNING msg_id;"
PGMQ_SEND_BATCH = ("INSERT INTO pgmq_shaped (vt, message) SELECT clock_timestamp(), m "
                   "FROM unnest(array_fill('{{\"i\": 1}}'::jsonb, ARRAY[{n}])) m RETURNING msg_id;")
BARE_INSERT = "INSERT INTO bare (payload) VALUES ('{\"i\": 1}');"

NOOP_HANDLER = """
CREATE PROCEDURE bench_noop(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE TABLE bench_pickup (job uuid, at timestamptz DEFAULT clock_timestamp());
CREATE PROCEDURE bench_pickup_h(payload jsonb) LANGUAGE sql AS $$
    INSERT INTO public.bench_pickup (job) SELECT id FROM queue.current_job()
$$;
"""


def percentile(values, p):
    """percentile_disc of sorted values: the first whose cumulative fraction reaches p."""
    return values[max(0, math.ceil(p * len(values)) - 1)]


def snapshot_commits(log_dir):
    """When each pgbench client's transactions returned (epoch seconds, in order), from its
    per-transaction logs: client_id transaction_no time script_no time_epoch time_us [lag]."""
    done = {}
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            for line in f:
                x = line.split()
                done.setdefault(int(x[0]), []).append((int(x[1]), int(x[4]) + int(x[5]) / 1e6))
    return {c: [t for _, t in sorted(v)] for c, v in done.items()}


class Bench:
    def __init__(self, args):
        self.args = args
        self.size = SIZES["smoke" if args.smoke else "full"]
        self.rows = []  # (what, value, unit, floor name or None, floor value or None)
        self.appendix = []  # markdown lines after the table (per-minute series)
        self.floors = {}
        settings = {
            "fsync": "on",
            "synchronous_commit": "off" if args.fast else "on",
            "listen_addresses": "'127.0.0.1'",
            "shared_buffers": "'1GB'",
            "max_wal_size": "'8GB'",
            "checkpoint_timeout": "'30min'",
            "wal_buffers": "'64MB'",
            "max_connections": "50",
            "queue.max_workers": "0",
            "queue.maintenance_interval": "'1s'",
            "log_min_messages": "warning",
        }
        self.cluster = Cluster(settings)
        self.settings = settings

    # -- helpers ---------------------------------------------------------------------
    def sql(self, query, params=None):
        with self.cluster.connect() as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def one(self, query, params=None):
        rows = self.sql(query, params)
        return rows[0][0] if rows else None

    def pgbench(self, script, clients, transactions=None, seconds=None, prepared=False):
        """Runs a pgbench custom script over TCP loopback; returns transactions per second."""
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(script)
        os.chmod(f.name, 0o644)
        cmd = [f"{PG_BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(self.cluster.port),
               "-U", "postgres", "-c", str(clients), "-j", str(clients), "-f", f.name]
        cmd += ["-t", str(transactions)] if transactions else ["-T", str(seconds)]
        cmd += ["-M", "prepared"] if prepared else []
        out = subprocess.run(cmd + ["postgres"], check=True, capture_output=True, text=True).stdout
        os.unlink(f.name)
        return float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))

    def record(self, what, value, unit, floor=None):
        # The floor as measured now: a floor of the same name measured again later (as
        # beside each enqueue option) must not change this row's ratio in the report.
        base = self.floors.get(floor)
        self.rows.append((what, value, unit, floor, base))
        ratio = f"  ({value / base:.2f}x {floor})" if base else ""
        print(f"  {what:<52} {value:>12,.1f} {unit}{ratio}", flush=True)

    def floor(self, name, value, unit=None):
        self.floors[name] = value
        self.record(name, value, unit or ("rows/s" if "INSERT" in name or "pgmq" in name else "jobs/s"))

    def set_workers(self, n):
        self.sql(f"ALTER SYSTEM SET queue.max_workers = {int(n)}")
        self.sql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while self.one("SELECT count(*) FROM queue.executors()") != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"executors did not reach {n}")
            time.sleep(0.05)

    def executor_pids(self):
        return [r[0] for r in self.sql("SELECT pid FROM queue.executors() ORDER BY slot")]

    # -- floors and their pg_queue counterparts, measured in alternation ---------------
    # On noisy machines the speed of the disk and CPUs drifts within minutes, so each
    # pg_queue figure is measured in rounds alternating with its floor, and the medians are
    # compared.
    def paired(self, what, unit, floor_name, floor_fn, fn):
        floors, values = [], []
        for _ in range(self.size["rounds"]):
            floors.append(floor_fn())
            values.append(fn())
        self.floor(floor_name, statistics.median(floors))
        self.record(what, statistics.median(values), unit, floor_name)

    def floor_claim_complete(self, n, clients, total):
        self.sql("TRUNCATE floor_jobs, floor_history")
        self.sql(FLOOR_FILL % (total + 64 * clients))
        self.sql("VACUUM ANALYZE floor_jobs")
        tps = self.pgbench(FLOOR_CLAIM_COMPLETE.format(n=n), clients,
                           transactions=max(1, total // n // clients))
        return tps * n

    def enqueue_run(self):
        print("enqueue, each beside its floor (pgbench INSERT into a table shaped like queue.jobs):")
        self.sql(FLOOR_SCHEMA)
        self.sql("SELECT queue.create_queue('bench_enqueue', 'bench_noop(jsonb)', paused => true)")
        secs = self.size["enqueue_secs"]
        for c in (1, 2, 4):
            self.paired(f"enqueue, {c} client(s)", "jobs/s", f"INSERT floor, {c} client(s)",
                        lambda: self.pgbench(FLOOR_INSERT, c, seconds=secs),
                        lambda: self.pgbench("SELECT queue.enqueue('bench_enqueue', '{\"i\": 1}');",
                                             c, seconds=secs))
        # Keyed enqueue (a fresh key per call: the insert path, not the duplicate one), and
        # enqueue depending on one live job (of the paused queue: an edge, a key-share lock).
        self.sql("CREATE TABLE bench_parent AS SELECT queue.enqueue('bench_enqueue') AS id")
        for option, script in [
                ("unique_key", "\\set k random(1, 1000000000)\n"
                               "SELECT queue.enqueue('bench_enqueue', '{\"i\": 1}', unique_key => 'k' || :k);"),
                ("depends_on", "SELECT queue.enqueue('bench_enqueue', '{\"i\": 1}', "
                               "depends_on => ARRAY[(SELECT id FROM bench_parent)]);")]:
            self.paired(f"enqueue with {option}, 1 client", "jobs/s", "INSERT floor, 1 client(s)",
                        lambda: self.pgbench(FLOOR_INSERT, 1, seconds=secs),
                        lambda: self.pgbench(script, 1, seconds=secs))
        self.sql("DROP TABLE bench_parent")
        calls = self.size["many_calls"]
        with self.cluster.connect() as db:
            wal = db.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
            start = time.monotonic()
            for _ in range(calls):
                db.execute("SELECT count(*) FROM queue.enqueue_many('bench_enqueue', "
                           "array_fill('{\"i\": 1}'::jsonb, ARRAY[10000]))")
            took = time.monotonic() - start
            wal_per_job = db.execute("SELECT (pg_current_wal_insert_lsn() - %s::pg_lsn) / %s",
                                     (wal, calls * 10_000)).fetchone()[0]
        self.record("enqueue_many (10k per call), 1 client", calls * 10_000 / took, "jobs/s",
                    "INSERT floor, 1 client(s)")
        self.record("  WAL written per job by enqueue_many", float(wal_per_job), "bytes")
        self.sql("SELECT queue.drop_queue('bench_enqueue', force => true)")
        self.sql("TRUNCATE queue.history, floor_jobs")

    def peers_run(self):
        """Enqueue called the way pgmq's send is (pgbench, prepared, 1 client) with two
        executors started, beside a pgmq-shaped table and a bare table written the same way."""
        print("enqueue beside what a user would compare it with (pgbench -M prepared, 1 client, "
              "2 executors started, paused queue):")
        self.sql(PEER_SCHEMA)
        self.sql("SELECT queue.create_queue('bench_peer', 'bench_noop(jsonb)', paused => true)")
        self.set_workers(2)
        secs = self.size["enqueue_secs"]
        enqueue = "SELECT queue.enqueue('bench_peer', '{\"i\": 1}');"
        self.paired("enqueue (prepared), beside pgmq send", "jobs/s", "pgmq-shaped send (prepared)",
                    lambda: self.pgbench(PGMQ_SEND, 1, seconds=secs, prepared=True),
                    lambda: self.pgbench(enqueue, 1, seconds=secs, prepared=True))
        self.paired("enqueue (prepared), beside the bare INSERT", "jobs/s", "bare INSERT (prepared)",
                    lambda: self.pgbench(BARE_INSERT, 1, seconds=secs, prepared=True),
                    lambda: self.pgbench(enqueue, 1, seconds=secs, prepared=True))
        for n in (1000, 10000):
            many = f"SELECT queue.enqueue_many('bench_peer', array_fill('{{\"i\": 1}}'::jsonb, ARRAY[{n}]));"
            self.paired(f"enqueue_many of {n:,} (prepared)", "jobs/s", f"pgmq-shaped send_batch of {n:,}",
                        lambda: n * self.pgbench(PGMQ_SEND_BATCH.format(n=n), 1, seconds=secs, prepared=True),
                        lambda: n * self.pgbench(many, 1, seconds=secs, prepared=True))
        self.sql("SELECT queue.drop_queue('bench_peer', force => true)")
        self.sql("DROP TABLE pgmq_shaped, bare")
        self.sql("TRUNCATE queue.history")

    def drain(self, queue, n, fan_in=False, keys=None):
        """Enqueues n jobs on the paused queue (with fan_in, and one more that depends on
        all of them; with keys, spread over that many fair_keys), resumes it, and returns jobs/s from the jobs' own timestamps (first
        claim to last finish)."""
        self.sql("SELECT queue.pause(%s)", (queue,))
        self.sql("""WITH p AS (SELECT array_agg(id) AS ids
                                FROM queue.enqueue_many(%(q)s, array_fill('{}'::jsonb, ARRAY[%(n)s]),
                                                        fair_keys => CASE WHEN %(keys)s::int IS NOT NULL THEN
                                                            ARRAY(SELECT 'key' || (i %% %(keys)s)
                                                                    FROM generate_series(1, %(n)s) i) END) id)
                    SELECT CASE WHEN %(fan_in)s THEN queue.enqueue(%(q)s, depends_on => ids) END FROM p""",
                 {"q": queue, "n": n, "fan_in": fan_in, "keys": keys})
        self.sql("VACUUM ANALYZE queue.jobs")
        wal = self.one("SELECT pg_current_wal_insert_lsn()")
        self.sql("SELECT queue.resume(%s)", (queue,))
        deadline = time.monotonic() + 600
        while self.one("SELECT count(*) FROM queue.jobs WHERE queue = %s", (queue,)):
            if time.monotonic() > deadline:
                raise RuntimeError("drain did not finish in 10 minutes")
            time.sleep(0.05)
        span, done, fan_in_delay = self.sql(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)), count(*) "
            "FILTER (WHERE state = 'succeeded'), "
            "extract(epoch FROM max(started_at) FILTER (WHERE depends_on IS NOT NULL) "
            "                   - max(finished_at) FILTER (WHERE depends_on IS NULL)) * 1000 "
            "FROM queue.history WHERE queue = %s "
            "AND finished_at >= now() - interval '1 hour'", (queue,))[0]
        self.fan_in_delay_ms = fan_in_delay
        self.wal_per_job = float(self.one("SELECT (pg_current_wal_insert_lsn() - %s::pg_lsn) / %s",
                                          (wal, n)))
        return done / float(span)

    def drain_run(self):
        print("drain of no-op SQL-handler jobs, each beside its floor (pgbench claim+complete "
              "of 64 jobs per transaction):")
        if self.one("SELECT to_regclass('floor_jobs')") is None:    # --only drain
            self.sql(FLOOR_SCHEMA)
        self.drain_rates = {}
        for w in (1, 2, 4):
            self.set_workers(w)
            rates, wal = [], []

            def drain_once():
                rate = self.drain("bench_drain", self.size["drain"])
                self.sql("TRUNCATE queue.history")
                rates.append(rate)
                wal.append(self.wal_per_job)
                return rate
            self.paired(f"drain {self.size['drain']:,} jobs, {w} executor(s)", "jobs/s",
                        f"claim+complete 64/tx floor, {w} client(s)",
                        lambda: self.floor_claim_complete(64, w, self.size["floor_batch"]),
                        drain_once)
            self.drain_rates[w] = statistics.median(rates)
            self.record("  WAL written per job", statistics.median(wal), "bytes")
        print("one job per transaction (external workers without batching), for the record:")
        for c in (1, 2, 4):
            self.floor(f"claim+complete 1/tx floor, {c} client(s)",
                       self.floor_claim_complete(1, c, self.size["floor_single"]))
        self.sql("DROP TABLE floor_jobs, floor_history")

    def graph_run(self):
        n = self.size["graph"]
        print(f"drain of a fan-in graph ({n:,} jobs and one that depends on all of them, "
              "2 executors), beside a plain drain of as many jobs:")
        self.set_workers(2)
        delays = []

        def graph_once():
            rate = self.drain("bench_drain", n, fan_in=True)
            self.sql("TRUNCATE queue.history")
            delays.append(float(self.fan_in_delay_ms))
            return rate

        def plain_once():
            rate = self.drain("bench_drain", n)
            self.sql("TRUNCATE queue.history")
            return rate
        self.paired(f"drain of a {n:,}-job fan-in graph, 2 executors", "jobs/s",
                    f"drain {n:,} jobs, 2 executors", plain_once, graph_once)
        self.record("  last dependency finished to fan-in job started", statistics.median(delays), "ms")

    def beside_plain_drain(self, title, label, queue, settings, keys=None):
        """A drain of a queue created with `settings`, in rounds beside a plain drain of as
        many jobs (2 executors)."""
        n = self.size["drain"]
        print(f"{title}, beside a plain drain, 2 executors:")
        self.set_workers(2)
        self.sql(f"SELECT queue.create_queue('{queue}', 'bench_noop(jsonb)', concurrency => 10000, {settings})")

        def drain_once(q, k):
            rate = self.drain(q, n, keys=k)
            self.sql("TRUNCATE queue.history")
            return rate
        self.paired(f"drain {n:,} jobs, {label}, 2 executors", "jobs/s",
                    f"drain {n:,} jobs, 2 executors (beside the {label} queue)",
                    lambda: drain_once("bench_drain", None), lambda: drain_once(queue, keys))

    def rate_run(self):
        self.beside_plain_drain("drain of a queue with a rate limit far above the drain rate (1 000 000/s; "
                                "every claim reserves and settles its budget)", "rate-limited",
                                "bench_rated", "rate_limit => '1000000/1 second'")

    def fair_run(self):
        self.beside_plain_drain("drain of a fair_share queue whose jobs have 1 000 keys (claims rotate "
                                "across keys)", "fair share over 1 000 keys", "bench_fair",
                                "fair_share => true", keys=1000)

    def latency_run(self):
        print("pg_queue idle pickup (enqueue commit to handler start):")
        self.set_workers(2)
        self.sql("SELECT queue.create_queue('bench_pickup', 'bench_pickup_h(jsonb)')")
        lat = []
        with self.cluster.connect() as db:
            for _ in range(self.size["latency"]):
                with db.transaction():
                    job = db.execute("SELECT queue.enqueue('bench_pickup')").fetchone()[0]
                    committed = db.execute("SELECT clock_timestamp()").fetchone()[0]
                deadline = time.monotonic() + 30
                while True:
                    at = db.execute("SELECT at FROM bench_pickup WHERE job = %s", (job,)).fetchone()
                    if at:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("pickup timed out")
                    time.sleep(0.001)
                lat.append((at[0] - committed).total_seconds() * 1000)
        lat.sort()
        for p in (50, 95, 99):
            self.record(f"idle pickup p{p} ({len(lat)} jobs)", lat[min(len(lat) - 1, len(lat) * p // 100)], "ms")

    def history_run(self):
        n = self.size["history"]
        print(f"pg_queue drain with {n:,} terminal jobs in today's history partition "
              "(2 executors), beside the same drain just before they were added:")
        self.set_workers(2)
        before, after = [], []
        for _ in range(2):
            before.append(self.drain("bench_drain", self.size["drain"]))
            self.sql("TRUNCATE queue.history")
        self.sql(f"""INSERT INTO queue.history (id, queue, state, payload, enqueued_by, priority, run_at,
                       attempts, max_attempts, created_at, started_at, finished_at, errors)
                     SELECT queue.uuid_generate_v7(), 'bench_old', 'succeeded', '{{}}', current_user::regrole,
                            0, now(), 1, 5,
                            now() - interval '3 hours', now() - interval '3 hours', now(), '[]'
                       FROM generate_series(1, {n})""")
        self.sql("VACUUM ANALYZE queue.history")
        for _ in range(2):
            after.append(self.drain("bench_drain", self.size["drain"]))
            self.sql("DELETE FROM queue.history WHERE queue = 'bench_drain'")
        self.floor("drain, empty history, 2 executors", statistics.median(before))
        self.record(f"drain {self.size['drain']:,} jobs, 2 executors, {n:,} in history",
                    statistics.median(after), "jobs/s", "drain, empty history, 2 executors")
        self.sql("TRUNCATE queue.history")

    def timed_ms(self, query, runs=20, setup=None):
        """Median wall time of a statement on one connection, in ms."""
        times = []
        with self.cluster.connect() as c:
            if setup:
                c.execute(setup)
            for _ in range(runs):
                t = time.perf_counter()
                c.execute(query).fetchall()
                times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def stats_run(self):
        n, busy = self.size["stats_history"], self.size["stats_hour"]
        print(f"reading queue.stats, queue.metrics and prometheus_metrics() with empty history, with "
              f"{n:,} jobs finished over the 6 days before the last hour, and with {busy:,} more "
              "in the last hour; and what the launcher's roll-up costs:")
        self.set_workers(0)
        self.sql("SELECT queue.create_queue('bench_stats', 'bench_noop(jsonb)', paused => true)")
        reads = {"queue.stats": "SELECT * FROM queue.stats",
                 "queue.metrics, last hour": "SELECT * FROM queue.metrics WHERE minute > now() - interval '1 hour'",
                 "queue.prometheus_metrics()": "SELECT queue.prometheus_metrics()"}
        for what, query in reads.items():
            self.floor(f"{what}, empty history", self.timed_ms(query), "ms")
        # What queue.stats read before the rollups (0.1.0): the last hour of history.
        before_rollups = """SELECT count(*) FILTER (WHERE x.state = 'succeeded'), count(*) FILTER (WHERE x.state = 'failed')
                              FROM queue.history x WHERE x.queue = 'bench_stats' AND x.finished_at > now() - interval '1 hour'"""
        fill = """INSERT INTO queue.history (id, queue, state, payload, enqueued_by, priority, run_at,
                       attempts, max_attempts, created_at, started_at, finished_at, errors)
                  SELECT queue.uuid_generate_v7(), 'bench_stats', 'succeeded', '{{}}', current_user::regrole, 0,
                         t - interval '20 ms', 1, 5, t - interval '20 ms', t - interval '10 ms', t, '[]'
                    FROM (SELECT {start} - {span} * i / {n} AS t FROM generate_series(1, {n}) i) s"""
        self.sql(fill.format(start="now() - interval '1 hour'", span="interval '6 days'", n=n))
        self.sql("VACUUM ANALYZE queue.history")
        for what, query in reads.items():
            self.record(f"{what}, {n:,} jobs in history", self.timed_ms(query), "ms", f"{what}, empty history")

        self.sql(fill.format(start="now()", span="interval '55 minutes'", n=busy))
        self.sql("VACUUM ANALYZE queue.history")
        # The roll-up as the launcher runs it (without JIT, 64MB work_mem): once over the
        # whole hour (catching up, e.g. after a restart), then as it does every minute.
        roll_up = "SELECT queue.roll_up_metrics(date_trunc('minute', now()))"
        setup = "SET jit = off; SET work_mem = '64MB'"
        self.sql("UPDATE queue.metrics_state SET final_until = NULL")
        self.record(f"roll-up catching up a last hour of {busy:,} jobs", self.timed_ms(roll_up, runs=1, setup=setup), "ms")
        self.record(f"roll-up once a minute at that rate (re-rolls ~6 minutes, ~{busy * 6 // 55:,} jobs)",
                    self.timed_ms(roll_up, runs=3, setup=setup), "ms")
        for what, query in reads.items():
            self.record(f"{what}, and {busy:,} jobs in the last hour", self.timed_ms(query), "ms",
                        f"{what}, empty history")
        self.record(f"0.1.0's queue.stats read of that last hour", self.timed_ms(before_rollups, runs=3),
                    "ms", "queue.stats, empty history")
        self.sql("TRUNCATE queue.history, queue.metrics_minutes, queue.metrics_totals")
        self.sql("UPDATE queue.metrics_state SET final_until = NULL, rolled_until = NULL")
        self.sql("SELECT queue.drop_queue('bench_stats')")

    # The queue's relations: table, indexes, toast, and history's partitions as one.
    SNAP_SIZES = """
        SELECT c.relname, pg_relation_size(c.oid), coalesce(s.n_dead_tup, 0)
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'queue'
          LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
         WHERE c.relkind IN ('r', 'i') AND c.relname NOT LIKE 'history%'
           AND c.relname NOT LIKE 'metrics%' AND c.relname NOT LIKE 'schedule%'
        UNION ALL
        SELECT 'history (all partitions)', sum(pg_relation_size(c.oid)), sum(coalesce(s.n_dead_tup, 0))
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'queue'
          LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
         WHERE c.relkind IN ('r', 'i') AND c.relname LIKE 'history%'
         ORDER BY 1"""

    def snapshot_run(self):
        rate, secs, every = self.size["snap_rate"], self.size["snap_secs"], self.size["snap_sample"]
        print(f"steady enqueue + drain at {rate:,} jobs/s offered (pgbench -R, 2 clients, 2 executors): "
              f"{secs} s baseline, {secs} s while another session holds a REPEATABLE READ snapshot, "
              f"{secs} s after:")
        self.set_workers(2)
        # The default concurrency (10): each claim also counts the queue's running jobs.
        self.sql("SELECT queue.create_queue('bench_snap', 'bench_noop(jsonb)')")
        self.sql("VACUUM ANALYZE queue.jobs")
        # Each job names its pgbench client, whose log (-l) gives when each of its
        # transactions returned: the enqueue's commit, as its caller saw it.
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write("SELECT queue.enqueue('bench_snap', jsonb_build_object('c', :client_id::int));\n")
        os.chmod(f.name, 0o644)
        logs = tempfile.TemporaryDirectory()
        cmd = [f"{PG_BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(self.cluster.port), "-U", "postgres",
               "-c", "2", "-j", "2", "-M", "prepared", "-R", str(rate), "-T", str(3 * secs),
               "-P", str(every), "-l", "-f", f.name, "postgres"]
        start = time.time()
        bench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=logs.name)
        samples = []  # (seconds since start, part, {relation: (bytes, dead)})
        part_starts = [start, start + secs, start + 2 * secs, start + 3 * secs]
        holder = None
        with self.cluster.connect() as mon:
            while bench.poll() is None:
                now = time.time()
                part = min(2, int((now - start) // secs))
                if part == 1 and holder is None:
                    holder = self.cluster.connect(autocommit=False)
                    holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    holder.execute("SELECT count(*) FROM queue.jobs")  # takes the snapshot
                    part_starts[1] = time.time()
                if part == 2 and holder is not None and not holder.closed:
                    holder.rollback()
                    holder.close()
                    part_starts[2] = time.time()
                sizes = {r: (b, d) for r, b, d in mon.execute(self.SNAP_SIZES).fetchall()}
                samples.append((now - start, part, sizes))
                time.sleep(max(0.0, every - (time.time() - now)))
        out, err = bench.communicate()
        os.unlink(f.name)
        if bench.returncode != 0:
            raise RuntimeError(f"pgbench failed: {err}")
        if holder is not None and not holder.closed:
            holder.close()
        # pgbench -P lines: "progress: 10.0 s, 1999.8 tps, lat 1.2 ms stddev 0.3, lag 0.1 ms"
        progress = [(float(m.group(1)), float(m.group(2)), float(m.group(3)))
                    for m in re.finditer(r"progress: ([\d.]+) s, ([\d.]+) tps, lat ([\d.]+) ms", err)]
        names = ["baseline", "snapshot held", "after"]
        self.wait_drained("bench_snap")
        # Pickup from the enqueue's commit: (created_at, claim's started_at, commit seen by
        # the client) of every job. Its created_at (its transaction's start) also counts the
        # enqueue's own statement and commit flush.
        committed = snapshot_commits(logs.name)
        logs.cleanup()
        jobs = {}
        for client, created, started in self.sql(
                "SELECT (payload->>'c')::int, created_at, started_at FROM queue.history "
                "WHERE queue = 'bench_snap' ORDER BY 1, 2"):
            jobs.setdefault(client, []).append((created.timestamp(), started.timestamp()))
        from_commit = []    # (created, started - committed) in seconds
        for client, js in jobs.items():
            returned = committed.get(client, [])
            if len(returned) != len(js):
                print(f"  (pgbench client {client}: {len(returned)} logged, {len(js)} jobs: not matched)")
                continue
            from_commit += [(created, started - at) for (created, started), at in zip(js, returned)]
        for i, name in enumerate(names):
            lo, hi = part_starts[i], part_starts[i + 1]
            done, p50, p99 = self.one_row(
                """SELECT count(*) / %s::float8,
                          percentile_disc(0.5) WITHIN GROUP (ORDER BY started_at - created_at),
                          percentile_disc(0.99) WITHIN GROUP (ORDER BY started_at - created_at)
                     FROM queue.history
                    WHERE queue = 'bench_snap' AND created_at >= to_timestamp(%s) AND created_at < to_timestamp(%s)""",
                (hi - lo, lo, hi))
            waits = sorted(w for c, w in from_commit if lo <= c < hi)
            lat = [l for t, _, l in progress if lo - start < t <= hi - start]
            if i == 0:
                # The jobs of a part are those enqueued in it, so its throughput is the
                # producers' as much as the executors': on a machine too slow to enqueue
                # at the offered rate, the later parts' ratios say little.
                self.floors["snapshot phase: jobs/s offered"] = float(rate)
                self.floors["snapshot phase: jobs/s finished, baseline"] = done
                self.record("snapshot phase: jobs/s finished, baseline", done, "jobs/s",
                            "snapshot phase: jobs/s offered")
                if done < 0.95 * rate:
                    print("  (the producers did not keep the offered rate in the baseline: the ratios "
                          "below compare what they managed to enqueue)")
                self.floor("snapshot phase: pickup p99, baseline", p99.total_seconds() * 1000, "ms")
            else:
                self.record(f"snapshot phase: jobs/s finished, {name}", done, "jobs/s",
                            "snapshot phase: jobs/s finished, baseline")
                self.record(f"snapshot phase: pickup p99, {name}", p99.total_seconds() * 1000, "ms",
                            "snapshot phase: pickup p99, baseline")
            self.record(f"snapshot phase: pickup p50, {name}", p50.total_seconds() * 1000, "ms")
            if waits:
                p99c = percentile(waits, 0.99) * 1000
                if i == 0:
                    self.floor("snapshot phase: enqueue commit to claim p99, baseline", p99c, "ms")
                else:
                    self.record(f"snapshot phase: enqueue commit to claim p99, {name}", p99c, "ms",
                                "snapshot phase: enqueue commit to claim p99, baseline")
                self.record(f"snapshot phase: enqueue commit to claim p50, {name}",
                            percentile(waits, 0.5) * 1000, "ms")
            if lat:
                self.record(f"snapshot phase: enqueue latency incl. schedule lag (mean of pgbench -P), {name}",
                            statistics.mean(lat), "ms")
        # Sizes and dead tuples of each relation, a row per minute (per sample in smoke runs),
        # with the pickup p99 of the jobs enqueued in the interval before the row.
        step = 1 if self.args.smoke else max(1, int(60 // every))
        width = step * every
        p99s = dict(self.sql(
            """SELECT ceil((extract(epoch FROM created_at) - %s) / %s)::int * %s,
                      round(extract(epoch FROM percentile_disc(0.99) WITHIN GROUP
                                                 (ORDER BY started_at - created_at)) * 1000, 1)
                 FROM queue.history WHERE queue = 'bench_snap' GROUP BY 1""", (start, width, width)))
        p99c_by = {}
        for c, w in from_commit:
            p99c_by.setdefault(math.ceil((c - start) / width) * width, []).append(w)
        p99c_by = {k: percentile(sorted(v), 0.99) * 1000 for k, v in p99c_by.items()}
        rels = sorted(samples[0][2]) if samples else []
        self.appendix += ["", f"### Held snapshot: relation sizes (kB) / dead tuples, every {step * every} s", "",
                          "Enqueues/s and latency (incl. schedule lag) are pgbench's over the "
                          f"{every} s before each row.", "",
                          f"Pickup p99 is of the jobs enqueued in the {width} s before each row, to their "
                          "claim: from the enqueue's start (its created_at), and from its commit as pgbench "
                          "saw it.", "",
                          "| s | part | enqueues/s | latency ms | pickup p99 ms | from commit ms | "
                          + " | ".join(rels) + " |",
                          "| ---: | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in rels) + " |"]
        rows = samples[::step]
        if samples and rows[-1] is not samples[-1]:
            rows.append(samples[-1])
        for t, part, sizes in rows:
            cells = " | ".join(f"{sizes[r][0] // 1024:,} / {int(sizes[r][1]):,}" for r in rels)
            before = [(tps, l) for pt, tps, l in progress if pt <= t + every / 2]
            tps, l = before[-1] if before else (0.0, 0.0)
            p99 = p99s.get(int(round(t / width) * width))
            p99_cell = f"{p99:,.1f}" if p99 is not None else ""
            p99c = p99c_by.get(int(round(t / width) * width))
            p99c_cell = f"{p99c:,.1f}" if p99c is not None else ""
            self.appendix.append(f"| {t:.0f} | {names[part]} | {tps:,.0f} | {l:,.1f} | {p99_cell} | {p99c_cell} "
                                 f"| {cells} |")
        for line in self.appendix[-(len(rows) + 2):]:
            print("  " + line)
        jobs = [sizes.get("jobs", (0, 0))[0] for _, _, sizes in samples]
        if jobs:
            self.record("snapshot phase: queue.jobs heap, largest during the run",
                        max(jobs) / 1024, "kB")
            self.record("snapshot phase: queue.jobs heap at the end of the run", jobs[-1] / 1024, "kB")
        self.sql("SELECT queue.drop_queue('bench_snap', force => true)")

    def wait_drained(self, queue, timeout=600):
        deadline = time.monotonic() + timeout
        while self.one("SELECT count(*) FROM queue.jobs WHERE queue = %s", (queue,)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{queue} did not drain")
            time.sleep(0.2)

    def one_row(self, query, params=None):
        rows = self.sql(query, params)
        return rows[0] if rows else None

    def rss_run(self):
        n = self.size["rss"]
        print(f"executor RSS before and after {n:,} jobs (2 executors):")
        self.set_workers(2)
        self.drain("bench_drain", 1000)  # warm: plans, caches
        pids = self.executor_pids()
        before = sum(rss_kb(p) for p in pids)
        # Read after every chunk: a leak grows with each one, a cache filling up does not.
        done, series = 0, [(0, before)]
        while done < n:  # in chunks, so that queue.jobs stays small
            chunk = min(n - done, 200_000)
            self.drain("bench_drain", chunk)
            self.sql("TRUNCATE queue.history")
            done += chunk
            series.append((done, sum(rss_kb(p) for p in pids)))
        assert self.executor_pids() == pids, "executors restarted during the run"
        after = series[-1][1]
        self.appendix += ["", "### Executors' private RSS (kB) after each chunk", "",
                          "| jobs | RSS kB |", "| ---: | ---: |"]
        self.appendix += [f"| {done:,} | {kb:,} |" for done, kb in series]
        print("  " + ", ".join(f"{done:,}: {kb:,} kB" for done, kb in series))
        self.floors["RSS before"] = before
        self.record("executors' private RSS before", before, "kB")
        self.record(f"executors' private RSS after {n:,} jobs", after, "kB", "RSS before")

    # -- report ------------------------------------------------------------------------
    def report(self):
        mode = "fast (synchronous_commit = off)" if self.args.fast else "durable"
        kind = "smoke" if self.args.smoke else "full"
        lines = [f"# pg_queue benchmark — {mode}, {kind}", "",
                 f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
                 f"- machine: {os.cpu_count()} cores, {machine()}",
                 f"- postgres: {self.one('SELECT version()')}",
                 "- settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()
                                            if not k.startswith(("unix", "port"))),
                 "", "| measure | value | unit | ratio | to |", "| --- | ---: | --- | ---: | --- |"]
        for what, value, unit, floor, base in self.rows:
            ratio = f"{value / base:.2f}x" if base else ""
            lines.append(f"| {what} | {value:,.1f} | {unit} | {ratio} | {floor if ratio else ''} |")
        text = "\n".join(lines + self.appendix) + "\n"
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        only = "-only-" + "-".join(self.args.only) if self.args.only else ""
        name = f"{datetime.date.today()}-{'fast' if self.args.fast else 'durable'}-{kind}{only}.md"
        path = os.path.join(HERE, "results", name)
        with open(path, "w") as f:
            f.write(text)
        print(f"\nwritten to {path}")

    def run(self):
        self.cluster.start()
        try:
            self.sql("CREATE EXTENSION pg_queue")
            self.sql(NOOP_HANDLER)
            self.sql("SELECT queue.create_queue('bench_drain', 'bench_noop(jsonb)', concurrency => 10000)")
            print("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
            for phase in self.args.only or PHASES:
                getattr(self, f"{phase}_run")()
            self.report()
        finally:
            self.cluster.destroy()


def rss_kb(pid):
    """Private memory of a process (RssAnon): VmRSS also counts the shared buffers it
    touched, which grows with the data, not with leaks."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+) kB", f.read()).group(1))


def machine():
    with open("/proc/cpuinfo") as f:
        m = re.search(r"model name\s*:\s*(.*)", f.read())
    return m.group(1) if m else "unknown cpu"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fast", action="store_true", help="synchronous_commit = off")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmark runs")
    p.add_argument("--only", nargs="+", choices=PHASES, help="run these phases only")
    Bench(p.parse_args()).run()


if __name__ == "__main__":
    main()

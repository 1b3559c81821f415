"""External consumers of NOTIFY queues, driven through the real example consumer
(examples/python/consumer.py) run as subprocesses against a real cluster."""
import collections
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from psycopg import sql

from conftest import scalar, wait_for, wait_terminal

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
PYTHON_CONSUMER = [sys.executable, os.path.join(EXAMPLES, "python", "consumer.py")]


@pytest.fixture(scope="module")
def rust_consumer():
    """Builds the Rust example consumer (incrementally) and returns its command."""
    target = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(EXAMPLES, "..", "target")),
                          "rust-consumer")
    manifest = os.path.join(EXAMPLES, "rust-consumer", "Cargo.toml")
    subprocess.run(["cargo", "build", "--locked", "--manifest-path", manifest, "--target-dir", target],
                   check=True)
    return [os.path.join(target, "debug", "pg_queue_consumer")]


class Consumer:
    """An example consumer as a subprocess; its stdout lines are collected."""

    def __init__(self, cluster, queue, name, *args, command=PYTHON_CONSUMER):
        self.name = name
        self.proc = subprocess.Popen(
            [*command, "--dsn", f"{cluster.dsn()} application_name={name}", "--queue", queue,
             "--name", name, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines, self.log = [], []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.split())

    def _read_log(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def working_on(self, job):
        return any(f"working on {job}" in line for line in self.log)

    def stop(self, timeout=15):
        """SIGTERM; returns the exit code (the consumer finishes the job in hand first)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.reader.join(5)
        return code

    def kill(self):
        self.proc.kill()
        self.proc.wait(5)


def assert_completed_once(consumers, n):
    """The consumers' output says `n` distinct jobs were completed, each exactly once."""
    completed = collections.Counter(line[1] for c in consumers for line in c.lines
                                    if line[0] == "completed")
    assert len(completed) == n and set(completed.values()) == {1}


def create_notify_queue(db, name, **settings):
    args = "".join(f", {k} => %s" for k in settings)
    db.execute(f"SELECT queue.create_queue(%s, notify => true{args})", (name, *settings.values()))


def wait_listening(db, queue, n):
    """Consumers LISTEN before their first claim, which records them in queue.consumers."""
    wait_for(lambda: scalar(db, "SELECT count(*) FROM queue.consumers WHERE name LIKE %s",
                            (f"{queue}-%",)) >= n,
             timeout=30, what=f"{n} listening consumers")


def test_four_consumers_drain_2000_jobs_exactly_once(cluster, db, name):
    create_notify_queue(db, name, concurrency=100)
    consumers = [Consumer(cluster, name, f"{name}-c{i}", "--batch", "10") for i in range(4)]
    try:
        wait_listening(db, name, 4)
        db.execute("SELECT count(*) FROM queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('i', i) "
                   "FROM generate_series(1, 2000) i))", (name,))
        states = wait_terminal(db, name, 2000, timeout=120)
    finally:
        codes = [c.stop() for c in consumers]
    assert states == {"succeeded": 2000}
    assert codes == [0, 0, 0, 0]
    assert_completed_once(consumers, 2000)
    assert not [line for c in consumers for line in c.lines if line[0] != "completed"]
    # Each job succeeded on its first attempt, completed by the consumer that claimed it.
    assert scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s AND attempts = 1 "
                      "AND result->>'done_by' IS NOT NULL AND consumer LIKE %s",
                  (name, f"{name}-c%")) == 2000
    # All four did some of the work.
    per_consumer = collections.Counter(
        r[0] for r in db.execute("SELECT consumer FROM queue.history WHERE queue = %s", (name,)))
    assert len(per_consumer) == 4, per_consumer


def test_a_killed_consumers_job_is_redelivered_after_its_lease(cluster, db, name):
    create_notify_queue(db, name, backoff_base="0", backoff_max="0")
    first = Consumer(cluster, name, f"{name}-first", "--lease", "2", "--poll", "60")
    wait_listening(db, name, 1)
    job = scalar(db, "SELECT queue.enqueue(%s, '{\"sleep\": 3}')", (name,))
    wait_for(lambda: scalar(db, "SELECT consumer FROM queue.jobs WHERE id = %s", (job,)),
             timeout=30, interval=0.005, what="the first consumer holding the job")
    # It heartbeats meanwhile (every third of the lease): the job outlives its 2 s lease.
    time.sleep(2.5)
    assert scalar(db, "SELECT consumer FROM queue.jobs WHERE id = %s", (job,)) == f"{name}-first"
    first.kill()
    killed = time.monotonic()
    second = Consumer(cluster, name, f"{name}-second", "--lease", "2", "--poll", "60")
    try:
        wait_for(lambda: scalar(db, "SELECT state = 'succeeded' FROM queue.history WHERE id = %s",
                                (job,)), timeout=30, what="the job completed by the second consumer")
        took = time.monotonic() - killed
    finally:
        assert second.stop() == 0
    row = db.execute("SELECT consumer, attempts, errors->0->>'message' FROM queue.history "
                     "WHERE id = %s", (job,)).fetchone()
    assert row == (f"{name}-second", 2, f"lease expired (consumer {name}-first)")
    assert [line[:2] for line in second.lines] == [["completed", str(job)]]
    print(f"\nkilled consumer's job completed elsewhere {took:.2f}s after the kill "
          "(lease 2 s, then the 3 s job)")


def test_notify_wakes_a_waiting_consumer(cluster, db, name):
    create_notify_queue(db, name)
    consumer = Consumer(cluster, name, f"{name}-c", "--poll", "60")
    try:
        wait_listening(db, name, 1)
        latencies = []
        for _ in range(20):
            with db.transaction():
                job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
                # created_at is the transaction start: take the time at the end instead.
                committed = scalar(db, "SELECT clock_timestamp()")
            started = wait_for(lambda: scalar(db, "SELECT started_at FROM queue.job_status "
                                                  "WHERE id = %s AND started_at IS NOT NULL", (job,)),
                               timeout=30, interval=0.002, what="the job claimed")
            latencies.append((started - committed).total_seconds() * 1000)
        wait_terminal(db, name, 20)
    finally:
        assert consumer.stop() == 0
    # With a 60 s poll fallback, any pickup under it came from the notification.
    assert max(latencies) < 30_000
    print(f"\nNOTIFY pickup over 20 jobs: p50 {statistics.median(latencies):.2f} ms, "
          f"max {max(latencies):.2f} ms")


def test_jobs_ready_by_time_are_announced(cluster, db, name):
    create_notify_queue(db, name)
    with psycopg.connect(cluster.dsn(), autocommit=True) as listener:
        channel = scalar(listener, "SELECT queue.channel(%s)", (name,))
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        job = scalar(db, "SELECT queue.enqueue(%s, run_at => now() + interval '500 ms')", (name,))
        run_at = scalar(db, "SELECT run_at FROM queue.jobs WHERE id = %s", (job,))
        notes = list(listener.notifies(timeout=10, stop_after=1))
        heard = scalar(listener, "SELECT clock_timestamp()")
    assert [(n.channel, n.payload) for n in notes] == [(channel, str(job))]
    late_ms = (heard - run_at).total_seconds() * 1000
    assert 0 <= late_ms < 1000, late_ms
    print(f"\nscheduled job announced {late_ms:.1f} ms after its run_at")


def test_consumer_reconnects_after_losing_its_connection(cluster, db, name):
    create_notify_queue(db, name)
    consumer = Consumer(cluster, name, f"{name}-c", "--poll", "1")
    try:
        wait_listening(db, name, 1)
        killed = scalar(db, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = %s", (f"{name}-c",))
        assert killed >= 1
        db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[50]))", (name,))
        assert wait_terminal(db, name, 50) == {"succeeded": 50}
    finally:
        assert consumer.stop() == 0


def test_sigterm_finishes_the_job_in_hand(cluster, db, name):
    create_notify_queue(db, name)
    consumer = Consumer(cluster, name, f"{name}-c")
    wait_listening(db, name, 1)
    job = scalar(db, "SELECT queue.enqueue(%s, '{\"sleep\": 1}')", (name,))
    # Started, not just claimed: a claimed job not yet started is given back instead.
    wait_for(lambda: consumer.working_on(job), timeout=30, interval=0.005, what="the job started")
    assert consumer.stop() == 0
    assert scalar(db, "SELECT state::text FROM queue.history WHERE id = %s", (job,)) == "succeeded"


def test_sigterm_stops_an_idle_consumer_without_waiting_for_its_poll(cluster, db, name):
    create_notify_queue(db, name)
    consumer = Consumer(cluster, name, f"{name}-c", "--poll", "600")
    wait_listening(db, name, 1)
    assert consumer.stop(timeout=15) == 0     # not 600 s


def test_workers_view_lists_executors_and_consumers(cluster, db, name):
    create_notify_queue(db, name)
    db.execute("SELECT queue.enqueue(%s)", (name,))
    claimed = db.execute("SELECT id FROM queue.claim(%s, 'psql-admin', 1, '1 minute')",
                         (name,)).fetchone()[0]
    rows = db.execute("SELECT kind, name, jobs, job_ids FROM queue.workers ORDER BY kind, name").fetchall()
    kinds = collections.Counter(r[0] for r in rows)
    assert kinds["executor"] == int(scalar(db, "SHOW queue.max_workers"))
    assert ("consumer", "psql-admin", 1, [claimed]) in rows


def test_rust_consumers_drain_jobs_and_survive_a_kill(cluster, db, name, rust_consumer):
    create_notify_queue(db, name, backoff_base="0", backoff_max="0")
    doomed = Consumer(cluster, name, f"{name}-doomed", "--lease", "1", command=rust_consumer)
    wait_listening(db, name, 1)
    job = scalar(db, "SELECT queue.enqueue(%s, '{\"sleep\": 0.5}')", (name,))
    wait_for(lambda: scalar(db, "SELECT consumer FROM queue.jobs WHERE id = %s", (job,)),
             timeout=30, interval=0.005, what="the doomed consumer holding the job")
    doomed.kill()
    consumers = [Consumer(cluster, name, f"{name}-c{i}", "--lease", "1", command=rust_consumer)
                 for i in range(2)]
    try:
        wait_listening(db, name, 3)
        db.execute("SELECT queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('fail', i %% 100 = 0) "
                   "FROM generate_series(1, 500) i))", (name,))
        states = wait_terminal(db, name, 501, timeout=120)
    finally:
        codes = [c.stop() for c in consumers]
    assert codes == [0, 0]
    # The 5 jobs asked to fail used their 5 attempts; every other job succeeded once.
    assert states == {"succeeded": 496, "failed": 5}
    assert_completed_once(consumers, 496)
    assert job_row_of(db, job) == ("succeeded", 2, f"lease expired (consumer {name}-doomed)")


def job_row_of(db, job):
    return db.execute("SELECT state::text, attempts, errors->0->>'message' FROM queue.history "
                      "WHERE id = %s", (job,)).fetchone()

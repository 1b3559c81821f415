#!/usr/bin/env python3
"""A pg_queue consumer for NOTIFY queues, with nothing but psycopg 3.

    python3 consumer.py --dsn "dbname=app" --queue emails

It LISTENs on the queue's channel, claims jobs, keeps each job's lease alive from a
heartbeat thread while `handle()` works, then completes or fails the job. A lost
connection is retried with backoff (a job whose completion was lost comes back after its
lease: delivery is at-least-once, so make `handle()` idempotent). SIGTERM or Ctrl-C: stop
claiming, finish the job in hand, exit.

Replace `handle()` with your work. This one sleeps `payload["sleep"]` seconds and raises
when `payload["fail"]` is true; it prints one line per finished job.
"""
import argparse
import json
import os
import signal
import socket
import sys
import threading
import time

import psycopg
from psycopg import sql


def handle(payload):
    """The work. Returns the job's result (any JSON value); an exception fails the attempt."""
    time.sleep(float(payload.get("sleep", 0)))
    if payload.get("fail"):
        raise RuntimeError("payload asked to fail")
    return {"done_by": os.getpid()}


class Heartbeat(threading.Thread):
    """Extends the lease of every job in hand, every third of the lease, on its own
    connection. A job whose lease is gone (cancelled, or expired and reaped) is dropped from
    the heartbeats: its `complete` will say so (false)."""

    def __init__(self, dsn, lease):
        super().__init__(daemon=True)
        self.dsn, self.lease = dsn, lease
        self.jobs = {}  # id -> lease token
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self):
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.wait(self.lease / 3):
                    with self.lock:
                        jobs = list(self.jobs.items())
                    for job_id, token in jobs:
                        if not conn.execute("SELECT queue.heartbeat(%s, %s)", (job_id, token)).fetchone()[0]:
                            with self.lock:
                                self.jobs.pop(job_id, None)
        except psycopg.Error as e:
            # Without heartbeats the leases run out and the jobs go to other consumers.
            log(f"heartbeats stopped: {e}")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def wait_for_work(conn, poll, stopping):
    """Sleeps until a notification (a job became ready), `poll` seconds (the fallback), or
    a stop request. Waits in slices of a second: a signal does not interrupt psycopg's
    wait, so the stop flag is looked at between slices."""
    deadline = time.monotonic() + poll
    while not stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or any(True for _ in conn.notifies(timeout=min(1.0, left), stop_after=1)):
            return


def run(args, stopping):
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        channel = conn.execute("SELECT queue.channel(%s)", (args.queue,)).fetchone()[0]
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        log(f"{args.name}: listening on {channel}")
        beat = Heartbeat(args.dsn, args.lease)
        beat.start()
        try:
            while not stopping.is_set():
                jobs = conn.execute(
                    "SELECT id, payload, attempt, lease_token FROM queue.claim(%s, %s, %s, %s)",
                    (args.queue, args.name, args.batch, f"{args.lease} seconds")).fetchall()
                if not jobs:
                    wait_for_work(conn, args.poll, stopping)
                    continue
                with beat.lock:
                    beat.jobs.update((job_id, token) for job_id, _, _, token in jobs)
                for job_id, payload, attempt, token in jobs:
                    if stopping.is_set():
                        # Not started: give it back at once rather than at lease expiry.
                        conn.execute("SELECT queue.fail(%s, %s, 'consumer stopping', '0')",
                                     (job_id, token))
                    else:
                        work(conn, beat, job_id, payload, attempt, token)
                    with beat.lock:
                        beat.jobs.pop(job_id, None)
        finally:
            beat.stop.set()


def work(conn, beat, job_id, payload, attempt, token):
    log(f"working on {job_id} (attempt {attempt})")
    try:
        result = handle(payload)
    except Exception as e:  # the handler's failure is the job's, not the consumer's
        ok = conn.execute("SELECT queue.fail(%s, %s, %s)", (job_id, token, repr(e))).fetchone()[0]
        print(f"failed {job_id} attempt {attempt} recorded={ok}", flush=True)
        return
    ok = conn.execute("SELECT queue.complete(%s, %s, %s)",
                      (job_id, token, json.dumps(result))).fetchone()[0]
    # ok is false when the lease was lost meanwhile: another consumer has the job now.
    print(f"{'completed' if ok else 'lost'} {job_id} attempt {attempt}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""))
    p.add_argument("--queue", required=True)
    p.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}",
                   help="unique consumer name (default: host-pid)")
    p.add_argument("--batch", type=int, default=1, help="jobs claimed at a time")
    p.add_argument("--lease", type=float, default=30, help="lease in seconds")
    p.add_argument("--poll", type=float, default=5, help="claim at least this often (seconds)")
    args = p.parse_args()

    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())

    delay = 0.1
    while not stopping.is_set():
        try:
            run(args, stopping)
        except psycopg.OperationalError as e:
            log(f"{args.name}: connection lost ({e}); reconnecting in {delay:.1f}s")
            stopping.wait(delay)
            delay = min(delay * 2, 10)
        else:
            delay = 0.1
    log(f"{args.name}: stopped")


if __name__ == "__main__":
    main()

"""Claims while another session holds an old snapshot (docs/design.md "Under a held
snapshot", src/worker/cursors.rs): the entries of claimed and finished jobs stay in
jobs_ready_idx and cannot be marked dead, so claims must not read them all each time, and
jobs that become ready behind where claims resume must still run."""
import time

import psycopg

from conftest import scalar, wait_for, wait_terminal

# A missed job must not be found by the poll fallback instead of a claim.
# Commits without waiting for the disk: one job per claim then costs CPU only.
CLUSTER_SETTINGS = {"queue.poll_interval": "'60s'", "autovacuum": "off", "synchronous_commit": "off"}

DEAD = 60_000      # jobs claimed and finished while the snapshot is held


def index_reads(db):
    """Index entries read so far from the claim index and the running-jobs index
    (executors flush their counts at most once a second, and when they go idle)."""
    db.execute("SELECT pg_stat_clear_snapshot()")
    return dict(db.execute("SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes "
                           "WHERE schemaname = 'queue' "
                           "AND indexrelname IN ('jobs_ready_idx', 'jobs_running_idx')").fetchall())


def started_after(db, name, job, at):
    """Seconds from `at` to the start of job `job` (waits for it to finish)."""
    wait_for(lambda: scalar(db, "SELECT state = 'succeeded' FROM queue.status(%s)", (job,)),
             timeout=30, what=f"job {job} to succeed")
    return (scalar(db, "SELECT started_at FROM queue.status(%s)", (job,)) - at).total_seconds()


def test_claims_under_a_held_snapshot(cluster, db, name):
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ SELECT 1 $$")
    # A concurrency limit: each claim also counts the queue's running jobs.
    db.execute("SELECT queue.create_queue(%s, %s, concurrency => 1000)", (name, f"{name}_h(jsonb)"))
    holder = psycopg.connect(cluster.dsn())
    try:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM queue.jobs")   # takes the snapshot
        for _ in range(DEAD // 1000):
            db.execute("SELECT count(*) FROM queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[1000]))",
                       (name,))
        wait_terminal(db, name, DEAD, timeout=300)

        # A stream: jobs enqueued one per transaction, claimed one per claim (batch_size
        # 1). A claim from the head of the queue reads every one of the DEAD entries.
        db.execute("ALTER SYSTEM SET queue.batch_size = 1")
        db.execute("SELECT pg_reload_conf()")
        time.sleep(1.2)     # executors flush their index statistics at most once a second
        before = index_reads(db)
        stream = 2000
        started = time.monotonic()
        for i in range(stream):
            db.execute("SELECT queue.enqueue(%s, %s)", (name, f'{{"i": {i}}}'))
        wait_terminal(db, name, DEAD + stream, timeout=60)
        secs = time.monotonic() - started
        time.sleep(1.2)
        after = index_reads(db)
        per_job = {i: (after[i] - before[i]) / stream for i in after}
        print(f"{stream} jobs streamed in {secs:.1f} s: index entries read per job: "
              f"{per_job} ({DEAD:,} dead in each)")
        # Full passes from the head take a twentieth of the executors' time at most; the
        # running jobs are counted from the oldest start among them.
        assert per_job["jobs_ready_idx"] < DEAD / 4, per_job
        assert per_job["jobs_running_idx"] < DEAD / 4, per_job
        db.execute("ALTER SYSTEM RESET queue.batch_size")
        db.execute("SELECT pg_reload_conf()")

        # The claims now resume far past the head. Jobs that become ready behind them:
        # 1. committed by a transaction that began long before (its run_at): its commit
        #    asks executors for a full pass;
        with psycopg.connect(cluster.dsn()) as slow:
            late = scalar(slow, "SELECT queue.enqueue(%s, '{\"late\": true}')", (name,))
            for i in range(20):           # claims move on past it meanwhile
                db.execute("SELECT queue.enqueue(%s)", (name,))
                time.sleep(0.02)
            slow.commit()
            committed = scalar(db, "SELECT clock_timestamp()")
        latency = started_after(db, name, late, committed)
        print(f"job of a 0.4 s transaction started {latency * 1000:.1f} ms after its commit")
        assert latency < 1.0, latency
        # 2. a run_at in the past (no full pass is asked for: the periodic one finds it);
        past = scalar(db, "SELECT queue.enqueue(%s, run_at => now() - interval '1 hour')", (name,))
        enqueued = scalar(db, "SELECT clock_timestamp()")
        latency = started_after(db, name, past, enqueued)
        print(f"job with run_at an hour ago started after {latency * 1000:.1f} ms")
        assert latency < 5.0, latency
        # 3. a higher priority than the claims resume at.
        first = scalar(db, "SELECT queue.enqueue(%s, priority => -5)", (name,))
        enqueued = scalar(db, "SELECT clock_timestamp()")
        assert started_after(db, name, first, enqueued) < 1.0
    finally:
        holder.close()
    # Nothing was lost or run twice.
    counts = wait_terminal(db, name, DEAD + stream + 23)
    assert counts == {"succeeded": DEAD + stream + 23}, counts
    assert scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s AND attempts <> 1",
                  (name,)) == 0

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

        # The scheduler's reaper ticks every second, but reads the running jobs' index (an
        # entry per job run since the snapshot) only once an executor exited or a minute
        # passed: at most one walk of the DEAD entries in 3.5 s, not one per tick.
        time.sleep(1.2)
        before = index_reads(db)
        time.sleep(3.5)
        walked = index_reads(db)["jobs_running_idx"] - before["jobs_running_idx"]
        print(f"idle for 3.5 s: {walked:,} entries of jobs_running_idx read ({DEAD:,} dead)")
        assert walked < 2 * DEAD, walked

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

        # A slow stream, 20 jobs/s for 12 s. Full passes from the head, each a walk past the
        # DEAD entries, come once in 10 s at most per executor; those between look from
        # where the last one found the queue's ready jobs to begin.
        time.sleep(1.2)
        before = index_reads(db)["jobs_ready_idx"]
        slow_stream = 240
        for i in range(slow_stream):
            db.execute("SELECT queue.enqueue(%s, %s)", (name, f'{{"slow": {i}}}'))
            time.sleep(0.05)
        wait_terminal(db, name, DEAD + stream + slow_stream, timeout=60)
        time.sleep(1.2)
        walks = (index_reads(db)["jobs_ready_idx"] - before) / DEAD
        print(f"{slow_stream} jobs streamed in 12 s: {walks:.1f} walks' worth of jobs_ready_idx read")
        assert walks < 6, walks

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
        # 2. a run_at in the past: its commit rewinds them to it (full passes from the head
        #    come only every 10 s or more now, and those between look from where the last
        #    one found the queue's jobs to begin, past it);
        past = scalar(db, "SELECT queue.enqueue(%s, run_at => now() - interval '1 hour')", (name,))
        enqueued = scalar(db, "SELECT clock_timestamp()")
        latency = started_after(db, name, past, enqueued)
        print(f"job with run_at an hour ago started after {latency * 1000:.1f} ms")
        assert latency < 1.0, latency
        # 3. a higher priority than the claims resume at;
        first = scalar(db, "SELECT queue.enqueue(%s, priority => -5)", (name,))
        enqueued = scalar(db, "SELECT clock_timestamp()")
        assert started_after(db, name, first, enqueued) < 1.0
        # 4. released by its last dependency, keeping a run_at long past: the release rewinds.
        with db.transaction():
            parent = scalar(db, "SELECT queue.enqueue(%s)", (name,))
            child = scalar(db, "SELECT queue.enqueue(%s, run_at => now() - interval '1 hour', "
                               "depends_on => ARRAY[%s]::uuid[])", (name, parent))
        started_after(db, name, parent, enqueued)
        released = scalar(db, "SELECT finished_at FROM queue.history WHERE id = %s", (parent,))
        latency = started_after(db, name, child, released)
        print(f"dependent with run_at an hour ago started {latency * 1000:.1f} ms after its release")
        assert latency < 1.0, latency
        # 5. made ready by nothing that rewinds or wakes (a superuser moving a scheduled
        #    job's run_at into the past): a full pass from the head finds it within 10 s
        #    (cursors.rs MIN_HEAD_INTERVAL), though executors poll once a minute here.
        hidden = scalar(db, "SELECT queue.enqueue(%s, run_at => now() + interval '1 hour')", (name,))
        time.sleep(0.5)     # the executors are idle
        db.execute("UPDATE queue.jobs SET run_at = now() - interval '2 hours' WHERE id = %s", (hidden,))
        moved = scalar(db, "SELECT clock_timestamp()")
        latency = started_after(db, name, hidden, moved)
        print(f"job moved behind the claims unannounced started after {latency:.1f} s")
        assert latency < 15, latency
    finally:
        holder.close()
    # Nothing was lost or run twice.
    counts = wait_terminal(db, name, DEAD + stream + slow_stream + 26)
    assert counts == {"succeeded": DEAD + stream + slow_stream + 26}, counts
    assert scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s AND attempts <> 1",
                  (name,)) == 0


def test_backlog_of_one_transaction(cluster, db, name):
    """A backlog enqueued in one transaction shares one run_at (its transaction's now()):
    claims resume after the last job they took, not at the start of that run_at, so that
    each claim does not read again the entries of every job claimed before it."""
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ SELECT 1 $$")
    db.execute("SELECT queue.create_queue(%s, %s, concurrency => 10000, paused => true)",
               (name, f"{name}_h(jsonb)"))
    backlog = 20_000
    db.execute("SELECT count(*) FROM queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[%s]))",
               (name, backlog))
    holder = psycopg.connect(cluster.dsn())
    try:
        # Held: the entries of claimed jobs can be neither removed nor marked dead.
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM queue.jobs")
        time.sleep(1.2)     # executors flush their index statistics at most once a second
        before = index_reads(db)["jobs_ready_idx"]
        db.execute("SELECT queue.resume(%s)", (name,))
        wait_terminal(db, name, backlog, timeout=120)
        # Each job was read at least once; the executors' last counts follow within a second.
        wait_for(lambda: index_reads(db)["jobs_ready_idx"] - before >= backlog,
                 timeout=30, what="the executors' index statistics")
        time.sleep(1.2)
        per_job = (index_reads(db)["jobs_ready_idx"] - before) / backlog
        # Claims of 64 from the start of the run_at read 20 000 / 128 = 156 entries per job
        # on average; full passes from the head take a fiftieth of the executors' time.
        print(f"{backlog:,} jobs of one transaction: {per_job:.1f} entries of jobs_ready_idx read per job")
        assert per_job < 40, per_job
    finally:
        holder.close()
    assert wait_terminal(db, name, backlog) == {"succeeded": backlog}


def seq_scans_of_jobs(db):
    """Sequential scans of queue.jobs so far, by every process (executors flush their
    counts at most once a second)."""
    db.execute("SELECT pg_stat_clear_snapshot()")
    return scalar(db, "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'queue.jobs'::regclass")


def test_executors_never_scan_the_jobs_table(cluster, db, name):
    """Under a held snapshot, vacuum finds the jobs table's pages full of dead rows it may
    not remove and few live ones; the planner then costs a lookup of a batch's jobs by
    primary key above reading every page. Executors used to plan their record and claim
    that way (each batch a scan of the whole table: a limited queue served at 200 jobs/s
    with pickups of up to 28 s); they plan their own statements with enable_seqscan off."""
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ SELECT 1 $$")
    # The default concurrency limit: claims also take the claim lock and count.
    db.execute("SELECT queue.create_queue(%s, %s)", (name, f"{name}_h(jsonb)"))
    # The scheduler's own passes read queue.jobs too; they are not what this test is about.
    db.execute("ALTER SYSTEM SET queue.maintenance_interval = '1h'")
    db.execute("SELECT pg_reload_conf()")
    holder = psycopg.connect(cluster.dsn())
    try:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM queue.jobs")   # takes the snapshot
        for _ in range(20):
            db.execute("SELECT count(*) FROM queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[1000]))",
                       (name,))
        wait_terminal(db, name, 20_000, timeout=120)
        # A few live rows (as a backlog or running jobs would be): ANALYZE then counts the
        # primary key's entries as those few, against all of its pages.
        paused = f"{name}_p"
        db.execute("SELECT queue.create_queue(%s, %s, paused => true)", (paused, f"{name}_h(jsonb)"))
        db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[2]))", (paused,))
        db.execute("VACUUM ANALYZE queue.jobs")     # autovacuum is off in this cluster
        # Where the planner's choice tips depends on the table's shape and the settings (a
        # real stall: 3 600 pages, a record of 6 jobs); a costlier random read sets it here.
        db.execute("ALTER SYSTEM SET random_page_cost = 100")
        db.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        # The trap is set: a lookup of a batch's jobs by id (10: the queue's concurrency
        # limit) is planned as a scan.
        ids = [r[0] for r in db.execute("SELECT queue.uuid_generate_v7() FROM generate_series(1, 10)")]
        plan = "\n".join(r[0] for r in db.execute(
            "EXPLAIN SELECT * FROM queue.jobs WHERE id = ANY(%s::uuid[])", (ids,)))
        assert "Seq Scan" in plan, plan

        time.sleep(1.2)
        before = seq_scans_of_jobs(db)
        stream = 300      # in batches of 10 jobs, as a backlog is claimed
        for _ in range(stream // 10):
            db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[10]))", (name,))
        wait_for(lambda: scalar(db, "SELECT count(*) FROM queue.history WHERE queue = %s",
                                (name,)) == 20_000 + stream,
                 timeout=60, what="the stream to finish")
        time.sleep(1.2)
        assert seq_scans_of_jobs(db) == before
        # A NOTIFY consumer's claims fetch their rows by primary key as well.
        notify = f"{name}_n"
        db.execute("SELECT queue.create_queue(%s, notify => true)", (notify,))
        db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[20]))", (notify,))
        for queues in ("%s::text", "ARRAY[%s::text]"):      # both claim(queue) and claim(queues[])
            claimed = db.execute(f"SELECT id, lease_token FROM queue.claim({queues}, 'c', 10)",
                                 (notify,)).fetchall()
            assert len(claimed) == 10
            for job, token in claimed:
                assert scalar(db, "SELECT queue.complete(%s, %s)", (job, token))
        time.sleep(1.2)     # a backend flushes its counts when idle, at most once a second
        assert seq_scans_of_jobs(db) == before
    finally:
        holder.close()
        db.execute("ALTER SYSTEM RESET queue.maintenance_interval")
        db.execute("ALTER SYSTEM RESET random_page_cost")
        db.execute("SELECT pg_reload_conf()")

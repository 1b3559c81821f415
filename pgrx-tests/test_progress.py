"""Progress reports: a handler's queue.set_progress() is seen by other sessions while its
transaction is still open, and kept with the attempt's outcome; consumers report it with
heartbeat. Only roles that see the job see its progress."""
import pytest
from psycopg.types.json import Jsonb

from conftest import plpgsql_queue, scalar, sqlstate, wait_for, wait_terminal

LOCK = 7707


@pytest.fixture(scope="module")
def roles(cluster):
    with cluster.connect() as su:
        for r in ("p_owner", "p_outsider"):
            su.execute(f"CREATE ROLE {r} LOGIN")
        su.execute("GRANT USAGE ON SCHEMA queue TO p_owner, p_outsider")
        su.execute("GRANT CREATE ON SCHEMA public TO p_owner")
    return cluster


def status(conn, job):
    return conn.execute("SELECT state::text, progress, errors FROM queue.status(%s)", (job,)).fetchone()


def test_progress_is_seen_while_the_handler_runs_and_kept_after(cluster, db, name):
    # The handler reports, then blocks on a lock the test holds, then reports again.
    plpgsql_queue(db, name, f"""
        INSERT INTO public.{name} VALUES (1);
        PERFORM queue.set_progress('{{"done": 1, "of": 2}}');
        PERFORM pg_advisory_xact_lock({LOCK});
        PERFORM queue.set_progress('{{"done": 2, "of": 2}}');""")
    with cluster.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
        state, progress, _ = wait_for(lambda: (s := status(db, job)) and s[1] is not None and s[0] == "running" and s,
                                      what="progress while running")
        assert progress == {"done": 1, "of": 2}
        # Not committed: the handler's row is not visible, its progress is.
        assert scalar(db, f"SELECT count(*) FROM {name}") == 0
        workers = db.execute("SELECT progress FROM queue.workers WHERE %s = ANY(job_ids)", (job,)).fetchall()
        assert workers == [({str(job): {"done": 1, "of": 2}},)]
        holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}
    assert status(db, job)[:2] == ("succeeded", {"done": 2, "of": 2})
    assert scalar(db, f"SELECT count(*) FROM {name}") == 1


def test_each_failed_attempt_keeps_its_progress(db, name):
    plpgsql_queue(db, name, """
        PERFORM queue.set_progress(jsonb_build_object('attempt', (SELECT attempt FROM queue.current_job())));
        RAISE EXCEPTION 'boom';""", max_attempts=2, backoff_base="10 milliseconds")
    job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
    assert wait_terminal(db, name, 1) == {"failed": 1}
    state, progress, errors = status(db, job)
    assert progress == {"attempt": 2}
    assert [e["progress"] for e in errors] == [{"attempt": 1}, {"attempt": 2}]
    assert [e["message"] for e in errors] == ["boom", "boom"]


def test_a_retry_does_not_show_the_last_attempts_progress(cluster, db, name):
    # Attempt 1 reports and fails; attempt 2 blocks before reporting: status shows none.
    plpgsql_queue(db, name, f"""
        IF (SELECT attempt FROM queue.current_job()) = 1 THEN
            PERFORM queue.set_progress('{{"first": true}}');
            RAISE EXCEPTION 'again';
        END IF;
        PERFORM pg_advisory_xact_lock({LOCK});""", max_attempts=2, backoff_base="10 milliseconds")
    with cluster.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
        wait_for(lambda: scalar(db, "SELECT attempts = 2 AND state = 'running' FROM queue.status(%s)", (job,)),
                 what="second attempt running")
        assert status(db, job)[1] is None
        holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}
    state, progress, errors = status(db, job)
    assert progress is None and errors[0]["progress"] == {"first": True}


def test_reads_are_never_torn(cluster, db, name):
    # The handler rewrites its progress as fast as it can, with texts of changing length;
    # every report another session reads must be one the handler wrote, whole.
    plpgsql_queue(db, name, f"""
        FOR i IN 1 .. 1000000 LOOP
            PERFORM queue.set_progress(jsonb_build_object('i', i, 'fill', repeat(chr(65 + i % 26), 100 + i % 1500)));
            EXIT WHEN i % 1000 = 0 AND pg_try_advisory_xact_lock_shared({LOCK});
        END LOOP;""")
    with cluster.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK,))    # the handler stops once it is gone
        job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
        wait_for(lambda: status(db, job)[1], what="first report")
        seen = set()
        for _ in range(300):
            state, progress, _ = status(db, job)
            assert state == "running" and progress is not None
            i = progress["i"]
            assert progress["fill"] == chr(65 + i % 26) * (100 + i % 1500)
            seen.add(i)
        assert len(seen) > 10       # it was being rewritten while we read
        holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}


def test_only_roles_that_see_the_job_see_its_progress(roles, name):
    with roles.connect(user="p_owner") as o, roles.connect(user="p_outsider") as m, \
            roles.connect() as holder:
        plpgsql_queue(o, name, f"""
            PERFORM queue.set_progress('{{"secret": 42}}');
            PERFORM pg_advisory_xact_lock({LOCK});""")
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        job = scalar(o, "SELECT queue.enqueue(%s, '{}')", (name,))
        wait_for(lambda: status(o, job)[1], what="progress")
        worker = scalar(holder, "SELECT worker_id FROM queue.jobs WHERE id = %s", (job,))
        assert scalar(o, "SELECT queue.job_progress(%s, %s)", (job, worker)) == {"secret": 42}
        # The outsider learns nothing, even calling the views' function with the right ids.
        assert scalar(m, "SELECT queue.job_progress(%s, %s)", (job, worker)) is None
        assert m.execute("SELECT * FROM queue.status(%s)", (job,)).fetchall() == []
        assert m.execute("SELECT progress FROM queue.workers WHERE progress IS NOT NULL").fetchall() == []
        holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
        assert wait_terminal(holder, name, 1) == {"succeeded": 1}


def test_set_progress_outside_a_handler_and_too_large(db, name):
    assert sqlstate(db, "SELECT queue.set_progress('{}')") == "55000"
    plpgsql_queue(db, name, "PERFORM queue.set_progress(jsonb_build_object('x', repeat('y', 3000)));",
                  max_attempts=1)
    job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
    assert wait_terminal(db, name, 1) == {"failed": 1}
    state, progress, errors = status(db, job)
    assert progress is None and errors[0]["sqlstate"] == "54000"


# --- external consumers ------------------------------------------------------------------

def claim_one(db, queue):
    return db.execute("SELECT id, lease_token FROM queue.claim(%s, 'c1', 1)", (queue,)).fetchone()


def test_consumers_report_progress_with_heartbeat(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, max_attempts => 2, backoff_base => '1 millisecond')",
               (name,))
    job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
    _, token = claim_one(db, name)
    assert scalar(db, "SELECT queue.heartbeat(%s, %s, progress => %s)", (job, token, Jsonb({"n": 1}))) is True
    assert status(db, job)[1] == {"n": 1}
    assert scalar(db, "SELECT queue.heartbeat(%s, %s)", (job, token)) is True      # NULL keeps it
    assert status(db, job)[1] == {"n": 1}
    workers = db.execute("SELECT progress FROM queue.workers WHERE name = 'c1'").fetchone()[0]
    assert workers == {str(job): {"n": 1}}
    # Too large: 54000, lease and progress unchanged.
    big = Jsonb({"x": "y" * 3000})
    assert sqlstate(db, "SELECT queue.heartbeat(%s, %s, progress => %s)", (job, token, big)) == "54000"
    assert status(db, job)[1] == {"n": 1}
    # A failed attempt keeps its report in its errors entry; the next attempt starts without.
    assert scalar(db, "SELECT queue.fail(%s, %s, 'flaky')", (job, token)) is True
    state, progress, errors = status(db, job)
    assert (state, progress, errors[0]["progress"]) == ("queued", None, {"n": 1})
    _, token = wait_for(lambda: claim_one(db, name), what="retry ready")
    db.execute("SELECT queue.heartbeat(%s, %s, progress => '{\"n\": 2}')", (job, token))
    assert scalar(db, "SELECT queue.complete(%s, %s)", (job, token)) is True
    assert status(db, job)[:2] == ("succeeded", {"n": 2})


def test_a_reaped_consumer_attempt_keeps_its_progress(db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, max_attempts => 1)", (name,))
    job = scalar(db, "SELECT queue.enqueue(%s, '{}')", (name,))
    token = db.execute("SELECT lease_token FROM queue.claim(%s, 'c2', 1, lease => '1 second')", (name,)).fetchone()[0]
    db.execute("SELECT queue.heartbeat(%s, %s, progress => '{\"half\": true}')", (job, token))
    wait_for(lambda: (db.execute("SELECT queue.reap()"), status(db, job)[0] == "failed")[1],
             what="lease expired and reaped")
    state, progress, errors = status(db, job)
    assert progress == {"half": True} and errors[-1]["progress"] == {"half": True}
    assert errors[-1]["message"].startswith("lease expired")

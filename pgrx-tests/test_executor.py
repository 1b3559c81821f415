"""In-database executors on a real cluster: jobs run, retry, time out, pause, and run as
the queue owner. Handlers commit their writes together with their job's completion."""
import time

import psycopg
import pytest

from conftest import plpgsql_queue, scalar, wait_for, wait_terminal


def make_queue(db, name, body, **opts):
    """A table `name` and a queue `name` whose procedure handler runs `body` (PL/pgSQL)."""
    plpgsql_queue(db, name, body, "n int, attempt int, who text, at timestamptz DEFAULT clock_timestamp()",
                  **opts)


def executor_pids(db):
    return sorted(r[0] for r in db.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_queue executor'"))


# 10: claims serialised by the queue's claim lock; 10000: beyond what executors can hold,
# so claims take no lock and executors commit side by side.
@pytest.mark.parametrize("concurrency", [10, 10000])
def test_2000_jobs_each_insert_one_row(db, name, concurrency):
    make_queue(db, name, f"INSERT INTO {name} (n) VALUES ((payload->>'n')::int);",
               concurrency=concurrency)
    db.execute("SELECT queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('n', i) "
               "FROM generate_series(1, 2000) i))", (name,))
    states = wait_terminal(db, name, 2000, timeout=120)
    assert states == {"succeeded": 2000}
    assert scalar(db, f"SELECT count(*) FROM {name}") == 2000
    assert scalar(db, f"SELECT count(DISTINCT n) FROM {name}") == 2000
    assert scalar(db, "SELECT max(attempts) FROM queue.history WHERE queue = %s", (name,)) == 1


def test_fails_twice_then_succeeds(db, name):
    make_queue(db, name, f"""
        INSERT INTO {name} (attempt) SELECT attempt FROM queue.current_job();
        IF (SELECT attempt FROM queue.current_job()) < 3 THEN
            RAISE EXCEPTION 'boom %', (SELECT attempt FROM queue.current_job());
        END IF;""", backoff_base="10 ms", backoff_max="50 ms")
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    wait_terminal(db, name, 1)
    st = db.execute("SELECT state::text, attempts, errors FROM queue.status(%s)", (job,)).fetchone()
    assert st[0] == "succeeded" and st[1] == 3
    assert [e["message"] for e in st[2]] == ["boom 1", "boom 2"]
    assert [e["attempt"] for e in st[2]] == [1, 2]
    assert all(e["sqlstate"] == "P0001" for e in st[2])
    # The failed attempts' writes were rolled back; the successful one's committed.
    assert [r[0] for r in db.execute(f"SELECT attempt FROM {name}")] == [3]


def test_always_failing_job_ends_failed(db, name):
    before = executor_pids(db)
    make_queue(db, name, "RAISE EXCEPTION 'always';", max_attempts=3,
               backoff_base="10 ms", backoff_max="20 ms")
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    assert wait_terminal(db, name, 1) == {"failed": 1}
    st = db.execute("SELECT attempts, jsonb_array_length(errors), last_error "
                    "FROM queue.status(%s)", (job,)).fetchone()
    assert st == (3, 3, "always")
    # An ERROR in a handler never kills an executor.
    assert executor_pids(db) == before


def test_a_handlers_own_sqlstate_is_kept(db, name):
    """Codes Postgres does not define (an application's own) reach errors unchanged, as do
    standard ones, also when the handler caught another error first."""
    make_queue(db, name, """
        BEGIN PERFORM 1 / 0; EXCEPTION WHEN division_by_zero THEN NULL; END;
        RAISE EXCEPTION 'quota' USING ERRCODE = CASE WHEN payload ? 'std' THEN '23505' ELSE 'AB123' END;""",
               max_attempts=1)
    own = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    std = scalar(db, "SELECT queue.enqueue(%s, '{\"std\": 1}')", (name,))
    assert wait_terminal(db, name, 2) == {"failed": 2}
    codes = [scalar(db, "SELECT errors->0->>'sqlstate' FROM queue.status(%s)", (j,)) for j in (own, std)]
    assert codes == ["AB123", "23505"]


def test_handler_past_its_timeout_is_stopped_and_retried(db, name):
    make_queue(db, name, "PERFORM pg_sleep(30);", timeout="200 ms", max_attempts=2,
               backoff_base="10 ms", backoff_max="10 ms")
    start = time.monotonic()
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    assert wait_terminal(db, name, 1, timeout=20) == {"failed": 1}
    assert time.monotonic() - start < 15  # two 200 ms attempts, not two 30 s sleeps
    errors = scalar(db, "SELECT errors FROM queue.status(%s)", (job,))
    assert [e["sqlstate"] for e in errors] == ["57014", "57014"]
    assert "statement timeout" in errors[0]["message"]


def test_job_timeout_overrides_queue_timeout(db, name):
    make_queue(db, name, "PERFORM pg_sleep(0.5);", timeout="100 ms", max_attempts=1)
    job = scalar(db, "SELECT queue.enqueue(%s, timeout => '10 s')", (name,))
    assert wait_terminal(db, name, 1) == {"succeeded": 1}
    assert scalar(db, "SELECT attempts FROM queue.status(%s)", (job,)) == 1


def test_pause_stops_claiming_and_resume_restarts(db, name):
    make_queue(db, name, f"INSERT INTO {name} (n) VALUES ((payload->>'n')::int);")
    db.execute(f"CREATE TABLE {name}_marker (n int)")
    db.execute(f"CREATE PROCEDURE {name}_m(payload jsonb) LANGUAGE sql AS "
               f"$$ INSERT INTO {name}_marker VALUES (1) $$")
    db.execute("SELECT queue.create_queue(%s, %s)", (name + "_m", f"{name}_m(jsonb)"))
    db.execute("SELECT queue.pause(%s)", (name,))
    db.execute("SELECT queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('n', i) "
               "FROM generate_series(1, 5) i))", (name,))
    # Jobs enqueued after the paused ones run, so executors did look at the queue.
    for _ in range(3):
        db.execute("SELECT queue.enqueue(%s)", (name + "_m",))
    wait_terminal(db, name + "_m", 3)
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s AND state = 'queued'",
                  (name,)) == 5
    assert scalar(db, f"SELECT count(*) FROM {name}") == 0
    db.execute("SELECT queue.resume(%s)", (name,))
    assert wait_terminal(db, name, 5) == {"succeeded": 5}


def test_rolled_back_enqueue_never_runs(cluster, db, name):
    make_queue(db, name, f"INSERT INTO {name} (n) VALUES ((payload->>'n')::int);")
    with cluster.connect(autocommit=False) as tx:
        rolled_back = scalar(tx, "SELECT queue.enqueue(%s, '{\"n\": 1}')", (name,))
        tx.rollback()
    db.execute("SELECT queue.enqueue(%s, '{\"n\": 2}')", (name,))
    wait_terminal(db, name, 1)
    assert [r[0] for r in db.execute(f"SELECT n FROM {name}")] == [2]
    assert scalar(db, "SELECT count(*) FROM queue.status(%s)", (rolled_back,)) == 0


def test_function_handler_result_and_current_job(db, name):
    db.execute(f"CREATE FUNCTION {name}_f(payload jsonb) RETURNS jsonb LANGUAGE sql AS $$ "
               "SELECT jsonb_build_object('echo', payload, 'job', (SELECT to_jsonb(j) FROM queue.current_job() j)) $$")
    db.execute("SELECT queue.create_queue(%s, %s)", (name, f"{name}_f(jsonb)"))
    job = scalar(db, "SELECT queue.enqueue(%s, '{\"x\": 42}')", (name,))
    wait_terminal(db, name, 1)
    result = scalar(db, "SELECT result FROM queue.status(%s)", (job,))
    assert result["echo"] == {"x": 42}
    assert result["job"]["id"] == str(job)
    assert result["job"]["queue"] == name and result["job"]["attempt"] == 1
    assert result["job"]["depends_on"] is None


def create_queue_as(db, role, name, **opts):
    """As `role` (a plain role), create queue `name` with handler `{name}_h(jsonb)`."""
    db.execute(f"GRANT EXECUTE ON PROCEDURE {name}_h(jsonb) TO {role}")
    db.execute("GRANT USAGE ON SCHEMA queue TO " + role)
    db.execute(f"SET ROLE {role}")
    try:
        args = "".join(f", {k} => %({k})s" for k in opts)
        db.execute(f"SELECT queue.create_queue(%(q)s, %(h)s{args})",
                   {"q": name, "h": f"{name}_h(jsonb)", **opts})
    finally:
        db.execute("RESET ROLE")


def test_handler_runs_as_queue_owner(cluster, db, name):
    role = name + "_owner"
    db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute(f"CREATE TABLE {name} (who text, is_super boolean)")
    db.execute(f"GRANT INSERT ON {name} TO {role}")
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ "
               f"INSERT INTO {name} SELECT current_user, (SELECT rolsuper FROM pg_roles "
               f"WHERE rolname = current_user) $$")
    create_queue_as(db, role, name)
    db.execute("SELECT queue.enqueue(%s)", (name,))
    wait_terminal(db, name, 1)
    assert db.execute(f"SELECT who, is_super FROM {name}").fetchall() == [(role, False)]


def test_handler_without_privilege_fails_cleanly(db, name):
    """The owner's privileges apply: a write the owner may not do fails the job."""
    role = name + "_weak"
    db.execute(f"CREATE ROLE {role}")
    db.execute(f"CREATE TABLE {name} (n int)")
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$ INSERT INTO {name} VALUES (1) $$")
    create_queue_as(db, role, name, max_attempts=1)
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    assert wait_terminal(db, name, 1) == {"failed": 1}
    errors = scalar(db, "SELECT errors FROM queue.status(%s)", (job,))
    assert errors[0]["sqlstate"] == "42501"
    assert scalar(db, f"SELECT count(*) FROM {name}") == 0


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_limit_is_never_exceeded(db, name, concurrency):
    make_queue(db, name, f"""
        INSERT INTO {name} (n, who) VALUES ((payload->>'n')::int, 'start');
        PERFORM pg_sleep(0.02);
        INSERT INTO {name} (n, who) VALUES ((payload->>'n')::int, 'end');""", concurrency=concurrency)
    db.execute("SELECT queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('n', i) "
               "FROM generate_series(1, 60) i))", (name,))
    assert wait_terminal(db, name, 60) == {"succeeded": 60}
    # A job counts against the limit from its claim (started_at) to its completion
    # (finished_at): at no job's start were more than `concurrency` jobs between the two.
    most = scalar(db, """
        WITH h AS (SELECT started_at s, finished_at f FROM queue.history WHERE queue = %s)
        SELECT max((SELECT count(*) FROM h b WHERE b.s <= a.s AND b.f > a.s)) FROM h a""", (name,))
    assert most == concurrency
    if concurrency == 1:
        # Handler runs never overlap, whichever executor ran them.
        overlaps = scalar(db, f"""
            WITH runs AS (SELECT n, min(at) s, max(at) e FROM {name} GROUP BY n)
            SELECT count(*) FROM runs a JOIN runs b ON a.n < b.n AND a.s < b.e AND b.s < a.e""")
        assert overlaps == 0


def test_priority_and_run_at_order(db, name):
    make_queue(db, name, f"INSERT INTO {name} (n) VALUES ((payload->>'n')::int);", concurrency=1)
    db.execute("SELECT queue.pause(%s)", (name,))
    db.execute("SELECT queue.enqueue(%s, '{\"n\": 3}', priority => 5)", (name,))
    db.execute("SELECT queue.enqueue(%s, '{\"n\": 1}', priority => -1)", (name,))
    db.execute("SELECT queue.enqueue(%s, '{\"n\": 2}')", (name,))
    db.execute("SELECT queue.enqueue(%s, '{\"n\": 4}', run_at => now() + interval '1 s')", (name,))
    db.execute("SELECT queue.resume(%s)", (name,))
    wait_terminal(db, name, 4)
    assert [r[0] for r in db.execute(f"SELECT n FROM {name} ORDER BY at")] == [1, 2, 3, 4]
    # The scheduled job did not run before its time.
    late = scalar(db, f"""SELECT (SELECT at FROM {name} WHERE n = 4) >= h.run_at
                           FROM queue.history h WHERE queue = %s AND (payload->>'n') = '4'""", (name,))
    assert late is True


def test_executors_report_their_table_statistics(db, name):
    """Autovacuum learns of the rows executors delete from queue.jobs (and insert into
    history): a background worker must flush its statistics itself, as a backend does when
    it goes idle."""
    def deleted():
        return scalar(db, "SELECT n_tup_del FROM pg_stat_user_tables "
                          "WHERE schemaname = 'queue' AND relname = 'jobs'")
    before = deleted()
    make_queue(db, name, "NULL;")
    db.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[500]))", (name,))
    assert wait_terminal(db, name, 500) == {"succeeded": 500}
    # Only executors delete from queue.jobs here; their counts arrive within a second or two.
    wait_for(lambda: deleted() >= before + 500, what="the executors' deletes in pg_stat_user_tables")

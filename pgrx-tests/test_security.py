"""The privilege boundary on a real cluster (SECURITY.md): two tenants and an outsider, all
ordinary login roles; one executor, so that anything a handler left behind would reach the
next handler. Each test names the threat of SECURITY.md it covers."""
import psycopg
import pytest

from conftest import scalar, sqlstate, wait_for, wait_terminal

CLUSTER_SETTINGS = {"queue.max_workers": "1"}

TENANTS = ("alice", "bob")


@pytest.fixture(scope="module")
def roles(cluster):
    with cluster.connect() as su:
        for r in ("alice", "bob", "mallory", "monitor", "tenants"):
            su.execute(f"CREATE ROLE {r} LOGIN")
            su.execute(f"CREATE SCHEMA {r} AUTHORIZATION {r}")
        su.execute("GRANT USAGE ON SCHEMA queue TO alice, bob, mallory, monitor")
        su.execute("GRANT pg_monitor TO monitor")
        su.execute("GRANT tenants TO alice")
        su.execute("GRANT USAGE ON SCHEMA alice, bob TO tenants")
    return cluster


def connect(cluster, role):
    return cluster.connect(user=role)


def handler_queue(conn, role, name, body, **opts):
    """As `role`: a table `role.name` and a queue whose handler runs `body` (PL/pgSQL)."""
    conn.execute(f"CREATE TABLE {role}.{name} (n int, info text, at timestamptz DEFAULT clock_timestamp())")
    conn.execute(f"CREATE PROCEDURE {role}.{name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN {body} END $$")
    args = "".join(f", {k} => %({k})s" for k in opts)
    conn.execute(f"SELECT queue.create_queue(%(q)s, %(h)s{args})",
                 {"q": name, "h": f"{role}.{name}_h(jsonb)", **opts})


def run_one(conn, su, name, payload="{}"):
    """Enqueues one job as `conn`'s role and waits for it; returns its status row."""
    job = scalar(conn, "SELECT queue.enqueue(%s, %s)", (name, payload))
    wait_terminal(su, name, 1)
    return conn.execute("SELECT state::text, errors FROM queue.status(%s)", (job,)).fetchone()


# --- 1. handler -> worker identity -----------------------------------------------------

def test_deferred_trigger_cannot_make_the_owner_superuser(roles, name):
    """The issue's repro: a DEFERRABLE INITIALLY DEFERRED constraint trigger that runs
    ALTER ROLE .. SUPERUSER used to fire at the executor's commit, as the worker."""
    with connect(roles, "alice") as a, roles.connect() as su:
        a.execute(f"""CREATE FUNCTION alice.{name}_escalate() RETURNS trigger LANGUAGE plpgsql AS $$
                      BEGIN ALTER ROLE alice SUPERUSER; RETURN NULL; END $$""")
        handler_queue(a, "alice", name, f"INSERT INTO alice.{name} (n) VALUES (1);", max_attempts=1)
        a.execute(f"""CREATE CONSTRAINT TRIGGER {name}_t AFTER INSERT ON alice.{name}
                      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION alice.{name}_escalate()""")
        state, errors = run_one(a, su, name)
        assert state == "failed"
        assert errors[0]["sqlstate"] == "42501"        # ALTER ROLE ran as alice, inside the call
        assert scalar(su, "SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'") is False
        assert scalar(su, f"SELECT count(*) FROM alice.{name}") == 0


@pytest.mark.parametrize("stmt", [
    "SET ROLE postgres",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION postgres",
    "CREATE TEMP TABLE t_{name} (x int)",
    "PREPARE p_{name} AS SELECT 1",
    "LISTEN c_{name}",
    "DECLARE c_{name} CURSOR WITH HOLD FOR SELECT 1",
])
def test_forbidden_statements_fail_the_attempt(roles, name, stmt):
    """Role switches and what would outlive the job are refused; the executor carries on."""
    with connect(roles, "alice") as a, roles.connect() as su:
        pid_before = scalar(su, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_queue executor'")
        handler_queue(a, "alice", name, f"EXECUTE {stmt.format(name=name)!r};", max_attempts=1)
        state, errors = run_one(a, su, name)
        assert state == "failed", errors
        assert errors[0]["sqlstate"] in ("42501", "0A000", "25001", "55000"), errors
        assert scalar(su, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_queue executor'") == pid_before


def test_deferrable_foreign_key_still_works(roles, name):
    with connect(roles, "alice") as a, roles.connect() as su:
        a.execute(f"CREATE TABLE alice.{name}_p (id int PRIMARY KEY)")
        a.execute(f"INSERT INTO alice.{name}_p VALUES (1)")
        handler_queue(a, "alice", name, f"""
            INSERT INTO alice.{name}_c VALUES ((payload->>'p')::int);""", max_attempts=1)
        a.execute(f"""CREATE TABLE alice.{name}_c (p int REFERENCES alice.{name}_p
                      DEFERRABLE INITIALLY DEFERRED)""")
        ok = scalar(a, "SELECT queue.enqueue(%s, '{\"p\": 1}')", (name,))
        bad = scalar(a, "SELECT queue.enqueue(%s, '{\"p\": 2}')", (name,))
        wait_terminal(su, name, 2)
        assert scalar(a, "SELECT state::text FROM queue.status(%s)", (ok,)) == "succeeded"
        st, errors = a.execute("SELECT state::text, errors FROM queue.status(%s)", (bad,)).fetchone()
        assert st == "failed" and errors[0]["sqlstate"] == "23503"
        assert scalar(su, f"SELECT array_agg(p) FROM alice.{name}_c") == [1]


# --- 2. one owner -> another ---------------------------------------------------------

def test_search_path_left_behind_does_not_reach_the_next_owner(roles, name):
    """The issue's repro: A sets search_path for the session and creates a.helper();
    B's handler calls helper() and must not run A's function."""
    with connect(roles, "alice") as a, connect(roles, "bob") as b, roles.connect() as su:
        a.execute(f"CREATE FUNCTION alice.helper_{name}() RETURNS text LANGUAGE sql AS $$ SELECT 'alice' $$")
        a.execute(f"GRANT EXECUTE ON FUNCTION alice.helper_{name}() TO PUBLIC")
        a.execute("GRANT USAGE ON SCHEMA alice TO bob")
        handler_queue(a, "alice", name + "a",
                      f"PERFORM set_config('search_path', 'alice, public', false);"
                      f"INSERT INTO alice.{name}a (info) VALUES (current_setting('search_path'));")
        handler_queue(b, "bob", name + "b",
                      f"INSERT INTO bob.{name}b (info) VALUES (current_setting('search_path'));"
                      f"INSERT INTO bob.{name}b (info) VALUES (helper_{name}());", max_attempts=1)
        assert run_one(a, su, name + "a")[0] == "succeeded"
        state, errors = run_one(b, su, name + "b")
        assert state == "failed" and errors[0]["sqlstate"] == "42883", errors   # helper() not found
        # Each ran with its own pinned path, and nothing of alice's ran for bob.
        assert scalar(su, f"SELECT info FROM alice.{name}a") == "alice, public"
        assert scalar(su, f"SELECT count(*) FROM bob.{name}b") == 0


def test_session_advisory_lock_is_released_after_the_job(roles, name):
    with connect(roles, "alice") as a, roles.connect() as su:
        handler_queue(a, "alice", name, "PERFORM pg_advisory_lock(4242);")
        assert run_one(a, su, name)[0] == "succeeded"
        assert scalar(su, """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid
                              WHERE l.locktype = 'advisory' AND s.backend_type = 'pg_queue executor'""") == 0
        assert scalar(su, "SELECT pg_try_advisory_lock(4242)") is True
        su.execute("SELECT pg_advisory_unlock(4242)")


def test_no_role_can_hold_a_queues_lock(roles, name):
    """Claims of a limited queue take turns on a lock. It was an advisory lock, which any
    role may take (pg_advisory_lock is PUBLIC's): mallory, with no privilege on the queue,
    could hold it and stall the queue's claims, and each executor that tried with it.
    Queue locks are now userlocks, which no SQL function takes."""
    with connect(roles, "alice") as a, connect(roles, "mallory") as m, roles.connect() as su:
        handler_queue(a, "alice", name, f"INSERT INTO alice.{name} (n) VALUES (1);", concurrency=5)
        a.execute("SELECT queue.create_queue(%s, notify => true, concurrency => 5)", (name + "_n",))
        for q in (name, name + "_n"):
            m.execute("SELECT pg_advisory_lock(1885827445, hashtext(%s))", (q,))   # the old claim lock
        assert run_one(a, su, name)[0] == "succeeded"                              # an executor's claim
        a.execute("SELECT queue.enqueue(%s)", (name + "_n",))
        a.execute("SET lock_timeout = '5s'")
        assert len(a.execute("SELECT * FROM queue.claim(%s, 'c1')", (name + "_n",)).fetchall()) == 1
        assert len(a.execute("SELECT * FROM queue.claim(ARRAY[%s], 'c1')", (name + "_n",)).fetchall()) == 0


def test_lastval_does_not_reach_the_next_owner(roles, name):
    """lastval() is session state. Core checks bob's privilege on the sequence, but its
    error would still name alice's sequence: bob's handler must find no lastval at all."""
    with connect(roles, "alice") as a, connect(roles, "bob") as b, roles.connect() as su:
        a.execute(f"CREATE SEQUENCE alice.{name}_seq START 424242")
        handler_queue(a, "alice", name + "a", f"PERFORM nextval('alice.{name}_seq');")
        handler_queue(b, "bob", name + "b", f"""
            BEGIN
                INSERT INTO bob.{name}b (info) VALUES (lastval()::text);
            EXCEPTION WHEN OTHERS THEN
                INSERT INTO bob.{name}b (info) VALUES (SQLERRM);
            END;""")
        assert run_one(a, su, name + "a")[0] == "succeeded"
        assert run_one(b, su, name + "b")[0] == "succeeded"
        assert scalar(su, f"SELECT info FROM bob.{name}b") == \
            "lastval is not yet defined in this session"


def loopback(roles):
    return f"host={roles.dir} port={roles.port} dbname=postgres user=postgres"


def test_dblink_connections_do_not_reach_the_next_owner(roles, name):
    """A superuser's handler opens a named and the unnamed dblink connection; bob's handler
    must find neither (with them it would run SQL as postgres on the other end)."""
    with connect(roles, "bob") as b, roles.connect() as su:
        su.execute("CREATE EXTENSION IF NOT EXISTS dblink")
        handler_queue(su, "public", name + "a", f"""
            PERFORM dblink_connect('{name}', '{loopback(roles)}');
            PERFORM dblink_connect('{loopback(roles)}');""")
        handler_queue(b, "bob", name + "b", f"""
            INSERT INTO bob.{name}b (info)
                 VALUES (coalesce(array_to_string(dblink_get_connections(), ','), 'no connection'));
            BEGIN
                INSERT INTO bob.{name}b (info)
                     SELECT u FROM dblink('{name}', 'SELECT current_user::text') AS t(u text);
            EXCEPTION WHEN OTHERS THEN INSERT INTO bob.{name}b (info) VALUES ('named refused');
            END;
            BEGIN
                INSERT INTO bob.{name}b (info)
                     SELECT u FROM dblink('SELECT current_user::text') AS t(u text);
            EXCEPTION WHEN OTHERS THEN INSERT INTO bob.{name}b (info) VALUES ('unnamed refused');
            END;""")
        assert run_one(su, su, name + "a")[0] == "succeeded"
        assert run_one(b, su, name + "b")[0] == "succeeded"
        assert [r[0] for r in su.execute(f"SELECT info FROM bob.{name}b ORDER BY at")] == \
            ["no connection", "named refused", "unnamed refused"]


def test_postgres_fdw_connections_do_not_reach_the_next_owner(roles, name):
    with connect(roles, "bob") as b, roles.connect() as su:
        su.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        su.execute(f"CREATE SERVER {name}_srv FOREIGN DATA WRAPPER postgres_fdw "
                   f"OPTIONS (host '{roles.dir}', port '{roles.port}', dbname 'postgres')")
        su.execute(f"CREATE USER MAPPING FOR postgres SERVER {name}_srv OPTIONS (user 'postgres')")
        su.execute(f"CREATE TABLE public.{name}_remote (x int)")
        su.execute(f"CREATE FOREIGN TABLE public.{name}_ft (x int) SERVER {name}_srv "
                   f"OPTIONS (table_name '{name}_remote')")
        handler_queue(su, "public", name + "a", f"PERFORM count(*) FROM public.{name}_ft;")
        handler_queue(b, "bob", name + "b", f"""
            INSERT INTO bob.{name}b (n) SELECT count(*) FROM postgres_fdw_get_connections();""")
        assert run_one(su, su, name + "a")[0] == "succeeded"
        assert run_one(b, su, name + "b")[0] == "succeeded"
        assert scalar(su, f"SELECT n FROM bob.{name}b") == 0


def test_no_cursor_survives_a_job(roles, name):
    """Cursors opened by a handler are closed when it returns, even in the middle of a batch."""
    with connect(roles, "alice") as a, roles.connect() as su:
        handler_queue(a, "alice", name, f"""
            DECLARE c refcursor := 'c_' || (payload->>'n');
            BEGIN
                INSERT INTO alice.{name} (n, info) SELECT (payload->>'n')::int, count(*)::text FROM pg_cursors;
                OPEN c FOR SELECT 1;
            END;""", concurrency=100)
        a.execute("SELECT queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('n', i) "
                  "FROM generate_series(1, 200) i))", (name,))
        assert wait_terminal(su, name, 200) == {"succeeded": 200}
        assert scalar(su, f"SELECT count(*) FROM alice.{name} WHERE info <> '0'") == 0


def test_a_handler_cannot_lift_its_own_timeout(roles, name):
    """SET statement_timeout = 0 and catching the cancel: the attempt still ends at its
    timeout, failed, with none of its writes."""
    with connect(roles, "alice") as a, roles.connect() as su:
        handler_queue(a, "alice", name, f"""
            SET statement_timeout = 0;
            FOR i IN 1..50 LOOP
                BEGIN PERFORM pg_sleep(0.2);
                EXCEPTION WHEN query_canceled THEN
                    INSERT INTO alice.{name} (n) VALUES (i);
                END;
            END LOOP;""", timeout="300 ms", max_attempts=1)
        state, errors = run_one(a, su, name)
        assert state == "failed"
        assert errors[0]["sqlstate"] == "57014" and "timeout" in errors[0]["message"]
        assert scalar(su, f"SELECT count(*) FROM alice.{name}") == 0


# --- 3. forged rows ------------------------------------------------------------------

@pytest.mark.parametrize("stmt", [
    "SELECT * FROM queue.queues",
    "UPDATE queue.queues SET owner = 'postgres'",
    "INSERT INTO queue.jobs (id, queue, state, payload, enqueued_by, run_at, max_attempts, created_at) "
    "VALUES (gen_random_uuid(), 'x', 'queued', '{}', 'postgres', now(), 1, now())",
    "DELETE FROM queue.history",
    "SELECT * FROM queue.all_jobs",
    "INSERT INTO queue.schedule_defs (name, cron, queue, owner, last_plan_at) VALUES ('x', '* * * * *', 'x', 'postgres', now())",
    "INSERT INTO queue.queue_grants (queue, role, privilege, granted_by) VALUES ('x', 'mallory', 'manage', 'postgres')",
    "UPDATE queue.consumers SET role = 'postgres'",
    "DELETE FROM queue.schedule_runs",
])
def test_tables_are_closed_to_every_role(roles, stmt):
    with connect(roles, "mallory") as m:
        assert sqlstate(m, stmt) == "42501"


@pytest.mark.parametrize("call", [
    "SELECT queue.caller()",
    "SELECT queue.may(10, NULL, 'own')",
    "SELECT queue.authorize('x', 'own')",
    "SELECT queue.privileges_of(10)",
    "SELECT queue.wake_executors(1)",
    "SELECT queue.rewind_executors('-infinity')",
    "SELECT queue.lock_queue('x', 'drop')",
    "SELECT queue.request_cancel(gen_random_uuid(), 1)",
    "SELECT queue.reap()",
    "SELECT queue.create_history_partitions(1)",
])
def test_internal_functions_are_not_callable(roles, call):
    with connect(roles, "mallory") as m:
        assert sqlstate(m, call) == "42501"


def test_nothing_for_public(roles):
    """A role never granted USAGE on the schema cannot call the API nor read a view."""
    with roles.connect() as su:
        su.execute("CREATE ROLE nobody_here LOGIN")
    with connect(roles, "nobody_here") as n:
        assert sqlstate(n, "SELECT queue.create_queue('x', notify => true)") == "42501"
        assert sqlstate(n, "SELECT * FROM queue.stats") == "42501"


# --- 4. confused deputy --------------------------------------------------------------

def bobs_queues(roles, name):
    """bob's handler queue `name` and NOTIFY queue `name`_n, one job in each."""
    with connect(roles, "bob") as b:
        handler_queue(b, "bob", name, f"INSERT INTO bob.{name} (n) VALUES (1);", paused=True)
        b.execute("SELECT queue.create_queue(%s, notify => true)", (name + "_n",))
        b.execute("SELECT queue.schedule(%s, '0 0 1 1 *', %s)", (name + "_s", name))
        return (scalar(b, "SELECT queue.enqueue(%s, '{\"secret\": 1}')", (name,)),
                scalar(b, "SELECT queue.enqueue(%s, '{\"secret\": 2}')", (name + "_n",)))


def test_outsider_gets_42501_on_every_queue_call_and_nothing_changes(roles, name):
    bobs_queues(roles, name)
    calls = [
        "SELECT queue.enqueue(%(q)s)",
        "SELECT queue.enqueue_many(%(q)s, ARRAY['{}'::jsonb])",
        "SELECT queue.pause(%(q)s)",
        "SELECT queue.resume(%(q)s)",
        "SELECT queue.alter_queue(%(q)s, concurrency => 1)",
        "SELECT queue.alter_queue(%(q)s, handler => 'alice.x(jsonb)')",
        "SELECT queue.drop_queue(%(q)s, force => true)",
        "SELECT queue.purge(%(q)s)",
        "SELECT queue.grant(%(q)s, 'mallory', '{manage}')",
        "SELECT queue.revoke(%(q)s, 'bob', '{manage}')",
        "SELECT * FROM queue.claim(%(q)s || '_n', 'm')",
        "SELECT queue.schedule('m_' || %(q)s, '* * * * *', %(q)s)",
        "SELECT queue.alter_schedule(%(q)s || '_s', enabled => false)",
        "SELECT queue.unschedule(%(q)s || '_s')",
    ]
    with connect(roles, "mallory") as m, roles.connect() as su:
        before = su.execute("""SELECT (SELECT array_agg(q ORDER BY name) FROM queue.queues q),
                                      (SELECT count(*) FROM queue.jobs), (SELECT count(*) FROM queue.schedule_defs),
                                      (SELECT count(*) FROM queue.queue_grants)""").fetchone()
        for call in calls:
            assert sqlstate(m, call, {"q": name}) == "42501", call
        after = su.execute("""SELECT (SELECT array_agg(q ORDER BY name) FROM queue.queues q),
                                     (SELECT count(*) FROM queue.jobs), (SELECT count(*) FROM queue.schedule_defs),
                                     (SELECT count(*) FROM queue.queue_grants)""").fetchone()
        assert before == after


def test_jobs_of_others_look_exactly_like_missing_ones(roles, name):
    job, njob = bobs_queues(roles, name)
    with connect(roles, "mallory") as m:
        for j in (job, njob, "018f0000-0000-7000-8000-000000000000"):
            assert m.execute("SELECT * FROM queue.status(%s)", (j,)).fetchall() == []
            with pytest.raises(psycopg.Error) as e:
                m.execute("SELECT queue.cancel(%s)", (j,))
            assert e.value.sqlstate == "42704" and "does not exist" in str(e.value)
            assert sqlstate(m, "SELECT queue.retry(%s)", (j,)) == "42704"
        assert m.execute("SELECT * FROM queue.job_status WHERE queue LIKE %s", (name + "%",)).fetchall() == []
        assert m.execute("SELECT * FROM queue.stats WHERE queue LIKE %s", (name + "%",)).fetchall() == []
        assert m.execute("SELECT * FROM queue.schedules WHERE queue = %s", (name,)).fetchall() == []
        assert m.execute("SELECT * FROM queue.grants").fetchall() == []
        # A leaky function in a WHERE clause never sees a row the filter removes.
        m.execute("""CREATE FUNCTION mallory.peek(p jsonb) RETURNS boolean LANGUAGE plpgsql
                     COST 0.0000001 AS $$ BEGIN RAISE NOTICE 'saw %', p; RETURN true; END $$""")
        seen = []
        m.add_notice_handler(lambda d: seen.append(d.message_primary))
        m.execute("SELECT * FROM queue.job_status WHERE mallory.peek(payload)").fetchall()
        assert not any("secret" in s for s in seen), seen


def test_api_ignores_the_callers_search_path(roles, name):
    """mallory's own `=` operator for text, first in her search_path, is never used by the
    API (every API function pins search_path = pg_catalog, pg_temp)."""
    with connect(roles, "mallory") as m:
        m.execute("""CREATE FUNCTION mallory.evil_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
                     BEGIN RAISE NOTICE 'evil operator ran as %', current_user; RETURN $1 OPERATOR(pg_catalog.=) $2; END $$""")
        m.execute("CREATE OPERATOR mallory.= (LEFTARG = text, RIGHTARG = text, FUNCTION = mallory.evil_eq)")
        seen = []
        m.add_notice_handler(lambda d: seen.append(d.message_primary))
        m.execute("SET search_path = mallory, pg_catalog")
        m.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
        m.execute("SELECT queue.enqueue(%s, '{}')", (name,))
        m.execute("SELECT * FROM queue.claim(%s, 'me')", (name,)).fetchall()
        assert seen == []


# --- grants --------------------------------------------------------------------------

def test_grants_through_a_group_role_and_revoke_takes_effect_at_once(roles, name):
    with connect(roles, "bob") as b, connect(roles, "alice") as a:
        b.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
        assert sqlstate(a, "SELECT queue.enqueue(%s)", (name,)) == "42501"
        b.execute("SELECT queue.grant(%s, 'tenants', '{enqueue}')", (name,))   # alice is a member
        mine = scalar(a, "SELECT queue.enqueue(%s, '{\"mine\": true}')", (name,))
        theirs = scalar(b, "SELECT queue.enqueue(%s, '{\"mine\": false}')", (name,))
        assert b.execute("SELECT role::text, privilege FROM queue.grants WHERE queue = %s",
                         (name,)).fetchall() == [("tenants", "enqueue")]
        # An enqueuer sees and cancels its own jobs only.
        assert [r[0] for r in a.execute("SELECT id FROM queue.job_status WHERE queue = %s", (name,))] == [mine]
        assert scalar(a, "SELECT count(*) FROM queue.status(%s)", (theirs,)) == 0
        assert sqlstate(a, "SELECT queue.cancel(%s)", (theirs,)) == "42704"
        assert sqlstate(a, "SELECT queue.claim(%s, 'a')", (name,)) == "42501"   # enqueue is not consume
        b.execute("SELECT queue.revoke(%s, 'tenants', '{enqueue}')", (name,))
        assert sqlstate(a, "SELECT queue.enqueue(%s)", (name,)) == "42501"
        assert sqlstate(a, "SELECT queue.cancel(%s)", (mine,)) == "42704"      # no longer visible
        assert sqlstate(b, "SELECT queue.grant(%s, 'alice', '{enqueue,fly}')", (name,)) == "22023"
        assert sqlstate(b, "SELECT queue.grant(%s, 'alice', '{}')", (name,)) == "22023"
        assert scalar(b, "SELECT count(*) FROM queue.grants WHERE queue = %s", (name,)) == 0


def test_consume_read_and_manage(roles, name):
    with connect(roles, "bob") as b, connect(roles, "alice") as a, connect(roles, "monitor") as mon:
        b.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
        job = scalar(b, "SELECT queue.enqueue(%s, '{\"k\": 1}')", (name,))
        b.execute("SELECT queue.grant(%s, 'alice', '{consume}')", (name,))
        jid, token = a.execute("SELECT id, lease_token FROM queue.claim(%s, 'alice-1')", (name,)).fetchone()
        assert jid == job
        assert scalar(a, "SELECT queue.heartbeat(%s, %s)", (jid, token)) is True
        assert scalar(a, "SELECT payload FROM queue.job_status WHERE id = %s", (jid,)) == {"k": 1}
        assert sqlstate(a, "SELECT queue.pause(%s)", (name,)) == "42501"        # consume is not manage
        b.execute("SELECT queue.revoke(%s, 'alice', '{consume}')", (name,))
        # Holding the lease token is no use without the privilege; nothing changes.
        assert sqlstate(a, "SELECT queue.complete(%s, %s)", (jid, token)) == "42501"
        assert scalar(b, "SELECT state::text FROM queue.status(%s)", (jid,)) == "running"
        # pg_monitor sees counts for every queue, never a payload.
        assert scalar(mon, "SELECT running FROM queue.stats WHERE queue = %s", (name,)) == 1
        assert mon.execute("SELECT * FROM queue.job_status WHERE queue = %s", (name,)).fetchall() == []
        b.execute("SELECT queue.grant(%s, 'alice', '{manage}')", (name,))
        a.execute("SELECT queue.pause(%s)", (name,))
        assert scalar(a, "SELECT queue.cancel(%s)", (jid,)) is True
        assert sqlstate(a, "SELECT queue.alter_queue(%s, search_path => 'alice')", (name,)) == "42501"


# --- schedules -----------------------------------------------------------------------

def test_schedule_stops_enqueuing_once_its_owner_lost_the_right(roles, name):
    with connect(roles, "bob") as b, connect(roles, "alice") as a, roles.connect() as su:
        b.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
        b.execute("SELECT queue.grant(%s, 'alice', '{enqueue}')", (name,))
        a.execute("SELECT queue.schedule(%s, '@every 1s', %s, overlap => 'allow')", (name, name))
        wait_for(lambda: scalar(su, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) >= 1,
                 what="a job from the schedule")
        assert scalar(su, "SELECT enqueued_by::text FROM queue.jobs WHERE queue = %s LIMIT 1", (name,)) == "alice"
        b.execute("SELECT queue.revoke(%s, 'alice', '{enqueue}')", (name,))
        revoked_at = scalar(su, "SELECT clock_timestamp()")
        wait_for(lambda: scalar(su, """SELECT count(*) FROM queue.schedule_runs
                                        WHERE schedule = %s AND error IS NOT NULL""", (name,)) >= 2,
                 what="plans recorded with an error")
        assert scalar(su, "SELECT count(*) FROM queue.jobs WHERE queue = %s AND created_at > %s",
                      (name, revoked_at)) == 0
        assert "permission denied" in scalar(a, "SELECT last_error FROM queue.schedules WHERE name = %s", (name,))


# --- 6. exhaustion -------------------------------------------------------------------

def test_payload_size_limits(roles, name):
    with connect(roles, "alice") as a, roles.connect() as su:
        a.execute("SELECT queue.create_queue(%s, notify => true, paused => true, max_payload_size => 1000)", (name,))
        big = '{"x": "' + "y" * 2000 + '"}'
        assert sqlstate(a, "SELECT queue.enqueue(%s, %s)", (name, big)) == "54000"
        assert sqlstate(a, "SELECT queue.enqueue_many(%s, ARRAY['{}', %s]::jsonb[])", (name, big)) == "54000"
        assert scalar(su, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 0
        assert sqlstate(a, "SELECT queue.alter_queue(%s, max_payload_size => 2000000000)", (name,)) == "22023"
        a.execute("SELECT queue.enqueue(%s, '{\"small\": 1}')", (name,))


def test_pending_jobs_limit(roles, name):
    with connect(roles, "alice") as a:
        a.execute("SELECT queue.create_queue(%s, notify => true, paused => true, max_pending_jobs => 5)", (name,))
        assert sqlstate(a, "SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[6]))", (name,)) == "54000"
        a.execute("SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[5]))", (name,))
        wait_for(lambda: scalar(a, "SELECT is_full FROM queue.stats WHERE queue = %s", (name,)),
                 what="the launcher marking the queue full")
        with pytest.raises(psycopg.Error) as e:
            a.execute("SELECT queue.enqueue(%s)", (name,))
        assert e.value.sqlstate == "54000" and "is full" in str(e.value)
        a.execute("SELECT queue.purge(%s)", (name,))
        a.execute("SELECT queue.cancel(id) FROM queue.job_status WHERE queue = %s", (name,))
        wait_for(lambda: scalar(a, "SELECT NOT is_full FROM queue.stats WHERE queue = %s", (name,)),
                 what="the mark cleared")
        a.execute("SELECT queue.enqueue(%s)", (name,))


def test_result_size_and_error_length_limits(roles, name):
    with roles.connect() as su:
        su.execute("ALTER SYSTEM SET queue.max_result_size = 1000")
        su.execute("ALTER SYSTEM SET queue.max_error_length = 100")
        su.execute("SELECT pg_reload_conf()")
    try:
        with connect(roles, "alice") as a, roles.connect() as su:
            a.execute(f"""CREATE FUNCTION alice.{name}_h(payload jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
                          BEGIN IF payload ? 'fail' THEN RAISE EXCEPTION '%', repeat('e', 5000); END IF;
                                RETURN jsonb_build_object('r', repeat('r', (payload->>'n')::int)); END $$""")
            a.execute("SELECT queue.create_queue(%s, %s, max_attempts => 1)", (name, f"alice.{name}_h(jsonb)"))
            small = scalar(a, "SELECT queue.enqueue(%s, '{\"n\": 10}')", (name,))
            big = scalar(a, "SELECT queue.enqueue(%s, '{\"n\": 5000}')", (name,))
            fails = scalar(a, "SELECT queue.enqueue(%s, '{\"n\": 1, \"fail\": 1}')", (name,))
            wait_terminal(su, name, 3)
            assert scalar(a, "SELECT state::text FROM queue.status(%s)", (small,)) == "succeeded"
            st, errors, result = a.execute("SELECT state::text, errors, result FROM queue.status(%s)", (big,)).fetchone()
            assert st == "failed" and errors[0]["sqlstate"] == "54000" and result is None
            errors = scalar(a, "SELECT errors FROM queue.status(%s)", (fails,))
            assert len(errors[0]["message"]) == 100
    finally:
        with roles.connect() as su:
            su.execute("ALTER SYSTEM RESET queue.max_result_size")
            su.execute("ALTER SYSTEM RESET queue.max_error_length")
            su.execute("SELECT pg_reload_conf()")

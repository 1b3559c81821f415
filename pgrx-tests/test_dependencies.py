"""Dependencies (README "Job graphs"): enqueue(..., depends_on) keeps a job waiting until
the jobs it names finished, releases it exactly once however many finish together, and
cancels it (transitively) when one failed, unless it runs anyway."""
import psycopg
import pytest

from conftest import in_threads, scalar, sqlstate, wait_for, wait_terminal


def logging_queue(db, name, **opts):
    """A handler queue whose handler logs (payload, start time) to `name`_log."""
    db.execute(f"CREATE TABLE {name}_log (payload jsonb, at timestamptz DEFAULT clock_timestamp())")
    db.execute(f"CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN "
               f"IF payload ? 'fail' THEN RAISE EXCEPTION 'asked to fail'; END IF; "
               f"INSERT INTO {name}_log (payload) VALUES (payload); END $$")
    args = "".join(f", {k} => %({k})s" for k in opts)
    db.execute(f"SELECT queue.create_queue(%(q)s, %(h)s{args})",
               {"q": name, "h": f"public.{name}_h(jsonb)", **opts})


def enqueue(db, queue, payload, deps=None, **opts):
    args = "".join(f", {k} => %({k})s" for k in opts)
    return scalar(db, f"SELECT queue.enqueue(%(q)s, %(p)s, depends_on => %(d)s::uuid[]{args})",
                  {"q": queue, "p": payload, "d": deps, **opts})


def state(db, job):
    return scalar(db, "SELECT state::text FROM queue.status(%s)", (job,))


def ran(db, name):
    """The `n` of each logged payload, in the order the handlers ran."""
    return [r[0] for r in db.execute(f"SELECT (payload->>'n')::int FROM {name}_log ORDER BY at")]


def test_chain_and_diamond_across_queues(db, name):
    logging_queue(db, name + "_a", paused=True)
    logging_queue(db, name + "_b")
    a = enqueue(db, name + "_a", '{"n": 1}')
    b = enqueue(db, name + "_b", '{"n": 2}', [a])
    c = enqueue(db, name + "_b", '{"n": 3}', [a])
    d = enqueue(db, name + "_a", '{"n": 4}', [b, c, b])       # a repeated id counts once
    assert [state(db, j) for j in (a, b, c, d)] == ["queued", "waiting", "waiting", "waiting"]
    assert db.execute("SELECT waiting_for, depends_on FROM queue.status(%s)", (d,)).fetchone() == (2, [b, c, b])
    assert scalar(db, "SELECT waiting FROM queue.stats WHERE queue = %s", (name + "_b",)) == 2
    db.execute("SELECT queue.resume(%s)", (name + "_a",))
    wait_for(lambda: state(db, d) == "succeeded", what="the diamond's last job")
    assert ran(db, name + "_a") == [1, 4]
    assert sorted(ran(db, name + "_b")) == [2, 3]
    finished = dict(db.execute("SELECT id, finished_at FROM queue.job_status WHERE id = ANY(%s)",
                               ([a, b, c],)).fetchall())
    started = scalar(db, "SELECT started_at FROM queue.status(%s)", (d,))
    assert started > max(finished.values())


def test_fan_in_of_1000_parents_finishing_concurrently(cluster, db, name):
    """1 000 parents completed by 4 consumers at once: the fan-in job runs exactly once,
    after all of them (the race pg-boss lost children to)."""
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name + "_p",))
    logging_queue(db, name)
    parents = [r[0] for r in db.execute(
        "SELECT queue.enqueue_many(%s, array_fill('{}'::jsonb, ARRAY[1000]))", (name + "_p",))]
    child = enqueue(db, name, '{"n": 1}', parents)
    assert state(db, child) == "waiting"
    def consumer(i):
        with cluster.connect() as c:
            while True:
                jobs = c.execute("SELECT id, lease_token FROM queue.claim(%s, %s, 7)",
                                 (name + "_p", f"c{i}")).fetchall()
                if not jobs:
                    return
                with c.transaction():
                    for job, token in jobs:
                        c.execute("SELECT queue.complete(%s, %s)", (job, token))

    in_threads(consumer, 4)
    wait_for(lambda: state(db, child) == "succeeded", what="the fan-in job")
    assert ran(db, name) == [1]
    last_parent = scalar(db, "SELECT max(finished_at) FROM queue.history WHERE queue = %s", (name + "_p",))
    assert scalar(db, "SELECT started_at FROM queue.status(%s)", (child,)) > last_parent
    assert scalar(db, "SELECT count(*) FROM queue.job_dependents WHERE child = %s", (child,)) == 0


def test_batch_then_callback_with_10000_children(db, name):
    """The README recipe: 10 000 jobs and one that depends on all of them."""
    logging_queue(db, name + "_c", paused=True, concurrency=100)
    logging_queue(db, name)
    callback = scalar(db, """
        WITH batch AS (SELECT array_agg(id) AS ids
                         FROM queue.enqueue_many(%s, ARRAY(SELECT jsonb_build_object('n', i)
                                                             FROM generate_series(1, 10000) i)) id)
        SELECT queue.enqueue(%s, '{"n": 0}', depends_on => ids) FROM batch""", (name + "_c", name))
    assert db.execute("SELECT state::text, waiting_for FROM queue.status(%s)",
                      (callback,)).fetchone() == ("waiting", 10000)
    db.execute("SELECT queue.resume(%s)", (name + "_c",))
    assert wait_terminal(db, name + "_c", 10000, timeout=120) == {"succeeded": 10000}
    wait_for(lambda: state(db, callback) == "succeeded", what="the callback")
    assert ran(db, name) == [0]
    last_child = scalar(db, f"SELECT max(at) FROM {name}_c_log")
    assert scalar(db, f"SELECT at FROM {name}_log") > last_child


def test_a_failed_dependency_cancels_the_subtree_unless_it_runs_anyway(db, name):
    logging_queue(db, name, paused=True, max_attempts=1)
    root = enqueue(db, name, '{"n": 1, "fail": true}')
    child = enqueue(db, name, '{"n": 2}', [root])
    grandchild = enqueue(db, name, '{"n": 3}', [child])
    anyway = enqueue(db, name, '{"n": 4}', [child], on_dependency_failure="run")
    db.execute("SELECT queue.resume(%s)", (name,))
    wait_terminal(db, name, 4)
    assert [state(db, j) for j in (root, child, grandchild, anyway)] == \
        ["failed", "cancelled", "cancelled", "succeeded"]
    reason = scalar(db, "SELECT errors -> -1 ->> 'message' FROM queue.status(%s)", (grandchild,))
    assert reason == f"dependency {child} cancelled"
    assert ran(db, name) == [4]
    # A new job on a failed dependency is cancelled at once.
    late = enqueue(db, name, '{"n": 5}', [root])
    assert state(db, late) == "cancelled"
    # Retrying the child needs its failed dependency retried first; then it waits for it.
    with pytest.raises(psycopg.Error) as e:
        db.execute("SELECT queue.retry(%s)", (child,))
    assert e.value.sqlstate == "55000"
    db.execute("SELECT queue.pause(%s)", (name,))
    assert scalar(db, "SELECT queue.retry(%s)", (root,)) is True
    assert scalar(db, "SELECT queue.retry(%s)", (child,)) is True
    assert state(db, child) == "waiting"


def test_a_long_chain_is_cancelled_level_by_level(db, name):
    """A failure at the root of a 300-job chain cancels all of it (no recursion per level)."""
    logging_queue(db, name, paused=True, max_attempts=1)
    jobs = [enqueue(db, name, '{"n": 0, "fail": true}')]
    for i in range(300):
        jobs.append(enqueue(db, name, f'{{"n": {i + 1}}}', [jobs[-1]]))
    db.execute("SELECT queue.resume(%s)", (name,))
    assert wait_terminal(db, name, 301) == {"failed": 1, "cancelled": 300}


def test_cancel_of_a_waiting_job(db, name):
    logging_queue(db, name, paused=True)
    parent = enqueue(db, name, '{"n": 1}')
    child = enqueue(db, name, '{"n": 2}', [parent])
    grandchild = enqueue(db, name, '{"n": 3}', [child])
    assert scalar(db, "SELECT queue.cancel(%s)", (child,)) is True
    assert [state(db, j) for j in (parent, child, grandchild)] == ["queued", "cancelled", "cancelled"]
    db.execute("SELECT queue.resume(%s)", (name,))
    wait_terminal(db, name, 3)
    assert ran(db, name) == [1]


def test_a_handler_that_fails_after_fanning_out_leaves_no_children(db, name):
    """Fan-out commits with the handler: a failed attempt leaves neither children nor the
    job that would wait for them; the successful retry makes one set."""
    logging_queue(db, name + "_c")
    db.execute(f"""CREATE PROCEDURE {name}_fan(payload jsonb) LANGUAGE plpgsql AS $$
        DECLARE kids uuid[];
        BEGIN
            SELECT array_agg(queue.enqueue('{name}_c', jsonb_build_object('n', i)))
              INTO kids FROM generate_series(1, 10) i;
            PERFORM queue.enqueue('{name}_c', '{{"n": 100}}', depends_on => kids);
            IF (SELECT current_job.attempt FROM queue.current_job()) = 1 THEN
                RAISE EXCEPTION 'first attempt fails after its enqueues';
            END IF;
        END $$""")
    db.execute("SELECT queue.create_queue(%s, %s, backoff_base => '10 ms', backoff_max => '10 ms')",
               (name, f"public.{name}_fan(jsonb)"))
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    wait_for(lambda: state(db, job) == "succeeded", what="the fan-out job")
    wait_terminal(db, name + "_c", 11)
    assert sorted(ran(db, name + "_c")) == list(range(1, 11)) + [100]
    assert ran(db, name + "_c")[-1] == 100


@pytest.mark.parametrize("deps, opts, code", [
    ("ARRAY[gen_random_uuid()]", "", "42704"),
    ("ARRAY[NULL]::uuid[]", "", "22004"),
    ("ARRAY[]::uuid[]", ", on_dependency_failure => 'sometimes'", "22023"),
    ("NULL", ", on_dependency_failure => 'run'", "22023"),
])
def test_bad_dependencies_change_nothing(db, name, deps, opts, code):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    edges = scalar(db, "SELECT count(*) FROM queue.job_dependents")
    with pytest.raises(psycopg.Error) as e:
        db.execute(f"SELECT queue.enqueue(%s, depends_on => {deps}{opts})", (name,))
    assert e.value.sqlstate == code
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name,)) == 0
    assert scalar(db, "SELECT count(*) FROM queue.job_dependents") == edges


def test_a_job_others_cannot_see_is_not_a_dependency(cluster, db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name + "_secret",))
    secret = scalar(db, "SELECT queue.enqueue(%s)", (name + "_secret",))
    db.execute(f"CREATE ROLE {name}_r LOGIN")
    db.execute(f"GRANT USAGE ON SCHEMA queue TO {name}_r")
    with cluster.connect(user=f"{name}_r") as r:
        r.execute("SELECT queue.create_queue(%s, notify => true)", (name + "_mine",))
        with pytest.raises(psycopg.Error) as e:
            r.execute("SELECT queue.enqueue(%s, depends_on => ARRAY[%s]::uuid[])", (name + "_mine", secret))
        assert e.value.sqlstate == "42704"
        assert str(secret) in str(e.value)
    assert scalar(db, "SELECT count(*) FROM queue.jobs WHERE queue = %s", (name + "_mine",)) == 0


def test_a_fan_in_handler_reads_its_dependencies_results(cluster, db, name):
    db.execute("SELECT queue.create_queue(%s, notify => true, max_attempts => 1)", (name + "_p",))
    db.execute(f"CREATE TABLE {name}_seen (results jsonb, deps uuid[])")
    db.execute(f"""CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE sql AS $$
        INSERT INTO {name}_seen SELECT jsonb_agg(jsonb_build_array(r.state, r.result, r.last_error)),
                                       (SELECT depends_on FROM queue.current_job())
          FROM queue.dependency_results() r $$""")
    db.execute("SELECT queue.create_queue(%s, %s)", (name, f"public.{name}_h(jsonb)"))
    parents = [scalar(db, "SELECT queue.enqueue(%s)", (name + "_p",)) for _ in range(3)]
    child = enqueue(db, name, "{}", parents, on_dependency_failure="run")
    for i, outcome in enumerate(["complete", "fail", "complete"]):
        job, token = db.execute("SELECT id, lease_token FROM queue.claim(%s, 'c', 1)",
                                (name + "_p",)).fetchone()
        assert job == parents[i]
        if outcome == "complete":
            db.execute("SELECT queue.complete(%s, %s, %s)", (job, token, f'{{"part": {i}}}'))
        else:
            db.execute("SELECT queue.fail(%s, %s, 'no luck')", (job, token))
    wait_for(lambda: state(db, child) == "succeeded", what="the fan-in job")
    assert scalar(db, f"SELECT results FROM {name}_seen") == [
        ["succeeded", {"part": 0}, None], ["failed", None, "no luck"], ["succeeded", {"part": 2}, None]]
    assert scalar(db, f"SELECT deps FROM {name}_seen") == parents      # current_job() carries them
    assert [r[0] for r in db.execute("SELECT id FROM queue.dependency_results(%s)", (child,))] == parents
    assert sqlstate(db, "SELECT queue.dependency_results()") == "22004"
    db.execute(f"CREATE ROLE {name}_x LOGIN")
    db.execute(f"GRANT USAGE ON SCHEMA queue TO {name}_x")
    with cluster.connect(user=f"{name}_x") as x:
        assert sqlstate(x, "SELECT queue.dependency_results(%s)", (child,)) == "42704"


def test_enqueue_many_with_dependencies(db, name):
    """One depends_on list for every job of the call."""
    logging_queue(db, name, paused=True)
    first = enqueue(db, name, '{"n": 1}')
    ids = [r[0] for r in db.execute(
        "SELECT queue.enqueue_many(%s, ARRAY['{\"n\": 2}', '{\"n\": 3}']::jsonb[], depends_on => %s)",
        (name, [first]))]
    assert [state(db, j) for j in ids] == ["waiting", "waiting"]
    db.execute("SELECT queue.resume(%s)", (name,))
    wait_terminal(db, name, 3)
    assert ran(db, name)[0] == 1 and sorted(ran(db, name)) == [1, 2, 3]


def test_a_fan_in_consumer_gets_its_dependencies_from_claim(db, name):
    """External consumers learn from claim what the job depended on, and read the results."""
    db.execute("SELECT queue.create_queue(%s, notify => true)", (name,))
    parents = [scalar(db, "SELECT queue.enqueue(%s, %s)", (name, f'{{"n": {i}}}')) for i in range(2)]
    child = enqueue(db, name, '{"n": "fan-in"}', parents)
    for _ in parents:
        job, token, deps = db.execute("SELECT id, lease_token, depends_on FROM queue.claim(%s, 'c', 1)",
                                      (name,)).fetchone()
        assert job in parents and deps is None
        db.execute("SELECT queue.complete(%s, %s, jsonb_build_object('from', %s::text))", (job, token, job))
    job, _, deps = db.execute(
        "SELECT id, queue, depends_on FROM queue.claim(ARRAY[%s], 'c', 5)", (name,)).fetchone()
    assert (job, deps) == (child, parents)
    results = db.execute("SELECT id, state::text, result FROM queue.dependency_results(%s)", (job,)).fetchall()
    assert results == [(p, "succeeded", {"from": str(p)}) for p in parents]

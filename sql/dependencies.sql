-- Dependencies: enqueue(..., depends_on) makes a job `waiting` until every job it names
-- has finished (docs/design.md, "Dependencies").
--
-- A waiting job counts what it still waits for (queue.jobs.waiting_for); an edge per
-- unfinished dependency (queue.job_dependents) leads from the dependency to it. When
-- dependencies finish, one statement (the trigger below) takes their edges and decrements
-- their dependents' counters: the row lock on each dependent orders concurrent parents,
-- so exactly one of them brings the counter to zero and makes the job `queued`, however
-- many finish at once. There is no "are all my parents done?" check that two committing
-- parents could both pass or both miss.

CREATE TABLE queue.job_dependents (
    parent  uuid NOT NULL,              -- a live job ...
    child   uuid NOT NULL,              -- ... that this waiting job depends on
    PRIMARY KEY (parent, child)
);
SELECT pg_catalog.pg_extension_config_dump('queue.job_dependents', '');

-- wait_for_dependencies: for a new (or retried) job `child` that depends on `deps`, as
-- seen by role `who`: records an edge from each dependency still live and returns how many
-- there are, and one dependency that failed or was cancelled (NULL if none). Live
-- dependencies are locked FOR KEY SHARE until commit, so that none finishes (deleting its
-- row) before our edge is visible to the statement that releases its dependents; the lock
-- does not wait for a running job's executor. Ids `who` may not see: 42704. With `who`
-- NULL (retry), nothing is checked and a dependency no longer known counts as finished.
CREATE FUNCTION queue.wait_for_dependencies(child uuid, deps uuid[], who oid,
                                            OUT waiting integer, OUT broken uuid,
                                            OUT broken_state queue.job_state)
LANGUAGE plpgsql AS $$
DECLARE
    live uuid[];
    done uuid[];
    hidden uuid;
BEGIN
    IF array_position(deps, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'depends_on must not contain NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- Set-based throughout: a fan-in of 10 000 is one index scan and one hash, and the
    -- privilege check runs once per (queue, enqueuer), not per dependency.
    WITH l AS (SELECT j.id, j.queue, j.enqueued_by FROM queue.jobs j
                WHERE j.id = ANY (deps) FOR KEY SHARE OF j)
    SELECT coalesce(array_agg(l.id), '{}'),
           (SELECT min(v.id::text)::uuid
              FROM (SELECT DISTINCT ON (x.queue, x.enqueued_by) x.id, x.queue, x.enqueued_by FROM l x) v
             WHERE who IS NOT NULL AND NOT queue.sees_job(who, v.queue, v.enqueued_by))
      INTO live, hidden FROM l;
    SELECT coalesce(array_agg(x.d), '{}') INTO done
      FROM (SELECT unnest(deps) EXCEPT SELECT unnest(live)) AS x(d);
    IF cardinality(done) > 0 THEN
        IF who IS NOT NULL AND hidden IS NULL THEN
            SELECT x.d INTO hidden FROM unnest(done) x(d)
             WHERE NOT EXISTS (SELECT 1 FROM queue.history h
                                WHERE h.id = x.d AND queue.sees_job(who, h.queue, h.enqueued_by))
             LIMIT 1;
        END IF;
        SELECT h.id, h.state INTO broken, broken_state FROM queue.history h
         WHERE h.id = ANY (done) AND h.state <> 'succeeded'
         LIMIT 1;
    END IF;
    IF hidden IS NOT NULL THEN
        RAISE EXCEPTION 'job % does not exist', hidden USING ERRCODE = 'undefined_object',
            DETAIL = 'It is named in depends_on.';
    END IF;
    INSERT INTO queue.job_dependents (parent, child)
    SELECT l, wait_for_dependencies.child FROM unnest(live) l;
    GET DIAGNOSTICS waiting = ROW_COUNT;
END
$$;

-- release_dependents: after jobs reached history (any path: executor, consumer, cancel,
-- reaper, drop_queue), their dependents wait for one fewer; a dependent left with none
-- becomes queued and is announced. A dependency that failed or was cancelled cancels its
-- dependents (unless they run anyway), and theirs in turn: level by level in this one
-- call, not by recursion (a chain of thousands would exhaust the stack), so the nested
-- calls its own history inserts fire return at once.
CREATE FUNCTION queue.release_dependents() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[];
    states queue.job_state[];
    ready_queues text[];
    ready_ids uuid[];
    ready_from timestamptz;
    q queue.queues;
    r record;
BEGIN
    IF pg_trigger_depth() > 1 OR NOT EXISTS (SELECT 1 FROM queue.job_dependents) THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(f.id), array_agg(f.state) INTO ids, states FROM finished f;
    WHILE cardinality(ids) > 0 LOOP
        WITH f AS (SELECT * FROM unnest(ids, states) AS f(id, state)),
        e AS (DELETE FROM queue.job_dependents d USING f
               WHERE d.parent = f.id
              RETURNING d.child, d.parent, f.state),
        c AS (SELECT e.child, count(*)::integer AS n,
                     (array_agg(e.parent ORDER BY e.parent) FILTER (WHERE e.state <> 'succeeded'))[1] AS broken,
                     (array_agg(e.state ORDER BY e.parent) FILTER (WHERE e.state <> 'succeeded'))[1] AS broken_state
                FROM e GROUP BY e.child),
        cancelled AS (
            DELETE FROM queue.jobs j USING c
             WHERE j.id = c.child AND j.state = 'waiting'
               AND c.broken IS NOT NULL AND j.on_dependency_failure = 'cancel'
            RETURNING j.*, c.broken, c.broken_state),
        moved AS (
            INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on,
                                       on_dependency_failure, priority, run_at, attempts, max_attempts,
                                       timeout, created_at, finished_at, errors)
            SELECT x.id, x.queue, 'cancelled', x.payload, x.enqueued_by, x.unique_key, x.depends_on,
                   x.on_dependency_failure, x.priority, x.run_at, x.attempts, x.max_attempts, x.timeout,
                   x.created_at, clock_timestamp(),
                   x.errors || jsonb_build_object('attempt', x.attempts, 'at', clock_timestamp(),
                                                  'message', format('dependency %s %s', x.broken, x.broken_state))
              FROM cancelled x
            RETURNING id),
        released AS (
            UPDATE queue.jobs j
               SET waiting_for = j.waiting_for - c.n,
                   state = CASE WHEN j.waiting_for - c.n > 0 THEN 'waiting' ELSE 'queued' END::queue.job_state
              FROM c
             WHERE j.id = c.child AND j.state = 'waiting'
               AND (c.broken IS NULL OR j.on_dependency_failure = 'run')
            RETURNING j.id, j.queue, j.state, j.run_at)
        SELECT (SELECT coalesce(array_agg(m.id), '{}') FROM moved m),
               (SELECT array_agg(x.queue) FROM released x WHERE x.state = 'queued' AND x.run_at <= now()),
               (SELECT array_agg(x.id) FROM released x WHERE x.state = 'queued' AND x.run_at <= now()),
               (SELECT min(x.run_at) FROM released x WHERE x.state = 'queued')
          INTO ids, ready_queues, ready_ids, ready_from;
        states := array_fill('cancelled'::queue.job_state, ARRAY[cardinality(ids)]);
        FOR r IN SELECT x.queue, count(*)::integer AS n, min(x.id::text)::uuid AS id
                   FROM unnest(ready_queues, ready_ids) AS x(queue, id) GROUP BY x.queue LOOP
            SELECT * INTO q FROM queue.queues x WHERE x.name = r.queue;
            IF FOUND THEN
                PERFORM queue.announce(q, r.n, r.id);
            END IF;
        END LOOP;
        -- Released long after they were enqueued: behind where executors' claims resume.
        PERFORM queue.rewind_executors(ready_from);
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER history_release_dependents AFTER INSERT ON queue.history
    REFERENCING NEW TABLE AS finished
    FOR EACH STATEMENT EXECUTE FUNCTION queue.release_dependents();

-- dependency_results: the dependencies of job `job` (by default the job whose handler is
-- running), in depends_on order, with their state and result: what a fan-in handler
-- combines. Dependencies the caller may not see are left out; a job it may not see: 42704.
CREATE FUNCTION queue.dependency_results(job uuid DEFAULT NULL)
RETURNS TABLE (id uuid, queue text, state queue.job_state, result jsonb, last_error text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target uuid := coalesce(dependency_results.job, (SELECT c.id FROM queue.current_job() c));
    who oid := queue.caller();
    j record;
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'no job given, and no handler is running' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Pass the job''s id, or call it from the job''s handler.';
    END IF;
    SELECT s.depends_on, s.queue, s.enqueued_by INTO j FROM queue.all_jobs s WHERE s.id = target;
    IF NOT FOUND OR NOT queue.sees_job(who, j.queue, j.enqueued_by) THEN
        RAISE EXCEPTION 'job % does not exist', target USING ERRCODE = 'undefined_object';
    END IF;
    RETURN QUERY
    SELECT s.id, s.queue, s.state, s.result, s.last_error
      FROM unnest(j.depends_on) WITH ORDINALITY AS d(id, n)
      JOIN queue.all_jobs s ON s.id = d.id
     WHERE queue.sees_job(who, s.queue, s.enqueued_by)
     ORDER BY d.n;
END
$$;
COMMENT ON FUNCTION queue.dependency_results(uuid) IS
    'The dependencies of a job (default: the one whose handler is running), in depends_on order, with state, result and last error.';

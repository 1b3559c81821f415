-- Jobs: enqueue, enqueue_many, cancel, status, retry, purge, and the views job_status and
-- stats. Requires queue.uuid_generate_v7() and queue.wake_executors() (src/api/mod.rs) and
-- the privilege checks of sql/privileges.sql.
--
-- Who sees a job (status, job_status, cancel, retry): a role with read on its queue
-- (owner, read, consume, manage), and the role that enqueued it (or a role with its
-- privileges) while it still holds enqueue. To anyone else a job does not exist.

-- The invariants of a live job's row (src/state.rs): a row trigger in C rather than CHECKs,
-- because Postgres reads and plans a CHECK expression again for every INSERT and UPDATE
-- statement, and that cost an enqueue a fifth of its CPU. A violation is still a
-- check_violation (23514) naming the invariant. Like every trigger it is skipped under
-- session_replication_role = replica, which only a superuser may set.
CREATE FUNCTION queue.jobs_invariants() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'pg_queue_jobs_invariants';
REVOKE ALL ON FUNCTION queue.jobs_invariants() FROM PUBLIC;
COMMENT ON FUNCTION queue.jobs_invariants() IS
    'Trigger of queue.jobs: raises check_violation (23514) naming the invariant of a live job that a row breaks.';
CREATE TRIGGER jobs_invariants BEFORE INSERT OR UPDATE ON queue.jobs
    FOR EACH ROW EXECUTE FUNCTION queue.jobs_invariants();

-- channel: the NOTIFY channel of a queue. Queue names may be 63 characters but channels
-- only 63 bytes in all, so a long name is shortened and made unique with its md5.
CREATE FUNCTION queue.channel(queue text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN pg_catalog.octet_length(queue) OPERATOR(pg_catalog.<=) 57
                THEN 'queue.' OPERATOR(pg_catalog.||) queue
                ELSE 'queue.' OPERATOR(pg_catalog.||) pg_catalog."left"(queue, 40)
                     OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog."left"(pg_catalog.md5(queue), 16) END
$$;
COMMENT ON FUNCTION queue.channel(text) IS
    'The NOTIFY channel of a NOTIFY queue: ''queue.'' || name (names over 57 bytes are shortened with an md5). LISTEN to it as a quoted identifier.';

-- announce: `n` jobs of queue `q` became ready in this transaction. Executors are woken at
-- commit; for a NOTIFY queue a notification carries the job's id (empty when several
-- became ready at once), delivered at commit like every NOTIFY. Nobody is woken for a
-- paused queue: resume() does that.
CREATE FUNCTION queue.announce(q queue.queues, n integer, job_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF q.paused THEN
        RETURN;
    ELSIF q.notify THEN
        PERFORM pg_notify(queue.channel(q.name), CASE WHEN n = 1 THEN job_id::text ELSE '' END);
    ELSE
        PERFORM queue.wake_executors(n);
    END IF;
END
$$;
COMMENT ON FUNCTION queue.announce(queue.queues, integer, uuid) IS
    'Internal: wakes executors, or notifies the consumers of a NOTIFY queue, at commit.';

-- check_job_options: the per-job options enqueue and enqueue_many share.
CREATE FUNCTION queue.check_job_options(priority integer, max_attempts integer, timeout interval)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF priority IS NULL THEN
        RAISE EXCEPTION 'priority must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    ELSIF max_attempts < 1 OR max_attempts > 1000 THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 1000, not %', max_attempts
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF timeout <= interval '0' OR timeout > interval '24 hours' THEN
        RAISE EXCEPTION 'timeout must be positive and at most 24 hours, not %', timeout
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- check_capacity: 54000 when the queue is full (the launcher marks a queue holding
-- max_pending_jobs live jobs), when a call brings more jobs than that, or when a payload is
-- larger than max_payload_size (the queue's, or the server's queue.max_payload_size).
CREATE FUNCTION queue.check_capacity(q queue.queues, payloads jsonb[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    max_size integer := least(q.max_payload_size, current_setting('queue.max_payload_size')::integer);
    max_pending bigint := least(q.max_pending_jobs, current_setting('queue.max_pending_jobs')::bigint);
    too_big integer;
BEGIN
    IF q.is_full OR cardinality(payloads) > max_pending THEN
        RAISE EXCEPTION 'queue "%" is full', q.name USING ERRCODE = 'program_limit_exceeded',
            DETAIL = format('It may hold %s pending jobs.', max_pending),
            HINT = 'Wait for its jobs to finish, or raise its max_pending_jobs (queue.alter_queue).';
    END IF;
    SELECT max(pg_column_size(p)) INTO too_big FROM unnest(payloads) p;
    IF too_big > max_size THEN
        RAISE EXCEPTION 'payload too large: % bytes', too_big USING ERRCODE = 'program_limit_exceeded',
            DETAIL = format('Queue "%s" accepts payloads of at most %s bytes.', q.name, max_size);
    END IF;
END
$$;

-- enqueue: a C function (src/api/enqueue.rs) for its common case: a job with no unique
-- key, dependencies, max_attempts or timeout of its own, into a queue the caller may use,
-- not full, with a payload that fits. Anything else it hands to enqueue_sql below with the
-- same arguments, and so does every error. Both write the job alike (a pg_test checks it).
CREATE FUNCTION queue.enqueue(
    queue        text,
    payload      jsonb       DEFAULT '{}',
    run_at       timestamptz DEFAULT NULL,
    priority     integer     DEFAULT 0,
    max_attempts integer     DEFAULT NULL,
    timeout      interval    DEFAULT NULL,
    unique_key   text        DEFAULT NULL,
    unique_for   interval    DEFAULT NULL,
    depends_on   uuid[]      DEFAULT NULL,
    on_dependency_failure text DEFAULT NULL,
    fair_key     text        DEFAULT NULL)
RETURNS uuid LANGUAGE c VOLATILE SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'pg_queue_enqueue';
COMMENT ON FUNCTION queue.enqueue(text, jsonb, timestamptz, integer, integer, interval, text, interval, uuid[], text, text) IS
    'Enqueues one job in the caller''s transaction (workers see it at commit) and returns its id. run_at in the future schedules it; lower priority runs first; max_attempts and timeout default to the queue''s. With unique_key: while a job of the queue with that key is live (or succeeded less than unique_for ago), returns its id and adds nothing (queue.enqueue_unique also says which happened). With depends_on: the job waits until those jobs finished; one that failed or was cancelled cancels it, unless on_dependency_failure is ''run''. fair_key: the share of a fair_share queue it belongs to (a tenant, a customer).';

-- enqueue_sql: the whole of enqueue, every option and every error; enqueue's C fast path
-- hands it whatever is not its common case. Internal: runs as enqueue, its caller's
-- identity in queue.caller().
CREATE FUNCTION queue.enqueue_sql(
    queue        text,
    payload      jsonb       DEFAULT '{}',
    run_at       timestamptz DEFAULT NULL,
    priority     integer     DEFAULT 0,
    max_attempts integer     DEFAULT NULL,
    timeout      interval    DEFAULT NULL,
    unique_key   text        DEFAULT NULL,
    unique_for   interval    DEFAULT NULL,
    depends_on   uuid[]      DEFAULT NULL,
    on_dependency_failure text DEFAULT NULL,
    fair_key     text        DEFAULT NULL)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    q queue.queues;
    job_id uuid := queue.uuid_generate_v7();
    who oid := queue.caller();
BEGIN
    PERFORM queue.lock_queue(enqueue_sql.queue, 'insert');    -- no drop meanwhile
    SELECT * INTO q FROM queue.queues x WHERE x.name = enqueue_sql.queue;
    IF NOT FOUND THEN
        q := queue.find_queue(queue);           -- raises the right error
    END IF;
    IF NOT pg_has_role(who, q.owner, 'USAGE') AND NOT queue.may(who, q, 'enqueue') THEN
        PERFORM queue.authorize(q.name, 'enqueue');
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Use ''{}'' for a job without data.';
    END IF;
    IF q.is_full OR pg_column_size(payload)
                    > least(q.max_payload_size, current_setting('queue.max_payload_size')::integer) THEN
        PERFORM queue.check_capacity(q, ARRAY[payload]);
    END IF;
    IF priority IS NULL OR max_attempts IS NOT NULL OR timeout IS NOT NULL THEN
        PERFORM queue.check_job_options(priority, max_attempts, timeout);
    END IF;
    IF unique_key IS NOT NULL OR unique_for IS NOT NULL OR depends_on IS NOT NULL
       OR on_dependency_failure IS NOT NULL THEN
        RETURN (queue.insert_job(q, who, payload, run_at, priority, max_attempts, timeout,
                                 unique_key, unique_for, depends_on, on_dependency_failure,
                                 enqueue_sql.fair_key)).id;
    END IF;
    INSERT INTO queue.jobs (id, queue, state, payload, enqueued_by, priority, run_at, max_attempts,
                            timeout, created_at, fair_key)
    VALUES (job_id, q.name, 'queued', payload, who, priority, coalesce(run_at, now()),
            coalesce(max_attempts, q.max_attempts), timeout, now(),
            CASE WHEN q.fair_share THEN coalesce(enqueue_sql.fair_key, '') ELSE enqueue_sql.fair_key END);
    IF (run_at IS NULL OR run_at <= now()) AND NOT q.paused THEN     -- resume() wakes them
        IF q.notify THEN
            PERFORM pg_notify(queue.channel(q.name), job_id::text);
        ELSE
            PERFORM queue.wake_executors(1);
            PERFORM queue.rewind_executors(run_at);     -- a run_at of the past
        END IF;
    END IF;
    RETURN job_id;
END
$$;
COMMENT ON FUNCTION queue.enqueue_sql(text, jsonb, timestamptz, integer, integer, interval, text, interval, uuid[], text, text) IS
    'Internal: queue.enqueue in PL/pgSQL, for options and errors its C fast path does not take.';

-- insert_job: enqueue's path for a job with a unique key or dependencies, once the
-- caller passed enqueue's checks.
-- Unique keys: the unique index decides (ON CONFLICT DO NOTHING), so concurrent enqueues
-- of one key make one job. A job that succeeded within unique_for counts too: it is
-- looked for after our row took the key, so it finished before (an insert waits for a
-- transaction moving the key's live job to history) and this READ COMMITTED statement
-- sees it; our row is then taken back. The loop covers a live job that finished between
-- the insert and the lookup.
-- Dependencies: sql/dependencies.sql. A job whose dependency already failed or was
-- cancelled is recorded cancelled at once (unless on_dependency_failure = 'run').
CREATE FUNCTION queue.insert_job(
    q queue.queues, who oid, payload jsonb, run_at timestamptz, priority integer,
    max_attempts integer, timeout interval, unique_key text, unique_for interval,
    depends_on uuid[], on_dependency_failure text, fair_key text,
    OUT id uuid, OUT created boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    existing uuid;
    n_waiting integer := 0;
    broken_id uuid;
    broken_state queue.job_state;
BEGIN
    IF unique_for IS NOT NULL THEN
        IF unique_key IS NULL THEN
            RAISE EXCEPTION 'unique_for needs a unique_key' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF unique_for <= interval '0' THEN
            RAISE EXCEPTION 'unique_for must be positive, not %', unique_for
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'unique_for needs a READ COMMITTED transaction'
                USING ERRCODE = 'feature_not_supported',
                      DETAIL = format('Under %s isolation a job of the key finishing meanwhile would not be seen.',
                                      current_setting('transaction_isolation')),
                      HINT = 'Enqueue in a READ COMMITTED transaction, or without unique_for.';
        END IF;
    END IF;
    IF depends_on IS NOT NULL THEN
        on_dependency_failure := coalesce(on_dependency_failure, 'cancel');
        IF on_dependency_failure NOT IN ('cancel', 'run') THEN
            RAISE EXCEPTION 'on_dependency_failure must be cancel or run, not %', on_dependency_failure
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    ELSIF on_dependency_failure IS NOT NULL THEN
        RAISE EXCEPTION 'on_dependency_failure needs depends_on' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 1 .. 100 LOOP
        id := queue.uuid_generate_v7();
        IF depends_on IS NOT NULL THEN
            SELECT w.waiting, w.broken, w.broken_state INTO n_waiting, broken_id, broken_state
              FROM queue.wait_for_dependencies(id, depends_on, who) w;
            IF broken_id IS NOT NULL AND on_dependency_failure = 'cancel' THEN
                DELETE FROM queue.job_dependents d WHERE d.child = insert_job.id;
                INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on,
                                           on_dependency_failure, priority, run_at, attempts, max_attempts,
                                           timeout, created_at, finished_at, errors)
                VALUES (id, q.name, 'cancelled', payload, who, unique_key, depends_on, on_dependency_failure,
                        priority, coalesce(run_at, now()), 0, coalesce(max_attempts, q.max_attempts), timeout,
                        now(), clock_timestamp(),
                        jsonb_build_array(jsonb_build_object('attempt', 0, 'at', clock_timestamp(),
                            'message', format('dependency %s %s', broken_id, broken_state))));
                created := true;
                RETURN;
            END IF;
        END IF;
        INSERT INTO queue.jobs AS j (id, queue, state, payload, enqueued_by, priority, run_at,
                                     max_attempts, timeout, created_at, unique_key, depends_on,
                                     on_dependency_failure, waiting_for, fair_key)
        VALUES (id, q.name, CASE WHEN n_waiting > 0 THEN 'waiting' ELSE 'queued' END::queue.job_state,
                payload, who, priority, coalesce(run_at, now()), coalesce(max_attempts, q.max_attempts),
                timeout, now(), unique_key, depends_on, on_dependency_failure, n_waiting,
                CASE WHEN q.fair_share THEN coalesce(insert_job.fair_key, '') ELSE insert_job.fair_key END)
        ON CONFLICT (queue, unique_key) WHERE j.unique_key IS NOT NULL DO NOTHING;
        IF FOUND THEN
            IF unique_for IS NOT NULL THEN
                SELECT h.id INTO existing FROM queue.history h
                 WHERE h.queue = q.name AND h.unique_key = insert_job.unique_key
                   AND h.state = 'succeeded' AND h.finished_at > clock_timestamp() - unique_for
                 ORDER BY h.finished_at DESC LIMIT 1;
                IF FOUND THEN
                    DELETE FROM queue.jobs j WHERE j.id = insert_job.id;
                    DELETE FROM queue.job_dependents d WHERE d.child = insert_job.id;
                    id := existing;
                    created := false;
                    RETURN;
                END IF;
            END IF;
            IF n_waiting = 0 AND (run_at IS NULL OR run_at <= now()) THEN
                PERFORM queue.announce(q, 1, id);
                PERFORM queue.rewind_executors(run_at);     -- a run_at of the past
            END IF;
            created := true;
            RETURN;
        END IF;
        DELETE FROM queue.job_dependents d WHERE d.child = insert_job.id;
        SELECT j.id INTO id FROM queue.jobs j WHERE j.queue = q.name AND j.unique_key = insert_job.unique_key;
        IF FOUND THEN
            created := false;
            RETURN;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'could not enqueue with unique key "%": its jobs keep finishing', unique_key
        USING ERRCODE = 'serialization_failure', HINT = 'Retry the transaction.';
END
$$;

CREATE FUNCTION queue.enqueue_unique(
    queue        text,
    unique_key   text,
    payload      jsonb       DEFAULT '{}',
    run_at       timestamptz DEFAULT NULL,
    priority     integer     DEFAULT 0,
    max_attempts integer     DEFAULT NULL,
    timeout      interval    DEFAULT NULL,
    unique_for   interval    DEFAULT NULL,
    depends_on   uuid[]      DEFAULT NULL,
    on_dependency_failure text DEFAULT NULL,
    fair_key     text        DEFAULT NULL)
RETURNS TABLE (id uuid, created boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues;
BEGIN
    PERFORM queue.lock_queue(queue, 'insert');                 -- no drop meanwhile
    q := queue.authorize(queue, 'enqueue');
    IF unique_key IS NULL THEN
        RAISE EXCEPTION 'unique_key must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Use queue.enqueue for a job without a key.';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Use ''{}'' for a job without data.';
    END IF;
    PERFORM queue.check_capacity(q, ARRAY[payload]);
    PERFORM queue.check_job_options(priority, max_attempts, timeout);
    RETURN QUERY SELECT u.id, u.created
      FROM queue.insert_job(q, queue.caller(), payload, run_at, priority, max_attempts, timeout,
                            unique_key, unique_for, depends_on, on_dependency_failure, fair_key) u;
END
$$;
COMMENT ON FUNCTION queue.enqueue_unique(text, text, jsonb, timestamptz, integer, integer, interval, interval, uuid[], text, text) IS
    'Enqueues a job unless one of the queue with unique_key is live (or succeeded less than unique_for ago); returns the id of the job that stands for the key and whether this call created it.';

CREATE FUNCTION queue.enqueue_many(
    queue        text,
    payloads     jsonb[],
    run_at       timestamptz DEFAULT NULL,
    priority     integer     DEFAULT 0,
    max_attempts integer     DEFAULT NULL,
    timeout      interval    DEFAULT NULL,
    unique_keys  text[]      DEFAULT NULL,
    unique_for   interval    DEFAULT NULL,
    depends_on   uuid[]      DEFAULT NULL,
    on_dependency_failure text DEFAULT NULL,
    fair_keys    text[]      DEFAULT NULL)
RETURNS SETOF uuid LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues;
    n integer;
    who oid;
BEGIN
    PERFORM queue.lock_queue(queue, 'insert');                 -- no drop meanwhile
    q := queue.authorize(queue, 'enqueue');
    IF payloads IS NULL OR array_position(payloads, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'payloads must not be NULL nor contain NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM queue.check_job_options(priority, max_attempts, timeout);
    PERFORM queue.check_capacity(q, payloads);          -- all or nothing
    IF cardinality(fair_keys) <> cardinality(payloads) THEN
        RAISE EXCEPTION 'fair_keys has % elements for % payloads', cardinality(fair_keys), cardinality(payloads)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Give one key (or NULL) per payload.';
    END IF;
    IF unique_keys IS NOT NULL OR unique_for IS NOT NULL OR depends_on IS NOT NULL
       OR on_dependency_failure IS NOT NULL THEN
        -- Keys or dependencies: job by job, in payload order, through enqueue's own path,
        -- so a key repeated within the call gives the first job's id again.
        IF cardinality(unique_keys) <> cardinality(payloads) THEN
            RAISE EXCEPTION 'unique_keys has % elements for % payloads', cardinality(unique_keys),
                            cardinality(payloads)
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Give one key (or NULL) per payload.';
        END IF;
        who := queue.caller();
        FOR i IN 1 .. cardinality(payloads) LOOP
            RETURN NEXT (queue.insert_job(q, who, payloads[i], run_at, priority, max_attempts, timeout,
                                          unique_keys[i], unique_for, depends_on,
                                          on_dependency_failure, fair_keys[i])).id;
        END LOOP;
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO queue.jobs (id, queue, state, payload, enqueued_by, priority, run_at, max_attempts,
                            timeout, created_at, fair_key)
    SELECT queue.uuid_generate_v7(), q.name, 'queued', p.payload, queue.caller(), enqueue_many.priority,
           coalesce(enqueue_many.run_at, now()), coalesce(enqueue_many.max_attempts, q.max_attempts),
           enqueue_many.timeout, now(), CASE WHEN q.fair_share THEN coalesce(p.fkey, '') ELSE p.fkey END
      FROM unnest(payloads, coalesce(fair_keys, '{}')) WITH ORDINALITY AS p(payload, fkey, ord)
     ORDER BY p.ord
    RETURNING id;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND (run_at IS NULL OR run_at <= now()) THEN
        PERFORM queue.announce(q, n, NULL);
        PERFORM queue.rewind_executors(run_at);     -- a run_at of the past
    END IF;
END
$$;
COMMENT ON FUNCTION queue.enqueue_many(text, jsonb[], timestamptz, integer, integer, interval, text[], interval, uuid[], text, text[]) IS
    'Enqueues one job per payload in one statement; returns their ids in payload order. unique_keys and fair_keys (one per payload, or NULL), unique_for, depends_on (for every job) and on_dependency_failure work as in enqueue; a key repeated in the call returns the first job''s id again.';

-- progress_entry: what a failed attempt's errors entry adds for its last progress report.
CREATE FUNCTION queue.progress_entry(progress jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN progress IS NULL THEN '{}'::pg_catalog.jsonb
                ELSE pg_catalog.jsonb_build_object('progress', progress) END
$$;

-- sees_job: whether role `who` may see a job of `job_queue` that `enqueuer` enqueued.
CREATE FUNCTION queue.sees_job(who oid, job_queue text, enqueuer oid) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    q queue.queues;
BEGIN
    SELECT * INTO q FROM queue.queues x WHERE x.name = job_queue;
    IF NOT FOUND THEN                           -- its queue was dropped: superusers only
        RETURN coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.oid = who), false);
    END IF;
    RETURN queue.may(who, q, 'read')
        OR (pg_has_role(who, enqueuer, 'USAGE') AND queue.may(who, q, 'enqueue'));
END
$$;

-- authorize_job: raises 42704 when the caller may not see the job (the same error as for
-- a job that does not exist), 42501 when it sees the job but may not `action` it:
-- cancel (manage, or the enqueuer) or retry (manage).
CREATE FUNCTION queue.authorize_job(id uuid, job_queue text, enqueuer oid, action text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    who oid := queue.caller();
    q queue.queues;
BEGIN
    IF job_queue IS NULL OR NOT queue.sees_job(who, job_queue, enqueuer) THEN
        RAISE EXCEPTION 'job % does not exist', id USING ERRCODE = 'undefined_object';
    END IF;
    SELECT * INTO q FROM queue.queues x WHERE x.name = job_queue;
    IF NOT (queue.may(who, q, 'manage')
            OR (action = 'cancel' AND pg_has_role(who, enqueuer, 'USAGE') AND queue.may(who, q, 'enqueue'))) THEN
        RAISE EXCEPTION 'permission denied to % job %', action, id USING ERRCODE = 'insufficient_privilege',
            DETAIL = format('This needs the manage privilege on queue "%s"%s.', job_queue,
                            CASE WHEN action = 'cancel' THEN ', or to have enqueued the job' ELSE '' END);
    END IF;
END
$$;

CREATE FUNCTION queue.cancel(id uuid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st queue.job_state;
    pid integer;
    held_by text;
    job_queue text;
    enqueuer oid;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    LOOP
        -- No row lock here: a running job's row is locked by its executor until the
        -- handler ends, and a cancel must not wait for that.
        SELECT j.state, j.worker_pid, j.consumer, j.queue, j.enqueued_by
          INTO st, pid, held_by, job_queue, enqueuer
          FROM queue.jobs j WHERE j.id = cancel.id;
        IF NOT FOUND THEN
            SELECT h.queue, h.enqueued_by INTO job_queue, enqueuer FROM queue.history h
             WHERE h.id = cancel.id AND h.finished_at >= queue.uuid_time(cancel.id) - interval '1 day';
            IF FOUND THEN
                PERFORM queue.authorize_job(id, job_queue, enqueuer, 'cancel');
                RETURN false;                   -- already terminal
            END IF;
            PERFORM queue.authorize_job(id, NULL, NULL, 'cancel');  -- raises 42704
        END IF;
        PERFORM queue.authorize_job(id, job_queue, enqueuer, 'cancel');
        IF st = 'running' AND held_by IS NULL THEN
            -- The executor interrupts the handler and records the job as cancelled; a
            -- handler that already finished leaves it succeeded.
            RETURN queue.request_cancel(cancel.id, pid);
        END IF;
        -- A job held by an external consumer is cancelled at once: its lease token stops
        -- matching, so the consumer's next heartbeat or complete returns false.
        WITH d AS (DELETE FROM queue.jobs j
                    WHERE j.id = cancel.id
                      AND (j.state IN ('queued', 'waiting') OR j.consumer IS NOT NULL)
                   RETURNING j.*)
        INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts,
                                   max_attempts, timeout, created_at, started_at, finished_at, worker_pid,
                                   consumer, progress, snoozes, fair_key, errors)
        SELECT d.id, d.queue, 'cancelled', d.payload, d.enqueued_by, d.unique_key, d.depends_on, d.on_dependency_failure, d.priority, d.run_at, d.attempts,
               d.max_attempts, d.timeout, d.created_at, d.started_at, clock_timestamp(), d.worker_pid,
               d.consumer, d.progress, d.snoozes, d.fair_key, d.errors
          FROM d;
        IF FOUND THEN
            RETURN true;
        END IF;
        -- Claimed meanwhile: look again.
    END LOOP;
END
$$;
COMMENT ON FUNCTION queue.cancel(uuid) IS
    'Cancels a job: a queued one moves to history as cancelled at once; a running one has its handler interrupted and its effects rolled back; one held by an external consumer is cancelled at once and the consumer''s lease token stops working. Returns false when the job already finished.';

-- all_jobs: every job, live or finished, in one relation (internal: no filter). Reading it
-- in one statement takes one snapshot, so a job moving from jobs to history is never missed
-- nor seen twice.
CREATE VIEW queue.all_jobs AS
SELECT j.id, j.queue, j.state, j.state = 'queued' AND j.run_at > now() AS scheduled,
       j.attempts, j.max_attempts, j.priority, j.run_at, j.created_at, j.started_at,
       NULL::timestamptz AS finished_at, j.errors -> -1 ->> 'message' AS last_error,
       j.errors, NULL::jsonb AS result, j.worker_pid, j.consumer, j.lease_expires_at, j.payload,
       j.enqueued_by, j.unique_key, j.depends_on, j.waiting_for,
       -- an executor publishes its handler's progress in shared memory, a consumer here
       CASE WHEN j.worker_id IS NULL THEN j.progress ELSE queue.job_progress(j.id, j.worker_id) END
           AS progress, j.snoozes, j.fair_key
  FROM queue.jobs j
UNION ALL
SELECT h.id, h.queue, h.state, false, h.attempts, h.max_attempts, h.priority, h.run_at,
       h.created_at, h.started_at, h.finished_at, h.errors -> -1 ->> 'message', h.errors,
       h.result, h.worker_pid, h.consumer, NULL::timestamptz, h.payload, h.enqueued_by,
       h.unique_key, h.depends_on, 0, h.progress, h.snoozes, h.fair_key
  FROM queue.history h;

-- job_status: the jobs the current role may see. A security barrier: a function in a
-- query's WHERE clause sees no row the filter removed (unless it is leakproof).
CREATE VIEW queue.job_status WITH (security_barrier) AS
SELECT s.*
  FROM queue.all_jobs s
  LEFT JOIN queue.my_privileges() p ON p.queue = s.queue
 WHERE p.read OR (p.enqueue AND pg_catalog.pg_has_role(current_user, s.enqueued_by, 'USAGE'))
    -- jobs of dropped queues: superusers only (as queue.sees_job)
    OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user);
COMMENT ON VIEW queue.job_status IS
    'The jobs the current role may see, live and finished. Filter on id (or queue) to keep it cheap.';

CREATE FUNCTION queue.status(id uuid)
RETURNS SETOF queue.job_status LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM queue.all_jobs s
     WHERE s.id = status.id
       -- history partitions that cannot hold the job are pruned: it finished after it was created
       AND (s.finished_at IS NULL OR s.finished_at >= queue.uuid_time(status.id) - interval '1 day')
       AND queue.sees_job(queue.caller(), s.queue, s.enqueued_by)
$$;
COMMENT ON FUNCTION queue.status(uuid) IS
    'The job''s state, attempts, times, last error, errors, result, worker and progress; no row for an unknown id.';

CREATE FUNCTION queue.retry(id uuid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    h queue.history;
    q queue.queues;
    n integer;
    waiting integer := 0;
    broken uuid;
    broken_state queue.job_state;
BEGIN
    IF id IS NULL THEN
        RAISE EXCEPTION 'id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT * INTO h FROM queue.history x
     WHERE x.id = retry.id AND x.finished_at >= queue.uuid_time(retry.id) - interval '1 day';
    IF NOT FOUND THEN
        SELECT j.queue, j.enqueued_by INTO h.queue, h.enqueued_by FROM queue.jobs j WHERE j.id = retry.id;
        PERFORM queue.authorize_job(id, h.queue, h.enqueued_by, 'retry');   -- 42704 when unknown
        RETURN false;                           -- still live
    END IF;
    PERFORM queue.authorize_job(id, h.queue, h.enqueued_by, 'retry');
    IF h.state = 'succeeded' THEN
        RETURN false;
    END IF;
    PERFORM queue.lock_queue(h.queue, 'insert');               -- no drop meanwhile
    q := queue.find_queue(h.queue);
    -- A dependent waits again for the dependencies that have not finished; one that failed
    -- or was cancelled must be retried first (unless the job runs anyway).
    IF h.depends_on IS NOT NULL THEN
        SELECT w.waiting, w.broken, w.broken_state INTO waiting, broken, broken_state
          FROM queue.wait_for_dependencies(retry.id, h.depends_on, NULL) w;
        IF broken IS NOT NULL AND h.on_dependency_failure = 'cancel' THEN
            RAISE EXCEPTION 'job % depends on job %, which %', retry.id, broken, broken_state
                USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Retry that job first.';
        END IF;
    END IF;
    -- A retried job gets its full attempts again; its errors stay, each naming its attempt.
    WITH d AS (DELETE FROM queue.history x
                WHERE x.id = retry.id AND x.state IN ('failed', 'cancelled')
                  AND x.finished_at >= queue.uuid_time(retry.id) - interval '1 day'
               RETURNING x.*)
    INSERT INTO queue.jobs (id, queue, state, payload, enqueued_by, unique_key, depends_on,
                            on_dependency_failure, waiting_for, priority, run_at, attempts,
                            max_attempts, timeout, created_at, errors, fair_key)
    SELECT d.id, d.queue, CASE WHEN waiting > 0 THEN 'waiting' ELSE 'queued' END::queue.job_state,
           d.payload, d.enqueued_by, d.unique_key, d.depends_on, d.on_dependency_failure, waiting,
           d.priority, now(), 0, d.max_attempts, d.timeout, d.created_at, d.errors,
           CASE WHEN q.fair_share THEN coalesce(d.fair_key, '') ELSE d.fair_key END
      FROM d;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 AND waiting = 0 THEN
        PERFORM queue.announce(q, 1, retry.id);
    END IF;
    RETURN n > 0;
END
$$;
COMMENT ON FUNCTION queue.retry(uuid) IS
    'Re-queues a failed or cancelled job with a fresh set of attempts (a dependent waits again for its unfinished dependencies); false when the job is live or succeeded.';

-- backoff: delay before retrying a job whose attempt `attempt` failed: exponential from
-- `base`, capped at `max`, with "equal jitter" (uniform in [d/2, d]) so that jobs that
-- failed together do not retry together.
CREATE FUNCTION queue.backoff(base interval, max interval, attempt integer) RETURNS interval
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT least(max, base OPERATOR(pg_catalog.*)
                      pg_catalog.power(2, least(greatest(attempt, 1) OPERATOR(pg_catalog.-) 1, 40)))
           OPERATOR(pg_catalog.*) (0.5 OPERATOR(pg_catalog.+) (pg_catalog.random() OPERATOR(pg_catalog.*) 0.5))
$$;
COMMENT ON FUNCTION queue.backoff(interval, interval, integer) IS
    'Delay before retrying after failed attempt n: least(max, base * 2^(n-1)), jittered to between half and all of it.';

CREATE FUNCTION queue.purge(queue text, older_than interval DEFAULT '0',
                            states queue.job_state[] DEFAULT '{succeeded,failed,cancelled}')
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues := queue.authorize(queue, 'manage', true);
    n bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be zero or positive, not %', coalesce(older_than::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF states IS NULL OR cardinality(states) = 0
          OR NOT states <@ '{succeeded,failed,cancelled}'::queue.job_state[] THEN
        RAISE EXCEPTION 'states must be terminal states (succeeded, failed, cancelled), not %',
                        coalesce(states::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    DELETE FROM queue.history h
     WHERE h.queue = q.name AND h.state = ANY(states) AND h.finished_at < now() - older_than;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION queue.purge(text, interval, queue.job_state[]) IS
    'Deletes a queue''s finished jobs older than older_than (in the given terminal states) from history now, in one statement; returns how many. Retention does this by itself in batches.';


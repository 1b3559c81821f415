-- Queue administration: create_queue, alter_queue, drop_queue, pause, resume.
-- Every API function here has `SET search_path = pg_catalog, pg_temp`: it runs as the
-- extension owner and checks the privileges of queue.caller() (sql/privileges.sql).
-- Errors carry SQLSTATEs: 22023 invalid_parameter_value, 22004 null_value_not_allowed,
-- 42704 undefined_object (unknown queue), 42710 duplicate_object, 42501 insufficient_privilege,
-- 55006 object_in_use (drop with live jobs).

-- check_handler: validates a SQL handler and returns its schema-qualified signature text.
-- A handler is a procedure, or a function, taking exactly one argument of type jsonb,
-- which `owner` (as whom it will run) may call.
CREATE FUNCTION queue.check_handler(handler regprocedure, owner oid) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    p pg_proc;
BEGIN
    SELECT * INTO p FROM pg_proc WHERE oid = handler;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'handler % does not exist', handler USING ERRCODE = 'undefined_function';
    END IF;
    IF p.prokind NOT IN ('f', 'p') OR p.proretset OR p.pronargs <> 1
       OR p.proargtypes[0] <> 'jsonb'::regtype THEN
        RAISE EXCEPTION 'handler % has the wrong signature', handler
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A handler is a procedure or a function with one argument of type jsonb, '
                         'for example: CREATE PROCEDURE my_handler(payload jsonb) ...';
    END IF;
    IF NOT has_function_privilege(owner, handler, 'EXECUTE')
       OR NOT has_schema_privilege(owner, p.pronamespace, 'USAGE') THEN
        RAISE EXCEPTION 'permission denied for handler %', handler
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('The handler runs as the queue''s owner, %s, who may not call it.', owner::regrole);
    END IF;
    RETURN format('%I.%I(jsonb)',
                  (SELECT nspname FROM pg_namespace WHERE oid = p.pronamespace), p.proname);
END
$$;

-- check_settings: the checks create_queue and alter_queue share, with readable errors
-- (the table's CHECK constraints are only the last line of defence).
CREATE FUNCTION queue.check_settings(
    concurrency integer, max_attempts integer, timeout interval,
    backoff_base interval, backoff_max interval, retention interval)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF concurrency IS NULL OR concurrency < 1 OR concurrency > 10000 THEN
        RAISE EXCEPTION 'concurrency must be between 1 and 10000, not %', coalesce(concurrency::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF max_attempts IS NULL OR max_attempts < 1 OR max_attempts > 1000 THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 1000, not %', coalesce(max_attempts::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF timeout IS NULL OR timeout <= interval '0' OR timeout > interval '24 hours' THEN
        RAISE EXCEPTION 'timeout must be positive and at most 24 hours, not %', coalesce(timeout::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF backoff_base IS NULL OR backoff_base < interval '0' THEN
        RAISE EXCEPTION 'backoff_base must be zero or positive, not %', coalesce(backoff_base::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF backoff_max IS NULL OR backoff_max < backoff_base THEN
        RAISE EXCEPTION 'backoff_max must be at least backoff_base (%), not %', backoff_base, coalesce(backoff_max::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF retention IS NULL OR retention <= interval '0' THEN
        RAISE EXCEPTION 'retention must be positive, not %', coalesce(retention::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- check_state_retentions: the per-state retentions are NULL (the queue's retention) or positive.
CREATE FUNCTION queue.check_state_retentions(succeeded interval, failed interval, cancelled interval)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF succeeded <= interval '0' OR failed <= interval '0' OR cancelled <= interval '0' THEN
        RAISE EXCEPTION 'retention_succeeded, retention_failed and retention_cancelled must be positive (or NULL)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- check_search_path: a handler's search_path must be a valid setting. Validated by setting
-- it: the SET clause of this function restores the previous value when it returns.
CREATE FUNCTION queue.check_search_path(path text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF path IS NULL THEN
        RAISE EXCEPTION 'search_path must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'The default is ''"$user", public''.';
    END IF;
    PERFORM pg_catalog.set_config('search_path', path, true);
END
$$;

-- check_limits: a queue's limits may only lower the server's (queue.max_payload_size,
-- queue.max_pending_jobs, which a superuser sets).
CREATE FUNCTION queue.check_limits(max_payload_size integer, max_pending_jobs bigint)
RETURNS void LANGUAGE plpgsql STABLE AS $$
DECLARE
    server_payload integer := current_setting('queue.max_payload_size')::integer;
    server_pending bigint := current_setting('queue.max_pending_jobs')::bigint;
BEGIN
    IF max_payload_size <= 0 OR max_payload_size > server_payload THEN
        RAISE EXCEPTION 'max_payload_size must be between 1 and the server''s queue.max_payload_size (%), not %',
                        server_payload, max_payload_size
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF max_pending_jobs <= 0 OR max_pending_jobs > server_pending THEN
        RAISE EXCEPTION 'max_pending_jobs must be between 1 and the server''s queue.max_pending_jobs (%), not %',
                        server_pending, max_pending_jobs
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- find_queue: the queue's row (locked when for_update), 22004 for NULL, 42704 when none.
CREATE FUNCTION queue.find_queue(queue_name text, for_update boolean DEFAULT false)
RETURNS queue.queues LANGUAGE plpgsql AS $$
DECLARE
    q queue.queues;
BEGIN
    IF queue_name IS NULL THEN
        RAISE EXCEPTION 'queue must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF for_update THEN
        SELECT * INTO q FROM queue.queues WHERE name = queue_name FOR UPDATE;
    ELSE
        SELECT * INTO q FROM queue.queues WHERE name = queue_name;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue "%" does not exist', queue_name USING ERRCODE = 'undefined_object',
            HINT = 'Create it with queue.create_queue().';
    END IF;
    RETURN q;
END
$$;

CREATE FUNCTION queue.create_queue(
    name          text,
    handler       regprocedure DEFAULT NULL,
    notify        boolean  DEFAULT false,
    concurrency   integer  DEFAULT 10,
    max_attempts  integer  DEFAULT 5,
    timeout       interval DEFAULT '5 minutes',
    backoff_base  interval DEFAULT '1 second',
    backoff_max   interval DEFAULT '1 hour',
    retention     interval DEFAULT '7 days',
    paused        boolean  DEFAULT false,
    retention_succeeded interval DEFAULT NULL,
    retention_failed    interval DEFAULT NULL,
    retention_cancelled interval DEFAULT NULL,
    search_path   text     DEFAULT '"$user", public',
    max_payload_size integer DEFAULT NULL,
    max_pending_jobs bigint  DEFAULT NULL,
    throttle_base interval DEFAULT '1 second',
    throttle_max  interval DEFAULT '5 minutes',
    max_snoozes   integer  DEFAULT 100,
    rate_limit    text     DEFAULT NULL,
    fair_share    boolean  DEFAULT false,
    key_concurrency integer DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    handler_sig text;
    owner oid := queue.caller();
    rate record := queue.parse_rate_limit(create_queue.rate_limit);
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid queue name: %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, "_", ".", ":" or "-", not starting with a punctuation mark other than "_".';
    END IF;
    IF notify IS NULL OR (handler IS NULL AND NOT notify) THEN
        RAISE EXCEPTION 'queue "%" needs a handler, or notify => true for external consumers', name
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF handler IS NOT NULL AND notify THEN
        RAISE EXCEPTION 'queue "%" cannot have both a handler and notify => true', name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF handler IS NOT NULL THEN
        handler_sig := queue.check_handler(handler, owner);
    END IF;
    PERFORM queue.check_settings(concurrency, max_attempts, timeout, backoff_base, backoff_max, retention);
    PERFORM queue.check_state_retentions(retention_succeeded, retention_failed, retention_cancelled);
    PERFORM queue.check_search_path(create_queue.search_path);
    PERFORM queue.check_limits(create_queue.max_payload_size, create_queue.max_pending_jobs);
    PERFORM queue.check_flow_settings(create_queue.throttle_base, create_queue.throttle_max,
                                      create_queue.max_snoozes);
    PERFORM queue.check_fair_settings(coalesce(create_queue.fair_share, false), create_queue.key_concurrency);
    INSERT INTO queue.queues AS q (name, handler, notify, owner, concurrency, max_attempts, timeout,
                                   backoff_base, backoff_max, retention, paused,
                                   retention_succeeded, retention_failed, retention_cancelled,
                                   search_path, max_payload_size, max_pending_jobs,
                                   throttle_base, throttle_max, max_snoozes, rate_limit, rate_window,
                                   fair_share, key_concurrency)
    VALUES (create_queue.name, handler_sig, create_queue.notify, owner, create_queue.concurrency,
            create_queue.max_attempts, create_queue.timeout, create_queue.backoff_base,
            create_queue.backoff_max, create_queue.retention, coalesce(create_queue.paused, false),
            create_queue.retention_succeeded, create_queue.retention_failed,
            create_queue.retention_cancelled, create_queue.search_path,
            create_queue.max_payload_size, create_queue.max_pending_jobs,
            create_queue.throttle_base, create_queue.throttle_max, create_queue.max_snoozes,
            rate.n, rate.win, coalesce(create_queue.fair_share, false), create_queue.key_concurrency)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue "%" already exists', name USING ERRCODE = 'duplicate_object';
    END IF;
END
$$;
COMMENT ON FUNCTION queue.create_queue(text, regprocedure, boolean, integer, integer, interval, interval, interval, interval, boolean, interval, interval, interval, text, integer, bigint, interval, interval, integer, text, boolean, integer) IS
    'Creates a queue run by a SQL handler (a procedure or function taking payload jsonb), or a NOTIFY queue for external consumers. The caller owns it; the handler runs as the owner, with search_path pinned. retention: how long finished jobs stay in history (retention_succeeded/failed/cancelled override it per state). max_payload_size, max_pending_jobs: lower limits than the server''s. throttle_base, throttle_max: the cool-down curve after throttles; max_snoozes: snoozes allowed per job. rate_limit: ''N/interval'', at most N jobs start per interval. fair_share: claims rotate across the jobs'' fair_keys; key_concurrency: running jobs per key.';

-- alter_queue: NULL leaves a setting unchanged.
CREATE FUNCTION queue.alter_queue(
    name          text,
    handler       regprocedure DEFAULT NULL,
    concurrency   integer  DEFAULT NULL,
    max_attempts  integer  DEFAULT NULL,
    timeout       interval DEFAULT NULL,
    backoff_base  interval DEFAULT NULL,
    backoff_max   interval DEFAULT NULL,
    retention     interval DEFAULT NULL,
    retention_succeeded interval DEFAULT NULL,
    retention_failed    interval DEFAULT NULL,
    retention_cancelled interval DEFAULT NULL,
    search_path   text     DEFAULT NULL,
    max_payload_size integer DEFAULT NULL,
    max_pending_jobs bigint  DEFAULT NULL,
    throttle_base interval DEFAULT NULL,
    throttle_max  interval DEFAULT NULL,
    max_snoozes   integer  DEFAULT NULL,
    rate_limit    text     DEFAULT NULL,
    fair_share    boolean  DEFAULT NULL,
    key_concurrency integer DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- What the handler runs and how is the owner's to change; the rest managers may.
    q queue.queues := queue.authorize(name, CASE WHEN handler IS NULL AND alter_queue.search_path IS NULL
                                                 THEN 'manage' ELSE 'own' END, true);
BEGIN
    IF handler IS NOT NULL THEN
        IF q.notify THEN
            RAISE EXCEPTION 'queue "%" is a NOTIFY queue and has no handler', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        q.handler := queue.check_handler(handler, q.owner);
    END IF;
    IF alter_queue.search_path IS NOT NULL THEN
        PERFORM queue.check_search_path(alter_queue.search_path);
        q.search_path := alter_queue.search_path;
    END IF;
    q.max_payload_size := coalesce(alter_queue.max_payload_size, q.max_payload_size);
    q.max_pending_jobs := coalesce(alter_queue.max_pending_jobs, q.max_pending_jobs);
    PERFORM queue.check_limits(alter_queue.max_payload_size, alter_queue.max_pending_jobs);
    q.concurrency  := coalesce(alter_queue.concurrency, q.concurrency);
    q.max_attempts := coalesce(alter_queue.max_attempts, q.max_attempts);
    q.timeout      := coalesce(alter_queue.timeout, q.timeout);
    q.backoff_base := coalesce(alter_queue.backoff_base, q.backoff_base);
    q.backoff_max  := coalesce(alter_queue.backoff_max, q.backoff_max);
    q.retention    := coalesce(alter_queue.retention, q.retention);
    q.retention_succeeded := coalesce(alter_queue.retention_succeeded, q.retention_succeeded);
    q.retention_failed    := coalesce(alter_queue.retention_failed, q.retention_failed);
    q.retention_cancelled := coalesce(alter_queue.retention_cancelled, q.retention_cancelled);
    PERFORM queue.check_state_retentions(q.retention_succeeded, q.retention_failed, q.retention_cancelled);
    PERFORM queue.check_settings(q.concurrency, q.max_attempts, q.timeout,
                                 q.backoff_base, q.backoff_max, q.retention);
    q.throttle_base := coalesce(alter_queue.throttle_base, q.throttle_base);
    q.throttle_max  := coalesce(alter_queue.throttle_max, q.throttle_max);
    q.max_snoozes   := coalesce(alter_queue.max_snoozes, q.max_snoozes);
    PERFORM queue.check_flow_settings(q.throttle_base, q.throttle_max, q.max_snoozes);
    IF alter_queue.rate_limit IS NOT NULL THEN                  -- 'none' removes the limit
        SELECT r.n, r.win INTO q.rate_limit, q.rate_window FROM queue.parse_rate_limit(alter_queue.rate_limit) r;
    END IF;
    IF alter_queue.fair_share IS NOT NULL THEN
        IF alter_queue.fair_share AND NOT q.fair_share THEN
            -- Fair claims see only jobs with a key: the live ones get the '' share.
            UPDATE queue.jobs j SET fair_key = '' WHERE j.queue = q.name AND j.fair_key IS NULL;
        END IF;
        q.fair_share := alter_queue.fair_share;
        q.key_concurrency := CASE WHEN q.fair_share THEN q.key_concurrency END;
    END IF;
    IF alter_queue.key_concurrency IS NOT NULL THEN             -- 0 removes the cap
        q.key_concurrency := nullif(alter_queue.key_concurrency, 0);
    END IF;
    PERFORM queue.check_fair_settings(q.fair_share, q.key_concurrency);
    UPDATE queue.queues SET handler = q.handler, concurrency = q.concurrency,
           max_attempts = q.max_attempts, timeout = q.timeout, backoff_base = q.backoff_base,
           backoff_max = q.backoff_max, retention = q.retention,
           retention_succeeded = q.retention_succeeded, retention_failed = q.retention_failed,
           retention_cancelled = q.retention_cancelled, search_path = q.search_path,
           max_payload_size = q.max_payload_size, max_pending_jobs = q.max_pending_jobs,
           throttle_base = q.throttle_base, throttle_max = q.throttle_max, max_snoozes = q.max_snoozes,
           rate_limit = q.rate_limit, rate_window = q.rate_window,
           fair_share = q.fair_share, key_concurrency = q.key_concurrency
     WHERE queues.name = q.name;
END
$$;
COMMENT ON FUNCTION queue.alter_queue(text, regprocedure, integer, integer, interval, interval, interval, interval, interval, interval, interval, text, integer, bigint, interval, interval, integer, text, boolean, integer) IS
    'Changes a queue''s settings; NULL arguments leave a setting unchanged. Jobs already enqueued keep their own max_attempts. handler and search_path: owner only; the rest: owner or manage.';

-- drop_queue: refuses while the queue has live jobs, unless force, which cancels them
-- into history first (so nothing disappears without a trace).
-- - Transactions that insert jobs hold the queue shared (src/locks.rs): the drop waits
--   for those in progress, so their jobs are seen and cancelled, and later ones wait for the
--   drop and then find the queue gone. Only at READ COMMITTED does each statement see what
--   committed before it, so the drop refuses other isolation levels.
-- - A forced drop removes schedules before it waits: the scheduler holds a schedule's row
--   while it enqueues that schedule's job.
-- - The jobs' rows are locked in id order before the queue's row, as an executor recording
--   a batch takes them (its record locks its jobs by primary key, then a throttled queue's
--   row): a drop that took them in scan order deadlocked with the executors of a busy
--   queue. A batch with both retries and finished jobs locks each kind in id order in turn,
--   so a deadlock is still possible: the drop that loses it lets the executor go on, and
--   tries again.
CREATE FUNCTION queue.drop_queue(name text, force boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues := queue.authorize(name, 'own');
    live bigint;
    deadlocks integer := 0;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'drop_queue needs a READ COMMITTED transaction'
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = format('Under %s isolation, jobs enqueued since the transaction began would not be seen.',
                                  current_setting('transaction_isolation'));
    END IF;
    IF NOT coalesce(force, false) THEN
        PERFORM queue.lock_queue(q.name, 'drop');
        SELECT count(*) INTO live FROM queue.jobs WHERE jobs.queue = q.name;
        IF live > 0 THEN
            RAISE EXCEPTION 'queue "%" has % live jobs', name, live
                USING ERRCODE = 'object_in_use',
                      HINT = 'Wait for them to finish, or use drop_queue(name, force => true) to cancel them.';
        END IF;
        IF EXISTS (SELECT 1 FROM queue.schedule_defs s WHERE s.queue = q.name) THEN
            RAISE EXCEPTION 'queue "%" has schedules', name
                USING ERRCODE = 'object_in_use',
                      HINT = 'Unschedule them first, or use drop_queue(name, force => true) to remove them too.';
        END IF;
    ELSE
        DELETE FROM queue.schedule_runs r USING queue.schedule_defs s
         WHERE r.schedule = s.name AND s.queue = q.name;
        DELETE FROM queue.schedule_defs s WHERE s.queue = q.name;
        PERFORM queue.lock_queue(q.name, 'drop');
        LOOP
            BEGIN
                PERFORM 1 FROM queue.jobs WHERE jobs.queue = q.name ORDER BY jobs.id FOR UPDATE;
                WITH d AS (DELETE FROM queue.jobs WHERE jobs.queue = q.name RETURNING *)
                INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts,
                                           max_attempts, timeout, created_at, started_at, finished_at, worker_pid,
                                           consumer, progress, snoozes, fair_key, errors)
                SELECT id, queue, 'cancelled', payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts, max_attempts,
                       timeout, created_at, started_at, clock_timestamp(), worker_pid, consumer, progress, snoozes, fair_key,
                       errors || jsonb_build_object('attempt', attempts, 'at', clock_timestamp(),
                                                    'message', 'queue dropped')
                  FROM d;
                EXIT;
            EXCEPTION WHEN deadlock_detected THEN
                deadlocks := deadlocks + 1;
                IF deadlocks >= 10 THEN
                    RAISE;
                END IF;
            END;
        END LOOP;
    END IF;
    PERFORM 1 FROM queue.queues WHERE queues.name = q.name FOR UPDATE;
    DELETE FROM queue.queue_grants g WHERE g.queue = q.name;
    DELETE FROM queue.queues WHERE queues.name = q.name;
END
$$;
COMMENT ON FUNCTION queue.drop_queue(text, boolean) IS
    'Drops a queue. Refuses while it has live jobs or schedules unless force => true, which cancels the jobs (kept in history) and removes the schedules.';

CREATE FUNCTION queue.pause(queue text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM queue.authorize(queue, 'manage', true);
    UPDATE queue.queues SET paused = true WHERE name = pause.queue;
END
$$;
COMMENT ON FUNCTION queue.pause(text) IS
    'Stops claiming jobs from a queue; running jobs finish. Enqueueing still works.';

CREATE FUNCTION queue.resume(queue text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues := queue.authorize(queue, 'manage', true);
BEGIN
    UPDATE queue.queues SET paused = false WHERE name = q.name RETURNING * INTO q;
    -- Enqueues while paused woke nobody: executors, or the consumers, look now.
    PERFORM queue.announce(q, 2147483647, NULL);
END
$$;
COMMENT ON FUNCTION queue.resume(text) IS 'Starts claiming jobs from a paused queue again.';

-- Queue administration: create_queue, alter_queue, drop_queue, pause, resume.
-- Errors carry SQLSTATEs: 22023 invalid_parameter_value, 22004 null_value_not_allowed,
-- 42704 undefined_object (unknown queue), 42710 duplicate_object, 42501 insufficient_privilege,
-- 55006 object_in_use (drop with live jobs).

-- check_handler: validates a SQL handler and returns its schema-qualified signature text.
-- A handler is a procedure, or a function, taking exactly one argument of type jsonb.
CREATE FUNCTION queue.check_handler(handler regprocedure) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
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
    IF NOT has_function_privilege(handler, 'EXECUTE') THEN
        RAISE EXCEPTION 'permission denied for handler %', handler
            USING ERRCODE = 'insufficient_privilege';
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

-- lock_queue: the queue row, locked, after checking the caller may administer it.
CREATE FUNCTION queue.lock_queue(queue_name text) RETURNS queue.queues
LANGUAGE plpgsql AS $$
DECLARE
    q queue.queues := queue.find_queue(queue_name, true);
BEGIN
    IF NOT pg_has_role(current_user, q.owner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of queue "%"', queue_name USING ERRCODE = 'insufficient_privilege';
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
    retention_cancelled interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    handler_sig text;
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
        handler_sig := queue.check_handler(handler);
    END IF;
    PERFORM queue.check_settings(concurrency, max_attempts, timeout, backoff_base, backoff_max, retention);
    PERFORM queue.check_state_retentions(retention_succeeded, retention_failed, retention_cancelled);
    INSERT INTO queue.queues AS q (name, handler, notify, concurrency, max_attempts, timeout,
                                   backoff_base, backoff_max, retention, paused,
                                   retention_succeeded, retention_failed, retention_cancelled)
    VALUES (create_queue.name, handler_sig, create_queue.notify, create_queue.concurrency,
            create_queue.max_attempts, create_queue.timeout, create_queue.backoff_base,
            create_queue.backoff_max, create_queue.retention, coalesce(create_queue.paused, false),
            create_queue.retention_succeeded, create_queue.retention_failed,
            create_queue.retention_cancelled)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue "%" already exists', name USING ERRCODE = 'duplicate_object';
    END IF;
END
$$;
COMMENT ON FUNCTION queue.create_queue(text, regprocedure, boolean, integer, integer, interval, interval, interval, interval, boolean, interval, interval, interval) IS
    'Creates a queue run by a SQL handler (a procedure or function taking payload jsonb), or a NOTIFY queue for external consumers. The caller owns it; the handler runs with the owner''s privileges. retention: how long finished jobs stay in history (retention_succeeded/failed/cancelled override it per state).';

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
    retention_cancelled interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    q queue.queues := queue.lock_queue(name);
BEGIN
    IF handler IS NOT NULL THEN
        IF q.notify THEN
            RAISE EXCEPTION 'queue "%" is a NOTIFY queue and has no handler', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        q.handler := queue.check_handler(handler);
    END IF;
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
    UPDATE queue.queues SET handler = q.handler, concurrency = q.concurrency,
           max_attempts = q.max_attempts, timeout = q.timeout, backoff_base = q.backoff_base,
           backoff_max = q.backoff_max, retention = q.retention,
           retention_succeeded = q.retention_succeeded, retention_failed = q.retention_failed,
           retention_cancelled = q.retention_cancelled
     WHERE queues.name = q.name;
END
$$;
COMMENT ON FUNCTION queue.alter_queue(text, regprocedure, integer, integer, interval, interval, interval, interval, interval, interval, interval) IS
    'Changes a queue''s settings; NULL arguments leave a setting unchanged. Jobs already enqueued keep their own max_attempts.';

-- drop_queue: refuses while the queue has live jobs, unless force, which cancels them
-- into history first (so nothing disappears without a trace).
CREATE FUNCTION queue.drop_queue(name text, force boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    q queue.queues := queue.lock_queue(name);
    live bigint;
BEGIN
    SELECT count(*) INTO live FROM queue.jobs WHERE jobs.queue = q.name;
    IF live > 0 AND NOT coalesce(force, false) THEN
        RAISE EXCEPTION 'queue "%" has % live jobs', name, live
            USING ERRCODE = 'object_in_use',
                  HINT = 'Wait for them to finish, or use drop_queue(name, force => true) to cancel them.';
    END IF;
    IF EXISTS (SELECT 1 FROM queue.schedule_defs s WHERE s.queue = q.name) THEN
        IF NOT coalesce(force, false) THEN
            RAISE EXCEPTION 'queue "%" has schedules', name
                USING ERRCODE = 'object_in_use',
                      HINT = 'Unschedule them first, or use drop_queue(name, force => true) to remove them too.';
        END IF;
        DELETE FROM queue.schedule_runs r USING queue.schedule_defs s
         WHERE r.schedule = s.name AND s.queue = q.name;
        DELETE FROM queue.schedule_defs s WHERE s.queue = q.name;
    END IF;
    WITH d AS (DELETE FROM queue.jobs WHERE jobs.queue = q.name RETURNING *)
    INSERT INTO queue.history (id, queue, state, payload, priority, run_at, attempts, max_attempts,
                               timeout, created_at, started_at, finished_at, worker_pid, consumer, errors)
    SELECT id, queue, 'cancelled', payload, priority, run_at, attempts, max_attempts, timeout,
           created_at, started_at, clock_timestamp(), worker_pid, consumer,
           errors || jsonb_build_object('attempt', attempts, 'at', clock_timestamp(),
                                        'message', 'queue dropped')
      FROM d;
    DELETE FROM queue.queues WHERE queues.name = q.name;
END
$$;
COMMENT ON FUNCTION queue.drop_queue(text, boolean) IS
    'Drops a queue. Refuses while it has live jobs or schedules unless force => true, which cancels the jobs (kept in history) and removes the schedules.';

CREATE FUNCTION queue.pause(queue text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queue.lock_queue(queue);
    UPDATE queue.queues SET paused = true WHERE name = pause.queue;
END
$$;
COMMENT ON FUNCTION queue.pause(text) IS
    'Stops claiming jobs from a queue; running jobs finish. Enqueueing still works.';

CREATE FUNCTION queue.resume(queue text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM queue.lock_queue(queue);
    UPDATE queue.queues SET paused = false WHERE name = resume.queue;
    PERFORM queue.wake_executors(2147483647);
END
$$;
COMMENT ON FUNCTION queue.resume(text) IS 'Starts claiming jobs from a paused queue again.';

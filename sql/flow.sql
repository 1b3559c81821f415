-- Flow control (README "Flow control"): snooze and throttle, for handlers (which end their
-- attempt by calling them) and for external consumers (which call them with their lease
-- token). Neither counts an attempt. A throttle also cools the whole queue down:
-- no job of it starts until min(throttle_base * 2^n, throttle_max) has passed (at least
-- retry_after), n counting consecutive throttles, reset by the queue's next success.
-- Requires consumers.sql (consumed_job, announce) and src/flow.rs (signal_job).

-- check_flow_settings: the checks create_queue and alter_queue share.
CREATE FUNCTION queue.check_flow_settings(throttle_base interval, throttle_max interval, max_snoozes integer)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF throttle_base IS NULL OR throttle_base <= interval '0' OR throttle_base > interval '1 day' THEN
        RAISE EXCEPTION 'throttle_base must be positive and at most 1 day, not %', coalesce(throttle_base::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF throttle_max IS NULL OR throttle_max < throttle_base OR throttle_max > interval '7 days' THEN
        RAISE EXCEPTION 'throttle_max must be between throttle_base (%) and 7 days, not %', throttle_base,
                        coalesce(throttle_max::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF max_snoozes IS NULL OR max_snoozes < 0 OR max_snoozes > 100000 THEN
        RAISE EXCEPTION 'max_snoozes must be between 0 and 100000, not %', coalesce(max_snoozes::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- parse_rate_limit: 'N/interval' (N starts per window; a bare unit means 1 of it, as in
-- '100/minute') into its parts; NULL or 'none' gives NULLs (no limit).
CREATE FUNCTION queue.parse_rate_limit(spec text, OUT n integer, OUT win interval)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m text[] := regexp_match(spec, '^\s*(\d{1,9})\s*/\s*(\S.*?)\s*$');
BEGIN
    IF spec IS NULL OR lower(btrim(spec)) = 'none' THEN
        RETURN;
    ELSIF m IS NULL THEN
        RAISE EXCEPTION 'rate_limit must be ''N/interval'' (at most N jobs start per interval), not %', quote_literal(spec)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example ''100/1 minute'' or ''50/second''; ''none'' removes the limit.';
    END IF;
    n := m[1]::integer;
    BEGIN
        win := CASE WHEN m[2] ~ '^[A-Za-z]+$' THEN ('1 ' || m[2])::interval ELSE m[2]::interval END;
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow THEN
        RAISE EXCEPTION 'rate_limit window % is not an interval', quote_literal(m[2])
            USING ERRCODE = 'invalid_parameter_value';
    END;
    IF n < 1 OR n > 1000000 THEN
        RAISE EXCEPTION 'rate_limit must allow 1 to 1000000 starts per window, not %', n
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF win < interval '10 milliseconds' OR win > interval '1 day' THEN
        RAISE EXCEPTION 'rate_limit window must be between 10 milliseconds and 1 day, not %', win
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- rate_wait: for consumers of a rate-limited queue that got fewer jobs than they asked:
-- how long until the next start is allowed, so they sleep exactly that long.
CREATE FUNCTION queue.rate_wait(queue text) RETURNS interval
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues := queue.find_queue(rate_wait.queue);
BEGIN
    q := queue.authorize(q.name, CASE WHEN q.notify THEN 'consume' ELSE 'read' END);
    IF q.rate_limit IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN queue.rate_wait_us(q.name, q.rate_limit, q.rate_window) * interval '1 microsecond';
END
$$;
COMMENT ON FUNCTION queue.rate_wait(text) IS
    'How long until the queue''s rate limit lets the next job start: 0 when now, NULL without a limit. Consumers whose claim got fewer jobs than asked sleep this long. Needs consume (NOTIFY queues) or read.';

-- check_delay: a snooze's delay or a throttle's retry_after (NULL allowed only for the latter).
CREATE FUNCTION queue.check_delay(what text, delay interval, nullable boolean) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF delay IS NULL AND NOT nullable THEN
        RAISE EXCEPTION '% must not be NULL', what USING ERRCODE = 'null_value_not_allowed';
    ELSIF delay < interval '0' OR delay > interval '7 days' THEN
        RAISE EXCEPTION '% must be between 0 and 7 days, not %', what, delay
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- cooldown: how long a throttle now cools queue q down (q as it was before this throttle).
CREATE FUNCTION queue.cooldown(q queue.queues, retry_after interval) RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN greatest(coalesce(retry_after, interval '0'),
                    least(q.throttle_base * power(2, least(q.throttle_count, 30)), q.throttle_max));
END
$$;

-- record_flow: after `throttles` throttles (the longest retry_after given) and `successes`
-- successes of queue_name's jobs in one transaction: a throttle starts or extends the
-- cool-down and counts; a success alone resets the count.
CREATE FUNCTION queue.record_flow(queue_name text, throttles bigint, retry_after interval, successes bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF throttles > 0 THEN
        UPDATE queue.queues q
           SET throttle_count = q.throttle_count + throttles,
               throttled_until = greatest(q.throttled_until, clock_timestamp() + queue.cooldown(q, retry_after))
         WHERE q.name = queue_name;
    ELSIF successes > 0 THEN
        UPDATE queue.queues q SET throttle_count = 0 WHERE q.name = queue_name AND q.throttle_count > 0;
    END IF;
END
$$;

-- Inside a handler. signal_job (Rust) records the request for the executor (55000 outside a
-- handler it runs; 54000 past max_snoozes), then the ERROR ends the attempt: its writes roll
-- back. A handler that catches the ERROR and goes on is not snoozed.
CREATE FUNCTION queue.snooze(delay interval) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM queue.check_delay('delay', delay, false);
    PERFORM queue.signal_job('snooze', (extract(epoch FROM delay) * 1000)::bigint);
    RAISE EXCEPTION 'job snoozed for %', delay USING ERRCODE = 'PQ001';
END
$$;
COMMENT ON FUNCTION queue.snooze(interval) IS
    'Inside a handler: ends this attempt without counting it (its writes roll back) and runs the job again after delay (0 to 7 days). At most the queue''s max_snoozes times per job; the next one fails the attempt (54000).';

CREATE FUNCTION queue.throttle(retry_after interval DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM queue.check_delay('retry_after', retry_after, true);
    PERFORM queue.signal_job('throttle', (extract(epoch FROM retry_after) * 1000)::bigint);
    RAISE EXCEPTION 'job throttled%', coalesce(' (retry after ' || retry_after || ')', '') USING ERRCODE = 'PQ002';
END
$$;
COMMENT ON FUNCTION queue.throttle(interval) IS
    'Inside a handler: the service it calls pushed back. Ends this attempt without counting it (its writes roll back), puts the job back, and cools the whole queue down: no job of it starts for min(throttle_base * 2^n, throttle_max), at least retry_after, n = consecutive throttles (reset by a success).';

-- requeue: a consumer's job back to queued after a snooze or throttle, attempt not counted.
CREATE FUNCTION queue.requeue(job queue.jobs, run_at timestamptz, snoozed boolean) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE queue.jobs x
       SET state = 'queued', started_at = NULL, worker_pid = NULL, consumer = NULL,
           lease = NULL, lease_expires_at = NULL, lease_token = NULL, progress = NULL,
           attempts = x.attempts - 1, snoozes = x.snoozes + snoozed::int, run_at = requeue.run_at
     WHERE x.id = job.id;
    IF requeue.run_at <= clock_timestamp() THEN
        PERFORM queue.announce(q, 1, job.id) FROM queue.queues q WHERE q.name = job.queue;
    END IF;
END
$$;

-- held_job: the job `id` while `lease_token` holds it (locked; NULL otherwise), after the
-- consume privilege check of consumed_job.
CREATE FUNCTION queue.held_job(id uuid, lease_token uuid) RETURNS queue.jobs
LANGUAGE plpgsql AS $$
DECLARE
    j queue.jobs;
BEGIN
    IF queue.consumed_job(id, lease_token, true) IS NOT NULL THEN
        SELECT * INTO j FROM queue.jobs x WHERE x.id = held_job.id;
    END IF;
    RETURN j;
END
$$;

-- For external consumers: the same, fenced by the lease token like complete and fail.
CREATE FUNCTION queue.snooze(id uuid, lease_token uuid, delay interval) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    j queue.jobs;
    q queue.queues;
BEGIN
    PERFORM queue.check_delay('delay', delay, false);
    j := queue.held_job(id, lease_token);
    IF j.id IS NULL THEN
        RETURN false;
    END IF;
    SELECT * INTO q FROM queue.queues x WHERE x.name = j.queue;
    IF j.snoozes >= q.max_snoozes THEN
        RAISE EXCEPTION 'job % was snoozed % times, the most queue "%" allows', id, j.snoozes, q.name
            USING ERRCODE = 'program_limit_exceeded',
                  HINT = 'Fail the attempt instead, or raise the queue''s max_snoozes.';
    END IF;
    PERFORM queue.requeue(j, clock_timestamp() + delay, true);
    RETURN true;
END
$$;
COMMENT ON FUNCTION queue.snooze(uuid, uuid, interval) IS
    'NOTIFY queues: gives a claimed job back to run again after delay, without counting the attempt; at most the queue''s max_snoozes times per job (54000 after). false (nothing changed) when the lease was lost.';

CREATE FUNCTION queue.throttle(id uuid, lease_token uuid, retry_after interval DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    j queue.jobs;
    q queue.queues;
BEGIN
    PERFORM queue.check_delay('retry_after', retry_after, true);
    j := queue.held_job(id, lease_token);
    IF j.id IS NULL THEN
        RETURN false;
    END IF;
    SELECT * INTO q FROM queue.queues x WHERE x.name = j.queue FOR UPDATE;
    PERFORM queue.requeue(j, clock_timestamp() + queue.cooldown(q, retry_after), false);
    PERFORM queue.record_flow(q.name, 1, retry_after, 0);
    RETURN true;
END
$$;
COMMENT ON FUNCTION queue.throttle(uuid, uuid, interval) IS
    'NOTIFY queues: the service behind a claimed job pushed back. Gives the job back without counting the attempt and cools the queue down as a handler''s queue.throttle() does. false (nothing changed) when the lease was lost.';

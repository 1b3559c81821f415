-- External consumers of NOTIFY queues: claim, heartbeat, complete, fail, and the
-- queue.workers view. Requires jobs.sql (channel, announce, backoff) and queue.executors()
-- (src/api/mod.rs).
--
-- Protocol (README, "External consumers"): LISTEN on queue.channel(queue); claim jobs;
-- heartbeat while working; complete or fail. Every call after claim is fenced by the job's
-- lease token and by the lease's expiry: once the lease expired, the token is dead (false,
-- nothing changed) and the reaper returns the job to queued (or failed) for another.

-- consumers: external consumers seen recently, for queue.workers. One row per consumer
-- name, touched by claim and heartbeat; the launcher forgets names unseen for a day.
CREATE TABLE queue.consumers (
    name        text        PRIMARY KEY,
    role        regrole     NOT NULL,            -- the role of its last call
    pid         integer     NOT NULL,            -- backend pid of its last call
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- check_lease: the checks claim and heartbeat share.
CREATE FUNCTION queue.check_lease(lease interval) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF lease < interval '1 second' OR lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be between 1 second and 1 day, not %', lease
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

-- check_fence: id and lease token are required by heartbeat, complete and fail.
CREATE FUNCTION queue.check_fence(id uuid, lease_token uuid) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF id IS NULL OR lease_token IS NULL THEN
        RAISE EXCEPTION 'id and lease_token must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Pass the id and lease_token that queue.claim() returned.';
    END IF;
END
$$;

-- seen: records that `consumer` called now, as the API's caller.
CREATE FUNCTION queue.seen(consumer text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO queue.consumers AS c (name, role, pid) VALUES (consumer, queue.caller(), pg_catalog.pg_backend_pid())
    ON CONFLICT (name) DO UPDATE SET role = excluded.role, pid = excluded.pid, last_seen = pg_catalog.now()
$$;

-- consumed_job: the queue of job `id` while `lease_token` holds it, after checking that the
-- caller may consume from that queue (42501: its lease token is no use without the
-- privilege; revoked, the job's lease runs out and the reaper takes it back). NULL when
-- the token does not hold the job (then nothing is revealed about it).
CREATE FUNCTION queue.consumed_job(id uuid, lease_token uuid, lock boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    job_queue text;
BEGIN
    PERFORM queue.check_fence(id, lease_token);
    IF lock THEN
        SELECT j.queue INTO job_queue FROM queue.jobs j
         WHERE j.id = consumed_job.id AND j.state = 'running' AND j.lease_token = consumed_job.lease_token
           AND j.lease_expires_at >= clock_timestamp()
           FOR UPDATE;
    ELSE
        SELECT j.queue INTO job_queue FROM queue.jobs j
         WHERE j.id = consumed_job.id AND j.state = 'running' AND j.lease_token = consumed_job.lease_token
           AND j.lease_expires_at >= clock_timestamp();
    END IF;
    IF FOUND THEN
        PERFORM queue.authorize(job_queue, 'consume');
    END IF;
    RETURN job_queue;
END
$$;

-- claimable: a queue the caller may claim from (42704, 42501), which must be a NOTIFY queue.
CREATE FUNCTION queue.claimable(queue_name text) RETURNS queue.queues
LANGUAGE plpgsql AS $$
DECLARE
    q queue.queues := queue.authorize(queue_name, 'consume');
BEGIN
    IF NOT q.notify THEN
        RAISE EXCEPTION 'queue "%" runs its jobs in the database (handler %)', q.name, q.handler
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Only the jobs of a NOTIFY queue (create_queue(..., notify => true)) are claimed by external consumers.';
    END IF;
    RETURN q;
END
$$;

-- check_claim: claim's other arguments.
CREATE FUNCTION queue.check_claim(consumer text, n integer, lease interval) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF consumer IS NULL OR consumer !~ '^\S.{0,127}$' THEN
        RAISE EXCEPTION 'consumer must be a name of 1 to 128 characters, not %', coalesce(quote_literal(consumer), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Name each consumer process uniquely, e.g. host name and pid.';
    ELSIF n IS NULL OR n < 1 OR n > 1000 THEN
        RAISE EXCEPTION 'n must be between 1 and 1000, not %', coalesce(n::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF lease IS NULL THEN
        RAISE EXCEPTION 'lease must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM queue.check_lease(lease);
END
$$;

CREATE FUNCTION queue.claim(
    queue    text,
    consumer text,
    n        integer  DEFAULT 1,
    lease    interval DEFAULT '30 seconds')
RETURNS TABLE (id uuid, payload jsonb, attempt integer, lease_token uuid, lease_expires_at timestamptz,
               depends_on uuid[])
-- enable_seqscan off: the claimed rows are fetched by primary key, and after a burst (or
-- under a long transaction elsewhere) the planner would rather scan every page of
-- queue.jobs (docs/design.md "Under a held snapshot"; src/worker/mod.rs plan_by_index).
-- enable_bitmapscan off: nor a bitmap scan and a sort of the queue's claim order, which
-- cannot stop at the LIMIT (chosen by some statistics while a long transaction runs).
-- jit off: a scan that is the only way (a rate limit's first count) then costs over
-- jit_above_cost, and compiling took 0.4 s.
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET enable_bitmapscan = off
    SET jit = off AS $$
DECLARE
    q queue.queues := queue.claimable(claim.queue);
    t0 timestamptz;
    budget integer := n;
    claimed integer;
    got record;
    keys text[] := '{}';
BEGIN
    PERFORM queue.check_claim(consumer, n, lease);
    PERFORM queue.seen(consumer);
    IF q.paused OR q.throttled_until > clock_timestamp() THEN   -- cooling down: README "Flow control"
        RETURN;
    END IF;
    -- Claims of a queue are serialised (as the executors' are) so that the running count
    -- the concurrency limit is checked against is exact.
    PERFORM queue.lock_queue(q.name, 'claim');
    -- A rate limit's starts are reserved after started_at (t0) and settled below.
    t0 := clock_timestamp();
    IF q.rate_limit IS NOT NULL THEN
        budget := queue.rate_take(q.name, q.rate_limit, q.rate_window, n);
    END IF;
    -- The same claim as claim(queues[]) below, for one queue, kept separate because it is
    -- every consumer's hot path: delegating to the general one doubled a claim's cost.
    IF q.fair_share THEN                -- rotate across keys (sql/fair.sql)
        FOR got IN
        UPDATE queue.jobs j
           SET state = 'running', attempts = j.attempts + 1, started_at = t0,
               worker_pid = pg_backend_pid(), consumer = claim.consumer, lease = claim.lease,
               lease_expires_at = clock_timestamp() + claim.lease, lease_token = gen_random_uuid()
         WHERE j.id = ANY(ARRAY(SELECT queue.fair_pick(
                   q.name, least(budget, q.concurrency - (SELECT count(*) FROM queue.jobs r
                                                          WHERE r.queue = q.name AND r.state = 'running')),
                   q.key_concurrency, queue.fair_cursor(q.name), t0)))
        RETURNING j.id AS job_id, j.payload AS job_payload, j.attempts, j.lease_token AS token,
                  j.lease_expires_at AS expires, j.depends_on AS deps, j.fair_key
        LOOP
            id := got.job_id; payload := got.job_payload; attempt := got.attempts;
            lease_token := got.token; lease_expires_at := got.expires; depends_on := got.deps;
            keys := keys || got.fair_key;
            RETURN NEXT;
        END LOOP;
        PERFORM queue.fair_advance(q.name, keys);
        IF q.rate_limit IS NOT NULL THEN
            PERFORM queue.rate_settle(q.name, cardinality(keys));
        END IF;
        RETURN;
    END IF;
    RETURN QUERY
    WITH c AS (
        SELECT j.id FROM queue.jobs j
         WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= t0
         ORDER BY j.priority, j.run_at, j.id
         LIMIT greatest(0, least(budget, q.concurrency - (SELECT count(*) FROM queue.jobs r
                                                           WHERE r.queue = q.name AND r.state = 'running')))
         FOR UPDATE SKIP LOCKED
    )
    UPDATE queue.jobs j
       SET state = 'running', attempts = j.attempts + 1, started_at = t0,
           worker_pid = pg_backend_pid(), consumer = claim.consumer, lease = claim.lease,
           lease_expires_at = clock_timestamp() + claim.lease, lease_token = gen_random_uuid()
     WHERE j.id = ANY(ARRAY(SELECT c.id FROM c))     -- by primary key, whatever the LIMIT
    RETURNING j.id, j.payload, j.attempts, j.lease_token, j.lease_expires_at, j.depends_on;
    IF q.rate_limit IS NOT NULL THEN
        GET DIAGNOSTICS claimed = ROW_COUNT;
        PERFORM queue.rate_settle(q.name, claimed);
    END IF;
END
$$;
COMMENT ON FUNCTION queue.claim(text, text, integer, interval) IS
    'NOTIFY queues: takes up to n ready jobs for consumer (a unique name per process) and returns them with the lease token every later call needs, when the lease expires and the jobs they depended on (queue.dependency_results(id) gives their results). Nothing while paused or at the queue''s concurrency limit.';

-- claim(queues text[], ...): one consumer serving several NOTIFY queues. Each queue's
-- claims stay serialised (its lock, taken in name order so that two such consumers
-- cannot deadlock) and within its concurrency; across queues jobs come in (priority,
-- run_at, id) order, as within one. A fair_share queue offers what its rotation across
-- keys picks (locked until the claim commits, even those the order leaves out).
CREATE FUNCTION queue.claim(
    queues   text[],
    consumer text,
    n        integer  DEFAULT 1,
    lease    interval DEFAULT '30 seconds')
RETURNS TABLE (id uuid, queue text, payload jsonb, attempt integer, lease_token uuid,
               lease_expires_at timestamptz, depends_on uuid[])
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET enable_bitmapscan = off
    SET jit = off AS $$
DECLARE
    open_queues text[] := '{}';
    name text;
    q queue.queues;
    t0 timestamptz;
    -- rate-limited queues among them: what was reserved for each, and what was used
    rated text[] := '{}';
    grants integer[] := '{}';
    used integer[] := '{}';
    -- fair_share queues among them: the jobs fair_pick chose, and the keys claimed
    fair_ids uuid[] := '{}';
    claimed_queues text[] := '{}';
    claimed_keys text[] := '{}';
    got record;
    i integer;
BEGIN
    IF queues IS NULL OR array_position(queues, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'queues must not be NULL nor contain NULL' USING ERRCODE = 'null_value_not_allowed';
    ELSIF cardinality(queues) NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'queues must name 1 to 100 queues, not %', cardinality(queues)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR name IN SELECT DISTINCT x FROM unnest(queues) x ORDER BY 1 LOOP
        q := queue.claimable(name);
        IF NOT (q.paused OR coalesce(q.throttled_until > clock_timestamp(), false)) THEN
            open_queues := open_queues || q.name;
        END IF;
    END LOOP;
    PERFORM queue.check_claim(consumer, n, lease);
    PERFORM queue.seen(consumer);
    FOREACH name IN ARRAY open_queues LOOP
        PERFORM queue.lock_queue(name, 'claim');
    END LOOP;
    t0 := clock_timestamp();
    FOR q IN SELECT * FROM queue.queues x WHERE x.name = ANY (open_queues) AND x.rate_limit IS NOT NULL LOOP
        rated := rated || q.name;
        grants := grants || queue.rate_take(q.name, q.rate_limit, q.rate_window, n);
        used := used || 0;
    END LOOP;
    -- A fair_share queue's candidates come from its rotation across keys (sql/fair.sql).
    FOR q IN SELECT * FROM queue.queues x WHERE x.name = ANY (open_queues) AND x.fair_share LOOP
        fair_ids := fair_ids || ARRAY(SELECT queue.fair_pick(
            q.name, least(n, q.concurrency - (SELECT count(*) FROM queue.jobs r
                                               WHERE r.queue = q.name AND r.state = 'running'),
                          coalesce(grants[array_position(rated, q.name)], n)),
            q.key_concurrency, queue.fair_cursor(q.name), t0));
    END LOOP;
    FOR got IN
    WITH b AS (
        SELECT x.name, least(x.concurrency - (SELECT count(*) FROM queue.jobs r
                                               WHERE r.queue = x.name AND r.state = 'running'),
                             coalesce(grants[array_position(rated, x.name)], n)) AS budget
          FROM queue.queues x WHERE x.name = ANY (open_queues) AND NOT x.fair_share
    ), c AS (
        SELECT y.id FROM (
            SELECT k.id, k.priority, k.run_at FROM b
             CROSS JOIN LATERAL (
                SELECT j.id, j.priority, j.run_at FROM queue.jobs j
                 WHERE j.queue = b.name AND j.state = 'queued' AND j.run_at <= t0
                 ORDER BY j.priority, j.run_at, j.id
                 LIMIT greatest(0, least(n, b.budget))
                   FOR UPDATE SKIP LOCKED) k
            UNION ALL
            SELECT j.id, j.priority, j.run_at FROM queue.jobs j WHERE j.id = ANY (fair_ids)
        ) y
         ORDER BY y.priority, y.run_at, y.id
         LIMIT n
    )
    UPDATE queue.jobs j
       SET state = 'running', attempts = j.attempts + 1, started_at = t0,
           worker_pid = pg_backend_pid(), consumer = claim.consumer, lease = claim.lease,
           lease_expires_at = clock_timestamp() + claim.lease, lease_token = gen_random_uuid()
     WHERE j.id = ANY(ARRAY(SELECT c.id FROM c))
    RETURNING j.id AS job_id, j.queue AS job_queue, j.payload AS job_payload, j.attempts,
              j.lease_token AS token, j.lease_expires_at AS expires, j.depends_on AS deps,
              j.fair_key AS job_key
    LOOP
        id := got.job_id; queue := got.job_queue; payload := got.job_payload; attempt := got.attempts;
        lease_token := got.token; lease_expires_at := got.expires; depends_on := got.deps;
        RETURN NEXT;
        i := array_position(rated, got.job_queue);
        IF i IS NOT NULL THEN
            used[i] := used[i] + 1;
        END IF;
        IF got.job_key IS NOT NULL THEN
            claimed_queues := claimed_queues || got.job_queue;
            claimed_keys := claimed_keys || got.job_key;
        END IF;
    END LOOP;
    FOR q IN SELECT * FROM queue.queues x WHERE x.name = ANY (open_queues) AND x.fair_share LOOP
        PERFORM queue.fair_advance(q.name, ARRAY(SELECT u.k FROM unnest(claimed_queues, claimed_keys) u(qn, k)
                                                  WHERE u.qn = q.name));
    END LOOP;
    FOR i IN 1 .. cardinality(rated) LOOP
        PERFORM queue.rate_settle(rated[i], used[i]);
    END LOOP;
END
$$;
COMMENT ON FUNCTION queue.claim(text[], text, integer, interval) IS
    'NOTIFY queues: takes up to n ready jobs from any of queues for consumer, in priority order across them and within each queue''s concurrency; returns each job''s queue too.';

CREATE FUNCTION queue.heartbeat(id uuid, lease_token uuid, lease interval DEFAULT NULL,
                                progress jsonb DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    held_by text;
BEGIN
    PERFORM queue.check_lease(lease);
    PERFORM queue.check_progress(progress);
    IF queue.consumed_job(id, lease_token) IS NULL THEN
        RETURN false;
    END IF;
    UPDATE queue.jobs j
       SET lease = coalesce(heartbeat.lease, j.lease),
           lease_expires_at = clock_timestamp() + coalesce(heartbeat.lease, j.lease),
           progress = coalesce(heartbeat.progress, j.progress)
     WHERE j.id = heartbeat.id AND j.state = 'running' AND j.lease_token = heartbeat.lease_token
       AND j.lease_expires_at >= clock_timestamp()
    RETURNING j.consumer INTO held_by;
    IF held_by IS NULL THEN
        RETURN false;
    END IF;
    PERFORM queue.seen(held_by);
    RETURN true;
END
$$;
COMMENT ON FUNCTION queue.heartbeat(uuid, uuid, interval, jsonb) IS
    'NOTIFY queues: extends a claimed job''s lease by lease (default: the lease it was claimed with) and records progress (at most 2048 bytes of JSON; NULL keeps the last report). false when the lease was lost (expired, reaped, or the job cancelled): stop working on it.';

CREATE FUNCTION queue.complete(id uuid, lease_token uuid, result jsonb DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    job_queue text;
BEGIN
    IF pg_column_size(result) > current_setting('queue.max_result_size')::integer THEN
        RAISE EXCEPTION 'result too large: % bytes', pg_column_size(result)
            USING ERRCODE = 'program_limit_exceeded',
                  DETAIL = format('Results may be at most %s bytes (queue.max_result_size).',
                                  current_setting('queue.max_result_size'));
    END IF;
    job_queue := queue.consumed_job(id, lease_token, true);
    IF job_queue IS NULL THEN
        RETURN false;
    END IF;
    WITH d AS (
        DELETE FROM queue.jobs j
         WHERE j.id = complete.id AND j.state = 'running' AND j.lease_token = complete.lease_token
           AND j.lease_expires_at >= clock_timestamp()
        RETURNING j.*)
    INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts,
                               max_attempts, timeout, created_at, started_at, finished_at, worker_pid,
                               consumer, result, progress, snoozes, fair_key, errors)
    SELECT d.id, d.queue, 'succeeded', d.payload, d.enqueued_by, d.unique_key, d.depends_on, d.on_dependency_failure, d.priority, d.run_at, d.attempts,
           d.max_attempts, d.timeout, d.created_at, d.started_at, clock_timestamp(), d.worker_pid,
           d.consumer, complete.result, d.progress, d.snoozes, d.fair_key, d.errors
      FROM d;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM queue.record_flow(job_queue, 0, NULL, 1);     -- a success ends a throttle streak
    RETURN true;
END
$$;
COMMENT ON FUNCTION queue.complete(uuid, uuid, jsonb) IS
    'NOTIFY queues: marks a claimed job succeeded, keeping result. false (nothing changed) when the lease token is not the job''s current one or the lease expired.';

CREATE FUNCTION queue.fail(id uuid, lease_token uuid, error text, retry_in interval DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues;
    j queue.jobs;
    failure jsonb;
BEGIN
    PERFORM queue.check_fence(id, lease_token);
    IF error IS NULL THEN
        RAISE EXCEPTION 'error must not be NULL' USING ERRCODE = 'null_value_not_allowed',
            HINT = 'Say why the attempt failed; it is kept in the job''s errors.';
    ELSIF retry_in < interval '0' THEN
        RAISE EXCEPTION 'retry_in must not be negative, not %', retry_in
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF queue.consumed_job(id, lease_token, true) IS NULL THEN
        RETURN false;
    END IF;
    SELECT * INTO j FROM queue.jobs x WHERE x.id = fail.id;
    failure := jsonb_build_object('attempt', j.attempts, 'at', clock_timestamp(),
                                  'started_at', j.started_at,
                                  'message', left(error, current_setting('queue.max_error_length')::integer),
                                  'consumer', j.consumer)
               || queue.progress_entry(j.progress);
    IF j.attempts < j.max_attempts THEN
        SELECT * INTO q FROM queue.queues x WHERE x.name = j.queue;
        UPDATE queue.jobs x
           SET state = 'queued', started_at = NULL, worker_pid = NULL, consumer = NULL,
               lease = NULL, lease_expires_at = NULL, lease_token = NULL, progress = NULL,
               errors = x.errors || failure,
               run_at = clock_timestamp() + coalesce(retry_in, queue.backoff(q.backoff_base, q.backoff_max, j.attempts))
         WHERE x.id = j.id
        RETURNING x.run_at INTO j.run_at;
        IF j.run_at <= clock_timestamp() THEN
            PERFORM queue.announce(q, 1, j.id);     -- later ones the launcher announces
        END IF;
    ELSE
        WITH d AS (DELETE FROM queue.jobs x WHERE x.id = j.id RETURNING x.*)
        INSERT INTO queue.history (id, queue, state, payload, enqueued_by, unique_key, depends_on, on_dependency_failure, priority, run_at, attempts,
                                   max_attempts, timeout, created_at, started_at, finished_at, worker_pid,
                                   consumer, progress, snoozes, fair_key, errors)
        SELECT d.id, d.queue, 'failed', d.payload, d.enqueued_by, d.unique_key, d.depends_on, d.on_dependency_failure, d.priority, d.run_at, d.attempts,
               d.max_attempts, d.timeout, d.created_at, d.started_at, clock_timestamp(), d.worker_pid,
               d.consumer, d.progress, d.snoozes, d.fair_key, d.errors || failure
          FROM d;
    END IF;
    RETURN true;
END
$$;
COMMENT ON FUNCTION queue.fail(uuid, uuid, text, interval) IS
    'NOTIFY queues: records a failed attempt of a claimed job. It is retried after retry_in (default: the queue''s backoff), or fails for good when its attempts are used up. false (nothing changed) when the lease token is not the job''s current one or the lease expired.';

-- workers: who runs jobs now. In-database executors (from shared memory) and external
-- consumers seen in the last 10 minutes or still holding jobs. Jobs are counted and listed
-- only when the current role may see them; a consumer is shown to members of its role and
-- of pg_monitor, and to roles that see one of its jobs.
CREATE VIEW queue.workers WITH (security_barrier) AS
WITH monitor AS (SELECT pg_catalog.pg_has_role(current_user, 'pg_monitor', 'USAGE') AS yes),
visible AS (
    SELECT j.id, j.worker_id, j.consumer, j.started_at, j.lease_expires_at,
           CASE WHEN j.worker_id IS NULL THEN j.progress ELSE queue.job_progress(j.id, j.worker_id) END
               AS progress
      FROM queue.jobs j JOIN queue.my_privileges() p ON p.queue = j.queue
     WHERE j.state = 'running'
       AND (p.read OR (p.enqueue AND pg_catalog.pg_has_role(current_user, j.enqueued_by, 'USAGE')))
)
SELECT 'executor'::text AS kind, 'executor ' || e.slot AS name, e.pid,
       count(j.id) AS jobs, array_remove(array_agg(j.id ORDER BY j.started_at), NULL) AS job_ids,
       a.backend_start AS since, NULL::timestamptz AS last_seen,
       NULL::timestamptz AS lease_expires_at,
       jsonb_object_agg(j.id, j.progress) FILTER (WHERE j.progress IS NOT NULL) AS progress
  FROM queue.executors() e
  LEFT JOIN visible j ON j.worker_id = e.executor_id
  LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = e.pid
 GROUP BY e.slot, e.pid, a.backend_start
UNION ALL
SELECT 'consumer', c.name, c.pid,
       count(j.id), array_remove(array_agg(j.id ORDER BY j.started_at), NULL),
       c.first_seen, c.last_seen, min(j.lease_expires_at),
       jsonb_object_agg(j.id, j.progress) FILTER (WHERE j.progress IS NOT NULL)
  FROM queue.consumers c
  LEFT JOIN visible j ON j.consumer = c.name
 GROUP BY c.name, c.role, c.pid, c.first_seen, c.last_seen
HAVING (c.last_seen > now() - interval '10 minutes' OR count(j.id) > 0)
   AND ((SELECT yes FROM monitor) OR pg_catalog.pg_has_role(current_user, c.role, 'USAGE') OR count(j.id) > 0);
COMMENT ON VIEW queue.workers IS
    'In-database executors and external consumers (seen in the last 10 minutes or holding jobs), with the jobs each holds and their progress reports (job id -> progress).';

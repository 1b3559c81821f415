-- Fair share (README "Flow control"): in a queue with fair_share, jobs carry a fair_key
-- (a tenant, a customer; '' for none) and claims rotate across keys, so one key's backlog
-- cannot hold back another key's jobs; key_concurrency caps each key's running jobs.
-- Requires jobs.sql; the rotation cursor is per process (src/fair.rs).

-- fair_pick: the jobs a claim of up to n takes from queue_name now: the next n/4 keys
-- (at least one) with queued jobs after `after` in key order (wrapping around), found by
-- one index descent per key (jobs_fair_idx), and from each key its first ready jobs in
-- (priority, run_at, id) order, an equal share of n, within key_concurrency (kc; NULL: none). Locks what it picks
-- (SKIP LOCKED). Nothing while the queue is paused or cooling down.
CREATE FUNCTION queue.fair_pick(queue_name text, n bigint, kc integer, after text, at timestamptz)
RETURNS SETOF uuid LANGUAGE plpgsql AS $$
BEGIN
    IF n <= 0 OR (SELECT q.paused OR coalesce(q.throttled_until > at, false)
                    FROM queue.queues q WHERE q.name = queue_name) THEN
        RETURN;
    END IF;
    -- The walk visits at most one key per 4 jobs asked for: a descent per key is the cost
    -- of fairness, and taking up to n/keys (at least 4) from each key keeps it low.
    RETURN QUERY
    WITH RECURSIVE onward(k, i) AS (
        (SELECT j.fair_key, 1 FROM queue.jobs j
          WHERE j.queue = queue_name AND j.state = 'queued' AND j.fair_key IS NOT NULL AND j.fair_key > after
          ORDER BY j.fair_key LIMIT 1)
        UNION ALL
        SELECT (SELECT j.fair_key FROM queue.jobs j
                 WHERE j.queue = queue_name AND j.state = 'queued' AND j.fair_key IS NOT NULL AND j.fair_key > o.k
                 ORDER BY j.fair_key LIMIT 1), o.i + 1
          FROM onward o WHERE o.k IS NOT NULL AND o.i < (n + 3) / 4
    ), found AS (
        SELECT count(*) AS c FROM onward WHERE k IS NOT NULL
    ), wrapped(k, i) AS (              -- from the first key up to `after`, if keys are left
        (SELECT j.fair_key, 1 FROM queue.jobs j
          WHERE j.queue = queue_name AND j.state = 'queued' AND j.fair_key IS NOT NULL AND j.fair_key <= after
            AND (SELECT c FROM found) < (n + 3) / 4
          ORDER BY j.fair_key LIMIT 1)
        UNION ALL
        SELECT (SELECT j.fair_key FROM queue.jobs j
                 WHERE j.queue = queue_name AND j.state = 'queued' AND j.fair_key IS NOT NULL
                   AND j.fair_key > w.k AND j.fair_key <= after
                 ORDER BY j.fair_key LIMIT 1), w.i + 1
          FROM wrapped w WHERE w.k IS NOT NULL AND w.i < (n + 3) / 4 - (SELECT c FROM found)
    ), keys AS (
        SELECT o.k FROM onward o WHERE o.k IS NOT NULL
        UNION ALL
        SELECT w.k FROM wrapped w WHERE w.k IS NOT NULL
    ), share AS (
        SELECT ceil(n::numeric / greatest(count(*), 1))::integer AS s FROM keys
    )
    SELECT t.id
      FROM keys CROSS JOIN share
     CROSS JOIN LATERAL (
        SELECT j.id FROM queue.jobs j
         WHERE j.queue = queue_name AND j.fair_key = keys.k AND j.state = 'queued' AND j.run_at <= at
         ORDER BY j.priority, j.run_at, j.id
         LIMIT CASE WHEN kc IS NULL THEN share.s
                    ELSE greatest(0, least(share.s, kc - (SELECT count(*) FROM queue.jobs r
                                                           WHERE r.queue = queue_name AND r.fair_key = keys.k
                                                             AND r.state = 'running'))) END
           FOR UPDATE SKIP LOCKED) t
     LIMIT n;
END
$$;

-- check_fair_settings: the checks create_queue and alter_queue share.
CREATE FUNCTION queue.check_fair_settings(fair_share boolean, key_concurrency integer)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF key_concurrency < 1 OR key_concurrency > 10000 THEN
        RAISE EXCEPTION 'key_concurrency must be between 1 and 10000, not %', key_concurrency
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF key_concurrency IS NOT NULL AND NOT fair_share THEN
        RAISE EXCEPTION 'key_concurrency needs fair_share' USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

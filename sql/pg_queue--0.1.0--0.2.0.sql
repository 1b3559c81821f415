-- pg_queue 0.1.0 → 0.2.0, run by ALTER EXTENSION pg_queue UPDATE.
--
-- Written by hand and reviewed like a migration (README "Upgrading", docs/design.md
-- "Upgrades"): it keeps every queue, schedule, live job and history row, runs while
-- executors and clients keep working (each statement takes its locks for as short as it
-- can), and leaves the same catalog as a fresh 0.2.0 install (pgrx-tests/test_upgrade.py
-- compares them). 0.1.0 is commit bbffc91, kept as sql/releases/pg_queue--0.1.0.sql.
\echo Use "ALTER EXTENSION pg_queue UPDATE" to load this file. \quit

SET LOCAL search_path TO queue, pg_temp;

-- 1. Metrics (README "Monitoring"): new tables, the rollup, the view, the Prometheus text.
--    Copied from sql/metrics.sql as of 0.2.0; new objects only, so nothing waits on a lock.

-- Metrics (README "Monitoring", docs/design.md "Metrics"): per queue and minute, what
-- happened, rolled up by the launcher from the tables once a minute, so that reading them
-- costs the same with 10 rows of history or 10 million.
--
-- Each event is counted in the minute it happened:
--   enqueued   jobs created (the time in their UUIDv7 id);
--   started    attempts started (a claim), by executors and consumers;
--   succeeded, failed, cancelled   jobs that reached that final state (finished_at);
--   retried    attempts that failed and sent their job back to the queue (their error's "at").
-- Wait (ready → start: started_at - run_at) and run time (finished_at - started_at) are of
-- the last attempt of the jobs finished in the minute; their p50/p95/p99 are exact
-- (percentile_disc over that minute's jobs), their sums feed the Prometheus summaries.

CREATE TABLE queue.metrics_minutes (
    queue      text        NOT NULL,
    minute     timestamptz NOT NULL,
    enqueued   bigint      NOT NULL,
    started    bigint      NOT NULL,
    succeeded  bigint      NOT NULL,
    failed     bigint      NOT NULL,
    retried    bigint      NOT NULL,
    cancelled  bigint      NOT NULL,
    timed      bigint      NOT NULL,      -- finished jobs that started (have a wait and run time)
    wait_sum   interval    NOT NULL,
    run_sum    interval    NOT NULL,
    wait_p50   interval,
    wait_p95   interval,
    wait_p99   interval,
    run_p50    interval,
    run_p95    interval,
    run_p99    interval,
    PRIMARY KEY (queue, minute)
);

-- Counters since the extension was created: every minute once it is final (no longer
-- rolled up again), so Prometheus counters stay monotonic after its minute is pruned.
CREATE TABLE queue.metrics_totals (
    queue      text   PRIMARY KEY,
    enqueued   bigint NOT NULL DEFAULT 0,
    started    bigint NOT NULL DEFAULT 0,
    succeeded  bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    retried    bigint NOT NULL DEFAULT 0,
    cancelled  bigint NOT NULL DEFAULT 0,
    timed      bigint NOT NULL DEFAULT 0,
    wait_sum   interval NOT NULL DEFAULT '0',
    run_sum    interval NOT NULL DEFAULT '0'
);

-- One row: minutes before `final_until` are in metrics_totals and never rolled up again;
-- minutes before `rolled_until` are in metrics_minutes (the last few may still change).
CREATE TABLE queue.metrics_state (
    one          boolean PRIMARY KEY DEFAULT true CHECK (one),
    final_until  timestamptz,
    rolled_until timestamptz
);
INSERT INTO queue.metrics_state DEFAULT VALUES;

-- roll_up_metrics: (re)computes every minute from `final_until` (at most an hour back) to
-- `upto` (the launcher passes the start of the current minute, 5 s after it began), keeps
-- minutes more than 5 minutes old as final (a transaction that commits later than that
-- with an earlier timestamp is not counted), and prunes minutes past
-- queue.metrics_retention. Reads history only from `final_until` on, per queue by the
-- (queue, finished_at) index, and live jobs by their id and state indexes.
CREATE FUNCTION queue.roll_up_metrics(upto timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    st queue.metrics_state;
    lo timestamptz;
    fin timestamptz;
    lo_id uuid;
    n bigint;
BEGIN
    SELECT * INTO st FROM queue.metrics_state FOR UPDATE;
    lo := date_trunc('minute', greatest(st.final_until, upto - interval '1 hour'));
    IF lo >= upto THEN
        RETURN 0;
    END IF;
    -- UUIDv7 ids begin with their creation time in Unix milliseconds.
    lo_id := (lpad(to_hex((extract(epoch FROM lo) * 1000)::int8), 12, '0') || repeat('0', 20))::uuid;

    WITH h AS (
        SELECT x.queue, x.state, x.run_at, x.created_at, x.started_at, x.finished_at, x.attempts, x.errors
          FROM queue.queues q
          -- OFFSET 0 keeps this a per-queue (queue, finished_at) index scan: flattened into
          -- a join, the planner scans whole partitions by finished_at alone.
          JOIN LATERAL (SELECT * FROM queue.history y
                         WHERE y.queue = q.name AND y.finished_at >= lo OFFSET 0) x ON true
    ), live AS (
        -- Jobs that may hold attempts since lo: running ones, and retried ones (a retry
        -- moves run_at past the failure, so they are in jobs_scheduled_idx; state is
        -- tested in a CASE so that jobs_ready_idx cannot serve this: sql/schema.sql).
        SELECT j.queue, j.started_at, j.errors FROM queue.jobs j WHERE j.state = 'running'
        UNION ALL
        SELECT j.queue, NULL, j.errors FROM queue.jobs j
         WHERE j.run_at > j.created_at AND j.run_at >= lo
           AND CASE j.state WHEN 'queued' THEN j.errors <> '[]' END
    ), retries AS (
        -- Failed attempts that had started and sent their job back: every one of a live
        -- job, and all but the last of a finished one.
        SELECT l.queue, (e.v->>'at')::timestamptz AS at, (e.v->>'started_at')::timestamptz AS started
          FROM live l, jsonb_array_elements(l.errors) e(v)
         WHERE l.errors <> '[]'
        UNION ALL
        SELECT h.queue, (e.v->>'at')::timestamptz, (e.v->>'started_at')::timestamptz
          FROM h, jsonb_array_elements(h.errors) e(v)
         WHERE h.errors <> '[]' AND (e.v->>'attempt')::int < h.attempts
    ), parts AS (
        -- One partial row per (queue, minute) from each source, summed below. Wait is
        -- NULL for a job that never started (least() skips the NULL, the difference not).
        -- date_bin, not date_trunc: no time zone arithmetic per row.
        SELECT h.queue, date_bin('1 minute', h.finished_at, lo) AS minute, 0::int8 AS enqueued, 0::int8 AS started,
               count(*) FILTER (WHERE h.state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE h.state = 'failed') AS failed, 0::int8 AS retried,
               count(*) FILTER (WHERE h.state = 'cancelled') AS cancelled,
               count(h.started_at) AS timed,
               coalesce(sum(h.started_at - least(h.run_at, h.started_at)), interval '0') AS wait_sum,
               coalesce(sum(h.finished_at - h.started_at), interval '0') AS run_sum,
               percentile_disc('{0.5,0.95,0.99}'::float8[]) WITHIN GROUP
                   (ORDER BY h.started_at - least(h.run_at, h.started_at)) AS waits,
               percentile_disc('{0.5,0.95,0.99}'::float8[]) WITHIN GROUP
                   (ORDER BY h.finished_at - h.started_at) AS runs
          FROM h WHERE h.finished_at < upto GROUP BY 1, 2
        UNION ALL
        -- enqueued: created_at (the enqueuing transaction's start) is at most the time in
        -- the id, so every job created since lo has an id past lo_id.
        SELECT c.queue, date_bin('1 minute', c.created_at, lo), count(*), 0, 0, 0, 0, 0, 0, '0', '0', NULL, NULL
          FROM (SELECT j.queue, j.created_at FROM queue.jobs j WHERE j.id >= lo_id
                UNION ALL
                SELECT h.queue, h.created_at FROM h) c
         WHERE c.created_at >= lo AND c.created_at < upto GROUP BY 1, 2
        UNION ALL
        SELECT s.queue, date_bin('1 minute', s.at, lo), 0, count(*), 0, 0, 0, 0, 0, '0', '0', NULL, NULL
          FROM (SELECT h.queue, h.started_at AS at FROM h
                UNION ALL
                SELECT l.queue, l.started_at FROM live l
                UNION ALL
                SELECT r.queue, r.started FROM retries r) s
         WHERE s.at >= lo AND s.at < upto GROUP BY 1, 2
        UNION ALL
        SELECT r.queue, date_bin('1 minute', r.at, lo), 0, 0, 0, 0, count(*), 0, 0, '0', '0', NULL, NULL
          FROM retries r WHERE r.started IS NOT NULL AND r.at >= lo AND r.at < upto GROUP BY 1, 2
    )
    INSERT INTO queue.metrics_minutes AS m
    SELECT p.queue, p.minute, sum(p.enqueued), sum(p.started), sum(p.succeeded), sum(p.failed),
           sum(p.retried), sum(p.cancelled), sum(p.timed), sum(p.wait_sum), sum(p.run_sum),
           max(p.waits[1]), max(p.waits[2]), max(p.waits[3]), max(p.runs[1]), max(p.runs[2]), max(p.runs[3])
      FROM parts p
     GROUP BY 1, 2
    ON CONFLICT (queue, minute) DO UPDATE
       SET enqueued = excluded.enqueued, started = excluded.started,
           succeeded = excluded.succeeded, failed = excluded.failed,
           retried = excluded.retried, cancelled = excluded.cancelled, timed = excluded.timed,
           wait_sum = excluded.wait_sum, run_sum = excluded.run_sum,
           wait_p50 = excluded.wait_p50, wait_p95 = excluded.wait_p95, wait_p99 = excluded.wait_p99,
           run_p50 = excluded.run_p50, run_p95 = excluded.run_p95, run_p99 = excluded.run_p99;
    GET DIAGNOSTICS n = ROW_COUNT;

    -- Minutes more than 5 minutes old are final: counted into the totals once.
    fin := greatest(lo, date_trunc('minute', upto - interval '5 minutes'));
    IF fin > lo THEN
        INSERT INTO queue.metrics_totals AS t
        SELECT m.queue, sum(m.enqueued), sum(m.started), sum(m.succeeded), sum(m.failed),
               sum(m.retried), sum(m.cancelled), sum(m.timed), sum(m.wait_sum), sum(m.run_sum)
          FROM queue.metrics_minutes m
         WHERE m.minute >= lo AND m.minute < fin
         GROUP BY m.queue
        ON CONFLICT (queue) DO UPDATE
           SET enqueued = t.enqueued + excluded.enqueued, started = t.started + excluded.started,
               succeeded = t.succeeded + excluded.succeeded, failed = t.failed + excluded.failed,
               retried = t.retried + excluded.retried, cancelled = t.cancelled + excluded.cancelled,
               timed = t.timed + excluded.timed, wait_sum = t.wait_sum + excluded.wait_sum,
               run_sum = t.run_sum + excluded.run_sum;
    END IF;
    UPDATE queue.metrics_state
       SET final_until = fin, rolled_until = greatest(rolled_until, upto);
    DELETE FROM queue.metrics_minutes m
     WHERE m.minute < upto - current_setting('queue.metrics_retention')::interval;
    RETURN n;
END
$$;

-- metrics: the per-minute time series, for the queues the current role may read (every
-- queue for members of pg_monitor: counts and times only).
CREATE VIEW queue.metrics WITH (security_barrier) AS
SELECT m.queue, m.minute, m.enqueued, m.started, m.succeeded, m.failed, m.retried, m.cancelled,
       m.wait_p50, m.wait_p95, m.wait_p99, m.run_p50, m.run_p95, m.run_p99
  FROM queue.metrics_minutes m
 WHERE pg_catalog.pg_has_role(current_user, 'pg_monitor', 'USAGE')
    OR m.queue IN (SELECT p.queue FROM queue.my_privileges() p WHERE p.read);
COMMENT ON VIEW queue.metrics IS
    'Per queue and minute: jobs enqueued, attempts started, jobs succeeded, failed and cancelled, attempts retried, and wait (ready to start) and run time percentiles of the jobs finished in that minute. Rolled up by the launcher a few seconds after each minute; kept for queue.metrics_retention.';


-- prometheus_label: a label value escaped as the exposition format wants (\, ", newline).
CREATE FUNCTION queue.prometheus_label(v text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(v, E'\\', E'\\\\'), '"', E'\\"'), E'\n', E'\\n')
$$;

-- prometheus_metrics: the Prometheus text exposition format (version 0.0.4) of the queues
-- the caller may read (every queue for pg_monitor): live gauges, counters since the
-- extension was created, wait and run time summaries, executors. Reads live jobs, rollups
-- and totals only.
CREATE FUNCTION queue.prometheus_metrics()
RETURNS text LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    out text[];
    qs text[];
    counts jsonb;
    m record;
BEGIN
    SELECT coalesce(array_agg(q.name ORDER BY q.name), '{}') INTO qs
      FROM queue.queues q
     WHERE pg_has_role(queue.caller(), 'pg_monitor', 'USAGE')
        OR q.name IN (SELECT p.queue FROM queue.privileges_of(queue.caller()) p WHERE p.read);

    out := ARRAY['# HELP pg_queue_jobs Live jobs by queue and state (ready, scheduled, running, waiting).',
                 '# TYPE pg_queue_jobs gauge']
        || ARRAY(
           SELECT format('pg_queue_jobs{queue="%s",state="%s"} %s', queue.prometheus_label(n.queue), s.state, coalesce(c.n, 0))
             FROM unnest(qs) n(queue)
            CROSS JOIN unnest('{ready,scheduled,running,waiting}'::text[]) s(state)
             LEFT JOIN (SELECT j.queue,
                               CASE WHEN j.state = 'queued' AND j.run_at > now() THEN 'scheduled'
                                    WHEN j.state = 'queued' THEN 'ready' ELSE j.state::text END AS state,
                               count(*) AS n
                          FROM queue.jobs j WHERE j.queue = ANY(qs) GROUP BY 1, 2) c
               ON c.queue = n.queue AND c.state = s.state
            ORDER BY n.queue, s.state)
        || ARRAY['# HELP pg_queue_oldest_ready_seconds Age of the oldest ready job (0 when none is ready).',
                 '# TYPE pg_queue_oldest_ready_seconds gauge']
        || ARRAY(
           SELECT format('pg_queue_oldest_ready_seconds{queue="%s"} %s', queue.prometheus_label(n.queue),
                         round(coalesce(extract(epoch FROM now() - min(j.run_at)), 0), 3))
             FROM unnest(qs) n(queue)
             LEFT JOIN queue.jobs j ON j.queue = n.queue AND j.state = 'queued' AND j.run_at <= now()
            GROUP BY n.queue ORDER BY n.queue);

    -- Counters: the final minutes' totals plus the minutes that may still be rolled up again.
    SELECT coalesce(jsonb_agg(to_jsonb(c) ORDER BY c.queue), '[]') INTO counts
      FROM (SELECT n.queue,
                   coalesce(t.enqueued, 0) + coalesce(x.enqueued, 0) AS enqueued,
                   coalesce(t.started, 0) + coalesce(x.started, 0) AS started,
                   coalesce(t.succeeded, 0) + coalesce(x.succeeded, 0) AS succeeded,
                   coalesce(t.failed, 0) + coalesce(x.failed, 0) AS failed,
                   coalesce(t.retried, 0) + coalesce(x.retried, 0) AS retried,
                   coalesce(t.cancelled, 0) + coalesce(x.cancelled, 0) AS cancelled,
                   coalesce(t.timed, 0) + coalesce(x.timed, 0) AS timed,
                   round(extract(epoch FROM coalesce(t.wait_sum, interval '0') + coalesce(x.wait_sum, interval '0')), 6) AS wait_sum,
                   round(extract(epoch FROM coalesce(t.run_sum, interval '0') + coalesce(x.run_sum, interval '0')), 6) AS run_sum,
                   l.wait_p50, l.wait_p95, l.wait_p99, l.run_p50, l.run_p95, l.run_p99
              FROM unnest(qs) n(queue)
              LEFT JOIN queue.metrics_totals t ON t.queue = n.queue
              LEFT JOIN LATERAL (
                  SELECT sum(y.enqueued) AS enqueued, sum(y.started) AS started, sum(y.succeeded) AS succeeded,
                         sum(y.failed) AS failed, sum(y.retried) AS retried, sum(y.cancelled) AS cancelled,
                         sum(y.timed) AS timed, sum(y.wait_sum) AS wait_sum, sum(y.run_sum) AS run_sum
                    FROM queue.metrics_minutes y
                   WHERE y.queue = n.queue
                     AND y.minute >= (SELECT coalesce(s.final_until, '-infinity') FROM queue.metrics_state s)) x ON true
              -- quantiles: the last rolled-up minute (of the last 6) in which jobs finished
              LEFT JOIN LATERAL (
                  SELECT extract(epoch FROM y.wait_p50) AS wait_p50, extract(epoch FROM y.wait_p95) AS wait_p95,
                         extract(epoch FROM y.wait_p99) AS wait_p99, extract(epoch FROM y.run_p50) AS run_p50,
                         extract(epoch FROM y.run_p95) AS run_p95, extract(epoch FROM y.run_p99) AS run_p99
                    FROM queue.metrics_minutes y
                   WHERE y.queue = n.queue AND y.timed > 0 AND y.minute >= now() - interval '6 minutes'
                   ORDER BY y.minute DESC LIMIT 1) l ON true) c;

    FOR m IN SELECT * FROM (VALUES
            (1, 'enqueued', 'Jobs enqueued.'), (2, 'started', 'Attempts started.'),
            (3, 'succeeded', 'Jobs succeeded.'), (4, 'failed', 'Jobs failed for good.'),
            (5, 'retried', 'Failed attempts whose job was queued again.'),
            (6, 'cancelled', 'Jobs cancelled.')) e(i, name, help) ORDER BY e.i
    LOOP
        out := out || format('# HELP pg_queue_%s_total %s', m.name, m.help)
                   || format('# TYPE pg_queue_%s_total counter', m.name)
                   || ARRAY(SELECT format('pg_queue_%s_total{queue="%s"} %s', m.name,
                                          queue.prometheus_label(c.v->>'queue'), c.v->>m.name)
                              FROM jsonb_array_elements(counts) WITH ORDINALITY c(v, i) ORDER BY c.i);
    END LOOP;
    FOR m IN SELECT * FROM (VALUES (1, 'wait', 'Time from ready to start of the jobs finished (quantiles: last minute with any).'),
                                   (2, 'run', 'Run time of the jobs finished (quantiles: last minute with any).')) x(i, name, help)
             ORDER BY x.i
    LOOP
        out := out || format('# HELP pg_queue_%s_seconds %s', m.name, m.help)
                   || format('# TYPE pg_queue_%s_seconds summary', m.name)
                   || ARRAY(SELECT format('pg_queue_%s_seconds{queue="%s",quantile="%s"} %s', m.name,
                                          queue.prometheus_label(c.v->>'queue'), p.q,
                                          round((c.v->>(m.name || '_p' || p.suffix))::numeric, 6))
                              FROM jsonb_array_elements(counts) WITH ORDINALITY c(v, i)
                             CROSS JOIN (VALUES (1, '0.5', '50'), (2, '0.95', '95'), (3, '0.99', '99')) p(k, q, suffix)
                             WHERE c.v->>(m.name || '_p50') IS NOT NULL
                             ORDER BY c.i, p.k)
                   || ARRAY(SELECT format('pg_queue_%s_seconds_sum{queue="%s"} %s', m.name,
                                          queue.prometheus_label(c.v->>'queue'), c.v->>(m.name || '_sum'))
                                   || E'\n'
                                   || format('pg_queue_%s_seconds_count{queue="%s"} %s', m.name,
                                             queue.prometheus_label(c.v->>'queue'), c.v->>'timed')
                              FROM jsonb_array_elements(counts) WITH ORDINALITY c(v, i) ORDER BY c.i);
    END LOOP;

    out := out || '# HELP pg_queue_executors Executors (background workers that run handlers) in this cluster.'::text
               || '# TYPE pg_queue_executors gauge'::text
               || format('pg_queue_executors %s', (SELECT count(*) FROM queue.executors()));
    RETURN array_to_string(out, E'\n') || E'\n';
END
$$;
COMMENT ON FUNCTION queue.prometheus_metrics() IS
    'The Prometheus text exposition format of the queues the caller may read: live jobs by state, oldest ready age, counters of jobs enqueued/started/succeeded/failed/retried/cancelled, wait and run time summaries, executors.';

-- 2. queue.stats reads the last hour from the rollups, through a function (without JIT).
--    Dropped and created again (the same columns; nothing depends on it) within this
--    transaction, so a reader sees the old view or the new one.
DROP VIEW queue.stats;

-- history_outcomes: a queue's jobs finished in [since, upto) by final state, for
-- queue.stats when the rollups lag behind; NULLs for a queue the caller may not read.
CREATE FUNCTION queue.history_outcomes(queue_name text, since timestamptz, upto timestamptz,
                                       OUT succeeded bigint, OUT failed bigint, OUT cancelled bigint)
RETURNS record LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF pg_has_role(queue.caller(), 'pg_monitor', 'USAGE')
       OR queue_name IN (SELECT p.queue FROM queue.privileges_of(queue.caller()) p WHERE p.read) THEN
        -- EXECUTE: planned with the values, so the index serves a short range.
        EXECUTE 'SELECT count(*) FILTER (WHERE x.state = ''succeeded''),
                        count(*) FILTER (WHERE x.state = ''failed''),
                        count(*) FILTER (WHERE x.state = ''cancelled'')
                   FROM queue.history x
                  WHERE x.queue = $1 AND x.finished_at >= $2 AND x.finished_at < $3'
           INTO succeeded, failed, cancelled USING queue_name, since, upto;
    END IF;
END
$$;

-- stats: one row per queue for psql admins. Counts every live job of the queue (a large
-- backlog makes it slower); the last hour's outcomes come from the rollups plus the
-- history rows not rolled up yet (the last minute or so), so history's size costs nothing.
-- Shows the queues the caller may read, and every queue to members of pg_monitor (counts
-- only: no payload is in it). A view over a function because the function can turn JIT
-- off: the planner's cost of this query grows with the number of queues (and with
-- estimates on tables autovacuum rarely analyses) past jit_above_cost, and compiling it
-- took 40-700 ms for a query that runs in one.
CREATE FUNCTION queue.stats_rows()
RETURNS TABLE (queue text, paused boolean, is_full boolean, concurrency integer,
               ready bigint, scheduled bigint, running bigint, waiting bigint,
               oldest_ready_age interval, succeeded_last_hour bigint, failed_last_hour bigint,
               cancelled_last_hour bigint, finished_per_second_last_minute numeric,
               throttled_until timestamptz, consecutive_throttles integer, rate_limit text,
               fair_share boolean, key_concurrency integer)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
BEGIN
    RETURN QUERY
    SELECT q.name AS queue, q.paused, q.is_full, q.concurrency,
           coalesce(l.ready, 0) AS ready, coalesce(l.scheduled, 0) AS scheduled,
           coalesce(l.running, 0) AS running, coalesce(l.waiting, 0) AS waiting, l.oldest_ready_age,
           (coalesce(r.succeeded, 0) + coalesce(h.succeeded, 0) + coalesce(g.succeeded, 0))::bigint,
           (coalesce(r.failed, 0) + coalesce(h.failed, 0) + coalesce(g.failed, 0))::bigint,
           (coalesce(r.cancelled, 0) + coalesce(h.cancelled, 0) + coalesce(g.cancelled, 0))::bigint,
           round(coalesce(h.last_minute, 0) / 60.0, 1) AS finished_per_second_last_minute,
           -- flow control: a throttle's cool-down in progress, and the streak that set it
           CASE WHEN q.throttled_until > now() THEN q.throttled_until END AS throttled_until,
           q.throttle_count AS consecutive_throttles,
           q.rate_limit || '/' || q.rate_window AS rate_limit,
           q.fair_share, q.key_concurrency
      FROM queue.queues q
      LEFT JOIN LATERAL (
          SELECT count(*) FILTER (WHERE j.state = 'queued' AND j.run_at <= now()) AS ready,
                 count(*) FILTER (WHERE j.state = 'queued' AND j.run_at > now()) AS scheduled,
                 count(*) FILTER (WHERE j.state = 'running') AS running,
                 count(*) FILTER (WHERE j.state = 'waiting') AS waiting,
                 now() - min(j.run_at) FILTER (WHERE j.state = 'queued' AND j.run_at <= now()) AS oldest_ready_age
            FROM queue.jobs j WHERE j.queue = q.name) l ON true
      LEFT JOIN LATERAL (
          SELECT sum(m.succeeded) AS succeeded, sum(m.failed) AS failed, sum(m.cancelled) AS cancelled
            FROM queue.metrics_minutes m
           WHERE m.queue = q.name AND m.minute >= now() - interval '1 hour'
             AND m.minute < (SELECT greatest(s.rolled_until, now() - interval '1 hour') FROM queue.metrics_state s)) r ON true
      LEFT JOIN LATERAL (
          -- History not rolled up yet. While the launcher keeps up, that is less than the last
          -- 2 minutes, a bound the planner can estimate (few rows: the index).
          SELECT count(*) FILTER (WHERE x.state = 'succeeded' AND x.finished_at >= u.since) AS succeeded,
                 count(*) FILTER (WHERE x.state = 'failed' AND x.finished_at >= u.since) AS failed,
                 count(*) FILTER (WHERE x.state = 'cancelled' AND x.finished_at >= u.since) AS cancelled,
                 count(*) FILTER (WHERE x.finished_at > now() - interval '1 minute') AS last_minute
            FROM (SELECT (SELECT greatest(s.rolled_until, now() - interval '1 hour') FROM queue.metrics_state s)
                         AS since) u, queue.history x
           WHERE x.queue = q.name AND x.finished_at >= now() - interval '2 minutes') h ON true
      LEFT JOIN LATERAL (
          -- The scheduler is behind (stopped, or busy for minutes): the rest, read only then
          -- (a one-time filter), and by a function so that the planner does not cost a scan
          -- it cannot estimate.
          SELECT o.succeeded, o.failed, o.cancelled
            FROM queue.history_outcomes(q.name,
                     (SELECT greatest(s.rolled_until, now() - interval '1 hour') FROM queue.metrics_state s),
                     now() - interval '2 minutes') o
           WHERE (SELECT greatest(s.rolled_until, now() - interval '1 hour') FROM queue.metrics_state s)
                 < now() - interval '2 minutes') g ON true
     WHERE pg_has_role(queue.caller(), 'pg_monitor', 'USAGE')
        OR q.name IN (SELECT p.queue FROM queue.privileges_of(queue.caller()) p WHERE p.read)
     ORDER BY q.name;
END
$$;

CREATE VIEW queue.stats AS SELECT * FROM queue.stats_rows();
COMMENT ON VIEW queue.stats IS
    'Per queue: ready, scheduled, running and waiting jobs, the age of the oldest ready one, the last hour''s outcomes and throughput, and a throttle cool-down in progress.';

-- 3. A consumer's failed attempt records when it started (for the "started" and "retried"
--    counts): queue.fail as of 0.2.0. CREATE OR REPLACE keeps its grants and comment.
CREATE OR REPLACE FUNCTION queue.fail(id uuid, lease_token uuid, error text, retry_in interval DEFAULT NULL)
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

-- 4. Running jobs are indexed by queue and start time (sql/schema.sql): executors count
--    a limited queue's running jobs from the oldest start they saw. Built in the update's
--    transaction: writes to queue.jobs wait while it reads the table (live jobs only).
DROP INDEX queue.jobs_running_idx;
CREATE INDEX jobs_running_idx ON queue.jobs (queue, started_at) WHERE state = 'running';

-- 5. Privileges, as sql/finalize.sql leaves them on a fresh install: nothing for PUBLIC but
--    the monitoring views and the Prometheus function.
REVOKE ALL ON queue.metrics_minutes, queue.metrics_totals, queue.metrics_state,
              queue.metrics, queue.stats FROM PUBLIC;
REVOKE ALL ON FUNCTION queue.roll_up_metrics(timestamptz), queue.prometheus_label(text),
                       queue.prometheus_metrics(),
                       queue.history_outcomes(text, timestamptz, timestamptz),
                       queue.stats_rows() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION queue.prometheus_metrics(),
                          queue.history_outcomes(text, timestamptz, timestamptz),
                          queue.stats_rows() TO PUBLIC;
GRANT SELECT ON queue.stats, queue.metrics TO PUBLIC;

-- 6. Consumers' claims plan without sequential nor bitmap scans (nor JIT), as on a fresh
--    install (sql/consumers.sql).
ALTER FUNCTION queue.claim(text, text, integer, interval)
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off;
ALTER FUNCTION queue.claim(text[], text, integer, interval)
    SET enable_seqscan = off SET enable_bitmapscan = off SET jit = off;

-- 7. The nine CHECK constraints of queue.jobs become one row trigger in C (src/state.rs,
--    sql/jobs.sql): Postgres parsed and planned all nine for every INSERT and UPDATE. The
--    live jobs met the same invariants under the CHECKs, so none needs checking again.
CREATE FUNCTION queue.jobs_invariants() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'pg_queue_jobs_invariants';
REVOKE ALL ON FUNCTION queue.jobs_invariants() FROM PUBLIC;
COMMENT ON FUNCTION queue.jobs_invariants() IS
    'Trigger of queue.jobs: raises check_violation (23514) naming the invariant of a live job that a row breaks.';
ALTER TABLE queue.jobs
    DROP CONSTRAINT jobs_live_state,
    DROP CONSTRAINT jobs_waiting_for_dependencies,
    DROP CONSTRAINT jobs_dependency_failure_valid,
    DROP CONSTRAINT jobs_attempts_in_range,
    DROP CONSTRAINT jobs_max_attempts_positive,
    DROP CONSTRAINT jobs_timeout_positive,
    DROP CONSTRAINT jobs_running_has_owner,
    DROP CONSTRAINT jobs_one_owner,
    DROP CONSTRAINT jobs_consumer_has_lease;
CREATE TRIGGER jobs_invariants BEFORE INSERT OR UPDATE ON queue.jobs
    FOR EACH ROW EXECUTE FUNCTION queue.jobs_invariants();

-- 8. enqueue's common case is a C function (src/api/enqueue.rs); the PL/pgSQL body, as it
--    was, becomes queue.enqueue_sql, which takes the rest. CREATE OR REPLACE keeps
--    enqueue's grants and comment; enqueue_sql is new and internal.
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
REVOKE ALL ON FUNCTION queue.enqueue_sql(text, jsonb, timestamptz, integer, integer, interval, text,
    interval, uuid[], text, text) FROM PUBLIC;
CREATE OR REPLACE FUNCTION queue.enqueue(
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

-- 9. Consumers' leases get an index of their own (sql/schema.sql): the reaper reads
--    jobs_running_idx only once an executor exited.
CREATE INDEX jobs_leases_idx ON queue.jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;

-- 10. Jobs that become ready by time are indexed without a state test (sql/schema.sql), so
--     that their readers cannot be planned on jobs_ready_idx.
DROP INDEX queue.jobs_scheduled_idx;
CREATE INDEX jobs_scheduled_idx ON queue.jobs (run_at) WHERE run_at > created_at;

-- 11. Jobs made ready with a run_at of the past (an explicit run_at, dependents released
--     long after they were enqueued) rewind the executors' claims to it at commit
--     (src/worker/cursors.rs): full passes under an old snapshot look from where they last
--     found each queue's jobs to begin, not from the head.
CREATE FUNCTION queue.rewind_executors(run_at timestamptz) RETURNS void
VOLATILE STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'rewind_executors_wrapper';
COMMENT ON FUNCTION queue.rewind_executors(timestamptz) IS 'Internal: jobs of that run_at became ready in this transaction; at commit, executors whose claims resume after it look back to it.';
REVOKE ALL ON FUNCTION queue.rewind_executors(timestamptz) FROM PUBLIC;
CREATE OR REPLACE FUNCTION queue.insert_job(
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

CREATE OR REPLACE FUNCTION queue.enqueue_many(
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

CREATE OR REPLACE FUNCTION queue.release_dependents() RETURNS trigger
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

-- 12. Queue locks (src/locks.rs): userlocks, which no SQL function takes, so that no role
--     can hold one. Every path that inserts jobs holds its queue shared and drop_queue
--     exclusive, so that a job enqueued while its queue is dropped is cancelled with the
--     others rather than left without a queue; claims of a limited queue take turns on
--     one, where they took an advisory lock that any role could hold. drop_queue(force)
--     also locks the queue's jobs in id order before the queue's row, and tries again
--     after losing a deadlock to an executor recording a batch.
CREATE FUNCTION queue.lock_queue(queue_name text, purpose text) RETURNS void
STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'lock_queue_wrapper';
COMMENT ON FUNCTION queue.lock_queue(text, text) IS 'Internal: holds the queue until the end of the transaction: shared to insert jobs into it (insert), exclusive to drop it (drop), or to claim its jobs in turn (claim).';
REVOKE ALL ON FUNCTION queue.lock_queue(text, text) FROM PUBLIC;
CREATE OR REPLACE FUNCTION queue.claim(
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
CREATE OR REPLACE FUNCTION queue.claim(
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
CREATE OR REPLACE FUNCTION queue.enqueue_unique(
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
CREATE OR REPLACE FUNCTION queue.retry(id uuid) RETURNS boolean
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
CREATE OR REPLACE FUNCTION queue.drop_queue(name text, force boolean DEFAULT false)
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

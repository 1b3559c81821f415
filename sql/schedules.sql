-- Cron schedules: schedule, alter_schedule, unschedule, the view queue.schedules.
-- Requires jobs.sql and queue.cron_next() (src/cron/mod.rs). The launcher fires due
-- schedules (src/cron/mod.rs): one job per plan time, exactly once, enforced by the
-- primary key of queue.schedule_runs in the transaction that enqueues the job.

CREATE TABLE queue.schedule_defs (
    name             text        PRIMARY KEY,
    cron             text        NOT NULL,
    queue            text        NOT NULL,
    payload          jsonb       NOT NULL DEFAULT '{}',
    time_zone        text        NOT NULL DEFAULT 'UTC',
    -- While the previous job is live: skip the plan, queue it until that job finished,
    -- or allow it to run beside.
    overlap          text        NOT NULL DEFAULT 'skip',
    -- After downtime: fire only the latest missed plan, or all of them.
    catch_up         text        NOT NULL DEFAULT 'latest',
    catch_up_window  interval    NOT NULL DEFAULT '1 hour',   -- older missed plans never fire
    priority         integer     NOT NULL DEFAULT 0,
    max_attempts     integer,
    timeout          interval,
    enabled          boolean     NOT NULL DEFAULT true,
    owner            regrole     NOT NULL,    -- its creator: the launcher enqueues as this role
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_plan_at     timestamptz NOT NULL,    -- every plan up to this one is done (fired or skipped)
    last_fired_at    timestamptz,             -- the plan time of the last job fired
    last_job         uuid,
    next_run_at      timestamptz,             -- the next plan after last_plan_at
    CONSTRAINT schedule_defs_name_valid CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$'),
    CONSTRAINT schedule_defs_overlap_valid CHECK (overlap IN ('skip', 'queue', 'allow')),
    CONSTRAINT schedule_defs_catch_up_valid CHECK (catch_up IN ('latest', 'all')),
    CONSTRAINT schedule_defs_window_positive CHECK (catch_up_window > interval '0')
);
CREATE INDEX schedule_defs_next_idx ON queue.schedule_defs (next_run_at) WHERE enabled;
SELECT pg_catalog.pg_extension_config_dump('queue.schedule_defs', '');

-- One row per (schedule, plan time) handled: its job, or NULL when skipped (overlap) or
-- when the enqueue failed (error: e.g. its owner may no longer enqueue into the queue).
-- The primary key makes firing a plan twice impossible, whatever crashed or restarted.
-- Retention forgets rows older than a day (plans that old are behind last_plan_at).
CREATE TABLE queue.schedule_runs (
    schedule  text        NOT NULL,
    plan_at   timestamptz NOT NULL,
    job       uuid,
    error     text,
    fired_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (schedule, plan_at)
);
CREATE INDEX schedule_runs_fired_idx ON queue.schedule_runs (fired_at);

-- check_schedule: validates a schedule's settings with readable errors; returns the next
-- plan time after `after`.
CREATE FUNCTION queue.check_schedule(
    cron text, time_zone text, overlap text, catch_up text, catch_up_window interval,
    after timestamptz)
RETURNS timestamptz LANGUAGE plpgsql AS $$
DECLARE
    next_at timestamptz;
BEGIN
    IF cron IS NULL OR time_zone IS NULL THEN
        RAISE EXCEPTION 'cron and time_zone must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    ELSIF overlap IS NULL OR overlap NOT IN ('skip', 'queue', 'allow') THEN
        RAISE EXCEPTION 'overlap must be skip, queue or allow, not %', coalesce(quote_literal(overlap), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF catch_up IS NULL OR catch_up NOT IN ('latest', 'all') THEN
        RAISE EXCEPTION 'catch_up must be latest or all, not %', coalesce(quote_literal(catch_up), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    ELSIF catch_up_window IS NULL OR catch_up_window <= interval '0' THEN
        RAISE EXCEPTION 'catch_up_window must be positive, not %', coalesce(catch_up_window::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    next_at := queue.cron_next(cron, after, time_zone);      -- raises 22023 when invalid
    IF next_at IS NULL THEN
        RAISE EXCEPTION 'cron expression "%" never fires', cron USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN next_at;
END
$$;

CREATE FUNCTION queue.schedule(
    name            text,
    cron            text,
    queue           text,
    payload         jsonb    DEFAULT '{}',
    time_zone       text     DEFAULT 'UTC',
    overlap         text     DEFAULT 'skip',
    catch_up        text     DEFAULT 'latest',
    catch_up_window interval DEFAULT '1 hour',
    priority        integer  DEFAULT 0,
    max_attempts    integer  DEFAULT NULL,
    timeout         interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    next_at timestamptz;
    who oid := queue.caller();
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'invalid schedule name: %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 128 letters, digits, "_", ".", ":" or "-".';
    ELSIF payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- The schedule enqueues as its owner, who must hold enqueue (checked again at each plan).
    PERFORM queue.authorize(queue, 'enqueue');
    PERFORM queue.check_job_options(priority, max_attempts, timeout);
    next_at := queue.check_schedule(cron, time_zone, overlap, catch_up, catch_up_window, now());
    IF EXISTS (SELECT 1 FROM queue.schedule_defs s WHERE s.name = schedule.name
                  AND NOT pg_has_role(who, s.owner, 'USAGE')) THEN
        RAISE EXCEPTION 'must be owner of schedule "%"', name USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Create or replace (as pg_cron's cron.schedule): a replaced schedule starts afresh now.
    INSERT INTO queue.schedule_defs AS s (name, cron, queue, payload, time_zone, overlap, catch_up,
                                          catch_up_window, priority, max_attempts, timeout, owner,
                                          last_plan_at, next_run_at)
    VALUES (name, cron, queue, payload, time_zone, overlap, catch_up, catch_up_window, priority,
            max_attempts, timeout, who, now(), next_at)
    ON CONFLICT ON CONSTRAINT schedule_defs_pkey DO UPDATE
       SET cron = excluded.cron, queue = excluded.queue, payload = excluded.payload,
           time_zone = excluded.time_zone, overlap = excluded.overlap, catch_up = excluded.catch_up,
           catch_up_window = excluded.catch_up_window, priority = excluded.priority,
           max_attempts = excluded.max_attempts, timeout = excluded.timeout, enabled = true,
           last_plan_at = excluded.last_plan_at, next_run_at = excluded.next_run_at;
END
$$;
COMMENT ON FUNCTION queue.schedule(text, text, text, jsonb, text, text, text, interval, integer, integer, interval) IS
    'Creates (or replaces) a cron schedule that enqueues payload on queue at each plan time of cron (5 or 6 fields, @hourly..., @every 10s) in time_zone. overlap: skip | queue | allow while the previous job is live; catch_up: latest | all missed plans within catch_up_window after downtime.';

-- lock_schedule: the schedule's row, locked, after checking the caller may change it.
CREATE FUNCTION queue.lock_schedule(schedule_name text) RETURNS queue.schedule_defs
LANGUAGE plpgsql AS $$
DECLARE
    s queue.schedule_defs;
BEGIN
    SELECT * INTO s FROM queue.schedule_defs x WHERE x.name = schedule_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule "%" does not exist', schedule_name USING ERRCODE = 'undefined_object';
    ELSIF NOT pg_has_role(queue.caller(), s.owner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of schedule "%"', schedule_name USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN s;
END
$$;

CREATE FUNCTION queue.alter_schedule(
    name            text,
    cron            text     DEFAULT NULL,
    payload         jsonb    DEFAULT NULL,
    time_zone       text     DEFAULT NULL,
    overlap         text     DEFAULT NULL,
    catch_up        text     DEFAULT NULL,
    catch_up_window interval DEFAULT NULL,
    priority        integer  DEFAULT NULL,
    enabled         boolean  DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s queue.schedule_defs := queue.lock_schedule(name);
BEGIN
    -- Re-enabled: plans of the disabled time are not caught up.
    IF enabled AND NOT s.enabled THEN
        s.last_plan_at := greatest(s.last_plan_at, now());
    END IF;
    s.cron            := coalesce(alter_schedule.cron, s.cron);
    s.payload         := coalesce(alter_schedule.payload, s.payload);
    s.time_zone       := coalesce(alter_schedule.time_zone, s.time_zone);
    s.overlap         := coalesce(alter_schedule.overlap, s.overlap);
    s.catch_up        := coalesce(alter_schedule.catch_up, s.catch_up);
    s.catch_up_window := coalesce(alter_schedule.catch_up_window, s.catch_up_window);
    s.priority        := coalesce(alter_schedule.priority, s.priority);
    s.enabled         := coalesce(alter_schedule.enabled, s.enabled);
    s.next_run_at := queue.check_schedule(s.cron, s.time_zone, s.overlap, s.catch_up,
                                          s.catch_up_window, greatest(s.last_plan_at, now()));
    UPDATE queue.schedule_defs x
       SET cron = s.cron, payload = s.payload, time_zone = s.time_zone, overlap = s.overlap,
           catch_up = s.catch_up, catch_up_window = s.catch_up_window, priority = s.priority,
           enabled = s.enabled, last_plan_at = s.last_plan_at, next_run_at = s.next_run_at
     WHERE x.name = s.name;
END
$$;
COMMENT ON FUNCTION queue.alter_schedule(text, text, jsonb, text, text, text, interval, integer, boolean) IS
    'Changes a schedule; NULL leaves a setting unchanged. enabled => false stops it firing; enabled => true resumes it from now (no catch-up for the disabled time).';

CREATE FUNCTION queue.unschedule(name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s queue.schedule_defs := queue.lock_schedule(name);
BEGIN
    DELETE FROM queue.schedule_defs x WHERE x.name = s.name;
    DELETE FROM queue.schedule_runs r WHERE r.schedule = s.name;
END
$$;
COMMENT ON FUNCTION queue.unschedule(text) IS
    'Removes a schedule. Jobs it already enqueued stay.';

-- schedules: shown to members of their owner, to roles that may read their queue, and to
-- members of pg_monitor (without the payload).
CREATE VIEW queue.schedules WITH (security_barrier) AS
SELECT s.name, s.cron, s.time_zone, s.queue, s.enabled, s.overlap, s.catch_up,
       s.catch_up_window, s.last_fired_at, s.last_job, j.state AS last_job_state,
       CASE WHEN s.enabled THEN s.next_run_at END AS next_run_at,
       CASE WHEN v.full_view THEN s.payload END AS payload, s.owner, r.error AS last_error
  FROM queue.schedule_defs s
  CROSS JOIN LATERAL (
      SELECT pg_catalog.pg_has_role(current_user, s.owner, 'USAGE')
             OR EXISTS (SELECT 1 FROM queue.my_privileges() p WHERE p.queue = s.queue AND p.read)
             AS full_view) v
  LEFT JOIN LATERAL (SELECT a.state FROM queue.all_jobs a
                      WHERE a.id = s.last_job
                        AND (a.finished_at IS NULL
                             OR a.finished_at >= queue.uuid_time(s.last_job) - interval '1 day')) j ON true
  LEFT JOIN LATERAL (SELECT x.error FROM queue.schedule_runs x
                      WHERE x.schedule = s.name ORDER BY x.plan_at DESC LIMIT 1) r ON true
 WHERE v.full_view OR pg_catalog.pg_has_role(current_user, 'pg_monitor', 'USAGE');
COMMENT ON VIEW queue.schedules IS
    'Cron schedules with the plan time and state of their last job, their next run, and the error of their last plan if it could not enqueue.';

-- pg_queue storage. Everything lives in schema `queue` (see pg_queue.control).
--
-- Three kinds of rows, each in a relation whose contents die together (docs/design.md,
-- "Storage"):
--   queue.queues   one row per queue: settings, changed by admins only;
--   queue.jobs     live jobs (waiting, queued, running): small, hot, updated in place;
--   queue.history  terminal jobs (succeeded, failed, cancelled): insert-only, RANGE
--                  partitioned by finish time, pruned by dropping whole partitions.
-- No other row is updated per job.

-- Install script hygiene (pgspot checks this script, pgrx-tests/test_install_script.py):
-- names resolve in pg_catalog (implicitly first), then in our own schema, never in a temp
-- schema or a schema someone else created. pgrx creates its functions unqualified, so
-- `queue` must come first among the explicit schemas. SET LOCAL: CREATE EXTENSION
-- restores the search_path it set for the script, but it would keep a plain SET's value
-- for the rest of the session.
SET LOCAL search_path TO queue, pg_temp;

-- CREATE EXTENSION uses an existing schema `queue` as it is. Its owner could drop or
-- replace anything in it, so it must be a superuser's (the installer's, normally).
DO $$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_namespace n
              JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
             WHERE n.nspname OPERATOR(pg_catalog.=) 'queue') THEN
        RAISE EXCEPTION 'schema "queue" already exists and is not owned by a superuser'
            USING ERRCODE = 'duplicate_schema',
                  HINT = 'Drop it (or make a superuser its owner) before CREATE EXTENSION pg_queue.';
    END IF;
END
$$;

-- job_state: the only state vocabulary. Which process moves a job out of each state is
-- documented in src/state.rs.
CREATE TYPE queue.job_state AS ENUM
    ('waiting', 'queued', 'running', 'succeeded', 'failed', 'cancelled');

-- queues: one row per queue.
CREATE TABLE queue.queues (
    name          text        PRIMARY KEY,
    -- The SQL handler as a schema-qualified signature, e.g. 'public.send_email(jsonb)'.
    -- Stored as text, resolved with ::regprocedure when used: a regprocedure column would
    -- block pg_upgrade (its OIDs are not preserved).
    handler       text,
    notify        boolean     NOT NULL DEFAULT false,
    -- The role that created the queue (queue.caller() in create_queue): its handler runs as it.
    owner         regrole     NOT NULL,
    concurrency   integer     NOT NULL,
    max_attempts  integer     NOT NULL,
    timeout       interval    NOT NULL,
    backoff_base  interval    NOT NULL,
    backoff_max   interval    NOT NULL,
    retention     interval    NOT NULL,               -- how long terminal jobs stay in history
    retention_succeeded interval,                     -- per state; NULL: retention
    retention_failed    interval,
    retention_cancelled interval,
    paused        boolean     NOT NULL DEFAULT false,
    -- search_path pinned while the handler runs (README "Security and privileges").
    search_path   text        NOT NULL DEFAULT '"$user", public',
    -- Limits below the server's (queue.max_payload_size, queue.max_pending_jobs); NULL: the server's.
    max_payload_size integer,
    max_pending_jobs bigint,
    -- Set by the launcher while the queue holds max_pending_jobs live jobs: enqueue refuses.
    is_full       boolean     NOT NULL DEFAULT false,
    -- Flow control (sql/flow.sql): a throttled job cools the whole queue down for
    -- min(throttle_base * 2^n, throttle_max), n = consecutive throttles, reset by a success.
    throttle_base interval    NOT NULL DEFAULT '1 second',
    throttle_max  interval    NOT NULL DEFAULT '5 minutes',
    throttle_count integer    NOT NULL DEFAULT 0,
    throttled_until timestamptz,                      -- no job of the queue starts before
    max_snoozes   integer     NOT NULL DEFAULT 100,   -- per job; the next snooze fails the attempt
    -- At most rate_limit starts per rate_window (src/rate.rs); NULL: no limit.
    rate_limit    integer,
    rate_window   interval,
    -- Fair share (sql/fair.sql): claims rotate across the jobs' fair_keys, at most
    -- key_concurrency running per key.
    fair_share    boolean     NOT NULL DEFAULT false,
    key_concurrency integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queues_name_valid CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}$'),
    CONSTRAINT queues_one_handler CHECK ((handler IS NULL) = notify),
    CONSTRAINT queues_concurrency_positive CHECK (concurrency > 0),
    CONSTRAINT queues_max_attempts_positive CHECK (max_attempts > 0),
    CONSTRAINT queues_timeout_positive CHECK (timeout > interval '0'),
    CONSTRAINT queues_backoff_valid CHECK (backoff_base >= interval '0' AND backoff_max >= backoff_base),
    CONSTRAINT queues_limits_positive CHECK (max_payload_size > 0 IS NOT FALSE AND max_pending_jobs > 0 IS NOT FALSE),
    CONSTRAINT queues_throttle_valid CHECK (throttle_base > interval '0' AND throttle_max >= throttle_base
        AND throttle_count >= 0),
    CONSTRAINT queues_max_snoozes_valid CHECK (max_snoozes >= 0),
    CONSTRAINT queues_key_concurrency_valid CHECK (key_concurrency > 0 IS NOT FALSE
        AND (key_concurrency IS NULL OR fair_share)),
    CONSTRAINT queues_rate_limit_valid CHECK ((rate_limit IS NULL) = (rate_window IS NULL)
        AND rate_limit > 0 IS NOT FALSE AND rate_window > interval '0' IS NOT FALSE),
    CONSTRAINT queues_retention_positive CHECK (retention > interval '0'
        AND retention_succeeded > interval '0' IS NOT FALSE AND retention_failed > interval '0' IS NOT FALSE
        AND retention_cancelled > interval '0' IS NOT FALSE)
);

-- jobs: live jobs only. fillfactor leaves room for in-place (HOT) updates of a job's own
-- row; the partial indexes keep only the rows each reader needs.
CREATE TABLE queue.jobs (
    id                uuid        PRIMARY KEY,          -- UUIDv7: carries its creation time
    queue             text        NOT NULL,
    state             queue.job_state NOT NULL,
    payload           jsonb       NOT NULL,
    enqueued_by       regrole     NOT NULL,             -- who called enqueue (sees and may cancel the job)
    priority          integer     NOT NULL DEFAULT 0,   -- lower runs first
    run_at            timestamptz NOT NULL,
    attempts          integer     NOT NULL DEFAULT 0,   -- counted when claimed, before the handler runs
    max_attempts      integer     NOT NULL,
    timeout           interval,                         -- NULL: the queue's
    created_at        timestamptz NOT NULL,
    started_at        timestamptz,                      -- start of the current attempt
    worker_pid        integer,                          -- pid of the executor (or consumer's backend) running it
    worker_id         uuid,                             -- identity of that executor's life
    consumer          text,                             -- external consumer holding it (NOTIFY queues)
    lease             interval,                         -- the consumer's lease length
    lease_expires_at  timestamptz,                      -- the consumer loses the job after this
    lease_token       uuid,                             -- fences every transition out of running
    errors            jsonb       NOT NULL DEFAULT '[]', -- one object per failed attempt
    unique_key        text,                             -- at most one live job per (queue, unique_key)
    depends_on        uuid[],                           -- jobs that must finish first
    on_dependency_failure text,                         -- 'cancel' or 'run' (with depends_on)
    waiting_for       integer     NOT NULL DEFAULT 0,   -- how many of depends_on have not finished
    progress          jsonb,                            -- a consumer's last heartbeat(progress) this attempt
    snoozes           integer     NOT NULL DEFAULT 0,   -- times it was snoozed (attempts not counted)
    fair_key          text                              -- its share of a fair_share queue ('' for none there)
    -- Its invariants are checked by a row trigger, jobs_invariants, created in sql/jobs.sql
    -- with the C function that checks them (src/state.rs).
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);

-- Claim order within a queue; holds queued jobs only (a claimed job leaves it).
CREATE INDEX jobs_ready_idx ON queue.jobs (queue, priority, run_at, id) WHERE state = 'queued';
-- Jobs that become ready by time (scheduled, or retried after a backoff): idle executors
-- sleep until the next one, the launcher announces them to NOTIFY consumers. A job ready
-- at once (run_at = created_at) is not in it, so a large backlog costs these readers nothing.
-- Its predicate says nothing of state, and its readers test state only inside a CASE: a
-- query that says state = 'queued' could be planned on jobs_ready_idx instead, and was,
-- by some statistics (a walk of every entry a long transaction elsewhere keeps there).
CREATE INDEX jobs_scheduled_idx ON queue.jobs (run_at) WHERE run_at > created_at;
-- Per-queue concurrency, and the reaper once an executor exited. By start time too: an executor counts a queue's
-- running jobs from the oldest start it last saw among them (src/worker/cursors.rs), not
-- past the entries of every job run since a long transaction elsewhere began.
CREATE INDEX jobs_running_idx ON queue.jobs (queue, started_at) WHERE state = 'running';
-- Consumers' leases: the reaper finds the expired ones, the scheduler the next to expire.
-- Jobs that executors run are not in it, so a long transaction elsewhere leaves it small.
-- Keyed on lease_expires_at alone (only a consumer's running job has one): a query that
-- says nothing of state cannot be planned on jobs_running_idx instead.
CREATE INDEX jobs_leases_idx ON queue.jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
-- Unique keys: every row of queue.jobs is live, so this index is the whole guarantee
-- (enqueue inserts with ON CONFLICT DO NOTHING; no check-then-insert race).
CREATE UNIQUE INDEX jobs_unique_key_idx ON queue.jobs (queue, unique_key) WHERE unique_key IS NOT NULL;
-- Fair share: a claim walks the keys with queued jobs (one descent per key, never the
-- backlog), then takes each key's first jobs; running jobs are counted per key. Jobs of
-- other queues (fair_key NULL) are in neither index.
CREATE INDEX jobs_fair_idx ON queue.jobs (queue, fair_key, priority, run_at, id)
    WHERE state = 'queued' AND fair_key IS NOT NULL;
CREATE INDEX jobs_fair_running_idx ON queue.jobs (queue, fair_key)
    WHERE state = 'running' AND fair_key IS NOT NULL;

-- history: terminal jobs, insert-only. A job reaches a terminal state in one statement:
-- WITH d AS (DELETE FROM queue.jobs ... RETURNING *) INSERT INTO queue.history ...
CREATE TABLE queue.history (
    id            uuid        NOT NULL,
    queue         text        NOT NULL,
    state         queue.job_state NOT NULL,
    payload       jsonb       NOT NULL,
    enqueued_by   regrole     NOT NULL,
    priority      integer     NOT NULL,
    run_at        timestamptz NOT NULL,
    attempts      integer     NOT NULL,
    max_attempts  integer     NOT NULL,
    timeout       interval,
    created_at    timestamptz NOT NULL,
    started_at    timestamptz,
    finished_at   timestamptz NOT NULL,
    worker_pid    integer,
    consumer      text,
    result        jsonb,
    errors        jsonb       NOT NULL,
    unique_key    text,
    depends_on    uuid[],
    on_dependency_failure text,
    progress      jsonb,                                -- the last attempt's last progress report
    snoozes       integer     NOT NULL DEFAULT 0,
    fair_key      text,
    CONSTRAINT history_terminal_state CHECK (state IN ('succeeded', 'failed', 'cancelled')),
    CONSTRAINT history_attempts_in_range CHECK (attempts >= 0 AND attempts <= max_attempts),
    CONSTRAINT history_finished_after_created CHECK (finished_at >= created_at)
) PARTITION BY RANGE (finished_at);

CREATE INDEX history_id_idx ON queue.history (id);
CREATE INDEX history_queue_idx ON queue.history (queue, finished_at);
-- unique_for: the latest success of a key.
CREATE INDEX history_unique_key_idx ON queue.history (queue, unique_key, finished_at)
    WHERE unique_key IS NOT NULL;

-- Catches rows no daily partition covers (e.g. the launcher was down for days); retention
-- empties it with batched deletes.
CREATE TABLE queue.history_default PARTITION OF queue.history DEFAULT;

-- uuid_time: the creation time a UUIDv7 carries (its first 48 bits, Unix milliseconds).
-- A job finishes after it was created, so status() prunes history partitions with it.
CREATE FUNCTION queue.uuid_time(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT pg_catalog.to_timestamp(
        ('x' OPERATOR(pg_catalog.||) pg_catalog.substr(pg_catalog.replace(id::pg_catalog.text, '-', ''), 1, 12))
            ::pg_catalog.bit(48)::pg_catalog.int8::pg_catalog.float8 OPERATOR(pg_catalog./) 1000)
$$;
COMMENT ON FUNCTION queue.uuid_time(uuid) IS
    'The creation time carried by a UUIDv7 job id.';

-- create_history_partitions: daily partitions of queue.history from today up to `days_ahead`
-- days ahead (UTC days). Run at CREATE EXTENSION and by the launcher, so an insert never
-- lacks one. A day whose rows already went to the default partition is skipped: those rows
-- stay there until retention removes them.
CREATE FUNCTION queue.create_history_partitions(days_ahead integer DEFAULT 3)
RETURNS integer LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    day date;
    part text;
    made integer := 0;
BEGIN
    IF days_ahead IS NULL OR days_ahead < 0 OR days_ahead > 366 THEN
        RAISE EXCEPTION 'days_ahead must be between 0 and 366, not %', days_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0 .. days_ahead LOOP
        day := (now() AT TIME ZONE 'UTC')::date + i;
        part := 'history_' || to_char(day, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(format('queue.%I', part)) IS NOT NULL;
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM queue.history_default
            WHERE finished_at >= day::timestamp AT TIME ZONE 'UTC'
              AND finished_at < (day + 1)::timestamp AT TIME ZONE 'UTC');
        EXECUTE format(
            'CREATE TABLE queue.%I PARTITION OF queue.history FOR VALUES FROM (%L) TO (%L)',
            part, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
        -- A member of the extension like those CREATE EXTENSION made, so that pg_dump
        -- leaves it to CREATE EXTENSION on restore rather than dumping it as a user table.
        IF NOT EXISTS (SELECT 1 FROM pg_depend WHERE classid = 'pg_class'::regclass
                          AND objid = format('queue.%I', part)::regclass AND deptype = 'e') THEN
            EXECUTE format('ALTER EXTENSION pg_queue ADD TABLE queue.%I', part);
        END IF;
        made := made + 1;
    END LOOP;
    RETURN made;
END
$$;
COMMENT ON FUNCTION queue.create_history_partitions(integer) IS
    'Creates the daily history partitions from today to days_ahead days ahead; returns how many it made.';

SELECT queue.create_history_partitions();

-- pg_dump keeps queue definitions and live jobs (the extension's own rows would otherwise
-- be left out of a dump). History is not dumped: it is a log, kept by retention.
SELECT pg_catalog.pg_extension_config_dump('queue.queues', '');
SELECT pg_catalog.pg_extension_config_dump('queue.jobs', '');

#!/usr/bin/env bash
# The demo: builds and installs pg_queue, starts a throwaway Postgres with the extension
# preloaded, creates a queue whose SQL handler "sends" e-mails, enqueues jobs (one that
# fails twice before it succeeds), and shows them processed. Removes the cluster at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

PG_BIN=/usr/lib/postgresql/15/bin
echo "== building and installing pg_queue (release)"
if [ "$(id -u)" -eq 0 ]; then
    cargo pgrx install --release --pg-config "$PG_BIN/pg_config" >/dev/null
else
    cargo pgrx install --release --sudo --pg-config "$PG_BIN/pg_config" >/dev/null
fi

source scripts/throwaway-cluster.sh

psql <<'SQL'
\echo == CREATE EXTENSION, a table, a handler and a queue
CREATE EXTENSION pg_queue;
CREATE TABLE emails_sent (recipient text, attempt int, sent_at timestamptz DEFAULT clock_timestamp());
CREATE PROCEDURE send_email(payload jsonb) LANGUAGE plpgsql AS $$
DECLARE
    job record := (SELECT j FROM queue.current_job() j);
BEGIN
    IF payload->>'to' = 'flaky@example.com' AND job.attempt < 3 THEN
        RAISE EXCEPTION 'mail server busy (attempt %)', job.attempt;
    END IF;
    INSERT INTO emails_sent (recipient, attempt) VALUES (payload->>'to', job.attempt);
END
$$;
-- concurrency 10000: more than the executors can hold, so claims need no lock.
SELECT queue.create_queue('emails', 'send_email(jsonb)', backoff_base => '100 ms', concurrency => 10000);

\echo == a cron schedule: a job every second on another queue
CREATE TABLE ticks (at timestamptz DEFAULT clock_timestamp());
CREATE PROCEDURE tick(payload jsonb) LANGUAGE sql AS $$ INSERT INTO public.ticks DEFAULT VALUES $$;
SELECT queue.create_queue('ticks', 'tick(jsonb)');
SELECT queue.schedule('tick', '@every 1s', 'ticks');

\echo == enqueue: one job, a flaky one, and 10000 in one call
SELECT queue.enqueue('emails', '{"to": "alice@example.com"}') AS job_id \gset
SELECT queue.enqueue('emails', '{"to": "flaky@example.com"}') AS flaky_id \gset
SELECT count(*) AS enqueued FROM queue.enqueue_many('emails',
    ARRAY(SELECT jsonb_build_object('to', 'user' || i || '@example.com') FROM generate_series(1, 10000) i));
SQL

echo "== waiting for the executors"
for _ in $(seq 1 600); do
    live=$(psql -tA -c "SELECT count(*) FROM queue.jobs WHERE queue = 'emails'")
    [ "$live" = "0" ] && break
    sleep 0.1
done

psql <<'SQL'
\echo == outcome by state
SELECT state, count(*), max(attempts) AS max_attempts FROM queue.history WHERE queue = 'emails' GROUP BY state;
\echo == the flaky job: succeeded on attempt 3, with the two errors recorded
SELECT s.state, s.attempts, jsonb_path_query_array(s.errors, '$[*].message') AS errors
  FROM queue.history h, queue.status(h.id) s
 WHERE h.queue = 'emails' AND h.payload->>'to' = 'flaky@example.com';
\echo == rows written by the handler (exactly one per job) and the drain rate
SELECT count(*) AS emails_sent, count(DISTINCT recipient) AS distinct_recipients,
       round(count(*) / nullif(extract(epoch FROM max(sent_at) - min(sent_at)), 0)) AS jobs_per_second
  FROM emails_sent;
\echo == the schedule: fired once per second meanwhile
SELECT name, cron, last_fired_at, last_job_state, next_run_at FROM queue.schedules;
SELECT count(*) AS plans_fired, count(job) AS jobs, (SELECT count(*) FROM ticks) AS ticks_run
  FROM queue.schedule_runs;
\echo == a NOTIFY queue: jobs for an external consumer, claimed and completed over SQL
SELECT queue.create_queue('webhooks', notify => true);
SELECT queue.enqueue('webhooks', '{"url": "https://example.com/hook"}') AS hook_id \gset
SELECT c.attempt, c.lease_expires_at > now() AS leased,
       queue.complete(c.id, c.lease_token, '{"status": 200}') AS completed
  FROM queue.claim('webhooks', 'demo-psql', lease => '30 seconds') c;
SELECT state, consumer, result FROM queue.status(:'hook_id');
\echo == the workers: in-database executors and external consumers
SELECT kind, name, pid, jobs FROM queue.workers ORDER BY kind, name;
SQL
echo "== done; the cluster is removed"

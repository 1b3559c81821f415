-- Privileges, last of the install script (README "Security and privileges").
--
-- PUBLIC gets nothing: no USAGE on schema queue, so no function nor view is reachable.
-- `GRANT USAGE ON SCHEMA queue TO role` is the one gesture that opens the API to a role;
-- the API functions' EXECUTE stays with PUBLIC for that reason, and each of them checks
-- the caller's privileges on the queue it touches. Internal functions, the tables and
-- the unfiltered view queue.all_jobs belong to the extension owner alone: every write goes
-- through the API.

REVOKE ALL ON SCHEMA queue FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA queue FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA queue FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA queue FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA queue FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
    -- queues and privileges
    queue.create_queue, queue.alter_queue, queue.drop_queue, queue.pause, queue.resume,
    queue."grant", queue.revoke, queue.my_privileges,
    -- jobs
    queue.enqueue, queue.enqueue_unique, queue.enqueue_many, queue.dependency_results,
    queue.cancel, queue.status, queue.retry, queue.purge, queue.current_job, queue.set_progress,
    -- external consumers
    queue.claim(text, text, integer, interval), queue.claim(text[], text, integer, interval),
    queue.heartbeat, queue.complete, queue.fail, queue.channel,
    -- flow control
    queue.snooze(interval), queue.snooze(uuid, uuid, interval),
    queue.throttle(interval), queue.throttle(uuid, uuid, interval), queue.rate_wait,
    -- schedules
    queue.schedule, queue.alter_schedule, queue.unschedule, queue.cron_next,
    -- monitoring
    queue.prometheus_metrics, queue.history_outcomes, queue.stats_rows,
    -- pure helpers, and what the views call
    queue.backoff, queue.uuid_generate_v7, queue.uuid_time, queue.job_transitions,
    queue.executors, queue.job_progress
TO PUBLIC;

-- Each view shows only what the current role may see (their filters are security barriers).
GRANT SELECT ON queue.job_status, queue.stats, queue.metrics, queue.workers, queue.schedules, queue.grants TO PUBLIC;

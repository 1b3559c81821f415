//! In-database tests of the SQL API (`cargo pgrx test`). Each runs in a transaction that is
//! rolled back, so workers never see these jobs: worker behaviour is tested by the
//! real-cluster suite in pgrx-tests/.

use pgrx::prelude::*;

// Test helpers, installed only in the pg_test build of the extension.
extension_sql!(
    r#"
CREATE SCHEMA IF NOT EXISTS tests;
-- sqlstate_of: runs a statement; returns the SQLSTATE it raised, or NULL. Its effects are
-- rolled back either way (EXCEPTION blocks are subtransactions).
CREATE FUNCTION tests.sqlstate_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RAISE EXCEPTION 'no error' USING ERRCODE = 'QT000';  -- not P0004: OTHERS skips assert_failure
EXCEPTION WHEN OTHERS THEN
    RETURN nullif(SQLSTATE, 'QT000');
END
$$;
-- error_of: the same, as SQLSTATE and message.
CREATE FUNCTION tests.error_of(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE stmt;
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ' ' || SQLERRM;
END
$$;
CREATE PROCEDURE tests.noop(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE FUNCTION tests.two_args(payload jsonb, x int) RETURNS void LANGUAGE sql AS $$ SELECT $$;
CREATE FUNCTION tests.text_arg(payload text) RETURNS void LANGUAGE sql AS $$ SELECT $$;
"#,
    name = "test_helpers"
);

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).expect("query failed")
    }

    fn sqlstate(stmt: &str) -> Option<String> {
        one::<String>(&format!(
            "SELECT tests.sqlstate_of({})",
            pgrx::spi::quote_literal(stmt)
        ))
    }

    fn create(name: &str) {
        Spi::run(&format!(
            "SELECT queue.create_queue({}, 'tests.noop(jsonb)')",
            pgrx::spi::quote_literal(name)
        ))
        .expect("create_queue");
    }

    fn count(sql: &str) -> i64 {
        one::<i64>(sql).unwrap_or(-1)
    }

    #[pg_test]
    fn create_queue_applies_defaults() {
        create("defaults");
        let row = Spi::get_three::<String, i32, i32>(
            "SELECT handler || ' ' || owner::text || ' ' || timeout::text || ' ' || retention::text,
                    concurrency, max_attempts
               FROM queue.queues WHERE name = 'defaults'",
        )
        .unwrap();
        let who = one::<String>("SELECT current_user::text").unwrap();
        assert_eq!(
            row.0.unwrap(),
            format!("tests.noop(jsonb) {who} 00:05:00 7 days")
        );
        assert_eq!((row.1, row.2), (Some(10), Some(5)));
        assert_eq!(
            one::<bool>("SELECT paused FROM queue.queues WHERE name = 'defaults'"),
            Some(false)
        );
    }

    #[pg_test]
    fn create_queue_rejects_bad_input_with_sqlstates() {
        create("dup");
        let cases = [
            ("SELECT queue.create_queue(NULL, 'tests.noop(jsonb)')", "22023"),
            ("SELECT queue.create_queue('has space', 'tests.noop(jsonb)')", "22023"),
            ("SELECT queue.create_queue('', 'tests.noop(jsonb)')", "22023"),
            ("SELECT queue.create_queue('dup', 'tests.noop(jsonb)')", "42710"),
            ("SELECT queue.create_queue('x')", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', notify => true)", "22023"),
            ("SELECT queue.create_queue('x', 'tests.two_args(jsonb, int)')", "22023"),
            ("SELECT queue.create_queue('x', 'tests.text_arg(text)')", "22023"),
            ("SELECT queue.create_queue('x', 'tests.missing(jsonb)')", "42883"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', concurrency => 0)", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', concurrency => NULL)", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', max_attempts => -1)", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', timeout => '0')", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', timeout => '-1 s')", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', backoff_base => '-1 s')", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', backoff_base => '1 min', backoff_max => '1 s')", "22023"),
            ("SELECT queue.create_queue('x', 'tests.noop(jsonb)', retention => '0')", "22023"),
        ];
        for (stmt, want) in cases {
            assert_eq!(sqlstate(stmt).as_deref(), Some(want), "{stmt}");
        }
        // Nothing was created by the failed calls.
        assert_eq!(
            count("SELECT count(*) FROM queue.queues WHERE name <> 'dup'"),
            0
        );
    }

    #[pg_test]
    fn create_queue_accepts_functions_and_notify_queues() {
        Spi::run("CREATE FUNCTION tests.f(payload jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT payload $$")
            .unwrap();
        Spi::run("SELECT queue.create_queue('fn', 'tests.f(jsonb)')").unwrap();
        Spi::run("SELECT queue.create_queue('ext', notify => true)").unwrap();
        assert_eq!(
            count("SELECT count(*) FROM queue.queues WHERE name IN ('fn', 'ext')"),
            2
        );
    }

    #[pg_test]
    fn enqueue_defaults_and_status() {
        create("eq");
        Spi::run("SELECT queue.alter_queue('eq', max_attempts => 7)").unwrap();
        let id = one::<pgrx::Uuid>("SELECT queue.enqueue('eq', '{\"a\": 1}')").unwrap();
        let q = format!("SELECT {{}} FROM queue.status('{id}')");
        let get = |col: &str| one::<String>(&q.replace("{}", col));
        assert_eq!(get("state::text").as_deref(), Some("queued"));
        assert_eq!(get("scheduled::text").as_deref(), Some("false"));
        assert_eq!(
            get("attempts || '/' || max_attempts").as_deref(),
            Some("0/7")
        );
        assert_eq!(get("payload::text").as_deref(), Some("{\"a\": 1}"));
        assert_eq!(get("(run_at = now())::text").as_deref(), Some("true"));
        assert_eq!(get("queue").as_deref(), Some("eq"));
        // The id is a UUIDv7 carrying its creation time.
        assert_eq!(
            one::<bool>(&format!(
                "SELECT abs(extract(epoch FROM queue.uuid_time('{id}') - clock_timestamp())) < 60"
            )),
            Some(true)
        );
    }

    #[pg_test]
    fn enqueue_options() {
        create("opts");
        let id = one::<pgrx::Uuid>(
            "SELECT queue.enqueue('opts', '{}', run_at => now() + interval '1 hour',
                                  priority => -5, max_attempts => 2, timeout => '3 s')",
        )
        .unwrap();
        let row = one::<String>(&format!(
            "SELECT scheduled || ' ' || priority || ' ' || max_attempts
               FROM queue.status('{id}')"
        ));
        assert_eq!(row.as_deref(), Some("true -5 2"));
        assert_eq!(
            one::<String>(&format!(
                "SELECT timeout::text FROM queue.jobs WHERE id = '{id}'"
            ))
            .as_deref(),
            Some("00:00:03")
        );
    }

    #[pg_test]
    fn enqueue_rejects_bad_input_and_changes_nothing() {
        create("bad");
        let cases = [
            ("SELECT queue.enqueue('nope', '{}')", "42704"),
            ("SELECT queue.enqueue(NULL, '{}')", "22004"),
            ("SELECT queue.enqueue('bad', NULL)", "22004"),
            (
                "SELECT queue.enqueue('bad', '{}', priority => NULL)",
                "22004",
            ),
            (
                "SELECT queue.enqueue('bad', '{}', max_attempts => 0)",
                "22023",
            ),
            (
                "SELECT queue.enqueue('bad', '{}', timeout => '-1 s')",
                "22023",
            ),
            ("SELECT queue.enqueue('bad', 'not json')", "22P02"),
            (
                "SELECT queue.enqueue_many('nope', ARRAY['{}'::jsonb])",
                "42704",
            ),
            ("SELECT queue.enqueue_many('bad', NULL)", "22004"),
            (
                "SELECT queue.enqueue_many('bad', ARRAY['{}'::jsonb, NULL])",
                "22004",
            ),
            (
                "SELECT queue.enqueue_many('bad', ARRAY['{}'::jsonb], max_attempts => 0)",
                "22023",
            ),
        ];
        for (stmt, want) in cases {
            assert_eq!(sqlstate(stmt).as_deref(), Some(want), "{stmt}");
        }
        assert_eq!(count("SELECT count(*) FROM queue.jobs"), 0);
    }

    #[pg_test]
    fn enqueue_many_returns_ids_in_payload_order() {
        create("many");
        let ids = one::<Vec<pgrx::Uuid>>(
            "SELECT array_agg(id) FROM queue.enqueue_many('many',
                 ARRAY(SELECT jsonb_build_object('n', i) FROM generate_series(1, 100) i)) id",
        )
        .unwrap();
        assert_eq!(ids.len(), 100);
        let in_order = one::<bool>(
            "SELECT bool_and((payload ->> 'n')::int = ord)
               FROM (SELECT j.payload, row_number() OVER (ORDER BY j.id) AS ord
                       FROM queue.jobs j WHERE queue = 'many') s",
        );
        assert_eq!(in_order, Some(true));
        assert_eq!(
            count("SELECT count(*) FROM queue.enqueue_many('many', '{}'::jsonb[])"),
            0
        );
    }

    #[pg_test]
    fn cancel_moves_queued_jobs_to_history() {
        create("c");
        let id = one::<pgrx::Uuid>("SELECT queue.enqueue('c')").unwrap();
        assert_eq!(
            one::<bool>(&format!("SELECT queue.cancel('{id}')")),
            Some(true)
        );
        assert_eq!(
            one::<String>(&format!("SELECT state::text FROM queue.status('{id}')")).as_deref(),
            Some("cancelled")
        );
        assert_eq!(count("SELECT count(*) FROM queue.jobs"), 0);
        assert_eq!(
            one::<bool>(&format!("SELECT queue.cancel('{id}')")),
            Some(false)
        );
        assert_eq!(
            sqlstate("SELECT queue.cancel('018f0000-0000-7000-8000-000000000000')").as_deref(),
            Some("42704")
        );
        assert_eq!(
            sqlstate("SELECT queue.cancel(NULL)").as_deref(),
            Some("22004")
        );
    }

    #[pg_test]
    fn retry_requeues_cancelled_jobs() {
        create("r");
        let id = one::<pgrx::Uuid>("SELECT queue.enqueue('r')").unwrap();
        assert_eq!(
            one::<bool>(&format!("SELECT queue.retry('{id}')")),
            Some(false)
        ); // live
        Spi::run(&format!("SELECT queue.cancel('{id}')")).unwrap();
        assert_eq!(
            one::<bool>(&format!("SELECT queue.retry('{id}')")),
            Some(true)
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ' ' || attempts FROM queue.status('{id}')"
            ))
            .as_deref(),
            Some("queued 0")
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM queue.history WHERE id = '{id}'"
            )),
            0
        );
        assert_eq!(
            sqlstate("SELECT queue.retry('018f0000-0000-7000-8000-000000000000')").as_deref(),
            Some("42704")
        );
    }

    #[pg_test]
    fn status_of_unknown_job_is_no_row() {
        assert_eq!(
            count("SELECT count(*) FROM queue.status('018f0000-0000-7000-8000-000000000000')"),
            0
        );
    }

    #[pg_test]
    fn pause_resume_alter_drop() {
        create("adm");
        Spi::run("SELECT queue.pause('adm')").unwrap();
        assert_eq!(
            one::<bool>("SELECT paused FROM queue.queues WHERE name = 'adm'"),
            Some(true)
        );
        Spi::run("SELECT queue.resume('adm')").unwrap();
        assert_eq!(
            one::<bool>("SELECT paused FROM queue.queues WHERE name = 'adm'"),
            Some(false)
        );
        Spi::run("SELECT queue.alter_queue('adm', concurrency => 3, timeout => '1 min')").unwrap();
        assert_eq!(
            one::<String>(
                "SELECT concurrency || ' ' || timeout FROM queue.queues WHERE name = 'adm'"
            )
            .as_deref(),
            Some("3 00:01:00")
        );
        let cases = [
            ("SELECT queue.pause('nope')", "42704"),
            ("SELECT queue.resume('nope')", "42704"),
            ("SELECT queue.pause(NULL)", "22004"),
            (
                "SELECT queue.alter_queue('nope', concurrency => 1)",
                "42704",
            ),
            ("SELECT queue.alter_queue('adm', concurrency => 0)", "22023"),
            (
                "SELECT queue.alter_queue('adm', handler => 'tests.text_arg(text)')",
                "22023",
            ),
            ("SELECT queue.drop_queue('nope')", "42704"),
        ];
        for (stmt, want) in cases {
            assert_eq!(sqlstate(stmt).as_deref(), Some(want), "{stmt}");
        }
        assert_eq!(
            one::<i32>("SELECT concurrency FROM queue.queues WHERE name = 'adm'"),
            Some(3)
        );

        Spi::run("SELECT queue.enqueue('adm')").unwrap();
        assert_eq!(
            sqlstate("SELECT queue.drop_queue('adm')").as_deref(),
            Some("55006")
        );
        Spi::run("SELECT queue.drop_queue('adm', force => true)").unwrap();
        assert_eq!(
            count("SELECT count(*) FROM queue.queues WHERE name = 'adm'"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM queue.history WHERE queue = 'adm' AND state = 'cancelled'"),
            1
        );
    }

    #[pg_test]
    fn backoff_is_exponential_jittered_and_capped() {
        let within = |attempt: i32, lo: f64, hi: f64| {
            one::<bool>(&format!(
                "SELECT bool_and(d BETWEEN interval '{lo} s' AND interval '{hi} s')
                   FROM (SELECT queue.backoff('1 s', '1 h', {attempt}) d FROM generate_series(1, 200)) s"
            ))
        };
        assert_eq!(within(1, 0.5, 1.0), Some(true));
        assert_eq!(within(4, 4.0, 8.0), Some(true));
        assert_eq!(within(40, 1800.0, 3600.0), Some(true));
    }

    #[pg_test]
    fn uuid_v7_ids_increase() {
        assert_eq!(
            one::<bool>(
                "SELECT bool_and(a < b) FROM (
                   SELECT id AS a, lead(id) OVER (ORDER BY n) AS b
                     FROM (SELECT n, queue.uuid_generate_v7() id FROM generate_series(1, 1000) n) s) t
                  WHERE b IS NOT NULL"
            ),
            Some(true)
        );
    }

    /// enqueue's C fast path and queue.enqueue_sql, which takes any option, write the same
    /// job (an option equal to the queue's default sends a call to the PL/pgSQL path).
    #[pg_test]
    fn enqueue_fast_and_general_paths_write_the_same_job() {
        create("paths");
        // Counts the calls that reach the PL/pgSQL path (this transaction's, see below).
        Spi::run("SET LOCAL track_functions = 'all'").expect("track_functions");
        let same = |queue: &str, args: &str| {
            let (fast, general) = (
                format!("SELECT queue.enqueue('{queue}', {args})"),
                format!("SELECT queue.enqueue('{queue}', {args}, max_attempts => 5)"),
            );
            Spi::run(&fast).expect("fast path");
            Spi::run(&general).expect("general path");
            let rows = Spi::get_two::<i64, i64>(&format!(
                "SELECT count(*), count(DISTINCT to_jsonb(j) - 'id')
                   FROM queue.jobs j WHERE queue = '{queue}'"
            ))
            .expect("rows");
            assert_eq!(rows, (Some(2), Some(1)), "{args}");
            Spi::run(&format!("DELETE FROM queue.jobs WHERE queue = '{queue}'")).expect("delete");
        };
        same("paths", "'{\"a\": 1}'");
        same(
            "paths",
            "'{}', priority => 3, fair_key => 'k', run_at => now() + interval '1 hour'",
        );
        Spi::run("SELECT queue.alter_queue('paths', fair_share => true, max_attempts => 5)")
            .expect("alter");
        same("paths", "'[1, 2]'");
        same("paths", "'{}', fair_key => 'tenant'");
        // A role granted enqueue takes the fast path too; one without a grant is refused
        // (by the PL/pgSQL path, which raises every error).
        Spi::run(
            "CREATE ROLE pq_paths_grantee; CREATE ROLE pq_paths_stranger;
             GRANT USAGE ON SCHEMA queue TO pq_paths_grantee, pq_paths_stranger;
             SELECT queue.grant('paths', 'pq_paths_grantee', '{enqueue}');
             SET LOCAL ROLE pq_paths_grantee;
             SELECT queue.enqueue('paths', '{}');
             RESET ROLE",
        )
        .expect("a grantee enqueues");
        assert_eq!(
            count("SELECT count(*) FROM queue.jobs WHERE queue = 'paths' AND enqueued_by = 'pq_paths_grantee'::regrole"),
            1
        );
        assert_eq!(
            sqlstate("SET LOCAL ROLE pq_paths_stranger; SELECT queue.enqueue('paths', '{}')")
                .as_deref(),
            Some("42501")
        );
        Spi::run("RESET ROLE").expect("reset role");
        // Only the four calls with an option went to PL/pgSQL (and the stranger's, which
        // raised before its call was counted): the others took the fast path.
        assert_eq!(
            count(
                "SELECT pg_stat_get_xact_function_calls('queue.enqueue_sql(text, jsonb, timestamptz,
                    integer, integer, interval, text, interval, uuid[], text, text)'::regprocedure)"
            ),
            4
        );
    }

    #[pg_test]
    fn state_machine_and_table_invariants() {
        assert_eq!(count("SELECT count(*) FROM queue.job_transitions()"), 12);
        assert_eq!(
            count("SELECT count(*) FROM queue.job_transitions() WHERE from_state = 'succeeded'"),
            0
        );
        create("inv");
        // The invariants (a row trigger, src/state.rs) hold even against direct writes, and
        // the error names the one broken.
        let insert = |cols: &str, vals: &str| {
            format!(
                "INSERT INTO queue.jobs (id, queue, payload, enqueued_by, run_at, created_at, {cols})
                 VALUES (gen_random_uuid(), 'inv', '{{}}', 10, now(), now(), {vals})"
            )
        };
        let running = "state, attempts, max_attempts, started_at, lease_token";
        let cases = [
            (insert("state, max_attempts", "'succeeded', 1"), "jobs_live_state"),
            (insert("state, max_attempts", "'running', 1"), "jobs_running_has_owner"),
            (insert("state, attempts, max_attempts", "'queued', 2, 1"), "jobs_attempts_in_range"),
            (insert("state, max_attempts", "'queued', 0"), "jobs_max_attempts_positive"),
            (insert("state, max_attempts", "'waiting', 1"), "jobs_waiting_for_dependencies"),
            (
                insert("state, max_attempts, waiting_for", "'queued', 1, 1"),
                "jobs_waiting_for_dependencies",
            ),
            (
                insert("state, max_attempts, on_dependency_failure", "'queued', 1, 'skip'"),
                "jobs_dependency_failure_valid",
            ),
            (insert("state, max_attempts, timeout", "'queued', 1, '0s'"), "jobs_timeout_positive"),
            (
                insert(
                    &format!("{running}, worker_id, consumer, lease, lease_expires_at"),
                    "'running', 1, 1, now(), gen_random_uuid(), gen_random_uuid(), 'c', '1m', now()",
                ),
                "jobs_one_owner",
            ),
            (
                insert(&format!("{running}, consumer"), "'running', 1, 1, now(), gen_random_uuid(), 'c'"),
                "jobs_consumer_has_lease",
            ),
            (
                insert("state, max_attempts, consumer, lease, lease_expires_at", "'queued', 1, 'c', '1m', now()"),
                "jobs_consumer_has_lease",
            ),
        ];
        for (stmt, invariant) in &cases {
            let error = one::<String>(&format!(
                "SELECT tests.error_of({})",
                pgrx::spi::quote_literal(stmt)
            ));
            let error = error.unwrap_or_default();
            assert!(
                error.starts_with("23514 ") && error.contains(&format!("\"{invariant}\"")),
                "{stmt}: {error}"
            );
        }
        // Updates too, and a valid row passes.
        Spi::run(&insert("state, max_attempts", "'queued', 1")).expect("a valid job");
        assert_eq!(
            sqlstate("UPDATE queue.jobs SET attempts = 5 WHERE queue = 'inv'").as_deref(),
            Some("23514")
        );
        assert_eq!(
            count("SELECT count(*) FROM queue.jobs WHERE queue = 'inv' AND attempts = 0"),
            1
        );
        // A timeout of months counts as positive.
        Spi::run(&insert(
            "state, max_attempts, timeout",
            "'queued', 1, '1 mon'",
        ))
        .expect("a job with a timeout of a month");
        // The function refuses to run where there is no row to check (it would read none).
        Spi::run(
            "CREATE TABLE tests.inv_stmt (i int);
             CREATE TRIGGER inv_stmt AFTER INSERT ON tests.inv_stmt
                 FOR EACH STATEMENT EXECUTE FUNCTION queue.jobs_invariants()",
        )
        .expect("a statement trigger");
        assert_eq!(
            sqlstate("INSERT INTO tests.inv_stmt VALUES (1)").as_deref(),
            Some("39P01")
        );
    }

    #[pg_test]
    fn current_job_is_empty_outside_handlers() {
        assert_eq!(count("SELECT count(*) FROM queue.current_job()"), 0);
    }

    #[pg_test]
    fn history_partitions_exist_ahead() {
        assert!(
            count(
                "SELECT count(*) FROM pg_inherits
                  WHERE inhparent = 'queue.history'::regclass
                    AND inhrelid::regclass::text LIKE 'queue.history_2%'"
            ) >= 4
        );
        assert_eq!(
            sqlstate("SELECT queue.create_history_partitions(-1)").as_deref(),
            Some("22023")
        );
    }

    // ---- External consumers (sql/consumers.sql) ----

    fn notify_queue(name: &str, settings: &str) {
        Spi::run(&format!(
            "SELECT queue.create_queue({}, notify => true{settings})",
            pgrx::spi::quote_literal(name)
        ))
        .expect("create_queue");
    }

    /// Claims one job of `queue` for `consumer`; returns its id and lease token.
    fn claim_one(queue: &str, consumer: &str, lease: &str) -> (pgrx::Uuid, pgrx::Uuid) {
        let (id, token) = Spi::get_two::<pgrx::Uuid, pgrx::Uuid>(&format!(
            "SELECT id, lease_token FROM queue.claim({}, {}, 1, {})",
            pgrx::spi::quote_literal(queue),
            pgrx::spi::quote_literal(consumer),
            pgrx::spi::quote_literal(lease)
        ))
        .expect("claim");
        (id.expect("a job"), token.expect("a token"))
    }

    fn call_bool(sql: &str, id: pgrx::Uuid, token: pgrx::Uuid) -> bool {
        let sql = sql
            .replace("$id", &format!("'{id}'::uuid"))
            .replace("$token", &format!("'{token}'::uuid"));
        one::<bool>(&sql).expect("a boolean")
    }

    #[pg_test]
    fn claim_rejects_bad_input_and_changes_nothing() {
        create("inside");
        notify_queue("ext", "");
        Spi::run("SELECT queue.enqueue('ext')").unwrap();
        let cases = [
            ("SELECT queue.claim('inside', 'c')", "42809"),
            ("SELECT queue.claim('nope', 'c')", "42704"),
            ("SELECT queue.claim(NULL, 'c')", "22004"),
            ("SELECT queue.claim('ext', NULL)", "22023"),
            ("SELECT queue.claim('ext', '')", "22023"),
            ("SELECT queue.claim('ext', repeat('x', 129))", "22023"),
            ("SELECT queue.claim('ext', 'c', 0)", "22023"),
            ("SELECT queue.claim('ext', 'c', NULL)", "22023"),
            ("SELECT queue.claim('ext', 'c', 1001)", "22023"),
            ("SELECT queue.claim('ext', 'c', 1, '0')", "22023"),
            ("SELECT queue.claim('ext', 'c', 1, '2 days')", "22023"),
            ("SELECT queue.claim('ext', 'c', 1, NULL)", "22004"),
            ("SELECT queue.heartbeat(NULL, gen_random_uuid())", "22004"),
            ("SELECT queue.heartbeat(gen_random_uuid(), NULL)", "22004"),
            (
                "SELECT queue.heartbeat(gen_random_uuid(), gen_random_uuid(), '10 ms')",
                "22023",
            ),
            ("SELECT queue.complete(NULL, gen_random_uuid())", "22004"),
            (
                "SELECT queue.fail(gen_random_uuid(), gen_random_uuid(), NULL)",
                "22004",
            ),
            (
                "SELECT queue.fail(gen_random_uuid(), gen_random_uuid(), 'x', '-1 s')",
                "22023",
            ),
        ];
        for (stmt, code) in cases {
            assert_eq!(sqlstate(stmt).as_deref(), Some(code), "{stmt}");
        }
        assert_eq!(
            count("SELECT count(*) FROM queue.jobs WHERE state = 'queued' AND attempts = 0"),
            1
        );
        assert_eq!(count("SELECT count(*) FROM queue.consumers"), 0);
        // Unknown jobs and tokens are not errors: the lease is simply not held.
        assert!(
            !one::<bool>("SELECT queue.complete(gen_random_uuid(), gen_random_uuid())").unwrap()
        );
    }

    #[pg_test]
    fn claim_takes_ready_jobs_in_order_with_leases() {
        notify_queue("ext", "");
        Spi::run("SELECT queue.enqueue('ext', '{\"n\": 1}', priority => 5)").unwrap();
        Spi::run("SELECT queue.enqueue('ext', '{\"n\": 2}', priority => 1)").unwrap();
        Spi::run("SELECT queue.enqueue('ext', '{\"n\": 3}', run_at => now() + interval '1 hour')")
            .unwrap();
        let got = one::<String>(
            "SELECT string_agg(payload->>'n' || ':' || attempt || ':' ||
                               (lease_expires_at - clock_timestamp() BETWEEN '9 s' AND '10 s'), ','
                               ORDER BY payload->>'n' DESC)
               FROM queue.claim('ext', 'c1', 10, '10 seconds')",
        );
        assert_eq!(got.as_deref(), Some("2:1:true,1:1:true"));
        assert_eq!(
            count(
                "SELECT count(*) FROM queue.jobs WHERE state = 'running' AND consumer = 'c1'
                      AND worker_pid = pg_backend_pid() AND lease = '10 s'"
            ),
            2
        );
        assert_eq!(
            one::<String>("SELECT kind || ' ' || name || ' ' || jobs FROM queue.workers WHERE kind = 'consumer'")
                .as_deref(),
            Some("consumer c1 2")
        );
        // Nothing else is ready.
        assert_eq!(
            count("SELECT count(*) FROM queue.claim('ext', 'c2', 10)"),
            0
        );
    }

    #[pg_test]
    fn claim_respects_concurrency_and_pause() {
        notify_queue("ext", ", concurrency => 2");
        Spi::run("SELECT queue.enqueue_many('ext', array_fill('{}'::jsonb, ARRAY[5]))").unwrap();
        assert_eq!(count("SELECT count(*) FROM queue.claim('ext', 'c', 5)"), 2);
        assert_eq!(count("SELECT count(*) FROM queue.claim('ext', 'c', 5)"), 0);
        Spi::run("SELECT queue.alter_queue('ext', concurrency => 3)").unwrap();
        Spi::run("SELECT queue.pause('ext')").unwrap();
        assert_eq!(count("SELECT count(*) FROM queue.claim('ext', 'c', 5)"), 0);
        Spi::run("SELECT queue.resume('ext')").unwrap();
        assert_eq!(count("SELECT count(*) FROM queue.claim('ext', 'c', 5)"), 1);
    }

    #[pg_test]
    fn complete_and_heartbeat_are_fenced_by_the_lease_token() {
        notify_queue("ext", "");
        Spi::run("SELECT queue.enqueue('ext')").unwrap();
        let (id, token) = claim_one("ext", "c1", "30 s");
        let wrong = pgrx::Uuid::from_bytes(*uuid::Uuid::new_v4().as_bytes());
        assert!(!call_bool("SELECT queue.complete($id, $token)", id, wrong));
        assert!(!call_bool("SELECT queue.heartbeat($id, $token)", id, wrong));
        assert!(!call_bool("SELECT queue.fail($id, $token, 'x')", id, wrong));
        assert_eq!(
            count("SELECT count(*) FROM queue.jobs WHERE state = 'running' AND errors = '[]'"),
            1
        );
        assert!(call_bool(
            "SELECT queue.heartbeat($id, $token, '1 hour')",
            id,
            token
        ));
        assert_eq!(
            count("SELECT count(*) FROM queue.jobs WHERE lease_expires_at > now() + interval '59 min'"),
            1
        );
        assert!(call_bool(
            "SELECT queue.complete($id, $token, '{\"ok\": true}')",
            id,
            token
        ));
        // Twice: the second changes nothing.
        assert!(!call_bool("SELECT queue.complete($id, $token)", id, token));
        assert!(!call_bool("SELECT queue.heartbeat($id, $token)", id, token));
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ' ' || result::text || ' ' || consumer FROM queue.status('{id}')"
            ))
            .as_deref(),
            Some("succeeded {\"ok\": true} c1")
        );
    }

    #[pg_test]
    fn an_expired_lease_is_lost_and_reaped() {
        notify_queue("ext", ", backoff_base => '0', backoff_max => '0'");
        Spi::run("SELECT queue.enqueue('ext')").unwrap();
        let (id, token) = claim_one("ext", "c1", "1 second");
        Spi::run("SELECT pg_sleep(1.05)").unwrap();
        assert!(!call_bool("SELECT queue.heartbeat($id, $token)", id, token));
        assert!(!call_bool("SELECT queue.complete($id, $token)", id, token));
        assert!(!call_bool(
            "SELECT queue.fail($id, $token, 'late')",
            id,
            token
        ));
        assert_eq!(one::<i64>("SELECT queue.reap()"), Some(1));
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ' ' || attempts || ' ' || last_error || ' ' || (consumer IS NULL)
                   FROM queue.status('{id}')"
            ))
            .as_deref(),
            Some("queued 1 lease expired (consumer c1) true")
        );
        // Another consumer gets it, with a new token; the old one stays dead.
        let (id2, token2) = claim_one("ext", "c2", "30 s");
        assert_eq!(id2, id);
        assert_ne!(token2, token);
        assert!(!call_bool("SELECT queue.complete($id, $token)", id, token));
        assert!(call_bool("SELECT queue.complete($id, $token)", id, token2));
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ' ' || attempts || ' ' || consumer FROM queue.status('{id}')"
            ))
            .as_deref(),
            Some("succeeded 2 c2")
        );
    }

    #[pg_test]
    fn a_cancelled_job_loses_its_lease() {
        notify_queue("ext", "");
        Spi::run("SELECT queue.enqueue('ext')").unwrap();
        let (id, token) = claim_one("ext", "c1", "30 s");
        assert_eq!(
            one::<bool>(&format!("SELECT queue.cancel('{id}')")),
            Some(true)
        );
        assert!(!call_bool("SELECT queue.heartbeat($id, $token)", id, token));
        assert!(!call_bool("SELECT queue.complete($id, $token)", id, token));
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ' ' || consumer FROM queue.status('{id}')"
            ))
            .as_deref(),
            Some("cancelled c1")
        );
    }

    #[pg_test]
    fn fail_retries_then_fails_for_good() {
        notify_queue("ext", ", max_attempts => 2");
        Spi::run("SELECT queue.enqueue('ext')").unwrap();
        let (id, token) = claim_one("ext", "c1", "30 s");
        assert!(call_bool(
            "SELECT queue.fail($id, $token, 'boom', '1 hour')",
            id,
            token
        ));
        assert!(!call_bool(
            "SELECT queue.fail($id, $token, 'again')",
            id,
            token
        ));
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ' ' || attempts || ' ' || last_error || ' ' || scheduled
                   FROM queue.status('{id}')"
            ))
            .as_deref(),
            Some("queued 1 boom true")
        );
        Spi::run(&format!(
            "UPDATE queue.jobs SET run_at = now() WHERE id = '{id}'"
        ))
        .unwrap();
        let (_, token) = claim_one("ext", "c1", "30 s");
        assert!(call_bool(
            "SELECT queue.fail($id, $token, 'boom 2', '0')",
            id,
            token
        ));
        assert_eq!(
            one::<String>(&format!(
                "SELECT state || ' ' || attempts || ' ' || jsonb_array_length(errors) || ' ' || last_error
                   FROM queue.status('{id}')"
            ))
            .as_deref(),
            Some("failed 2 2 boom 2")
        );
    }

    #[pg_test]
    fn channels_fit_and_differ() {
        assert_eq!(
            one::<String>("SELECT queue.channel('emails')").as_deref(),
            Some("queue.emails")
        );
        let long = "x".repeat(60);
        let (a, b) = (format!("{long}a"), format!("{long}b"));
        let got = Spi::get_two::<String, String>(&format!(
            "SELECT queue.channel('{a}'), queue.channel('{b}')"
        ))
        .unwrap();
        let (a, b) = (got.0.unwrap(), got.1.unwrap());
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
    }

    // ---- Schedules (sql/schedules.sql) and retention settings ----

    #[pg_test]
    fn schedule_rejects_bad_input_and_changes_nothing() {
        create("cronq");
        let cases = [
            ("SELECT queue.schedule('s', 'not cron', 'cronq')", "22023"),
            ("SELECT queue.schedule('s', '61 * * * *', 'cronq')", "22023"),
            ("SELECT queue.schedule('s', '0 0 30 2 *', 'cronq')", "22023"),
            ("SELECT queue.schedule('s', '@every 0s', 'cronq')", "22023"),
            (
                "SELECT queue.schedule('s', '* * * * *', 'cronq', time_zone => 'Mars/Base')",
                "22023",
            ),
            (
                "SELECT queue.schedule('s', '* * * * *', 'cronq', overlap => 'never')",
                "22023",
            ),
            (
                "SELECT queue.schedule('s', '* * * * *', 'cronq', catch_up => 'some')",
                "22023",
            ),
            (
                "SELECT queue.schedule('s', '* * * * *', 'cronq', catch_up_window => '0')",
                "22023",
            ),
            ("SELECT queue.schedule('s', '* * * * *', 'nope')", "42704"),
            ("SELECT queue.schedule(NULL, '* * * * *', 'cronq')", "22023"),
            (
                "SELECT queue.schedule('bad name!', '* * * * *', 'cronq')",
                "22023",
            ),
            ("SELECT queue.schedule('s', NULL, 'cronq')", "22004"),
            (
                "SELECT queue.schedule('s', '* * * * *', 'cronq', payload => NULL)",
                "22004",
            ),
            (
                "SELECT queue.schedule('s', '* * * * *', 'cronq', max_attempts => 0)",
                "22023",
            ),
            ("SELECT queue.unschedule('nope')", "42704"),
            (
                "SELECT queue.alter_schedule('nope', enabled => false)",
                "42704",
            ),
            ("SELECT queue.cron_next('bad', now())", "22023"),
        ];
        for (stmt, code) in cases {
            assert_eq!(sqlstate(stmt).as_deref(), Some(code), "{stmt}");
        }
        assert_eq!(count("SELECT count(*) FROM queue.schedule_defs"), 0);
    }

    #[pg_test]
    fn schedule_create_replace_alter_unschedule() {
        create("cronq");
        Spi::run("SELECT queue.schedule('nightly', '30 2 * * *', 'cronq', '{\"k\": 1}', time_zone => 'Europe/Paris')")
            .unwrap();
        assert_eq!(
            one::<bool>(
                "SELECT next_run_at = queue.cron_next('30 2 * * *', now(), 'Europe/Paris')
                        AND enabled AND overlap = 'skip' AND catch_up = 'latest' AND last_job IS NULL
                   FROM queue.schedules WHERE name = 'nightly'"
            ),
            Some(true)
        );
        // Same name: replaced, not duplicated.
        Spi::run("SELECT queue.schedule('nightly', '@every 10s', 'cronq', overlap => 'allow')")
            .unwrap();
        assert_eq!(
            one::<String>("SELECT cron || ' ' || overlap || ' ' || time_zone FROM queue.schedules")
                .as_deref(),
            Some("@every 10s allow UTC")
        );
        Spi::run("SELECT queue.alter_schedule('nightly', enabled => false)").unwrap();
        assert_eq!(
            one::<bool>("SELECT next_run_at IS NULL AND NOT enabled FROM queue.schedules"),
            Some(true)
        );
        Spi::run("SELECT queue.alter_schedule('nightly', cron => '0 * * * *', enabled => true)")
            .unwrap();
        assert_eq!(
            one::<bool>("SELECT next_run_at = date_trunc('hour', now()) + interval '1 hour' FROM queue.schedules"),
            Some(true)
        );
        Spi::run("SELECT queue.unschedule('nightly')").unwrap();
        assert_eq!(count("SELECT count(*) FROM queue.schedules"), 0);
        // A queue with schedules is not dropped from under them, unless forced.
        Spi::run("SELECT queue.schedule('again', '@hourly', 'cronq')").unwrap();
        assert_eq!(
            sqlstate("SELECT queue.drop_queue('cronq')").as_deref(),
            Some("55006")
        );
        Spi::run("SELECT queue.drop_queue('cronq', force => true)").unwrap();
        assert_eq!(count("SELECT count(*) FROM queue.schedules"), 0);
    }

    #[pg_test]
    fn cron_next_in_a_time_zone() {
        assert_eq!(
            one::<bool>(
                "SELECT queue.cron_next('0 9 * * *', '2026-01-10 12:00Z', 'Europe/Paris') = '2026-01-11 08:00Z'
                    AND queue.cron_next('0 9 * * *', '2026-07-10 12:00Z', 'Europe/Paris') = '2026-07-11 07:00Z'
                    AND queue.cron_next('@every 1h', '2026-01-01 00:30Z') = '2026-01-01 01:00Z'"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn purge_and_per_state_retention() {
        Spi::run(
            "SELECT queue.create_queue('p', 'tests.noop(jsonb)', retention_failed => '30 days')",
        )
        .unwrap();
        assert_eq!(
            sqlstate(
                "SELECT queue.create_queue('p2', 'tests.noop(jsonb)', retention_cancelled => '0')"
            )
            .as_deref(),
            Some("22023")
        );
        assert_eq!(
            sqlstate("SELECT queue.alter_queue('p', retention_succeeded => '-1 day')").as_deref(),
            Some("22023")
        );
        Spi::run(
            "INSERT INTO queue.history (id, queue, state, payload, enqueued_by, priority, run_at, attempts,
                                        max_attempts, created_at, finished_at, errors)
             SELECT queue.uuid_generate_v7(), 'p', st, '{}', current_user::regrole, 0, now(), 1, 1, now() - interval '3 hours', f, '[]'
               FROM unnest('{succeeded,failed,cancelled}'::queue.job_state[]) st,
                    unnest(ARRAY[now() - interval '2 hours', now()]) f",
        )
        .unwrap();
        assert_eq!(
            sqlstate("SELECT queue.purge('p', '1 hour', '{queued}')").as_deref(),
            Some("22023")
        );
        assert_eq!(
            sqlstate("SELECT queue.purge('p', '-1 hour')").as_deref(),
            Some("22023")
        );
        assert_eq!(
            sqlstate("SELECT queue.purge('nope')").as_deref(),
            Some("42704")
        );
        assert_eq!(
            one::<i64>("SELECT queue.purge('p', '1 hour', '{failed}')"),
            Some(1)
        );
        assert_eq!(one::<i64>("SELECT queue.purge('p', '1 hour')"), Some(2));
        assert_eq!(
            count("SELECT count(*) FROM queue.history WHERE queue = 'p'"),
            3
        );
    }

    #[pg_test]
    fn stats_view_counts_live_jobs_and_recent_outcomes() {
        create("st");
        Spi::run("SELECT queue.enqueue_many('st', array_fill('{}'::jsonb, ARRAY[2]))").unwrap();
        Spi::run("SELECT queue.enqueue('st', run_at => now() + interval '1 hour')").unwrap();
        Spi::run(
            "INSERT INTO queue.history (id, queue, state, payload, enqueued_by, priority, run_at, attempts,
                                        max_attempts, created_at, finished_at, errors)
             SELECT queue.uuid_generate_v7(), 'st', st, '{}', current_user::regrole, 0, now(), 1, 1, now() - interval '3 hours', f, '[]'
               FROM (VALUES ('succeeded'::queue.job_state, now()), ('succeeded', now()),
                            ('failed', now()), ('succeeded', now() - interval '2 hours')) v(st, f)",
        )
        .unwrap();
        assert_eq!(
            one::<String>(
                "SELECT concat_ws(' ', ready, scheduled, running, oldest_ready_age >= '0', succeeded_last_hour,
                                  failed_last_hour, cancelled_last_hour, finished_per_second_last_minute)
                   FROM queue.stats WHERE queue = 'st'"
            )
            .as_deref(),
            Some("2 1 0 t 2 1 0 0.1")
        );
    }

    #[pg_test]
    fn set_progress_works_only_in_a_handler_and_is_bounded() {
        assert_eq!(
            sqlstate("SELECT queue.set_progress('{\"done\": 1}')").as_deref(),
            Some("55000")
        );
        assert_eq!(
            sqlstate("SELECT queue.set_progress(NULL)").as_deref(),
            Some("55000")
        );
        assert_eq!(
            sqlstate("SELECT queue.set_progress(jsonb_build_object('x', repeat('y', 3000)))")
                .as_deref(),
            Some("54000")
        );
        assert_eq!(
            sqlstate("SELECT queue.check_progress(jsonb_build_object('x', repeat('y', 2000)))"),
            None
        );
        // Views ask for a job no executor holds: no report, no error.
        assert_eq!(
            one::<pgrx::JsonB>("SELECT queue.job_progress(gen_random_uuid(), gen_random_uuid())")
                .map(|j| j.0),
            None
        );
    }
}

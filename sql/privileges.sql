-- Per-queue privileges: grant, revoke, my_privileges, the view queue.grants, and the
-- checks every API function makes (README "Security and privileges").
--
-- A queue's owner (the role that created it, and every role that has its privileges)
-- holds every privilege on it; other roles hold what queue.grant() gave them or a role
-- whose privileges they have (pg_has_role(.., 'USAGE'): membership counts, NOINHERIT is
-- respected). Superusers hold everything.
--
--   enqueue  enqueue, enqueue_many, schedule; see and cancel the jobs it enqueued
--   consume  claim, heartbeat, complete, fail (NOTIFY queues); see the queue's jobs
--   read     see the queue's jobs: payloads, results, errors
--   manage   pause, resume, alter_queue (not handler), cancel and retry any job, purge;
--            see the queue's jobs
--
-- API functions run as the extension owner and learn their caller from queue.caller()
-- (src/security/api.rs); the helpers here take the role to check as an argument.

CREATE TABLE queue.queue_grants (
    queue       text        NOT NULL,
    role        regrole     NOT NULL,
    privilege   text        NOT NULL,
    granted_by  regrole     NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, role, privilege),
    CONSTRAINT queue_grants_privilege_valid CHECK (privilege IN ('enqueue', 'consume', 'read', 'manage'))
);
SELECT pg_catalog.pg_extension_config_dump('queue.queue_grants', '');

-- privileges_of: what role `who` may do on each queue.
CREATE FUNCTION queue.privileges_of(who oid)
RETURNS TABLE (queue text, own boolean, enqueue boolean, consume boolean, read boolean, manage boolean)
LANGUAGE sql STABLE AS $$
    SELECT q.name, o.own,
           o.own OR 'enqueue' OPERATOR(pg_catalog.=) ANY (g.privs),
           o.own OR 'consume' OPERATOR(pg_catalog.=) ANY (g.privs),
           o.own OR g.privs OPERATOR(pg_catalog.&&) '{read,consume,manage}',
           o.own OR 'manage' OPERATOR(pg_catalog.=) ANY (g.privs)
      FROM queue.queues q
     CROSS JOIN LATERAL (SELECT pg_catalog.pg_has_role(who, q.owner, 'USAGE') AS own) o
     CROSS JOIN LATERAL (SELECT coalesce(pg_catalog.array_agg(x.privilege), '{}') AS privs
                           FROM queue.queue_grants x
                          WHERE x.queue OPERATOR(pg_catalog.=) q.name
                            AND pg_catalog.pg_has_role(who, x.role, 'USAGE')) g
$$;
COMMENT ON FUNCTION queue.privileges_of(oid) IS
    'Internal: what a role may do on each queue (owner, enqueue, consume, read, manage).';

-- may: whether role `who` holds `privilege` on queue `q` ('own': the owner's rights).
-- PL/pgSQL, whose plans are kept for the session (an SQL function with a sub-query would
-- be planned again in every transaction).
CREATE FUNCTION queue.may(who oid, q queue.queues, privilege text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN pg_has_role(who, q.owner, 'USAGE')
        OR (privilege <> 'own' AND EXISTS (
            SELECT 1 FROM queue.queue_grants g
             WHERE g.queue = q.name
               AND (g.privilege = may.privilege
                    OR (may.privilege = 'read' AND g.privilege IN ('consume', 'manage')))
               AND pg_has_role(who, g.role, 'USAGE')));
END
$$;
COMMENT ON FUNCTION queue.may(oid, queue.queues, text) IS
    'Internal: whether a role holds a privilege (enqueue, consume, read, manage, or own) on a queue.';

-- authorize: the queue's row (locked when for_update) once the caller is found to hold
-- `privilege`; 42704 for an unknown queue, 42501 without the privilege.
CREATE FUNCTION queue.authorize(queue_name text, privilege text, for_update boolean DEFAULT false)
RETURNS queue.queues LANGUAGE plpgsql AS $$
DECLARE
    q queue.queues := queue.find_queue(queue_name, for_update);
BEGIN
    IF queue.may(queue.caller(), q, privilege) THEN
        NULL;
    ELSIF privilege = 'own' THEN
        RAISE EXCEPTION 'permission denied for queue "%"', queue_name
            USING ERRCODE = 'insufficient_privilege', DETAIL = 'Only the queue''s owner may do this.';
    ELSE
        RAISE EXCEPTION 'permission denied for queue "%"', queue_name
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('This needs the %s privilege on the queue.', privilege),
                  HINT = format('The owner grants it with queue.grant(%L, <role>, ''{%s}'').',
                                queue_name, privilege);
    END IF;
    RETURN q;
END
$$;
COMMENT ON FUNCTION queue.authorize(text, text, boolean) IS
    'Internal: the queue''s row after checking that the caller holds a privilege on it.';

-- check_grant: the arguments grant and revoke share: a role, and known privilege names.
CREATE FUNCTION queue.check_grant(role regrole, privileges text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'role must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    ELSIF privileges IS NULL OR cardinality(privileges) = 0 OR array_position(privileges, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'privileges must be a non-empty array of privilege names'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use enqueue, consume, read or manage.';
    ELSIF NOT privileges <@ '{enqueue,consume,read,manage}'::text[] THEN
        RAISE EXCEPTION 'unknown privilege: %',
                        (SELECT string_agg(p, ', ') FROM unnest(privileges) p
                          WHERE p <> ALL ('{enqueue,consume,read,manage}'::text[]))
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use enqueue, consume, read or manage.';
    END IF;
END
$$;

CREATE FUNCTION queue."grant"(queue text, role regrole, privileges text[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues;
BEGIN
    PERFORM queue.check_grant(role, privileges);
    q := queue.authorize("grant".queue, 'own', true);
    INSERT INTO queue.queue_grants (queue, role, privilege, granted_by)
    SELECT q.name, "grant".role, p, queue.caller() FROM unnest(privileges) p
    ON CONFLICT DO NOTHING;
END
$$;
COMMENT ON FUNCTION queue."grant"(text, regrole, text[]) IS
    'Gives a role privileges on a queue: enqueue, consume, read, manage. Members of the role have them too. Only the queue''s owner may grant.';

CREATE FUNCTION queue.revoke(queue text, role regrole, privileges text[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q queue.queues;
BEGIN
    PERFORM queue.check_grant(role, privileges);
    q := queue.authorize(revoke.queue, 'own', true);
    DELETE FROM queue.queue_grants g
     WHERE g.queue = q.name AND g.role = revoke.role AND g.privilege = ANY (privileges);
END
$$;
COMMENT ON FUNCTION queue.revoke(text, regrole, text[]) IS
    'Takes privileges on a queue back from a role; the next call of that role is refused. Only the queue''s owner may revoke.';

CREATE FUNCTION queue.my_privileges()
RETURNS TABLE (queue text, own boolean, enqueue boolean, consume boolean, read boolean, manage boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT p.* FROM queue.privileges_of(queue.caller()) p
     WHERE p.own OR p.enqueue OR p.consume OR p.read OR p.manage
$$;
COMMENT ON FUNCTION queue.my_privileges() IS
    'The queues the current role holds a privilege on, and which.';

-- grants: who holds what on each queue; a queue's owner sees its queue's grants, a
-- grantee the grants to roles whose privileges it has.
CREATE VIEW queue.grants WITH (security_barrier) AS
SELECT g.queue, g.role, g.privilege, g.granted_by, g.granted_at
  FROM queue.queue_grants g
  JOIN queue.queues q ON q.name = g.queue
 WHERE pg_catalog.pg_has_role(current_user, q.owner, 'USAGE')
    OR pg_catalog.pg_has_role(current_user, g.role, 'USAGE');
COMMENT ON VIEW queue.grants IS
    'Privileges granted on queues with queue.grant(): the owner of a queue sees all of its grants, other roles the grants they hold.';

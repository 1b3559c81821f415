"""Install script hygiene (SECURITY.md, "install script"): pgspot finds nothing in the
generated pg_queue--<version>.sql, and the catalog shows the rules pgspot cannot check.

How pgspot is run, and why each option:
- `pgspot-schema.sql` first, with `--append`: CREATE EXTENSION creates the control file's
  schema `queue` (or finds it, and then the script refuses it unless a superuser owns it),
  which pgspot cannot know; the preamble tells it, so that the script's
  `SET search_path TO queue, pg_temp` counts as safe.
- `--no-plpgsql`: pgspot 0.9.4 stops with '"q.handler" is not a known variable' at the
  first assignment to a field of a row variable, so it cannot read our PL/pgSQL. Every
  PL/pgSQL function is either API (it pins `search_path = pg_catalog, pg_temp`, checked
  below from the catalog) or an internal helper no role but the extension owner may call,
  which therefore only ever runs under an API function's or a worker's pinned search_path
  (checked below too).
- `--ignore PS005` ("function without explicit search_path"): the internal helpers above
  must not have one (a SET clause makes a function an API entry point for the caller hook,
  src/security/api.rs), and the three pure functions PUBLIC may call (PURE below) have
  every name in their bodies qualified instead, which pgspot does check (their bodies are
  analysed as running under an unsafe search_path).
"""
import contextlib
import glob
import os
import re
import subprocess
import sys

import psycopg
import pytest

from cluster import PG_BIN

# Callable by PUBLIC without a pinned search_path: SQL bodies with every name qualified
# (pgspot checks them), inlinable into the views that use them.
PURE = {"uuid_time", "channel", "backoff"}
# Functions in Rust that read tables on the caller's behalf: API functions like the SQL ones
# (their SET clause makes them run as the extension owner, the caller recorded).
RUST_API = {"job_progress", "enqueue"}

PREAMBLE = os.path.join(os.path.dirname(__file__), "pgspot-schema.sql")


def install_script():
    share = subprocess.check_output([os.path.join(PG_BIN, "pg_config"), "--sharedir"], text=True)
    scripts = glob.glob(os.path.join(share.strip(), "extension", "pg_queue--*.sql"))
    installs = [s for s in scripts if os.path.basename(s).count("--") == 1]
    assert installs, f"no install script among {scripts}"
    return installs


def update_scripts():
    """The hand-written `pg_queue--A--B.sql` of this repository."""
    scripts = glob.glob(os.path.join(os.path.dirname(__file__), "..", "sql", "pg_queue--*--*.sql"))
    assert scripts
    return scripts


def test_pgspot_finds_nothing():
    pgspot = os.path.join(os.path.dirname(sys.executable), "pgspot")
    for script in install_script() + update_scripts():
        out = subprocess.run([pgspot, "--no-plpgsql", "--ignore", "PS005", "--append",
                              PREAMBLE, script], capture_output=True, text=True)
        findings = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        assert findings[-1] == "TOTAL: Errors: 0 Warnings: 0 Unknown: 0", "\n".join(findings)
        assert out.returncode == 0, out.stderr


def test_no_create_or_replace():
    """CREATE OR REPLACE would adopt an object someone made first (pgspot checks it too)."""
    for script in install_script():
        with open(script, encoding="utf8") as f:
            code = [line.split("--")[0] for line in f]
        found = [line for line in code if re.search(r"\bOR\s+REPLACE\b", line, re.I)]
        assert found == []


def functions(db):
    return db.execute(
        """SELECT p.proname, p.oid::regprocedure::text, l.lanname,
                  coalesce(p.proconfig, '{}'), p.prosecdef,
                  has_function_privilege('public', p.oid, 'EXECUTE')
             FROM pg_proc p
             JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                             AND d.deptype = 'e'
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_queue'
             JOIN pg_language l ON l.oid = p.prolang""").fetchall()


def test_every_function_callable_by_public_pins_its_search_path_or_is_pure(db):
    fns = functions(db)
    assert len(fns) > 40
    for name, sig, lang, config, secdef, public in fns:
        assert not secdef, f"{sig}: SECURITY DEFINER hides the caller; use a SET clause"
        if not public:
            continue
        if (lang == "c" and name not in RUST_API) or name in PURE:
            assert config == [], f"{sig}: {config}"
        else:
            # JIT off where compiling costs more than the query (monitoring reads)
            # Consumers' claims: by index, whatever the table's shape (sql/consumers.sql)
            assert config in (["search_path=pg_catalog, pg_temp"],
                              ["search_path=pg_catalog, pg_temp", "jit=off"],
                              ["search_path=pg_catalog, pg_temp", "enable_seqscan=off",
                               "enable_bitmapscan=off", "jit=off"]), \
                f"{sig}: {config}"
    public_pure = {n for n, _, lang, _, _, public in fns if public and lang == "sql" and n in PURE}
    assert public_pure == PURE
    assert {n for n, _, lang, _, _, public in fns if public and lang == "c" and n in RUST_API} == RUST_API


def test_internal_helpers_are_closed_to_every_role(db):
    """Helpers without a SET clause (they run under the API's pinned search_path) are the
    extension owner's alone."""
    helpers = [(sig, config) for name, sig, lang, config, _, public in functions(db)
               if lang != "c" and name not in PURE and not public]
    assert len(helpers) > 10
    acl = db.execute(
        """SELECT p.oid::regprocedure::text, a.grantee::regrole::text
             FROM pg_proc p, aclexplode(p.proacl) a
            WHERE p.pronamespace = 'queue'::regnamespace AND a.privilege_type = 'EXECUTE'
              AND a.grantee <> p.proowner""").fetchall()
    granted = {sig for sig, _ in acl}
    for sig, _ in helpers:
        assert sig not in granted, f"{sig} is executable by someone else: {acl}"


@contextlib.contextmanager
def scratch_database(cluster, name):
    """A connection to a new database without pg_queue, dropped afterwards."""
    with cluster.connect() as su:
        su.execute(f"CREATE DATABASE {name}")
    try:
        with cluster.connect(dbname=name) as conn:
            yield conn
    finally:
        with cluster.connect() as su:
            su.execute(f"DROP DATABASE {name}")


def test_create_extension_leaves_the_sessions_search_path_alone(cluster):
    with scratch_database(cluster, "path_check") as su:
        su.execute("SET search_path TO public, pg_temp")
        su.execute("CREATE EXTENSION pg_queue")
        assert su.execute("SHOW search_path").fetchone() == ("public, pg_temp",)
        su.execute("CREATE TABLE made_after (x int)")
        assert su.execute("SELECT to_regclass('public.made_after') IS NOT NULL").fetchone() == (True,)


def test_an_existing_schema_owned_by_an_ordinary_role_is_refused(cluster):
    try:
        with scratch_database(cluster, "squat") as su:
            su.execute("CREATE ROLE squatter LOGIN")
            su.execute("CREATE SCHEMA queue AUTHORIZATION squatter")
            with pytest.raises(psycopg.Error) as e:
                su.execute("CREATE EXTENSION pg_queue")
            assert e.value.sqlstate == "42P06", e.value
            assert "not owned by a superuser" in str(e.value)
            su.execute("ALTER SCHEMA queue OWNER TO postgres")
            su.execute("CREATE EXTENSION pg_queue")
            assert su.execute("SELECT count(*) FROM queue.queues").fetchone() == (0,)
    finally:
        with cluster.connect() as su:
            su.execute("DROP ROLE squatter")

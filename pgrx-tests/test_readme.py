"""Every SQL example in the README's reference runs, in order, without error; the security
walk-through runs as written, each block as the role it names, all but the DBA's ordinary."""
import pathlib
import re
import subprocess
import time

import psycopg

from cluster import PG_BIN

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def sql_blocks(heading, level="## "):
    text = README.read_text()
    section = text.split(level + heading, 1)[1].split("\n" + level, 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


def reference_examples():
    return sql_blocks("SQL reference")


def test_readme_reference_examples_run(cluster):
    examples = reference_examples()
    assert len(examples) >= 10
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE readme")
    with cluster.connect(dbname="readme") as db:
        db.execute("CREATE EXTENSION pg_queue")
        for sql in examples:
            db.execute(sql)


def test_readme_monitoring_and_upgrading_examples_run(cluster):
    """After the reference examples (their queue 'work'): the Monitoring queries, and the
    Upgrading block, which on an up-to-date install only says so."""
    blocks = sql_blocks("Monitoring") + sql_blocks("Upgrading")
    assert len(blocks) == 2
    with cluster.connect(dbname="readme") as db:
        for sql in blocks:
            db.execute(sql)
        text = db.execute("SELECT queue.prometheus_metrics()").fetchone()[0]
        queues = [q for q, in db.execute("SELECT name FROM queue.queues").fetchall()]
        assert queues and all(f'pg_queue_jobs{{queue="{q}",state="ready"}}' in text for q in queues)


def test_readme_several_databases_example_runs_in_psql(cluster):
    """It switches databases (\\c), so psql runs it, as a reader would."""
    blocks = sql_blocks("Several databases")
    assert len(blocks) == 1
    out = subprocess.run([f"{PG_BIN}/psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", cluster.dir,
                          "-p", str(cluster.port), "-U", "postgres", "-d", "postgres"],
                         input=blocks[0], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pg_queue launcher" in out.stdout


def test_readme_security_walk_through_as_ordinary_roles(cluster):
    blocks = sql_blocks("Walk-through for a DBA", level="### ")
    assert len(blocks) == 5
    # In the database the workers serve (queue.databases), so that the handler's job runs.
    results = {}
    for sql in blocks:
        role = re.match(r"-- as (\w+)", sql).group(1)
        with cluster.connect(user=role) as conn:
            if role != "postgres":
                assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is False
            cur = conn.execute(sql)
            while True:                     # keep the rows of the block's last query
                if cur.description:
                    results[role] = cur.fetchall()
                if not cur.nextset():
                    break
    assert results["app_owner"] == [("hooks", "app", "enqueue"), ("hooks", "worker", "consume"),
                                    ("welcome", "app", "enqueue")]
    assert sorted(r[1] for r in results["app"]) == ["hooks", "welcome"]
    assert len(results["worker"]) == 1
    assert sorted(r[0] for r in results["dashboard"]) == ["hooks", "welcome"]
    with cluster.connect(user="app") as app:
        for call in ("SELECT queue.claim('hooks', 'app-1')", "SELECT queue.pause('welcome')"):
            try:
                app.execute(call)
                raise AssertionError(call + " succeeded")
            except psycopg.Error as e:
                assert e.sqlstate == "42501", call
    with cluster.connect() as su:
        # The welcome job ran as app_owner and wrote its table.
        deadline = time.monotonic() + 60
        while su.execute("SELECT count(*) FROM public.welcome_sent").fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the welcome job never ran"
            time.sleep(0.05)

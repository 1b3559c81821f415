"""Every SQL example in the README's reference runs, in order, without error."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def reference_examples():
    text = README.read_text()
    section = text.split("## SQL reference", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


def test_readme_reference_examples_run(cluster):
    examples = reference_examples()
    assert len(examples) >= 10
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE readme")
    with cluster.connect(dbname="readme") as db:
        db.execute("CREATE EXTENSION pg_queue")
        for sql in examples:
            db.execute(sql)

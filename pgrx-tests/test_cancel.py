"""queue.cancel() of running jobs: the handler is interrupted, its effects roll back, the
job ends cancelled; a cancel that loses the race with completion leaves it succeeded."""
import time

from conftest import scalar, wait_for, wait_terminal


def make(db, name, body, **opts):
    db.execute(f"CREATE TABLE {name} (job uuid)")
    db.execute(f"""CREATE PROCEDURE {name}_h(payload jsonb) LANGUAGE plpgsql AS $$ BEGIN
                     INSERT INTO {name} SELECT id FROM queue.current_job(); {body} END $$""")
    db.execute("SELECT queue.create_queue(%s, %s)", (name, f"{name}_h(jsonb)"))


def test_cancel_interrupts_a_running_handler(db, name):
    make(db, name, "PERFORM pg_sleep(60);")
    job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
    # The handler is running once its executor shows the job in pg_stat_activity.
    wait_for(lambda: scalar(db, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s",
                            (f"pg_queue: queue {name} job {job}%",)) == 1, what="handler running")
    t0 = time.monotonic()
    assert scalar(db, "SELECT queue.cancel(%s)", (job,)) is True
    wait_terminal(db, name, 1, timeout=10)
    took = time.monotonic() - t0
    st = db.execute("SELECT state::text, last_error FROM queue.status(%s)", (job,)).fetchone()
    assert st == ("cancelled", "cancelled by queue.cancel()")
    assert scalar(db, f"SELECT count(*) FROM {name}") == 0  # its insert rolled back
    assert took < 1.0, took
    print(f"\ncancel of a running job took {took * 1000:.1f} ms")
    assert scalar(db, "SELECT queue.cancel(%s)", (job,)) is False


def test_cancel_racing_completion_is_consistent(db, name):
    make(db, name, "PERFORM pg_sleep(0.02);")
    outcomes = {}
    for i in range(40):
        job = scalar(db, "SELECT queue.enqueue(%s)", (name,))
        # Cancel at varying moments: queued, just claimed, running, just finished.
        time.sleep((i % 8) * 0.005)
        outcomes[job] = scalar(db, "SELECT queue.cancel(%s)", (job,))
    wait_terminal(db, name, 40)
    states = {k: 0 for k in ("cancelled:false", "succeeded:true")}
    for key in db.execute(f"""SELECT h.state::text || ':' || (t.job IS NOT NULL)
                               FROM queue.history h LEFT JOIN {name} t ON t.job = h.id
                              WHERE h.queue = %s""", (name,)):
        assert key[0] in states, key[0]  # succeeded with its row, or cancelled without
        states[key[0]] += 1
    assert sum(states.values()) == 40
    # A job whose cancel returned false had already finished: it succeeded.
    for job, ok in outcomes.items():
        if ok is False:
            assert scalar(db, "SELECT state::text FROM queue.status(%s)", (job,)) == "succeeded"
    print(f"\ncancel race: {states}")

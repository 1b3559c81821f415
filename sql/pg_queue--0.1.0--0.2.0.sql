-- pg_queue 0.1.0 → 0.2.0, run by ALTER EXTENSION pg_queue UPDATE.
--
-- Written by hand and reviewed like a migration (README "Upgrading", docs/design.md
-- "Upgrades"): it keeps every queue, schedule, live job and history row, runs while
-- executors and clients keep working (each statement takes its locks for as short as it
-- can), and leaves the same catalog as a fresh 0.2.0 install (pgrx-tests/test_upgrade.py
-- compares them). 0.1.0 is commit bbffc91, kept as sql/releases/pg_queue--0.1.0.sql.
\echo Use "ALTER EXTENSION pg_queue UPDATE" to load this file. \quit

SET LOCAL search_path TO queue, pg_temp;

#!/usr/bin/env bash
# The benchmark: installs the release build, then measures Postgres's floors and
# pg_queue's figures on one throwaway cluster (bench/bench.py) and writes a markdown table
# to bench/results/. Arguments: --fast (synchronous_commit off), --smoke (tiny sizes),
# --only PHASE... (some phases: enqueue peers drain graph rate fair latency history rss).
# Never run it while another cluster with pg_queue preloaded is up on this machine: it
# replaces the installed library.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config >/dev/null
exec "${PG_QUEUE_VENV:-$HOME/.cache/pg_queue/venv}/bin/python" bench/bench.py "$@"

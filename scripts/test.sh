#!/usr/bin/env bash
# Runs the whole test suite from a clean clone:
#   1. unit tests and in-database API tests (#[pg_test]) with `cargo pgrx test`;
#   2. installs the release build and runs the real-cluster suites (pgrx-tests/, pytest):
#      throwaway clusters with the extension preloaded, real background workers, kill -9.
# Extra arguments go to pytest (e.g. -k timeout).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
VENV=${PG_QUEUE_VENV:-$HOME/.cache/pg_queue/venv}
# pgrx's test cluster runs as `postgres` (initdb refuses root); its data dir must be theirs.
PGRX_TEST_PGDATA=/var/tmp/pg_queue-pgrx-tests
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO install -d -o postgres -g postgres "$PGRX_TEST_PGDATA"

echo "== cargo pgrx test (unit + #[pg_test])"
cargo pgrx test pg15 --runas postgres --pgdata "$PGRX_TEST_PGDATA"

echo "== install release build"
if [ "$(id -u)" -eq 0 ]; then
    cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
else
    cargo pgrx install --release --sudo --pg-config "$PG_CONFIG" >/dev/null
fi

echo "== real-cluster suites (pgrx-tests/)"
cd pgrx-tests
"$VENV/bin/pytest" -v -p no:cacheprovider "$@"

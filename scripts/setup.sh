#!/usr/bin/env bash
# Installs what building and testing pg_queue needs on a Debian 12 machine, only what is
# missing: Postgres 15 with server headers, clang (bindgen), sudo (cargo pgrx test --runas),
# cargo-pgrx of the pinned pgrx version, Python's psycopg + pytest for the real-cluster
# suite, and Debian's Prometheus exporters that the monitoring tests scrape through.
# Idempotent: a second run takes a second or two.
set -euo pipefail

PGRX_VERSION=0.18.1
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

need_apt=()
for pkg in build-essential pkg-config libssl-dev ca-certificates clang libclang-dev \
           postgresql-15 postgresql-server-dev-15 postgresql-contrib sudo python3-venv \
           prometheus-node-exporter prometheus-postgres-exporter; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Debian starts a 'main' cluster when postgresql-15 is installed; ours are throwaway
# clusters, and a running one would keep the old pg_queue.so mapped while we replace it.
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
    pg_lsclusters -h | awk '$4 == "online" {print $1, $2}' | while read -r v c; do
        echo "setup: stopping Debian cluster $v/$c (its pg_queue.so would be replaced under it)"
        $SUDO pg_ctlcluster "$v" "$c" stop || true
    done
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (takes ~5 minutes on 2 cores)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi
if ! grep -qs "pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

# Python for the real-cluster suite and the demo, in a venv outside the repo; pgspot checks
# the install script for search_path hazards (pgrx-tests/test_install_script.py); croniter
# is an independent cron implementation the DST tests compare with (test_cron_dst.py);
# prometheus-client's parser reads queue.prometheus_metrics() (test_metrics.py).
VENV=${PG_QUEUE_VENV:-$HOME/.cache/pg_queue/venv}
if [ ! -x "$VENV/bin/pytest" ] || [ ! -x "$VENV/bin/pgspot" ] \
        || ! "$VENV/bin/python" -c "import psycopg, croniter, prometheus_client" 2>/dev/null; then
    echo "setup: creating Python venv $VENV (psycopg, pytest, pgspot, croniter, prometheus-client)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "psycopg[binary]>=3.1,<4" "pytest>=7,<9" "pgspot==0.9.4" "croniter==7.0.0" \
        "prometheus-client==0.21.1"
fi

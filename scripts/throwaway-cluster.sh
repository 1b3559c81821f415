# Sourced by scripts/demo.sh and scripts/package.sh: starts a throwaway Postgres 15 cluster
# with pg_queue preloaded (unix socket only, in a fresh directory), defines `psql` against
# it, and removes it when the calling script exits. Extra postgresql.conf lines may be given
# in THROWAWAY_CONF.
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
if [ "$(id -u)" -eq 0 ]; then AS_PG=(runuser -u postgres --); else AS_PG=(); fi
DIR=$(mktemp -d /var/tmp/pg_queue-cluster-XXXXXX)
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DIR"
PORT=$((20000 + RANDOM % 10000))
cleanup() { "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

echo "== starting a throwaway cluster in $DIR (port $PORT, unix socket only)"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --no-sync >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
shared_preload_libraries = 'pg_queue'
queue.max_workers = 2
listen_addresses = ''
unix_socket_directories = '$DIR'
port = $PORT
${THROWAWAY_CONF:-}
CONF
"${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
psql() { command psql -X -q -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }

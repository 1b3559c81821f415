#!/usr/bin/env bash
# Builds the Debian 12 package of pg_queue for Debian's Postgres 15, named and laid out
# like Debian's own extension packages (postgresql-15-cron):
#   $CARGO_TARGET_DIR/package/postgresql-15-pg-queue_<version>_amd64.deb
# from `cargo pgrx package` (the files `cargo pgrx install` installs: the library, the
# control file, the install script and the update scripts).
#
# --smoke: then installs it with dpkg, checks that the installed files are the package's,
# and runs a job on a throwaway cluster that uses nothing else (CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
TARGET=${CARGO_TARGET_DIR:-target}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=$(dpkg --print-architecture)
NAME=postgresql-15-pg-queue
STAGE="$TARGET/package/stage"
DEB="$TARGET/package/${NAME}_${VERSION}_${ARCH}.deb"

echo "== cargo pgrx package"
rm -rf "$STAGE"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$STAGE" >/dev/null
# The newest glibc symbol version the library needs, for Depends.
GLIBC=$(objdump -T "$STAGE/usr/lib/postgresql/15/lib/pg_queue.so" \
        | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
mkdir -p "$STAGE/DEBIAN" "$STAGE/usr/share/doc/$NAME"
cp README.md "$STAGE/usr/share/doc/$NAME/README.md"
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: $NAME
Version: $VERSION
Architecture: $ARCH
Maintainer: pg_queue developers <pg_queue@localhost>
Section: database
Priority: optional
Depends: postgresql-15, libc6 (>= $GLIBC), libgcc-s1
Installed-Size: $(du -sk "$STAGE/usr" | cut -f1)
Description: job queues run by background workers inside PostgreSQL 15
 pg_queue runs job-queue workers inside the database: enqueue in your
 transaction, SQL handlers whose effects commit with the job's completion,
 retries, timeouts, cron schedules, NOTIFY queues for external consumers.
 Add pg_queue to shared_preload_libraries, restart, CREATE EXTENSION pg_queue.
CONTROL
find "$STAGE" -type d -exec chmod 0755 {} +
dpkg-deb --root-owner-group --build "$STAGE" "$DEB" >/dev/null
echo "built $DEB"
dpkg-deb --info "$DEB" | sed -n '/Package:/,/Depends:/p'
dpkg-deb --contents "$DEB" | awk '{print "  " $6}' | grep -v '/$'

[ "${1:-}" = "--smoke" ] || exit 0

echo "== smoke test: dpkg -i, then a job on a throwaway cluster"
dpkg -i "$DEB" >/dev/null
# dpkg -V prints every installed file that differs from the package's (nothing = all same).
changed=$(dpkg -V "$NAME")
[ -z "$changed" ] || { echo "installed files differ from the package: $changed"; exit 1; }

source scripts/throwaway-cluster.sh
psql <<'SQL'
CREATE EXTENSION pg_queue;
CREATE TABLE smoke (n int);
CREATE PROCEDURE smoke_h(payload jsonb) LANGUAGE sql AS $$ INSERT INTO public.smoke VALUES ((payload->>'n')::int) $$;
SELECT queue.create_queue('smoke', 'smoke_h(jsonb)');
SELECT queue.enqueue('smoke', '{"n": 42}');
SQL
for _ in $(seq 1 100); do
    [ "$(psql -tA -c "SELECT count(*) FROM queue.history WHERE queue = 'smoke' AND state = 'succeeded'")" = 1 ] && break
    sleep 0.1
done
ran=$(psql -tA -c "SELECT string_agg(n::text, ',') FROM smoke")
version=$(psql -tA -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_queue'")
[ "$ran" = 42 ] && [ "$version" = "$VERSION" ] \
    || { echo "smoke test failed: handler ran [$ran], version [$version]"; cat "$DIR/server.log"; exit 1; }
echo "== package smoke test passed: pg_queue $version installed from $(basename "$DEB") ran a job"

#!/usr/bin/env bash
# A throw-away MariaDB on 127.0.0.1:PORT for the tests (shared/TEST-SERVERS.md §1), seeded with
# mariadb.sql, stopped and removed when OWNER_PID exits.
#   mariadb.sh PORT OWNER_PID   prints "dir=DIR port=PORT" once ready
# root reaches it over the private socket DIR/s (unix_socket auth); the user `app` over TCP.
# The server's time zone is +02:00, so that a session left in it (not UTC) shows in the tests.
set -euo pipefail
port=$1 owner=$2
here=$(cd "$(dirname "$0")" && pwd)
[ -x /usr/sbin/mariadbd ] || { echo "MariaDB is not installed (apt-get install mariadb-server; .ci/test-servers does it)" >&2; exit 1; }
dir=$(mktemp -d /tmp/tally-mdb.XXXXXX)
user=$(id -un)
if [ "$(id -u)" = 0 ]; then chown mysql:mysql "$dir"; user=mysql; fi
mariadb-install-db --no-defaults --datadir="$dir/data" --user="$user" \
  --auth-root-authentication-method=socket --skip-test-db --skip-name-resolve >"$dir/install.log" 2>&1 \
  || { cat "$dir/install.log" >&2; exit 1; }
/usr/sbin/mariadbd --no-defaults --datadir="$dir/data" --user="$user" \
  --port="$port" --bind-address=127.0.0.1 --socket="$dir/s" \
  --pid-file="$dir/pid" --log-error="$dir/err.log" --skip-name-resolve \
  --innodb-buffer-pool-size=32M --innodb-log-file-size=16M --max-connections=200 \
  --default-time-zone=+02:00 >/dev/null 2>&1 &
pid=$!
ok=0
for _ in $(seq 1 300); do
  if mariadb-admin --no-defaults --socket="$dir/s" -uroot ping >/dev/null 2>&1; then ok=1; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
[ "$ok" = 1 ] || { echo "mariadbd did not start:" >&2; cat "$dir/err.log" >&2; exit 1; }
mariadb --no-defaults --socket="$dir/s" -uroot <"$here/mariadb.sql" >"$dir/seed.log" 2>&1 \
  || { cat "$dir/seed.log" >&2; exit 1; }
setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done
  kill -KILL $pid 2>/dev/null; sleep 0.5; rm -rf '$dir'" </dev/null >/dev/null 2>&1 &
echo "dir=$dir port=$port pid=$pid"

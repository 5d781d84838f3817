#!/usr/bin/env bash
# A throw-away PostgreSQL 15 cluster on 127.0.0.1:PORT for the tests (shared/TEST-SERVERS.md §2),
# seeded with the test schema (postgres.sql), stopped and removed when OWNER_PID exits.
#   postgres.sh PORT OWNER_PID       prints "dir=DIR port=PORT" once ready
#   postgres.sh PORT OWNER_PID tls   also serves TLS with a certificate for 127.0.0.1 from a throw-away
#                                    CA (openssl), whose certificate is DIR/tls/ca.crt
# The cluster runs as the OS user postgres (initdb refuses root); the superuser reaches it over the
# private socket in DIR (trust), everyone else over TCP with scram-sha-256.
set -euo pipefail
port=$1 owner=$2 mode=${3:-plain}
here=$(cd "$(dirname "$0")" && pwd)
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "PostgreSQL is not installed (apt-get install postgresql; .ci/test-servers does it)" >&2; exit 1; }
dir=$(mktemp -d /tmp/tally-pg.XXXXXX)
echo 'superuser-pw' >"$dir/pw"; chmod 600 "$dir/pw"
if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$dir" "$dir/pw"; fi
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
as_postgres "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pw" -E UTF8 --no-locale \
  --auth-local=trust --auth-host=scram-sha-256 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
tls_options=""
if [ "$mode" = tls ]; then
  mkdir "$dir/tls"; cd "$dir/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -subj /CN=tally-test-ca -days 2 \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 \
    -extfile server.ext 2>/dev/null
  chmod 600 server.key; if [ "$(id -u)" = 0 ]; then chown postgres server.key server.crt; fi; cd - >/dev/null
  tls_options="-c ssl=on -c ssl_cert_file=$dir/tls/server.crt -c ssl_key_file=$dir/tls/server.key"
fi
as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 30 start \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 $tls_options" >/dev/null \
  || { cat "$dir/log" >&2; exit 1; }
as_postgres "$bin/psql" -X -q -h "$dir" -p "$port" -U postgres -v ON_ERROR_STOP=1 -f "$here/postgres.sql" >"$dir/seed.log" 2>&1 \
  || { cat "$dir/seed.log" >&2; exit 1; }
# The watcher: when the test process is gone, the cluster goes (immediate stop) and its files.
setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done
  pid=\$(head -1 '$dir/data/postmaster.pid' 2>/dev/null) && kill -QUIT \$pid 2>/dev/null
  sleep 1; rm -rf '$dir'" </dev/null >/dev/null 2>&1 &
echo "dir=$dir port=$port bin=$bin"

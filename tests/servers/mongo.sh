#!/usr/bin/env bash
# A MongoDB wire-protocol server on 127.0.0.1:PORT for the tests, stopped when OWNER_PID exits:
#   mongo.sh PORT OWNER_PID           nx-27017 (PyPI; documents kept in SQLite), seeded by mongo_seed.py
#   mongo.sh PORT OWNER_PID script    mockupdb answering as mongo_script.py says
# prints "dir=DIR port=PORT" once ready.
# The Python environment is target/test-venv (made by .ci/test-servers from requirements.txt).
set -euo pipefail
port=$1 owner=$2 mode=${3:-data}
here=$(cd "$(dirname "$0")" && pwd)
venv=${TALLY_TEST_VENV:-$here/../../target/test-venv}
[ -x "$venv/bin/nx-27017" ] || { echo "nx-27017 is not installed in $venv (run bash .ci/test-servers)" >&2; exit 1; }
dir=$(mktemp -d /tmp/tally-mongo.XXXXXX)
if [ "$mode" = script ]; then
  "$venv/bin/python" "$here/mongo_script.py" "$port" "$dir" >"$dir/out" 2>&1 &
else
  "$venv/bin/nx-27017" --db memory --host 127.0.0.1 -p "$port" --log-file "$dir/log" --pid-file "$dir/pid" >"$dir/out" 2>&1 &
fi
pid=$!
ok=0
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ok=1; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
[ "$ok" = 1 ] || { echo "the $mode MongoDB server did not start:" >&2; tail -20 "$dir/out" >&2; exit 1; }
[ "$mode" = script ] || "$venv/bin/python" "$here/mongo_seed.py" "$port" >"$dir/seed.log" 2>&1 || { echo "seeding failed:" >&2; tail -5 "$dir/seed.log" >&2; exit 1; }
setsid bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done
  kill -KILL $pid 2>/dev/null; rm -rf '$dir'" </dev/null >/dev/null 2>&1 &
echo "dir=$dir port=$port pid=$pid"

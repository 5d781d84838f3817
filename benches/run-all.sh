#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, one after the other, on one machine, with
# the results written to target/bench-results/ (or the directory given).
# About 12 minutes on the 2-core machine of BENCHMARKS.md, plus the builds.
# The start-up benchmark is separate (it generates a ~9 GB log first):
#
#   target/release/tally-startup --dir target/startup-10m --tally target/release/tally
#
# Run it on a quiet machine: the figures are ratios of one run, but a
# neighbour's fsyncs and CPU still move them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-target/bench-results}"
mkdir -p "$out"

cargo build --release --locked -p tally-bench -p tally-cli
cargo build --release --locked -p tally-projections --examples

echo "== write path: physical limit, naive CRUD, tally Ledger (10,000 members, 1,000,000 events)"
target/release/tally-bench | tee "$out/write.md"

echo "== peer: cqrs-es + sqlite-es"
benches/peers/run.sh | tee "$out/peer-cqrs-es.md"

echo "== query execution: overhead and cache hits beside the usage route (tally-exec)"
target/release/tally-exec | tee "$out/exec.md"

echo "== database sources: tally beside the driver, per provider (tally-sources; needs bash .ci/test-servers)"
target/release/tally-sources | tee "$out/sources.md"

echo "== SaaS presets beside rest, the Airtable pacer's floor (tally-saas)"
target/release/tally-saas | tee "$out/saas.md"

echo "== analytics on a 1M-event log, the usage route with and without the followers, webhook delivery (tally-followers)"
target/release/tally-followers --tally target/release/tally | tee "$out/followers.md"

echo "== HTTP on loopback: tally-load at fixed rates"
http_dir="$(mktemp -d)"
port=18282
TALLY_ADMIN_KEY=bench-admin-key target/release/tally --data-dir "$http_dir" serve --demo --addr "127.0.0.1:$port" \
  >"$out/http-server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -rf "$http_dir"' EXIT
for _ in $(seq 1 200); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
target/release/tally-load --url "http://127.0.0.1:$port" --admin-key bench-admin-key --route both \
  --rates 1000,5000,10000,20000 --seconds 10 | tee "$out/http.md"
# Batch usage beside single usage on the same server (run 6): records/s compare.
target/release/tally-load --url "http://127.0.0.1:$port" --admin-key bench-admin-key --route usage-batch \
  --batch-records 100 --rates 100,200,300 --seconds 10 | tee "$out/http-batch.md"
kill "$server"
wait "$server" || true

echo "== projections: rebuild of a 1,000,000-event log, lag under writes"
target/release/examples/rebuild_throughput | tee "$out/rebuild.md"
target/release/examples/projection_lag | tee "$out/lag.md"

echo "== micro-benchmarks (criterion)"
cargo bench --locked -p tally-ledger --bench write_path -- --warm-up-time 1 --measurement-time 3 | tee "$out/micro.txt"

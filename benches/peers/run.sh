#!/usr/bin/env bash
# Build and run the cqrs-es 0.5 + sqlite-es 0.5 peer of tally-bench, in
# release, with its own lockfile (benches/peers/cqrs-es/Cargo.lock). Flags
# are passed through and named as tally-bench's: --seconds, --members,
# --prefill, --dir, --smoke (plus --submitters, --snapshot-every, --pool).
# The database goes in a fresh target/peer-cqrs-es-* directory, removed at
# the end. Not run in CI.
#
#   benches/peers/run.sh                  # 10,000 members, 100,000 events, 5 s per case
#   benches/peers/run.sh --smoke          # ~2 s
#
# The build runs under `nice -n 10`; set CARGO_BUILD_JOBS=1 to leave cores
# free on a shared machine. The measured run is not niced.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
manifest="$root/benches/peers/cqrs-es/Cargo.toml"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/benches/peers/cqrs-es/target}"
mkdir -p "$root/target"

nice -n 10 cargo build --release --locked --manifest-path "$manifest"
exec cargo run --release --locked --manifest-path "$manifest" -- --dir "$root/target" "$@"

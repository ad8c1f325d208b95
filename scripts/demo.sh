#!/usr/bin/env bash
# The main job on an embedded default: boots a simulated Pilot VM on this machine (network
# namespaces, its own dockerd, a PostgreSQL host), runs `pilot-agent up` in it and shows what
# changed, then removes everything. Touches nothing of the host. Needs root and scripts/setup.sh.
#   scripts/demo.sh [--keep]     --keep leaves the VM running (scripts/harness-clean removes it)
#   scripts/demo.sh --build-only  builds what the demo runs and exits (scripts/setup.sh uses it)
set -euo pipefail
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/pilot-agent/target}
cd "$(dirname "$0")/.."
# What the demo runs, and nothing else: not pilot-image, whose AWS SDK takes most of a cold
# build of the workspace.
cargo build --release --quiet -p pilot-agent --bin pilot-agent -p waypoint-standin --bin waypoint \
  -p pilot-e2e --bin pilot-demo
[ "${1:-}" = --build-only ] && exit 0
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (network namespaces, dockerd, nftables)" >&2; exit 1; }
exec "$CARGO_TARGET_DIR/release/pilot-demo" "$@"

#!/usr/bin/env bash
# The main job on an embedded default: boots a simulated Pilot VM on this machine (network
# namespaces, its own dockerd, a PostgreSQL host), runs `pilot-agent up` in it and shows what
# changed, then removes everything. Touches nothing of the host. Needs root and scripts/setup.sh.
#   scripts/demo.sh [--keep]     --keep leaves the VM running (scripts/harness-clean removes it)
set -euo pipefail
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/pilot-agent/target}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root (network namespaces, dockerd, nftables)" >&2; exit 1; }
cargo build --release --workspace --quiet
exec "$CARGO_TARGET_DIR/release/pilot-demo" "$@"

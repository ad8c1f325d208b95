#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the end-to-end suites that drive the real
# binaries against real daemons (dockerd, nftables, PostgreSQL, moto, sshd, cloud-init) inside
# network namespaces the tests create. Needs root and a machine prepared by scripts/setup.sh.
#
# The end-to-end suites fail (they do not skip) when root, namespaces or a daemon are missing.
set -euo pipefail
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/pilot-agent/target}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

[ "$(id -u)" = 0 ] || { echo "test.sh: the end-to-end suites need root (network namespaces, dockerd, nftables)" >&2; exit 1; }

step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

# Leftovers of a crashed earlier run (only harness-named namespaces, veths, mounts, processes).
step "harness-clean"
bash scripts/harness-clean

step "cargo fmt --check"
cargo fmt --all -- --check
# fuzz/ is its own workspace (cargo-fuzz), outside --all.
(cd fuzz && cargo fmt -- --check)

step "cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings

# The suites run the release binaries of every workspace package (agent, image, stand-in).
step "cargo build"
cargo build --release --workspace --quiet

step "cargo nextest"
# Each test runs in its own process (a panicking suite cannot leave another's VM behind), with
# the timeouts in .config/nextest.toml.
cargo nextest run --release --workspace --profile ci "$@"

# Every committed seed and kept crash replayed, then a few seconds of fuzzing per target:
# a regression on a known crash fails here (docs/reliability.md#fuzzing).
step "fuzz --ci"
bash scripts/fuzz --ci

step "harness-clean (after)"
bash scripts/harness-clean --check

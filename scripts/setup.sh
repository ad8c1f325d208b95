#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine (run as root): installs every real component
# the tests drive (Docker, nftables, PostgreSQL, sshd, cloud-init, debootstrap, QEMU, moto) and
# builds the workspace. Idempotent: a second run checks and changes nothing.
#
# Daemons are never started here: the packages' maintainer scripts are told not to start services
# (policy-rc.d), because a host dockerd would rewrite this machine's own firewall and bridges. The
# tests start their own daemons inside network namespaces they create.
#
# It builds only what scripts/demo.sh runs; scripts/test.sh builds the rest of the workspace.
set -euo pipefail

PILOT_OPT=${PILOT_OPT:-/opt/pilot-agent}
VENV=$PILOT_OPT/venv
QEMU_PREFIX=$PILOT_OPT/qemu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/pilot-agent/target}
REPO=$(cd "$(dirname "$0")/.." && pwd)

log() { printf '[setup %5.1fs] %s\n' "$SECONDS" "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages); try: sudo $0"
[ -r /etc/os-release ] || die "cannot read /etc/os-release: this script supports Debian 12 only"
. /etc/os-release
[ "${ID:-}" = debian ] && [ "${VERSION_ID:-}" = 12 ] ||
  die "this script supports Debian 12 (bookworm) only; found ${PRETTY_NAME:-unknown}"

PACKAGES=(
  docker.io containerd runc nftables iptables socat iproute2 util-linux procps psmisc
  postgresql postgresql-client openssh-server openssh-client cloud-init debootstrap busybox-static
  e2fsprogs fdisk dosfstools qemu-utils python3-venv ca-certificates curl wrk hyperfine
  build-essential pkg-config
  # pilot-image build --target local: the root file system (mmdebstrap), the EFI system
  # partition's files written without a mount (mtools), the NoCloud seed of the boot test
  # (genisoimage), the UEFI firmware the boot test boots the image with (ovmf).
  mmdebstrap mtools genisoimage ovmf
)
# QEMU's system emulator cannot be apt-installed next to the backported qemu-utils (HARNESS.md);
# its packages are unpacked into a prefix instead.
QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  # Keep maintainer scripts from starting dockerd, sshd or a PostgreSQL cluster on the host.
  policy=/usr/sbin/policy-rc.d
  had_policy=0
  [ -e "$policy" ] && had_policy=1
  if [ $had_policy = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ $had_policy = 0 ]; then rm -f "$policy"; trap - EXIT; fi
else
  log "Debian packages: all present"
fi

if [ ! -x "$QEMU_PREFIX/usr/bin/qemu-system-x86_64" ] || ! "$PILOT_OPT/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
  log "unpacking QEMU into $QEMU_PREFIX"
  tmp=$(mktemp -d)
  (
    cd "$tmp"
    [ -n "$(ls /var/lib/apt/lists/*Packages 2>/dev/null)" ] || apt-get update -qq
    # The emulator's own packages plus every library dependency this machine lacks.
    deps=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances --recurse "${QEMU_PACKAGES[@]}" 2>/dev/null |
      awk '/^[a-z0-9]/ {print $1}' | grep -v '^<' | sort -u)
    want=("${QEMU_PACKAGES[@]}")
    for d in $deps; do installed "$d" || want+=("$d"); done
    apt-get download -qq $(printf '%s\n' "${want[@]}" | sort -u) >/dev/null 2>&1 ||
      for p in $(printf '%s\n' "${want[@]}" | sort -u); do apt-get download -qq "$p" >/dev/null 2>&1 || true; done
    mkdir -p "$QEMU_PREFIX"
    for deb in ./*.deb; do dpkg-deb -x "$deb" "$QEMU_PREFIX"; done
  )
  rm -rf "$tmp"
  mkdir -p "$PILOT_OPT/bin"
  cat >"$PILOT_OPT/bin/qemu-system-x86_64" <<WRAP
#!/bin/sh
# Runs the unpacked QEMU with its own libraries and firmware (see scripts/setup.sh).
export LD_LIBRARY_PATH=$QEMU_PREFIX/usr/lib/x86_64-linux-gnu:$QEMU_PREFIX/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
exec $QEMU_PREFIX/usr/bin/qemu-system-x86_64 -L $QEMU_PREFIX/usr/share/qemu -L $QEMU_PREFIX/usr/share/seabios "\$@"
WRAP
  chmod 755 "$PILOT_OPT/bin/qemu-system-x86_64"
  "$PILOT_OPT/bin/qemu-system-x86_64" --version | head -1 || die "unpacked QEMU does not run; see $QEMU_PREFIX"
else
  log "QEMU: present ($("$PILOT_OPT/bin/qemu-system-x86_64" --version | head -1))"
fi

if ! "$VENV/bin/python" -c 'import moto, boto3, flask' >/dev/null 2>&1; then
  log "creating Python venv with moto[server] and boto3 at $VENV"
  python3 -m venv "$VENV" 2>/dev/null || /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.*' 'boto3<2'
else
  log "moto venv: present"
fi

# `publish --target gcp`'s tests (image/tests/gcp_publish.rs): a Cloud Storage emulator in the
# same venv (the JSON API's resumable uploads, custom metadata, prefix listings, deletes; run in
# memory), beside the Compute Engine stand-in (tests/gcp-compute-standin, Flask from above).
if ! "$VENV/bin/python" -c 'import gcp_storage_emulator' >/dev/null 2>&1; then
  log "installing gcp-storage-emulator into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'gcp-storage-emulator==2026.7.19'
else
  log "gcp-storage-emulator: present"
fi

if ! command -v cargo >/dev/null 2>&1; then
  die "cargo not found: install a Rust toolchain (rustup) and re-run"
fi
# The test runner (scripts/test.sh); present on this project's machines, installed otherwise.
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked --quiet cargo-nextest
fi
# The agent's Debian package (scripts/build-deb).
if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb"
  cargo install --locked --quiet cargo-deb
fi
# The fuzz targets (scripts/fuzz, scripts/fuzz --ci).
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install --locked --quiet cargo-fuzz
fi
# Only what the demo runs (scripts/demo.sh): the agent, the Waypoint stand-in and the demo
# driver. pilot-image and its AWS SDK, the largest part of the workspace to compile, are
# built by scripts/test.sh (or `cargo build --release -p pilot-image`) when they are needed.
log "building the demo (agent, Waypoint stand-in, demo driver) into $CARGO_TARGET_DIR"
mkdir -p "$CARGO_TARGET_DIR"
(cd "$REPO" && bash scripts/demo.sh --build-only)
log "done"

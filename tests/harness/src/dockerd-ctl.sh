#!/usr/bin/env bash
# dockerd-ctl {start|stop|restart|status} for the dockerd of simulated Pilot VM @NAME@.
#
# Written by pilot-harness (tests/harness/src/vm.rs); it plays the service manager of the VM:
# the harness uses it, and the agent's "command" service backend calls `dockerd-ctl restart`
# after rewriting daemon.json, as it would call `systemctl restart docker` on a real VM.
#
# The daemon runs in the VM's network and UTS namespaces (nsenter, not `ip netns exec`, which
# remounts /sys and makes dockerd die with "Devices cgroup isn't mounted"), detached with
# setsid, configured only by @DIR@/daemon.json: no -H flag, because dockerd refuses a "hosts"
# key in the file together with -H. It logs to @DIR@/dockerd.log.
#
# Exit status: 0 done / running; 1 failure (with the end of the dockerd log on stderr);
# 3 (status only) stopped.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

NAME='@NAME@'
DIR='@DIR@'
NETNS="/run/netns/$NAME"
UTS='/proc/@HOLDER@/ns/uts'
CONFIG="$DIR/daemon.json"
PIDFILE="$DIR/dockerd.pid"
CONTAINERD_PIDFILE="$DIR/exec/containerd/containerd.pid"
SOCK="$DIR/docker.sock"
LOG="$DIR/dockerd.log"
START_TIMEOUT=${DOCKERD_CTL_START_TIMEOUT:-30}
# dockerd gives each running container 10 s to stop after SIGTERM, and a shutdown 15 s in all.
STOP_TIMEOUT=${DOCKERD_CTL_STOP_TIMEOUT:-40}

say() { printf 'dockerd-ctl[%s]: %s\n' "$NAME" "$*" >&2; }
now_ms() { date +%s%3N; }
tail_log() { tail -n 40 "$LOG" >&2 2>/dev/null || true; }

# The scheduler state of a process (empty when gone): the field after the last ')' in stat.
state() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1; }
running() { local s; s=$(state "$1"); [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]; }

# Prints the PID in FILE if that process runs and its command line contains MARKER: a PID file
# can outlive its process and the number be reused by an unrelated one.
live_pid() {
  local file=$1 marker=$2 pid
  [ -r "$file" ] || return 1
  pid=$(head -n1 "$file" | tr -dc 0-9)
  [ -n "$pid" ] && running "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$marker" || return 1
  echo "$pid"
}
dockerd_pid() { live_pid "$PIDFILE" "--config-file $CONFIG"; }
containerd_pid() { live_pid "$CONTAINERD_PIDFILE" "$DIR/"; }
ping() { curl -sf --max-time 2 --unix-socket "$SOCK" http://localhost/_ping >/dev/null 2>&1; }

# Waits until PID is gone or DEADLINE (ms since the epoch) passes.
wait_gone() {
  while running "$1"; do
    [ "$(now_ms)" -lt "$2" ] || return 1
    sleep 0.05
  done
}

stop_pid() { # PID WHAT TIMEOUT_S
  kill -TERM "$1" 2>/dev/null || return 0
  if ! wait_gone "$1" $(($(now_ms) + $3 * 1000)); then
    say "$2 (pid $1) still running after $3 s: killing it"
    kill -KILL "$1" 2>/dev/null
    wait_gone "$1" $(($(now_ms) + 5000)) || { say "$2 (pid $1) survived SIGKILL"; return 1; }
  fi
}

do_stop() {
  local pid cpid
  cpid=$(containerd_pid) || cpid=
  if pid=$(dockerd_pid); then
    stop_pid "$pid" dockerd "$STOP_TIMEOUT" || return 1
  fi
  # dockerd stops the containerd it started; one left behind (dockerd killed) is stopped here.
  if [ -n "$cpid" ] && cpid=$(containerd_pid); then
    stop_pid "$cpid" containerd 10 || return 1
  fi
  say "stopped"
}

do_start() {
  local pid launched deadline
  if pid=$(dockerd_pid) && ping; then
    say "already running (pid $pid)"
    return 0
  fi
  [ -e "$UTS" ] || { say "the VM's UTS namespace holder is gone ($UTS)"; return 1; }
  [ -e "$NETNS" ] || { say "the VM's network namespace is gone ($NETNS)"; return 1; }
  printf -- '--- dockerd-ctl start %s ---\n' "$(date -Is)" >>"$LOG"
  # setsid: the daemon outlives this script and its caller's session, as under an init system.
  # 9>&-: it must not inherit the lock below.
  setsid nsenter --net="$NETNS" --uts="$UTS" -- env PILOT_HARNESS_OWNER="$NAME" \
    dockerd --config-file "$CONFIG" >>"$LOG" 2>&1 </dev/null 9>&- &
  launched=$!
  deadline=$(($(now_ms) + START_TIMEOUT * 1000))
  until ping; do
    if ! running "$launched"; then
      say "dockerd exited during start-up; end of $LOG:"
      tail_log
      return 1
    fi
    if [ "$(now_ms)" -ge "$deadline" ]; then
      say "dockerd did not answer on $SOCK within $START_TIMEOUT s; end of $LOG:"
      tail_log
      return 1
    fi
    sleep 0.05
  done
  say "started (pid $launched)"
}

do_status() {
  local pid
  if pid=$(dockerd_pid); then
    if ping; then echo "running (pid $pid)"; return 0; fi
    echo "not answering on $SOCK (pid $pid)"
    return 1
  fi
  echo "stopped"
  return 3
}

# One operation at a time: the harness and the agent may both act on the same daemon.
exec 9>"$DIR/dockerd-ctl.lock"
flock 9

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  restart) do_stop && do_start ;;
  status) do_status ;;
  *) echo "usage: $0 {start|stop|restart|status}" >&2; exit 2 ;;
esac

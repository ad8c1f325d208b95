#!/usr/bin/env bash
# A faithful replay of the ORIGINAL Pilot's post-install steps on one simulated VM, for
# scripts/bench (tests/e2e/src/bin/bench.rs): what happened between "the VM booted with Docker
# and Waypoint installed" and "the Pilot CLI holds a Waypoint token". Sources (read for
# behaviour only):
#   [T] pilot-framework/pilot-cli src/util/templates.ts: the cloud-init user-data
#       (write_files daemon.json + docker.service override, runcmd daemon-reload + restart)
#   [G] pilot-framework/pilot-cli src/util/gcp/exec.ts installWaypoint: `await timeout(30000)`
#       "wait for docker daemon to finish coming online", then `waypoint install` over SSH
#   [A] pilot-framework/pilot-cli src/util/aws/exec.ts: getWaypointAuthToken (`ssh pilot@IP
#       "waypoint token new"`), setContext (`await timeout(2000)` then `waypoint context
#       create`), configureRunner (`await timeout(2000)` then `waypoint config set -runner
#       DOCKER_HOST=tcp://IP:2375`)
#   [D] hashicorp/waypoint internal/serverinstall/docker.go Install: image list/pull, network
#       "waypoint", container "waypoint-server" (volume waypoint-server:/data, ports 9701 and
#       9702, `server run -accept-tos -vv -db=/data/data.db -listen-grpc ... -listen-http ...`),
#       start, then `time.Sleep(5 * time.Second)` ("KLUDGE: There isn't a way to find out if the
#       container is up or not")
#   [I] hashicorp/waypoint internal/cli/install.go: connect with up to 12 retries, 5 s apart;
#       BootstrapToken; SetServerConfig (advertise address); installRunner: GenerateLoginToken,
#       runner container on network "waypoint", AdoptRunner (waits until the runner registered)
#
# What is NOT replayed, each in the replay's favour: the apt installs of docker-ce and
# waypoint that the user-data ran at every boot [T]; the image pull from Docker Hub (here: a
# `docker load` of the baked tarball, as the agent does); SSH round trips; AWS's EC2 status
# polling every 10 s (serverReachability) instead of [G]'s fixed 30 s.
#
# The Waypoint CLI and server are the project's Waypoint STAND-IN (tests/waypoint-standin),
# driven through the docker CLI as `waypoint install` drives the Docker API.
#
# Environment (set by bench.rs): DOCKER_HOST (the VM's dockerd socket), PILOT_DAEMON_JSON,
# PILOT_DOCKER_RESTART (the VM's service restart command), PILOT_IMAGE, PILOT_IMAGE_TAR,
# PILOT_VM_NETNS (/run/netns/NAME), PILOT_VM_ADDR. PILOT_REPLAY_SLEEP_SCALE (default 1) scales
# the fixed sleeps, for a quick smoke test of this script only.
#
# Prints one JSON line on stdout: {"total_s", "fixed_sleeps_s", "connect_retries", "phases"}.
set -euo pipefail
: "${DOCKER_HOST:?}" "${PILOT_DAEMON_JSON:?}" "${PILOT_DOCKER_RESTART:?}" "${PILOT_IMAGE:?}"
: "${PILOT_IMAGE_TAR:?}" "${PILOT_VM_NETNS:?}" "${PILOT_VM_ADDR:?}"
SCALE=${PILOT_REPLAY_SLEEP_SCALE:-1}
export DOCKER_HOST
export DOCKER_CONFIG=${DOCKER_CONFIG:-$(mktemp -d)}

now() { date +%s.%N; }
T0=$(now)
SLEPT=0
PHASES=""
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
phase() { PHASES="$PHASES\"$1\": $(calc "$(now) - $T0"), "; }
fixed_sleep() { # a fixed sleep of the original, in seconds
  local s; s=$(calc "$1 * $SCALE")
  sleep "$s"
  SLEPT=$(calc "$SLEPT + $s")
}
in_vm() { nsenter --net="$PILOT_VM_NETNS" -- "$@"; }

# [T] write_files: daemon.json with the plain API on every address, and the socket. (The
# override.conf that clears `-H fd://` has no counterpart: the harness's dockerd reads only
# its config file.) The harness's own keys (data-root, pidfile, ...) are kept.
/usr/bin/python3 - "$PILOT_DAEMON_JSON" <<'EOF'
import json, sys
p = sys.argv[1]
cfg = json.load(open(p))
sock = next(h for h in cfg["hosts"] if h.startswith("unix://"))
cfg["hosts"] = ["tcp://0.0.0.0:2375", sock]
cfg["log-driver"] = "json-file"
cfg["log-opts"] = {"max-size": "200m", "max-file": "3"}
open(p, "w").write(json.dumps(cfg))
EOF
# [T] runcmd: systemctl daemon-reload; systemctl restart docker.service
$PILOT_DOCKER_RESTART >/dev/null
phase docker_restarted

# [G] the CLI's fixed wait for dockerd.
fixed_sleep 30
phase cli_wait

# [D] waypoint install -platform=docker -docker-server-image=IMAGE -accept-tos
if [ -z "$(docker image ls -q "$PILOT_IMAGE")" ]; then
  docker load -q -i "$PILOT_IMAGE_TAR" >/dev/null # stands in for ImagePull
fi
if [ -z "$(docker network ls -q --filter label=use=waypoint)" ]; then
  docker network create --driver bridge --attachable --label use=waypoint waypoint >/dev/null
fi
docker create --name waypoint-server --label waypoint-type=server \
  --network waypoint -v waypoint-server:/data -p 9701:9701 -p 9702:9702 -e PORT=9701 -i \
  "$PILOT_IMAGE" server run -accept-tos -vv -db=/data/data.db \
  -listen-grpc=0.0.0.0:9701 -listen-http=0.0.0.0:9702 >/dev/null
docker start waypoint-server >/dev/null
phase server_started
fixed_sleep 5 # [D] KLUDGE
phase server_kludge

# [I] connect with retries (12 at most, 5 s apart), then BootstrapToken.
RETRIES=0
while ! TOKEN=$(docker run --rm --network container:waypoint-server "$PILOT_IMAGE" \
    server bootstrap -server-addr=127.0.0.1:9701 -server-tls-skip-verify 2>/dev/null); do
  [ "$RETRIES" -ge 12 ] && { echo "replay: cannot reach the server after 12 retries" >&2; exit 1; }
  RETRIES=$((RETRIES + 1))
  fixed_sleep 5
done
TOKEN=$(echo "$TOKEN" | tr -d '[:space:]')
phase bootstrapped
client_env=(-e WAYPOINT_SERVER_ADDR=127.0.0.1:9701 -e "WAYPOINT_SERVER_TOKEN=$TOKEN"
  -e WAYPOINT_SERVER_TLS=true -e WAYPOINT_SERVER_TLS_SKIP_VERIFY=true)
# [I] SetServerConfig: the advertise address.
docker exec "${client_env[@]}" waypoint-server waypoint server config-set \
  -advertise-addr=waypoint-server:9701 -advertise-tls-skip-verify >/dev/null
# [I] installRunner: GenerateLoginToken, then the runner container on network "waypoint".
RUNNER_TOKEN=$(docker exec "${client_env[@]}" waypoint-server waypoint token new | tr -d '[:space:]')
docker run -d --name waypoint-runner --label waypoint-type=runner --network waypoint \
  -e WAYPOINT_SERVER_ADDR=waypoint-server:9701 -e "WAYPOINT_SERVER_TOKEN=$RUNNER_TOKEN" \
  -e WAYPOINT_SERVER_TLS=true -e WAYPOINT_SERVER_TLS_SKIP_VERIFY=true \
  "$PILOT_IMAGE" runner agent -id static -vv >/dev/null
# [I] AdoptRunner: until the runner has registered with the server.
for _ in $(seq 1 600); do
  if in_vm curl -ks --max-time 1 -H "Authorization: Bearer $TOKEN" \
      https://127.0.0.1:9702/v1/runners | grep -q '"static"'; then
    break
  fi
  sleep 0.05
done
in_vm curl -ks --max-time 1 -H "Authorization: Bearer $TOKEN" \
  https://127.0.0.1:9702/v1/runners | grep -q '"static"' \
  || { echo "replay: the runner never registered" >&2; exit 1; }
phase runner_adopted

# [A] getWaypointAuthToken: `waypoint token new` on the VM (over SSH in the original).
CLI_TOKEN=$(docker exec "${client_env[@]}" waypoint-server waypoint token new | tr -d '[:space:]')
[ -n "$CLI_TOKEN" ] || { echo "replay: no token" >&2; exit 1; }
phase token_fetched
# [A] setContext and configureRunner: each after a fixed 2 s wait (the CLI-side commands
# themselves, `waypoint context create` and `waypoint config set -runner
# DOCKER_HOST=tcp://IP:2375`, are local bookkeeping and not replayed).
fixed_sleep 2
fixed_sleep 2
phase done

TOTAL=$(calc "$(now) - $T0")
printf '{"total_s": %s, "fixed_sleeps_s": %s, "connect_retries": %d, "docker_host_for_runner": "tcp://%s:2375", "phases": {%s}}\n' \
  "$TOTAL" "$SLEPT" "$RETRIES" "$PILOT_VM_ADDR" "${PHASES%, }"

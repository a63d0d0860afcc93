#!/usr/bin/env bash
# Make gVisor's runsc a runtime of the local Docker engine: install Debian's runsc when
# missing, register it as "runsc" in the engine's daemon config with the --network=none
# runtime argument (without it runsc ignores network mode none and gives the sandbox a
# network stack of its own), and make the engine re-read its config (SIGHUP: runtimes are
# among the settings dockerd reloads). Only the engine scripts/ensure-docker.sh started is
# signalled, by the pid in its pidfile. Safe to run repeatedly; a no-op once the engine lists it.
set -euo pipefail

sock=${EXPBUILD_DOCKER_SOCKET:-/var/run/docker.sock}
config=${EXPBUILD_DOCKERD_CONFIG:-/etc/docker/daemon.json}
pidfile=${EXPBUILD_DOCKERD_PIDFILE:-/tmp/expbuild-dockerd.pid}

docker_() { docker -H "unix://$sock" "$@"; }

runtime_listed() {
  docker_ info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'
}

if runtime_listed; then
  echo "ensure-runsc: the engine already lists runsc"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-runsc: registering runsc with the engine needs root" >&2
  exit 1
fi
if ! command -v runsc >/dev/null 2>&1; then
  echo "ensure-runsc: installing runsc"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends runsc >/dev/null
fi
runsc_path=$(command -v runsc)

# Merge the runtime into the daemon config, keeping whatever else it holds.
mkdir -p "$(dirname "$config")"
python3 - "$config" "$runsc_path" <<'PY'
import json, os, sys

path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path) as fh:
        config = json.load(fh)
except FileNotFoundError:
    config = {}
config.setdefault("runtimes", {})["runsc"] = {"path": runsc, "runtimeArgs": ["--network=none"]}
tmp = f"{path}.tmp"
with open(tmp, "w") as fh:
    json.dump(config, fh, indent=2)
    fh.write("\n")
os.replace(tmp, path)
PY
echo "ensure-runsc: registered runsc in $config"

if [ ! -s "$pidfile" ] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "ensure-runsc: no engine started by ensure-docker.sh (pidfile $pidfile); reload the engine" \
    "yourself (kill -HUP its pid) and run this again" >&2
  exit 1
fi
pid=$(cat "$pidfile")
if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
  echo "ensure-runsc: process $pid from $pidfile is not dockerd; not signalling it" >&2
  exit 1
fi
echo "ensure-runsc: asking dockerd ($pid) to reload its config"
kill -HUP "$pid"
for _ in $(seq 1 40); do
  if runtime_listed; then
    echo "ensure-runsc: the engine lists runsc"
    exit 0
  fi
  sleep 0.25
done
echo "ensure-runsc: the engine did not list runsc after a reload" >&2
exit 1

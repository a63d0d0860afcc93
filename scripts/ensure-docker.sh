#!/usr/bin/env bash
# Make a Docker engine answer on the local socket: install Debian's docker.io and
# busybox-static when missing, start dockerd in the background when the socket is silent,
# and wait until the engine answers. Safe to run repeatedly; reuses a running engine.
set -euo pipefail

sock=${EXPBUILD_DOCKER_SOCKET:-/var/run/docker.sock}
log=${EXPBUILD_DOCKERD_LOG:-/tmp/expbuild-dockerd.log}

engine_answers() {
  command -v docker >/dev/null 2>&1 &&
    docker -H "unix://$sock" version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# The Docker tests build their images FROM scratch around the static busybox.
static_busybox_present() {
  if command -v dpkg >/dev/null 2>&1; then
    dpkg -s busybox-static >/dev/null 2>&1
  else
    [ -x /bin/busybox ]
  fi
}

need=()
engine_answers || command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
static_busybox_present || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-docker: need root and apt-get to install ${need[*]}" >&2
    exit 1
  fi
  echo "ensure-docker: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if engine_answers; then
  echo "ensure-docker: engine already answers on $sock"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-docker: no engine answers on $sock, and starting dockerd needs root" >&2
  exit 1
fi
echo "ensure-docker: starting dockerd (log: $log)"
nohup dockerd --host "unix://$sock" >"$log" 2>&1 &
echo $! > /tmp/expbuild-dockerd.pid

for _ in $(seq 1 120); do
  if engine_answers; then
    echo "ensure-docker: engine $(docker -H "unix://$sock" version --format '{{.Server.Version}}') ready"
    exit 0
  fi
  sleep 0.5
done
echo "ensure-docker: engine did not answer within 60 s; last log lines:" >&2
tail -n 30 "$log" >&2 || true
exit 1

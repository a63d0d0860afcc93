#!/usr/bin/env bash
# Build the local busybox image the Docker example config runs actions in: FROM scratch plus
# Debian's static busybox and its applet links. No registry is needed. Safe to run repeatedly.
# Usage: scripts/build-test-image.sh [TAG]   (default expbuild/busybox:local)
set -euo pipefail

tag=${1:-expbuild/busybox:local}
busybox=${EXPBUILD_BUSYBOX:-/bin/busybox}

if ! [ -x "$busybox" ]; then
  echo "build-test-image: $busybox is missing; install busybox-static (or run scripts/ensure-docker.sh)" >&2
  exit 1
fi
if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "build-test-image: no Docker engine answers; run scripts/ensure-docker.sh first" >&2
  exit 1
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$busybox" "$context/busybox"
cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
DOCKERFILE
# The classic builder needs no buildx plugin; its deprecation notice is kept out of sight.
if ! DOCKER_BUILDKIT=0 docker build --pull=false --tag "$tag" "$context" >"$context/build.log" 2>&1; then
  cat "$context/build.log" >&2
  exit 1
fi
echo "build-test-image: built $tag"

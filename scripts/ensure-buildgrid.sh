#!/usr/bin/env bash
# Make BuildGrid runnable for the scale-out tests: a virtualenv of its own holding `buildgrid`
# (with its database extra), and Debian's PostgreSQL server binaries. BuildGrid's generated
# protobuf modules cannot share a process with googleapis-common-protos, so it never goes into
# the worker's virtualenv. Safe to run repeatedly: an existing, working virtualenv is kept.
#
#   EXPBUILD_BUILDGRID_VENV   where the virtualenv lives (default: .cache/buildgrid-venv in the repo)
#   EXPBUILD_BUILDGRID_SPEC   what pip installs (default: buildgrid[database]==0.4.4)
#   PYTHON                    the interpreter that creates the virtualenv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${EXPBUILD_BUILDGRID_VENV:-$PWD/.cache/buildgrid-venv}
spec=${EXPBUILD_BUILDGRID_SPEC:-buildgrid[database]==0.4.4}
python=${PYTHON:-python3}

postgres_present() {
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null
}

need=()
postgres_present || need+=(postgresql)
"$python" -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-buildgrid: need root and apt-get to install ${need[*]}" >&2
    exit 1
  fi
  echo "ensure-buildgrid: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's package starts a cluster of its own; the tests run a private one and need none.

if [ -x "$venv/bin/bgd" ] && "$venv/bin/python" -c 'import buildgrid, psycopg2, sqlalchemy' 2>/dev/null; then
  echo "ensure-buildgrid: $("$venv/bin/pip" show buildgrid 2>/dev/null | sed -n 's/^Version: /buildgrid /p') ready in $venv"
  exit 0
fi

mkdir -p "$(dirname "$venv")"
# Keep a cache directory under the repository out of version control without touching .gitignore.
case "$venv" in
  "$PWD"/.cache/*) [ -f .cache/.gitignore ] || printf '*\n' > .cache/.gitignore ;;
esac
echo "ensure-buildgrid: creating $venv with $spec"
"$python" -m venv --clear "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "$spec" psycopg2-binary
"$venv/bin/python" -c 'import buildgrid, psycopg2, sqlalchemy'
echo "ensure-buildgrid: $("$venv/bin/pip" show buildgrid | sed -n 's/^Version: /buildgrid /p') ready in $venv"

#!/usr/bin/env bash
# The compose test, end to end, on a machine without a registry (docs/compose.md):
#
#   compose/test/run.sh            (as root, or with sudo; from anywhere)
#
# 1. installs docker.io, docker-compose (v1) and debootstrap with apt when missing;
# 2. starts dockerd when none answers (and stops that one, by pid, at the end);
# 3. makes the local Debian base image local/bookworm:base with debootstrap, cached
#    as a `docker save` tarball in $LLMESH_COMPOSE_CACHE (/tmp/llmesh-compose-cache);
# 4. stages the build context (the repository's files that git tracks or does not
#    ignore, plus a local torch CPU wheel when there is one and the host's CA bundle
#    in compose/local/), outside the working tree;
# 5. runs compose/test/test_compose.py with the project's .venv: it builds the
#    images, brings the stack up, checks it and brings it down;
# 6. cleans up: the stack (again, in case the test was cut short), the staged
#    context, the dockerd it started.
#
# Bounded: every step has a timeout; the whole run at most $LLMESH_COMPOSE_TEST_TIMEOUT_S
# (default 1800 s; a cold 2-core machine takes about six and a half minutes, most of it
# pip inside the image build).
# Logs: $LLMESH_COMPOSE_LOG_DIR (default /tmp/llmesh-compose-test-logs).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${LLMESH_COMPOSE_CACHE:-/tmp/llmesh-compose-cache}"
LOG_DIR="${LLMESH_COMPOSE_LOG_DIR:-/tmp/llmesh-compose-test-logs}"
PROJECT="${LLMESH_COMPOSE_PROJECT:-llmesh-compose-test}"
TEST_TIMEOUT_S="${LLMESH_COMPOSE_TEST_TIMEOUT_S:-1800}"
PYTHON="${LLMESH_PYTHON:-$ROOT/.venv/bin/python}"
BASE_IMAGE=local/bookworm:base
# Debian's docker client (it matches Debian's dockerd) before any other on PATH
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

START=$(date +%s)
log() { echo "[compose-test $(( $(date +%s) - START ))s] $*" >&2; }
die() { log "error: $*"; exit 1; }

SUDO=""
AS_ROOT=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "run as root (Docker, apt and debootstrap need it)"
  SUDO="sudo"
  AS_ROOT=(sudo -E)
fi
[ -x "$PYTHON" ] || die "$PYTHON not found: run \`make install\` first (the test's gRPC client)"
"$PYTHON" -c 'import llmesh.v1.inference_pb2, pytest' 2>/dev/null \
  || die "$PYTHON lacks the generated protos or pytest: run \`make install\`"

mkdir -p "$CACHE" "$LOG_DIR"
rm -f "$LOG_DIR"/*.log
DOCKERD_PID=""
STAGE=""
ROOTFS=""

cleanup() {
  local rc=$?
  set +e
  if [ -n "${COMPOSE:-}" ] && [ -n "$STAGE" ]; then
    log "bringing the stack down (if anything is left)"
    LLMESH_BUILD_CONTEXT="$STAGE" LLMESH_TEST_TRACES_DIR=/tmp \
      timeout 180 $COMPOSE -p "$PROJECT" -f "$ROOT/compose/docker-compose.yml" \
      -f "$ROOT/compose/test/docker-compose.test.yml" down -v --remove-orphans --timeout 5 \
      >>"$LOG_DIR/cleanup.log" 2>&1
  fi
  [ -n "$STAGE" ] && rm -rf "$STAGE"
  [ -n "$ROOTFS" ] && $SUDO rm -rf "$ROOTFS"
  if [ -n "$DOCKERD_PID" ]; then
    log "stopping dockerd (pid $DOCKERD_PID)"
    $SUDO kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 60); do $SUDO kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    if $SUDO kill -0 "$DOCKERD_PID" 2>/dev/null; then
      log "dockerd did not stop in 30 s; killing it"
      $SUDO kill -KILL "$DOCKERD_PID" 2>/dev/null
    fi
  fi
  log "done (exit $rc); logs in $LOG_DIR"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. packages
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  timeout 300 $SUDO apt-get update -qq >"$LOG_DIR/apt.log" 2>&1 || die "apt-get update failed; see $LOG_DIR/apt.log"
  DEBIAN_FRONTEND=noninteractive timeout 600 $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 || die "apt-get install failed; see $LOG_DIR/apt.log"
fi
COMPOSE="docker-compose"
docker-compose version >/dev/null 2>&1 || die "docker-compose does not run"

# 2. the Docker daemon
DOCKER="$SUDO docker"
if ! timeout 20 $DOCKER info >/dev/null 2>&1; then
  log "starting dockerd"
  $SUDO dockerd >"$LOG_DIR/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  timeout 60 sh -c "until $DOCKER info >/dev/null 2>&1; do sleep 1; done" \
    || die "dockerd did not answer in 60 s; see $LOG_DIR/dockerd.log"
fi
log "docker $($DOCKER version -f '{{.Server.Version}}'), $(docker-compose version --short)"

# 3. the local Debian base
if ! $DOCKER image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  if [ -s "$CACHE/bookworm-base.tar" ]; then
    log "loading $BASE_IMAGE from $CACHE"
    timeout 300 $DOCKER load -i "$CACHE/bookworm-base.tar" >/dev/null \
      || die "docker load of $CACHE/bookworm-base.tar failed"
  else
    # the mirror this machine's apt is configured with; the project names no package host
    MIRROR=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -n "$MIRROR" ] || MIRROR=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -n "$MIRROR" ] || die "no Debian mirror found for debootstrap: looked for a 'URIs:' line in /etc/apt/sources.list.d/*.sources and a 'deb' line in /etc/apt/sources.list"
    ROOTFS=$(mktemp -d /tmp/llmesh-rootfs.XXXXXX)
    log "debootstrap bookworm from $MIRROR"
    timeout 900 $SUDO debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" \
      >"$LOG_DIR/debootstrap.log" 2>&1 || die "debootstrap failed; see $LOG_DIR/debootstrap.log"
    $SUDO rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    $SUDO tar -C "$ROOTFS" -c . | timeout 300 $DOCKER import - "$BASE_IMAGE" >/dev/null \
      || die "docker import of the rootfs failed"
    $SUDO rm -rf "$ROOTFS"; ROOTFS=""
    timeout 300 $DOCKER save -o "$CACHE/bookworm-base.tar.tmp" "$BASE_IMAGE" \
      && mv "$CACHE/bookworm-base.tar.tmp" "$CACHE/bookworm-base.tar"
  fi
fi

# 4. the staged build context: what git tracks or does not ignore, as it is now
STAGE=$(mktemp -d /tmp/llmesh-compose-context.XXXXXX)
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$STAGE" -xf - \
  || die "staging the build context failed"
mkdir -p "$STAGE/compose/local"
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$STAGE/compose/local/"
# torch: a local CPU wheel for the base's Python (3.11 on bookworm) when there is one,
# else the PyTorch CPU index
WHEEL=$(ls "${LLMESH_TORCH_WHEEL_DIR:-/opt/wheels}"/torch-2.13.0+cpu-cp311-cp311-manylinux*_x86_64.whl 2>/dev/null | head -n1 || true)
if [ -n "$WHEEL" ]; then
  cp "$WHEEL" "$STAGE/compose/local/"
  export LLMESH_TORCH_SPEC="torch==2.13.0+cpu" LLMESH_TORCH_PIP_ARGS="--find-links /tmp/local"
  log "torch from $WHEEL"
else
  export LLMESH_TORCH_SPEC="torch==2.13.0" LLMESH_TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
  log "torch from the PyTorch CPU index"
fi

# 5. the test
log "running compose/test/test_compose.py (build, up, checks, down)"
set +e
(cd "$ROOT" && LLMESH_BUILD_CONTEXT="$STAGE" LLMESH_COMPOSE_LOG_DIR="$LOG_DIR" \
  LLMESH_COMPOSE_PROJECT="$PROJECT" LLMESH_COMPOSE="$COMPOSE" \
  timeout --kill-after=30 "$TEST_TIMEOUT_S" "${AS_ROOT[@]}" "$PYTHON" -m pytest \
  compose/test/test_compose.py -p no:cacheprovider -q -rA -s \
  -o addopts="" -o testpaths="compose/test")
rc=$?
set -e
[ $rc -eq 124 ] && log "the test ran past ${TEST_TIMEOUT_S}s"
log "test exit status $rc (wall $(( $(date +%s) - START ))s)"
exit $rc

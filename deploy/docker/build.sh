#!/usr/bin/env bash
# Build the images with no image registry: a Debian bookworm base made with debootstrap
# (python3.11 + redis-server), the Modelyard image from a wheelhouse built on the host (pip
# inside the build installs offline), and Prometheus from Debian's package on the same base.
# Needs root, debootstrap, a running Docker engine and a Debian mirror (DEBIAN_MIRROR).
#
#   deploy/docker/build.sh [--build-dir DIR] [IMAGE]     (default modelyard:latest)
#
# The build directory (about 450 MB: the base's root filesystem and the wheelhouse) is DIR,
# else $MODELYARD_BUILD_DIR, else $TMPDIR/modelyard-build, else /var/tmp/modelyard-build.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${MODELYARD_BUILD_DIR:-${TMPDIR:-/var/tmp}/modelyard-build}
if [[ ${1:-} == --build-dir ]]; then
    WORK=${2:?--build-dir needs a directory}
    shift 2
fi
IMAGE=${1:-modelyard:latest}
BASE=modelyard-base:bookworm
PROMETHEUS=${PROMETHEUS_IMAGE:-modelyard-prometheus:latest}
echo "building in $WORK"

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    echo "building $BASE with debootstrap (a few minutes, once)"
    rm -rf "$WORK/rootfs" && mkdir -p "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,redis-server,redis-tools,ca-certificates \
        bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE"
    rm -rf "$WORK/rootfs"
fi

echo "building the wheelhouse on the host"
rm -rf "$WORK/context" && mkdir -p "$WORK/context/wheelhouse"
# Debian's python3 is 3.11.2; redis-py needs async-timeout below 3.11.3, which the host's
# newer 3.11 does not resolve, so it is added explicitly.
.venv/bin/python -m pip wheel -q --wheel-dir "$WORK/context/wheelhouse" . "async-timeout==5.0.1"
cp deploy/docker/Dockerfile "$WORK/context/Dockerfile"
docker build --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" "$WORK/context"
echo "built $IMAGE"

# Grafana has no Debian package (nor a PyPI or npm one carrying its server): the observability
# profile's grafana service still needs grafana/grafana from a registry, or loaded by hand.
docker build --build-arg "BASE_IMAGE=$BASE" -t "$PROMETHEUS" -f deploy/docker/Dockerfile.prometheus deploy/docker
echo "built $PROMETHEUS"

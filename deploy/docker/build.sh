#!/usr/bin/env bash
# Build the modelyard image with no image registry: a Debian bookworm base made with
# debootstrap (python3.11 + redis-server), and a wheelhouse built on the host so pip inside
# the build installs offline. Needs root, debootstrap and a running Docker engine.
#
#   deploy/docker/build.sh [IMAGE]          (default modelyard:latest)
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${1:-modelyard:latest}
BASE=modelyard-base:bookworm
WORK=${MODELYARD_BUILD_DIR:-/var/tmp/modelyard-build}

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    echo "building $BASE with debootstrap (a few minutes, once)"
    rm -rf "$WORK/rootfs" && mkdir -p "$WORK/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,redis-server,redis-tools,ca-certificates \
        bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE"
fi

echo "building the wheelhouse on the host"
rm -rf "$WORK/context" && mkdir -p "$WORK/context/wheelhouse"
# Debian's python3 is 3.11.2; redis-py needs async-timeout below 3.11.3, which the host's
# newer 3.11 does not resolve, so it is added explicitly.
.venv/bin/python -m pip wheel -q --wheel-dir "$WORK/context/wheelhouse" . "async-timeout==5.0.1"
cp deploy/docker/Dockerfile "$WORK/context/Dockerfile"
docker build --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" "$WORK/context"
echo "built $IMAGE"

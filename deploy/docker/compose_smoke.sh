#!/usr/bin/env bash
# Bring the compose cluster up on a local Docker engine (profiles core and observability),
# register the demo model, send Predict calls through the published gateway port, check
# Prometheus (targets up, alert rules loaded, the dashboard's main panels have data) and
# Grafana, and tear everything down. The cluster runs with access control on, with throwaway
# secrets; the calls carry its admin key. Any failed step fails the script (set -e; Compose
# through scripts/compose, which keeps its exit status).
#
#   deploy/docker/build.sh && deploy/docker/compose_smoke.sh
#
# MODELYARD_SMOKE_GRAFANA: auto (default: Grafana when its image is on the engine or can be
# pulled, which needs a registry; else said so and left out), 1 (required), 0 (left out).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROJECT=modelyard-smoke
compose() { scripts/compose -p "$PROJECT" --profile core --profile observability "$@"; }
MODELYARD_SECRETS_DIR=$(mktemp -d)
export MODELYARD_SECRETS_DIR
trap 'compose down -v --remove-orphans >/dev/null 2>&1 || true; rm -rf "$MODELYARD_SECRETS_DIR"' EXIT
deploy/secrets/make.sh >/dev/null

services=(redis registry model-server-1 model-server-2 gateway monitor prometheus)
grafana_image=${GRAFANA_IMAGE:-grafana/grafana:12.1.0}
case ${MODELYARD_SMOKE_GRAFANA:-auto} in
    1) services+=(grafana) ;;
    0) echo "compose smoke: Grafana left out (MODELYARD_SMOKE_GRAFANA=0)" ;;
    *) if docker image inspect "$grafana_image" >/dev/null 2>&1 \
            || timeout 60 docker pull -q "$grafana_image" >/dev/null 2>&1; then
           services+=(grafana)
       else
           echo "compose smoke: NOT CHECKING GRAFANA: $grafana_image is not on this engine and cannot be pulled"
       fi ;;
esac
compose up -d --wait --wait-timeout 180 "${services[@]}"
# Register and check the answers from inside the compose network, in a one-off container (it
# has the registry's secrets, the admin key among them, under /run/secrets): its exit status is
# the script's.
compose run --rm --no-deps -T -e PYTHONUNBUFFERED=1 registry python - <<'PY'
import asyncio
import torch
from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model

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
from modelyard_cli.demo import predict_until_served
token = open(os.path.join(os.environ["MODELYARD_SECRETS_DIR"], "admin_key")).read().strip()
answers = asyncio.run(predict_until_served("127.0.0.1:50051", "demo", [torch.randn(2, 64)], token=token))
print(f"host client: served by demo v{answers[0].version}")
try:  # and without a key, refused
    asyncio.run(predict_until_served("127.0.0.1:50051", "demo", [torch.randn(2, 64)]))
    raise SystemExit("host client: a call without an API key was served")
except grpc.aio.AioRpcError as exc:
    assert exc.code() is grpc.StatusCode.UNAUTHENTICATED, exc.code()
    print("host client: a call without an API key is refused (UNAUTHENTICATED)")
# The registry is published too (the README's tour dials it there).
from modelyard.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
with grpc.insecure_channel("127.0.0.1:50061") as channel:
    got = reg_grpc.RegistryServiceStub(channel).GetModel(
        reg.GetModelRequest(name="demo"), metadata=(("authorization", f"Bearer {token}"),), timeout=10
    )
print(f"host client: the registry at 127.0.0.1:50061 knows model {got.model.name!r}")
PY
if [[ " ${services[*]} " == *" grafana "* ]]; then
    .venv/bin/python deploy/docker/smoke_observability.py http://127.0.0.1:9090 http://127.0.0.1:3000
else
    .venv/bin/python deploy/docker/smoke_observability.py http://127.0.0.1:9090
fi
echo "compose smoke: passed (${services[*]})"

"""A server from `create_server` and a channel from `open_channel` in one process: one call,
an idle spell, then a busy one, each several keepalive intervals long; prints a JSON verdict.

Run by tests/integration/test_keepalive.py in a subprocess (so gRPC's log is on its stderr):

    MODELYARD_GRPC_KEEPALIVE_TIME_MS=1000 \
        python tests/integration/keepalive_probe.py IDLE_S BUSY_S [--strict-server]

`--strict-server` gives the server gRPC's default ping policy, as before the keepalive was aligned.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.rpc import keepalive
from modelyard.rpc.server import create_server
from modelyard.settings import ServerSettings, TLSSettings
from modelyard.tls import open_channel


async def main(idle_s: float, busy_s: float) -> dict[str, object]:
    srv = create_server(ServerSettings(), TLSSettings(), service_names=[], register=lambda s: None)
    await srv.start()
    await srv.set_serving(True)
    states: list[str] = []
    calls = failures = 0
    async with open_channel(srv.address, None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def watch() -> None:
            state = channel.get_state()
            while True:
                await channel.wait_for_state_change(state)
                state = channel.get_state()
                states.append(state.name)

        async def call() -> None:
            nonlocal calls, failures
            calls += 1
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                failures += 1

        await call()  # connects
        watcher = asyncio.get_running_loop().create_task(watch())
        await asyncio.sleep(idle_s)
        deadline = time.monotonic() + busy_s
        while time.monotonic() < deadline:
            await call()
            await asyncio.sleep(0.01)
        watcher.cancel()
    await srv.drain(grace_s=1)
    return {"calls": calls, "failures": failures, "states": states}


if __name__ == "__main__":
    if "--strict-server" in sys.argv:
        keepalive.server_options = keepalive.client_options  # type: ignore[assignment]  # the misconfiguration under test
    print(json.dumps(asyncio.run(main(float(sys.argv[1]), float(sys.argv[2])))))

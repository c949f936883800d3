"""Per-key limits at a real gateway (keys published in a real Redis, calls over gRPC): a key
over its rate is refused RESOURCE_EXHAUSTED with RetryInfo, and another key's calls go on."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelyard.access import KeyRecord, hash_token, new_key_token
from modelyard.access.client import bearer_metadata
from modelyard.coordination import CoordinationStore
from modelyard.settings import AccessSettings
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from tests.integration.conftest import LaunchGateway


def _key(name: str, **limits: float) -> tuple[KeyRecord, str]:
    key_id, token = new_key_token()
    record = KeyRecord(key_id, name, hash_token(token), ("predict:*",), **limits)  # type: ignore[arg-type]
    return record, token


async def _publish(store: CoordinationStore, *records: KeyRecord, epoch: int) -> None:
    await store.apply_access_keys({r.key_id: json.dumps(r.to_json()) for r in records}, epoch)


async def _codes(stub: inf_grpc.InferenceServiceStub, token: str, n: int) -> list[grpc.aio.AioRpcError]:
    failures = []
    for _ in range(n):
        try:
            await stub.Predict(inf.PredictRequest(model="nope"), metadata=bearer_metadata(token), timeout=5)
        except grpc.aio.AioRpcError as exc:
            failures.append(exc)
    return failures


async def test_a_key_over_its_rate_is_refused_alone(
    launch_gateway: LaunchGateway, store: CoordinationStore
) -> None:
    noisy, noisy_token = _key("noisy", rate_per_s=2.0)
    quiet, quiet_token = _key("quiet")
    await _publish(store, noisy, quiet, epoch=1)
    gateway = await launch_gateway(access=AccessSettings(mode="enforce", key_refresh_interval_s=0.1))
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        noisy_codes = [e.code() for e in await _codes(stub, noisy_token, 6)]
        quiet_codes = [e.code() for e in await _codes(stub, quiet_token, 6)]
        # The model does not exist: admitted calls are NOT_FOUND, refused ones RESOURCE_EXHAUSTED.
        assert noisy_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 3, noisy_codes
        assert grpc.StatusCode.RESOURCE_EXHAUSTED not in quiet_codes, quiet_codes

        refused = next(
            e for e in await _codes(stub, noisy_token, 3) if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        status = rpc_status.from_call(refused)
        assert status is not None
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert retry, "RESOURCE_EXHAUSTED without RetryInfo"
        info = error_details_pb2.RetryInfo()
        retry[0].Unpack(info)
        assert 0 < info.retry_delay.ToNanoseconds() <= 0.5e9
        assert "noisy" in (refused.details() or "")


async def test_keys_published_later_are_accepted_and_revoked_ones_refused(
    launch_gateway: LaunchGateway, store: CoordinationStore
) -> None:
    gateway = await launch_gateway(access=AccessSettings(mode="enforce", key_refresh_interval_s=0.1))
    record, token = _key("late")
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        assert [e.code() for e in await _codes(stub, token, 1)] == [grpc.StatusCode.UNAUTHENTICATED]
        await _publish(store, record, epoch=1)
        await asyncio.sleep(0.5)
        assert [e.code() for e in await _codes(stub, token, 1)] == [grpc.StatusCode.NOT_FOUND]
        # A FLUSHALL loses the keys: the gateway keeps its last copy (known keys keep working).
        await store.client.flushall()
        await asyncio.sleep(0.5)
        assert [e.code() for e in await _codes(stub, token, 1)] == [grpc.StatusCode.NOT_FOUND]
        await _publish(store, epoch=2)  # the registry republishes without the key: revoked
        await asyncio.sleep(0.5)
        assert [e.code() for e in await _codes(stub, token, 1)] == [grpc.StatusCode.UNAUTHENTICATED]


@pytest.mark.parametrize("host", ["0.0.0.0"])
async def test_a_gateway_with_access_off_refuses_to_listen_on_a_reachable_address(
    launch_gateway: LaunchGateway, host: str
) -> None:
    from modelyard.settings import ServerSettings

    with pytest.raises(RuntimeError, match="access control off"):
        await launch_gateway(
            access=AccessSettings(mode="off"), server=ServerSettings(host=host, port=0, metrics_port=0)
        )


async def test_metrics_asks_for_a_token_when_told(
    launch_gateway: LaunchGateway, store: CoordinationStore
) -> None:
    reader, reader_token = _key("reader")
    reader = KeyRecord(reader.key_id, reader.name, reader.token_hash, ("monitor.read",))
    caller, caller_token = _key("caller")
    await _publish(store, reader, caller, epoch=1)
    gateway = await launch_gateway(access=AccessSettings(mode="enforce", metrics="authenticated"))
    url = f"http://{gateway.server.metrics_address}/metrics"

    def get(token: str | None) -> int:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    codes = await asyncio.to_thread(lambda: [get(None), get("garbage"), get(caller_token), get(reader_token)])
    assert codes == [401, 401, 401, 200]

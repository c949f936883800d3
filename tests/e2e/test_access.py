"""Access control on a real cluster (`LocalCluster`: real processes, access enforced, the
admin key the registry made on its first start).

The matrix: every RPC of every service (from the services' descriptors, so a new RPC is in
it without anyone adding it here) is called with each of {none, garbage, unknown, expired,
revoked, wrong verb, wrong model, right}, and every answer must be as specified:

- none, garbage, unknown, expired, revoked: UNAUTHENTICATED;
- wrong verb, wrong model: PERMISSION_DENIED (wrong model only where the rule names a model);
- right: anything but UNAUTHENTICATED or PERMISSION_DENIED (the RPC's own answer). For an
  internal RPC the right caller is a service token, and an admin key is PERMISSION_DENIED.

Then: how long a revocation takes to be enforced at the gateway and the monitor (measured and
printed), that the audit log names the authenticated principal whatever header the caller
sends, that refused mutating calls are audited, and that while Redis is down a known key keeps
working and an unknown one stays refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory

from modelyard.access.keys import ServiceTokens, new_key_token
from modelyard.access.rules import AUTHENTICATED, INTERNAL, RULES, Rule
from modelyard.oip import grpc_service_pb2  # noqa: F401 - registers the OIP descriptors
from modelyard.tensor_codec import tensor_to_proto
from modelyard.tls import open_channel
from modelyard.v1 import (
    access_service_pb2,
    access_service_pb2_grpc,
    inference_service_pb2,
    model_server_service_pb2,  # noqa: F401 - registers the descriptors
    monitor_service_pb2,
    monitor_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
)
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard_cli.demo import build_demo_model, demo_signature, register_model
from modelyard_cli.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(300)

CREDENTIALS = ("none", "garbage", "unknown", "expired", "revoked", "wrong verb", "wrong model", "right")
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

# Field values that make a "right" call of a mutating RPC harmless: a version that does not
# exist, an epoch that is not the model's, a key that does not exist.
HARMLESS: dict[str, dict[str, Any]] = {
    "SetAlias": {"alias": "matrix", "version": 99},
    "RollbackAlias": {"alias": "nope"},
    "PromoteVersion": {"alias": "matrix", "version": 99},
    "SetDeployment": {"expected_epoch": 10**9},
    "ArchiveModelVersion": {"version": 99},
    "DeleteModelVersion": {"version": 99},
    "GetModelVersion": {"version": 1},
    "DownloadModelVersion": {"version": 99},
    "RevokeApiKey": {"key": "nope"},
    "RotateApiKey": {"key": "nope"},
    "CreateModel": {},
    "CreateApiKey": {"grants": ["metadata:demo"]},
}


def _request(method: Any, model: str, name: str) -> Any:
    cls = message_factory.GetMessageClass(method.input_type)
    message = cls()
    fields = {f.name for f in method.input_type.fields}
    for field in ("model", "name", "model_name"):
        if field in fields:
            setattr(message, field, model)
    if method.name == "CreateApiKey":
        message.name = f"matrix-{name.replace(' ', '-')}"
    if "request" in fields and method.input_type.fields_by_name["request"].message_type is not None:
        message.request.model = model
    if "metadata" in fields and method.name == "UploadModelVersion":
        message.metadata.model = model
    for field, value in HARMLESS.get(method.name, {}).items():
        if isinstance(value, list):
            getattr(message, field).extend(value)
        else:
            setattr(message, field, value)
    return message


async def _call(
    channel: grpc.aio.Channel, service: str, method: Any, request: Any, token: str | None
) -> grpc.StatusCode:
    path = f"/{service}/{method.name}"
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    serialize = type(request).SerializeToString
    deserialize = message_factory.GetMessageClass(method.output_type).FromString
    try:
        if method.client_streaming:
            call = (
                channel.stream_stream(path, serialize, deserialize)
                if method.server_streaming
                else channel.stream_unary(path, serialize, deserialize)
            )

            async def one() -> AsyncIterator[Any]:
                yield request

            reply = call(one(), metadata=metadata, timeout=2.0)
            if method.server_streaming:
                async for _ in reply:
                    break
            else:
                await reply
        elif method.server_streaming:
            stream = channel.unary_stream(path, serialize, deserialize)(
                request, metadata=metadata, timeout=2.0
            )
            async for _ in stream:
                break
        else:
            await channel.unary_unary(path, serialize, deserialize)(request, metadata=metadata, timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.INTERNAL:
            print(f"{path}: INTERNAL {exc.details()}")
        return exc.code()
    return grpc.StatusCode.OK


async def _admin(cluster: LocalCluster) -> access_service_pb2_grpc.AccessServiceStub:
    channel = open_channel(cluster.address_of("registry"), None, token=cluster.api_key)
    return access_service_pb2_grpc.AccessServiceStub(channel)


async def _make_key(stub: Any, name: str, grants: list[str], ttl_s: int = 0) -> str:
    reply = await stub.CreateApiKey(
        access_service_pb2.CreateApiKeyRequest(name=name, grants=grants, ttl_seconds=ttl_s)
    )
    return str(reply.token)


def _slug(text: str) -> str:
    return text.replace(".", "-").replace("*", "all").replace(":", "-")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    local = LocalCluster(data_dir=tmp_path / "cluster", ports="free")
    try:
        await local.start()
        yield local
    finally:
        await local.stop()


async def _wait_until(check: Any, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_every_rpc_answers_every_credential_as_specified(cluster: LocalCluster) -> None:
    assert cluster.api_key is not None
    _, artifact = build_demo_model()
    await register_model(
        cluster.address_of("registry"), "demo", artifact, demo_signature(), token=cluster.api_key
    )
    admin = await _admin(cluster)
    service_token = ServiceTokens(cluster.secret_file.read_bytes().strip()).token("gateway")

    # One key per grant the rules need, one on another model, one expired and one revoked.
    verbs = sorted(
        {rule.verb for kind in RULES.values() for rules in kind.values() for rule in rules.values()}
    )
    right: dict[str, str] = {}
    other_model: dict[str, str] = {}
    for verb in verbs:
        if verb in (AUTHENTICATED, INTERNAL):
            continue
        scoped = verb not in ("monitor.read", "audit.read", "admin")
        right[verb] = await _make_key(admin, f"right-{_slug(verb)}", [f"{verb}:demo" if scoped else verb])
        if scoped:
            other_model[verb] = await _make_key(admin, f"other-{_slug(verb)}", [f"{verb}:other-*"])
    predict_only = await _make_key(admin, "predict-only", ["predict:*"])
    metadata_only = await _make_key(admin, "metadata-only", ["metadata:*"])
    expired = await _make_key(admin, "expired", ["admin"], ttl_s=1)
    revoked = await _make_key(admin, "revoked", ["admin"])
    await admin.RevokeApiKey(access_service_pb2.RevokeApiKeyRequest(key="revoked"))
    _, unknown = new_key_token()
    await asyncio.sleep(1.5)  # the expired key expires; the books have the latest keys

    addresses = {
        "gateway": cluster.gateway_address,
        "registry": cluster.address_of("registry"),
        "monitor": cluster.address_of("monitor"),
        "model_server": cluster.address_of("model-server-1"),
    }
    pool = descriptor_pool.Default()
    failures: list[str] = []
    lines = [f"{'method':58} " + " ".join(f"{c[:11]:>11}" for c in CREDENTIALS)]
    for kind, services in RULES.items():
        channel = open_channel(addresses[kind], None)
        try:
            for service, rules in services.items():
                descriptor = pool.FindServiceByName(service)
                assert set(rules) == {m.name for m in descriptor.methods}, (
                    f"{service}: a method without a rule"
                )
                for method in descriptor.methods:
                    rule: Rule = rules[method.name]
                    tokens: dict[str, str | None] = {
                        "none": None,
                        "garbage": "not-a-key",
                        "unknown": unknown,
                        "expired": expired,
                        "revoked": revoked,
                    }
                    expected = {c: grpc.StatusCode.UNAUTHENTICATED for c in tokens}
                    if rule.verb == INTERNAL:
                        tokens["wrong verb"] = cluster.api_key  # even admin
                        expected["wrong verb"] = grpc.StatusCode.PERMISSION_DENIED
                        tokens["right"] = service_token
                    elif rule.verb == AUTHENTICATED:
                        tokens["right"] = metadata_only
                    else:
                        tokens["wrong verb"] = predict_only if rule.verb != "predict" else metadata_only
                        expected["wrong verb"] = grpc.StatusCode.PERMISSION_DENIED
                        if rule.model is not None or rule.in_handler:
                            tokens["wrong model"] = other_model[rule.verb]
                            expected["wrong model"] = grpc.StatusCode.PERMISSION_DENIED
                        tokens["right"] = right[rule.verb]
                    row = []
                    for credential in CREDENTIALS:
                        if credential not in tokens:
                            row.append(f"{'n/a':>11}")
                            continue
                        request = _request(method, "demo", credential)
                        code = await _call(channel, service, method, request, tokens[credential])
                        row.append(f"{code.name[:11]:>11}")
                        want = expected.get(credential)
                        ok = code not in DENIED if want is None else code == want
                        if not ok:
                            failures.append(f"{kind} {service}/{method.name} with {credential}: {code.name}")
                    lines.append(
                        f"{kind + ' ' + service.rsplit('.', 1)[-1] + '/' + method.name:58} " + " ".join(row)
                    )
        finally:
            await channel.close()
    print("\n".join(lines))
    assert not failures, "\n".join(failures)


async def test_revocation_audit_and_redis_down(cluster: LocalCluster) -> None:
    assert cluster.api_key is not None and cluster.redis is not None
    _, artifact = build_demo_model()
    await register_model(
        cluster.address_of("registry"), "demo", artifact, demo_signature(), token=cluster.api_key
    )
    admin = await _admin(cluster)
    token = await _make_key(admin, "caller", ["predict:demo", "monitor.read", "alias.move:demo"])
    request = inference_service_pb2.PredictRequest(
        model="demo", inputs=[tensor_to_proto("input", torch.randn(1, 64))]
    )
    gateway = inf_grpc.InferenceServiceStub(open_channel(cluster.gateway_address, None, token=token))
    monitor = monitor_service_pb2_grpc.MonitorServiceStub(
        open_channel(cluster.address_of("monitor"), None, token=token)
    )

    async def predicts() -> bool:
        try:
            await gateway.Predict(request, timeout=5)
            return True
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                return False
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                return False  # still loading
            raise

    await _wait_until(predicts, 60)

    # The audit's actor is the key, whatever the caller claims in its metadata.
    registry = registry_service_pb2_grpc.RegistryServiceStub(
        open_channel(cluster.address_of("registry"), None, token=token)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await registry.SetAlias(
            registry_service_pb2.SetAliasRequest(model="demo", alias="x", version=99),
            metadata=(("x-modelyard-user", "admin@example.com"),),
        )
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await registry.DeleteModelVersion(
            registry_service_pb2.DeleteModelVersionRequest(model="demo", version=1)
        )
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "registry.write:demo" in (denied.value.details() or "")
    audit = registry_service_pb2_grpc.RegistryServiceStub(
        open_channel(cluster.address_of("registry"), None, token=cluster.api_key)
    )
    entries = (await audit.ListAuditEntries(registry_service_pb2.ListAuditEntriesRequest())).entries
    set_alias = next(e for e in entries if e.method == "SetAlias")
    assert set_alias.actor == "key:caller"
    assert not any(e.actor == "admin@example.com" for e in entries)
    refused = next(e for e in entries if e.method == "DeleteModelVersion")
    assert (refused.actor, refused.outcome) == ("key:caller", "PERMISSION_DENIED")

    # Revocation: measured from the RevokeApiKey answer to the first refused call.
    async def monitor_refuses() -> bool:
        try:
            await monitor.GetClusterStatus(monitor_service_pb2.GetClusterStatusRequest(), timeout=5)
            return False
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAUTHENTICATED:
                raise
            return True

    async def gateway_refuses() -> bool:
        return not await predicts()

    async def monitor_accepts() -> bool:
        return not await monitor_refuses()

    print("monitor accepted after", await _wait_until(monitor_accepts, 10))
    await admin.RevokeApiKey(access_service_pb2.RevokeApiKeyRequest(key="caller"))
    at_gateway, at_monitor = await asyncio.gather(
        _wait_until(gateway_refuses, 5), _wait_until(monitor_refuses, 5)
    )
    print(f"revocation enforced: gateway {at_gateway * 1000:.0f} ms, monitor {at_monitor * 1000:.0f} ms")
    assert at_gateway < 2.0 and at_monitor < 2.0

    # Redis down: a known key keeps working from the last copy, an unknown one is refused.
    known = await _make_key(admin, "known", ["predict:demo"])
    known_stub = inf_grpc.InferenceServiceStub(open_channel(cluster.gateway_address, None, token=known))

    async def known_works() -> bool:
        try:
            await known_stub.Predict(request, timeout=5)
            return True
        except grpc.aio.AioRpcError:
            return False

    await _wait_until(known_works, 5)
    await asyncio.to_thread(cluster.redis.stop)
    await asyncio.sleep(1.0)
    await known_stub.Predict(request, timeout=5)
    _, unknown = new_key_token()
    stranger = inf_grpc.InferenceServiceStub(open_channel(cluster.gateway_address, None, token=unknown))
    with pytest.raises(grpc.aio.AioRpcError) as refused_stranger:
        await stranger.Predict(request, timeout=5)
    assert refused_stranger.value.code() is grpc.StatusCode.UNAUTHENTICATED

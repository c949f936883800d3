"""Registry rollout on real Redis and real servers: racing compare-and-set aliases with a
consistent history, zero-downtime promote and rollback under a steady stream of Predict calls
through a real gateway and model server, deployments (validation, placement, retention),
archive and delete, the audit log, and the repair of a flushed Redis including deployments."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
from google.protobuf import duration_pb2

from gateway.app import GatewayApp
from gateway.settings import GatewaySettings
from model_server.app import ModelServerApp
from model_server.settings import ModelServerSettings
from modelyard.access.client import bearer_metadata
from modelyard.access.keys import new_key_token
from modelyard.coordination import CoordinationStore, Deployment
from modelyard.settings import AccessSettings, RedisSettings, ServerSettings, load_settings
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

MODEL = "mlp"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 16])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
)


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(16, 32)
        self.out = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


_ARTIFACTS: dict[int, bytes] = {}


def artifact(seed: int) -> bytes:
    """A real TorchScript archive of a tiny MLP, one per seed."""
    if seed not in _ARTIFACTS:
        torch.manual_seed(seed)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(TinyMLP().eval()), buffer)
        _ARTIFACTS[seed] = buffer.getvalue()
    return _ARTIFACTS[seed]


# -- fixtures -------------------------------------------------------------------------------

StartRegistry = Callable[..., Awaitable[RegistryApp]]


@pytest.fixture
async def start_registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[StartRegistry]:
    """Factory: a registry on port 0 over `tmp_path/registry`; keyword arguments override
    settings; every one is closed after the test."""
    apps: list[RegistryApp] = []

    async def start(**overrides: Any) -> RegistryApp:
        values: dict[str, Any] = {
            "server": ServerSettings(port=0, drain_grace_s=1.0),
            "redis": redis_settings,
            "data_dir": tmp_path / "registry",
            **overrides,
        }
        app = RegistryApp(load_settings(RegistrySettings, **values))
        apps.append(app)
        await app.start()
        return app

    yield start
    for app in reversed(apps):
        await app.aclose()


@pytest.fixture
async def channels() -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    """Factory: a channel to an address; every one is closed after the test."""
    opened: list[grpc.aio.Channel] = []

    def open_channel(address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        await channel.close()


@pytest.fixture
async def registry(start_registry: StartRegistry) -> RegistryApp:
    return await start_registry()


@pytest.fixture
def stub(registry: RegistryApp, channels: Callable[[str], grpc.aio.Channel]) -> RegistryServiceAsyncStub:
    return RegistryServiceStub(channels(registry.address))


# -- helpers --------------------------------------------------------------------------------


async def upload(
    stub: RegistryServiceAsyncStub, model: str, data: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> int:
    async def requests() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(
            metadata=pb.UploadModelVersionMetadata(
                model=model,
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
            )
        )
        yield pb.UploadModelVersionRequest(chunk=data)

    response = await stub.UploadModelVersion(requests(), metadata=metadata)
    return response.model_version.version


async def model_with_versions(stub: RegistryServiceAsyncStub, seeds: list[int], model: str = MODEL) -> None:
    await stub.CreateModel(pb.CreateModelRequest(name=model))
    for seed in seeds:
        await upload(stub, model, artifact(seed))


async def set_alias(
    stub: RegistryServiceAsyncStub, alias: str, version: int, expected: int | None = None, **kw: Any
) -> pb.SetAliasResponse:
    request = pb.SetAliasRequest(model=MODEL, alias=alias, version=version, **kw)
    if expected is not None:
        request.expected_version = expected
    return await stub.SetAlias(request)


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- compare-and-set under a race -----------------------------------------------------------


async def test_twenty_racing_set_alias_calls_only_matching_ones_win_and_history_is_a_chain(
    stub: RegistryServiceAsyncStub, store: CoordinationStore
) -> None:
    await model_with_versions(stub, [0, 1, 2])
    await set_alias(stub, "production", 1, expected=0)

    # Each call moves the alias one step round 1 -> 2 -> 3 -> 1 if it is where the call
    # expects it; which ones match depends on the order they land in.
    def step(i: int) -> tuple[int, int]:
        expected = i % 3 + 1
        return expected, expected % 3 + 1

    results = await asyncio.gather(
        *(
            set_alias(stub, "production", step(i)[1], expected=step(i)[0], request_id=f"race-{i}")
            for i in range(20)
        ),
        return_exceptions=True,
    )

    winners = {i: r for i, r in enumerate(results) if isinstance(r, pb.SetAliasResponse)}
    losers = [r for r in results if not isinstance(r, pb.SetAliasResponse)]
    assert winners and all(isinstance(e, grpc.aio.AioRpcError) for e in losers), results
    assert {e.code() for e in losers if isinstance(e, grpc.aio.AioRpcError)} <= {grpc.StatusCode.ABORTED}
    for i, won in winners.items():
        # A winner moved the alias from exactly what it expected.
        assert (won.previous_version, won.alias.version) == step(i)

    history = await stub.ListAliasHistory(pb.ListAliasHistoryRequest(model=MODEL, alias="production"))
    moves = list(reversed(history.entries))  # oldest first
    assert [(m.from_version, m.to_version) for m in moves[:1]] == [(0, 1)]
    race = moves[1:]
    # One history entry per winner, no more: each with the winner's request id and epoch.
    assert sorted(m.request_id for m in race) == sorted(f"race-{i}" for i in winners)
    assert {m.request_id: m.epoch for m in race} == {f"race-{i}": w.epoch for i, w in winners.items()}
    # The history is a chain: each move starts where the previous one ended, epochs step by 1.
    for before, after in zip(moves, moves[1:], strict=False):
        assert after.from_version == before.to_version
        assert after.epoch == before.epoch + 1
    final = moves[-1]
    model = (await stub.GetModel(pb.GetModelRequest(name=MODEL))).model
    assert [(a.name, a.version) for a in model.aliases] == [("production", final.to_version)]
    aliases, epoch = await store.get_aliases(MODEL)
    assert (aliases, epoch) == ({"production": final.to_version}, final.epoch)


# -- promote and rollback under traffic -----------------------------------------------------


@dataclass
class Reply:
    started: int
    version: int = 0
    error: str = ""


class SteadyTraffic:
    """Workers that call Predict back to back until stopped, recording each reply with a tick
    taken when the call started; `done` counts finished calls."""

    def __init__(self, stub: inf_grpc.InferenceServiceStub, workers: int = 3) -> None:
        self._stub = stub
        self._workers = workers
        self.replies: list[Reply] = []
        self.tick = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(self._workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _work(self, worker: int) -> None:
        x = torch.randn(2, 16)
        while not self._stop.is_set():
            reply = Reply(started=self.tick)
            try:
                response = await self._stub.Predict(
                    inf.PredictRequest(model=MODEL, alias="production", inputs=[tensor_to_proto("input", x)]),
                    timeout=20,
                )
                reply.version = response.version
            except grpc.aio.AioRpcError as exc:
                reply.error = f"{exc.code().name}: {exc.details()}"
            self.tick += 1
            self.replies.append(reply)
            self._progress.set()

    async def wait_for(self, version: int, count: int) -> int:
        """Wait until `count` replies in a row named `version`; the tick when that happened."""
        while True:
            tail = self.replies[-count:]
            if len(tail) == count and all(r.version == version for r in tail):
                return self.tick
            self._progress.clear()
            await self._progress.wait()

    async def first_reply_from(self, version: int, since: int) -> int:
        """The tick at which a call started at or after `since` first answered from `version`."""
        while True:
            for r in self.replies:
                if r.started >= since and r.version == version:
                    return self.tick
            self._progress.clear()
            await self._progress.wait()


async def test_promote_then_rollback_under_steady_predict_traffic_loses_nothing(
    redis_settings: RedisSettings,
    registry: RegistryApp,
    stub: RegistryServiceAsyncStub,
    channels: Callable[[str], grpc.aio.Channel],
) -> None:
    await model_with_versions(stub, [0, 1])
    await set_alias(stub, "production", 1, expected=0)
    model_server = ModelServerApp(
        load_settings(
            ModelServerSettings,
            server=ServerSettings(port=0, metrics_port=0, drain_grace_s=2.0, heartbeat_interval_s=0.2),
            redis=redis_settings,
            registry_address=registry.address,
            reconcile_interval_s=0.2,
            max_batch_size=8,
        )
    )
    gateway = GatewayApp(
        load_settings(GatewaySettings, server=ServerSettings(port=0, metrics_port=0), redis=redis_settings)
    )
    await model_server.start()
    await gateway.start()
    try:
        predict = inf_grpc.InferenceServiceStub(channels(gateway.address))

        async def serving() -> bool:
            try:
                await predict.Predict(
                    inf.PredictRequest(model=MODEL, inputs=[tensor_to_proto("input", torch.zeros(1, 16))]),
                    timeout=5,
                )
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(serving, timeout_s=60)
        traffic = SteadyTraffic(predict)
        traffic.start()
        try:
            await traffic.wait_for(1, count=10)

            promoted = await stub.PromoteVersion(
                pb.PromoteVersionRequest(
                    model=MODEL,
                    alias="production",
                    version=2,
                    expected_version=1,
                    ready_timeout=duration_pb2.Duration(seconds=60),
                    reason="v2 is better",
                )
            )
            assert (promoted.previous_version, promoted.alias.version) == (1, 2)
            assert promoted.ready_replicas >= 1
            after_promote = traffic.tick
            settled_v2 = await traffic.first_reply_from(2, since=after_promote)
            await traffic.wait_for(2, count=10)

            # The replaced version stays placed for the retention window: rollback is instant.
            deployment = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
            assert list(deployment.placed_versions) == [1, 2]
            before_rollback = traffic.tick
            rolled = await stub.RollbackAlias(
                pb.RollbackAliasRequest(model=MODEL, alias="production", expected_version=2)
            )
            assert (rolled.previous_version, rolled.alias.version) == (2, 1)
            after_rollback = traffic.tick
            settled_v1 = await traffic.first_reply_from(1, since=after_rollback)
            await traffic.wait_for(1, count=10)
        finally:
            await traffic.stop()
    finally:
        await gateway.aclose()
        await model_server.aclose()

    replies = traffic.replies
    assert [r.error for r in replies if r.error] == []
    assert {r.version for r in replies} == {1, 2}
    # Once a call has been answered by the new target, every call started later is too.
    assert {r.version for r in replies if settled_v2 <= r.started < before_rollback} == {2}
    assert {r.version for r in replies if r.started >= settled_v1} == {1}

    history = await stub.ListAliasHistory(pb.ListAliasHistoryRequest(model=MODEL, alias="production"))
    assert [(e.from_version, e.to_version) for e in history.entries] == [(2, 1), (1, 2), (0, 1)]
    assert history.entries[1].reason == "v2 is better"
    assert [e.kind for e in history.entries] == [
        registry_pb2.ALIAS_MOVE_KIND_ROLLBACK,
        registry_pb2.ALIAS_MOVE_KIND_PROMOTE,
        registry_pb2.ALIAS_MOVE_KIND_SET,
    ]


async def test_promote_times_out_without_moving_the_alias_when_no_model_server_runs(
    stub: RegistryServiceAsyncStub, store: CoordinationStore
) -> None:
    await model_with_versions(stub, [0, 1])
    await set_alias(stub, "production", 1, expected=0)

    err = await failure(
        stub.PromoteVersion(
            pb.PromoteVersionRequest(
                model=MODEL,
                alias="production",
                version=2,
                ready_timeout=duration_pb2.Duration(nanos=200_000_000),
            )
        )
    )
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no model server" in (err.details() or "")
    aliases, _ = await store.get_aliases(MODEL)
    assert aliases == {"production": 1}
    # The version placed for the promote is no longer placed.
    deployment = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
    assert list(deployment.placed_versions) == [1]
    stale = await failure(
        stub.PromoteVersion(
            pb.PromoteVersionRequest(model=MODEL, alias="production", version=2, expected_version=2)
        )
    )
    assert stale.code() is grpc.StatusCode.ABORTED


# -- deployments, retention, lifecycle, audit -----------------------------------------------


async def test_deployment_is_validated_placed_and_live_in_redis(
    stub: RegistryServiceAsyncStub, store: CoordinationStore
) -> None:
    await model_with_versions(stub, [0, 1, 2])
    await set_alias(stub, "production", 1, expected=0)
    await set_alias(stub, "canary", 2, expected=0)

    bad = {
        "weights": registry_pb2.Deployment(traffic_split={"production": 90, "canary": 5}),
        "unknown alias": registry_pb2.Deployment(traffic_split={"production": 90, "nope": 10}),
        "shadow": registry_pb2.Deployment(shadow_alias="nope", shadow_fraction=0.5),
        "precision": registry_pb2.Deployment(precision="int3"),
        "pin": registry_pb2.Deployment(pinned_versions=[9]),
    }
    for name, deployment in bad.items():
        err = await failure(stub.SetDeployment(pb.SetDeploymentRequest(model=MODEL, deployment=deployment)))
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, name

    wanted = registry_pb2.Deployment(
        pinned_versions=[3],
        replicas=2,
        precision="bf16",
        max_batch_size=32,
        max_queue_delay_ms=1.5,
        traffic_split={"production": 90, "canary": 10},
        shadow_alias="canary",
        shadow_fraction=0.25,
    )
    got = (await stub.SetDeployment(pb.SetDeploymentRequest(model=MODEL, deployment=wanted))).deployment
    assert list(got.placed_versions) == [1, 2, 3]
    assert got == (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment

    live = (await store.all_deployments())[MODEL]
    assert live.placed_versions == [1, 2, 3]
    assert (live.replicas, live.precision, live.max_batch_size, live.max_queue_delay_ms) == (
        2,
        "bf16",
        32,
        1.5,
    )
    assert live.traffic_split == {"production": 90, "canary": 10}
    assert (live.shadow_alias, live.shadow_fraction) == ("canary", 0.25)
    assert (await store.get_aliases(MODEL))[1] == got.epoch

    # A pinned version cannot be archived or deleted; an aliased one neither.
    for call, version in (
        (stub.ArchiveModelVersion, 3),
        (stub.DeleteModelVersion, 3),
        (stub.ArchiveModelVersion, 1),
    ):
        request_type = (
            pb.ArchiveModelVersionRequest
            if call == stub.ArchiveModelVersion
            else pb.DeleteModelVersionRequest
        )
        err = await failure(call(request_type(model=MODEL, version=version)))
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_replaced_versions_stay_placed_for_the_retention_window_only(
    start_registry: StartRegistry, channels: Callable[[str], grpc.aio.Channel], store: CoordinationStore
) -> None:
    app = await start_registry(retention_s=0.3)
    stub: RegistryServiceAsyncStub = RegistryServiceStub(channels(app.address))
    await model_with_versions(stub, [0, 1])
    await set_alias(stub, "production", 1, expected=0)
    moved = await set_alias(stub, "production", 2, expected=1)
    live = (await store.all_deployments())[MODEL]
    assert live.placed_versions == [1, 2]

    async def expired() -> bool:
        return (await store.all_deployments())[MODEL].placed_versions == [2]

    await eventually(expired)
    _, epoch = await store.get_aliases(MODEL)
    assert epoch > moved.epoch  # the expiry is a routing change of its own


async def test_archive_and_delete_with_shared_artifacts(
    registry: RegistryApp, stub: RegistryServiceAsyncStub
) -> None:
    await model_with_versions(stub, [0, 0, 1])  # versions 1 and 2 share their artifact
    await set_alias(stub, "production", 3, expected=0)
    objects = registry.settings.resolved_artifacts_dir / "sha256"

    def files() -> int:
        return sum(1 for p in objects.rglob("*") if p.is_file())

    assert files() == 2
    archived = await stub.ArchiveModelVersion(pb.ArchiveModelVersionRequest(model=MODEL, version=1))
    assert archived.model_version.state == registry_pb2.MODEL_VERSION_STATE_ARCHIVED
    err = await failure(set_alias(stub, "canary", 1))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION

    first = await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model=MODEL, version=1))
    assert not first.artifact_deleted and files() == 2  # version 2 still uses the bytes
    second = await stub.DeleteModelVersion(pb.DeleteModelVersionRequest(model=MODEL, version=2))
    assert second.artifact_deleted and files() == 1
    versions = await stub.ListModelVersions(pb.ListModelVersionsRequest(model=MODEL))
    assert [v.version for v in versions.model_versions] == [3]
    # Numbers are never reused.
    assert await upload(stub, MODEL, artifact(5)) == 4


async def test_every_mutating_call_is_audited_with_who_and_outcome(
    start_registry: StartRegistry, channels: Callable[[str], grpc.aio.Channel]
) -> None:
    admin_id, admin_token = new_key_token()
    registry = await start_registry(access=AccessSettings(mode="enforce"), admin_key=admin_token)
    assert registry.keys is not None
    _, alice_token = await registry.keys.create("alice", ["registry.write:*", "alias.move:*"])
    stub = RegistryServiceStub(channels(registry.address))
    alice = bearer_metadata(alice_token)
    admin = bearer_metadata(admin_token)
    # A header naming someone else changes nothing: the actor is the key's principal.
    claimed = (*alice, ("x-modelyard-user", "mallory"))
    await stub.CreateModel(pb.CreateModelRequest(name=MODEL), metadata=claimed)
    await upload(stub, MODEL, artifact(0), metadata=alice)
    await stub.SetAlias(
        pb.SetAliasRequest(model=MODEL, alias="production", version=1, request_id="req-1"), metadata=alice
    )
    await failure(
        stub.SetAlias(
            pb.SetAliasRequest(model=MODEL, alias="production", version=1, expected_version=7), metadata=admin
        )
    )
    await failure(
        stub.RollbackAlias(pb.RollbackAliasRequest(model=MODEL, alias="production"), metadata=admin)
    )

    page = await stub.ListAuditEntries(pb.ListAuditEntriesRequest(model=MODEL), metadata=admin)
    summary = [(e.method, e.outcome, e.error_reason) for e in page.entries]
    assert summary == [
        ("RollbackAlias", "FAILED_PRECONDITION", "FAILED_PRECONDITION"),
        ("SetAlias", "ABORTED", "CONFLICT"),
        ("SetAlias", "OK", ""),
        ("UploadModelVersion", "OK", ""),
        ("CreateModel", "OK", ""),
    ]
    set_ok = page.entries[2]
    assert (set_ok.actor, set_ok.request_id, set_ok.target) == ("key:alice", "req-1", "alias production -> 1")
    assert page.entries[1].actor == "key:admin"
    assert page.entries[1].request_id  # the interceptor's request id
    assert not any(e.actor == "mallory" for e in page.entries)

    failed = await stub.ListAuditEntries(pb.ListAuditEntriesRequest(outcome="ABORTED"), metadata=admin)
    assert [e.method for e in failed.entries] == ["SetAlias"]
    by_alice = await stub.ListAuditEntries(
        pb.ListAuditEntriesRequest(actor="key:alice", page_size=1), metadata=admin
    )
    assert [e.method for e in by_alice.entries] == ["SetAlias"] and by_alice.next_page_token
    rest = await stub.ListAuditEntries(
        pb.ListAuditEntriesRequest(actor="key:alice", page_size=2, page_token=by_alice.next_page_token),
        metadata=admin,
    )
    assert [e.method for e in rest.entries] == ["UploadModelVersion", "CreateModel"]
    assert admin_id  # the bootstrap adopted the given token's key id


# -- recovery -------------------------------------------------------------------------------


async def test_flushall_is_repaired_with_aliases_epochs_and_deployments(
    start_registry: StartRegistry, channels: Callable[[str], grpc.aio.Channel], store: CoordinationStore
) -> None:
    app = await start_registry(redis_resync_interval_s=0.05)
    stub: RegistryServiceAsyncStub = RegistryServiceStub(channels(app.address))
    await model_with_versions(stub, [0, 1])
    await set_alias(stub, "production", 1, expected=0)
    await set_alias(stub, "canary", 2, expected=0)
    await stub.SetDeployment(
        pb.SetDeploymentRequest(
            model=MODEL,
            deployment=registry_pb2.Deployment(replicas=1, traffic_split={"production": 80, "canary": 20}),
        )
    )
    before = (await store.get_aliases(MODEL), (await store.all_deployments())[MODEL])
    assert before[1].traffic_split == {"production": 80, "canary": 20}

    await store.client.flushall()

    async def restored() -> bool:
        # The same aliases and deployment; the epoch may have moved forward: a resync that
        # read Redis half before and half after the flush republishes under a higher epoch.
        aliases, epoch = await store.get_aliases(MODEL)
        deployment = (await store.all_deployments()).get(MODEL, Deployment())
        return aliases == before[0][0] and epoch >= before[0][1] and deployment == before[1]

    await eventually(restored)
    # A restart republishes the same state without moving anything.
    await app.aclose()
    await store.client.flushall()
    await start_registry()
    await eventually(restored)
